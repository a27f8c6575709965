//! Releases side by side: the previous release's binaries (built from git,
//! see `tidemark_e2e::previous_release`) against this tree's, on loopback,
//! each checked by a failover that must equal the source byte for byte.
//!
//! - A protected host of the previous release replicates to a receiver of
//!   this one, which serves it in protocol version 1.
//! - A protected host of this release replicates to a receiver of the
//!   previous one: that receiver refuses the newer hello, and the shipper
//!   goes on in version 1.
//! - Both sites of the previous release are upgraded in place: this
//!   release's tracker takes over the older change log, its receiver the
//!   older replica store, whose recovery points stay readable, and
//!   replication goes on.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_e2e::previous_release::previous_release_bin;
use tidemark_e2e::replication::{
    enroll_with, failover_and_compare_with, free_port, run_ok, start_receiver_of, start_shipper_of,
    wait_caught_up, Daemon, HOST,
};
use tidemark_e2e::{qemu_io, require_tool, tidemark_bin, TrackerProcess};

const SIZE: u64 = 16 << 20;
const CATCH_UP: Duration = Duration::from_secs(90);

/// The previous release's binary and this one's, or `None` (the test
/// skips, having said why) when a tool or the previous release is missing.
fn binaries(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !require_tool("qemu-io", test) || !require_tool("git", test) {
        return None;
    }
    Some((previous_release_bin(test)?, tidemark_bin()))
}

/// `dir/disk.img`, holding data before it is protected.
fn write_image(dir: &Path) {
    let path = dir.join("disk.img");
    let mut bytes = vec![0u8; SIZE as usize];
    for (i, b) in bytes[1 << 20..3 << 20].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[2];
    }
    fs::write(&path, bytes).unwrap();
}

/// A daemon's log without the terminal colour codes tracing may put in it.
fn log_text(path: &Path) -> String {
    let raw = fs::read_to_string(path).unwrap_or_default();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The recovery points of the replica of [`HOST`] in `dir/replicas`, as
/// `bin points --json` lists them.
fn points(bin: &Path, dir: &Path) -> Vec<u64> {
    let out = run_ok(
        std::process::Command::new(bin)
            .args(["points", "--json", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST]),
    );
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["seq"].as_u64().unwrap()
        })
        .collect()
}

/// A replica site and a protected host on loopback, each of a release:
/// a receiver, and a tracker on `dir/disk.img` with its shipper.
struct Sites<'a> {
    dir: &'a Path,
    receiver: Daemon,
    tracker: TrackerProcess,
    shipper: Daemon,
}

impl<'a> Sites<'a> {
    /// Starts the receiver (`receiver_bin`) on `port`, then the tracker and
    /// the shipper (`host_bin`), with the certificates of [`enroll_with`].
    fn start(dir: &'a Path, receiver_bin: &Path, host_bin: &Path, port: u16) -> Sites<'a> {
        let (rpki, hpki) = (dir.join("receiver-pki"), dir.join("host-pki"));
        let receiver = start_receiver_of(receiver_bin, dir, &rpki, port, None);
        let tracker = TrackerProcess::start_of(host_bin, dir, &dir.join("disk.img"), &[]);
        let shipper = start_shipper_of(host_bin, dir, &tracker.log_dir, &hpki, port, &[]);
        Sites {
            dir,
            receiver,
            tracker,
            shipper,
        }
    }

    /// Writes through the tracker (qemu-io commands) and waits until the
    /// receiver has it all: the shipper's status then.
    fn write(&self, cmds: &[&str]) -> serde_json::Value {
        qemu_io(self.tracker.uri(), cmds);
        wait_caught_up(self.dir, &self.tracker.log_dir, CATCH_UP)
    }

    /// A planned stop: the tracker's final barrier reaches the replica,
    /// then the shipper and the receiver stop.
    fn stop(self) {
        let log_dir = self.tracker.log_dir.clone();
        assert!(self.tracker.stop(), "the tracker did not stop cleanly");
        wait_caught_up(self.dir, &log_dir, CATCH_UP);
        assert!(self.shipper.stop().success());
        assert!(self.receiver.stop().success());
    }
}

/// A fresh directory with certificates (the receiver's made by
/// `receiver_bin`, the host's request by `host_bin`), the image and a port.
fn setup(receiver_bin: &Path, host_bin: &Path) -> (tempfile::TempDir, u16) {
    let tmp = tempfile::tempdir().unwrap();
    enroll_with(receiver_bin, host_bin, tmp.path(), HOST);
    write_image(tmp.path());
    (tmp, free_port())
}

#[test]
fn an_older_protected_host_replicates_to_a_newer_receiver() {
    let test = "an_older_protected_host_replicates_to_a_newer_receiver";
    let Some((old, new)) = binaries(test) else {
        return;
    };
    let (tmp, port) = setup(&new, &old);
    let dir = tmp.path();
    let sites = Sites::start(dir, &new, &old, port);
    // This release's CLI reads the older shipper's status.
    let status = sites.write(&["write -P 0xa1 0 1M", "write -z 2M 512k", "flush"]);
    assert!(status["protocol_version"].is_null(), "{status:#}");
    let log = log_text(&dir.join(format!("receiver-{port}.log")));
    assert!(
        log.lines()
            .any(|l| l.contains("session started") && l.contains("protocol=1")),
        "the receiver did not serve the older shipper in protocol version 1:\n{log}"
    );
    sites.write(&["write -P 0xb2 8M 256k", "flush"]);
    sites.stop();
    let source = fs::read(dir.join("disk.img")).unwrap();
    failover_and_compare_with(&new, dir, &dir.join("failover"), None, &source);
}

#[test]
fn a_newer_protected_host_replicates_to_an_older_receiver() {
    let test = "a_newer_protected_host_replicates_to_an_older_receiver";
    let Some((old, new)) = binaries(test) else {
        return;
    };
    let (tmp, port) = setup(&old, &new);
    let dir = tmp.path();
    let sites = Sites::start(dir, &old, &new, port);
    let status = sites.write(&["write -P 0xc3 0 1M", "discard 1M 64k", "flush"]);
    assert_eq!(status["protocol_version"], 1, "{status:#}");
    assert!(status["receiver_software"].is_null(), "{status:#}");
    // The older receiver refused the newer hello once, in its words.
    let log = log_text(&dir.join(format!("receiver-{port}.log")));
    let refused = format!(
        "unsupported protocol version {}",
        tidemark_wire::PROTOCOL_VERSION
    );
    assert!(
        log.contains(&refused),
        "no refused hello in the older receiver's log:\n{log}"
    );
    sites.write(&["write -P 0xd4 12M 128k", "flush"]);
    sites.stop();
    // The older receiver's replica, failed over by its own release.
    let source = fs::read(dir.join("disk.img")).unwrap();
    failover_and_compare_with(&old, dir, &dir.join("failover"), None, &source);
}

#[test]
fn both_sites_upgraded_in_place_keep_their_log_replica_and_points() {
    let test = "both_sites_upgraded_in_place_keep_their_log_replica_and_points";
    let Some((old, new)) = binaries(test) else {
        return;
    };
    let (tmp, port) = setup(&old, &old);
    let dir = tmp.path();

    // The previous release on both sites, then a planned stop of all: the
    // admin's upgrade window.
    let sites = Sites::start(dir, &old, &old, port);
    sites.write(&[
        "write -P 0xe5 0 2M",
        "flush",
        "write -P 0xe6 4M 64k",
        "flush",
    ]);
    sites.stop();
    let before = fs::read(dir.join("disk.img")).unwrap();
    // This release reads the older store's points.
    let old_points = points(&new, dir);
    assert_eq!(
        old_points,
        points(&old, dir),
        "both releases list the same points"
    );
    let upgrade_point = *old_points.last().expect("the older replica has points");

    // This release on both sites, on the same files: the tracker takes on
    // the older change log, the receiver the older replica store.
    let sites = Sites::start(dir, &new, &new, port);
    let status = sites.write(&["write -P 0xf7 0 64k", "write -z 4M 64k", "flush"]);
    assert_eq!(
        status["protocol_version"],
        tidemark_wire::PROTOCOL_VERSION,
        "{status:#}"
    );
    sites.stop();

    let now = points(&new, dir);
    assert!(
        now.contains(&upgrade_point) && now.last() > Some(&upgrade_point),
        "points before the upgrade {old_points:?}, after {now:?}"
    );
    let source = fs::read(dir.join("disk.img")).unwrap();
    assert_ne!(
        source, before,
        "the writes after the upgrade changed the disk"
    );
    failover_and_compare_with(&new, dir, &dir.join("latest"), None, &source);
    // The point the older receiver made still reads what the disk held.
    failover_and_compare_with(
        &new,
        dir,
        &dir.join("before-upgrade"),
        Some(upgrade_point),
        &before,
    );
}
