//! The receiver is SIGKILLed again and again while a writer keeps the
//! disk busy: at random moments, as soon as it has applied records it has
//! not committed, and as soon as it begins to fold (aggressive retention
//! makes it fold at nearly every commit). `tidemark failover` is SIGKILLed
//! too: early, on a store a receiver's kill left in the middle of a fold
//! (it finishes the fold when it opens the store), and later while it
//! writes a point out. After every kill the store must open,
//! and every point it lists must read exactly as a reference replay of the
//! tracker's change log up to that point's sequence number; no listed
//! point may vanish except by being folded, and after the last catch-up
//! the newest state must be the source disk.
//!
//! The kill schedule comes from a seeded PRNG: the seed is printed and
//! `TIDEMARK_CRASH_SEED=<hex>` replays a schedule (the timing still
//! varies). A failing run keeps its directory and says where.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark_changelog::replay::{apply, MemoryImage, ReplaySummary};
use tidemark_changelog::{DiskId, FsDir, Kind, LogReader, Record, Seq};
use tidemark_e2e::replication::{
    enroll, free_port, run_ok, start_receiver_with, start_shipper_configured, wait_caught_up,
    Daemon, HOST,
};
use tidemark_e2e::{qemu_io, require_tool, tidemark, TrackerProcess};
use tidemark_receiver::store::ReplicaGroup;

const TEST: &str = "sigkilled_receiver_reopens_consistent_with_every_point_correct";
const SIZE: u64 = 32 << 20;
const KILLS: usize = 12;
const DEFAULT_SEED: u64 = 0x7d3e_51a9_c04b_2f61;
/// The writer stops after this much data, so the tracker's log (one
/// 256 MiB segment, never recycled) keeps every record for the reference.
const MAX_WRITTEN: u64 = 128 << 20;
/// Retention that folds at nearly every commit: a history of at most
/// 1 MiB and 5 points (the fold interval, 10 s and not configurable, only
/// delays count-based folds; space-based ones run at once, and the first
/// commit after a restart folds whatever is due).
const RETENTION: &str = "[receiver.retention]\nmax-points = 5\nmax-space = \"1MiB\"\n";

/// The fields of the store's state file this test looks at (the layout is
/// documented in receiver/src/store/mod.rs).
#[derive(Debug, Clone, Copy)]
struct StoreState {
    /// Bit 0: a fold is in progress.
    flags: u8,
    durable_seq: u64,
    /// Journal positions: where the history starts and ends.
    start: u64,
    end: u64,
}

fn read_state(group_dir: &Path) -> Option<StoreState> {
    let b = fs::read(group_dir.join("state")).ok()?;
    if b.len() < 68 || &b[0..4] != b"TMRS" {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    Some(StoreState {
        flags: b[7],
        durable_seq: u64_at(8),
        start: u64_at(40),
        end: u64_at(48),
    })
}

/// Whether the journal holds bytes past the committed end: the kill came
/// while records were being applied and not yet committed.
fn uncommitted_tail(group_dir: &Path, end: u64) -> bool {
    let (segment, offset) = (end >> 40, end & ((1 << 40) - 1));
    let len = |s: u64| fs::metadata(group_dir.join(format!("journal.{s:08x}"))).map(|m| m.len());
    len(segment).is_ok_and(|l| l > offset) || len(segment + 1).is_ok()
}

/// The disk as the tracker's change log says it was at any sequence
/// number (the disk starts blank): `base` is the state at `base_seq`, the
/// oldest point listed so far (folds only ever move it forward).
struct Reference {
    log_dir: PathBuf,
    base: MemoryImage,
    base_seq: u64,
}

/// Applies the log's records up to `seq` onto `image`; `pending` keeps the
/// first record after it.
fn replay_to(
    reader: &mut LogReader<FsDir>,
    pending: &mut Option<Record>,
    seq: u64,
    image: &mut MemoryImage,
) {
    let mut summary = ReplaySummary::default();
    loop {
        let record = match pending.take() {
            Some(r) => r,
            None => match reader.next_record().expect("reading the reference log") {
                Some(r) => r,
                None => panic!("the change log ends before sequence {seq}"),
            },
        };
        if record.header.seq.get() > seq {
            *pending = Some(record);
            return;
        }
        apply(&record, DiskId(0), image, &mut summary).unwrap();
        if record.header.seq.get() == seq {
            return;
        }
    }
}

impl Reference {
    /// Reads every point in `points` (ascending) of `group` and compares it
    /// with the replay; `also` gets each point and its reference content.
    /// Returns how many points were compared.
    fn check(
        &mut self,
        group: &ReplicaGroup,
        points: &[u64],
        what: &str,
        also: &mut dyn FnMut(u64, &[u8]),
    ) -> usize {
        assert!(points.windows(2).all(|w| w[0] < w[1]), "{what}: {points:?}");
        let Some(&oldest) = points.first() else {
            return 0;
        };
        assert!(
            oldest >= self.base_seq,
            "{what}: point {oldest} is listed, but an older listing's oldest point was {}: a folded point came back",
            self.base_seq
        );
        let mut reader = LogReader::new(
            FsDir::existing(&self.log_dir).unwrap(),
            Seq(self.base_seq + 1),
        );
        let mut pending = None;
        if oldest > self.base_seq {
            replay_to(&mut reader, &mut pending, oldest, &mut self.base);
            self.base_seq = oldest;
        }
        let mut state = MemoryImage(self.base.0.clone());
        let mut got = vec![0u8; 4 << 20];
        for &seq in points {
            if seq > oldest {
                replay_to(&mut reader, &mut pending, seq, &mut state);
            }
            let view = group
                .view(Some(Seq(seq)))
                .unwrap_or_else(|e| panic!("{what}: listed point {seq} cannot be read: {e}"));
            let mut at = 0usize;
            while at < SIZE as usize {
                let n = got.len().min(SIZE as usize - at);
                view.read(DiskId(0), at as u64, &mut got[..n])
                    .unwrap_or_else(|e| panic!("{what}: reading point {seq} at {at}: {e}"));
                let want = &state.0[at..at + n];
                if want != &got[..n] {
                    let i = want
                        .iter()
                        .zip(&got[..n])
                        .position(|(a, b)| a != b)
                        .unwrap();
                    panic!(
                        "{what}: point {seq} differs from the reference replay at byte {} (reads {:#04x}, the log says {:#04x})",
                        at + i,
                        got[i],
                        want[i]
                    );
                }
                at += n;
            }
            also(seq, &state.0);
        }
        points.len()
    }
}

/// The points `tidemark points --json` lists.
fn listed_points(replicas: &Path) -> Vec<u64> {
    run_ok(
        tidemark()
            .args(["points", "--json", "--data-dir"])
            .arg(replicas)
            .args(["--host", HOST]),
    )
    .lines()
    .map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["seq"].as_u64().unwrap()
    })
    .collect()
}

/// `tidemark failover --point SEQ --to DIR` as a command.
fn failover_cmd(replicas: &Path, seq: u64, to: &Path) -> Command {
    let mut cmd = tidemark();
    cmd.args(["failover", "--point", &seq.to_string(), "--data-dir"])
        .arg(replicas)
        .args(["--host", HOST, "--to"])
        .arg(to);
    cmd
}

/// Writes random extents (data, zeroes, discards) with a flush after each
/// batch, until `stop` or [`MAX_WRITTEN`]; returns (batches, bytes).
fn writer(uri: String, seed: u64, stop: Arc<AtomicBool>) -> (u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let (mut batches, mut written) = (0u64, 0u64);
    while !stop.load(Ordering::Relaxed) && written < MAX_WRITTEN {
        let mut cmds = Vec::new();
        for _ in 0..2 + rng.random_range(0..7) {
            // Up to 128 KiB, mostly short.
            let longest = 256 >> rng.random_range(0..3);
            let len = 512 * (1 + rng.random_range(0..longest));
            let offset = 512 * rng.random_range(0..(SIZE - len) / 512 + 1);
            cmds.push(match rng.random_range(0..10) {
                0 => format!("write -z {offset} {len}"),
                1 => format!("discard {offset} {len}"),
                _ => format!("write -P {} {offset} {len}", 1 + rng.random_range(0..255)),
            });
            written += len;
        }
        cmds.push("flush".into());
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&uri, &cmds);
        batches += 1;
        std::thread::sleep(Duration::from_millis(20 + rng.random_range(0..60)));
    }
    (batches, written)
}

/// Starts a shipper that reconnects within a few hundred milliseconds.
fn start_fast_shipper(dir: &Path, log_dir: &Path, hpki: &Path, port: u16) -> Daemon {
    start_shipper_configured(
        dir,
        log_dir,
        hpki,
        port,
        "[shipper.retry]\ninitial-backoff = \"100ms\"\nmax-backoff = \"400ms\"\n",
    )
}

/// Waits until the receiver's log (recreated at each start) shows that a
/// shipper's session started.
fn wait_session(log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fs::read_to_string(log).is_ok_and(|t| t.contains("session started")) {
        assert!(
            Instant::now() < deadline,
            "no session within 30 s:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// When a receiver is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moment {
    /// At a random moment of a session.
    Random,
    /// As soon as the journal holds uncommitted changes: applying records.
    Apply,
    /// As soon as the state file announces a fold.
    Fold,
}

/// Watches the store until `moment` comes (at most 5 s); how long it took.
fn wait_for(group_dir: &Path, moment: Moment) -> Option<Duration> {
    let watching = Instant::now();
    while watching.elapsed() < Duration::from_secs(5) {
        let hit = read_state(group_dir).is_some_and(|s| match moment {
            Moment::Random => true,
            Moment::Apply => uncommitted_tail(group_dir, s.end),
            Moment::Fold => s.flags & 1 != 0,
        });
        if hit {
            return Some(watching.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Keeps the test's directory (logs, store, change log) if it fails.
struct KeepOnPanic(Option<tempfile::TempDir>);

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(t) = self.0.take() {
                eprintln!("{TEST}: kept {} for inspection", t.keep().display());
            }
        }
    }
}

/// Samples the state file and counts how often the history's start moved
/// (each move is a fold), until `stop`.
fn watch_folds(group_dir: PathBuf, stop: Arc<AtomicBool>) -> u64 {
    let (mut folds, mut last) = (0u64, None);
    while !stop.load(Ordering::Relaxed) {
        if let Some(s) = read_state(&group_dir) {
            if last.is_some_and(|l| l != s.start) {
                folds += 1;
            }
            last = Some(s.start);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    folds
}

#[test]
fn sigkilled_receiver_reopens_consistent_with_every_point_correct() {
    if !require_tool("qemu-io", TEST) {
        return;
    }
    // Built before the clock starts.
    tidemark_e2e::tidemark_bin();
    let started = Instant::now();
    let seed = std::env::var("TIDEMARK_CRASH_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or(DEFAULT_SEED);
    eprintln!("{TEST}: seed {seed:#x} (TIDEMARK_CRASH_SEED=<hex> replays a schedule)");
    let mut rng = StdRng::seed_from_u64(seed);

    let tmp = KeepOnPanic(Some(tempfile::tempdir().unwrap()));
    let dir = tmp.0.as_ref().unwrap().path();
    let (rpki, hpki) = enroll(dir, HOST);
    let replicas = dir.join("replicas");
    let group_dir = tidemark_receiver::daemon::group_dir(
        &replicas,
        &tidemark_names::Name::from_static(HOST),
        &tidemark_names::Name::from_static("default"),
    );
    let port = free_port();
    let receiver_log = dir.join(format!("receiver-{port}.log"));
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();

    let mut receiver = Some(start_receiver_with(&replicas, dir, &rpki, port, RETENTION));
    // One log segment that is never recycled: the reference keeps every
    // record.
    let tracker = TrackerProcess::start(
        dir,
        &image,
        &["--segment-size", "256MiB", "--log-size-limit", "512MiB"],
    );
    let log_dir = tracker.log_dir.clone();
    let mut shipper = Some(start_fast_shipper(dir, &log_dir, &hpki, port));
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));

    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = {
        let (uri, stop) = (tracker.uri(), stop_writer.clone());
        std::thread::spawn(move || writer(uri, seed, stop))
    };
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (g, stop) = (group_dir.clone(), stop_watch.clone());
        std::thread::spawn(move || watch_folds(g, stop))
    };

    let mut reference = Reference {
        log_dir: log_dir.clone(),
        base: MemoryImage(vec![0u8; SIZE as usize]),
        base_seq: 0,
    };
    let (mut mid_fold, mut mid_apply, mut checked) = (0, 0, 0usize);
    let mut recovery_failover = None;
    let mut previous: Vec<u64> = Vec::new();
    let mut first_oldest = None;
    let mut durable = 0u64;
    for kill in 1..=KILLS {
        let running = match receiver.take() {
            Some(r) => r,
            None => {
                let r = start_receiver_with(&replicas, dir, &rpki, port, RETENTION);
                // A SIGKILLed receiver closes nothing: the old shipper would
                // notice only at the peer timeout (4 s). A new one
                // connects at once.
                if let Some(s) = shipper.take() {
                    assert!(s.stop().success());
                }
                shipper = Some(start_fast_shipper(dir, &log_dir, &hpki, port));
                r
            }
        };
        wait_session(&receiver_log);
        let moment = [Moment::Random, Moment::Apply, Moment::Fold][(kill - 1) % 3];
        let delay = 50 + rng.random_range(0..if moment == Moment::Random { 651 } else { 201 });
        std::thread::sleep(Duration::from_millis(delay));
        let came = wait_for(&group_dir, moment);
        running.kill();
        {
            use std::io::Write;
            let mut all = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("receivers.log"))
                .unwrap();
            writeln!(all, "===== killed ({kill})").unwrap();
            all.write_all(&fs::read(&receiver_log).unwrap()).unwrap();
        }

        let state = read_state(&group_dir).expect("the state file survives");
        let folding = state.flags & 1 != 0;
        let tail = uncommitted_tail(&group_dir, state.end);
        mid_fold += usize::from(folding);
        mid_apply += usize::from(tail);
        assert!(
            state.durable_seq >= durable,
            "kill {kill}: the durable sequence went back from {durable} to {}",
            state.durable_seq
        );
        durable = state.durable_seq;

        // The store as the kill left it: every point it lists is right.
        let what = format!("after kill {kill} (seed {seed:#x})");
        let group = ReplicaGroup::open_read_only(&group_dir)
            .unwrap_or_else(|e| panic!("{what}: the store does not open: {e}"));
        let points: Vec<u64> = group.points().iter().map(|p| p.seq.get()).collect();
        if let Some(&oldest) = points.first() {
            first_oldest.get_or_insert(oldest);
            for p in previous.iter().filter(|p| **p >= oldest) {
                assert!(
                    points.contains(p),
                    "{what}: point {p} was listed before and is gone without a fold: {previous:?} → {points:?}"
                );
            }
        }
        let mut newest_content = Vec::new();
        checked += reference.check(&group, &points, &what, &mut |seq, want| {
            if Some(&seq) == points.last() {
                newest_content = want.to_vec();
            }
        });
        let history = group.history_bytes();
        drop(group);
        eprintln!(
            "kill {kill} ({moment:?}, {delay} ms into a session{}): durable seq {}, fold in \
             progress: {folding}, uncommitted journal tail: {tail}; {} KiB of history, points \
             {points:?} correct; {:.1} s",
            match (moment, came) {
                (Moment::Random, _) => String::new(),
                (_, Some(t)) => format!(" + {} ms until it came", t.as_millis()),
                (_, None) => " + 5 s: it did not come".into(),
            },
            state.durable_seq,
            history >> 10,
            started.elapsed().as_secs_f64()
        );

        // After the first kill in the middle of a fold, `tidemark
        // failover` rather than the receiver opens the store first, which
        // finishes the fold: killed early (recovering or copying), then
        // run again to the end.
        if folding && recovery_failover.is_none() {
            let newest = *points.last().expect("a point");
            let to = dir.join("failover-after-fold-kill");
            // Killed as soon as it writes into the image: finishing the
            // fold.
            let image_written = || {
                fs::metadata(group_dir.join("disk-0.img"))
                    .and_then(|m| m.modified())
                    .unwrap()
            };
            let before = image_written();
            let mut child = failover_cmd(&replicas, newest, &to)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let spawned = Instant::now();
            while image_written() == before
                && child.try_wait().unwrap().is_none()
                && spawned.elapsed() < Duration::from_secs(10)
            {
                std::thread::sleep(Duration::from_micros(200));
            }
            let wait = spawned.elapsed().as_millis();
            let _ = child.kill();
            let killed = !child.wait().unwrap().success();
            let still_folding = read_state(&group_dir).unwrap().flags & 1 != 0;
            let group = ReplicaGroup::open_read_only(&group_dir).unwrap();
            let again: Vec<u64> = group.points().iter().map(|p| p.seq.get()).collect();
            assert_eq!(
                again, points,
                "{what}: the killed failover changed the points"
            );
            checked += reference.check(&group, &points, &what, &mut |_, _| {});
            drop(group);
            let _ = fs::remove_dir_all(&to);
            run_ok(&mut failover_cmd(&replicas, newest, &to));
            assert!(
                fs::read(to.join("disk.img")).unwrap() == newest_content,
                "{what}: failover --point {newest} differs from the reference"
            );
            let after = read_state(&group_dir).unwrap();
            assert!(
                after.flags & 1 == 0,
                "{what}: the failover left the fold unfinished"
            );
            assert_eq!(
                listed_points(&replicas),
                points,
                "{what}: the failover changed the points"
            );
            fs::remove_dir_all(&to).unwrap();
            eprintln!(
                "  failover --point {newest} killed after {wait} ms (killed: {killed}, the fold \
                 still unfinished: {still_folding}), points still correct; run again: \
                 finishes the fold, equals the reference"
            );
            recovery_failover = Some(kill);
        }
        previous = points;
    }

    // The last restart: writing stops, the tracker's final barrier comes,
    // and the replica catches up with everything.
    let receiver = start_receiver_with(&replicas, dir, &rpki, port, RETENTION);
    if let Some(s) = shipper.take() {
        assert!(s.stop().success());
    }
    let shipper = start_fast_shipper(dir, &log_dir, &hpki, port);
    stop_writer.store(true, Ordering::Relaxed);
    let (batches, written) = match writer.join() {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e),
    };
    assert!(tracker.stop(), "the tracker stops cleanly");
    wait_caught_up(dir, &log_dir, Duration::from_secs(120));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    stop_watch.store(true, Ordering::Relaxed);
    let folds = watcher.join().unwrap();

    // Every point still listed reads as the reference through the store;
    // the oldest, the newest and some between also through `tidemark
    // failover` (up to 8: count-based folds may not have run since the
    // last restart, so dozens of points can be left).
    let points = listed_points(&replicas);
    let group = ReplicaGroup::open_read_only(&group_dir).unwrap();
    let seqs: Vec<u64> = group.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(points, seqs, "`tidemark points` lists what the store has");
    let mut oldest_content = Vec::new();
    let mut failed_over = 0;
    let step = points.len().div_ceil(7);
    let mut index = 0;
    checked += reference.check(&group, &points, "after the catch-up", &mut |seq, want| {
        index += 1;
        if oldest_content.is_empty() {
            oldest_content = want.to_vec();
        }
        if (index - 1) % step != 0 && index != points.len() {
            return;
        }
        let to = dir.join(format!("point-{seq}"));
        run_ok(&mut failover_cmd(&replicas, seq, &to));
        let got = fs::read(to.join("disk.img")).unwrap();
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            panic!("failover --point {seq} differs from the reference at byte {at:?}");
        }
        fs::remove_dir_all(&to).unwrap();
        failed_over += 1;
    });
    // The newest state is the source disk.
    let source = fs::read(&image).unwrap();
    let mut newest = vec![0u8; SIZE as usize];
    group
        .view(None)
        .unwrap()
        .read(DiskId(0), 0, &mut newest)
        .unwrap();
    assert!(newest == source, "the newest state differs from the source");
    let history = group.history_bytes();
    drop(group);

    // Folds really happened: the barriers in the log far outnumber the
    // points kept, and the oldest point moved on.
    let mut barriers = 0;
    let mut reader = LogReader::new(FsDir::existing(&log_dir).unwrap(), Seq::ZERO);
    let first = reader.next_record().unwrap().expect("a record");
    assert_eq!(first.header.seq.get(), 1, "the log kept every record");
    let mut next = Some(first);
    while let Some(r) = next {
        barriers += usize::from(r.header.kind == Kind::Barrier);
        next = reader.next_record().unwrap();
    }
    let state = read_state(&group_dir).unwrap();
    assert!(state.start > 0, "no fold ever happened");
    assert!(folds >= 5, "only {folds} folds observed");
    assert!(
        barriers > 10 * points.len(),
        "{barriers} barriers, {} points kept",
        points.len()
    );
    assert!(
        points[0] > first_oldest.unwrap(),
        "the oldest point did not move on: {} then {}",
        first_oldest.unwrap(),
        points[0]
    );
    assert!(
        mid_fold + mid_apply > 0,
        "no kill came during an apply or a fold"
    );

    // A failover killed while it writes the oldest point out: the store is
    // untouched, the partial image is not taken for a whole one, and a
    // rerun gives the point. (A loaded machine may let it finish first:
    // then it is tried again.)
    let oldest = points[0];
    let to = dir.join("failover");
    let mut progress = None;
    for _attempt in 0..5 {
        let _ = fs::remove_dir_all(&to);
        let mut child = failover_cmd(&replicas, oldest, &to)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines {
            let line = line.unwrap();
            if line.contains('%') {
                child.kill().unwrap();
                progress = Some(line);
                break;
            }
        }
        if !child.wait().unwrap().success() && progress.is_some() {
            break;
        }
        progress = None;
    }
    let progress = progress.expect("the failover finished before it could be killed, 5 times");
    assert_eq!(
        listed_points(&replicas),
        points,
        "the killed failover changed the points"
    );
    let refused = failover_cmd(&replicas, oldest, &to).output().unwrap();
    assert!(
        !refused.status.success(),
        "a rerun must not take the partial image for a whole one"
    );
    fs::remove_file(to.join("disk.img")).unwrap();
    run_ok(&mut failover_cmd(&replicas, oldest, &to));
    assert!(
        fs::read(to.join("disk.img")).unwrap() == oldest_content,
        "the rerun failover of point {oldest} differs from the reference"
    );
    let group = ReplicaGroup::open(&group_dir).expect("the store opens for writing");
    let after: Vec<u64> = group.points().iter().map(|p| p.seq.get()).collect();
    assert_eq!(
        after, points,
        "the store lists the same points after the failovers"
    );
    assert_eq!(group.position().durable_seq.get(), state.durable_seq);
    drop(group);

    eprintln!(
        "{TEST}: {KILLS} receiver kills ({mid_apply} with an uncommitted journal tail, \
         {mid_fold} in the middle of a fold), {folds} folds observed, {checked} point reads \
         checked against the reference ({failed_over} through `tidemark failover`); failover \
         killed in recovery after kill {} and while copying at {:?}, each rerun right; \
         {batches} write batches, {} MiB written, {barriers} barriers, {} points and {} KiB \
         of history kept at the end; {:.1} s",
        recovery_failover.map_or("-".into(), |k| k.to_string()),
        progress.trim(),
        written >> 20,
        points.len(),
        history >> 10,
        started.elapsed().as_secs_f64()
    );
}
