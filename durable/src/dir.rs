//! The narrow storage interface the change log and the replica store run
//! on, and its two engines: [`FsDir`], a real directory, and [`SimDir`], an
//! in-memory directory that keeps what was *written* apart from what is
//! *durable* so tests can cut power at any sync point and look at every
//! state a crash could leave.
//!
//! It also owns how Tidemark creates files on a real filesystem: every file
//! that holds disk data or state is made with [`private_file`] (0600) and
//! every directory with [`create_private_dir_all`] (0700), whatever the
//! umask, so a copy of a protected disk is never readable by other local
//! users. The umask can only take permissions away, so asking for 0600 and
//! 0700 at creation is enough; nothing is ever widened afterwards.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// A directory of log files. Cloning gives another handle to the same
/// directory (cheap: a path, or a shared in-memory state), so I/O can run
/// away from the log that planned it.
pub trait LogDir: Send + Sync + Clone {
    /// An open file of this directory.
    type File: LogFile;
    /// Names of the files in the directory.
    fn list(&self) -> io::Result<Vec<String>>;
    /// Opens an existing file.
    fn open(&self, name: &str, writable: bool) -> io::Result<Self::File>;
    /// Creates a new, empty file (or truncates an existing one).
    fn create(&self, name: &str) -> io::Result<Self::File>;
    /// Renames a file, replacing `to` if it exists.
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes a file.
    fn remove(&self, name: &str) -> io::Result<()>;
    /// Makes creations, renames and removals durable.
    fn sync_dir(&self) -> io::Result<()>;
    /// Where the directory is, for messages.
    fn describe(&self) -> String;
    /// How long a write another process has in flight may take to become
    /// whole to a reader: a record that does not verify at the tail of a
    /// live log is read again after this long before it counts as torn.
    fn write_settle_time(&self) -> Duration {
        Duration::from_millis(10)
    }
}

/// An open log file.
pub trait LogFile: Send + Sync {
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Reads up to `buf.len()` bytes at `offset`; short only at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `bufs`, one after another, starting at `offset`.
    fn write_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()>;
    /// Makes the file at least `len` bytes long, with the space reserved.
    fn allocate(&self, len: u64) -> io::Result<()>;
    /// Makes `offset..offset+len` read as zeroes, keeping the file's length.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Sets the file's length.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data durable (fdatasync). An error is fatal for the
    /// caller: after a failed fdatasync the kernel may have dropped the dirty
    /// pages, so retrying would report success for data that is gone.
    fn sync_data(&self) -> io::Result<()>;
    /// Starts writing `offset..offset+len` to the device without waiting
    /// for it (`sync_file_range` WRITE), so a later
    /// [`LogFile::sync_data`] has less left to wait for. It makes nothing
    /// durable: only `sync_data` does. The default does nothing.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// A second handle to the same file, e.g. to sync it without holding
    /// the appender's lock.
    fn try_clone(&self) -> io::Result<Self>
    where
        Self: Sized;

    /// Makes `offset..offset+len` read as zeroes and gives the space back
    /// where the file can (a punched hole), keeping the file's length. A
    /// file that keeps no holes zeroes the range as
    /// [`LogFile::zero_range`] does: the bytes are the same either way.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)
    }

    /// Whether `offset..offset+len` surely reads as zeroes without being
    /// stored (a hole), so a reader may skip reading it. `false` means
    /// unknown: read it.
    fn is_hole(&self, _offset: u64, _len: u64) -> bool {
        false
    }

    /// Copies `len` bytes at `offset` of this file to `to_offset` of `to`;
    /// a file that ends before is `UnexpectedEof`. Through a buffer here;
    /// a file system's file copies within the kernel, the bytes never
    /// crossing into the process (`copy_file_range(2)`). Durable as a
    /// write is: after `to`'s [`sync_data`](LogFile::sync_data).
    fn copy_to(&self, offset: u64, to: &Self, to_offset: u64, len: u64) -> io::Result<()>
    where
        Self: Sized,
    {
        copy_through_buffer(self, offset, to, to_offset, len)
    }

    /// Reads exactly `buf.len()` bytes at `offset` or as many as exist;
    /// returns how many were read.
    fn read_full_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

/// [`LogFile::copy_to`] by reading into a buffer and writing it out.
fn copy_through_buffer<F: LogFile>(
    from: &F,
    offset: u64,
    to: &F,
    to_offset: u64,
    len: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        if from.read_full_at(&mut buf[..n], offset + done)? < n {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        to.write_all_at(&[&buf[..n]], to_offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The mode of every file Tidemark creates that holds disk data or state.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// The mode of every directory Tidemark creates for such files.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Open options that create a file of mode [`PRIVATE_FILE_MODE`]; the
/// caller adds read, write, create, truncate as it needs. An existing file
/// keeps its mode.
pub fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(PRIVATE_FILE_MODE);
    options
}

/// Creates `path` and every missing parent with mode [`PRIVATE_DIR_MODE`];
/// directories that exist keep their mode (an admin may have opened one to
/// a group on purpose).
pub fn create_private_dir_all(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(path)
}

/// A real directory on a filesystem.
#[derive(Debug, Clone)]
pub struct FsDir {
    path: PathBuf,
}

impl FsDir {
    /// Uses `path`, creating it (and its parents) if needed, private
    /// ([`create_private_dir_all`]).
    pub fn create_all(path: &Path) -> io::Result<FsDir> {
        create_private_dir_all(path)?;
        Ok(FsDir {
            path: path.to_path_buf(),
        })
    }

    /// Uses an existing directory.
    pub fn existing(path: &Path) -> io::Result<FsDir> {
        if !std::fs::metadata(path)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", path.display()),
            ));
        }
        Ok(FsDir {
            path: path.to_path_buf(),
        })
    }

    /// Uses `path`, which need not exist yet: until it does, opening a
    /// file in it fails as not found (a directory another process creates
    /// when it has something to say, e.g. a running test failover's).
    pub fn at(path: &Path) -> FsDir {
        FsDir {
            path: path.to_path_buf(),
        }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl LogDir for FsDir {
    type File = FsFile;

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let entry = entry?;
            if let Ok(name) = entry.file_name().into_string() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn open(&self, name: &str, writable: bool) -> io::Result<FsFile> {
        let path = self.path.join(name);
        // Anything but a regular file under a log file's name (a directory,
        // a device) is named, not opened: "Is a directory" alone does not
        // say which.
        let kind = std::fs::metadata(&path)?.file_type();
        if !kind.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is {}, not a log file",
                    path.display(),
                    if kind.is_dir() {
                        "a directory"
                    } else {
                        "not a regular file"
                    }
                ),
            ));
        }
        let file = OpenOptions::new().read(true).write(writable).open(&path)?;
        Ok(FsFile { file })
    }

    fn create(&self, name: &str) -> io::Result<FsFile> {
        let file = private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.path.join(name))?;
        Ok(FsFile { file })
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.path.join(from), self.path.join(to))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        std::fs::remove_file(self.path.join(name))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.path)?.sync_all()
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// A file of an [`FsDir`].
#[derive(Debug)]
pub struct FsFile {
    file: File,
}

impl LogFile for FsFile {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(&self.file, buf, offset)
    }

    fn write_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        // One pwritev per record (header and payload together): half the
        // system calls of a write per buffer, and the page cache sees one
        // contiguous write. Short writes continue where they stopped.
        let mut skip = 0usize; // bytes of `bufs` already written
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        while skip < total {
            let mut left = skip;
            let slices: Vec<io::IoSlice<'_>> = bufs
                .iter()
                .filter_map(|b| {
                    if left >= b.len() {
                        left -= b.len();
                        None
                    } else {
                        let s = io::IoSlice::new(&b[left..]);
                        left = 0;
                        Some(s)
                    }
                })
                .collect();
            let at = offset + skip as u64;
            let at = i64::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            match nix::sys::uio::pwritev(&self.file, &slices, at) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => skip += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }

    /// `copy_file_range(2)`: the kernel copies from page cache to page
    /// cache (or shares the blocks, where the file system can). Where it
    /// cannot (another file system, an old kernel) the bytes go through a
    /// buffer.
    fn copy_to(&self, offset: u64, to: &FsFile, to_offset: u64, len: u64) -> io::Result<()> {
        let offset_of =
            |o: u64| i64::try_from(o).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
        let mut done = 0u64;
        while done < len {
            let mut from_at = offset_of(offset + done)?;
            let mut to_at = offset_of(to_offset + done)?;
            let n = (len - done).min(1 << 30) as usize;
            match nix::fcntl::copy_file_range(
                &self.file,
                Some(&mut from_at),
                &to.file,
                Some(&mut to_at),
                n,
            ) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n as u64,
                Err(nix::errno::Errno::EINTR) => {}
                Err(
                    nix::errno::Errno::EXDEV
                    | nix::errno::Errno::ENOSYS
                    | nix::errno::Errno::EOPNOTSUPP
                    | nix::errno::Errno::EINVAL,
                ) => {
                    return copy_through_buffer(
                        self,
                        offset + done,
                        to,
                        to_offset + done,
                        len - done,
                    )
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        let len = i64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        match nix::fcntl::fallocate(&self.file, nix::fcntl::FallocateFlags::empty(), 0, len) {
            Ok(()) => Ok(()),
            // Filesystems without fallocate (tmpfs before 3.5, some FUSE):
            // a sparse length is the best that can be had.
            Err(nix::errno::Errno::EOPNOTSUPP) => {
                if self.size()? < len as u64 {
                    self.file.set_len(len as u64)?;
                }
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::zero::zero_range(&self.file, offset, len, crate::zero::Zeroes::Allocated)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::zero::zero_range(&self.file, offset, len, crate::zero::Zeroes::Hole)
    }

    /// Per `SEEK_DATA` ([`crate::zero::is_hole`]).
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        crate::zero::is_hole(&self.file, offset, len)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: the descriptor is this file's own and stays open for the
        // call; sync_file_range reads no memory of ours.
        let r = unsafe {
            nix::libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                nix::libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if r == 0 {
            return Ok(());
        }
        match io::Error::last_os_error() {
            // Filesystems that cannot start it early (some FUSE): the
            // sync does all the work, as it would have anyway.
            e if e.raw_os_error() == Some(nix::libc::ENOSYS)
                || e.raw_os_error() == Some(nix::libc::EOPNOTSUPP) =>
            {
                Ok(())
            }
            e => Err(e),
        }
    }

    fn try_clone(&self) -> io::Result<FsFile> {
        Ok(FsFile {
            file: self.file.try_clone()?,
        })
    }
}

/// One file of a [`SimDir`]: what was written, and what would survive a
/// power cut.
#[derive(Debug, Clone, Default)]
pub struct SimFileState {
    /// Content as the writer sees it.
    pub written: Vec<u8>,
    /// Content as of the last completed sync.
    pub durable: Vec<u8>,
}

#[derive(Debug, Default)]
struct SimState {
    files: BTreeMap<u64, SimFileState>,
    next_id: u64,
    /// Directory entries as the writer sees them.
    names: BTreeMap<String, u64>,
    /// Directory entries as of the last directory sync.
    durable_names: BTreeMap<String, u64>,
    syncs: u64,
    /// Writebacks started ([`LogFile::start_writeback`]); none makes
    /// anything durable.
    writebacks: u64,
    power_cut_at_sync: Option<u64>,
    power_lost: bool,
}

/// An in-memory directory that models a crash: file data becomes durable
/// only at `sync_data`, directory changes only at `sync_dir`. It can be told
/// to lose power at its n-th sync (counting both kinds); from then on every
/// operation fails, and [`SimDir::durable_files`] and [`SimDir::files`] show
/// what a restart could find.
#[derive(Debug, Clone, Default)]
pub struct SimDir {
    state: Arc<Mutex<SimState>>,
}

fn power_lost() -> io::Error {
    io::Error::other("simulated power loss")
}

impl SimDir {
    /// An empty directory.
    pub fn new() -> SimDir {
        SimDir::default()
    }

    /// A directory holding `files`, all of it durable (a restart after a
    /// crash).
    pub fn from_files(files: BTreeMap<String, Vec<u8>>) -> SimDir {
        let dir = SimDir::new();
        {
            let mut s = dir.lock();
            for (name, content) in files {
                let id = s.next_id;
                s.next_id += 1;
                s.files.insert(
                    id,
                    SimFileState {
                        written: content.clone(),
                        durable: content,
                    },
                );
                s.names.insert(name.clone(), id);
                s.durable_names.insert(name, id);
            }
        }
        dir
    }

    /// Loses power when the `n`-th sync (1-based) is attempted: that sync
    /// and everything after it fail.
    pub fn cut_power_at_sync(&self, n: u64) {
        self.lock().power_cut_at_sync = Some(n);
    }

    /// Syncs attempted so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Writebacks started so far ([`LogFile::start_writeback`]).
    pub fn writebacks(&self) -> u64 {
        self.lock().writebacks
    }

    /// Files as the writer sees them, with their written and durable
    /// content, for the names a restart would find (durable entries).
    pub fn durable_files(&self) -> BTreeMap<String, SimFileState> {
        let s = self.lock();
        s.durable_names
            .iter()
            .map(|(name, id)| (name.clone(), s.files[id].clone()))
            .collect()
    }

    /// What a restart finds if nothing unsynced survived the power cut:
    /// the durable entries, each with its durable content.
    pub fn after_power_cut(&self) -> BTreeMap<String, Vec<u8>> {
        let s = self.lock();
        s.durable_names
            .iter()
            .map(|(name, id)| (name.clone(), s.files[id].durable.clone()))
            .collect()
    }

    /// Current content of every file as the writer sees it.
    pub fn files(&self) -> BTreeMap<String, Vec<u8>> {
        let s = self.lock();
        s.names
            .iter()
            .map(|(name, id)| (name.clone(), s.files[id].written.clone()))
            .collect()
    }

    /// Replaces a file's content (written and durable), for damage tests.
    pub fn put(&self, name: &str, content: Vec<u8>) {
        let mut s = self.lock();
        let id = match s.names.get(name) {
            Some(id) => *id,
            None => {
                let id = s.next_id;
                s.next_id += 1;
                s.names.insert(name.to_string(), id);
                s.durable_names.insert(name.to_string(), id);
                id
            }
        };
        s.files.insert(
            id,
            SimFileState {
                written: content.clone(),
                durable: content,
            },
        );
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> io::Result<MutexGuard<'_, SimState>> {
        let s = self.lock();
        if s.power_lost {
            return Err(power_lost());
        }
        Ok(s)
    }

    fn count_sync(s: &mut SimState) -> io::Result<()> {
        s.syncs += 1;
        if s.power_cut_at_sync == Some(s.syncs) {
            s.power_lost = true;
            return Err(power_lost());
        }
        Ok(())
    }
}

impl LogDir for SimDir {
    type File = SimFile;

    fn list(&self) -> io::Result<Vec<String>> {
        Ok(self.live()?.names.keys().cloned().collect())
    }

    fn open(&self, name: &str, _writable: bool) -> io::Result<SimFile> {
        let s = self.live()?;
        let id = *s
            .names
            .get(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(SimFile {
            dir: self.clone(),
            id,
        })
    }

    fn create(&self, name: &str) -> io::Result<SimFile> {
        let mut s = self.live()?;
        let id = s.next_id;
        s.next_id += 1;
        s.files.insert(id, SimFileState::default());
        s.names.insert(name.to_string(), id);
        Ok(SimFile {
            dir: self.clone(),
            id,
        })
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut s = self.live()?;
        let id = s
            .names
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        s.names.insert(to.to_string(), id);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let mut s = self.live()?;
        s.names
            .remove(name)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(())
    }

    fn sync_dir(&self) -> io::Result<()> {
        let mut s = self.live()?;
        SimDir::count_sync(&mut s)?;
        s.durable_names = s.names.clone();
        Ok(())
    }

    fn describe(&self) -> String {
        "<simulated directory>".to_string()
    }

    /// Writes to a simulated file are whole the moment they return.
    fn write_settle_time(&self) -> Duration {
        Duration::ZERO
    }
}

/// A file of a [`SimDir`].
#[derive(Debug, Clone)]
pub struct SimFile {
    dir: SimDir,
    id: u64,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut SimFileState) -> T) -> io::Result<T> {
        let mut s = self.dir.live()?;
        let file = s
            .files
            .get_mut(&self.id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(f(file))
    }
}

impl LogFile for SimFile {
    fn size(&self) -> io::Result<u64> {
        self.with(|f| f.written.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.with(|f| {
            let start = (offset as usize).min(f.written.len());
            let n = buf.len().min(f.written.len() - start);
            buf[..n].copy_from_slice(&f.written[start..start + n]);
            n
        })
    }

    fn write_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.with(|f| {
            let mut at = offset as usize;
            for buf in bufs {
                if f.written.len() < at + buf.len() {
                    f.written.resize(at + buf.len(), 0);
                }
                f.written[at..at + buf.len()].copy_from_slice(buf);
                at += buf.len();
            }
        })
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        self.with(|f| {
            if (f.written.len() as u64) < len {
                f.written.resize(len as usize, 0);
            }
        })
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        self.with(|f| {
            let end = ((offset + len) as usize).min(f.written.len());
            let start = (offset as usize).min(end);
            f.written[start..end].fill(0);
        })
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.with(|f| f.written.resize(len as usize, 0))
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut s = self.dir.live()?;
        SimDir::count_sync(&mut s)?;
        let file = s
            .files
            .get_mut(&self.id)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        file.durable = file.written.clone();
        Ok(())
    }

    /// Counted, and nothing more: what is written becomes durable at
    /// `sync_data` only, writeback started or not.
    fn start_writeback(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.dir.live()?.writebacks += 1;
        Ok(())
    }

    fn try_clone(&self) -> io::Result<SimFile> {
        Ok(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starting a writeback changes nothing a reader sees, on a real file
    /// and a simulated one, and makes nothing durable on the simulated
    /// one: only the sync does.
    #[test]
    fn a_started_writeback_keeps_the_bytes_and_makes_nothing_durable() {
        let tmp = tempfile::tempdir().unwrap();
        let fs = FsDir::existing(tmp.path()).unwrap();
        let sim = SimDir::new();
        let real = fs.create("f").unwrap();
        let simulated = sim.create("f").unwrap();
        for file in [&real as &dyn LogFile, &simulated] {
            file.write_all_at(&[&[7u8; 8192]], 4096).unwrap();
            file.start_writeback(4096, 8192).unwrap();
            let mut got = vec![0u8; 8192];
            assert_eq!(file.read_full_at(&mut got, 4096).unwrap(), 8192);
            assert!(got.iter().all(|b| *b == 7));
        }
        assert_eq!(sim.writebacks(), 1);
        assert_eq!(sim.syncs(), 0, "no sync yet");
        sim.sync_dir().unwrap();
        assert!(sim.durable_files()["f"].durable.is_empty());
    }

    /// A punched hole reads as zeroes, keeps the length and is known to
    /// be a hole; a zeroed range reads the same; data is no hole. A file
    /// that keeps no holes (simulated) zeroes the same bytes and never
    /// claims a hole.
    #[test]
    fn a_punched_hole_reads_as_zeroes_and_is_known_as_one() {
        const LEN: u64 = 256 << 10;
        let tmp = tempfile::tempdir().unwrap();
        let fs = FsDir::existing(tmp.path()).unwrap();
        let sim = SimDir::new();
        let data = vec![7u8; LEN as usize];
        let mut want = data.clone();
        want[64 << 10..128 << 10].fill(0);
        want[160 << 10..192 << 10].fill(0);

        let real = fs.create("f").unwrap();
        let simulated = sim.create("f").unwrap();
        for file in [&real as &dyn LogFile, &simulated] {
            file.write_all_at(&[&data], 0).unwrap();
            file.punch_hole(64 << 10, 64 << 10).unwrap();
            file.zero_range(160 << 10, 32 << 10).unwrap();
            let mut got = vec![1u8; LEN as usize];
            assert_eq!(file.read_full_at(&mut got, 0).unwrap(), LEN as usize);
            assert!(got == want);
            assert_eq!(file.size().unwrap(), LEN);
            assert!(!file.is_hole(0, 4096));
            assert!(!file.is_hole(60 << 10, 8 << 10));
        }
        // Filesystems without holes (tmpfs before 3.5) write zeroes: only
        // claim a hole where the filesystem says so.
        if real.is_hole(64 << 10, 64 << 10) {
            assert!(!real.is_hole(64 << 10, 65 << 10));
        }
        assert!(!simulated.is_hole(64 << 10, 64 << 10));
    }

    /// A directory that does not exist yet: its files are not found until
    /// it does.
    #[test]
    fn a_directory_used_before_it_exists_finds_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("later");
        let dir = FsDir::at(&path);
        let err = dir.open("pin", false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        create_private_dir_all(&path).unwrap();
        std::fs::write(path.join("pin"), b"12\n").unwrap();
        let file = dir.open("pin", false).unwrap();
        assert_eq!(file.size().unwrap(), 3);
    }

    /// A copy between two files of a directory lands the source's bytes
    /// at the target's offset (the kernel's copy on a file system, a
    /// buffer's in the simulation), leaves the rest alone, and a source
    /// that ends before the range does is an error.
    #[test]
    fn a_copy_between_files_lands_the_bytes_and_refuses_a_short_source() {
        fn check<D: LogDir>(dir: &D) {
            let source: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
            let from = dir.create("from").unwrap();
            from.write_all_at(&[&source], 0).unwrap();
            let to = dir.create("to").unwrap();
            to.write_all_at(&[&[9u8; 4 << 20]], 0).unwrap();
            from.copy_to(12_345, &to, 777, (2 << 20) + 3).unwrap();
            let mut got = vec![0u8; 4 << 20];
            assert_eq!(to.read_full_at(&mut got, 0).unwrap(), 4 << 20);
            let mut want = vec![9u8; 4 << 20];
            want[777..777 + (2 << 20) + 3].copy_from_slice(&source[12_345..12_345 + (2 << 20) + 3]);
            assert!(got == want, "{}", dir.describe());
            let err = from.copy_to((3 << 20) - 10, &to, 0, 20).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        }
        let tmp = tempfile::tempdir().unwrap();
        check(&FsDir::existing(tmp.path()).unwrap());
        check(&SimDir::new());
    }
}
