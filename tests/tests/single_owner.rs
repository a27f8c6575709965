//! One process owns a log directory, a replica data directory, a shipper
//! cursor: a second tracker, shipper or receiver on the same directory is
//! refused by a lock before it touches anything, and says who holds it.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;
use tidemark_e2e::replication::{enroll, free_port, start_receiver, start_shipper, Daemon, HOST};
use tidemark_e2e::{qemu_io, refused, require_tool, tidemark, TrackerProcess};

/// Every file of `dir` with its bytes.
fn contents(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The refusal names the directory, what holds it and its pid.
fn assert_names_the_holder(out: &Output, dir: &Path, owner: &str, pid: u32) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    for wanted in [
        dir.display().to_string(),
        format!("another {owner}"),
        format!("pid {pid}"),
    ] {
        assert!(stderr.contains(&wanted), "{wanted:?} not in: {stderr}");
    }
}

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    fs::File::create(&path).unwrap().set_len(16 << 20).unwrap();
    path
}

#[test]
fn a_second_tracker_on_a_log_directory_is_refused_before_it_touches_it() {
    let test = "a_second_tracker_on_a_log_directory_is_refused_before_it_touches_it";
    if !require_tool("qemu-io", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = image(dir);
    let tracker = TrackerProcess::start(dir, &img, &[]);
    // Flushed writes, and one that is not: its extent is hot in the
    // activity map, which a second tracker used to clear.
    qemu_io(tracker.uri(), &["write -P 0x31 0 64k", "flush"]);
    qemu_io(tracker.uri(), &["write -P 0x32 8M 64k"]);
    let before = contents(&tracker.log_dir);
    let pid = tracker.pid();

    // The same arguments, and then other sockets: both refused.
    let same = refused(&mut TrackerProcess::command(dir, &img, &[]));
    assert_names_the_holder(&same, &tracker.log_dir, "tracker", pid);
    let mut other = tidemark();
    other
        .args(["tracker", "serve", "--image"])
        .arg(&img)
        .args(["--name", "disk", "--socket"])
        .arg(dir.join("other.sock"))
        .arg("--log-dir")
        .arg(&tracker.log_dir);
    let other = refused(&mut other);
    assert_names_the_holder(&other, &tracker.log_dir, "tracker", pid);
    assert!(!dir.join("other.sock").exists());
    assert!(
        contents(&tracker.log_dir) == before,
        "a refused tracker changed the log directory"
    );

    // The first one still serves, and its log holds every write.
    qemu_io(tracker.uri(), &["read -P 0x32 8M 64k", "flush"]);
    assert!(tracker.stop());
    let restarted = TrackerProcess::start(dir, &img, &[]);
    assert!(
        restarted.ready_line.contains("clean start"),
        "{}",
        restarted.ready_line
    );
}

#[test]
fn a_second_receiver_on_a_data_directory_is_refused_at_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, _) = enroll(dir, HOST);
    let receiver = start_receiver(dir, &rpki, free_port(), None);
    let data_dir = dir.join("replicas");
    let out = refused(
        tidemark()
            .args(["receiver", "serve", "--listen"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--pki-dir")
            .arg(&rpki),
    );
    assert_names_the_holder(&out, &data_dir, "receiver", receiver.pid().as_raw() as u32);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("receiver ready"),
        "the second receiver bound its port before it was refused"
    );
    assert!(receiver.stop().success());
}

#[test]
fn a_second_shipper_on_a_log_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (_, hpki) = enroll(dir, HOST);
    let log_dir = dir.join("log");
    fs::create_dir(&log_dir).unwrap();
    // No receiver listens: the first shipper keeps retrying, which is
    // enough to own the log.
    let port = free_port();
    let shipper = start_shipper(dir, &log_dir, &hpki, port);
    std::thread::sleep(Duration::from_millis(500));
    let second = Daemon::new(
        tidemark()
            .args(["shipper", "run", "--log-dir"])
            .arg(&log_dir)
            .args(["--receiver", &format!("127.0.0.1:{port}"), "--host", HOST])
            .arg("--pki-dir")
            .arg(&hpki)
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("second-shipper.log")).unwrap())
            .spawn()
            .unwrap(),
        "second shipper",
    );
    let status = second.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    let out = Output {
        status,
        stdout: Vec::new(),
        stderr: fs::read(dir.join("second-shipper.log")).unwrap(),
    };
    assert_names_the_holder(&out, &log_dir, "shipper", shipper.pid().as_raw() as u32);
    assert!(shipper.stop().success());
}
