//! The journal: in a consistent or resyncing group every change is
//! appended here, in log order, and the images hold the state as of the
//! journal's start (the oldest retained recovery point, or older). A disk
//! reads as of any position of the journal by laying the entries before it
//! over the image. The entry codec is pure; the byte layout is documented
//! in the [store module](super).
//!
//! The journal is a series of segment files `journal.SSSSSSSS` (hex). A
//! *position* names a byte of it: `segment << 40 | offset`. A segment is
//! only ever appended to; folding frees whole segments.

use super::index::{Checkpoint, INDEX_FILE};
use super::overlay::{Overlay, Source};
use std::collections::BTreeMap;
use std::io;
use tidemark_changelog::record::crc32c_combine;
use tidemark_changelog::replay::ReplayTarget;
use tidemark_changelog::{DiskId, Seq};
use tidemark_durable::{FsDir, LogDir, LogFile};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

const MAGIC: [u8; 4] = *b"TMJE";
const VERSION: u8 = 1;
/// Bytes of a journal entry header.
pub(crate) const HEADER_LEN: usize = 40;
/// The largest payload of one entry; longer data is split.
pub(crate) const MAX_PAYLOAD: usize = 64 << 20;
/// The longest label of a point entry.
pub(crate) const MAX_LABEL: usize = tidemark_changelog::record::MAX_LABEL;
const FLAG_NO_HOLE: u16 = 1 << 1;
const FLAG_APP_CONSISTENT: u32 = 1 << 0;
const CRC_AT: usize = std::mem::offset_of!(RawEntryHeader, crc);
/// Bits of a position that are the offset within its segment.
pub(crate) const OFFSET_BITS: u32 = 40;
const OFFSET_MASK: u64 = (1 << OFFSET_BITS) - 1;

/// A journal entry header exactly as it lies on disk (the diagram in the
/// [store module](super)), field for field, little-endian, without padding
/// and at any alignment.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawEntryHeader {
    magic: [u8; 4],
    version: u8,
    kind: u8,
    flags: U16,
    disk: U32,
    payload_len: U32,
    offset: U64,
    length: U64,
    reserved: [u8; 4],
    crc: U32,
}

const _: () = assert!(size_of::<RawEntryHeader>() == HEADER_LEN);

/// The position of `offset` in `segment`.
pub(crate) fn position(segment: u32, offset: u64) -> u64 {
    (u64::from(segment) << OFFSET_BITS) | offset
}

/// The segment of a position.
pub(crate) fn segment_of(pos: u64) -> u32 {
    (pos >> OFFSET_BITS) as u32
}

/// The offset within its segment of a position.
pub(crate) fn offset_of(pos: u64) -> u64 {
    pos & OFFSET_MASK
}

/// The file name of a segment.
pub(crate) fn segment_name(segment: u32) -> String {
    format!("journal.{segment:08x}")
}

/// One journal entry, without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// `len` bytes of payload to write at `offset` of `disk`.
    Data { disk: DiskId, offset: u64, len: u64 },
    /// `offset..offset+len` of `disk` reads as zeroes.
    Zero {
        disk: DiskId,
        offset: u64,
        len: u64,
        no_hole: bool,
    },
    /// Everything before this mark is the effect of the records up to `seq`.
    Commit { seq: Seq, generation: u32 },
    /// A recovery point: the barrier or marker `seq`; the payload is the
    /// marker's label (empty for a barrier).
    Point {
        seq: Seq,
        timestamp_ns: u64,
        app_consistent: bool,
    },
}

impl Entry {
    /// The header of this entry with `payload` (whose checksum it carries).
    pub(crate) fn encode_header(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        self.encode_header_with(payload.len(), crc32c::crc32c(payload))
    }

    /// [`encode_header`](Self::encode_header) for a payload of `len` bytes
    /// whose CRC32C is `payload_crc`: the entry's checksum, over its header
    /// bytes then the payload, is combined from it without reading the
    /// payload.
    pub(crate) fn encode_header_with(&self, len: usize, payload_crc: u32) -> [u8; HEADER_LEN] {
        let (kind, flags, disk, offset, length) = match *self {
            Entry::Data { disk, offset, len } => (1u8, 0u16, disk.get(), offset, len),
            Entry::Zero {
                disk,
                offset,
                len,
                no_hole,
            } => (
                2,
                if no_hole { FLAG_NO_HOLE } else { 0 },
                disk.get(),
                offset,
                len,
            ),
            Entry::Commit { seq, generation } => (3, 0, generation, seq.get(), 0),
            Entry::Point {
                seq,
                timestamp_ns,
                app_consistent,
            } => (
                4,
                0,
                if app_consistent {
                    FLAG_APP_CONSISTENT
                } else {
                    0
                },
                seq.get(),
                timestamp_ns,
            ),
        };
        let mut h = RawEntryHeader {
            magic: MAGIC,
            version: VERSION,
            kind,
            flags: flags.into(),
            disk: disk.into(),
            payload_len: (len as u32).into(),
            offset: offset.into(),
            length: length.into(),
            reserved: [0; 4],
            crc: U32::ZERO,
        };
        h.crc = crc32c_combine(crc32c::crc32c(&h.as_bytes()[..CRC_AT]), payload_crc, len).into();
        zerocopy::transmute!(h)
    }

    /// Decodes a header: the entry, its payload length and the checksum it
    /// claims. `Err` says what is wrong; nothing panics.
    pub(crate) fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(Entry, usize, u32), &'static str> {
        let h: &RawEntryHeader = zerocopy::transmute_ref!(h);
        if h.magic != MAGIC {
            return Err("no journal magic");
        }
        if h.version != VERSION {
            return Err("unsupported journal version");
        }
        let flags = h.flags.get();
        let disk = h.disk.get();
        let payload_len = h.payload_len.get() as usize;
        let offset = h.offset.get();
        let length = h.length.get();
        if h.reserved != [0; 4] {
            return Err("reserved bytes set");
        }
        if payload_len > MAX_PAYLOAD {
            return Err("payload too large");
        }
        if h.kind != 4 && offset.checked_add(length).is_none() {
            return Err("extent overflows");
        }
        let entry = match (h.kind, flags) {
            (1, 0) if payload_len as u64 == length && length > 0 => Entry::Data {
                disk: DiskId(disk),
                offset,
                len: length,
            },
            (2, 0 | FLAG_NO_HOLE) if payload_len == 0 && length > 0 => Entry::Zero {
                disk: DiskId(disk),
                offset,
                len: length,
                no_hole: flags == FLAG_NO_HOLE,
            },
            (3, 0) if payload_len == 0 && length == 0 => Entry::Commit {
                seq: Seq(offset),
                generation: disk,
            },
            (4, 0) if payload_len <= MAX_LABEL && disk & !FLAG_APP_CONSISTENT == 0 => {
                Entry::Point {
                    seq: Seq(offset),
                    timestamp_ns: length,
                    app_consistent: disk & FLAG_APP_CONSISTENT != 0,
                }
            }
            _ => return Err("inconsistent journal entry"),
        };
        Ok((entry, payload_len, h.crc.get()))
    }
}

/// A change in the journal, in journal order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Change {
    /// Position just past the entry: a point at or after it includes it.
    pub(crate) end: u64,
    pub(crate) disk: DiskId,
    pub(crate) start: u64,
    pub(crate) stop: u64,
    pub(crate) source: Source,
}

/// A recovery point in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PointEntry {
    /// Position just past the point entry: the changes before it are the
    /// point's state.
    pub(crate) pos: u64,
    pub(crate) seq: Seq,
    pub(crate) timestamp_ns: u64,
    pub(crate) app_consistent: bool,
    pub(crate) label: String,
}

/// The journal of a group: its segment files, the committed history as an
/// ordered list of changes and points, and the newest state's overlay.
/// Its files are those of `D`, the group directory on the storage seam.
#[derive(Debug)]
pub(crate) struct Journal<D: LogDir = FsDir> {
    dir: D,
    segments: BTreeMap<u32, D::File>,
    /// Where the next entry goes.
    pub(crate) end: u64,
    /// Where the history starts (everything before is in the images).
    pub(crate) start: u64,
    /// Every change from `start`, in order (committed or not).
    pub(crate) changes: Vec<Change>,
    /// Every point from `start`, in order.
    pub(crate) points: Vec<PointEntry>,
    /// Per disk, what the newest state reads from the journal.
    pub(crate) overlays: BTreeMap<DiskId, Overlay>,
    /// The last commit mark seen: (seq, generation).
    pub(crate) last_commit: Option<(Seq, u32)>,
    /// Where that commit mark's header is.
    mark_at: Option<u64>,
    /// How far the history was known without reading it at open: the
    /// index's end when one was used, else the history's start.
    pub(crate) indexed_to: u64,
}

/// Why the journal's committed history does not verify: its files were
/// damaged or changed behind the store's back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JournalDamage {
    /// A segment the history runs through is not there.
    #[error("segment {0} is missing")]
    Missing(String),
    /// A segment is shorter than the history committed in it.
    #[error("{segment} is {len} bytes, {committed} are committed")]
    Short {
        /// The segment's file name.
        segment: String,
        /// Its length.
        len: u64,
        /// The bytes of history committed in it.
        committed: u64,
    },
    /// An entry of a segment does not verify.
    #[error("{segment}: {entry}")]
    Entry {
        /// The segment's file name.
        segment: String,
        /// What is wrong.
        entry: EntryDamage,
    },
}

/// What is wrong with the history in one segment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum EntryDamage {
    /// The entry at this offset runs past the committed end.
    #[error("entry at {0} is cut short")]
    CutShort(u64),
    /// The entry's header does not decode.
    #[error("entry at {at}: {reason}")]
    Header {
        /// The entry's offset in the segment.
        at: u64,
        /// Why it does not decode.
        reason: &'static str,
    },
    /// The entry's checksum does not match its bytes.
    #[error("entry at {0} fails its checksum")]
    Checksum(u64),
    /// A point's label is not UTF-8.
    #[error("entry at {0}: a label that is not UTF-8")]
    Label(u64),
    /// The history ends in something other than a commit mark.
    #[error("the committed history does not end in a commit mark")]
    NoCommit,
}

/// Opens a segment for writing; `create` creates it (0600, empty) where it
/// is missing, an existing one is never truncated.
fn open_segment<D: LogDir>(dir: &D, segment: u32, create: bool) -> io::Result<D::File> {
    let name = segment_name(segment);
    match dir.open(&name, true) {
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => dir.create(&name),
        opened => opened,
    }
}

/// Reads all of `buf` at `offset`; a file that ends before is
/// `UnexpectedEof`.
pub(crate) fn read_exact_at<F: LogFile>(file: &F, buf: &mut [u8], offset: u64) -> io::Result<()> {
    if file.read_full_at(buf, offset)? < buf.len() {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

impl<D: LogDir> Journal<D> {
    /// Opens the journal of `dir` whose committed history is
    /// `start..end`: reads and verifies every entry of it, cuts off
    /// anything after `end` (an uncommitted tail) and removes segments
    /// wholly before `start` or after `end`. `Ok(Err(damage))` if the
    /// committed history does not verify.
    /// `read_only` changes no file (the group may be open for writing
    /// elsewhere): the tail is ignored instead of cut off.
    pub(crate) fn open(
        dir: D,
        start: u64,
        end: u64,
        read_only: bool,
    ) -> io::Result<Result<Journal<D>, JournalDamage>> {
        let first = segment_of(start);
        let last = segment_of(end);
        // Leftovers: segments a fold had freed, or a roll had begun.
        let leftovers = if read_only { Vec::new() } else { dir.list()? };
        for name in leftovers {
            let Some(seg) = name
                .strip_prefix("journal.")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            if seg < first || seg > last {
                dir.remove(&name)?;
            }
        }
        let mut j = Journal {
            dir,
            segments: BTreeMap::new(),
            end: start,
            start,
            changes: Vec::new(),
            points: Vec::new(),
            overlays: BTreeMap::new(),
            last_commit: None,
            mark_at: None,
            indexed_to: start,
        };
        let index = match super::state::read_file(&j.dir, INDEX_FILE) {
            Ok(Some(bytes)) => Checkpoint::decode(&bytes)
                .inspect_err(|reason| {
                    tracing::warn!(dir = %j.dir.describe(), %reason, "the journal index is unusable: reading the whole history");
                })
                .ok(),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(dir = %j.dir.describe(), error = %e, "reading the journal index: reading the whole history");
                None
            }
        };
        let resume = match index {
            Some(index) => j.load_index(index, end, read_only)?,
            None => None,
        };
        let scan_from = resume.unwrap_or(start);
        for seg in segment_of(scan_from)..=last {
            let from = if seg == segment_of(scan_from) {
                offset_of(scan_from)
            } else {
                0
            };
            let opened = if read_only {
                j.dir.open(&segment_name(seg), false)
            } else {
                open_segment(&j.dir, seg, seg == last)
            };
            let file = match opened {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if read_only && seg == last && offset_of(end) == 0 {
                        continue;
                    }
                    return Ok(Err(JournalDamage::Missing(segment_name(seg))));
                }
                Err(e) => return Err(e),
            };
            let len = file.size()?;
            let to = if seg == last { offset_of(end) } else { len };
            if len < to {
                return Ok(Err(JournalDamage::Short {
                    segment: segment_name(seg),
                    len,
                    committed: to,
                }));
            }
            if seg == last && len > to && !read_only {
                file.set_len(to)?;
                file.sync_data()?;
            }
            j.segments.insert(seg, file);
            if let Err(entry) = j.scan(seg, from, to)? {
                return Ok(Err(JournalDamage::Entry {
                    segment: segment_name(seg),
                    entry,
                }));
            }
        }
        j.end = end;
        Ok(Ok(j))
    }

    /// Takes the history `start..index.covered` from `index` if it matches
    /// this journal (see [`super::index`]): the same history start or an
    /// older one, the segments it covers whole and of the lengths it
    /// names, and its commit mark where it says. Returns the position to
    /// read on from, or `None` (nothing taken) if the index does not
    /// match.
    fn load_index(
        &mut self,
        index: Checkpoint,
        end: u64,
        read_only: bool,
    ) -> io::Result<Option<u64>> {
        let (start, covered) = (self.start, index.covered);
        let unusable = |reason: &str| {
            tracing::warn!(dir = %self.dir.describe(), reason, "the journal index does not match the journal: reading the whole history");
            Ok(None)
        };
        if !(index.start <= start && start <= covered && covered <= end) {
            // Written before a fold that went past it, or for another
            // history: not a fault.
            return Ok(None);
        }
        let mut opened = BTreeMap::new();
        for seg in segment_of(start)..segment_of(covered) {
            let Some(&(_, len)) = index.segments.iter().find(|(s, _)| *s == seg) else {
                return unusable("a segment of the history is not in the index");
            };
            let file = match self.dir.open(&segment_name(seg), !read_only) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return unusable("a segment it covers is missing")
                }
                Err(e) => return Err(e),
            };
            if file.size()? != len {
                return unusable("a segment it covers has another length");
            }
            opened.insert(seg, file);
        }
        let mark = self
            .dir
            .open(&segment_name(segment_of(index.mark_at)), false);
        let mut h = [0u8; HEADER_LEN];
        let read = match mark {
            Ok(f) => read_exact_at(&f, &mut h, offset_of(index.mark_at)),
            Err(e) => Err(e),
        };
        let (seq, generation) = index.last_commit;
        let is_mark = read.is_ok()
            && matches!(
                Entry::decode_header(&h),
                Ok((Entry::Commit { seq: s, generation: g }, 0, crc))
                    if s == seq && g == generation && crc == crc32c::crc32c(&h[..CRC_AT])
            );
        if !is_mark {
            return unusable("no commit mark where it names one");
        }
        self.segments = opened;
        self.changes = index.changes;
        self.changes.retain(|c| c.end > start);
        self.points = index.points;
        self.points.retain(|p| p.pos > start);
        self.last_commit = Some(index.last_commit);
        self.mark_at = Some(index.mark_at);
        self.indexed_to = covered;
        self.rebuild_overlays();
        Ok(Some(covered))
    }

    /// Writes the index of the history as far as it is committed: the
    /// journal must end just after its last commit mark (as it does after
    /// [`Journal::commit`]). Replaced atomically and durably; returns its
    /// size. Nothing depends on it: a failure leaves the old index, which
    /// opening ignores or uses as far as it goes.
    pub(crate) fn write_index(&mut self) -> io::Result<u64> {
        let (Some(mark_at), Some(last_commit)) = (self.mark_at, self.last_commit) else {
            return Ok(0);
        };
        if self.end <= self.start || mark_at < self.start {
            return Ok(0);
        }
        let mut segments = Vec::new();
        for (&seg, file) in self
            .segments
            .range(segment_of(self.start)..=segment_of(self.end))
        {
            let len = if seg == segment_of(self.end) {
                offset_of(self.end)
            } else {
                file.size()?
            };
            segments.push((seg, len));
        }
        let index = Checkpoint {
            start: self.start,
            covered: self.end,
            mark_at,
            last_commit,
            segments,
            changes: self.changes.clone(),
            points: self.points.clone(),
        };
        let bytes = index.encode();
        super::state::write_atomic(&self.dir, INDEX_FILE, &bytes)?;
        self.indexed_to = self.end;
        Ok(bytes.len() as u64)
    }

    /// Reads and verifies the entries of `segment` from `from` to `to`.
    fn scan(&mut self, segment: u32, from: u64, to: u64) -> io::Result<Result<(), EntryDamage>> {
        let file = self.segments[&segment].try_clone()?;
        let mut at = from;
        let mut buf = vec![0u8; 1 << 20];
        let mut ends_in_commit = from == to;
        while at < to {
            if to - at < HEADER_LEN as u64 {
                return Ok(Err(EntryDamage::CutShort(at)));
            }
            let mut h = [0u8; HEADER_LEN];
            read_exact_at(&file, &mut h, at)?;
            let (entry, payload_len, crc) = match Entry::decode_header(&h) {
                Ok(v) => v,
                Err(reason) => return Ok(Err(EntryDamage::Header { at, reason })),
            };
            let payload_at = at + HEADER_LEN as u64;
            if to - payload_at < payload_len as u64 {
                return Ok(Err(EntryDamage::CutShort(at)));
            }
            let mut computed = crc32c::crc32c(&h[..CRC_AT]);
            let mut label = Vec::new();
            let mut done = 0usize;
            while done < payload_len {
                let n = (payload_len - done).min(buf.len());
                read_exact_at(&file, &mut buf[..n], payload_at + done as u64)?;
                computed = crc32c::crc32c_append(computed, &buf[..n]);
                if matches!(entry, Entry::Point { .. }) {
                    label.extend_from_slice(&buf[..n]);
                }
                done += n;
            }
            if computed != crc {
                return Ok(Err(EntryDamage::Checksum(at)));
            }
            let end = payload_at + payload_len as u64;
            let source_at = position(segment, payload_at);
            let end_pos = position(segment, end);
            match entry {
                Entry::Data { disk, offset, len } => {
                    self.record(end_pos, disk, offset, len, Source::Journal(source_at))
                }
                Entry::Zero {
                    disk,
                    offset,
                    len,
                    no_hole,
                } => self.record(end_pos, disk, offset, len, Source::Zero { no_hole }),
                Entry::Commit { seq, generation } => {
                    self.last_commit = Some((seq, generation));
                    self.mark_at = Some(position(segment, at));
                }
                Entry::Point {
                    seq,
                    timestamp_ns,
                    app_consistent,
                } => {
                    let Ok(label) = String::from_utf8(label) else {
                        return Ok(Err(EntryDamage::Label(at)));
                    };
                    self.points.push(PointEntry {
                        pos: end_pos,
                        seq,
                        timestamp_ns,
                        app_consistent,
                        label,
                    });
                }
            }
            ends_in_commit = matches!(entry, Entry::Commit { .. });
            at = end;
        }
        if !ends_in_commit {
            return Ok(Err(EntryDamage::NoCommit));
        }
        Ok(Ok(()))
    }

    fn record(&mut self, end: u64, disk: DiskId, start: u64, len: u64, source: Source) {
        self.overlays
            .entry(disk)
            .or_default()
            .insert(start, start + len, source);
        self.changes.push(Change {
            end,
            disk,
            start,
            stop: start + len,
            source,
        });
    }

    fn append(&mut self, entry: &Entry, payload: &[u8]) -> io::Result<u64> {
        self.append_with(entry, payload, crc32c::crc32c(payload))
    }

    /// [`append`](Self::append) with the payload's CRC32C known.
    fn append_with(&mut self, entry: &Entry, payload: &[u8], payload_crc: u32) -> io::Result<u64> {
        let segment = segment_of(self.end);
        let offset = offset_of(self.end);
        let file = match self.segments.get(&segment) {
            Some(f) => f,
            None => {
                let f = open_segment(&self.dir, segment, true)?;
                self.segments.entry(segment).or_insert(f)
            }
        };
        let h = entry.encode_header_with(payload.len(), payload_crc);
        file.write_all_at(&[&h, payload], offset)?;
        let payload_at = offset + HEADER_LEN as u64;
        self.end = position(segment, payload_at + payload.len() as u64);
        Ok(position(segment, payload_at))
    }

    /// Appends `data` for `offset` of `disk`.
    pub(crate) fn write(&mut self, disk: DiskId, offset: u64, data: &[u8]) -> io::Result<()> {
        self.write_with(disk, offset, data, None)
    }

    /// [`write`](Self::write) with the CRC32C of `data` when it is known
    /// (derived from a verified record's checksum): the entry is written
    /// straight from `data` and checksummed without reading it.
    pub(crate) fn write_with(
        &mut self,
        disk: DiskId,
        offset: u64,
        data: &[u8],
        crc: Option<u32>,
    ) -> io::Result<()> {
        let mut at = offset;
        for piece in data.chunks(MAX_PAYLOAD) {
            let len = piece.len() as u64;
            let entry = Entry::Data {
                disk,
                offset: at,
                len,
            };
            // The known checksum is of the whole of `data`: one entry.
            let payload_at = match crc {
                Some(crc) if piece.len() == data.len() => self.append_with(&entry, piece, crc)?,
                _ => self.append(&entry, piece)?,
            };
            self.record(self.end, disk, at, len, Source::Journal(payload_at));
            at += len;
        }
        Ok(())
    }

    /// Appends that `offset..offset+len` of `disk` reads as zeroes.
    pub(crate) fn zero(
        &mut self,
        disk: DiskId,
        offset: u64,
        len: u64,
        no_hole: bool,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let entry = Entry::Zero {
            disk,
            offset,
            len,
            no_hole,
        };
        self.append(&entry, &[])?;
        self.record(self.end, disk, offset, len, Source::Zero { no_hole });
        Ok(())
    }

    /// Appends a recovery point.
    pub(crate) fn point(
        &mut self,
        seq: Seq,
        timestamp_ns: u64,
        app_consistent: bool,
        label: &str,
    ) -> io::Result<()> {
        let label = &label[..label.len().min(MAX_LABEL)];
        let entry = Entry::Point {
            seq,
            timestamp_ns,
            app_consistent,
        };
        self.append(&entry, label.as_bytes())?;
        self.points.push(PointEntry {
            pos: self.end,
            seq,
            timestamp_ns,
            app_consistent,
            label: label.to_string(),
        });
        Ok(())
    }

    /// Appends a commit mark and makes the journal durable; then, if the
    /// current segment has reached `segment_size`, begins the next one.
    pub(crate) fn commit(
        &mut self,
        seq: Seq,
        generation: u32,
        segment_size: u64,
    ) -> io::Result<()> {
        let mark_at = self.end;
        self.append(&Entry::Commit { seq, generation }, &[])?;
        self.last_commit = Some((seq, generation));
        self.mark_at = Some(mark_at);
        let segment = segment_of(self.end);
        if let Some(f) = self.segments.get(&segment) {
            f.sync_data()?;
        }
        if offset_of(self.end) >= segment_size {
            let next = segment + 1;
            let f = open_segment(&self.dir, next, true)?;
            self.dir.sync_dir()?;
            self.segments.insert(next, f);
            self.end = position(next, 0);
        }
        Ok(())
    }

    /// Reads journal bytes at `pos` (a payload position).
    pub(crate) fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let file = self
            .segments
            .get(&segment_of(pos))
            .ok_or(io::ErrorKind::NotFound)?;
        read_exact_at(file, buf, offset_of(pos))
    }

    /// Copies `len` journal bytes at `pos` (a payload position) to
    /// `to_offset` of `to`, within the kernel where it can (see
    /// [`LogFile::copy_to`]): what a fold writes into the images.
    pub(crate) fn copy_to(
        &self,
        pos: u64,
        to: &D::File,
        to_offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let file = self
            .segments
            .get(&segment_of(pos))
            .ok_or(io::ErrorKind::NotFound)?;
        file.copy_to(offset_of(pos), to, to_offset, len)
    }

    /// Per disk, the overlay of the changes before `pos`.
    pub(crate) fn overlays_before(&self, pos: u64) -> BTreeMap<DiskId, Overlay> {
        // The newest point, typically: every change is before it, and the
        // newest state's overlay is already built.
        if self.changes.last().is_none_or(|c| c.end <= pos) {
            return self.overlays.clone();
        }
        let mut out: BTreeMap<DiskId, Overlay> = BTreeMap::new();
        for c in self.changes.iter().take_while(|c| c.end <= pos) {
            out.entry(c.disk)
                .or_default()
                .insert(c.start, c.stop, c.source);
        }
        out
    }

    /// Forgets the history before `pos` (already in the images): its
    /// changes and points, and the segments wholly before it.
    /// `delete` removes the segments' files too.
    pub(crate) fn drop_before(&mut self, pos: u64, delete: bool) -> io::Result<()> {
        self.changes.retain(|c| c.end > pos);
        self.points.retain(|p| p.pos > pos);
        self.start = pos;
        self.rebuild_overlays();
        if !delete {
            return Ok(());
        }
        let keep_from = segment_of(pos);
        for seg in self.segments.keys().copied().collect::<Vec<_>>() {
            if seg < keep_from {
                self.segments.remove(&seg);
                self.dir.remove(&segment_name(seg))?;
            }
        }
        Ok(())
    }

    /// The disks the history after `pos` changes (a fold to `pos` keeps
    /// their images needed).
    pub(crate) fn disks_after(&self, pos: u64) -> std::collections::BTreeSet<DiskId> {
        self.changes
            .iter()
            .filter(|c| c.end > pos)
            .map(|c| c.disk)
            .collect()
    }

    /// Forgets the points before `pos` but keeps every change: a fold to
    /// `pos` is under way, so those points are gone, while the images may
    /// hold only part of the fold's changes. Reads (all this is for: a
    /// read-only group) then take the changes from the journal.
    pub(crate) fn forget_points_before(&mut self, pos: u64) {
        self.points.retain(|p| p.pos > pos);
    }

    fn rebuild_overlays(&mut self) {
        self.overlays.clear();
        for c in &self.changes {
            self.overlays
                .entry(c.disk)
                .or_default()
                .insert(c.start, c.stop, c.source);
        }
    }

    /// Bytes the history's segments take (their lengths).
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes_since(self.start)
    }

    /// Bytes of the history from position `from` (at or after its start)
    /// to its end.
    pub(crate) fn bytes_since(&self, from: u64) -> u64 {
        let mut total = 0;
        for (seg, _) in self.segments.iter() {
            let len = if *seg == segment_of(self.end) {
                offset_of(self.end)
            } else {
                self.segments[seg].size().unwrap_or(0)
            };
            if *seg < segment_of(from) {
                continue;
            }
            let skip = if *seg == segment_of(from) {
                offset_of(from)
            } else {
                0
            };
            total += len.saturating_sub(skip);
        }
        total
    }
}

/// The journal as `replay::apply` drives it, for one disk.
pub(crate) struct Journaled<'a, D: LogDir = FsDir> {
    pub(crate) journal: &'a mut Journal<D>,
    pub(crate) disk: DiskId,
    pub(crate) no_hole: bool,
    /// The CRC32C of the record's payload, known from its verified
    /// checksum: what its write's entry is checksummed with.
    pub(crate) payload_crc: Option<u32>,
}

impl<D: LogDir> ReplayTarget for Journaled<'_, D> {
    /// The record's payload (a write record writes it whole, once).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let crc = self.payload_crc.take();
        self.journal.write_with(self.disk, offset, data, crc)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.journal.zero(self.disk, offset, len, self.no_hole)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the journal holds: its changes and points, and the payload of
    /// every journaled write.
    fn contents<D: LogDir>(j: &Journal<D>) -> (Vec<Change>, Vec<PointEntry>, Vec<Vec<u8>>) {
        let payloads = j
            .changes
            .iter()
            .filter_map(|c| match c.source {
                Source::Journal(at) => {
                    let mut buf = vec![0u8; (c.stop - c.start) as usize];
                    j.read_at(&mut buf, at).unwrap();
                    Some(buf)
                }
                _ => None,
            })
            .collect();
        (j.changes.clone(), j.points.clone(), payloads)
    }

    /// The journal on the simulated directory, committed as the store
    /// commits it (journal commit, then the state file naming the new end,
    /// replaced durably in the same directory), with power cut at every
    /// sync in turn: reopened at the end the surviving state file names,
    /// the journal holds exactly what was committed up to it, and that end
    /// is the last one whose state write returned.
    #[test]
    fn a_power_cut_at_any_sync_leaves_exactly_the_committed_history() {
        use tidemark_durable::{replace, Durability, SimDir};
        // Small segments, so commits roll to new segment files.
        const SEGMENT: u64 = 300;
        fn run(dir: &SimDir, acked: &mut Vec<u64>) -> io::Result<()> {
            let mut j = Journal::open(dir.clone(), 0, 0, false)?.expect("an empty journal");
            for batch in 0..6u64 {
                j.write(DiskId(0), batch * 512, &[batch as u8 + 1; 100])?;
                j.zero(DiskId(1), batch * 4096, 4096, batch % 2 == 0)?;
                j.point(Seq(batch + 1), 1000 + batch, batch == 3, "p")?;
                j.commit(Seq(batch + 1), 1, SEGMENT)?;
                replace(
                    dir,
                    "state.tmp",
                    "state",
                    &j.end.to_le_bytes(),
                    Durability::Durable,
                )
                .map_err(io::Error::from)?;
                acked.push(j.end);
            }
            Ok(())
        }
        let probe = SimDir::new();
        let mut ends = Vec::new();
        run(&probe, &mut ends).unwrap();
        let syncs = probe.syncs();
        assert!(
            syncs > 12,
            "{syncs} syncs: every commit and state write syncs"
        );
        for cut in 1..=syncs {
            let dir = SimDir::new();
            dir.cut_power_at_sync(cut);
            let mut acked = Vec::new();
            assert!(run(&dir, &mut acked).is_err(), "cut at sync {cut}");
            let survived = dir.after_power_cut();
            let end = survived.get("state").map_or(0, |b| {
                u64::from_le_bytes(b.as_slice().try_into().expect("a whole state file"))
            });
            assert_eq!(end, acked.last().copied().unwrap_or(0), "cut at sync {cut}");
            let reopened = Journal::open(SimDir::from_files(survived), 0, end, false)
                .unwrap()
                .unwrap_or_else(|reason| panic!("cut at sync {cut}: {reason}"));
            // The same history, committed without a cut, to the same end.
            let reference = Journal::open(SimDir::from_files(probe.files()), 0, end, true)
                .unwrap()
                .unwrap();
            assert_eq!(
                contents(&reopened),
                contents(&reference),
                "cut at sync {cut}"
            );
            assert_eq!(reopened.end, end);
        }
    }

    /// A journal with history in three segments, committed after every
    /// batch; returns the committed ends.
    fn three_segments(
        dir: &tidemark_durable::SimDir,
    ) -> (Journal<tidemark_durable::SimDir>, Vec<u64>) {
        let mut j = Journal::open(dir.clone(), 0, 0, false).unwrap().unwrap();
        let mut ends = Vec::new();
        for batch in 0..9u64 {
            j.write(DiskId(0), batch * 512, &[batch as u8 + 1; 100])
                .unwrap();
            j.zero(DiskId(1), batch * 4096, 4096, batch % 2 == 0)
                .unwrap();
            j.point(Seq(batch + 1), 1000 + batch, batch == 3, "p")
                .unwrap();
            j.commit(Seq(batch + 1), 1, 300).unwrap();
            ends.push(j.end);
        }
        (j, ends)
    }

    /// An open that finds an index matching the journal takes the history
    /// up to it from the index and reads only what follows (`indexed_to`),
    /// and holds exactly what an open that reads everything holds: with
    /// history after the index, from a later start (a fold), read-only or
    /// not. An index a fold went past, or that does not match the journal,
    /// is ignored and the whole history read.
    #[test]
    fn an_open_with_the_index_reads_only_the_history_after_it() {
        use tidemark_durable::SimDir;
        let dir = SimDir::new();
        let (j, ends) = three_segments(&dir);
        drop(j);
        assert!(segment_of(ends[3]) > 0 && segment_of(ends[8]) > segment_of(ends[3]));
        // The index as the writer wrote it at the fourth commit.
        let mut early = Journal::open(
            SimDir::from_files(files_at_end(&dir, ends[3])),
            0,
            ends[3],
            false,
        )
        .unwrap()
        .unwrap();
        assert!(early.write_index().unwrap() > 0);
        let index = early.dir.files()[INDEX_FILE].clone();
        let without = dir.files();
        let mut with = without.clone();
        with.insert(INDEX_FILE.into(), index.clone());
        let end = *ends.last().unwrap();
        for (start, read_only) in [(0, true), (0, false), (ends[1], true), (ends[3], false)] {
            let used = Journal::open(SimDir::from_files(with.clone()), start, end, read_only)
                .unwrap()
                .unwrap();
            assert_eq!(used.indexed_to, ends[3], "start {start}");
            let reference = Journal::open(SimDir::from_files(without.clone()), start, end, true)
                .unwrap()
                .unwrap();
            assert_eq!(reference.indexed_to, start);
            assert_eq!(contents(&used), contents(&reference), "start {start}");
            assert_eq!(used.overlays, reference.overlays, "start {start}");
            assert_eq!(used.last_commit, reference.last_commit);
        }
        // A fold past the index: not used.
        let past = Journal::open(SimDir::from_files(with.clone()), ends[4], end, true)
            .unwrap()
            .unwrap();
        assert_eq!(past.indexed_to, ends[4]);
        // A covered segment of another length, a commit mark that is not
        // there, a damaged index: not used, the history is read.
        let mut longer = with.clone();
        longer.get_mut(&segment_name(0)).unwrap().push(0);
        let mut no_mark = with.clone();
        let at = offset_of(Checkpoint::decode(&index).unwrap().mark_at) as usize;
        no_mark
            .get_mut(&segment_name(segment_of(
                Checkpoint::decode(&index).unwrap().mark_at,
            )))
            .unwrap()[at + 16] ^= 1;
        let mut damaged = with.clone();
        damaged.get_mut(INDEX_FILE).unwrap()[70] ^= 1;
        let j = Journal::open(SimDir::from_files(damaged), 0, end, true)
            .unwrap()
            .unwrap();
        assert_eq!(j.indexed_to, 0);
        assert_eq!(
            contents(&j),
            contents(
                &Journal::open(SimDir::from_files(without), 0, end, true)
                    .unwrap()
                    .unwrap()
            )
        );
        // The segment's extra byte and the mark's bytes are history too:
        // reading it all finds the damage, which the index would have hidden.
        for files in [longer, no_mark] {
            assert!(Journal::open(SimDir::from_files(files), 0, end, true)
                .unwrap()
                .is_err());
        }
    }

    /// The files of `dir`'s journal as they were when the history ended at
    /// `end`: later segments gone, the last one cut there.
    fn files_at_end(dir: &tidemark_durable::SimDir, end: u64) -> BTreeMap<String, Vec<u8>> {
        let mut files = dir.files();
        files.retain(|name, _| {
            name.strip_prefix("journal.")
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .is_none_or(|seg| seg <= segment_of(end))
        });
        if let Some(last) = files.get_mut(&segment_name(segment_of(end))) {
            last.truncate(offset_of(end) as usize);
        }
        files
    }

    /// Damage to the committed history is named by what it is, with the
    /// segment and the entry's offset, and reads as it always did.
    #[test]
    fn damage_to_the_committed_history_is_typed_and_named() {
        use tidemark_durable::SimDir;
        let dir = SimDir::new();
        let mut j = Journal::open(dir.clone(), 0, 0, false).unwrap().unwrap();
        j.write(DiskId(0), 0, &[7u8; 100]).unwrap();
        j.commit(Seq(1), 1, 1 << 20).unwrap();
        let end = j.end;
        drop(j);
        let damaged = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut files = dir.files();
            edit(files.get_mut(&segment_name(0)).unwrap());
            Journal::open(SimDir::from_files(files), 0, end, true)
                .unwrap()
                .err()
                .unwrap()
        };
        let flipped = damaged(&|seg| seg[HEADER_LEN + 10] ^= 1);
        assert_eq!(
            flipped,
            JournalDamage::Entry {
                segment: "journal.00000000".into(),
                entry: EntryDamage::Checksum(0)
            }
        );
        assert_eq!(
            flipped.to_string(),
            "journal.00000000: entry at 0 fails its checksum"
        );
        let short = damaged(&|seg| seg.truncate(HEADER_LEN));
        assert_eq!(
            short.to_string(),
            format!("journal.00000000 is {HEADER_LEN} bytes, {end} are committed")
        );
        let no_magic = damaged(&|seg| seg[0] ^= 0xff);
        assert_eq!(
            no_magic.to_string(),
            "journal.00000000: entry at 0: no journal magic"
        );
        let mut files = dir.files();
        files.remove(&segment_name(0));
        let missing = Journal::open(SimDir::from_files(files), 0, end, true)
            .unwrap()
            .err()
            .unwrap();
        assert_eq!(missing, JournalDamage::Missing("journal.00000000".into()));
    }

    #[test]
    fn headers_round_trip() {
        let cases = [
            (
                Entry::Data {
                    disk: DiskId(3),
                    offset: 4096,
                    len: 5,
                },
                b"hello".as_slice(),
            ),
            (
                Entry::Zero {
                    disk: DiskId(1),
                    offset: 0,
                    len: 1 << 30,
                    no_hole: true,
                },
                b"".as_slice(),
            ),
            (
                Entry::Commit {
                    seq: Seq(99),
                    generation: 2,
                },
                b"".as_slice(),
            ),
            (
                Entry::Point {
                    seq: Seq(7),
                    timestamp_ns: u64::MAX,
                    app_consistent: true,
                },
                b"before upgrade".as_slice(),
            ),
        ];
        for (e, p) in cases {
            let h = e.encode_header(p);
            let (d, len, crc) = Entry::decode_header(&h).unwrap();
            assert_eq!((d, len), (e, p.len()));
            assert_eq!(crc, crc32c::crc32c_append(crc32c::crc32c(&h[..CRC_AT]), p));
        }
    }

    /// Entry headers byte for byte as the store module's diagram draws
    /// them: journals written by earlier releases stay readable, and this
    /// release writes what they read.
    #[test]
    fn headers_have_the_documented_layout() {
        let cases = [
            (
                Entry::Zero {
                    disk: DiskId(3),
                    offset: 4096,
                    len: 8192,
                    no_hole: true,
                },
                b"".as_slice(),
                b"\x54\x4d\x4a\x45\x01\x02\x02\x00\x03\x00\x00\x00\x00\x00\x00\x00\
                 \x00\x10\x00\x00\x00\x00\x00\x00\x00\x20\x00\x00\x00\x00\x00\x00\
                 \x00\x00\x00\x00"
                    .as_slice(),
            ),
            (
                Entry::Point {
                    seq: Seq(7),
                    timestamp_ns: 123_456_789,
                    app_consistent: true,
                },
                b"hello".as_slice(),
                b"\x54\x4d\x4a\x45\x01\x04\x00\x00\x01\x00\x00\x00\x05\x00\x00\x00\
                 \x07\x00\x00\x00\x00\x00\x00\x00\x15\xcd\x5b\x07\x00\x00\x00\x00\
                 \x00\x00\x00\x00"
                    .as_slice(),
            ),
        ];
        for (entry, payload, fields) in cases {
            let mut expected = fields.to_vec();
            let crc = crc32c::crc32c_append(crc32c::crc32c(&expected), payload);
            expected.extend_from_slice(&crc.to_le_bytes());
            assert_eq!(
                entry.encode_header(payload).as_slice(),
                expected,
                "{entry:?}"
            );
            let header: [u8; HEADER_LEN] = expected.try_into().unwrap();
            assert_eq!(
                Entry::decode_header(&header),
                Ok((entry, payload.len(), crc))
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_headers_never_panic(bytes in proptest::array::uniform32(any::<u8>()), tail in proptest::array::uniform8(any::<u8>()), kind in 0u8..5) {
            let mut h = [0u8; HEADER_LEN];
            h[..32].copy_from_slice(&bytes);
            h[32..].copy_from_slice(&tail);
            let _ = Entry::decode_header(&h);
            h[0..4].copy_from_slice(&MAGIC);
            h[4] = VERSION;
            h[5] = kind;
            let _ = Entry::decode_header(&h);
        }
    }
}
