//! A memory device that fails writes and flushes with a kernel errno while
//! told to: the device failures the group and the event loop must answer.

use std::sync::atomic::{AtomicI32, Ordering};

use tidemark_tracker::storage::{BackingInfo, BlockDevice, MemoryDevice, Op, StorageError};

/// A memory device whose writes and flushes fail with `errno` while it is
/// not 0 (reads, trims and write-zeroes always succeed).
pub(crate) struct FailingDevice {
    inner: MemoryDevice,
    /// The kernel's errno the device fails with; 0: healthy. A test may
    /// change it at any time.
    pub(crate) errno: AtomicI32,
}

impl FailingDevice {
    /// `size` bytes, failing with `errno` (0: healthy).
    pub(crate) fn new(size: u64, errno: i32) -> FailingDevice {
        FailingDevice {
            inner: MemoryDevice::new(size),
            errno: AtomicI32::new(errno),
        }
    }

    fn failure(&self) -> Option<std::io::Error> {
        match self.errno.load(Ordering::SeqCst) {
            0 => None,
            errno => Some(std::io::Error::from_raw_os_error(errno)),
        }
    }
}

impl BlockDevice for FailingDevice {
    fn info(&self) -> &BackingInfo {
        self.inner.info()
    }
    fn supports_holes(&self) -> bool {
        self.inner.supports_holes()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StorageError> {
        match self.failure() {
            Some(source) => Err(StorageError::Io {
                op: Op::Write,
                offset,
                len: data.len() as u64,
                source,
            }),
            None => self.inner.write_at(data, offset),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.inner.write_zeroes(offset, len)
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.inner.trim(offset, len)
    }
    fn flush(&self) -> Result<(), StorageError> {
        match self.failure() {
            Some(source) => Err(StorageError::Flush { source }),
            None => self.inner.flush(),
        }
    }
}
