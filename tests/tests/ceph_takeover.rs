//! Two receivers share one Ceph store (the testbed, one cluster for this
//! test binary, a namespace of this test's own) with a 3 s group lease; a
//! protected host's shipper lists both. While a paced writer keeps the
//! disk busy, the receiver that owns the group is SIGKILLed, again and
//! again (and restarted once the other took over, so that two receivers
//! run again): the other takes the group over within a bound, the shipper follows (redirects,
//! or the next receiver of its order) and resumes where the last commit
//! left it. At the end the replica reads exactly as the source disk, and
//! every point the store lists reads exactly as a reference replay of the
//! tracker's change log up to that point.
//!
//! Needs Ceph (skips with a message without `ceph-mon`, unless `CI` is
//! set) and qemu-io; run with `--features ceph` (scripts/test.sh does).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_ceph::rados::{ClusterOptions, ConnectOptions};
use tidemark_ceph::{testbed, RadosCluster};
use tidemark_changelog::replay::{apply, MemoryImage, ReplaySummary};
use tidemark_changelog::{DiskId, FsDir, LogReader, Seq};
use tidemark_e2e::replication::{
    enroll, free_port, start_receiver_with, wait_caught_up, Daemon, HOST,
};
use tidemark_e2e::{qemu_io, require_tool, TrackerProcess};
use tidemark_names::Name;
use tidemark_receiver::store::ceph::CephEngine;

const TEST: &str = "the_owner_of_a_group_is_killed_and_the_other_receiver_takes_over";
const SIZE: u64 = 4 << 20;
const KILLS: usize = 3;
/// The longest a takeover may take, from the kill to the first record the
/// new owner makes durable: the lease (3 s), the shipper's peer timeout
/// (4 s) and backoff, the takeover and the open, on a loaded machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(30);

/// The `tidemark` binary with the Ceph store (the default build links no
/// Ceph): `TIDEMARK_E2E_BIN` if set (scripts/test.sh builds it), else
/// built here.
fn ceph_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("TIDEMARK_E2E_BIN") {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "-p",
            "tidemark",
            "-p",
            "tidemark-e2e",
            "--features",
            "tidemark/ceph,tidemark-e2e/ceph",
        ])
        .status()
        .expect("running cargo build");
    assert!(
        status.success(),
        "building tidemark with feature ceph failed"
    );
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("tidemark");
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

struct KeepOnPanic(Option<tempfile::TempDir>);

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(t) = self.0.take() {
                eprintln!("{TEST}: kept {} for inspection", t.keep().display());
            }
        }
    }
}

/// The settings of the shared store, for `receiver.toml`.
fn store_table(tb: &testbed::Testbed, namespace: &str, port: u16) -> String {
    format!(
        "[receiver.store]\nkind = \"ceph\"\nconf = \"{}\"\nuser = \"client.admin\"\npool = \"{}\"\n\
         namespace = \"{namespace}\"\nop-timeout = \"10s\"\nadvertise = \"127.0.0.1:{port}\"\n\
         lease = \"3s\"\nblocklist-expire = \"10m\"\n\
         [receiver.retention]\nmax-points = 5\n",
        tb.conf.display(),
        tb.pool
    )
}

fn start_receiver(dir: &Path, rpki: &Path, port: u16, store: &str) -> Daemon {
    let data = dir.join(format!("data-{port}"));
    fs::create_dir_all(&data).unwrap();
    start_receiver_with(&data, dir, rpki, port, store)
}

/// A shipper that lists both receivers and reconnects quickly.
fn start_shipper(dir: &Path, log_dir: &Path, hpki: &Path, ports: [u16; 2]) -> Daemon {
    let config = dir.join("shipper.toml");
    fs::write(
        &config,
        format!(
            "[shipper]\nhost = \"{HOST}\"\nreceivers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
             log-dir = \"{}\"\ncontrol-socket = \"{}\"\n\
             [shipper.tls]\nca = \"{h}/ca.crt\"\ncert = \"{h}/host.crt\"\nkey = \"{h}/host.key\"\n\
             [shipper.retry]\ninitial-backoff = \"100ms\"\nmax-backoff = \"1s\"\n",
            ports[0],
            ports[1],
            log_dir.display(),
            dir.join("shipper.ctl").display(),
            h = hpki.display()
        ),
    )
    .unwrap();
    let child = tidemark_e2e::tidemark()
        .args(["shipper", "run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(dir.join("shipper.log")).unwrap())
        .spawn()
        .unwrap();
    Daemon::new(child, "shipper")
}

/// The group's owner as its state object records it (`rados getxattr`).
fn owner(tb: &testbed::Testbed, namespace: &str) -> Option<String> {
    let out = Command::new("rados")
        .arg("-c")
        .arg(&tb.conf)
        .args(["-p", &tb.pool, "-N", namespace, "getxattr"])
        .arg(format!("{HOST}+default+state"))
        .arg("owner")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|o| !o.is_empty())
}

/// The shipper's durable sequence number.
fn durable(log_dir: &Path) -> u64 {
    tidemark_e2e::replication::shipper_status(log_dir)
        .and_then(|s| s["durable_seq"].as_u64())
        .unwrap_or(0)
}

fn writer(uri: String, stop: Arc<AtomicBool>) -> u64 {
    let mut batches = 0u64;
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    while !stop.load(Ordering::Relaxed) {
        let mut cmds = Vec::new();
        for _ in 0..2 + next(5) {
            let len = 512 * (1 + next(64));
            let offset = 512 * next((SIZE - len) / 512 + 1);
            cmds.push(match next(10) {
                0 => format!("write -z {offset} {len}"),
                _ => format!("write -P {} {offset} {len}", 1 + next(255)),
            });
        }
        cmds.push("flush".into());
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&uri, &cmds);
        batches += 1;
        std::thread::sleep(Duration::from_millis(50 + next(100)));
    }
    batches
}

#[test]
fn the_owner_of_a_group_is_killed_and_the_other_receiver_takes_over() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    if !require_tool("qemu-io", TEST) || !require_tool("rados", TEST) {
        return;
    }
    std::env::set_var("TIDEMARK_E2E_BIN", ceph_bin());
    let started = Instant::now();
    let namespace = format!("takeover-{}", std::process::id());

    let tmp = KeepOnPanic(Some(tempfile::tempdir().unwrap()));
    let dir = tmp.0.as_ref().unwrap().path();
    let (rpki, hpki) = enroll(dir, HOST);
    let ports = [free_port(), free_port()];
    let stores = ports.map(|p| store_table(tb, &namespace, p));
    let mut receivers: [Option<Daemon>; 2] = [
        Some(start_receiver(dir, &rpki, ports[0], &stores[0])),
        Some(start_receiver(dir, &rpki, ports[1], &stores[1])),
    ];
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    // One log segment that is never recycled: the reference keeps every
    // record.
    let tracker = TrackerProcess::start(
        dir,
        &image,
        &["--segment-size", "256MiB", "--log-size-limit", "512MiB"],
    );
    let log_dir = tracker.log_dir.clone();
    let shipper = start_shipper(dir, &log_dir, &hpki, ports);
    wait_caught_up(dir, &log_dir, Duration::from_secs(120));

    let stop_writer = Arc::new(AtomicBool::new(false));
    let writing = {
        let (uri, stop) = (tracker.uri(), stop_writer.clone());
        std::thread::spawn(move || writer(uri, stop))
    };
    let mut takeovers = Vec::new();
    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_secs(2));
        let owned_by = owner(tb, &namespace).expect("the group has an owner");
        let i = ports
            .iter()
            .position(|p| owned_by == format!("127.0.0.1:{p}"))
            .unwrap_or_else(|| panic!("owner {owned_by:?} is neither receiver"));
        let before = durable(&log_dir);
        receivers[i].take().unwrap().kill();
        let killed = Instant::now();
        let other = format!("127.0.0.1:{}", ports[1 - i]);
        loop {
            let moved = owner(tb, &namespace).as_deref() == Some(other.as_str());
            if moved && durable(&log_dir) > before {
                break;
            }
            assert!(
                killed.elapsed() < TAKEOVER_BOUND,
                "kill {kill}: no takeover by {other} within {TAKEOVER_BOUND:?} (owner {:?}, durable {} → {})\nshipper log:\n{}",
                owner(tb, &namespace),
                before,
                durable(&log_dir),
                fs::read_to_string(dir.join("shipper.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = killed.elapsed();
        eprintln!(
            "kill {kill}: the owner {owned_by} killed; {other} applies again after {:.1} s",
            took.as_secs_f64()
        );
        takeovers.push(took);
        // Restarted: two receivers run again (the group stays with the
        // new owner: ownership is sticky).
        receivers[i] = Some(start_receiver(dir, &rpki, ports[i], &stores[i]));
    }
    stop_writer.store(true, Ordering::Relaxed);
    let batches = writing.join().unwrap();
    let status = wait_caught_up(dir, &log_dir, Duration::from_secs(120));
    let last = status["durable_seq"].as_u64().unwrap();
    drop(shipper);
    for r in receivers.iter_mut() {
        drop(r.take());
    }
    eprintln!(
        "caught up at seq {last} after {:.1} s; checking the store",
        started.elapsed().as_secs_f64()
    );

    // The store as the receivers left it, read in this process.
    let cluster = RadosCluster::connect(&ClusterOptions {
        connect: ConnectOptions {
            conf: &tb.conf,
            user: "client.admin",
            op_timeout: Duration::from_secs(30),
            settings: &[],
        },
        pool: &tb.pool,
        namespace: &namespace,
    })
    .unwrap();
    let engine = CephEngine::new(cluster, TEST);
    let group = engine
        .open_group_read_only(&Name::from_static(HOST), &Name::from_static("default"))
        .unwrap();
    assert_eq!(group.position().durable_seq, Seq(last));
    let source = fs::read(&image).unwrap();
    let mut got = vec![0u8; SIZE as usize];
    group
        .view(None)
        .unwrap()
        .read(DiskId(0), 0, &mut got)
        .unwrap();
    assert!(got == source, "the replica differs from the source disk");

    let points: Vec<u64> = group.points().iter().map(|p| p.seq.get()).collect();
    assert!(!points.is_empty());
    let mut reader = LogReader::new(FsDir::existing(&log_dir).unwrap(), Seq(1));
    let mut reference = MemoryImage(vec![0u8; SIZE as usize]);
    let mut summary = ReplaySummary::default();
    let mut pending = None;
    for &seq in &points {
        loop {
            let record = match pending.take() {
                Some(r) => r,
                None => reader
                    .next_record()
                    .unwrap()
                    .unwrap_or_else(|| panic!("the log ends before point {seq}")),
            };
            if record.header.seq.get() > seq {
                pending = Some(record);
                break;
            }
            apply(&record, DiskId(0), &mut reference, &mut summary).unwrap();
            if record.header.seq.get() == seq {
                break;
            }
        }
        group
            .view(Some(Seq(seq)))
            .unwrap()
            .read(DiskId(0), 0, &mut got)
            .unwrap();
        assert!(
            got == reference.0,
            "point {seq} differs from the reference replay"
        );
    }
    eprintln!(
        "{TEST}: {KILLS} kills, takeovers after {:?}; {batches} write batches, {last} records, \
         points {points:?} exact; {:.1} s",
        takeovers
            .iter()
            .map(|t| format!("{:.1} s", t.as_secs_f64()))
            .collect::<Vec<_>>(),
        started.elapsed().as_secs_f64()
    );
    drop(tracker);
}
