//! Booting a protected VM on the replica site: a guest's root disk is
//! replicated (tracker → shipper → receiver), `tidemark test-failover
//! start --boot` starts the VM from the point's copy-on-write export
//! under qemu (TCG) on an isolated network,
//! and says ready once the guest's console shows it is up; replication
//! goes on meanwhile, and ending the test stops the VM and leaves nothing
//! (as `test-failover cleanup` does after a test that was killed).
//! The same test failover through libvirt (`--libvirt URI`: a private
//! libvirtd the test starts, `tidemark_e2e::libvirt`): the domain is
//! defined and started by libvirt, and destroyed and undefined when the
//! test ends. Then `tidemark failover --boot` refuses a NIC whose network
//! has no mapping before writing anything, and boots the VM from the
//! disk it wrote (the recovery time measured).
//!
//! The guest is the cheapest real one: the kernel of
//! `scripts/kernel-vm.sh`, the initramfs of `scripts/system-vm.sh`, and a
//! 32 MiB ext4 root holding busybox and an init that prints a line with a
//! token written into the image before replication. Four boots of a few
//! seconds each.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tidemark_e2e::libvirt::PrivateLibvirtd;
use tidemark_e2e::replication::HOST;
use tidemark_e2e::replication::{
    enroll, newest_point, start_receiver, start_shipper, start_test_failover_with, wait_caught_up,
};
use tidemark_e2e::{qemu_io, refused, require_kernel, require_tool, run, tidemark, TrackerProcess};

const TEST: &str = "a_replicated_vm_boots_at_a_test_failover_and_at_a_failover";
const IMAGE_SIZE: u64 = 32 << 20;
/// Most time from starting the VM to its up line: TCG on two shared cores.
const UP_TIMEOUT: &str = "120s";

/// Kills a qemu left running by a failed test (qemu runs in the
/// background, outliving the test failover).
struct QemuGuard(Option<i32>);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether process `pid` is gone (or a zombie).
fn gone(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// A root file system whose init prints `TIDEMARK-VM-UP <token>` and
/// stays up, as an ext4 image at `image`.
fn guest_root(dir: &Path, image: &Path, token: &str) {
    let root = dir.join("guest-root");
    for sub in ["bin", "sbin", "proc", "dev", "sys", "etc"] {
        fs::create_dir_all(root.join(sub)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    fs::write(root.join("etc/token"), token).unwrap();
    let init = root.join("sbin/init");
    fs::write(
        &init,
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         echo \"TIDEMARK-VM-UP $(/bin/busybox cat /etc/token) up $(/bin/busybox cut -d' ' -f1 /proc/uptime) s\"\n\
         while :; do /bin/busybox sleep 1000; done\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755)).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(image)
        .arg(format!("{}M", IMAGE_SIZE >> 20)));
}

/// A test failover at `point` whose VM libvirt runs: up, its NIC on no
/// network, nothing left once the test ends.
/// Skipped (a failure under CI) where libvirtd cannot run.
fn libvirt_test_failover(
    dir: &Path,
    point: u64,
    boot_args: &[&std::ffi::OsStr],
    group_dir: &Path,
    token: &str,
) {
    if !require_tool("libvirtd", TEST) || !require_tool("virsh", TEST) {
        return;
    }
    let started = Instant::now();
    let libvirtd = match PrivateLibvirtd::start(&dir.join("libvirt")) {
        Ok(daemon) => daemon,
        Err(why) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{TEST}: libvirtd cannot run under CI: {why}"
            );
            eprintln!("SKIP {TEST} (libvirt part): {why}");
            return;
        }
    };
    eprintln!("a private libvirtd answers after {:?}", started.elapsed());
    let mut args: Vec<&std::ffi::OsStr> = boot_args.to_vec();
    args.push(std::ffi::OsStr::new("--libvirt"));
    args.push(std::ffi::OsStr::new(&libvirtd.uri));
    let started = Instant::now();
    let (test, _, lines) = start_test_failover_with(dir, point, &args, Duration::from_secs(180));
    let to_ready = started.elapsed();
    let up = lines
        .iter()
        .find(|l| l.starts_with("the VM vm1 is up"))
        .unwrap_or_else(|| panic!("no up line: {lines:?}"));
    assert!(up.contains("libvirt domain vm1-test"), "{up}");
    eprintln!("{up}; test-failover start --libvirt to ready: {to_ready:?}");
    assert_eq!(libvirtd.domains(), ["vm1-test"]);
    let state = run(&mut libvirtd.virsh(&["domstate", "vm1-test"]));
    assert_eq!(state.trim(), "running");
    let xml = run(&mut libvirtd.virsh(&["dumpxml", "vm1-test"]));
    // Its NIC a tap device on no bridge: a link that reaches nothing.
    assert!(xml.contains("<interface type='ethernet'>"), "{xml}");
    assert!(!xml.contains("<source bridge"), "{xml}");
    assert!(xml.contains("org.qemu.guest_agent.0"), "{xml}");
    let console = fs::read_to_string(group_dir.join("test-failover/vm.console")).unwrap();
    assert!(
        console.contains(&format!("TIDEMARK-VM-UP {token} up")),
        "{console}"
    );
    assert!(test.stop().success());
    assert!(
        libvirtd.domains().is_empty(),
        "the domain is left: {:?}",
        libvirtd.domains()
    );
    assert!(!group_dir.join("test-failover").exists(), "traces left");
}

#[test]
fn a_replicated_vm_boots_at_a_test_failover_and_at_a_failover() {
    for tool in ["qemu-system-x86_64", "nbdcopy", "mkfs.ext4", "busybox"] {
        if !require_tool(tool, TEST) {
            return;
        }
    }
    if !require_kernel(TEST) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");

    // The guest: a root image, the initramfs and the kernel to boot it.
    let token = format!("{:016x}", rand::random::<u64>());
    let guest = dir.join("guest.ext4");
    guest_root(dir, &guest, &token);
    let initrd = dir.join("initrd.gz");
    let kernel = run(Command::new("bash")
        .arg(scripts.join("system-vm.sh"))
        .arg("initramfs")
        .arg(&initrd));
    let kernel = kernel.lines().last().expect("the kernel's path").trim();

    // The guest's disk is protected and replicated.
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    fs::File::create(&image)
        .unwrap()
        .set_len(IMAGE_SIZE)
        .unwrap();
    let port = tidemark_e2e::replication::free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let uri = tracker.uri();
    let _shipper = start_shipper(dir, &log_dir, &hpki, port);
    run(Command::new("nbdcopy").arg(&guest).arg(&uri));
    qemu_io(&uri, &["flush"]);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    let point = newest_point(dir);

    // The VM's spec on the replica site, and the same VM without its NIC
    // (this machine has no bridge to map it to).
    let spec = dir.join("vm1.toml");
    let spec_text = format!(
        "[vm]\nname = \"vm1\"\ncpus = 1\nmemory = \"256MiB\"\n\n\
         [vm.kernel]\npath = \"{kernel}\"\ninitrd = \"{}\"\n\
         append = \"console=ttyS0 panic=-1 quiet tidemark.root=disk\"\n\n\
         [[vm.disk]]\nname = \"disk\"\npath = \"{}\"\nformat = \"raw\"\n\n",
        initrd.display(),
        image.display()
    );
    fs::write(
        &spec,
        format!("{spec_text}[[vm.nic]]\nbridge = \"br0\"\nmac = \"52:54:00:12:34:56\"\n"),
    )
    .unwrap();
    let bare_spec = dir.join("vm1-bare.toml");
    fs::write(&bare_spec, &spec_text).unwrap();

    let started = Instant::now();
    let up_line = format!("TIDEMARK-VM-UP {token}");
    let boot_args: [&std::ffi::OsStr; 8] = [
        "--boot".as_ref(),
        spec.as_os_str(),
        "--up-line".as_ref(),
        up_line.as_ref(),
        "--up-timeout".as_ref(),
        UP_TIMEOUT.as_ref(),
        // CI machines' KVM, when there is one, may be nested and broken:
        // TCG boots everywhere.
        "--accel".as_ref(),
        "tcg".as_ref(),
    ];
    let (test, _, lines) =
        start_test_failover_with(dir, point, &boot_args, Duration::from_secs(180));
    let to_ready = started.elapsed();
    let group_dir = dir.join("replicas/db1.example.test/default");
    let pid: i32 = fs::read_to_string(group_dir.join("test-failover/vm.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _qemu = QemuGuard(Some(pid));
    let up = lines
        .iter()
        .find(|l| l.starts_with("the VM vm1 is up"))
        .unwrap_or_else(|| panic!("no up line: {lines:?}"));
    eprintln!("{up}; test-failover start to ready: {to_ready:?}");
    let console = fs::read_to_string(group_dir.join("test-failover/vm.console")).unwrap();
    assert!(
        console.contains(&format!("TIDEMARK-VM-UP {token} up")),
        "{console}"
    );
    assert!(!gone(pid), "the VM is not running");

    // Production keeps running and replicating while the VM runs.
    qemu_io(&uri, &["write -P 0x5a 30M 64k", "flush"]);
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    assert!(newest_point(dir) > point, "no new point during the test");

    // Ending the test stops the VM and leaves nothing.
    assert!(test.stop().success());
    assert!(gone(pid), "the VM still runs after the test ended");
    assert!(!group_dir.join("test-failover").exists(), "traces left");

    // A test failover that is killed leaves its VM running; cleanup stops
    // it and removes the rest.
    let (test, _, _) = start_test_failover_with(dir, point, &boot_args, Duration::from_secs(180));
    let pid: i32 = fs::read_to_string(group_dir.join("test-failover/vm.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _qemu_of_killed_test = QemuGuard(Some(pid));
    test.kill();
    assert!(!gone(pid), "the VM should outlive a killed test failover");
    let out = run(tidemark()
        .args(["test-failover", "cleanup", "--data-dir"])
        .arg(dir.join("replicas"))
        .args(["--host", HOST]));
    assert!(out.contains("stopped the VM"), "{out}");
    assert!(gone(pid), "cleanup left the VM running");
    assert!(!group_dir.join("test-failover").exists(), "traces left");

    libvirt_test_failover(dir, point, &boot_args, &group_dir, &token);

    // A failover: a NIC whose network has no mapping is refused before
    // anything is written.
    assert!(receiver.stop().success());
    let to = dir.join("failover");
    let failover = |spec: &Path| {
        let mut cmd = tidemark();
        cmd.args(["failover", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--to"])
            .arg(&to)
            .arg("--boot")
            .arg(spec)
            .args(["--up-line", &format!("TIDEMARK-VM-UP {token}")])
            .args(["--up-timeout", UP_TIMEOUT, "--accel", "tcg"]);
        cmd
    };
    let out = refused(&mut failover(&spec));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("vm.nic[0] is on \"br0\", which has no mapping"),
        "{stderr}"
    );
    assert!(!to.exists(), "a refused failover wrote {}", to.display());

    // The VM boots from the failed-over disk; the command's time from
    // start to the VM up is the recovery time.
    let started = Instant::now();
    let out = run(&mut failover(&bare_spec));
    let rto = started.elapsed();
    let pid: i32 = fs::read_to_string(to.join("vm1.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _qemu = QemuGuard(Some(pid));
    assert!(out.contains("the VM vm1 is up"), "{out}");
    let console = fs::read_to_string(to.join("vm1.console")).unwrap();
    assert!(
        console.contains(&format!("TIDEMARK-VM-UP {token} up")),
        "{console}"
    );
    eprintln!("failover --boot to the VM up (RTO): {rto:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone(pid), "the failed-over VM did not stop");
}
