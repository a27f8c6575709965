//! A reader that goes away (`tidemark points … | head -1`) ends a command
//! quietly: no panic, no "failed printing to stdout", and the work the
//! command was asked to do is still done. Each command runs with its
//! standard output on a pipe whose reading end is already closed, so its
//! first write fails with EPIPE.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use tidemark_changelog::{Entry, Record};
use tidemark_e2e::tidemark;
use tidemark_names::Name;
use tidemark_receiver::store::{ChunkRef, Disk, GroupState, Purpose, ReplicaGroup};

const DISK: u64 = 64 << 10;

/// A replica of host `db1` with a few recovery points under `data_dir`.
fn replica_with_points(data_dir: &Path) {
    let dir = data_dir.join("db1").join("default");
    fs::create_dir_all(&dir).unwrap();
    let mut g = ReplicaGroup::open(&dir).unwrap();
    g.ensure_disks(&[Disk {
        id: tidemark_changelog::DiskId(0),
        name: Name::from_static("disk"),
        size: DISK,
    }])
    .unwrap();
    g.apply_chunk(
        tidemark_changelog::DiskId(0),
        0,
        ChunkRef::Zero(DISK),
        Purpose::InitialSync,
    )
    .unwrap();
    assert_eq!(g.commit().unwrap().state, GroupState::Consistent);
    for seq in 1..=20 {
        let entry = if seq % 5 == 0 {
            Entry::marker("nightly", false, seq * 1_000_000_000)
        } else {
            Entry::barrier(seq * 1_000_000_000)
        };
        g.apply_record(&Record::decode(&entry.encode(seq, 1)).unwrap())
            .unwrap();
        g.commit().unwrap();
    }
    assert!(g.points().len() >= 2, "{:?}", g.points());
}

/// Runs `cmd` with its stdout on a pipe nobody reads any more; asserts it
/// ended quietly (exit 0, or killed by SIGPIPE as classic tools are) and
/// returns its stderr.
#[track_caller]
fn with_reader_gone(cmd: &mut Command) -> String {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = cmd
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    use std::os::unix::process::ExitStatusExt;
    let quiet = out.status.success() || out.status.signal() == Some(libc_sigpipe());
    assert!(quiet, "{cmd:?} ended with {}: {stderr}", out.status);
    for noise in ["panicked", "Broken pipe", "failed printing"] {
        assert!(!stderr.contains(noise), "{cmd:?} said {noise:?}: {stderr}");
    }
    stderr
}

fn libc_sigpipe() -> i32 {
    nix::sys::signal::Signal::SIGPIPE as i32
}

#[test]
fn commands_end_quietly_when_their_reader_goes_away() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("replicas");
    replica_with_points(&data);

    with_reader_gone(
        tidemark()
            .args(["points", "--host", "db1", "--data-dir"])
            .arg(&data),
    );
    with_reader_gone(
        tidemark()
            .args(["points", "--json", "--host", "db1", "--data-dir"])
            .arg(&data),
    );
    with_reader_gone(tidemark().arg("--version"));
    with_reader_gone(tidemark().args(["points", "--help"]));

    let config = tmp.path().join("tracker.toml");
    fs::write(
        &config,
        "[tracker]\nlog-dir = \"/srv/log\"\n\n[[tracker.disk]]\nname = \"data\"\npath = \"/dev/sdb\"\n",
    )
    .unwrap();
    with_reader_gone(tidemark().args(["config", "check"]).arg(&config));

    // A command that does work goes on with it when nobody reads what it
    // says: the PKI is made whole.
    let pki = tmp.path().join("pki");
    with_reader_gone(tidemark().args(["receiver", "init", "--pki-dir"]).arg(&pki));
    for file in ["ca.crt", "ca.key", "receiver.crt", "receiver.key"] {
        assert!(pki.join(file).exists(), "{file} missing");
    }

    // And one that writes a recovery point out: every image is written.
    let to = tmp.path().join("failover");
    with_reader_gone(
        tidemark()
            .args(["failover", "--host", "db1", "--to"])
            .arg(&to)
            .arg("--data-dir")
            .arg(&data),
    );
    assert_eq!(fs::metadata(to.join("disk.img")).unwrap().len(), DISK);
}
