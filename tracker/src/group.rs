//! A consistency group: the disks one tracker serves and the ONE ordered
//! change log they share. This module owns the group's shared state and
//! its rules; the event loops drive it through the write path's queue
//! core ([`crate::write_path`]), synchronous callers (the oracle, tests)
//! through [`Backend`].
//!
//! A write, step by step (DESIGN invariants 1–8):
//! 1. its byte range is locked, so overlapping writes in flight reach the
//!    device in log order (invariant 6); an event loop's request that finds
//!    the range taken parks, its thread goes on;
//! 2. its extent is made hot in the activity map, durably, before anything
//!    is issued (invariant 4; the committer writes and syncs the map, every
//!    write waiting at the time shares one fdatasync);
//! 3. the record is copied into the log's buffer (data mode: the sequence
//!    number is taken here, in the short critical section of the log), or
//!    the extent set in the dirty bitmap (bitmap mode: the log is full or
//!    failed), and the backing device write is submitted at once: the two
//!    are under way together (invariant 1);
//! 4. once the device write completed, the range is unlocked and the write
//!    acknowledged. Its sequence number was taken after every write
//!    acknowledged before it was submitted (invariant 2).
//!
//! **A failed backing write is followed by a resync-needed record** of its
//! range, is answered with its error, and its extent stays hot (never
//! cooled), so a resync after a crash re-reads it too: a failed write
//! leaves its range undefined on any disk, and the replica takes that
//! range from what the source really holds (see [`crate::write_path`]).
//!
//! The committer ([`crate::commit`]) writes the log's buffer out in large
//! writes and makes it durable for barriers; see there for the crash rule
//! that lets a write be acknowledged while its record is still buffered.
//!
//! FLUSH and FUA are barriers: a barrier record is appended, the log made
//! durable with one fdatasync shared by every barrier waiting at the time
//! (group commit), and, beside it, the backing device flushed.
//!
//! After an unclean stop the group starts a new *generation* above every
//! sequence number a reader could have seen, and records every hot extent
//! of the activity map as resync-needed: those may hold writes the log lost.
//! What the log's recovery may cut follows from the state file (see
//! [`tidemark_changelog::log`]): after a clean stop nothing, any damage
//! refuses the open; after an unclean one a torn tail above the durable
//! watermark, which is why an extent cools only once the watermark covers
//! its writes.

use crate::backend::{all_data, from_runs, Allocation, Backend, BackendError, ServedDisk};
use crate::bitmap::{BitmapError, PersistentBitmap};
use crate::commit::{CommitFailed, Committer, LogStep, LOG_BUFFER_LIMIT, WRITE_OUT_BYTES};
use crate::lock_order::{Level, Ordered, OrderedGuard};
use crate::nbd::export::BlockSizes;
use crate::queue::{QueueWaker, Wakers};
use crate::range_lock::{RangeLock, RangeTicket};
use crate::state::{BitmapCause, DiskIdError, FullAt, GroupState, StateError};
use crate::storage::BlockDevice;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark_changelog::{
    now_ns, AppendError, ChangeLog, DiskId, Entry, FsDir, LogOptions, OpenError, Recovery,
    RecoveryPolicy, Seq,
};
use tidemark_config::ByteSize;
use tidemark_metrics::{Histogram, HistogramSnapshot, LATENCY_BUCKETS};
use tidemark_names::{Label, Name};

/// Granularity of the dirty bitmap used in bitmap mode.
pub const DIRTY_GRANULARITY: u64 = 64 << 10;

/// One protected disk of the group.
pub struct GroupDisk {
    /// The disk's name (config): the receiver files its replica under it,
    /// and it names the disk's maps in the log directory.
    pub name: Name,
    /// Its NBD export name (the config's `export-name`, else its name).
    pub export: String,
    /// The backing device.
    pub device: Arc<dyn BlockDevice>,
}

/// How a group is opened.
pub struct GroupOptions {
    /// The change log directory (also holds the maps and the state file).
    pub log_dir: std::path::PathBuf,
    /// Log sizes.
    pub log: LogOptions,
    /// Bytes per activity-map extent.
    pub activity_extent: u64,
    /// The largest request the NBD server accepts.
    pub max_block: u32,
    /// The disks were written behind the tracker's back (e.g. a failback
    /// wrote them in place): record every byte as resync-needed, as after
    /// an unclean stop with every extent hot, so the replica is compared
    /// block by block and only what differs travels.
    pub resync_all: bool,
}

/// How the group tracks writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrackingMode {
    /// Every write is in the change log.
    Data,
    /// The log takes no data; written extents are remembered in the dirty
    /// bitmap until a checksum resync.
    Bitmap {
        /// Why the group left data mode.
        cause: BitmapCause,
    },
}

impl TrackingMode {
    /// `data` or `bitmap`.
    pub fn name(&self) -> &'static str {
        match self {
            TrackingMode::Data => "data",
            TrackingMode::Bitmap { .. } => "bitmap",
        }
    }
}

/// Why the group could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The change log could not be opened.
    #[error(transparent)]
    Log(#[from] OpenError),
    /// The state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// An activity or dirty bitmap could not be used.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// Recording the extents of an unclean stop failed.
    #[error("recording resync-needed extents after an unclean stop")]
    Append(#[source] AppendError),
    /// A configuration problem.
    #[error("{0}")]
    Config(String),
    /// A setting breaks the rule the configuration file is checked by.
    #[error(transparent)]
    Setting(#[from] tidemark_config::ConfigError),
    /// A new disk could not be given an id.
    #[error(transparent)]
    DiskId(#[from] DiskIdError),
    /// The disks file (the sizes the group was served at) could not be
    /// read.
    #[error(transparent)]
    Sources(#[from] tidemark_changelog::sources::SourcesError),
    /// Recording a disk's growth in the log failed.
    #[error("recording the growth of disk {disk} in the change log")]
    Grow {
        /// The disk.
        disk: Name,
        /// The log's error.
        #[source]
        source: AppendError,
    },
}

/// Why a marker could not be inserted.
#[derive(Debug, thiserror::Error)]
pub enum MarkerError {
    /// The group does not serve yet.
    #[error("the tracker is still starting")]
    Starting,
    /// No recovery point can be made in bitmap mode.
    #[error("the group is in bitmap mode: no recovery point can be marked until a resync")]
    BitmapMode,
    /// The label does not fit in a record.
    #[error("invalid label: {0}")]
    Label(#[source] tidemark_changelog::record::DecodeError),
    /// The log took no record.
    #[error("{0}")]
    Append(#[source] AppendError),
    /// The log failed before the marker was durable.
    #[error("the change log failed while making the marker durable")]
    NotDurable,
}

/// Why a clean stop could not be recorded (the next start is then an
/// unclean one: nothing is lost, a resync of the hot extents follows).
#[derive(Debug, thiserror::Error)]
pub enum CloseError {
    /// A final barrier failed.
    #[error("final barrier: {0}")]
    Barrier(#[source] BackendError),
    /// The maps could not be written.
    #[error(transparent)]
    Maps(#[from] BitmapError),
    /// The state file could not be written.
    #[error(transparent)]
    State(#[from] StateError),
}

/// Why data mode could not return.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    /// The log's free room could not be read.
    #[error("reading the log's cursor: {0}")]
    Cursor(#[source] AppendError),
    /// The pending generation could not begin.
    #[error("starting generation {generation}: {source}")]
    Generation {
        /// The generation.
        generation: u32,
        /// Why.
        #[source]
        source: AppendError,
    },
    /// The dirty extents could not be recorded.
    #[error("recording resync-needed extents: {0}")]
    Record(#[source] AppendError),
    /// They could not be made durable.
    #[error("making resync-needed extents durable: {0}")]
    Sync(#[source] AppendError),
    /// The dirty bitmap could not be cleared.
    #[error("clearing the dirty bitmap: {0}")]
    ClearDirty(#[source] BitmapError),
    /// The state file could not say data mode.
    #[error("recording data mode in the state file: {0}")]
    State(#[source] StateError),
}

/// Why a whole disk could not be recorded as resync-needed.
#[derive(Debug, thiserror::Error)]
pub enum ResyncAllError {
    /// The group does not serve yet.
    #[error("the tracker is still starting")]
    Starting,
    /// No such disk.
    #[error("no disk {0:?} in this group")]
    NoDisk(String),
    /// The dirty bitmap could not be persisted.
    #[error("recording the disk in the dirty bitmap failed")]
    Dirty,
}

/// Why a disk could not be grown while served ([`Group::resize`]).
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// The group does not serve yet.
    #[error("the tracker is still starting")]
    Starting,
    /// No such disk (the caller's).
    #[error("no disk {0:?} in this group")]
    NoDisk(String),
    /// The backing's size could not be read (local disk).
    #[error("reading the size of disk {disk}'s backing")]
    Measure {
        /// The disk.
        disk: Name,
        /// Why.
        #[source]
        source: crate::storage::StorageError,
    },
    /// The backing is smaller than the disk is served at (the admin's: a
    /// protected disk may only grow).
    #[error("disk {disk}'s backing holds {backing} bytes, less than the {size} bytes it is served at: a protected disk may only grow (give the backing its size back)")]
    Shrunk {
        /// The disk.
        disk: Name,
        /// The size served.
        size: u64,
        /// What the backing holds.
        backing: u64,
    },
    /// The backing did not grow (the admin's: grow it first).
    #[error("disk {disk}'s backing still holds {size} bytes, the size it is served at: grow the backing first (truncate, lvextend, qemu-img resize), then resize")]
    Unchanged {
        /// The disk.
        disk: Name,
        /// Its size.
        size: u64,
    },
    /// The new size breaks the device's direct-I/O alignment (the admin's).
    #[error("disk {disk}'s backing grew to {size} bytes, not a multiple of its direct-I/O alignment of {align} bytes: grow it to a multiple")]
    Unaligned {
        /// The disk.
        disk: Name,
        /// The backing's new size.
        size: u64,
        /// The alignment.
        align: u64,
    },
    /// The log takes no record in bitmap mode, and the running shipper
    /// could not learn the growth in order with the writes.
    #[error("the group is in bitmap mode: the growth cannot be recorded in the change log; resize once data mode returns, or restart the tracker (the growth is then announced when the shipper connects)")]
    BitmapMode,
    /// The activity or dirty bitmap could not cover the new size (local
    /// disk).
    #[error("growing disk {disk}'s maps")]
    Maps {
        /// The disk.
        disk: Name,
        /// Why.
        #[source]
        source: BitmapError,
    },
    /// The log took no grow record (the group is now in bitmap mode).
    #[error("recording the growth of disk {disk} in the change log")]
    Append {
        /// The disk.
        disk: Name,
        /// The log's error.
        #[source]
        source: AppendError,
    },
    /// The log failed before the grow record was durable; the disk is
    /// still served at its old size.
    #[error("the change log failed while making the growth of disk {0} durable")]
    NotDurable(Name),
    /// The device refused the new size after the growth was recorded; the
    /// disk is still served at its old size (the replica grows at the
    /// record, which is harmless: the next start or resize serves it).
    #[error("serving disk {disk} at its new size")]
    Serve {
        /// The disk.
        disk: Name,
        /// Why.
        #[source]
        source: crate::storage::StorageError,
    },
    /// The disks file could not be rewritten with the new size; the disk is
    /// served at it, and the next start records the growth again (a second
    /// grow record to the same size changes nothing).
    #[error("rewriting the disks file with disk {disk}'s new size")]
    Sources {
        /// The disk.
        disk: Name,
        /// Why.
        #[source]
        source: tidemark_changelog::sources::SourcesError,
    },
}

/// A disk grown while served ([`Group::resize`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resized {
    /// The disk.
    pub disk: Name,
    /// Its id.
    pub id: DiskId,
    /// The size served before.
    pub before: u64,
    /// The size served now.
    pub size: u64,
    /// The grow record's sequence number.
    pub seq: Seq,
}

/// What opening the group found and did.
#[derive(Debug, Clone)]
pub struct OpenReport {
    /// What the change log's recovery found.
    pub recovery: Recovery,
    /// Whether the previous run ended without a clean stop.
    pub unclean: bool,
    /// The generation the group runs in now.
    pub generation: u32,
    /// Extents recorded as resync-needed because of an unclean stop:
    /// (disk, offset, length).
    pub resync_needed: Vec<(DiskId, u64, u64)>,
    /// Disks served larger than at the last start, whose growth the log
    /// now records: (disk, size before, size now).
    pub grown: Vec<(DiskId, u64, u64)>,
}

/// A point-in-time view for `status`.
#[derive(Debug, Clone)]
pub struct GroupStatus {
    /// Tracking mode.
    pub mode: TrackingMode,
    /// Current generation.
    pub generation: u32,
    /// Next sequence number to be assigned.
    pub next_seq: Seq,
    /// Highest sequence number durable in the log.
    pub durable_seq: Seq,
    /// Bytes the log's segments occupy.
    pub log_bytes: u64,
    /// The log's size limit.
    pub log_limit: u64,
    /// Writes acknowledged since start.
    pub writes: u64,
    /// Barriers since start.
    pub barriers: u64,
    /// Bytes of acknowledged writes since start (write requests only, not
    /// trims or write-zeroes).
    pub bytes_written: u64,
    /// Hot extents per disk.
    pub hot_extents: Vec<u64>,
    /// Dirty extents per disk (bitmap mode).
    pub dirty_extents: Vec<u64>,
}

pub(crate) struct DiskState {
    /// Its stable id (the `disk` of its records), from the state file.
    pub(crate) id: DiskId,
    pub(crate) disk: GroupDisk,
    /// The size served: new NBD connections and the ublk device are told
    /// it. Grows only after its grow record is durable in the log (see
    /// [`Group::resize`]).
    size: AtomicU64,
    pub(crate) locks: RangeLock,
}

impl DiskState {
    /// The size served now.
    pub(crate) fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }
}

/// Per-extent bookkeeping of the activity map.
struct Activity {
    map: PersistentBitmap,
    inflight: Vec<u32>,
    last_seq: Vec<Seq>,
    /// Device flushes started when the extent's last write completed: a
    /// flush started after it (a larger start number) covers that write.
    epoch: Vec<u64>,
    /// The bit is known to be set on disk.
    durable: Vec<bool>,
}

struct Maps {
    activity: Vec<Activity>,
    dirty: Vec<PersistentBitmap>,
}

/// The device flushes of one disk, numbered as they start: what a hot
/// extent may be cooled after (see [`Activity::epoch`]).
#[derive(Debug, Default)]
pub(crate) struct FlushEpochs {
    started: AtomicU64,
    /// The start number of the latest flush that completed.
    done: AtomicU64,
}

impl FlushEpochs {
    /// A flush starts now: its number.
    pub(crate) fn start(&self) -> u64 {
        self.started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Flush number `epoch` completed.
    pub(crate) fn done(&self, epoch: u64) {
        self.done.fetch_max(epoch, Ordering::SeqCst);
    }
}

/// How the group records writes: the change log, the mode, the activity
/// and dirty maps, the state file. Shared with the committer.
pub(crate) struct Tracking {
    log: Ordered<ChangeLog<FsDir>>,
    /// The log's unwritten bytes as of the last append or write-out: read
    /// without the log's lock.
    unwritten: AtomicUsize,
    mode: Ordered<TrackingMode>,
    maps: Ordered<Maps>,
    /// Serializes writing map bytes and their fdatasync.
    persist: Ordered<()>,
    state: Ordered<GroupState>,
    pub(crate) flushes: Vec<FlushEpochs>,
    /// The event loops' queues that may park requests on the group.
    pub(crate) wakers: Wakers,
    /// The gate of an open hold (a span point): no modification whose
    /// record is numbered above it is acknowledged. [`NO_HOLD`] when no
    /// hold is open. Stored under the log's lock right after the hold's
    /// marker, so every record numbered after the marker finds it set.
    hold_after: AtomicU64,
    /// Acknowledgements the open (or last) hold kept waiting.
    hold_gated: AtomicU32,
}

/// [`Tracking::hold_after`] when no hold is open.
const NO_HOLD: u64 = u64::MAX;

/// Where a change went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Recorded {
    /// Appended to the log with this sequence number (the last one if the
    /// write was split into several records).
    Logged(Seq),
    /// Set in the dirty bitmap (bitmap mode).
    Dirty,
    /// The log's buffer is full: try again once the committer wrote it
    /// out (the range stays locked meanwhile).
    NoRoom,
}

/// The sequence number [`Group::release_hot`] is given for a write that
/// failed: above any real one, so its extent never cools.
pub(crate) const NEVER_COOLS: Seq = Seq(u64::MAX);

/// What a barrier waits for besides the device's flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BarrierWait {
    /// The log durable up to this barrier record.
    Log(Seq),
    /// The dirty bitmap persisted up to this ticket (bitmap mode).
    Dirty(u64),
}

/// The slot of a disk id no disk of the group has.
const NO_SLOT: usize = usize::MAX;

/// The consistency group.
pub struct Group {
    /// The disks in the configuration's order (their slots); every table
    /// of the group with one entry per disk follows this order.
    pub(crate) disks: Vec<DiskState>,
    /// The slot of each disk id ([`NO_SLOT`] for an id no disk has: ids
    /// are stable, so removed disks leave gaps).
    slots: Vec<usize>,
    tracking: Arc<Tracking>,
    pub(crate) committer: Committer,
    /// A new generation (number, first sequence number) to begin in the log
    /// when data mode returns.
    pending_generation: Ordered<Option<(u32, Seq)>>,
    /// The state file says "running": only then may anything be appended
    /// (see [`Group::mark_running`]).
    running: AtomicBool,
    block_sizes: BlockSizes,
    writes: AtomicU64,
    barriers: AtomicU64,
    bytes_written: AtomicU64,
    /// Time from a modifying request's arrival to its acknowledgement.
    write_latency: Histogram,
    /// The log directory (its disks file is rewritten by a resize).
    log_dir: std::path::PathBuf,
    /// One resize at a time.
    resizing: std::sync::Mutex<()>,
}

/// Takes one of the group's locks, in the order of [`crate::lock_order`].
fn lock<T>(m: &Ordered<T>) -> OrderedGuard<'_, T> {
    m.lock()
}

impl Group {
    /// Opens the group: recovers the log, and after an unclean stop starts
    /// a new generation and records the hot extents as resync-needed.
    pub fn open(
        disks: Vec<GroupDisk>,
        opts: GroupOptions,
    ) -> Result<(Group, OpenReport), GroupError> {
        if disks.is_empty() {
            return Err(GroupError::Config("a group needs at least one disk".into()));
        }
        tidemark_config::tracker::check_activity_extent_size(ByteSize(opts.activity_extent))?;
        let dir = FsDir::create_all(&opts.log_dir).map_err(|source| OpenError::Io {
            dir: opts.log_dir.display().to_string(),
            context: "creating the log directory".into(),
            source,
        })?;
        let names: Vec<String> = disks.iter().map(|d| d.name.to_string()).collect();
        let mut state =
            GroupState::load(&opts.log_dir)?.unwrap_or_else(|| GroupState::fresh(&names));
        let (ids, removed) = state.assign_ids(&names)?;
        for gone in &removed {
            tracing::warn!(
                disk = %gone.name,
                id = %gone.id,
                "a disk of this group is no longer configured: it leaves the group (the replica site keeps its replica in older points; its id is not given again)"
            );
        }
        // What the log's recovery may cut depends on how the last run
        // ended: after a clean stop nothing (a log without a state file is
        // held to that too), after a crash a torn tail above the watermark.
        let policy = if state.running {
            RecoveryPolicy::Crash
        } else {
            RecoveryPolicy::CleanStop {
                last_seq: state.last_seq,
            }
        };
        let (mut log, recovery) = ChangeLog::open(dir, opts.log, policy, now_ns())?;
        if let Some(cut) = &recovery.cut {
            tracing::warn!(
                segment = %cut.segment,
                offset = cut.offset,
                first_cut = cut.first_seq.get(),
                records_after = cut.records_after,
                acknowledged = cut.acknowledged,
                damage = %cut.damage,
                "the change log's torn tail was cut (a crash left it): a new generation begins and the hot extents are resynced"
            );
        }
        if recovery.lost_acknowledged > 0 {
            tracing::warn!(
                records = recovery.lost_acknowledged,
                "the receiver holds records the change log lost in the crash: they are unconfirmed there until the hot extents are resynced"
            );
        }

        let mut activity = Vec::new();
        let mut dirty = Vec::new();
        let mut states = Vec::new();
        for (d, &id) in disks.into_iter().zip(&ids) {
            let size = d.device.size();
            let (map, _) = PersistentBitmap::open(
                &opts.log_dir.join(format!("activity-{}.map", d.name)),
                opts.activity_extent,
                size,
            )?;
            let n = map.len() as usize;
            let durable = (0..map.len()).map(|i| map.get(i)).collect();
            activity.push(Activity {
                map,
                inflight: vec![0; n],
                last_seq: vec![Seq::ZERO; n],
                epoch: vec![0; n],
                durable,
            });
            let (bits, _) = PersistentBitmap::open(
                &opts.log_dir.join(format!("dirty-{}.map", d.name)),
                DIRTY_GRANULARITY,
                size,
            )?;
            dirty.push(bits);
            states.push(DiskState {
                id,
                disk: d,
                size: AtomicU64::new(size),
                locks: RangeLock::new(),
            });
        }

        let unclean = state.running || opts.resync_all;
        let mut mode = match &state.bitmap {
            Some(cause) => TrackingMode::Bitmap {
                cause: cause.clone(),
            },
            None => TrackingMode::Data,
        };
        let mut resync_needed = Vec::new();
        let mut generation = state.generation.max(recovery.generation);
        // A generation recorded in the state file but not yet begun in the
        // log (the log was full): begun when data mode returns.
        let mut pending_generation = (state.generation > recovery.generation)
            .then_some((state.generation, recovery.max_exposed_seq.next()));
        if unclean {
            generation += 1;
            match log.begin_generation(generation, recovery.max_exposed_seq.next(), now_ns()) {
                Ok(()) => {}
                // No room even for a new segment: the log takes no data now.
                // The generation is recorded in the state file and begun
                // in the log when data mode returns.
                Err(AppendError::Overflow { .. }) => {
                    pending_generation = Some((generation, recovery.max_exposed_seq.next()));
                    if mode == TrackingMode::Data {
                        mode = TrackingMode::Bitmap {
                            cause: BitmapCause::LogFull(FullAt::Restart),
                        };
                    }
                }
                Err(e) => return Err(GroupError::Append(e)),
            }
            for (act, disk) in activity.iter().zip(&states) {
                if opts.resync_all {
                    if disk.size() > 0 {
                        resync_needed.push((disk.id, 0, disk.size()));
                    }
                    continue;
                }
                for (offset, length) in act.map.ranges(disk.size()) {
                    resync_needed.push((disk.id, offset, length));
                }
            }
            if mode == TrackingMode::Data {
                let appended = resync_needed
                    .iter()
                    .try_for_each(|&(disk, offset, length)| {
                        log.append(&Entry::resync_needed(disk, offset, length, now_ns()))
                            .map(|_| ())
                    });
                match appended.and_then(|()| log.barrier(now_ns()).map(|_| ())) {
                    Ok(()) => {}
                    Err(AppendError::Overflow { .. }) => {
                        mode = TrackingMode::Bitmap {
                            cause: BitmapCause::LogFull(FullAt::UncleanStop),
                        }
                    }
                    Err(e) => return Err(GroupError::Append(e)),
                }
            }
            if let TrackingMode::Bitmap { .. } = mode {
                for &(disk, offset, length) in &resync_needed {
                    let Some(slot) = ids.iter().position(|&id| id == disk) else {
                        continue;
                    };
                    let bits = &mut dirty[slot];
                    for i in bits.extents(offset, length) {
                        bits.set(i);
                    }
                }
                for bits in &mut dirty {
                    let bytes = bits.take_unwritten();
                    bits.writer()?.write_bytes(&bytes, true)?;
                }
            }
            // The hot extents are now recorded (log or dirty bitmap).
            for act in &mut activity {
                act.map.clear_all();
                let bytes = act.map.take_unwritten();
                act.map.writer()?.write_bytes(&bytes, true)?;
                act.durable.iter_mut().for_each(|d| *d = false);
            }
        }
        // A disk larger than it was served at last (its backing grew while
        // the tracker was stopped): the growth is a record of the log,
        // before any write of this run, so the writes that reach into the
        // grown part come after it. In bitmap mode the log takes no
        // record: the shipper's hello announces the size (from the disks
        // file), and the replica grows then.
        let recorded = tidemark_changelog::read_sources(&opts.log_dir)?.unwrap_or_default();
        let mut grown = Vec::new();
        for disk in &states {
            let before = recorded
                .iter()
                .find(|r| r.disk.id == disk.id && r.disk.name == disk.disk.name)
                .map(|r| r.disk.size);
            if let Some(before) = before.filter(|&b| b < disk.size()) {
                grown.push((disk.id, before, disk.size()));
            }
        }
        if mode == TrackingMode::Data && !grown.is_empty() {
            let appended = grown
                .iter()
                .try_for_each(|&(id, before, size)| {
                    log.append(&Entry::grow(id, before, size, now_ns()))
                        .map(|_| ())
                })
                .and_then(|()| log.barrier(now_ns()).map(|_| ()));
            match appended {
                Ok(()) => {}
                // No room: the hello carries the growth, as above.
                Err(AppendError::Overflow { .. }) => tracing::warn!(
                    "the change log is full: the growth of a disk is not recorded in it; the replica grows when the shipper connects next"
                ),
                Err(source) => {
                    return Err(GroupError::Grow {
                        disk: names_by_id(&states, grown[0].0),
                        source,
                    })
                }
            }
        }
        state.generation = generation.max(log.generation());
        // An unclean stop is fully recorded by now: until the daemon has
        // every socket and calls `mark_running`, a stop is a clean one.
        state.running = false;
        state.last_seq = None;
        state.bitmap = match &mode {
            TrackingMode::Bitmap { cause } => Some(cause.clone()),
            TrackingMode::Data => None,
        };
        state.save(&opts.log_dir)?;

        let block_sizes = BlockSizes::new(1, 4096, opts.max_block)
            .map_err(|e| GroupError::Config(format!("max block size {}: {e}", opts.max_block)))?;
        let durable = log.durable_seq();
        let report = OpenReport {
            recovery,
            unclean,
            generation: state.generation,
            resync_needed,
            grown,
        };
        log.set_buffered(true);
        let disk_count = states.len();
        let tracking = Arc::new(Tracking {
            log: Ordered::new(Level::Log, log),
            unwritten: AtomicUsize::new(0),
            mode: Ordered::new(Level::Mode, mode),
            maps: Ordered::new(Level::Maps, Maps { activity, dirty }),
            persist: Ordered::new(Level::Persist, ()),
            state: Ordered::new(Level::State, state),
            flushes: (0..disk_count).map(|_| FlushEpochs::default()).collect(),
            wakers: Wakers::default(),
            hold_after: AtomicU64::new(NO_HOLD),
            hold_gated: AtomicU32::new(0),
        });
        let committer = Committer::start(Arc::clone(&tracking), durable).map_err(|e| {
            GroupError::Config(format!("starting the group's committer thread: {e}"))
        })?;
        let mut slots = Vec::new();
        for (slot, d) in states.iter().enumerate() {
            if slots.len() <= d.id.index() {
                slots.resize(d.id.index() + 1, NO_SLOT);
            }
            slots[d.id.index()] = slot;
        }
        let group = Group {
            disks: states,
            slots,
            tracking,
            committer,
            pending_generation: Ordered::new(Level::PendingGeneration, pending_generation),
            running: AtomicBool::new(false),
            block_sizes,
            writes: AtomicU64::new(0),
            barriers: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            write_latency: Histogram::new(LATENCY_BUCKETS),
            log_dir: opts.log_dir,
            resizing: std::sync::Mutex::new(()),
        };
        Ok((group, report))
    }

    /// Records in the state file that the group runs: from here on, a
    /// stop without [`close_clean`](Self::close_clean) is an unclean stop.
    /// [`open`](Self::open) leaves this out, so a start refused after the
    /// group opened (a socket that cannot be bound) leaves no run behind;
    /// call it once everything that can refuse the start has succeeded and
    /// before anything is served. Until then the group refuses writes,
    /// barriers and markers.
    pub fn mark_running(&self) -> Result<(), StateError> {
        let mut state = lock(&self.tracking.state);
        state.running = true;
        state.save_in_place()?;
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Refuses a change before [`mark_running`](Self::mark_running).
    pub(crate) fn check_running(&self) -> Result<(), BackendError> {
        if self.running.load(Ordering::Acquire) {
            Ok(())
        } else {
            tracing::error!("a change reached the group before it was marked running; refused");
            Err(BackendError::Unavailable)
        }
    }

    /// Refuses a request reaching past the size `disk` is served at now
    /// (before anything of it is recorded: a write beyond the old end of a
    /// disk being grown must not reach the log before the grow record).
    pub(crate) fn check_extent(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
    ) -> Result<(), BackendError> {
        let size = self.disk(disk)?.size();
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(BackendError::OutOfRange { offset, length }),
        }
    }

    pub(crate) fn disk(&self, disk: DiskId) -> Result<&DiskState, BackendError> {
        self.disks
            .get(self.slot(disk))
            .ok_or(BackendError::NoSuchDisk(disk))
    }

    /// The slot of `disk` in the group's tables ([`NO_SLOT`] if no disk
    /// has this id).
    fn slot(&self, disk: DiskId) -> usize {
        self.slots.get(disk.index()).copied().unwrap_or(NO_SLOT)
    }

    /// The backing device of `disk`.
    pub fn device(&self, disk: DiskId) -> Option<&Arc<dyn BlockDevice>> {
        self.disks.get(self.slot(disk)).map(|d| &d.disk.device)
    }

    /// The backing devices by disk id (`None` where no disk has the id),
    /// for the event loops' own device I/O.
    pub fn devices_by_id(&self) -> Vec<Option<Arc<dyn BlockDevice>>> {
        (0..self.slots.len() as u32)
            .map(|id| self.device(DiskId(id)).cloned())
            .collect()
    }

    /// Lets `waker`'s queue park requests on the group.
    pub fn register_waker(&self, waker: &Arc<QueueWaker>) {
        self.tracking.wakers.register(waker);
    }

    /// Asks for `waker` to be woken at the group's next change (park before
    /// the last look at what the request waits for).
    pub(crate) fn park(&self, waker: &QueueWaker) {
        self.tracking.wakers.park(waker);
    }

    /// Wakes every queue that parked requests.
    pub(crate) fn wake_parked(&self) {
        self.tracking.wakers.wake_parked();
    }

    /// Takes a byte range of `disk` if no request in flight holds an
    /// overlapping one (invariant 6).
    pub(crate) fn try_lock_range(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Option<RangeTicket> {
        self.disks[self.slot(disk)].locks.try_lock(offset, len)
    }

    /// Gives a range back, waking the requests parked on a range.
    pub(crate) fn unlock_range(&self, disk: DiskId, ticket: RangeTicket) {
        if self.disks[self.slot(disk)].locks.unlock(ticket) {
            self.wake_parked();
        }
    }

    /// Makes the extents of `offset..offset+len` hot and counts the request
    /// in flight on them. `Some(ticket)`: some extent is not durably hot
    /// yet, and the write may be issued only once the committer persisted
    /// the activity map up to `ticket` ([`Self::maps_ready`]).
    pub(crate) fn mark_hot(&self, disk: DiskId, offset: u64, len: u64) -> Option<u64> {
        let needs_persist = {
            let mut maps = lock(&self.tracking.maps);
            let act = &mut maps.activity[self.slot(disk)];
            let mut needs = false;
            for i in act.map.extents(offset, len) {
                act.inflight[i as usize] += 1;
                act.map.set(i);
                needs |= !act.durable[i as usize];
            }
            needs
        };
        needs_persist.then(|| self.committer.want_maps())
    }

    /// Whether the activity map is persisted up to `ticket`: `None` while
    /// not yet, `Some(Err)` if persisting it failed.
    pub(crate) fn maps_ready(&self, ticket: u64) -> Option<Result<(), BackendError>> {
        if self.committer.maps_broken() {
            Some(Err(BackendError::Unavailable))
        } else if self.committer.maps_done() >= ticket {
            Some(Ok(()))
        } else {
            None
        }
    }

    /// Counts a request off its extents; `seq` is its record's sequence
    /// number ([`Seq::ZERO`] in bitmap mode, [`NEVER_COOLS`] for a write
    /// that failed: its extent is then never cooled).
    pub(crate) fn release_hot(&self, disk: DiskId, offset: u64, len: u64, seq: Seq) {
        let epoch = self.tracking.flushes[self.slot(disk)]
            .started
            .load(Ordering::SeqCst);
        let mut maps = lock(&self.tracking.maps);
        let act = &mut maps.activity[self.slot(disk)];
        for i in act.map.extents(offset, len) {
            let u = i as usize;
            act.inflight[u] -= 1;
            act.last_seq[u] = act.last_seq[u].max(seq);
            act.epoch[u] = act.epoch[u].max(epoch);
        }
    }

    /// Records a change about to be applied to the device: a log record in data mode
    /// (copied into the log's buffer; a payload larger than one record
    /// becomes consecutive records), dirty bits in bitmap mode.
    pub(crate) fn record(&self, disk: DiskId, entry: &Entry<'_>) -> Recorded {
        let t = &*self.tracking;
        loop {
            let mode = lock(&t.mode);
            if matches!(*mode, TrackingMode::Data) {
                drop(mode);
                if t.unwritten.load(Ordering::SeqCst) >= LOG_BUFFER_LIMIT {
                    return Recorded::NoRoom;
                }
                // The CRCs of the payload are taken before the lock: the
                // critical section is the sequence number and a copy.
                let max = lock(&t.log).max_payload();
                let crcs: Vec<u32> = if entry.payload.len() <= max {
                    vec![entry.payload_crc()]
                } else {
                    entry.payload.chunks(max).map(crc32c::crc32c).collect()
                };
                let (appended, before, after) = {
                    let mut log = lock(&t.log);
                    let before = log.unwritten_bytes();
                    let appended = if entry.payload.len() <= max {
                        log.append_with_crc(entry, crcs[0])
                    } else {
                        // A write larger than a record can carry becomes
                        // several consecutive records under one lock:
                        // nothing can come between them, and a barrier
                        // never splits them.
                        entry.payload.chunks(max).zip(&crcs).enumerate().try_fold(
                            Seq::ZERO,
                            |_, (i, (chunk, &crc))| {
                                let offset = entry.offset + (i * max) as u64;
                                log.append_with_crc(
                                    &Entry::write(disk, offset, chunk, entry.timestamp_ns),
                                    crc,
                                )
                            },
                        )
                    };
                    let after = log.unwritten_bytes();
                    t.unwritten.store(after, Ordering::SeqCst);
                    (appended, before, after)
                };
                match appended {
                    Ok(seq) => {
                        if before < WRITE_OUT_BYTES && after >= WRITE_OUT_BYTES {
                            self.committer.nudge();
                        }
                        return Recorded::Logged(seq);
                    }
                    Err(e) => {
                        t.enter_bitmap_mode(&e);
                        continue;
                    }
                }
            }
            // The mode lock is held while the bits are set, so a return to
            // data mode (which takes the bits under the same lock) cannot
            // miss them.
            let mut maps = lock(&t.maps);
            let bits = &mut maps.dirty[self.slot(disk)];
            for i in bits.extents(entry.offset, entry.length) {
                bits.set(i);
            }
            return Recorded::Dirty;
        }
    }

    /// Starts a barrier on `disk`: appends the barrier record (data mode)
    /// and asks the committer for it to be durable, or asks for the dirty
    /// bitmap (bitmap mode). Returns the device flush's number (flush the
    /// device, then [`end_barrier`](Self::end_barrier)) and what else to
    /// wait for ([`barrier_ready`](Self::barrier_ready)).
    pub(crate) fn begin_barrier(&self, disk: DiskId) -> (u64, BarrierWait) {
        let epoch = self.tracking.flushes[self.slot(disk)].start();
        (epoch, self.barrier_wait())
    }

    fn barrier_wait(&self) -> BarrierWait {
        let t = &*self.tracking;
        if matches!(*lock(&t.mode), TrackingMode::Data) && !self.committer.log_broken() {
            let appended = {
                let mut log = lock(&t.log);
                let appended = log.append(&Entry::barrier(now_ns()));
                t.unwritten.store(log.unwritten_bytes(), Ordering::SeqCst);
                appended
            };
            match appended {
                Ok(seq) => {
                    self.committer.want_durable(seq);
                    return BarrierWait::Log(seq);
                }
                Err(e) => t.enter_bitmap_mode(&e),
            }
        }
        BarrierWait::Dirty(self.committer.want_dirty())
    }

    /// Whether a barrier's log or bitmap part is done: `None` while not,
    /// `Some(Err)` if it failed. A log that failed meanwhile makes it wait
    /// for the dirty bitmap instead (the wait is updated).
    pub(crate) fn barrier_ready(&self, wait: &mut BarrierWait) -> Option<Result<(), BackendError>> {
        match *wait {
            BarrierWait::Log(seq) => {
                if self.committer.durable() >= seq {
                    Some(Ok(()))
                } else if self.committer.log_broken() {
                    *wait = BarrierWait::Dirty(self.committer.want_dirty());
                    self.barrier_ready(wait)
                } else {
                    None
                }
            }
            BarrierWait::Dirty(ticket) => {
                if self.committer.maps_broken() {
                    Some(Err(BackendError::Unavailable))
                } else if self.committer.dirty_done() >= ticket {
                    Some(Ok(()))
                } else {
                    None
                }
            }
        }
    }

    /// Ends a barrier whose device flush `epoch` succeeded.
    pub(crate) fn end_barrier(&self, disk: DiskId, epoch: u64) {
        self.tracking.flushes[self.slot(disk)].done(epoch);
        self.barriers.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an acknowledged modification.
    pub(crate) fn count_write(&self, started: Instant, now: Instant, bytes: u64) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written.fetch_add(bytes, Ordering::Relaxed);
        // Atomic buckets: no lock is taken in the I/O path.
        self.write_latency
            .observe(now.saturating_duration_since(started));
    }

    /// Returns from bitmap mode to data mode when bitmap mode came from the
    /// log's size limit and the log has room again (the shipper moved the
    /// cursor, segments were recycled): a new generation begins in the log
    /// if one is pending, every dirty extent becomes a resync-needed record,
    /// a barrier makes them durable, and the dirty bitmap is cleared. Writes
    /// wait for this (it is rare and short). Returns the number of extents
    /// recorded, or `None` if the group stays as it is.
    pub fn try_resume_data_mode(&self) -> Result<Option<usize>, ResumeError> {
        if !self.running.load(Ordering::Acquire) {
            return Ok(None);
        }
        let t = &*self.tracking;
        let mut mode = lock(&t.mode);
        match &*mode {
            TrackingMode::Data => return Ok(None),
            TrackingMode::Bitmap { cause } if !cause.ends_by_itself() => return Ok(None),
            TrackingMode::Bitmap { .. } => {}
        }
        let mut maps = lock(&t.maps);
        // In bitmap mode nothing appends; what was buffered before is
        // being written out by the committer. Its I/O must be done before
        // the log is used here directly.
        let mut log = loop {
            let log = lock(&t.log);
            if !log.io_in_flight() && log.unwritten_bytes() == 0 {
                break log;
            }
            drop(log);
            self.committer.nudge();
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        // Only with room for real work: half the log free, so the group
        // does not flap between the modes.
        match log.free_bytes() {
            Ok(free) if free >= log.options().size_limit / 2 => {}
            Ok(_) => return Ok(None),
            Err(e) => return Err(ResumeError::Cursor(e)),
        }
        let now = now_ns();
        let mut pending = lock(&self.pending_generation);
        if let Some((generation, first_seq)) = *pending {
            let first_seq = first_seq.max(log.next_seq());
            match log.begin_generation(generation, first_seq, now) {
                Ok(()) => *pending = None,
                Err(AppendError::Overflow { .. }) => return Ok(None),
                Err(source) => return Err(ResumeError::Generation { generation, source }),
            }
        }
        drop(pending);
        let mut extents = Vec::new();
        for (bits, disk) in maps.dirty.iter().zip(&self.disks) {
            for (offset, length) in bits.ranges(disk.size()) {
                extents.push((disk.id, offset, length));
            }
        }
        for &(disk, offset, length) in &extents {
            match log.append(&Entry::resync_needed(disk, offset, length, now)) {
                Ok(_) => {}
                // Records appended so far only ask for a resync of extents
                // that are dirty anyway; the bits stay set.
                Err(AppendError::Overflow { .. }) => return Ok(None),
                Err(e) => return Err(ResumeError::Record(e)),
            }
        }
        match log.barrier(now).and_then(|_| log.sync()) {
            Ok(_) => {}
            Err(AppendError::Overflow { .. }) => return Ok(None),
            Err(e) => return Err(ResumeError::Sync(e)),
        }
        self.committer.note_durable(log.durable_seq());
        drop(log);
        for bits in &mut maps.dirty {
            bits.clear_all();
            let bytes = bits.take_unwritten();
            bits.writer()
                .and_then(|w| w.write_bytes(&bytes, true))
                .map_err(ResumeError::ClearDirty)?;
        }
        *mode = TrackingMode::Data;
        drop(maps);
        drop(mode);
        let mut state = lock(&t.state);
        state.bitmap = None;
        state.save_in_place().map_err(ResumeError::State)?;
        Ok(Some(extents.len()))
    }

    /// A barrier for the group that blocks the calling thread; flushes
    /// `disk`'s backing device beside the log's group commit.
    fn barrier(&self, disk: DiskId) -> Result<(), BackendError> {
        self.check_running()?;
        let d = self.disk(disk)?;
        let (epoch, mut wait) = self.begin_barrier(disk);
        d.disk.device.flush()?;
        loop {
            match wait {
                BarrierWait::Log(seq) => match self.committer.wait_durable(seq) {
                    Ok(()) => break,
                    Err(CommitFailed::Log) => {
                        wait = BarrierWait::Dirty(self.committer.want_dirty());
                    }
                    Err(CommitFailed::Maps) => return Err(BackendError::Unavailable),
                },
                BarrierWait::Dirty(ticket) => {
                    self.committer
                        .wait_dirty(ticket)
                        .map_err(|_| BackendError::Unavailable)?;
                    break;
                }
            }
        }
        self.end_barrier(disk, epoch);
        Ok(())
    }

    /// Inserts a labelled marker followed by a barrier; returns the
    /// marker's sequence number.
    pub fn marker(&self, label: &Label, app_consistent: bool) -> Result<Seq, MarkerError> {
        let (seq, barrier, _) = self.append_marker(label, app_consistent, |_| {})?;
        let barrier = barrier.map_err(MarkerError::Append)?;
        self.committer
            .wait_durable(barrier)
            .map_err(|_| MarkerError::NotDurable)?;
        Ok(seq)
    }

    /// Opens a hold for a span point: appends the point's marker and a
    /// barrier, exactly as [`Group::marker`], and closes the gate behind
    /// the marker before the log's lock is let go: from then on no
    /// modification recorded after the marker is acknowledged until
    /// [`Group::hold_release`] (writes recorded before it are answered as
    /// usual). Returns the marker's sequence number and generation.
    ///
    /// Unlike [`Group::marker`] it does not wait for the marker to be
    /// durable: the hold is on every member's critical path, and a marker
    /// a crash loses is never a committed point on the replica site, which
    /// is what the span's coordinator waits for.
    pub fn hold_open(
        &self,
        label: &Label,
        app_consistent: bool,
    ) -> Result<(Seq, u32), MarkerError> {
        let t = &*self.tracking;
        // The gate closes as soon as the marker is in, even if the barrier
        // then finds no room (the hold is refused and released below).
        let (seq, barrier, generation) = self.append_marker(label, app_consistent, |seq| {
            t.hold_gated.store(0, Ordering::SeqCst);
            t.hold_after.store(seq.get(), Ordering::SeqCst);
        })?;
        if let Err(e) = barrier {
            self.hold_release();
            return Err(MarkerError::Append(e));
        }
        Ok((seq, generation))
    }

    /// Appends a labelled marker and a barrier under one hold of the log's
    /// lock (so they are consecutive); `inside` runs with the marker's
    /// sequence number before the lock is let go. Returns the marker's
    /// sequence number, the barrier's (or why it was not appended) and the
    /// generation.
    fn append_marker(
        &self,
        label: &Label,
        app_consistent: bool,
        inside: impl FnOnce(Seq),
    ) -> Result<(Seq, Result<Seq, AppendError>, u32), MarkerError> {
        self.check_running().map_err(|_| MarkerError::Starting)?;
        let t = &*self.tracking;
        if !matches!(*lock(&t.mode), TrackingMode::Data) {
            return Err(MarkerError::BitmapMode);
        }
        let entry = Entry::marker(label.as_str(), app_consistent, now_ns());
        entry.validate().map_err(MarkerError::Label)?;
        let mut log = lock(&t.log);
        let seq = log.append(&entry).map_err(MarkerError::Append)?;
        inside(seq);
        let barrier = log.append(&Entry::barrier(now_ns()));
        t.unwritten.store(log.unwritten_bytes(), Ordering::SeqCst);
        Ok((seq, barrier, log.generation()))
    }

    /// Ends the open hold, if any: the acknowledgements it kept wait no
    /// longer.
    pub fn hold_release(&self) {
        self.tracking.hold_after.store(NO_HOLD, Ordering::SeqCst);
        self.wake_parked();
    }

    /// Acknowledgements the open hold (or the last one) kept waiting.
    pub fn hold_gated(&self) -> u32 {
        self.tracking.hold_gated.load(Ordering::SeqCst)
    }

    /// One more acknowledgement waits for the open hold.
    pub(crate) fn count_gated(&self) {
        self.tracking.hold_gated.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the acknowledgement of a modification recorded as `seq`
    /// waits for the open hold to end ([`Seq::ZERO`], unlogged, never
    /// does). One atomic load when no hold is open.
    pub(crate) fn held_back(&self, seq: Seq) -> bool {
        seq != Seq::ZERO && seq.get() > self.tracking.hold_after.load(Ordering::SeqCst)
    }

    /// A final barrier on every disk, then a clean stop recorded: the next
    /// open needs no resync. The committer stops; the group takes no more
    /// requests.
    pub fn close_clean(&self) -> Result<(), CloseError> {
        if !self.running.load(Ordering::Acquire) {
            // Nothing was served: the state file already says stopped.
            self.committer.stop();
            return Ok(());
        }
        for disk in &self.disks {
            self.barrier(disk.id).map_err(CloseError::Barrier)?;
        }
        self.committer.stop();
        let t = &*self.tracking;
        {
            let _persist = lock(&t.persist);
            // The mode before the maps (the lock order).
            let data_mode = matches!(*lock(&t.mode), TrackingMode::Data);
            let mut maps = lock(&t.maps);
            if data_mode {
                for act in &mut maps.activity {
                    act.map.clear_all();
                }
            }
            for act in &mut maps.activity {
                let bytes = act.map.take_unwritten();
                act.map.writer().and_then(|w| w.write_bytes(&bytes, true))?;
            }
        }
        t.persist_dirty()?;
        let last_seq = lock(&t.log).durable_seq();
        let mut state = lock(&t.state);
        state.running = false;
        state.last_seq = Some(last_seq);
        Ok(state.save_in_place()?)
    }

    /// The group's state, for `status`.
    pub fn status(&self) -> GroupStatus {
        let t = &*self.tracking;
        let (next_seq, durable_seq, log_bytes, log_limit, generation) = {
            let log = lock(&t.log);
            (
                log.next_seq(),
                log.durable_seq(),
                log.bytes_in_use(),
                log.options().size_limit,
                log.generation(),
            )
        };
        // The mode before the maps: the order `record` takes them in.
        let mode = lock(&t.mode).clone();
        let maps = lock(&t.maps);
        GroupStatus {
            mode,
            generation,
            next_seq,
            durable_seq,
            log_bytes,
            log_limit,
            writes: self.writes.load(Ordering::Relaxed),
            barriers: self.barriers.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            hot_extents: maps
                .activity
                .iter()
                .map(|a| (0..a.map.len()).filter(|&i| a.map.get(i)).count() as u64)
                .collect(),
            dirty_extents: maps
                .dirty
                .iter()
                .map(|b| (0..b.len()).filter(|&i| b.get(i)).count() as u64)
                .collect(),
        }
    }

    /// The write latency histogram: from a write, write-zeroes or trim
    /// request reaching the group to its acknowledgement (FUA included).
    pub fn write_latency(&self) -> HistogramSnapshot {
        self.write_latency.snapshot()
    }

    /// Sizes of the disks in bytes, by slot (the configuration's order).
    pub fn disk_sizes(&self) -> Vec<u64> {
        self.disks.iter().map(|d| d.size()).collect()
    }

    /// Records the whole of disk `name` as resync-needed, now: the disk
    /// was written without the tracker seeing it (it was spliced out of
    /// the I/O path, see [`crate::splice`]). In data mode this is a
    /// resync-needed record and a barrier, made durable; in bitmap mode
    /// (or if the log has no room) every dirty bit of the disk is set.
    /// Either way the replica compares every block, and blocks written
    /// through the tracker after this call are logged as usual, so a resync
    /// that reads the disk after this point sees every untracked write.
    /// Returns the record's sequence number in data mode.
    pub fn record_resync_all(&self, name: &str) -> Result<Option<Seq>, ResyncAllError> {
        self.check_running().map_err(|_| ResyncAllError::Starting)?;
        let t = &*self.tracking;
        let slot = self
            .disks
            .iter()
            .position(|d| d.disk.name == *name)
            .ok_or_else(|| ResyncAllError::NoDisk(name.to_string()))?;
        let (id, size) = (self.disks[slot].id, self.disks[slot].size());
        if size == 0 {
            return Ok(None);
        }
        if matches!(*lock(&t.mode), TrackingMode::Data) {
            let entry = Entry::resync_needed(id, 0, size, now_ns());
            let appended = {
                let mut log = lock(&t.log);
                let appended = log
                    .append(&entry)
                    .and_then(|seq| Ok((seq, log.append(&Entry::barrier(now_ns()))?)));
                t.unwritten.store(log.unwritten_bytes(), Ordering::SeqCst);
                appended
            };
            match appended {
                Ok((seq, barrier)) => {
                    if self.committer.wait_durable(barrier).is_ok() {
                        return Ok(Some(seq));
                    }
                    // The log failed meanwhile: the dirty bitmap holds it.
                }
                Err(e) => t.enter_bitmap_mode(&e),
            }
        }
        {
            let mut maps = lock(&t.maps);
            let bits = &mut maps.dirty[slot];
            for i in bits.extents(0, size) {
                bits.set(i);
            }
        }
        self.committer
            .wait_dirty(self.committer.want_dirty())
            .map_err(|_| ResyncAllError::Dirty)?;
        Ok(None)
    }

    /// Grows disk `name` to the size its backing holds now, while it is
    /// served (the admin grew the image or the device first). In order:
    /// the activity and dirty maps are extended (harmless on their own),
    /// a grow record and a barrier are appended under the log's lock and
    /// made durable, and only then is the new size published to the device
    /// and to new NBD connections: no write beyond the old end can be
    /// recorded before the grow record, and after a crash the log holds
    /// the growth before any such write. Last, the disks file is rewritten
    /// with the new size (a crash before that makes the next start append
    /// a second grow record to the same size, which the shipper and the
    /// replica take as already done). NBD connections keep the size of
    /// their handshake; clients reconnect to see the new one. The kernel
    /// devices the tracker serves are told after this returns
    /// ([`crate::kernel_size::resize`]).
    ///
    /// Refused: a backing smaller than the size served, one that did not
    /// grow, a size the device cannot serve, bitmap mode.
    pub fn resize(&self, name: &str) -> Result<Resized, ResizeError> {
        self.check_running().map_err(|_| ResizeError::Starting)?;
        let _one = self
            .resizing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let t = &*self.tracking;
        let slot = self
            .disks
            .iter()
            .position(|d| d.disk.name == *name)
            .ok_or_else(|| ResizeError::NoDisk(name.to_string()))?;
        let d = &self.disks[slot];
        let disk = d.disk.name.clone();
        let before = d.size();
        let device = d.disk.device.as_ref();
        let size = device
            .backing_size()
            .map_err(|source| ResizeError::Measure {
                disk: disk.clone(),
                source,
            })?;
        if size < before {
            return Err(ResizeError::Shrunk {
                disk,
                size: before,
                backing: size,
            });
        }
        if size == before {
            return Err(ResizeError::Unchanged { disk, size });
        }
        let align = device.raw_access().map_or(1, |raw| raw.align);
        if !size.is_multiple_of(align) {
            return Err(ResizeError::Unaligned { disk, size, align });
        }
        if !matches!(*lock(&t.mode), TrackingMode::Data) {
            return Err(ResizeError::BitmapMode);
        }
        {
            let _persist = lock(&t.persist);
            let mut maps = lock(&t.maps);
            let maps_error = |source| ResizeError::Maps {
                disk: disk.clone(),
                source,
            };
            let act = &mut maps.activity[slot];
            act.map.grow(size).map_err(maps_error)?;
            let n = act.map.len() as usize;
            act.inflight.resize(n, 0);
            act.last_seq.resize(n, Seq::ZERO);
            act.epoch.resize(n, 0);
            act.durable.resize(n, false);
            maps.dirty[slot].grow(size).map_err(maps_error)?;
        }
        // The mode is held while appending, so the record goes in only in
        // data mode (the order `record` takes the locks in).
        let appended = {
            let mode = lock(&t.mode);
            if !matches!(*mode, TrackingMode::Data) {
                return Err(ResizeError::BitmapMode);
            }
            let mut log = lock(&t.log);
            let appended = log
                .append(&Entry::grow(d.id, before, size, now_ns()))
                .and_then(|seq| Ok((seq, log.append(&Entry::barrier(now_ns()))?)));
            t.unwritten.store(log.unwritten_bytes(), Ordering::SeqCst);
            appended
        };
        let (seq, barrier) = match appended {
            Ok(appended) => appended,
            Err(source) => {
                t.enter_bitmap_mode(&source);
                return Err(ResizeError::Append { disk, source });
            }
        };
        self.committer
            .wait_durable(barrier)
            .map_err(|_| ResizeError::NotDurable(disk.clone()))?;
        device.grow_to(size).map_err(|source| ResizeError::Serve {
            disk: disk.clone(),
            source,
        })?;
        d.size.store(size, Ordering::Release);
        tracing::info!(%disk, before, size, seq = seq.get(), "the disk grew while served: the growth is recorded in the change log, new connections see the new size");
        let sources_error = |source| ResizeError::Sources {
            disk: disk.clone(),
            source,
        };
        // The daemon writes the disks file at start; a group opened without
        // one (tests) has nothing to rewrite.
        if let Some(mut sources) =
            tidemark_changelog::read_sources(&self.log_dir).map_err(sources_error)?
        {
            if let Some(source) = sources.iter_mut().find(|s| s.disk.id == d.id) {
                source.disk.size = size;
            }
            tidemark_changelog::write_sources(&self.log_dir, &sources).map_err(sources_error)?;
        }
        Ok(Resized {
            disk,
            id: d.id,
            before,
            size,
            seq,
        })
    }

    /// The disks' names, by slot (the configuration's order).
    pub fn disk_names(&self) -> Vec<Name> {
        self.disks.iter().map(|d| d.disk.name.clone()).collect()
    }

    /// [`record`](Self::record), waiting on the calling thread while the
    /// log's buffer is full. Returns the sequence number ([`Seq::ZERO`] in
    /// bitmap mode).
    fn record_blocking(&self, disk: DiskId, entry: &Entry<'_>) -> Seq {
        loop {
            match self.record(disk, entry) {
                Recorded::Logged(seq) => return seq,
                Recorded::Dirty => return Seq::ZERO,
                Recorded::NoRoom => {
                    self.committer.nudge();
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
    }

    /// One tracked modification on the calling thread, blocking: lock,
    /// mark hot, record, apply, release (the synchronous engine; the event
    /// loops do the same steps without blocking, in `write_path`).
    fn modify(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
        fua: bool,
        apply: impl FnOnce(&dyn BlockDevice) -> Result<(), crate::storage::StorageError>,
        entry: Entry<'_>,
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        self.check_running()
            .map_err(|_| BackendError::Unavailable)?;
        let d = self.served(disk)?;
        self.check_extent(disk, offset, len)?;
        let seq = {
            let range = d.locks.lock(offset, len);
            if let Some(ticket) = self.mark_hot(disk, offset, len) {
                if self.committer.wait_maps(ticket).is_err() {
                    tracing::error!("persisting the activity map failed; failing the write");
                    self.release_hot(disk, offset, len, NEVER_COOLS);
                    drop(range);
                    self.wake_parked();
                    return Err(BackendError::Io(io::Error::other(
                        "persisting the activity map failed",
                    )));
                }
            }
            // Recorded first, then applied: the order of the event loops
            // (see `write_path`, which also says why a failed device write
            // is followed by a resync-needed record).
            let seq = self.record_blocking(disk, &entry);
            if let Err(e) = apply(d.disk.device.as_ref()) {
                let compensation = Entry::resync_needed(disk, offset, len, now_ns());
                self.record_blocking(disk, &compensation);
                // The extent stays hot, so a crash before the compensation
                // is durable re-reads it too.
                self.release_hot(disk, offset, len, NEVER_COOLS);
                drop(range);
                self.wake_parked();
                return Err(BackendError::Device(e));
            }
            self.release_hot(disk, offset, len, seq);
            drop(range);
            // Event-loop requests may be parked on this range.
            self.wake_parked();
            seq
        };
        if fua {
            self.barrier(disk)?;
        }
        // An open hold keeps the acknowledgement (see `write_path`); a hold
        // always ends by its deadline, and holds are rare: this blocking
        // path polls rather than parks.
        if self.held_back(seq) {
            self.count_gated();
            while self.held_back(seq) {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let bytes = if entry.kind == tidemark_changelog::Kind::Write {
            len
        } else {
            0
        };
        self.count_write(started, Instant::now(), bytes);
        Ok(())
    }
}

impl Tracking {
    /// The log's unwritten bytes (see [`ChangeLog::unwritten_bytes`]).
    pub(crate) fn unwritten_bytes(&self) -> usize {
        self.unwritten.load(Ordering::SeqCst)
    }

    /// One step of the log's I/O for the committer: takes it under the
    /// log's lock, runs it without.
    pub(crate) fn log_step(&self, sync_target: Option<Seq>) -> LogStep {
        let (io, durable_before) = {
            let mut log = lock(&self.log);
            (log.take_io(sync_target, true), log.durable_seq())
        };
        let Some(mut io) = io else {
            return LogStep::Idle;
        };
        let result = io.run();
        let mut log = lock(&self.log);
        let outcome = log.complete_io(io, result);
        self.unwritten
            .store(log.unwritten_bytes(), Ordering::SeqCst);
        let (durable, watermark) = (log.durable_seq(), log.durable_watermark());
        drop(log);
        match outcome {
            Ok(()) if durable > durable_before => LogStep::Synced { durable, watermark },
            Ok(()) => LogStep::Wrote,
            Err(e) => {
                self.log_failed(&e);
                LogStep::Failed
            }
        }
    }

    /// The log failed: bitmap mode, and every hot extent, which may hold
    /// records the log lost, set in the dirty bitmap and persisted.
    fn log_failed(&self, cause: &AppendError) {
        tracing::error!(error = %cause, "the change log failed");
        self.enter_bitmap_mode(cause);
        {
            let mut maps = lock(&self.maps);
            let Maps { activity, dirty } = &mut *maps;
            for (act, bits) in activity.iter().zip(dirty.iter_mut()) {
                let granularity = act.map.granularity();
                for i in 0..act.map.len() {
                    if act.map.get(i) {
                        for d in bits.extents(i * granularity, granularity) {
                            bits.set(d);
                        }
                    }
                }
            }
        }
        if let Err(e) = self.persist_dirty() {
            tracing::error!(error = %e, "persisting the dirty bitmap after the log failed");
        }
    }

    fn enter_bitmap_mode(&self, cause: &AppendError) {
        let mut mode = lock(&self.mode);
        if let TrackingMode::Bitmap { .. } = *mode {
            return;
        }
        let cause = match cause {
            AppendError::Overflow { limit } => {
                BitmapCause::LogFull(FullAt::Append { limit: *limit })
            }
            other => BitmapCause::LogFailed {
                error: other.to_string(),
            },
        };
        tracing::warn!(reason = %cause, "switching to bitmap mode: writes go on, a checksum resync will follow");
        *mode = TrackingMode::Bitmap {
            cause: cause.clone(),
        };
        drop(mode);
        let mut state = lock(&self.state);
        state.bitmap = Some(cause);
        if let Err(e) = state.save_in_place() {
            tracing::error!(error = %e, "recording bitmap mode in the state file failed");
        }
    }

    /// Writes and syncs the activity maps: every bit set in memory is
    /// durable afterwards (for the committer).
    pub(crate) fn persist_activity(&self) -> Result<(), BitmapError> {
        let _persist = lock(&self.persist);
        let mut work = Vec::new();
        {
            let mut maps = lock(&self.maps);
            for (disk, act) in maps.activity.iter_mut().enumerate() {
                let bytes = act.map.take_unwritten();
                if bytes.is_empty() {
                    continue;
                }
                // Bits being cleared stop counting as durable right now, so
                // no write relies on a bit that is about to be written as
                // zero.
                let mut covered = Vec::new();
                for &(byte, value) in &bytes {
                    for bit in 0..8u64 {
                        let i = byte as u64 * 8 + bit;
                        if i >= act.map.len() {
                            break;
                        }
                        if value & (1 << bit) != 0 {
                            covered.push(i);
                        } else {
                            act.durable[i as usize] = false;
                        }
                    }
                }
                work.push((disk, bytes, act.map.writer()?, covered));
            }
        }
        for (disk, bytes, writer, covered) in work {
            writer.write_bytes(&bytes, true)?;
            let mut maps = lock(&self.maps);
            let act = &mut maps.activity[disk];
            for i in covered {
                if act.map.get(i) {
                    act.durable[i as usize] = true;
                }
            }
        }
        Ok(())
    }

    /// Writes and syncs the dirty bitmaps.
    pub(crate) fn persist_dirty(&self) -> Result<(), BitmapError> {
        let _persist = lock(&self.persist);
        let work: Vec<_> = {
            let mut maps = lock(&self.maps);
            maps.dirty
                .iter_mut()
                .map(|b| Ok((b.take_unwritten(), b.writer()?)))
                .collect::<Result<_, BitmapError>>()?
        };
        for (bytes, writer) in work {
            writer.write_bytes(&bytes, true)?;
        }
        Ok(())
    }

    /// Clears hot extents whose every write is at or below the log's
    /// durable `watermark` (a crash recovery never cuts those) and on the
    /// device (a flush started after the write completed has finished),
    /// and none is in flight. Lazy: the cleared bits reach the disk with
    /// the next map write; a stale set bit only costs a resync.
    pub(crate) fn cool(&self, watermark: Seq) {
        if !matches!(*lock(&self.mode), TrackingMode::Data) {
            return;
        }
        let mut maps = lock(&self.maps);
        for (act, flushes) in maps.activity.iter_mut().zip(&self.flushes) {
            let flushed = flushes.done.load(Ordering::SeqCst);
            for i in 0..act.map.len() {
                let u = i as usize;
                if act.map.get(i)
                    && act.inflight[u] == 0
                    && act.last_seq[u] <= watermark
                    && act.epoch[u] < flushed
                {
                    act.map.clear(i);
                }
            }
        }
    }
}

impl Backend for Group {
    fn disks(&self) -> Vec<ServedDisk> {
        self.disks
            .iter()
            .map(|d| ServedDisk {
                disk: tidemark_changelog::Disk {
                    id: d.id,
                    name: d.disk.name.clone(),
                    size: d.size(),
                },
                export: d.disk.export.clone(),
                description: format!("tidemark protected disk {}", d.disk.name),
                read_only: false,
                block_sizes: self.block_sizes,
            })
            .collect()
    }

    fn multi_conn_safe(&self) -> bool {
        // A barrier syncs the group's one log and the disk's device, which
        // every connection shares: FLUSH covers writes of all connections.
        true
    }

    fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let d = self.served(disk)?;
        Ok(d.disk.device.read_at(buf, offset)?)
    }

    fn write(&self, disk: DiskId, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        let entry = Entry::write(disk, offset, data, now_ns());
        self.modify(
            disk,
            offset,
            data.len() as u64,
            fua,
            |dev| dev.write_at(data, offset),
            entry,
        )
    }

    fn write_zeroes(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let entry = Entry::write_zeroes(disk, offset, length, no_hole, now_ns());
        self.modify(
            disk,
            offset,
            length,
            fua,
            |dev| dev.write_zeroes(offset, length),
            entry,
        )
    }

    fn trim(&self, disk: DiskId, offset: u64, length: u64, fua: bool) -> Result<(), BackendError> {
        let entry = Entry::trim(disk, offset, length, now_ns());
        self.modify(
            disk,
            offset,
            length,
            fua,
            |dev| dev.trim(offset, length),
            entry,
        )
    }

    fn flush(&self, disk: DiskId) -> Result<(), BackendError> {
        self.served(disk)?;
        self.barrier(disk)
    }

    /// Holes of an image file, found with `SEEK_DATA`/`SEEK_HOLE`
    /// ([`tidemark_durable::allocation_runs`]); a block device (or memory)
    /// is all data: the kernel reports no holes in a block device, and
    /// nothing cheaper than reading tells which of its ranges read as
    /// zeroes.
    ///
    /// Writes in flight need no range lock here. The rule relied on: a
    /// write, write-zeroes or trim is acknowledged only after its device
    /// operation completed (DESIGN invariant 1), and a completed `pwrite`
    /// (buffered or direct) or `fallocate` is visible to `lseek` at once.
    /// So every change acknowledged before this call is reported as it is;
    /// a change still in flight may be reported before or after, exactly
    /// as a read racing it may return either bytes.
    fn allocation(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Allocation>, BackendError> {
        let d = self.served(disk)?;
        let device = d.disk.device.as_ref();
        let raw = device.raw_access().filter(|_| device.supports_holes());
        let Some(raw) = raw else {
            return Ok(all_data(disk, offset, length));
        };
        let runs = tidemark_durable::allocation_runs(raw.fd, offset, length, MAX_ALLOCATION_RUNS)
            .map_err(BackendError::Io)?;
        Ok(from_runs(disk, runs))
    }
}

/// The name of disk `id` among `states`, for an error.
fn names_by_id(states: &[DiskState], id: DiskId) -> Name {
    states
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.disk.name.clone())
        .unwrap_or_else(|| Name::from_static("unknown"))
}

/// Most runs one allocation answer reports: a client asks again from where
/// the answer ends, and one `lseek` pair per run keeps a fragmented file's
/// answer short.
const MAX_ALLOCATION_RUNS: usize = 1024;

impl Group {
    /// The disk `disk` as a backend request names it.
    fn served(&self, disk: DiskId) -> Result<&DiskState, BackendError> {
        self.disks
            .get(self.slot(disk))
            .ok_or(BackendError::NoSuchDisk(disk))
    }
}
