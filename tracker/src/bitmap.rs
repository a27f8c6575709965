//! A persistent extent bitmap: one bit per fixed-size extent of a disk, kept
//! in memory and written to a small file. The tracker keeps two kinds:
//! - the **activity map** (`activity-<disk>.map`): extents that may hold
//!   writes not yet durable in the change log. A bit is durable *before* a
//!   write to its extent is issued; after an unclean stop, set bits become
//!   resync-needed extents.
//! - the **dirty bitmap** (`dirty-<disk>.map`): in bitmap mode (log full),
//!   extents written since the log stopped taking data.
//!
//! File layout, little-endian:
//!
//! ```text
//!  offset size field
//!       0    8 magic        "TMBITMAP"
//!       8    4 version      1
//!      12    4 reserved     zero
//!      16    8 granularity  bytes of disk per bit
//!      24    8 bits         number of bits (extents of the disk)
//!      32   28 reserved     zero
//!      60    4 crc32c       over bytes 0..60
//!    4096    … bits         bit i of byte i/8 (LSB first) = extent i
//! ```
//!
//! A set bit is written as a whole byte with `pwrite`, which a crash cannot
//! tear; a stale set bit only costs an extra resync, a missing one would
//! cost correctness, so bits are cleared lazily and set eagerly.
//!
//! Version 1 is the only version so far. A file this code cannot read (a
//! newer version, another geometry, damage) is never trusted: every bit is
//! set ([`Opened::Reset`]), which costs a resync and loses nothing.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{Immutable, IntoBytes, Unaligned};

const MAGIC: [u8; 8] = *b"TMBITMAP";
const VERSION: u32 = 1;
const BITS_AT: u64 = 4096;

/// Why a bitmap file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// Reading, writing or syncing the file failed.
    #[error("bitmap {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// One disk's bitmap, in memory and on disk.
#[derive(Debug)]
pub struct PersistentBitmap {
    path: PathBuf,
    file: File,
    granularity: u64,
    bits: Vec<u8>,
    nbits: u64,
    /// Bytes changed in memory and not yet written.
    unwritten: BTreeSet<usize>,
}

/// How an existing file was found when opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// No file existed; an empty bitmap was created.
    Created,
    /// The file was read as it was.
    Loaded,
    /// The file did not verify or was for another geometry: every bit was
    /// set, because nothing can be assumed about the extents.
    Reset,
}

impl PersistentBitmap {
    /// Opens or creates the bitmap at `path` for a disk of `disk_size`
    /// bytes at `granularity` bytes per bit.
    pub fn open(
        path: &Path,
        granularity: u64,
        disk_size: u64,
    ) -> Result<(PersistentBitmap, Opened), BitmapError> {
        assert!(
            granularity.is_power_of_two(),
            "granularity must be a power of two"
        );
        let io_err = |source| BitmapError::Io {
            path: path.to_path_buf(),
            source,
        };
        let nbits = disk_size.div_ceil(granularity);
        let nbytes = nbits.div_ceil(8) as usize;
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err)?;
        let header = encode_header(granularity, nbits);
        let mut bitmap = PersistentBitmap {
            path: path.to_path_buf(),
            file,
            granularity,
            bits: vec![0; nbytes],
            nbits,
            unwritten: BTreeSet::new(),
        };
        let mut found = [0u8; HEADER_LEN];
        let n = read_full(&bitmap.file, &mut found, 0).map_err(io_err)?;
        let opened = if existed && n == HEADER_LEN && found == header {
            read_full(&bitmap.file, &mut bitmap.bits, BITS_AT).map_err(io_err)?;
            Opened::Loaded
        } else if existed && n > 0 {
            bitmap.set_all();
            Opened::Reset
        } else {
            Opened::Created
        };
        // (Re)write the header and every bit, so the file matches memory.
        bitmap
            .file
            .set_len(BITS_AT + nbytes as u64)
            .map_err(io_err)?;
        bitmap.file.write_all_at(&header, 0).map_err(io_err)?;
        bitmap
            .file
            .write_all_at(&bitmap.bits, BITS_AT)
            .map_err(io_err)?;
        bitmap.file.sync_all().map_err(io_err)?;
        Ok((bitmap, opened))
    }

    /// Bytes of disk per bit.
    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    /// Number of extents.
    pub fn len(&self) -> u64 {
        self.nbits
    }

    /// Whether the disk has no extents.
    pub fn is_empty(&self) -> bool {
        self.nbits == 0
    }

    /// The extents `offset..offset+len` touches.
    pub fn extents(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let first = offset / self.granularity;
        let last = offset.saturating_add(len.max(1)).div_ceil(self.granularity);
        first.min(self.nbits)..last.min(self.nbits)
    }

    /// Whether extent `i` is set.
    pub fn get(&self, i: u64) -> bool {
        self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    /// Sets extent `i` in memory; returns whether it changed.
    pub fn set(&mut self, i: u64) -> bool {
        let (byte, mask) = ((i / 8) as usize, 1u8 << (i % 8));
        if self.bits[byte] & mask != 0 {
            return false;
        }
        self.bits[byte] |= mask;
        self.unwritten.insert(byte);
        true
    }

    /// Clears extent `i` in memory; returns whether it changed.
    pub fn clear(&mut self, i: u64) -> bool {
        let (byte, mask) = ((i / 8) as usize, 1u8 << (i % 8));
        if self.bits[byte] & mask == 0 {
            return false;
        }
        self.bits[byte] &= !mask;
        self.unwritten.insert(byte);
        true
    }

    /// Sets every extent in memory.
    pub fn set_all(&mut self) {
        for i in 0..self.nbits {
            self.set(i);
        }
    }

    /// Clears every extent in memory.
    pub fn clear_all(&mut self) {
        for i in 0..self.nbits {
            self.clear(i);
        }
    }

    /// Covers a disk grown to `disk_size` bytes: the new extents are clear,
    /// the bits already set stay, and the file's header and length are
    /// rewritten and synced for the new geometry (a crash before that
    /// leaves the old header, which a reopen at the new size does not
    /// trust: every bit is set then, see [`Opened::Reset`]). A size that
    /// adds no extent changes nothing.
    pub fn grow(&mut self, disk_size: u64) -> Result<(), BitmapError> {
        let nbits = disk_size.div_ceil(self.granularity);
        if nbits <= self.nbits {
            return Ok(());
        }
        let io_err = |source| BitmapError::Io {
            path: self.path.clone(),
            source,
        };
        let nbytes = nbits.div_ceil(8) as usize;
        // The bits of the old last byte past the old end were never set.
        self.bits.resize(nbytes, 0);
        self.nbits = nbits;
        self.file.set_len(BITS_AT + nbytes as u64).map_err(io_err)?;
        self.file
            .write_all_at(&encode_header(self.granularity, nbits), 0)
            .map_err(io_err)?;
        self.file.sync_all().map_err(io_err)
    }

    /// Whether any extent is set.
    pub fn any(&self) -> bool {
        self.bits.iter().any(|b| *b != 0)
    }

    /// The set extents as merged byte ranges of the disk `(offset, len)`,
    /// clipped to `disk_size`.
    pub fn ranges(&self, disk_size: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in 0..self.nbits {
            if !self.get(i) {
                continue;
            }
            let start = i * self.granularity;
            let end = (start + self.granularity).min(disk_size);
            match out.last_mut() {
                Some((s, l)) if *s + *l == start => *l = end - *s,
                _ => out.push((start, end - start)),
            }
        }
        out
    }

    /// Takes the bytes changed since the last call, with their current
    /// values, to be written by [`BitmapWriter::write_bytes`] (possibly
    /// without holding the caller's lock).
    pub fn take_unwritten(&mut self) -> Vec<(usize, u8)> {
        std::mem::take(&mut self.unwritten)
            .into_iter()
            .map(|b| (b, self.bits[b]))
            .collect()
    }

    /// A handle for writing bytes without `&mut self`.
    pub fn writer(&self) -> Result<BitmapWriter, BitmapError> {
        Ok(BitmapWriter {
            path: self.path.clone(),
            file: self.file.try_clone().map_err(|source| BitmapError::Io {
                path: self.path.clone(),
                source,
            })?,
        })
    }
}

/// Writes taken bytes of a bitmap and syncs them.
#[derive(Debug)]
pub struct BitmapWriter {
    path: PathBuf,
    file: File,
}

impl BitmapWriter {
    /// Writes `bytes` (from [`PersistentBitmap::take_unwritten`]) and,
    /// with `sync`, makes them durable. Runs of adjacent bytes go in one
    /// write.
    pub fn write_bytes(&self, bytes: &[(usize, u8)], sync: bool) -> Result<(), BitmapError> {
        let io_err = |source| BitmapError::Io {
            path: self.path.clone(),
            source,
        };
        let mut i = 0;
        while i < bytes.len() {
            let mut j = i + 1;
            while j < bytes.len() && bytes[j].0 == bytes[j - 1].0 + 1 {
                j += 1;
            }
            let run: Vec<u8> = bytes[i..j].iter().map(|(_, v)| *v).collect();
            self.file
                .write_all_at(&run, BITS_AT + bytes[i].0 as u64)
                .map_err(io_err)?;
            i = j;
        }
        if sync && !bytes.is_empty() {
            self.file.sync_data().map_err(io_err)?;
        }
        Ok(())
    }
}

/// A bitmap file's header exactly as it lies on disk: the module's diagram,
/// field for field, little-endian, without padding and at any alignment.
#[derive(IntoBytes, Immutable, Unaligned)]
#[repr(C)]
struct RawHeader {
    magic: [u8; 8],
    version: U32,
    reserved: [u8; 4],
    granularity: U64,
    bits: U64,
    reserved_tail: [u8; 28],
    crc: U32,
}

const HEADER_LEN: usize = size_of::<RawHeader>();
const _: () = assert!(HEADER_LEN == 64);
const CRC_AT: usize = std::mem::offset_of!(RawHeader, crc);

/// The one header a bitmap of this geometry may have: a file is loaded
/// only if its header is exactly this.
fn encode_header(granularity: u64, nbits: u64) -> [u8; HEADER_LEN] {
    let mut h = RawHeader {
        magic: MAGIC,
        version: VERSION.into(),
        reserved: [0; 4],
        granularity: granularity.into(),
        bits: nbits.into(),
        reserved_tail: [0; 28],
        crc: U32::ZERO,
    };
    h.crc = crc32c::crc32c(&h.as_bytes()[..CRC_AT]).into();
    zerocopy::transmute!(h)
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The maps of the version-1 fixture log (written by the version-1
    /// tracker, 1 MiB disk) load as they are, set bits included.
    #[test]
    fn version_1_maps_load() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../changelog/tests/fixtures/log-v1");
        let dir = tempfile::tempdir().unwrap();
        for (name, granularity, bits) in [
            ("activity-disk.map", 4 << 20, 1),
            ("dirty-disk.map", 64 << 10, 16),
        ] {
            let mut bytes = std::fs::read(fixture.join(name)).unwrap();
            assert_eq!(&bytes[8..12], &1u32.to_le_bytes(), "{name} is version 1");
            bytes[BITS_AT as usize] |= 1;
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            let (b, opened) = PersistentBitmap::open(&path, granularity, 1 << 20).unwrap();
            assert_eq!(opened, Opened::Loaded, "{name}");
            assert_eq!(b.len(), bits);
            assert!(b.get(0) && (1..bits).all(|i| !b.get(i)), "{name}");
        }
    }

    #[test]
    fn bits_survive_a_reopen_and_ranges_merge() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.map");
        let (mut b, opened) = PersistentBitmap::open(&path, 4096, 10 * 4096 + 100).unwrap();
        assert_eq!(opened, Opened::Created);
        assert_eq!(b.len(), 11);
        assert_eq!(b.extents(4000, 200), 0..2);
        for i in [1, 2, 3, 7, 10] {
            b.set(i);
        }
        let bytes = b.take_unwritten();
        b.writer().unwrap().write_bytes(&bytes, true).unwrap();
        drop(b);
        let (b, opened) = PersistentBitmap::open(&path, 4096, 10 * 4096 + 100).unwrap();
        assert_eq!(opened, Opened::Loaded);
        assert_eq!(
            b.ranges(10 * 4096 + 100),
            vec![(4096, 3 * 4096), (7 * 4096, 4096), (10 * 4096, 100)]
        );
    }

    #[test]
    fn a_grown_bitmap_keeps_its_bits_and_reopens_at_the_new_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("activity-a.map");
        let (mut map, _) = PersistentBitmap::open(&path, 4096, 5 * 4096).unwrap();
        map.set(1);
        map.set(4);
        let bytes = map.take_unwritten();
        map.writer().unwrap().write_bytes(&bytes, true).unwrap();
        map.grow(4096).unwrap();
        assert_eq!(map.len(), 5, "a smaller size changes nothing");
        map.grow(21 * 4096).unwrap();
        assert_eq!(map.len(), 21);
        assert!(map.get(1) && map.get(4));
        assert!((5..21).all(|i| !map.get(i)));
        map.set(20);
        let bytes = map.take_unwritten();
        map.writer().unwrap().write_bytes(&bytes, true).unwrap();
        drop(map);
        let (map, opened) = PersistentBitmap::open(&path, 4096, 21 * 4096).unwrap();
        assert_eq!(opened, Opened::Loaded);
        let set: Vec<u64> = (0..map.len()).filter(|&i| map.get(i)).collect();
        assert_eq!(set, vec![1, 4, 20]);
    }

    #[test]
    fn a_file_for_another_geometry_is_reset_to_all_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.map");
        drop(PersistentBitmap::open(&path, 4096, 1 << 20).unwrap());
        let (b, opened) = PersistentBitmap::open(&path, 8192, 1 << 20).unwrap();
        assert_eq!(opened, Opened::Reset);
        assert!((0..b.len()).all(|i| b.get(i)));
    }
}
