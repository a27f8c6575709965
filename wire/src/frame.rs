//! Frames: the unit the shipper and the receiver exchange on their QUIC
//! streams (the session's, and from version 3 a span points' hold stream
//! beside it). A frame is a fixed 20-byte header and a body; the body is one
//! message (see [`crate::message`] for the body layouts), optionally zstd
//! compressed. All integers are little-endian.
//!
//! ```text
//!  offset size field
//!  ------ ---- ---------------------------------------------------------------
//!       0    4 magic        "TMWF" (54 4d 57 46)
//!       4    2 version      the protocol version the body is written in
//!                           (see "Versions" below), 1 to 5
//!       6    1 type         message type: 1 hello, 2 welcome, 3 records,
//!                           4 chunk, 5 digest-request, 6 digests,
//!                           7 resync-done, 8 ack, 9 error,
//!                           10 drain-request, 11 drained,
//!                           12 hold-open, 13 held, 14 hold-release,
//!                           15 released
//!       7    1 flags        bit 0: body is zstd compressed; others must be 0
//!       8    4 wire-len     bytes of body that follow the header
//!      12    4 raw-len      bytes of the body once decompressed
//!                           (== wire-len when not compressed)
//!      16    4 crc32c       over bytes 0..16, then the wire body
//!      20    … body         wire-len bytes
//! ```
//!
//! Both lengths are bounded by [`MAX_FRAME_BODY`] (a 64 MiB write record and
//! its header fit), and zstd output is bounded by raw-len, so neither a lying
//! length nor a zip bomb makes the decoder allocate more than that. The CRC
//! is checked before decompression: a corrupted frame is never decoded,
//! let alone applied. The record batches inside keep their own per-record
//! CRC32C from the log, which is the end-to-end check; the frame CRC guards
//! the envelope and the fields around them. For a raw `records` frame both
//! are checked in one pass over its bytes: the frame's CRC is combined from
//! the records' (CRC32C of a concatenation from the CRC32Cs of its parts),
//! and the shipper makes it likewise from the checksums the log stored, so
//! a record's bytes are read once for checksums on each side.
//!
//! # Versions
//!
//! Every frame names the protocol version its body is written in. This code
//! speaks versions [`MIN_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`]
//! ([`Versions::SUPPORTED`]); what each version added is listed in
//! [`crate::message`]. Version 1 had no negotiation: a version-1 peer
//! accepts only frames of version 1 and answers anything else with an
//! `error` (transient, protocol) in a version-1 frame.
//!
//! What never changes, so that two peers of any versions can always tell
//! each other why they disagree:
//! - this header (its fields, their meaning, the CRC); flag bit 0;
//! - the `error` message's layout, and its class and code values of
//!   version 1 (new codes are sent only in sessions of the version that
//!   added them; older peers get `protocol` or `internal` instead);
//! - the `hello`: a version's hello is the previous version's with fields
//!   appended, so any version reads the fields it knows of any hello and
//!   ignores the rest.
//!
//! The handshake:
//! 1. The shipper sends its hello in its newest version `max`; the hello
//!    (version 2 on) also carries the oldest version it speaks, `min`.
//! 2. The receiver, speaking `rmin..=rmax`, picks `n = min(max, rmax)`.
//!    - `max < rmin`: the shipper is too old. The receiver answers with a
//!      permanent `error` in version `max` (which the shipper reads) naming
//!      both ranges, and closes.
//!    - `n < min`: the receiver is too old for this shipper; likewise, in
//!      version `n`.
//!    - else it answers with its `welcome` in version `n`: the session's
//!      version. Every later frame, both ways, is of version `n`, and a
//!      message or field that version `n` does not have is never sent (the
//!      encoder refuses it: [`EncodeError::NotInVersion`]).
//! 3. The shipper takes the welcome's version as the session's, after
//!    checking it lies in `min..=max`. A version-1 receiver cannot read a
//!    newer hello: it answers with a transient `error` of code `protocol`
//!    in a version-1 frame. A shipper that gets that answer to a hello of
//!    a newer version connects again offering only version 1 if it speaks
//!    it, and otherwise stops, naming both versions (permanent). (A newer
//!    receiver answers a hello whose header was damaged on the way alike,
//!    before it knows the version; that connection then goes on in
//!    version 1, which the newer receiver serves too.)
//!
//! So a newer receiver serves every shipper down to its `rmin`, a newer
//! shipper talks to every receiver down to its `min` (to a version-1
//! receiver at the cost of one refused connection each time it connects),
//! and otherwise both sides say which versions they speak.
//!
//! A change of the change-log record format is a change of the `records`
//! body, and so of the protocol: it takes a new protocol version, and a
//! shipper in a session of an older version sends records in the format
//! that version carries.

use crate::message::MessageType;
use bytes::{Bytes, BytesMut};
use std::io;
use thiserror::Error;
use tidemark_changelog::record::crc32c_combine;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// First bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"TMWF";
/// The newest protocol version this code speaks.
pub const PROTOCOL_VERSION: u16 = 7;
/// The oldest protocol version this code speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Bytes of a frame header.
pub const FRAME_HEADER_LEN: usize = 20;
/// The largest body, compressed or not: 64 MiB of record payload plus room
/// for record headers and message fields.
pub const MAX_FRAME_BODY: u32 = (64 << 20) + (1 << 20);
/// Flag bit: the body is zstd compressed.
pub const FLAG_ZSTD: u8 = 1 << 0;
/// Bodies up to this size are never compressed: the gain cannot pay for the
/// compressor's setup.
pub const COMPRESS_MIN_BODY: usize = 512;

/// Bodies larger than this are compressed only if a sample of them
/// compresses: incompressible data goes raw for the price of the sample.
pub const SAMPLE_ABOVE: usize = 128 << 10;
/// Pieces taken, evenly spread, from a body for the sample.
const SAMPLE_PIECES: usize = 16;
/// Bytes of each piece: 16 x 4 KiB = 64 KiB, a sixteenth of a 1 MiB batch.
const SAMPLE_PIECE: usize = 4 << 10;

const CRC_AT: usize = std::mem::offset_of!(RawFrameHeader, crc);

/// How bodies are compressed on encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Always send bodies raw.
    None,
    /// zstd at this level where it makes the body smaller (level 1 is the
    /// measured sweet spot: ratio ~2.2 at ~0.6 GB/s per core).
    Zstd(i32),
    /// zstd level 1.
    #[default]
    Fast,
}

/// A range of protocol versions: those a side speaks, or offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Versions {
    /// The oldest.
    pub min: u16,
    /// The newest.
    pub max: u16,
}

impl Versions {
    /// The versions this code speaks.
    pub const SUPPORTED: Versions = Versions {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// Exactly version `v`.
    pub fn only(v: u16) -> Versions {
        Versions { min: v, max: v }
    }

    /// Whether `v` is in the range.
    pub fn contains(self, v: u16) -> bool {
        (self.min..=self.max).contains(&v)
    }
}

impl std::fmt::Display for Versions {
    /// "version 2", or "versions 1 to 2": for messages people read.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.max)
        } else {
            write!(f, "versions {} to {}", self.min, self.max)
        }
    }
}

/// One decoded frame: its version, message type and (decompressed) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The protocol version the body is written in (any version from 1 on:
    /// whether it is spoken here is for the message decoder to say).
    pub version: u16,
    /// What the body is.
    pub msg_type: MessageType,
    /// The body, decompressed: a slice of the bytes received when it was
    /// sent raw (no copy).
    pub body: Bytes,
}

/// Why a message could not be encoded. Always the local side's fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The body would exceed [`MAX_FRAME_BODY`].
    #[error("message body of {0} bytes exceeds the frame limit")]
    BodyTooLarge(usize),
    /// A string field is longer than its bound.
    #[error("{field} is {len} bytes, at most {max} allowed")]
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A field value the peer would refuse.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Which rule was broken.
        reason: &'static str,
    },
    /// The message does not exist in the session's protocol version (or
    /// this code does not speak that version): the peer could not read it.
    #[error("a {msg} message cannot be sent in protocol version {version}")]
    NotInVersion {
        /// The message type.
        msg: &'static str,
        /// The version asked for.
        version: u16,
    },
}

/// Why bytes from the peer are not a valid frame or message. Every variant
/// is the peer's (or the network's) fault; the connection is closed.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// The stream does not start a frame with the magic.
    #[error("no frame magic (found {0:02x?})")]
    BadMagic(Vec<u8>),
    /// A frame of a protocol version this code does not speak (or 0, which
    /// no version is).
    #[error(
        "a frame of protocol version {0}; this end speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
    )]
    UnsupportedVersion(u16),
    /// The message type does not exist in the frame's protocol version.
    #[error("no {msg} message exists in protocol version {version}")]
    NotInVersion {
        /// The message type.
        msg: &'static str,
        /// The frame's version.
        version: u16,
    },
    /// The type byte stands for no message.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Flag bits this version does not define.
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    /// A length field exceeds [`MAX_FRAME_BODY`].
    #[error("{field} of {len} bytes exceeds the frame limit")]
    TooLarge {
        /// Which length.
        field: &'static str,
        /// The announced length.
        len: u32,
    },
    /// Header or body changed in transit.
    #[error("frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the bytes received.
        computed: u32,
    },
    /// The compressed body is not valid zstd (or exceeds raw-len).
    #[error("compressed body does not decompress")]
    Decompress(#[source] io::Error),
    /// Raw and wire lengths disagree with the body.
    #[error("body length mismatch: {announced} announced, {actual} found")]
    LengthMismatch {
        /// The length the header announced.
        announced: u32,
        /// The length there was.
        actual: usize,
    },
    /// The body ends inside a field.
    #[error("message body ends inside {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// The body has bytes after the message's last field.
    #[error("{extra} bytes after the end of a {msg} message")]
    TrailingBytes {
        /// The message type.
        msg: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// A field breaks the message's rules.
    #[error("invalid {field}: {reason}")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Which rule was broken.
        reason: &'static str,
    },
    /// A host, group or disk name breaks the rule of names.
    #[error("invalid {field}")]
    InvalidName {
        /// The field.
        field: &'static str,
        /// The name and what is wrong with it.
        #[source]
        source: tidemark_names::NameError,
    },
    /// The records of a batch do not verify or do not follow each other.
    #[error("invalid record batch")]
    Batch(#[source] crate::message::BatchError),
    /// The decoder already failed; the stream cannot be resynchronised.
    #[error("the frame stream already failed")]
    Failed,
}

impl DecodeError {
    /// Whether the bytes were damaged (checksums), as opposed to well-formed
    /// bytes that break the protocol.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            DecodeError::ChecksumMismatch { .. }
                | DecodeError::BadMagic(_)
                | DecodeError::Decompress(_)
        ) || matches!(self, DecodeError::Batch(b) if b.is_corruption())
    }
}

/// Encodes one frame of protocol `version` around `body`, compressing it
/// when `compression` asks for it, the body is larger than
/// [`COMPRESS_MIN_BODY`] and zstd makes it smaller (random data goes raw;
/// a body larger than [`SAMPLE_ABOVE`] is tried on a sample first).
/// Whether the body is valid in that version is the caller's business
/// ([`crate::Message::encode`] checks it).
pub fn encode_frame(
    version: u16,
    msg_type: MessageType,
    body: &[u8],
    compression: Compression,
) -> Result<Vec<u8>, EncodeError> {
    encode_frame_with_crc(version, msg_type, body, None, compression)
}

/// [`encode_frame`] given the body's CRC32C if the caller knows it
/// already (a record batch does, from its records' own checksums): a body
/// sent raw is then not read again for the frame's checksum.
pub(crate) fn encode_frame_with_crc(
    version: u16,
    msg_type: MessageType,
    body: &[u8],
    body_crc: Option<u32>,
    compression: Compression,
) -> Result<Vec<u8>, EncodeError> {
    encode_frame_from(version, msg_type, (body, &[]), body_crc, compression)
}

/// [`encode_frame`] of the body `head` followed by `tail` (a chunk's
/// fields, then its data): a tail sent raw is copied once, into the frame,
/// never into a body first. Whether to compress is decided on the tail's
/// sample when it is large (the head is a few bytes of fields).
pub(crate) fn encode_frame_parts(
    version: u16,
    msg_type: MessageType,
    head: &[u8],
    tail: &[u8],
    compression: Compression,
) -> Result<Vec<u8>, EncodeError> {
    encode_frame_from(version, msg_type, (head, tail), None, compression)
}

/// The one frame encoder behind [`encode_frame_with_crc`] and
/// [`encode_frame_parts`]: the body is `parts.0` then `parts.1`.
fn encode_frame_from(
    version: u16,
    msg_type: MessageType,
    (head, tail): (&[u8], &[u8]),
    body_crc: Option<u32>,
    compression: Compression,
) -> Result<Vec<u8>, EncodeError> {
    let body_len = head.len() + tail.len();
    let raw_len = u32::try_from(body_len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_BODY)
        .ok_or(EncodeError::BodyTooLarge(body_len))?;
    let level = match compression {
        Compression::None => None,
        Compression::Fast => Some(1),
        Compression::Zstd(level) => Some(level),
    };
    // The larger part is sampled: the whole body, or a chunk's data.
    let sampled = if tail.len() > head.len() { tail } else { head };
    let compressed = level
        .filter(|_| body_len > COMPRESS_MIN_BODY)
        .filter(|&level| worth_compressing(sampled, level))
        .and_then(|level| {
            if tail.is_empty() {
                zstd::bulk::compress(head, level).ok()
            } else {
                zstd::bulk::compress(&[head, tail].concat(), level).ok()
            }
        })
        .filter(|c| c.len() < body_len);
    let (flags, wire, wire_crc): (u8, (&[u8], &[u8]), _) = match &compressed {
        Some(c) => (FLAG_ZSTD, (c, &[]), None),
        None => (0, (head, tail), body_crc),
    };
    let wire_len_usize = wire.0.len() + wire.1.len();
    // wire_len <= body_len <= MAX_FRAME_BODY, so this cannot truncate.
    let wire_len = wire_len_usize as u32;
    let mut header = RawFrameHeader {
        magic: FRAME_MAGIC,
        version: version.into(),
        msg_type: msg_type.code(),
        flags,
        wire_len: wire_len.into(),
        raw_len: raw_len.into(),
        crc: U32::ZERO,
    };
    let seed = crc32c::crc32c(&header.as_bytes()[..CRC_AT]);
    header.crc = match wire_crc {
        Some(c) => crc32c_combine(seed, c, wire_len_usize),
        None => crc32c::crc32c_append(crc32c::crc32c_append(seed, wire.0), wire.1),
    }
    .into();
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + wire_len_usize);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(wire.0);
    out.extend_from_slice(wire.1);
    Ok(out)
}

/// Whether compressing `body` at `level` is worth its CPU. Incompressible
/// data (encrypted or already compressed writes, random test data) is common
/// in the log, and zstd spends nearly as long failing on it as succeeding:
/// on a busy shipper that time is the replication rate. A large body is
/// therefore first tried on a sample, [`SAMPLE_PIECES`] pieces spread evenly
/// over it; unless the sample shrinks by at least 1/16 the body goes raw.
/// The price: a body compressible only in places the sample misses is sent
/// raw (the receiver reads either); small bodies are always tried whole.
fn worth_compressing(body: &[u8], level: i32) -> bool {
    if body.len() <= SAMPLE_ABOVE {
        return true;
    }
    let stride = body.len() / SAMPLE_PIECES;
    let mut sample = Vec::with_capacity(SAMPLE_PIECES * SAMPLE_PIECE);
    for i in 0..SAMPLE_PIECES {
        let at = i * stride;
        sample.extend_from_slice(&body[at..(at + SAMPLE_PIECE).min(body.len())]);
    }
    zstd::bulk::compress(&sample, level).is_ok_and(|c| c.len() <= sample.len() - sample.len() / 16)
}

struct FrameHeader {
    version: u16,
    msg_type: MessageType,
    flags: u8,
    wire_len: u32,
    raw_len: u32,
    crc: u32,
}

/// A frame header exactly as it travels: the module's diagram, field for
/// field, little-endian, without padding and at any alignment.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawFrameHeader {
    magic: [u8; 4],
    version: U16,
    msg_type: u8,
    flags: u8,
    wire_len: U32,
    raw_len: U32,
    crc: U32,
}

const _: () = assert!(size_of::<RawFrameHeader>() == FRAME_HEADER_LEN);

/// Checks a header as far as it can be checked without the body, so
/// garbage is refused before the decoder waits for (or allocates) a body.
fn parse_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, DecodeError> {
    let h: &RawFrameHeader = zerocopy::transmute_ref!(h);
    if h.magic != FRAME_MAGIC {
        return Err(DecodeError::BadMagic(h.magic.to_vec()));
    }
    // Any version is read this far (the header is the same in all): the
    // receiver must be able to answer a hello newer than itself.
    let version = h.version.get();
    if version == 0 {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let msg_type =
        MessageType::from_code(h.msg_type).ok_or(DecodeError::UnknownType(h.msg_type))?;
    let flags = h.flags;
    if flags & !FLAG_ZSTD != 0 {
        return Err(DecodeError::UnknownFlags(flags));
    }
    let wire_len = h.wire_len.get();
    let raw_len = h.raw_len.get();
    for (field, len) in [("wire length", wire_len), ("raw length", raw_len)] {
        if len > MAX_FRAME_BODY {
            return Err(DecodeError::TooLarge { field, len });
        }
    }
    if flags & FLAG_ZSTD == 0 && wire_len != raw_len {
        return Err(DecodeError::LengthMismatch {
            announced: raw_len,
            actual: wire_len as usize,
        });
    }
    Ok(FrameHeader {
        version,
        msg_type,
        flags,
        wire_len,
        raw_len,
        crc: h.crc.get(),
    })
}

/// A frame split off the stream whose checksum is not checked yet: what
/// [`FrameDecoder::next_frame`] checks, or what a Records frame's batch
/// checks in the same pass as its records' own checksums
/// ([`crate::MessageDecoder`]).
pub(crate) struct UncheckedFrame {
    pub(crate) version: u16,
    pub(crate) msg_type: MessageType,
    /// Whether the body is zstd compressed.
    pub(crate) compressed: bool,
    raw_len: u32,
    /// The CRC32C of header bytes 0..16: the frame's checksum goes on
    /// over the wire body from there.
    pub(crate) crc_seed: u32,
    /// The checksum the header carries.
    pub(crate) stored_crc: u32,
    /// The body as received.
    pub(crate) wire: Bytes,
}

impl UncheckedFrame {
    /// The frame's checksum, given the CRC32C of its wire body.
    pub(crate) fn frame_crc(&self, body_crc: u32) -> u32 {
        crc32c_combine(self.crc_seed, body_crc, self.wire.len())
    }

    /// `Err` unless `computed` (the frame's checksum over the bytes
    /// received) is the stored one.
    pub(crate) fn verify_crc(&self, computed: u32) -> Result<(), DecodeError> {
        if computed == self.stored_crc {
            Ok(())
        } else {
            Err(DecodeError::ChecksumMismatch {
                stored: self.stored_crc,
                computed,
            })
        }
    }

    /// Checks the checksum over the whole body, then decompresses it.
    pub(crate) fn check(self) -> Result<Frame, DecodeError> {
        self.verify_crc(crc32c::crc32c_append(self.crc_seed, &self.wire))?;
        let body = if self.compressed {
            let body = zstd::bulk::decompress(&self.wire, self.raw_len as usize)
                .map_err(DecodeError::Decompress)?;
            if body.len() != self.raw_len as usize {
                return Err(DecodeError::LengthMismatch {
                    announced: self.raw_len,
                    actual: body.len(),
                });
            }
            Bytes::from(body)
        } else {
            self.wire
        };
        Ok(Frame {
            version: self.version,
            msg_type: self.msg_type,
            body,
        })
    }
}

/// Bytes the decoder's buffer grows by when it is full: a new buffer is
/// taken (the old one lives on in the bodies handed out, which are slices
/// of it) and only the unfinished frame at its end moves over, so a large
/// step keeps that copy a small share of the bytes received.
const BUFFER_STEP: usize = 16 << 20;

/// Splits a byte stream into frames: feed it whatever the stream delivered,
/// pull frames until it says it needs more. After the first error the
/// decoder stays failed: a stream that lost framing cannot be trusted again,
/// the connection must be closed.
///
/// Bodies are slices of the buffer the bytes were fed into: a raw body is
/// never copied after `feed`.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
    failed: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes received from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.buf.capacity() - self.buf.len() < bytes.len() {
            self.buf.reserve(bytes.len().max(BUFFER_STEP));
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        let result = self
            .next_unchecked()
            .and_then(|f| f.map(UncheckedFrame::check).transpose());
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// The next complete frame, its checksum not checked yet (the caller
    /// must, and must fail the stream if it does not hold).
    pub(crate) fn next_unchecked(&mut self) -> Result<Option<UncheckedFrame>, DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        let result = self.split_one();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn split_one(&mut self) -> Result<Option<UncheckedFrame>, DecodeError> {
        let avail = &self.buf[..];
        let magic_seen = avail.len().min(FRAME_MAGIC.len());
        if avail[..magic_seen] != FRAME_MAGIC[..magic_seen] {
            return Err(DecodeError::BadMagic(avail[..magic_seen].to_vec()));
        }
        let Some(h) = avail
            .get(..FRAME_HEADER_LEN)
            .and_then(|h| <&[u8; FRAME_HEADER_LEN]>::try_from(h).ok())
        else {
            return Ok(None);
        };
        let header = parse_header(h)?;
        let crc_seed = crc32c::crc32c(&h[..CRC_AT]);
        let end = FRAME_HEADER_LEN + header.wire_len as usize;
        if avail.len() < end {
            return Ok(None);
        }
        let mut frame = self.buf.split_to(end);
        let wire = frame.split_off(FRAME_HEADER_LEN).freeze();
        Ok(Some(UncheckedFrame {
            version: header.version,
            msg_type: header.msg_type,
            compressed: header.flags & FLAG_ZSTD != 0,
            raw_len: header.raw_len,
            crc_seed,
            stored_crc: header.crc,
            wire,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{RngCore, SeedableRng};

    #[test]
    fn small_and_random_bodies_go_raw_repetitive_ones_compressed() {
        let small = encode_frame(
            PROTOCOL_VERSION,
            MessageType::Ack,
            &[0u8; 100],
            Compression::Fast,
        )
        .unwrap();
        assert_eq!(small[7], 0);
        let zeros = encode_frame(
            PROTOCOL_VERSION,
            MessageType::Records,
            &[0u8; 8192],
            Compression::Fast,
        )
        .unwrap();
        assert_eq!(zeros[7], FLAG_ZSTD);
        assert!(zeros.len() < 200);
        let mut random = vec![0u8; 8192];
        StdRng::seed_from_u64(1).fill_bytes(&mut random);
        let raw = encode_frame(
            PROTOCOL_VERSION,
            MessageType::Records,
            &random,
            Compression::Fast,
        )
        .unwrap();
        assert_eq!(raw[7], 0);
        assert_eq!(raw.len(), FRAME_HEADER_LEN + random.len());
        let mut d = FrameDecoder::new();
        d.feed(&zeros);
        d.feed(&raw);
        assert_eq!(d.next_frame().unwrap().unwrap().body, vec![0u8; 8192]);
        assert_eq!(d.next_frame().unwrap().unwrap().body, random);
        assert!(d.next_frame().unwrap().is_none());
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_large_body_is_compressed_only_if_its_sample_compresses() {
        let encode = |body: &[u8]| {
            encode_frame(
                PROTOCOL_VERSION,
                MessageType::Records,
                body,
                Compression::Fast,
            )
            .unwrap()
        };
        let len = 1 << 20;
        let mut random = vec![0u8; len];
        StdRng::seed_from_u64(2).fill_bytes(&mut random);
        assert!(!worth_compressing(&random, 1));
        let raw = encode(&random);
        assert_eq!(raw[7], 0);
        assert_eq!(raw.len(), FRAME_HEADER_LEN + len);
        // Compressible data anywhere in the body is seen by the sample:
        // alternate 64 KiB runs of random bytes and of zeros still
        // compress, and decode to the same bytes.
        let mut mixed = random.clone();
        for run in mixed.chunks_mut(64 << 10).skip(1).step_by(2) {
            run.fill(0);
        }
        assert!(worth_compressing(&mixed, 1));
        let frame = encode(&mixed);
        assert_eq!(frame[7], FLAG_ZSTD);
        assert!(frame.len() < len * 3 / 4, "{}", frame.len());
        let mut d = FrameDecoder::new();
        d.feed(&frame);
        assert_eq!(d.next_frame().unwrap().unwrap().body, mixed);
        // At or below the threshold the body is tried whole.
        assert!(worth_compressing(&random[..SAMPLE_ABOVE], 1));
    }

    #[test]
    fn a_zip_bomb_is_refused() {
        // A body that decompresses to more than raw-len announces.
        let big = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
        let mut f = Vec::new();
        f.extend_from_slice(&FRAME_MAGIC);
        f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        f.push(MessageType::Records.code());
        f.push(FLAG_ZSTD);
        f.extend_from_slice(&(big.len() as u32).to_le_bytes());
        f.extend_from_slice(&1000u32.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&f), &big);
        f.extend_from_slice(&crc.to_le_bytes());
        f.extend_from_slice(&big);
        let mut d = FrameDecoder::new();
        d.feed(&f);
        assert!(matches!(d.next_frame(), Err(DecodeError::Decompress(_))));
        assert!(matches!(d.next_frame(), Err(DecodeError::Failed)));
    }

    #[test]
    fn oversized_lengths_are_refused_from_the_header_alone() {
        let mut f = encode_frame(
            PROTOCOL_VERSION,
            MessageType::Ack,
            &[1, 2, 3],
            Compression::None,
        )
        .unwrap();
        f[8..12].copy_from_slice(&(MAX_FRAME_BODY + 1).to_le_bytes());
        let mut d = FrameDecoder::new();
        d.feed(&f[..FRAME_HEADER_LEN]);
        assert!(matches!(
            d.next_frame(),
            Err(DecodeError::TooLarge { .. }) | Err(DecodeError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn garbage_is_refused_at_the_first_byte() {
        let mut d = FrameDecoder::new();
        d.feed(b"G");
        assert!(matches!(d.next_frame(), Err(DecodeError::BadMagic(_))));
    }
}
