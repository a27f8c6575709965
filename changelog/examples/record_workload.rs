//! Records a synthetic disk workload into a change log, the way the tracker
//! will: writes, zeroes and trims of one disk, a barrier every few writes, an
//! application-consistent marker. It also writes the image the disk ends
//! with, so a replay of the log can be compared with it.
//!
//! Usage: `record_workload LOG_DIR SOURCE_IMAGE [SIZE_MIB]`

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use std::fs::File;
use std::os::unix::fs::FileExt;
use tidemark_changelog::{now_ns, ChangeLog, DiskId, Entry, FsDir, LogOptions, RecoveryPolicy};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: {} LOG_DIR SOURCE_IMAGE [SIZE_MIB]", args[0]);
        std::process::exit(2);
    }
    let size_mib: u64 = args.get(3).map_or(Ok(64), |s| s.parse())?;
    let size = size_mib << 20;
    let (mut log, _) = ChangeLog::open(
        FsDir::create_all(args[1].as_ref())?,
        LogOptions::default(),
        RecoveryPolicy::CleanStop { last_seq: None },
        now_ns(),
    )?;
    let image = File::create(&args[2])?;
    image.set_len(size)?;
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let mut rand = move || rng.next_u64();
    let (mut writes, mut barriers, mut bytes) = (0u64, 0u64, 0u64);
    for i in 0..4000u64 {
        let block = 4096 * (1 + rand() % 16);
        let offset = (rand() % (size / 4096)) * 4096;
        let len = block.min(size - offset);
        match rand() % 20 {
            0 => {
                log.append(&Entry::trim(DiskId(0), offset, len, now_ns()))?;
                image.write_all_at(&vec![0u8; len as usize], offset)?;
            }
            1 => {
                log.append(&Entry::write_zeroes(
                    DiskId(0),
                    offset,
                    len,
                    false,
                    now_ns(),
                ))?;
                image.write_all_at(&vec![0u8; len as usize], offset)?;
            }
            _ => {
                let data: Vec<u8> = (0..len)
                    .map(|j| (j as u8).wrapping_mul(31) ^ (i as u8))
                    .collect();
                log.append(&Entry::write(DiskId(0), offset, &data, now_ns()))?;
                image.write_all_at(&data, offset)?;
                writes += 1;
                bytes += len;
            }
        }
        if i % 25 == 24 {
            log.barrier(now_ns())?;
            barriers += 1;
        }
        if i == 2000 {
            log.append(&Entry::marker("halfway", true, now_ns()))?;
        }
    }
    log.barrier(now_ns())?;
    image.sync_all()?;
    println!(
        "recorded {writes} writes ({} MiB) and {} barriers into {}",
        bytes >> 20,
        barriers + 1,
        args[1]
    );
    Ok(())
}
