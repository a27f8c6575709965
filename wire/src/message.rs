//! Messages: what a frame body means. Body layouts, little-endian, no
//! padding. `str8` is a u8 length then UTF-8 bytes; `str16` a u16 length then
//! UTF-8 bytes. Every count is bounded by the body that carries it, and
//! every message must use its whole body.
//!
//! ```text
//!  type              since  layout
//!  1 hello           1      str8 host, str8 group, u32 generation, u32 n,
//!                           n × (u32 id, str8 name, u64 size); host, group
//!                           and disk names follow the rule of
//!                           `tidemark_names::Name` (the receiver makes paths
//!                           of them), else the hello does not decode
//!                    2      then: u16 min-version, str8 software
//!  2 welcome         1      u64 durable-seq, u32 generation,
//!                           u32 n, n × (u32 id, u64 synced),
//!                           u32 m, m × (u32 disk, u64 offset, u64 length)
//!                    2      then: str8 software
//!  3 records         1      the records, each exactly as in the log (56-byte
//!                           header with its own CRC32C, then payload), back
//!                           to back
//!  4 chunk           1      u32 disk, u64 offset, u64 after-seq, u8 purpose
//!                           (0 initial-sync, 1 resync), u8 data kind, then
//!                           kind 0: the data (rest of the body, non-empty)
//!                           kind 1: u64 length of a range that reads as zeroes
//!  5 digest-request  1      u32 disk, u64 offset, u64 length, u32 block-size
//!  6 digests         1      u32 disk, u64 offset, u32 block-size, u32 n,
//!                           n × 32-byte BLAKE3
//!  7 resync-done     1      u32 disk, u64 offset, u64 length, u64 after-seq
//!  8 ack             1      u64 durable-seq, u32 generation, u64 frames,
//!                           u32 n, n × (u32 id, u64 synced)
//!  9 error           1      u8 class (0 transient, 1 permanent), u8 code,
//!                           str16 message; the same in every version
//! 10 drain-request   1      u64 id
//! 11 drained         1      u64 id, u64 last-seq, str16 error (empty: drained)
//! 12 hold-open       3      u64 point, u64 epoch, u32 deadline-us, u8 flags
//!                           (bit 0 app-consistent; others 0), str16 label
//!                           (the rule of `tidemark_names::Label`)
//! 13 held            3      u64 point, u64 epoch, u8 outcome, then
//!                           outcome 0 (held): u64 marker-seq, u32 generation
//!                           outcome 1 (refused): u8 code (0 bitmap-mode,
//!                           1 starting, 2 busy, 3 stale-epoch, 4 tracker-
//!                           unreachable, 5 resyncing), str16 reason
//! 14 hold-release    3      u64 point, u64 epoch, u8 action (0 abort,
//!                           1 commit)
//! 15 released        3      u64 point, u64 epoch, u8 how (0 in-time,
//!                           1 expired, 2 unknown, 3 aborted), u32 held-us,
//!                           u32 gated-writes
//! 16 vm-spec         3      the group's VM spec, its TOML text in UTF-8 (the
//!                           rest of the body, 1 byte to 64 KiB)
//! 17 vm-spec-reply   3      u8 outcome, then
//!                           outcome 0 (kept): u64 from-seq of the version
//!                           the replica holds as current
//!                           outcome 1 (refused): str16 reason
//! 18 hold-quiesce    4      u64 point, u64 epoch, u32 timeout-ms
//! 19 quiesced        4      u64 point, u64 epoch, u8 outcome (0 quiesced,
//!                           1 not quiesced), then outcome 1: str16 reason
//! 20 hold-thaw       4      u64 point, u64 epoch
//! 21 thawed          4      u64 point, u64 epoch, u8 how (0 in-time,
//!                           1 expired, 2 unknown), str16 note
//! 22 renew-request   5      a certificate signing request, PEM text in
//!                           UTF-8 (the rest of the body, 1 byte to 16 KiB)
//! 23 renewed         5      u8 outcome, then
//!                           outcome 0 (issued): u32 certificate length,
//!                           the certificate (PEM), then the CA bundle (PEM,
//!                           the rest of the body); both 1 byte to 64 KiB
//!                           outcome 1 (refused): str16 reason
//! 24 redirect        5      str8 to: the address (`host:port`) of the
//!                           receiver that owns the group, non-empty
//! 25 status-report   7      u8 state (0 initial-sync, 1 resyncing,
//!                           2 protected, 3 critical), u64 pending-records,
//!                           u64 pending-bytes, u64 lag-ms,
//!                           u64 wire-bytes-per-s, u64 record-bytes-per-s,
//!                           u64 sync-done, u64 sync-total,
//!                           u64 sync-bytes-per-s, u64 resync-done,
//!                           u64 resync-total (each done at most its
//!                           total), str16 reason (at most 4 KiB)
//! ```
//!
//! `since` is the protocol version that added the message or the fields
//! (the frame header's version field; the rules are in [`crate::frame`]). A
//! frame of version `v` holds exactly the fields of version `v` and older;
//! a message type newer than `v` is refused by the encoder and the decoder.
//! Version 2 added to the hello the oldest version the shipper speaks
//! (`min-version`; the newest is the hello's frame version) and both sides'
//! `software` release (e.g. "0.1.0") for logs and status. Version 3 added
//! the hold messages of span points (`tidemark_span` owns their protocol):
//! they travel on a stream of their own beside the session's, opened by
//! the receiver once a session of version 3 or later runs, so a hold never
//! waits behind queued records.
//!
//! Version 3 also carries the group's VM spec (`vm-spec`, shipper →
//! receiver, on the session's stream, so it takes its place among the
//! records: the replica keeps it as applying from the record after the
//! last one received before it) and the receiver's answer
//! (`vm-spec-reply`: kept, with the sequence number the kept version
//! applies from, or refused and why; the session goes on either way).
//! They joined version 3 before any release spoke it, so no peer of an
//! older version is ever sent one.
//!
//! Version 4 added the quiesce phase of application-consistent span
//! points (`hold-quiesce`, `quiesced`, `hold-thaw`, `thawed`), on the hold
//! stream like the other hold messages. A member whose session speaks
//! version 3 is never sent them: the coordinator takes its marker
//! crash-consistent (`tidemark_span` says how that makes the point).
//!
//! Version 5 added the renewal of the host's certificate
//! (`tidemark_net::renew` says how): the shipper opens a stream of its own
//! on an established connection and sends `renew-request` as its first
//! message (in place of a hello); the receiver answers `renewed` on it and
//! the stream ends. A receiver of an older version does not read a second
//! stream while the session's runs (or refuses the frame's version with an
//! error): the shipper gives up after a timeout and renews no certificate
//! there.
//!
//! Version 5 also added `redirect`, a receiver's answer to a hello instead of
//! the welcome when several receivers share one replica store (a Ceph
//! cluster) and another one owns the group's lease: the shipper closes the
//! connection and connects to `to`. A shipper that speaks only version 4
//! or older gets a transient `busy` error naming that receiver instead,
//! and retries as after any transient error.
//!
//! Version 6 carries change-log records of record version 3, which added
//! the grow record (a disk grew, ordered with the writes:
//! `tidemark_changelog::record`). A session of version 2 to 5 carries
//! records of version 2 at most: a shipper never sends a grow record in
//! it (it stops with [`crate::shipper::ShipperError::ReceiverTooOld`]:
//! the replica site must be upgraded before a disk grows), and a receiver
//! refuses one.
//!
//! Version 7 added `status-report` (shipper → receiver): what the shipper
//! knows of its group and the receiver cannot see (state, pending records
//! and bytes, lag, throughput, sync and resync progress;
//! [`crate::status_report`] says what each field means and when one is
//! sent). Reports travel on a unidirectional stream the shipper opens
//! once a session of version 7 or later runs, so they never wait behind
//! queued records; each replaces the one before and none is answered. A
//! receiver of version 6 or older is never sent one.
//!
//! A planned failover is asked for on the replica site: the receiver sends
//! `drain-request`; the shipper stops the protected host's tracker (no new
//! writes, a final barrier), sends every record the log holds, finishes any
//! sync, then answers `drained` with the last record's sequence number (or
//! why it could not drain). `drained` follows the last record on the
//! stream, so when the receiver reads it every record is applied.
//!
//! Initial sync has no "done" message: initial-sync chunks of a disk are
//! sent in offset order without holes (zero ranges as `Zero` data), so the
//! receiver's `synced` offset is simply the end of the last one, and a disk
//! is fully synced when it reaches the disk's size. `Ack.frames` counts the
//! frames the receiver has consumed on this connection; the shipper's flow
//! control releases in-flight bytes by it.

use crate::frame::{
    encode_frame_parts, encode_frame_with_crc, Compression, DecodeError, EncodeError, Frame,
    FrameDecoder, UncheckedFrame, MAX_FRAME_BODY, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use crate::status_report::{Progress, ReportState, StatusReport, MAX_REPORT_REASON};
use bytes::Bytes;
use std::fmt;
use std::time::Duration;
use thiserror::Error;
use tidemark_changelog::record::{self, crc32c_combine, Header, RecordRef, HEADER_LEN};
use tidemark_changelog::{Disk, DiskId, Extent, Seq};
use tidemark_names::{Label, Name};
use tidemark_span::{
    Epoch, HeldOutcome, HeldReply, HoldMessage, OpenHold, PointId, QuiesceHold, QuiescedOutcome,
    QuiescedReply, RefuseCode, ReleaseHold, ReleasedHow, ReleasedReply, ThawHold, ThawedHow,
    ThawedReply,
};

/// The first protocol version that carries change-log records of record
/// version 3 (the grow record).
pub const GROW_PROTOCOL_VERSION: u16 = 6;

/// The newest change-log record version a session of protocol `version`
/// carries.
pub fn record_version_of(version: u16) -> u8 {
    match version {
        0 | 1 => 1,
        v if v < GROW_PROTOCOL_VERSION => 2,
        _ => tidemark_changelog::record::LATEST_RECORD_VERSION,
    }
}

/// The longest `str8` field, in bytes (names are shorter still:
/// [`tidemark_names::MAX_NAME_LEN`]).
pub const MAX_NAME: usize = 255;
/// The release of this code, as a hello or welcome (version 2 on) names it.
pub const SOFTWARE: &str = env!("CARGO_PKG_VERSION");
/// The longest error message, in bytes.
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// The most disks a consistency group may have.
pub const MAX_DISKS: usize = 4096;
/// The most digests one request may ask for (32 MiB of digests).
pub const MAX_DIGESTS: u64 = 1 << 20;
/// The longest VM spec a `vm-spec` message carries, in bytes.
pub const MAX_VM_SPEC: usize = 64 << 10;
/// The longest reason a refused VM spec carries, in bytes.
pub const MAX_VM_SPEC_REASON: usize = 4096;

/// The longest certificate signing request a `renew-request` carries.
pub const MAX_RENEW_REQUEST: usize = 16 << 10;
/// The longest certificate, and CA bundle, a `renewed` message carries.
pub const MAX_RENEWED_PEM: usize = 64 << 10;
/// The longest reason a refused renewal carries, in bytes.
pub const MAX_RENEW_REASON: usize = 4096;

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// [`Message::Hello`].
    Hello,
    /// [`Message::Welcome`].
    Welcome,
    /// [`Message::Records`].
    Records,
    /// [`Message::Chunk`].
    Chunk,
    /// [`Message::DigestRequest`].
    DigestRequest,
    /// [`Message::Digests`].
    Digests,
    /// [`Message::ResyncDone`].
    ResyncDone,
    /// [`Message::Ack`].
    Ack,
    /// [`Message::Error`].
    Error,
    /// [`Message::DrainRequest`].
    DrainRequest,
    /// [`Message::Drained`].
    Drained,
    /// [`Message::Hold`] with [`HoldMessage::Open`].
    HoldOpen,
    /// [`Message::Hold`] with [`HoldMessage::Held`].
    Held,
    /// [`Message::Hold`] with [`HoldMessage::Release`].
    HoldRelease,
    /// [`Message::Hold`] with [`HoldMessage::Released`].
    Released,
    /// [`Message::VmSpec`].
    VmSpec,
    /// [`Message::VmSpecReply`].
    VmSpecReply,
    /// [`Message::Hold`] with [`HoldMessage::Quiesce`].
    HoldQuiesce,
    /// [`Message::Hold`] with [`HoldMessage::Quiesced`].
    Quiesced,
    /// [`Message::Hold`] with [`HoldMessage::Thaw`].
    HoldThaw,
    /// [`Message::Hold`] with [`HoldMessage::Thawed`].
    Thawed,
    /// [`Message::RenewRequest`].
    RenewRequest,
    /// [`Message::Renewed`].
    Renewed,
    /// [`Message::Redirect`].
    Redirect,
    /// [`Message::StatusReport`].
    StatusReport,
}

impl MessageType {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            MessageType::Hello => 1,
            MessageType::Welcome => 2,
            MessageType::Records => 3,
            MessageType::Chunk => 4,
            MessageType::DigestRequest => 5,
            MessageType::Digests => 6,
            MessageType::ResyncDone => 7,
            MessageType::Ack => 8,
            MessageType::Error => 9,
            MessageType::DrainRequest => 10,
            MessageType::Drained => 11,
            MessageType::HoldOpen => 12,
            MessageType::Held => 13,
            MessageType::HoldRelease => 14,
            MessageType::Released => 15,
            MessageType::VmSpec => 16,
            MessageType::VmSpecReply => 17,
            MessageType::HoldQuiesce => 18,
            MessageType::Quiesced => 19,
            MessageType::HoldThaw => 20,
            MessageType::Thawed => 21,
            MessageType::RenewRequest => 22,
            MessageType::Renewed => 23,
            MessageType::Redirect => 24,
            MessageType::StatusReport => 25,
        }
    }

    /// The type a byte stands for, if any.
    pub fn from_code(code: u8) -> Option<MessageType> {
        Some(match code {
            1 => MessageType::Hello,
            2 => MessageType::Welcome,
            3 => MessageType::Records,
            4 => MessageType::Chunk,
            5 => MessageType::DigestRequest,
            6 => MessageType::Digests,
            7 => MessageType::ResyncDone,
            8 => MessageType::Ack,
            9 => MessageType::Error,
            10 => MessageType::DrainRequest,
            11 => MessageType::Drained,
            12 => MessageType::HoldOpen,
            13 => MessageType::Held,
            14 => MessageType::HoldRelease,
            15 => MessageType::Released,
            16 => MessageType::VmSpec,
            17 => MessageType::VmSpecReply,
            18 => MessageType::HoldQuiesce,
            19 => MessageType::Quiesced,
            20 => MessageType::HoldThaw,
            21 => MessageType::Thawed,
            22 => MessageType::RenewRequest,
            23 => MessageType::Renewed,
            24 => MessageType::Redirect,
            25 => MessageType::StatusReport,
            _ => return None,
        })
    }

    /// The protocol version that added the message: it is never sent in
    /// a session of an older version.
    pub fn since(self) -> u16 {
        match self {
            MessageType::Hello
            | MessageType::Welcome
            | MessageType::Records
            | MessageType::Chunk
            | MessageType::DigestRequest
            | MessageType::Digests
            | MessageType::ResyncDone
            | MessageType::Ack
            | MessageType::Error
            | MessageType::DrainRequest
            | MessageType::Drained => 1,
            MessageType::HoldOpen
            | MessageType::Held
            | MessageType::HoldRelease
            | MessageType::Released
            | MessageType::VmSpec
            | MessageType::VmSpecReply => 3,
            MessageType::HoldQuiesce
            | MessageType::Quiesced
            | MessageType::HoldThaw
            | MessageType::Thawed => 4,
            MessageType::RenewRequest | MessageType::Renewed | MessageType::Redirect => 5,
            MessageType::StatusReport => 7,
        }
    }

    /// Whether the layout is the same in every version, so that it can be
    /// sent in (and read from) a frame of any version: the error, which
    /// must reach a peer of any version, and the hello, which only ever
    /// grows at its end (see [`crate::frame`]).
    fn layout_is_frozen(self) -> bool {
        matches!(self, MessageType::Hello | MessageType::Error)
    }

    /// The kebab-case name, for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            MessageType::Hello => "hello",
            MessageType::Welcome => "welcome",
            MessageType::Records => "records",
            MessageType::Chunk => "chunk",
            MessageType::DigestRequest => "digest-request",
            MessageType::Digests => "digests",
            MessageType::ResyncDone => "resync-done",
            MessageType::Ack => "ack",
            MessageType::Error => "error",
            MessageType::DrainRequest => "drain-request",
            MessageType::Drained => "drained",
            MessageType::HoldOpen => "hold-open",
            MessageType::Held => "held",
            MessageType::HoldRelease => "hold-release",
            MessageType::Released => "released",
            MessageType::VmSpec => "vm-spec",
            MessageType::VmSpecReply => "vm-spec-reply",
            MessageType::HoldQuiesce => "hold-quiesce",
            MessageType::Quiesced => "quiesced",
            MessageType::HoldThaw => "hold-thaw",
            MessageType::Thawed => "thawed",
            MessageType::RenewRequest => "renew-request",
            MessageType::Renewed => "renewed",
            MessageType::Redirect => "redirect",
            MessageType::StatusReport => "status-report",
        }
    }
}

/// Most resync-needed extents a Welcome lists.
pub const MAX_RESYNC_EXTENTS: usize = 1 << 20;

/// How far the initial sync of a disk has come at the replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSync {
    /// Disk id.
    pub id: DiskId,
    /// Initial sync is done below this byte offset (== size: complete).
    pub synced: u64,
}

/// Why a chunk is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkPurpose {
    /// Part of the first full copy of the disk; sent in offset order.
    InitialSync,
    /// A block found different by a digest comparison, or a hot extent.
    Resync,
}

/// What a chunk carries.
#[derive(Clone, PartialEq, Eq)]
pub enum ChunkData {
    /// The bytes at the chunk's offset.
    Data(Vec<u8>),
    /// A range of this many bytes that reads as zeroes, sent without data.
    Zero(u64),
}

impl ChunkData {
    /// Bytes of the disk the chunk covers.
    pub fn len(&self) -> u64 {
        match self {
            ChunkData::Data(d) => d.len() as u64,
            ChunkData::Zero(n) => *n,
        }
    }

    /// Whether the chunk covers nothing (never valid on the wire).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Debug for ChunkData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkData::Data(d) => write!(f, "Data({} bytes)", d.len()),
            ChunkData::Zero(n) => write!(f, "Zero({n})"),
        }
    }
}

/// Whether retrying can help: the class an error message carries, and the
/// class of the shipper's last failure in its status file (as `transient`
/// or `permanent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// Retry with backoff (network, busy, disk full, damaged frame).
    Transient,
    /// Stop and mark the disks critical until an admin acts.
    Permanent,
}

impl ErrorClass {
    /// `transient` or `permanent`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// What went wrong, for the peer's status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The host may not write this replica.
    Unauthorized,
    /// A disk the receiver does not hold.
    UnknownDisk,
    /// Records are missing between what the replica has and what arrived.
    SequenceGap,
    /// A frame or record did not verify.
    BadChecksum,
    /// The receiver cannot take this session now.
    Busy,
    /// The replica store is full.
    NoSpace,
    /// The peer broke the protocol.
    Protocol,
    /// The sender failed internally.
    Internal,
}

impl ErrorCode {
    fn code(self) -> u8 {
        match self {
            ErrorCode::Unauthorized => 1,
            ErrorCode::UnknownDisk => 2,
            ErrorCode::SequenceGap => 3,
            ErrorCode::BadChecksum => 4,
            ErrorCode::Busy => 5,
            ErrorCode::NoSpace => 6,
            ErrorCode::Protocol => 7,
            ErrorCode::Internal => 8,
        }
    }

    fn from_code(c: u8) -> Option<ErrorCode> {
        Some(match c {
            1 => ErrorCode::Unauthorized,
            2 => ErrorCode::UnknownDisk,
            3 => ErrorCode::SequenceGap,
            4 => ErrorCode::BadChecksum,
            5 => ErrorCode::Busy,
            6 => ErrorCode::NoSpace,
            7 => ErrorCode::Protocol,
            8 => ErrorCode::Internal,
            _ => return None,
        })
    }
}

/// Identifies a record: its sequence number and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordId {
    /// Sequence number.
    pub seq: Seq,
    /// Tracker generation.
    pub generation: u32,
}

impl RecordId {
    /// Whether `self` may come right after `prev` in the stream: the next
    /// sequence number of the same generation, or a jump forward into a
    /// newer generation (the tracker restarted uncleanly).
    pub fn follows(self, prev: RecordId) -> bool {
        (self.generation == prev.generation && prev.seq.checked_add(1) == Some(self.seq))
            || (self.generation > prev.generation && self.seq > prev.seq)
    }
}

/// Why records cannot form (or be read from) a batch.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BatchError {
    /// A record does not verify (checksum or structure).
    #[error("record {index} of the batch does not verify")]
    Record {
        /// Position in the batch.
        index: u32,
        /// What is wrong.
        #[source]
        source: record::DecodeError,
    },
    /// Records do not follow each other.
    #[error("record {next:?} cannot follow {prev:?}")]
    NotConsecutive {
        /// The earlier record.
        prev: RecordId,
        /// The one after it.
        next: RecordId,
    },
    /// `push` was given more (or other) bytes than one record.
    #[error("{0} bytes after the record")]
    TrailingBytes(usize),
    /// The batch would exceed the frame limit.
    #[error("the batch would exceed {MAX_FRAME_BODY} bytes")]
    Full,
}

impl BatchError {
    /// Whether a checksum failed (bytes damaged, rather than a wrong sender).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            BatchError::Record {
                source: record::DecodeError::ChecksumMismatch { .. },
                ..
            }
        )
    }
}

/// Consecutive change-log records, each byte-for-byte as in the log, so the
/// log's own per-record CRC32C checks them end to end. A batch only exists
/// verified: every constructor checks every record and their order (but
/// [`push_verified`](Self::push_verified), for records their reader has
/// verified). It knows the CRC32C of its bytes, combined from its records'
/// own checksums, so a frame carrying it raw is checksummed without
/// reading them again.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct RecordBatch {
    bytes: BatchBytes,
    /// CRC32C of the bytes.
    crc: u32,
    count: u32,
    first: Option<RecordId>,
    last: Option<RecordId>,
}

/// A batch's bytes: being built on the sending side, or a slice of the
/// bytes received (never copied).
#[derive(Clone)]
enum BatchBytes {
    Built(Vec<u8>),
    Received(Bytes),
}

/// The same bytes are the same batch, however they came.
impl PartialEq for BatchBytes {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for BatchBytes {}

impl Default for BatchBytes {
    fn default() -> Self {
        BatchBytes::Built(Vec::new())
    }
}

impl BatchBytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            BatchBytes::Built(v) => v,
            BatchBytes::Received(b) => b,
        }
    }

    /// The bytes to append to (a received batch is copied once, the first
    /// time: nothing appends to one on the hot paths).
    fn appendable(&mut self) -> &mut Vec<u8> {
        if let BatchBytes::Received(b) = self {
            *self = BatchBytes::Built(b.to_vec());
        }
        match self {
            BatchBytes::Built(v) => v,
            BatchBytes::Received(_) => unreachable!("made a Vec above"),
        }
    }
}

impl fmt::Debug for RecordBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordBatch")
            .field("count", &self.count)
            .field("first", &self.first)
            .field("last", &self.last)
            .field("bytes", &self.byte_len())
            .finish()
    }
}

impl RecordBatch {
    /// An empty batch.
    pub fn new() -> RecordBatch {
        RecordBatch::default()
    }

    /// An empty batch with room for `bytes` of records.
    pub fn with_capacity(bytes: usize) -> RecordBatch {
        RecordBatch {
            bytes: BatchBytes::Built(Vec::with_capacity(bytes.min(MAX_FRAME_BODY as usize))),
            ..RecordBatch::default()
        }
    }

    /// Appends one encoded record (exactly one, as read from the log),
    /// verifying it and that it follows the previous one.
    pub fn push(&mut self, encoded: &[u8]) -> Result<(), BatchError> {
        let (header, crc) = verify_one(encoded, self.count)?;
        if header.record_len() != encoded.len() {
            return Err(BatchError::TrailingBytes(
                encoded.len() - header.record_len(),
            ));
        }
        self.append(header, crc, &encoded[..HEADER_LEN], &encoded[HEADER_LEN..])
    }

    /// Appends one record that its reader has verified already, as the
    /// log reader verifies every record it returns: its checksum is not
    /// computed again (the bytes' CRC32C is derived from the stored one),
    /// only its order is checked. The header is written as decoded, the
    /// stored checksum included, so a record that did not verify goes out
    /// as it was and the receiver refuses it.
    pub fn push_verified(&mut self, header: &Header, payload: &[u8]) -> Result<(), BatchError> {
        if payload.len() != header.payload_len as usize {
            return Err(BatchError::Record {
                index: self.count,
                source: record::DecodeError::Truncated {
                    needed: header.record_len(),
                    available: HEADER_LEN + payload.len(),
                },
            });
        }
        let bytes = header.to_bytes();
        self.append(*header, header.bytes_crc(&bytes), &bytes, payload)
    }

    fn append(
        &mut self,
        header: Header,
        crc: u32,
        header_bytes: &[u8],
        payload: &[u8],
    ) -> Result<(), BatchError> {
        if self.byte_len() + header.record_len() > MAX_FRAME_BODY as usize {
            return Err(BatchError::Full);
        }
        self.note(header, crc)?;
        let bytes = self.bytes.appendable();
        bytes.extend_from_slice(header_bytes);
        bytes.extend_from_slice(payload);
        Ok(())
    }

    /// A batch of these encoded records, in order.
    pub fn from_records<'a>(
        records: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<RecordBatch, BatchError> {
        let mut batch = RecordBatch::new();
        for r in records {
            batch.push(r)?;
        }
        Ok(batch)
    }

    /// Verifies concatenated records received from the peer.
    pub fn from_bytes(bytes: impl Into<Bytes>) -> Result<RecordBatch, BatchError> {
        let bytes = bytes.into();
        if bytes.len() > MAX_FRAME_BODY as usize {
            return Err(BatchError::Full);
        }
        let mut batch = RecordBatch::new();
        let mut at = 0;
        while at < bytes.len() {
            let (header, crc) = verify_one(&bytes[at..], batch.count)?;
            batch.note(header, crc)?;
            at += header.record_len();
        }
        batch.bytes = BatchBytes::Received(bytes);
        Ok(batch)
    }

    /// The batch a raw Records frame carries, its records' checksums and
    /// the frame's checked in one pass over the bytes: the frame's
    /// checksum is combined from the records' (each byte is read once).
    /// What is refused is refused as [`FrameDecoder::next_frame`] and
    /// [`RecordBatch::from_bytes`] after it would: damage the frame's
    /// checksum sees is [`DecodeError::ChecksumMismatch`], whatever a
    /// record's check found first.
    fn from_raw_frame(frame: UncheckedFrame) -> Result<RecordBatch, DecodeError> {
        let body = &frame.wire;
        let mut batch = RecordBatch::new();
        let mut at = 0;
        let mut failed = None;
        while at < body.len() {
            match verify_one(&body[at..], batch.count)
                .and_then(|(h, crc)| batch.note(h, crc).map(|()| h))
            {
                Ok(header) => at += header.record_len(),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            None => {
                frame.verify_crc(frame.frame_crc(batch.crc))?;
                batch.bytes = BatchBytes::Received(frame.wire);
                Ok(batch)
            }
            Some(e) => {
                // Which came first, damage on the way or records wrong as
                // sent: the frame's checksum over the whole body says.
                frame.verify_crc(crc32c::crc32c_append(frame.crc_seed, body))?;
                Err(DecodeError::Batch(e))
            }
        }
    }

    fn note(&mut self, header: Header, crc: u32) -> Result<(), BatchError> {
        let id = RecordId {
            seq: header.seq,
            generation: header.generation,
        };
        if let Some(prev) = self.last {
            if !id.follows(prev) {
                return Err(BatchError::NotConsecutive { prev, next: id });
            }
        }
        self.first.get_or_insert(id);
        self.last = Some(id);
        self.count += 1;
        self.crc = crc32c_combine(self.crc, crc, header.record_len());
        Ok(())
    }

    /// The first record's id.
    pub fn first(&self) -> Option<RecordId> {
        self.first
    }

    /// The last record's id.
    pub fn last(&self) -> Option<RecordId> {
        self.last
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether the batch holds no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the encoded records.
    pub fn byte_len(&self) -> usize {
        self.as_bytes().len()
    }

    /// The encoded records, back to back.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.as_slice()
    }

    /// This batch with every record in format `version` or older (see
    /// [`Record::in_version`](record::Record::in_version)): what a session
    /// of a protocol version whose peer reads no newer records carries.
    pub fn in_record_version(&self, version: u8) -> Result<RecordBatch, BatchError> {
        let mut out = RecordBatch::new();
        let mut changed = false;
        for (index, record) in (0u32..).zip(self.records()) {
            let record = record?;
            changed |= record.header.version > version;
            let record = record
                .to_record()
                .in_version(version)
                .map_err(|source| BatchError::Record { index, source })?;
            out.push(&record.encode())?;
        }
        Ok(if changed { out } else { self.clone() })
    }

    /// The records, decoded one by one. They are not verified again: the
    /// batch only exists verified (its bytes never change after).
    pub fn records(&self) -> BatchRecords<'_> {
        BatchRecords {
            bytes: self.as_bytes(),
            index: 0,
            last: None,
        }
    }
}

/// Verifies one record at the start of `bytes`: its header and the CRC32C
/// of its bytes.
fn verify_one(bytes: &[u8], index: u32) -> Result<(Header, u32), BatchError> {
    let fail = |source| BatchError::Record { index, source };
    let header = Header::decode(bytes).map_err(fail)?;
    let payload =
        bytes
            .get(HEADER_LEN..header.record_len())
            .ok_or(fail(record::DecodeError::Truncated {
                needed: header.record_len(),
                available: bytes.len(),
            }))?;
    let crc = header.verify_bytes_crc(bytes, payload).map_err(fail)?;
    Ok((header, crc))
}

/// Iterator over a batch's records; see [`RecordBatch::records`].
pub struct BatchRecords<'a> {
    bytes: &'a [u8],
    index: u32,
    last: Option<RecordId>,
}

impl<'a> Iterator for BatchRecords<'a> {
    /// A record borrowing its payload from the batch's bytes (no copy).
    type Item = Result<RecordRef<'a>, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.bytes.is_empty() {
            return None;
        }
        let index = self.index;
        // The batch verified every record and their order when it was
        // made; this only takes them apart (the checks that cost nothing
        // stay, so a broken invariant is an error, not a wrong record).
        let result = Header::decode(self.bytes)
            .and_then(|header| {
                let payload = self.bytes.get(HEADER_LEN..header.record_len()).ok_or(
                    record::DecodeError::Truncated {
                        needed: header.record_len(),
                        available: self.bytes.len(),
                    },
                )?;
                Ok(RecordRef { header, payload })
            })
            .map_err(|source| BatchError::Record { index, source })
            .and_then(|r| {
                let id = RecordId {
                    seq: r.header.seq,
                    generation: r.header.generation,
                };
                match self.last {
                    Some(prev) if !id.follows(prev) => {
                        Err(BatchError::NotConsecutive { prev, next: id })
                    }
                    _ => Ok((r, id)),
                }
            });
        match result {
            Ok((r, id)) => {
                self.bytes = &self.bytes[r.header.record_len()..];
                self.index += 1;
                self.last = Some(id);
                Some(Ok(r))
            }
            Err(e) => {
                self.bytes = &[];
                Some(Err(e))
            }
        }
    }
}

/// One protocol message. See the module documentation for the layouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Shipper → receiver, the first frame on a connection.
    Hello {
        /// The protected host (must match its certificate).
        host: Name,
        /// The consistency group.
        group: Name,
        /// The tracker generation the host is at.
        generation: u32,
        /// The group's disks.
        disks: Vec<Disk>,
        /// (Version 2 on; 1 when absent.) The oldest protocol version the
        /// shipper offers; the newest is the version of the hello's frame.
        min_version: u16,
        /// (Version 2 on; empty when absent.) The shipper's release.
        software: String,
    },
    /// Receiver → shipper: where to resume.
    Welcome {
        /// Every record up to this one is durable at the replica (0: none).
        durable_seq: Seq,
        /// The generation of that record.
        generation: u32,
        /// How far each disk's initial sync has come.
        disks: Vec<DiskSync>,
        /// Resync-needed extents the replica still waits for (their records
        /// are durable, so a restarted shipper learns them only here).
        resyncing: Vec<Extent>,
        /// (Version 2 on; empty when absent.) The receiver's release.
        software: String,
    },
    /// Shipper → receiver: consecutive log records.
    Records(RecordBatch),
    /// Shipper → receiver: disk data, applied after record `after_seq` and
    /// before the next one.
    Chunk {
        /// Disk id.
        disk: DiskId,
        /// Byte offset on the disk.
        offset: u64,
        /// The last record the receiver must have applied before this chunk.
        after_seq: Seq,
        /// Initial sync or resync.
        purpose: ChunkPurpose,
        /// The bytes, or a zero range.
        data: ChunkData,
    },
    /// Shipper → receiver: send the digests of these blocks of the replica.
    DigestRequest {
        /// Disk id.
        disk: DiskId,
        /// First byte (a multiple of the block size is usual, not required).
        offset: u64,
        /// Bytes to cover; the last block may be short.
        length: u64,
        /// Block size in bytes.
        block_size: u32,
    },
    /// Receiver → shipper: one BLAKE3 digest per block of the request.
    Digests {
        /// Disk id.
        disk: DiskId,
        /// First byte.
        offset: u64,
        /// Block size.
        block_size: u32,
        /// The digests, in block order.
        digests: Vec<[u8; 32]>,
    },
    /// Shipper → receiver: a resync-needed extent is in sync as of `after_seq`.
    ResyncDone {
        /// Disk id.
        disk: DiskId,
        /// First byte.
        offset: u64,
        /// Bytes.
        length: u64,
        /// The last record the receiver must have applied.
        after_seq: Seq,
    },
    /// Receiver → shipper: everything up to `durable_seq`, and these sync
    /// positions, is durable at the replica.
    Ack {
        /// The highest durable record (0: none).
        durable_seq: Seq,
        /// Its generation.
        generation: u32,
        /// Frames consumed on this connection (flow control).
        frames: u64,
        /// Durable initial-sync positions.
        disks: Vec<DiskSync>,
    },
    /// Either way; the sender closes the connection after it.
    Error {
        /// Whether retrying can help.
        class: ErrorClass,
        /// What went wrong.
        code: ErrorCode,
        /// For people.
        message: String,
    },
    /// Receiver → shipper: stop the protected host's tracker and drain the
    /// group to a final barrier (a planned failover).
    DrainRequest {
        /// Names the request; the answer repeats it.
        id: u64,
    },
    /// Shipper → receiver: the answer to a [`Message::DrainRequest`].
    Drained {
        /// The request's id.
        id: u64,
        /// The last record of the stopped tracker's log (valid when `error`
        /// is empty); every record up to it precedes this message.
        last_seq: Seq,
        /// Why the group could not be drained; empty when it was.
        error: String,
    },
    /// A span point's hold (version 3 on), on the connection's hold
    /// stream: open and release from the receiver, held and released from
    /// the shipper, relaying its tracker's answers.
    Hold(HoldMessage),
    /// Shipper → receiver (version 3 on): the group's VM spec, sent when a
    /// session starts and whenever it changes on the protected site. The
    /// receiver answers with [`Message::VmSpecReply`].
    VmSpec {
        /// The spec's TOML text (at most [`MAX_VM_SPEC`] bytes, not empty).
        text: String,
    },
    /// Receiver → shipper (version 3 on): what became of a
    /// [`Message::VmSpec`].
    VmSpecReply(VmSpecReply),
    /// Shipper → receiver (version 5 on), first on a stream of its own:
    /// renew this host's certificate.
    RenewRequest {
        /// A certificate signing request (PEM, at most
        /// [`MAX_RENEW_REQUEST`] bytes) for the host the connection
        /// authenticated as, signed with its key.
        csr: String,
    },
    /// Receiver → shipper (version 5 on): the answer to a
    /// [`Message::RenewRequest`].
    Renewed(Renewed),
    /// Receiver → shipper (version 5 on), instead of the welcome: another
    /// receiver sharing the replica store owns the group; connect there.
    Redirect {
        /// That receiver's address, `host:port` (1 to 255 bytes).
        to: String,
    },
    /// Shipper → receiver (version 7 on), on a stream of its own: what
    /// the shipper knows of its group now; the newest replaces the others.
    StatusReport(StatusReport),
}

/// The receiver's answer to a renewal request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewed {
    /// A new certificate was signed.
    Issued {
        /// The new host certificate (PEM, at most [`MAX_RENEWED_PEM`]).
        certificate: String,
        /// Every CA certificate the receiver trusts (PEM, at most
        /// [`MAX_RENEWED_PEM`]).
        ca_bundle: String,
    },
    /// The receiver will not renew; the host keeps its certificate.
    Refused {
        /// Why, for the admin (at most [`MAX_RENEW_REASON`] bytes).
        reason: String,
    },
}

/// The receiver's answer to a VM spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmSpecReply {
    /// The replica holds the spec (newly, or it was its current version
    /// already).
    Kept {
        /// The first record the version applies to: a recovery point at
        /// or after it boots with this spec.
        from_seq: Seq,
    },
    /// The replica refused the spec; its previous version (if any) stays
    /// current and replication goes on.
    Refused {
        /// Why, for the admin (at most [`MAX_VM_SPEC_REASON`] bytes).
        reason: String,
    },
}

fn truncate_utf8(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Message {
    /// An error message, its text cut to [`MAX_ERROR_MESSAGE`] bytes so it
    /// always encodes.
    pub fn error(class: ErrorClass, code: ErrorCode, message: &str) -> Message {
        Message::Error {
            class,
            code,
            message: truncate_utf8(message, MAX_ERROR_MESSAGE),
        }
    }

    /// The message's type byte.
    pub fn msg_type(&self) -> MessageType {
        match self {
            Message::Hello { .. } => MessageType::Hello,
            Message::Welcome { .. } => MessageType::Welcome,
            Message::Records(_) => MessageType::Records,
            Message::Chunk { .. } => MessageType::Chunk,
            Message::DigestRequest { .. } => MessageType::DigestRequest,
            Message::Digests { .. } => MessageType::Digests,
            Message::ResyncDone { .. } => MessageType::ResyncDone,
            Message::Ack { .. } => MessageType::Ack,
            Message::Error { .. } => MessageType::Error,
            Message::DrainRequest { .. } => MessageType::DrainRequest,
            Message::Drained { .. } => MessageType::Drained,
            Message::Hold(HoldMessage::Open(_)) => MessageType::HoldOpen,
            Message::Hold(HoldMessage::Held(_)) => MessageType::Held,
            Message::Hold(HoldMessage::Release(_)) => MessageType::HoldRelease,
            Message::Hold(HoldMessage::Released(_)) => MessageType::Released,
            Message::Hold(HoldMessage::Quiesce(_)) => MessageType::HoldQuiesce,
            Message::Hold(HoldMessage::Quiesced(_)) => MessageType::Quiesced,
            Message::Hold(HoldMessage::Thaw(_)) => MessageType::HoldThaw,
            Message::Hold(HoldMessage::Thawed(_)) => MessageType::Thawed,
            Message::VmSpec { .. } => MessageType::VmSpec,
            Message::VmSpecReply(_) => MessageType::VmSpecReply,
            Message::RenewRequest { .. } => MessageType::RenewRequest,
            Message::Renewed(_) => MessageType::Renewed,
            Message::Redirect { .. } => MessageType::Redirect,
            Message::StatusReport(_) => MessageType::StatusReport,
        }
    }

    /// Encodes the message as a whole frame of protocol `version`: with
    /// the fields that version has, refused if the message does not exist
    /// in it or this code does not speak it (the hello and the error also
    /// in the older versions their layout covers).
    pub fn encode(&self, version: u16, compression: Compression) -> Result<Vec<u8>, EncodeError> {
        if let Message::Records(batch) = self {
            return Message::encode_records(batch, version, compression);
        }
        let (head, data) = self.encode_body_parts(version)?;
        encode_frame_parts(version, self.msg_type(), &head, data, compression)
    }

    /// Encodes a Records frame straight from `batch` (see
    /// [`Message::encode`]): the batch's bytes are the body, so they are
    /// read once by the compressor or copied once into the frame, never
    /// cloned into a message first (the shipper's hot path).
    pub fn encode_records(
        batch: &RecordBatch,
        version: u16,
        compression: Compression,
    ) -> Result<Vec<u8>, EncodeError> {
        check_spoken(MessageType::Records, version)?;
        encode_frame_with_crc(
            version,
            MessageType::Records,
            batch.as_bytes(),
            Some(batch.crc),
            compression,
        )
    }

    /// Encodes the body alone, in protocol `version` (see [`Message::encode`]).
    pub fn encode_body(&self, version: u16) -> Result<Vec<u8>, EncodeError> {
        let (mut body, data) = self.encode_body_parts(version)?;
        body.extend_from_slice(data);
        Ok(body)
    }

    /// The body as its fields and the bytes that end it: a chunk's data,
    /// which [`Message::encode`] copies once, straight into the frame
    /// (empty for every other message).
    fn encode_body_parts(&self, version: u16) -> Result<(Vec<u8>, &[u8]), EncodeError> {
        check_spoken(self.msg_type(), version)?;
        let mut tail: &[u8] = &[];
        let mut w = Writer(Vec::new());
        match self {
            Message::Hello {
                host,
                group,
                generation,
                disks,
                min_version,
                software,
            } => {
                w.str8("host", host)?;
                w.str8("group", group)?;
                w.u32(*generation);
                w.count("disks", disks.len(), MAX_DISKS)?;
                for d in disks {
                    w.u32(d.id.get());
                    w.str8("disk name", &d.name)?;
                    w.u64(d.size);
                }
                if version >= 2 {
                    if *min_version == 0 || *min_version > version {
                        return Err(EncodeError::InvalidField {
                            field: "min version",
                            reason: "not a version at or below the hello's",
                        });
                    }
                    w.u16(*min_version);
                    w.str8("software", software)?;
                }
            }
            Message::Welcome {
                durable_seq,
                generation,
                disks,
                resyncing,
                software,
            } => {
                w.seq(*durable_seq);
                w.u32(*generation);
                w.syncs(disks)?;
                w.count("resync extents", resyncing.len(), MAX_RESYNC_EXTENTS)?;
                for e in resyncing {
                    w.u32(e.disk.get());
                    w.u64(e.offset);
                    w.u64(e.length);
                }
                if version >= 2 {
                    w.str8("software", software)?;
                }
            }
            Message::Records(batch) => return Ok((Vec::new(), batch.as_bytes())),
            Message::Chunk {
                disk,
                offset,
                after_seq,
                purpose,
                data,
            } => {
                if data.is_empty() {
                    return Err(EncodeError::InvalidField {
                        field: "chunk data",
                        reason: "a chunk covers at least one byte",
                    });
                }
                if offset.checked_add(data.len()).is_none() {
                    return Err(EncodeError::InvalidField {
                        field: "chunk offset",
                        reason: "offset + length overflows",
                    });
                }
                w.disk(*disk);
                w.u64(*offset);
                w.seq(*after_seq);
                w.u8(match purpose {
                    ChunkPurpose::InitialSync => 0,
                    ChunkPurpose::Resync => 1,
                });
                match data {
                    ChunkData::Data(d) => {
                        w.u8(0);
                        tail = d;
                    }
                    ChunkData::Zero(n) => {
                        w.u8(1);
                        w.u64(*n);
                    }
                }
            }
            Message::DigestRequest {
                disk,
                offset,
                length,
                block_size,
            } => {
                digest_count(*offset, *length, *block_size).map_err(|reason| {
                    EncodeError::InvalidField {
                        field: "digest request",
                        reason,
                    }
                })?;
                w.disk(*disk);
                w.u64(*offset);
                w.u64(*length);
                w.u32(*block_size);
            }
            Message::Digests {
                disk,
                offset,
                block_size,
                digests,
            } => {
                w.disk(*disk);
                w.u64(*offset);
                w.u32(*block_size);
                w.count("digests", digests.len(), MAX_DIGESTS as usize)?;
                for d in digests {
                    w.0.extend_from_slice(d);
                }
            }
            Message::ResyncDone {
                disk,
                offset,
                length,
                after_seq,
            } => {
                w.disk(*disk);
                w.u64(*offset);
                w.u64(*length);
                w.seq(*after_seq);
            }
            Message::Ack {
                durable_seq,
                generation,
                frames,
                disks,
            } => {
                w.seq(*durable_seq);
                w.u32(*generation);
                w.u64(*frames);
                w.syncs(disks)?;
            }
            Message::Error {
                class,
                code,
                message,
            } => {
                w.u8(match class {
                    ErrorClass::Transient => 0,
                    ErrorClass::Permanent => 1,
                });
                w.u8(code.code());
                if message.len() > MAX_ERROR_MESSAGE {
                    return Err(EncodeError::FieldTooLong {
                        field: "error message",
                        len: message.len(),
                        max: MAX_ERROR_MESSAGE,
                    });
                }
                w.u16(message.len() as u16);
                w.0.extend_from_slice(message.as_bytes());
            }
            Message::DrainRequest { id } => w.u64(*id),
            Message::Drained {
                id,
                last_seq,
                error,
            } => {
                w.u64(*id);
                w.seq(*last_seq);
                if error.len() > MAX_ERROR_MESSAGE {
                    return Err(EncodeError::FieldTooLong {
                        field: "drain error",
                        len: error.len(),
                        max: MAX_ERROR_MESSAGE,
                    });
                }
                w.u16(error.len() as u16);
                w.0.extend_from_slice(error.as_bytes());
            }
            Message::Hold(hold) => encode_hold(&mut w, hold)?,
            Message::VmSpec { text } => {
                if text.is_empty() || text.len() > MAX_VM_SPEC {
                    return Err(EncodeError::InvalidField {
                        field: "vm spec",
                        reason: "a VM spec is 1 byte to 64 KiB",
                    });
                }
                tail = text.as_bytes();
            }
            Message::VmSpecReply(VmSpecReply::Kept { from_seq }) => {
                w.u8(0);
                w.seq(*from_seq);
            }
            Message::VmSpecReply(VmSpecReply::Refused { reason }) => {
                w.u8(1);
                w.str16("vm spec refusal", reason, MAX_VM_SPEC_REASON)?;
            }
            Message::RenewRequest { csr } => {
                if csr.is_empty() || csr.len() > MAX_RENEW_REQUEST {
                    return Err(EncodeError::InvalidField {
                        field: "renewal request",
                        reason: "a certificate signing request is 1 byte to 16 KiB",
                    });
                }
                tail = csr.as_bytes();
            }
            Message::Renewed(Renewed::Issued {
                certificate,
                ca_bundle,
            }) => {
                for pem in [certificate, ca_bundle] {
                    if pem.is_empty() || pem.len() > MAX_RENEWED_PEM {
                        return Err(EncodeError::InvalidField {
                            field: "renewed certificate",
                            reason: "a certificate or CA bundle is 1 byte to 64 KiB",
                        });
                    }
                }
                w.u8(0);
                w.u32(certificate.len() as u32);
                w.0.extend_from_slice(certificate.as_bytes());
                tail = ca_bundle.as_bytes();
            }
            Message::Renewed(Renewed::Refused { reason }) => {
                w.u8(1);
                w.str16("renewal refusal", reason, MAX_RENEW_REASON)?;
            }
            Message::Redirect { to } => {
                if to.is_empty() {
                    return Err(EncodeError::InvalidField {
                        field: "redirect address",
                        reason: "empty",
                    });
                }
                w.str8("redirect address", to)?;
            }
            Message::StatusReport(report) => encode_report(&mut w, report)?,
        }
        if w.0.len() > MAX_FRAME_BODY as usize {
            return Err(EncodeError::BodyTooLarge(w.0.len()));
        }
        Ok((w.0, tail))
    }

    /// Decodes a frame's body, as the frame's version lays it out. A frame
    /// of a version this code does not speak is refused, but for a hello
    /// (whose fields of the versions known here are read, the newer ones
    /// after them ignored) and an error (the same in every version).
    pub fn decode(frame: Frame) -> Result<Message, DecodeError> {
        Message::check_decodable(frame.msg_type, frame.version)?;
        match frame.msg_type {
            // The batch keeps the body as it is: no copy of the records.
            MessageType::Records => RecordBatch::from_bytes(frame.body)
                .map(Message::Records)
                .map_err(DecodeError::Batch),
            msg_type => decode_fields(msg_type, frame.version, &frame.body),
        }
    }

    /// Whether a body of `msg_type` in a frame of `version` can be
    /// decoded here (see [`Message::decode`]).
    fn check_decodable(msg_type: MessageType, version: u16) -> Result<(), DecodeError> {
        if !msg_type.layout_is_frozen()
            && !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
        {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        if version < msg_type.since() {
            return Err(DecodeError::NotInVersion {
                msg: msg_type.name(),
                version,
            });
        }
        Ok(())
    }
}

fn decode_fields(msg_type: MessageType, version: u16, body: &[u8]) -> Result<Message, DecodeError> {
    {
        let mut r = Reader { b: body, at: 0 };
        let msg = match msg_type {
            MessageType::Hello => {
                let host = r.name("host")?;
                let group = r.name("group")?;
                let generation = r.u32("generation")?;
                let n = r.count("disk count", 4 + 1 + 8, MAX_DISKS)?;
                let mut disks = Vec::with_capacity(n);
                for _ in 0..n {
                    disks.push(Disk {
                        id: DiskId(r.u32("disk id")?),
                        name: r.name("disk name")?,
                        size: r.u64("disk size")?,
                    });
                }
                let (mut min_version, mut software) = (1, String::new());
                if version >= 2 {
                    min_version = r.u16("min version")?;
                    software = r.str8("software")?;
                    if min_version == 0 || min_version > version {
                        return Err(invalid(
                            "min version",
                            "not a version at or below the hello's",
                        ));
                    }
                }
                if version > PROTOCOL_VERSION {
                    // Fields of versions newer than this code's.
                    r.rest();
                }
                Message::Hello {
                    host,
                    group,
                    generation,
                    disks,
                    min_version,
                    software,
                }
            }
            MessageType::Welcome => {
                let durable_seq = r.seq("durable seq")?;
                let generation = r.u32("generation")?;
                let disks = r.syncs()?;
                let n = r.count("resync extent count", 20, MAX_RESYNC_EXTENTS)?;
                let mut resyncing = Vec::with_capacity(n);
                for _ in 0..n {
                    resyncing.push(Extent {
                        disk: DiskId(r.u32("resync disk")?),
                        offset: r.u64("resync offset")?,
                        length: r.u64("resync length")?,
                    });
                }
                let software = if version >= 2 {
                    r.str8("software")?
                } else {
                    String::new()
                };
                Message::Welcome {
                    durable_seq,
                    generation,
                    disks,
                    resyncing,
                    software,
                }
            }
            MessageType::Records => {
                return Err(invalid("message type", "records have no fixed fields"))
            }
            MessageType::Chunk => {
                let disk = r.disk("disk")?;
                let offset = r.u64("offset")?;
                let after_seq = r.seq("after seq")?;
                let purpose = match r.u8("purpose")? {
                    0 => ChunkPurpose::InitialSync,
                    1 => ChunkPurpose::Resync,
                    _ => return Err(invalid("purpose", "unknown chunk purpose")),
                };
                let data = match r.u8("data kind")? {
                    0 => ChunkData::Data(r.rest().to_vec()),
                    1 => ChunkData::Zero(r.u64("zero length")?),
                    _ => return Err(invalid("data kind", "unknown chunk data kind")),
                };
                if data.is_empty() {
                    return Err(invalid("chunk data", "a chunk covers at least one byte"));
                }
                if offset.checked_add(data.len()).is_none() {
                    return Err(invalid("chunk offset", "offset + length overflows"));
                }
                Message::Chunk {
                    disk,
                    offset,
                    after_seq,
                    purpose,
                    data,
                }
            }
            MessageType::DigestRequest => {
                let disk = r.disk("disk")?;
                let offset = r.u64("offset")?;
                let length = r.u64("length")?;
                let block_size = r.u32("block size")?;
                digest_count(offset, length, block_size)
                    .map_err(|reason| invalid("digest request", reason))?;
                Message::DigestRequest {
                    disk,
                    offset,
                    length,
                    block_size,
                }
            }
            MessageType::Digests => {
                let disk = r.disk("disk")?;
                let offset = r.u64("offset")?;
                let block_size = r.u32("block size")?;
                let n = r.count("digest count", 32, MAX_DIGESTS as usize)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.array::<32>("digest")?);
                }
                Message::Digests {
                    disk,
                    offset,
                    block_size,
                    digests,
                }
            }
            MessageType::ResyncDone => {
                let disk = r.disk("disk")?;
                let offset = r.u64("offset")?;
                let length = r.u64("length")?;
                if length == 0 || offset.checked_add(length).is_none() {
                    return Err(invalid("resync extent", "empty or overflowing extent"));
                }
                Message::ResyncDone {
                    disk,
                    offset,
                    length,
                    after_seq: r.seq("after seq")?,
                }
            }
            MessageType::Ack => Message::Ack {
                durable_seq: r.seq("durable seq")?,
                generation: r.u32("generation")?,
                frames: r.u64("frames")?,
                disks: r.syncs()?,
            },
            MessageType::Error => {
                let class = match r.u8("class")? {
                    0 => ErrorClass::Transient,
                    1 => ErrorClass::Permanent,
                    _ => return Err(invalid("class", "unknown error class")),
                };
                let code = ErrorCode::from_code(r.u8("code")?)
                    .ok_or(invalid("code", "unknown error code"))?;
                let len = r.u16("message length")? as usize;
                if len > MAX_ERROR_MESSAGE {
                    return Err(invalid("error message", "longer than 4 KiB"));
                }
                let message = r.utf8("error message", len)?;
                Message::Error {
                    class,
                    code,
                    message,
                }
            }
            MessageType::DrainRequest => Message::DrainRequest { id: r.u64("id")? },
            MessageType::Drained => {
                let id = r.u64("id")?;
                let last_seq = r.seq("last seq")?;
                let len = r.u16("error length")? as usize;
                if len > MAX_ERROR_MESSAGE {
                    return Err(invalid("drain error", "longer than 4 KiB"));
                }
                Message::Drained {
                    id,
                    last_seq,
                    error: r.utf8("drain error", len)?,
                }
            }
            MessageType::HoldOpen
            | MessageType::Held
            | MessageType::HoldRelease
            | MessageType::Released
            | MessageType::HoldQuiesce
            | MessageType::Quiesced
            | MessageType::HoldThaw
            | MessageType::Thawed => Message::Hold(decode_hold(msg_type, &mut r)?),
            MessageType::VmSpec => {
                let text = r.rest();
                if text.is_empty() || text.len() > MAX_VM_SPEC {
                    return Err(invalid("vm spec", "a VM spec is 1 byte to 64 KiB"));
                }
                let text = std::str::from_utf8(text)
                    .map_err(|_| invalid("vm spec", "not UTF-8"))?
                    .to_string();
                Message::VmSpec { text }
            }
            MessageType::Redirect => {
                let to = r.str8("redirect address")?;
                if to.is_empty() {
                    return Err(invalid("redirect address", "empty"));
                }
                Message::Redirect { to }
            }
            MessageType::StatusReport => Message::StatusReport(decode_report(&mut r)?),
            MessageType::VmSpecReply => Message::VmSpecReply(match r.u8("outcome")? {
                0 => VmSpecReply::Kept {
                    from_seq: r.seq("from seq")?,
                },
                1 => {
                    let len = r.u16("reason length")? as usize;
                    if len > MAX_VM_SPEC_REASON {
                        return Err(invalid("vm spec refusal", "longer than 4 KiB"));
                    }
                    VmSpecReply::Refused {
                        reason: r.utf8("vm spec refusal", len)?,
                    }
                }
                _ => return Err(invalid("outcome", "unknown vm spec outcome")),
            }),
            MessageType::RenewRequest => {
                let csr = r.rest();
                if csr.is_empty() || csr.len() > MAX_RENEW_REQUEST {
                    return Err(invalid(
                        "renewal request",
                        "a certificate signing request is 1 byte to 16 KiB",
                    ));
                }
                let csr = std::str::from_utf8(csr)
                    .map_err(|_| invalid("renewal request", "not UTF-8"))?
                    .to_string();
                Message::RenewRequest { csr }
            }
            MessageType::Renewed => Message::Renewed(match r.u8("outcome")? {
                0 => {
                    let len = r.u32("certificate length")? as usize;
                    if len == 0 || len > MAX_RENEWED_PEM {
                        return Err(invalid("renewed certificate", "not 1 byte to 64 KiB"));
                    }
                    let certificate = r.utf8("renewed certificate", len)?;
                    let bundle = r.rest();
                    if bundle.is_empty() || bundle.len() > MAX_RENEWED_PEM {
                        return Err(invalid("CA bundle", "not 1 byte to 64 KiB"));
                    }
                    let ca_bundle = std::str::from_utf8(bundle)
                        .map_err(|_| invalid("CA bundle", "not UTF-8"))?
                        .to_string();
                    Renewed::Issued {
                        certificate,
                        ca_bundle,
                    }
                }
                1 => {
                    let len = r.u16("reason length")? as usize;
                    if len > MAX_RENEW_REASON {
                        return Err(invalid("renewal refusal", "longer than 4 KiB"));
                    }
                    Renewed::Refused {
                        reason: r.utf8("renewal refusal", len)?,
                    }
                }
                _ => return Err(invalid("outcome", "unknown renewal outcome")),
            }),
        };
        let extra = r.b.len() - r.at;
        if extra != 0 {
            return Err(DecodeError::TrailingBytes {
                msg: msg_type.name(),
                extra,
            });
        }
        Ok(msg)
    }
}

/// The longest reason a refused hold carries, in bytes.
pub const MAX_HOLD_REASON: usize = 4096;

fn encode_report(w: &mut Writer, report: &StatusReport) -> Result<(), EncodeError> {
    for p in [report.sync, report.resync] {
        if p.done > p.total {
            return Err(EncodeError::InvalidField {
                field: "status report progress",
                reason: "more done than in all",
            });
        }
    }
    w.u8(report.state.code());
    for v in [
        report.pending_records,
        report.pending_bytes,
        report.lag_ms,
        report.wire_bytes_per_sec,
        report.record_bytes_per_sec,
        report.sync.done,
        report.sync.total,
        report.sync_bytes_per_sec,
        report.resync.done,
        report.resync.total,
    ] {
        w.u64(v);
    }
    w.str16("status report reason", &report.reason, MAX_REPORT_REASON)
}

fn decode_progress(r: &mut Reader<'_>, field: &'static str) -> Result<Progress, DecodeError> {
    let p = Progress {
        done: r.u64(field)?,
        total: r.u64(field)?,
    };
    if p.done > p.total {
        return Err(invalid(field, "more done than in all"));
    }
    Ok(p)
}

fn decode_report(r: &mut Reader<'_>) -> Result<StatusReport, DecodeError> {
    let state = ReportState::from_code(r.u8("state")?)
        .ok_or_else(|| invalid("state", "unknown replication state"))?;
    let pending_records = r.u64("pending records")?;
    let pending_bytes = r.u64("pending bytes")?;
    let lag_ms = r.u64("lag")?;
    let wire_bytes_per_sec = r.u64("wire rate")?;
    let record_bytes_per_sec = r.u64("record rate")?;
    let sync = decode_progress(r, "sync progress")?;
    let sync_bytes_per_sec = r.u64("sync rate")?;
    let resync = decode_progress(r, "resync progress")?;
    let len = r.u16("reason length")? as usize;
    if len > MAX_REPORT_REASON {
        return Err(invalid("status report reason", "longer than 4 KiB"));
    }
    Ok(StatusReport {
        state,
        reason: r.utf8("status report reason", len)?,
        pending_records,
        pending_bytes,
        lag_ms,
        wire_bytes_per_sec,
        record_bytes_per_sec,
        sync,
        sync_bytes_per_sec,
        resync,
    })
}

fn encode_hold(w: &mut Writer, hold: &HoldMessage) -> Result<(), EncodeError> {
    w.u64(hold.point().0);
    match hold {
        HoldMessage::Open(o) => {
            w.u64(o.epoch.0);
            w.u32(u32::try_from(o.deadline.as_micros()).unwrap_or(u32::MAX));
            w.u8(u8::from(o.app_consistent));
            w.str16(
                "hold label",
                o.label.as_str(),
                tidemark_names::MAX_LABEL_LEN,
            )?;
        }
        HoldMessage::Held(h) => {
            w.u64(h.epoch.0);
            match &h.outcome {
                HeldOutcome::Held { marker, generation } => {
                    w.u8(0);
                    w.seq(*marker);
                    w.u32(*generation);
                }
                HeldOutcome::Refused { code, reason } => {
                    w.u8(1);
                    let code = RefuseCode::ALL
                        .iter()
                        .position(|c| c == code)
                        .expect("every code is in ALL");
                    w.u8(code as u8);
                    w.str16("hold refusal", reason, MAX_HOLD_REASON)?;
                }
            }
        }
        HoldMessage::Release(r) => {
            w.u64(r.epoch.0);
            w.u8(u8::from(r.commit));
        }
        HoldMessage::Released(r) => {
            w.u64(r.epoch.0);
            let how = ReleasedHow::ALL
                .iter()
                .position(|h| *h == r.how)
                .expect("every answer is in ALL");
            w.u8(how as u8);
            w.u32(u32::try_from(r.held.as_micros()).unwrap_or(u32::MAX));
            w.u32(r.gated_writes);
        }
        HoldMessage::Quiesce(q) => {
            w.u64(q.epoch.0);
            w.u32(u32::try_from(q.timeout.as_millis()).unwrap_or(u32::MAX));
        }
        HoldMessage::Quiesced(q) => {
            w.u64(q.epoch.0);
            match &q.outcome {
                QuiescedOutcome::Quiesced => w.u8(0),
                QuiescedOutcome::NotQuiesced { reason } => {
                    w.u8(1);
                    w.str16("quiesce refusal", reason, MAX_HOLD_REASON)?;
                }
            }
        }
        HoldMessage::Thaw(t) => w.u64(t.epoch.0),
        HoldMessage::Thawed(t) => {
            w.u64(t.epoch.0);
            let how = ThawedHow::ALL
                .iter()
                .position(|h| *h == t.how)
                .expect("every answer is in ALL");
            w.u8(how as u8);
            w.str16("thaw note", &t.note, MAX_HOLD_REASON)?;
        }
    }
    Ok(())
}

fn decode_hold(msg_type: MessageType, r: &mut Reader<'_>) -> Result<HoldMessage, DecodeError> {
    let point = PointId(r.u64("point")?);
    let epoch = Epoch(r.u64("epoch")?);
    Ok(match msg_type {
        MessageType::HoldOpen => {
            let deadline = Duration::from_micros(u64::from(r.u32("deadline")?));
            let app_consistent = match r.u8("flags")? {
                0 => false,
                1 => true,
                _ => return Err(invalid("flags", "unknown hold flags")),
            };
            let len = r.u16("label length")? as usize;
            let label = r.utf8("hold label", len)?;
            let label = Label::new(label).map_err(|_| invalid("hold label", "not a label"))?;
            HoldMessage::Open(OpenHold {
                point,
                epoch,
                deadline,
                app_consistent,
                label,
            })
        }
        MessageType::Held => {
            let outcome = match r.u8("outcome")? {
                0 => HeldOutcome::Held {
                    marker: r.seq("marker")?,
                    generation: r.u32("generation")?,
                },
                1 => {
                    let code = *RefuseCode::ALL
                        .get(r.u8("code")? as usize)
                        .ok_or(invalid("code", "unknown refusal code"))?;
                    let len = r.u16("reason length")? as usize;
                    if len > MAX_HOLD_REASON {
                        return Err(invalid("hold refusal", "longer than 4 KiB"));
                    }
                    HeldOutcome::Refused {
                        code,
                        reason: r.utf8("hold refusal", len)?,
                    }
                }
                _ => return Err(invalid("outcome", "unknown hold outcome")),
            };
            HoldMessage::Held(HeldReply {
                point,
                epoch,
                outcome,
            })
        }
        MessageType::HoldRelease => HoldMessage::Release(ReleaseHold {
            point,
            epoch,
            commit: match r.u8("action")? {
                0 => false,
                1 => true,
                _ => return Err(invalid("action", "unknown release action")),
            },
        }),
        MessageType::Released => {
            let how = *ReleasedHow::ALL
                .get(r.u8("how")? as usize)
                .ok_or(invalid("how", "unknown release answer"))?;
            HoldMessage::Released(ReleasedReply {
                point,
                epoch,
                how,
                held: Duration::from_micros(u64::from(r.u32("held")?)),
                gated_writes: r.u32("gated writes")?,
            })
        }
        MessageType::HoldQuiesce => HoldMessage::Quiesce(QuiesceHold {
            point,
            epoch,
            timeout: Duration::from_millis(u64::from(r.u32("timeout")?)),
        }),
        MessageType::Quiesced => {
            let outcome = match r.u8("outcome")? {
                0 => QuiescedOutcome::Quiesced,
                1 => {
                    let len = r.u16("reason length")? as usize;
                    if len > MAX_HOLD_REASON {
                        return Err(invalid("quiesce refusal", "longer than 4 KiB"));
                    }
                    QuiescedOutcome::NotQuiesced {
                        reason: r.utf8("quiesce refusal", len)?,
                    }
                }
                _ => return Err(invalid("outcome", "unknown quiesce outcome")),
            };
            HoldMessage::Quiesced(QuiescedReply {
                point,
                epoch,
                outcome,
            })
        }
        MessageType::HoldThaw => HoldMessage::Thaw(ThawHold { point, epoch }),
        MessageType::Thawed => {
            let how = *ThawedHow::ALL
                .get(r.u8("how")? as usize)
                .ok_or(invalid("how", "unknown thaw answer"))?;
            let len = r.u16("note length")? as usize;
            if len > MAX_HOLD_REASON {
                return Err(invalid("thaw note", "longer than 4 KiB"));
            }
            HoldMessage::Thawed(ThawedReply {
                point,
                epoch,
                how,
                note: r.utf8("thaw note", len)?,
            })
        }
        other => unreachable!("{} is not a hold message", other.name()),
    })
}

fn invalid(field: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::InvalidField { field, reason }
}

/// The number of blocks of `block_size` covering `offset..offset+length`
/// (the last may be short), or why the request is invalid.
pub fn digest_count(offset: u64, length: u64, block_size: u32) -> Result<u64, &'static str> {
    if block_size == 0 {
        return Err("block size is zero");
    }
    if length == 0 {
        return Err("length is zero");
    }
    if offset.checked_add(length).is_none() {
        return Err("offset + length overflows");
    }
    let n = length.div_ceil(u64::from(block_size));
    if n > MAX_DIGESTS {
        return Err("too many blocks for one request");
    }
    Ok(n)
}

/// Whether `msg_type` exists in protocol `version` and this code speaks
/// that version (the hello and the error also in the older versions their
/// layout covers).
fn check_spoken(msg_type: MessageType, version: u16) -> Result<(), EncodeError> {
    let spoken = if msg_type.layout_is_frozen() {
        (1..=PROTOCOL_VERSION).contains(&version)
    } else {
        (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version)
    };
    if !spoken || version < msg_type.since() {
        return Err(EncodeError::NotInVersion {
            msg: msg_type.name(),
            version,
        });
    }
    Ok(())
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn seq(&mut self, seq: Seq) {
        self.u64(seq.get());
    }
    fn disk(&mut self, disk: DiskId) {
        self.u32(disk.get());
    }
    fn str8(&mut self, field: &'static str, s: &str) -> Result<(), EncodeError> {
        if s.len() > MAX_NAME {
            return Err(EncodeError::FieldTooLong {
                field,
                len: s.len(),
                max: MAX_NAME,
            });
        }
        self.u8(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn str16(&mut self, field: &'static str, s: &str, max: usize) -> Result<(), EncodeError> {
        if s.len() > max {
            return Err(EncodeError::FieldTooLong {
                field,
                len: s.len(),
                max,
            });
        }
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn count(&mut self, field: &'static str, n: usize, max: usize) -> Result<(), EncodeError> {
        if n > max {
            return Err(EncodeError::FieldTooLong { field, len: n, max });
        }
        self.u32(n as u32);
        Ok(())
    }
    fn syncs(&mut self, disks: &[DiskSync]) -> Result<(), EncodeError> {
        self.count("disks", disks.len(), MAX_DISKS)?;
        for d in disks {
            self.disk(d.id);
            self.u64(d.synced);
        }
        Ok(())
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError::Truncated { field })?;
        let s = self
            .b
            .get(self.at..end)
            .ok_or(DecodeError::Truncated { field })?;
        self.at = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let s = self.take(field, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn seq(&mut self, field: &'static str) -> Result<Seq, DecodeError> {
        self.u64(field).map(Seq)
    }
    fn disk(&mut self, field: &'static str) -> Result<DiskId, DecodeError> {
        self.u32(field).map(DiskId)
    }
    fn utf8(&mut self, field: &'static str, len: usize) -> Result<String, DecodeError> {
        let s = self.take(field, len)?;
        std::str::from_utf8(s)
            .map(str::to_string)
            .map_err(|_| invalid(field, "not UTF-8"))
    }
    fn str8(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let len = self.u8(field)? as usize;
        self.utf8(field, len)
    }
    fn name(&mut self, field: &'static str) -> Result<Name, DecodeError> {
        Name::new(self.str8(field)?).map_err(|source| DecodeError::InvalidName { field, source })
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }
    /// A count of at most `max` items (the bound the encoder keeps) of at
    /// least `item_len` bytes each: bounded by what the body can still
    /// hold too, so a lying count cannot make us allocate.
    fn count(
        &mut self,
        field: &'static str,
        item_len: usize,
        max: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(field)? as usize;
        let left = self.b.len() - self.at;
        if n > left / item_len {
            return Err(DecodeError::Truncated { field });
        }
        if n > max {
            return Err(invalid(field, "more than the protocol allows"));
        }
        Ok(n)
    }
    fn syncs(&mut self) -> Result<Vec<DiskSync>, DecodeError> {
        let n = self.count("disk count", 12, MAX_DISKS)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(DiskSync {
                id: self.disk("disk id")?,
                synced: self.u64("synced")?,
            });
        }
        Ok(v)
    }
}

/// A message as it arrived: what the frame carried, and the protocol
/// version the frame's header named (the sessions check it against the
/// version they negotiated).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The frame's protocol version.
    pub version: u16,
    /// The message.
    pub message: Message,
}

impl Received {
    /// `message` as if it came in a frame of `version`.
    pub fn new(version: u16, message: Message) -> Received {
        Received { version, message }
    }
}

/// A [`FrameDecoder`] that yields messages: what a daemon's read loop uses.
#[derive(Debug, Default)]
pub struct MessageDecoder {
    frames: FrameDecoder,
    failed: bool,
}

impl MessageDecoder {
    /// An empty decoder.
    pub fn new() -> MessageDecoder {
        MessageDecoder::default()
    }

    /// Appends bytes received from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.frames.feed(bytes);
    }

    /// Bytes received but not yet returned as a message.
    pub fn buffered(&self) -> usize {
        self.frames.buffered()
    }

    /// The next complete message and its frame's version, `Ok(None)` if
    /// more bytes are needed. After an error the decoder stays failed.
    pub fn next_message(&mut self) -> Result<Option<Received>, DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        let result = match self.frames.next_unchecked() {
            // A raw batch of records: its checksums and the frame's in one
            // pass over its bytes.
            Ok(Some(frame)) if frame.msg_type == MessageType::Records && !frame.compressed => {
                let version = frame.version;
                match Message::check_decodable(frame.msg_type, version) {
                    // Damage first, as for any frame.
                    Err(e) => frame.check().and(Err(e)),
                    Ok(()) => RecordBatch::from_raw_frame(frame),
                }
                .map(|batch| {
                    Some(Received {
                        version,
                        message: Message::Records(batch),
                    })
                })
            }
            Ok(Some(frame)) => {
                let version = frame.version;
                frame
                    .check()
                    .and_then(Message::decode)
                    .map(|message| Some(Received { version, message }))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.failed = true;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{encode_frame, FRAME_HEADER_LEN};
    use tidemark_changelog::record::Entry;

    fn rec(seq: u64, generation: u32) -> Vec<u8> {
        Entry::write(0, seq * 512, &[seq as u8; 512], 0).encode(seq, generation)
    }

    #[test]
    fn batches_verify_order_and_checksums() {
        let (a, b, c) = (rec(5, 1), rec(6, 1), rec(100, 2));
        let batch = RecordBatch::from_records([&a[..], &b[..], &c[..]]).unwrap();
        assert_eq!(batch.first().map(|r| r.seq), Some(Seq(5)));
        assert_eq!(
            batch.last(),
            Some(RecordId {
                seq: Seq(100),
                generation: 2
            })
        );
        assert_eq!(batch.len(), 3);
        let seqs: Vec<u64> = batch
            .records()
            .map(|r| r.unwrap().header.seq.get())
            .collect();
        assert_eq!(seqs, [5, 6, 100]);

        assert!(matches!(
            RecordBatch::from_records([&a[..], &c[..], &b[..]]),
            Err(BatchError::NotConsecutive { .. })
        ));
        assert!(matches!(
            RecordBatch::from_records([&a[..], &rec(7, 1)[..]]),
            Err(BatchError::NotConsecutive { .. })
        ));
        // Same seq + 1 but an older generation.
        assert!(matches!(
            RecordBatch::from_records([&c[..], &rec(101, 1)[..]]),
            Err(BatchError::NotConsecutive { .. })
        ));
        let mut bad = b.clone();
        bad[300] ^= 1;
        let err = RecordBatch::from_records([&a[..], &bad[..]]).unwrap_err();
        assert!(err.is_corruption(), "{err:?}");
        let mut two = a.clone();
        two.extend_from_slice(&b);
        assert!(matches!(
            RecordBatch::new().push(&two),
            Err(BatchError::TrailingBytes(_))
        ));
        assert!(RecordBatch::from_bytes(two).is_ok());
    }

    /// A chunk's frame, its data copied once straight into it, is byte
    /// for byte the frame of its whole body, raw (random data) or
    /// compressed, and decodes to the same chunk.
    #[test]
    fn a_chunk_frame_is_the_frame_of_its_whole_body() {
        let random: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for data in [random, vec![7u8; 1 << 20], b"small".to_vec()] {
            let chunk = Message::Chunk {
                disk: DiskId(3),
                offset: 1 << 30,
                after_seq: Seq(9),
                purpose: ChunkPurpose::InitialSync,
                data: ChunkData::Data(data),
            };
            for compression in [Compression::None, Compression::Fast] {
                let frame = chunk.encode(PROTOCOL_VERSION, compression).unwrap();
                let body = chunk.encode_body(PROTOCOL_VERSION).unwrap();
                let whole =
                    encode_frame(PROTOCOL_VERSION, MessageType::Chunk, &body, compression).unwrap();
                assert_eq!(frame, whole);
                let mut d = MessageDecoder::new();
                d.feed(&frame);
                assert_eq!(d.next_message().unwrap().unwrap().message, chunk);
            }
        }
    }

    /// A raw Records frame: the records' checksums and the frame's are
    /// checked in one pass (the frame's combined from the records'); what
    /// is damaged is refused there, before anything is applied, as the
    /// frame decoder and the batch's own checks would refuse it.
    #[test]
    fn a_damaged_records_frame_is_refused_in_the_one_pass() {
        let batch = RecordBatch::from_records([&rec(5, 1)[..], &rec(6, 1)[..]]).unwrap();
        let frame = Message::encode_records(&batch, PROTOCOL_VERSION, Compression::None).unwrap();
        // The frame's checksum made from the records' is the one over its
        // bytes: the frame is byte for byte what encode_frame makes.
        assert_eq!(
            frame,
            encode_frame(
                PROTOCOL_VERSION,
                MessageType::Records,
                batch.as_bytes(),
                Compression::None
            )
            .unwrap()
        );
        let payload_at = FRAME_HEADER_LEN + HEADER_LEN + 10;
        let decode = |bytes: &[u8]| {
            let mut d = MessageDecoder::new();
            d.feed(bytes);
            let first = d.next_message();
            // The stream is done with either way: nothing after a frame,
            // or failed for good.
            let next = d.next_message();
            assert!(matches!(
                (&first, next),
                (Ok(_), Ok(None)) | (Err(_), Err(DecodeError::Failed))
            ));
            first
        };
        let Ok(Some(Received {
            message: Message::Records(got),
            ..
        })) = decode(&frame)
        else {
            panic!("an intact frame decodes");
        };
        assert_eq!(got.as_bytes(), batch.as_bytes());
        // Refused as damage on the way, by the message decoder and by the
        // frame decoder alone.
        let damage_on_the_way = |bytes: &[u8]| {
            let err = decode(bytes).unwrap_err();
            assert!(
                matches!(err, DecodeError::ChecksumMismatch { .. }),
                "{err:?}"
            );
            let mut d = FrameDecoder::new();
            d.feed(bytes);
            let err = d.next_frame().unwrap_err();
            assert!(
                matches!(err, DecodeError::ChecksumMismatch { .. }),
                "{err:?}"
            );
        };
        // A payload byte changed on the way: the frame's checksum says so.
        let mut damaged = frame.clone();
        damaged[payload_at] ^= 1;
        damage_on_the_way(&damaged);
        // The same with the frame's checksum made to match (the record was
        // damaged before it was framed): the record's own checksum says so.
        let crc_at = 16;
        let refreshed = crc32c::crc32c_append(
            crc32c::crc32c(&damaged[..crc_at]),
            &damaged[FRAME_HEADER_LEN..],
        );
        damaged[crc_at..FRAME_HEADER_LEN].copy_from_slice(&refreshed.to_le_bytes());
        let err = decode(&damaged).unwrap_err();
        assert!(err.is_corruption(), "{err:?}");
        assert!(
            matches!(
                &err,
                DecodeError::Batch(BatchError::Record {
                    index: 0,
                    source: record::DecodeError::ChecksumMismatch { .. }
                })
            ),
            "{err:?}"
        );
        // Intact records under a frame checksum that does not match them
        // (the header changed on the way): refused by the combined check.
        let mut header_hit = frame.clone();
        header_hit[crc_at] ^= 0x40;
        damage_on_the_way(&header_hit);
        // A body the batch cannot even take apart (its first record's
        // magic hit): the frame's checksum speaks first.
        let mut cut = frame.clone();
        cut[FRAME_HEADER_LEN] = b'X';
        damage_on_the_way(&cut);
    }

    #[test]
    fn error_text_is_cut_at_a_char_boundary() {
        let m = Message::error(ErrorClass::Transient, ErrorCode::Busy, &"é".repeat(3000));
        let Message::Error { message, .. } = &m else {
            panic!("not an error")
        };
        assert_eq!(message.len(), MAX_ERROR_MESSAGE);
        assert!(m.encode(PROTOCOL_VERSION, Compression::None).is_ok());
    }

    /// Decodes `body` as a `msg_type` message.
    fn decode(msg_type: MessageType, body: Vec<u8>) -> Result<Message, DecodeError> {
        Message::decode(Frame {
            version: PROTOCOL_VERSION,
            msg_type,
            body: body.into(),
        })
    }

    fn report() -> StatusReport {
        StatusReport {
            state: ReportState::InitialSync,
            reason: String::new(),
            pending_records: 12,
            pending_bytes: 49_152,
            lag_ms: 1_500,
            wire_bytes_per_sec: 1 << 20,
            record_bytes_per_sec: 3 << 20,
            sync: Progress {
                done: 1 << 30,
                total: 4 << 30,
            },
            sync_bytes_per_sec: 50 << 20,
            resync: Progress::default(),
        }
    }

    #[test]
    fn a_status_report_round_trips_and_bad_ones_are_refused() {
        let msg = Message::StatusReport(report());
        let body = msg.encode_body(PROTOCOL_VERSION).unwrap();
        assert_eq!(body.len(), 1 + 10 * 8 + 2);
        assert_eq!(
            decode(MessageType::StatusReport, body.clone()).unwrap(),
            msg
        );
        // Cut anywhere: truncated, never a panic or a shorter report.
        for cut in 0..body.len() {
            assert!(
                matches!(
                    decode(MessageType::StatusReport, body[..cut].to_vec()),
                    Err(DecodeError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        // One byte too many.
        let mut long = body.clone();
        long.push(0);
        assert!(matches!(
            decode(MessageType::StatusReport, long),
            Err(DecodeError::TrailingBytes { .. })
        ));
        // A state this code does not know.
        let mut unknown = body.clone();
        unknown[0] = 9;
        assert!(matches!(
            decode(MessageType::StatusReport, unknown),
            Err(DecodeError::InvalidField { field: "state", .. })
        ));
        // More synced than the disks hold.
        let mut over = body.clone();
        over[1 + 5 * 8..1 + 6 * 8].copy_from_slice(&(5u64 << 30).to_le_bytes());
        assert!(matches!(
            decode(MessageType::StatusReport, over),
            Err(DecodeError::InvalidField {
                field: "sync progress",
                ..
            })
        ));
        // A reason longer than the protocol allows, either way.
        let mut oversized = body[..body.len() - 2].to_vec();
        oversized.extend_from_slice(&(MAX_REPORT_REASON as u16 + 1).to_le_bytes());
        oversized.extend(std::iter::repeat_n(b'x', MAX_REPORT_REASON + 1));
        assert!(matches!(
            decode(MessageType::StatusReport, oversized),
            Err(DecodeError::InvalidField {
                field: "status report reason",
                ..
            })
        ));
        let too_long = Message::StatusReport(StatusReport {
            reason: "x".repeat(MAX_REPORT_REASON + 1),
            ..report()
        });
        assert!(matches!(
            too_long.encode_body(PROTOCOL_VERSION),
            Err(EncodeError::FieldTooLong { .. })
        ));
    }

    #[test]
    fn a_status_report_is_never_sent_to_nor_read_from_an_older_session() {
        let msg = Message::StatusReport(report());
        assert!(matches!(
            msg.encode(6, Compression::None),
            Err(EncodeError::NotInVersion {
                msg: "status-report",
                version: 6
            })
        ));
        let body = msg.encode_body(PROTOCOL_VERSION).unwrap();
        assert!(matches!(
            Message::decode(Frame {
                version: 6,
                msg_type: MessageType::StatusReport,
                body: body.into(),
            }),
            Err(DecodeError::NotInVersion { .. })
        ));
    }

    #[test]
    fn counts_beyond_what_the_encoder_writes_are_refused() {
        // Found by the wire_message fuzz target's round trip (what decodes
        // must encode to the same bytes): counts were bounded by the body
        // alone, so a peer could send more disks, digests or extents than
        // the protocol allows and have them decoded.
        let le32 = |n: usize| (n as u32).to_le_bytes();
        let mut hello = vec![1, b'h', 1, b'g'];
        hello.extend_from_slice(&le32(1));
        hello.extend_from_slice(&le32(MAX_DISKS + 1));
        for id in 0..=MAX_DISKS {
            hello.extend_from_slice(&le32(id));
            hello.extend_from_slice(&[1, b'd']);
            hello.extend_from_slice(&1u64.to_le_bytes());
        }
        let syncs = |n: usize| {
            let mut b = le32(n).to_vec();
            b.resize(4 + 12 * n, 0);
            b
        };
        let mut welcome = vec![0; 12];
        welcome.extend(syncs(MAX_DISKS + 1));
        welcome.extend_from_slice(&le32(0));
        let mut resyncing = vec![0; 12];
        resyncing.extend(syncs(0));
        resyncing.extend_from_slice(&le32(MAX_RESYNC_EXTENTS + 1));
        resyncing.resize(resyncing.len() + 20 * (MAX_RESYNC_EXTENTS + 1), 0);
        let mut ack = vec![0; 20];
        ack.extend(syncs(MAX_DISKS + 1));
        let mut digests = vec![0; 16];
        digests.extend_from_slice(&le32(MAX_DIGESTS as usize + 1));
        digests.resize(digests.len() + 32 * (MAX_DIGESTS as usize + 1), 0);
        for (msg_type, body) in [
            (MessageType::Hello, hello),
            (MessageType::Welcome, welcome),
            (MessageType::Welcome, resyncing),
            (MessageType::Ack, ack),
            (MessageType::Digests, digests),
        ] {
            let result = decode(msg_type, body).map(|m| m.msg_type());
            assert!(
                matches!(result, Err(DecodeError::InvalidField { .. })),
                "{msg_type:?}: {result:?}"
            );
        }
    }

    #[test]
    fn lying_counts_do_not_allocate() {
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        let frame = Frame {
            version: PROTOCOL_VERSION,
            msg_type: MessageType::Welcome,
            body: body.into(),
        };
        assert!(matches!(
            Message::decode(frame),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
