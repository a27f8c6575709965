//! A small load generator comparing the engines: random 4 KiB O_DIRECT reads
//! and writes from several threads. Ignored by default (it measures, it does
//! not check); run with
//! `cargo test --release -p tidemark-tracker --lib storage::tests::throughput -- --ignored --nocapture`.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::{options, Rng};
use crate::storage::{AlignedBuf, BlockDevice, DirectIo, SyncEngine, UringEngine};

const SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
const RUN: Duration = Duration::from_secs(2);

fn load(dev: &Arc<dyn BlockDevice>, threads: u64, write: bool) -> f64 {
    let start = Instant::now();
    let ops: u64 = (0..threads)
        .map(|t| {
            let dev = Arc::clone(dev);
            thread::spawn(move || {
                let mut rng = Rng::new(t + 1);
                let mut buf = AlignedBuf::page_aligned(BLOCK);
                rng.fill(&mut buf);
                let mut ops = 0u64;
                while start.elapsed() < RUN {
                    let offset = rng.below(SIZE / BLOCK as u64) * BLOCK as u64;
                    if write {
                        dev.write_at(&buf, offset).unwrap();
                    } else {
                        dev.read_at(&mut buf, offset).unwrap();
                    }
                    ops += 1;
                }
                ops
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    ops as f64 / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "measurement, not a check"]
fn storage_engine_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.img");
    {
        // Real data, so reads reach the disk rather than a hole.
        let file = std::fs::File::create(&path).unwrap();
        let mut chunk = vec![0u8; 1 << 20];
        Rng::new(9).fill(&mut chunk);
        for i in 0..SIZE >> 20 {
            std::os::unix::fs::FileExt::write_all_at(&file, &chunk, i << 20).unwrap();
        }
        file.sync_all().unwrap();
    }
    let opts = options(DirectIo::Required);
    for threads in [1, 4, 16] {
        for write in [false, true] {
            let sync: Arc<dyn BlockDevice> = Arc::new(SyncEngine::open(&path, &opts).unwrap());
            let sync_iops = load(&sync, threads, write);
            let uring = Arc::new(UringEngine::open(&path, &opts).unwrap());
            let uring_iops = load(
                &(Arc::clone(&uring) as Arc<dyn BlockDevice>),
                threads,
                write,
            );
            let stats = uring.stats();
            eprintln!(
                "{threads:>2} threads, 4 KiB random {}: sync {sync_iops:>8.0} IOPS, \
                 io_uring {uring_iops:>8.0} IOPS ({:.2} SQEs per submit, max {})",
                if write { "writes" } else { "reads " },
                stats.sqes as f64 / stats.submit_calls.max(1) as f64,
                stats.max_batch,
            );
        }
    }
}
