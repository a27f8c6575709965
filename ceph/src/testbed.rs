//! A throwaway one-node Ceph cluster for tests: `scripts/ceph-testbed.sh`
//! started once per test process, and stopped by a watchdog when that
//! process is gone (Rust tests have no global teardown).
//!
//! With `CEPH_CONF` set, tests use that cluster instead (pool from
//! `CEPH_TESTBED_RBD_POOL`, default `rbd`) and nothing is started.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The script that starts and stops the cluster.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/ceph-testbed.sh");

/// The daemon whose absence means Ceph is not installed here.
const MON: &str = "ceph-mon";

/// Why the testbed could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// Local: the script could not be run.
    #[error("cannot run {SCRIPT}")]
    Spawn {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Local: the script failed (its log is in the message).
    #[error("{SCRIPT} up {dir} failed ({status}):\n{log}")]
    Failed {
        /// The cluster's directory.
        dir: PathBuf,
        /// The script's exit status.
        status: std::process::ExitStatus,
        /// The script's standard error.
        log: String,
    },
    /// Local: the script printed no `CEPH_CONF`.
    #[error("{SCRIPT} up printed no CEPH_CONF")]
    NoConf,
}

/// A running cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Testbed {
    /// Its `ceph.conf`.
    pub conf: PathBuf,
    /// The pool initialised for RBD.
    pub pool: String,
    /// The directory of a cluster this process started (`None` for one
    /// named by `CEPH_CONF`): its daemons' pid files are in `DIR/run/`.
    pub dir: Option<PathBuf>,
}

#[cfg(feature = "librados")]
impl Testbed {
    /// A client of this cluster (`client.admin`, the testbed runs without
    /// authentication) on its RBD pool in `namespace`, whose operations
    /// fail after `op_timeout`.
    pub fn connect(
        &self,
        namespace: &str,
        op_timeout: std::time::Duration,
    ) -> Result<crate::RadosCluster, crate::CephError> {
        crate::RadosCluster::connect(&crate::rados::ClusterOptions {
            connect: crate::rados::ConnectOptions {
                conf: &self.conf,
                user: "client.admin",
                op_timeout,
                settings: &[],
            },
            pool: &self.pool,
            namespace,
        })
    }
}

/// Whether Ceph's daemons are installed (`ceph-mon` on `PATH`).
pub fn installed() -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(MON).is_file())
}

/// The cluster shared by this process's tests: `Ok(None)` when Ceph is not
/// installed and no `CEPH_CONF` names a running cluster.
pub fn shared() -> Result<Option<&'static Testbed>, &'static TestbedError> {
    static SHARED: OnceLock<Result<Option<Testbed>, TestbedError>> = OnceLock::new();
    SHARED.get_or_init(start).as_ref().map(Option::as_ref)
}

/// The shared cluster for a test, or `None` when the test must skip (it
/// says why on stderr): Ceph is not installed and no `CEPH_CONF` names a
/// cluster. Under `CI` that is a failure instead (the test command installs
/// Ceph, so its tests must run there), as is a cluster that does not start.
pub fn for_test() -> Option<&'static Testbed> {
    match shared() {
        Ok(Some(tb)) => Some(tb),
        Ok(None) if std::env::var_os("CI").is_some() => {
            panic!("ceph-mon is not installed, and CI must run the Ceph tests (scripts/test.sh installs it)")
        }
        Ok(None) => {
            eprintln!("skipping: Ceph is not installed (apt-get install ceph-mon ceph-osd ceph-common) and CEPH_CONF is not set");
            None
        }
        Err(e) => panic!("cannot start the Ceph testbed: {e}"),
    }
}

fn start() -> Result<Option<Testbed>, TestbedError> {
    if let Some(conf) = std::env::var_os("CEPH_CONF") {
        let pool = std::env::var("CEPH_TESTBED_RBD_POOL").unwrap_or_else(|_| "rbd".into());
        return Ok(Some(Testbed {
            conf: conf.into(),
            pool,
            dir: None,
        }));
    }
    if !installed() {
        return Ok(None);
    }
    let exe = std::env::current_exe().ok();
    let name = exe
        .as_deref()
        .and_then(Path::file_stem)
        .and_then(|s| s.to_str())
        .unwrap_or("test");
    let dir = std::env::temp_dir().join(format!("tidemark-ceph-{name}-{}", std::process::id()));
    let out = Command::new(SCRIPT)
        .arg("up")
        .arg(&dir)
        .env("CEPH_TESTBED_RGW", "0")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Spawn { source })?;
    // Stop the cluster once this process is gone, whatever the outcome of
    // `up` (a half-started cluster is stopped too).
    let watchdog = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; exec \"$0\" down \"$1\" >/dev/null 2>&1",
        pid = std::process::id()
    );
    let _ = Command::new("setsid")
        .args(["sh", "-c", &watchdog, SCRIPT])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    if !out.status.success() {
        return Err(TestbedError::Failed {
            dir,
            status: out.status,
            log: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let var = |name: &str| {
        stdout.lines().find_map(|l| {
            l.strip_prefix("export ")?
                .strip_prefix(name)?
                .strip_prefix('=')
                .map(str::to_owned)
        })
    };
    let conf = var("CEPH_CONF").ok_or(TestbedError::NoConf)?;
    let pool = var("CEPH_TESTBED_RBD_POOL").unwrap_or_else(|| "rbd".into());
    Ok(Some(Testbed {
        conf: conf.into(),
        pool,
        dir: Some(dir),
    }))
}
