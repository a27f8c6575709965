//! Span points with two receivers on one Ceph store (the testbed, one
//! cluster for this test binary, a namespace of the test's own), 3 s
//! leases, and a span of three hosts whose shippers list both receivers.
//! The causal writer of `span.rs` runs (counter k to host A, once
//! acknowledged to B, then to C). Span points are taken by the receiver
//! that holds the span's lease, which also applies every member; that
//! receiver is SIGKILLed: the other takes the span's lease and its members
//! over, and span points go on. At the end every committed span point (all
//! of them, not a sample) passes the causal check, the record's epoch went
//! up and no point id was handed out twice, and every member's replica is
//! its source disk, byte for byte: nothing was lost. `tidemark span
//! points --config` reads the record from either node and names the
//! holder, `span take --config` works on the holder's node and names it
//! elsewhere. `failover --span` and `test-failover start --span`, run on
//! the node whose receiver was killed (the record and the replicas are
//! read from the cluster), bring every member to the same span point:
//! each member's failed-over image, and each member's test failover read
//! whole over NBD, is its replica at its marker, byte for byte, the
//! markers pinned while they are read and unpinned after.
//!
//! Needs Ceph (skips with a message without `ceph-mon`, unless `CI` is
//! set), `rados` and `nbdcopy`; run with `--features ceph` (scripts/test.sh does).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_ceph::{testbed, RadosCluster};
use tidemark_changelog::{DiskId, Seq};
use tidemark_e2e::replication::{
    enroll, free_port, run_ok, start_receiver_with, wait_caught_up, Daemon,
};
use tidemark_e2e::{require_tool, tidemark, TrackerProcess};
use tidemark_names::Name;
use tidemark_receiver::span::{Outcome, SpanRecord};
use tidemark_receiver::store::ceph::{CephEngine, CephGroup};

const SIZE: u64 = 4 << 20;
const HOSTS: [&str; 3] = ["web1.example.test", "app1.example.test", "db1.example.test"];
/// Span points to see before and after the takeover.
const POINTS: usize = 5;
/// The longest from the kill to the first span point of the new holder:
/// the lease (6 s), the shippers' peer timeout (4 s) and backoff, the
/// takeover of the span and of three groups, a round, on a loaded machine.
const TAKEOVER_BOUND: Duration = Duration::from_secs(60);

struct KeepOnPanic(Option<tempfile::TempDir>);

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(t) = self.0.take() {
                eprintln!("ceph_span: kept {} for inspection", t.keep().display());
            }
        }
    }
}

/// A minimal NBD client: the fixed newstyle handshake, then 4 KiB writes
/// of a counter.
struct Nbd {
    stream: UnixStream,
    cookie: u64,
}

impl Nbd {
    fn connect(socket: &Path) -> Nbd {
        let mut stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        stream.write_all(&3u32.to_be_bytes()).unwrap();
        let name = b"disk";
        let mut option = b"IHAVEOPT".to_vec();
        option.extend_from_slice(&1u32.to_be_bytes());
        option.extend_from_slice(&(name.len() as u32).to_be_bytes());
        option.extend_from_slice(name);
        stream.write_all(&option).unwrap();
        let mut export = [0u8; 10];
        stream.read_exact(&mut export).unwrap();
        Nbd { stream, cookie: 0 }
    }

    /// Writes `value` over the disk's first 4 KiB and waits for the
    /// acknowledgement.
    fn write_value(&mut self, value: u64) {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28 + 4096);
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&4096u32.to_be_bytes());
        for _ in 0..512 {
            req.extend_from_slice(&value.to_le_bytes());
        }
        self.stream.write_all(&req).unwrap();
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&reply[4..8], &0u32.to_be_bytes(), "write error");
        assert_eq!(&reply[8..16], &self.cookie.to_be_bytes());
    }
}

/// The lease is 6 s, not the 3 s of the takeover tests: here the span and
/// its three groups change hands at once, each takeover fencing the dead
/// holder again (a monitor commit, about a second on the testbed, after
/// which every operation waits for the new OSD map), and with 3 s a group's
/// first renewal after its takeover lapsed (2.4 s of validity) in two runs
/// of two, and every retake after it too.
fn receiver_config(tb: &testbed::Testbed, namespace: &str, port: u16) -> String {
    format!(
        "[receiver.store]\nkind = \"ceph\"\nconf = \"{}\"\nuser = \"client.admin\"\npool = \"{}\"\n\
         namespace = \"{namespace}\"\nop-timeout = \"10s\"\nadvertise = \"127.0.0.1:{port}\"\n\
         lease = \"6s\"\nblocklist-expire = \"10m\"\n\
         [[receiver.span]]\nname = \"shop\"\nmembers = [{}]\ninterval = \"1s\"\n",
        tb.conf.display(),
        tb.pool,
        HOSTS
            .iter()
            .map(|h| format!("\"{h}/default\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

fn start_receiver(dir: &Path, rpki: &Path, port: u16, config: &str) -> Daemon {
    let data = dir.join(format!("data-{port}"));
    fs::create_dir_all(&data).unwrap();
    start_receiver_with(&data, dir, rpki, port, config)
}

/// A member's shipper, listing both receivers, relaying holds to its
/// tracker.
fn start_shipper(m: &Member, host: &str, ports: [u16; 2]) -> Daemon {
    let config = m.dir.join("shipper.toml");
    fs::write(
        &config,
        format!(
            "[shipper]\nhost = \"{host}\"\nreceivers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
             log-dir = \"{}\"\ncontrol-socket = \"{}\"\ntracker-control-socket = \"{}\"\n\
             [shipper.tls]\nca = \"{h}/ca.crt\"\ncert = \"{h}/host.crt\"\nkey = \"{h}/host.key\"\n\
             [shipper.retry]\ninitial-backoff = \"100ms\"\nmax-backoff = \"1s\"\n",
            ports[0],
            ports[1],
            m.tracker.log_dir.display(),
            m.dir.join("shipper.ctl").display(),
            m.tracker.control.display(),
            h = m.pki.display()
        ),
    )
    .unwrap();
    let child = tidemark()
        .args(["shipper", "run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(m.dir.join("shipper.log")).unwrap())
        .spawn()
        .unwrap();
    Daemon::new(child, "shipper")
}

/// Enrols another host with the receiver's CA in `rpki`.
fn enroll_more(dir: &Path, rpki: &Path, host: &str) -> PathBuf {
    let hpki = dir.join(format!("{host}-pki"));
    run_ok(
        tidemark()
            .args(["host", "request", "--host", host, "--pki-dir"])
            .arg(&hpki),
    );
    run_ok(
        tidemark()
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

struct Member {
    dir: PathBuf,
    pki: PathBuf,
    image: PathBuf,
    tracker: TrackerProcess,
}

/// The `owner` attribute of an object of the namespace (`rados
/// getxattr`): who holds a span's or a group's lease.
fn owner_of(tb: &testbed::Testbed, namespace: &str, oid: &str) -> Option<String> {
    let out = Command::new("rados")
        .arg("-c")
        .arg(&tb.conf)
        .args(["-p", &tb.pool, "-N", namespace, "getxattr", oid, "owner"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|o| !o.is_empty())
}

fn span() -> Name {
    Name::from_static("shop")
}

/// The span points of the record: id, when taken, each member's marker.
fn durable_points(record: &SpanRecord) -> Vec<(u64, u64, Vec<Seq>)> {
    record
        .points
        .iter()
        .filter(|p| p.outcome == Outcome::Durable)
        .map(|p| {
            (
                p.point,
                p.taken_ns,
                p.members.iter().map(|m| m.marker).collect(),
            )
        })
        .collect()
}

/// The mean interval between span points taken at `taken` (ns).
fn interval(taken: &[u64]) -> f64 {
    (taken[taken.len() - 1] - taken[0]) as f64 / 1e9 / (taken.len() - 1) as f64
}

/// The counter a member's replica shows at its recovery point `seq`
/// (`None`: the head).
fn value_at(engine: &CephEngine<RadosCluster>, host: &str, seq: Option<Seq>) -> Vec<u8> {
    value_in(&member(engine, host), seq)
}

/// A member's group, opened to read its points.
fn member(engine: &CephEngine<RadosCluster>, host: &str) -> CephGroup<RadosCluster> {
    engine
        .open_group_read_only(&Name::new(host).unwrap(), &Name::from_static("default"))
        .unwrap()
}

/// The counter `group` shows at its recovery point `seq` (`None`: the
/// head).
fn value_in(group: &CephGroup<RadosCluster>, seq: Option<Seq>) -> Vec<u8> {
    let len = if seq.is_some() { 8 } else { SIZE as usize };
    let mut buf = vec![0u8; len];
    group
        .view(seq)
        .unwrap()
        .read(DiskId(0), 0, &mut buf)
        .unwrap();
    buf
}

/// A member's whole disk at its recovery point `seq`.
fn image_at(group: &CephGroup<RadosCluster>, seq: Seq) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    group
        .view(Some(seq))
        .unwrap()
        .read(DiskId(0), 0, &mut buf)
        .unwrap();
    buf
}

/// The counter at the start of `image`.
fn counter(image: &[u8]) -> u64 {
    u64::from_le_bytes(image[..8].try_into().unwrap())
}

/// `failover --span` and `test-failover start --span` with `config`, a
/// node that applies none of the members (its receiver was killed): every
/// member's disk, as written and as served, is its replica at its marker
/// of the same span point (and causally consistent), no pin left after.
fn span_failovers(root: &Path, config: &Path, engine: &CephEngine<RadosCluster>) {
    let to = root.join("failover");
    let started = Instant::now();
    let out = run_ok(
        tidemark()
            .args(["failover", "--config"])
            .arg(config)
            .args(["--span", "shop", "--to"])
            .arg(&to),
    );
    let failover_took = started.elapsed();
    let point: u64 = out
        .split("to span point ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no span point in the failover's output:\n{out}"));
    let entry = engine
        .read_span(&span())
        .unwrap()
        .points
        .into_iter()
        .find(|p| p.point == point)
        .expect("the span point failed over to is in the record");
    let references: Vec<Vec<u8>> = entry
        .members
        .iter()
        .map(|m| {
            let group = member(engine, m.host.as_str());
            assert_eq!(
                group.pinned(),
                None,
                "{}: a pin left by the failover",
                m.host
            );
            image_at(&group, m.marker)
        })
        .collect();
    for (m, reference) in entry.members.iter().zip(&references) {
        let written = fs::read(to.join(m.host.as_str()).join("default").join("disk.img")).unwrap();
        assert!(
            written == *reference,
            "{}: the failed-over disk differs from its replica at its marker {}",
            m.host,
            m.marker
        );
    }
    for pair in entry
        .members
        .iter()
        .zip(&references)
        .collect::<Vec<_>>()
        .windows(2)
    {
        let ((a, ia), (b, ib)) = (pair[0], pair[1]);
        assert!(
            counter(ib) <= counter(ia),
            "span point {point} failed over inconsistently: {} shows {}, {} only {}",
            b.host,
            counter(ib),
            a.host,
            counter(ia)
        );
    }

    // The test failover of the same point, one socket per member.
    let sockets = root.join("tf-sockets");
    let log = root.join("span-test-failover.log");
    let started = Instant::now();
    let mut child = tidemark()
        .args(["test-failover", "start", "--config"])
        .arg(config)
        .args([
            "--span",
            "shop",
            "--point",
            &point.to_string(),
            "--socket-dir",
        ])
        .arg(&sockets)
        .stdout(std::process::Stdio::piped())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let rx = tidemark_e2e::replication::stdout_lines(child.stdout.take().unwrap());
    let test = Daemon::new(child, "span test failover");
    let mut said = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the span's test failover did not start: {said:?}\n{}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let ready = line.starts_with("ready");
        said.push(line);
        if ready {
            break;
        }
    }
    let ready_after = started.elapsed();
    for (m, reference) in entry.members.iter().zip(&references) {
        assert_eq!(
            member(engine, m.host.as_str()).pinned(),
            Some(m.marker),
            "{}: its marker is not pinned in the store while it is served",
            m.host
        );
        let socket = sockets.join(format!("{}-default.sock", m.host));
        let read_back = root.join(format!("tf-{}.img", m.host));
        let copied = Command::new("nbdcopy")
            .arg(format!("nbd+unix:///disk?socket={}", socket.display()))
            .arg(&read_back)
            .status()
            .unwrap();
        assert!(copied.success(), "nbdcopy of {}", m.host);
        assert!(
            fs::read(&read_back).unwrap() == *reference,
            "{}: the test failover differs from its replica at its marker {}",
            m.host,
            m.marker
        );
    }
    assert!(
        test.stop().success(),
        "the span's test failover ends cleanly"
    );
    for m in &entry.members {
        assert_eq!(
            member(engine, m.host.as_str()).pinned(),
            None,
            "{}: a pin left by the test failover",
            m.host
        );
    }
    eprintln!(
        "FIGURES ceph_span: failover --span to span point {point} from a node applying no member: {:.1} s; \
         test failover --span ready after {:.1} s; {} members byte-exact both ways",
        failover_took.as_secs_f64(),
        ready_after.as_secs_f64(),
        entry.members.len()
    );
}

#[test]
fn the_span_holder_is_killed_and_the_other_receiver_takes_the_span_and_its_members() {
    const TEST: &str = "ceph_span";
    let Some(tb) = testbed::for_test() else {
        return;
    };
    if !require_tool("rados", TEST) || !require_tool("nbdcopy", TEST) {
        return;
    }
    let started = Instant::now();
    let namespace = format!("span-{}", std::process::id());
    let tmp = KeepOnPanic(Some(tempfile::tempdir().unwrap()));
    let root = tmp.0.as_ref().unwrap().path().to_path_buf();
    let (rpki, first_pki) = enroll(&root, HOSTS[0]);
    let mut pkis = vec![first_pki];
    for host in &HOSTS[1..] {
        pkis.push(enroll_more(&root, &rpki, host));
    }
    let ports = [free_port(), free_port()];
    let configs = ports.map(|p| receiver_config(tb, &namespace, p));
    let mut receivers = [
        Some(start_receiver(&root, &rpki, ports[0], &configs[0])),
        Some(start_receiver(&root, &rpki, ports[1], &configs[1])),
    ];
    let address = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let members: Vec<Member> = pkis
        .into_iter()
        .zip(HOSTS)
        .map(|(pki, host)| {
            let dir = root.join(host);
            fs::create_dir_all(&dir).unwrap();
            let image = dir.join("disk.img");
            fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
            let tracker = TrackerProcess::start(&dir, &image, &[]);
            Member {
                dir,
                pki,
                image,
                tracker,
            }
        })
        .collect();
    let shippers: Vec<Daemon> = members
        .iter()
        .zip(HOSTS)
        .map(|(m, host)| start_shipper(m, host, ports))
        .collect();

    // The causal writer: k on A, acknowledged, then on B, then on C.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let sockets: Vec<PathBuf> = members.iter().map(|m| m.tracker.socket.clone()).collect();
        std::thread::spawn(move || {
            let mut disks: Vec<Nbd> = sockets.iter().map(|s| Nbd::connect(s)).collect();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                for disk in &mut disks {
                    disk.write_value(k);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            k
        })
    };

    let cluster = tb.connect(&namespace, Duration::from_secs(30)).unwrap();
    let engine = CephEngine::new(cluster, "ceph_span test");
    let record = || engine.read_span(&span()).unwrap();
    let wait_points = |after_ns: u64, count: usize, what: &str| -> Vec<(u64, u64, Vec<Seq>)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let points: Vec<_> = durable_points(&record())
                .into_iter()
                .filter(|p| p.1 > after_ns)
                .collect();
            if points.len() >= count {
                return points;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: only {} span points after 120 s",
                points.len()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // Span points from the span's holder, which applies every member.
    let before = wait_points(0, POINTS, "before the kill");
    let holder_addr = owner_of(tb, &namespace, "span+shop").expect("the span has a holder");
    let holder = (0..2).find(|i| address(*i) == holder_addr).unwrap();
    for host in HOSTS {
        assert_eq!(
            owner_of(tb, &namespace, &format!("{host}+default+state")).as_deref(),
            Some(holder_addr.as_str()),
            "{host}'s group is not applied by the span's holder"
        );
    }
    let taken_before: Vec<u64> = before.iter().map(|p| p.1).collect();
    let epoch_before = record().epoch;

    // The holder killed: the other takes the span and its members over.
    let other = address(1 - holder);
    receivers[holder].take().unwrap().kill();
    let killed = Instant::now();
    let killed_ns = tidemark_changelog::now_ns();
    let first_after = wait_points(killed_ns, 1, "after the kill");
    let took = killed.elapsed();
    assert!(
        took < TAKEOVER_BOUND,
        "the first span point after the kill came after {took:?}"
    );
    assert_eq!(
        owner_of(tb, &namespace, "span+shop").as_deref(),
        Some(other.as_str()),
        "the span's holder after the kill"
    );
    for host in HOSTS {
        assert_eq!(
            owner_of(tb, &namespace, &format!("{host}+default+state")).as_deref(),
            Some(other.as_str()),
            "{host}'s group did not move with its span"
        );
    }
    let after = wait_points(first_after[0].1 - 1, POINTS, "after the takeover");
    let taken_after: Vec<u64> = after.iter().map(|p| p.1).collect();
    eprintln!(
        "FIGURES {TEST}: the span's holder {holder_addr} killed; {other} took a span point {:.1} s later; \
         interval before {:.2} s, after {:.2} s",
        took.as_secs_f64(),
        interval(&taken_before),
        interval(&taken_after)
    );

    // The commands, with either node's configuration: the record is read
    // from the cluster; a point on demand is asked on the holder's node.
    let config_of = |i: usize| root.join(format!("receiver-{}.toml", ports[i]));
    let count = durable_points(&record()).len();
    let listed = run_ok(
        tidemark()
            .args(["span", "points", "--config"])
            .arg(config_of(holder))
            .args(["--span", "shop", "--json"]),
    );
    assert!(
        listed.lines().count() >= count,
        "span points --config lists {} of {count} points:\n{listed}",
        listed.lines().count()
    );
    let table = run_ok(
        tidemark()
            .args(["span", "points", "--config"])
            .arg(config_of(holder))
            .args(["--span", "shop"]),
    );
    assert!(
        table.contains(&format!("coordinated by the receiver at {other}")),
        "{table}"
    );
    let elsewhere = tidemark()
        .args(["span", "take", "--config"])
        .arg(config_of(holder))
        .args(["--span", "shop", "--timeout", "10s"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&elsewhere.stderr);
    assert!(
        !elsewhere.status.success() && said.contains(&other),
        "span take on a node that does not hold the span: {said}"
    );
    let taken = run_ok(
        tidemark()
            .args(["span", "take", "--config"])
            .arg(config_of(1 - holder))
            .args(["--span", "shop", "--label", "on-demand", "--timeout", "60s"]),
    );
    assert!(taken.contains("(on-demand)"), "{taken}");
    span_failovers(&root, &config_of(holder), &engine);

    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().unwrap();

    // Nothing lost: every member's replica is its source.
    for (m, host) in members.iter().zip(HOSTS) {
        wait_caught_up(&m.dir, &m.tracker.log_dir, Duration::from_secs(120));
        let source = fs::read(&m.image).unwrap();
        assert!(
            value_at(&engine, host, None) == source,
            "{host}'s replica differs from its source disk"
        );
    }
    drop(shippers);

    // The record: a new epoch from the takeover, no point id twice.
    let last = record();
    assert!(
        last.epoch > epoch_before,
        "epoch {epoch_before} → {}",
        last.epoch
    );
    let ids: Vec<u64> = last.points.iter().map(|p| p.point).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "point ids reused or out of order: {ids:?}"
    );

    // Every span point, not a sample: no host shows a write whose cause
    // the host before it lacks.
    // Each member's group opened once (the writers are stopped: nothing
    // changes meanwhile), not once per point.
    let points = durable_points(&last);
    let groups: Vec<CephGroup<RadosCluster>> =
        HOSTS.iter().map(|host| member(&engine, host)).collect();
    let mut moving = 0;
    for (point, _, markers) in &points {
        let values: Vec<u64> = groups
            .iter()
            .zip(markers)
            .map(|(group, marker)| {
                let bytes = value_in(group, Some(*marker));
                u64::from_le_bytes(bytes[..8].try_into().unwrap())
            })
            .collect();
        for i in 1..values.len() {
            assert!(
                values[i] <= values[i - 1],
                "span point {point} is not consistent: {} shows write {}, but {} shows only {}",
                HOSTS[i],
                values[i],
                HOSTS[i - 1],
                values[i - 1]
            );
        }
        if values[values.len() - 1] > 0 {
            moving += 1;
        }
    }
    assert!(
        moving >= POINTS,
        "the writes should fall inside the points (only {moving} showed any)"
    );
    drop(receivers);
    eprintln!(
        "{TEST}: {rounds} rounds of causal writes; {} span points checked ({moving} with writes inside), \
         epoch {epoch_before} → {}; {:.1} s",
        points.len(),
        last.epoch,
        started.elapsed().as_secs_f64()
    );
}
