//! The group's lock hierarchy: every mutex of the write path has a
//! [`Level`], and a thread takes them only in increasing level. Debug
//! builds (every test) check it on every lock: taking a lock whose level
//! is not above every level the thread already holds panics, naming both,
//! so an inversion is found by any test that reaches it, not by the rare
//! run that deadlocks.
//!
//! The order, and why:
//!
//! 1. [`Level::Persist`] serializes writing the maps' bytes with their
//!    fdatasync; it is held across that I/O, so it comes first and
//!    nothing below it waits on I/O while holding a lock.
//! 2. [`Level::Mode`]: data or bitmap mode. Held while dirty bits are set
//!    and while data mode returns, so a change of mode cannot miss a
//!    write.
//! 3. [`Level::Maps`]: the activity and dirty maps.
//! 4. [`Level::Log`]: the change log (sequence numbers, its buffer).
//! 5. [`Level::PendingGeneration`]: a generation to begin when data mode
//!    returns.
//! 6. [`Level::State`]: the state file; written under it, taken last.
//!
//! The committer's own lock (what callers want of it) and the queues'
//! waker lists are leaves: no lock above is taken while holding them
//! (`crate::commit`, `crate::queue`).

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};
use std::sync::{Mutex, MutexGuard};

/// A lock's place in the hierarchy (see the [module documentation](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Level {
    Persist = 1,
    Mode,
    Maps,
    Log,
    PendingGeneration,
    State,
}

thread_local! {
    /// The levels this thread holds, in the order taken.
    static HELD: RefCell<Vec<Level>> = const { RefCell::new(Vec::new()) };
}

/// A mutex with a place in the hierarchy.
#[derive(Debug)]
pub(crate) struct Ordered<T> {
    level: Level,
    inner: Mutex<T>,
}

/// The guard of an [`Ordered`] lock.
pub(crate) struct OrderedGuard<'a, T> {
    guard: MutexGuard<'a, T>,
    level: Level,
}

impl<T> Ordered<T> {
    pub(crate) fn new(level: Level, value: T) -> Self {
        Ordered {
            level,
            inner: Mutex::new(value),
        }
    }

    /// Takes the lock. In debug builds, panics if the thread holds a lock
    /// of this level or a later one.
    pub(crate) fn lock(&self) -> OrderedGuard<'_, T> {
        if cfg!(debug_assertions) {
            HELD.with(|held| {
                let mut held = held.borrow_mut();
                if let Some(top) = held.iter().max() {
                    assert!(
                        self.level > *top,
                        "lock order: {:?} taken while holding {:?} (held: {:?})",
                        self.level,
                        top,
                        held
                    );
                }
                held.push(self.level);
            });
        }
        // Every critical section leaves its data consistent before
        // anything that can panic, so a poisoned lock's data is still good.
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        OrderedGuard {
            guard,
            level: self.level,
        }
    }
}

impl<T> Drop for OrderedGuard<'_, T> {
    fn drop(&mut self) {
        if cfg!(debug_assertions) {
            let level = self.level;
            // `try_with`: a guard dropped while the thread ends.
            let _ = HELD.try_with(|held| {
                let mut held = held.borrow_mut();
                if let Some(at) = held.iter().rposition(|&l| l == level) {
                    held.remove(at);
                }
            });
        }
    }
}

impl<T> Deref for OrderedGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for OrderedGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_in_increasing_level_are_taken_and_released() {
        let mode = Ordered::new(Level::Mode, 1);
        let maps = Ordered::new(Level::Maps, 2);
        let log = Ordered::new(Level::Log, 3);
        {
            let a = mode.lock();
            let b = maps.lock();
            let c = log.lock();
            assert_eq!(*a + *b + *c, 6);
        }
        // Released: the lower level may be taken again, and then the higher.
        let _b = maps.lock();
        let _c = log.lock();
    }

    #[test]
    fn a_guard_dropped_out_of_order_leaves_the_rest_held() {
        let mode = Ordered::new(Level::Mode, ());
        let maps = Ordered::new(Level::Maps, ());
        let state = Ordered::new(Level::State, ());
        let a = mode.lock();
        let b = maps.lock();
        drop(a);
        // Maps is still held: state (above it) is fine.
        let _c = state.lock();
        drop(b);
    }

    #[test]
    #[cfg(debug_assertions)]
    #[should_panic(expected = "lock order: Mode taken while holding Maps")]
    fn an_inversion_panics_in_debug_builds() {
        let mode = Ordered::new(Level::Mode, ());
        let maps = Ordered::new(Level::Maps, ());
        let _b = maps.lock();
        let _a = mode.lock();
    }
}
