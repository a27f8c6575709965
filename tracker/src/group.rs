//! A consistency group: the disks one tracker serves and the ONE ordered
//! change log they share. This is the tracker's write path; the NBD server
//! drives it through [`Backend`].
//!
//! A write, step by step (DESIGN invariants 1–8):
//! 1. its byte range is locked, so overlapping writes in flight reach the
//!    device in log order (invariant 6);
//! 2. its extent is made hot in the activity map, durably, before anything
//!    is issued (invariant 4);
//! 3. the backing device is written;
//! 4. the record is appended to the log (data mode), or the extent is set
//!    in the dirty bitmap (bitmap mode: the log is full or failed);
//! 5. the range is unlocked and the write acknowledged. Its sequence number
//!    was taken after every write acknowledged before it was submitted
//!    (invariant 2).
//!
//! FLUSH and FUA are barriers: a barrier record is appended, the log made
//! durable with one fdatasync shared by every flush waiting at the time
//! (group commit), then the backing device flushed.
//!
//! After an unclean stop the group starts a new *generation* above every
//! sequence number a reader could have seen, and records every hot extent
//! of the activity map as resync-needed: those may hold writes the log lost.
//! What the log's recovery may cut follows from the state file (see
//! [`tidemark_changelog::log`]): after a clean stop nothing, any damage
//! refuses the open; after an unclean one a torn tail above the durable
//! watermark, which is why an extent cools only once the watermark covers
//! its writes.

use crate::backend::Backend;
use crate::bitmap::{BitmapError, BitmapWriter, PersistentBitmap};
use crate::nbd::constants::{Errno, ExtentStatus, TransmissionFlags};
use crate::nbd::export::{BlockSizes, ExportInfo};
use crate::nbd::transmission::Extent;
use crate::range_lock::RangeLock;
use crate::state::{GroupState, StateError};
use crate::storage::BlockDevice;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tidemark_changelog::{
    now_ns, AppendError, ChangeLog, Entry, FsDir, LogOptions, OpenError, Recovery, RecoveryPolicy,
};
use tidemark_config::ByteSize;
use tidemark_metrics::{Histogram, HistogramSnapshot, LATENCY_BUCKETS};
use tidemark_names::{Label, Name};

/// How bitmap-mode reasons caused by the log's size limit begin: only
/// those return to data mode by themselves.
const OVERFLOW_REASON: &str = "the change log reached its size limit";

fn is_overflow_reason(reason: &str) -> bool {
    reason.starts_with(OVERFLOW_REASON)
}

/// Granularity of the dirty bitmap used in bitmap mode.
pub const DIRTY_GRANULARITY: u64 = 64 << 10;
/// How often hot extents are cooled at most.
const COOL_INTERVAL: Duration = Duration::from_secs(1);

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
        reason: String,
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
    pub resync_needed: Vec<(u32, u64, u64)>,
}

/// A point-in-time view for `status`.
#[derive(Debug, Clone)]
pub struct GroupStatus {
    /// Tracking mode.
    pub mode: TrackingMode,
    /// Current generation.
    pub generation: u32,
    /// Next sequence number to be assigned.
    pub next_seq: u64,
    /// Highest sequence number durable in the log.
    pub durable_seq: u64,
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

struct DiskState {
    disk: GroupDisk,
    size: u64,
    locks: RangeLock,
}

/// Per-extent bookkeeping of the activity map.
struct Activity {
    map: PersistentBitmap,
    inflight: Vec<u32>,
    last_seq: Vec<u64>,
    /// The bit is known to be set on disk.
    durable: Vec<bool>,
}

struct Maps {
    activity: Vec<Activity>,
    dirty: Vec<PersistentBitmap>,
    last_cool: Instant,
}

struct Commit {
    durable: u64,
    syncing: bool,
}

/// The consistency group.
pub struct Group {
    disks: Vec<DiskState>,
    log: Mutex<ChangeLog<FsDir>>,
    mode: Mutex<TrackingMode>,
    /// A new generation (number, first sequence number) to begin in the log
    /// when data mode returns.
    pending_generation: Mutex<Option<(u32, u64)>>,
    maps: Mutex<Maps>,
    /// Serializes writing map bytes and their fdatasync.
    persist: Mutex<()>,
    commit: Mutex<Commit>,
    committed: Condvar,
    state: Mutex<GroupState>,
    /// The state file says "running": only then may anything be appended
    /// (see [`Group::mark_running`]).
    running: AtomicBool,
    block_sizes: BlockSizes,
    writes: AtomicU64,
    barriers: AtomicU64,
    bytes_written: AtomicU64,
    /// Time from a modifying request's arrival to its acknowledgement.
    write_latency: Histogram,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before anything
    // that can panic, so a poisoned lock's data is still good.
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        state.check_disks(&names).map_err(GroupError::Config)?;
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
                first_cut = cut.first_seq,
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
        for d in disks {
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
                last_seq: vec![0; n],
                durable,
            });
            let (bits, _) = PersistentBitmap::open(
                &opts.log_dir.join(format!("dirty-{}.map", d.name)),
                DIRTY_GRANULARITY,
                size,
            )?;
            dirty.push(bits);
            states.push(DiskState {
                disk: d,
                size,
                locks: RangeLock::new(),
            });
        }

        let unclean = state.running || opts.resync_all;
        let mut mode = match &state.bitmap_reason {
            Some(reason) => TrackingMode::Bitmap {
                reason: reason.clone(),
            },
            None => TrackingMode::Data,
        };
        let mut resync_needed = Vec::new();
        let mut generation = state.generation.max(recovery.generation);
        // A generation recorded in the state file but not yet begun in the
        // log (the log was full): begun when data mode returns.
        let mut pending_generation = (state.generation > recovery.generation)
            .then_some((state.generation, recovery.max_exposed_seq + 1));
        if unclean {
            generation += 1;
            match log.begin_generation(generation, recovery.max_exposed_seq + 1, now_ns()) {
                Ok(()) => {}
                // No room even for a new segment: the log takes no data now.
                // The generation is recorded in the state file and begun
                // in the log when data mode returns.
                Err(AppendError::Overflow { .. }) => {
                    pending_generation = Some((generation, recovery.max_exposed_seq + 1));
                    if mode == TrackingMode::Data {
                        mode = TrackingMode::Bitmap {
                            reason: format!(
                                "{OVERFLOW_REASON} when restarting after an unclean stop"
                            ),
                        };
                    }
                }
                Err(e) => return Err(GroupError::Append(e)),
            }
            for (id, (act, disk)) in activity.iter().zip(&states).enumerate() {
                if opts.resync_all {
                    if disk.size > 0 {
                        resync_needed.push((id as u32, 0, disk.size));
                    }
                    continue;
                }
                for (offset, length) in act.map.ranges(disk.size) {
                    resync_needed.push((id as u32, offset, length));
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
                            reason: format!("{OVERFLOW_REASON} when recording an unclean stop"),
                        }
                    }
                    Err(e) => return Err(GroupError::Append(e)),
                }
            }
            if let TrackingMode::Bitmap { .. } = mode {
                for &(disk, offset, length) in &resync_needed {
                    let bits = &mut dirty[disk as usize];
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
        state.generation = generation.max(log.generation());
        // An unclean stop is fully recorded by now: until the daemon has
        // every socket and calls `mark_running`, a stop is a clean one.
        state.running = false;
        state.last_seq = None;
        state.bitmap_reason = match &mode {
            TrackingMode::Bitmap { reason } => Some(reason.clone()),
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
        };
        let group = Group {
            disks: states,
            log: Mutex::new(log),
            mode: Mutex::new(mode),
            pending_generation: Mutex::new(pending_generation),
            maps: Mutex::new(Maps {
                activity,
                dirty,
                last_cool: Instant::now(),
            }),
            persist: Mutex::new(()),
            commit: Mutex::new(Commit {
                durable,
                syncing: false,
            }),
            committed: Condvar::new(),
            state: Mutex::new(state),
            running: AtomicBool::new(false),
            block_sizes,
            writes: AtomicU64::new(0),
            barriers: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            write_latency: Histogram::new(LATENCY_BUCKETS),
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
        let mut state = lock(&self.state);
        state.running = true;
        state.save_in_place()?;
        self.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Refuses a change before [`mark_running`](Self::mark_running).
    fn check_running(&self) -> Result<(), Errno> {
        if self.running.load(Ordering::Acquire) {
            Ok(())
        } else {
            tracing::error!("a change reached the group before it was marked running; refused");
            Err(Errno::Io)
        }
    }

    fn disk(&self, disk: u32) -> Result<&DiskState, Errno> {
        self.disks.get(disk as usize).ok_or(Errno::Inval)
    }

    /// Makes the extents of `offset..offset+len` hot, durably, and counts
    /// the request in flight on them.
    fn mark_hot(&self, disk: u32, offset: u64, len: u64) -> Result<(), Errno> {
        let needs_persist = {
            let mut maps = lock(&self.maps);
            let act = &mut maps.activity[disk as usize];
            let mut needs = false;
            for i in act.map.extents(offset, len) {
                act.inflight[i as usize] += 1;
                act.map.set(i);
                needs |= !act.durable[i as usize];
            }
            needs
        };
        if needs_persist {
            self.persist_activity(disk, offset, len)?;
        }
        Ok(())
    }

    /// Writes and syncs the activity map until the extents of the range
    /// are durable. Concurrent callers share one sync.
    fn persist_activity(&self, disk: u32, offset: u64, len: u64) -> Result<(), Errno> {
        let _persist = lock(&self.persist);
        let (bytes, writer, covered) = {
            let mut maps = lock(&self.maps);
            let act = &mut maps.activity[disk as usize];
            if act
                .map
                .extents(offset, len)
                .all(|i| act.durable[i as usize])
            {
                return Ok(());
            }
            let bytes = act.map.take_unwritten();
            // Bits being cleared stop counting as durable right now, so no
            // write relies on a bit that is about to be written as zero.
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
            (bytes, act.map.writer().map_err(|_| Errno::Io)?, covered)
        };
        if let Err(e) = writer.write_bytes(&bytes, true) {
            tracing::error!(error = %e, "persisting the activity map failed; failing the write");
            return Err(Errno::Io);
        }
        let mut maps = lock(&self.maps);
        let act = &mut maps.activity[disk as usize];
        for i in covered {
            if act.map.get(i) {
                act.durable[i as usize] = true;
            }
        }
        Ok(())
    }

    fn release_hot(&self, disk: u32, offset: u64, len: u64, seq: u64) {
        let mut maps = lock(&self.maps);
        let act = &mut maps.activity[disk as usize];
        for i in act.map.extents(offset, len) {
            act.inflight[i as usize] -= 1;
            act.last_seq[i as usize] = act.last_seq[i as usize].max(seq);
        }
    }

    /// Clears hot extents whose every write is at or below the log's
    /// durable watermark (recovery never cuts those) and none is in flight.
    /// Lazy: the cleared bits reach the disk with the next map write; a
    /// stale set bit only costs a resync.
    fn cool(&self, watermark: u64) {
        if !matches!(*lock(&self.mode), TrackingMode::Data) {
            return;
        }
        let mut maps = lock(&self.maps);
        if maps.last_cool.elapsed() < COOL_INTERVAL {
            return;
        }
        maps.last_cool = Instant::now();
        for act in &mut maps.activity {
            for i in 0..act.map.len() {
                let u = i as usize;
                if act.map.get(i) && act.inflight[u] == 0 && act.last_seq[u] <= watermark {
                    act.map.clear(i);
                }
            }
        }
    }

    /// Records a change: a log record in data mode, dirty bits in bitmap
    /// mode. Returns the record's sequence number (0 in bitmap mode).
    fn track(&self, disk: u32, entry: &Entry<'_>) -> u64 {
        loop {
            let mode = lock(&self.mode);
            if matches!(*mode, TrackingMode::Data) {
                drop(mode);
                let appended = {
                    let mut log = lock(&self.log);
                    let max = log.max_payload();
                    if entry.payload.len() <= max {
                        log.append(entry)
                    } else {
                        // A write larger than a record can carry becomes several
                        // consecutive records under one lock: nothing can come
                        // between them, and a barrier never splits them.
                        entry
                            .payload
                            .chunks(max)
                            .enumerate()
                            .try_fold(0, |_, (i, chunk)| {
                                let offset = entry.offset + (i * max) as u64;
                                log.append(&Entry::write(disk, offset, chunk, entry.timestamp_ns))
                            })
                    }
                };
                match appended {
                    Ok(seq) => return seq,
                    Err(e) => {
                        self.enter_bitmap_mode(&e);
                        continue;
                    }
                }
            }
            // The mode lock is held while the bits are set, so a return to
            // data mode (which takes the bits under the same lock) cannot
            // miss them.
            let mut maps = lock(&self.maps);
            let bits = &mut maps.dirty[disk as usize];
            for i in bits.extents(entry.offset, entry.length) {
                bits.set(i);
            }
            return 0;
        }
    }

    /// Returns from bitmap mode to data mode when bitmap mode came from the
    /// log's size limit and the log has room again (the shipper moved the
    /// cursor, segments were recycled): a new generation begins in the log
    /// if one is pending, every dirty extent becomes a resync-needed record,
    /// a barrier makes them durable, and the dirty bitmap is cleared. Writes
    /// wait for this (it is rare and short). Returns the number of extents
    /// recorded, or `None` if the group stays as it is.
    pub fn try_resume_data_mode(&self) -> Result<Option<usize>, String> {
        if !self.running.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut mode = lock(&self.mode);
        match &*mode {
            TrackingMode::Data => return Ok(None),
            TrackingMode::Bitmap { reason } if !is_overflow_reason(reason) => return Ok(None),
            TrackingMode::Bitmap { .. } => {}
        }
        let mut maps = lock(&self.maps);
        let mut log = lock(&self.log);
        // Only with room for real work: half the log free, so the group
        // does not flap between the modes.
        match log.free_bytes() {
            Ok(free) if free >= log.options().size_limit / 2 => {}
            Ok(_) => return Ok(None),
            Err(e) => return Err(format!("reading the log's cursor: {e}")),
        }
        let now = now_ns();
        let mut pending = lock(&self.pending_generation);
        if let Some((generation, first_seq)) = *pending {
            let first_seq = first_seq.max(log.next_seq());
            match log.begin_generation(generation, first_seq, now) {
                Ok(()) => *pending = None,
                Err(AppendError::Overflow { .. }) => return Ok(None),
                Err(e) => return Err(format!("starting generation {generation}: {e}")),
            }
        }
        drop(pending);
        let mut extents = Vec::new();
        for (id, (bits, disk)) in maps.dirty.iter().zip(&self.disks).enumerate() {
            for (offset, length) in bits.ranges(disk.size) {
                extents.push((id as u32, offset, length));
            }
        }
        for &(disk, offset, length) in &extents {
            match log.append(&Entry::resync_needed(disk, offset, length, now)) {
                Ok(_) => {}
                // Records appended so far only ask for a resync of extents
                // that are dirty anyway; the bits stay set.
                Err(AppendError::Overflow { .. }) => return Ok(None),
                Err(e) => return Err(format!("recording resync-needed extents: {e}")),
            }
        }
        match log.barrier(now).and_then(|_| log.sync()) {
            Ok(_) => {}
            Err(AppendError::Overflow { .. }) => return Ok(None),
            Err(e) => return Err(format!("making resync-needed extents durable: {e}")),
        }
        drop(log);
        for bits in &mut maps.dirty {
            bits.clear_all();
            let bytes = bits.take_unwritten();
            bits.writer()
                .and_then(|w| w.write_bytes(&bytes, true))
                .map_err(|e| format!("clearing the dirty bitmap: {e}"))?;
        }
        *mode = TrackingMode::Data;
        drop(maps);
        drop(mode);
        let mut state = lock(&self.state);
        state.bitmap_reason = None;
        state
            .save_in_place()
            .map_err(|e| format!("recording data mode in the state file: {e}"))?;
        Ok(Some(extents.len()))
    }

    fn enter_bitmap_mode(&self, cause: &AppendError) {
        let mut mode = lock(&self.mode);
        if let TrackingMode::Bitmap { .. } = *mode {
            return;
        }
        let reason = match cause {
            AppendError::Overflow { limit } => {
                format!("{OVERFLOW_REASON} of {limit} bytes")
            }
            other => format!("the change log failed: {other}"),
        };
        tracing::warn!(%reason, "switching to bitmap mode: writes go on, a checksum resync will follow");
        *mode = TrackingMode::Bitmap {
            reason: reason.clone(),
        };
        drop(mode);
        let mut state = lock(&self.state);
        state.bitmap_reason = Some(reason);
        if let Err(e) = state.save_in_place() {
            tracing::error!(error = %e, "recording bitmap mode in the state file failed");
        }
    }

    /// Makes the log durable up to `target` (group commit): one fdatasync
    /// serves every caller waiting when it starts.
    fn make_durable(&self, target: u64) -> Result<(), AppendError> {
        let mut commit = lock(&self.commit);
        loop {
            if commit.durable >= target {
                return Ok(());
            }
            if !commit.syncing {
                commit.syncing = true;
                drop(commit);
                let pending = lock(&self.log).prepare_sync();
                // The durable seq, and the watermark the log holds durably:
                // hot extents cool only up to the watermark, so every
                // record a crash recovery may cut (those above it) still
                // has its extent in the activity map.
                let result = match pending {
                    Ok(Some(sync)) => {
                        let outcome = sync.run();
                        let mut log = lock(&self.log);
                        log.complete_sync(sync.upto(), outcome)
                            .map(|durable| (durable, log.durable_watermark()))
                    }
                    Ok(None) => {
                        let log = lock(&self.log);
                        Ok((log.durable_seq(), log.durable_watermark()))
                    }
                    Err(e) => Err(e),
                };
                commit = lock(&self.commit);
                commit.syncing = false;
                self.committed.notify_all();
                match result {
                    Ok((durable, watermark)) => {
                        commit.durable = commit.durable.max(durable);
                        drop(commit);
                        self.cool(watermark);
                        commit = lock(&self.commit);
                    }
                    Err(e) => return Err(e),
                }
                continue;
            }
            commit = self
                .committed
                .wait(commit)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// A barrier for the group; flushes `disk`'s backing device.
    fn barrier(&self, disk: u32) -> Result<(), Errno> {
        self.check_running()?;
        let d = self.disk(disk)?;
        if matches!(*lock(&self.mode), TrackingMode::Data) {
            let appended = lock(&self.log).append(&Entry::barrier(now_ns()));
            match appended.and_then(|seq| self.make_durable(seq)) {
                Ok(()) => {}
                Err(e) => self.enter_bitmap_mode(&e),
            }
        }
        if !matches!(*lock(&self.mode), TrackingMode::Data) {
            self.persist_dirty().map_err(|_| Errno::Io)?;
        }
        d.disk
            .device
            .flush()
            .map_err(|e| Errno::from_code(e.errno()).unwrap_or(Errno::Io))?;
        self.barriers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn persist_dirty(&self) -> Result<(), BitmapError> {
        let _persist = lock(&self.persist);
        let work: Vec<(Vec<(usize, u8)>, BitmapWriter)> = {
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

    /// Inserts a labelled marker followed by a barrier; returns the
    /// marker's sequence number.
    pub fn marker(&self, label: &Label, app_consistent: bool) -> Result<u64, String> {
        self.check_running()
            .map_err(|_| "the tracker is still starting".to_string())?;
        if !matches!(*lock(&self.mode), TrackingMode::Data) {
            return Err(
                "the group is in bitmap mode: no recovery point can be marked until a resync"
                    .into(),
            );
        }
        let entry = Entry::marker(label.as_str(), app_consistent, now_ns());
        entry
            .validate()
            .map_err(|e| format!("invalid label: {e}"))?;
        let seq = lock(&self.log).append(&entry).map_err(|e| e.to_string())?;
        let barrier = lock(&self.log)
            .append(&Entry::barrier(now_ns()))
            .map_err(|e| e.to_string())?;
        self.make_durable(barrier).map_err(|e| e.to_string())?;
        Ok(seq)
    }

    /// A final barrier on every disk, then a clean stop recorded: the next
    /// open needs no resync.
    pub fn close_clean(&self) -> Result<(), String> {
        if !self.running.load(Ordering::Acquire) {
            // Nothing was served: the state file already says stopped.
            return Ok(());
        }
        for id in 0..self.disks.len() as u32 {
            self.barrier(id)
                .map_err(|e| format!("final barrier: {e:?}"))?;
        }
        {
            let _persist = lock(&self.persist);
            let mut maps = lock(&self.maps);
            if matches!(*lock(&self.mode), TrackingMode::Data) {
                for act in &mut maps.activity {
                    act.map.clear_all();
                }
            }
            for act in &mut maps.activity {
                let bytes = act.map.take_unwritten();
                act.map
                    .writer()
                    .and_then(|w| w.write_bytes(&bytes, true))
                    .map_err(|e| e.to_string())?;
            }
        }
        self.persist_dirty().map_err(|e| e.to_string())?;
        let last_seq = lock(&self.log).durable_seq();
        let mut state = lock(&self.state);
        state.running = false;
        state.last_seq = Some(last_seq);
        state.save_in_place().map_err(|e| e.to_string())
    }

    /// The group's state, for `status`.
    pub fn status(&self) -> GroupStatus {
        let (next_seq, durable_seq, log_bytes, log_limit, generation) = {
            let log = lock(&self.log);
            (
                log.next_seq(),
                log.durable_seq(),
                log.bytes_in_use(),
                log.options().size_limit,
                log.generation(),
            )
        };
        let maps = lock(&self.maps);
        GroupStatus {
            mode: lock(&self.mode).clone(),
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

    /// Sizes of the disks in bytes, by id.
    pub fn disk_sizes(&self) -> Vec<u64> {
        self.disks.iter().map(|d| d.size).collect()
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
    pub fn record_resync_all(&self, name: &str) -> Result<Option<u64>, String> {
        self.check_running()
            .map_err(|_| "the tracker is still starting".to_string())?;
        let id = self
            .disks
            .iter()
            .position(|d| d.disk.name == *name)
            .ok_or_else(|| format!("no disk {name:?} in this group"))?;
        let size = self.disks[id].size;
        if size == 0 {
            return Ok(None);
        }
        if matches!(*lock(&self.mode), TrackingMode::Data) {
            let entry = Entry::resync_needed(id as u32, 0, size, now_ns());
            let appended = {
                let mut log = lock(&self.log);
                log.append(&entry)
                    .and_then(|seq| Ok((seq, log.append(&Entry::barrier(now_ns()))?)))
            }
            .and_then(|(seq, barrier)| self.make_durable(barrier).map(|()| seq));
            match appended {
                Ok(seq) => return Ok(Some(seq)),
                Err(e) => self.enter_bitmap_mode(&e),
            }
        }
        {
            let mut maps = lock(&self.maps);
            let bits = &mut maps.dirty[id];
            for i in bits.extents(0, size) {
                bits.set(i);
            }
        }
        self.persist_dirty()
            .map_err(|e| format!("recording the disk in the dirty bitmap: {e}"))?;
        Ok(None)
    }

    /// The disks' names, by id.
    pub fn disk_names(&self) -> Vec<Name> {
        self.disks.iter().map(|d| d.disk.name.clone()).collect()
    }

    /// One tracked modification: lock, mark hot, apply, record, release.
    fn modify(
        &self,
        disk: u32,
        offset: u64,
        len: u64,
        fua: bool,
        apply: impl FnOnce(&dyn BlockDevice) -> Result<(), crate::storage::StorageError>,
        entry: Entry<'_>,
    ) -> Result<(), Errno> {
        let started = Instant::now();
        self.check_running()?;
        let d = self.disk(disk)?;
        {
            let _range = d.locks.lock(offset, len);
            self.mark_hot(disk, offset, len)?;
            if let Err(e) = apply(d.disk.device.as_ref()) {
                // Nothing was recorded: the write failed and is reported so.
                // The extent stays hot, so a resync re-reads it after a crash.
                self.release_hot(disk, offset, len, u64::MAX);
                return Err(Errno::from_code(e.errno()).unwrap_or(Errno::Io));
            }
            let seq = self.track(disk, &entry);
            self.release_hot(disk, offset, len, seq);
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.barrier(disk)?;
        }
        // Atomic buckets: no lock is taken in the I/O path.
        self.write_latency.observe(started.elapsed());
        Ok(())
    }
}

impl Backend for Group {
    fn exports(&self) -> Vec<ExportInfo> {
        self.disks
            .iter()
            .map(|d| ExportInfo {
                name: d.disk.export.clone(),
                description: format!("tidemark protected disk {}", d.disk.name),
                size: d.size,
                flags: TransmissionFlags::HAS_FLAGS
                    | TransmissionFlags::SEND_FLUSH
                    | TransmissionFlags::SEND_FUA
                    | TransmissionFlags::SEND_TRIM
                    | TransmissionFlags::SEND_WRITE_ZEROES
                    | TransmissionFlags::CAN_MULTI_CONN,
                block_sizes: self.block_sizes,
            })
            .collect()
    }

    fn multi_conn_safe(&self) -> bool {
        // A barrier syncs the group's one log and the disk's device, which
        // every connection shares: FLUSH covers writes of all connections.
        true
    }

    fn read(&self, disk: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let d = self.disk(disk)?;
        d.disk
            .device
            .read_at(buf, offset)
            .map_err(|e| Errno::from_code(e.errno()).unwrap_or(Errno::Io))
    }

    fn write(&self, disk: u32, offset: u64, data: &[u8], fua: bool) -> Result<(), Errno> {
        let entry = Entry::write(disk, offset, data, now_ns());
        self.modify(
            disk,
            offset,
            data.len() as u64,
            fua,
            |dev| dev.write_at(data, offset),
            entry,
        )?;
        self.bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn write_zeroes(
        &self,
        disk: u32,
        offset: u64,
        length: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), Errno> {
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

    fn trim(&self, disk: u32, offset: u64, length: u64, fua: bool) -> Result<(), Errno> {
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

    fn flush(&self, disk: u32) -> Result<(), Errno> {
        self.barrier(disk)
    }

    fn block_status(&self, disk: u32, _offset: u64, length: u32) -> Result<Vec<Extent>, Errno> {
        self.disk(disk)?;
        Ok(vec![Extent {
            length,
            status: ExtentStatus::EMPTY,
        }])
    }
}
