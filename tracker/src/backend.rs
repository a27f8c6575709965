//! The line between the NBD server shell and what it serves: the shell
//! parses requests, validates them against the export and sends replies;
//! a [`Backend`] performs them. The tracker's consistency group is the real
//! backend; tests also use an in-memory one.
//!
//! Requests reaching a backend are already validated (in range, within the
//! maximum block size, flags allowed). A backend call returns only when the
//! operation is complete in the sense the protocol promises: for writes,
//! applied to the backing device *and* recorded in the change log; for
//! FLUSH and FUA, durable.

use crate::nbd::constants::Errno;
use crate::nbd::export::ExportInfo;
use crate::nbd::transmission::BlockStatusExtent;

/// Everything the NBD server needs from the disks it serves.
pub trait Backend: Send + Sync + 'static {
    /// The exports, in a stable order; the index is the disk id used below.
    fn exports(&self) -> Vec<ExportInfo>;

    /// Whether FLUSH on one connection makes writes acknowledged on every
    /// connection to the same export durable (NBD `CAN_MULTI_CONN`).
    fn multi_conn_safe(&self) -> bool;

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, disk: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno>;

    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, disk: u32, offset: u64, data: &[u8], fua: bool) -> Result<(), Errno>;

    /// Makes `offset..offset+length` read as zeroes. `no_hole`: the client
    /// asked that the space stay allocated.
    fn write_zeroes(
        &self,
        disk: u32,
        offset: u64,
        length: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), Errno>;

    /// Discards `offset..offset+length`; it reads as zeroes afterwards
    /// (a defined result, so the replica can match it).
    fn trim(&self, disk: u32, offset: u64, length: u64, fua: bool) -> Result<(), Errno>;

    /// A barrier: every write acknowledged before it, on any connection,
    /// is durable when this returns.
    fn flush(&self, disk: u32) -> Result<(), Errno>;

    /// Allocation status (`base:allocation`) of `offset..offset+length`:
    /// extents in order, covering at least the first byte. Reporting the
    /// whole range as allocated data is always correct.
    fn block_status(
        &self,
        disk: u32,
        offset: u64,
        length: u32,
    ) -> Result<Vec<BlockStatusExtent>, Errno>;
}
