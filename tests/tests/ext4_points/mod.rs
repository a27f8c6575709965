//! What both ext4 suites share (`tracker_ext4.rs` on the local store,
//! `ceph_store.rs` on the Ceph store): an ext4 on the tracker's NBD export
//! through nbdfuse and a loop device ([`attach`]), and the check that
//! every recovery point of a group equals the source's change log replayed
//! up to it, every point after the workload's `mkfs` a consistent ext4.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tidemark_e2e::run;

use tidemark_changelog::replay::{apply, ImageFile, ReplaySummary};
use tidemark_changelog::{DiskId, FsDir, LogReader, Seq};
use tidemark_receiver::store::{RecoveryPoint, ReplicaStore};

/// nbdfuse + loop + mount, torn down in reverse order on drop.
pub(crate) struct Mounted {
    nbdfuse: std::process::Child,
    fuse_dir: PathBuf,
    /// The loop device over the NBD export.
    pub(crate) loop_dev: Option<String>,
    /// Where the filesystem is mounted.
    pub(crate) fs_dir: PathBuf,
    /// Whether it is mounted now (unmounted on drop if so).
    pub(crate) mounted: bool,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.fs_dir).status();
        }
        if let Some(dev) = &self.loop_dev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.fuse_dir)
            .status();
        // Unmounting ends nbdfuse; reap it.
        let _ = self.nbdfuse.wait();
    }
}

/// Attaches the NBD export `uri` as a loop device through nbdfuse with
/// `connections` connections; the filesystem is mounted at `dir/fs` by
/// the caller.
pub(crate) fn attach(dir: &Path, uri: &str, connections: &str) -> Mounted {
    let fuse_dir = dir.join("fuse");
    let fs_dir = dir.join("fs");
    fs::create_dir_all(&fuse_dir).unwrap();
    fs::create_dir_all(&fs_dir).unwrap();
    let pidfile = dir.join("nbdfuse.pid");
    let nbdfuse = Command::new("nbdfuse")
        .args(["-C", connections, "-P"])
        .arg(&pidfile)
        .arg(fuse_dir.join("disk"))
        .arg(uri)
        .stdin(Stdio::null())
        .spawn()
        .expect("starting nbdfuse");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pidfile.exists() {
        assert!(Instant::now() < deadline, "nbdfuse did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut m = Mounted {
        nbdfuse,
        fuse_dir: fuse_dir.clone(),
        loop_dev: None,
        fs_dir,
        mounted: false,
    };
    let dev = run(Command::new("losetup")
        .args(["-f", "--show", "--direct-io=on"])
        .arg(fuse_dir.join("disk")));
    m.loop_dev = Some(dev.trim().to_string());
    m
}

/// What [`check_every_point`] found.
pub(crate) struct Checked {
    /// Points equal to the reference replay (all of them).
    pub(crate) compared: usize,
    /// Points that passed `e2fsck` (those at or after the marker).
    pub(crate) fscked: usize,
}

/// Replays the log in `reference` (a copy of the source's, every record
/// kept) onto a blank image of `size` bytes, and at every point of `group`
/// compares disk 0 with it, panicking at the first differing byte. From
/// the point `marker` on (the workload's `mkfs` is done) the point's image
/// must also replay its ext4 journal and pass `e2fsck -fn`; `marker`'s own
/// image is left at `marker_image`. Scratch files go to `dir`.
pub(crate) fn check_every_point(
    group: &dyn ReplicaStore,
    points: &[RecoveryPoint],
    reference: &Path,
    size: u64,
    marker: Seq,
    dir: &Path,
    marker_image: &Path,
) -> Checked {
    let work = dir.join("reference.img");
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&work)
        .unwrap();
    file.set_len(size).unwrap();
    let mut target = ImageFile::new(file);
    let mut summary = ReplaySummary::default();
    let mut reader = LogReader::new(FsDir::existing(reference).unwrap(), Seq::ZERO);
    let mut next = reader.next_record().unwrap();
    let check = dir.join("point.img");
    let (mut compared, mut fscked) = (0, 0);
    for point in points {
        while let Some(record) = next.take_if(|r| r.header.seq <= point.seq) {
            apply(&record, DiskId(0), &mut target, &mut summary).unwrap();
            next = reader.next_record().unwrap();
        }
        let view = group.reader(Some(point.seq)).unwrap();
        let reference = fs::File::open(&work).unwrap();
        let out = fs::File::create(&check).unwrap();
        out.set_len(size).unwrap();
        let mut want = vec![0u8; 4 << 20];
        let mut got = vec![0u8; 4 << 20];
        let mut at = 0u64;
        while at < size {
            reference.read_exact_at(&mut want, at).unwrap();
            view.read(DiskId(0), at, &mut got).unwrap();
            if let Some(i) = want.iter().zip(&got).position(|(a, b)| a != b) {
                panic!(
                    "point {} differs from the reference replay at byte {}",
                    point.seq,
                    at + i as u64
                );
            }
            out.write_all_at(&got, at).unwrap();
            at += want.len() as u64;
        }
        compared += 1;
        if point.seq == marker {
            let copied = Command::new("cp")
                .arg("--sparse=always")
                .arg(&check)
                .arg(marker_image)
                .status()
                .unwrap();
            assert!(copied.success(), "copying the marker's point");
        }
        if point.seq < marker {
            continue; // mkfs is still running: no filesystem yet
        }
        check_ext4(&check, &format!("point {}", point.seq));
        fscked += 1;
    }
    assert_eq!(compared, points.len());
    Checked { compared, fscked }
}

/// Replays the ext4 journal of the image at `path` as a mount would after a
/// crash (exit 1 means "recovered", which is what a journal replay
/// reports), then checks the filesystem with `e2fsck -fn`; `what` names
/// the image in a failure.
pub(crate) fn check_ext4(path: &Path, what: &str) {
    let replayed = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        matches!(replayed.status.code(), Some(0 | 1)),
        "journal replay of {what} failed: {}",
        String::from_utf8_lossy(&replayed.stdout)
    );
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "the filesystem of {what} is not consistent:\n{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}
