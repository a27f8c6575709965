//! The ownership of a consistency group among receivers that share one Ceph
//! cluster: the group lease ([`GroupLease`]), a sans-IO core. (Not the
//! wire's session liveness, which `tidemark_wire` also calls a lease.)
//!
//! Each group is applied by one receiver at a time. The lease is a
//! `lock`-class exclusive lock ([`LOCK_NAME`]) on the group's state object,
//! taken with an expiry and renewed; a receiver whose lease lapses can
//! write nothing more, because the next owner fences it before it opens the
//! group. Checking the lease before a write is not a fence (a process
//! paused between the check and the write resumes and writes), so taking a
//! group over runs, in this order:
//!
//! 1. **Lock**: take the lock (only free or expired locks can be taken;
//!    held by another live receiver: [`LeaseEvent::OwnedElsewhere`], the
//!    shipper is sent to that owner).
//! 2. **Previous owners**: the lock's holders and the client address the
//!    last opener recorded on the state object (an expired holder is no
//!    longer listed by the cluster, so the record is what names it).
//! 3. **Blocklist** every one of them but ourselves: from here the cluster
//!    refuses each of their operations (objects and images alike).
//! 4. **Wait for the newest OSD map**, so that every OSD knows the
//!    blocklist before we write.
//! 5. **Open**: the store engine advances the group's fencing epoch (a
//!    write asserting our lock) and opens the group; from here we hold it.
//!
//! While held, the lease is renewed every third of its duration
//! ([`LeaseAction::Renew`]). It counts as valid until the send time of the
//! last successful renewal plus the duration less a fifth (the cluster
//! starts its clock later than we sent, so this is on the safe side); past
//! that, or when a renewal finds the lock expired or taken, or this client
//! blocklisted, the lease is lost ([`LeaseEvent::Lost`]) and the group must
//! acknowledge nothing more. The cluster's own check (every commit asserts
//! the lock, and the epoch) is what makes a stale commit impossible; the
//! local validity is only the cheap early refusal.
//!
//! The core owns no clock and no cluster: the shell asks it what to do
//! ([`GroupLease::poll_action`]), does it, and reports the outcome through
//! the `handle_*` methods, passing the time in.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tidemark_ceph::{CephError, Locker};

/// The name of the lock on a group's state object that is its lease.
pub const LOCK_NAME: &str = "tidemark";

/// How a group lease behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// How long the lock lasts unless renewed: a dead receiver's groups are
    /// taken over this long after its last renewal.
    pub duration: Duration,
    /// How long a fenced client stays blocklisted.
    pub blocklist_expire: Duration,
}

impl LeaseConfig {
    /// How often a held lease is renewed: a third of its duration.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// How long after a renewal was sent the lease counts as valid here.
    pub fn valid_for(&self) -> Duration {
        self.duration - self.duration / 5
    }
}

/// A client instance's address in one form, `IP:PORT/NONCE`: the cluster
/// lists lock holders with a protocol prefix (`v1:127.0.0.1:0/3642835989`)
/// where the client itself says `127.0.0.1:0/3642835989`; an address
/// vector (`[v2:…,v1:…]`) is taken by its first entry. Blocklisting
/// accepts this form.
pub fn client_addr(addr: &str) -> String {
    let first = addr
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .next()
        .unwrap_or("");
    let bare = ["v1:", "v2:", "any:"]
        .iter()
        .find_map(|p| first.strip_prefix(p))
        .unwrap_or(first);
    bare.to_owned()
}

/// What the shell does next against the cluster for this lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// Take the exclusive lock [`LOCK_NAME`] with our cookie and the
    /// configured duration, not renewing; report with
    /// [`GroupLease::handle_lock`].
    Lock,
    /// List the lock's holders and read the client address the last opener
    /// recorded; report with [`GroupLease::handle_previous`].
    ReadPrevious,
    /// Blocklist this client address for the configured time; report with
    /// [`GroupLease::handle_blocklist`].
    Blocklist(String),
    /// Wait until this client has the newest OSD map; report with
    /// [`GroupLease::handle_osdmap`].
    WaitForOsdmap,
    /// Advance the group's epoch and open it; report with
    /// [`GroupLease::handle_opened`].
    Open,
    /// Renew the lock (only if still ours and unexpired); report with
    /// [`GroupLease::handle_renew`].
    Renew,
}

/// Why a lease was lost (or never taken).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LostReason {
    /// Another receiver: a renewal found our lock expired (`-ENOENT`) or
    /// held by someone else (`-EBUSY`).
    #[error("the lease expired or was taken by another receiver")]
    Taken,
    /// Another receiver fenced this one: the cluster refuses this client
    /// (blocklisted). Every group of the client is lost.
    #[error("this receiver was fenced (blocklisted) by another one")]
    Fenced,
    /// Cluster: no renewal succeeded in time (the cluster did not answer):
    /// the lease may have expired.
    #[error("the lease could not be renewed in time")]
    Lapsed,
    /// Cluster: a step of the takeover failed; the group was not opened.
    #[error("taking the group over failed at {step}")]
    TakeoverFailed {
        /// The step.
        step: &'static str,
        /// The cluster's answer.
        #[source]
        source: CephError,
    },
    /// Local or cluster: the store engine could not open the group after
    /// fencing (its own error says why).
    #[error("the group could not be opened after taking it over")]
    OpenFailed,
    /// This receiver let the group go.
    #[error("the receiver released the group")]
    Released,
}

/// What became of a lease, once: the shell takes these with
/// [`GroupLease::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// The group is ours: fenced, opened, renewed from now on.
    Held,
    /// Another live receiver holds the lease: the group is not ours.
    OwnedElsewhere,
    /// The lease is gone: the group must acknowledge nothing more.
    Lost(LostReason),
}

/// Where a lease is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Step 1: the lock is to be taken.
    Locking,
    /// Step 2: the previous owners are to be read.
    ReadingPrevious,
    /// Step 3: these addresses are still to be blocklisted.
    Fencing(VecDeque<String>),
    /// Step 4.
    WaitingForOsdmap,
    /// Step 5.
    Opening,
    /// Ours.
    Held,
    /// Another live receiver holds it (final).
    OwnedElsewhere,
    /// Lost (final).
    Lost(LostReason),
}

/// One group's lease, as seen by one receiver: the takeover sequence, the
/// renewals and the local validity. See the module documentation.
#[derive(Debug, Clone)]
pub struct GroupLease {
    config: LeaseConfig,
    /// This client's address: never blocklisted by ourselves.
    my_addr: String,
    state: State,
    /// An action was handed out and its outcome not yet reported.
    in_flight: Option<Instant>,
    /// When the last successful lock or renewal was sent.
    renewed_at: Option<Instant>,
    /// When the next renewal is due.
    renew_due: Option<Instant>,
    events: VecDeque<LeaseEvent>,
}

impl GroupLease {
    /// A lease to take, by the client at `my_addr`.
    pub fn new(config: LeaseConfig, my_addr: &str) -> GroupLease {
        GroupLease {
            config,
            my_addr: my_addr.to_owned(),
            state: State::Locking,
            in_flight: None,
            renewed_at: None,
            renew_due: None,
            events: VecDeque::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.config
    }

    /// The next thing to do against the cluster, if any now (none while an
    /// action is in flight, before a renewal is due, or once final).
    pub fn poll_action(&mut self, now: Instant) -> Option<LeaseAction> {
        self.check_validity(now);
        if self.in_flight.is_some() {
            return None;
        }
        let action = match &self.state {
            State::Locking => LeaseAction::Lock,
            State::ReadingPrevious => LeaseAction::ReadPrevious,
            State::Fencing(addrs) => LeaseAction::Blocklist(addrs.front()?.clone()),
            State::WaitingForOsdmap => LeaseAction::WaitForOsdmap,
            State::Opening => LeaseAction::Open,
            State::Held if self.renew_due.is_some_and(|due| now >= due) => LeaseAction::Renew,
            State::Held | State::OwnedElsewhere | State::Lost(_) => return None,
        };
        self.in_flight = Some(now);
        Some(action)
    }

    /// When the shell should poll again without news: the next renewal or
    /// the end of the lease's validity, whichever is first.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Held => {
                let until = self.valid_until();
                match (self.in_flight, self.renew_due) {
                    (Some(_), _) | (None, None) => until,
                    (None, Some(due)) => Some(until.map_or(due, |u| u.min(due))),
                }
            }
            _ => None,
        }
    }

    /// What became of the lease since last asked.
    pub fn poll_event(&mut self) -> Option<LeaseEvent> {
        self.events.pop_front()
    }

    /// Whether the group is ours and the lease valid at `now`: only then
    /// may it commit.
    pub fn is_held(&self, now: Instant) -> bool {
        self.state == State::Held && self.valid_until().is_some_and(|until| now < until)
    }

    /// The end of the lease's local validity (held or being taken).
    pub fn valid_until(&self) -> Option<Instant> {
        self.renewed_at.map(|at| at + self.config.valid_for())
    }

    /// Why the lease is lost, once it is.
    pub fn lost(&self) -> Option<&LostReason> {
        match &self.state {
            State::Lost(reason) => Some(reason),
            _ => None,
        }
    }

    /// Whether another live receiver holds it.
    pub fn owned_elsewhere(&self) -> bool {
        self.state == State::OwnedElsewhere
    }

    /// The outcome of [`LeaseAction::Lock`]. `Exists` means the lock is
    /// ours already (this client and cookie).
    pub fn handle_lock(&mut self, result: Result<(), CephError>) {
        let Some(sent) = self.answer(|s| *s == State::Locking) else {
            return;
        };
        match result {
            Ok(()) | Err(CephError::Exists { .. }) => {
                self.renewed_at = Some(sent);
                self.state = State::ReadingPrevious;
            }
            Err(CephError::Busy { .. }) => {
                self.state = State::OwnedElsewhere;
                self.events.push_back(LeaseEvent::OwnedElsewhere);
            }
            Err(e) => self.fail("taking the lock", e),
        }
    }

    /// The outcome of [`LeaseAction::ReadPrevious`]: the lock's holders
    /// and the client address the last opener recorded (if any).
    pub fn handle_previous(&mut self, result: Result<(Vec<Locker>, Option<String>), CephError>) {
        if self.answer(|s| *s == State::ReadingPrevious).is_none() {
            return;
        }
        match result {
            Ok((lockers, recorded)) => {
                let me = client_addr(&self.my_addr);
                let mut addrs: VecDeque<String> = VecDeque::new();
                for addr in lockers
                    .iter()
                    .map(|l| l.addr.as_str())
                    .chain(recorded.as_deref())
                {
                    let addr = client_addr(addr);
                    if !addr.is_empty() && addr != me && !addrs.contains(&addr) {
                        addrs.push_back(addr);
                    }
                }
                self.state = if addrs.is_empty() {
                    State::WaitingForOsdmap
                } else {
                    State::Fencing(addrs)
                };
            }
            Err(e) => self.fail("reading the previous owners", e),
        }
    }

    /// The outcome of [`LeaseAction::Blocklist`].
    pub fn handle_blocklist(&mut self, result: Result<(), CephError>) {
        if self.answer(|s| matches!(s, State::Fencing(_))).is_none() {
            return;
        }
        match result {
            Ok(()) => {
                if let State::Fencing(addrs) = &mut self.state {
                    addrs.pop_front();
                    if addrs.is_empty() {
                        self.state = State::WaitingForOsdmap;
                    }
                }
            }
            Err(e) => self.fail("blocklisting the previous owner", e),
        }
    }

    /// The outcome of [`LeaseAction::WaitForOsdmap`].
    pub fn handle_osdmap(&mut self, result: Result<(), CephError>) {
        if self.answer(|s| *s == State::WaitingForOsdmap).is_none() {
            return;
        }
        match result {
            Ok(()) => self.state = State::Opening,
            Err(e) => self.fail("waiting for the newest OSD map", e),
        }
    }

    /// The outcome of [`LeaseAction::Open`] at `now` (the shell reports
    /// why an open failed; the lease only needs to know it did). Opened:
    /// held, if the lock is still valid; else lost.
    pub fn handle_opened(&mut self, now: Instant, opened: bool) {
        if self.answer(|s| *s == State::Opening).is_none() {
            return;
        }
        if opened {
            self.state = State::Held;
            self.events.push_back(LeaseEvent::Held);
            self.renew_due = self.renewed_at.map(|at| at + self.config.renew_every());
            self.check_validity(now);
        } else {
            self.lose(LostReason::OpenFailed);
        }
    }

    /// The shell lets the group go (it unlocks it): the group must
    /// acknowledge nothing more.
    pub fn handle_release(&mut self) {
        if !matches!(self.state, State::OwnedElsewhere | State::Lost(_)) {
            self.in_flight = None;
            self.lose(LostReason::Released);
        }
    }

    /// The outcome of [`LeaseAction::Renew`].
    pub fn handle_renew(&mut self, now: Instant, result: Result<(), CephError>) {
        let Some(sent) = self.answer(|s| *s == State::Held) else {
            return;
        };
        match result {
            Ok(()) => {
                self.renewed_at = Some(sent);
                self.renew_due = Some(sent + self.config.renew_every());
            }
            Err(CephError::NotFound { .. } | CephError::Busy { .. }) => {
                self.lose(LostReason::Taken)
            }
            Err(CephError::Blocklisted { .. }) => self.lose(LostReason::Fenced),
            // The cluster did not answer, or answered something a retry
            // may fix: try again soon, until the validity ends.
            Err(_) => self.renew_due = Some(now + self.config.renew_every() / 4),
        }
        self.check_validity(now);
    }

    /// Something else of this client was refused as blocklisted: every
    /// lease of the client is lost.
    pub fn handle_fenced(&mut self) {
        if !matches!(self.state, State::OwnedElsewhere | State::Lost(_)) {
            self.in_flight = None;
            self.lose(LostReason::Fenced);
        }
    }

    /// Takes the in-flight action's send time if the state is the one the
    /// answer is for.
    fn answer(&mut self, expected: impl Fn(&State) -> bool) -> Option<Instant> {
        if !expected(&self.state) {
            return None;
        }
        self.in_flight.take()
    }

    fn fail(&mut self, step: &'static str, source: CephError) {
        let reason = if matches!(source, CephError::Blocklisted { .. }) {
            LostReason::Fenced
        } else {
            LostReason::TakeoverFailed { step, source }
        };
        self.lose(reason);
    }

    fn lose(&mut self, reason: LostReason) {
        self.state = State::Lost(reason.clone());
        self.renew_due = None;
        self.events.push_back(LeaseEvent::Lost(reason));
    }

    /// A held lease past its validity is lost.
    fn check_validity(&mut self, now: Instant) {
        if self.state == State::Held && self.valid_until().is_none_or(|until| now >= until) {
            self.in_flight = None;
            self.lose(LostReason::Lapsed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "10.0.0.2:0/2";
    const OLD: &str = "10.0.0.1:0/1";

    fn config() -> LeaseConfig {
        LeaseConfig {
            duration: Duration::from_secs(3),
            blocklist_expire: Duration::from_secs(3600),
        }
    }

    fn locker(addr: &str) -> Locker {
        Locker {
            client: "client.1".into(),
            cookie: "c".into(),
            addr: addr.into(),
        }
    }

    /// Runs the takeover to Held at `t0`, answering every step with success;
    /// returns the actions seen, in order.
    fn take(
        lease: &mut GroupLease,
        t0: Instant,
        previous: Vec<Locker>,
        recorded: Option<&str>,
    ) -> Vec<LeaseAction> {
        let mut seen = Vec::new();
        let mut previous = Some((previous, recorded.map(str::to_owned)));
        while let Some(action) = lease.poll_action(t0) {
            seen.push(action.clone());
            match action {
                LeaseAction::Lock => lease.handle_lock(Ok(())),
                LeaseAction::ReadPrevious => lease.handle_previous(Ok(previous.take().unwrap())),
                LeaseAction::Blocklist(_) => lease.handle_blocklist(Ok(())),
                LeaseAction::WaitForOsdmap => lease.handle_osdmap(Ok(())),
                LeaseAction::Open => lease.handle_opened(t0, true),
                LeaseAction::Renew => unreachable!("no renewal is due at the takeover"),
            }
        }
        seen
    }

    /// The takeover locks, then blocklists every previous owner (the
    /// recorded opener and the listed holders, never ourselves, each once),
    /// then waits for the newest OSD map, and only then opens.
    #[test]
    fn takeover_fences_every_previous_owner_before_it_opens() {
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), ME);
        let seen = take(
            &mut lease,
            t0,
            vec![locker(OLD), locker(ME), locker("10.0.0.3:0/3")],
            Some(OLD),
        );
        assert_eq!(
            seen,
            [
                LeaseAction::Lock,
                LeaseAction::ReadPrevious,
                LeaseAction::Blocklist(OLD.into()),
                LeaseAction::Blocklist("10.0.0.3:0/3".into()),
                LeaseAction::WaitForOsdmap,
                LeaseAction::Open,
            ]
        );
        assert_eq!(lease.poll_event(), Some(LeaseEvent::Held));
        assert!(lease.is_held(t0));
    }

    /// The holder list's `v1:` form and the client's own form are the same
    /// client: a takeover never blocklists itself.
    #[test]
    fn a_listed_holder_is_known_as_ourselves_in_either_form() {
        assert_eq!(client_addr("v1:127.0.0.1:0/36428"), "127.0.0.1:0/36428");
        assert_eq!(client_addr("127.0.0.1:0/36428"), "127.0.0.1:0/36428");
        assert_eq!(
            client_addr("[v2:10.0.0.1:0/7,v1:10.0.0.1:0/7]"),
            "10.0.0.1:0/7"
        );
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), "127.0.0.1:0/36428");
        let seen = take(
            &mut lease,
            t0,
            vec![locker("v1:127.0.0.1:0/36428"), locker("v1:127.0.0.1:0/99")],
            Some("127.0.0.1:0/99"),
        );
        assert_eq!(
            seen,
            [
                LeaseAction::Lock,
                LeaseAction::ReadPrevious,
                LeaseAction::Blocklist("127.0.0.1:0/99".into()),
                LeaseAction::WaitForOsdmap,
                LeaseAction::Open,
            ]
        );
    }

    /// A group nobody opened before (or that we opened last) is opened
    /// without blocklisting anyone, but still after the newest OSD map.
    #[test]
    fn a_first_takeover_blocklists_nobody() {
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), ME);
        let seen = take(&mut lease, t0, vec![], Some(ME));
        assert_eq!(
            seen,
            [
                LeaseAction::Lock,
                LeaseAction::ReadPrevious,
                LeaseAction::WaitForOsdmap,
                LeaseAction::Open,
            ]
        );
    }

    /// A lock held by a live receiver: the group is owned elsewhere and
    /// nothing else is done (nobody fenced, nothing opened).
    #[test]
    fn a_held_lock_means_the_group_is_owned_elsewhere() {
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), ME);
        assert_eq!(lease.poll_action(t0), Some(LeaseAction::Lock));
        lease.handle_lock(Err(CephError::Busy { op: "lock" }));
        assert_eq!(lease.poll_event(), Some(LeaseEvent::OwnedElsewhere));
        assert!(lease.owned_elsewhere());
        assert_eq!(lease.poll_action(t0), None);
        assert!(!lease.is_held(t0));
    }

    /// A failed blocklist stops the takeover before the group is opened.
    #[test]
    fn a_failed_blocklist_stops_the_takeover() {
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), ME);
        lease.poll_action(t0);
        lease.handle_lock(Ok(()));
        lease.poll_action(t0);
        lease.handle_previous(Ok((vec![], Some(OLD.into()))));
        assert_eq!(
            lease.poll_action(t0),
            Some(LeaseAction::Blocklist(OLD.into()))
        );
        lease.handle_blocklist(Err(CephError::TimedOut { op: "blocklist" }));
        assert!(matches!(
            lease.poll_event(),
            Some(LeaseEvent::Lost(LostReason::TakeoverFailed { .. }))
        ));
        assert_eq!(lease.poll_action(t0), None, "never opened");
    }

    /// Renewals come every third of the duration; each success extends the
    /// validity from its send time.
    #[test]
    fn renewals_come_every_third_and_extend_the_validity() {
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), ME);
        take(&mut lease, t0, vec![], None);
        assert_eq!(lease.poll_timeout(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(lease.poll_action(t0 + Duration::from_millis(999)), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(lease.poll_action(t1), Some(LeaseAction::Renew));
        assert_eq!(lease.poll_action(t1), None, "one renewal in flight");
        lease.handle_renew(t1 + Duration::from_millis(10), Ok(()));
        // Valid until the send time + 3 s - 0.6 s.
        assert_eq!(lease.valid_until(), Some(t1 + Duration::from_millis(2400)));
        assert!(lease.is_held(t1 + Duration::from_millis(2399)));
        assert_eq!(lease.poll_timeout(), Some(t1 + Duration::from_secs(1)));
    }

    /// A lease whose renewals go unanswered lapses at its local deadline
    /// (before the cluster's expiry), and stays lost.
    #[test]
    fn unanswered_renewals_lapse_at_the_local_deadline() {
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), ME);
        take(&mut lease, t0, vec![], None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(lease.poll_action(t1), Some(LeaseAction::Renew));
        lease.handle_renew(t1, Err(CephError::TimedOut { op: "renew" }));
        assert!(lease.is_held(t1), "a timeout alone loses nothing yet");
        // Retried soon, still unanswered.
        let t2 = t1 + Duration::from_millis(250);
        assert_eq!(lease.poll_action(t2), Some(LeaseAction::Renew));
        let deadline = t0 + Duration::from_millis(2400);
        assert!(lease.is_held(deadline - Duration::from_millis(1)));
        assert!(!lease.is_held(deadline));
        assert_eq!(lease.poll_action(deadline), None);
        assert_eq!(lease.poll_event(), Some(LeaseEvent::Held));
        assert_eq!(
            lease.poll_event(),
            Some(LeaseEvent::Lost(LostReason::Lapsed))
        );
        // The late answer changes nothing.
        lease.handle_renew(deadline, Ok(()));
        assert!(!lease.is_held(deadline));
        assert_eq!(lease.lost(), Some(&LostReason::Lapsed));
    }

    /// A renewal that finds the lock expired or taken, or this client
    /// blocklisted, loses the lease at once.
    #[test]
    fn a_refused_renewal_loses_the_lease() {
        for (answer, reason) in [
            (CephError::NotFound { op: "renew" }, LostReason::Taken),
            (CephError::Busy { op: "renew" }, LostReason::Taken),
            (CephError::Blocklisted { op: "renew" }, LostReason::Fenced),
        ] {
            let t0 = Instant::now();
            let mut lease = GroupLease::new(config(), ME);
            take(&mut lease, t0, vec![], None);
            lease.poll_event();
            let t1 = t0 + Duration::from_secs(1);
            assert_eq!(lease.poll_action(t1), Some(LeaseAction::Renew));
            lease.handle_renew(t1, Err(answer));
            assert_eq!(lease.poll_event(), Some(LeaseEvent::Lost(reason)));
            assert!(!lease.is_held(t1));
            assert_eq!(lease.poll_action(t1 + Duration::from_secs(1)), None);
        }
    }

    /// A takeover slower than the lock's validity does not end held.
    #[test]
    fn a_takeover_slower_than_the_lease_ends_lost() {
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), ME);
        lease.poll_action(t0);
        lease.handle_lock(Ok(()));
        lease.poll_action(t0);
        lease.handle_previous(Ok((vec![], None)));
        lease.poll_action(t0);
        lease.handle_osdmap(Ok(()));
        assert_eq!(lease.poll_action(t0), Some(LeaseAction::Open));
        lease.handle_opened(t0 + Duration::from_secs(5), true);
        assert!(!lease.is_held(t0 + Duration::from_secs(5)));
        assert_eq!(lease.lost(), Some(&LostReason::Lapsed));
    }

    /// Being fenced through another group's operation loses this one too.
    #[test]
    fn fenced_elsewhere_loses_every_lease() {
        let t0 = Instant::now();
        let mut lease = GroupLease::new(config(), ME);
        take(&mut lease, t0, vec![], None);
        lease.handle_fenced();
        assert_eq!(lease.lost(), Some(&LostReason::Fenced));
        assert!(!lease.is_held(t0));
    }
}
