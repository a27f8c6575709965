//! The shipper: drains a consistency group's change log to the receiver, in
//! order, compressed, over QUIC with mutual TLS; runs the initial sync and
//! checksum resyncs by reading the disks themselves.
//!
//! - [`daemon`]: the process: connection, loop, retries.
//! - `holds`: the relay of a span coordinator's holds to the tracker.
//! - `renew`: renewing this host's certificate before it expires.
//! - `report`: the stream of status reports to the receiver (version 7 on).
//! - [`policy`]: reconnect backoff and the bandwidth limit (pure logic).
//! - [`source`]: reading the protected disks for sync and resync.
//! - [`status`]: `shipper.status`, what the shipper is doing.
//! - [`tail`]: batches of records from the log, waiting without polling.
//! - [`vm_spec`]: when the group's VM spec is sent to the receiver.

pub mod daemon;
mod holds;
pub mod policy;
pub mod receivers;
mod renew;
mod report;
pub mod source;
pub mod status;
pub mod tail;
pub mod vm_spec;
