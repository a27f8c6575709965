//! SIGKILL the tracker in the middle of a workload, restart it: the log
//! checks clean, every write acknowledged before the last acknowledged
//! FLUSH is in the log, and every write acknowledged after it is either in
//! the log or inside an extent recorded as resync-needed.
//!
//! Damage a crash cannot produce (after a clean stop: a flipped bit, a
//! zeroed page, a cut file, swapped or stray segments) is refused with the
//! segment and byte named, until `tidemark log recover` starts a new
//! generation above every sequence number with the disk resync-needed.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidemark_changelog::segment::segment_name;
use tidemark_changelog::{FsDir, Kind, LogReader, Seq};
use tidemark_e2e::{qemu_io, require_tool, run, tidemark, TrackerProcess};

const SIZE: u64 = 64 << 20;
const BLOCK: u64 = 4096;
/// Each write goes to its own block, 8 KiB apart, so each stays visible.
const STRIDE: u64 = 8192;

const WORKLOAD: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n = 0
while n < 8000:
    h.pwrite(bytes([n % 251 + 1]) * 4096, n * 8192)
    print("W", n, flush=True)
    n += 1
    if n % 16 == 0:
        h.flush()
        print("F", n, flush=True)
"#;

#[test]
fn sigkill_mid_workload_loses_nothing_acknowledged() {
    // python3-libnbd belongs to Debian's interpreter, which may not be the
    // first python3 on the PATH.
    let python = "/usr/bin/python3";
    let has_libnbd = Command::new(python)
        .args(["-c", "import nbd"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_libnbd {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3-libnbd is missing under CI"
        );
        eprintln!(
            "SKIP sigkill_mid_workload_loses_nothing_acknowledged: python3-libnbd is not installed"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let tracker = TrackerProcess::start(tmp.path(), &image, &[]);
    let mut client = Command::new(python)
        .args(["-c", WORKLOAD, &tracker.uri()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(client.stdout.take().unwrap()).lines();
    let mut acked_writes = Vec::new();
    let mut flushed_upto = 0u64;
    // Let the workload run, then pull the plug between two replies.
    while let Some(Ok(line)) = lines.next() {
        let mut parts = line.split_whitespace();
        match (
            parts.next(),
            parts.next().and_then(|n| n.parse::<u64>().ok()),
        ) {
            (Some("W"), Some(n)) => acked_writes.push(n),
            (Some("F"), Some(n)) => flushed_upto = n,
            _ => panic!("unexpected workload output {line:?}"),
        }
        if acked_writes.len() == 1203 {
            break;
        }
    }
    tracker.kill();
    // Whatever the client saw after the kill does not count.
    let _ = client.kill();
    let _ = client.wait();
    assert!(flushed_upto >= 1184, "the workload flushed every 16 writes");

    let tracker = TrackerProcess::start(tmp.path(), &image, &[]);
    assert!(
        tracker.ready_line.contains("unclean restart"),
        "{}",
        tracker.ready_line
    );
    let log_dir = tracker.log_dir.clone();
    assert!(tracker.stop());
    let out = tidemark()
        .args(["log", "check"])
        .arg(&log_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let mut logged: BTreeMap<u64, u8> = BTreeMap::new();
    let mut resync: Vec<(u64, u64)> = Vec::new();
    let mut generations = std::collections::BTreeSet::new();
    let mut reader = LogReader::new(FsDir::existing(&log_dir).unwrap(), Seq::ZERO);
    while let Some(r) = reader.next_record().unwrap() {
        generations.insert(r.header.generation);
        match r.header.kind {
            Kind::Write => {
                assert_eq!(r.header.length, BLOCK);
                logged.insert(r.header.offset, r.payload[0]);
            }
            Kind::ResyncNeeded => resync.push((r.header.offset, r.header.length)),
            _ => {}
        }
    }
    assert_eq!(generations.len(), 2, "the restart began a new generation");
    for &n in &acked_writes {
        let offset = n * STRIDE;
        let expected = (n % 251 + 1) as u8;
        let in_log = logged.get(&offset) == Some(&expected);
        if n < flushed_upto {
            assert!(
                in_log,
                "write {n} was acknowledged before a FLUSH reply but is not in the log"
            );
        } else {
            let covered = resync
                .iter()
                .any(|&(o, l)| o <= offset && offset + BLOCK <= o + l);
            assert!(
                in_log || covered,
                "write {n} is neither in the log nor in a resync-needed extent"
            );
        }
    }
    assert!(
        !resync.is_empty(),
        "the hot extents were recorded as resync-needed"
    );
}

// ---------------------------------------------------------------------
// Damage after a clean stop: the tracker refuses to start, names the
// segment and byte, and points to `tidemark log recover`; nothing it did
// not create is removed; sequence numbers are never handed out twice.
// ---------------------------------------------------------------------

/// A log of several 64 KiB segments written through a tracker that then
/// stopped cleanly; returns (dir, image, the newest segment's index, the
/// last sequence number).
fn cleanly_stopped_log(test: &str) -> Option<(tempfile::TempDir, PathBuf, u64, u64)> {
    if !require_tool("qemu-io", test) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let tracker = TrackerProcess::start(tmp.path(), &image, &["--segment-size", "64KiB"]);
    let mut cmds = Vec::new();
    for i in 0..24u64 {
        cmds.push(format!("write -P {} {} 6144", i + 1, i * 8192));
        if i % 3 == 2 {
            cmds.push("flush".to_string());
        }
    }
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(tracker.uri(), &cmds);
    assert!(tracker.stop(), "the tracker stops cleanly");
    let log = tmp.path().join("log");
    let newest = newest_segment(&log);
    assert!(newest >= 3, "the log rolled over a few times");
    let last = last_seq(&log);
    Some((tmp, image, newest, last))
}

fn newest_segment(log: &Path) -> u64 {
    fs::read_dir(log)
        .unwrap()
        .filter_map(|e| {
            tidemark_changelog::segment::parse_segment_name(e.unwrap().file_name().to_str()?)
        })
        .max()
        .unwrap()
}

fn last_seq(log: &Path) -> u64 {
    let mut reader = LogReader::new(FsDir::existing(log).unwrap(), Seq::ZERO);
    let mut last = 0;
    while let Some(r) = reader.next_record().unwrap() {
        last = r.header.seq.get();
    }
    last
}

/// `tracker serve` on the damaged log must exit with an error within a
/// minute; returns its stderr.
fn serve_expecting_refusal(dir: &Path, image: &Path) -> String {
    let mut child = tidemark()
        .args(["tracker", "serve", "--image"])
        .arg(image)
        .args(["--name", "disk", "--segment-size", "64KiB", "--socket"])
        .arg(dir.join("nbd.sock"))
        .arg("--control-socket")
        .arg(dir.join("tracker.ctl"))
        .arg("--log-dir")
        .arg(dir.join("log"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the tracker started on a damaged log:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && !stdout.contains("tracker ready"),
        "the tracker started on a damaged log:\n{stdout}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Damage done to a segment file's bytes.
type ByteDamage = fn(&mut Vec<u8>);

fn flip(path: &Path, at: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[at] ^= 0x04;
    fs::write(path, bytes).unwrap();
}

fn check_fails(log: &Path) -> String {
    let out = tidemark().args(["log", "check"]).arg(log).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "log check must fail:\n{stdout}");
    assert!(stdout.contains("DAMAGED"), "{stdout}");
    stdout
}

/// The refusal names the segment, the byte and the way out.
fn assert_refusal_names(stderr: &str, segment: &str, what: &str) {
    assert!(
        stderr.contains(segment),
        "{what}: segment not named:\n{stderr}"
    );
    assert!(stderr.contains("byte"), "{what}: no byte offset:\n{stderr}");
    assert!(
        stderr.contains("tidemark log recover"),
        "{what}: no way out named:\n{stderr}"
    );
}

#[test]
fn a_flipped_bit_in_the_newest_segment_header_after_a_clean_stop_is_refused() {
    let Some((tmp, image, newest, _)) = cleanly_stopped_log(
        "a_flipped_bit_in_the_newest_segment_header_after_a_clean_stop_is_refused",
    ) else {
        return;
    };
    let log = tmp.path().join("log");
    let name = segment_name(newest);
    flip(&log.join(&name), 44);
    check_fails(&log);
    let stderr = serve_expecting_refusal(tmp.path(), &image);
    assert_refusal_names(&stderr, &name, "header bit flip");
    assert!(log.join(&name).exists(), "the damaged segment was removed");
}

#[test]
fn swapped_newest_segments_are_refused() {
    let Some((tmp, image, newest, _)) = cleanly_stopped_log("swapped_newest_segments_are_refused")
    else {
        return;
    };
    let log = tmp.path().join("log");
    let (a, b) = (
        log.join(segment_name(newest - 1)),
        log.join(segment_name(newest)),
    );
    let tmp_name = log.join("swap");
    fs::rename(&a, &tmp_name).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(&tmp_name, &b).unwrap();
    check_fails(&log);
    let stderr = serve_expecting_refusal(tmp.path(), &image);
    assert!(stderr.contains("tidemark log recover"), "{stderr}");
    assert!(a.exists() && b.exists(), "a swapped segment was removed");
}

#[test]
fn tail_damage_after_a_clean_stop_is_refused_not_cut() {
    let Some((tmp, image, newest, _)) =
        cleanly_stopped_log("tail_damage_after_a_clean_stop_is_refused_not_cut")
    else {
        return;
    };
    let log = tmp.path().join("log");
    let name = segment_name(newest);
    let path = log.join(&name);
    let pristine = fs::read(&path).unwrap();
    let damages: [(&str, ByteDamage); 3] = [
        ("bit flip", |b: &mut Vec<u8>| b[64 + 30] ^= 0x01),
        ("zeroed page", |b: &mut Vec<u8>| b[4096..8192].fill(0)),
        ("truncated to 200 bytes", |b: &mut Vec<u8>| b.truncate(200)),
    ];
    for (what, damage) in damages {
        let mut bytes = pristine.clone();
        damage(&mut bytes);
        fs::write(&path, &bytes).unwrap();
        check_fails(&log);
        let stderr = serve_expecting_refusal(tmp.path(), &image);
        assert_refusal_names(&stderr, &name, what);
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "{what}: the damaged segment was changed"
        );
    }
}

#[test]
fn a_stray_segment_file_and_a_directory_named_like_a_segment_are_named_and_left_alone() {
    let Some((tmp, image, newest, _)) = cleanly_stopped_log(
        "a_stray_segment_file_and_a_directory_named_like_a_segment_are_named_and_left_alone",
    ) else {
        return;
    };
    let log = tmp.path().join("log");
    let stray = log.join(segment_name(99));
    fs::write(&stray, b"not a segment").unwrap();
    let stderr = serve_expecting_refusal(tmp.path(), &image);
    assert!(stderr.contains(&segment_name(99)), "{stderr}");
    assert!(stray.exists(), "the stray file was removed");
    fs::remove_file(&stray).unwrap();

    let dir = log.join(segment_name(newest + 1));
    fs::create_dir(&dir).unwrap();
    let stderr = serve_expecting_refusal(tmp.path(), &image);
    assert!(stderr.contains(&segment_name(newest + 1)), "{stderr}");
    assert!(stderr.contains("directory"), "{stderr}");
    let out = tidemark()
        .args(["log", "check"])
        .arg(&log)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains(&segment_name(newest + 1)), "{text}");
    assert!(dir.is_dir());
}

#[test]
fn log_recover_starts_a_new_generation_above_every_sequence_number_with_the_disk_resync_needed() {
    let Some((tmp, image, newest, last)) = cleanly_stopped_log(
        "log_recover_starts_a_new_generation_above_every_sequence_number_with_the_disk_resync_needed",
    ) else {
        return;
    };
    let log = tmp.path().join("log");
    flip(&log.join(segment_name(newest)), 64 + 100);
    let stderr = serve_expecting_refusal(tmp.path(), &image);
    assert_refusal_names(&stderr, &segment_name(newest), "tail damage");
    let said = run(tidemark().args(["log", "recover"]).arg(&log));
    assert!(said.contains("kept aside"), "{said}");
    let tracker = TrackerProcess::start(tmp.path(), &image, &["--segment-size", "64KiB"]);
    qemu_io(tracker.uri(), &["write -P 99 0 4096", "flush"]);
    assert!(tracker.stop());
    run(tidemark().args(["log", "check"]).arg(&log));
    let mut reader = LogReader::new(FsDir::existing(&log).unwrap(), Seq::ZERO);
    let mut seen = std::collections::BTreeSet::new();
    let mut whole_disk = false;
    let mut after = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        assert!(
            seen.insert(r.header.seq.get()),
            "sequence number {} twice",
            r.header.seq.get()
        );
        if r.header.generation > 0 {
            after.push(r.header.seq.get());
            if r.header.kind == Kind::ResyncNeeded
                && r.header.offset == 0
                && r.header.length == SIZE
            {
                whole_disk = true;
            }
        }
    }
    assert!(whole_disk, "the whole disk is recorded resync-needed");
    assert!(
        after.iter().all(|&s| s > last),
        "the new generation starts above {last}: {after:?}"
    );
}
