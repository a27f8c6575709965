//! The seeded stream both store crash tests apply (`store_crash.rs` on a
//! simulated directory, `ceph_store_crash.rs` on a simulated cluster): an
//! initial sync interleaved with records over three disks, then writes,
//! write-zeroes, trims, barriers, markers, a resync of an extent, a
//! growth of a disk (announced, or a grow record of the log; its grown
//! part resynced, written after), a disk
//! added to the consistent group (synced on its own while records and
//! points go on), a disk that leaves the group (in the points before,
//! its image removed once retention folded them) and a test failover's pin, with the source's disks after every sequence
//! number to check the points against; and the checks both hold a
//! reopened group to.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tidemark_changelog::{DiskId, Entry, Record, Seq};
use tidemark_durable::LogDir;
use tidemark_names::Name;
use tidemark_receiver::store::{
    ChunkRef, Disk, GroupState, Position, Purpose, ReplicaGroup, StoreError,
};

pub(crate) const SIZES: [u64; 3] = [16 << 10, 8 << 10, (12 << 10) + 512];
const SECTOR: u64 = 512;

/// The disks as the stream first announces them.
pub(crate) fn specs() -> Vec<Disk> {
    specs_of(&SIZES)
}

/// The disks at these sizes.
fn specs_of(sizes: &[u64]) -> Vec<Disk> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, size)| Disk {
            id: DiskId(i as u32),
            name: Name::new(format!("disk{i}")).unwrap(),
            size: *size,
        })
        .collect()
}

/// The disk the stream grows, and by how much.
const GROWN_DISK: u32 = 1;
const GROWTH: u64 = 6 << 10;
/// The size of the disk the stream adds (id 3).
const ADDED_SIZE: u64 = (6 << 10) + 512;
/// The disk that leaves the group.
pub(crate) const LEFT_DISK: u32 = 0;

/// One step of the stream the shipper sends.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    /// Announce the disks (creates their images, or grows them, durably).
    Disks(Vec<Disk>),
    Record(Record),
    Chunk {
        disk: u32,
        offset: u64,
        /// `None`: `len` bytes of zeroes.
        data: Option<Vec<u8>>,
        len: u64,
        purpose: Purpose,
    },
    ResyncDone {
        disk: u32,
        offset: u64,
        length: u64,
    },
    Commit,
    /// These disks leave the group (the shipper's hello no longer lists
    /// them).
    Leave(Vec<u32>),
    /// A test failover pins this point (`Some`) or ends (`None`): another
    /// process writes the pin, so it is outside the power cut.
    Pin(Option<u64>),
}

/// Applies one op to `g`; `pin` writes or removes a test failover's pin
/// (`Op::Pin`), wherever the engine keeps it. `Some(position)` when the op
/// made a position durable.
pub(crate) fn apply_op<D: LogDir>(
    g: &mut ReplicaGroup<D>,
    op: &Op,
    pin: impl FnOnce(Option<u64>) -> Result<(), StoreError>,
) -> Result<Option<Position>, StoreError> {
    match op {
        Op::Pin(seq) => pin(*seq).map(|()| None),
        Op::Disks(disks) => g.ensure_disks(disks).map(|()| Some(g.position())),
        // A grow record commits what came before it and the growth.
        Op::Record(rec) if rec.header.kind == tidemark_changelog::Kind::Grow => {
            g.apply_record(rec).map(|_| Some(g.position()))
        }
        Op::Record(rec) => g.apply_record(rec).map(|_| None),
        Op::Chunk {
            disk,
            offset,
            data,
            len,
            purpose,
        } => {
            let chunk = match data {
                Some(d) => ChunkRef::Data(d),
                None => ChunkRef::Zero(*len),
            };
            g.apply_chunk(DiskId(*disk), *offset, chunk, *purpose)
                .map(|()| None)
        }
        Op::ResyncDone {
            disk,
            offset,
            length,
        } => g
            .resync_done(DiskId(*disk), *offset, *length)
            .map(|()| None),
        Op::Commit => g.commit().map(Some),
        Op::Leave(disks) => {
            let ids: Vec<DiskId> = disks.iter().map(|d| DiskId(*d)).collect();
            g.leave(&ids).map(|()| Some(g.position()))
        }
    }
}

/// The stream and the source it describes.
pub(crate) struct Workload {
    pub(crate) ops: Vec<Op>,
    /// The source's disks after each sequence number (index 0: before any).
    pub(crate) source: Vec<Vec<Vec<u8>>>,
    /// The last record before [`LEFT_DISK`] left the group.
    pub(crate) left_after: u64,
}

struct Source {
    disks: Vec<Vec<u8>>,
    states: Vec<Vec<Vec<u8>>>,
    ops: Vec<Op>,
    seq: u64,
    /// Barriers and markers are recovery points now (the group is
    /// consistent).
    points_now: bool,
    /// The newest recovery point.
    last_point: Option<u64>,
    /// The disk that left, once it has (no record names it after).
    left: Option<usize>,
}

impl Source {
    fn record(&mut self, entry: Entry<'_>) {
        self.seq += 1;
        let rec = Record::decode(&entry.encode(self.seq, 1)).expect("a valid record");
        let h = &rec.header;
        let (o, l) = (h.offset as usize, h.length as usize);
        match h.kind {
            tidemark_changelog::Kind::Write => {
                self.disks[h.disk.index()][o..o + l].copy_from_slice(&rec.payload)
            }
            tidemark_changelog::Kind::WriteZeroes | tidemark_changelog::Kind::Trim => {
                self.disks[h.disk.index()][o..o + l].fill(0)
            }
            _ => {}
        }
        self.states.push(self.disks.clone());
        self.ops.push(Op::Record(rec));
    }

    /// A chunk of the source as it is now.
    fn chunk(&mut self, disk: u32, offset: u64, len: u64, purpose: Purpose) {
        let bytes = &self.disks[disk as usize][offset as usize..(offset + len) as usize];
        let data = bytes.iter().any(|b| *b != 0).then(|| bytes.to_vec());
        self.ops.push(Op::Chunk {
            disk,
            offset,
            data,
            len,
            purpose,
        });
    }

    fn note_point(&mut self) {
        if self.points_now {
            self.last_point = Some(self.seq);
        }
    }

    /// A random extent of a random disk (at its size now), in sectors.
    fn extent(&self, rng: &mut StdRng, max_sectors: u64) -> (u32, u64, u64) {
        let disk = loop {
            let disk = rng.random_range(0..self.disks.len());
            if self.left != Some(disk) {
                break disk;
            }
        };
        let sectors = self.disks[disk].len() as u64 / SECTOR;
        let len = rng.random_range(1..=max_sectors.min(sectors));
        let at = rng.random_range(0..=sectors - len);
        (disk as u32, at * SECTOR, len * SECTOR)
    }

    /// A random change, barrier or marker.
    fn random_record(&mut self, rng: &mut StdRng) {
        let ts = self.seq * 1000;
        match rng.random_range(0..10) {
            0..=3 => {
                let (disk, offset, len) = self.extent(rng, 6);
                // Not whole sectors: the store takes any byte range.
                let len = len - rng.random_range(0..SECTOR / 2);
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                self.record(Entry::write(disk, offset, &data, ts));
            }
            4 => {
                let (disk, offset, len) = self.extent(rng, 8);
                let no_hole = rng.random();
                self.record(Entry::write_zeroes(disk, offset, len, no_hole, ts));
            }
            5 => {
                let (disk, offset, len) = self.extent(rng, 8);
                self.record(Entry::trim(disk, offset, len, ts));
            }
            6 => {
                let label = format!("m{}", self.seq + 1);
                self.record(Entry::marker(&label, rng.random(), ts));
                self.note_point();
            }
            _ => {
                self.record(Entry::barrier(ts));
                self.note_point();
            }
        }
    }
}

pub(crate) fn workload(seed: u64, steady_ops: usize) -> Workload {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = Source {
        disks: SIZES.iter().map(|n| vec![0u8; *n as usize]).collect(),
        states: Vec::new(),
        ops: vec![Op::Disks(specs())],
        seq: 0,
        points_now: false,
        last_point: None,
        left: None,
    };
    let mut left_after = 0;
    s.states.push(s.disks.clone());
    // Initial sync: each disk copied in order, records in between (applied
    // in place), commits now and then.
    for disk in 0..SIZES.len() as u32 {
        let mut at = 0;
        while at < SIZES[disk as usize] {
            for _ in 0..rng.random_range(0..3) {
                s.random_record(&mut rng);
            }
            let len = (rng.random_range(1..=8) * SECTOR).min(SIZES[disk as usize] - at);
            s.chunk(disk, at, len, Purpose::InitialSync);
            at += len;
            if rng.random_range(0..3) == 0 {
                s.ops.push(Op::Commit);
            }
        }
    }
    s.ops.push(Op::Commit);
    // Consistent: a point at every barrier and marker; a resync of one
    // extent half-way; a test failover pins a point for a while (retention
    // keeps three points: it would be folded soon).
    s.points_now = true;
    let mut pinned = false;
    for i in 0..steady_ops {
        if i == steady_ops / 4 {
            s.ops.push(Op::Commit);
            if let Some(seq) = s.last_point {
                s.ops.push(Op::Pin(Some(seq)));
                pinned = true;
            }
        }
        if i == steady_ops * 5 / 8 {
            // A disk grows (while a point may be pinned): points before
            // keep its old size, the grown part waits for a resync (no
            // points until it is done) and is written afterwards.
            let d = GROWN_DISK as usize;
            let old = s.disks[d].len() as u64;
            s.disks[d].resize((old + GROWTH) as usize, 0);
            let sizes: Vec<u64> = s.disks.iter().map(|d| d.len() as u64).collect();
            // The store commits what was applied before a growth by
            // itself; the stream commits first so that every position the
            // store can come back to is one this harness saw. Odd seeds
            // grow the disk as the shipper's hello announces it, even ones
            // at the log's grow record.
            s.ops.push(Op::Commit);
            if seed.is_multiple_of(2) {
                let ts = s.seq * 1000;
                s.record(Entry::grow(GROWN_DISK, old, old + GROWTH, ts));
            } else {
                s.ops.push(Op::Disks(specs_of(&sizes)));
            }
            s.points_now = false;
            for _ in 0..4 {
                s.random_record(&mut rng);
            }
            s.ops.push(Op::Commit);
            s.chunk(GROWN_DISK, old, GROWTH, Purpose::Resync);
            s.ops.push(Op::ResyncDone {
                disk: GROWN_DISK,
                offset: old,
                length: GROWTH,
            });
            s.ops.push(Op::Commit);
            s.points_now = true;
        }
        if i == steady_ops * 13 / 16 {
            // A disk leaves: the points up to here hold it, the later ones
            // do not; retention folds the former and its image goes.
            s.ops.push(Op::Commit);
            s.ops.push(Op::Leave(vec![LEFT_DISK]));
            s.left = Some(LEFT_DISK as usize);
            left_after = s.seq;
        }
        if i == steady_ops * 7 / 8 {
            // A disk is added: synced on its own, records of every disk
            // (its own in place) and points (without it) in between.
            s.ops.push(Op::Commit);
            s.disks.push(vec![0u8; ADDED_SIZE as usize]);
            let sizes: Vec<u64> = s.disks.iter().map(|d| d.len() as u64).collect();
            let mut announced = specs_of(&sizes);
            announced.retain(|d| s.left != Some(d.id.index()));
            s.ops.push(Op::Disks(announced));
            let disk = (s.disks.len() - 1) as u32;
            let mut at = 0;
            while at < ADDED_SIZE {
                for _ in 0..rng.random_range(0..3) {
                    s.random_record(&mut rng);
                }
                let len = (rng.random_range(1..=4) * SECTOR).min(ADDED_SIZE - at);
                s.chunk(disk, at, len, Purpose::InitialSync);
                at += len;
                if rng.random_range(0..3) == 0 {
                    s.ops.push(Op::Commit);
                }
            }
        }
        if i == steady_ops * 3 / 4 && pinned {
            s.ops.push(Op::Pin(None));
        }
        if i == steady_ops / 2 {
            let (disk, offset, length) = s.extent(&mut rng, 8);
            s.record(Entry::resync_needed(disk, offset, length, s.seq * 1000));
            s.points_now = false;
            for _ in 0..4 {
                s.random_record(&mut rng);
            }
            s.ops.push(Op::Commit);
            s.chunk(disk, offset, length, Purpose::Resync);
            s.ops.push(Op::ResyncDone {
                disk,
                offset,
                length,
            });
            s.ops.push(Op::Commit);
            s.points_now = true;
        }
        s.random_record(&mut rng);
        if rng.random_range(0..3) == 0 {
            s.ops.push(Op::Commit);
        }
    }
    s.ops.push(Op::Commit);
    Workload {
        ops: s.ops,
        source: s.states,
        left_after,
    }
}

/// The pin as of `ops[..upto]`.
pub(crate) fn pin_before(ops: &[Op], upto: usize) -> Option<u64> {
    ops[..upto]
        .iter()
        .rev()
        .find_map(|op| match op {
            Op::Pin(seq) => Some(*seq),
            _ => None,
        })
        .flatten()
}

/// What one run made durable, and where it stopped.
pub(crate) struct Run {
    /// (op index, position) of every op that returned a durable position;
    /// index `None` for opening the group.
    pub(crate) durable: Vec<(Option<usize>, Position)>,
    /// The op that failed (the cut), `None` for the open.
    pub(crate) crashed_at: Option<Option<usize>>,
    pub(crate) final_position: Option<Position>,
}

/// `disk` as the point `seq` (`None`: everything applied) reads it, at
/// the size the store gives it there.
pub(crate) fn read_disk<D: LogDir>(g: &ReplicaGroup<D>, seq: Option<u64>, disk: usize) -> Vec<u8> {
    let disks = match seq {
        Some(seq) => g.disks_at(Seq(seq)),
        None => g.disks(),
    };
    let size = disks
        .iter()
        .find(|d| d.id.index() == disk)
        .expect("a disk of the group")
        .size;
    let mut buf = vec![0u8; size as usize];
    g.view(seq.map(Seq))
        .expect("a readable view")
        .read(DiskId(disk as u32), 0, &mut buf)
        .expect("a readable disk");
    buf
}

/// Every point `g` lists reads as the source did at it.
pub(crate) fn check_points<D: LogDir>(what: &str, g: &ReplicaGroup<D>, w: &Workload) -> usize {
    let points = g.points();
    for p in &points {
        // The disks the point holds: a disk added after it is not among
        // them, nor the disk that left before it; every other one is.
        let disks: Vec<usize> = g.disks_at(p.seq).iter().map(|d| d.id.index()).collect();
        let holds_left = p.seq.get() <= w.left_after;
        assert_eq!(
            disks.contains(&(LEFT_DISK as usize)),
            holds_left,
            "{what}: point {} and the disk that left after {}",
            p.seq,
            w.left_after
        );
        assert!(
            (0..SIZES.len()).all(|d| d == LEFT_DISK as usize || disks.contains(&d)),
            "{what}: point {} lacks a disk",
            p.seq
        );
        for disk in disks {
            assert!(
                read_disk(g, Some(p.seq.get()), disk) == w.source[p.seq.get() as usize][disk],
                "{what}: point {} of disk {disk} differs from the source",
                p.seq
            );
        }
    }
    points.len()
}

/// Every disk of the group reads as the source's last state; the disk that
/// left is not among them.
pub(crate) fn check_newest<D: LogDir>(what: &str, g: &ReplicaGroup<D>, w: &Workload) {
    let last = w.source.last().expect("a source");
    let disks: Vec<usize> = g.disks().iter().map(|d| d.id.index()).collect();
    assert!(
        !disks.contains(&(LEFT_DISK as usize)),
        "{what}: the disk that left is still a disk of the group"
    );
    assert_eq!(disks.len(), last.len() - 1, "{what}: a disk is missing");
    for disk in disks {
        assert!(
            read_disk(g, None, disk) == last[disk],
            "{what}: disk {disk} differs from the source"
        );
    }
}

/// Holds the group reopened after `cut` to the rules on its position and
/// newest state: the position is one the store committed (`probe` ran the
/// same stream without a cut), between the last one it acknowledged and
/// the op the cut stopped; the newest state is the source's there, except
/// what it waits to resync. Returns the op the stream resumes after.
pub(crate) fn check_committed<D: LogDir>(
    what: &str,
    g: &ReplicaGroup<D>,
    w: &Workload,
    probe: &Run,
    cut: &Run,
) -> Option<usize> {
    let stopped = cut.crashed_at.expect("the run crashed");
    // The position is one the store committed, between the last one it
    // acknowledged and the op the cut stopped.
    let p = g.position();
    let acked = cut.durable.last().map(|(i, _)| *i);
    let at = probe
        .durable
        .iter()
        .rposition(|(i, q)| *q == p && *i <= stopped)
        .unwrap_or_else(|| panic!("{what}: {p:?} is no position the store committed"));
    let resume_from = probe.durable[at].0;
    assert!(
        acked.is_none_or(|a| resume_from >= a),
        "{what}: {p:?} is older than the acknowledged commit at op {acked:?}"
    );

    // Its newest state is the source's at that position, except what it
    // waits to resync. (During the initial sync there is no consistent
    // state: changes go to the images in place, and what a crash left of
    // them is overwritten when the stream resumes, checked below.)
    let pending: Vec<(u32, u64, u64)> = match &p.state {
        GroupState::InitialSync | GroupState::Consistent => Vec::new(),
        GroupState::Resyncing { pending } => pending
            .iter()
            .map(|e| (e.disk.get(), e.offset, e.offset + e.length))
            .collect(),
    };
    let source = &w.source[p.durable_seq.get() as usize];
    let has_consistent_state = !matches!(p.state, GroupState::InitialSync);
    // A disk added to the consistent group and still syncing is written
    // in place, like an initial sync, and checked once resumed.
    let sizes = g.disks();
    let joined = |d: &tidemark_receiver::store::DiskSync| {
        sizes.iter().any(|s| s.id == d.id && s.size == d.synced)
    };
    for d in p.disks.iter().filter(|d| has_consistent_state && joined(d)) {
        let disk = d.id.index();
        let now = read_disk(g, None, disk);
        for (i, byte) in now.iter().enumerate() {
            let waits = pending
                .iter()
                .any(|&(pd, s, e)| pd == d.id.get() && (s..e).contains(&(i as u64)));
            assert!(
                waits || source[disk].get(i) == Some(byte),
                "{what}: disk {disk} byte {i} is not the source's at seq {}",
                p.durable_seq
            );
        }
    }
    resume_from
}
