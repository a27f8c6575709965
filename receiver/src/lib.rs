//! The Tidemark receiver ("master target"): it owns the replica volumes of
//! the protected hosts' consistency groups and is the only thing that ever
//! writes them.
//!
//! - [`daemon`]: the QUIC server: authenticated hosts, their groups,
//!   the protocol session per connection.
//! - [`drain`]: the drain request and answer files of a planned failover.
//! - [`replica`]: the store as the protocol sees it.
//! - [`store`]: the replica store of one consistency group: ordered,
//!   idempotent apply of change-log records, initial sync and checksum
//!   resync, crash recovery.

pub mod daemon;
pub mod drain;
pub mod replica;
pub mod store;
