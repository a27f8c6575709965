//! The replication wire protocol between the shipper (protected host) and
//! the receiver (replica site): frames, their codec, and the sans-IO protocol
//! logic of both ends. No sockets, no clock, no runtime: the daemons feed
//! bytes and messages in and send what comes out.
//!
//! - [`frame`]: the frame layout (byte diagram there), the encoder, the
//!   incremental [`FrameDecoder`], and how the two ends agree on a protocol
//!   version (the rules for peers of different releases).
//! - [`message`]: the messages and their body layouts, and [`RecordBatch`],
//!   the verified run of change-log records a `Records` message carries.
//! - [`shipper`]: the shipper's session ([`AwaitingWelcome`] → [`Shipping`]),
//!   flow control and resync digest comparison.
//! - [`shipper_core`]: everything the shipper decides for a connection
//!   (order of work, resync, timeouts, drain, status), as a state machine
//!   the daemon and the simulation both drive.
//! - [`status_report`]: what the shipper tells the receiver of itself
//!   (version 7 on), and the pure [`Reporter`] deciding when.
//! - [`receiver`]: the receiver's session ([`ExpectHello`] → [`Receiving`])
//!   driving a [`Replica`].
//!
//! One connection carries one session over one reliable, ordered stream:
//!
//! ```text
//!  shipper                                   receiver
//!  Hello (newest version it speaks) ───────►
//!        ◄────────────────────────────────── Welcome (in the version both
//!                                            speak; durable seq, sync states)
//!  Records / Chunk / DigestRequest /
//!  ResyncDone ─────────────────────────────►
//!        ◄────────────────────────────────── Ack / Digests
//!  Error (either way, then close)
//! ```

pub mod frame;
pub mod message;
pub mod receiver;
pub mod shipper;
pub mod shipper_core;
pub mod status_report;

pub use frame::{
    encode_frame, Compression, DecodeError, EncodeError, Frame, FrameDecoder, Versions,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
pub use message::{
    BatchError, ChunkData, ChunkPurpose, DiskSync, ErrorClass, ErrorCode, Message, MessageDecoder,
    MessageType, Received, RecordBatch, RecordId, Renewed, VmSpecReply, MAX_VM_SPEC, SOFTWARE,
};
pub use receiver::{
    DrainOutcome, DrainRefused, ExpectHello, Position, ReceiverConfig, ReceiverError, Receiving,
    Replica, ReplicaError, VmSpecRefused,
};
pub use shipper::{
    block_digests, differing_blocks, AwaitingWelcome, DigestReply, DigestRequestInfo, HelloInfo,
    Resume, ShipperConfig, ShipperError, ShipperEvent, Shipping,
};
pub use shipper_core::{
    CoreConfig, CoreEvent, CoreStatus, DiskStatus, Need, Phase, ShipperCore, VmSpecNews,
};
pub use status_report::{Facts, Progress, ReportState, Reporter, ReporterConfig, StatusReport};
/// A disk of the group and a byte range of one, as the change log's crate
/// defines them for every crate; the wire encodes their fields (see
/// [`message`]).
pub use tidemark_changelog::{Disk, Extent};
