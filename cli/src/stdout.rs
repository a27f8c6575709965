//! Standard output that its reader may close.
//!
//! `println!` and `print!` in this crate are the macros of `main.rs` that
//! write through [`write()`], not std's: std's panic ("failed printing to
//! stdout: Broken pipe") when the reader has gone away, as in `tidemark
//! points … | head -1` (the Rust runtime ignores SIGPIPE, so the write
//! fails with EPIPE instead of ending the process). Here the first failed
//! write ends the command's output: it and everything after it are
//! dropped, while the command goes on with its work — a failover is not
//! cut short because nobody reads its progress. A reader that went away is
//! not an error; any other failure to write is, once the work is done
//! ([`failure`]).

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Set at the first failed write; nothing is written after it.
static CLOSED: AtomicBool = AtomicBool::new(false);
/// The first failure other than a reader that went away.
static FAILURE: Mutex<Option<io::Error>> = Mutex::new(None);

/// Writes `args` to standard output, unless an earlier write failed.
pub(crate) fn write(args: fmt::Arguments<'_>) {
    if CLOSED.load(Ordering::Relaxed) {
        return;
    }
    // Stdout is line-buffered: a whole line reaches the pipe (or fails)
    // here, not later.
    if let Err(e) = io::stdout().lock().write_fmt(args) {
        CLOSED.store(true, Ordering::Relaxed);
        if e.kind() != io::ErrorKind::BrokenPipe {
            FAILURE
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
        }
    }
}

/// The first failure to write other than EPIPE, if there was one.
pub(crate) fn failure() -> Option<io::Error> {
    FAILURE.lock().unwrap_or_else(|p| p.into_inner()).take()
}
