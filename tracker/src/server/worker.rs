//! The worker pool: a fixed number of threads that perform validated
//! requests against the backend and write their replies.
//!
//! Connection threads push [`Job`]s onto one shared [`RequestQueue`]; any
//! idle worker takes the next one, so a client with many requests in
//! flight gets as many backend calls in parallel as there are workers.
//! The worker that finishes a request sends its reply through the
//! connection's outbox (see the reply module; NBD allows replies in any
//! order). A job carries its connection's in-flight slot, released only
//! after the reply is written, so "no requests in flight" means "every
//! reply sent".

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::nbd::constants::{Errno, ExtentStatus};
use crate::nbd::transmission::{
    encode_block_status, encode_offset_data_header, encode_simple_reply, Command, Extent,
};
use crate::storage::AlignedBuf;

use super::connection::{Connection, InFlightSlot};
use super::reply::OutgoingReply;

/// Locks a mutex, ignoring poisoning: every structure behind these locks
/// stays consistent across a panic (and backend panics are caught anyway).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One validated request, ready for the backend.
pub(crate) struct Job {
    /// The request's connection; also keeps it in flight until dropped.
    pub(crate) slot: InFlightSlot,
    /// The cookie the reply echoes.
    pub(crate) cookie: u64,
    /// What to do; never [`Command::Disconnect`].
    pub(crate) command: Command,
    /// The data of a write, read in full by the connection thread.
    pub(crate) payload: Payload,
}

/// A write's data in a pooled [`AlignedBuf`]: it starts on a page boundary,
/// so the backing device's direct I/O takes it as it is, where data at an
/// address malloc chose would be copied into a bounce buffer first.
pub(crate) struct Payload {
    buf: Option<AlignedBuf>,
    len: usize,
}

impl Payload {
    /// No data (every request but a write).
    pub(crate) const fn empty() -> Self {
        Self { buf: None, len: 0 }
    }

    /// The data.
    pub(crate) fn as_slice(&self) -> &[u8] {
        self.buf.as_deref().map_or(&[], |b| &b[..self.len])
    }

    /// The data, to be filled.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        match self.buf.as_deref_mut() {
            Some(b) => &mut b[..self.len],
            None => &mut [],
        }
    }
}

/// The queue between connection threads and workers. Unbounded in itself;
/// its length is bounded by each connection's in-flight limit.
#[derive(Default)]
pub(crate) struct RequestQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl RequestQueue {
    /// Hands a job to the workers. After [`close`](Self::close) the job is
    /// dropped unanswered (its slot is released).
    pub(crate) fn push(&self, job: Job) {
        let mut state = lock(&self.state);
        if state.closed {
            return;
        }
        state.jobs.push_back(job);
        drop(state);
        self.ready.notify_one();
    }

    /// The next job, waiting for one; `None` once closed and drained.
    fn pop(&self) -> Option<Job> {
        let mut state = lock(&self.state);
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets the workers finish what is queued, then exit.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }
}

/// Reusable data buffers, so that steady traffic of small and medium
/// requests does not allocate per request. Large buffers are freed rather
/// than kept, bounding what an idle server holds.
#[derive(Default)]
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Write payloads' buffers, kept apart: their contents are stale.
    payloads: Mutex<Vec<AlignedBuf>>,
}

/// Largest buffer kept for reuse.
const KEEP_CAPACITY: usize = 1 << 20;

/// Most buffers kept for reuse.
const KEEP_COUNT: usize = 64;

impl BufferPool {
    /// A zero-filled buffer of `len` bytes. Zeroed, never stale: a backend
    /// that fails to fill it must not leak another request's data.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = lock(&self.free).pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        buf
    }

    /// A page-aligned buffer for a write's `len` bytes of data, which the
    /// caller overwrites in full (from the socket) before anything reads
    /// them: a reused buffer is not zeroed, so steady traffic of one size
    /// costs no zeroing; a new one comes zeroed from the allocator.
    pub(crate) fn take_payload(&self, len: usize) -> Payload {
        let reused = lock(&self.payloads).pop().filter(|b| b.len() >= len);
        let buf = reused.unwrap_or_else(|| AlignedBuf::page_aligned(len));
        Payload {
            buf: Some(buf),
            len,
        }
    }

    /// Returns a write's buffer for reuse.
    pub(crate) fn give_back_payload(&self, payload: Payload) {
        let Some(buf) = payload.buf else { return };
        if buf.len() > KEEP_CAPACITY {
            return;
        }
        let mut free = lock(&self.payloads);
        if free.len() < KEEP_COUNT {
            free.push(buf);
        }
    }

    /// Returns a buffer for reuse.
    pub(crate) fn give_back(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > KEEP_CAPACITY {
            return;
        }
        let mut free = lock(&self.free);
        if free.len() < KEEP_COUNT {
            free.push(buf);
        }
    }
}

/// Starts `count` workers on `queue`.
pub(crate) fn spawn_workers(
    count: usize,
    queue: &Arc<RequestQueue>,
    buffers: &Arc<BufferPool>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let mut workers = Vec::with_capacity(count);
    for index in 0..count {
        let jobs = Arc::clone(queue);
        let buffers = Arc::clone(buffers);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-worker-{index}"))
            .spawn(move || {
                while let Some(job) = jobs.pop() {
                    perform(job, &buffers);
                }
            });
        match spawned {
            Ok(worker) => workers.push(worker),
            Err(error) => {
                queue.close();
                for worker in workers {
                    let _ = worker.join();
                }
                return Err(error);
            }
        }
    }
    Ok(workers)
}

/// What a backend call produced, before it is encoded.
enum Outcome {
    /// Success without data.
    Done,
    /// A read's data.
    Data { offset: u64, data: Vec<u8> },
    /// A block-status answer for `context`.
    Extents { context: u32, extents: Vec<Extent> },
    /// Failure, told to the client as this error value.
    Failed(Errno),
}

/// Performs one job and writes its reply. A panicking backend call is
/// caught and answered with `EIO`, so a backend bug costs one request, not
/// a worker thread and, with it, a connection that would wait forever for
/// the request's slot.
fn perform(job: Job, buffers: &BufferPool) {
    let Job {
        slot,
        cookie,
        command,
        payload,
    } = job;
    let conn = Arc::clone(slot.connection());
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        call_backend(&conn, command, payload.as_slice(), buffers)
    }))
    .unwrap_or_else(|_| {
        tracing::error!(conn = conn.id, ?command, "backend panicked; replying EIO");
        Outcome::Failed(Errno::Io)
    });
    buffers.give_back_payload(payload);
    // The slot travels with the reply and is freed once it is sent.
    reply(&conn, cookie, outcome, slot, buffers);
}

fn call_backend(
    conn: &Connection,
    command: Command,
    payload: &[u8],
    buffers: &BufferPool,
) -> Outcome {
    let backend = &*conn.backend;
    let disk = conn.disk;
    let done = |result: Result<(), Errno>| result.map_or_else(Outcome::Failed, |()| Outcome::Done);
    match command {
        Command::Read { offset, length, .. } => {
            let mut data = buffers.take(to_usize(length));
            match backend.read(disk, offset, &mut data) {
                Ok(()) => Outcome::Data { offset, data },
                Err(errno) => {
                    buffers.give_back(data);
                    Outcome::Failed(errno)
                }
            }
        }
        Command::Write { offset, fua, .. } => done(backend.write(disk, offset, payload, fua)),
        Command::Flush => done(backend.flush(disk)),
        Command::Trim {
            offset,
            length,
            fua,
        } => done(backend.trim(disk, offset, u64::from(length), fua)),
        // Never offered (SEND_FAST_ZERO is not advertised), so the validator
        // refuses it; answered as the protocol asks all the same.
        Command::WriteZeroes {
            fast_zero: true, ..
        } => Outcome::Failed(Errno::NotSup),
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast_zero: false,
        } => done(backend.write_zeroes(disk, offset, u64::from(length), no_hole, fua)),
        // A hint; the backend has no cache to warm.
        Command::Cache { .. } | Command::Disconnect => Outcome::Done,
        Command::BlockStatus {
            offset,
            length,
            context,
            req_one,
        } => match backend.block_status(disk, offset, length) {
            Ok(extents) => Outcome::Extents {
                context,
                extents: clip_extents(extents, length, req_one),
            },
            Err(errno) => Outcome::Failed(errno),
        },
    }
}

/// Holds a backend's block-status answer to what the protocol allows: no
/// zero-length extents, not past the requested range, one extent with
/// `REQ_ONE`. An empty answer becomes "all data", which is always correct.
fn clip_extents(extents: Vec<Extent>, length: u32, req_one: bool) -> Vec<Extent> {
    let mut left = length;
    let mut clipped = Vec::with_capacity(extents.len().min(if req_one { 1 } else { 1024 }));
    for extent in extents {
        if left == 0 || (req_one && !clipped.is_empty()) {
            break;
        }
        if extent.length == 0 {
            continue;
        }
        let take = extent.length.min(left);
        clipped.push(Extent {
            length: take,
            status: extent.status,
        });
        left -= take;
    }
    if clipped.is_empty() {
        clipped.push(Extent {
            length,
            status: ExtentStatus::EMPTY,
        });
    }
    clipped
}

fn to_usize(length: u32) -> usize {
    // u32 fits usize on every target the tracker builds for (64-bit Linux).
    usize::try_from(length).unwrap_or(usize::MAX)
}

/// Encodes the reply for `outcome` and sends it with the request's slot.
fn reply(
    conn: &Connection,
    cookie: u64,
    outcome: Outcome,
    slot: InFlightSlot,
    buffers: &BufferPool,
) {
    let reply = match outcome {
        Outcome::Done => OutgoingReply::new(&encode_simple_reply(cookie, None), Vec::new(), slot),
        Outcome::Failed(errno) => return conn.send_error(cookie, errno, slot),
        Outcome::Data { offset, data } if conn.structured_replies => {
            // One chunk, so DF is honoured whatever the client asked.
            let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
            match encode_offset_data_header(cookie, offset, len, true) {
                Ok(header) => OutgoingReply::new(&header, data, slot),
                Err(error) => {
                    tracing::error!(conn = conn.id, %error, "cannot encode a read reply");
                    buffers.give_back(data);
                    return conn.send_error(cookie, Errno::Io, slot);
                }
            }
        }
        Outcome::Data { data, .. } => {
            OutgoingReply::new(&encode_simple_reply(cookie, None), data, slot)
        }
        Outcome::Extents { context, extents } => {
            let mut out = Vec::with_capacity(24 + 8 * extents.len());
            match encode_block_status(cookie, context, &extents, true, &mut out) {
                Ok(()) => OutgoingReply::new(&[], out, slot),
                Err(error) => {
                    tracing::error!(conn = conn.id, %error, "cannot encode a block-status reply");
                    return conn.send_error(cookie, Errno::Io, slot);
                }
            }
        }
    };
    conn.outbox.send(reply);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extent(length: u32, status: ExtentStatus) -> Extent {
        Extent { length, status }
    }

    #[test]
    fn extents_are_clipped_to_the_request() {
        let zero = ExtentStatus::HOLE | ExtentStatus::ZERO;
        let data = ExtentStatus::EMPTY;
        assert_eq!(
            clip_extents(
                vec![extent(4096, zero), extent(0, data), extent(1 << 20, data)],
                8192,
                false
            ),
            vec![extent(4096, zero), extent(4096, data)]
        );
        assert_eq!(
            clip_extents(vec![extent(4096, zero), extent(4096, data)], 8192, true),
            vec![extent(4096, zero)]
        );
        assert_eq!(
            clip_extents(vec![extent(0, zero)], 512, false),
            vec![extent(512, data)]
        );
        assert_eq!(clip_extents(Vec::new(), 512, true), vec![extent(512, data)]);
    }

    #[test]
    fn pooled_buffers_come_back_zeroed() {
        let pool = BufferPool::default();
        let mut buf = pool.take(16);
        buf.fill(0xab);
        pool.give_back(buf);
        assert_eq!(pool.take(32), vec![0; 32]);
        pool.give_back(vec![1; KEEP_CAPACITY + 1]);
        assert!(lock(&pool.free)
            .iter()
            .all(|b| b.capacity() <= KEEP_CAPACITY));
    }

    #[test]
    fn write_buffers_are_reused_as_they_are_and_never_handed_to_reads() {
        let pool = BufferPool::default();
        let mut payload = pool.take_payload(64);
        assert_eq!(payload.as_slice().len(), 64);
        payload.as_mut_slice().fill(0xab);
        let at = payload.as_slice().as_ptr();
        pool.give_back_payload(payload);
        // Same size or smaller: the same memory, not rewritten.
        let payload = pool.take_payload(48);
        assert_eq!(
            (payload.as_slice().as_ptr(), payload.as_slice().len()),
            (at, 48)
        );
        assert!(payload.as_slice().iter().all(|&b| b == 0xab));
        pool.give_back_payload(payload);
        // Larger than any kept buffer: a new one, zeroed.
        let payload = pool.take_payload(1 << 16);
        assert!(payload.as_slice().iter().all(|&b| b == 0));
        pool.give_back_payload(payload);
        // A read's buffer never shows what a write left behind.
        assert_eq!(pool.take(96), vec![0; 96]);
    }

    #[test]
    fn write_payloads_start_on_a_page_boundary_and_are_reused() {
        let pool = BufferPool::default();
        for len in [1, 512, 4096, 65536, 1 << 20] {
            let mut payload = pool.take_payload(len);
            assert_eq!(payload.as_slice().len(), len);
            assert_eq!(
                payload.as_slice().as_ptr() as usize % crate::storage::PAGE_ALIGN,
                0,
                "{len}"
            );
            payload.as_mut_slice().fill(0x5a);
            let at = payload.as_slice().as_ptr();
            pool.give_back_payload(payload);
            // The same buffer comes back for the next write of that size
            // (1 MiB included: the pool keeps it).
            let again = pool.take_payload(len);
            assert_eq!(again.as_slice().as_ptr(), at, "{len}");
            assert_eq!(
                again.as_slice().as_ptr() as usize % crate::storage::PAGE_ALIGN,
                0,
                "{len}"
            );
            pool.give_back_payload(again);
        }
        assert!(Payload::empty().as_slice().is_empty());
    }
}
