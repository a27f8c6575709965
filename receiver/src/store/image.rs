//! Writing replica images: data, and ranges that must read as zeroes, with
//! the same result as `tidemark log replay` (changelog/src/replay.rs).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use tidemark_changelog::replay::ReplayTarget;

/// Makes `offset..offset+len` of `file` read as zeroes: a punched hole, or
/// (`no_hole`, the client asked to keep the blocks allocated) a zeroed
/// range; zeroes are written where the filesystem supports neither. The
/// caller keeps the range inside the file.
pub(crate) fn zero_range(file: &File, offset: u64, len: u64, no_hole: bool) -> io::Result<()> {
    let (o, l) = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::ErrorKind::InvalidInput.into()),
    };
    if len == 0 {
        return Ok(());
    }
    let mode = if no_hole {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    };
    // SAFETY: fallocate on a valid, owned descriptor; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, o, l) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
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
