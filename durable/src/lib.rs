//! Everything Tidemark keeps on a local filesystem goes through this crate:
//! one narrow storage seam, so every durable file is created private, made
//! durable the same way, and can be run on a crash-simulating directory in
//! tests.
//!
//! - [`dir`]: the narrow file interface ([`LogDir`], [`LogFile`]), a real
//!   directory ([`FsDir`]) and a simulated one that keeps what was written
//!   apart from what is durable ([`SimDir`]); how private files (0600) and
//!   directories (0700) are created.
//! - [`replace`](mod@replace): replacing a small file atomically, durably
//!   or not.
//! - [`zero`]: making a range of a file read as zeroes (a hole or an
//!   allocated range, written zeroes where the filesystem has neither).
//! - [`aligned`]: buffers aligned for direct I/O.
//! - [`lock`]: one process per directory ([`DirLock`]).

pub mod aligned;
pub mod dir;
pub mod lock;
pub mod replace;
pub mod zero;

pub use dir::{create_private_dir_all, private_file, FsDir, LogDir, LogFile, SimDir};
pub use lock::{DirLock, LockError};
pub use replace::{replace, Durability, ReplaceError};
pub use zero::{allocation_runs, zero_range, AllocationRun, Zeroes};
