//! The shipper's end of a session, sans IO. The daemon owns the connection,
//! the change log and the disks; this module decides.
//!
//! - [`AwaitingWelcome::start`] gives the Hello frame to send, offering the
//!   protocol versions of [`ShipperConfig::versions`].
//! - [`AwaitingWelcome::handle_message`] takes the Welcome (whose version
//!   becomes the session's) and says where to resume ([`Resume`]): the log
//!   from `from_seq`, each disk's initial sync at its `synced` offset. It
//!   refuses (permanently) when the log no longer holds the record after
//!   the replica's durable one and no generation boundary explains the
//!   jump: the records in between are lost, only a resync can repair the
//!   replica. A receiver of version 1, which cannot read a newer hello,
//!   gives [`ShipperError::OfferOlder`]: connect again offering only its
//!   version (see [`crate::frame`] for the rules).
//! - [`Shipping`] encodes what the daemon sends (checking record order and
//!   chunk positions), counts in-flight bytes against a window so the daemon
//!   knows when to stop reading the log, and turns the receiver's Acks and
//!   Digests into [`ShipperEvent`]s.

use crate::frame::{Compression, EncodeError, Versions};
use crate::message::{
    digest_count, record_version_of, BatchError, ChunkData, ChunkPurpose, DiskSync, ErrorClass,
    ErrorCode, Message, Received, RecordBatch, RecordId, VmSpecReply, GROW_PROTOCOL_VERSION,
    SOFTWARE,
};
use std::collections::VecDeque;
use thiserror::Error;
use tidemark_changelog::record::DecodeError;
use tidemark_changelog::{Disk, DiskId, Extent, Kind, Seq};
use tidemark_names::Name;

/// Tuning of a shipper session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipperConfig {
    /// Bytes sent but not yet consumed by the receiver before
    /// [`Shipping::can_send`] says stop. Default 64 MiB.
    pub window_bytes: u64,
    /// Body compression. Default zstd level 1.
    pub compression: Compression,
    /// The protocol versions to offer. Default [`Versions::SUPPORTED`];
    /// only version 1 after a version-1 receiver refused a newer hello.
    pub versions: Versions,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        ShipperConfig {
            window_bytes: 64 << 20,
            compression: Compression::Fast,
            versions: Versions::SUPPORTED,
        }
    }
}

/// What the shipper says about itself in its Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloInfo {
    /// The protected host.
    pub host: Name,
    /// The consistency group.
    pub group: Name,
    /// The tracker generation of the log's newest records.
    pub generation: u32,
    /// The group's disks.
    pub disks: Vec<Disk>,
}

/// Why a shipper session ended.
#[derive(Debug, Error)]
pub enum ShipperError {
    /// The receiver sent an Error.
    #[error("the receiver refused ({class:?} {code:?}): {message}")]
    Peer {
        /// Whether retrying can help.
        class: ErrorClass,
        /// What went wrong.
        code: ErrorCode,
        /// The receiver's words.
        message: String,
    },
    /// The replica cannot be continued from this log (local decision).
    #[error("cannot resume the replica: {reason}")]
    CannotResume {
        /// What to report.
        code: ErrorCode,
        /// Why.
        reason: String,
    },
    /// The receiver sent something the protocol does not allow here.
    #[error("the receiver broke the protocol: {0}")]
    Protocol(String),
    /// The receiver predates version negotiation: it speaks only `version`
    /// and refused the newer hello. Connect again at once, offering only
    /// `version` ([`Versions::only`]).
    #[error("the receiver speaks only protocol version {version}; connecting again in it")]
    OfferOlder {
        /// The version to offer.
        version: u16,
    },
    /// The two ends speak no protocol version in common.
    #[error(
        "no protocol version in common: the receiver speaks {receiver}, this shipper \
         (tidemark {SOFTWARE}) {shipper}; upgrade the {older}"
    )]
    NoCommonVersion {
        /// What the receiver speaks (as far as this end learnt).
        receiver: Versions,
        /// What this end offered.
        shipper: Versions,
        /// The end to upgrade: "receiver" or "shipper".
        older: &'static str,
    },
    /// The receiver does not apply this group: another one sharing its
    /// replica store does, at `to`. Connect there.
    #[error("redirected to the receiver at {to}, which owns the group")]
    Redirected {
        /// That receiver's address (`host:port`).
        to: String,
    },
    /// No Welcome came within this long after the Hello.
    #[error("no welcome from the receiver within {} s", waited.as_secs())]
    NoWelcome {
        /// How long the shipper waited.
        waited: std::time::Duration,
    },
    /// The receiver said nothing for this long while frames were in
    /// flight: taken for dead.
    #[error("the receiver has been silent for {} s with frames in flight", silent.as_secs())]
    PeerSilent {
        /// How long it was silent.
        silent: std::time::Duration,
    },
    /// The session's protocol version cannot carry a record the log holds
    /// (a grow record needs version 6): the receiver must be upgraded.
    #[error(
        "the receiver speaks protocol version {version}, which cannot carry a {kind} record \
         (version {needs} or newer can): upgrade the replica site"
    )]
    ReceiverTooOld {
        /// The session's version.
        version: u16,
        /// The record's kind.
        kind: &'static str,
        /// The oldest version that carries it.
        needs: u16,
    },
    /// The daemon asked to send something out of order (a bug here).
    #[error("refused to send: {0}")]
    Usage(String),
    /// A message could not be encoded.
    #[error("encoding a frame")]
    Encode(#[from] EncodeError),
}

impl ShipperError {
    /// For the retry policy: transient errors are retried with backoff,
    /// permanent ones stop replication and mark the disks critical.
    pub fn class(&self) -> ErrorClass {
        match self {
            ShipperError::Peer { class, .. } => *class,
            ShipperError::CannotResume { .. }
            | ShipperError::Usage(_)
            | ShipperError::ReceiverTooOld { .. }
            | ShipperError::NoCommonVersion { .. } => ErrorClass::Permanent,
            ShipperError::Protocol(_)
            | ShipperError::Encode(_)
            | ShipperError::OfferOlder { .. }
            | ShipperError::Redirected { .. }
            | ShipperError::NoWelcome { .. }
            | ShipperError::PeerSilent { .. } => ErrorClass::Transient,
        }
    }

    /// The Error message to send to the receiver before closing (none when
    /// the receiver is the one that sent an Error, or has closed already).
    pub fn to_message(&self) -> Option<Message> {
        let (code, text) = match self {
            ShipperError::Peer { .. }
            | ShipperError::OfferOlder { .. }
            | ShipperError::Redirected { .. }
            | ShipperError::NoWelcome { .. }
            | ShipperError::PeerSilent { .. } => return None,
            ShipperError::CannotResume { code, reason } => (*code, reason.clone()),
            ShipperError::Protocol(s) => (ErrorCode::Protocol, s.clone()),
            ShipperError::NoCommonVersion { .. } | ShipperError::ReceiverTooOld { .. } => {
                (ErrorCode::Protocol, self.to_string())
            }
            ShipperError::Usage(s) => (ErrorCode::Internal, s.clone()),
            ShipperError::Encode(e) => (ErrorCode::Internal, e.to_string()),
        };
        Some(Message::error(self.class(), code, &text))
    }

    /// [`ShipperError::to_message`] as a frame of protocol `version` (the
    /// session's, or the welcome's), uncompressed.
    pub fn to_frame(&self, version: u16) -> Option<Vec<u8>> {
        self.to_message()
            .and_then(|m| m.encode(version, Compression::None).ok())
    }
}

/// Where to resume, from the Welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// Read the log from this sequence number on (0: from its oldest record,
    /// for a replica that holds no record yet).
    pub from_seq: Seq,
    /// The replica's durable record (seq 0: none).
    pub durable: RecordId,
    /// Resume each disk's initial sync at `synced` (== size: done).
    pub disks: Vec<DiskSync>,
    /// Resync-needed extents the replica still waits for: compare them
    /// (their records are already durable and will not be sent again).
    pub resyncing: Vec<Extent>,
    /// The protocol version of the session.
    pub version: u16,
    /// The receiver's release, as its welcome named it (empty before
    /// version 2).
    pub receiver_software: String,
}

/// A session that has sent its Hello and waits for the Welcome.
#[derive(Debug)]
pub struct AwaitingWelcome {
    hello: HelloInfo,
    config: ShipperConfig,
}

impl AwaitingWelcome {
    /// Starts a session on a new connection: returns it and the Hello frame.
    pub fn start(
        hello: HelloInfo,
        config: ShipperConfig,
    ) -> Result<(AwaitingWelcome, Vec<u8>), ShipperError> {
        let offered = config.versions;
        let frame = Message::Hello {
            host: hello.host.clone(),
            group: hello.group.clone(),
            generation: hello.generation,
            disks: hello.disks.clone(),
            min_version: offered.min,
            software: SOFTWARE.to_string(),
        }
        .encode(offered.max, config.compression)?;
        Ok((AwaitingWelcome { hello, config }, frame))
    }

    /// The protocol version to answer the receiver's first message in: its
    /// own, as far as this end speaks it.
    pub fn answer_version(&self, received: &Received) -> u16 {
        received.version.min(self.config.versions.max).max(1)
    }

    /// Handles the receiver's first message. `first_after(seq)` must return
    /// the first record the log holds with a sequence number above `seq`
    /// (for `seq == 0`: its oldest record), or `None` if it holds none yet.
    /// On error, send [`ShipperError::to_frame`] in
    /// [`AwaitingWelcome::answer_version`] and close.
    pub fn handle_message(
        self,
        received: Received,
        first_after: impl FnOnce(Seq) -> Option<RecordId>,
    ) -> Result<(Shipping, Resume), ShipperError> {
        let offered = self.config.versions;
        let version = received.version;
        let (durable_seq, generation, disks, resyncing, receiver_software) = match received.message
        {
            Message::Welcome {
                durable_seq,
                generation,
                disks,
                resyncing,
                software,
            } => (durable_seq, generation, disks, resyncing, software),
            // What a version-1 receiver answers a hello it cannot read.
            Message::Error {
                class: ErrorClass::Transient,
                code: ErrorCode::Protocol,
                ..
            } if version == 1 && offered.max > 1 => {
                return Err(if offered.contains(1) {
                    ShipperError::OfferOlder { version: 1 }
                } else {
                    ShipperError::NoCommonVersion {
                        receiver: Versions::only(1),
                        shipper: offered,
                        older: "receiver",
                    }
                })
            }
            Message::Error {
                class,
                code,
                message,
            } => {
                return Err(ShipperError::Peer {
                    class,
                    code,
                    message,
                })
            }
            Message::Redirect { to } if version <= offered.max => {
                return Err(ShipperError::Redirected { to })
            }
            other => {
                return Err(ShipperError::Protocol(format!(
                    "expected welcome, got {}",
                    other.msg_type().name()
                )))
            }
        };
        if version > offered.max {
            return Err(ShipperError::Protocol(format!(
                "a welcome of protocol version {version}, the hello offered {offered}"
            )));
        }
        if version < offered.min {
            return Err(ShipperError::NoCommonVersion {
                receiver: Versions::only(version),
                shipper: offered,
                older: "receiver",
            });
        }
        if generation > self.hello.generation {
            return Err(ShipperError::CannotResume {
                code: ErrorCode::Protocol,
                reason: format!(
                    "the replica is at generation {generation}, this host only at {}",
                    self.hello.generation
                ),
            });
        }
        for d in &self.hello.disks {
            match disks.iter().find(|s| s.id == d.id) {
                Some(s) if s.synced <= d.size => {}
                Some(s) => {
                    return Err(ShipperError::Protocol(format!(
                        "disk {} synced to {} beyond its size {}",
                        d.id, s.synced, d.size
                    )))
                }
                None => {
                    return Err(ShipperError::Protocol(format!(
                        "welcome lacks disk {}",
                        d.id
                    )))
                }
            }
        }
        let durable = RecordId {
            seq: durable_seq,
            generation,
        };
        let from_seq = if durable_seq == Seq::ZERO {
            // The replica holds no record: initial sync copies what earlier
            // records did, so the stream may start at any record.
            first_after(Seq::ZERO).map_or(Seq::ZERO, |r| r.seq)
        } else {
            match first_after(durable_seq) {
                None => durable_seq.next(),
                Some(next) if next.seq <= durable_seq => {
                    return Err(ShipperError::Usage(format!(
                        "the log lookup after {durable_seq} returned {}",
                        next.seq
                    )))
                }
                Some(next) if next.generation < generation => {
                    return Err(ShipperError::CannotResume {
                        code: ErrorCode::SequenceGap,
                        reason: format!(
                            "the log continues at generation {} but the replica is at {generation}",
                            next.generation
                        ),
                    })
                }
                Some(next) if next.follows(durable) => next.seq,
                Some(next) => {
                    return Err(ShipperError::CannotResume {
                        code: ErrorCode::SequenceGap,
                        reason: format!(
                            "the replica needs record {} but the log continues at {} \
                             (same generation {}): the records between are gone, a resync is needed",
                            durable_seq.next(),
                            next.seq,
                            next.generation
                        ),
                    })
                }
            }
        };
        let shipping = Shipping {
            config: self.config,
            version,
            disks: self.hello.disks,
            durable,
            last_sent: (durable_seq != Seq::ZERO).then_some(durable),
            frames_sent: 0,
            frames_acked: 0,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            pending_digests: VecDeque::new(),
        };
        Ok((
            shipping,
            Resume {
                from_seq,
                durable,
                disks,
                resyncing,
                version,
                receiver_software,
            },
        ))
    }
}

/// A digest request the receiver has not answered yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestRequestInfo {
    /// Disk id.
    pub disk: DiskId,
    /// First byte.
    pub offset: u64,
    /// Bytes covered.
    pub length: u64,
    /// Block size.
    pub block_size: u32,
    /// The record the receiver had applied when it computed the digests.
    pub after_seq: Seq,
}

/// The receiver's digests, paired with the request they answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestReply {
    /// The request.
    pub request: DigestRequestInfo,
    /// One digest per block.
    pub digests: Vec<[u8; 32]>,
}

/// What a receiver message means for the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShipperEvent {
    /// The replica made more durable: advance the log cursor to
    /// `durable.seq` (segments below it may be recycled).
    Acked {
        /// The durable record.
        durable: RecordId,
        /// Durable initial-sync positions.
        disks: Vec<DiskSync>,
        /// Frames of this session the receiver has consumed (and, for all
        /// but digest requests, made durable): compare with
        /// [`Shipping::frames_sent`] to know a given frame took effect.
        frames: u64,
        /// In-flight bytes this Ack released.
        released_bytes: u64,
    },
    /// Digests for a request: compare them with [`differing_blocks`].
    Digests(DigestReply),
    /// The replica site asks for a planned failover: stop the tracker,
    /// ship everything, then answer with [`Shipping::send_drained`].
    DrainRequested {
        /// The request's id, repeated in the answer.
        id: u64,
    },
    /// The receiver's answer to a VM spec sent with
    /// [`Shipping::send_vm_spec`].
    VmSpec(VmSpecReply),
}

/// A session past the Welcome: sending and handling Acks.
#[derive(Debug)]
pub struct Shipping {
    config: ShipperConfig,
    /// The protocol version of the session: every frame is of it.
    version: u16,
    disks: Vec<Disk>,
    durable: RecordId,
    /// The last record sent; `None` while a fresh replica has none.
    last_sent: Option<RecordId>,
    frames_sent: u64,
    frames_acked: u64,
    /// (frame number, bytes) of frames not yet consumed by the receiver.
    in_flight: VecDeque<(u64, u64)>,
    in_flight_bytes: u64,
    pending_digests: VecDeque<DigestRequestInfo>,
}

impl Shipping {
    /// The protocol version both ends agreed on.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Whether the window has room: when false, stop reading the log until
    /// an Ack arrives.
    pub fn can_send(&self) -> bool {
        self.in_flight_bytes < self.config.window_bytes
    }

    /// Bytes sent and not yet consumed by the receiver.
    pub fn in_flight_bytes(&self) -> u64 {
        self.in_flight_bytes
    }

    /// The replica's durable record as last acknowledged.
    pub fn durable(&self) -> RecordId {
        self.durable
    }

    /// The last record sent (chunks sent now go after it).
    pub fn last_sent_seq(&self) -> Seq {
        self.last_sent.map_or(Seq::ZERO, |r| r.seq)
    }

    /// Frames sent in this session so far (the last one sent is number
    /// `frames_sent()`).
    pub fn frames_sent(&self) -> u64 {
        self.frames_sent
    }

    /// Digest requests not answered yet.
    pub fn pending_digests(&self) -> usize {
        self.pending_digests.len()
    }

    fn track(&mut self, frame: &[u8]) {
        self.frames_sent += 1;
        self.in_flight
            .push_back((self.frames_sent, frame.len() as u64));
        self.in_flight_bytes += frame.len() as u64;
    }

    fn disk(&self, id: DiskId) -> Result<&Disk, ShipperError> {
        self.disks
            .iter()
            .find(|d| d.id == id)
            .ok_or_else(|| ShipperError::Usage(format!("disk {id} is not in the hello")))
    }

    fn check_extent(&self, disk: DiskId, offset: u64, length: u64) -> Result<(), ShipperError> {
        let size = self.disk(disk)?.size;
        match offset.checked_add(length) {
            Some(end) if end <= size && length > 0 => Ok(()),
            _ => Err(ShipperError::Usage(format!(
                "extent {offset}+{length} is empty or outside disk {disk} of {size} bytes"
            ))),
        }
    }

    /// Encodes a batch of records that continues the stream.
    pub fn send_records(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, ShipperError> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Err(ShipperError::Usage("an empty batch".into()));
        };
        if let Some(prev) = self.last_sent {
            if !first.follows(prev) {
                return Err(ShipperError::Usage(format!(
                    "record {first:?} does not follow {prev:?}"
                )));
            }
        }
        // A session carries the records its version has: version 1
        // version-1 records only, versions 2 to 5 up to version 2 (their
        // receivers refuse newer ones). A grow record has no older form.
        let record_version = record_version_of(self.version);
        let converted;
        let batch = if self.version < GROW_PROTOCOL_VERSION {
            converted = batch
                .in_record_version(record_version)
                .map_err(|e| match e {
                    BatchError::Record {
                        source: DecodeError::KindNotInVersion { kind, .. },
                        ..
                    } => ShipperError::ReceiverTooOld {
                        version: self.version,
                        kind,
                        needs: GROW_PROTOCOL_VERSION,
                    },
                    e => ShipperError::Usage(format!(
                        "a record for a peer of protocol version {}: {e}",
                        self.version
                    )),
                })?;
            &converted
        } else {
            batch
        };
        let frame = Message::encode_records(batch, self.version, self.config.compression)?;
        self.last_sent = Some(last);
        self.track(&frame);
        // Chunks after a grow record may reach into the grown part.
        for record in batch.records().flatten() {
            let h = &record.header;
            if h.kind == Kind::Grow {
                if let Some(d) = self.disks.iter_mut().find(|d| d.id == h.disk) {
                    d.size = d.size.max(h.offset.saturating_add(h.length));
                }
            }
        }
        Ok(frame)
    }

    /// Encodes a chunk of disk data read after the last record sent was
    /// written (so it goes between that record and the next).
    pub fn send_chunk(
        &mut self,
        disk: DiskId,
        offset: u64,
        purpose: ChunkPurpose,
        data: ChunkData,
    ) -> Result<Vec<u8>, ShipperError> {
        self.check_extent(disk, offset, data.len())?;
        let frame = Message::Chunk {
            disk,
            offset,
            after_seq: self.last_sent_seq(),
            purpose,
            data,
        }
        .encode(self.version, self.config.compression)?;
        self.track(&frame);
        Ok(frame)
    }

    /// Encodes a request for the replica's digests of an extent. The reply
    /// comes as [`ShipperEvent::Digests`]; compare it with the local
    /// digests of the extent as of [`DigestRequestInfo::after_seq`].
    pub fn send_digest_request(
        &mut self,
        disk: DiskId,
        offset: u64,
        length: u64,
        block_size: u32,
    ) -> Result<Vec<u8>, ShipperError> {
        self.check_extent(disk, offset, length)?;
        let frame = Message::DigestRequest {
            disk,
            offset,
            length,
            block_size,
        }
        .encode(self.version, self.config.compression)?;
        self.pending_digests.push_back(DigestRequestInfo {
            disk,
            offset,
            length,
            block_size,
            after_seq: self.last_sent_seq(),
        });
        self.track(&frame);
        Ok(frame)
    }

    /// Encodes the end of a resync of an extent (its differing blocks were
    /// sent as resync chunks).
    pub fn send_resync_done(
        &mut self,
        disk: DiskId,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ShipperError> {
        self.check_extent(disk, offset, length)?;
        let frame = Message::ResyncDone {
            disk,
            offset,
            length,
            after_seq: self.last_sent_seq(),
        }
        .encode(self.version, self.config.compression)?;
        self.track(&frame);
        Ok(frame)
    }

    /// Encodes the answer to a drain request: every record up to
    /// `last_seq`, the stopped tracker's last, was sent before it (or
    /// `error` says why the group could not be drained).
    pub fn send_drained(
        &mut self,
        id: u64,
        last_seq: Seq,
        error: &str,
    ) -> Result<Vec<u8>, ShipperError> {
        if error.is_empty() && last_seq != self.last_sent_seq() {
            return Err(ShipperError::Usage(format!(
                "drained at record {last_seq}, but record {} was the last sent",
                self.last_sent_seq()
            )));
        }
        let frame = Message::Drained {
            id,
            last_seq,
            error: truncate(error, crate::message::MAX_ERROR_MESSAGE),
        }
        .encode(self.version, self.config.compression)?;
        self.track(&frame);
        Ok(frame)
    }

    /// Encodes the group's VM spec (version 3 on: an older session cannot
    /// carry it, see [`Shipping::carries_vm_spec`]). The receiver answers
    /// with [`ShipperEvent::VmSpec`].
    pub fn send_vm_spec(&mut self, text: &str) -> Result<Vec<u8>, ShipperError> {
        let frame = Message::VmSpec {
            text: text.to_string(),
        }
        .encode(self.version, self.config.compression)?;
        self.track(&frame);
        Ok(frame)
    }

    /// Whether the session's version carries VM specs.
    pub fn carries_vm_spec(&self) -> bool {
        self.version >= crate::MessageType::VmSpec.since()
    }

    /// Handles a message from the receiver. On error, send
    /// [`ShipperError::to_frame`] in the session's version and close.
    pub fn handle_message(&mut self, received: Received) -> Result<ShipperEvent, ShipperError> {
        if received.version != self.version {
            return Err(ShipperError::Protocol(format!(
                "a frame of protocol version {} in a session of version {}",
                received.version, self.version
            )));
        }
        match received.message {
            Message::DrainRequest { id } => Ok(ShipperEvent::DrainRequested { id }),
            Message::VmSpecReply(reply) => Ok(ShipperEvent::VmSpec(reply)),
            Message::Ack {
                durable_seq,
                generation,
                frames,
                disks,
            } => {
                let durable = RecordId {
                    seq: durable_seq,
                    generation,
                };
                if durable < self.durable {
                    return Err(ShipperError::Protocol(format!(
                        "ack of {durable:?} goes back from {:?}",
                        self.durable
                    )));
                }
                if durable_seq > self.last_sent_seq() {
                    return Err(ShipperError::Protocol(format!(
                        "ack of {durable_seq}, only {} was sent",
                        self.last_sent_seq()
                    )));
                }
                if frames < self.frames_acked || frames > self.frames_sent {
                    return Err(ShipperError::Protocol(format!(
                        "ack of {frames} frames: {} acknowledged before, {} sent",
                        self.frames_acked, self.frames_sent
                    )));
                }
                let mut released_bytes = 0;
                while let Some(&(n, bytes)) = self.in_flight.front() {
                    if n > frames {
                        break;
                    }
                    self.in_flight.pop_front();
                    released_bytes += bytes;
                }
                self.in_flight_bytes -= released_bytes;
                self.frames_acked = frames;
                self.durable = durable;
                Ok(ShipperEvent::Acked {
                    durable,
                    disks,
                    frames,
                    released_bytes,
                })
            }
            Message::Digests {
                disk,
                offset,
                block_size,
                digests,
            } => {
                let Some(request) = self.pending_digests.pop_front() else {
                    return Err(ShipperError::Protocol("digests nobody asked for".into()));
                };
                let expected = digest_count(request.offset, request.length, request.block_size)
                    .map_err(|e| ShipperError::Usage(e.into()))?;
                if (disk, offset, block_size) != (request.disk, request.offset, request.block_size)
                    || digests.len() as u64 != expected
                {
                    return Err(ShipperError::Protocol(format!(
                        "digests for disk {disk} at {offset} ({} × {block_size}) do not answer \
                         the request for disk {} at {} ({expected} × {})",
                        digests.len(),
                        request.disk,
                        request.offset,
                        request.block_size
                    )));
                }
                Ok(ShipperEvent::Digests(DigestReply { request, digests }))
            }
            Message::Error {
                class,
                code,
                message,
            } => Err(ShipperError::Peer {
                class,
                code,
                message,
            }),
            other => Err(ShipperError::Protocol(format!(
                "unexpected {} from the receiver",
                other.msg_type().name()
            ))),
        }
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// BLAKE3 digest of each `block_size` block of `data` (the last may be
/// short); what both ends compute for a digest request.
pub fn block_digests(data: &[u8], block_size: u32) -> Vec<[u8; 32]> {
    data.chunks(block_size.max(1) as usize)
        .map(|b| *blake3::hash(b).as_bytes())
        .collect()
}

/// The extents (adjacent differing blocks merged) of a digest request where
/// `local` and `remote` digests differ. `None` if either list does not have
/// one digest per block of the request.
pub fn differing_blocks(
    request: &DigestRequestInfo,
    local: &[[u8; 32]],
    remote: &[[u8; 32]],
) -> Option<Vec<Extent>> {
    let n = digest_count(request.offset, request.length, request.block_size).ok()?;
    if local.len() as u64 != n || remote.len() as u64 != n {
        return None;
    }
    let bs = u64::from(request.block_size);
    let end = request.offset + request.length;
    let mut out: Vec<Extent> = Vec::new();
    for (i, (l, r)) in local.iter().zip(remote).enumerate() {
        if l == r {
            continue;
        }
        let start = request.offset + i as u64 * bs;
        let length = bs.min(end - start);
        match out.last_mut() {
            Some(e) if e.offset + e.length == start => e.length += length,
            _ => out.push(Extent {
                disk: request.disk,
                offset: start,
                length,
            }),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> HelloInfo {
        HelloInfo {
            host: Name::from_static("h"),
            group: Name::from_static("g"),
            generation: 2,
            disks: vec![Disk {
                id: DiskId(0),
                name: Name::from_static("d"),
                size: 1 << 20,
            }],
        }
    }

    fn welcome(durable_seq: u64, generation: u32) -> Message {
        Message::Welcome {
            durable_seq: Seq(durable_seq),
            generation,
            disks: vec![DiskSync {
                id: DiskId(0),
                synced: 4096,
            }],
            resyncing: Vec::new(),
            software: String::new(),
        }
    }

    fn resume(msg: Message, next: Option<(u64, u32)>) -> Result<Resume, ShipperError> {
        let (s, _) = AwaitingWelcome::start(hello(), ShipperConfig::default()).unwrap();
        let msg = Received::new(crate::frame::PROTOCOL_VERSION, msg);
        s.handle_message(msg, |_| {
            next.map(|(seq, generation)| RecordId {
                seq: Seq(seq),
                generation,
            })
        })
        .map(|(_, r)| r)
    }

    #[test]
    fn resume_decisions() {
        assert_eq!(
            resume(welcome(10, 1), Some((11, 1))).unwrap().from_seq,
            Seq(11)
        );
        assert_eq!(resume(welcome(10, 1), None).unwrap().from_seq, Seq(11));
        // A generation boundary explains the jump.
        assert_eq!(
            resume(welcome(10, 1), Some((5000, 2))).unwrap().from_seq,
            Seq(5000)
        );
        // Fresh replica: from the oldest record.
        assert_eq!(
            resume(welcome(0, 0), Some((77, 1))).unwrap().from_seq,
            Seq(77)
        );
        // Recycled records of the same generation.
        let e = resume(welcome(10, 1), Some((20, 1))).unwrap_err();
        assert_eq!(e.class(), ErrorClass::Permanent);
        assert!(matches!(
            e,
            ShipperError::CannotResume {
                code: ErrorCode::SequenceGap,
                ..
            }
        ));
        // Replica from a newer generation than the host.
        assert_eq!(
            resume(welcome(10, 3), Some((11, 3))).unwrap_err().class(),
            ErrorClass::Permanent
        );
        let e = resume(
            Message::error(ErrorClass::Transient, ErrorCode::Busy, "later"),
            None,
        )
        .unwrap_err();
        assert_eq!(e.class(), ErrorClass::Transient);
        assert!(e.to_message().is_none());
    }

    #[test]
    fn differing_blocks_merges_and_shortens_the_last() {
        let req = DigestRequestInfo {
            disk: DiskId(0),
            offset: 1000,
            length: 10_000,
            block_size: 4096,
            after_seq: Seq(0),
        };
        let a = [[0u8; 32]; 3];
        let mut b = a;
        b[1][0] = 1;
        b[2][0] = 1;
        assert_eq!(
            differing_blocks(&req, &a, &b).unwrap(),
            [Extent {
                disk: DiskId(0),
                offset: 1000 + 4096,
                length: 10_000 - 4096
            }]
        );
        assert_eq!(differing_blocks(&req, &a, &a).unwrap(), []);
        assert!(differing_blocks(&req, &a[..2], &a).is_none());
        let data = vec![7u8; 10_000];
        assert_eq!(block_digests(&data, 4096).len(), 3);
    }
}
