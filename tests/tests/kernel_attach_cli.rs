//! `tidemark tracker serve --attach` and `--ublk` where the kernel lacks the
//! driver: a clear error and a non-zero exit, never a panic or a hang.
//! (Attaching and ublk themselves run in a real kernel under qemu:
//! `kernel_vm.rs`.)

use std::fs;
use std::time::{Duration, Instant};
use tidemark_e2e::tidemark;

const TEST: &str = "attach_without_the_nbd_module_says_so";

/// Runs `tidemark tracker serve` on a fresh 1 MiB image with `flag`,
/// killed after 60 s; (success, stderr).
fn serve_with(flag: &str) -> (bool, String) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let mut child = tidemark()
        .args(["tracker", "serve", "--image"])
        .arg(&image)
        .arg("--socket")
        .arg(dir.join("nbd.sock"))
        .arg("--log-dir")
        .arg(dir.join("log"))
        .arg(flag)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting tidemark");
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return (status.success(), stderr);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("tidemark tracker serve {flag} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn attach_without_the_nbd_module_says_so() {
    // Where the kernel has the nbd driver the attach would succeed (and
    // take a real /dev/nbdN): that path is the VM test's.
    if std::path::Path::new("/sys/module/nbd").exists() {
        eprintln!("SKIP {TEST}: this kernel has the nbd driver; kernel_vm.rs attaches for real");
        return;
    }
    let (ok, stderr) = serve_with("--attach");
    assert!(!ok, "attaching without the nbd driver succeeded:\n{stderr}");
    assert!(
        stderr.contains("no \"nbd\" generic netlink family") && stderr.contains("modprobe nbd"),
        "unclear error:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn keep_device_needs_attach() {
    let (ok, stderr) = serve_with("--keep-device");
    assert!(!ok);
    assert!(
        stderr.contains(
            "--keep-device needs --attach, --ublk, or a [tracker.attach] or [tracker.ublk] table"
        ),
        "{stderr}"
    );
}

#[test]
fn ublk_without_the_driver_says_so() {
    const TEST: &str = "ublk_without_the_driver_says_so";
    if std::path::Path::new("/dev/ublk-control").exists() {
        eprintln!("SKIP {TEST}: this kernel has ublk; kernel_vm.rs serves through it for real");
        return;
    }
    let (ok, stderr) = serve_with("--ublk");
    assert!(
        !ok,
        "serving through ublk without the driver succeeded:\n{stderr}"
    );
    assert!(
        stderr.contains("the kernel has no ublk") && stderr.contains("modprobe ublk_drv"),
        "unclear error:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
