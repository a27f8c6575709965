//! What the end-to-end suites of receivers on the Ceph testbed share
//! (`ceph_takeover.rs`, `ceph_outage.rs`): a paced writer on the tracker's
//! disk, a temporary directory kept when a test fails, and the final check
//! of a group in the cluster: its head reads as the source disk, every
//! point it lists as the tracker's change log replayed up to it.

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tidemark_ceph::testbed;
use tidemark_changelog::replay::{apply, MemoryImage, ReplaySummary};
use tidemark_changelog::{DiskId, FsDir, LogReader, Seq};
use tidemark_e2e::qemu_io;
use tidemark_names::Name;
use tidemark_receiver::store::ceph::CephEngine;

/// The disk's size.
pub(crate) const SIZE: u64 = 4 << 20;

/// A temporary directory, kept (and named on stderr) when the test panics.
pub(crate) struct KeepOnPanic(
    pub(crate) Option<tempfile::TempDir>,
    pub(crate) &'static str,
);

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(t) = self.0.take() {
                eprintln!("{}: kept {} for inspection", self.1, t.keep().display());
            }
        }
    }
}

/// Writes batches of random writes and zeroes, each ended by a flush, to
/// the disk at `uri` every 50–150 ms until `stop`; counts them in `done`
/// (a batch that fails panics: the tracker must always serve).
pub(crate) fn writer(uri: String, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> u64 {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    while !stop.load(Ordering::Relaxed) {
        let mut cmds = Vec::new();
        for _ in 0..2 + next(5) {
            let len = 512 * (1 + next(64));
            let offset = 512 * next((SIZE - len) / 512 + 1);
            cmds.push(match next(10) {
                0 => format!("write -z {offset} {len}"),
                _ => format!("write -P {} {offset} {len}", 1 + next(255)),
            });
        }
        cmds.push("flush".into());
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&uri, &cmds);
        done.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50 + next(100)));
    }
    done.load(Ordering::Relaxed)
}

/// Reads `host`'s group `default` from the cluster (no receiver running):
/// its position is `last`, its head reads as `image`, and every point it
/// lists as the change log in `log_dir` replayed up to it. Returns the
/// points checked.
pub(crate) fn check_group(
    tb: &testbed::Testbed,
    namespace: &str,
    host: &str,
    image: &Path,
    log_dir: &Path,
    last: u64,
) -> Vec<u64> {
    let cluster = tb.connect(namespace, Duration::from_secs(30)).unwrap();
    let engine = CephEngine::new(cluster, "ceph-e2e-check");
    let group = engine
        .open_group_read_only(
            &Name::new(host.to_owned()).unwrap(),
            &Name::from_static("default"),
        )
        .unwrap();
    assert_eq!(group.position().durable_seq, Seq(last));
    let source = fs::read(image).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    group
        .view(None)
        .unwrap()
        .read(DiskId(0), 0, &mut got)
        .unwrap();
    assert!(got == source, "the replica differs from the source disk");

    let points: Vec<u64> = group.points().iter().map(|p| p.seq.get()).collect();
    assert!(!points.is_empty());
    let mut reader = LogReader::new(FsDir::existing(log_dir).unwrap(), Seq(1));
    let mut reference = MemoryImage(vec![0u8; SIZE as usize]);
    let mut summary = ReplaySummary::default();
    let mut pending = None;
    for &seq in &points {
        loop {
            let record = match pending.take() {
                Some(r) => r,
                None => reader
                    .next_record()
                    .unwrap()
                    .unwrap_or_else(|| panic!("the log ends before point {seq}")),
            };
            if record.header.seq.get() > seq {
                pending = Some(record);
                break;
            }
            apply(&record, DiskId(0), &mut reference, &mut summary).unwrap();
            if record.header.seq.get() == seq {
                break;
            }
        }
        group
            .view(Some(Seq(seq)))
            .unwrap()
            .read(DiskId(0), 0, &mut got)
            .unwrap();
        assert!(
            got == reference.0,
            "point {seq} differs from the reference replay"
        );
    }
    points
}
