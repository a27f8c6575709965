//! The Ceph store engine under simulated crashes: `store_crash.rs`'s
//! seeded stream (initial sync interleaved with records, then writes,
//! write-zeroes, trims, barriers, markers, a resync, a pin, folds by
//! retention over small journal segments) applied to a group on a
//! simulated cluster, cut at every cluster operation in turn. After each
//! cut the process dies (unflushed image writes are lost), a new client
//! reopens the group, and it is held to the same rules:
//!
//! - every point the store lists reads exactly as the source did at it;
//! - the position it reports is one it committed, no older than the last
//!   commit it acknowledged, and its newest state reads as the source at
//!   that position (outside what it still waits for);
//! - resuming the stream where that position says (after sending again
//!   records it already holds: duplicates, ignored) ends at the source's
//!   final state, with the same position as a run that never crashed.
//!
//! And a writer that a newer one opened after can commit nothing more.

use tidemark_ceph::{Cluster, SimCluster, SimWorld};
use tidemark_changelog::{Entry, Record, Seq};
use tidemark_names::Name;
use tidemark_receiver::store::ceph::{CephEngine, CephGroup};
use tidemark_receiver::store::StoreEngine;
use tidemark_receiver::store::{Applied, Position, Retention, StoreError};

const NAMESPACE: &str = "crash";

mod crash_stream;
use crash_stream::{check_committed, check_points, pin_before, workload, Op, Run, Workload};

/// The record after the stream's last one.
fn record_after(w: &Workload) -> Record {
    let seq = w.source.len() as u64;
    Record::decode(&Entry::barrier(0).encode(seq, 1)).expect("a valid record")
}

fn names() -> (Name, Name) {
    (Name::from_static("h1"), Name::from_static("g"))
}

/// A new process's engine: a new client of the cluster.
fn engine(world: &SimWorld) -> CephEngine<SimCluster> {
    CephEngine::new(world.client(NAMESPACE), "test")
}

/// Opens the group with the small segments, frequent journal indexes and
/// tight retention the test wants folds, segment removals and index writes
/// from.
fn open(engine: &CephEngine<SimCluster>) -> Result<CephGroup<SimCluster>, StoreError> {
    let (host, group) = names();
    let mut g = engine.open_group(&host, &group)?;
    g.set_segment_size(2048);
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
fn apply(
    g: &mut CephGroup<SimCluster>,
    engine: &CephEngine<SimCluster>,
    op: &Op,
) -> Result<Option<Position>, StoreError> {
    crash_stream::apply_op(g, op, |seq| {
        let (host, group) = names();
        engine.set_pin(&host, &group, seq.map(Seq))
    })
}

fn run(world: &SimWorld, ops: &[Op]) -> Run {
    let mut r = Run {
        durable: Vec::new(),
        crashed_at: None,
        final_position: None,
    };
    let engine = engine(world);
    let mut g = match open(&engine) {
        Ok(g) => g,
        Err(_) => {
            r.crashed_at = Some(None);
            return r;
        }
    };
    r.durable.push((None, g.position()));
    for (i, op) in ops.iter().enumerate() {
        match apply(&mut g, &engine, op) {
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

/// Reopens the crashed group with a new client and holds it to the rules
/// (see the module), then resumes the stream on it.
fn verify(what: &str, world: &SimWorld, w: &Workload, probe: &Run, cut: &Run) {
    let stopped = cut.crashed_at.expect("the run crashed");
    world.crash();
    let engine = engine(world);
    let (host, group) = names();
    let pin = pin_before(&w.ops, stopped.map_or(0, |i| i + 1));
    engine
        .set_pin(&host, &group, pin.map(Seq))
        .unwrap_or_else(|e| panic!("{what}: pinning: {e}"));
    let mut g =
        open(&engine).unwrap_or_else(|e| panic!("{what}: the group does not reopen: {e:?}"));
    check_points(what, &g, w);
    if let Some(seq) = pin {
        assert!(
            g.points().iter().any(|p| p.seq.get() == seq),
            "{what}: the pinned point {seq} is gone"
        );
    }

    let resume_from = check_committed(what, &g, w, probe, cut);

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
        apply(&mut g, &engine, op).unwrap_or_else(|e| panic!("{what}: resuming, op {i}: {e:?}"));
    }
    assert_eq!(
        Some(g.position()),
        probe.final_position,
        "{what}: resumed to another position"
    );
    crash_stream::check_newest(&format!("{what}, resumed"), &g, w);
    check_points(&format!("{what}, resumed"), &g, w);
    // Retention folded every point that held the disk that left: its RBD
    // image is gone, whether or not a cut fell between the state and it.
    assert!(g.points().iter().all(|p| p.seq.get() > w.left_after));
    assert!(
        world
            .client(NAMESPACE)
            .image_open_read_only(LEFT_IMAGE)
            .is_err(),
        "{what}: the image of the disk that left is still there"
    );
}

/// The RBD image of the disk the stream removes.
const LEFT_IMAGE: &str = "h1+g+disk-0";

fn cut_at_every_operation(seed: u64, steady_ops: usize) {
    let w = workload(seed, steady_ops);
    let probe_world = SimWorld::new();
    let probe = run(&probe_world, &w.ops);
    assert!(probe.crashed_at.is_none(), "the probe run failed");
    let probe_engine = engine(&probe_world);
    let (host, group) = names();
    assert!(probe_engine.exists(&host, &group));
    assert!(!probe_engine.exists(&host, &Name::from_static("other")));
    let g = open(&probe_engine).unwrap();
    let points = check_points("probe", &g, &w);
    assert!(points >= 2, "too few points to be interesting: {points}");
    assert!(g.points().iter().all(|p| p.seq.get() > w.left_after));
    assert!(probe_world
        .client(NAMESPACE)
        .image_open_read_only(LEFT_IMAGE)
        .is_err());
    // A reader opens it beside the writer, reads the same points, and can
    // change nothing.
    let mut reader = probe_engine.open_group_read_only(&host, &group).unwrap();
    assert_eq!(reader.points(), g.points());
    check_points("read-only", &reader, &w);
    assert!(
        reader.apply_record(&record_after(&w)).is_err(),
        "a read-only group applied a record"
    );
    drop((g, reader));
    // Operations of the run alone (the probe's reopen counts some more).
    let ops = {
        let world = SimWorld::new();
        run(&world, &w.ops);
        world.ops()
    };
    assert!(ops > 100, "too few operations to be interesting: {ops}");

    for n in 0..ops {
        let world = SimWorld::new();
        world.cut_at(Some(n));
        let cut = run(&world, &w.ops);
        assert!(cut.crashed_at.is_some(), "the cut at op {n} went unnoticed");
        verify(
            &format!("seed {seed}, cut at op {n}/{ops}"),
            &world,
            &w,
            &probe,
            &cut,
        );
    }
    eprintln!(
        "seed {seed}: {} stream ops, {ops} cluster operations, each cut and verified",
        w.ops.len()
    );
}

#[test]
fn cut_at_every_operation_seed_1() {
    cut_at_every_operation(1, 200);
}

#[test]
fn cut_at_every_operation_seed_2() {
    cut_at_every_operation(2, 200);
}

/// A writer that a newer writer opened after (a receiver that lost the
/// group) commits nothing more: its commit fails, and what the newer one
/// reads is what it committed.
#[test]
fn an_older_writer_is_fenced_by_the_newer_open() {
    let w = workload(3, 40);
    let world = SimWorld::new();
    let old_engine = engine(&world);
    let mut old = open(&old_engine).unwrap();
    let half = w.ops.len() / 2;
    for op in &w.ops[..half] {
        apply(&mut old, &old_engine, op).unwrap();
    }
    let acked = old.commit().unwrap();

    let new_engine = engine(&world);
    let new = open(&new_engine).unwrap();
    assert_eq!(
        new.position(),
        acked,
        "the new writer reads the last commit"
    );

    let mut refused = false;
    for op in &w.ops[half..] {
        if apply(&mut old, &old_engine, op).is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "the older writer kept committing");
    assert!(
        old.commit().is_err(),
        "the older writer commits after the newer open"
    );
    drop(new);
    let again = open(&engine(&world)).unwrap();
    assert_eq!(
        again.position(),
        acked,
        "the fenced writer changed the state"
    );
    check_points("after the fenced writer", &again, &w);
}

/// The journal's segments are RADOS objects, which the OSD refuses to grow
/// past `osd_max_object_size` (128 MiB by default; the simulation refuses
/// it too): the Ceph store begins a new segment well before that (its own
/// segment size, not a test's), so a history longer than one object is
/// applied and committed, and no segment comes near the limit.
#[test]
fn a_history_longer_than_an_object_is_kept_in_several_segments() {
    let w = workload(1, 20);
    let world = SimWorld::new();
    let e = engine(&world);
    let (host, group) = names();
    let mut g = e.open_group(&host, &group).unwrap();
    // Every point kept: nothing folds the history away.
    g.set_retention(Retention {
        window: std::time::Duration::MAX,
        max_points: u64::MAX,
        max_space: None,
        fold_interval: std::time::Duration::MAX,
    });
    for op in &w.ops {
        crash_stream::apply_op(&mut g, op, |_| Ok(())).unwrap();
    }
    let mut seq = w.source.len() as u64;
    // Disk 2 (the stream's disk 0 left the group): 8 KiB blocks fit it.
    let block = vec![0x5a; 8 << 10];
    let history: u64 = 160 << 20;
    let mut written = 0;
    while written < history {
        for _ in 0..512 {
            let rec = Record::decode(&Entry::write(2, 0, &block, seq).encode(seq, 1)).unwrap();
            g.apply_record(&rec).unwrap();
            seq += 1;
            written += block.len() as u64;
        }
        let rec = Record::decode(&Entry::barrier(seq).encode(seq, 1)).unwrap();
        g.apply_record(&rec).unwrap();
        seq += 1;
        g.commit().unwrap();
    }
    assert_eq!(g.position().durable_seq.get(), seq - 1);
    let c = world.client(NAMESPACE);
    let segments: Vec<(String, u64)> = c
        .omap("h1+g+dir", None, 1000)
        .unwrap()
        .entries
        .into_iter()
        .filter(|(key, _)| key.starts_with("journal."))
        .map(|(key, _)| {
            let size = c.stat(&format!("h1+g+{key}")).unwrap();
            (key, size)
        })
        .collect();
    assert!(segments.len() >= 2, "{segments:?}");
    let limit = tidemark_receiver::store::ceph::SEGMENT_SIZE + (8 << 20);
    assert!(
        segments.iter().all(|(_, size)| *size <= limit),
        "a segment grew past the store's segment size and one commit: {segments:?}"
    );
}
