//! Retired hosts: a host taken out of protection for good. Its name goes
//! into the receiver's list of retired hosts (`data-dir/.retired.json`),
//! which the receiver reads at every connection: a certificate naming a
//! retired host is refused, whatever its serial, so one the receiver never
//! saw (renewed just before, or signed by hand) is refused too. The name
//! *is* the identity; enrolling it again takes [`unretire`] first.
//!
//! Its replicas and their history are removed through the store engine,
//! at once or after a stated time ([`retire`] with `keep`): the receiver
//! removes those due when it starts and every hour ([`purge_due`]).
//! Nothing of another host is touched.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tidemark_names::Name;

use crate::store::{StoreEngine, StoreError};

/// The list of retired hosts in the data directory (a name never starts
/// with a dot, so it is never taken for a host's directory).
pub const RETIRED_FILE: &str = ".retired.json";

/// Why the list could not be read or changed, or a replica removed.
#[derive(Debug, thiserror::Error)]
pub enum RetireError {
    /// The list could not be read or written (local disk).
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The list is not what this code writes (damaged or edited by hand).
    #[error("{} is damaged", path.display())]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The host's groups could not be listed.
    #[error("listing the replicas of {host}")]
    List {
        /// The host.
        host: Name,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
    /// A group's replica could not be removed.
    #[error("removing the replica of {host}/{group}")]
    Remove {
        /// The host.
        host: Name,
        /// The group.
        group: Name,
        /// Why.
        #[source]
        source: Box<StoreError>,
    },
    /// The host is not retired (for [`unretire`]).
    #[error("{0} is not retired")]
    NotRetired(Name),
}

/// One retired host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Retired {
    /// The host.
    pub host: Name,
    /// When it was retired (Unix seconds).
    pub retired_unix: i64,
    /// When its replicas are to be removed (Unix seconds); none once they
    /// are.
    pub remove_after_unix: Option<i64>,
}

/// The list of retired hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RetiredList {
    /// The hosts, in the order they were retired.
    pub hosts: Vec<Retired>,
}

impl RetiredList {
    /// The entry of `host`, if it is retired.
    pub fn get(&self, host: &Name) -> Option<&Retired> {
        self.hosts.iter().find(|r| &r.host == host)
    }
}

fn list_path(data_dir: &Path) -> PathBuf {
    data_dir.join(RETIRED_FILE)
}

/// The list in `data_dir` (empty when there is none).
pub fn load(data_dir: &Path) -> Result<RetiredList, RetireError> {
    let path = list_path(data_dir);
    match std::fs::read(&path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).map_err(|source| RetireError::Damaged { path, source })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RetiredList::default()),
        Err(source) => Err(RetireError::Io {
            what: "reading",
            path,
            source,
        }),
    }
}

fn save(data_dir: &Path, list: &RetiredList) -> Result<(), RetireError> {
    let path = list_path(data_dir);
    let mut bytes = serde_json::to_vec_pretty(list).map_err(|source| RetireError::Damaged {
        path: path.clone(),
        source,
    })?;
    bytes.push(b'\n');
    tidemark_durable::replace(
        &tidemark_durable::FsDir::at(data_dir),
        &format!("{RETIRED_FILE}.new"),
        RETIRED_FILE,
        &bytes,
        tidemark_durable::Durability::Durable,
    )
    .map_err(|e| RetireError::Io {
        what: "writing",
        path,
        source: e.into(),
    })
}

/// What [`retire`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetireOutcome {
    /// The groups whose replicas were removed now.
    pub removed: Vec<Name>,
    /// When the replicas will be removed, when kept.
    pub remove_after_unix: Option<i64>,
}

/// Retires `host` at `now` (Unix seconds): from now on refused; its
/// replicas removed now, or kept for `keep_secs` and removed by the
/// receiver after. Retiring a retired host again changes when its replicas
/// go.
pub fn retire(
    data_dir: &Path,
    engine: &dyn StoreEngine,
    host: &Name,
    keep_secs: Option<u64>,
    now: i64,
) -> Result<RetireOutcome, RetireError> {
    let mut list = load(data_dir)?;
    let remove_after =
        now.saturating_add(keep_secs.map_or(0, |k| i64::try_from(k).unwrap_or(i64::MAX)));
    list.hosts.retain(|r| &r.host != host);
    list.hosts.push(Retired {
        host: host.clone(),
        retired_unix: now,
        remove_after_unix: Some(remove_after),
    });
    // Refused first, removed after: a crash in between leaves it refused
    // with its replicas still due.
    save(data_dir, &list)?;
    if keep_secs.is_some_and(|k| k > 0) {
        return Ok(RetireOutcome {
            removed: Vec::new(),
            remove_after_unix: Some(remove_after),
        });
    }
    let removed = remove_replicas(data_dir, engine, host)?;
    Ok(RetireOutcome {
        removed,
        remove_after_unix: None,
    })
}

fn remove_replicas(
    data_dir: &Path,
    engine: &dyn StoreEngine,
    host: &Name,
) -> Result<Vec<Name>, RetireError> {
    let groups = engine.groups(host).map_err(|source| RetireError::List {
        host: host.clone(),
        source: Box::new(source),
    })?;
    for group in &groups {
        engine
            .remove(host, group)
            .map_err(|source| RetireError::Remove {
                host: host.clone(),
                group: group.clone(),
                source: Box::new(source),
            })?;
    }
    let mut list = load(data_dir)?;
    for r in &mut list.hosts {
        if &r.host == host {
            r.remove_after_unix = None;
        }
    }
    save(data_dir, &list)?;
    // The certificate it last connected with goes too.
    let _ = std::fs::remove_file(
        data_dir
            .join(crate::renew::CERTIFICATES_DIR)
            .join(format!("{host}.der")),
    );
    Ok(groups)
}

/// Removes the replicas of every retired host whose time is up at `now`;
/// returns each host with the groups removed.
pub fn purge_due(
    data_dir: &Path,
    engine: &dyn StoreEngine,
    now: i64,
) -> Result<Vec<(Name, Vec<Name>)>, RetireError> {
    let list = load(data_dir)?;
    let mut done = Vec::new();
    for r in list.hosts {
        if r.remove_after_unix.is_some_and(|t| t <= now) {
            let groups = remove_replicas(data_dir, engine, &r.host)?;
            done.push((r.host, groups));
        }
    }
    Ok(done)
}

/// Takes `host` off the list, so it can be enrolled again. Its replicas,
/// if still kept, stay.
pub fn unretire(data_dir: &Path, host: &Name) -> Result<(), RetireError> {
    let mut list = load(data_dir)?;
    let before = list.hosts.len();
    list.hosts.retain(|r| &r.host != host);
    if list.hosts.len() == before {
        return Err(RetireError::NotRetired(host.clone()));
    }
    save(data_dir, &list)
}

/// Why `host` is refused, if it is retired: the reason the shipper is
/// told. A list that cannot be read refuses nobody (and is logged).
pub fn refusal(data_dir: &Path, host: &Name) -> Option<String> {
    match load(data_dir) {
        Ok(list) => list.get(host).map(|_| {
            format!(
                "host {host} is retired on this receiver (its certificate is revoked); \
                 enrol it again after `tidemark receiver unretire`"
            )
        }),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the list of retired hosts");
            None
        }
    }
}

/// How often the receiver looks for replicas of retired hosts whose time
/// is up.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the replicas of retired hosts when their time is up: now and
/// every [`PURGE_EVERY`] until `stop`.
pub(crate) fn start_purging(
    engine: std::sync::Arc<dyn StoreEngine>,
    data_dir: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            let now = i64::try_from(tidemark_changelog::now_ns() / 1_000_000_000).unwrap_or(0);
            match tokio::task::block_in_place(|| purge_due(&data_dir, &*engine, now)) {
                Ok(done) => {
                    for (host, groups) in done {
                        tracing::info!(%host, groups = groups.len(), "removed the replicas of a retired host");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot remove the replicas of a retired host yet")
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(PURGE_EVERY) => {}
                _ = stop.changed() => if *stop.borrow() { return },
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalEngine;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn a_retired_host_loses_its_replicas_and_no_other_host_is_touched() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(tmp.path());
        for (h, g) in [("db1", "a"), ("db1", "b"), ("db2", "a")] {
            drop(engine.open(&n(h), &n(g)).unwrap());
        }
        let out = retire(tmp.path(), &engine, &n("db1"), None, 100).unwrap();
        assert_eq!(out.removed, vec![n("a"), n("b")]);
        assert!(!tmp.path().join("db1").exists());
        assert!(engine.exists(&n("db2"), &n("a")));
        let list = load(tmp.path()).unwrap();
        assert_eq!(list.get(&n("db1")).unwrap().remove_after_unix, None);
        assert!(list.get(&n("db2")).is_none());
        unretire(tmp.path(), &n("db1")).unwrap();
        assert!(load(tmp.path()).unwrap().get(&n("db1")).is_none());
        assert!(matches!(
            unretire(tmp.path(), &n("db1")),
            Err(RetireError::NotRetired(_))
        ));
    }

    #[test]
    fn kept_replicas_go_when_their_time_is_up_and_an_open_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(tmp.path());
        drop(engine.open(&n("db1"), &n("a")).unwrap());
        let out = retire(tmp.path(), &engine, &n("db1"), Some(30), 100).unwrap();
        assert_eq!(out.remove_after_unix, Some(130));
        assert!(purge_due(tmp.path(), &engine, 129).unwrap().is_empty());
        assert!(engine.exists(&n("db1"), &n("a")));
        // Open by a receiver: refused, and still due.
        let open = engine.open(&n("db1"), &n("a")).unwrap();
        let err = purge_due(tmp.path(), &engine, 130).unwrap_err();
        assert!(
            matches!(
                err,
                RetireError::Remove { ref source, .. } if matches!(**source, StoreError::Locked(_))
            ),
            "{err}"
        );
        drop(open);
        let done = purge_due(tmp.path(), &engine, 130).unwrap();
        assert_eq!(done, vec![(n("db1"), vec![n("a")])]);
        assert!(!engine.exists(&n("db1"), &n("a")));
        assert!(purge_due(tmp.path(), &engine, 200).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_list_is_an_error_not_a_panic() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(RETIRED_FILE), b"{not json").unwrap();
        assert!(matches!(load(tmp.path()), Err(RetireError::Damaged { .. })));
    }
}
