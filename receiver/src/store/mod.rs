//! The replica store of one host's consistency group: the replica images
//! and their recovery points,
//! the ordered and idempotent apply of change-log records to them, initial
//! sync and checksum resync, and crash recovery.
//!
//! The receiver and the tools reach it through the [`ReplicaStore`] and
//! [`StoreEngine`] traits (`engine`); the local store, [`ReplicaGroup`],
//! is one engine ([`LocalEngine`]): a directory of image files, a journal
//! and a state file, every one of them a file of the storage seam
//! (`tidemark_durable`), so the whole store runs on a simulated directory
//! that loses power at any sync (`tests/store_crash.rs`). What follows
//! documents the rules every engine keeps (apply, modes, points and
//! retention, durability) and the local store's formats.
//!
//! # Apply rules
//!
//! Records are applied strictly in order with the rules of `tidemark log
//! replay` (`tidemark_changelog::replay::apply` does the dispatch): a write
//! writes its payload, write-zeroes and trim make the extent read as zeroes
//! (a punched hole; a zeroed, still allocated range for write-zeroes with
//! no-hole), barriers and markers change no data. A record whose `seq` is at
//! or below the last applied one is a duplicate and ignored, unless it is of
//! a newer generation (a generation never reuses a sequence number: that
//! is refused); the next record must be `seq + 1` of the same generation or
//! belong to a newer generation (which may skip sequence numbers). Anything
//! else is refused before anything changes.
//!
//! # Modes
//!
//! - **initial sync** (a new group): chunks and
//!   records are applied in place, to the images. A resync-needed record
//!   lowers the disk's `synced` offset to the extent, so the initial sync
//!   copies it again. The group is consistent once every disk is copied to
//!   its end. There are no recovery points yet.
//! - **consistent**: every change is appended to the journal; the images
//!   stay as they were. Every barrier and marker appends a *point* entry:
//!   a recovery point, readable as the images with the journal's changes
//!   before it laid over them ([`ReplicaGroup::view`]), without copying a
//!   disk.
//! - **resyncing** (after a resync-needed record of a consistent group):
//!   records and resync chunks are journaled the same way, but barriers
//!   are no points: the newest point stays the last consistent state until
//!   the last pending extent is done and the group is consistent again.
//!
//! A disk added to a consistent group is *joining* until its own initial
//! sync ends: its chunks and records go to its image in place, as in an
//! initial sync, while the other disks' changes are journaled and their
//! points go on. No point holds a joining disk; when its sync ends the
//! state file notes that it joined (a disk change, below), and every point
//! after holds it, read like the others (its image, which holds the
//! source as of the join, with the journal's changes of it after that).
//!
//! # Recovery points and retention
//!
//! The history is the journal from its start to its committed end; the
//! images hold the state as of the start. Retention ([`Retention`]: age,
//! count, space) picks the newest point it no longer keeps and *folds* the
//! history up to it into the images (for space, down to a margin below the
//! limit, so that a busy group does not fold at every commit:
//! [`space_margin`]): the state file first records the fold
//! (the points before it are gone from then on), the changes are written
//! into the images and synced, then the state file moves the history's
//! start and the journal segments wholly before it are removed. A crash
//! anywhere in between is finished on open (writing the same changes again
//! gives the same images). The newest point is never folded, nor a point
//! at or after the pin (a test failover's) or the span floor (below).
//! Reading a
//! point that is kept is unaffected by a fold: it reads journal changes for
//! everything the history changed before it, and the images only where
//! nothing before it (and so nothing folded) changed.
//!
//! # Disks that grow
//!
//! A disk grows where the log's grow record lies (applying it), or when
//! the shipper's hello announces it larger than the group knows it
//! ([`ReplicaGroup::ensure_disks`]; a grow record to that size after it
//! then changes nothing). Either way it grows in place: everything
//! applied is committed, the
//! image is made the new size (a sparse file's `set_len`; on Ceph an RBD
//! resize through the cluster seam) and synced, and the state file notes a
//! *disk change*: the disk, the last record applied before the growth and
//! the size before it. A recovery point at or before that record reads
//! the disk at its old size ([`ReplicaGroup::disks_at`], [`View::disks`];
//! a read beyond it is out of range), a later one at the new size; the
//! image's bytes below the old size are the same for both, and nothing
//! before the growth wrote beyond it. A failover of an older point writes
//! an image of the old size. The grown part then waits for a checksum
//! resync (the group is resyncing: the source may hold anything there).
//! A change, growth or join, is dropped when retention folds the last
//! point before it. A disk never shrinks: a smaller size is refused. A
//! crash after the image grew and before the state file named the new
//! size leaves a longer image: the writer's open cuts it back (nothing
//! committed is in it), and the growth is made again when the disk is
//! announced again.
//!
//! # Disks that leave
//!
//! A disk the shipper's hello no longer lists leaves the group
//! ([`ReplicaGroup::leave`], called for the hello by the receiver's
//! session before new disks are added). Everything applied is committed
//! first; the state file then notes a *disk change* of kind "left" after
//! the last record applied: a recovery point at or before it holds the
//! disk as it was (read byte for byte as before, failed over with the
//! group), a later point does not. Its pending extents are cleared (a
//! resync that only they kept open ends), and a record or chunk that names
//! it afterwards is refused ([`StoreError::DiskLeft`]): a shipper sends
//! one only if its host still has the disk. A disk in no point (the
//! group's initial sync, or its own join not finished) goes at once.
//!
//! Once retention folded the last point that holds it, and the history
//! kept no longer names it (its last records may lie after that point),
//! the disk goes: the state file first drops it and lists its id as
//! *removed*, then its image is removed (on Ceph its RBD image), then the
//! state file drops the id. A crash between leaves an image the state
//! names as removed, which the writer's next open removes; never a disk
//! whose image is missing. A disk of the same name added later is a new
//! disk (the tracker gives it a new id) and joins as any new disk does.
//!
//! Why absence from the hello is enough, with no confirmation on this
//! side: the hello lists the disks of the tracker's `disks` file, which the
//! tracker writes at every start from its configuration, and the tracker
//! has acted on the removal before any shipper can announce it (it logs
//! that the disk leaves, stops tracking it and never gives its id again:
//! added back, even after a mistake in the configuration, it is a new disk
//! synced in full). So the old disk's replica can never be written again,
//! and listing it in newer points would offer a stale copy of a disk the
//! admin removed. Every release that speaks to this one announces all of
//! its disks (an earlier one whose ids were still positions refuses a log
//! directory where a disk was removed), and a hello with no disk changes
//! nothing. Nothing is lost at once: the points before keep the disk
//! until retention drops them, which is the admin's window to fail over
//! to one of them. The receiver logs a warning when a disk leaves.
//! Records of the disk that a shipper had not sent before the host
//! restarted without it are refused by the session (`disk N was not in
//! the hello`): remove a disk after the shipper caught up.
//!
//! # The span floor
//!
//! A group that is a member of a span (`[[receiver.span]]`) has a floor:
//! its marker of the oldest span point the span still keeps (the span's
//! coordinator sets it, [`ReplicaGroup::set_floor`], whenever a span
//! point becomes durable or leaves the retention window). No point at or
//! after the floor is folded, by any rule: a span point needs every
//! member's marker, so one member's retention must not take a point that
//! the others still offer. The floor is kept durably in the group
//! directory (`span-floor`) and read at open, so it holds from the first
//! commit of a restarted receiver on, before the coordinator runs again;
//! the receiver removes it when it opens a group no configured span names.
//!
//! The floor wins over `max-space`: when the history is over the limit
//! and only the floor keeps it there, nothing the floor protects is
//! folded; the store says so once with a warning and
//! [`ReplicaGroup::floor_holds_space`] (the receiver's metric
//! `tidemark_receiver_span_floor_holds_space`) stays true until the
//! history fits again. Space is the admin's to give (a larger `max-space`
//! or a shorter retention window, which moves the floor); silently
//! breaking a span point is not the store's to decide.
//!
//! # Layout of the group directory
//!
//! The directory is 0700 and every file in it 0600 (created so, whatever
//! the umask): the images are a copy of a protected disk.
//!
//! ```text
//!  state              the committed position (below), replaced atomically:
//!                     state.tmp, fdatasync, rename, fsync of the directory
//!  disk-<id>.img      one sparse image per disk, exactly the disk's size
//!  journal.SSSSSSSS   journal segments (hex number); a position in the
//!                     journal is segment << 40 | offset in the segment
//!  journal-index      what the history holds up to a commit mark (below),
//!                     replaced atomically like the state file
//!  lock               flock(2)ed by the process that has the group open
//!                     (its pid inside)
//!  test-failover/pin  the point a running test failover reads (decimal
//!                     sequence number): never folded while it exists
//!  span-floor         the span floor (decimal sequence number, replaced
//!                     atomically and durably); absent: no floor
//!  test-failover/disk-<id>.scratch
//!                     that test's writes (`tidemark test-failover`)
//!  drain.request, drain.result
//!                     a planned failover's request and answer (sealed
//!                     key-value text, see `crate::drain`)
//! ```
//!
//! The index of which journal bytes override which image ranges
//! (`overlay`) lives in memory: it is rebuilt at every open from the
//! journal index and the history written after it (or from the whole
//! history where the journal index is missing or does not match).
//!
//! # Versions
//!
//! The state file's version is the version of the whole group directory:
//! of its layout, of the journal entries it may hold and of what the state
//! file itself holds. This release reads versions 2 to 4. It writes
//! version 2 (what every earlier release writes and reads; version 1
//! predates recovery points and was never released) while the group has
//! no disk changes, version 3 while it has some (a disk grew and a
//! point before the growth is kept, or a disk joined), and version 4
//! while a disk that left is kept or its image is still to be removed:
//! an earlier release refuses such a group by its version rather than
//! read an older point at the wrong size or offer a disk that left in
//! every point. Once retention folded the last such point, the group is
//! version 2 again. A newer version is refused before anything is
//! touched ([`StoreError::UnsupportedVersion`], naming the file and both
//! versions): an older release never misreads a newer store. When a new
//! version comes, this reader keeps reading the previous one; the group is
//! migrated by opening it: whatever the new version changes is rewritten,
//! durably, and the state file, replaced atomically, comes last, so a
//! crash leaves either store whole. `tests/store_upgrade.rs` opens a group
//! the previous release wrote and goes on replicating into it.
//!
//! The other files keep their own rules:
//! - journal entries carry their own version byte (1), checked on read;
//! - images are the disks' bytes, nothing else; their id, name and size
//!   are in the state file;
//! - the pin is read by the receiver and written by `tidemark
//!   test-failover`, which during an upgrade may be of different releases:
//!   a receiver that could not read it would fold the point the test
//!   reads. So its format never changes: a new one takes a new file name;
//! - the span floor is the pin's format (a decimal sequence number) and
//!   never changes either: an older release ignores the file (and folds
//!   without a floor), a newer one that needs more takes a new name;
//! - the journal index has its own version byte (1): it is a cache, and
//!   one of a version this release does not know is ignored (the history
//!   is read instead), as is any index an older release leaves behind;
//! - a test failover's scratch files are read only by the process that
//!   writes them, and removed when it ends;
//! - drain files are key-value lines: a reader ignores keys it does not
//!   know and a key never changes meaning (a change takes a new key), as
//!   the receiver and the CLI that share them may be of different releases.
//!
//! # State file
//!
//! All integers little-endian.
//!
//! ```text
//!  offset size field
//!       0    4 magic        "TMRS"
//!       4    2 version      2, 3 or 4
//!       6    1 mode         0 initial-sync, 1 consistent, 2 resyncing
//!       7    1 flags        bit 0 a fold to fold-to is in progress;
//!                           bit 1 the last-barrier fields are set
//!       8    8 durable-seq  last record whose effect is committed
//!      16    4 generation   generation of that record
//!      20    4 disk-count   n
//!      24    8 barrier-seq  last barrier applied (if flag bit 1)
//!      32    8 barrier-ts   its timestamp, ns since the Unix epoch
//!      40    8 start        journal position where the history starts
//!      48    8 end          journal position where the committed history ends
//!      56    8 fold-to      (flag bit 0) the fold's end
//!      64    … n disks, sorted by id, each:
//!                 4 id, 4 name-len (<= 1024), 8 size, 8 synced,
//!                 4 pending-count m, name (UTF-8),
//!                 m pending extents: 8 start, 8 end (sorted, disjoint)
//!            (versions 3 and 4) the disk changes:
//!            4 change-count c (version 3: at least 1, or a disk joining)
//!            c changes, sorted by after-seq, then disk id, each:
//!                 4 disk (one of the disks above), 1 kind (1 grew,
//!                 2 joined, 3 left: version 4 only, the disk's last
//!                 change, its pending-count 0 and synced its size),
//!                 8 after-seq (the last record before the change; points
//!                 at or before it do not see it), 8 value (grew: the
//!                 size before, smaller than the disk's size; else 0)
//!            (version 4 only) the removed disks, whose images may remain:
//!            4 removed-count r, r × 4 disk id (sorted, none of the
//!                 disks above); at least one left change or removed id
//!    end-4   4 crc32c       over every byte before it
//! ```
//!
//! A new kind of disk change takes a new version: this release refuses a
//! kind it does not know as damage.
//!
//! # Journal
//!
//! A sequence of entries; the history `start..end` (per the state file) is
//! committed and ends with a commit mark, as does every segment but the
//! last; anything after `end` is an uncommitted (possibly torn) tail and is
//! cut off on open. A segment is begun after a commit mark once the
//! current one reaches the segment size (default 256 MiB).
//!
//! ```text
//!  offset size field
//!       0    4 magic        "TMJE"
//!       4    1 version      1
//!       5    1 kind         1 data, 2 zero, 3 commit mark, 4 point
//!       6    2 flags        bit 1 no-hole (zero only)
//!       8    4 disk         (commit mark: generation; point: bit 0
//!                           app-consistent)
//!      12    4 payload-len  data: == length, at most 64 MiB; point: the
//!                           label's length (<= 1024); else 0
//!      16    8 offset       byte offset on the disk (commit mark, point:
//!                           sequence number)
//!      24    8 length       bytes of the disk covered (commit mark: 0;
//!                           point: timestamp, ns since the Unix epoch)
//!      32    4 reserved     zero
//!      36    4 crc32c       over bytes 0..36, then the payload
//!      40    … payload      data, or the point's label (UTF-8)
//! ```
//!
//! # Journal index
//!
//! Reading a long history at every open (every entry, checksums and all)
//! takes seconds per GiB; the journal index (`index` module) lets an open
//! read only what was written after it. The writer writes it after a
//! commit once the history has grown by the index interval (default
//! 64 MiB, or four times the index's own size if that is more) since the
//! last one, and at an open that had to read that much. An open uses it
//! if it matches the journal: its history starts at or before the state
//! file's start and ends (`covered`) at or before the committed end; every
//! segment it covers but the last is there with the length it names; and
//! a commit mark with its sequence number and generation lies at
//! `mark-at`. Otherwise it is ignored, never an error: the history is read
//! from its start, and damage there is reported as it always was. The
//! writer checked every entry up to `covered` when it wrote or read it;
//! entries before `covered` are not checked again at an open that uses
//! the index. All integers little-endian.
//!
//! ```text
//!  offset size field
//!       0    4 magic        "TMJI"
//!       4    1 version      1
//!       5    3 reserved     zero
//!       8    8 start        journal position where the history started
//!      16    8 covered      position just past the last commit mark indexed
//!      24    8 mark-at      position of that commit mark's header
//!      32    8 commit-seq   its sequence number
//!      40    4 commit-gen   its generation
//!      44    4 segment-count s
//!      48    8 change-count n
//!      56    8 point-count  p
//!      64    … s segments, each: 4 number, 8 length (as far as covered)
//!            … n changes in journal order, each: 8 end (position just
//!                 past its entry), 4 disk, 1 kind (1 journal bytes, 2
//!                 zeroes, 3 zeroes kept allocated), 8 start, 8 end on
//!                 the disk, 8 position of its bytes (kind 1; else 0)
//!            … p points in journal order, each: 8 position (just past
//!                 its entry), 8 sequence number, 8 timestamp, 1
//!                 app-consistent (0 or 1), 2 label-len (<= 1024), label
//!    end-4   4 crc32c       over every byte before it
//! ```
//!
//! # Durability
//!
//! [`ReplicaGroup::commit`] fdatasyncs the images written in place (initial
//! sync: each chunk's writeback is started as it is applied, so the sync
//! mostly waits for the last ones; only the sync makes them durable), or
//! appends a commit mark to the journal and fdatasyncs it, then
//! replaces the state file. Only then is the position durable. Any I/O error
//! poisons the open group ([`StoreError::Poisoned`]): fsync is never retried,
//! and reopening recovers to the last committed position.

pub mod ceph;
mod engine;
mod error;
mod image;
mod index;
mod journal;
mod open;
mod overlay;
mod state;

pub use engine::{
    GroupOwner, LocalEngine, PointReader, ReplicaStore, SpanTakeoverError, StoreEngine,
};
pub use error::StoreError;
#[cfg(feature = "ceph")]
pub use open::connect;
pub use open::{open_engine, owner, OpenEngineError};
/// A disk of the group (id, name, size), as the shipper announces it; the
/// store keeps one image of each.
pub use tidemark_changelog::Disk;

/// The store's pure codecs, private otherwise, for the fuzz targets
/// (`fuzz/`): nothing else may use them.
#[doc(hidden)]
pub mod fuzzing {
    /// Bytes of a journal entry header.
    pub const JOURNAL_HEADER_LEN: usize = super::journal::HEADER_LEN;

    /// Decodes a state file and encodes what it decoded; `Err` says what
    /// does not verify.
    pub fn state_round_trip(bytes: &[u8]) -> Result<Vec<u8>, &'static str> {
        match super::state::StateFile::decode(bytes) {
            Ok(state) => Ok(state.encode()),
            Err(super::state::StateError::Damaged(what)) => Err(what),
            Err(super::state::StateError::Version(_)) => Err("unsupported version"),
        }
    }

    /// Decodes a journal entry header and encodes the entry again (for a
    /// zero payload of the length it announces); `Err` says what is wrong.
    pub fn journal_header_round_trip(
        header: &[u8; JOURNAL_HEADER_LEN],
    ) -> Result<[u8; JOURNAL_HEADER_LEN], &'static str> {
        let (entry, payload_len, _crc) = super::journal::Entry::decode_header(header)?;
        Ok(entry.encode_header(&vec![0; payload_len]))
    }
}

use journal::{Journal, Journaled};
use overlay::{Overlay, Source};
use state::{ChangeKind, DiskChange, DiskState, Meta, Mode, StateFile};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use tidemark_changelog::record::{Kind, Record, RecordRef, FLAG_APP_CONSISTENT, FLAG_NO_HOLE};
use tidemark_changelog::replay::{self, ReplaySummary};
use tidemark_changelog::{create_private_dir_all, DirLock, DiskId, Extent, LockError, Seq};
use tidemark_durable::{replace, Durability, FsDir, LogDir, LogFile};
/// Initial-sync progress of one disk: the wire's type, which says it to
/// the shipper.
pub use tidemark_wire::DiskSync;

const STATE_FILE: &str = "state";
const LOCK_FILE: &str = "lock";
const IO_BUF: usize = 1 << 20;
/// Reads of an image range this long or longer first ask whether it is a
/// hole (one `lseek`); shorter ones just read it.
const HOLE_CHECK_MIN: u64 = 64 << 10;

/// The group's committed position: what the shipper resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Every record up to this sequence number is durably applied.
    pub durable_seq: Seq,
    /// The generation of that record.
    pub generation: u32,
    /// Initial-sync progress of each disk, sorted by id.
    pub disks: Vec<DiskSync>,
    /// What the group is doing.
    pub state: GroupState,
}

/// What the group is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupState {
    /// Some disk is not copied yet; no consistent state exists.
    InitialSync,
    /// The images are a replay of the log up to the position.
    Consistent,
    /// These extents wait for a resync; the images keep the last consistent
    /// state until they are all done.
    Resyncing {
        /// The extents still to resync, sorted by disk and offset.
        pending: Vec<Extent>,
    },
}

/// What [`ReplicaGroup::apply_record`] did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The record was applied (durable at the next commit).
    Done,
    /// The record was applied before; nothing changed.
    Duplicate,
}

/// The content of a sync chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRef<'a> {
    /// These bytes.
    Data(&'a [u8]),
    /// This many bytes that read as zeroes (not sent as data).
    Zero(u64),
}

impl ChunkRef<'_> {
    fn len(&self) -> u64 {
        match self {
            ChunkRef::Data(d) => d.len() as u64,
            ChunkRef::Zero(n) => *n,
        }
    }
}

/// Why a chunk is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Part of the initial copy of a disk.
    InitialSync,
    /// Part of a checksum resync of pending extents.
    Resync,
}

/// Retention of recovery points: which points are folded into the images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Points older than this (by their source timestamp) are folded.
    pub window: std::time::Duration,
    /// At most this many points are kept.
    pub max_points: u64,
    /// The history behind the points may take at most this many bytes.
    /// When it takes more, the fold goes down to [`space_margin`] below
    /// it.
    pub max_space: Option<u64>,
    /// Folds run at most this often (unless space runs out): a fold syncs
    /// the images, so it is batched.
    pub fold_interval: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            window: std::time::Duration::from_secs(24 * 3600),
            max_points: 100_000,
            max_space: None,
            fold_interval: std::time::Duration::from_secs(10),
        }
    }
}

/// How far below `max_space` a fold for space takes the history: a
/// sixteenth of it, at most [`SPACE_MARGIN_MAX`]. A fold has fixed costs
/// whatever it folds (two state file replacements, a sync of the images,
/// the overlays of the whole history rebuilt), so a history kept just
/// under the limit, folded by the few points each commit adds, paid them
/// at every commit of a busy group; with the margin one fold covers
/// several commits. The points it folds early are the oldest ones, which
/// space would fold soon anyway.
pub fn space_margin(max_space: u64) -> u64 {
    (max_space / 16).min(SPACE_MARGIN_MAX)
}

/// The largest [`space_margin`]: about one group commit's worth of
/// writes. A fold's writes and their sync hold up the apply (the stream
/// is read into memory meanwhile), so a fold stays about as long as a
/// commit, and the receiver's memory as bounded.
pub const SPACE_MARGIN_MAX: u64 = 16 << 20;

/// A recovery point: a barrier or marker applied while the group was
/// consistent. The disks can be read as of it ([`ReplicaGroup::view`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPoint {
    /// Sequence number of the barrier or marker.
    pub seq: Seq,
    /// When the protected host wrote it, ns since the Unix epoch.
    pub timestamp_ns: u64,
    /// Inserted after the applications were quiesced.
    pub app_consistent: bool,
    /// The marker's label; empty for a barrier.
    pub label: String,
}

/// What a fold did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldReport {
    /// Points folded into the images (no longer readable).
    pub points: usize,
    /// History bytes freed (segments removed).
    pub freed_bytes: u64,
}

/// The replica store of one consistency group, open for writing by this
/// process alone. Its files are those of `D`, the group directory on the
/// storage seam: a real directory ([`ReplicaGroup::open`]), or a simulated
/// one that can lose power at any sync ([`ReplicaGroup::open_on`]).
#[derive(Debug)]
pub struct ReplicaGroup<D: LogDir = FsDir> {
    dir: D,
    /// The group directory, for messages.
    path: PathBuf,
    /// The directory of a running test failover, where its pin is.
    test_failover: D,
    /// Holds the lock; released when the group is dropped. `None` for a
    /// group opened read-only, or on a directory the caller owns.
    _lock: Option<DirLock>,
    images: BTreeMap<DiskId, D::File>,
    journal: Journal<D>,
    /// Journal position the state file says the history ends at.
    journal_committed: u64,
    /// The position including everything applied, committed or not.
    cur: Meta,
    /// The position as of the last commit.
    durable: Meta,
    /// Images written in place since the last commit.
    touched: BTreeSet<DiskId>,
    /// Something changed since the last commit.
    dirty: bool,
    /// A local I/O error happened; nothing more is done.
    poisoned: bool,
    /// Opened with [`ReplicaGroup::open_read_only`]: nothing is changed.
    read_only: bool,
    retention: Retention,
    segment_size: u64,
    last_fold: Option<std::time::Instant>,
    /// History bytes after which the journal index is written again.
    index_interval: u64,
    /// The size of the index last written.
    index_bytes: u64,
    /// The span floor: no point at or after it is folded (read from
    /// [`FLOOR_FILE`] at open).
    floor: Option<Seq>,
    /// The last retention run wanted to fold for space and the floor
    /// kept it from doing so.
    floor_holds_space: bool,
}

/// The span floor's file in the group directory.
pub const FLOOR_FILE: &str = "span-floor";
const FLOOR_TMP: &str = "span-floor.tmp";

/// The disks of a group as of one recovery point (or the newest state).
pub struct View<'a, D: LogDir = FsDir> {
    group: &'a ReplicaGroup<D>,
    overlays: BTreeMap<DiskId, Overlay>,
    /// The recovery point (`None`: everything applied), whose disk sizes
    /// reads are checked against.
    at: Option<Seq>,
}

impl<D: LogDir> std::fmt::Debug for View<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("group", &self.group.path)
            .finish_non_exhaustive()
    }
}

/// A [`View`] that owns a share of its (read-only) group, for servers
/// that read a point from many threads.
pub struct SharedView<D: LogDir = FsDir> {
    group: std::sync::Arc<ReplicaGroup<D>>,
    overlays: BTreeMap<DiskId, Overlay>,
    at: Seq,
}

impl<D: LogDir> std::fmt::Debug for SharedView<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedView")
            .field("group", &self.group.path)
            .finish_non_exhaustive()
    }
}

impl<D: LogDir> SharedView<D> {
    /// The disks of `group` as of the recovery point `seq`.
    pub fn new(
        group: std::sync::Arc<ReplicaGroup<D>>,
        seq: Seq,
    ) -> Result<SharedView<D>, StoreError> {
        let overlays = group.view(Some(seq))?.overlays;
        Ok(SharedView {
            group,
            overlays,
            at: seq,
        })
    }

    /// See [`View::read`].
    pub fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.view().read(disk, offset, buf)
    }

    /// See [`View::is_zero`].
    pub fn is_zero(&self, disk: DiskId, offset: u64, len: u64) -> bool {
        self.view().is_zero(disk, offset, len)
    }

    /// The group's disks as this point reads them.
    pub fn disks(&self) -> Vec<Disk> {
        self.group.disks_at(self.at)
    }

    fn view(&self) -> ViewRef<'_, D> {
        ViewRef {
            group: &self.group,
            overlays: &self.overlays,
            at: Some(self.at),
        }
    }
}

/// What reading a view needs, borrowed.
struct ViewRef<'a, D: LogDir> {
    group: &'a ReplicaGroup<D>,
    overlays: &'a BTreeMap<DiskId, Overlay>,
    at: Option<Seq>,
}

fn image_name(id: DiskId) -> String {
    format!("disk-{id}.img")
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        context,
        path,
        source,
    }
}

fn settle_initial_sync(meta: &mut Meta) {
    if meta.mode == Mode::InitialSync
        && !meta.disks.is_empty()
        && meta.disks.iter().all(|d| d.synced == d.size)
    {
        meta.mode = Mode::Consistent;
    }
}

fn position_of(meta: &Meta) -> Position {
    Position {
        durable_seq: meta.seq,
        generation: meta.generation,
        disks: meta
            .present()
            .map(|d| DiskSync {
                id: d.id,
                synced: d.synced,
            })
            .collect(),
        state: match meta.mode {
            Mode::InitialSync => GroupState::InitialSync,
            Mode::Consistent => GroupState::Consistent,
            Mode::Resyncing => GroupState::Resyncing {
                pending: meta
                    .present()
                    .flat_map(|d| {
                        d.pending.iter().map(|(s, e)| Extent {
                            disk: d.id,
                            offset: s,
                            length: e - s,
                        })
                    })
                    .collect(),
            },
        },
    }
}

/// Writes what `overlays` lay over the images into them and syncs them.
/// The journal's bytes are copied file to file (in the kernel, on a file
/// system): they do not pass through the process again.
fn apply_overlays<D: LogDir>(
    images: &BTreeMap<DiskId, D::File>,
    journal: &Journal<D>,
    overlays: &BTreeMap<DiskId, Overlay>,
) -> io::Result<()> {
    for (disk, overlay) in overlays {
        let Some(image) = images.get(disk) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the journal names unknown disk {disk}"),
            ));
        };
        for piece in overlay.all() {
            match piece.source {
                Source::Zero { no_hole } => {
                    image::zero_range(image, piece.start, piece.end - piece.start, no_hole)?
                }
                Source::Journal(from) => {
                    journal.copy_to(from, image, piece.start, piece.end - piece.start)?
                }
            }
        }
        image.sync_data()?;
    }
    Ok(())
}

/// Copies `source` into `image` (same size), leaving zero ranges as
/// holes, and syncs it. The source is an image outside the store (the
/// failed-over disk of a failback): only read.
fn copy_sparse<F: LogFile>(source: &Path, image: &F) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let input = std::fs::File::open(source)?;
    let size = input.metadata()?.len();
    let mut buf = vec![0u8; IO_BUF];
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(IO_BUF as u64) as usize;
        input.read_exact_at(&mut buf[..n], at)?;
        if buf[..n].iter().any(|b| *b != 0) {
            image.write_all_at(&[&buf[..n]], at)?;
        }
        at += n as u64;
    }
    image.sync_data()
}

/// The default size at which the journal begins a new segment.
pub const DEFAULT_SEGMENT_SIZE: u64 = 256 << 20;

/// The default history bytes between two writes of the journal index: at
/// most this much history is read at open besides the index.
pub const DEFAULT_INDEX_INTERVAL: u64 = 64 << 20;

impl ReplicaGroup {
    /// Opens the group in `dir`, creating it on first use, and recovers it
    /// after a crash: an uncommitted journal tail is cut off, a fold that
    /// was cut short is finished.
    pub fn open(dir: &Path) -> Result<ReplicaGroup, StoreError> {
        Self::open_mode(dir, false)
    }

    /// Opens the group in `dir` to read its recovery points while a
    /// receiver may have it open for writing: takes no lock and changes no
    /// file. Every mutating call fails as poisoned. A fold running at the
    /// same time may fold a point while it is read: its segments go (reads
    /// fail with an I/O error) and the images change under it (reads may
    /// return the fold's newer data). A reader that must read a point
    /// right pins it first (see [`crate::pin`]), as a test failover and a
    /// planned failover do; listing points needs no pin.
    pub fn open_read_only(dir: &Path) -> Result<ReplicaGroup, StoreError> {
        Self::open_mode(dir, true)
    }

    fn open_mode(dir: &Path, read_only: bool) -> Result<ReplicaGroup, StoreError> {
        let lock = if read_only {
            None
        } else {
            create_private_dir_all(dir).map_err(io_err("creating", dir))?;
            let lock = DirLock::acquire(dir, LOCK_FILE, "process").map_err(|e| match e {
                LockError::Held { .. } => StoreError::Locked(dir.to_path_buf()),
                LockError::Io { path, source } => io_err("locking", &path)(source),
            })?;
            Some(lock)
        };
        let test_failover = FsDir::at(&dir.join(crate::pin::TEST_FAILOVER_DIR));
        ReplicaGroup::open_with(FsDir::at(dir), test_failover, lock, read_only)
    }
}

impl<D: LogDir> ReplicaGroup<D> {
    /// Opens the group whose files are those of `dir` (a running test
    /// failover's pin in `test_failover`) for writing, creating it on
    /// first use and recovering it as [`ReplicaGroup::open`] does, but
    /// takes no lock: the caller owns the directory (a simulated one is
    /// this process's alone).
    pub fn open_on(dir: D, test_failover: D) -> Result<ReplicaGroup<D>, StoreError> {
        ReplicaGroup::open_with(dir, test_failover, None, false)
    }

    /// Opens the group of `dir` read-only, as
    /// [`ReplicaGroup::open_read_only`] does.
    pub fn open_on_read_only(dir: D, test_failover: D) -> Result<ReplicaGroup<D>, StoreError> {
        ReplicaGroup::open_with(dir, test_failover, None, true)
    }

    fn open_with(
        dir: D,
        test_failover: D,
        lock: Option<DirLock>,
        read_only: bool,
    ) -> Result<ReplicaGroup<D>, StoreError> {
        let path = PathBuf::from(dir.describe());
        let state_path = path.join(STATE_FILE);
        let state =
            match state::read_file(&dir, STATE_FILE).map_err(io_err("reading", &state_path))? {
                Some(bytes) => StateFile::decode(&bytes).map_err(|e| match e {
                    state::StateError::Damaged(reason) => StoreError::Damaged {
                        path: state_path.clone(),
                        reason: reason.into(),
                    },
                    state::StateError::Version(found) => StoreError::UnsupportedVersion {
                        path: state_path.clone(),
                        found: found.into(),
                        oldest: state::OLDEST_VERSION.into(),
                        newest: state::VERSION.into(),
                    },
                })?,
                None if read_only => {
                    return Err(StoreError::Damaged {
                        path: state_path,
                        reason: "no state file: not a replica group".into(),
                    })
                }
                None => {
                    let fresh = StateFile {
                        meta: Meta::new(),
                        journal_start: 0,
                        journal_end: 0,
                        fold_to: None,
                    };
                    state::write_atomic(&dir, STATE_FILE, &fresh.encode())
                        .map_err(io_err("writing", &state_path))?;
                    fresh
                }
            };
        let damaged = |path: &Path, reason: String| StoreError::Damaged {
            path: path.to_path_buf(),
            reason,
        };

        let mut images = BTreeMap::new();
        for d in &state.meta.disks {
            let name = image_name(d.id);
            let image_path = path.join(&name);
            let file = dir
                .open(&name, !read_only)
                .map_err(io_err("opening the image", &image_path))?;
            let len = file
                .size()
                .map_err(io_err("reading the size of", &image_path))?;
            if len > d.size {
                // A growth cut short: the image was grown, the state file
                // not yet replaced. The grown part holds nothing committed
                // (the growth is made again when the disk is announced
                // again); a writer gives the image its size back, a reader
                // reads within the size the state file names.
                if !read_only {
                    file.set_len(d.size)
                        .and_then(|()| file.sync_data())
                        .map_err(io_err("undoing an unfinished growth of", &image_path))?;
                }
            } else if len != d.size {
                return Err(damaged(
                    &image_path,
                    format!("image is {len} bytes, disk {} is {} bytes", d.id, d.size),
                ));
            }
            images.insert(d.id, file);
        }

        let history = state.journal_start != state.journal_end;
        if state.meta.mode == Mode::InitialSync && history {
            return Err(damaged(
                &state_path,
                "a history of recovery points during an initial sync".into(),
            ));
        }
        let mut journal = Journal::open(
            dir.clone(),
            state.journal_start,
            state.journal_end,
            read_only,
        )
        .map_err(io_err("reading the journal in", &path))?
        .map_err(|reason| damaged(&path, format!("journal: {reason}")))?;
        if history && journal.last_commit != Some((state.meta.seq, state.meta.generation)) {
            return Err(damaged(
                &path,
                "the journal's last commit mark does not match the state file".into(),
            ));
        }
        if journal.overlays.keys().any(|d| !images.contains_key(d)) {
            return Err(damaged(&path, "the journal names an unknown disk".into()));
        }

        let mut start = state.journal_start;
        if let (Some(to), true) = (state.fold_to, read_only) {
            // The writer finishes the fold; its points are gone already.
            // Until it has, the images may hold only part of the fold (or,
            // after a crash, stay so until the next writer opens): the
            // points kept read the fold's changes from the journal.
            journal.forget_points_before(to);
        } else if let Some(to) = state.fold_to {
            let overlays = journal.overlays_before(to);
            apply_overlays(&images, &journal, &overlays)
                .map_err(io_err("finishing a fold into the images of", &path))?;
            let done = StateFile {
                meta: state.meta.clone(),
                journal_start: to,
                journal_end: state.journal_end,
                fold_to: None,
            };
            state::write_atomic(&dir, STATE_FILE, &done.encode())
                .map_err(io_err("writing", &state_path))?;
            journal
                .drop_before(to, true)
                .map_err(io_err("removing folded journal segments in", &path))?;
            start = to;
        }
        debug_assert_eq!(journal.start, start);

        let mut group = ReplicaGroup {
            dir,
            path,
            test_failover,
            _lock: lock,
            images,
            journal,
            journal_committed: state.journal_end,
            cur: state.meta.clone(),
            durable: state.meta,
            touched: BTreeSet::new(),
            dirty: false,
            poisoned: false,
            read_only,
            retention: Retention::default(),
            segment_size: DEFAULT_SEGMENT_SIZE,
            last_fold: None,
            index_interval: DEFAULT_INDEX_INTERVAL,
            index_bytes: 0,
            floor: None,
            floor_holds_space: false,
        };
        group.floor = crate::pin::read_seq(&group.dir, FLOOR_FILE);
        // Disks gone from the state whose images a crash (or a failed
        // removal) left behind.
        if !read_only {
            group.remove_images()?;
        }
        // What this open had to read, the next one need not.
        if !read_only && history {
            group.index_if_due(true)?;
        }
        Ok(group)
    }

    /// Sets the retention of recovery points (applied at each commit).
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    /// Sets the history bytes after which the journal index is written
    /// again (tests use small ones).
    pub fn set_index_interval(&mut self, bytes: u64) {
        self.index_interval = bytes.max(1);
    }

    /// Writes the journal index if the history written since the last one
    /// has reached the interval (or, `at_open`, if opening read that much
    /// of it). The index only saves reading at the next open, but an I/O
    /// error writing it poisons the group as any other does: the
    /// directory's storage is failing, and nothing is retried on it.
    fn index_if_due(&mut self, at_open: bool) -> Result<(), StoreError> {
        let since = self.journal.indexed_to.max(self.journal.start);
        let due = self.index_interval.max(self.index_bytes.saturating_mul(4));
        let pending = self.journal.bytes_since(since);
        if pending < if at_open { self.index_interval } else { due } {
            return Ok(());
        }
        let written = self
            .journal
            .write_index()
            .map_err(io_err("writing the journal index in", &self.path));
        self.index_bytes = self.poison_on(written)?;
        Ok(())
    }

    /// Sets the size at which the journal begins a new segment (tests use
    /// small ones; folds free whole segments).
    pub fn set_segment_size(&mut self, bytes: u64) {
        self.segment_size = bytes.clamp(1, 1 << 39);
    }

    /// Makes sure the group has these disks: creates a sparse image for each
    /// new one (durably, at once), grows the image of a disk that is larger
    /// than before and checks that a known disk did not shrink, kept its
    /// name and did not leave. Disks not listed are kept (the receiver's
    /// session makes them leave first: [`leave`](Self::leave)). A new disk of a consistent group
    /// is synced on its own (initial-sync chunks and its records go to its
    /// image in place) while the others replicate and their points go on;
    /// it joins the points from the first one after its sync ended (the
    /// points before do not list it). A resyncing group refuses new disks.
    ///
    /// A growth takes effect after the last record applied: everything
    /// applied so far is committed first, and the recovery points up to
    /// here keep reading the disk at its old size (the state file's disk
    /// changes). A consistent group then resyncs the grown part (a
    /// checksum resync: the source may hold anything there); its next
    /// point is the first barrier after that resync.
    pub fn ensure_disks(&mut self, disks: &[Disk]) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let mut seen = BTreeSet::new();
        let mut new = Vec::new();
        let mut grown = Vec::new();
        for spec in disks {
            let bad = |reason: String| StoreError::BadDisk {
                disk: spec.id,
                reason,
            };
            if !seen.insert(spec.id) {
                return Err(bad("listed twice".into()));
            }
            match self.cur.disk(spec.id) {
                Some(d) if self.cur.left(d.id).is_some() => {
                    return Err(bad(format!(
                        "it left the group after record {}: a disk that left comes back only \
                         as a new disk, with a new id",
                        self.cur.left(d.id).unwrap_or_default()
                    )))
                }
                Some(d) if d.name != spec.name => {
                    return Err(bad(format!(
                        "name changed from {:?} to {:?}",
                        d.name, spec.name
                    )))
                }
                Some(d) if d.size > spec.size => {
                    return Err(bad(format!(
                        "it shrank from {} to {} bytes: a protected disk may only grow",
                        d.size, spec.size
                    )))
                }
                Some(d) if d.size < spec.size => grown.push(spec),
                Some(_) => {}
                None if self.cur.mode == Mode::Resyncing => {
                    return Err(StoreError::AddWhileResyncing(spec.id))
                }
                None => new.push(spec),
            }
        }
        if new.is_empty() && grown.is_empty() {
            return Ok(());
        }
        if self.dirty {
            self.commit()?;
        }
        if !grown.is_empty() {
            let grown: Vec<(DiskId, u64)> = grown.iter().map(|d| (d.id, d.size)).collect();
            self.grow(&grown)?;
            if new.is_empty() {
                return self.write_state(self.durable.clone(), None);
            }
        }
        for spec in &new {
            let name = image_name(spec.id);
            // An image left by a crash before its disk was recorded holds
            // nothing committed: start it afresh.
            let file = self.dir.create(&name).and_then(|f| {
                f.set_len(spec.size)?;
                f.sync_data()?;
                Ok(f)
            });
            let path = self.path.join(&name);
            let file = self.poison_on(file.map_err(io_err("creating the image", &path)))?;
            self.images.insert(spec.id, file);
        }
        let synced = self.dir.sync_dir();
        self.poison_on(synced.map_err(io_err("syncing", &self.path)))?;
        for meta in [&mut self.cur, &mut self.durable] {
            for spec in &new {
                meta.disks.push(DiskState {
                    id: spec.id,
                    name: spec.name.clone(),
                    size: spec.size,
                    synced: 0,
                    pending: Default::default(),
                });
                // A consistent group stays so: the new disk is synced in
                // place while the others replicate, and joins the points
                // when its sync ends (at once if it is empty).
                if spec.size == 0 && meta.mode != Mode::InitialSync {
                    meta.changes.push(DiskChange {
                        disk: spec.id,
                        after: meta.seq,
                        kind: ChangeKind::Joined,
                    });
                }
            }
            meta.disks.sort_by_key(|d| d.id);
            settle_initial_sync(meta);
        }
        self.write_state(self.durable.clone(), None)
    }

    /// Grows the images of `grown` (durably: a state file that names the
    /// new size never meets a shorter image) and notes each growth after
    /// the last record applied (committed: the caller commits first), for
    /// the points before it. The caller writes the state file.
    fn grow(&mut self, grown: &[(DiskId, u64)]) -> Result<(), StoreError> {
        for &(id, size) in grown {
            let path = self.path.join(image_name(id));
            let Some(image) = self.images.get(&id) else {
                return Err(StoreError::UnknownDisk(id));
            };
            let done = image.set_len(size).and_then(|()| image.sync_data());
            self.poison_on(done.map_err(io_err("growing the image", &path)))?;
        }
        for meta in [&mut self.cur, &mut self.durable] {
            for &(id, size) in grown {
                let after = meta.seq;
                // A joining disk is in no point yet and is still copied by
                // its own initial sync, which goes on to the new end (the
                // shipper's too): it grows as in the group's initial sync.
                let joining = meta.disk(id).is_some_and(|d| meta.joining(d));
                let record_change = meta.mode != Mode::InitialSync && !joining;
                let Some(d) = meta.disk_mut(id) else {
                    continue;
                };
                let from = d.size;
                d.size = size;
                // An initial sync has no points yet, and copies the grown
                // part like the rest (it is beyond `synced`). Otherwise the
                // grown part waits for a checksum resync: the source may
                // hold anything there (an extended volume's old blocks),
                // and where it reads as zeroes, as the image does, the
                // resync compares digests and sends nothing.
                if record_change {
                    d.synced = size;
                    d.pending.add(from, size);
                    meta.mode = Mode::Resyncing;
                    meta.changes.push(DiskChange {
                        disk: id,
                        after,
                        kind: ChangeKind::Grew { from },
                    });
                }
            }
            meta.changes.sort_by_key(|c| (c.after, c.disk));
        }
        Ok(())
    }

    /// The grow record `seq` of `generation`: the disk is `size` bytes
    /// from it on. Everything applied before it is committed, then the
    /// disk grows as [`ensure_disks`](Self::ensure_disks) grows it, after
    /// the record before this one (the points up to there keep the old
    /// size, the grown part waits for a resync), and the record is
    /// committed with the growth: one state file names both, so a crash
    /// leaves the group before the record or past it. A disk already that
    /// large (the shipper's hello announced the size) is left as it is; a
    /// smaller size is refused as a shrink.
    fn grow_at_record(
        &mut self,
        disk: DiskId,
        size: u64,
        seq: Seq,
        generation: u32,
    ) -> Result<(), StoreError> {
        let Some(d) = self.cur.disk(disk) else {
            return Err(StoreError::UnknownDisk(disk));
        };
        if let Some(after) = self.cur.left(disk) {
            return Err(StoreError::DiskLeft { disk, after });
        }
        if d.size > size {
            return Err(StoreError::BadDisk {
                disk,
                reason: format!(
                    "a grow record makes it {size} bytes, it is {} bytes: a protected disk may only grow",
                    d.size
                ),
            });
        }
        if d.size < size {
            if self.dirty {
                self.commit()?;
            }
            self.grow(&[(disk, size)])?;
        }
        self.cur.seq = seq;
        self.cur.generation = generation;
        self.dirty = true;
        self.commit().map(|_| ())
    }

    /// Makes a new, empty group hold these disks from existing images
    /// (copied, sparse) and waits for a checksum resync of every byte of
    /// them: the first step of a failback, where the original primary's
    /// disks are compared with the failed-over ones and only blocks that
    /// differ travel. `disks` pairs each disk with its image, whose size
    /// must be the disk's.
    pub fn adopt(&mut self, disks: &[(Disk, PathBuf)]) -> Result<(), StoreError> {
        self.check_poisoned()?;
        if !self.durable.disks.is_empty() || self.durable.seq != Seq(0) || self.dirty {
            return Err(StoreError::BadDisk {
                disk: disks.first().map_or(DiskId(0), |(d, _)| d.id),
                reason: "only a new, empty replica group can adopt images".into(),
            });
        }
        let specs: Vec<Disk> = disks.iter().map(|(d, _)| d.clone()).collect();
        self.ensure_disks(&specs)?;
        for (spec, source) in disks {
            let len = std::fs::metadata(source)
                .map_err(io_err("reading the size of", source))?
                .len();
            if len != spec.size {
                return Err(StoreError::BadDisk {
                    disk: spec.id,
                    reason: format!(
                        "{} is {len} bytes, the disk {} bytes",
                        source.display(),
                        spec.size
                    ),
                });
            }
            let copied = copy_sparse(source, &self.images[&spec.id]);
            self.poison_on(copied.map_err(io_err("copying", source)))?;
        }
        let mut meta = self.durable.clone();
        for d in &mut meta.disks {
            d.synced = d.size;
            d.pending = Default::default();
            if d.size > 0 {
                d.pending.add(0, d.size);
            }
        }
        meta.mode = if meta.disks.iter().any(|d| !d.pending.is_empty()) {
            Mode::Resyncing
        } else {
            Mode::Consistent
        };
        self.write_state(meta.clone(), None)?;
        self.cur = meta.clone();
        self.durable = meta;
        Ok(())
    }

    /// The position as of the last commit.
    pub fn position(&self) -> Position {
        position_of(&self.durable)
    }

    /// Applies the next record of the log (durable at the next commit).
    pub fn apply_record(&mut self, rec: &Record) -> Result<Applied, StoreError> {
        self.apply(rec.as_view(), true)
    }

    /// [`apply_record`](Self::apply_record) for a record whose checksum
    /// its receiver verified against the bytes that came (a
    /// `tidemark_wire::RecordBatch` verifies every record it holds): the
    /// payload is not read again for it: neither to check it nor to
    /// checksum its journal entry, whose checksum is derived from the
    /// record's. Its fields are checked all the same.
    pub fn apply_verified_record(&mut self, rec: RecordRef<'_>) -> Result<Applied, StoreError> {
        self.apply(rec, false)
    }

    fn apply(&mut self, rec: RecordRef<'_>, verify_crc: bool) -> Result<Applied, StoreError> {
        self.check_poisoned()?;
        let h = &rec.header;
        let (seq, disk_id) = (h.seq, h.disk);
        if seq <= self.cur.seq {
            // A newer generation never reuses a sequence number: the
            // records it would replace are not the source's any more, and
            // skipping it as a duplicate would keep them silently.
            if h.generation > self.cur.generation {
                return Err(StoreError::SequenceGap {
                    expected: self.cur.seq.next(),
                    generation: self.cur.generation,
                    got: seq,
                    got_generation: h.generation,
                });
            }
            return Ok(Applied::Duplicate);
        }
        let next_in_generation = h.generation == self.cur.generation && seq == self.cur.seq.next();
        if !next_in_generation && h.generation <= self.cur.generation {
            return Err(StoreError::SequenceGap {
                expected: self.cur.seq.next(),
                generation: self.cur.generation,
                got: seq,
                got_generation: h.generation,
            });
        }
        rec.as_entry()
            .validate()
            .map_err(|source| StoreError::InvalidRecord { seq, source })?;
        if verify_crc && rec.computed_crc() != h.crc {
            return Err(StoreError::ChecksumMismatch { seq });
        }
        if h.kind == Kind::Grow {
            self.grow_at_record(
                disk_id,
                h.offset.saturating_add(h.length),
                seq,
                h.generation,
            )?;
            return Ok(Applied::Done);
        }
        if !matches!(h.kind, Kind::Barrier | Kind::Marker) {
            self.check_extent(disk_id, h.offset, h.length)?;
        }
        let no_hole = h.flags & FLAG_NO_HOLE != 0;
        let mut summary = ReplaySummary::default();
        let path = self.path.clone();
        match h.kind {
            Kind::Barrier | Kind::Marker => {
                if h.kind == Kind::Barrier {
                    self.cur.last_barrier = Some((seq, h.timestamp_ns));
                }
                // Only a consistent group's barriers are recovery points:
                // during an initial sync or a resync no consistent state
                // exists past the last point.
                if self.cur.mode == Mode::Consistent {
                    let app = h.flags & FLAG_APP_CONSISTENT != 0;
                    let label = rec.label().unwrap_or_default();
                    let written = self.journal.point(seq, h.timestamp_ns, app, label);
                    self.poison_on(written.map_err(io_err("journaling a point in", &path)))?;
                }
            }
            // Applied above, on its own.
            Kind::Grow => {}
            Kind::ResyncNeeded => {
                let mode = self.cur.mode;
                let joining = self.cur.disk(disk_id).is_some_and(|d| self.cur.joining(d));
                let Some(disk) = self.cur.disk_mut(disk_id) else {
                    return Err(StoreError::UnknownDisk(disk_id));
                };
                match mode {
                    _ if joining => disk.synced = disk.synced.min(h.offset),
                    Mode::InitialSync => disk.synced = disk.synced.min(h.offset),
                    Mode::Consistent | Mode::Resyncing => {
                        disk.pending.add(h.offset, h.offset + h.length);
                        self.cur.mode = Mode::Resyncing;
                    }
                }
            }
            Kind::Write | Kind::WriteZeroes | Kind::Trim => {
                let in_place = self.cur.mode == Mode::InitialSync
                    || self.cur.disk(disk_id).is_some_and(|d| self.cur.joining(d));
                let result = if in_place {
                    let Some(file) = self.images.get(&disk_id) else {
                        return Err(StoreError::UnknownDisk(disk_id));
                    };
                    self.touched.insert(disk_id);
                    let mut target = image::InPlace { file, no_hole };
                    replay::apply(rec, h.disk, &mut target, &mut summary)
                } else {
                    // The record's checksum held (checked above or by its
                    // receiver): its payload's is derived from it, and the
                    // journal entry's from that, without reading the
                    // payload again.
                    let mut target = Journaled {
                        journal: &mut self.journal,
                        disk: disk_id,
                        no_hole,
                        payload_crc: Some(h.verified_payload_crc()),
                    };
                    replay::apply(rec, h.disk, &mut target, &mut summary)
                };
                self.poison_on(result.map_err(io_err("applying a record in", &path)))?;
            }
        }
        self.cur.seq = seq;
        self.cur.generation = h.generation;
        self.dirty = true;
        Ok(Applied::Done)
    }

    /// Applies a sync chunk at `offset` of `disk`. An initial-sync chunk is
    /// written in place and, when it continues the copied prefix, advances
    /// the disk's `synced` offset; a resync chunk goes to the journal.
    pub fn apply_chunk(
        &mut self,
        disk: DiskId,
        offset: u64,
        data: ChunkRef<'_>,
        purpose: Purpose,
    ) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let len = data.len();
        self.check_extent(disk, offset, len)?;
        let path = self.path.clone();
        match purpose {
            Purpose::InitialSync => {
                let joining = self.cur.disk(disk).is_some_and(|d| self.cur.joining(d));
                if self.cur.mode != Mode::InitialSync && !joining {
                    return Err(StoreError::UnexpectedChunk {
                        what: "initial-sync",
                        reason: "the group is not in initial sync",
                    });
                }
                let Some(file) = self.images.get(&disk) else {
                    return Err(StoreError::UnknownDisk(disk));
                };
                self.touched.insert(disk);
                let result = match data {
                    // The chunk's writeback starts now, while the next
                    // chunks arrive: the commit's fdatasync then waits
                    // for little more than the last of them.
                    ChunkRef::Data(d) => file
                        .write_all_at(&[d], offset)
                        .and_then(|()| file.start_writeback(offset, len)),
                    ChunkRef::Zero(n) => image::zero_range(file, offset, n, false),
                };
                self.poison_on(result.map_err(io_err("applying a chunk in", &path)))?;
                if let Some(d) = self.cur.disk_mut(disk) {
                    if offset <= d.synced && offset + len > d.synced {
                        d.synced = offset + len;
                    }
                }
                if joining && self.cur.disk(disk).is_some_and(|d| d.synced == d.size) {
                    // Its image now holds the source as of the last record
                    // applied: from here on its changes are journaled and
                    // the points after this one hold it.
                    let after = self.cur.seq;
                    self.cur.changes.push(DiskChange {
                        disk,
                        after,
                        kind: ChangeKind::Joined,
                    });
                    self.cur.changes.sort_by_key(|c| (c.after, c.disk));
                }
                settle_initial_sync(&mut self.cur);
                if self.cur.mode == Mode::Consistent {
                    self.point_at_last_barrier()?;
                }
            }
            Purpose::Resync => {
                if self.cur.mode != Mode::Resyncing {
                    return Err(StoreError::UnexpectedChunk {
                        what: "resync",
                        reason: "the group is not resyncing",
                    });
                }
                let result = match data {
                    ChunkRef::Data(d) => self.journal.write(disk, offset, d),
                    ChunkRef::Zero(n) => self.journal.zero(disk, offset, n, false),
                };
                self.poison_on(result.map_err(io_err("journaling a chunk in", &path)))?;
            }
        }
        self.dirty = true;
        Ok(())
    }

    /// BLAKE3 of each `block_size` block of `offset..offset+length` of
    /// `disk` (the last block may be short), as the disk reads now:
    /// uncommitted and journaled changes included.
    pub fn digests(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
        block_size: u32,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        self.check_poisoned()?;
        if block_size == 0 {
            return Err(StoreError::InvalidBlockSize);
        }
        self.check_extent(disk, offset, length)?;
        let end = offset + length;
        // The caller bounds the range; don't trust it with the allocation.
        let blocks = length.div_ceil(u64::from(block_size));
        let mut out = Vec::with_capacity(blocks.min(1 << 16) as usize);
        let mut buf = vec![0u8; (block_size as usize).min(IO_BUF)];
        let mut block = offset;
        while block < end {
            let block_end = end.min(block + u64::from(block_size));
            let mut hasher = blake3::Hasher::new();
            let mut at = block;
            while at < block_end {
                let n = (block_end - at).min(buf.len() as u64) as usize;
                self.read_with(&self.journal.overlays, disk, at, &mut buf[..n])
                    .map_err(io_err("reading", &self.path))?;
                hasher.update(&buf[..n]);
                at += n as u64;
            }
            out.push(*hasher.finalize().as_bytes());
            block = block_end;
        }
        Ok(out)
    }

    /// Marks `offset..offset+length` of `disk` as resynced: it no longer
    /// waits (durable at the next commit). Extents not pending are ignored.
    pub fn resync_done(
        &mut self,
        disk: DiskId,
        offset: u64,
        length: u64,
    ) -> Result<(), StoreError> {
        self.check_poisoned()?;
        self.check_extent(disk, offset, length)?;
        if let Some(d) = self.cur.disk_mut(disk) {
            d.pending.remove(offset, offset + length);
        }
        self.dirty = true;
        Ok(())
    }

    /// Makes everything applied so far durable and returns the new
    /// position. A resync with no pending extent left makes the group
    /// consistent again. Then points that retention no longer keeps are
    /// folded into the images (at most every `fold_interval`).
    pub fn commit(&mut self) -> Result<Position, StoreError> {
        self.check_poisoned()?;
        if !self.dirty {
            return Ok(self.position());
        }
        for id in std::mem::take(&mut self.touched) {
            if let Some(file) = self.images.get(&id) {
                let path = self.path.join(image_name(id));
                let synced = file.sync_data().map_err(io_err("syncing", &path));
                self.poison_on(synced)?;
            }
        }
        if self.cur.mode == Mode::Resyncing && self.cur.disks.iter().all(|d| d.pending.is_empty()) {
            self.cur.mode = Mode::Consistent;
            self.point_at_last_barrier()?;
        }
        let meta = self.cur.clone();
        if meta.mode != Mode::InitialSync {
            let marked = self
                .journal
                .commit(meta.seq, meta.generation, self.segment_size)
                .map_err(io_err("committing the journal in", &self.path));
            self.poison_on(marked)?;
        }
        self.journal_committed = self.journal.end;
        self.write_state(meta.clone(), None)?;
        self.cur = meta.clone();
        self.durable = meta;
        self.dirty = false;
        if self.cur.mode != Mode::InitialSync {
            self.index_if_due(false)?;
        }
        self.apply_retention(tidemark_changelog::now_ns(), false)?;
        Ok(self.position())
    }

    /// The group just became consistent (its initial sync or resync
    /// ended). If the last record applied is a barrier, the images now
    /// hold the source's state at it — a drained host's final barrier,
    /// typically: it becomes a recovery point, as it would have had the
    /// group been consistent when it arrived.
    fn point_at_last_barrier(&mut self) -> Result<(), StoreError> {
        let Some((seq, ts)) = self.cur.last_barrier else {
            return Ok(());
        };
        if seq != self.cur.seq || self.journal.points.last().is_some_and(|p| p.seq >= seq) {
            return Ok(());
        }
        let path = self.path.clone();
        let written = self.journal.point(seq, ts, false, "");
        self.poison_on(written.map_err(io_err("journaling a point in", &path)))
    }

    /// Folds the points that `retention` no longer keeps (by age against
    /// `now_ns`, by count, by space) into the images. Runs at most every
    /// `fold_interval` unless `force` or space is short. The newest point
    /// is always kept.
    pub fn apply_retention(
        &mut self,
        now_ns: u64,
        force: bool,
    ) -> Result<Option<FoldReport>, StoreError> {
        self.check_poisoned()?;
        if self.dirty {
            return Ok(None);
        }
        let r = self.retention;
        let points = &self.journal.points;
        if points.len() < 2 {
            return Ok(None);
        }
        let newest = points.len() - 1;
        let horizon = now_ns.saturating_sub(r.window.as_nanos().min(u128::from(u64::MAX)) as u64);
        // `drop` points (the oldest ones) are folded.
        let mut drop = points[..newest]
            .iter()
            .take_while(|p| p.timestamp_ns < horizon)
            .count();
        let max_points = r.max_points.max(1) as usize;
        if points.len() - drop > max_points {
            drop = points.len() - max_points;
        }
        let mut space_short = false;
        if let Some(max) = r.max_space {
            let total = self.journal.bytes();
            if total > max {
                space_short = true;
                // Down to a margin below the limit: see `space_margin`.
                let need = total - max + space_margin(max);
                while drop < newest
                    && self.history_bytes_between(self.journal.start, points[drop].pos) < need
                {
                    drop += 1;
                }
                if drop < newest {
                    drop += 1;
                }
            }
        }
        // A test failover reads its point while replication goes on: never
        // fold it (or anything after it).
        if let Some(pin) = self.pinned() {
            let pinned = points.iter().take_while(|p| p.seq < pin).count();
            drop = drop.min(pinned);
        }
        // A span point needs this member's marker: the floor wins over
        // every rule, max-space included (see the module's doc).
        let mut held = false;
        if let Some(floor) = self.floor {
            let below = points.iter().take_while(|p| p.seq < floor).count();
            held = space_short && drop > below;
            drop = drop.min(below);
        }
        if held != self.floor_holds_space {
            if held {
                tracing::warn!(
                    group = %self.path.display(),
                    floor = %self.floor.unwrap_or(Seq(0)),
                    history_bytes = self.journal.bytes(),
                    max_space = r.max_space.unwrap_or(0),
                    "the history is over max-space, but a span still needs the points from its floor on: they are kept (give more space or a shorter retention window)"
                );
            }
            self.floor_holds_space = held;
        }
        if drop == 0 {
            return Ok(None);
        }
        let due = self
            .last_fold
            .is_none_or(|t| t.elapsed() >= r.fold_interval);
        if !(force || due || space_short) {
            return Ok(None);
        }
        let to = points[drop - 1].pos;
        let before = self.journal.bytes();
        self.fold(to)?;
        self.last_fold = Some(std::time::Instant::now());
        Ok(Some(FoldReport {
            points: drop,
            freed_bytes: before.saturating_sub(self.journal.bytes()),
        }))
    }

    /// Journal bytes from position `a` to position `b` (approximately, for
    /// space retention: whole segments between them count fully).
    fn history_bytes_between(&self, a: u64, b: u64) -> u64 {
        use journal::{offset_of, segment_of};
        if segment_of(a) == segment_of(b) {
            return offset_of(b).saturating_sub(offset_of(a));
        }
        let full = u64::from(segment_of(b) - segment_of(a) - 1) * self.segment_size;
        self.segment_size.saturating_sub(offset_of(a)) + full + offset_of(b)
    }

    /// Folds the history before `to` into the images: durably notes the
    /// fold first (its points are gone from then on), applies it, then
    /// moves the history's start and frees whole segments. A crash in
    /// between is finished on open.
    fn fold(&mut self, to: u64) -> Result<(), StoreError> {
        let meta = self.durable.clone();
        self.write_state(meta.clone(), Some(to))?;
        let overlays = self.journal.overlays_before(to);
        let applied = apply_overlays(&self.images, &self.journal, &overlays)
            .map_err(io_err("folding the history into the images of", &self.path));
        self.poison_on(applied)?;
        self.journal.start = to;
        // A disk change matters while a point before it is kept.
        let oldest = self
            .journal
            .points
            .iter()
            .find(|p| p.pos > to)
            .map(|p| p.seq);
        let kept = |c: &DiskChange| oldest.is_some_and(|o| c.after >= o);
        // A disk that left goes once no kept point holds it and the
        // history kept names it no more (its last records may lie after
        // the last point that holds it): the state first, then its image.
        let named = self.journal.disks_after(to);
        let gone: Vec<DiskId> = meta
            .changes
            .iter()
            .filter(|c| c.kind == ChangeKind::Left && !kept(c) && !named.contains(&c.disk))
            .map(|c| c.disk)
            .collect();
        let mut meta = meta;
        for m in [&mut meta, &mut self.cur, &mut self.durable] {
            m.changes
                .retain(|c| kept(c) || (c.kind == ChangeKind::Left && !gone.contains(&c.disk)));
            m.disks.retain(|d| !gone.contains(&d.id));
            m.removed.extend(&gone);
            m.removed.sort();
            m.removed.dedup();
        }
        self.write_state(meta, None)?;
        let dropped = self
            .journal
            .drop_before(to, true)
            .map_err(io_err("removing folded journal segments in", &self.path));
        self.poison_on(dropped)?;
        self.remove_images()
    }

    /// Removes the images of the disks gone from the state (`removed`),
    /// then notes durably that they are gone. An image that cannot be
    /// removed now (a reader has it open on Ceph) stays listed and is
    /// removed at the next open of the writer.
    fn remove_images(&mut self) -> Result<(), StoreError> {
        let ids = self.durable.removed.clone();
        if ids.is_empty() {
            return Ok(());
        }
        let mut left_over = Vec::new();
        for id in ids {
            self.images.remove(&id);
            let name = image_name(id);
            match self.dir.remove(&name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(
                        group = %self.path.display(),
                        disk = %id,
                        error = %e,
                        "the image of a disk that left the group could not be removed: the next start removes it"
                    );
                    left_over.push(id);
                }
            }
        }
        let synced = self.dir.sync_dir();
        self.poison_on(synced.map_err(io_err("syncing", &self.path)))?;
        if left_over == self.durable.removed {
            return Ok(());
        }
        for m in [&mut self.cur, &mut self.durable] {
            m.removed.clone_from(&left_over);
        }
        self.write_state(self.durable.clone(), None)
    }

    /// Disks `gone` leave the group: their shipper no longer announces
    /// them (see "Disks that leave" in the module's doc). Everything
    /// applied is committed first; a disk in a recovery point stays in the
    /// points up to the last record applied and is in none after, its
    /// pending extents cleared; a disk in no point (the group's initial
    /// sync, or its own join not finished) goes at once, with its image.
    /// Disks unknown or already gone are ignored.
    pub fn leave(&mut self, gone: &[DiskId]) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let gone: Vec<DiskId> = gone
            .iter()
            .copied()
            .filter(|&id| self.cur.disk(id).is_some() && self.cur.left(id).is_none())
            .collect();
        if gone.is_empty() {
            return Ok(());
        }
        if self.dirty {
            self.commit()?;
        }
        let mut meta = self.cur.clone();
        for &id in &gone {
            let after = meta.seq;
            let in_points =
                meta.mode != Mode::InitialSync && meta.disk(id).is_some_and(|d| !meta.joining(d));
            tracing::warn!(
                group = %self.path.display(),
                disk = %id,
                after = %after,
                in_points,
                "a disk left the group (its shipper no longer announces it): the points up to here keep it until retention drops them, then its image is removed"
            );
            if in_points {
                if let Some(d) = meta.disk_mut(id) {
                    d.pending = Default::default();
                }
                meta.changes.push(DiskChange {
                    disk: id,
                    after,
                    kind: ChangeKind::Left,
                });
            } else {
                meta.disks.retain(|d| d.id != id);
                meta.changes.retain(|c| c.disk != id);
                meta.removed.push(id);
            }
        }
        meta.changes.sort_by_key(|c| (c.after, c.disk));
        meta.removed.sort();
        meta.removed.dedup();
        let was_initial_sync = meta.mode == Mode::InitialSync;
        settle_initial_sync(&mut meta);
        self.cur = meta;
        if was_initial_sync && self.cur.mode == Mode::Consistent {
            self.point_at_last_barrier()?;
        }
        // The commit makes a resync that only the disk's extents kept
        // open consistent, and writes the state before any image goes.
        self.dirty = true;
        self.commit()?;
        self.remove_images()
    }

    /// The recovery points, oldest first (committed ones only).
    pub fn points(&self) -> Vec<RecoveryPoint> {
        self.journal
            .points
            .iter()
            .filter(|p| p.pos <= self.journal_committed)
            .map(|p| RecoveryPoint {
                seq: p.seq,
                timestamp_ns: p.timestamp_ns,
                app_consistent: p.app_consistent,
                label: p.label.clone(),
            })
            .collect()
    }

    /// The committed recovery point at `seq`, if there is one (points are
    /// in sequence order: a binary search).
    pub fn point_at(&self, seq: Seq) -> Option<RecoveryPoint> {
        let points = &self.journal.points;
        let i = points.partition_point(|p| p.seq < seq);
        let p = points
            .get(i)
            .filter(|p| p.seq == seq && p.pos <= self.journal_committed)?;
        Some(RecoveryPoint {
            seq: p.seq,
            timestamp_ns: p.timestamp_ns,
            app_consistent: p.app_consistent,
            label: p.label.clone(),
        })
    }

    /// Sets the span floor (see the module's doc): no point at or after
    /// `floor` is folded from now on, nor after a restart (it is written
    /// durably before this returns); `None` removes it.
    pub fn set_floor(&mut self, floor: Option<Seq>) -> Result<(), StoreError> {
        self.check_poisoned()?;
        if self.read_only {
            return Err(StoreError::Poisoned);
        }
        if floor == self.floor {
            return Ok(());
        }
        let path = self.path.join(FLOOR_FILE);
        match floor {
            Some(seq) => replace(
                &self.dir,
                FLOOR_TMP,
                FLOOR_FILE,
                seq.to_string().as_bytes(),
                Durability::Durable,
            )
            .map_err(|e| io_err("writing", &path)(e.into()))?,
            None => {
                match self.dir.remove(FLOOR_FILE) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("removing", &path)(e)),
                }
                // A floor that comes back after a crash only keeps more:
                // the removal need not be waited for, but is made durable
                // with the directory anyway.
                self.dir.sync_dir().map_err(io_err("syncing", &self.path))?;
            }
        }
        self.floor = floor;
        Ok(())
    }

    /// The span floor (see [`ReplicaGroup::set_floor`]).
    pub fn floor(&self) -> Option<Seq> {
        self.floor
    }

    /// Whether the last retention run wanted to fold for `max-space` and
    /// the span floor kept it from doing so: the history stays over the
    /// limit.
    pub fn floor_holds_space(&self) -> bool {
        self.floor_holds_space
    }

    /// The point a running test failover (or a planned failover writing
    /// its images) has pinned: see [`crate::pin`].
    pub fn pinned(&self) -> Option<Seq> {
        crate::pin::read(&self.test_failover)
    }

    /// Bytes the history behind the recovery points takes.
    pub fn history_bytes(&self) -> u64 {
        self.journal.bytes()
    }

    /// The disks as of the recovery point `seq`, or (`None`) as of
    /// everything applied so far.
    pub fn view(&self, seq: Option<Seq>) -> Result<View<'_, D>, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let overlays = match seq {
            None => self.journal.overlays.clone(),
            Some(seq) => {
                let p = self
                    .journal
                    .points
                    .iter()
                    .find(|p| p.seq == seq && p.pos <= self.journal_committed)
                    .ok_or(StoreError::NoSuchPoint(seq))?;
                self.journal.overlays_before(p.pos)
            }
        };
        Ok(View {
            group: self,
            overlays,
            at: seq,
        })
    }

    /// The group's disks as the recovery point `seq` reads them, by id:
    /// a disk that grew after it at its size before, without a disk that
    /// joined after it (see the state file's disk changes).
    pub fn disks_at(&self, seq: Seq) -> Vec<Disk> {
        self.durable
            .disks
            .iter()
            .filter_map(|d| {
                Some(Disk {
                    id: d.id,
                    name: d.name.clone(),
                    size: self.durable.size_at(d, seq)?,
                })
            })
            .collect()
    }

    /// The group's disks as last committed, by id (without those that
    /// left: older points may still hold them, see
    /// [`disks_at`](Self::disks_at)).
    pub fn disks(&self) -> Vec<Disk> {
        self.durable
            .present()
            .map(|d| Disk {
                id: d.id,
                name: d.name.clone(),
                size: d.size,
            })
            .collect()
    }

    /// Every disk whose image the store may still hold, as last
    /// committed: the disks now, those that left and older points still
    /// hold, and those whose image is still to be removed (see
    /// [`leave`](Self::leave)). Removing the whole group removes these.
    pub fn disk_images(&self) -> Vec<DiskId> {
        let mut ids: Vec<DiskId> = self
            .durable
            .disks
            .iter()
            .map(|d| d.id)
            .chain(self.durable.removed.iter().copied())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The last barrier as of the last commit: (seq, timestamp in ns).
    pub fn last_barrier(&self) -> Option<(Seq, u64)> {
        self.durable.last_barrier
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned || self.read_only {
            Err(StoreError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn poison_on<T>(&mut self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn check_extent(&self, disk: DiskId, offset: u64, length: u64) -> Result<(), StoreError> {
        self.check_extent_at(None, disk, offset, length)
    }

    /// Checks an extent against the disk's size as of the recovery point
    /// `at` (`None`: now).
    fn check_extent_at(
        &self,
        at: Option<Seq>,
        disk: DiskId,
        offset: u64,
        length: u64,
    ) -> Result<(), StoreError> {
        let d = self.cur.disk(disk).ok_or(StoreError::UnknownDisk(disk))?;
        let size = match at {
            None => match self.cur.left(disk) {
                Some(after) => return Err(StoreError::DiskLeft { disk, after }),
                None => d.size,
            },
            Some(seq) => self
                .cur
                .size_at(d, seq)
                .ok_or(StoreError::UnknownDisk(disk))?,
        };
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                disk,
                offset,
                length,
                size,
            }),
        }
    }

    fn write_state(&mut self, meta: Meta, fold_to: Option<u64>) -> Result<(), StoreError> {
        let file = StateFile {
            meta,
            journal_start: self.journal.start,
            journal_end: self.journal_committed,
            fold_to,
        };
        let written = state::write_atomic(&self.dir, STATE_FILE, &file.encode())
            .map_err(io_err("writing the state file in", &self.path));
        self.poison_on(written)
    }

    /// Reads `buf.len()` bytes at `at` of `disk` through `overlays` (the
    /// journal's pieces over the image).
    fn read_with(
        &self,
        overlays: &BTreeMap<DiskId, Overlay>,
        disk: DiskId,
        at: u64,
        buf: &mut [u8],
    ) -> io::Result<()> {
        let image = self.images.get(&disk).ok_or(io::ErrorKind::NotFound)?;
        let end = at + buf.len() as u64;
        let pieces = overlays
            .get(&disk)
            .map(|o| o.pieces_in(at, end))
            .unwrap_or_default();
        let mut pos = at;
        let slice = |s: u64, e: u64| (s - at) as usize..(e - at) as usize;
        for p in pieces.iter().chain(std::iter::once(&overlay::Piece {
            start: end,
            end,
            source: Source::Zero { no_hole: false },
        })) {
            if p.start > pos {
                let r = slice(pos, p.start);
                // A hole reads as zeroes: filling them here spares the
                // kernel allocating and zeroing page-cache pages for it.
                if p.start - pos >= HOLE_CHECK_MIN && image.is_hole(pos, p.start - pos) {
                    buf[r].fill(0);
                } else {
                    journal::read_exact_at(image, &mut buf[r], pos)?;
                }
            }
            let r = slice(p.start, p.end);
            match p.source {
                Source::Zero { .. } => buf[r].fill(0),
                Source::Journal(from) => self.journal.read_at(&mut buf[r], from)?,
            }
            pos = p.end;
        }
        Ok(())
    }
}

impl<D: LogDir> View<'_, D> {
    /// Reads `buf.len()` bytes at `offset` of `disk` as of this view.
    pub fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.by_ref().read(disk, offset, buf)
    }

    /// Whether `offset..offset+len` of `disk` surely reads as zeroes
    /// without reading it: a hole of the image that no journal data
    /// covers, or journaled zeroes. `false` means "unknown" (read it).
    pub fn is_zero(&self, disk: DiskId, offset: u64, len: u64) -> bool {
        self.by_ref().is_zero(disk, offset, len)
    }

    /// The ranges of `disk` (start, end) where this view reads otherwise
    /// than the disk's image (the journal's pieces before its point), in
    /// order: what a copy of the image needs to become the point.
    pub fn changed(&self, disk: DiskId) -> Vec<(u64, u64)> {
        self.overlays
            .get(&disk)
            .map(|o| o.all().map(|p| (p.start, p.end)).collect())
            .unwrap_or_default()
    }

    /// The group's disks as this view reads them (a point before a
    /// growth at the disk's size then).
    pub fn disks(&self) -> Vec<Disk> {
        match self.at {
            Some(seq) => self.group.disks_at(seq),
            None => self.group.disks(),
        }
    }

    fn by_ref(&self) -> ViewRef<'_, D> {
        ViewRef {
            group: self.group,
            overlays: &self.overlays,
            at: self.at,
        }
    }
}

impl<D: LogDir> ViewRef<'_, D> {
    fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.group
            .check_extent_at(self.at, disk, offset, buf.len() as u64)?;
        self.group
            .read_with(self.overlays, disk, offset, buf)
            .map_err(io_err("reading", &self.group.path))
    }

    fn is_zero(&self, disk: DiskId, offset: u64, len: u64) -> bool {
        let Some(image) = self.group.images.get(&disk) else {
            return false;
        };
        let end = offset + len;
        let pieces = self
            .overlays
            .get(&disk)
            .map(|o| o.pieces_in(offset, end))
            .unwrap_or_default();
        let mut pos = offset;
        for p in pieces {
            if p.start > pos && !image.is_hole(pos, p.start - pos) {
                return false;
            }
            if matches!(p.source, Source::Journal(_)) {
                return false;
            }
            pos = p.end;
        }
        pos >= end || image.is_hole(pos, end - pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pin::{PIN_FILE, TEST_FAILOVER_DIR};
    use tidemark_changelog::Entry;
    use tidemark_names::Name;

    fn rec(entry: &Entry<'_>, seq: impl Into<Seq>) -> Record {
        Record::decode(&entry.encode(seq, 0)).unwrap()
    }

    fn one_disk_group(dir: &Path) -> ReplicaGroup {
        let mut g = ReplicaGroup::open(dir).unwrap();
        g.ensure_disks(&[Disk {
            id: DiskId(0),
            name: Name::from_static("a"),
            size: 65536,
        }])
        .unwrap();
        g.apply_chunk(
            DiskId(0),
            0,
            ChunkRef::Data(&[3u8; 65536]),
            Purpose::InitialSync,
        )
        .unwrap();
        g.commit().unwrap();
        g
    }

    fn read_point(g: &ReplicaGroup, seq: Option<Seq>) -> Vec<u8> {
        let mut buf = vec![0u8; 65536];
        g.view(seq).unwrap().read(DiskId(0), 0, &mut buf).unwrap();
        buf
    }

    /// A group in `dir` with four points (each a write, a trim and a
    /// barrier) whose fold to the second point was cut short after
    /// `applied_pieces` of its pieces reached the image. Returns each
    /// point's (seq, content) and the newest content.
    fn half_folded_group(dir: &Path, applied_pieces: usize) -> (Vec<(u64, Vec<u8>)>, Vec<u8>) {
        let mut g = one_disk_group(dir);
        g.set_segment_size(200);
        // The points' timestamps are near 1970: keep them.
        g.set_retention(Retention {
            window: std::time::Duration::MAX,
            ..Retention::default()
        });
        let mut expected = vec![3u8; 65536];
        let mut seq = 0;
        let mut states = Vec::new();
        for round in 0..4u8 {
            let at = 1000 * usize::from(round);
            seq += 1;
            g.apply_record(&rec(
                &Entry::write(0, at as u64, &[round + 10; 3000], 0),
                seq,
            ))
            .unwrap();
            expected[at..at + 3000].fill(round + 10);
            seq += 1;
            g.apply_record(&rec(&Entry::trim(0, 40_000 + at as u64, 500, 0), seq))
                .unwrap();
            expected[40_000 + at..40_500 + at].fill(0);
            seq += 1;
            g.apply_record(&rec(&Entry::barrier(u64::from(round)), seq))
                .unwrap();
            states.push((seq, expected.clone()));
            g.commit().unwrap();
        }
        assert_eq!(g.points().len(), 4);
        for (seq, state) in &states {
            assert!(read_point(&g, Some(Seq(*seq))) == *state, "point {seq}");
        }

        // The first half of a fold to the second point, by hand.
        let to = g.journal.points[1].pos;
        g.write_state(g.durable.clone(), Some(to)).unwrap();
        let mut partial = BTreeMap::new();
        let mut o = Overlay::default();
        for p in g.journal.overlays_before(to)[&DiskId(0)]
            .all()
            .take(applied_pieces)
        {
            o.insert(p.start, p.end, p.source);
        }
        partial.insert(DiskId(0), o);
        apply_overlays(&g.images, &g.journal, &partial).unwrap();
        (states, expected)
    }

    /// A fold cut short after any number of its pieces reached the image:
    /// reopening finishes it, and every point it keeps reads as before.
    #[test]
    fn an_interrupted_fold_is_finished_on_open() {
        for applied_pieces in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let (states, expected) = half_folded_group(dir.path(), applied_pieces);

            let g = ReplicaGroup::open(dir.path()).unwrap();
            let kept: Vec<u64> = g.points().iter().map(|p| p.seq.get()).collect();
            assert_eq!(kept, [states[2].0, states[3].0]);
            for (seq, state) in &states[2..] {
                assert!(read_point(&g, Some(Seq(*seq))) == *state, "point {seq}");
            }
            assert!(matches!(
                g.view(Some(Seq(states[0].0))),
                Err(StoreError::NoSuchPoint(_))
            ));
            assert!(read_point(&g, None) == expected);
            let mut base = vec![0u8; 65536];
            journal::read_exact_at(&g.images[&DiskId(0)], &mut base, 0).unwrap();
            assert!(base == states[1].1, "the image holds the folded point");
            let p = g.position();
            drop(g);
            // The finished fold is itself committed: a second open agrees.
            let g = ReplicaGroup::open(dir.path()).unwrap();
            assert_eq!(g.position(), p);
            assert_eq!(g.points().len(), 2);
        }
    }

    /// A fold cut short (a receiver killed in the middle of it), opened
    /// read-only before anything finishes it (`tidemark points`, a test
    /// failover): the image holds only part of the fold, so the points it
    /// keeps must still read what the journal says, not the image.
    #[test]
    fn an_interrupted_fold_opened_read_only_reads_every_kept_point_right() {
        for applied_pieces in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let (states, expected) = half_folded_group(dir.path(), applied_pieces);
            let state_before = std::fs::read(dir.path().join(STATE_FILE)).unwrap();

            let g = ReplicaGroup::open_read_only(dir.path()).unwrap();
            let kept: Vec<u64> = g.points().iter().map(|p| p.seq.get()).collect();
            assert_eq!(kept, [states[2].0, states[3].0]);
            for (seq, state) in &states[2..] {
                assert!(
                    read_point(&g, Some(Seq(*seq))) == *state,
                    "point {seq} with {applied_pieces} pieces folded"
                );
            }
            assert!(matches!(
                g.view(Some(Seq(states[1].0))),
                Err(StoreError::NoSuchPoint(_))
            ));
            assert!(read_point(&g, None) == expected);
            drop(g);
            // Nothing changed: the writer still finishes the fold.
            assert_eq!(
                std::fs::read(dir.path().join(STATE_FILE)).unwrap(),
                state_before
            );
            let g = ReplicaGroup::open(dir.path()).unwrap();
            for (seq, state) in &states[2..] {
                assert!(read_point(&g, Some(Seq(*seq))) == *state, "point {seq}");
            }
        }
    }

    /// A point a test failover pinned is not folded, nor anything after
    /// it; once the pin is gone, retention catches up.
    #[test]
    fn a_pinned_point_is_not_folded() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = one_disk_group(dir.path());
        g.set_retention(Retention {
            window: std::time::Duration::MAX,
            max_points: 1,
            max_space: None,
            fold_interval: std::time::Duration::ZERO,
        });
        let pin_dir = dir.path().join(TEST_FAILOVER_DIR);
        std::fs::create_dir_all(&pin_dir).unwrap();
        std::fs::write(pin_dir.join(PIN_FILE), "2").unwrap();
        for seq in 1..=6u64 {
            let rec = if seq % 2 == 1 {
                rec(&Entry::write(0, seq * 100, &[seq as u8; 100], 0), seq)
            } else {
                rec(&Entry::barrier(seq), seq)
            };
            g.apply_record(&rec).unwrap();
            g.commit().unwrap();
        }
        let seqs = |g: &ReplicaGroup| g.points().iter().map(|p| p.seq.get()).collect::<Vec<_>>();
        assert_eq!(seqs(&g), [2, 4, 6], "the pinned point and later ones stay");
        std::fs::remove_file(pin_dir.join(PIN_FILE)).unwrap();
        g.apply_retention(0, true).unwrap();
        assert_eq!(seqs(&g), [6]);
    }

    /// The span floor keeps its point and every later one against every
    /// rule (age, count, space: the floor wins and says so), is read
    /// again at open, and once moved or removed retention catches up.
    #[test]
    fn the_span_floor_is_respected_by_every_retention_rule_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let seqs = |g: &ReplicaGroup| g.points().iter().map(|p| p.seq.get()).collect::<Vec<_>>();
        let write = |g: &mut ReplicaGroup, from: u64, to: u64| {
            for seq in from..=to {
                let rec = if seq % 2 == 1 {
                    rec(&Entry::write(0, seq * 100, &[seq as u8; 100], 0), seq)
                } else {
                    rec(&Entry::barrier(seq), seq)
                };
                g.apply_record(&rec).unwrap();
                g.commit().unwrap();
            }
        };
        {
            let mut g = one_disk_group(dir.path());
            g.set_floor(Some(Seq(4))).unwrap();
            assert_eq!(
                std::fs::read(dir.path().join(FLOOR_FILE)).unwrap(),
                b"4",
                "the floor's format: the pin's"
            );
            // By count.
            g.set_retention(Retention {
                window: std::time::Duration::MAX,
                max_points: 1,
                max_space: None,
                fold_interval: std::time::Duration::ZERO,
            });
            write(&mut g, 1, 8);
            assert_eq!(seqs(&g), [4, 6, 8], "the floor's point and later ones stay");
            assert!(!g.floor_holds_space());
            // By age: every point is older than the window.
            g.set_retention(Retention {
                window: std::time::Duration::from_secs(1),
                max_points: u64::MAX,
                max_space: None,
                fold_interval: std::time::Duration::ZERO,
            });
            g.apply_retention(u64::MAX, true).unwrap();
            assert_eq!(seqs(&g), [4, 6, 8]);
            // By space: the floor wins, and says so.
            g.set_retention(Retention {
                window: std::time::Duration::MAX,
                max_points: u64::MAX,
                max_space: Some(1),
                fold_interval: std::time::Duration::ZERO,
            });
            g.apply_retention(0, true).unwrap();
            assert_eq!(seqs(&g), [4, 6, 8]);
            assert!(g.floor_holds_space());
        }
        // A restarted receiver folds nothing the floor keeps, from its
        // first commit on.
        let mut g = ReplicaGroup::open(dir.path()).unwrap();
        assert_eq!(g.floor(), Some(Seq(4)));
        g.set_retention(Retention {
            window: std::time::Duration::MAX,
            max_points: 1,
            max_space: None,
            fold_interval: std::time::Duration::ZERO,
        });
        write(&mut g, 9, 10);
        assert_eq!(seqs(&g), [4, 6, 8, 10]);
        // The floor moves on: the points before it go.
        g.set_floor(Some(Seq(8))).unwrap();
        g.apply_retention(0, true).unwrap();
        assert_eq!(seqs(&g), [8, 10]);
        // No floor: retention alone decides.
        g.set_floor(None).unwrap();
        assert!(!dir.path().join(FLOOR_FILE).exists());
        g.apply_retention(0, true).unwrap();
        assert_eq!(seqs(&g), [10]);
        drop(g);
        assert_eq!(ReplicaGroup::open(dir.path()).unwrap().floor(), None);
        // A read-only group does not write one.
        let mut ro = ReplicaGroup::open_read_only(dir.path()).unwrap();
        assert!(ro.set_floor(Some(Seq(10))).is_err());
        assert!(!dir.path().join(FLOOR_FILE).exists());
    }

    /// A floor moved while the power is cut at any sync reads, after the
    /// reopen, as the old floor or the new one: never none, never another
    /// point (which would let a fold take a span point's marker).
    #[test]
    fn a_floor_cut_at_any_sync_reads_as_the_old_floor_or_the_new() {
        use tidemark_durable::SimDir;
        let setup = || {
            let dir = SimDir::new();
            let mut g = ReplicaGroup::open_on(dir.clone(), SimDir::new()).unwrap();
            g.set_floor(Some(Seq(7))).unwrap();
            (dir, g)
        };
        let (probe, mut g) = setup();
        let before = probe.syncs();
        g.set_floor(Some(Seq(123_456))).unwrap();
        let syncs = probe.syncs() - before;
        assert!(syncs > 0);
        for cut in 1..=syncs + 1 {
            let (dir, mut g) = setup();
            dir.cut_power_at_sync(before + cut);
            let done = g.set_floor(Some(Seq(123_456))).is_ok();
            let after = SimDir::from_files(dir.after_power_cut());
            let floor = ReplicaGroup::open_on(after, SimDir::new()).unwrap().floor();
            if done {
                assert_eq!(floor, Some(Seq(123_456)), "cut at sync {cut}");
            } else {
                assert!(
                    floor == Some(Seq(7)) || floor == Some(Seq(123_456)),
                    "cut at sync {cut}: {floor:?}"
                );
            }
        }
    }

    #[test]
    fn a_point_is_found_by_its_seq_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = one_disk_group(dir.path());
        g.set_retention(Retention {
            window: std::time::Duration::MAX,
            ..Retention::default()
        });
        g.apply_record(&rec(&Entry::write(0, 0, &[1; 100], 0), 1))
            .unwrap();
        g.apply_record(&rec(&Entry::marker("span-shop-1", false, 7), 2))
            .unwrap();
        assert!(g.point_at(Seq(2)).is_none(), "not before its commit");
        g.commit().unwrap();
        g.apply_record(&rec(&Entry::barrier(9), 3)).unwrap();
        let p = g.point_at(Seq(2)).expect("the committed marker");
        assert_eq!((p.seq, p.label.as_str()), (Seq(2), "span-shop-1"));
        assert!(g.point_at(Seq(1)).is_none(), "a write is no point");
        assert!(g.point_at(Seq(3)).is_none(), "uncommitted");
        g.commit().unwrap();
        assert_eq!(g.point_at(Seq(3)).map(|p| p.seq), Some(Seq(3)));
        assert!(g.point_at(Seq(4)).is_none());
    }

    /// A fold for space takes the history down to a margin below
    /// `max_space`: a busy group's commits do not each fold again (a
    /// fold's fixed costs, at every commit), and the history stays within
    /// the limit after every commit.
    #[test]
    fn a_fold_for_space_leaves_a_margin_so_commits_do_not_each_fold() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = one_disk_group(dir.path());
        g.set_segment_size(4 << 10);
        const MAX: u64 = 32 << 10;
        g.set_retention(Retention {
            window: std::time::Duration::MAX,
            max_points: u64::MAX,
            max_space: Some(MAX),
            fold_interval: std::time::Duration::MAX,
        });
        let mut seq = 0u64;
        let mut folds = 0;
        let mut commits = 0;
        let mut oldest = None;
        for i in 0..400u64 {
            seq += 1;
            let at = (i * 512) % 60_000;
            g.apply_record(&rec(&Entry::write(0, at, &[i as u8; 256], 0), seq))
                .unwrap();
            seq += 1;
            g.apply_record(&rec(&Entry::barrier(seq), seq)).unwrap();
            g.commit().unwrap();
            assert!(g.history_bytes() <= MAX, "{} > {MAX}", g.history_bytes());
            let first = g.points().first().map(|p| p.seq);
            if g.history_bytes() > MAX / 2 {
                commits += 1;
                if first != oldest && oldest.is_some() {
                    folds += 1;
                }
            }
            oldest = first;
        }
        assert!(commits > 100, "the history reached the limit: {commits}");
        assert!(
            folds * 4 < commits,
            "{folds} folds in {commits} commits at the limit"
        );
        // A large history's margin stays about a group commit's worth: a
        // fold holds up the apply for as long as it writes and syncs.
        assert_eq!(space_margin(64 << 20), 4 << 20);
        assert_eq!(space_margin(1 << 40), SPACE_MARGIN_MAX);
        let (last, at) = (399u64, (399 * 512) % 60_000);
        let newest = read_point(&g, None);
        assert_eq!(
            newest[at as usize..at as usize + 256],
            [last as u8; 256][..]
        );
    }

    /// A verified record's journal entry is checksummed from the record's
    /// own checksum, not from its bytes as they lie when written: a
    /// payload that changed after its check is not journaled as good, the
    /// history refuses it when it is read.
    #[test]
    fn a_payload_changed_after_its_check_is_refused_when_the_history_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = one_disk_group(dir.path());
        let mut r = rec(&Entry::write(0, 0, &[5u8; 4096], 0), 1);
        r.payload[100] ^= 1;
        g.apply_verified_record(r.as_view()).unwrap();
        g.commit().unwrap();
        drop(g);
        let _ = std::fs::remove_file(dir.path().join(index::INDEX_FILE));
        let opened = ReplicaGroup::open(dir.path());
        assert!(
            matches!(opened, Err(StoreError::Damaged { .. })),
            "{opened:?}"
        );
    }
}
