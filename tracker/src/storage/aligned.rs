//! Memory aligned for direct I/O, a pool that reuses it, and the arithmetic
//! that widens a byte range to whole logical blocks.
//!
//! O_DIRECT wants the buffer address, the file offset and the length to be
//! multiples of the device's alignment. Requests that are not get served
//! through a bounce buffer from [`BouncePool`]; the pool keeps buffers so that
//! the steady state allocates nothing per request.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock, PoisonError};

/// Alignment of every buffer this module allocates: a page, which satisfies
/// every logical block size up to 4 KiB and every DMA alignment seen in
/// practice.
pub const PAGE_ALIGN: usize = 4096;

/// Size of one bounce buffer; requests wider than this are served in
/// chunks. A multiple of every alignment we accept (≤ 64 KiB).
pub(crate) const BOUNCE_CHUNK: usize = 1 << 20;

/// Free bounce buffers kept for reuse; more concurrent requests than this
/// allocate and free their buffer.
const POOL_KEEP: usize = 32;

/// A zero-initialised heap buffer whose start is aligned for direct I/O.
///
/// Owns its memory like a `Vec<u8>` of fixed length. The NBD layer can read
/// request payloads into one so that aligned requests reach the device
/// without a copy.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Vec<u8>`); there is
// no shared interior state, so moving it to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]`, which is `Sync`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zero bytes starting at an address that is a multiple
    /// of `align`.
    ///
    /// # Panics
    ///
    /// If `align` is not a power of two, or `len` rounded up to `align`
    /// overflows `isize`. Aborts (like `Vec`) if memory is exhausted.
    pub fn zeroed(len: usize, align: usize) -> AlignedBuf {
        // A zero-sized layout may not be passed to the allocator; allocate one
        // alignment unit instead and expose an empty slice.
        let layout = Layout::from_size_align(len.max(align), align)
            .expect("alignment must be a power of two and the size must fit isize");
        // SAFETY: `layout` has a non-zero size (at least `align` ≥ 1).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// Allocates `len` zero bytes aligned to [`PAGE_ALIGN`].
    pub fn page_aligned(len: usize) -> AlignedBuf {
        AlignedBuf::zeroed(len, PAGE_ALIGN)
    }

    /// The alignment the buffer was allocated with.
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// The most bytes the buffer can hold ([`set_len`](Self::set_len)).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// Makes the buffer `len` bytes long, within its capacity (a fixed
    /// buffer lent out for a shorter request). False, and unchanged, when
    /// `len` exceeds the capacity.
    pub fn set_len(&mut self, len: usize) -> bool {
        if len > self.capacity() {
            return false;
        }
        // Every byte up to the capacity was zeroed at allocation, so the
        // longer slice is initialised too.
        self.len = len;
        true
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of at least `len` initialised
        // (zeroed) bytes that lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with exactly `layout`
        // and has not been freed.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .finish_non_exhaustive()
    }
}

/// A pool of [`BOUNCE_CHUNK`]-sized aligned buffers.
#[derive(Debug)]
pub(crate) struct BouncePool {
    align: usize,
    free: Mutex<Vec<AlignedBuf>>,
}

impl BouncePool {
    pub(crate) fn new(align: usize) -> BouncePool {
        BouncePool {
            align: align.max(PAGE_ALIGN),
            free: Mutex::new(Vec::with_capacity(POOL_KEEP)),
        }
    }

    /// A buffer of [`BOUNCE_CHUNK`] bytes with unspecified contents, returned
    /// to the pool when the guard drops.
    pub(crate) fn get(&self) -> PooledBuf<'_> {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        PooledBuf {
            buf: Some(reused.unwrap_or_else(|| AlignedBuf::zeroed(BOUNCE_CHUNK, self.align))),
            pool: self,
        }
    }
}

/// A bounce buffer on loan from a [`BouncePool`].
pub(crate) struct PooledBuf<'a> {
    buf: Option<AlignedBuf>,
    pool: &'a BouncePool,
}

impl Deref for PooledBuf<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl DerefMut for PooledBuf<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for PooledBuf<'_> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            let mut free = self
                .pool
                .free
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if free.len() < POOL_KEEP {
                free.push(buf);
            }
        }
    }
}

/// [`BOUNCE_CHUNK`] zero bytes, page aligned, shared by every device: the
/// source of writes that fill a range with zeroes.
pub(crate) fn zero_chunk() -> &'static [u8] {
    static ZEROES: OnceLock<AlignedBuf> = OnceLock::new();
    ZEROES.get_or_init(|| AlignedBuf::page_aligned(BOUNCE_CHUNK))
}

/// Rounds `x` down to a multiple of `align` (a power of two).
pub(crate) fn align_down(x: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    x & !(align - 1)
}

/// Rounds `x` up to a multiple of `align` (a power of two). Callers only pass
/// offsets within a device, far below `u64::MAX`.
pub(crate) fn align_up(x: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (x + (align - 1)) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_shortens_and_lengthens_within_its_capacity() {
        let mut buf = AlignedBuf::page_aligned(8192);
        buf[8191] = 7;
        assert!(buf.set_len(4096));
        assert_eq!(buf.len(), 4096);
        assert!(!buf.set_len(8193));
        assert_eq!(buf.len(), 4096);
        assert!(buf.set_len(buf.capacity()));
        assert_eq!((buf.len(), buf[8191]), (8192, 7));
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        for align in [512, 4096, 65536] {
            let buf = AlignedBuf::zeroed(3 * align + 17, align);
            assert_eq!(buf.as_ptr() as usize % align, 0);
            assert_eq!(buf.len(), 3 * align + 17);
            assert!(buf.iter().all(|&b| b == 0));
        }
        let empty = AlignedBuf::page_aligned(0);
        assert!(empty.is_empty());
    }

    #[test]
    fn pool_reuses_buffers() {
        let pool = BouncePool::new(512);
        let first = pool.get().as_ptr();
        let second = pool.get().as_ptr();
        assert_eq!(first, second);
        let a = pool.get();
        let b = pool.get();
        assert_ne!(a.as_ptr(), b.as_ptr());
        assert_eq!(a.len(), BOUNCE_CHUNK);
        assert_eq!(a.as_ptr() as usize % PAGE_ALIGN, 0);
    }

    #[test]
    fn rounding() {
        assert_eq!(align_down(4095, 4096), 0);
        assert_eq!(align_down(4096, 4096), 4096);
        assert_eq!(align_up(1, 512), 512);
        assert_eq!(align_up(512, 512), 512);
        assert_eq!(align_up(0, 512), 0);
        assert_eq!(align_up(7, 1), 7);
    }
}
