//! Against a real cluster (the testbed, started once for this binary, or the
//! one `CEPH_CONF` names): the shared behaviour tests (`behaviour/`), and
//! every hand-declared C function called at least once, which guards the
//! declarations in `src/ffi.rs` against drift. Each test works in its own
//! RADOS and RBD namespace.
//!
//! Without Ceph installed the tests skip with a message; under `CI` they
//! fail instead (CI installs ceph-mon, ceph-osd and ceph-common).

mod behaviour;

use behaviour::Harness;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};
use tidemark_ceph::rados::{self, Rados};
use tidemark_ceph::rbd::{self, Image};
use tidemark_ceph::{
    testbed, CephError, Cluster, ClusterImage, CmpOp, LockRequest, Pending, RadosCluster, Renew,
    SimWorld, WriteOp, WriteStep,
};

fn connect(tb: &testbed::Testbed, namespace: &str) -> RadosCluster {
    tb.connect(namespace, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

struct Live {
    tb: &'static testbed::Testbed,
    namespace: String,
}

impl Live {
    fn new(test: &str) -> Option<Live> {
        let tb = testbed::for_test()?;
        // A namespace per test and process: tests share the cluster.
        let namespace = format!("{test}-{}", std::process::id());
        Some(Live { tb, namespace })
    }
}

impl Harness for Live {
    type C = RadosCluster;

    fn client(&self) -> RadosCluster {
        connect(self.tb, &self.namespace)
    }

    fn wait_past(&self, d: Duration) {
        std::thread::sleep(d + Duration::from_millis(300));
    }

    fn lease(&self) -> Duration {
        Duration::from_secs(2)
    }
}

#[test]
fn write_ops() {
    let Some(h) = Live::new("write-ops") else {
        return;
    };
    behaviour::write_ops(&h);
}

#[test]
fn locks() {
    let Some(h) = Live::new("locks") else { return };
    behaviour::locks(&h);
}

#[test]
fn blocklist() {
    let Some(h) = Live::new("blocklist") else {
        return;
    };
    behaviour::blocklist(&h);
}

#[test]
fn images() {
    let Some(h) = Live::new("images") else { return };
    behaviour::images(&h);
}

/// The calls the behaviour tests do not reach through the `Cluster` seam.
#[test]
fn every_declared_function() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    assert_eq!(rados::version().0, 3);
    assert_eq!(rbd::version().0, 1);
    let namespace = format!("ffi-{}", std::process::id());
    let c = connect(tb, &namespace);
    let r: &Rados = c.rados();
    assert!(r.instance_id() > 0);
    let addrs = r.addrs().unwrap();
    assert!(addrs.contains('/'), "{addrs}");

    // Namespaces (RadosCluster::connect created ours).
    let root = r.ioctx(&tb.pool, "").unwrap();
    assert!(rbd::namespace_exists(&root, &namespace).unwrap());
    assert!(!rbd::namespace_exists(&root, "never-made").unwrap());
    assert!(matches!(
        rbd::namespace_create(&root, &namespace),
        Err(CephError::Exists { .. })
    ));

    // Plain object calls.
    let io = c.ioctx();
    io.aio_write("plain", 0, b"abcdefgh".to_vec())
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(
        io.aio_read("plain", 2, 100).unwrap().wait().unwrap(),
        b"cdefgh"
    );
    io.trunc("plain", 3).unwrap();
    assert_eq!(io.stat("plain").unwrap(), 3);
    io.remove("plain").unwrap();
    assert!(io.stat("plain").unwrap_err().is_not_found());
    assert!(matches!(io.read("a\0b", 0, 1), Err(CephError::Nul { .. })));

    // Images: resize, async read/zero/flush, lock release, snapshots.
    rbd::create(io, "img", 1 << 20, rbd::BASE_FEATURES).unwrap();
    let img = Image::open(io, "img").unwrap();
    img.resize(2 << 20).unwrap();
    assert_eq!(img.size().unwrap(), 2 << 20);
    img.aio_write((1 << 20) - 4, vec![3; 8])
        .unwrap()
        .wait()
        .unwrap();
    img.aio_write_zeroes(1 << 20, 2).unwrap().wait().unwrap();
    img.aio_flush().unwrap().wait().unwrap();
    assert_eq!(
        img.aio_read((1 << 20) - 4, 8).unwrap().wait_read().unwrap(),
        [3, 3, 3, 3, 0, 0, 3, 3]
    );
    img.lock_acquire().unwrap();
    assert_eq!(img.lock_owners().unwrap().len(), 1);
    img.lock_release().unwrap();
    img.snap_create("s1").unwrap();
    img.snap_protect("s1").unwrap();
    assert!(
        img.snap_remove("s1").is_err(),
        "a protected snapshot cannot be removed"
    );
    img.snap_unprotect("s1").unwrap();
    img.snap_remove("s1").unwrap();
    drop(img);
    rbd::remove(io, "img").unwrap();
}

/// Loose timings of the calls the store's hot paths make (printed, not
/// asserted: the machine is shared).
#[test]
fn timings() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let c = connect(tb, &format!("timings-{}", std::process::id()));
    let start = Instant::now();
    for i in 0..50u32 {
        c.operate(
            "st",
            &WriteOp::new()
                .write_full(&[1; 200])
                .set_xattr("commit", format!("{i:016x}").as_bytes()),
        )
        .unwrap();
    }
    eprintln!(
        "small state write op: {:.2} ms",
        start.elapsed().as_secs_f64() * 1000.0 / 50.0
    );
    let chunk = vec![7u8; 4 << 20];
    let start = Instant::now();
    let pending: Vec<_> = (0..8u64)
        .map(|i| {
            c.ioctx()
                .aio_write("seg", i * (4 << 20), chunk.clone())
                .unwrap()
        })
        .collect();
    for p in pending {
        p.wait().unwrap();
    }
    eprintln!(
        "8 x 4 MiB rados_aio_write: {:.0} MiB/s",
        32.0 / start.elapsed().as_secs_f64()
    );
}

/// One random step of the differential test: small names, values and
/// ranges, so that steps collide on the same bytes and attributes.
fn random_step(rng: &mut StdRng) -> WriteStep {
    let value = |rng: &mut StdRng| format!("0{}", rng.random_range(1..4)).into_bytes();
    let name = |rng: &mut StdRng| ["a", "b"][rng.random_range(0..2)].to_owned();
    let bytes = |rng: &mut StdRng, n: usize| {
        (0..n)
            .map(|_| rng.random_range(b'a'..=b'z'))
            .collect::<Vec<u8>>()
    };
    match rng.random_range(0..12) {
        0 => WriteStep::AssertLocked {
            name: "tidemark".into(),
            cookie: ["c", "other"][rng.random_range(0..2)].into(),
        },
        1 | 2 => {
            let op = [CmpOp::Eq, CmpOp::Ne, CmpOp::Gt, CmpOp::Lt][rng.random_range(0..4)];
            WriteStep::CmpXattr {
                name: name(rng),
                op,
                value: value(rng),
            }
        }
        3 => WriteStep::Create {
            exclusive: rng.random(),
        },
        4 | 5 => {
            let n = rng.random_range(1..8);
            WriteStep::Write {
                offset: rng.random_range(0..16),
                data: bytes(rng, n),
            }
        }
        6 => {
            let n = rng.random_range(0..8);
            WriteStep::WriteFull {
                data: bytes(rng, n),
            }
        }
        7 => WriteStep::Truncate {
            size: rng.random_range(0..20),
        },
        8 => WriteStep::Zero {
            offset: rng.random_range(0..20),
            len: rng.random_range(1..10),
        },
        9 => WriteStep::SetXattr {
            name: name(rng),
            value: value(rng),
        },
        10 => WriteStep::Remove,
        _ if rng.random() => WriteStep::OmapSet {
            entries: vec![(format!("k{}", rng.random_range(0..3)), value(rng))],
        },
        _ => WriteStep::OmapRm {
            keys: vec![format!("k{}", rng.random_range(0..3))],
        },
    }
}

/// Size, data, user xattrs and omap of one object.
type Observed = (u64, Vec<u8>, Vec<(String, Vec<u8>)>, Vec<(String, Vec<u8>)>);

/// What a client can observe of one object: size, data, user xattrs (the
/// lock class keeps its own `lock.*` attributes, which are not compared),
/// omap; or the errno reading it failed with.
fn observe(c: &impl Cluster, oid: &str) -> Result<Observed, i32> {
    let size = c.stat(oid).map_err(|e| e.errno())?;
    let data = c.read(oid, 0, 64).map_err(|e| e.errno())?;
    let xattrs = c
        .xattrs(oid)
        .map_err(|e| e.errno())?
        .into_iter()
        .filter(|(k, _)| !k.starts_with("lock."))
        .collect();
    let omap = c.omap(oid, None, 100).map_err(|e| e.errno())?.entries;
    Ok((size, data, xattrs, omap))
}

/// The simulation against the real cluster on random compound writes: the
/// same outcome (success or errno) for every operation and the same
/// observable objects after it. This is what keeps crash tests run on the
/// simulation meaningful for the real store.
#[test]
fn the_simulation_matches_the_cluster_on_random_write_ops() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    let seed = std::env::var("CEPH_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(19);
    let real = connect(tb, &format!("diff-{}", std::process::id()));
    let sim = SimWorld::new().client("diff");
    let mut rng = StdRng::seed_from_u64(seed);
    let objects = ["o0", "o1"];
    for c in [&real as &dyn LockOnly, &sim] {
        c.take("o0");
    }
    for i in 0..300 {
        let oid = objects[rng.random_range(0..objects.len())];
        let n = rng.random_range(1..5);
        let mut steps: Vec<_> = (0..n).map(|_| random_step(&mut rng)).collect();
        // A remove ends an operation (the seam's rule).
        if let Some(at) = steps.iter().position(|s| *s == WriteStep::Remove) {
            steps.truncate(at + 1);
        }
        let op = WriteOp { steps };
        let want = sim.operate(oid, &op).map_err(|e| e.errno());
        let got = real.operate(oid, &op).map_err(|e| e.errno());
        assert_eq!(
            got, want,
            "seed {seed}, op {i} on {oid}: {op:?} (left: cluster, right: simulation)"
        );
        assert_eq!(
            observe(&real, oid),
            observe(&sim, oid),
            "seed {seed}, after op {i} on {oid}: {op:?}"
        );
    }
}

/// Takes the lock the random `AssertLocked` steps name, on either cluster.
trait LockOnly {
    fn take(&self, oid: &str);
}

impl<C: Cluster> LockOnly for C {
    fn take(&self, oid: &str) {
        let lock = LockRequest {
            name: "tidemark",
            cookie: "c",
            desc: "",
            duration: Duration::ZERO,
            renew: Renew::No,
        };
        self.lock_exclusive(oid, &lock).unwrap();
    }
}

/// The simulation against the real cluster on random image writes, exact
/// zeroes and reads at unaligned offsets: the same bytes read back, and the
/// allocation map covers every byte that is not zero on both.
#[test]
fn the_simulation_matches_the_cluster_on_random_image_io() {
    let Some(tb) = testbed::for_test() else {
        return;
    };
    const SIZE: u64 = 12 << 20;
    let seed = std::env::var("CEPH_DIFF_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(19);
    let real = connect(tb, &format!("imgdiff-{}", std::process::id()));
    let sim = SimWorld::new().client("imgdiff");
    real.image_create("d", SIZE).unwrap();
    sim.image_create("d", SIZE).unwrap();
    let (ri, si) = (real.image_open("d").unwrap(), sim.image_open("d").unwrap());
    let mut rng = StdRng::seed_from_u64(seed);
    for i in 0..200 {
        let len = rng.random_range(1..200_000u64);
        let offset = rng.random_range(0..SIZE - len);
        match rng.random_range(0..4) {
            0 | 1 => {
                let byte = rng.random_range(1..=255u8);
                ri.write(offset, &vec![byte; len as usize]).unwrap();
                si.write(offset, &vec![byte; len as usize]).unwrap();
            }
            2 => {
                ri.write_zeroes(offset, len).unwrap();
                si.write_zeroes(offset, len).unwrap();
            }
            _ => {
                let (mut a, mut b) = (vec![0; len as usize], vec![0; len as usize]);
                ri.read(offset, &mut a).unwrap();
                si.read(offset, &mut b).unwrap();
                assert!(a == b, "seed {seed}, op {i}: read {offset}+{len} differs");
            }
        }
    }
    ri.flush().unwrap();
    let (mut a, mut b) = (vec![0; SIZE as usize], vec![0; SIZE as usize]);
    ri.read(0, &mut a).unwrap();
    si.read(0, &mut b).unwrap();
    assert!(a == b, "seed {seed}: the images differ");
    for map in [
        ri.allocated(0, SIZE).unwrap(),
        si.allocated(0, SIZE).unwrap(),
    ] {
        let covered = |off: u64| map.iter().any(|&(s, l)| s <= off && off < s + l);
        let first_uncovered_data = a
            .iter()
            .enumerate()
            .find(|&(off, &x)| x != 0 && !covered(off as u64));
        assert_eq!(
            first_uncovered_data, None,
            "seed {seed}: allocation {map:?} misses data"
        );
    }
}
