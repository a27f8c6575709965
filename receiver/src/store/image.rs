//! Writing replica images: data, and ranges that must read as zeroes, with
//! the same result as `tidemark log replay` (changelog/src/replay.rs).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use tidemark_changelog::replay::ReplayTarget;
use tidemark_durable::Zeroes;

/// Makes `offset..offset+len` of `file` read as zeroes: a punched hole, or
/// (`no_hole`, the client asked to keep the blocks allocated) a zeroed
/// range; zeroes are written where the filesystem supports neither. The
/// caller keeps the range inside the file.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64, no_hole: bool) -> io::Result<()> {
    let how = if no_hole {
        Zeroes::Allocated
    } else {
        Zeroes::Hole
    };
    tidemark_durable::zero_range(file, offset, len, how)
}

/// An image written in place, as `replay::apply` drives it. Durability is
/// the group's business (commit), so `flush` does nothing.
pub(crate) struct InPlace<'a> {
    pub(crate) file: &'a File,
    pub(crate) no_hole: bool,
}

impl ReplayTarget for InPlace<'_> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(self.file, offset, len, self.no_hole)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Whether `offset..offset+len` of `file` is a hole (reads as zeroes
/// without being stored), per `SEEK_DATA`. `false` if unknown.
pub(crate) fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    let Ok(o) = i64::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek on a valid, owned descriptor; no memory is passed. It
    // moves the file offset, which this store never uses (positioned I/O
    // only).
    let data = unsafe { libc::lseek(file.as_raw_fd(), o, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data at or after `offset`.
        return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= offset.saturating_add(len)
}
