//! Untrusted bytes never panic the log: arbitrary segment files, segment
//! bodies behind a valid header and cursor files go through `check`, the
//! reader and recovery, and come out as typed results.

use proptest::prelude::*;
use std::collections::BTreeMap;
use tidemark_changelog::segment::{segment_name, SegmentHeader};
use tidemark_changelog::{
    check, read_cursor, write_cursor, ChangeLog, DiskId, Entry, LogOptions, LogReader, OpenError,
    RecoveryPolicy, Seq, SimDir,
};

const OPTS: LogOptions = LogOptions {
    segment_size: 4096,
    size_limit: 4096 * 8,
};

fn exercise(dir: SimDir) {
    let _ = check(&dir);
    let mut reader = LogReader::new(dir.clone(), Seq::ZERO);
    for _ in 0..200 {
        match reader.next_record() {
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    if let Ok((mut log, recovery)) = ChangeLog::open(dir.clone(), OPTS, RecoveryPolicy::Crash, 0) {
        // Whatever recovery kept, the log is usable and clean afterwards
        // (in a new generation, if it cut anything).
        if recovery.new_generation_required() {
            log.begin_generation(recovery.generation + 1, recovery.max_exposed_seq.next(), 1)
                .unwrap();
        }
        log.barrier(1).unwrap();
        assert!(check(&dir).unwrap().is_clean());
    }
}

fn valid_header(index: u64) -> Vec<u8> {
    SegmentHeader {
        generation: 0,
        index,
        first_seq: Seq(1),
        segment_size: 4096,
        created_ns: 0,
    }
    .encode()
    .to_vec()
}

/// A segment holding barriers numbered from `first_seq` (wrapping) behind
/// a header that says `first_seq`: what a damaged header or a writer that
/// lost count could leave, checksums valid.
fn segment_from(first_seq: u64, records: u64) -> Vec<u8> {
    let mut content = SegmentHeader {
        generation: 0,
        index: 1,
        first_seq: Seq(first_seq),
        segment_size: 4096,
        created_ns: 0,
    }
    .encode()
    .to_vec();
    for i in 0..records {
        content.extend(Entry::barrier(0).encode(Seq(first_seq.wrapping_add(i)), 0));
    }
    content.resize(4096, 0);
    content
}

#[test]
fn sequence_numbers_at_the_ends_of_their_range_never_panic() {
    // Found by the changelog_dir fuzz target: a segment whose first
    // sequence number was near u64::MAX overflowed recovery's arithmetic
    // (and the scan's, with a record in it); 0 underflowed it; a cursor at
    // u64::MAX overflowed the first segment's.
    for (first_seq, records) in [(u64::MAX, 1), (u64::MAX - 3, 0), (0, 0), (0, 2)] {
        let mut files = BTreeMap::new();
        files.insert(segment_name(1), segment_from(first_seq, records));
        exercise(SimDir::from_files(files));
    }
    let dir = SimDir::new();
    write_cursor(&dir, Seq(u64::MAX)).unwrap();
    exercise(dir);
}

proptest! {
    #[test]
    fn arbitrary_segment_files(content in proptest::collection::vec(any::<u8>(), 0..5000)) {
        let mut files = BTreeMap::new();
        files.insert(segment_name(1), content);
        exercise(SimDir::from_files(files));
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header(body in proptest::collection::vec(any::<u8>(), 0..4032)) {
        let mut content = valid_header(1);
        content.extend(body);
        let mut files = BTreeMap::new();
        files.insert(segment_name(1), content);
        exercise(SimDir::from_files(files));
    }

    #[test]
    fn valid_records_then_garbage(n in 1usize..20, garbage in proptest::collection::vec(any::<u8>(), 1..300)) {
        let mut content = valid_header(1);
        for i in 0..n {
            content.extend(Entry::write(DiskId(0), i as u64 * 512, &[i as u8 + 1; 100], 0).encode(Seq(i as u64 + 1), 0));
        }
        content.extend(garbage);
        // A segment file cut short is damage, never a tail to cut.
        let mut files = BTreeMap::new();
        files.insert(segment_name(1), content.clone());
        let short = SimDir::from_files(files);
        let refused = matches!(
            ChangeLog::open(short.clone(), OPTS, RecoveryPolicy::Crash, 0),
            Err(OpenError::Damaged { .. })
        );
        prop_assert!(refused, "a short segment was opened");
        exercise(short);
        // Preallocated, as segments are: the garbage is a tail a crash
        // may leave, and never takes the valid records away.
        content.resize(4096, 0);
        let mut files = BTreeMap::new();
        files.insert(segment_name(1), content);
        let dir = SimDir::from_files(files);
        let (_, recovery) = ChangeLog::open(dir.clone(), OPTS, RecoveryPolicy::Crash, 0).unwrap();
        prop_assert!(recovery.last_seq.unwrap_or(Seq::ZERO) >= Seq(n as u64));
        exercise(dir);
    }

    #[test]
    fn arbitrary_cursor_files(content in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut files = BTreeMap::new();
        files.insert("cursor".to_string(), content);
        let _ = read_cursor(&SimDir::from_files(files));
    }
}
