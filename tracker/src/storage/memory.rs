//! An in-memory [`BlockDevice`] for tests of the layers above storage (NBD,
//! write path): same bounds checks and errors as the real engines, no disk.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use super::{BackingInfo, BackingKind, BlockDevice, Op, StorageError};

/// A device held in a `Vec<u8>`. Flush does nothing; nothing is durable.
/// The vector is its backing: [`MemoryDevice::extend_backing`] grows it as
/// an admin grows an image, and [`BlockDevice::grow_to`] serves it.
#[derive(Debug)]
pub struct MemoryDevice {
    info: BackingInfo,
    bytes: RwLock<Vec<u8>>,
    size: AtomicU64,
}

impl MemoryDevice {
    /// A zero-filled device of `size` bytes.
    ///
    /// # Panics
    ///
    /// If `size` does not fit in memory's address space.
    pub fn new(size: u64) -> MemoryDevice {
        let len = usize::try_from(size).expect("memory device larger than the address space");
        MemoryDevice {
            info: BackingInfo {
                path: PathBuf::from("memory"),
                kind: BackingKind::Memory,
                size,
                block_size: 512,
                direct_io: false,
                read_only: false,
                engine: "memory",
            },
            bytes: RwLock::new(vec![0; len]),
            size: AtomicU64::new(size),
        }
    }

    /// Grows the backing to `size` bytes (zeroes), as `truncate` grows an
    /// image; the size served stays until [`BlockDevice::grow_to`].
    ///
    /// # Panics
    ///
    /// If `size` does not fit in memory's address space.
    pub fn extend_backing(&self, size: u64) {
        let len = usize::try_from(size).expect("memory device larger than the address space");
        let mut bytes = self.bytes.write().unwrap_or_else(PoisonError::into_inner);
        if len > bytes.len() {
            bytes.resize(len, 0);
        }
    }

    /// A copy of the whole device.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Bounds-checks a request and returns it as a `usize` range.
    fn range(&self, op: Op, offset: u64, len: u64) -> Result<std::ops::Range<usize>, StorageError> {
        let size = self.size();
        let out_of_range = || StorageError::OutOfRange {
            op,
            offset,
            len,
            size,
        };
        let end = offset.checked_add(len).ok_or_else(out_of_range)?;
        if end > size {
            return Err(out_of_range());
        }
        // Both fit: they are at most `size`, which fits `usize`.
        Ok(offset as usize..end as usize)
    }

    fn fill_zero(&self, op: Op, offset: u64, len: u64) -> Result<(), StorageError> {
        let range = self.range(op, offset, len)?;
        self.bytes.write().unwrap_or_else(PoisonError::into_inner)[range].fill(0);
        Ok(())
    }
}

impl BlockDevice for MemoryDevice {
    fn info(&self) -> &BackingInfo {
        &self.info
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn backing_size(&self) -> Result<u64, StorageError> {
        Ok(self
            .bytes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len() as u64)
    }

    fn grow_to(&self, size: u64) -> Result<(), StorageError> {
        let backing = self.backing_size()?;
        if size > backing {
            return Err(StorageError::GrowBeyond {
                path: self.info.path.clone(),
                size,
                backing,
            });
        }
        self.size.fetch_max(size, Ordering::AcqRel);
        Ok(())
    }

    fn supports_holes(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let range = self.range(Op::Read, offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.bytes.read().unwrap_or_else(PoisonError::into_inner)[range]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StorageError> {
        let range = self.range(Op::Write, offset, data.len() as u64)?;
        self.bytes.write().unwrap_or_else(PoisonError::into_inner)[range].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.fill_zero(Op::WriteZeroes, offset, len)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.fill_zero(Op::Trim, offset, len)
    }

    fn flush(&self) -> Result<(), StorageError> {
        Ok(())
    }
}
