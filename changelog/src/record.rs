//! The change-log record: the one unit every tracker write becomes, and the
//! only byte layout the tracker, the shipper and the receiver share on disk.
//!
//! A record is a fixed 56-byte header followed by its payload. All integers
//! are little-endian. The CRC32C covers the first 52 header bytes and then the
//! payload, so a record verifies as a whole or not at all.
//!
//! ```text
//!  offset size field
//!  ------ ---- ---------------------------------------------------------------
//!       0    4 magic        "TMRC" (54 4d 52 43)
//!       4    1 version      2, or 3 for a grow record (1 is still read,
//!                           see below)
//!       5    1 kind         1 write, 2 write-zeroes, 3 trim, 4 barrier,
//!                           5 marker, 6 resync-needed, 7 grow
//!       6    2 flags        bit 0 app-consistent (marker only)
//!                           bit 1 no-hole (write-zeroes only)
//!       8    8 seq          sequence number: strictly increasing, gap-free
//!                           within a generation
//!      16    8 timestamp    wall clock, nanoseconds since the Unix epoch
//!      24    4 generation   tracker generation (bumped after an unclean stop)
//!      28    4 disk         disk id within the consistency group
//!                           (barrier and marker: 0xffff_ffff, the whole group)
//!      32    8 offset       byte offset on the disk
//!                           barrier: durable-upto, the sequence number of
//!                           the last record whose fdatasync had completed
//!                           when the barrier was appended (0: none)
//!      40    8 length       bytes of the disk the record covers
//!      48    4 payload-len  bytes of payload that follow the header
//!      52    4 crc32c       over bytes 0..52, then the payload
//!      56    … payload      write: the data (payload-len == length)
//!                           marker: the label, 1 to 1024 bytes of UTF-8
//!                           without white space or control characters
//!                           every other kind: empty
//! ```
//!
//! What each kind means when applied to a disk image:
//! - **write**: `payload` is written at `offset`.
//! - **write-zeroes** / **trim**: `offset..offset+length` reads as zeroes
//!   afterwards (the tracker gives trim that defined result on the source).
//! - **barrier**: everything before it is a crash-consistent state of the
//!   whole group; it touches no disk. Its durable-upto is the log's
//!   watermark: after any crash, every record at or below the highest
//!   durable-upto found must still verify, so damage there is never taken
//!   for a torn tail (see [`crate::log`]).
//! - **marker**: a labelled point, application-consistent when flagged; it
//!   touches no disk.
//! - **resync-needed**: the extent may differ from what the log says (an
//!   unclean stop, or writes that were not logged); it must be re-read from
//!   the source. It touches no disk by itself.
//! - **grow**: the disk grew: `offset` is its size before, `length` the
//!   bytes added (non-zero), so its size is `offset + length` from this
//!   record on. Records before it lie within the old size; records after
//!   it may reach into the grown part, whose content before them is the
//!   source's (an extended volume's old blocks, or zeroes): it must be
//!   re-read from the source like a resync-needed extent.
//!
//! # Versions
//!
//! - **1**: as above, but a barrier's offset must be 0 (no watermark).
//! - **2**: a barrier carries durable-upto in its offset field.
//! - **3**: adds the grow kind, which exists only in version 3.
//!
//! Readers accept every version from [`MIN_RECORD_VERSION`] to
//! [`LATEST_RECORD_VERSION`]; a record keeps the version it was written
//! with for its whole life (the log, the wire, the receiver re-encode it
//! with [`Record::encode`], never as a newer version), so its checksum is
//! the one it was created with. Writers write [`RECORD_VERSION`], and a
//! kind that a later version added in that version ([`Kind::min_version`]):
//! a log without a growth holds exactly what the releases before version 3
//! wrote and read, and one with a growth is refused by them at the grow
//! record by its version, not misread. A log holding
//! version-1 records is read in place, no migration; its version-1 barriers
//! give no watermark ([`Header::durable_upto`] is `None`). A later version
//! adds fields or kinds; readers refuse versions above theirs by name
//! ([`DecodeError::UnsupportedVersion`]) rather than guess.

use crate::ids::{DiskId, Seq};
use thiserror::Error;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of a record header.
pub const HEADER_LEN: usize = 56;
/// First bytes of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"TMRC";
/// The record format version this code writes for every kind that version
/// has (a later kind is written in the version that added it).
pub const RECORD_VERSION: u8 = 2;
/// The newest record format version this code reads (and writes a grow
/// record in).
pub const LATEST_RECORD_VERSION: u8 = 3;
/// The oldest record format version this code reads.
pub const MIN_RECORD_VERSION: u8 = 1;
/// The largest payload a record may carry (a write of up to 64 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;
/// The longest marker label, in bytes (the rule of a label is
/// [`tidemark_names::Label`]'s).
pub const MAX_LABEL: usize = tidemark_names::MAX_LABEL_LEN;
/// The `disk` value of records that concern the whole group.
pub const GROUP_DISK: u32 = u32::MAX;
/// The largest sequence number a segment may start at or a cursor hold:
/// more records than a log ever writes, and far enough below `u64::MAX`
/// that counting on from a sequence number read from disk never overflows.
pub const MAX_SEQ: u64 = 1 << 62;

/// Marker flag: the application was quiesced when the marker was taken.
pub const FLAG_APP_CONSISTENT: u16 = 1 << 0;
/// Write-zeroes flag: the client asked that no hole be punched.
pub const FLAG_NO_HOLE: u16 = 1 << 1;
const KNOWN_FLAGS: u16 = FLAG_APP_CONSISTENT | FLAG_NO_HOLE;

const CRC_AT: usize = 52;

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Data written at an offset.
    Write,
    /// An extent that reads as zeroes afterwards.
    WriteZeroes,
    /// An extent discarded by the client; reads as zeroes afterwards.
    Trim,
    /// A crash-consistent point for the whole group.
    Barrier,
    /// A labelled point, possibly application-consistent.
    Marker,
    /// An extent whose content must be re-read from the source.
    ResyncNeeded,
    /// The disk grew (record version 3 and later).
    Grow,
}

impl Kind {
    /// The byte that stands for this kind on disk.
    pub fn code(self) -> u8 {
        match self {
            Kind::Write => 1,
            Kind::WriteZeroes => 2,
            Kind::Trim => 3,
            Kind::Barrier => 4,
            Kind::Marker => 5,
            Kind::ResyncNeeded => 6,
            Kind::Grow => 7,
        }
    }

    /// The kind a byte stands for, if any.
    pub fn from_code(code: u8) -> Option<Kind> {
        Some(match code {
            1 => Kind::Write,
            2 => Kind::WriteZeroes,
            3 => Kind::Trim,
            4 => Kind::Barrier,
            5 => Kind::Marker,
            6 => Kind::ResyncNeeded,
            7 => Kind::Grow,
            _ => return None,
        })
    }

    /// The kebab-case name used by the inspection tools.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Write => "write",
            Kind::WriteZeroes => "write-zeroes",
            Kind::Trim => "trim",
            Kind::Barrier => "barrier",
            Kind::Marker => "marker",
            Kind::ResyncNeeded => "resync-needed",
            Kind::Grow => "grow",
        }
    }

    /// The first record format version that has this kind, and the one a
    /// record of it is written in when that is newer than
    /// [`RECORD_VERSION`].
    pub fn min_version(self) -> u8 {
        match self {
            Kind::Grow => 3,
            _ => MIN_RECORD_VERSION,
        }
    }

    /// The version a new record of this kind is written in.
    pub fn write_version(self) -> u8 {
        self.min_version().max(RECORD_VERSION)
    }
}

/// A record as the appender hands it in, before it has a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// What the record does.
    pub kind: Kind,
    /// Kind-specific flags (`FLAG_*`).
    pub flags: u16,
    /// Disk id within the group ([`DiskId::GROUP`] for barriers and
    /// markers).
    pub disk: DiskId,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes of the disk covered.
    pub length: u64,
    /// Wall clock, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Write data or marker label.
    pub payload: &'a [u8],
}

// The constructors take the disk, and `encode` the sequence number, as
// anything that converts: a `DiskId`/`Seq`, or the bare integer the format
// writes, as tests and fixtures spell them.
impl<'a> Entry<'a> {
    /// A write of `data` at `offset` on `disk`.
    pub fn write(disk: impl Into<DiskId>, offset: u64, data: &'a [u8], timestamp_ns: u64) -> Self {
        Entry {
            kind: Kind::Write,
            flags: 0,
            disk: disk.into(),
            offset,
            length: data.len() as u64,
            timestamp_ns,
            payload: data,
        }
    }

    /// An extent of `disk` that reads as zeroes afterwards.
    pub fn write_zeroes(
        disk: impl Into<DiskId>,
        offset: u64,
        length: u64,
        no_hole: bool,
        timestamp_ns: u64,
    ) -> Self {
        Entry {
            kind: Kind::WriteZeroes,
            flags: if no_hole { FLAG_NO_HOLE } else { 0 },
            disk: disk.into(),
            offset,
            length,
            timestamp_ns,
            payload: &[],
        }
    }

    /// A discarded extent of `disk`.
    pub fn trim(disk: impl Into<DiskId>, offset: u64, length: u64, timestamp_ns: u64) -> Self {
        Entry {
            kind: Kind::Trim,
            flags: 0,
            disk: disk.into(),
            offset,
            length,
            timestamp_ns,
            payload: &[],
        }
    }

    /// A crash-consistent point of the whole group.
    pub fn barrier(timestamp_ns: u64) -> Self {
        Entry {
            kind: Kind::Barrier,
            flags: 0,
            disk: DiskId::GROUP,
            offset: 0,
            length: 0,
            timestamp_ns,
            payload: &[],
        }
    }

    /// A labelled point of the whole group.
    pub fn marker(label: &'a str, app_consistent: bool, timestamp_ns: u64) -> Self {
        Entry {
            kind: Kind::Marker,
            flags: if app_consistent {
                FLAG_APP_CONSISTENT
            } else {
                0
            },
            disk: DiskId::GROUP,
            offset: 0,
            length: 0,
            timestamp_ns,
            payload: label.as_bytes(),
        }
    }

    /// `disk` grew from `from` to `to` bytes (`to` must be larger: the
    /// entry does not validate otherwise).
    pub fn grow(disk: impl Into<DiskId>, from: u64, to: u64, timestamp_ns: u64) -> Self {
        Entry {
            kind: Kind::Grow,
            flags: 0,
            disk: disk.into(),
            offset: from,
            length: to.saturating_sub(from),
            timestamp_ns,
            payload: &[],
        }
    }

    /// An extent of `disk` that must be re-read from the source.
    pub fn resync_needed(
        disk: impl Into<DiskId>,
        offset: u64,
        length: u64,
        timestamp_ns: u64,
    ) -> Self {
        Entry {
            kind: Kind::ResyncNeeded,
            flags: 0,
            disk: disk.into(),
            offset,
            length,
            timestamp_ns,
            payload: &[],
        }
    }

    /// Bytes the record takes in the log.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    /// Checks that the entry is one the format can carry, so an invalid
    /// entry is refused before anything is written.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let payload_len = u32::try_from(self.payload.len())
            .map_err(|_| DecodeError::PayloadTooLarge(u32::MAX))?;
        check_semantics(
            self.kind.write_version(),
            self.kind,
            self.flags,
            self.disk,
            self.offset,
            self.length,
            payload_len,
            self.payload,
        )
    }

    /// Encodes the header for this entry, as a record of the version its
    /// kind is written in ([`Kind::write_version`]), with its sequence number and generation; the CRC covers
    /// `self.payload`, which follows the header. (A barrier's offset is its
    /// durable-upto: the log fills it in.)
    pub fn encode_header(&self, seq: impl Into<Seq>, generation: u32) -> [u8; HEADER_LEN] {
        self.encode_header_with(seq.into(), generation, self.payload_crc())
    }

    /// The CRC32C of the payload alone: computed once, outside any lock,
    /// and folded into the record's CRC by
    /// [`encode_header_with`](Self::encode_header_with).
    pub fn payload_crc(&self) -> u32 {
        crc32c::crc32c(self.payload)
    }

    /// [`encode_header`](Self::encode_header) with the payload's CRC32C
    /// already computed (by [`payload_crc`](Self::payload_crc)): the
    /// record's CRC, over header bytes 0..52 then the payload, is the
    /// header's CRC combined with it, which costs the same for a 1 MiB
    /// payload as for an empty one.
    pub fn encode_header_with(
        &self,
        seq: Seq,
        generation: u32,
        payload_crc: u32,
    ) -> [u8; HEADER_LEN] {
        encode_header(
            self.kind.write_version(),
            self,
            seq,
            generation,
            payload_crc,
        )
    }

    /// Encodes header and payload into one buffer.
    pub fn encode(&self, seq: impl Into<Seq>, generation: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.encode_header(seq, generation));
        out.extend_from_slice(self.payload);
        out
    }
}

/// A record header exactly as it lies on disk: the module's diagram, field for
/// field, little-endian, without padding and at any alignment, so bytes read
/// from a file or a socket are viewed in place and never misread.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 4],
    version: u8,
    kind: u8,
    flags: U16,
    seq: U64,
    timestamp_ns: U64,
    generation: U32,
    disk: U32,
    offset: U64,
    length: U64,
    payload_len: U32,
    crc: U32,
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);
const _: () = assert!(std::mem::offset_of!(RawHeader, crc) == CRC_AT);

/// The header of `entry` as a record of format `version`.
fn raw_header(
    version: u8,
    entry: &Entry<'_>,
    seq: Seq,
    generation: u32,
    payload_crc: u32,
) -> RawHeader {
    let mut h = RawHeader {
        magic: RECORD_MAGIC,
        version,
        kind: entry.kind.code(),
        flags: entry.flags.into(),
        seq: seq.get().into(),
        timestamp_ns: entry.timestamp_ns.into(),
        generation: generation.into(),
        disk: entry.disk.get().into(),
        offset: entry.offset.into(),
        length: entry.length.into(),
        payload_len: (entry.payload.len() as u32).into(),
        crc: U32::ZERO,
    };
    let crc = crc32c_combine(
        crc32c::crc32c(&h.as_bytes()[..CRC_AT]),
        payload_crc,
        entry.payload.len(),
    );
    h.crc = crc.into();
    h
}

/// The header bytes of `entry` as a record of format `version`.
fn encode_header(
    version: u8,
    entry: &Entry<'_>,
    seq: Seq,
    generation: u32,
    payload_crc: u32,
) -> [u8; HEADER_LEN] {
    zerocopy::transmute!(raw_header(version, entry, seq, generation, payload_crc))
}

/// A decoded record header: everything but the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format version the record was written with.
    pub version: u8,
    /// What the record does.
    pub kind: Kind,
    /// Kind-specific flags.
    pub flags: u16,
    /// Sequence number.
    pub seq: Seq,
    /// Wall clock, nanoseconds since the Unix epoch.
    pub timestamp_ns: u64,
    /// Tracker generation.
    pub generation: u32,
    /// Disk id within the group.
    pub disk: DiskId,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes of the disk covered.
    pub length: u64,
    /// Bytes of payload after the header.
    pub payload_len: u32,
    /// The stored CRC32C.
    pub crc: u32,
}

impl Header {
    /// Bytes the whole record takes.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// Decodes and structurally checks a header. The CRC can only be checked
    /// with the payload, by [`Header::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Header, DecodeError> {
        let (h, _) = RawHeader::ref_from_prefix(bytes).map_err(|_| DecodeError::Truncated {
            needed: HEADER_LEN,
            available: bytes.len(),
        })?;
        if h.magic != RECORD_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = h.version;
        if !(MIN_RECORD_VERSION..=LATEST_RECORD_VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = Kind::from_code(h.kind).ok_or(DecodeError::UnknownKind(h.kind))?;
        let payload_len = h.payload_len.get();
        if payload_len > MAX_PAYLOAD {
            return Err(DecodeError::PayloadTooLarge(payload_len));
        }
        Ok(Header {
            version,
            kind,
            flags: h.flags.get(),
            seq: Seq(h.seq.get()),
            timestamp_ns: h.timestamp_ns.get(),
            generation: h.generation.get(),
            disk: DiskId(h.disk.get()),
            offset: h.offset.get(),
            length: h.length.get(),
            payload_len,
            crc: h.crc.get(),
        })
    }

    /// Verifies the CRC over `header_bytes` (the 56 bytes this header was
    /// decoded from) and `payload`, then the kind's rules.
    pub fn verify(&self, header_bytes: &[u8], payload: &[u8]) -> Result<(), DecodeError> {
        if payload.len() != self.payload_len as usize || header_bytes.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                needed: self.record_len(),
                available: header_bytes.len().min(HEADER_LEN) + payload.len(),
            });
        }
        let computed = crc32c::crc32c_append(crc32c::crc32c(&header_bytes[..CRC_AT]), payload);
        if computed != self.crc {
            return Err(DecodeError::ChecksumMismatch {
                stored: self.crc,
                computed,
            });
        }
        self.check_rules(payload)
    }

    /// Verifies like [`verify`](Self::verify), reading the payload once,
    /// and returns the CRC32C of the record's whole bytes as they lie
    /// (all 56 header bytes, the stored checksum among them, then the
    /// payload): what a checksum over a run of records, as a frame's on
    /// the wire, is made of (combined with [`crc32c_combine`]), without
    /// a second pass over the payload.
    pub fn verify_bytes_crc(
        &self,
        header_bytes: &[u8],
        payload: &[u8],
    ) -> Result<u32, DecodeError> {
        if payload.len() != self.payload_len as usize || header_bytes.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                needed: self.record_len(),
                available: header_bytes.len().min(HEADER_LEN) + payload.len(),
            });
        }
        // crc(A ‖ P) = crc(A)·x^(8·|P|) ⊕ crc(P), for the record's own
        // checksum (A: bytes 0..52) and for its bytes (A: bytes 0..56).
        let payload_crc = crc32c::crc32c(payload);
        let shift = x_pow_8n(payload.len());
        let fields = crc32c::crc32c(&header_bytes[..CRC_AT]);
        let computed = multiply_mod_poly(shift, fields) ^ payload_crc;
        if computed != self.crc {
            return Err(DecodeError::ChecksumMismatch {
                stored: self.crc,
                computed,
            });
        }
        self.check_rules(payload)?;
        let header = crc32c::crc32c_append(fields, &header_bytes[CRC_AT..HEADER_LEN]);
        Ok(multiply_mod_poly(shift, header) ^ payload_crc)
    }

    /// The CRC32C of the record's whole bytes (as
    /// [`verify_bytes_crc`](Self::verify_bytes_crc) returns it) from its
    /// stored checksum, without reading the payload: for a record already
    /// verified, as the log reader verifies every record it returns.
    /// `header_bytes`: the 56 bytes this header was decoded from.
    pub fn bytes_crc(&self, header_bytes: &[u8; HEADER_LEN]) -> u32 {
        // stored = crc(A52)·s ⊕ crc(P) and bytes = crc(A56)·s ⊕ crc(P), so
        // bytes = stored ⊕ (crc(A52) ⊕ crc(A56))·s.
        let fields = crc32c::crc32c(&header_bytes[..CRC_AT]);
        let header = crc32c::crc32c_append(fields, &header_bytes[CRC_AT..]);
        self.crc ^ multiply_mod_poly(x_pow_8n(self.payload_len as usize), fields ^ header)
    }

    /// The CRC32C of the payload alone, derived from the stored checksum
    /// without reading the payload. Only for a record that verified (its
    /// stored checksum is the one of its bytes): what a copy of the
    /// payload elsewhere is checksummed with, e.g. the receiver's journal
    /// entry, without a second pass over the bytes.
    pub fn verified_payload_crc(&self) -> u32 {
        // stored = crc(A52)·s ⊕ crc(P), so crc(P) = stored ⊕ crc(A52)·s.
        let fields = crc32c::crc32c(&self.to_bytes()[..CRC_AT]);
        self.crc ^ multiply_mod_poly(x_pow_8n(self.payload_len as usize), fields)
    }

    /// The 56 header bytes as they lie in the record, the stored checksum
    /// included (not computed anew, unlike [`Record::encode_header`]).
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        zerocopy::transmute!(RawHeader {
            magic: RECORD_MAGIC,
            version: self.version,
            kind: self.kind.code(),
            flags: self.flags.into(),
            seq: self.seq.get().into(),
            timestamp_ns: self.timestamp_ns.into(),
            generation: self.generation.into(),
            disk: self.disk.get().into(),
            offset: self.offset.into(),
            length: self.length.into(),
            payload_len: self.payload_len.into(),
            crc: self.crc.into(),
        })
    }

    /// The kind's rules, once the checksum held.
    fn check_rules(&self, payload: &[u8]) -> Result<(), DecodeError> {
        check_semantics(
            self.version,
            self.kind,
            self.flags,
            self.disk,
            self.offset,
            self.length,
            self.payload_len,
            payload,
        )?;
        if self.kind == Kind::Barrier && self.offset >= self.seq.get() && self.offset != 0 {
            return Err(DecodeError::Inconsistent {
                kind: self.kind.name(),
                reason: "durable-upto must lie below the barrier's own sequence number",
            });
        }
        Ok(())
    }

    /// A barrier's durable-upto: every record at or below it had been made
    /// durable before the barrier was appended. `None` for other kinds and
    /// for version-1 barriers, which do not record it.
    pub fn durable_upto(&self) -> Option<Seq> {
        (self.kind == Kind::Barrier && self.version >= 2).then_some(Seq(self.offset))
    }
}

/// A whole record, owning its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The header.
    pub header: Header,
    /// Write data or marker label.
    pub payload: Vec<u8>,
}

impl Record {
    /// Decodes and verifies one record from the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let header = Header::decode(bytes)?;
        let end = header.record_len();
        let payload = bytes.get(HEADER_LEN..end).ok_or(DecodeError::Truncated {
            needed: end,
            available: bytes.len(),
        })?;
        header.verify(bytes, payload)?;
        Ok(Record {
            header,
            payload: payload.to_vec(),
        })
    }

    /// This record as format `version` writes it, for a peer that reads no
    /// newer format: a record already at or below `version` is unchanged;
    /// a version-2 barrier becomes a version-1 one without its durable-upto
    /// (a watermark only the log's own recovery reads). Its checksum is
    /// recomputed over the new header. A kind that `version` does not
    /// have (a grow record for a version-2 peer) has no such form:
    /// [`DecodeError::KindNotInVersion`].
    pub fn in_version(mut self, version: u8) -> Result<Record, DecodeError> {
        if self.header.version <= version {
            return Ok(self);
        }
        if version < MIN_RECORD_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        if self.header.kind.min_version() > version {
            return Err(DecodeError::KindNotInVersion {
                kind: self.header.kind.name(),
                version,
            });
        }
        if version < 2 && self.header.kind == Kind::Barrier {
            self.header.offset = 0;
        }
        self.header.version = version;
        self.header.crc = self.computed_crc();
        Ok(self)
    }

    /// The marker label, for markers.
    pub fn label(&self) -> Option<&str> {
        self.as_view().label()
    }

    /// The record's bytes exactly as written: header (of the record's own
    /// format version) and payload. What the shipper sends and the
    /// receiver verifies against the stored checksum.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header.record_len());
        out.extend_from_slice(&self.encode_header());
        out.extend_from_slice(&self.payload);
        out
    }

    /// The record's header bytes, of its own format version, with the
    /// checksum of its fields and payload as they are now.
    pub fn encode_header(&self) -> [u8; HEADER_LEN] {
        zerocopy::transmute!(self.raw_header())
    }

    /// The checksum of the record's fields and payload as they are now:
    /// `header.crc` unless something changed since the record verified.
    pub fn computed_crc(&self) -> u32 {
        self.as_view().computed_crc()
    }

    fn raw_header(&self) -> RawHeader {
        self.as_view().raw_header()
    }

    /// This record as an entry, e.g. to append it to another log.
    pub fn as_entry(&self) -> Entry<'_> {
        self.as_view().as_entry()
    }

    /// This record with its payload borrowed.
    pub fn as_view(&self) -> RecordRef<'_> {
        RecordRef {
            header: self.header,
            payload: &self.payload,
        }
    }
}

impl<'a> From<&'a Record> for RecordRef<'a> {
    fn from(r: &'a Record) -> Self {
        r.as_view()
    }
}

/// A whole record whose payload is borrowed: a record of a received
/// batch, applied straight from the bytes that came, without copying its
/// payload into a [`Record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// The header.
    pub header: Header,
    /// Write data or marker label.
    pub payload: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// The marker label, for markers.
    pub fn label(&self) -> Option<&'a str> {
        match self.header.kind {
            Kind::Marker => std::str::from_utf8(self.payload).ok(),
            _ => None,
        }
    }

    /// The checksum of the record's fields and payload as they are:
    /// `header.crc` unless they do not match.
    pub fn computed_crc(&self) -> u32 {
        self.raw_header().crc.get()
    }

    fn raw_header(&self) -> RawHeader {
        let entry = self.as_entry();
        raw_header(
            self.header.version,
            &entry,
            self.header.seq,
            self.header.generation,
            entry.payload_crc(),
        )
    }

    /// This record as an entry, e.g. to append it to another log.
    pub fn as_entry(&self) -> Entry<'a> {
        Entry {
            kind: self.header.kind,
            flags: self.header.flags,
            disk: self.header.disk,
            offset: self.header.offset,
            length: self.header.length,
            timestamp_ns: self.header.timestamp_ns,
            payload: self.payload,
        }
    }

    /// The record, owning a copy of its payload.
    pub fn to_record(&self) -> Record {
        Record {
            header: self.header,
            payload: self.payload.to_vec(),
        }
    }
}

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// Fewer bytes than the header or the announced payload needs.
    #[error("truncated record: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the record needs.
        needed: usize,
        /// Bytes there were.
        available: usize,
    },
    /// The bytes do not start with the record magic.
    #[error("no record magic")]
    BadMagic,
    /// The record was written by a format version this code does not read.
    #[error("unsupported record version {0}")]
    UnsupportedVersion(u8),
    /// The kind byte stands for no known kind.
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    /// A record cannot be given the form of an older version that does not
    /// have its kind ([`Record::in_version`]): a peer of that version
    /// cannot take it.
    #[error("a {kind} record has no form in record version {version}")]
    KindNotInVersion {
        /// The record's kind.
        kind: &'static str,
        /// The version asked for.
        version: u8,
    },
    /// The announced payload is larger than any record may carry.
    #[error("payload of {0} bytes exceeds the maximum")]
    PayloadTooLarge(u32),
    /// Header or payload changed after the record was written.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    ChecksumMismatch {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the bytes as they are.
        computed: u32,
    },
    /// The fields contradict the kind's rules (the checksum matched, so the
    /// writer itself was wrong).
    #[error("inconsistent {kind} record: {reason}")]
    Inconsistent {
        /// The record's kind.
        kind: &'static str,
        /// Which rule was broken.
        reason: &'static str,
    },
}

#[allow(clippy::too_many_arguments)]
fn check_semantics(
    version: u8,
    kind: Kind,
    flags: u16,
    disk: DiskId,
    offset: u64,
    length: u64,
    payload_len: u32,
    payload: &[u8],
) -> Result<(), DecodeError> {
    let bad = |reason| {
        Err(DecodeError::Inconsistent {
            kind: kind.name(),
            reason,
        })
    };
    if payload_len > MAX_PAYLOAD {
        return Err(DecodeError::PayloadTooLarge(payload_len));
    }
    if flags & !KNOWN_FLAGS != 0 {
        return bad("unknown flag bits");
    }
    if offset.checked_add(length).is_none() {
        return bad("offset + length overflows");
    }
    let allowed_flags = match kind {
        Kind::Marker => FLAG_APP_CONSISTENT,
        Kind::WriteZeroes => FLAG_NO_HOLE,
        _ => 0,
    };
    if flags & !allowed_flags != 0 {
        return bad("flag not allowed for this kind");
    }
    if version < kind.min_version() {
        return bad("the kind does not exist in the record's version");
    }
    match kind {
        Kind::Write => {
            if length == 0 || length != u64::from(payload_len) {
                return bad("length must equal the payload length and be non-zero");
            }
            if disk == DiskId::GROUP {
                return bad("a write needs a disk");
            }
        }
        Kind::WriteZeroes | Kind::Trim | Kind::ResyncNeeded | Kind::Grow => {
            if payload_len != 0 || length == 0 {
                return bad("needs a non-zero length and no payload");
            }
            if disk == DiskId::GROUP {
                return bad("needs a disk");
            }
        }
        Kind::Barrier => {
            if payload_len != 0 || length != 0 || disk != DiskId::GROUP {
                return bad("a barrier carries no extent and no payload");
            }
            if version < 2 && offset != 0 {
                return bad("a version-1 barrier carries no durable-upto");
            }
        }
        Kind::Marker => {
            if length != 0 || offset != 0 || disk != DiskId::GROUP {
                return bad("a marker carries no extent");
            }
            // What earlier releases wrote is read as they wrote it; the
            // rule of labels applies when a marker is made (the tracker and
            // the CLI take a `tidemark_names::Label`).
            if payload.len() > MAX_LABEL || std::str::from_utf8(payload).is_err() {
                return bad("label must be UTF-8 of at most 1 KiB");
            }
        }
    }
    Ok(())
}

/// The CRC32C polynomial, bit-reflected.
const CRC32C_POLY: u32 = 0x82f6_3b78;

/// `a * b` modulo the CRC32C polynomial, in the reflected representation
/// (bit 31 is x^0).
const fn multiply_mod_poly(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut product = 0u32;
    loop {
        if a & m != 0 {
            product ^= b;
            if a & (m - 1) == 0 {
                return product;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
    }
}

/// `x^(2^k)` modulo the CRC32C polynomial, for k in 0..32.
const X_POW_2K: [u32; 32] = {
    let mut table = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 32 {
        table[k] = p;
        p = multiply_mod_poly(p, p);
        k += 1;
    }
    table
};

/// The CRC32C of `A` followed by `B` from the CRCs of both and `B`'s
/// length: `crc(A) · x^(8·len(B)) ⊕ crc(B)` (the pre- and post-conditioning
/// cancel). One multiplication per set bit of the length, so a 4 KiB and a
/// 32 MiB payload cost the same few hundred nanoseconds at most — unlike
/// the matrix method of the crc32c crate, which squares a 32×32 matrix per
/// bit of the length.
pub fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: usize) -> u32 {
    multiply_mod_poly(x_pow_8n(len_b), crc_a) ^ crc_b
}

/// `x^(8n)` modulo the CRC32C polynomial: what appending `n` bytes
/// multiplies a CRC by.
fn x_pow_8n(n: usize) -> u32 {
    let mut shift = 1u32 << 31; // x^0
    let mut n = n as u64;
    let mut k = 3; // 8 bits per byte: x^(8n) = x^(n · 2^3)
    while n != 0 {
        if n & 1 != 0 {
            shift = multiply_mod_poly(X_POW_2K[k & 31], shift);
        }
        n >>= 1;
        k += 1;
    }
    shift
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A label is printed on admins' terminals and sent as one word of a
    /// control request: white space and control characters are refused
    /// when a marker is made (a `Label`). A record an earlier release
    /// wrote with such a label is still read and applied (that release
    /// took any UTF-8 of up to 1 KiB).
    #[test]
    fn a_marker_label_must_be_one_printable_word() {
        assert!(tidemark_names::Label::check("nightly").is_ok());
        for bad in ["", "a b", "\x1b[2Jcleared", "a\nb"] {
            assert!(tidemark_names::Label::check(bad).is_err(), "{bad:?}");
            let read = Record::decode(&Entry::marker(bad, false, 1).encode(Seq(7), 1)).unwrap();
            assert_eq!(read.label(), Some(bad));
        }
        let long = "l".repeat(MAX_LABEL + 1);
        assert!(tidemark_names::Label::check(&long).is_err());
        assert!(matches!(
            Record::decode(&Entry::marker(&long, false, 1).encode(Seq(7), 1)),
            Err(DecodeError::Inconsistent { .. })
        ));
    }

    fn arb_entry() -> impl Strategy<Value = (Kind, u16, DiskId, u64, u64, u64, Vec<u8>)> {
        prop_oneof![
            (
                0u32..8,
                0u64..1 << 40,
                proptest::collection::vec(any::<u8>(), 1..2048),
                any::<u64>()
            )
                .prop_map(|(d, o, p, t)| (
                    Kind::Write,
                    0,
                    DiskId(d),
                    o,
                    p.len() as u64,
                    t,
                    p
                )),
            (
                0u32..8,
                0u64..1 << 40,
                1u64..1 << 30,
                any::<bool>(),
                any::<u64>()
            )
                .prop_map(|(d, o, l, nh, t)| (
                    Kind::WriteZeroes,
                    if nh { FLAG_NO_HOLE } else { 0 },
                    DiskId(d),
                    o,
                    l,
                    t,
                    vec![]
                )),
            (0u32..8, 0u64..1 << 40, 1u64..1 << 30, any::<u64>()).prop_map(|(d, o, l, t)| (
                Kind::Trim,
                0,
                DiskId(d),
                o,
                l,
                t,
                vec![]
            )),
            any::<u64>().prop_map(|t| (Kind::Barrier, 0, DiskId::GROUP, 0, 0, t, vec![])),
            ("[a-z0-9._-]{1,40}", any::<bool>(), any::<u64>()).prop_map(|(l, a, t)| (
                Kind::Marker,
                if a { FLAG_APP_CONSISTENT } else { 0 },
                DiskId::GROUP,
                0,
                0,
                t,
                l.into_bytes()
            )),
        ]
    }

    proptest! {
        #[test]
        fn round_trip((kind, flags, disk, offset, length, ts, payload) in arb_entry(), seq in any::<u64>(), generation in any::<u32>()) {
            let e = Entry { kind, flags, disk, offset, length, timestamp_ns: ts, payload: &payload };
            prop_assert!(e.validate().is_ok());
            let bytes = e.encode(Seq(seq), generation);
            let r = Record::decode(&bytes).unwrap();
            prop_assert_eq!(r.header.seq, Seq(seq));
            prop_assert_eq!(r.header.generation, generation);
            prop_assert_eq!(r.as_entry(), e);
        }

        #[test]
        fn a_combined_crc_equals_the_crc_of_header_then_payload((kind, flags, disk, offset, length, ts, payload) in arb_entry(), seq in any::<u64>()) {
            let e = Entry { kind, flags, disk, offset, length, timestamp_ns: ts, payload: &payload };
            let h = e.encode_header(Seq(seq), 3);
            let whole = crc32c::crc32c_append(crc32c::crc32c(&h[..CRC_AT]), &payload);
            prop_assert_eq!(&h[CRC_AT..], &whole.to_le_bytes()[..]);
        }

        #[test]
        fn the_fast_combine_equals_the_crc_of_the_concatenation(a in proptest::collection::vec(any::<u8>(), 0..300), b in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let whole = crc32c::crc32c_append(crc32c::crc32c(&a), &b);
            prop_assert_eq!(crc32c_combine(crc32c::crc32c(&a), crc32c::crc32c(&b), b.len()), whole);
            prop_assert_eq!(crc32c::crc32c_combine(crc32c::crc32c(&a), crc32c::crc32c(&b), b.len()), whole);
        }

        #[test]
        fn the_bytes_crc_is_the_crc_of_the_whole_record_read_once_or_not_at_all((kind, flags, disk, offset, length, ts, payload) in arb_entry(), seq in 1u64..1 << 40) {
            let e = Entry { kind, flags, disk, offset, length, timestamp_ns: ts, payload: &payload };
            let bytes = e.encode(Seq(seq), 3);
            let whole = crc32c::crc32c(&bytes);
            let h = Header::decode(&bytes).unwrap();
            prop_assert_eq!(h.verify_bytes_crc(&bytes, &bytes[HEADER_LEN..]), Ok(whole));
            let hb: [u8; HEADER_LEN] = bytes[..HEADER_LEN].try_into().unwrap();
            prop_assert_eq!(h.bytes_crc(&hb), whole);
            prop_assert_eq!(h.to_bytes(), hb);
            prop_assert_eq!(h.verified_payload_crc(), crc32c::crc32c(&payload));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Record::decode(&bytes);
            let _ = Header::decode(&bytes);
        }

        #[test]
        fn arbitrary_bytes_behind_a_valid_magic_never_panic(mut bytes in proptest::collection::vec(any::<u8>(), 56..400), kind in 0u8..8) {
            bytes[0..4].copy_from_slice(&RECORD_MAGIC);
            bytes[4] = RECORD_VERSION;
            bytes[5] = kind;
            let _ = Record::decode(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_detected((kind, flags, disk, offset, length, ts, payload) in arb_entry(), bit in any::<proptest::sample::Index>()) {
            let e = Entry { kind, flags, disk, offset, length, timestamp_ns: ts, payload: &payload };
            let mut bytes = e.encode(Seq(7), 1);
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Record::decode(&bytes).is_err());
            let refused = Header::decode(&bytes)
                .and_then(|h| h.verify_bytes_crc(&bytes, bytes.get(HEADER_LEN..).unwrap_or_default()));
            prop_assert!(refused.is_err());
        }
    }

    #[test]
    fn inconsistent_records_are_refused() {
        let e = Entry {
            length: 5,
            ..Entry::write(DiskId(0), 0, b"abc", 0)
        };
        assert!(matches!(
            e.validate(),
            Err(DecodeError::Inconsistent { .. })
        ));
        let bytes = e.encode(Seq(1), 0);
        assert!(matches!(
            Record::decode(&bytes),
            Err(DecodeError::Inconsistent { .. })
        ));
        assert!(Entry::trim(DiskId(0), u64::MAX, 2, 0).validate().is_err());
        assert!(Entry::marker(&"x".repeat(2000), false, 0)
            .validate()
            .is_err());
        assert!(Entry::write(DiskId::GROUP, 0, b"a", 0).validate().is_err());
    }

    /// A version-1 encoder as the version-1 code had it: the same layout,
    /// version byte 1, a barrier's offset 0.
    fn encode_v1(e: &Entry<'_>, seq: u64, generation: u32) -> Vec<u8> {
        let mut bytes = e.encode(Seq(seq), generation);
        bytes[4] = 1;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..CRC_AT]), e.payload);
        bytes[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn version_1_records_are_read_and_keep_their_bytes() {
        let data = [5u8; 300];
        let entries = [
            Entry::write(DiskId(2), 4096, &data, 11),
            Entry::write_zeroes(DiskId(0), 0, 8192, true, 12),
            Entry::trim(DiskId(1), 512, 512, 13),
            Entry::barrier(14),
            Entry::marker("before-upgrade", true, 15),
            Entry::resync_needed(DiskId(0), 0, 1 << 20, 16),
        ];
        for (i, e) in entries.iter().enumerate() {
            let bytes = encode_v1(e, 100 + i as u64, 3);
            let r = Record::decode(&bytes).unwrap();
            assert_eq!(r.header.version, 1);
            assert_eq!(r.as_entry(), *e);
            assert_eq!(
                r.header.durable_upto(),
                None,
                "a v1 barrier has no watermark"
            );
            // Re-encoded in its own version: the very bytes, the checksum
            // it was created with.
            assert_eq!(r.encode(), bytes);
        }
    }

    #[test]
    fn a_record_in_an_older_version_verifies_and_keeps_all_but_the_watermark() {
        let barrier = Record::decode(
            &Entry {
                offset: 41,
                ..Entry::barrier(7)
            }
            .encode(Seq(42), 3),
        )
        .unwrap();
        let converted = barrier.clone().in_version(1).unwrap();
        let v1 = Record::decode(&converted.encode()).unwrap();
        assert_eq!(v1, converted, "the checksum follows the new header");
        assert_eq!(
            (v1.header.version, v1.header.durable_upto(), v1.header.seq),
            (1, None, Seq(42))
        );
        assert_eq!(v1.header.generation, 3);
        let payload = [5u8; 512];
        let write =
            Record::decode(&Entry::write(DiskId(1), 4096, &payload, 9).encode(Seq(43), 3)).unwrap();
        let w1 = Record::decode(&write.clone().in_version(1).unwrap().encode()).unwrap();
        assert_eq!(
            (w1.header.version, w1.header.offset, &w1.payload[..]),
            (1, 4096, &payload[..])
        );
        // Already old enough: unchanged, bytes and all.
        assert_eq!(w1.clone().in_version(2).unwrap(), w1);
        assert!(matches!(
            write.in_version(0),
            Err(DecodeError::UnsupportedVersion(0))
        ));
    }

    #[test]
    fn a_barrier_carries_its_durable_upto_from_version_2_on() {
        let e = Entry {
            offset: 41,
            ..Entry::barrier(7)
        };
        assert!(e.validate().is_ok());
        let r = Record::decode(&e.encode(Seq(42), 0)).unwrap();
        assert_eq!(
            (r.header.version, r.header.durable_upto()),
            (2, Some(Seq(41)))
        );
        assert_eq!(r.encode(), e.encode(Seq(42), 0));
        // At or above its own sequence number it means nothing: refused.
        assert!(matches!(
            Record::decode(&e.encode(Seq(41), 0)),
            Err(DecodeError::Inconsistent { .. })
        ));
        // A version-1 barrier never had one.
        assert!(matches!(
            Record::decode(&encode_v1(&e, 42, 0)),
            Err(DecodeError::Inconsistent { .. })
        ));
    }

    #[test]
    fn a_newer_version_is_refused_by_number() {
        let mut bytes = Entry::barrier(1).encode(Seq(1), 0);
        bytes[4] = LATEST_RECORD_VERSION + 1;
        assert_eq!(
            Record::decode(&bytes),
            Err(DecodeError::UnsupportedVersion(LATEST_RECORD_VERSION + 1))
        );
        bytes[4] = 0;
        assert_eq!(
            Record::decode(&bytes),
            Err(DecodeError::UnsupportedVersion(0))
        );
    }

    /// A version-2 header byte for byte as the module's diagram draws it.
    #[test]
    fn the_header_has_the_documented_layout() {
        let fields = "544d5243020100000900000000000000e8030000000000000200000005000000\
                      0010000000000000040000000000000004000000";
        let mut expected = crate::from_hex(fields);
        let payload = b"abcd";
        let crc = crc32c::crc32c_append(crc32c::crc32c(&expected), payload);
        expected.extend_from_slice(&crc.to_le_bytes());
        let entry = Entry::write(DiskId(5), 4096, payload, 1000);
        assert_eq!(entry.encode_header(Seq(9), 2).as_slice(), expected);
        let header = Header::decode(&expected).unwrap();
        assert_eq!(
            (header.kind, header.seq, header.generation, header.crc),
            (Kind::Write, Seq(9), 2, crc)
        );
        assert_eq!(header.verify(&expected, payload), Ok(()));
    }

    /// A growth is a record of its own, in version 3, the only version
    /// that has its kind: every other kind is still written in version 2,
    /// so a log without a growth reads as before in earlier releases, and
    /// one with a growth is refused by them at that record by its
    /// version (they read versions 1 and 2 only).
    #[test]
    fn a_grow_record_is_version_3_and_has_no_older_form() {
        let entry = Entry::grow(DiskId(1), 16 << 20, 40 << 20, 7);
        assert_eq!(entry.validate(), Ok(()));
        let bytes = entry.encode(Seq(5), 1);
        assert_eq!((bytes[4], bytes[5]), (3, 7));
        let record = Record::decode(&bytes).unwrap();
        assert_eq!(
            (
                record.header.kind,
                record.header.offset,
                record.header.length
            ),
            (Kind::Grow, 16 << 20, 24 << 20)
        );
        assert_eq!(record.encode(), bytes);
        assert_eq!(Entry::barrier(1).encode(Seq(1), 0)[4], RECORD_VERSION);
        assert_eq!(
            record.clone().in_version(2),
            Err(DecodeError::KindNotInVersion {
                kind: "grow",
                version: 2
            })
        );
        assert_eq!(record.clone().in_version(3), Ok(record));
        // The kind byte in an older version is a writer's mistake, refused
        // even with a checksum that holds.
        let mut old = bytes.clone();
        old[4] = 2;
        let crc = crc32c::crc32c(&old[..CRC_AT]);
        old[CRC_AT..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            Record::decode(&old),
            Err(DecodeError::Inconsistent { kind: "grow", .. })
        ));
    }

    #[test]
    fn a_growth_must_add_bytes_to_a_disk() {
        assert!(Entry::grow(DiskId(1), 4096, 4096, 0).validate().is_err());
        assert!(Entry::grow(DiskId(1), 8192, 4096, 0).validate().is_err());
        assert!(Entry::grow(DiskId::GROUP, 0, 4096, 0).validate().is_err());
    }

    #[test]
    fn truncation_is_typed() {
        let bytes = Entry::write(DiskId(1), 4096, &[7u8; 100], 0).encode(Seq(1), 0);
        for cut in 0..bytes.len() {
            assert!(matches!(
                Record::decode(&bytes[..cut]),
                Err(DecodeError::Truncated { .. })
            ));
        }
    }
}
