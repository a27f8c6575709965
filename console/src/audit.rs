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
        self.append(
            &who.name,
            &who.role.to_string(),
            &format!("{:?}", who.proof),
            action,
            target,
            outcome,
            now_ns,
        );
    }

    /// Records that password logins for `name` from `address` are
    /// refused from `now_ns` on, for `retry_after`, after `failures`
    /// failed ones (the most of the name's and the address's counts).
    pub fn record_lockout(
        &self,
        name: &str,
        address: std::net::IpAddr,
        failures: u32,
        retry_after: std::time::Duration,
        now_ns: u64,
    ) {
        let outcome = format!(
            "locked out for {} s after {failures} failed logins",
            retry_after.as_secs().max(1)
        );
        let target = address.to_string();
        tracing::warn!(user = name, address = %target, outcome, "console: password logins locked out");
        self.append(
            name,
            "-",
            "Password",
            "login lockout",
            &target,
            &outcome,
            now_ns,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        user: &str,
        role: &str,
        proof: &str,
        action: &str,
        target: &str,
        outcome: &str,
        now_ns: u64,
    ) {
        // A user name typed into the login form is untrusted: no field
        // may break the line's shape.
        let clean = |s: &str| s.replace(['\n', '\t', '\r'], " ");
        let line = format!(
            "{}\tuser={}\trole={role}\tproof={proof}\taction={action}\ttarget={}\toutcome={}\n",
            utc(now_ns),
            clean(user),
            clean(target),
            clean(outcome)
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
