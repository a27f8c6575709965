//! The durable cursor: "the receiver has made everything up to and including
//! this sequence number durable". The shipper writes it; the appender reads
//! it to recycle segments that lie wholly at or below it.
//!
//! It lives in the file `cursor` of the log directory and is replaced
//! atomically: the new value is written to `cursor.tmp`, synced, renamed over
//! `cursor`, and the directory synced. 24 bytes, little-endian:
//!
//! ```text
//!  offset size field
//!       0    4 magic    "TMCU"
//!       4    4 version  1
//!       8    8 seq      highest sequence number the receiver holds durably
//!      16    4 reserved zero
//!      20    4 crc32c   over bytes 0..20
//! ```
//!
//! Version 1 is the only version so far; a cursor of another version reads
//! as damaged, never as a position.

use crate::ids::Seq;
use crate::record::MAX_SEQ;
use crate::storage::{LogDir, LogFile};
use std::io;
use tidemark_durable::{replace, Durability};
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The cursor's file name.
pub const CURSOR_FILE: &str = "cursor";
const CURSOR_TMP: &str = "cursor.tmp";
const CURSOR_MAGIC: [u8; 4] = *b"TMCU";
const CURSOR_VERSION: u32 = 1;
const CURSOR_LEN: usize = 24;

/// Why the cursor could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// The cursor file exists but does not verify (damage on the local disk).
    #[error("the cursor file in {dir} is damaged")]
    Damaged {
        /// The log directory.
        dir: String,
    },
    /// Reading, writing or syncing the local disk failed.
    #[error("cursor file I/O in {dir}")]
    Io {
        /// The log directory.
        dir: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// The cursor file exactly as it lies on disk: the module's diagram, field for
/// field, little-endian, without padding and at any alignment.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct RawCursor {
    magic: [u8; 4],
    version: U32,
    seq: U64,
    reserved: [u8; 4],
    crc: U32,
}

const _: () = assert!(size_of::<RawCursor>() == CURSOR_LEN);
const CRC_AT: usize = std::mem::offset_of!(RawCursor, crc);

fn encode(seq: Seq) -> [u8; CURSOR_LEN] {
    let mut c = RawCursor {
        magic: CURSOR_MAGIC,
        version: CURSOR_VERSION.into(),
        seq: seq.get().into(),
        reserved: [0; 4],
        crc: U32::ZERO,
    };
    c.crc = crc32c::crc32c(&c.as_bytes()[..CRC_AT]).into();
    zerocopy::transmute!(c)
}

fn decode(b: &[u8]) -> Option<Seq> {
    let c = RawCursor::ref_from_bytes(b).ok()?;
    if c.magic != CURSOR_MAGIC || c.version.get() != CURSOR_VERSION {
        return None;
    }
    if crc32c::crc32c(&c.as_bytes()[..CRC_AT]) != c.crc.get() {
        return None;
    }
    // A log never gets there: counting on from it would overflow.
    Some(c.seq.get()).filter(|seq| *seq <= MAX_SEQ).map(Seq)
}

/// Reads the cursor; 0 (nothing acknowledged) when there is none yet.
pub fn read_cursor<D: LogDir>(dir: &D) -> Result<Seq, CursorError> {
    let io_err = |source| CursorError::Io {
        dir: dir.describe(),
        source,
    };
    let file = match dir.open(CURSOR_FILE, false) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Seq::ZERO),
        Err(e) => return Err(io_err(e)),
    };
    let mut buf = [0u8; CURSOR_LEN + 1];
    let n = file.read_full_at(&mut buf, 0).map_err(io_err)?;
    decode(&buf[..n]).ok_or_else(|| CursorError::Damaged {
        dir: dir.describe(),
    })
}

/// Replaces the cursor with `seq`, durably and atomically.
pub fn write_cursor<D: LogDir>(dir: &D, seq: Seq) -> Result<(), CursorError> {
    replace(
        dir,
        CURSOR_TMP,
        CURSOR_FILE,
        &encode(seq),
        Durability::Durable,
    )
    .map_err(|e| CursorError::Io {
        dir: dir.describe(),
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::SimDir;

    #[test]
    fn missing_cursor_reads_zero_and_writes_round_trip() {
        let dir = SimDir::new();
        assert_eq!(read_cursor(&dir).unwrap(), Seq(0));
        write_cursor(&dir, Seq(17)).unwrap();
        assert_eq!(read_cursor(&dir).unwrap(), Seq(17));
        write_cursor(&dir, Seq(18)).unwrap();
        assert_eq!(read_cursor(&dir).unwrap(), Seq(18));
    }

    #[test]
    fn the_version_1_fixture_cursor_reads() {
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/log-v1")
            .join(CURSOR_FILE);
        let mut files = std::collections::BTreeMap::new();
        files.insert(CURSOR_FILE.to_string(), std::fs::read(fixture).unwrap());
        assert_eq!(read_cursor(&SimDir::from_files(files)).unwrap(), Seq(11));
    }

    #[test]
    fn damaged_cursor_is_an_error() {
        let dir = SimDir::new();
        write_cursor(&dir, Seq(5)).unwrap();
        let mut bytes = dir.files()[CURSOR_FILE].clone();
        bytes[9] ^= 1;
        dir.put(CURSOR_FILE, bytes);
        assert!(matches!(
            read_cursor(&dir),
            Err(CursorError::Damaged { .. })
        ));
    }
}
