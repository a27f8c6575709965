//! One ublk queue: a thread, pinned to the CPUs whose requests the queue
//! receives, running ONE io_uring that carries both the queue's ublk
//! commands on `/dev/ublkcN` and the backing-device I/O of its queue core
//! (the group's write path, [`crate::queue::Queue`]) — the same shape as an
//! NBD connection's event loop, with no hand-off to another thread per
//! request.
//!
//! ```text
//!  driver ──FETCH completes──► descriptor ──► Request ──► queue core
//!    ▲      (a request)           │ user copy:             │  ▲
//!    │                            │ pread /dev/ublkcN      │  │ handle_io
//!    │                            ▼                poll_io ▼  │
//!    └──COMMIT_AND_FETCH◄── result ◄──poll_reply──   ring (device I/O)
//!         (user copy, reads: pwrite /dev/ublkcN first)
//!                                                 ▲
//!                      waker (eventfd) ───────────┘ handle_wake: parked
//!                                                   requests, budget, leave
//! ```
//!
//! The driver binds a queue to the thread that fetched its tags: it
//! delivers requests as task work of that thread and accepts commits only
//! from it, which is why one thread owns the ring, the commands and the
//! core together.
//!
//! # Request data
//!
//! - **User copy** (`UBLK_F_USER_COPY`, when the driver has it): the tag has
//!   no buffer. A delivered write's data is read from `/dev/ublkcN` at the
//!   tag's offset ([`sys::user_copy_offset`]) straight into the buffer the
//!   request travels in; a read's data is written there before the commit.
//!   Buffers are taken per request from the tracker's data budget (shared
//!   with the NBD connections): a request that finds it spent waits, in
//!   order, until bytes come back, so per-CPU queues do not multiply memory.
//! - **Driver copy** (older drivers): each tag owns a fixed buffer whose
//!   address the fetch hands the driver, which copies a write's data into
//!   it before delivery and a read's data out of it at the commit. The
//!   buffer is lent to the request (its length set to the request's) and
//!   comes back with the reply; their total is reserved from the budget for
//!   the device's life (see the [parent module](super)).
//!
//! A tag belongs to the driver between a (commit-and-)fetch and the
//! delivery of its next request, then to this thread until it commits:
//! never to two at once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};
use tidemark_changelog::DiskId;
use zerocopy::FromZeros;

use super::sys::{self, io_flags, op, IoCmd, IoDesc};
use crate::backend::BackendError;
use crate::queue::{Op, Queue as QueueCore, QueueWaker, Request};
use crate::ring::{arm_waker, drain_completions, push, DeviceIo, DEVICE_TAG, TAG_MASK};
use crate::server::{build_ring, Buffers, DataBudget, Frontend, FLOOR_BYTES};
use crate::storage::AlignedBuf;

/// `user_data` of a ublk command (the low bits are its tag).
const COMMAND: u64 = 1 << 56;
/// `user_data` of the waker's poll.
const WAKE: u64 = 2 << 56;

/// Buffers a user-copy queue keeps for reuse: what it holds idle is at
/// most 16 × 128 KiB, whatever its depth.
const KEEP_BUFFERS: (usize, usize) = (16, 128 << 10);

/// What a queue serves.
pub(crate) struct QueueSpec {
    /// The device number N (`/dev/ublkcN`).
    pub dev_id: u32,
    /// The queue's number.
    pub queue: u16,
    /// Tags.
    pub depth: u16,
    /// The disk (its index in the group).
    pub disk: DiskId,
    /// The largest request, bytes (each tag's buffer in driver copy).
    pub max_bytes: u32,
    /// Request data through `pread`/`pwrite` on the char device (module
    /// doc); `false`: through the tags' fixed buffers.
    pub user_copy: bool,
    /// Run on these CPUs (what the driver maps to the queue); empty: where
    /// the scheduler likes.
    pub cpus: Vec<usize>,
}

/// What every queue of a device shares.
#[derive(Clone)]
pub(crate) struct Shared {
    /// `/dev/ublkcN`, open once for the device (the driver allows one open).
    pub char_dev: Arc<File>,
    /// The queue cores and the backing devices.
    pub frontend: Arc<Frontend>,
    /// The tracker's data budget (user copy takes request buffers from it).
    pub budget: Arc<DataBudget>,
    /// The device's size in bytes, as the driver was told it: requests
    /// are held to it. Raised before the driver is told a larger one (a
    /// grown disk), so a request to the new end is never refused.
    pub size: Arc<AtomicU64>,
}

/// A running queue.
pub(crate) struct Queue {
    leave: Arc<AtomicBool>,
    waker: Arc<QueueWaker>,
    thread: Option<JoinHandle<std::io::Result<QueueEnd>>>,
}

/// What a queue did before it ended.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct QueueEnd {
    /// Requests completed.
    pub completed: u64,
    /// Requests delivered but left unserved for the next server (the
    /// driver re-issues them).
    pub left: u64,
}

impl std::ops::AddAssign for QueueEnd {
    fn add_assign(&mut self, other: QueueEnd) {
        self.completed += other.completed;
        self.left += other.left;
    }
}

impl Queue {
    /// Starts the queue's thread and returns once it has fetched every tag
    /// (the driver may now start the device or end a recovery).
    pub(crate) fn start(shared: Shared, spec: QueueSpec) -> std::io::Result<Self> {
        let waker = QueueWaker::new()?;
        let leave = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = sync_channel(1);
        let thread = {
            let (waker, leave) = (waker.clone(), leave.clone());
            std::thread::Builder::new()
                .name(format!("ublk{}-q{}", spec.dev_id, spec.queue))
                .spawn(move || {
                    pin(&spec);
                    match QueueLoop::new(shared, spec, waker) {
                        Ok(queue) => queue.run(&leave, ready_tx),
                        Err(e) => {
                            let _ =
                                ready_tx.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                            Err(e)
                        }
                    }
                })?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                leave,
                waker,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => match thread.join() {
                Ok(Err(e)) => Err(e),
                _ => Err(std::io::Error::other("the ublk queue thread ended early")),
            },
        }
    }

    /// Asks the queue to stop serving, without waiting: requests in the
    /// queue core are completed, the rest stay with the driver for the
    /// next server. Several queues then wind down together; [`join`](Self::join)
    /// returns once the ring is closed.
    pub(crate) fn ask_to_leave(&self) {
        self.leave.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// Waits for the queue to end by itself (every tag aborted by the
    /// driver: the device was stopped), or after [`ask_to_leave`](Self::ask_to_leave).
    pub(crate) fn join(mut self) -> std::io::Result<QueueEnd> {
        self.thread.take().map_or(Ok(QueueEnd::default()), |t| {
            t.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("ublk queue thread panicked")))
        })
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.ask_to_leave();
            let _ = t.join();
        }
    }
}

/// Pins the calling thread to the queue's CPUs, where the driver runs the
/// queue's requests (their task work, their data copies). Without a mask,
/// or when the kernel refuses it, the thread runs unpinned.
fn pin(spec: &QueueSpec) {
    if spec.cpus.is_empty() {
        tracing::debug!(
            queue = spec.queue,
            "no CPU mask for the ublk queue: not pinned"
        );
        return;
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in &spec.cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            tracing::debug!(
                queue = spec.queue,
                cpu,
                "a CPU beyond the affinity mask's size"
            );
            continue;
        }
        // SAFETY: cpu is below CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: pid 0 is the calling thread; the set lives across the call
    // and its size is passed with it.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        tracing::debug!(queue = spec.queue, %error, cpus = ?spec.cpus, "pinning the ublk queue failed: not pinned");
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf takes a constant only.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

/// The driver's descriptor array of the queue, mapped read-only.
struct Mapping {
    base: *mut u8,
    len: usize,
}

impl Mapping {
    fn descriptors(file: &File, offset: i64, len: usize) -> std::io::Result<Self> {
        // SAFETY: a read-only shared mapping of the driver's descriptor
        // array for this queue; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self {
            base: base.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what was mapped; only the queue thread,
        // which owns the mapping, ever read it.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// Where a tag is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagState {
    /// A fetch (or commit-and-fetch) is with the driver.
    Driver,
    /// Delivered; waits for data budget (user copy).
    Budget,
    /// Its request is in the queue core.
    Core,
    /// Delivered while the queue was leaving: left for the next server.
    Left,
    /// The driver ended it (the device is stopping).
    Aborted,
}

struct Tag {
    state: TagState,
    desc: IoDesc,
    /// What the request asks (valid from delivery to commit).
    op: Op,
    /// Bytes of data it carries.
    data: u32,
    /// Budget bytes it holds.
    budget: u64,
    /// Driver copy: the tag's fixed buffer, while the tag is not lent out.
    fixed: Option<AlignedBuf>,
}

/// The queue thread's state.
struct QueueLoop {
    ring: IoUring,
    shared: Shared,
    spec: QueueSpec,
    descriptors: Mapping,
    core: Box<dyn QueueCore>,
    waker: Arc<QueueWaker>,
    dev: DeviceIo,
    tags: Vec<Tag>,
    /// Tags waiting for data budget, in delivery order.
    waiting: std::collections::VecDeque<u16>,
    buffers: Buffers,
    /// Budget bytes the queue's requests hold.
    held: u64,
    wake_armed: bool,
    end: QueueEnd,
}

impl QueueLoop {
    fn new(shared: Shared, spec: QueueSpec, waker: Arc<QueueWaker>) -> std::io::Result<Self> {
        let page = page_size();
        let descriptors = Mapping::descriptors(
            &shared.char_dev,
            sys::descriptors_offset(spec.queue, page),
            sys::descriptors_len(spec.depth, page),
        )?;
        let entries = (2 * u32::from(spec.depth) + 8).next_power_of_two();
        let ring = build_ring(entries)?;
        shared.budget.register(&waker);
        let core = (shared.frontend.queues)(&waker, Instant::now());
        let dev = DeviceIo::new(shared.frontend.devices.clone(), shared.frontend.use_ring);
        let tags = (0..spec.depth)
            .map(|_| Tag {
                state: TagState::Driver,
                desc: IoDesc::new_zeroed(),
                op: Op::Flush,
                data: 0,
                budget: 0,
                fixed: (!spec.user_copy).then(|| AlignedBuf::page_aligned(spec.max_bytes as usize)),
            })
            .collect();
        Ok(Self {
            ring,
            shared,
            spec,
            descriptors,
            core,
            waker,
            dev,
            tags,
            waiting: std::collections::VecDeque::new(),
            buffers: Buffers::new(KEEP_BUFFERS),
            held: 0,
            wake_armed: false,
            end: QueueEnd::default(),
        })
    }

    /// A fetch or commit-and-fetch of `tag`, with `result` for a commit.
    fn command(&self, op: u32, tag: u16, result: i32) -> io_uring::squeue::Entry {
        // Under user copy the driver wants no buffer address.
        let addr = self.tags[usize::from(tag)]
            .fixed
            .as_ref()
            .map_or(0, |b| b.as_ptr() as u64);
        let cmd = IoCmd {
            queue: self.spec.queue,
            tag,
            result,
            addr,
        };
        opcode::UringCmd16::new(types::Fd(self.shared.char_dev.as_raw_fd()), op)
            .cmd(cmd.encode())
            .build()
            .user_data(COMMAND | u64::from(tag))
    }

    fn descriptor(&self, tag: u16) -> IoDesc {
        let at = usize::from(tag) * sys::IO_DESC_LEN;
        // SAFETY: in bounds of the mapped array (tag < depth); the driver
        // wrote this descriptor before delivering the tag to us and does
        // not touch it until we commit. Read as bytes (no alignment to
        // keep), volatile because the kernel writes them.
        let raw = unsafe {
            std::ptr::read_volatile(
                self.descriptors
                    .base
                    .add(at)
                    .cast::<[u8; sys::IO_DESC_LEN]>(),
            )
        };
        IoDesc::decode(&raw)
    }

    fn run(
        mut self,
        leave: &AtomicBool,
        ready: SyncSender<std::io::Result<()>>,
    ) -> std::io::Result<QueueEnd> {
        let setup = (|| {
            for tag in 0..self.spec.depth {
                let fetch = self.command(sys::io::FETCH_REQ, tag, 0);
                push(&mut self.ring, &fetch);
            }
            self.ring.submit()?;
            // A fetch the driver refused completes at once with an error.
            if let Some(cqe) = self.ring.completion().find(|c| c.result() < 0) {
                return Err(std::io::Error::from_raw_os_error(-cqe.result()));
            }
            Ok(())
        })();
        let failed = setup.as_ref().err().map(|e| e.raw_os_error());
        let _ = ready.send(setup);
        if let Some(code) = failed {
            return Err(code.map_or_else(
                || std::io::Error::other("fetching the ublk queue's tags failed"),
                std::io::Error::from_raw_os_error,
            ));
        }
        self.serve(leave)
    }

    fn serve(&mut self, leave: &AtomicBool) -> std::io::Result<QueueEnd> {
        loop {
            let leaving = leave.load(Ordering::SeqCst);
            if leaving {
                // Not started yet: left for the next server.
                for tag in std::mem::take(&mut self.waiting) {
                    self.tags[usize::from(tag)].state = TagState::Left;
                    self.end.left += 1;
                }
            }
            self.pump();
            let quiet = self.core.in_flight() == 0 && self.dev.in_flight() == 0;
            if quiet && leaving {
                // The last commits reach the driver before the ring closes.
                self.ring.submit()?;
                return Ok(self.end);
            }
            if quiet && self.tags.iter().all(|t| t.state == TagState::Aborted) {
                return Ok(self.end);
            }
            if !self.wake_armed {
                arm_waker(&mut self.ring, &self.waker, WAKE);
                self.wake_armed = true;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            self.reap(leave.load(Ordering::SeqCst));
        }
    }

    /// Handles every completion the ring holds.
    fn reap(&mut self, leaving: bool) {
        let now = Instant::now();
        for (data, result) in drain_completions(&mut self.ring) {
            match data & TAG_MASK {
                DEVICE_TAG => {
                    self.dev
                        .complete_into(&mut self.ring, data, result, &mut *self.core, now);
                }
                COMMAND => self.delivered((data & 0xffff) as u16, result, leaving, now),
                WAKE => {
                    self.wake_armed = false;
                    self.waker.reset();
                    self.core.handle_wake(now);
                    self.admit_waiting(now);
                }
                _ => tracing::error!(data, "a ublk queue completion for nothing"),
            }
        }
    }

    /// A fetch of `tag` completed: a request, or the tag's end.
    fn delivered(&mut self, tag: u16, result: i32, leaving: bool, now: Instant) {
        let Some(slot) = self.tags.get_mut(usize::from(tag)) else {
            tracing::error!(tag, "the driver completed a tag the queue does not have");
            return;
        };
        if result != sys::IO_RES_OK {
            // UBLK_IO_RES_ABORT: the device is going away; any other error
            // means the same for this tag.
            if result != sys::IO_RES_ABORT {
                tracing::warn!(tag, error = %std::io::Error::from_raw_os_error(-result), "ublk fetch failed");
            }
            slot.state = TagState::Aborted;
            return;
        }
        if leaving {
            slot.state = TagState::Left;
            self.end.left += 1;
            return;
        }
        let desc = self.descriptor(tag);
        let size = self.shared.size.load(Ordering::Acquire);
        match request_of(&desc, size, self.spec.max_bytes) {
            Err(errno) => {
                log_failure(tag, &desc, errno);
                self.commit(tag, for_the_driver(errno));
            }
            Ok((op, data)) => {
                let slot = &mut self.tags[usize::from(tag)];
                (slot.desc, slot.op, slot.data) = (desc, op, data);
                if self.spec.user_copy && data > 0 {
                    slot.state = TagState::Budget;
                    self.waiting.push_back(tag);
                    self.admit_waiting(now);
                } else {
                    self.begin(tag, now);
                }
            }
        }
    }

    /// Starts the requests waiting for budget, in order, while it lasts.
    fn admit_waiting(&mut self, now: Instant) {
        while let Some(&tag) = self.waiting.front() {
            let bytes = u64::from(self.tags[usize::from(tag)].data);
            if !self.take_budget(bytes) {
                return;
            }
            self.waiting.pop_front();
            self.tags[usize::from(tag)].budget = bytes;
            self.held += bytes;
            self.begin(tag, now);
        }
    }

    /// Takes `bytes` of the data budget, as an NBD connection does: a
    /// queue holding none may go past a spent budget by one request of up
    /// to [`FLOOR_BYTES`], from the reserve; otherwise it waits (parked on
    /// the budget's waiters).
    fn take_budget(&mut self, bytes: u64) -> bool {
        let budget = &self.shared.budget;
        if budget.try_take(bytes) {
            return true;
        }
        if self.held == 0 && bytes <= FLOOR_BYTES && budget.try_take_reserve(bytes) {
            return true;
        }
        budget.park(&self.waker);
        budget.try_take(bytes)
    }

    /// Hands a delivered request to the queue core, with its data.
    fn begin(&mut self, tag: u16, now: Instant) {
        let slot = &mut self.tags[usize::from(tag)];
        let (op, len) = (slot.op, slot.data as usize);
        let buf = match op {
            Op::Read { .. } | Op::Write { .. } => {
                let buf = match slot.fixed.take() {
                    Some(mut fixed) => {
                        // Within capacity: `request_of` bounds it by max_bytes.
                        fixed.set_len(len);
                        fixed
                    }
                    None => self.buffers.take(len),
                };
                Some(buf)
            }
            _ => None,
        };
        let mut buf = buf;
        if let (Op::Write { .. }, true, Some(data)) = (op, self.spec.user_copy, buf.as_mut()) {
            let at = sys::user_copy_offset(self.spec.queue, tag);
            if let Err(error) = self.shared.char_dev.read_exact_at(data, at) {
                tracing::warn!(tag, %error, "reading a write's data from the ublk device failed");
                self.finish(tag, Err(BackendError::Io(error)), buf);
                return;
            }
        }
        self.tags[usize::from(tag)].state = TagState::Core;
        self.core.handle_request(
            Request {
                id: u64::from(tag),
                disk: self.spec.disk,
                op,
                buf,
            },
            now,
        );
    }

    /// Moves device I/O and replies between the core and the ring until
    /// the core has nothing more to give.
    fn pump(&mut self) {
        let now = Instant::now();
        loop {
            let mut moved = self.dev.start_all(&mut self.ring, &mut *self.core, now);
            while let Some(reply) = self.core.poll_reply() {
                moved = true;
                let tag = reply.id as u16;
                if usize::from(tag) >= self.tags.len() || reply.id > u64::from(u16::MAX) {
                    tracing::error!(id = reply.id, "a ublk reply for no tag");
                    continue;
                }
                self.finish(tag, reply.result, reply.buf);
            }
            if !moved {
                return;
            }
        }
    }

    /// Completes a request: its data back to the driver (user copy reads),
    /// its buffer and budget back, its result committed.
    fn finish(&mut self, tag: u16, result: Result<(), BackendError>, buf: Option<AlignedBuf>) {
        let slot = &self.tags[usize::from(tag)];
        let (op, desc) = (slot.op, slot.desc);
        let mut outcome = driver_result(&op, slot.data, result);
        if let (Op::Read { .. }, true, Some(data)) = (op, self.spec.user_copy, buf.as_ref()) {
            if outcome > 0 {
                let at = sys::user_copy_offset(self.spec.queue, tag);
                if let Err(error) = self.shared.char_dev.write_all_at(data, at) {
                    tracing::warn!(tag, %error, "handing a read's data to the ublk device failed");
                    outcome = -libc::EIO;
                }
            }
        }
        if outcome < 0 {
            log_failure(tag, &desc, outcome);
        }
        let slot = &mut self.tags[usize::from(tag)];
        let bytes = std::mem::take(&mut slot.budget);
        if self.spec.user_copy {
            if let Some(buf) = buf {
                self.buffers.give(buf);
            }
        } else {
            // The tag's fixed buffer comes back whole (a core that lost it
            // costs one allocation, never a tag without a buffer).
            let mut fixed =
                buf.unwrap_or_else(|| AlignedBuf::page_aligned(self.spec.max_bytes as usize));
            fixed.set_len(fixed.capacity());
            slot.fixed = Some(fixed);
        }
        self.held -= bytes;
        self.shared.budget.give(bytes);
        self.end.completed += 1;
        self.commit(tag, for_the_driver(outcome));
    }

    fn commit(&mut self, tag: u16, result: i32) {
        self.tags[usize::from(tag)].state = TagState::Driver;
        let entry = self.command(sys::io::COMMIT_AND_FETCH_REQ, tag, result);
        push(&mut self.ring, &entry);
    }
}

impl Drop for QueueLoop {
    fn drop(&mut self) {
        // Device I/O the kernel still works on points into buffers this
        // loop owns: wait it out before they go (ring.rs, buffer lifetime).
        while self.dev.in_flight() > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            for (data, result) in drain_completions(&mut self.ring) {
                if data & TAG_MASK == DEVICE_TAG {
                    let _ = self
                        .dev
                        .complete(&mut self.ring, (data & !TAG_MASK) as usize, result);
                }
            }
        }
        // Budget still held (a request abandoned with the ring) goes back.
        self.shared.budget.give(self.held);
    }
}

fn log_failure(tag: u16, desc: &IoDesc, errno: i32) {
    tracing::warn!(
        tag,
        op = desc.op(),
        flags = desc.op_flags >> 8,
        sector = desc.start_sector,
        sectors = desc.nr_sectors,
        error = %std::io::Error::from_raw_os_error(-errno),
        "ublk request failed"
    );
}

/// What a delivered request asks, checked against the disk (`size` bytes)
/// and the largest request: the queue core's operation and the bytes of
/// data it carries (reads and writes), or the negative errno the driver
/// is told.
fn request_of(desc: &IoDesc, size: u64, max_bytes: u32) -> Result<(Op, u32), i32> {
    if desc.op() == op::FLUSH {
        // A flush has no range (its sector reads as all ones).
        return Ok((Op::Flush, 0));
    }
    let offset = desc.start_sector.saturating_mul(512);
    let len = u64::from(desc.nr_sectors) << 9;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(-libc::EINVAL);
    }
    let fua = desc.has(io_flags::FUA);
    let data = || {
        u32::try_from(len)
            .ok()
            .filter(|&n| n <= max_bytes)
            .ok_or(-libc::EINVAL)
    };
    match desc.op() {
        op::READ => data().map(|n| (Op::Read { offset, len: n }, n)),
        op::WRITE => data().map(|n| (Op::Write { offset, fua }, n)),
        op::DISCARD => Ok((Op::Trim { offset, len, fua }, 0)),
        op::WRITE_ZEROES => Ok((
            Op::WriteZeroes {
                offset,
                len,
                no_hole: desc.has(io_flags::NOUNMAP),
                fua,
            },
            0,
        )),
        _ => Err(-libc::EOPNOTSUPP),
    }
}

/// The driver's result of a finished request: its bytes for reads and
/// writes, 0 for the rest, or a negative errno.
fn driver_result(op: &Op, data: u32, result: Result<(), BackendError>) -> i32 {
    match (result, op) {
        (Err(error), _) => errno_of(&error),
        (Ok(()), Op::Read { .. } | Op::Write { .. }) => data as i32,
        (Ok(()), _) => 0,
    }
}

/// The negative errno of a failed request: the one mapping from storage
/// errors to the kernel's ([`for_the_driver`] then keeps those the block
/// layer knows). A request the core refused as outside the disk is
/// `EINVAL`, a full disk `ENOSPC`, a read-only disk `EPERM`, a group that
/// stopped serving changes `EIO`; a device or other I/O error keeps the
/// kernel's errno.
fn errno_of(error: &BackendError) -> i32 {
    -match error {
        BackendError::NoSuchDisk(_) | BackendError::OutOfRange { .. } => libc::EINVAL,
        BackendError::NoSpace(_) => libc::ENOSPC,
        BackendError::ReadOnly => libc::EPERM,
        BackendError::Unavailable => libc::EIO,
        BackendError::Device(error) => error.errno() as i32,
        BackendError::Io(error) => error.raw_os_error().filter(|&e| e > 0).unwrap_or(libc::EIO),
    }
}

/// The errno the driver is told: the block layer knows a few (it logs
/// "invalid error" and fails the request as an I/O error for the rest), so
/// the others become EIO; the tracker's log line keeps the precise one.
fn for_the_driver(result: i32) -> i32 {
    match -result {
        e if e <= 0 => result,
        libc::ENOSPC | libc::EOPNOTSUPP | libc::ENOMEM | libc::EIO => result,
        _ => -libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Allocation, Backend, BackendError, ServedDisk};
    use crate::queue::BlockingPool;
    use std::sync::Mutex;
    use tidemark_changelog::DiskId;

    /// Records what it was asked, fails reads past 1 MiB.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
    }

    impl Backend for Recorder {
        fn disks(&self) -> Vec<ServedDisk> {
            Vec::new()
        }
        fn multi_conn_safe(&self) -> bool {
            true
        }
        fn read(&self, _: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
            if offset >= 1 << 20 {
                return Err(BackendError::Io(std::io::Error::other("past 1 MiB")));
            }
            buf.fill(0xab);
            self.calls
                .lock()
                .unwrap()
                .push(format!("read {offset} {}", buf.len()));
            Ok(())
        }
        fn write(
            &self,
            _: DiskId,
            offset: u64,
            data: &[u8],
            fua: bool,
        ) -> Result<(), BackendError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("write {offset} {} fua={fua}", data.len()));
            Ok(())
        }
        fn write_zeroes(
            &self,
            _: DiskId,
            o: u64,
            l: u64,
            no_hole: bool,
            fua: bool,
        ) -> Result<(), BackendError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("zeroes {o} {l} no_hole={no_hole} fua={fua}"));
            Ok(())
        }
        fn trim(&self, _: DiskId, o: u64, l: u64, fua: bool) -> Result<(), BackendError> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("trim {o} {l} fua={fua}"));
            Ok(())
        }
        fn flush(&self, _: DiskId) -> Result<(), BackendError> {
            self.calls.lock().unwrap().push("flush".into());
            Ok(())
        }
        fn allocation(&self, _: DiskId, _: u64, _: u64) -> Result<Vec<Allocation>, BackendError> {
            Ok(Vec::new())
        }
    }

    fn desc(op: u8, flags: u32, start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors,
            start_sector,
            addr: 0,
        }
    }

    const SIZE: u64 = 4 << 20;
    const MAX: u32 = 64 << 10;

    /// What the queue does with one delivered request, minus the ring: map
    /// it, run it through a queue core over `backend`, and return what the
    /// driver is told and the request's buffer.
    fn serve(backend: &Arc<Recorder>, d: IoDesc) -> (i32, Option<AlignedBuf>) {
        let (op, data) = match request_of(&d, SIZE, MAX) {
            Ok(mapped) => mapped,
            Err(errno) => return (for_the_driver(errno), None),
        };
        let backend: Arc<dyn Backend> = backend.clone();
        let pool = BlockingPool::start(backend, 1).unwrap();
        let waker = QueueWaker::new().unwrap();
        let mut core = pool.queue(&waker);
        let buf = matches!(op, Op::Read { .. } | Op::Write { .. })
            .then(|| AlignedBuf::page_aligned(data as usize));
        core.handle_request(
            Request {
                id: 7,
                disk: DiskId(0),
                op,
                buf,
            },
            Instant::now(),
        );
        loop {
            core.handle_wake(Instant::now());
            if let Some(reply) = core.poll_reply() {
                assert_eq!(reply.id, 7);
                let result = driver_result(&op, data, reply.result);
                return (for_the_driver(result), reply.buf);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn requests_map_onto_the_backend_with_the_driver_s_results() {
        let b = Arc::new(Recorder::default());
        let (result, buf) = serve(&b, desc(op::READ, 0, 8, 8));
        assert_eq!(result, 4096);
        let buf = buf.expect("a read's buffer comes back");
        assert_eq!(buf.len(), 4096);
        assert!(buf.iter().all(|&x| x == 0xab));
        assert_eq!(serve(&b, desc(op::WRITE, io_flags::FUA, 16, 16)).0, 8192);
        // The block layer's flush has no range: its sector is all ones.
        assert_eq!(serve(&b, desc(op::FLUSH, 0, u64::MAX, 0)).0, 0);
        assert_eq!(serve(&b, desc(op::DISCARD, 0, 0, 2048)).0, 0);
        assert_eq!(
            serve(&b, desc(op::WRITE_ZEROES, io_flags::NOUNMAP, 0, 4096)).0,
            0
        );
        assert_eq!(
            *b.calls.lock().unwrap(),
            [
                "read 4096 4096",
                "write 8192 8192 fua=true",
                "flush",
                "trim 0 1048576 fua=false",
                "zeroes 0 2097152 no_hole=true fua=false",
            ]
        );
    }

    #[test]
    fn bad_requests_get_errors_and_never_reach_the_backend() {
        let b = Arc::new(Recorder::default());
        // Past the end of the disk.
        assert_eq!(serve(&b, desc(op::WRITE, 0, SIZE / 512, 8)).0, -libc::EIO);
        assert_eq!(
            request_of(&desc(op::WRITE, 0, SIZE / 512, 8), SIZE, MAX).err(),
            Some(-libc::EINVAL)
        );
        // A sector number whose byte offset overflows.
        assert_eq!(
            request_of(&desc(op::DISCARD, 0, u64::MAX / 256, 8), SIZE, MAX).err(),
            Some(-libc::EINVAL)
        );
        // Longer than the largest request.
        assert_eq!(
            request_of(&desc(op::READ, 0, 0, MAX / 512 + 8), SIZE, MAX).err(),
            Some(-libc::EINVAL)
        );
        // An operation the tracker does not serve (zone append).
        assert_eq!(serve(&b, desc(13, 0, 0, 8)).0, -libc::EOPNOTSUPP);
        assert!(b.calls.lock().unwrap().is_empty());
        assert_eq!(for_the_driver(-libc::EINVAL), -libc::EIO);
        assert_eq!(for_the_driver(-libc::ENOSPC), -libc::ENOSPC);
        assert_eq!(for_the_driver(4096), 4096);
        // A backend error reaches the driver as its errno.
        assert_eq!(
            serve(&b, desc(op::READ, 0, (1 << 20) / 512, 8)).0,
            -libc::EIO
        );
        assert_eq!(
            driver_result(&Op::Flush, 0, Err(BackendError::NoSpace(full()))),
            -libc::ENOSPC
        );
    }

    fn full() -> std::io::Error {
        std::io::ErrorKind::StorageFull.into()
    }

    /// Every storage error reaches the driver as an errno, and as one the
    /// block layer knows once narrowed.
    #[test]
    fn backend_errors_become_negative_errnos() {
        use crate::storage::{Op as StorageOp, StorageError};
        let raw = std::io::Error::from_raw_os_error;
        let device = |errno| {
            BackendError::Device(StorageError::Io {
                op: StorageOp::Write,
                offset: 0,
                len: 4096,
                source: raw(errno),
            })
        };
        let cases = [
            (
                BackendError::NoSuchDisk(DiskId(2)),
                -libc::EINVAL,
                -libc::EIO,
            ),
            (
                BackendError::OutOfRange {
                    offset: 0,
                    length: 1,
                },
                -libc::EINVAL,
                -libc::EIO,
            ),
            (BackendError::NoSpace(full()), -libc::ENOSPC, -libc::ENOSPC),
            (BackendError::ReadOnly, -libc::EPERM, -libc::EIO),
            (BackendError::Unavailable, -libc::EIO, -libc::EIO),
            (device(libc::ENOSPC), -libc::ENOSPC, -libc::ENOSPC),
            (device(libc::EDQUOT), -libc::ENOSPC, -libc::ENOSPC),
            (device(libc::ENOMEM), -libc::ENOMEM, -libc::ENOMEM),
            (device(libc::EIO), -libc::EIO, -libc::EIO),
            (
                BackendError::Device(StorageError::Poisoned),
                -libc::EIO,
                -libc::EIO,
            ),
            (
                BackendError::Io(raw(libc::ENOSPC)),
                -libc::ENOSPC,
                -libc::ENOSPC,
            ),
            (BackendError::Io(raw(libc::EBADF)), -libc::EBADF, -libc::EIO),
            (
                BackendError::Io(std::io::Error::other("no errno")),
                -libc::EIO,
                -libc::EIO,
            ),
        ];
        for (error, errno, told) in cases {
            assert_eq!(errno_of(&error), errno, "{error:?}");
            assert_eq!(for_the_driver(errno_of(&error)), told, "{error:?}");
        }
    }
}
