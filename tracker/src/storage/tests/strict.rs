//! An in-memory [`RawIo`] that behaves like a strict O_DIRECT device: it
//! fails every read or write whose offset, length or buffer is not aligned
//! (as the kernel would, with EINVAL). Running the shared [`Device`] logic on
//! it checks the bounce-buffer and read-modify-write paths independently of
//! whether the test filesystem supports O_DIRECT, and lets tests inject
//! failures the kernel will not produce on demand.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

use crate::storage::device::{Device, RawIo, FALLOC_PUNCH_HOLE, FALLOC_ZERO_RANGE};
use crate::storage::{BackingInfo, BackingKind};

pub(super) struct StrictIo {
    bytes: Mutex<Vec<u8>>,
    align: u64,
    fallocate: bool,
    fail_sync: AtomicBool,
    fail_io: AtomicI32,
    null: File,
}

impl StrictIo {
    /// Makes the next sync fail with EIO.
    pub(super) fn fail_next_sync(&self) {
        self.fail_sync.store(true, Ordering::SeqCst);
    }

    /// Makes the next read or write fail with `errno`.
    pub(super) fn fail_io(&self, errno: i32) {
        self.fail_io.store(errno, Ordering::SeqCst);
    }

    fn check(&self, addr: usize, len: usize, offset: u64) -> io::Result<std::ops::Range<usize>> {
        let errno = self.fail_io.swap(0, Ordering::SeqCst);
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let a = self.align;
        if !offset.is_multiple_of(a)
            || !(len as u64).is_multiple_of(a)
            || !(addr as u64).is_multiple_of(a)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let size = self.bytes.lock().unwrap().len();
        let start = offset as usize;
        if start + len > size {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(start..start + len)
    }
}

impl RawIo for StrictIo {
    fn file(&self) -> &File {
        &self.null
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let range = self.check(buf.as_ptr() as usize, buf.len(), offset)?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[range]);
        Ok(())
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let range = self.check(data.as_ptr() as usize, data.len(), offset)?;
        self.bytes.lock().unwrap()[range].copy_from_slice(data);
        Ok(())
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        if !self.fallocate || (mode != FALLOC_PUNCH_HOLE && mode != FALLOC_ZERO_RANGE) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        // Like a filesystem: byte granular.
        self.bytes.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn sync(&self, _datasync: bool) -> io::Result<()> {
        if self.fail_sync.swap(false, Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

/// A zero-filled strict device of `size` bytes requiring `align`-aligned
/// I/O; `fallocate` says whether it supports PUNCH_HOLE and ZERO_RANGE.
pub(super) fn device(size: usize, align: u64, fallocate: bool) -> Device<StrictIo> {
    let raw = StrictIo {
        bytes: Mutex::new(vec![0; size]),
        align,
        fallocate,
        fail_sync: AtomicBool::new(false),
        fail_io: AtomicI32::new(0),
        null: File::open("/dev/null").expect("open /dev/null"),
    };
    let info = BackingInfo {
        path: PathBuf::from("strict"),
        kind: BackingKind::File,
        size: size as u64,
        block_size: align as u32,
        direct_io: true,
        read_only: false,
        engine: "strict",
    };
    Device::new(raw, info, align, align as usize)
}
