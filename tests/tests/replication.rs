//! Replication end to end, with the real binaries on loopback: enrolment,
//! tracker → change log → shipper → QUIC (mutual TLS) → receiver → replica,
//! initial sync of a disk that already holds data, restarts and crashes of
//! either side, log overflow repaired by a checksum resync, refused hosts,
//! and a failover whose images must equal the source byte for byte.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tidemark_e2e::replication::{
    enroll, failover_and_compare_with, free_port, newest_point, run_ok, shipper_status,
    start_receiver, start_shipper, start_test_failover, wait_caught_up, HOST,
};
use tidemark_e2e::{nbdinfo_map, qemu_io, require_tool, tidemark, tidemark_bin, TrackerProcess};

const SIZE: u64 = 64 << 20;

/// Fails over into `dir/failover` and compares every byte with `image`.
fn failover_and_compare(dir: &Path, image: &Path) {
    let source = fs::read(image).unwrap();
    failover_and_compare_with(&tidemark_bin(), dir, &dir.join("failover"), None, &source);
}

/// An image that already holds data before it is protected: the initial
/// sync must copy it (and only it: the rest is a hole).
fn image_with_data(path: &Path) {
    let f = fs::File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let noise: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all_at(&noise, 10 << 20).unwrap();
    f.write_all_at(&[0x5a; 1 << 20], 40 << 20).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_disk_in_use_replicates_through_crashes_and_restarts_and_fails_over_byte_exact() {
    if !require_tool(
        "qemu-io",
        "a_disk_in_use_replicates_through_crashes_and_restarts_and_fails_over_byte_exact",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    image_with_data(&image);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let uri = tracker.uri();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);

    // Writes while the initial sync runs.
    qemu_io(
        &uri,
        &[
            "write -P 0xa1 0 4M",
            "write -P 0xb2 10M 512k",
            "discard 41M 256k",
            "write -z 12M 1M",
            "flush",
        ],
    );
    let status = wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    let data = status["disks"][0]["data_bytes"].as_u64().unwrap();
    assert!(
        (3 << 20..16 << 20).contains(&data),
        "the initial sync sent {data} bytes as data; zero regions must not be sent"
    );

    // The receiver crashes; writes go on; it comes back on the same port.
    receiver.kill();
    qemu_io(&uri, &["write -P 0xc3 20M 2M", "flush"]);
    let receiver = start_receiver(dir, &rpki, port, None);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));

    // The shipper restarts; writes happen while it is gone.
    assert!(shipper.stop().success(), "the shipper did not stop cleanly");
    qemu_io(
        &uri,
        &["write -P 0xd4 30M 1M", "write -P 0xe5 0 64k", "flush"],
    );
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));

    // A planned stop: the tracker's final barrier reaches the replica.
    assert!(tracker.stop(), "the tracker did not stop cleanly");
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    failover_and_compare(dir, &image);
    failover_onto_a_block_device(dir, &image);
}

/// Fails over onto a loop device that holds other bytes (`--to DEVICE`):
/// the device then reads as `image`, zero ranges included.
fn failover_onto_a_block_device(dir: &Path, image: &Path) {
    let test = "failover_onto_a_block_device";
    if !require_tool("losetup", test) {
        return;
    }
    let backing = dir.join("device.img");
    fs::write(&backing, vec![0xee; SIZE as usize]).unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").args(["-d", &self.0]).status();
        }
    }
    let _detach = Detach(dev.clone());
    let out = run_ok(
        tidemark()
            .args(["failover", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--to", &dev]),
    );
    assert!(out.contains(&dev), "{out}");
    assert!(
        fs::read(&dev).unwrap() == fs::read(image).unwrap(),
        "{dev} differs from the source after the failover"
    );
}

#[test]
fn a_full_log_falls_back_to_bitmap_mode_and_a_checksum_resync_repairs_the_replica() {
    if !require_tool(
        "qemu-io",
        "a_full_log_falls_back_to_bitmap_mode_and_a_checksum_resync_repairs_the_replica",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    image_with_data(&image);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(
        dir,
        &image,
        &["--log-size-limit", "4MiB", "--segment-size", "1MiB"],
    );
    let log_dir = tracker.log_dir.clone();
    let uri = tracker.uri();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    qemu_io(&uri, &["write -P 0x11 0 512k", "flush"]);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));

    // Without a shipper the log fills: bitmap mode, writes go on.
    assert!(shipper.stop().success());
    qemu_io(
        &uri,
        &["write -P 0x22 1M 6M", "write -P 0x33 50M 1M", "flush"],
    );
    let status = run_ok(
        tidemark()
            .args(["tracker", "status", "--json", "--control-socket"])
            .arg(&tracker.control),
    );
    let t: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(t["tracking"], "bitmap", "expected bitmap mode: {status}");

    // The shipper drains the log; the tracker returns to data mode and
    // records the dirty extents as resync-needed; the shipper compares
    // digests and sends only what differs.
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let s = wait_caught_up(dir, &log_dir, Duration::from_secs(60));
        let tracker_status = run_ok(
            tidemark()
                .args(["tracker", "status", "--json", "--control-socket"])
                .arg(&tracker.control),
        );
        let t: serde_json::Value = serde_json::from_str(&tracker_status).unwrap();
        if t["tracking"] == "data" && s["resync_blocks_compared"].as_u64() > Some(0) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no resync happened: {s:#} {tracker_status}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    // Compared in coarse blocks (the default sync-chunk-size), sent in the
    // 4 KiB blocks that differ within them.
    let compared = status["resync_blocks_compared"].as_u64().unwrap();
    let sent = status["resync_bytes_sent"].as_u64().unwrap();
    assert!(sent > 0, "the changed blocks must be sent: {status:#}");
    assert!(
        sent <= compared * (1 << 20),
        "more bytes sent ({sent}) than compared ({compared} blocks of 1 MiB)"
    );
    // Data mode again: a new write is shipped as a record.
    qemu_io(&uri, &["write -P 0x44 60M 64k", "flush"]);
    assert!(tracker.stop());
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    failover_and_compare(dir, &image);
}

#[test]
fn hosts_with_a_foreign_or_revoked_certificate_are_refused_and_go_critical() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();

    // A receiver that lists the host as revoked.
    let port = free_port();
    let config = dir.join("receiver.toml");
    fs::write(
        &config,
        format!(
            "[receiver]\nlisten = \"127.0.0.1:{port}\"\ndata-dir = \"{}\"\ncontrol-socket = \"{}\"\n\
             [receiver.tls]\nca = \"{r}/ca.crt\"\nca-key = \"{r}/ca.key\"\ncert = \"{r}/receiver.crt\"\nkey = \"{r}/receiver.key\"\n\
             [[receiver.host]]\nname = \"{HOST}\"\nrevoked = true\n",
            dir.join("replicas").display(),
            dir.join("receiver.ctl").display(),
            r = rpki.display()
        ),
    )
    .unwrap();
    let receiver = start_receiver(dir, &rpki, port, Some(&config));
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    let status = shipper.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(2),
        "a refused host is a permanent failure"
    );
    let s = shipper_status(&log_dir).unwrap();
    assert_eq!(s["state"], "critical", "{s:#}");
    assert!(s["reason"].as_str().unwrap().contains("revoked"), "{s:#}");
    assert!(
        !dir.join("replicas").join(HOST).exists(),
        "nothing may be created for a revoked host"
    );
    receiver.stop();

    // A certificate from another CA: the TLS handshake refuses it.
    let other = dir.join("other");
    fs::create_dir(&other).unwrap();
    let (_, foreign) = enroll(&other, HOST);
    fs::copy(rpki.join("ca.crt"), foreign.join("ca.crt")).unwrap();
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let shipper = start_shipper(dir, &log_dir, &foreign, port);
    let status = shipper.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2));
    let s = shipper_status(&log_dir).unwrap();
    assert_eq!(s["state"], "critical", "{s:#}");
    assert!(
        s["reason"].as_str().unwrap().contains("certificate"),
        "{s:#}"
    );
    assert!(!dir.join("replicas").join(HOST).exists());
    receiver.stop();
    assert!(tracker.stop());
}

#[test]
fn an_unclean_tracker_stop_is_repaired_by_a_resync_of_the_hot_extents() {
    if !require_tool(
        "qemu-io",
        "an_unclean_tracker_stop_is_repaired_by_a_resync_of_the_hot_extents",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    image_with_data(&image);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let uri = tracker.uri();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    qemu_io(&uri, &["write -P 0x61 0 1M", "flush"]);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));

    // A writer is busy when the tracker dies (SIGKILL: no final barrier,
    // writes acknowledged after the last flush may be missing from the log
    // while they are on the disk).
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..200u64 {
        cmd.args([
            "-c",
            &format!("write -P {} {}k 64k", 0x70 + i % 16, (i * 192) % (60 << 10)),
        ]);
    }
    let mut writer = cmd
        .arg(&uri)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    tracker.kill();
    let _ = writer.wait();

    // The restart records the hot extents as resync-needed in a new
    // generation; the shipper compares them and the replica converges.
    let tracker = TrackerProcess::start(dir, &image, &[]);
    assert!(
        tracker.ready_line.contains("unclean"),
        "{}",
        tracker.ready_line
    );
    let uri = tracker.uri();
    qemu_io(&uri, &["write -P 0x62 32M 1M", "flush"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = wait_caught_up(dir, &log_dir, Duration::from_secs(60));
        if s["resync_blocks_compared"].as_u64() > Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no resync after the unclean stop: {s:#}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(tracker.stop());
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    failover_and_compare(dir, &image);
}

#[test]
fn the_bandwidth_limit_paces_what_goes_on_the_wire() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    let f = fs::File::create(&image).unwrap();
    f.set_len(SIZE).unwrap();
    // 8 MiB that zstd cannot shrink: the initial sync must send it all.
    let mut noise = vec![0u8; 8 << 20];
    StdRng::seed_from_u64(1).fill_bytes(&mut noise);
    f.write_all_at(&noise, 16 << 20).unwrap();
    f.sync_all().unwrap();
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let started = Instant::now();
    let shipper = tidemark_e2e::replication::start_shipper_configured(
        dir,
        &log_dir,
        &hpki,
        port,
        "[shipper.bandwidth]\nlimit = \"2MiB\"\n",
    );
    let status = wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    let elapsed = started.elapsed();
    let wire = status["wire_bytes"].as_u64().unwrap();
    assert!(wire >= 8 << 20, "only {wire} bytes on the wire");
    // One second of burst, then 2 MiB/s: at least (wire - 2 MiB) / 2 MiB/s.
    let floor = (wire - (2 << 20)) as f64 / (2 << 20) as f64;
    assert!(
        elapsed.as_secs_f64() >= floor * 0.9,
        "{wire} bytes in {elapsed:?}: faster than the 2 MiB/s limit allows ({floor:.1} s)"
    );
    assert!(shipper.stop().success());
    assert!(tracker.stop());
    receiver.stop();
}

/// How far replication may lag behind a flushed write while a test
/// failover runs (generous: the CI machine has 2 cores shared by the test's
/// NBD client, the tracker, the shipper and the receiver).
const LAG_BOUND: Duration = Duration::from_secs(10);

/// Writes 1 MiB + flush to the source `rounds` times; for each, the time
/// until the receiver has made it durable.
fn catch_up_times(dir: &Path, log_dir: &Path, uri: &str, rounds: u8) -> Vec<Duration> {
    (0..rounds)
        .map(|i| {
            let start = Instant::now();
            qemu_io(
                uri,
                &[&format!("write -P 0x{:x} {}M 1M", 0x30 + i, 8 + i), "flush"],
            );
            wait_caught_up(dir, log_dir, Duration::from_secs(60));
            start.elapsed()
        })
        .collect()
}

#[test]
fn a_test_failover_serves_a_point_read_write_while_replication_goes_on() {
    let test = "a_test_failover_serves_a_point_read_write_while_replication_goes_on";
    if !["qemu-io", "nbdcopy", "nbdinfo"]
        .iter()
        .all(|tool| require_tool(tool, test))
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let uri = tracker.uri();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    qemu_io(
        &uri,
        &["write -P 0x11 0 4M", "write -P 0x12 20M 1M", "flush"],
    );
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    // The source now is what the newest point holds (the flush is its
    // barrier).
    let reference = fs::read(&image).unwrap();
    let point = newest_point(dir);

    let (test, test_uri) = start_test_failover(dir, point);
    let copy = dir.join("test-copy.img");
    let out = Command::new("nbdcopy")
        .arg(&test_uri)
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read(&copy).unwrap() == reference,
        "the test failover does not serve the point"
    );
    // Block status tells the point's holes from its data: what the source
    // wrote is data, and the untouched rest reads as holes (the replica
    // image is sparse), so copying tools skip it.
    let map = nbdinfo_map(&test_uri);
    let kind_at = |at: u64| {
        map.iter()
            .find(|e| e.0 <= at && at < e.0 + e.1)
            .map(|e| e.2)
    };
    const MIB: u64 = 1 << 20;
    for at in [0, 3 * MIB, 20 * MIB, 21 * MIB - 1] {
        assert_eq!(kind_at(at), Some(0), "{at} is data: {map:?}");
    }
    for at in [4 * MIB, 10 * MIB, 21 * MIB, SIZE - 1] {
        assert_eq!(kind_at(at), Some(3), "{at} is a hole: {map:?}");
    }
    // The test writes (unaligned too), and reads its own writes back.
    qemu_io(
        &test_uri,
        &[
            "write -P 0x77 1M 2M",
            "write -P 0x78 3000 1000",
            "write -z 20M 64k",
            "flush",
            "read -P 0x77 1M 2M",
            "read -P 0x78 3000 1000",
            "read -P 0x11 0 3000",
            "read -P 0x11 4000 4096",
            "read -P 0 20M 64k",
            "read -P 0x12 20544k 960k",
        ],
    );
    // Replication goes on meanwhile, lag within bounds: while the test's
    // client keeps writing, each source write + flush is durable at the
    // receiver within LAG_BOUND.
    let testing = std::sync::atomic::AtomicBool::new(true);
    let lags = std::thread::scope(|s| {
        s.spawn(|| {
            while testing.load(std::sync::atomic::Ordering::Relaxed) {
                qemu_io(&test_uri, &["write -P 0x79 6M 1M", "flush"]);
            }
        });
        let lags = catch_up_times(dir, &log_dir, &uri, 8);
        testing.store(false, std::sync::atomic::Ordering::Relaxed);
        lags
    });
    let worst = lags.iter().max().unwrap();
    eprintln!("replication lag during the test failover: {lags:?}");
    assert!(
        *worst < LAG_BOUND,
        "replication lagged {worst:?} during the test failover: {lags:?}"
    );
    assert!(
        newest_point(dir) > point,
        "no new recovery point during the test"
    );

    // Ending the test leaves nothing behind.
    assert!(test.stop().success());
    let group_dir = dir.join("replicas").join(HOST).join("default");
    assert!(!group_dir.join("test-failover").exists(), "traces left");
    assert!(!dir.join("test-failover.sock").exists());

    // A test that is killed leaves its scratch; cleanup removes it.
    let (test, _) = start_test_failover(dir, point);
    test.kill();
    assert!(group_dir.join("test-failover").exists());
    let out = run_ok(
        tidemark()
            .args(["test-failover", "cleanup", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST]),
    );
    assert!(out.contains("removed"), "{out}");
    assert!(!group_dir.join("test-failover").exists());

    // The point is unchanged by the test's writes: fail over to it.
    assert!(tracker.stop());
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    let to = dir.join("at-point");
    run_ok(
        tidemark()
            .args(["failover", "--point", &point.to_string(), "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--to"])
            .arg(&to),
    );
    assert!(
        fs::read(to.join("disk.img")).unwrap() == reference,
        "the point changed"
    );
    failover_and_compare(dir, &image);
}

/// A planned failover: `tidemark drain` on the protected host stops the
/// tracker (final barrier) and returns once the receiver has every
/// record; failing over to the point it names loses nothing.
#[test]
fn a_planned_failover_drains_the_source_and_loses_nothing() {
    if !require_tool(
        "qemu-io",
        "a_planned_failover_drains_the_source_and_loses_nothing",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    image_with_data(&image);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let uri = tracker.uri();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    // Written without a flush: only the drain's final barrier covers it.
    qemu_io(&uri, &["write -P 0x5a 5M 3M", "write -P 0x5b 40M 64k"]);
    let out = run_ok(
        tidemark()
            .args(["drain", "--timeout", "2m", "--control-socket"])
            .arg(&tracker.control)
            .arg("--log-dir")
            .arg(&log_dir),
    );
    assert!(out.contains("drained"), "{out}");
    let point: u64 = out
        .split("--point ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .expect("drain names the point");
    // The tracker stopped by itself, cleanly.
    assert!(!tracker.control.exists());
    drop(tracker);
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    let to = dir.join("planned");
    run_ok(
        tidemark()
            .args(["failover", "--point", &point.to_string(), "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--to"])
            .arg(&to),
    );
    assert!(
        fs::read(to.join("disk.img")).unwrap() == fs::read(&image).unwrap(),
        "the planned failover lost data"
    );
}

/// A planned failover started on the replica site, with the receiver
/// running: the receiver passes the request to the host's shipper, which
/// stops the tracker and delivers everything; the images equal the source.
/// Without a connected shipper it times out and withdraws the request.
#[test]
fn a_planned_failover_from_the_replica_site_stops_the_source_and_loses_nothing() {
    let test = "a_planned_failover_from_the_replica_site_stops_the_source_and_loses_nothing";
    if !require_tool("qemu-io", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    image_with_data(&image);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let uri = tracker.uri();
    let shipper = tidemark_e2e::replication::start_shipper_with(
        dir,
        &log_dir,
        &hpki,
        port,
        &[
            "--tracker-control-socket".as_ref(),
            tracker.control.as_os_str(),
        ],
    );
    qemu_io(&uri, &["write -P 0x61 1M 1M", "flush"]);
    wait_caught_up(dir, &log_dir, Duration::from_secs(120));
    // Written without a flush: only the final barrier covers it.
    qemu_io(&uri, &["write -P 0x62 7M 3M", "write -P 0x63 50M 64k"]);
    let to = dir.join("planned");
    let started = Instant::now();
    let out = run_ok(
        tidemark()
            .args(["failover", "--planned", "--timeout", "2m", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--to"])
            .arg(&to),
    );
    eprintln!(
        "{test}: planned failover took {:?}:\n{out}",
        started.elapsed()
    );
    assert!(out.contains("nothing was lost"), "{out}");
    // The tracker was stopped through its control socket, cleanly.
    assert!(!tracker.control.exists(), "the tracker still runs");
    let last = tidemark_e2e::replication::last_seq(&log_dir);
    assert!(
        out.contains(&format!("sequence {last}")),
        "not failed over to the log's last record {last}: {out}"
    );
    assert!(
        fs::read(to.join("disk.img")).unwrap() == fs::read(&image).unwrap(),
        "the planned failover lost data"
    );
    let group_dir = dir.join("replicas").join(HOST).join("default");
    assert!(!group_dir.join("drain.request").exists());
    assert!(!group_dir.join("drain.result").exists());
    drop(tracker);

    // No shipper connected: no answer, and the request is withdrawn.
    assert!(shipper.stop().success());
    let out = tidemark()
        .args(["failover", "--planned", "--timeout", "2s", "--data-dir"])
        .arg(dir.join("replicas"))
        .args(["--host", HOST, "--to"])
        .arg(dir.join("never"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no answer from the protected host"), "{err}");
    assert!(!group_dir.join("drain.request").exists());
    assert!(!dir.join("never").exists());
    assert!(receiver.stop().success());
}

/// Bytes in the 4 KiB blocks where two images of the same size differ.
fn differing_4k_bytes(a: &Path, b: &Path) -> u64 {
    let (a, b) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(a.len(), b.len());
    let differ = a
        .chunks(4096)
        .zip(b.chunks(4096))
        .filter(|(x, y)| x != y)
        .count();
    differ as u64 * 4096
}

/// Failback: after a failover, the original primary's disk is adopted as
/// the replica of the host now running the failed-over disk; its shipper
/// compares every block and sends only the blocks that differ; a planned
/// failover back then gives the failed-over disk's content.
#[test]
fn failback_sends_only_the_blocks_that_differ() {
    let test = "failback_sends_only_the_blocks_that_differ";
    if !require_tool("qemu-io", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let original = dir.join("disk.img");
    image_with_data(&original);
    // Protect, then a planned failover to the replica site.
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &original, &[]);
    let log_dir = tracker.log_dir.clone();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    qemu_io(tracker.uri(), &["write -P 0x31 1M 1M", "flush"]);
    let control = tracker.control.clone();
    run_ok(
        tidemark()
            .args(["drain", "--control-socket"])
            .arg(&control)
            .arg("--log-dir")
            .arg(&log_dir),
    );
    drop(tracker);
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    let dr = dir.join("dr");
    fs::create_dir(&dr).unwrap();
    run_ok(
        tidemark()
            .args(["failover", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--to"])
            .arg(&dr),
    );
    let failed_over = dr.join("disk.img");
    assert!(fs::read(&failed_over).unwrap() == fs::read(&original).unwrap());

    // The replica site runs the workload: 2 MiB + 4 KiB in three of the
    // 1 MiB blocks the resync compares first.
    qemu_io(
        &failed_over,
        &["write -P 0x41 10M 2M", "write -P 0x42 30M 4k"],
    );
    let differing = differing_4k_bytes(&original, &failed_over);
    assert_eq!(differing, (2 << 20) + 4096);

    // Reprotect in reverse: the original site adopts its old disk; the
    // replica site tracks and ships the failed-over one.
    let primary = dir.join("primary-replicas");
    run_ok(
        tidemark()
            .args(["reprotect", "--data-dir"])
            .arg(&primary)
            .args(["--host", HOST, "--disk"])
            .arg(format!("disk={}", original.display())),
    );
    let port = free_port();
    let receiver = tidemark_e2e::replication::start_receiver_at(&primary, dir, &rpki, port);
    let tracker = TrackerProcess::start(&dr, &failed_over, &[]);
    let dr_log = tracker.log_dir.clone();
    let shipper = tidemark_e2e::replication::start_shipper_with(
        dir,
        &dr_log,
        &hpki,
        port,
        &[
            "--tracker-control-socket".as_ref(),
            tracker.control.as_os_str(),
        ],
    );
    let status = wait_caught_up(dir, &dr_log, Duration::from_secs(120));
    let compared = status["resync_blocks_compared"].as_u64().unwrap();
    let sent = status["resync_bytes_sent"].as_u64().unwrap();
    assert_eq!(compared, SIZE / (1 << 20), "every 1 MiB block compared");
    eprintln!(
        "{test}: {compared} blocks compared, {sent} bytes sent for {differing} bytes that differ ({:.4}x)",
        sent as f64 / differing as f64
    );
    assert!(
        sent >= differing && sent as f64 <= 1.01 * differing as f64,
        "sent {sent} bytes for {differing} bytes that differ"
    );

    // Failback, from the original site with its receiver running: the
    // replica site's host is drained (its tracker stopped through its
    // shipper) and its disk written back onto the original one, in place.
    assert!(fs::read(&original).unwrap() != fs::read(&failed_over).unwrap());
    let out = run_ok(
        tidemark()
            .args(["failback", "--timeout", "2m", "--data-dir"])
            .arg(&primary)
            .args(["--host", HOST, "--to"])
            .arg(&original),
    );
    assert!(out.contains("nothing was lost"), "{out}");
    assert!(out.contains(&original.display().to_string()), "{out}");
    assert!(
        !tracker.control.exists(),
        "the replica site's tracker still runs"
    );
    let point = tidemark_e2e::replication::last_seq(&dr_log).to_string();
    drop(tracker);
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    assert!(
        fs::read(&original).unwrap() == fs::read(&failed_over).unwrap(),
        "the failed-back disk differs from the one the replica site ran"
    );
    // A target of the wrong size is refused before anything is written.
    let small = dir.join("small.img");
    fs::File::create(&small).unwrap().set_len(SIZE / 2).unwrap();
    let out = tidemark()
        .args(["failover", "--point", &point, "--data-dir"])
        .arg(&primary)
        .args(["--host", HOST, "--to"])
        .arg(&small)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("must be the same size"), "{err}");

    // Protection resumes in the original direction: the original tracker
    // restarts on the failed-back disk with --resync-all (it was written
    // behind its back), and the replica site's old replica receives only
    // the blocks that differ from it.
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &original, &["--resync-all"]);
    let shipper = start_shipper(dir, &tracker.log_dir, &hpki, port);
    let status = wait_caught_up(dir, &tracker.log_dir, Duration::from_secs(120));
    let sent = status["resync_bytes_sent"].as_u64().unwrap();
    eprintln!("{test}: resuming protection sent {sent} bytes for {differing} bytes that differ");
    assert!(
        sent >= differing && sent as f64 <= 1.01 * differing as f64,
        "sent {sent} bytes for {differing} bytes that differ"
    );
    drop(tracker);
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    failover_and_compare(dir, &original);
}
