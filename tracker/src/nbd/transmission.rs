//! The NBD transmission phase: request headers in, validated commands and
//! reply bytes out. Nothing here allocates per request: headers decode into
//! stack structs, fixed replies encode into arrays, and the variable-length
//! chunks append to a buffer the caller reuses.
//!
//! # Bytes (all big-endian; the protocol calls the cookie "handle" in older
//! revisions)
//!
//! ```text
//! C: request header, 28 bytes, then `length` bytes of data for NBD_CMD_WRITE only
//!    0       4       6      8        16       24       28
//!    | magic | flags | type | cookie | offset | length |
//!      u32     u16     u16    u64      u64      u32
//!    magic = 0x25609513
//!
//! S: simple reply, 16 bytes, then `length` bytes of data for a successful read
//!    0       4       8        16
//!    | magic | error | cookie |
//!      u32     u32     u64
//!    magic = 0x67446698; error = 0 on success, else an NBD_E* value
//!
//! S: structured reply chunk, 20-byte header then `length` bytes of chunk data
//!    0       4       6      8        16       20
//!    | magic | flags | type | cookie | length |
//!      u32     u16     u16    u64      u32
//!    magic = 0x668e33ef; flags bit 0 = DONE (the last chunk of this reply)
//!
//!    type          chunk data                                         length
//!    NONE          (none)                                             0
//!    OFFSET_DATA   | offset u64 | data |                              8 + data
//!    OFFSET_HOLE   | offset u64 | hole length u32 |                   12
//!    BLOCK_STATUS  | context id u32 | n × (length u32, status u32) |   4 + 8n
//!    ERROR         | error u32 | message length u16 | message |     6 + message
//! ```
//!
//! # Validation
//!
//! [`RequestHeader::validate`] holds a request to what the handshake
//! advertised ([`Negotiated`]) and classifies refusals as the protocol asks:
//!
//! | refusal                                          | error       |
//! |--------------------------------------------------|-------------|
//! | unknown command; flag not valid for the command or not advertised; command not advertised; flush with a range; zero length; offset or length not a multiple of the minimum block size; read / write / cache / write-zeroes longer than both the maximum block size and 32 MiB; block status without a selected context | `EINVAL` |
//! | write, trim or write-zeroes on a read-only export | `EPERM`     |
//! | write or write-zeroes past the end of the export  | `ENOSPC`    |
//! | read, trim, cache or block status past the end    | `EINVAL`    |
//! | don't-fragment read too long for one chunk        | `EOVERFLOW` |
//!
//! The announced maximum block size is a request to the client, not a
//! limit on what is accepted: requests up to 32 MiB
//! ([`TOLERATED_MAX_BLOCK`](super::export::TOLERATED_MAX_BLOCK)) pass however small it is, because the kernel's
//! NBD client attached by `nbd-client` never hears of it. A backend splits
//! what it cannot take whole (the group logs a large write as several
//! records).
//!
//! A refused write still has its payload on the stream; [`Recovery`] tells
//! the shell whether to read and drop it or, when it is too large to be
//! worth reading, to disconnect. `NBD_CMD_DISC` is never refused: it ends the
//! connection either way. `NBD_CMD_CACHE` is accepted whether or not
//! `SEND_CACHE` was advertised, as clients are known to send it regardless.

use thiserror::Error;

use super::constants::{
    ChunkType, CommandFlags, CommandType, Errno, ExtentStatus, ReplyFlags, TransmissionFlags,
    REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use super::handshake::Negotiated;
use super::wire::{within_string_limit, Fields};

/// Length of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;

/// Length of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

/// Length of an `OFFSET_DATA` chunk up to its data: header and offset.
pub const OFFSET_DATA_HEADER_LEN: usize = CHUNK_HEADER_LEN + 8;

/// Length of a whole `OFFSET_HOLE` chunk.
pub const OFFSET_HOLE_LEN: usize = CHUNK_HEADER_LEN + 12;

/// Length of an `ERROR` chunk without a message.
pub const ERROR_CHUNK_LEN: usize = CHUNK_HEADER_LEN + 6;

/// Most data one `OFFSET_DATA` chunk can carry: its length field counts the
/// 8-byte offset too.
pub const MAX_OFFSET_DATA_LEN: u32 = u32::MAX - 8;

/// Refused writes up to this length have their payload read and dropped, so
/// the connection survives; the protocol says no length below 32 MiB should
/// be treated as a denial of service. Longer ones (beyond the export's
/// maximum block size too) end the connection.
pub const WRITE_DISCARD_LIMIT: u32 = 1 << 25;

/// Why a request header cannot be used at all. The stream has lost its
/// framing, so the only answer is a hard disconnect; always the client's
/// fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum FramingError {
    /// The header does not start with the request magic (extended headers
    /// are never negotiated, so their magic is wrong too).
    #[error("request header starts with {magic:#010x}, not the request magic")]
    BadMagic {
        /// The first 4 bytes of the header.
        magic: u32,
    },
}

/// A decoded request header, not yet validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags, unknown bits included.
    pub flags: CommandFlags,
    /// Command type (`NBD_CMD_*`), possibly one the tracker does not know.
    pub kind: u16,
    /// Opaque value the reply must echo.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes; for writes, the length of the payload that follows.
    pub length: u32,
}

/// A request that passed validation, with its flags resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read {
        /// Start of the range.
        offset: u64,
        /// Length of the range, within the maximum block size.
        length: u32,
        /// Reply with at most one content chunk.
        dont_fragment: bool,
    },
    /// Write the `length` payload bytes that follow the header.
    Write {
        /// Start of the range.
        offset: u64,
        /// Length of the range and of the payload to read.
        length: u32,
        /// Make the data durable before replying.
        fua: bool,
    },
    /// Soft disconnect: finish outstanding requests, then close. No reply.
    Disconnect,
    /// Make every acknowledged write durable before replying.
    Flush,
    /// The client no longer needs the range.
    Trim {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u32,
        /// Make the trim durable before replying.
        fua: bool,
    },
    /// The client will soon read the range.
    Cache {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u32,
    },
    /// Make the range read as zeroes.
    WriteZeroes {
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        length: u32,
        /// Make the zeroes durable before replying.
        fua: bool,
        /// Keep the range allocated (no hole punching).
        no_hole: bool,
        /// Fail with `ENOTSUP` unless zeroing is faster than writing.
        fast_zero: bool,
    },
    /// Report allocation status of the range.
    BlockStatus {
        /// Start of the range.
        offset: u64,
        /// Length of the range; a hint, not a limit.
        length: u32,
        /// The metadata context id to answer for.
        context: u32,
        /// Answer with a single extent.
        req_one: bool,
    },
}

/// Why a well-framed request is refused. Always the client's fault; the
/// connection survives (see [`Recovery`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum RequestError {
    /// The command type is not one the tracker knows.
    #[error("unknown command type {kind}")]
    UnknownCommand {
        /// The command type as received.
        kind: u16,
    },
    /// The command was not advertised for this export (flush, trim or
    /// write-zeroes without its transmission flag).
    #[error("{command:?} was not offered for this export")]
    NotOffered {
        /// The command.
        command: CommandType,
    },
    /// Flags that are unknown, not valid for this command, or not
    /// advertised (FUA without `SEND_FUA`, DF without `SEND_DF`, ...).
    #[error("{command:?} does not accept {flags:?}")]
    FlagsNotAllowed {
        /// The command.
        command: CommandType,
        /// The offending bits only.
        flags: CommandFlags,
    },
    /// A write, trim or write-zeroes to a read-only export.
    #[error("{command:?} on a read-only export")]
    ReadOnly {
        /// The command.
        command: CommandType,
    },
    /// A flush with a nonzero offset or length, which must be zero.
    #[error("flush with offset {offset} and length {length}; both must be zero")]
    FlushWithRange {
        /// The offset as received.
        offset: u64,
        /// The length as received.
        length: u32,
    },
    /// A ranged command of length zero.
    #[error("{command:?} of length zero")]
    ZeroLength {
        /// The command.
        command: CommandType,
    },
    /// Offset or length not a multiple of the minimum block size.
    #[error(
        "{command:?} at {offset}+{length} is not aligned to the {min_block}-byte minimum block size"
    )]
    Misaligned {
        /// The command.
        command: CommandType,
        /// The offset as received.
        offset: u64,
        /// The length as received.
        length: u32,
        /// The advertised minimum block size.
        min_block: u32,
    },
    /// A read, write, cache or write-zeroes (without fast-zero) longer than
    /// both the maximum block size and 32 MiB.
    #[error("{command:?} of {length} bytes exceeds the {limit}-byte request limit")]
    TooLarge {
        /// The command.
        command: CommandType,
        /// The length as received.
        length: u32,
        /// The longest length accepted
        /// ([`BlockSizes::accepted_max`](super::export::BlockSizes::accepted_max)).
        limit: u32,
    },
    /// The range ends past the end of the export (or past 2^64).
    #[error("{command:?} at {offset}+{length} runs past the end of the {size}-byte export")]
    OutOfRange {
        /// The command.
        command: CommandType,
        /// The offset as received.
        offset: u64,
        /// The length as received.
        length: u32,
        /// The export size.
        size: u64,
    },
    /// Block status without a metadata context selected for this export.
    #[error("block status without a selected metadata context")]
    NoMetaContext,
    /// A don't-fragment read longer than one `OFFSET_DATA` chunk can carry.
    #[error("don't-fragment read of {length} bytes does not fit one chunk")]
    CannotAvoidFragmenting {
        /// The length as received.
        length: u32,
    },
}

impl RequestError {
    /// The error value the client is told, as the protocol recommends.
    pub const fn errno(&self) -> Errno {
        match self {
            Self::ReadOnly { .. } => Errno::Perm,
            Self::OutOfRange {
                command: CommandType::Write | CommandType::WriteZeroes,
                ..
            } => Errno::NoSpc,
            Self::CannotAvoidFragmenting { .. } => Errno::Overflow,
            Self::UnknownCommand { .. }
            | Self::NotOffered { .. }
            | Self::FlagsNotAllowed { .. }
            | Self::FlushWithRange { .. }
            | Self::ZeroLength { .. }
            | Self::Misaligned { .. }
            | Self::TooLarge { .. }
            | Self::OutOfRange { .. }
            | Self::NoMetaContext => Errno::Inval,
        }
    }
}

/// A refused request: why, and how to keep the stream in step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Why the request is refused.
    pub reason: RequestError,
    /// What to do with the bytes that follow the header.
    pub recovery: Recovery,
}

impl Rejection {
    /// The error value to reply with.
    pub const fn errno(&self) -> Errno {
        self.reason.errno()
    }
}

/// How the shell keeps the byte stream in step after a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// Send the error reply; the next bytes are the next request header.
    Reply,
    /// Read and drop `payload` bytes of write data, then send the error
    /// reply.
    DiscardThenReply {
        /// Bytes of write payload to drop.
        payload: u32,
    },
    /// The write payload is too large to read just to drop it: send the
    /// error reply if the socket allows, then hard-disconnect.
    Close,
}

impl RequestHeader {
    /// Decodes a request header. Only the magic is checked here; everything
    /// else is for [`validate`](Self::validate), which can answer with an
    /// error instead of dropping the connection.
    pub fn decode(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, FramingError> {
        let fields = Fields(*bytes);
        let magic = fields.u32_at::<0>();
        if magic != REQUEST_MAGIC {
            return Err(FramingError::BadMagic { magic });
        }
        Ok(Self {
            flags: CommandFlags::from_bits_retain(fields.u16_at::<4>()),
            kind: fields.u16_at::<6>(),
            cookie: fields.u64_at::<8>(),
            offset: fields.u64_at::<16>(),
            length: fields.u32_at::<24>(),
        })
    }

    /// Encodes the header as a client sends it.
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut fields = Fields::zeroed();
        fields.set_u32_at::<0>(REQUEST_MAGIC);
        fields.set_u16_at::<4>(self.flags.bits());
        fields.set_u16_at::<6>(self.kind);
        fields.set_u64_at::<8>(self.cookie);
        fields.set_u64_at::<16>(self.offset);
        fields.set_u32_at::<24>(self.length);
        fields.0
    }

    /// The command type, if the tracker knows it.
    pub const fn command_type(&self) -> Option<CommandType> {
        CommandType::from_code(self.kind)
    }

    /// Bytes of payload that follow this header on the stream: `length`
    /// for a write, zero for everything else.
    pub const fn payload_len(&self) -> u32 {
        if self.kind == CommandType::Write.code() {
            self.length
        } else {
            0
        }
    }

    /// Checks the request against what was negotiated. Never panics and
    /// never allocates, whatever the header holds.
    pub fn validate(&self, session: &Negotiated) -> Result<Command, Rejection> {
        self.check(session).map_err(|reason| Rejection {
            reason,
            recovery: self.recovery(session),
        })
    }

    fn recovery(&self, session: &Negotiated) -> Recovery {
        match self.payload_len() {
            0 => Recovery::Reply,
            payload => {
                let tolerated = WRITE_DISCARD_LIMIT.max(session.export.block_sizes.accepted_max());
                if payload <= tolerated {
                    Recovery::DiscardThenReply { payload }
                } else {
                    Recovery::Close
                }
            }
        }
    }

    fn check(&self, session: &Negotiated) -> Result<Command, RequestError> {
        let export = &session.export;
        let offered = export.flags;
        let Some(command) = self.command_type() else {
            return Err(RequestError::UnknownCommand { kind: self.kind });
        };
        if command == CommandType::Disc {
            // Ends the connection either way; there is no reply to refuse with.
            return Ok(Command::Disconnect);
        }
        let needs = match command {
            CommandType::Flush => Some(TransmissionFlags::SEND_FLUSH),
            CommandType::Trim => Some(TransmissionFlags::SEND_TRIM),
            CommandType::WriteZeroes => Some(TransmissionFlags::SEND_WRITE_ZEROES),
            _ => None,
        };
        if needs.is_some_and(|flag| !offered.contains(flag)) {
            return Err(RequestError::NotOffered { command });
        }
        let refused = self.flags.difference(allowed_flags(command, offered));
        if !refused.is_empty() {
            return Err(RequestError::FlagsNotAllowed {
                command,
                flags: refused,
            });
        }
        let writes = matches!(
            command,
            CommandType::Write | CommandType::Trim | CommandType::WriteZeroes
        );
        if writes && offered.contains(TransmissionFlags::READ_ONLY) {
            return Err(RequestError::ReadOnly { command });
        }
        if command == CommandType::Flush {
            if self.offset != 0 || self.length != 0 {
                return Err(RequestError::FlushWithRange {
                    offset: self.offset,
                    length: self.length,
                });
            }
        } else {
            self.check_range(command, session)?;
        }

        let (offset, length) = (self.offset, self.length);
        let fua = self.flags.contains(CommandFlags::FUA);
        Ok(match command {
            CommandType::Read => Command::Read {
                offset,
                length,
                dont_fragment: self.flags.contains(CommandFlags::DF),
            },
            CommandType::Write => Command::Write {
                offset,
                length,
                fua,
            },
            CommandType::Trim => Command::Trim {
                offset,
                length,
                fua,
            },
            CommandType::Cache => Command::Cache { offset, length },
            CommandType::WriteZeroes => Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole: self.flags.contains(CommandFlags::NO_HOLE),
                fast_zero: self.flags.contains(CommandFlags::FAST_ZERO),
            },
            CommandType::BlockStatus => Command::BlockStatus {
                offset,
                length,
                context: session.base_allocation.ok_or(RequestError::NoMetaContext)?,
                req_one: self.flags.contains(CommandFlags::REQ_ONE),
            },
            CommandType::Flush => Command::Flush,
            CommandType::Disc => Command::Disconnect,
        })
    }

    /// Length, alignment, size and bounds checks shared by every ranged
    /// command.
    fn check_range(&self, command: CommandType, session: &Negotiated) -> Result<(), RequestError> {
        let export = &session.export;
        let (offset, length) = (self.offset, self.length);
        if length == 0 {
            return Err(RequestError::ZeroLength { command });
        }
        // `BlockSizes` guarantees a nonzero power-of-two minimum.
        let min_block = export.block_sizes.min();
        if offset % u64::from(min_block) != 0 || length % min_block != 0 {
            return Err(RequestError::Misaligned {
                command,
                offset,
                length,
                min_block,
            });
        }
        // Trim and block status lengths carry no payload and are not bound
        // by the maximum; neither is a fast-zero request, which fails fast
        // rather than doing the work.
        let bounded = match command {
            CommandType::Read | CommandType::Write | CommandType::Cache => true,
            CommandType::WriteZeroes => !self.flags.contains(CommandFlags::FAST_ZERO),
            _ => false,
        };
        let limit = export.block_sizes.accepted_max();
        if bounded && length > limit {
            return Err(RequestError::TooLarge {
                command,
                length,
                limit,
            });
        }
        let end = offset.checked_add(u64::from(length));
        if end.is_none_or(|end| end > export.size) {
            return Err(RequestError::OutOfRange {
                command,
                offset,
                length,
                size: export.size,
            });
        }
        if command == CommandType::Read
            && self.flags.contains(CommandFlags::DF)
            && length > MAX_OFFSET_DATA_LEN
        {
            return Err(RequestError::CannotAvoidFragmenting { length });
        }
        Ok(())
    }
}

/// The command flags a command may carry on this export.
fn allowed_flags(command: CommandType, offered: TransmissionFlags) -> CommandFlags {
    let mut allowed = CommandFlags::empty();
    // FUA is valid on every command once advertised, even where it means
    // nothing (clients are known to set it on reads).
    if offered.contains(TransmissionFlags::SEND_FUA) {
        allowed |= CommandFlags::FUA;
    }
    match command {
        CommandType::Read if offered.contains(TransmissionFlags::SEND_DF) => {
            allowed | CommandFlags::DF
        }
        CommandType::WriteZeroes if offered.contains(TransmissionFlags::SEND_FAST_ZERO) => {
            allowed | CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO
        }
        CommandType::WriteZeroes => allowed | CommandFlags::NO_HOLE,
        CommandType::BlockStatus => allowed | CommandFlags::REQ_ONE,
        _ => allowed,
    }
}

/// Why a reply could not be encoded. Always a local fault: the caller asked
/// for a chunk the protocol cannot express.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum ReplyEncodeError {
    /// An `OFFSET_DATA` chunk must carry at least one byte.
    #[error("an OFFSET_DATA chunk must carry at least one byte")]
    EmptyData,
    /// An `OFFSET_DATA` chunk carries at most [`MAX_OFFSET_DATA_LEN`] bytes.
    #[error("{len} bytes do not fit one OFFSET_DATA chunk")]
    DataTooLong {
        /// The requested data length.
        len: u32,
    },
    /// An `OFFSET_HOLE` chunk must describe at least one byte.
    #[error("an OFFSET_HOLE chunk must describe at least one byte")]
    EmptyHole,
    /// A `BLOCK_STATUS` chunk must carry at least one extent.
    #[error("a BLOCK_STATUS chunk must carry at least one extent")]
    NoExtents,
    /// Every extent of a `BLOCK_STATUS` chunk must be nonzero in length.
    #[error("extent {index} has length zero")]
    ZeroLengthExtent {
        /// Position of the extent in the list.
        index: usize,
    },
    /// More extents than a chunk's 32-bit length can describe.
    #[error("{count} extents do not fit one BLOCK_STATUS chunk")]
    TooManyExtents {
        /// The number of extents.
        count: usize,
    },
}

/// One extent of a `BLOCK_STATUS` chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatusExtent {
    /// Length in bytes; nonzero.
    pub length: u32,
    /// Allocation status; zero is always a safe answer.
    pub status: ExtentStatus,
}

/// A simple reply: success (`error: None`, followed by the data of a read)
/// or an error value.
pub fn encode_simple_reply(cookie: u64, error: Option<Errno>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut fields = Fields::zeroed();
    fields.set_u32_at::<0>(SIMPLE_REPLY_MAGIC);
    fields.set_u32_at::<4>(error.map_or(0, Errno::code));
    fields.set_u64_at::<8>(cookie);
    fields.0
}

/// The header of a structured reply chunk; `length` bytes of chunk data
/// must follow.
pub fn encode_chunk_header(
    cookie: u64,
    kind: ChunkType,
    done: bool,
    length: u32,
) -> [u8; CHUNK_HEADER_LEN] {
    let flags = if done {
        ReplyFlags::DONE
    } else {
        ReplyFlags::empty()
    };
    let mut fields = Fields::zeroed();
    fields.set_u32_at::<0>(STRUCTURED_REPLY_MAGIC);
    fields.set_u16_at::<4>(flags.bits());
    fields.set_u16_at::<6>(kind.code());
    fields.set_u64_at::<8>(cookie);
    fields.set_u32_at::<16>(length);
    fields.0
}

/// The final `NONE` chunk: the reply ends, successfully unless an error
/// chunk came before.
pub fn encode_none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    encode_chunk_header(cookie, ChunkType::None, true, 0)
}

/// An `OFFSET_DATA` chunk up to its data: header and offset. `data_len`
/// bytes of data must follow, sent straight from the caller's buffer.
pub fn encode_offset_data_header(
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) -> Result<[u8; OFFSET_DATA_HEADER_LEN], ReplyEncodeError> {
    if data_len == 0 {
        return Err(ReplyEncodeError::EmptyData);
    }
    if data_len > MAX_OFFSET_DATA_LEN {
        return Err(ReplyEncodeError::DataTooLong { len: data_len });
    }
    let header = encode_chunk_header(cookie, ChunkType::OffsetData, done, data_len + 8);
    let mut fields = Fields::<OFFSET_DATA_HEADER_LEN>::zeroed();
    fields.0[..CHUNK_HEADER_LEN].copy_from_slice(&header);
    fields.set_u64_at::<CHUNK_HEADER_LEN>(offset);
    Ok(fields.0)
}

/// A whole `OFFSET_HOLE` chunk: `hole_len` bytes at `offset` read as zeroes.
pub fn encode_offset_hole(
    cookie: u64,
    offset: u64,
    hole_len: u32,
    done: bool,
) -> Result<[u8; OFFSET_HOLE_LEN], ReplyEncodeError> {
    if hole_len == 0 {
        return Err(ReplyEncodeError::EmptyHole);
    }
    let header = encode_chunk_header(cookie, ChunkType::OffsetHole, done, 12);
    let mut fields = Fields::<OFFSET_HOLE_LEN>::zeroed();
    fields.0[..CHUNK_HEADER_LEN].copy_from_slice(&header);
    fields.set_u64_at::<CHUNK_HEADER_LEN>(offset);
    fields.set_u32_at::<{ CHUNK_HEADER_LEN + 8 }>(hole_len);
    Ok(fields.0)
}

/// Appends an `ERROR` chunk with a human-readable message (cut to the
/// protocol's 4096-byte string limit) to `out`.
pub fn encode_error_chunk(cookie: u64, errno: Errno, message: &str, done: bool, out: &mut Vec<u8>) {
    let message = within_string_limit(message);
    // At most MAX_STRING_LEN bytes, so both lengths fit their fields.
    let message_len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let header = encode_chunk_header(cookie, ChunkType::Error, done, 6 + u32::from(message_len));
    out.extend_from_slice(&header);
    out.extend_from_slice(&errno.code().to_be_bytes());
    out.extend_from_slice(&message_len.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends a `BLOCK_STATUS` chunk for one metadata context to `out`.
pub fn encode_block_status(
    cookie: u64,
    context: u32,
    extents: &[BlockStatusExtent],
    done: bool,
    out: &mut Vec<u8>,
) -> Result<(), ReplyEncodeError> {
    if extents.is_empty() {
        return Err(ReplyEncodeError::NoExtents);
    }
    if let Some(index) = extents.iter().position(|extent| extent.length == 0) {
        return Err(ReplyEncodeError::ZeroLengthExtent { index });
    }
    let length = u32::try_from(extents.len())
        .ok()
        .and_then(|count| count.checked_mul(8))
        .and_then(|descriptors| descriptors.checked_add(4))
        .ok_or(ReplyEncodeError::TooManyExtents {
            count: extents.len(),
        })?;
    out.extend_from_slice(&encode_chunk_header(
        cookie,
        ChunkType::BlockStatus,
        done,
        length,
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for extent in extents {
        out.extend_from_slice(&extent.length.to_be_bytes());
        out.extend_from_slice(&extent.status.bits().to_be_bytes());
    }
    Ok(())
}

/// A complete error reply in whichever form the connection needs: a simple
/// reply, or, once structured replies are negotiated (where a read must
/// never get a simple reply), a final `ERROR` chunk without a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorReply {
    /// For connections without structured replies.
    Simple([u8; SIMPLE_REPLY_LEN]),
    /// For connections with structured replies.
    Structured([u8; ERROR_CHUNK_LEN]),
}

impl ErrorReply {
    /// Encodes the error reply for a request.
    pub fn new(cookie: u64, errno: Errno, structured_replies: bool) -> Self {
        if !structured_replies {
            return Self::Simple(encode_simple_reply(cookie, Some(errno)));
        }
        let header = encode_chunk_header(cookie, ChunkType::Error, true, 6);
        let mut fields = Fields::<ERROR_CHUNK_LEN>::zeroed();
        fields.0[..CHUNK_HEADER_LEN].copy_from_slice(&header);
        fields.set_u32_at::<CHUNK_HEADER_LEN>(errno.code());
        // Message length stays zero.
        Self::Structured(fields.0)
    }

    /// The bytes to send.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Simple(bytes) => bytes,
            Self::Structured(bytes) => bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::nbd::export::{BlockSizes, ExportInfo};

    const MIB: u32 = 1 << 20;

    fn session_with(flags: TransmissionFlags, base_allocation: Option<u32>) -> Negotiated {
        Negotiated {
            export: ExportInfo {
                name: "data".into(),
                description: String::new(),
                size: 1 << 30,
                flags: flags | TransmissionFlags::HAS_FLAGS,
                block_sizes: BlockSizes::new(512, 4096, MIB).unwrap(),
            },
            structured_replies: true,
            base_allocation,
        }
    }

    fn full() -> Negotiated {
        session_with(
            TransmissionFlags::SEND_FLUSH
                | TransmissionFlags::SEND_FUA
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES
                | TransmissionFlags::SEND_FAST_ZERO
                | TransmissionFlags::SEND_DF,
            Some(1),
        )
    }

    fn request(kind: CommandType, flags: CommandFlags, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            kind: kind.code(),
            cookie: 0x00c0_0c1e,
            offset,
            length,
        }
    }

    fn refusal(header: RequestHeader, session: &Negotiated) -> (RequestError, Errno, Recovery) {
        let rejection = header.validate(session).unwrap_err();
        (rejection.reason, rejection.errno(), rejection.recovery)
    }

    #[test]
    fn request_header_round_trips_and_checks_magic() {
        let header = request(CommandType::Write, CommandFlags::FUA, 4096, 8192);
        let bytes = header.encode();
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&bytes), Ok(header));
        let mut bad = bytes;
        bad[3] = 0x14;
        assert_eq!(
            RequestHeader::decode(&bad),
            Err(FramingError::BadMagic { magic: 0x2560_9514 })
        );
    }

    #[test]
    fn valid_requests_become_commands() {
        let session = full();
        let cases = [
            (
                request(CommandType::Read, CommandFlags::DF, 0, 4096),
                Command::Read {
                    offset: 0,
                    length: 4096,
                    dont_fragment: true,
                },
            ),
            (
                request(CommandType::Write, CommandFlags::FUA, 1 << 29, MIB),
                Command::Write {
                    offset: 1 << 29,
                    length: MIB,
                    fua: true,
                },
            ),
            (
                request(CommandType::Flush, CommandFlags::empty(), 0, 0),
                Command::Flush,
            ),
            (
                request(CommandType::Trim, CommandFlags::empty(), 512, 1 << 29),
                Command::Trim {
                    offset: 512,
                    length: 1 << 29,
                    fua: false,
                },
            ),
            (
                request(CommandType::Cache, CommandFlags::empty(), 0, 512),
                Command::Cache {
                    offset: 0,
                    length: 512,
                },
            ),
            (
                request(
                    CommandType::WriteZeroes,
                    CommandFlags::NO_HOLE | CommandFlags::FAST_ZERO,
                    0,
                    1 << 30,
                ),
                Command::WriteZeroes {
                    offset: 0,
                    length: 1 << 30,
                    fua: false,
                    no_hole: true,
                    fast_zero: true,
                },
            ),
            (
                request(CommandType::BlockStatus, CommandFlags::REQ_ONE, 0, 1 << 30),
                Command::BlockStatus {
                    offset: 0,
                    length: 1 << 30,
                    context: 1,
                    req_one: true,
                },
            ),
        ];
        for (header, command) in cases {
            assert_eq!(header.validate(&session), Ok(command), "{header:?}");
        }
    }

    #[test]
    fn the_last_byte_of_the_export_is_in_range() {
        let session = full();
        let header = request(
            CommandType::Read,
            CommandFlags::empty(),
            (1 << 30) - 512,
            512,
        );
        assert!(header.validate(&session).is_ok());
    }

    #[test]
    fn disconnect_is_never_refused() {
        let header = request(
            CommandType::Disc,
            CommandFlags::from_bits_retain(0xffff),
            7,
            9,
        );
        assert_eq!(header.validate(&full()), Ok(Command::Disconnect));
    }

    #[test]
    fn unknown_commands_are_invalid() {
        let header = RequestHeader {
            kind: 8,
            ..request(CommandType::Read, CommandFlags::empty(), 0, 512)
        };
        assert_eq!(
            refusal(header, &full()),
            (
                RequestError::UnknownCommand { kind: 8 },
                Errno::Inval,
                Recovery::Reply
            )
        );
    }

    #[test]
    fn commands_that_were_not_offered_are_invalid() {
        let bare = session_with(TransmissionFlags::empty(), None);
        for kind in [
            CommandType::Flush,
            CommandType::Trim,
            CommandType::WriteZeroes,
        ] {
            let (reason, errno, _) = refusal(request(kind, CommandFlags::empty(), 0, 512), &bare);
            assert_eq!(reason, RequestError::NotOffered { command: kind });
            assert_eq!(errno, Errno::Inval);
        }
        // Cache is accepted unadvertised: clients send it regardless.
        let cache = request(CommandType::Cache, CommandFlags::empty(), 0, 512);
        assert!(cache.validate(&bare).is_ok());
    }

    #[test]
    fn flags_must_be_known_valid_for_the_command_and_advertised() {
        let session = full();
        let bare = session_with(TransmissionFlags::SEND_WRITE_ZEROES, Some(1));
        let cases = [
            (CommandType::Read, CommandFlags::NO_HOLE, &session),
            (CommandType::Read, CommandFlags::REQ_ONE, &session),
            (CommandType::Write, CommandFlags::DF, &session),
            (CommandType::Write, CommandFlags::FAST_ZERO, &session),
            (CommandType::Write, CommandFlags::PAYLOAD_LEN, &session),
            (
                CommandType::Write,
                CommandFlags::from_bits_retain(0x8000),
                &session,
            ),
            (CommandType::Read, CommandFlags::FUA, &bare),
            (CommandType::Read, CommandFlags::DF, &bare),
            (CommandType::WriteZeroes, CommandFlags::FAST_ZERO, &bare),
        ];
        for (kind, flags, session) in cases {
            let (reason, errno, _) = refusal(request(kind, flags, 0, 512), session);
            assert_eq!(
                reason,
                RequestError::FlagsNotAllowed {
                    command: kind,
                    flags
                }
            );
            assert_eq!(errno, Errno::Inval);
        }
        // FUA is accepted on every command once advertised.
        for kind in [CommandType::Read, CommandType::Flush, CommandType::Cache] {
            let length = if kind == CommandType::Flush { 0 } else { 512 };
            assert!(request(kind, CommandFlags::FUA, 0, length)
                .validate(&session)
                .is_ok());
        }
        // NO_HOLE comes with write-zeroes itself.
        assert!(
            request(CommandType::WriteZeroes, CommandFlags::NO_HOLE, 0, 512)
                .validate(&bare)
                .is_ok()
        );
    }

    #[test]
    fn writes_to_a_read_only_export_are_not_permitted() {
        let read_only = session_with(
            TransmissionFlags::READ_ONLY
                | TransmissionFlags::SEND_TRIM
                | TransmissionFlags::SEND_WRITE_ZEROES,
            None,
        );
        for kind in [
            CommandType::Write,
            CommandType::Trim,
            CommandType::WriteZeroes,
        ] {
            let (reason, errno, recovery) =
                refusal(request(kind, CommandFlags::empty(), 0, 4096), &read_only);
            assert_eq!(reason, RequestError::ReadOnly { command: kind });
            assert_eq!(errno, Errno::Perm);
            let expected = if kind == CommandType::Write {
                Recovery::DiscardThenReply { payload: 4096 }
            } else {
                Recovery::Reply
            };
            assert_eq!(recovery, expected);
        }
        assert!(request(CommandType::Read, CommandFlags::empty(), 0, 4096)
            .validate(&read_only)
            .is_ok());
    }

    #[test]
    fn flush_must_not_carry_a_range() {
        let (reason, errno, _) = refusal(
            request(CommandType::Flush, CommandFlags::empty(), 0, 512),
            &full(),
        );
        assert_eq!(
            reason,
            RequestError::FlushWithRange {
                offset: 0,
                length: 512
            }
        );
        assert_eq!(errno, Errno::Inval);
    }

    #[test]
    fn zero_length_requests_are_invalid() {
        for kind in [
            CommandType::Read,
            CommandType::Write,
            CommandType::Trim,
            CommandType::Cache,
            CommandType::WriteZeroes,
            CommandType::BlockStatus,
        ] {
            let (reason, errno, recovery) =
                refusal(request(kind, CommandFlags::empty(), 0, 0), &full());
            assert_eq!(reason, RequestError::ZeroLength { command: kind });
            assert_eq!((errno, recovery), (Errno::Inval, Recovery::Reply));
        }
    }

    #[test]
    fn misaligned_requests_are_invalid() {
        for (offset, length) in [(1, 512), (0, 513), (4095, 4096)] {
            let (reason, errno, recovery) = refusal(
                request(CommandType::Write, CommandFlags::empty(), offset, length),
                &full(),
            );
            assert_eq!(
                reason,
                RequestError::Misaligned {
                    command: CommandType::Write,
                    offset,
                    length,
                    min_block: 512
                }
            );
            assert_eq!(errno, Errno::Inval);
            assert_eq!(recovery, Recovery::DiscardThenReply { payload: length });
        }
    }

    #[test]
    fn requests_up_to_32_mib_pass_whatever_maximum_was_announced() {
        // `full()` announces 1 MiB; a client that ignores it (the kernel's
        // NBD client attached by nbd-client) still gets its requests served.
        let session = full();
        for length in [MIB + 512, 4 * MIB, 32 * MIB] {
            let cases = [
                (
                    request(CommandType::Write, CommandFlags::FUA, 0, length),
                    Command::Write {
                        offset: 0,
                        length,
                        fua: true,
                    },
                ),
                (
                    request(CommandType::WriteZeroes, CommandFlags::empty(), 0, length),
                    Command::WriteZeroes {
                        offset: 0,
                        length,
                        fua: false,
                        no_hole: false,
                        fast_zero: false,
                    },
                ),
                (
                    request(CommandType::Read, CommandFlags::empty(), 0, length),
                    Command::Read {
                        offset: 0,
                        length,
                        dont_fragment: false,
                    },
                ),
                (
                    request(CommandType::Cache, CommandFlags::empty(), 0, length),
                    Command::Cache { offset: 0, length },
                ),
            ];
            for (header, command) in cases {
                assert_eq!(header.validate(&session), Ok(command), "{header:?}");
            }
        }
    }

    #[test]
    fn requests_beyond_32_mib_and_the_maximum_block_size_are_invalid() {
        let mut large = full();
        large.export.block_sizes = BlockSizes::new(512, 4096, 64 * MIB).unwrap();
        for (session, length, limit) in [
            (full(), 32 * MIB + 512, 32 * MIB),
            (full(), 64 * MIB, 32 * MIB),
            (large, 64 * MIB + 512, 64 * MIB),
        ] {
            // Up to an announced maximum above 32 MiB is accepted.
            assert!(request(CommandType::Read, CommandFlags::empty(), 0, limit)
                .validate(&session)
                .is_ok());
            for kind in [
                CommandType::Read,
                CommandType::Write,
                CommandType::Cache,
                CommandType::WriteZeroes,
            ] {
                let (reason, errno, _) =
                    refusal(request(kind, CommandFlags::empty(), 0, length), &session);
                assert_eq!(
                    reason,
                    RequestError::TooLarge {
                        command: kind,
                        length,
                        limit
                    }
                );
                assert_eq!(errno, Errno::Inval);
            }
        }
        // Trim and fast-zero write-zeroes stay unbounded.
        for header in [
            request(CommandType::Trim, CommandFlags::empty(), 0, 64 * MIB),
            request(
                CommandType::WriteZeroes,
                CommandFlags::FAST_ZERO,
                0,
                64 * MIB,
            ),
        ] {
            assert!(header.validate(&full()).is_ok(), "{header:?}");
        }
    }

    #[test]
    fn an_oversized_write_payload_is_dropped_or_ends_the_connection() {
        // Past the end of the 1 GiB export, so refused at any length.
        let header = |length| request(CommandType::Write, CommandFlags::empty(), 1 << 30, length);
        assert_eq!(
            refusal(header(WRITE_DISCARD_LIMIT), &full()).2,
            Recovery::DiscardThenReply {
                payload: WRITE_DISCARD_LIMIT
            }
        );
        assert_eq!(
            refusal(header(WRITE_DISCARD_LIMIT + 512), &full()).2,
            Recovery::Close
        );
        assert_eq!(refusal(header(u32::MAX - 511), &full()).2, Recovery::Close);
    }

    #[test]
    fn ranges_past_the_end_are_nospc_for_writes_and_invalid_otherwise() {
        let session = full();
        let size = session.export.size;
        for (kind, errno) in [
            (CommandType::Write, Errno::NoSpc),
            (CommandType::WriteZeroes, Errno::NoSpc),
            (CommandType::Read, Errno::Inval),
            (CommandType::Trim, Errno::Inval),
            (CommandType::Cache, Errno::Inval),
            (CommandType::BlockStatus, Errno::Inval),
        ] {
            for offset in [size, size - 512 * 1023, u64::MAX - 511] {
                let (reason, actual, _) = refusal(
                    request(kind, CommandFlags::empty(), offset, 1024 * 512),
                    &session,
                );
                assert!(
                    matches!(reason, RequestError::OutOfRange { command, .. } if command == kind),
                    "{kind:?} at {offset}: {reason:?}"
                );
                assert_eq!(actual, errno);
            }
        }
    }

    #[test]
    fn block_status_needs_a_selected_context() {
        let session = session_with(TransmissionFlags::empty(), None);
        let (reason, errno, _) = refusal(
            request(CommandType::BlockStatus, CommandFlags::empty(), 0, 512),
            &session,
        );
        assert_eq!((reason, errno), (RequestError::NoMetaContext, Errno::Inval));
    }

    #[test]
    fn a_dont_fragment_read_that_cannot_fit_one_chunk_overflows() {
        let mut session = full();
        session.export.block_sizes = BlockSizes::new(1, 4096, u32::MAX).unwrap();
        session.export.size = u64::MAX;
        let read = |flags| request(CommandType::Read, flags, 0, u32::MAX);
        let (reason, errno, _) = refusal(read(CommandFlags::DF), &session);
        assert_eq!(
            reason,
            RequestError::CannotAvoidFragmenting { length: u32::MAX }
        );
        assert_eq!(errno, Errno::Overflow);
        assert!(read(CommandFlags::empty()).validate(&session).is_ok());
    }

    #[test]
    fn simple_reply_bytes() {
        assert_eq!(
            encode_simple_reply(0x0102_0304_0506_0708, None),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(
            &encode_simple_reply(1, Some(Errno::NoSpc))[4..8],
            &[0, 0, 0, 28]
        );
    }

    #[test]
    fn chunk_headers_carry_flags_type_cookie_and_length() {
        let none = encode_none_chunk(9);
        assert_eq!(&none[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&none[4..8], &[0, 1, 0, 0], "DONE, type NONE");
        assert_eq!(&none[8..16], &9u64.to_be_bytes());
        assert_eq!(&none[16..], &[0, 0, 0, 0]);

        let data = encode_offset_data_header(9, 4096, 512, false).unwrap();
        assert_eq!(&data[4..8], &[0, 0, 0, 1]);
        assert_eq!(&data[16..20], &520u32.to_be_bytes());
        assert_eq!(&data[20..], &4096u64.to_be_bytes());
        assert!(encode_offset_data_header(9, 0, MAX_OFFSET_DATA_LEN, true).is_ok());
        assert_eq!(
            encode_offset_data_header(9, 0, 0, true),
            Err(ReplyEncodeError::EmptyData)
        );
        assert_eq!(
            encode_offset_data_header(9, 0, MAX_OFFSET_DATA_LEN + 1, true),
            Err(ReplyEncodeError::DataTooLong {
                len: MAX_OFFSET_DATA_LEN + 1
            })
        );

        let hole = encode_offset_hole(9, 8192, 4096, true).unwrap();
        assert_eq!(&hole[4..8], &[0, 1, 0, 2]);
        assert_eq!(&hole[16..20], &12u32.to_be_bytes());
        assert_eq!(&hole[20..28], &8192u64.to_be_bytes());
        assert_eq!(&hole[28..], &4096u32.to_be_bytes());
        assert_eq!(
            encode_offset_hole(9, 0, 0, true),
            Err(ReplyEncodeError::EmptyHole)
        );
    }

    #[test]
    fn error_chunk_carries_errno_and_a_bounded_message() {
        let mut out = Vec::new();
        encode_error_chunk(5, Errno::Io, "disk on fire", true, &mut out);
        assert_eq!(out.len(), ERROR_CHUNK_LEN + 12);
        assert_eq!(&out[4..8], &[0, 1, 0x80, 0x01]);
        assert_eq!(&out[16..20], &18u32.to_be_bytes());
        assert_eq!(&out[20..24], &5u32.to_be_bytes());
        assert_eq!(&out[24..26], &12u16.to_be_bytes());
        assert_eq!(&out[26..], b"disk on fire");

        out.clear();
        encode_error_chunk(5, Errno::Io, &"x".repeat(10_000), false, &mut out);
        assert_eq!(out.len(), ERROR_CHUNK_LEN + 4096);
        assert_eq!(&out[4..6], &[0, 0], "not DONE");
    }

    #[test]
    fn block_status_chunk_lists_extents() {
        let mut out = Vec::new();
        let extents = [
            BlockStatusExtent {
                length: 4096,
                status: ExtentStatus::empty(),
            },
            BlockStatusExtent {
                length: 8192,
                status: ExtentStatus::HOLE | ExtentStatus::ZERO,
            },
        ];
        encode_block_status(3, 1, &extents, true, &mut out).unwrap();
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 4 + 16);
        assert_eq!(&out[4..8], &[0, 1, 0, 5]);
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(&out[20..24], &1u32.to_be_bytes());
        assert_eq!(&out[24..32], &[0, 0, 0x10, 0, 0, 0, 0, 0]);
        assert_eq!(&out[32..40], &[0, 0, 0x20, 0, 0, 0, 0, 3]);

        assert_eq!(
            encode_block_status(3, 1, &[], true, &mut out),
            Err(ReplyEncodeError::NoExtents)
        );
        let zero = [
            extents[0],
            BlockStatusExtent {
                length: 0,
                ..extents[0]
            },
        ];
        assert_eq!(
            encode_block_status(3, 1, &zero, true, &mut out),
            Err(ReplyEncodeError::ZeroLengthExtent { index: 1 })
        );
    }

    #[test]
    fn error_reply_is_simple_or_structured_as_negotiated() {
        let simple = ErrorReply::new(4, Errno::Inval, false);
        assert_eq!(
            simple.as_bytes(),
            &encode_simple_reply(4, Some(Errno::Inval))
        );
        let structured = ErrorReply::new(4, Errno::Inval, true);
        let mut expected = Vec::new();
        encode_error_chunk(4, Errno::Inval, "", true, &mut expected);
        assert_eq!(structured.as_bytes(), expected.as_slice());
    }

    // ---- properties ------------------------------------------------------

    fn any_session() -> impl Strategy<Value = Negotiated> {
        let sizes = (0u32..=16, 9u32..=16, any::<u32>(), any::<bool>()).prop_filter_map(
            "valid block sizes",
            |(min_shift, preferred_shift, max, unlimited)| {
                let min = 1u32 << min_shift;
                let preferred = 1u32 << preferred_shift.max(min_shift);
                let max = if unlimited {
                    u32::MAX
                } else {
                    (max / min).max(1) * min
                };
                BlockSizes::new(min, preferred, max).ok()
            },
        );
        let size = prop_oneof![any::<u64>(), 0u64..(1 << 34), Just(u64::MAX)];
        let flags = prop_oneof![any::<u16>(), any::<u16>().prop_map(|bits| bits & !2)];
        (sizes, size, flags, any::<bool>(), any::<Option<u32>>()).prop_map(
            |(block_sizes, size, flags, structured_replies, base_allocation)| Negotiated {
                export: ExportInfo {
                    name: "p".into(),
                    description: String::new(),
                    size,
                    flags: TransmissionFlags::from_bits_retain(flags),
                    block_sizes,
                },
                structured_replies,
                base_allocation,
            },
        )
    }

    /// Headers that often fit the session (aligned, in range, plausible
    /// flags) so acceptance is exercised, mixed with entirely random ones.
    fn header_for(session: &Negotiated) -> impl Strategy<Value = RequestHeader> {
        let min = u64::from(session.export.block_sizes.min());
        let blocks = (session.export.size / min).max(1);
        let max_blocks = u64::from(session.export.block_sizes.max()) / min;
        let offset = prop_oneof![
            3 => (0..blocks).prop_map(move |n| n * min),
            1 => any::<u64>(),
            1 => Just(u64::MAX - 511),
        ];
        let length = prop_oneof![
            3 => (0..=max_blocks.clamp(1, 64)).prop_map(move |n| (n * min) as u32),
            1 => any::<u32>(),
        ];
        let flags = prop_oneof![
            3 => Just(0u16),
            3 => prop::sample::select(vec![1u16, 2, 4, 8, 16, 3, 18, 17]),
            1 => any::<u16>(),
        ];
        let kind = prop_oneof![4 => 0u16..8, 1 => any::<u16>()];
        (flags, kind, any::<u64>(), offset, length).prop_map(
            |(flags, kind, cookie, offset, length)| RequestHeader {
                flags: CommandFlags::from_bits_retain(flags),
                kind,
                cookie,
                offset,
                length,
            },
        )
    }

    fn session_and_header() -> impl Strategy<Value = (Negotiated, RequestHeader)> {
        any_session().prop_flat_map(|session| {
            let header = header_for(&session);
            (Just(session), header)
        })
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in any::<[u8; REQUEST_HEADER_LEN]>(), real_magic in any::<bool>()) {
            let mut bytes = bytes;
            if real_magic {
                bytes[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            match RequestHeader::decode(&bytes) {
                Ok(header) => prop_assert_eq!(header.encode(), bytes),
                Err(FramingError::BadMagic { magic }) => {
                    prop_assert!(!real_magic);
                    prop_assert_ne!(magic, REQUEST_MAGIC);
                }
            }
        }

        #[test]
        fn validation_never_panics_and_accepts_only_what_fits(
            (session, header) in session_and_header(),
        ) {
            let export = &session.export;
            match header.validate(&session) {
                Ok(Command::Disconnect) => prop_assert_eq!(header.kind, CommandType::Disc.code()),
                Ok(Command::Flush) => {
                    prop_assert!(export.flags.contains(TransmissionFlags::SEND_FLUSH));
                    prop_assert_eq!((header.offset, header.length), (0, 0));
                }
                Ok(command) => {
                    let (offset, length) = (header.offset, header.length);
                    prop_assert!(length > 0);
                    prop_assert!(u128::from(offset) + u128::from(length) <= u128::from(export.size));
                    let min = export.block_sizes.min();
                    prop_assert_eq!(offset % u64::from(min), 0);
                    prop_assert_eq!(length % min, 0);
                    prop_assert!(CommandFlags::all().contains(header.flags));
                    prop_assert!(!header.flags.contains(CommandFlags::PAYLOAD_LEN));
                    match command {
                        Command::Read { .. } | Command::Write { .. } | Command::Cache { .. } => {
                            prop_assert!(length <= export.block_sizes.accepted_max());
                        }
                        Command::BlockStatus { context, .. } => {
                            prop_assert_eq!(Some(context), session.base_allocation);
                        }
                        _ => {}
                    }
                    if matches!(command, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }) {
                        prop_assert!(!export.flags.contains(TransmissionFlags::READ_ONLY));
                    }
                    if header.flags.contains(CommandFlags::FUA) {
                        prop_assert!(export.flags.contains(TransmissionFlags::SEND_FUA));
                    }
                }
                Err(rejection) => {
                    prop_assert!(Errno::from_code(rejection.errno().code()).is_some());
                    match rejection.recovery {
                        Recovery::Reply => prop_assert_eq!(header.payload_len(), 0),
                        Recovery::DiscardThenReply { payload } => {
                            prop_assert_eq!(payload, header.payload_len());
                            prop_assert!(payload <= WRITE_DISCARD_LIMIT.max(export.block_sizes.accepted_max()));
                        }
                        Recovery::Close => {
                            prop_assert!(header.payload_len() > WRITE_DISCARD_LIMIT.max(export.block_sizes.accepted_max()));
                        }
                    }
                    // The reason renders as a message for an error chunk.
                    let mut out = Vec::new();
                    encode_error_chunk(header.cookie, rejection.errno(), &rejection.reason.to_string(), true, &mut out);
                    prop_assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
                    let error = ErrorReply::new(header.cookie, rejection.errno(), session.structured_replies);
                    prop_assert!(error.as_bytes().len() == SIMPLE_REPLY_LEN || error.as_bytes().len() == ERROR_CHUNK_LEN);
                }
            }
        }

        #[test]
        fn block_status_length_field_matches_the_bytes(
            extents in proptest::collection::vec((1u32.., any::<u32>()), 1..40),
            cookie in any::<u64>(),
        ) {
            let extents: Vec<BlockStatusExtent> = extents
                .into_iter()
                .map(|(length, status)| BlockStatusExtent { length, status: ExtentStatus::from_bits_retain(status) })
                .collect();
            let mut out = Vec::new();
            encode_block_status(cookie, 1, &extents, true, &mut out).unwrap();
            let length = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
            prop_assert_eq!(out.len(), CHUNK_HEADER_LEN + length);
            prop_assert_eq!(length, 4 + 8 * extents.len());
        }

        #[test]
        fn error_chunk_length_field_matches_the_bytes(message in ".{0,5000}", cookie in any::<u64>()) {
            let mut out = Vec::new();
            encode_error_chunk(cookie, Errno::Io, &message, true, &mut out);
            let length = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
            let message_len = u16::from_be_bytes([out[24], out[25]]) as usize;
            prop_assert_eq!(out.len(), CHUNK_HEADER_LEN + length);
            prop_assert_eq!(length, 6 + message_len);
            prop_assert!(message_len <= 4096);
            prop_assert!(std::str::from_utf8(&out[26..]).is_ok());
        }
    }
}
