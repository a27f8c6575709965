//! The tracker's state file, `tracker.state` in the log directory: the
//! generation, whether a run is in progress (so the next start knows the
//! last one ended uncleanly), the last durable record of a clean stop,
//! bitmap mode and its reason, and the disks with their ids. A disk keeps
//! its id for as long as it is in the group, wherever it is listed in the
//! configuration; a new disk takes the next id never given; a removed
//! disk's id is never given again (its replica keeps it on the replica
//! site).
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
//! A group whose ids are still the positions of its disks (no disk was
//! ever removed, none reordered) is written as above, in version 2, the
//! disks in id order. Any other is written in version 3, each disk with
//! its id and the next id to give:
//!
//! ```text
//! tidemark-tracker-state 3
//! generation 3
//! running 0
//! disk 0 data
//! disk 2 logs
//! next-disk-id 3
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
//! - **3**: `disk ID NAME` lines and `next-disk-id`: disk ids that are not
//!   positions (a disk was removed or the disks were reordered).
//!
//! All three are read. Version 2 is written while the ids are positions,
//! so a group that never removed a disk stays readable by the releases
//! before version 3; version 3 only once they are not (those releases
//! refuse it by its version, rather than mislabel the log). A version-1
//! file reads as a state without `last-seq` (its clean stop still forbids
//! any cut) and is replaced by version 2 at the next save. A newer version
//! is refused by name rather than guessed at.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use tidemark_changelog::{DiskId, Seq};

const FILE: &str = "tracker.state";
const TMP: &str = "tracker.state.tmp";
const MAGIC: &str = "tidemark-tracker-state";
/// The newest version this code writes; it reads every version from 1 to
/// it.
const VERSION: u32 = 3;
/// The version written while disk ids are positions.
const POSITIONAL_VERSION: u32 = 2;

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

/// The group cannot give a new disk an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskIdError {
    /// Every id was given once (ids of removed disks are never reused).
    #[error("no disk id is left for disk {name:?}: every id of this log was given once")]
    Exhausted {
        /// The new disk.
        name: String,
    },
}

/// A disk of the group as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateDisk {
    /// Its id: the `disk` of its records, for as long as it is in the group.
    pub id: DiskId,
    /// Its name.
    pub name: String,
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
    /// The disks, in id order.
    pub disks: Vec<StateDisk>,
    /// The id the next new disk takes: above every id ever given.
    pub next_disk_id: u32,
    dir: Option<PathBuf>,
}

impl GroupState {
    /// The state of a group that never ran: its disks take their
    /// positions as ids.
    pub fn fresh(disks: &[String]) -> GroupState {
        GroupState {
            generation: 0,
            running: false,
            last_seq: None,
            bitmap: None,
            disks: disks
                .iter()
                .zip(0u32..)
                .map(|(name, id)| StateDisk {
                    id: DiskId(id),
                    name: name.clone(),
                })
                .collect(),
            next_disk_id: disks.len() as u32,
            dir: None,
        }
    }

    /// The ids of the `configured` disks, in their order: a disk the
    /// group knows (by name) keeps its id, a new one takes the next id
    /// never given. Disks the group knows that are not configured any more
    /// are dropped; their ids are not given again. Returns the ids and the
    /// dropped disks.
    pub fn assign_ids(
        &mut self,
        configured: &[String],
    ) -> Result<(Vec<DiskId>, Vec<StateDisk>), DiskIdError> {
        let mut ids = Vec::with_capacity(configured.len());
        let mut kept = Vec::with_capacity(configured.len());
        for name in configured {
            let id = match self.disks.iter().find(|d| d.name == *name) {
                Some(d) => d.id,
                None => {
                    // The group id (all ones) is no disk's.
                    if self.next_disk_id >= DiskId::GROUP.get() {
                        return Err(DiskIdError::Exhausted { name: name.clone() });
                    }
                    self.next_disk_id += 1;
                    DiskId(self.next_disk_id - 1)
                }
            };
            ids.push(id);
            kept.push(StateDisk {
                id,
                name: name.clone(),
            });
        }
        let removed = self
            .disks
            .iter()
            .filter(|d| !configured.contains(&d.name))
            .cloned()
            .collect();
        kept.sort_by_key(|d| d.id);
        self.disks = kept;
        Ok((ids, removed))
    }

    /// The ids are the positions of the disks in id order, and no id was
    /// given beyond them: what the releases before version 3 assumed.
    fn ids_are_positions(&self) -> bool {
        self.next_disk_id as usize == self.disks.len()
            && self
                .disks
                .iter()
                .zip(0u32..)
                .all(|(d, i)| d.id == DiskId(i))
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
        let version = match version.parse::<u32>() {
            Ok(v) if (1..=VERSION).contains(&v) => v,
            Ok(v) => {
                return Err(damaged(&format!(
                    "version {v} is newer than this tracker reads ({VERSION}): a newer tracker wrote it"
                )))
            }
            Err(_) => return Err(damaged("unknown header")),
        };
        let mut state = GroupState::fresh(&[]);
        let mut next_disk_id = None;
        for line in lines {
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "generation" => {
                    state.generation = value
                        .parse()
                        .ok()
                        // The last generation: none could follow it.
                        .filter(|g| *g != u32::MAX)
                        .ok_or_else(|| damaged("bad generation"))?
                }
                "running" => state.running = value == "1",
                "last-seq" => {
                    state.last_seq =
                        Some(Seq(value.parse().map_err(|_| damaged("bad last-seq"))?))
                }
                "bitmap-reason" => state.bitmap = Some(BitmapCause::from_text(value)),
                "disk" if version < 3 => state.disks.push(StateDisk {
                    id: DiskId(state.disks.len() as u32),
                    name: value.to_string(),
                }),
                "disk" => {
                    let (id, name) = value
                        .split_once(' ')
                        .and_then(|(id, name)| Some((id.parse::<u32>().ok()?, name)))
                        .ok_or_else(|| damaged(&format!("bad disk line {line:?}")))?;
                    if state.disks.last().is_some_and(|d| d.id >= DiskId(id)) {
                        return Err(damaged(&format!("disk ids out of order at {line:?}")));
                    }
                    state.disks.push(StateDisk {
                        id: DiskId(id),
                        name: name.to_string(),
                    });
                }
                "next-disk-id" if version >= 3 => {
                    next_disk_id = Some(value.parse().map_err(|_| damaged("bad next-disk-id"))?)
                }
                _ => return Err(damaged(&format!("unknown line {line:?}"))),
            }
        }
        let given = state.disks.last().map_or(0, |d| d.id.get() + 1);
        state.next_disk_id = match next_disk_id {
            Some(next) if next < given => return Err(damaged("next-disk-id below a disk's id")),
            Some(next) => next,
            None => given,
        };
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
        let positional = self.ids_are_positions();
        let version = if positional {
            POSITIONAL_VERSION
        } else {
            VERSION
        };
        let mut body = format!(
            "{MAGIC} {version}\ngeneration {}\nrunning {}\n",
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
            if positional {
                body.push_str(&format!("disk {}\n", d.name));
            } else {
                body.push_str(&format!("disk {} {}\n", d.id, d.name));
            }
        }
        if !positional {
            body.push_str(&format!("next-disk-id {}\n", self.next_disk_id));
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
            generation in 0..u32::MAX,
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
        assert_eq!(s.disks, [disk(0, "disk")]);
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
        let text = tidemark_changelog::sealed::seal("tidemark-tracker-state 4\ngeneration 1\n");
        fs::write(dir.path().join(FILE), text).unwrap();
        let err = GroupState::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("version 4 is newer"), "{err}");
    }

    /// A state naming the last generation a segment can hold is damaged:
    /// the next start could begin no generation after it.
    #[test]
    fn the_last_generation_is_refused_as_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = GroupState::fresh(&names(&["a"]));
        s.generation = u32::MAX - 1;
        s.save(dir.path()).unwrap();
        assert_eq!(GroupState::load(dir.path()).unwrap().unwrap(), s);
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        let body = tidemark_changelog::sealed::unseal(&text).unwrap();
        let body = body.replace(
            &format!("generation {}", u32::MAX - 1),
            &format!("generation {}", u32::MAX),
        );
        fs::write(
            dir.path().join(FILE),
            tidemark_changelog::sealed::seal(&body),
        )
        .unwrap();
        let err = GroupState::load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("bad generation"), "{err}");
    }

    fn disk(id: u32, name: &str) -> StateDisk {
        StateDisk {
            id: DiskId(id),
            name: name.into(),
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn disks_keep_their_ids_when_others_are_added_moved_or_removed() {
        let mut s = GroupState::fresh(&names(&["a", "b"]));
        let (ids, removed) = s.assign_ids(&names(&["a", "b", "c"])).unwrap();
        assert_eq!(ids, [DiskId(0), DiskId(1), DiskId(2)]);
        assert!(removed.is_empty());
        assert!(s.ids_are_positions());
        // Reordered: the same ids.
        let (ids, _) = s.assign_ids(&names(&["c", "a", "b"])).unwrap();
        assert_eq!(ids, [DiskId(2), DiskId(0), DiskId(1)]);
        assert!(s.ids_are_positions(), "kept in id order");
        // b removed, d added: d does not take b's id.
        let (ids, removed) = s.assign_ids(&names(&["a", "d", "c"])).unwrap();
        assert_eq!(ids, [DiskId(0), DiskId(3), DiskId(2)]);
        assert_eq!(removed, [disk(1, "b")]);
        assert_eq!(s.disks, [disk(0, "a"), disk(2, "c"), disk(3, "d")]);
        assert_eq!(s.next_disk_id, 4);
        assert!(!s.ids_are_positions());
        // b back: a new disk, a new id.
        let (ids, _) = s.assign_ids(&names(&["b"])).unwrap();
        assert_eq!(ids, [DiskId(4)]);
        assert_eq!(s.next_disk_id, 5);
    }

    #[test]
    fn positional_ids_are_written_as_version_2_and_others_as_version_3() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = GroupState::fresh(&names(&["data", "wal"]));
        s.save(dir.path()).unwrap();
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.starts_with("tidemark-tracker-state 2\n"), "{text}");
        assert!(text.contains("\ndisk data\ndisk wal\n"), "{text}");
        assert_eq!(GroupState::load(dir.path()).unwrap().unwrap(), s);

        s.assign_ids(&names(&["wal", "logs"])).unwrap();
        s.save_in_place().unwrap();
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.starts_with("tidemark-tracker-state 3\n"), "{text}");
        assert!(
            text.contains("\ndisk 1 wal\ndisk 2 logs\nnext-disk-id 3\n"),
            "{text}"
        );
        assert_eq!(GroupState::load(dir.path()).unwrap().unwrap(), s);

        // Only a removal's id is missing: still version 3 (the id is not
        // given again).
        let mut s = GroupState::fresh(&names(&["a", "b"]));
        s.assign_ids(&names(&["a"])).unwrap();
        s.save(dir.path()).unwrap();
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.contains("\ndisk 0 a\nnext-disk-id 2\n"), "{text}");
        let loaded = GroupState::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.next_disk_id, 2);
    }

    #[test]
    fn damaged_disk_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for body in [
            "tidemark-tracker-state 3\ndisk 2 a\ndisk 1 b\n",
            "tidemark-tracker-state 3\ndisk x a\n",
            "tidemark-tracker-state 3\ndisk 4 a\nnext-disk-id 3\n",
            "tidemark-tracker-state 2\nnext-disk-id 3\n",
        ] {
            let text = tidemark_changelog::sealed::seal(body);
            fs::write(dir.path().join(FILE), text).unwrap();
            assert!(
                matches!(
                    GroupState::load(dir.path()),
                    Err(StateError::Damaged { .. })
                ),
                "{body}"
            );
        }
    }
}
