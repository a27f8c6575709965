//! The seam between a store engine and a Ceph cluster: the object and image
//! operations the engine needs, as one trait ([`Cluster`]) with two
//! implementations, the real cluster (`RadosCluster`, feature `librados`) and
//! an in-memory simulation ([`crate::SimCluster`], always built) that crash
//! tests drive.
//!
//! A [`Cluster`] value is one client of the cluster bound to one pool and one
//! namespace (RADOS objects and RBD images share it). Every call blocks: call
//! it from a blocking thread, never from an async executor's worker.
//!
//! Semantics both implementations keep (and `tests/` checks on each):
//! - A [`WriteOp`] on one object is all-or-nothing and durable when
//!   [`Cluster::operate`] returns; its steps run in order and the first one
//!   that fails drops the whole operation.
//! - [`WriteStep::CmpXattr`] passes iff `value OP stored`, `stored` being
//!   the value before the operation; a missing attribute compares as the
//!   empty value (an `Eq` guard on it fails with [`CephError::Canceled`]).
//! - [`Cluster::xattrs`] also lists the lock class's own `lock.NAME`
//!   attributes: keep other attribute names out of `lock.`.
//! - Locks expire; renewing with [`Renew::Must`] an expired lock is
//!   [`CephError::NotFound`] even if nobody took it; locking a missing object
//!   creates it empty.
//! - A blocklisted client's every later call fails [`CephError::Blocklisted`].
//! - Image writes are durable only once [`ClusterImage::flush`] returns.

use crate::CephError;
use std::collections::BTreeMap;
use std::time::Duration;

/// How a [`WriteStep::CmpXattr`] compares its value with the stored one:
/// the step passes iff `value OP stored` (byte-wise, as strings; so numbers
/// are stored as fixed-width hex).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `value == stored`.
    Eq,
    /// `value != stored`.
    Ne,
    /// `value > stored`.
    Gt,
    /// `value >= stored`.
    Gte,
    /// `value < stored`.
    Lt,
    /// `value <= stored`.
    Lte,
}

impl CmpOp {
    /// Whether `value OP stored` holds.
    pub fn holds(self, value: &[u8], stored: &[u8]) -> bool {
        let ord = value.cmp(stored);
        match self {
            CmpOp::Eq => ord.is_eq(),
            CmpOp::Ne => ord.is_ne(),
            CmpOp::Gt => ord.is_gt(),
            CmpOp::Gte => ord.is_ge(),
            CmpOp::Lt => ord.is_lt(),
            CmpOp::Lte => ord.is_le(),
        }
    }
}

/// One step of a [`WriteOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteStep {
    /// Fail the operation ([`CephError::Busy`]) unless this client holds the
    /// exclusive lock `name` with `cookie` on the object, unexpired (a
    /// missing object: [`CephError::NotFound`]).
    AssertLocked {
        /// Lock name.
        name: String,
        /// Our cookie.
        cookie: String,
    },
    /// Fail the operation ([`CephError::Canceled`]) unless `value OP stored`
    /// for the attribute `name` (a missing attribute is the empty value, so
    /// `Eq` fails on it and `Ne`/`Gt` pass). `stored` is the
    /// value before this operation: earlier steps of the same operation do
    /// not count; a missing object fails it with [`CephError::NotFound`].
    CmpXattr {
        /// Attribute name.
        name: String,
        /// Comparison.
        op: CmpOp,
        /// The value compared.
        value: Vec<u8>,
    },
    /// Create the object; with `exclusive`, fail ([`CephError::Exists`]) if it exists.
    Create {
        /// Fail if the object exists.
        exclusive: bool,
    },
    /// Write `data` at `offset` (creating the object, growing it).
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Replace the object's data by `data`.
    WriteFull {
        /// The new data.
        data: Vec<u8>,
    },
    /// Set the object's size (a missing object stays missing).
    Truncate {
        /// New size.
        size: u64,
    },
    /// Zero a range inside the object; a range reaching the object's end
    /// truncates the object at `offset` instead (the OSD's rule); a missing
    /// object stays missing.
    Zero {
        /// Byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Set an extended attribute.
    SetXattr {
        /// Attribute name.
        name: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Remove the object (fail with [`CephError::NotFound`] if missing).
    /// Only as an operation's last step: what the OSD makes of steps after
    /// a remove in the same operation is not part of the seam.
    Remove,
    /// Set omap keys.
    OmapSet {
        /// Keys and values.
        entries: Vec<(String, Vec<u8>)>,
    },
    /// Remove omap keys (missing keys are fine; a missing object is [`CephError::NotFound`]).
    OmapRm {
        /// Keys.
        keys: Vec<String>,
    },
}

/// A compound write on one object, applied all-or-nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOp {
    /// The steps, applied in order.
    pub steps: Vec<WriteStep>,
}

impl WriteOp {
    /// An empty operation.
    pub fn new() -> WriteOp {
        WriteOp::default()
    }

    /// Adds [`WriteStep::AssertLocked`].
    pub fn assert_locked(mut self, name: &str, cookie: &str) -> WriteOp {
        self.steps.push(WriteStep::AssertLocked {
            name: name.into(),
            cookie: cookie.into(),
        });
        self
    }

    /// Adds [`WriteStep::CmpXattr`].
    pub fn cmp_xattr(mut self, name: &str, op: CmpOp, value: &[u8]) -> WriteOp {
        self.steps.push(WriteStep::CmpXattr {
            name: name.into(),
            op,
            value: value.to_vec(),
        });
        self
    }

    /// Adds [`WriteStep::Create`].
    pub fn create(mut self, exclusive: bool) -> WriteOp {
        self.steps.push(WriteStep::Create { exclusive });
        self
    }

    /// Adds [`WriteStep::Write`].
    pub fn write(mut self, offset: u64, data: &[u8]) -> WriteOp {
        self.steps.push(WriteStep::Write {
            offset,
            data: data.to_vec(),
        });
        self
    }

    /// Adds [`WriteStep::WriteFull`].
    pub fn write_full(mut self, data: &[u8]) -> WriteOp {
        self.steps.push(WriteStep::WriteFull {
            data: data.to_vec(),
        });
        self
    }

    /// Adds [`WriteStep::Truncate`].
    pub fn truncate(mut self, size: u64) -> WriteOp {
        self.steps.push(WriteStep::Truncate { size });
        self
    }

    /// Adds [`WriteStep::Zero`].
    pub fn zero(mut self, offset: u64, len: u64) -> WriteOp {
        self.steps.push(WriteStep::Zero { offset, len });
        self
    }

    /// Adds [`WriteStep::SetXattr`].
    pub fn set_xattr(mut self, name: &str, value: &[u8]) -> WriteOp {
        self.steps.push(WriteStep::SetXattr {
            name: name.into(),
            value: value.to_vec(),
        });
        self
    }

    /// Adds [`WriteStep::Remove`].
    pub fn remove(mut self) -> WriteOp {
        self.steps.push(WriteStep::Remove);
        self
    }

    /// Adds [`WriteStep::OmapSet`].
    pub fn omap_set(mut self, entries: Vec<(String, Vec<u8>)>) -> WriteOp {
        self.steps.push(WriteStep::OmapSet { entries });
        self
    }

    /// Adds [`WriteStep::OmapRm`].
    pub fn omap_rm(mut self, keys: Vec<String>) -> WriteOp {
        self.steps.push(WriteStep::OmapRm { keys });
        self
    }
}

/// How [`Cluster::lock_exclusive`] treats a lock this client already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renew {
    /// Take the lock; fail with [`CephError::Exists`] if it is already ours.
    No,
    /// Renew it if ours, else take it.
    May,
    /// Renew it only if it is still ours and unexpired, else fail with
    /// [`CephError::NotFound`] (expired) or [`CephError::Busy`].
    Must,
}

/// An exclusive lock request (the `lock` object class).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockRequest<'a> {
    /// Lock name (one object may carry several named locks).
    pub name: &'a str,
    /// Our cookie: tells this holder apart from other holders of the same client.
    pub cookie: &'a str,
    /// Free text kept with the lock (e.g. the holder's advertised address).
    pub desc: &'a str,
    /// How long the lock lasts unless renewed; zero: until unlocked.
    pub duration: Duration,
    /// Renewal mode.
    pub renew: Renew,
}

/// A holder of a lock, as [`Cluster::lockers`] lists it (expired ones included
/// until someone touches the lock).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    /// The holder's client entity, e.g. `client.4123`.
    pub client: String,
    /// The holder's cookie.
    pub cookie: String,
    /// The holder's client address: what [`Cluster::blocklist`] takes.
    pub addr: String,
}

/// One page of an object's omap.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OmapPage {
    /// Keys and values, in key order.
    pub entries: Vec<(String, Vec<u8>)>,
    /// Whether keys after the last one remain.
    pub more: bool,
}

/// An operation started asynchronously; its buffers stay owned until it ends.
pub trait Pending: Send {
    /// Waits for the operation; `Ok` means it is durable.
    fn wait(self) -> Result<(), CephError>;
}

/// A client of a Ceph cluster bound to one pool and namespace. See the
/// module documentation for the semantics both implementations keep.
pub trait Cluster: Send + Sync {
    /// An open RBD image.
    type Image: ClusterImage;
    /// An asynchronous object write.
    type Pending: Pending;

    /// Reads up to `len` bytes at `offset` (fewer at the object's end).
    fn read(&self, oid: &str, offset: u64, len: usize) -> Result<Vec<u8>, CephError>;
    /// The object's size.
    fn stat(&self, oid: &str) -> Result<u64, CephError>;
    /// Applies a compound write, all-or-nothing, durable on return.
    fn operate(&self, oid: &str, op: &WriteOp) -> Result<(), CephError>;
    /// Starts a compound write; [`Pending::wait`] reports its outcome. Writes
    /// of one client to one object apply in submission order; nothing
    /// orders two objects.
    fn operate_async(&self, oid: &str, op: &WriteOp) -> Result<Self::Pending, CephError>;
    /// The object's extended attributes.
    fn xattrs(&self, oid: &str) -> Result<BTreeMap<String, Vec<u8>>, CephError>;
    /// Up to `max` omap entries with keys after `after` (all with `None`).
    fn omap(&self, oid: &str, after: Option<&str>, max: u64) -> Result<OmapPage, CephError>;
    /// Takes or renews an exclusive lock on the object (creating it empty).
    fn lock_exclusive(&self, oid: &str, lock: &LockRequest<'_>) -> Result<(), CephError>;
    /// Releases our lock.
    fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), CephError>;
    /// Removes another holder's lock.
    fn break_lock(
        &self,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), CephError>;
    /// The holders of lock `name`.
    fn lockers(&self, oid: &str, name: &str) -> Result<Vec<Locker>, CephError>;
    /// Fences the client instance at `addr` out of the cluster for `expire`.
    fn blocklist(&self, addr: &str, expire: Duration) -> Result<(), CephError>;
    /// Waits until this client knows the newest OSD map (after a blocklist:
    /// from here the fenced client's operations are refused).
    fn wait_for_latest_osdmap(&self) -> Result<(), CephError>;
    /// This client instance's address, as lockers list it.
    fn my_addr(&self) -> Result<String, CephError>;

    /// Creates an image of `size` bytes.
    fn image_create(&self, name: &str, size: u64) -> Result<(), CephError>;
    /// Opens an image for reading and writing.
    fn image_open(&self, name: &str) -> Result<Self::Image, CephError>;
    /// Opens an image for reading only.
    fn image_open_read_only(&self, name: &str) -> Result<Self::Image, CephError>;
    /// Removes an image.
    fn image_remove(&self, name: &str) -> Result<(), CephError>;
    /// Snapshots `image` as `snap`, protects the snapshot and clones it as
    /// `clone` (a writable image sharing the snapshot's data).
    fn snap_protect_clone(&self, image: &str, snap: &str, clone: &str) -> Result<(), CephError>;
    /// The images cloned from any snapshot of `image`, as
    /// `pool/[namespace/]name`: while one remains, the snapshot it was
    /// cloned from cannot be removed, nor `image`.
    fn image_children(&self, image: &str) -> Result<Vec<String>, CephError>;
    /// Removes every snapshot of `image`, unprotecting a protected one
    /// first; [`CephError::Busy`] while a clone of one remains.
    fn image_snaps_remove(&self, image: &str) -> Result<(), CephError>;
}

/// An open RBD image.
pub trait ClusterImage: Send + Sync + std::fmt::Debug {
    /// An asynchronous image write.
    type Pending: Pending;

    /// The image's size in bytes.
    fn size(&self) -> Result<u64, CephError>;
    /// Changes the image's size.
    fn resize(&self, size: u64) -> Result<(), CephError>;
    /// Fills `buf` from `offset` (unwritten ranges read as zeroes).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CephError>;
    /// Writes `data` at `offset`; durable only after [`ClusterImage::flush`].
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), CephError>;
    /// Starts a write of `data` at `offset`, which the pending write owns.
    fn write_async(&self, offset: u64, data: Vec<u8>) -> Result<Self::Pending, CephError>;
    /// Zeroes `len` bytes at `offset`, exactly (unlike a discard, which may
    /// skip partial objects).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CephError>;
    /// Makes every write completed before it durable.
    fn flush(&self) -> Result<(), CephError>;
    /// Ranges of `[offset, offset+len)` that may hold data; everything else
    /// reads as zeroes (a superset, at object granularity).
    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, CephError>;
    /// Takes the image's exclusive lock, breaking (and so fencing) any other
    /// holder's.
    fn lock_acquire_breaking(&self) -> Result<(), CephError>;
}
