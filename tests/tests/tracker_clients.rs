//! The tracker against real, foreign NBD clients: qemu-io, nbdinfo,
//! nbdcopy and nbdsh. After each workload the tracker is stopped cleanly, the log
//! must check clean, and replaying it onto a blank image must give the
//! backing image byte for byte.

use std::fs;
use std::path::Path;
use std::process::Command;
use tidemark_e2e::{nbdinfo_map, require_tool, tidemark, TrackerProcess};

const SIZE: u64 = 64 << 20;

fn blank_image(path: &Path, size: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
}

/// Stops the tracker, checks the log, replays it onto a blank image and
/// compares with the backing image.
fn stop_check_and_replay(tracker: TrackerProcess, dir: &Path, image: &Path) {
    let log_dir = tracker.log_dir.clone();
    assert!(
        tracker.stop(),
        "the tracker did not stop cleanly on SIGTERM"
    );
    let out = tidemark()
        .args(["log", "check"])
        .arg(&log_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let replica = dir.join("replica.img");
    blank_image(&replica, fs::metadata(image).unwrap().len());
    let out = tidemark()
        .args(["log", "replay"])
        .arg(&log_dir)
        .arg("--onto")
        .arg(&replica)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read(image).unwrap() == fs::read(&replica).unwrap(),
        "replaying the log does not give the backing image"
    );
}

fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = cmd.arg(uri).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "qemu-io failed:\n{text}");
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.contains("failed"), "{text}");
    text
}

#[test]
fn qemu_io_writes_reads_discards_and_flushes() {
    if !require_tool("qemu-io", "qemu_io_writes_reads_discards_and_flushes") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    blank_image(&image, SIZE);
    let tracker = TrackerProcess::start(tmp.path(), &image, &[]);
    let uri = tracker.uri();
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 4096 8192",
            "write -P 0x11 1000001 333",
            "write -P 0x5a 3M 1M",
            "discard 3M 64k",
            "write -z 3145728 4096",
            "flush",
            "write -P 0x77 60M 4M",
            "aio_write -P 0x22 8M 64k",
            "aio_write -P 0x23 9M 64k",
            "aio_flush",
        ],
    );
    // A second client verifies what the first wrote.
    qemu_io(
        &uri,
        &[
            "read -P 0xab 0 4096",
            "read -P 0xcd 4096 8192",
            "read -P 0xab 12288 987713",
            "read -P 0x11 1000001 333",
            "read -P 0 3M 64k",
            "read -P 0x5a 3211264 983040",
            "read -P 0x77 60M 4M",
            "read -P 0x22 8M 64k",
            "read -P 0x23 9M 64k",
        ],
    );
    stop_check_and_replay(tracker, tmp.path(), &image);
    let text = log_dump_json(&tmp.path().join("log"));
    assert!(
        text.contains("\"kind\":\"trim\""),
        "discard is logged as a trim"
    );
    assert!(
        text.contains("\"kind\":\"write-zeroes\""),
        "write -z is logged"
    );
    assert!(
        text.contains("\"kind\":\"barrier\""),
        "flush is logged as a barrier"
    );
}

#[test]
fn nbdinfo_sees_what_the_tracker_advertises() {
    if !require_tool("nbdinfo", "nbdinfo_sees_what_the_tracker_advertises") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    blank_image(&image, SIZE);
    let tracker = TrackerProcess::start(tmp.path(), &image, &[]);
    let out = Command::new("nbdinfo")
        .args(["--json", &tracker.uri()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], SIZE);
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(export[flag], true, "{flag} in {export}");
    }
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["block_size_maximum"], 32 << 20);
    let out = Command::new("nbdinfo")
        .args([
            "--list",
            &format!("nbd+unix://?socket={}", tracker.socket.display()),
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("export=\"disk\""),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(tracker.stop());
}

/// Block status tells the truth on an image file: the blank image is one
/// hole, a written range is data (right after the write is acknowledged),
/// a trimmed one a hole again; copying tools can skip the holes.
#[test]
fn nbdinfo_maps_the_holes_and_data_of_an_image() {
    let test = "nbdinfo_maps_the_holes_and_data_of_an_image";
    if !require_tool("nbdinfo", test) || !require_tool("qemu-io", test) {
        return;
    }
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    blank_image(&image, SIZE);
    let tracker = TrackerProcess::start(tmp.path(), &image, &[]);
    let uri = tracker.uri();
    assert_eq!(nbdinfo_map(&uri), [(0, SIZE, 3)]);
    qemu_io(&uri, &["write -P 0x11 4M 2M", "write -P 0x12 40M 1M"]);
    let map = nbdinfo_map(&uri);
    assert_eq!(
        map,
        [
            (0, 4 * MIB, 3),
            (4 * MIB, 2 * MIB, 0),
            (6 * MIB, 34 * MIB, 3),
            (40 * MIB, MIB, 0),
            (41 * MIB, SIZE - 41 * MIB, 3),
        ]
    );
    qemu_io(&uri, &["discard 4M 1M", "flush"]);
    let map = nbdinfo_map(&uri);
    assert_eq!(
        map[..3],
        [(0, 5 * MIB, 3), (5 * MIB, MIB, 0), (6 * MIB, 34 * MIB, 3)],
        "{map:?}"
    );
    stop_check_and_replay(tracker, tmp.path(), &image);
}

fn nbdcopy_round_trip(connections: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    blank_image(&image, SIZE);
    let source = tmp.path().join("source.bin");
    let data: Vec<u8> = (0..SIZE as usize)
        .map(|i| ((i * 7919) >> 9) as u8 ^ (i >> 20) as u8)
        .collect();
    fs::write(&source, &data).unwrap();
    let tracker = TrackerProcess::start(tmp.path(), &image, &[]);
    let uri = tracker.uri();
    let out = Command::new("nbdcopy")
        .args([&format!("--connections={connections}"), "--flush"])
        .arg(&source)
        .arg(&uri)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = tmp.path().join("back.bin");
    let out = Command::new("nbdcopy")
        .arg(&uri)
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        fs::read(&back).unwrap() == data,
        "nbdcopy read back other bytes"
    );
    stop_check_and_replay(tracker, tmp.path(), &image);
}

#[test]
fn nbdcopy_round_trip_one_connection() {
    if !require_tool("nbdcopy", "nbdcopy_round_trip_one_connection") {
        return;
    }
    nbdcopy_round_trip("1");
}

#[test]
fn nbdcopy_round_trip_four_connections_one_log() {
    if !require_tool("nbdcopy", "nbdcopy_round_trip_four_connections_one_log") {
        return;
    }
    nbdcopy_round_trip("4");
}

/// nbdsh needs Debian's python3 (with the `nbd` module) ahead of any other
/// python3 on the PATH, such as a pyenv shim.
fn nbdsh() -> Command {
    let mut command = Command::new("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    command.env("PATH", format!("/usr/bin:/bin:{path}"));
    command
}

/// The kernel's NBD client attached by nbd-client never hears the announced
/// maximum block size and sends up to 32 MiB per request. nbdsh with strict
/// checks off does the same here: a 4 MiB write, write-zeroes and read
/// against a 1 MiB announcement, through segments of 2 MiB (so the write
/// also becomes several log records), must be served, read back and replay
/// to the same bytes.
#[test]
fn requests_above_the_announced_maximum_are_served_and_logged() {
    if !require_tool(
        "nbdsh",
        "requests_above_the_announced_maximum_are_served_and_logged",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    blank_image(&image, SIZE);
    let tracker = TrackerProcess::start_with_config(
        tmp.path(),
        &image,
        "max-block-size = \"1MiB\"\nsegment-size = \"2MiB\"\nlog-size-limit = \"64MiB\"",
    );
    let script = format!(
        r#"
import nbd
h.connect_uri("{uri}")
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 1 << 20, h.get_block_size(nbd.SIZE_MAXIMUM)
h.set_strict_mode(0)
data = bytes((i * 7 + (i >> 12)) % 251 for i in range(4 << 20))
h.pwrite(data, 3 << 20)
h.pwrite(b"\xee" * (4 << 20), 16 << 20)
h.zero(4 << 20, 16 << 20)
h.flush()
assert h.pread(4 << 20, 3 << 20) == data
assert h.pread(4 << 20, 16 << 20) == bytes(4 << 20)
h.shutdown()
print("large requests ok")
"#,
        uri = tracker.uri(),
    );
    let out = nbdsh().args(["-c", &script]).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("large requests ok"),
        "{text}"
    );
    let written = fs::read(&image).unwrap();
    let expected: Vec<u8> = (0..4usize << 20)
        .map(|i| ((i * 7 + (i >> 12)) % 251) as u8)
        .collect();
    assert!(
        written[3 << 20..7 << 20] == expected[..],
        "the backing image does not hold the 4 MiB write"
    );
    assert!(written[16 << 20..20 << 20].iter().all(|&b| b == 0));
    stop_check_and_replay(tracker, tmp.path(), &image);
    let text = log_dump_json(&tmp.path().join("log"));
    let writes = text.matches("\"kind\":\"write\"").count();
    assert!(
        writes >= 6,
        "two 4 MiB writes through 2 MiB segments are at least 6 records, not {writes}"
    );
}

/// `tidemark log dump --json` of the log in `dir`.
fn log_dump_json(dir: &std::path::Path) -> String {
    let dump = tidemark()
        .args(["log", "dump", "--json"])
        .arg(dir)
        .output()
        .unwrap();
    String::from_utf8(dump.stdout).unwrap()
}

/// `nbd+unix:///?socket=…` asks for the empty export name, as do nbdfuse
/// `--unix` and nbd-client without `-N`: a tracker of one disk serves it
/// (as nbdkit and qemu-nbd do), and still lists the disk under its name.
#[test]
fn a_one_disk_tracker_serves_the_default_export() {
    let test = "a_one_disk_tracker_serves_the_default_export";
    for tool in ["nbdinfo", "qemu-io", "nbdfuse", "fusermount3"] {
        if !require_tool(tool, test) {
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    blank_image(&image, SIZE);
    let tracker = TrackerProcess::start(tmp.path(), &image, &[]);
    let default_uri = format!("nbd+unix:///?socket={}", tracker.socket.display());

    let out = Command::new("nbdinfo")
        .args(["--json", &default_uri])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nbdinfo of the default export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"], SIZE, "{info}");
    let out = Command::new("nbdinfo")
        .args(["--list", &default_uri])
        .output()
        .unwrap();
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("export=\"disk\""), "{listing}");

    qemu_io(
        &default_uri,
        &["write -P 0x5c 0 64k", "flush", "read -P 0x5c 0 64k"],
    );

    // nbdfuse with a socket and no export name.
    let fuse_dir = tmp.path().join("fuse");
    fs::create_dir(&fuse_dir).unwrap();
    let pidfile = tmp.path().join("nbdfuse.pid");
    let mut nbdfuse = Command::new("nbdfuse")
        .args(["-C", "1", "-P"])
        .arg(&pidfile)
        .arg(fuse_dir.join("disk"))
        .arg("--unix")
        .arg(&tracker.socket)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !pidfile.exists() {
        if let Some(status) = nbdfuse.try_wait().unwrap() {
            panic!("nbdfuse --unix without an export name ended: {status}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse did not come up"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let through_fuse = (|| {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(fuse_dir.join("disk"))?;
        let mut head = vec![0u8; 64 << 10];
        f.read_exact(&mut head)?;
        f.seek(SeekFrom::Start(1 << 20))?;
        f.write_all(&[0xe7; 4096])?;
        f.sync_all()?;
        Ok::<_, std::io::Error>(head)
    })();
    let _ = Command::new("fusermount3")
        .arg("-u")
        .arg(&fuse_dir)
        .status();
    let _ = nbdfuse.wait();
    let head = through_fuse.expect("reading and writing through nbdfuse");
    assert!(head.iter().all(|&b| b == 0x5c), "nbdfuse read other bytes");
    assert_eq!(
        fs::read(&image).unwrap()[1 << 20..(1 << 20) + 4096],
        [0xe7; 4096]
    );
    stop_check_and_replay(tracker, tmp.path(), &image);
}

/// With several disks the empty name picks none: the client is told which
/// exports there are.
#[test]
fn a_tracker_of_several_disks_names_its_exports_to_a_default_request() {
    let test = "a_tracker_of_several_disks_names_its_exports_to_a_default_request";
    if !require_tool("nbdinfo", test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    let second = tmp.path().join("wal.img");
    blank_image(&image, SIZE);
    blank_image(&second, SIZE);
    let tracker = TrackerProcess::start_with_config(
        tmp.path(),
        &image,
        &format!(
            "\n[[tracker.disk]]\nname = \"wal\"\npath = \"{}\"",
            second.display()
        ),
    );
    // libnbd shows the server's message only in its debug output.
    let out = Command::new("nbdinfo")
        .arg(format!("nbd+unix:///?socket={}", tracker.socket.display()))
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nbdinfo got a default export");
    assert!(
        text.contains("\"wal\"") && text.contains("\"disk\""),
        "the refusal names the exports: {text}"
    );
    // Named, each is served.
    for name in ["disk", "wal"] {
        let out = Command::new("nbdinfo")
            .arg(format!(
                "nbd+unix:///{name}?socket={}",
                tracker.socket.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(tracker.stop());
}
