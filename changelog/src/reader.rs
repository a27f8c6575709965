//! Reading the log in sequence order: the shipper's tailing reader, and the
//! walk the inspection tools use. A reader never writes; it runs beside the
//! appender (another process) and sees records as soon as they are written.

use crate::ids::Seq;
use crate::record::Record;
use crate::segment::{read_segment_header, segment_indices, segment_name, Damage, SegmentCursor};
use crate::storage::{FsDir, LogDir};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

/// Why the log could not be read on.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The records asked for were already recycled.
    #[error("records from {wanted} were recycled; the oldest in the log is {oldest}")]
    Recycled {
        /// The first sequence number asked for.
        wanted: Seq,
        /// The oldest one still there.
        oldest: Seq,
    },
    /// A sealed segment is damaged: records that were acknowledged are gone.
    #[error("segment {segment} is damaged at byte {offset} (last valid sequence number {last_valid_seq:?}): {damage}")]
    Damaged {
        /// The segment file.
        segment: String,
        /// Byte offset of the damage within it.
        offset: u64,
        /// The last record that verified before the damage.
        last_valid_seq: Option<Seq>,
        /// What is wrong.
        damage: Damage,
    },
    /// Sequence numbers do not continue from one segment to the next.
    #[error("segment {segment} starts at sequence number {found}, {expected} was expected")]
    Gap {
        /// The segment file.
        segment: String,
        /// The sequence number that should have come.
        expected: Seq,
        /// The first one the segment has.
        found: Seq,
    },
    /// The local disk failed.
    #[error("reading {what}")]
    Io {
        /// What was being read.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

struct OpenSegment<F> {
    name: String,
    index: u64,
    file: F,
    cursor: SegmentCursor,
}

/// Reads records in sequence order from a given sequence number on.
/// [`LogReader::next_record`] returns `None` when no further record is written yet;
/// call it again later (see [`LogWatcher`] to wait without polling).
pub struct LogReader<D: LogDir> {
    dir: D,
    next_seq: Seq,
    current: Option<OpenSegment<D::File>>,
    payload: Vec<u8>,
}

impl<D: LogDir> LogReader<D> {
    /// A reader whose first record will be the one with sequence number
    /// `from_seq` (or the first after it, across a generation change);
    /// `from_seq == 0` starts at the oldest record still in the log.
    pub fn new(dir: D, from_seq: Seq) -> LogReader<D> {
        LogReader {
            dir,
            next_seq: from_seq,
            current: None,
            payload: Vec::new(),
        }
    }

    /// The sequence number the next record must have (at least).
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    fn io(&self, what: &str) -> impl FnOnce(io::Error) -> ReadError {
        let what = format!("{what} in {}", self.dir.describe());
        move |source| ReadError::Io { what, source }
    }

    /// Opens the segment holding `self.next_seq`; `Ok(false)` if the log
    /// has no segment yet.
    fn position(&mut self) -> Result<bool, ReadError> {
        let indices = segment_indices(&self.dir).map_err(self.io("listing segments"))?;
        let mut chosen: Option<OpenSegment<D::File>> = None;
        for index in indices {
            let name = segment_name(index);
            let file = match self.dir.open(&name, false) {
                Ok(f) => f,
                // Recycled between listing and opening.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(&name)(e)),
            };
            let Ok(header) = read_segment_header(&file).map_err(self.io(&name))? else {
                // Being created, or being recycled: not readable yet.
                continue;
            };
            if header.index != index {
                continue;
            }
            if chosen.is_some() && header.first_seq > self.next_seq {
                break;
            }
            chosen = Some(OpenSegment {
                name,
                index,
                file,
                cursor: SegmentCursor::new(header),
            });
        }
        let Some(seg) = chosen else {
            return Ok(false);
        };
        let oldest = seg.cursor.segment().first_seq;
        if self.next_seq != Seq::ZERO && oldest > self.next_seq {
            return Err(ReadError::Recycled {
                wanted: self.next_seq,
                oldest,
            });
        }
        self.current = Some(seg);
        Ok(true)
    }

    /// The next record, or `None` if none is written yet.
    pub fn next_record(&mut self) -> Result<Option<Record>, ReadError> {
        loop {
            if self.current.is_none() && !self.position()? {
                return Ok(None);
            }
            let seg = self.current.as_mut().expect("positioned above");
            let step = seg
                .cursor
                .next(&seg.file, &mut self.payload)
                .map_err(|source| ReadError::Io {
                    what: seg.name.clone(),
                    source,
                })?;
            let end = match step {
                Ok(Some(located)) => {
                    if located.header.seq < self.next_seq {
                        continue;
                    }
                    self.next_seq = located.header.seq.next();
                    return Ok(Some(Record {
                        header: located.header,
                        payload: std::mem::take(&mut self.payload),
                    }));
                }
                Ok(None) => None,
                Err(damage) => Some(damage),
            };
            // The segment ends here for now. If a successor exists, this one
            // is sealed and the successor must continue it.
            let successor = segment_name(seg.index + 1);
            let file = match self.dir.open(&successor, false) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(source) => {
                    return Err(ReadError::Io {
                        what: successor,
                        source,
                    })
                }
            };
            let header = match read_segment_header(&file) {
                Ok(h) => h,
                Err(source) => {
                    return Err(ReadError::Io {
                        what: successor,
                        source,
                    })
                }
            };
            let header = match header {
                Ok(h) if h.index == seg.index + 1 => h,
                // Still being created.
                _ => return Ok(None),
            };
            let expected = seg.cursor.next_seq();
            let continues = header.first_seq == expected
                || (header.generation > seg.cursor.segment().generation
                    && header.first_seq > expected);
            if let Some(damage) = end {
                return Err(ReadError::Damaged {
                    segment: seg.name.clone(),
                    offset: seg.cursor.position(),
                    last_valid_seq: expected
                        .prev()
                        .filter(|s| *s >= seg.cursor.segment().first_seq),
                    damage,
                });
            }
            if !continues {
                return Err(ReadError::Gap {
                    segment: successor,
                    expected,
                    found: header.first_seq,
                });
            }
            self.current = Some(OpenSegment {
                name: successor,
                index: header.index,
                file,
                cursor: SegmentCursor::new(header),
            });
        }
    }
}

/// Wakes a tailing reader when the log directory changes, without polling.
pub struct LogWatcher {
    inotify: Inotify,
}

impl LogWatcher {
    /// Watches the directory of `dir`.
    pub fn new(dir: &FsDir) -> io::Result<LogWatcher> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(io::Error::from)?;
        inotify
            .add_watch(
                dir.path(),
                AddWatchFlags::IN_MODIFY
                    | AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CLOSE_WRITE,
            )
            .map_err(io::Error::from)?;
        Ok(LogWatcher { inotify })
    }

    /// Waits until something in the directory changed since the last call,
    /// or `timeout` passed. Returns whether there was a change.
    pub fn wait(&self, timeout: Duration) -> io::Result<bool> {
        if self.drain()? {
            return Ok(true);
        }
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        let ready = match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        if ready == 0 {
            return Ok(false);
        }
        self.drain()
    }

    fn drain(&self) -> io::Result<bool> {
        let mut any = false;
        loop {
            match self.inotify.read_events() {
                Ok(events) if !events.is_empty() => any = true,
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => return Ok(any),
                Err(e) => return Err(e.into()),
            }
        }
    }
}
