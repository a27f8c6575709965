//! Backing engines side by side: random 4 KiB O_DIRECT reads and writes from
//! 1, 4 and 16 threads through the synchronous engine and the io_uring
//! engine on the same file, printed with their ratio.
//!
//! `cargo bench -p tidemark-tracker --bench engines`
//! (`TIDEMARK_BENCH_DIR` chooses the filesystem; default: the system temp dir.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use tidemark_tracker::storage::{
    AlignedBuf, BackingOptions, BlockDevice, DirectIo, EngineKind, SyncEngine, UringEngine,
};

const SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
const RUN: Duration = Duration::from_secs(2);

fn load(dev: &Arc<dyn BlockDevice>, threads: u64, write: bool) -> f64 {
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dev = Arc::clone(dev);
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t + 1);
                let mut buf = AlignedBuf::page_aligned(BLOCK);
                rng.fill_bytes(&mut buf);
                let mut ops = 0u64;
                while start.elapsed() < RUN {
                    let offset = rng.random_range(0..SIZE / BLOCK as u64) * BLOCK as u64;
                    if write {
                        dev.write_at(&buf, offset).expect("write");
                    } else {
                        dev.read_at(&mut buf, offset).expect("read");
                    }
                    ops += 1;
                }
                ops
            })
        })
        .collect();
    let ops: u64 = handles
        .into_iter()
        .map(|h| h.join().expect("load thread"))
        .sum();
    ops as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let base = std::env::var_os("TIDEMARK_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("temp dir");
    let path = dir.path().join("bench.img");
    {
        // Real data, so reads reach the disk rather than a hole.
        let file = std::fs::File::create(&path).expect("create");
        let mut chunk = vec![0u8; 1 << 20];
        SmallRng::seed_from_u64(9).fill_bytes(&mut chunk);
        for i in 0..SIZE >> 20 {
            std::os::unix::fs::FileExt::write_all_at(&file, &chunk, i << 20).expect("fill");
        }
        file.sync_all().expect("sync");
    }
    let opts = BackingOptions {
        engine: EngineKind::Auto,
        direct_io: DirectIo::Required,
        ..BackingOptions::default()
    };
    println!(
        "{:<28} {:>12} {:>12} {:>8}",
        "4 KiB random, O_DIRECT", "sync IOPS", "uring IOPS", "ratio"
    );
    for threads in [1, 4, 16] {
        for write in [false, true] {
            let sync: Arc<dyn BlockDevice> =
                Arc::new(SyncEngine::open(&path, &opts).expect("sync engine"));
            let sync_iops = load(&sync, threads, write);
            let uring: Arc<dyn BlockDevice> =
                Arc::new(UringEngine::open(&path, &opts).expect("io_uring engine"));
            let uring_iops = load(&uring, threads, write);
            println!(
                "{:<28} {sync_iops:>12.0} {uring_iops:>12.0} {:>8.2}",
                format!("{} x{threads}", if write { "writes" } else { "reads" }),
                uring_iops / sync_iops
            );
        }
    }
}
