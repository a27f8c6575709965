//! Why a replica-store operation failed, and whose fault it was.

use std::io;
use std::path::PathBuf;
use tidemark_changelog::record::DecodeError;
use tidemark_changelog::{DiskId, Seq};

/// Why a replica-store operation failed. Errors caused by the peer (the
/// shipper) change nothing; errors of the local disk poison the group (see
/// [`StoreError::Poisoned`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Peer: the record is neither a duplicate (at or below the last one
    /// applied, of no newer generation) nor the next one (same generation,
    /// `expected` sequence number) nor the start of a newer generation
    /// above every sequence number applied. Nothing was applied.
    #[error("sequence gap: expected seq {expected} (generation {generation}), got seq {got} of generation {got_generation}")]
    SequenceGap {
        /// The sequence number the group expects next.
        expected: Seq,
        /// The generation of the last applied record.
        generation: u32,
        /// The record's sequence number.
        got: Seq,
        /// The record's generation.
        got_generation: u32,
    },
    /// Peer: the record or chunk names a disk the group does not have.
    #[error("unknown disk {0}")]
    UnknownDisk(DiskId),
    /// Peer: the extent does not lie within the disk.
    #[error("extent {offset}+{length} is outside disk {disk} of {size} bytes")]
    OutOfRange {
        /// The disk.
        disk: DiskId,
        /// First byte of the extent.
        offset: u64,
        /// Bytes of the extent.
        length: u64,
        /// Size of the disk.
        size: u64,
    },
    /// Peer: the record's fields contradict its kind.
    #[error("invalid record seq {seq}")]
    InvalidRecord {
        /// The record's sequence number.
        seq: Seq,
        /// Which rule it broke.
        #[source]
        source: DecodeError,
    },
    /// Peer or transport: the record's checksum does not match its bytes.
    #[error("record seq {seq} fails its checksum")]
    ChecksumMismatch {
        /// The record's sequence number.
        seq: Seq,
    },
    /// Peer: a chunk that does not fit the group's state (an initial-sync
    /// chunk after the initial sync, a resync chunk outside a resync), or
    /// larger than the journal can hold.
    #[error("unexpected {what} chunk: {reason}")]
    UnexpectedChunk {
        /// The chunk's purpose.
        what: &'static str,
        /// Why it was refused.
        reason: &'static str,
    },
    /// Caller: digests were asked with a block size of zero.
    #[error("block size must be non-zero")]
    InvalidBlockSize,
    /// Configuration: a disk is invalid (duplicate id or name, name
    /// too long) or a known disk changed its size or name.
    #[error("disk {disk}: {reason}")]
    BadDisk {
        /// The disk id.
        disk: DiskId,
        /// What is wrong.
        reason: String,
    },
    /// Peer: the record or chunk names a disk that left the group (its
    /// shipper's hello no longer listed it). A shipper sends changes of a
    /// disk only while its host still has it: the host's tracker state or
    /// shipper is not the one that removed it.
    #[error(
        "disk {disk} left the group after record {after}, yet the shipper sends changes of it: \
         the protected host still has it (an older tracker state or log?); a disk that left \
         comes back only as a new disk, with a new id"
    )]
    DiskLeft {
        /// The disk.
        disk: DiskId,
        /// The last record applied before it left.
        after: Seq,
    },
    /// Caller: the group cannot take new disks while it is resyncing.
    #[error("cannot add disk {0} while the group is resyncing")]
    AddWhileResyncing(DiskId),
    /// Local disk: a store file exists but does not verify.
    #[error("{path}: damaged ({reason})")]
    Damaged {
        /// The damaged file.
        path: PathBuf,
        /// What does not verify.
        reason: String,
    },
    /// Release: a store file is of a format version this release does not
    /// read (a newer release wrote it). Nothing was changed.
    #[error(
        "{path}: format version {found}; this release reads versions {oldest} to {newest}{}",
        if .found > .newest { " (a newer tidemark wrote it: run that release or a newer one)" } else { "" }
    )]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version it is of.
        found: u32,
        /// The oldest version this release reads.
        oldest: u32,
        /// The version this release writes.
        newest: u32,
    },
    /// Local disk: another process holds the group directory.
    #[error("{0} is in use by another process")]
    Locked(PathBuf),
    /// Local disk: reading, writing or syncing failed.
    #[error("{context} {path}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Another receiver: the group's lease is held by another live
    /// receiver sharing the cluster, which applies it; `owner` is the
    /// address it recorded (where the shipper is sent). Nothing changed.
    #[error("{group} is owned by another receiver ({})", .owner.as_deref().unwrap_or("address not recorded yet"))]
    OwnedElsewhere {
        /// The group, for messages.
        group: String,
        /// The owner's advertised address.
        owner: Option<String>,
    },
    /// Another receiver or the cluster: the group's lease could not be
    /// taken, or was lost (expired, taken over, this receiver fenced):
    /// nothing more is acknowledged. Open the group again to compete.
    #[error("{group}: group lease")]
    LeaseLost {
        /// The group, for messages.
        group: String,
        /// Why.
        #[source]
        source: crate::lease::LostReason,
    },
    /// The admin's images: failovers to RBD (`failover --to-rbd`) left
    /// clones that still depend on snapshots of the group's replica
    /// images, so the group cannot be removed yet. Nothing was removed.
    #[error(
        "{group}: failover clones still depend on its replica images: {}; flatten them (rbd flatten IMAGE) or remove them (rbd rm IMAGE), then remove the group again",
        .clones.join(", ")
    )]
    ClonesRemain {
        /// The group, for messages.
        group: String,
        /// The clones, as `pool/[namespace/]image`.
        clones: Vec<String>,
    },
    /// No recovery point has this sequence number (never one, or folded).
    #[error("no recovery point at sequence {0}")]
    NoSuchPoint(Seq),
    /// Configuration: the store engine cannot do this (yet).
    #[error("the {engine} store engine cannot {what} yet")]
    Unsupported {
        /// The engine.
        engine: &'static str,
        /// What it was asked to do.
        what: &'static str,
    },

    /// A local I/O error happened earlier (possibly an fsync, which is never
    /// retried): the in-memory view can no longer be trusted. Reopen the
    /// group; it recovers to the last committed position. (Also every
    /// change to a group opened read-only.)
    #[error("the replica group failed earlier or is open read-only")]
    Poisoned,
}
