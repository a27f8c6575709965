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
//! And a receiver that owns the group is frozen (SIGSTOP) past its lease:
//! the other takes the group over; resumed (SIGCONT), the frozen one finds
//! itself fenced and writes nothing (the group's owner stays the other, the
//! replica and every point stay exact).
//!
//! And a receiver that owns the group is stopped cleanly (SIGTERM): it lets
//! the group go, and the other applies it long before the stopped one's
//! lease (60 s there) could have expired. And a group whose shipper went
//! away is let go (unlocked) after `release-idle`. And four hosts spread
//! over the two receivers by rendezvous: the one owning the first host's
//! group is killed, every group ends applied by the other, every replica
//! and point exact. And a planned failover run on the node whose receiver
//! does not apply the group (`--config` of that node): the drain request
//! goes through the cluster to the owner, the host is stopped at its final
//! barrier and the failed-over disk is the source, byte for byte; with no
//! shipper connected the request times out with a clear error and is
//! withdrawn.
//!
//! Needs Ceph (skips with a message without `ceph-mon`, unless `CI` is
//! set) and qemu-io; run with `--features ceph` (scripts/test.sh does).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_ceph::testbed;
use tidemark_e2e::replication::{
    enroll, free_port, start_receiver_with, wait_caught_up, Daemon, HOST,
};
use tidemark_e2e::{require_tool, TrackerProcess};

mod ceph_site;
use ceph_site::{check_group, writer, KeepOnPanic, SIZE};

const KILLS: usize = 3;
/// The longest a takeover may take, from the kill to the first record the
/// new owner makes durable: the lease (3 s), the shipper's peer timeout
/// (4 s) and backoff, the takeover and the open, on a loaded machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(30);

/// The settings of the shared store, for `receiver.toml`, with a lease of
/// `lease` and a `release-idle` of `release_idle`.
fn store_table(
    tb: &testbed::Testbed,
    namespace: &str,
    port: u16,
    lease: Duration,
    release_idle: Duration,
) -> String {
    format!(
        "[receiver.store]\nkind = \"ceph\"\nconf = \"{}\"\nuser = \"client.admin\"\npool = \"{}\"\n\
         namespace = \"{namespace}\"\nop-timeout = \"10s\"\nadvertise = \"127.0.0.1:{port}\"\n\
         lease = \"{}s\"\nblocklist-expire = \"10m\"\nrelease-idle = \"{}s\"\n\
         [receiver.retention]\nmax-points = 5\n",
        tb.conf.display(),
        tb.pool,
        lease.as_secs(),
        release_idle.as_secs()
    )
}

fn start_receiver(dir: &Path, rpki: &Path, port: u16, store: &str) -> Daemon {
    let data = dir.join(format!("data-{port}"));
    fs::create_dir_all(&data).unwrap();
    start_receiver_with(&data, dir, rpki, port, store)
}

/// A shipper that lists both receivers and reconnects quickly (and stops
/// the tracker at `control` when a planned failover drains the group).
fn start_shipper(
    dir: &Path,
    log_dir: &Path,
    control: &Path,
    hpki: &Path,
    ports: [u16; 2],
) -> Daemon {
    let config = dir.join("shipper.toml");
    fs::write(
        &config,
        format!(
            "[shipper]\nhost = \"{HOST}\"\nreceivers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
             log-dir = \"{}\"\ncontrol-socket = \"{}\"\ntracker-control-socket = \"{}\"\n\
             [shipper.tls]\nca = \"{h}/ca.crt\"\ncert = \"{h}/host.crt\"\nkey = \"{h}/host.key\"\n\
             [shipper.retry]\ninitial-backoff = \"100ms\"\nmax-backoff = \"1s\"\n",
            ports[0],
            ports[1],
            log_dir.display(),
            dir.join("shipper.ctl").display(),
            control.display(),
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

/// Two receivers on one store, a tracker, its shipper listing both, and
/// a paced writer.
struct Site {
    tmp: KeepOnPanic,
    namespace: String,
    /// Each receiver node's PKI directory: the site's CA, and a server
    /// certificate of its own (see [`node_pki`]).
    rpkis: [PathBuf; 2],
    hpki: PathBuf,
    ports: [u16; 2],
    stores: [String; 2],
    receivers: [Option<Daemon>; 2],
    image: PathBuf,
    /// Runs until the site is dropped (the check reads its log).
    _tracker: TrackerProcess,
    log_dir: PathBuf,
    shipper: Option<Daemon>,
    stop_writer: Arc<AtomicBool>,
    writing: Option<std::thread::JoinHandle<u64>>,
    started: Instant,
}

impl Site {
    /// Everything started and caught up, the writer running; `None`: the
    /// test skips (it said why).
    fn start(test: &'static str) -> Option<(Site, &'static testbed::Testbed)> {
        Site::start_with_lease(test, Duration::from_secs(3), Duration::from_secs(60))
    }

    /// [`Site::start`] with a group lease of `lease` and a `release-idle`
    /// of `release_idle`.
    fn start_with_lease(
        test: &'static str,
        lease: Duration,
        release_idle: Duration,
    ) -> Option<(Site, &'static testbed::Testbed)> {
        let tb = testbed::for_test()?;
        if !require_tool("qemu-io", test) || !require_tool("rados", test) {
            return None;
        }
        let started = Instant::now();
        let namespace = format!("{}-{}", &test[..12], std::process::id());
        let tmp = KeepOnPanic(Some(tempfile::tempdir().unwrap()), test);
        let dir = tmp.0.as_ref().unwrap().path().to_path_buf();
        let (rpki, hpki) = enroll(&dir, HOST);
        let rpkis = [rpki.clone(), node_pki(&dir, &rpki)];
        let ports = [free_port(), free_port()];
        let stores = ports.map(|p| store_table(tb, &namespace, p, lease, release_idle));
        let receivers = [
            Some(start_receiver(&dir, &rpkis[0], ports[0], &stores[0])),
            Some(start_receiver(&dir, &rpkis[1], ports[1], &stores[1])),
        ];
        let image = dir.join("disk.img");
        fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
        // One log segment that is never recycled: the reference keeps
        // every record.
        let tracker = TrackerProcess::start(
            &dir,
            &image,
            &["--segment-size", "256MiB", "--log-size-limit", "512MiB"],
        );
        let log_dir = tracker.log_dir.clone();
        let shipper = Some(start_shipper(
            &dir,
            &log_dir,
            &tracker.control,
            &hpki,
            ports,
        ));
        wait_caught_up(&dir, &log_dir, Duration::from_secs(120));
        let stop_writer = Arc::new(AtomicBool::new(false));
        let writing = {
            let (uri, stop) = (tracker.uri(), stop_writer.clone());
            let done = Arc::new(AtomicU64::new(0));
            Some(std::thread::spawn(move || writer(uri, stop, done)))
        };
        let site = Site {
            tmp,
            namespace,
            rpkis,
            hpki,
            ports,
            stores,
            receivers,
            image,
            _tracker: tracker,
            log_dir,
            shipper,
            stop_writer,
            writing,
            started,
        };
        Some((site, tb))
    }

    fn dir(&self) -> &Path {
        self.tmp.0.as_ref().unwrap().path()
    }

    fn address(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// Which receiver owns the group now.
    fn owner(&self, tb: &testbed::Testbed) -> usize {
        let owned_by = owner(tb, &self.namespace).expect("the group has an owner");
        (0..2)
            .find(|i| owned_by == self.address(*i))
            .unwrap_or_else(|| panic!("owner {owned_by:?} is neither receiver"))
    }

    /// Waits until receiver `to` owns the group and the shipper's durable
    /// sequence passed `before`; how long after `since`.
    fn wait_taken_by(
        &self,
        tb: &testbed::Testbed,
        to: usize,
        before: u64,
        since: Instant,
    ) -> Duration {
        let other = self.address(to);
        loop {
            let moved = owner(tb, &self.namespace).as_deref() == Some(other.as_str());
            if moved && durable(&self.log_dir) > before {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < TAKEOVER_BOUND,
                "no takeover by {other} within {TAKEOVER_BOUND:?} (owner {:?}, durable {} → {})\nshipper log:\n{}",
                owner(tb, &self.namespace),
                before,
                durable(&self.log_dir),
                fs::read_to_string(self.dir().join("shipper.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the writer, waits for the replica to catch up, stops the
    /// daemons and checks the store (in this process): the head equals
    /// the source, every listed point the reference replay. Returns the
    /// write batches, the last record and the points checked.
    fn finish(mut self, tb: &testbed::Testbed) -> (u64, u64, Vec<u64>) {
        self.stop_writer.store(true, Ordering::Relaxed);
        let batches = self.writing.take().unwrap().join().unwrap();
        let status = wait_caught_up(self.dir(), &self.log_dir, Duration::from_secs(120));
        let last = status["durable_seq"].as_u64().unwrap();
        drop(self.shipper.take());
        for r in self.receivers.iter_mut() {
            drop(r.take());
        }
        eprintln!(
            "caught up at seq {last} after {:.1} s; checking the store",
            self.started.elapsed().as_secs_f64()
        );
        let points = check_group(tb, &self.namespace, HOST, &self.image, &self.log_dir, last);
        (batches, last, points)
    }
}

#[test]
fn the_owner_of_a_group_is_killed_and_the_other_receiver_takes_over() {
    const TEST: &str = "the_owner_of_a_group_is_killed_and_the_other_receiver_takes_over";
    let Some((mut site, tb)) = Site::start(TEST) else {
        return;
    };
    let mut takeovers = Vec::new();
    for kill in 1..=KILLS {
        std::thread::sleep(Duration::from_secs(2));
        let i = site.owner(tb);
        let before = durable(&site.log_dir);
        site.receivers[i].take().unwrap().kill();
        let took = site.wait_taken_by(tb, 1 - i, before, Instant::now());
        eprintln!(
            "kill {kill}: the owner {} killed; {} applies again after {:.1} s",
            site.address(i),
            site.address(1 - i),
            took.as_secs_f64()
        );
        takeovers.push(took);
        // Restarted: two receivers run again (the group stays with the
        // new owner: ownership is sticky).
        site.receivers[i] = Some(start_receiver(
            site.dir(),
            &site.rpkis[i],
            site.ports[i],
            &site.stores[i],
        ));
    }
    let started = site.started;
    let (batches, last, points) = site.finish(tb);
    eprintln!(
        "{TEST}: {KILLS} kills, takeovers after {:?}; {batches} write batches, {last} records, \
         points {points:?} exact; {:.1} s",
        takeovers
            .iter()
            .map(|t| format!("{:.1} s", t.as_secs_f64()))
            .collect::<Vec<_>>(),
        started.elapsed().as_secs_f64()
    );
}

/// Whether the group's drain object exists (`rados stat`).
fn drain_object_exists(tb: &testbed::Testbed, namespace: &str) -> bool {
    Command::new("rados")
        .arg("-c")
        .arg(&tb.conf)
        .args(["-p", &tb.pool, "-N", namespace, "stat"])
        .arg(format!("{HOST}+default+drain"))
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn a_planned_failover_from_the_node_that_does_not_apply_the_group_loses_nothing() {
    const TEST: &str =
        "a_planned_failover_from_the_node_that_does_not_apply_the_group_loses_nothing";
    let Some((mut site, tb)) = Site::start(TEST) else {
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    site.stop_writer.store(true, Ordering::Relaxed);
    let batches = site.writing.take().unwrap().join().unwrap();
    // Written without a flush: only the final barrier covers it.
    tidemark_e2e::qemu_io(site._tracker.uri(), &["write -P 0x62 1M 64k"]);
    let owner = site.owner(tb);
    let elsewhere = 1 - owner;
    let config = site
        .dir()
        .join(format!("receiver-{}.toml", site.ports[elsewhere]));
    let to = site.dir().join("planned");
    let started = Instant::now();
    let out = tidemark_e2e::replication::run_ok(
        tidemark_e2e::tidemark()
            .args(["failover", "--planned", "--timeout", "60s", "--config"])
            .arg(&config)
            .args(["--host", HOST, "--to"])
            .arg(&to),
    );
    let took = started.elapsed();
    assert!(out.contains("nothing was lost"), "{out}");
    assert!(
        out.contains(&format!("ceph:{HOST}+default+drain")),
        "the request was not left in the cluster: {out}"
    );
    assert!(
        !site._tracker.control.exists(),
        "the tracker still runs after the drain"
    );
    let last = tidemark_e2e::replication::last_seq(&site.log_dir);
    assert!(
        out.contains(&format!("sequence {last}")),
        "not failed over to the log's last record {last}: {out}"
    );
    assert!(
        fs::read(to.join("disk.img")).unwrap() == fs::read(&site.image).unwrap(),
        "the planned failover from the other node lost data"
    );
    assert!(
        !drain_object_exists(tb, &site.namespace),
        "the drain request was left behind"
    );
    assert_eq!(site.owner(tb), owner, "the group changed hands");

    // No shipper connected: no receiver passes the request on; a clear
    // error after the timeout, and the request is withdrawn.
    drop(site.shipper.take());
    let never = site.dir().join("never");
    let refused = tidemark_e2e::tidemark()
        .args(["failover", "--planned", "--timeout", "2s", "--config"])
        .arg(&config)
        .args(["--host", HOST, "--to"])
        .arg(&never)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(err.contains("no answer from the protected host"), "{err}");
    assert!(!drain_object_exists(tb, &site.namespace));
    assert!(!never.exists());
    for r in site.receivers.iter_mut() {
        drop(r.take());
    }
    eprintln!(
        "FIGURES {TEST}: {batches} write batches; planned failover from {} (the group applied by {}) \
         to sequence {last} in {:.1} s, byte-exact; {:.1} s in all",
        site.address(elsewhere),
        site.address(owner),
        took.as_secs_f64(),
        site.started.elapsed().as_secs_f64()
    );
}

#[test]
fn a_frozen_owner_is_fenced_and_writes_nothing_when_it_resumes() {
    use nix::sys::signal::{kill, Signal};
    const TEST: &str = "a_frozen_owner_is_fenced_and_writes_nothing_when_it_resumes";
    let Some((site, tb)) = Site::start(TEST) else {
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    let i = site.owner(tb);
    let frozen = site.receivers[i].as_ref().unwrap().pid();
    let before = durable(&site.log_dir);
    kill(frozen, Signal::SIGSTOP).unwrap();
    let took = site.wait_taken_by(tb, 1 - i, before, Instant::now());
    eprintln!(
        "{} frozen; {} applies after {:.1} s",
        site.address(i),
        site.address(1 - i),
        took.as_secs_f64()
    );
    kill(frozen, Signal::SIGCONT).unwrap();
    // Resumed: it finds its lease gone and itself fenced; the group stays
    // the other's while the writer goes on.
    let log = site.dir().join(format!("receiver-{}.log", site.ports[i]));
    let resumed = Instant::now();
    while !fs::read_to_string(&log).is_ok_and(|t| t.contains("fenced")) {
        assert!(
            resumed.elapsed() < Duration::from_secs(20),
            "the resumed receiver never said it was fenced:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        site.owner(tb),
        1 - i,
        "the resumed receiver took the group back"
    );
    let (batches, last, points) = site.finish(tb);
    eprintln!(
        "{TEST}: takeover after {:.1} s; {batches} write batches, {last} records, points {points:?} exact",
        took.as_secs_f64()
    );
}

#[test]
fn a_receiver_stopped_cleanly_hands_its_group_over_without_waiting_for_the_lease() {
    const TEST: &str =
        "a_receiver_stopped_cleanly_hands_its_group_over_without_waiting_for_the_lease";
    // A lease far longer than a handover may take: the other receiver
    // applies long before the stopped one's lease could have expired.
    const LEASE: Duration = Duration::from_secs(60);
    let Some((mut site, tb)) = Site::start_with_lease(TEST, LEASE, Duration::from_secs(60)) else {
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    let i = site.owner(tb);
    let before = durable(&site.log_dir);
    let stopping = Instant::now();
    let status = site.receivers[i].take().unwrap().stop();
    assert!(
        status.success(),
        "the receiver's clean stop failed: {status:?}"
    );
    let took = site.wait_taken_by(tb, 1 - i, before, stopping);
    assert!(
        took < LEASE / 3,
        "the group moved only after {took:?}: the stopped receiver did not let it go"
    );
    let (from, to) = (site.address(i), site.address(1 - i));
    let (batches, last, points) = site.finish(tb);
    eprintln!(
        "{TEST}: {from} stopped (SIGTERM); {to} applies after {:.1} s (lease {} s); {batches} write batches, \
         {last} records, points {points:?} exact",
        took.as_secs_f64(),
        LEASE.as_secs()
    );
}

#[test]
fn a_group_without_a_shipper_session_is_let_go_after_release_idle() {
    use tidemark_ceph::Cluster;
    const TEST: &str = "a_group_without_a_shipper_session_is_let_go_after_release_idle";
    const RELEASE_IDLE: Duration = Duration::from_secs(4);
    // A lease far longer than the wait: only a release frees the lock.
    let Some((mut site, tb)) = Site::start_with_lease(TEST, Duration::from_secs(60), RELEASE_IDLE)
    else {
        return;
    };
    std::thread::sleep(Duration::from_secs(2));
    let owner = site.owner(tb);
    let cluster = tb
        .connect(&site.namespace, Duration::from_secs(30))
        .unwrap();
    let state = format!("{HOST}+default+state");
    let holders = || {
        cluster
            .lockers(&state, tidemark_receiver::lease::LOCK_NAME)
            .unwrap()
            .len()
    };
    assert_eq!(holders(), 1, "the owner holds the group's lease");
    // The host's shipper goes away (the writer goes on: the log grows).
    site.shipper.take().unwrap().kill();
    let gone = Instant::now();
    while holders() != 0 {
        assert!(
            gone.elapsed() < RELEASE_IDLE + Duration::from_secs(20),
            "the idle group's lease is still held {:?} after its shipper went away",
            gone.elapsed()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let released = gone.elapsed();
    assert!(
        released >= RELEASE_IDLE,
        "let go after {released:?}, before release-idle"
    );
    // The shipper returns: the group is applied again, by either receiver.
    site.shipper = Some(start_shipper(
        site.dir(),
        &site.log_dir,
        &site._tracker.control,
        &site.hpki,
        site.ports,
    ));
    let from = site.address(owner);
    let (batches, last, points) = site.finish(tb);
    eprintln!(
        "{TEST}: {from} let the group go {:.1} s after its shipper went away (release-idle {} s, lease 60 s); \
         {batches} write batches, {last} records, points {points:?} exact",
        released.as_secs_f64(),
        RELEASE_IDLE.as_secs()
    );
}

/// The second receiver node's PKI directory: the site's CA (its
/// certificate, and its key for signing hosts' renewals) and a server
/// certificate and key of the node's own, for the name shippers dial, made
/// with `tidemark receiver sign --receiver` as the README's "Several
/// receivers on one Ceph store" says.
fn node_pki(dir: &Path, rpki: &Path) -> PathBuf {
    let node = dir.join("receiver-node2-pki");
    fs::create_dir_all(&node).unwrap();
    for file in ["ca.crt", "ca.key"] {
        fs::copy(rpki.join(file), node.join(file)).unwrap();
    }
    tidemark_e2e::replication::run_ok(
        tidemark_e2e::tidemark()
            .args(["receiver", "sign", "--pki-dir"])
            .arg(rpki)
            .args(["--receiver", "tidemark-receiver", "--out"])
            .arg(node.join("receiver.crt"))
            .arg("--key-out")
            .arg(node.join("receiver.key")),
    );
    assert_ne!(
        fs::read(node.join("receiver.crt")).unwrap(),
        fs::read(rpki.join("receiver.crt")).unwrap()
    );
    node
}

/// One more host enrolled with the receivers' CA: its PKI directory.
fn enroll_another(dir: &Path, rpki: &Path, host: &str) -> PathBuf {
    let hpki = dir.join(format!("{host}-pki"));
    tidemark_e2e::replication::run_ok(
        tidemark_e2e::tidemark()
            .args(["host", "request", "--host", host, "--pki-dir"])
            .arg(&hpki),
    );
    tidemark_e2e::replication::run_ok(
        tidemark_e2e::tidemark()
            .args(["receiver", "sign", "--pki-dir"])
            .arg(rpki)
            .args(["--host", host, "--csr"])
            .arg(hpki.join("host.csr"))
            .arg("--out")
            .arg(hpki.join("host.crt")),
    );
    fs::copy(rpki.join("ca.crt"), hpki.join("ca.crt")).unwrap();
    hpki
}

/// The owner a group's state object records (`rados getxattr`).
fn owner_of(tb: &testbed::Testbed, namespace: &str, host: &str) -> Option<String> {
    let out = Command::new("rados")
        .arg("-c")
        .arg(&tb.conf)
        .args(["-p", &tb.pool, "-N", namespace, "getxattr"])
        .arg(format!("{host}+default+state"))
        .arg("owner")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|o| !o.is_empty())
}

#[test]
fn four_hosts_spread_over_two_receivers_move_to_the_survivor_when_one_is_killed() {
    const TEST: &str =
        "four_hosts_spread_over_two_receivers_move_to_the_survivor_when_one_is_killed";
    const HOSTS: [&str; 4] = [
        "h0.example.test",
        "h1.example.test",
        "h2.example.test",
        "h3.example.test",
    ];
    let Some(tb) = testbed::for_test() else {
        return;
    };
    if !require_tool("qemu-io", TEST) || !require_tool("rados", TEST) {
        return;
    }
    let started = Instant::now();
    let namespace = format!("four-hosts-{}", std::process::id());
    let tmp = KeepOnPanic(Some(tempfile::tempdir().unwrap()), TEST);
    let dir = tmp.0.as_ref().unwrap().path().to_path_buf();
    let (rpki, first) = enroll(&dir, HOSTS[0]);
    let ports = [free_port(), free_port()];
    let mut receivers = ports.map(|p| {
        let store = store_table(
            tb,
            &namespace,
            p,
            Duration::from_secs(3),
            Duration::from_secs(60),
        );
        Some(start_receiver(&dir, &rpki, p, &store))
    });
    struct Host {
        image: PathBuf,
        tracker: TrackerProcess,
        shipper: Daemon,
        dir: PathBuf,
    }
    let hosts: Vec<Host> = HOSTS
        .iter()
        .map(|&name| {
            let hdir = dir.join(name);
            fs::create_dir_all(&hdir).unwrap();
            let hpki = if name == HOSTS[0] {
                first.clone()
            } else {
                enroll_another(&dir, &rpki, name)
            };
            let image = hdir.join("disk.img");
            fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
            let tracker = TrackerProcess::start(
                &hdir,
                &image,
                &["--segment-size", "256MiB", "--log-size-limit", "512MiB"],
            );
            let config = hdir.join("shipper.toml");
            fs::write(
                &config,
                format!(
                    "[shipper]\nhost = \"{name}\"\nreceivers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
                     log-dir = \"{}\"\ncontrol-socket = \"{}\"\n\
                     [shipper.tls]\nca = \"{h}/ca.crt\"\ncert = \"{h}/host.crt\"\nkey = \"{h}/host.key\"\n\
                     [shipper.retry]\ninitial-backoff = \"100ms\"\nmax-backoff = \"1s\"\n",
                    ports[0],
                    ports[1],
                    tracker.log_dir.display(),
                    hdir.join("shipper.ctl").display(),
                    h = hpki.display()
                ),
            )
            .unwrap();
            let shipper = Daemon::new(
                tidemark_e2e::tidemark()
                    .args(["shipper", "run", "--config"])
                    .arg(&config)
                    .stdout(std::process::Stdio::null())
                    .stderr(fs::File::create(hdir.join("shipper.log")).unwrap())
                    .spawn()
                    .unwrap(),
                "shipper",
            );
            Host {
                image,
                tracker,
                shipper,
                dir: hdir,
            }
        })
        .collect();
    for h in &hosts {
        wait_caught_up(&h.dir, &h.tracker.log_dir, Duration::from_secs(120));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = hosts
        .iter()
        .map(|h| {
            let (uri, stop) = (h.tracker.uri(), stop.clone());
            std::thread::spawn(move || writer(uri, stop, Arc::new(AtomicU64::new(0))))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let address = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let owners: Vec<String> = HOSTS
        .iter()
        .map(|h| owner_of(tb, &namespace, h).expect("every group has an owner"))
        .collect();
    let per_receiver = [0, 1].map(|i| owners.iter().filter(|o| **o == address(i)).count());
    // The receiver that owns the first host's group is killed.
    let victim = (0..2).find(|&i| owners[0] == address(i)).unwrap();
    let survivor = address(1 - victim);
    let before: Vec<u64> = hosts.iter().map(|h| durable(&h.tracker.log_dir)).collect();
    let killed = Instant::now();
    receivers[victim].take().unwrap().kill();
    loop {
        let moved = HOSTS.iter().zip(&hosts).zip(&before).all(|((name, h), b)| {
            owner_of(tb, &namespace, name).as_deref() == Some(survivor.as_str())
                && durable(&h.tracker.log_dir) > *b
        });
        if moved {
            break;
        }
        assert!(
            killed.elapsed() < TAKEOVER_BOUND,
            "not every group moved to {survivor} within {TAKEOVER_BOUND:?}: owners {:?}",
            HOSTS.map(|h| owner_of(tb, &namespace, h))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let moved_after = killed.elapsed();
    stop.store(true, Ordering::Relaxed);
    let batches: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
    let lasts: Vec<u64> = hosts
        .iter()
        .map(|h| {
            wait_caught_up(&h.dir, &h.tracker.log_dir, Duration::from_secs(120))["durable_seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let mut checked = Vec::new();
    for (h, last) in hosts.into_iter().zip(&lasts) {
        drop(h.shipper);
        checked.push((h.tracker, h.image, *last));
    }
    for r in receivers.iter_mut() {
        drop(r.take());
    }
    let mut points = 0;
    for ((tracker, image, last), name) in checked.iter().zip(HOSTS) {
        points += check_group(tb, &namespace, name, image, &tracker.log_dir, *last).len();
    }
    eprintln!(
        "{TEST}: groups per receiver before {per_receiver:?}; {} killed; all four applied by {survivor} \
         after {:.1} s; {batches} write batches, records {lasts:?}, {points} points exact; {:.1} s",
        address(victim),
        moved_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
