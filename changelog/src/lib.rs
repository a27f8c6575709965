//! The Tidemark change log: one ordered, checksummed log of every
//! acknowledged write of a consistency group. It is the contract between the
//! tracker, which appends to it in the I/O path, and the shipper, which
//! drains it to the receiver.
//!
//! - [`record`]: the record format (byte diagram there) and its codec.
//! - [`segment`]: the segment files the log is made of, and their scan.
//! - [`log`]: the appending side: recovery, group commit, roll, recycling,
//!   overflow.
//! - [`reader`]: reading in order and tailing without polling.
//! - [`cursor`]: the receiver's durable position, which frees segments.
//! - [`disk`]: a disk of the group ([`Disk`]) and a byte range of one
//!   ([`Extent`]).
//! - [`ids`]: the typed ids every record carries ([`DiskId`], [`Seq`]).
//! - [`sources`]: the group's disks and their backing paths, for the
//!   shipper.
//! - [`check`](mod@check) and [`replay`]: the inspection tools' logic.
//! - [`storage`] and [`lock`]: the storage seam the log runs on, from
//!   `tidemark-durable` (re-exported under the names this crate always
//!   had).

pub mod check;
pub mod cursor;
pub mod disk;
pub mod ids;
pub mod log;
pub mod reader;
pub mod record;
pub mod replay;
pub mod sealed;
pub mod segment;
pub mod sources;

pub use tidemark_durable::dir as storage;
pub use tidemark_durable::lock;

pub use check::{check, CheckReport};
pub use cursor::{read_cursor, write_cursor};
pub use disk::{Disk, Extent};
pub use ids::{DiskId, Seq};
pub use lock::{DirLock, LockError};
pub use log::{
    AppendError, ChangeLog, Cut, LogDamage, LogIo, LogOptions, OpenError, Recovery, RecoveryPolicy,
};
pub use reader::{LogReader, LogWatcher, ReadError};
pub use record::{Entry, Header, Kind, Record, RecordRef};
pub use sources::{read_sources, write_sources, DiskSource};
pub use storage::{create_private_dir_all, private_file, FsDir, LogDir, LogFile, SimDir};

/// Nanoseconds since the Unix epoch, for record timestamps.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The bytes hex digits stand for: tests pin formats byte for byte with it.
#[cfg(test)]
pub(crate) fn from_hex(digits: &str) -> Vec<u8> {
    (0..digits.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).expect("hex digits"))
        .collect()
}
