//! Replicas are as private as the disks they copy: under a permissive
//! umask every file the daemons and the CLI create that holds disk data or
//! state is 0600 and every directory 0700 — the change log, the shipper's
//! status, the receiver's replica store, a failed-over image, a test
//! failover's scratch, the keys. A socket another local service must reach
//! is opened to one named group (`--socket-group`), never to the world.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tidemark_e2e::replication::{
    enroll, free_port, newest_point, run_ok, start_receiver, start_shipper, start_test_failover,
    wait_caught_up, HOST,
};
use tidemark_e2e::{qemu_io, require_tool, tidemark, TrackerProcess};

/// The permissive umask every process of these tests runs under (set for
/// the whole test process; every test here wants the same).
fn permissive_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o002));
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every directory (`dir` included) and regular file below `dir`, with
/// what is wrong with its mode.
fn not_private(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut wrong = Vec::new();
    if mode(dir) != 0o700 {
        wrong.push((dir.to_path_buf(), format!("{:o}", mode(dir))));
    }
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            wrong.extend(not_private(&path));
        } else if meta.is_file() && mode(&path) != 0o600 {
            wrong.push((path, format!("{:o}", meta.permissions().mode() & 0o777)));
        }
    }
    wrong
}

fn assert_private(dir: &Path) {
    let wrong = not_private(dir);
    assert!(
        wrong.is_empty(),
        "readable by others under umask 0002: {wrong:?}"
    );
}

#[test]
fn logs_replicas_failovers_and_keys_are_private_under_a_permissive_umask() {
    let test = "logs_replicas_failovers_and_keys_are_private_under_a_permissive_umask";
    if !require_tool("qemu-io", test) {
        return;
    }
    permissive_umask();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    for key in [
        rpki.join("ca.key"),
        rpki.join("receiver.key"),
        hpki.join("host.key"),
    ] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    assert_eq!(mode(&rpki), 0o700);
    assert_eq!(mode(&hpki), 0o700);

    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    qemu_io(
        tracker.uri(),
        &[
            "write -P 0x42 0 1M",
            "flush",
            "write -P 0x43 4M 1M",
            "flush",
        ],
    );
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(log_dir.join("shipper.status").exists());
    assert_private(&log_dir);
    let replicas = dir.join("replicas");
    assert!(replicas
        .join(HOST)
        .join("default")
        .join("disk-0.img")
        .exists());
    assert_private(&replicas);

    // A test failover's pin and scratch, while it runs.
    let (test, _) = start_test_failover(dir, newest_point(dir));
    let scratch = replicas.join(HOST).join("default").join("test-failover");
    assert!(scratch.join("pin").exists());
    assert_private(&scratch);
    assert!(test.stop().success());

    assert!(tracker.stop());
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    assert_private(&log_dir);
    assert_private(&replicas);

    // A failover into a directory that does not exist yet.
    let to = dir.join("failover/new");
    run_ok(
        tidemark()
            .args(["failover", "--data-dir"])
            .arg(&replicas)
            .args(["--host", HOST, "--to"])
            .arg(&to),
    );
    assert!(to.join("disk.img").exists());
    assert_private(&dir.join("failover"));
}

#[test]
fn the_nbd_socket_opens_to_a_named_group_only() {
    permissive_umask();
    let out = Command::new("id").arg("-gn").output().unwrap();
    assert!(out.status.success());
    let group = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(4 << 20).unwrap();
    // The test's own group, as a new file gets it.
    let gid = fs::metadata(&image).unwrap().gid();

    let tracker = TrackerProcess::start(dir, &image, &[]);
    assert_eq!(mode(&tracker.socket), 0o600, "without a socket group");
    assert!(tracker.stop());

    let tracker = TrackerProcess::start(dir, &image, &["--socket-group", &group]);
    let meta = fs::metadata(&tracker.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    assert_eq!(
        mode(&tracker.control),
        0o600,
        "the control socket stays the owner's"
    );
    assert_private(&tracker.log_dir);
    assert!(tracker.stop());

    // A group that does not exist is refused before anything is served.
    let out = tidemark_e2e::refused(
        tidemark()
            .args(["tracker", "serve", "--image"])
            .arg(&image)
            .args(["--socket-group", "no-such-group-here", "--socket"])
            .arg(dir.join("other.sock"))
            .arg("--log-dir")
            .arg(dir.join("log")),
    );
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("no-such-group-here"), "{said}");
    assert!(!dir.join("other.sock").exists());
}
