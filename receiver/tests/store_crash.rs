//! The replica store under simulated power cuts. A seeded random stream
//! over three disks (an initial sync interleaved with records, then
//! writes, write-zeroes with and without holes, trims, barriers, app
//! markers, a resync of an extent, folds by retention over small journal
//! segments) is applied to a group on a `SimDir`, with power cut at every
//! sync point in turn. Every state a restart could then find (only what was
//! synced; everything written; for each file with unsynced changes, some of
//! them, and one of them torn) is reopened and held to three rules:
//!
//! - every point the store lists reads exactly as the source did at it;
//! - the position it reports is one it committed, no older than the last
//!   commit it acknowledged, and its newest state reads as the source at
//!   that position (outside what it still waits for): it never claims
//!   more than what survived;
//! - resuming the stream where that position says (after sending again
//!   records it already holds: duplicates, ignored) ends at the source's
//!   final state, with the same position as a run that never crashed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use tidemark_changelog::{DiskId, Entry, Record, Seq};
use tidemark_durable::dir::SimFileState;
use tidemark_durable::{LogDir, SimDir};
use tidemark_names::Name;
use tidemark_receiver::pin::PIN_FILE;
use tidemark_receiver::store::{
    Applied, ChunkRef, Disk, GroupState, Position, Purpose, ReplicaGroup, Retention, StoreError,
};

const SIZES: [u64; 3] = [16 << 10, 8 << 10, (12 << 10) + 512];
const SECTOR: u64 = 512;

fn specs() -> Vec<Disk> {
    SIZES
        .iter()
        .enumerate()
        .map(|(i, size)| Disk {
            id: DiskId(i as u32),
            name: Name::new(format!("disk{i}")).unwrap(),
            size: *size,
        })
        .collect()
}

/// One step of the stream the shipper sends.
#[derive(Debug, Clone)]
enum Op {
    /// Announce the disks (creates their images, durably).
    Disks,
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
    /// A test failover pins this point (`Some`) or ends (`None`): another
    /// process writes the pin, so it is outside the power cut.
    Pin(Option<u64>),
}

/// The stream and the source it describes.
struct Workload {
    ops: Vec<Op>,
    /// The source's disks after each sequence number (index 0: before any).
    source: Vec<Vec<Vec<u8>>>,
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

    /// A random extent of a random disk, in sectors.
    fn extent(rng: &mut StdRng, max_sectors: u64) -> (u32, u64, u64) {
        let disk = rng.random_range(0..SIZES.len());
        let sectors = SIZES[disk] / SECTOR;
        let len = rng.random_range(1..=max_sectors.min(sectors));
        let at = rng.random_range(0..=sectors - len);
        (disk as u32, at * SECTOR, len * SECTOR)
    }

    /// A random change, barrier or marker.
    fn random_record(&mut self, rng: &mut StdRng) {
        let ts = self.seq * 1000;
        match rng.random_range(0..10) {
            0..=3 => {
                let (disk, offset, len) = Source::extent(rng, 6);
                // Not whole sectors: the store takes any byte range.
                let len = len - rng.random_range(0..SECTOR / 2);
                let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                self.record(Entry::write(disk, offset, &data, ts));
            }
            4 => {
                let (disk, offset, len) = Source::extent(rng, 8);
                let no_hole = rng.random();
                self.record(Entry::write_zeroes(disk, offset, len, no_hole, ts));
            }
            5 => {
                let (disk, offset, len) = Source::extent(rng, 8);
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

fn workload(seed: u64, steady_ops: usize) -> Workload {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut s = Source {
        disks: SIZES.iter().map(|n| vec![0u8; *n as usize]).collect(),
        states: Vec::new(),
        ops: vec![Op::Disks],
        seq: 0,
        points_now: false,
        last_point: None,
    };
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
        if i == steady_ops * 3 / 4 && pinned {
            s.ops.push(Op::Pin(None));
        }
        if i == steady_ops / 2 {
            let (disk, offset, length) = Source::extent(&mut rng, 8);
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
    }
}

/// Opens the group on `dir` with the small segments, frequent journal
/// indexes and tight retention the test wants folds, segment removals and
/// index writes from (none of them is persisted).
fn open(dir: &SimDir, test_failover: &SimDir) -> Result<ReplicaGroup<SimDir>, StoreError> {
    let mut g = ReplicaGroup::open_on(dir.clone(), test_failover.clone())?;
    g.set_segment_size(2048);
    // A journal index every 1 KiB of history: crashes hit its writes, and
    // reopening uses it.
    g.set_index_interval(1024);
    g.set_retention(Retention {
        window: std::time::Duration::MAX,
        max_points: 3,
        max_space: None,
        fold_interval: std::time::Duration::ZERO,
    });
    Ok(g)
}

/// Applies one op; `Some(position)` when it made a position durable.
/// `test_failover` is the directory the pin is written to.
fn apply(
    g: &mut ReplicaGroup<SimDir>,
    test_failover: &SimDir,
    op: &Op,
) -> Result<Option<Position>, StoreError> {
    match op {
        Op::Pin(seq) => {
            set_pin(test_failover, *seq);
            Ok(None)
        }
        Op::Disks => g.ensure_disks(&specs()).map(|()| Some(g.position())),
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
    }
}

fn set_pin(test_failover: &SimDir, seq: Option<u64>) {
    match seq {
        Some(seq) => test_failover.put(PIN_FILE, format!("{seq}\n").into_bytes()),
        None => {
            let _ = test_failover.remove(PIN_FILE);
        }
    }
}

/// The pin as of `ops[..upto]`.
fn pin_before(ops: &[Op], upto: usize) -> Option<u64> {
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
struct Run {
    /// (op index, position) of every op that returned a durable position;
    /// index `None` for opening the group.
    durable: Vec<(Option<usize>, Position)>,
    /// The op that failed (the power cut), `None` for the open.
    crashed_at: Option<Option<usize>>,
    final_position: Option<Position>,
}

fn run(dir: &SimDir, ops: &[Op]) -> Run {
    let mut r = Run {
        durable: Vec::new(),
        crashed_at: None,
        final_position: None,
    };
    let test_failover = SimDir::new();
    let mut g = match open(dir, &test_failover) {
        Ok(g) => g,
        Err(_) => {
            r.crashed_at = Some(None);
            return r;
        }
    };
    r.durable.push((None, g.position()));
    for (i, op) in ops.iter().enumerate() {
        match apply(&mut g, &test_failover, op) {
            Ok(Some(p)) => r.durable.push((Some(i), p)),
            Ok(None) => {}
            Err(_) => {
                r.crashed_at = Some(Some(i));
                return r;
            }
        }
    }
    r.final_position = Some(g.position());
    r
}

fn read_disk(g: &ReplicaGroup<SimDir>, seq: Option<u64>, disk: usize) -> Vec<u8> {
    let mut buf = vec![0u8; SIZES[disk] as usize];
    g.view(seq.map(Seq))
        .expect("a readable view")
        .read(DiskId(disk as u32), 0, &mut buf)
        .expect("a readable disk");
    buf
}

/// Every point `g` lists reads as the source did at it.
fn check_points(what: &str, g: &ReplicaGroup<SimDir>, w: &Workload) -> usize {
    let points = g.points();
    for p in &points {
        for disk in 0..SIZES.len() {
            assert!(
                read_disk(g, Some(p.seq.get()), disk) == w.source[p.seq.get() as usize][disk],
                "{what}: point {} of disk {disk} differs from the source",
                p.seq
            );
        }
    }
    points.len()
}

/// Every state a restart could find after the cut, as (description,
/// files): what was synced; everything written; and for each file with
/// unsynced changes, a few prefixes of its changed bytes and one torn byte
/// among them. A file whose length shrank (a cut journal tail) is either
/// cut or not.
fn crash_states(dir: &SimDir) -> Vec<(String, BTreeMap<String, Vec<u8>>)> {
    let files = dir.durable_files();
    let base = dir.after_power_cut();
    let mut states = vec![("only what was synced".to_string(), base.clone())];
    let dirty: Vec<(&String, &SimFileState)> = files
        .iter()
        .filter(|(_, f)| f.written != f.durable)
        .collect();
    if dirty.is_empty() {
        return states;
    }
    let mut all = base.clone();
    for (name, f) in &dirty {
        all.insert((*name).clone(), f.written.clone());
    }
    states.push(("everything written".to_string(), all));
    for (name, f) in dirty {
        if f.written.len() < f.durable.len() {
            continue;
        }
        let changed: Vec<usize> = (0..f.written.len())
            .filter(|&i| f.durable.get(i) != Some(&f.written[i]))
            .collect();
        let n = changed.len();
        let partial = |k: usize| {
            let mut content = f.durable.clone();
            for &i in &changed[..k] {
                if content.len() <= i {
                    content.resize(i + 1, 0);
                }
                content[i] = f.written[i];
            }
            content
        };
        let mut cuts: Vec<usize> = vec![1, n / 3, 2 * n / 3, n - 1];
        cuts.retain(|&k| k > 0 && k < n);
        cuts.dedup();
        for k in cuts {
            let mut state = base.clone();
            state.insert(name.clone(), partial(k));
            states.push((format!("{name}: {k} of {n} changed bytes"), state));
        }
        let k = n / 2;
        let mut torn = partial(k);
        let i = changed[k];
        if torn.len() <= i {
            torn.resize(i + 1, 0);
        }
        torn[i] = f.written[i] ^ 0x10;
        let mut state = base.clone();
        state.insert(name.clone(), torn);
        states.push((format!("{name}: torn at changed byte {k} of {n}"), state));
    }
    states
}

/// Reopens `files` and holds the group to the rules (see the module);
/// `resume` also replays the rest of the stream on it.
fn verify(
    what: &str,
    files: BTreeMap<String, Vec<u8>>,
    w: &Workload,
    probe: &Run,
    cut: &Run,
    resume: bool,
) {
    let stopped = cut.crashed_at.expect("the run crashed");
    let dir = SimDir::from_files(files);
    let test_failover = SimDir::new();
    let pin = pin_before(&w.ops, stopped.map_or(0, |i| i + 1));
    set_pin(&test_failover, pin);
    let mut g = open(&dir, &test_failover)
        .unwrap_or_else(|e| panic!("{what}: the group does not reopen: {e}"));
    check_points(what, &g, w);
    if let Some(seq) = pin {
        assert!(
            g.points().iter().any(|p| p.seq.get() == seq),
            "{what}: the pinned point {seq} is gone"
        );
    }

    // The position is one the store committed, between the last one it
    // acknowledged and the op the power cut stopped.
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
    for d in p.disks.iter().filter(|_| has_consistent_state) {
        let disk = d.id.index();
        let now = read_disk(&g, None, disk);
        for (i, byte) in now.iter().enumerate() {
            let waits = pending
                .iter()
                .any(|&(pd, s, e)| pd == d.id.get() && (s..e).contains(&(i as u64)));
            assert!(
                waits || *byte == source[disk][i],
                "{what}: disk {disk} byte {i} is not the source's at seq {}",
                p.durable_seq
            );
        }
    }
    if !resume {
        return;
    }

    // Resume: a few records it holds already, then the rest of the stream.
    let next = resume_from.map_or(0, |i| i + 1);
    let resent: Vec<&Op> = w.ops[..next]
        .iter()
        .filter(|op| matches!(op, Op::Record(_)))
        .rev()
        .take(3)
        .collect();
    for op in resent {
        if let Op::Record(rec) = op {
            assert_eq!(
                g.apply_record(rec)
                    .unwrap_or_else(|e| panic!("{what}: {e}")),
                Applied::Duplicate,
                "{what}: seq {} applied twice",
                rec.header.seq.get()
            );
        }
    }
    for (i, op) in w.ops.iter().enumerate().skip(next) {
        apply(&mut g, &test_failover, op)
            .unwrap_or_else(|e| panic!("{what}: resuming, op {i}: {e}"));
    }
    assert_eq!(
        Some(g.position()),
        probe.final_position,
        "{what}: resumed to another position"
    );
    let last = w.source.last().expect("a source");
    for (disk, want) in last.iter().enumerate() {
        assert!(
            read_disk(&g, None, disk) == *want,
            "{what}: resumed, disk {disk} differs from the source"
        );
    }
    check_points(&format!("{what}, resumed"), &g, w);
}

fn power_cut_at_every_sync_point(seed: u64, steady_ops: usize) {
    let w = workload(seed, steady_ops);
    let probe_dir = SimDir::new();
    let probe = run(&probe_dir, &w.ops);
    assert!(probe.crashed_at.is_none(), "the probe run failed");
    assert!(
        probe_dir.files().contains_key("journal-index"),
        "the workload writes a journal index, so cuts hit its writes and reopens use it"
    );
    // The probe itself ends right.
    let g = open(&probe_dir, &SimDir::new()).unwrap();
    let points = check_points("probe", &g, &w);
    assert!(points >= 2, "too few points to be interesting: {points}");
    drop(g);
    let syncs = probe_dir.syncs();
    assert!(syncs > 50, "too few sync points to be interesting: {syncs}");

    let mut states_checked = 0;
    for n in 1..=syncs {
        let dir = SimDir::new();
        dir.cut_power_at_sync(n);
        let cut = run(&dir, &w.ops);
        assert!(
            cut.crashed_at.is_some(),
            "power cut at sync {n} went unnoticed"
        );
        for (i, (what, files)) in crash_states(&dir).into_iter().enumerate() {
            // Resuming replays the whole rest of the stream: from the two
            // whole states of each cut, not from every partial one.
            verify(
                &format!("seed {seed}, power cut at sync {n}/{syncs}, {what}"),
                files,
                &w,
                &probe,
                &cut,
                i < 2,
            );
            states_checked += 1;
        }
    }
    eprintln!(
        "seed {seed}: {} ops, {syncs} sync points, {states_checked} crash states verified",
        w.ops.len()
    );
    assert!(states_checked as u64 > syncs * 2);
}

#[test]
fn power_cut_at_every_sync_point_seed_1() {
    power_cut_at_every_sync_point(1, 200);
}

#[test]
fn power_cut_at_every_sync_point_seed_2() {
    power_cut_at_every_sync_point(2, 200);
}
