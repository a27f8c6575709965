//! The audit trail: every state-changing action of the console (who, with
//! which role, what, on what, when, and how it ended), in the receiver's
//! log and appended to `.console/audit.log` in its data directory, one
//! line each, synced before the action's answer is sent.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::auth::Principal;
use crate::view::utc;

/// The audit file in the receiver's data directory.
pub const AUDIT_FILE: &str = ".console/audit.log";

/// Appends actions to the audit file.
#[derive(Debug)]
pub struct Audit {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Audit {
    /// The audit file of the receiver whose data directory is `data_dir`.
    pub fn new(data_dir: &Path) -> Audit {
        Audit {
            path: data_dir.join(AUDIT_FILE),
            lock: Mutex::new(()),
        }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that `who` did `action` on `target` at `now_ns` with
    /// `outcome`; a failure to write is logged, the action stands.
    pub fn record(&self, who: &Principal, action: &str, target: &str, outcome: &str, now_ns: u64) {
        tracing::info!(
            user = %who.name,
            role = %who.role,
            proof = ?who.proof,
            action,
            target,
            outcome,
            "console action"
        );
        let line = format!(
            "{}\tuser={}\trole={}\tproof={:?}\taction={action}\ttarget={target}\toutcome={}\n",
            utc(now_ns),
            who.name,
            who.role,
            who.proof,
            outcome.replace(['\n', '\t'], " ")
        );
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let written = self
            .path
            .parent()
            .map_or(Ok(()), tidemark_durable::create_private_dir_all)
            .and_then(|()| {
                tidemark_durable::private_file()
                    .append(true)
                    .create(true)
                    .open(&self.path)
            })
            .and_then(|mut f| {
                f.write_all(line.as_bytes())?;
                f.sync_data()
            });
        if let Err(e) = written {
            tracing::error!(error = %e, file = %self.path.display(), "console: writing the audit file");
        }
    }
}
