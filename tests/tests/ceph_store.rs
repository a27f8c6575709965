//! The replica store on Ceph end to end (feature `ceph`): a receiver
//! whose `[receiver.store]` has `kind = "ceph"` replicates a real ext4
//! workload (the kernel's ext4 through the tracker, nbdfuse + loop, see
//! TESTBED.md) into the testbed cluster; then **every** recovery point it
//! keeps equals a reference replay of the log to that point, byte for
//! byte, and from the mkfs-done marker on passes `e2fsck -fn` once its
//! journal is replayed. The commands work from the receiver's
//! configuration: `tidemark points --config`, `test-failover start
//! --config` (the newest point served over NBD straight from the cluster,
//! read whole with nbdcopy) and `failover --to-rbd` (the marker's point as
//! an RBD clone, read back through librbd).
//!
//! One cluster for this binary (`tidemark_ceph::testbed::for_test`: the
//! testbed script, or the cluster `CEPH_CONF` names), one RADOS namespace
//! per test. Without Ceph installed the test skips with a message; under
//! `CI` it fails instead.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tidemark_ceph::{testbed, Cluster};
use tidemark_e2e::replication::{
    enroll, free_port, start_receiver_with, start_shipper, start_test_failover_on, wait_caught_up,
    Daemon, HOST,
};
use tidemark_e2e::{require_tool, run, tidemark, TrackerProcess};
use tidemark_names::Name;

mod ext4_points;

/// The protected disk: small, so that the cluster's memory (memstore)
/// and the test's time stay small.
const SIZE: u64 = 64 << 20;

/// The `[receiver.store]` table of the testbed's cluster in `namespace`.
fn store_table(tb: &testbed::Testbed, namespace: &str) -> String {
    format!(
        "[receiver.store]\nkind = \"ceph\"\nconf = \"{}\"\nuser = \"client.admin\"\npool = \"{}\"\nnamespace = \"{namespace}\"\nop-timeout = \"30s\"\n",
        tb.conf.display(),
        tb.pool
    )
}

/// mkfs, a marker, then files written, rewritten and removed in rounds,
/// each round synced (barriers between them).
fn ext4_workload(dir: &Path, tracker: &TrackerProcess) {
    let mut m = ext4_points::attach(dir, &tracker.uri(), "1");
    let dev = m.loop_dev.clone().unwrap();
    run(Command::new("mkfs.ext4").args([
        "-q",
        "-F",
        "-E",
        "lazy_itable_init=0,lazy_journal_init=0",
        &dev,
    ]));
    run(tidemark()
        .args(["tracker", "mark", "mkfs-done", "--control-socket"])
        .arg(&tracker.control));
    let root = m.fs_dir.clone();
    run(Command::new("mount").arg(&dev).arg(&root));
    m.mounted = true;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..3 {
        let sub = root.join(format!("round{round}"));
        fs::create_dir_all(&sub).unwrap();
        for i in 0..40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % (192 << 10)) as usize;
            let data: Vec<u8> = (0..len).map(|j| (j as u64 ^ x) as u8).collect();
            fs::write(sub.join(format!("f{i}")), data).unwrap();
        }
        if round > 0 {
            let old = root.join(format!("round{}", round - 1));
            for i in (0..40).step_by(3) {
                fs::remove_file(old.join(format!("f{i}"))).unwrap();
            }
        }
        run(Command::new("sync").arg("-f").arg(&root));
    }
    run(Command::new("umount").arg(&root));
    m.mounted = false;
}

/// Starts `tidemark test-failover start --config` at `point`; returns it
/// once it serves.
fn start_test_failover(dir: &Path, config: &Path, point: u64, socket: &Path) -> Daemon {
    let store = ["--config".as_ref(), config.as_os_str()];
    start_test_failover_on(dir, store, point, socket, &[], Duration::from_secs(60)).0
}

#[test]
fn every_point_of_an_ext4_workload_on_the_ceph_store_is_exact_and_consistent() {
    let test = "every_point_of_an_ext4_workload_on_the_ceph_store_is_exact_and_consistent";
    for tool in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "nbdcopy",
    ] {
        if !require_tool(tool, test) {
            return;
        }
    }
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let namespace = format!("e2e-ext4-{}", std::process::id());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let port = free_port();
    let replicas = dir.join("replicas");
    let receiver = start_receiver_with(&replicas, dir, &rpki, port, &store_table(tb, &namespace));
    let config = dir.join(format!("receiver-{port}.toml"));
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    // The workload runs while the shipper is stopped, so the log keeps
    // every record of it: the reference the points are checked against.
    assert!(shipper.stop().success());
    ext4_workload(dir, &tracker);
    let reference = dir.join("reference-log");
    run(Command::new("cp").arg("-a").arg(&log_dir).arg(&reference));
    let started = Instant::now();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    wait_caught_up(dir, &log_dir, Duration::from_secs(180));
    let applied = started.elapsed();
    assert!(tracker.stop(), "the tracker stops cleanly");
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    eprintln!("{test}: the workload's log applied into the Ceph store in {applied:?}");
    assert!(
        !replicas.join(HOST).join("default").join("state").exists(),
        "no local store was written"
    );

    // `tidemark points --config` reads the cluster while the receiver runs.
    let listed = run(tidemark()
        .args(["points", "--json", "--config"])
        .arg(&config)
        .args(["--host", HOST]));
    let listed: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // A test failover of the newest point, served from the cluster while
    // the receiver runs, reads whole as the source's final state.
    let newest = listed.last().unwrap()["seq"].as_u64().unwrap();
    let socket = dir.join("tf.sock");
    let tf = start_test_failover(dir, &config, newest, &socket);
    let read_back = dir.join("test-failover.img");
    let started = Instant::now();
    run(Command::new("nbdcopy")
        .arg(format!("nbd+unix:///disk?socket={}", socket.display()))
        .arg(&read_back));
    eprintln!(
        "{test}: test failover read whole with nbdcopy in {:?}",
        started.elapsed()
    );
    let source = fs::read(&image).unwrap();
    assert!(
        fs::read(&read_back).unwrap() == source,
        "the test failover of the newest point differs from the source"
    );
    assert!(tf.stop().success());
    assert!(receiver.stop().success());

    let cfg = tidemark_config::load(&config).unwrap();
    let engine = tidemark_receiver::store::connect(cfg.require_receiver().unwrap(), "e2e").unwrap();
    let (host, group_name) = (Name::new(HOST).unwrap(), Name::from_static("default"));
    let group = engine.open_group_read_only(&host, &group_name).unwrap();
    assert_eq!(group.pinned(), None, "the test failover's pin is gone");
    let points = group.points();
    assert_eq!(listed.len(), points.len(), "`points` lists every point");
    assert!(points.len() >= 6, "only {} points", points.len());
    let marker = points
        .iter()
        .find(|p| p.label == "mkfs-done")
        .expect("the marker is a point")
        .clone();

    // Replay the reference log onto a blank image; at every point,
    // compare and check.
    let marker_image = dir.join("marker.img");
    let ext4_points::Checked { compared, fscked } = ext4_points::check_every_point(
        &group,
        &points,
        &reference,
        SIZE,
        marker.seq,
        dir,
        &marker_image,
    );
    assert!(fscked >= 3, "only {fscked} points after mkfs");
    eprintln!("{test}: {compared} points equal the reference replay, {fscked} pass e2fsck");
    drop(group);

    // The marker's point as an RBD clone: one snapshot and clone, the
    // point written into it; it reads as the point.
    let out = run(tidemark()
        .args(["failover", "--point", "mkfs-done", "--config"])
        .arg(&config)
        .args(["--host", HOST, "--to-rbd", "fo"]));
    assert!(
        out.contains(&format!("sequence {}", marker.seq)) && out.contains("fo-disk"),
        "{out}"
    );
    let cluster = tb.connect(&namespace, Duration::from_secs(30)).unwrap();
    let mut clone = vec![0u8; SIZE as usize];
    cluster
        .image_open_read_only("fo-disk")
        .unwrap()
        .read(0, &mut clone)
        .unwrap();
    assert!(
        clone == fs::read(&marker_image).unwrap(),
        "failover --to-rbd at mkfs-done differs from the reference replay to the marker"
    );
}
