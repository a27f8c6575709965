//! A protected disk grows, end to end with the real binaries on loopback:
//! an ext4 written through the tracker, the tracker (and the shipper, or
//! not) stopped, the backing file made larger, started again (the operator
//! guide's procedure), the file system grown with `resize2fs` and written
//! through the tracker at the new size. The replica grows with it, and both
//! the point before the growth (at the old size) and the newest one (at the
//! new size) fail over byte for byte and pass `e2fsck -fn`.
//!
//! With the shipper stopped too, the shipper's hello announces the new
//! size; with the shipper running on, its session (begun at the old size)
//! carries the growth as the log's grow record, the tracker's first record
//! after the start, and the writes beyond the old end after it.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tidemark_e2e::replication::{
    enroll, failover_and_compare_with, free_port, newest_point, run_ok, start_receiver,
    start_shipper, wait_caught_up,
};
use tidemark_e2e::{qemu_io, require_tool, tidemark_bin, TrackerProcess};

const OLD: u64 = 16 << 20;
const NEW: u64 = 40 << 20;

/// Copies the file `from` through the tracker onto its disk (every byte:
/// zeroes as zero requests).
fn copy_in(from: &Path, tracker: &TrackerProcess) {
    run_ok(
        Command::new("nbdcopy")
            .arg("--")
            .arg(from)
            .arg(tracker.uri()),
    );
}

/// A recovery point of everything written so far: once replication has
/// caught up (the group is consistent), a FLUSH is a barrier and so a
/// point; returns its sequence number.
fn point_now(dir: &Path, tracker: &TrackerProcess) -> u64 {
    wait_caught_up(dir, &tracker.log_dir, Duration::from_secs(120));
    qemu_io(tracker.uri(), &["flush"]);
    let status = wait_caught_up(dir, &tracker.log_dir, Duration::from_secs(120));
    assert_eq!(status["state"], "protected", "{status:#}");
    newest_point(dir)
}

/// `e2fsck -fn` finds nothing to fix in the file system of `image`.
fn fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(image)
        .output()
        .expect("running e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes the file `source` into the file system of `image` as `name`.
fn put_file(image: &Path, source: &Path, name: &str) {
    run_ok(
        Command::new("debugfs")
            .args(["-w", "-R"])
            .arg(format!("write {} {name}", source.display()))
            .arg(image),
    );
}

#[test]
fn a_grown_disk_replicates_and_keeps_its_older_points_at_the_old_size() {
    grow_between_starts(
        "a_grown_disk_replicates_and_keeps_its_older_points_at_the_old_size",
        true,
    );
}

#[test]
fn a_growth_reaches_a_running_shipper_as_a_record_of_the_log() {
    grow_between_starts(
        "a_growth_reaches_a_running_shipper_as_a_record_of_the_log",
        false,
    );
}

/// The scenario; `restart_shipper`: the shipper is stopped and started
/// with the tracker, else it runs on.
fn grow_between_starts(test: &str, restart_shipper: bool) {
    for tool in [
        "nbdcopy",
        "qemu-io",
        "mkfs.ext4",
        "resize2fs",
        "e2fsck",
        "debugfs",
    ] {
        if !require_tool(tool, test) {
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, tidemark_e2e::replication::HOST);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let disk = dir.join("disk.raw");
    fs::File::create(&disk).unwrap().set_len(OLD).unwrap();
    let tracker = TrackerProcess::start(dir, &disk, &[]);
    let log_dir = tracker.log_dir.clone();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);

    // An ext4 at the old size, with a file in it, written through the
    // tracker.
    let fs_image = dir.join("fs.raw");
    fs::File::create(&fs_image).unwrap().set_len(OLD).unwrap();
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&fs_image),
    );
    let payload = dir.join("payload");
    fs::write(
        &payload,
        (0..200_000u32).map(|i| (i * 7) as u8).collect::<Vec<_>>(),
    )
    .unwrap();
    put_file(&fs_image, &payload, "before");
    copy_in(&fs_image, &tracker);
    let before = point_now(dir, &tracker);
    let at_old_size = fs::read(&fs_image).unwrap();

    // The disk grows: stop, make the backing larger, start again.
    let shipper = if restart_shipper {
        assert!(shipper.stop().success());
        None
    } else {
        Some(shipper)
    };
    assert!(tracker.stop(), "the tracker did not stop cleanly");
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(NEW)
        .unwrap();
    let tracker = TrackerProcess::start(dir, &disk, &[]);
    let shipper = shipper.unwrap_or_else(|| start_shipper(dir, &log_dir, &hpki, port));

    // The file system grows to the new size and gets a file beyond the
    // old end; written through the tracker again.
    fs::OpenOptions::new()
        .write(true)
        .open(&fs_image)
        .unwrap()
        .set_len(NEW)
        .unwrap();
    run_ok(Command::new("resize2fs").arg(&fs_image));
    let big = dir.join("big");
    fs::write(&big, vec![0x5a; (NEW - OLD) as usize / 2]).unwrap();
    put_file(&fs_image, &big, "after");
    fsck_clean(&fs_image);
    copy_in(&fs_image, &tracker);
    let after = point_now(dir, &tracker);
    assert!(
        after > before,
        "a point after the growth ({after} > {before})"
    );

    assert!(tracker.stop(), "the tracker did not stop cleanly");
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    assert_eq!(fs::read(&disk).unwrap(), fs::read(&fs_image).unwrap());

    // The point before the growth: the old size, the old file system.
    let old_to = dir.join("failover-before");
    failover_and_compare_with(&tidemark_bin(), dir, &old_to, Some(before), &at_old_size);
    fsck_clean(&old_to.join("disk.img"));
    // The newest point: the grown disk and file system.
    let new_to = dir.join("failover-after");
    failover_and_compare_with(
        &tidemark_bin(),
        dir,
        &new_to,
        None,
        &fs::read(&disk).unwrap(),
    );
    fsck_clean(&new_to.join("disk.img"));
    let dump = run_ok(
        Command::new("dumpe2fs")
            .arg("-h")
            .arg(new_to.join("disk.img")),
    );
    assert!(
        dump.lines()
            .any(|l| l.starts_with("Block count:") && l.ends_with(&(NEW / 4096).to_string())),
        "the failed-over file system is not at the new size: {dump}"
    );
}
