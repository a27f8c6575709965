//! Span points end to end: three protected hosts, each with its own
//! tracker, log, shipper and certificate, and one receiver whose
//! configuration names the span; each shipper reaches the receiver through
//! a UDP proxy of the test's that can delay or cut its member's link. A
//! writer makes each write depend on an acknowledged write of the host
//! before it (counter k to host A, once acknowledged k to host B, once
//! acknowledged k to host C): at every span point (every one, not a
//! sample), no host's disk as of its marker shows a k that the host before
//! it does not.
//!
//! Phases, each measured (write acknowledgement p50/p99/max, span points
//! and their interval): no shippers (no holds: the baseline), loopback,
//! 25 ms one way between every member and the receiver. Faults, with the
//! writer running: a member's shipper frozen (SIGSTOP), a member's link
//! cut, a member's shipper killed, the receiver killed. In each no write fails, no write waits
//! much beyond the trackers' own hold bound (500 ms), no point is taken
//! without the member, the rounds are reported, and points resume.
//! Every member is failed over to one span point (and test-failed-over):
//! the images hold the markers' state, in the same causal order.
//!
//! A second, small scenario takes application-consistent span points on
//! two hosts whose freeze and thaw hooks journal when they ran.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tidemark_changelog::{DiskId, Seq};
use tidemark_e2e::replication::{enroll, free_port, run_ok, start_receiver_with, Daemon};
use tidemark_e2e::{tidemark, tidemark_bin, TrackerProcess};
use tidemark_names::Name;
use tidemark_receiver::span::{Outcome, SpanDir, SpanRecord};
use tidemark_receiver::store::LocalEngine;

const SIZE: u64 = 16 << 20;
const HOSTS: [&str; 3] = ["web1.example.test", "app1.example.test", "db1.example.test"];

/// A minimal NBD client: the fixed newstyle handshake, then 4 KiB writes.
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

    /// Writes `value` over the disk's first 4 KiB; returns when it is
    /// acknowledged, with how long that took.
    fn write_value(&mut self, value: u64) -> Duration {
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
        let start = Instant::now();
        self.stream.write_all(&req).unwrap();
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&reply[4..8], &0u32.to_be_bytes(), "write error");
        assert_eq!(&reply[8..16], &self.cookie.to_be_bytes());
        start.elapsed()
    }

    /// The value the disk's first 8 bytes hold.
    fn read_value(&mut self) -> u64 {
        self.cookie += 1;
        let mut req = Vec::with_capacity(28);
        req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes());
        req.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
        req.extend_from_slice(&self.cookie.to_be_bytes());
        req.extend_from_slice(&0u64.to_be_bytes());
        req.extend_from_slice(&8u32.to_be_bytes());
        self.stream.write_all(&req).unwrap();
        let mut reply = [0u8; 16 + 8];
        self.stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&reply[4..8], &0u32.to_be_bytes(), "read error");
        u64::from_le_bytes(reply[16..].try_into().unwrap())
    }
}

struct Member {
    dir: PathBuf,
    pki: PathBuf,
    tracker: TrackerProcess,
}

fn start_shipper(m: &Member, host: &str, port: u16) -> Daemon {
    let child = Command::new(tidemark_bin())
        .args(["shipper", "run", "--log-dir"])
        .arg(&m.tracker.log_dir)
        .args(["--receiver", &format!("127.0.0.1:{port}"), "--host", host])
        .arg("--pki-dir")
        .arg(&m.pki)
        .arg("--tracker-control-socket")
        .arg(&m.tracker.control)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(m.dir.join("shipper.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Daemon::new(child, "shipper")
}

/// Enrols a second host with the receiver's CA in `rpki`.
fn enroll_second(dir: &Path, rpki: &Path, host: &str) -> PathBuf {
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
    std::fs::copy(rpki.join("ca.crt"), hpki.join("ca.crt")).unwrap();
    hpki
}

/// The counter a member's replica shows at its recovery point `seq`.
fn value_at(data: &Path, host: &str, seq: Seq) -> u64 {
    let store = LocalEngine::open_dir_read_only(&data.join(host).join("default")).unwrap();
    let reader = store.reader(Some(seq)).unwrap();
    let mut buf = [0u8; 8];
    reader.read(DiskId(0), 0, &mut buf).unwrap();
    u64::from_le_bytes(buf)
}

fn record(data: &Path) -> SpanRecord {
    SpanDir::open(data, &Name::from_static("shop"))
        .unwrap()
        .load()
        .unwrap()
}

fn durable_points(data: &Path) -> Vec<(u64, Vec<Seq>)> {
    record(data)
        .points
        .iter()
        .filter(|p| p.outcome == Outcome::Durable)
        .map(|p| (p.point, p.members.iter().map(|m| m.marker).collect()))
        .collect()
}

fn wait_points(data: &Path, more_than: usize, timeout: Duration) -> Vec<(u64, Vec<Seq>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let points = durable_points(data);
        if points.len() > more_than {
            return points;
        }
        assert!(
            Instant::now() < deadline,
            "only {} span points after {timeout:?}",
            points.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// A UDP proxy between one shipper and the receiver: every datagram is
/// delayed by `delay_us` each way, or dropped while `cut`.
struct Proxy {
    port: u16,
    delay_us: Arc<AtomicU64>,
    cut: Arc<AtomicBool>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Proxy {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(target).unwrap();
        let port = front.local_addr().unwrap().port();
        let delay_us = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        // Datagrams in arrival order with the instant they are due: the
        // delay is the same for all, so that order is the due order.
        let (tx, rx) = mpsc::channel::<(Instant, bool, Vec<u8>)>();
        {
            let (front, back, client) = (
                front.try_clone().unwrap(),
                back.try_clone().unwrap(),
                client.clone(),
            );
            std::thread::spawn(move || {
                for (due, to_receiver, data) in rx {
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if to_receiver {
                        let _ = back.send(&data);
                    } else if let Some(c) = *client.lock().unwrap() {
                        let _ = front.send_to(&data, c);
                    }
                }
            });
        }
        for to_receiver in [true, false] {
            let (front, back, client, tx, delay_us, cut) = (
                front.try_clone().unwrap(),
                back.try_clone().unwrap(),
                client.clone(),
                tx.clone(),
                delay_us.clone(),
                cut.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                loop {
                    // A receiver that is down makes the connected socket
                    // report the refusal once: skip it, as a network does.
                    let n = if to_receiver {
                        let Ok((n, from)) = front.recv_from(&mut buf) else {
                            continue;
                        };
                        *client.lock().unwrap() = Some(from);
                        n
                    } else {
                        let Ok(n) = back.recv(&mut buf) else {
                            continue;
                        };
                        n
                    };
                    if cut.load(Ordering::Relaxed) {
                        continue;
                    }
                    let due =
                        Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
                    if tx.send((due, to_receiver, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            });
        }
        Proxy {
            port,
            delay_us,
            cut,
        }
    }

    fn set_delay(&self, one_way: Duration) {
        self.delay_us
            .store(one_way.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Every write the writer made: when it was asked, how long its
/// acknowledgement took, and the host.
type Writes = Arc<Mutex<Vec<(Instant, Duration, usize)>>>;

/// Acknowledgement times of the writes asked between `from` and `to`.
fn latencies(writes: &Writes, from: Instant, to: Instant) -> Vec<Duration> {
    let mut l: Vec<Duration> = writes
        .lock()
        .unwrap()
        .iter()
        .filter(|(at, ..)| *at >= from && *at < to)
        .map(|(_, took, _)| *took)
        .collect();
    l.sort();
    l
}

/// One line of figures for a phase.
fn report(phase: &str, writes: &Writes, from: Instant, to: Instant, points: &[u64]) -> Duration {
    let l = latencies(writes, from, to);
    assert!(!l.is_empty(), "{phase}: no write was acknowledged");
    let interval = if points.len() > 1 {
        let spread = points[points.len() - 1] - points[0];
        format!("{:.2} s", spread as f64 / 1e9 / (points.len() - 1) as f64)
    } else {
        "-".into()
    };
    eprintln!(
        "FIGURES {phase}: {} writes, acknowledgement p50 {:?} p99 {:?} max {:?}; {} span points, interval {interval}",
        l.len(),
        percentile(&l, 0.5),
        percentile(&l, 0.99),
        l[l.len() - 1],
        points.len(),
    );
    l[l.len() - 1]
}

/// When each span point newer than `after` was taken (ns since the Unix
/// epoch), oldest first.
fn taken_after(data: &Path, after: usize) -> Vec<u64> {
    record(data)
        .span_points()
        .skip(after)
        .map(|p| p.taken_ns)
        .collect()
}

#[test]
fn span_points_hold_across_three_hosts_under_delay_and_faults() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rpki, first_pki) = enroll(root, HOSTS[0]);
    let mut pkis = vec![first_pki];
    for host in &HOSTS[1..] {
        pkis.push(enroll_second(root, &rpki, host));
    }
    let data = root.join("replicas");
    let port = free_port();
    let span_config = format!(
        "[[receiver.span]]\nname = \"shop\"\nmembers = [{}]\ninterval = \"1s\"\n",
        HOSTS
            .iter()
            .map(|h| format!("\"{h}/default\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let receiver = start_receiver_with(&data, root, &rpki, port, &span_config);
    let receiver_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let members: Vec<Member> = pkis
        .into_iter()
        .zip(HOSTS)
        .map(|(pki, host)| {
            let (dir, image) = member_disk(root, host);
            let tracker = TrackerProcess::start(&dir, &image, &[]);
            Member { dir, pki, tracker }
        })
        .collect();
    let proxies: Vec<Proxy> = HOSTS.iter().map(|_| Proxy::start(receiver_addr)).collect();

    // The causal writer: k on A, acknowledged, then on B, then on C.
    let stop = Arc::new(AtomicBool::new(false));
    let writes: Writes = Arc::default();
    let sockets: Vec<PathBuf> = members.iter().map(|m| m.tracker.socket.clone()).collect();
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        std::thread::spawn(move || {
            let mut disks: Vec<Nbd> = sockets.iter().map(|s| Nbd::connect(s)).collect();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                for (host, disk) in disks.iter_mut().enumerate() {
                    let at = Instant::now();
                    let took = disk.write_value(k);
                    writes.lock().unwrap().push((at, took, host));
                }
            }
            k
        })
    };

    // Baseline: no shipper, so no hold.
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    report(
        "baseline (no shippers, no holds)",
        &writes,
        t0,
        Instant::now(),
        &[],
    );

    let mut shippers: Vec<Option<Daemon>> = members
        .iter()
        .zip(HOSTS)
        .zip(&proxies)
        .map(|((m, host), p)| Some(start_shipper(m, host, p.port)))
        .collect();
    wait_points(&data, 0, Duration::from_secs(90));

    // Loopback, then 25 ms each way between every member and the
    // receiver.
    for (phase, delay) in [
        ("loopback", Duration::ZERO),
        ("25 ms one way", Duration::from_millis(25)),
    ] {
        for p in &proxies {
            p.set_delay(delay);
        }
        let before = durable_points(&data).len();
        let from = Instant::now();
        wait_points(&data, before + 5, Duration::from_secs(60));
        let max = report(
            phase,
            &writes,
            from,
            Instant::now(),
            &taken_after(&data, before),
        );
        assert!(
            max < Duration::from_secs(2),
            "{phase}: a write waited {max:?}"
        );
    }
    for p in &proxies {
        p.set_delay(Duration::ZERO);
    }

    // A point on demand, with a label of the admin's.
    let taken = run_ok(
        tidemark()
            .args(["span", "take", "--data-dir"])
            .arg(&data)
            .args([
                "--span",
                "shop",
                "--label",
                "before-upgrade",
                "--timeout",
                "30s",
            ]),
    );
    assert!(taken.contains("(before-upgrade)"), "{taken}");
    for host in HOSTS {
        assert!(taken.contains(&format!("{host}/default@")), "{taken}");
    }

    // Faults: a member frozen, cut off, killed. No point may be taken
    // while it is away; the others' writes go on.
    for fault in ["shipper frozen (SIGSTOP)", "link cut", "shipper killed"] {
        let member = 1;
        let before = durable_points(&data).len();
        let from = Instant::now();
        match fault {
            "shipper frozen (SIGSTOP)" => {
                let pid = shippers[member].as_ref().unwrap().pid();
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
            }
            "link cut" => proxies[member].cut.store(true, Ordering::Relaxed),
            _ => shippers[member].take().unwrap().kill(),
        }
        let struck_ns = tidemark_changelog::now_ns();
        std::thread::sleep(Duration::from_millis(4500));
        let others: Vec<Duration> = {
            let w = writes.lock().unwrap();
            w.iter()
                .filter(|(at, _, host)| *at >= from && *host != member)
                .map(|(_, took, _)| *took)
                .collect()
        };
        let worst = others.iter().max().copied().unwrap_or_default();
        assert!(
            others.len() > 100,
            "{fault}: the other members' writes stalled ({} writes)",
            others.len()
        );
        match fault {
            "shipper frozen (SIGSTOP)" => {
                let pid = shippers[member].as_ref().unwrap().pid();
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
            }
            "link cut" => proxies[member].cut.store(false, Ordering::Relaxed),
            _ => {
                shippers[member] = Some(start_shipper(
                    &members[member],
                    HOSTS[member],
                    proxies[member].port,
                ))
            }
        }
        let back = Instant::now();
        let back_ns = tidemark_changelog::now_ns();
        let deadline = Instant::now() + Duration::from_secs(90);
        while !record(&data).span_points().any(|p| p.taken_ns > back_ns) {
            assert!(
                Instant::now() < deadline,
                "{fault}: no span point within 90 s after {} was back",
                HOSTS[member]
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // A round in flight when the fault struck may still commit (a
        // round lasts well under a second); none may start and commit
        // while the member is away.
        let without: Vec<u64> = record(&data)
            .span_points()
            .filter(|p| p.taken_ns > struck_ns + 1_000_000_000 && p.taken_ns < back_ns)
            .map(|p| p.point)
            .collect();
        assert!(
            without.is_empty(),
            "{fault}: span points {without:?} were taken without {}",
            HOSTS[member]
        );
        let aborted: Vec<String> = record(&data)
            .points
            .iter()
            .filter(|p| p.outcome == Outcome::Aborted && p.taken_ns >= struck_ns)
            .filter_map(|p| p.reason.clone())
            .collect();
        let max = report(
            fault,
            &writes,
            from,
            Instant::now(),
            &taken_after(&data, before),
        );
        eprintln!(
            "FIGURES {fault}: the others' worst acknowledgement {worst:?}; points again {:.1} s after the member was back; rounds abandoned: {aborted:?}",
            back.elapsed().as_secs_f64()
        );
        assert!(
            max < Duration::from_secs(2),
            "{fault}: a write waited {max:?}"
        );
    }

    // The receiver (the coordinator) killed and started again: a new
    // epoch, no point id handed out twice, points resume.
    let before = record(&data);
    receiver.kill();
    std::thread::sleep(Duration::from_secs(1));
    let _receiver = start_receiver_with(&data, root, &rpki, port, &span_config);
    let back_ns = tidemark_changelog::now_ns();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !record(&data).span_points().any(|p| p.taken_ns > back_ns) {
        assert!(
            Instant::now() < deadline,
            "no span point within 90 s of the receiver's restart"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The points committed before the restart are decided by the new
    // coordinator as it finds their markers in the members' stores; the
    // record may show a new span point a pass before that.
    let undecided = |r: &SpanRecord| {
        r.points
            .iter()
            .any(|p| p.outcome == Outcome::Committed && p.taken_ns <= back_ns)
    };
    while undecided(&record(&data)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = record(&data);
    assert!(
        after.epoch > before.epoch,
        "{} → {}",
        before.epoch,
        after.epoch
    );
    let ids: Vec<u64> = after.points.iter().map(|p| p.point).collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "point ids reused or out of order: {ids:?}"
    );
    assert!(
        after
            .points
            .iter()
            .all(|p| p.outcome != Outcome::Committed || p.taken_ns > back_ns),
        "a point committed before the restart was left undecided"
    );
    eprintln!(
        "FIGURES receiver killed: epoch {} → {}, points again {:.1} s after its restart",
        before.epoch,
        after.epoch,
        (tidemark_changelog::now_ns() - back_ns) as f64 / 1e9
    );

    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    eprintln!("{rounds} rounds of causal writes, none failed");

    // Every span point, not a sample.
    let points = durable_points(&data);
    let mut moving = 0;
    for (point, markers) in &points {
        let entry = record(&data);
        let label = &entry
            .points
            .iter()
            .find(|p| p.point == *point)
            .unwrap()
            .label;
        for (host, marker) in HOSTS.iter().zip(markers) {
            let listed = run_ok(
                tidemark()
                    .args(["points", "--data-dir"])
                    .arg(&data)
                    .args(["--host", host, "--json"]),
            );
            let line = listed
                .lines()
                .find(|l| l.contains(&format!("\"seq\":{}", marker.get())))
                .unwrap_or_else(|| {
                    panic!("{host} lists no point at its marker {marker:?} of span point {point}")
                });
            assert!(
                line.contains(&format!("\"{label}\"")),
                "{host}: not the marker {label}: {line}"
            );
        }
        let values: Vec<u64> = HOSTS
            .iter()
            .zip(markers)
            .map(|(host, marker)| value_at(&data, host, *marker))
            .collect();
        for i in 1..values.len() {
            assert!(
                values[i] <= values[i - 1],
                "span point {point} is not consistent: {} shows write {}, which depends on {}'s write {}, but {} shows only {}",
                HOSTS[i], values[i], HOSTS[i - 1], values[i], HOSTS[i - 1], values[i - 1]
            );
        }
        if values[values.len() - 1] > 0 {
            moving += 1;
        }
    }
    eprintln!(
        "{} span points checked, {moving} with writes inside",
        points.len()
    );
    assert!(
        moving >= 10,
        "the writer's writes should fall inside the points (only {moving} showed any)"
    );

    // Every member failed over to one span point while replication goes
    // on: each image holds what its replica holds at its marker, in the
    // same causal order.
    let (chosen, markers) = points.last().unwrap();
    let to = root.join("failover");
    let started = Instant::now();
    let out = run_ok(
        tidemark()
            .args(["failover", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop", "--point", &chosen.to_string(), "--to"])
            .arg(&to),
    );
    eprintln!(
        "failover --span to point {chosen} in {:?}:\n{out}",
        started.elapsed()
    );
    let failed_over: Vec<u64> = HOSTS
        .iter()
        .map(|host| {
            let mut buf = [0u8; 8];
            std::fs::File::open(to.join(host).join("default").join("disk.img"))
                .unwrap()
                .read_exact(&mut buf)
                .unwrap();
            u64::from_le_bytes(buf)
        })
        .collect();
    for (i, (host, marker)) in HOSTS.iter().zip(markers).enumerate() {
        assert_eq!(
            failed_over[i],
            value_at(&data, host, *marker),
            "{host}'s failed-over image is not its replica at {marker:?}"
        );
        assert!(
            !data
                .join(host)
                .join("default")
                .join("test-failover")
                .join("pin")
                .exists(),
            "{host}: the failover left its pin"
        );
        // The span keeps its points from the member's retention: the
        // member's floor is at or before every kept point's marker.
        let floor = std::fs::read_to_string(data.join(host).join("default").join("span-floor"))
            .unwrap_or_else(|e| panic!("{host} has no span floor: {e}"));
        assert!(
            floor.trim().parse::<u64>().unwrap() <= marker.get(),
            "{host}'s span floor {floor} is after its marker {marker:?}"
        );
        if i > 0 {
            assert!(
                failed_over[i] <= failed_over[i - 1],
                "after the failover {host} shows write {}, {} only {}",
                failed_over[i],
                HOSTS[i - 1],
                failed_over[i - 1]
            );
        }
    }
    // Written images are never overwritten: refused before anything is
    // written; so is a point that is none.
    for (point, why) in [
        (chosen.to_string(), "exists"),
        ("999999".into(), "no point"),
    ] {
        let again = tidemark()
            .args(["failover", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop", "--point", &point, "--to"])
            .arg(&to)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&again.stderr);
        assert!(!again.status.success() && stderr.contains(why), "{stderr}");
    }

    // A test failover of the span serves every member at the point.
    let sockets = root.join("test-failover");
    let mut test = tidemark()
        .args(["test-failover", "start", "--data-dir"])
        .arg(&data)
        .args([
            "--span",
            "shop",
            "--point",
            &chosen.to_string(),
            "--socket-dir",
        ])
        .arg(&sockets)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(test.stdout.take().unwrap());
    let mut said = Vec::new();
    loop {
        let mut line = String::new();
        use std::io::BufRead;
        assert!(lines.read_line(&mut line).unwrap() > 0, "{said:?}");
        said.push(line.clone());
        if line.starts_with("ready") {
            break;
        }
    }
    let test = Daemon::new(test, "span test failover");
    for (host, want) in HOSTS.iter().zip(&failed_over) {
        let socket = sockets.join(format!("{host}-default.sock"));
        assert!(
            said.iter()
                .any(|l| l.contains(&socket.display().to_string())),
            "{said:?}"
        );
        assert_eq!(Nbd::connect(&socket).read_value(), *want, "{host}");
    }
    assert!(test.stop().success());
    for host in HOSTS {
        assert!(
            !data
                .join(host)
                .join("default")
                .join("test-failover")
                .exists(),
            "{host}: the test failover left traces"
        );
    }
    run_ok(
        tidemark()
            .args(["test-failover", "cleanup", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop"]),
    );

    let listed = run_ok(
        tidemark()
            .args(["span", "points", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop"]),
    );
    for (point, _) in &points {
        assert!(listed.contains(&point.to_string()), "{listed}");
    }
}

/// The `date +%s%N` times a member's hooks journaled: (what, ns).
fn hook_journal(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let (what, at) = l.split_once(' ').unwrap();
            (what.to_string(), at.trim().parse().unwrap())
        })
        .collect()
}

/// An application-consistent span point on demand: every member's
/// freeze hook runs before its marker is written, its thaw hook after
/// the release, and the point is listed application-consistent; a member
/// whose pre-hook fails makes the next one crash-consistent, said by name.
#[test]
fn an_app_consistent_span_point_quiesces_every_member_around_its_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let hosts = &HOSTS[..2];
    let (rpki, first_pki) = enroll(root, hosts[0]);
    let pkis = vec![first_pki, enroll_second(root, &rpki, hosts[1])];
    let data = root.join("replicas");
    let port = free_port();
    // Points only on demand.
    let span_config = format!(
        "[[receiver.span]]\nname = \"shop\"\nmembers = [\"{}/default\", \"{}/default\"]\n\
         interval = \"1h\"\ntarget = \"1h\"\n",
        hosts[0], hosts[1]
    );
    let _receiver = start_receiver_with(&data, root, &rpki, port, &span_config);
    let members: Vec<(Member, PathBuf, PathBuf)> = pkis
        .into_iter()
        .zip(hosts)
        .map(|(pki, host)| {
            let (dir, image) = member_disk(root, host);
            let journal = dir.join("hooks.journal");
            let refuse = dir.join("refuse-to-quiesce");
            let (j, r) = (journal.display(), refuse.display());
            let settings = format!(
                "[tracker.app-consistent]\n\
                 pre-hooks = [\"test ! -e {r} && echo freeze $(date +%s%N) >> {j}\"]\n\
                 post-hooks = [\"echo thaw $(date +%s%N) >> {j}\"]\n\
                 timeout = \"20s\"\n"
            );
            let tracker = TrackerProcess::start_with_config(&dir, &image, &settings);
            (Member { dir, pki, tracker }, journal, refuse)
        })
        .collect();
    let _shippers: Vec<Daemon> = members
        .iter()
        .zip(hosts)
        .map(|((m, ..), host)| start_shipper(m, host, port))
        .collect();
    let started = Instant::now();
    let take = |label: &str| {
        let mut cmd = tidemark();
        cmd.args(["span", "take", "--app-consistent", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop", "--label", label, "--timeout", "60s"]);
        // The members' sessions may still be starting: a round that
        // cannot start yet is asked for again.
        loop {
            let out = cmd.output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                return text;
            }
            assert!(
                text.contains("could start:") && started.elapsed() < Duration::from_secs(60),
                "{text}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };

    let taken = take("quiesced");
    assert!(
        taken.contains("(quiesced): ") && taken.contains("[app-consistent]"),
        "{taken}"
    );
    let entry = record(&data)
        .points
        .into_iter()
        .find(|p| p.label == "quiesced" && p.outcome == Outcome::Durable)
        .expect("the point in the span's record");
    assert!(entry.app_consistent && entry.reason.is_none(), "{entry:?}");
    for (m, (member, journal, _)) in entry.members.iter().zip(&members) {
        let store =
            LocalEngine::open_dir_read_only(&data.join(m.host.as_str()).join("default")).unwrap();
        let point = store.point_at(m.marker).expect("the member's marker");
        assert!(point.app_consistent, "{}: {point:?}", m.host);
        let hooks = hook_journal(journal);
        assert_eq!(
            hooks.iter().map(|h| h.0.as_str()).collect::<Vec<_>>(),
            ["freeze", "thaw"],
            "{}",
            member.dir.display()
        );
        assert!(
            hooks[0].1 < point.timestamp_ns && point.timestamp_ns < hooks[1].1,
            "{}: freeze at {}, marker at {}, thaw at {}",
            m.host,
            hooks[0].1,
            point.timestamp_ns,
            hooks[1].1
        );
    }
    // The release came before every thaw: every member's marker was
    // written before any member thawed.
    let last_marker = entry
        .members
        .iter()
        .map(|m| {
            LocalEngine::open_dir_read_only(&data.join(m.host.as_str()).join("default"))
                .unwrap()
                .point_at(m.marker)
                .unwrap()
                .timestamp_ns
        })
        .max()
        .unwrap();
    for (_, journal, _) in &members {
        assert!(hook_journal(journal)[1].1 > last_marker);
    }
    let listed = run_ok(
        tidemark()
            .args(["span", "points", "--json", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop"]),
    );
    let listed: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["app_consistent"], true, "{listed:?}");

    // The second member's pre-hook now fails: the point is taken, but
    // crash-consistent, and says whose quiesce failed.
    std::fs::write(&members[1].2, b"").unwrap();
    let taken = take("not-quiesced");
    assert!(
        taken.contains("(not-quiesced): ") && taken.contains("[crash-consistent]"),
        "{taken}"
    );
    assert!(
        taken.contains(&format!("{}/default was not quiesced", hosts[1]))
            && taken.contains("pre-hook"),
        "{taken}"
    );
    // The first member was quiesced and thawed again all the same.
    assert_eq!(hook_journal(&members[0].1).len(), 4);
    assert_eq!(
        hook_journal(&members[1].1).len(),
        3,
        "its post-hook still ran"
    );
    let shown = run_ok(
        tidemark()
            .args(["span", "points", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop"]),
    );
    assert!(
        shown.contains("app-consistent") && shown.contains("crash-consistent"),
        "{shown}"
    );
    eprintln!(
        "two application-consistent span points in {:?}",
        started.elapsed()
    );
}

/// A member's directory under `root` and its empty disk image of `SIZE`.
fn member_disk(root: &Path, host: &str) -> (PathBuf, PathBuf) {
    let dir = root.join(host);
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    (dir, image)
}
