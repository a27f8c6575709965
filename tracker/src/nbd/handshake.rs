//! The NBD handshake, from the server's greeting to the moment the client
//! enters transmission, as a sans-IO state machine (fixed newstyle
//! negotiation; oldstyle is not offered).
//!
//! # States
//!
//! ```text
//!  AwaitClientFlags ──handle_client_flags──► Options ──handle_option──┬─► Reply { Options, .. }  (loop)
//!     greeting()                                                      ├─► Go { Negotiated, .. }  (transmission)
//!                                                                     ├─► Abort { .. }           (send, then close)
//!                                                                     └─► Close(HandshakeError)  (hard disconnect)
//! ```
//!
//! Each state is its own type and every transition consumes it, so a shell
//! cannot answer an option after the client has entered transmission. The
//! shell reads exactly the fixed-size pieces asked for (4 bytes of client
//! flags, a 16-byte option header, then the `len` data bytes the header
//! announces), hands them in, and writes out the bytes that come back.
//!
//! # Bytes (all big-endian)
//!
//! ```text
//! S: greeting, 18 bytes
//!    0          8          16      18
//!    | NBDMAGIC | IHAVEOPT | flags |        flags: FIXED_NEWSTYLE | NO_ZEROES
//!      u64        u64        u16
//! C: client flags, 4 bytes: u32           FIXED_NEWSTYLE, NO_ZEROES; nothing else
//! C: option header, 16 bytes, then `len` bytes of option data
//!    0          8        12    16
//!    | IHAVEOPT | option | len |          len <= 64 KiB here
//!      u64        u32      u32
//! S: option reply header, 20 bytes, then `len` bytes of reply data
//!    0                  8        12     16    20
//!    | 0x3e889045565a9  | option | type | len |
//!      u64                u32      u32    u32
//! S: reply to NBD_OPT_EXPORT_NAME (no header), 10 bytes
//!    0      8       10
//!    | size | flags | + 124 zero bytes unless the client set NO_ZEROES
//!      u64    u16
//! ```
//!
//! # What the tracker answers
//!
//! - `EXPORT_NAME`: enter transmission; an unknown or malformed name is a
//!   hard disconnect, as this option cannot carry an error.
//! - `INFO` / `GO`: `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` always (the
//!   tracker enforces block sizes, and `INFO` then `GO` must agree), name and
//!   description on request; `ERR_UNKNOWN` for an unknown export; the empty
//!   name means the catalog's default export.
//! - `LIST`, `ABORT`, `STRUCTURED_REPLY` as the protocol describes.
//! - `LIST_META_CONTEXT` / `SET_META_CONTEXT`: only `base:allocation`, and
//!   only after structured replies; a selection reaches transmission only if
//!   the last `SET_META_CONTEXT` named the export finally entered.
//! - `STARTTLS`, `EXTENDED_HEADERS` and anything unknown: `ERR_UNSUP`. The
//!   tracker serves a local unix socket and does no TLS.
//! - Malformed option data: `ERR_INVALID`, and negotiation continues.
//! - A client without `FIXED_NEWSTYLE` may only send `EXPORT_NAME`.
//! - At most [`MAX_OPTIONS`] options per connection; the shell should also
//!   bound the handshake's wall-clock time, which this module cannot see.

use thiserror::Error;

use super::constants::{
    ClientFlags, HandshakeFlags, InfoType, OptionCode, ReplyCode, TransmissionFlags,
    BASE_ALLOCATION, IHAVEOPT, MAX_STRING_LEN, NBD_MAGIC, OPTION_REPLY_MAGIC,
};
use super::export::{ExportCatalog, ExportInfo};
use super::wire::{within_string_limit, Fields, PayloadReader};

/// Length of the server's greeting.
pub const GREETING_LEN: usize = 18;

/// Length of the client flags that answer the greeting.
pub const CLIENT_FLAGS_LEN: usize = 4;

/// Length of an option header.
pub const OPTION_HEADER_LEN: usize = 16;

/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Largest option data the tracker reads. The longest legitimate option is a
/// handful of 4 KiB strings; anything larger is refused before it is read.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Most options one connection may send before entering transmission; the
/// next one is answered with a hard disconnect (the protocol allows that
/// against a denial of service). Generous enough for `nbdinfo --list` over
/// a few dozen exports.
pub const MAX_OPTIONS: u32 = 128;

/// Zero bytes after an `NBD_OPT_EXPORT_NAME` reply, unless the client set
/// `NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Context id the tracker gives `base:allocation` when a client selects it.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Handshake flags the tracker advertises.
const SERVER_FLAGS: HandshakeFlags =
    HandshakeFlags::FIXED_NEWSTYLE.union(HandshakeFlags::NO_ZEROES);

/// Transmission flags the tracker can honour; other bits from the catalog
/// are dropped before a client sees them.
pub(crate) const OFFERABLE_FLAGS: TransmissionFlags = TransmissionFlags::HAS_FLAGS
    .union(TransmissionFlags::READ_ONLY)
    .union(TransmissionFlags::SEND_FLUSH)
    .union(TransmissionFlags::SEND_FUA)
    .union(TransmissionFlags::ROTATIONAL)
    .union(TransmissionFlags::SEND_TRIM)
    .union(TransmissionFlags::SEND_WRITE_ZEROES)
    .union(TransmissionFlags::SEND_DF)
    .union(TransmissionFlags::CAN_MULTI_CONN)
    .union(TransmissionFlags::SEND_CACHE)
    .union(TransmissionFlags::SEND_FAST_ZERO);

/// Why the handshake ends in a hard disconnect. Every variant is the
/// client's fault: the tracker never drops a well-behaved client.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The client set flag bits the server did not advertise; the protocol
    /// requires dropping the connection.
    #[error("client sent unknown client flags {flags:#010x}")]
    UnknownClientFlags {
        /// The client flags as received.
        flags: u32,
    },
    /// An option header did not start with `IHAVEOPT`; the stream cannot be
    /// parsed any further.
    #[error("option header starts with {magic:#018x}, not IHAVEOPT")]
    BadOptionMagic {
        /// The first 8 bytes of the header.
        magic: u64,
    },
    /// An option announced more data than [`MAX_OPTION_LEN`].
    #[error(
        "option {option} announces {len} bytes of data, more than the {MAX_OPTION_LEN} accepted"
    )]
    OptionTooLong {
        /// The option code.
        option: u32,
        /// The announced data length.
        len: u32,
    },
    /// The client sent more than [`MAX_OPTIONS`] options.
    #[error("client sent more than {MAX_OPTIONS} options without entering transmission")]
    TooManyOptions,
    /// A client that did not set `FIXED_NEWSTYLE` sent an option other than
    /// `NBD_OPT_EXPORT_NAME`.
    #[error(
        "option {option} requires fixed newstyle negotiation, which the client did not select"
    )]
    RequiresFixedNewstyle {
        /// The option code.
        option: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` carried a name that is not a valid NBD string
    /// (UTF-8, no NUL, at most 4096 bytes); this option cannot be refused
    /// with an error reply.
    #[error("NBD_OPT_EXPORT_NAME carries an invalid export name")]
    InvalidExportName,
    /// `NBD_OPT_EXPORT_NAME` named an export the catalog does not have; this
    /// option cannot be refused with an error reply.
    #[error("NBD_OPT_EXPORT_NAME asks for unknown export {name:?}")]
    UnknownExport {
        /// The requested name.
        name: String,
    },
}

impl ClientFlags {
    /// Decodes the client's answer to the greeting. Any bit the server did
    /// not advertise is an error: the protocol requires dropping the
    /// connection.
    pub fn decode(bytes: &[u8; CLIENT_FLAGS_LEN]) -> Result<Self, HandshakeError> {
        let flags = Self::from_bits_retain(u32::from_be_bytes(*bytes));
        // Every known client flag answers a handshake flag the tracker
        // advertises, so "not advertised" is the same as "unknown".
        if Self::all().contains(flags) {
            Ok(flags)
        } else {
            Err(HandshakeError::UnknownClientFlags {
                flags: flags.bits(),
            })
        }
    }
}

/// The 16-byte header of an option the client sends; `len` bytes of option
/// data follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`NBD_OPT_*`), possibly one the tracker does not know.
    pub option: u32,
    /// Length of the option data, at most [`MAX_OPTION_LEN`].
    pub len: u32,
}

impl OptionHeader {
    /// Decodes an option header. An error means the connection must be
    /// closed: either the stream is not NBD or its data is not worth reading.
    pub fn decode(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<Self, HandshakeError> {
        let fields = Fields(*bytes);
        let magic = fields.u64_at::<0>();
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic { magic });
        }
        let option = fields.u32_at::<8>();
        let len = fields.u32_at::<12>();
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::OptionTooLong { option, len });
        }
        Ok(Self { option, len })
    }

    /// Encodes the header as a client sends it.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut fields = Fields::zeroed();
        fields.set_u64_at::<0>(IHAVEOPT);
        fields.set_u32_at::<8>(self.option);
        fields.set_u32_at::<12>(self.len);
        fields.0
    }
}

/// First state: the greeting is to be sent and the client's flags awaited.
#[derive(Debug, Default)]
pub struct AwaitClientFlags {
    _private: (),
}

impl AwaitClientFlags {
    /// Starts a handshake on a new connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes to send first: `NBDMAGIC`, `IHAVEOPT`, and the handshake
    /// flags `FIXED_NEWSTYLE | NO_ZEROES`.
    pub fn greeting(&self) -> [u8; GREETING_LEN] {
        let mut fields = Fields::zeroed();
        fields.set_u64_at::<0>(NBD_MAGIC);
        fields.set_u64_at::<8>(IHAVEOPT);
        fields.set_u16_at::<16>(SERVER_FLAGS.bits());
        fields.0
    }

    /// Takes the client's 4 flag bytes; on success, option haggling begins.
    pub fn handle_client_flags(
        self,
        bytes: &[u8; CLIENT_FLAGS_LEN],
    ) -> Result<Options, HandshakeError> {
        let client = ClientFlags::decode(bytes)?;
        Ok(Options {
            client,
            structured_replies: false,
            base_allocation_for: None,
            options_seen: 0,
        })
    }
}

/// Second state: option haggling.
#[derive(Debug)]
pub struct Options {
    client: ClientFlags,
    structured_replies: bool,
    /// Canonical name of the export for which the last
    /// `NBD_OPT_SET_META_CONTEXT` selected `base:allocation`.
    base_allocation_for: Option<String>,
    options_seen: u32,
}

/// What to do after one option.
#[derive(Debug)]
pub enum OptionOutcome {
    /// Send `reply`, then read the next option and give it to `options`.
    Reply {
        /// The state that handles the next option.
        options: Options,
        /// Option replies to send.
        reply: Vec<u8>,
    },
    /// Send `reply` (the acknowledgement of `NBD_OPT_ABORT`), then close.
    Abort {
        /// Option reply to send.
        reply: Vec<u8>,
    },
    /// Send `reply`, then serve transmission-phase requests for `session`.
    Go {
        /// What the client and server agreed on.
        session: Negotiated,
        /// Bytes to send: option replies ending in `NBD_REP_ACK` for
        /// `NBD_OPT_GO`, or the bare export reply for `NBD_OPT_EXPORT_NAME`.
        reply: Vec<u8>,
    },
    /// Hard disconnect, sending nothing.
    Close(HandshakeError),
}

/// Final state: what the client and server agreed on for the transmission
/// phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export, with `flags` set to the transmission flags the client was
    /// sent; the transmission validator holds the client to exactly these.
    pub export: ExportInfo,
    /// Whether replies with data (and all read replies) must be structured.
    pub structured_replies: bool,
    /// Context id of `base:allocation` if it was selected for this export;
    /// block-status requests are refused without it.
    pub base_allocation: Option<u32>,
}

impl Negotiated {
    /// A session that starts in transmission without any negotiation: the
    /// kernel's NBD client attached over netlink, which was handed the
    /// export's size and flags directly and does no handshake. Such a
    /// client uses simple replies and no metadata context, so the flags it
    /// may rely on are those of a connection without structured replies.
    pub fn without_handshake(mut export: ExportInfo) -> Self {
        export.flags = advertised_flags(export.flags, false);
        Self {
            export,
            structured_replies: false,
            base_allocation: None,
        }
    }
}

impl Options {
    /// The flags the client sent in reply to the greeting.
    pub fn client_flags(&self) -> ClientFlags {
        self.client
    }

    /// Whether the client has negotiated structured replies so far.
    pub fn structured_replies(&self) -> bool {
        self.structured_replies
    }

    /// Handles one option: its code (from [`OptionHeader::option`]) and its
    /// complete data. Never panics, whatever the bytes.
    pub fn handle_option(
        mut self,
        option: u32,
        payload: &[u8],
        exports: &dyn ExportCatalog,
    ) -> OptionOutcome {
        self.options_seen = self.options_seen.saturating_add(1);
        if self.options_seen > MAX_OPTIONS {
            return OptionOutcome::Close(HandshakeError::TooManyOptions);
        }
        let code = OptionCode::from_code(option);
        if !self.client.contains(ClientFlags::FIXED_NEWSTYLE)
            && code != Some(OptionCode::ExportName)
        {
            return OptionOutcome::Close(HandshakeError::RequiresFixedNewstyle { option });
        }
        match code {
            Some(OptionCode::ExportName) => self.export_name(payload, exports),
            Some(OptionCode::Abort) => {
                // The protocol asks servers to ignore data sent with ABORT.
                let mut reply = Vec::new();
                push_reply(&mut reply, option, ReplyCode::Ack, &[]);
                OptionOutcome::Abort { reply }
            }
            Some(OptionCode::List) => self.list(option, payload, exports),
            Some(OptionCode::Info) => self.info_or_go(option, payload, exports, false),
            Some(OptionCode::Go) => self.info_or_go(option, payload, exports, true),
            Some(OptionCode::StructuredReply) => self.structured_reply(option, payload),
            Some(OptionCode::ListMetaContext) => self.list_meta_context(option, payload, exports),
            Some(OptionCode::SetMetaContext) => self.set_meta_context(option, payload, exports),
            Some(OptionCode::StartTls) => self.refuse(
                option,
                ReplyCode::ErrUnsup,
                "TLS is not supported: the tracker serves a local unix socket",
            ),
            Some(OptionCode::ExtendedHeaders) => self.refuse(
                option,
                ReplyCode::ErrUnsup,
                "extended headers are not supported",
            ),
            Some(OptionCode::PeekExport) | None => {
                self.refuse(option, ReplyCode::ErrUnsup, "unknown option")
            }
        }
    }

    fn reply(self, reply: Vec<u8>) -> OptionOutcome {
        OptionOutcome::Reply {
            options: self,
            reply,
        }
    }

    fn refuse(self, option: u32, code: ReplyCode, message: &str) -> OptionOutcome {
        let mut reply = Vec::new();
        push_reply(
            &mut reply,
            option,
            code,
            &[within_string_limit(message).as_bytes()],
        );
        self.reply(reply)
    }

    fn enter_transmission(self, mut export: ExportInfo) -> Negotiated {
        export.flags = advertised_flags(export.flags, self.structured_replies);
        let base_allocation = match &self.base_allocation_for {
            Some(name) if *name == export.name => Some(BASE_ALLOCATION_ID),
            _ => None,
        };
        Negotiated {
            export,
            structured_replies: self.structured_replies,
            base_allocation,
        }
    }

    fn export_name(self, payload: &[u8], exports: &dyn ExportCatalog) -> OptionOutcome {
        let Some(name) = parse_string(payload) else {
            return OptionOutcome::Close(HandshakeError::InvalidExportName);
        };
        let Some(export) = resolve(exports, name) else {
            return OptionOutcome::Close(HandshakeError::UnknownExport {
                name: name.to_owned(),
            });
        };
        let no_zeroes = self.client.contains(ClientFlags::NO_ZEROES);
        let session = self.enter_transmission(export);
        let mut reply = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
        reply.extend_from_slice(&session.export.size.to_be_bytes());
        reply.extend_from_slice(&session.export.flags.bits().to_be_bytes());
        if !no_zeroes {
            reply.resize(reply.len() + EXPORT_NAME_PADDING, 0);
        }
        OptionOutcome::Go { session, reply }
    }

    fn list(self, option: u32, payload: &[u8], exports: &dyn ExportCatalog) -> OptionOutcome {
        if !payload.is_empty() {
            return self.refuse(option, ReplyCode::ErrInvalid, "NBD_OPT_LIST takes no data");
        }
        let mut reply = Vec::new();
        // A name a client could not send back is not worth listing.
        for export in exports.list().iter().filter(|e| is_valid_name(&e.name)) {
            let description = within_string_limit(&export.description);
            push_reply(
                &mut reply,
                option,
                ReplyCode::Server,
                &[
                    &string_len(&export.name).to_be_bytes(),
                    export.name.as_bytes(),
                    description.as_bytes(),
                ],
            );
        }
        push_reply(&mut reply, option, ReplyCode::Ack, &[]);
        self.reply(reply)
    }

    fn info_or_go(
        self,
        option: u32,
        payload: &[u8],
        exports: &dyn ExportCatalog,
        go: bool,
    ) -> OptionOutcome {
        let request = match InfoRequest::parse(payload) {
            Ok(request) => request,
            Err(problem) => return self.refuse(option, ReplyCode::ErrInvalid, problem),
        };
        let Some(export) = resolve(exports, request.name) else {
            let why = unknown_export(exports, request.name);
            return self.refuse(option, ReplyCode::ErrUnknown, &why);
        };
        let flags = advertised_flags(export.flags, self.structured_replies);
        let mut reply = Vec::new();
        push_reply(
            &mut reply,
            option,
            ReplyCode::Info,
            &[
                &InfoType::Export.code().to_be_bytes(),
                &export.size.to_be_bytes(),
                &flags.bits().to_be_bytes(),
            ],
        );
        if request.wants_name {
            push_reply(
                &mut reply,
                option,
                ReplyCode::Info,
                &[
                    &InfoType::Name.code().to_be_bytes(),
                    within_string_limit(&export.name).as_bytes(),
                ],
            );
        }
        if request.wants_description && !export.description.is_empty() {
            push_reply(
                &mut reply,
                option,
                ReplyCode::Info,
                &[
                    &InfoType::Description.code().to_be_bytes(),
                    within_string_limit(&export.description).as_bytes(),
                ],
            );
        }
        // Sent unasked too: the tracker enforces these sizes, and a client
        // that did not ask is still told rather than surprised by EINVAL.
        let sizes = export.block_sizes;
        push_reply(
            &mut reply,
            option,
            ReplyCode::Info,
            &[
                &InfoType::BlockSize.code().to_be_bytes(),
                &sizes.min().to_be_bytes(),
                &sizes.preferred().to_be_bytes(),
                &sizes.max().to_be_bytes(),
            ],
        );
        push_reply(&mut reply, option, ReplyCode::Ack, &[]);
        if go {
            OptionOutcome::Go {
                session: self.enter_transmission(export),
                reply,
            }
        } else {
            self.reply(reply)
        }
    }

    fn structured_reply(mut self, option: u32, payload: &[u8]) -> OptionOutcome {
        if !payload.is_empty() {
            return self.refuse(
                option,
                ReplyCode::ErrInvalid,
                "NBD_OPT_STRUCTURED_REPLY takes no data",
            );
        }
        // Repeating it is harmless, so it is acknowledged again.
        self.structured_replies = true;
        let mut reply = Vec::new();
        push_reply(&mut reply, option, ReplyCode::Ack, &[]);
        self.reply(reply)
    }

    fn list_meta_context(
        self,
        option: u32,
        payload: &[u8],
        exports: &dyn ExportCatalog,
    ) -> OptionOutcome {
        if !self.structured_replies {
            return self.refuse(
                option,
                ReplyCode::ErrInvalid,
                "metadata contexts need structured replies first",
            );
        }
        let request = match MetaContextRequest::parse(payload) {
            Ok(request) => request,
            Err(problem) => return self.refuse(option, ReplyCode::ErrInvalid, problem),
        };
        if resolve(exports, request.export).is_none() {
            let why = unknown_export(exports, request.export);
            return self.refuse(option, ReplyCode::ErrUnknown, &why);
        }
        let mut reply = Vec::new();
        if request.lists_base_allocation() {
            // Ids in a listing are reserved and sent as zero.
            push_meta_context(&mut reply, option, 0);
        }
        push_reply(&mut reply, option, ReplyCode::Ack, &[]);
        self.reply(reply)
    }

    fn set_meta_context(
        mut self,
        option: u32,
        payload: &[u8],
        exports: &dyn ExportCatalog,
    ) -> OptionOutcome {
        // The new request replaces the old selection even if it fails.
        self.base_allocation_for = None;
        if !self.structured_replies {
            return self.refuse(
                option,
                ReplyCode::ErrInvalid,
                "metadata contexts need structured replies first",
            );
        }
        let request = match MetaContextRequest::parse(payload) {
            Ok(request) => request,
            Err(problem) => return self.refuse(option, ReplyCode::ErrInvalid, problem),
        };
        let Some(export) = resolve(exports, request.export) else {
            let why = unknown_export(exports, request.export);
            return self.refuse(option, ReplyCode::ErrUnknown, &why);
        };
        let mut reply = Vec::new();
        if request.selects_base_allocation {
            push_meta_context(&mut reply, option, BASE_ALLOCATION_ID);
            self.base_allocation_for = Some(export.name);
        }
        push_reply(&mut reply, option, ReplyCode::Ack, &[]);
        self.reply(reply)
    }
}

/// Transmission flags as the client will see them for this connection.
fn advertised_flags(offered: TransmissionFlags, structured_replies: bool) -> TransmissionFlags {
    let mut flags = offered
        .intersection(OFFERABLE_FLAGS)
        .union(TransmissionFlags::HAS_FLAGS);
    if !structured_replies {
        flags = flags.difference(TransmissionFlags::SEND_DF);
    }
    if !flags.contains(TransmissionFlags::SEND_WRITE_ZEROES) {
        flags = flags.difference(TransmissionFlags::SEND_FAST_ZERO);
    }
    flags
}

/// The export a client means by `name`; the empty name is the default.
fn resolve(exports: &dyn ExportCatalog, name: &str) -> Option<ExportInfo> {
    if name.is_empty() {
        exports.default_export()
    } else {
        exports.lookup(name)
    }
}

/// Why `name` selects no export, with the names that would: a client that
/// asked for the default of a server with several exports learns what to
/// ask for instead.
fn unknown_export(exports: &dyn ExportCatalog, name: &str) -> String {
    let names: Vec<String> = exports
        .list()
        .iter()
        .filter(|e| is_valid_name(&e.name))
        .map(|e| format!("{:?}", e.name))
        .collect();
    let asked = if name.is_empty() {
        "no default export (the empty name): there is more than one".to_owned()
    } else {
        format!("no export {name:?}")
    };
    format!("{asked}; the exports are {}", names.join(", "))
}

/// Appends one option reply (header and data) to `out`.
fn push_reply(out: &mut Vec<u8>, option: u32, code: ReplyCode, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|part| part.len()).sum();
    let mut header = Fields::<OPTION_REPLY_HEADER_LEN>::zeroed();
    header.set_u64_at::<0>(OPTION_REPLY_MAGIC);
    header.set_u32_at::<8>(option);
    header.set_u32_at::<12>(code.code());
    // Reply data is a few strings cut to MAX_STRING_LEN and fixed fields, far
    // below u32::MAX.
    header.set_u32_at::<16>(u32::try_from(len).unwrap_or(u32::MAX));
    out.extend_from_slice(&header.0);
    for part in parts {
        out.extend_from_slice(part);
    }
}

fn push_meta_context(out: &mut Vec<u8>, option: u32, id: u32) {
    push_reply(
        out,
        option,
        ReplyCode::MetaContext,
        &[&id.to_be_bytes(), BASE_ALLOCATION.as_bytes()],
    );
}

/// A client-sent string as the protocol defines strings: UTF-8, no NUL, at
/// most [`MAX_STRING_LEN`] bytes.
fn parse_string(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Whether a client could ask for this name.
fn is_valid_name(name: &str) -> bool {
    name.len() <= MAX_STRING_LEN && !name.contains('\0')
}

/// Length of a string already known to fit the protocol's limit.
fn string_len(text: &str) -> u32 {
    u32::try_from(text.len()).unwrap_or(u32::MAX)
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`:
/// `u32 name length, name, u16 count, count × u16 information type`.
struct InfoRequest<'a> {
    name: &'a str,
    wants_name: bool,
    wants_description: bool,
}

impl<'a> InfoRequest<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, &'static str> {
        let mut reader = PayloadReader::new(payload);
        let name_len = reader
            .u32()
            .ok_or("option data ends before the name length")?;
        let name = reader
            .take(name_len)
            .ok_or("export name runs past the option data")?;
        let name = parse_string(name).ok_or("export name is not a valid NBD string")?;
        let count = reader
            .u16()
            .ok_or("option data ends before the information request count")?;
        let mut request = Self {
            name,
            wants_name: false,
            wants_description: false,
        };
        for _ in 0..count {
            let info = reader
                .u16()
                .ok_or("information requests run past the option data")?;
            // Unknown requests must be ignored; export and block size
            // information is sent whether asked for or not.
            match InfoType::from_code(info) {
                Some(InfoType::Name) => request.wants_name = true,
                Some(InfoType::Description) => request.wants_description = true,
                Some(InfoType::Export | InfoType::BlockSize) | None => {}
            }
        }
        if !reader.is_empty() {
            return Err("option data continues after the information requests");
        }
        Ok(request)
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`:
/// `u32 name length, name, u32 count, count × (u32 length, query)`.
struct MetaContextRequest<'a> {
    export: &'a str,
    queries: u32,
    /// A query names `base:allocation` exactly.
    selects_base_allocation: bool,
    /// A query is the `base:` wildcard.
    has_base_wildcard: bool,
}

impl<'a> MetaContextRequest<'a> {
    fn parse(payload: &'a [u8]) -> Result<Self, &'static str> {
        let mut reader = PayloadReader::new(payload);
        let name_len = reader
            .u32()
            .ok_or("option data ends before the name length")?;
        let name = reader
            .take(name_len)
            .ok_or("export name runs past the option data")?;
        let export = parse_string(name).ok_or("export name is not a valid NBD string")?;
        let queries = reader
            .u32()
            .ok_or("option data ends before the query count")?;
        let mut request = Self {
            export,
            queries,
            selects_base_allocation: false,
            has_base_wildcard: false,
        };
        // Each query consumes at least 4 bytes or fails, so a huge count
        // cannot keep this loop busy past the end of the data.
        for _ in 0..queries {
            let len = reader.u32().ok_or("queries run past the option data")?;
            let query = reader.take(len).ok_or("query runs past the option data")?;
            let query = parse_string(query).ok_or("query is not a valid NBD string")?;
            let (namespace, leaf) = query
                .split_once(':')
                .ok_or("query lacks the colon after its namespace")?;
            if namespace.is_empty() {
                return Err("query has an empty namespace");
            }
            // Other namespaces, and unknown leaves of `base:`, are ignored.
            match (namespace, leaf) {
                ("base", "allocation") => request.selects_base_allocation = true,
                ("base", "") => request.has_base_wildcard = true,
                _ => {}
            }
        }
        if !reader.is_empty() {
            return Err("option data continues after the queries");
        }
        Ok(request)
    }

    /// Whether a listing answers with `base:allocation`: no query means all
    /// contexts, and `base:` is the namespace's wildcard.
    fn lists_base_allocation(&self) -> bool {
        self.queries == 0 || self.selects_base_allocation || self.has_base_wildcard
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::nbd::export::BlockSizes;

    struct Catalog {
        exports: Vec<ExportInfo>,
        default: Option<usize>,
    }

    impl ExportCatalog for Catalog {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            self.exports.iter().find(|e| e.name == name).cloned()
        }

        fn list(&self) -> Vec<ExportInfo> {
            self.exports.clone()
        }

        fn default_export(&self) -> Option<ExportInfo> {
            self.default.map(|index| self.exports[index].clone())
        }
    }

    const ALL_WRITE_FLAGS: TransmissionFlags = TransmissionFlags::SEND_FLUSH
        .union(TransmissionFlags::SEND_FUA)
        .union(TransmissionFlags::SEND_TRIM)
        .union(TransmissionFlags::SEND_WRITE_ZEROES)
        .union(TransmissionFlags::SEND_FAST_ZERO)
        .union(TransmissionFlags::SEND_DF);

    fn catalog() -> Catalog {
        let sizes = BlockSizes::new(512, 4096, 1 << 20).unwrap();
        Catalog {
            exports: vec![
                ExportInfo {
                    name: "data".into(),
                    description: "database data disk".into(),
                    size: 1 << 30,
                    flags: ALL_WRITE_FLAGS,
                    block_sizes: sizes,
                },
                ExportInfo {
                    name: "wal".into(),
                    description: String::new(),
                    size: 1 << 20,
                    flags: TransmissionFlags::READ_ONLY | TransmissionFlags::SEND_RESIZE,
                    block_sizes: sizes,
                },
            ],
            default: Some(0),
        }
    }

    fn options_with(flags: ClientFlags) -> Options {
        AwaitClientFlags::new()
            .handle_client_flags(&flags.bits().to_be_bytes())
            .unwrap()
    }

    fn fresh() -> Options {
        options_with(ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES)
    }

    const fn code(option: OptionCode) -> u32 {
        option.code()
    }

    /// One option reply, as a strict client parses it.
    #[derive(Debug, PartialEq)]
    struct ParsedReply {
        option: u32,
        code: u32,
        data: Vec<u8>,
    }

    fn parse_replies(mut bytes: &[u8]) -> Result<Vec<ParsedReply>, String> {
        let mut replies = Vec::new();
        while !bytes.is_empty() {
            let Some((header, rest)) = bytes.split_first_chunk::<OPTION_REPLY_HEADER_LEN>() else {
                return Err(format!("{} stray bytes", bytes.len()));
            };
            let fields = Fields(*header);
            if fields.u64_at::<0>() != OPTION_REPLY_MAGIC {
                return Err("bad reply magic".into());
            }
            let len = fields.u32_at::<16>() as usize;
            if rest.len() < len {
                return Err("reply data runs past the end".into());
            }
            replies.push(ParsedReply {
                option: fields.u32_at::<8>(),
                code: fields.u32_at::<12>(),
                data: rest[..len].to_vec(),
            });
            bytes = &rest[len..];
        }
        Ok(replies)
    }

    fn continued(outcome: OptionOutcome) -> (Options, Vec<ParsedReply>) {
        match outcome {
            OptionOutcome::Reply { options, reply } => (options, parse_replies(&reply).unwrap()),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn went(outcome: OptionOutcome) -> (Negotiated, Vec<u8>) {
        match outcome {
            OptionOutcome::Go { session, reply } => (session, reply),
            other => panic!("expected transmission, got {other:?}"),
        }
    }

    fn codes(replies: &[ParsedReply]) -> Vec<ReplyCode> {
        replies
            .iter()
            .map(|reply| ReplyCode::from_code(reply.code).unwrap())
            .collect()
    }

    fn info_payload(name: &str, infos: &[InfoType]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.code().to_be_bytes());
        }
        data
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for query in queries {
            data.extend_from_slice(&(query.len() as u32).to_be_bytes());
            data.extend_from_slice(query.as_bytes());
        }
        data
    }

    /// Structured replies negotiated, ready for metadata options.
    fn structured() -> Options {
        let (options, replies) =
            continued(fresh().handle_option(code(OptionCode::StructuredReply), &[], &catalog()));
        assert_eq!(codes(&replies), [ReplyCode::Ack]);
        options
    }

    fn info_types(replies: &[ParsedReply]) -> Vec<u16> {
        replies
            .iter()
            .filter(|reply| reply.code == ReplyCode::Info.code())
            .map(|reply| u16::from_be_bytes([reply.data[0], reply.data[1]]))
            .collect()
    }

    #[test]
    fn greeting_is_magics_and_our_handshake_flags() {
        let greeting = AwaitClientFlags::new().greeting();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(&greeting[16..], &[0, 3]);
    }

    #[test]
    fn client_flags_accept_what_we_advertise_and_nothing_else() {
        for bits in 0..4u32 {
            assert_eq!(
                ClientFlags::decode(&bits.to_be_bytes()),
                Ok(ClientFlags::from_bits_retain(bits))
            );
        }
        assert_eq!(
            ClientFlags::decode(&4u32.to_be_bytes()),
            Err(HandshakeError::UnknownClientFlags { flags: 4 })
        );
        assert!(AwaitClientFlags::new()
            .handle_client_flags(&0x8000_0001u32.to_be_bytes())
            .is_err());
    }

    #[test]
    fn option_header_checks_magic_and_length() {
        let header = OptionHeader {
            option: 7,
            len: MAX_OPTION_LEN,
        };
        assert_eq!(OptionHeader::decode(&header.encode()), Ok(header));
        let too_long = OptionHeader {
            option: 7,
            len: MAX_OPTION_LEN + 1,
        };
        assert_eq!(
            OptionHeader::decode(&too_long.encode()),
            Err(HandshakeError::OptionTooLong {
                option: 7,
                len: MAX_OPTION_LEN + 1
            })
        );
        let mut bad = header.encode();
        bad[0] ^= 1;
        assert!(matches!(
            OptionHeader::decode(&bad),
            Err(HandshakeError::BadOptionMagic { .. })
        ));
    }

    #[test]
    fn export_name_enters_transmission_with_padding_unless_no_zeroes() {
        let (session, reply) =
            went(fresh().handle_option(code(OptionCode::ExportName), b"data", &catalog()));
        assert_eq!(reply.len(), 10);
        assert_eq!(&reply[..8], &(1u64 << 30).to_be_bytes());
        let flags = TransmissionFlags::from_bits_retain(u16::from_be_bytes([reply[8], reply[9]]));
        assert_eq!(flags, session.export.flags);
        assert!(flags.contains(TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH));
        // No structured replies were negotiated, so DF must not be offered.
        assert!(!flags.contains(TransmissionFlags::SEND_DF));
        assert!(!session.structured_replies);
        assert_eq!(session.base_allocation, None);

        let padded = options_with(ClientFlags::FIXED_NEWSTYLE);
        let (_, reply) =
            went(padded.handle_option(code(OptionCode::ExportName), b"wal", &catalog()));
        assert_eq!(reply.len(), 10 + EXPORT_NAME_PADDING);
        assert!(reply[10..].iter().all(|&b| b == 0));
        // Extension bits the tracker does not implement are never offered.
        let flags = TransmissionFlags::from_bits_retain(u16::from_be_bytes([reply[8], reply[9]]));
        assert_eq!(
            flags,
            TransmissionFlags::HAS_FLAGS | TransmissionFlags::READ_ONLY
        );
    }

    #[test]
    fn export_name_empty_means_the_default_export() {
        let (session, _) =
            went(fresh().handle_option(code(OptionCode::ExportName), b"", &catalog()));
        assert_eq!(session.export.name, "data");
        let no_default = Catalog {
            default: None,
            ..catalog()
        };
        assert!(matches!(
            fresh().handle_option(code(OptionCode::ExportName), b"", &no_default),
            OptionOutcome::Close(HandshakeError::UnknownExport { .. })
        ));
    }

    #[test]
    fn export_name_that_cannot_be_served_is_a_hard_disconnect() {
        assert!(matches!(
            fresh().handle_option(code(OptionCode::ExportName), b"nope", &catalog()),
            OptionOutcome::Close(HandshakeError::UnknownExport { name }) if name == "nope"
        ));
        for bad in [
            &b"da\0ta"[..],
            &[0xff, 0xfe][..],
            &[b'a'; MAX_STRING_LEN + 1][..],
        ] {
            assert!(matches!(
                fresh().handle_option(code(OptionCode::ExportName), bad, &catalog()),
                OptionOutcome::Close(HandshakeError::InvalidExportName)
            ));
        }
    }

    #[test]
    fn abort_is_acknowledged_even_with_data() {
        match fresh().handle_option(code(OptionCode::Abort), b"junk", &catalog()) {
            OptionOutcome::Abort { reply } => {
                let replies = parse_replies(&reply).unwrap();
                assert_eq!(codes(&replies), [ReplyCode::Ack]);
                assert_eq!(replies[0].option, code(OptionCode::Abort));
            }
            other => panic!("expected abort, got {other:?}"),
        }
    }

    #[test]
    fn list_sends_one_server_reply_per_export_then_ack() {
        let (_, replies) =
            continued(fresh().handle_option(code(OptionCode::List), &[], &catalog()));
        assert_eq!(
            codes(&replies),
            [ReplyCode::Server, ReplyCode::Server, ReplyCode::Ack]
        );
        let mut first = 4u32.to_be_bytes().to_vec();
        first.extend_from_slice(b"datadatabase data disk");
        assert_eq!(replies[0].data, first);
        let mut second = 3u32.to_be_bytes().to_vec();
        second.extend_from_slice(b"wal");
        assert_eq!(replies[1].data, second);
    }

    #[test]
    fn list_leaves_out_names_no_client_could_send() {
        let mut exports = catalog();
        exports.exports[1].name = "x".repeat(MAX_STRING_LEN + 1);
        let (_, replies) = continued(fresh().handle_option(code(OptionCode::List), &[], &exports));
        assert_eq!(codes(&replies), [ReplyCode::Server, ReplyCode::Ack]);
    }

    #[test]
    fn list_with_data_is_invalid() {
        let (_, replies) =
            continued(fresh().handle_option(code(OptionCode::List), b"x", &catalog()));
        assert_eq!(codes(&replies), [ReplyCode::ErrInvalid]);
        assert!(!replies[0].data.is_empty(), "errors carry a message");
    }

    #[test]
    fn info_describes_the_export_and_stays_in_negotiation() {
        let payload = info_payload("data", &[InfoType::Name, InfoType::Description]);
        let (_, replies) =
            continued(fresh().handle_option(code(OptionCode::Info), &payload, &catalog()));
        assert_eq!(replies.last().unwrap().code, ReplyCode::Ack.code());
        assert_eq!(info_types(&replies), [0, 1, 2, 3]);
        let export = &replies[0].data;
        assert_eq!(export.len(), 12);
        assert_eq!(&export[2..10], &(1u64 << 30).to_be_bytes());
        assert_eq!(&replies[1].data[2..], b"data");
        assert_eq!(&replies[2].data[2..], b"database data disk");
        let block_size = &replies[3].data;
        assert_eq!(block_size.len(), 14);
        assert_eq!(&block_size[2..6], &512u32.to_be_bytes());
        assert_eq!(&block_size[6..10], &4096u32.to_be_bytes());
        assert_eq!(&block_size[10..14], &(1u32 << 20).to_be_bytes());
    }

    #[test]
    fn info_without_requests_still_sends_export_and_block_size() {
        let payload = info_payload("wal", &[InfoType::Description, InfoType::BlockSize]);
        let (_, replies) =
            continued(fresh().handle_option(code(OptionCode::Info), &payload, &catalog()));
        // The empty description is not worth a reply.
        assert_eq!(info_types(&replies), [0, 3]);
    }

    #[test]
    fn info_then_go_with_the_same_request_agree() {
        let payload = info_payload("data", &[InfoType::BlockSize, InfoType::Name]);
        let (options, info) =
            continued(fresh().handle_option(code(OptionCode::Info), &payload, &catalog()));
        let (_, go) = went(options.handle_option(code(OptionCode::Go), &payload, &catalog()));
        let go = parse_replies(&go).unwrap();
        let data = |replies: &[ParsedReply]| -> Vec<(u32, Vec<u8>)> {
            replies.iter().map(|r| (r.code, r.data.clone())).collect()
        };
        assert_eq!(data(&info), data(&go));
    }

    #[test]
    fn info_ignores_unknown_information_requests() {
        let mut payload = info_payload("data", &[]);
        let count_at = payload.len() - 2;
        payload[count_at..].copy_from_slice(&2u16.to_be_bytes());
        payload.extend_from_slice(&0x7777u16.to_be_bytes());
        payload.extend_from_slice(&InfoType::Name.code().to_be_bytes());
        let (_, replies) =
            continued(fresh().handle_option(code(OptionCode::Info), &payload, &catalog()));
        assert_eq!(info_types(&replies), [0, 1, 3]);
    }

    #[test]
    fn go_enters_transmission_with_what_was_negotiated() {
        let payload = info_payload("", &[]);
        let (session, reply) =
            went(structured().handle_option(code(OptionCode::Go), &payload, &catalog()));
        let replies = parse_replies(&reply).unwrap();
        assert_eq!(
            codes(&replies),
            [ReplyCode::Info, ReplyCode::Info, ReplyCode::Ack]
        );
        assert!(replies.iter().all(|r| r.option == code(OptionCode::Go)));
        assert_eq!(session.export.name, "data");
        assert!(session.structured_replies);
        assert!(session.export.flags.contains(TransmissionFlags::SEND_DF));
        assert_eq!(
            &replies[0].data[10..12],
            &session.export.flags.bits().to_be_bytes()
        );
    }

    #[test]
    fn go_for_an_unknown_export_is_an_error_reply_not_a_disconnect() {
        let payload = info_payload("nope", &[]);
        let (options, replies) =
            continued(fresh().handle_option(code(OptionCode::Go), &payload, &catalog()));
        assert_eq!(codes(&replies), [ReplyCode::ErrUnknown]);
        // The client may try again.
        let (session, _) = went(options.handle_option(
            code(OptionCode::Go),
            &info_payload("wal", &[]),
            &catalog(),
        ));
        assert_eq!(session.export.name, "wal");
    }

    #[test]
    fn go_for_the_default_without_one_names_the_exports() {
        let no_default = Catalog {
            default: None,
            ..catalog()
        };
        let (_, replies) = continued(fresh().handle_option(
            code(OptionCode::Go),
            &info_payload("", &[]),
            &no_default,
        ));
        assert_eq!(codes(&replies), [ReplyCode::ErrUnknown]);
        let message = String::from_utf8_lossy(&replies[0].data);
        assert!(
            message.contains("no default export") && message.contains("\"data\", \"wal\""),
            "{message}"
        );
    }

    #[test]
    fn malformed_info_data_is_invalid() {
        let good = info_payload("data", &[InfoType::Name]);
        let mut trailing = good.clone();
        trailing.push(0);
        let mut long_name = good.clone();
        long_name[..4].copy_from_slice(&100u32.to_be_bytes());
        let mut short_list = good.clone();
        short_list.pop();
        let bad_utf8 = {
            let mut data = 2u32.to_be_bytes().to_vec();
            data.extend_from_slice(&[0xc3, 0x28, 0, 0]);
            data
        };
        for payload in [trailing, long_name, short_list, bad_utf8, vec![0, 0]] {
            for option in [OptionCode::Info, OptionCode::Go] {
                let (_, replies) =
                    continued(fresh().handle_option(code(option), &payload, &catalog()));
                assert_eq!(codes(&replies), [ReplyCode::ErrInvalid], "{payload:?}");
            }
        }
    }

    #[test]
    fn structured_reply_is_acknowledged_and_takes_no_data() {
        let options = structured();
        assert!(options.structured_replies());
        let (options, replies) =
            continued(options.handle_option(code(OptionCode::StructuredReply), &[], &catalog()));
        assert_eq!(codes(&replies), [ReplyCode::Ack]);
        let (options, replies) =
            continued(options.handle_option(code(OptionCode::StructuredReply), b"x", &catalog()));
        assert_eq!(codes(&replies), [ReplyCode::ErrInvalid]);
        assert!(options.structured_replies());
        assert!(!fresh().structured_replies());
    }

    #[test]
    fn meta_contexts_need_structured_replies() {
        for option in [OptionCode::ListMetaContext, OptionCode::SetMetaContext] {
            let payload = meta_payload("data", &[BASE_ALLOCATION]);
            let (_, replies) = continued(fresh().handle_option(code(option), &payload, &catalog()));
            assert_eq!(codes(&replies), [ReplyCode::ErrInvalid]);
        }
    }

    #[test]
    fn set_meta_context_selects_base_allocation_for_go() {
        let payload = meta_payload("data", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x", "base:"]);
        let (options, replies) = continued(structured().handle_option(
            code(OptionCode::SetMetaContext),
            &payload,
            &catalog(),
        ));
        assert_eq!(codes(&replies), [ReplyCode::MetaContext, ReplyCode::Ack]);
        assert_eq!(&replies[0].data[..4], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&replies[0].data[4..], BASE_ALLOCATION.as_bytes());
        let (session, _) =
            went(options.handle_option(code(OptionCode::Go), &info_payload("", &[]), &catalog()));
        assert_eq!(session.base_allocation, Some(BASE_ALLOCATION_ID));
    }

    #[test]
    fn base_allocation_only_reaches_the_export_it_was_selected_for() {
        let payload = meta_payload("wal", &[BASE_ALLOCATION]);
        let (options, _) = continued(structured().handle_option(
            code(OptionCode::SetMetaContext),
            &payload,
            &catalog(),
        ));
        let (session, _) =
            went(options.handle_option(code(OptionCode::ExportName), b"data", &catalog()));
        assert_eq!(session.base_allocation, None);
    }

    #[test]
    fn set_meta_context_replaces_the_selection_even_when_it_fails() {
        let (options, _) = continued(structured().handle_option(
            code(OptionCode::SetMetaContext),
            &meta_payload("data", &[BASE_ALLOCATION]),
            &catalog(),
        ));
        let (options, replies) = continued(options.handle_option(
            code(OptionCode::SetMetaContext),
            &meta_payload("data", &["no-colon"]),
            &catalog(),
        ));
        assert_eq!(codes(&replies), [ReplyCode::ErrInvalid]);
        let (session, _) =
            went(options.handle_option(code(OptionCode::ExportName), b"data", &catalog()));
        assert_eq!(session.base_allocation, None);
    }

    #[test]
    fn set_meta_context_without_a_match_selects_nothing() {
        for queries in [&[][..], &["base:"][..], &["base:other", "x-foo:bar"][..]] {
            let (_, replies) = continued(structured().handle_option(
                code(OptionCode::SetMetaContext),
                &meta_payload("data", queries),
                &catalog(),
            ));
            assert_eq!(codes(&replies), [ReplyCode::Ack], "{queries:?}");
        }
    }

    #[test]
    fn set_meta_context_for_an_unknown_export_is_unknown() {
        let (_, replies) = continued(structured().handle_option(
            code(OptionCode::SetMetaContext),
            &meta_payload("nope", &[BASE_ALLOCATION]),
            &catalog(),
        ));
        assert_eq!(codes(&replies), [ReplyCode::ErrUnknown]);
    }

    #[test]
    fn list_meta_context_answers_all_and_wildcard_queries() {
        for queries in [&[][..], &["base:"][..], &[BASE_ALLOCATION][..]] {
            let (_, replies) = continued(structured().handle_option(
                code(OptionCode::ListMetaContext),
                &meta_payload("data", queries),
                &catalog(),
            ));
            assert_eq!(codes(&replies), [ReplyCode::MetaContext, ReplyCode::Ack]);
            assert_eq!(&replies[0].data[..4], &[0, 0, 0, 0], "listed ids are zero");
        }
        let (_, replies) = continued(structured().handle_option(
            code(OptionCode::ListMetaContext),
            &meta_payload("data", &["qemu:"]),
            &catalog(),
        ));
        assert_eq!(codes(&replies), [ReplyCode::Ack]);
    }

    #[test]
    fn malformed_meta_context_data_is_invalid() {
        let good = meta_payload("data", &[BASE_ALLOCATION]);
        let mut trailing = good.clone();
        trailing.push(0);
        let mut truncated = good.clone();
        truncated.pop();
        let mut huge_count = meta_payload("data", &[]);
        let count_at = huge_count.len() - 4;
        huge_count[count_at..].copy_from_slice(&u32::MAX.to_be_bytes());
        let empty_namespace = meta_payload("data", &[":allocation"]);
        for payload in [trailing, truncated, huge_count, empty_namespace, vec![]] {
            let (_, replies) = continued(structured().handle_option(
                code(OptionCode::ListMetaContext),
                &payload,
                &catalog(),
            ));
            assert_eq!(codes(&replies), [ReplyCode::ErrInvalid], "{payload:?}");
        }
    }

    #[test]
    fn unsupported_options_are_refused_and_negotiation_continues() {
        for option in [
            code(OptionCode::StartTls),
            code(OptionCode::ExtendedHeaders),
            code(OptionCode::PeekExport),
            0,
            42,
            u32::MAX,
        ] {
            let (_, replies) = continued(fresh().handle_option(option, b"", &catalog()));
            assert_eq!(codes(&replies), [ReplyCode::ErrUnsup]);
            assert_eq!(replies[0].option, option);
        }
    }

    #[test]
    fn too_many_options_is_a_hard_disconnect() {
        let mut options = fresh();
        for _ in 0..MAX_OPTIONS {
            options = continued(options.handle_option(42, &[], &catalog())).0;
        }
        assert!(matches!(
            options.handle_option(code(OptionCode::List), &[], &catalog()),
            OptionOutcome::Close(HandshakeError::TooManyOptions)
        ));
    }

    #[test]
    fn a_client_without_fixed_newstyle_may_only_send_export_name() {
        let options = options_with(ClientFlags::empty());
        assert!(matches!(
            options.handle_option(code(OptionCode::List), &[], &catalog()),
            OptionOutcome::Close(HandshakeError::RequiresFixedNewstyle { option: 3 })
        ));
        let (_, reply) = went(options_with(ClientFlags::empty()).handle_option(
            code(OptionCode::ExportName),
            b"data",
            &catalog(),
        ));
        assert_eq!(reply.len(), 10 + EXPORT_NAME_PADDING);
    }

    // ---- properties ------------------------------------------------------

    /// Checks that an outcome is something a strict client can parse: every
    /// reply well-formed and answering `option`, exactly one final reply, at
    /// the end, and a successful INFO / GO describing the export.
    fn check_outcome(option: u32, outcome: &OptionOutcome) -> Result<(), TestCaseError> {
        let is_final = |code: u32| code == ReplyCode::Ack.code() || code & 0x8000_0000 != 0;
        let check_replies = |reply: &[u8]| -> Result<Vec<ParsedReply>, TestCaseError> {
            let replies = parse_replies(reply).map_err(TestCaseError::fail)?;
            prop_assert!(!replies.is_empty());
            prop_assert!(reply.starts_with(&OPTION_REPLY_MAGIC.to_be_bytes()));
            for (index, parsed) in replies.iter().enumerate() {
                prop_assert_eq!(parsed.option, option);
                prop_assert!(ReplyCode::from_code(parsed.code).is_some());
                prop_assert_eq!(is_final(parsed.code), index == replies.len() - 1);
            }
            let succeeded = replies.last().map(|r| r.code) == Some(ReplyCode::Ack.code());
            if succeeded && (option == code(OptionCode::Info) || option == code(OptionCode::Go)) {
                prop_assert_eq!(info_types(&replies).first().copied(), Some(0));
                prop_assert_eq!(replies[0].data.len(), 12);
            }
            Ok(replies)
        };
        match outcome {
            OptionOutcome::Reply { reply, .. } => {
                check_replies(reply)?;
            }
            OptionOutcome::Abort { reply } => {
                prop_assert_eq!(option, code(OptionCode::Abort));
                let replies = check_replies(reply)?;
                prop_assert_eq!(codes(&replies), [ReplyCode::Ack]);
            }
            OptionOutcome::Go { session, reply } => {
                prop_assert!(session.export.flags.contains(TransmissionFlags::HAS_FLAGS));
                if option == code(OptionCode::ExportName) {
                    prop_assert!(reply.len() == 10 || reply.len() == 10 + EXPORT_NAME_PADDING);
                } else {
                    prop_assert_eq!(option, code(OptionCode::Go));
                    let replies = check_replies(reply)?;
                    prop_assert_eq!(replies.last().map(|r| r.code), Some(ReplyCode::Ack.code()));
                }
            }
            OptionOutcome::Close(_) => {}
        }
        Ok(())
    }

    fn any_option() -> impl Strategy<Value = u32> {
        prop_oneof![0u32..=12, any::<u32>()]
    }

    /// Client flags (mostly fixed newstyle) and whether structured replies
    /// were already negotiated.
    fn start_state() -> impl Strategy<Value = (u32, bool)> {
        (
            prop_oneof![3 => Just(1u32), 3 => Just(3), 1 => 0u32..4],
            any::<bool>(),
        )
    }

    fn prepare(client_bits: u32, structured_replies: bool) -> Options {
        let mut options = options_with(ClientFlags::from_bits_retain(client_bits));
        options.structured_replies = structured_replies;
        options
    }

    /// Options with data shaped like their requests (names the catalog
    /// knows, plausible queries), sometimes damaged or sent under another
    /// option, so the deep branches are reached far more often than by
    /// random bytes.
    fn shaped_option() -> impl Strategy<Value = (u32, Vec<u8>)> {
        let name = prop_oneof![
            Just(String::new()),
            Just("data".to_owned()),
            Just("wal".to_owned()),
            "[a-z:]{0,6}",
        ];
        let query = prop_oneof![
            Just(BASE_ALLOCATION.to_owned()),
            Just("base:".to_owned()),
            "[a-z:]{0,10}",
        ];
        let infos = proptest::collection::vec(0u16..6, 0..5);
        let meta_option = prop_oneof![
            Just(code(OptionCode::ListMetaContext)),
            Just(code(OptionCode::SetMetaContext))
        ];
        let meta = (
            meta_option,
            name.clone(),
            proptest::collection::vec(query, 0..4),
        )
            .prop_map(|(option, name, queries)| {
                let queries: Vec<&str> = queries.iter().map(String::as_str).collect();
                (option, meta_payload(&name, &queries))
            });
        let info_option = prop_oneof![Just(code(OptionCode::Info)), Just(code(OptionCode::Go))];
        let info = (info_option, name, infos).prop_map(|(option, name, infos)| {
            let mut data = (name.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(name.as_bytes());
            data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
            for info in infos {
                data.extend_from_slice(&info.to_be_bytes());
            }
            (option, data)
        });
        let damage = (any::<prop::sample::Index>(), any::<u8>(), 0u8..8);
        let other_option = prop_oneof![3 => Just(None), 1 => any_option().prop_map(Some)];
        (prop_oneof![info, meta], damage, other_option).prop_map(
            |((option, mut data), (at, byte, how), other_option)| {
                match how {
                    0 if !data.is_empty() => {
                        let at = at.index(data.len());
                        data.truncate(at);
                    }
                    1 if !data.is_empty() => {
                        let at = at.index(data.len());
                        data[at] = byte;
                    }
                    2 => data.push(byte),
                    _ => {}
                }
                (other_option.unwrap_or(option), data)
            },
        )
    }

    proptest! {
        #[test]
        fn client_flags_decode_never_panics(bytes in any::<[u8; 4]>()) {
            let bits = u32::from_be_bytes(bytes);
            prop_assert_eq!(ClientFlags::decode(&bytes).is_ok(), bits & !3 == 0);
        }

        #[test]
        fn option_header_decode_never_panics(bytes in any::<[u8; 16]>(), real_magic in any::<bool>()) {
            let mut bytes = bytes;
            if real_magic {
                bytes[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
            }
            match OptionHeader::decode(&bytes) {
                Ok(header) => {
                    prop_assert!(header.len <= MAX_OPTION_LEN);
                    prop_assert_eq!(header.encode(), bytes);
                }
                Err(HandshakeError::BadOptionMagic { .. }) => prop_assert!(!real_magic),
                Err(HandshakeError::OptionTooLong { len, .. }) => prop_assert!(len > MAX_OPTION_LEN),
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
        }

        #[test]
        fn any_option_with_random_data_gets_a_well_formed_answer(
            (client, structured) in start_state(),
            option in any_option(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let outcome = prepare(client, structured).handle_option(option, &payload, &catalog());
            check_outcome(option, &outcome)?;
        }

        #[test]
        fn any_option_with_shaped_data_gets_a_well_formed_answer(
            (client, structured) in start_state(),
            (option, payload) in shaped_option(),
        ) {
            let outcome = prepare(client, structured).handle_option(option, &payload, &catalog());
            check_outcome(option, &outcome)?;
        }

        #[test]
        fn option_sequences_end_well_formed_and_bounded(
            (client, _) in start_state(),
            steps in proptest::collection::vec(
                prop_oneof![
                    shaped_option(),
                    (any_option(), proptest::collection::vec(any::<u8>(), 0..16)),
                ],
                0..40,
            ),
        ) {
            let mut options = options_with(ClientFlags::from_bits_retain(client));
            for (option, payload) in steps {
                let outcome = options.handle_option(option, &payload, &catalog());
                check_outcome(option, &outcome)?;
                match outcome {
                    OptionOutcome::Reply { options: next, .. } => options = next,
                    OptionOutcome::Go { session, .. } => {
                        // Block status is only ever offered with structured replies.
                        prop_assert!(session.base_allocation.is_none() || session.structured_replies);
                        return Ok(());
                    }
                    OptionOutcome::Abort { .. } | OptionOutcome::Close(_) => return Ok(()),
                }
            }
        }
    }
}
