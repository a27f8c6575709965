//! A Debian bookworm root file system and the project's own packages, for
//! the tests that install those packages into it: in a chroot
//! (`tests/tests/packaging.rs`) or booted under qemu with systemd as PID 1
//! (`tests/tests/operator_guide_vm.rs`). Both come from the real tools:
//! debootstrap from the machine's own Debian mirror, and
//! `scripts/package.sh`.

use crate::{run, tidemark};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether the tests run as root (debootstrap, chroot and dpkg need it).
pub fn is_root() -> bool {
    run(Command::new("id").arg("-u")).trim() == "0"
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

/// The cargo target directory the running test was built into.
pub fn cargo_target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> → target
    exe.ancestors()
        .nth(3)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// The Debian mirror this machine's apt uses (only the package registries
/// are reachable from CI), else deb.debian.org.
pub fn debian_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.map(|e| e.unwrap().path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().map(str::trim) {
            // "deb http://host/debian bookworm main" or deb822 "URIs: ...".
            let uri = match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["deb", uri, ..] if !uri.starts_with('[') => uri,
                ["deb", _, uri, ..] if line.contains(']') => uri,
                ["URIs:", uri, ..] => uri,
                _ => continue,
            };
            let uri = uri.trim_end_matches('/');
            if uri.ends_with("/debian") && uri.starts_with("http") {
                return uri.to_string();
            }
        }
    }
    "http://deb.debian.org/debian".into()
}

/// What the Debian guests booted with systemd as PID 1 need on top of a
/// minbase bookworm, one list so they share one cached root
/// (`tests/tests/operator_guide_vm.rs`, `tests/tests/vm_guests.rs`):
/// systemd as init, udev for `/dev/disk/by-id` and the guest agent's
/// port, the tools the operator guide calls, jq for its scenario to read
/// the CLI's `--json`, e2fsprogs to check file systems in the guest, and
/// qemu's guest agent.
pub const SYSTEMD_GUEST_PACKAGES: [&str; 9] = [
    "systemd-sysv",
    "udev",
    "kmod",
    "nbd-client",
    "curl",
    "e2fsprogs",
    "procps",
    "jq",
    "qemu-guest-agent",
];

/// A minbase Debian bookworm with the packages `include` on top,
/// debootstrapped once and cached as a tarball under the target directory
/// (one per `include` list; delete it to refresh); unpacked fresh into
/// `dir/bookworm` for every call.
pub fn bookworm_root(dir: &Path, include: &[&str]) -> PathBuf {
    let name = if include.is_empty() {
        "minbase".to_string()
    } else {
        // FNV-1a: a name that is the same in every build of the tests.
        let hash = include
            .join(",")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        format!("minbase-{hash:016x}")
    };
    let cache_dir = cargo_target_dir().join("packaging-cache");
    let tarball = cache_dir.join(format!("bookworm-{name}.tar.gz"));
    if !tarball.exists() {
        fs::create_dir_all(&cache_dir).unwrap();
        let build = cache_dir.join(format!("bookworm-{name}.build"));
        let _ = fs::remove_dir_all(&build);
        let mirror = debian_mirror();
        eprintln!(
            "debootstrapping Debian bookworm from {mirror} (once; cached as {})",
            tarball.display()
        );
        let mut debootstrap = Command::new("debootstrap");
        debootstrap.arg("--variant=minbase");
        if !include.is_empty() {
            debootstrap.arg(format!("--include={}", include.join(",")));
        }
        run(debootstrap.arg("bookworm").arg(&build).arg(&mirror));
        // The package cache is not part of the system.
        run(Command::new("chroot")
            .arg(&build)
            .args(["apt-get", "clean"]));
        let partial = cache_dir.join(format!("bookworm-{name}.tar.gz.partial"));
        run(Command::new("tar")
            .arg("-C")
            .arg(&build)
            .args(["--numeric-owner", "-czf"])
            .arg(&partial)
            .arg("."));
        fs::rename(&partial, &tarball).unwrap();
        fs::remove_dir_all(&build).unwrap();
    }
    let root = dir.join("bookworm");
    fs::create_dir_all(&root).unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["--numeric-owner", "-xzf"])
        .arg(&tarball));
    root
}

/// The packages `scripts/package.sh` built, in `target/packages`.
pub struct Packages {
    /// Where they are.
    pub dir: PathBuf,
    /// The version they carry (the workspace's).
    pub version: String,
}

impl Packages {
    /// The .deb of `pkg` (e.g. "tidemark-agent").
    pub fn deb(&self, pkg: &str) -> PathBuf {
        self.dir.join(format!(
            "{pkg}_{version}-1_amd64.deb",
            version = self.version
        ))
    }
}

/// Builds the .deb and .rpm packages with `scripts/package.sh`, from the
/// profile these tests were built with, into the workspace's
/// `target/packages`.
pub fn build_packages() -> Packages {
    let ws = workspace();
    let built_release = crate::tidemark_bin().parent().unwrap().ends_with("release");
    let profile = if built_release { "release" } else { "dev" };
    run(Command::new(ws.join("scripts/package.sh"))
        .env("TIDEMARK_PACKAGE_PROFILE", profile)
        .env("CARGO_TARGET_DIR", cargo_target_dir()));
    let version = run(tidemark().arg("--version"));
    let version = version
        .trim()
        .strip_prefix("tidemark ")
        .expect("`tidemark VERSION`")
        .to_string();
    Packages {
        dir: ws.join("target/packages"),
        version,
    }
}
