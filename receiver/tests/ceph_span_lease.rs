//! The span's lease and record between receivers sharing a simulated
//! cluster (`receiver/src/store/ceph/span.rs`): a span held by a live
//! receiver is not taken by another, which is told the holder; once the
//! lease expires (the holder paused or dead), the next receiver fences the
//! holder, takes the span and reads exactly the record last saved, so its
//! coordinator's epoch is above every epoch the old one used; the stale
//! holder, resumed and unaware, changes no byte of the record; a damaged
//! record is refused by name, never taken for a new span's.

use std::collections::BTreeMap;
use std::time::Duration;

use tidemark_ceph::{CephError, Cluster, SimCluster, SimWorld, WriteOp};
use tidemark_changelog::Seq;
use tidemark_names::Name;
use tidemark_receiver::lease::LeaseConfig;
use tidemark_receiver::lease_task::TakeoverError;
use tidemark_receiver::span::{SpanRecord, SpanRecordError, SpanStore};
use tidemark_receiver::store::ceph::span::{span_object, CephSpanStore};
use tidemark_receiver::store::ceph::CephEngine;
use tidemark_span::{Coordinator, CoordinatorConfig, Epoch, PointId, Saved, SpanEvent};

const NAMESPACE: &str = "span-lease";
/// On the cluster's virtual clock, which the test moves; the receivers'
/// own clocks never reach a renewal or the end of the validity, like a
/// paused process that does not know it was paused.
const LEASE: Duration = Duration::from_secs(600);

fn span() -> Name {
    Name::from_static("shop")
}

fn members() -> Vec<(Name, Name)> {
    vec![
        (Name::from_static("web1"), Name::from_static("default")),
        (Name::from_static("db1"), Name::from_static("default")),
    ]
}

fn receiver(world: &SimWorld, advertise: &str) -> CephEngine<SimCluster> {
    let config = LeaseConfig {
        duration: LEASE,
        blocklist_expire: Duration::from_secs(24 * 3600),
    };
    CephEngine::with_lease(world.client(NAMESPACE), advertise, config).unwrap()
}

fn take(engine: &CephEngine<SimCluster>) -> CephSpanStore<SimCluster> {
    engine
        .take_span(&span())
        .expect("the span is taken")
        .expect("an engine with leases keeps span records")
}

/// Every byte of the span's object: its data and attributes.
fn everything(world: &SimWorld) -> BTreeMap<String, Vec<u8>> {
    let c = world.client(NAMESPACE);
    let oid = span_object(&span());
    let mut all: BTreeMap<String, Vec<u8>> = c
        .xattrs(&oid)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (format!("xattr {k}"), v))
        .collect();
    let size = c.stat(&oid).unwrap();
    all.insert("data".into(), c.read(&oid, 0, size as usize).unwrap());
    all
}

/// A coordinator's rounds as its task records them: the start's save,
/// then a committed and durable point.
fn coordinate(record: &mut SpanRecord, point_markers: u64) -> Epoch {
    let core = Coordinator::new(CoordinatorConfig::default(), 2, record.saved());
    let epoch = core.epoch();
    let saved = Saved {
        epoch,
        next_point: PointId(record.next_point + 1),
    };
    record.apply(&SpanEvent::Save(saved), &members(), "", false, 1);
    let point = PointId(record.next_point - 1);
    record.apply(
        &SpanEvent::Committed {
            point,
            markers: vec![(Seq(point_markers), 1), (Seq(point_markers + 1), 1)],
            app_consistent: false,
            not_quiesced: Vec::new(),
        },
        &members(),
        "span-shop",
        false,
        2,
    );
    record.apply(&SpanEvent::Durable { point }, &members(), "", false, 3);
    epoch
}

#[test]
fn a_held_span_moves_only_after_its_lease_and_the_stale_holder_writes_no_byte() {
    let world = SimWorld::new();
    let a = receiver(&world, "r1:7443");
    let stale = take(&a);
    let mut record = stale.load().unwrap();
    assert_eq!(record, SpanRecord::default(), "a new span");
    let first_epoch = coordinate(&mut record, 10);
    stale.save(&record).unwrap();
    let second_epoch = {
        // The same holder's coordinator restarting (a higher epoch,
        // persisted before use).
        let e = coordinate(&mut record, 20);
        stale.save(&record).unwrap();
        e
    };
    assert!(second_epoch > first_epoch);
    assert_eq!(a.span_owner(&span()).as_deref(), Some("r1:7443"));

    // Held and unexpired: another receiver is told the holder and
    // changes nothing.
    let b = receiver(&world, "r2:7443");
    let before = everything(&world);
    match b.take_span(&span()) {
        Err(TakeoverError::OwnedElsewhere { owner }) => {
            assert_eq!(owner.as_deref(), Some("r1:7443"))
        }
        other => panic!("a held span was taken by another receiver: {other:?}"),
    }
    assert_eq!(
        everything(&world),
        before,
        "a refused take changed the span"
    );
    assert_eq!(b.read_span(&span()).unwrap(), record, "any node reads it");

    // The holder pauses past its lease: the next receiver fences it and
    // reads exactly the record last saved.
    world.advance(LEASE + Duration::from_secs(1));
    let new = take(&b);
    assert!(new.epoch() > stale.epoch(), "each holder has its own epoch");
    let mut taken = new.load().unwrap();
    assert_eq!(taken, record, "the new holder reads the last save");
    assert_eq!(b.span_owner(&span()).as_deref(), Some("r2:7443"));
    // Its coordinator's epoch is above every epoch the old one used.
    let third_epoch = coordinate(&mut taken, 30);
    assert!(third_epoch > second_epoch);
    new.save(&taken).unwrap();

    // The stale holder resumes, unaware: its saves fail, the record and
    // its attributes keep every byte, and its store says it is fenced.
    let before = everything(&world);
    let mut late = record.clone();
    coordinate(&mut late, 40);
    assert!(
        matches!(stale.save(&late), Err(SpanRecordError::Fenced { .. })),
        "the stale holder saved"
    );
    assert!(stale.fenced());
    assert!(
        stale.save(&record).is_err(),
        "a fenced store never saves again"
    );
    assert_eq!(
        everything(&world),
        before,
        "the stale holder changed the record"
    );
    assert_eq!(new.load().unwrap(), taken);
    assert!(!new.fenced());

    // The fenced receiver cannot take the span again: its client is
    // blocklisted.
    match a.take_span(&span()) {
        Err(TakeoverError::OwnedElsewhere { .. } | TakeoverError::Lost(_)) => {}
        other => panic!("the fenced receiver took the span again: {other:?}"),
    }
    assert_eq!(everything(&world), before);
}

#[test]
fn a_save_guarded_by_a_stale_epoch_is_refused_even_unfenced() {
    // Two stores of the same holder (its coordinator restarted, the old
    // store left behind): the older one's epoch guard refuses it.
    let world = SimWorld::new();
    let a = receiver(&world, "r1:7443");
    let old = take(&a);
    let mut record = SpanRecord::default();
    coordinate(&mut record, 1);
    old.save(&record).unwrap();
    let newer = take(&a);
    assert!(newer.epoch() > old.epoch());
    let before = everything(&world);
    coordinate(&mut record, 2);
    assert!(matches!(
        old.save(&record),
        Err(SpanRecordError::Fenced { .. })
    ));
    assert_eq!(everything(&world), before);
    newer.save(&record).unwrap();
    assert_eq!(a.read_span(&span()).unwrap(), record);
}

#[test]
fn a_damaged_or_newer_record_is_refused_by_name() {
    let world = SimWorld::new();
    let a = receiver(&world, "r1:7443");
    drop(take(&a));
    let oid = span_object(&span());
    let client = world.client(NAMESPACE);
    client
        .operate(&oid, &WriteOp::new().write_full(b"{\"version\":1,\"epo"))
        .unwrap();
    match a.take_span(&span()) {
        Err(TakeoverError::Open(SpanRecordError::Damaged { path, .. })) => {
            assert!(path.display().to_string().contains("span+shop"), "{path:?}")
        }
        other => panic!("a damaged record was taken: {other:?}"),
    }
    assert!(matches!(
        a.read_span(&span()),
        Err(SpanRecordError::Damaged { .. })
    ));
    client
        .operate(&oid, &WriteOp::new().write_full(b"{\"version\":9}"))
        .unwrap();
    assert!(matches!(
        a.read_span(&span()),
        Err(SpanRecordError::UnsupportedVersion { version: 9, .. })
    ));
    // The refused takes changed nothing and left the lease free.
    let b = receiver(&world, "r2:7443");
    assert!(matches!(
        b.take_span(&span()),
        Err(TakeoverError::Open(
            SpanRecordError::UnsupportedVersion { .. }
        ))
    ));
    assert_eq!(client.read(&oid, 0, 100).unwrap(), b"{\"version\":9}");
    let missing = client.stat("span+other");
    assert!(matches!(missing, Err(CephError::NotFound { .. })));
    assert_eq!(
        b.read_span(&Name::from_static("other")).unwrap(),
        SpanRecord::default(),
        "a span never taken reads as new"
    );
}
