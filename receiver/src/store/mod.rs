//! The replica store of one host's consistency group: the replica images,
//! the ordered and idempotent apply of change-log records to them, initial
//! sync and checksum resync, and crash recovery.
//!
//! # Apply rules
//!
//! Records are applied strictly in order with the rules of `tidemark log
//! replay` (`tidemark_changelog::replay::apply` does the dispatch): a write
//! writes its payload, write-zeroes and trim make the extent read as zeroes
//! (a punched hole; a zeroed, still allocated range for write-zeroes with
//! no-hole), barriers and markers change no data. A record whose `seq` is at
//! or below the last applied one is a duplicate and ignored; the next record
//! must be `seq + 1` of the same generation or belong to a newer generation
//! (which may skip sequence numbers). Anything else is refused before
//! anything changes.
//!
//! # Modes
//!
//! - **initial sync** (a new group, or one that got a new disk): chunks and
//!   records are applied in place. A resync-needed record lowers the disk's
//!   `synced` offset to the extent, so the initial sync copies it again. The
//!   group is consistent once every disk is copied to its end.
//! - **consistent**: records are applied in place. A crash may leave records
//!   past the committed position in the images; re-applying the records
//!   after the position, in order, gives the right result, because applying
//!   a write or a zeroing again in order is idempotent.
//! - **resyncing** (after a resync-needed record of a consistent group): the
//!   images keep the last consistent state. Every change, records and resync
//!   chunks alike, is appended to the redo journal instead, and reads
//!   ([`ReplicaGroup::digests`]) see images + journal. When the last pending
//!   extent is done, [`ReplicaGroup::commit`] commits the journal, applies it
//!   to the images, syncs them and empties the journal; a crash during that
//!   apply is finished (redone) on open.
//!
//! # Layout of the group directory
//!
//! ```text
//!  state          the committed position (below), replaced atomically:
//!                 state.tmp, fdatasync, rename, fsync of the directory
//!  disk-<id>.img  one sparse image per disk, exactly the disk's size
//!  journal        the redo journal (below); empty unless resyncing
//!  lock           flock(2)ed by the process that has the group open
//! ```
//!
//! # State file
//!
//! All integers little-endian.
//!
//! ```text
//!  offset size field
//!       0    4 magic        "TMRS"
//!       4    2 version      1
//!       6    1 mode         0 initial-sync, 1 consistent, 2 resyncing
//!       7    1 flags        bit 0 redo: apply the committed journal to the
//!                           images; bit 1 the last-barrier fields are set
//!       8    8 durable-seq  last record whose effect is committed
//!      16    4 generation   generation of that record
//!      20    4 disk-count   n
//!      24    8 barrier-seq  last barrier applied (if flag bit 1)
//!      32    8 barrier-ts   its timestamp, ns since the Unix epoch
//!      40    8 journal-len  bytes of the journal that are committed
//!      48    … n disks, sorted by id, each:
//!                 4 id, 4 name-len (<= 1024), 8 size, 8 synced,
//!                 4 pending-count m, name (UTF-8),
//!                 m pending extents: 8 start, 8 end (sorted, disjoint)
//!    end-4   4 crc32c       over every byte before it
//! ```
//!
//! # Journal
//!
//! A sequence of entries from offset 0; the first `journal-len` bytes (per
//! the state file) are committed and end with a commit mark, anything after
//! them is an uncommitted (possibly torn) tail and is cut off on open.
//!
//! ```text
//!  offset size field
//!       0    4 magic        "TMJE"
//!       4    1 version      1
//!       5    1 kind         1 data, 2 zero, 3 commit mark
//!       6    2 flags        bit 1 no-hole (zero only)
//!       8    4 disk         (commit mark: generation)
//!      12    4 payload-len  data: == length, at most 64 MiB; else 0
//!      16    8 offset       byte offset on the disk (commit mark: seq)
//!      24    8 length       bytes of the disk covered (commit mark: 0)
//!      32    4 reserved     zero
//!      36    4 crc32c       over bytes 0..36, then the payload
//!      40    … payload      data only
//! ```
//!
//! # Durability
//!
//! [`ReplicaGroup::commit`] fdatasyncs the images written in place, then
//! (resyncing) appends a commit mark to the journal and fdatasyncs it, then
//! replaces the state file. Only then is the position durable. Any I/O error
//! poisons the open group ([`StoreError::Poisoned`]): fsync is never retried,
//! and reopening recovers to the last committed position.

mod error;
mod image;
mod journal;
mod overlay;
mod state;

pub use error::StoreError;

use journal::{Journal, Journaled};
use overlay::{Overlay, Source};
use state::{Disk, Meta, Mode, StateFile};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use tidemark_changelog::record::{Kind, Record, FLAG_NO_HOLE};
use tidemark_changelog::replay::{self, ReplaySummary};

const STATE_FILE: &str = "state";
const JOURNAL_FILE: &str = "journal";
const LOCK_FILE: &str = "lock";
const IO_BUF: usize = 1 << 20;

/// A disk of the group, as the shipper announces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Disk id within the group (the `disk` of its records).
    pub id: u32,
    /// The disk's name on the protected host (at most 1 KiB of UTF-8).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
}

/// The group's committed position: what the shipper resumes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Every record up to this sequence number is durably applied.
    pub durable_seq: u64,
    /// The generation of that record.
    pub generation: u32,
    /// Initial-sync progress of each disk, sorted by id.
    pub disks: Vec<DiskSync>,
    /// What the group is doing.
    pub state: GroupState,
}

/// Initial-sync progress of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSync {
    /// Disk id.
    pub id: u32,
    /// The initial sync has copied everything below this byte offset.
    pub synced: u64,
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

/// A byte range of one disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Disk id.
    pub disk: u32,
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
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

/// The replica store of one consistency group, open for writing by this
/// process alone.
#[derive(Debug)]
pub struct ReplicaGroup {
    dir: PathBuf,
    /// Holds the flock; released when the group is dropped.
    _lock: File,
    images: BTreeMap<u32, File>,
    journal: Journal,
    /// Bytes of the journal the state file says are committed.
    journal_committed: u64,
    /// The position including everything applied, committed or not.
    cur: Meta,
    /// The position as of the last commit.
    durable: Meta,
    /// Images written in place since the last commit.
    touched: BTreeSet<u32>,
    /// Something changed since the last commit.
    dirty: bool,
    /// A local I/O error happened; nothing more is done.
    poisoned: bool,
}

fn image_name(id: u32) -> String {
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
            .disks
            .iter()
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
                    .disks
                    .iter()
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

/// Applies what the journal overrides to the images and syncs them.
fn apply_overlays(
    images: &BTreeMap<u32, File>,
    journal: &File,
    overlays: &BTreeMap<u32, Overlay>,
) -> io::Result<()> {
    let mut buf = vec![0u8; IO_BUF];
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
                    let mut at = piece.start;
                    while at < piece.end {
                        let n = (piece.end - at).min(IO_BUF as u64) as usize;
                        journal.read_exact_at(&mut buf[..n], from + (at - piece.start))?;
                        image.write_all_at(&buf[..n], at)?;
                        at += n as u64;
                    }
                }
            }
        }
        image.sync_data()?;
    }
    Ok(())
}

impl ReplicaGroup {
    /// Opens the group in `dir`, creating it on first use, and recovers it
    /// after a crash: an uncommitted journal tail is cut off, a committed
    /// journal whose apply was interrupted is applied again.
    pub fn open(dir: &Path) -> Result<ReplicaGroup, StoreError> {
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io_err("opening", &lock_path))?;
        // SAFETY: flock on a valid, owned descriptor; no memory is passed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Locked(dir.to_path_buf()));
            }
            return Err(io_err("locking", &lock_path)(e));
        }

        let state_path = dir.join(STATE_FILE);
        let state = match state::read_file(&state_path).map_err(io_err("reading", &state_path))? {
            Some(bytes) => StateFile::decode(&bytes).map_err(|reason| StoreError::Damaged {
                path: state_path.clone(),
                reason: reason.into(),
            })?,
            None => {
                let fresh = StateFile {
                    meta: Meta::new(),
                    journal_len: 0,
                    redo: false,
                };
                state::write_atomic(dir, STATE_FILE, &fresh.encode())
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
            let path = dir.join(image_name(d.id));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err("opening the image", &path))?;
            let len = file
                .metadata()
                .map_err(io_err("reading the size of", &path))?
                .len();
            if len != d.size {
                return Err(damaged(
                    &path,
                    format!("image is {len} bytes, disk {} is {} bytes", d.id, d.size),
                ));
            }
            images.insert(d.id, file);
        }

        let journal_path = dir.join(JOURNAL_FILE);
        let jfile = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&journal_path)
            .map_err(io_err("opening", &journal_path))?;
        let jlen = jfile
            .metadata()
            .map_err(io_err("reading the size of", &journal_path))?
            .len();
        if state.meta.mode != Mode::Resyncing && !state.redo && state.journal_len != 0 {
            return Err(damaged(
                &state_path,
                "a committed journal outside a resync".into(),
            ));
        }
        if jlen < state.journal_len {
            return Err(damaged(
                &journal_path,
                format!("{jlen} bytes, {} are committed", state.journal_len),
            ));
        }
        let scanned = journal::scan(&jfile, state.journal_len)
            .map_err(io_err("reading", &journal_path))?
            .map_err(|reason| damaged(&journal_path, reason))?;
        if state.journal_len > 0
            && scanned.last_commit != Some((state.meta.seq, state.meta.generation))
        {
            return Err(damaged(
                &journal_path,
                "the last commit mark does not match the state file".into(),
            ));
        }
        if scanned.overlays.keys().any(|d| !images.contains_key(d)) {
            return Err(damaged(&journal_path, "names an unknown disk".into()));
        }
        if jlen > state.journal_len {
            // The uncommitted tail: records after the position, re-sent by
            // the shipper.
            jfile
                .set_len(state.journal_len)
                .and_then(|()| jfile.sync_data())
                .map_err(io_err("cutting the uncommitted tail of", &journal_path))?;
        }

        let mut journal = Journal {
            file: jfile,
            len: state.journal_len,
            overlays: scanned.overlays,
        };
        let mut journal_committed = state.journal_len;
        if state.redo {
            apply_overlays(&images, &journal.file, &journal.overlays)
                .map_err(io_err("redoing the journal into the images of", dir))?;
            let done = StateFile {
                meta: state.meta.clone(),
                journal_len: 0,
                redo: false,
            };
            state::write_atomic(dir, STATE_FILE, &done.encode())
                .map_err(io_err("writing", &state_path))?;
            journal
                .file
                .set_len(0)
                .and_then(|()| journal.file.sync_data())
                .map_err(io_err("emptying", &journal_path))?;
            journal.len = 0;
            journal.overlays.clear();
            journal_committed = 0;
        }

        Ok(ReplicaGroup {
            dir: dir.to_path_buf(),
            _lock: lock,
            images,
            journal,
            journal_committed,
            cur: state.meta.clone(),
            durable: state.meta,
            touched: BTreeSet::new(),
            dirty: false,
            poisoned: false,
        })
    }

    /// Makes sure the group has these disks: creates a sparse image for each
    /// new one (durably, at once) and checks that a known disk's size and
    /// name did not change. Disks not listed are kept. A new disk puts a
    /// consistent group back into initial sync; a resyncing group refuses
    /// new disks.
    pub fn ensure_disks(&mut self, disks: &[DiskSpec]) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let mut seen = BTreeSet::new();
        let mut new = Vec::new();
        for spec in disks {
            let bad = |reason: String| StoreError::DiskSpec {
                disk: spec.id,
                reason,
            };
            if !seen.insert(spec.id) {
                return Err(bad("listed twice".into()));
            }
            if spec.name.len() > state::MAX_NAME {
                return Err(bad(format!("name longer than {} bytes", state::MAX_NAME)));
            }
            match self.cur.disk(spec.id) {
                Some(d) if d.size != spec.size => {
                    return Err(bad(format!(
                        "size changed from {} to {} bytes",
                        d.size, spec.size
                    )))
                }
                Some(d) if d.name != spec.name => {
                    return Err(bad(format!(
                        "name changed from {:?} to {:?}",
                        d.name, spec.name
                    )))
                }
                Some(_) => {}
                None if self.cur.mode == Mode::Resyncing => {
                    return Err(StoreError::AddWhileResyncing(spec.id))
                }
                None => new.push(spec),
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        for spec in &new {
            let path = self.dir.join(image_name(spec.id));
            // An image left by a crash before its disk was recorded holds
            // nothing committed: start it afresh.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .and_then(|f| {
                    f.set_len(spec.size)?;
                    f.sync_all()?;
                    Ok(f)
                });
            let file = self.poison_on(file.map_err(io_err("creating the image", &path)))?;
            self.images.insert(spec.id, file);
        }
        let synced = state::sync_dir(&self.dir);
        self.poison_on(synced.map_err(io_err("syncing", &self.dir)))?;
        for meta in [&mut self.cur, &mut self.durable] {
            for spec in &new {
                meta.disks.push(Disk {
                    id: spec.id,
                    name: spec.name.clone(),
                    size: spec.size,
                    synced: 0,
                    pending: Default::default(),
                });
                if spec.size > 0 && meta.mode == Mode::Consistent {
                    meta.mode = Mode::InitialSync;
                }
            }
            meta.disks.sort_by_key(|d| d.id);
            settle_initial_sync(meta);
        }
        self.write_state(self.durable.clone(), self.journal_committed, false)
    }

    /// The position as of the last commit.
    pub fn position(&self) -> Position {
        position_of(&self.durable)
    }

    /// Applies the next record of the log (durable at the next commit).
    pub fn apply_record(&mut self, rec: &Record) -> Result<Applied, StoreError> {
        self.check_poisoned()?;
        let h = &rec.header;
        if h.seq <= self.cur.seq {
            return Ok(Applied::Duplicate);
        }
        let next_in_generation = h.generation == self.cur.generation && h.seq == self.cur.seq + 1;
        if !next_in_generation && h.generation <= self.cur.generation {
            return Err(StoreError::SequenceGap {
                expected: self.cur.seq + 1,
                generation: self.cur.generation,
                got: h.seq,
                got_generation: h.generation,
            });
        }
        rec.as_entry()
            .validate()
            .map_err(|source| StoreError::InvalidRecord { seq: h.seq, source })?;
        let reencoded = rec.as_entry().encode_header(h.seq, h.generation);
        if reencoded[52..56] != h.crc.to_le_bytes() {
            return Err(StoreError::ChecksumMismatch { seq: h.seq });
        }
        if !matches!(h.kind, Kind::Barrier | Kind::Marker) {
            self.check_extent(h.disk, h.offset, h.length)?;
        }
        let no_hole = h.flags & FLAG_NO_HOLE != 0;
        let mut summary = ReplaySummary::default();
        match h.kind {
            Kind::Barrier => self.cur.last_barrier = Some((h.seq, h.timestamp_ns)),
            Kind::Marker => {}
            Kind::ResyncNeeded => {
                let mode = self.cur.mode;
                let Some(disk) = self.cur.disk_mut(h.disk) else {
                    return Err(StoreError::UnknownDisk(h.disk));
                };
                match mode {
                    Mode::InitialSync => disk.synced = disk.synced.min(h.offset),
                    Mode::Consistent | Mode::Resyncing => {
                        disk.pending.add(h.offset, h.offset + h.length);
                        self.cur.mode = Mode::Resyncing;
                    }
                }
            }
            Kind::Write | Kind::WriteZeroes | Kind::Trim => {
                let result = if self.cur.mode == Mode::Resyncing {
                    let mut target = Journaled {
                        journal: &mut self.journal,
                        disk: h.disk,
                        no_hole,
                    };
                    replay::apply(rec, h.disk, &mut target, &mut summary)
                } else {
                    let Some(file) = self.images.get(&h.disk) else {
                        return Err(StoreError::UnknownDisk(h.disk));
                    };
                    self.touched.insert(h.disk);
                    let mut target = image::InPlace { file, no_hole };
                    replay::apply(rec, h.disk, &mut target, &mut summary)
                };
                let path = self.dir.clone();
                self.poison_on(result.map_err(io_err("applying a record in", &path)))?;
            }
        }
        self.cur.seq = h.seq;
        self.cur.generation = h.generation;
        self.dirty = true;
        Ok(Applied::Done)
    }

    /// Applies a sync chunk at `offset` of `disk`. An initial-sync chunk is
    /// written in place and, when it continues the copied prefix, advances
    /// the disk's `synced` offset; a resync chunk goes to the journal.
    pub fn apply_chunk(
        &mut self,
        disk: u32,
        offset: u64,
        data: ChunkRef<'_>,
        purpose: Purpose,
    ) -> Result<(), StoreError> {
        self.check_poisoned()?;
        let len = data.len();
        self.check_extent(disk, offset, len)?;
        let path = self.dir.clone();
        match purpose {
            Purpose::InitialSync => {
                if self.cur.mode != Mode::InitialSync {
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
                    ChunkRef::Data(d) => file.write_all_at(d, offset),
                    ChunkRef::Zero(n) => image::zero_range(file, offset, n, false),
                };
                self.poison_on(result.map_err(io_err("applying a chunk in", &path)))?;
                if let Some(d) = self.cur.disk_mut(disk) {
                    if offset <= d.synced && offset + len > d.synced {
                        d.synced = offset + len;
                    }
                }
                settle_initial_sync(&mut self.cur);
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
        disk: u32,
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
                self.read_view(disk, at, &mut buf[..n])
                    .map_err(io_err("reading", &self.dir))?;
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
    pub fn resync_done(&mut self, disk: u32, offset: u64, length: u64) -> Result<(), StoreError> {
        self.check_poisoned()?;
        self.check_extent(disk, offset, length)?;
        if let Some(d) = self.cur.disk_mut(disk) {
            d.pending.remove(offset, offset + length);
        }
        self.dirty = true;
        Ok(())
    }

    /// Makes everything applied so far durable and returns the new
    /// position. When a resync has no pending extent left, the journal is
    /// applied to the images and the group is consistent again.
    pub fn commit(&mut self) -> Result<Position, StoreError> {
        self.check_poisoned()?;
        if !self.dirty {
            return Ok(self.position());
        }
        for id in std::mem::take(&mut self.touched) {
            if let Some(file) = self.images.get(&id) {
                let path = self.dir.join(image_name(id));
                let synced = file.sync_data().map_err(io_err("syncing", &path));
                self.poison_on(synced)?;
            }
        }
        let mut meta = self.cur.clone();
        if meta.mode == Mode::Resyncing {
            let journal_path = self.dir.join(JOURNAL_FILE);
            let marked = self
                .journal
                .commit_mark(meta.seq, meta.generation)
                .and_then(|()| self.journal.file.sync_data())
                .map_err(io_err("committing", &journal_path));
            self.poison_on(marked)?;
            let finished = meta.disks.iter().all(|d| d.pending.is_empty());
            if !finished {
                self.write_state(meta.clone(), self.journal.len, false)?;
                self.journal_committed = self.journal.len;
            } else {
                meta.mode = Mode::Consistent;
                self.write_state(meta.clone(), self.journal.len, true)?;
                self.journal_committed = self.journal.len;
                let applied =
                    apply_overlays(&self.images, &self.journal.file, &self.journal.overlays)
                        .map_err(io_err("applying the journal to the images of", &self.dir));
                self.poison_on(applied)?;
                self.write_state(meta.clone(), 0, false)?;
                self.journal_committed = 0;
                let emptied = self
                    .journal
                    .file
                    .set_len(0)
                    .and_then(|()| self.journal.file.sync_data())
                    .map_err(io_err("emptying", &journal_path));
                self.poison_on(emptied)?;
                self.journal.len = 0;
                self.journal.overlays.clear();
            }
        } else {
            self.write_state(meta.clone(), 0, false)?;
        }
        self.cur = meta.clone();
        self.durable = meta;
        self.dirty = false;
        Ok(self.position())
    }

    /// The image file of `disk`: the last consistent state (while resyncing,
    /// the state before the resync began).
    pub fn image_path(&self, disk: u32) -> Option<PathBuf> {
        self.cur.disk(disk).map(|d| self.dir.join(image_name(d.id)))
    }

    /// The group's disks as last committed, by id.
    pub fn disk_specs(&self) -> Vec<DiskSpec> {
        self.durable
            .disks
            .iter()
            .map(|d| DiskSpec {
                id: d.id,
                name: d.name.clone(),
                size: d.size,
            })
            .collect()
    }

    /// The last barrier as of the last commit: (seq, timestamp in ns).
    pub fn last_barrier(&self) -> Option<(u64, u64)> {
        self.durable.last_barrier
    }

    fn check_poisoned(&self) -> Result<(), StoreError> {
        if self.poisoned {
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

    fn check_extent(&self, disk: u32, offset: u64, length: u64) -> Result<(), StoreError> {
        let d = self.cur.disk(disk).ok_or(StoreError::UnknownDisk(disk))?;
        match offset.checked_add(length) {
            Some(end) if end <= d.size => Ok(()),
            _ => Err(StoreError::OutOfRange {
                disk,
                offset,
                length,
                size: d.size,
            }),
        }
    }

    fn write_state(&mut self, meta: Meta, journal_len: u64, redo: bool) -> Result<(), StoreError> {
        let file = StateFile {
            meta,
            journal_len,
            redo,
        };
        let written = state::write_atomic(&self.dir, STATE_FILE, &file.encode())
            .map_err(io_err("writing the state file in", &self.dir));
        self.poison_on(written)
    }

    /// Reads `buf.len()` bytes at `at` of `disk` as it reads now: the
    /// journal's pieces over the image.
    fn read_view(&self, disk: u32, at: u64, buf: &mut [u8]) -> io::Result<()> {
        let image = self.images.get(&disk).ok_or(io::ErrorKind::NotFound)?;
        let end = at + buf.len() as u64;
        let pieces = self
            .journal
            .overlays
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
                image.read_exact_at(&mut buf[r], pos)?;
            }
            let r = slice(p.start, p.end);
            match p.source {
                Source::Zero { .. } => buf[r].fill(0),
                Source::Journal(from) => self.journal.file.read_exact_at(&mut buf[r], from)?,
            }
            pos = p.end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_changelog::Entry;

    fn rec(entry: &Entry<'_>, seq: u64) -> Record {
        Record::decode(&entry.encode(seq, 0)).unwrap()
    }

    /// A crash after the final commit's redo mark, with the apply to the
    /// images cut short at every piece: reopening finishes it.
    #[test]
    fn an_interrupted_final_apply_is_redone_on_open() {
        for applied_pieces in 0..4 {
            let dir = tempfile::tempdir().unwrap();
            let mut g = ReplicaGroup::open(dir.path()).unwrap();
            g.ensure_disks(&[DiskSpec {
                id: 0,
                name: "a".into(),
                size: 65536,
            }])
            .unwrap();
            g.apply_chunk(0, 0, ChunkRef::Data(&[3u8; 65536]), Purpose::InitialSync)
                .unwrap();
            g.commit().unwrap();
            g.apply_record(&rec(&Entry::resync_needed(0, 0, 4096, 0), 1))
                .unwrap();
            g.apply_record(&rec(&Entry::write(0, 10_000, &[7u8; 3000], 0), 2))
                .unwrap();
            g.apply_record(&rec(&Entry::trim(0, 20_000, 5000, 0), 3))
                .unwrap();
            g.apply_chunk(0, 0, ChunkRef::Data(&[9u8; 4096]), Purpose::Resync)
                .unwrap();
            g.resync_done(0, 0, 4096).unwrap();
            let mut expected = vec![3u8; 65536];
            expected[10_000..13_000].fill(7);
            expected[20_000..25_000].fill(0);
            expected[..4096].fill(9);

            // The first half of the final commit, by hand: commit mark,
            // redo state, then only some of the pieces reach the image.
            let mut meta = g.cur.clone();
            g.journal.commit_mark(meta.seq, meta.generation).unwrap();
            g.journal.file.sync_data().unwrap();
            meta.mode = Mode::Consistent;
            g.write_state(meta, g.journal.len, true).unwrap();
            let mut partial = BTreeMap::new();
            let mut o = Overlay::default();
            for p in g.journal.overlays[&0].all().take(applied_pieces) {
                o.insert(p.start, p.end, p.source);
            }
            partial.insert(0u32, o);
            apply_overlays(&g.images, &g.journal.file, &partial).unwrap();
            assert_eq!(
                std::fs::read(dir.path().join("disk-0.img")).unwrap() == expected,
                applied_pieces >= 3,
                "the crash left a half-applied image"
            );
            drop(g);

            let g = ReplicaGroup::open(dir.path()).unwrap();
            let p = g.position();
            assert_eq!(p.state, GroupState::Consistent);
            assert_eq!(p.durable_seq, 3);
            assert_eq!(
                std::fs::read(dir.path().join("disk-0.img")).unwrap(),
                expected
            );
            assert_eq!(
                std::fs::metadata(dir.path().join(JOURNAL_FILE))
                    .unwrap()
                    .len(),
                0
            );
            drop(g);
            // The redo is itself committed: a second open changes nothing.
            let g = ReplicaGroup::open(dir.path()).unwrap();
            assert_eq!(g.position(), p);
        }
    }
}
