//! The thin shell around the group leases ([`crate::lease`]): it runs a
//! takeover against the cluster ([`LeaseKeeper::take_over`]) and keeps every
//! held lease renewed from one thread, telling each group's commit through
//! its [`LeaseGate`] when the lease is gone.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidemark_ceph::{CephError, Cluster, LockRequest, Renew};

use crate::lease::{GroupLease, LeaseAction, LeaseConfig, LeaseEvent, LostReason, LOCK_NAME};
use crate::store::ceph::{XATTR_OWNER, XATTR_OWNER_ADDR};

/// The longest the renewing thread sleeps without news.
const IDLE_WAKE: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it was a bug reported already; the data is
    // consistent between statements.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a group's commit asks of its lease: the cookie its guarded writes
/// assert, and whether the lease still holds here (the cheap early
/// refusal; the cluster's `assert_locked` is the real check).
#[derive(Debug)]
pub struct LeaseGate {
    cookie: String,
    state: Mutex<GateState>,
}

#[derive(Debug, Clone)]
struct GateState {
    valid_until: Option<Instant>,
    lost: Option<LostReason>,
}

impl LeaseGate {
    fn new(cookie: &str) -> LeaseGate {
        LeaseGate {
            cookie: cookie.to_owned(),
            state: Mutex::new(GateState {
                valid_until: None,
                lost: None,
            }),
        }
    }

    /// The lock's name.
    pub fn name(&self) -> &str {
        LOCK_NAME
    }

    /// The lock's cookie.
    pub fn cookie(&self) -> &str {
        &self.cookie
    }

    /// `Ok` if the lease holds at `now`; else why not.
    pub fn check(&self, now: Instant) -> Result<(), LostReason> {
        let state = lock(&self.state);
        if let Some(reason) = &state.lost {
            return Err(reason.clone());
        }
        match state.valid_until {
            Some(until) if now < until => Ok(()),
            _ => Err(LostReason::Lapsed),
        }
    }

    fn update(&self, lease: &GroupLease) {
        let mut state = lock(&self.state);
        state.valid_until = lease.valid_until();
        if state.lost.is_none() {
            state.lost = lease.lost().cloned();
        }
    }
}

/// How a takeover ended when it did not give us the group.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError<E: std::error::Error + 'static> {
    /// Another live receiver holds the lease; `owner` is what it recorded
    /// as its address when it opened the group (none: unknown yet).
    #[error("the group is owned by another receiver ({})", .owner.as_deref().unwrap_or("address not recorded"))]
    OwnedElsewhere {
        /// The owner's advertised address.
        owner: Option<String>,
    },
    /// The takeover failed or the lease was lost on the way.
    #[error("taking the group over failed")]
    Lost(#[source] LostReason),
    /// The engine's open failed after fencing.
    #[error("opening the group after taking it over failed")]
    Open(#[source] E),
}

/// Counters of the leases of one receiver, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaseStats {
    /// Groups whose lease is held now.
    pub owned: u64,
    /// Takeovers that ended with the group held.
    pub takeovers: u64,
    /// Takeovers that found the group owned by another live receiver.
    pub owned_elsewhere: u64,
    /// Leases lost after they were held (expired, taken, lapsed).
    pub lost: u64,
    /// Times this receiver found itself fenced (blocklisted).
    pub fenced: u64,
}

struct Held {
    lease: GroupLease,
    gate: Arc<LeaseGate>,
}

struct Shared<C: Cluster> {
    cluster: Arc<C>,
    config: LeaseConfig,
    cookie: String,
    desc: String,
    my_addr: String,
    held: Mutex<BTreeMap<String, Held>>,
    wake: Condvar,
    stop: AtomicBool,
    /// Dropped as if the process died: the locks are left to expire.
    abandoned: AtomicBool,
    takeovers: AtomicU64,
    owned_elsewhere: AtomicU64,
    lost: AtomicU64,
    fenced: AtomicU64,
}

impl<C: Cluster> Shared<C> {
    /// This keeper's request for a group's lock: taking it (`Renew::No`)
    /// or renewing it (`Renew::Must`).
    fn lock_request(&self, renew: Renew) -> LockRequest<'_> {
        LockRequest {
            name: LOCK_NAME,
            cookie: &self.cookie,
            desc: &self.desc,
            duration: self.config.duration,
            renew,
        }
    }
}

/// Takes group leases over and keeps them renewed (one thread for all).
pub struct LeaseKeeper<C: Cluster + 'static> {
    shared: Arc<Shared<C>>,
    renewer: Option<JoinHandle<()>>,
}

impl<C: Cluster + 'static> fmt::Debug for LeaseKeeper<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseKeeper")
            .field("cookie", &self.shared.cookie)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<C: Cluster + 'static> LeaseKeeper<C> {
    /// A keeper for the client `cluster`; `desc` (the receiver's advertised
    /// address) is kept with each lock. Starts the renewing thread.
    pub fn new(cluster: Arc<C>, config: LeaseConfig, desc: &str) -> Result<Self, CephError> {
        let my_addr = cluster.my_addr()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let shared = Arc::new(Shared {
            cluster,
            config,
            cookie: format!("{}-{nanos:x}", std::process::id()),
            desc: desc.to_owned(),
            my_addr,
            held: Mutex::new(BTreeMap::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            takeovers: AtomicU64::new(0),
            owned_elsewhere: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            fenced: AtomicU64::new(0),
        });
        let renewer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("tidemark-lease".into())
                .spawn(move || renew_loop(&shared))
                .map_err(|e| CephError::Other {
                    op: "spawning the lease thread",
                    errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
                })?
        };
        Ok(LeaseKeeper {
            shared,
            renewer: Some(renewer),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.shared.config
    }

    /// This receiver's counters.
    pub fn stats(&self) -> LeaseStats {
        let s = &self.shared;
        LeaseStats {
            owned: lock(&s.held).len() as u64,
            takeovers: s.takeovers.load(Ordering::Relaxed),
            owned_elsewhere: s.owned_elsewhere.load(Ordering::Relaxed),
            lost: s.lost.load(Ordering::Relaxed),
            fenced: s.fenced.load(Ordering::Relaxed),
        }
    }

    /// Takes the lease on `oid` (a group's state object) over: lock,
    /// blocklist the previous owners, wait for the newest OSD map, then
    /// `open` (given the gate its commits check); held from then on and
    /// renewed. A lease this keeper holds already is taken again (the
    /// earlier gate is released first).
    pub fn take_over<T, E: std::error::Error + 'static>(
        &self,
        oid: &str,
        open: impl FnOnce(&Arc<LeaseGate>) -> Result<T, E>,
    ) -> Result<T, TakeoverError<E>> {
        let s = &self.shared;
        if let Some(mut old) = lock(&s.held).remove(oid) {
            old.lease.handle_release();
            old.gate.update(&old.lease);
        }
        let mut lease = GroupLease::new(s.config, &s.my_addr);
        let gate = Arc::new(LeaseGate::new(&s.cookie));
        let mut open = Some(open);
        let mut opened = None;
        let mut open_error = None;
        while let Some(action) = lease.poll_action(Instant::now()) {
            match action {
                LeaseAction::Lock => {
                    let request = s.lock_request(Renew::No);
                    lease.handle_lock(s.cluster.lock_exclusive(oid, &request))
                }
                LeaseAction::ReadPrevious => {
                    let previous = s.cluster.lockers(oid, LOCK_NAME).and_then(|lockers| {
                        let xattrs = s.cluster.xattrs(oid)?;
                        let recorded = xattrs
                            .get(XATTR_OWNER_ADDR)
                            .and_then(|v| String::from_utf8(v.clone()).ok());
                        Ok((lockers, recorded))
                    });
                    lease.handle_previous(previous)
                }
                LeaseAction::Blocklist(addr) => {
                    tracing::warn!(object = oid, %addr, "fencing the group's previous owner");
                    lease.handle_blocklist(s.cluster.blocklist(&addr, s.config.blocklist_expire))
                }
                LeaseAction::WaitForOsdmap => {
                    lease.handle_osdmap(s.cluster.wait_for_latest_osdmap())
                }
                LeaseAction::Open => {
                    // The open commits: the gate is valid as far as the lock is.
                    gate.update(&lease);
                    let Some(open) = open.take() else { break };
                    match open(&gate) {
                        Ok(t) => {
                            opened = Some(t);
                            lease.handle_opened(Instant::now(), true)
                        }
                        Err(e) => {
                            open_error = Some(e);
                            lease.handle_opened(Instant::now(), false)
                        }
                    }
                }
                // Renewals are the thread's; a fresh lease has none due.
                LeaseAction::Renew => break,
            }
        }
        gate.update(&lease);
        if let Some(e) = open_error {
            self.unlock(oid);
            return Err(TakeoverError::Open(e));
        }
        if lease.owned_elsewhere() {
            s.owned_elsewhere.fetch_add(1, Ordering::Relaxed);
            let owner = s
                .cluster
                .xattrs(oid)
                .ok()
                .and_then(|x| x.get(XATTR_OWNER).cloned())
                .and_then(|v| String::from_utf8(v).ok())
                .filter(|v| !v.is_empty());
            return Err(TakeoverError::OwnedElsewhere { owner });
        }
        if let Some(reason) = lease.lost().cloned() {
            if reason == LostReason::Fenced {
                s.fenced.fetch_add(1, Ordering::Relaxed);
            } else {
                self.unlock(oid);
            }
            return Err(TakeoverError::Lost(reason));
        }
        let Some(t) = opened else {
            return Err(TakeoverError::Lost(LostReason::OpenFailed));
        };
        while let Some(event) = lease.poll_event() {
            if event == LeaseEvent::Held {
                s.takeovers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(object = oid, "group lease taken");
            }
        }
        lock(&s.held).insert(oid.to_owned(), Held { lease, gate });
        s.wake.notify_all();
        Ok(t)
    }

    /// Lets the group go: no more renewals, its gate refuses commits, the
    /// lock is removed so that another receiver need not wait for expiry.
    pub fn release(&self, oid: &str) {
        let held = lock(&self.shared.held).remove(oid);
        if let Some(mut held) = held {
            held.lease.handle_release();
            held.gate.update(&held.lease);
            self.unlock(oid);
        }
    }

    /// Lets every held group go, as [`release`](Self::release) does: a
    /// receiver that stops cleanly hands its groups over at once (dropping
    /// the keeper does this too).
    pub fn release_all(&self) {
        let held: Vec<String> = lock(&self.shared.held).keys().cloned().collect();
        for oid in held {
            self.release(&oid);
        }
    }

    /// Stops renewing without letting any group go, as if the process had
    /// died: the locks stay until they expire and another receiver fences
    /// this client (tests model a crashed or frozen owner so).
    pub fn abandon(self) {
        self.shared.abandoned.store(true, Ordering::Relaxed);
    }

    fn unlock(&self, oid: &str) {
        if let Err(e) = self
            .shared
            .cluster
            .unlock(oid, LOCK_NAME, &self.shared.cookie)
        {
            tracing::debug!(object = oid, error = %e, "unlocking a group lease");
        }
    }
}

/// Dropping the keeper lets its groups go (unlocked: the next receiver
/// takes them at once), unless it was [abandoned](LeaseKeeper::abandon).
impl<C: Cluster + 'static> Drop for LeaseKeeper<C> {
    fn drop(&mut self) {
        if !self.shared.abandoned.load(Ordering::Relaxed) {
            self.release_all();
        }
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        if let Some(renewer) = self.renewer.take() {
            // A panic in it was reported by the thread already.
            let _ = renewer.join();
        }
    }
}

/// Renews every held lease when due, until the keeper is dropped.
fn renew_loop<C: Cluster>(s: &Shared<C>) {
    let mut held = lock(&s.held);
    while !s.stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let due: Vec<String> = held
            .iter_mut()
            .filter_map(|(oid, h)| {
                let action = h.lease.poll_action(now);
                h.gate.update(&h.lease);
                (action == Some(LeaseAction::Renew)).then(|| oid.clone())
            })
            .collect();
        let mut answers = Vec::with_capacity(due.len());
        if !due.is_empty() {
            // The cluster may take long to answer: let takeovers go on.
            drop(held);
            for oid in due {
                let request = s.lock_request(Renew::Must);
                let result = s.cluster.lock_exclusive(&oid, &request);
                answers.push((oid, result));
            }
            held = lock(&s.held);
        }
        let now = Instant::now();
        let mut fenced = false;
        for (oid, result) in answers {
            if let Some(h) = held.get_mut(&oid) {
                h.lease.handle_renew(now, result);
            }
        }
        let mut gone = Vec::new();
        let mut lapsed = Vec::new();
        for (oid, h) in held.iter_mut() {
            h.gate.update(&h.lease);
            while let Some(event) = h.lease.poll_event() {
                if let LeaseEvent::Lost(reason) = event {
                    tracing::error!(object = %oid, %reason, "group lease lost: the group acknowledges nothing more");
                    fenced |= reason == LostReason::Fenced;
                    if reason == LostReason::Lapsed {
                        lapsed.push(oid.clone());
                    }
                    gone.push(oid.clone());
                }
            }
        }
        if !lapsed.is_empty() {
            // A lease that lapsed here (this process was frozen, or the
            // cluster slow): ask the cluster whether it is still ours (then
            // let it go: the group is given up) or this client was fenced.
            drop(held);
            for oid in &lapsed {
                let request = s.lock_request(Renew::Must);
                match s.cluster.lock_exclusive(oid, &request) {
                    Ok(()) => {
                        let _ = s.cluster.unlock(oid, LOCK_NAME, &s.cookie);
                    }
                    Err(CephError::Blocklisted { .. }) => fenced = true,
                    Err(_) => {}
                }
            }
            held = lock(&s.held);
        }
        if fenced {
            tracing::error!(
                "this receiver was fenced (blocklisted) by another receiver that took its groups over: it applies nothing more; restart it to compete again"
            );
        }
        if fenced {
            s.fenced.fetch_add(1, Ordering::Relaxed);
            for (oid, h) in held.iter_mut() {
                h.lease.handle_fenced();
                h.gate.update(&h.lease);
                if !gone.contains(oid) {
                    gone.push(oid.clone());
                }
            }
        }
        for oid in gone {
            held.remove(&oid);
            s.lost.fetch_add(1, Ordering::Relaxed);
        }
        let next = held
            .values()
            .filter_map(|h| h.lease.poll_timeout())
            .min()
            .map_or(IDLE_WAKE, |t| t.saturating_duration_since(Instant::now()))
            .min(IDLE_WAKE);
        held = s
            .wake
            .wait_timeout(held, next)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0;
    }
}
