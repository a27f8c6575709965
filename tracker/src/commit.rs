//! The group's committer: one thread that does the group's own I/O, so
//! that no request's thread ever waits on it while holding anything.
//!
//! - **Log write-out.** Appenders only copy records into the change log's
//!   buffer (a short critical section: sequence number, copy). The
//!   committer writes the buffer out in large sequential writes: when it
//!   passes [`WRITE_OUT_BYTES`] (the appender that crosses it nudges the
//!   committer), when a barrier needs it, and otherwise within
//!   [`WRITE_OUT_AFTER`] of being woken, so readers (the shipper) see
//!   records within milliseconds.
//! - **Group commit.** Barriers of every queue ask for "durable up to my
//!   barrier record"; one fdatasync of the log answers every request
//!   pending when it starts (`ChangeLog::take_io` takes the sync as soon
//!   as the highest target is written, however much is appended
//!   meanwhile). The backing device's flush runs beside it, on the
//!   barrier's own queue.
//! - **Activity and dirty maps.** A write to an extent not yet durably hot
//!   waits for the activity map's write and fdatasync (DESIGN invariant 4);
//!   every such write pending at the time shares one. Bitmap-mode barriers
//!   wait for the dirty bitmap's.
//! - **Cooling.** After a sync, hot extents whose writes are all durable in
//!   the log *and* on the device (a device flush started after the extent's
//!   last write completed has finished) are cleared, at most once a
//!   second.
//!
//! Waiting: event loops poll the atomic counters (`Committer::durable`,
//! `Committer::maps_done`, …) after their waker fires (the committer
//! wakes parked queues after every step); blocking callers use the
//! `wait_*` methods.
//!
//! # The crash rule
//!
//! After a tracker SIGKILL or a power cut, no acknowledged write may be
//! missing from both the log and the activity map. A write is acknowledged
//! once its record is in the log's buffer, before it is written out, and a
//! SIGKILL loses the buffer: that write is then only in the activity map,
//! which is why an extent is made durably hot before the write is issued
//! (`Group::mark_hot`) and only cooled here, once every record of it is at
//! or below the log's durable watermark (a crash recovery never cuts
//! those; see [`tidemark_changelog::log`]) and on the device. An unclean
//! restart records every
//! hot extent as resync-needed. If the log fails, the group switches to
//! bitmap mode and every hot extent is set in the dirty bitmap, which then
//! holds what the log may have lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tidemark_changelog::Seq;

use crate::group::Tracking;

/// The buffered size at which the log is written out at once.
pub const WRITE_OUT_BYTES: usize = 512 << 10;
/// The longest a buffered record waits to be written out while the
/// committer is otherwise idle.
pub const WRITE_OUT_AFTER: Duration = Duration::from_millis(2);
/// The most the log's buffer may hold before appenders wait (park) for
/// the committer to write it out: bounds the memory of acknowledged,
/// unwritten records.
pub const LOG_BUFFER_LIMIT: usize = 8 << 20;
/// How often hot extents are cooled at most.
const COOL_INTERVAL: Duration = Duration::from_secs(1);
/// Log I/Os done in a row before the committer looks at map requests again.
const LOG_IOS_PER_ROUND: usize = 8;

/// What callers asked for.
#[derive(Debug, Default)]
struct Wanted {
    /// Make the log durable up to this sequence number.
    sync: Seq,
    /// Persist the activity maps: the highest ticket handed out.
    maps: u64,
    /// Persist the dirty bitmaps: the highest ticket handed out.
    dirty: u64,
    /// Write the buffer out now.
    write_out: bool,
    stop: bool,
}

/// The committer's state, shared with the group's queues.
#[derive(Debug)]
pub(crate) struct CommitShared {
    wanted: Mutex<Wanted>,
    work: Condvar,
    done: Condvar,
    durable: AtomicU64,
    maps_done: AtomicU64,
    dirty_done: AtomicU64,
    /// The log failed: barriers fall back to the dirty bitmap.
    log_broken: AtomicBool,
    /// Writing an activity or dirty map failed: writes that need it fail.
    maps_broken: AtomicBool,
}

impl CommitShared {
    /// The highest sequence number durable in the log.
    fn durable(&self) -> Seq {
        Seq(self.durable.load(Ordering::SeqCst))
    }
}

/// Why a wait for the committer ended without what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitFailed {
    /// The log failed; the group is in bitmap mode now.
    Log,
    /// A map could not be written.
    Maps,
}

/// The committer thread and its handle (see the module documentation).
pub(crate) struct Committer {
    shared: Arc<CommitShared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Committer {
    /// Starts the committer of `tracking`, whose log is durable up to
    /// `durable`.
    pub(crate) fn start(tracking: Arc<Tracking>, durable: Seq) -> std::io::Result<Committer> {
        let shared = Arc::new(CommitShared {
            wanted: Mutex::new(Wanted::default()),
            work: Condvar::new(),
            done: Condvar::new(),
            durable: AtomicU64::new(durable.get()),
            maps_done: AtomicU64::new(0),
            dirty_done: AtomicU64::new(0),
            log_broken: AtomicBool::new(false),
            maps_broken: AtomicBool::new(false),
        });
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("committer".into())
                .spawn(move || run(&shared, &tracking))?
        };
        Ok(Committer {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Stops the thread (without writing anything more out); for a clean
    /// stop, make everything durable first.
    pub(crate) fn stop(&self) {
        lock(&self.shared.wanted).stop = true;
        self.shared.work.notify_all();
        if let Some(thread) = lock(&self.thread).take() {
            if thread.join().is_err() {
                tracing::error!("the committer thread panicked");
            }
        }
        // Nobody may wait for a committer that is gone.
        self.shared.done.notify_all();
    }

    /// The highest sequence number durable in the log.
    pub(crate) fn durable(&self) -> Seq {
        self.shared.durable()
    }

    /// The log was made durable up to `seq` by someone else (a synchronous
    /// step of the group's control plane, with the committer idle).
    pub(crate) fn note_durable(&self, seq: Seq) {
        self.shared.durable.fetch_max(seq.get(), Ordering::SeqCst);
        drop(lock(&self.shared.wanted));
        self.shared.done.notify_all();
    }

    /// Whether the log failed (barriers then use the dirty bitmap).
    pub(crate) fn log_broken(&self) -> bool {
        self.shared.log_broken.load(Ordering::SeqCst)
    }

    /// Whether a map write failed.
    pub(crate) fn maps_broken(&self) -> bool {
        self.shared.maps_broken.load(Ordering::SeqCst)
    }

    /// Asks for the log to be durable up to `seq`; see [`durable`](Self::durable).
    pub(crate) fn want_durable(&self, seq: Seq) {
        if self.durable() >= seq {
            return;
        }
        let mut wanted = lock(&self.shared.wanted);
        if wanted.sync < seq {
            wanted.sync = seq;
            drop(wanted);
            self.shared.work.notify_one();
        }
    }

    /// Asks for the activity maps to be persisted; the ticket is done once
    /// [`maps_done`](Self::maps_done) reaches it.
    pub(crate) fn want_maps(&self) -> u64 {
        let mut wanted = lock(&self.shared.wanted);
        wanted.maps += 1;
        let ticket = wanted.maps;
        drop(wanted);
        self.shared.work.notify_one();
        ticket
    }

    /// The highest activity-map ticket persisted.
    pub(crate) fn maps_done(&self) -> u64 {
        self.shared.maps_done.load(Ordering::SeqCst)
    }

    /// Asks for the dirty bitmaps to be persisted; done once
    /// [`dirty_done`](Self::dirty_done) reaches the ticket.
    pub(crate) fn want_dirty(&self) -> u64 {
        let mut wanted = lock(&self.shared.wanted);
        wanted.dirty += 1;
        let ticket = wanted.dirty;
        drop(wanted);
        self.shared.work.notify_one();
        ticket
    }

    /// The highest dirty-bitmap ticket persisted.
    pub(crate) fn dirty_done(&self) -> u64 {
        self.shared.dirty_done.load(Ordering::SeqCst)
    }

    /// The buffer passed [`WRITE_OUT_BYTES`]: write it out now.
    pub(crate) fn nudge(&self) {
        lock(&self.shared.wanted).write_out = true;
        self.shared.work.notify_one();
    }

    /// Waits until the log is durable up to `seq`.
    pub(crate) fn wait_durable(&self, seq: Seq) -> Result<(), CommitFailed> {
        self.want_durable(seq);
        self.wait_for(|s| {
            if s.durable() >= seq {
                Some(Ok(()))
            } else if s.log_broken.load(Ordering::SeqCst) {
                Some(Err(CommitFailed::Log))
            } else {
                None
            }
        })
    }

    /// Waits until the activity maps are persisted up to `ticket`.
    pub(crate) fn wait_maps(&self, ticket: u64) -> Result<(), CommitFailed> {
        self.wait_for(|s| {
            if s.maps_broken.load(Ordering::SeqCst) {
                Some(Err(CommitFailed::Maps))
            } else if s.maps_done.load(Ordering::SeqCst) >= ticket {
                Some(Ok(()))
            } else {
                None
            }
        })
    }

    /// Waits until the dirty bitmaps are persisted up to `ticket`.
    pub(crate) fn wait_dirty(&self, ticket: u64) -> Result<(), CommitFailed> {
        self.wait_for(|s| {
            if s.maps_broken.load(Ordering::SeqCst) {
                Some(Err(CommitFailed::Maps))
            } else if s.dirty_done.load(Ordering::SeqCst) >= ticket {
                Some(Ok(()))
            } else {
                None
            }
        })
    }

    fn wait_for(
        &self,
        ready: impl Fn(&CommitShared) -> Option<Result<(), CommitFailed>>,
    ) -> Result<(), CommitFailed> {
        let mut wanted = lock(&self.shared.wanted);
        loop {
            if let Some(outcome) = ready(&self.shared) {
                return outcome;
            }
            if wanted.stop {
                return Err(CommitFailed::Log);
            }
            wanted = self
                .shared
                .done
                .wait(wanted)
                .unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The committer's loop.
fn run(shared: &CommitShared, tracking: &Tracking) {
    let mut last_cool = Instant::now();
    loop {
        let (sync, maps, dirty) = {
            let mut wanted = lock(&shared.wanted);
            loop {
                if wanted.stop {
                    return;
                }
                // A failed log takes no I/O: its leftovers wait for nobody.
                let unwritten = if shared.log_broken.load(Ordering::SeqCst) {
                    0
                } else {
                    tracking.unwritten_bytes()
                };
                let work = wanted.write_out
                    || unwritten >= WRITE_OUT_BYTES
                    || (wanted.sync > shared.durable()
                        && !shared.log_broken.load(Ordering::SeqCst))
                    || wanted.maps > shared.maps_done.load(Ordering::SeqCst)
                    || wanted.dirty > shared.dirty_done.load(Ordering::SeqCst);
                if work {
                    break;
                }
                // Buffered records are written out after a short while; an
                // empty buffer lets the thread sleep longer (appends do not
                // wake it below WRITE_OUT_BYTES).
                let wait = if unwritten > 0 {
                    WRITE_OUT_AFTER
                } else {
                    Duration::from_millis(50)
                };
                let (guard, timeout) = shared
                    .work
                    .wait_timeout(wanted, wait)
                    .unwrap_or_else(|e| e.into_inner());
                wanted = guard;
                if timeout.timed_out() && unwritten > 0 {
                    break;
                }
            }
            wanted.write_out = false;
            (wanted.sync, wanted.maps, wanted.dirty)
        };
        if maps > shared.maps_done.load(Ordering::SeqCst) {
            let persisted = tracking.persist_activity();
            if let Err(error) = &persisted {
                tracing::error!(%error, "persisting the activity map failed; writes that need it fail");
                shared.maps_broken.store(true, Ordering::SeqCst);
            }
            shared.maps_done.fetch_max(maps, Ordering::SeqCst);
            announce(shared, tracking);
        }
        if dirty > shared.dirty_done.load(Ordering::SeqCst) {
            if let Err(error) = tracking.persist_dirty() {
                tracing::error!(%error, "persisting the dirty bitmap failed");
                shared.maps_broken.store(true, Ordering::SeqCst);
            }
            shared.dirty_done.fetch_max(dirty, Ordering::SeqCst);
            announce(shared, tracking);
        }
        let target = (sync > shared.durable()).then_some(sync);
        for _ in 0..LOG_IOS_PER_ROUND {
            match tracking.log_step(target) {
                LogStep::Idle => break,
                LogStep::Wrote => announce(shared, tracking),
                LogStep::Synced { durable, watermark } => {
                    // Cooled before the durable point is published: a
                    // barrier's waiter then sees the extents its sync let
                    // cool already cooled.
                    if last_cool.elapsed() >= COOL_INTERVAL {
                        last_cool = Instant::now();
                        tracking.cool(watermark);
                    }
                    shared.durable.fetch_max(durable.get(), Ordering::SeqCst);
                    announce(shared, tracking);
                }
                LogStep::Failed => {
                    shared.log_broken.store(true, Ordering::SeqCst);
                    announce(shared, tracking);
                    break;
                }
            }
        }
    }
}

/// Tells every waiter something changed.
fn announce(shared: &CommitShared, tracking: &Tracking) {
    // Taking the lock orders this after a waiter's check and before its
    // wait: the notification cannot fall between the two.
    drop(lock(&shared.wanted));
    shared.done.notify_all();
    tracking.wakers.wake_parked();
}

/// What one step of the log's I/O did.
pub(crate) enum LogStep {
    /// Nothing to do.
    Idle,
    /// Records were written (the buffer has room again).
    Wrote,
    /// The log is durable up to this sequence number.
    Synced {
        /// The log's durable sequence number.
        durable: Seq,
        /// Its durable watermark: records at or below it survive any
        /// crash recovery.
        watermark: Seq,
    },
    /// The log failed; the group switched to bitmap mode.
    Failed,
}
