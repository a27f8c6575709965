//! The journal index: a checkpoint of what the journal's committed history
//! holds (its changes and points, in order) up to a commit mark, so that
//! opening a group reads only the history written after it instead of
//! every entry since the history's start. The codec is pure; the byte
//! layout is documented in the [store module](super).
//!
//! The index is a cache, never the truth: the state file and the journal
//! are. An index that is missing, damaged, of another version, or that
//! does not match the journal it claims to describe (another start, a
//! segment of another length, no commit mark where it says one is) is
//! ignored and the history is read from its start, as it always was. It
//! can be trusted where it matches because the committed history is
//! append-only: nothing before a committed position ever changes, and
//! folds only move the history's start forward (an index older than a
//! fold is still right about everything after the new start).

use super::journal::{Change, PointEntry, MAX_LABEL};
use super::overlay::Source;
use tidemark_changelog::{DiskId, Seq};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The index's file name in the group directory. Not `journal.*`: opening
/// a journal removes segment files outside its history by that prefix.
pub(crate) const INDEX_FILE: &str = "journal-index";
const MAGIC: [u8; 4] = *b"TMJI";
const VERSION: u8 = 1;
const HEADER_LEN: usize = 64;
const SEGMENT_LEN: usize = 12;
const CHANGE_LEN: usize = 37;
/// A point without its label.
const POINT_LEN: usize = 27;
const KIND_JOURNAL: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_ZERO_NO_HOLE: u8 = 3;

/// The index header exactly as it lies on disk (the diagram in the
/// [store module](super)), little-endian, without padding.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 4],
    version: u8,
    reserved: [u8; 3],
    start: U64,
    covered: U64,
    mark_at: U64,
    commit_seq: U64,
    commit_generation: U32,
    segment_count: U32,
    change_count: U64,
    point_count: U64,
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);

/// What the journal's committed history `start..covered` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// Where the history started when the index was written.
    pub(crate) start: u64,
    /// Position just past the commit mark the indexed history ends with.
    pub(crate) covered: u64,
    /// Position of that commit mark's header (in the segment before
    /// `covered`'s when the journal began a new segment after it).
    pub(crate) mark_at: u64,
    /// The commit mark's (sequence number, generation).
    pub(crate) last_commit: (Seq, u32),
    /// Each segment the history runs through, with its length as far as
    /// the history goes (every segment but `covered`'s is complete).
    pub(crate) segments: Vec<(u32, u64)>,
    /// Every change of the history, in journal order.
    pub(crate) changes: Vec<Change>,
    /// Every point of the history, in journal order.
    pub(crate) points: Vec<PointEntry>,
}

impl Checkpoint {
    /// The index's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let labels: usize = self.points.iter().map(|p| p.label.len()).sum();
        let mut out = Vec::with_capacity(
            HEADER_LEN
                + SEGMENT_LEN * self.segments.len()
                + CHANGE_LEN * self.changes.len()
                + POINT_LEN * self.points.len()
                + labels
                + 4,
        );
        let header = RawHeader {
            magic: MAGIC,
            version: VERSION,
            reserved: [0; 3],
            start: self.start.into(),
            covered: self.covered.into(),
            mark_at: self.mark_at.into(),
            commit_seq: self.last_commit.0.get().into(),
            commit_generation: self.last_commit.1.into(),
            segment_count: (self.segments.len() as u32).into(),
            change_count: (self.changes.len() as u64).into(),
            point_count: (self.points.len() as u64).into(),
        };
        out.extend_from_slice(header.as_bytes());
        for &(segment, len) in &self.segments {
            out.extend_from_slice(&segment.to_le_bytes());
            out.extend_from_slice(&len.to_le_bytes());
        }
        for c in &self.changes {
            let (kind, at) = match c.source {
                Source::Journal(at) => (KIND_JOURNAL, at),
                Source::Zero { no_hole: false } => (KIND_ZERO, 0),
                Source::Zero { no_hole: true } => (KIND_ZERO_NO_HOLE, 0),
            };
            out.extend_from_slice(&c.end.to_le_bytes());
            out.extend_from_slice(&c.disk.get().to_le_bytes());
            out.push(kind);
            out.extend_from_slice(&c.start.to_le_bytes());
            out.extend_from_slice(&c.stop.to_le_bytes());
            out.extend_from_slice(&at.to_le_bytes());
        }
        for p in &self.points {
            out.extend_from_slice(&p.pos.to_le_bytes());
            out.extend_from_slice(&p.seq.get().to_le_bytes());
            out.extend_from_slice(&p.timestamp_ns.to_le_bytes());
            out.push(u8::from(p.app_consistent));
            out.extend_from_slice(&(p.label.len() as u16).to_le_bytes());
            out.extend_from_slice(p.label.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes an index; `Err` says why it cannot be used (the caller
    /// then reads the history from its start). Nothing panics, and no
    /// count makes it allocate more than the bytes could hold.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Checkpoint, &'static str> {
        let Some((body, crc)) = bytes.split_last_chunk::<4>() else {
            return Err("shorter than its checksum");
        };
        let (header, rest) =
            RawHeader::ref_from_prefix(body).map_err(|_| "shorter than its header")?;
        if header.magic != MAGIC {
            return Err("no index magic");
        }
        if header.version != VERSION {
            return Err("unsupported index version");
        }
        if crc32c::crc32c(body) != u32::from_le_bytes(*crc) {
            return Err("checksum mismatch");
        }
        if header.reserved != [0; 3] {
            return Err("reserved bytes set");
        }
        let (start, covered, mark_at) = (
            header.start.get(),
            header.covered.get(),
            header.mark_at.get(),
        );
        if !(start < covered && mark_at >= start && mark_at < covered) {
            return Err("positions out of order");
        }
        let mut r = Reader(rest);
        let segment_count = r.count(header.segment_count.get().into(), SEGMENT_LEN)?;
        let mut segments = Vec::with_capacity(segment_count);
        for _ in 0..segment_count {
            segments.push((r.u32()?, r.u64()?));
        }
        let change_count = r.count(header.change_count.get(), CHANGE_LEN)?;
        let mut changes = Vec::with_capacity(change_count);
        let mut last_end = start;
        for _ in 0..change_count {
            let end = r.u64()?;
            let disk = r.u32()?;
            let kind = r.u8()?;
            let (c_start, stop, at) = (r.u64()?, r.u64()?, r.u64()?);
            let source = match (kind, at) {
                (KIND_JOURNAL, at) if at >= start && at < end => Source::Journal(at),
                (KIND_ZERO, 0) => Source::Zero { no_hole: false },
                (KIND_ZERO_NO_HOLE, 0) => Source::Zero { no_hole: true },
                _ => return Err("a change of unknown kind"),
            };
            if c_start >= stop || end <= last_end || end > covered {
                return Err("a change out of order");
            }
            last_end = end;
            changes.push(Change {
                end,
                disk: DiskId(disk),
                start: c_start,
                stop,
                source,
            });
        }
        let point_count = r.count(header.point_count.get(), POINT_LEN)?;
        let mut points = Vec::with_capacity(point_count);
        let mut last_pos = start;
        for _ in 0..point_count {
            let pos = r.u64()?;
            let seq = r.u64()?;
            let timestamp_ns = r.u64()?;
            let app_consistent = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err("a point flag that is neither 0 nor 1"),
            };
            let len = usize::from(r.u16()?);
            if len > MAX_LABEL {
                return Err("a label too long");
            }
            let label =
                std::str::from_utf8(r.take(len)?).map_err(|_| "a label that is not UTF-8")?;
            if pos <= last_pos || pos > covered {
                return Err("a point out of order");
            }
            last_pos = pos;
            points.push(PointEntry {
                pos,
                seq: Seq(seq),
                timestamp_ns,
                app_consistent,
                label: label.to_string(),
            });
        }
        if !r.0.is_empty() {
            return Err("bytes after the last point");
        }
        Ok(Checkpoint {
            start,
            covered,
            mark_at,
            last_commit: (Seq(header.commit_seq.get()), header.commit_generation.get()),
            segments,
            changes,
            points,
        })
    }
}

/// Reads little-endian fields off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.0.len() < n {
            return Err("cut short");
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, &'static str> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    /// `count` items of at least `min_len` bytes each, if the rest could
    /// hold them.
    fn count(&self, count: u64, min_len: usize) -> Result<usize, &'static str> {
        match usize::try_from(count) {
            Ok(n) if n.checked_mul(min_len).is_some_and(|b| b <= self.0.len()) => Ok(n),
            _ => Err("a count larger than the index"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            start: 100,
            covered: 5000,
            mark_at: 4960,
            last_commit: (Seq(42), 3),
            segments: vec![(0, 5000)],
            changes: vec![
                Change {
                    end: 200,
                    disk: DiskId(1),
                    start: 4096,
                    stop: 8192,
                    source: Source::Journal(140),
                },
                Change {
                    end: 300,
                    disk: DiskId(0),
                    start: 0,
                    stop: 1 << 30,
                    source: Source::Zero { no_hole: true },
                },
            ],
            points: vec![PointEntry {
                pos: 400,
                seq: Seq(41),
                timestamp_ns: 123,
                app_consistent: true,
                label: "before upgrade".into(),
            }],
        }
    }

    #[test]
    fn an_index_round_trips() {
        let cp = sample();
        assert_eq!(Checkpoint::decode(&cp.encode()), Ok(cp));
    }

    /// The fixed header byte for byte as the store module's diagram draws
    /// it.
    #[test]
    fn the_header_has_the_documented_layout() {
        let bytes = sample().encode();
        let expected: &[u8] = b"TMJI\x01\x00\x00\x00\
            \x64\x00\x00\x00\x00\x00\x00\x00\x88\x13\x00\x00\x00\x00\x00\x00\
            \x60\x13\x00\x00\x00\x00\x00\x00\x2a\x00\x00\x00\x00\x00\x00\x00\
            \x03\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\
            \x01\x00\x00\x00\x00\x00\x00\x00";
        assert_eq!(&bytes[..HEADER_LEN], expected);
        let len = HEADER_LEN + SEGMENT_LEN + 2 * CHANGE_LEN + POINT_LEN + 14 + 4;
        assert_eq!(bytes.len(), len);
    }

    #[test]
    fn damage_is_refused_with_a_reason() {
        let bytes = sample().encode();
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x10;
            assert!(Checkpoint::decode(&damaged).is_err(), "flipped byte {at}");
        }
        for len in 0..bytes.len() {
            assert!(Checkpoint::decode(&bytes[..len]).is_err(), "cut to {len}");
        }
    }

    /// Indexes whose checksum is right but whose fields are not (a bug,
    /// never a disk) are refused too.
    #[test]
    fn inconsistent_fields_are_refused() {
        let reseal = |cp: &Checkpoint| cp.encode();
        let mut cp = sample();
        cp.changes.swap(0, 1);
        assert_eq!(
            Checkpoint::decode(&reseal(&cp)),
            Err("a change out of order")
        );
        let mut cp = sample();
        cp.points[0].pos = 6000;
        assert_eq!(
            Checkpoint::decode(&reseal(&cp)),
            Err("a point out of order")
        );
        let mut cp = sample();
        cp.changes[0].source = Source::Journal(10);
        assert_eq!(
            Checkpoint::decode(&reseal(&cp)),
            Err("a change of unknown kind")
        );
        let mut cp = sample();
        cp.mark_at = 5000;
        assert_eq!(
            Checkpoint::decode(&reseal(&cp)),
            Err("positions out of order")
        );
        let mut bytes = sample().encode();
        // A change count of u64::MAX, resealed: no allocation follows it.
        bytes[48..56].copy_from_slice(&u64::MAX.to_le_bytes());
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Checkpoint::decode(&bytes),
            Err("a count larger than the index")
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Checkpoint::decode(&bytes);
            let mut sealed = b"TMJI\x01".to_vec();
            sealed.extend_from_slice(&bytes);
            let crc = crc32c::crc32c(&sealed);
            sealed.extend_from_slice(&crc.to_le_bytes());
            let _ = Checkpoint::decode(&sealed);
        }
    }
}
