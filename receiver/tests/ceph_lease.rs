//! Group leases between receivers sharing a simulated cluster: a group
//! held by a live receiver is not opened by another; once its lease
//! expires (the receiver paused or dead), the next one fences it and takes
//! the group over, reading exactly what it acknowledged; and the stale
//! owner, resumed and unaware (its own clock says the lease still holds),
//! changes no byte of the group: neither its journal appends, nor its
//! image writes, nor its commits land.

use std::collections::BTreeMap;
use std::time::Duration;

use tidemark_ceph::{CephError, Cluster, ClusterImage, SimCluster, SimWorld};
use tidemark_names::Name;
use tidemark_receiver::lease::{LeaseConfig, LostReason};
use tidemark_receiver::store::ceph::{CephEngine, CephGroup, XATTR_OWNER, XATTR_OWNER_ADDR};
use tidemark_receiver::store::{Position, StoreError};

#[allow(dead_code)]
mod crash_stream;
use crash_stream::{check_points, specs, workload, Op, Workload};

const NAMESPACE: &str = "lease";
/// The lease on the cluster's (virtual) clock, which the test moves; the
/// receivers' own clocks are real and never reach a renewal or the end of
/// the validity during the test, like a paused process that does not know
/// it was paused.
const LEASE: Duration = Duration::from_secs(600);

fn names() -> (Name, Name) {
    (Name::from_static("h1"), Name::from_static("g"))
}

/// A receiver's engine, and its cluster client (to probe the fence with).
fn receiver(world: &SimWorld, advertise: &str) -> (CephEngine<SimCluster>, SimCluster) {
    let config = LeaseConfig {
        duration: LEASE,
        blocklist_expire: Duration::from_secs(24 * 3600),
    };
    let client = world.client(NAMESPACE);
    let engine = CephEngine::with_lease(client.clone(), advertise, config).unwrap();
    (engine, client)
}

fn open(engine: &CephEngine<SimCluster>) -> Result<CephGroup<SimCluster>, StoreError> {
    let (host, group) = names();
    let mut g = engine.open_group(&host, &group)?;
    g.set_segment_size(2048);
    g.set_index_interval(1024);
    Ok(g)
}

fn apply(g: &mut CephGroup<SimCluster>, op: &Op) -> Result<Option<Position>, StoreError> {
    crash_stream::apply_op(g, op, |_| Ok(()))
}

/// Every byte of the group on the cluster: the state object (data and
/// attributes), every object its `dir` lists, the journal index, and the
/// images as they would survive a crash and as they read now.
fn everything(world: &SimWorld) -> BTreeMap<String, Vec<u8>> {
    let c = world.client(NAMESPACE);
    let mut all = BTreeMap::new();
    for (name, value) in c.xattrs("h1+g+state").unwrap() {
        all.insert(format!("state xattr {name}"), value);
    }
    let read = |oid: &str| match c.stat(oid) {
        Ok(size) => c.read(oid, 0, size as usize).unwrap(),
        Err(CephError::NotFound { .. }) => b"(missing)".to_vec(),
        Err(e) => panic!("{oid}: {e}"),
    };
    all.insert("state".into(), read("h1+g+state"));
    all.insert("journal-index".into(), read("h1+g+journal-index"));
    let listed = c.omap("h1+g+dir", None, 1000).unwrap();
    for (key, _) in &listed.entries {
        all.insert(format!("object {key}"), read(&format!("h1+g+{key}")));
    }
    for disk in specs() {
        let name = format!("h1+g+disk-{}", disk.id.0);
        let image = c.image_open_read_only(&name).unwrap();
        let mut now = vec![0; disk.size as usize];
        image.read(0, &mut now).unwrap();
        all.insert(format!("image {name}"), now);
        all.insert(
            format!("image {name} durable"),
            world.image_durable(NAMESPACE, &name).unwrap(),
        );
    }
    all
}

fn xattr(world: &SimWorld, name: &str) -> String {
    let x = world.client(NAMESPACE).xattrs("h1+g+state").unwrap();
    String::from_utf8(x.get(name).cloned().unwrap_or_default()).unwrap()
}

/// Applies the first `upto` ops and commits: what the shipper was acked.
fn run_to(g: &mut CephGroup<SimCluster>, w: &Workload, upto: usize) -> Position {
    for op in &w.ops[..upto] {
        apply(g, op).unwrap();
    }
    g.commit().unwrap()
}

#[test]
fn a_live_owner_keeps_its_group_and_a_stale_one_changes_no_byte_after_a_takeover() {
    let w = workload(5, 60);
    let world = SimWorld::new();
    let (a, a_client) = receiver(&world, "r1:7443");
    let mut stale = open(&a).unwrap();
    let half = w.ops.len() / 2;
    let acked = run_to(&mut stale, &w, half);
    assert_eq!(xattr(&world, XATTR_OWNER), "r1:7443");
    assert_eq!(
        xattr(&world, XATTR_OWNER_ADDR),
        a_client.my_addr().unwrap(),
        "the opener's client address is recorded"
    );

    // Held and unexpired: the second receiver is told who owns it and
    // changes nothing.
    let (b, _) = receiver(&world, "r2:7443");
    let before = everything(&world);
    match open(&b) {
        Err(StoreError::OwnedElsewhere { owner, .. }) => {
            assert_eq!(owner.as_deref(), Some("r1:7443"))
        }
        other => panic!("a held group opened elsewhere: {other:?}"),
    }
    assert_eq!(
        everything(&world),
        before,
        "a refused takeover changed the group"
    );
    assert_eq!(b.lease_stats().unwrap().owned_elsewhere, 1);

    // The owner pauses past its lease: the next receiver fences it, takes
    // the group over and reads exactly what was acknowledged.
    world.advance(LEASE + Duration::from_secs(1));
    let mut new = open(&b).unwrap();
    assert_eq!(new.position(), acked, "the new owner reads the last commit");
    check_points("after the takeover", &new, &w);
    assert_eq!(xattr(&world, XATTR_OWNER), "r2:7443");
    let commit_at_takeover = xattr(&world, "commit");
    let stats = b.lease_stats().unwrap();
    assert_eq!((stats.takeovers, stats.owned), (1, 1));

    // The stale owner resumes, unaware: every change it tries fails, and
    // not one byte of the group changes.
    let before = everything(&world);
    let mut refused = 0;
    for op in &w.ops[half..] {
        if apply(&mut stale, op).is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0, "the stale owner kept writing");
    assert!(stale.commit().is_err(), "the stale owner committed");
    // Anything straight through its client is fenced too: an image
    // write (it held the image's lock), a journal object's append.
    let image = a_client.image_open("h1+g+disk-0");
    let written = image.and_then(|i| i.write(0, &[0xee; 512]).and_then(|()| i.flush()));
    assert!(
        matches!(written, Err(CephError::Blocklisted { .. })),
        "the stale client still writes the images: {written:?}"
    );
    let appended = a_client.operate(
        "h1+g+journal.00000000",
        &tidemark_ceph::WriteOp::new().write(0, b"stale"),
    );
    assert!(
        matches!(appended, Err(CephError::Blocklisted { .. })),
        "the stale client still writes objects: {appended:?}"
    );
    assert_eq!(
        everything(&world),
        before,
        "the stale owner changed the group"
    );
    assert_eq!(xattr(&world, "commit"), commit_at_takeover);
    // Its next open is refused as fenced.
    match open(&a) {
        Err(StoreError::LeaseLost {
            source: LostReason::Fenced,
            ..
        }) => {}
        other => panic!("the fenced receiver opened the group again: {other:?}"),
    }

    // The new owner goes on from the acknowledged position to the end.
    for op in &w.ops[half..] {
        apply(&mut new, op).unwrap();
    }
    new.commit().unwrap();
    crash_stream::check_newest("the new owner, at the end", &new, &w);
    check_points("the new owner, at the end", &new, &w);
}

/// A receiver that lets a group go unlocks it: the next one takes it at
/// once, without waiting for the lease to expire, and fences the previous
/// client all the same.
#[test]
fn a_released_group_is_taken_at_once() {
    let w = workload(6, 20);
    let world = SimWorld::new();
    let (a, _) = receiver(&world, "r1:7443");
    let mut g = open(&a).unwrap();
    let acked = run_to(&mut g, &w, w.ops.len());
    drop(g);
    let (host, group) = names();
    a.release(&host, &group);
    assert_eq!(a.lease_stats().unwrap().owned, 0);

    let (b, _) = receiver(&world, "r2:7443");
    let g = open(&b).expect("a released group opens elsewhere at once");
    assert_eq!(g.position(), acked);
    check_points("after the release", &g, &w);
}

/// A receiver that stops cleanly (its engine dropped) lets its groups go:
/// the next one takes them at once. One that dies (its engine abandoned:
/// no renewal, no unlock) leaves them locked until the lease expires.
#[test]
fn a_clean_stop_hands_the_groups_over_at_once_and_a_crash_does_not() {
    let w = workload(6, 20);
    let world = SimWorld::new();
    let (a, _) = receiver(&world, "r1:7443");
    let mut g = open(&a).unwrap();
    let acked = run_to(&mut g, &w, w.ops.len());
    drop(g);
    drop(a);

    let (b, _) = receiver(&world, "r2:7443");
    let g = open(&b).expect("the group of a receiver that stopped opens elsewhere at once");
    assert_eq!(g.position(), acked);
    drop(g);
    b.abandon();

    let (c, _) = receiver(&world, "r3:7443");
    assert!(
        matches!(open(&c), Err(StoreError::OwnedElsewhere { owner: Some(o), .. }) if o == "r2:7443"),
        "the group of a dead receiver opened before its lease expired"
    );
    world.advance(LEASE + Duration::from_secs(1));
    let g = open(&c).expect("the group opens once the dead receiver's lease expired");
    assert_eq!(g.position(), acked);
    check_points("after the crash", &g, &w);
}

/// A group is removed (a retired host) only under its lease: refused while
/// another live receiver holds it; once that receiver let it go, every
/// object and image of the group is gone, the registry no longer lists
/// it, another group of the namespace is untouched, and a second remove
/// finds nothing left to do.
#[test]
fn a_group_is_removed_whole_and_not_while_another_receiver_holds_it() {
    use tidemark_receiver::store::StoreEngine;
    let w = workload(6, 20);
    let world = SimWorld::new();
    let (a, _) = receiver(&world, "r1:7443");
    let mut g = open(&a).unwrap();
    run_to(&mut g, &w, w.ops.len());
    let other = Name::from_static("other");
    drop(a.open_group(&Name::from_static("h1"), &other).unwrap());
    let (host, group) = names();
    let (b, observer) = receiver(&world, "r2:7443");
    assert_eq!(b.groups(&host).unwrap(), vec![group.clone(), other.clone()]);
    assert!(
        matches!(b.remove(&host, &group), Err(StoreError::OwnedElsewhere { owner: Some(o), .. }) if o == "r1:7443"),
        "a group another receiver holds was removed"
    );
    assert!(b.exists(&host, &group));

    drop(g);
    a.release(&host, &group);
    let journal = observer.omap("h1+g+dir", None, 1000).unwrap().entries;
    assert!(!journal.is_empty(), "the workload wrote journal segments");
    b.remove(&host, &group).unwrap();
    assert!(!b.exists(&host, &group));
    assert_eq!(b.groups(&host).unwrap(), vec![other.clone()]);
    for (name, _) in journal {
        assert!(
            matches!(
                observer.stat(&format!("h1+g+{name}")),
                Err(CephError::NotFound { .. })
            ),
            "{name} is left"
        );
    }
    for oid in [
        "h1+g+state",
        "h1+g+dir",
        "h1+g+journal-index",
        "h1+g+tf.pin",
    ] {
        assert!(
            matches!(observer.stat(oid), Err(CephError::NotFound { .. })),
            "{oid} is left"
        );
    }
    for disk in specs() {
        let image = format!("h1+g+disk-{}", disk.id.0);
        assert!(
            observer.image_open_read_only(&image).is_err(),
            "{image} is left"
        );
    }
    assert!(b.exists(&host, &other), "another group was touched");
    b.remove(&host, &group).unwrap();
}

/// The takeover fences the previous owner before it opens anything: inside
/// the open, the previous client is already refused by the cluster (even
/// for objects, which no image lock protects), and the lock is ours.
#[test]
fn the_previous_owner_is_fenced_before_the_open() {
    use std::sync::Arc;
    use tidemark_receiver::lease_task::{LeaseKeeper, TakeoverError};
    let world = SimWorld::new();
    let config = LeaseConfig {
        duration: LEASE,
        blocklist_expire: Duration::from_secs(3600),
    };
    let old_client = world.client(NAMESPACE);
    let old = LeaseKeeper::new(Arc::new(old_client.clone()), config, "r1:7443").unwrap();
    let record_owner = |c: &SimCluster| {
        let op = tidemark_ceph::WriteOp::new()
            .set_xattr(XATTR_OWNER, b"r1:7443")
            .set_xattr(XATTR_OWNER_ADDR, c.my_addr().unwrap().as_bytes());
        c.operate("x+state", &op)
    };
    old.take_over("x+state", |_| record_owner(&old_client))
        .unwrap();

    let new_client = world.client(NAMESPACE);
    let new = LeaseKeeper::new(Arc::new(new_client.clone()), config, "r2:7443").unwrap();
    let busy = new.take_over("x+state", |_| Ok::<_, CephError>(()));
    assert!(
        matches!(&busy, Err(TakeoverError::OwnedElsewhere { owner: Some(o) }) if o == "r1:7443"),
        "{busy:?}"
    );
    assert_eq!(
        old_client.operate("x+other", &tidemark_ceph::WriteOp::new().write(0, b"a")),
        Ok(()),
        "a refused takeover fenced the owner"
    );

    world.advance(LEASE + Duration::from_secs(1));
    new.take_over("x+state", |gate| {
        let stale = old_client.operate("x+other", &tidemark_ceph::WriteOp::new().write(0, b"b"));
        assert!(
            matches!(stale, Err(CephError::Blocklisted { .. })),
            "the previous owner is not fenced at the open: {stale:?}"
        );
        let ours = tidemark_ceph::WriteOp::new()
            .assert_locked(gate.name(), gate.cookie())
            .set_xattr("probe", b"1");
        new_client.operate("x+state", &ours)
    })
    .unwrap();
    assert_eq!(new.stats().takeovers, 1);
}

/// Removing a group removes the image of a disk that left, also when the
/// image's own removal did not happen (the state marks the disk's image
/// as still to be removed): the cluster is cut at every operation of a
/// joining disk's leave, the cut lifted, and the group removed; no image
/// of that disk is left, whatever the cut.
#[test]
fn removing_a_group_removes_the_image_of_a_disk_that_left_at_any_cut() {
    use tidemark_changelog::DiskId;
    use tidemark_receiver::store::Disk;
    let w = workload(8, 20);
    let (host, group) = names();
    let joining = DiskId(77);
    let image = format!("h1+g+disk-{}", joining.0);
    let mut marked_only = 0;
    for k in 0.. {
        let world = SimWorld::new();
        let (a, observer) = receiver(&world, "r1:7443");
        let mut g = open(&a).unwrap();
        run_to(&mut g, &w, w.ops.len());
        let mut disks = g.disks();
        disks.push(Disk {
            id: joining,
            name: Name::from_static("joining"),
            size: 8 << 10,
        });
        g.ensure_disks(&disks).unwrap();
        assert!(observer.image_open_read_only(&image).is_ok());
        let before = world.ops();
        world.cut_at(Some(before + k));
        let left = g.leave(&[joining]);
        let cut = world.ops() >= before + k;
        world.cut_at(None);
        drop(g);
        // The case that matters: the state no longer lists the disk, its
        // image is still there.
        let listed = a
            .open_group_read_only(&host, &group)
            .unwrap()
            .disks()
            .iter()
            .any(|d| d.id == joining);
        if !listed && observer.image_open_read_only(&image).is_ok() {
            marked_only += 1;
        }
        a.remove_group(&host, &group)
            .unwrap_or_else(|e| panic!("cut at {k}: removing the group: {e}"));
        assert!(
            observer.image_open_read_only(&image).is_err(),
            "cut at operation {k} of the leave: the image of the disk that left is left behind"
        );
        if !cut {
            left.unwrap();
            break;
        }
    }
    assert!(marked_only > 0, "no cut left the image behind the leave");
}

/// A failover to RBD leaves a protected snapshot of each replica image
/// with a clone of it: removing the group is refused while the clone
/// depends on it, naming the clone, and removes nothing; once the clone is
/// gone, the group is removed with the snapshots and images.
#[test]
fn a_failover_clone_blocks_the_group_s_removal_until_it_is_gone() {
    let w = workload(8, 20);
    let (host, group) = names();
    let world = SimWorld::new();
    let (a, observer) = receiver(&world, "r1:7443");
    let mut g = open(&a).unwrap();
    run_to(&mut g, &w, w.ops.len());
    let point = g.points().last().unwrap().seq;
    let clones = a
        .failover_to_rbd(&host, &group, &g, point, "fo", "tidemark-failover-1")
        .unwrap();
    assert!(!clones.is_empty());
    drop(g);
    let points = a.open_group_read_only(&host, &group).unwrap().points();

    let refused = a.remove_group(&host, &group).unwrap_err();
    let clone_names: Vec<String> = clones
        .iter()
        .map(|(_, c)| format!("sim/lease/{c}"))
        .collect();
    match &refused {
        StoreError::ClonesRemain { clones, .. } => assert_eq!(clones, &clone_names),
        other => panic!("expected the clones named, got: {other}"),
    }
    assert!(refused.to_string().contains("rbd flatten"), "{refused}");
    let kept = a.open_group_read_only(&host, &group).unwrap();
    assert!(
        kept.points() == points,
        "a refused removal changed the group"
    );
    for (disk, _) in &clones {
        assert!(observer
            .image_open_read_only(&format!("h1+g+disk-{}", disk.id.0))
            .is_ok());
    }
    drop(kept);

    for (_, clone) in &clones {
        observer.image_remove(clone).unwrap();
    }
    a.remove_group(&host, &group).unwrap();
    for (disk, _) in &clones {
        assert!(
            observer
                .image_open_read_only(&format!("h1+g+disk-{}", disk.id.0))
                .is_err(),
            "a replica image is left behind"
        );
    }
    use tidemark_receiver::store::StoreEngine;
    assert!(
        a.groups(&host).unwrap().is_empty(),
        "the group is still listed"
    );
}
