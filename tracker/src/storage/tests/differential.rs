//! The differential property test (STYLE §4): random sequences of
//! read / write / write-zeroes / trim / flush, with unaligned offsets,
//! lengths and buffers and requests near and past the end, applied to
//!
//! - the synchronous engine on one image file (the oracle),
//! - the io_uring engine on another,
//! - the shared alignment logic on a strict in-memory O_DIRECT device,
//! - the [`MemoryDevice`],
//!
//! and to a plain `Vec<u8>` model. After every read and at the end, all
//! agree byte for byte, and every error agrees in kind and errno.

use proptest::prelude::*;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::{image, options, strict};
use crate::storage::{
    AlignedBuf, BlockDevice, DirectIo, MemoryDevice, StorageError, SyncEngine, UringEngine,
};

/// 1 MiB + 64 KiB: a multiple of 4096, so O_DIRECT stays on.
const SIZE: u64 = (1 << 20) + (64 << 10);
const MAX_LEN: u64 = 256 << 10;

#[derive(Debug, Clone)]
enum Action {
    Write {
        offset: u64,
        len: u64,
        misalign: usize,
        seed: u64,
    },
    Read {
        offset: u64,
        len: u64,
        misalign: usize,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    Flush,
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..=SIZE,
        (0..=SIZE / 512).prop_map(|b| b * 512),
        (0..=SIZE / 4096).prop_map(|b| b * 4096),
        (0..=MAX_LEN + 8192).prop_map(|d| SIZE.saturating_sub(d)),
    ]
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..=600u64,
        0..=MAX_LEN,
        (0..=MAX_LEN / 4096).prop_map(|b| b * 4096),
        (1..=MAX_LEN / 512).prop_map(|b| b * 512),
    ]
}

fn misalign() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(1), Just(512), 0..4096usize]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (offset(), len(), misalign(), any::<u64>())
            .prop_map(|(offset, len, misalign, seed)| Action::Write { offset, len, misalign, seed }),
        3 => (offset(), len(), misalign())
            .prop_map(|(offset, len, misalign)| Action::Read { offset, len, misalign }),
        1 => (offset(), len()).prop_map(|(offset, len)| Action::WriteZeroes { offset, len }),
        1 => (offset(), len()).prop_map(|(offset, len)| Action::Trim { offset, len }),
        1 => Just(Action::Flush),
    ]
}

/// The model's answer to a request's bounds.
fn in_range(offset: u64, len: u64) -> bool {
    offset.checked_add(len).is_some_and(|end| end <= SIZE)
}

/// Every participant must agree with the model on success or failure, and
/// fail only with OutOfRange, with the model's errno.
fn agree(name: &str, result: &Result<(), StorageError>, ok: bool, errno: u32, action: &Action) {
    match result {
        Ok(()) => assert!(ok, "{name} accepted out-of-range {action:?}"),
        Err(e @ StorageError::OutOfRange { .. }) => {
            assert!(!ok, "{name} refused in-range {action:?}: {e}");
            assert_eq!(e.errno(), errno, "{name}: {action:?}");
        }
        Err(e) => panic!("{name} failed {action:?}: {e:?}"),
    }
}

fn run(
    direct_io: DirectIo,
    strict_align: u64,
    strict_fallocate: bool,
    image_seed: u64,
    actions: &[Action],
) {
    let dir = tempfile::tempdir().unwrap();
    let (sync_path, mut model) = image(dir.path(), "sync.img", SIZE as usize, image_seed);
    let (uring_path, _) = image(dir.path(), "uring.img", SIZE as usize, image_seed);
    let opts = options(direct_io);
    let sync = SyncEngine::open(&sync_path, &opts).unwrap();
    let uring = UringEngine::open(&uring_path, &opts).unwrap();
    if direct_io == DirectIo::Auto {
        for dev in [&sync as &dyn BlockDevice, &uring] {
            if !dev.info().direct_io {
                eprintln!(
                    "note: {} refuses O_DIRECT; this case ran buffered",
                    dir.path().display()
                );
            }
        }
    } else {
        assert!(!sync.info().direct_io && !uring.info().direct_io);
    }
    let strict = strict::device(SIZE as usize, strict_align, strict_fallocate);
    let memory = MemoryDevice::new(SIZE);
    strict.write_at(&model, 0).unwrap();
    memory.write_at(&model, 0).unwrap();
    let devices: [(&str, &dyn BlockDevice); 4] = [
        ("sync", &sync),
        ("io_uring", &uring),
        ("strict", &strict),
        ("memory", &memory),
    ];

    // One aligned arena per request; `misalign` shifts the buffer inside it
    // so that both the zero-copy and the bounce path are taken.
    let mut arena = AlignedBuf::page_aligned((MAX_LEN + 8192) as usize);
    for action in actions {
        match *action {
            Action::Write {
                offset,
                len,
                misalign,
                seed,
            } => {
                let data = &mut arena[misalign..misalign + len as usize];
                StdRng::seed_from_u64(seed).fill_bytes(data);
                let ok = in_range(offset, len);
                for (name, dev) in devices {
                    agree(name, &dev.write_at(data, offset), ok, 28, action);
                }
                if ok {
                    model[offset as usize..(offset + len) as usize].copy_from_slice(data);
                }
            }
            Action::Read {
                offset,
                len,
                misalign,
            } => {
                let ok = in_range(offset, len);
                for (name, dev) in devices {
                    let buf = &mut arena[misalign..misalign + len as usize];
                    buf.fill(0xA5);
                    agree(name, &dev.read_at(buf, offset), ok, 22, action);
                    if ok {
                        let want = &model[offset as usize..(offset + len) as usize];
                        assert!(
                            buf == want,
                            "{name} read differs from the model: {action:?}"
                        );
                    }
                }
            }
            Action::WriteZeroes { offset, len } | Action::Trim { offset, len } => {
                let trim = matches!(action, Action::Trim { .. });
                let ok = in_range(offset, len);
                for (name, dev) in devices {
                    let result = if trim {
                        dev.trim(offset, len)
                    } else {
                        dev.write_zeroes(offset, len)
                    };
                    agree(name, &result, ok, if trim { 22 } else { 28 }, action);
                }
                if ok {
                    model[offset as usize..(offset + len) as usize].fill(0);
                }
            }
            Action::Flush => {
                for (name, dev) in devices {
                    dev.flush()
                        .unwrap_or_else(|e| panic!("{name} flush: {e:?}"));
                }
            }
        }
    }

    // The whole device, through each engine and, for the files, straight
    // from the filesystem.
    let mut whole = vec![0; SIZE as usize];
    for (name, dev) in devices {
        dev.flush().unwrap();
        whole.fill(0xA5);
        dev.read_at(&mut whole, 0).unwrap();
        assert!(
            whole == model,
            "{name}: final contents differ from the model"
        );
    }
    drop((sync, uring));
    assert!(
        std::fs::read(&sync_path).unwrap() == model,
        "sync image differs"
    );
    assert!(
        std::fs::read(&uring_path).unwrap() == model,
        "io_uring image differs"
    );
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Regression files would land in src/; failures print the minimal
        // case, which is what goes into a named test.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(64))]

    #[test]
    fn storage_engines_agree_with_o_direct(
        actions in prop::collection::vec(action(), 1..40),
        strict_align in prop_oneof![Just(512u64), Just(4096)],
        strict_fallocate in any::<bool>(),
        image_seed in any::<u64>(),
    ) {
        run(DirectIo::Auto, strict_align, strict_fallocate, image_seed, &actions);
    }
}

proptest! {
    #![proptest_config(config(32))]

    #[test]
    fn storage_engines_agree_buffered(
        actions in prop::collection::vec(action(), 1..40),
        strict_align in prop_oneof![Just(512u64), Just(4096)],
        strict_fallocate in any::<bool>(),
        image_seed in any::<u64>(),
    ) {
        run(DirectIo::Off, strict_align, strict_fallocate, image_seed, &actions);
    }
}

/// Edge cases the random search finds only by luck.
#[test]
fn storage_engines_agree_on_edge_shapes() {
    let last = SIZE - 1;
    let actions = vec![
        Action::Write {
            offset: last,
            len: 1,
            misalign: 3,
            seed: 1,
        },
        Action::Write {
            offset: 0,
            len: 1,
            misalign: 0,
            seed: 2,
        },
        Action::Write {
            offset: 511,
            len: 2,
            misalign: 1,
            seed: 3,
        },
        Action::Write {
            offset: 4095,
            len: 4098,
            misalign: 5,
            seed: 4,
        },
        Action::Write {
            offset: SIZE - MAX_LEN,
            len: MAX_LEN,
            misalign: 0,
            seed: 5,
        },
        Action::Write {
            offset: SIZE - MAX_LEN + 1,
            len: MAX_LEN - 1,
            misalign: 7,
            seed: 6,
        },
        Action::Read {
            offset: 4000,
            len: 9000,
            misalign: 1,
        },
        Action::WriteZeroes {
            offset: 100,
            len: 8000,
        },
        Action::Trim {
            offset: 4097,
            len: 1,
        },
        Action::Trim {
            offset: 8192,
            len: 65536,
        },
        Action::WriteZeroes {
            offset: SIZE - 10,
            len: 10,
        },
        Action::Read {
            offset: 0,
            len: MAX_LEN,
            misalign: 0,
        },
        Action::Read {
            offset: last,
            len: 1,
            misalign: 4095,
        },
        Action::Write {
            offset: last,
            len: 2,
            misalign: 0,
            seed: 7,
        },
        Action::Read {
            offset: SIZE,
            len: 0,
            misalign: 0,
        },
        Action::Flush,
    ];
    for direct in [DirectIo::Auto, DirectIo::Off] {
        for (align, fallocate) in [(512, true), (4096, false)] {
            run(direct, align, fallocate, 42, &actions);
        }
    }
}
