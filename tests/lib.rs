//! What the end-to-end tests share: finding the project's binaries (built
//! once per test process with the same profile as the tests) and skipping
//! loudly when a foreign tool is missing.

pub mod debian;
pub mod libvirt;
pub mod previous_release;
pub mod replication;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The target directory the running test binary was built into.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// Path of the `tidemark` binary, built (once per test process) if needed.
/// `TIDEMARK_E2E_BIN` names another binary to test instead (e.g. an older
/// build, to see a new test fail on it).
pub fn tidemark_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("TIDEMARK_E2E_BIN") {
            return PathBuf::from(bin);
        }
        let dir = target_dir();
        let profile_release = dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        // The same selection `cargo test --workspace --all-targets` (the
        // README's test command) builds, so the features of every
        // dependency agree and the binary it built is reused: building
        // `-p tidemark` alone would unify features differently and rebuild
        // the whole dependency tree.
        build.args(["build", "--quiet", "--workspace", "--all-targets"]);
        // The Ceph suites need the binary's Ceph store: the same features
        // as `cargo test --features ceph` of this crate gives its tests.
        if cfg!(feature = "ceph") {
            build.args(["--features", "tidemark/ceph,tidemark-e2e/ceph"]);
        }
        if profile_release {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build");
        assert!(status.success(), "building the tidemark binary failed");
        let bin = dir.join("tidemark");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// A `Command` for the `tidemark` binary.
pub fn tidemark() -> Command {
    Command::new(tidemark_bin())
}

/// Whether `tool` is on the PATH. When it is not, prints why the calling
/// test is skipped; under CI (`CI` set) a missing tool is a failure instead,
/// because CI installs every tool the tests need.
pub fn require_tool(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: `{tool}` is missing under CI; the test command must install it"
        );
        eprintln!("SKIP {test}: `{tool}` is not installed (the README's test command installs it)");
    }
    found
}

/// Whether the Debian guest kernel of the VM tests is cached or can be
/// fetched (`scripts/kernel-vm.sh kernel`). Like [`require_tool`]: a skip
/// with a message, but a failure under CI.
pub fn require_kernel(test: &str) -> bool {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .join("scripts/kernel-vm.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("kernel")
        .output()
        .expect("running scripts/kernel-vm.sh kernel");
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: the guest kernel cannot be had under CI:\n{why}"
    );
    eprintln!("SKIP {test}: the guest kernel cannot be had (scripts/kernel-vm.sh kernel):\n{why}");
    false
}

/// Runs `cmd`, asserts success, returns stdout and stderr together.
pub fn run(cmd: &mut Command) -> String {
    let out = output_ok(cmd);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` and asserts success (the failure names the command and
/// shows what it printed); returns its output, stdout kept apart.
pub fn output_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd`, a daemon that must refuse to start, and returns what it
/// said; fails the test if it succeeds or is still running after 20 s.
pub fn refused(cmd: &mut Command) -> std::process::Output {
    use std::process::Stdio;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(std::time::Duration::from_secs(20)) else {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        panic!("{cmd:?} is still running after 20 s: it was not refused");
    };
    let out = out.expect("waiting for the refused daemon");
    assert!(
        !out.status.success(),
        "{cmd:?} was not refused:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A `tidemark tracker serve` process protecting one image, for tests.
pub struct TrackerProcess {
    child: Option<std::process::Child>,
    /// The NBD socket.
    pub socket: PathBuf,
    /// The control socket.
    pub control: PathBuf,
    /// The change log directory.
    pub log_dir: PathBuf,
    /// The export name.
    pub export: String,
    /// The line it printed when ready.
    pub ready_line: String,
}

impl TrackerProcess {
    /// Starts a tracker on `image` with its sockets and log under `dir`,
    /// and waits until it serves.
    pub fn start(dir: &std::path::Path, image: &std::path::Path, extra: &[&str]) -> TrackerProcess {
        Self::start_of(&tidemark_bin(), dir, image, extra)
    }

    /// [`start`](Self::start) with the `tidemark` binary `bin` (the
    /// previous release's, say: these flags must stay valid for it).
    pub fn start_of(bin: &Path, dir: &Path, image: &Path, extra: &[&str]) -> TrackerProcess {
        Self::spawn(dir, Self::command_of(bin, dir, image, extra))
    }

    /// The command [`start`](Self::start) runs, e.g. to start a second
    /// tracker with the same arguments.
    pub fn command(dir: &std::path::Path, image: &std::path::Path, extra: &[&str]) -> Command {
        Self::command_of(&tidemark_bin(), dir, image, extra)
    }

    /// [`command`](Self::command) with the `tidemark` binary `bin`.
    pub fn command_of(bin: &Path, dir: &Path, image: &Path, extra: &[&str]) -> Command {
        let mut command = Command::new(bin);
        command
            .args(["tracker", "serve", "--image"])
            .arg(image)
            .args(["--name", "disk", "--socket"])
            .arg(dir.join("nbd.sock"))
            .arg("--control-socket")
            .arg(dir.join("tracker.ctl"))
            .arg("--log-dir")
            .arg(dir.join("log"))
            .args(extra);
        command
    }

    /// Like [`start`](Self::start), from a configuration file written to
    /// `dir/tracker.toml`: the same sockets, log and disk, plus `settings`
    /// (lines of the `[tracker]` table, e.g. `max-block-size = "1MiB"`).
    pub fn start_with_config(
        dir: &std::path::Path,
        image: &std::path::Path,
        settings: &str,
    ) -> TrackerProcess {
        let config = Self::write_config(dir, image, settings);
        let mut command = tidemark();
        command.args(["tracker", "serve", "--config"]).arg(&config);
        Self::spawn(dir, command)
    }

    /// Writes the configuration file [`start_with_config`](Self::start_with_config)
    /// starts from, and returns its path.
    pub fn write_config(dir: &std::path::Path, image: &std::path::Path, settings: &str) -> PathBuf {
        let config = dir.join("tracker.toml");
        let d = dir.display();
        std::fs::write(
            &config,
            format!(
                "[tracker]\nlog-dir = \"{d}/log\"\nsocket = \"{d}/nbd.sock\"\n\
                 control-socket = \"{d}/tracker.ctl\"\nmetrics-listen = \"127.0.0.1:0\"\n\
                 {settings}\n\n[[tracker.disk]]\nname = \"disk\"\npath = \"{}\"\n",
                image.display()
            ),
        )
        .expect("writing the tracker's configuration");
        config
    }

    /// Runs `command`, a `tracker serve` whose NBD socket, control socket
    /// and log are `dir/nbd.sock`, `dir/tracker.ctl` and `dir/log` (as
    /// [`command`](Self::command) makes it), and waits until it serves.
    pub fn spawn(dir: &std::path::Path, mut command: Command) -> TrackerProcess {
        use std::io::BufRead;
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting the tracker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the tracker never blocks on a full pipe.
            for _ in lines {}
        });
        let ready_line = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("the tracker did not become ready within 60 s");
            }
        };
        assert!(
            ready_line.starts_with("tracker ready"),
            "unexpected first line: {ready_line}"
        );
        TrackerProcess {
            child: Some(child),
            socket: dir.join("nbd.sock"),
            control: dir.join("tracker.ctl"),
            log_dir: dir.join("log"),
            export: "disk".into(),
            ready_line,
        }
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export,
            self.socket.display()
        )
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then waits; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("sending SIGTERM");
        child.wait().expect("waiting for the tracker").success()
    }

    /// SIGKILL, then waits: a crash.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for TrackerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `nbdinfo --map` of `uri`: (offset, length, type) of each extent, type
/// 0 for data and 3 for a hole that reads as zeroes.
pub fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u64)> {
    let out = output_ok(Command::new("nbdinfo").args(["--map", "--json", uri]));
    let map: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let field = |e: &serde_json::Value, name| e[name].as_u64().expect("a number");
    map.as_array()
        .expect("a list of extents")
        .iter()
        .map(|e| (field(e, "offset"), field(e, "length"), field(e, "type")))
        .collect()
}

/// Runs `qemu-io -f raw` with these `-c` commands on `target` (an NBD URI
/// or an image file) and asserts that every one succeeded.
pub fn qemu_io(target: impl AsRef<std::ffi::OsStr>, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(target).output().expect("running qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
