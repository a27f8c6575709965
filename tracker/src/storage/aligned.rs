//! Memory aligned for direct I/O, a pool that reuses it, and the arithmetic
//! that widens a byte range to whole logical blocks.
//!
//! O_DIRECT wants the buffer address, the file offset and the length to be
//! multiples of the device's alignment. Requests that are not get served
//! through a bounce buffer from [`BouncePool`]; the pool keeps buffers so that
//! the steady state allocates nothing per request.

use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, OnceLock, PoisonError};

pub use tidemark_durable::aligned::{AlignedBuf, PAGE_ALIGN};

/// Size of one bounce buffer; requests wider than this are served in
/// chunks. A multiple of every alignment we accept (≤ 64 KiB).
pub(crate) const BOUNCE_CHUNK: usize = 1 << 20;

/// Free bounce buffers kept for reuse; more concurrent requests than this
/// allocate and free their buffer.
const POOL_KEEP: usize = 32;

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
