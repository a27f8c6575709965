//! Crash consistency of the change log, tested the hard way: a probe run
//! counts the syncs of a workload; then, for every sync point in turn, power
//! is cut there, and every state a restart could find is reopened: the
//! durable state, the durable state plus every prefix of the unsynced tail,
//! and the same with a bit flipped at every offset of the tail. Each time,
//! the log must recover exactly a prefix of what was appended, holding at
//! least everything acknowledged as durable, never a damaged record and never
//! a record after a damaged one; every barrier must carry the durable
//! watermark of its append; and the log must take new records after it, in
//! a new generation above every sequence number ever appended.
//!
//! Each workload runs twice: write-through (every append written at once)
//! and buffered, the way the tracker drives the log: appends only copy
//! into the log's buffer, and the detached I/O (`take_io` / `complete_io`)
//! writes batches out and syncs for barriers, with appends going on while
//! a batch is in flight.
//!
//! Damage a crash cannot leave is refused instead of cut, in both modes: a
//! bit flipped in a record at or below the durable watermark after a crash,
//! and after a clean stop a bit flipped at every byte of the newest
//! segment, a zeroed page, a file cut at every record boundary.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::collections::BTreeMap;
use tidemark_changelog::segment::SEGMENT_HEADER_LEN;
use tidemark_changelog::storage::SimFileState;
use tidemark_changelog::{
    check, write_cursor, ChangeLog, DiskId, Entry, Kind, LogIo, LogOptions, LogReader, OpenError,
    RecoveryPolicy, Seq, SimDir,
};

const OPTS: LogOptions = LogOptions {
    segment_size: 4096,
    size_limit: 4096 * 12,
};

#[derive(Debug, Clone)]
enum Op {
    Write {
        disk: DiskId,
        offset: u64,
        data: Vec<u8>,
    },
    Trim {
        disk: DiskId,
        offset: u64,
        length: u64,
    },
    Marker(String),
    Barrier,
    /// The shipper reports the receiver durable up to the last barrier.
    Acknowledge,
    /// Buffered mode: finish the batch in flight, start writing out what
    /// is buffered (it stays in flight over the next appends).
    WriteOut,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owned {
    kind: Kind,
    flags: u16,
    disk: DiskId,
    offset: u64,
    length: u64,
    payload: Vec<u8>,
}

impl Owned {
    /// The entry as appended (a barrier's offset, its durable-upto, is the
    /// log's to fill in and checked apart).
    fn of(e: &Entry<'_>) -> Owned {
        Owned {
            kind: e.kind,
            flags: e.flags,
            disk: e.disk,
            offset: if e.kind == Kind::Barrier { 0 } else { e.offset },
            length: e.length,
            payload: e.payload.to_vec(),
        }
    }
}

fn workload(seed: u64, ops: usize) -> Vec<Op> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut next = move || rng.next_u64();
    (0..ops)
        .map(|i| match next() % 16 {
            0..=8 => {
                let len = 1 + (next() % 400) as usize;
                let fill = (i % 251) as u8;
                Op::Write {
                    disk: DiskId((next() % 2) as u32),
                    offset: (next() % 64) * 512,
                    data: (0..len).map(|j| fill.wrapping_add(j as u8)).collect(),
                }
            }
            9 => Op::Trim {
                disk: DiskId(0),
                offset: (next() % 64) * 512,
                length: 4096,
            },
            10 => Op::Marker(format!("m{i}")),
            11 => Op::Acknowledge,
            12 | 13 => Op::WriteOut,
            _ => Op::Barrier,
        })
        .collect()
}

/// What one run appended and what it was told was durable.
struct Run {
    appended: BTreeMap<Seq, Owned>,
    /// Each barrier's durable-upto: the log's durable seq at its append.
    durable_upto: BTreeMap<Seq, Seq>,
    acked_durable: Seq,
    crashed: bool,
}

fn run(dir: &SimDir, ops: &[Op], buffered: bool) -> Run {
    let mut out = Run {
        appended: BTreeMap::new(),
        durable_upto: BTreeMap::new(),
        acked_durable: Seq::ZERO,
        crashed: false,
    };
    let fresh = RecoveryPolicy::CleanStop { last_seq: None };
    let Ok((mut log, _)) = ChangeLog::open(dir.clone(), OPTS, fresh, 1) else {
        out.crashed = true;
        return out;
    };
    log.set_buffered(buffered);
    // Buffered mode: the I/O taken from the log and not yet run.
    let mut in_flight: Option<LogIo<SimDir>> = None;
    let finish = |log: &mut ChangeLog<SimDir>, io: &mut Option<LogIo<SimDir>>| {
        io.take().map_or(Ok(()), |mut io| {
            let result = io.run();
            log.complete_io(io, result)
        })
    };
    let mut last_barrier = Seq::ZERO;
    for (i, op) in ops.iter().enumerate() {
        let ts = i as u64;
        let entry = match op {
            Op::Write { disk, offset, data } => Entry::write(*disk, *offset, data, ts),
            Op::Trim {
                disk,
                offset,
                length,
            } => Entry::trim(*disk, *offset, *length, ts),
            Op::Marker(label) => Entry::marker(label, i % 2 == 0, ts),
            Op::Barrier => Entry::barrier(ts),
            Op::Acknowledge => {
                if write_cursor(dir, last_barrier).is_err() {
                    out.crashed = true;
                    return out;
                }
                continue;
            }
            Op::WriteOut => {
                let written = if buffered {
                    finish(&mut log, &mut in_flight).map(|()| {
                        in_flight = log.take_io(None, true);
                    })
                } else {
                    log.write_out()
                };
                if written.is_err() {
                    out.crashed = true;
                    return out;
                }
                continue;
            }
        };
        let durable_before = log.durable_seq();
        match log.append(&entry) {
            Ok(seq) => {
                out.appended.insert(seq, Owned::of(&entry));
                if matches!(op, Op::Barrier) {
                    out.durable_upto.insert(seq, durable_before);
                    let synced = if buffered {
                        // Group commit the way the tracker runs it.
                        finish(&mut log, &mut in_flight).and_then(|()| {
                            while let Some(mut io) = log.take_io(Some(seq), false) {
                                let result = io.run();
                                log.complete_io(io, result)?;
                            }
                            Ok(log.durable_seq())
                        })
                    } else {
                        log.sync()
                    };
                    match synced {
                        Ok(durable) => {
                            assert!(durable >= seq, "a barrier's sync left it not durable");
                            out.acked_durable = seq;
                            last_barrier = seq;
                        }
                        Err(_) => {
                            out.crashed = true;
                            return out;
                        }
                    }
                }
            }
            Err(tidemark_changelog::AppendError::Overflow { .. }) => {
                panic!("workload overflowed the log; enlarge the test's size limit")
            }
            Err(_) => {
                out.crashed = true;
                return out;
            }
        }
    }
    if finish(&mut log, &mut in_flight).is_err() {
        out.crashed = true;
    }
    out
}

/// Every state a restart could find after the crash: (description, files).
fn crash_states(
    files: &BTreeMap<String, SimFileState>,
) -> Vec<(String, BTreeMap<String, Vec<u8>>)> {
    let base: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(n, f)| (n.clone(), f.durable.clone()))
        .collect();
    let mut states = vec![("durable only".to_string(), base.clone())];
    for (name, f) in files {
        if f.written == f.durable {
            continue;
        }
        let Some(first) = (0..f.written.len().max(f.durable.len()))
            .find(|&i| f.written.get(i) != f.durable.get(i))
        else {
            continue;
        };
        let last = (0..f.written.len())
            .rev()
            .find(|&i| f.written.get(i) != f.durable.get(i))
            .map_or(first, |i| i + 1);
        for k in 0..=(last - first) {
            let mut content = f.durable.clone();
            if content.len() < first + k {
                content.resize(first + k, 0);
            }
            content[first..first + k].copy_from_slice(&f.written[first..first + k]);
            let mut state = base.clone();
            state.insert(name.clone(), content.clone());
            states.push((format!("{name}: tail cut after {k} bytes"), state));
            if k < last - first {
                let mut flipped = content;
                if flipped.len() < first + k + 1 {
                    flipped.resize(first + k + 1, 0);
                }
                flipped[first + k] = f.written[first + k] ^ (1 << (k % 8));
                let mut state = base.clone();
                state.insert(name.clone(), flipped);
                states.push((format!("{name}: bit flipped at tail byte {k}"), state));
            }
        }
    }
    states
}

fn verify_recovery(what: &str, state: BTreeMap<String, Vec<u8>>, run: &Run) {
    let dir = SimDir::from_files(state);
    // The checker may see a torn tail, but never damage before the last
    // acknowledged barrier.
    let report = check(&dir).unwrap();
    for p in &report.problems {
        assert!(
            p.last_valid_seq.unwrap_or(Seq::ZERO) >= run.acked_durable,
            "{what}: damage reported before the durable point: {p:?}"
        );
    }
    let (mut log, recovery) = ChangeLog::open(dir.clone(), OPTS, RecoveryPolicy::Crash, 99)
        .unwrap_or_else(|e| panic!("{what}: reopen failed: {e}"));
    let mut reader = LogReader::new(dir.clone(), Seq::ZERO);
    let mut seen = Vec::new();
    while let Some(record) = reader
        .next_record()
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"))
    {
        let seq = record.header.seq;
        let expected = run
            .appended
            .get(&seq)
            .unwrap_or_else(|| panic!("{what}: recovered seq {seq} that was never appended"));
        assert_eq!(
            &Owned::of(&record.as_entry()),
            expected,
            "{what}: record {seq} differs"
        );
        if record.header.kind == Kind::Barrier {
            assert_eq!(
                record.header.durable_upto(),
                run.durable_upto.get(&seq).copied(),
                "{what}: barrier {seq} carries the wrong durable-upto"
            );
        }
        seen.push(seq);
    }
    for pair in seen.windows(2) {
        assert_eq!(pair[1], pair[0].next(), "{what}: gap in recovered records");
    }
    let last = seen
        .last()
        .copied()
        .unwrap_or(recovery.first_seq.saturating_prev());
    assert!(
        last >= run.acked_durable,
        "{what}: lost acknowledged records: recovered up to {last}, acknowledged {}",
        run.acked_durable
    );
    assert_eq!(
        recovery.last_seq,
        seen.last().copied(),
        "{what}: recovery report"
    );
    // After a crash the recovered log takes new records in a new
    // generation above every sequence number a reader could have seen,
    // which is above every one ever appended: none is handed out twice.
    if recovery.cut.is_some() {
        assert!(
            matches!(
                log.append(&Entry::barrier(100)),
                Err(tidemark_changelog::AppendError::NewGenerationRequired)
            ),
            "{what}: records were cut, yet the log takes records in the old generation"
        );
    }
    let ever = run
        .appended
        .keys()
        .next_back()
        .copied()
        .unwrap_or(Seq::ZERO);
    assert!(
        recovery.max_exposed_seq >= ever,
        "{what}: sequence number {ever} was appended, but only {} is said exposed",
        recovery.max_exposed_seq
    );
    log.begin_generation(
        recovery.generation + 1,
        recovery.max_exposed_seq.next(),
        100,
    )
    .unwrap();
    let seq = log.barrier(100).unwrap();
    assert_eq!(
        seq,
        recovery.max_exposed_seq.next(),
        "{what}: next sequence number"
    );
    let mut reader = LogReader::new(dir.clone(), seq);
    assert_eq!(
        reader.next_record().unwrap().map(|r| r.header.seq),
        Some(seq),
        "{what}"
    );
    assert!(
        check(&dir).unwrap().is_clean(),
        "{what}: log not clean after recovery"
    );
}

fn crash_at_every_sync_point(seed: u64, ops: usize, buffered: bool) {
    let ops = workload(seed, ops);
    let probe = SimDir::new();
    let full = run(&probe, &ops, buffered);
    assert!(!full.crashed);
    let syncs = probe.syncs();
    assert!(
        syncs > 20,
        "workload too small to be interesting: {syncs} syncs"
    );
    let mut states_checked = 0;
    for n in 1..=syncs {
        let dir = SimDir::new();
        dir.cut_power_at_sync(n);
        let r = run(&dir, &ops, buffered);
        assert!(r.crashed, "power cut at sync {n} went unnoticed");
        for (what, state) in crash_states(&dir.durable_files()) {
            verify_recovery(
                &format!("seed {seed}, buffered {buffered}, power cut at sync {n}/{syncs}, {what}"),
                state,
                &r,
            );
            states_checked += 1;
        }
    }
    eprintln!("seed {seed}, buffered {buffered}: {syncs} sync points, {states_checked} crash states verified");
    assert!(states_checked as u64 > syncs * 10);
}

#[test]
fn crash_at_every_sync_point_seed_1() {
    crash_at_every_sync_point(0x9e37_79b9_7f4a_7c15, 140, false);
}

#[test]
fn crash_at_every_sync_point_seed_2() {
    crash_at_every_sync_point(0x2545_f491_4f6c_dd1d, 140, false);
}

#[test]
fn crash_at_every_sync_point_buffered_seed_1() {
    crash_at_every_sync_point(0x9e37_79b9_7f4a_7c15, 140, true);
}

#[test]
fn crash_at_every_sync_point_buffered_seed_2() {
    crash_at_every_sync_point(0x2545_f491_4f6c_dd1d, 140, true);
}

/// The workload's log after a clean stop (a final barrier, synced): its
/// files, the newest segment's name and the last sequence number.
fn cleanly_stopped(seed: u64, buffered: bool) -> (BTreeMap<String, Vec<u8>>, String, Seq) {
    let dir = SimDir::new();
    let r = run(&dir, &workload(seed, 140), buffered);
    assert!(!r.crashed);
    let (mut log, _) = ChangeLog::open(dir.clone(), OPTS, RecoveryPolicy::Crash, 1).unwrap();
    log.set_buffered(buffered);
    let last = log.barrier(1000).unwrap();
    drop(log);
    let files = dir.files();
    let newest = files.keys().rfind(|n| n.ends_with(".seg")).unwrap().clone();
    (files, newest, last)
}

/// Opens `state` under `policy`: it must refuse with the damage named in
/// `segment`, change no file, and `check` must report the damage too.
fn assert_refused(what: &str, state: &BTreeMap<String, Vec<u8>>, policy: RecoveryPolicy) {
    let dir = SimDir::from_files(state.clone());
    match ChangeLog::open(dir.clone(), OPTS, policy, 5) {
        Err(OpenError::Damaged { .. }) => {}
        Err(e) => panic!("{what}: refused for another reason: {e}"),
        Ok((_, recovery)) => panic!("{what}: opened, recovery {recovery:?}"),
    }
    assert_eq!(&dir.files(), state, "{what}: the refusal changed files");
    assert!(
        !check(&dir).unwrap().is_clean(),
        "{what}: check calls the damaged log clean"
    );
}

#[test]
fn damage_after_a_clean_stop_is_refused_at_every_byte_of_the_newest_segment() {
    damage_after_a_clean_stop_is_refused(false);
}

#[test]
fn damage_after_a_clean_stop_is_refused_at_every_byte_of_the_newest_segment_buffered() {
    damage_after_a_clean_stop_is_refused(true);
}

fn damage_after_a_clean_stop_is_refused(buffered: bool) {
    let (files, newest, last) = cleanly_stopped(0x9e37_79b9_7f4a_7c15, buffered);
    // The receiver holds every record. A newest segment cut shorter than
    // its header reads, to `check`, like a roll that never completed: only
    // the clean stop's last record (which the open has, `check` not) or a
    // shipper's cursor past what is left reveals the loss.
    let files = {
        let dir = SimDir::from_files(files);
        write_cursor(&dir, last).unwrap();
        dir.files()
    };
    let policy = RecoveryPolicy::CleanStop {
        last_seq: Some(last),
    };
    let pristine = &files[&newest];
    // The pristine log opens, and recovery changes nothing in it.
    let dir = SimDir::from_files(files.clone());
    let (_, recovery) = ChangeLog::open(dir.clone(), OPTS, policy, 5).unwrap();
    assert_eq!(recovery.last_seq, Some(last));
    assert!(recovery.cut.is_none());
    assert_eq!(dir.files(), files);
    let mut states = 0;
    for at in 0..pristine.len() {
        let mut state = files.clone();
        state.get_mut(&newest).unwrap()[at] ^= 1 << (at % 8);
        assert_refused(&format!("bit flipped at byte {at}"), &state, policy);
        states += 1;
    }
    for len in 0..pristine.len() {
        let mut state = files.clone();
        state.get_mut(&newest).unwrap().truncate(len);
        assert_refused(&format!("cut to {len} bytes"), &state, policy);
        states += 1;
    }
    for page in (0..pristine.len()).step_by(512) {
        let mut state = files.clone();
        let bytes = state.get_mut(&newest).unwrap();
        if bytes[page..page + 512].iter().all(|b| *b == 0) {
            continue;
        }
        bytes[page..page + 512].fill(0);
        assert_refused(&format!("512 bytes zeroed at {page}"), &state, policy);
        states += 1;
    }
    // The newest segment gone: the log ends before the clean stop's last
    // record.
    let mut state = files.clone();
    state.remove(&newest);
    assert_refused("the newest segment removed", &state, policy);
    eprintln!("{states} damaged states refused");
}

#[test]
fn after_a_crash_damage_at_or_below_the_durable_watermark_is_refused_above_it_cut() {
    damage_after_a_crash_is_refused_at_or_below_the_watermark(false);
}

#[test]
fn after_a_crash_damage_at_or_below_the_durable_watermark_is_refused_above_it_cut_buffered() {
    damage_after_a_crash_is_refused_at_or_below_the_watermark(true);
}

fn damage_after_a_crash_is_refused_at_or_below_the_watermark(buffered: bool) {
    let (files, newest, last) = cleanly_stopped(0x2545_f491_4f6c_dd1d, buffered);
    let pristine = &files[&newest];
    // Where each record of the newest segment starts, and its seq.
    let dir = SimDir::from_files(files.clone());
    let report = check(&dir).unwrap();
    let summary = report.segments.last().unwrap();
    assert_eq!(summary.name, newest);
    let watermark = report.durable_upto.unwrap();
    assert_eq!(
        watermark,
        last.saturating_prev(),
        "the final barrier covers every record before it"
    );
    // The final barrier (56 bytes) is the only record above the watermark.
    let barrier_at = summary.end_offset as usize - 56;
    assert!(
        barrier_at > SEGMENT_HEADER_LEN as usize,
        "records before the final barrier"
    );
    for at in SEGMENT_HEADER_LEN as usize..barrier_at {
        let mut state = files.clone();
        state.get_mut(&newest).unwrap()[at] ^= 1 << (at % 8);
        assert_refused(
            &format!("bit flipped at byte {at}"),
            &state,
            RecoveryPolicy::Crash,
        );
    }
    for at in barrier_at..barrier_at + 56 {
        let mut state = files.clone();
        state.get_mut(&newest).unwrap()[at] ^= 1 << (at % 8);
        let dir = SimDir::from_files(state);
        let (mut log, recovery) = ChangeLog::open(dir.clone(), OPTS, RecoveryPolicy::Crash, 5)
            .unwrap_or_else(|e| panic!("byte {at} of the final barrier: {e}"));
        let cut = recovery.cut.expect("the torn barrier was cut");
        assert_eq!(
            (cut.segment.as_str(), cut.offset, cut.first_seq),
            (newest.as_str(), barrier_at as u64, last)
        );
        assert_eq!(recovery.last_seq, Some(last.saturating_prev()));
        assert!(recovery.max_exposed_seq >= last);
        log.begin_generation(recovery.generation + 1, recovery.max_exposed_seq.next(), 6)
            .unwrap();
        assert!(
            log.barrier(7).unwrap() > last,
            "sequence number {last} handed out twice"
        );
        assert!(check(&dir).unwrap().is_clean());
    }
    assert_eq!(pristine.len() as u64, OPTS.segment_size);
}
