//! The redo journal: while the group resyncs, every change is appended here
//! instead of being written to the images. The entry codec is pure; the
//! byte layout is documented in the [store module](super).

use super::overlay::{Overlay, Source};
use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use tidemark_changelog::replay::ReplayTarget;

const MAGIC: [u8; 4] = *b"TMJE";
const VERSION: u8 = 1;
/// Bytes of a journal entry header.
pub(crate) const HEADER_LEN: usize = 40;
/// The largest payload of one entry; longer data is split.
pub(crate) const MAX_PAYLOAD: usize = 64 << 20;
const FLAG_NO_HOLE: u16 = 1 << 1;
const CRC_AT: usize = 36;

/// One journal entry, without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    /// `len` bytes of payload to write at `offset` of `disk`.
    Data { disk: u32, offset: u64, len: u64 },
    /// `offset..offset+len` of `disk` reads as zeroes.
    Zero {
        disk: u32,
        offset: u64,
        len: u64,
        no_hole: bool,
    },
    /// Everything before this mark was committed at position `seq` of
    /// `generation`.
    Commit { seq: u64, generation: u32 },
}

impl Entry {
    /// The header for this entry followed by `payload`.
    pub(crate) fn encode_header(&self, payload: &[u8]) -> [u8; HEADER_LEN] {
        let (kind, flags, disk, offset, length) = match *self {
            Entry::Data { disk, offset, len } => (1u8, 0u16, disk, offset, len),
            Entry::Zero {
                disk,
                offset,
                len,
                no_hole,
            } => (2, if no_hole { FLAG_NO_HOLE } else { 0 }, disk, offset, len),
            Entry::Commit { seq, generation } => (3, 0, generation, seq, 0),
        };
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = kind;
        h[6..8].copy_from_slice(&flags.to_le_bytes());
        h[8..12].copy_from_slice(&disk.to_le_bytes());
        h[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        h[16..24].copy_from_slice(&offset.to_le_bytes());
        h[24..32].copy_from_slice(&length.to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h[..CRC_AT]), payload);
        h[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decodes a header: the entry, its payload length and its stored CRC.
    /// The CRC is checked by the caller, over the header and the payload.
    pub(crate) fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(Entry, usize, u32), &'static str> {
        if h[0..4] != MAGIC {
            return Err("no journal magic");
        }
        if h[4] != VERSION {
            return Err("unsupported journal version");
        }
        let u32_at = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let u64_at = |at: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&h[at..at + 8]);
            u64::from_le_bytes(v)
        };
        let flags = u16::from_le_bytes([h[6], h[7]]);
        let disk = u32_at(8);
        let payload_len = u32_at(12) as usize;
        let offset = u64_at(16);
        let length = u64_at(24);
        if u32_at(32) != 0 {
            return Err("reserved bytes set");
        }
        if payload_len > MAX_PAYLOAD {
            return Err("payload too large");
        }
        if offset.checked_add(length).is_none() {
            return Err("extent overflows");
        }
        let entry = match (h[5], flags) {
            (1, 0) if payload_len as u64 == length && length > 0 => Entry::Data {
                disk,
                offset,
                len: length,
            },
            (2, 0 | FLAG_NO_HOLE) if payload_len == 0 && length > 0 => Entry::Zero {
                disk,
                offset,
                len: length,
                no_hole: flags == FLAG_NO_HOLE,
            },
            (3, 0) if payload_len == 0 && length == 0 => Entry::Commit {
                seq: offset,
                generation: disk,
            },
            _ => return Err("inconsistent journal entry"),
        };
        Ok((entry, payload_len, u32_at(CRC_AT)))
    }
}

/// The committed content of a journal, as read back on open.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// What the journal overrides, per disk.
    pub(crate) overlays: BTreeMap<u32, Overlay>,
    /// The last commit mark, if any: (seq, generation).
    pub(crate) last_commit: Option<(u64, u32)>,
}

/// Reads `file[0..len]`, which must hold whole, verified entries ending in a
/// commit mark, and rebuilds the overlays. `Err` says what does not verify.
pub(crate) fn scan(file: &File, len: u64) -> io::Result<Result<Scanned, String>> {
    let mut out = Scanned::default();
    let mut at = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while at < len {
        if len - at < HEADER_LEN as u64 {
            return Ok(Err(format!("entry at {at} is cut short")));
        }
        let mut h = [0u8; HEADER_LEN];
        file.read_exact_at(&mut h, at)?;
        let (entry, payload_len, crc) = match Entry::decode_header(&h) {
            Ok(v) => v,
            Err(e) => return Ok(Err(format!("entry at {at}: {e}"))),
        };
        let payload_at = at + HEADER_LEN as u64;
        if len - payload_at < payload_len as u64 {
            return Ok(Err(format!("entry at {at} is cut short")));
        }
        let mut computed = crc32c::crc32c(&h[..CRC_AT]);
        let mut done = 0usize;
        while done < payload_len {
            let n = (payload_len - done).min(buf.len());
            file.read_exact_at(&mut buf[..n], payload_at + done as u64)?;
            computed = crc32c::crc32c_append(computed, &buf[..n]);
            done += n;
        }
        if computed != crc {
            return Ok(Err(format!("entry at {at} fails its checksum")));
        }
        match entry {
            Entry::Data { disk, offset, len } => out.overlays.entry(disk).or_default().insert(
                offset,
                offset + len,
                Source::Journal(payload_at),
            ),
            Entry::Zero {
                disk,
                offset,
                len,
                no_hole,
            } => out.overlays.entry(disk).or_default().insert(
                offset,
                offset + len,
                Source::Zero { no_hole },
            ),
            Entry::Commit { seq, generation } => out.last_commit = Some((seq, generation)),
        }
        at = payload_at + payload_len as u64;
        if at == len && !matches!(entry, Entry::Commit { .. }) {
            return Ok(Err(
                "the committed journal does not end in a commit mark".into()
            ));
        }
    }
    Ok(Ok(out))
}

/// The open journal: appends entries and keeps the overlays in step.
#[derive(Debug)]
pub(crate) struct Journal {
    pub(crate) file: File,
    /// Bytes written (committed or not).
    pub(crate) len: u64,
    /// What the written entries override, per disk.
    pub(crate) overlays: BTreeMap<u32, Overlay>,
}

impl Journal {
    fn append(&mut self, entry: &Entry, payload: &[u8]) -> io::Result<u64> {
        let h = entry.encode_header(payload);
        self.file.write_all_at(&h, self.len)?;
        let payload_at = self.len + HEADER_LEN as u64;
        self.file.write_all_at(payload, payload_at)?;
        self.len = payload_at + payload.len() as u64;
        Ok(payload_at)
    }

    /// Appends `data` for `offset` of `disk`, split into entries of at most
    /// [`MAX_PAYLOAD`] bytes.
    pub(crate) fn write(&mut self, disk: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut at = offset;
        for piece in data.chunks(MAX_PAYLOAD) {
            let len = piece.len() as u64;
            let payload_at = self.append(
                &Entry::Data {
                    disk,
                    offset: at,
                    len,
                },
                piece,
            )?;
            self.overlays.entry(disk).or_default().insert(
                at,
                at + len,
                Source::Journal(payload_at),
            );
            at += len;
        }
        Ok(())
    }

    /// Appends "`offset..offset+len` of `disk` reads as zeroes".
    pub(crate) fn zero(
        &mut self,
        disk: u32,
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
        self.overlays.entry(disk).or_default().insert(
            offset,
            offset + len,
            Source::Zero { no_hole },
        );
        Ok(())
    }

    /// Appends a commit mark.
    pub(crate) fn commit_mark(&mut self, seq: u64, generation: u32) -> io::Result<()> {
        self.append(&Entry::Commit { seq, generation }, &[])
            .map(|_| ())
    }
}

/// The journal as `replay::apply` drives it, for one disk.
pub(crate) struct Journaled<'a> {
    pub(crate) journal: &'a mut Journal,
    pub(crate) disk: u32,
    pub(crate) no_hole: bool,
}

impl ReplayTarget for Journaled<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.journal.write(self.disk, offset, data)
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

    #[test]
    fn headers_round_trip() {
        let cases = [
            (
                Entry::Data {
                    disk: 3,
                    offset: 4096,
                    len: 5,
                },
                b"hello".as_slice(),
            ),
            (
                Entry::Zero {
                    disk: 1,
                    offset: 0,
                    len: 1 << 30,
                    no_hole: true,
                },
                b"".as_slice(),
            ),
            (
                Entry::Commit {
                    seq: 99,
                    generation: 2,
                },
                b"".as_slice(),
            ),
        ];
        for (e, p) in cases {
            let h = e.encode_header(p);
            let (d, len, crc) = Entry::decode_header(&h).unwrap();
            assert_eq!((d, len), (e, p.len()));
            assert_eq!(crc, crc32c::crc32c_append(crc32c::crc32c(&h[..CRC_AT]), p));
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
