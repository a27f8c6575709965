//! `tidemark tracker serve --attach` where it cannot attach: a clear error
//! and a non-zero exit, never a panic or a hang. (Attaching itself runs in
//! a real kernel under qemu: `kernel_vm.rs`.)

use std::fs;
use std::time::{Duration, Instant};
use tidemark_e2e::tidemark;

const TEST: &str = "attach_without_the_nbd_module_says_so";

/// Runs `tidemark` with `args`, killed after 60 s; (success, stderr).
fn run_bounded(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let mut child = tidemark()
        .args(args)
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
            panic!("tidemark {args:?} did not exit within 60 s");
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
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let (socket, log) = (dir.join("nbd.sock"), dir.join("log"));
    let (ok, stderr) = run_bounded(&[
        "tracker".as_ref(),
        "serve".as_ref(),
        "--image".as_ref(),
        image.as_os_str(),
        "--socket".as_ref(),
        socket.as_os_str(),
        "--log-dir".as_ref(),
        log.as_os_str(),
        "--attach".as_ref(),
    ]);
    assert!(!ok, "attaching without the nbd driver succeeded:\n{stderr}");
    assert!(
        stderr.contains("no \"nbd\" generic netlink family") && stderr.contains("modprobe nbd"),
        "unclear error:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn keep_device_needs_attach() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let (socket, log) = (dir.join("nbd.sock"), dir.join("log"));
    let (ok, stderr) = run_bounded(&[
        "tracker".as_ref(),
        "serve".as_ref(),
        "--image".as_ref(),
        image.as_os_str(),
        "--socket".as_ref(),
        socket.as_os_str(),
        "--log-dir".as_ref(),
        log.as_os_str(),
        "--keep-device".as_ref(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("--keep-device needs --attach or a [tracker.attach] table"),
        "{stderr}"
    );
}
