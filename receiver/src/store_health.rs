//! Whether each group's store answers: a group whose store (a Ceph
//! cluster) did not answer within its op timeout, or whose lease lapsed
//! because no renewal was answered in time, is **degraded** until an open
//! or a commit of it succeeds again. A degraded group acknowledges nothing
//! (nothing was made durable); its shipper backs off, the protected host's
//! log grows, and the group resumes by itself once the store answers.
//!
//! [`StoreHealth`] is the record the daemon keeps (no I/O, the time passed
//! in); [`cluster_unanswered`] tells such an error from the others
//! (refused, damaged, fenced: those are not an outage).

use std::collections::BTreeMap;
use std::error::Error;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tidemark_durable::{replace, Durability, FsDir};

use tidemark_ceph::CephError;
use tidemark_names::Name;

use crate::lease::LostReason;

/// The file in the receiver's data directory that says which groups are
/// degraded now, for `tidemark status` on the same node: JSON,
/// `{"degraded": [{"host", "group", "reason", "since_ns"}]}`, replaced
/// whole when a group becomes degraded or recovers (a crash may leave the
/// previous content, never a torn one; the next change rewrites it).
pub const HEALTH_FILE: &str = "store-health.json";

/// Why a group is degraded, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Degraded {
    /// The error, one line.
    pub reason: String,
    /// When it was first seen (ns since the Unix epoch).
    pub since_ns: u64,
}

/// The degraded groups of one receiver, by host and group.
#[derive(Debug, Default, Clone)]
pub struct StoreHealth {
    degraded: BTreeMap<(Name, Name), Degraded>,
}

impl StoreHealth {
    /// A store operation of the group failed with `error`: the group is
    /// degraded if the store did not answer ([`cluster_unanswered`]).
    /// Returns whether this made it degraded (it was not before).
    pub fn handle_failure(
        &mut self,
        host: &Name,
        group: &Name,
        error: &(dyn Error + 'static),
        now_ns: u64,
    ) -> bool {
        if !cluster_unanswered(error) {
            return false;
        }
        self.handle_unanswered(host, group, &chain(error), now_ns)
    }

    /// A store operation of the group found the store not answering
    /// (`error`, one line, said so: see [`cluster_unanswered`]). Returns
    /// whether this made the group degraded (it was not before).
    pub fn handle_unanswered(
        &mut self,
        host: &Name,
        group: &Name,
        error: &str,
        now_ns: u64,
    ) -> bool {
        let key = (host.clone(), group.clone());
        let reason = format!("the store did not answer within op-timeout: {error}");
        match self.degraded.get_mut(&key) {
            Some(d) => {
                d.reason = reason;
                false
            }
            None => {
                self.degraded.insert(
                    key,
                    Degraded {
                        reason,
                        since_ns: now_ns,
                    },
                );
                true
            }
        }
    }

    /// An open or a commit of the group succeeded: the store answers.
    /// Returns what it was degraded by, if it was.
    pub fn handle_success(&mut self, host: &Name, group: &Name) -> Option<Degraded> {
        if self.degraded.is_empty() {
            return None;
        }
        self.degraded.remove(&(host.clone(), group.clone()))
    }

    /// Whether the group is degraded, and why.
    pub fn degraded(&self, host: &Name, group: &Name) -> Option<&Degraded> {
        self.degraded.get(&(host.clone(), group.clone()))
    }

    /// Every degraded group.
    pub fn all(&self) -> impl Iterator<Item = (&(Name, Name), &Degraded)> {
        self.degraded.iter()
    }

    /// Whether any group is degraded (the receiver is, then).
    pub fn any(&self) -> bool {
        !self.degraded.is_empty()
    }
}

/// One degraded group as [`HEALTH_FILE`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DegradedGroup {
    /// The host.
    pub host: String,
    /// The group.
    pub group: String,
    /// Why, and since when.
    #[serde(flatten)]
    pub degraded: Degraded,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct HealthFile {
    degraded: Vec<DegradedGroup>,
}

/// Replaces [`HEALTH_FILE`] in `data_dir` with what `health` says.
pub fn write(data_dir: &Path, health: &StoreHealth) -> io::Result<()> {
    let file = HealthFile {
        degraded: health
            .all()
            .map(|((host, group), d)| DegradedGroup {
                host: host.to_string(),
                group: group.to_string(),
                degraded: d.clone(),
            })
            .collect(),
    };
    let bytes = serde_json::to_vec(&file).map_err(io::Error::other)?;
    let tmp = format!("{HEALTH_FILE}.tmp");
    replace(
        &FsDir::at(data_dir),
        &tmp,
        HEALTH_FILE,
        &bytes,
        Durability::Visible,
    )?;
    Ok(())
}

/// The degraded groups [`HEALTH_FILE`] in `data_dir` lists; none when
/// there is no such file (no receiver ran there, or none of this release).
pub fn read(data_dir: &Path) -> io::Result<Vec<DegradedGroup>> {
    let bytes = match std::fs::read(data_dir.join(HEALTH_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let file: HealthFile = serde_json::from_slice(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(file.degraded)
}

/// Whether `error` (or a cause of it) says the store did not answer in
/// time: a cluster operation timed out, or a lease lapsed because no
/// renewal was answered in time.
pub fn cluster_unanswered(error: &(dyn Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(ceph) = e.downcast_ref::<CephError>() {
            if matches!(ceph, CephError::TimedOut { .. }) {
                return true;
            }
        }
        if e.downcast_ref::<LostReason>() == Some(&LostReason::Lapsed) {
            return true;
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                return true;
            }
            // An I/O error's own cause is not its `source` (that skips
            // it): look at what it wraps.
            if let Some(inner) = io.get_ref() {
                if cluster_unanswered(inner) {
                    return true;
                }
            }
        }
        next = e.source();
    }
    false
}

/// An error and its causes, one line.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    crate::daemon::error_chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use std::path::PathBuf;

    fn io_store_error(source: io::Error) -> StoreError {
        StoreError::Io {
            context: "committing",
            path: PathBuf::from("ceph:h+g"),
            source,
        }
    }

    /// A timed-out cluster operation, seen through the store's I/O error
    /// or through a failed takeover, and a lapsed lease degrade the group;
    /// a fenced receiver, a refused or a damaged store do not.
    #[test]
    fn only_a_store_that_did_not_answer_degrades_the_group() {
        let timed_out = || CephError::TimedOut { op: "operate" };
        assert!(cluster_unanswered(&io_store_error(io::Error::new(
            io::ErrorKind::TimedOut,
            timed_out()
        ))));
        assert!(cluster_unanswered(&StoreError::LeaseLost {
            group: "ceph:h+g".into(),
            source: LostReason::TakeoverFailed {
                step: "lock",
                source: timed_out(),
            },
        }));
        assert!(cluster_unanswered(&io_store_error(io::Error::new(
            io::ErrorKind::PermissionDenied,
            LostReason::Lapsed
        ))));
        assert!(!cluster_unanswered(&io_store_error(io::Error::new(
            io::ErrorKind::PermissionDenied,
            LostReason::Fenced
        ))));
        assert!(!cluster_unanswered(&StoreError::OwnedElsewhere {
            group: "ceph:h+g".into(),
            owner: None,
        }));
        assert!(!cluster_unanswered(&StoreError::Damaged {
            path: PathBuf::from("ceph:h+g"),
            reason: "no state object".into(),
        }));
    }

    /// Degraded from the first failure (the time kept), cleared by the
    /// next success; other groups are not touched.
    #[test]
    fn a_group_is_degraded_from_the_first_timeout_until_a_success() {
        let (h, g, other) = (
            Name::from_static("h"),
            Name::from_static("g"),
            Name::from_static("o"),
        );
        let timeout = || io_store_error(io::Error::new(io::ErrorKind::TimedOut, "slow"));
        let mut health = StoreHealth::default();
        assert!(!health.handle_failure(&h, &g, &StoreError::InvalidBlockSize, 1));
        assert!(!health.any());
        assert!(health.handle_failure(&h, &g, &timeout(), 5));
        assert!(!health.handle_failure(&h, &g, &timeout(), 9));
        let d = health.degraded(&h, &g).unwrap();
        assert_eq!(d.since_ns, 5);
        assert!(d.reason.contains("op-timeout"), "{}", d.reason);
        assert!(health.any());
        assert_eq!(health.handle_success(&h, &other), None);
        assert_eq!(health.handle_success(&h, &g).map(|d| d.since_ns), Some(5));
        assert!(!health.any());
        assert_eq!(health.handle_success(&h, &g), None);
    }

    /// The health file says which groups are degraded and why; none
    /// without a file.
    #[test]
    fn the_health_file_lists_the_degraded_groups() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Vec::new());
        let (h, g) = (Name::from_static("h"), Name::from_static("g"));
        let mut health = StoreHealth::default();
        health.handle_unanswered(&h, &g, "operate timed out", 7);
        write(dir.path(), &health).unwrap();
        let listed = read(dir.path()).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].host.as_str(), listed[0].group.as_str()),
            ("h", "g")
        );
        assert_eq!(listed[0].degraded, *health.degraded(&h, &g).unwrap());
        health.handle_success(&h, &g);
        write(dir.path(), &health).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Vec::new());
    }
}
