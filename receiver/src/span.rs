//! A span's record on the replica site: what its coordinator
//! (`tidemark_span::Coordinator`) must find again after a restart, and the
//! outcome of every round, the list of span points among them. This
//! module is the record's one owner: it reads, changes and writes it.
//!
//! Where the record lives is the [`SpanStore`] seam: in the receiver's
//! data directory with the local store ([`SpanDir`], below), in the
//! cluster with the Ceph store (one object per span, under the span's
//! lease: `crate::store::ceph::span`, whose module documents the object).
//! Both keep the same bytes (this format) and replace them whole.
//!
//! Layout, under the receiver's data directory:
//!
//! ```text
//! spans/                 0700
//! spans/SPAN/            0700, one per span (its name: the name rule)
//! spans/SPAN/record      the record, JSON, replaced atomically and durably
//!                        (tidemark_durable::replace through record.tmp)
//! ```
//!
//! The record (version 1):
//!
//! ```text
//! {"version": 1,
//!  "epoch": E,              the epoch of the coordinator that wrote it
//!  "next_point": N,         no point id below N is ever sent again
//!  "points": [              oldest first
//!    {"point": P, "taken_ns": T, "app_consistent": false, "label": "…",
//!     "outcome": "committed" | "durable" | "aborted",
//!     "reason": "…",        why it was aborted, or why a point asked for
//!                           application-consistent is crash-consistent
//!                           (a member not quiesced); else absent
//!     "members": [{"host": "web1", "group": "default",
//!                  "marker": SEQ, "generation": G}]}   (aborted: empty)
//!  ]}
//! ```
//!
//! Invariants:
//! - `epoch` and `next_point` are written before a point id that uses them
//!   is sent (the coordinator's [`SpanEvent::Save`]): a point id is never
//!   handed out twice, whatever restarts.
//! - Only `durable` entries are span points: every member's replica held
//!   its marker as a committed recovery point. A `committed` entry whose
//!   coordinator restarted before that is checked again against the
//!   members' stores, or abandoned by its timeout.
//! - Aborted entries are kept for status and alerts, the last
//!   [`KEPT_ABORTED`] of them.
//! - A record this release cannot read (damaged, or a newer version) is
//!   refused by name, never taken for an empty one: the span's history is
//!   not silently restarted.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tidemark_changelog::Seq;
use tidemark_durable::{create_private_dir_all, replace, Durability, FsDir, LogDir, LogFile};
use tidemark_names::Name;
use tidemark_span::{AbortReason, Epoch, PointId, Saved, SpanEvent};

/// The directory of the spans in the receiver's data directory.
pub const SPANS_DIR: &str = "spans";
/// The record's file in a span's directory.
pub const RECORD_FILE: &str = "record";
const RECORD_TMP: &str = "record.tmp";
/// The record format this release writes and reads.
pub const RECORD_VERSION: u32 = 1;
/// Aborted rounds kept in the record.
pub const KEPT_ABORTED: usize = 100;
/// The largest record read (a damaged size is refused, not allocated).
const MAX_RECORD: u64 = 64 << 20;

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Every member held in time; waiting for the markers' durability.
    Committed,
    /// A span point.
    Durable,
    /// Abandoned.
    Aborted,
}

/// One member's marker of a point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberMarker {
    /// The member's host.
    pub host: Name,
    /// The member's consistency group on that host.
    pub group: Name,
    /// The marker record.
    pub marker: Seq,
    /// The tracker generation it was written in.
    pub generation: u32,
}

impl std::fmt::Display for MemberMarker {
    /// `HOST/GROUP@SEQ`, as listings show a span point's members.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.host, self.group, self.marker)
    }
}

/// One round of the span.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointEntry {
    /// The point's id.
    pub point: u64,
    /// When its round ended, ns since the Unix epoch.
    pub taken_ns: u64,
    /// Taken with every member quiesced (from before its marker until
    /// after the release). Absent in records of releases before
    /// application-consistent span points: false.
    #[serde(default)]
    pub app_consistent: bool,
    /// The markers' label.
    pub label: String,
    /// How the round ended.
    pub outcome: Outcome,
    /// Why it was aborted; or, for a point asked for
    /// application-consistent, why it is crash-consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Each member's marker (empty when aborted).
    pub members: Vec<MemberMarker>,
}

/// A span's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanRecord {
    /// The format's version.
    pub version: u32,
    /// The epoch of the coordinator that wrote it last.
    pub epoch: u64,
    /// No point id below it is ever sent again.
    pub next_point: u64,
    /// The rounds, oldest first.
    pub points: Vec<PointEntry>,
}

impl Default for SpanRecord {
    fn default() -> Self {
        let saved = Saved::default();
        SpanRecord {
            version: RECORD_VERSION,
            epoch: saved.epoch.0,
            next_point: saved.next_point.0,
            points: Vec::new(),
        }
    }
}

/// Why a span's record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SpanRecordError {
    /// The file system refused.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The record is not one this release can read.
    #[error("the span record {} is damaged: {reason}; it is left as it is (move it away to start the span's history anew)", path.display())]
    Damaged {
        /// The record.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The record was written by a newer release.
    #[error("the span record {} has version {version}; this release reads version {RECORD_VERSION}", path.display())]
    UnsupportedVersion {
        /// The record.
        path: PathBuf,
        /// Its version.
        version: u32,
    },
    /// Cluster: an operation on the record's object failed (unreachable,
    /// timed out, refused); a write whose outcome is unknown makes the
    /// store refuse every later write (the next holder reads what won).
    #[error("{what} the span record {object}")]
    Cluster {
        /// What was being done.
        what: &'static str,
        /// The record's object.
        object: String,
        /// The cluster's answer.
        #[source]
        source: tidemark_ceph::CephError,
    },
    /// Another receiver: the span's lease is no longer this receiver's
    /// (lost here, or the cluster refused our lock, our epoch or our
    /// client): the record was not written, and this coordinator must
    /// stop.
    #[error("the span record {object} belongs to another coordinator now: this one was fenced")]
    Fenced {
        /// The record's object.
        object: String,
    },
}

/// Where a span's record is kept: read whole, replaced whole and
/// atomically. The local store's is the span's directory ([`SpanDir`]);
/// the Ceph store's is an object written under the span's lease, so that a
/// coordinator that lost the lease can never write it.
pub trait SpanStore: Send + Sync + std::fmt::Debug {
    /// The span's record (a new span's when there is none yet).
    fn load(&self) -> Result<SpanRecord, SpanRecordError>;
    /// Replaces the record with `record`, atomically and durably.
    fn save(&self, record: &SpanRecord) -> Result<(), SpanRecordError>;
    /// Whether this store may never write again (its lease is gone): the
    /// coordinator using it stops.
    fn fenced(&self) -> bool {
        false
    }
    /// Where the record is, for messages.
    fn describe(&self) -> String;
}

impl SpanRecord {
    /// What the coordinator starts after.
    pub fn saved(&self) -> Saved {
        Saved {
            epoch: Epoch(self.epoch),
            next_point: PointId(self.next_point),
        }
    }

    /// The span points (every member durable), oldest first.
    pub fn span_points(&self) -> impl Iterator<Item = &PointEntry> {
        self.points.iter().filter(|p| p.outcome == Outcome::Durable)
    }

    /// Records what the coordinator reported; `members` names its members
    /// in the coordinator's order, `label` and `app_consistent` describe
    /// the round of `event` (the caller knows them from its start; a
    /// committed point is application-consistent as the event says).
    /// Returns whether the record changed (and must be written).
    pub fn apply(
        &mut self,
        event: &SpanEvent,
        members: &[(Name, Name)],
        label: &str,
        app_consistent: bool,
        now_ns: u64,
    ) -> bool {
        match event {
            SpanEvent::Save(saved) => {
                self.epoch = saved.epoch.0;
                self.next_point = saved.next_point.0;
            }
            SpanEvent::Committed {
                point,
                markers,
                app_consistent: quiesced,
                not_quiesced,
            } => {
                let reason = (!not_quiesced.is_empty()).then(|| {
                    let who = |m: usize| {
                        members
                            .get(m)
                            .map_or_else(|| format!("member {m}"), |(h, g)| format!("{h}/{g}"))
                    };
                    let each: Vec<String> = not_quiesced
                        .iter()
                        .map(|n| format!("{} was not quiesced: {}", who(n.member), n.reason))
                        .collect();
                    format!("crash-consistent: {}", each.join("; "))
                });
                self.points.push(PointEntry {
                    point: point.0,
                    taken_ns: now_ns,
                    app_consistent: *quiesced,
                    label: label.to_string(),
                    outcome: Outcome::Committed,
                    reason,
                    members: members
                        .iter()
                        .zip(markers)
                        .map(|((host, group), (marker, generation))| MemberMarker {
                            host: host.clone(),
                            group: group.clone(),
                            marker: *marker,
                            generation: *generation,
                        })
                        .collect(),
                });
            }
            SpanEvent::Durable { point } => {
                let Some(entry) = self.points.iter_mut().find(|p| p.point == point.0) else {
                    return false;
                };
                entry.outcome = Outcome::Durable;
            }
            SpanEvent::Aborted { point, reason } => {
                let reason = describe(reason, members);
                match self.points.iter_mut().find(|p| p.point == point.0) {
                    // A committed point whose markers did not become
                    // durable in time.
                    Some(entry) => {
                        entry.outcome = Outcome::Aborted;
                        entry.reason = Some(reason);
                        entry.members.clear();
                    }
                    None => self.points.push(PointEntry {
                        point: point.0,
                        taken_ns: now_ns,
                        app_consistent,
                        label: label.to_string(),
                        outcome: Outcome::Aborted,
                        reason: Some(reason),
                        members: Vec::new(),
                    }),
                }
                self.trim_aborted();
            }
        }
        true
    }

    fn trim_aborted(&mut self) {
        let aborted = self
            .points
            .iter()
            .filter(|p| p.outcome == Outcome::Aborted)
            .count();
        let mut drop = aborted.saturating_sub(KEPT_ABORTED);
        self.points.retain(|p| {
            if drop > 0 && p.outcome == Outcome::Aborted {
                drop -= 1;
                return false;
            }
            true
        });
    }
}

/// An abort's reason in the admin's words, members by name.
fn describe(reason: &AbortReason, members: &[(Name, Name)]) -> String {
    let name = |m: usize| match members.get(m) {
        Some((host, group)) => format!("{host}/{group}"),
        None => format!("member {m}"),
    };
    match reason {
        AbortReason::Refused { member, reason, .. } => {
            format!("{} refused: {reason}", name(*member))
        }
        AbortReason::Silent { members: silent } => {
            let names: Vec<String> = silent.iter().map(|m| name(*m)).collect();
            format!("no answer in time from {}", names.join(", "))
        }
        AbortReason::NotInTime { member, how } => match how {
            Some(how) => format!(
                "{}'s hold ended before the release ({})",
                name(*member),
                how.name()
            ),
            None => format!("{} did not answer the release in time", name(*member)),
        },
        AbortReason::LinkLost(member) => format!("{}'s connection went down", name(*member)),
        AbortReason::NotDurable(member) => {
            format!("{}'s marker did not become durable in time", name(*member))
        }
        AbortReason::SilentQuiesce { members: silent } => {
            let names: Vec<String> = silent.iter().map(|m| name(*m)).collect();
            format!("no answer to the quiesce in time from {}", names.join(", "))
        }
    }
}

/// A span's directory.
#[derive(Debug, Clone)]
pub struct SpanDir {
    dir: PathBuf,
}

impl SpanDir {
    /// The directory of `span` under `data_dir`, created (0700) if absent.
    pub fn open(data_dir: &Path, span: &Name) -> Result<SpanDir, SpanRecordError> {
        let dir = data_dir.join(SPANS_DIR).join(span.as_str());
        create_private_dir_all(&dir).map_err(|source| SpanRecordError::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
        Ok(SpanDir { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The span's record (a new span's when there is none yet).
    pub fn load(&self) -> Result<SpanRecord, SpanRecordError> {
        load_from(&FsDir::at(&self.dir), &self.dir.join(RECORD_FILE))
    }

    /// Writes `record` atomically and durably.
    pub fn save(&self, record: &SpanRecord) -> Result<(), SpanRecordError> {
        save_to(&FsDir::at(&self.dir), &self.dir.join(RECORD_FILE), record)
    }
}

impl SpanStore for SpanDir {
    fn load(&self) -> Result<SpanRecord, SpanRecordError> {
        SpanDir::load(self)
    }

    fn save(&self, record: &SpanRecord) -> Result<(), SpanRecordError> {
        SpanDir::save(self, record)
    }

    fn describe(&self) -> String {
        self.dir.join(RECORD_FILE).display().to_string()
    }
}

/// The record in `bytes` (read from `path`, for messages).
pub fn decode(bytes: &[u8], path: &Path) -> Result<SpanRecord, SpanRecordError> {
    let damaged = |reason: String| SpanRecordError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() as u64 > MAX_RECORD {
        return Err(damaged(format!(
            "{} bytes, more than a record holds",
            bytes.len()
        )));
    }
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let version: Version = serde_json::from_slice(bytes).map_err(|e| damaged(e.to_string()))?;
    if version.version != RECORD_VERSION {
        return Err(SpanRecordError::UnsupportedVersion {
            path: path.to_path_buf(),
            version: version.version,
        });
    }
    serde_json::from_slice(bytes).map_err(|e| damaged(e.to_string()))
}

/// The record's bytes as every store keeps them.
pub fn encode(record: &SpanRecord) -> Vec<u8> {
    // A record of plain numbers, strings and vectors always encodes.
    serde_json::to_vec_pretty(record).unwrap_or_default()
}

fn load_from<D: LogDir>(dir: &D, path: &Path) -> Result<SpanRecord, SpanRecordError> {
    let io = |what| {
        move |source| SpanRecordError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = match dir.open(RECORD_FILE, false) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SpanRecord::default()),
        Err(e) => return Err(io("opening")(e)),
    };
    let size = file.size().map_err(io("reading"))?;
    let damaged = |reason: String| SpanRecordError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    if size > MAX_RECORD {
        return Err(damaged(format!("{size} bytes, more than a record holds")));
    }
    let mut bytes = vec![0; size as usize];
    let mut at = 0;
    while at < bytes.len() {
        match file
            .read_at(&mut bytes[at..], at as u64)
            .map_err(io("reading"))?
        {
            0 => return Err(damaged(format!("cut at {at} of {size} bytes"))),
            n => at += n,
        }
    }
    decode(&bytes, path)
}

fn save_to<D: LogDir>(dir: &D, path: &Path, record: &SpanRecord) -> Result<(), SpanRecordError> {
    let bytes = encode(record);
    replace(dir, RECORD_TMP, RECORD_FILE, &bytes, Durability::Durable).map_err(|e| {
        SpanRecordError::Io {
            what: "writing",
            path: path.to_path_buf(),
            source: e.into(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_durable::SimDir;
    use tidemark_span::{ReleasedHow, Saved};

    fn members() -> Vec<(Name, Name)> {
        vec![
            (Name::from_static("web1"), Name::from_static("default")),
            (Name::from_static("db1"), Name::from_static("data")),
        ]
    }

    fn path() -> PathBuf {
        PathBuf::from("spans/shop/record")
    }

    #[test]
    fn a_new_span_starts_after_nothing_and_a_saved_one_where_it_was() {
        let dir = SimDir::new();
        let mut record = load_from(&dir, &path()).unwrap();
        assert_eq!(record, SpanRecord::default());
        assert_eq!(record.saved(), Saved::default());
        let saved = Saved {
            epoch: Epoch(3),
            next_point: PointId(42),
        };
        assert!(record.apply(&SpanEvent::Save(saved), &members(), "", false, 0));
        save_to(&dir, &path(), &record).unwrap();
        assert_eq!(load_from(&dir, &path()).unwrap().saved(), saved);
    }

    #[test]
    fn a_round_is_recorded_committed_then_durable_or_aborted() {
        let mut record = SpanRecord::default();
        let markers = vec![(Seq(10), 1), (Seq(20), 2)];
        record.apply(
            &SpanEvent::Committed {
                point: PointId(1),
                markers: markers.clone(),
                app_consistent: false,
                not_quiesced: Vec::new(),
            },
            &members(),
            "span-shop-1",
            false,
            5,
        );
        record.apply(
            &SpanEvent::Committed {
                point: PointId(2),
                markers,
                app_consistent: true,
                not_quiesced: Vec::new(),
            },
            &members(),
            "span-shop-2",
            true,
            6,
        );
        assert_eq!(record.span_points().count(), 0);
        record.apply(
            &SpanEvent::Durable { point: PointId(1) },
            &members(),
            "",
            false,
            7,
        );
        record.apply(
            &SpanEvent::Aborted {
                point: PointId(2),
                reason: AbortReason::NotDurable(1),
            },
            &members(),
            "",
            false,
            8,
        );
        record.apply(
            &SpanEvent::Aborted {
                point: PointId(3),
                reason: AbortReason::NotInTime {
                    member: 0,
                    how: Some(ReleasedHow::Expired),
                },
            },
            &members(),
            "span-shop-3",
            false,
            9,
        );
        let points: Vec<_> = record.span_points().collect();
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].point, 1);
        assert_eq!(points[0].members[1].host.as_str(), "db1");
        assert_eq!(points[0].members[1].marker, Seq(20));
        assert_eq!(
            record.points[1].reason.as_deref(),
            Some("db1/data's marker did not become durable in time")
        );
        assert!(record.points[1].members.is_empty());
        assert_eq!(
            record.points[2].reason.as_deref(),
            Some("web1/default's hold ended before the release (expired)")
        );
    }

    #[test]
    fn an_app_consistent_point_says_so_or_names_who_was_not_quiesced() {
        let mut record = SpanRecord::default();
        record.apply(
            &SpanEvent::Committed {
                point: PointId(1),
                markers: vec![(Seq(1), 1), (Seq(2), 1)],
                app_consistent: true,
                not_quiesced: Vec::new(),
            },
            &members(),
            "span-shop-1",
            true,
            0,
        );
        record.apply(
            &SpanEvent::Committed {
                point: PointId(2),
                markers: vec![(Seq(3), 1), (Seq(4), 1)],
                app_consistent: false,
                not_quiesced: vec![tidemark_span::NotQuiesced {
                    member: 1,
                    reason: "pre-hook `flush` failed".into(),
                }],
            },
            &members(),
            "span-shop-2",
            true,
            0,
        );
        assert!(record.points[0].app_consistent);
        assert_eq!(record.points[0].reason, None);
        assert!(!record.points[1].app_consistent);
        assert_eq!(
            record.points[1].reason.as_deref(),
            Some("crash-consistent: db1/data was not quiesced: pre-hook `flush` failed")
        );
        // A record of a release before app-consistent span points (no
        // flag) reads as crash-consistent points.
        let mut json = serde_json::to_value(&record).unwrap();
        json["points"][0]
            .as_object_mut()
            .unwrap()
            .remove("app_consistent");
        let old: SpanRecord = serde_json::from_value(json).unwrap();
        assert!(!old.points[0].app_consistent);
    }

    #[test]
    fn only_the_last_aborted_rounds_are_kept() {
        let mut record = SpanRecord::default();
        record.apply(
            &SpanEvent::Committed {
                point: PointId(1),
                markers: vec![(Seq(1), 1), (Seq(2), 1)],
                app_consistent: false,
                not_quiesced: Vec::new(),
            },
            &members(),
            "l",
            false,
            0,
        );
        for p in 2..(KEPT_ABORTED as u64 + 12) {
            record.apply(
                &SpanEvent::Aborted {
                    point: PointId(p),
                    reason: AbortReason::LinkLost(0),
                },
                &members(),
                "l",
                false,
                0,
            );
        }
        assert_eq!(record.points.len(), KEPT_ABORTED + 1);
        assert_eq!(record.points[0].point, 1, "the committed one stays");
        assert_eq!(record.points[1].point, 12);
    }

    #[test]
    fn a_damaged_or_newer_record_is_refused_by_name() {
        let dir = SimDir::new();
        replace(
            &dir,
            "t",
            RECORD_FILE,
            b"{\"version\":1,\"epo",
            Durability::Durable,
        )
        .unwrap();
        assert!(matches!(
            load_from(&dir, &path()),
            Err(SpanRecordError::Damaged { .. })
        ));
        replace(
            &dir,
            "t",
            RECORD_FILE,
            b"{\"version\":2}",
            Durability::Durable,
        )
        .unwrap();
        assert!(matches!(
            load_from(&dir, &path()),
            Err(SpanRecordError::UnsupportedVersion { version: 2, .. })
        ));
        let message = load_from(&dir, &path()).unwrap_err().to_string();
        assert!(message.contains("spans/shop/record"), "{message}");
    }

    #[test]
    fn a_save_cut_by_a_crash_leaves_the_old_record_or_the_new() {
        let probe = SimDir::new();
        let old = SpanRecord::default();
        let mut new = SpanRecord::default();
        new.apply(
            &SpanEvent::Save(Saved {
                epoch: Epoch(1),
                next_point: PointId(2),
            }),
            &members(),
            "",
            false,
            0,
        );
        save_to(&probe, &path(), &old).unwrap();
        let before = probe.syncs();
        save_to(&probe, &path(), &new).unwrap();
        let syncs = probe.syncs() - before;
        for cut in 1..=syncs + 1 {
            let dir = SimDir::new();
            save_to(&dir, &path(), &old).unwrap();
            dir.cut_power_at_sync(before + cut);
            let done = save_to(&dir, &path(), &new).is_ok();
            let after = SimDir::from_files(dir.after_power_cut());
            let read = load_from(&after, &path()).unwrap();
            if done {
                assert_eq!(read, new, "cut at sync {cut}");
            } else {
                assert!(read == old || read == new, "cut at sync {cut}");
            }
        }
    }
}
