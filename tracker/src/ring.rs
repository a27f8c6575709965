//! The backing-device side of an event loop's io_uring, shared by the NBD
//! and the ublk shells: [`DeviceIo`] turns a queue's [`Io`] into SQEs on
//! the loop's own ring and CQEs back into completions, with the same rules
//! as the synchronous engines (short transfers resumed, `EINTR`/`EAGAIN`
//! retried a bounded number of times, a failed flush poisoning every later
//! one). Requests the ring cannot take as they are (unaligned under
//! O_DIRECT, zeroing and trimming, a device without a file) are performed
//! at once through [`BlockDevice`], on the loop's thread: they are rare,
//! and [`BlockDevice`] knows how to bounce and zero them. So are writes
//! into the page cache (cache mode writeback): a copy the kernel makes at
//! once, which the ring would hand to a kernel worker thread.
//!
//! # Buffer lifetime
//!
//! A read or write's buffer travels inside its [`Io`]; while the kernel
//! works on it, the [`Io`] sits in this table, which nothing else touches,
//! and it is handed back only with the final CQE. The table must not be
//! dropped while I/O is in flight: the shells wait for
//! [`DeviceIo::in_flight`] to reach zero before they drop the ring.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};

use crate::backend::BackendError;
use crate::queue::{Io, IoKind, Queue};
use crate::storage::{AlignedBuf, BlockDevice, StorageError};
use tidemark_changelog::DiskId;

/// How often one I/O may come back with `EINTR`/`EAGAIN` before it fails.
const MAX_RETRIES: u32 = 64;

/// The tag of a device I/O's `user_data` (the low bits are its index).
pub(crate) const DEVICE_TAG: u64 = 0;
/// The bits of `user_data` that say what a CQE is for.
pub(crate) const TAG_MASK: u64 = 0xff << 56;

/// A finished device I/O: the queue's token, the outcome, the buffer.
pub(crate) type Completion = (u64, Result<(), BackendError>, Option<AlignedBuf>);

struct InFlight {
    io: Io,
    /// Bytes transferred so far (reads and writes).
    done: usize,
    retries: u32,
}

/// The device I/O of one event loop (see the [module documentation](self)).
pub(crate) struct DeviceIo {
    devices: Vec<Option<Arc<dyn BlockDevice>>>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    /// Submit reads, writes and flushes on the ring (`false`: perform every
    /// I/O through [`BlockDevice`], the synchronous engine's way).
    use_ring: bool,
}

/// The error of a ring I/O that failed with `source`: what the
/// synchronous engine reports for the same failure, so that a client is
/// told the same whichever engine performed the I/O.
fn ring_error(io: &Io, source: std::io::Error) -> BackendError {
    use crate::storage::Op;
    let len = io.buf.as_ref().map_or(0, |b| b.len()) as u64;
    let (op, offset) = match io.kind {
        IoKind::Read { offset } => (Op::Read, offset),
        IoKind::Write { offset } => (Op::Write, offset),
        IoKind::WriteZeroes { offset, .. } => (Op::WriteZeroes, offset),
        IoKind::Trim { offset, .. } => (Op::Trim, offset),
        IoKind::Flush => return BackendError::Device(StorageError::Flush { source }),
    };
    BackendError::Device(StorageError::Io {
        op,
        offset,
        len,
        source,
    })
}

impl DeviceIo {
    /// The device of `disk`, if the group has that disk.
    fn device(&self, disk: DiskId) -> Option<&Arc<dyn BlockDevice>> {
        self.devices.get(disk.index()).and_then(Option::as_ref)
    }

    /// The devices of the group by disk id (`None` where no disk has the
    /// id).
    pub(crate) fn new(devices: Vec<Option<Arc<dyn BlockDevice>>>, use_ring: bool) -> DeviceIo {
        DeviceIo {
            devices,
            slots: Vec::new(),
            free: Vec::new(),
            use_ring,
        }
    }

    /// I/O on the ring.
    pub(crate) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Starts `io`: on the ring, or at once (its completion is then
    /// returned).
    pub(crate) fn start(&mut self, ring: &mut IoUring, mut io: Io) -> Option<Completion> {
        let Some(device) = self.device(io.disk).cloned() else {
            let error = BackendError::NoSuchDisk(io.disk);
            return Some((io.token, Err(error), io.buf));
        };
        let ring_can = self.use_ring
            && device
                .raw_access()
                .is_some_and(|raw| match (&io.kind, &io.buf) {
                    // A write into the page cache (no O_DIRECT) is a copy
                    // the kernel makes at once; on the ring it would be
                    // handed to a kernel worker thread (filesystems take
                    // buffered writes without blocking only in part).
                    (IoKind::Write { .. }, _) if raw.align == 1 => false,
                    (IoKind::Read { offset } | IoKind::Write { offset }, Some(buf)) => {
                        !buf.is_empty() && raw.fits(*offset, buf.len() as u64, buf.as_ptr())
                    }
                    (IoKind::Flush, _) => !raw.flush_poisoned(),
                    _ => false,
                });
        if !ring_can {
            let result = perform(&*device, &mut io);
            return Some((io.token, result, io.buf));
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[index] = Some(InFlight {
            io,
            done: 0,
            retries: 0,
        });
        self.push(ring, index);
        None
    }

    /// Queues the SQE for what remains of slot `index`.
    fn push(&mut self, ring: &mut IoUring, index: usize) {
        let Some(flight) = self.slots[index].as_mut() else {
            return;
        };
        let Some(raw) = self
            .devices
            .get(flight.io.disk.index())
            .and_then(Option::as_ref)
            .and_then(|device| device.raw_access())
        else {
            return;
        };
        let fd = types::Fd(raw.fd.as_raw_fd());
        let done = flight.done;
        let entry = match (&flight.io.kind, flight.io.buf.as_mut()) {
            (IoKind::Read { offset }, Some(buf)) => {
                let rest = &mut buf[done..];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32)
                    .offset(offset + done as u64)
                    .build()
            }
            (IoKind::Write { offset }, Some(buf)) => {
                let rest = &buf[done..];
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32)
                    .offset(offset + done as u64)
                    .build()
            }
            _ => {
                let flags = if raw.datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(fd).flags(flags).build()
            }
        };
        push(ring, &entry.user_data(DEVICE_TAG | index as u64));
    }

    /// A CQE of slot `index`: its completion once the I/O is finished.
    pub(crate) fn complete(
        &mut self,
        ring: &mut IoUring,
        index: usize,
        result: i32,
    ) -> Option<Completion> {
        let flight = self.slots.get_mut(index).and_then(Option::as_mut)?;
        let len = flight.io.buf.as_ref().map_or(0, |b| b.len());
        let outcome = if result < 0 {
            let errno = -result;
            if matches!(errno, libc::EINTR | libc::EAGAIN) && flight.retries < MAX_RETRIES {
                flight.retries += 1;
                None
            } else {
                let source = std::io::Error::from_raw_os_error(errno);
                Some(Err(ring_error(&flight.io, source)))
            }
        } else {
            match flight.io.kind {
                IoKind::Read { .. } | IoKind::Write { .. } => {
                    let n = result as usize;
                    if n == 0 {
                        // End of file or a device that takes nothing.
                        let source = std::io::ErrorKind::UnexpectedEof.into();
                        Some(Err(ring_error(&flight.io, source)))
                    } else {
                        flight.done += n;
                        (flight.done >= len).then_some(Ok(()))
                    }
                }
                _ => Some(Ok(())),
            }
        };
        let Some(outcome) = outcome else {
            self.push(ring, index);
            return None;
        };
        let flight = self.slots[index].take()?;
        self.free.push(index);
        if let (IoKind::Flush, Err(_)) = (&flight.io.kind, &outcome) {
            if let Some(raw) = self.device(flight.io.disk).and_then(|d| d.raw_access()) {
                raw.flush_failed(&std::io::Error::from_raw_os_error(-result));
            }
        }
        Some((flight.io.token, outcome, flight.io.buf))
    }
}

impl DeviceIo {
    /// Starts every device I/O `core` asks for; what is performed at once
    /// goes straight back to it. Whether there was any.
    pub(crate) fn start_all(
        &mut self,
        ring: &mut IoUring,
        core: &mut dyn Queue,
        now: std::time::Instant,
    ) -> bool {
        let mut any = false;
        while let Some(io) = core.poll_io() {
            any = true;
            if let Some((token, result, buf)) = self.start(ring, io) {
                core.handle_io(token, result, buf, now);
            }
        }
        any
    }

    /// A device CQE (`user_data` tagged [`DEVICE_TAG`]): its I/O's
    /// completion, once final, goes to `core`.
    pub(crate) fn complete_into(
        &mut self,
        ring: &mut IoUring,
        user_data: u64,
        result: i32,
        core: &mut dyn Queue,
        now: std::time::Instant,
    ) {
        let index = (user_data & !TAG_MASK) as usize;
        if let Some((token, outcome, buf)) = self.complete(ring, index, result) {
            core.handle_io(token, outcome, buf, now);
        }
    }
}

/// Watches a queue's waker on the ring: one CQE with `user_data` once it
/// is written (re-arm after each).
pub(crate) fn arm_waker(ring: &mut IoUring, waker: &crate::queue::QueueWaker, user_data: u64) {
    use std::os::fd::AsFd;
    let fd = waker.as_fd().as_raw_fd();
    push(
        ring,
        &opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(user_data),
    );
}

/// `(user_data, result)` of every CQE the ring holds, taken off it.
pub(crate) fn drain_completions(ring: &mut IoUring) -> Vec<(u64, i32)> {
    ring.completion()
        .map(|c| (c.user_data(), c.result()))
        .collect()
}

/// Performs `io` through the synchronous interface.
fn perform(device: &dyn BlockDevice, io: &mut Io) -> Result<(), BackendError> {
    let outcome = match (&io.kind, io.buf.as_mut()) {
        (IoKind::Read { offset }, Some(buf)) => device.read_at(buf, *offset),
        (IoKind::Write { offset }, Some(buf)) => device.write_at(buf, *offset),
        (IoKind::Read { offset } | IoKind::Write { offset }, None) => {
            return Err(BackendError::OutOfRange {
                offset: *offset,
                length: 0,
            })
        }
        (IoKind::WriteZeroes { offset, len }, _) => device.write_zeroes(*offset, *len),
        (IoKind::Trim { offset, len }, _) => device.trim(*offset, *len),
        (IoKind::Flush, _) => device.flush(),
    };
    Ok(outcome?)
}

/// Pushes an SQE, making room by submitting if the queue is full.
pub(crate) fn push(ring: &mut IoUring, entry: &squeue::Entry) {
    loop {
        // SAFETY: every buffer an entry points to is owned by an `Io` kept
        // in a `DeviceIo` table (or by the shell, for its own operations)
        // until the entry's final CQE; the fds stay open as long as the
        // ring (see the module documentation).
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return;
        }
        if let Err(error) = ring.submit() {
            tracing::warn!(%error, "io_uring submit failed while the queue was full");
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: IoKind) -> Io {
        Io {
            token: 7,
            disk: DiskId(0),
            kind,
            buf: Some(AlignedBuf::page_aligned(4096)),
        }
    }

    /// A ring I/O that fails is reported as the synchronous engine reports
    /// the same failure: by the kernel's errno, so both tell a client the
    /// same.
    #[test]
    fn a_failed_ring_io_is_the_synchronous_engines_error() {
        let raw = std::io::Error::from_raw_os_error;
        let write = ring_error(&io(IoKind::Write { offset: 8192 }), raw(libc::EDQUOT));
        assert!(
            matches!(
                &write,
                BackendError::Device(StorageError::Io {
                    op: crate::storage::Op::Write,
                    offset: 8192,
                    len: 4096,
                    ..
                })
            ),
            "{write:?}"
        );
        let errno = |e: &BackendError| match e {
            BackendError::Device(e) => e.errno(),
            other => panic!("not a device error: {other:?}"),
        };
        assert_eq!(errno(&write) as i32, libc::ENOSPC);
        let read = ring_error(&io(IoKind::Read { offset: 0 }), raw(libc::EINVAL));
        assert_eq!(errno(&read) as i32, libc::EIO);
        let eof = ring_error(
            &io(IoKind::Read { offset: 0 }),
            std::io::ErrorKind::UnexpectedEof.into(),
        );
        assert_eq!(errno(&eof) as i32, libc::EIO);
        let flush = ring_error(&io(IoKind::Flush), raw(libc::ENOSPC));
        assert!(
            matches!(&flush, BackendError::Device(StorageError::Flush { .. })),
            "{flush:?}"
        );
        assert_eq!(errno(&flush) as i32, libc::ENOSPC);
    }
}
