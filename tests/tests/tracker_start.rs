//! What the tracker's state files say is true: a start that is refused
//! leaves no "running" behind, a disk smaller than its log records is
//! refused, and one file is never protected twice under two names.

use std::fs;
use std::path::{Path, PathBuf};
use tidemark_e2e::{qemu_io, refused, require_tool, tidemark, TrackerProcess};

fn image(path: &Path, size: u64) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::File::create(path).unwrap().set_len(size).unwrap();
    path.to_path_buf()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_refused_start_leaves_the_next_start_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = image(&dir.join("disk.img"), 16 << 20);
    // The socket's directory does not exist: refused after the log opened.
    let out = refused(
        tidemark()
            .args(["tracker", "serve", "--image"])
            .arg(&img)
            .args(["--name", "disk", "--socket"])
            .arg(dir.join("missing/nbd.sock"))
            .arg("--log-dir")
            .arg(dir.join("log")),
    );
    assert!(
        stderr(&out).contains("missing/nbd.sock"),
        "{}",
        stderr(&out)
    );
    let state = fs::read_to_string(dir.join("log/tracker.state")).unwrap_or_default();
    assert!(
        !state.contains("running 1"),
        "a refused start left the state file saying it runs:\n{state}"
    );
    let tracker = TrackerProcess::start(dir, &img, &[]);
    assert!(
        tracker.ready_line.contains("generation 0") && tracker.ready_line.contains("clean start"),
        "the start after a refused one was taken for an unclean restart: {}",
        tracker.ready_line
    );
    assert!(tracker.stop());
}

#[test]
fn a_disk_smaller_than_its_log_records_is_refused_naming_both_sizes() {
    let test = "a_disk_smaller_than_its_log_records_is_refused_naming_both_sizes";
    if !require_tool("qemu-io", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = image(&dir.join("disk.img"), 64 << 20);
    let tracker = TrackerProcess::start(dir, &img, &[]);
    qemu_io(tracker.uri(), &["write -P 0x60 60M 64k", "flush"]);
    let log_dir = tracker.log_dir.clone();
    assert!(tracker.stop());
    let files = |names: &[&str]| -> Vec<Vec<u8>> {
        names
            .iter()
            .map(|n| fs::read(log_dir.join(n)).unwrap())
            .collect()
    };
    let before = files(&["tracker.state", "disks"]);
    let resize = |size: u64| {
        fs::File::options()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(size)
            .unwrap()
    };

    resize(32 << 20);
    let out = refused(&mut TrackerProcess::command(dir, &img, &[]));
    let text = stderr(&out);
    assert!(
        text.contains(&(32u64 << 20).to_string()) && text.contains(&(64u64 << 20).to_string()),
        "the refusal does not name both sizes: {text}"
    );
    assert!(
        files(&["tracker.state", "disks"]) == before,
        "the refused start rewrote the recorded state or size"
    );

    // Back at its size, the disk is served again, cleanly.
    resize(64 << 20);
    let tracker = TrackerProcess::start(dir, &img, &[]);
    assert!(
        tracker.ready_line.contains("clean start"),
        "{}",
        tracker.ready_line
    );
    assert!(tracker.stop());
}

#[test]
fn one_file_twice_or_two_disks_under_one_name_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let v1 = image(&dir.join("v1/disk.raw"), 4 << 20);
    let v2 = image(&dir.join("v2/disk.raw"), 4 << 20);
    // Each case in its own directory, with the sockets and log
    // TrackerProcess expects there.
    let serve = |images: &[PathBuf], names: &[&str], case: &str| {
        let mut cmd = tidemark();
        cmd.args(["tracker", "serve"]);
        for i in images {
            cmd.arg("--image").arg(i);
        }
        for n in names {
            cmd.args(["--name", n]);
        }
        let at = dir.join(case);
        fs::create_dir_all(&at).unwrap();
        cmd.arg("--socket")
            .arg(at.join("nbd.sock"))
            .arg("--control-socket")
            .arg(at.join("tracker.ctl"))
            .arg("--log-dir")
            .arg(at.join("log"));
        cmd
    };
    // The same path twice, and the same file through another path.
    for (images, case) in [
        ([v1.clone(), v1.clone()], "same-path"),
        ([v1.clone(), dir.join("v2/../v1/disk.raw")], "other-path"),
    ] {
        let out = refused(&mut serve(&images, &["a", "b"], case));
        let text = stderr(&out);
        assert!(
            text.contains("same file") && text.contains("\"a\"") && text.contains("\"b\""),
            "{case}: {text}"
        );
        assert!(!dir.join(case).join("log/tracker.state").exists(), "{case}");
    }
    // Two files, one file name: two exports called "disk.raw".
    let out = refused(&mut serve(&[v1.clone(), v2.clone()], &[], "one-name"));
    let text = stderr(&out);
    assert!(
        text.contains("\"disk.raw\"") && text.contains("--name"),
        "{text}"
    );
    assert!(!dir.join("one-name/log/tracker.state").exists());

    // Named apart, they are two disks with two activity maps.
    let tracker = TrackerProcess::spawn(&dir.join("named"), serve(&[v1, v2], &["a", "b"], "named"));
    assert!(tracker.stop());
    for map in ["activity-a.map", "activity-b.map"] {
        assert!(dir.join("named/log").join(map).exists(), "{map}");
    }
}
