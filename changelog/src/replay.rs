//! Replay: applying log records, in order, to an image of one disk. This is
//! what every crash-consistency proof and every forensic recovery uses, so
//! the stop point is resolved *before* the image is touched: a replay to a
//! barrier or label the log does not hold changes nothing. The whole log is
//! checked first ([`crate::check()`]): if it stops being valid before the
//! stop point (a damaged or missing segment, tail damage), the replay
//! refuses with where and why, unless the caller accepts the valid prefix,
//! in which case it says where it stopped ([`ReplaySummary::stopped_early`]).

use crate::check::{check, Problem};
use crate::ids::{DiskId, Seq};
use crate::reader::{LogReader, ReadError};
use crate::record::{Kind, RecordRef};
use crate::storage::LogDir;
use serde::Serialize;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use tidemark_durable::{zero_range, Zeroes};

/// Where a replay stops (inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopAt {
    /// After the last record in the log.
    End,
    /// After the record with this sequence number.
    Seq(Seq),
    /// After the n-th barrier (1-based) of the log.
    Barrier(u64),
    /// After the first marker with this label.
    Label(String),
}

/// Why a replay did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The stop point is not in the log; the image was not touched.
    #[error("{0}; the image was not changed")]
    StopNotFound(String),
    /// The log stops being valid before the stop point; the image was not
    /// changed.
    #[error("the log stops being valid at segment {} byte {} ({}); {}; the image was not changed", .0.segment, .0.offset, .0.reason, last_valid(.0.last_valid_seq))]
    Damaged(Box<Problem>),
    /// The log could not be read.
    #[error(transparent)]
    Log(#[from] ReadError),
    /// The log could not be checked.
    #[error("checking the log")]
    Check(#[source] io::Error),
    /// Writing the image failed.
    #[error("writing the image")]
    Image(#[source] io::Error),
}

fn last_valid(seq: Option<Seq>) -> String {
    match seq {
        Some(s) => format!("the last valid record is {s}"),
        None => "no record before it verifies".into(),
    }
}

/// Something records can be applied to.
pub trait ReplayTarget {
    /// Writes `data` at `offset`.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes `offset..offset+len` read as zeroes.
    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes what was applied durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A disk image in memory as a replay target: references for tests and
/// checks. Writes past its end are an `InvalidInput` error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImage(pub Vec<u8>);

impl MemoryImage {
    /// The byte range `offset..offset+len`, if it lies within the image.
    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if end > self.0.len() as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{offset}+{len} is beyond the {}-byte image", self.0.len()),
            ));
        }
        Ok(offset as usize..end as usize)
    }
}

impl ReplayTarget for MemoryImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        self.0[r].copy_from_slice(data);
        Ok(())
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let r = self.range(offset, len)?;
        self.0[r].fill(0);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An image file as a replay target. Zeroed ranges become holes where the
/// filesystem supports it.
pub struct ImageFile {
    file: File,
}

impl ImageFile {
    /// Uses an open, writable image file.
    pub fn new(file: File) -> ImageFile {
        ImageFile { file }
    }
}

impl ReplayTarget for ImageFile {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
        if self.file.metadata()?.len() < end {
            self.file.set_len(end)?;
        }
        zero_range(&self.file, offset, len, Zeroes::Hole)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReplaySummary {
    /// The first record read.
    pub first_seq: Option<Seq>,
    /// The last record applied (the stop point).
    pub last_seq: Option<Seq>,
    /// Records applied to the image (writes, zeroes, trims of the disk).
    pub applied: u64,
    /// Bytes written or zeroed.
    pub bytes: u64,
    /// Barriers passed.
    pub barriers: u64,
    /// Records of other disks, skipped.
    pub other_disks: u64,
    /// Extents marked resync-needed: the image may differ from the source
    /// there, because the log does not hold their content.
    pub resync_needed: Vec<(u64, u64)>,
    /// Where the log stopped being valid, when the replay stopped there
    /// because the caller accepted the valid prefix.
    pub stopped_early: Option<Problem>,
}

/// Finds the sequence number a stop point stands for, reading the log from
/// its oldest record up to `valid_until` (the last valid record, when the
/// log stops being valid after it).
pub fn resolve_stop<D: LogDir>(
    dir: D,
    stop: &StopAt,
    valid_until: Option<Seq>,
) -> Result<Seq, ReplayError> {
    let mut reader = LogReader::new(dir, Seq::ZERO);
    let mut barriers = 0;
    let mut last = None;
    while let Some(record) = reader.next_record()? {
        if valid_until.is_some_and(|v| record.header.seq > v) {
            break;
        }
        let seq = record.header.seq;
        last = Some(seq);
        match stop {
            StopAt::Seq(s) if seq >= *s => return Ok(seq.min(*s)),
            StopAt::Barrier(n) if record.header.kind == Kind::Barrier => {
                barriers += 1;
                if barriers == *n {
                    return Ok(seq);
                }
            }
            StopAt::Label(l) if record.label() == Some(l.as_str()) => return Ok(seq),
            _ => {}
        }
    }
    match (stop, last) {
        (StopAt::End, Some(last)) => Ok(last),
        (StopAt::End, None) => Err(ReplayError::StopNotFound("the log holds no record".into())),
        (StopAt::Seq(s), Some(last)) if last < *s => Err(ReplayError::StopNotFound(format!(
            "sequence number {s} is past the newest record {last}"
        ))),
        (StopAt::Seq(s), _) => Err(ReplayError::StopNotFound(format!(
            "sequence number {s} is not in the log"
        ))),
        (StopAt::Barrier(n), _) => Err(ReplayError::StopNotFound(format!(
            "barrier {n} not found: the log holds {barriers} barriers"
        ))),
        (StopAt::Label(l), _) => Err(ReplayError::StopNotFound(format!(
            "no marker labelled {l:?}"
        ))),
    }
}

/// Applies one record of `disk` to `target`, updating `summary`.
pub fn apply<'a>(
    record: impl Into<RecordRef<'a>>,
    disk: DiskId,
    target: &mut impl ReplayTarget,
    summary: &mut ReplaySummary,
) -> io::Result<()> {
    let record = record.into();
    let h = &record.header;
    summary.first_seq.get_or_insert(h.seq);
    summary.last_seq = Some(h.seq);
    match h.kind {
        Kind::Barrier => summary.barriers += 1,
        Kind::Marker => {}
        _ if h.disk != disk => summary.other_disks += 1,
        Kind::Write => {
            target.write_at(h.offset, record.payload)?;
            summary.applied += 1;
            summary.bytes += h.length;
        }
        Kind::WriteZeroes | Kind::Trim => {
            target.zero(h.offset, h.length)?;
            summary.applied += 1;
            summary.bytes += h.length;
        }
        Kind::ResyncNeeded => summary.resync_needed.push((h.offset, h.length)),
        // What the grown part held before the writes after it is the
        // source's, not in the log: like a resync-needed extent.
        Kind::Grow => summary.resync_needed.push((h.offset, h.length)),
    }
    Ok(())
}

/// Replays the records of `disk`, from the oldest in the log up to `stop`,
/// onto `target`, then flushes it. If the log stops being valid before the
/// stop point the replay refuses ([`ReplayError::Damaged`]) before touching
/// the image, unless `accept_prefix`: then it replays the valid records
/// (to the stop point, if it lies among them) and says where it stopped.
pub fn replay<D: LogDir + Clone>(
    dir: D,
    disk: DiskId,
    stop: &StopAt,
    accept_prefix: bool,
    target: &mut impl ReplayTarget,
) -> Result<ReplaySummary, ReplayError> {
    let report = check(&dir).map_err(ReplayError::Check)?;
    let problem = report.problems.into_iter().next();
    let valid_until = problem
        .as_ref()
        .map(|p| p.last_valid_seq.unwrap_or(Seq::ZERO));
    let (until, stopped_early) = match (resolve_stop(dir.clone(), stop, valid_until), problem) {
        // The stop point lies past the damage (or nothing valid is left).
        (Err(ReplayError::StopNotFound(_)), Some(p)) => {
            return Err(ReplayError::Damaged(Box::new(p)))
        }
        (Err(e), _) => return Err(e),
        (Ok(_), Some(p)) if matches!(stop, StopAt::End) && !accept_prefix => {
            return Err(ReplayError::Damaged(Box::new(p)))
        }
        (Ok(until), p) => {
            // Replaying to the end of a damaged log stops at the damage.
            let stopped_early = p.filter(|_| matches!(stop, StopAt::End));
            (until, stopped_early)
        }
    };
    let mut summary = ReplaySummary {
        stopped_early,
        ..ReplaySummary::default()
    };
    let mut reader = LogReader::new(dir, Seq::ZERO);
    while let Some(record) = reader.next_record()? {
        if record.header.seq > until {
            break;
        }
        apply(&record, disk, target, &mut summary).map_err(ReplayError::Image)?;
        if record.header.seq == until {
            break;
        }
    }
    target.flush().map_err(ReplayError::Image)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_image_takes_writes_and_zeroes_within_it_and_refuses_the_rest() {
        let mut m = MemoryImage(vec![7; 16]);
        m.write_at(2, &[1, 2]).unwrap();
        m.zero(10, 6).unwrap();
        assert_eq!(m.0, [7, 7, 1, 2, 7, 7, 7, 7, 7, 7, 0, 0, 0, 0, 0, 0]);
        let before = m.clone();
        assert!(m.write_at(15, &[1, 2]).is_err());
        assert!(m.zero(u64::MAX, 2).is_err());
        assert_eq!(m, before, "nothing applied");
    }
}
