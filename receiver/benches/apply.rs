//! Throughput of the replica store's paths, in one run:
//!
//! - initial sync: chunks written in place;
//! - apply: 64 KiB writes of a consistent group into the journal, with a
//!   barrier (a recovery point) every 16 writes, then the commit;
//! - reading a disk as of the oldest point (journal over the image);
//! - digests of the newest state (what a resync compares);
//! - folding every point but the newest into the image.
//!
//! Run: `cargo bench -p tidemark-receiver --bench apply` (set
//! `STORE_BENCH_DIR` to measure another filesystem than /tmp).

use std::time::{Duration, Instant};
use tidemark_changelog::{DiskId, Entry, Record};
use tidemark_receiver::store::{ChunkRef, Disk, Purpose, ReplicaGroup, Retention};

const DISK: u64 = 256 << 20;
const WRITE: usize = 64 << 10;
const WRITES: u64 = 2048;

fn mbps(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / 1e6 / t.as_secs_f64()
}

fn main() {
    let base = std::env::var("STORE_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
    let dir = tempfile::tempdir_in(base).expect("a scratch directory");
    let mut g = ReplicaGroup::open(dir.path()).expect("a new group");
    g.set_retention(Retention {
        window: Duration::MAX,
        ..Retention::default()
    });
    g.ensure_disks(&[Disk {
        id: DiskId(0),
        name: tidemark_names::Name::from_static("bench"),
        size: DISK,
    }])
    .unwrap();

    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 253) as u8).collect();
    let t = Instant::now();
    for at in (0..DISK).step_by(chunk.len()) {
        g.apply_chunk(DiskId(0), at, ChunkRef::Data(&chunk), Purpose::InitialSync)
            .unwrap();
    }
    g.commit().unwrap();
    println!(
        "initial sync, 1 MiB chunks in place + commit: {:.0} MB/s",
        mbps(DISK, t.elapsed())
    );

    let data: Vec<u8> = (0..WRITE).map(|i| (i * 31 % 251) as u8).collect();
    let mut seq = 0u64;
    let records: Vec<Record> = (0..WRITES)
        .flat_map(|i| {
            let offset = (i * 3 * WRITE as u64) % DISK;
            let mut out = vec![Entry::write(0, offset, &data, 0)];
            if i % 16 == 15 {
                out.push(Entry::barrier(1 + i));
            }
            out.into_iter()
                .map(|e| {
                    seq += 1;
                    Record::decode(&e.encode(seq, 0)).unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let bytes = WRITES * WRITE as u64;
    let t = Instant::now();
    for r in &records {
        g.apply_record(r).unwrap();
    }
    let applied = t.elapsed();
    g.commit().unwrap();
    let total = t.elapsed();
    println!(
        "apply, 64 KiB writes into the journal ({} points): {:.0} MB/s; with the commit {:.0} MB/s",
        g.points().len(),
        mbps(bytes, applied),
        mbps(bytes, total)
    );

    let oldest = g.points()[0].seq;
    let t = Instant::now();
    let view = g.view(Some(oldest)).unwrap();
    let built = t.elapsed();
    let mut buf = vec![0u8; 1 << 20];
    for at in (0..DISK).step_by(buf.len()) {
        view.read(DiskId(0), at, &mut buf).unwrap();
    }
    println!(
        "read the whole disk as of the oldest point: {:.0} MB/s (view built in {:.1} ms)",
        mbps(DISK, t.elapsed()),
        built.as_secs_f64() * 1e3
    );

    let t = Instant::now();
    let digests = g.digests(DiskId(0), 0, DISK, 1 << 20).unwrap();
    println!(
        "digests (BLAKE3, 1 MiB blocks) of the newest state: {:.0} MB/s ({} blocks)",
        mbps(DISK, t.elapsed()),
        digests.len()
    );

    g.set_retention(Retention {
        window: Duration::MAX,
        max_points: 1,
        max_space: None,
        fold_interval: Duration::ZERO,
    });
    let history = g.history_bytes();
    let t = Instant::now();
    let report = g.apply_retention(0, true).unwrap().expect("a fold");
    println!(
        "fold of {} points ({:.0} MB of history) into the image: {:.0} MB/s",
        report.points,
        history as f64 / 1e6,
        mbps(history, t.elapsed())
    );
}
