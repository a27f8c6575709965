//! Segment files: the fixed-size, preallocated files the log is made of, and
//! the scan that finds where a segment's valid records end.
//!
//! A segment is named `NNNNNNNNNNNNNNNNNNNN.seg` after its index (20 decimal
//! digits, so names sort in log order) and starts with a 64-byte header;
//! records follow back to back from byte 64. Space after the last record is
//! zero (preallocated, or zeroed by recovery), so the scan ends at the first
//! all-zero header, and every byte from there to the end of the file must be
//! zero too (a zeroed page in the middle of records is damage, not an end);
//! anything else that does not verify is a torn or damaged record. A segment
//! file is never shorter than its header's segment size: it is preallocated
//! and synced before any record goes in. All integers little-endian.
//!
//! ```text
//!  offset size field
//!  ------ ---- -------------------------------------------------------------
//!       0    8 magic         "TMLOGSEG"
//!       8    4 version       1
//!      12    4 generation    tracker generation of every record in it
//!      16    8 index         the segment's index; equals the file name's
//!      24    8 first-seq     sequence number of the first record
//!      32    8 segment-size  the file's preallocated size
//!      40    8 created       wall clock, ns since the Unix epoch
//!      48   12 reserved      zero
//!      60    4 crc32c        over bytes 0..60
//! ```
//!
//! Within a segment, records carry the segment's generation and consecutive
//! sequence numbers from `first-seq`. A segment is *sealed* once a later one
//! exists; sealed segments are fsynced before their successor is created and
//! never written again, until recycled.
//!
//! # Versions
//!
//! The header's version describes the header alone; records carry their own
//! (see [`crate::record`]), so a version-1 segment holds records of any
//! version. Version 1 is the only header version so far; a reader refuses
//! a version it does not know by name
//! ([`SegmentHeaderError::UnsupportedVersion`]), and the appender never
//! removes or rewrites such a segment.

use crate::ids::Seq;
use crate::record::{DecodeError, Header, HEADER_LEN, MAX_SEQ, RECORD_MAGIC};
use crate::storage::{LogDir, LogFile};
use std::io;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Bytes of a segment header; records start here.
pub const SEGMENT_HEADER_LEN: u64 = 64;
const SEGMENT_MAGIC: [u8; 8] = *b"TMLOGSEG";
const SEGMENT_VERSION: u32 = 1;

/// The file name of segment `index`.
pub fn segment_name(index: u64) -> String {
    format!("{index:020}.seg")
}

/// The index a segment file name stands for, if it is one.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The indices of the segment files in `dir`, ascending.
pub fn segment_indices<D: LogDir>(dir: &D) -> io::Result<Vec<u64>> {
    let mut indices: Vec<u64> = dir
        .list()?
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .collect();
    indices.sort_unstable();
    Ok(indices)
}

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Generation of every record in the segment.
    pub generation: u32,
    /// The segment's index.
    pub index: u64,
    /// Sequence number of its first record.
    pub first_seq: Seq,
    /// Its preallocated size.
    pub segment_size: u64,
    /// When it was created, ns since the Unix epoch.
    pub created_ns: u64,
}

/// Why a segment header is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SegmentHeaderError {
    /// The file is shorter than a header.
    #[error("shorter than a segment header")]
    Truncated,
    /// The header is all zeroes: the file was created but never initialised.
    #[error("header never written")]
    Blank,
    /// Wrong magic: not a segment file.
    #[error("not a segment header")]
    BadMagic,
    /// A format version this code does not read.
    #[error("unsupported segment version {0}")]
    UnsupportedVersion(u32),
    /// The header's checksum does not match.
    #[error("segment header checksum mismatch")]
    ChecksumMismatch,
    /// Bytes this version keeps reserved (zero) are set: the header was
    /// not written by this version.
    #[error("reserved bytes of the segment header are set")]
    ReservedNotZero,
    /// The first sequence number is 0 or above [`MAX_SEQ`]: no log starts
    /// a segment there.
    #[error("first sequence number {0} is out of range")]
    FirstSeqOutOfRange(u64),
    /// The generation is the last one a header can hold (`u32::MAX`): no
    /// log gets there (one generation per unclean start), and no new
    /// generation could follow it after a cut.
    #[error("generation {} is the last one a segment can name", u32::MAX)]
    GenerationAtMaximum,
}

/// A segment header exactly as it lies on disk: the module's diagram, field
/// for field, little-endian, without padding and at any alignment.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawSegmentHeader {
    magic: [u8; 8],
    version: U32,
    generation: U32,
    index: U64,
    first_seq: U64,
    segment_size: U64,
    created_ns: U64,
    reserved: [u8; 12],
    crc: U32,
}

const _: () = assert!(size_of::<RawSegmentHeader>() == SEGMENT_HEADER_LEN as usize);
const CRC_AT: usize = std::mem::offset_of!(RawSegmentHeader, crc);

impl SegmentHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut h = RawSegmentHeader {
            magic: SEGMENT_MAGIC,
            version: SEGMENT_VERSION.into(),
            generation: self.generation.into(),
            index: self.index.into(),
            first_seq: self.first_seq.get().into(),
            segment_size: self.segment_size.into(),
            created_ns: self.created_ns.into(),
            reserved: [0; 12],
            crc: U32::ZERO,
        };
        h.crc = crc32c::crc32c(&h.as_bytes()[..CRC_AT]).into();
        zerocopy::transmute!(h)
    }

    /// Decodes and verifies a header.
    pub fn decode(bytes: &[u8]) -> Result<SegmentHeader, SegmentHeaderError> {
        let (h, _) =
            RawSegmentHeader::ref_from_prefix(bytes).map_err(|_| SegmentHeaderError::Truncated)?;
        if h.as_bytes().iter().all(|b| *b == 0) {
            return Err(SegmentHeaderError::Blank);
        }
        if h.magic != SEGMENT_MAGIC {
            return Err(SegmentHeaderError::BadMagic);
        }
        let version = h.version.get();
        if version != SEGMENT_VERSION {
            return Err(SegmentHeaderError::UnsupportedVersion(version));
        }
        if crc32c::crc32c(&h.as_bytes()[..CRC_AT]) != h.crc.get() {
            return Err(SegmentHeaderError::ChecksumMismatch);
        }
        if h.reserved.iter().any(|b| *b != 0) {
            return Err(SegmentHeaderError::ReservedNotZero);
        }
        let first_seq = h.first_seq.get();
        if first_seq == 0 || first_seq > MAX_SEQ {
            return Err(SegmentHeaderError::FirstSeqOutOfRange(first_seq));
        }
        if h.generation.get() == u32::MAX {
            return Err(SegmentHeaderError::GenerationAtMaximum);
        }
        Ok(SegmentHeader {
            generation: h.generation.get(),
            index: h.index.get(),
            first_seq: Seq(first_seq),
            segment_size: h.segment_size.get(),
            created_ns: h.created_ns.get(),
        })
    }
}

/// Reads and decodes the header of an open segment file.
pub fn read_segment_header(
    file: &impl LogFile,
) -> io::Result<Result<SegmentHeader, SegmentHeaderError>> {
    let mut buf = [0u8; SEGMENT_HEADER_LEN as usize];
    let n = file.read_full_at(&mut buf, 0)?;
    Ok(SegmentHeader::decode(&buf[..n]))
}

/// Whether the newest segment file `index`, whose header is not its own,
/// is a roll that did not complete and holds no record: the successor of
/// `prev` (index and first sequence number of the segment before it, if
/// any) whose creation stopped before its header was synced — blank, torn
/// or shorter than a header, with nothing but zeroes after it — or a
/// recycled file still carrying the header (or the records) of the
/// segment it was, whose old name no longer exists. Anything else is not
/// something a crash leaves: a header that names a segment that still
/// exists (two files swapped), records after a blank header, a version
/// this code does not know, a file that does not follow `prev`.
pub fn is_unfinished_roll<D: LogDir>(
    dir: &D,
    index: u64,
    prev: Option<(u64, Seq)>,
    file: &D::File,
    header: &Result<SegmentHeader, SegmentHeaderError>,
) -> io::Result<bool> {
    if prev.is_some_and(|(p, _)| p + 1 != index) {
        return Ok(false);
    }
    let older_than_prev = |seq: Seq| prev.is_none_or(|(_, first)| seq < first);
    match header {
        Ok(h) => {
            let old_name_gone = match dir.open(&segment_name(h.index), false) {
                Ok(_) => false,
                Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                Err(e) => return Err(e),
            };
            Ok(h.index < index && old_name_gone && older_than_prev(h.first_seq))
        }
        Err(SegmentHeaderError::UnsupportedVersion(_)) => Ok(false),
        Err(_) => {
            // A header rewritten over a recycled file may tear while the
            // records of what the file was still follow it: those are older
            // than the log's newest segment.
            let mut buf = [0u8; HEADER_LEN];
            let n = file.read_full_at(&mut buf, SEGMENT_HEADER_LEN)?;
            if let Ok(h) = Header::decode(&buf[..n]) {
                let mut payload = vec![0u8; h.payload_len as usize];
                let got =
                    file.read_full_at(&mut payload, SEGMENT_HEADER_LEN + HEADER_LEN as u64)?;
                if got == payload.len() && h.verify(&buf, &payload).is_ok() {
                    return Ok(older_than_prev(h.seq));
                }
            }
            Ok(first_nonzero(file, SEGMENT_HEADER_LEN)?.is_none())
        }
    }
}

/// The offset of the first byte at or after `from` that is not zero, if
/// any: after the last record of a segment there must be none.
pub fn first_nonzero(file: &impl LogFile, from: u64) -> io::Result<Option<u64>> {
    let mut buf = vec![0u8; 64 << 10];
    let mut at = from;
    loop {
        let n = file.read_full_at(&mut buf, at)?;
        if let Some(i) = buf[..n].iter().position(|b| *b != 0) {
            return Ok(Some(at + i as u64));
        }
        if n < buf.len() {
            return Ok(None);
        }
        at += n as u64;
    }
}

/// Records that verify after a damaged one in the same segment, found by
/// trying every byte from `from` on as the start of a record: after a
/// crash, pages written later may have reached the disk while an earlier
/// one was torn, and after bit rot whole records may follow the damage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Beyond {
    /// Verified records of the segment's generation, numbered from the
    /// damaged record's sequence number on.
    pub records: u64,
    /// The highest sequence number among them.
    pub last_seq: Option<Seq>,
    /// The highest durable-upto of the barriers among them.
    pub durable_upto: Option<Seq>,
}

/// Searches `file` from `from` for records of segment `header` numbered at
/// least `min_seq` (see [`Beyond`]).
pub fn scan_beyond(
    file: &impl LogFile,
    header: &SegmentHeader,
    from: u64,
    min_seq: Seq,
) -> io::Result<Beyond> {
    const CHUNK: usize = 1 << 20;
    let mut found = Beyond::default();
    let mut buf = vec![0u8; CHUNK + RECORD_MAGIC.len()];
    let mut record = [0u8; HEADER_LEN];
    let mut payload = Vec::new();
    let mut at = from;
    loop {
        let n = file.read_full_at(&mut buf, at)?;
        if n < RECORD_MAGIC.len() {
            return Ok(found);
        }
        let starts = n - RECORD_MAGIC.len() + 1;
        for i in 0..starts.min(CHUNK) {
            if buf[i..i + RECORD_MAGIC.len()] != RECORD_MAGIC {
                continue;
            }
            let pos = at + i as u64;
            let got = file.read_full_at(&mut record, pos)?;
            let Ok(h) = Header::decode(&record[..got]) else {
                continue;
            };
            payload.resize(h.payload_len as usize, 0);
            let got = file.read_full_at(&mut payload, pos + HEADER_LEN as u64)?;
            if got < payload.len()
                || h.verify(&record, &payload).is_err()
                || h.generation != header.generation
                || h.seq < min_seq
            {
                continue;
            }
            found.records += 1;
            found.last_seq = found.last_seq.max(Some(h.seq));
            found.durable_upto = found.durable_upto.max(h.durable_upto());
        }
        if n < buf.len() {
            return Ok(found);
        }
        at += CHUNK as u64;
    }
}

/// How the valid records of a segment end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanEnd {
    /// Zeroes (unused preallocated space) or the end of the file.
    Clean,
    /// Bytes that are not a valid next record: a torn write or damage.
    Damaged {
        /// What was wrong with them.
        reason: Damage,
    },
}

/// What was found where the next record should have been.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    /// The bytes do not decode or verify as a record.
    #[error("{0}")]
    Record(#[from] DecodeError),
    /// A valid record, but not the sequence number that must come next.
    #[error("sequence number {found} where {expected} was expected")]
    OutOfSequence {
        /// The sequence number that had to come next.
        expected: Seq,
        /// The one found.
        found: Seq,
    },
    /// A valid record of another generation than its segment's.
    #[error("generation {found} in a segment of generation {expected}")]
    WrongGeneration {
        /// The segment's generation.
        expected: u32,
        /// The record's.
        found: u32,
    },
    /// Zeroes where the next record should be, but data after them: a
    /// zeroed page or a hole in the middle of the records.
    #[error("zeroes where a record should be, but data follows at byte {at}")]
    DataAfterZeroes {
        /// The first byte that is not zero.
        at: u64,
    },
}

/// A record's place, found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// The record's header.
    pub header: Header,
    /// Byte offset of the record in its segment file.
    pub at: u64,
}

/// Reads records from an open segment file in order, verifying each.
pub struct SegmentCursor {
    header: SegmentHeader,
    pos: u64,
    next_seq: Seq,
    header_buf: [u8; HEADER_LEN],
}

impl SegmentCursor {
    /// Starts at the segment's first record.
    pub fn new(header: SegmentHeader) -> SegmentCursor {
        SegmentCursor {
            header,
            pos: SEGMENT_HEADER_LEN,
            next_seq: header.first_seq,
            header_buf: [0; HEADER_LEN],
        }
    }

    /// The segment's header.
    pub fn segment(&self) -> &SegmentHeader {
        &self.header
    }

    /// Byte offset where the next record is expected.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Sequence number the next record must have.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Reads the next record into `payload` (replacing its content). Returns
    /// `Ok(Ok(Some(..)))` for a verified record, `Ok(Ok(None))` at a clean
    /// end, `Ok(Err(damage))` where the bytes are not the next record. The
    /// cursor only advances past verified records.
    pub fn next(
        &mut self,
        file: &impl LogFile,
        payload: &mut Vec<u8>,
    ) -> io::Result<Result<Option<Located>, Damage>> {
        let n = file.read_full_at(&mut self.header_buf, self.pos)?;
        let bytes = &self.header_buf[..n];
        if bytes.iter().all(|b| *b == 0) {
            // End of file, or zeroes: nothing was ever written here. (A
            // header cut short by the end of the file with non-zero bytes in
            // it is a torn write, reported below.)
            return Ok(Ok(None));
        }
        let header = match Header::decode(bytes) {
            Ok(h) => h,
            Err(e) => return Ok(Err(Damage::Record(e))),
        };
        payload.clear();
        payload.resize(header.payload_len as usize, 0);
        let got = file.read_full_at(payload, self.pos + HEADER_LEN as u64)?;
        if got < payload.len() {
            return Ok(Err(Damage::Record(DecodeError::Truncated {
                needed: header.record_len(),
                available: HEADER_LEN + got,
            })));
        }
        if let Err(e) = header.verify(&self.header_buf, payload) {
            return Ok(Err(Damage::Record(e)));
        }
        if header.seq != self.next_seq {
            return Ok(Err(Damage::OutOfSequence {
                expected: self.next_seq,
                found: header.seq,
            }));
        }
        if header.generation != self.header.generation {
            return Ok(Err(Damage::WrongGeneration {
                expected: self.header.generation,
                found: header.generation,
            }));
        }
        let at = self.pos;
        self.pos += header.record_len() as u64;
        self.next_seq = self.next_seq.next();
        Ok(Ok(Some(Located { header, at })))
    }

    /// Like [`SegmentCursor::next`], for a segment nobody is appending
    /// to: at the end of the records, every byte to the end of the file
    /// must be zero, else the end is [`Damage::DataAfterZeroes`].
    pub fn next_settled(
        &mut self,
        file: &impl LogFile,
        payload: &mut Vec<u8>,
    ) -> io::Result<Result<Option<Located>, Damage>> {
        match self.next(file, payload)? {
            Ok(None) => Ok(match first_nonzero(file, self.pos)? {
                Some(at) => Err(Damage::DataAfterZeroes { at }),
                None => Ok(None),
            }),
            other => Ok(other),
        }
    }

    /// Reads records to the end (see [`SegmentCursor::next_settled`]);
    /// returns how the segment ends and the highest durable-upto of the
    /// barriers read.
    pub fn scan_to_end(&mut self, file: &impl LogFile) -> io::Result<(ScanEnd, Option<Seq>)> {
        let mut payload = Vec::new();
        let mut durable_upto = None;
        loop {
            match self.next_settled(file, &mut payload)? {
                Ok(Some(located)) => durable_upto = durable_upto.max(located.header.durable_upto()),
                Ok(None) => return Ok((ScanEnd::Clean, durable_upto)),
                Err(reason) => return Ok((ScanEnd::Damaged { reason }, durable_upto)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("cursor"), None);
        assert_eq!(parse_segment_name("0000000000000000004x.seg"), None);
    }

    #[test]
    fn a_header_with_reserved_bytes_set_is_refused() {
        // Found by the changelog_record fuzz target: a header whose
        // reserved bytes were set under a valid checksum read as if they
        // were zero, so a header this version did not write passed as one
        // it did.
        let mut h = SegmentHeader {
            generation: 3,
            index: 7,
            first_seq: Seq(42),
            segment_size: 4096,
            created_ns: 1,
        }
        .encode();
        h[48] = 0x17;
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&h),
            Err(SegmentHeaderError::ReservedNotZero)
        );
    }

    #[test]
    fn a_header_at_the_last_generation_is_refused() {
        // Found by the changelog_dir fuzz target: a log recovered at
        // generation u32::MAX, after a cut, needs a generation after it
        // that no header can hold (the tracker's next generation
        // overflowed).
        let header = |generation| SegmentHeader {
            generation,
            index: 7,
            first_seq: Seq(42),
            segment_size: 4096,
            created_ns: 1,
        };
        assert_eq!(
            SegmentHeader::decode(&header(u32::MAX).encode()),
            Err(SegmentHeaderError::GenerationAtMaximum)
        );
        let last = header(u32::MAX - 1);
        assert_eq!(SegmentHeader::decode(&last.encode()), Ok(last));
    }

    /// A header byte for byte as the module's diagram draws it.
    #[test]
    fn the_header_has_the_documented_layout() {
        let fields = "544d4c4f47534547010000000300000007000000000000006400000000000000\
                      00001000000000002b02000000000000000000000000000000000000";
        let mut expected = crate::from_hex(fields);
        expected.extend_from_slice(&crc32c::crc32c(&expected).to_le_bytes());
        let header = SegmentHeader {
            generation: 3,
            index: 7,
            first_seq: Seq(100),
            segment_size: 1 << 20,
            created_ns: 555,
        };
        assert_eq!(header.encode().as_slice(), expected);
        assert_eq!(SegmentHeader::decode(&expected), Ok(header));
    }

    proptest! {
        #[test]
        fn header_round_trip(generation in 0..u32::MAX, index in any::<u64>(), first_seq in 1..=MAX_SEQ, size in any::<u64>(), created in any::<u64>()) {
            let h = SegmentHeader { generation, index, first_seq: Seq(first_seq), segment_size: size, created_ns: created };
            prop_assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn header_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = SegmentHeader::decode(&bytes);
        }
    }
}
