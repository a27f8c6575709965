//! The shipper daemon: a thin loop around the shipper core
//! ([`tidemark_wire::shipper_core`]), which decides the order of work, the
//! resync, the timeouts (a silent receiver is taken for dead) and when the
//! group is protected. The daemon owns what the core cannot: the QUIC
//! connection, the log tail and its change notifications, the disks, the
//! bandwidth limit, the cursor and status files, and stopping the tracker
//! for a drain.
//!
//! One connection at a time, one bidirectional stream per connection. Each
//! turn of the loop sends what the core has to send (paced by the
//! bandwidth limit), acts on its events (cursor advances, drain requests,
//! how the session ended), answers what it needs read (the log's next
//! records, a disk's chunk), and else waits for the receiver, the log, a
//! stop, or the core's next timeout.
//!
//! Transient failures reconnect with jittered exponential backoff;
//! permanent ones end the daemon with the state `critical` and the reason
//! in `shipper.status`.

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_changelog::{read_sources, write_cursor, DirLock, DiskId, FsDir, LogWatcher, Seq};
use tidemark_config::{HostPort, ShipperConfig};
use tidemark_wire::shipper::{HelloInfo, ShipperConfig as SessionConfig};
use tidemark_wire::shipper_core::{CoreConfig, CoreEvent, Need, Phase, ShipperCore};
use tidemark_wire::{
    ChunkData, ChunkPurpose, Compression, DecodeError, DrainRefused, ErrorClass, Facts,
    MessageDecoder, MessageType, Progress, Received, RecordId, ReportState, Reporter,
    ReporterConfig, ShipperError, Versions, VmSpecNews, VmSpecReply,
};
use tokio::sync::{mpsc, watch, Notify};

use crate::policy::{local_minute_of_day, Backoff, Bandwidth};
use crate::receivers::ReceiverChoice;
use crate::source::{ChunkContent, SourceDisk};
use crate::status::{write_status, DiskProgress, ShipperStatus, State};
use crate::tail::{first_record_from, newest_generation, LogTail, TailError};
use tidemark_metrics::{labels, Exposition, Histogram, HistogramSnapshot, MetricsServer, Unit};

/// The shipper's lock file in the log directory.
pub const LOCK_FILE: &str = "shipper.lock";

/// How often the status file is refreshed at most.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// How long a stopping shipper waits for the receiver's last Acks.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long a drain waits for the tracker to stop.
const TRACKER_STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the shipper stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum ShipperFatal {
    /// The configuration cannot work (certificates, address).
    #[error("{0}")]
    Setup(String),
    /// A permanent replication failure: the group is critical.
    #[error("replication stopped (critical): {0}")]
    Critical(#[source] SessionError),
}

/// Why a session failed. [`SessionError::class`] says whether to retry.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The protocol session failed (the receiver refused, broke the
    /// protocol, fell silent, or the log cannot resume the replica).
    #[error(transparent)]
    Session(#[from] ShipperError),
    /// The receiver refused this host's certificate.
    #[error(
        "{context}: the receiver refused this host's certificate ({source}); enroll the host \
         again (tidemark host request / tidemark receiver sign)"
    )]
    CertificateRefused {
        /// What was being done.
        context: &'static str,
        /// The connection's end.
        source: quinn::ConnectionError,
    },
    /// The TLS handshake failed on this end.
    #[error(
        "{context}: TLS handshake failed ({source}); check the receiver's CA (ca.crt) and its \
         server name"
    )]
    Handshake {
        /// What was being done.
        context: &'static str,
        /// The connection's end.
        source: quinn::ConnectionError,
    },
    /// The receiver closed the connection for this host (revoked, or no
    /// usable identity).
    #[error("{context}: the receiver refused this host: {source}")]
    HostRefused {
        /// What was being done.
        context: &'static str,
        /// The connection's end.
        source: quinn::ConnectionError,
    },
    /// The connection's idle timeout fired: the receiver sent nothing at
    /// all, not even keep-alives, for the peer timeout
    /// (`[shipper.liveness]`). Not the core's `ShipperError::PeerSilent`,
    /// a live connection whose receiver leaves frames unanswered.
    #[error(
        "{context}: the receiver stopped answering (nothing heard for the peer timeout, \
         [shipper.liveness]): it is down, frozen or unreachable"
    )]
    PeerTimedOut {
        /// What was being done.
        context: &'static str,
    },
    /// The connection was lost.
    #[error("{context}: {source}")]
    Connection {
        /// What was being done.
        context: &'static str,
        /// The connection's end.
        source: quinn::ConnectionError,
    },
    /// A receiver's name could not be resolved.
    #[error("{0}")]
    Resolve(String),
    /// A connection could not be started.
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The receiver's address.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// Sending failed (other than by a lost connection).
    #[error("sending: {0}")]
    Write(#[source] quinn::WriteError),
    /// Receiving failed (other than by a lost connection).
    #[error("receiving: {0}")]
    Read(#[source] quinn::ReadError),
    /// The receiver ended its stream.
    #[error("the receiver closed the stream")]
    StreamClosed,
    /// The receiver sent bytes that are no frame.
    #[error("bad frame from the receiver: {0}")]
    BadFrame(#[source] DecodeError),
    /// The task reading the stream is gone.
    #[error("the connection's reader ended")]
    ReaderEnded,
    /// No disks file yet.
    #[error("the tracker has not started on this log directory yet")]
    TrackerNotStarted,
    /// The disks file could not be read.
    #[error(transparent)]
    Sources(#[from] tidemark_changelog::sources::SourcesError),
    /// The log's generation could not be read.
    #[error("reading the log: {0}")]
    Generation(#[source] std::io::Error),
    /// The log could not be looked up or read.
    #[error("reading the change log: {0}")]
    Log(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The log tail could not be opened or read.
    #[error(transparent)]
    Tail(#[from] TailError),
    /// A disk the core asked for is not in the disks file.
    #[error("disk {0} is not in the disks file")]
    UnknownDisk(DiskId),
    /// A disk could not be opened or read.
    #[error("reading disk {name} ({path}) at {offset}: {source}")]
    Disk {
        /// The disk's name.
        name: tidemark_names::Name,
        /// Its path.
        path: String,
        /// Where.
        offset: u64,
        /// Why.
        source: std::io::Error,
    },
    /// The log cursor could not be written.
    #[error("writing the log cursor: {0}")]
    Cursor(#[source] tidemark_changelog::cursor::CursorError),
    /// The thread reading a disk ahead failed (panicked or was cancelled).
    #[error("reading disk {disk} at {offset} ahead: {source}")]
    ReadAhead {
        /// Disk id.
        disk: DiskId,
        /// Where.
        offset: u64,
        /// Why.
        source: tokio::task::JoinError,
    },
}

impl SessionError {
    /// Transient errors are retried with backoff; permanent ones stop
    /// replication (the group is critical).
    pub fn class(&self) -> ErrorClass {
        match self {
            SessionError::Session(e) => e.class(),
            SessionError::CertificateRefused { .. }
            | SessionError::Handshake { .. }
            | SessionError::HostRefused { .. }
            | SessionError::Log(_)
            | SessionError::Tail(_)
            | SessionError::UnknownDisk(_)
            | SessionError::Cursor(_) => ErrorClass::Permanent,
            SessionError::Connection { .. }
            | SessionError::PeerTimedOut { .. }
            | SessionError::Connect { .. }
            | SessionError::Resolve(_)
            | SessionError::Write(_)
            | SessionError::Read(_)
            | SessionError::StreamClosed
            | SessionError::BadFrame(_)
            | SessionError::ReaderEnded
            | SessionError::TrackerNotStarted
            | SessionError::Sources(_)
            | SessionError::Generation(_)
            | SessionError::Disk { .. }
            | SessionError::ReadAhead { .. } => ErrorClass::Transient,
        }
    }
}

/// How a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// A stop was requested.
    Stopped,
    /// It failed; [`SessionError::class`] says whether to retry.
    Failed(SessionError),
}

impl From<SessionError> for SessionEnd {
    fn from(e: SessionError) -> Self {
        SessionEnd::Failed(e)
    }
}

fn failed(e: impl Into<SessionError>) -> SessionEnd {
    SessionEnd::Failed(e.into())
}

/// Close codes the receiver uses for refused hosts (see the receiver
/// daemon): revoked, and no usable identity.
const CLOSE_REVOKED: u64 = 1;
const CLOSE_BAD_IDENTITY: u64 = 2;

/// Classifies a lost connection: authentication failures are permanent
/// (retrying cannot help until an admin acts), everything else transient.
fn connection_end(source: quinn::ConnectionError, context: &'static str) -> SessionError {
    use quinn::ConnectionError as C;
    let is_crypto = |code: u64| (0x100..0x200).contains(&code);
    match &source {
        C::ConnectionClosed(close) if is_crypto(u64::from(close.error_code)) => {
            SessionError::CertificateRefused { context, source }
        }
        C::TransportError(t) if is_crypto(u64::from(t.code)) => {
            SessionError::Handshake { context, source }
        }
        C::ApplicationClosed(close)
            if matches!(
                close.error_code.into_inner(),
                CLOSE_REVOKED | CLOSE_BAD_IDENTITY
            ) =>
        {
            SessionError::HostRefused { context, source }
        }
        C::TimedOut => SessionError::PeerTimedOut { context },
        _ => SessionError::Connection { context, source },
    }
}

fn write_end(e: quinn::WriteError) -> SessionError {
    match e {
        quinn::WriteError::ConnectionLost(c) => connection_end(c, "sending"),
        other => SessionError::Write(other),
    }
}

/// What a scrape of `/metrics` reads: the status as last published, and
/// the lag histogram the sessions feed on every Ack.
struct ShipperMetrics {
    snapshot: std::sync::Mutex<ShipperStatus>,
    lag: Histogram,
}

/// The states `tidemark_shipper_state` can show.
const STATES: &[&str] = &[
    "connecting",
    "initial-sync",
    "protected",
    "resyncing",
    "critical",
];

fn state_name(s: State) -> &'static str {
    s.name()
}

/// The shipper's metrics from a status snapshot, the lag histogram and
/// the time now (ns since the Unix epoch).
fn collect_metrics(s: &ShipperStatus, lag: HistogramSnapshot, now_ns: u64) -> Exposition {
    let mut e = Exposition::new();
    let g = labels(&[("host", &s.host), ("group", &s.group)]);
    e.state_set(
        "tidemark_shipper_state",
        "Replication state of the group (1 for the current state).",
        &g,
        STATES,
        state_name(s.state),
    );
    e.gauge(
        "tidemark_shipper_lag",
        "Replication lag: age of the oldest record not yet durable at the receiver; 0 when caught up.",
        Some(Unit::Seconds),
        &g,
        s.lag_seconds(now_ns),
    );
    e.gauge(
        "tidemark_shipper_rpo_target",
        "The configured recovery point objective (rpo-target): the lag the replica may have.",
        Some(Unit::Seconds),
        &g,
        s.rpo_target_seconds,
    );
    e.histogram(
        "tidemark_shipper_acked_lag",
        "Replication lag of each record when the receiver acknowledged it durable: the RPO achieved.",
        Some(Unit::Seconds),
        &g,
        lag,
    );
    e.gauge(
        "tidemark_shipper_pending_records",
        "Records in the log not yet durable at the receiver (newest seen minus durable).",
        None,
        &g,
        s.pending_records() as f64,
    );
    e.gauge(
        "tidemark_shipper_durable_sequence",
        "Highest sequence number the receiver has made durable.",
        None,
        &g,
        s.durable_seq.get() as f64,
    );
    e.counter(
        "tidemark_shipper_wire",
        "Bytes sent to the receiver on the wire (after compression; records, sync chunks and control).",
        Some(Unit::Bytes),
        &g,
        s.wire_bytes,
    );
    e.counter(
        "tidemark_shipper_record",
        "Change-log record bytes shipped (before compression).",
        Some(Unit::Bytes),
        &g,
        s.record_bytes,
    );
    for d in &s.disks {
        let dl = labels(&[("host", &s.host), ("group", &s.group), ("disk", &d.name)]);
        e.gauge(
            "tidemark_shipper_initial_sync_done",
            "Bytes of the disk the receiver holds from the initial sync (from its start).",
            Some(Unit::Bytes),
            &dl,
            d.synced.min(d.size) as f64,
        );
        e.gauge(
            "tidemark_shipper_disk_size",
            "Size of the protected disk.",
            Some(Unit::Bytes),
            &dl,
            d.size as f64,
        );
    }
    e.counter(
        "tidemark_shipper_resync_blocks_compared",
        "Resync blocks compared by checksum.",
        None,
        &g,
        s.resync_blocks_compared,
    );
    e.counter(
        "tidemark_shipper_resync_blocks_sent",
        "Resync 4 KiB blocks that differed and were sent.",
        None,
        &g,
        s.resync_blocks_sent,
    );
    e.counter(
        "tidemark_shipper_resync_sent",
        "Bytes of resync blocks that differed and were sent (before compression).",
        Some(Unit::Bytes),
        &g,
        s.resync_bytes_sent,
    );
    e.counter(
        "tidemark_shipper_retries",
        "Reconnect attempts after transient failures.",
        None,
        &g,
        s.retries_total,
    );
    e.counter(
        "tidemark_shipper_peer_timeouts",
        "Connections that ended because the receiver sent nothing for the peer timeout ([shipper.liveness]).",
        None,
        &g,
        s.peer_timeouts_total,
    );
    let class = s.last_error_class.map_or("none", ErrorClass::name);
    let mut l = g.clone();
    l.push(("class".to_string(), class.to_string()));
    e.info(
        "tidemark_shipper_last_error",
        "Class of the last failure since start: transient, permanent or none.",
        &l,
    );
    e
}

/// State shared by the sessions of one daemon run.
struct Shared {
    cfg: ShipperConfig,
    dir: FsDir,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// The address of the receiver dialled last.
    addr: SocketAddr,
    /// Which receiver to dial.
    choice: ReceiverChoice,
    status: ShipperStatus,
    last_status: Instant,
    bandwidth: Bandwidth,
    cursor: Seq,
    log_changed: Arc<Notify>,
    metrics: Arc<ShipperMetrics>,
}

impl Shared {
    fn publish(&mut self, force: bool) {
        self.metrics
            .snapshot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone_from(&self.status);
        if !force && self.last_status.elapsed() < STATUS_INTERVAL {
            return;
        }
        self.last_status = Instant::now();
        self.status.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if let Err(e) = write_status(self.dir.path(), &self.status) {
            tracing::warn!(error = %e, "writing shipper.status failed");
        }
    }
}

/// Resolves a receiver's address.
fn resolve(receiver: &HostPort) -> Result<SocketAddr, String> {
    let host = receiver
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    (host, receiver.port())
        .to_socket_addrs()
        .map_err(|e| format!("resolving the receiver {receiver}: {e}"))?
        .next()
        .ok_or_else(|| format!("the receiver {receiver} has no address"))
}

/// Runs the shipper until `stop` turns true. Must run inside a
/// multi-threaded Tokio runtime. With `metrics_listen`, serves Prometheus
/// metrics there and tells `on_metrics` the bound address (`None`: not
/// asked for, or the address could not be bound: the shipper runs on).
pub async fn run(
    cfg: ShipperConfig,
    metrics_listen: Option<SocketAddr>,
    mut stop: watch::Receiver<bool>,
    on_metrics: impl FnOnce(Option<SocketAddr>),
) -> Result<(), ShipperFatal> {
    let dir = FsDir::existing(&cfg.log_dir).map_err(|e| {
        ShipperFatal::Setup(format!("log directory {}: {e}", cfg.log_dir.display()))
    })?;
    // One shipper per log: it owns the cursor and the status file there
    // (DESIGN invariant 9). Taken before either is read or written, held
    // until the shipper returns.
    let _lock = DirLock::acquire(&cfg.log_dir, LOCK_FILE, "shipper")
        .map_err(|e| ShipperFatal::Setup(e.to_string()))?;
    let client =
        crate::renew::client_config(&cfg).map_err(|e| ShipperFatal::Setup(format!("TLS: {e}")))?;
    let receivers = cfg.receivers();
    let choice = ReceiverChoice::new(&receivers, &cfg.host, &cfg.consistency_group)
        .ok_or_else(|| ShipperFatal::Setup("no receiver configured".into()))?;
    // The endpoint's address family is the first receiver's.
    let addr = resolve(choice.current()).map_err(ShipperFatal::Setup)?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let (endpoint, _buffers) = tidemark_net::client_endpoint(bind)
        .map_err(|e| ShipperFatal::Setup(format!("QUIC endpoint: {e}")))?;
    let cursor = tidemark_changelog::read_cursor(&dir).unwrap_or(Seq::ZERO);

    // Wakes the sending loop when the log directory changes.
    let log_changed = Arc::new(Notify::new());
    let watcher = LogWatcher::new(&dir)
        .map_err(|e| ShipperFatal::Setup(format!("watching {}: {e}", cfg.log_dir.display())))?;
    {
        let notify = log_changed.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("log-watch".into())
            .spawn(move || {
                while !*stop.borrow() {
                    match watcher.wait(Duration::from_millis(500)) {
                        Ok(true) => notify.notify_one(),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "watching the log failed; polling");
                            std::thread::sleep(Duration::from_millis(200));
                            notify.notify_one();
                        }
                    }
                }
            })
            .map_err(|e| ShipperFatal::Setup(format!("starting the log watcher: {e}")))?;
    }

    let status = ShipperStatus {
        format: crate::status::STATUS_FORMAT,
        host: cfg.host.to_string(),
        group: cfg.consistency_group.to_string(),
        state: State::Connecting,
        reason: None,
        durable_seq: cursor,
        sent_seq: cursor,
        log_seq: cursor,
        retries: 0,
        wire_bytes: 0,
        record_bytes: 0,
        disks: Vec::new(),
        resync_blocks_compared: 0,
        resync_blocks_sent: 0,
        resync_bytes_sent: 0,
        updated_unix: 0,
        retries_total: 0,
        last_error_class: None,
        oldest_unacked_ns: None,
        rpo_target_seconds: cfg.rpo_target.get().as_secs_f64(),
        protocol_version: None,
        receiver_software: None,
        peer_timeouts_total: 0,
        vm_spec: None,
    };
    let metrics = Arc::new(ShipperMetrics {
        snapshot: std::sync::Mutex::new(status.clone()),
        lag: Histogram::new(tidemark_metrics::LAG_BUCKETS),
    });
    // Metrics are an observer: a taken port must not stop replication.
    let metrics_server = match metrics_listen {
        Some(addr) => {
            let m = metrics.clone();
            let cert = cfg.tls.cert.clone();
            let render: tidemark_metrics::Render = Arc::new(move || {
                let s = m.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let now = tidemark_changelog::now_ns();
                let mut e = collect_metrics(&s, m.lag.snapshot(), now);
                crate::renew::expose_expiry(&mut e, &cert, &s.host, now);
                e
            });
            match MetricsServer::bind(addr, render).await {
                Ok(server) => Some(server),
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "cannot serve metrics; running without them");
                    None
                }
            }
        }
        None => None,
    };
    on_metrics(metrics_server.as_ref().map(MetricsServer::local_addr));
    let mut shared = Shared {
        bandwidth: Bandwidth::new(&cfg.bandwidth),
        status,
        cfg,
        dir,
        endpoint,
        client,
        addr,
        choice,
        last_status: Instant::now(),
        cursor,
        log_changed,
        metrics,
    };
    shared.publish(true);
    let mut backoff = Backoff::new(&shared.cfg.retry);
    loop {
        let end = session(&mut shared, &mut backoff, &mut stop).await;
        match end {
            SessionEnd::Stopped => {
                shared.status.reason = None;
                shared.publish(true);
                shared.endpoint.wait_idle().await;
                return Ok(());
            }
            SessionEnd::Failed(e) if e.class() == ErrorClass::Permanent => {
                let reason = e.to_string();
                tracing::error!(%reason, "permanent failure: replication stops, the group is critical");
                shared.status.state = State::Critical;
                shared.status.reason = Some(reason);
                shared.status.last_error_class = Some(ErrorClass::Permanent);
                shared.publish(true);
                return Err(ShipperFatal::Critical(e));
            }
            SessionEnd::Failed(e) => {
                let reason = e.to_string();
                if matches!(e, SessionError::PeerTimedOut { .. }) {
                    shared.status.peer_timeouts_total += 1;
                }
                let delay = backoff.next_delay(rand::random::<f64>());
                shared.status.state = State::Connecting;
                shared.status.protocol_version = None;
                shared.status.receiver_software = None;
                shared.status.retries = backoff.attempts();
                shared.status.retries_total += 1;
                shared.status.last_error_class = Some(ErrorClass::Transient);
                shared.status.reason = Some(reason.clone());
                shared.publish(true);
                tracing::warn!(%reason, retry_in = ?delay, attempt = backoff.attempts(), "transient failure; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
                if *stop.borrow() {
                    return Ok(());
                }
            }
        }
    }
}

/// Sends a frame, paced by the bandwidth limit.
async fn send_frame(
    shared: &mut Shared,
    send: &mut quinn::SendStream,
    frame: Vec<u8>,
) -> Result<(), SessionError> {
    let wait = shared
        .bandwidth
        .take(frame.len() as u64, Instant::now(), local_minute_of_day());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let len = frame.len() as u64;
    // Handed over as it is: quinn keeps the buffer rather than copying it.
    send.write_chunk(frame.into()).await.map_err(write_end)?;
    shared.status.wire_bytes += len;
    Ok(())
}

async fn session(
    shared: &mut Shared,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let sources = match read_sources(shared.dir.path()) {
        Ok(Some(s)) => s,
        Ok(None) => return SessionError::TrackerNotStarted.into(),
        Err(e) => return failed(e),
    };
    let generation = match newest_generation(&shared.dir) {
        Ok(g) => g,
        Err(e) => return SessionError::Generation(e).into(),
    };
    let hello = HelloInfo {
        host: shared.cfg.host.clone(),
        group: shared.cfg.consistency_group.clone(),
        generation,
        disks: sources.iter().map(|s| s.disk.clone()).collect(),
    };
    // Every session offers every version this shipper speaks first: a
    // receiver upgraded since the last one is then spoken to in its newest.
    let mut offer = Versions::SUPPORTED;
    loop {
        // A certificate renewed during the last connection is used now.
        match crate::renew::client_config(&shared.cfg) {
            Ok(client) => shared.client = client,
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the TLS files again; connecting with the previous ones")
            }
        }
        shared.addr = match resolve(shared.choice.current()) {
            Ok(addr) => addr,
            Err(reason) => {
                shared.choice.handle_ended();
                return SessionError::Resolve(reason).into();
            }
        };
        shared.choice.handle_dial();
        let connecting = match shared.endpoint.connect_with(
            shared.client.clone(),
            shared.addr,
            &shared.cfg.server_name,
        ) {
            Ok(c) => c,
            Err(source) => {
                shared.choice.handle_ended();
                return SessionError::Connect {
                    addr: shared.addr,
                    source,
                }
                .into();
            }
        };
        let conn = tokio::select! {
            c = connecting => match c {
                Ok(c) => c,
                Err(e) => {
                    shared.choice.handle_ended();
                    return connection_end(e, "connecting").into();
                }
            },
            _ = stop.changed() => return SessionEnd::Stopped,
        };
        let mut connection = Connection {
            shared: &mut *shared,
            sources: &sources,
            opened: Vec::new(),
            reads: VecDeque::new(),
            tail: None,
            drain: None,
            base: Counters::default(),
            reporter: Reporter::new(ReporterConfig::default()),
            reports: None,
        };
        let end = connection
            .run(backoff, stop, &conn, hello.clone(), offer)
            .await;
        let reason: &[u8] = match &end {
            SessionEnd::Stopped => b"stopping",
            _ => b"error",
        };
        conn.close(0u32.into(), reason);
        match end {
            SessionEnd::Failed(SessionError::Session(ShipperError::OfferOlder { version }))
                if offer.max > version =>
            {
                tracing::info!(
                    receiver = %shared.addr,
                    version,
                    offered = %offer,
                    "the receiver speaks an older protocol; connecting again in it"
                );
                offer = Versions::only(version);
            }
            SessionEnd::Failed(SessionError::Session(ShipperError::Redirected { to })) => {
                let target = match to.parse::<HostPort>() {
                    Ok(t) => t,
                    Err(e) => {
                        shared.choice.handle_ended();
                        return SessionError::Session(ShipperError::Protocol(format!(
                            "a redirect to {to:?}, which is no address: {e}"
                        )))
                        .into();
                    }
                };
                match shared.choice.handle_redirect(target) {
                    Ok(()) => {
                        tracing::info!(
                            receiver = %shared.addr,
                            to = %to,
                            "the receiver does not own this group; connecting to its owner"
                        );
                        offer = Versions::SUPPORTED;
                    }
                    Err(too_many) => {
                        return SessionError::Session(ShipperError::Protocol(too_many.to_string()))
                            .into()
                    }
                }
            }
            end => {
                shared.choice.handle_ended();
                return end;
            }
        }
    }
}

/// Reads messages from the stream into a channel, so the sending loop can
/// wait on them together with the log.
fn spawn_reader(mut recv: quinn::RecvStream) -> mpsc::Receiver<Result<Received, SessionError>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut decoder = MessageDecoder::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.feed(&buf[..n]),
                Ok(None) => {
                    let _ = tx.send(Err(SessionError::StreamClosed)).await;
                    return;
                }
                Err(quinn::ReadError::ConnectionLost(c)) => {
                    let _ = tx.send(Err(connection_end(c, "receiving"))).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(SessionError::Read(e))).await;
                    return;
                }
            }
            loop {
                match decoder.next_message() {
                    Ok(Some(m)) => {
                        if tx.send(Ok(m)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tx.send(Err(SessionError::BadFrame(e))).await;
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// The answer of the oldest read ahead, when it is done (the caller then
/// removes it from `reads`; with none, never).
async fn oldest_read(
    reads: &mut VecDeque<ReadAhead>,
) -> Result<Result<ChunkData, SessionError>, tokio::task::JoinError> {
    match reads.front_mut() {
        Some(r) => (&mut r.read).await,
        None => std::future::pending().await,
    }
}

/// Hands a finished read ahead to the core.
fn answer_read(
    core: &mut ShipperCore,
    disk: DiskId,
    offset: u64,
    read: Result<Result<ChunkData, SessionError>, tokio::task::JoinError>,
) -> Result<(), SessionError> {
    let data = read.map_err(|source| SessionError::ReadAhead {
        disk,
        offset,
        source,
    })??;
    core.handle_chunk(data);
    Ok(())
}

/// The status counters that add up across sessions, as they stood when
/// this session began (the core counts from zero in each).
#[derive(Default, Clone, Copy)]
struct Counters {
    resync_blocks_compared: u64,
    resync_blocks_sent: u64,
    resync_bytes_sent: u64,
}

/// A drain's tracker stop, running on a blocking thread.
/// Why the protected host cannot drain its group for a planned failover.
/// The receiver is told [`DrainError::reason`], as text in the `error`
/// field of the `drained` message.
#[derive(Debug, thiserror::Error)]
enum DrainError {
    /// The tracker would not stop (or could not be asked).
    #[error(transparent)]
    Stop(tidemark_control::ControlError),
    /// The task that stopped it failed.
    #[error("stopping the tracker")]
    Stopping(#[source] tokio::task::JoinError),
    /// The log could not be read after the tracker stopped (local disk).
    #[error("reading the log after the tracker stopped")]
    Check(#[source] std::io::Error),
    /// The log does not verify: what is past the damage cannot be shipped.
    #[error("the log is damaged: run `tidemark log check` on it")]
    Damaged,
}

impl DrainError {
    /// The reason sent to the receiver: the error and its direct cause,
    /// one line, as the receiver's admin reads it.
    fn reason(&self) -> String {
        match self {
            DrainError::Stopping(e) => format!("{self}: {e}"),
            DrainError::Check(e) => format!("{self}: {e}"),
            DrainError::Stop(_) | DrainError::Damaged => self.to_string(),
        }
    }
}

type TrackerStop =
    tokio::task::JoinHandle<Result<tidemark_control::Stopped, tidemark_control::ControlError>>;

/// An initial-sync chunk read ahead on a blocking thread, so the next
/// chunks are read while this one is compressed and sent.
struct ReadAhead {
    disk: DiskId,
    offset: u64,
    read: tokio::task::JoinHandle<Result<ChunkData, SessionError>>,
}

/// The IO side of one connection: what the core asks for is read here.
struct Connection<'a> {
    shared: &'a mut Shared,
    sources: &'a [tidemark_changelog::DiskSource],
    /// Disks opened for the initial sync, by id.
    opened: Vec<(DiskId, Arc<SourceDisk>)>,
    /// Initial-sync chunks being read on blocking threads, in the order
    /// the core asked for them (it takes the answers in that order).
    reads: VecDeque<ReadAhead>,
    tail: Option<LogTail>,
    /// A drain the receiver asked for: its id and the tracker's stop.
    drain: Option<(u64, TrackerStop)>,
    base: Counters,
    /// Decides when a status report is due, and the stream it goes on
    /// (opened once a session of version 7 or later runs).
    reporter: Reporter,
    reports: Option<crate::report::ReportStream>,
}

impl Connection<'_> {
    async fn run(
        &mut self,
        backoff: &mut Backoff,
        stop: &mut watch::Receiver<bool>,
        conn: &quinn::Connection,
        hello: HelloInfo,
        offer: Versions,
    ) -> SessionEnd {
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return connection_end(e, "opening a stream").into(),
        };
        let mut rx = spawn_reader(recv);
        let cfg = &self.shared.cfg;
        // Span holds come on a stream of their own; they end with the
        // connection.
        let _holds = crate::holds::Relay::start(conn.clone(), cfg.tracker_control_socket.clone());
        let _renewal =
            crate::renew::Renewer::start(conn.clone(), crate::renew::Settings::from_config(cfg));
        let config = CoreConfig {
            session: SessionConfig {
                compression: Compression::Zstd(cfg.compression_level),
                versions: offer,
                ..SessionConfig::default()
            },
            batch_bytes: usize::try_from(cfg.batch_size.0).unwrap_or(usize::MAX),
            chunk_bytes: cfg.sync_chunk_size.0.max(4096),
            stop_grace: STOP_GRACE,
            ..CoreConfig::default()
        };
        let mut core = match ShipperCore::new(hello, config, Instant::now()) {
            Ok(c) => c,
            Err(e) => return failed(e),
        };
        let s = &self.shared.status;
        self.base = Counters {
            resync_blocks_compared: s.resync_blocks_compared,
            resync_blocks_sent: s.resync_blocks_sent,
            resync_bytes_sent: s.resync_bytes_sent,
        };
        let mut stop_sent = false;
        let mut spec_watch = cfg.vm_spec.as_deref().map(crate::vm_spec::SpecWatch::new);
        loop {
            while let Some(frame) = core.poll_transmit() {
                if let Err(e) = send_frame(self.shared, &mut send, frame).await {
                    return e.into();
                }
            }
            while let Some(event) = core.poll_event() {
                match event {
                    CoreEvent::Stopped => {
                        let _ = send.finish();
                        return SessionEnd::Stopped;
                    }
                    CoreEvent::Retry(e) | CoreEvent::Critical(e) => {
                        // The last report first: the receiver ends the
                        // session, and stops reading reports, at the
                        // Error frame.
                        if matches!(e.class(), ErrorClass::Permanent) {
                            self.report_critical(&core, &e, conn).await;
                        }
                        // What the core still had to say (its Error frame).
                        while let Some(frame) = core.poll_transmit() {
                            let _ = send.write_all(&frame).await;
                        }
                        return failed(e);
                    }
                    event => {
                        if let Err(e) = self.on_event(event, backoff) {
                            return e.into();
                        }
                    }
                }
            }
            self.publish(&core, conn);
            if *stop.borrow() && !stop_sent {
                stop_sent = true;
                core.stop(Instant::now());
                continue;
            }
            // The group's VM spec, sent again when it changes (the core
            // holds it until the session runs).
            let spec = spec_watch.as_mut().and_then(|w| {
                w.poll(Instant::now(), |p| {
                    tokio::task::block_in_place(|| std::fs::read_to_string(p))
                })
            });
            if let Some(text) = spec {
                core.handle_vm_spec(text);
                continue;
            }
            if self.drain.as_ref().is_some_and(|(_, h)| h.is_finished()) {
                let (id, handle) = self.drain.take().expect("checked above");
                let last = self.drained(handle).await;
                let last = last.map_err(|e| DrainRefused { reason: e.reason() });
                match &last {
                    Ok(seq) => {
                        tracing::info!(
                            id,
                            last_seq = seq.get(),
                            "tracker stopped; shipping what is left"
                        )
                    }
                    Err(why) => tracing::warn!(reason = %why, "cannot drain the group"),
                }
                core.handle_drain_ready(id, last.as_ref().copied());
                continue;
            }
            // Everything the receiver said so far, before deciding.
            match rx.try_recv() {
                Ok(Ok(msg)) => {
                    core.handle_message(msg, Instant::now());
                    continue;
                }
                Ok(Err(e)) => return e.into(),
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return SessionError::ReaderEnded.into()
                }
            }
            if self.reads.front().is_some_and(|r| r.read.is_finished()) {
                let r = self.reads.pop_front().expect("checked above");
                let read = r.read.await;
                if let Err(e) = answer_read(&mut core, r.disk, r.offset, read) {
                    return e.into();
                }
                continue;
            }
            if let Some(need) = core.poll_need() {
                if let Err(e) = self.serve(&mut core, need) {
                    return e.into();
                }
                continue;
            }
            let deadline = core
                .poll_timeout()
                .map_or(Duration::from_secs(1), |t| {
                    t.saturating_duration_since(Instant::now())
                })
                // A drain's tracker stop is looked at every second.
                .min(Duration::from_secs(1));
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Ok(msg)) => core.handle_message(msg, Instant::now()),
                    Some(Err(e)) => return e.into(),
                    None => return SessionError::ReaderEnded.into(),
                },
                _ = self.shared.log_changed.notified() => core.handle_log_changed(),
                // The oldest read ahead, answered as soon as it is done.
                read = oldest_read(&mut self.reads), if !self.reads.is_empty() => {
                    let r = self.reads.pop_front().expect("a read finished");
                    if let Err(e) = answer_read(&mut core, r.disk, r.offset, read) {
                        return e.into();
                    }
                }
                _ = stop.changed(), if !stop_sent => {}
                _ = tokio::time::sleep(deadline) => {}
            }
            core.handle_timeout(Instant::now());
        }
    }

    /// Acts on an event that does not end the session.
    fn on_event(&mut self, event: CoreEvent, backoff: &mut Backoff) -> Result<(), SessionError> {
        let shared = &mut *self.shared;
        match event {
            CoreEvent::Connected(resume) => {
                backoff.reset();
                shared.choice.handle_session();
                shared.status.retries = 0;
                shared.status.reason = None;
                tracing::info!(
                    receiver = %shared.addr,
                    durable = resume.durable.seq.get(),
                    from = resume.from_seq.get(),
                    protocol = resume.version,
                    receiver_software = %resume.receiver_software,
                    "connected; shipping"
                );
                shared.status.protocol_version = Some(resume.version);
                shared.status.receiver_software =
                    Some(resume.receiver_software.clone()).filter(|s| !s.is_empty());
                shared.status.durable_seq = resume.durable.seq;
                self.tail = Some(LogTail::open(shared.dir.path(), resume.from_seq)?);
                if !resume.resyncing.is_empty() {
                    tracing::info!(
                        extents = resume.resyncing.len(),
                        "the replica waits for a resync of extents"
                    );
                }
            }
            CoreEvent::CursorAdvanced { durable, acked_ns } => {
                self.reporter.handle_durable(durable.seq);
                if durable.seq > shared.cursor {
                    let dir = shared.dir.clone();
                    tokio::task::block_in_place(|| write_cursor(&dir, durable.seq))
                        .map_err(SessionError::Cursor)?;
                    shared.cursor = durable.seq;
                }
                // One observation per record made durable: the histogram's
                // quantiles are over records, as the RPO is.
                let now = tidemark_changelog::now_ns();
                for ts in acked_ns {
                    shared.metrics.lag.observe_ns(now.saturating_sub(ts));
                }
            }
            CoreEvent::DrainRequested { id } => {
                let control = shared.cfg.tracker_control_socket.clone();
                tracing::info!(
                    id,
                    control = %control.display(),
                    "planned failover: the replica site asks to drain; stopping the tracker"
                );
                let stopping = tokio::task::spawn_blocking(move || {
                    tidemark_control::stop_tracker(&control, TRACKER_STOP_TIMEOUT)
                });
                self.drain = Some((id, stopping));
            }
            CoreEvent::VmSpec(news) => {
                let said = match news {
                    VmSpecNews::Answered(VmSpecReply::Kept { from_seq }) => {
                        tracing::info!(from_seq = from_seq.get(), "the receiver keeps the VM spec");
                        format!("kept from record {from_seq}")
                    }
                    VmSpecNews::Answered(VmSpecReply::Refused { reason }) => {
                        tracing::warn!(%reason, "the receiver refused the VM spec");
                        format!("refused: {reason}")
                    }
                    VmSpecNews::NotCarried { version } => {
                        tracing::warn!(
                            protocol = version,
                            "the receiver's release cannot keep the VM spec; upgrade it"
                        );
                        format!("not sent: protocol version {version} cannot carry it; upgrade the receiver")
                    }
                };
                shared.status.vm_spec = Some(said);
            }
            CoreEvent::Retry(_) | CoreEvent::Critical(_) | CoreEvent::Stopped => {
                unreachable!("handled by the loop")
            }
        }
        Ok(())
    }

    /// The stopped tracker's last record (`Err`: why the group cannot be
    /// drained, told to the receiver).
    async fn drained(&mut self, handle: TrackerStop) -> Result<Seq, DrainError> {
        let how = match handle.await {
            Ok(r) => r.map_err(DrainError::Stop)?,
            Err(e) => return Err(DrainError::Stopping(e)),
        };
        let dir = self.shared.dir.clone();
        let report = tokio::task::block_in_place(|| tidemark_changelog::check(&dir))
            .map_err(DrainError::Check)?;
        if !report.is_clean() {
            return Err(DrainError::Damaged);
        }
        tracing::info!(?how, "tracker stopped");
        Ok(report.last_seq.unwrap_or(Seq::ZERO))
    }

    /// Reads what the core needs and hands it over.
    fn serve(&mut self, core: &mut ShipperCore, need: Need) -> Result<(), SessionError> {
        match need {
            Need::FirstRecordAfter { after } => {
                let from = if after == Seq::ZERO {
                    Seq::ZERO
                } else {
                    after.next()
                };
                let dir = self.shared.dir.clone();
                let first = tokio::task::block_in_place(|| first_record_from(&dir, from))
                    .map_err(|e| SessionError::Log(Box::new(e)))?;
                core.handle_first_record(
                    first.map(|(seq, generation)| RecordId { seq, generation }),
                    Instant::now(),
                );
            }
            Need::LogBatch { max_bytes } => {
                let Some(tail) = self.tail.as_mut() else {
                    core.handle_log_batch(None, Instant::now());
                    return Ok(());
                };
                let batch =
                    tokio::task::block_in_place(|| tail.next_batch(max_bytes, Duration::ZERO))?;
                let records = batch.map(|b| b.batch);
                if let Some(r) = &records {
                    self.shared.status.record_bytes += r.byte_len() as u64;
                    if let Some(last) = r.last() {
                        self.reporter
                            .handle_records_read(last.seq, r.byte_len() as u64);
                    }
                }
                core.handle_log_batch(records, Instant::now());
            }
            Need::Chunk {
                disk,
                offset,
                length,
                purpose,
            } => {
                let Some(src) = self.sources.iter().find(|d| d.disk.id == disk) else {
                    return Err(SessionError::UnknownDisk(disk));
                };
                let fail = |source| SessionError::Disk {
                    name: src.disk.name.clone(),
                    path: src.path.display().to_string(),
                    offset,
                    source,
                };
                // A grow record since the hello makes the disk larger.
                let size = core.disk_size(disk).unwrap_or(src.disk.size);
                let data = match purpose {
                    // Read on a blocking thread; the core gets it in the
                    // order asked for (see `answer_read`).
                    ChunkPurpose::InitialSync => {
                        self.opened
                            .retain(|(id, d)| *id != disk || d.size() == size);
                        if !self.opened.iter().any(|(id, _)| *id == disk) {
                            let d = SourceDisk::open(&src.path, size).map_err(fail)?;
                            self.opened.push((disk, Arc::new(d)));
                        }
                        let (_, source) = self
                            .opened
                            .iter()
                            .find(|(id, _)| *id == disk)
                            .expect("opened above");
                        let source = Arc::clone(source);
                        let (name, path) = (src.disk.name.clone(), src.path.clone());
                        let read = tokio::task::spawn_blocking(move || {
                            match source.chunk(offset, length) {
                                Ok(ChunkContent::Zero(n)) => Ok(ChunkData::Zero(n)),
                                Ok(ChunkContent::Data(d)) => Ok(ChunkData::Data(d)),
                                Err(source) => Err(SessionError::Disk {
                                    name,
                                    path: path.display().to_string(),
                                    offset,
                                    source,
                                }),
                            }
                        });
                        self.reads.push_back(ReadAhead { disk, offset, read });
                        return Ok(());
                    }
                    // Read once: the digests and the blocks sent come from
                    // the same bytes, read after everything sent so far was
                    // written to the disk.
                    ChunkPurpose::Resync => ChunkData::Data(
                        tokio::task::block_in_place(|| {
                            SourceDisk::open(&src.path, size).and_then(|d| d.read(offset, length))
                        })
                        .map_err(fail)?,
                    ),
                };
                core.handle_chunk(data);
            }
        }
        Ok(())
    }

    /// The status file and metrics from the core's view, as of now.
    fn publish(&mut self, core: &ShipperCore, conn: &quinn::Connection) {
        let now = Instant::now();
        let c = core.status(now);
        let s = &mut self.shared.status;
        if let Some(state) = match c.phase {
            Phase::Connecting => None,
            Phase::InitialSync => Some(State::InitialSync),
            Phase::Resyncing => Some(State::Resyncing),
            Phase::Protected => Some(State::Protected),
        } {
            s.state = state;
            s.durable_seq = c.durable_seq;
            s.sent_seq = c.sent_seq;
            s.log_seq = s.log_seq.max(c.log_seq);
            s.oldest_unacked_ns = c.oldest_unacked_ns;
            s.resync_blocks_compared = self.base.resync_blocks_compared + c.resync_blocks_compared;
            s.resync_blocks_sent = self.base.resync_blocks_sent + c.resync_blocks_sent;
            s.resync_bytes_sent = self.base.resync_bytes_sent + c.resync_bytes_sent;
            s.disks = self
                .sources
                .iter()
                .zip(&c.disks)
                .map(|(src, d)| DiskProgress {
                    name: src.disk.name.to_string(),
                    size: d.size,
                    synced: d.synced,
                    data_bytes: d.data_bytes,
                    rate_bytes_per_sec: d.rate_bytes_per_sec,
                    eta_seconds: d.eta_seconds,
                })
                .collect();
            self.report(&c, state, String::new(), conn);
        }
        self.shared.publish(false);
    }

    /// Gives the reporter what the shipper knows now, and sends a report
    /// if one is due (in a session of version 7 or later).
    fn report(
        &mut self,
        c: &tidemark_wire::CoreStatus,
        state: State,
        reason: String,
        conn: &quinn::Connection,
    ) {
        let Some(version) = c
            .version
            .filter(|v| *v >= MessageType::StatusReport.since())
        else {
            return;
        };
        let state = match state {
            State::InitialSync => ReportState::InitialSync,
            State::Resyncing => ReportState::Resyncing,
            State::Protected => ReportState::Protected,
            State::Critical => ReportState::Critical,
            State::Connecting => return,
        };
        self.reporter.handle_facts(Facts {
            state,
            reason,
            log_seq: self.shared.status.log_seq.max(c.log_seq),
            durable_seq: c.durable_seq,
            oldest_unacked_ns: c.oldest_unacked_ns,
            now_ns: tidemark_changelog::now_ns(),
            wire_bytes: c.wire_bytes,
            record_bytes: c.record_bytes,
            sync: Progress {
                done: c.disks.iter().map(|d| d.synced.min(d.size)).sum(),
                total: c.disks.iter().map(|d| d.size).sum(),
            },
            sync_bytes_per_sec: c.disks.iter().map(|d| d.rate_bytes_per_sec).sum(),
            resync_left: c.resync_bytes_left,
        });
        if let Some(report) = self.reporter.poll_report(Instant::now()) {
            self.reports
                .get_or_insert_with(|| crate::report::ReportStream::start(conn.clone(), version))
                .send(report);
        }
    }

    /// Tells the receiver the group is critical and why, before the
    /// connection closes (in a session of version 7 or later).
    async fn report_critical(
        &mut self,
        core: &ShipperCore,
        e: &ShipperError,
        conn: &quinn::Connection,
    ) {
        let c = core.status(Instant::now());
        self.report(&c, State::Critical, e.to_string(), conn);
        if let Some(reports) = self.reports.take() {
            reports.flush(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_show_state_lag_and_error_class() {
        let status = ShipperStatus {
            format: crate::status::STATUS_FORMAT,
            host: "db1".into(),
            group: "g".into(),
            state: State::Protected,
            reason: None,
            durable_seq: Seq(7),
            sent_seq: Seq(9),
            log_seq: Seq(9),
            retries: 0,
            wire_bytes: 100,
            record_bytes: 250,
            disks: vec![DiskProgress {
                name: "vda".into(),
                size: 4096,
                synced: 4096,
                data_bytes: 0,
                rate_bytes_per_sec: 0,
                eta_seconds: Some(0),
            }],
            resync_blocks_compared: 0,
            resync_blocks_sent: 0,
            resync_bytes_sent: 0,
            updated_unix: 0,
            retries_total: 2,
            last_error_class: Some(ErrorClass::Transient),
            oldest_unacked_ns: Some(1_000_000_000),
            rpo_target_seconds: 300.0,
            protocol_version: Some(2),
            receiver_software: None,
            peer_timeouts_total: 3,
            vm_spec: None,
        };
        let lag = Histogram::new(&[1.0]).snapshot();
        let t = collect_metrics(&status, lag, 3_000_000_000)
            .render(tidemark_metrics::Format::OpenMetrics);
        for want in [
            "tidemark_shipper_state{host=\"db1\",group=\"g\",state=\"protected\"} 1.0\n",
            "tidemark_shipper_state{host=\"db1\",group=\"g\",state=\"critical\"} 0.0\n",
            "tidemark_shipper_lag_seconds{host=\"db1\",group=\"g\"} 2.0\n",
            "tidemark_shipper_rpo_target_seconds{host=\"db1\",group=\"g\"} 300.0\n",
            "tidemark_shipper_pending_records{host=\"db1\",group=\"g\"} 2.0\n",
            "tidemark_shipper_record_bytes_total{host=\"db1\",group=\"g\"} 250\n",
            "tidemark_shipper_initial_sync_done_bytes{host=\"db1\",group=\"g\",disk=\"vda\"} 4096.0\n",
            "tidemark_shipper_retries_total{host=\"db1\",group=\"g\"} 2\n",
            "tidemark_shipper_peer_timeouts_total{host=\"db1\",group=\"g\"} 3\n",
            "tidemark_shipper_last_error_info{host=\"db1\",group=\"g\",class=\"transient\"} 1",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }
}
