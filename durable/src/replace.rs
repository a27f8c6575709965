//! Replacing a small file atomically: a reader sees the old content or the
//! new, never a mix, whatever crashes when. The new content goes to a
//! temporary name in the same directory (0600), is made durable, is renamed
//! over the file, and the directory is synced so the rename survives a
//! power cut ([`Durability::Durable`]); state whose loss a restart repairs
//! (a status file rewritten every few hundred milliseconds) may skip the
//! syncs ([`Durability::Visible`]) and is still never torn.

use std::io;

use crate::dir::{LogDir, LogFile};

/// Whether a replacement must survive a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fdatasync the new content before the rename, fsync the directory
    /// after it: once [`replace`] returns, a crash leaves the new content.
    Durable,
    /// Only the rename: a crash may leave the old content (never a torn
    /// one).
    Visible,
}

/// Why a file could not be replaced; the file keeps its old content.
#[derive(Debug, thiserror::Error)]
#[error("replacing {name} in {dir}: {step}")]
pub struct ReplaceError {
    /// The directory, as [`LogDir::describe`] names it.
    pub dir: String,
    /// The file being replaced.
    pub name: String,
    /// The file the failing step acted on: the temporary file, the file
    /// itself (the rename), or `None` for the directory (its sync).
    pub file: Option<String>,
    /// What failed.
    pub step: &'static str,
    /// The cause.
    #[source]
    pub source: io::Error,
}

/// For callers that speak `io::Error`: the kind of the cause, and a
/// message that says the step, the file and the cause (callers log an
/// `io::Error` with its message alone, which would drop a `source`).
impl From<ReplaceError> for io::Error {
    fn from(e: ReplaceError) -> io::Error {
        io::Error::new(e.source.kind(), format!("{e}: {}", e.source))
    }
}

/// Replaces `name` in `dir` with `bytes`, written first under `tmp`.
pub fn replace<D: LogDir>(
    dir: &D,
    tmp: &str,
    name: &str,
    bytes: &[u8],
    durability: Durability,
) -> Result<(), ReplaceError> {
    let fail = |file: Option<&str>, step: &'static str| {
        let file = file.map(str::to_string);
        move |source| ReplaceError {
            dir: dir.describe(),
            name: name.to_string(),
            file,
            step,
            source,
        }
    };
    let file = dir
        .create(tmp)
        .map_err(fail(Some(tmp), "creating the new content"))?;
    file.write_all_at(&[bytes], 0)
        .map_err(fail(Some(tmp), "writing the new content"))?;
    if durability == Durability::Durable {
        file.sync_data()
            .map_err(fail(Some(tmp), "syncing the new content"))?;
    }
    drop(file);
    dir.rename(tmp, name)
        .map_err(fail(Some(name), "renaming the new content over it"))?;
    if durability == Durability::Durable {
        dir.sync_dir()
            .map_err(fail(None, "syncing the directory"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dir::{FsDir, SimDir};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_durable_replacement_survives_a_cut_at_every_sync_and_is_never_torn() {
        // Probe: how many syncs one replacement takes.
        let probe = SimDir::new();
        replace(&probe, "f.tmp", "f", b"old", Durability::Durable).unwrap();
        let before = probe.syncs();
        replace(&probe, "f.tmp", "f", b"new content", Durability::Durable).unwrap();
        let syncs = probe.syncs() - before;
        assert_eq!(syncs, 2);
        for cut in 1..=syncs + 1 {
            let dir = SimDir::new();
            replace(&dir, "f.tmp", "f", b"old", Durability::Durable).unwrap();
            dir.cut_power_at_sync(before + cut);
            let done = replace(&dir, "f.tmp", "f", b"new content", Durability::Durable);
            let after = dir.durable_files()["f"].durable.clone();
            if done.is_ok() {
                assert_eq!(after, b"new content", "cut at sync {cut}");
            } else {
                assert!(
                    after == b"old" || after == b"new content",
                    "cut at sync {cut}: {after:?}"
                );
            }
        }
    }

    #[test]
    fn a_visible_replacement_takes_no_sync() {
        let dir = SimDir::new();
        replace(&dir, "f.tmp", "f", b"a", Durability::Visible).unwrap();
        assert_eq!(dir.syncs(), 0);
        assert_eq!(dir.files()["f"], b"a");
        assert!(!dir.files().contains_key("f.tmp"));
    }

    #[test]
    fn a_real_file_is_replaced_private_and_a_failure_names_the_step() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = FsDir::existing(tmp.path()).unwrap();
        replace(&dir, "f.tmp", "f", b"one", Durability::Durable).unwrap();
        replace(&dir, "f.tmp", "f", b"two", Durability::Durable).unwrap();
        let path = tmp.path().join("f");
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let gone = FsDir::existing(tmp.path()).unwrap();
        drop(tmp);
        let err = replace(&gone, "f.tmp", "f", b"x", Durability::Durable).unwrap_err();
        assert_eq!(err.file.as_deref(), Some("f.tmp"));
        assert_eq!(err.step, "creating the new content");
        let io = io::Error::from(err);
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
        assert!(
            io.to_string().starts_with("replacing f in ")
                && io.to_string().contains("creating the new content: "),
            "{io}"
        );
    }
}
