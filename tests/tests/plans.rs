//! Recovery plans end to end: two consistency groups of a protected host
//! replicate on loopback; a plan with two steps, hooks and a pause is
//! dry-run, run as a test (each point served while replication goes on),
//! run as a planned failover (each host drained, nothing lost), and run
//! unplanned with its pause left unanswered (it stops after the first
//! step); a failing hook stops a plan before anything is done.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tidemark_e2e::replication::{
    enroll, free_port, start_receiver, start_shipper_with, wait_caught_up, HOST,
};
use tidemark_e2e::{qemu_io, require_tool, tidemark, TrackerProcess};

const TEST: &str = "a_recovery_plan_tests_fails_over_in_order_and_stops_at_failures";
const SIZE: u64 = 32 << 20;

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("running tidemark");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write_plan(dir: &Path, name: &str, to: &Path, step1_pre: &str) -> PathBuf {
    let log = dir.join("hooks.log");
    let text = format!(
        r#"[plan]
description = "two tiers"
data-dir = "{data}"
to = "{to}"
test-socket-dir = "{sockets}"
hook-timeout = "30s"
drain-timeout = "2m"

[[plan.step]]
name = "databases"
groups = ["{HOST}/db"]
pre = ['{step1_pre}', 'echo "pre $TIDEMARK_PLAN_MODE $TIDEMARK_STEP $TIDEMARK_GROUPS" >> {log}']
post = ['echo "post $TIDEMARK_STEP $TIDEMARK_TEST_SOCKETS" >> {log}']
pause = "check the database"

[[plan.step]]
name = "applications"
groups = ["{HOST}/app"]
post = ['echo "post $TIDEMARK_STEP" >> {log}']
"#,
        data = dir.join("replicas").display(),
        to = to.display(),
        sockets = dir.join("sockets").display(),
        log = log.display(),
    );
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

fn take_log(dir: &Path) -> Vec<String> {
    let path = dir.join("hooks.log");
    let text = fs::read_to_string(&path).unwrap_or_default();
    let _ = fs::remove_file(&path);
    text.lines().map(str::to_string).collect()
}

#[test]
fn a_recovery_plan_tests_fails_over_in_order_and_stops_at_failures() {
    if !require_tool("qemu-io", TEST) || !require_tool("nbdcopy", TEST) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);

    // Two groups of one host, each with its tracker and shipper.
    let mut tiers = Vec::new();
    for (group, pattern) in [("db", "0x44"), ("app", "0x41")] {
        let sub = dir.join(group);
        fs::create_dir(&sub).unwrap();
        let image = sub.join("disk.img");
        fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
        let tracker = TrackerProcess::start(&sub, &image, &["--group", group]);
        let shipper = start_shipper_with(
            dir,
            &tracker.log_dir,
            &hpki,
            port,
            &[
                "--group".as_ref(),
                group.as_ref(),
                "--tracker-control-socket".as_ref(),
                tracker.control.as_os_str(),
            ],
        );
        qemu_io(
            tracker.uri(),
            &[&format!("write -P {pattern} 1M 2M"), "flush"],
        );
        wait_caught_up(dir, &tracker.log_dir, Duration::from_secs(120));
        tiers.push((group, image, tracker, shipper));
    }

    // Dry run: the steps and commands, the replicas' state, nothing run.
    let failover = dir.join("failover");
    let plan = write_plan(dir, "plan.toml", &failover, "true");
    let (ok, out, err) = run(tidemark()
        .args(["plan", "run", "--planned", "--dry-run"])
        .arg(&plan));
    assert!(ok, "{out}{err}");
    for want in [
        "step 1/2: databases",
        "step 2/2: applications",
        "tidemark failover --data-dir",
        "--group db --planned --timeout 2m",
        "replica: consistent",
        "pause: check the database",
        "dry run: nothing was run",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    assert!(!failover.exists());
    assert!(take_log(dir).is_empty(), "a dry run ran hooks");
    assert!(tiers.iter().all(|t| t.2.control.exists()));

    // Test: each group's point is served; at the pause the test reads the
    // database's export and compares it with the source.
    let mut child = tidemark()
        .args(["plan", "run", "--test"])
        .arg(&plan)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(dir.join("plan-test.log")).unwrap())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut wait_for = |prefix: &str, seen: &mut Vec<String>| loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("the plan ended before {prefix:?}: {seen:#?}"))
            .unwrap();
        seen.push(line.clone());
        if line.starts_with(prefix) {
            return;
        }
    };
    wait_for("paused: check the database", &mut seen);
    let socket = dir.join("sockets").join(format!("{HOST}-db.sock"));
    let copy = dir.join("db-test.img");
    let status = Command::new("nbdcopy")
        .arg(format!("nbd+unix:///disk?socket={}", socket.display()))
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(
        fs::read(&copy).unwrap() == fs::read(&tiers[0].1).unwrap(),
        "the test export differs from the source"
    );
    writeln!(stdin).unwrap();
    wait_for("test failover of 2 groups is running", &mut seen);
    writeln!(stdin).unwrap();
    wait_for("plan complete", &mut seen);
    assert!(child.wait().unwrap().success(), "{seen:#?}");
    let log = take_log(dir);
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[0], format!("pre test databases {HOST}/db"));
    assert_eq!(
        log[1],
        format!("post databases {HOST}/db={}", socket.display())
    );
    assert_eq!(log[2], "post applications");
    assert!(!socket.exists(), "the test left its socket");
    for (group, ..) in &tiers {
        let test_dir = dir
            .join("replicas")
            .join(HOST)
            .join(group)
            .join("test-failover");
        assert!(!test_dir.join("pin").exists(), "the test left its pin");
    }
    // The test did not touch the protected side.
    assert!(tiers.iter().all(|t| t.2.control.exists()));

    // Unwritten (no flush) data on both hosts: a planned failover loses
    // none of it, and runs the steps in order.
    for (_, _, tracker, _) in &tiers {
        qemu_io(tracker.uri(), &["write -P 0x77 9M 1M"]);
    }
    let mut child = tidemark()
        .args(["plan", "run", "--planned"])
        .arg(&plan)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(dir.join("plan-planned.log")).unwrap())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        fs::read_to_string(dir.join("plan-planned.log")).unwrap()
    );
    assert!(stdout.contains("plan complete"), "{stdout}");
    let db = stdout.find("nothing was lost").unwrap();
    let app = stdout.rfind("nothing was lost").unwrap();
    assert!(db < app, "two planned failovers: {stdout}");
    for (group, image, tracker, _) in &tiers {
        assert!(!tracker.control.exists(), "the {group} tracker still runs");
        let img = failover.join(HOST).join(group).join("disk.img");
        assert!(
            fs::read(&img).unwrap() == fs::read(image).unwrap(),
            "the planned failover of {group} lost data"
        );
    }
    let log = take_log(dir);
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(log[0].starts_with("pre planned databases"), "{log:?}");
    assert_eq!(log[2], "post applications");
    for (_, _, _, shipper) in tiers {
        assert!(shipper.stop().success());
    }
    assert!(receiver.stop().success());

    // Unplanned, with nobody to answer the pause: the first step runs,
    // then the plan stops and says so.
    let unplanned = dir.join("unplanned");
    let plan = write_plan(dir, "unplanned.toml", &unplanned, "true");
    let (ok, out, err) = run(tidemark()
        .args(["plan", "run", "--unplanned"])
        .arg(&plan)
        .stdin(Stdio::null()));
    assert!(!ok, "{out}");
    assert!(err.contains("nobody answered"), "{err}");
    assert!(unplanned.join(HOST).join("db").join("disk.img").exists());
    assert!(!unplanned.join(HOST).join("app").exists());
    assert_eq!(take_log(dir).len(), 2);

    // A failing hook stops the plan before its step's failovers.
    let plan = write_plan(dir, "failing.toml", &dir.join("never"), "exit 3");
    let (ok, out, err) = run(tidemark()
        .args(["plan", "run", "--unplanned"])
        .arg(&plan)
        .stdin(Stdio::null()));
    assert!(!ok, "{out}");
    assert!(err.contains("pre-hook `exit 3` failed"), "{err}");
    assert!(err.contains("no step was completed"), "{err}");
    assert!(!dir.join("never").exists());
    assert!(take_log(dir).is_empty());
}
