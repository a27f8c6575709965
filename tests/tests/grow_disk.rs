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
//!
//! Online: the backing grows and `tidemark tracker resize` is run while a
//! writer rewrites the file system through the tracker and the shipper
//! replicates; connections made before keep the old size, new ones get the
//! new one, and the file system is then grown and written beyond the old
//! end without a restart.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidemark_e2e::replication::{
    enroll, failover_and_compare_with, free_port, newest_point, run_ok, start_receiver,
    start_shipper, wait_caught_up, Daemon,
};
use tidemark_e2e::{qemu_io, refused, require_tool, tidemark, tidemark_bin, TrackerProcess};

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

/// A replicating host whose disk holds an ext4 at the old size with one
/// file, written through its tracker: where both growth procedures start.
struct AtOldSize {
    /// The test's directory, kept while the test runs.
    tmp: tempfile::TempDir,
    hpki: PathBuf,
    port: u16,
    receiver: Daemon,
    /// The tracker's backing file.
    disk: PathBuf,
    tracker: TrackerProcess,
    log_dir: PathBuf,
    shipper: Daemon,
    /// The file system's image, copied through the tracker.
    fs_image: PathBuf,
    /// The point with the file system at the old size.
    before: u64,
    /// The disk's bytes at that point.
    at_old_size: Vec<u8>,
}

impl AtOldSize {
    /// Sets the host up; `None` (the test skips) when one of `tools` is
    /// missing.
    fn start(test: &str, tools: &[&str]) -> Option<AtOldSize> {
        for tool in tools {
            if !require_tool(tool, test) {
                return None;
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
        Some(AtOldSize {
            tmp,
            hpki,
            port,
            receiver,
            disk,
            tracker,
            log_dir,
            shipper,
            fs_image,
            before,
            at_old_size,
        })
    }
}

/// The scenario; `restart_shipper`: the shipper is stopped and started
/// with the tracker, else it runs on.
fn grow_between_starts(test: &str, restart_shipper: bool) {
    let tools = [
        "nbdcopy",
        "qemu-io",
        "mkfs.ext4",
        "resize2fs",
        "e2fsck",
        "debugfs",
    ];
    let Some(host) = AtOldSize::start(test, &tools) else {
        return;
    };
    let AtOldSize {
        tmp,
        hpki,
        port,
        receiver,
        disk,
        tracker,
        log_dir,
        shipper,
        fs_image,
        before,
        at_old_size,
    } = host;
    let dir = tmp.path();

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

/// The size `nbdinfo` sees at `uri` (a new connection's handshake).
fn nbd_size(uri: &str) -> u64 {
    run_ok(Command::new("nbdinfo").args(["--size", uri]))
        .trim()
        .parse()
        .expect("nbdinfo --size prints a number")
}

/// Online growth under a writer, the operator guide's procedure without a
/// restart: an ext4 at the old size is rewritten through the tracker over
/// and over (a writer on its own connections) while the shipper
/// replicates; the backing grows and `tidemark tracker resize` is run in
/// the middle of it. Then `resize2fs` grows the file system to the new
/// size and a file is written beyond the old end through a new
/// connection. Three points fail over byte for byte and pass `e2fsck -fn`:
/// before the growth (old size), after it with the file system not yet
/// grown (new size), and the newest (new size, grown file system).
#[test]
fn a_disk_grows_online_under_a_writer_while_the_shipper_replicates() {
    let test = "a_disk_grows_online_under_a_writer_while_the_shipper_replicates";
    let tools = [
        "nbdcopy",
        "nbdinfo",
        "qemu-io",
        "mkfs.ext4",
        "resize2fs",
        "e2fsck",
        "debugfs",
        "dumpe2fs",
    ];
    let Some(host) = AtOldSize::start(test, &tools) else {
        return;
    };
    let AtOldSize {
        tmp,
        receiver,
        disk,
        tracker,
        log_dir,
        shipper,
        fs_image,
        before,
        at_old_size,
        ..
    } = host;
    let dir = tmp.path();
    assert_eq!(nbd_size(&tracker.uri()), OLD);

    // The writer: the file system copied through the tracker again and
    // again, each copy on a connection of its own (the size of its
    // handshake: old before the resize, new after it).
    let stop = Arc::new(AtomicBool::new(false));
    let copies = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, copies, uri, from) = (
            stop.clone(),
            copies.clone(),
            tracker.uri(),
            fs_image.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                run_ok(Command::new("nbdcopy").arg("--").arg(&from).arg(&uri));
                copies.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let wait_copies = |n: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while copies.load(Ordering::SeqCst) < n {
            assert!(std::time::Instant::now() < deadline, "the writer is stuck");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_copies(2);

    // Not grown yet: refused, and said why.
    let out = refused(
        tidemark()
            .args(["tracker", "resize", "--disk", "disk", "--control-socket"])
            .arg(&tracker.control),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("grow the backing first"), "{said}");

    // The admin grows the backing, then tells the tracker, while the
    // writer writes.
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(NEW)
        .unwrap();
    let resized: serde_json::Value = serde_json::from_str(&run_ok(
        tidemark()
            .args([
                "tracker",
                "resize",
                "--json",
                "--disk",
                "disk",
                "--control-socket",
            ])
            .arg(&tracker.control),
    ))
    .unwrap();
    assert_eq!(resized["disk"], "disk", "{resized}");
    assert_eq!(resized["before"], OLD, "{resized}");
    assert_eq!(resized["size"], NEW, "{resized}");
    let grow_seq = resized["seq"].as_u64().unwrap();
    let status: serde_json::Value = serde_json::from_str(&run_ok(
        tidemark()
            .args(["tracker", "status", "--json", "--control-socket"])
            .arg(&tracker.control),
    ))
    .unwrap();
    assert_eq!(status["disks"][0]["size"], NEW, "{status:#}");
    let at_resize = copies.load(Ordering::SeqCst);
    wait_copies(at_resize + 2);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert_eq!(nbd_size(&tracker.uri()), NEW, "a new connection");

    // Grown, the file system not yet: the old one, then zeroes.
    let grown = point_now(dir, &tracker);
    assert!(grown > grow_seq && grow_seq > before);
    let mut at_new_size = at_old_size.clone();
    at_new_size.resize(NEW as usize, 0);

    // A shrink is refused and changes nothing.
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(OLD)
        .unwrap();
    let out = refused(
        tidemark()
            .args(["tracker", "resize", "--disk", "disk", "--control-socket"])
            .arg(&tracker.control),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("may only grow"), "{said}");
    fs::OpenOptions::new()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(NEW)
        .unwrap();

    // The file system grows and gets a file beyond the old end.
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
    assert!(after > grown);

    // The log holds one grow record, before every write beyond the old end.
    let dump = run_ok(tidemark().args(["log", "dump", "--json"]).arg(&log_dir));
    let records: Vec<serde_json::Value> = dump
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let grows: Vec<&serde_json::Value> = records.iter().filter(|r| r["kind"] == "grow").collect();
    assert_eq!(grows.len(), 1, "{grows:?}");
    assert_eq!(grows[0]["seq"], grow_seq);
    assert_eq!(
        (grows[0]["offset"].as_u64(), grows[0]["length"].as_u64()),
        (Some(OLD), Some(NEW - OLD))
    );
    let beyond = |r: &&serde_json::Value| {
        r["kind"] != "grow"
            && r["disk"].is_u64()
            && r["offset"].as_u64().unwrap() + r["length"].as_u64().unwrap() > OLD
    };
    let first_beyond = records
        .iter()
        .find(beyond)
        .expect("writes beyond the old end");
    assert!(
        first_beyond["seq"].as_u64().unwrap() > grow_seq,
        "{first_beyond}"
    );

    assert!(tracker.stop(), "the tracker did not stop cleanly");
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    assert_eq!(fs::read(&disk).unwrap(), fs::read(&fs_image).unwrap());

    let to = dir.join("failover-before");
    failover_and_compare_with(&tidemark_bin(), dir, &to, Some(before), &at_old_size);
    fsck_clean(&to.join("disk.img"));
    let to = dir.join("failover-grown");
    failover_and_compare_with(&tidemark_bin(), dir, &to, Some(grown), &at_new_size);
    fsck_clean(&to.join("disk.img"));
    let to = dir.join("failover-after");
    failover_and_compare_with(&tidemark_bin(), dir, &to, None, &fs::read(&disk).unwrap());
    fsck_clean(&to.join("disk.img"));
    let dump = run_ok(Command::new("dumpe2fs").arg("-h").arg(to.join("disk.img")));
    assert!(
        dump.lines()
            .any(|l| l.starts_with("Block count:") && l.ends_with(&(NEW / 4096).to_string())),
        "the failed-over file system is not at the new size: {dump}"
    );
}
