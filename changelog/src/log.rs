//! The appending side of the change log, owned by the tracker: recovery on
//! open, append, group commit, segment roll and recycling, overflow.
//!
//! Durability rules (see also the segment and cursor modules):
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
//!   issued, and only cools an extent once its records are durable).
//! - A segment is fdatasynced before its successor is created, and a new
//!   segment's header is synced and the directory fsynced before any record
//!   goes into it; so only the newest segment can ever hold a torn tail.
//! - Recovery scans the newest segment, stops at the first record that does
//!   not verify, zeroes everything after it and syncs.
//! - Any failed write or sync poisons the log: later calls fail. A failed
//!   fdatasync is never retried, because the kernel may already have dropped
//!   the pages it could not write.

use crate::cursor::{read_cursor, CursorError};
use crate::record::{DecodeError, Entry, HEADER_LEN};
use crate::segment::{
    read_segment_header, segment_indices, segment_name, Damage, ScanEnd, SegmentCursor,
    SegmentHeader, SEGMENT_HEADER_LEN,
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

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The sizes make no sense (a configuration error).
    #[error("invalid log options: {0}")]
    InvalidOptions(String),
    /// A sealed segment is damaged or missing: acknowledged records are
    /// gone, so the log refuses to open rather than guess.
    #[error("log {dir}: segment {segment} is damaged at byte {offset} (last valid sequence number {last_valid_seq:?}): {reason}")]
    Corrupt {
        /// The log directory.
        dir: String,
        /// The segment file.
        segment: String,
        /// Byte offset of the damage within it.
        offset: u64,
        /// The last record that verified before the damage.
        last_valid_seq: Option<u64>,
        /// What is wrong.
        reason: String,
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
    pub first_seq: u64,
    /// The newest record, if any.
    pub last_seq: Option<u64>,
    /// The generation of the newest segment.
    pub generation: u32,
    /// Where a torn tail was cut off, if there was one.
    pub torn_tail: Option<TornTail>,
    /// A newest segment whose creation had not completed and was removed.
    pub removed_incomplete_segment: Option<String>,
    /// The highest sequence number a reader could have seen before the
    /// stop: records after the recovered tail may have been read while not
    /// yet durable. A new generation must start above it.
    pub max_exposed_seq: u64,
}

/// A torn tail found and cut off by recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// The segment file.
    pub segment: String,
    /// Byte offset where the valid records ended.
    pub offset: u64,
    /// What was there instead of a valid record.
    pub damage: Damage,
}

#[derive(Debug, Clone, Copy)]
struct Sealed {
    index: u64,
    first_seq: u64,
}

/// The change log, appending side.
pub struct ChangeLog<D: LogDir> {
    dir: D,
    opts: LogOptions,
    sealed: VecDeque<Sealed>,
    active: D::File,
    active_header: SegmentHeader,
    write_pos: u64,
    next_seq: u64,
    durable_seq: u64,
    dirty: bool,
    poisoned: bool,
    /// Appended records not yet written, and the I/O that writes them.
    pending: Pending,
}

impl<D: LogDir> ChangeLog<D> {
    /// Opens the log in `dir`, creating it if empty, and recovers it: a torn
    /// tail of the newest segment is cut off and zeroed, an incompletely
    /// created newest segment removed. `now_ns` stamps new segment headers.
    pub fn open(
        dir: D,
        opts: LogOptions,
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
        let mut indices = segment_indices(&dir).map_err(io_err("listing".into()))?;

        let mut removed_incomplete_segment = None;
        // The newest segment may be half-created (crash during a roll): its
        // header is blank, stale, or names another index. It holds no record
        // anybody was told about, so it goes.
        while let Some(&last) = indices.last() {
            let name = segment_name(last);
            let file = dir
                .open(&name, true)
                .map_err(io_err(format!("opening {name}")))?;
            let header = read_segment_header(&file).map_err(io_err(format!("reading {name}")))?;
            match header {
                Ok(h) if h.index == last && h.segment_size == opts.segment_size => break,
                Ok(h) if h.index == last => {
                    return Err(OpenError::InvalidOptions(format!(
                        "segment {name} is {} bytes but the configured segment size is {}",
                        h.segment_size, opts.segment_size
                    )))
                }
                _ => {
                    dir.remove(&name)
                        .map_err(io_err(format!("removing {name}")))?;
                    dir.sync_dir()
                        .map_err(io_err("syncing the directory".into()))?;
                    removed_incomplete_segment = Some(name);
                    indices.pop();
                }
            }
        }

        let mut sealed = VecDeque::new();
        for (i, &index) in indices
            .iter()
            .enumerate()
            .take(indices.len().saturating_sub(1))
        {
            let name = segment_name(index);
            let corrupt = |reason: String| OpenError::Corrupt {
                dir: dir.describe(),
                segment: name.clone(),
                offset: 0,
                last_valid_seq: None,
                reason,
            };
            if indices[i + 1] != index + 1 {
                return Err(corrupt(format!(
                    "segment {} is missing",
                    segment_name(index + 1)
                )));
            }
            let file = dir
                .open(&name, false)
                .map_err(io_err(format!("opening {name}")))?;
            let header = read_segment_header(&file)
                .map_err(io_err(format!("reading {name}")))?
                .map_err(|e| corrupt(e.to_string()))?;
            if header.index != index {
                return Err(corrupt(format!("header names index {}", header.index)));
            }
            sealed.push_back(Sealed {
                index,
                first_seq: header.first_seq,
            });
        }

        let mut log = match indices.last() {
            None => {
                let first_seq = read_cursor(&dir)? + 1;
                let header = SegmentHeader {
                    generation: 0,
                    index: 1,
                    first_seq,
                    segment_size: opts.segment_size,
                    created_ns: now_ns,
                };
                let active = create_segment(&dir, None, &header)
                    .map_err(io_err("creating the first segment".into()))?;
                ChangeLog {
                    dir,
                    opts,
                    sealed,
                    active,
                    active_header: header,
                    write_pos: SEGMENT_HEADER_LEN,
                    next_seq: first_seq,
                    durable_seq: first_seq - 1,
                    dirty: false,
                    poisoned: false,
                    pending: Pending::at(header.index),
                }
            }
            Some(&index) => {
                let name = segment_name(index);
                let active = dir
                    .open(&name, true)
                    .map_err(io_err(format!("opening {name}")))?;
                let header = read_segment_header(&active)
                    .map_err(io_err(format!("reading {name}")))?
                    .expect("checked above");
                if let Some(prev) = sealed.back() {
                    if header.first_seq <= prev.first_seq {
                        return Err(OpenError::Corrupt {
                            dir: dir.describe(),
                            segment: name,
                            offset: 0,
                            last_valid_seq: None,
                            reason: "first sequence number does not follow the previous segment's"
                                .into(),
                        });
                    }
                }
                ChangeLog {
                    dir,
                    opts,
                    sealed,
                    active,
                    active_header: header,
                    write_pos: SEGMENT_HEADER_LEN,
                    next_seq: header.first_seq,
                    durable_seq: header.first_seq - 1,
                    dirty: false,
                    poisoned: false,
                    pending: Pending::at(header.index),
                }
            }
        };
        let torn_tail = log.recover_active()?;
        let first_seq = log
            .sealed
            .front()
            .map_or(log.active_header.first_seq, |s| s.first_seq);
        let last_seq = (log.next_seq > first_seq).then(|| log.next_seq - 1);
        let room = (log.opts.segment_size - log.write_pos) / HEADER_LEN as u64;
        let recovery = Recovery {
            segments: log.sealed.len() + 1,
            first_seq,
            last_seq,
            generation: log.active_header.generation,
            torn_tail,
            removed_incomplete_segment,
            max_exposed_seq: log.next_seq - 1 + room,
        };
        Ok((log, recovery))
    }

    /// Scans the newest segment, cuts a torn tail, zeroes what follows the
    /// last valid record and makes that durable.
    fn recover_active(&mut self) -> Result<Option<TornTail>, OpenError> {
        let name = segment_name(self.active_header.index);
        let dir = self.dir.describe();
        let io_err = |context: &str| {
            let (dir, context) = (dir.clone(), format!("{context} {name}"));
            move |source| OpenError::Io {
                dir,
                context,
                source,
            }
        };
        let mut cursor = SegmentCursor::new(self.active_header);
        let end = cursor
            .scan_to_end(&self.active)
            .map_err(io_err("scanning"))?;
        self.write_pos = cursor.position();
        self.next_seq = cursor.next_seq();
        self.durable_seq = self.next_seq - 1;
        let size = self.opts.segment_size;
        self.active
            .allocate(size)
            .map_err(io_err("preallocating"))?;
        self.active
            .zero_range(self.write_pos, size - self.write_pos)
            .map_err(io_err("zeroing the tail of"))?;
        if self.active.size().map_err(io_err("sizing"))? > size {
            self.active.set_len(size).map_err(io_err("truncating"))?;
        }
        self.active.sync_data().map_err(io_err("syncing"))?;
        Ok(match end {
            ScanEnd::Clean => None,
            ScanEnd::Damaged { reason } => Some(TornTail {
                segment: name.clone(),
                offset: self.write_pos,
                damage: reason,
            }),
        })
    }

    /// Appends a record; returns its sequence number. The record is copied
    /// into the log's buffer in sequence order; in write-through mode (the
    /// default) it is also written to its segment file before this returns,
    /// in buffered mode ([`set_buffered`](Self::set_buffered)) only when a
    /// later [`write_out`](Self::write_out), [`sync`](Self::sync) or
    /// detached I/O ([`take_io`](Self::take_io)) writes it. Either way it
    /// is durable only after a later sync.
    pub fn append(&mut self, entry: &Entry<'_>) -> Result<u64, AppendError> {
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
    ) -> Result<u64, AppendError> {
        if self.poisoned {
            return Err(AppendError::Poisoned);
        }
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
        self.next_seq += 1;
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

    /// Makes every record appended so far durable with one fdatasync;
    /// returns the highest durable sequence number.
    pub fn sync(&mut self) -> Result<u64, AppendError> {
        let target = self.next_seq - 1;
        self.run_inline(Some(target), true)?;
        Ok(self.durable_seq)
    }

    /// Runs the log's pending I/O on the calling thread, holding `&mut
    /// self`, until nothing [`take_io`](Self::take_io) would hand out is
    /// left.
    fn run_inline(&mut self, sync_target: Option<u64>, write_out: bool) -> Result<(), AppendError> {
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
    pub fn barrier(&mut self, timestamp_ns: u64) -> Result<u64, AppendError> {
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
    pub fn take_io(&mut self, sync_target: Option<u64>, write_out: bool) -> Option<LogIo<D>> {
        if self.poisoned || self.pending.in_flight {
            return None;
        }
        let written = self.written_seq();
        let target = sync_target.map(|t| t.min(self.next_seq - 1));
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
                self.durable_seq = self.durable_seq.max(upto);
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
                self.durable_seq = self.durable_seq.max(self.written_seq());
                self.dirty = false;
                self.active = file;
                self.pending.file_index = header.index;
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
    pub fn written_seq(&self) -> u64 {
        self.pending.written_seq.max(self.durable_seq)
    }

    /// Starts a new generation whose first record gets `first_seq`, after an
    /// unclean stop. Records of the new generation go into a new segment (or
    /// the active one, if it holds no record yet). Everything appended
    /// before is written first.
    pub fn begin_generation(
        &mut self,
        generation: u32,
        first_seq: u64,
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
        self.durable_seq = first_seq - 1;
        self.pending.written_seq = first_seq - 1;
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
    fn recyclable(&self, cursor: u64) -> usize {
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
                next_first - 1 <= cursor && sealed.index < self.pending.file_index
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
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The highest sequence number known durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
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
    buffer_last_seq: u64,
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
    written_seq: u64,
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
            buffer_last_seq: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            spare: Vec::new(),
            buffered: false,
            file_index,
            written_seq: 0,
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
        last_seq: u64,
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
        last_seq: u64,
    },
    Sync {
        file: D::File,
        upto: u64,
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
    pub fn syncs_upto(&self) -> Option<u64> {
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
