//! The life of a host's certificate with the real binaries on loopback:
//! a host renews its own certificate before it expires over its
//! replication connection, keeps its key, and replicates on with it; the
//! receiver's CA is rotated while two hosts replicate, each moving to the
//! new CA at its own time.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tidemark_e2e::replication::{
    free_port, run_ok, shipper_status, start_receiver, start_shipper_with, Daemon, HOST,
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
        "the metric of the time left",
        Duration::from_secs(10),
        || {
            scrape_value(metrics, "tidemark_shipper_certificate_expiry_seconds")
                .is_some_and(|s| s > 800.0 * 86_400.0)
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
    println!("protected at {:?}", started.elapsed());
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
    println!("protected again at {:?}", started.elapsed());
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
    println!("stopped at {:?}", started.elapsed());
}

/// `tidemark shipper run` for `host` (its log in `dir/shipper-HOST.log`).
fn start_host_shipper(dir: &Path, log_dir: &Path, host: &str, hpki: &Path, port: u16) -> Daemon {
    let child = Command::new(tidemark_bin())
        .args(["shipper", "run", "--log-dir"])
        .arg(log_dir)
        .args(["--receiver", &format!("127.0.0.1:{port}"), "--host", host])
        .arg("--pki-dir")
        .arg(hpki)
        .stdout(std::process::Stdio::null())
        .stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(format!("shipper-{host}.log")))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Daemon::new(child, "shipper")
}

fn protected(log_dir: &Path) -> bool {
    shipper_status(log_dir).is_some_and(|s| s["state"] == "protected")
}

fn issued_by(cert: &Path, ca: &Path) -> bool {
    let cert = tidemark_net::pki::load_certs(cert).unwrap().remove(0);
    tidemark_net::pki::load_certs(ca)
        .unwrap()
        .iter()
        .any(|ca| tidemark_net::rotate::issued_by(&cert, ca))
}

#[test]
fn the_ca_is_rotated_while_two_hosts_replicate_and_move_at_their_own_time() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // db1 is due for renewal (10 days left), db2 is not (400 days).
    let (rpki, pki1) = enroll_for(dir, "db1", 10);
    let (_, pki2) = enroll_for(dir, "db2", 400);
    let old_ca = dir.join("old-ca.crt");
    fs::copy(rpki.join("ca.crt"), &old_ca).unwrap();

    let out = run_ok(
        Command::new(tidemark_bin())
            .args(["receiver", "ca-rotate", "--pki-dir"])
            .arg(&rpki),
    );
    assert!(out.contains("new CA"), "{out}");
    assert_eq!(
        tidemark_net::pki::load_certs(&rpki.join("ca.crt"))
            .unwrap()
            .len(),
        2
    );
    let new_ca = dir.join("new-ca.crt");
    let bundle = fs::read_to_string(rpki.join("ca.crt")).unwrap();
    let second = bundle.find("-----BEGIN CERTIFICATE-----\n").map(|first| {
        first
            + 1
            + bundle[first + 1..]
                .find("-----BEGIN CERTIFICATE-----")
                .unwrap()
    });
    fs::write(&new_ca, &bundle[second.unwrap()..]).unwrap();
    // A second rotation waits for the first to end.
    let again = Command::new(tidemark_bin())
        .args(["receiver", "ca-rotate", "--pki-dir"])
        .arg(&rpki)
        .output()
        .unwrap();
    assert!(!again.status.success());

    let mut hosts = Vec::new();
    for (host, hpki) in [("db1", &pki1), ("db2", &pki2)] {
        let sub = dir.join(host);
        fs::create_dir(&sub).unwrap();
        let image = sub.join("disk.img");
        fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
        let tracker = TrackerProcess::start(&sub, &image, &[]);
        hosts.push((host, hpki.clone(), tracker));
    }
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let mut shippers: Vec<Daemon> = hosts
        .iter()
        .map(|(host, hpki, t)| start_host_shipper(dir, &t.log_dir, host, hpki, port))
        .collect();

    // db1 renews at once and moves to the new CA, with the bundle; db2
    // replicates on with its old-CA certificate.
    wait_for(
        dir,
        "db1's move to the new CA",
        Duration::from_secs(30),
        || issued_by(&pki1.join("host.crt"), &new_ca),
    );
    assert_eq!(fs::read_to_string(pki1.join("ca.crt")).unwrap(), bundle);
    for (_, _, t) in &hosts {
        wait_for(dir, "both hosts protected", Duration::from_secs(30), || {
            protected(&t.log_dir)
        });
    }
    assert!(issued_by(&pki2.join("host.crt"), &old_ca));

    // The receiver restarts: db1 connects with its new certificate. The
    // old CA cannot be retired while db2 holds one of its certificates.
    receiver.kill();
    let receiver = start_receiver(dir, &rpki, port, None);
    let log = || fs::read_to_string(dir.join(format!("receiver-{port}.log"))).unwrap();
    wait_for(dir, "both hosts back", Duration::from_secs(30), || {
        log().matches("session started").count() >= 2
    });
    let refused = Command::new(tidemark_bin())
        .args(["receiver", "ca-retire", "--pki-dir"])
        .arg(&rpki)
        .arg("--data-dir")
        .arg(dir.join("replicas"))
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(why.contains("db2") && !why.contains("db1"), "{why}");

    // db2 moves on demand, later: its request signed again (by the new CA),
    // copied back with the bundle, its shipper restarted.
    let renewed2 = dir.join("db2-renewed.crt");
    run_ok(
        Command::new(tidemark_bin())
            .args(["receiver", "sign", "--pki-dir"])
            .arg(&rpki)
            .args(["--host", "db2", "--csr"])
            .arg(pki2.join("host.csr"))
            .arg("--out")
            .arg(&renewed2),
    );
    fs::copy(&renewed2, pki2.join("host.crt")).unwrap();
    fs::copy(rpki.join("ca.crt"), pki2.join("ca.crt")).unwrap();
    assert!(issued_by(&pki2.join("host.crt"), &new_ca));
    shippers.pop().unwrap().kill();
    shippers.push(start_host_shipper(
        dir,
        &hosts[1].2.log_dir,
        "db2",
        &pki2,
        port,
    ));
    wait_for(
        dir,
        "db2 back with its new certificate",
        Duration::from_secs(30),
        || log().matches("session started").count() >= 3 && protected(&hosts[1].2.log_dir),
    );

    // Now the old CA retires; after a restart both hosts connect to a
    // receiver whose certificate only the new CA signed.
    run_ok(
        Command::new(tidemark_bin())
            .args(["receiver", "ca-retire", "--pki-dir"])
            .arg(&rpki)
            .arg("--data-dir")
            .arg(dir.join("replicas")),
    );
    assert_eq!(
        fs::read_to_string(rpki.join("ca.crt")).unwrap(),
        fs::read_to_string(&new_ca).unwrap()
    );
    assert!(issued_by(&rpki.join("receiver.crt"), &new_ca));
    receiver.kill();
    let receiver = start_receiver(dir, &rpki, port, None);
    wait_for(
        dir,
        "both hosts back under the new CA",
        Duration::from_secs(30),
        || {
            log().matches("session started").count() >= 2
                && hosts.iter().all(|(_, _, t)| protected(&t.log_dir))
        },
    );

    for s in shippers {
        assert!(s.stop().success());
    }
    assert!(receiver.stop().success());
    for (_, _, t) in hosts {
        assert!(t.stop());
    }
}

#[test]
fn a_retired_host_is_refused_and_its_replicas_go_while_the_other_replicates_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, pki1) = enroll_for(dir, "db1", 400);
    let (_, pki2) = enroll_for(dir, "db2", 400);
    let replicas = dir.join("replicas");
    let mut trackers = Vec::new();
    for host in ["db1", "db2"] {
        let sub = dir.join(host);
        fs::create_dir(&sub).unwrap();
        let image = sub.join("disk.img");
        fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
        trackers.push(TrackerProcess::start(&sub, &image, &[]));
    }
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let shipper1 = start_host_shipper(dir, &trackers[0].log_dir, "db1", &pki1, port);
    let shipper2 = start_host_shipper(dir, &trackers[1].log_dir, "db2", &pki2, port);
    for t in &trackers {
        wait_for(dir, "both hosts protected", Duration::from_secs(30), || {
            protected(&t.log_dir)
        });
    }
    let retire = |host: &str, extra: &[&str]| {
        Command::new(tidemark_bin())
            .args(["receiver", "retire", "--data-dir"])
            .arg(&replicas)
            .args(["--host", host])
            .args(extra)
            .output()
            .unwrap()
    };
    // Refused while the receiver runs, and without a confirmation.
    let running = retire("db2", &["--yes"]);
    assert!(!running.status.success());
    assert!(String::from_utf8_lossy(&running.stderr).contains("stop the receiver"));
    assert!(receiver.stop().success());
    let unconfirmed = retire("db2", &[]);
    assert!(!unconfirmed.status.success());
    assert!(String::from_utf8_lossy(&unconfirmed.stderr).contains("--yes"));
    assert!(replicas.join("db2/default/state").exists());

    let out = retire("db2", &["--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!replicas.join("db2").exists(), "db2's replicas are removed");
    assert!(replicas.join("db1/default/state").exists(), "db1's stay");

    // db2 is refused with a message that says so and stops (no spinning);
    // db1 replicates on.
    let receiver = start_receiver(dir, &rpki, port, None);
    let status = shipper2.wait_exit(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(2),
        "a retired host is a permanent failure"
    );
    let s = shipper_status(&trackers[1].log_dir).unwrap();
    assert_eq!(s["state"], "critical", "{s:#}");
    assert!(s["reason"].as_str().unwrap().contains("retired"), "{s:#}");
    assert!(!replicas.join("db2").exists());
    wait_for(dir, "db1 protected again", Duration::from_secs(60), || {
        protected(&trackers[0].log_dir)
    });

    // db1 retired with its replicas kept for 2 s: the receiver removes
    // them once the time is up.
    assert!(receiver.stop().success());
    let out = retire("db1", &["--yes", "--keep", "2s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(replicas.join("db1/default/state").exists(), "kept for now");
    std::thread::sleep(Duration::from_secs(2));
    let receiver = start_receiver(dir, &rpki, port, None);
    wait_for(
        dir,
        "db1's kept replicas removed",
        Duration::from_secs(10),
        || !replicas.join("db1").exists(),
    );
    assert_eq!(shipper1.wait_exit(Duration::from_secs(60)).code(), Some(2));
    assert!(receiver.stop().success());
    for t in trackers {
        assert!(t.stop());
    }
}
