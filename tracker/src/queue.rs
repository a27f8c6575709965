//! One queue of requests (an NBD connection, a ublk queue) as its event
//! loop sees what serves it: a sans-IO core. Requests and I/O completions
//! go in ([`Queue::handle_request`], [`Queue::handle_io`],
//! [`Queue::handle_wake`]), I/O to submit and replies come out
//! ([`Queue::poll_io`], [`Queue::poll_reply`]); `now` is passed in. The
//! core owns no socket, no ring and no clock, so it is tested by driving it
//! directly (see `write_path`'s tests), and the same core serves the NBD
//! shell and the ublk shell.
//!
//! ```text
//!            requests                         replies
//!  shell ──────────────► Queue ─────────────────────► shell
//!  (socket, ublk ring)    │  ▲                        (send, commit)
//!                   poll_io│  │handle_io
//!                          ▼  │
//!                    backing device I/O (io_uring on the shell's ring)
//! ```
//!
//! A request may wait for something another queue or the group's
//! committer does (a range another queue holds, the activity map's
//! fdatasync, a barrier's group commit). It then *parks*: it stays in the
//! core, and the queue's [`QueueWaker`] (an eventfd the shell's ring
//! watches) is written when the condition may have changed, after which
//! the shell calls [`Queue::handle_wake`]. No thread blocks for it.
//!
//! [`BlockingQueue`] runs any synchronous [`Backend`] (tests' memory
//! backends) as a queue, on a pool of threads.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use nix::sys::eventfd::{EfdFlags, EventFd};
use tidemark_changelog::DiskId;

use crate::backend::{Backend, BackendError};
use crate::storage::AlignedBuf;

/// What a request asks for, already validated against the disk (in
/// range, within the request size limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at `offset` into the request's buffer.
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u32,
    },
    /// Write the request's buffer at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Durable before the reply.
        fua: bool,
    },
    /// Make `offset..offset+len` read as zeroes.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Keep the range allocated.
        no_hole: bool,
        /// Durable before the reply.
        fua: bool,
    },
    /// Discard `offset..offset+len`; it reads as zeroes afterwards.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Durable before the reply.
        fua: bool,
    },
    /// A barrier: every write acknowledged before it, on any queue of the
    /// group, is durable when it is answered.
    Flush,
}

/// A request handed to a queue.
#[derive(Debug)]
pub struct Request {
    /// The shell's name for it, echoed in the reply (an NBD cookie's
    /// slot, a ublk tag).
    pub id: u64,
    /// The disk (index in the backend's exports).
    pub disk: DiskId,
    /// What to do.
    pub op: Op,
    /// A write's data (exactly its length), or the buffer a read fills
    /// (exactly `len` bytes); `None` for every other request.
    pub buf: Option<AlignedBuf>,
}

/// A finished request.
#[derive(Debug)]
pub struct Reply {
    /// [`Request::id`].
    pub id: u64,
    /// Success, or why the request failed (each shell tells its client
    /// in its own terms).
    pub result: Result<(), BackendError>,
    /// The request's buffer, handed back (a read's data on success).
    pub buf: Option<AlignedBuf>,
}

/// What backing-device I/O does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Fill the buffer from `offset`.
    Read {
        /// Byte offset.
        offset: u64,
    },
    /// Write the buffer at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
    },
    /// Zero a range (see [`BlockDevice::write_zeroes`](crate::storage::BlockDevice::write_zeroes)).
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Trim a range (see [`BlockDevice::trim`](crate::storage::BlockDevice::trim)).
    Trim {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make completed modifications durable (see
    /// [`BlockDevice::flush`](crate::storage::BlockDevice::flush)).
    Flush,
}

/// Backing-device I/O a queue asks its shell to perform.
#[derive(Debug)]
pub struct Io {
    /// Hand it back with the result to [`Queue::handle_io`].
    pub token: u64,
    /// The disk.
    pub disk: DiskId,
    /// What to do.
    pub kind: IoKind,
    /// The data buffer of a read or write (owned by the shell, and by the
    /// kernel, until the I/O completes).
    pub buf: Option<AlignedBuf>,
}

/// The sans-IO core of one queue (see the [module documentation](self)).
pub trait Queue: Send {
    /// A new request.
    fn handle_request(&mut self, request: Request, now: Instant);
    /// I/O from [`poll_io`](Self::poll_io) completed; its buffer comes back.
    fn handle_io(
        &mut self,
        token: u64,
        result: Result<(), BackendError>,
        buf: Option<AlignedBuf>,
        now: Instant,
    );
    /// The queue's waker fired: parked requests may go on.
    fn handle_wake(&mut self, now: Instant);
    /// The next backing-device I/O to submit.
    fn poll_io(&mut self) -> Option<Io>;
    /// The next finished request.
    fn poll_reply(&mut self) -> Option<Reply>;
    /// Requests handed in and not yet answered.
    fn in_flight(&self) -> usize;
}

/// A queue's wake-up: an eventfd its shell's ring watches, written by
/// whoever changes something a parked request waits for.
#[derive(Debug)]
pub struct QueueWaker {
    fd: EventFd,
    parked: AtomicBool,
}

impl QueueWaker {
    /// A new, unarmed waker.
    pub fn new() -> std::io::Result<Arc<QueueWaker>> {
        Ok(Arc::new(QueueWaker {
            fd: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
            parked: AtomicBool::new(false),
        }))
    }

    /// Wakes the queue whatever it waits for (shutdown, a stop request).
    pub fn wake(&self) {
        // EAGAIN: the counter is saturated, the loop wakes anyway. Nothing
        // else can fail on an eventfd write.
        let _ = self.fd.write(1);
    }

    /// Resets the eventfd after a wake-up was seen.
    pub fn reset(&self) {
        let _ = self.fd.read();
    }

    /// Whether the queue asked to be woken.
    pub fn is_parked(&self) -> bool {
        self.parked.load(Ordering::SeqCst)
    }
}

impl AsFd for QueueWaker {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// The queues of a group (or of a server) that may park requests, and a
/// count of those that did, so that a change nobody waits for costs one
/// atomic load.
#[derive(Debug, Default)]
pub struct Wakers {
    queues: Mutex<Vec<Weak<QueueWaker>>>,
    parked: AtomicUsize,
}

impl Wakers {
    /// Adds a queue's waker; it is forgotten once the queue drops it.
    pub fn register(&self, waker: &Arc<QueueWaker>) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        queues.retain(|w| w.strong_count() > 0);
        queues.push(Arc::downgrade(waker));
    }

    /// Asks to be woken at the next [`wake_parked`](Self::wake_parked).
    /// Park *before* the last look at what you wait for: a change made
    /// after the park is then never missed.
    pub fn park(&self, waker: &QueueWaker) {
        if !waker.parked.swap(true, Ordering::SeqCst) {
            self.parked.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Wakes every queue that parked. Call after any change a parked
    /// request may wait for.
    pub fn wake_parked(&self) {
        if self.parked.load(Ordering::SeqCst) == 0 {
            return;
        }
        let queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for waker in queues.iter().filter_map(Weak::upgrade) {
            if waker.parked.swap(false, Ordering::SeqCst) {
                self.parked.fetch_sub(1, Ordering::SeqCst);
                waker.wake();
            }
        }
    }
}

/// Runs a synchronous [`Backend`] as a queue: each request is performed on
/// a [`BlockingPool`] thread (so a slow backend call does not hold the
/// queue's other requests), and its reply comes back through the queue's
/// waker. No device I/O is ever asked of the shell. This is how any
/// backend but the group is served (tests' memory backends); the group's
/// own queue core ([`crate::write_path::GroupQueue`]) hands nothing to
/// another thread.
pub struct BlockingQueue {
    pool: Arc<BlockingPool>,
    inbox: Arc<Inbox>,
    replies: VecDeque<Reply>,
    pending: usize,
}

/// Where pool threads leave a queue's replies.
struct Inbox {
    replies: Mutex<VecDeque<Reply>>,
    waker: Arc<QueueWaker>,
}

struct Job {
    request: Request,
    inbox: Arc<Inbox>,
}

/// Threads performing the requests of every [`BlockingQueue`] of a server.
pub struct BlockingPool {
    backend: Arc<dyn Backend>,
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl BlockingPool {
    /// `threads` threads performing requests on `backend`.
    pub fn start(backend: Arc<dyn Backend>, threads: usize) -> std::io::Result<Arc<BlockingPool>> {
        let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
        let inbox = Arc::new(Mutex::new(inbox));
        let mut handles = Vec::new();
        for index in 0..threads.max(1) {
            let (inbox, backend) = (Arc::clone(&inbox), Arc::clone(&backend));
            handles.push(
                std::thread::Builder::new()
                    .name(format!("nbd-worker-{index}"))
                    .spawn(move || loop {
                        let job = inbox.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        let Ok(Job { request, inbox }) = job else {
                            return;
                        };
                        let reply = perform(&*backend, request);
                        inbox
                            .replies
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push_back(reply);
                        inbox.waker.wake();
                    })?,
            );
        }
        Ok(Arc::new(BlockingPool {
            backend,
            jobs: Mutex::new(Some(jobs)),
            threads: Mutex::new(handles),
        }))
    }

    /// A queue for one connection, woken through `waker`.
    pub fn queue(self: &Arc<Self>, waker: &Arc<QueueWaker>) -> BlockingQueue {
        BlockingQueue {
            pool: Arc::clone(self),
            inbox: Arc::new(Inbox {
                replies: Mutex::new(VecDeque::new()),
                waker: Arc::clone(waker),
            }),
            replies: VecDeque::new(),
            pending: 0,
        }
    }

    /// The backend the pool performs requests on.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
}

impl Drop for BlockingPool {
    fn drop(&mut self) {
        drop(self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take());
        for thread in self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = thread.join();
        }
    }
}

/// Performs one request on a synchronous backend. A panicking backend
/// costs one EIO reply, not the thread.
fn perform(backend: &dyn Backend, request: Request) -> Reply {
    let Request { id, disk, op, buf } = request;
    let mut buf = buf;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match op {
        Op::Read { offset, .. } => match buf.as_deref_mut() {
            Some(data) => backend.read(disk, offset, data),
            None => Err(BackendError::OutOfRange { offset, length: 0 }),
        },
        Op::Write { offset, fua } => match buf.as_deref() {
            Some(data) => backend.write(disk, offset, data, fua),
            None => Err(BackendError::OutOfRange { offset, length: 0 }),
        },
        Op::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
        } => backend.write_zeroes(disk, offset, len, no_hole, fua),
        Op::Trim { offset, len, fua } => backend.trim(disk, offset, len, fua),
        Op::Flush => backend.flush(disk),
    }))
    .unwrap_or_else(|_| {
        tracing::error!(?op, "backend panicked; replying EIO");
        Err(BackendError::Unavailable)
    })
    .inspect_err(|error| tracing::debug!(?op, ?error, "backend refused a request"));
    Reply { id, result, buf }
}

impl Queue for BlockingQueue {
    fn handle_request(&mut self, request: Request, _now: Instant) {
        let job = Job {
            request,
            inbox: Arc::clone(&self.inbox),
        };
        let sent = match &*self.pool.jobs.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(jobs) => jobs.send(job).map_err(|e| e.0),
            None => Err(job),
        };
        match sent {
            Ok(()) => self.pending += 1,
            // The pool is gone (the server is stopping): answer at once.
            Err(Job { request, .. }) => self.replies.push_back(Reply {
                id: request.id,
                result: Err(BackendError::Unavailable),
                buf: request.buf,
            }),
        }
    }

    fn handle_io(
        &mut self,
        _: u64,
        _: Result<(), BackendError>,
        _: Option<AlignedBuf>,
        _: Instant,
    ) {
    }

    fn handle_wake(&mut self, _now: Instant) {
        let mut inbox = self.inbox.replies.lock().unwrap_or_else(|e| e.into_inner());
        self.pending -= inbox.len();
        self.replies.extend(inbox.drain(..));
    }

    fn poll_io(&mut self) -> Option<Io> {
        None
    }

    fn poll_reply(&mut self) -> Option<Reply> {
        self.replies.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.pending + self.replies.len()
    }
}
