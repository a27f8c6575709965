//! The numbers of the NBD protocol: magics, flag bits, option, reply,
//! information, command and chunk codes, and error values, as `doc/proto.md`
//! of the NetworkBlockDevice/nbd repository defines them.
//!
//! Everything on the NBD wire is big-endian, and flag bits are numbered from
//! the least significant bit of the big-endian value. Codes that the peer
//! sends are typed enums with a fallible `from_code`, so an unknown value is
//! something to reject, never a panic. Flag fields are `bitflags` types over
//! the wire integer: unknown bits survive decoding so that the validator can
//! name them in its error.
//!
//! Extended headers (`NBD_OPT_EXTENDED_HEADERS`, 64-bit lengths) are listed
//! for recognition only; the tracker refuses to negotiate them.

use std::fmt;
use std::io;

use crate::backend::BackendError;

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;

/// `IHAVEOPT`: the second 8 bytes of the server's greeting, and the first 8
/// bytes of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

/// First 8 bytes of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// First 4 bytes of every transmission-phase request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;

/// First 4 bytes of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// First 4 bytes of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Longest string (export name, description, error message, metadata
/// context name or query) the protocol allows, in bytes.
pub const MAX_STRING_LEN: usize = 4096;

/// The only metadata context the tracker serves: allocation status as the
/// `base:` namespace defines it.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Defines a flag field with [`bitflags`]: the wire integer with named bits.
/// Decode with `from_bits_retain`, so that unknown bits survive for the
/// validator to name (`all().contains(flags)` says there are none). `Debug`
/// names the known bits and shows the rest in hex: `CommandFlags(FUA |
/// 0x8000)`, and `ReplyFlags()` when none is set.
macro_rules! flag_set {
    (
        $(#[$meta:meta])*
        $name:ident($bits:ty) { $($flags:tt)* }
    ) => {
        bitflags::bitflags! {
            $(#[$meta])*
            #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
            pub struct $name: $bits { $($flags)* }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "("))?;
                bitflags::parser::to_writer(self, &mut *f)?;
                f.write_str(")")
            }
        }
    };
}

/// Defines a code enum: the wire integer as a typed value.
macro_rules! code_enum {
    (
        $(#[$meta:meta])*
        $name:ident($repr:ty) {
            $( $(#[$variant_meta:meta])* $variant:ident = $value:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $( $(#[$variant_meta])* $variant = $value, )*
        }

        impl $name {
            /// The typed value for a wire code, or `None` if the protocol
            /// revision the tracker implements does not define it.
            pub const fn from_code(code: $repr) -> Option<Self> {
                match code {
                    $( $value => Some(Self::$variant), )*
                    _ => None,
                }
            }

            /// The wire code.
            pub const fn code(self) -> $repr {
                self as $repr
            }
        }
    };
}

flag_set! {
    /// Handshake flags: 16 bits the server sends in its greeting.
    HandshakeFlags(u16) {
        /// `NBD_FLAG_FIXED_NEWSTYLE`: the server speaks fixed newstyle.
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_NO_ZEROES`: the server can omit the 124 zero bytes after
        /// an `NBD_OPT_EXPORT_NAME` reply.
        const NO_ZEROES = 1 << 1;
    }
}

flag_set! {
    /// Client flags: 32 bits the client sends in reply to the greeting.
    ClientFlags(u32) {
        /// `NBD_FLAG_C_FIXED_NEWSTYLE`: the client speaks fixed newstyle.
        const FIXED_NEWSTYLE = 1 << 0;
        /// `NBD_FLAG_C_NO_ZEROES`: omit the 124 zero bytes after an
        /// `NBD_OPT_EXPORT_NAME` reply.
        const NO_ZEROES = 1 << 1;
    }
}

flag_set! {
    /// Transmission flags: 16 bits per export, sent when the client picks it.
    TransmissionFlags(u16) {
        /// `NBD_FLAG_HAS_FLAGS`: always set.
        const HAS_FLAGS = 1 << 0;
        /// `NBD_FLAG_READ_ONLY`: writes, trims and write-zeroes fail with `EPERM`.
        const READ_ONLY = 1 << 1;
        /// `NBD_FLAG_SEND_FLUSH`: the server accepts `NBD_CMD_FLUSH`.
        const SEND_FLUSH = 1 << 2;
        /// `NBD_FLAG_SEND_FUA`: the server honours `NBD_CMD_FLAG_FUA`.
        const SEND_FUA = 1 << 3;
        /// `NBD_FLAG_ROTATIONAL`: the export behaves like a spinning disk.
        const ROTATIONAL = 1 << 4;
        /// `NBD_FLAG_SEND_TRIM`: the server accepts `NBD_CMD_TRIM`.
        const SEND_TRIM = 1 << 5;
        /// `NBD_FLAG_SEND_WRITE_ZEROES`: the server accepts
        /// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE`.
        const SEND_WRITE_ZEROES = 1 << 6;
        /// `NBD_FLAG_SEND_DF`: reads accept `NBD_CMD_FLAG_DF`; only with
        /// structured replies.
        const SEND_DF = 1 << 7;
        /// `NBD_FLAG_CAN_MULTI_CONN`: flushes are visible across connections.
        const CAN_MULTI_CONN = 1 << 8;
        /// `NBD_FLAG_SEND_RESIZE`: experimental `RESIZE` extension.
        const SEND_RESIZE = 1 << 9;
        /// `NBD_FLAG_SEND_CACHE`: the server understands `NBD_CMD_CACHE`.
        const SEND_CACHE = 1 << 10;
        /// `NBD_FLAG_SEND_FAST_ZERO`: write-zeroes accepts
        /// `NBD_CMD_FLAG_FAST_ZERO`.
        const SEND_FAST_ZERO = 1 << 11;
        /// `NBD_FLAG_BLOCK_STAT_PAYLOAD`: block-status requests may carry a
        /// payload; only with extended headers.
        const BLOCK_STATUS_PAYLOAD = 1 << 12;
    }
}

flag_set! {
    /// Command flags: 16 bits in every transmission-phase request.
    CommandFlags(u16) {
        /// `NBD_CMD_FLAG_FUA`: persist this command's writes before replying.
        const FUA = 1 << 0;
        /// `NBD_CMD_FLAG_NO_HOLE`: write-zeroes must allocate, not punch.
        const NO_HOLE = 1 << 1;
        /// `NBD_CMD_FLAG_DF`: reply to this read with at most one content chunk.
        const DF = 1 << 2;
        /// `NBD_CMD_FLAG_REQ_ONE`: block status with one extent per context.
        const REQ_ONE = 1 << 3;
        /// `NBD_CMD_FLAG_FAST_ZERO`: fail write-zeroes with `ENOTSUP` unless
        /// it is faster than writing.
        const FAST_ZERO = 1 << 4;
        /// `NBD_CMD_FLAG_PAYLOAD_LEN`: only with extended headers.
        const PAYLOAD_LEN = 1 << 5;
    }
}

flag_set! {
    /// Structured reply flags: 16 bits in every structured reply chunk.
    ReplyFlags(u16) {
        /// `NBD_REPLY_FLAG_DONE`: the last chunk of this reply.
        const DONE = 1 << 0;
    }
}

flag_set! {
    /// Status flags of a block-status extent in the `base:allocation`
    /// context. Zero ("allocated, contents unknown") is always a safe answer.
    ExtentStatus(u32) {
        /// `NBD_STATE_HOLE`: the extent is not allocated.
        const HOLE = 1 << 0;
        /// `NBD_STATE_ZERO`: the extent reads as zeroes.
        const ZERO = 1 << 1;
    }
}

code_enum! {
    /// Option codes (`NBD_OPT_*`) a client sends during the handshake.
    OptionCode(u32) {
        /// Pick an export and enter transmission; cannot report errors.
        ExportName = 1,
        /// End the negotiation (soft disconnect).
        Abort = 2,
        /// List the exports.
        List = 3,
        /// Withdrawn experimental extension; never valid.
        PeekExport = 4,
        /// Upgrade the connection to TLS.
        StartTls = 5,
        /// Describe one export without entering transmission.
        Info = 6,
        /// Describe one export and enter transmission.
        Go = 7,
        /// Use structured replies during transmission.
        StructuredReply = 8,
        /// List the metadata contexts of an export.
        ListMetaContext = 9,
        /// Select the metadata contexts for block-status requests.
        SetMetaContext = 10,
        /// Use 64-bit extended request and reply headers.
        ExtendedHeaders = 11,
    }
}

code_enum! {
    /// Option reply types (`NBD_REP_*`). Errors have bit 31 set.
    ReplyCode(u32) {
        /// The option succeeded; the final reply to it.
        Ack = 1,
        /// One export, in reply to `NBD_OPT_LIST`.
        Server = 2,
        /// One piece of information about an export (`NBD_INFO_*`).
        Info = 3,
        /// One metadata context.
        MetaContext = 4,
        /// The server does not know the option.
        ErrUnsup = 0x8000_0001,
        /// Server policy forbids the option.
        ErrPolicy = 0x8000_0002,
        /// The option is malformed or not valid now.
        ErrInvalid = 0x8000_0003,
        /// The option is not supported on this platform.
        ErrPlatform = 0x8000_0004,
        /// TLS is required first.
        ErrTlsReqd = 0x8000_0005,
        /// The requested export does not exist.
        ErrUnknown = 0x8000_0006,
        /// The server is shutting down.
        ErrShutdown = 0x8000_0007,
        /// The client must request `NBD_INFO_BLOCK_SIZE` first.
        ErrBlockSizeReqd = 0x8000_0008,
        /// The request or its reply is too large.
        ErrTooBig = 0x8000_0009,
    }
}

impl ReplyCode {
    /// Whether this reply type reports an error (bit 31).
    pub const fn is_error(self) -> bool {
        self.code() & 0x8000_0000 != 0
    }
}

code_enum! {
    /// Information types (`NBD_INFO_*`) in `NBD_OPT_INFO` / `NBD_OPT_GO`.
    InfoType(u16) {
        /// Size and transmission flags; always sent.
        Export = 0,
        /// Canonical export name.
        Name = 1,
        /// Human-readable description.
        Description = 2,
        /// Minimum, preferred and maximum block size.
        BlockSize = 3,
    }
}

code_enum! {
    /// Request types (`NBD_CMD_*`) of the transmission phase.
    CommandType(u16) {
        /// Read `length` bytes at `offset`.
        Read = 0,
        /// Write the `length` payload bytes that follow the header.
        Write = 1,
        /// Soft disconnect; no reply.
        Disc = 2,
        /// Make every acknowledged write durable.
        Flush = 3,
        /// Discard a range (a hint).
        Trim = 4,
        /// Prefetch a range (a hint).
        Cache = 5,
        /// Make a range read as zeroes.
        WriteZeroes = 6,
        /// Query allocation status of a range.
        BlockStatus = 7,
    }
}

code_enum! {
    /// Structured reply chunk types (`NBD_REPLY_TYPE_*`). Errors have bit 15
    /// set.
    ChunkType(u16) {
        /// No payload; only as the final chunk.
        None = 0,
        /// Offset followed by data.
        OffsetData = 1,
        /// Offset and length of a range that reads as zeroes.
        OffsetHole = 2,
        /// Context id followed by 32-bit extent descriptors.
        BlockStatus = 5,
        /// 64-bit extent descriptors; only with extended headers.
        BlockStatusExt = 6,
        /// Error with an optional message.
        Error = 0x8001,
        /// Error at an offset, with an optional message.
        ErrorOffset = 0x8002,
    }
}

impl ChunkType {
    /// Whether this chunk type reports an error (bit 15).
    pub const fn is_error(self) -> bool {
        self.code() & 0x8000 != 0
    }
}

code_enum! {
    /// Error values (`NBD_E*`) of the transmission phase. Success is not an
    /// `Errno`: it is the absence of one (error field zero).
    Errno(u32) {
        /// Operation not permitted (write to a read-only export).
        Perm = 1,
        /// Input/output error.
        Io = 5,
        /// Cannot allocate memory; avoided where at all possible.
        NoMem = 12,
        /// Invalid argument: malformed or out-of-range request.
        Inval = 22,
        /// No space left: write past the end of the export.
        NoSpc = 28,
        /// Value too large: a don't-fragment read that cannot be sent whole.
        Overflow = 75,
        /// Not supported: a fast-zero request that would not be fast.
        NotSup = 95,
        /// The server is shutting down.
        Shutdown = 108,
    }
}

impl Errno {
    /// Maps a local I/O error to the value the client is told, as the
    /// protocol asks: quota and file-size limits become `ENOSPC`, read-only
    /// media and permission problems `EPERM`, and everything without a closer
    /// match `EIO`. `ENOTSUP` and `EOVERFLOW` are never produced here: the
    /// protocol reserves them for fast-zero and don't-fragment requests.
    pub fn from_io_error(error: &io::Error) -> Self {
        use io::ErrorKind;
        match error.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded | ErrorKind::FileTooLarge => {
                Self::NoSpc
            }
            ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Self::Perm,
            ErrorKind::OutOfMemory => Self::NoMem,
            ErrorKind::InvalidInput => Self::Inval,
            _ => Self::Io,
        }
    }

    /// The value the client is told when a backend fails a request: the
    /// one mapping from storage errors to NBD's. A range outside the disk
    /// is `EINVAL` (the transmission validator refuses those before a
    /// backend sees them, so only a backend that knows better says so),
    /// a full disk `ENOSPC`, a read-only disk `EPERM`; device and other
    /// I/O errors by their cause ([`from_io_error`](Self::from_io_error)).
    pub fn of_backend(error: &BackendError) -> Self {
        match error {
            BackendError::NoSuchDisk(_) | BackendError::OutOfRange { .. } => Self::Inval,
            BackendError::NoSpace(_) => Self::NoSpc,
            BackendError::ReadOnly => Self::Perm,
            BackendError::Unavailable => Self::Io,
            BackendError::Device(e) => Self::from_code(e.errno()).unwrap_or(Self::Io),
            BackendError::Io(e) => Self::from_io_error(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn codes_round_trip_and_unknown_codes_are_none() {
        for code in 0..=12u32 {
            if let Some(option) = OptionCode::from_code(code) {
                assert_eq!(option.code(), code);
            }
        }
        assert_eq!(OptionCode::from_code(0), None);
        assert_eq!(OptionCode::from_code(12), None);
        assert_eq!(CommandType::from_code(8), None);
        assert_eq!(ReplyCode::ErrTooBig.code(), (1 << 31) + 9);
        assert!(ReplyCode::ErrUnsup.is_error());
        assert!(!ReplyCode::MetaContext.is_error());
        assert_eq!(ChunkType::Error.code(), (1 << 15) + 1);
        assert!(ChunkType::ErrorOffset.is_error());
        assert!(!ChunkType::BlockStatus.is_error());
        assert_eq!(Errno::from_code(95), Some(Errno::NotSup));
        assert_eq!(Errno::from_code(0), None);
    }

    #[test]
    fn flag_sets_keep_unknown_bits_and_name_known_ones() {
        let flags = CommandFlags::from_bits_retain(0x8001);
        assert!(flags.contains(CommandFlags::FUA));
        assert!(!CommandFlags::all().contains(flags));
        assert_eq!(flags.bits(), 0x8001);
        assert_eq!(flags.difference(CommandFlags::all()).bits(), 0x8000);
        assert_eq!(format!("{flags:?}"), "CommandFlags(FUA | 0x8000)");
        assert_eq!(
            format!(
                "{:?}",
                TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_DF
            ),
            "TransmissionFlags(HAS_FLAGS | SEND_DF)"
        );
        assert_eq!(format!("{:?}", ReplyFlags::empty()), "ReplyFlags()");
        assert_eq!(
            format!("{:?}", ExtentStatus::from_bits_retain(4)),
            "ExtentStatus(0x4)"
        );
    }

    /// Every flag of a field, by name, with its wire value.
    fn named<F: bitflags::Flags>() -> Vec<(&'static str, u64)>
    where
        F::Bits: Into<u64>,
    {
        F::FLAGS
            .iter()
            .map(|f| (f.name(), f.value().bits().into()))
            .collect()
    }

    /// The flag values are on the wire: each bit as `doc/proto.md` numbers it.
    #[test]
    fn flag_bits_are_the_protocols() {
        let both = [("FIXED_NEWSTYLE", 1), ("NO_ZEROES", 2)];
        assert_eq!(named::<HandshakeFlags>(), both);
        assert_eq!(named::<ClientFlags>(), both);
        assert_eq!(
            named::<TransmissionFlags>(),
            [
                ("HAS_FLAGS", 1 << 0),
                ("READ_ONLY", 1 << 1),
                ("SEND_FLUSH", 1 << 2),
                ("SEND_FUA", 1 << 3),
                ("ROTATIONAL", 1 << 4),
                ("SEND_TRIM", 1 << 5),
                ("SEND_WRITE_ZEROES", 1 << 6),
                ("SEND_DF", 1 << 7),
                ("CAN_MULTI_CONN", 1 << 8),
                ("SEND_RESIZE", 1 << 9),
                ("SEND_CACHE", 1 << 10),
                ("SEND_FAST_ZERO", 1 << 11),
                ("BLOCK_STATUS_PAYLOAD", 1 << 12),
            ]
        );
        assert_eq!(
            named::<CommandFlags>(),
            [
                ("FUA", 1 << 0),
                ("NO_HOLE", 1 << 1),
                ("DF", 1 << 2),
                ("REQ_ONE", 1 << 3),
                ("FAST_ZERO", 1 << 4),
                ("PAYLOAD_LEN", 1 << 5),
            ]
        );
        assert_eq!(named::<ReplyFlags>(), [("DONE", 1)]);
        assert_eq!(named::<ExtentStatus>(), [("HOLE", 1), ("ZERO", 2)]);
    }

    #[test]
    fn backend_errors_map_to_the_values_the_protocol_asks_for() {
        use tidemark_changelog::DiskId;
        let of = |e: BackendError| Errno::of_backend(&e);
        assert_eq!(of(BackendError::NoSuchDisk(DiskId(3))), Errno::Inval);
        let out = BackendError::OutOfRange {
            offset: 1,
            length: 2,
        };
        assert_eq!(of(out), Errno::Inval);
        let full = io::Error::from(io::ErrorKind::StorageFull);
        assert_eq!(of(BackendError::NoSpace(full)), Errno::NoSpc);
        assert_eq!(of(BackendError::ReadOnly), Errno::Perm);
        assert_eq!(of(BackendError::Unavailable), Errno::Io);
        let device = crate::storage::StorageError::Poisoned;
        assert_eq!(of(BackendError::Device(device)), Errno::Io);
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!(of(BackendError::Io(eof)), Errno::Io);
        let quota = io::Error::from(io::ErrorKind::QuotaExceeded);
        assert_eq!(of(BackendError::from(quota)), Errno::NoSpc);
    }

    #[test]
    fn io_errors_map_to_the_values_the_protocol_asks_for() {
        let of = |kind| Errno::from_io_error(&io::Error::from(kind));
        assert_eq!(of(io::ErrorKind::StorageFull), Errno::NoSpc);
        assert_eq!(of(io::ErrorKind::QuotaExceeded), Errno::NoSpc);
        assert_eq!(of(io::ErrorKind::ReadOnlyFilesystem), Errno::Perm);
        assert_eq!(of(io::ErrorKind::UnexpectedEof), Errno::Io);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn quota_and_file_size_errnos_map_to_nospc() {
        // EDQUOT (122) and EFBIG (27) as the Linux kernel reports them.
        assert_eq!(
            Errno::from_io_error(&io::Error::from_raw_os_error(122)),
            Errno::NoSpc
        );
        assert_eq!(
            Errno::from_io_error(&io::Error::from_raw_os_error(27)),
            Errno::NoSpc
        );
    }
}
