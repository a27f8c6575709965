//! An in-memory [`BlockDevice`] for tests of the layers above storage (NBD,
//! write path): same bounds checks and errors as the real engines, no disk.

use std::path::PathBuf;
use std::sync::{PoisonError, RwLock};

use super::{BackingInfo, BackingKind, BlockDevice, Op, StorageError};

/// A device held in a `Vec<u8>`. Flush does nothing; nothing is durable.
#[derive(Debug)]
pub struct MemoryDevice {
    info: BackingInfo,
    bytes: RwLock<Vec<u8>>,
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
        let out_of_range = || StorageError::OutOfRange {
            op,
            offset,
            len,
            size: self.info.size,
        };
        let end = offset.checked_add(len).ok_or_else(out_of_range)?;
        if end > self.info.size {
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
