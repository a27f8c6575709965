//! `log check`: verifies every record of every segment and says exactly
//! where the log stops being valid.

use crate::record::Kind;
use crate::segment::{
    read_segment_header, segment_indices, segment_name, Damage, ScanEnd, SegmentCursor,
};
use crate::storage::LogDir;
use serde::Serialize;
use std::io;

/// One segment as the check found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SegmentSummary {
    /// The file name.
    pub name: String,
    /// Its generation.
    pub generation: u32,
    /// Sequence number its first record must have.
    pub first_seq: u64,
    /// Valid records in it.
    pub records: u64,
    /// The last valid record's sequence number.
    pub last_seq: Option<u64>,
    /// Byte offset where its valid records end.
    pub end_offset: u64,
}

/// Where and why the log is not valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The segment file.
    pub segment: String,
    /// Byte offset in it.
    pub offset: u64,
    /// The last record that verified before this point, in the whole log.
    pub last_valid_seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// The result of checking a log directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// The segments, oldest first.
    pub segments: Vec<SegmentSummary>,
    /// Valid records in all.
    pub records: u64,
    /// Of which barriers.
    pub barriers: u64,
    /// Of which markers.
    pub markers: u64,
    /// The oldest record's sequence number.
    pub first_seq: Option<u64>,
    /// The newest valid record's sequence number.
    pub last_seq: Option<u64>,
    /// Things that are not a problem but an admin should know.
    pub notes: Vec<String>,
    /// Damage; empty when the log is valid.
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// Whether every record verified.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// How many times a check may begin again because the oldest segments
/// were recycled under it before it gives up.
const MAX_PASSES: usize = 32;

/// How many times a record at the tail that does not verify is read again
/// before it counts as damage (see [`LogDir::write_settle_time`]).
const MAX_TAIL_READS: usize = 5;

/// Checks every segment of the log in `dir`. I/O errors are returned;
/// damage is reported in the [`CheckReport`].
///
/// The log may be live: a tracker appending and recycling segments behind
/// the shipper's cursor while the check reads. A record being written as it
/// is read looks torn, so a tail that does not verify is read again after
/// the directory's settle time and is damage only if it stays the same. A
/// segment recycled under the check (renamed to a new index and rewritten)
/// vanishes or stops verifying; when the oldest segment the check began with
/// is gone, the check begins again at the oldest segment left.
pub fn check<D: LogDir>(dir: &D) -> io::Result<CheckReport> {
    for pass in 0..MAX_PASSES {
        if let Pass::Done(mut report) = check_pass(dir)? {
            if pass > 0 {
                report.notes.push(format!(
                    "the log was being written during the check: segments were recycled under it, so it began again at the oldest segment left ({pass} time(s))"
                ));
            }
            return Ok(report);
        }
    }
    Err(io::Error::other(format!(
        "segments of the log in {} were recycled under the check {MAX_PASSES} times: the tracker writes faster than the log can be read; check again when it is quieter",
        dir.describe()
    )))
}

/// How one pass over the segments ended.
enum Pass {
    /// The report on what the pass read.
    Done(CheckReport),
    /// The oldest segment the pass began with was recycled under it.
    Recycled,
}

/// Whether the segment `first` is gone while younger ones remain: recycled.
/// (Segments are recycled oldest first, so a pass that read a recycled
/// segment no longer finds the one it began with.)
fn recycled_since<D: LogDir>(dir: &D, first: u64) -> io::Result<bool> {
    Ok(segment_indices(dir)?
        .first()
        .is_some_and(|&oldest| oldest > first))
}

fn check_pass<D: LogDir>(dir: &D) -> io::Result<Pass> {
    let mut report = CheckReport::default();
    let indices = segment_indices(dir)?;
    let Some(&first) = indices.first() else {
        return Ok(Pass::Done(report));
    };
    // A problem on a live log may be a segment recycled under the pass.
    let damage = |report: CheckReport| -> io::Result<Pass> {
        if recycled_since(dir, first)? {
            Ok(Pass::Recycled)
        } else {
            Ok(Pass::Done(report))
        }
    };
    let mut payload = Vec::new();
    let mut prev: Option<(u64, u32, u64)> = None; // (index, generation, next expected seq)
    let count = indices.len();
    for (i, index) in indices.into_iter().enumerate() {
        let name = segment_name(index);
        let last = i + 1 == count;
        let file = match dir.open(&name, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                report.problems.push(Problem {
                    segment: name,
                    offset: 0,
                    last_valid_seq: report.last_seq,
                    reason: "the segment vanished while the log was read".into(),
                });
                return damage(report);
            }
            Err(e) => return Err(e),
        };
        let header = match read_segment_header(&file)? {
            Ok(h) if h.index == index => h,
            other => {
                let what = match other {
                    Ok(h) => format!("header names index {}", h.index),
                    Err(e) => e.to_string(),
                };
                if last {
                    report.notes.push(format!(
                        "{name}: {what}: a segment whose creation did not complete; it holds no record and is removed when the tracker opens the log"
                    ));
                } else {
                    report.problems.push(Problem {
                        segment: name,
                        offset: 0,
                        last_valid_seq: report.last_seq,
                        reason: format!("segment header: {what}"),
                    });
                    return damage(report);
                }
                continue;
            }
        };
        if let Some((prev_index, prev_gen, expected)) = prev {
            let reason = if index != prev_index + 1 {
                Some(format!(
                    "segment {} is missing",
                    segment_name(prev_index + 1)
                ))
            } else if header.first_seq != expected
                && !(header.generation > prev_gen && header.first_seq > expected)
            {
                Some(format!(
                    "starts at sequence number {}, {expected} was expected",
                    header.first_seq
                ))
            } else {
                None
            };
            if let Some(reason) = reason {
                report.problems.push(Problem {
                    segment: name,
                    offset: 0,
                    last_valid_seq: report.last_seq,
                    reason,
                });
                return damage(report);
            }
        }
        let mut cursor = SegmentCursor::new(header);
        let mut summary = SegmentSummary {
            name: name.clone(),
            generation: header.generation,
            first_seq: header.first_seq,
            records: 0,
            last_seq: None,
            end_offset: 0,
        };
        // The tail's last reading that did not verify, and how many.
        let mut unsettled: Option<Damage> = None;
        let mut tail_reads = 0;
        let end = loop {
            match cursor.next(&file, &mut payload)? {
                Ok(Some(located)) => {
                    unsettled = None;
                    summary.records += 1;
                    summary.last_seq = Some(located.header.seq);
                    report.records += 1;
                    report.first_seq.get_or_insert(located.header.seq);
                    report.last_seq = Some(located.header.seq);
                    match located.header.kind {
                        Kind::Barrier => report.barriers += 1,
                        Kind::Marker => report.markers += 1,
                        _ => {}
                    }
                }
                Ok(None) => break ScanEnd::Clean,
                // The cursor stays before what did not verify: read it again
                // in a moment, until it verifies or reads the same twice.
                Err(reason)
                    if last
                        && tail_reads < MAX_TAIL_READS
                        && unsettled.as_ref() != Some(&reason) =>
                {
                    unsettled = Some(reason);
                    tail_reads += 1;
                    std::thread::sleep(dir.write_settle_time());
                }
                Err(reason) => break ScanEnd::Damaged { reason },
            }
        };
        summary.end_offset = cursor.position();
        report.segments.push(summary);
        if let ScanEnd::Damaged { reason } = end {
            report.problems.push(Problem {
                segment: name,
                offset: cursor.position(),
                last_valid_seq: report.last_seq,
                reason: if last {
                    format!("torn or damaged record at the tail ({reason}); recovery would cut the log here")
                } else {
                    format!("damaged record in a sealed segment ({reason})")
                },
            });
            return damage(report);
        }
        prev = Some((index, header.generation, cursor.next_seq()));
    }
    Ok(Pass::Done(report))
}
