//! What the log's records point into: a byte range of one disk of the
//! group ([`Extent`]). Every crate that speaks of such a range (the
//! tracker's hot extents, the wire's resync lists, the replica store's
//! pending resyncs, the shipper's digest comparison) uses this one type;
//! formats that carry one encode its fields themselves, in their own
//! layout.

/// A byte range of one disk of the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Extent {
    /// The disk's id (the `disk` of its records).
    pub disk: u32,
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

