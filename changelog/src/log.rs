//! The appending side of the change log, owned by the tracker: recovery on
//! open, append, group commit, segment roll and recycling, overflow.
//!
//! # Durability
//!
//! - `append` copies a record into the log's buffer, in sequence order.
//!   The record is *written* once its batch reaches the segment file (at
//!   once in write-through mode; in buffered mode when the log's driver
//!   writes the buffer out, in large sequential writes) and *durable* once
//!   a later sync completes. One fdatasync makes every record written
//!   before it durable (group commit).
//! - In buffered mode the I/O runs *outside* whatever lock the log lives
//!   behind: `take_io` hands out one piece at a time (a batch to write, a
//!   segment to seal and its successor to create, an fdatasync) and
//!   `complete_io` takes the outcome, so appenders never wait on the disk.
//!   What is buffered and not yet written is lost by a crash of the
//!   process; the caller must keep such writes recoverable by other means
//!   (the tracker's activity map marks their extents before they are
//!   issued, and only cools an extent once the durable watermark covers
//!   its records).
//! - Every barrier carries the log's *durable watermark* as its
//!   durable-upto (see [`crate::record`]): the last sequence number whose
//!   fdatasync had completed when the barrier was appended (a sync still
//!   in flight counts only once [`ChangeLog::complete_io`] has its
//!   outcome). Once that barrier is durable the watermark is on disk
//!   ([`ChangeLog::durable_watermark`]); a writer that forgets records it
//!   wrote (the tracker cools hot extents) may only forget those at or
//!   below it.
//! - A segment is fdatasynced before its successor is created, and a new
//!   segment is preallocated, its header written and synced and the
//!   directory fsynced before any record goes into it: so only the newest
//!   segment can ever hold a torn tail, and no segment file is ever
//!   shorter than its size.
//! - Any failed write or sync poisons the log: later calls fail. A failed
//!   fdatasync is never retried, because the kernel may already have
//!   dropped the pages it could not write.
//!
//! # What recovery may cut
//!
//! Opening the log recovers it under a [`RecoveryPolicy`] that the caller
//! takes from its own record of how the last run ended (the tracker's state
//! file), because the log alone cannot tell a torn write from damage:
//!
//! - **After a clean stop** every record was durable before the stop was
//!   recorded, so nothing may be cut. Any damage refuses the open with
//!   [`OpenError::Damaged`], which names the segment file and the byte: a
//!   record that does not verify, zeroes with data after them, a segment
//!   file shorter than its size, a header that does not verify or names
//!   another segment, a missing or stray segment, a log that ends before
//!   the last record the clean stop recorded, a shipper's cursor past the
//!   last record.
//! - **After a crash** only what a crash can leave torn is cut: the tail of
//!   the newest segment from its first record that does not verify, when
//!   that record lies above the durable watermark — the highest
//!   durable-upto of the barriers found in the segment, before the damage
//!   or after it, and at least the end of the sealed segments (synced when
//!   they were sealed). Records after the cut that verify (later pages
//!   that reached the disk while an earlier one was torn) go with it.
//!   Damage at or below the watermark, in a sealed segment or in a segment
//!   header was durable, and is refused as after a clean stop. A cut may
//!   take records the shipper's cursor has passed: the shipper sends what
//!   is written, not only what is durable, so a power cut can lose records
//!   the receiver already holds. That is reported ([`Cut::acknowledged`],
//!   [`Recovery::lost_acknowledged`]) and handled as every unclean stop
//!   is: a new generation, and a resync of the hot extents, which hold
//!   every record above the watermark.
//! - **Cutting damage**, on an admin's explicit request (`tidemark log
//!   recover`): the log is cut at its first damage wherever it lies. The
//!   damaged segment is copied aside and every later one renamed aside
//!   (`<name>.damaged`), never removed.
//!
//! Under every policy a newest segment whose creation did not complete and
//! that holds no record is removed
//! ([`crate::segment::is_unfinished_roll`]); a segment
//! file the log did not create as the next one is left where it is and
//! refused.
//!
//! Whenever records were cut, or the shipper's cursor is past the last
//! record, the log takes no record ([`AppendError::NewGenerationRequired`])
//! until [`ChangeLog::begin_generation`] starts a new generation above
//! every sequence number a reader could have seen
//! ([`Recovery::max_exposed_seq`]): a sequence number is never handed out
//! twice.

use crate::cursor::{read_cursor, CursorError};
use crate::ids::Seq;
use crate::record::{DecodeError, Entry, Kind, HEADER_LEN};
use crate::segment::{
    is_unfinished_roll, read_segment_header, scan_beyond, segment_indices, segment_name, Damage,
    ScanEnd, SegmentCursor, SegmentHeader, SegmentHeaderError, SEGMENT_HEADER_LEN,
};
use crate::storage::{LogDir, LogFile};
use std::collections::VecDeque;
use std::io;

/// Sizes of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Size of every segment file (default 64 MiB).
    pub segment_size: u64,
    /// The most the log may occupy, in bytes (default 8 GiB). Appends that
    /// would need more fail with [`AppendError::Overflow`].
    pub size_limit: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_size: 64 << 20,
            size_limit: 8 << 30,
        }
    }
}

/// The smallest segment size accepted.
pub const MIN_SEGMENT_SIZE: u64 = 4096;

/// How the last run of the log's appender ended, which decides what
/// recovery may cut (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryPolicy {
    /// It stopped cleanly: nothing may be cut. `last_seq` is the last
    /// durable record it recorded at the stop, if it did: a log that ends
    /// before it lost records.
    CleanStop {
        /// The last durable record at the clean stop.
        last_seq: Option<Seq>,
    },
    /// It may have crashed: a torn tail above the durable watermark may be
    /// cut.
    Crash,
    /// An admin asked to cut the log at its first damage, wherever it is,
    /// keeping the damaged files aside. `last_seq` as for a clean stop.
    CutDamage {
        /// The last durable record at the clean stop, if the last run
        /// stopped cleanly and recorded it.
        last_seq: Option<Seq>,
    },
}

/// What is wrong with a log, where it is damaged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogDamage {
    /// The segment header does not verify.
    #[error("its header: {0}")]
    Header(SegmentHeaderError),
    /// The header is another segment's: a file renamed or swapped.
    #[error("its header is that of segment {}", segment_name(*.found))]
    OtherIndex {
        /// The index the header names.
        found: u64,
    },
    /// The file does not follow the segment before it: the segments
    /// between are missing, or the log did not create this file.
    #[error("it does not follow {previous}: the segments between are missing, or this file is not one this log created")]
    Gap {
        /// The segment before it.
        previous: String,
    },
    /// Its first sequence number does not follow the previous segment's.
    #[error(
        "its first sequence number {found} does not follow the previous segment's, {expected}"
    )]
    FirstSeq {
        /// What had to come next.
        expected: Seq,
        /// What the header says.
        found: Seq,
    },
    /// A record does not verify.
    #[error("{0}")]
    Record(Damage),
    /// A record that does not verify where the log was durable: a crash
    /// cannot have torn it.
    #[error("{damage}, at or below the durable watermark {durable_upto}: it was durable")]
    Durable {
        /// What is wrong with the record.
        damage: Damage,
        /// The highest durable-upto of the segment's barriers.
        durable_upto: Seq,
    },
    /// The file is shorter than its segment size: it was cut.
    #[error("the file is {len} bytes, shorter than its segment size of {size}")]
    Short {
        /// The file's length.
        len: u64,
        /// Its header's segment size.
        size: u64,
    },
    /// The log ends before the last record the clean stop recorded.
    #[error("the log ends after sequence number {last}, but it stopped cleanly after {expected}: records are missing at its end")]
    EndsEarly {
        /// The last record in the log (0: none).
        last: Seq,
        /// The last record at the clean stop.
        expected: Seq,
    },
    /// The shipper's cursor is past the last record: records the receiver
    /// holds are missing from the log.
    #[error("the shipper's cursor is at {cursor}, past the last record {last}: records the receiver holds are missing")]
    CursorAhead {
        /// The cursor.
        cursor: Seq,
        /// The last record in the log (0: none).
        last: Seq,
    },
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The sizes make no sense (a configuration error).
    #[error("invalid log options: {0}")]
    InvalidOptions(String),
    /// The log is damaged where recovery may not cut (see the module
    /// documentation): records that were durable would be lost, so the log
    /// refuses to open rather than guess.
    #[error("log {dir}: segment {segment} is damaged at byte {offset}{}: {damage}. Records that were durable would be lost, so the log is not opened. Keep a copy of the directory, then `tidemark log recover {dir}` cuts the log there (keeping the damaged files aside) and starts a new generation with every disk recorded resync-needed", last_valid(*.last_valid_seq))]
    Damaged {
        /// The log directory.
        dir: String,
        /// The segment file.
        segment: String,
        /// Byte offset of the damage within it.
        offset: u64,
        /// The last record that verified before the damage, if known.
        last_valid_seq: Option<Seq>,
        /// What is wrong.
        damage: LogDamage,
    },
    /// The cursor file could not be read.
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// The local disk failed.
    #[error("log {dir}: {context}")]
    Io {
        /// The log directory.
        dir: String,
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn last_valid(seq: Option<Seq>) -> String {
    seq.map(|s| format!(" (last valid sequence number {s})"))
        .unwrap_or_default()
}

/// Why a record was not appended. In every case nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The log is at its size limit and the receiver has not acknowledged
    /// enough to recycle a segment. The caller switches to bitmap mode.
    #[error("change log full: {limit} bytes in use and nothing acknowledged to recycle")]
    Overflow {
        /// The configured limit.
        limit: u64,
    },
    /// The record is larger than a segment can hold.
    #[error("record of {len} bytes does not fit in a segment ({max} bytes usable)")]
    TooLarge {
        /// The record's encoded size.
        len: usize,
        /// The usable bytes of a segment.
        max: u64,
    },
    /// The entry breaks the format's rules (a bug in the caller).
    #[error("invalid entry")]
    Invalid(#[source] DecodeError),
    /// Recovery cut records (or the receiver holds records the log lost):
    /// their sequence numbers may have been seen, so no record is taken
    /// until a new generation begins above them (a bug in the caller).
    #[error("recovery cut records: a new generation must begin before the log takes more")]
    NewGenerationRequired,
    /// An earlier write or sync failed; the log accepts nothing more.
    #[error("change log failed earlier and accepts no more records")]
    Poisoned,
    /// A synchronous write-out or sync was asked for while I/O handed out
    /// by [`ChangeLog::take_io`] is still outstanding (a bug in the caller).
    #[error("change log I/O is already in progress")]
    Busy,
    /// The cursor could not be read while recycling.
    #[error(transparent)]
    Cursor(#[from] CursorError),
    /// The local disk failed; the log is now poisoned.
    #[error("change log {dir}: {context}")]
    Io {
        /// The log directory.
        dir: String,
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// What recovery found when the log was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Segments in the log.
    pub segments: usize,
    /// Sequence number of the oldest record still in the log.
    pub first_seq: Seq,
    /// The newest record, if any.
    pub last_seq: Option<Seq>,
    /// The generation of the newest segment.
    pub generation: u32,
    /// Records cut off, if any (see the module documentation).
    pub cut: Option<Cut>,
    /// A newest segment whose creation had not completed and was removed.
    pub removed_incomplete_segment: Option<String>,
    /// The highest durable-upto of the newest segment's barriers (at least
    /// the end of the sealed segments).
    pub durable_upto: Seq,
    /// Records the shipper's cursor has passed that the log no longer
    /// holds (after a power cut; see the module documentation).
    pub lost_acknowledged: u64,
    /// The highest sequence number a reader could have seen before the
    /// stop: records after the recovered tail may have been read while not
    /// yet durable. A new generation must start above it.
    pub max_exposed_seq: Seq,
}

impl Recovery {
    /// Whether the log takes records only after
    /// [`ChangeLog::begin_generation`]: records were cut, or the receiver
    /// holds records the log lost.
    pub fn new_generation_required(&self) -> bool {
        self.cut.is_some() || self.lost_acknowledged > 0
    }
}

/// Records cut off by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// The segment file where the log now ends.
    pub segment: String,
    /// Byte offset where its valid records end.
    pub offset: u64,
    /// The sequence number the first record cut had (or would have had).
    pub first_seq: Seq,
    /// What was there instead of a valid record.
    pub damage: LogDamage,
    /// Records after the damage that verified and were cut with it.
    pub records_after: u64,
    /// Of the records cut, how many the shipper's cursor had passed.
    pub acknowledged: u64,
    /// Files kept aside ([`RecoveryPolicy::CutDamage`]).
    pub kept_aside: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
struct Sealed {
    index: u64,
    first_seq: Seq,
}

/// The change log, appending side.
pub struct ChangeLog<D: LogDir> {
    dir: D,
    opts: LogOptions,
    sealed: VecDeque<Sealed>,
    active: D::File,
    active_header: SegmentHeader,
    write_pos: u64,
    next_seq: Seq,
    durable_seq: Seq,
    /// Barriers appended but not yet durable: (seq, durable-upto).
    unsynced_barriers: VecDeque<(Seq, Seq)>,
    /// The durable-upto of the newest durable barrier (or the end of the
    /// sealed segments, if higher).
    durable_watermark: Seq,
    /// Recovery cut records: no record until a new generation begins.
    generation_required: bool,
    dirty: bool,
    poisoned: bool,
    /// Appended records not yet written, and the I/O that writes them.
    pending: Pending,
}

/// A damage found by recovery, before the policy decides what it means.
struct Found {
    segment: String,
    offset: u64,
    last_valid_seq: Option<Seq>,
    damage: LogDamage,
}

/// The recovery of one open: what the walk over the segments found.
struct Walk {
    opts: LogOptions,
    policy: RecoveryPolicy,
    /// The first damage cut ([`RecoveryPolicy::CutDamage`] only).
    cut: Option<Found>,
    kept_aside: Vec<String>,
}

impl Walk {
    fn io_err<D: LogDir>(dir: &D, context: String) -> impl FnOnce(io::Error) -> OpenError {
        let dir = dir.describe();
        move |source| OpenError::Io {
            dir,
            context,
            source,
        }
    }

    /// Opens segment file `name` read-only, with its header as it reads.
    fn open_segment<D: LogDir>(
        dir: &D,
        name: &str,
    ) -> Result<(D::File, Result<SegmentHeader, SegmentHeaderError>), OpenError> {
        let file = dir
            .open(name, false)
            .map_err(Self::io_err(dir, format!("opening {name}")))?;
        let header =
            read_segment_header(&file).map_err(Self::io_err(dir, format!("reading {name}")))?;
        Ok((file, header))
    }

    /// Damage found at `found`: refused, unless the policy cuts damage, in
    /// which case it is remembered (the earliest one wins) and the caller
    /// cuts there.
    fn damage<D: LogDir>(&mut self, dir: &D, found: Found) -> Result<(), OpenError> {
        if !matches!(self.policy, RecoveryPolicy::CutDamage { .. }) {
            return Err(OpenError::Damaged {
                dir: dir.describe(),
                segment: found.segment,
                offset: found.offset,
                last_valid_seq: found.last_valid_seq,
                damage: found.damage,
            });
        }
        self.cut = Some(found);
        Ok(())
    }

    /// A free name beside `name` for a file kept aside.
    fn aside_name<D: LogDir>(dir: &D, name: &str) -> Result<String, OpenError> {
        let names = dir
            .list()
            .map_err(Self::io_err(dir, "listing the directory".into()))?;
        let mut candidate = format!("{name}.damaged");
        let mut n = 2;
        while names.contains(&candidate) {
            candidate = format!("{name}.damaged-{n}");
            n += 1;
        }
        Ok(candidate)
    }

    /// Renames segment `name` aside, durably.
    fn rename_aside<D: LogDir>(&mut self, dir: &D, name: &str) -> Result<(), OpenError> {
        let aside = Self::aside_name(dir, name)?;
        dir.rename(name, &aside)
            .map_err(Self::io_err(dir, format!("renaming {name} to {aside}")))?;
        dir.sync_dir()
            .map_err(Self::io_err(dir, "syncing the directory".into()))?;
        self.kept_aside.push(aside);
        Ok(())
    }

    /// Copies segment `name` aside, durably, before it is cut.
    fn copy_aside<D: LogDir>(
        &mut self,
        dir: &D,
        name: &str,
        file: &D::File,
    ) -> Result<(), OpenError> {
        let aside = Self::aside_name(dir, name)?;
        let err = Self::io_err(dir, format!("copying {name} to {aside}"));
        let copy = || -> io::Result<()> {
            let out = dir.create(&aside)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut at = 0;
            loop {
                let n = file.read_full_at(&mut buf, at)?;
                out.write_all_at(&[&buf[..n]], at)?;
                at += n as u64;
                if n < buf.len() {
                    break;
                }
            }
            out.sync_data()?;
            dir.sync_dir()
        };
        copy().map_err(err)?;
        self.kept_aside.push(aside);
        Ok(())
    }

    /// The newest segment files: a roll that did not complete is taken out
    /// of `indices` and its name returned, to be removed; a file the log
    /// did not create as the next segment is damage.
    fn settle_newest<D: LogDir>(
        &mut self,
        dir: &D,
        indices: &mut Vec<u64>,
    ) -> Result<Option<String>, OpenError> {
        let mut removed = None;
        while let Some(&last) = indices.last() {
            let name = segment_name(last);
            let prev = match indices.len() {
                0 | 1 => None,
                n => {
                    let p = indices[n - 2];
                    let (_, header) = Self::open_segment(dir, &segment_name(p))?;
                    Some((p, header.map_or(Seq::ZERO, |h| h.first_seq)))
                }
            };
            let (file, header) = Self::open_segment(dir, &name)?;
            let damage = match &header {
                // Whatever it holds, a file that does not follow the
                // segment before it is not one this log created next.
                _ if prev.is_some_and(|(p, _)| p + 1 != last) => LogDamage::Gap {
                    previous: segment_name(prev.map_or(0, |(p, _)| p)),
                },
                Ok(h) if h.index == last => match prev {
                    _ if h.segment_size != self.opts.segment_size => {
                        return Err(OpenError::InvalidOptions(format!(
                            "segment {name} is {} bytes but the configured segment size is {}",
                            h.segment_size, self.opts.segment_size
                        )))
                    }
                    _ => return Ok(removed),
                },
                // A crash interrupts one roll at most: a second unfinished
                // segment below it is damage, not another roll to remove.
                _ if removed.is_none()
                    && is_unfinished_roll(dir, last, prev, &file, &header)
                        .map_err(Self::io_err(dir, format!("reading {name}")))? =>
                {
                    // Removed once nothing is refused (see `open`).
                    removed = Some(name);
                    indices.pop();
                    continue;
                }
                Ok(h) => LogDamage::OtherIndex { found: h.index },
                Err(e) => LogDamage::Header(e.clone()),
            };
            drop(file);
            self.damage(
                dir,
                Found {
                    segment: name.clone(),
                    offset: 0,
                    last_valid_seq: None,
                    damage,
                },
            )?;
            self.rename_aside(dir, &name)?;
            indices.pop();
        }
        Ok(removed)
    }

    /// The sealed segments, oldest first: each must verify its header and
    /// follow its predecessor. Under [`RecoveryPolicy::CutDamage`] every
    /// record is read as well, and the log is cut at the first damage:
    /// `indices` then ends at the segment to cut.
    fn check_sealed<D: LogDir>(
        &mut self,
        dir: &D,
        indices: &mut Vec<u64>,
    ) -> Result<VecDeque<Sealed>, OpenError> {
        let scan = matches!(self.policy, RecoveryPolicy::CutDamage { .. });
        let mut sealed: VecDeque<Sealed> = VecDeque::new();
        // Where the previous segment's records ended: (generation, next seq).
        let mut prev_end: Option<(u32, Seq)> = None;
        let mut last_valid_seq = None;
        let mut payload = Vec::new();
        let count = indices.len();
        for i in 0..count {
            let index = indices[i];
            let name = segment_name(index);
            let newest = i + 1 == count;
            let (file, header) = Self::open_segment(dir, &name)?;
            let damage = match &header {
                _ if i > 0 && indices[i - 1] + 1 != index => Some(LogDamage::Gap {
                    previous: segment_name(indices[i - 1]),
                }),
                Err(e) => Some(LogDamage::Header(e.clone())),
                Ok(h) if h.index != index => Some(LogDamage::OtherIndex { found: h.index }),
                Ok(h) => match (prev_end, sealed.back()) {
                    (Some((generation, expected)), _)
                        if h.first_seq != expected
                            && !(h.generation > generation && h.first_seq > expected) =>
                    {
                        Some(LogDamage::FirstSeq {
                            expected,
                            found: h.first_seq,
                        })
                    }
                    (None, Some(prev)) if h.first_seq <= prev.first_seq => {
                        Some(LogDamage::FirstSeq {
                            expected: prev.first_seq.next(),
                            found: h.first_seq,
                        })
                    }
                    _ => None,
                },
            };
            if let Some(damage) = damage {
                self.damage(
                    dir,
                    Found {
                        segment: name,
                        offset: 0,
                        last_valid_seq,
                        damage,
                    },
                )?;
                // Cut at the end of the previous segment: it becomes the
                // newest, and this one and every later one go aside.
                for &later in &indices[i..] {
                    self.rename_aside(dir, &segment_name(later))?;
                }
                indices.truncate(i);
                sealed.pop_back();
                return Ok(sealed);
            }
            let header = header.expect("a damaged header returned above");
            if newest {
                return Ok(sealed);
            }
            sealed.push_back(Sealed {
                index,
                first_seq: header.first_seq,
            });
            if !scan {
                continue;
            }
            let mut cursor = SegmentCursor::new(header);
            let end = loop {
                match cursor
                    .next_settled(&file, &mut payload)
                    .map_err(Self::io_err(dir, format!("reading {name}")))?
                {
                    Ok(Some(located)) => last_valid_seq = Some(located.header.seq),
                    Ok(None) => break None,
                    Err(damage) => break Some(damage),
                }
            };
            if let Some(damage) = end {
                self.damage(
                    dir,
                    Found {
                        segment: name,
                        offset: cursor.position(),
                        last_valid_seq,
                        damage: LogDamage::Record(damage),
                    },
                )?;
                // The damaged segment becomes the newest, cut where its
                // valid records end; every later one goes aside.
                for &later in &indices[i + 1..] {
                    self.rename_aside(dir, &segment_name(later))?;
                }
                indices.truncate(i + 1);
                sealed.pop_back();
                return Ok(sealed);
            }
            prev_end = Some((header.generation, cursor.next_seq()));
        }
        Ok(sealed)
    }
}

/// What a scan of the newest segment found, before anything is changed.
struct ActiveScan {
    /// Where its valid records end.
    write_pos: u64,
    /// The sequence number the next record gets.
    next_seq: Seq,
    /// The highest durable-upto of its barriers, before or after the
    /// damage, at least the end of the sealed segments.
    durable_upto: Seq,
    /// What ends its valid records, if not zeroes to the end of the file.
    damage: Option<LogDamage>,
    /// Records that verify after the damage.
    records_after: u64,
}

/// Scans the newest segment (see [`ActiveScan`]); changes nothing.
fn scan_active(
    file: &impl LogFile,
    header: &SegmentHeader,
    segment_size: u64,
) -> io::Result<ActiveScan> {
    let len = file.size()?;
    let mut cursor = SegmentCursor::new(*header);
    let (end, found_upto) = cursor.scan_to_end(file)?;
    let mut scan = ActiveScan {
        write_pos: cursor.position(),
        next_seq: cursor.next_seq(),
        durable_upto: header
            .first_seq
            .saturating_prev()
            .max(found_upto.unwrap_or(Seq::ZERO)),
        damage: None,
        records_after: 0,
    };
    match end {
        // A file shorter than its size with records in it was cut (a crash
        // cannot: the size is synced before any record goes in), whatever
        // follows them; without records it is a creation whose sync did
        // not complete.
        _ if len < segment_size && scan.next_seq > header.first_seq => {
            scan.damage = Some(LogDamage::Short {
                len,
                size: segment_size,
            });
        }
        ScanEnd::Damaged { reason } => {
            let beyond = scan_beyond(file, header, scan.write_pos + 1, scan.next_seq)?;
            scan.records_after = beyond.records;
            scan.durable_upto = scan
                .durable_upto
                .max(beyond.durable_upto.unwrap_or(Seq::ZERO));
            scan.damage = Some(LogDamage::Record(reason));
        }
        ScanEnd::Clean => {}
    }
    Ok(scan)
}

/// Ends the newest segment at `write_pos`: zeroes everything after it,
/// restores the segment's full size and makes that durable.
fn settle_active(file: &impl LogFile, write_pos: u64, segment_size: u64) -> io::Result<()> {
    file.allocate(segment_size)?;
    file.zero_range(write_pos, segment_size - write_pos)?;
    if file.size()? > segment_size {
        file.set_len(segment_size)?;
    }
    file.sync_data()
}

/// The most records a segment of `segment_size` bytes can hold (every one
/// a bare header).
fn capacity(segment_size: u64) -> u64 {
    (segment_size - SEGMENT_HEADER_LEN) / HEADER_LEN as u64
}

/// A bound on every sequence number the segment files in `indices` can
/// have held: each readable header's first sequence number plus the
/// capacity of it and of every later file.
fn exposure_bound<D: LogDir>(dir: &D, indices: &[u64], segment_size: u64) -> io::Result<Seq> {
    let mut bound = Seq::ZERO;
    for (pos, &index) in indices.iter().enumerate() {
        let file = match dir.open(&segment_name(index), false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Ok(h) = read_segment_header(&file)? {
            let files = (indices.len() - pos) as u64;
            bound = bound.max(Seq(h
                .first_seq
                .saturating_prev()
                .get()
                .saturating_add(capacity(segment_size).saturating_mul(files))));
        }
    }
    Ok(bound)
}

impl<D: LogDir> ChangeLog<D> {
    /// Opens the log in `dir`, creating it if empty, and recovers it under
    /// `policy` (see the module documentation): a torn tail of the newest
    /// segment is cut and zeroed where the policy allows, an incompletely
    /// created newest segment removed, and damage refused. `now_ns` stamps
    /// new segment headers.
    pub fn open(
        dir: D,
        opts: LogOptions,
        policy: RecoveryPolicy,
        now_ns: u64,
    ) -> Result<(ChangeLog<D>, Recovery), OpenError> {
        if opts.segment_size < MIN_SEGMENT_SIZE {
            return Err(OpenError::InvalidOptions(format!(
                "segment size {} is below the minimum of {MIN_SEGMENT_SIZE} bytes",
                opts.segment_size
            )));
        }
        if opts.size_limit < 2 * opts.segment_size {
            return Err(OpenError::InvalidOptions(format!(
                "size limit {} must hold at least two segments of {} bytes",
                opts.size_limit, opts.segment_size
            )));
        }
        let io_err = |context: String| {
            let d = dir.describe();
            move |source| OpenError::Io {
                dir: d,
                context,
                source,
            }
        };
        let cursor = read_cursor(&dir)?;
        let listed = segment_indices(&dir).map_err(io_err("listing".into()))?;
        let bound = exposure_bound(&dir, &listed, opts.segment_size)
            .map_err(io_err("reading segment headers".into()))?;
        let mut walk = Walk {
            opts,
            policy,
            cut: None,
            kept_aside: Vec::new(),
        };
        let mut indices = listed.clone();
        let unfinished = walk.settle_newest(&dir, &mut indices)?;
        let sealed = walk.check_sealed(&dir, &mut indices)?;

        // The newest segment, scanned without changing anything yet: every
        // refusal comes before the first change.
        let existing = match indices.last() {
            None => None,
            Some(&index) => {
                let name = segment_name(index);
                let file = dir
                    .open(&name, true)
                    .map_err(io_err(format!("opening {name}")))?;
                let header = read_segment_header(&file)
                    .map_err(io_err(format!("reading {name}")))?
                    .expect("the newest segment's header was checked");
                let scan = scan_active(&file, &header, opts.segment_size)
                    .map_err(io_err(format!("scanning {name}")))?;
                Some((name, file, header, scan))
            }
        };
        let (active_header, write_pos, next_seq) = match &existing {
            Some((_, _, header, scan)) => (*header, scan.write_pos, scan.next_seq),
            None => {
                let header = SegmentHeader {
                    generation: 0,
                    index: listed.last().map_or(1, |&i| i + 1),
                    first_seq: cursor.next(),
                    segment_size: opts.segment_size,
                    created_ns: now_ns,
                };
                (header, SEGMENT_HEADER_LEN, header.first_seq)
            }
        };
        let durable_upto = existing
            .as_ref()
            .map_or(active_header.first_seq.saturating_prev(), |e| {
                e.3.durable_upto
            });
        let first_seq = sealed
            .front()
            .map_or(active_header.first_seq, |s| s.first_seq);
        let last = next_seq.saturating_prev();
        let last_seq = (next_seq > first_seq).then_some(last);
        let refuse = |segment: String, offset, last_valid_seq, damage| OpenError::Damaged {
            dir: dir.describe(),
            segment,
            offset,
            last_valid_seq,
            damage,
        };

        // What the policy makes of the newest segment's end.
        let mut cut = None;
        if let Some((name, _, header, scan)) = &existing {
            if let Some(damage) = scan.damage.clone() {
                let damage = match (damage, policy) {
                    (LogDamage::Record(reason), RecoveryPolicy::Crash)
                        if scan.next_seq <= scan.durable_upto =>
                    {
                        LogDamage::Durable {
                            damage: reason,
                            durable_upto: scan.durable_upto,
                        }
                    }
                    (damage, _) => damage,
                };
                let cuttable = match policy {
                    RecoveryPolicy::CleanStop { .. } => false,
                    RecoveryPolicy::Crash => matches!(damage, LogDamage::Record(_)),
                    RecoveryPolicy::CutDamage { .. } => true,
                };
                if !cuttable {
                    return Err(refuse(
                        name.clone(),
                        scan.write_pos,
                        scan.next_seq.prev().filter(|s| *s >= header.first_seq),
                        damage,
                    ));
                }
                cut = Some(Cut {
                    segment: name.clone(),
                    offset: scan.write_pos,
                    first_seq: scan.next_seq,
                    damage,
                    records_after: scan.records_after,
                    acknowledged: 0,
                    kept_aside: Vec::new(),
                });
            }
        }
        if let Some(found) = walk.cut.take() {
            // Damage before the newest segment, which now ends the log
            // where its records end.
            cut.get_or_insert(Cut {
                segment: found.segment,
                offset: found.offset,
                first_seq: next_seq,
                damage: found.damage,
                records_after: 0,
                acknowledged: 0,
                kept_aside: Vec::new(),
            });
        }
        let expected_last = match policy {
            RecoveryPolicy::CleanStop { last_seq } | RecoveryPolicy::CutDamage { last_seq } => {
                last_seq
            }
            RecoveryPolicy::Crash => None,
        };
        let end_damage = match expected_last {
            Some(expected) if last < expected => Some(LogDamage::EndsEarly { last, expected }),
            _ if cursor > last && !matches!(policy, RecoveryPolicy::Crash) => {
                Some(LogDamage::CursorAhead { cursor, last })
            }
            _ => None,
        };
        if let Some(damage) = end_damage {
            let segment = segment_name(active_header.index);
            if matches!(policy, RecoveryPolicy::CleanStop { .. }) {
                return Err(refuse(segment, write_pos, last_seq, damage));
            }
            cut.get_or_insert(Cut {
                segment,
                offset: write_pos,
                first_seq: next_seq,
                damage,
                records_after: 0,
                acknowledged: 0,
                kept_aside: Vec::new(),
            });
        }

        // Nothing is refused from here on: recover.
        let active = match existing {
            Some((name, file, _, scan)) => {
                if scan.damage.is_some() && matches!(policy, RecoveryPolicy::CutDamage { .. }) {
                    walk.copy_aside(&dir, &name, &file)?;
                }
                settle_active(&file, scan.write_pos, opts.segment_size)
                    .map_err(io_err(format!("cutting the tail of {name}")))?;
                file
            }
            None => create_segment(&dir, None, &active_header)
                .map_err(io_err("creating the first segment".into()))?,
        };
        if let Some(name) = &unfinished {
            dir.remove(name)
                .map_err(io_err(format!("removing {name}")))?;
            dir.sync_dir()
                .map_err(io_err("syncing the directory".into()))?;
        }
        if let Some(cut) = &mut cut {
            cut.kept_aside = std::mem::take(&mut walk.kept_aside);
            cut.acknowledged = cursor.next().since(cut.first_seq).unwrap_or(0);
        }
        let lost_acknowledged = cursor.since(last).unwrap_or(0);
        let room = (opts.segment_size - write_pos) / HEADER_LEN as u64;
        let mut log = ChangeLog {
            dir,
            opts,
            sealed,
            active,
            active_header,
            write_pos,
            next_seq,
            durable_seq: last,
            unsynced_barriers: VecDeque::new(),
            durable_watermark: durable_upto.min(last),
            generation_required: false,
            dirty: false,
            poisoned: false,
            pending: Pending::at(active_header.index),
        };
        let recovery = Recovery {
            segments: log.sealed.len() + 1,
            first_seq,
            last_seq,
            generation: active_header.generation,
            cut,
            removed_incomplete_segment: unfinished,
            durable_upto,
            lost_acknowledged,
            max_exposed_seq: Seq(last.get() + room).max(bound).max(cursor),
        };
        log.generation_required = recovery.new_generation_required();
        Ok((log, recovery))
    }

    /// Appends a record; returns its sequence number. The record is copied
    /// into the log's buffer in sequence order; in write-through mode (the
    /// default) it is also written to its segment file before this returns,
    /// in buffered mode ([`set_buffered`](Self::set_buffered)) only when a
    /// later [`write_out`](Self::write_out), [`sync`](Self::sync) or
    /// detached I/O ([`take_io`](Self::take_io)) writes it. Either way it
    /// is durable only after a later sync. A barrier gets the log's
    /// durable watermark as its durable-upto (whatever its `offset` says).
    pub fn append(&mut self, entry: &Entry<'_>) -> Result<Seq, AppendError> {
        let payload_crc = entry.payload_crc();
        self.append_with_crc(entry, payload_crc)
    }

    /// [`append`](Self::append) with the payload's CRC32C computed by the
    /// caller ([`Entry::payload_crc`]), e.g. before taking the lock this
    /// log lives behind: the time under the lock is then one copy.
    pub fn append_with_crc(
        &mut self,
        entry: &Entry<'_>,
        payload_crc: u32,
    ) -> Result<Seq, AppendError> {
        if self.poisoned {
            return Err(AppendError::Poisoned);
        }
        if self.generation_required {
            return Err(AppendError::NewGenerationRequired);
        }
        let barrier;
        let entry = if entry.kind == Kind::Barrier {
            barrier = Entry {
                offset: self.durable_seq.get(),
                ..*entry
            };
            &barrier
        } else {
            entry
        };
        entry.validate().map_err(AppendError::Invalid)?;
        let len = entry.encoded_len();
        let usable = self.opts.segment_size - SEGMENT_HEADER_LEN;
        if len as u64 > usable {
            return Err(AppendError::TooLarge { len, max: usable });
        }
        if self.write_pos + len as u64 > self.opts.segment_size {
            let header = SegmentHeader {
                generation: self.active_header.generation,
                index: self.active_header.index + 1,
                first_seq: self.next_seq,
                segment_size: self.opts.segment_size,
                created_ns: entry.timestamp_ns,
            };
            self.roll(header)?;
        }
        let seq = self.next_seq;
        let header = entry.encode_header_with(seq, self.active_header.generation, payload_crc);
        let out = &mut self.pending;
        if out.buffer.is_empty() {
            out.buffer_at = self.write_pos;
        }
        out.buffer.extend_from_slice(&header);
        out.buffer.extend_from_slice(entry.payload);
        out.buffer_last_seq = seq;
        self.write_pos += len as u64;
        self.next_seq = self.next_seq.next();
        if entry.kind == Kind::Barrier {
            self.unsynced_barriers.push_back((seq, Seq(entry.offset)));
        }
        if !self.pending.buffered {
            self.write_out()?;
        }
        Ok(seq)
    }

    /// Buffered mode (`true`): [`append`](Self::append) only copies records
    /// into memory, and whoever drives the log writes them out in large
    /// writes, on its own schedule, with [`take_io`](Self::take_io) /
    /// [`complete_io`](Self::complete_io) (or [`write_out`](Self::write_out)
    /// and [`sync`](Self::sync)). Write-through (`false`, the default):
    /// every append writes its record before it returns.
    pub fn set_buffered(&mut self, buffered: bool) {
        self.pending.buffered = buffered;
    }

    /// Writes every record appended so far to its segment file, without
    /// making it durable (records become visible to readers).
    pub fn write_out(&mut self) -> Result<(), AppendError> {
        self.run_inline(None, true)
    }

    /// Everything up to `durable` is durable now: so are the barriers
    /// among it, and the watermark they carry.
    fn made_durable(&mut self, durable: Seq) {
        self.durable_seq = self.durable_seq.max(durable);
        while let Some(&(seq, upto)) = self.unsynced_barriers.front() {
            if seq > self.durable_seq {
                break;
            }
            self.durable_watermark = self.durable_watermark.max(upto);
            self.unsynced_barriers.pop_front();
        }
    }

    /// Makes every record appended so far durable with one fdatasync;
    /// returns the highest durable sequence number.
    pub fn sync(&mut self) -> Result<Seq, AppendError> {
        let target = self.next_seq.saturating_prev();
        self.run_inline(Some(target), true)?;
        Ok(self.durable_seq)
    }

    /// Runs the log's pending I/O on the calling thread, holding `&mut
    /// self`, until nothing [`take_io`](Self::take_io) would hand out is
    /// left.
    fn run_inline(&mut self, sync_target: Option<Seq>, write_out: bool) -> Result<(), AppendError> {
        if self.poisoned {
            return Err(AppendError::Poisoned);
        }
        if self.pending.in_flight {
            return Err(AppendError::Busy);
        }
        while let Some(mut io) = self.take_io(sync_target, write_out) {
            let result = io.run();
            self.complete_io(io, result)?;
        }
        Ok(())
    }

    /// Appends a barrier and makes it, and everything before it, durable.
    pub fn barrier(&mut self, timestamp_ns: u64) -> Result<Seq, AppendError> {
        let seq = self.append(&Entry::barrier(timestamp_ns))?;
        self.sync()?;
        Ok(seq)
    }

    /// The next piece of I/O that brings the segment files up to what was
    /// appended, to be [run](LogIo::run) *without* holding the log (the
    /// appenders go on meanwhile) and handed back to
    /// [`complete_io`](Self::complete_io). At most one is outstanding at a
    /// time: `None` while one is, and when there is nothing to do.
    ///
    /// - With `sync_target`, records up to that sequence number are written
    ///   and then made durable by one fdatasync, which also covers every
    ///   other record written by then (group commit). Newer records never
    ///   hold the sync back: it is taken as soon as the target is written.
    /// - With `write_out`, every buffered record is written (no sync).
    /// - Either way, a segment full of records is sealed (written and
    ///   fdatasynced) and its successor created, in order, before a record
    ///   goes into the successor: only the newest segment can hold a torn
    ///   tail.
    pub fn take_io(&mut self, sync_target: Option<Seq>, write_out: bool) -> Option<LogIo<D>> {
        if self.poisoned || self.pending.in_flight {
            return None;
        }
        let written = self.written_seq();
        let target = sync_target.map(|t| t.min(self.next_seq.saturating_prev()));
        let op = if target.is_some_and(|t| t <= written && t > self.durable_seq) {
            match self.active.try_clone() {
                Ok(file) => IoOp::Sync {
                    file,
                    upto: written,
                },
                Err(source) => {
                    self.poison("cloning the active segment handle", source);
                    return None;
                }
            }
        } else if let Some(queued) = self.pending.queue.pop_front() {
            match queued {
                Queued::Write {
                    index,
                    offset,
                    data,
                    last_seq,
                } => {
                    self.pending.queued_bytes -= data.len();
                    debug_assert_eq!(index, self.pending.file_index, "writes follow their roll");
                    match self.active.try_clone() {
                        Ok(file) => IoOp::Write {
                            file,
                            offset,
                            data,
                            last_seq,
                        },
                        Err(source) => {
                            self.poison("cloning the active segment handle", source);
                            return None;
                        }
                    }
                }
                Queued::Roll { header, reuse } => {
                    let seal = if self.dirty {
                        match self.active.try_clone() {
                            Ok(file) => Some(file),
                            Err(source) => {
                                self.poison("cloning the segment being sealed", source);
                                return None;
                            }
                        }
                    } else {
                        None
                    };
                    IoOp::Roll {
                        dir: self.dir.clone(),
                        seal,
                        reuse: reuse.map(segment_name),
                        header,
                        created: None,
                    }
                }
            }
        } else if !self.pending.buffer.is_empty()
            && (write_out || target.is_some_and(|t| t > written))
        {
            let spare = self.pending.spare.pop().unwrap_or_default();
            let data = std::mem::replace(&mut self.pending.buffer, spare);
            match self.active.try_clone() {
                Ok(file) => IoOp::Write {
                    file,
                    offset: self.pending.buffer_at,
                    data,
                    last_seq: self.pending.buffer_last_seq,
                },
                Err(source) => {
                    self.poison("cloning the active segment handle", source);
                    return None;
                }
            }
        } else {
            return None;
        };
        self.pending.in_flight = true;
        self.pending.in_flight_bytes = match &op {
            IoOp::Write { data, .. } => data.len(),
            _ => 0,
        };
        Some(LogIo { op })
    }

    /// Records the outcome of I/O handed out by [`take_io`](Self::take_io).
    /// A failure poisons the log: the records it covered are not written
    /// (or not durable), and the log accepts nothing more.
    pub fn complete_io(&mut self, io: LogIo<D>, result: io::Result<()>) -> Result<(), AppendError> {
        self.pending.in_flight = false;
        self.pending.in_flight_bytes = 0;
        if let Err(source) = result {
            let context = match io.op {
                IoOp::Write { .. } => "writing records",
                IoOp::Sync { .. } => "syncing the active segment",
                IoOp::Roll { .. } => "sealing a segment and creating its successor",
            };
            return Err(self.poison(context, source));
        }
        match io.op {
            IoOp::Write {
                mut data, last_seq, ..
            } => {
                self.pending.written_seq = self.pending.written_seq.max(last_seq);
                self.dirty = true;
                // Keep the buffer for the next batch, unless an unusually
                // large record made it big: memory is bounded by use.
                if data.capacity() <= SPARE_CAPACITY && self.pending.spare.len() < 2 {
                    data.clear();
                    self.pending.spare.push(data);
                }
            }
            IoOp::Sync { upto, .. } => {
                self.made_durable(upto);
                if upto >= self.written_seq() {
                    self.dirty = false;
                }
            }
            IoOp::Roll {
                header, created, ..
            } => {
                let Some(file) = created else {
                    return Err(self.poison(
                        "sealing a segment and creating its successor",
                        io::Error::other("the roll reported success without a new segment"),
                    ));
                };
                // Sealing synced everything written to the old segment.
                self.made_durable(self.written_seq());
                self.dirty = false;
                self.active = file;
                self.pending.file_index = header.index;
                // Now that its successor exists, recovery never cuts into
                // the sealed segment: its records count as durable as if a
                // barrier said so. (Not before: until the roll is done the
                // sealed segment is the newest on disk.)
                self.durable_watermark = self
                    .durable_watermark
                    .max(header.first_seq.saturating_prev());
            }
        }
        Ok(())
    }

    /// Bytes of appended records not yet handed to I/O (buffered or queued
    /// behind a roll), plus those of a write in flight: the memory records
    /// waiting to be written hold.
    pub fn unwritten_bytes(&self) -> usize {
        self.pending.buffer.len() + self.pending.queued_bytes + self.pending.in_flight_bytes
    }

    /// Whether I/O handed out by [`take_io`](Self::take_io) is outstanding.
    pub fn io_in_flight(&self) -> bool {
        self.pending.in_flight
    }

    /// The highest sequence number written to its segment file.
    pub fn written_seq(&self) -> Seq {
        self.pending.written_seq.max(self.durable_seq)
    }

    /// Starts a new generation whose first record gets `first_seq`, after an
    /// unclean stop or a cut (`first_seq` above
    /// [`Recovery::max_exposed_seq`]). Records of the new generation go into
    /// a new segment (or the active one, if it holds no record yet).
    /// Everything appended before is written first.
    pub fn begin_generation(
        &mut self,
        generation: u32,
        first_seq: Seq,
        now_ns: u64,
    ) -> Result<(), AppendError> {
        if self.poisoned {
            return Err(AppendError::Poisoned);
        }
        assert!(
            generation > self.active_header.generation && first_seq >= self.next_seq,
            "generations and sequence numbers only move forward"
        );
        self.write_out()?;
        let empty = self.write_pos == SEGMENT_HEADER_LEN;
        let header = SegmentHeader {
            generation,
            index: self.active_header.index + u64::from(!empty),
            first_seq,
            segment_size: self.opts.segment_size,
            created_ns: now_ns,
        };
        if empty {
            if let Err(source) = self.active.write_all_at(&[&header.encode()], 0) {
                return Err(self.poison("rewriting the segment header", source));
            }
            if let Err(source) = self.active.sync_data() {
                return Err(self.poison("syncing the segment header", source));
            }
            self.active_header = header;
        } else {
            self.roll(header)?;
            self.write_out()?;
        }
        self.next_seq = first_seq;
        // Nothing exists between the old records and `first_seq`; every
        // old record is in a synced segment.
        self.durable_seq = first_seq.saturating_prev();
        self.pending.written_seq = first_seq.saturating_prev();
        self.durable_watermark = self.durable_watermark.max(first_seq.saturating_prev());
        self.generation_required = false;
        Ok(())
    }

    /// Seals the active segment and makes `header` the new active one,
    /// reusing the oldest segment the receiver no longer needs if there is
    /// one, else creating a file; fails with `Overflow` (having changed
    /// nothing) if that would exceed the size limit. The decision is taken
    /// here, at once; the files follow in order with the log's other I/O
    /// (see [`take_io`](Self::take_io)).
    fn roll(&mut self, header: SegmentHeader) -> Result<(), AppendError> {
        let max_segments = (self.opts.size_limit / self.opts.segment_size) as usize;
        let cursor = read_cursor(&self.dir)?;
        let recyclable = self.recyclable(cursor);
        let in_use = self.sealed.len() + 1;
        if in_use + 1 - recyclable > max_segments {
            return Err(AppendError::Overflow {
                limit: self.opts.size_limit,
            });
        }
        let out = &mut self.pending;
        if !out.buffer.is_empty() {
            let spare = out.spare.pop().unwrap_or_default();
            let data = std::mem::replace(&mut out.buffer, spare);
            out.queued_bytes += data.len();
            out.queue.push_back(Queued::Write {
                index: self.active_header.index,
                offset: out.buffer_at,
                data,
                last_seq: out.buffer_last_seq,
            });
        }
        let reuse = (recyclable > 0).then(|| self.sealed[0].index);
        if reuse.is_some() {
            self.sealed.pop_front();
        }
        self.sealed.push_back(Sealed {
            index: self.active_header.index,
            first_seq: self.active_header.first_seq,
        });
        self.pending.queue.push_back(Queued::Roll { header, reuse });
        self.active_header = header;
        self.write_pos = SEGMENT_HEADER_LEN;
        Ok(())
    }

    /// How many of the oldest sealed segments hold only records at or
    /// below `cursor`, and are sealed on disk too (a roll queued behind
    /// buffered records has not sealed its segment yet).
    fn recyclable(&self, cursor: Seq) -> usize {
        let next_firsts = self
            .sealed
            .iter()
            .skip(1)
            .map(|s| s.first_seq)
            .chain(std::iter::once(self.active_header.first_seq))
            .take(self.sealed.len());
        next_firsts
            .zip(&self.sealed)
            .take_while(|(next_first, sealed)| {
                next_first.saturating_prev() <= cursor && sealed.index < self.pending.file_index
            })
            .count()
    }

    fn poison(&mut self, context: &'static str, source: io::Error) -> AppendError {
        self.poisoned = true;
        AppendError::Io {
            dir: self.dir.describe(),
            context,
            source,
        }
    }

    /// The sequence number the next record will get.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// The highest sequence number known durable.
    pub fn durable_seq(&self) -> Seq {
        self.durable_seq
    }

    /// The durable watermark on disk: the durable-upto of the newest durable
    /// barrier (or the end of the sealed segments, if higher). Recovery after
    /// a crash never cuts a record at or below it, and may cut any above it:
    /// whoever must be able to redo lost records (the tracker, through its
    /// activity map) may forget only those at or below it.
    pub fn durable_watermark(&self) -> Seq {
        self.durable_watermark
    }

    /// The current generation.
    pub fn generation(&self) -> u32 {
        self.active_header.generation
    }

    /// Bytes that can still be appended before the log overflows: the room
    /// left in the active segment, plus the segments that may still be
    /// created under the size limit or recycled because the receiver has
    /// acknowledged everything in them (reads the cursor).
    pub fn free_bytes(&self) -> Result<u64, AppendError> {
        let max_segments = self.opts.size_limit / self.opts.segment_size;
        let cursor = read_cursor(&self.dir)?;
        let recyclable = self.recyclable(cursor) as u64;
        let in_use = self.sealed.len() as u64 + 1;
        let spare = (max_segments + recyclable).saturating_sub(in_use);
        let active_room = self.opts.segment_size.saturating_sub(self.write_pos);
        Ok(spare * self.opts.segment_size + active_room)
    }

    /// Bytes the log's segment files occupy.
    pub fn bytes_in_use(&self) -> u64 {
        (self.sealed.len() as u64 + 1) * self.opts.segment_size
    }

    /// The largest payload one record may carry in this log: a segment's
    /// usable space, at most [`MAX_PAYLOAD`](crate::record::MAX_PAYLOAD).
    /// Larger writes must be split into several records.
    pub fn max_payload(&self) -> usize {
        let usable = self.opts.segment_size - SEGMENT_HEADER_LEN - HEADER_LEN as u64;
        usable.min(u64::from(crate::record::MAX_PAYLOAD)) as usize
    }

    /// The sizes the log was opened with.
    pub fn options(&self) -> LogOptions {
        self.opts
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &D {
        &self.dir
    }
}

/// Most capacity a write buffer may keep to be reused; a larger one (a
/// batch with large records) is freed after its write.
const SPARE_CAPACITY: usize = 8 << 20;

/// Records waiting to be written, and the log's side of its I/O: what the
/// segment files hold so far (see [`ChangeLog::take_io`]).
struct Pending {
    /// Encoded records of the active segment, from `buffer_at` on.
    buffer: Vec<u8>,
    buffer_at: u64,
    buffer_last_seq: Seq,
    /// Batches of earlier segments and the rolls between them, in order.
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    /// Emptied buffers, kept for the next batch.
    spare: Vec<Vec<u8>>,
    /// See [`ChangeLog::set_buffered`].
    buffered: bool,
    /// Index of the segment `ChangeLog::active` is (the newest on disk).
    file_index: u64,
    /// The highest sequence number written to its file (see
    /// [`ChangeLog::written_seq`]).
    written_seq: Seq,
    /// An I/O handed out by `take_io` has not been completed.
    in_flight: bool,
    in_flight_bytes: usize,
}

impl Pending {
    /// Nothing pending; the newest segment on disk is `file_index`.
    fn at(file_index: u64) -> Pending {
        Pending {
            buffer: Vec::new(),
            buffer_at: SEGMENT_HEADER_LEN,
            buffer_last_seq: Seq::ZERO,
            queue: VecDeque::new(),
            queued_bytes: 0,
            spare: Vec::new(),
            buffered: false,
            file_index,
            written_seq: Seq::ZERO,
            in_flight: false,
            in_flight_bytes: 0,
        }
    }
}

/// Work queued behind the buffer when a segment filled up.
enum Queued {
    /// A batch of records of segment `index` at `offset`.
    Write {
        index: u64,
        offset: u64,
        data: Vec<u8>,
        last_seq: Seq,
    },
    /// Seal the newest segment on disk, create `header`'s (renaming the
    /// segment `reuse` if given).
    Roll {
        header: SegmentHeader,
        reuse: Option<u64>,
    },
}

/// One piece of the log's I/O, handed out by [`ChangeLog::take_io`] to run
/// without holding the log. Never retry a failed one: hand the failure to
/// [`ChangeLog::complete_io`], which poisons the log.
pub struct LogIo<D: LogDir> {
    op: IoOp<D>,
}

enum IoOp<D: LogDir> {
    Write {
        file: D::File,
        offset: u64,
        data: Vec<u8>,
        last_seq: Seq,
    },
    Sync {
        file: D::File,
        upto: Seq,
    },
    Roll {
        dir: D,
        seal: Option<D::File>,
        reuse: Option<String>,
        header: SegmentHeader,
        created: Option<D::File>,
    },
}

impl<D: LogDir> LogIo<D> {
    /// Performs the I/O (write, fdatasync, or seal and create).
    pub fn run(&mut self) -> io::Result<()> {
        match &mut self.op {
            IoOp::Write {
                file, offset, data, ..
            } => file.write_all_at(&[data], *offset),
            IoOp::Sync { file, .. } => file.sync_data(),
            IoOp::Roll {
                dir,
                seal,
                reuse,
                header,
                created,
            } => {
                if let Some(old) = seal {
                    old.sync_data()?;
                }
                *created = Some(create_segment(dir, reuse.as_deref(), header)?);
                Ok(())
            }
        }
    }

    /// The sequence number this I/O makes durable, if it is a sync.
    pub fn syncs_upto(&self) -> Option<Seq> {
        match &self.op {
            IoOp::Sync { upto, .. } => Some(*upto),
            _ => None,
        }
    }

    /// Bytes of records it writes.
    pub fn bytes(&self) -> usize {
        match &self.op {
            IoOp::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// Creates (or, with `reuse`, renames and resets) a segment file, writes and
/// syncs its header, and syncs the directory.
fn create_segment<D: LogDir>(
    dir: &D,
    reuse: Option<&str>,
    header: &SegmentHeader,
) -> io::Result<D::File> {
    let name = segment_name(header.index);
    let file = match reuse {
        Some(old) => {
            // The rename must be durable before the content changes: until
            // then a restart may still find the file under its old name and
            // would read a half-rewritten sealed segment.
            dir.rename(old, &name)?;
            dir.sync_dir()?;
            let file = dir.open(&name, true)?;
            // Drop the old content so the space after the new records reads
            // as zeroes; the allocation below reserves it again.
            file.set_len(0)?;
            file
        }
        None => dir.create(&name)?,
    };
    file.allocate(header.segment_size)?;
    file.write_all_at(&[&header.encode()], 0)?;
    file.sync_data()?;
    dir.sync_dir()?;
    Ok(file)
}
