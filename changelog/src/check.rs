//! `log check`: verifies every record of every segment and says exactly
//! where the log stops being valid: records that do not verify, zeroes with
//! data after them, segment files cut short, headers that do not verify or
//! are another segment's, missing or stray segments, a shipper's cursor past
//! the last record. Only a newest segment whose creation did not complete
//! (and that holds no record) is a note rather than damage, as in
//! [`crate::log`]'s recovery.

use crate::cursor::read_cursor;
use crate::ids::Seq;
use crate::record::Kind;
use crate::segment::{
    first_nonzero, is_unfinished_roll, read_segment_header, segment_indices, segment_name, Damage,
    ScanEnd, SegmentCursor,
};
use crate::storage::{LogDir, LogFile};
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
    pub first_seq: Seq,
    /// Valid records in it.
    pub records: u64,
    /// The last valid record's sequence number.
    pub last_seq: Option<Seq>,
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
    pub last_valid_seq: Option<Seq>,
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
    pub first_seq: Option<Seq>,
    /// The newest valid record's sequence number.
    pub last_seq: Option<Seq>,
    /// The durable watermark of the newest segment: the highest
    /// durable-upto of its barriers, at least the end of the sealed
    /// segments. Damage at or below it was durable.
    pub durable_upto: Option<Seq>,
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
    let mut recycled = 0;
    // Damage found on a live log is reported only once a second pass finds
    // the same: a read racing the appender has been seen to find less than
    // a read before it (a clean end where a record was, records below the
    // shipper's cursor), and such a pass must not be taken for damage.
    let mut unconfirmed: Option<Vec<Problem>> = None;
    for pass in 0..MAX_PASSES {
        let mut report = match check_pass(dir)? {
            Pass::Done(report) => report,
            Pass::Recycled => {
                recycled += 1;
                continue;
            }
        };
        if !report.problems.is_empty()
            && unconfirmed.as_ref() != Some(&report.problems)
            && pass + 1 < MAX_PASSES
        {
            unconfirmed = Some(report.problems);
            std::thread::sleep(dir.write_settle_time());
            continue;
        }
        if recycled > 0 {
            report.notes.push(format!(
                "the log was being written during the check: segments were recycled under it, so it began again at the oldest segment left ({recycled} time(s))"
            ));
        }
        return Ok(report);
    }
    Err(io::Error::other(format!(
        "the log in {} changed under the check {MAX_PASSES} times (segments recycled, or damage not found twice alike): the tracker writes faster than the log can be read; check again when it is quieter",
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
    // Read before the segments: the receiver cannot hold what was not
    // written yet, so a cursor past the records read after it is damage.
    let cursor = read_cursor(dir).map_err(io::Error::other)?;
    let indices = segment_indices(dir)?;
    let Some(&first) = indices.first() else {
        if cursor > Seq::ZERO {
            report.problems.push(Problem {
                segment: String::new(),
                offset: 0,
                last_valid_seq: None,
                reason: format!("the log holds no segment, but the shipper's cursor is at {cursor}: records the receiver holds are missing"),
            });
        }
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
    // (index, first sequence number, generation, next expected seq)
    let mut prev: Option<(u64, Seq, u32, Seq)> = None;
    let count = indices.len();
    'segments: for (i, index) in indices.into_iter().enumerate() {
        let name = segment_name(index);
        let last = i + 1 == count;
        let problem = |report: &mut CheckReport, offset: u64, reason: String| {
            report.problems.push(Problem {
                segment: name.clone(),
                offset,
                last_valid_seq: report.last_seq,
                reason,
            });
        };
        let file = match dir.open(&name, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                problem(
                    &mut report,
                    0,
                    "the segment vanished while the log was read".into(),
                );
                return damage(report);
            }
            // Not a regular file: named, as damage.
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                problem(&mut report, 0, e.to_string());
                return damage(report);
            }
            Err(e) => return Err(e),
        };
        if let Some((prev_index, ..)) = prev.filter(|p| p.0 + 1 != index) {
            problem(
                &mut report,
                0,
                format!(
                    "it does not follow {}: the segments between are missing, or this file is not one the log created",
                    segment_name(prev_index)
                ),
            );
            return damage(report);
        }
        let mut header = read_segment_header(&file)?;
        let mut header_reads = 0;
        let header = loop {
            let other = match header {
                Ok(h) if h.index == index => break h,
                other => other,
            };
            let what = match &other {
                Ok(h) => format!("its header is that of segment {}", segment_name(h.index)),
                Err(e) => format!("its header: {e}"),
            };
            let unfinished = last
                && is_unfinished_roll(
                    dir,
                    index,
                    prev.map(|(p, first, _, _)| (p, first)),
                    &file,
                    &other,
                )?;
            // On a live log the newest segment may be created under the
            // check: the verdict stands only if the header read before it
            // is still there after it.
            if last && header_reads < MAX_TAIL_READS {
                let again = read_segment_header(&file)?;
                if again != other {
                    header_reads += 1;
                    header = again;
                    std::thread::sleep(dir.write_settle_time());
                    continue;
                }
            }
            if unfinished {
                report.notes.push(format!(
                    "{name}: {what}: a segment whose creation did not complete; it holds no record and is removed when the tracker opens the log"
                ));
                continue 'segments;
            }
            problem(&mut report, 0, format!("segment header: {what}"));
            return damage(report);
        };
        if let Some((_, _, prev_gen, expected)) = prev {
            let reason = if header.first_seq != expected
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
                problem(&mut report, 0, reason);
                return damage(report);
            }
        }
        let len = file.size()?;
        let mut cursor = SegmentCursor::new(header);
        let mut summary = SegmentSummary {
            name: name.clone(),
            generation: header.generation,
            first_seq: header.first_seq,
            records: 0,
            last_seq: None,
            end_offset: 0,
        };
        // Everything before the newest segment is durable; a barrier says
        // how far the newest one is. (A segment never starts at 0.)
        let mut durable_upto = header.first_seq.prev().unwrap_or(Seq::ZERO);
        // The tail's last reading that did not verify, and how many.
        let mut unsettled: Option<Damage> = None;
        let mut tail_reads = 0;
        let end = loop {
            let step = match cursor.next(&file, &mut payload)? {
                // Zeroes: the end, if nothing but zeroes follows.
                Ok(None) => match first_nonzero(&file, cursor.position())? {
                    Some(at) => Err(Damage::DataAfterZeroes { at }),
                    None => Ok(None),
                },
                other => other,
            };
            match step {
                Ok(Some(located)) => {
                    unsettled = None;
                    summary.records += 1;
                    summary.last_seq = Some(located.header.seq);
                    report.records += 1;
                    report.first_seq.get_or_insert(located.header.seq);
                    report.last_seq = Some(located.header.seq);
                    durable_upto =
                        durable_upto.max(located.header.durable_upto().unwrap_or(Seq::ZERO));
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
        if last {
            report.durable_upto = Some(durable_upto);
        }
        // Cut short with records in it: whatever ends the records, the
        // file lost what followed (a crash cannot shorten a segment).
        if len < header.segment_size && summary_has_records(&report) {
            problem(
                &mut report,
                cursor.position(),
                format!(
                    "the file is {len} bytes, shorter than its segment size of {}: it was cut",
                    header.segment_size
                ),
            );
            return damage(report);
        }
        if let ScanEnd::Damaged { reason } = end {
            let at_seq = cursor.next_seq();
            problem(
                &mut report,
                cursor.position(),
                if !last {
                    format!("damaged record in a sealed segment ({reason})")
                } else if at_seq <= durable_upto {
                    format!("damaged record ({reason}) at or below the durable watermark {durable_upto}: it was durable, a crash cannot have torn it")
                } else {
                    format!("torn or damaged record at the tail ({reason}); after a crash recovery would cut the log here, after a clean stop it refuses the log")
                },
            );
            return damage(report);
        }
        prev = Some((
            index,
            header.first_seq,
            header.generation,
            cursor.next_seq(),
        ));
    }
    if let Some((_, _, _, next)) = prev {
        if cursor >= next {
            report.problems.push(Problem {
                segment: report.segments.last().map(|s| s.name.clone()).unwrap_or_default(),
                offset: report.segments.last().map_or(0, |s| s.end_offset),
                last_valid_seq: report.last_seq,
                reason: format!(
                    "the shipper's cursor is at {cursor}, past the last record {}: records the receiver holds are missing",
                    next.prev().unwrap_or(Seq::ZERO)
                ),
            });
        }
    }
    Ok(Pass::Done(report))
}

/// Whether the segment just checked (the last summary) holds a record.
fn summary_has_records(report: &CheckReport) -> bool {
    report.segments.last().is_some_and(|s| s.records > 0)
}
