//! Writing replica images: data, and ranges that must read as zeroes, with
//! the same result as `tidemark log replay` (changelog/src/replay.rs).
//! Images are files of the group directory on the storage seam.

use std::io;
use tidemark_changelog::replay::ReplayTarget;
use tidemark_durable::LogFile;

/// Makes `offset..offset+len` of `file` read as zeroes: a punched hole, or
/// (`no_hole`, the client asked to keep the blocks allocated) a zeroed
/// range; zeroes are written where the filesystem supports neither. The
/// caller keeps the range inside the file.
pub(crate) fn zero_range<F: LogFile>(
    file: &F,
    offset: u64,
    len: u64,
    no_hole: bool,
) -> io::Result<()> {
    if no_hole {
        file.zero_range(offset, len)
    } else {
        file.punch_hole(offset, len)
    }
}

/// An image written in place, as `replay::apply` drives it. Durability is
/// the group's business (commit), so `flush` does nothing.
pub(crate) struct InPlace<'a, F: LogFile> {
    pub(crate) file: &'a F,
    pub(crate) no_hole: bool,
}

impl<F: LogFile> ReplayTarget for InPlace<'_, F> {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(&[data], offset)
    }

    fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(self.file, offset, len, self.no_hole)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
