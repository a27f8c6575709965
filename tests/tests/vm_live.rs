//! `tidemark vm protect --live` and `tidemark vm unprotect`: a running
//! qemu (paused, no guest: `-S`; writes come from qemu's own device
//! through HMP `qemu-io -d`) moves its qcow2 disk onto a real tracker's
//! NBD export and back without stopping. Protected, a write through the
//! device lands in the tracker's log and qemu reads the disk through the
//! export; unprotected, writes go to the file again and the tracker sees
//! none; the image stays a clean qcow2 holding every write.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_changelog::{FsDir, Kind, LogReader, Seq};
use tidemark_e2e::{output_ok, require_tool, tidemark, TrackerProcess};
use tidemark_vm::qmp::Qmp;

/// A qemu process, killed (by its pid) when dropped.
struct Qemu {
    child: Child,
    qmp: PathBuf,
}

impl Qemu {
    /// qemu paused, the qcow2 `image` its one device `vd0` on the format
    /// node `disk0` over the file node `f0` (what a VM not yet protected
    /// looks like).
    fn start(dir: &Path, image: &Path) -> Qemu {
        let qmp = dir.join("qmp.sock");
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "q35",
                "-accel",
                "tcg",
                "-S",
                "-nodefaults",
                "-display",
                "none",
            ])
            .arg("-blockdev")
            .arg(format!(
                "driver=file,node-name=f0,filename={}",
                image.display()
            ))
            .args(["-blockdev", "driver=qcow2,node-name=disk0,file=f0"])
            .args(["-device", "virtio-blk-pci,drive=disk0,id=vd0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting qemu-system-x86_64");
        let mut qemu = Qemu { child, qmp };
        let started = Instant::now();
        while !qemu.qmp.exists() {
            if let Some(status) = qemu.child.try_wait().unwrap() {
                panic!("qemu exited ({status}) before its monitor was up");
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no QMP socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        qemu
    }

    /// Runs one QMP command on a connection of its own (the monitor
    /// takes one client at a time).
    fn execute(&self, command: &str, arguments: Value) -> Value {
        let mut qmp = Qmp::connect(&self.qmp, Duration::from_secs(30)).unwrap();
        qmp.execute(command, Some(&arguments), &mut |_, _| {})
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    /// Writes `pattern` at `offset` through the guest's device.
    fn write(&self, pattern: u8, offset: &str) {
        let out = self.execute(
            "human-monitor-command",
            json!({"command-line": format!(
                "qemu-io -d /machine/peripheral/vd0/virtio-backend \"write -P {pattern:#x} {offset} 1M\""
            )}),
        );
        // qemu-io's own report goes to qemu's stdout; HMP answers "" or the error.
        assert_eq!(out, "", "write -P {pattern:#x} {offset}");
    }

    /// What the disk's format node reads (`file` of `disk0`).
    fn disk_file(&self) -> String {
        let devices = self.execute("query-block", json!({}));
        devices[0]["inserted"]["file"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The write records in the tracker's log.
fn logged_writes(log: &Path) -> usize {
    let mut reader = LogReader::new(FsDir::existing(log).unwrap(), Seq::ZERO);
    std::iter::from_fn(|| reader.next_record().unwrap())
        .filter(|r| r.header.kind == Kind::Write)
        .count()
}

#[test]
fn a_running_vm_moves_onto_the_tracker_and_back_without_stopping() {
    if !require_tool(
        "qemu-system-x86_64",
        "a_running_vm_moves_onto_the_tracker_and_back",
    ) || !require_tool("qemu-img", "a_running_vm_moves_onto_the_tracker_and_back")
    {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = dir.join("run");
    fs::create_dir(&run).unwrap();
    let image = dir.join("root.qcow2");
    output_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("64M"),
    );
    // Room for all qcow2 may allocate: an NBD export does not grow.
    fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(128 << 20)
        .unwrap();
    let spec = dir.join("web1.toml");
    fs::write(
        &spec,
        format!(
            "[vm]\nname = \"web1\"\ncpus = 1\nmemory = \"256MiB\"\n\
             [[vm.disk]]\nname = \"root\"\npath = \"{}\"\nformat = \"qcow2\"\n",
            image.display()
        ),
    )
    .unwrap();
    // The group's tracker, serving the file where `vm protect` puts its sockets.
    let socket = run.join("web1.nbd.sock");
    let mut serve = tidemark();
    serve
        .args(["tracker", "serve", "--image"])
        .arg(&image)
        .args(["--name", "root", "--socket"])
        .arg(&socket)
        .arg("--control-socket")
        .arg(run.join("web1.tracker.ctl"))
        .arg("--log-dir")
        .arg(dir.join("log"));
    let tracker = TrackerProcess::spawn(dir, serve);

    let qemu = Qemu::start(dir, &image);
    qemu.write(0xab, "0");
    assert_eq!(qemu.disk_file(), image.display().to_string());
    assert_eq!(
        logged_writes(&dir.join("log")),
        0,
        "the VM is not on the tracker yet"
    );

    let out = output_ok(
        tidemark()
            .args(["vm", "protect"])
            .arg(&spec)
            .args(["--live", "--json", "--qmp"])
            .arg(&qemu.qmp)
            .arg("--run-dir")
            .arg(&run),
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let url = format!("nbd+unix:///root?socket={}", socket.display());
    assert_eq!(report["error"], Value::Null, "{report}");
    assert_eq!(report["disks"][0]["outcome"], "moved", "{report}");
    assert_eq!(report["disks"][0]["node"], "disk0", "{report}");
    assert_eq!(report["disks"][0]["to"], url.as_str(), "{report}");
    assert_eq!(report["disks"][0]["resync-recorded"], true, "{report}");
    assert_eq!(report["disks"][0]["removed-node"], "f0", "{report}");
    assert_eq!(qemu.disk_file(), url);

    qemu.write(0xcd, "1M");
    let protected = logged_writes(&dir.join("log"));
    assert!(
        protected > 0,
        "a write through the device reached the tracker's log"
    );

    // Again: nothing to move.
    let out = output_ok(
        tidemark()
            .args(["vm", "protect"])
            .arg(&spec)
            .args(["--live", "--json", "--qmp"])
            .arg(&qemu.qmp)
            .arg("--run-dir")
            .arg(&run),
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["disks"][0]["outcome"], "already-there", "{report}");

    let out = output_ok(
        tidemark()
            .args(["vm", "unprotect"])
            .arg(&spec)
            .arg("--qmp")
            .arg(&qemu.qmp)
            .arg("--run-dir")
            .arg(&run),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "disk root (node disk0): moved from {url} to {}",
            image.display()
        )),
        "{text}"
    );
    assert_eq!(qemu.disk_file(), image.display().to_string());
    // The reopen flushed qcow2's cached metadata through the tracker;
    // from then on it is out of the path.
    let unprotected = logged_writes(&dir.join("log"));
    assert!(unprotected >= protected);
    qemu.write(0xef, "2M");
    assert_eq!(
        logged_writes(&dir.join("log")),
        unprotected,
        "the tracker is no longer in the path"
    );

    qemu.execute("quit", json!({}));
    drop(qemu);
    assert!(tracker.stop());
    output_ok(Command::new("qemu-img").args(["check", "-q"]).arg(&image));
    let out = output_ok(
        Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-c",
                "read -P 0xab 0 1M",
                "-c",
                "read -P 0xcd 1M 1M",
            ])
            .args(["-c", "read -P 0xef 2M 1M"])
            .arg(&image),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("fail"), "{text}");
}
