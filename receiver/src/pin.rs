//! The pin: a recovery point that retention must not fold while someone
//! outside the receiver reads it (a test failover serving it, a planned
//! failover writing its images). This module is the pin's one owner: it
//! writes it, reads it for the store and removes it.
//!
//! Layout, in the group's directory:
//!
//! ```text
//! test-failover/        0700, owned by the group directory's owner
//! test-failover/lock    flock(2)ed by the pin's holder (its pid, decimal)
//! test-failover/pin     the pinned point's sequence number, in decimal
//! ```
//!
//! Invariants:
//!
//! - Only the holder of `test-failover/lock` ([`PinLock`]) writes or
//!   removes the pin, so one group has at most one pin and one reader of a
//!   pinned point at a time (a test failover and a planned failover of the
//!   same group exclude each other).
//! - The pin is written before the point is opened and removed after the
//!   last read of it, and it is replaced atomically and durably
//!   ([`tidemark_durable::replace()`]): the store reads the old pin, the new
//!   one or none, never a torn number that would let a fold take the point
//!   being read.
//! - While the pin names point `s`, the store folds no point at or after
//!   `s` ([`crate::store::ReplicaGroup::pinned`]). A pin left by a killed
//!   holder keeps its point until `tidemark test-failover cleanup` removes
//!   it: retention waits rather than folding what may still be read.
//! - The CLI runs as root, the receiver as the group directory's owner:
//!   the directory and the pin are given to that owner, who must read the
//!   pin.
//! - A group kept in a store the receiver reads elsewhere (the Ceph store)
//!   has its pin there too ([`StorePin`], from
//!   [`StoreEngine::store_pin`](crate::store::StoreEngine::store_pin)):
//!   the lock and the scratch files stay in the local directory, and the
//!   pin is written to both, after the local one, and removed from both,
//!   before the local one. The lock excludes a second pin holder on this
//!   node only.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tidemark_changelog::Seq;
use tidemark_names::Name;

use tidemark_durable::{
    create_private_dir_all, replace, DirLock, Durability, FsDir, LockError, LogDir, LogFile,
    ReplaceError,
};

/// The directory of the pin (and of a running test failover's scratch
/// files) in a group directory.
pub const TEST_FAILOVER_DIR: &str = "test-failover";
/// The pin file in [`TEST_FAILOVER_DIR`]: the pinned point's sequence
/// number, in decimal.
pub const PIN_FILE: &str = "pin";
/// The lock file in [`TEST_FAILOVER_DIR`] its holder keeps locked.
pub const LOCK_FILE: &str = "lock";
/// The temporary name a new pin is written under before it replaces the
/// old one.
const PIN_TMP: &str = "pin.tmp";

/// Why a point could not be pinned or unpinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// Another process (a running test failover or planned failover of
    /// the group) holds the pin's lock.
    #[error(
        "a test failover or planned failover of this group is running (pid {}): stop it first",
        pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
    )]
    Held {
        /// The holder's pid, if it could be read.
        pid: Option<u32>,
    },
    /// The lock file could not be created or locked (local disk or
    /// permissions).
    #[error("locking the pin")]
    Lock(#[source] LockError),
    /// A file or directory of the pin could not be created, read, given
    /// to the group's owner or removed (local disk or permissions).
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The pin could not be written; the old one (or none) stays.
    #[error("writing the pin")]
    Write(#[source] ReplaceError),
    /// The pin kept with the store (the Ceph store's pin object) could not
    /// be written or removed (the cluster).
    #[error("writing the pin in the store")]
    Store(#[source] crate::store::StoreError),
}

/// The pin of a group kept where its store is, beside the local pin: the
/// store's engine reads it when it chooses what to fold.
pub trait StorePin: Send + Sync + std::fmt::Debug {
    /// Pins `seq`, or (`None`) removes the pin (no pin is no error).
    fn set(&self, seq: Option<Seq>) -> Result<(), crate::store::StoreError>;
}

/// The directory of `host`'s `group` under the receiver's data directory
/// `data_dir`, where its pin lock is taken: with a store kept elsewhere
/// (the cluster) and a node that does not apply the group, it is created
/// (0700) and given to the data directory's owner, as if the receiver had
/// made it (the receiver keeps its own files of the group there too).
pub fn node_group_dir(data_dir: &Path, host: &Name, group: &Name) -> Result<PathBuf, PinError> {
    let dir = crate::store::LocalEngine::new(data_dir).group_dir(host, group);
    if dir.is_dir() {
        return Ok(dir);
    }
    create_private_dir_all(&dir).map_err(io_err("creating", &dir))?;
    let owner = std::fs::metadata(data_dir).map_err(io_err("reading the owner of", data_dir))?;
    for made in [dir.parent().unwrap_or(&dir), &dir] {
        give(made, (owner.uid(), owner.gid()))?;
    }
    Ok(dir)
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PinError {
    let path = path.to_path_buf();
    move |source| PinError::Io { what, path, source }
}

/// The pin's lock of one group, held: the right to write and remove its
/// pin. Dropping it releases the lock; the pin, if any, stays (see
/// [`PinLock::unpin`] and [`PinLock::remove_all`]).
#[derive(Debug)]
pub struct PinLock {
    dir: PathBuf,
    group_owner: (u32, u32),
    /// The pin in the group's store, if it is not the local one.
    store: Option<Box<dyn StorePin>>,
    _lock: DirLock,
}

impl PinLock {
    /// Takes the pin's lock of the group in `group_dir` without waiting,
    /// creating its directory (0700, given to the group directory's
    /// owner) if needed.
    pub fn acquire(group_dir: &Path) -> Result<PinLock, PinError> {
        let owner =
            std::fs::metadata(group_dir).map_err(io_err("reading the owner of", group_dir))?;
        let dir = group_dir.join(TEST_FAILOVER_DIR);
        create_private_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let group_owner = (owner.uid(), owner.gid());
        give(&dir, group_owner)?;
        let lock = match DirLock::acquire(&dir, LOCK_FILE, "test failover") {
            Ok(lock) => lock,
            Err(LockError::Held { pid, .. }) => return Err(PinError::Held { pid }),
            Err(e) => return Err(PinError::Lock(e)),
        };
        Ok(PinLock {
            dir,
            group_owner,
            store: None,
            _lock: lock,
        })
    }

    /// The same lock, pinning also in the group's store (`None`: the
    /// local pin is the store's).
    pub fn with_store_pin(mut self, store: Option<Box<dyn StorePin>>) -> PinLock {
        self.store = store;
        self
    }

    /// The locked directory (a test failover keeps its scratch files in
    /// it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pins the point `seq` (replacing the pin there was): retention
    /// keeps it until [`PinLock::unpin`] or [`PinLock::remove_all`].
    pub fn pin(&self, seq: Seq) -> Result<(), PinError> {
        write(&FsDir::at(&self.dir), seq).map_err(PinError::Write)?;
        give(&self.dir.join(PIN_FILE), self.group_owner)?;
        match &self.store {
            Some(store) => store.set(Some(seq)).map_err(PinError::Store),
            None => Ok(()),
        }
    }

    /// Removes the pin, if there is one: retention may fold its point
    /// again.
    pub fn unpin(&self) -> Result<(), PinError> {
        if let Some(store) = &self.store {
            store.set(None).map_err(PinError::Store)?;
        }
        let path = self.dir.join(PIN_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &path)(e)),
        }
    }

    /// Removes the directory and everything in it (the pin, a test
    /// failover's scratch files), then releases the lock.
    pub fn remove_all(self) -> Result<(), PinError> {
        if let Some(store) = &self.store {
            store.set(None).map_err(PinError::Store)?;
        }
        std::fs::remove_dir_all(&self.dir).map_err(io_err("removing", &self.dir))
    }
}

/// Writes the pin `seq` into `dir` (its [`TEST_FAILOVER_DIR`]), atomically
/// and durably.
fn write<D: LogDir>(dir: &D, seq: Seq) -> Result<(), ReplaceError> {
    replace(
        dir,
        PIN_TMP,
        PIN_FILE,
        seq.to_string().as_bytes(),
        Durability::Durable,
    )
}

/// The point pinned in `test_failover` (a group's [`TEST_FAILOVER_DIR`]),
/// if any. A pin that cannot be read as a number is no pin: it can only be
/// a file this module did not write.
pub fn read<D: LogDir>(test_failover: &D) -> Option<Seq> {
    read_seq(test_failover, PIN_FILE)
}

/// The sequence number in decimal that the file `name` of `dir` holds, if
/// it holds one (the pin's format, shared by a span's floor in the store).
pub(crate) fn read_seq<D: LogDir>(dir: &D, name: &str) -> Option<Seq> {
    let file = dir.open(name, false).ok()?;
    // A sequence number in decimal (and perhaps a newline): anything much
    // longer is no pin.
    let mut buf = vec![0u8; file.size().ok()?.min(4096) as usize];
    let n = file.read_full_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(Seq)
}

/// Gives `path` the group directory's owner, if it is not already its.
fn give(path: &Path, (uid, gid): (u32, u32)) -> Result<(), PinError> {
    let meta = std::fs::metadata(path).map_err(io_err("reading", path))?;
    if (meta.uid(), meta.gid()) != (uid, gid) {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(io_err("giving to the owner of its group", path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_durable::SimDir;

    #[test]
    fn a_pin_is_written_read_and_removed_under_its_lock_and_a_second_holder_is_refused() {
        let group = tempfile::tempdir().unwrap();
        let dir = FsDir::at(&group.path().join(TEST_FAILOVER_DIR));
        assert_eq!(read(&dir), None);
        let lock = PinLock::acquire(group.path()).unwrap();
        match PinLock::acquire(group.path()) {
            Err(PinError::Held { pid }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        lock.pin(Seq(42)).unwrap();
        assert_eq!(read(&dir), Some(Seq(42)));
        // The format: the sequence number in decimal, nothing else.
        let path = group.path().join(TEST_FAILOVER_DIR).join(PIN_FILE);
        assert_eq!(std::fs::read(&path).unwrap(), b"42");
        let mode = std::fs::metadata(&path).unwrap().mode();
        assert_eq!(mode & 0o777, 0o600);
        lock.unpin().unwrap();
        assert_eq!(read(&dir), None);
        lock.unpin().unwrap();
        lock.pin(Seq(7)).unwrap();
        lock.pin(Seq(8)).unwrap();
        assert_eq!(read(&dir), Some(Seq(8)));
        lock.remove_all().unwrap();
        assert!(!group.path().join(TEST_FAILOVER_DIR).exists());
        // The lock went with it: the next holder takes it.
        PinLock::acquire(group.path()).unwrap();
    }

    /// A store pin that records what it was given, and fails on demand.
    #[derive(Debug, Default)]
    struct Recorded {
        calls: std::sync::Mutex<Vec<Option<Seq>>>,
        fail: std::sync::atomic::AtomicBool,
    }

    impl StorePin for std::sync::Arc<Recorded> {
        fn set(&self, seq: Option<Seq>) -> Result<(), crate::store::StoreError> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(crate::store::StoreError::Poisoned);
            }
            self.calls.lock().unwrap().push(seq);
            Ok(())
        }
    }

    /// With a store pin, pinning writes the local pin and the store's,
    /// unpinning and removing remove both; a store that cannot be written
    /// fails the pin (the caller then reads nothing).
    #[test]
    fn a_store_pin_is_written_and_removed_beside_the_local_one() {
        let group = tempfile::tempdir().unwrap();
        let dir = FsDir::at(&group.path().join(TEST_FAILOVER_DIR));
        let store = std::sync::Arc::new(Recorded::default());
        let lock = PinLock::acquire(group.path())
            .unwrap()
            .with_store_pin(Some(Box::new(store.clone())));
        lock.pin(Seq(5)).unwrap();
        assert_eq!(read(&dir), Some(Seq(5)));
        lock.unpin().unwrap();
        assert_eq!(read(&dir), None);
        lock.pin(Seq(6)).unwrap();
        store.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(matches!(lock.pin(Seq(7)), Err(PinError::Store(_))));
        store.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        lock.remove_all().unwrap();
        assert_eq!(
            *store.calls.lock().unwrap(),
            [Some(Seq(5)), None, Some(Seq(6)), None]
        );
    }

    #[test]
    fn a_pin_cut_at_any_sync_reads_as_the_old_pin_or_the_new_never_another_number() {
        let probe = SimDir::new();
        write(&probe, Seq(7)).unwrap();
        let before = probe.syncs();
        write(&probe, Seq(123_456)).unwrap();
        let syncs = probe.syncs() - before;
        for cut in 1..=syncs + 1 {
            let dir = SimDir::new();
            write(&dir, Seq(7)).unwrap();
            dir.cut_power_at_sync(before + cut);
            let done = write(&dir, Seq(123_456));
            let after = SimDir::from_files(dir.after_power_cut());
            let pinned = read(&after);
            if done.is_ok() {
                assert_eq!(pinned, Some(Seq(123_456)), "cut at sync {cut}");
            } else {
                assert!(
                    pinned == Some(Seq(7)) || pinned == Some(Seq(123_456)),
                    "cut at sync {cut}: {pinned:?}"
                );
            }
        }
    }

    #[test]
    fn what_is_not_a_number_is_no_pin() {
        let dir = SimDir::new();
        dir.put(PIN_FILE, b"12\n".to_vec());
        assert_eq!(read(&dir), Some(Seq(12)));
        dir.put(PIN_FILE, b"1x".to_vec());
        assert_eq!(read(&dir), None);
        dir.put(PIN_FILE, vec![b'1'; 5000]);
        assert_eq!(read(&dir), None);
    }
}
