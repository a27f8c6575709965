//! The state file: the group's committed position. Its codec is pure; the
//! atomic replace lives in [`write_atomic`]. The byte layout is documented
//! in the [store module](super).

use super::overlay::RangeSet;
use std::io;
use tidemark_changelog::{DiskId, Seq};
use tidemark_durable::{replace, Durability, LogDir, LogFile};
use tidemark_names::Name;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

const MAGIC: [u8; 4] = *b"TMRS";
/// The newest version this release writes and reads (the store's version:
/// see the [store module](super)). A group whose disks never changed is
/// still written as version 2, and one that no disk left as version 3,
/// which earlier releases read.
pub(crate) const VERSION: u16 = 4;
/// The version of a group with disk changes (growth, a join) but no disk
/// that left.
const VERSION_CHANGES: u16 = 3;
/// The version of a group without disk changes.
const VERSION_PLAIN: u16 = 2;
/// The oldest version this release reads.
pub(crate) const OLDEST_VERSION: u16 = 2;
const FIXED_LEN: usize = size_of::<RawFixed>();
const FLAG_REDO: u8 = 1 << 0;
const FLAG_BARRIER: u8 = 1 << 1;
/// The longest disk name, in bytes.
pub(crate) const MAX_NAME: usize = 1024;
/// A state file larger than this is damaged, not read.
const MAX_STATE_FILE: u64 = 64 << 20;

/// The fixed part at the start of a version-2 state file exactly as it
/// lies on disk (offsets 0..64 of the diagram in the [store
/// module](super)), little-endian, without padding and at any alignment.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawFixed {
    magic: [u8; 4],
    version: U16,
    mode: u8,
    flags: u8,
    seq: U64,
    generation: U32,
    disk_count: U32,
    barrier_seq: U64,
    barrier_ts: U64,
    journal_start: U64,
    journal_end: U64,
    fold_to: U64,
}

/// The fixed part of one disk, before its name and pending extents.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawDisk {
    id: U32,
    name_len: U32,
    size: U64,
    synced: U64,
    pending_count: U32,
}

/// One pending extent of a disk.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawExtent {
    start: U64,
    end: U64,
}

/// One disk change of a version-3 state file.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawChange {
    disk: U32,
    kind: u8,
    after: U64,
    value: U64,
}

/// [`RawChange::kind`] of a growth; its value is the size before it.
const CHANGE_GREW: u8 = 1;
/// [`RawChange::kind`] of a disk that joined the group's points (its value
/// is 0).
const CHANGE_JOINED: u8 = 2;
/// [`RawChange::kind`] of a disk that left the group (its value is 0;
/// version 4 only).
const CHANGE_LEFT: u8 = 3;

const _: () = assert!(FIXED_LEN == 64);
const _: () = assert!(size_of::<RawChange>() == 21);
const _: () = assert!(size_of::<RawDisk>() == 28);
const _: () = assert!(size_of::<RawExtent>() == 16);

/// What the group is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Some disk is still being copied; changes apply in place.
    InitialSync,
    /// The images plus the journal are a replay of the log; changes go to
    /// the journal, every barrier is a recovery point.
    Consistent,
    /// Extents are being resynced; changes go to the journal, barriers are
    /// no recovery points until it completes.
    Resyncing,
}

/// One disk as the group knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiskState {
    pub(crate) id: DiskId,
    pub(crate) name: Name,
    pub(crate) size: u64,
    /// The initial sync has copied everything below this offset.
    pub(crate) synced: u64,
    /// Extents waiting for a resync.
    pub(crate) pending: RangeSet,
}

/// The group's position: what the state file holds, and what the group
/// tracks in memory for the uncommitted present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    /// The last applied (in memory) or committed (on disk) record.
    pub(crate) seq: Seq,
    pub(crate) generation: u32,
    /// Sorted by id.
    pub(crate) disks: Vec<DiskState>,
    pub(crate) mode: Mode,
    pub(crate) last_barrier: Option<(Seq, u64)>,
    /// Changes of the disks that the recovery points before them do not
    /// see, oldest first (by `after`, then disk id); dropped once no kept
    /// point is before them.
    pub(crate) changes: Vec<DiskChange>,
    /// Disks that left and are in no kept point any more, whose images may
    /// still exist: gone from `disks` first, then their images are
    /// removed (a crash between leaves the image, which the next open of
    /// the writer removes), then they are gone from here. Sorted.
    pub(crate) removed: Vec<DiskId>,
}

/// A change of one disk that takes effect for the recovery points after
/// record `after`: a point at or before it reads the disk as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiskChange {
    pub(crate) disk: DiskId,
    /// The last record applied before the change.
    pub(crate) after: Seq,
    pub(crate) kind: ChangeKind,
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    /// The disk grew; it was `from` bytes before.
    Grew { from: u64 },
    /// The disk was added to a group that had points and its initial
    /// sync ended here: points before do not hold it.
    Joined,
    /// The disk left the group (its shipper no longer announces it):
    /// points at or before `after` hold it as it was, points after do not.
    /// Nothing changes it afterwards; it goes (with its image) once no
    /// kept point holds it.
    Left,
}

impl Meta {
    /// A group that has seen nothing.
    pub(crate) fn new() -> Meta {
        Meta {
            seq: Seq(0),
            generation: 0,
            disks: Vec::new(),
            mode: Mode::InitialSync,
            last_barrier: None,
            changes: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// A disk added to a group that has points, still in its own initial
    /// sync: no point holds it yet, and its changes go to its image in
    /// place.
    pub(crate) fn joining(&self, d: &DiskState) -> bool {
        self.mode != Mode::InitialSync && d.synced < d.size
    }

    /// The size of disk `d` as a recovery point at `seq` reads it (its
    /// size before the first growth after `seq`, else its size now), or
    /// `None` if that point does not hold the disk (it joined after).
    pub(crate) fn size_at(&self, d: &DiskState, seq: Seq) -> Option<u64> {
        if self.joining(d) || self.left(d.id).is_some_and(|after| after < seq) {
            return None;
        }
        let mut size = d.size;
        for c in self.changes.iter().rev() {
            if c.disk != d.id || c.after < seq {
                continue;
            }
            match c.kind {
                ChangeKind::Grew { from } => size = from,
                ChangeKind::Joined => return None,
                ChangeKind::Left => {}
            }
        }
        Some(size)
    }

    /// The last record applied before disk `id` left the group, if it
    /// left.
    pub(crate) fn left(&self, id: DiskId) -> Option<Seq> {
        self.changes
            .iter()
            .find(|c| c.disk == id && c.kind == ChangeKind::Left)
            .map(|c| c.after)
    }

    /// The disks of the group now: those that did not leave.
    pub(crate) fn present(&self) -> impl Iterator<Item = &DiskState> {
        self.disks.iter().filter(|d| self.left(d.id).is_none())
    }

    pub(crate) fn disk(&self, id: DiskId) -> Option<&DiskState> {
        self.disks.iter().find(|d| d.id == id)
    }

    pub(crate) fn disk_mut(&mut self, id: DiskId) -> Option<&mut DiskState> {
        self.disks.iter_mut().find(|d| d.id == id)
    }

    /// The state file version this state needs: 4 if a disk left (or its
    /// image is still to be removed), which an earlier release would put
    /// in every point; 3 if it has other disk changes, or a disk joining
    /// (which an earlier release would read as a consistent disk and put
    /// in its points); 2 otherwise.
    fn version(&self) -> u16 {
        if !self.removed.is_empty() || self.changes.iter().any(|c| c.kind == ChangeKind::Left) {
            VERSION
        } else if !self.changes.is_empty() || self.disks.iter().any(|d| self.joining(d)) {
            VERSION_CHANGES
        } else {
            VERSION_PLAIN
        }
    }
}

/// The whole content of the state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateFile {
    pub(crate) meta: Meta,
    /// Journal position where the history starts: everything before it
    /// is folded into the images.
    pub(crate) journal_start: u64,
    /// Journal position where the committed history ends.
    pub(crate) journal_end: u64,
    /// A fold into the images up to this position was begun (and may have
    /// been cut short by a crash): finish it on open. The points before it
    /// are gone already.
    pub(crate) fold_to: Option<u64>,
}

impl StateFile {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let m = &self.meta;
        let mut b = Vec::with_capacity(FIXED_LEN + 64 * m.disks.len());
        let mut flags = 0;
        if self.fold_to.is_some() {
            flags |= FLAG_REDO;
        }
        if m.last_barrier.is_some() {
            flags |= FLAG_BARRIER;
        }
        let (barrier_seq, barrier_ts) = m.last_barrier.unwrap_or((Seq(0), 0));
        let version = m.version();
        let fixed = RawFixed {
            magic: MAGIC,
            version: version.into(),
            mode: match m.mode {
                Mode::InitialSync => 0,
                Mode::Consistent => 1,
                Mode::Resyncing => 2,
            },
            flags,
            seq: m.seq.get().into(),
            generation: m.generation.into(),
            disk_count: (m.disks.len() as u32).into(),
            barrier_seq: barrier_seq.get().into(),
            barrier_ts: barrier_ts.into(),
            journal_start: self.journal_start.into(),
            journal_end: self.journal_end.into(),
            fold_to: self.fold_to.unwrap_or(0).into(),
        };
        b.extend_from_slice(fixed.as_bytes());
        for d in &m.disks {
            let pending: Vec<(u64, u64)> = d.pending.iter().collect();
            let disk = RawDisk {
                id: d.id.get().into(),
                name_len: (d.name.len() as u32).into(),
                size: d.size.into(),
                synced: d.synced.into(),
                pending_count: (pending.len() as u32).into(),
            };
            b.extend_from_slice(disk.as_bytes());
            b.extend_from_slice(d.name.as_bytes());
            for (start, end) in pending {
                let extent = RawExtent {
                    start: start.into(),
                    end: end.into(),
                };
                b.extend_from_slice(extent.as_bytes());
            }
        }
        if version >= VERSION_CHANGES {
            b.extend_from_slice(&(m.changes.len() as u32).to_le_bytes());
            for c in &m.changes {
                let (kind, value) = match c.kind {
                    ChangeKind::Grew { from } => (CHANGE_GREW, from),
                    ChangeKind::Joined => (CHANGE_JOINED, 0),
                    ChangeKind::Left => (CHANGE_LEFT, 0),
                };
                let change = RawChange {
                    disk: c.disk.get().into(),
                    kind,
                    after: c.after.get().into(),
                    value: value.into(),
                };
                b.extend_from_slice(change.as_bytes());
            }
        }
        if version >= VERSION {
            b.extend_from_slice(&(m.removed.len() as u32).to_le_bytes());
            for id in &m.removed {
                b.extend_from_slice(&id.get().to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a state file of any version this release reads.
    pub(crate) fn decode(bytes: &[u8]) -> Result<StateFile, StateError> {
        // Every version starts with the magic and the version and ends with
        // a CRC32C of all the bytes before it: a newer file is named as
        // such, and a flipped bit in its version field is damage.
        let damaged = StateError::Damaged;
        let Some(body_len) = bytes.len().checked_sub(4).filter(|&n| n >= 6) else {
            return Err(damaged("too short"));
        };
        let (body, crc) = bytes.split_at(body_len);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(damaged("checksum mismatch"));
        }
        if body[0..4] != MAGIC {
            return Err(damaged("no state magic"));
        }
        let version = u16::from_le_bytes([body[4], body[5]]);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(StateError::Version(version));
        }
        Self::decode_version(bytes, version).map_err(damaged)
    }

    /// Decodes version 2, 3 (version 2 and a list of disk changes) or 4
    /// (version 3, whose changes may say that a disk left, and the disks
    /// whose images are still to be removed); `Err` says what does not
    /// verify.
    fn decode_version(bytes: &[u8], version: u16) -> Result<StateFile, &'static str> {
        if bytes.len() < FIXED_LEN + 4 {
            return Err("too short");
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err("checksum mismatch");
        }
        let mut r = Reader { b: body, at: 0 };
        let fixed: &RawFixed = r.take()?;
        if fixed.magic != MAGIC {
            return Err("no state magic");
        }
        if fixed.version.get() != version {
            return Err("version changed while decoding");
        }
        let mode = match fixed.mode {
            0 => Mode::InitialSync,
            1 => Mode::Consistent,
            2 => Mode::Resyncing,
            _ => return Err("unknown mode"),
        };
        let flags = fixed.flags;
        if flags & !(FLAG_REDO | FLAG_BARRIER) != 0 {
            return Err("unknown flags");
        }
        let barrier = (Seq(fixed.barrier_seq.get()), fixed.barrier_ts.get());
        let journal_start = fixed.journal_start.get();
        let journal_end = fixed.journal_end.get();
        let mut disks: Vec<DiskState> = Vec::new();
        for _ in 0..fixed.disk_count.get() {
            let disk: &RawDisk = r.take()?;
            let id = disk.id.get();
            let name_len = disk.name_len.get() as usize;
            let size = disk.size.get();
            let synced = disk.synced.get();
            if name_len > MAX_NAME {
                return Err("disk name too long");
            }
            let name =
                std::str::from_utf8(r.bytes(name_len)?).map_err(|_| "disk name is not UTF-8")?;
            // A state written before the rule of names, or damaged: a
            // failover would make a path of this name.
            let name = Name::new(name).map_err(|_| "a disk name that breaks the rule of names")?;
            if synced > size {
                return Err("synced beyond the disk size");
            }
            if disks.last().is_some_and(|d| d.id >= DiskId(id)) {
                return Err("disks not sorted by id");
            }
            let mut pending = RangeSet::default();
            for _ in 0..disk.pending_count.get() {
                let extent: &RawExtent = r.take()?;
                let (s, e) = (extent.start.get(), extent.end.get());
                if s >= e || e > size {
                    return Err("pending extent outside its disk");
                }
                pending.add(s, e);
            }
            disks.push(DiskState {
                id: DiskId(id),
                name,
                size,
                synced,
                pending,
            });
        }
        let mut changes: Vec<DiskChange> = Vec::new();
        if version >= VERSION_CHANGES {
            let count: &U32 = r.take()?;
            let joining = mode != Mode::InitialSync && disks.iter().any(|d| d.synced < d.size);
            if count.get() == 0 && !joining && version == VERSION_CHANGES {
                // Written as version 2 when there is none.
                return Err("a version-3 state without disk changes");
            }
            for _ in 0..count.get() {
                let raw: &RawChange = r.take()?;
                let disk = disks
                    .iter()
                    .find(|d| d.id == DiskId(raw.disk.get()))
                    .ok_or("a change of an unknown disk")?;
                let kind = match raw.kind {
                    CHANGE_GREW if raw.value.get() < disk.size => ChangeKind::Grew {
                        from: raw.value.get(),
                    },
                    CHANGE_GREW => return Err("a growth to no larger size"),
                    CHANGE_JOINED if raw.value.get() == 0 => ChangeKind::Joined,
                    CHANGE_LEFT if raw.value.get() == 0 && version >= VERSION => {
                        // It left whole: nothing of it waits for a sync.
                        if !disk.pending.is_empty() || disk.synced != disk.size {
                            return Err("a disk that left still waits for a sync");
                        }
                        ChangeKind::Left
                    }
                    _ => return Err("unknown disk change"),
                };
                let change = DiskChange {
                    disk: disk.id,
                    after: Seq(raw.after.get()),
                    kind,
                };
                if changes
                    .last()
                    .is_some_and(|l| (l.after, l.disk) > (change.after, change.disk))
                {
                    return Err("disk changes out of order");
                }
                if changes
                    .iter()
                    .any(|c| c.disk == change.disk && c.kind == ChangeKind::Left)
                {
                    return Err("a change of a disk after it left");
                }
                changes.push(change);
            }
        }
        let mut removed: Vec<DiskId> = Vec::new();
        if version >= VERSION {
            let count: &U32 = r.take()?;
            for _ in 0..count.get() {
                let id: &U32 = r.take()?;
                let id = DiskId(id.get());
                if removed.last().is_some_and(|&l| l >= id) {
                    return Err("removed disks not sorted");
                }
                if disks.iter().any(|d| d.id == id) {
                    return Err("a removed disk is still a disk of the group");
                }
                removed.push(id);
            }
            if removed.is_empty() && !changes.iter().any(|c| c.kind == ChangeKind::Left) {
                // Written as version 3 or 2 when no disk left.
                return Err("a version-4 state without a disk that left");
            }
        }
        if r.at != body.len() {
            return Err("trailing bytes");
        }
        let fold_to = (flags & FLAG_REDO != 0).then_some(fixed.fold_to.get());
        if journal_start > journal_end {
            return Err("the history starts after its end");
        }
        if fold_to.is_some_and(|to| to < journal_start || to > journal_end) {
            return Err("a fold outside the history");
        }
        Ok(StateFile {
            meta: Meta {
                seq: Seq(fixed.seq.get()),
                generation: fixed.generation.get(),
                disks,
                mode,
                last_barrier: (flags & FLAG_BARRIER != 0).then_some(barrier),
                changes,
                removed,
            },
            journal_start,
            journal_end,
            fold_to,
        })
    }
}

/// Why a state file was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StateError {
    /// It does not verify.
    Damaged(&'static str),
    /// It is of a version this release does not read.
    Version(u16),
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.at.checked_add(n).ok_or("truncated")?;
        let s = self.b.get(self.at..end).ok_or("truncated")?;
        self.at = end;
        Ok(s)
    }
    /// The next `T` (a fixed-layout part), `Err("truncated")` if the bytes
    /// end first.
    fn take<T: FromBytes + KnownLayout + Immutable + Unaligned>(
        &mut self,
    ) -> Result<&'a T, &'static str> {
        let rest = self.b.get(self.at..).ok_or("truncated")?;
        let (t, _) = T::ref_from_prefix(rest).map_err(|_| "truncated")?;
        self.at += size_of::<T>();
        Ok(t)
    }
}

/// Reads the state file `name` of `dir`: `Ok(None)` if it does not exist.
/// Only its first [`MAX_STATE_FILE`] bytes are read: a longer one is
/// damaged and fails its checksum.
pub(crate) fn read_file<D: LogDir>(dir: &D, name: &str) -> io::Result<Option<Vec<u8>>> {
    let file = match dir.open(name, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut out = vec![0u8; file.size()?.min(MAX_STATE_FILE) as usize];
    let n = file.read_full_at(&mut out, 0)?;
    out.truncate(n);
    Ok(Some(out))
}

/// Replaces `name` of `dir` with `bytes` atomically and durably: write
/// `name.tmp`, fdatasync, rename over `name`, fsync the directory.
pub(crate) fn write_atomic<D: LogDir>(dir: &D, name: &str, bytes: &[u8]) -> io::Result<()> {
    replace(
        dir,
        &format!("{name}.tmp"),
        name,
        bytes,
        Durability::Durable,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> StateFile {
        let mut pending = RangeSet::default();
        pending.add(4096, 8192);
        pending.add(10_000, 20_000);
        StateFile {
            meta: Meta {
                seq: Seq(77),
                generation: 3,
                disks: vec![
                    DiskState {
                        id: DiskId(0),
                        name: Name::from_static("sda"),
                        size: 1 << 20,
                        synced: 1 << 20,
                        pending,
                    },
                    DiskState {
                        id: DiskId(5),
                        name: Name::from_static("wal-1"),
                        size: 65536,
                        synced: 512,
                        pending: RangeSet::default(),
                    },
                ],
                mode: Mode::InitialSync,
                last_barrier: Some((Seq(70), 123_456)),
                changes: Vec::new(),
                removed: Vec::new(),
            },
            journal_start: 100,
            journal_end: 4000,
            fold_to: None,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(StateFile::decode(&s.encode()), Ok(s.clone()));
        let mut t = s;
        t.fold_to = Some(2000);
        t.meta.last_barrier = None;
        t.meta.mode = Mode::Consistent;
        assert_eq!(StateFile::decode(&t.encode()), Ok(t));
    }

    /// The bytes of a state file, field by field as the store module's
    /// diagram draws them: the encoding never changes under a release that
    /// reads the old one, and the decoder reads them back.
    #[test]
    fn the_layout_is_the_documented_one() {
        let body: &[u8] = b"\x54\x4d\x52\x53\x02\x00\x00\x02\x4d\x00\x00\x00\x00\x00\x00\x00\
            \x03\x00\x00\x00\x02\x00\x00\x00\x46\x00\x00\x00\x00\x00\x00\x00\
            \x40\xe2\x01\x00\x00\x00\x00\x00\x64\x00\x00\x00\x00\x00\x00\x00\
            \xa0\x0f\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
            \x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\
            \x00\x00\x10\x00\x00\x00\x00\x00\x02\x00\x00\x00\x73\x64\x61\x00\
            \x10\x00\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00\x00\x00\x00\x10\
            \x27\x00\x00\x00\x00\x00\x00\x20\x4e\x00\x00\x00\x00\x00\x00\x05\
            \x00\x00\x00\x05\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\
            \x02\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x77\x61\x6c\x2d\x31";
        let mut expected = body.to_vec();
        expected.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        assert_eq!(sample().encode(), expected);
        assert_eq!(StateFile::decode(&expected), Ok(sample()));
    }

    /// A group whose disk grew is written as version 3: version 2's
    /// layout, then the list of disk changes, field by field as the store
    /// module's diagram draws it; the changes say what each point reads.
    #[test]
    fn a_grown_disk_is_version_3_with_its_changes() {
        let mut s = sample();
        s.meta.changes = vec![
            DiskChange {
                disk: DiskId(5),
                after: Seq(40),
                kind: ChangeKind::Grew { from: 4096 },
            },
            DiskChange {
                disk: DiskId(5),
                after: Seq(60),
                kind: ChangeKind::Grew { from: 8192 },
            },
        ];
        let bytes = s.encode();
        let plain = sample().encode();
        assert_eq!(&bytes[4..6], &[3, 0]);
        assert_eq!(bytes[6..plain.len() - 4], plain[6..plain.len() - 4]);
        let tail: &[u8] = b"\x02\x00\x00\x00\
            \x05\x00\x00\x00\x01\x28\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\
            \x05\x00\x00\x00\x01\x3c\x00\x00\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00\x00\x00\x00";
        assert_eq!(&bytes[plain.len() - 4..bytes.len() - 4], tail);
        assert_eq!(StateFile::decode(&bytes), Ok(s.clone()));
        let disk5 = &s.meta.disks[1];
        assert_eq!(s.meta.size_at(disk5, Seq(10)), Some(4096));
        assert_eq!(s.meta.size_at(disk5, Seq(41)), Some(8192));
        assert_eq!(s.meta.size_at(disk5, Seq(61)), Some(65536));
        // Disk 5 is synced to 512 only: in a consistent group it is
        // joining, in no point at all, and the state is version 3 even
        // without a change.
        let mut j = sample();
        j.meta.mode = Mode::Consistent;
        assert_eq!(j.meta.size_at(&j.meta.disks[1], Seq(61)), None);
        let bytes = j.encode();
        assert_eq!(&bytes[4..6], &[3, 0]);
        assert_eq!(StateFile::decode(&bytes), Ok(j));
        let mut t = s.clone();
        t.meta.mode = Mode::Consistent;
        t.meta.disks[1].synced = 65536;
        t.meta.changes.push(DiskChange {
            disk: DiskId(5),
            after: Seq(20),
            kind: ChangeKind::Joined,
        });
        t.meta.changes.sort_by_key(|c| (c.after, c.disk));
        assert_eq!(StateFile::decode(&t.encode()), Ok(t.clone()));
        let disk5 = &t.meta.disks[1];
        assert_eq!(t.meta.size_at(disk5, Seq(10)), None);
        assert_eq!(t.meta.size_at(disk5, Seq(21)), Some(4096));
        assert_eq!(t.meta.size_at(disk5, Seq(40)), Some(4096));
        assert_eq!(t.meta.size_at(disk5, Seq(41)), Some(8192));
        assert_eq!(t.meta.size_at(disk5, Seq(61)), Some(65536));
        assert_eq!(t.meta.size_at(&t.meta.disks[0], Seq(10)), Some(1 << 20));
    }

    /// Disk changes that cannot be (of no disk, a growth that shrinks, out
    /// of order, an empty list) are damage even with a valid checksum.
    #[test]
    fn impossible_disk_changes_are_refused() {
        let with = |changes: Vec<DiskChange>| {
            let mut s = sample();
            s.meta.changes = changes;
            StateFile::decode(&s.encode())
        };
        let grew = |disk: u32, after: u64, from: u64| DiskChange {
            disk: DiskId(disk),
            after: Seq(after),
            kind: ChangeKind::Grew { from },
        };
        assert_eq!(
            with(vec![grew(3, 1, 10)]),
            Err(StateError::Damaged("a change of an unknown disk"))
        );
        assert_eq!(
            with(vec![grew(5, 1, 65536)]),
            Err(StateError::Damaged("a growth to no larger size"))
        );
        assert_eq!(
            with(vec![grew(5, 9, 10), grew(0, 1, 10)]),
            Err(StateError::Damaged("disk changes out of order"))
        );
        let mut empty = sample().encode();
        let n = empty.len() - 4;
        empty.truncate(n);
        empty[4] = 3;
        empty.extend_from_slice(&0u32.to_le_bytes());
        let crc = crc32c::crc32c(&empty);
        empty.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            StateFile::decode(&empty),
            Err(StateError::Damaged(
                "a version-3 state without disk changes"
            ))
        );
    }

    /// A disk that left is written as version 4: version 3's layout, the
    /// change of kind 3, then the disks whose images are still to be
    /// removed. Points at or before the change hold the disk, points after
    /// do not; the group's disks now are those that did not leave.
    #[test]
    fn a_disk_that_left_is_version_4() {
        let mut s = sample();
        s.meta.mode = Mode::Consistent;
        s.meta.disks[1].synced = 65536;
        s.meta.changes = vec![
            DiskChange {
                disk: DiskId(5),
                after: Seq(40),
                kind: ChangeKind::Grew { from: 4096 },
            },
            DiskChange {
                disk: DiskId(5),
                after: Seq(60),
                kind: ChangeKind::Left,
            },
        ];
        let bytes = s.encode();
        assert_eq!(&bytes[4..6], &[4, 0]);
        let tail: &[u8] = b"\x02\x00\x00\x00\
            \x05\x00\x00\x00\x01\x28\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\
            \x05\x00\x00\x00\x03\x3c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\
            \x00\x00\x00\x00";
        assert_eq!(&bytes[bytes.len() - 4 - tail.len()..bytes.len() - 4], tail);
        assert_eq!(StateFile::decode(&bytes), Ok(s.clone()));
        let disk5 = &s.meta.disks[1];
        assert_eq!(s.meta.size_at(disk5, Seq(40)), Some(4096));
        assert_eq!(s.meta.size_at(disk5, Seq(60)), Some(65536));
        assert_eq!(s.meta.size_at(disk5, Seq(61)), None);
        assert_eq!(s.meta.left(DiskId(5)), Some(Seq(60)));
        assert_eq!(s.meta.left(DiskId(0)), None);
        let present: Vec<DiskId> = s.meta.present().map(|d| d.id).collect();
        assert_eq!(present, [DiskId(0)]);
        // Gone from the disks, its image still to be removed.
        let mut r = s.clone();
        r.meta.disks.remove(1);
        r.meta.changes.clear();
        r.meta.removed = vec![DiskId(5), DiskId(9)];
        let bytes = r.encode();
        assert_eq!(&bytes[4..6], &[4, 0]);
        assert_eq!(
            &bytes[bytes.len() - 16..bytes.len() - 4],
            b"\x02\x00\x00\x00\x05\x00\x00\x00\x09\x00\x00\x00"
        );
        assert_eq!(StateFile::decode(&bytes), Ok(r.clone()));
        // Once removed: version 2 again.
        r.meta.removed.clear();
        assert_eq!(&r.encode()[4..6], &[2, 0]);
    }

    /// What cannot be of a disk that left is damage even with a valid
    /// checksum: a left disk that waits for a sync, a change after it
    /// left, a leaving in version 3, a version 4 without a disk that left,
    /// a removed disk that is still a disk, removed disks out of order.
    #[test]
    fn impossible_leavings_are_refused() {
        let left = |disk: u32, after: u64| DiskChange {
            disk: DiskId(disk),
            after: Seq(after),
            kind: ChangeKind::Left,
        };
        let base = || {
            let mut s = sample();
            s.meta.mode = Mode::Consistent;
            s.meta.disks[1].synced = 65536;
            s
        };
        // Disk 0 has pending extents.
        let mut s = base();
        s.meta.changes = vec![left(0, 9)];
        assert_eq!(
            StateFile::decode(&s.encode()),
            Err(StateError::Damaged(
                "a disk that left still waits for a sync"
            ))
        );
        let mut s = base();
        s.meta.changes = vec![
            left(5, 9),
            DiskChange {
                disk: DiskId(5),
                after: Seq(10),
                kind: ChangeKind::Grew { from: 512 },
            },
        ];
        assert_eq!(
            StateFile::decode(&s.encode()),
            Err(StateError::Damaged("a change of a disk after it left"))
        );
        // A version-3 file may not say that a disk left.
        let mut s = base();
        s.meta.changes = vec![left(5, 9)];
        let mut bytes = s.encode();
        bytes[4] = 3;
        let n = bytes.len() - 8;
        bytes.truncate(n);
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            StateFile::decode(&bytes),
            Err(StateError::Damaged("unknown disk change"))
        );
        let mut s = base();
        s.meta.removed = vec![DiskId(9)];
        let mut bytes = s.encode();
        let n = bytes.len() - 12;
        bytes.truncate(n);
        bytes.extend_from_slice(&0u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(
            StateFile::decode(&bytes),
            Err(StateError::Damaged(
                "a version-4 state without a disk that left"
            ))
        );
        let mut s = base();
        s.meta.removed = vec![DiskId(5)];
        assert_eq!(
            StateFile::decode(&s.encode()),
            Err(StateError::Damaged(
                "a removed disk is still a disk of the group"
            ))
        );
        let mut s = base();
        s.meta.removed = vec![DiskId(9), DiskId(7)];
        assert_eq!(
            StateFile::decode(&s.encode()),
            Err(StateError::Damaged("removed disks not sorted"))
        );
    }

    #[test]
    fn a_version_4_state_refuses_truncation_and_bit_flips() {
        let mut s = sample();
        s.meta.mode = Mode::Consistent;
        s.meta.disks[1].synced = 65536;
        s.meta.changes = vec![DiskChange {
            disk: DiskId(5),
            after: Seq(60),
            kind: ChangeKind::Left,
        }];
        s.meta.removed = vec![DiskId(7)];
        let bytes = s.encode();
        assert_eq!(StateFile::decode(&bytes), Ok(s));
        for cut in 0..bytes.len() {
            assert!(StateFile::decode(&bytes[..cut]).is_err());
        }
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(StateFile::decode(&b).is_err(), "bit {bit}");
        }
    }

    /// A state whose disk name would make a path outside a failover's
    /// directory (written before the rule of names, or by hand) is refused
    /// even with a valid checksum.
    #[test]
    fn a_disk_name_that_breaks_the_rule_is_refused() {
        let mut bytes = sample().encode();
        let at = bytes.windows(3).position(|w| w == b"sda").unwrap();
        bytes[at..at + 3].copy_from_slice(b"../");
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            StateFile::decode(&bytes),
            Err(StateError::Damaged(
                "a disk name that breaks the rule of names"
            ))
        );
    }

    /// A newer version (of whatever layout, its checksum intact) is named
    /// as such; a flipped bit in the version field is damage.
    #[test]
    fn a_newer_version_is_named() {
        let versioned = |v: u16| {
            let mut bytes = sample().encode();
            bytes[4..6].copy_from_slice(&v.to_le_bytes());
            let n = bytes.len() - 4;
            let crc = crc32c::crc32c(&bytes[..n]);
            bytes[n..].copy_from_slice(&crc.to_le_bytes());
            bytes
        };
        let newer = versioned(VERSION + 1);
        assert_eq!(
            StateFile::decode(&newer),
            Err(StateError::Version(VERSION + 1))
        );
        assert_eq!(
            StateFile::decode(&versioned(1)),
            Err(StateError::Version(1))
        );
        let mut flipped = sample().encode();
        flipped[4] ^= 1;
        assert_eq!(
            StateFile::decode(&flipped),
            Err(StateError::Damaged("checksum mismatch"))
        );
    }

    #[test]
    fn truncation_and_bit_flips_are_refused() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(StateFile::decode(&bytes[..cut]).is_err());
        }
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(StateFile::decode(&b).is_err(), "bit {bit}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = StateFile::decode(&bytes);
        }

        #[test]
        fn arbitrary_bodies_with_a_valid_crc_never_panic(mut body in proptest::collection::vec(any::<u8>(), 40..300)) {
            body[0..4].copy_from_slice(&MAGIC);
            body[4..6].copy_from_slice(&VERSION.to_le_bytes());
            let crc = crc32c::crc32c(&body);
            body.extend_from_slice(&crc.to_le_bytes());
            let _ = StateFile::decode(&body);
        }
    }
}
