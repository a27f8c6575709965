//! The tracker: serves protected disks over NBD, writes the backing device,
//! logs every acknowledged write.
//!
//! This crate holds the tracker's pure protocol and storage logic; the daemon
//! is a thin shell that drives it with sockets, devices and a clock.

pub mod backend;
pub mod bitmap;
pub mod commit;
pub mod control;
pub mod daemon;
pub mod dm;
pub mod group;
pub mod kernel_attach;
pub mod kernel_size;
mod lock_order;
pub mod nbd;
pub mod queue;
pub mod quiesce;
pub mod range_lock;
pub mod recover;
mod ring;
pub mod server;
pub mod span_quiesce;
pub mod splice;
pub mod state;
pub mod storage;
pub mod ublk;
pub mod write_path;
