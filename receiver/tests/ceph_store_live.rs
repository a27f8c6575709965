//! The Ceph store engine on a real cluster (the testbed, started once for
//! this binary, or the one `CEPH_CONF` names; feature `ceph`): a group is
//! created, synced, written with barriers over small journal segments and
//! folded by retention; a second client (another process, as far as the
//! cluster knows) reopens it and every point it lists reads as the source
//! did, and the first client, fenced by that open, commits nothing more.
//!
//! Without Ceph installed the test skips with a message; under `CI` it
//! fails instead (CI installs ceph-mon, ceph-osd and ceph-common).

use std::time::Duration;
use tidemark_ceph::{testbed, Cluster, RadosCluster};
use tidemark_changelog::{DiskId, Entry, Record, Seq};
use tidemark_names::Name;
use tidemark_receiver::store::ceph::{CephEngine, CephGroup};
use tidemark_receiver::store::{ChunkRef, Disk, Purpose, Retention};

const SIZE: u64 = 1 << 20;

fn engine(tb: &testbed::Testbed, namespace: &str) -> CephEngine<RadosCluster> {
    let cluster = tb
        .connect(namespace, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("connect: {e}"));
    CephEngine::new(cluster, "ceph_store_live")
}

fn read(g: &CephGroup<RadosCluster>, seq: Option<Seq>) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    g.view(seq).unwrap().read(DiskId(0), 0, &mut buf).unwrap();
    buf
}

#[test]
fn a_group_replicates_reopens_and_folds_on_a_real_cluster() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let namespace = format!("store-{}", std::process::id());
    let (host, group) = (Name::from_static("h1"), Name::from_static("g"));
    let first = engine(tb, &namespace);
    let mut g = first.open_group(&host, &group).unwrap();
    g.set_segment_size(64 << 10);
    g.set_retention(Retention {
        window: Duration::MAX,
        max_points: 4,
        max_space: None,
        fold_interval: Duration::ZERO,
    });
    g.ensure_disks(&[Disk {
        id: DiskId(0),
        name: Name::from_static("data"),
        size: SIZE,
    }])
    .unwrap();

    // Initial sync: the source's first state, in 256 KiB chunks.
    let mut source: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    for at in (0..SIZE).step_by(256 << 10) {
        let chunk = &source[at as usize..(at + (256 << 10)) as usize];
        g.apply_chunk(DiskId(0), at, ChunkRef::Data(chunk), Purpose::InitialSync)
            .unwrap();
    }
    let mut seq = 0u64;
    let mut states: Vec<(Seq, Vec<u8>)> = Vec::new();
    let mut next = |entry: Entry<'_>| {
        seq += 1;
        Record::decode(&entry.encode(seq, 1)).unwrap()
    };
    g.apply_record(&next(Entry::barrier(0))).unwrap();
    g.commit().unwrap();
    states.push((Seq(1), source.clone()));

    // Writes and barriers, a commit after each: points, and folds of the
    // oldest ones past four.
    for round in 0..12u64 {
        for k in 0..5u64 {
            let offset = (round * 37 + k * 101) % 240 * 4096 + k * 3;
            let data = vec![(round * 5 + k) as u8 ^ 0x5a; 9000];
            let rec = next(Entry::write(0, offset, &data, round));
            g.apply_record(&rec).unwrap();
            source[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        let zero_at = (round * 13 % 200) * 4096;
        g.apply_record(&next(Entry::write_zeroes(0, zero_at, 8192, false, round)))
            .unwrap();
        source[zero_at as usize..zero_at as usize + 8192].fill(0);
        let barrier = next(Entry::barrier(round));
        let at = barrier.header.seq;
        g.apply_record(&barrier).unwrap();
        g.commit().unwrap();
        states.push((at, source.clone()));
    }
    let listed: Vec<Seq> = g.points().iter().map(|p| p.seq).collect();
    assert_eq!(listed.len(), 4, "retention keeps four points: {listed:?}");
    let position = g.position();

    // Another client reopens it (and so fences the first).
    let second = engine(tb, &namespace);
    let again = second.open_group(&host, &group).unwrap();
    assert_eq!(again.position(), position);
    assert_eq!(
        again.points().iter().map(|p| p.seq).collect::<Vec<_>>(),
        listed
    );
    for p in again.points() {
        let (_, want) = states.iter().find(|(s, _)| *s == p.seq).unwrap();
        assert!(
            read(&again, Some(p.seq)) == *want,
            "point {} differs",
            p.seq
        );
    }
    assert!(read(&again, None) == source, "the head differs");

    // Blocklisted by the second open (which broke its images' locks): the
    // fenced writer fails at its next write to the cluster, at the latest
    // at its commit.
    let fenced = g
        .apply_record(&next(Entry::barrier(99)))
        .and_then(|_| g.commit());
    assert!(fenced.is_err(), "the fenced writer committed");
    drop(again);
    let last = second.open_group(&host, &group).unwrap();
    assert_eq!(
        last.position(),
        position,
        "the fenced writer moved the state"
    );
}

/// A steady stream on the real cluster: 4 KiB writes committed every 32
/// records, as a shipper's batches are. The head reads as the source at
/// the end; the apply rate is printed (a figure, not a limit).
#[test]
fn a_steady_stream_applies_and_reads_back_on_a_real_cluster() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let namespace = format!("stream-{}", std::process::id());
    let (host, group) = (Name::from_static("h1"), Name::from_static("g"));
    let engine = engine(tb, &namespace);
    let mut g = engine.open_group(&host, &group).unwrap();
    g.ensure_disks(&[Disk {
        id: DiskId(0),
        name: Name::from_static("data"),
        size: SIZE,
    }])
    .unwrap();
    g.apply_chunk(DiskId(0), 0, ChunkRef::Zero(SIZE), Purpose::InitialSync)
        .unwrap();
    let mut source = vec![0u8; SIZE as usize];
    let mut seq = 0u64;
    let mut next = |entry: Entry<'_>| {
        seq += 1;
        Record::decode(&entry.encode(seq, 1)).unwrap()
    };
    g.apply_record(&next(Entry::barrier(0))).unwrap();
    g.commit().unwrap();

    const RECORDS: u64 = 1024;
    let started = std::time::Instant::now();
    for i in 0..RECORDS {
        let offset = (i * 7919 % (SIZE / 4096)) * 4096;
        let data = vec![(i % 255) as u8 + 1; 4096];
        g.apply_record(&next(Entry::write(0, offset, &data, i)))
            .unwrap();
        source[offset as usize..offset as usize + 4096].copy_from_slice(&data);
        if i % 32 == 31 {
            g.apply_record(&next(Entry::barrier(i))).unwrap();
            g.commit().unwrap();
        }
    }
    let took = started.elapsed();
    eprintln!(
        "applied {RECORDS} records of 4 KiB with a commit every 32 in {took:?}: {:.0} records/s, {:.1} MiB/s",
        RECORDS as f64 / took.as_secs_f64(),
        (RECORDS * 4096) as f64 / took.as_secs_f64() / f64::from(1 << 20)
    );
    assert!(read(&g, None) == source, "the head differs");
    let newest = g.points().last().map(|p| p.seq);
    assert!(read(&g, newest) == source, "the newest point differs");
}

/// A failover to RBD clones on the real cluster: the group is opened for
/// writing (as `tidemark failover --to-rbd` does), a point in the middle
/// of the history is cloned, and the clone reads as that point while the
/// base image still reads as the history's start. The engine of a
/// configuration (`store::connect`) reaches the same cluster. Removing the
/// group is refused while the clone depends on the replica image.
#[test]
fn a_failover_to_rbd_clones_read_as_the_point_on_a_real_cluster() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let namespace = format!("rbd-fo-{}", std::process::id());
    let (host, group) = (Name::from_static("h1"), Name::from_static("g"));
    let config = tidemark_config::parse_str(
        &format!(
            "[receiver.store]\nkind = \"ceph\"\nconf = {:?}\nuser = \"client.admin\"\npool = {:?}\nnamespace = {:?}\nop-timeout = \"30s\"\n",
            tb.conf.display().to_string(),
            tb.pool,
            namespace
        ),
        std::path::Path::new("receiver.toml"),
    )
    .unwrap();
    let engine =
        tidemark_receiver::store::connect(config.require_receiver().unwrap(), "live test").unwrap();
    let mut g = engine.open_group(&host, &group).unwrap();
    g.ensure_disks(&[Disk {
        id: DiskId(0),
        name: Name::from_static("data"),
        size: SIZE,
    }])
    .unwrap();
    let base: Vec<u8> = (0..SIZE).map(|i| (i % 253) as u8).collect();
    g.apply_chunk(DiskId(0), 0, ChunkRef::Data(&base), Purpose::InitialSync)
        .unwrap();
    let mut seq = 0u64;
    let mut next = |entry: Entry<'_>| {
        seq += 1;
        Record::decode(&entry.encode(seq, 1)).unwrap()
    };
    g.apply_record(&next(Entry::barrier(0))).unwrap();
    g.commit().unwrap();
    g.apply_record(&next(Entry::write(0, 65536, &[5u8; 100_000], 1)))
        .unwrap();
    g.apply_record(&next(Entry::trim(0, 500_000, 40_000, 1)))
        .unwrap();
    g.apply_record(&next(Entry::barrier(1))).unwrap();
    g.commit().unwrap();
    let point = Seq(4);
    g.apply_record(&next(Entry::write(0, 70_000, &[6u8; 4096], 2)))
        .unwrap();
    g.apply_record(&next(Entry::barrier(2))).unwrap();
    g.commit().unwrap();
    let want = read(&g, Some(point));
    assert_ne!(want, read(&g, None), "the point is not the head");

    let clones = engine
        .failover_to_rbd(&host, &group, &g, point, "failover", "tidemark-failover-4")
        .unwrap();
    assert_eq!(clones.len(), 1);
    let cluster = engine_cluster(tb, &namespace);
    let mut got = vec![0u8; SIZE as usize];
    cluster
        .image_open_read_only(&clones[0].1)
        .unwrap()
        .read(0, &mut got)
        .unwrap();
    assert!(got == want, "the clone reads as the point");
    cluster
        .image_open_read_only("h1+g+disk-0")
        .unwrap()
        .read(0, &mut got)
        .unwrap();
    assert!(got == base, "the replica image is unchanged");

    // The clone depends on a snapshot of the replica image: the group's
    // removal is refused, naming it, until the clone is gone; then the
    // snapshot goes with the image.
    drop(g);
    let refused = engine.remove_group(&host, &group).unwrap_err().to_string();
    assert!(
        refused.contains(&format!("{}/{namespace}/failover-data", tb.pool)),
        "{refused}"
    );
    assert!(cluster.image_open_read_only("h1+g+disk-0").is_ok());
    cluster.image_remove(&clones[0].1).unwrap();
    engine.remove_group(&host, &group).unwrap();
    assert!(matches!(
        cluster.image_open_read_only("h1+g+disk-0"),
        Err(tidemark_ceph::CephError::NotFound { .. })
    ));
}

fn engine_cluster(tb: &testbed::Testbed, namespace: &str) -> RadosCluster {
    tb.connect(namespace, Duration::from_secs(30)).unwrap()
}
