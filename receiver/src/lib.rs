//! The Tidemark receiver ("master target"): it owns the replica volumes of
//! the protected hosts' consistency groups and is the only thing that ever
//! writes them.
//!
//! - `coordinate`: the spans' coordinators, one task per span.
//! - [`daemon`]: the QUIC server: authenticated hosts, their groups,
//!   the protocol session per connection.
//! - [`drain`]: the drain request and answer files of a planned failover.
//! - [`jobs`]: the job registry: syncs, resyncs, test failovers and
//!   failovers, running and finished, with progress; kept on disk.
//! - [`pin`]: the pin that keeps a recovery point from retention while
//!   a test failover or a planned failover reads it.
//! - [`renew`]: signing a host's renewed certificate; the certificate
//!   each host last connected with.
//! - [`retire`]: retired hosts: refused, their replicas removed now or
//!   after a stated time.
//! - [`replica`]: the store as the protocol sees it.
//! - [`span`]: a span's record (points consistent across hosts): what its
//!   coordinator must find again after a restart, and every round's
//!   outcome.
//! - [`span_take`]: a span point on demand: the request and its answer.
//! - [`span_point`]: a span point as failover and test failover use
//!   it: which can still be had, the span floor of each member, a point
//!   pinned in every member at once.
//! - [`store`]: the replica store of one consistency group: ordered,
//!   idempotent apply of change-log records, initial sync and checksum
//!   resync, crash recovery.
//! - [`store_health`]: which groups' store (a Ceph cluster) did not
//!   answer in time: degraded until it does.
//! - [`test_failover`]: a recovery point made writable by copy-on-write
//!   scratch files, for a test failover to serve.
//! - [`vm_spec`]: the group's VM spec as the protected site sent it, every
//!   version with the first record it applies to.

mod coordinate;
pub mod daemon;
pub mod drain;
pub mod jobs;
pub mod lag_ring;
pub mod lease;
pub mod lease_task;
pub mod pin;
pub mod renew;
pub mod replica;
pub mod retire;
pub mod shipper_reports;
pub mod span;
pub mod span_point;
pub mod span_take;
pub mod store;
pub mod store_health;
pub mod test_failover;
pub mod vm_spec;
