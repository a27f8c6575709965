//! The VM spec travels with the group: tracker → shipper → receiver with
//! the shipper's `vm-spec` set. The receiver keeps it with the replica; a
//! change on the protected site arrives as a new version that applies from
//! then on, while an older recovery point keeps the version of its time
//! (`tidemark vm spec --point`); a spec that does not parse is refused
//! (the shipper's status says why) and replication goes on; `failover
//! --boot` with no file resolves the point's replicated spec (seen by the
//! NIC it refuses to leave unmapped, before anything is written), and a
//! group without a spec names what to do.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use tidemark_e2e::replication::{
    enroll, free_port, newest_point, run_ok, shipper_status, start_receiver_at, wait_caught_up,
    Daemon, HOST,
};
use tidemark_e2e::{qemu_io, refused, require_tool, tidemark, TrackerProcess};

const SIZE: u64 = 8 << 20;
const CATCH_UP: Duration = Duration::from_secs(60);

/// A spec of the tracker's one disk with `cpus` CPUs and a NIC on `bridge`.
fn spec(cpus: u32, bridge: &str) -> String {
    format!(
        "[vm]\nname = \"web1\"\ncpus = {cpus}\nmemory = \"256MiB\"\n\n\
         [[vm.disk]]\nname = \"disk\"\npath = \"/var/lib/images/web1.raw\"\nformat = \"raw\"\n\n\
         [[vm.nic]]\nbridge = \"{bridge}\"\nmac = \"52:54:00:12:34:56\"\n"
    )
}

/// `tidemark shipper run --config` with the shipper's settings plus
/// `extra` lines of its `[shipper]` table.
fn start_shipper(dir: &Path, log_dir: &Path, hpki: &Path, port: u16, extra: &str) -> Daemon {
    let config = dir.join("shipper.toml");
    fs::write(
        &config,
        format!(
            "[shipper]\nhost = \"{HOST}\"\nreceiver = \"127.0.0.1:{port}\"\nlog-dir = \"{}\"\n\
             control-socket = \"{}\"\nmetrics-listen = \"127.0.0.1:0\"\n{extra}\n\
             [shipper.tls]\nca = \"{h}/ca.crt\"\ncert = \"{h}/host.crt\"\nkey = \"{h}/host.key\"\n",
            log_dir.display(),
            dir.join("shipper.ctl").display(),
            h = hpki.display()
        ),
    )
    .unwrap();
    let child = tidemark()
        .args(["shipper", "run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("shipper.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap();
    Daemon::new(child, "shipper")
}

/// `tidemark vm spec ... --json` with `args`, parsed.
fn vm_spec(dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = run_ok(
        tidemark()
            .args(["vm", "spec", "--json", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST])
            .args(args),
    );
    serde_json::from_str(&out).unwrap()
}

/// Waits until `check` holds of the current replicated spec's JSON (or
/// of the `vm spec` command's failure, `None`).
fn wait_spec(dir: &Path, what: &str, check: impl Fn(Option<&serde_json::Value>) -> bool) {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let out = tidemark()
            .args(["vm", "spec", "--json", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST])
            .output()
            .unwrap();
        let v = out
            .status
            .success()
            .then(|| serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap());
        if check(v.as_ref()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen in {CATCH_UP:?}; last {v:?}\nshipper log:\n{}",
            fs::read_to_string(dir.join("shipper.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the shipper's status says `want` of the VM spec.
fn wait_status(dir: &Path, log_dir: &Path, want: &str) -> String {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let said = shipper_status(log_dir)
            .and_then(|s| s["vm_spec"].as_str().map(str::to_string))
            .unwrap_or_default();
        if said.contains(want) {
            return said;
        }
        assert!(
            Instant::now() < deadline,
            "the shipper's status never said {want:?} of the VM spec (last {said:?})\n{}",
            fs::read_to_string(dir.join("shipper.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `tidemark failover --boot` (no file) at `point`: refused before
/// anything is written, for the NIC's unmapped network; returns stderr.
fn boot_refusal(dir: &Path, point: u64) -> String {
    let to = dir.join(format!("failover-{point}"));
    let out = refused(
        tidemark()
            .args(["failover", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--point", &point.to_string(), "--to"])
            .arg(&to)
            .arg("--boot"),
    );
    assert!(!to.exists(), "nothing is written before the VM is checked");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_vm_spec_travels_with_the_group_and_each_point_boots_its_version() {
    const TEST: &str = "the_vm_spec_travels_with_the_group_and_each_point_boots_its_version";
    if !require_tool("qemu-io", TEST) {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let port = free_port();
    let receiver = start_receiver_at(&dir.join("replicas"), dir, &rpki, port);

    // Replicated without a spec: the replica has none, and says what to do.
    let shipper = start_shipper(dir, &log_dir, &hpki, port, "");
    qemu_io(tracker.uri(), &["write -P 1 0 64k", "flush"]);
    wait_caught_up(dir, &log_dir, CATCH_UP);
    let out = refused(
        tidemark()
            .args(["vm", "spec", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST]),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("holds no VM spec") && err.contains("vm-spec"),
        "{err}"
    );
    drop(shipper);

    // The shipper names the spec: it arrives when the session starts and
    // applies from the next record.
    let spec_file = dir.join("web1.toml");
    fs::write(&spec_file, spec(1, "lan1")).unwrap();
    let shipper = start_shipper(
        dir,
        &log_dir,
        &hpki,
        port,
        &format!("vm-spec = \"{}\"", spec_file.display()),
    );
    let t = Instant::now();
    wait_spec(dir, "the first version", |v| {
        v.is_some_and(|v| v["cpus"] == 1)
    });
    let arrived = t.elapsed();
    wait_status(dir, &log_dir, "kept from record");
    qemu_io(tracker.uri(), &["write -P 2 64k 64k", "flush"]);
    wait_caught_up(dir, &log_dir, CATCH_UP);
    let first_point = newest_point(dir);
    let v = vm_spec(dir, &["--point", &first_point.to_string()]);
    assert_eq!(
        (v["cpus"].as_u64(), v["vm"].as_str()),
        (Some(1), Some("web1"))
    );
    assert!(v["text"].as_str().unwrap().contains("lan1"));

    // Changed on the protected site: a new version arrives while the
    // session runs; the older point keeps its own.
    fs::write(&spec_file, spec(2, "lan2")).unwrap();
    let t = Instant::now();
    wait_spec(dir, "the changed version", |v| {
        v.is_some_and(|v| v["cpus"] == 2)
    });
    let changed = t.elapsed();
    qemu_io(tracker.uri(), &["write -P 3 128k 64k", "flush"]);
    wait_caught_up(dir, &log_dir, CATCH_UP);
    let second_point = newest_point(dir);
    assert!(second_point > first_point);
    let at = |p: u64| vm_spec(dir, &["--point", &p.to_string()])["cpus"].as_u64();
    assert_eq!(
        at(first_point),
        Some(1),
        "the older point keeps its version"
    );
    assert_eq!(at(second_point), Some(2));
    let all = run_ok(
        tidemark()
            .args(["vm", "spec", "--all", "--json", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST]),
    );
    assert_eq!(all.lines().count(), 2, "{all}");
    // For people: the spec file as it came, after a comment naming its
    // version (so the output is a spec file itself).
    let text = run_ok(
        tidemark()
            .args(["vm", "spec", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--point", &first_point.to_string()]),
    );
    let (comment, body) = text.split_once('\n').unwrap();
    assert!(
        comment.starts_with("# the VM spec of ") && comment.contains(&first_point.to_string()),
        "{text}"
    );
    assert_eq!(body, spec(1, "lan1"));

    // A spec that does not parse is refused, said in the shipper's
    // status, and replication goes on with the last good version kept.
    fs::write(&spec_file, "[vm]\nname = \"web1\"\ncpus = 0\n").unwrap();
    let said = wait_status(dir, &log_dir, "refused");
    assert!(said.contains("not a valid VM spec"), "{said}");
    qemu_io(tracker.uri(), &["write -P 4 192k 64k", "flush"]);
    wait_caught_up(dir, &log_dir, CATCH_UP);
    assert_eq!(vm_spec(dir, &[])["cpus"].as_u64(), Some(2));
    let receiver_log = fs::read_to_string(dir.join(format!("receiver-{port}.log"))).unwrap();
    assert!(receiver_log.contains("VM spec refused"), "{receiver_log}");

    drop(shipper);
    drop(receiver);
    assert!(tracker.stop());

    // --boot with no file (the failover takes the replica: the receiver
    // is stopped): each point's own spec, seen by its NIC's network that
    // is refused unmapped.
    let err = boot_refusal(dir, first_point);
    assert!(err.contains("\"lan1\""), "{err}");
    let err = boot_refusal(dir, second_point);
    assert!(err.contains("\"lan2\""), "{err}");
    println!(
        "vm spec: first version kept {:.1} s after the shipper started, a change {:.1} s after \
         the file changed; whole test {:.1} s",
        arrived.as_secs_f64(),
        changed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
