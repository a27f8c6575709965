//! The shipper's decisions for one connection, as a pure state machine
//! (in the manner of quinn-proto): no sockets, no files, no clock of its
//! own. The caller feeds it what happened and asks it what to do:
//!
//! - inputs: [`ShipperCore::handle_message`] (a receiver message),
//!   [`ShipperCore::handle_first_record`], [`ShipperCore::handle_log_batch`]
//!   and [`ShipperCore::handle_chunk`] (answers to its [`Need`]s),
//!   [`ShipperCore::handle_log_changed`], [`ShipperCore::handle_drain_ready`],
//!   [`ShipperCore::stop`] and [`ShipperCore::handle_timeout`];
//! - outputs: [`ShipperCore::poll_transmit`] (frames to send, in order),
//!   [`ShipperCore::poll_need`] (read the log, read a disk),
//!   [`ShipperCore::poll_event`] (cursor advances, drain requests, how the
//!   session ended), [`ShipperCore::poll_timeout`] and
//!   [`ShipperCore::status`] (state, rate and ETA as of a given instant).
//!
//! Every instant comes from the caller, so a simulation can drive the same
//! code with a virtual clock.
//!
//! Order of work, each time the core is asked what it needs:
//! 1. the replica's digests of an extent that arrived: read that extent;
//! 2. when the window has room, the log's next records (a resync-needed
//!    record rewinds the initial sync of its disk while that sync runs,
//!    else queues its extent for comparison by digests);
//! 3. when the log is drained to the last record sent: a digest request
//!    for the next queued extent (one at a time);
//! 4. else the next initial-sync chunk, read right after the log was
//!    drained to the last record sent, so the receiver applies it between
//!    that record and the next;
//! 5. else nothing until the log changes, the receiver speaks, or
//!    [`CoreConfig::idle_poll`] passes.
//!
//! Initial-sync chunks are read ahead: up to [`CoreConfig::read_ahead`] of
//! them are asked for before the first is answered, so the caller can
//! read the next while the last is compressed and sent. They are answered
//! in the order asked. Every one of them is asked for while the log is
//! drained to the last record sent and nothing else is sent until they are
//! answered: records the log hands over meanwhile wait behind them (a
//! chunk read before a write must not be applied after that write's
//! record), and so does the rewind of a resync-needed record among them.
//! The chunks read ahead are therefore sent, and applied, before the
//! record that rewinds their disk, exactly where they were read.
//!
//! The group is protected only once the receiver has *acknowledged* every
//! disk's initial sync to its end and no extent waits for a resync: a
//! chunk sent is not yet a chunk held.

use crate::message::{
    ChunkData, ChunkPurpose, DiskSync, Received, RecordBatch, RecordId, VmSpecReply,
};
use crate::receiver::DrainRefused;
use crate::shipper::{
    block_digests, differing_blocks, AwaitingWelcome, DigestReply, HelloInfo, Resume,
    ShipperConfig, ShipperError, ShipperEvent, Shipping,
};
use crate::ErrorClass;
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use tidemark_changelog::record::{Header, Kind};
use tidemark_changelog::{DiskId, Extent, Seq};

/// Block size of the second, fine comparison of a coarse block that
/// differs: only the 4 KiB blocks that differ travel.
pub const FINE_BLOCK: u32 = 4096;

/// Largest extent one digest request covers: the caller reads it into
/// memory to compare and send.
pub const MAX_DIGEST_EXTENT: u64 = 16 << 20;

/// Tuning of the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreConfig {
    /// The session's window, compression and versions.
    pub session: ShipperConfig,
    /// Most record bytes asked of the log at once.
    pub batch_bytes: usize,
    /// Bytes of one initial-sync chunk (also the coarse block size of a
    /// resync comparison).
    pub chunk_bytes: u64,
    /// Initial-sync chunks asked for and not answered yet, at most (at
    /// least 1). Chunks answered are sent even when the window filled up
    /// meanwhile: it can be exceeded by this many chunks.
    pub read_ahead: usize,
    /// How long to wait for the Welcome.
    pub welcome_timeout: Duration,
    /// A receiver silent this long while frames are in flight is taken for
    /// dead: the session ends (transient) and the caller reconnects.
    pub peer_timeout: Duration,
    /// How often the log is asked again without a change notification.
    pub idle_poll: Duration,
    /// How long a stopping session waits for the Acks of what is in flight.
    pub stop_grace: Duration,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            session: ShipperConfig::default(),
            batch_bytes: 1 << 20,
            chunk_bytes: 1 << 20,
            read_ahead: 4,
            welcome_timeout: Duration::from_secs(30),
            peer_timeout: Duration::from_secs(120),
            idle_poll: Duration::from_secs(1),
            stop_grace: Duration::from_secs(5),
        }
    }
}

/// What the core needs the caller to read. At most one log or resync
/// need is outstanding (answer it before asking again); initial-sync
/// chunks are asked for ahead, up to [`CoreConfig::read_ahead`], each once,
/// and answered in the order asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The first record the log holds with a sequence number above `after`
    /// (for 0: its oldest): answer with [`ShipperCore::handle_first_record`].
    FirstRecordAfter {
        /// The replica's durable record.
        after: Seq,
    },
    /// The log's next records after the last one handed over (the first
    /// time: from [`CoreEvent::Connected`]'s `from_seq`), at most
    /// `max_bytes` (at least one record): answer with
    /// [`ShipperCore::handle_log_batch`], `None` when there is none yet.
    LogBatch {
        /// Most record bytes wanted.
        max_bytes: usize,
    },
    /// The disk's bytes now: answer with [`ShipperCore::handle_chunk`]
    /// ([`ChunkData::Zero`] allowed for an initial-sync chunk that reads as
    /// zeroes).
    Chunk {
        /// Disk id.
        disk: DiskId,
        /// First byte.
        offset: u64,
        /// Bytes.
        length: u64,
        /// Why: an initial-sync chunk, or an extent to compare with the
        /// replica's digests.
        purpose: ChunkPurpose,
    },
}

/// The state of the group as the core sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No session yet (waiting for the Welcome).
    Connecting,
    /// Some disk's initial sync is not acknowledged to its end.
    InitialSync,
    /// Extents are being compared by digests.
    Resyncing,
    /// Every disk acknowledged synced and nothing waits for a resync.
    Protected,
}

/// Initial-sync progress of one disk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskStatus {
    /// Disk id.
    pub id: DiskId,
    /// Disk size.
    pub size: u64,
    /// Bytes the receiver acknowledged holding.
    pub synced: u64,
    /// Next byte to send (chunks read ahead are not sent yet).
    pub sent: u64,
    /// Bytes sent as data (not as zero ranges) in this session.
    pub data_bytes: u64,
    /// Acknowledged bytes per second since the session started (0 until
    /// half a second has passed with progress).
    pub rate_bytes_per_sec: u64,
    /// Seconds to the end at that rate (`Some(0)` when synced).
    pub eta_seconds: Option<u64>,
}

/// A snapshot of the session, computed for a given instant.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreStatus {
    /// The state.
    pub phase: Phase,
    /// The session's protocol version, once agreed.
    pub version: Option<u16>,
    /// The replica's durable record.
    pub durable_seq: Seq,
    /// The last record sent.
    pub sent_seq: Seq,
    /// The newest record the log handed over.
    pub log_seq: Seq,
    /// Each disk's initial sync.
    pub disks: Vec<DiskStatus>,
    /// Bytes of frames handed to [`ShipperCore::poll_transmit`].
    pub wire_bytes: u64,
    /// Record bytes sent (before compression).
    pub record_bytes: u64,
    /// Initial-sync bytes sent as data (not as zero ranges).
    pub sync_data_bytes: u64,
    /// Coarse resync blocks compared by digests.
    pub resync_blocks_compared: u64,
    /// Fine resync blocks that differed and were sent.
    pub resync_blocks_sent: u64,
    /// Bytes of those blocks.
    pub resync_bytes_sent: u64,
    /// Timestamp (ns) of the oldest record sent and not yet durable.
    pub oldest_unacked_ns: Option<u64>,
    /// Bytes of resync extents not yet compared (0: no resync waits).
    pub resync_bytes_left: u64,
}

/// What the caller must act on.
#[derive(Debug)]
pub enum CoreEvent {
    /// The Welcome was accepted: the session runs in `resume.version`,
    /// the log is read from `resume.from_seq`.
    Connected(Resume),
    /// The replica made more durable: advance the log cursor to
    /// `durable.seq` (segments below it may be recycled).
    CursorAdvanced {
        /// The durable record.
        durable: RecordId,
        /// Timestamps (ns) of the records this Ack made durable, oldest
        /// first: the lag of each is one observation (an Ack covers
        /// thousands of records at high rates; its oldest alone would
        /// understate how many records waited that long).
        acked_ns: Vec<u64>,
    },
    /// The replica site asks for a planned failover: stop the tracker,
    /// then call [`ShipperCore::handle_drain_ready`].
    DrainRequested {
        /// The request's id.
        id: u64,
    },
    /// The session ended on a transient failure: close the connection
    /// (after sending what [`ShipperCore::poll_transmit`] still has),
    /// back off, reconnect. [`ShipperError::OfferOlder`] says reconnect at
    /// once, offering only that version.
    Retry(ShipperError),
    /// The session ended on a permanent failure: replication stops, the
    /// group is critical.
    Critical(ShipperError),
    /// A stop ended the session cleanly.
    Stopped,
    /// What became of the VM spec given to [`ShipperCore::handle_vm_spec`].
    VmSpec(VmSpecNews),
}

/// What became of the group's VM spec in this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmSpecNews {
    /// The receiver answered: kept (from which record) or refused (why).
    Answered(VmSpecReply),
    /// The session's protocol version is older than the VM spec message:
    /// the receiver is of an older release and cannot keep it.
    NotCarried {
        /// The session's version.
        version: u16,
    },
}

/// One initial-sync cursor.
#[derive(Debug, Clone, Copy)]
struct SyncCursor {
    id: DiskId,
    size: u64,
    /// Next byte to ask for.
    next: u64,
    /// Next byte to send: `next` less the chunks read ahead.
    sent: u64,
    /// Acknowledged by the receiver.
    acked: u64,
    /// (acked, when) as the session started: the rate's base.
    base: Option<(u64, Instant)>,
    /// Bytes sent as data (not as zero ranges) in this session.
    data_bytes: u64,
}

/// An initial-sync chunk asked for and not answered yet.
#[derive(Debug, Clone, Copy)]
struct Ahead {
    disk: DiskId,
    offset: u64,
    length: u64,
}

/// An extent to compare by digests of `block_size` blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Compare {
    disk: DiskId,
    offset: u64,
    length: u64,
    block_size: u32,
}

enum State {
    Awaiting {
        awaiting: Box<AwaitingWelcome>,
        welcome: Option<Box<Received>>,
    },
    Shipping(Box<Shipping>),
    Ended,
}

/// A drain in progress.
#[derive(Debug, Clone, Copy)]
struct Drain {
    id: u64,
    /// The stopped tracker's last record, once known.
    last_seq: Option<Seq>,
}

/// The shipper's end of one connection, with every decision the daemon
/// used to make itself. See the module documentation.
pub struct ShipperCore {
    config: CoreConfig,
    state: State,
    started: Instant,
    /// The version to answer a refused Welcome in.
    answer_version: u16,
    disks: Vec<SyncCursor>,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<CoreEvent>,
    outstanding: Option<Need>,
    /// Initial-sync chunks asked for and not answered, in the order asked.
    ahead: VecDeque<Ahead>,
    /// Records the log handed over while chunks were read ahead: sent
    /// after those chunks.
    held: Option<RecordBatch>,
    /// The log returned nothing since the last action: try the rest.
    log_drained: bool,
    /// When the log is asked again without a notification.
    next_poll: Option<Instant>,
    /// When the receiver last spoke (or the session started).
    last_heard: Instant,
    /// When a timeout first saw frames in flight since the receiver last
    /// spoke: silence counts from the later of the two, so a receiver
    /// that had nothing to answer for a while is not taken for dead the
    /// moment a frame is sent.
    waiting_since: Option<Instant>,
    /// A stop: the instant after which the session ends regardless.
    stopping: Option<Instant>,
    resync: VecDeque<Compare>,
    /// Digest replies whose extent is to be read, and the one being read.
    replies: VecDeque<DigestReply>,
    reading: Option<DigestReply>,
    drain: Option<Drain>,
    /// The VM spec to send once the session runs.
    vm_spec: Option<String>,
    /// (seq, timestamp ns) of records sent, not yet durable.
    unacked: VecDeque<(Seq, u64)>,
    log_seq: Seq,
    wire_bytes: u64,
    record_bytes: u64,
    sync_data_bytes: u64,
    resync_blocks_compared: u64,
    resync_blocks_sent: u64,
    resync_bytes_sent: u64,
}

impl ShipperCore {
    /// Starts a session on a new connection at `now`: the Hello is the
    /// first frame to transmit.
    pub fn new(
        hello: HelloInfo,
        config: CoreConfig,
        now: Instant,
    ) -> Result<ShipperCore, ShipperError> {
        let disks = hello
            .disks
            .iter()
            .map(|d| SyncCursor {
                id: d.id,
                size: d.size,
                next: 0,
                sent: 0,
                acked: 0,
                base: None,
                data_bytes: 0,
            })
            .collect();
        let (awaiting, frame) = AwaitingWelcome::start(hello, config.session)?;
        let mut core = ShipperCore {
            config,
            state: State::Awaiting {
                awaiting: Box::new(awaiting),
                welcome: None,
            },
            started: now,
            answer_version: 1,
            disks,
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            outstanding: None,
            ahead: VecDeque::new(),
            held: None,
            log_drained: false,
            next_poll: None,
            last_heard: now,
            waiting_since: None,
            stopping: None,
            resync: VecDeque::new(),
            replies: VecDeque::new(),
            reading: None,
            drain: None,
            vm_spec: None,
            unacked: VecDeque::new(),
            log_seq: Seq::ZERO,
            wire_bytes: 0,
            record_bytes: 0,
            sync_data_bytes: 0,
            resync_blocks_compared: 0,
            resync_blocks_sent: 0,
            resync_bytes_sent: 0,
        };
        core.queue(frame);
        Ok(core)
    }

    /// Whether the session has ended (its last event is queued).
    pub fn is_ended(&self) -> bool {
        matches!(self.state, State::Ended)
    }

    /// The session's protocol version, once agreed.
    pub fn version(&self) -> Option<u16> {
        match &self.state {
            State::Shipping(s) => Some(s.version()),
            _ => None,
        }
    }

    /// Bytes sent and not yet consumed by the receiver.
    pub fn in_flight_bytes(&self) -> u64 {
        match &self.state {
            State::Shipping(s) => s.in_flight_bytes(),
            _ => 0,
        }
    }

    fn queue(&mut self, frame: Vec<u8>) {
        self.wire_bytes += frame.len() as u64;
        self.transmit.push_back(frame);
    }

    /// Ends the session: an Error frame for the receiver when the protocol
    /// has one, then the event.
    fn fail(&mut self, e: ShipperError) {
        if !self.is_ended() {
            self.end_with(e);
        }
    }

    fn end_with(&mut self, e: ShipperError) {
        let version = self.version().unwrap_or(self.answer_version);
        if let Some(f) = e.to_frame(version) {
            self.queue(f);
        }
        self.state = State::Ended;
        self.forget_needs();
        self.events.push_back(match e.class() {
            ErrorClass::Permanent => CoreEvent::Critical(e),
            ErrorClass::Transient => CoreEvent::Retry(e),
        });
    }

    /// The next frame to send, in order.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next event to act on.
    pub fn poll_event(&mut self) -> Option<CoreEvent> {
        self.events.pop_front()
    }

    /// The next instant [`ShipperCore::handle_timeout`] wants to be called
    /// at.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.state {
            State::Ended => None,
            State::Awaiting { .. } => Some(self.started + self.config.welcome_timeout),
            State::Shipping(s) => {
                let mut t = self.next_poll;
                if s.in_flight_bytes() > 0 {
                    // Until a timeout has seen the frames in flight, one is
                    // due at once to start counting.
                    let dead = self
                        .waiting_since
                        .map_or(self.last_heard, |w| w + self.config.peer_timeout);
                    t = Some(t.map_or(dead, |t| t.min(dead)));
                }
                if let Some(g) = self.stopping {
                    t = Some(t.map_or(g, |t| t.min(g)));
                }
                t
            }
        }
    }

    /// Time has passed to `now`: timeouts fire.
    pub fn handle_timeout(&mut self, now: Instant) {
        match &self.state {
            State::Ended => {}
            State::Awaiting { .. } => {
                if now >= self.started + self.config.welcome_timeout {
                    self.fail(ShipperError::NoWelcome {
                        waited: self.config.welcome_timeout,
                    });
                }
            }
            State::Shipping(s) => {
                if self.stopping.is_some_and(|g| now >= g) {
                    self.end_stopped();
                    return;
                }
                if s.in_flight_bytes() > 0 {
                    let since = *self.waiting_since.get_or_insert(now);
                    if now >= since + self.config.peer_timeout {
                        let silent = now.saturating_duration_since(self.last_heard);
                        self.fail(ShipperError::PeerSilent { silent });
                        return;
                    }
                }
                if self.next_poll.is_some_and(|t| now >= t) {
                    self.next_poll = None;
                    self.log_drained = false;
                }
            }
        }
    }

    /// The log may hold new records.
    pub fn handle_log_changed(&mut self) {
        self.log_drained = false;
    }

    /// Stop at `now`: no new work; the session ends once what is in flight
    /// is acknowledged or [`CoreConfig::stop_grace`] has passed.
    pub fn stop(&mut self, now: Instant) {
        match self.state {
            State::Ended => {}
            State::Shipping(_) => {
                if self.stopping.is_none() {
                    self.stopping = Some(now + self.config.stop_grace);
                }
                self.forget_needs();
                self.check_stopped();
            }
            State::Awaiting { .. } => self.end_stopped(),
        }
    }

    /// No need is answered any more: answers to those asked are ignored,
    /// and records held behind chunks read ahead are not sent (the next
    /// session sends them again from the durable record).
    fn forget_needs(&mut self) {
        self.outstanding = None;
        self.ahead.clear();
        self.held = None;
    }

    fn end_stopped(&mut self) {
        self.state = State::Ended;
        self.forget_needs();
        self.events.push_back(CoreEvent::Stopped);
    }

    fn check_stopped(&mut self) {
        if self.stopping.is_some() && self.in_flight_bytes() == 0 {
            self.end_stopped();
        }
    }

    /// A message from the receiver, at `now`.
    pub fn handle_message(&mut self, received: Received, now: Instant) {
        self.last_heard = now;
        self.waiting_since = None;
        self.log_drained = false;
        match &mut self.state {
            State::Ended => {}
            State::Awaiting { awaiting, welcome } => {
                if welcome.is_some() {
                    // Only an Ack or Digests could follow, and nothing was
                    // sent that they could answer.
                    let name = received.message.msg_type().name();
                    self.fail(ShipperError::Protocol(format!(
                        "{name} before the session started"
                    )));
                    return;
                }
                self.answer_version = awaiting.answer_version(&received);
                let after = match &received.message {
                    crate::Message::Welcome { durable_seq, .. } => Some(*durable_seq),
                    _ => None,
                };
                *welcome = Some(Box::new(received));
                self.outstanding = Some(Need::FirstRecordAfter {
                    after: after.unwrap_or(Seq::ZERO),
                });
                // A refusal needs no lookup: decide at once.
                if after.is_none() {
                    self.handle_first_record(None, now);
                }
            }
            State::Shipping(s) => match s.handle_message(received) {
                Ok(ev) => self.on_event(ev, now),
                Err(e) => self.fail(e),
            },
        }
    }

    /// The answer to [`Need::FirstRecordAfter`], at `now`.
    pub fn handle_first_record(&mut self, first: Option<RecordId>, now: Instant) {
        if !matches!(self.outstanding, Some(Need::FirstRecordAfter { .. })) {
            return;
        }
        self.outstanding = None;
        let State::Awaiting { welcome, .. } = &mut self.state else {
            return;
        };
        let Some(welcome) = welcome.take() else {
            return;
        };
        let State::Awaiting { awaiting, .. } = std::mem::replace(&mut self.state, State::Ended)
        else {
            unreachable!("matched above")
        };
        match awaiting.handle_message(*welcome, |_| first) {
            Ok((shipping, resume)) => {
                self.state = State::Shipping(Box::new(shipping));
                for d in &mut self.disks {
                    let synced = resume
                        .disks
                        .iter()
                        .find(|s| s.id == d.id)
                        .map_or(0, |s| s.synced);
                    d.next = synced;
                    d.sent = synced;
                    d.acked = synced;
                    d.base = Some((synced, now));
                }
                self.log_seq = resume.durable.seq;
                for e in &resume.resyncing {
                    self.push_resync(e.disk, e.offset, e.length);
                }
                self.events.push_back(CoreEvent::Connected(resume));
                self.send_vm_spec();
            }
            Err(e) => self.end_with(e),
        }
    }

    /// The group's VM spec, read at the session's start or changed since:
    /// it is sent as soon as the session runs (a newer text given before
    /// then replaces it), in stream order with the records, and the
    /// receiver's answer comes as [`CoreEvent::VmSpec`]. The caller gives
    /// it again only when it changes (a new session starts without it).
    pub fn handle_vm_spec(&mut self, text: String) {
        self.vm_spec = Some(text);
        self.send_vm_spec();
    }

    fn send_vm_spec(&mut self) {
        if self.stopping.is_some() {
            return;
        }
        let State::Shipping(s) = &mut self.state else {
            return;
        };
        let Some(text) = self.vm_spec.take() else {
            return;
        };
        if !s.carries_vm_spec() {
            let version = s.version();
            self.events
                .push_back(CoreEvent::VmSpec(VmSpecNews::NotCarried { version }));
            return;
        }
        match s.send_vm_spec(&text) {
            Ok(f) => self.queue(f),
            Err(e) => self.fail(e),
        }
    }

    fn on_event(&mut self, ev: ShipperEvent, now: Instant) {
        match ev {
            ShipperEvent::Acked { durable, disks, .. } => {
                self.acked(&disks, now);
                let done = self
                    .unacked
                    .iter()
                    .take_while(|&&(seq, _)| seq <= durable.seq)
                    .count();
                let acked_ns = self.unacked.drain(..done).map(|(_, ts)| ts).collect();
                self.events
                    .push_back(CoreEvent::CursorAdvanced { durable, acked_ns });
                self.check_stopped();
            }
            ShipperEvent::Digests(reply) => self.replies.push_back(reply),
            ShipperEvent::DrainRequested { id } => {
                if self.drain.is_some_and(|d| d.id == id) {
                    return;
                }
                self.drain = Some(Drain { id, last_seq: None });
                self.events.push_back(CoreEvent::DrainRequested { id });
            }
            ShipperEvent::VmSpec(reply) => self
                .events
                .push_back(CoreEvent::VmSpec(VmSpecNews::Answered(reply))),
        }
    }

    fn acked(&mut self, disks: &[DiskSync], now: Instant) {
        for s in disks {
            if let Some(d) = self.disks.iter_mut().find(|d| d.id == s.id) {
                d.acked = s.synced.min(d.size);
                d.base.get_or_insert((d.acked, now));
            }
        }
    }

    /// The tracker stopped for a drain: its log ends at `last_seq`
    /// (`Err`: why the group cannot be drained, sent to the receiver as
    /// is; replication goes on).
    pub fn handle_drain_ready(&mut self, id: u64, last_seq: Result<Seq, &DrainRefused>) {
        if self.drain.is_none_or(|d| d.id != id) {
            return;
        }
        match last_seq {
            Ok(seq) => {
                self.drain = Some(Drain {
                    id,
                    last_seq: Some(seq),
                })
            }
            Err(why) => {
                self.drain = None;
                if let State::Shipping(s) = &mut self.state {
                    match s.send_drained(id, Seq::ZERO, &why.reason) {
                        Ok(f) => self.queue(f),
                        Err(e) => self.fail(e),
                    }
                }
            }
        }
    }

    /// Whether no initial sync or resync is left to send.
    fn settled(&self) -> bool {
        self.resync.is_empty()
            && self.replies.is_empty()
            && self.reading.is_none()
            && self.ahead.is_empty()
            && self.held.is_none()
            && self.pending_digests() == 0
            && self.disks.iter().all(|d| d.next >= d.size)
    }

    fn pending_digests(&self) -> usize {
        match &self.state {
            State::Shipping(s) => s.pending_digests(),
            _ => 0,
        }
    }

    fn advance_drain(&mut self) {
        let Some(Drain {
            id,
            last_seq: Some(last),
        }) = self.drain
        else {
            return;
        };
        let settled = self.settled();
        let State::Shipping(s) = &mut self.state else {
            return;
        };
        if !settled || s.last_sent_seq() < last {
            return;
        }
        self.drain = None;
        let sent = s.last_sent_seq();
        match s.send_drained(id, sent, "") {
            Ok(f) => self.queue(f),
            Err(e) => self.fail(e),
        }
    }

    /// What to read next, if anything (see the module documentation for
    /// the order). Returns the outstanding log or resync need again until
    /// it is answered; each initial-sync chunk read ahead is returned once.
    pub fn poll_need(&mut self) -> Option<Need> {
        if let Some(n) = self.outstanding {
            return Some(n);
        }
        if self.stopping.is_some() {
            return None;
        }
        self.advance_drain();
        let State::Shipping(s) = &mut self.state else {
            return None;
        };
        let can_send = s.can_send();
        let pending_digests = s.pending_digests();
        // Anything else waits for the chunks read ahead: it goes after them.
        let reading_ahead = !self.ahead.is_empty();
        if !reading_ahead {
            if let Some(reply) = self.replies.pop_front() {
                let r = reply.request;
                self.reading = Some(reply);
                return self.ask(Need::Chunk {
                    disk: r.disk,
                    offset: r.offset,
                    length: r.length,
                    purpose: ChunkPurpose::Resync,
                });
            }
        }
        if !can_send {
            return None;
        }
        if self.held.is_some() {
            if reading_ahead {
                return None;
            }
            let batch = self.held.take().expect("checked above");
            self.send_batch(batch);
            self.log_drained = false;
            return self.poll_need();
        }
        if !self.log_drained {
            return self.ask(Need::LogBatch {
                max_bytes: self.config.batch_bytes,
            });
        }
        if pending_digests == 0 && !reading_ahead {
            if let Some(c) = self.resync.pop_front() {
                let State::Shipping(s) = &mut self.state else {
                    return None;
                };
                match s.send_digest_request(c.disk, c.offset, c.length, c.block_size) {
                    Ok(f) => self.queue(f),
                    Err(e) => {
                        self.fail(e);
                        return None;
                    }
                }
                self.log_drained = false;
                return self.poll_need();
            }
        }
        if self.ahead.len() >= self.config.read_ahead.max(1) {
            return None;
        }
        let chunk_bytes = self.config.chunk_bytes.max(1);
        if let Some(d) = self.disks.iter_mut().find(|d| d.next < d.size) {
            let length = chunk_bytes.min(d.size - d.next);
            self.ahead.push_back(Ahead {
                disk: d.id,
                offset: d.next,
                length,
            });
            d.next += length;
            return Some(Need::Chunk {
                disk: d.id,
                offset: d.next - length,
                length,
                purpose: ChunkPurpose::InitialSync,
            });
        }
        // Idle: ask the log again later even without a notification.
        None
    }

    fn ask(&mut self, need: Need) -> Option<Need> {
        self.outstanding = Some(need);
        Some(need)
    }

    /// Arms the idle poll (called by the caller's loop when it is about
    /// to wait): see [`ShipperCore::poll_timeout`].
    fn arm_idle(&mut self, now: Instant) {
        if self.next_poll.is_none() {
            self.next_poll = Some(now + self.config.idle_poll);
        }
    }

    /// The answer to [`Need::LogBatch`] at `now`: the next records, or
    /// `None` when the log has none after the last handed over.
    pub fn handle_log_batch(&mut self, batch: Option<RecordBatch>, now: Instant) {
        if !matches!(self.outstanding, Some(Need::LogBatch { .. })) {
            return;
        }
        self.outstanding = None;
        let Some(batch) = batch.filter(|b| !b.is_empty()) else {
            self.log_drained = true;
            self.arm_idle(now);
            return;
        };
        if self.ahead.is_empty() {
            self.send_batch(batch);
        } else {
            self.held = Some(batch);
        }
    }

    /// Sends records, in order after everything sent so far, and acts on
    /// their resync-needed records.
    fn send_batch(&mut self, batch: RecordBatch) {
        let State::Shipping(s) = &mut self.state else {
            return;
        };
        let frame = match s.send_records(&batch) {
            Ok(f) => f,
            Err(e) => return self.fail(e),
        };
        self.queue(frame);
        self.record_bytes += batch.byte_len() as u64;
        self.log_seq = self.log_seq.max(batch.last().map_or(Seq::ZERO, |r| r.seq));
        let initial_sync = self.disks.iter().any(|d| d.next < d.size);
        let mut at = 0;
        let bytes = batch.as_bytes();
        let mut first = true;
        while at < bytes.len() {
            let Ok(h) = Header::decode(&bytes[at..]) else {
                break;
            };
            if first {
                // A batch sent again after a reconnect replaces what was
                // noted from its first record on.
                while self.unacked.back().is_some_and(|&(seq, _)| seq >= h.seq) {
                    self.unacked.pop_back();
                }
                first = false;
            }
            self.unacked.push_back((h.seq, h.timestamp_ns));
            if h.kind == Kind::ResyncNeeded {
                // While the group's initial sync runs, the receiver copies
                // a resync-needed extent again with the initial sync (it has
                // no consistent state to protect yet): the disk's sync
                // position goes back to the extent. Afterwards the extent
                // is compared by digests.
                match self.disks.iter_mut().find(|d| d.id == h.disk) {
                    Some(d) if initial_sync => {
                        d.next = d.next.min(h.offset);
                        d.sent = d.sent.min(h.offset);
                    }
                    _ => self.push_resync(h.disk, h.offset, h.length),
                }
            }
            if h.kind == Kind::Grow {
                // The disk is larger from here on. During the initial
                // sync the grown part is copied with the rest (the sync
                // goes on to the new end); afterwards it is compared by
                // digests (the source may hold anything there), as the
                // receiver waits for.
                let end = h.offset.saturating_add(h.length);
                let mut compare = false;
                if let Some(d) = self.disks.iter_mut().find(|d| d.id == h.disk) {
                    if end > d.size {
                        let synced = d.next >= d.size;
                        d.size = end;
                        if !initial_sync && synced {
                            (d.next, d.sent, d.acked) = (end, end, end);
                            compare = true;
                        }
                    }
                }
                if compare {
                    self.push_resync(h.disk, h.offset, h.length);
                }
            }
            at += h.record_len().max(1);
        }
    }

    /// Queues an extent, in pieces one digest request can cover, compared
    /// first in coarse blocks of the chunk size.
    fn push_resync(&mut self, disk: DiskId, offset: u64, length: u64) {
        let block_size =
            u32::try_from(self.config.chunk_bytes.max(u64::from(FINE_BLOCK))).unwrap_or(1 << 20);
        let mut at = offset;
        let end = offset.saturating_add(length);
        while at < end {
            let n = (end - at).min(MAX_DIGEST_EXTENT);
            self.resync.push_back(Compare {
                disk,
                offset: at,
                length: n,
                block_size,
            });
            at += n;
        }
    }

    /// The answer to [`Need::Chunk`]: the disk's bytes of that extent, read
    /// since it was asked for (for a resync comparison, [`ChunkData::Zero`]
    /// stands for zeroes). It answers the outstanding resync need, else the
    /// oldest initial-sync chunk asked for; with none, it is ignored (the
    /// session stopped or ended since).
    pub fn handle_chunk(&mut self, data: ChunkData) {
        let (disk, offset, length, purpose) = match self.outstanding {
            Some(Need::Chunk {
                disk,
                offset,
                length,
                purpose,
            }) => {
                self.outstanding = None;
                (disk, offset, length, purpose)
            }
            _ => match self.ahead.pop_front() {
                Some(a) => (a.disk, a.offset, a.length, ChunkPurpose::InitialSync),
                None => return,
            },
        };
        if data.len() != length {
            return self.fail(ShipperError::Usage(format!(
                "{} bytes read for a need of {length} bytes of disk {disk} at {offset}",
                data.len()
            )));
        }
        match purpose {
            ChunkPurpose::InitialSync => {
                if let ChunkData::Data(d) = &data {
                    self.sync_data_bytes += d.len() as u64;
                    if let Some(c) = self.disks.iter_mut().find(|c| c.id == disk) {
                        c.data_bytes += d.len() as u64;
                    }
                }
                let State::Shipping(s) = &mut self.state else {
                    return;
                };
                match s.send_chunk(disk, offset, ChunkPurpose::InitialSync, data) {
                    Ok(f) => self.queue(f),
                    Err(e) => return self.fail(e),
                }
                if let Some(d) = self.disks.iter_mut().find(|d| d.id == disk) {
                    // No rewind happens while chunks are read ahead: they
                    // are sent in the order asked, each after the last.
                    d.sent = offset + length;
                }
                self.log_drained = false;
            }
            ChunkPurpose::Resync => {
                let Some(reply) = self.reading.take() else {
                    return;
                };
                let bytes = match data {
                    ChunkData::Data(d) => d,
                    ChunkData::Zero(n) => vec![0; usize::try_from(n).unwrap_or(0)],
                };
                self.resync_extent(reply, &bytes);
            }
        }
    }

    /// Compares the receiver's digests of an extent with the disk's bytes.
    /// Coarse blocks that differ are queued for a second comparison in
    /// 4 KiB blocks and the rest of the extent is marked in sync; at 4 KiB
    /// the blocks that differ are sent and the extent is marked in sync. So
    /// what travels is the 4 KiB blocks that differ, plus digests.
    fn resync_extent(&mut self, reply: DigestReply, data: &[u8]) {
        let req = reply.request;
        let local = block_digests(data, req.block_size);
        let Some(differ) = differing_blocks(&req, &local, &reply.digests) else {
            return self.fail(ShipperError::Usage(
                "digests count does not match the request".into(),
            ));
        };
        let State::Shipping(s) = &mut self.state else {
            return;
        };
        let mut frames = Vec::new();
        let mut refine = Vec::new();
        let (mut compared, mut blocks_sent, mut bytes_sent) = (0, 0, 0);
        let result = (|| -> Result<(), ShipperError> {
            if req.block_size > FINE_BLOCK {
                compared += local.len() as u64;
                // The differing blocks stay pending at the receiver until
                // their fine comparison ends; everything between them is in
                // sync now.
                let end = req.offset + req.length;
                let mut at = req.offset;
                for e in differ.iter().chain(std::iter::once(&Extent {
                    disk: req.disk,
                    offset: end,
                    length: 0,
                })) {
                    if e.offset > at {
                        frames.push(s.send_resync_done(req.disk, at, e.offset - at)?);
                    }
                    at = e.offset + e.length;
                }
                refine.extend(differ.iter().map(|e| Compare {
                    disk: req.disk,
                    offset: e.offset,
                    length: e.length,
                    block_size: FINE_BLOCK,
                }));
                return Ok(());
            }
            for ext in &differ {
                let start = (ext.offset - req.offset) as usize;
                let bytes = data[start..start + ext.length as usize].to_vec();
                blocks_sent += ext.length.div_ceil(u64::from(req.block_size));
                bytes_sent += ext.length;
                frames.push(s.send_chunk(
                    req.disk,
                    ext.offset,
                    ChunkPurpose::Resync,
                    ChunkData::Data(bytes),
                )?);
            }
            frames.push(s.send_resync_done(req.disk, req.offset, req.length)?);
            Ok(())
        })();
        self.resync_blocks_compared += compared;
        self.resync_blocks_sent += blocks_sent;
        self.resync_bytes_sent += bytes_sent;
        // Ahead of everything else, so the extent they came from finishes
        // first.
        for c in refine.into_iter().rev() {
            self.resync.push_front(c);
        }
        for f in frames {
            self.queue(f);
        }
        if let Err(e) = result {
            self.fail(e);
        }
        self.log_drained = false;
    }

    /// The size of `disk` as of the last record sent: the hello's, or a
    /// grow record's since.
    pub fn disk_size(&self, disk: DiskId) -> Option<u64> {
        self.disks.iter().find(|d| d.id == disk).map(|d| d.size)
    }

    /// The session as of `now`.
    pub fn status(&self, now: Instant) -> CoreStatus {
        let (version, durable_seq, sent_seq) = match &self.state {
            State::Shipping(s) => (Some(s.version()), s.durable().seq, s.last_sent_seq()),
            _ => (None, Seq::ZERO, Seq::ZERO),
        };
        let disks = self
            .disks
            .iter()
            .map(|d| {
                let mut rate = 0;
                let mut eta = None;
                if let Some((from, since)) = d.base {
                    let secs = now.saturating_duration_since(since).as_secs_f64();
                    if secs > 0.5 && d.acked > from {
                        let r = (d.acked - from) as f64 / secs;
                        rate = r as u64;
                        eta = Some((d.size.saturating_sub(d.acked) as f64 / r).ceil() as u64);
                    }
                }
                if d.acked >= d.size {
                    eta = Some(0);
                }
                DiskStatus {
                    id: d.id,
                    size: d.size,
                    synced: d.acked,
                    sent: d.sent,
                    data_bytes: d.data_bytes,
                    rate_bytes_per_sec: rate,
                    eta_seconds: eta,
                }
            })
            .collect();
        let phase = if version.is_none() {
            Phase::Connecting
        } else if !self.resync.is_empty()
            || !self.replies.is_empty()
            || self.reading.is_some()
            || self.pending_digests() > 0
        {
            Phase::Resyncing
        } else if self.disks.iter().any(|d| d.acked < d.size) {
            Phase::InitialSync
        } else {
            Phase::Protected
        };
        CoreStatus {
            phase,
            version,
            durable_seq,
            sent_seq,
            log_seq: self.log_seq,
            disks,
            wire_bytes: self.wire_bytes,
            record_bytes: self.record_bytes,
            sync_data_bytes: self.sync_data_bytes,
            resync_blocks_compared: self.resync_blocks_compared,
            resync_blocks_sent: self.resync_blocks_sent,
            resync_bytes_sent: self.resync_bytes_sent,
            oldest_unacked_ns: self.unacked.front().map(|&(_, ts)| ts),
            resync_bytes_left: self.resync.iter().map(|c| c.length).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Message, MessageDecoder};
    use tidemark_changelog::record::Entry;
    use tidemark_changelog::Disk;

    const SIZE: u64 = 16 << 10;

    fn core(now: Instant) -> ShipperCore {
        core_with(
            now,
            CoreConfig {
                chunk_bytes: 8 << 10,
                ..CoreConfig::default()
            },
        )
    }

    fn core_with(now: Instant, config: CoreConfig) -> ShipperCore {
        let hello = HelloInfo {
            host: tidemark_names::Name::from_static("h"),
            group: tidemark_names::Name::from_static("g"),
            generation: 1,
            disks: vec![Disk {
                id: DiskId(0),
                name: tidemark_names::Name::from_static("d"),
                size: SIZE,
            }],
        };
        ShipperCore::new(hello, config, now).unwrap()
    }

    fn v(message: Message) -> Received {
        Received::new(crate::PROTOCOL_VERSION, message)
    }

    fn welcome(durable_seq: u64, synced: u64) -> Received {
        v(Message::Welcome {
            durable_seq: Seq(durable_seq),
            generation: 1,
            disks: vec![DiskSync {
                id: DiskId(0),
                synced,
            }],
            resyncing: Vec::new(),
            software: String::new(),
        })
    }

    fn ack(durable_seq: u64, frames: u64, synced: u64) -> Received {
        v(Message::Ack {
            durable_seq: Seq(durable_seq),
            generation: 1,
            frames,
            disks: vec![DiskSync {
                id: DiskId(0),
                synced,
            }],
        })
    }

    fn batch(entries: &[(u64, Entry<'_>)]) -> RecordBatch {
        let records: Vec<Vec<u8>> = entries.iter().map(|(seq, e)| e.encode(*seq, 1)).collect();
        RecordBatch::from_records(records.iter().map(Vec::as_slice)).unwrap()
    }

    /// The messages the core transmitted since the last call.
    fn sent(c: &mut ShipperCore) -> Vec<Message> {
        let mut d = MessageDecoder::new();
        while let Some(f) = c.poll_transmit() {
            d.feed(&f);
        }
        std::iter::from_fn(|| d.next_message().unwrap().map(|r| r.message)).collect()
    }

    /// A core past the Welcome of a fresh replica whose log holds record 1.
    fn connected(now: Instant, synced: u64) -> ShipperCore {
        connected_with(core(now), now, synced)
    }

    fn connected_with(mut c: ShipperCore, now: Instant, synced: u64) -> ShipperCore {
        assert!(matches!(sent(&mut c)[..], [Message::Hello { .. }]));
        assert_eq!(c.poll_need(), None, "nothing before the welcome");
        c.handle_message(welcome(0, synced), now);
        assert_eq!(
            c.poll_need(),
            Some(Need::FirstRecordAfter { after: Seq(0) })
        );
        c.handle_first_record(
            Some(RecordId {
                seq: Seq(1),
                generation: 1,
            }),
            now,
        );
        assert!(matches!(c.poll_event(), Some(CoreEvent::Connected(r)) if r.from_seq == Seq(1)));
        c
    }

    #[test]
    fn records_first_then_chunks_and_a_resync_needed_record_rewinds_the_sync() {
        let t = Instant::now();
        let mut c = connected(t, 0);
        assert_eq!(c.status(t).phase, Phase::InitialSync);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(Some(batch(&[(1, Entry::barrier(5))])), t);
        assert!(matches!(sent(&mut c)[..], [Message::Records(_)]));
        // The log again first; drained: the first chunk.
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        let need = c.poll_need();
        assert_eq!(
            need,
            Some(Need::Chunk {
                disk: DiskId(0),
                offset: 0,
                length: 8 << 10,
                purpose: ChunkPurpose::InitialSync
            })
        );
        c.handle_chunk(ChunkData::Zero(8 << 10));
        assert!(matches!(
            sent(&mut c)[..],
            [Message::Chunk {
                offset: 0,
                after_seq: Seq(1),
                ..
            }]
        ));
        // A resync-needed record during the initial sync rewinds it.
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(
            Some(batch(&[(2, Entry::resync_needed(0, 4096, 4096, 6))])),
            t,
        );
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert!(matches!(
            c.poll_need(),
            Some(Need::Chunk { offset: 4096, .. })
        ));
        assert_eq!(c.status(t).disks[0].sent, 4096);
    }

    #[test]
    fn protected_only_once_the_last_chunk_is_acknowledged() {
        let t = Instant::now();
        let mut c = connected(t, 8 << 10);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert!(matches!(c.poll_need(), Some(Need::Chunk { offset, .. }) if offset == 8 << 10));
        c.handle_chunk(ChunkData::Zero(8 << 10));
        assert_eq!(sent(&mut c).len(), 1);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert_eq!(c.poll_need(), None, "everything sent: idle");
        assert_eq!(c.status(t).disks[0].sent, SIZE);
        assert_eq!(
            c.status(t).phase,
            Phase::InitialSync,
            "sent is not held: not protected yet"
        );
        c.handle_message(ack(0, 1, SIZE - 1), t);
        assert_eq!(c.status(t).phase, Phase::InitialSync);
        c.handle_message(ack(0, 1, SIZE), t);
        assert_eq!(c.status(t).phase, Phase::Protected);
        assert_eq!(c.status(t).disks[0].eta_seconds, Some(0));
    }

    #[test]
    fn rate_and_eta_come_from_the_instant_given() {
        let t = Instant::now();
        let mut c = connected(t, 0);
        let later = t + Duration::from_secs(2);
        // Acks must not acknowledge more frames than were sent; send one.
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert!(c.poll_need().is_some());
        c.handle_chunk(ChunkData::Zero(8 << 10));
        c.handle_message(ack(0, 1, 4096), later);
        let d = c.status(later).disks[0];
        assert_eq!(d.rate_bytes_per_sec, 2048);
        assert_eq!(d.eta_seconds, Some(6));
        let d = c.status(t + Duration::from_secs(4)).disks[0];
        assert_eq!(
            d.rate_bytes_per_sec, 1024,
            "the rate falls while nothing is acked"
        );
    }

    #[test]
    fn a_silent_peer_with_frames_in_flight_ends_the_session() {
        let t = Instant::now();
        let mut c = connected(t, SIZE);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert_eq!(c.poll_need(), None);
        // Nothing in flight: only the idle poll is due, and it asks the
        // log again.
        let poll = c.poll_timeout().unwrap();
        assert_eq!(poll, t + Duration::from_secs(1));
        c.handle_timeout(poll);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(Some(batch(&[(1, Entry::barrier(5))])), poll);
        // Silence counts from when a timeout first saw the frame in flight.
        assert!(c.poll_timeout().unwrap() <= poll);
        c.handle_timeout(poll);
        let dead = poll + CoreConfig::default().peer_timeout;
        assert!(c.poll_timeout().unwrap() <= dead);
        c.handle_timeout(dead - Duration::from_millis(1));
        assert!(!c.is_ended());
        c.handle_timeout(dead);
        assert!(c.is_ended());
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::Retry(ShipperError::PeerSilent { .. }))
        ));
        assert_eq!(c.poll_need(), None);
    }

    #[test]
    fn no_welcome_in_time_is_transient_and_a_gap_is_critical() {
        let t = Instant::now();
        let mut c = core(t);
        c.handle_timeout(t + Duration::from_secs(29));
        assert!(!c.is_ended());
        c.handle_timeout(t + Duration::from_secs(30));
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::Retry(ShipperError::NoWelcome { .. }))
        ));

        let mut c = core(t);
        sent(&mut c);
        c.handle_message(welcome(10, SIZE), t);
        assert_eq!(
            c.poll_need(),
            Some(Need::FirstRecordAfter { after: Seq(10) })
        );
        c.handle_first_record(
            Some(RecordId {
                seq: Seq(20),
                generation: 1,
            }),
            t,
        );
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::Critical(ShipperError::CannotResume { .. }))
        ));
        assert!(
            matches!(sent(&mut c)[..], [Message::Error { .. }]),
            "the receiver is told why"
        );
    }

    #[test]
    fn acks_advance_the_cursor_and_a_stop_waits_for_them() {
        let t = Instant::now();
        let mut c = connected(t, SIZE);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(
            Some(batch(&[(1, Entry::barrier(7)), (2, Entry::barrier(8))])),
            t,
        );
        c.stop(t);
        assert!(!c.is_ended(), "frames are in flight");
        assert_eq!(c.poll_need(), None, "no new work while stopping");
        c.handle_message(ack(2, 1, SIZE), t);
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::CursorAdvanced {
                durable: RecordId { seq: Seq(2), .. },
                ..
            })
        ));
        assert!(matches!(c.poll_event(), Some(CoreEvent::Stopped)));
    }

    #[test]
    fn an_ack_names_the_timestamp_of_every_record_it_made_durable() {
        let t = Instant::now();
        let mut c = connected(t, SIZE);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        let entries: Vec<_> = (1..=5).map(|s| (s, Entry::barrier(100 + s))).collect();
        c.handle_log_batch(Some(batch(&entries)), t);
        let acked = |c: &mut ShipperCore| match c.poll_event() {
            Some(CoreEvent::CursorAdvanced { acked_ns, .. }) => acked_ns,
            other => panic!("{other:?}"),
        };
        // One lag observation per record, not one per Ack.
        c.handle_message(ack(3, 1, SIZE), t);
        assert_eq!(acked(&mut c), [101, 102, 103]);
        // An Ack repeating the durable position names no record again.
        c.handle_message(ack(3, 1, SIZE), t);
        assert_eq!(acked(&mut c), Vec::<u64>::new());
        c.handle_message(ack(5, 1, SIZE), t);
        assert_eq!(acked(&mut c), [104, 105]);
    }

    #[test]
    fn a_drain_is_answered_once_everything_is_sent() {
        let t = Instant::now();
        let mut c = connected(t, SIZE);
        c.handle_message(v(Message::DrainRequest { id: 9 }), t);
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::DrainRequested { id: 9 })
        ));
        c.handle_drain_ready(9, Ok(Seq(1)));
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        assert!(sent(&mut c).is_empty(), "record 1 is not sent yet");
        c.handle_log_batch(Some(batch(&[(1, Entry::barrier(5))])), t);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        c.poll_need();
        assert!(matches!(
            sent(&mut c)[..],
            [
                Message::Records(_),
                Message::Drained {
                    id: 9,
                    last_seq: Seq(1),
                    ..
                }
            ]
        ));
    }

    #[test]
    fn a_drain_the_host_cannot_do_is_refused_with_its_reason_and_shipping_goes_on() {
        let t = Instant::now();
        let mut c = connected(t, SIZE);
        c.handle_message(v(Message::DrainRequest { id: 4 }), t);
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::DrainRequested { id: 4 })
        ));
        let refused = DrainRefused {
            reason: "the tracker did not stop".into(),
        };
        c.handle_drain_ready(4, Err(&refused));
        let frames = sent(&mut c);
        assert!(
            matches!(
                &frames[..],
                [Message::Drained { id: 4, last_seq: Seq(0), error }] if error == "the tracker did not stop"
            ),
            "{frames:?}"
        );
        assert!(!c.is_ended(), "replication goes on");
    }

    /// A grow record makes the disk larger from it on: the grown part is
    /// compared by digests like a resync-needed extent (the replica waits
    /// for that), and chunks of it pass the session's extent check.
    #[test]
    fn a_grow_record_compares_the_grown_part() {
        let t = Instant::now();
        let mut c = connected(t, SIZE);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(Some(batch(&[(1, Entry::grow(0, SIZE, SIZE + 8192, 6))])), t);
        assert_eq!(c.disk_size(DiskId(0)), Some(SIZE + 8192));
        assert_eq!(c.status(t).phase, Phase::Resyncing);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert_eq!(c.poll_need(), None);
        let sent_now = sent(&mut c);
        assert!(
            matches!(
                sent_now[..],
                [
                    Message::Records(_),
                    Message::DigestRequest {
                        offset: SIZE,
                        length: 8192,
                        ..
                    }
                ]
            ),
            "{sent_now:?}"
        );
        c.handle_message(
            v(Message::Digests {
                disk: DiskId(0),
                offset: SIZE,
                block_size: 8192,
                digests: block_digests(&[0u8; 8192], 8192),
            }),
            t,
        );
        assert_eq!(
            c.poll_need(),
            Some(Need::Chunk {
                disk: DiskId(0),
                offset: SIZE,
                length: 8192,
                purpose: ChunkPurpose::Resync,
            })
        );
        c.handle_chunk(ChunkData::Data(vec![1u8; 8192]));
        assert!(sent(&mut c).is_empty(), "no block is in sync yet");
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert_eq!(c.poll_need(), None);
        assert!(matches!(
            sent(&mut c)[..],
            [Message::DigestRequest {
                offset: SIZE,
                block_size: 4096,
                ..
            }]
        ));
        c.handle_message(
            v(Message::Digests {
                disk: DiskId(0),
                offset: SIZE,
                block_size: 4096,
                digests: block_digests(&[0u8; 8192], 4096),
            }),
            t,
        );
        assert!(c.poll_need().is_some());
        c.handle_chunk(ChunkData::Data(vec![1u8; 8192]));
        // The grown part's blocks travel, beyond the hello's size.
        assert!(matches!(
            &sent(&mut c)[..],
            [
                Message::Chunk {
                    offset: SIZE,
                    purpose: ChunkPurpose::Resync,
                    ..
                },
                Message::ResyncDone {
                    offset: SIZE,
                    length: 8192,
                    ..
                }
            ]
        ));
        assert_eq!(c.status(t).phase, Phase::Protected);
    }

    /// A grow record to a size the session already has (a tracker that
    /// crashed after recording a growth and before its disks file said so
    /// records it again at its next start) changes nothing: no compare,
    /// the group stays protected.
    #[test]
    fn a_grow_record_to_the_size_the_disk_has_is_a_no_op() {
        let t = Instant::now();
        let mut c = connected(t, SIZE);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(Some(batch(&[(1, Entry::grow(0, SIZE - 8192, SIZE, 6))])), t);
        assert_eq!(c.disk_size(DiskId(0)), Some(SIZE));
        assert_eq!(c.status(t).phase, Phase::Protected);
        // The log has nothing more; no digest request, no chunk is asked.
        for _ in 0..4 {
            match c.poll_need() {
                Some(Need::LogBatch { .. }) => c.handle_log_batch(None, t),
                None => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(c.poll_need(), None);
        let sent_now = sent(&mut c);
        assert!(
            matches!(sent_now[..], [Message::Records(_)]),
            "{sent_now:?}"
        );
    }

    /// A receiver of protocol version 5 reads no grow record: the shipper
    /// stops with a message that says to upgrade the replica site, instead
    /// of sending what the receiver would refuse.
    #[test]
    fn a_grow_record_is_not_sent_to_a_receiver_of_version_5() {
        let t = Instant::now();
        let mut c = core(t);
        assert!(matches!(sent(&mut c)[..], [Message::Hello { .. }]));
        c.handle_message(
            Received::new(
                5,
                Message::Welcome {
                    durable_seq: Seq(0),
                    generation: 1,
                    disks: vec![DiskSync {
                        id: DiskId(0),
                        synced: SIZE,
                    }],
                    resyncing: Vec::new(),
                    software: String::new(),
                },
            ),
            t,
        );
        assert!(matches!(c.poll_need(), Some(Need::FirstRecordAfter { .. })));
        c.handle_first_record(
            Some(RecordId {
                seq: Seq(1),
                generation: 1,
            }),
            t,
        );
        assert!(matches!(c.poll_event(), Some(CoreEvent::Connected(r)) if r.version == 5));
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(
            Some(batch(&[
                (1, Entry::write(0, 0, &[1; 512], 6)),
                (2, Entry::grow(0, SIZE, SIZE + 8192, 6)),
            ])),
            t,
        );
        match c.poll_event() {
            Some(CoreEvent::Critical(e @ ShipperError::ReceiverTooOld { version: 5, .. })) => {
                assert!(e.to_string().contains("upgrade the replica site"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_resync_needed_extent_after_the_sync_is_compared_coarse_then_fine() {
        let t = Instant::now();
        let mut c = connected(t, SIZE);
        let disk = vec![7u8; 8192];
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(Some(batch(&[(1, Entry::resync_needed(0, 0, 8192, 6))])), t);
        assert_eq!(c.status(t).phase, Phase::Resyncing);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        // A digest request went out; the log is looked at again, then
        // nothing: one request at a time.
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert_eq!(c.poll_need(), None, "one digest request, then wait");
        let sent_now = sent(&mut c);
        assert!(matches!(
            sent_now[..],
            [
                Message::Records(_),
                Message::DigestRequest {
                    offset: 0,
                    length: 8192,
                    block_size: 8192,
                    ..
                }
            ]
        ));
        // The replica's coarse block differs: read the extent, ask again
        // in 4 KiB blocks.
        let digests = |block: u32, data: &[u8]| {
            v(Message::Digests {
                disk: DiskId(0),
                offset: 0,
                block_size: block,
                digests: block_digests(data, block),
            })
        };
        let mut replica = disk.clone();
        replica[5000] = 1;
        c.handle_message(digests(8192, &replica), t);
        assert_eq!(
            c.poll_need(),
            Some(Need::Chunk {
                disk: DiskId(0),
                offset: 0,
                length: 8192,
                purpose: ChunkPurpose::Resync
            })
        );
        c.handle_chunk(ChunkData::Data(disk.clone()));
        assert!(sent(&mut c).is_empty(), "no block is in sync yet");
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert_eq!(c.poll_need(), None);
        assert!(matches!(
            sent(&mut c)[..],
            [Message::DigestRequest {
                block_size: 4096,
                ..
            }]
        ));
        c.handle_message(digests(4096, &replica), t);
        assert!(c.poll_need().is_some());
        c.handle_chunk(ChunkData::Data(disk.clone()));
        // Only the differing 4 KiB block travels, then the extent is done.
        assert!(matches!(
            &sent(&mut c)[..],
            [
                Message::Chunk {
                    offset: 4096,
                    purpose: ChunkPurpose::Resync,
                    data: ChunkData::Data(d),
                    ..
                },
                Message::ResyncDone {
                    offset: 0,
                    length: 8192,
                    ..
                }
            ] if d.len() == 4096
        ));
        let st = c.status(t);
        assert_eq!((st.resync_blocks_compared, st.resync_blocks_sent), (1, 1));
        assert_eq!(st.phase, Phase::Protected);
    }

    /// A core of 4 KiB chunks reading 3 ahead, past the Welcome of a fresh
    /// replica, its log drained after record 1.
    fn reading_ahead(t: Instant) -> ShipperCore {
        let config = CoreConfig {
            chunk_bytes: 4 << 10,
            read_ahead: 3,
            ..CoreConfig::default()
        };
        let mut c = connected_with(core_with(t, config), t, 0);
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(Some(batch(&[(1, Entry::barrier(5))])), t);
        assert!(matches!(sent(&mut c)[..], [Message::Records(_)]));
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        c
    }

    fn sync_chunk(offset: u64) -> Option<Need> {
        Some(Need::Chunk {
            disk: DiskId(0),
            offset,
            length: 4 << 10,
            purpose: ChunkPurpose::InitialSync,
        })
    }

    /// The core asks for initial-sync chunks at these offsets, one after
    /// the other, before any is answered.
    fn asked_ahead(c: &mut ShipperCore, offsets: &[u64]) {
        for &offset in offsets {
            assert_eq!(c.poll_need(), sync_chunk(offset));
        }
    }

    #[test]
    fn initial_sync_chunks_are_asked_for_ahead_and_sent_in_order() {
        let t = Instant::now();
        let mut c = reading_ahead(t);
        // Three chunks asked for at once, each once; then the window of
        // reads is full.
        asked_ahead(&mut c, &[0, 4096, 8192]);
        assert_eq!(c.poll_need(), None, "three chunks read ahead at most");
        assert_eq!(c.status(t).disks[0].sent, 0, "asked for is not sent");
        c.handle_chunk(ChunkData::Data(vec![1; 4096]));
        assert!(matches!(
            sent(&mut c)[..],
            [Message::Chunk {
                offset: 0,
                after_seq: Seq(1),
                ..
            }]
        ));
        assert_eq!(c.status(t).disks[0].sent, 4096);
        // The log is looked at before the next chunk is asked for.
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(None, t);
        assert_eq!(c.poll_need(), sync_chunk(12288));
        assert_eq!(c.poll_need(), None);
        for _ in 0..3 {
            c.handle_chunk(ChunkData::Zero(4096));
        }
        let offsets: Vec<u64> = sent(&mut c)
            .iter()
            .map(|m| match m {
                Message::Chunk { offset, .. } => *offset,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(offsets, [4096, 8192, 12288]);
        assert_eq!(c.status(t).disks[0].sent, SIZE);
        // An answer nobody asked for is ignored.
        c.handle_chunk(ChunkData::Zero(4096));
        assert!(sent(&mut c).is_empty());
    }

    #[test]
    fn records_and_a_rewind_read_while_chunks_are_read_ahead_wait_behind_them() {
        let t = Instant::now();
        let mut c = reading_ahead(t);
        asked_ahead(&mut c, &[0, 4096, 8192]);
        c.handle_chunk(ChunkData::Zero(4096));
        assert_eq!(sent(&mut c).len(), 1);
        // A write and a resync-needed record of the start of the disk
        // arrive while two chunks are still being read: they may have been
        // read before the write, so the records wait behind them.
        assert!(matches!(c.poll_need(), Some(Need::LogBatch { .. })));
        c.handle_log_batch(
            Some(batch(&[
                (2, Entry::write(0, 4096, &[9; 512], 6)),
                (3, Entry::resync_needed(0, 0, 4096, 7)),
            ])),
            t,
        );
        assert_eq!(c.poll_need(), None, "nothing before the chunks read ahead");
        assert!(sent(&mut c).is_empty());
        assert_eq!(c.status(t).sent_seq, Seq(1));
        c.handle_chunk(ChunkData::Zero(4096));
        c.handle_chunk(ChunkData::Data(vec![1; 4096]));
        // The chunks go where they were read (after record 1), then the
        // records, whose rewind takes effect only now.
        assert_eq!(c.status(t).disks[0].sent, 12288, "not rewound yet");
        assert_eq!(c.poll_need(), Some(Need::LogBatch { max_bytes: 1 << 20 }));
        let frames = sent(&mut c);
        assert!(
            matches!(
                &frames[..],
                [
                    Message::Chunk {
                        offset: 4096,
                        after_seq: Seq(1),
                        ..
                    },
                    Message::Chunk {
                        offset: 8192,
                        after_seq: Seq(1),
                        ..
                    },
                    Message::Records(_),
                ]
            ),
            "{frames:?}"
        );
        assert_eq!(c.status(t).disks[0].sent, 0, "rewound to the extent");
        c.handle_log_batch(None, t);
        // The chunks read before the rewind are not taken for the current
        // data: the disk is read again from the extent on.
        asked_ahead(&mut c, &[0, 4096]);
        c.handle_chunk(ChunkData::Data(vec![2; 4096]));
        assert!(matches!(
            sent(&mut c)[..],
            [Message::Chunk {
                offset: 0,
                after_seq: Seq(3),
                ..
            }]
        ));
    }

    #[test]
    fn a_stop_forgets_the_chunks_read_ahead() {
        let t = Instant::now();
        let mut c = reading_ahead(t);
        asked_ahead(&mut c, &[0, 4096]);
        c.stop(t);
        assert_eq!(c.poll_need(), None, "no new work while stopping");
        c.handle_chunk(ChunkData::Zero(4096));
        assert!(
            sent(&mut c).is_empty(),
            "an answer after the stop is ignored"
        );
    }

    /// A spec given before the session runs goes out once it runs, a
    /// newer one given meanwhile replacing it; the receiver's answers come
    /// as events and the session goes on after a refusal.
    #[test]
    fn a_vm_spec_is_sent_once_the_session_runs_and_its_answer_reported() {
        let t = Instant::now();
        let mut c = core(t);
        c.handle_vm_spec("[vm]\nold".into());
        c.handle_vm_spec("[vm]\nnew".into());
        let mut c = connected_with(c, t, SIZE);
        let frames = sent(&mut c);
        assert!(
            matches!(&frames[..], [Message::VmSpec { text }] if text == "[vm]\nnew"),
            "{frames:?}"
        );
        c.handle_message(
            v(Message::VmSpecReply(VmSpecReply::Refused {
                reason: "cpus: 0 is not allowed".into(),
            })),
            t,
        );
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::VmSpec(VmSpecNews::Answered(
                VmSpecReply::Refused { .. }
            )))
        ));
        assert!(!c.is_ended(), "replication goes on");
        c.handle_vm_spec("[vm]\nfixed".into());
        assert!(matches!(&sent(&mut c)[..], [Message::VmSpec { .. }]));
        c.handle_message(
            v(Message::VmSpecReply(VmSpecReply::Kept { from_seq: Seq(1) })),
            t,
        );
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::VmSpec(VmSpecNews::Answered(VmSpecReply::Kept {
                from_seq: Seq(1)
            })))
        ));
    }

    /// A session of an older version never carries a spec: the caller
    /// hears it cannot.
    #[test]
    fn a_session_of_version_2_does_not_carry_a_vm_spec() {
        let t = Instant::now();
        let mut c = core_with(
            t,
            CoreConfig {
                session: ShipperConfig {
                    versions: crate::Versions { min: 1, max: 2 },
                    ..ShipperConfig::default()
                },
                ..CoreConfig::default()
            },
        );
        assert!(matches!(sent(&mut c)[..], [Message::Hello { .. }]));
        c.handle_message(
            Received::new(
                2,
                Message::Welcome {
                    durable_seq: Seq(0),
                    generation: 1,
                    disks: vec![DiskSync {
                        id: DiskId(0),
                        synced: SIZE,
                    }],
                    resyncing: Vec::new(),
                    software: String::new(),
                },
            ),
            t,
        );
        c.handle_first_record(None, t);
        assert!(matches!(c.poll_event(), Some(CoreEvent::Connected(r)) if r.version == 2));
        c.handle_vm_spec("[vm]".into());
        assert!(
            sent(&mut c).is_empty(),
            "nothing a version-2 peer cannot read"
        );
        assert!(matches!(
            c.poll_event(),
            Some(CoreEvent::VmSpec(VmSpecNews::NotCarried { version: 2 }))
        ));
    }
}
