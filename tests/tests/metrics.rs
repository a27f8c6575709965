//! The `/metrics` endpoints of the tracker, shipper and receiver, end to
//! end: the real binaries on loopback, writes through qemu-io, every
//! endpoint scraped over plain HTTP, the important metrics checked for
//! sane values once replication has caught up, and every body checked by
//! `promtool check metrics`.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tidemark_e2e::replication::{enroll, free_port};
use tidemark_e2e::{qemu_io, require_tool, tidemark};

const SIZE: u64 = 16 << 20;
const HOST: &str = "db1.example.test";

/// A daemon started with `--metrics-listen 127.0.0.1:0`: its first stdout
/// line (unchanged by metrics) and the metrics address from the second.
struct Daemon {
    child: Child,
    metrics: SocketAddr,
}

impl Daemon {
    fn start(mut cmd: Command, first_line: &str, log: &Path) -> Daemon {
        let mut child = cmd
            .args(["--metrics-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for _ in 0..2 {
                if let Some(Ok(l)) = lines.next() {
                    let _ = tx.send(l);
                }
            }
            for _ in lines {}
        });
        let next = || {
            rx.recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| {
                    panic!(
                        "no output from {cmd:?}; its log:\n{}",
                        fs::read_to_string(log).unwrap_or_default()
                    )
                })
        };
        let first = next();
        assert!(first.starts_with(first_line), "first line: {first}");
        let second = next();
        let addr = second
            .strip_prefix("metrics on http://")
            .and_then(|s| s.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("second line: {second}"));
        Daemon {
            child,
            metrics: addr.parse().unwrap(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET /metrics with this Accept header: (content type, body).
fn scrape(addr: SocketAddr, accept: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (content_type, body.to_string())
}

/// The OpenMetrics body as series → value.
fn samples(addr: SocketAddr) -> (HashMap<String, f64>, String) {
    let (ctype, body) = scrape(addr, "application/openmetrics-text;version=1.0.0");
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(
        body.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF:\n{body}"
    );
    let map = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect();
    (map, body)
}

/// The value of the one series named `name` that has every label in
/// `want`; panics with the body if there is none.
fn value(m: &(HashMap<String, f64>, String), name: &str, want: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> =
        m.0.iter()
            .filter(|(series, _)| {
                let (n, labels) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
            })
            .map(|(_, v)| *v)
            .collect();
    assert_eq!(found.len(), 1, "{name} {want:?}: {found:?} in\n{}", m.1);
    found[0]
}

/// Runs `promtool check metrics` on the classic-format body.
fn promtool_check(addr: SocketAddr, what: &str) {
    let (ctype, body) = scrape(addr, "text/plain;version=0.0.4");
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on the {what}'s metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_daemon_exports_sane_metrics_that_promtool_accepts() {
    let test = "every_daemon_exports_sane_metrics_that_promtool_accepts";
    if !require_tool("qemu-io", test) || !require_tool("promtool", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    let f = fs::File::create(&image).unwrap();
    f.set_len(SIZE).unwrap();
    f.write_all_at(&[0x11; 1 << 20], 2 << 20).unwrap();
    drop(f);
    let log_dir = dir.join("log");
    let socket = dir.join("nbd.sock");

    let port = free_port();
    let mut cmd = tidemark();
    cmd.args([
        "receiver",
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .arg("--data-dir")
    .arg(dir.join("replicas"))
    .arg("--pki-dir")
    .arg(&rpki);
    let receiver = Daemon::start(cmd, "receiver ready on", &dir.join("receiver.log"));

    let mut cmd = tidemark();
    cmd.args(["tracker", "serve", "--image"])
        .arg(&image)
        .args(["--name", "disk", "--socket"])
        .arg(&socket)
        .arg("--log-dir")
        .arg(&log_dir);
    let tracker = Daemon::start(cmd, "tracker ready on", &dir.join("tracker.log"));

    let mut cmd = tidemark();
    cmd.args(["shipper", "run", "--log-dir"])
        .arg(&log_dir)
        .args(["--receiver", &format!("127.0.0.1:{port}"), "--host", HOST])
        .arg("--pki-dir")
        .arg(&hpki);
    let shipper = Daemon::start(cmd, "shipper started", &dir.join("shipper.log"));

    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    qemu_io(
        &uri,
        &[
            "write -P 0xa1 0 1M",
            "write -P 0xb2 8M 512k",
            "write -z 12M 1M",
            "flush",
            "write -P 0xc3 4M 64k",
            "flush",
        ],
    );

    // Wait until the shipper's metrics say it has caught up.
    let deadline = Instant::now() + Duration::from_secs(90);
    let s = loop {
        let s = samples(shipper.metrics);
        let protected = value(&s, "tidemark_shipper_state", &[("state", "protected")]);
        let pending = value(&s, "tidemark_shipper_pending_records", &[]);
        let t = samples(tracker.metrics);
        let tracker_pending = value(&t, "tidemark_tracker_pending_records", &[]);
        if protected == 1.0 && pending == 0.0 && tracker_pending == 0.0 {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "replication did not catch up:\n{}\nshipper log:\n{}",
            s.1,
            fs::read_to_string(dir.join("shipper.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // The shipper.
    let g = [("host", HOST), ("group", "default")];
    assert_eq!(
        value(&s, "tidemark_shipper_lag_seconds", &g),
        0.0,
        "caught up: no lag"
    );
    assert!(value(&s, "tidemark_shipper_acked_lag_seconds_count", &g) > 0.0);
    let lag_sum = value(&s, "tidemark_shipper_acked_lag_seconds_sum", &g);
    assert!((0.0..90.0).contains(&lag_sum), "{lag_sum}");
    assert_eq!(
        value(&s, "tidemark_shipper_state", &[("state", "critical")]),
        0.0
    );
    let record_bytes = value(&s, "tidemark_shipper_record_bytes_total", &g);
    assert!(record_bytes >= (1 << 20) as f64, "{record_bytes}");
    assert!(value(&s, "tidemark_shipper_wire_bytes_total", &g) > 0.0);
    let disk = [("host", HOST), ("group", "default"), ("disk", "disk")];
    assert_eq!(
        value(&s, "tidemark_shipper_disk_size_bytes", &disk),
        SIZE as f64
    );
    assert_eq!(
        value(&s, "tidemark_shipper_initial_sync_done_bytes", &disk),
        SIZE as f64
    );
    assert_eq!(
        value(&s, "tidemark_shipper_last_error_info", &[("class", "none")]),
        1.0
    );
    assert_eq!(value(&s, "tidemark_shipper_retries_total", &g), 0.0);
    let durable = value(&s, "tidemark_shipper_durable_sequence", &g);
    assert!(durable > 0.0);

    // The tracker.
    let t = samples(tracker.metrics);
    let tg = [("group", "default")];
    assert_eq!(
        value(
            &t,
            "tidemark_tracker_tracking_state",
            &[("disk", "disk"), ("state", "data")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &t,
            "tidemark_tracker_tracking_state",
            &[("disk", "disk"), ("state", "bitmap")]
        ),
        0.0
    );
    let written = value(&t, "tidemark_tracker_written_bytes_total", &tg);
    assert_eq!(written, ((1 << 20) + (512 << 10) + (64 << 10)) as f64);
    let writes = value(&t, "tidemark_tracker_writes_total", &tg);
    assert_eq!(writes, 4.0, "three writes and a write-zeroes");
    assert_eq!(
        value(&t, "tidemark_tracker_write_latency_seconds_count", &tg),
        writes,
        "every acknowledged write is timed"
    );
    assert_eq!(
        value(
            &t,
            "tidemark_tracker_write_latency_seconds_bucket",
            &[("le", "+Inf")]
        ),
        writes
    );
    assert!(value(&t, "tidemark_tracker_barriers_total", &tg) >= 2.0);
    let fill = value(&t, "tidemark_tracker_log_fill_ratio", &tg);
    assert!(fill > 0.0 && fill <= 1.0, "{fill}");
    assert_eq!(value(&t, "tidemark_tracker_pending_records", &tg), 0.0);

    // The receiver.
    let r = samples(receiver.metrics);
    assert_eq!(value(&r, "tidemark_receiver_durable_sequence", &g), durable);
    assert!(value(&r, "tidemark_receiver_applied_records_total", &g) >= 6.0);
    assert!(value(&r, "tidemark_receiver_applied_bytes_total", &g) >= (1 << 20) as f64);
    assert_eq!(
        value(
            &r,
            "tidemark_receiver_group_state",
            &[("state", "consistent")]
        ),
        1.0
    );
    assert_eq!(value(&r, "tidemark_receiver_sessions", &g), 1.0);
    let age = value(&r, "tidemark_receiver_last_barrier_age_seconds", &g);
    assert!((0.0..120.0).contains(&age), "{age}");

    promtool_check(tracker.metrics, "tracker");
    promtool_check(shipper.metrics, "shipper");
    promtool_check(receiver.metrics, "receiver");
}
