//! The event-loop write path against the synchronous one, through real NBD
//! connections to a group over image files:
//! - four connections send random overlapping writes, trims, write-zeroes
//!   and flushes at once; concurrent overlapping writes have no single
//!   expected image, but the log and the image must always agree: the
//!   group's own log, replayed through the synchronous engine onto a blank
//!   image, gives the served image byte for byte;
//! - one connection's random requests, performed by the event loop and,
//!   one by one, by the synchronous engine (the group's blocking
//!   `Backend`, the oracle) on a second group, give the same image and the
//!   same records;
//! - the queue core itself, driven by the test as its shell: a write's
//!   record is taken before its device write completes, and a device
//!   write that fails is answered with its error and followed by a
//!   resync-needed record of its range.

mod failing_device;
mod server_support;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use failing_device::FailingDevice;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use server_support::{pseudo_random, RawClient, Reply};
use tidemark_changelog::replay::{apply, ReplaySummary, ReplayTarget};
use tidemark_changelog::{DiskId, FsDir, Kind, LogOptions, LogReader, Record, Seq};
use tidemark_tracker::backend::{Backend, BackendError};
use tidemark_tracker::group::{Group, GroupDisk, GroupOptions};
use tidemark_tracker::nbd::constants::{CommandFlags, CommandType, Errno};
use tidemark_tracker::queue::{Io, IoKind, Op, Queue, QueueWaker, Request};
use tidemark_tracker::server::{Frontend, Server, ServerOptions};
use tidemark_tracker::storage::{
    open_backing, AlignedBuf, BackingOptions, BlockDevice, DirectIo, EngineKind, StorageError,
};
use tidemark_tracker::write_path::GroupQueue;

const DISK: u64 = 8 << 20;

/// One request of a random workload.
#[derive(Debug, Clone)]
enum Req {
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Trim {
        offset: u64,
        len: u32,
    },
    Zeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
    },
    Flush,
}

/// Random requests over a small part of the disk (so they overlap), of
/// 512-byte-aligned sizes up to 64 KiB; some unaligned to the 4 KiB block.
fn workload(seed: u64, count: usize) -> Vec<Req> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|i| {
            let offset = rng.random_range(0..2 << 20) / 512 * 512;
            let len = (1 + rng.random_range(0..128)) as u32 * 512;
            match rng.random_range(0..20) {
                0..=12 => Req::Write {
                    offset,
                    data: pseudo_random(len as usize, seed ^ (i as u64) << 20),
                    fua: rng.random_range(0..8) == 0,
                },
                13 | 14 => Req::Trim { offset, len },
                15 | 16 => Req::Zeroes {
                    offset,
                    len,
                    no_hole: rng.random_range(0..2) == 0,
                },
                _ => Req::Flush,
            }
        })
        .collect()
}

fn open_group(dir: &Path, direct: DirectIo) -> Arc<Group> {
    let group = open_group_not_running(dir, direct);
    group.mark_running().unwrap();
    group
}

/// A group as the daemon has it before every socket is bound.
fn open_group_not_running(dir: &Path, direct: DirectIo) -> Arc<Group> {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let device = open_backing(
        &image,
        &BackingOptions {
            engine: EngineKind::Sync,
            direct_io: direct,
            ..BackingOptions::default()
        },
    )
    .unwrap();
    group_on(dir, device)
}

/// A group of one disk on `device`, not running yet.
fn group_on(dir: &Path, device: Arc<dyn BlockDevice>) -> Arc<Group> {
    let (group, _) = Group::open(
        vec![GroupDisk {
            name: tidemark_names::Name::new("disk".to_string()).unwrap(),
            export: "disk".into(),
            device,
        }],
        GroupOptions {
            log_dir: dir.join("log"),
            log: LogOptions {
                segment_size: 1 << 20,
                size_limit: 256 << 20,
            },
            activity_extent: 1 << 20,
            max_block: 32 << 20,
            resync_all: false,
        },
    )
    .unwrap();
    Arc::new(group)
}

fn request_of(client: &mut RawClient, cookie: u64, req: &Req) {
    match req {
        Req::Write { offset, data, fua } => {
            let flags = if *fua {
                CommandFlags::FUA
            } else {
                CommandFlags::empty()
            };
            client.request(
                CommandType::Write.code(),
                flags,
                cookie,
                *offset,
                data.len() as u32,
                data,
            );
        }
        Req::Trim { offset, len } => client.request(
            CommandType::Trim.code(),
            CommandFlags::empty(),
            cookie,
            *offset,
            *len,
            &[],
        ),
        Req::Zeroes {
            offset,
            len,
            no_hole,
        } => {
            let flags = if *no_hole {
                CommandFlags::NO_HOLE
            } else {
                CommandFlags::empty()
            };
            client.request(
                CommandType::WriteZeroes.code(),
                flags,
                cookie,
                *offset,
                *len,
                &[],
            );
        }
        Req::Flush => client.request(
            CommandType::Flush.code(),
            CommandFlags::empty(),
            cookie,
            0,
            0,
            &[],
        ),
    }
}

/// Sends `reqs` on one connection, up to `window` in flight; every reply
/// must be a success.
fn run_connection(socket: &Path, reqs: &[Req], window: usize) {
    let (mut client, _, _) = RawClient::go(socket, "disk", false);
    let mut sent = 0;
    let mut answered = 0;
    while answered < reqs.len() {
        while sent < reqs.len() && sent - answered < window {
            request_of(&mut client, sent as u64, &reqs[sent]);
            sent += 1;
        }
        match client.read_reply() {
            Reply::Simple { error, cookie } => {
                assert_eq!(
                    error, 0,
                    "request {cookie} ({:?}) failed",
                    reqs[cookie as usize]
                );
            }
            other => panic!("unexpected reply {other:?}"),
        }
        answered += 1;
    }
}

/// A blank image written through the synchronous engine.
struct SyncImage(Arc<dyn BlockDevice>);

impl ReplayTarget for SyncImage {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_at(data, offset).map_err(std::io::Error::other)
    }

    fn zero(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.trim(offset, len).map_err(std::io::Error::other)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(std::io::Error::other)
    }
}

fn records(log_dir: &Path) -> Vec<Record> {
    let mut reader = LogReader::new(FsDir::existing(log_dir).unwrap(), Seq::ZERO);
    std::iter::from_fn(|| reader.next_record().unwrap()).collect()
}

/// Replays the log through the synchronous engine onto a blank image.
fn replayed(dir: &Path, log_dir: &Path) -> Vec<u8> {
    let blank = dir.join("replay.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(DISK)
        .unwrap();
    let device = open_backing(
        &blank,
        &BackingOptions {
            engine: EngineKind::Sync,
            direct_io: DirectIo::Off,
            ..BackingOptions::default()
        },
    )
    .unwrap();
    let mut target = SyncImage(device);
    let mut summary = ReplaySummary::default();
    for record in records(log_dir) {
        apply(&record, DiskId(0), &mut target, &mut summary).unwrap();
    }
    target.flush().unwrap();
    std::fs::read(&blank).unwrap()
}

fn concurrent_connections_agree_with_their_log(direct: DirectIo) {
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(tmp.path(), direct);
    let socket = tmp.path().join("nbd.sock");
    let server = Server::bind_unix(&socket, ServerOptions::default()).unwrap();
    let handle = server.serve_frontend(Frontend::group(group.clone(), true));
    let threads: Vec<_> = (0..4u64)
        .map(|c| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                run_connection(&socket, &workload(0x5eed_0000 + c, 400), 16);
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    handle.shutdown();
    group.close_clean().unwrap();
    let served = std::fs::read(tmp.path().join("disk.img")).unwrap();
    let status = group.status();
    assert!(status.writes >= 4 * 400 * 17 / 20 / 2, "{status:?}");
    assert!(
        served == replayed(tmp.path(), &tmp.path().join("log")),
        "the log replayed through the synchronous engine differs from the served image"
    );
}

#[test]
fn four_connections_of_overlapping_writes_trims_and_flushes_agree_with_their_log_writeback() {
    concurrent_connections_agree_with_their_log(DirectIo::Off);
}

#[test]
fn four_connections_of_overlapping_writes_trims_and_flushes_agree_with_their_log_direct() {
    concurrent_connections_agree_with_their_log(DirectIo::Auto);
}

/// What a record says, for comparing two logs (sequence numbers and
/// timestamps differ between runs).
fn content(records: &[Record]) -> Vec<(Kind, u64, u64, Vec<u8>)> {
    records
        .iter()
        .map(|r| {
            (
                r.header.kind,
                r.header.offset,
                r.header.length,
                r.payload.clone(),
            )
        })
        .collect()
}

#[test]
fn one_connection_through_the_event_loop_equals_the_synchronous_engine() {
    let reqs = workload(0xd1ff, 600);
    // The event loop, requests pipelined 32 at a time.
    let event = tempfile::tempdir().unwrap();
    let group = open_group(event.path(), DirectIo::Auto);
    let socket = event.path().join("nbd.sock");
    let server = Server::bind_unix(&socket, ServerOptions::default()).unwrap();
    let handle = server.serve_frontend(Frontend::group(group.clone(), true));
    // Pipelined requests may complete in any order, and overlapping ones
    // in flight together have no defined order: one at a time, the order
    // is the client's, as it is for the oracle.
    run_connection(&socket, &reqs, 1);
    handle.shutdown();
    group.close_clean().unwrap();
    // The oracle: the same requests, one by one, on the group's blocking
    // path (synchronous engine).
    let oracle = tempfile::tempdir().unwrap();
    let sync = open_group(oracle.path(), DirectIo::Off);
    for req in &reqs {
        match req {
            Req::Write { offset, data, fua } => sync.write(DiskId(0), *offset, data, *fua),
            Req::Trim { offset, len } => sync.trim(DiskId(0), *offset, u64::from(*len), false),
            Req::Zeroes {
                offset,
                len,
                no_hole,
            } => sync.write_zeroes(DiskId(0), *offset, u64::from(*len), *no_hole, false),
            Req::Flush => sync.flush(DiskId(0)),
        }
        .unwrap();
    }
    sync.close_clean().unwrap();
    assert!(
        std::fs::read(event.path().join("disk.img")).unwrap()
            == std::fs::read(oracle.path().join("disk.img")).unwrap(),
        "the event loop and the synchronous engine leave different images"
    );
    let modifications = |dir: &Path| -> Vec<_> {
        content(&records(&dir.join("log")))
            .into_iter()
            .filter(|(kind, ..)| !matches!(kind, Kind::Barrier))
            .collect()
    };
    assert_eq!(
        modifications(event.path()),
        modifications(oracle.path()),
        "the event loop and the synchronous engine log different records"
    );
    // Barriers: one per flush and per FUA request, and the final ones.
    let barriers = |dir: &Path| {
        content(&records(&dir.join("log")))
            .iter()
            .filter(|r| r.0 == Kind::Barrier)
            .count()
    };
    assert_eq!(barriers(event.path()), barriers(oracle.path()));
}

#[test]
fn the_event_loop_changes_nothing_before_the_group_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group_not_running(tmp.path(), DirectIo::Auto);
    let reqs = [
        Req::Write {
            offset: 0,
            data: vec![7; 4096],
            fua: false,
        },
        Req::Trim {
            offset: 4096,
            len: 4096,
        },
        Req::Flush,
    ];
    // EIO: the group is not serving changes yet.
    assert_eq!(errors_of(&group, tmp.path(), &reqs), [5, 5, 5]);
    group.close_clean().unwrap();
    assert!(
        records(&tmp.path().join("log")).is_empty(),
        "records appended"
    );
    assert!(std::fs::read(tmp.path().join("disk.img"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

/// What the backing device says reaches the NBD client as the protocol's
/// error value: a full disk (or quota) `ENOSPC`, a read-only one `EPERM`,
/// anything else `EIO`; for a write and for a flush alike.
#[test]
fn a_device_error_reaches_the_nbd_client_as_its_errno() {
    for (errno, told) in [
        (libc::ENOSPC, 28),
        (libc::EDQUOT, 28),
        (libc::EROFS, 1),
        (libc::ENOMEM, 12),
        (libc::EIO, 5),
        (libc::EINVAL, 5),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let group = group_on(tmp.path(), Arc::new(FailingDevice::new(DISK, errno)));
        group.mark_running().unwrap();
        let reqs = [
            Req::Write {
                offset: 4096,
                data: vec![7; 4096],
                fua: false,
            },
            Req::Flush,
        ];
        let errors = errors_of(&group, tmp.path(), &reqs);
        assert_eq!(errors, [told, told], "failing with errno {errno}");
    }
}

/// The NBD error value of each of `reqs` (0: served), sent one after
/// another on a connection to `group` served on a socket in `dir`.
fn errors_of(group: &Arc<Group>, dir: &Path, reqs: &[Req]) -> Vec<u32> {
    let socket = dir.join("nbd.sock");
    let server = Server::bind_unix(&socket, ServerOptions::default()).unwrap();
    let handle = server.serve_frontend(Frontend::group(group.clone(), true));
    let (mut client, _, _) = RawClient::go(&socket, "disk", false);
    let errors = reqs
        .iter()
        .enumerate()
        .map(|(cookie, req)| {
            request_of(&mut client, cookie as u64, req);
            match client.read_reply() {
                Reply::Simple { error, .. } => error,
                other => panic!("unexpected reply {other:?}"),
            }
        })
        .collect();
    drop(client);
    handle.shutdown();
    errors
}

/// The queue core of a running group, driven directly (no socket, no
/// ring): the test plays the shell.
fn core_of(group: &Arc<Group>) -> GroupQueue {
    GroupQueue::new(
        Arc::clone(group),
        QueueWaker::new().unwrap(),
        Instant::now(),
    )
}

/// The next device I/O of `core`, playing the shell's wait for the queue's
/// waker (a request parks, e.g., until the activity map is durable).
fn next_io(core: &mut GroupQueue) -> Io {
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(io) = core.poll_io() {
            return io;
        }
        assert!(Instant::now() < deadline, "no device I/O came out");
        std::thread::sleep(std::time::Duration::from_millis(1));
        core.handle_wake(Instant::now());
    }
}

fn write_request(id: u64, offset: u64, byte: u8, len: usize) -> Request {
    let mut buf = AlignedBuf::page_aligned(len);
    buf.fill(byte);
    Request {
        id,
        disk: DiskId(0),
        op: Op::Write { offset, fua: false },
        buf: Some(buf),
    }
}

#[test]
fn a_write_is_recorded_before_its_device_write_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(tmp.path(), DirectIo::Off);
    let mut core = core_of(&group);
    let before = group.status().next_seq;
    core.handle_request(write_request(1, 8192, 0xa5, 4096), Instant::now());
    let io = next_io(&mut core);
    assert!(matches!(io.kind, IoKind::Write { offset: 8192 }), "{io:?}");
    // The record took its sequence number before the device I/O went out:
    // the log append and the device write are under way together.
    assert_eq!(group.status().next_seq, before.next());
    assert!(
        core.poll_reply().is_none(),
        "answered before the device wrote"
    );
    core.handle_io(io.token, Ok(()), io.buf, Instant::now());
    let reply = core.poll_reply().expect("answered once the device wrote");
    assert_eq!(reply.id, 1);
    reply.result.unwrap();
    assert_eq!(core.in_flight(), 0);
}

#[test]
fn a_failed_device_write_is_answered_with_its_error_and_its_range_marked_resync_needed() {
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(tmp.path(), DirectIo::Off);
    let mut core = core_of(&group);
    core.handle_request(write_request(1, 1 << 20, 0x5a, 8192), Instant::now());
    let io = next_io(&mut core);
    let full = BackendError::Device(StorageError::Io {
        op: tidemark_tracker::storage::Op::Write,
        offset: 1 << 20,
        len: 8192,
        source: std::io::Error::from_raw_os_error(libc::ENOSPC),
    });
    core.handle_io(io.token, Err(full), io.buf, Instant::now());
    let reply = core.poll_reply().expect("the failure is answered");
    assert_eq!(reply.id, 1);
    // The device's own error, not a generic one: a full disk is ENOSPC to
    // an NBD client.
    let told = reply.result.map_err(|error| Errno::of_backend(&error));
    assert_eq!(told, Err(Errno::NoSpc));
    assert_eq!(core.in_flight(), 0);
    // The range is free again: a later write to it goes through.
    core.handle_request(write_request(2, 1 << 20, 0x11, 4096), Instant::now());
    let io = next_io(&mut core);
    core.handle_io(io.token, Ok(()), io.buf, Instant::now());
    core.poll_reply().unwrap().result.unwrap();
    Backend::flush(&*group, DiskId(0)).unwrap();
    // The failed write's extent never cools: a crash before the
    // compensation is durable re-reads it too.
    assert_eq!(group.status().hot_extents, vec![1]);
    drop(core);
    group.close_clean().unwrap();
    let kinds: Vec<_> = records(&tmp.path().join("log"))
        .iter()
        .map(|r| (r.header.kind, r.header.offset, r.header.length))
        .collect();
    // (The clean stop's own barrier follows.)
    assert_eq!(
        kinds[..4],
        [
            (Kind::Write, 1 << 20, 8192),
            (Kind::ResyncNeeded, 1 << 20, 8192),
            (Kind::Write, 1 << 20, 4096),
            (Kind::Barrier, 0, 0),
        ]
    );
}

/// Drives `core` for `for_how_long`, as its shell would (wakes, device
/// I/O completed at once); returns the replies that came out.
fn pump(core: &mut GroupQueue, for_how_long: std::time::Duration) -> Vec<u64> {
    let until = Instant::now() + for_how_long;
    let mut answered = Vec::new();
    while Instant::now() < until {
        core.handle_wake(Instant::now());
        while let Some(io) = core.poll_io() {
            core.handle_io(io.token, Ok(()), io.buf, Instant::now());
        }
        while let Some(reply) = core.poll_reply() {
            reply.result.unwrap();
            answered.push(reply.id);
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    answered
}

fn span_label() -> tidemark_names::Label {
    tidemark_names::Label::new("span-shop-1").unwrap()
}

#[test]
fn a_hold_keeps_the_acknowledgements_of_writes_recorded_after_its_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(tmp.path(), DirectIo::Off);
    let mut core = core_of(&group);
    // A write recorded before the hold, its device write still in flight.
    core.handle_request(write_request(1, 0, 0x01, 4096), Instant::now());
    let before = next_io(&mut core);
    let (marker, _generation) = group.hold_open(&span_label(), false).unwrap();
    // Recorded after the marker: written, and not answered while held.
    core.handle_request(write_request(2, 1 << 20, 0x02, 4096), Instant::now());
    let after = next_io(&mut core);
    core.handle_io(after.token, Ok(()), after.buf, Instant::now());
    // A FUA write after the marker: written and flushed, not answered.
    let mut fua = write_request(3, 2 << 20, 0x03, 4096);
    fua.op = Op::Write {
        offset: 2 << 20,
        fua: true,
    };
    core.handle_request(fua, Instant::now());
    // The write before the marker is answered during the hold.
    core.handle_io(before.token, Ok(()), before.buf, Instant::now());
    let during = pump(&mut core, std::time::Duration::from_millis(200));
    assert_eq!(during, vec![1], "only the write before the marker");
    assert_eq!(core.in_flight(), 2);
    group.hold_release();
    let after_release = pump(&mut core, std::time::Duration::from_millis(200));
    assert_eq!(after_release.len(), 2, "{after_release:?}");
    assert!(after_release.contains(&2) && after_release.contains(&3));
    drop(core);
    group.close_clean().unwrap();
    let kinds: Vec<_> = records(&tmp.path().join("log"))
        .iter()
        .map(|r| (r.header.seq, r.header.kind))
        .collect();
    assert!(kinds.contains(&(marker, Kind::Marker)), "{kinds:?}");
    let write_seqs: Vec<Seq> = kinds
        .iter()
        .filter(|(_, k)| *k == Kind::Write)
        .map(|(s, _)| *s)
        .collect();
    assert!(write_seqs[0] < marker && write_seqs[1] > marker);
}

#[test]
fn a_failed_write_is_answered_through_a_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(tmp.path(), DirectIo::Off);
    let mut core = core_of(&group);
    group.hold_open(&span_label(), false).unwrap();
    core.handle_request(write_request(1, 0, 0x01, 4096), Instant::now());
    let io = next_io(&mut core);
    core.handle_io(
        io.token,
        Err(BackendError::Unavailable),
        io.buf,
        Instant::now(),
    );
    // An error acknowledges no data: a hold never delays it.
    let reply = core.poll_reply().expect("the failure is answered at once");
    assert!(reply.result.is_err());
    group.hold_release();
}

#[test]
fn a_hold_keeps_a_blocking_write_until_its_release() {
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(tmp.path(), DirectIo::Off);
    group.hold_open(&span_label(), false).unwrap();
    let writer = {
        let group = Arc::clone(&group);
        std::thread::spawn(move || Backend::write(&*group, DiskId(0), 0, &[7u8; 4096], false))
    };
    std::thread::sleep(std::time::Duration::from_millis(150));
    assert!(!writer.is_finished(), "answered while held");
    group.hold_release();
    writer.join().unwrap().unwrap();
}

#[test]
fn no_hold_before_the_group_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let group = open_group_not_running(tmp.path(), DirectIo::Off);
    assert!(matches!(
        group.hold_open(&span_label(), false),
        Err(tidemark_tracker::group::MarkerError::Starting)
    ));
}

/// A blocking write of the group on a thread of its own.
fn write_on_thread(group: &Arc<Group>, offset: u64) -> std::thread::JoinHandle<()> {
    let group = Arc::clone(group);
    std::thread::spawn(move || {
        Backend::write(&*group, DiskId(0), offset, &[9u8; 4096], false).unwrap();
    })
}

#[test]
fn holds_over_the_control_socket_end_by_release_by_deadline_and_by_the_session_closing() {
    use std::time::Duration;
    use tidemark_control::hold::HoldSession;
    use tidemark_control::ControlError;
    use tidemark_span::{Epoch, HeldOutcome, OpenHold, PointId, ReleaseHold, ReleasedHow};

    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(tmp.path(), DirectIo::Off);
    let socket = tmp.path().join("control.sock");
    let control =
        tidemark_tracker::control::ControlSocket::start(&socket, "g".into(), Arc::clone(&group))
            .unwrap();
    let timeout = Duration::from_secs(5);
    let mut session = HoldSession::connect(&socket, timeout).unwrap();
    // One hold session at a time.
    match HoldSession::connect(&socket, timeout) {
        Err(ControlError::Refused(reason)) => assert!(reason.contains("another hold session")),
        other => panic!("a second session: {other:?}"),
    }
    let open = |point: u64, deadline: Duration| OpenHold {
        point: PointId(point),
        epoch: Epoch(1),
        deadline,
        app_consistent: false,
        label: span_label(),
    };
    let release = |point: u64| ReleaseHold {
        point: PointId(point),
        epoch: Epoch(1),
        commit: true,
    };

    // Released by the coordinator.
    let held = session
        .open(&open(1, Duration::from_secs(2)), timeout)
        .unwrap();
    assert!(matches!(held.outcome, HeldOutcome::Held { .. }), "{held:?}");
    let writer = write_on_thread(&group, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!writer.is_finished(), "answered while held");
    let released = session.release(&release(1), timeout).unwrap();
    assert_eq!(released.how, ReleasedHow::InTime);
    assert_eq!(released.gated_writes, 1);
    assert!(released.held >= Duration::from_millis(100));
    writer.join().unwrap();

    // Released by the tracker's own deadline, with nobody asking.
    session
        .open(&open(2, Duration::from_millis(50)), timeout)
        .unwrap();
    let writer = write_on_thread(&group, 4096);
    let started = Instant::now();
    writer.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    let released = session.release(&release(2), timeout).unwrap();
    assert_eq!(released.how, ReleasedHow::Expired);

    // Released by the session closing.
    session
        .open(&open(3, Duration::from_secs(2)), timeout)
        .unwrap();
    let writer = write_on_thread(&group, 8192);
    std::thread::sleep(Duration::from_millis(50));
    assert!(!writer.is_finished(), "answered while held");
    drop(session);
    let started = Instant::now();
    writer.join().unwrap();
    // Well before the tracker's own deadline (hold_max, 500 ms).
    assert!(started.elapsed() < Duration::from_millis(300));
    // And a new session may open.
    let mut again = HoldSession::connect(&socket, timeout).unwrap();
    let stale = again
        .open(
            &OpenHold {
                epoch: Epoch(0),
                ..open(4, Duration::from_secs(1))
            },
            timeout,
        )
        .unwrap();
    assert!(
        matches!(stale.outcome, HeldOutcome::Refused { .. }),
        "a stale epoch: {stale:?}"
    );
    drop(again);
    control.stop();
}

#[test]
fn span_quiesces_over_the_control_socket_thaw_by_the_thaw_by_their_deadline_and_by_the_session_closing(
) {
    use std::time::Duration;
    use tidemark_control::hold::HoldSession;
    use tidemark_span::{
        Epoch, HeldOutcome, OpenHold, PointId, QuiesceHold, QuiescedOutcome, ReleaseHold,
        ReleasedHow, ThawHold, ThawedHow,
    };
    use tidemark_tracker::quiesce::Quiesce;

    let tmp = tempfile::tempdir().unwrap();
    let group = open_group(tmp.path(), DirectIo::Off);
    let socket = tmp.path().join("control.sock");
    let journal = tmp.path().join("journal");
    let hooks = Quiesce {
        pre_hooks: vec![format!("echo freeze >> {}", journal.display())],
        post_hooks: vec![format!("echo thaw >> {}", journal.display())],
        timeout: Duration::from_secs(20),
        ..Quiesce::default()
    };
    let control = tidemark_tracker::control::ControlSocket::start_quiescing(
        &socket,
        "g".into(),
        Arc::clone(&group),
        Some(hooks),
    )
    .unwrap();
    let lines = || -> Vec<String> {
        std::fs::read_to_string(&journal)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let timeout = Duration::from_secs(5);
    let quiesce = |point: u64, asked: Duration| QuiesceHold {
        point: PointId(point),
        epoch: Epoch(1),
        timeout: asked,
    };
    let thaw = |point: u64| ThawHold {
        point: PointId(point),
        epoch: Epoch(1),
    };
    let mut session = HoldSession::connect(&socket, timeout).unwrap();

    // Quiesce, hold, release, thaw.
    let q = session
        .quiesce(&quiesce(1, Duration::from_secs(30)), timeout)
        .unwrap();
    assert_eq!(q.outcome, QuiescedOutcome::Quiesced);
    assert_eq!(lines(), ["freeze"]);
    let held = session
        .open(
            &OpenHold {
                point: PointId(1),
                epoch: Epoch(1),
                deadline: Duration::from_secs(1),
                app_consistent: true,
                label: span_label(),
            },
            timeout,
        )
        .unwrap();
    assert!(matches!(held.outcome, HeldOutcome::Held { .. }), "{held:?}");
    let released = session
        .release(
            &ReleaseHold {
                point: PointId(1),
                epoch: Epoch(1),
                commit: true,
            },
            timeout,
        )
        .unwrap();
    assert_eq!(released.how, ReleasedHow::InTime);
    assert_eq!(lines(), ["freeze"], "thawed before the thaw");
    let thawed = session.thaw(&thaw(1), timeout).unwrap();
    assert_eq!(thawed.how, ThawedHow::InTime);
    assert_eq!(lines(), ["freeze", "thaw"]);

    // No thaw comes: the quiesce ends by the (coordinator's, shorter)
    // deadline by itself.
    session
        .quiesce(&quiesce(2, Duration::from_millis(300)), timeout)
        .unwrap();
    let by = Instant::now() + Duration::from_secs(5);
    while lines().len() < 4 {
        assert!(Instant::now() < by, "never thawed: {:?}", lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        session.thaw(&thaw(2), timeout).unwrap().how,
        ThawedHow::Expired
    );

    // The session closes (the shipper died): thawed at once.
    session
        .quiesce(&quiesce(3, Duration::from_secs(30)), timeout)
        .unwrap();
    assert_eq!(lines().len(), 5);
    drop(session);
    let by = Instant::now() + Duration::from_secs(5);
    while lines().len() < 6 {
        assert!(Instant::now() < by, "never thawed: {:?}", lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        lines(),
        ["freeze", "thaw", "freeze", "thaw", "freeze", "thaw"]
    );
    control.stop();
}
