//! Enrolment, receiver and shipper processes for replication tests.

use crate::{tidemark, tidemark_bin};
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The protected host's name in these tests.
pub const HOST: &str = "db1.example.test";

/// Runs `cmd`, asserts success, returns its stdout.
/// The lines a child writes to `stdout`, as they come, read by a thread
/// of their own (so a caller can wait for one with a timeout).
pub fn stdout_lines(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running tidemark");
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Receiver CA + a signed host certificate: (receiver pki dir, host pki dir).
pub fn enroll(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    let bin = tidemark_bin();
    enroll_with(&bin, &bin, dir, host)
}

/// [`enroll`] with the receiver's commands run by the `receiver` binary and
/// the host's by the `host` binary (releases side by side).
pub fn enroll_with(receiver: &Path, host_bin: &Path, dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    let rpki = dir.join("receiver-pki");
    let hpki = dir.join("host-pki");
    run_ok(
        Command::new(receiver)
            .args(["receiver", "init", "--pki-dir"])
            .arg(&rpki),
    );
    run_ok(
        Command::new(host_bin)
            .args(["host", "request", "--host", host, "--pki-dir"])
            .arg(&hpki),
    );
    run_ok(
        Command::new(receiver)
            .args(["receiver", "sign", "--pki-dir"])
            .arg(&rpki)
            .args(["--host", host, "--csr"])
            .arg(hpki.join("host.csr"))
            .arg("--out")
            .arg(hpki.join("host.crt")),
    );
    fs::copy(rpki.join("ca.crt"), hpki.join("ca.crt")).unwrap();
    (rpki, hpki)
}

/// A free UDP port on loopback (so a restarted receiver can keep it).
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A daemon process, killed when dropped.
pub struct Daemon {
    child: Option<Child>,
    what: &'static str,
}

impl Daemon {
    /// Adopts a started process; `what` names it in messages.
    pub fn new(child: Child, what: &'static str) -> Daemon {
        Daemon {
            child: Some(child),
            what,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("running").id() as i32)
    }

    /// SIGTERM and wait: the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(self.pid(), nix::sys::signal::Signal::SIGTERM).unwrap();
        self.child.take().unwrap().wait().unwrap()
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) {
        let mut c = self.child.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the {} did not exit within {timeout:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `tidemark receiver serve` on `data_dir` (logs in `dir`) and
/// waits until it listens.
pub fn start_receiver_at(data_dir: &Path, dir: &Path, rpki: &Path, port: u16) -> Daemon {
    start_receiver_with(data_dir, dir, rpki, port, "")
}

/// [`start_receiver_at`] with `extra` appended to its configuration file
/// (more tables, e.g. a `[receiver.retention]` table).
pub fn start_receiver_with(
    data_dir: &Path,
    dir: &Path,
    rpki: &Path,
    port: u16,
    extra: &str,
) -> Daemon {
    let config = dir.join(format!("receiver-{port}.toml"));
    fs::write(
        &config,
        format!(
            "[receiver]\nlisten = \"127.0.0.1:{port}\"\ndata-dir = \"{}\"\ncontrol-socket = \"{}\"\n\
             [receiver.tls]\nca = \"{r}/ca.crt\"\nca-key = \"{r}/ca.key\"\ncert = \"{r}/receiver.crt\"\nkey = \"{r}/receiver.key\"\n{extra}",
            data_dir.display(),
            dir.join(format!("receiver-{port}.ctl")).display(),
            r = rpki.display()
        ),
    )
    .unwrap();
    start_receiver(dir, rpki, port, Some(&config))
}

/// Starts `tidemark receiver serve` (flags, or `config`) and waits until it
/// listens; its stderr goes to `dir/receiver-PORT.log`.
pub fn start_receiver(dir: &Path, rpki: &Path, port: u16, config: Option<&Path>) -> Daemon {
    start_receiver_of(&tidemark_bin(), dir, rpki, port, config)
}

/// [`start_receiver`] with the `tidemark` binary `bin` (the previous
/// release's, say: these flags must stay valid for it).
pub fn start_receiver_of(
    bin: &Path,
    dir: &Path,
    rpki: &Path,
    port: u16,
    config: Option<&Path>,
) -> Daemon {
    let mut cmd = Command::new(bin);
    cmd.args(["receiver", "serve"]);
    match config {
        Some(c) => {
            cmd.arg("--config").arg(c);
        }
        None => {
            cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
                .arg(dir.join("replicas"))
                .arg("--pki-dir")
                .arg(rpki);
        }
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(fs::File::create(dir.join(format!("receiver-{port}.log"))).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(l)) = lines.next() {
            let _ = tx.send(l);
        }
        for _ in lines {}
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the receiver did not become ready");
    assert!(line.starts_with("receiver ready on"), "{line}");
    Daemon {
        child: Some(child),
        what: "receiver",
    }
}

/// Starts `tidemark shipper run` for [`HOST`]; its stderr goes to
/// `dir/shipper.log`.
pub fn start_shipper(dir: &Path, log_dir: &Path, hpki: &Path, port: u16) -> Daemon {
    start_shipper_with(dir, log_dir, hpki, port, &[])
}

/// [`start_shipper`] with more `shipper run` flags.
pub fn start_shipper_with(
    dir: &Path,
    log_dir: &Path,
    hpki: &Path,
    port: u16,
    extra: &[&std::ffi::OsStr],
) -> Daemon {
    start_shipper_of(&tidemark_bin(), dir, log_dir, hpki, port, extra)
}

/// [`start_shipper_with`] with the `tidemark` binary `bin` (the previous
/// release's, say: these flags must stay valid for it).
pub fn start_shipper_of(
    bin: &Path,
    dir: &Path,
    log_dir: &Path,
    hpki: &Path,
    port: u16,
    extra: &[&std::ffi::OsStr],
) -> Daemon {
    let child = Command::new(bin)
        .args(["shipper", "run", "--log-dir"])
        .arg(log_dir)
        .args(extra)
        .args(["--receiver", &format!("127.0.0.1:{port}"), "--host", HOST])
        .arg("--pki-dir")
        .arg(hpki)
        .stdout(Stdio::null())
        .stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("shipper.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Daemon {
        child: Some(child),
        what: "shipper",
    }
}

/// Starts `tidemark shipper run --config` with a configuration file
/// (`dir/shipper.toml`) for this host, `log_dir` and the receiver on
/// `port`, with `extra` appended (more tables, e.g. `[shipper.bandwidth]`);
/// its stderr goes to `dir/shipper.log`.
pub fn start_shipper_configured(
    dir: &Path,
    log_dir: &Path,
    hpki: &Path,
    port: u16,
    extra: &str,
) -> Daemon {
    let config = dir.join("shipper.toml");
    fs::write(
        &config,
        format!(
            "[shipper]\nhost = \"{HOST}\"\nreceiver = \"127.0.0.1:{port}\"\nlog-dir = \"{}\"\n\
             control-socket = \"{}\"\n\
             [shipper.tls]\nca = \"{h}/ca.crt\"\ncert = \"{h}/host.crt\"\nkey = \"{h}/host.key\"\n{extra}",
            log_dir.display(),
            dir.join("shipper.ctl").display(),
            h = hpki.display()
        ),
    )
    .unwrap();
    let child = tidemark()
        .args(["shipper", "run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("shipper.log")).unwrap())
        .spawn()
        .unwrap();
    Daemon::new(child, "shipper")
}

/// Fails over (`bin failover`) the replica of [`HOST`] in `dir/replicas`
/// into `to`, at `point` (else the latest), and compares every byte of the
/// image with `expected`.
pub fn failover_and_compare_with(
    bin: &Path,
    dir: &Path,
    to: &Path,
    point: Option<u64>,
    expected: &[u8],
) {
    let mut cmd = Command::new(bin);
    cmd.args(["failover", "--data-dir"])
        .arg(dir.join("replicas"))
        .args(["--host", HOST, "--to"])
        .arg(to);
    if let Some(seq) = point {
        cmd.args(["--point", &seq.to_string()]);
    }
    let out = run_ok(&mut cmd);
    assert!(out.contains("failing over"), "{out}");
    let replica = fs::read(to.join("disk.img")).unwrap();
    assert_eq!(expected.len(), replica.len());
    if let Some(at) = expected.iter().zip(&replica).position(|(a, b)| a != b) {
        panic!(
            "the failed-over image {} differs from the source at byte {at}",
            to.display()
        );
    }
}

/// `tidemark shipper status --json`, if the shipper wrote a status.
pub fn shipper_status(log_dir: &Path) -> Option<serde_json::Value> {
    let out = tidemark()
        .args(["shipper", "status", "--json", "--log-dir"])
        .arg(log_dir)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

/// The last sequence number in the change log.
pub fn last_seq(log_dir: &Path) -> u64 {
    let out = run_ok(tidemark().args(["log", "check", "--json"]).arg(log_dir));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["last_seq"].as_u64().unwrap_or(0)
}

/// Waits until the receiver has made everything in the log durable and the
/// shipper reports the group protected.
pub fn wait_caught_up(dir: &Path, log_dir: &Path, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let want = last_seq(log_dir);
        if let Some(s) = shipper_status(log_dir) {
            if s["durable_seq"].as_u64() == Some(want) && s["state"] == "protected" {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "replication did not catch up to seq {want} in {timeout:?}: {s:#}\nshipper log:\n{}",
                    fs::read_to_string(dir.join("shipper.log")).unwrap_or_default()
                );
            }
        } else if Instant::now() > deadline {
            panic!("no shipper status after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts `tidemark test-failover start` at `point` and waits until it
/// serves; returns it and the NBD URI of the disk.
pub fn start_test_failover(dir: &Path, point: u64) -> (Daemon, String) {
    let (daemon, uri, _) = start_test_failover_with(dir, point, &[], Duration::from_secs(30));
    (daemon, uri)
}

/// [`start_test_failover`] with more `test-failover start` flags (e.g.
/// `--boot`), waiting at most `timeout` for it to be ready; also returns
/// the lines it printed until then.
pub fn start_test_failover_with(
    dir: &Path,
    point: u64,
    extra: &[&std::ffi::OsStr],
    timeout: Duration,
) -> (Daemon, String, Vec<String>) {
    let socket = dir.join("test-failover.sock");
    let replicas = dir.join("replicas");
    let store = ["--data-dir".as_ref(), replicas.as_os_str()];
    let (daemon, lines) = start_test_failover_on(dir, store, point, &socket, extra, timeout);
    (
        daemon,
        format!("nbd+unix:///disk?socket={}", socket.display()),
        lines,
    )
}

/// Starts `tidemark test-failover start` of [`HOST`]'s group at `point` on
/// the replicas `store` names (`--data-dir DIR`, or `--config FILE` for
/// the store a receiver's configuration selects), serving on `socket`,
/// with more flags `extra`; its log is `dir/test-failover.log`. Waits at
/// most `timeout` until it is ready; returns it with the lines it printed
/// until then.
pub fn start_test_failover_on(
    dir: &Path,
    store: [&std::ffi::OsStr; 2],
    point: u64,
    socket: &Path,
    extra: &[&std::ffi::OsStr],
    timeout: Duration,
) -> (Daemon, Vec<String>) {
    let mut child = tidemark()
        .args(["test-failover", "start"])
        .args(store)
        .args(["--host", HOST, "--point", &point.to_string(), "--socket"])
        .arg(socket)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(fs::File::create(dir.join("test-failover.log")).unwrap())
        .spawn()
        .unwrap();
    let rx = stdout_lines(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    loop {
        let line = rx.recv_timeout(timeout).unwrap_or_else(|_| {
            let log = fs::read_to_string(dir.join("test-failover.log")).unwrap_or_default();
            panic!("the test failover did not start: {lines:?}\n{log}")
        });
        let done = line.starts_with("ready");
        lines.push(line);
        if done {
            break;
        }
    }
    assert!(lines[0].contains(&format!("sequence {point}")), "{lines:?}");
    (Daemon::new(child, "test failover"), lines)
}

/// The newest recovery point's sequence number, per `tidemark points`.
pub fn newest_point(dir: &Path) -> u64 {
    let out = run_ok(
        tidemark()
            .args(["points", "--json", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST]),
    );
    let last = out.lines().last().expect("at least one recovery point");
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    v["seq"].as_u64().unwrap()
}
