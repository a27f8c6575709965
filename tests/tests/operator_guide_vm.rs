//! The README's operator guide, run for real where every line of it can
//! run: a Debian bookworm booted under qemu with systemd as PID 1, the
//! project's .deb packages installed in it by `dpkg -i`, the daemons
//! started and stopped by `systemctl`, the protected disk attached by the
//! kernel's NBD client over the tracker's unix socket, the metrics read
//! with curl. One guest plays the protected host and the replica site
//! (the receiver on its loopback).
//!
//! The guide's lines are read from README.md here, and the guest reports
//! each line it ran and checked (`scripts/vm-scenarios/operator-guide.sh`),
//! so the guide and this test cannot drift apart: a guide line that is
//! neither run in the guest nor named in `RUN_ELSEWHERE` fails the test.

use std::fs;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use tidemark_e2e::debian::{
    bookworm_root, build_packages, is_root, workspace, SYSTEMD_GUEST_PACKAGES,
};
use tidemark_e2e::{require_kernel, require_tool};

const TEST: &str = "the_operator_guide_runs_on_debian_with_systemd";

/// Guide lines this test does not run, with the test that runs them.
const RUN_ELSEWHERE: [(&str, &str); 6] = [
    (
        "tidemark plan run /etc/tidemark/plan.toml --planned --dry-run",
        "tests/tests/plans.rs",
    ),
    (
        "tidemark plan run /etc/tidemark/plan.toml --test",
        "tests/tests/plans.rs",
    ),
    (
        "tidemark plan run /etc/tidemark/plan.toml --planned",
        "tests/tests/plans.rs",
    ),
    (
        "tidemark reprotect --data-dir /var/lib/tidemark/replicas --host db1.example.com --disk data=/dev/disk/by-id/old-primary-data",
        "tests/tests/replication.rs",
    ),
    (
        "tidemark failback --data-dir /var/lib/tidemark/replicas --host db1.example.com --to /dev/disk/by-id/old-primary-data",
        "tests/tests/replication.rs",
    ),
    (
        "tidemark tracker serve --config /etc/tidemark/tracker.toml --resync-all",
        "tests/tests/replication.rs",
    ),
];

/// Size of the guest's protected disk.
const DATA_DISK: u64 = 64 << 20;

/// Every command line of the README's operator guide, prompts (`host$`)
/// dropped, comments left out.
fn guide_lines() -> Vec<String> {
    let readme = fs::read_to_string(workspace().join("README.md")).unwrap();
    let start = readme
        .find("\n## Operator guide")
        .expect("the README has an operator guide");
    let guide = &readme[start + 1..];
    let guide = &guide[..guide[3..].find("\n## ").map_or(guide.len(), |i| i + 3)];
    let mut in_block = false;
    let mut lines = Vec::new();
    for line in guide.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        let command = match line.split_once("$ ") {
            Some((prompt, rest)) if !prompt.contains(' ') => rest.trim(),
            _ => line.trim(),
        };
        if !command.is_empty() && !command.starts_with('#') {
            lines.push(command.to_string());
        }
    }
    lines
}

/// Puts the packages, the guide's scenario and the unit that runs it at
/// boot into the guest's root.
fn prepare_guest(root: &Path, debs: &[std::path::PathBuf]) {
    let scenarios = workspace().join("scripts/vm-scenarios");
    let deb_dir = root.join("root/debs");
    fs::create_dir_all(&deb_dir).unwrap();
    for deb in debs {
        fs::copy(deb, deb_dir.join(deb.file_name().unwrap())).unwrap();
    }
    let script = root.join("usr/local/sbin/tidemark-operator-guide");
    fs::copy(scenarios.join("operator-guide.sh"), &script).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let units = root.join("etc/systemd/system");
    fs::copy(
        scenarios.join("operator-guide.service"),
        units.join("tidemark-operator-guide.service"),
    )
    .unwrap();
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    symlink(
        "/etc/systemd/system/tidemark-operator-guide.service",
        wants.join("tidemark-operator-guide.service"),
    )
    .unwrap();
    // The scenario owns the serial console: no login prompts on it.
    for unit in ["serial-getty@ttyS0.service", "getty@tty1.service"] {
        symlink("/dev/null", units.join(unit)).unwrap();
    }
    fs::write(root.join("etc/hostname"), "tidemark-guide\n").unwrap();
}

#[test]
fn the_operator_guide_runs_on_debian_with_systemd() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{TEST}: CI must run the tests as root"
        );
        eprintln!(
            "SKIP {TEST}: needs root (debootstrap, chroot, mkfs.ext4 -d of a root file system)"
        );
        return;
    }
    for tool in [
        "debootstrap",
        "chroot",
        "qemu-system-x86_64",
        "busybox",
        "mkfs.ext4",
        "modprobe",
        "cargo-deb",
        "cargo-generate-rpm",
    ] {
        if !require_tool(tool, TEST) {
            return;
        }
    }
    if !require_kernel(TEST) {
        return;
    }

    // The guide's lines, before anything slow: each must either run in the
    // guest or be named as run elsewhere.
    let lines = guide_lines();
    assert!(lines.len() >= 30, "only {} lines in the guide", lines.len());
    for (line, _) in RUN_ELSEWHERE {
        assert!(
            lines.iter().any(|l| l == line),
            "RUN_ELSEWHERE names `{line}`, which the guide no longer has"
        );
    }

    let started = Instant::now();
    let packages = build_packages();
    let debs: Vec<_> = ["tidemark-common", "tidemark-agent", "tidemark-receiver"]
        .into_iter()
        .map(|p| packages.deb(p))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = bookworm_root(dir, &SYSTEMD_GUEST_PACKAGES);
    prepare_guest(&root, &debs);
    eprintln!(
        "{TEST}: packages and root ready after {:?}",
        started.elapsed()
    );

    let system_vm = workspace().join("scripts/system-vm.sh");
    let image = dir.join("root.ext4");
    let out = Command::new(&system_vm)
        .arg("image")
        .arg(&root)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/system-vm.sh image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_dir_all(&root).unwrap();

    // The disk to protect already holds data: the initial sync copies it.
    let data = dir.join("data.img");
    let disk = fs::File::create(&data).unwrap();
    disk.set_len(DATA_DISK).unwrap();
    disk.write_all_at(&[0x5a; 1 << 20], 40 << 20).unwrap();
    drop(disk);

    let console = dir.join("console.log");
    let booted = Instant::now();
    let out = Command::new(&system_vm)
        .arg("boot")
        .arg(&image)
        .arg("--disk")
        .arg(format!("{}:tidemark-data", data.display()))
        .args(["--timeout", "900", "--console"])
        .arg(&console)
        .output()
        .unwrap();
    let log = fs::read_to_string(&console)
        .unwrap_or_default()
        .replace('\r', "");
    eprintln!(
        "{TEST}: the guest ran for {:?} ({:?} in all)",
        booted.elapsed(),
        started.elapsed()
    );
    for line in log.lines().filter(|l| l.starts_with("TIDEMARK-VM-")) {
        eprintln!("    {line}");
    }
    assert!(
        out.status.success(),
        "the guide failed in the guest:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every guide line ran and was checked in the guest, unless it is
    // run elsewhere.
    let ran: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("TIDEMARK-VM-OK: "))
        .collect();
    let mut missing = Vec::new();
    for line in &lines {
        let elsewhere = RUN_ELSEWHERE.iter().any(|(l, _)| l == line);
        if !elsewhere && !ran.contains(&line.as_str()) {
            missing.push(line.as_str());
        }
    }
    assert!(
        missing.is_empty(),
        "guide lines the guest did not run (run them in scripts/vm-scenarios/operator-guide.sh, \
         or name the test that does in RUN_ELSEWHERE):\n{}",
        missing.join("\n")
    );
    // And the guest ran nothing as the guide's that the guide lacks: what
    // the guest needed beyond the guide would be missing from it.
    let not_in_guide: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("TIDEMARK-VM-RUN: "))
        .filter(|l| !lines.iter().any(|g| g == l))
        .collect();
    assert!(
        not_in_guide.is_empty(),
        "the guest ran these as guide lines, but the README's guide lacks them:\n{}",
        not_in_guide.join("\n")
    );
    for line in &lines {
        if ["systemctl ", "nbd-client ", "curl "]
            .iter()
            .any(|p| line.starts_with(p))
        {
            assert!(ran.contains(&line.as_str()), "`{line}` did not run");
        }
    }
}
