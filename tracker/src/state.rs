//! The tracker's state file, `tracker.state` in the log directory: the
//! generation, whether a run is in progress (so the next start knows the
//! last one ended uncleanly), the last durable record of a clean stop,
//! bitmap mode and its reason, and the disks in id order (ids are
//! positions; reordering disks would mislabel the log).
//!
//! A short text file, replaced atomically (write `tracker.state.tmp`,
//! fdatasync, rename, fsync the directory), ending with a CRC32C line:
//!
//! ```text
//! tidemark-tracker-state 2
//! generation 3
//! running 0
//! last-seq 18342
//! bitmap-reason the change log reached its size limit of 8589934592 bytes
//! disk data
//! disk wal
//! crc32c 1a2b3c4d
//! ```
//!
//! `running 0` says the last run stopped cleanly, so recovery of the log
//! may cut nothing ([`RecoveryPolicy`](tidemark_changelog::RecoveryPolicy));
//! `last-seq` (only after a clean stop) is the last durable record then: a
//! log that ends before it lost records.
//!
//! # Versions
//!
//! - **1**: no `last-seq` line.
//! - **2**: `last-seq` after a clean stop.
//!
//! Both are read; version 2 is written. A version-1 file reads as a state
//! without `last-seq` (its clean stop still forbids any cut) and is
//! replaced by version 2 at the next save. A newer version is refused by
//! name rather than guessed at.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tidemark_changelog::Seq;

const FILE: &str = "tracker.state";
const TMP: &str = "tracker.state.tmp";
const MAGIC: &str = "tidemark-tracker-state";
/// The version this code writes; it reads every version from 1 to it.
const VERSION: u32 = 2;

/// Why the state file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing it failed.
    #[error("tracker state file {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// It exists but does not verify.
    #[error("tracker state file {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Why a group left data mode ([`crate::group::TrackingMode::Bitmap`]).
/// The state file keeps it as its text ([`BitmapCause::from_text`] reads
/// back exactly what `Display` writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapCause {
    /// The change log reached its size limit: data mode returns by itself
    /// once the shipper has freed half of the log.
    LogFull(FullAt),
    /// The change log failed (an I/O error): bitmap mode lasts until the
    /// tracker restarts and a checksum resync has run.
    LogFailed {
        /// The log's error, as it was reported.
        error: String,
    },
    /// A text this release does not know (a future release wrote it):
    /// kept as written, and like a failure it does not end by itself.
    Other(String),
}

/// When the log was found full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullAt {
    /// Appending: the limit it reached.
    Append {
        /// The log's size limit in bytes.
        limit: u64,
    },
    /// Beginning a new generation when restarting after an unclean stop.
    Restart,
    /// Recording the hot extents of an unclean stop.
    UncleanStop,
}

const FULL: &str = "the change log reached its size limit";
const FAILED: &str = "the change log failed: ";

impl BitmapCause {
    /// Whether data mode comes back without a restart.
    pub fn ends_by_itself(&self) -> bool {
        matches!(self, BitmapCause::LogFull(_))
    }

    /// The cause whose `Display` is `text` (any other text is kept as
    /// [`BitmapCause::Other`]).
    pub fn from_text(text: &str) -> BitmapCause {
        let full = |rest: &str| match rest {
            " when restarting after an unclean stop" => Some(FullAt::Restart),
            " when recording an unclean stop" => Some(FullAt::UncleanStop),
            _ => {
                let digits = rest.strip_prefix(" of ")?.strip_suffix(" bytes")?;
                // Only the canonical form `Display` writes.
                let limit: u64 = digits.parse().ok()?;
                (limit.to_string() == digits).then_some(FullAt::Append { limit })
            }
        };
        if let Some(at) = text.strip_prefix(FULL).and_then(full) {
            return BitmapCause::LogFull(at);
        }
        match text.strip_prefix(FAILED) {
            Some(error) => BitmapCause::LogFailed {
                error: error.to_string(),
            },
            None => BitmapCause::Other(text.to_string()),
        }
    }
}

impl std::fmt::Display for BitmapCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BitmapCause::LogFull(FullAt::Append { limit }) => write!(f, "{FULL} of {limit} bytes"),
            BitmapCause::LogFull(FullAt::Restart) => {
                write!(f, "{FULL} when restarting after an unclean stop")
            }
            BitmapCause::LogFull(FullAt::UncleanStop) => {
                write!(f, "{FULL} when recording an unclean stop")
            }
            BitmapCause::LogFailed { error } => write!(f, "{FAILED}{error}"),
            BitmapCause::Other(text) => f.write_str(text),
        }
    }
}

/// The configured disks renumber the log's: refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskOrderError {
    /// Another disk is configured at a log disk's place.
    #[error("disk {id} of this log is {name:?} but the configuration lists {configured:?} there; disks may only be added at the end")]
    Moved {
        /// The place.
        id: usize,
        /// The log's disk there.
        name: String,
        /// The configuration's.
        configured: String,
    },
    /// A log disk is not configured.
    #[error("disk {name:?} of this log is missing from the configuration")]
    Missing {
        /// The log's disk.
        name: String,
    },
}

/// What the state file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// The generation of the last run.
    pub generation: u32,
    /// A run is in progress (or ended without a clean stop).
    pub running: bool,
    /// The last durable record of the log at a clean stop (not while
    /// running, and not recorded by version 1).
    pub last_seq: Option<Seq>,
    /// Bitmap mode, with its cause.
    pub bitmap: Option<BitmapCause>,
    /// Disk names by id.
    pub disks: Vec<String>,
    dir: Option<PathBuf>,
}

impl GroupState {
    /// The state of a group that never ran.
    pub fn fresh(disks: &[String]) -> GroupState {
        GroupState {
            generation: 0,
            running: false,
            last_seq: None,
            bitmap: None,
            disks: disks.to_vec(),
            dir: None,
        }
    }

    /// Refuses a configuration that renumbers the disks: new disks may be
    /// added at the end, existing ones may not move or vanish.
    pub fn check_disks(&mut self, configured: &[String]) -> Result<(), DiskOrderError> {
        for (id, name) in self.disks.iter().enumerate() {
            match configured.get(id) {
                Some(c) if c == name => {}
                Some(c) => {
                    return Err(DiskOrderError::Moved {
                        id,
                        name: name.clone(),
                        configured: c.clone(),
                    })
                }
                None => return Err(DiskOrderError::Missing { name: name.clone() }),
            }
        }
        self.disks = configured.to_vec();
        Ok(())
    }

    /// Reads the state of the group whose log is in `dir`, if any.
    pub fn load(dir: &Path) -> Result<Option<GroupState>, StateError> {
        let path = dir.join(FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let damaged = |reason: &str| StateError::Damaged {
            path: path.clone(),
            reason: reason.to_string(),
        };
        let body = tidemark_changelog::sealed::unseal(&text).map_err(damaged)?;
        let mut lines = body.lines();
        let version = lines
            .next()
            .and_then(|l| l.strip_prefix(MAGIC))
            .and_then(|v| v.strip_prefix(' '))
            .ok_or_else(|| damaged("unknown header"))?;
        match version.parse::<u32>() {
            Ok(v) if (1..=VERSION).contains(&v) => {}
            Ok(v) => {
                return Err(damaged(&format!(
                    "version {v} is newer than this tracker reads ({VERSION}): a newer tracker wrote it"
                )))
            }
            Err(_) => return Err(damaged("unknown header")),
        }
        let mut state = GroupState::fresh(&[]);
        for line in lines {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "generation" => {
                    state.generation = value.parse().map_err(|_| damaged("bad generation"))?
                }
                "running" => state.running = value == "1",
                "last-seq" => {
                    state.last_seq =
                        Some(Seq(value.parse().map_err(|_| damaged("bad last-seq"))?))
                }
                "bitmap-reason" => state.bitmap = Some(BitmapCause::from_text(value)),
                "disk" => state.disks.push(value.to_string()),
                _ => return Err(damaged(&format!("unknown line {line:?}"))),
            }
        }
        state.dir = Some(dir.to_path_buf());
        Ok(Some(state))
    }

    /// Writes the state atomically into `dir`.
    pub fn save(&mut self, dir: &Path) -> Result<(), StateError> {
        self.dir = Some(dir.to_path_buf());
        self.save_in_place()
    }

    /// Writes the state atomically where it was loaded from or last saved.
    pub fn save_in_place(&self) -> Result<(), StateError> {
        let dir = self.dir.clone().unwrap_or_default();
        let mut body = format!(
            "{MAGIC} {VERSION}\ngeneration {}\nrunning {}\n",
            self.generation,
            u8::from(self.running)
        );
        if let Some(seq) = self.last_seq.filter(|_| !self.running) {
            body.push_str(&format!("last-seq {seq}\n"));
        }
        if let Some(cause) = &self.bitmap {
            // One line, whatever the cause's text: a line break (a
            // trailing '\r' included) would not read back.
            let reason = cause.to_string().replace(['\n', '\r'], " ");
            body.push_str(&format!("bitmap-reason {reason}\n"));
        }
        for d in &self.disks {
            body.push_str(&format!("disk {d}\n"));
        }
        let text = tidemark_changelog::sealed::seal(&body);
        tidemark_changelog::sealed::write_atomic(&dir, TMP, FILE, &text)
            .map_err(|(path, source)| StateError::Io { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn what_is_saved_loads_back(
            generation in any::<u32>(),
            running in any::<bool>(),
            reason in proptest::option::of("(.|\n){0,80}"),
            disks in proptest::collection::vec("[a-z0-9._-]{1,64}", 0..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut state = GroupState::fresh(&disks);
            state.generation = generation;
            state.running = running;
            state.bitmap = reason.as_deref().map(BitmapCause::from_text);
            state.save(dir.path()).unwrap();
            // The cause is kept on one line.
            state.bitmap = reason.map(|r| BitmapCause::from_text(&r.replace(['\n', '\r'], " ")));
            prop_assert_eq!(GroupState::load(dir.path()).unwrap(), Some(state));
        }

        #[test]
        fn a_cause_reads_back_from_its_text(
            limit in any::<u64>(),
            error in "[ -~]{0,60}",
            text in "[ -~]{0,80}",
        ) {
            for cause in [
                BitmapCause::LogFull(FullAt::Append { limit }),
                BitmapCause::LogFull(FullAt::Restart),
                BitmapCause::LogFull(FullAt::UncleanStop),
                BitmapCause::LogFailed { error: error.clone() },
            ] {
                prop_assert_eq!(BitmapCause::from_text(&cause.to_string()), cause);
            }
            // Any text reads as a cause whose text it is.
            prop_assert_eq!(BitmapCause::from_text(&text).to_string(), text);
        }

        #[test]
        fn arbitrary_files_never_panic(
            body in "(tidemark-tracker-state 1\n)?[ -~\n]{0,200}",
            sealed in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            // Sealed text reaches the parsing behind the checksum.
            let text = if sealed { tidemark_changelog::sealed::seal(&body) } else { body };
            fs::write(dir.path().join(FILE), text).unwrap();
            let _ = GroupState::load(dir.path());
        }
    }

    /// The texts earlier releases wrote read as their causes: only a full
    /// log's bitmap mode ends by itself.
    #[test]
    fn the_causes_earlier_releases_wrote_are_known() {
        let full =
            BitmapCause::from_text("the change log reached its size limit of 8589934592 bytes");
        assert_eq!(
            full,
            BitmapCause::LogFull(FullAt::Append { limit: 8589934592 })
        );
        assert!(full.ends_by_itself());
        for (text, at) in [
            (
                "the change log reached its size limit when restarting after an unclean stop",
                FullAt::Restart,
            ),
            (
                "the change log reached its size limit when recording an unclean stop",
                FullAt::UncleanStop,
            ),
        ] {
            assert_eq!(BitmapCause::from_text(text), BitmapCause::LogFull(at));
        }
        let failed = BitmapCause::from_text("the change log failed: writing segment 3: EIO");
        assert_eq!(
            failed,
            BitmapCause::LogFailed {
                error: "writing segment 3: EIO".into()
            }
        );
        assert!(!failed.ends_by_itself());
        // A text that only begins like a full log's is not one.
        let odd = BitmapCause::from_text("the change log reached its size limit, or so");
        assert!(!odd.ends_by_itself(), "{odd:?}");
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(GroupState::load(dir.path()).unwrap(), None);
        let mut s = GroupState::fresh(&["data".into(), "wal".into()]);
        s.generation = 4;
        s.running = false;
        s.last_seq = Some(Seq(77));
        s.bitmap = Some(BitmapCause::LogFull(FullAt::Append { limit: 1 << 30 }));
        s.save(dir.path()).unwrap();
        let loaded = GroupState::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, s);
        let path = dir.path().join(FILE);
        let text = fs::read_to_string(&path)
            .unwrap()
            .replace("generation 4", "generation 5");
        fs::write(&path, text).unwrap();
        assert!(matches!(
            GroupState::load(dir.path()),
            Err(StateError::Damaged { .. })
        ));
    }

    /// A version-1 file, as the version-1 tracker wrote it (the fixture
    /// log's), reads as a clean stop without a last sequence number, and
    /// is written back as version 2.
    #[test]
    fn a_version_1_file_is_read_and_rewritten_as_version_2() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../changelog/tests/fixtures/log-v1")
            .join(FILE);
        let v1 = fs::read_to_string(&fixture).unwrap();
        assert!(v1.starts_with("tidemark-tracker-state 1\n"), "{v1}");
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE), &v1).unwrap();
        let mut s = GroupState::load(dir.path()).unwrap().unwrap();
        assert_eq!(
            (s.generation, s.running, s.last_seq, s.bitmap.clone()),
            (0, false, None, None)
        );
        assert_eq!(s.disks, ["disk"]);
        s.last_seq = Some(Seq(20));
        s.save_in_place().unwrap();
        let v2 = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(v2.starts_with("tidemark-tracker-state 2\n"), "{v2}");
        assert!(v2.contains("\nlast-seq 20\n"), "{v2}");
        assert_eq!(GroupState::load(dir.path()).unwrap().unwrap(), s);
    }

    #[test]
    fn a_newer_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let text = tidemark_changelog::sealed::seal("tidemark-tracker-state 3\ngeneration 1\n");
        fs::write(dir.path().join(FILE), text).unwrap();
        let err = GroupState::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("version 3 is newer"), "{err}");
    }

    #[test]
    fn disks_may_be_added_but_not_moved() {
        let mut s = GroupState::fresh(&["a".into(), "b".into()]);
        assert!(s.check_disks(&["a".into(), "b".into(), "c".into()]).is_ok());
        assert!(s
            .check_disks(&["b".into(), "a".into(), "c".into()])
            .is_err());
        assert!(s.check_disks(&["a".into()]).is_err());
    }
}
