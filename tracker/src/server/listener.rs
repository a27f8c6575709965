//! Listening sockets and connected streams, unix or TCP, behind one type
//! each, and the private creation of the unix socket.
//!
//! The NBD socket gives full read and write access to every protected disk,
//! so it must never exist with looser permissions than 0600 (0660 for one
//! named group, when asked), not even for an instant: [`bind_private_unix`]
//! binds it inside a fresh 0700 directory and renames it into place.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix socket at this path (mode 0600).
    Unix(PathBuf),
    /// A TCP address; with port 0 at bind time, the port the kernel chose.
    Tcp(SocketAddr),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// The socket file a unix listener created, recognised by inode so that
/// shutting down never removes a socket another process put there since.
#[derive(Debug)]
pub(crate) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    /// Removes the socket file if it is still the one this server created.
    pub(crate) fn remove(&self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| meta.dev() == self.dev && meta.ino() == self.ino);
        if ours {
            if let Err(error) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), %error, "could not remove the NBD socket");
            }
        }
    }
}

/// A listening socket.
#[derive(Debug)]
pub(crate) enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Binds a TCP listener.
    pub(crate) fn bind_tcp(addr: impl ToSocketAddrs) -> io::Result<(Self, ListenAddr)> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        Ok((Self::Tcp(listener), ListenAddr::Tcp(local)))
    }

    /// Accepts one connection, as a blocking stream.
    pub(crate) fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Self::Unix(listener) => Stream::Unix(listener.accept()?.0),
            Self::Tcp(listener) => {
                let (stream, _) = listener.accept()?;
                // Replies are written whole, header and data in one call;
                // Nagle would only delay the last segment of each.
                stream.set_nodelay(true)?;
                Stream::Tcp(stream)
            }
        };
        stream.set_nonblocking(false)?;
        Ok(stream)
    }

    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Self::Unix(listener) => listener.set_nonblocking(nonblocking),
            Self::Tcp(listener) => listener.set_nonblocking(nonblocking),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Unix(listener) => listener.as_fd(),
            Self::Tcp(listener) => listener.as_fd(),
        }
    }
}

/// A connected stream.
#[derive(Debug)]
pub(crate) enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    /// Another handle to the same socket (socket options are shared).
    pub(crate) fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Unix(stream) => Self::Unix(stream.try_clone()?),
            Self::Tcp(stream) => Self::Tcp(stream.try_clone()?),
        })
    }

    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.shutdown(how),
            Self::Tcp(stream) => stream.shutdown(how),
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.set_read_timeout(timeout),
            Self::Tcp(stream) => stream.set_read_timeout(timeout),
        }
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.set_write_timeout(timeout),
            Self::Tcp(stream) => stream.set_write_timeout(timeout),
        }
    }

    pub(crate) fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Self::Unix(stream) => stream.set_nonblocking(nonblocking),
            Self::Tcp(stream) => stream.set_nonblocking(nonblocking),
        }
    }
}

impl std::os::fd::AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Self::Unix(stream) => stream.as_raw_fd(),
            Self::Tcp(stream) => stream.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.read(buf),
            Self::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.write(buf),
            Self::Tcp(stream) => stream.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Unix(stream) => stream.write_vectored(bufs),
            Self::Tcp(stream) => stream.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Binds a unix socket at `path` that only its owner can connect to, or
/// with `group`, its owner and that group (0660, the group set before the
/// socket is reachable).
///
/// Why not `umask(0o177)` around `bind`: the umask belongs to the whole
/// process, and the tracker may already run other threads (the control
/// socket, log writers, a test harness running tests in parallel) whose
/// files would silently get the wrong mode. Instead the socket is bound
/// inside a fresh directory of mode 0700 next to `path` (same filesystem,
/// so the rename is atomic), chmod-ed to 0600 while nobody else can reach
/// it, and renamed into place. At no moment is it reachable with looser
/// permissions.
///
/// A stale socket at `path` (nobody accepts on it) is removed; a live one
/// is an error ([`io::ErrorKind::AddrInUse`]), so two trackers never share
/// a socket; anything that is not a socket is left alone and is an error
/// ([`io::ErrorKind::AlreadyExists`]). The check and the rename are not one
/// atomic step: a second process binding the same path in between would be
/// replaced, which two trackers configured with one socket deserve.
///
/// The staging path is the parent, a 12-odd byte directory name and `/s`;
/// like `path` itself it must fit the 107 bytes of `sun_path`.
pub(crate) fn bind_private_unix(
    path: &Path,
    group: Option<u32>,
) -> io::Result<(Listener, ListenAddr, SocketFile)> {
    remove_stale_socket(path)?;
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let staging = create_staging_dir(parent).map_err(|error| {
        io::Error::new(
            error.kind(),
            format!(
                "creating a private directory in {} for a socket: {error}",
                parent.display()
            ),
        )
    })?;
    let staged = staging.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&staged)?;
        let mode = match group {
            Some(gid) => {
                std::os::unix::fs::lchown(&staged, None, Some(gid))?;
                0o660
            }
            None => 0o600,
        };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    // Best effort: after a successful rename only the empty directory is
    // left; after a failure the staged socket may be too.
    let _ = std::fs::remove_file(&staged);
    let _ = std::fs::remove_dir(&staging);
    let listener = result.map_err(|error: io::Error| {
        io::Error::new(
            error.kind(),
            format!("binding the socket {}: {error}", path.display()),
        )
    })?;
    let meta = std::fs::symlink_metadata(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((
        Listener::Unix(listener),
        ListenAddr::Unix(path.to_path_buf()),
        file,
    ))
}

/// Clears the way for a new socket at `path`, or says why not.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("{} is served by a running process", path.display()),
        )),
        Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale socket");
            match std::fs::remove_file(path) {
                Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
                _ => Ok(()),
            }
        }
        Err(error) => Err(io::Error::new(
            error.kind(),
            format!(
                "cannot tell whether {} is still in use: {error}",
                path.display()
            ),
        )),
    }
}

/// A new, empty directory of mode 0700 in `parent`, with a short name so
/// the staged socket path stays within `sun_path`.
fn create_staging_dir(parent: &Path) -> io::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let pid = std::process::id();
    let mut builder = std::fs::DirBuilder::new();
    // The umask can only clear bits, so the directory is at most 0700.
    builder.mode(0o700);
    let mut tries = 0;
    loop {
        let attempt = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = parent.join(format!(".tm{pid:x}.{attempt:x}"));
        tries += 1;
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            // Left over by an earlier process with the same pid.
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && tries < 100 => {}
            Err(error) => return Err(error),
        }
    }
}
