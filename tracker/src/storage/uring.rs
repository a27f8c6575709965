//! The io_uring engine.
//!
//! # Design
//!
//! One ring per open device, owned by one dedicated thread
//! (`tidemark-uring`). Connection threads never touch the ring: a request is
//! a small `Request` sent over a bounded channel, carrying raw pointers to
//! the caller's buffer and a completion slot; the caller then blocks on that
//! slot until the ring thread posts the result.
//!
//! ```text
//!  connection threads                 ring thread
//!  ──────────────────                 ───────────────────────────────────────
//!  read_at/write_at/…                 loop:
//!    └─ Request ─► sync_channel ───►    drain channel → one SQE per request
//!       (+ eventfd write, only if       one io_uring_enter submits them all
//!        the ring thread sleeps)         and waits for ≥ 1 completion
//!    ◄─ Completion (Mutex+Condvar) ◄─   reap CQEs: finish, or resubmit the
//!                                        rest of a short read/write
//! ```
//!
//! - **Batching.** Whatever queued up while the ring thread was busy goes to
//!   the kernel in one `io_uring_enter`, together with resubmissions; CQEs
//!   are reaped in bulk. [`UringEngine::stats`] counts how well this works.
//! - **Waking.** While it has requests in flight the ring thread sleeps in
//!   `io_uring_enter`, so a new request must wake it: a one-shot POLL_ADD on
//!   an eventfd is always armed. Submitters write the eventfd only when the
//!   ring thread has announced it is going to sleep (a Dekker-style flag with
//!   SeqCst fences on both sides), so a busy engine costs no extra syscall
//!   per request.
//! - **No allocation per request.** The channel is a preallocated array,
//!   in-flight requests live in a fixed slot table indexed by `user_data`,
//!   the completion slot is a per-thread `Arc` reused for every request of
//!   that thread, and bounce buffers come from the device's pool.
//! - **Buffer lifetime.** The kernel reads and writes the caller's memory
//!   until the CQE arrives. This is sound because the caller is blocked in
//!   `UringIo::submit` for exactly that long: the completion is posted only
//!   after the final CQE of the request, and the ring thread never exits, nor
//!   drops the ring, while a request is in flight.
//! - **Errors.** A negative CQE result is the errno; `EINTR`/`EAGAIN` are
//!   resubmitted (bounded), short transfers are resumed from where they
//!   stopped, a zero-length transfer is `UnexpectedEof` / `WriteZero`.
//!
//! Read, write, fsync (with `IORING_FSYNC_DATASYNC` for files) and fallocate
//! go through the ring (Linux ≥ 5.6). `BLKZEROOUT` has no io_uring opcode and
//! is an ioctl on the calling thread.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::device::{delegate_block_device, open_and_probe, Device, RawIo};
use super::{BackingOptions, StorageError};

/// `user_data` of the eventfd poll; slot indices are far below it.
const WAKE_TOKEN: u64 = u64::MAX;
/// Largest transfer in one SQE (the SQE length is 32 bits); longer requests
/// continue like short transfers. A multiple of every alignment. Tests use a
/// small value so that the short-transfer continuation, which the kernel
/// rarely exercises on local files, runs on every large request.
const MAX_SQE_BYTES: usize = if cfg!(test) { 64 << 10 } else { 1 << 30 };
/// How often one request may come back with EINTR/EAGAIN before it fails.
const MAX_RETRIES: u32 = 64;
/// `prctl(PR_SET_IO_FLUSHER)`, Linux ≥ 5.6; not exported by the libc crate.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Backing I/O through io_uring (see the [module documentation](self)).
#[derive(Debug)]
pub struct UringEngine {
    dev: Device<UringIo>,
}

impl UringEngine {
    /// Opens `path` (see [`open_backing`](super::open_backing)) and starts
    /// the ring thread. Fails with [`StorageError::EngineUnavailable`] if the
    /// kernel refuses io_uring or lacks an opcode the engine needs.
    pub fn open(path: &Path, options: &BackingOptions) -> Result<UringEngine, StorageError> {
        let opened = open_and_probe(path, options, "io_uring")?;
        let raw = UringIo::start(opened.file, options.queue_depth)
            .map_err(|source| StorageError::EngineUnavailable { source })?;
        Ok(UringEngine {
            dev: Device::new(raw, opened.info, opened.direct_align, opened.mem_align),
        })
    }

    /// Counters of the ring thread since open.
    pub fn stats(&self) -> UringStats {
        self.dev.raw().shared.stats.snapshot()
    }
}

delegate_block_device!(UringEngine);

/// How the ring thread has batched its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UringStats {
    /// Requests completed (a short transfer resumed counts once).
    pub requests: u64,
    /// `io_uring_enter` calls that submitted at least one SQE.
    pub submit_calls: u64,
    /// SQEs submitted, including resubmissions and wake-up polls.
    pub sqes: u64,
    /// Most SQEs submitted by one call.
    pub max_batch: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    submit_calls: AtomicU64,
    sqes: AtomicU64,
    max_batch: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> UringStats {
        UringStats {
            requests: self.requests.load(Ordering::Relaxed),
            submit_calls: self.submit_calls.load(Ordering::Relaxed),
            sqes: self.sqes.load(Ordering::Relaxed),
            max_batch: self.max_batch.load(Ordering::Relaxed),
        }
    }
}

/// State shared by the submitters and the ring thread.
#[derive(Debug)]
struct Shared {
    /// Written to wake the ring thread from `io_uring_enter`.
    wake: EventFd,
    /// Set by the ring thread just before it may sleep in the kernel;
    /// whoever clears it owes the eventfd a write.
    sleeping: AtomicBool,
    stats: Counters,
}

impl Shared {
    fn wake(&self) {
        // EAGAIN means the counter is saturated: the ring thread is woken
        // anyway. Nothing else can fail on an eventfd write.
        let _ = self.wake.write(1);
    }
}

/// One primitive, as the ring thread sees it.
#[derive(Debug, Clone, Copy)]
enum RawOp {
    Read {
        buf: *mut u8,
        len: usize,
        offset: u64,
    },
    Write {
        buf: *const u8,
        len: usize,
        offset: u64,
    },
    Fallocate {
        mode: i32,
        offset: u64,
        len: u64,
    },
    Fsync {
        datasync: bool,
    },
}

/// Where the ring thread posts a request's result.
#[derive(Debug, Default)]
struct Completion {
    result: Mutex<Option<io::Result<usize>>>,
    ready: Condvar,
}

impl Completion {
    fn post(&self, result: io::Result<usize>) {
        let mut slot = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(result);
        self.ready.notify_one();
    }

    fn wait(&self) -> io::Result<usize> {
        let mut slot = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(result) = slot.take() {
                return result;
            }
            slot = self
                .ready
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

thread_local! {
    /// Each thread has at most one request in flight (submitting blocks), so
    /// one completion slot per thread serves all its requests.
    static COMPLETION: Arc<Completion> = Arc::new(Completion::default());
}

#[derive(Debug)]
struct Request {
    op: RawOp,
    completion: Arc<Completion>,
}

// SAFETY: the raw pointers in `op` refer to a buffer borrowed by the
// submitting thread, which stays blocked (keeping the borrow alive) until the
// ring thread posts the completion; the ring thread only hands them to the
// kernel. Nothing else in a request is thread-bound.
unsafe impl Send for Request {}

/// The [`RawIo`] of the io_uring engine: a handle to the ring thread.
#[derive(Debug)]
pub(crate) struct UringIo {
    /// Closed only after the ring thread has been joined (see `Drop`), so the
    /// raw fd the ring uses stays valid for every operation.
    file: File,
    requests: Option<SyncSender<Request>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl UringIo {
    fn start(file: File, depth: u32) -> io::Result<UringIo> {
        let depth = depth.clamp(1, 4096);
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let shared = Arc::new(Shared {
            wake,
            sleeping: AtomicBool::new(false),
            stats: Counters::default(),
        });
        let (requests, inbox) = mpsc::sync_channel(depth as usize);
        let (started, startup) = mpsc::channel();
        let fd = file.as_raw_fd();
        let ring_shared = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name("tidemark-uring".into())
            .spawn(move || {
                // The ring is created on its own thread so that io_uring's
                // kernel workers belong to it and inherit its flags.
                let ring = match build_ring(depth) {
                    Ok(ring) => ring,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                set_io_flusher();
                let _ = started.send(Ok(()));
                RingLoop::new(ring, inbox, ring_shared, fd, depth as usize).run();
            })?;
        match startup.recv() {
            Ok(Ok(())) => Ok(UringIo {
                file,
                requests: Some(requests),
                shared,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("the io_uring thread died while starting"))
            }
        }
    }

    /// Hands `op` to the ring thread and blocks until it has completed.
    ///
    /// The buffer behind `op`'s pointers must stay valid and unaliased for the
    /// duration of the call; every caller passes pointers derived from a
    /// borrow it holds across the call.
    fn submit(&self, op: RawOp) -> io::Result<usize> {
        let stopped = || io::Error::other("the io_uring thread has stopped");
        let completion = COMPLETION
            .try_with(Arc::clone)
            .unwrap_or_else(|_| Arc::new(Completion::default()));
        let requests = self.requests.as_ref().ok_or_else(stopped)?;
        requests
            .send(Request {
                op,
                completion: Arc::clone(&completion),
            })
            .map_err(|_| stopped())?;
        // Pairs with the fence in `RingLoop::run`: either the ring thread
        // sees our request before sleeping, or we see its flag and wake it.
        fence(Ordering::SeqCst);
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            self.shared.wake();
        }
        completion.wait()
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        // No request can be in flight: `&self` methods block until theirs
        // complete, and dropping requires that none is running. Closing the
        // channel and waking the thread makes it exit; joining before
        // `file` closes keeps the fd valid for the ring to the end.
        drop(self.requests.take());
        self.shared.wake();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the io_uring thread panicked");
            }
        }
    }
}

impl RawIo for UringIo {
    fn file(&self) -> &File {
        &self.file
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.submit(RawOp::Read {
            buf: buf.as_mut_ptr(),
            len: buf.len(),
            offset,
        })
        .map(drop)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.submit(RawOp::Write {
            buf: data.as_ptr(),
            len: data.len(),
            offset,
        })
        .map(drop)
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        self.submit(RawOp::Fallocate { mode, offset, len })
            .map(drop)
    }

    fn sync(&self, datasync: bool) -> io::Result<()> {
        self.submit(RawOp::Fsync { datasync }).map(drop)
    }
}

fn build_ring(depth: u32) -> io::Result<IoUring> {
    // Room for one SQE per in-flight request plus the wake-up poll; the CQ is
    // twice that, so it cannot overflow.
    let ring = IoUring::new((depth + 1).next_power_of_two())?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    let needed = [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel's io_uring lacks IORING_OP_{name}"),
            ));
        }
    }
    Ok(ring)
}

/// Marks the ring thread as doing I/O on behalf of a block device, so that
/// memory reclaim never waits on it (DESIGN: a userspace daemon in the block
/// I/O path must). Best effort: needs CAP_SYS_RESOURCE and Linux ≥ 5.6.
fn set_io_flusher() {
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        tracing::debug!(
            error = %io::Error::last_os_error(),
            "PR_SET_IO_FLUSHER refused for the io_uring thread"
        );
    }
}

/// A request the kernel is working on.
struct InFlight {
    request: Request,
    /// Bytes transferred so far (reads and writes).
    done: usize,
    retries: u32,
}

enum Outcome {
    Finished(io::Result<usize>),
    Resubmit,
}

struct RingLoop {
    ring: IoUring,
    inbox: Receiver<Request>,
    /// A request taken from the inbox while deciding whether to sleep.
    stash: Option<Request>,
    shared: Arc<Shared>,
    fd: RawFd,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    wake_armed: bool,
    /// All senders are gone: exit once nothing is in flight.
    closed: bool,
    /// Reused scratch space for reaped completions.
    reaped: Vec<(u64, i32)>,
}

impl RingLoop {
    fn new(
        ring: IoUring,
        inbox: Receiver<Request>,
        shared: Arc<Shared>,
        fd: RawFd,
        depth: usize,
    ) -> RingLoop {
        let cq_entries = ring.params().cq_entries() as usize;
        RingLoop {
            ring,
            inbox,
            stash: None,
            shared,
            fd,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth).rev().collect(),
            in_flight: 0,
            wake_armed: false,
            closed: false,
            reaped: Vec::with_capacity(cq_entries),
        }
    }

    fn run(mut self) {
        loop {
            self.accept();
            if self.closed && self.in_flight == 0 {
                // Only the wake-up poll may remain; it references no memory
                // of ours, and dropping the ring cancels it.
                return;
            }
            if !self.wake_armed {
                let poll = opcode::PollAdd::new(
                    types::Fd(self.shared.wake.as_raw_fd()),
                    libc::POLLIN as u32,
                )
                .build()
                .user_data(WAKE_TOKEN);
                self.push(&poll);
                self.wake_armed = true;
            }
            // With free slots we must hear about new requests while asleep:
            // announce the sleep, then look once more (pairs with the fence
            // in `UringIo::submit`). With none free, only completions matter.
            let mut wait = true;
            if !self.free.is_empty() && !self.closed {
                self.shared.sleeping.store(true, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                match self.inbox.try_recv() {
                    Ok(request) => {
                        self.stash = Some(request);
                        wait = false;
                    }
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        wait = false;
                    }
                    Err(TryRecvError::Empty) => {}
                }
                if !wait {
                    self.shared.sleeping.store(false, Ordering::SeqCst);
                }
            }
            self.enter(usize::from(wait));
            if wait {
                self.shared.sleeping.store(false, Ordering::SeqCst);
            }
            self.reap();
        }
    }

    /// Moves queued requests into free slots, one SQE each.
    fn accept(&mut self) {
        while !self.free.is_empty() {
            let request = match self.stash.take() {
                Some(request) => request,
                None => match self.inbox.try_recv() {
                    Ok(request) => request,
                    Err(TryRecvError::Empty) => return,
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        return;
                    }
                },
            };
            let Some(index) = self.free.pop() else {
                unreachable!("checked non-empty above")
            };
            self.slots[index] = Some(InFlight {
                request,
                done: 0,
                retries: 0,
            });
            self.in_flight += 1;
            self.push_slot(index);
        }
    }

    /// Queues the SQE for what remains of the request in `index`.
    fn push_slot(&mut self, index: usize) {
        let Some(flight) = self.slots[index].as_ref() else {
            return;
        };
        let fd = types::Fd(self.fd);
        let done = flight.done;
        let entry = match flight.request.op {
            RawOp::Read { buf, len, offset } => {
                let n = (len - done).min(MAX_SQE_BYTES) as u32;
                opcode::Read::new(fd, buf.wrapping_add(done), n)
                    .offset(offset + done as u64)
                    .build()
            }
            RawOp::Write { buf, len, offset } => {
                let n = (len - done).min(MAX_SQE_BYTES) as u32;
                opcode::Write::new(fd, buf.wrapping_add(done), n)
                    .offset(offset + done as u64)
                    .build()
            }
            RawOp::Fallocate { mode, offset, len } => opcode::Fallocate::new(fd, len)
                .offset(offset)
                .mode(mode)
                .build(),
            RawOp::Fsync { datasync } => {
                let flags = if datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(fd).flags(flags).build()
            }
        };
        self.push(&entry.user_data(index as u64));
    }

    fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: every buffer an entry points to is owned by a submitter
            // blocked in `UringIo::submit` until this entry's request
            // completes (see `Request`); the wake-up poll points to no memory.
            // The fd is kept open until this thread has exited.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return;
            }
            // Cannot happen with the ring sized for every slot plus the poll;
            // if it does, make room by handing the queue to the kernel.
            if let Err(e) = self.ring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed while the queue was full");
                thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Submits what is queued and, if `want` is 1, waits for a completion.
    fn enter(&mut self, want: usize) {
        let queued = self.ring.submission().len() as u64;
        if queued == 0 && want == 0 {
            return;
        }
        match self.ring.submit_and_wait(want) {
            Ok(_) => {
                if queued > 0 {
                    let stats = &self.shared.stats;
                    stats.submit_calls.fetch_add(1, Ordering::Relaxed);
                    stats.sqes.fetch_add(queued, Ordering::Relaxed);
                    stats.max_batch.fetch_max(queued, Ordering::Relaxed);
                }
            }
            // Interrupted by a signal: the loop comes back here.
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // The kernel is short of memory or still flushing completions:
            // reaping (next) makes progress; pause so as not to spin.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                thread::sleep(Duration::from_micros(100));
            }
            Err(e) => {
                // Nothing may be abandoned while in flight; keep trying.
                tracing::error!(error = %e, "io_uring_enter failed");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }

    fn reap(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.clear();
        reaped.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, result) in &reaped {
            self.complete(user_data, result);
        }
        self.reaped = reaped;
    }

    fn complete(&mut self, user_data: u64, result: i32) {
        if user_data == WAKE_TOKEN {
            self.wake_armed = false;
            // Reset the counter (EAGAIN if a racing reader got there first).
            let _ = self.shared.wake.read();
            return;
        }
        let index = user_data as usize;
        let Some(flight) = self.slots.get_mut(index).and_then(Option::as_mut) else {
            tracing::error!(user_data, "io_uring completion for no request");
            return;
        };
        let outcome = if result < 0 {
            let errno = -result;
            if matches!(errno, libc::EINTR | libc::EAGAIN) && flight.retries < MAX_RETRIES {
                flight.retries += 1;
                Outcome::Resubmit
            } else {
                Outcome::Finished(Err(io::Error::from_raw_os_error(errno)))
            }
        } else {
            let n = result as usize;
            match flight.request.op {
                RawOp::Read { len, .. } | RawOp::Write { len, .. } => {
                    if n == 0 {
                        let kind = match flight.request.op {
                            RawOp::Read { .. } => io::ErrorKind::UnexpectedEof,
                            _ => io::ErrorKind::WriteZero,
                        };
                        Outcome::Finished(Err(io::Error::new(
                            kind,
                            format!("transfer stopped after {} of {len} bytes", flight.done),
                        )))
                    } else {
                        flight.done += n;
                        if flight.done >= len {
                            Outcome::Finished(Ok(flight.done))
                        } else {
                            Outcome::Resubmit
                        }
                    }
                }
                RawOp::Fallocate { .. } | RawOp::Fsync { .. } => Outcome::Finished(Ok(n)),
            }
        };
        match outcome {
            Outcome::Resubmit => self.push_slot(index),
            Outcome::Finished(result) => {
                if let Some(flight) = self.slots[index].take() {
                    self.free.push(index);
                    self.in_flight -= 1;
                    self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
                    // The last use of the request's buffer is over: release
                    // the submitter.
                    flight.request.completion.post(result);
                }
            }
        }
    }
}
