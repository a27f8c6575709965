//! The NBD (Network Block Device) protocol, server side, without I/O.
//!
//! The kernel's NBD client (`/dev/nbdN`) talks to the tracker over a unix
//! socket. This module owns the bytes of that conversation and the decisions
//! they imply; it owns no socket, no device and no clock. The daemon reads
//! exactly the fixed-size pieces asked for, hands them in, and writes out
//! what comes back.
//!
//! - [`constants`]: the protocol's numbers: magics, flag bits, codes, errno.
//! - [`export`]: what a served disk looks like to a client, and the catalog
//!   the handshake asks.
//! - [`handshake`]: fixed-newstyle negotiation, one type per state, ending in
//!   a [`Negotiated`](handshake::Negotiated) session.
//! - [`transmission`]: request headers decoded and validated into commands;
//!   simple and structured replies encoded, without allocating per request.
//!
//! The protocol is `doc/proto.md` of the NetworkBlockDevice/nbd repository.
//! Unlike Tidemark's own formats, NBD is big-endian on the wire. Each
//! submodule documents the byte layout of the messages it owns.
//!
//! Not implemented: TLS (`NBD_OPT_STARTTLS` is refused; the socket is local),
//! extended headers (64-bit lengths), oldstyle negotiation, metadata contexts
//! other than `base:allocation`, and the experimental `RESIZE` extension.
//!
//! # Driving it
//!
//! ```
//! use tidemark_tracker::nbd::constants::{ClientFlags, CommandFlags, CommandType, OptionCode};
//! use tidemark_tracker::nbd::export::{BlockSizes, ExportCatalog, ExportInfo};
//! use tidemark_tracker::nbd::handshake::{AwaitClientFlags, OptionHeader, OptionOutcome};
//! use tidemark_tracker::nbd::transmission::{encode_simple_reply, Command, ErrorReply, RequestHeader};
//! use tidemark_tracker::nbd::constants::TransmissionFlags;
//!
//! struct OneDisk(ExportInfo);
//!
//! impl ExportCatalog for OneDisk {
//!     fn lookup(&self, name: &str) -> Option<ExportInfo> {
//!         (name == self.0.name).then(|| self.0.clone())
//!     }
//!     fn list(&self) -> Vec<ExportInfo> {
//!         vec![self.0.clone()]
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let disks = OneDisk(ExportInfo {
//!     name: "sda".into(),
//!     description: "database data".into(),
//!     size: 1 << 30,
//!     flags: TransmissionFlags::SEND_FLUSH | TransmissionFlags::SEND_FUA,
//!     block_sizes: BlockSizes::new(512, 4096, 32 << 20)?,
//! });
//!
//! // Handshake: send the greeting, read 4 bytes of client flags.
//! let state = AwaitClientFlags::new();
//! let _greeting = state.greeting();
//! let client_flags = ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES;
//! let mut options = state.handle_client_flags(&client_flags.bits().to_be_bytes())?;
//!
//! // Read a 16-byte option header, then its data (here: NBD_OPT_GO "sda").
//! let mut data = 3u32.to_be_bytes().to_vec();
//! data.extend_from_slice(b"sda");
//! data.extend_from_slice(&0u16.to_be_bytes());
//! let wire = OptionHeader { option: OptionCode::Go.code(), len: data.len() as u32 }.encode();
//! let session = loop {
//!     let header = OptionHeader::decode(&wire)?;
//!     match options.handle_option(header.option, &data, &disks) {
//!         OptionOutcome::Reply { options: next, reply: _send } => options = next,
//!         OptionOutcome::Go { session, reply: _send } => break session,
//!         OptionOutcome::Abort { reply: _send } => return Ok(()),
//!         OptionOutcome::Close(error) => return Err(error.into()),
//!     }
//! };
//!
//! // Transmission: read 28-byte request headers, validate, act, reply.
//! let wire = RequestHeader {
//!     flags: CommandFlags::empty(),
//!     kind: CommandType::Read.code(),
//!     cookie: 7,
//!     offset: 4096,
//!     length: 4096,
//! }
//! .encode();
//! let request = RequestHeader::decode(&wire)?;
//! match request.validate(&session) {
//!     Ok(Command::Read { offset, length, .. }) => {
//!         assert_eq!((offset, length), (4096, 4096));
//!         let _header = encode_simple_reply(request.cookie, None); // then the data
//!     }
//!     Ok(_) => unreachable!("a read validates as a read"),
//!     Err(rejection) => {
//!         // Drop any write payload as `rejection.recovery` says, then:
//!         let _reply = ErrorReply::new(request.cookie, rejection.errno(), session.structured_replies);
//!     }
//! }
//! # Ok(())
//! # }
//! ```

pub mod constants;
pub mod export;
pub mod handshake;
pub mod transmission;
mod wire;
