//! One process per directory: an exclusive `flock(2)` on a lock file in the
//! directory, taken before anything else in it is read or written and held
//! for as long as the [`DirLock`] lives (the kernel drops it when the
//! process dies, so a crash never leaves a stale lock behind).
//!
//! The tracker holds `tracker.lock` in its log directory, the shipper
//! `shipper.lock` in the same directory (it owns the cursor and its status
//! file there), the receiver `receiver.lock` in its data directory. The
//! lock file holds the pid of its holder, in decimal, so the second process
//! can say who is in its way.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock: the directory is in use.
    #[error(
        "{dir} is in use by another {owner}{}: one {owner} per directory (its lock is {})",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        lock.display()
    )]
    Held {
        /// The directory.
        dir: PathBuf,
        /// What kind of process owns it (`tracker`, `shipper`, `receiver`).
        owner: &'static str,
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid, if it could be read.
        pid: Option<u32>,
    },
    /// The lock file could not be created, opened or locked (local disk or
    /// permissions).
    #[error("lock file {path}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// An exclusive lock on a directory, released when dropped.
#[derive(Debug)]
pub struct DirLock {
    _file: Flock<File>,
    path: PathBuf,
}

impl DirLock {
    /// Locks `dir` through its lock file `name` (created 0600 if missing)
    /// without waiting, and writes this process's pid into it. `owner`
    /// names the kind of process in the error a second one gets. The
    /// directory must exist.
    pub fn acquire(dir: &Path, name: &str, owner: &'static str) -> Result<DirLock, LockError> {
        let path = dir.join(name);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = crate::dir::private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    owner,
                    pid: read_pid(&mut file),
                    lock: path,
                })
            }
            Err((_, errno)) => return Err(io_err(io::Error::from(errno))),
        };
        // The pid is only for messages: the flock is the lock.
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(io_err)?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid_until_the_first_goes() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "x.lock", "tracker").unwrap();
        let mode = std::fs::metadata(first.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // flock locks belong to an open file: a second open in the same
        // process conflicts just as another process would.
        match DirLock::acquire(dir.path(), "x.lock", "tracker") {
            Err(e @ LockError::Held { .. }) => {
                let message = e.to_string();
                assert!(
                    message.contains(&format!("pid {}", std::process::id()))
                        && message.contains("another tracker")
                        && message.contains(&dir.path().display().to_string()),
                    "{message}"
                );
            }
            other => panic!("expected Held, got {other:?}"),
        }
        // Another name is another lock.
        DirLock::acquire(dir.path(), "y.lock", "shipper").unwrap();
        drop(first);
        DirLock::acquire(dir.path(), "x.lock", "tracker").unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_io_error_naming_the_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = DirLock::acquire(&dir.path().join("absent"), "x.lock", "tracker").unwrap_err();
        assert!(matches!(err, LockError::Io { ref path, .. } if path.ends_with("absent/x.lock")));
    }
}
