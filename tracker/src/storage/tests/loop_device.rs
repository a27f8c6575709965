//! A real block device: a loop device over a temporary file. Needs root and
//! loop support; skips with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{image, options};
use crate::storage::{
    open_backing, BackingKind, BackingOptions, BlockDevice, DirectIo, EngineKind, SyncEngine,
    UringEngine,
};

/// Detaches the loop device when the test ends, however it ends.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<LoopDevice, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        Ok(LoopDevice { path: path.into() })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let status = Command::new("losetup").arg("-d").arg(&self.path).status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("warning: could not detach {}", self.path.display());
        }
    }
}

fn exercise(dev: &dyn BlockDevice, model: &mut [u8], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let size = model.len() as u64;
    let mut buf = vec![0u8; 300 << 10];
    // Aligned, unaligned, and end-of-device shapes.
    let shapes = [
        (0, 4096),
        (513, 10_000),
        (65_536, 256 << 10),
        (size - 4096, 4096),
        (size - 1, 1),
        (1_000_001, 77_777),
    ];
    for (offset, len) in shapes {
        let data = &mut buf[..len as usize];
        rng.fill(data);
        dev.write_at(data, offset).unwrap();
        model[offset as usize..(offset + len) as usize].copy_from_slice(data);
    }
    // Unaligned edges around a BLKZEROOUT / punched interior.
    for (offset, len, trim) in [
        (100, 9000, false),
        (300_000, 1 << 20, true),
        (2_000_003, 4093, true),
        (size - 5000, 5000, false),
        (512, 512, true),
    ] {
        if trim {
            dev.trim(offset, len).unwrap();
        } else {
            dev.write_zeroes(offset, len).unwrap();
        }
        model[offset as usize..(offset + len) as usize].fill(0);
    }
    dev.flush().unwrap();
    for (offset, len) in [
        (0, 300 << 10),
        (250_000, 300 << 10),
        (size - (300 << 10), 300 << 10),
    ] {
        let out = &mut buf[..len as usize];
        dev.read_at(out, offset).unwrap();
        assert!(
            *out == model[offset as usize..(offset + len) as usize],
            "{}: read at {offset} differs",
            dev.info().engine
        );
    }
}

#[test]
fn storage_on_a_loop_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 << 20;
    let (file, mut model) = image(dir.path(), "backing.img", size, 21);
    let device = match LoopDevice::attach(&file) {
        Ok(device) => device,
        Err(why) => {
            eprintln!("SKIPPED storage_on_a_loop_block_device: {why}");
            return;
        }
    };

    let dev = open_backing(&device.path, &BackingOptions::default()).unwrap();
    let info = dev.info().clone();
    eprintln!("loop device: {info:?}");
    assert_eq!(info.kind, BackingKind::BlockDevice);
    assert_eq!(info.size, size as u64, "BLKGETSIZE64");
    assert!(
        info.block_size >= 512 && info.block_size.is_power_of_two(),
        "{info:?}"
    );
    assert!(info.direct_io, "a loop device accepts O_DIRECT: {info:?}");
    assert_eq!(info.engine, "io_uring");
    assert!(!dev.supports_holes());
    exercise(dev.as_ref(), &mut model, 1);
    drop(dev);

    for (engine, direct) in [
        (EngineKind::Sync, DirectIo::Auto),
        (EngineKind::Uring, DirectIo::Off),
        (EngineKind::Sync, DirectIo::Off),
    ] {
        let opts = BackingOptions {
            engine,
            ..options(direct)
        };
        let dev: Box<dyn BlockDevice> = match engine {
            EngineKind::Sync => Box::new(SyncEngine::open(&device.path, &opts).unwrap()),
            _ => Box::new(UringEngine::open(&device.path, &opts).unwrap()),
        };
        assert_eq!(dev.info().direct_io, direct == DirectIo::Auto);
        let mut whole = vec![0; size];
        dev.read_at(&mut whole, 0).unwrap();
        assert!(
            whole == model,
            "{engine:?}/{direct:?}: sees a different device"
        );
        exercise(dev.as_ref(), &mut model, engine as u64 * 10 + direct as u64);
    }

    drop(device);
    assert!(
        std::fs::read(&file).unwrap() == model,
        "backing file differs after detach"
    );
}
