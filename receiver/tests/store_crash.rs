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

use std::collections::BTreeMap;
use tidemark_durable::dir::SimFileState;
use tidemark_durable::{LogDir, SimDir};
use tidemark_receiver::pin::PIN_FILE;
use tidemark_receiver::store::{Applied, Position, ReplicaGroup, Retention, StoreError};

mod crash_stream;
use crash_stream::{check_committed, check_points, pin_before, workload, Op, Run, Workload};

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
    crash_stream::apply_op(g, op, |seq| {
        set_pin(test_failover, seq);
        Ok(())
    })
}

fn set_pin(test_failover: &SimDir, seq: Option<u64>) {
    match seq {
        Some(seq) => test_failover.put(PIN_FILE, format!("{seq}\n").into_bytes()),
        None => {
            let _ = test_failover.remove(PIN_FILE);
        }
    }
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

    let resume_from = check_committed(what, &g, w, probe, cut);
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
    crash_stream::check_newest(&format!("{what}, resumed"), &g, w);
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
    // Retention folded every point that held the disk that left: its image
    // is gone.
    assert!(g.points().iter().all(|p| p.seq.get() > w.left_after));
    assert!(!probe_dir
        .files()
        .contains_key(&format!("disk-{}.img", crash_stream::LEFT_DISK)));
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
