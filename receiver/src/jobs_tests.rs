//! The registry's rules, on the pure book and on a simulated directory.

use super::*;
use proptest::prelude::*;
use tidemark_durable::SimDir;
use tidemark_wire::Progress;

const S: u64 = 1_000_000_000;

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

fn report(state: ReportState, done: u64, total: u64) -> StatusReport {
    let progress = Progress { done, total };
    StatusReport {
        state,
        reason: if state == ReportState::Critical {
            "the receiver refused the disk".into()
        } else {
            String::new()
        },
        pending_records: 0,
        pending_bytes: 0,
        lag_ms: 0,
        wire_bytes_per_sec: 0,
        record_bytes_per_sec: 0,
        sync: if state == ReportState::InitialSync {
            progress
        } else {
            Progress::default()
        },
        sync_bytes_per_sec: 0,
        resync: if state == ReportState::Resyncing {
            progress
        } else {
            Progress::default()
        },
    }
}

/// Writes what `book` asks into `dir`.
fn write(book: &mut JobBook, dir: &SimDir, now: u64, force: bool) {
    if let Some(w) = book.poll_write(now, force) {
        replace(dir, JOBS_TMP, JOBS_FILE, &w.bytes, w.durability).unwrap();
    }
}

#[test]
fn ids_grow_and_are_never_given_twice_even_after_a_restart_and_a_trim() {
    let (h, g) = (name("db1"), name("default"));
    let dir = SimDir::new();
    let mut book = open_in(&dir, 0).unwrap();
    let a = book.handle_start(JobKind::TestFailover, &h, &g, "alice", S);
    let b = book.handle_start(JobKind::Failover, &h, &g, "alice", 2 * S);
    assert!(a < b);
    book.handle_end(a, JobState::Done, 3 * S);
    book.handle_end(b, JobState::Done, 3 * S);
    write(&mut book, &dir, 3 * S, false);

    let mut again = open_in(&dir, 4 * S).unwrap();
    let c = again.handle_start(JobKind::TestFailover, &h, &g, "bob", 5 * S);
    assert!(c > b, "{c} after {b}");
    // Every finished job forgotten: the next id is still kept.
    for i in 0..MAX_FINISHED as u64 + 5 {
        let id = again.handle_start(JobKind::TestFailover, &h, &g, "bob", (6 + i) * S);
        again.handle_end(id, JobState::Done, (6 + i) * S);
    }
    assert_eq!(
        again.job(c).unwrap().state,
        JobState::Running,
        "a running job is kept"
    );
    write(&mut again, &dir, 500 * S, false);
    let third = open_in(&dir, 501 * S).unwrap();
    assert!(third.jobs().iter().all(|j| j.id > b));
    assert_eq!(third.next_id(), again.next_id());
}

#[test]
fn the_registry_keeps_every_running_job_and_the_newest_finished_ones() {
    let (h, g) = (name("db1"), name("default"));
    let mut book = JobBook::default();
    let running = book.handle_start(JobKind::InitialSync, &h, &g, BY_SHIPPER, 0);
    let mut last = running;
    for i in 0..(MAX_FINISHED as u64 + 30) {
        last = book.handle_start(JobKind::TestFailover, &h, &g, "alice", i);
        book.handle_end(last, JobState::Failed("no point".into()), i + 1);
    }
    let finished: Vec<_> = book.jobs().iter().filter(|j| j.state.ended()).collect();
    assert_eq!(finished.len(), MAX_FINISHED);
    assert_eq!(finished.last().unwrap().id, last, "the newest kept");
    assert_eq!(
        finished.first().unwrap().id,
        JobId(last.0 + 1 - MAX_FINISHED as u64),
        "the oldest forgotten"
    );
    assert_eq!(book.jobs()[0].id, running, "a running job is never dropped");
    assert_eq!(book.jobs()[0].state, JobState::Running);
}

#[test]
fn a_job_running_when_the_receiver_died_reads_back_interrupted() {
    let (h, g) = (name("db1"), name("default"));
    let dir = SimDir::new();
    let mut book = open_in(&dir, 0).unwrap();
    let sync = book.handle_start(JobKind::InitialSync, &h, &g, BY_SHIPPER, S);
    book.handle_progress(sync, 10, 100, 2 * S);
    let test = book.handle_start(JobKind::TestFailover, &h, &g, "alice", 2 * S);
    write(&mut book, &dir, 2 * S, false);
    // The power is cut: only what was durable is there.
    let after = SimDir::from_files(dir.after_power_cut());
    let mut back = open_in(&after, 9 * S).unwrap();
    for id in [sync, test] {
        let job = back.job(id).unwrap();
        assert_eq!(
            job.state,
            JobState::Interrupted(INTERRUPTED_BY_RESTART.into()),
            "{job:?}"
        );
        assert_eq!(job.ended_ns, Some(9 * S));
        assert_eq!(job.eta(10 * S), None);
    }
    // And that is written durably at once.
    let w = back.poll_write(9 * S, false).unwrap();
    assert_eq!(w.durability, Durability::Durable);
    // An end told after the restart changes nothing.
    back.handle_end(test, JobState::Done, 10 * S);
    assert_eq!(back.job(test).unwrap().state.word(), "interrupted");
}

#[test]
fn a_start_survives_a_power_cut_at_every_sync_and_the_file_is_never_torn() {
    let (h, g) = (name("db1"), name("default"));
    let probe = SimDir::new();
    let mut book = open_in(&probe, 0).unwrap();
    book.handle_start(JobKind::Failover, &h, &g, "alice", S);
    let before = probe.syncs();
    write(&mut book, &probe, S, false);
    let syncs = probe.syncs() - before;
    assert!(syncs >= 1);
    for cut in 1..=syncs + 1 {
        let dir = SimDir::new();
        let mut book = open_in(&dir, 0).unwrap();
        dir.cut_power_at_sync(dir.syncs() + cut);
        let id = book.handle_start(JobKind::Failover, &h, &g, "alice", S);
        let w = book.poll_write(S, false).unwrap();
        let written = replace(&dir, JOBS_TMP, JOBS_FILE, &w.bytes, w.durability).is_ok();
        let after = SimDir::from_files(dir.after_power_cut());
        let back = read(&after, 2 * S).expect("never torn");
        match (written, back) {
            (true, Some(b)) => assert_eq!(b.job(id).unwrap().state.word(), "interrupted"),
            (true, None) => panic!("cut at sync {cut}: a written start was lost"),
            (false, _) => {}
        }
    }
}

#[test]
fn a_damaged_file_is_a_typed_error_and_is_set_aside_keeping_ids_unique() {
    let (h, g) = (name("db1"), name("default"));
    let dir = SimDir::new();
    let mut book = open_in(&dir, 0).unwrap();
    for _ in 0..7 {
        book.handle_start(JobKind::TestFailover, &h, &g, "alice", S);
    }
    write(&mut book, &dir, S, false);
    let mut bytes = dir.files()[JOBS_FILE].clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    assert!(matches!(
        JobBook::from_bytes(&bytes, 2 * S),
        Err(JobsFileError::Damaged(_))
    ));
    dir.put(JOBS_FILE, bytes.clone());
    let mut fresh = open_in(&dir, 2 * S).unwrap();
    assert!(fresh.jobs().is_empty());
    assert!(fresh.next_id() >= 8, "{}", fresh.next_id());
    assert_eq!(dir.files()[JOBS_DAMAGED], bytes, "set aside as it was");
    // The fresh registry is written at once, so its next id is kept.
    let next = fresh.next_id();
    write(&mut fresh, &dir, 2 * S, false);
    assert_eq!(read(&dir, 3 * S).unwrap().unwrap().next_id(), next);

    // Damage that took the next id itself: ids go on above the clock.
    let mut bytes = dir.files()[JOBS_FILE].clone();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let at = text.find("\"next-id\":").unwrap();
    bytes[at + 1] = b'N';
    dir.put(JOBS_FILE, bytes);
    let now = 1_800_000_000 * S;
    let again = open_in(&dir, now).unwrap();
    assert!(again.next_id() >= now / 1_000_000, "{}", again.next_id());

    // Sealed but not a registry, or breaking its rules: typed errors.
    let not_json = seal("{\"version\":1").into_bytes();
    assert!(matches!(
        JobBook::from_bytes(&not_json, 0),
        Err(JobsFileError::Decode(_))
    ));
    let future = seal("{\"version\":9,\"next-id\":1,\"jobs\":[]}").into_bytes();
    assert!(matches!(
        JobBook::from_bytes(&future, 0),
        Err(JobsFileError::Version(9))
    ));
    let mut one = JobBook::default();
    one.handle_start(JobKind::Failover, &h, &g, "alice", S);
    let text = String::from_utf8(one.to_bytes()).unwrap();
    let body = unseal(&text)
        .unwrap()
        .replace("\"next-id\":2", "\"next-id\":1");
    assert!(matches!(
        JobBook::from_bytes(seal(&body).as_bytes(), 0),
        Err(JobsFileError::Inconsistent(_))
    ));
}

#[test]
fn the_shippers_reports_make_sync_and_resync_jobs_with_progress_and_an_eta() {
    let (h, g) = (name("db1"), name("default"));
    let mut book = JobBook::default();
    book.handle_report(&h, &g, &report(ReportState::InitialSync, 0, 1000), 0);
    book.handle_report(&h, &g, &report(ReportState::InitialSync, 250, 1000), 10 * S);
    let sync = book.running(JobKind::InitialSync, &h, &g).unwrap();
    let job = book.job(sync).unwrap();
    assert_eq!(
        (job.done, job.total, job.by.as_str()),
        (250, 1000, BY_SHIPPER)
    );
    assert_eq!(job.fraction(), Some(0.25));
    // 250 in 10 s: 750 left take 30 s.
    assert_eq!(job.eta(10 * S), Some(Duration::from_secs(30)));
    book.handle_report(&h, &g, &report(ReportState::Protected, 0, 0), 20 * S);
    let job = book.job(sync).unwrap();
    assert_eq!((&job.state, job.done), (&JobState::Done, 1000));
    assert_eq!(job.ended_ns, Some(20 * S));
    assert_eq!(book.running(JobKind::InitialSync, &h, &g), None);
    // Another report while protected starts nothing.
    book.handle_report(&h, &g, &report(ReportState::Protected, 0, 0), 21 * S);
    assert_eq!(book.jobs().len(), 1);

    // A resync that ends critical fails with the shipper's reason.
    book.handle_report(&h, &g, &report(ReportState::Resyncing, 5, 50), 30 * S);
    let resync = book.running(JobKind::Resync, &h, &g).unwrap();
    assert!(resync > sync);
    book.handle_report(&h, &g, &report(ReportState::Critical, 0, 0), 31 * S);
    assert_eq!(
        book.job(resync).unwrap().state,
        JobState::Failed("the receiver refused the disk".into())
    );
    // Another group's report touches none of these.
    book.handle_report(
        &name("db2"),
        &g,
        &report(ReportState::Resyncing, 1, 2),
        32 * S,
    );
    assert_eq!(book.jobs().iter().filter(|j| !j.state.ended()).count(), 1);
}

#[test]
fn progress_alone_is_written_without_a_sync_and_not_more_often_than_it_should() {
    let (h, g) = (name("db1"), name("default"));
    let mut book = JobBook::default();
    let id = book.handle_start(JobKind::InitialSync, &h, &g, BY_SHIPPER, 0);
    assert_eq!(
        book.poll_write(0, false).unwrap().durability,
        Durability::Durable
    );
    book.handle_progress(id, 1, 10, S);
    assert_eq!(book.poll_write(S, false), None, "too soon");
    book.handle_progress(id, 2, 10, 11 * S);
    let w = book.poll_write(11 * S, false).unwrap();
    assert_eq!(w.durability, Durability::Visible);
    book.handle_progress(id, 3, 10, 12 * S);
    assert_eq!(book.poll_write(12 * S, false), None);
    assert!(
        book.poll_write(12 * S, true).is_some(),
        "forced at a session end"
    );
    assert_eq!(book.poll_write(13 * S, true), None, "nothing left");
}

proptest! {
    #[test]
    fn any_bytes_read_as_a_registry_or_a_typed_error_never_a_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        sealed in any::<bool>(),
    ) {
        let bytes = if sealed {
            seal(&String::from_utf8_lossy(&bytes)).into_bytes()
        } else {
            bytes
        };
        if let Ok(book) = JobBook::from_bytes(&bytes, 5) {
            prop_assert!(book.jobs().iter().all(|j| j.state.ended()));
        }
        let _ = next_id_of_damaged(&bytes);
    }
}
