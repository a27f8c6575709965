//! Application-consistent points: run the pre-hooks, freeze filesystems,
//! insert the marker, thaw, run the post-hooks — with one deadline over
//! the hooks and the frozen time, kept by a watchdog that thaws whatever
//! is frozen when it runs out, so a filesystem can never stay frozen
//! (a frozen filesystem blocks every writer on the host).
//!
//! A VM's group freezes the guest's filesystems through its guest agent
//! instead ([`GuestAgentSettings`], `tidemark_vm::qga`): freeze, marker,
//! thaw on one connection; the watchdog thaws through a new connection
//! (the one that froze may be stuck). An agent that does not answer the
//! synchronisation in time is taken as absent: the point is then taken
//! crash-consistent, and the report says so.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tidemark_changelog::Seq;
use tidemark_vm::qga::{GuestAgent, QgaError};

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
    /// Freeze the guest's filesystems through this guest agent.
    pub guest_agent: Option<GuestAgentSettings>,
}

/// A guest agent to freeze through.
#[derive(Debug, Clone)]
pub struct GuestAgentSettings {
    /// The agent's unix socket (the VM's `org.qemu.guest_agent.0` port).
    pub socket: PathBuf,
    /// How long the agent has to answer the synchronisation before it is
    /// taken as absent, and to answer a thaw.
    pub answer_timeout: Duration,
}

impl GuestAgentSettings {
    /// The agent on `socket`, given [`GUEST_AGENT_ANSWER_TIMEOUT`].
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            answer_timeout: GUEST_AGENT_ANSWER_TIMEOUT,
        }
    }
}

/// How long a guest agent has to answer before it is taken as absent.
pub const GUEST_AGENT_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// The guest agent answered but did not freeze (it was told to thaw).
    #[error("the guest agent on {} did not freeze the guest", socket.display())]
    GuestFreeze {
        /// The agent's socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: tidemark_vm::qga::QgaError,
    },
    /// The guest agent did not thaw: the guest's filesystems may still be
    /// frozen (`guest-fsfreeze-thaw` by hand). The marker was inserted.
    #[error(
        "the guest agent on {} did not thaw: the guest may still be frozen \
         (marker at sequence number {seq})",
        socket.display()
    )]
    GuestThaw {
        /// The agent's socket.
        socket: PathBuf,
        /// The marker's sequence number.
        seq: Seq,
        /// Why.
        #[source]
        source: tidemark_vm::qga::QgaError,
    },
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
    /// Whether the marker was inserted as application-consistent (not
    /// when the guest agent did not answer).
    pub app_consistent: bool,
    /// What the guest agent did.
    pub guest_agent: GuestAgentOutcome,
    /// How long the filesystems were frozen.
    pub frozen_for: Duration,
    /// Post-hooks that failed (the point is taken all the same).
    pub post_hook_failures: Vec<String>,
}

/// What became of the guest agent in a quiesced mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestAgentOutcome {
    /// None is configured.
    NotConfigured,
    /// It froze this many filesystems for the marker and thawed them.
    Frozen {
        /// Filesystems frozen.
        filesystems: u64,
    },
    /// It did not answer: the point is crash-consistent.
    Absent {
        /// Why it was taken as absent.
        reason: String,
    },
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
    /// A guest agent told to freeze (from before the command is sent: it
    /// may freeze whatever the answer), with a handle that shuts its
    /// connection down.
    agent: Option<(GuestAgentSettings, std::os::unix::net::UnixStream)>,
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

/// The watchdog's thaw of a guest: the connection that froze may be
/// stuck in a command, and the socket takes one client, so it is shut
/// down and the thaw goes through a new one.
fn thaw_guest_anew(settings: &GuestAgentSettings, connection: &std::os::unix::net::UnixStream) {
    let _ = connection.shutdown(std::net::Shutdown::Both);
    match tidemark_vm::qga::thaw_at(&settings.socket, settings.answer_timeout) {
        Ok(n) => tracing::warn!(filesystems = n, "deadline passed: thawed the guest"),
        Err(e) => tracing::error!(
            socket = %settings.socket.display(),
            error = %e,
            "deadline passed and the guest agent did not thaw: the guest may still be frozen"
        ),
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
    /// Takes an application-consistent point: pre-hooks, freeze (host
    /// filesystems, then the guest through its agent), `insert_marker(time
    /// left, application-consistent)` (returns the marker's sequence
    /// number), thaw, post-hooks. The marker is inserted as
    /// crash-consistent when the guest agent does not answer.
    pub fn run(
        &self,
        insert_marker: impl FnOnce(Duration, bool) -> Result<Seq, tidemark_control::ControlError>,
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
        result.map(|(seq, frozen_for, guest_agent)| QuiesceReport {
            seq,
            app_consistent: !matches!(guest_agent, GuestAgentOutcome::Absent { .. }),
            guest_agent,
            frozen_for,
            post_hook_failures,
        })
    }

    fn quiesced(
        &self,
        deadline: Instant,
        insert_marker: impl FnOnce(Duration, bool) -> Result<Seq, tidemark_control::ControlError>,
    ) -> Result<(Seq, Duration, GuestAgentOutcome), QuiesceError> {
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
        let mut watchdog = Some({
            let state = state.clone();
            std::thread::spawn(move || {
                let (lock, wake) = &*state;
                let mut frozen = lock.lock().unwrap_or_else(|e| e.into_inner());
                while !frozen.done {
                    let now = Instant::now();
                    if now >= deadline {
                        if !frozen.dirs.is_empty() || frozen.agent.is_some() {
                            tracing::error!("deadline passed while frozen: thawing");
                        }
                        thaw_all(&mut frozen);
                        if let Some((settings, connection)) = frozen.agent.take() {
                            thaw_guest_anew(&settings, &connection);
                        }
                        frozen.expired = true;
                        return;
                    }
                    frozen = wake
                        .wait_timeout(frozen, deadline - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })
        });
        // Thaws what is still frozen (the guest through `agent`, the
        // connection that froze it) and sends the watchdog away; says
        // whether the watchdog had expired, and how the guest's thaw went.
        let mut finish = |agent: Option<&mut GuestAgent>| {
            let (lock, wake) = &*state;
            let mut frozen = lock.lock().unwrap_or_else(|e| e.into_inner());
            thaw_all(&mut frozen);
            let thawed = match (frozen.agent.take(), agent) {
                (Some((settings, _)), Some(agent)) => agent
                    .thaw(settings.answer_timeout)
                    .map(drop)
                    .map_err(|e| (settings.socket, e)),
                _ => Ok(()),
            };
            frozen.done = true;
            let expired = frozen.expired;
            wake.notify_all();
            drop(frozen);
            if let Some(watchdog) = watchdog.take() {
                let _ = watchdog.join();
            }
            (expired, thawed)
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
                if finish(None).0 {
                    return Err(QuiesceError::TimedOut(self.timeout));
                }
                return Err(QuiesceError::Freeze {
                    path: path.clone(),
                    source,
                });
            }
        }
        let mut outcome = GuestAgentOutcome::NotConfigured;
        let mut agent = None;
        if let Some(settings) = &self.guest_agent {
            match self.freeze_guest(settings, &state, deadline) {
                Ok(GuestFreeze::Frozen(connected, filesystems)) => {
                    agent = Some(connected);
                    outcome = GuestAgentOutcome::Frozen { filesystems };
                }
                Ok(GuestFreeze::Absent(reason)) => {
                    tracing::warn!(%reason, "no guest agent: a crash-consistent point");
                    outcome = GuestAgentOutcome::Absent { reason };
                }
                Err((connected, source)) => {
                    let mut connected = connected;
                    if finish(connected.as_mut()).0 {
                        return Err(QuiesceError::TimedOut(self.timeout));
                    }
                    return Err(QuiesceError::GuestFreeze {
                        socket: settings.socket.clone(),
                        source,
                    });
                }
            }
        }
        let app_consistent = !matches!(outcome, GuestAgentOutcome::Absent { .. });
        let left = deadline.saturating_duration_since(Instant::now());
        // No time left: no marker (the deadline check below says so).
        let marker = (!left.is_zero()).then(|| insert_marker(left, app_consistent));
        let frozen_for = frozen_at.elapsed();
        let (expired, thawed) = finish(agent.as_mut());
        if expired || Instant::now() > deadline {
            return Err(QuiesceError::TimedOut(self.timeout));
        }
        let seq = match marker {
            Some(Ok(seq)) => seq,
            Some(Err(e)) => return Err(QuiesceError::Marker(e)),
            None => return Err(QuiesceError::TimedOut(self.timeout)),
        };
        if let Err((socket, source)) = thawed {
            return Err(QuiesceError::GuestThaw {
                socket,
                seq,
                source,
            });
        }
        Ok((seq, frozen_for, outcome))
    }

    /// Connects to the guest agent and freezes the guest, registered with
    /// the watchdog before the freeze is sent. An agent that does not
    /// answer the synchronisation is absent; one that fails the freeze is
    /// an error (with the connection, to thaw through it).
    fn freeze_guest(
        &self,
        settings: &GuestAgentSettings,
        state: &Arc<(Mutex<Frozen>, Condvar)>,
        deadline: Instant,
    ) -> Result<GuestFreeze, (Option<GuestAgent>, QgaError)> {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut agent =
            match GuestAgent::connect(&settings.socket, settings.answer_timeout.min(left)) {
                Ok(agent) => agent,
                Err(e) if e.is_absent() && Instant::now() < deadline => {
                    return Ok(GuestFreeze::Absent(format!(
                        "{e}{}",
                        std::error::Error::source(&e)
                            .map(|s| format!(": {s}"))
                            .unwrap_or_default()
                    )))
                }
                Err(e) => return Err((None, e)),
            };
        let handle = agent.shutdown_handle().map_err(|e| (None, e))?;
        {
            let (lock, _) = &**state;
            let mut frozen = lock.lock().unwrap_or_else(|e| e.into_inner());
            if frozen.expired {
                return Err((
                    None,
                    QgaError::NoAnswer {
                        command: "guest-fsfreeze-freeze",
                        after: self.timeout,
                    },
                ));
            }
            frozen.agent = Some((settings.clone(), handle));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match agent.freeze(left) {
            Ok(filesystems) => Ok(GuestFreeze::Frozen(agent, filesystems)),
            Err(e) => Err((Some(agent), e)),
        }
    }
}

/// How [`Quiesce::freeze_guest`] went when it did not fail.
enum GuestFreeze {
    /// Frozen, this many filesystems, through this connection.
    Frozen(GuestAgent, u64),
    /// No agent answered (why).
    Absent(String),
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
            guest_agent: None,
        }
    }

    #[test]
    fn hooks_run_in_order_around_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let pre = format!("echo pre >> {}", log.display());
        let post = format!("echo post >> {}", log.display());
        let report = q(&[&pre], &[&post], 10_000)
            .run(|_, _| {
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
            .run(|_, _| panic!("no marker after a failed pre-hook"))
            .unwrap_err();
        assert!(matches!(err, QuiesceError::PreHook { .. }), "{err}");
        assert!(dir.path().join("post").exists());
    }

    #[test]
    fn a_hanging_pre_hook_is_killed_at_the_deadline() {
        let started = Instant::now();
        // `sleep` runs as a child of the shell: it is killed too.
        let err = q(&["sleep 30; true"], &[], 300)
            .run(|_, _| panic!("no marker after a timed-out hook"))
            .unwrap_err();
        assert!(matches!(err, QuiesceError::TimedOut(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_marker_that_outlives_the_deadline_is_not_app_consistent() {
        let err = q(&[], &[], 200)
            .run(|left, _| {
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
        let err = quiesce.run(|_, _| panic!("no marker")).unwrap_err();
        assert!(matches!(err, QuiesceError::Freeze { .. }), "{err}");
    }

    /// A guest agent on a unix socket, speaking qemu-ga's bytes: it
    /// answers `guest-sync-delimited` after an FF (a stale reply before
    /// it), records the freezes and thaws it is told in the journal the
    /// marker also writes to, and answers a freeze after `freeze_delay`
    /// with `freeze_reply`. Each connection has its own thread, so a thaw
    /// on a new connection is heard while a freeze still hangs.
    struct FakeAgent {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        journal: Arc<Mutex<Vec<&'static str>>>,
    }

    impl FakeAgent {
        fn start(freeze_delay: Duration, freeze_reply: &'static str) -> FakeAgent {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("qga.sock");
            let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
            let journal = Arc::new(Mutex::new(Vec::new()));
            let log = journal.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    let log = log.clone();
                    std::thread::spawn(move || serve(stream, &log, freeze_delay, freeze_reply));
                }
            });
            FakeAgent {
                _dir: dir,
                socket,
                journal,
            }
        }

        fn settings(&self) -> GuestAgentSettings {
            GuestAgentSettings {
                socket: self.socket.clone(),
                answer_timeout: Duration::from_millis(1000),
            }
        }

        fn journal(&self) -> Vec<&'static str> {
            self.journal.lock().unwrap().clone()
        }
    }

    fn serve(
        stream: std::os::unix::net::UnixStream,
        log: &Mutex<Vec<&'static str>>,
        freeze_delay: Duration,
        freeze_reply: &str,
    ) {
        use std::io::{BufRead, BufReader, Write};
        let mut out = stream.try_clone().unwrap();
        let mut lines = BufReader::new(stream);
        let mut line = Vec::new();
        while lines.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text: Vec<u8> = line.drain(..).filter(|&b| b != 0xFF).collect();
            let Ok(command) = serde_json::from_slice::<serde_json::Value>(&text) else {
                continue;
            };
            let mut answer = Vec::new();
            match command["execute"].as_str() {
                Some("guest-sync-delimited") => {
                    answer.extend(b"{\"return\": 1}\n\xff");
                    answer
                        .extend(format!("{{\"return\": {}}}", command["arguments"]["id"]).bytes());
                }
                Some("guest-fsfreeze-freeze") => {
                    log.lock().unwrap().push("freeze");
                    std::thread::sleep(freeze_delay);
                    answer.extend(freeze_reply.bytes());
                }
                Some("guest-fsfreeze-thaw") => {
                    log.lock().unwrap().push("thaw");
                    answer.extend(b"{\"return\": 1}");
                }
                _ => answer
                    .extend(b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"no\"}}"),
            }
            answer.push(b'\n');
            if out.write_all(&answer).is_err() {
                return;
            }
        }
    }

    #[test]
    fn the_guest_is_frozen_for_the_marker_and_thawed_after() {
        let agent = FakeAgent::start(Duration::ZERO, r#"{"return": 1}"#);
        let mut quiesce = q(&[], &[], 10_000);
        quiesce.guest_agent = Some(agent.settings());
        let report = quiesce
            .run(|_, app| {
                assert!(app, "a frozen guest gives an application-consistent point");
                agent.journal.lock().unwrap().push("marker");
                Ok(Seq(5))
            })
            .unwrap();
        assert_eq!(agent.journal(), ["freeze", "marker", "thaw"]);
        assert_eq!(
            report.guest_agent,
            GuestAgentOutcome::Frozen { filesystems: 1 }
        );
        assert!(report.app_consistent);
    }

    #[test]
    fn no_agent_gives_a_crash_consistent_point_that_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let silent = dir.path().join("silent.sock");
        // qemu's chardev with no agent in the guest: it accepts, never answers.
        let _listener = std::os::unix::net::UnixListener::bind(&silent).unwrap();
        for (socket, why) in [
            (dir.path().join("absent.sock"), "cannot connect"),
            (silent, "did not answer"),
        ] {
            let mut quiesce = q(&[], &[], 10_000);
            quiesce.guest_agent = Some(GuestAgentSettings {
                socket,
                answer_timeout: Duration::from_millis(200),
            });
            let report = quiesce
                .run(|_, app| {
                    assert!(!app, "no agent: the marker is crash-consistent");
                    Ok(Seq(9))
                })
                .unwrap();
            assert!(!report.app_consistent);
            assert!(
                matches!(&report.guest_agent, GuestAgentOutcome::Absent { reason } if reason.contains(why)),
                "{:?}",
                report.guest_agent
            );
        }
    }

    #[test]
    fn a_freeze_answered_after_the_deadline_is_thawed_by_the_watchdog() {
        let agent = FakeAgent::start(Duration::from_secs(3), r#"{"return": 1}"#);
        let mut quiesce = q(&[], &[], 300);
        quiesce.guest_agent = Some(agent.settings());
        let started = Instant::now();
        let err = quiesce
            .run(|_, _| panic!("no marker after the deadline"))
            .unwrap_err();
        assert!(matches!(err, QuiesceError::TimedOut(_)), "{err}");
        // The watchdog thawed through a new connection, well within the
        // freeze's hang: the deadline held.
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(agent.journal(), ["freeze", "thaw"]);
    }

    #[test]
    fn a_refused_freeze_takes_no_marker_and_thaws() {
        let agent = FakeAgent::start(
            Duration::ZERO,
            r#"{"error": {"class": "GenericError", "desc": "failed to freeze /: busy"}}"#,
        );
        let mut quiesce = q(&[], &[], 10_000);
        quiesce.guest_agent = Some(agent.settings());
        let err = quiesce.run(|_, _| panic!("no marker")).unwrap_err();
        assert!(
            matches!(&err, QuiesceError::GuestFreeze {
                source: tidemark_vm::qga::QgaError::Refused { desc, .. }, ..
            } if desc.contains("busy")),
            "{err}"
        );
        assert_eq!(agent.journal(), ["freeze", "thaw"]);
    }
}
