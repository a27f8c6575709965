//! The cluster stops answering for 30 s under a receiver on the Ceph store
//! (the testbed's only OSD frozen with SIGSTOP, then resumed with SIGCONT;
//! its own test binary, so its own testbed: the freeze would stall any
//! other test of the binary). A shipper and a paced writer run throughout.
//!
//! While the cluster is frozen the receiver reports itself and the group
//! degraded (`tidemark_receiver_store_degraded`,
//! `tidemark_receiver_group_degraded`) and acknowledges nothing (the
//! shipper's durable sequence stays where it was), and the tracker goes on
//! serving its disk (the writer's batches go on, the log grows). The outage
//! outlasts the group's lease (3 s): the receiver takes its own group back
//! by itself when the cluster answers again (no restart), the degraded
//! state ends, the replica ends byte-equal to the source and every point
//! equals the replay of the log up to it. `tidemark status --config`
//! shows the group's owner and lease from the cluster, and the degraded
//! state with its reason during the outage (from the receiver on this
//! node, as the cluster answers status neither). At the end `tidemark
//! receiver retire --config` removes the host's group from the cluster.
//!
//! Needs Ceph (skips with a message without `ceph-mon`, unless `CI` is
//! set), a testbed this process started (its OSD's pid file), qemu-io and
//! rados; run with `--features ceph` (scripts/test.sh does).

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tidemark_ceph::testbed;
use tidemark_e2e::replication::{
    enroll, free_port, last_seq, shipper_status, start_receiver, wait_caught_up, Daemon, HOST,
};
use tidemark_e2e::{require_tool, TrackerProcess};

mod ceph_site;
use ceph_site::{check_group, writer, KeepOnPanic, SIZE};

/// How long the cluster does not answer.
const OUTAGE: Duration = Duration::from_secs(30);
/// The receiver's op timeout: a cluster operation fails after it.
const OP_TIMEOUT: &str = "5s";

/// Resumes the frozen OSD when dropped, whatever the test's outcome.
struct Frozen(Option<Pid>);

impl Frozen {
    fn freeze(pid: Pid) -> Frozen {
        kill(pid, Signal::SIGSTOP).unwrap();
        Frozen(Some(pid))
    }

    fn resume(&mut self) {
        if let Some(pid) = self.0.take() {
            kill(pid, Signal::SIGCONT).unwrap();
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.resume();
    }
}

/// The receiver's metrics, as `name{labels}` → value.
fn metrics(addr: &str) -> Option<std::collections::HashMap<String, f64>> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_owned(), value.parse().ok()?))
            })
            .collect(),
    )
}

/// `tidemark status --json --config` on the receiver's configuration: the
/// group's entry among the replicas.
fn status_of_group(config: &Path) -> serde_json::Value {
    let out = tidemark_e2e::tidemark()
        .args(["status", "--json", "--config"])
        .arg(config)
        .args(["--tracker-control", "/nonexistent/tracker.ctl"])
        .args(["--log-dir", "/nonexistent/log"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json: {e}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    doc["replicas"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|r| r["host"] == HOST && r["group"] == "default")
                .cloned()
        })
        .unwrap_or_else(|| panic!("status lists no replica of {HOST}/default: {doc:#}"))
}

/// What the cluster says now, for a failure's message: a new client's
/// stat of the group's state object (does the cluster answer anyone?),
/// the OSD's operations in flight and the end of its log.
fn cluster_view(tb: &testbed::Testbed, namespace: &str) -> String {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("timeout")
            .arg("15")
            .args(args)
            .output();
        match out {
            Ok(o) => format!(
                "$ {} ({})\n{}{}",
                args.join(" "),
                match o.status.code() {
                    Some(124) => "no answer within 15 s".to_owned(),
                    _ => o.status.to_string(),
                },
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("$ {}: {e}\n", args.join(" ")),
        }
    };
    let conf = tb.conf.display().to_string();
    let state = format!("{HOST}+default+state");
    let mut view = run(&[
        "rados",
        "--conf",
        &conf,
        "-p",
        &tb.pool,
        "--namespace",
        namespace,
        "stat",
        &state,
    ]);
    if let Some(dir) = &tb.dir {
        let asok = dir.join("run/osd.0.asok").display().to_string();
        // One line per operation: what it is and what it waits for.
        let ops = std::process::Command::new("timeout")
            .args(["15", "ceph", "--admin-daemon", &asok, "dump_ops_in_flight"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok());
        match ops.as_ref().and_then(|o| o["ops"].as_array()) {
            Some(ops) => {
                view += &format!("osd.0: {} operations in flight\n", ops.len());
                for op in ops.iter().take(20) {
                    view += &format!(
                        "  {} [{}, {:.0} s]\n",
                        op["description"].as_str().unwrap_or("?"),
                        op["type_data"]["flag_point"].as_str().unwrap_or("?"),
                        op["age"].as_f64().unwrap_or(0.0)
                    );
                }
            }
            None => view += "osd.0: its operations in flight could not be read\n",
        }
        let log = fs::read_to_string(dir.join("log/osd.0.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        view += "osd.0.log, last lines:\n";
        for line in tail.into_iter().rev() {
            view += line;
            view += "\n";
        }
    }
    view
}

fn durable(log_dir: &Path) -> u64 {
    shipper_status(log_dir)
        .and_then(|s| s["durable_seq"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_cluster_outage_degrades_the_receiver_and_replication_resumes_by_itself() {
    const TEST: &str = "a_cluster_outage_degrades_the_receiver_and_replication_resumes_by_itself";
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let Some(osd_pid) = tb
        .dir
        .as_ref()
        .and_then(|d| fs::read_to_string(d.join("run/osd.0.pid")).ok())
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        eprintln!("skipping {TEST}: the cluster was not started by this test (CEPH_CONF set), so its OSD cannot be frozen");
        return;
    };
    if !require_tool("qemu-io", TEST) {
        return;
    }
    let started = Instant::now();
    let namespace = format!("outage-{}", std::process::id());
    let tmp = KeepOnPanic(Some(tempfile::tempdir().unwrap()), TEST);
    let dir = tmp.0.as_ref().unwrap().path().to_path_buf();
    let (rpki, hpki) = enroll(&dir, HOST);
    let (port, metrics_port) = (free_port(), free_port());
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let config = dir.join("receiver.toml");
    fs::write(
        &config,
        format!(
            "[receiver]\nlisten = \"127.0.0.1:{port}\"\ndata-dir = \"{d}/data\"\n\
             control-socket = \"{d}/receiver.ctl\"\nmetrics-listen = \"{metrics_addr}\"\n\
             [receiver.tls]\nca = \"{r}/ca.crt\"\nca-key = \"{r}/ca.key\"\n\
             cert = \"{r}/receiver.crt\"\nkey = \"{r}/receiver.key\"\n\
             [receiver.store]\nkind = \"ceph\"\nconf = \"{conf}\"\nuser = \"client.admin\"\n\
             pool = \"{pool}\"\nnamespace = \"{namespace}\"\nop-timeout = \"{OP_TIMEOUT}\"\n\
             advertise = \"127.0.0.1:{port}\"\nlease = \"3s\"\nblocklist-expire = \"10m\"\n\
             [receiver.retention]\nmax-points = 5\n",
            d = dir.display(),
            r = rpki.display(),
            conf = tb.conf.display(),
            pool = tb.pool,
        ),
    )
    .unwrap();
    let receiver = start_receiver(&dir, &rpki, port, Some(&config));
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    // One log segment that is never recycled: the reference keeps every
    // record, and the log has room for the outage.
    let tracker = TrackerProcess::start(
        &dir,
        &image,
        &["--segment-size", "256MiB", "--log-size-limit", "512MiB"],
    );
    let log_dir = tracker.log_dir.clone();
    let shipper_config = dir.join("shipper.toml");
    fs::write(
        &shipper_config,
        format!(
            "[shipper]\nhost = \"{HOST}\"\nreceiver = \"127.0.0.1:{port}\"\n\
             log-dir = \"{}\"\ncontrol-socket = \"{}\"\n\
             [shipper.tls]\nca = \"{h}/ca.crt\"\ncert = \"{h}/host.crt\"\nkey = \"{h}/host.key\"\n\
             [shipper.retry]\ninitial-backoff = \"100ms\"\nmax-backoff = \"2s\"\n",
            log_dir.display(),
            dir.join("shipper.ctl").display(),
            h = hpki.display()
        ),
    )
    .unwrap();
    let shipper = Daemon::new(
        tidemark_e2e::tidemark()
            .args(["shipper", "run", "--config"])
            .arg(&shipper_config)
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(dir.join("shipper.log")).unwrap())
            .spawn()
            .unwrap(),
        "shipper",
    );
    wait_caught_up(&dir, &log_dir, Duration::from_secs(120));
    let stop_writer = Arc::new(AtomicBool::new(false));
    let batches = Arc::new(AtomicU64::new(0));
    let writing = {
        let (uri, stop, done) = (tracker.uri(), stop_writer.clone(), batches.clone());
        std::thread::spawn(move || writer(uri, stop, done))
    };
    let receiver_log =
        || fs::read_to_string(dir.join(format!("receiver-{port}.log"))).unwrap_or_default();
    let value = |m: &std::collections::HashMap<String, f64>, k: &str| m.get(k).copied();
    let group_degraded =
        format!("tidemark_receiver_group_degraded{{host=\"{HOST}\",group=\"default\"}}");

    std::thread::sleep(Duration::from_secs(3));
    // A group is in the metrics once a scrape found its store free (a
    // scrape never waits for a commit): under load that may take a few.
    let asked = Instant::now();
    let m = loop {
        let m = metrics(&metrics_addr).expect("the receiver serves metrics");
        if value(&m, &group_degraded).is_some() || asked.elapsed() > Duration::from_secs(15) {
            break m;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(value(&m, "tidemark_receiver_store_degraded"), Some(0.0));
    assert_eq!(value(&m, &group_degraded), Some(0.0), "{m:?}");
    // Status from the cluster: the owner and its lease.
    let seen = status_of_group(&config);
    assert_eq!(
        seen["owner"]["address"],
        format!("127.0.0.1:{port}"),
        "{seen:#}"
    );
    assert_eq!(seen["owner"]["lease_held"], true, "{seen:#}");
    assert_eq!(seen["degraded"], false, "{seen:#}");

    // The outage.
    let mut frozen = Frozen::freeze(Pid::from_raw(osd_pid));
    let froze = Instant::now();
    let (batches_then, log_then) = (batches.load(Ordering::Relaxed), last_seq(&log_dir));
    // Whatever was in flight when the cluster froze settles (a commit the
    // OSD finished just before may still be acknowledged): wait until the
    // acknowledged position has not moved for two seconds (under load that
    // took longer than one), at most ten. Nothing may move after that.
    let mut acked_then = durable(&log_dir);
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_secs(2)
        && froze.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(200));
        let now = durable(&log_dir);
        if now != acked_then {
            acked_then = now;
            still_since = Instant::now();
        }
    }
    let mut degraded_after = None;
    while froze.elapsed() < OUTAGE {
        if degraded_after.is_none() {
            if let Some(m) = metrics(&metrics_addr) {
                if value(&m, "tidemark_receiver_store_degraded") == Some(1.0)
                    && value(&m, &group_degraded) == Some(1.0)
                {
                    degraded_after = Some(froze.elapsed());
                    // Status on this node says so too, with the reason,
                    // though the cluster does not answer it either.
                    let seen = status_of_group(&config);
                    assert_eq!(seen["degraded"], true, "{seen:#}");
                    assert!(
                        seen["degraded_reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("op-timeout")),
                        "{seen:#}"
                    );
                }
            }
        }
        assert_eq!(
            durable(&log_dir),
            acked_then,
            "something was acknowledged while the cluster did not answer"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let degraded_after = degraded_after.unwrap_or_else(|| {
        panic!(
            "the receiver never reported the store degraded during the outage\n{}",
            receiver_log()
        )
    });
    let (batches_during, log_during) = (
        batches.load(Ordering::Relaxed) - batches_then,
        last_seq(&log_dir) - log_then,
    );
    assert!(
        batches_during > 10 && log_during > 0,
        "the tracker did not go on serving: {batches_during} batches, {log_during} records during the outage"
    );
    assert!(
        receiver_log().contains("store degraded"),
        "the receiver did not log why it is degraded\n{}",
        receiver_log()
    );
    frozen.resume();
    let resumed = Instant::now();

    // Replication resumes by itself: acknowledged again, no longer degraded.
    let resumed_after = loop {
        let healthy = metrics(&metrics_addr).is_some_and(|m| {
            value(&m, "tidemark_receiver_store_degraded") == Some(0.0)
                && value(&m, &group_degraded) == Some(0.0)
        });
        if healthy && durable(&log_dir) > acked_then {
            break resumed.elapsed();
        }
        assert!(
            resumed.elapsed() < Duration::from_secs(90),
            "replication did not resume within 90 s of the cluster answering again (durable {})\nthe cluster:\n{}\nreceiver log:\n{}\nshipper log:\n{}",
            durable(&log_dir),
            cluster_view(tb, &namespace),
            receiver_log(),
            fs::read_to_string(dir.join("shipper.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let seen = status_of_group(&config);
    assert_eq!(seen["degraded"], false, "{seen:#}");
    assert_eq!(
        seen["owner"]["address"],
        format!("127.0.0.1:{port}"),
        "{seen:#}"
    );
    std::thread::sleep(Duration::from_secs(2));
    stop_writer.store(true, Ordering::Relaxed);
    let total_batches = writing.join().unwrap();
    let status = wait_caught_up(&dir, &log_dir, Duration::from_secs(120));
    let last = status["durable_seq"].as_u64().unwrap();
    drop(shipper);
    drop(receiver);
    let points = check_group(tb, &namespace, HOST, &image, &log_dir, last);
    drop(tracker);

    // Retiring the host removes its group from the cluster, once the
    // killed receiver's lease expired (refused before: it might be alive).
    let retiring = Instant::now();
    loop {
        let out = tidemark_e2e::tidemark()
            .args(["receiver", "retire", "--yes", "--host", HOST, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            retiring.elapsed() < Duration::from_secs(30),
            "retire --config failed for 30 s: {said}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let engine = tidemark_receiver::store::ceph::CephEngine::new(
        tb.connect(&namespace, Duration::from_secs(30)).unwrap(),
        "ceph_outage",
    );
    let (host, group) = (
        tidemark_names::Name::from_static(HOST),
        tidemark_names::Name::from_static("default"),
    );
    use tidemark_receiver::store::StoreEngine;
    assert!(
        !engine.exists(&host, &group),
        "the retired host's group is left"
    );
    assert!(engine.groups(&host).unwrap().is_empty());
    eprintln!(
        "{TEST}: degraded {:.1} s into the {} s outage; {batches_during} write batches and {log_during} records \
         meanwhile, none acknowledged; applying again {:.1} s after the cluster resumed; \
         {total_batches} batches, {last} records, points {points:?} exact; {:.1} s",
        degraded_after.as_secs_f64(),
        OUTAGE.as_secs(),
        resumed_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
