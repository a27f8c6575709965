//! The line between a frontend (the NBD server, the ublk queue) and what
//! it serves, in storage terms: disks ([`ServedDisk`], holding the shared
//! [`Disk`]), addressed by [`DiskId`], byte ranges, a storage error
//! ([`BackendError`]) and the allocation of a range ([`Allocation`]). The
//! NBD shell translates: an error to its `Errno`, an allocation to
//! `base:allocation` flags; the ublk shell an error to a negative errno. The tracker's consistency group is the real backend; a
//! test failover's overlay and tests' in-memory disks are others.
//!
//! Requests reaching a backend are already validated (in range, within the
//! maximum request size, flags allowed). A backend call returns only when
//! the operation is complete in the sense the frontend promises: for
//! writes, applied to the backing device *and* recorded in the change log;
//! for FLUSH and FUA, durable.

use std::io;

use tidemark_changelog::{Disk, DiskId, Extent};
use tidemark_durable::AllocationRun;

use crate::nbd::export::BlockSizes;

/// A disk as a backend serves it: the disk of the group and what a
/// frontend may do with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServedDisk {
    /// The disk: its id (stable, not its place in [`Backend::disks`]), name and size.
    pub disk: Disk,
    /// The name a client asks for (the tracker's configured export name,
    /// by default the disk's name).
    pub export: String,
    /// Human-readable description; may be empty.
    pub description: String,
    /// Changes are refused ([`BackendError::ReadOnly`]).
    pub read_only: bool,
    /// Request sizes the backend performs: the smallest addressable unit,
    /// the size that avoids read-modify-write, the largest request.
    pub block_sizes: BlockSizes,
}

/// Why a backend could not perform a request; the queue core
/// ([`crate::queue`]) carries it to the shell, which tells its client
/// through one mapping: the NBD shell
/// [`Errno::of_backend`](crate::nbd::constants::Errno::of_backend), the
/// ublk shell a negative errno (`errno_of` in its queue).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No disk with this id (the client's mistake).
    #[error("no disk {0}")]
    NoSuchDisk(DiskId),
    /// The range is outside the disk (the client's mistake).
    #[error("{length} bytes at offset {offset} are outside the disk")]
    OutOfRange {
        /// First byte.
        offset: u64,
        /// Bytes.
        length: u64,
    },
    /// The backing storage is full (local disk).
    #[error("no space left on the backing storage")]
    NoSpace(#[source] io::Error),
    /// A change reached a read-only disk (the client's mistake, or the
    /// configuration's).
    #[error("the disk is read-only")]
    ReadOnly,
    /// The backend is not serving changes: it is starting, or stopped
    /// after a failure it cannot recover from (local).
    #[error("the disk is not accepting changes")]
    Unavailable,
    /// The tracker's backing device failed the request (local disk).
    #[error("the backing device failed")]
    Device(#[source] crate::storage::StorageError),
    /// Any other storage failed the request (local disk).
    #[error("I/O failed")]
    Io(#[source] io::Error),
}

impl From<crate::storage::StorageError> for BackendError {
    fn from(error: crate::storage::StorageError) -> Self {
        BackendError::Device(error)
    }
}

impl From<io::Error> for BackendError {
    /// A full disk is [`BackendError::NoSpace`]; anything else
    /// [`BackendError::Io`].
    fn from(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
                BackendError::NoSpace(error)
            }
            _ => BackendError::Io(error),
        }
    }
}

/// What a range of a disk holds, as far as the backend knows without
/// reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocationKind {
    /// Allocated, may hold anything. Always a correct answer.
    Data,
    /// Allocated, reads as zeroes.
    Zero,
    /// Not allocated; reads as zeroes.
    Hole,
}

/// A run of a disk with one [`AllocationKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The run.
    pub extent: Extent,
    /// What it holds.
    pub kind: AllocationKind,
}

/// Everything a frontend needs from the disks it serves.
pub trait Backend: Send + Sync + 'static {
    /// The disks, in a stable order, each with its own [`DiskId`].
    fn disks(&self) -> Vec<ServedDisk>;

    /// Whether a flush on one queue (connection) makes writes completed on
    /// every queue to the same disk durable (NBD `CAN_MULTI_CONN`).
    fn multi_conn_safe(&self) -> bool;

    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;

    /// Writes `data` at `offset`; with `fua`, durable before returning.
    fn write(&self, disk: DiskId, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;

    /// Makes `offset..offset+length` read as zeroes. `no_hole`: the client
    /// asked that the space stay allocated.
    fn write_zeroes(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), BackendError>;

    /// Discards `offset..offset+length`; it reads as zeroes afterwards
    /// (a defined result, so the replica can match it).
    fn trim(&self, disk: DiskId, offset: u64, length: u64, fua: bool) -> Result<(), BackendError>;

    /// A barrier: every write acknowledged before it, on any queue, is
    /// durable when this returns.
    fn flush(&self, disk: DiskId) -> Result<(), BackendError>;

    /// The allocation of `offset..offset+length`: runs in order from
    /// `offset`, covering at least its first byte and none past the end.
    /// One [`AllocationKind::Data`] run for the whole range is always
    /// correct; a run reported as zeroes must read as zeroes for every
    /// write acknowledged before the call.
    fn allocation(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Allocation>, BackendError>;
}

/// `offset..offset+length` of `disk` as one [`AllocationKind::Data`] run:
/// the answer of a backend that cannot tell.
pub fn all_data(disk: DiskId, offset: u64, length: u64) -> Vec<Allocation> {
    vec![Allocation {
        extent: Extent {
            disk,
            offset,
            length,
        },
        kind: AllocationKind::Data,
    }]
}

/// The data and holes of a file (or of anything that reports its
/// allocation as [`AllocationRun`]s) as runs of `disk`.
pub fn from_runs(disk: DiskId, runs: Vec<AllocationRun>) -> Vec<Allocation> {
    runs.into_iter()
        .map(|run| Allocation {
            extent: Extent {
                disk,
                offset: run.offset,
                length: run.length,
            },
            kind: if run.data {
                AllocationKind::Data
            } else {
                AllocationKind::Hole
            },
        })
        .collect()
}
