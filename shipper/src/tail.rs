//! Tailing the change log in batches: the records after a sequence number,
//! up to a byte budget, waiting (inotify, no polling) when there are none.

use std::path::Path;
use std::time::{Duration, Instant};

use tidemark_changelog::{FsDir, Kind, LogReader, LogWatcher, ReadError, Seq};
use tidemark_wire::{BatchError, RecordBatch};

/// The most a batch reserves up front (a larger `max_bytes` grows the
/// batch as records come).
const BATCH_RESERVE_MAX: usize = 8 << 20;

/// A run of consecutive records, each encoded exactly as in the log.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// The records, each encoded exactly as in the log.
    pub batch: RecordBatch,
    /// Sequence number of the first record.
    pub first_seq: Seq,
    /// Sequence number of the last record.
    pub last_seq: Seq,
    /// Number of records.
    pub records: usize,
    /// Resync-needed extents among them: (disk, offset, length).
    pub resync_needed: Vec<(u32, u64, u64)>,
}

/// Why the log could not be tailed.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// Reading the log failed (damage, recycled records, I/O).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The directory could not be opened or watched.
    #[error("watching the change log {path}: {source}")]
    Watch {
        /// The log directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record read from the log cannot follow the one before it.
    #[error("the change log holds a bad record: {0}")]
    BadRecord(#[source] BatchError),
}

/// The first record the log in `dir` holds at or after `from_seq` (0: its
/// oldest), as (sequence number, generation); `None` if there is none yet.
pub fn first_record_from(dir: &FsDir, from_seq: Seq) -> Result<Option<(Seq, u32)>, ReadError> {
    let mut reader = LogReader::new(dir.clone(), from_seq);
    match reader.next_record() {
        Ok(r) => Ok(r.map(|r| (r.header.seq, r.header.generation))),
        Err(ReadError::Recycled { oldest, .. }) => {
            let mut reader = LogReader::new(dir.clone(), oldest);
            Ok(reader
                .next_record()?
                .map(|r| (r.header.seq, r.header.generation)))
        }
        Err(e) => Err(e),
    }
}

/// The highest generation among the log's segments in `dir` (0 if the
/// log has no segment yet); a segment being created right now is skipped.
pub fn newest_generation(dir: &FsDir) -> std::io::Result<u32> {
    use tidemark_changelog::segment::{parse_segment_name, read_segment_header};
    use tidemark_changelog::LogDir;
    let mut newest = 0;
    for name in dir.list()? {
        if parse_segment_name(&name).is_none() {
            continue;
        }
        let file = match dir.open(&name, false) {
            Ok(f) => f,
            // Recycled between the listing and the open.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Ok(h) = read_segment_header(&file)? {
            newest = newest.max(h.generation);
        }
    }
    Ok(newest)
}

/// A tailing reader of one log directory.
pub struct LogTail {
    dir: FsDir,
    reader: LogReader<FsDir>,
    watcher: LogWatcher,
    /// The last record read (sequence number), 0 before the first.
    last_seq: Seq,
}

impl LogTail {
    /// Tails the log in `path` from record `from_seq` on (or the first
    /// after it, across a generation change); 0: from the oldest record in
    /// the log.
    pub fn open(path: &Path, from_seq: Seq) -> Result<LogTail, TailError> {
        let watch_err = |source| TailError::Watch {
            path: path.display().to_string(),
            source,
        };
        let dir = FsDir::existing(path).map_err(watch_err)?;
        let watcher = LogWatcher::new(&dir).map_err(watch_err)?;
        Ok(LogTail {
            reader: LogReader::new(dir.clone(), from_seq),
            dir,
            watcher,
            last_seq: from_seq.saturating_prev(),
        })
    }

    /// The log directory.
    pub fn dir(&self) -> &FsDir {
        &self.dir
    }

    /// The last record handed out.
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }

    /// The records available now, up to about `max_bytes` (at least one
    /// record if any is there); waits up to `wait` for the first one.
    /// `None`: nothing new within `wait`.
    pub fn next_batch(
        &mut self,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Option<Batch>, TailError> {
        let deadline = Instant::now() + wait;
        let mut batch = Batch::default();
        loop {
            match self.reader.next_record()? {
                Some(rec) => {
                    let h = &rec.header;
                    if batch.records == 0 {
                        batch.first_seq = h.seq;
                    }
                    if h.kind == Kind::ResyncNeeded {
                        batch.resync_needed.push((h.disk.get(), h.offset, h.length));
                    }
                    // The record as written, in its own format version:
                    // its checksum travels unchanged, and is not computed
                    // again (the reader verified it). Straight into the
                    // batch, which is sized once for a whole batch: no
                    // regrowth.
                    if batch.records == 0 {
                        batch.batch = RecordBatch::with_capacity(
                            max_bytes.min(BATCH_RESERVE_MAX) + h.record_len(),
                        );
                    }
                    batch
                        .batch
                        .push_verified(h, &rec.payload)
                        .map_err(TailError::BadRecord)?;
                    batch.last_seq = h.seq;
                    batch.records += 1;
                    self.last_seq = h.seq;
                    if batch.batch.byte_len() >= max_bytes {
                        return Ok(Some(batch));
                    }
                }
                None if batch.records > 0 => return Ok(Some(batch)),
                None => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    self.watcher
                        .wait((deadline - now).min(Duration::from_millis(200)))
                        .map_err(|source| TailError::Watch {
                            path: self.dir.path().display().to_string(),
                            source,
                        })?;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_changelog::{ChangeLog, Entry, LogOptions, Record, RecoveryPolicy};

    #[test]
    fn batches_follow_the_log_and_wake_on_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = FsDir::create_all(tmp.path()).unwrap();
        let opts = LogOptions {
            segment_size: 1 << 20,
            size_limit: 8 << 20,
        };
        let (mut log, _) =
            ChangeLog::open(dir, opts, RecoveryPolicy::CleanStop { last_seq: None }, 1).unwrap();
        for i in 0..10u64 {
            log.append(&Entry::write(0, i * 4096, &[i as u8; 4096], 1))
                .unwrap();
        }
        log.append(&Entry::resync_needed(0, 0, 1 << 20, 1)).unwrap();
        log.barrier(1).unwrap();
        let mut tail = LogTail::open(tmp.path(), Seq::ZERO).unwrap();
        let b = tail
            .next_batch(3 * (4096 + 56), Duration::ZERO)
            .unwrap()
            .unwrap();
        assert_eq!((b.first_seq, b.last_seq, b.records), (Seq(1), Seq(3), 3));
        let b = tail.next_batch(1 << 20, Duration::ZERO).unwrap().unwrap();
        assert_eq!((b.first_seq, b.last_seq, b.records), (Seq(4), Seq(12), 9));
        assert_eq!(b.resync_needed, vec![(0, 0, 1 << 20)]);
        // The bytes are the log's own records.
        let first = Record::decode(b.batch.as_bytes()).unwrap();
        assert_eq!(first.header.seq, Seq(4));
        assert_eq!(first.payload, vec![3u8; 4096]);
        assert!(tail
            .next_batch(1 << 20, Duration::from_millis(50))
            .unwrap()
            .is_none());
        // A record appended while waiting wakes the tail.
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            log.append(&Entry::barrier(2)).unwrap();
            log.sync().unwrap();
        });
        let b = tail
            .next_batch(1 << 20, Duration::from_secs(10))
            .unwrap()
            .unwrap();
        assert_eq!(b.first_seq, Seq(13));
        writer.join().unwrap();
        // Reopening at a sequence number starts there.
        let mut again = LogTail::open(tmp.path(), Seq(12)).unwrap();
        let b = again.next_batch(1 << 20, Duration::ZERO).unwrap().unwrap();
        assert_eq!(b.first_seq, Seq(12));
    }
}
