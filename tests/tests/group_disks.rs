//! The disks of a consistency group change while it is protected, end to
//! end with the real binaries on loopback: a disk keeps its id when others
//! are added, moved or removed in `tracker.toml`; a removed disk's id is
//! never given again, its replica stays in the points from before its
//! removal and is in none after; a new disk
//! takes the next id and is synced while the others replicate, and the
//! group's older points stay (without it); a grown disk is re-added under
//! a new name (growing one in place is `grow_disk.rs`).

use std::fs;
use std::path::Path;
use std::time::Duration;
use tidemark_changelog::{FsDir, Kind, LogReader, Seq};
use tidemark_e2e::replication::{
    enroll, free_port, newest_point, run_ok, start_receiver, start_shipper, wait_caught_up, HOST,
};
use tidemark_e2e::{qemu_io, require_tool, tidemark_bin, TrackerProcess};

const SIZE: u64 = 8 << 20;

/// Writes `dir/tracker.toml` serving `disks` (name, image file under
/// `dir`, made if missing) in this order, with the sockets and log
/// [`TrackerProcess`] expects, and starts it.
fn start_tracker(dir: &Path, disks: &[(&str, &str)]) -> TrackerProcess {
    let d = dir.display();
    let mut config = format!(
        "[tracker]\nlog-dir = \"{d}/log\"\nsocket = \"{d}/nbd.sock\"\n\
         control-socket = \"{d}/tracker.ctl\"\n"
    );
    for (name, file) in disks {
        let image = dir.join(file);
        if !image.exists() {
            fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
        }
        config.push_str(&format!(
            "\n[[tracker.disk]]\nname = \"{name}\"\npath = \"{}\"\n",
            image.display()
        ));
    }
    let path = dir.join("tracker.toml");
    fs::write(&path, config).unwrap();
    let mut command = std::process::Command::new(tidemark_bin());
    command.args(["tracker", "serve", "--config"]).arg(&path);
    TrackerProcess::spawn(dir, command)
}

fn uri(tracker: &TrackerProcess, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", tracker.socket.display())
}

/// The disk ids of the log's write records, in log order, from `from` on.
fn write_disks(log_dir: &Path, from: Seq) -> Vec<u32> {
    let mut reader = LogReader::new(FsDir::existing(log_dir).unwrap(), from);
    std::iter::from_fn(|| reader.next_record().unwrap())
        .filter(|r| r.header.kind == Kind::Write)
        .map(|r| r.header.disk.get())
        .collect()
}

/// Fails over the latest point into `dir/failover` and checks that each
/// named disk's image equals the file under `dir`, and that no other disk
/// is in it.
fn failover_and_compare(dir: &Path, disks: &[(&str, &str)]) {
    let to = dir.join("failover");
    let _ = fs::remove_dir_all(&to);
    let out = run_ok(
        std::process::Command::new(tidemark_bin())
            .args(["failover", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--to"])
            .arg(&to),
    );
    assert!(out.contains("failing over"), "{out}");
    for (name, file) in disks {
        let source = fs::read(dir.join(file)).unwrap();
        let replica = fs::read(to.join(format!("{name}.img"))).unwrap();
        assert!(
            source == replica,
            "the failed-over {name} differs from its source"
        );
    }
    let mut images: Vec<String> = fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".img"))
        .collect();
    images.sort();
    let mut want: Vec<String> = disks.iter().map(|(n, _)| format!("{n}.img")).collect();
    want.sort();
    assert_eq!(images, want, "the disks of the newest point");
}

#[test]
fn disks_keep_their_ids_when_others_are_added_moved_or_removed() {
    if !require_tool(
        "qemu-io",
        "disks_keep_their_ids_when_others_are_added_moved_or_removed",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = start_tracker(dir, &[("a", "a.raw"), ("b", "b.raw"), ("c", "c.raw")]);
    let log_dir = tracker.log_dir.clone();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    for (name, pattern) in [("a", "0x11"), ("b", "0x22"), ("c", "0x33")] {
        qemu_io(
            uri(&tracker, name),
            &[&format!("write -P {pattern} 0 1M"), "flush"],
        );
    }
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    // A point of the group as it was (once caught up a FLUSH is one).
    qemu_io(uri(&tracker, "a"), &["flush"]);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    let old_point = newest_point(dir);
    for disk in ["a", "b", "c"] {
        fs::copy(
            dir.join(format!("{disk}.raw")),
            dir.join(format!("{disk}-old.raw")),
        )
        .unwrap();
    }
    let before = write_disks(&log_dir, Seq::ZERO).len();

    // b grew: it leaves the group and its file comes back, twice the
    // size, as disk d, before the others; c moves up. The operator
    // guide's procedure (the shipper reads the group's disks when it
    // starts).
    assert!(shipper.stop().success());
    assert!(tracker.stop(), "the tracker did not stop cleanly");
    fs::copy(dir.join("b.raw"), dir.join("b-removed.raw")).unwrap();
    let b = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("b.raw"))
        .unwrap();
    b.set_len(2 * SIZE).unwrap();
    drop(b);
    let tracker = start_tracker(dir, &[("d", "b.raw"), ("c", "c.raw"), ("a", "a.raw")]);
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    for (name, pattern) in [("c", "0x44"), ("d", "0x55"), ("a", "0x66")] {
        qemu_io(
            uri(&tracker, name),
            &[&format!("write -P {pattern} 1M 1M"), "flush"],
        );
    }
    // d's new half.
    qemu_io(uri(&tracker, "d"), &["write -P 0x77 9M 1M", "flush"]);
    let after: Vec<u32> = write_disks(&log_dir, Seq::ZERO)[before..].to_vec();
    assert_eq!(
        after,
        [2, 3, 0, 3],
        "c keeps id 2, d takes 3 (not b's 1), a keeps 0"
    );
    let state = fs::read_to_string(log_dir.join("tracker.state")).unwrap();
    assert!(state.starts_with("tidemark-tracker-state 3\n"), "{state}");
    assert!(
        state.contains("\ndisk 0 a\ndisk 2 c\ndisk 3 d\nnext-disk-id 4\n"),
        "{state}"
    );
    let disks = fs::read_to_string(log_dir.join("disks")).unwrap();
    assert!(disks.starts_with("tidemark-disks 2\n0 "), "{disks}");
    let status = wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert_eq!(status["state"], "protected", "{status:#}");

    // The newest point holds the group's disks now: d at its new size, not
    // b, which left.
    assert!(tracker.stop(), "the tracker did not stop cleanly");
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    failover_and_compare(dir, &[("a", "a.raw"), ("c", "c.raw"), ("d", "b.raw")]);
    // The point from before the changes is still there, with the disks
    // it had: b as it was when it left, and not the new disk d.
    assert!(
        fs::read(dir.join("b-removed.raw")).unwrap() == fs::read(dir.join("b-old.raw")).unwrap()
    );
    let to = dir.join("failover-old");
    let out = run_ok(
        std::process::Command::new(tidemark_bin())
            .args(["failover", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--point", &old_point.to_string(), "--to"])
            .arg(&to),
    );
    assert!(out.contains("failing over"), "{out}");
    for disk in ["a", "b", "c"] {
        let source = fs::read(dir.join(format!("{disk}-old.raw"))).unwrap();
        let replica = fs::read(to.join(format!("{disk}.img"))).unwrap();
        assert!(source == replica, "{disk} at the old point differs");
    }
    assert!(!to.join("d.img").exists(), "d is in a point from before it");
}
