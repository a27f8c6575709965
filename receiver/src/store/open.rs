//! The store engine a receiver's configuration selects (`[receiver.store]`):
//! the one place that turns `kind` and its settings into a
//! [`StoreEngine`], for the receiver's daemon and for the commands that
//! read or fail over its groups from any receiver node.

use tidemark_config::{CephStoreConfig, ReceiverConfig, StoreKind};

use super::{LocalEngine, StoreEngine};

/// Why the configured store engine could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenEngineError {
    /// Configuration (or build): `kind = "ceph"` in a build without the
    /// receiver's cargo feature `ceph`, which links librados and librbd.
    #[error(
        "[receiver.store] kind = \"ceph\", but this tidemark was built without the Ceph store \
         (cargo feature `ceph` of tidemark-receiver, `--features ceph` of the tidemark binary)"
    )]
    CephNotBuilt,
    /// Caller: the Ceph engine itself was asked for, but the receiver's
    /// store is the local one (`kind = "local"`).
    #[error("the receiver's store is the local store, not the Ceph store ([receiver.store] kind = \"local\")")]
    NotCeph,
    /// Configuration or cluster: connecting to the cluster, or opening the
    /// pool and namespace, failed (monitors unreachable, the keyring or
    /// the client's caps wrong, no such pool).
    #[error(
        "cannot reach the Ceph store: {} with {}, pool {:?}, namespace {:?}",
        .settings.user, .settings.conf.display(), .settings.pool, .settings.namespace
    )]
    Ceph {
        /// What was tried: conf, user, pool and namespace.
        settings: Box<CephStoreConfig>,
        /// What the cluster or librados answered.
        #[source]
        source: tidemark_ceph::CephError,
    },
}

/// Opens the store engine `cfg` selects: the local store in `data-dir`,
/// or the Ceph store (connecting to its cluster). `role` says who opens
/// groups through it (e.g. `"receiver"`, `"tidemark failover"`); with the
/// host name and pid it is kept with each group a writer opens, for
/// messages.
pub fn open_engine(
    cfg: &ReceiverConfig,
    role: &str,
) -> Result<Box<dyn StoreEngine>, OpenEngineError> {
    match cfg.store.kind {
        StoreKind::Local => Ok(Box::new(LocalEngine::new(&cfg.data_dir))),
        StoreKind::Ceph => open_ceph(cfg, role),
    }
}

/// Who opens groups, as a store engine keeps it with a group a writer
/// opens: role, host name and pid.
pub fn owner(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{role} on {}, pid {}", host.trim(), std::process::id())
}

#[cfg(feature = "ceph")]
fn open_ceph(cfg: &ReceiverConfig, role: &str) -> Result<Box<dyn StoreEngine>, OpenEngineError> {
    Ok(Box::new(connect(cfg, role)?))
}

#[cfg(not(feature = "ceph"))]
fn open_ceph(_: &ReceiverConfig, _: &str) -> Result<Box<dyn StoreEngine>, OpenEngineError> {
    Err(OpenEngineError::CephNotBuilt)
}

/// Connects to the Ceph store `cfg` names (`kind = "ceph"`, else
/// [`OpenEngineError::NotCeph`]), for callers that need the engine itself
/// (RBD snapshots and clones of a failover).
#[cfg(feature = "ceph")]
pub fn connect(
    cfg: &ReceiverConfig,
    role: &str,
) -> Result<super::ceph::CephEngine<tidemark_ceph::RadosCluster>, OpenEngineError> {
    use tidemark_ceph::rados::{ClusterOptions, ConnectOptions};

    let Some(ceph) = cfg.store.ceph() else {
        return Err(OpenEngineError::NotCeph);
    };
    let cluster = tidemark_ceph::RadosCluster::connect(&ClusterOptions {
        connect: ConnectOptions {
            conf: &ceph.conf,
            user: &ceph.user,
            op_timeout: ceph.op_timeout,
            settings: &[],
        },
        pool: &ceph.pool,
        namespace: &ceph.namespace,
    })
    .map_err(|source| OpenEngineError::Ceph {
        settings: Box::new(ceph.clone()),
        source,
    })?;
    // Every writer takes each group's lease (several receivers, and the
    // commands, share the store); the lock and the group record where
    // this node's receiver is reached, for redirected shippers.
    let advertise = ceph
        .advertise
        .clone()
        .unwrap_or_else(|| cfg.listen.to_string());
    tracing::debug!(role, %advertise, "group leases of the Ceph store");
    let lease = crate::lease::LeaseConfig {
        duration: ceph.lease,
        blocklist_expire: ceph.blocklist_expire,
    };
    super::ceph::CephEngine::with_lease(cluster, &advertise, lease).map_err(|source| {
        OpenEngineError::Ceph {
            settings: Box::new(ceph.clone()),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tidemark_config::StoreConfig;

    /// The default configuration opens the local store in `data-dir`.
    #[test]
    fn the_default_is_the_local_store_in_the_data_dir() {
        let cfg = ReceiverConfig {
            data_dir: PathBuf::from("/srv/replicas"),
            ..ReceiverConfig::default()
        };
        let engine = open_engine(&cfg, "test").unwrap();
        let (host, group) = (
            tidemark_names::Name::from_static("h1"),
            tidemark_names::Name::from_static("g"),
        );
        assert_eq!(engine.describe(&host, &group), "/srv/replicas/h1/g");
    }

    /// Without the feature, the Ceph store is refused naming the feature;
    /// with it, an unreachable cluster is an error naming what was tried.
    #[test]
    fn the_ceph_store_needs_the_feature_and_a_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ceph.conf");
        // No monitor answers on a closed local port.
        std::fs::write(&conf, "[global]\nmon host = 127.0.0.1:9\n").unwrap();
        let cfg = ReceiverConfig {
            store: StoreConfig {
                kind: StoreKind::Ceph,
                conf: Some(conf.clone()),
                pool: Some("rbd".into()),
                op_timeout: Some(tidemark_config::Duration::from_secs(1)),
                ..StoreConfig::default()
            },
            ..ReceiverConfig::default()
        };
        let err = open_engine(&cfg, "test").unwrap_err();
        let message = err.to_string();
        if cfg!(feature = "ceph") {
            assert!(matches!(err, OpenEngineError::Ceph { .. }), "{message}");
            assert!(
                message.contains("client.tidemark") && message.contains("\"rbd\""),
                "{message}"
            );
        } else {
            assert!(matches!(err, OpenEngineError::CephNotBuilt), "{message}");
            assert!(message.contains("feature `ceph`"), "{message}");
        }
    }

    /// The owner kept with a group names the role and this process.
    #[test]
    fn the_owner_names_the_role_and_the_process() {
        let owner = owner("receiver");
        assert!(owner.starts_with("receiver on "), "{owner}");
        assert!(
            owner.ends_with(&format!("pid {}", std::process::id())),
            "{owner}"
        );
    }
}
