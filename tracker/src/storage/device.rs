//! What every engine shares: opening and probing the backing path, bounds
//! checks, the direct-I/O alignment rules (bounce buffers, read-modify-write
//! of partial blocks) and the zeroing policy of invariant 7.
//!
//! An engine only supplies [`RawIo`]: read, write, fallocate and sync on
//! requests that already satisfy the alignment rules. Everything above that
//! line is written once, here, and so is exercised identically by the
//! io_uring engine and by its synchronous oracle.

use std::cmp::{max, min};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use super::aligned::{align_down, align_up, zero_chunk, AlignedBuf, BouncePool, BOUNCE_CHUNK};
use super::{BackingInfo, BackingKind, BackingOptions, BlockDevice, DirectIo, Op, StorageError};

/// Largest direct-I/O alignment we accept; larger ones (not seen on real
/// devices) fall back to buffered I/O.
const MAX_DIRECT_ALIGN: u64 = 64 * 1024;

/// Linux `fallocate(2)` modes used here.
pub(crate) const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub(crate) const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

/// The primitive operations an engine performs on the open backing file.
///
/// The [`Device`] above guarantees that, when the file is open with
/// O_DIRECT, every `read_exact_at` / `write_all_at` buffer address, offset and
/// length is a multiple of the direct-I/O alignment, and that requests lie
/// within the device.
pub(crate) trait RawIo: Send + Sync {
    /// The open backing file (for ioctls the engine does not route itself).
    fn file(&self) -> &File;
    /// Fills `buf` from `offset`, resuming after short reads; end of file
    /// before `buf` is full is `UnexpectedEof`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `data` at `offset`, resuming after short writes.
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// `fallocate(2)` with `mode` over `[offset, offset + len)`.
    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()>;
    /// `fdatasync(2)` when `datasync`, `fsync(2)` otherwise.
    fn sync(&self, datasync: bool) -> io::Result<()>;
}

/// A backing file opened and probed, before an engine takes it over.
#[derive(Debug)]
pub(crate) struct Opened {
    pub(crate) file: File,
    pub(crate) info: BackingInfo,
    /// Alignment of offsets and lengths under O_DIRECT; 1 when buffered.
    pub(crate) direct_align: u64,
    /// Alignment of buffer addresses under O_DIRECT; 1 when buffered.
    pub(crate) mem_align: usize,
}

// Block-device ioctls (linux/fs.h). BLKSSZGET takes an `int *` although it
// is declared `_IO`, hence the `_bad` form.
mod ioctl {
    nix::ioctl_read!(
        #[allow(unreachable_pub)]
        blkgetsize64,
        0x12,
        114,
        u64
    );
    nix::ioctl_read_bad!(
        #[allow(unreachable_pub)]
        blksszget,
        nix::request_code_none!(0x12, 104),
        libc::c_int
    );
    nix::ioctl_write_ptr_bad!(
        #[allow(unreachable_pub)]
        blkzeroout,
        nix::request_code_none!(0x12, 127),
        [u64; 2]
    );
}

/// The size of the block device or regular file at `path`
/// (`BLKGETSIZE64` for a block device), without opening it for I/O.
pub fn backing_size(path: &Path) -> io::Result<u64> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        block_device_size(&file)
    } else {
        Ok(meta.len())
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live local; the fd is open for the duration of the call.
    unsafe { ioctl::blkgetsize64(file.as_raw_fd(), &mut size) }?;
    Ok(size)
}

fn block_device_logical_block_size(file: &File) -> io::Result<u64> {
    let mut lbs: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a
    // live local; the fd is open for the duration of the call.
    unsafe { ioctl::blksszget(file.as_raw_fd(), &mut lbs) }?;
    u64::try_from(lbs).map_err(|_| io::Error::other("negative logical block size"))
}

/// `BLKZEROOUT`: the kernel zeroes the range with the device's WRITE ZEROES
/// command (without unmapping) or, if it has none, by writing zero pages. It
/// guarantees zeroes on read-back whatever the device, which a discard does
/// not. Also drops the page cache of the range.
pub(crate) fn block_device_zero_out(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let range = [offset, len];
    loop {
        // SAFETY: BLKZEROOUT reads two u64 from the pointer, which points to a
        // live local array; the fd is open for the duration of the call.
        match unsafe { ioctl::blkzeroout(file.as_raw_fd(), &range) } {
            Err(nix::errno::Errno::EINTR) => continue,
            other => return other.map(drop).map_err(io::Error::from),
        }
    }
}

/// What `statx(STATX_DIOALIGN)` reports for a regular file.
enum DioSupport {
    /// The filesystem does not say (old kernel or filesystem).
    Unknown,
    /// The filesystem says O_DIRECT is not supported on this file.
    Unsupported,
    /// Required alignment of offsets/lengths and of buffer addresses.
    Aligned { offset: u64, mem: u64 },
}

fn statx_dio_align(file: &File) -> DioSupport {
    // SAFETY: `statx` is plain old data; all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string, AT_EMPTY_PATH makes statx use the
    // open fd, and `stx` is a live, writable statx buffer.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return DioSupport::Unknown;
    }
    if stx.stx_dio_offset_align == 0 {
        return DioSupport::Unsupported;
    }
    DioSupport::Aligned {
        offset: u64::from(stx.stx_dio_offset_align),
        mem: u64::from(stx.stx_dio_mem_align.max(1)),
    }
}

/// Opens `path`, learns its kind, size and block size, and switches on
/// O_DIRECT if the options ask for it and the device allows it.
pub(crate) fn open_and_probe(
    path: &Path,
    options: &BackingOptions,
    engine: &'static str,
) -> Result<Opened, StorageError> {
    let open_error = |source| StorageError::Open {
        path: path.to_path_buf(),
        source,
    };
    // A writable block device is opened O_EXCL: while the tracker serves it,
    // nobody may mount it or open it exclusively, since a write that
    // bypassed the tracker would never reach the change log. (O_EXCL without
    // O_CREAT means this only for block devices, hence the stat first.)
    let is_block = std::fs::metadata(path)
        .map_err(open_error)?
        .file_type()
        .is_block_device();
    let exclusive = if is_block && !options.read_only {
        libc::O_EXCL
    } else {
        0
    };
    // Opened buffered first: whether O_DIRECT is possible depends on what the
    // path turns out to be, and fcntl(F_SETFL) can switch it on afterwards.
    let open = |flags| {
        OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(libc::O_CLOEXEC | flags)
            .open(path)
    };
    let file = match open(exclusive) {
        // The disk's own Tidemark map (`tidemark protect`) holds it: that
        // map is how the disk is used, and the live splice points it at
        // this tracker, so sharing the disk with it is the design, not a
        // bypass (crate::splice).
        Err(e) if exclusive != 0 && e.raw_os_error() == Some(libc::EBUSY) => {
            let id =
                crate::dm::DevId::from_dev_t(std::fs::metadata(path).map_err(open_error)?.rdev());
            match crate::splice::held_by_map(id) {
                Some(map) => {
                    tracing::info!(path = %path.display(), %map, "the disk is held by its tidemark map: opened without O_EXCL, for the live splice");
                    open(0).map_err(open_error)?
                }
                None => return Err(open_error(e)),
            }
        }
        other => other.map_err(open_error)?,
    };
    let meta = file.metadata().map_err(open_error)?;
    let file_type = meta.file_type();

    // `block_size` is the preferred request granularity (see BackingInfo);
    // for block devices it is also the logical block size, which zeroing
    // relies on.
    let (kind, size, block_size, dio) = if file_type.is_block_device() {
        let size = block_device_size(&file).map_err(open_error)?;
        let lbs = block_device_logical_block_size(&file).map_err(open_error)?;
        let dio = DioSupport::Aligned {
            offset: lbs,
            mem: lbs,
        };
        (BackingKind::BlockDevice, size, lbs, dio)
    } else if file_type.is_file() {
        let dio = statx_dio_align(&file);
        // Without statx's answer, the filesystem block size is a safe
        // alignment: it is a multiple of the underlying logical block size.
        let fs_block = meta.blksize().clamp(512, MAX_DIRECT_ALIGN);
        (BackingKind::File, meta.len(), fs_block, dio)
    } else {
        return Err(StorageError::UnsupportedKind {
            path: path.to_path_buf(),
        });
    };
    if i64::try_from(size).is_err() {
        return Err(open_error(io::Error::other("device size exceeds off_t")));
    }

    let mut opened = Opened {
        file,
        info: BackingInfo {
            path: path.to_path_buf(),
            kind,
            size,
            block_size: u32::try_from(block_size).unwrap_or(u32::MAX),
            direct_io: false,
            read_only: options.read_only,
            engine,
        },
        direct_align: 1,
        mem_align: 1,
    };
    if options.direct_io == DirectIo::Off {
        return Ok(opened);
    }
    match enable_direct_io(&opened.file, kind, size, block_size, &dio) {
        Ok((align, mem)) => {
            opened.info.direct_io = true;
            let preferred = max(align, block_size);
            opened.info.block_size = u32::try_from(preferred).unwrap_or(u32::MAX);
            opened.direct_align = align;
            opened.mem_align = usize::try_from(mem).unwrap_or(usize::MAX);
        }
        Err(reason) if options.direct_io == DirectIo::Required => {
            return Err(StorageError::DirectIoUnavailable {
                path: path.to_path_buf(),
                reason: reason.to_string(),
            });
        }
        Err(reason) => {
            tracing::warn!(
                path = %path.display(),
                %reason,
                "O_DIRECT unavailable, using buffered I/O; data reaches the disk only at flush"
            );
        }
    }
    Ok(opened)
}

/// Why O_DIRECT cannot be used on a backing file (it then stays buffered).
/// The cause is part of the message: the reason travels as text in
/// [`StorageError::DirectIoUnavailable`] and in a warning.
#[derive(Debug, thiserror::Error)]
enum NoDirectIo {
    /// The filesystem said it cannot (statx).
    #[error("the filesystem does not support O_DIRECT on this file")]
    Unsupported,
    /// The alignment it asks for is not one the tracker can use.
    #[error("unusable direct I/O alignment (offset {align}, memory {mem})")]
    Alignment { align: u64, mem: u64 },
    /// The last block could not be written without growing the file.
    #[error("size {size} is not a multiple of the direct I/O alignment {align}")]
    Size { size: u64, align: u64 },
    /// The file's flags could not be read.
    #[error("F_GETFL: {0}")]
    GetFlags(nix::Error),
    /// The kernel refused to set O_DIRECT (tmpfs before 6.6, some FUSE
    /// and network filesystems).
    #[error("the kernel refused O_DIRECT: {0}")]
    Refused(nix::Error),
    /// The aligned probe read failed.
    #[error("an aligned O_DIRECT probe read failed: {0}")]
    Probe(io::Error),
}

/// Switches O_DIRECT on and proves it with an aligned read of the first block.
/// Returns the offset and memory alignment, or why it cannot be used (the
/// file is then left buffered).
fn enable_direct_io(
    file: &File,
    kind: BackingKind,
    size: u64,
    fallback_align: u64,
    dio: &DioSupport,
) -> Result<(u64, u64), NoDirectIo> {
    let (align, mem) = match (kind, dio) {
        (_, DioSupport::Unsupported) => return Err(NoDirectIo::Unsupported),
        (_, DioSupport::Aligned { offset, mem }) => (*offset, *mem),
        (_, DioSupport::Unknown) => (fallback_align, fallback_align),
    };
    if !align.is_power_of_two() || align > MAX_DIRECT_ALIGN || !mem.is_power_of_two() {
        return Err(NoDirectIo::Alignment { align, mem });
    }
    // A file whose size is not a multiple of the alignment cannot be written
    // at its last block with O_DIRECT without growing it.
    if !size.is_multiple_of(align) {
        return Err(NoDirectIo::Size { size, align });
    }
    let flags = fcntl(file.as_fd(), FcntlArg::F_GETFL).map_err(NoDirectIo::GetFlags)?;
    let direct = OFlag::from_bits_retain(flags) | OFlag::O_DIRECT;
    // tmpfs before Linux 6.6, some FUSE and network filesystems refuse here.
    fcntl(file.as_fd(), FcntlArg::F_SETFL(direct)).map_err(NoDirectIo::Refused)?;
    if size >= align {
        let mut probe = AlignedBuf::zeroed(align as usize, max(mem as usize, 512));
        let probed = loop {
            match file.read_at(&mut probe, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        if let Err(e) = probed {
            let _ = fcntl(
                file.as_fd(),
                FcntlArg::F_SETFL(OFlag::from_bits_retain(flags)),
            );
            return Err(NoDirectIo::Probe(e));
        }
    }
    Ok((align, mem))
}

/// Striped locks over logical blocks.
///
/// Under O_DIRECT a write that covers only part of a block is a
/// read-modify-write of the whole block. Two such writes to disjoint bytes of
/// the same block would lose one another's update, although the write path's
/// range lock (invariant 6) rightly lets them run concurrently since they do
/// not overlap. Every operation that modifies part of a block therefore holds
/// the stripe of that block for its duration. Whole-block writes need no
/// stripe: anything they race with overlaps them byte for byte, which the
/// range lock above us already serialises.
#[derive(Debug)]
struct EdgeLocks {
    stripes: Box<[Mutex<()>]>,
}

const EDGE_STRIPES: usize = 64;

struct EdgeGuard<'a> {
    _first: Option<MutexGuard<'a, ()>>,
    _second: Option<MutexGuard<'a, ()>>,
}

impl EdgeLocks {
    fn new() -> EdgeLocks {
        EdgeLocks {
            stripes: (0..EDGE_STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Locks the stripes of the partially covered first and last block of
    /// `[offset, offset + len)`, in stripe order so that two requests can
    /// never deadlock.
    fn lock(&self, offset: u64, len: u64, align: u64) -> EdgeGuard<'_> {
        let end = offset + len;
        let head = (!offset.is_multiple_of(align)).then(|| offset / align);
        let tail = (!end.is_multiple_of(align)).then(|| end / align);
        let stripe = |block: u64| (block % EDGE_STRIPES as u64) as usize;
        let mut wanted = [head.map(stripe), tail.map(stripe)];
        wanted.sort_unstable();
        let [a, b] = wanted;
        let b = if a == b { None } else { b };
        let lock = |i: Option<usize>| {
            i.map(|i| {
                self.stripes[i]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
            })
        };
        let first = lock(a);
        let second = lock(b);
        EdgeGuard {
            _first: first,
            _second: second,
        }
    }
}

/// A backing device served through an engine's [`RawIo`].
#[derive(Debug)]
pub(crate) struct Device<R> {
    raw: R,
    info: BackingInfo,
    /// Offset/length alignment under O_DIRECT; 1 when buffered, which turns
    /// every request into an "aligned" one.
    align: u64,
    /// Buffer address alignment under O_DIRECT; 1 when buffered.
    mem_align: usize,
    bounce: BouncePool,
    edges: EdgeLocks,
    /// Cleared the first time the filesystem refuses ZERO_RANGE.
    zero_range: AtomicBool,
    /// Cleared the first time the filesystem or device refuses PUNCH_HOLE.
    punch_hole: AtomicBool,
    /// Set by a failed flush; see [`StorageError::Poisoned`].
    poisoned: AtomicBool,
    /// The size served (see [`BlockDevice::size`]); grows, never shrinks.
    size: AtomicU64,
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}

impl<R: RawIo> Device<R> {
    pub(crate) fn new(
        raw: R,
        opened_info: BackingInfo,
        direct_align: u64,
        mem_align: usize,
    ) -> Self {
        Device {
            raw,
            align: direct_align.max(1),
            mem_align: mem_align.max(1),
            bounce: BouncePool::new(max(direct_align as usize, mem_align)),
            edges: EdgeLocks::new(),
            zero_range: AtomicBool::new(true),
            punch_hole: AtomicBool::new(true),
            poisoned: AtomicBool::new(false),
            size: AtomicU64::new(opened_info.size),
            info: opened_info,
        }
    }

    pub(crate) fn raw(&self) -> &R {
        &self.raw
    }

    fn check(&self, op: Op, offset: u64, len: u64) -> Result<(), StorageError> {
        if op.modifies() && self.info.read_only {
            return Err(StorageError::ReadOnly { op });
        }
        let size = self.size.load(Ordering::Acquire);
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(StorageError::OutOfRange {
                op,
                offset,
                len,
                size,
            }),
        }
    }

    fn is_aligned(&self, offset: u64, len: u64, addr: *const u8) -> bool {
        offset.is_multiple_of(self.align)
            && len.is_multiple_of(self.align)
            && (addr as usize).is_multiple_of(self.mem_align)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        if self.is_aligned(offset, len, buf.as_ptr()) {
            return self.raw.read_exact_at(buf, offset);
        }
        let end = offset + len;
        let mut bounce = self.bounce.get();
        let mut pos = align_down(offset, self.align);
        let stop = align_up(end, self.align);
        while pos < stop {
            let chunk = min(stop - pos, bounce.len() as u64);
            self.raw.read_exact_at(&mut bounce[..chunk as usize], pos)?;
            let from = max(pos, offset);
            let to = min(pos + chunk, end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&bounce[(from - pos) as usize..(to - pos) as usize]);
            pos += chunk;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. Partial blocks at the edges are
    /// read-modify-written under their edge stripes.
    fn write(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let len = data.len() as u64;
        if self.is_aligned(offset, len, data.as_ptr()) {
            return self.raw.write_all_at(data, offset);
        }
        let _edges = self.edges.lock(offset, len, self.align);
        let end = offset + len;
        let start = align_down(offset, self.align);
        let stop = align_up(end, self.align);
        let mut bounce = self.bounce.get();
        let mut pos = start;
        while pos < stop {
            let chunk = min(stop - pos, bounce.len() as u64);
            let chunk_end = pos + chunk;
            let block = self.align as usize;
            // The old contents of partially covered edge blocks.
            let head_partial = pos == start && offset != start;
            let tail_partial = chunk_end == stop && end != stop;
            if head_partial {
                self.raw.read_exact_at(&mut bounce[..block], pos)?;
            }
            if tail_partial && !(head_partial && chunk as usize == block) {
                let at = chunk as usize - block;
                self.raw
                    .read_exact_at(&mut bounce[at..chunk as usize], chunk_end - self.align)?;
            }
            let from = max(pos, offset);
            let to = min(chunk_end, end);
            bounce[(from - pos) as usize..(to - pos) as usize]
                .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
            self.raw.write_all_at(&bounce[..chunk as usize], pos)?;
            pos = chunk_end;
        }
        Ok(())
    }

    /// Writes zero bytes over the range through the ordinary write path.
    fn fill_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = zero_chunk();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            // Chunks end on BOUNCE_CHUNK boundaries, so every chunk but the
            // first and last is aligned and written without a bounce.
            let boundary = align_down(pos, BOUNCE_CHUNK as u64) + BOUNCE_CHUNK as u64;
            let chunk_end = min(boundary, end);
            self.write(&zeroes[..(chunk_end - pos) as usize], pos)?;
            pos = chunk_end;
        }
        Ok(())
    }

    /// One of the byte-granular fallocate modes on a regular file, with the
    /// partial edge blocks locked against our own read-modify-writes.
    /// `Ok(false)` means the filesystem does not support the mode.
    fn fallocate_file(
        &self,
        mode: i32,
        offset: u64,
        len: u64,
        flag: &AtomicBool,
    ) -> io::Result<bool> {
        if !flag.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let _edges = (self.align > 1).then(|| self.edges.lock(offset, len, self.align));
        match self.raw.fallocate(mode, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                if flag.swap(false, Ordering::Relaxed) {
                    let what = if mode == FALLOC_PUNCH_HOLE {
                        "PUNCH_HOLE"
                    } else {
                        "ZERO_RANGE"
                    };
                    tracing::warn!(
                        path = %self.info.path.display(),
                        mode = what,
                        "fallocate mode unsupported; writing zeroes instead"
                    );
                }
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Zeroes a range of a block device. The whole logical blocks inside are
    /// zeroed by the kernel (`unmap`: try PUNCH_HOLE first, which may also
    /// deallocate); the partial blocks at the edges are written.
    fn zero_block_device(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let lbs = u64::from(self.info.block_size).max(self.align).max(512);
        let end = offset + len;
        let inner_start = align_up(offset, lbs);
        let inner_end = align_down(end, lbs);
        if inner_start >= inner_end {
            return self.fill_zeroes(offset, len);
        }
        let inner_len = inner_end - inner_start;
        // fallocate(PUNCH_HOLE) on a block device is the kernel's
        // "zero, and unmap if you can, but never fall back to writing"
        // (BLKDEV_ZERO_NOFALLBACK): it succeeds only where the device
        // guarantees zeroes, so trim frees space where possible and stays
        // defined everywhere. BLKDISCARD is never used: after a discard the
        // device may return old data or garbage (discard_zeroes_data is gone
        // from the kernel), and the replica would then differ.
        let punched = unmap
            && self.punch_hole.load(Ordering::Relaxed)
            && match self
                .raw
                .fallocate(FALLOC_PUNCH_HOLE, inner_start, inner_len)
            {
                Ok(()) => true,
                Err(e) if unsupported(&e) => {
                    if self.punch_hole.swap(false, Ordering::Relaxed) {
                        tracing::info!(
                            path = %self.info.path.display(),
                            "device cannot zero-and-unmap; trim falls back to BLKZEROOUT"
                        );
                    }
                    false
                }
                Err(e) => return Err(e),
            };
        if !punched {
            block_device_zero_out(self.raw.file(), inner_start, inner_len)?;
        }
        if offset < inner_start {
            self.fill_zeroes(offset, inner_start - offset)?;
        }
        if inner_end < end {
            self.fill_zeroes(inner_end, end - inner_end)?;
        }
        Ok(())
    }

    fn write_zeroes_inner(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.info.kind {
            BackingKind::BlockDevice => self.zero_block_device(offset, len, false),
            _ => {
                if self.fallocate_file(FALLOC_ZERO_RANGE, offset, len, &self.zero_range)? {
                    Ok(())
                } else {
                    self.fill_zeroes(offset, len)
                }
            }
        }
    }

    fn trim_inner(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.info.kind {
            BackingKind::BlockDevice => self.zero_block_device(offset, len, true),
            _ => {
                if self.fallocate_file(FALLOC_PUNCH_HOLE, offset, len, &self.punch_hole)? {
                    Ok(())
                } else {
                    self.write_zeroes_inner(offset, len)
                }
            }
        }
    }
}

impl<R: RawIo> BlockDevice for Device<R> {
    fn info(&self) -> &BackingInfo {
        &self.info
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn backing_size(&self) -> Result<u64, StorageError> {
        let measured = match self.info.kind {
            BackingKind::BlockDevice => block_device_size(self.raw.file()),
            _ => self.raw.file().metadata().map(|m| m.len()),
        };
        measured.map_err(|source| StorageError::Measure {
            path: self.info.path.clone(),
            source,
        })
    }

    fn grow_to(&self, size: u64) -> Result<(), StorageError> {
        if size <= self.size() {
            return Ok(());
        }
        // The rule the open checked for O_DIRECT holds for the new end too.
        if !size.is_multiple_of(self.align) {
            return Err(StorageError::GrowUnaligned {
                path: self.info.path.clone(),
                size,
                align: self.align,
            });
        }
        let backing = self.backing_size()?;
        if size > backing || i64::try_from(size).is_err() {
            return Err(StorageError::GrowBeyond {
                path: self.info.path.clone(),
                size,
                backing,
            });
        }
        self.size.fetch_max(size, Ordering::AcqRel);
        Ok(())
    }

    fn raw_access(&self) -> Option<super::RawAccess<'_>> {
        if self.info.read_only {
            return None;
        }
        Some(super::RawAccess {
            fd: self.raw.file().as_fd(),
            align: self.align,
            mem_align: self.mem_align,
            datasync: self.info.kind != BackingKind::BlockDevice,
            poisoned: &self.poisoned,
            path: &self.info.path,
        })
    }

    fn supports_holes(&self) -> bool {
        self.info.kind == BackingKind::File && self.punch_hole.load(Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let len = buf.len() as u64;
        self.check(Op::Read, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.read(buf, offset).map_err(|source| StorageError::Io {
            op: Op::Read,
            offset,
            len,
            source,
        })
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StorageError> {
        let len = data.len() as u64;
        self.check(Op::Write, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.write(data, offset).map_err(|source| StorageError::Io {
            op: Op::Write,
            offset,
            len,
            source,
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check(Op::WriteZeroes, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.write_zeroes_inner(offset, len)
            .map_err(|source| StorageError::Io {
                op: Op::WriteZeroes,
                offset,
                len,
                source,
            })
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.check(Op::Trim, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.trim_inner(offset, len)
            .map_err(|source| StorageError::Io {
                op: Op::Trim,
                offset,
                len,
                source,
            })
    }

    fn flush(&self) -> Result<(), StorageError> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(StorageError::Poisoned);
        }
        // Block devices have no metadata to skip; fsync is what blkdev
        // implements for both calls.
        let datasync = self.info.kind != BackingKind::BlockDevice;
        self.raw.sync(datasync).map_err(|source| {
            self.poisoned.store(true, Ordering::Release);
            tracing::error!(
                path = %self.info.path.display(),
                error = %source,
                "flush of the backing device failed; refusing all further flushes"
            );
            StorageError::Flush { source }
        })
    }
}

/// Implements [`BlockDevice`] for an engine newtype by delegating to its
/// `dev: Device<_>` field.
macro_rules! delegate_block_device {
    ($engine:ty) => {
        impl $crate::storage::BlockDevice for $engine {
            fn info(&self) -> &$crate::storage::BackingInfo {
                self.dev.info()
            }
            fn supports_holes(&self) -> bool {
                self.dev.supports_holes()
            }
            fn read_at(
                &self,
                buf: &mut [u8],
                offset: u64,
            ) -> Result<(), $crate::storage::StorageError> {
                self.dev.read_at(buf, offset)
            }
            fn write_at(
                &self,
                data: &[u8],
                offset: u64,
            ) -> Result<(), $crate::storage::StorageError> {
                self.dev.write_at(data, offset)
            }
            fn write_zeroes(
                &self,
                offset: u64,
                len: u64,
            ) -> Result<(), $crate::storage::StorageError> {
                self.dev.write_zeroes(offset, len)
            }
            fn trim(&self, offset: u64, len: u64) -> Result<(), $crate::storage::StorageError> {
                self.dev.trim(offset, len)
            }
            fn flush(&self) -> Result<(), $crate::storage::StorageError> {
                self.dev.flush()
            }
            fn raw_access(&self) -> Option<$crate::storage::RawAccess<'_>> {
                self.dev.raw_access()
            }
            fn size(&self) -> u64 {
                self.dev.size()
            }
            fn backing_size(&self) -> Result<u64, $crate::storage::StorageError> {
                self.dev.backing_size()
            }
            fn grow_to(&self, size: u64) -> Result<(), $crate::storage::StorageError> {
                self.dev.grow_to(size)
            }
        }
    };
}
pub(crate) use delegate_block_device;
