//! A replica store written by the previous release, opened by this one.
//!
//! `tests/fixtures/store-a8c0b28/` is a group directory (state file,
//! journal segments, images, a test failover's pin, a drain request) that
//! release a8c0b28 wrote, with what that release read from it
//! (`expected.txt`: position, disks, pending extents, recovery points and
//! a BLAKE3 digest of every disk as of every point). It was made by
//! [`todays_store_reads_the_fixtures_history_alike`] with
//! `TIDEMARK_WRITE_FIXTURE` set, run with that release's code (the
//! function uses no API it lacks):
//!
//! ```text
//! git archive a8c0b28 | tar -x -C /tmp/prev
//! cp receiver/tests/store_upgrade.rs /tmp/prev/receiver/tests/
//! cd /tmp/prev && TIDEMARK_WRITE_FIXTURE=/tmp/store \
//!     cargo test -p tidemark-receiver --test store_upgrade -- todays_store
//! ```
//!
//! This release must read all of it alike, then take the group on: finish
//! its resync, apply new records, commit, and open it again.

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use tidemark_changelog::record::{Entry, Record};
use tidemark_changelog::{DiskId, Seq};
use tidemark_receiver::pin::{PIN_FILE, TEST_FAILOVER_DIR};
use tidemark_receiver::store::{ChunkRef, Disk, GroupState, Purpose, ReplicaGroup, Retention};

const FIXTURE: &str = "tests/fixtures/store-a8c0b28";

fn rec(entry: Entry<'_>, seq: u64) -> Record {
    Record::decode(&entry.encode(seq, 1)).unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// What the group reads, in the words of `expected.txt`.
fn describe(g: &ReplicaGroup) -> String {
    let mut out = String::new();
    let p = g.position();
    let state = match &p.state {
        GroupState::InitialSync => "initial-sync".to_string(),
        GroupState::Consistent => "consistent".to_string(),
        GroupState::Resyncing { pending } => {
            let mut s = "resyncing".to_string();
            for e in pending {
                write!(s, " {}:{}+{}", e.disk, e.offset, e.length).unwrap();
            }
            s
        }
    };
    writeln!(out, "position {} {} {state}", p.durable_seq, p.generation).unwrap();
    for (spec, sync) in g.disks().iter().zip(&p.disks) {
        writeln!(
            out,
            "disk {} {} {} synced {}",
            spec.id, spec.name, spec.size, sync.synced
        )
        .unwrap();
    }
    writeln!(out, "last-barrier {:?}", g.last_barrier()).unwrap();
    let mut views: Vec<Option<u64>> = g.points().iter().map(|p| Some(p.seq.get())).collect();
    views.push(None);
    for p in g.points() {
        writeln!(
            out,
            "point {} {} app-consistent {} label {:?}",
            p.seq, p.timestamp_ns, p.app_consistent, p.label
        )
        .unwrap();
    }
    for seq in views {
        let view = g.view(seq.map(Seq)).unwrap();
        for spec in g.disks() {
            let mut buf = vec![0u8; spec.size as usize];
            view.read(spec.id, 0, &mut buf).unwrap();
            let at = seq.map_or("latest".to_string(), |s| s.to_string());
            writeln!(
                out,
                "content {at} disk {} {}",
                spec.id,
                blake3::hash(&buf).to_hex()
            )
            .unwrap();
        }
    }
    out
}

/// The group the fixture holds, written into `dir`: two disks copied by
/// an initial sync, records of every kind with commits between them, a
/// journal of small segments whose oldest points retention folded, a
/// resync left pending, a pinned point and a drain request.
fn build(dir: &Path) {
    let mut g = ReplicaGroup::open(dir).unwrap();
    g.set_segment_size(4096);
    g.set_retention(Retention {
        window: std::time::Duration::MAX,
        max_points: 4,
        max_space: None,
        fold_interval: std::time::Duration::ZERO,
    });
    g.ensure_disks(&[
        Disk {
            id: DiskId(0),
            name: tidemark_names::Name::from_static("vda"),
            size: 64 << 10,
        },
        Disk {
            id: DiskId(3),
            name: tidemark_names::Name::from_static("wal"),
            size: 32 << 10,
        },
    ])
    .unwrap();
    let d0 = pattern(1, 16 << 10);
    g.apply_chunk(DiskId(0), 0, ChunkRef::Data(&d0), Purpose::InitialSync)
        .unwrap();
    g.apply_chunk(
        DiskId(0),
        16 << 10,
        ChunkRef::Zero(48 << 10),
        Purpose::InitialSync,
    )
    .unwrap();
    let d3 = pattern(2, 32 << 10);
    g.apply_chunk(DiskId(3), 0, ChunkRef::Data(&d3), Purpose::InitialSync)
        .unwrap();
    g.commit().unwrap();

    let ts = 1_790_000_000_000_000_000u64;
    let mut seq = 0;
    let mut next = |g: &mut ReplicaGroup, e: Entry<'_>| {
        seq += 1;
        g.apply_record(&rec(e, seq)).unwrap();
    };
    for round in 0..6u64 {
        let t = ts + round * 1_000_000_000;
        let a = pattern(10 + round as u8, 3000);
        next(&mut g, Entry::write(0, 1000 + round * 5000, &a, t));
        next(&mut g, Entry::trim(0, 40_000 + round * 1000, 700, t));
        next(
            &mut g,
            Entry::write_zeroes(3, round * 2048, 1500, round % 2 == 0, t),
        );
        next(&mut g, Entry::write(3, 20_000 + round * 300, &a[..900], t));
        if round == 5 {
            next(&mut g, Entry::marker("before upgrade", true, t + 1));
        }
        next(&mut g, Entry::barrier(t + 2));
        g.commit().unwrap();
    }
    // An unclean restart of the source: a resync of a hot extent waits.
    next(
        &mut g,
        Entry::resync_needed(3, 8192, 4096, ts + 10_000_000_000),
    );
    next(
        &mut g,
        Entry::write(0, 50_000, &pattern(99, 2000), ts + 10_000_000_001),
    );
    next(&mut g, Entry::barrier(ts + 10_000_000_002));
    g.commit().unwrap();
    let pinned = g.points()[1].seq;
    drop(g);
    let pin_dir = dir.join(TEST_FAILOVER_DIR);
    fs::create_dir_all(&pin_dir).unwrap();
    fs::write(pin_dir.join(PIN_FILE), pinned.to_string()).unwrap();
    tidemark_receiver::drain::write_request(dir, 7).unwrap();
}

/// Today's store, given the fixture's history, reads as the previous
/// release's store of it does. With `TIDEMARK_WRITE_FIXTURE` set, the group
/// is built there (`<dir>/group`, what it reads in `<dir>/expected.txt`):
/// run with the release a new fixture is to come from.
#[test]
fn todays_store_reads_the_fixtures_history_alike() {
    let tmp = tempfile::tempdir().unwrap();
    let writing = std::env::var_os("TIDEMARK_WRITE_FIXTURE").map(std::path::PathBuf::from);
    let out = writing.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    let group = out.join("group");
    build(&group);
    let g = ReplicaGroup::open_read_only(&group).unwrap();
    let described = describe(&g);
    if writing.is_some() {
        fs::write(out.join("expected.txt"), &described).unwrap();
        return;
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    let expected = fs::read_to_string(fixture.join("expected.txt")).unwrap();
    assert_eq!(described, expected);
}

/// Copies the fixture's group into a fresh directory.
fn fixture_copy(to: &Path) {
    fn copy(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy(&entry.path(), &target);
            } else {
                fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    copy(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(FIXTURE)
            .join("group"),
        to,
    );
}

#[test]
fn a_store_of_the_previous_release_reads_alike_and_replication_goes_on() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join(FIXTURE);
    let expected = fs::read_to_string(fixture.join("expected.txt")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("group");
    fixture_copy(&dir);

    // Read-only first (as `tidemark points` does while a receiver of either
    // release runs): it reads alike and changes no file.
    let before: Vec<(String, Vec<u8>)> = {
        let mut files: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| {
                (
                    e.file_name().into_string().unwrap(),
                    fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    };
    let g = ReplicaGroup::open_read_only(&dir).unwrap();
    assert_eq!(describe(&g), expected);
    drop(g);
    for (name, bytes) in &before {
        assert!(
            fs::read(dir.join(name)).unwrap() == *bytes,
            "{name} changed"
        );
    }

    // Opened for writing: the same, and the group is taken on (its points,
    // stamped in 2026, are kept whatever their age).
    let mut g = ReplicaGroup::open(&dir).unwrap();
    assert_eq!(describe(&g), expected);
    g.set_retention(Retention {
        window: std::time::Duration::MAX,
        ..Retention::default()
    });
    let GroupState::Resyncing { pending } = g.position().state else {
        panic!("the fixture's group waits for a resync")
    };
    assert_eq!(pending.len(), 1);
    let e = pending[0];
    let fresh = pattern(200, e.length as usize);
    g.apply_chunk(e.disk, e.offset, ChunkRef::Data(&fresh), Purpose::Resync)
        .unwrap();
    g.resync_done(e.disk, e.offset, e.length).unwrap();
    let points_before = g.points().len();
    let last = g.position().durable_seq.get();
    let ts = 1_790_000_100_000_000_000u64;
    g.apply_record(&rec(Entry::write(0, 100, &pattern(77, 500), ts), last + 1))
        .unwrap();
    g.apply_record(&rec(Entry::barrier(ts + 1), last + 2))
        .unwrap();
    g.commit().unwrap();
    assert_eq!(g.position().state, GroupState::Consistent);
    let after = describe(&g);
    // The resync ended at the barrier: it is a point again.
    assert_eq!(g.points().len(), points_before + 1, "{after}");
    let newest = g.points().last().unwrap().seq.get();
    assert_eq!(newest, last + 2);
    let mut buf = vec![0u8; e.length as usize];
    g.view(Some(Seq(newest)))
        .unwrap()
        .read(e.disk, e.offset, &mut buf)
        .unwrap();
    assert!(buf == fresh, "the resync chunk reads back");
    drop(g);

    // What this release wrote opens again, the same.
    let g = ReplicaGroup::open(&dir).unwrap();
    assert_eq!(describe(&g), after);
    // The pinned point was kept through the folds, and the pin is read.
    let pin: u64 = fs::read_to_string(dir.join(TEST_FAILOVER_DIR).join(PIN_FILE))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(g.points().iter().any(|p| p.seq.get() == pin), "{after}");
    assert_eq!(
        tidemark_receiver::drain::read_request(&dir).unwrap(),
        Some(7)
    );
}
