//! The change log's decoders (`changelog/src`): one record (and a segment
//! header) from bytes, and a whole simulated log directory read by `log
//! check`, the reader the shipper tails, replay, the cursor and the
//! tracker's recovery.
//!
//! Besides "never panics": a decoded record encodes back to its bytes, the
//! reader hands out records in sequence order, and a log the tracker
//! opened (and recovered) is clean once it has written to it.

use crate::checksums::{fix_records, fix_segment_header};
use crate::input::{Input, Output};
use std::collections::BTreeMap;
use std::io;
use tidemark_changelog::record::{Entry, Header, Record};
use tidemark_changelog::replay::{self, ReplayTarget, StopAt};
use tidemark_changelog::segment::{segment_name, SegmentHeader, SEGMENT_HEADER_LEN};
use tidemark_changelog::{
    check, read_cursor, write_cursor, ChangeLog, DiskId, LogOptions, LogReader, RecoveryPolicy,
    Seq, SimDir,
};

/// Small segments, so a fuzz input holds several.
const OPTIONS: LogOptions = LogOptions {
    segment_size: 4096,
    size_limit: 4096 * 8,
};

/// One record or segment header: `data` is a mode byte (bit 0: repair
/// checksums), then the bytes.
pub fn record(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let mut bytes = input.rest().to_vec();
    if mode & 1 != 0 {
        fix_segment_header(&mut bytes);
        fix_records(&mut bytes);
    }
    if let Ok(header) = SegmentHeader::decode(&bytes) {
        assert_eq!(header.encode()[..], bytes[..SEGMENT_HEADER_LEN as usize]);
    }
    let header = Header::decode(&bytes).map_err(|e| e.to_string());
    match Record::decode(&bytes) {
        Ok(record) => {
            assert_eq!(header, Ok(record.header));
            let entry = record.as_entry();
            entry.validate().expect("a decoded record is a valid entry");
            // A record keeps the format version it was written with.
            let encoded = record.encode();
            assert_eq!(encoded[..], bytes[..record.header.record_len()]);
            if record.header.version == record.header.kind.write_version() {
                let again = entry.encode(record.header.seq, record.header.generation);
                assert_eq!(again, encoded);
            }
            let _ = record.label();
        }
        Err(error) => drop(error.to_string()),
    }
}

/// An image that takes any extent a disk could have, keeping nothing:
/// replay's bookkeeping is what is fuzzed, not the image.
struct SparseImage;

impl ReplayTarget for SparseImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.zero(offset, data.len() as u64)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= i64::MAX as u64 => Ok(()),
            _ => Err(io::ErrorKind::InvalidInput.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The name of a file of a fuzzed log directory.
fn file_name(input: &mut Input) -> String {
    match input.u8() {
        0xf0 => "cursor".into(),
        0xf1 => String::from_utf8_lossy(input.blob8()).into_owned(),
        index => segment_name(u64::from(index)),
    }
}

/// A log directory: `data` is a mode byte (bit 0: repair checksums; bit 1:
/// pad segment files with zeroes to the segment size, as they are
/// preallocated; bits 2–3: the recovery policy; bit 4: replay accepts a
/// prefix), the sequence number a reader starts at, a file count,
/// then each file's name and content.
pub fn directory(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let from_seq = Seq(input.u64());
    let mut files = BTreeMap::new();
    for _ in 0..input.u8() % 8 {
        let name = file_name(&mut input);
        let mut content = input.blob32().to_vec();
        if name.ends_with(".seg") {
            if mode & 1 != 0 {
                fix_segment_header(&mut content);
                fix_records(&mut content);
            }
            if mode & 2 != 0 && content.len() < OPTIONS.segment_size as usize {
                content.resize(OPTIONS.segment_size as usize, 0);
            }
        }
        files.insert(name, content);
    }
    let dir = SimDir::from_files(files);

    if let Ok(report) = check(&dir) {
        let _ = report.is_clean();
    }
    read_all(&dir, from_seq);
    let _ = replay::replay(
        dir.clone(),
        DiskId(0),
        &StopAt::End,
        mode & 16 != 0,
        &mut SparseImage,
    );
    let _ = read_cursor(&dir).map_err(|e| e.to_string());

    let policy = match (mode >> 2) & 3 {
        0 => RecoveryPolicy::Crash,
        1 => RecoveryPolicy::CleanStop { last_seq: None },
        2 => RecoveryPolicy::CleanStop {
            last_seq: Some(from_seq),
        },
        _ => RecoveryPolicy::CutDamage { last_seq: None },
    };
    match ChangeLog::open(dir.clone(), OPTIONS, policy, 1) {
        Ok((mut log, recovery)) => {
            // What recovery kept is a log the tracker can go on with; after
            // a cut, in a new generation above every number handed out.
            if recovery.new_generation_required() {
                log.begin_generation(
                    log.generation() + 1,
                    recovery.max_exposed_seq.next().max(log.next_seq()),
                    2,
                )
                .expect("a new generation after a cut");
            }
            log.append(&Entry::write(0, 0, &[1; 100], 2))
                .expect("append after recovery");
            log.barrier(3).expect("barrier after recovery");
            let report = check(&dir).expect("check after recovery");
            assert!(report.is_clean(), "recovered log not clean: {report:?}");
            read_all(&dir, Seq::ZERO);
        }
        Err(error) => drop(error.to_string()),
    }
}

/// Reads every record from `from_seq` on: in sequence order, each once.
fn read_all(dir: &SimDir, from_seq: Seq) {
    let mut reader = LogReader::new(dir.clone(), from_seq);
    let mut last: Option<Seq> = None;
    for _ in 0..10_000 {
        match reader.next_record() {
            Ok(Some(record)) => {
                let seq = record.header.seq;
                assert!(last.is_none_or(|last| seq > last), "{seq} after {last:?}");
                assert!(from_seq == Seq::ZERO || seq >= from_seq);
                last = Some(seq);
            }
            Ok(None) => return,
            Err(error) => return drop(error.to_string()),
        }
    }
}

/// Records of every kind, each encoded by the log's own codec.
pub fn record_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let data = [0xa5; 300];
    let header = SegmentHeader {
        generation: 3,
        index: 7,
        first_seq: Seq(42),
        segment_size: 64 << 20,
        created_ns: 1_700_000_000_000_000_000,
    };
    let seed = |bytes: &[u8]| Output::new().u8(1).bytes(bytes).finish();
    vec![
        (
            "write",
            seed(&Entry::write(2, 4096, &data, 9).encode(42, 3)),
        ),
        (
            "write-zeroes",
            seed(&Entry::write_zeroes(0, 0, 1 << 20, true, 9).encode(43, 3)),
        ),
        ("trim", seed(&Entry::trim(1, 512, 512, 9).encode(44, 3))),
        ("barrier", seed(&Entry::barrier(9).encode(45, 3))),
        (
            "marker",
            seed(&Entry::marker("nightly backup", true, 9).encode(46, 3)),
        ),
        (
            "resync-needed",
            seed(&Entry::resync_needed(0, 0, 65536, 9).encode(47, 3)),
        ),
        ("segment-header", seed(&header.encode())),
    ]
}

/// Serializes a simulated directory as [`directory`] reads it, segment
/// files without their trailing zeroes (padded back by mode bit 1).
fn directory_seed(dir: &SimDir, from_seq: Seq) -> Vec<u8> {
    let files = dir.files();
    let mut out = Output::new();
    out.u8(3).u64(from_seq.get()).u8(files.len() as u8);
    for (name, mut content) in files {
        match tidemark_changelog::segment::parse_segment_name(&name) {
            Some(index) if index < 0xf0 => out.u8(index as u8),
            _ if name == "cursor" => out.u8(0xf0),
            _ => out.u8(0xf1).blob8(name.as_bytes()),
        };
        if name.ends_with(".seg") {
            let used = content.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            content.truncate(used);
        }
        out.blob32(&content);
    }
    out.finish()
}

/// Logs the tracker wrote: one segment; several with a cursor that freed
/// the oldest; and a log whose tracker stopped mid-record.
pub fn directory_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let write_log = |records: u64| {
        let dir = SimDir::new();
        let (mut log, _) =
            ChangeLog::open(dir.clone(), OPTIONS, RecoveryPolicy::Crash, 1).expect("a new log");
        for i in 0..records {
            let data = vec![i as u8; 200 + (i as usize % 3) * 100];
            let entry = match i % 6 {
                0 => Entry::write(0, i * 512, &data, i),
                1 => Entry::write_zeroes(1, i * 512, 4096, i % 2 == 0, i),
                2 => Entry::trim(0, 0, 1024, i),
                3 => Entry::marker("before upgrade", true, i),
                4 => Entry::resync_needed(1, 0, 512, i),
                _ => Entry::barrier(i),
            };
            log.append(&entry).expect("append");
        }
        log.sync().expect("sync");
        (dir, log)
    };
    let (one, _) = write_log(8);
    let (several, log) = write_log(40);
    write_cursor(&several, Seq(log.durable_seq().get() / 2)).expect("cursor");
    let (torn, _) = write_log(12);
    let files = torn.files();
    let (newest, content) = files.iter().next_back().expect("a segment");
    let mut content = content.clone();
    let used = content.iter().rposition(|b| *b != 0).unwrap_or(0);
    content.truncate(used - 50);
    content.resize(OPTIONS.segment_size as usize, 0);
    torn.put(newest, content);
    vec![
        ("one-segment", directory_seed(&one, Seq::ZERO)),
        ("several-segments", directory_seed(&several, Seq(20))),
        ("torn-tail", directory_seed(&torn, Seq::ZERO)),
    ]
}
