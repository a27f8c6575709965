//! Tests of the storage engines: scenario tests here, the differential
//! property test in `differential`, concurrency in `concurrent`, a real
//! block device in `loop_device`.

mod concurrent;
mod differential;
mod loop_device;
mod strict;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::*;

/// Creates `name` in `dir`, `size` bytes of a pattern derived from `seed`,
/// and returns its path and contents.
pub(super) fn image(dir: &Path, name: &str, size: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let mut bytes = vec![0; size];
    StdRng::seed_from_u64(seed).fill_bytes(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("write test image");
    (path, bytes)
}

pub(super) fn options(direct_io: DirectIo) -> BackingOptions {
    BackingOptions {
        direct_io,
        queue_depth: 16,
        ..BackingOptions::default()
    }
}

fn engines(path: &Path, opts: &BackingOptions) -> Vec<Box<dyn BlockDevice>> {
    vec![
        Box::new(SyncEngine::open(path, opts).expect("open sync")),
        Box::new(UringEngine::open(path, opts).expect("open io_uring")),
    ]
}

#[test]
fn open_backing_detects_a_file_and_prefers_io_uring_and_o_direct() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = image(dir.path(), "disk.img", 1 << 20, 1);
    let dev = open_backing(&path, &BackingOptions::default()).unwrap();
    let info = dev.info();
    eprintln!("image file: {info:?}");
    assert_eq!(info.kind, BackingKind::File);
    assert_eq!(dev.size(), 1 << 20);
    assert_eq!(info.engine, "io_uring");
    assert!(dev.supports_holes());
    if !info.direct_io {
        eprintln!(
            "note: {} refuses O_DIRECT; only buffered I/O was checked",
            dir.path().display()
        );
    } else {
        assert!(
            info.block_size.is_power_of_two() && info.block_size >= 512,
            "{info:?}"
        );
    }
}

#[test]
fn out_of_range_requests_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * 1024;
    let (path, _) = image(dir.path(), "disk.img", size, 2);
    let size = size as u64;
    for dev in engines(&path, &options(DirectIo::Auto)) {
        let mut buf = [0u8; 2];
        let cases = [
            (size - 1, 2),
            (size + 1, 0),
            (u64::MAX - 1, 2),
            (u64::MAX, 1),
        ];
        for (offset, len) in cases {
            let buf = &mut buf[..len as usize];
            let expect = |r: Result<(), StorageError>, op: Op, errno: u32| match r {
                Err(e @ StorageError::OutOfRange { .. }) => {
                    assert_eq!(e.errno(), errno, "{e}");
                    assert!(matches!(e, StorageError::OutOfRange { op: o, .. } if o == op));
                }
                other => panic!("{op} at {offset}+{len}: expected OutOfRange, got {other:?}"),
            };
            expect(dev.read_at(buf, offset), Op::Read, 22);
            expect(dev.write_at(buf, offset), Op::Write, 28);
            expect(dev.write_zeroes(offset, len), Op::WriteZeroes, 28);
            expect(dev.trim(offset, len), Op::Trim, 22);
        }
        // Empty requests at the very end are fine.
        dev.read_at(&mut [], size).unwrap();
        dev.write_at(&[], size).unwrap();
        dev.write_zeroes(size, 0).unwrap();
        dev.trim(size, 0).unwrap();
    }
}

#[test]
fn read_only_refuses_modifications() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = image(dir.path(), "disk.img", 8192, 3);
    let opts = BackingOptions {
        read_only: true,
        ..options(DirectIo::Auto)
    };
    for dev in engines(&path, &opts) {
        assert!(dev.info().read_only);
        let e = dev.write_at(b"x", 0).unwrap_err();
        assert!(
            matches!(e, StorageError::ReadOnly { op: Op::Write }),
            "{e:?}"
        );
        assert_eq!(e.errno(), 1);
        assert!(matches!(
            dev.trim(0, 512),
            Err(StorageError::ReadOnly { op: Op::Trim })
        ));
        let mut buf = vec![0; 100];
        dev.read_at(&mut buf, 4000).unwrap();
        assert_eq!(buf, bytes[4000..4100]);
    }
}

#[test]
fn direct_io_falls_back_when_the_size_is_not_block_aligned() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = image(dir.path(), "odd.img", 4096 + 100, 4);
    let dev = SyncEngine::open(&path, &options(DirectIo::Auto)).unwrap();
    assert!(!dev.info().direct_io);
    let mut buf = vec![0; 150];
    dev.read_at(&mut buf, 4046).unwrap();
    assert_eq!(buf, bytes[4046..]);

    match UringEngine::open(&path, &options(DirectIo::Required)) {
        Err(StorageError::DirectIoUnavailable { reason, .. }) => {
            assert!(reason.contains("not a multiple"), "{reason}");
        }
        other => panic!("expected DirectIoUnavailable, got {other:?}"),
    }
}

#[test]
fn forced_buffered_io_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = image(dir.path(), "disk.img", 8192, 5);
    for dev in engines(&path, &options(DirectIo::Off)) {
        assert!(!dev.info().direct_io);
    }
}

#[test]
fn only_files_and_block_devices_are_accepted() {
    let opts = BackingOptions {
        read_only: true,
        ..BackingOptions::default()
    };
    for path in ["/dev/null", "/"] {
        match open_backing(Path::new(path), &opts) {
            Err(e @ StorageError::UnsupportedKind { .. }) => assert_eq!(e.errno(), 5),
            other => panic!(
                "{path}: expected UnsupportedKind, got {other:?}",
                other = other.err()
            ),
        }
    }
    let missing = open_backing(Path::new("/nonexistent/disk.img"), &opts);
    assert!(matches!(missing, Err(StorageError::Open { .. })));
}

#[test]
fn trim_deallocates_file_space_and_reads_as_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let (path, mut model) = image(dir.path(), "disk.img", size, 6);
    for dev in engines(&path, &options(DirectIo::Auto)) {
        dev.flush().unwrap();
        let before = std::fs::metadata(&path).unwrap().blocks();
        dev.trim(1 << 20, 2 << 20).unwrap();
        dev.flush().unwrap();
        let after = std::fs::metadata(&path).unwrap().blocks();
        // ext4, xfs, btrfs, tmpfs all punch holes; the blocks must go.
        assert!(
            after + 2 * 2048 <= before,
            "blocks before {before}, after {after}"
        );
        model[1 << 20..3 << 20].fill(0);
        let mut back = vec![1; size];
        dev.read_at(&mut back, 0).unwrap();
        assert!(back == model, "{} disagrees after trim", dev.info().engine);
        // Write the range again for the next engine.
        dev.write_at(&vec![7; 2 << 20], 1 << 20).unwrap();
        model[1 << 20..3 << 20].fill(7);
    }
}

#[test]
fn write_zeroes_keeps_space_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let size = 2 << 20;
    let (path, _) = image(dir.path(), "disk.img", size, 7);
    let dev = UringEngine::open(&path, &options(DirectIo::Auto)).unwrap();
    dev.flush().unwrap();
    let before = std::fs::metadata(&path).unwrap().blocks();
    dev.write_zeroes(4096, 1 << 20).unwrap();
    dev.flush().unwrap();
    let after = std::fs::metadata(&path).unwrap().blocks();
    assert!(after >= before - 8, "blocks before {before}, after {after}");
    let mut back = vec![1; 1 << 20];
    dev.read_at(&mut back, 4096).unwrap();
    assert!(back.iter().all(|&b| b == 0));
}

#[test]
fn a_failed_flush_poisons_the_device() {
    let dev = strict::device(64 * 1024, 4096, true);
    dev.raw().fail_next_sync();
    assert!(matches!(dev.flush(), Err(StorageError::Flush { .. })));
    // The next sync would succeed, but the engine must not pretend.
    assert!(matches!(dev.flush(), Err(StorageError::Poisoned)));
    assert_eq!(StorageError::Poisoned.errno(), 5);
}

#[test]
fn kernel_errors_are_reported_with_their_source() {
    let dev = strict::device(64 * 1024, 4096, true);
    dev.raw().fail_io(libc::ENOSPC);
    let e = dev.write_at(&[1; 10], 100).unwrap_err();
    assert!(
        matches!(
            e,
            StorageError::Io {
                op: Op::Write,
                offset: 100,
                len: 10,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.errno(), 28);
}

#[test]
fn uring_engine_survives_many_open_close_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bytes) = image(dir.path(), "disk.img", 64 * 1024, 9);
    for i in 0..50 {
        let dev = UringEngine::open(&path, &options(DirectIo::Auto)).unwrap();
        let mut buf = [0u8; 3];
        dev.read_at(&mut buf, i * 7).unwrap();
        assert_eq!(buf, bytes[i as usize * 7..i as usize * 7 + 3]);
    }
}
