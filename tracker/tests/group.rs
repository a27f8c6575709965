//! The consistency group's write path: one ordered log for many writers,
//! replay equals the device, bitmap mode on overflow, generations and
//! resync-needed extents after an unclean stop.

mod failing_device;

use failing_device::FailingDevice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::Arc;
use tidemark_changelog::replay::{apply, MemoryImage, ReplaySummary};
use tidemark_changelog::{DiskId, FsDir, Kind, LogOptions, LogReader, Record, Seq};
use tidemark_tracker::backend::Backend;
use tidemark_tracker::control::handle_line;
use tidemark_tracker::group::{Group, GroupDisk, GroupOptions, ResizeError, TrackingMode};
use tidemark_tracker::kernel_size::{GrowError, KernelDevice, KernelDevices};
use tidemark_tracker::state::{BitmapCause, FullAt};
use tidemark_tracker::storage::{BlockDevice, MemoryDevice};

const DISK: u64 = 8 << 20;

fn options(dir: &Path, log_limit: u64) -> GroupOptions {
    GroupOptions {
        log_dir: dir.to_path_buf(),
        log: LogOptions {
            segment_size: 1 << 20,
            size_limit: log_limit,
        },
        activity_extent: 1 << 20,
        max_block: 1 << 20,
        resync_all: false,
    }
}

fn open(
    dir: &Path,
    devs: &[Arc<MemoryDevice>],
    log_limit: u64,
) -> (Group, tidemark_tracker::group::OpenReport) {
    open_with(devs, options(dir, log_limit))
}

fn open_with(
    devs: &[Arc<MemoryDevice>],
    opts: GroupOptions,
) -> (Group, tidemark_tracker::group::OpenReport) {
    let (group, report) = Group::open(group_disks(devs), opts).unwrap();
    // As the daemon does once its sockets are bound.
    group.mark_running().unwrap();
    (group, report)
}

/// The devices as disks `disk0`, `disk1`, ...
fn group_disks(devs: &[Arc<MemoryDevice>]) -> Vec<GroupDisk> {
    devs.iter()
        .enumerate()
        .map(|(i, d)| GroupDisk {
            name: tidemark_names::Name::new(format!("disk{i}")).unwrap(),
            export: format!("disk{i}"),
            device: d.clone() as Arc<dyn BlockDevice>,
        })
        .collect()
}

fn records(dir: &Path) -> Vec<Record> {
    let mut reader = LogReader::new(FsDir::existing(dir).unwrap(), Seq::ZERO);
    std::iter::from_fn(|| reader.next_record().unwrap()).collect()
}

fn replay(dir: &Path, disk: DiskId) -> (Vec<u8>, ReplaySummary) {
    let mut image = MemoryImage(vec![0; DISK as usize]);
    let mut summary = ReplaySummary::default();
    for r in records(dir) {
        apply(&r, disk, &mut image, &mut summary).unwrap();
    }
    (image.0, summary)
}

#[test]
fn concurrent_overlapping_writers_give_a_log_that_replays_to_the_device() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [
        Arc::new(MemoryDevice::new(DISK)),
        Arc::new(MemoryDevice::new(DISK)),
    ];
    let (group, report) = open(tmp.path(), &devs, 64 << 20);
    assert!(!report.unclean);
    let group = Arc::new(group);
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let group = group.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(t);
                for i in 0..400u64 {
                    let x: u64 = rng.random();
                    let disk = (x % 2) as u32;
                    // A small hot region so that writes overlap constantly.
                    let offset = (x >> 8) % (256 << 10);
                    let len = 1 + (x >> 40) % 20000;
                    let data = vec![(t * 40 + i % 40) as u8; len as usize];
                    match (x >> 60) % 8 {
                        0 => group.trim(DiskId(disk), offset, len, false).unwrap(),
                        1 => group
                            .write_zeroes(DiskId(disk), offset, len, true, false)
                            .unwrap(),
                        2 => group.flush(DiskId(disk)).unwrap(),
                        3 => group.write(DiskId(disk), offset, &data, true).unwrap(),
                        _ => group.write(DiskId(disk), offset, &data, false).unwrap(),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    group.flush(DiskId(0)).unwrap();
    for (id, dev) in devs.iter().enumerate() {
        let (image, summary) = replay(tmp.path(), DiskId(id as u32));
        assert!(summary.applied > 300, "disk {id}: {summary:?}");
        assert!(
            image == dev.snapshot(),
            "disk {id}: the log does not replay to the device"
        );
    }
    let status = group.status();
    assert_eq!(status.mode, TrackingMode::Data);
    assert_eq!(status.durable_seq.next(), status.next_seq);
    assert!(status.barriers > 100);
    // Sequence numbers are gap-free and the last record is a barrier.
    let recs = records(tmp.path());
    assert!(recs
        .windows(2)
        .all(|w| w[1].header.seq == w[0].header.seq.next()));
    assert_eq!(recs.last().unwrap().header.kind, Kind::Barrier);
}

#[test]
fn an_acknowledged_write_precedes_every_later_one_in_the_log() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    for i in 0..100u64 {
        group
            .write(DiskId(0), i * 4096, &[i as u8; 4096], false)
            .unwrap();
    }
    // Records reach the segment files when the log's buffer is written out.
    group.flush(DiskId(0)).unwrap();
    let offsets: Vec<u64> = records(tmp.path())
        .iter()
        .filter(|r| r.header.kind == Kind::Write)
        .map(|r| r.header.offset)
        .collect();
    assert_eq!(offsets, (0..100).map(|i| i * 4096).collect::<Vec<_>>());
}

#[test]
fn a_full_log_switches_to_bitmap_mode_without_failing_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 2 << 20);
    let data = vec![5u8; 64 << 10];
    for i in 0..64u64 {
        group
            .write(DiskId(0), (i * (64 << 10)) % DISK, &data, false)
            .unwrap();
    }
    let status = group.status();
    match &status.mode {
        TrackingMode::Bitmap { cause } => assert!(
            matches!(cause, BitmapCause::LogFull(FullAt::Append { .. })),
            "{cause:?}"
        ),
        other => panic!("still {other:?}"),
    }
    assert!(status.dirty_extents[0] > 0);
    group.flush(DiskId(0)).unwrap();
    assert!(status.log_bytes <= 2 << 20);
    // Every write landed on the device even though the log was full.
    let snap = devs[0].snapshot();
    assert!(snap[..64 * (64 << 10)].iter().all(|b| *b == 5));
    drop(group);
    // Bitmap mode survives a restart.
    let (group, _) = open(tmp.path(), &devs, 2 << 20);
    assert_eq!(group.status().mode.name(), "bitmap");
}

#[test]
fn an_unclean_stop_starts_a_new_generation_and_records_hot_extents() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [
        Arc::new(MemoryDevice::new(DISK)),
        Arc::new(MemoryDevice::new(DISK)),
    ];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[1; 4096], false).unwrap();
    group.flush(DiskId(0)).unwrap();
    group.write(DiskId(0), 3 << 20, &[2; 4096], false).unwrap();
    group
        .write(DiskId(1), (5 << 20) + 10, &[3; 100], false)
        .unwrap();
    let before = group.status();
    assert_eq!(before.hot_extents, vec![2, 1]);
    // Crash: no clean close.
    drop(group);
    let (group, report) = open(tmp.path(), &devs, 64 << 20);
    assert!(report.unclean);
    assert_eq!(report.generation, 1);
    assert_eq!(
        report.resync_needed,
        vec![
            (DiskId(0), 0, 1 << 20),
            (DiskId(0), 3 << 20, 1 << 20),
            (DiskId(1), 5 << 20, 1 << 20)
        ]
    );
    let recs = records(tmp.path());
    let new_gen: Vec<&Record> = recs.iter().filter(|r| r.header.generation == 1).collect();
    assert_eq!(
        new_gen.len(),
        4,
        "three resync-needed records and a barrier"
    );
    assert!(new_gen[..3]
        .iter()
        .all(|r| r.header.kind == Kind::ResyncNeeded));
    let old_last = recs
        .iter()
        .filter(|r| r.header.generation == 0)
        .map(|r| r.header.seq)
        .max()
        .unwrap();
    assert!(
        new_gen[0].header.seq > report.recovery.max_exposed_seq
            && report.recovery.max_exposed_seq >= old_last,
        "the new generation starts above anything a reader could have seen"
    );
    assert_eq!(group.status().hot_extents, vec![0, 0]);
    group.close_clean().unwrap();
    drop(group);
    let (_, report) = open(tmp.path(), &devs, 64 << 20);
    assert!(!report.unclean);
    assert!(report.resync_needed.is_empty());
    assert_eq!(report.generation, 1);
}

#[test]
fn a_group_that_never_ran_stops_clean_and_takes_no_write_before_it_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[1; 4096], false).unwrap();
    // Crash with a hot extent: the next open is unclean...
    drop(group);
    let (group, report) = Group::open(group_disks(&devs), options(tmp.path(), 64 << 20)).unwrap();
    assert!(report.unclean);
    assert_eq!(report.generation, 1);
    // ... but the start is refused before it runs (a socket could not be
    // bound): nothing may be written, and the stop counts as clean.
    assert!(group.write(DiskId(0), 0, &[2; 4096], false).is_err());
    assert!(group.flush(DiskId(0)).is_err());
    assert!(group
        .marker(&tidemark_names::Label::new("early").unwrap(), false)
        .is_err());
    let before = records(tmp.path()).len();
    group.close_clean().unwrap();
    drop(group);
    assert_eq!(records(tmp.path()).len(), before, "nothing appended");
    let (_, report) = open(tmp.path(), &devs, 64 << 20);
    assert!(!report.unclean, "a start that never ran left a run behind");
    assert_eq!(report.generation, 1);
}

#[test]
fn the_group_takes_the_activity_extent_sizes_the_configuration_takes() {
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    for size in [
        1u64 << 10,
        4 << 10,
        32 << 10,
        64 << 10,
        96 << 10,
        4 << 20,
        1 << 30,
        2 << 30,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let config =
            tidemark_config::tracker::check_activity_extent_size(tidemark_config::ByteSize(size));
        let mut opts = options(tmp.path(), 64 << 20);
        opts.activity_extent = size;
        match (config, Group::open(group_disks(&devs), opts)) {
            (Ok(()), Ok(_)) => {}
            (Err(c), Err(g)) => assert_eq!(c.to_string(), g.to_string(), "{size}"),
            (c, g) => panic!(
                "{size}: the configuration says {c:?}, the group {:?}",
                g.map(|_| ())
            ),
        }
    }
}

#[test]
fn resync_all_records_every_byte_after_a_clean_stop() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [
        Arc::new(MemoryDevice::new(DISK)),
        Arc::new(MemoryDevice::new(DISK / 2)),
    ];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[1; 4096], false).unwrap();
    group.close_clean().unwrap();
    drop(group);
    // Written behind the tracker's back (a failback in place), then:
    let mut opts = options(tmp.path(), 64 << 20);
    opts.resync_all = true;
    let (group, report) = open_with(&devs, opts);
    assert!(report.unclean);
    assert_eq!(report.generation, 1);
    assert_eq!(
        report.resync_needed,
        vec![(DiskId(0), 0, DISK), (DiskId(1), 0, DISK / 2)]
    );
    let recs = records(tmp.path());
    let resync: Vec<_> = recs
        .iter()
        .filter(|r| r.header.kind == Kind::ResyncNeeded)
        .map(|r| (r.header.disk.get(), r.header.offset, r.header.length))
        .collect();
    assert_eq!(resync, vec![(0, 0, DISK), (1, 0, DISK / 2)]);
    group.close_clean().unwrap();
}

#[test]
fn trim_and_write_zeroes_read_as_zeroes_on_the_device_and_in_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[9; 65536], false).unwrap();
    group.trim(DiskId(0), 4096, 8192, false).unwrap();
    group
        .write_zeroes(DiskId(0), 20000, 1000, false, true)
        .unwrap();
    let mut buf = vec![1u8; 65536];
    group.read(DiskId(0), 0, &mut buf).unwrap();
    assert!(buf[4096..12288].iter().all(|b| *b == 0));
    assert!(buf[20000..21000].iter().all(|b| *b == 0));
    assert!(buf[..4096].iter().all(|b| *b == 9));
    let (image, _) = replay(tmp.path(), DiskId(0));
    assert_eq!(&image[..65536], &buf[..]);
}

#[test]
fn a_marker_is_followed_by_a_durable_barrier() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[1; 512], false).unwrap();
    let seq = group
        .marker(&tidemark_names::Label::new("nightly").unwrap(), true)
        .unwrap();
    let recs = records(tmp.path());
    assert_eq!(recs[1].header.seq, seq);
    assert_eq!(recs[1].label(), Some("nightly"));
    assert_eq!(recs[2].header.kind, Kind::Barrier);
    assert_eq!(group.status().durable_seq, recs[2].header.seq);
}

#[test]
fn a_write_larger_than_a_segment_is_split_into_consecutive_records() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    // Segments are 1 MiB: a 3 MiB write needs four records.
    let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i / 4096) as u8).collect();
    group.write(DiskId(0), 4096, &data, true).unwrap();
    assert_eq!(group.status().mode, TrackingMode::Data);
    let recs = records(tmp.path());
    let writes: Vec<&Record> = recs
        .iter()
        .filter(|r| r.header.kind == Kind::Write)
        .collect();
    assert_eq!(writes.len(), 4);
    assert!(writes
        .windows(2)
        .all(|w| w[1].header.seq == w[0].header.seq.next()
            && w[1].header.offset == w[0].header.offset + w[0].header.length));
    let (image, _) = replay(tmp.path(), DiskId(0));
    assert!(image == devs[0].snapshot());
}

#[test]
fn bitmap_mode_returns_to_data_mode_with_resync_needed_records_once_the_log_has_room() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 2 << 20);
    let data = vec![5u8; 64 << 10];
    for i in 0..64u64 {
        group
            .write(DiskId(0), i * (64 << 10), &data, false)
            .unwrap();
    }
    assert_eq!(group.status().mode.name(), "bitmap");
    // Writes in bitmap mode: the extents at 5 MiB and 7 MiB become dirty.
    group
        .write(DiskId(0), 5 << 20, &[7u8; 4096], false)
        .unwrap();
    group
        .write(DiskId(0), 7 << 20, &[8u8; 4096], false)
        .unwrap();
    // The log is still full: nothing changes.
    assert_eq!(group.try_resume_data_mode().unwrap(), None);
    assert_eq!(group.status().mode.name(), "bitmap");

    // The receiver has everything: the cursor frees every segment.
    let dir = FsDir::existing(tmp.path()).unwrap();
    let last = records(tmp.path()).last().unwrap().header.seq;
    tidemark_changelog::write_cursor(&dir, last).unwrap();
    let extents = group
        .try_resume_data_mode()
        .unwrap()
        .expect("back in data mode");
    assert!(extents >= 2, "{extents} extents");
    let status = group.status();
    assert_eq!(status.mode.name(), "data");
    assert!(status.dirty_extents.iter().all(|n| *n == 0));

    let after: Vec<Record> = records(tmp.path())
        .into_iter()
        .filter(|r| r.header.seq > last)
        .collect();
    let resync: Vec<(u64, u64)> = after
        .iter()
        .filter(|r| r.header.kind == Kind::ResyncNeeded)
        .map(|r| (r.header.offset, r.header.length))
        .collect();
    for at in [5u64 << 20, 7 << 20] {
        assert!(
            resync.iter().any(|&(o, l)| o <= at && at < o + l),
            "no resync-needed record covers {at}: {resync:?}"
        );
    }
    assert_eq!(after.last().unwrap().header.kind, Kind::Barrier);
    // Data mode again: the next write is logged.
    group.write(DiskId(0), 0, &[9u8; 4096], false).unwrap();
    group.flush(DiskId(0)).unwrap();
    let newest = records(tmp.path())
        .into_iter()
        .rfind(|r| r.header.kind != Kind::Barrier)
        .unwrap();
    assert_eq!(newest.header.kind, Kind::Write);
    assert_eq!(newest.header.offset, 0);
    drop(group);
    // Data mode survives a restart.
    let (group, _) = open(tmp.path(), &devs, 2 << 20);
    assert_eq!(group.status().mode.name(), "data");
}

#[test]
fn a_spliced_out_disk_is_recorded_whole_as_resync_needed_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [
        Arc::new(MemoryDevice::new(DISK)),
        Arc::new(MemoryDevice::new(DISK / 2)),
    ];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[1; 4096], false).unwrap();
    let seq = group
        .record_resync_all("disk1")
        .unwrap()
        .expect("data mode");
    group.write(DiskId(1), 4096, &[2; 4096], false).unwrap();
    assert!(group.record_resync_all("disk9").is_err());
    group.flush(DiskId(1)).unwrap();
    let recs = records(tmp.path());
    let at = recs.iter().position(|r| r.header.seq == seq).unwrap();
    let r = &recs[at].header;
    assert_eq!(
        (r.kind, r.disk.get(), r.offset, r.length),
        (Kind::ResyncNeeded, 1, 0, DISK / 2)
    );
    // Durable at once, behind a barrier, before the writes that follow.
    assert_eq!(recs[at + 1].header.kind, Kind::Barrier);
    assert!(group.status().durable_seq > seq);
    assert_eq!(recs[at + 2].header.kind, Kind::Write);
    group.close_clean().unwrap();
}

#[test]
fn in_bitmap_mode_a_spliced_out_disk_is_dirty_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 2 << 20);
    let data = vec![5u8; 64 << 10];
    for i in 0..64u64 {
        group
            .write(DiskId(0), i * (64 << 10), &data, false)
            .unwrap();
    }
    assert!(matches!(group.status().mode, TrackingMode::Bitmap { .. }));
    assert_eq!(group.record_resync_all("disk0").unwrap(), None);
    let dirty = group.status().dirty_extents[0];
    assert_eq!(dirty, DISK / tidemark_tracker::group::DIRTY_GRANULARITY);
    group.close_clean().unwrap();
}

#[test]
fn a_hot_extent_cools_only_once_a_durable_barrier_covers_its_write() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[1; 4096], false).unwrap();
    // Cooling runs at most once a second.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    group.flush(DiskId(0)).unwrap();
    // The write is durable now, but the log's watermark on disk (the
    // flush's barrier says what was durable before it) does not cover it
    // yet: a crash recovery could still cut it, so its extent stays hot.
    assert_eq!(group.status().hot_extents, vec![1]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    group.flush(DiskId(0)).unwrap();
    assert_eq!(group.status().hot_extents, vec![0]);
}

/// A log damaged after a clean stop: the group refuses to open, naming the
/// segment, the byte and `tidemark log recover`; the recovery cuts it,
/// keeps the damaged segment aside, and the group then opens in a new
/// generation above every sequence number, every disk resync-needed.
#[test]
fn a_damaged_log_is_refused_until_it_is_recovered_in_a_new_generation() {
    use tidemark_changelog::segment::{parse_segment_name, segment_name};
    use tidemark_changelog::{write_sources, Disk, DiskSource, OpenError};
    use tidemark_tracker::group::GroupError;

    let tmp = tempfile::tempdir().unwrap();
    let devs = [
        Arc::new(MemoryDevice::new(DISK)),
        Arc::new(MemoryDevice::new(DISK)),
    ];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    for i in 0..20u64 {
        group
            .write(DiskId((i % 2) as u32), i * 4096, &[i as u8; 4096], false)
            .unwrap();
        if i % 4 == 3 {
            group.flush(DiskId(0)).unwrap();
        }
    }
    group.close_clean().unwrap();
    drop(group);
    let sources: Vec<DiskSource> = (0..2)
        .map(|id| DiskSource {
            disk: Disk {
                id: DiskId(id),
                name: tidemark_names::Name::new(format!("disk{id}")).unwrap(),
                size: DISK,
            },
            path: format!("/dev/null/{id}").into(),
        })
        .collect();
    write_sources(tmp.path(), &sources).unwrap();
    let last = records(tmp.path()).last().unwrap().header.seq;
    let newest = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| parse_segment_name(e.unwrap().file_name().to_str()?))
        .max()
        .unwrap();
    let path = tmp.path().join(segment_name(newest));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[64 + 30] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let err = Group::open(group_disks(&devs), options(tmp.path(), 64 << 20))
        .err()
        .expect("a damaged log after a clean stop is refused");
    assert!(
        matches!(err, GroupError::Log(OpenError::Damaged { ref segment, offset: 64, .. }) if *segment == segment_name(newest)),
        "{err}"
    );
    assert!(err.to_string().contains("tidemark log recover"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes,
        "the refusal changed the log"
    );

    let report = tidemark_tracker::recover::recover_damaged_log(tmp.path())
        .unwrap()
        .expect("something to recover");
    let cut = report.cut.expect("a cut");
    assert_eq!(
        (cut.segment.clone(), cut.offset),
        (segment_name(newest), 64)
    );
    assert_eq!(
        cut.kept_aside,
        vec![format!("{}.damaged", segment_name(newest))]
    );
    assert_eq!(
        std::fs::read(tmp.path().join(&cut.kept_aside[0])).unwrap(),
        bytes,
        "the damaged segment is kept as it was"
    );
    assert!(report.first_seq > last);
    assert_eq!(
        report.resync_needed,
        vec![(DiskId(0), DISK), (DiskId(1), DISK)]
    );
    // Nothing more to recover.
    assert!(tidemark_tracker::recover::recover_damaged_log(tmp.path())
        .unwrap()
        .is_none());

    let (group, open_report) = open(tmp.path(), &devs, 64 << 20);
    assert!(!open_report.unclean);
    assert_eq!(open_report.generation, report.generation);
    group.write(DiskId(0), 0, &[9; 4096], false).unwrap();
    group.close_clean().unwrap();
    let recs = records(tmp.path());
    let new: Vec<&Record> = recs
        .iter()
        .filter(|r| r.header.generation == report.generation)
        .collect();
    assert!(new.iter().all(|r| r.header.seq > last));
    assert_eq!(
        new.iter()
            .filter(|r| r.header.kind == Kind::ResyncNeeded)
            .map(|r| (r.header.disk.get(), r.header.offset, r.header.length))
            .collect::<Vec<_>>(),
        vec![(0, 0, DISK), (1, 0, DISK)]
    );
}

#[test]
fn a_log_that_ends_before_the_clean_stop_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    let opts = |dir: &Path| GroupOptions {
        log: LogOptions {
            segment_size: 64 << 10,
            size_limit: 64 << 20,
        },
        ..options(dir, 64 << 20)
    };
    let (group, _) = open_with(&devs, opts(tmp.path()));
    for i in 0..40u64 {
        group
            .write(DiskId(0), i * 8192, &[i as u8; 8192], false)
            .unwrap();
    }
    group.close_clean().unwrap();
    drop(group);
    let mut segments: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    assert!(segments.len() > 2);
    // The newest segment gone: what is left checks clean, yet records the
    // clean stop counted are missing.
    std::fs::remove_file(segments.last().unwrap()).unwrap();
    let err = Group::open(group_disks(&devs[..1]), opts(tmp.path()))
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("records are missing at its end"),
        "{err}"
    );
}

#[test]
fn a_failed_device_write_is_followed_by_a_resync_needed_record_of_its_range() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Arc::new(FailingDevice::new(DISK, libc::EIO));
    let disks = vec![GroupDisk {
        name: tidemark_names::Name::new("disk0".to_string()).unwrap(),
        export: "disk0".to_string(),
        device: dev.clone() as Arc<dyn BlockDevice>,
    }];
    let (group, _) = Group::open(disks, options(tmp.path(), 64 << 20)).unwrap();
    group.mark_running().unwrap();
    assert!(group.write(DiskId(0), 4096, &[9; 4096], false).is_err());
    dev.errno.store(0, std::sync::atomic::Ordering::SeqCst);
    group.write(DiskId(0), 4096, &[7; 4096], false).unwrap();
    group.flush(DiskId(0)).unwrap();
    // Never cooled: a crash before the compensation is durable re-reads it.
    assert_eq!(group.status().hot_extents, vec![1]);
    group.close_clean().unwrap();
    let kinds: Vec<_> = records(tmp.path())
        .iter()
        .map(|r| (r.header.kind, r.header.offset, r.header.length))
        .collect();
    assert_eq!(
        kinds[..4],
        [
            (Kind::Write, 4096, 4096),
            (Kind::ResyncNeeded, 4096, 4096),
            (Kind::Write, 4096, 4096),
            (Kind::Barrier, 0, 0),
        ]
    );
}

/// Disks named and ordered as given, on `devs`.
fn named_disks(names: &[&str], devs: &[Arc<MemoryDevice>]) -> Vec<GroupDisk> {
    names
        .iter()
        .zip(devs)
        .map(|(name, d)| GroupDisk {
            name: tidemark_names::Name::new(*name).unwrap(),
            export: name.to_string(),
            device: d.clone() as Arc<dyn BlockDevice>,
        })
        .collect()
}

/// Disk ids are stable: a group reopened with one disk removed, one added
/// first and one moved serves, logs and resyncs every disk under the id it
/// had, the new one under the next id never given, and refuses the
/// removed one's id.
#[test]
fn disks_keep_their_ids_across_removal_addition_and_reordering() {
    let tmp = tempfile::tempdir().unwrap();
    let devs: Vec<_> = (0..3).map(|_| Arc::new(MemoryDevice::new(DISK))).collect();
    let (group, _) = Group::open(
        named_disks(&["a", "b"], &devs[..2]),
        options(tmp.path(), 64 << 20),
    )
    .unwrap();
    group.mark_running().unwrap();
    group.write(DiskId(1), 0, &[1; 4096], false).unwrap();
    group.close_clean().unwrap();
    drop(group);

    // a removed, c added before b.
    let disks = named_disks(&["c", "b"], &[devs[2].clone(), devs[1].clone()]);
    let (group, _) = Group::open(disks, options(tmp.path(), 64 << 20)).unwrap();
    group.mark_running().unwrap();
    let served: Vec<(u32, String)> = group
        .disks()
        .iter()
        .map(|d| (d.disk.id.get(), d.export.clone()))
        .collect();
    assert_eq!(served, [(2, "c".into()), (1, "b".into())]);
    group.write(DiskId(2), 4096, &[2; 4096], false).unwrap();
    group.write(DiskId(1), 8192, &[3; 4096], false).unwrap();
    assert!(group.write(DiskId(0), 0, &[4; 4096], false).is_err());
    assert!(group.write(DiskId(3), 0, &[4; 4096], false).is_err());
    let mut buf = [0u8; 4096];
    group.read(DiskId(2), 4096, &mut buf).unwrap();
    assert_eq!(buf, [2; 4096], "c's id reaches c's device");
    let mut on_c = [0u8; 4096];
    devs[2].read_at(&mut on_c, 4096).unwrap();
    assert_eq!(on_c, [2; 4096]);
    group.flush(DiskId(2)).unwrap();
    let writes: Vec<u32> = records(tmp.path())
        .iter()
        .filter(|r| r.header.kind == Kind::Write)
        .map(|r| r.header.disk.get())
        .collect();
    assert_eq!(writes, [1, 2, 1]);

    // A crash: the hot extents are resynced under each disk's own id.
    drop(group);
    let disks = named_disks(&["c", "b"], &[devs[2].clone(), devs[1].clone()]);
    let (group, report) = Group::open(disks, options(tmp.path(), 64 << 20)).unwrap();
    assert!(report.unclean);
    assert_eq!(
        report.resync_needed,
        [(DiskId(2), 0, 1 << 20), (DiskId(1), 0, 1 << 20)]
    );
    group.close_clean().unwrap();
}

/// A disk served larger than the disks file recorded at the last start
/// (its backing grew while the tracker was stopped): the growth is a record
/// of the log before anything of the new run, so the writes that reach
/// into the grown part come after it; a disk of the same size records
/// nothing.
#[test]
fn a_disk_larger_than_at_the_last_start_is_recorded_as_grown_before_any_write() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [
        Arc::new(MemoryDevice::new(DISK)),
        Arc::new(MemoryDevice::new(DISK)),
    ];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[1; 4096], false).unwrap();
    group.close_clean().unwrap();
    drop(group);
    let sources: Vec<_> = group_disks(&devs)
        .iter()
        .enumerate()
        .map(|(i, d)| tidemark_changelog::DiskSource {
            disk: tidemark_changelog::Disk {
                id: DiskId(i as u32),
                name: d.name.clone(),
                size: DISK,
            },
            path: format!("/dev/disk{i}").into(),
        })
        .collect();
    tidemark_changelog::write_sources(tmp.path(), &sources).unwrap();
    let grown = [Arc::new(MemoryDevice::new(DISK * 2)), devs[1].clone()];
    let before = records(tmp.path()).len();
    let (group, report) = open(tmp.path(), &grown, 64 << 20);
    assert_eq!(report.grown, vec![(DiskId(0), DISK, DISK * 2)]);
    group.write(DiskId(0), DISK, &[2; 4096], false).unwrap();
    group.flush(DiskId(0)).unwrap();
    let after: Vec<Record> = records(tmp.path()).into_iter().skip(before).collect();
    let kinds: Vec<Kind> = after.iter().map(|r| r.header.kind).collect();
    assert_eq!(kinds[..2], [Kind::Grow, Kind::Barrier], "{kinds:?}");
    let grow = &after[0].header;
    assert_eq!(
        (grow.disk, grow.offset, grow.length, grow.version),
        (DiskId(0), DISK, DISK, 3)
    );
    assert_eq!(
        (after[2].header.kind, after[2].header.offset),
        (Kind::Write, DISK)
    );
    group.close_clean().unwrap();
    drop(group);
    // Started again at the size now recorded: nothing more.
    let mut sources = sources;
    sources[0].disk.size = DISK * 2;
    tidemark_changelog::write_sources(tmp.path(), &sources).unwrap();
    let (_, report) = open(tmp.path(), &grown, 64 << 20);
    assert!(report.grown.is_empty());
}

/// The disks file as the daemon writes it at start, for `devs` at `size`.
fn write_disks_file(dir: &Path, devs: &[Arc<MemoryDevice>], size: u64) {
    let sources: Vec<_> = group_disks(devs)
        .iter()
        .enumerate()
        .map(|(i, d)| tidemark_changelog::DiskSource {
            disk: tidemark_changelog::Disk {
                id: DiskId(i as u32),
                name: d.name.clone(),
                size,
            },
            path: format!("/dev/disk{i}").into(),
        })
        .collect();
    tidemark_changelog::write_sources(dir, &sources).unwrap();
}

/// The size the disks file records for disk `id`.
fn recorded_size(dir: &Path, id: DiskId) -> u64 {
    tidemark_changelog::read_sources(dir)
        .unwrap()
        .unwrap()
        .into_iter()
        .find(|s| s.disk.id == id)
        .unwrap()
        .disk
        .size
}

/// Replays the log of `disk` onto an image of `size` bytes.
fn replay_at(dir: &Path, disk: DiskId, size: u64) -> Vec<u8> {
    let mut image = MemoryImage(vec![0; size as usize]);
    let mut summary = ReplaySummary::default();
    for r in records(dir) {
        apply(&r, disk, &mut image, &mut summary).unwrap();
    }
    image.0
}

/// A disk grown while served, under writers: a write beyond the old end is
/// refused before the resize (nothing of it reaches the log), the grow
/// record and its barrier come before every write beyond the old end, the
/// log replays to the device at the new size, the disks file says the new
/// size, and the next start records no growth again.
#[test]
fn a_disk_grown_while_served_takes_writes_beyond_its_old_end_only_after_its_grow_record() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [
        Arc::new(MemoryDevice::new(DISK)),
        Arc::new(MemoryDevice::new(DISK)),
    ];
    write_disks_file(tmp.path(), &devs, DISK);
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    let group = Arc::new(group);
    let err = group.resize("disk0").unwrap_err();
    assert!(
        matches!(err, ResizeError::Unchanged { size: DISK, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("grow the backing first"), "{err}");
    assert!(matches!(group.resize("nope"), Err(ResizeError::NoDisk(_))));
    devs[0].extend_backing(DISK * 2);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (group, stop) = (group.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(w);
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 50 {
                    let offset = rng.random_range(0..(DISK / 4096)) * 4096;
                    group
                        .write(DiskId(0), offset, &[w as u8 + 1; 4096], false)
                        .unwrap();
                    n += 1;
                    if n.is_multiple_of(16) {
                        group.flush(DiskId(0)).unwrap();
                    }
                }
                n
            })
        })
        .collect();
    // Beyond the old end before the resize: refused, whatever the backing
    // holds.
    assert!(matches!(
        group.write(DiskId(0), DISK, &[9; 4096], false),
        Err(tidemark_tracker::backend::BackendError::OutOfRange { .. })
    ));
    std::thread::sleep(std::time::Duration::from_millis(20));
    let resized = group.resize("disk0").unwrap();
    assert_eq!(
        (resized.id, resized.before, resized.size),
        (DiskId(0), DISK, DISK * 2)
    );
    assert_eq!(
        group.disks()[0].disk.size,
        DISK * 2,
        "new connections see it"
    );
    assert_eq!(
        group.disks()[1].disk.size,
        DISK,
        "the other disk is as it was"
    );
    assert_eq!(recorded_size(tmp.path(), DiskId(0)), DISK * 2);
    assert_eq!(recorded_size(tmp.path(), DiskId(1)), DISK);
    group.write(DiskId(0), DISK, &[7; 4096], false).unwrap();
    group
        .write(DiskId(0), DISK * 2 - 4096, &[8; 4096], true)
        .unwrap();
    assert!(group.write(DiskId(0), DISK * 2, &[9; 1], false).is_err());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert!(written >= 150);
    group.flush(DiskId(0)).unwrap();

    let recs = records(tmp.path());
    let grow_at = recs
        .iter()
        .position(|r| r.header.kind == Kind::Grow)
        .expect("a grow record");
    let grow = &recs[grow_at].header;
    assert_eq!(
        (grow.disk, grow.offset, grow.length, grow.seq),
        (DiskId(0), DISK, DISK, resized.seq)
    );
    assert_eq!(recs[grow_at + 1].header.kind, Kind::Barrier);
    assert_eq!(
        recs.iter().filter(|r| r.header.kind == Kind::Grow).count(),
        1
    );
    let beyond: Vec<usize> = recs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.header.disk == DiskId(0) && r.header.kind == Kind::Write)
        .filter(|(_, r)| r.header.offset + r.header.length > DISK)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(beyond.len(), 2, "the two writes beyond the old end");
    assert!(beyond.iter().all(|&i| i > grow_at));
    assert!(
        recs[..grow_at]
            .iter()
            .any(|r| r.header.kind == Kind::Write && r.header.disk == DiskId(0)),
        "the writers wrote before the growth too"
    );
    assert_eq!(
        replay_at(tmp.path(), DiskId(0), DISK * 2),
        devs[0].snapshot()
    );
    assert_eq!(group.status().hot_extents.len(), 2);

    group.close_clean().unwrap();
    drop(group);
    let (group, report) = open(tmp.path(), &devs, 64 << 20);
    assert!(report.grown.is_empty(), "{:?}", report.grown);
    assert_eq!(group.disk_sizes(), vec![DISK * 2, DISK]);
}

/// A backing that shrank is refused with the sizes and the rule; a file
/// grown by an admin (`truncate`) is served at its new size by the real
/// engine, which refuses a size it cannot serve.
#[test]
fn resize_refuses_a_shrunk_backing_and_serves_a_grown_image_file() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk0.img");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(DISK).unwrap();
    let device = tidemark_tracker::storage::open_backing(
        &image,
        &tidemark_tracker::storage::BackingOptions {
            engine: tidemark_tracker::storage::EngineKind::Sync,
            direct_io: tidemark_tracker::storage::DirectIo::Off,
            ..Default::default()
        },
    )
    .unwrap();
    let disks = vec![GroupDisk {
        name: tidemark_names::Name::new("disk0").unwrap(),
        export: "disk0".into(),
        device: device.clone(),
    }];
    let log_dir = tmp.path().join("log");
    let (group, _) = Group::open(disks, options(&log_dir, 64 << 20)).unwrap();
    group.mark_running().unwrap();
    file.set_len(DISK + (1 << 20)).unwrap();
    assert!(
        device.grow_to(DISK + (2 << 20)).is_err(),
        "beyond what the file holds"
    );
    let resized = group.resize("disk0").unwrap();
    assert_eq!((resized.before, resized.size), (DISK, DISK + (1 << 20)));
    assert_eq!(device.size(), DISK + (1 << 20));
    group.write(DiskId(0), DISK, &[5; 4096], true).unwrap();
    let mut back = [0u8; 4096];
    group.read(DiskId(0), DISK, &mut back).unwrap();
    assert_eq!(back, [5; 4096]);

    file.set_len(DISK).unwrap();
    let err = group.resize("disk0").unwrap_err();
    assert!(
        matches!(
            err,
            ResizeError::Shrunk { size, backing: DISK, .. } if size == DISK + (1 << 20)
        ),
        "{err}"
    );
    assert!(err.to_string().contains("may only grow"), "{err}");
    assert_eq!(device.size(), DISK + (1 << 20), "still served as it was");
    file.set_len(DISK + (1 << 20)).unwrap();
    group.close_clean().unwrap();
}

/// A crash after the grow record was durable and before the disks file
/// had the new size: the next start finds the disk larger than the file
/// says and appends a second grow record to the same size, after the
/// first and after the hot extents of the crash. It changes nothing: the
/// log still replays to the device, and the replica and the shipper take
/// a grow record to the size they already have as done (see the receiver
/// session's `grow_disk` and the shipper core's grow handling).
#[test]
fn a_crash_between_the_grow_record_and_the_disks_file_records_the_same_growth_again() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [Arc::new(MemoryDevice::new(DISK))];
    write_disks_file(tmp.path(), &devs, DISK);
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    group.write(DiskId(0), 0, &[1; 4096], false).unwrap();
    devs[0].extend_backing(DISK * 2);
    let resized = group.resize("disk0").unwrap();
    group
        .write(DiskId(0), DISK + 8192, &[2; 4096], false)
        .unwrap();
    group.flush(DiskId(0)).unwrap();
    // The crash, and the disks file as it was before the resize.
    drop(group);
    write_disks_file(tmp.path(), &devs, DISK);
    let (group, report) = open(tmp.path(), &devs, 64 << 20);
    assert!(report.unclean);
    assert_eq!(report.grown, vec![(DiskId(0), DISK, DISK * 2)]);
    assert!(
        report
            .resync_needed
            .iter()
            .any(|&(d, offset, len)| d == DiskId(0)
                && offset <= DISK + 8192
                && offset + len > DISK),
        "the hot extent beyond the old end: {:?}",
        report.resync_needed
    );
    let recs = records(tmp.path());
    let grows: Vec<&Record> = recs
        .iter()
        .filter(|r| r.header.kind == Kind::Grow)
        .collect();
    assert_eq!(grows.len(), 2);
    assert_eq!(grows[0].header.seq, resized.seq);
    for g in &grows {
        assert_eq!(
            (g.header.offset, g.header.offset + g.header.length),
            (DISK, DISK * 2)
        );
    }
    let first_resync = recs
        .iter()
        .find(|r| r.header.kind == Kind::ResyncNeeded)
        .unwrap();
    assert!(grows[0].header.seq < first_resync.header.seq);
    assert!(first_resync.header.seq < grows[1].header.seq);
    assert_eq!(
        replay_at(tmp.path(), DiskId(0), DISK * 2),
        devs[0].snapshot()
    );
    group
        .write(DiskId(0), DISK * 2 - 4096, &[3; 4096], true)
        .unwrap();
    group.close_clean().unwrap();
    drop(group);
    // The start wrote the disks file at the new size: nothing more.
    write_disks_file(tmp.path(), &devs, DISK * 2);
    let (_, report) = open(tmp.path(), &devs, 64 << 20);
    assert!(report.grown.is_empty());
}

/// A kernel device of the test: records, when told a new size, what the
/// group serves and whether the grow record is in the log at that moment;
/// refuses if asked to.
struct FakeKernelDevice {
    disk: DiskId,
    path: &'static str,
    group: Arc<Group>,
    dir: std::path::PathBuf,
    refuse: bool,
    /// (size told, size served then, grow record to that size in the log)
    told: std::sync::Mutex<Vec<(u64, u64, bool)>>,
}

impl KernelDevice for FakeKernelDevice {
    fn disk(&self) -> DiskId {
        self.disk
    }

    fn path(&self) -> std::path::PathBuf {
        self.path.into()
    }

    fn grow_to(&self, size: u64) -> Result<(), GrowError> {
        let served = self.group.disk_sizes()[self.disk.index()];
        let logged = records(&self.dir)
            .iter()
            .any(|r| r.header.kind == Kind::Grow && r.header.offset + r.header.length == size);
        self.told.lock().unwrap().push((size, served, logged));
        if self.refuse {
            return Err(GrowError::Ublk {
                device: self.path(),
                source: std::io::Error::from_raw_os_error(95),
            });
        }
        Ok(())
    }
}

/// A resize tells the disk's kernel devices only after the grow record is
/// in the log and the new size is served; a device that refuses leaves the
/// disk grown and says so in the reply (which device, why, what to do);
/// the other disk's device is not told; a refused resize tells nobody.
#[test]
fn kernel_devices_are_told_after_the_growth_is_durable_and_served() {
    let tmp = tempfile::tempdir().unwrap();
    let devs = [
        Arc::new(MemoryDevice::new(DISK)),
        Arc::new(MemoryDevice::new(DISK)),
    ];
    let (group, _) = open(tmp.path(), &devs, 64 << 20);
    let group = Arc::new(group);
    let device = |disk, path, refuse| {
        Arc::new(FakeKernelDevice {
            disk: DiskId(disk),
            path,
            group: Arc::clone(&group),
            dir: tmp.path().to_path_buf(),
            refuse,
            told: std::sync::Mutex::new(Vec::new()),
        })
    };
    let (ublk, nbd, other) = (
        device(0, "/dev/ublkb0", false),
        device(0, "/dev/nbd0", true),
        device(1, "/dev/nbd1", false),
    );
    let devices = KernelDevices::new();
    for d in [&ublk, &nbd, &other] {
        devices.add(Arc::clone(d) as Arc<dyn KernelDevice>);
    }

    let reply = |line| -> serde_json::Value {
        serde_json::from_str(&handle_line(line, "g", &group, &devices)).unwrap()
    };
    // Nothing grew: refused, nobody told.
    let refused = reply("resize disk0");
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(ublk.told.lock().unwrap().is_empty());

    devs[0].extend_backing(DISK * 2);
    let started = std::time::Instant::now();
    let grown = reply("resize disk0");
    eprintln!("resize with two kernel devices: {:?}", started.elapsed());
    assert_eq!(grown["ok"], true, "{grown}");
    let r = &grown["resized"];
    assert_eq!(
        (r["before"].as_u64(), r["size"].as_u64()),
        (Some(DISK), Some(DISK * 2))
    );
    // Told once each, with the new size, which was already served and
    // whose grow record was already in the log.
    assert_eq!(*ublk.told.lock().unwrap(), vec![(DISK * 2, DISK * 2, true)]);
    assert_eq!(*nbd.told.lock().unwrap(), vec![(DISK * 2, DISK * 2, true)]);
    assert!(
        other.told.lock().unwrap().is_empty(),
        "another disk's device"
    );
    let kernel = r["kernel"].as_array().unwrap();
    assert_eq!(kernel.len(), 2, "{grown}");
    assert_eq!(kernel[0]["device"], "/dev/ublkb0");
    assert_eq!(kernel[0]["grown"], true);
    assert!(kernel[0].get("error").is_none(), "{grown}");
    assert_eq!(kernel[1]["device"], "/dev/nbd0");
    assert_eq!(kernel[1]["grown"], false);
    let why = kernel[1]["error"].as_str().unwrap();
    assert!(why.contains("/dev/nbd0 keeps its old size"), "{why}");
    assert!(why.contains("then start it again"), "{why}");
    assert!(why.contains("UBLK_U_CMD_UPDATE_SIZE"), "{why}");
    // The refusal left the disk grown.
    assert_eq!(group.disk_sizes(), vec![DISK * 2, DISK]);
    group.write(DiskId(0), DISK, &[7; 4096], false).unwrap();

    // Once forgotten (the daemon stopping), a device is told nothing.
    devices.clear();
    devs[0].extend_backing(DISK * 3);
    assert_eq!(reply("resize disk0")["ok"], true);
    assert_eq!(ublk.told.lock().unwrap().len(), 1);
}
