//! What the log's records point into: a disk of the group as both sites
//! know it ([`Disk`]: id, name, size) and a byte range of one ([`Extent`]).
//! Every crate that speaks of these uses these types: the tracker's disks
//! file, the wire's hello, the replica store; the wire's resync lists, the
//! replica store's pending resyncs, the shipper's digest comparison.
//! Formats that carry one encode its fields themselves, in their own
//! layout.

use crate::DiskId;
use tidemark_names::Name;

/// A disk of the group as both sites know it: what the shipper announces
/// and the replica store keeps an image of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Its id within the group (the `disk` of its records).
    pub id: DiskId,
    /// Its name on the protected host: the receiver files the replica under
    /// it (failover makes `DIR/NAME.img` of it).
    pub name: Name,
    /// Its size in bytes.
    pub size: u64,
}

/// A byte range of one disk of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    /// The disk's id (the `disk` of its records).
    pub disk: DiskId,
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}
