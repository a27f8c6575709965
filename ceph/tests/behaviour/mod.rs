//! Behaviour every `Cluster` must show, written once and run against the
//! simulated cluster (`tests/sim.rs`) and the real one (`tests/live.rs`).
//! These are the facts the store engine relies on; the real cluster's
//! answers were first verified by hand (research for issue 19) and are
//! asserted here so the simulation cannot drift from them.

use std::time::Duration;
use tidemark_ceph::{
    CephError, Cluster, ClusterImage, CmpOp, LockRequest, Pending, Renew, WriteOp,
};

/// A cluster to test on, with a way to let lock time pass.
pub(crate) trait Harness {
    /// The implementation under test.
    type C: Cluster;
    /// A new client instance (own address) in this test's namespace.
    fn client(&self) -> Self::C;
    /// Lets `d` of lock time pass (virtual or real).
    fn wait_past(&self, d: Duration);
    /// The lock duration to test expiry with.
    fn lease(&self) -> Duration;
}

fn lock<'a>(cookie: &'a str, duration: Duration, renew: Renew) -> LockRequest<'a> {
    LockRequest {
        name: "tidemark",
        cookie,
        desc: "r1:7443",
        duration,
        renew,
    }
}

/// Strips a `v1:`/`v2:`/`any:` address type, as lockers and getaddrs differ in it.
fn bare(addr: &str) -> &str {
    addr.split_once(':')
        .filter(|(p, _)| matches!(*p, "v1" | "v2" | "any"))
        .map_or(addr, |(_, a)| a)
}

#[track_caller]
fn assert_err(
    result: Result<impl std::fmt::Debug, CephError>,
    want: fn(&CephError) -> bool,
    what: &str,
) {
    match result {
        Err(e) if want(&e) => {}
        other => panic!("{what}: unexpected {other:?}"),
    }
}

/// Compound writes: guards, their direction, atomicity, object steps, omap.
pub(crate) fn write_ops<H: Harness>(h: &H) {
    let c = h.client();
    c.operate(
        "st",
        &WriteOp::new().write_full(b"state").set_xattr("v", b"0005"),
    )
    .unwrap();
    // cmpxattr passes iff `value OP stored` (stored 0005).
    for (op, value, passes) in [
        (CmpOp::Eq, "0005", true),
        (CmpOp::Eq, "0003", false),
        (CmpOp::Gt, "0007", true),
        (CmpOp::Gt, "0003", false),
        (CmpOp::Lt, "0003", true),
        (CmpOp::Lt, "0007", false),
        (CmpOp::Ne, "0005", false),
        (CmpOp::Gte, "0005", true),
        (CmpOp::Lte, "0004", true),
    ] {
        let r = c.operate(
            "st",
            &WriteOp::new()
                .cmp_xattr("v", op, value.as_bytes())
                .set_xattr("x", b"1"),
        );
        assert_eq!(r.is_ok(), passes, "{op:?} {value} against 0005: {r:?}");
        if !passes {
            assert_err(
                r,
                |e| matches!(e, CephError::Canceled { .. }),
                "failed guard",
            );
        }
    }
    // A missing attribute compares as the empty value: Eq fails, Gt passes.
    assert_err(
        c.operate("st", &WriteOp::new().cmp_xattr("nope", CmpOp::Eq, b"0")),
        |e| matches!(e, CephError::Canceled { .. }),
        "Eq guard on a missing xattr",
    );
    c.operate("st", &WriteOp::new().cmp_xattr("nope", CmpOp::Gt, b"0"))
        .unwrap();
    // A guard on a missing object: not found.
    assert_err(
        c.operate(
            "none",
            &WriteOp::new()
                .set_xattr("v", b"1")
                .cmp_xattr("v", CmpOp::Eq, b"1"),
        ),
        CephError::is_not_found,
        "guard on a missing object",
    );
    // A guard compares with the value stored before the operation, not
    // with what earlier steps of the same operation set.
    assert_err(
        c.operate(
            "st",
            &WriteOp::new()
                .set_xattr("v", b"0006")
                .cmp_xattr("v", CmpOp::Eq, b"0006"),
        ),
        |e| matches!(e, CephError::Canceled { .. }),
        "guard after a set in the same op",
    );
    c.operate(
        "st",
        &WriteOp::new()
            .set_xattr("v", b"0006")
            .cmp_xattr("v", CmpOp::Eq, b"0005")
            .set_xattr("v", b"0005"),
    )
    .unwrap();
    // A failed guard anywhere drops every step.
    let r = c.operate(
        "st",
        &WriteOp::new()
            .write_full(b"lost")
            .set_xattr("v", b"0009")
            .cmp_xattr("v", CmpOp::Eq, b"0001"),
    );
    assert_err(r, |e| matches!(e, CephError::Canceled { .. }), "late guard");
    assert_eq!(c.read("st", 0, 100).unwrap(), b"state");
    assert_eq!(c.xattrs("st").unwrap()["v"], b"0005");

    // Exclusive create, write at an offset, truncate, zero.
    c.operate(
        "seg",
        &WriteOp::new()
            .create(true)
            .set_xattr("epoch", b"01")
            .write(0, b"hello"),
    )
    .unwrap();
    assert_err(
        c.operate("seg", &WriteOp::new().create(true)),
        |e| matches!(e, CephError::Exists { .. }),
        "create twice",
    );
    c.operate(
        "seg",
        &WriteOp::new()
            .create(false)
            .cmp_xattr("epoch", CmpOp::Eq, b"01")
            .truncate(2)
            .write(2, b"XY"),
    )
    .unwrap();
    assert_eq!(c.read("seg", 0, 16).unwrap(), b"heXY");
    c.operate("seg", &WriteOp::new().write(10, b"z").zero(1, 2))
        .unwrap();
    assert_eq!(c.stat("seg").unwrap(), 11);
    assert_eq!(c.read("seg", 0, 16).unwrap(), b"h\0\0Y\0\0\0\0\0\0z");
    assert_eq!(c.read("seg", 9, 16).unwrap(), b"\0z");
    // Zeroing a range that reaches the end truncates the object there.
    c.operate("seg", &WriteOp::new().zero(9, 100)).unwrap();
    assert_eq!(c.stat("seg").unwrap(), 9);
    c.operate("seg", &WriteOp::new().write(10, b"z")).unwrap();
    // Zeroing or truncating a missing object does not create it.
    c.operate("ghost", &WriteOp::new().zero(0, 10).truncate(5))
        .unwrap();
    assert_err(
        c.stat("ghost"),
        CephError::is_not_found,
        "zeroed missing object",
    );

    // Omap: set, page, remove.
    let entries = (0..5)
        .map(|i| (format!("seg.{i:04}"), vec![i as u8; i]))
        .collect();
    c.operate("dir", &WriteOp::new().omap_set(entries)).unwrap();
    let page = c.omap("dir", None, 3).unwrap();
    assert_eq!(
        page.entries
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["seg.0000", "seg.0001", "seg.0002"]
    );
    assert!(page.more);
    let rest = c.omap("dir", Some("seg.0002"), 10).unwrap();
    assert_eq!(
        rest.entries,
        vec![
            ("seg.0003".into(), vec![3; 3]),
            ("seg.0004".into(), vec![4; 4])
        ]
    );
    assert!(!rest.more);
    c.operate(
        "dir",
        &WriteOp::new().omap_rm(vec!["seg.0000".into(), "seg.0009".into()]),
    )
    .unwrap();
    assert_eq!(c.omap("dir", None, 10).unwrap().entries.len(), 4);

    // Asynchronous compound writes to one object apply in order.
    let pending: Vec<_> = (0..4u8)
        .map(|i| {
            c.operate_async(
                "log",
                &WriteOp::new().write(u64::from(i) * 2, &[b'a' + i; 2]),
            )
            .unwrap()
        })
        .collect();
    for p in pending {
        p.wait().unwrap();
    }
    assert_eq!(c.read("log", 0, 16).unwrap(), b"aabbccdd");

    // Remove: gone, and removing again is not found.
    c.operate("seg", &WriteOp::new().remove()).unwrap();
    assert_err(c.read("seg", 0, 1), CephError::is_not_found, "read removed");
    assert_err(
        c.operate("seg", &WriteOp::new().remove()),
        CephError::is_not_found,
        "remove twice",
    );
}

/// Leases: the `lock` class's exclusive locks, renewal, expiry, assert_locked.
pub(crate) fn locks<H: Harness>(h: &H) {
    let (a, b) = (h.client(), h.client());
    let lease = h.lease();
    // Locking a missing object creates it, empty.
    a.lock_exclusive("g+state", &lock("ca", lease, Renew::No))
        .unwrap();
    assert_eq!(a.stat("g+state").unwrap(), 0);
    assert_err(
        a.lock_exclusive("g+state", &lock("ca", lease, Renew::No)),
        |e| matches!(e, CephError::Exists { .. }),
        "relock",
    );
    a.lock_exclusive("g+state", &lock("ca", lease, Renew::May))
        .unwrap();
    a.lock_exclusive("g+state", &lock("ca", lease, Renew::Must))
        .unwrap();
    assert_err(
        b.lock_exclusive("g+state", &lock("cb", lease, Renew::No)),
        |e| matches!(e, CephError::Busy { .. }),
        "taken",
    );

    let lockers = b.lockers("g+state", "tidemark").unwrap();
    assert_eq!(lockers.len(), 1, "{lockers:?}");
    assert_eq!(lockers[0].cookie, "ca");
    assert!(lockers[0].client.starts_with("client."), "{lockers:?}");
    assert_eq!(bare(&lockers[0].addr), bare(&a.my_addr().unwrap()));

    // assert_locked: passes for the holder, not for another client with the
    // holder's cookie.
    let guarded = |epoch: &[u8]| {
        WriteOp::new()
            .assert_locked("tidemark", "ca")
            .set_xattr("epoch", epoch)
    };
    a.operate("g+state", &guarded(b"01")).unwrap();
    assert_err(
        b.operate("g+state", &guarded(b"02")),
        |e| matches!(e, CephError::Busy { .. }),
        "foreign assert_locked",
    );
    assert_eq!(a.xattrs("g+state").unwrap()["epoch"], b"01");

    // Expiry: nobody took it, yet the holder can neither renew nor assert.
    h.wait_past(lease);
    assert_err(
        a.lock_exclusive("g+state", &lock("ca", lease, Renew::Must)),
        CephError::is_not_found,
        "must-renew after expiry",
    );
    assert_err(
        a.operate("g+state", &guarded(b"03")),
        |e| matches!(e, CephError::Busy { .. }),
        "assert_locked after expiry",
    );
    assert!(
        b.lockers("g+state", "tidemark").unwrap().is_empty(),
        "expired lockers are not listed"
    );

    // Another client takes it; the old holder's renewal is refused.
    b.lock_exclusive("g+state", &lock("cb", lease, Renew::No))
        .unwrap();
    assert_err(
        a.lock_exclusive("g+state", &lock("ca", lease, Renew::Must)),
        CephError::is_not_found,
        "must-renew of a lock taken over",
    );
    assert_err(
        a.lock_exclusive("g+state", &lock("ca", lease, Renew::May)),
        |e| matches!(e, CephError::Busy { .. }),
        "may-renew",
    );
    assert_err(
        a.unlock("g+state", "tidemark", "ca"),
        CephError::is_not_found,
        "unlock of a lock not held",
    );

    // Break and unlock.
    let holder = a.lockers("g+state", "tidemark").unwrap().remove(0);
    a.break_lock("g+state", "tidemark", &holder.client, &holder.cookie)
        .unwrap();
    assert!(a.lockers("g+state", "tidemark").unwrap().is_empty());
    a.lock_exclusive("g+state", &lock("ca", Duration::ZERO, Renew::No))
        .unwrap();
    a.unlock("g+state", "tidemark", "ca").unwrap();
    b.lock_exclusive("g+state", &lock("cb", lease, Renew::No))
        .unwrap();
}

/// Fencing: after a blocklist and a fresh OSD map, every call of the fenced
/// client fails `Blocklisted`, images included.
pub(crate) fn blocklist<H: Harness>(h: &H) {
    let (a, b) = (h.client(), h.client());
    a.image_create("fence-img", 1 << 20).unwrap();
    let img = a.image_open("fence-img").unwrap();
    img.write(0, &[1; 4096]).unwrap();
    img.flush().unwrap();
    a.lock_exclusive("g+state", &lock("ca", h.lease(), Renew::No))
        .unwrap();
    let addr = b.lockers("g+state", "tidemark").unwrap().remove(0).addr;
    b.blocklist(&addr, Duration::from_secs(600)).unwrap();
    b.wait_for_latest_osdmap().unwrap();
    assert_err(
        a.operate("g+state", &WriteOp::new().set_xattr("x", b"1")),
        |e| e.is_fenced(),
        "fenced write op",
    );
    assert_err(
        a.operate("other", &WriteOp::new().write_full(b"x")),
        |e| matches!(e, CephError::Blocklisted { .. }),
        "fenced",
    );
    assert_err(
        img.write(0, &[2; 4096]),
        |e| matches!(e, CephError::Blocklisted { .. }),
        "fenced image write",
    );
    // Nothing of the fenced client landed.
    let mut buf = vec![0; 4096];
    b.image_open_read_only("fence-img")
        .unwrap()
        .read(0, &mut buf)
        .unwrap();
    assert!(buf.iter().all(|&x| x == 1));
    b.operate("other", &WriteOp::new().write_full(b"y"))
        .unwrap();
}

/// Images: exact zeroing, allocation, read-only handles, exclusive lock
/// takeover, snapshot + clone, asynchronous writes.
pub(crate) fn images<H: Harness>(h: &H) {
    const MIB: u64 = 1 << 20;
    let (a, b) = (h.client(), h.client());
    a.image_create("web1+default+disk-0", 12 * MIB).unwrap();
    assert_err(
        a.image_create("web1+default+disk-0", MIB),
        |e| matches!(e, CephError::Exists { .. }),
        "create twice",
    );
    let img = a.image_open("web1+default+disk-0").unwrap();
    assert_eq!(img.size().unwrap(), 12 * MIB);
    assert_eq!(img.allocated(0, 12 * MIB).unwrap(), vec![]);
    img.write(0, &vec![1; MIB as usize]).unwrap();
    // Exact zeroing of an unaligned range (a discard would leave the bytes).
    img.write_zeroes(1000, 4000).unwrap();
    let mut buf = vec![0; 8192];
    img.read(0, &mut buf).unwrap();
    assert_eq!(buf[999], 1);
    assert!(buf[1000..5000].iter().all(|&x| x == 0));
    assert_eq!(buf[5000], 1);
    // Asynchronous writes own their buffers; all complete.
    let pending: Vec<_> = (0..4u64)
        .map(|i| {
            img.write_async(8 * MIB + i * 4096, vec![i as u8 + 2; 4096])
                .unwrap()
        })
        .collect();
    for p in pending {
        p.wait().unwrap();
    }
    img.flush().unwrap();
    let mut tail = vec![0; 4 * 4096];
    img.read(8 * MIB, &mut tail).unwrap();
    for i in 0..4usize {
        assert!(tail[i * 4096..(i + 1) * 4096]
            .iter()
            .all(|&x| x == i as u8 + 2));
    }
    // Allocation covers what was written, and nothing in the untouched middle.
    let allocated = img.allocated(0, 12 * MIB).unwrap();
    let covers = |off: u64| allocated.iter().any(|&(s, l)| s <= off && off < s + l);
    assert!(
        covers(0) && covers(MIB - 1) && covers(8 * MIB + 4 * 4096 - 1),
        "{allocated:?}"
    );
    assert!(!covers(5 * MIB), "{allocated:?}");

    // A read-only handle cannot write.
    let ro = b.image_open_read_only("web1+default+disk-0").unwrap();
    assert_err(
        ro.write(0, &[9; 512]),
        |e| matches!(e, CephError::ReadOnly { .. }),
        "read-only write",
    );
    drop(ro);

    // The exclusive lock: held by a, b's write is refused until b breaks it;
    // then a is fenced.
    img.lock_acquire_breaking().unwrap();
    let img_b = b.image_open("web1+default+disk-0").unwrap();
    assert_err(
        img_b.write(0, &[9; 512]),
        |e| matches!(e, CephError::ReadOnly { .. }),
        "write without the lock",
    );
    img_b.lock_acquire_breaking().unwrap();
    img_b.write(0, &[9; 512]).unwrap();
    img_b.flush().unwrap();
    assert_err(
        img.write(0, &[1; 512]),
        |e| matches!(e, CephError::Blocklisted { .. }),
        "write after the lock was broken",
    );

    // Snapshot, protect, clone (with no handle holding the image's lock):
    // the clone reads the data as of the snapshot.
    drop((img, img_b));
    b.snap_protect_clone("web1+default+disk-0", "tm-fo-1", "failover-disk-0")
        .unwrap();
    b.image_open("web1+default+disk-0")
        .unwrap()
        .write(0, &[7; 512])
        .unwrap();
    let clone = b.image_open("failover-disk-0").unwrap();
    let mut head = vec![0; 1000];
    clone.read(0, &mut head).unwrap();
    assert!(head[..512].iter().all(|&x| x == 9) && head[512..].iter().all(|&x| x == 1));
    clone.write(0, &[5; 512]).unwrap();
    clone.flush().unwrap();
    drop(clone);
    b.image_remove("failover-disk-0").unwrap();
    assert_err(
        b.image_open("failover-disk-0"),
        CephError::is_not_found,
        "removed image",
    );
}
