//! Reading a protected disk for initial sync and resync: chunks at a time,
//! with O_DIRECT where the file allows it (the tracker writes the disk with
//! O_DIRECT, so the page cache would be a second, possibly stale, copy), and
//! telling zero or unallocated ranges apart so they are not sent as data.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tidemark_durable::aligned::AlignedBuf;

const ALIGN: usize = 4096;

/// Largest aligned buffer a thread keeps for its next O_DIRECT read.
const KEEP_SCRATCH: usize = 4 << 20;

thread_local! {
    /// The aligned buffer of this thread's last O_DIRECT read, reused by
    /// the next: a new one costs a page fault and a clear per 4 KiB page,
    /// more than the read's copy out of it (chunks are read ahead on a
    /// pool of threads, so the allocator returns freed buffers to the
    /// system rather than to the next read).
    static SCRATCH: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// What a chunk of the disk holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkContent {
    /// Only zeroes (or unallocated): send the length, not the bytes.
    Zero(u64),
    /// These bytes.
    Data(Vec<u8>),
}

/// A protected disk opened for reading.
#[derive(Debug)]
pub struct SourceDisk {
    file: File,
    path: PathBuf,
    size: u64,
    direct: bool,
}

impl SourceDisk {
    /// Opens `path` read-only; `size` is the size the tracker serves.
    pub fn open(path: &Path, size: u64) -> io::Result<SourceDisk> {
        let direct = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        let (file, direct) = match direct {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(), "O_DIRECT not supported here; reading through the page cache");
                (File::open(path)?, false)
            }
            Err(e) => return Err(e),
        };
        Ok(SourceDisk {
            file,
            path: path.to_path_buf(),
            size,
            direct,
        })
    }

    /// The disk's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `offset..offset+len` has no allocated data (image files
    /// with holes; block devices always answer no).
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        tidemark_durable::zero::is_hole(&self.file, offset, len)
    }

    /// Reads `offset..offset+len` (clipped to the disk's size).
    pub fn read(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size);
        let want = usize::try_from(end.saturating_sub(offset))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if want == 0 {
            return Ok(Vec::new());
        }
        if self.direct {
            // O_DIRECT wants aligned offsets, lengths and memory: read the
            // aligned span around the request and copy the part asked for.
            let lead = (offset % ALIGN as u64) as usize;
            let start = offset - lead as u64;
            let span = lead + want;
            let size = span.div_ceil(ALIGN) * ALIGN;
            // Bytes of an earlier read in a kept buffer are overwritten or
            // never looked at: only the `span` bytes read are copied out.
            let mut buf = SCRATCH
                .with(|s| s.borrow_mut().take())
                .and_then(|mut b| b.set_len(size).then_some(b))
                .unwrap_or_else(|| AlignedBuf::zeroed(size, ALIGN));
            let b = &mut buf[..];
            let mut done = 0usize;
            while done < span {
                let n = match self.file.read_at(&mut b[done..], start + done as u64) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                done += n;
                // A short O_DIRECT read ends at the file's end.
                if n % ALIGN != 0 {
                    break;
                }
            }
            if done < span {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{} ends before {end}", self.path.display()),
                ));
            }
            // Copied straight out: the chunk's memory is not zeroed first.
            let out = b[lead..span].to_vec();
            if buf.capacity() <= KEEP_SCRATCH {
                SCRATCH.with(|s| *s.borrow_mut() = Some(buf));
            }
            Ok(out)
        } else {
            let mut out = vec![0u8; want];
            self.file.read_exact_at(&mut out, offset)?;
            Ok(out)
        }
    }

    /// Reads a chunk for sync, telling zero or unallocated ranges apart.
    pub fn chunk(&self, offset: u64, len: u64) -> io::Result<ChunkContent> {
        let len = offset
            .saturating_add(len)
            .min(self.size)
            .saturating_sub(offset);
        if self.is_hole(offset, len) {
            return Ok(ChunkContent::Zero(len));
        }
        let data = self.read(offset, len)?;
        if data.iter().all(|b| *b == 0) {
            Ok(ChunkContent::Zero(len))
        } else {
            Ok(ChunkContent::Data(data))
        }
    }

    /// BLAKE3 digests of the blocks of `offset..offset+len` (the last one
    /// may be short), read in pieces of at most `read_size`.
    pub fn digests(&self, offset: u64, len: u64, block_size: u32) -> io::Result<Vec<[u8; 32]>> {
        let bs = u64::from(block_size.max(1));
        let end = offset.saturating_add(len).min(self.size);
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let n = bs.min(end - at);
            let data = self.read(at, n)?;
            out.push(*blake3::hash(&data).as_bytes());
            at += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_hole_and_data_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let f = File::create(&path).unwrap();
        let size = 4u64 << 20;
        f.set_len(size).unwrap();
        f.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        // Allocated but zero.
        f.write_all_at(&[0u8; 4096], 3 << 20).unwrap();
        f.sync_all().unwrap();
        let d = SourceDisk::open(&path, size).unwrap();
        assert_eq!(d.chunk(0, 1 << 20).unwrap(), ChunkContent::Zero(1 << 20));
        match d.chunk(1 << 20, 1 << 20).unwrap() {
            ChunkContent::Data(v) => {
                assert_eq!(v.len(), 1 << 20);
                assert!(v[..4096].iter().all(|b| *b == 7));
                assert!(v[4096..].iter().all(|b| *b == 0));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            d.chunk(3 << 20, 1 << 20).unwrap(),
            ChunkContent::Zero(1 << 20)
        );
        // Clipped at the end of the disk.
        assert_eq!(
            d.chunk(size - 4096, 1 << 20).unwrap(),
            ChunkContent::Zero(4096)
        );
        let digests = d.digests(1 << 20, 8192, 4096).unwrap();
        assert_eq!(digests[0], *blake3::hash(&[7u8; 4096]).as_bytes());
        assert_eq!(digests[1], *blake3::hash(&[0u8; 4096]).as_bytes());
    }

    #[test]
    fn unaligned_sizes_read_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("odd.raw");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let d = SourceDisk::open(&path, data.len() as u64).unwrap();
        assert_eq!(d.read(0, 1 << 20).unwrap(), data);
        assert_eq!(d.read(4096, 100).unwrap(), data[4096..4196]);
        assert_eq!(d.read(5, 10).unwrap(), data[5..15]);
    }

    #[test]
    fn a_reused_read_buffer_gives_only_the_bytes_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reuse.raw");
        let size = 3usize << 20;
        let data: Vec<u8> = (0..size as u32).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        std::fs::write(&path, &data).unwrap();
        let d = SourceDisk::open(&path, size as u64).unwrap();
        // A large read, then smaller and unaligned ones in the buffer it
        // left behind, then a larger one than it.
        assert_eq!(d.read(1 << 20, 1 << 20).unwrap(), data[1 << 20..2 << 20]);
        assert_eq!(d.read(4099, 777).unwrap(), data[4099..4876]);
        assert_eq!(d.read(0, 8192).unwrap(), data[..8192]);
        assert_eq!(
            d.read(100, (2 << 20) + 5).unwrap(),
            data[100..(2 << 20) + 105]
        );
        assert_eq!(d.read((3 << 20) - 10, 100).unwrap(), data[(3 << 20) - 10..]);
    }
}
