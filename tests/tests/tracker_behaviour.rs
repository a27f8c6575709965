//! The running tracker's contract beyond plain I/O: malformed and
//! out-of-range requests never reach the log and never stop the server,
//! the status shows the tracking mode, and a full log switches to bitmap
//! mode without failing a write.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tidemark_changelog::{FsDir, Kind, LogReader, Seq};
use tidemark_e2e::{require_tool, tidemark, TrackerProcess};

const SIZE: u64 = 16 << 20;

fn image(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
    path
}

/// A raw NBD client that negotiates export `disk` with OPT_GO and then
/// sends whatever bytes a test wants.
fn negotiate(socket: &Path) -> UnixStream {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // FIXED_NEWSTYLE | NO_ZEROES
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let name = b"disk";
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&(4 + name.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
    opt.extend_from_slice(name);
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).unwrap();
    loop {
        let mut hdr = [0u8; 20];
        s.read_exact(&mut hdr).unwrap();
        let reply = u32::from_be_bytes(hdr[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(hdr[16..20].try_into().unwrap()) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).unwrap();
        match reply {
            1 => return s, // ACK: transmission
            3 => continue, // INFO
            other => panic!("option reply {other:#x}"),
        }
    }
}

fn request(kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(28);
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

fn simple_reply(s: &mut UnixStream) -> (u64, u32) {
    let mut r = [0u8; 16];
    s.read_exact(&mut r).unwrap();
    assert_eq!(u32::from_be_bytes(r[..4].try_into().unwrap()), 0x6744_6698);
    (
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
    )
}

fn writes_in_log(log_dir: &Path) -> usize {
    let mut reader = LogReader::new(FsDir::existing(log_dir).unwrap(), Seq::ZERO);
    std::iter::from_fn(|| reader.next_record().unwrap())
        .filter(|r| matches!(r.header.kind, Kind::Write | Kind::Trim | Kind::WriteZeroes))
        .count()
}

#[test]
fn bad_requests_reach_neither_disk_nor_log_and_others_are_served() {
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    let tracker = TrackerProcess::start(tmp.path(), &img, &[]);

    // A well-behaved client stays connected throughout.
    let mut good = negotiate(&tracker.socket);

    // Garbage instead of client flags, then a truncated option.
    let mut s = UnixStream::connect(&tracker.socket).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    drop(s);
    let mut s = UnixStream::connect(&tracker.socket).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(b"IHAVEOPT\0\0\0\x07\0\0").unwrap();
    drop(s);

    let mut bad = negotiate(&tracker.socket);
    // Write past the end: ENOSPC, payload consumed, stream still in step.
    let mut w = request(1, 0, 1, SIZE - 512, 4096);
    w.extend(vec![0xee; 4096]);
    bad.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut bad), (1, 28));
    // Offset + length overflowing u64: EINVAL.
    bad.write_all(&request(0, 0, 2, u64::MAX - 10, 4096))
        .unwrap();
    assert_eq!(simple_reply(&mut bad), (2, 22));
    // Unknown command: EINVAL.
    bad.write_all(&request(77, 0, 3, 0, 512)).unwrap();
    assert_eq!(simple_reply(&mut bad), (3, 22));
    // Trim out of range: EINVAL.
    bad.write_all(&request(4, 0, 4, SIZE, 512)).unwrap();
    assert_eq!(simple_reply(&mut bad), (4, 22));
    // A write whose payload is shorter than announced, then the client is
    // gone: nothing may be written.
    let mut w = request(1, 0, 5, 0, 65536);
    w.extend(vec![0xdd; 1000]);
    bad.write_all(&w).unwrap();
    drop(bad);
    // A write over the maximum block size: the connection is refused or closed.
    let mut big = negotiate(&tracker.socket);
    big.write_all(&request(1, 0, 6, 0, 64 << 20)).unwrap();
    let _ = big.write_all(&vec![0xcc; 1 << 20]);
    drop(big);

    // The good client still works, and its write is the only one logged.
    let mut w = request(1, 0, 9, 8192, 512);
    w.extend(vec![0x42; 512]);
    good.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut good), (9, 0));
    good.write_all(&request(3, 0, 10, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut good), (10, 0));
    drop(good);

    let log_dir = tracker.log_dir.clone();
    assert!(
        tracker.stop(),
        "the tracker survived the bad clients and stopped cleanly"
    );
    assert_eq!(
        writes_in_log(&log_dir),
        1,
        "only the good write is in the log"
    );
    let disk = fs::read(&img).unwrap();
    assert!(
        disk[..8192].iter().all(|b| *b == 0),
        "no bad write reached the disk"
    );
    assert!(disk[8192..8704].iter().all(|b| *b == 0x42));
    assert!(disk[8704..].iter().all(|b| *b == 0));
}

#[test]
fn status_shows_the_tracking_mode_and_a_full_log_switches_to_bitmap_mode() {
    if !require_tool(
        "qemu-io",
        "status_shows_the_tracking_mode_and_a_full_log_switches_to_bitmap_mode",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let img = image(tmp.path());
    let tracker = TrackerProcess::start(
        tmp.path(),
        &img,
        &["--segment-size", "1MiB", "--log-size-limit", "2MiB"],
    );
    let status = |tracker: &TrackerProcess| -> serde_json::Value {
        let out = tidemark()
            .args(["tracker", "status", "--json", "--control-socket"])
            .arg(&tracker.control)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let s = status(&tracker);
    assert_eq!(s["tracking"], "data");
    assert_eq!(s["disks"][0]["name"], "disk");
    assert_eq!(s["disks"][0]["tracking"], "data");

    // 4 MiB of writes do not fit a 2 MiB log: every write still succeeds.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x61 0 4M",
            "-c",
            "flush",
            "-c",
            "read -P 0x61 0 4M",
        ])
        .arg(tracker.uri())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("failed"), "{text}");
    let s = status(&tracker);
    assert_eq!(s["tracking"], "bitmap", "{s}");
    assert!(
        s["bitmap_reason"].as_str().unwrap().contains("size limit"),
        "{s}"
    );
    assert!(s["disks"][0]["dirty_extents"].as_u64().unwrap() > 0, "{s}");
    assert!(s["log_bytes"].as_u64().unwrap() <= 2 << 20, "{s}");
    // A recovery point cannot be marked in bitmap mode, and the CLI says why.
    let out = tidemark()
        .args(["tracker", "mark", "x", "--control-socket"])
        .arg(&tracker.control)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bitmap mode"));
    assert!(tracker.stop());
    assert!(fs::read(&img).unwrap()[..4 << 20]
        .iter()
        .all(|b| *b == 0x61));
}

#[test]
fn a_config_file_serves_two_disks_in_one_group_over_unix_and_tcp() {
    if !require_tool(
        "qemu-io",
        "a_config_file_serves_two_disks_in_one_group_over_unix_and_tcp",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (data, wal) = (tmp.path().join("data.img"), tmp.path().join("wal.img"));
    for p in [&data, &wal] {
        fs::File::create(p).unwrap().set_len(SIZE).unwrap();
    }
    // A free loopback port for the TCP listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = tmp.path().join("tracker.toml");
    let d = tmp.path().display();
    fs::write(
        &config,
        format!(
            "[tracker]\nconsistency-group = \"db\"\nlog-dir = \"{d}/log\"\nsocket = \"{d}/nbd.sock\"\n\
             control-socket = \"{d}/ctl\"\ntcp-listen = \"127.0.0.1:{port}\"\nmetrics-listen = \"127.0.0.1:0\"\n\
             log-size-limit = \"64MiB\"\nsegment-size = \"32MiB\"\nmax-block-size = \"16MiB\"\n\n\
             [[tracker.disk]]\nname = \"data\"\npath = \"{}\"\n\n[[tracker.disk]]\nname = \"wal\"\npath = \"{}\"\n",
            data.display(),
            wal.display()
        ),
    )
    .unwrap();
    let check = tidemark()
        .args(["config", "check"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let mut child = tidemark()
        .args(["tracker", "serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert!(first.starts_with("tracker ready"), "{first}");
    let unix = |export: &str| format!("nbd+unix:///{export}?socket={d}/nbd.sock");
    for (uri, pattern) in [
        (unix("data"), "0x11"),
        (unix("wal"), "0x22"),
        (format!("nbd://127.0.0.1:{port}/data"), "0x33"),
    ] {
        let offset = if pattern == "0x33" { "1M" } else { "0" };
        let out = Command::new("qemu-io")
            .args([
                "-f",
                "raw",
                "-c",
                &format!("write -P {pattern} {offset} 64k"),
                "-c",
                "flush",
            ])
            .arg(&uri)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{uri}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = tidemark()
        .args(["tracker", "status", "--json", "--control-socket"])
        .arg(tmp.path().join("ctl"))
        .output()
        .unwrap();
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["group"], "db");
    assert_eq!(s["disks"][1]["name"], "wal");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    // One ordered log for the group: both disks' writes, in order.
    let mut reader = LogReader::new(FsDir::existing(&tmp.path().join("log")).unwrap(), Seq::ZERO);
    let disks: Vec<u32> = std::iter::from_fn(|| reader.next_record().unwrap())
        .filter(|r| r.header.kind == Kind::Write)
        .map(|r| r.header.disk.get())
        .collect();
    assert_eq!(disks, vec![0, 1, 0]);
    assert!(fs::read(&wal).unwrap()[..65536].iter().all(|b| *b == 0x22));
    assert!(fs::read(&data).unwrap()[1 << 20..(1 << 20) + 65536]
        .iter()
        .all(|b| *b == 0x33));
}

/// `[tracker.app-consistent] schedule`: the tracker takes an
/// application-consistent point by itself (pre-hook, marker labelled
/// `scheduled`, post-hook) every interval; 1m is the shortest allowed.
#[test]
fn a_scheduled_app_consistent_point_is_taken_by_the_tracker_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().display();
    let data = tmp.path().join("data.img");
    fs::File::create(&data).unwrap().set_len(SIZE).unwrap();
    let config = tmp.path().join("tracker.toml");
    fs::write(
        &config,
        format!(
            "[tracker]\nlog-dir = \"{d}/log\"\nsocket = \"{d}/nbd.sock\"\ncontrol-socket = \"{d}/ctl\"\n\
             metrics-listen = \"127.0.0.1:0\"\n\n\
             [tracker.app-consistent]\nschedule = \"1m\"\ntimeout = \"20s\"\n\
             pre-hooks = [\"echo pre >> {d}/hooks\"]\npost-hooks = [\"echo post >> {d}/hooks\"]\n\n\
             [[tracker.disk]]\nname = \"data\"\npath = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    let mut child = tidemark()
        .args(["tracker", "serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let log = tmp.path().join("log");
    let scheduled = loop {
        let found = FsDir::existing(&log).ok().and_then(|dir| {
            let mut reader = LogReader::new(dir, Seq::ZERO);
            std::iter::from_fn(|| reader.next_record().ok().flatten())
                .find(|r| r.header.kind == Kind::Marker && r.label() == Some("scheduled"))
        });
        if let Some(r) = found {
            break r;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the tracker exited ({status}) before a scheduled point");
        }
        assert!(
            started.elapsed() < Duration::from_secs(100),
            "no scheduled point after {:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(55),
        "taken after {took:?}, before the schedule"
    );
    assert!(
        scheduled.header.flags & tidemark_changelog::record::FLAG_APP_CONSISTENT != 0,
        "the scheduled marker is not app-consistent"
    );
    // The post-hook runs just after the marker.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        fs::read_to_string(tmp.path().join("hooks")).unwrap(),
        "pre\npost\n"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
}

/// Log lines written to a file (or the journal) carry no ANSI colour codes:
/// colours are for a terminal only.
#[test]
fn logs_to_a_file_have_no_colour_codes() {
    use std::io::BufRead;
    let tmp = tempfile::tempdir().unwrap();
    let image = image(tmp.path());
    let log_file = tmp.path().join("stderr.log");
    let mut child = tidemark()
        .args(["tracker", "serve", "--image"])
        .arg(&image)
        .arg("--socket")
        .arg(tmp.path().join("nbd.sock"))
        .arg("--log-dir")
        .arg(tmp.path().join("log"))
        .env_remove("NO_COLOR")
        .env("TIDEMARK_LOG", "debug")
        .stdout(std::process::Stdio::piped())
        .stderr(fs::File::create(&log_file).unwrap())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert!(ready.starts_with("tracker ready"), "{ready}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let text = fs::read_to_string(&log_file).unwrap();
    assert!(text.contains("INFO"), "the tracker logged nothing: {text}");
    assert!(
        !text.contains('\x1b'),
        "escape codes in a log file: {:?}",
        text.lines().find(|l| l.contains('\x1b'))
    );
}

/// A log directory written by the version-1 tracker (the committed
/// fixture: version-1 segment headers, records, cursor, disks file,
/// tracker.state and maps, after a clean stop) is taken over by this one
/// as it is: a clean start in the same generation, the old records kept
/// byte for byte, new ones after them, and the state file rewritten in the
/// current version.
#[test]
fn a_log_of_the_version_1_tracker_is_continued_in_place() {
    if !require_tool(
        "qemu-io",
        "a_log_of_the_version_1_tracker_is_continued_in_place",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../changelog/tests/fixtures/log-v1");
    let log = tmp.path().join("log");
    fs::create_dir(&log).unwrap();
    for e in fs::read_dir(&fixture).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), log.join(e.file_name())).unwrap();
    }
    let old: std::collections::BTreeMap<u64, Vec<u8>> = {
        let mut reader = LogReader::new(FsDir::existing(&log).unwrap(), Seq::ZERO);
        std::iter::from_fn(|| reader.next_record().unwrap())
            .map(|r| (r.header.seq.get(), r.encode()))
            .collect()
    };
    assert_eq!(old.len(), 20);
    let image = tmp.path().join("disk.img");
    fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let tracker = TrackerProcess::start(tmp.path(), &image, &["--segment-size", "4KiB"]);
    assert!(
        tracker.ready_line.contains("generation 0, clean start"),
        "{}",
        tracker.ready_line
    );
    tidemark_e2e::qemu_io(tracker.uri(), &["write -P 7 0 2048", "flush"]);
    assert!(tracker.stop());
    tidemark_e2e::run(tidemark().args(["log", "check"]).arg(&log));
    let mut reader = LogReader::new(FsDir::existing(&log).unwrap(), Seq::ZERO);
    let all: Vec<_> = std::iter::from_fn(|| reader.next_record().unwrap()).collect();
    // (Segments wholly at or below the cursor, 11, may have been recycled.)
    let kept = all.iter().take_while(|r| r.header.seq.get() <= 20);
    for r in kept {
        assert_eq!(
            r.encode(),
            old[&r.header.seq.get()],
            "record {} changed",
            r.header.seq.get()
        );
    }
    assert!(
        all.iter().any(|r| r.header.seq.get() == 20),
        "the old records are kept"
    );
    let new: Vec<_> = all.iter().filter(|r| r.header.seq.get() > 20).collect();
    assert!(new.iter().any(|r| r.header.kind == Kind::Write));
    assert!(new
        .iter()
        .all(|r| r.header.version == 2 && r.header.generation == 0));
    assert_eq!(new[0].header.seq.get(), 21);
    let state = fs::read_to_string(log.join("tracker.state")).unwrap();
    assert!(state.starts_with("tidemark-tracker-state 2\n"), "{state}");
    assert!(
        state.contains(&format!(
            "\nlast-seq {}\n",
            all.last().unwrap().header.seq.get()
        )),
        "{state}"
    );
}
