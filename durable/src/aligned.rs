//! Heap memory aligned for direct I/O (`O_DIRECT` wants the buffer
//! address, the file offset and the length to be multiples of the device's
//! alignment): the tracker's bounce buffers and the shipper's reads of a
//! protected disk both use [`AlignedBuf`].

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every buffer [`AlignedBuf::page_aligned`] allocates: a page, which satisfies
/// every logical block size up to 4 KiB and every DMA alignment seen in
/// practice.
pub const PAGE_ALIGN: usize = 4096;

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
}
