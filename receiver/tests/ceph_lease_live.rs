//! Group leases between two receivers on a real cluster (the testbed,
//! started once for this binary, or the one `CEPH_CONF` names; feature
//! `ceph`), with a 3 s lease: the owner's renewals keep the group its own
//! well past the lease; once it stops renewing (a dead or frozen
//! receiver), the other takes the group over after the lease, fencing it
//! first, and goes on from exactly what was acknowledged; the old owner,
//! resumed, writes and commits nothing.
//!
//! Without Ceph installed the test skips with a message; under `CI` it
//! fails instead (CI installs ceph-mon, ceph-osd and ceph-common).

use std::time::{Duration, Instant};
use tidemark_ceph::{testbed, Cluster, RadosCluster};
use tidemark_changelog::{DiskId, Entry, Record, Seq};
use tidemark_names::Name;
use tidemark_receiver::lease::LeaseConfig;
use tidemark_receiver::store::ceph::{CephEngine, CephGroup, XATTR_OWNER};
use tidemark_receiver::store::{ChunkRef, Disk, Purpose, StoreError};

const SIZE: u64 = 1 << 20;
const LEASE: Duration = Duration::from_secs(3);

fn client(tb: &testbed::Testbed, namespace: &str) -> RadosCluster {
    tb.connect(namespace, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

fn receiver(tb: &testbed::Testbed, namespace: &str, advertise: &str) -> CephEngine<RadosCluster> {
    let config = LeaseConfig {
        duration: LEASE,
        blocklist_expire: Duration::from_secs(600),
    };
    CephEngine::with_lease(client(tb, namespace), advertise, config)
        .unwrap_or_else(|e| panic!("lease keeper: {e}"))
}

fn read(g: &CephGroup<RadosCluster>) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    g.view(None).unwrap().read(DiskId(0), 0, &mut buf).unwrap();
    buf
}

fn record(seq: u64, entry: Entry<'_>) -> Record {
    Record::decode(&entry.encode(seq, 1)).unwrap()
}

fn commit_counter(c: &RadosCluster) -> Vec<u8> {
    c.xattrs("h1+g+state").unwrap()["commit"].clone()
}

#[test]
fn a_group_is_taken_over_from_a_receiver_that_stopped_renewing_and_it_writes_nothing() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let namespace = format!("lease-{}", std::process::id());
    let (host, group) = (Name::from_static("h1"), Name::from_static("g"));
    let observer = client(tb, &namespace);

    // The first receiver creates the group under its lease (the lock
    // creates the state object; its holder gives it its attributes).
    let first = receiver(tb, &namespace, "r1.test:7480");
    let mut old = first.open_group(&host, &group).unwrap();
    old.ensure_disks(&[Disk {
        id: DiskId(0),
        name: Name::from_static("data"),
        size: SIZE,
    }])
    .unwrap();
    let mut source: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    old.apply_chunk(DiskId(0), 0, ChunkRef::Data(&source), Purpose::InitialSync)
        .unwrap();
    old.apply_record(&record(1, Entry::barrier(0))).unwrap();
    let acked = old.commit().unwrap();
    assert_eq!(acked.durable_seq, Seq(1));

    // Renewed: still its own after twice the lease.
    let second = receiver(tb, &namespace, "r2.test:7480");
    let started = Instant::now();
    while started.elapsed() < 2 * LEASE {
        match second.open_group(&host, &group) {
            Err(StoreError::OwnedElsewhere { owner, .. }) => {
                assert_eq!(owner.as_deref(), Some("r1.test:7480"))
            }
            other => panic!("a renewed group opened elsewhere: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    // The owner still commits meanwhile.
    let data = vec![0xa5u8; 4096];
    old.apply_record(&record(2, Entry::write(0, 8192, &data, 0)))
        .unwrap();
    old.apply_record(&record(3, Entry::barrier(0))).unwrap();
    let acked = old.commit().unwrap();
    source[8192..8192 + 4096].copy_from_slice(&data);

    // The first receiver stops renewing without letting the group go (as
    // if it died or froze); its store stays open, unaware.
    first.abandon();
    let stopped = Instant::now();
    let mut new = loop {
        match second.open_group(&host, &group) {
            Ok(g) => break g,
            Err(StoreError::OwnedElsewhere { .. }) if stopped.elapsed() < 4 * LEASE => {
                std::thread::sleep(Duration::from_millis(250))
            }
            Err(e) => panic!(
                "no takeover {:?} after the last renewal: {e}",
                stopped.elapsed()
            ),
        }
    };
    let took = stopped.elapsed();
    eprintln!("taken over {took:?} after the owner's renewals stopped (lease {LEASE:?})");
    assert!(
        took >= LEASE - Duration::from_secs(1),
        "taken over too early: {took:?}"
    );
    assert_eq!(
        new.position(),
        acked,
        "the new owner goes on from the last commit"
    );
    assert_eq!(read(&new), source);
    assert_eq!(
        observer.xattrs("h1+g+state").unwrap()[XATTR_OWNER],
        b"r2.test:7480"
    );
    let stats = second.lease_stats().unwrap();
    assert_eq!((stats.takeovers, stats.owned), (1, 1));

    // The old owner resumes: nothing it does lands.
    let counter = commit_counter(&observer);
    let stale = vec![0xeeu8; 4096];
    let _ = old.apply_record(&record(4, Entry::write(0, 0, &stale, 0)));
    let _ = old.apply_chunk(DiskId(0), 65536, ChunkRef::Data(&stale), Purpose::Resync);
    assert!(old.commit().is_err(), "the fenced receiver committed");
    assert_eq!(
        commit_counter(&observer),
        counter,
        "the fenced receiver advanced the commit"
    );
    assert_eq!(read(&new), source, "the fenced receiver changed the disk");

    // The new owner goes on, its commits asserting its lock.
    new.apply_record(&record(4, Entry::write(0, 0, &data, 0)))
        .unwrap();
    new.apply_record(&record(5, Entry::barrier(0))).unwrap();
    let position = new.commit().unwrap();
    assert_eq!(position.durable_seq, Seq(5));
    source[..4096].copy_from_slice(&data);
    assert_eq!(read(&new), source);
    assert_ne!(commit_counter(&observer), counter);
}
