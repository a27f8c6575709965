//! A planned failover's drain request and answer through the one seam
//! (`receiver/src/drain.rs`, `DrainChannel`), on both of its
//! implementations: the files of the local store, and the group's object
//! on a simulated cluster (`receiver/src/store/ceph/drain.rs`) reached from
//! two receiver nodes. The same rules hold for both: a request left on one
//! node is the one the receiver applying the group (on the other node)
//! finds; its answer retires it and is read back where it was asked; an
//! answer never retires a newer request; a withdrawn request is not
//! brought back by a late answer; a request expires at its deadline. On
//! the cluster, a foreign or damaged object is refused by name.

use tidemark_ceph::{Cluster, SimCluster, SimWorld, WriteOp};
use tidemark_names::Name;
use tidemark_receiver::drain::{
    channel, DrainChannel, DrainDir, DrainError, DrainRefused, DrainRequest, DrainResult,
};
use tidemark_receiver::store::ceph::CephEngine;
use tidemark_receiver::store::StoreEngine;

const NAMESPACE: &str = "drain";

fn names() -> (Name, Name) {
    (Name::from_static("db1"), Name::from_static("default"))
}

/// The drain channel of the group as a node with `engine` sees it.
fn node(engine: &dyn StoreEngine, dir: &std::path::Path) -> Box<dyn DrainChannel> {
    let (host, group) = names();
    channel(engine, dir, &host, &group)
}

fn request(id: u64) -> DrainRequest {
    DrainRequest {
        id,
        expires_ns: Some(u64::MAX),
    }
}

fn drained(id: u64, seq: u64) -> DrainResult {
    DrainResult {
        id,
        result: Ok(seq),
    }
}

/// The rules of the module, `cli` being where the CLI asks and `owner`
/// where the receiver that applies the group looks.
fn the_rules_hold(cli: &dyn DrainChannel, owner: &dyn DrainChannel) {
    assert_eq!(owner.pending().unwrap(), None);
    assert_eq!(cli.answered().unwrap(), None);

    // Asked on one node, found on the other; answered there, read back
    // here; the request is retired by its answer.
    cli.request(&request(7)).unwrap();
    assert_eq!(owner.pending().unwrap(), Some(request(7)));
    owner.answer(&drained(7, 1234)).unwrap();
    assert_eq!(cli.answered().unwrap(), Some(drained(7, 1234)));
    assert_eq!(
        owner.pending().unwrap(),
        None,
        "the answer retires its request"
    );

    // A new request replaces the old answer.
    cli.request(&request(8)).unwrap();
    assert_eq!(cli.answered().unwrap(), None);

    // An answer to an older request never retires a newer one: the CLI
    // that asked again waits for its own.
    cli.request(&request(9)).unwrap();
    owner.answer(&drained(8, 99)).unwrap();
    assert_eq!(owner.pending().unwrap(), Some(request(9)));
    assert_ne!(cli.answered().unwrap().map(|r| r.id), Some(9));

    // A refusal reads back as one, on one line.
    let refused = DrainResult {
        id: 9,
        result: Err(DrainRefused {
            reason: "the tracker refused:\nbusy".into(),
        }),
    };
    owner.answer(&refused).unwrap();
    assert_eq!(
        cli.answered().unwrap().unwrap().result,
        Err(DrainRefused {
            reason: "the tracker refused: busy".into()
        })
    );

    // Withdrawn (the CLI timed out): a late answer brings nothing back.
    cli.request(&request(10)).unwrap();
    cli.clear().unwrap();
    owner.answer(&drained(10, 5)).unwrap();
    assert_eq!(owner.pending().unwrap(), None);
    assert_eq!(cli.answered().unwrap(), None);
    cli.clear().unwrap();

    // A request left by a CLI that died is passed on until its deadline
    // only; one of an older release (no deadline) always.
    let left = DrainRequest {
        id: 11,
        expires_ns: Some(1_000),
    };
    cli.request(&left).unwrap();
    let found = owner.pending().unwrap().unwrap();
    assert_eq!(found, left);
    assert!(found.live(999));
    assert!(!found.live(1_000));
    assert!(DrainRequest {
        id: 12,
        expires_ns: None
    }
    .live(u64::MAX));
    cli.clear().unwrap();
}

#[test]
fn the_local_files_keep_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let files = DrainDir::new(dir.path());
    the_rules_hold(&files, &files.clone());
}

#[test]
fn the_cluster_object_keeps_the_rules_between_two_nodes() {
    let world = SimWorld::new();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let owner_node = CephEngine::new(world.client(NAMESPACE), "node-a");
    let cli_node = CephEngine::new(world.client(NAMESPACE), "node-b");
    let owner = node(&owner_node, a.path());
    let cli = node(&cli_node, b.path());
    assert_eq!(cli.describe(), "ceph:db1+default+drain");
    the_rules_hold(cli.as_ref(), owner.as_ref());
    // Nothing was left on either node's disk: it is all in the cluster.
    for d in [a.path(), b.path()] {
        assert_eq!(std::fs::read_dir(d).unwrap().count(), 0);
    }
    // The owner changes while a request is pending: the next owner (a
    // third node) finds the same request.
    cli.request(&request(20)).unwrap();
    let next = CephEngine::new(world.client(NAMESPACE), "node-c");
    let c = tempfile::tempdir().unwrap();
    assert_eq!(node(&next, c.path()).pending().unwrap(), Some(request(20)));
}

#[test]
fn a_foreign_or_damaged_drain_object_is_refused_by_name() {
    let world = SimWorld::new();
    let dir = tempfile::tempdir().unwrap();
    let engine = CephEngine::new(world.client(NAMESPACE), "node-a");
    let drain = node(&engine, dir.path());
    let raw: SimCluster = world.client(NAMESPACE);
    let oid = "db1+default+drain";

    // Another format (a newer release's, or not ours at all).
    raw.operate(
        oid,
        &WriteOp::new()
            .create(false)
            .set_xattr("format", b"tidemark-drain 2")
            .set_xattr("request", b"id 1\n"),
    )
    .unwrap();
    for e in [
        drain.pending().unwrap_err(),
        drain.answered().unwrap_err(),
        drain.answer(&drained(1, 2)).unwrap_err(),
    ] {
        assert!(
            matches!(&e, DrainError::Foreign { format, .. } if format == "tidemark-drain 2"),
            "{e:?}"
        );
    }
    // A damaged answer left no byte changed.
    assert_eq!(raw.xattrs(oid).unwrap()["request"], b"id 1\n");

    // Ours, with a flipped byte in the request and in the answer.
    drain.request(&request(3)).unwrap();
    let mut bytes = raw.xattrs(oid).unwrap()["request"].clone();
    bytes[1] ^= 1;
    raw.operate(oid, &WriteOp::new().set_xattr("request", &bytes))
        .unwrap();
    let e = drain.pending().unwrap_err();
    assert!(
        matches!(
            &e,
            DrainError::Damaged {
                what: "request",
                ..
            }
        ),
        "{e:?}"
    );
    raw.operate(
        oid,
        &WriteOp::new().set_xattr("answer", b"id 3\ncrc32c 0\n"),
    )
    .unwrap();
    let e = drain.answered().unwrap_err();
    assert!(
        matches!(&e, DrainError::Damaged { what: "answer", .. }),
        "{e:?}"
    );
    // A new request replaces the damage.
    drain.request(&request(4)).unwrap();
    assert_eq!(drain.pending().unwrap(), Some(request(4)));
    assert_eq!(drain.answered().unwrap(), None);
}
