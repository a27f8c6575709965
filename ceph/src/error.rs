//! Why a call into the cluster failed: librados/librbd's `-errno` results,
//! classed once here, each with the name of the call that returned it.
//!
//! The classes that matter to a store are the fences: [`CephError::Busy`]
//! and [`CephError::Canceled`] on a guarded operation mean another owner has
//! moved on, [`CephError::Blocklisted`] means this client was fenced out of
//! the cluster. [`CephError::is_fenced`] tells them apart from failures that
//! a retry or an operator can fix.

/// `ENOENT`.
const ENOENT: i32 = 2;
/// `EIO`.
const EIO: i32 = 5;
/// `EBUSY`.
const EBUSY: i32 = 16;
/// `EEXIST`.
const EEXIST: i32 = 17;
/// `EINVAL`.
const EINVAL: i32 = 22;
/// `ENOSPC`.
const ENOSPC: i32 = 28;
/// `EROFS`.
const EROFS: i32 = 30;
/// `ERANGE`.
const ERANGE: i32 = 34;
/// `ESHUTDOWN`: Ceph's `EBLOCKLISTED`.
const ESHUTDOWN: i32 = 108;
/// `ETIMEDOUT`.
const ETIMEDOUT: i32 = 110;
/// `EDQUOT`.
const EDQUOT: i32 = 122;
/// `ECANCELED`.
const ECANCELED: i32 = 125;

/// Why a call into the cluster failed. `op` names the C function (or the
/// step of a compound operation) that reported it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CephError {
    /// Cluster state: the object, image, namespace, lock or lock holder does
    /// not exist (`ENOENT`). A lock renewal with "must renew" answers this
    /// once the lock has expired, even if nobody else took it.
    #[error("{op}: not found")]
    NotFound {
        /// The call.
        op: &'static str,
    },
    /// Cluster state: an exclusive create found the object or image, or an
    /// exclusive lock is already held by this very client and cookie (`EEXIST`).
    #[error("{op}: already exists")]
    Exists {
        /// The call.
        op: &'static str,
    },
    /// Another owner: a lock is held by someone else, or a guarded operation's
    /// `assert_locked` step found the lock not ours (`EBUSY`).
    #[error("{op}: held by another client (or our lock is gone)")]
    Busy {
        /// The call.
        op: &'static str,
    },
    /// Another owner: a compare-xattr guard of a compound operation failed,
    /// also when the attribute does not exist (`ECANCELED`). Nothing of the
    /// operation was applied.
    #[error("{op}: a compare guard failed; nothing was applied")]
    Canceled {
        /// The call.
        op: &'static str,
    },
    /// Fenced: this client instance is on the cluster's blocklist
    /// (`ESHUTDOWN`, Ceph's `EBLOCKLISTED`); no operation of it will ever
    /// succeed again. Reconnect as a new instance.
    #[error("{op}: this client is blocklisted (fenced by another owner)")]
    Blocklisted {
        /// The call.
        op: &'static str,
    },
    /// Cluster: the operation did not complete within the configured op
    /// timeout (`ETIMEDOUT`). It may still be applied later.
    #[error("{op}: timed out waiting for the cluster")]
    TimedOut {
        /// The call.
        op: &'static str,
    },
    /// Another owner: an RBD write without the image's exclusive lock
    /// (`EROFS`), or a write through an image opened read-only.
    #[error("{op}: image is read-only here (its exclusive lock is not ours)")]
    ReadOnly {
        /// The call.
        op: &'static str,
    },
    /// Cluster: the pool is full or over its quota (`ENOSPC`, `EDQUOT`).
    #[error("{op}: pool full (errno {errno})")]
    Full {
        /// The call.
        op: &'static str,
        /// `ENOSPC` or `EDQUOT`.
        errno: i32,
    },
    /// Local: a buffer was too short for the answer (`ERANGE`).
    #[error("{op}: buffer too short")]
    Range {
        /// The call.
        op: &'static str,
    },
    /// Any other `-errno` from the cluster or the library.
    #[error("{op}: {}", std::io::Error::from_raw_os_error(*errno))]
    Other {
        /// The call.
        op: &'static str,
        /// The positive errno.
        errno: i32,
    },
    /// Caller: a name, key or value passed as a C string holds a NUL byte.
    #[error("{op}: {what} contains a NUL byte")]
    Nul {
        /// The call.
        op: &'static str,
        /// Which argument.
        what: &'static str,
    },
    /// Installation: the loaded library's ABI major is not the one
    /// the hand-declared bindings are written for.
    #[error("{library} {major}.{minor}.{extra} is loaded, but Tidemark is built for ABI major {expected}")]
    Version {
        /// `librados` or `librbd`.
        library: &'static str,
        /// Loaded major version.
        major: i32,
        /// Loaded minor version.
        minor: i32,
        /// Loaded extra version.
        extra: i32,
        /// The major the declarations are for.
        expected: i32,
    },
    /// Simulation: the simulated cluster reached its cut point (a crash test
    /// stopped the world there); no operation is applied from here on.
    #[error("{op}: simulated crash (operation {index} and later are cut)")]
    Cut {
        /// The call.
        op: &'static str,
        /// The cut point: the number of mutating operations that were applied.
        index: u64,
    },
}

impl CephError {
    /// Classes a C result: `Ok(ret)` when `ret >= 0`, else the error of `-ret`.
    pub fn check(op: &'static str, ret: i64) -> Result<u64, CephError> {
        if ret >= 0 {
            Ok(ret as u64)
        } else {
            let errno = ret
                .checked_neg()
                .and_then(|e| i32::try_from(e).ok())
                .unwrap_or(EIO);
            Err(Self::from_errno(op, errno))
        }
    }

    /// Classes a positive errno reported by `op`.
    pub fn from_errno(op: &'static str, errno: i32) -> CephError {
        match errno {
            ENOENT => Self::NotFound { op },
            EEXIST => Self::Exists { op },
            EBUSY => Self::Busy { op },
            ECANCELED => Self::Canceled { op },
            ESHUTDOWN => Self::Blocklisted { op },
            ETIMEDOUT => Self::TimedOut { op },
            EROFS => Self::ReadOnly { op },
            ENOSPC | EDQUOT => Self::Full { op, errno },
            ERANGE => Self::Range { op },
            _ => Self::Other { op, errno },
        }
    }

    /// The positive errno this error stands for (`EINVAL` for a NUL byte,
    /// `EIO` for a version mismatch or a simulated crash).
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound { .. } => ENOENT,
            Self::Exists { .. } => EEXIST,
            Self::Busy { .. } => EBUSY,
            Self::Canceled { .. } => ECANCELED,
            Self::Blocklisted { .. } => ESHUTDOWN,
            Self::TimedOut { .. } => ETIMEDOUT,
            Self::ReadOnly { .. } => EROFS,
            Self::Full { errno, .. } | Self::Other { errno, .. } => *errno,
            Self::Range { .. } => ERANGE,
            Self::Nul { .. } => EINVAL,
            Self::Version { .. } | Self::Cut { .. } => EIO,
        }
    }

    /// The call that failed.
    pub fn op(&self) -> &'static str {
        match self {
            Self::NotFound { op }
            | Self::Exists { op }
            | Self::Busy { op }
            | Self::Canceled { op }
            | Self::Blocklisted { op }
            | Self::TimedOut { op }
            | Self::ReadOnly { op }
            | Self::Full { op, .. }
            | Self::Range { op }
            | Self::Other { op, .. }
            | Self::Nul { op, .. }
            | Self::Cut { op, .. } => op,
            Self::Version { .. } => "version",
        }
    }

    /// Whether the failure means another owner has taken over (a guard or
    /// lock refused us, an image is not writable here) or this client was
    /// fenced. Such a failure is never retried and nothing it covered may be
    /// acknowledged.
    pub fn is_fenced(&self) -> bool {
        matches!(
            self,
            Self::Busy { .. }
                | Self::Canceled { .. }
                | Self::Blocklisted { .. }
                | Self::ReadOnly { .. }
        )
    }

    /// Whether the object, image or lock did not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_round_trips_through_its_class() {
        for errno in [
            ENOENT, EEXIST, EBUSY, ECANCELED, ESHUTDOWN, ETIMEDOUT, EROFS, ENOSPC, EDQUOT, ERANGE,
            1, 95,
        ] {
            let err = CephError::from_errno("rados_x", errno);
            assert_eq!(err.errno(), errno, "{err}");
            assert_eq!(err.op(), "rados_x");
        }
    }

    #[test]
    fn check_passes_counts_and_classes_negative_results() {
        assert_eq!(CephError::check("rbd_read", 4096), Ok(4096));
        assert_eq!(
            CephError::check("rados_write_op_operate", -125),
            Err(CephError::Canceled {
                op: "rados_write_op_operate"
            })
        );
        assert!(CephError::check("rados_stat", -108)
            .unwrap_err()
            .is_fenced());
        assert!(CephError::check("rados_stat", -2)
            .unwrap_err()
            .is_not_found());
        assert!(!CephError::check("rados_stat", -110)
            .unwrap_err()
            .is_fenced());
        // A result that does not fit an errno is an I/O error, not a panic.
        assert_eq!(CephError::check("x", i64::MIN).unwrap_err().errno(), EIO);
    }
}
