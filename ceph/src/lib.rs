//! Tidemark's access to a Ceph cluster.
//!
//! - [`Cluster`] is the seam a store engine is written against: RADOS
//!   objects (compound guarded writes, xattrs, omap, `lock`-class leases,
//!   blocklisting) and RBD images of one pool and namespace.
//! - [`SimCluster`] implements it in memory with a virtual clock and a crash
//!   switch, for crash and takeover tests; always built.
//! - With feature `librados`: `ffi` (the hand-declared C API), safe RAII
//!   wrappers `rados` and `rbd`, and `RadosCluster`, the real implementation.
//! - [`testbed`] starts a throwaway one-node cluster for tests.

mod cluster;
mod error;
#[cfg(feature = "librados")]
mod ffi;
#[cfg(feature = "librados")]
pub mod rados;
#[cfg(feature = "librados")]
pub mod rbd;
mod sim;
pub mod testbed;

pub use cluster::{
    Cluster, ClusterImage, CmpOp, LockRequest, Locker, OmapPage, Pending, Renew, WriteOp, WriteStep,
};
pub use error::CephError;
#[cfg(feature = "librados")]
pub use rados::RadosCluster;
pub use sim::{SimCluster, SimImage, SimPending, SimWorld};
