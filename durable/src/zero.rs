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
use std::os::fd::AsFd;
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

/// A run of a file that [`allocation_runs`] found: data, or a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllocationRun {
    /// First byte.
    pub offset: u64,
    /// Bytes; never zero.
    pub length: u64,
    /// Allocated data (`true`) or a hole, which reads as zeroes.
    pub data: bool,
}

/// The data and holes of `offset..offset+len` of the file `fd`, in order
/// from `offset`, at most `max_runs` of them (the last one may end before
/// the range does), found with `SEEK_DATA`/`SEEK_HOLE`. Past the end of
/// the file is a hole. A filesystem that does not know holes reports
/// everything as data, which is always correct. The file offset moves;
/// positioned I/O ignores it.
pub fn allocation_runs(
    fd: impl AsFd,
    offset: u64,
    len: u64,
    max_runs: usize,
) -> io::Result<Vec<AllocationRun>> {
    let fd = fd.as_fd();
    let end = offset.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
    let seek = |at: u64, whence: Whence| -> io::Result<Option<u64>> {
        let at = i64::try_from(at).map_err(|_| io::ErrorKind::InvalidInput)?;
        match lseek(fd, at, whence) {
            Ok(pos) => Ok(Some(pos as u64)),
            // No data at or after `at` (SEEK_DATA), or `at` is past the end.
            Err(Errno::ENXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    let mut runs = Vec::new();
    let mut at = offset;
    while at < end && runs.len() < max_runs.max(1) {
        let data_at = seek(at, Whence::SeekData)?.unwrap_or(end).min(end);
        let (stop, data) = if data_at > at {
            (data_at, false)
        } else {
            // Every file ends in a virtual hole, so SEEK_HOLE finds one.
            (
                seek(at, Whence::SeekHole)?
                    .unwrap_or(end)
                    .clamp(at + 1, end),
                true,
            )
        };
        runs.push(AllocationRun {
            offset: at,
            length: stop - at,
            data,
        });
        at = stop;
    }
    Ok(runs)
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

    /// A sparse file reports its holes and its data where they are; a
    /// range written later is data; past the end is a hole.
    #[test]
    fn allocation_runs_find_holes_and_data() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[7u8; 65536], 256 << 10).unwrap();
        let runs = allocation_runs(&file, 0, 1 << 20, 16).unwrap();
        if runs.len() == 1 {
            // A filesystem without holes: all data, which is correct.
            assert!(runs[0].data && runs[0].length == 1 << 20);
            eprintln!("this filesystem reports no holes; hole detection not checked");
            return;
        }
        let data: Vec<_> = runs.iter().filter(|r| r.data).collect();
        assert_eq!(data.len(), 1, "{runs:?}");
        assert!(data[0].offset <= 256 << 10);
        assert!(data[0].offset + data[0].length >= 320 << 10);
        assert!(!runs[0].data && runs[0].offset == 0, "{runs:?}");
        let covered: u64 = runs.iter().map(|r| r.length).sum();
        assert_eq!(covered, 1 << 20);

        file.write_all_at(&[1u8; 4096], 0).unwrap();
        let runs = allocation_runs(&file, 0, 4096, 16).unwrap();
        assert_eq!(
            runs,
            [AllocationRun {
                offset: 0,
                length: 4096,
                data: true
            }]
        );
        let past = allocation_runs(&file, 1 << 20, 4096, 16).unwrap();
        assert!(past.iter().all(|r| !r.data), "{past:?}");
        assert_eq!(allocation_runs(&file, 0, 1 << 20, 2).unwrap().len(), 2);
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
