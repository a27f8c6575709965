//! A libvirt daemon of the test's own: `libvirtd` (Debian's, qemu driver)
//! started by the test without systemd, every directory it uses its own.
//!
//! As root libvirtd is the system instance, whose directories are fixed
//! (`/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, …) and whose qemu
//! driver resolves its default user `libvirt-qemu` before it reads
//! `qemu.conf`. So the daemon runs in a mount namespace of its own
//! (`unshare --mount`) where each of those directories, and `/etc/passwd`
//! and `/etc/group` with that user added, are bind mounts of the test's
//! folders: nothing of the machine's is read or changed, and the daemon's
//! socket is in the test's folder (`qemu:///system?socket=…`). Its
//! `qemu.conf` runs qemu as root without a security driver (the tracker's
//! socket and the console are root's) and writes qemu's output to files
//! (no virtlogd).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The machine's directories the daemon gets its own copies of.
const DIRS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// A running private libvirtd; stopped when dropped.
pub struct PrivateLibvirtd {
    child: Child,
    /// The connection URI to give `virsh -c` and `tidemark --libvirt`.
    pub uri: String,
    /// Its folder.
    pub dir: PathBuf,
}

impl PrivateLibvirtd {
    /// Starts one in `dir` (created) and waits until it answers; why not
    /// when it cannot run here.
    pub fn start(dir: &Path) -> Result<PrivateLibvirtd, String> {
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let dir = fs::canonicalize(dir).map_err(|e| e.to_string())?;
        for (sub, _) in DIRS {
            fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
        }
        let socket_dir = dir.join("run");
        fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
                socket_dir.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
             security_driver = \"none\"\nstdio_handler = \"file\"\n",
        )
        .map_err(|e| e.to_string())?;
        let mut passwd = fs::read_to_string("/etc/passwd").map_err(|e| e.to_string())?;
        let mut group = fs::read_to_string("/etc/group").map_err(|e| e.to_string())?;
        if !passwd.lines().any(|l| l.starts_with("libvirt-qemu:")) {
            passwd.push_str("libvirt-qemu:x:64055:64055::/var/lib/libvirt:/usr/sbin/nologin\n");
        }
        if !group.lines().any(|l| l.starts_with("libvirt-qemu:")) {
            group.push_str("libvirt-qemu:x:64055:\n");
        }
        fs::write(dir.join("passwd"), passwd).map_err(|e| e.to_string())?;
        fs::write(dir.join("group"), group).map_err(|e| e.to_string())?;
        let mut script = String::from("set -e\n");
        for (file, at) in [("passwd", "/etc/passwd"), ("group", "/etc/group")] {
            script.push_str(&format!(
                "mount --bind '{}' {at}\n",
                dir.join(file).display()
            ));
        }
        for (sub, at) in DIRS {
            // The mount point must exist; an empty folder is all it adds.
            script.push_str(&format!(
                "mkdir -p {at}\nmount --bind '{}' {at}\n",
                dir.join(sub).display()
            ));
        }
        script.push_str(&format!(
            "exec libvirtd -f '{}'\n",
            dir.join("etc/libvirtd.conf").display()
        ));
        let log = fs::File::create(dir.join("libvirtd.log")).map_err(|e| e.to_string())?;
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("unshare: {e}"))?;
        let uri = format!(
            "qemu:///system?socket={}",
            socket_dir.join("libvirt-sock").display()
        );
        let mut daemon = PrivateLibvirtd { child, uri, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(out) = daemon.virsh(&["version"]).output() {
                if out.status.success() {
                    return Ok(daemon);
                }
            }
            if daemon.child.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(daemon.dir.join("libvirtd.log")).unwrap_or_default();
                return Err(format!("libvirtd did not start:\n{log}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `virsh -c URI ARGS`.
    pub fn virsh(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("virsh");
        cmd.arg("-c").arg(&self.uri).args(args);
        cmd
    }

    /// The names of every domain it has, running or not.
    pub fn domains(&self) -> Vec<String> {
        let out = self
            .virsh(&["list", "--all", "--name"])
            .output()
            .expect("running virsh");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }
}

impl Drop for PrivateLibvirtd {
    fn drop(&mut self) {
        // Domains a failed test left: libvirtd does not stop them itself.
        for domain in self.domains() {
            let _ = self.virsh(&["destroy", &domain]).output();
            let _ = self.virsh(&["undefine", &domain]).output();
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
