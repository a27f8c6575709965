//! The life of a host's certificate with the real binaries on loopback:
//! a host renews its own certificate before it expires over its
//! replication connection, keeps its key, and replicates on with it.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tidemark_e2e::replication::{
    free_port, run_ok, shipper_status, start_receiver, start_shipper_with, HOST,
};
use tidemark_e2e::{tidemark_bin, TrackerProcess};
use tidemark_net::renew::certificate_not_after;

const SIZE: u64 = 16 << 20;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A receiver PKI and `host` enrolled with a certificate valid `days`
/// days: (receiver pki dir, host pki dir).
fn enroll_for(dir: &Path, host: &str, days: u32) -> (PathBuf, PathBuf) {
    let bin = tidemark_bin();
    let rpki = dir.join("receiver-pki");
    let hpki = dir.join(format!("{host}-pki"));
    if !rpki.exists() {
        run_ok(
            Command::new(&bin)
                .args(["receiver", "init", "--pki-dir"])
                .arg(&rpki),
        );
    }
    run_ok(
        Command::new(&bin)
            .args(["host", "request", "--host", host, "--pki-dir"])
            .arg(&hpki),
    );
    run_ok(
        Command::new(&bin)
            .args(["receiver", "sign", "--pki-dir"])
            .arg(&rpki)
            .args(["--host", host, "--days", &days.to_string(), "--csr"])
            .arg(hpki.join("host.csr"))
            .arg("--out")
            .arg(hpki.join("host.crt")),
    );
    fs::copy(rpki.join("ca.crt"), hpki.join("ca.crt")).unwrap();
    (rpki, hpki)
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The value of the first sample of `metric` at `port`'s `/metrics`.
fn scrape_value(port: u16, metric: &str) -> Option<f64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    raw.lines()
        .find(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Waits until `check` holds; else fails showing the daemons' logs in
/// `dir`.
fn wait_for(dir: &Path, what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            let mut logs = String::new();
            for entry in fs::read_dir(dir).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(".log") {
                    let text = fs::read_to_string(entry.path()).unwrap_or_default();
                    logs.push_str(&format!("--- {name}\n{text}\n"));
                }
            }
            panic!("{what} did not happen in {timeout:?}\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_host_renews_its_certificate_before_expiry_and_replicates_on_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Ten days left: within the default renew-before of 30 days.
    let (rpki, hpki) = enroll_for(dir, HOST, 10);
    let cert = hpki.join("host.crt");
    let key_before = fs::read(hpki.join("host.key")).unwrap();
    let old_end = certificate_not_after(&cert).unwrap();
    assert!(old_end - now() < 11 * 86_400);

    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let metrics = free_tcp_port();
    let listen = format!("127.0.0.1:{metrics}");
    let shipper = start_shipper_with(
        dir,
        &log_dir,
        &hpki,
        port,
        &["--metrics-listen".as_ref(), listen.as_ref()],
    );

    let started = Instant::now();
    wait_for(dir, "the renewal", Duration::from_secs(30), || {
        certificate_not_after(&cert).is_ok_and(|end| end > now() + 800 * 86_400)
    });
    println!("renewed {:?} after the shipper started", started.elapsed());
    // The same host, the same key; the CA bundle is the receiver's.
    let renewed = tidemark_net::pki::load_certs(&cert).unwrap();
    assert_eq!(
        tidemark_net::tls::host_from_certificate(&renewed[0]).unwrap(),
        HOST
    );
    assert_eq!(fs::read(hpki.join("host.key")).unwrap(), key_before);
    assert_eq!(
        fs::read(hpki.join("ca.crt")).unwrap(),
        fs::read(rpki.join("ca.crt")).unwrap()
    );
    wait_for(
        dir,
        "the metric of days left",
        Duration::from_secs(10),
        || {
            scrape_value(metrics, "tidemark_shipper_certificate_days_left")
                .is_some_and(|d| d > 800.0)
        },
    );

    // The next connection uses the renewed certificate: the receiver
    // restarts, the shipper connects again and is protected, and nothing
    // asks for another renewal.
    let receiver_log = || fs::read_to_string(dir.join(format!("receiver-{port}.log"))).unwrap();
    wait_for(
        dir,
        "the shipper to be protected",
        Duration::from_secs(30),
        || shipper_status(&log_dir).is_some_and(|s| s["state"] == "protected"),
    );
    receiver.kill();
    let receiver = start_receiver(dir, &rpki, port, None);
    wait_for(dir, "the reconnection", Duration::from_secs(30), || {
        receiver_log().contains("session started")
    });
    wait_for(
        dir,
        "the shipper to be protected again",
        Duration::from_secs(30),
        || shipper_status(&log_dir).is_some_and(|s| s["state"] == "protected"),
    );
    let shipper_log = fs::read_to_string(dir.join("shipper.log")).unwrap();
    assert_eq!(
        shipper_log
            .matches("renewed this host's certificate")
            .count(),
        1,
        "{shipper_log}"
    );
    assert!(!receiver_log().contains("renew"), "{}", receiver_log());

    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    assert!(tracker.stop());
}
