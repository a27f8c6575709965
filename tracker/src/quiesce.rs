//! Application-consistent points: run the pre-hooks, freeze filesystems,
//! insert the marker, thaw, run the post-hooks — with one deadline over
//! the hooks and the frozen time, kept by a watchdog that thaws whatever
//! is frozen when it runs out, so a filesystem can never stay frozen
//! (a frozen filesystem blocks every writer on the host).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tidemark_changelog::Seq;

/// What to quiesce for an application-consistent point.
#[derive(Debug, Clone, Default)]
pub struct Quiesce {
    /// Mount points to freeze.
    pub freeze: Vec<PathBuf>,
    /// Shell commands run first; a failure aborts.
    pub pre_hooks: Vec<String>,
    /// Shell commands run last, whatever happened.
    pub post_hooks: Vec<String>,
    /// Bound on the pre-hooks plus the frozen time.
    pub timeout: Duration,
}

/// Why an application-consistent point was not taken.
#[derive(Debug, Error)]
pub enum QuiesceError {
    /// A pre-hook failed or could not run; nothing was frozen.
    #[error("pre-hook `{hook}` failed: {reason}")]
    PreHook {
        /// The command.
        hook: String,
        /// Its exit status or the error running it.
        #[source]
        reason: HookError,
    },
    /// A filesystem could not be frozen; the others were thawed.
    #[error("cannot freeze {path}: {source}")]
    Freeze {
        /// The mount point.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The deadline passed: everything was thawed, no marker was taken
    /// as application-consistent.
    #[error(
        "the hooks and the freeze took longer than {0:?}: thawed, no application-consistent point"
    )]
    TimedOut(Duration),
    /// Inserting the marker failed (everything was thawed).
    #[error("inserting the marker: {0}")]
    Marker(#[source] tidemark_control::ControlError),
}

/// How a hook ended when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// It could not be started.
    #[error("{0}")]
    Spawn(#[source] std::io::Error),
    /// It exited unsuccessfully.
    #[error("{0}")]
    Failed(std::process::ExitStatus),
    /// It ran past its deadline and was killed with what it started.
    #[error("killed at the deadline")]
    Killed,
    /// Waiting for it failed.
    #[error("{0}")]
    Wait(#[source] std::io::Error),
}

/// What a successful quiesced mark did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuiesceReport {
    /// The marker's sequence number.
    pub seq: Seq,
    /// How long the filesystems were frozen.
    pub frozen_for: Duration,
    /// Post-hooks that failed (the point is taken all the same).
    pub post_hook_failures: Vec<String>,
}

// FIFREEZE / FITHAW: _IOWR('X', 119, int) / _IOWR('X', 120, int).
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn freeze_ioctl(dir: &File, request: libc::c_ulong) -> std::io::Result<()> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW take a pointer to an int they ignore; the
    // descriptor is a valid, open directory.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request as _, &mut arg) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Filesystems frozen so far; whoever thaws first (the mark or the
/// watchdog) thaws them all, once.
#[derive(Default)]
struct Frozen {
    dirs: Vec<(PathBuf, File)>,
    /// The watchdog thawed them: the deadline passed.
    expired: bool,
    /// The mark is over; the watchdog may leave.
    done: bool,
}

fn thaw_all(frozen: &mut Frozen) {
    for (path, dir) in frozen.dirs.drain(..).rev() {
        if let Err(e) = freeze_ioctl(&dir, FITHAW) {
            tracing::error!(path = %path.display(), error = %e, "cannot thaw");
        }
    }
}

/// Runs `sh -c hook` until `deadline`; kills it then, with everything it
/// started (its own process group).
fn run_hook(hook: &str, deadline: Instant) -> Result<(), HookError> {
    run_hook_with_env(hook, &[], deadline)
}

/// Runs `sh -c hook` with `env` added to its environment, stdin closed,
/// until `deadline`; kills it then, with everything it started (its own
/// process group). `Err` says how it ended when that was not success.
pub fn run_hook_with_env(
    hook: &str,
    env: &[(String, String)],
    deadline: Instant,
) -> Result<(), HookError> {
    use std::os::unix::process::CommandExt;
    let mut child: Child = Command::new("sh")
        .arg("-c")
        .arg(hook)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(HookError::Spawn)?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => return Err(HookError::Failed(status)),
            Ok(None) if Instant::now() >= deadline => {
                // SAFETY: kill(2) on the hook's process group (its pid, as
                // it leads the group); no memory is passed.
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let _ = child.wait();
                return Err(HookError::Killed);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(HookError::Wait(e)),
        }
    }
}

impl Quiesce {
    /// Takes an application-consistent point: pre-hooks, freeze,
    /// `insert_marker(time left)` (returns the marker's sequence number),
    /// thaw, post-hooks.
    pub fn run(
        &self,
        insert_marker: impl FnOnce(Duration) -> Result<Seq, tidemark_control::ControlError>,
    ) -> Result<QuiesceReport, QuiesceError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let result = self.quiesced(deadline, insert_marker);
        let mut post_hook_failures = Vec::new();
        for hook in &self.post_hooks {
            // Post-hooks resume applications: give each the full timeout.
            if let Err(reason) = run_hook(hook, Instant::now() + self.timeout) {
                tracing::warn!(%hook, %reason, "post-hook failed");
                post_hook_failures.push(format!("{hook}: {reason}"));
            }
        }
        result.map(|(seq, frozen_for)| QuiesceReport {
            seq,
            frozen_for,
            post_hook_failures,
        })
    }

    fn quiesced(
        &self,
        deadline: Instant,
        insert_marker: impl FnOnce(Duration) -> Result<Seq, tidemark_control::ControlError>,
    ) -> Result<(Seq, Duration), QuiesceError> {
        for hook in &self.pre_hooks {
            run_hook(hook, deadline).map_err(|reason| {
                if Instant::now() >= deadline {
                    QuiesceError::TimedOut(self.timeout)
                } else {
                    QuiesceError::PreHook {
                        hook: hook.clone(),
                        reason,
                    }
                }
            })?;
        }
        let state = Arc::new((Mutex::new(Frozen::default()), Condvar::new()));
        let watchdog = {
            let state = state.clone();
            std::thread::spawn(move || {
                let (lock, wake) = &*state;
                let mut frozen = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !frozen.done {
                    let now = Instant::now();
                    if now >= deadline {
                        if !frozen.dirs.is_empty() {
                            tracing::error!("deadline passed while frozen: thawing");
                        }
                        thaw_all(&mut frozen);
                        frozen.expired = true;
                        return;
                    }
                    frozen = wake
                        .wait_timeout(frozen, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })
        };
        let finish = |state: &Arc<(Mutex<Frozen>, Condvar)>| {
            let (lock, wake) = &**state;
            let mut frozen = lock.lock().unwrap_or_else(|e| e.into_inner());
            thaw_all(&mut frozen);
            frozen.done = true;
            let expired = frozen.expired;
            wake.notify_all();
            expired
        };
        let frozen_at = Instant::now();
        for path in &self.freeze {
            let opened = File::open(path).and_then(|dir| {
                let (lock, _) = &*state;
                let mut frozen = lock.lock().unwrap_or_else(|e| e.into_inner());
                if frozen.expired {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                freeze_ioctl(&dir, FIFREEZE)?;
                frozen.dirs.push((path.clone(), dir));
                Ok(())
            });
            if let Err(source) = opened {
                let expired = finish(&state);
                let _ = watchdog.join();
                if expired {
                    return Err(QuiesceError::TimedOut(self.timeout));
                }
                return Err(QuiesceError::Freeze {
                    path: path.clone(),
                    source,
                });
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        // No time left: no marker (the deadline check below says so).
        let marker = (!left.is_zero()).then(|| insert_marker(left));
        let frozen_for = frozen_at.elapsed();
        let expired = finish(&state);
        let _ = watchdog.join();
        if expired || Instant::now() > deadline {
            return Err(QuiesceError::TimedOut(self.timeout));
        }
        match marker {
            Some(Ok(seq)) => Ok((seq, frozen_for)),
            Some(Err(e)) => Err(QuiesceError::Marker(e)),
            None => Err(QuiesceError::TimedOut(self.timeout)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pre: &[&str], post: &[&str], timeout_ms: u64) -> Quiesce {
        Quiesce {
            freeze: Vec::new(),
            pre_hooks: pre.iter().map(|s| s.to_string()).collect(),
            post_hooks: post.iter().map(|s| s.to_string()).collect(),
            timeout: Duration::from_millis(timeout_ms),
        }
    }

    #[test]
    fn hooks_run_in_order_around_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let pre = format!("echo pre >> {}", log.display());
        let post = format!("echo post >> {}", log.display());
        let report = q(&[&pre], &[&post], 10_000)
            .run(|_| {
                std::fs::write(
                    &log,
                    std::fs::read_to_string(&log).unwrap_or_default() + "marker\n",
                )
                .unwrap();
                Ok(Seq(42))
            })
            .unwrap();
        assert_eq!(report.seq, Seq(42));
        assert!(report.post_hook_failures.is_empty());
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "pre\nmarker\npost\n"
        );
    }

    #[test]
    fn a_failing_pre_hook_takes_no_marker_and_post_hooks_still_run() {
        let dir = tempfile::tempdir().unwrap();
        let post = format!("touch {}", dir.path().join("post").display());
        let err = q(&["exit 3"], &[&post], 10_000)
            .run(|_| panic!("no marker after a failed pre-hook"))
            .unwrap_err();
        assert!(matches!(err, QuiesceError::PreHook { .. }), "{err}");
        assert!(dir.path().join("post").exists());
    }

    #[test]
    fn a_hanging_pre_hook_is_killed_at_the_deadline() {
        let started = Instant::now();
        // `sleep` runs as a child of the shell: it is killed too.
        let err = q(&["sleep 30; true"], &[], 300)
            .run(|_| panic!("no marker after a timed-out hook"))
            .unwrap_err();
        assert!(matches!(err, QuiesceError::TimedOut(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_marker_that_outlives_the_deadline_is_not_app_consistent() {
        let err = q(&[], &[], 200)
            .run(|left| {
                assert!(left <= Duration::from_millis(200));
                std::thread::sleep(Duration::from_millis(400));
                Ok(Seq(7))
            })
            .unwrap_err();
        assert!(matches!(err, QuiesceError::TimedOut(_)), "{err}");
    }

    #[test]
    fn a_missing_mount_point_fails_cleanly() {
        let mut quiesce = q(&[], &[], 5_000);
        quiesce.freeze = vec![PathBuf::from("/nonexistent/mount")];
        let err = quiesce.run(|_| panic!("no marker")).unwrap_err();
        assert!(matches!(err, QuiesceError::Freeze { .. }), "{err}");
    }
}
