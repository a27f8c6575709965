//! Span points end to end: three protected hosts, each with its own
//! tracker, log, shipper and certificate, and one receiver whose
//! configuration names the span. A writer makes each write depend on an
//! acknowledged write of the host before it (counter k to host A, once
//! acknowledged k to host B, once acknowledged k to host C): at every span
//! point (every one, not a sample), no host's disk as of its marker shows
//! a k that the host before it does not. Then a member's shipper dies: no
//! disk stalls beyond the tracker's own hold bound, no point is taken
//! without it, and points resume when it is back. Every member is failed
//! over to one span point (and test-failed-over): the images hold the
//! markers' state, in the same causal order.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_changelog::{DiskId, Seq};
use tidemark_e2e::replication::{enroll, free_port, run_ok, start_receiver_with, Daemon};
use tidemark_e2e::{tidemark, tidemark_bin, TrackerProcess};
use tidemark_names::Name;
use tidemark_receiver::span::{Outcome, SpanDir};
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

fn durable_points(data: &Path) -> Vec<(u64, Vec<Seq>)> {
    let dir = SpanDir::open(data, &Name::from_static("shop")).unwrap();
    dir.load()
        .unwrap()
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

#[test]
fn span_points_hold_across_three_hosts_and_survive_a_lost_member() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (rpki, first_pki) = enroll(root, HOSTS[0]);
    let mut pkis = vec![first_pki];
    for host in &HOSTS[1..] {
        pkis.push(enroll_second(root, &rpki, host));
    }
    let data = root.join("replicas");
    let port = free_port();
    let _receiver = start_receiver_with(
        &data,
        root,
        &rpki,
        port,
        &format!(
            "[[receiver.span]]\nname = \"shop\"\nmembers = [{}]\ninterval = \"1s\"\n",
            HOSTS
                .iter()
                .map(|h| format!("\"{h}/default\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let members: Vec<Member> = pkis
        .into_iter()
        .zip(HOSTS)
        .map(|(pki, host)| {
            let dir = root.join(host);
            std::fs::create_dir_all(&dir).unwrap();
            let image = dir.join("disk.img");
            std::fs::File::create(&image)
                .unwrap()
                .set_len(SIZE)
                .unwrap();
            let tracker = TrackerProcess::start(&dir, &image, &[]);
            Member { dir, pki, tracker }
        })
        .collect();
    let mut shippers: Vec<Option<Daemon>> = members
        .iter()
        .zip(HOSTS)
        .map(|(m, host)| Some(start_shipper(m, host, port)))
        .collect();

    // The causal writer: k on A, acknowledged, then on B, then on C.
    let stop = Arc::new(AtomicBool::new(false));
    let sockets: Vec<PathBuf> = members.iter().map(|m| m.tracker.socket.clone()).collect();
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut disks: Vec<Nbd> = sockets.iter().map(|s| Nbd::connect(s)).collect();
            let mut latencies = Vec::new();
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                k += 1;
                for disk in &mut disks {
                    latencies.push(disk.write_value(k));
                }
            }
            (k, latencies)
        })
    };

    let points = wait_points(&data, 4, Duration::from_secs(90));
    let mut moving = 0;
    for (point, markers) in &points {
        let label = format!("span-shop-{point}");
        for (host, marker) in HOSTS.iter().zip(markers) {
            let listed = run_ok(
                tidemark()
                    .args(["points", "--data-dir"])
                    .arg(&data)
                    .args(["--host", host, "--json"]),
            );
            assert!(
                listed.contains(&format!("\"seq\":{}", marker.get()))
                    || listed.contains(&format!("\"seq\": {}", marker.get())),
                "{host} lists no point at its marker {marker:?} of span point {point}: {listed}"
            );
            assert!(listed.contains(&label), "{host}: no marker {label}");
        }
        let values: Vec<u64> = HOSTS
            .iter()
            .zip(markers)
            .map(|(host, marker)| value_at(&data, host, *marker))
            .collect();
        eprintln!("span point {point}: the hosts show {values:?}");
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
    assert!(
        moving >= 2,
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

    // A member's shipper dies: nothing stalls, and no point is taken
    // without it.
    shippers[1].take().unwrap().kill();
    let taken = durable_points(&data).len();
    std::thread::sleep(Duration::from_secs(4));
    let without = durable_points(&data).len();
    assert!(
        without <= taken + 1,
        "points were taken without a member: {taken} → {without}"
    );
    shippers[1] = Some(start_shipper(&members[1], HOSTS[1], port));
    let after = wait_points(&data, without + 1, Duration::from_secs(60));
    eprintln!(
        "span points: {} before the shipper died, {} after it came back",
        taken,
        after.len()
    );

    stop.store(true, Ordering::Relaxed);
    let (rounds, mut latencies) = writer.join().unwrap();
    latencies.sort();
    let max = *latencies.last().unwrap();
    eprintln!(
        "{rounds} rounds of causal writes; acknowledgement p50 {:?}, p99 {:?}, max {:?}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        max
    );
    // A tracker never holds an acknowledgement past its own bound (500
    // ms) plus scheduling on a loaded machine.
    assert!(max < Duration::from_secs(3), "a write waited {max:?}");

    let listed = run_ok(
        tidemark()
            .args(["span", "points", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop"]),
    );
    for (point, _) in &after {
        assert!(listed.contains(&point.to_string()), "{listed}");
    }
    let every = run_ok(
        tidemark()
            .args(["span", "points", "--all", "--data-dir"])
            .arg(&data)
            .args(["--span", "shop"]),
    );
    eprintln!("every round:\n{every}");
}
