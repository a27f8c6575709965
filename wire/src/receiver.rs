//! The receiver's end of a session, sans IO: it validates the stream and
//! drives the replica store through the narrow [`Replica`] trait.
//!
//! - [`ExpectHello`]: the first frame must be a Hello from the host the TLS
//!   certificate names (else permanent `Unauthorized`), offering a protocol
//!   version this end speaks (else a permanent `Protocol` error naming both
//!   ends' versions, in a version the shipper reads: see [`crate::frame`]).
//!   Its names are [`Name`]s: a Hello whose host, group or disk name breaks
//!   the rule does not decode, and is refused as a permanent `Protocol`
//!   error (see [`ReceiverError::from_decode`]), so no path is ever made of
//!   one. The replica commits what an earlier session applied, and the
//!   Welcome, in the session's version, tells the shipper where the replica
//!   stands.
//! - [`Receiving`]: records apply strictly in order. Records at or below the
//!   last applied one are duplicates of a resumed stream and are skipped;
//!   the next one must follow it (seq + 1, or a jump into a newer
//!   generation); anything else is a permanent `SequenceGap`. Chunks and
//!   resync ends apply only at the position they were read at
//!   (`after_seq` == last applied record). Initial-sync chunks of a disk must
//!   come in offset order without holes.
//!
//! - A VM spec ([`Message::VmSpec`]) is handed to the replica
//!   ([`Replica::keep_vm_spec`]) as applying from the record after the last
//!   one applied, and answered at once with [`Message::VmSpecReply`]: kept,
//!   or refused with the reason. A refusal ends nothing: the session goes
//!   on and the daemon logs it ([`Receiving::take_vm_spec`]).
//!
//! Commit policy (group commit): when the daemon reports its input idle
//! (nothing buffered, not even a part of a message), after
//! `commit_record_bytes` of records or `commit_bytes` of chunk data
//! applied since the last commit, and before a drain is reported; each
//! commit is followed by an Ack carrying the durable position. Records are
//! not committed batch by batch: the daemon applies everything that arrived
//! while the last commit ran and then commits it all with one set of syncs,
//! so a burst of batches costs one commit, not one each. An Ack still only
//! ever names what a commit made durable.
//!
//! Sessions are fenced: starting one takes a new lease from the replica, and
//! a session whose lease is no longer current refuses every frame. A stale
//! connection that is still delivering after the shipper reconnected can
//! therefore never apply anything.

use crate::frame::{Compression, DecodeError, EncodeError, Versions, MIN_PROTOCOL_VERSION};
use crate::message::{
    digest_count, record_version_of, ChunkData, ChunkPurpose, DiskSync, ErrorClass, ErrorCode,
    Message, MessageType, Received, RecordId, VmSpecReply, MAX_DISKS, MAX_VM_SPEC_REASON, SOFTWARE,
};
use std::collections::HashSet;
use thiserror::Error;
use tidemark_changelog::record::RecordRef;
use tidemark_changelog::{Disk, DiskId, Extent, Seq};
use tidemark_names::Name;

/// What the replica holds durably (or, between commits, has applied).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Position {
    /// The last durable record (0: none).
    pub durable_seq: Seq,
    /// Its generation.
    pub generation: u32,
    /// Initial-sync state of every disk.
    pub disks: Vec<DiskSync>,
    /// Resync-needed extents still waiting for a resync.
    pub resyncing: Vec<Extent>,
}

/// A replica store failure, with what to tell the shipper.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{message}")]
pub struct ReplicaError {
    /// Whether the shipper should retry.
    pub class: ErrorClass,
    /// What went wrong.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

/// Why the replica did not keep a VM spec. The session goes on: the
/// shipper is told (and the previous version, if any, stays current).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VmSpecRefused {
    /// The text is no valid VM spec (the protected site's spec file is
    /// wrong, or too large).
    #[error("not a valid VM spec: {reason}")]
    Invalid {
        /// What is wrong with it, naming the setting.
        reason: String,
    },
    /// The replica could not keep it durably (local disk of the replica
    /// site).
    #[error("the replica could not keep the VM spec: {reason}")]
    NotKept {
        /// The failure and its causes.
        reason: String,
    },
    /// This replica has no place for VM specs.
    #[error("this replica keeps no VM specs")]
    Unsupported,
}

/// The replica store as the session sees it.
pub trait Replica {
    /// The durable position.
    fn position(&self) -> Position;
    /// Creates the disks it does not hold yet; refuses disks that changed.
    fn ensure_disks(&mut self, disks: &[Disk]) -> Result<(), ReplicaError>;
    /// Applies one verified record (in sequence order; barriers and markers
    /// included, they are the recovery points). The session takes records
    /// from a [`crate::RecordBatch`] only, whose every record's checksum
    /// held against the bytes received: an implementation need not read
    /// the payload again to check it. The payload is borrowed from the
    /// bytes received (never copied on its way to the replica).
    fn apply_record(&mut self, record: RecordRef<'_>) -> Result<(), ReplicaError>;
    /// Applies disk data at `offset`.
    fn apply_chunk(
        &mut self,
        disk: DiskId,
        offset: u64,
        purpose: ChunkPurpose,
        data: &ChunkData,
    ) -> Result<(), ReplicaError>;
    /// BLAKE3 digests of the blocks of an extent as applied so far (see
    /// [`crate::shipper::block_digests`]).
    fn digests(
        &mut self,
        disk: DiskId,
        offset: u64,
        length: u64,
        block_size: u32,
    ) -> Result<Vec<[u8; 32]>, ReplicaError>;
    /// A resync-needed extent is now in sync with the source.
    fn resync_done(&mut self, disk: DiskId, offset: u64, length: u64) -> Result<(), ReplicaError>;
    /// Makes everything applied durable and returns the durable position.
    fn commit(&mut self) -> Result<Position, ReplicaError>;
    /// Starts a session: returns a new lease, after which the leases of
    /// earlier sessions are no longer current. Need not survive a restart.
    fn new_lease(&mut self) -> u64;
    /// The lease of the newest session.
    fn current_lease(&self) -> u64;
    /// Keeps `text` as the group's VM spec for the recovery points from
    /// record `from_seq` on, durably, after checking that it is a valid
    /// spec; text equal to the current version adds no version. Returns
    /// the record the current version applies from. The default keeps
    /// nothing: a replica without a place for specs refuses them.
    fn keep_vm_spec(&mut self, from_seq: Seq, text: &str) -> Result<Seq, VmSpecRefused> {
        let _ = (from_seq, text);
        Err(VmSpecRefused::Unsupported)
    }
}

/// Tuning of a receiver session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// The host the peer's certificate names.
    pub authenticated_host: Name,
    /// Body compression of what the receiver sends. Default none (acks and
    /// errors are small; digests do not compress).
    pub compression: Compression,
    /// Chunk bytes applied before a commit. Default 32 MiB: half the
    /// shipper's in-flight window (64 MiB by default), so the shipper can
    /// go on sending the next half while this commit syncs.
    pub commit_bytes: u64,
    /// Record bytes applied before a commit even if more input is waiting.
    /// It bounds how long a steady stream goes unacknowledged, and stays
    /// well below the shipper's in-flight window (64 MiB by default) so the
    /// shipper never stalls waiting for an Ack. Default 16 MiB.
    pub commit_record_bytes: u64,
    /// The protocol versions served. Default [`Versions::SUPPORTED`]
    /// (tests narrow it to play an older or newer receiver).
    pub versions: Versions,
}

impl ReceiverConfig {
    /// The defaults for a peer authenticated as `host`.
    pub fn new(host: &Name) -> ReceiverConfig {
        ReceiverConfig {
            authenticated_host: host.clone(),
            compression: Compression::None,
            commit_bytes: 32 << 20,
            commit_record_bytes: 16 << 20,
            versions: Versions::SUPPORTED,
        }
    }
}

/// Why a receiver session ended.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReceiverError {
    /// This side refuses the stream; send [`ReceiverError::to_frame`] and
    /// close.
    #[error("refused the shipper ({class:?} {code:?}): {message}")]
    Refused {
        /// Whether the shipper should retry.
        class: ErrorClass,
        /// What went wrong.
        code: ErrorCode,
        /// Why.
        message: String,
        /// The protocol version to say it in: the session's, or for a
        /// refused hello one the shipper reads.
        version: u16,
    },
    /// The shipper sent an Error.
    #[error("the shipper gave up ({class:?} {code:?}): {message}")]
    Peer {
        /// Its class.
        class: ErrorClass,
        /// Its code.
        code: ErrorCode,
        /// Its words.
        message: String,
    },
}

impl ReceiverError {
    /// A refusal; its version is set where the session knows it
    /// ([`ReceiverError::in_version`]).
    fn refuse(class: ErrorClass, code: ErrorCode, message: impl Into<String>) -> ReceiverError {
        ReceiverError::Refused {
            class,
            code,
            message: message.into(),
            version: MIN_PROTOCOL_VERSION,
        }
    }

    /// The same refusal, to be said in protocol `version`.
    fn in_version(self, v: u16) -> ReceiverError {
        match self {
            ReceiverError::Refused {
                class,
                code,
                message,
                ..
            } => ReceiverError::Refused {
                class,
                code,
                message,
                version: v,
            },
            peer => peer,
        }
    }

    fn protocol(message: impl Into<String>) -> ReceiverError {
        ReceiverError::refuse(ErrorClass::Transient, ErrorCode::Protocol, message)
    }

    /// The error for bytes that did not decode: damaged frames and records
    /// are transient `BadChecksum` (a resend heals them), malformed ones a
    /// transient `Protocol` error, and a name that breaks the rule a
    /// permanent one (the host would send the same name again). The
    /// message holds the whole chain of causes. `version`: the session's
    /// ([`Receiving::version`]); before the hello, version 1, which every
    /// shipper reads.
    pub fn from_decode(err: &DecodeError, version: u16) -> ReceiverError {
        let (class, code) = if err.is_corruption() {
            (ErrorClass::Transient, ErrorCode::BadChecksum)
        } else if matches!(err, DecodeError::InvalidName { .. }) {
            (ErrorClass::Permanent, ErrorCode::Protocol)
        } else {
            (ErrorClass::Transient, ErrorCode::Protocol)
        };
        let mut message = err.to_string();
        let mut cause = std::error::Error::source(err);
        while let Some(c) = cause {
            message.push_str(": ");
            message.push_str(&c.to_string());
            cause = c.source();
        }
        ReceiverError::refuse(class, code, message).in_version(version)
    }

    /// The class, for status and metrics.
    pub fn class(&self) -> ErrorClass {
        match self {
            ReceiverError::Refused { class, .. } | ReceiverError::Peer { class, .. } => *class,
        }
    }

    /// The code, for status and metrics.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReceiverError::Refused { code, .. } | ReceiverError::Peer { code, .. } => *code,
        }
    }

    /// The Error message to send before closing (none if the shipper sent
    /// one).
    pub fn to_message(&self) -> Option<Message> {
        match self {
            ReceiverError::Refused {
                class,
                code,
                message,
                ..
            } => Some(Message::error(*class, *code, message)),
            ReceiverError::Peer { .. } => None,
        }
    }

    /// [`ReceiverError::to_message`] as the frame to send, uncompressed, in
    /// the refusal's protocol version.
    pub fn to_frame(&self) -> Option<Vec<u8>> {
        let ReceiverError::Refused { version, .. } = self else {
            return None;
        };
        // An error encodes in every version up to this code's, and the
        // refusal's version is never above it.
        self.to_message()
            .and_then(|m| m.encode(*version, Compression::None).ok())
    }
}

impl From<ReplicaError> for ReceiverError {
    fn from(e: ReplicaError) -> Self {
        ReceiverError::refuse(e.class, e.code, e.message)
    }
}

impl From<EncodeError> for ReceiverError {
    fn from(e: EncodeError) -> Self {
        ReceiverError::refuse(ErrorClass::Transient, ErrorCode::Internal, e.to_string())
    }
}

/// `reason` cut to what a [`VmSpecReply::Refused`] carries.
fn truncate_reason(reason: &str) -> String {
    let mut end = reason.len().min(MAX_VM_SPEC_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// A hello as the session agreed to it.
struct AgreedHello {
    host: Name,
    generation: u32,
    disks: Vec<Disk>,
    /// The session's protocol version.
    version: u16,
    /// The shipper's release.
    software: String,
}

/// The refusal of a hello naming another host than the certificate.
fn unauthorized(host: &Name, authenticated: &Name) -> ReceiverError {
    ReceiverError::refuse(
        ErrorClass::Permanent,
        ErrorCode::Unauthorized,
        format!("host {host:?} in hello, but the certificate names {authenticated:?}"),
    )
}

/// A new connection, waiting for the shipper's Hello.
#[derive(Debug)]
pub struct ExpectHello {
    config: ReceiverConfig,
}

impl ExpectHello {
    /// A session for a connection authenticated as `config.authenticated_host`.
    pub fn new(config: ReceiverConfig) -> ExpectHello {
        ExpectHello { config }
    }

    /// Handles the first message; on success returns the streaming session
    /// and the Welcome frame to send. A refusal carries the version to send
    /// it in (see [`ReceiverError::to_frame`]).
    pub fn handle_message<R: Replica>(
        self,
        received: Received,
        replica: &mut R,
    ) -> Result<(Receiving, Vec<u8>), ReceiverError> {
        let hello = self.negotiate(received)?;
        let version = hello.version;
        self.start(
            hello.host,
            hello.generation,
            hello.disks,
            version,
            hello.software,
            replica,
        )
        .map_err(|e| e.in_version(version))
    }

    /// Answers the first message when another receiver sharing the
    /// replica store owns the group: a [`Message::Redirect`] frame to `to`
    /// (the owner's address) for a shipper of version 5 or later, else a
    /// transient `busy` refusal naming it (the shipper retries). A hello
    /// that would be refused anyway is refused the same way.
    pub fn redirect(self, received: Received, to: &str) -> Result<Vec<u8>, ReceiverError> {
        let hello = self.negotiate(received)?;
        let version = hello.version;
        if hello.host != self.config.authenticated_host {
            return Err(
                unauthorized(&hello.host, &self.config.authenticated_host).in_version(version)
            );
        }
        if version >= MessageType::Redirect.since() {
            return Ok(Message::Redirect { to: to.to_owned() }.encode(version, Compression::None)?);
        }
        Err(ReceiverError::refuse(
            ErrorClass::Transient,
            ErrorCode::Busy,
            format!(
                "this group is applied by the receiver at {to} (a shipper of protocol \
                 version {version} is not redirected: list that receiver first)"
            ),
        )
        .in_version(version))
    }

    /// The hello, its names and the version the session will speak.
    fn negotiate(&self, received: Received) -> Result<AgreedHello, ReceiverError> {
        let ours = self.config.versions;
        let version = received.version;
        // Before the versions are agreed, say it in one the shipper reads.
        let answer = version.min(ours.max);
        let (host, generation, disks, offered, software) = match received.message {
            Message::Hello {
                host,
                generation,
                disks,
                min_version,
                software,
                ..
            } => {
                let offered = Versions {
                    min: min_version,
                    max: version,
                };
                (host, generation, disks, offered, software)
            }
            Message::Error {
                class,
                code,
                message,
            } => {
                return Err(ReceiverError::Peer {
                    class,
                    code,
                    message,
                })
            }
            other => {
                return Err(ReceiverError::protocol(format!(
                    "expected hello, got {}",
                    other.msg_type().name()
                ))
                .in_version(answer))
            }
        };
        let version = offered.max.min(ours.max);
        let upgrade = if offered.max < ours.min {
            Some("shipper")
        } else if version < offered.min {
            Some("receiver")
        } else {
            None
        };
        if let Some(older) = upgrade {
            return Err(ReceiverError::refuse(
                ErrorClass::Permanent,
                ErrorCode::Protocol,
                format!(
                    "no protocol version in common: the shipper{} speaks {offered}, this \
                     receiver (tidemark {SOFTWARE}) {ours}; upgrade the {older}",
                    if software.is_empty() {
                        String::new()
                    } else {
                        format!(" (tidemark {software})")
                    }
                ),
            )
            .in_version(answer));
        }
        Ok(AgreedHello {
            host,
            generation,
            disks,
            version,
            software,
        })
    }

    fn start<R: Replica>(
        self,
        host: Name,
        generation: u32,
        disks: Vec<Disk>,
        version: u16,
        shipper_software: String,
        replica: &mut R,
    ) -> Result<(Receiving, Vec<u8>), ReceiverError> {
        if host != self.config.authenticated_host {
            return Err(unauthorized(&host, &self.config.authenticated_host));
        }
        let mut ids = HashSet::new();
        if disks.len() > MAX_DISKS || !disks.iter().all(|d| ids.insert(d.id)) {
            return Err(ReceiverError::refuse(
                ErrorClass::Permanent,
                ErrorCode::Protocol,
                "duplicate disk ids in hello",
            ));
        }
        replica.ensure_disks(&disks)?;
        let lease = replica.new_lease();
        // Whatever an earlier session applied is a valid prefix of the
        // stream: make it durable so the shipper resumes after it.
        let position = replica.commit()?;
        if generation < position.generation {
            return Err(ReceiverError::refuse(
                ErrorClass::Permanent,
                ErrorCode::Protocol,
                format!(
                    "host is at generation {generation}, the replica already at {}",
                    position.generation
                ),
            ));
        }
        let mut synced = Vec::with_capacity(disks.len());
        for d in &disks {
            let s = position
                .disks
                .iter()
                .find(|s| s.id == d.id)
                .map_or(0, |s| s.synced);
            synced.push((d.clone(), s));
        }
        let welcome = Message::Welcome {
            durable_seq: position.durable_seq,
            generation: position.generation,
            disks: synced
                .iter()
                .map(|(d, s)| DiskSync {
                    id: d.id,
                    synced: *s,
                })
                .collect(),
            resyncing: position.resyncing.clone(),
            software: SOFTWARE.to_string(),
        }
        .encode(version, self.config.compression)?;
        let session = Receiving {
            config: self.config,
            version,
            shipper_software,
            lease,
            applied: RecordId {
                seq: position.durable_seq,
                generation: position.generation,
            },
            disks: synced,
            frames: 0,
            acked_frames: 0,
            dirty: false,
            uncommitted_bytes: 0,
            uncommitted_record_bytes: 0,
            drained: None,
            vm_spec: None,
        };
        Ok((session, welcome))
    }
}

/// The shipper's answer to a drain request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainOutcome {
    /// The request's id.
    pub id: u64,
    /// The last record, applied and durable before this outcome was
    /// reported; or why the group could not be drained.
    pub result: Result<Seq, DrainRefused>,
}

/// The protected host could not drain its group (the tracker would not
/// stop, its log is damaged): the reason as its shipper wrote it in the
/// `error` field of [`Message::Drained`], one line of text for the admin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DrainRefused {
    /// The shipper's reason, as sent.
    pub reason: String,
}

/// A session past the Hello.
#[derive(Debug)]
pub struct Receiving {
    config: ReceiverConfig,
    /// The protocol version of the session: every frame is of it.
    version: u16,
    /// The shipper's release, as its hello named it (empty before version 2).
    shipper_software: String,
    lease: u64,
    /// The last record applied (seq 0: none ever).
    applied: RecordId,
    /// Each disk and where its initial sync stands (applied, not durable).
    disks: Vec<(Disk, u64)>,
    frames: u64,
    acked_frames: u64,
    dirty: bool,
    uncommitted_bytes: u64,
    uncommitted_record_bytes: u64,
    drained: Option<DrainOutcome>,
    /// What became of the last VM spec received, until the daemon takes it.
    vm_spec: Option<Result<Seq, VmSpecRefused>>,
}

impl Receiving {
    /// The last record applied (possibly not yet durable).
    pub fn applied(&self) -> RecordId {
        self.applied
    }

    /// The protocol version both ends agreed on.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// The shipper's release as its hello named it; empty if its version
    /// does not say (version 1).
    pub fn shipper_software(&self) -> &str {
        &self.shipper_software
    }

    /// Encodes a request to drain the group for a planned failover; the
    /// answer comes as [`Receiving::take_drained`].
    pub fn request_drain(&self, id: u64) -> Result<Vec<u8>, ReceiverError> {
        Message::DrainRequest { id }
            .encode(self.version, self.config.compression)
            .map_err(|e| ReceiverError::from(e).in_version(self.version))
    }

    /// The shipper's answer to a drain request, once it came.
    pub fn take_drained(&mut self) -> Option<DrainOutcome> {
        self.drained.take()
    }

    /// What became of the last VM spec the shipper sent, once (kept: the
    /// record its version applies from), for the daemon's log.
    pub fn take_vm_spec(&mut self) -> Option<Result<Seq, VmSpecRefused>> {
        self.vm_spec.take()
    }

    /// Handles one message from the shipper; returns the frames to send
    /// (Acks, Digests). On error, send the error's frame and close.
    pub fn handle_message<R: Replica>(
        &mut self,
        received: Received,
        replica: &mut R,
    ) -> Result<Vec<Vec<u8>>, ReceiverError> {
        self.handle(received, replica)
            .map_err(|e| e.in_version(self.version))
    }

    fn handle<R: Replica>(
        &mut self,
        received: Received,
        replica: &mut R,
    ) -> Result<Vec<Vec<u8>>, ReceiverError> {
        if received.version != self.version {
            return Err(ReceiverError::protocol(format!(
                "a frame of protocol version {} in a session of version {}",
                received.version, self.version
            )));
        }
        let msg = received.message;
        if replica.current_lease() != self.lease {
            return Err(ReceiverError::refuse(
                ErrorClass::Transient,
                ErrorCode::Busy,
                "a newer connection of this group took over",
            ));
        }
        self.frames += 1;
        let mut out = Vec::new();
        match msg {
            Message::Records(batch) => {
                // Check the whole batch before applying any of it.
                let mut next = self.applied;
                let mut fresh = Vec::with_capacity(batch.len());
                for record in batch.records() {
                    let record = record.map_err(|e| {
                        ReceiverError::refuse(
                            ErrorClass::Transient,
                            ErrorCode::BadChecksum,
                            e.to_string(),
                        )
                    })?;
                    let h = &record.header;
                    let id = RecordId {
                        seq: h.seq,
                        generation: h.generation,
                    };
                    if id.seq <= next.seq {
                        if id.generation > next.generation {
                            return Err(ReceiverError::refuse(
                                ErrorClass::Permanent,
                                ErrorCode::SequenceGap,
                                format!(
                                    "generation {} reuses sequence number {} already applied",
                                    id.generation, id.seq
                                ),
                            ));
                        }
                        continue; // a duplicate of a resumed stream
                    }
                    if next.seq != Seq::ZERO && !id.follows(next) {
                        return Err(ReceiverError::refuse(
                            ErrorClass::Permanent,
                            ErrorCode::SequenceGap,
                            format!("record {id:?} cannot follow {next:?}"),
                        ));
                    }
                    if h.version > record_version_of(self.version) {
                        return Err(ReceiverError::protocol(format!(
                            "a record of version {} in a session of protocol version {}",
                            h.version, self.version
                        )));
                    }
                    if h.kind == tidemark_changelog::Kind::Grow {
                        self.grow_disk(h.disk, h.offset.saturating_add(h.length))?;
                    } else if h.disk != DiskId::GROUP {
                        self.check_extent(h.disk, h.offset, h.length)?;
                    }
                    next = id;
                    fresh.push(record);
                }
                for record in &fresh {
                    replica.apply_record(*record)?;
                    // While the group's initial sync runs, a resync-needed
                    // extent is copied again by the initial sync: its disk's
                    // sync position goes back to the extent (the store and
                    // the shipper follow the same rule).
                    let h = &record.header;
                    if h.kind == tidemark_changelog::Kind::ResyncNeeded
                        && self.disks.iter().any(|(d, s)| *s < d.size)
                    {
                        if let Some(d) = self.disks.iter_mut().find(|(d, _)| d.id == h.disk) {
                            d.1 = d.1.min(h.offset);
                        }
                    }
                    self.applied = RecordId {
                        seq: record.header.seq,
                        generation: record.header.generation,
                    };
                    self.dirty = true;
                }
                // Committed when the input runs dry (handle_idle) or the
                // bound is reached, together with the batches after it.
                self.uncommitted_record_bytes = self
                    .uncommitted_record_bytes
                    .saturating_add(batch.byte_len() as u64);
                if self.uncommitted_record_bytes >= self.config.commit_record_bytes {
                    self.commit(replica, &mut out)?;
                }
            }
            Message::Chunk {
                disk,
                offset,
                after_seq,
                purpose,
                data,
            } => {
                self.check_position("chunk", after_seq)?;
                let length = data.len();
                let synced = self.check_extent(disk, offset, length)?;
                if purpose == ChunkPurpose::InitialSync && offset != synced {
                    return Err(ReceiverError::protocol(format!(
                        "initial-sync chunk of disk {disk} at {offset}, synced up to {synced}"
                    )));
                }
                replica.apply_chunk(disk, offset, purpose, &data)?;
                if purpose == ChunkPurpose::InitialSync {
                    if let Some(d) = self.disks.iter_mut().find(|(d, _)| d.id == disk) {
                        d.1 = offset + length;
                    }
                }
                self.dirty = true;
                self.uncommitted_bytes = self.uncommitted_bytes.saturating_add(length);
                if self.uncommitted_bytes >= self.config.commit_bytes {
                    self.commit(replica, &mut out)?;
                }
            }
            Message::DigestRequest {
                disk,
                offset,
                length,
                block_size,
            } => {
                self.check_extent(disk, offset, length)?;
                let expected = digest_count(offset, length, block_size)
                    .map_err(|e| ReceiverError::protocol(e.to_string()))?;
                let digests = replica.digests(disk, offset, length, block_size)?;
                if digests.len() as u64 != expected {
                    return Err(ReceiverError::refuse(
                        ErrorClass::Transient,
                        ErrorCode::Internal,
                        format!("the store gave {} digests, {expected} due", digests.len()),
                    ));
                }
                out.push(
                    Message::Digests {
                        disk,
                        offset,
                        block_size,
                        digests,
                    }
                    .encode(self.version, self.config.compression)?,
                );
            }
            Message::ResyncDone {
                disk,
                offset,
                length,
                after_seq,
            } => {
                self.check_position("resync end", after_seq)?;
                self.check_extent(disk, offset, length)?;
                replica.resync_done(disk, offset, length)?;
                self.dirty = true;
            }
            Message::Drained {
                id,
                last_seq,
                error,
            } => {
                let result = if error.is_empty() {
                    if last_seq != self.applied.seq {
                        return Err(ReceiverError::protocol(format!(
                            "drained at record {last_seq}, the replica is at {}",
                            self.applied.seq
                        )));
                    }
                    // Durable before anyone is told.
                    self.dirty = true;
                    self.commit(replica, &mut out)?;
                    Ok(last_seq)
                } else {
                    Err(DrainRefused { reason: error })
                };
                self.drained = Some(DrainOutcome { id, result });
            }
            Message::VmSpec { text } => {
                // Messages arrive in stream order: the spec was read on
                // the protected site after every record applied so far.
                let from_seq = self.applied.seq.checked_add(1).unwrap_or(self.applied.seq);
                let kept = replica.keep_vm_spec(from_seq, &text);
                let reply = match &kept {
                    Ok(from_seq) => VmSpecReply::Kept {
                        from_seq: *from_seq,
                    },
                    Err(why) => VmSpecReply::Refused {
                        reason: truncate_reason(&why.to_string()),
                    },
                };
                out.push(
                    Message::VmSpecReply(reply).encode(self.version, self.config.compression)?,
                );
                self.vm_spec = Some(kept);
            }
            Message::Error {
                class,
                code,
                message,
            } => {
                return Err(ReceiverError::Peer {
                    class,
                    code,
                    message,
                })
            }
            other => {
                return Err(ReceiverError::protocol(format!(
                    "unexpected {} from the shipper",
                    other.msg_type().name()
                )))
            }
        }
        Ok(out)
    }

    /// The daemon has no more input buffered, no message and no part of
    /// one (a part means the rest is on its way): commit what is applied
    /// and acknowledge it (returns the Ack, if there is anything to say).
    pub fn handle_idle<R: Replica>(
        &mut self,
        replica: &mut R,
    ) -> Result<Vec<Vec<u8>>, ReceiverError> {
        if replica.current_lease() != self.lease {
            return Err(ReceiverError::refuse(
                ErrorClass::Transient,
                ErrorCode::Busy,
                "a newer connection of this group took over",
            )
            .in_version(self.version));
        }
        let mut out = Vec::new();
        if self.dirty || self.frames > self.acked_frames {
            self.commit(replica, &mut out)
                .map_err(|e| e.in_version(self.version))?;
        }
        Ok(out)
    }

    fn commit<R: Replica>(
        &mut self,
        replica: &mut R,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), ReceiverError> {
        // Nothing new applied (a batch of duplicates): no need to sync.
        let position = if self.dirty {
            replica.commit()?
        } else {
            replica.position()
        };
        self.dirty = false;
        self.uncommitted_bytes = 0;
        self.uncommitted_record_bytes = 0;
        self.acked_frames = self.frames;
        out.push(
            Message::Ack {
                durable_seq: position.durable_seq,
                generation: position.generation,
                frames: self.frames,
                disks: position.disks,
            }
            .encode(self.version, self.config.compression)?,
        );
        Ok(())
    }

    fn check_position(&self, what: &str, after_seq: Seq) -> Result<(), ReceiverError> {
        if after_seq != self.applied.seq {
            return Err(ReceiverError::protocol(format!(
                "{what} for after record {after_seq}, the replica is at {}",
                self.applied.seq
            )));
        }
        Ok(())
    }

    /// A grow record: the disk's extents reach to `size` from it on. A
    /// fully synced disk stays so when the group's initial sync is over
    /// (the replica resyncs the grown part); during it the grown part is
    /// copied with the rest. (The replica refuses a shrink.)
    fn grow_disk(&mut self, disk: DiskId, size: u64) -> Result<(), ReceiverError> {
        let initial_sync = self.disks.iter().any(|(d, s)| *s < d.size);
        let Some((info, synced)) = self.disks.iter_mut().find(|(d, _)| d.id == disk) else {
            return Err(ReceiverError::refuse(
                ErrorClass::Permanent,
                ErrorCode::UnknownDisk,
                format!("disk {disk} was not in the hello"),
            ));
        };
        if size > info.size {
            if !initial_sync {
                *synced = size;
            }
            info.size = size;
        }
        Ok(())
    }

    /// Checks an extent against the disk; returns the disk's synced offset.
    fn check_extent(&self, disk: DiskId, offset: u64, length: u64) -> Result<u64, ReceiverError> {
        let Some((info, synced)) = self.disks.iter().find(|(d, _)| d.id == disk) else {
            return Err(ReceiverError::refuse(
                ErrorClass::Permanent,
                ErrorCode::UnknownDisk,
                format!("disk {disk} was not in the hello"),
            ));
        };
        match offset.checked_add(length) {
            Some(end) if end <= info.size && length > 0 => Ok(*synced),
            _ => Err(ReceiverError::refuse(
                ErrorClass::Permanent,
                ErrorCode::Protocol,
                format!(
                    "extent {offset}+{length} is empty or beyond disk {disk} of {} bytes",
                    info.size
                ),
            )),
        }
    }
}
