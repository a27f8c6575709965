//! The receiver daemon: a QUIC server (mutual TLS, clients only from the
//! receiver's CA) that files each authenticated host's replicas under
//! `data-dir/<host>/<group>/` and runs the protocol session
//! ([`tidemark_wire::receiver`]) against that group's store. A host can only
//! ever name its own directory: the host part comes from its certificate,
//! never from what it sends.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tidemark_config::ReceiverConfig;
use tidemark_wire::receiver::Receiving;
use tidemark_wire::{
    ErrorClass, ErrorCode, ExpectHello, Message, MessageDecoder, MessageType,
    ReceiverConfig as SessionConfig, ReceiverError,
};
use tokio::sync::watch;

use crate::coordinate::SpanSample;
use crate::drain;
use crate::replica::StoreReplica;
use crate::store::{GroupState, LocalEngine, Retention, StoreEngine};
use crate::store_health::StoreHealth;
use tidemark_metrics::{labels, Exposition, MetricsServer, Unit};
use tidemark_names::Name;

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverFatal {
    /// Certificates, address or data directory.
    #[error("{0}")]
    Setup(String),
}

/// The receiver's lock file in its data directory.
pub const LOCK_FILE: &str = "receiver.lock";

type GroupKey = (Name, Name);
type Groups = Arc<Mutex<HashMap<GroupKey, Arc<Mutex<StoreReplica>>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory of a host's group under `data_dir`: names are single path
/// components, so it is always two levels below `data_dir`.
pub fn group_dir(data_dir: &Path, host: &Name, group: &Name) -> PathBuf {
    LocalEngine::new(data_dir).group_dir(host, group)
}

struct Server {
    /// Where the groups' replica stores are.
    engine: Arc<dyn StoreEngine>,
    /// The data directory: drain requests and answers are in its group
    /// directories.
    data_dir: PathBuf,
    retention: Retention,
    revoked: HashSet<Name>,
    groups: Groups,
    stats: Mutex<HashMap<GroupKey, Arc<GroupStats>>>,
    /// Connections per host that ended because the shipper fell silent
    /// for the peer timeout (killed, frozen, unreachable).
    peer_timeouts: Mutex<std::collections::BTreeMap<Name, u64>>,
    /// The peer timeout, for what is logged.
    peer_timeout: Duration,
    /// The spans' coordinators, by member.
    spans: crate::coordinate::Spans,
    /// Signs the certificates hosts renew.
    renewal: tidemark_net::renew::RenewalSigner,
    /// Groups whose store did not answer in time (degraded).
    health: Mutex<StoreHealth>,
    /// Each group's last sample: what a scrape shows of a group whose
    /// store is busy (a commit waiting for the cluster), instead of
    /// waiting for it.
    last_samples: Mutex<HashMap<GroupKey, GroupSample>>,
    /// What the shippers report of themselves (the console reads it).
    reports: Arc<crate::shipper_reports::ShipperReports>,
}

/// Counters of one host's group since the receiver started.
#[derive(Debug, Default)]
struct GroupStats {
    /// Records received in order and applied (a record the store already
    /// had after a reconnect is skipped by it, and counted here).
    records: AtomicU64,
    /// Their encoded bytes.
    bytes: AtomicU64,
    /// Sessions open now.
    sessions: AtomicU64,
    /// Since when the group has had no session (its last ended, or it was
    /// opened without one).
    idle_since: Mutex<Option<Instant>>,
}

/// Reads a session's status reports while it lives.
struct ReportsGuard {
    task: tokio::task::JoinHandle<()>,
    reports: Arc<crate::shipper_reports::ShipperReports>,
    key: GroupKey,
}

impl Drop for ReportsGuard {
    fn drop(&mut self) {
        self.task.abort();
        let (reports, (host, group)) = (self.reports.clone(), self.key.clone());
        // Syncs the lag history: not on the session's thread.
        tokio::task::spawn_blocking(move || reports.handle_session_end(&host, &group));
    }
}

/// Counts a session as connected while it lives.
struct SessionGuard(Arc<GroupStats>);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut idle = lock(&self.0.idle_since);
        if self.0.sessions.fetch_sub(1, Ordering::Relaxed) == 1 {
            *idle = Some(Instant::now());
        }
    }
}

/// The states `tidemark_receiver_group_state` can show.
const GROUP_STATES: &[&str] = &["initial-sync", "consistent", "resyncing"];

fn group_state_name(s: &GroupState) -> &'static str {
    match s {
        GroupState::InitialSync => "initial-sync",
        GroupState::Consistent => "consistent",
        GroupState::Resyncing { .. } => "resyncing",
    }
}

/// What one scrape reports of one host's group.
#[derive(Clone)]
struct GroupSample {
    host: String,
    group: String,
    durable_seq: u64,
    state: &'static str,
    /// Timestamp (ns) of the newest durable barrier.
    last_barrier_ns: Option<u64>,
    /// Recovery points kept, and the timestamps (ns) of the oldest and
    /// the newest.
    points: u64,
    oldest_point_ns: Option<u64>,
    newest_point_ns: Option<u64>,
    /// Bytes of history behind the points.
    history_bytes: u64,
    /// A span's floor keeps the history over max-space.
    floor_holds_space: bool,
    records: u64,
    bytes: u64,
    sessions: u64,
}

/// The receiver's metrics from one sample per group and the time now
/// (ns since the Unix epoch).
fn collect_metrics(
    samples: &[GroupSample],
    spans: &[SpanSample],
    peer_timeouts: &[(String, u64)],
    now_ns: u64,
) -> Exposition {
    let mut e = Exposition::new();
    for s in spans {
        let l = labels(&[("span", &s.name)]);
        e.gauge(
            "tidemark_span_members",
            "Members of the span (host groups named in its [[receiver.span]]).",
            None,
            &l,
            s.members as f64,
        );
        e.gauge(
            "tidemark_span_members_connected",
            "Members whose shipper is connected in a protocol that can hold: a span point needs all of them.",
            None,
            &l,
            s.connected as f64,
        );
        e.gauge(
            "tidemark_span_target",
            "The span's RPO target: how old its newest span point may grow.",
            Some(Unit::Seconds),
            &l,
            s.target.as_secs_f64(),
        );
        e.gauge(
            "tidemark_span_without_point",
            "How long the span has had no new span point: the age of the newest one, or the time since the receiver started when it has none.",
            Some(Unit::Seconds),
            &l,
            now_ns.saturating_sub(s.last_point_ns.unwrap_or(s.started_ns)) as f64 / 1e9,
        );
        for (outcome, n) in [
            ("span-point", s.durable),
            ("aborted", s.aborted),
            ("not-started", s.not_started),
        ] {
            e.counter(
                "tidemark_span_rounds",
                "The span's rounds since the receiver started, by outcome: a span point, abandoned (a member refused, was late or lost), or not started (a member not connected).",
                None,
                &labels(&[("span", &s.name), ("outcome", outcome)]),
                n,
            );
        }
    }
    for (host, count) in peer_timeouts {
        e.counter(
            "tidemark_receiver_peer_timeouts",
            "Connections of the host that ended because its shipper sent nothing for the peer timeout ([receiver.liveness]).",
            None,
            &labels(&[("host", host)]),
            *count,
        );
    }
    for s in samples {
        let g = labels(&[("host", &s.host), ("group", &s.group)]);
        e.gauge(
            "tidemark_receiver_durable_sequence",
            "Every record up to this sequence number is durably applied to the replica.",
            None,
            &g,
            s.durable_seq as f64,
        );
        e.counter(
            "tidemark_receiver_applied_records",
            "Records received in order and applied since the receiver started.",
            None,
            &g,
            s.records,
        );
        e.counter(
            "tidemark_receiver_applied",
            "Encoded bytes of the records applied since the receiver started.",
            Some(Unit::Bytes),
            &g,
            s.bytes,
        );
        if let Some(ts) = s.last_barrier_ns {
            e.gauge(
                "tidemark_receiver_last_barrier_age",
                "Age of the newest durable barrier: how old the newest crash-consistent recovery point is.",
                Some(Unit::Seconds),
                &g,
                now_ns.saturating_sub(ts) as f64 / 1e9,
            );
        }
        e.gauge(
            "tidemark_receiver_recovery_points",
            "Recovery points kept (one per barrier within the retention window).",
            None,
            &g,
            s.points as f64,
        );
        for (name, help, ts) in [
            (
                "tidemark_receiver_oldest_point_age",
                "Age of the oldest recovery point kept: how far back a failover can go.",
                s.oldest_point_ns,
            ),
            (
                "tidemark_receiver_newest_point_age",
                "Age of the newest recovery point.",
                s.newest_point_ns,
            ),
        ] {
            if let Some(ts) = ts {
                e.gauge(
                    name,
                    help,
                    Some(Unit::Seconds),
                    &g,
                    now_ns.saturating_sub(ts) as f64 / 1e9,
                );
            }
        }
        e.gauge(
            "tidemark_receiver_history",
            "Bytes the history behind the recovery points takes (journal segments).",
            Some(Unit::Bytes),
            &g,
            s.history_bytes as f64,
        );
        e.gauge(
            "tidemark_receiver_span_floor_holds_space",
            "1 while a span's floor keeps the group's history over max-space (the span's points win over the limit).",
            None,
            &g,
            u8::from(s.floor_holds_space).into(),
        );
        e.state_set(
            "tidemark_receiver_group_state",
            "State of the replica group (1 for the current state).",
            &g,
            GROUP_STATES,
            s.state,
        );
        e.gauge(
            "tidemark_receiver_sessions",
            "Shipper sessions connected now.",
            None,
            &g,
            s.sessions as f64,
        );
    }
    e
}

/// The group leases' metrics, with a store shared between receivers.
fn lease_metrics(e: &mut Exposition, s: &crate::lease_task::LeaseStats) {
    let none = labels(&[]);
    e.gauge(
        "tidemark_receiver_groups_owned",
        "Groups whose lease this receiver holds (it applies them).",
        None,
        &none,
        s.owned as f64,
    );
    e.counter(
        "tidemark_receiver_takeovers",
        "Groups this receiver took (their previous owners fenced first).",
        None,
        &none,
        s.takeovers,
    );
    e.counter(
        "tidemark_receiver_redirects",
        "Shipper sessions sent to another receiver that owns their group.",
        None,
        &none,
        s.owned_elsewhere,
    );
    e.counter(
        "tidemark_receiver_leases_lost",
        "Group leases lost after they were held (expired, taken over, not renewed in time).",
        None,
        &none,
        s.lost,
    );
    e.counter(
        "tidemark_receiver_fenced",
        "Times another receiver fenced (blocklisted) this one: it applies nothing until restarted.",
        None,
        &none,
        s.fenced,
    );
}

/// Whether the groups' store answers: the receiver and each group it
/// applies (or failed to open) are degraded while it does not.
fn health_metrics(e: &mut Exposition, health: &StoreHealth, samples: &[GroupSample]) {
    e.gauge(
        "tidemark_receiver_store_degraded",
        "1 while the store of a group (a Ceph cluster) does not answer within op-timeout: nothing more is acknowledged until it does.",
        None,
        &labels(&[]),
        f64::from(u8::from(health.any())),
    );
    let mut groups: std::collections::BTreeSet<(String, String)> = samples
        .iter()
        .map(|s| (s.host.clone(), s.group.clone()))
        .collect();
    groups.extend(
        health
            .all()
            .map(|((h, g), _)| (h.to_string(), g.to_string())),
    );
    for (host, group) in groups {
        let degraded = health
            .all()
            .any(|((h, g), _)| h.as_str() == host && g.as_str() == group);
        e.gauge(
            "tidemark_receiver_group_degraded",
            "1 while the group's store does not answer within op-timeout (the receiver logs why).",
            None,
            &labels(&[("host", &host), ("group", &group)]),
            f64::from(u8::from(degraded)),
        );
    }
}

impl Server {
    /// A store operation of the group found the store not answering.
    fn store_unanswered(&self, host: &Name, group: &Name, error: &str) {
        let newly =
            lock(&self.health).handle_unanswered(host, group, error, tidemark_changelog::now_ns());
        if newly {
            tracing::warn!(%host, %group, reason = %error, "store degraded: the cluster does not answer within op-timeout; nothing is acknowledged until it does");
            self.write_health();
        }
    }

    /// A store operation of the session failed: degraded if the store did
    /// not answer.
    fn note_unanswered(&self, host: &Name, group: &Name, replica: &Mutex<StoreReplica>) {
        if let Some(why) = lock(replica).take_unanswered() {
            self.store_unanswered(host, group, &why);
        }
    }

    /// An open or a commit of the group succeeded.
    fn store_answered(&self, host: &Name, group: &Name) {
        let was = lock(&self.health).handle_success(host, group);
        if let Some(was) = was {
            let secs = tidemark_changelog::now_ns().saturating_sub(was.since_ns) as f64 / 1e9;
            tracing::info!(%host, %group, degraded_for_s = secs, "store answers again: the group applies and acknowledges again");
            self.write_health();
        }
    }

    /// Tells `tidemark status` on this node which groups are degraded.
    fn write_health(&self) {
        let health = lock(&self.health).clone();
        if let Err(e) = crate::store_health::write(&self.data_dir, &health) {
            tracing::warn!(dir = %self.data_dir.display(), error = %e, "cannot write the store's health file for tidemark status");
        }
    }

    /// One sample per group this receiver has opened since it started.
    /// A group whose store is busy (an open or a commit waiting for the
    /// cluster) shows its last sample: a scrape never waits for a store.
    fn samples(&self) -> Vec<GroupSample> {
        let mut last = lock(&self.last_samples);
        let groups: Vec<(GroupKey, Arc<Mutex<StoreReplica>>)> = match self.groups.try_lock() {
            Ok(groups) => groups.iter().map(|(k, g)| (k.clone(), g.clone())).collect(),
            Err(std::sync::TryLockError::Poisoned(p)) => p
                .into_inner()
                .iter()
                .map(|(k, g)| (k.clone(), g.clone()))
                .collect(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let mut out: Vec<GroupSample> = last.values().cloned().collect();
                out.sort_by(|a, b| (&a.host, &a.group).cmp(&(&b.host, &b.group)));
                return out;
            }
        };
        let stats = lock(&self.stats);
        let mut out: Vec<GroupSample> = groups
            .into_iter()
            .filter_map(|((host, group), replica)| {
                let r = match replica.try_lock() {
                    Ok(r) => r,
                    Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => {
                        return last.get(&(host, group)).cloned();
                    }
                };
                let (pos, barrier, points, history_bytes, floor_holds_space) = {
                    let g = r.group();
                    (
                        g.position(),
                        g.last_barrier(),
                        g.points(),
                        g.history_bytes(),
                        g.floor_holds_space(),
                    )
                };
                drop(r);
                let st = stats
                    .get(&(host.clone(), group.clone()))
                    .cloned()
                    .unwrap_or_default();
                let sample = GroupSample {
                    host: host.to_string(),
                    group: group.to_string(),
                    durable_seq: pos.durable_seq.get(),
                    state: group_state_name(&pos.state),
                    last_barrier_ns: barrier.map(|(_, ts)| ts),
                    points: points.len() as u64,
                    oldest_point_ns: points.first().map(|p| p.timestamp_ns),
                    newest_point_ns: points.last().map(|p| p.timestamp_ns),
                    history_bytes,
                    floor_holds_space,
                    records: st.records.load(Ordering::Relaxed),
                    bytes: st.bytes.load(Ordering::Relaxed),
                    sessions: st.sessions.load(Ordering::Relaxed),
                };
                last.insert((host, group), sample.clone());
                Some(sample)
            })
            .collect();
        out.sort_by(|a, b| (&a.host, &a.group).cmp(&(&b.host, &b.group)));
        out
    }

    fn stats(&self, host: &Name, group: &Name) -> Arc<GroupStats> {
        lock(&self.stats)
            .entry((host.clone(), group.clone()))
            .or_default()
            .clone()
    }
}

/// Runs the receiver until `stop` turns true; `ready` gets the bound
/// address once connections are accepted, and the metrics endpoint's if
/// `metrics_listen` was given and could be bound (metrics are an
/// observer: a taken port is a warning, not a reason to stop). Must run
/// inside a multi-threaded Tokio runtime.
pub async fn run(
    cfg: ReceiverConfig,
    metrics_listen: Option<SocketAddr>,
    stop: watch::Receiver<bool>,
    ready: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<(), ReceiverFatal> {
    let reports = crate::shipper_reports::ShipperReports::new(&cfg.data_dir);
    run_with_reports(cfg, metrics_listen, stop, reports, ready).await
}

/// [`run`], keeping the shippers' status reports in `reports` (which the
/// web console, in the same process, reads).
pub async fn run_with_reports(
    cfg: ReceiverConfig,
    metrics_listen: Option<SocketAddr>,
    mut stop: watch::Receiver<bool>,
    reports: Arc<crate::shipper_reports::ShipperReports>,
    ready: impl FnOnce(SocketAddr, Option<SocketAddr>),
) -> Result<(), ReceiverFatal> {
    tidemark_changelog::create_private_dir_all(&cfg.data_dir).map_err(|e| {
        ReceiverFatal::Setup(format!("data directory {}: {e}", cfg.data_dir.display()))
    })?;
    // One receiver per data directory (DESIGN invariant 9), before it
    // binds or opens a group: the groups' own locks are only taken when a
    // session opens one, too late to keep a second receiver from serving.
    let _lock = tidemark_changelog::DirLock::acquire(&cfg.data_dir, LOCK_FILE, "receiver")
        .map_err(|e| ReceiverFatal::Setup(e.to_string()))?;
    let mut server_cfg = tidemark_net::server_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)
        .map_err(|e| ReceiverFatal::Setup(format!("TLS: {e}")))?;
    server_cfg.transport_config(Arc::new(tidemark_net::transport_config_with(
        cfg.liveness.keep_alive.get(),
        cfg.liveness.peer_timeout.get(),
    )));
    let (endpoint, _buffers) = tidemark_net::server_endpoint(cfg.listen, server_cfg)
        .map_err(|e| ReceiverFatal::Setup(format!("listening on {}: {e}", cfg.listen)))?;
    let addr = endpoint
        .local_addr()
        .map_err(|e| ReceiverFatal::Setup(format!("listening on {}: {e}", cfg.listen)))?;
    let groups: Groups = Arc::new(Mutex::new(HashMap::new()));
    let engine: Arc<dyn StoreEngine> = crate::store::open_engine(&cfg, "receiver")
        .map_err(|e| ReceiverFatal::Setup(format!("store: {}", error_chain(&e))))?
        .into();
    // With a store shared between receivers, each span is coordinated by
    // the holder of its lease (taken when a member's session arrives).
    let spans = crate::coordinate::Spans::start(
        &cfg.spans,
        &cfg.data_dir,
        groups.clone(),
        cfg.retention.window.get(),
        stop.clone(),
        engine.lease_stats().is_some(),
    )
    .map_err(|e| ReceiverFatal::Setup(format!("span: {e}")))?;
    let server = Arc::new(Server {
        engine,
        data_dir: cfg.data_dir.clone(),
        retention: Retention {
            window: cfg.retention.window.get(),
            max_points: cfg.retention.max_points,
            max_space: cfg.retention.max_space.map(|b| b.as_u64()),
            ..Retention::default()
        },
        revoked: cfg
            .hosts
            .iter()
            .filter(|h| h.revoked)
            .map(|h| h.name.clone())
            .collect(),
        groups,
        stats: Mutex::new(HashMap::new()),
        peer_timeouts: Mutex::new(std::collections::BTreeMap::new()),
        peer_timeout: cfg.liveness.peer_timeout.get(),
        spans,
        renewal: tidemark_net::renew::RenewalSigner {
            ca: cfg.tls.ca.clone(),
            ca_key: cfg.tls.ca_key.clone(),
            days: tidemark_net::pki::DEFAULT_HOST_VALIDITY_DAYS,
        },
        health: Mutex::new(StoreHealth::default()),
        last_samples: Mutex::new(HashMap::new()),
        reports,
    });
    let metrics = match metrics_listen {
        Some(maddr) => {
            let srv = server.clone();
            let render: tidemark_metrics::Render = Arc::new(move || {
                let samples = srv.samples();
                let mut e = collect_metrics(
                    &samples,
                    &srv.spans.samples(),
                    &srv.peer_timeout_counts(),
                    tidemark_changelog::now_ns(),
                );
                if let Some(leases) = srv.engine.lease_stats() {
                    lease_metrics(&mut e, &leases);
                }
                health_metrics(&mut e, &lock(&srv.health), &samples);
                srv.reports.metrics(&mut e);
                e
            });
            match MetricsServer::bind(maddr, render).await {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(addr = %maddr, error = %e, "cannot serve metrics; running without them");
                    None
                }
            }
        }
        None => None,
    };
    // The replicas of retired hosts go from the receiver's own store.
    crate::retire::start_purging(server.engine.clone(), cfg.data_dir.clone(), stop.clone());
    if let Some(after) = cfg
        .store
        .ceph()
        .filter(|_| server.engine.lease_stats().is_some())
        .map(|c| c.release_idle)
    {
        tokio::spawn(release_idle_groups(server.clone(), after, stop.clone()));
    }
    // Nothing is degraded yet: a file left from before would say
    // otherwise. (Without one, none is written until a group degrades: a
    // local store's data directory holds only what it needs.)
    if server
        .data_dir
        .join(crate::store_health::HEALTH_FILE)
        .exists()
    {
        server.write_health();
    }
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "receiver listening");
    ready(addr, metrics.as_ref().map(MetricsServer::local_addr));
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let server = server.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => server.serve(conn).await,
                        Err(e) => tracing::info!(error = %e, "handshake failed"),
                    }
                });
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    break;
                }
            }
        }
    }
    endpoint.close(0u32.into(), b"receiver stopping");
    endpoint.wait_idle().await;
    // A clean stop hands the groups over at once (with leases: unlocked,
    // so another receiver need not wait for them to expire), once no
    // session can commit any more.
    let open: Vec<_> = lock(&server.groups).drain().collect();
    drop(open);
    tokio::task::block_in_place(|| server.engine.release_all());
    tracing::info!("receiver stopped");
    Ok(())
}

/// Lets go of the groups that have had no shipper session for `after`
/// (with leases: unlocked), so that a shipper that connects to another
/// receiver is applied there at once; looks every few seconds until
/// `stop`.
async fn release_idle_groups(
    server: Arc<Server>,
    after: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(
        (after / 4).clamp(Duration::from_millis(250), Duration::from_secs(5)),
    );
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = stop.changed() => {
                if *stop.borrow() {
                    return;
                }
            }
        }
        let idle: Vec<GroupKey> = {
            // Never waits on the runtime: the groups' lock may be held by
            // an open waiting for the cluster (then the next round looks).
            let open: Vec<GroupKey> = match server.groups.try_lock() {
                Ok(groups) => groups.keys().cloned().collect(),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    p.into_inner().keys().cloned().collect()
                }
                Err(std::sync::TryLockError::WouldBlock) => continue,
            };
            let stats = lock(&server.stats);
            open.into_iter()
                .filter(|key| {
                    stats.get(key).is_some_and(|st| {
                        let since = lock(&st.idle_since);
                        st.sessions.load(Ordering::Relaxed) == 0
                            && since.is_some_and(|t| t.elapsed() >= after)
                    })
                })
                .collect()
        };
        for (host, group) in idle {
            // Closing a store blocks (and the groups' lock may be held by
            // an open waiting for the cluster): on a blocking thread.
            let srv = server.clone();
            let (h, g) = (host.clone(), group.clone());
            let released = tokio::task::spawn_blocking(move || {
                // Not while the store does not answer (see
                // `StoreEngine::answers`): the next round tries again.
                if srv.engine.answers(&h, &g).is_err() {
                    return false;
                }
                let released = {
                    let stats = srv.stats(&h, &g);
                    let _idle = lock(&stats.idle_since);
                    // A session that started meanwhile keeps it.
                    (stats.sessions.load(Ordering::Relaxed) == 0)
                        .then(|| lock(&srv.groups).remove(&(h.clone(), g.clone())))
                        .flatten()
                };
                let Some(replica) = released else {
                    return false;
                };
                drop(replica);
                srv.engine.release(&h, &g);
                true
            })
            .await;
            if matches!(released, Ok(true)) {
                tracing::info!(%host, %group, idle = ?after, "no shipper session for release-idle: the group's lease is let go (another receiver may take it)");
            }
        }
    }
}

/// An error and its causes, one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Most bytes of a close reason sent to a refused peer.
const MAX_CLOSE_REASON: usize = 512;

/// Close codes of refused connections.
const CLOSE_REVOKED: u32 = 1;
const CLOSE_BAD_IDENTITY: u32 = 2;

impl Server {
    async fn serve(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let host = match tidemark_net::peer_host(&conn) {
            Ok(h) => h,
            Err(e) => {
                let why = error_chain(&e);
                tracing::warn!(%remote, error = %why, "refusing a peer without a usable host identity");
                // The shipper shows the reason: say what is wrong (a close
                // reason must fit in one packet).
                let mut reason = why.into_bytes();
                reason.truncate(MAX_CLOSE_REASON);
                conn.close(CLOSE_BAD_IDENTITY.into(), &reason);
                return;
            }
        };
        if self.revoked.contains(&host) {
            tracing::warn!(%remote, %host, "refusing a revoked host");
            conn.close(CLOSE_REVOKED.into(), b"host revoked");
            return;
        }
        if let Some(why) = crate::retire::refusal(&self.data_dir, &host) {
            tracing::warn!(%remote, %host, reason = %why, "refusing a retired host");
            conn.close(CLOSE_REVOKED.into(), why.as_bytes());
            return;
        }
        tracing::info!(%remote, %host, "host connected");
        crate::renew::record_certificate(&self.data_dir, &host, &conn);
        // Streams run side by side: a certificate renewal beside the
        // session.
        let mut streams = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = conn.accept_bi() => a,
                Some(_) = streams.join_next(), if !streams.is_empty() => continue,
            };
            let (send, recv) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    if !self.noticed_silence(&host, &conn) {
                        tracing::info!(%host, reason = %e, "connection ended");
                    }
                    while streams.join_next().await.is_some() {}
                    return;
                }
            };
            let (server, host, conn) = (self.clone(), host.clone(), conn.clone());
            streams.spawn(async move {
                if let Err(e) = server.session(&host, &conn, send, recv).await {
                    // A silent shipper is told once, where the connection ends.
                    if !matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut)) {
                        tracing::warn!(%host, error = %error_chain(&e), "session ended");
                    }
                }
            });
        }
    }

    /// Reads the status reports the shipper of a session of `version` 7
    /// or later sends on streams of their own, until the returned guard
    /// is dropped (the session ended).
    fn read_reports(
        &self,
        host: &Name,
        group: &Name,
        conn: &quinn::Connection,
        version: u16,
    ) -> Option<ReportsGuard> {
        if version < MessageType::StatusReport.since() {
            return None;
        }
        let key: GroupKey = (host.clone(), group.clone());
        let (reports, conn) = (self.reports.clone(), conn.clone());
        let (host, group) = key.clone();
        let task = tokio::spawn(async move {
            while let Ok(recv) = conn.accept_uni().await {
                let read =
                    crate::shipper_reports::read_reports(&reports, &host, &group, version, recv);
                if let Err(e) = read.await {
                    tracing::warn!(%host, %group, error = %error_chain(&e), "status reports dropped");
                }
            }
        });
        Some(ReportsGuard {
            task,
            reports: self.reports.clone(),
            key,
        })
    }

    /// Whether `conn` ended because the shipper fell silent for the peer
    /// timeout; if so it is counted and said once, in words an admin acts
    /// on.
    fn noticed_silence(&self, host: &Name, conn: &quinn::Connection) -> bool {
        if !matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut)) {
            return false;
        }
        *lock(&self.peer_timeouts).entry(host.clone()).or_default() += 1;
        tracing::warn!(
            %host,
            peer_timeout = ?self.peer_timeout,
            "the shipper stopped answering (killed, frozen or unreachable); its connection is closed, it reconnects when it is back"
        );
        true
    }

    /// [`Server::peer_timeouts`] as metric samples.
    fn peer_timeout_counts(&self) -> Vec<(String, u64)> {
        lock(&self.peer_timeouts)
            .iter()
            .map(|(host, n)| (host.to_string(), *n))
            .collect()
    }

    /// Opens (or finds open) the store of a host's group.
    fn group(&self, host: &Name, group: &Name) -> Result<Arc<Mutex<StoreReplica>>, GroupRefused> {
        let key = (host.clone(), group.clone());
        let mut groups = lock(&self.groups);
        // A span's member is applied where its span is coordinated.
        match self.spans.ensure_held(host, group, &*self.engine) {
            Ok(()) => {}
            Err(crate::coordinate::NotHeld::Elsewhere(owner)) => {
                if groups.remove(&key).is_some() {
                    tracing::info!(%host, %group, "the group's span is coordinated by another receiver: the group is let go");
                    self.engine.release(host, group);
                }
                return Err(GroupRefused::OwnedElsewhere(owner));
            }
            Err(crate::coordinate::NotHeld::Failed(why)) => {
                return Err(GroupRefused::Refused {
                    class: ErrorClass::Transient,
                    code: ErrorCode::Busy,
                    message: format!("the span of {host}/{group} cannot be taken here: {why}"),
                })
            }
        }
        if let Some(g) = groups.get(&key) {
            let poisoned = match g.try_lock() {
                Ok(r) => r.is_poisoned(),
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().is_poisoned(),
                // Busy (a commit of an ended session finishing): the new
                // session waits for it; if that poisons the store, its hello
                // is refused and the next session reopens it.
                Err(std::sync::TryLockError::WouldBlock) => false,
            };
            if !poisoned {
                return Ok(g.clone());
            }
            // Not while the store does not answer: closing the old store
            // now would leave state behind that blocks the reopen (see
            // `StoreEngine::answers`). The shipper retries.
            if let Err(e) = self.engine.answers(host, group) {
                let why = error_chain(&e);
                if crate::store_health::cluster_unanswered(&e) {
                    self.store_unanswered(host, group, &why);
                }
                return Err(GroupRefused::Refused {
                    class: ErrorClass::Transient,
                    code: ErrorCode::Busy,
                    message: format!(
                        "the store of {host}/{group} does not answer; it is reopened once it does: {why}"
                    ),
                });
            }
            // Dropped (closed) before reopening, so that its lock file or
            // its images' exclusive locks are let go first; whoever else
            // still holds it (an ended session's last commit, a metrics
            // scrape) lets it go in a moment.
            let old = groups.remove(&key).expect("looked up under the same lock");
            let deadline = Instant::now() + PREVIOUS_STORE_WAIT;
            while Arc::strong_count(&old) > 1 {
                if Instant::now() >= deadline {
                    groups.insert(key, old);
                    return Err(GroupRefused::Refused {
                        class: ErrorClass::Transient,
                        code: ErrorCode::Busy,
                        message: format!(
                            "the previous session of {host}/{group} is still ending; retry"
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            drop(old);
        }
        let opened = self.engine.open(host, group).map_err(|e| {
            if crate::store_health::cluster_unanswered(&e) {
                self.store_unanswered(host, group, &error_chain(&e));
            }
            if let crate::store::StoreError::OwnedElsewhere { owner, .. } = e {
                return GroupRefused::OwnedElsewhere(owner);
            }
            let (class, code) = crate::replica::classify(&e);
            GroupRefused::Refused {
                class,
                code,
                message: format!("opening the replica of {host}/{group}: {}", error_chain(&e)),
            }
        })?;
        self.store_answered(host, group);
        let mut opened = opened;
        opened.set_retention(self.retention);
        if !self.spans.is_member(host, group) && opened.floor().is_some() {
            // A span floor left from a span (or membership) no longer
            // configured would keep this group's history forever.
            tracing::info!(%host, %group, "no span names this group any more: its span floor is removed");
            if let Err(e) = opened.set_floor(None) {
                tracing::warn!(%host, %group, error = %e, "cannot remove the group's old span floor");
            }
        }
        let g = Arc::new(Mutex::new(
            StoreReplica::new(opened).with_vm_specs(&group_dir(&self.data_dir, host, group)),
        ));
        groups.insert(key, g.clone());
        Ok(g)
    }

    async fn session(
        &self,
        host: &Name,
        conn: &quinn::Connection,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), SessionEnded> {
        let mut decoder = MessageDecoder::new();
        // The Hello.
        let hello = loop {
            match decoder.next_message() {
                Ok(Some(m)) => break m,
                Ok(None) => {}
                Err(e) => {
                    // Version 1, which every shipper reads: the hello
                    // (and so the shipper's version) is not known yet.
                    let err = ReceiverError::from_decode(&e, 1);
                    return refuse(&mut send, err).await;
                }
            }
            tokio::time::timeout(Duration::from_secs(30), recv.read_some(&mut decoder))
                .await
                .map_err(|_| SessionEnded::NoHello)?
                .map_err(SessionEnded::Read)?
                .ok_or(SessionEnded::EndedBeforeHello)?;
        };
        // The Hello's names decoded as names: none of them can leave the
        // host's directory.
        let group_name = match &hello.message {
            Message::Hello { group, .. } => group.clone(),
            // A stream of its own, not a session.
            Message::RenewRequest { csr } => {
                return crate::renew::answer(&self.renewal, host, hello.version, csr, &mut send)
                    .await
                    .map_err(SessionEnded::Write);
            }
            Message::Error {
                class,
                code,
                message,
            } => {
                let err = ReceiverError::Peer {
                    class: *class,
                    code: *code,
                    message: message.clone(),
                };
                return refuse(&mut send, err).await;
            }
            other => {
                let err = ReceiverError::Refused {
                    class: ErrorClass::Transient,
                    code: ErrorCode::Protocol,
                    message: format!("expected hello, got {}", other.msg_type().name()),
                    // As the session would answer: in a version the
                    // shipper reads.
                    version: hello.version.min(tidemark_wire::PROTOCOL_VERSION),
                };
                return refuse(&mut send, err).await;
            }
        };
        // The store's calls block (an open waits for the cluster): on a
        // blocking thread, never on the runtime's workers.
        let replica = match tokio::task::block_in_place(|| self.group(host, &group_name)) {
            Ok(r) => {
                // Idle from now unless a session runs (release-idle); not
                // under the groups' lock, which the release takes after it.
                let stats = self.stats(host, &group_name);
                let mut idle = lock(&stats.idle_since);
                if stats.sessions.load(Ordering::Relaxed) == 0 {
                    *idle = Some(Instant::now());
                }
                r
            }
            Err(GroupRefused::Refused {
                class,
                code,
                message,
            }) => {
                let err = ReceiverError::Refused {
                    class,
                    code,
                    message,
                    // As the session would answer: in a version the
                    // shipper reads.
                    version: hello.version.min(tidemark_wire::PROTOCOL_VERSION),
                };
                return refuse(&mut send, err).await;
            }
            Err(GroupRefused::OwnedElsewhere(owner)) => {
                // Another receiver sharing the store applies the group:
                // send the shipper there (or, not knowing where, retry).
                let session = ExpectHello::new(SessionConfig::new(host));
                let answer = match owner {
                    Some(to) => session.redirect(hello, &to).map(|frame| (frame, to)),
                    None => Err(ReceiverError::Refused {
                        class: ErrorClass::Transient,
                        code: ErrorCode::Busy,
                        message: "another receiver is taking this group over".into(),
                        version: hello.version.min(tidemark_wire::PROTOCOL_VERSION),
                    }),
                };
                let (frame, to) = match answer {
                    Ok(x) => x,
                    Err(e) => return refuse(&mut send, e).await,
                };
                let _ = send.write_all(&frame).await;
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
                return Err(SessionEnded::Redirected { to });
            }
        };
        let session = ExpectHello::new(SessionConfig::new(host));
        let started =
            tokio::task::block_in_place(|| session.handle_message(hello, &mut *lock(&replica)));
        let (mut receiving, welcome) = match started {
            Ok(x) => x,
            Err(e) => return refuse(&mut send, e).await,
        };
        send.write_all(&welcome)
            .await
            .map_err(SessionEnded::Write)?;
        tracing::info!(
            %host,
            group = %group_name,
            protocol = receiving.version(),
            shipper = receiving.shipper_software(),
            "session started"
        );
        // A span's member: its coordinator holds through this connection.
        let _span = self
            .spans
            .attach(host, &group_name, conn, receiving.version());
        let stats = self.stats(host, &group_name);
        {
            let _idle = lock(&stats.idle_since);
            stats.sessions.fetch_add(1, Ordering::Relaxed);
        }
        let _connected = SessionGuard(stats.clone());
        let _reports = self.read_reports(host, &group_name, conn, receiving.version());
        let dir = group_dir(&self.data_dir, host, &group_name);
        // Where a planned failover's drain request is left (the cluster
        // with the Ceph store: by the CLI of any node).
        let drain = drain::channel(self.engine.as_ref(), &dir, host, &group_name);
        // The drain request passed on to this connection's shipper.
        let mut drain_sent = None;
        let mut drain_poll = tokio::time::interval(DRAIN_POLL);
        // Bytes read since the last idle commit.
        let mut gathered = 0usize;
        // The shipper ended the stream (seen while a commit ran): what is
        // buffered is applied and committed, then the session ends.
        let mut eof = false;
        drain_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Apply every complete message, then commit and acknowledge
            // once nothing more is buffered.
            loop {
                let msg = match decoder.next_message() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        let err = ReceiverError::from_decode(&e, receiving.version());
                        return refuse(&mut send, err).await;
                    }
                };
                let counted = match &msg.message {
                    Message::Records(batch) => Some((batch.len() as u64, batch.byte_len() as u64)),
                    _ => None,
                };
                let out = if matches!(msg.message, Message::Chunk { .. }) {
                    // A chunk may fill a commit: its syncs run while the
                    // stream goes on being read.
                    let (back, out, read) = apply_while_reading(
                        receiving,
                        &replica,
                        move |s, r| s.handle_message(msg, r),
                        (&mut recv, &mut decoder),
                        eof,
                    )
                    .await?;
                    receiving = back;
                    eof |= read.ended;
                    gathered += read.bytes;
                    out
                } else {
                    tokio::task::block_in_place(|| {
                        receiving.handle_message(msg, &mut *lock(&replica))
                    })
                };
                match out {
                    Ok(frames) => {
                        if let Some((records, bytes)) = counted {
                            stats.records.fetch_add(records, Ordering::Relaxed);
                            stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                        }
                        for f in frames {
                            send.write_all(&f).await.map_err(SessionEnded::Write)?;
                        }
                    }
                    Err(e) => {
                        self.note_unanswered(host, &group_name, &replica);
                        return refuse(&mut send, e).await;
                    }
                }
                if let Some(outcome) = receiving.take_drained() {
                    report_drained(drain.as_ref(), host, &group_name, outcome);
                }
                match receiving.take_vm_spec() {
                    Some(Ok(from)) => {
                        tracing::info!(%host, group = %group_name, from_seq = from.get(), "VM spec kept")
                    }
                    Some(Err(why)) => {
                        tracing::warn!(%host, group = %group_name, reason = %why, "VM spec refused")
                    }
                    None => {}
                }
            }
            // Group commit: what arrived while the last commit ran (or
            // while these messages were applied) is applied first, so one
            // commit covers all of it. A zero timeout polls the read once
            // and gives up at once when nothing is there (the read is
            // cancel-safe: nothing is lost when it is dropped).
            let mut ended = eof;
            let polled = if eof {
                None
            } else {
                tokio::time::timeout(Duration::ZERO, recv.read_some(&mut decoder))
                    .await
                    .ok()
            };
            if let Some(read) = polled {
                match read {
                    Ok(Some(n)) => {
                        gathered += n;
                        if gathered < GROUP_COMMIT_MAX {
                            continue;
                        }
                    }
                    Ok(None) => ended = true,
                    Err(e) => return Err(SessionEnded::Read(e)),
                }
            }
            gathered = 0;
            // Idle means nothing buffered at all: a part of a message
            // means the rest is on its way, and committing before it would
            // sync once per frame (an initial sync's 1 MiB chunks arrive in
            // several reads each). The session's own limits commit a long
            // stream that never pauses between messages.
            let mut read_meanwhile = false;
            if decoder.buffered() == 0 || ended {
                // The commit's syncs run while the stream goes on being
                // read: the shipper keeps sending meanwhile.
                let (back, idle, read) = apply_while_reading(
                    receiving,
                    &replica,
                    |s, r| s.handle_idle(r),
                    (&mut recv, &mut decoder),
                    ended,
                )
                .await?;
                receiving = back;
                eof |= read.ended;
                read_meanwhile = read.bytes > 0;
                match idle {
                    Ok(frames) => {
                        self.store_answered(host, &group_name);
                        for f in frames {
                            send.write_all(&f).await.map_err(SessionEnded::Write)?;
                        }
                    }
                    Err(e) => {
                        self.note_unanswered(host, &group_name, &replica);
                        return refuse(&mut send, e).await;
                    }
                }
            }
            if ended {
                return Ok(());
            }
            if eof || read_meanwhile {
                // What came while the commit ran is applied first.
                continue;
            }
            tokio::select! {
                read = recv.read_some(&mut decoder) => match read {
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(()),
                    Err(e) => return Err(SessionEnded::Read(e)),
                },
                // Look for a drain request now and then, not at every read.
                _ = drain_poll.tick() => match tokio::task::block_in_place(|| drain.pending()) {
                    // The member's span moved to another receiver: so does
                    // the member (its shipper comes back and is sent there).
                    _ if !self.spans.holds_span_of(host, &group_name) => {
                        let err = ReceiverError::Peer {
                            class: ErrorClass::Transient,
                            code: ErrorCode::Busy,
                            message: format!("the span of {host}/{group_name} is coordinated by another receiver now"),
                        };
                        return refuse(&mut send, err).await;
                    }
                    // A request past its deadline: its CLI gave up (or
                    // died); nobody fails the group over.
                    Ok(Some(request)) if drain_sent != Some(request.id) && request.live(tidemark_changelog::now_ns()) => {
                        let id = request.id;
                        tracing::info!(%host, group = %group_name, id, "asking the shipper to drain the group (planned failover)");
                        match receiving.request_drain(id) {
                            Ok(f) => send.write_all(&f).await.map_err(SessionEnded::Write)?,
                            Err(e) => return refuse(&mut send, e).await,
                        }
                        drain_sent = Some(id);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(at = %drain.describe(), error = %error_chain(&e), "cannot read the drain request")
                    }
                },
            }
        }
    }
}

/// The shipper's stream as [`read_while`] reads it (a test's
/// stream in the unit tests).
trait ReadSome {
    /// Feeds `decoder` what has arrived: the bytes fed, `None` when the
    /// stream ended. Cancel-safe: nothing is lost when the future is
    /// dropped.
    async fn read_some(
        &mut self,
        decoder: &mut MessageDecoder,
    ) -> Result<Option<usize>, quinn::ReadError>;
}

impl ReadSome for quinn::RecvStream {
    /// Straight from quinn's buffer (no copy into a read buffer first);
    /// cancel-safe, as `read_chunk` is: nothing is awaited once bytes are
    /// taken.
    async fn read_some(
        &mut self,
        decoder: &mut MessageDecoder,
    ) -> Result<Option<usize>, quinn::ReadError> {
        let chunk = self.read_chunk(READ_MAX, true).await?;
        Ok(chunk.map(|c| {
            decoder.feed(&c.bytes);
            c.bytes.len()
        }))
    }
}

/// The most one read takes from the stream.
const READ_MAX: usize = 1 << 20;

/// What [`read_while`] read while the work ran.
struct ReadMeanwhile {
    /// Bytes fed to the decoder.
    bytes: usize,
    /// The shipper ended the stream.
    ended: bool,
}

/// Runs `work` on the session and its replica (applying a message,
/// committing: the store's syncs) on a blocking thread; see
/// [`read_while`]. Returns the session, the work's result and what was
/// read meanwhile.
async fn apply_while_reading<T: Send + 'static>(
    mut session: Receiving,
    replica: &Arc<Mutex<StoreReplica>>,
    work: impl FnOnce(&mut Receiving, &mut StoreReplica) -> T + Send + 'static,
    input: (&mut quinn::RecvStream, &mut MessageDecoder),
    ended: bool,
) -> Result<(Receiving, T, ReadMeanwhile), SessionEnded> {
    let replica = Arc::clone(replica);
    let work = move || {
        let out = work(&mut session, &mut lock(&replica));
        (session, out)
    };
    let ((session, out), read) = read_while(work, input.0, input.1, ended).await?;
    Ok((session, out, read))
}

/// Runs `work` on a blocking thread and, while it runs, reads what the
/// shipper sends into `decoder`, up to [`READ_WHILE_APPLYING_MAX`] bytes.
/// A commit's fdatasync then no longer stops the stream: QUIC's
/// flow-control window stays open and the shipper goes on sending while
/// the receiver syncs. Nothing read is applied before the work is done,
/// and an Ack is still only what the work's commit made durable.
async fn read_while<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
    recv: &mut impl ReadSome,
    decoder: &mut MessageDecoder,
    ended: bool,
) -> Result<(T, ReadMeanwhile), SessionEnded> {
    let mut work = tokio::task::spawn_blocking(work);
    let mut read = ReadMeanwhile { bytes: 0, ended };
    loop {
        let reading = !read.ended && read.bytes < READ_WHILE_APPLYING_MAX;
        tokio::select! {
            done = &mut work => {
                return Ok((done.map_err(SessionEnded::Apply)?, read));
            }
            // Cancel-safe: nothing is lost when the work ends first.
            r = recv.read_some(decoder), if reading => match r {
                Ok(Some(n)) => read.bytes += n,
                Ok(None) => read.ended = true,
                Err(e) => return Err(SessionEnded::Read(e)),
            },
        }
    }
}

/// Bytes read while a commit runs, at most: the shipper's in-flight
/// window (64 MiB by default) bounds what it sends before the Ack anyway.
const READ_WHILE_APPLYING_MAX: usize = 64 << 20;

/// Bytes read into one group commit at most: a steady stream is still
/// committed and acknowledged every so often, and the loop still looks for
/// drain requests (the session's own bound on uncommitted records, 16 MiB
/// by default, commits within a group too).
const GROUP_COMMIT_MAX: usize = 16 << 20;

/// How often a connected group's directory is checked for a drain request.
const DRAIN_POLL: Duration = Duration::from_millis(500);

/// Writes the shipper's answer to a drain request for the CLI waiting on
/// it, and retires the request.
fn report_drained(
    drain: &dyn drain::DrainChannel,
    host: &str,
    group: &str,
    outcome: tidemark_wire::DrainOutcome,
) {
    match &outcome.result {
        Ok(seq) => {
            tracing::info!(%host, %group, id = outcome.id, last_seq = seq.get(), "group drained: the source is stopped and every record is durable")
        }
        Err(why) => {
            tracing::warn!(%host, %group, id = outcome.id, reason = %why, "the group could not be drained")
        }
    }
    let result = drain::DrainResult {
        id: outcome.id,
        result: outcome.result.map(tidemark_changelog::Seq::get),
    };
    if let Err(e) = tokio::task::block_in_place(|| drain.answer(&result)) {
        tracing::warn!(at = %drain.describe(), error = %error_chain(&e), "cannot write the drain result");
    }
}

/// Why a session with a shipper ended before its stream did.
#[derive(Debug, thiserror::Error)]
enum SessionEnded {
    /// The shipper sent no hello within 30 s of opening the stream.
    #[error("no hello within 30 s")]
    NoHello,
    /// The shipper closed the stream before its hello.
    #[error("the stream ended before the hello")]
    EndedBeforeHello,
    /// The stream could not be read (the network or the peer).
    #[error("reading from the shipper")]
    Read(#[source] quinn::ReadError),
    /// The stream could not be written (the network or the peer).
    #[error("writing to the shipper")]
    Write(#[source] quinn::WriteError),
    /// This receiver refused the session, and told the shipper why.
    #[error(transparent)]
    Refused(ReceiverError),
    /// The thread applying a message or committing failed (panicked).
    #[error("applying on a blocking thread")]
    Apply(#[source] tokio::task::JoinError),
    /// Another receiver sharing the replica store owns the group: the
    /// shipper was sent there.
    #[error("redirected the shipper to the receiver at {to}, which owns the group")]
    Redirected {
        /// That receiver's address.
        to: String,
    },
}

/// Why a session's group could not be opened here.
enum GroupRefused {
    /// Another receiver sharing the replica store owns it (at this
    /// address, if it recorded one).
    OwnedElsewhere(Option<String>),
    /// Refused: the shipper is told this (a refusal, not the shipper's
    /// own error: that one is never sent back).
    Refused {
        /// Whether the shipper should retry.
        class: ErrorClass,
        /// What went wrong.
        code: ErrorCode,
        /// Why, with the whole chain of causes.
        message: String,
    },
}

/// How long a reopen waits for the previous store of the group to be let go
/// by whoever still holds it before refusing the session (the shipper
/// retries).
const PREVIOUS_STORE_WAIT: Duration = Duration::from_secs(5);

/// Sends the error to the shipper (in a protocol version it reads) and
/// ends the session.
async fn refuse(send: &mut quinn::SendStream, err: ReceiverError) -> Result<(), SessionEnded> {
    if let Some(frame) = err.to_frame() {
        let _ = send.write_all(&frame).await;
    }
    let _ = send.finish();
    // Give the frame a moment to leave before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Err(SessionEnded::Refused(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a store shared between receivers, the leases' counters.
    #[test]
    fn metrics_show_the_group_leases() {
        let mut e = collect_metrics(&[], &[], &[], 0);
        let stats = crate::lease_task::LeaseStats {
            owned: 3,
            takeovers: 2,
            owned_elsewhere: 5,
            lost: 1,
            fenced: 0,
        };
        lease_metrics(&mut e, &stats);
        let t = e.render(tidemark_metrics::Format::OpenMetrics);
        for line in [
            "tidemark_receiver_groups_owned 3.0",
            "tidemark_receiver_takeovers_total 2",
            "tidemark_receiver_redirects_total 5",
            "tidemark_receiver_leases_lost_total 1",
            "tidemark_receiver_fenced_total 0",
        ] {
            assert!(t.lines().any(|l| l == line), "{line} missing in\n{t}");
        }
    }

    #[test]
    fn metrics_show_each_group_with_its_state_and_barrier_age() {
        let samples = [GroupSample {
            host: "db1".into(),
            group: "g".into(),
            durable_seq: 42,
            state: "consistent",
            last_barrier_ns: Some(1_000_000_000),
            points: 3,
            oldest_point_ns: Some(500_000_000),
            newest_point_ns: Some(1_000_000_000),
            history_bytes: 8192,
            floor_holds_space: true,
            records: 40,
            bytes: 4096,
            sessions: 1,
        }];
        let t = collect_metrics(&samples, &[], &[("db1".into(), 2)], 4_000_000_000)
            .render(tidemark_metrics::Format::OpenMetrics);
        for want in [
            "tidemark_receiver_durable_sequence{host=\"db1\",group=\"g\"} 42.0\n",
            "tidemark_receiver_applied_records_total{host=\"db1\",group=\"g\"} 40\n",
            "tidemark_receiver_applied_bytes_total{host=\"db1\",group=\"g\"} 4096\n",
            "tidemark_receiver_last_barrier_age_seconds{host=\"db1\",group=\"g\"} 3.0\n",
            "tidemark_receiver_recovery_points{host=\"db1\",group=\"g\"} 3.0\n",
            "tidemark_receiver_oldest_point_age_seconds{host=\"db1\",group=\"g\"} 3.5\n",
            "tidemark_receiver_newest_point_age_seconds{host=\"db1\",group=\"g\"} 3.0\n",
            "tidemark_receiver_history_bytes{host=\"db1\",group=\"g\"} 8192.0\n",
            "tidemark_receiver_group_state{host=\"db1\",group=\"g\",state=\"consistent\"} 1.0\n",
            "tidemark_receiver_group_state{host=\"db1\",group=\"g\",state=\"resyncing\"} 0.0\n",
            "tidemark_receiver_sessions{host=\"db1\",group=\"g\"} 1.0\n",
            "tidemark_receiver_span_floor_holds_space{host=\"db1\",group=\"g\"} 1.0\n",
            "tidemark_receiver_peer_timeouts_total{host=\"db1\"} 2\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
        // No barrier yet: no age rather than a made-up one.
        let none = [GroupSample {
            last_barrier_ns: None,
            ..samples[0].clone()
        }];
        let t = collect_metrics(&none, &[], &[], 4_000_000_000)
            .render(tidemark_metrics::Format::OpenMetrics);
        assert!(!t.contains("last_barrier_age_seconds{"), "{t}");
    }

    #[test]
    fn metrics_show_each_span_with_its_members_and_how_long_it_has_had_no_point() {
        let spans = [
            SpanSample {
                name: "shop".into(),
                members: 3,
                connected: 2,
                target: Duration::from_secs(60),
                last_point_ns: Some(1_000_000_000),
                started_ns: 500_000_000,
                durable: 7,
                aborted: 2,
                not_started: 1,
            },
            SpanSample {
                name: "new".into(),
                members: 2,
                started_ns: 2_500_000_000,
                ..SpanSample::default()
            },
        ];
        let t = collect_metrics(&[], &spans, &[], 4_000_000_000)
            .render(tidemark_metrics::Format::OpenMetrics);
        for want in [
            "tidemark_span_members{span=\"shop\"} 3.0\n",
            "tidemark_span_members_connected{span=\"shop\"} 2.0\n",
            "tidemark_span_target_seconds{span=\"shop\"} 60.0\n",
            "tidemark_span_without_point_seconds{span=\"shop\"} 3.0\n",
            "tidemark_span_rounds_total{span=\"shop\",outcome=\"span-point\"} 7\n",
            "tidemark_span_rounds_total{span=\"shop\",outcome=\"aborted\"} 2\n",
            "tidemark_span_rounds_total{span=\"shop\",outcome=\"not-started\"} 1\n",
            // No point yet: the time since the receiver started.
            "tidemark_span_without_point_seconds{span=\"new\"} 1.5\n",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }

    /// A stream whose bytes come from a channel; it notes each read.
    struct Fed {
        rx: tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
        delivered: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl ReadSome for Fed {
        async fn read_some(
            &mut self,
            decoder: &mut MessageDecoder,
        ) -> Result<Option<usize>, quinn::ReadError> {
            let Some(bytes) = self.rx.recv().await else {
                return Ok(None);
            };
            decoder.feed(&bytes);
            self.delivered.fetch_add(bytes.len(), Ordering::SeqCst);
            Ok(Some(bytes.len()))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stream_is_read_while_a_commit_runs_and_only_buffered() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let delivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut stream = Fed {
            rx,
            delivered: delivered.clone(),
        };
        let frame = Message::DrainRequest { id: 7 }
            .encode(1, tidemark_wire::Compression::None)
            .unwrap();
        tx.send(frame[..5].to_vec()).unwrap();
        tx.send(frame[5..].to_vec()).unwrap();
        let mut decoder = MessageDecoder::new();
        // The work (a commit's syncs) ends only once the stream was read
        // while it ran, or gives up after 10 s.
        let seen = delivered.clone();
        let len = frame.len();
        let work = move || {
            let start = std::time::Instant::now();
            while seen.load(Ordering::SeqCst) < len {
                if start.elapsed() > Duration::from_secs(10) {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            true
        };
        let (overlapped, read) = read_while(work, &mut stream, &mut decoder, false)
            .await
            .unwrap();
        assert!(overlapped, "the stream was not read while the work ran");
        assert_eq!(read.bytes, len);
        assert!(!read.ended);
        // Read, not applied: the message waits in the decoder.
        assert_eq!(decoder.buffered(), len);
        assert!(matches!(
            decoder.next_message().unwrap().map(|m| m.message),
            Some(Message::DrainRequest { id: 7 })
        ));
    }
}
