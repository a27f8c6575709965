//! Several threads through one engine at once. Each thread owns a region
//! whose boundaries fall *inside* logical blocks, so neighbours share edge
//! blocks: under O_DIRECT their partial-block read-modify-writes race unless
//! the edge stripes serialise them. The regions are disjoint, as the write
//! path's range lock guarantees; the result must equal every thread's model.

use std::sync::Arc;
use std::thread;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{image, options};
use crate::storage::{BlockDevice, DirectIo, SyncEngine, UringEngine};

const THREADS: u64 = 8;
/// Deliberately not a multiple of any block size.
const REGION: u64 = (192 << 10) + 1001;
const ROUNDS: usize = 400;

fn region(t: u64) -> (u64, u64) {
    (7 + t * REGION, REGION)
}

fn hammer(dev: Arc<dyn BlockDevice>, initial: &[u8]) -> Vec<u8> {
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let dev = Arc::clone(&dev);
            let (start, len) = region(t);
            let mut model = initial[start as usize..(start + len) as usize].to_vec();
            thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(1000 + t);
                let mut buf = vec![0u8; 64 << 10];
                for round in 0..ROUNDS {
                    // Half the requests hug a region boundary, where the
                    // block is shared with the neighbour.
                    let (at, n) = match rng.random_range(0..4) {
                        0 => (rng.random_range(0..600), 1 + rng.random_range(0..600)),
                        1 => {
                            let n = 1 + rng.random_range(0..600);
                            (len - n - rng.random_range(0..600 - n + 1).min(len - n), n)
                        }
                        _ => {
                            let at = rng.random_range(0..len);
                            (at, 1 + rng.random_range(0..(len - at).min(64 << 10)))
                        }
                    };
                    let offset = start + at;
                    let range = at as usize..(at + n) as usize;
                    match rng.random_range(0..10) {
                        0 => {
                            dev.write_zeroes(offset, n).unwrap();
                            model[range].fill(0);
                        }
                        1 => {
                            dev.trim(offset, n).unwrap();
                            model[range].fill(0);
                        }
                        2 | 3 => {
                            let out = &mut buf[..n as usize];
                            dev.read_at(out, offset).unwrap();
                            assert!(
                                *out == model[range],
                                "thread {t} round {round}: read differs"
                            );
                        }
                        4 if round % 20 == 0 => dev.flush().unwrap(),
                        _ => {
                            let data = &mut buf[..n as usize];
                            rng.fill(data);
                            dev.write_at(data, offset).unwrap();
                            model[range].copy_from_slice(data);
                        }
                    }
                }
                model
            })
        })
        .collect();
    let mut expected = initial.to_vec();
    for (t, worker) in workers.into_iter().enumerate() {
        let model = worker.join().expect("worker panicked");
        let (start, len) = region(t as u64);
        expected[start as usize..(start + len) as usize].copy_from_slice(&model);
    }
    dev.flush().unwrap();
    let mut whole = vec![0; initial.len()];
    dev.read_at(&mut whole, 0).unwrap();
    assert!(
        whole == expected,
        "{}: contents differ after concurrent use",
        dev.info().engine
    );
    expected
}

fn size() -> usize {
    ((7 + THREADS * REGION + 100).div_ceil(4096) * 4096) as usize
}

#[test]
fn storage_uring_concurrent_disjoint_writers_direct() {
    let dir = tempfile::tempdir().unwrap();
    let (path, initial) = image(dir.path(), "disk.img", size(), 11);
    let engine = Arc::new(UringEngine::open(&path, &options(DirectIo::Auto)).unwrap());
    if !engine.info().direct_io {
        eprintln!(
            "note: {} refuses O_DIRECT; concurrency ran buffered",
            dir.path().display()
        );
    }
    let expected = hammer(Arc::clone(&engine) as Arc<dyn BlockDevice>, &initial);
    let stats = engine.stats();
    eprintln!("io_uring batching with {THREADS} threads: {stats:?}");
    assert!(stats.requests >= THREADS * ROUNDS as u64);
    drop(engine);
    assert!(std::fs::read(&path).unwrap() == expected);
}

#[test]
fn storage_uring_concurrent_disjoint_writers_buffered() {
    let dir = tempfile::tempdir().unwrap();
    let (path, initial) = image(dir.path(), "disk.img", size(), 12);
    let engine = Arc::new(UringEngine::open(&path, &options(DirectIo::Off)).unwrap());
    let expected = hammer(engine, &initial);
    assert!(std::fs::read(&path).unwrap() == expected);
}

#[test]
fn storage_sync_concurrent_disjoint_writers_direct() {
    let dir = tempfile::tempdir().unwrap();
    let (path, initial) = image(dir.path(), "disk.img", size(), 13);
    let engine = Arc::new(SyncEngine::open(&path, &options(DirectIo::Auto)).unwrap());
    let expected = hammer(engine, &initial);
    assert!(std::fs::read(&path).unwrap() == expected);
}
