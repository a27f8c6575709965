//! The job registry: every long-running piece of work the replica site
//! does or watches (initial syncs and resyncs as the shippers report
//! them, test failovers and failovers started from the console), running
//! and finished, with progress for an ETA. The console shows it; it is
//! kept on disk so a restart still knows what ran.
//!
//! Invariants:
//!
//! - A job's id is never reused: the next id is kept in the file with the
//!   jobs, and only ever grows (a file set aside as damaged starts the
//!   ids again above the highest the damaged file's name shows, see
//!   [`JobRegistry::open`]).
//! - A job running when the receiver stopped reads back as
//!   [`JobState::Interrupted`], never as running: nothing of it is left
//!   to finish it.
//! - The registry is bounded: every running job plus the newest
//!   [`MAX_FINISHED`] finished ones.
//! - Starts and ends are written durably before the call returns; mere
//!   progress is written without a sync and at most every
//!   [`PROGRESS_WRITE_EVERY`], so a power cut may lose some progress,
//!   never a job.
//!
//! # Format
//!
//! `<data dir>/.jobs/jobs`: a sealed text file (the JSON of
//! [`JobsOnDisk`], then a `crc32c` line, see
//! `tidemark_changelog::sealed`) replaced atomically through the storage
//! seam ([`tidemark_durable::replace()`]). A file that does not verify or
//! decode is a typed [`JobsFileError`]; [`JobRegistry::open`] sets it
//! aside (`jobs.damaged`) with a warning and starts afresh.
//!
//! [`JobBook`] is the pure core (bytes in, jobs and writes out, `now`
//! passed in); [`JobRegistry`] is its shell, shared by the receiver's
//! sessions and its console.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_changelog::sealed::{seal, unseal};
use tidemark_durable::{replace, Durability, FsDir, LogDir, LogFile};
use tidemark_names::Name;
use tidemark_wire::{ReportState, StatusReport};

/// The registry's directory in the receiver's data directory.
pub const JOBS_DIR: &str = ".jobs";
/// The registry's file in [`JOBS_DIR`].
pub const JOBS_FILE: &str = "jobs";
const JOBS_TMP: &str = "jobs.tmp";
/// The lock file in [`JOBS_DIR`] the registry's process holds.
pub const JOBS_LOCK: &str = "lock";
/// Where a damaged file is set aside.
pub const JOBS_DAMAGED: &str = "jobs.damaged";
/// Finished jobs kept (the oldest beyond this are forgotten).
pub const MAX_FINISHED: usize = 100;
/// How often mere progress is written.
pub const PROGRESS_WRITE_EVERY: Duration = Duration::from_secs(10);
/// The file's format version.
const VERSION: u32 = 1;
/// Bytes of a reason kept (a longer one is cut, at a character boundary).
const MAX_REASON: usize = 1000;
/// Who started the jobs the shippers report.
pub const BY_SHIPPER: &str = "shipper";

/// A job's id: unique for the life of the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// A shipper copying its disks for the first time.
    InitialSync,
    /// A shipper comparing and sending blocks.
    Resync,
    /// A recovery point served writable, its writes to scratch files.
    TestFailover,
    /// A group failed over: its replication stopped, its images written.
    Failover,
    /// Reverse replication back to the original site.
    Failback,
}

impl JobKind {
    /// How people call it.
    pub fn describe(self) -> &'static str {
        match self {
            JobKind::InitialSync => "initial sync",
            JobKind::Resync => "resync",
            JobKind::TestFailover => "test failover",
            JobKind::Failover => "failover",
            JobKind::Failback => "failback",
        }
    }
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state", content = "reason")]
pub enum JobState {
    /// Running now.
    Running,
    /// Finished as it should.
    Done,
    /// Finished on an error, which it names.
    Failed(String),
    /// Stopped from outside before it finished (the receiver stopped, or
    /// the work was superseded); why.
    Interrupted(String),
}

impl JobState {
    /// Whether the job has ended.
    pub fn ended(&self) -> bool {
        !matches!(self, JobState::Running)
    }

    /// One word for it.
    pub fn word(&self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed(_) => "failed",
            JobState::Interrupted(_) => "interrupted",
        }
    }

    /// Why it failed or was interrupted (empty otherwise).
    pub fn reason(&self) -> &str {
        match self {
            JobState::Failed(r) | JobState::Interrupted(r) => r,
            JobState::Running | JobState::Done => "",
        }
    }
}

/// One job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// What it does.
    pub kind: JobKind,
    /// The protected host.
    pub host: Name,
    /// Its consistency group.
    pub group: Name,
    /// Who started it: a console user's name, or [`BY_SHIPPER`].
    pub by: String,
    /// When it started, ns since the Unix epoch (receiver's clock).
    pub started_ns: u64,
    /// When it ended; `None` while running.
    pub ended_ns: Option<u64>,
    /// Where it is.
    #[serde(flatten)]
    pub state: JobState,
    /// Units (bytes) done; never more than `total`.
    pub done: u64,
    /// Units in all (0: no measure of progress).
    pub total: u64,
    /// `done` when the job's progress was first seen, and when: the rate
    /// for the ETA is measured from there (a sync seen half-done after a
    /// restart did not do its first half in no time).
    pub base_done: u64,
    /// When `base_done` was seen, ns since the Unix epoch.
    pub base_ns: u64,
}

impl Job {
    /// The share done, 0..=1, if the job measures progress.
    pub fn fraction(&self) -> Option<f64> {
        (self.total > 0).then(|| self.done as f64 / self.total as f64)
    }

    /// The time left at `now_ns`, at the rate seen since the progress
    /// was first seen; `None` when ended, unmeasured or no rate yet.
    pub fn eta(&self, now_ns: u64) -> Option<Duration> {
        if self.state.ended() || self.total == 0 {
            return None;
        }
        let gained = self.done.checked_sub(self.base_done)?;
        let elapsed = now_ns.checked_sub(self.base_ns)?;
        if gained == 0 || elapsed == 0 {
            return None;
        }
        let left = self.total - self.done;
        let secs = left as f64 * (elapsed as f64 / 1e9) / gained as f64;
        Some(Duration::from_secs_f64(secs.min(u32::MAX as f64)))
    }
}

/// The file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct JobsOnDisk {
    /// The format's version (`VERSION`, 1).
    pub version: u32,
    /// The id the next job gets.
    pub next_id: u64,
    /// The jobs, oldest first.
    pub jobs: Vec<Job>,
}

/// Why the registry's file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JobsFileError {
    /// The file does not verify (torn by something other than our
    /// atomic replacement, or damaged on disk).
    #[error("the job registry's file is damaged: {0}")]
    Damaged(&'static str),
    /// It verifies but does not decode as a registry (another program's
    /// file, or a version this receiver does not know).
    #[error("the job registry's file does not decode")]
    Decode(#[source] serde_json::Error),
    /// A version this receiver does not know.
    #[error("the job registry's file is of version {0}, this receiver reads {VERSION}")]
    Version(u32),
    /// It decodes but breaks the registry's rules (an id at or above the
    /// next id, or ids not increasing).
    #[error("the job registry's file is inconsistent: {0}")]
    Inconsistent(&'static str),
    /// It could not be read, written or set aside (local disk).
    #[error("{what} the job registry's file")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The reason a job running at a restart reads back with.
pub const INTERRUPTED_BY_RESTART: &str = "the receiver stopped while it ran";

fn cut(reason: &str) -> String {
    let reason = reason.replace(['\n', '\r'], " ");
    if reason.len() <= MAX_REASON {
        return reason;
    }
    let mut end = MAX_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// What the book asks to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsWrite {
    /// The file's whole new content.
    pub bytes: Vec<u8>,
    /// Whether it must survive a power cut.
    pub durability: Durability,
}

/// The registry in memory (see the module documentation).
#[derive(Debug, Clone)]
pub struct JobBook {
    next_id: u64,
    jobs: Vec<Job>,
    /// A start or an end not yet written.
    dirty_durable: bool,
    /// Progress not yet written.
    dirty_progress: bool,
    last_write_ns: u64,
    /// Grows at every change, for watchers.
    version: u64,
}

impl Default for JobBook {
    fn default() -> JobBook {
        JobBook::new(1)
    }
}

impl JobBook {
    /// An empty registry whose first job gets id `next_id`.
    pub fn new(next_id: u64) -> JobBook {
        JobBook {
            next_id: next_id.max(1),
            jobs: Vec::new(),
            dirty_durable: false,
            dirty_progress: false,
            last_write_ns: 0,
            version: 0,
        }
    }

    /// The registry `bytes` (a whole file) holds, read at `now_ns`: a job
    /// that was running is interrupted by the restart (and the change is
    /// to be written, [`JobBook::poll_write`]).
    pub fn from_bytes(bytes: &[u8], now_ns: u64) -> Result<JobBook, JobsFileError> {
        let text = std::str::from_utf8(bytes).map_err(|_| JobsFileError::Damaged("not text"))?;
        let body = unseal(text).map_err(JobsFileError::Damaged)?;
        let disk: JobsOnDisk = serde_json::from_str(body).map_err(JobsFileError::Decode)?;
        if disk.version != VERSION {
            return Err(JobsFileError::Version(disk.version));
        }
        if disk.jobs.windows(2).any(|w| w[0].id >= w[1].id) {
            return Err(JobsFileError::Inconsistent("job ids do not increase"));
        }
        if disk.jobs.last().is_some_and(|j| j.id.0 >= disk.next_id) || disk.next_id == 0 {
            return Err(JobsFileError::Inconsistent(
                "a job's id is not below the next id",
            ));
        }
        let mut book = JobBook::new(disk.next_id);
        book.jobs = disk.jobs;
        for job in &mut book.jobs {
            if !job.state.ended() {
                job.state = JobState::Interrupted(INTERRUPTED_BY_RESTART.into());
                job.ended_ns = Some(now_ns.max(job.started_ns));
                book.dirty_durable = true;
            }
        }
        book.trim();
        Ok(book)
    }

    /// The id the next job gets.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// The jobs, oldest first.
    pub fn jobs(&self) -> &[Job] {
        &self.jobs
    }

    /// The job `id`, if it is still kept.
    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    /// A number that grows at every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    fn changed(&mut self, durable: bool) {
        self.version += 1;
        if durable {
            self.dirty_durable = true;
        } else {
            self.dirty_progress = true;
        }
    }

    /// Forgets the oldest finished jobs beyond [`MAX_FINISHED`].
    fn trim(&mut self) {
        let finished = self.jobs.iter().filter(|j| j.state.ended()).count();
        let mut drop = finished.saturating_sub(MAX_FINISHED);
        self.jobs.retain(|j| {
            if drop > 0 && j.state.ended() {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }

    /// Starts a job; its id.
    pub fn handle_start(
        &mut self,
        kind: JobKind,
        host: &Name,
        group: &Name,
        by: &str,
        now_ns: u64,
    ) -> JobId {
        let id = JobId(self.next_id);
        self.next_id += 1;
        self.jobs.push(Job {
            id,
            kind,
            host: host.clone(),
            group: group.clone(),
            by: cut(by),
            started_ns: now_ns,
            ended_ns: None,
            state: JobState::Running,
            done: 0,
            total: 0,
            base_done: 0,
            base_ns: now_ns,
        });
        self.changed(true);
        id
    }

    /// The progress of running job `id`: `done` of `total` units. An
    /// ended or forgotten job is left as it is.
    pub fn handle_progress(&mut self, id: JobId, done: u64, total: u64, now_ns: u64) {
        let Some(job) = self
            .jobs
            .iter_mut()
            .find(|j| j.id == id && !j.state.ended())
        else {
            return;
        };
        let done = done.min(total);
        if (job.done, job.total) == (done, total) {
            return;
        }
        // A new measure (another total, or going back): the rate starts
        // again from here.
        if job.total != total || done < job.done || job.total == 0 {
            job.base_done = done;
            job.base_ns = now_ns;
        }
        job.done = done;
        job.total = total;
        self.changed(false);
    }

    /// Ends running job `id` in `state` (not [`JobState::Running`]). An
    /// ended or forgotten job is left as it is: an end is told once.
    pub fn handle_end(&mut self, id: JobId, state: JobState, now_ns: u64) {
        if !state.ended() {
            return;
        }
        let Some(job) = self
            .jobs
            .iter_mut()
            .find(|j| j.id == id && !j.state.ended())
        else {
            return;
        };
        job.state = match state {
            JobState::Failed(r) => JobState::Failed(cut(&r)),
            JobState::Interrupted(r) => JobState::Interrupted(cut(&r)),
            s => s,
        };
        if job.state == JobState::Done && job.total > 0 {
            job.done = job.total;
        }
        job.ended_ns = Some(now_ns.max(job.started_ns));
        self.changed(true);
        self.trim();
    }

    /// The running job of `kind` of `host`'s `group`, if any.
    pub fn running(&self, kind: JobKind, host: &Name, group: &Name) -> Option<JobId> {
        self.jobs
            .iter()
            .rev()
            .find(|j| j.kind == kind && !j.state.ended() && &j.host == host && &j.group == group)
            .map(|j| j.id)
    }

    /// A status report of `host`'s `group`'s shipper: an initial sync or
    /// resync it shows starts a job (or moves the running one on);
    /// protected ends them as done, critical as failed with its reason.
    pub fn handle_report(&mut self, host: &Name, group: &Name, report: &StatusReport, now: u64) {
        let (current, progress) = match report.state {
            ReportState::InitialSync => (Some(JobKind::InitialSync), report.sync),
            ReportState::Resyncing => (Some(JobKind::Resync), report.resync),
            ReportState::Protected | ReportState::Critical => (None, Default::default()),
        };
        for kind in [JobKind::InitialSync, JobKind::Resync] {
            if Some(kind) == current {
                continue;
            }
            if let Some(id) = self.running(kind, host, group) {
                let end = match (&report.state, current) {
                    (ReportState::Critical, _) => JobState::Failed(if report.reason.is_empty() {
                        "the shipper reported critical".into()
                    } else {
                        report.reason.clone()
                    }),
                    (_, Some(next)) => JobState::Interrupted(format!(
                        "the shipper went on to a {}",
                        next.describe()
                    )),
                    _ => JobState::Done,
                };
                self.handle_end(id, end, now);
            }
        }
        if let Some(kind) = current {
            let id = match self.running(kind, host, group) {
                Some(id) => id,
                None => self.handle_start(kind, host, group, BY_SHIPPER, now),
            };
            self.handle_progress(id, progress.done, progress.total, now);
        }
    }

    /// The next write the file needs at `now_ns`, if any: at once after
    /// a start or an end (durable), after progress only when
    /// [`PROGRESS_WRITE_EVERY`] passed since the last write (or `force`,
    /// e.g. at shutdown).
    pub fn poll_write(&mut self, now_ns: u64, force: bool) -> Option<JobsWrite> {
        let due = self.dirty_durable
            || (self.dirty_progress
                && (force
                    || now_ns.saturating_sub(self.last_write_ns)
                        >= PROGRESS_WRITE_EVERY.as_nanos() as u64));
        if !due {
            return None;
        }
        let durability = if self.dirty_durable {
            Durability::Durable
        } else {
            Durability::Visible
        };
        self.dirty_durable = false;
        self.dirty_progress = false;
        self.last_write_ns = now_ns;
        Some(JobsWrite {
            bytes: self.to_bytes(),
            durability,
        })
    }

    /// Marks the content `poll_write` last gave as not written (its write
    /// failed): it is asked again.
    pub fn handle_write_failed(&mut self, durability: Durability) {
        match durability {
            Durability::Durable => self.dirty_durable = true,
            Durability::Visible => self.dirty_progress = true,
        }
    }

    /// The whole file for this registry.
    pub fn to_bytes(&self) -> Vec<u8> {
        let disk = JobsOnDisk {
            version: VERSION,
            next_id: self.next_id,
            jobs: self.jobs.clone(),
        };
        let body = serde_json::to_string(&disk).expect("jobs serialize") + "\n";
        seal(&body).into_bytes()
    }
}

/// The registry's shell: the book behind a lock, written through the
/// storage seam at every change, and a channel that tells watchers (the
/// console's live page) that something changed.
pub struct JobRegistry {
    book: Mutex<JobBook>,
    /// Where it is kept; `None`: in memory only (its directory could not
    /// be made, already warned).
    dir: Option<FsDir>,
    changes: tokio::sync::watch::Sender<u64>,
    /// Held while the registry is kept on disk: a second receiver
    /// started on the same data directory (refused later by the
    /// receiver's own lock) must not interrupt this one's jobs.
    _lock: Option<tidemark_durable::DirLock>,
}

impl std::fmt::Debug for JobRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobRegistry")
            .field("dir", &self.dir.as_ref().map(|d| d.describe()))
            .finish_non_exhaustive()
    }
}

/// Reads the registry in `dir`: `Ok(None)` if there is no file yet.
pub fn read<D: LogDir>(dir: &D, now_ns: u64) -> Result<Option<JobBook>, JobsFileError> {
    let io = |what| move |source| JobsFileError::Io { what, source };
    let file = match dir.open(JOBS_FILE, false) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("opening")(e)),
    };
    let len = file.size().map_err(io("reading"))?;
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX).min(64 << 20)];
    let got = file.read_full_at(&mut bytes, 0).map_err(io("reading"))?;
    bytes.truncate(got);
    JobBook::from_bytes(&bytes, now_ns).map(Some)
}

/// The highest next id a damaged file's bytes may show: the largest
/// number after `"next-id":`, so ids are not given twice even when the
/// file's checksum fails. 1 if none can be read.
fn next_id_of_damaged(bytes: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(bytes);
    let key = "\"next-id\":";
    text.match_indices(key)
        .filter_map(|(at, _)| {
            let rest = &text[at + key.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(1)
}

/// Opens the registry kept in `dir`: a damaged file is set aside as
/// [`JOBS_DAMAGED`] (replacing an older one) and the registry starts
/// afresh, its ids above those the damaged file names and above the clock
/// in ms at `now_ns`.
pub fn open_in<D: LogDir>(dir: &D, now_ns: u64) -> Result<JobBook, JobsFileError> {
    match read(dir, now_ns) {
        Ok(book) => Ok(book.unwrap_or_default()),
        Err(JobsFileError::Io { what, source }) => Err(JobsFileError::Io { what, source }),
        Err(e) => {
            let io = |what| move |source| JobsFileError::Io { what, source };
            let next = dir
                .open(JOBS_FILE, false)
                .and_then(|f| {
                    let mut bytes = vec![0u8; f.size()?.min(64 << 20) as usize];
                    let n = f.read_full_at(&mut bytes, 0)?;
                    bytes.truncate(n);
                    Ok(next_id_of_damaged(&bytes))
                })
                .unwrap_or(1)
                // The damage may have hit the number itself (or the file
                // named none): ids then go on above the clock in ms, which
                // no id counted up from an earlier start or floor reaches
                // while fewer than a thousand jobs start a second.
                .max(now_ns / 1_000_000);
            tracing::warn!(
                dir = %dir.describe(),
                error = %crate::daemon::error_chain(&e),
                "the job registry's file is set aside as {JOBS_DAMAGED}; the registry starts afresh"
            );
            dir.rename(JOBS_FILE, JOBS_DAMAGED)
                .map_err(io("setting aside"))?;
            dir.sync_dir().map_err(io("setting aside"))?;
            let mut book = JobBook::new(next);
            // The fresh file is written at once: the next id must be kept.
            book.dirty_durable = true;
            Ok(book)
        }
    }
}

impl JobRegistry {
    /// The registry of the receiver whose data directory is `data_dir`,
    /// read at `now_ns`. If its directory cannot be made or its file read
    /// (local disk), the registry runs in memory, with a warning.
    pub fn open(data_dir: &Path, now_ns: u64) -> JobRegistry {
        let path = data_dir.join(JOBS_DIR);
        let opened = tidemark_durable::create_private_dir_all(&path)
            .and_then(|()| FsDir::existing(&path))
            .map_err(|source| JobsFileError::Io {
                what: "creating the directory of",
                source,
            })
            .and_then(|dir| {
                let lock = tidemark_durable::DirLock::acquire(&path, JOBS_LOCK, "job registry")
                    .map_err(|e| JobsFileError::Io {
                        what: "locking",
                        source: std::io::Error::other(crate::daemon::error_chain(&e)),
                    })?;
                open_in(&dir, now_ns).map(|book| (dir, book, lock))
            });
        let (dir, book, lock) = match opened {
            Ok((dir, book, lock)) => (Some(dir), book, Some(lock)),
            Err(e) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %crate::daemon::error_chain(&e),
                    "the job registry cannot be kept on disk; it is kept in memory only"
                );
                (None, JobBook::default(), None)
            }
        };
        let registry = JobRegistry {
            book: Mutex::new(book),
            dir,
            changes: tokio::sync::watch::channel(0).0,
            _lock: lock,
        };
        registry.write(now_ns, false);
        registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JobBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes what the book asks (under its lock, so writes keep their
    /// order) and tells the watchers. Blocking.
    fn write(&self, now_ns: u64, force: bool) {
        let mut book = self.lock();
        let version = book.version();
        if let Some(dir) = &self.dir {
            if let Some(w) = book.poll_write(now_ns, force) {
                if let Err(e) = replace(dir, JOBS_TMP, JOBS_FILE, &w.bytes, w.durability) {
                    book.handle_write_failed(w.durability);
                    tracing::warn!(error = %crate::daemon::error_chain(&e), "cannot write the job registry; tried again at its next change");
                }
            }
        }
        drop(book);
        self.changes.send_if_modified(|v| {
            let changed = *v != version;
            *v = version;
            changed
        });
    }

    /// Starts a job (written durably before it returns); its id. Blocking.
    pub fn start(&self, kind: JobKind, host: &Name, group: &Name, by: &str, now_ns: u64) -> JobId {
        let id = self.lock().handle_start(kind, host, group, by, now_ns);
        self.write(now_ns, false);
        id
    }

    /// The progress of job `id`. Blocking (it may write).
    pub fn progress(&self, id: JobId, done: u64, total: u64, now_ns: u64) {
        self.lock().handle_progress(id, done, total, now_ns);
        self.write(now_ns, false);
    }

    /// Ends job `id` (written durably before it returns). Blocking.
    pub fn end(&self, id: JobId, state: JobState, now_ns: u64) {
        self.lock().handle_end(id, state, now_ns);
        self.write(now_ns, false);
    }

    /// A shipper's status report ([`JobBook::handle_report`]). Blocking.
    pub fn handle_report(&self, host: &Name, group: &Name, report: &StatusReport, now_ns: u64) {
        self.lock().handle_report(host, group, report, now_ns);
        self.write(now_ns, false);
    }

    /// Writes progress not yet written (when a session ends, at
    /// shutdown). Blocking.
    pub fn flush(&self, now_ns: u64) {
        self.write(now_ns, true);
    }

    /// The jobs, oldest first.
    pub fn jobs(&self) -> Vec<Job> {
        self.lock().jobs().to_vec()
    }

    /// A receiver of the registry's version: it changes at every change.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

#[cfg(test)]
#[path = "jobs_tests.rs"]
mod tests;
