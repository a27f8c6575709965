//! Serializes overlapping requests in flight (DESIGN invariant 6): a write
//! holds its byte range from before its sequence number is taken until its
//! data is on the backing device, so overlapping writes reach the device in
//! the same order as they appear in the log.
//!
//! The lock is a list of held ranges, not a mutex held across the I/O: an
//! event loop [tries](RangeLock::try_lock) to take a range and, when it
//! overlaps one held, parks the request (not the thread) and tries again
//! when it is woken; [`unlock`](RangeLock::unlock) says whether anybody
//! parked since, so the caller knows to wake them. Threads that may block
//! (the synchronous engine, the oracle) [`lock`](RangeLock::lock) and wait
//! on a condition variable instead. The mutex inside is held only to look
//! at the list, never across I/O.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Byte-range locks of one disk. In-flight requests are few (bounded by the
/// queue depths), so a list is faster than a tree.
#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<Held>,
    released: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    /// `(start, end, ticket)` of every held range.
    ranges: Vec<(u64, u64, u64)>,
    next_ticket: u64,
    /// Threads blocked in [`RangeLock::lock`].
    blocked: usize,
    /// A [`RangeLock::try_lock`] failed since the last unlock.
    parked: bool,
}

/// A range held by [`RangeLock::try_lock`]; give it back with
/// [`RangeLock::unlock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a held range must be unlocked"]
pub struct RangeTicket(u64);

/// A range held by [`RangeLock::lock`]; released on drop.
#[derive(Debug)]
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    ticket: RangeTicket,
}

impl RangeLock {
    /// An unlocked disk.
    pub fn new() -> RangeLock {
        RangeLock::default()
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // The list is consistent between statements: a panic elsewhere
        // leaves nothing half-done here.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `offset..offset+len` if no held range overlaps it. On failure
    /// the lock remembers that somebody is waiting, and the next
    /// [`unlock`](Self::unlock) says so. Waiters are not ordered among
    /// themselves: two requests that overlap and are both in flight may go
    /// in either order, as the block layer allows; what matters is that log
    /// and device see the same one.
    pub fn try_lock(&self, offset: u64, len: u64) -> Option<RangeTicket> {
        let mut held = self.held();
        let taken = Self::take(&mut held, offset, len);
        if taken.is_none() {
            held.parked = true;
        }
        taken
    }

    fn take(held: &mut Held, offset: u64, len: u64) -> Option<RangeTicket> {
        let end = offset.saturating_add(len.max(1));
        if held.ranges.iter().any(|&(s, e, _)| s < end && offset < e) {
            return None;
        }
        let ticket = held.next_ticket;
        held.next_ticket += 1;
        held.ranges.push((offset, end, ticket));
        Some(RangeTicket(ticket))
    }

    /// Gives a range back. Returns whether a [`try_lock`](Self::try_lock)
    /// failed since the last unlock: then the caller wakes the parked
    /// requests so that they try again.
    pub fn unlock(&self, ticket: RangeTicket) -> bool {
        let mut held = self.held();
        held.ranges.retain(|&(_, _, t)| t != ticket.0);
        let parked = std::mem::take(&mut held.parked);
        let blocked = held.blocked > 0;
        drop(held);
        if blocked {
            self.released.notify_all();
        }
        parked
    }

    /// Waits until no held range overlaps `offset..offset+len`, then holds
    /// it (for threads that may block).
    pub fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let mut held = self.held();
        loop {
            if let Some(ticket) = Self::take(&mut held, offset, len) {
                return RangeGuard { lock: self, ticket };
            }
            held.blocked += 1;
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
            held.blocked -= 1;
        }
    }

    /// Ranges held now (for tests and status).
    pub fn held_count(&self) -> usize {
        self.held().ranges.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        // A parked event-loop request is woken by the group's wake-up of
        // parked queues, which the synchronous path triggers after it
        // releases (see `Group::release`); this guard only frees the range.
        let _ = self.lock.unlock(self.ticket);
    }
}

impl RangeGuard<'_> {
    /// The ticket this guard holds.
    pub fn ticket(&self) -> RangeTicket {
        self.ticket
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

    #[test]
    fn a_failed_try_parks_and_the_next_unlock_says_so() {
        let lock = RangeLock::new();
        let a = lock.try_lock(0, 8192).unwrap();
        let b = lock.try_lock(8192, 4096).unwrap();
        assert_eq!(lock.try_lock(4096, 4096), None, "overlaps a");
        // Nobody waited for b's range, but somebody did since the last
        // unlock: the first unlock reports the parked request, once.
        assert!(lock.unlock(b));
        assert_eq!(lock.try_lock(100, 1), None);
        assert!(lock.unlock(a));
        assert!(!lock.unlock(lock.try_lock(4096, 4096).unwrap()));
        assert_eq!(lock.held_count(), 0);
    }

    #[test]
    fn a_blocked_thread_goes_on_when_an_event_loop_unlocks() {
        let lock = Arc::new(RangeLock::new());
        let ticket = lock.try_lock(0, 4096).unwrap();
        let waiter = {
            let lock = lock.clone();
            std::thread::spawn(move || {
                let _g = lock.lock(1000, 10);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished());
        lock.unlock(ticket);
        waiter.join().unwrap();
    }
}
