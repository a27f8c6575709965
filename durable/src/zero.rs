//! Making a range of a file read as zeroes, the one way Tidemark does it on
//! a filesystem: `fallocate(2)` (a punched hole, or a zeroed range that
//! stays allocated), and where the filesystem supports neither
//! (`EOPNOTSUPP`: tmpfs before 3.5, some FUSE and network filesystems)
//! zeroes written over the range. Every caller (the log's preallocated
//! tail, a replayed image, a replica image, a test failover's scratch file)
//! gets the same bytes either way; only the space used differs. The other
//! way round, [`is_hole`] says whether a range has no data at all
//! (`SEEK_DATA`), so a reader can skip it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

/// What the zeroed range should become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeroes {
    /// A hole: the blocks are given back to the filesystem
    /// (`FALLOC_FL_PUNCH_HOLE`).
    Hole,
    /// Zeroed blocks that stay allocated, so later writes there cannot fail
    /// for want of space (`FALLOC_FL_ZERO_RANGE`).
    Allocated,
}

/// Largest buffer of zeroes the fallback writes at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// Makes `offset..offset+len` of `file` read as zeroes, as `how` asks,
/// keeping the file's length (a range past the end stays past the end).
pub fn zero_range(file: &File, offset: u64, len: u64, how: Zeroes) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let mode = match how {
        Zeroes::Hole => FallocateFlags::FALLOC_FL_PUNCH_HOLE,
        Zeroes::Allocated => FallocateFlags::FALLOC_FL_ZERO_RANGE,
    } | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    loop {
        match fallocate(file, mode, o, l) {
            Ok(()) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(Errno::EOPNOTSUPP) => return write_zeroes(file, offset, len),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes zeroes over `offset..offset+len` of `file`: what [`zero_range`]
/// falls back to. Unlike `zero_range`, a range past the end extends the
/// file.
pub fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
    let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut at = offset;
    while at < end {
        let n = (end - at).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Whether `offset..offset+len` of `file` has no allocated data: the next
/// data (`SEEK_DATA`) starts at or after the range's end, or there is none
/// (`ENXIO`). A block device has no holes; any other error answers no too,
/// so a reader reads the range. It moves the file offset, which positioned
/// I/O ignores.
pub fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    let Ok(at) = i64::try_from(offset) else {
        return false;
    };
    match lseek(file, at, Whence::SeekData) {
        Ok(data) => data as u64 >= offset.saturating_add(len),
        Err(e) => e == Errno::ENXIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn file_of(bytes: &[u8]) -> File {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(bytes, 0).unwrap();
        file
    }

    fn content(file: &File) -> Vec<u8> {
        let mut out = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut out, 0).unwrap();
        out
    }

    #[test]
    fn both_kinds_zero_exactly_the_range_and_keep_the_length() {
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8 + 1).collect();
        for how in [Zeroes::Hole, Zeroes::Allocated] {
            for (offset, len) in [(0, 4096), (100, 5000), (4096, 8192 + 100), (10, 0)] {
                let file = file_of(&data);
                zero_range(&file, offset, len, how).unwrap();
                let mut want = data.clone();
                want[offset as usize..(offset + len) as usize].fill(0);
                assert_eq!(content(&file), want, "{how:?} {offset}+{len}");
            }
            // A range reaching past the end zeroes up to it and no further.
            let file = file_of(&data);
            zero_range(&file, 4096, 1 << 20, how).unwrap();
            let mut want = data.clone();
            want[4096..].fill(0);
            assert_eq!(content(&file), want, "{how:?} past the end");
        }
    }

    #[test]
    fn the_fallback_writes_the_same_zeroes() {
        let data = vec![7u8; 3 * ZERO_CHUNK as usize];
        let file = file_of(&data);
        write_zeroes(&file, 5, 2 * ZERO_CHUNK + 3).unwrap();
        let mut want = data.clone();
        want[5..5 + 2 * ZERO_CHUNK as usize + 3].fill(0);
        assert_eq!(content(&file), want);
        assert!(write_zeroes(&file, u64::MAX, 2).is_err());
    }

    #[test]
    fn a_hole_is_a_range_without_data() {
        let file = tempfile::tempfile().unwrap();
        file.write_all_at(&[1; 4096], 64 << 10).unwrap();
        file.set_len(256 << 10).unwrap();
        assert!(!is_hole(&file, 64 << 10, 4096));
        assert!(!is_hole(&file, 60 << 10, 8 << 10));
        // Past the data, and past the end: nothing there.
        assert!(!is_hole(&file, 0, u64::MAX));
        assert!(!is_hole(&file, u64::MAX, 1));
        if is_hole(&file, 0, 64 << 10) {
            // A filesystem that reports holes (not all do: then every
            // range has data, the safe answer).
            assert!(is_hole(&file, 128 << 10, 128 << 10));
            assert!(is_hole(&file, 1 << 30, 4096));
        }
    }

    #[test]
    fn an_offset_beyond_what_fallocate_takes_is_invalid_input() {
        let file = file_of(b"x");
        let err = zero_range(&file, u64::MAX - 1, 1, Zeroes::Hole).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
