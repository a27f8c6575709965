//! The cluster stops answering (its OSD is frozen with SIGSTOP, as the
//! outage tests do; a memstore OSD must never be killed): an operation fails
//! with `TimedOut` within the configured op timeout instead of blocking, and
//! the same client works again once the OSD resumes. Its own binary, so its
//! own testbed: freezing the OSD would stall the other live tests.

use std::process::Command;
use std::time::{Duration, Instant};
use tidemark_ceph::{testbed, CephError, Cluster, WriteOp};

/// Sends SIGCONT to the frozen OSD when dropped, whatever the test's outcome.
struct Frozen(String);

impl Frozen {
    /// Stops the process and waits until every one of its threads is
    /// stopped (the signal reaches a busy thread only when it is next
    /// scheduled).
    fn freeze(pid: &str) -> Frozen {
        assert!(Command::new("kill")
            .args(["-STOP", pid])
            .status()
            .unwrap()
            .success());
        let frozen = Frozen(pid.to_owned());
        let stopped = || {
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
            tasks.flatten().all(|t| {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                // The state follows the command name in parentheses.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T'))
            })
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !stopped() {
            assert!(Instant::now() < deadline, "the OSD did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

#[test]
fn an_unanswering_osd_times_out_and_the_client_recovers() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let Some(dir) = &tb.dir else {
        return eprintln!("skipping: the cluster named by CEPH_CONF is not ours to freeze");
    };
    let c = tb.connect("outage", Duration::from_secs(2)).unwrap();
    c.operate("o", &WriteOp::new().write_full(b"before"))
        .unwrap();
    c.image_create("img", 1 << 20).unwrap();
    let image = c.image_open("img").unwrap();
    image.write(0, &[1; 4096]).unwrap();
    let pid = std::fs::read_to_string(dir.join("run/osd.0.pid")).unwrap();
    let frozen = Frozen::freeze(pid.trim());
    let start = Instant::now();
    let err = c
        .operate("o", &WriteOp::new().write_full(b"during"))
        .unwrap_err();
    let waited = start.elapsed();
    assert!(
        matches!(
            err,
            CephError::TimedOut {
                op: "rados_write_op_operate"
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_fenced());
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(20),
        "{waited:?}"
    );
    // RBD I/O goes through the same client, so the same timeout applies.
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let start = Instant::now();
        let result = image.write(0, &[1; 4096]);
        let _ = tx.send((result, start.elapsed()));
        image
    });
    let (result, image_waited) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("an RBD write blocked past the op timeout");
    assert!(
        matches!(result, Err(CephError::TimedOut { .. })),
        "{result:?}"
    );
    drop(frozen);
    let image = writer.join().unwrap();
    image.write(0, &[2; 4096]).unwrap();
    image.flush().unwrap();
    eprintln!("rbd write timed out after {image_waited:?}");
    // The same client works again; the timed-out write may or may not have
    // been applied (a timed-out op can still land), so only a new write is checked.
    c.operate("o", &WriteOp::new().write_full(b"after"))
        .unwrap();
    assert_eq!(c.read("o", 0, 16).unwrap(), b"after");
    eprintln!("op timed out after {waited:?}");
}
