//! The tracker's backing device: the disk (or image file) that protected
//! writes land on before they are acknowledged.
//!
//! This module owns every byte of I/O to that device. Callers see one narrow
//! trait, [`BlockDevice`]; behind it sit interchangeable engines:
//!
//! - [`UringEngine`] — the production engine: io_uring, driven by one
//!   dedicated submission thread that batches requests from all connection
//!   threads (see [`uring`] for its design);
//! - [`SyncEngine`] — plain `pread` / `pwrite` / `fallocate` / `fdatasync`,
//!   kept as the oracle the io_uring engine is tested against, and as the
//!   fallback where io_uring is unavailable (old kernels, seccomp);
//! - [`MemoryDevice`] — a `Vec<u8>` for tests of the layers above.
//!
//! # Invariants this module keeps
//!
//! - **Defined zeroes (DESIGN, write path, invariant 7).** After
//!   [`BlockDevice::write_zeroes`] *and* after [`BlockDevice::trim`], the range
//!   reads as zeroes, on every kind of backing device, so that source and
//!   replica read the same bytes. Files use `fallocate` (ZERO_RANGE,
//!   PUNCH_HOLE) or write zeroes where the filesystem has neither. Block
//!   devices use `BLKZEROOUT`, or for trim `fallocate(PUNCH_HOLE)`, which the
//!   kernel only lets succeed where the device guarantees zeroes; never
//!   `BLKDISCARD`, whose read-back is undefined.
//! - **Any request shape works with O_DIRECT.** Offsets, lengths and buffers
//!   need no alignment: unaligned requests go through aligned bounce buffers,
//!   and partial blocks are read-modify-written under a per-block stripe
//!   lock, so two writes to disjoint bytes of one block never lose each
//!   other's update.
//! - **No panics on peer input.** A request outside the device is a typed
//!   [`StorageError::OutOfRange`], whatever its offset and length.
//! - **A failed flush is final.** The engine never retries an fsync; every
//!   later flush fails with [`StorageError::Poisoned`] (STYLE §11).

mod aligned;
mod device;
mod error;
mod memory;
mod sync;
pub mod uring;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use aligned::{AlignedBuf, PAGE_ALIGN};
pub use device::backing_size;
pub use error::{Op, StorageError};
pub use memory::MemoryDevice;
pub use sync::SyncEngine;
pub use uring::{UringEngine, UringStats};

/// The backing device as the tracker uses it.
///
/// All methods take `&self` and may be called from many threads at once.
/// Each call blocks until the kernel has completed it. Overlapping
/// concurrent modifications must be ordered by the caller (the write path's
/// range lock, DESIGN invariant 6); non-overlapping ones need no
/// coordination, even within one logical block.
pub trait BlockDevice: Send + Sync {
    /// What was opened, and how.
    fn info(&self) -> &BackingInfo;

    /// Size of the device in bytes, as served now: the size at open
    /// ([`BackingInfo::size`]) until [`grow_to`](BlockDevice::grow_to)
    /// publishes a larger one. Requests are bounds-checked against it.
    fn size(&self) -> u64 {
        self.info().size
    }

    /// The size the backing file or device measures now (the file's
    /// length, `BLKGETSIZE64`): larger than [`size`](BlockDevice::size)
    /// once the admin grew it while it is served. An engine that cannot
    /// grow answers its served size.
    fn backing_size(&self) -> Result<u64, StorageError> {
        Ok(self.size())
    }

    /// Serves `size` bytes from now on, bounds checks included; a size at
    /// or below the served one changes nothing (a device never shrinks
    /// while open). Refused beyond what the backing holds, and for an
    /// engine that cannot grow. The caller orders this after whatever
    /// must precede the first request beyond the old end (the tracker's
    /// grow record).
    fn grow_to(&self, size: u64) -> Result<(), StorageError> {
        if size <= self.size() {
            return Ok(());
        }
        Err(StorageError::GrowBeyond {
            path: self.info().path.clone(),
            size,
            backing: self.size(),
        })
    }

    /// Whether trimmed ranges may become holes that a block-status query
    /// (SEEK_HOLE) can report. True for regular files on filesystems that
    /// punch holes, false for block devices.
    fn supports_holes(&self) -> bool;

    /// Fills `buf` with the bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError>;

    /// Writes `data` at `offset`. Durable only after a later [`flush`].
    ///
    /// [`flush`]: BlockDevice::flush
    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StorageError>;

    /// Makes `[offset, offset + len)` read as zeroes, keeping the space
    /// allocated where the backend can (NBD's WRITE_ZEROES with NO_HOLE
    /// semantics; without NO_HOLE, the caller may use [`trim`] instead).
    ///
    /// [`trim`]: BlockDevice::trim
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError>;

    /// Releases `[offset, offset + len)` where the backend can, and in every
    /// case leaves it reading as zeroes (DESIGN invariant 7).
    fn trim(&self, offset: u64, len: u64) -> Result<(), StorageError>;

    /// Makes every modification that completed before this call durable.
    /// An error is fatal for the device (see [`StorageError::Poisoned`]).
    fn flush(&self) -> Result<(), StorageError>;

    /// The open file and its alignment rules, for an event loop that
    /// submits reads, writes and flushes itself (on its own io_uring)
    /// instead of calling the methods above; `None` where there is no file
    /// (memory). Requests that do not meet the alignment still go through
    /// the methods above, which bounce them.
    fn raw_access(&self) -> Option<RawAccess<'_>> {
        None
    }
}

/// A backing device's file as an event loop submits I/O to it directly
/// (see [`BlockDevice::raw_access`]).
#[derive(Debug, Clone, Copy)]
pub struct RawAccess<'a> {
    /// The open file.
    pub fd: std::os::fd::BorrowedFd<'a>,
    /// Offsets and lengths of reads and writes must be multiples of this
    /// (1 when the file is not open with O_DIRECT).
    pub align: u64,
    /// Buffer addresses must be multiples of this.
    pub mem_align: usize,
    /// A flush is `fdatasync` (files) rather than `fsync` (block devices).
    pub datasync: bool,
    /// Set by a failed flush: every later flush fails.
    poisoned: &'a std::sync::atomic::AtomicBool,
    path: &'a Path,
}

impl RawAccess<'_> {
    /// Whether a read or write of `len` bytes at `offset` from `addr` can
    /// be submitted as it is.
    pub fn fits(&self, offset: u64, len: u64, addr: *const u8) -> bool {
        offset.is_multiple_of(self.align)
            && len.is_multiple_of(self.align)
            && (addr as usize).is_multiple_of(self.mem_align)
    }

    /// Whether an earlier flush failed (a flush must then fail too:
    /// STYLE §11, never retry an fsync).
    pub fn flush_poisoned(&self) -> bool {
        self.poisoned.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records a failed flush: the device refuses every later one.
    pub fn flush_failed(&self, error: &std::io::Error) {
        self.poisoned
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::error!(
            path = %self.path.display(),
            %error,
            "flush of the backing device failed; refusing all further flushes"
        );
    }
}

/// What a [`BlockDevice`] is backed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    /// A regular file (disk image) on a filesystem.
    File,
    /// A block device node.
    BlockDevice,
    /// Memory ([`MemoryDevice`]).
    Memory,
}

/// Facts about an open backing device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingInfo {
    /// The path that was opened.
    pub path: PathBuf,
    /// Regular file, block device or memory.
    pub kind: BackingKind,
    /// Size in bytes at open: `BLKGETSIZE64` for block devices, the file
    /// length for files. The size served now is [`BlockDevice::size`],
    /// which grows with [`BlockDevice::grow_to`].
    pub size: u64,
    /// Preferred request granularity, what the NBD layer should advertise as
    /// its preferred block size: requests aligned to it are never
    /// read-modify-written, by this module or by the filesystem. The logical
    /// block size (`BLKSSZGET`) for block devices; for files the larger of
    /// the filesystem block size and the direct-I/O alignment.
    pub block_size: u32,
    /// Whether the device is open with O_DIRECT (bypassing the page cache).
    pub direct_io: bool,
    /// Whether the device was opened read-only.
    pub read_only: bool,
    /// Which engine serves it: `"io_uring"`, `"sync"` or `"memory"`.
    pub engine: &'static str,
}

/// Which engine [`open_backing`] should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// io_uring if the kernel allows it, else the synchronous engine (with a
    /// warning). The default.
    #[default]
    Auto,
    /// io_uring, or fail with [`StorageError::EngineUnavailable`].
    Uring,
    /// The synchronous engine.
    Sync,
}

/// Whether to bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// O_DIRECT where the device allows it; otherwise buffered I/O with a
    /// warning saying why. The default.
    #[default]
    Auto,
    /// O_DIRECT or fail with [`StorageError::DirectIoUnavailable`].
    Required,
    /// Buffered I/O through the page cache.
    Off,
}

/// How the tracker writes a backing device (the config's `cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// O_DIRECT: what completed is on the device (in its cache at most); a
    /// barrier flushes the device.
    None,
    /// Through the page cache; a barrier makes it durable with `fdatasync`.
    Writeback,
}

impl CacheMode {
    /// The mode a disk gets unless configured: none on a block device (the
    /// filesystem above it caches already), writeback on an image file.
    pub fn default_for(path: &Path) -> CacheMode {
        use std::os::unix::fs::FileTypeExt;
        let block = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device());
        if block {
            CacheMode::None
        } else {
            CacheMode::Writeback
        }
    }

    /// What the mode asks of the device's opening.
    pub fn direct_io(self) -> DirectIo {
        match self {
            CacheMode::None => DirectIo::Auto,
            CacheMode::Writeback => DirectIo::Off,
        }
    }

    /// `none` or `writeback`.
    pub fn name(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
        }
    }
}

/// How to open a backing device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingOptions {
    /// Engine choice. Default: [`EngineKind::Auto`].
    pub engine: EngineKind,
    /// Direct-I/O choice. Default: [`DirectIo::Auto`].
    pub direct_io: DirectIo,
    /// Open read-only; modifications fail with [`StorageError::ReadOnly`].
    /// Default: false.
    pub read_only: bool,
    /// io_uring only: how many requests may be in the kernel at once; more
    /// wait in a bounded queue. Default: 128.
    pub queue_depth: u32,
}

impl Default for BackingOptions {
    fn default() -> Self {
        BackingOptions {
            engine: EngineKind::Auto,
            direct_io: DirectIo::Auto,
            read_only: false,
            queue_depth: 128,
        }
    }
}

/// Opens the backing device at `path`: a block device (size by
/// `BLKGETSIZE64`, logical block size by `BLKSSZGET`) or a regular image file
/// (size from its metadata), with O_DIRECT where possible, served by the
/// engine the options select.
pub fn open_backing(
    path: &Path,
    options: &BackingOptions,
) -> Result<Arc<dyn BlockDevice>, StorageError> {
    let device: Arc<dyn BlockDevice> = match options.engine {
        EngineKind::Sync => Arc::new(SyncEngine::open(path, options)?),
        EngineKind::Uring => Arc::new(UringEngine::open(path, options)?),
        EngineKind::Auto => match UringEngine::open(path, options) {
            Ok(engine) => Arc::new(engine),
            Err(StorageError::EngineUnavailable { source }) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %source,
                    "io_uring unavailable, using the synchronous engine"
                );
                Arc::new(SyncEngine::open(path, options)?)
            }
            Err(e) => return Err(e),
        },
    };
    let info = device.info();
    tracing::info!(
        path = %info.path.display(),
        kind = ?info.kind,
        size = info.size,
        block_size = info.block_size,
        direct_io = info.direct_io,
        engine = info.engine,
        "backing device open"
    );
    Ok(device)
}
