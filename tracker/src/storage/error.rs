//! The one error type of the storage layer, and its mapping to the errno
//! a frontend tells its client (the NBD protocol's error values are the
//! same numbers as Linux's errno for every value given here).

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The operation a request asked the backing device to perform.
///
/// Carried by errors so that the NBD layer (and a person reading a log line)
/// can tell a failed read from a failed write without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `read_at`.
    Read,
    /// `write_at`.
    Write,
    /// `write_zeroes`.
    WriteZeroes,
    /// `trim`.
    Trim,
    /// `flush`.
    Flush,
}

impl Op {
    /// Whether the operation changes the contents of the device.
    pub fn modifies(self) -> bool {
        matches!(self, Op::Write | Op::WriteZeroes | Op::Trim)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::WriteZeroes => "write-zeroes",
            Op::Trim => "trim",
            Op::Flush => "flush",
        })
    }
}

/// Everything that can go wrong between the tracker and its backing device.
///
/// Each variant says whose fault it was: the *peer* (a request the client
/// should not have sent), the *configuration* (the wrong path, a device that
/// cannot do what was asked), or the *local disk* (the kernel reported an
/// I/O failure).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The backing path could not be opened or probed (configuration, or
    /// the local disk if probing itself failed).
    #[error("cannot open backing device {}", path.display())]
    Open {
        /// The path that was given.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// The backing path is neither a regular file nor a block device
    /// (configuration).
    #[error("{} is neither a regular file nor a block device", path.display())]
    UnsupportedKind {
        /// The path that was given.
        path: PathBuf,
    },

    /// Direct I/O was required by the configuration but the device or
    /// filesystem cannot do it (configuration).
    #[error("direct I/O is required but unavailable for {}: {reason}", path.display())]
    DirectIoUnavailable {
        /// The path that was given.
        path: PathBuf,
        /// Why O_DIRECT could not be used.
        reason: String,
    },

    /// The io_uring engine was required but could not be started, e.g. the
    /// kernel is too old or io_uring is disabled by sysctl or seccomp
    /// (configuration).
    #[error("the io_uring engine is unavailable")]
    EngineUnavailable {
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// A request reached past the end of the device, or its offset plus length
    /// overflowed (peer).
    #[error("{op} of {len} bytes at offset {offset} is outside the device of {size} bytes")]
    OutOfRange {
        /// The requested operation.
        op: Op,
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Size of the device in bytes.
        size: u64,
    },

    /// A modifying request reached a device opened read-only (peer, or
    /// configuration if the export should have been writable).
    #[error("{op} refused: the backing device is open read-only")]
    ReadOnly {
        /// The requested operation.
        op: Op,
    },

    /// The kernel failed a read, write, write-zeroes or trim (local disk).
    #[error("{op} of {len} bytes at offset {offset} failed on the backing device")]
    Io {
        /// The requested operation.
        op: Op,
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// The kernel failed to make the device durable (local disk). Fatal:
    /// writes acknowledged before it may be lost, and the engine refuses every
    /// later flush (see [`StorageError::Poisoned`]).
    #[error("flush of the backing device failed")]
    Flush {
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// An earlier flush failed, so nothing written since the last successful
    /// flush is known to be durable. A later `fdatasync` returning success
    /// would prove nothing (the kernel may have dropped the dirty pages), so
    /// the engine never retries; the disk needs an administrator and a resync
    /// (local disk).
    #[error("an earlier flush of the backing device failed; durability is unknown")]
    Poisoned,

    /// The backing device's current size could not be read (local disk).
    #[error("cannot read the size of backing device {}", path.display())]
    Measure {
        /// The backing device.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },

    /// The device was asked to serve more bytes than its backing holds, or
    /// its engine cannot grow while open (the caller's fault).
    #[error("{} cannot be served at {size} bytes: it holds {backing}", path.display())]
    GrowBeyond {
        /// The backing device.
        path: PathBuf,
        /// The size asked for.
        size: u64,
        /// What the backing holds (for an engine that cannot grow, its size).
        backing: u64,
    },

    /// The new size is not a multiple of the device's direct-I/O alignment:
    /// its last block could not be written without growing it further
    /// (configuration: grow the backing to a multiple of the alignment).
    #[error("{} grew to {size} bytes, not a multiple of its direct-I/O alignment of {align} bytes", path.display())]
    GrowUnaligned {
        /// The backing device.
        path: PathBuf,
        /// Its new size.
        size: u64,
        /// The alignment.
        align: u64,
    },
}

impl StorageError {
    /// The errno a frontend tells its client for this error: one of
    /// `EPERM`, `EIO`, `ENOMEM`, `EINVAL`, `ENOSPC` (Linux's numbers, which
    /// the NBD protocol's error values share).
    ///
    /// Follows the NBD protocol's advice: a write past the end is `ENOSPC`, any
    /// other out-of-range request `EINVAL`; a refused write is `EPERM`. Kernel
    /// errors are mapped by errno (`ENOSPC`, `EDQUOT`, `EFBIG` → `ENOSPC`;
    /// `EPERM`, `EACCES`, `EROFS` → `EPERM`; `ENOMEM` → `ENOMEM`). Everything
    /// else, including a kernel `EINVAL` (the request was already validated,
    /// so that would be our fault or the disk's, not the client's), is `EIO`.
    pub fn errno(&self) -> u32 {
        match self {
            StorageError::OutOfRange { op, .. } => match op {
                Op::Write | Op::WriteZeroes => libc::ENOSPC as u32,
                Op::Read | Op::Trim | Op::Flush => libc::EINVAL as u32,
            },
            StorageError::ReadOnly { .. } => libc::EPERM as u32,
            StorageError::Io { source, .. }
            | StorageError::Flush { source }
            | StorageError::Open { source, .. }
            | StorageError::EngineUnavailable { source }
            | StorageError::Measure { source, .. } => errno_of(source),
            StorageError::UnsupportedKind { .. }
            | StorageError::GrowBeyond { .. }
            | StorageError::GrowUnaligned { .. }
            | StorageError::DirectIoUnavailable { .. }
            | StorageError::Poisoned => libc::EIO as u32,
        }
    }
}

fn errno_of(error: &io::Error) -> u32 {
    match error.raw_os_error() {
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => libc::ENOSPC as u32,
        Some(libc::EPERM | libc::EACCES | libc::EROFS) => libc::EPERM as u32,
        Some(libc::ENOMEM) => libc::ENOMEM as u32,
        _ => libc::EIO as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(errno: i32) -> StorageError {
        StorageError::Io {
            op: Op::Write,
            offset: 0,
            len: 1,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn kernel_errors_map_to_nbd_errno() {
        assert_eq!(io(libc::ENOSPC).errno(), 28);
        assert_eq!(io(libc::EDQUOT).errno(), 28);
        assert_eq!(io(libc::EFBIG).errno(), 28);
        assert_eq!(io(libc::EROFS).errno(), 1);
        assert_eq!(io(libc::EACCES).errno(), 1);
        assert_eq!(io(libc::EIO).errno(), 5);
        assert_eq!(io(libc::EINVAL).errno(), 5);
        assert_eq!(io(libc::ENOMEM).errno(), 12);
    }

    #[test]
    fn out_of_range_is_enospc_for_writes_and_einval_otherwise() {
        let oor = |op| StorageError::OutOfRange {
            op,
            offset: 10,
            len: 10,
            size: 15,
        };
        assert_eq!(oor(Op::Write).errno(), 28);
        assert_eq!(oor(Op::WriteZeroes).errno(), 28);
        assert_eq!(oor(Op::Read).errno(), 22);
        assert_eq!(oor(Op::Trim).errno(), 22);
        assert_eq!(StorageError::ReadOnly { op: Op::Write }.errno(), 1);
        assert_eq!(StorageError::Poisoned.errno(), 5);
    }

    #[test]
    fn source_is_kept_not_repeated() {
        let e = io(libc::EIO);
        let shown = e.to_string();
        assert!(!shown.contains("Input/output"), "{shown}");
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("Input/output")));
    }
}
