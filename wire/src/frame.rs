//! Frames: the unit the shipper and the receiver exchange on their one QUIC
//! stream. A frame is a fixed 20-byte header and a body; the body is one
//! message (see [`crate::message`] for the body layouts), optionally zstd
//! compressed. All integers are little-endian.
//!
//! ```text
//!  offset size field
//!  ------ ---- ---------------------------------------------------------------
//!       0    4 magic        "TMWF" (54 4d 57 46)
//!       4    2 version      protocol version, 1
//!       6    1 type         message type: 1 hello, 2 welcome, 3 records,
//!                           4 chunk, 5 digest-request, 6 digests,
//!                           7 resync-done, 8 ack, 9 error
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
//! the envelope and the fields around them.

use crate::message::MessageType;
use std::io;
use thiserror::Error;

/// First bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"TMWF";
/// The protocol version this code speaks.
pub const PROTOCOL_VERSION: u16 = 1;
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

const CRC_AT: usize = 16;

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

/// One decoded frame: its message type and its (decompressed) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What the body is.
    pub msg_type: MessageType,
    /// The body, decompressed.
    pub body: Vec<u8>,
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
}

/// Why bytes from the peer are not a valid frame or message. Every variant
/// is the peer's (or the network's) fault; the connection is closed.
#[derive(Debug, Error)]
pub enum DecodeError {
    /// The stream does not start a frame with the magic.
    #[error("no frame magic (found {0:02x?})")]
    BadMagic(Vec<u8>),
    /// The peer speaks a protocol version this code does not.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
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

/// Encodes one frame around `body`, compressing it when `compression` asks
/// for it, the body is larger than [`COMPRESS_MIN_BODY`] and zstd makes it
/// smaller (random data goes raw).
pub fn encode_frame(
    msg_type: MessageType,
    body: &[u8],
    compression: Compression,
) -> Result<Vec<u8>, EncodeError> {
    let raw_len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME_BODY)
        .ok_or(EncodeError::BodyTooLarge(body.len()))?;
    let level = match compression {
        Compression::None => None,
        Compression::Fast => Some(1),
        Compression::Zstd(level) => Some(level),
    };
    let compressed = level
        .filter(|_| body.len() > COMPRESS_MIN_BODY)
        .and_then(|level| zstd::bulk::compress(body, level).ok())
        .filter(|c| c.len() < body.len());
    let (flags, wire): (u8, &[u8]) = match &compressed {
        Some(c) => (FLAG_ZSTD, c),
        None => (0, body),
    };
    // wire.len() <= body.len() <= MAX_FRAME_BODY, so this cannot truncate.
    let wire_len = wire.len() as u32;
    let mut out = Vec::with_capacity(FRAME_HEADER_LEN + wire.len());
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.push(msg_type.code());
    out.push(flags);
    out.extend_from_slice(&wire_len.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..CRC_AT]), wire);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(wire);
    Ok(out)
}

struct FrameHeader {
    msg_type: MessageType,
    flags: u8,
    wire_len: u32,
    raw_len: u32,
    crc: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks a header as far as it can be checked without the body, so
/// garbage is refused before the decoder waits for (or allocates) a body.
fn parse_header(h: &[u8; FRAME_HEADER_LEN]) -> Result<FrameHeader, DecodeError> {
    if h[0..4] != FRAME_MAGIC {
        return Err(DecodeError::BadMagic(h[0..4].to_vec()));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let msg_type = MessageType::from_code(h[6]).ok_or(DecodeError::UnknownType(h[6]))?;
    let flags = h[7];
    if flags & !FLAG_ZSTD != 0 {
        return Err(DecodeError::UnknownFlags(flags));
    }
    let wire_len = le_u32(h, 8);
    let raw_len = le_u32(h, 12);
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
        msg_type,
        flags,
        wire_len,
        raw_len,
        crc: le_u32(h, CRC_AT),
    })
}

/// Splits a byte stream into frames: feed it whatever the stream delivered,
/// pull frames until it says it needs more. After the first error the
/// decoder stays failed: a stream that lost framing cannot be trusted again,
/// the connection must be closed.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    failed: bool,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends bytes received from the stream.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, DecodeError> {
        if self.failed {
            return Err(DecodeError::Failed);
        }
        let result = self.decode_one();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn decode_one(&mut self) -> Result<Option<Frame>, DecodeError> {
        let avail = &self.buf[self.start..];
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
        let end = FRAME_HEADER_LEN + header.wire_len as usize;
        let Some(wire) = avail.get(FRAME_HEADER_LEN..end) else {
            return Ok(None);
        };
        let computed = crc32c::crc32c_append(crc32c::crc32c(&h[..CRC_AT]), wire);
        if computed != header.crc {
            return Err(DecodeError::ChecksumMismatch {
                stored: header.crc,
                computed,
            });
        }
        let body = if header.flags & FLAG_ZSTD != 0 {
            let body = zstd::bulk::decompress(wire, header.raw_len as usize)
                .map_err(DecodeError::Decompress)?;
            if body.len() != header.raw_len as usize {
                return Err(DecodeError::LengthMismatch {
                    announced: header.raw_len,
                    actual: body.len(),
                });
            }
            body
        } else {
            wire.to_vec()
        };
        self.start += end;
        Ok(Some(Frame {
            msg_type: header.msg_type,
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_random_bodies_go_raw_repetitive_ones_compressed() {
        let small = encode_frame(MessageType::Ack, &[0u8; 100], Compression::Fast).unwrap();
        assert_eq!(small[7], 0);
        let zeros = encode_frame(MessageType::Records, &[0u8; 8192], Compression::Fast).unwrap();
        assert_eq!(zeros[7], FLAG_ZSTD);
        assert!(zeros.len() < 200);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let random: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let raw = encode_frame(MessageType::Records, &random, Compression::Fast).unwrap();
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
        let mut f = encode_frame(MessageType::Ack, &[1, 2, 3], Compression::None).unwrap();
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
