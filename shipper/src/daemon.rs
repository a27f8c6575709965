//! The shipper daemon: a thin shell around the protocol session
//! ([`tidemark_wire::shipper`]). It owns the QUIC connection, the log tail,
//! the disks and the pacing; the session decides what may be sent and what
//! the receiver's answers mean.
//!
//! One connection at a time, one bidirectional stream per connection. In
//! each turn of the loop the shipper, in this order of preference:
//! 1. sends the records the log has (up to `batch-size` per frame);
//! 2. when the log is drained, asks for the receiver's digests of the next
//!    resync-needed extent;
//! 3. else reads and sends the next initial-sync chunk of a disk: read
//!    right after the log was drained to the last record sent, so the
//!    receiver applies it between that record and the next;
//! 4. else waits for the log (inotify), the receiver, or a stop.
//!
//! Acks advance the log's durable cursor (the tracker recycles what is
//! below it). Transient failures reconnect with jittered exponential
//! backoff; permanent ones end the daemon with the state `critical` and
//! the reason in `shipper.status`.

use std::collections::VecDeque;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_changelog::{read_sources, write_cursor, DirLock, FsDir, LogWatcher};
use tidemark_config::ShipperConfig;
use tidemark_wire::shipper::{
    DigestReply, Extent, HelloInfo, ShipperConfig as SessionConfig, Shipping,
};
use tidemark_wire::{
    differing_blocks, AwaitingWelcome, ChunkData, ChunkPurpose, Compression, DiskInfo, ErrorClass,
    MessageDecoder, Received, RecordBatch, RecordId, ShipperError, ShipperEvent, Versions,
};
use tokio::sync::{mpsc, watch, Notify};

use crate::policy::{local_minute_of_day, Backoff, Bandwidth};
use crate::source::{ChunkContent, SourceDisk};
use crate::status::{write_status, DiskProgress, ErrorClass as FailureClass, ShipperStatus, State};
use crate::tail::{first_record_from, newest_generation, LogTail};
use tidemark_metrics::{labels, Exposition, Histogram, HistogramSnapshot, MetricsServer, Unit};

/// Largest extent one digest request covers: the shipper reads it into
/// memory to compare and send.
const MAX_DIGEST_EXTENT: u64 = 16 << 20;

/// The shipper's lock file in the log directory.
pub const LOCK_FILE: &str = "shipper.lock";

/// How often the status file is refreshed at most.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// How long a stopping shipper waits for the receiver's last Acks.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Why the shipper stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum ShipperFatal {
    /// The configuration cannot work (certificates, address).
    #[error("{0}")]
    Setup(String),
    /// A permanent replication failure: the group is critical.
    #[error("replication stopped (critical): {0}")]
    Critical(String),
}

/// How a session ended.
#[derive(Debug)]
enum SessionEnd {
    /// A stop was requested.
    Stopped,
    /// Retry after a backoff.
    Transient(String),
    /// Do not retry.
    Permanent(String),
    /// The receiver speaks only this (older) protocol version and refused
    /// the hello: connect again at once, offering only it (the text, if
    /// that is not done: a transient failure).
    OfferOlder(u16, String),
}

fn transient(e: impl std::fmt::Display) -> SessionEnd {
    SessionEnd::Transient(e.to_string())
}

fn permanent(e: impl std::fmt::Display) -> SessionEnd {
    SessionEnd::Permanent(e.to_string())
}

/// Close codes the receiver uses for refused hosts (see the receiver
/// daemon): revoked, and no usable identity.
const CLOSE_REVOKED: u64 = 1;
const CLOSE_BAD_IDENTITY: u64 = 2;

/// Classifies a lost connection: authentication failures are permanent
/// (retrying cannot help until an admin acts), everything else transient.
fn connection_end(e: &quinn::ConnectionError, context: &str) -> SessionEnd {
    use quinn::ConnectionError as C;
    let is_crypto = |code: u64| (0x100..0x200).contains(&code);
    match e {
        C::ConnectionClosed(close) if is_crypto(u64::from(close.error_code)) => permanent(format!(
            "{context}: the receiver refused this host's certificate ({e}); enroll the host again \
             (tidemark host request / tidemark receiver sign)"
        )),
        C::TransportError(t) if is_crypto(u64::from(t.code)) => permanent(format!(
            "{context}: TLS handshake failed ({e}); check the receiver's CA (ca.crt) and its \
             server name"
        )),
        C::ApplicationClosed(close)
            if matches!(
                close.error_code.into_inner(),
                CLOSE_REVOKED | CLOSE_BAD_IDENTITY
            ) =>
        {
            permanent(format!("{context}: the receiver refused this host: {e}"))
        }
        _ => transient(format!("{context}: {e}")),
    }
}

fn write_end(e: &quinn::WriteError) -> SessionEnd {
    match e {
        quinn::WriteError::ConnectionLost(c) => connection_end(c, "sending"),
        other => transient(format!("sending: {other}")),
    }
}

fn classify(class: ErrorClass, text: String) -> SessionEnd {
    match class {
        ErrorClass::Transient => SessionEnd::Transient(text),
        ErrorClass::Permanent => SessionEnd::Permanent(text),
    }
}

/// Initial sync of one disk.
struct SyncCursor {
    id: u32,
    size: u64,
    /// Next byte to send.
    next: u64,
    source: Option<SourceDisk>,
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
        "Replication lag sampled at each acknowledgement that advanced the durable position: the RPO achieved.",
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
        s.durable_seq as f64,
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
    let class = s.last_error_class.map_or("none", FailureClass::name);
    let mut l = g.clone();
    l.push(("class".to_string(), class.to_string()));
    e.info(
        "tidemark_shipper_last_error",
        "Class of the last failure since start: transient, permanent or none.",
        &l,
    );
    e
}

/// Timestamps of the records sent and not yet acknowledged, oldest first:
/// (sequence number, timestamp in ns).
#[derive(Default)]
struct Unacked(VecDeque<(u64, u64)>);

impl Unacked {
    /// Notes the records of a batch about to be sent. A batch sent again
    /// after a reconnect replaces what was noted from its first record on.
    fn sent(&mut self, records: &[u8]) {
        let mut at = 0;
        let mut first = true;
        while at < records.len() {
            let Ok(h) = tidemark_changelog::Header::decode(&records[at..]) else {
                return;
            };
            if first {
                while self.0.back().is_some_and(|&(seq, _)| seq >= h.seq) {
                    self.0.pop_back();
                }
                first = false;
            }
            self.0.push_back((h.seq, h.timestamp_ns));
            at += h.record_len().max(1);
        }
    }

    /// Forgets what is durable up to `durable`; returns the timestamp of
    /// the oldest record this acknowledgement covered, if any.
    fn acked(&mut self, durable: u64) -> Option<u64> {
        let oldest = self
            .0
            .front()
            .filter(|&&(seq, _)| seq <= durable)
            .map(|&(_, ts)| ts);
        while self.0.front().is_some_and(|&(seq, _)| seq <= durable) {
            self.0.pop_front();
        }
        oldest
    }

    fn oldest(&self) -> Option<u64> {
        self.0.front().map(|&(_, ts)| ts)
    }
}

/// State shared by the sessions of one daemon run.
struct Shared {
    cfg: ShipperConfig,
    dir: FsDir,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    addr: SocketAddr,
    status: ShipperStatus,
    last_status: Instant,
    bandwidth: Bandwidth,
    cursor: u64,
    log_changed: Arc<Notify>,
    metrics: Arc<ShipperMetrics>,
    unacked: Unacked,
}

impl Shared {
    fn publish(&mut self, force: bool) {
        self.status.oldest_unacked_ns = self.unacked.oldest();
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

/// Resolves the receiver's address.
fn resolve(cfg: &ShipperConfig) -> Result<SocketAddr, ShipperFatal> {
    let host = cfg
        .receiver
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    (host, cfg.receiver.port())
        .to_socket_addrs()
        .map_err(|e| ShipperFatal::Setup(format!("resolving the receiver {}: {e}", cfg.receiver)))?
        .next()
        .ok_or_else(|| ShipperFatal::Setup(format!("the receiver {} has no address", cfg.receiver)))
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
    let client = tidemark_net::client_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)
        .map_err(|e| ShipperFatal::Setup(format!("TLS: {e}")))?;
    let addr = resolve(&cfg)?;
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().expect("literal address")
    } else {
        "0.0.0.0:0".parse().expect("literal address")
    };
    let (endpoint, _buffers) = tidemark_net::client_endpoint(bind)
        .map_err(|e| ShipperFatal::Setup(format!("QUIC endpoint: {e}")))?;
    let cursor = tidemark_changelog::read_cursor(&dir).unwrap_or(0);

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
        host: cfg.host.clone(),
        group: cfg.consistency_group.clone(),
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
    };
    let metrics = Arc::new(ShipperMetrics {
        snapshot: std::sync::Mutex::new(status.clone()),
        lag: Histogram::new(tidemark_metrics::LAG_BUCKETS),
    });
    // Metrics are an observer: a taken port must not stop replication.
    let metrics_server = match metrics_listen {
        Some(addr) => {
            let m = metrics.clone();
            let render: tidemark_metrics::Render = Arc::new(move || {
                let s = m.snapshot.lock().unwrap_or_else(|e| e.into_inner()).clone();
                collect_metrics(&s, m.lag.snapshot(), tidemark_changelog::now_ns())
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
        last_status: Instant::now(),
        cursor,
        log_changed,
        metrics,
        unacked: Unacked::default(),
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
            SessionEnd::Permanent(reason) => {
                tracing::error!(%reason, "permanent failure: replication stops, the group is critical");
                shared.status.state = State::Critical;
                shared.status.reason = Some(reason.clone());
                shared.status.last_error_class = Some(FailureClass::Permanent);
                shared.publish(true);
                return Err(ShipperFatal::Critical(reason));
            }
            SessionEnd::Transient(reason) | SessionEnd::OfferOlder(_, reason) => {
                let delay = backoff.next_delay(rand::random::<f64>());
                shared.status.state = State::Connecting;
                shared.status.protocol_version = None;
                shared.status.receiver_software = None;
                shared.status.retries = backoff.attempts();
                shared.status.retries_total += 1;
                shared.status.last_error_class = Some(FailureClass::Transient);
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
    frame: &[u8],
) -> Result<(), SessionEnd> {
    let wait = shared
        .bandwidth
        .take(frame.len() as u64, Instant::now(), local_minute_of_day());
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    send.write_all(frame).await.map_err(|e| write_end(&e))?;
    shared.status.wire_bytes += frame.len() as u64;
    Ok(())
}

async fn session(
    shared: &mut Shared,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let sources = match read_sources(shared.dir.path()) {
        Ok(Some(s)) => s,
        Ok(None) => return transient("the tracker has not started on this log directory yet"),
        Err(e) => return transient(e),
    };
    let disks: Vec<DiskInfo> = sources
        .iter()
        .map(|s| DiskInfo {
            id: s.id,
            name: s.name.clone(),
            size: s.size,
        })
        .collect();
    let generation = match newest_generation(&shared.dir) {
        Ok(g) => g,
        Err(e) => return transient(format!("reading the log: {e}")),
    };
    // Every session offers every version this shipper speaks first: a
    // receiver upgraded since the last one is then spoken to in its newest.
    let mut offer = Versions::SUPPORTED;
    loop {
        let connecting = match shared.endpoint.connect_with(
            shared.client.clone(),
            shared.addr,
            &shared.cfg.server_name,
        ) {
            Ok(c) => c,
            Err(e) => return transient(format!("connecting to {}: {e}", shared.addr)),
        };
        let conn = tokio::select! {
            c = connecting => match c {
                Ok(c) => c,
                Err(e) => return connection_end(&e, &format!("connecting to {}", shared.addr)),
            },
            _ = stop.changed() => return SessionEnd::Stopped,
        };
        let end = run_connection(
            shared,
            backoff,
            stop,
            &conn,
            disks.clone(),
            sources.clone(),
            generation,
            offer,
        )
        .await;
        let reason: &[u8] = match &end {
            SessionEnd::Stopped => b"stopping",
            _ => b"error",
        };
        conn.close(0u32.into(), reason);
        match end {
            SessionEnd::OfferOlder(version, _) if offer.max > version => {
                tracing::info!(
                    receiver = %shared.addr,
                    version,
                    offered = %offer,
                    "the receiver speaks an older protocol; connecting again in it"
                );
                offer = Versions::only(version);
            }
            end => return end,
        }
    }
}

/// Reads messages from the stream into a channel, so the sending loop can
/// wait on them together with the log.
fn spawn_reader(mut recv: quinn::RecvStream) -> mpsc::Receiver<Result<Received, SessionEnd>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut decoder = MessageDecoder::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.feed(&buf[..n]),
                Ok(None) => {
                    let _ = tx
                        .send(Err(transient("the receiver closed the stream")))
                        .await;
                    return;
                }
                Err(quinn::ReadError::ConnectionLost(c)) => {
                    let _ = tx.send(Err(connection_end(&c, "receiving"))).await;
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(transient(format!("receiving: {e}")))).await;
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
                        let _ = tx
                            .send(Err(transient(format!("bad frame from the receiver: {e}"))))
                            .await;
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Block size of the second, fine comparison of a coarse block that
/// differs: only the 4 KiB blocks that differ travel.
const FINE_BLOCK: u32 = 4096;

/// An extent to compare by digests of `block_size` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Compare {
    disk: u32,
    offset: u64,
    length: u64,
    block_size: u32,
}

/// How long a drain waits for the tracker to stop.
const TRACKER_STOP_TIMEOUT: Duration = Duration::from_secs(120);

/// A planned failover in progress: the tracker is being stopped, then
/// everything its log holds is shipped, then the receiver is told.
struct DrainJob {
    id: u64,
    /// The tracker's stop, running on a blocking thread.
    stopping: Option<tokio::task::JoinHandle<Result<tidemark_tracker::control::Stopped, String>>>,
    /// The stopped tracker's last record, once known.
    last_seq: Option<u64>,
}

/// The extents a connection still has to compare by digests.
#[derive(Default)]
struct Resync {
    /// Extents still to compare.
    queue: VecDeque<Compare>,
}

/// What a connection has going on besides streaming the log.
#[derive(Default)]
struct ConnectionWork {
    resync: Resync,
    /// A drain the receiver asked for.
    drain: Option<DrainJob>,
}

impl Resync {
    /// Queues an extent, in pieces one digest request can cover, compared
    /// first in coarse blocks of `block_size`.
    fn push(&mut self, disk: u32, offset: u64, length: u64, block_size: u32) {
        let mut at = offset;
        let end = offset.saturating_add(length);
        while at < end {
            let n = (end - at).min(MAX_DIGEST_EXTENT);
            self.queue.push_back(Compare {
                disk,
                offset: at,
                length: n,
                block_size,
            });
            at += n;
        }
    }

    /// Queues the coarse blocks that differed for a fine comparison, ahead
    /// of everything else so the extent they came from finishes first.
    fn refine(&mut self, disk: u32, differ: &[Extent]) {
        for e in differ.iter().rev() {
            self.queue.push_front(Compare {
                disk,
                offset: e.offset,
                length: e.length,
                block_size: FINE_BLOCK,
            });
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_connection(
    shared: &mut Shared,
    backoff: &mut Backoff,
    stop: &mut watch::Receiver<bool>,
    conn: &quinn::Connection,
    disks: Vec<DiskInfo>,
    sources: Vec<tidemark_changelog::DiskSource>,
    generation: u32,
    offer: Versions,
) -> SessionEnd {
    let (mut send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return connection_end(&e, "opening a stream"),
    };
    let mut rx = spawn_reader(recv);
    let session_cfg = SessionConfig {
        compression: Compression::Zstd(shared.cfg.compression_level),
        versions: offer,
        ..SessionConfig::default()
    };
    let hello = HelloInfo {
        host: shared.cfg.host.clone(),
        group: shared.cfg.consistency_group.clone(),
        generation,
        disks: disks.clone(),
    };
    let (awaiting, frame) = match AwaitingWelcome::start(hello, session_cfg) {
        Ok(x) => x,
        Err(e) => return permanent(e),
    };
    if let Err(e) = send_frame(shared, &mut send, &frame).await {
        return e;
    }
    let welcome = tokio::select! {
        m = rx.recv() => match m {
            Some(Ok(m)) => m,
            Some(Err(e)) => return e,
            None => return transient("the connection ended before the welcome"),
        },
        _ = tokio::time::sleep(Duration::from_secs(30)) => return transient("no welcome from the receiver within 30 s"),
        _ = stop.changed() => return SessionEnd::Stopped,
    };
    let dir = shared.dir.clone();
    let lookup_error = std::cell::RefCell::new(None);
    let first_after = |seq: u64| {
        let from = if seq == 0 { 0 } else { seq + 1 };
        match first_record_from(&dir, from) {
            Ok(r) => r.map(|(seq, generation)| RecordId { seq, generation }),
            Err(e) => {
                *lookup_error.borrow_mut() = Some(e.to_string());
                None
            }
        }
    };
    let answer = awaiting.answer_version(&welcome);
    let (mut shipping, resume) = match awaiting.handle_message(welcome, first_after) {
        Ok(x) => x,
        Err(e @ ShipperError::OfferOlder { version }) => {
            return SessionEnd::OfferOlder(version, e.to_string())
        }
        Err(e) => {
            if let Some(f) = e.to_frame(answer) {
                let _ = send.write_all(&f).await;
            }
            return classify(e.class(), e.to_string());
        }
    };
    if let Some(e) = lookup_error.into_inner() {
        return permanent(format!("reading the change log: {e}"));
    }
    backoff.reset();
    shared.status.retries = 0;
    shared.status.reason = None;
    tracing::info!(
        receiver = %shared.addr,
        durable = resume.durable.seq,
        from = resume.from_seq,
        protocol = resume.version,
        receiver_software = %resume.receiver_software,
        "connected; shipping"
    );
    shared.status.protocol_version = Some(resume.version);
    shared.status.receiver_software =
        Some(resume.receiver_software.clone()).filter(|s| !s.is_empty());
    let mut tail = match LogTail::open(shared.dir.path(), resume.from_seq) {
        Ok(t) => t,
        Err(e) => return permanent(e),
    };
    let mut syncs: Vec<SyncCursor> = disks
        .iter()
        .map(|d| SyncCursor {
            id: d.id,
            size: d.size,
            next: resume
                .disks
                .iter()
                .find(|s| s.id == d.id)
                .map_or(0, |s| s.synced),
            source: None,
        })
        .collect();
    shared.status.disks = disks
        .iter()
        .zip(&syncs)
        .map(|(d, s)| DiskProgress {
            name: d.name.clone(),
            size: d.size,
            synced: s.next,
            data_bytes: 0,
            rate_bytes_per_sec: 0,
            eta_seconds: (s.next >= s.size).then_some(0),
            started: Some((s.next, Instant::now())),
        })
        .collect();
    shared.status.durable_seq = resume.durable.seq;
    shared.unacked.acked(resume.durable.seq);
    let batch_size = usize::try_from(shared.cfg.batch_size.0).unwrap_or(usize::MAX);
    let chunk_size = shared.cfg.sync_chunk_size.0.max(4096);
    let block_size = u32::try_from(chunk_size).unwrap_or(1 << 20);
    let mut work = ConnectionWork::default();
    for e in &resume.resyncing {
        work.resync.push(e.disk, e.offset, e.length, block_size);
    }
    if !work.resync.queue.is_empty() {
        tracing::info!(
            extents = work.resync.queue.len(),
            "the replica waits for a resync of extents"
        );
    }

    loop {
        // Everything the receiver said so far.
        loop {
            match rx.try_recv() {
                Ok(Ok(msg)) => {
                    if let Err(e) =
                        handle(shared, &mut shipping, &mut send, &sources, &mut work, msg).await
                    {
                        return e;
                    }
                }
                Ok(Err(e)) => return e,
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    return transient("the connection's reader ended")
                }
            }
        }
        let settled = work.resync.queue.is_empty()
            && shipping.pending_digests() == 0
            && syncs.iter().all(|s| s.next >= s.size);
        if let Err(e) =
            advance_drain(shared, &mut shipping, &mut send, &mut work.drain, settled).await
        {
            return e;
        }
        if *stop.borrow() {
            return finish(
                shared,
                &mut shipping,
                &mut send,
                &mut rx,
                &sources,
                &mut work,
            )
            .await;
        }

        let mut progressed = false;
        if shipping.can_send() {
            let batch = tokio::task::block_in_place(|| tail.next_batch(batch_size, Duration::ZERO));
            match batch {
                Ok(Some(batch)) => {
                    shared.status.log_seq = shared.status.log_seq.max(batch.last_seq);
                    let records = match RecordBatch::from_bytes(batch.bytes) {
                        Ok(r) => r,
                        Err(e) => {
                            return permanent(format!("the change log holds a bad record: {e}"))
                        }
                    };
                    let frame = match shipping.send_records(&records) {
                        Ok(f) => f,
                        Err(e) => return classify(e.class(), e.to_string()),
                    };
                    shared.unacked.sent(records.as_bytes());
                    if let Err(e) = send_frame(shared, &mut send, &frame).await {
                        return e;
                    }
                    shared.status.record_bytes += records.byte_len() as u64;
                    shared.status.sent_seq = batch.last_seq;
                    // While the group's initial sync runs, the receiver copies
                    // a resync-needed extent again with the initial sync (it
                    // has no consistent state to protect yet): the disk's
                    // sync position goes back to the extent. Afterwards the
                    // extent is compared by digests.
                    let initial_sync = syncs.iter().any(|s| s.next < s.size);
                    for (disk, offset, length) in batch.resync_needed {
                        match syncs.iter_mut().find(|s| s.id == disk) {
                            Some(s) if initial_sync => s.next = s.next.min(offset),
                            _ => work.resync.push(disk, offset, length, block_size),
                        }
                    }
                    progressed = true;
                }
                Ok(None) => {}
                Err(e) => return permanent(format!("reading the change log: {e}")),
            }
            if !progressed && shipping.pending_digests() == 0 {
                if let Some(c) = work.resync.queue.pop_front() {
                    shared.status.state = State::Resyncing;
                    let frame = match shipping.send_digest_request(
                        c.disk,
                        c.offset,
                        c.length,
                        c.block_size,
                    ) {
                        Ok(f) => f,
                        Err(e) => return classify(e.class(), e.to_string()),
                    };
                    if let Err(e) = send_frame(shared, &mut send, &frame).await {
                        return e;
                    }
                    progressed = true;
                }
            }
            if !progressed {
                if let Some(s) = syncs.iter_mut().find(|s| s.next < s.size) {
                    shared.status.state = State::InitialSync;
                    if s.source.is_none() {
                        let Some(src) = sources.iter().find(|d| d.id == s.id) else {
                            return permanent(format!("disk {} is not in the disks file", s.id));
                        };
                        match SourceDisk::open(&src.path, s.size) {
                            Ok(d) => s.source = Some(d),
                            Err(e) => {
                                return transient(format!(
                                    "opening disk {} ({}) for the initial sync: {e}",
                                    src.name,
                                    src.path.display()
                                ))
                            }
                        }
                    }
                    let (offset, len) = (s.next, chunk_size.min(s.size - s.next));
                    let source = s.source.as_ref().expect("opened above");
                    let content = match tokio::task::block_in_place(|| source.chunk(offset, len)) {
                        Ok(c) => c,
                        Err(e) => {
                            return transient(format!("reading disk {} at {offset}: {e}", s.id))
                        }
                    };
                    let data = match content {
                        ChunkContent::Zero(n) => ChunkData::Zero(n),
                        ChunkContent::Data(d) => {
                            if let Some(p) = shared.status.disks.get_mut(s.id as usize) {
                                p.data_bytes += d.len() as u64;
                            }
                            ChunkData::Data(d)
                        }
                    };
                    let frame =
                        match shipping.send_chunk(s.id, offset, ChunkPurpose::InitialSync, data) {
                            Ok(f) => f,
                            Err(e) => return classify(e.class(), e.to_string()),
                        };
                    if let Err(e) = send_frame(shared, &mut send, &frame).await {
                        return e;
                    }
                    s.next += len;
                    progressed = true;
                }
            }
        }
        if !progressed {
            if work.resync.queue.is_empty()
                && shipping.pending_digests() == 0
                && syncs.iter().all(|s| s.next >= s.size)
            {
                shared.status.state = State::Protected;
            }
            shared.publish(false);
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Ok(msg)) => {
                        if let Err(e) = handle(shared, &mut shipping, &mut send, &sources, &mut work, msg).await {
                            return e;
                        }
                    }
                    Some(Err(e)) => return e,
                    None => return transient("the connection's reader ended"),
                },
                _ = shared.log_changed.notified() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        shared.publish(false);
    }
}

/// Handles one message from the receiver.
async fn handle(
    shared: &mut Shared,
    shipping: &mut Shipping,
    send: &mut quinn::SendStream,
    sources: &[tidemark_changelog::DiskSource],
    work: &mut ConnectionWork,
    msg: Received,
) -> Result<(), SessionEnd> {
    match shipping.handle_message(msg) {
        Ok(ShipperEvent::Acked { durable, disks, .. }) => {
            if durable.seq > shared.cursor {
                let dir = shared.dir.clone();
                tokio::task::block_in_place(|| write_cursor(&dir, durable.seq))
                    .map_err(|e| permanent(format!("writing the log cursor: {e}")))?;
                shared.cursor = durable.seq;
            }
            shared.status.durable_seq = durable.seq;
            if let Some(ts) = shared.unacked.acked(durable.seq) {
                let now = tidemark_changelog::now_ns();
                shared.metrics.lag.observe_ns(now.saturating_sub(ts));
            }
            for d in disks {
                if let Some(p) = shared.status.disks.get_mut(d.id as usize) {
                    p.advance(d.synced);
                }
            }
            Ok(())
        }
        Ok(ShipperEvent::Digests(reply)) => {
            resync_extent(shared, shipping, send, sources, &mut work.resync, reply).await
        }
        Ok(ShipperEvent::DrainRequested { id }) => {
            if work.drain.as_ref().is_some_and(|d| d.id == id) {
                return Ok(());
            }
            let control = shared.cfg.tracker_control_socket.clone();
            tracing::info!(
                id,
                control = %control.display(),
                "planned failover: the replica site asks to drain; stopping the tracker"
            );
            let stopping = tokio::task::spawn_blocking(move || {
                tidemark_tracker::control::stop_tracker(&control, TRACKER_STOP_TIMEOUT)
            });
            work.drain = Some(DrainJob {
                id,
                stopping: Some(stopping),
                last_seq: None,
            });
            Ok(())
        }
        Err(e) => Err(classify(e.class(), e.to_string())),
    }
}

/// Compares the receiver's digests of an extent with the disk. Coarse
/// blocks that differ are queued for a second comparison in 4 KiB blocks
/// and the rest of the extent is marked in sync; at 4 KiB the blocks that
/// differ are sent and the extent is marked in sync. So what travels is
/// the 4 KiB blocks that differ, plus digests.
async fn resync_extent(
    shared: &mut Shared,
    shipping: &mut Shipping,
    send: &mut quinn::SendStream,
    sources: &[tidemark_changelog::DiskSource],
    resync: &mut Resync,
    reply: DigestReply,
) -> Result<(), SessionEnd> {
    let req = reply.request;
    let Some(src) = sources.iter().find(|d| d.id == req.disk) else {
        return Err(permanent(format!("resync of unknown disk {}", req.disk)));
    };
    // Read once: the digests and the blocks sent come from the same bytes,
    // read after everything sent so far was written to the disk.
    let data = tokio::task::block_in_place(|| {
        SourceDisk::open(&src.path, src.size).and_then(|d| d.read(req.offset, req.length))
    })
    .map_err(|e| transient(format!("reading disk {} for resync: {e}", src.name)))?;
    let local = tidemark_wire::block_digests(&data, req.block_size);
    let Some(differ) = differing_blocks(&req, &local, &reply.digests) else {
        return Err(permanent("digests count does not match the request"));
    };
    if req.block_size > FINE_BLOCK {
        shared.status.resync_blocks_compared += local.len() as u64;
        // The differing blocks stay pending at the receiver until their
        // fine comparison ends; everything between them is in sync now.
        let end = req.offset + req.length;
        let mut at = req.offset;
        for e in differ.iter().chain(std::iter::once(&Extent {
            offset: end,
            length: 0,
        })) {
            if e.offset > at {
                let frame = shipping
                    .send_resync_done(req.disk, at, e.offset - at)
                    .map_err(|e| classify(e.class(), e.to_string()))?;
                send_frame(shared, send, &frame).await?;
            }
            at = e.offset + e.length;
        }
        resync.refine(req.disk, &differ);
        return Ok(());
    }
    for ext in differ {
        let start = (ext.offset - req.offset) as usize;
        let bytes = data[start..start + ext.length as usize].to_vec();
        shared.status.resync_blocks_sent += ext.length.div_ceil(u64::from(req.block_size));
        shared.status.resync_bytes_sent += ext.length;
        let frame = shipping
            .send_chunk(
                req.disk,
                ext.offset,
                ChunkPurpose::Resync,
                ChunkData::Data(bytes),
            )
            .map_err(|e| classify(e.class(), e.to_string()))?;
        send_frame(shared, send, &frame).await?;
    }
    let frame = shipping
        .send_resync_done(req.disk, req.offset, req.length)
        .map_err(|e| classify(e.class(), e.to_string()))?;
    send_frame(shared, send, &frame).await
}

/// Moves a drain on: once the tracker has stopped, learns the log's last
/// record; once that record is sent and no sync or resync is left
/// (`settled`), tells the receiver. A tracker that cannot be stopped is
/// reported to the receiver, and replication goes on.
async fn advance_drain(
    shared: &mut Shared,
    shipping: &mut Shipping,
    send: &mut quinn::SendStream,
    drain: &mut Option<DrainJob>,
    settled: bool,
) -> Result<(), SessionEnd> {
    let Some(job) = drain.as_mut() else {
        return Ok(());
    };
    if let Some(stopping) = job.stopping.as_ref() {
        if !stopping.is_finished() {
            return Ok(());
        }
        let stopping = job.stopping.take().expect("checked above");
        let stopped = match stopping.await {
            Ok(r) => r,
            Err(e) => Err(format!("stopping the tracker: {e}")),
        };
        let last = stopped.and_then(|how| {
            let dir = shared.dir.clone();
            let report = tokio::task::block_in_place(|| tidemark_changelog::check(&dir))
                .map_err(|e| format!("reading the log after the tracker stopped: {e}"))?;
            if !report.is_clean() {
                return Err("the log is damaged: run `tidemark log check` on it".to_string());
            }
            tracing::info!(?how, last_seq = ?report.last_seq, "tracker stopped; shipping what is left");
            Ok(report.last_seq.unwrap_or(0))
        });
        match last {
            Ok(seq) => job.last_seq = Some(seq),
            Err(why) => {
                tracing::warn!(reason = %why, "cannot drain the group");
                let id = job.id;
                *drain = None;
                let frame = shipping
                    .send_drained(id, 0, &why)
                    .map_err(|e| classify(e.class(), e.to_string()))?;
                return send_frame(shared, send, &frame).await;
            }
        }
    }
    let Some(last) = job.last_seq else {
        return Ok(());
    };
    if !settled || shipping.last_sent_seq() < last {
        return Ok(());
    }
    let id = job.id;
    *drain = None;
    let frame = shipping
        .send_drained(id, shipping.last_sent_seq(), "")
        .map_err(|e| classify(e.class(), e.to_string()))?;
    tracing::info!(
        id,
        last_seq = last,
        "drained: every record is sent; the receiver is told"
    );
    send_frame(shared, send, &frame).await
}

/// A clean stop: wait a little for the Acks of what is in flight, so the
/// cursor is as far as it can be, then close.
async fn finish(
    shared: &mut Shared,
    shipping: &mut Shipping,
    send: &mut quinn::SendStream,
    rx: &mut mpsc::Receiver<Result<Received, SessionEnd>>,
    sources: &[tidemark_changelog::DiskSource],
    work: &mut ConnectionWork,
) -> SessionEnd {
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while shipping.in_flight_bytes() > 0 {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(msg))) => {
                if handle(shared, shipping, send, sources, work, msg)
                    .await
                    .is_err()
                {
                    break;
                }
            }
            _ => break,
        }
    }
    let _ = send.finish();
    SessionEnd::Stopped
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_changelog::Entry;

    fn records(seqs: std::ops::RangeInclusive<u64>) -> Vec<u8> {
        let mut out = Vec::new();
        for seq in seqs {
            let e = Entry::barrier(seq * 1_000);
            out.extend_from_slice(&e.encode(seq, 1));
        }
        out
    }

    #[test]
    fn unacked_tracks_the_oldest_record_and_forgets_resent_ones() {
        let mut u = Unacked::default();
        assert_eq!(u.oldest(), None);
        u.sent(&records(1..=3));
        u.sent(&records(4..=5));
        assert_eq!(u.oldest(), Some(1_000));
        assert_eq!(u.acked(2), Some(1_000), "the ack covered record 1");
        assert_eq!(u.oldest(), Some(3_000));
        // A reconnect sends 3..=5 again: no duplicates.
        u.sent(&records(3..=5));
        assert_eq!(u.0.len(), 3);
        assert_eq!(u.acked(2), None, "nothing new acknowledged");
        assert_eq!(u.acked(5), Some(3_000));
        assert_eq!(u.oldest(), None, "caught up");
        // Garbage is ignored, not a panic.
        u.sent(&[0xff; 10]);
        assert_eq!(u.oldest(), None);
    }

    #[test]
    fn metrics_show_state_lag_and_error_class() {
        let status = ShipperStatus {
            format: crate::status::STATUS_FORMAT,
            host: "db1".into(),
            group: "g".into(),
            state: State::Protected,
            reason: None,
            durable_seq: 7,
            sent_seq: 9,
            log_seq: 9,
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
                started: None,
            }],
            resync_blocks_compared: 0,
            resync_blocks_sent: 0,
            resync_bytes_sent: 0,
            updated_unix: 0,
            retries_total: 2,
            last_error_class: Some(FailureClass::Transient),
            oldest_unacked_ns: Some(1_000_000_000),
            rpo_target_seconds: 300.0,
            protocol_version: Some(2),
            receiver_software: None,
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
            "tidemark_shipper_last_error_info{host=\"db1\",group=\"g\",class=\"transient\"} 1",
        ] {
            assert!(t.contains(want), "missing {want:?} in\n{t}");
        }
    }
}
