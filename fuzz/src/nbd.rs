//! The NBD server's decoders (`tracker/src/nbd`): the handshake fed a
//! client's bytes as the tracker's connection reads them, and the
//! transmission phase's request headers, validated against a session.
//!
//! Besides "never panics", the harnesses check what a client relies on:
//! every option reply is framed as the protocol says and answers the option
//! asked, and every request the validator accepts lies within the export,
//! is aligned to its minimum block size and uses only advertised flags.

use crate::input::{Input, Output};
use tidemark_tracker::nbd::constants::{
    ClientFlags, CommandFlags, CommandType, ExtentStatus, InfoType, OptionCode, ReplyCode,
    TransmissionFlags, BASE_ALLOCATION, OPTION_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use tidemark_tracker::nbd::export::{BlockSizes, ExportCatalog, ExportInfo, UNLIMITED_MAX_BLOCK};
use tidemark_tracker::nbd::handshake::{
    AwaitClientFlags, Negotiated, OptionHeader, OptionOutcome, EXPORT_NAME_PADDING,
    OPTION_HEADER_LEN, OPTION_REPLY_HEADER_LEN,
};
use tidemark_tracker::nbd::transmission::{
    encode_block_status, encode_error_chunk, encode_offset_data_header, BlockStatusExtent, Command,
    ErrorReply, Recovery, RequestHeader, CHUNK_HEADER_LEN, ERROR_CHUNK_LEN, MAX_OFFSET_DATA_LEN,
    REQUEST_HEADER_LEN, SIMPLE_REPLY_LEN,
};

/// The exports a fuzzed connection may ask for.
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
        self.default.and_then(|i| self.exports.get(i)).cloned()
    }
}

/// Block sizes from three bytes: powers of two for the minimum and the
/// preferred size, and a maximum that is unlimited, the protocol's usual
/// 32 MiB, or a multiple of the preferred size. Sizes the protocol forbids
/// fall back to 512 / 4096 / 32 MiB.
fn block_sizes(input: &mut Input) -> BlockSizes {
    let (min_shift, preferred_shift, max) = (input.u8(), input.u8(), input.u8());
    let min = 1u32 << (min_shift % 18);
    let preferred = 1u32 << (preferred_shift % 18);
    let max = match max % 4 {
        0 => UNLIMITED_MAX_BLOCK,
        1 => 32 << 20,
        _ => preferred.saturating_mul(1 << (max / 4 % 16)),
    };
    BlockSizes::new(min, preferred, max)
        .unwrap_or_else(|_| BlockSizes::new(512, 4096, 32 << 20).expect("valid sizes"))
}

fn export(input: &mut Input) -> ExportInfo {
    ExportInfo {
        name: String::from_utf8_lossy(input.blob8()).into_owned(),
        description: String::from_utf8_lossy(input.blob8()).into_owned(),
        size: input.u64(),
        flags: TransmissionFlags::from_bits_retain(input.u16()),
        block_sizes: block_sizes(input),
    }
}

fn write_export(out: &mut Output, name: &str, size: u64, flags: TransmissionFlags) {
    // Block sizes 512 / 4096 / 32 MiB (see `block_sizes`).
    out.blob8(name.as_bytes())
        .blob8(b"a fuzzed disk")
        .u64(size)
        .u16(flags.bits())
        .u8(9)
        .u8(12)
        .u8(1);
}

fn catalog(input: &mut Input) -> Catalog {
    let count = input.u8() % 4;
    let exports = (0..count).map(|_| export(input)).collect::<Vec<_>>();
    let default = input.u8();
    Catalog {
        default: (usize::from(default) < exports.len()).then_some(usize::from(default)),
        exports,
    }
}

/// Splits option replies into (option, code, data) and checks their
/// framing; panics where a client could not parse them.
fn option_replies(mut bytes: &[u8], option: u32) -> Vec<(u32, Vec<u8>)> {
    let mut replies = Vec::new();
    while !bytes.is_empty() {
        assert!(
            bytes.len() >= OPTION_REPLY_HEADER_LEN,
            "a reply header is cut short"
        );
        let (header, rest) = bytes.split_at(OPTION_REPLY_HEADER_LEN);
        let field = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().unwrap());
        let magic = u64::from_be_bytes(header[..8].try_into().unwrap());
        assert_eq!(magic, OPTION_REPLY_MAGIC, "option reply magic");
        assert_eq!(field(8), option, "a reply answers the option asked");
        let len = field(16) as usize;
        assert!(rest.len() >= len, "reply data runs past the reply");
        replies.push((field(12), rest[..len].to_vec()));
        bytes = &rest[len..];
    }
    replies
}

/// Checks the replies to one option that leaves the handshake going on
/// or ends it: the last is the final one (an ACK or an error), the others
/// informational.
fn check_replies(option: u32, reply: &[u8]) {
    let replies = option_replies(reply, option);
    let (last, earlier) = replies.split_last().expect("every option is answered");
    let last_code = ReplyCode::from_code(last.0).expect("a known reply code");
    assert!(
        last_code == ReplyCode::Ack || last_code.is_error(),
        "the final reply is an ACK or an error, not {last_code:?}"
    );
    for (code, data) in earlier {
        let code = ReplyCode::from_code(*code).expect("a known reply code");
        assert!(
            matches!(
                code,
                ReplyCode::Server | ReplyCode::Info | ReplyCode::MetaContext
            ),
            "{code:?} before the final reply"
        );
        if code == ReplyCode::MetaContext {
            assert_eq!(data.get(4..), Some(BASE_ALLOCATION.as_bytes()));
        }
    }
}

/// The handshake as the tracker's connection runs it: `data` is a
/// catalog of exports, then the client's bytes (client flags, options
/// with their data, and, once in transmission, requests).
pub fn handshake(data: &[u8]) {
    let mut input = Input::new(data);
    let exports = catalog(&mut input);
    let state = AwaitClientFlags::new();
    let _greeting = state.greeting();
    let Some(flags) = input.array::<4>() else {
        return;
    };
    let mut options = match state.handle_client_flags(&flags) {
        Ok(options) => options,
        Err(error) => return drop(error.to_string()),
    };
    loop {
        let Some(header) = input.array::<OPTION_HEADER_LEN>() else {
            return;
        };
        let header = match OptionHeader::decode(&header) {
            Ok(header) => header,
            Err(error) => return drop(error.to_string()),
        };
        let payload = input.bytes(header.len as usize);
        if payload.len() < header.len as usize {
            return; // The client closed mid-option.
        }
        match options.handle_option(header.option, payload, &exports) {
            OptionOutcome::Reply {
                options: next,
                reply,
            } => {
                check_replies(header.option, &reply);
                options = next;
            }
            OptionOutcome::Abort { reply } => {
                let replies = option_replies(&reply, header.option);
                assert_eq!(replies.len(), 1);
                return;
            }
            OptionOutcome::Go { session, reply } => {
                if header.option == OptionCode::ExportName.code() {
                    let padding = reply.len() - 10;
                    assert!(padding == 0 || padding == EXPORT_NAME_PADDING);
                } else {
                    check_replies(header.option, &reply);
                }
                check_session(&session);
                return serve(&session, &mut input);
            }
            OptionOutcome::Close(error) => return drop(error.to_string()),
        }
    }
}

/// What the handshake agreed on is something the validator can hold a
/// client to.
fn check_session(session: &Negotiated) {
    let flags = session.export.flags;
    assert!(flags.contains(TransmissionFlags::HAS_FLAGS));
    assert!(TransmissionFlags::all().contains(flags));
    if !session.structured_replies {
        assert!(!flags.contains(TransmissionFlags::SEND_DF));
        assert!(session.base_allocation.is_none());
    }
}

/// The session a well-behaved client negotiates for `export` (as the
/// default export): structured replies and the `base:allocation` context
/// if asked for, then `NBD_OPT_GO`.
fn negotiate(export: ExportInfo, structured: bool, meta_context: bool) -> Negotiated {
    let exports = Catalog {
        exports: vec![export],
        default: Some(0),
    };
    let flags = ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES;
    let mut options = AwaitClientFlags::new()
        .handle_client_flags(&flags.bits().to_be_bytes())
        .expect("flags the server advertises");
    let mut steps = Vec::new();
    if structured {
        steps.push((OptionCode::StructuredReply, Vec::new()));
    }
    if meta_context {
        steps.push((
            OptionCode::SetMetaContext,
            meta_request("", &[BASE_ALLOCATION]),
        ));
    }
    for (option, data) in steps {
        match options.handle_option(option.code(), &data, &exports) {
            OptionOutcome::Reply { options: next, .. } => options = next,
            other => panic!("{option:?} ends the handshake: {other:?}"),
        }
    }
    match options.handle_option(OptionCode::Go.code(), &info_request("", &[]), &exports) {
        OptionOutcome::Go { session, .. } => session,
        other => panic!("NBD_OPT_GO for the default export fails: {other:?}"),
    }
}

/// The transmission phase alone: `data` is an export and what a client
/// negotiated for it (bit 0: structured replies; bit 1: the
/// `base:allocation` context), then request headers and write payloads.
pub fn transmission(data: &[u8]) {
    let mut input = Input::new(data);
    let export = export(&mut input);
    let bits = input.u8();
    let session = negotiate(export, bits & 1 != 0, bits & 2 != 0);
    check_session(&session);
    serve(&session, &mut input);
}

/// Serves requests as the tracker's connection does: a 28-byte header,
/// and for a write the payload after it, read even when the write is
/// refused (unless the refusal closes the connection).
fn serve(session: &Negotiated, input: &mut Input) {
    while let Some(bytes) = input.array::<REQUEST_HEADER_LEN>() {
        let request = match RequestHeader::decode(&bytes) {
            Ok(request) => request,
            Err(error) => return drop(error.to_string()),
        };
        assert_eq!(request.encode(), bytes);
        match request.validate(session) {
            Ok(command) => {
                check_accepted(session, &request, command);
                input.bytes(request.payload_len() as usize);
            }
            Err(rejection) => {
                let errno = rejection.errno();
                let reply = ErrorReply::new(request.cookie, errno, session.structured_replies);
                let expected = if session.structured_replies {
                    ERROR_CHUNK_LEN
                } else {
                    SIMPLE_REPLY_LEN
                };
                assert_eq!(reply.as_bytes().len(), expected);
                let mut chunk = Vec::new();
                let message = rejection.reason.to_string();
                encode_error_chunk(request.cookie, errno, &message, true, &mut chunk);
                check_chunk_length(&chunk);
                match rejection.recovery {
                    Recovery::Reply => assert_eq!(request.payload_len(), 0),
                    Recovery::DiscardThenReply { payload } => {
                        assert_eq!(payload, request.payload_len());
                        input.bytes(payload as usize);
                    }
                    Recovery::Close => return,
                }
            }
        }
    }
}

fn check_chunk_length(chunk: &[u8]) {
    assert_eq!(&chunk[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
    let length = u32::from_be_bytes(chunk[16..20].try_into().unwrap()) as usize;
    assert_eq!(chunk.len(), CHUNK_HEADER_LEN + length);
}

/// What the validator accepted is within what the handshake offered.
fn check_accepted(session: &Negotiated, request: &RequestHeader, command: Command) {
    let export = &session.export;
    let offered = export.flags;
    if command == Command::Disconnect {
        // Never refused, whatever it carries: the connection ends anyway.
        return assert_eq!(request.kind, CommandType::Disc.code());
    }
    if request.flags.contains(CommandFlags::FUA) {
        assert!(offered.contains(TransmissionFlags::SEND_FUA));
    }
    assert!(CommandFlags::all().contains(request.flags));
    let (offset, length) = match command {
        Command::Disconnect => unreachable!("handled above"),
        Command::Flush => {
            assert!(offered.contains(TransmissionFlags::SEND_FLUSH));
            return assert_eq!((request.offset, request.length), (0, 0));
        }
        Command::Read {
            offset,
            length,
            dont_fragment,
        } => {
            if dont_fragment {
                assert!(session.structured_replies && length <= MAX_OFFSET_DATA_LEN);
            }
            if session.structured_replies && length <= MAX_OFFSET_DATA_LEN {
                encode_offset_data_header(request.cookie, offset, length, true)
                    .expect("an accepted read fits one chunk");
            }
            (offset, length)
        }
        Command::Write { offset, length, .. }
        | Command::Trim { offset, length, .. }
        | Command::WriteZeroes { offset, length, .. } => {
            assert!(!offered.contains(TransmissionFlags::READ_ONLY));
            (offset, length)
        }
        Command::Cache { offset, length } => (offset, length),
        Command::BlockStatus {
            offset,
            length,
            context,
            req_one,
        } => {
            assert_eq!(Some(context), session.base_allocation);
            assert!(session.structured_replies);
            // The backend's answer, clipped as the worker does: one or two
            // extents covering the request.
            let half = length / 2;
            let mut extents = vec![BlockStatusExtent {
                length: length - half,
                status: ExtentStatus::HOLE | ExtentStatus::ZERO,
            }];
            if half > 0 && !req_one {
                extents.push(BlockStatusExtent {
                    length: half,
                    status: ExtentStatus::empty(),
                });
            }
            let mut chunk = Vec::new();
            encode_block_status(request.cookie, context, &extents, true, &mut chunk)
                .expect("extents of an accepted request encode");
            check_chunk_length(&chunk);
            (offset, length)
        }
    };
    assert!(length > 0);
    assert!(u128::from(offset) + u128::from(length) <= u128::from(export.size));
    let min = export.block_sizes.min();
    assert_eq!(offset % u64::from(min), 0);
    assert_eq!(length % min, 0);
}

fn option(out: &mut Output, option: OptionCode, data: &[u8]) {
    let header = OptionHeader {
        option: option.code(),
        len: data.len() as u32,
    };
    out.bytes(&header.encode()).bytes(data);
}

fn named(name: &str, tail: &[u8]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(tail);
    data
}

fn info_request(name: &str, infos: &[InfoType]) -> Vec<u8> {
    let mut tail = (infos.len() as u16).to_be_bytes().to_vec();
    for info in infos {
        tail.extend_from_slice(&info.code().to_be_bytes());
    }
    named(name, &tail)
}

fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut tail = (queries.len() as u32).to_be_bytes().to_vec();
    for query in queries {
        tail.extend_from_slice(&(query.len() as u32).to_be_bytes());
        tail.extend_from_slice(query.as_bytes());
    }
    named(name, &tail)
}

fn request(out: &mut Output, kind: CommandType, flags: CommandFlags, offset: u64, length: u32) {
    let header = RequestHeader {
        flags,
        kind: kind.code(),
        cookie: offset ^ 0x5eed,
        offset,
        length,
    };
    out.bytes(&header.encode());
    if kind == CommandType::Write {
        out.bytes(&vec![0xa5; length as usize]);
    }
}

/// Requests of every kind, as a client sends them, some refused.
fn requests(out: &mut Output) {
    use CommandType::*;
    let fua = CommandFlags::FUA;
    request(out, Read, CommandFlags::empty(), 0, 4096);
    request(out, Read, CommandFlags::DF, 4096, 512);
    request(out, Write, fua, 8192, 1024);
    request(out, Write, CommandFlags::empty(), 1 << 30, 512); // past the end
    request(out, BlockStatus, CommandFlags::REQ_ONE, 0, 1 << 20);
    request(out, BlockStatus, CommandFlags::empty(), 4096, 8192);
    request(out, Trim, CommandFlags::empty(), 0, 4096);
    request(out, WriteZeroes, CommandFlags::NO_HOLE, 65536, 4096);
    request(out, WriteZeroes, CommandFlags::FAST_ZERO, 65536, 4096);
    request(out, Cache, CommandFlags::empty(), 0, 512);
    request(out, Read, CommandFlags::empty(), 3, 7); // misaligned
    request(out, Flush, CommandFlags::empty(), 0, 0);
    request(out, Disc, CommandFlags::empty(), 0, 0);
}

/// Every transmission flag but read-only.
fn every_flag() -> TransmissionFlags {
    TransmissionFlags::all().difference(TransmissionFlags::READ_ONLY)
}

/// Real client conversations: the fixed-newstyle haggling of qemu-nbd and
/// nbdinfo, a kernel client's `NBD_OPT_EXPORT_NAME`, an abort.
pub fn handshake_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let catalog = |out: &mut Output| {
        out.u8(2);
        write_export(out, "disk", 64 << 20, every_flag());
        write_export(out, "ro", 1 << 20, TransmissionFlags::READ_ONLY);
        out.u8(0);
    };
    let client = (ClientFlags::FIXED_NEWSTYLE | ClientFlags::NO_ZEROES).bits();

    let mut go = Output::new();
    catalog(&mut go);
    go.bytes(&client.to_be_bytes());
    option(&mut go, OptionCode::List, &[]);
    option(
        &mut go,
        OptionCode::Info,
        &info_request("disk", &[InfoType::Name, InfoType::Description]),
    );
    option(&mut go, OptionCode::StructuredReply, &[]);
    option(
        &mut go,
        OptionCode::ListMetaContext,
        &meta_request("disk", &["base:"]),
    );
    option(
        &mut go,
        OptionCode::SetMetaContext,
        &meta_request("disk", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x"]),
    );
    option(&mut go, OptionCode::StartTls, &[]);
    option(
        &mut go,
        OptionCode::Go,
        &info_request("disk", &[InfoType::BlockSize]),
    );
    requests(&mut go);

    let mut export_name = Output::new();
    catalog(&mut export_name);
    export_name.bytes(&0u32.to_be_bytes());
    option(&mut export_name, OptionCode::ExportName, b"");
    requests(&mut export_name);

    let mut abort = Output::new();
    catalog(&mut abort);
    abort.bytes(&ClientFlags::FIXED_NEWSTYLE.bits().to_be_bytes());
    option(&mut abort, OptionCode::Info, &info_request("nope", &[]));
    option(&mut abort, OptionCode::Abort, &[]);

    vec![
        ("go", go.finish()),
        ("export-name", export_name.finish()),
        ("abort", abort.finish()),
    ]
}

/// Sessions with and without structured replies and a metadata context,
/// each serving every kind of request.
pub fn transmission_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let session = |structured: bool, name: &'static str| {
        let mut out = Output::new();
        write_export(&mut out, "disk", 64 << 20, every_flag());
        out.u8(if structured { 3 } else { 0 });
        requests(&mut out);
        (name, out.finish())
    };
    let mut read_only = Output::new();
    write_export(&mut read_only, "ro", 1 << 20, TransmissionFlags::READ_ONLY);
    read_only.u8(0);
    requests(&mut read_only);
    vec![
        session(true, "structured"),
        session(false, "simple"),
        ("read-only", read_only.finish()),
    ]
}
