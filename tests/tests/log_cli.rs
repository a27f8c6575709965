//! `tidemark log check | dump | replay` on real log directories.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use tidemark_changelog::segment::{segment_name, SEGMENT_HEADER_LEN};
use tidemark_changelog::{ChangeLog, Entry, FsDir, LogOptions, RecoveryPolicy};
use tidemark_e2e::tidemark;

const OPTS: LogOptions = LogOptions {
    segment_size: 64 << 10,
    size_limit: 64 << 20,
};
const FRESH: RecoveryPolicy = RecoveryPolicy::CleanStop { last_seq: None };

/// Writes a small log and returns the byte offset at which each record ends
/// in the first segment, by sequence number.
fn small_log(dir: &Path) -> BTreeMap<u64, u64> {
    let (mut log, _) = ChangeLog::open(FsDir::create_all(dir).unwrap(), OPTS, FRESH, 1).unwrap();
    let mut ends = BTreeMap::new();
    let mut at = SEGMENT_HEADER_LEN;
    let payloads: Vec<Vec<u8>> = (1..=6).map(|i| vec![i as u8 * 17; 40 * i]).collect();
    for (i, p) in payloads.iter().enumerate() {
        let e = Entry::write(0, (i as u64) * 512, p, 10 + i as u64);
        let seq = log.append(&e).unwrap();
        at += e.encoded_len() as u64;
        ends.insert(seq.get(), at);
        if i % 2 == 1 {
            let seq = log.barrier(20 + i as u64).unwrap();
            at += 56;
            ends.insert(seq.get(), at);
        }
    }
    let label = Entry::marker("before-upgrade", true, 99);
    let seq = log.append(&label).unwrap();
    at += label.encoded_len() as u64;
    ends.insert(seq.get(), at);
    log.sync().unwrap();
    ends
}

#[test]
fn check_reports_the_last_valid_record_for_a_cut_at_every_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    let ends = small_log(&pristine);
    let seg = segment_name(1);
    let original = fs::read(pristine.join(&seg)).unwrap();
    let total = *ends.values().last().unwrap();
    let work = tmp.path().join("cut");
    fs::create_dir(&work).unwrap();
    for cut in SEGMENT_HEADER_LEN..=total {
        fs::write(work.join(&seg), &original[..cut as usize]).unwrap();
        let out = tidemark()
            .args(["log", "check"])
            .arg(&work)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last_valid = ends
            .iter()
            .filter(|(_, end)| **end <= cut)
            .map(|(s, _)| *s)
            .next_back();
        let expected_line = match last_valid {
            Some(s) => format!("last valid sequence number: {s}\n"),
            None => "last valid sequence number: none".to_string(),
        };
        if cut == SEGMENT_HEADER_LEN {
            // A header and nothing else: a segment whose creation did not
            // complete, as far as the log alone can tell.
            assert!(out.status.success(), "cut at {cut}:\n{stdout}");
            continue;
        }
        // A segment file is preallocated before any record goes in: cut
        // short, even at a record boundary, it lost what followed.
        assert_eq!(
            out.status.code(),
            Some(1),
            "cut at {cut}: a cut segment must fail the check:\n{stdout}"
        );
        assert!(
            stdout.contains("DAMAGED: segment"),
            "cut at {cut}:\n{stdout}"
        );
        assert!(
            stdout.contains(&expected_line),
            "cut at {cut}: expected {expected_line:?} in\n{stdout}"
        );
    }
}

#[test]
fn check_finds_a_flipped_bit_in_a_sealed_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut log, _) =
        ChangeLog::open(FsDir::create_all(tmp.path()).unwrap(), OPTS, FRESH, 1).unwrap();
    let data = vec![0xabu8; 4000];
    for i in 0..40 {
        log.append(&Entry::write(0, i * 4096, &data, i)).unwrap();
    }
    log.barrier(50).unwrap();
    drop(log);
    assert!(
        tmp.path().join(segment_name(3)).exists(),
        "the log rolled over"
    );
    let path = tmp.path().join(segment_name(1));
    let mut bytes = fs::read(&path).unwrap();
    bytes[20_000] ^= 0x10;
    fs::write(&path, bytes).unwrap();
    let out = tidemark()
        .args(["log", "check"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!("DAMAGED: segment {}", segment_name(1))),
        "{stdout}"
    );
    assert!(
        stdout.contains("damaged record in a sealed segment"),
        "{stdout}"
    );
    // Records are 4056 bytes from byte 64: byte 20000 lies in the fifth.
    assert!(stdout.contains("last valid sequence number: 4"), "{stdout}");
}

#[test]
fn dump_shows_barriers_and_markers_in_text_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    small_log(tmp.path());
    let out = tidemark()
        .args(["log", "dump"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.matches("BARRIER #").count(), 3, "{text}");
    assert!(
        text.contains("MARKER \"before-upgrade\" (application-consistent)"),
        "{text}"
    );
    assert_eq!(text.matches(" write ").count(), 6, "{text}");

    let out = tidemark()
        .args(["log", "dump", "--json"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[0]["seq"], 1);
    assert_eq!(lines[0]["kind"], "write");
    assert_eq!(lines[0]["length"], 40);
    assert_eq!(lines[2]["kind"], "barrier");
    assert_eq!(lines[9]["kind"], "marker");
    assert_eq!(lines[9]["label"], "before-upgrade");
    assert_eq!(lines[9]["app_consistent"], true);
}

/// A log over two disks with writes, zeroes and trims; returns the images
/// each disk should have at each barrier (1-based index into the vector).
fn mixed_log(dir: &Path) -> Vec<[Vec<u8>; 2]> {
    let (mut log, _) = ChangeLog::open(FsDir::create_all(dir).unwrap(), OPTS, FRESH, 1).unwrap();
    let size = 256 << 10;
    let mut model = [vec![0u8; size], vec![0u8; size]];
    let mut at_barrier = Vec::new();
    let mut rng = StdRng::seed_from_u64(0x1234_5678_9abc_def0);
    for i in 0..300u64 {
        let x = rng.next_u64();
        let disk = (x % 2) as usize;
        let offset = (x >> 8) % (size as u64 - 8192);
        let len = 1 + (x >> 32) % 8192;
        match (x >> 50) % 10 {
            0 => {
                log.append(&Entry::trim(disk as u32, offset, len, i))
                    .unwrap();
                model[disk][offset as usize..(offset + len) as usize].fill(0);
            }
            1 => {
                log.append(&Entry::write_zeroes(
                    disk as u32,
                    offset,
                    len,
                    i % 2 == 0,
                    i,
                ))
                .unwrap();
                model[disk][offset as usize..(offset + len) as usize].fill(0);
            }
            2 => {
                log.barrier(i).unwrap();
                at_barrier.push(model.clone());
            }
            3 if i % 7 == 0 => {
                log.append(&Entry::marker(&format!("label-{i}"), false, i))
                    .unwrap();
            }
            _ => {
                let data: Vec<u8> = (0..len).map(|j| (j as u8) ^ (i as u8)).collect();
                log.append(&Entry::write(disk as u32, offset, &data, i))
                    .unwrap();
                model[disk][offset as usize..(offset + len) as usize].copy_from_slice(&data);
            }
        }
    }
    log.barrier(999).unwrap();
    at_barrier.push(model);
    at_barrier
}

fn read_image(path: &Path, size: usize) -> Vec<u8> {
    let mut bytes = fs::read(path).unwrap();
    assert!(bytes.len() <= size, "image grew past the disk");
    bytes.resize(size, 0);
    bytes
}

#[test]
fn replay_to_every_barrier_matches_the_model() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let models = mixed_log(&log);
    assert!(models.len() > 10);
    for (n, model) in models.iter().enumerate() {
        for (disk, expected) in model.iter().enumerate() {
            let image = tmp.path().join(format!("b{n}-d{disk}.img"));
            fs::write(&image, vec![0u8; 256 << 10]).unwrap();
            let out = tidemark()
                .args(["log", "replay"])
                .arg(&log)
                .arg("--onto")
                .arg(&image)
                .args([
                    "--disk",
                    &disk.to_string(),
                    "--barrier",
                    &(n + 1).to_string(),
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                read_image(&image, 256 << 10) == *expected,
                "barrier {} disk {disk} differs",
                n + 1
            );
        }
    }
}

#[test]
fn replay_to_a_missing_stop_point_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    let models = mixed_log(&log);
    let image = tmp.path().join("disk.img");
    fs::write(&image, vec![7u8; 4096]).unwrap();
    for args in [
        vec!["--barrier".to_string(), (models.len() + 1).to_string()],
        vec!["--label".to_string(), "no-such-label".to_string()],
        vec!["--until".to_string(), "999999".to_string()],
    ] {
        let out = tidemark()
            .args(["log", "replay"])
            .arg(&log)
            .arg("--onto")
            .arg(&image)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("the image was not changed"),
            "{args:?}: {stderr}"
        );
        assert_eq!(fs::read(&image).unwrap(), vec![7u8; 4096], "{args:?}");
    }
}

#[test]
fn replay_until_a_label_and_a_sequence_number() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("log");
    small_log(&log);
    let image = tmp.path().join("a.img");
    let out = tidemark()
        .args(["log", "replay"])
        .arg(&log)
        .arg("--onto")
        .arg(&image)
        .args(["--label", "before-upgrade", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["applied"], 6);
    assert_eq!(summary["barriers"], 3);
    let bytes = fs::read(&image).unwrap();
    assert_eq!(&bytes[5 * 512..5 * 512 + 240], &[6u8 * 17; 240][..]);

    let image = tmp.path().join("b.img");
    let out = tidemark()
        .args(["log", "replay"])
        .arg(&log)
        .arg("--onto")
        .arg(&image)
        .args(["--until", "2", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["applied"], 2);
    assert_eq!(summary["last_seq"], 2);
    assert_eq!(fs::read(&image).unwrap().len(), 512 + 80);
}

/// A copy of the mixed log in `tmp/name`, with segment files as listed.
fn copy_log(from: &Path, to: &Path) -> Vec<String> {
    fs::create_dir_all(to).unwrap();
    let mut segments = Vec::new();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.ends_with(".seg") {
            segments.push(name);
        }
    }
    segments.sort();
    segments
}

/// Damage done to a copy of a log directory.
type Damage = Box<dyn Fn(&Path)>;

/// Damage done to a segment file's bytes.
type ByteDamage = fn(&mut Vec<u8>);

#[test]
fn replay_says_where_and_why_it_stops_early_and_fails_unless_a_prefix_is_accepted() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    mixed_log(&pristine);
    let segments = copy_log(&pristine, &tmp.path().join("probe"));
    assert!(segments.len() >= 6, "{segments:?}");
    let newest = segments.last().unwrap().clone();
    let damages: Vec<(&str, String, Damage)> = vec![
        (
            "a missing middle segment",
            // The segment after the gap is named, and the one before it.
            segments[4].clone(),
            Box::new(|log: &Path| fs::remove_file(log.join(segment_name(4))).unwrap()),
        ),
        (
            "swapped middle segments",
            segments[3].clone(),
            Box::new(|log: &Path| {
                let (a, b) = (log.join(segment_name(4)), log.join(segment_name(5)));
                fs::rename(&a, log.join("x")).unwrap();
                fs::rename(&b, &a).unwrap();
                fs::rename(log.join("x"), &b).unwrap();
            }),
        ),
        (
            "a zero-filled middle segment",
            segments[3].clone(),
            Box::new(|log: &Path| {
                let p = log.join(segment_name(4));
                let len = fs::metadata(&p).unwrap().len();
                fs::write(&p, vec![0u8; len as usize]).unwrap();
            }),
        ),
        (
            "a damaged header of a middle segment",
            segments[3].clone(),
            Box::new(|log: &Path| {
                let p = log.join(segment_name(4));
                let mut b = fs::read(&p).unwrap();
                b[44] ^= 1;
                fs::write(&p, b).unwrap();
            }),
        ),
        (
            "tail damage",
            newest.clone(),
            Box::new(move |log: &Path| {
                let p = log.join(&newest);
                let mut b = fs::read(&p).unwrap();
                b[64 + 20] ^= 1;
                fs::write(&p, b).unwrap();
            }),
        ),
    ];
    for (what, named, damage) in damages {
        let log = tmp.path().join(what.replace(' ', "-"));
        copy_log(&pristine, &log);
        damage(&log);
        let image = tmp.path().join("disk.img");
        fs::write(&image, vec![7u8; 4096]).unwrap();
        let out = tidemark()
            .args(["log", "replay"])
            .arg(&log)
            .arg("--onto")
            .arg(&image)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(&named) && stderr.contains("byte"),
            "{what}: where it stops is not named: {stderr}"
        );
        assert!(stderr.contains("--accept-prefix"), "{what}: {stderr}");
        assert_eq!(
            fs::read(&image).unwrap(),
            vec![7u8; 4096],
            "{what}: the image was changed"
        );

        let out = tidemark()
            .args(["log", "replay"])
            .arg(&log)
            .arg("--onto")
            .arg(&image)
            .arg("--accept-prefix")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stderr}");
        assert!(
            stderr.contains("stopped early") && stderr.contains(&named),
            "{what}: {stderr}"
        );
        assert_ne!(fs::read(&image).unwrap(), vec![7u8; 4096], "{what}");
    }
}

#[test]
fn check_reports_damage_of_the_newest_segment_header_and_a_zeroed_page() {
    let tmp = tempfile::tempdir().unwrap();
    let pristine = tmp.path().join("pristine");
    mixed_log(&pristine);
    let segments = copy_log(&pristine, &tmp.path().join("probe"));
    let newest = segments.last().unwrap().clone();
    let size = fs::metadata(pristine.join(&newest)).unwrap().len() as usize;
    // Records fill the newest segment well past its first page.
    let records_end = {
        let out = tidemark()
            .args(["log", "check", "--json"])
            .arg(&pristine)
            .output()
            .unwrap();
        assert!(out.status.success());
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["segments"].as_array().unwrap().last().unwrap()["end_offset"]
            .as_u64()
            .unwrap() as usize
    };
    assert!(records_end > 8192 + 4096, "{records_end}");
    let damages: [(&str, ByteDamage); 2] = [
        ("header bit flip", |b: &mut Vec<u8>| b[44] ^= 1),
        ("zeroed page", |b: &mut Vec<u8>| b[4096..8192].fill(0)),
    ];
    for (what, damage) in damages {
        let log = tmp.path().join(what.replace(' ', "-"));
        copy_log(&pristine, &log);
        let mut bytes = fs::read(log.join(&newest)).unwrap();
        assert_eq!(bytes.len(), size);
        damage(&mut bytes);
        fs::write(log.join(&newest), bytes).unwrap();
        let out = tidemark()
            .args(["log", "check"])
            .arg(&log)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{what}:\n{stdout}");
        assert!(
            stdout.contains(&format!("DAMAGED: segment {newest}")),
            "{what}:\n{stdout}"
        );
    }
}
