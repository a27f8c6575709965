//! A real ext4, made and used by the real kernel through our NBD server
//! (nbdfuse + loop, see TESTBED.md), with one and with four connections.
//!
//! Proven afterwards: the backing image equals what nbdcopy reads back, it
//! passes `e2fsck -fn`, and — the crash-consistency proof — replaying the
//! log from a blank image up to each barrier after mkfs finished gives a
//! filesystem that passes `e2fsck -fn` once its journal is replayed, as the
//! kernel would on mount after a crash at that point. (Barriers inside
//! mkfs itself come before there is a filesystem to check.)

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tidemark_changelog::replay::{apply, ImageFile, ReplaySummary};
use tidemark_changelog::{DiskId, FsDir, Kind, LogReader, Seq};
use tidemark_e2e::{require_tool, run, tidemark, TrackerProcess};

mod ext4_points;

const SIZE: u64 = 256 << 20;

/// Creates, changes and removes files with syncs in between, like an
/// application would.
fn churn(root: &Path) {
    let mut rng = StdRng::seed_from_u64(0x1234_5678);
    for round in 0..4 {
        let dir = root.join(format!("round{round}"));
        fs::create_dir_all(&dir).unwrap();
        for i in 0..60 {
            let x: u64 = rng.random();
            let len = (x % (256 << 10)) as usize;
            let data: Vec<u8> = (0..len).map(|j| (j as u64 ^ x) as u8).collect();
            fs::write(dir.join(format!("f{i}")), data).unwrap();
        }
        if round > 0 {
            let old = root.join(format!("round{}", round - 1));
            for i in (0..60).step_by(3) {
                fs::remove_file(old.join(format!("f{i}"))).unwrap();
            }
            fs::rename(old.join("f1"), dir.join("moved")).unwrap();
        }
        run(Command::new("sync").arg("-f").arg(root));
    }
}

fn ext4_through_the_tracker(connections: &str, test: &str) {
    for tool in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "nbdcopy",
        "mount",
    ] {
        if !require_tool(tool, test) {
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let tracker = TrackerProcess::start(tmp.path(), &image, &[]);
    let uri = tracker.uri();
    {
        let mut m = ext4_points::attach(tmp.path(), &uri, connections);
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
        run(Command::new("mount").arg(&dev).arg(&m.fs_dir));
        m.mounted = true;
        churn(&m.fs_dir);
        run(Command::new("umount").arg(&m.fs_dir));
        m.mounted = false;
    }
    let back = tmp.path().join("back.img");
    run(Command::new("nbdcopy").arg(&uri).arg(&back));
    let log_dir = tracker.log_dir.clone();
    assert!(tracker.stop());
    assert!(
        fs::read(&image).unwrap() == fs::read(&back).unwrap(),
        "backing image differs from what nbdcopy read"
    );
    run(Command::new("e2fsck").arg("-fn").arg(&image));
    run(tidemark().args(["log", "check"]).arg(&log_dir));

    // Replay record by record; at every barrier after mkfs, check a copy.
    let work = tmp.path().join("replay.img");
    let check = tmp.path().join("check.img");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&work)
        .unwrap();
    file.set_len(SIZE).unwrap();
    let mut target = ImageFile::new(file);
    let mut summary = ReplaySummary::default();
    let mut reader = LogReader::new(FsDir::existing(&log_dir).unwrap(), Seq::ZERO);
    let (mut after_mkfs, mut checked) = (false, 0);
    while let Some(record) = reader.next_record().unwrap() {
        apply(&record, DiskId(0), &mut target, &mut summary).unwrap();
        if record.label() == Some("mkfs-done") {
            after_mkfs = true;
        }
        if record.header.kind != Kind::Barrier || !after_mkfs {
            continue;
        }
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&work)
            .arg(&check));
        // Replay the journal as mount would after a crash here, then
        // check the filesystem.
        ext4_points::check_ext4(
            &check,
            &format!("the image at barrier seq {}", record.header.seq.get()),
        );
        checked += 1;
    }
    assert!(after_mkfs, "the mkfs-done marker is in the log");
    assert!(checked >= 5, "only {checked} barriers after mkfs");
    eprintln!(
        "{test}: {checked} barriers checked with e2fsck, {} records applied",
        summary.applied
    );
    assert!(
        fs::read(&work).unwrap() == fs::read(&image).unwrap(),
        "full replay differs from the backing image"
    );
}

#[test]
fn ext4_through_one_connection() {
    ext4_through_the_tracker("1", "ext4_through_one_connection");
}

#[test]
fn ext4_through_four_connections() {
    ext4_through_the_tracker("4", "ext4_through_four_connections");
}

/// Recovery points end to end: a real ext4 workload goes through the
/// tracker, the shipper and the receiver; then **every** recovery point the
/// receiver keeps must equal a reference replay of the log to that point,
/// byte for byte, and — from the mkfs-done marker on — be a filesystem that
/// passes `e2fsck -fn` once its journal is replayed (what mounting it after
/// a failover does). `tidemark points` lists them all and `tidemark
/// failover --point LABEL` materialises the marker's point.
#[test]
fn every_recovery_point_of_an_ext4_workload_is_a_consistent_filesystem() {
    use tidemark_e2e::replication::{
        enroll, free_port, start_receiver, start_shipper, wait_caught_up, HOST,
    };
    use tidemark_receiver::store::ReplicaGroup;
    let test = "every_recovery_point_of_an_ext4_workload_is_a_consistent_filesystem";
    for tool in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
        "qemu-io",
    ] {
        if !require_tool(tool, test) {
            return;
        }
    }
    const POINTS_SIZE: u64 = 96 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let image = dir.join("disk.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(POINTS_SIZE)
        .unwrap();
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    // The workload runs while the shipper is stopped, so the log keeps
    // every record of it: the reference the points are checked against.
    assert!(shipper.stop().success());
    {
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
        run(Command::new("mount").arg(&dev).arg(&m.fs_dir));
        m.mounted = true;
        churn(&m.fs_dir);
        run(Command::new("umount").arg(&m.fs_dir));
        m.mounted = false;
    }
    let reference = dir.join("reference-log");
    run(Command::new("cp").arg("-a").arg(&log_dir).arg(&reference));
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    wait_caught_up(dir, &log_dir, Duration::from_secs(180));
    assert!(tracker.stop(), "the tracker stops cleanly");
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());

    // `tidemark points` reads them while the receiver still runs.
    let replicas = dir.join("replicas");
    let listed = run(tidemark()
        .args(["points", "--json", "--data-dir"])
        .arg(&replicas)
        .args(["--host", HOST]));
    let listed: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let table = run(tidemark()
        .args(["points", "--data-dir"])
        .arg(&replicas)
        .args(["--host", HOST]));
    assert!(table.contains("mkfs-done"), "{table}");
    assert!(receiver.stop().success());

    let group_dir = tidemark_receiver::daemon::group_dir(
        &replicas,
        &tidemark_names::Name::from_static(HOST),
        &tidemark_names::Name::from_static("default"),
    );
    let group = ReplicaGroup::open_read_only(&group_dir).unwrap();
    let points = group.points();
    assert_eq!(
        listed.len(),
        points.len(),
        "`tidemark points` lists every point"
    );
    assert!(points.len() >= 10, "only {} points", points.len());
    let marker = points
        .iter()
        .find(|p| p.label == "mkfs-done")
        .expect("the marker is a point");

    // Replay the reference log record by record onto a blank image (the
    // disk was blank and nothing wrote to it before the workload); at
    // every point, compare and check.
    let ext4_points::Checked { compared, fscked } = ext4_points::check_every_point(
        &group,
        &points,
        &reference,
        POINTS_SIZE,
        marker.seq,
        dir,
        &dir.join("marker.img"),
    );
    assert!(fscked >= 5, "only {fscked} points after mkfs");
    eprintln!("{test}: {compared} points equal the reference replay, {fscked} pass e2fsck");

    // The newest point is the source's final state; the marker's point
    // fails over by its label.
    let newest = group.view(None).unwrap();
    let source = fs::read(&image).unwrap();
    let mut replica = vec![0u8; POINTS_SIZE as usize];
    newest
        .read(tidemark_changelog::DiskId(0), 0, &mut replica)
        .unwrap();
    assert!(
        replica == source,
        "the newest state differs from the source"
    );
    drop(group);
    let to = dir.join("failover");
    let out = run(tidemark()
        .args(["failover", "--point", "mkfs-done", "--data-dir"])
        .arg(&replicas)
        .args(["--host", HOST, "--to"])
        .arg(&to));
    assert!(out.contains(&format!("sequence {}", marker.seq)), "{out}");
    assert!(
        fs::read(to.join("disk.img")).unwrap() == fs::read(dir.join("marker.img")).unwrap(),
        "failover --point mkfs-done differs from the reference replay to the marker"
    );
}

/// `tidemark mark --app-consistent` around a mounted ext4 on the tracker:
/// the hooks run in order, the filesystem is frozen for the marker (so the
/// log up to it holds a *clean* filesystem: `e2fsck -fn` passes without a
/// journal replay, and a file written just before is in it), and thawed
/// after. A hook that hangs is killed at the timeout, no marker is taken,
/// and the filesystem is usable again.
#[test]
fn an_app_consistent_mark_freezes_the_filesystem_around_the_marker() {
    let test = "an_app_consistent_mark_freezes_the_filesystem_around_the_marker";
    for tool in [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "debugfs",
        "mount",
    ] {
        if !require_tool(tool, test) {
            return;
        }
    }
    const APP_SIZE: u64 = 64 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(APP_SIZE).unwrap();
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let hooks = dir.join("hooks.log");
    let seq;
    {
        let mut m = ext4_points::attach(dir, &tracker.uri(), "1");
        let dev = m.loop_dev.clone().unwrap();
        run(Command::new("mkfs.ext4").args(["-q", "-F", &dev]));
        run(Command::new("mount").arg(&dev).arg(&m.fs_dir));
        m.mounted = true;
        // Written, not synced: only the freeze makes it durable.
        fs::write(m.fs_dir.join("before.txt"), b"written before the mark\n").unwrap();
        let out = run(tidemark()
            .args(["mark", "nightly", "--app-consistent", "--freeze"])
            .arg(&m.fs_dir)
            .args([
                "--pre-hook",
                &format!("echo pre >> {}", hooks.display()),
                "--post-hook",
                &format!("echo post >> {}", hooks.display()),
                "--control-socket",
            ])
            .arg(&tracker.control));
        assert!(out.contains("application-consistent marker"), "{out}");
        seq = out
            .split("sequence number ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse::<u64>().ok())
            .expect("the marker's sequence number");
        assert_eq!(fs::read_to_string(&hooks).unwrap(), "pre\npost\n");
        // Thawed: writing and syncing works at once.
        fs::write(m.fs_dir.join("after.txt"), b"after\n").unwrap();
        run(Command::new("sync").arg("-f").arg(&m.fs_dir));

        // A hanging pre-hook: killed at the timeout, no marker, thawed.
        let started = Instant::now();
        let out = tidemark()
            .args([
                "mark",
                "stuck",
                "--app-consistent",
                "--timeout",
                "1s",
                "--freeze",
            ])
            .arg(&m.fs_dir)
            .args(["--pre-hook", "sleep 60", "--control-socket"])
            .arg(&tracker.control)
            .output()
            .unwrap();
        assert!(!out.status.success(), "a timed-out mark must fail");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no application-consistent point"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(m.fs_dir.join("later.txt"), b"later\n").unwrap();
        run(Command::new("sync").arg("-f").arg(&m.fs_dir));
        run(Command::new("umount").arg(&m.fs_dir));
        m.mounted = false;
    }
    let log_dir = tracker.log_dir.clone();
    assert!(tracker.stop());

    // The marker is in the log, app-consistent; no marker "stuck".
    let dump = run(tidemark().args(["log", "dump", "--json"]).arg(&log_dir));
    let markers: Vec<serde_json::Value> = dump
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["kind"] == "marker")
        .collect();
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert_eq!(markers[0]["label"], "nightly");
    assert_eq!(markers[0]["app_consistent"], true);

    // The log up to the marker: a clean filesystem holding the file.
    let at_mark = dir.join("at-mark.img");
    fs::File::create(&at_mark)
        .unwrap()
        .set_len(APP_SIZE)
        .unwrap();
    run(tidemark()
        .args(["log", "replay"])
        .arg(&log_dir)
        .arg("--onto")
        .arg(&at_mark)
        .args(["--until", &seq.to_string()]));
    run(Command::new("e2fsck").arg("-fn").arg(&at_mark));
    let cat = run(Command::new("debugfs")
        .args(["-R", "cat /before.txt"])
        .arg(&at_mark));
    assert!(cat.contains("written before the mark"), "{cat}");
}
