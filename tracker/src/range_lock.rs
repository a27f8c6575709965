//! Serializes overlapping requests in flight (DESIGN invariant 6): a write
//! holds its byte range from before its sequence number is taken until its
//! data is on the backing device, so overlapping writes reach the device in
//! the same order as they appear in the log.

use std::sync::{Condvar, Mutex};

/// Byte-range locks of one disk. In-flight requests are few (bounded by the
/// server's queue depth), so a list is faster than a tree.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    released: Condvar,
}

/// A held range; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: u64,
}

impl RangeLock {
    /// An unlocked disk.
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    /// Waits until no held range overlaps `offset..offset+len`, then holds
    /// it. Waiters are not ordered among themselves: two requests that
    /// overlap and are both in flight may go in either order, as the block
    /// layer allows; what matters is that log and device see the same one.
    pub fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let end = offset.saturating_add(len.max(1));
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.iter().any(|&(s, e, _)| s < end && offset < e) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        static TICKETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let ticket = TICKETS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        held.push((offset, end, ticket));
        RangeGuard { lock: self, ticket }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|&(_, _, t)| t != self.ticket);
        drop(held);
        self.lock.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_exclude_each_other_and_disjoint_ones_do_not() {
        let lock = Arc::new(RangeLock::new());
        let inside = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (lock, inside) = (lock.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        // Threads 0..4 overlap pairwise; 4..8 use their own ranges.
                        let offset = if i < 4 {
                            (i as u64) * 100
                        } else {
                            1 << (20 + i)
                        };
                        let _g = lock.lock(offset, 1500);
                        if i < 4 {
                            assert_eq!(
                                inside.fetch_add(1, Ordering::SeqCst),
                                0,
                                "overlap held twice"
                            );
                            std::thread::yield_now();
                            inside.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn adjacent_ranges_do_not_overlap() {
        let lock = RangeLock::new();
        let _a = lock.lock(0, 4096);
        let _b = lock.lock(4096, 4096);
    }
}
