//! One ublk queue: the thread that owns its io_uring on `/dev/ublkcN`, the
//! tag buffers, and the workers that perform requests on the backend.
//!
//! The driver binds a queue to the thread that fetched its tags: it runs
//! the delivery of requests (copying a write's data into the tag's buffer)
//! as task work of that thread, and accepts commits only from it. So one
//! thread does nothing but ring work: it submits `FETCH_REQ` for every tag,
//! hands each delivered request to a worker, and submits `COMMIT_AND_FETCH_REQ`
//! with the result a worker reports (through a channel and an eventfd the
//! ring also waits on). Workers call the backend synchronously, several at
//! once, like the NBD server's workers.
//!
//! A tag's buffer belongs to the driver between a fetch and the request's
//! delivery, to the worker performing the request until it reports, and to
//! the driver again from the commit: never to two at once.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use io_uring::{opcode, types, IoUring};

use super::sys::{self, io_flags, op, IoCmd, IoDesc};
use crate::backend::Backend;
use crate::nbd::constants::Errno;
use crate::storage::AlignedBuf;

/// The user data of the eventfd read; tags are below it.
const WAKE: u64 = u64::MAX;

/// What a queue serves.
pub(crate) struct QueueSpec {
    /// The device number N (`/dev/ublkcN`).
    pub dev_id: u32,
    /// Tags.
    pub depth: u16,
    /// Bytes per tag buffer (the largest request).
    pub buf_bytes: usize,
    /// The backend's disk id.
    pub disk: u32,
    /// The disk's size, bytes.
    pub size: u64,
    /// Worker threads.
    pub workers: usize,
}

/// The driver's descriptor array of the queue, mapped read-only.
struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: read-only memory the driver writes; a descriptor is read only by
// the queue thread, while it owns the tag (module doc).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

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

/// The tag buffers: one page-aligned allocation, `per_tag` bytes a tag.
struct Buffers {
    /// Owns the memory; touched only through `base` (module doc).
    _memory: AlignedBuf,
    base: *mut u8,
    per_tag: usize,
}

// SAFETY: plain memory owned by `_memory`; who may touch which tag's part
// when is the tag ownership protocol of the module doc.
unsafe impl Send for Buffers {}
// SAFETY: as above.
unsafe impl Sync for Buffers {}

impl Buffers {
    fn new(tags: u16, per_tag: usize) -> Self {
        let mut memory = AlignedBuf::page_aligned(usize::from(tags) * per_tag);
        let base = memory.as_mut_ptr();
        Self {
            _memory: memory,
            base,
            per_tag,
        }
    }

    fn address(&self, tag: u16) -> u64 {
        self.base as u64 + u64::from(tag) * self.per_tag as u64
    }

    /// The tag's buffer.
    ///
    /// # Safety
    /// Only the current owner of the tag (module doc) may call this, and
    /// only while it owns the tag.
    #[allow(clippy::mut_from_ref)]
    unsafe fn tag(&self, tag: u16) -> &mut [u8] {
        // SAFETY: in bounds (tag < depth); exclusive by the caller's
        // ownership of the tag.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.add(usize::from(tag) * self.per_tag),
                self.per_tag,
            )
        }
    }
}

/// A request handed to a worker.
struct Job {
    tag: u16,
    desc: IoDesc,
}

/// A running queue.
pub(crate) struct Queue {
    leave: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
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

impl Queue {
    /// Opens the char device, maps the descriptors, starts the queue thread
    /// and returns once it has fetched every tag (the driver may now start
    /// the device or end a recovery).
    pub(crate) fn start(backend: Arc<dyn Backend>, spec: QueueSpec) -> std::io::Result<Self> {
        let char_dev = open_char_device(spec.dev_id)?;
        let page = page_size();
        let descriptors = Mapping::descriptors(
            &char_dev,
            sys::descriptors_offset(0, page),
            sys::descriptors_len(spec.depth, page),
        )?;
        let buffers = Arc::new(Buffers::new(spec.depth, spec.buf_bytes));
        // SAFETY: eventfd takes flags only; the result is checked.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(wake) });
        let leave = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = channel();
        let thread = {
            let (wake, leave) = (wake.clone(), leave.clone());
            std::thread::Builder::new()
                .name(format!("ublk{}-queue", spec.dev_id))
                .spawn(move || {
                    let ring = QueueRing::new(char_dev, descriptors, buffers, wake, spec)?;
                    ring.run(backend, leave, ready_tx)
                })?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                leave,
                wake,
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

    /// Waits for the queue to end by itself (every tag aborted by the
    /// driver: the device was stopped).
    pub(crate) fn join(mut self) -> std::io::Result<QueueEnd> {
        self.thread.take().map_or(Ok(QueueEnd::default()), |t| {
            t.join()
                .unwrap_or_else(|_| Err(std::io::Error::other("ublk queue thread panicked")))
        })
    }

    /// Stops serving: requests workers hold are completed, the rest stay
    /// with the driver for the next server. Returns when the ring is closed.
    pub(crate) fn leave(self) -> std::io::Result<QueueEnd> {
        self.leave.store(true, Ordering::SeqCst);
        signal(&self.wake);
        self.join()
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.leave.store(true, Ordering::SeqCst);
            signal(&self.wake);
            let _ = t.join();
        }
    }
}

fn signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to our eventfd.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

fn page_size() -> usize {
    // SAFETY: sysconf takes a constant only.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

/// Opens `/dev/ublkcN`, waiting a moment for devtmpfs/udev to create it.
fn open_char_device(dev_id: u32) -> std::io::Result<File> {
    let path = format!("/dev/ublkc{dev_id}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => return Ok(f),
            Err(e)
                if std::time::Instant::now() < deadline
                    && matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBUSY)) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{path}: {e}"))),
        }
    }
}

/// The queue thread's state.
struct QueueRing {
    ring: IoUring,
    char_dev: File,
    descriptors: Mapping,
    buffers: Arc<Buffers>,
    wake: Arc<OwnedFd>,
    wake_buf: Box<[u8; 8]>,
    spec: QueueSpec,
}

impl QueueRing {
    fn new(
        char_dev: File,
        descriptors: Mapping,
        buffers: Arc<Buffers>,
        wake: Arc<OwnedFd>,
        spec: QueueSpec,
    ) -> std::io::Result<Self> {
        let entries = (u32::from(spec.depth) + 1).next_power_of_two();
        Ok(Self {
            ring: IoUring::builder().build(entries * 2)?,
            char_dev,
            descriptors,
            buffers,
            wake,
            wake_buf: Box::new([0u8; 8]),
            spec,
        })
    }

    fn push(&mut self, entry: io_uring::squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: every buffer an entry refers to (tag buffers, the
            // eventfd buffer) lives as long as the ring.
            let pushed = unsafe { self.ring.submission().push(&entry).is_ok() };
            if pushed {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn io_command(&self, op: u32, tag: u16, result: i32) -> io_uring::squeue::Entry {
        let cmd = IoCmd {
            queue: 0,
            tag,
            result,
            addr: self.buffers.address(tag),
        };
        opcode::UringCmd16::new(types::Fd(self.char_dev.as_raw_fd()), op)
            .cmd(cmd.encode())
            .build()
            .user_data(u64::from(tag))
    }

    fn arm_wake(&mut self) -> std::io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE);
        self.push(entry)
    }

    fn descriptor(&self, tag: u16) -> IoDesc {
        let at = usize::from(tag) * sys::IO_DESC_LEN;
        let mut raw = [0u8; sys::IO_DESC_LEN];
        for (i, b) in raw.iter_mut().enumerate() {
            // SAFETY: in bounds of the mapped array (tag < depth); the
            // driver wrote this descriptor before delivering the tag to us
            // and does not touch it until we commit. Volatile: the kernel
            // writes it.
            *b = unsafe { std::ptr::read_volatile(self.descriptors.base.add(at + i)) };
        }
        IoDesc::decode(&raw)
    }

    fn run(
        mut self,
        backend: Arc<dyn Backend>,
        leave: Arc<AtomicBool>,
        ready: Sender<std::io::Result<()>>,
    ) -> std::io::Result<QueueEnd> {
        let (job_tx, job_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<(u16, i32)>();
        let job_rx = Arc::new(Mutex::new(job_rx));
        let mut workers = Vec::new();
        for i in 0..self.spec.workers.max(1) {
            let (jobs, done) = (job_rx.clone(), done_tx.clone());
            let (backend, buffers, wake) =
                (backend.clone(), self.buffers.clone(), self.wake.clone());
            let (disk, size) = (self.spec.disk, self.spec.size);
            let spawned = std::thread::Builder::new()
                .name(format!("ublk{}-w{i}", self.spec.dev_id))
                .spawn(move || worker(&*backend, disk, size, &buffers, &jobs, &done, &wake));
            match spawned {
                Ok(t) => workers.push(t),
                Err(e) => {
                    let _ = ready.send(Err(std::io::Error::new(e.kind(), e.to_string())));
                    return Err(e);
                }
            }
        }
        drop(done_tx);

        let setup = (|| {
            for tag in 0..self.spec.depth {
                let fetch = self.io_command(sys::io::FETCH_REQ, tag, 0);
                self.push(fetch)?;
            }
            self.arm_wake()?;
            self.ring.submit()?;
            // A fetch the driver refused completes at once with an error.
            if let Some(cqe) = self.ring.completion().find(|c| c.result() < 0) {
                return Err(std::io::Error::from_raw_os_error(-cqe.result()));
            }
            Ok(())
        })();
        let setup_failed = setup.is_err();
        let _ = ready.send(setup);
        let result = if setup_failed {
            Err(std::io::Error::other(
                "fetching the ublk queue's tags failed",
            ))
        } else {
            self.serve(&job_tx, &done_rx, &leave)
        };
        drop(job_tx);
        for w in workers {
            let _ = w.join();
        }
        result
    }

    fn serve(
        &mut self,
        jobs: &Sender<Job>,
        done: &Receiver<(u16, i32)>,
        leave: &AtomicBool,
    ) -> std::io::Result<QueueEnd> {
        let depth = usize::from(self.spec.depth);
        let mut end = QueueEnd::default();
        let mut in_workers = 0usize;
        let mut aborted = 0usize;
        // Delivered while leaving: not performed, left for the next server.
        let mut held = 0usize;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
            let leaving = leave.load(Ordering::SeqCst);
            let cqes: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            for (data, res) in cqes {
                if data == WAKE {
                    self.arm_wake()?;
                    continue;
                }
                let tag = data as u16;
                if res == sys::IO_RES_OK {
                    if leaving {
                        held += 1;
                        continue;
                    }
                    let desc = self.descriptor(tag);
                    in_workers += 1;
                    if jobs.send(Job { tag, desc }).is_err() {
                        return Err(std::io::Error::other("ublk workers are gone"));
                    }
                } else {
                    // UBLK_IO_RES_ABORT: the device is going away; any
                    // other error means the same for this tag.
                    if res != sys::IO_RES_ABORT {
                        tracing::warn!(tag, error = %std::io::Error::from_raw_os_error(-res), "ublk fetch failed");
                    }
                    aborted += 1;
                }
            }
            while let Ok((tag, result)) = done.try_recv() {
                in_workers -= 1;
                end.completed += 1;
                let commit = self.io_command(sys::io::COMMIT_AND_FETCH_REQ, tag, result);
                self.push(commit)?;
            }
            if in_workers == 0 && leaving {
                // The last commits reach the driver before the ring closes.
                self.ring.submit()?;
                end.left = held as u64;
                return Ok(end);
            }
            if in_workers == 0 && aborted >= depth {
                return Ok(end);
            }
        }
    }
}

/// A worker: performs jobs until the queue closes.
fn worker(
    backend: &dyn Backend,
    disk: u32,
    size: u64,
    buffers: &Buffers,
    jobs: &Mutex<Receiver<Job>>,
    done: &Sender<(u16, i32)>,
    wake: &OwnedFd,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        // SAFETY: the queue thread handed us this tag; we own it until we
        // report (module doc).
        let buf = unsafe { buffers.tag(job.tag) };
        let result = catch_unwind(AssertUnwindSafe(|| {
            perform(backend, disk, size, &job.desc, buf)
        }))
        .unwrap_or_else(|_| {
            tracing::error!(tag = job.tag, "the backend panicked on a ublk request");
            -libc::EIO
        });
        if result < 0 {
            tracing::warn!(
                tag = job.tag,
                op = job.desc.op(),
                flags = job.desc.op_flags >> 8,
                sector = job.desc.start_sector,
                sectors = job.desc.nr_sectors,
                error = %std::io::Error::from_raw_os_error(-result),
                "ublk request failed"
            );
        }
        if done.send((job.tag, for_the_driver(result))).is_err() {
            return;
        }
        signal(wake);
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

/// Performs one request; the driver's result: bytes for reads and writes,
/// 0 for the rest, or a negative errno.
fn perform(backend: &dyn Backend, disk: u32, size: u64, desc: &IoDesc, buf: &mut [u8]) -> i32 {
    if desc.op() == op::FLUSH {
        // A flush has no range (its sector reads as all ones).
        return backend
            .flush(disk)
            .map_or_else(|e| -(e.code() as i32), |()| 0);
    }
    let offset = desc.start_sector.saturating_mul(512);
    let len = u64::from(desc.nr_sectors) << 9;
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return -libc::EINVAL;
    }
    let fua = desc.has(io_flags::FUA);
    let errno = |e: Errno| -(e.code() as i32);
    let data_len = match usize::try_from(len) {
        Ok(n) if n <= buf.len() => n,
        _ if matches!(desc.op(), op::READ | op::WRITE) => return -libc::EINVAL,
        _ => 0,
    };
    let outcome = match desc.op() {
        op::READ => backend
            .read(disk, offset, &mut buf[..data_len])
            .map(|()| data_len as i32),
        op::WRITE => backend
            .write(disk, offset, &buf[..data_len], fua)
            .map(|()| data_len as i32),
        op::DISCARD => backend.trim(disk, offset, len, fua).map(|()| 0),
        op::WRITE_ZEROES => backend
            .write_zeroes(disk, offset, len, desc.has(io_flags::NOUNMAP), fua)
            .map(|()| 0),
        _ => return -libc::EOPNOTSUPP,
    };
    outcome.unwrap_or_else(errno)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::export::ExportInfo;
    use crate::nbd::transmission::Extent;

    /// Records what it was asked, fails reads past 1 MiB.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
    }

    impl Backend for Recorder {
        fn exports(&self) -> Vec<ExportInfo> {
            Vec::new()
        }
        fn multi_conn_safe(&self) -> bool {
            true
        }
        fn read(&self, _: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
            if offset >= 1 << 20 {
                return Err(Errno::Io);
            }
            buf.fill(0xab);
            self.calls
                .lock()
                .unwrap()
                .push(format!("read {offset} {}", buf.len()));
            Ok(())
        }
        fn write(&self, _: u32, offset: u64, data: &[u8], fua: bool) -> Result<(), Errno> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("write {offset} {} fua={fua}", data.len()));
            Ok(())
        }
        fn write_zeroes(
            &self,
            _: u32,
            o: u64,
            l: u64,
            no_hole: bool,
            fua: bool,
        ) -> Result<(), Errno> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("zeroes {o} {l} no_hole={no_hole} fua={fua}"));
            Ok(())
        }
        fn trim(&self, _: u32, o: u64, l: u64, fua: bool) -> Result<(), Errno> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("trim {o} {l} fua={fua}"));
            Ok(())
        }
        fn flush(&self, _: u32) -> Result<(), Errno> {
            self.calls.lock().unwrap().push("flush".into());
            Ok(())
        }
        fn block_status(&self, _: u32, _: u64, _: u32) -> Result<Vec<Extent>, Errno> {
            Ok(Vec::new())
        }
    }

    fn desc(op: u8, flags: u32, start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op) | flags,
            nr_sectors,
            start_sector,
        }
    }

    #[test]
    fn requests_map_onto_the_backend_with_the_driver_s_results() {
        let b = Recorder::default();
        let size = 4 << 20;
        let mut buf = vec![0u8; 64 << 10];
        assert_eq!(
            perform(&b, 0, size, &desc(op::READ, 0, 8, 8), &mut buf),
            4096
        );
        assert!(buf[..4096].iter().all(|&x| x == 0xab));
        assert_eq!(
            perform(
                &b,
                0,
                size,
                &desc(op::WRITE, io_flags::FUA, 16, 16),
                &mut buf
            ),
            8192
        );
        // The block layer's flush has no range: its sector is all ones.
        assert_eq!(
            perform(&b, 0, size, &desc(op::FLUSH, 0, u64::MAX, 0), &mut buf),
            0
        );
        assert_eq!(
            perform(&b, 0, size, &desc(op::DISCARD, 0, 0, 2048), &mut buf),
            0
        );
        assert_eq!(
            perform(
                &b,
                0,
                size,
                &desc(op::WRITE_ZEROES, io_flags::NOUNMAP, 0, 4096),
                &mut buf
            ),
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
        let b = Recorder::default();
        let size = 4 << 20;
        let mut buf = vec![0u8; 64 << 10];
        // Past the end of the disk.
        assert_eq!(
            perform(
                &b,
                0,
                size,
                &desc(op::WRITE, 0, (4 << 20) / 512, 8),
                &mut buf
            ),
            -libc::EINVAL
        );
        // Longer than the tag's buffer.
        assert_eq!(
            perform(&b, 0, size, &desc(op::READ, 0, 0, 256), &mut buf),
            -libc::EINVAL
        );
        // An operation the tracker does not serve (zone append).
        assert_eq!(
            perform(&b, 0, size, &desc(13, 0, 0, 8), &mut buf),
            -libc::EOPNOTSUPP
        );
        assert!(b.calls.lock().unwrap().is_empty());
        assert_eq!(for_the_driver(-libc::EINVAL), -libc::EIO);
        assert_eq!(for_the_driver(-libc::ENOSPC), -libc::ENOSPC);
        assert_eq!(for_the_driver(4096), 4096);
        // A backend error reaches the driver as its errno.
        assert_eq!(
            perform(
                &b,
                0,
                size,
                &desc(op::READ, 0, (1 << 20) / 512, 8),
                &mut buf
            ),
            -libc::EIO
        );
    }
}
