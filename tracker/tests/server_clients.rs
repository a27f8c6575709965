//! The NBD server against real, foreign clients: qemu-io and qemu-img
//! (QEMU's NBD client), nbdinfo, nbdcopy and nbdsh (libnbd). Each test
//! skips with a message when its tool is missing, and fails instead under
//! CI.

mod server_support;

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use server_support::{pseudo_random, require_tool, MemoryBackend, TestServer, KIB, MIB};
use tidemark_tracker::server::{ListenAddr, Server, ServerOptions};

/// Runs a tool, killing it after `timeout` so a broken server fails the
/// test instead of hanging it.
fn run(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("starting {command:?}: {error}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout
            .read_to_end(&mut buf)
            .map(|_| buf)
            .unwrap_or_default()
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr
            .read_to_end(&mut buf)
            .map(|_| buf)
            .unwrap_or_default()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// Runs a tool that must succeed; returns its stdout.
fn run_ok(command: &mut Command) -> String {
    let output = run(command, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    stdout
}

/// Runs qemu-io commands against `uri` and checks that every one worked.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for step in commands {
        command.args(["-c", step]);
    }
    command.arg(uri);
    let out = run_ok(&mut command);
    eprintln!("{out}");
    for bad in ["Pattern verification failed", "failed", "error", "Error"] {
        assert!(!out.contains(bad), "qemu-io reported {bad:?}:\n{out}");
    }
    out
}

/// nbdsh needs Debian's python3 (with the `nbd` module) ahead of any other
/// python3 on the PATH, such as a pyenv shim.
fn nbdsh() -> Command {
    let mut command = Command::new("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    command.env("PATH", format!("/usr/bin:/bin:{path}"));
    command
}

fn tool_version(tool: &str) -> String {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

#[test]
fn qemu_io_writes_reads_discards_zeroes_and_flushes() {
    if !require_tool(
        "qemu-io",
        "qemu_io_writes_reads_discards_zeroes_and_flushes",
    ) {
        return;
    }
    eprintln!("using {}", tool_version("qemu-io"));
    let server = TestServer::start(MemoryBackend::new(&[("disk", 4 * MIB)], true));
    let uri = server.uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            // Byte-granular and unaligned.
            "write -P 0x11 1 3",
            "read -P 0x11 1 3",
            "read -P 0xab 0 1",
            "read -P 0xab 4 65532",
            "write -P 0x5c 123457 100003",
            "read -P 0x5c 123457 100003",
            // Force unit access.
            "write -f -P 0x66 3m 4k",
            "read -P 0x66 3m 4k",
            "discard 0 4k",
            "read -P 0 0 4k",
            "write -z 1m 1m",
            "read -P 0 1m 1m",
            "write -z 2000 777",
            "read -P 0 2000 777",
            "flush",
        ],
    );
    let disk = server.backend.snapshot(0);
    assert!(disk[..4096].iter().all(|&b| b == 0), "discarded");
    assert!(disk[4096..65536].iter().all(|&b| b == 0xab));
    assert!(disk[123_457..223_460].iter().all(|&b| b == 0x5c));
    assert!(disk[MIB..2 * MIB].iter().all(|&b| b == 0));
    assert!(disk[3 * MIB..3 * MIB + 4096].iter().all(|&b| b == 0x66));
    assert!(server.backend.flushes.load(Ordering::SeqCst) >= 1);
    assert!(server.backend.trims.load(Ordering::SeqCst) >= 1);
    assert!(server.backend.zeroes.load(Ordering::SeqCst) >= 1);

    // Reads past the end are refused, and qemu-io says so.
    let out = run(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read 4m 512", &uri]),
        Duration::from_secs(60),
    );
    let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("failed") || text.contains("Input/output") || text.contains("Invalid"),
        "{text}"
    );
}

#[test]
fn qemu_io_aio_batches() {
    if !require_tool("qemu-io", "qemu_io_aio_batches") {
        return;
    }
    let server = TestServer::start(MemoryBackend::new(&[("disk", 8 * MIB)], true));
    let mut steps: Vec<String> = Vec::new();
    for i in 0..32u32 {
        // 32 writes in flight at once, of mixed sizes and alignments.
        let len = 4096 + (i % 5) * 1000 + i;
        steps.push(format!(
            "aio_write -P {:#x} {} {len}",
            i + 1,
            u64::from(i) * 200 * 1024 + u64::from(i % 3)
        ));
    }
    steps.push("aio_flush".into());
    for i in 0..32u32 {
        let len = 4096 + (i % 5) * 1000 + i;
        steps.push(format!(
            "aio_read -P {:#x} {} {len}",
            i + 1,
            u64::from(i) * 200 * 1024 + u64::from(i % 3)
        ));
    }
    steps.push("aio_flush".into());
    let steps: Vec<&str> = steps.iter().map(String::as_str).collect();
    qemu_io(&server.uri("disk"), &steps);
    assert!(server.backend.writes.load(Ordering::SeqCst) >= 32);
    let disk = server.backend.snapshot(0);
    for i in 0..32usize {
        let at = i * 200 * 1024 + i % 3;
        let len = 4096 + (i % 5) * 1000 + i;
        assert!(disk[at..at + len].iter().all(|&b| b == i as u8 + 1));
    }
}

#[test]
fn qemu_img_and_qemu_io_over_tcp_and_the_default_export() {
    if !require_tool(
        "qemu-io",
        "qemu_img_and_qemu_io_over_tcp_and_the_default_export",
    ) || !require_tool(
        "qemu-img",
        "qemu_img_and_qemu_io_over_tcp_and_the_default_export",
    ) {
        return;
    }
    let backend = Arc::new(MemoryBackend::new(&[("disk", 2 * MIB)], false));
    let options = ServerOptions {
        default_export: Some("disk".into()),
        ..ServerOptions::default()
    };
    let server = Server::bind_tcp("127.0.0.1:0", options).unwrap();
    let ListenAddr::Tcp(addr) = server.addr().clone() else {
        panic!("a TCP address")
    };
    let handle = server.serve(backend.clone()).unwrap();
    let named = format!("nbd://127.0.0.1:{}/disk", addr.port());
    let default = format!("nbd://127.0.0.1:{}", addr.port());
    qemu_io(&named, &["write -P 0x42 512 1k", "read -P 0x42 512 1k"]);
    qemu_io(&default, &["read -P 0x42 512 1k"]);
    let info = run_ok(Command::new("qemu-img").args(["info", "-f", "raw", &named]));
    assert!(info.contains("2 MiB") || info.contains("2097152"), "{info}");
    handle.shutdown();
    assert!(backend.snapshot(0)[512..1536].iter().all(|&b| b == 0x42));
}

#[test]
fn nbdinfo_lists_and_describes_exports() {
    if !require_tool("nbdinfo", "nbdinfo_lists_and_describes_exports") {
        return;
    }
    eprintln!("using {}", tool_version("nbdinfo"));
    for multi_conn in [true, false] {
        let server = TestServer::start(MemoryBackend::new(
            &[("data", 64 * MIB), ("wal", MIB)],
            multi_conn,
        ));
        let list = run_ok(Command::new("nbdinfo").args(["--list", &server.uri("data")]));
        assert!(list.contains("export=\"data\""), "{list}");
        assert!(list.contains("export=\"wal\""), "{list}");
        assert!(list.contains("in-memory disk wal"), "{list}");

        let info = run_ok(Command::new("nbdinfo").arg(server.uri("data")));
        eprintln!("{list}\n{info}");
        for line in [
            "export-size: 67108864",
            "is_read_only: false",
            "can_flush: true",
            "can_fua: true",
            "can_trim: true",
            "can_zero: true",
            "can_fast_zero: false",
            "can_df: true",
            "block_size_minimum: 1",
            "block_size_preferred: 4096",
            "block_size_maximum: 33554432",
            "base:allocation",
        ] {
            assert!(info.contains(line), "nbdinfo lacks {line:?}:\n{info}");
        }
        let multi = format!("can_multi_conn: {multi_conn}");
        assert!(info.contains(&multi), "nbdinfo lacks {multi:?}:\n{info}");

        let size = run_ok(Command::new("nbdinfo").args(["--size", &server.uri("wal")]));
        assert_eq!(size.trim(), MIB.to_string());
    }
}

fn nbdcopy_round_trip(multi_conn: bool, connections: &str, test: &str) {
    if !require_tool("nbdcopy", test) {
        return;
    }
    eprintln!("using {}", tool_version("nbdcopy"));
    let server = TestServer::start(MemoryBackend::new(&[("disk", 64 * MIB)], multi_conn));
    let source = server.dir.path().join("source.bin");
    let back = server.dir.path().join("back.bin");
    let data = pseudo_random(64 * MIB, 0x5eed);
    std::fs::write(&source, &data).unwrap();
    run_ok(Command::new("nbdcopy").args([
        connections,
        "--flush",
        source.to_str().unwrap(),
        &server.uri("disk"),
    ]));
    assert!(
        server.backend.snapshot(0) == data,
        "the export holds the file"
    );
    assert!(server.backend.flushes.load(Ordering::SeqCst) >= 1);
    std::fs::write(&back, b"").unwrap();
    run_ok(Command::new("nbdcopy").args([
        connections,
        &server.uri("disk"),
        back.to_str().unwrap(),
    ]));
    assert!(
        std::fs::read(&back).unwrap() == data,
        "the copy back is identical"
    );
}

#[test]
fn nbdcopy_round_trip_one_connection() {
    nbdcopy_round_trip(
        false,
        "--connections=1",
        "nbdcopy_round_trip_one_connection",
    );
}

#[test]
fn nbdcopy_round_trip_multi_conn() {
    nbdcopy_round_trip(true, "--connections=4", "nbdcopy_round_trip_multi_conn");
}

#[test]
fn nbdsh_structured_reads_block_status_and_errors() {
    if !require_tool("nbdsh", "nbdsh_structured_reads_block_status_and_errors") {
        return;
    }
    let server = TestServer::start(MemoryBackend::new(&[("disk", MIB)], true));
    let script = format!(
        r#"
import nbd
h.add_meta_context("base:allocation")
h.connect_uri("{uri}")
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.get_size() == {size}

h.pwrite(b"\xab" * 4096, 8192)
assert h.pread(4096, 8192) == b"\xab" * 4096

chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
h.pread_structured(4096, 8192, chunk)
assert chunks == [(8192, 4096, nbd.READ_DATA)], chunks

extents = []
def extent(context, offset, entries, err):
    assert context == "base:allocation"
    extents.extend(entries)
    return 0
h.block_status(65536, 4096, extent)
assert extents == [65536, 0], extents
extents.clear()
h.block_status(65536, 4096, extent, nbd.CMD_FLAG_REQ_ONE)
assert len(extents) == 2 and extents[0] <= 65536, extents

h.set_strict_mode(0)
try:
    h.pread(512, {size})
    raise SystemExit("a read past the end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", e.errno
try:
    h.pwrite(b"x" * 512, {size} - 256)
    raise SystemExit("a write past the end succeeded")
except nbd.Error as e:
    assert e.errno == "ENOSPC", e.errno
# Still in step after the errors.
assert h.pread(4096, 8192) == b"\xab" * 4096
h.flush()
h.zero(4096, 8192)
h.trim(512, 0)
assert h.pread(4096, 8192) == bytes(4096)
h.shutdown()
print("nbdsh ok")
"#,
        uri = server.uri("disk"),
        size = MIB,
    );
    let out = run_ok(nbdsh().args(["-c", &script]));
    assert!(out.contains("nbdsh ok"), "{out}");
    assert!(server.backend.snapshot(0)[..KIB / 2]
        .iter()
        .all(|&b| b == 0));
}
