//! What the log's recovery makes of files a crash does not leave: stray and
//! swapped segments, headers of segments that still exist, records after a
//! blank header, a shipper's cursor past the log; and the explicit cut of
//! damage an admin asks for. Also: a log written by the version-1 formats
//! (the fixture) is read in place.

use std::collections::BTreeMap;
use std::path::Path;
use tidemark_changelog::record::Kind;
use tidemark_changelog::segment::{segment_name, SEGMENT_HEADER_LEN};
use tidemark_changelog::{
    check, read_cursor, read_sources, write_cursor, AppendError, ChangeLog, DiskId, Entry, FsDir,
    LogDamage, LogDir, LogOptions, LogReader, OpenError, RecoveryPolicy, Seq, SimDir,
};

const SEG: u64 = 4096;
const OPTS: LogOptions = LogOptions {
    segment_size: SEG,
    size_limit: 64 * SEG,
};
const CLEAN: RecoveryPolicy = RecoveryPolicy::CleanStop { last_seq: None };

/// A log of a few segments, stopped cleanly; returns the last seq.
fn log_of(dir: &SimDir, records: usize) -> Seq {
    let (mut log, _) = ChangeLog::open(dir.clone(), OPTS, CLEAN, 1).unwrap();
    for i in 0..records {
        log.append(&Entry::write(
            DiskId(0),
            i as u64 * 512,
            &[i as u8; 500],
            i as u64,
        ))
        .unwrap();
        if i % 3 == 2 {
            log.barrier(i as u64).unwrap();
        }
    }
    log.barrier(9999).unwrap()
}

fn segments(dir: &SimDir) -> Vec<String> {
    dir.list()
        .unwrap()
        .into_iter()
        .filter(|n| n.ends_with(".seg"))
        .collect()
}

fn damaged(
    r: Result<(ChangeLog<SimDir>, tidemark_changelog::Recovery), OpenError>,
) -> (String, u64, LogDamage) {
    match r {
        Err(OpenError::Damaged {
            segment,
            offset,
            damage,
            ..
        }) => (segment, offset, damage),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok((_, recovery)) => panic!("opened: {recovery:?}"),
    }
}

#[test]
fn a_stray_segment_file_is_named_and_left_alone() {
    for policy in [CLEAN, RecoveryPolicy::Crash] {
        let dir = SimDir::new();
        log_of(&dir, 20);
        let newest = segments(&dir).last().unwrap().clone();
        let stray = segment_name(99);
        dir.put(&stray, b"not a segment".to_vec());
        let files = dir.files();
        let (segment, _, damage) = damaged(ChangeLog::open(dir.clone(), OPTS, policy, 2));
        assert_eq!(segment, stray);
        assert_eq!(damage, LogDamage::Gap { previous: newest });
        assert!(
            damage.to_string().contains("not one this log created"),
            "{damage}"
        );
        assert_eq!(
            dir.files(),
            files,
            "{policy:?}: a file was changed or removed"
        );
    }
}

#[test]
fn swapped_segments_are_damage_not_unfinished_rolls() {
    for policy in [CLEAN, RecoveryPolicy::Crash] {
        let dir = SimDir::new();
        log_of(&dir, 30);
        let names = segments(&dir);
        let (a, b) = (&names[names.len() - 2], &names[names.len() - 1]);
        let files = dir.files();
        dir.put(a, files[b].clone());
        dir.put(b, files[a].clone());
        let swapped = dir.files();
        let (segment, offset, damage) = damaged(ChangeLog::open(dir.clone(), OPTS, policy, 2));
        assert_eq!((segment.as_str(), offset), (b.as_str(), 0));
        assert!(matches!(damage, LogDamage::OtherIndex { .. }), "{damage}");
        assert_eq!(
            dir.files(),
            swapped,
            "{policy:?}: a swapped segment was removed"
        );
        assert!(!check(&dir).unwrap().is_clean());
    }
}

#[test]
fn an_unfinished_roll_is_removed_but_records_after_a_blank_header_are_damage() {
    let dir = SimDir::new();
    let last = log_of(&dir, 20);
    let next = segment_name(segments(&dir).len() as u64 + 1);
    // Blank: created and preallocated, its header never written.
    dir.put(&next, vec![0u8; SEG as usize]);
    let report = check(&dir).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
    let (_, recovery) = ChangeLog::open(
        dir.clone(),
        OPTS,
        RecoveryPolicy::CleanStop {
            last_seq: Some(last),
        },
        2,
    )
    .unwrap();
    assert_eq!(recovery.removed_incomplete_segment, Some(next.clone()));
    assert_eq!(recovery.last_seq, Some(last));
    assert!(!dir.files().contains_key(&next));

    // A blank header with a record after it is not a roll that stopped.
    let mut bytes = vec![0u8; SEG as usize];
    let record = Entry::write(DiskId(0), 0, b"data", 1).encode(last.next(), 0);
    bytes[SEGMENT_HEADER_LEN as usize..][..record.len()].copy_from_slice(&record);
    dir.put(&next, bytes);
    let (segment, _, damage) =
        damaged(ChangeLog::open(dir.clone(), OPTS, RecoveryPolicy::Crash, 3));
    assert_eq!(segment, next);
    assert!(matches!(damage, LogDamage::Header(_)), "{damage}");
    assert!(dir.files().contains_key(&next));
    assert!(!check(&dir).unwrap().is_clean());
}

#[test]
fn a_cursor_past_the_log_is_damage_after_a_clean_stop_and_a_new_generation_after_a_crash() {
    let dir = SimDir::new();
    let last = log_of(&dir, 10);
    write_cursor(&dir, Seq(last.get() + 5)).unwrap();
    let (_, _, damage) = damaged(ChangeLog::open(dir.clone(), OPTS, CLEAN, 2));
    assert_eq!(
        damage,
        LogDamage::CursorAhead {
            cursor: Seq(last.get() + 5),
            last
        }
    );
    assert!(!check(&dir).unwrap().is_clean());
    // After a power cut the receiver may hold records the log lost.
    let (mut log, recovery) = ChangeLog::open(dir.clone(), OPTS, RecoveryPolicy::Crash, 2).unwrap();
    assert_eq!(recovery.lost_acknowledged, 5);
    assert!(recovery.max_exposed_seq >= Seq(last.get() + 5));
    assert!(matches!(
        log.append(&Entry::barrier(3)),
        Err(AppendError::NewGenerationRequired)
    ));
    log.begin_generation(1, recovery.max_exposed_seq.next(), 3)
        .unwrap();
    assert!(log.barrier(4).unwrap() > Seq(last.get() + 5));
}

#[test]
fn cutting_damage_keeps_the_damaged_files_aside_and_never_reuses_a_sequence_number() {
    let dir = SimDir::new();
    let last = log_of(&dir, 60);
    let names = segments(&dir);
    assert!(names.len() >= 6, "{names:?}");
    let damaged_name = names[2].clone();
    let mut bytes = dir.files()[&damaged_name].clone();
    bytes[SEGMENT_HEADER_LEN as usize + 100] ^= 0x20;
    dir.put(&damaged_name, bytes.clone());
    // Opening does not read sealed segments (the reader refuses them,
    // loudly); check finds it.
    let problem = check(&dir).unwrap().problems.remove(0);
    assert_eq!(
        (problem.segment.as_str(), problem.offset),
        (damaged_name.as_str(), SEGMENT_HEADER_LEN)
    );
    let (mut log, recovery) = ChangeLog::open(
        dir.clone(),
        OPTS,
        RecoveryPolicy::CutDamage {
            last_seq: Some(last),
        },
        2,
    )
    .unwrap();
    let cut = recovery.cut.clone().expect("a cut");
    assert_eq!(
        (cut.segment.as_str(), cut.offset),
        (damaged_name.as_str(), SEGMENT_HEADER_LEN)
    );
    // The damaged segment copied aside, every later one renamed aside.
    let mut aside = cut.kept_aside.clone();
    aside.sort();
    let mut expected: Vec<String> = names[2..].iter().map(|n| format!("{n}.damaged")).collect();
    expected.sort();
    assert_eq!(aside, expected);
    let files = dir.files();
    assert_eq!(
        files[&format!("{damaged_name}.damaged")],
        bytes,
        "the damaged segment, as it was"
    );
    for n in &names[3..] {
        assert!(!files.contains_key(n), "{n} is still in the log");
    }
    assert!(matches!(
        log.append(&Entry::barrier(3)),
        Err(AppendError::NewGenerationRequired)
    ));
    assert!(recovery.max_exposed_seq >= last);
    log.begin_generation(recovery.generation + 1, recovery.max_exposed_seq.next(), 3)
        .unwrap();
    let seq = log
        .append(&Entry::resync_needed(DiskId(0), 0, 1 << 20, 3))
        .unwrap();
    assert!(seq > last);
    log.barrier(4).unwrap();
    drop(log);
    // The log reads across the generation change, and checks clean.
    let report = check(&dir).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let mut reader = LogReader::new(dir.clone(), Seq::ZERO);
    let mut seqs = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        seqs.push(r.header.seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(seqs.iter().filter(|s| **s > last).count(), 2);
}

fn copy_fixture(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/log-v1");
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// The fixture was written by the version-1 code (`tracker serve
/// --segment-size 4KiB`, writes, flushes, a marker, a clean stop; the
/// shipper's cursor then set to 11): version-1 segment headers, records,
/// cursor and disks file. The current code reads it in place, appends
/// version-2 records after it, and reads both.
#[test]
fn a_log_of_the_version_1_formats_is_read_in_place_and_continued() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture(tmp.path());
    let dir = FsDir::existing(tmp.path()).unwrap();
    let report = check(&dir).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(
        (
            report.segments.len(),
            report.records,
            report.barriers,
            report.markers
        ),
        (3, 20, 12, 1)
    );
    assert_eq!(read_cursor(&dir).unwrap(), Seq(11));
    let disks = read_sources(tmp.path()).unwrap().unwrap();
    assert_eq!(
        (disks[0].disk.name.as_str(), disks[0].disk.size),
        ("disk", 1 << 20)
    );
    let mut reader = LogReader::new(dir.clone(), Seq::ZERO);
    let mut old = BTreeMap::new();
    while let Some(r) = reader.next_record().unwrap() {
        assert_eq!(r.header.version, 1);
        assert_eq!(r.header.durable_upto(), None);
        old.insert(r.header.seq, r);
    }
    assert_eq!(old.len(), 20);
    assert_eq!(old[&Seq(18)].label(), Some("before-upgrade"));

    let opts = LogOptions {
        segment_size: 4096,
        size_limit: 1 << 20,
    };
    let (mut log, recovery) = ChangeLog::open(
        dir.clone(),
        opts,
        RecoveryPolicy::CleanStop { last_seq: None },
        7,
    )
    .unwrap();
    assert_eq!(recovery.last_seq, Some(Seq(20)));
    assert!(recovery.cut.is_none());
    log.append(&Entry::write(DiskId(0), 0, b"after the upgrade", 8))
        .unwrap();
    let barrier = log.barrier(9).unwrap();
    drop(log);
    let report = check(&dir).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let mut reader = LogReader::new(dir, Seq::ZERO);
    let mut all = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        all.push(r);
    }
    assert_eq!(all.len(), 22);
    for r in &all[..20] {
        assert_eq!(
            r.encode(),
            old[&r.header.seq].encode(),
            "version-1 record {} changed",
            r.header.seq
        );
    }
    let b = &all[21];
    assert_eq!(
        (b.header.seq, b.header.version, b.header.kind),
        (barrier, 2, Kind::Barrier)
    );
    assert_eq!(b.header.durable_upto(), Some(Seq(20)));
}
