//! `tidemark status` end to end: a tracker, a shipper and a receiver on
//! loopback, and the one screen (table, JSON, plain --watch lines) that
//! shows them; and the same command with nothing running.

use std::fs;
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidemark_e2e::replication::{
    enroll, free_port, run_ok, start_receiver, start_shipper, wait_caught_up, HOST,
};
use tidemark_e2e::{tidemark, TrackerProcess};

/// `tidemark status` asking the given tracker, log and data directories.
fn status(
    control: &std::path::Path,
    log_dir: &std::path::Path,
    data_dir: &std::path::Path,
) -> Command {
    let mut cmd = tidemark();
    cmd.arg("status")
        .arg("--tracker-control")
        .arg(control)
        .arg("--log-dir")
        .arg(log_dir)
        .arg("--data-dir")
        .arg(data_dir);
    cmd
}

#[test]
fn status_shows_a_protected_disk_and_its_newest_recovery_point() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    // A marker is a recovery point once the replica is consistent.
    run_ok(
        tidemark()
            .args(["tracker", "mark", "status-check", "--control-socket"])
            .arg(&tracker.control),
    );
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    let replicas = dir.join("replicas");

    // The point may take a moment to be committed after the ack.
    let deadline = Instant::now() + Duration::from_secs(30);
    let doc = loop {
        let out = run_ok(status(&tracker.control, &log_dir, &replicas).arg("--json"));
        let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
        if !doc["disks"][0]["newest_point"].is_null() {
            break doc;
        }
        assert!(Instant::now() < deadline, "no newest point: {doc:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(doc["answered"], true);
    assert_eq!(doc["tracker"]["answered"], true);
    assert_eq!(doc["shipper"]["answered"], true);
    assert_eq!(doc["receiver"]["answered"], true);
    let disks = doc["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 1, "{doc:#}");
    let disk = &disks[0];
    assert_eq!(disk["host"], HOST);
    assert_eq!(disk["group"], "default");
    assert_eq!(disk["disk"], "disk");
    assert_eq!(disk["tracking"], "data");
    assert_eq!(disk["replication"], "protected");
    assert_eq!(disk["state"], "data/protected");
    assert_eq!(disk["pending_records"], 0);
    assert!(disk["newest_point"]["seq"].as_u64().unwrap() > 0, "{doc:#}");
    assert!(disk["newest_point"]["age_seconds"].as_f64().unwrap() < 300.0);
    let replica = &doc["replicas"][0];
    assert_eq!(replica["host"], HOST);
    assert_eq!(replica["state"], "consistent");
    assert!(replica["points"].as_u64().unwrap() >= 1, "{doc:#}");

    let table = run_ok(&mut status(&tracker.control, &log_dir, &replicas));
    assert!(
        table.contains("tracker:  group default, tracking data"),
        "{table}"
    );
    assert!(
        table.contains(&format!("shipper:  {HOST}/default protected")),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(HOST) && l.contains(" disk "))
        .unwrap_or_else(|| panic!("no row for the disk:\n{table}"));
    assert!(row.contains("data/protected"), "{row}");
    assert!(
        row.contains("s ago") || row.contains("m ago"),
        "no newest point: {row}"
    );
    assert!(table.contains("REPLICAS"), "{table}");

    // Watching into a pipe: plain lines, one per disk and refresh.
    let mut watch = status(&tracker.control, &log_dir, &replicas)
        .args(["--watch", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    for line in [&first, &second] {
        let (clock, rest) = line.split_once(' ').unwrap();
        assert_eq!(clock.len(), 8, "HH:MM:SS first: {line}");
        assert!(
            rest.starts_with(&format!("{HOST}/default/disk data/protected lag ")),
            "{line}"
        );
    }
    // The second look has a record rate to show.
    assert!(second.ends_with("B/s"), "{second}");

    assert!(tracker.stop());
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
}

#[test]
fn status_with_nothing_running_says_so_and_exits_1() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = tidemark()
        .arg("status")
        .arg("--tracker-control")
        .arg(dir.join("tracker.ctl"))
        .arg("--log-dir")
        .arg(dir.join("log"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("tracker:  not running ("), "{stdout}");
    assert!(stdout.contains("shipper:  not running ("), "{stdout}");
    assert!(stderr.contains("nothing answered"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");

    let out = tidemark()
        .args(["status", "--json", "--tracker-control"])
        .arg(dir.join("tracker.ctl"))
        .arg("--log-dir")
        .arg(dir.join("log"))
        .arg("--data-dir")
        .arg(dir.join("replicas"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["answered"], false);
    assert_eq!(doc["tracker"]["verdict"], "not running");
    assert_eq!(doc["shipper"]["verdict"], "not running");
    assert_eq!(doc["receiver"]["answered"], false);
    assert_eq!(doc["disks"], serde_json::json!([]));
}
