//! The synchronous engine: one system call per primitive, in the calling
//! thread. Slow under load, obviously correct: the oracle that the io_uring
//! engine is tested against, and the fallback where io_uring is unavailable.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use nix::fcntl::{fallocate, FallocateFlags};

use super::device::{delegate_block_device, open_and_probe, Device, RawIo};
use super::{BackingOptions, StorageError};

/// `pread` / `pwrite` / `fallocate` / `fdatasync` on the calling thread.
#[derive(Debug)]
pub struct SyncEngine {
    dev: Device<SyncIo>,
}

impl SyncEngine {
    /// Opens `path` (see [`open_backing`](super::open_backing)); the engine
    /// choice in `options` is ignored.
    pub fn open(path: &Path, options: &BackingOptions) -> Result<SyncEngine, StorageError> {
        let opened = open_and_probe(path, options, "sync")?;
        let raw = SyncIo { file: opened.file };
        Ok(SyncEngine {
            dev: Device::new(raw, opened.info, opened.direct_align, opened.mem_align),
        })
    }
}

delegate_block_device!(SyncEngine);

#[derive(Debug)]
pub(crate) struct SyncIo {
    file: File,
}

fn retry_eintr<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

impl RawIo for SyncIo {
    fn file(&self) -> &File {
        &self.file
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Resumes after short reads and EINTR; EOF is UnexpectedEof.
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        // Resumes after short writes and EINTR.
        self.file.write_all_at(data, offset)
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let offset = i64::try_from(offset).map_err(io::Error::other)?;
        let len = i64::try_from(len).map_err(io::Error::other)?;
        retry_eintr(|| {
            fallocate(
                &self.file,
                FallocateFlags::from_bits_retain(mode),
                offset,
                len,
            )
            .map_err(io::Error::from)
        })
    }

    fn sync(&self, datasync: bool) -> io::Result<()> {
        // Never retried (STYLE §11): a failed fsync may already have reported,
        // and cleared, the writeback error of pages the kernel then dropped.
        if datasync {
            self.file.sync_data()
        } else {
            self.file.sync_all()
        }
    }
}
