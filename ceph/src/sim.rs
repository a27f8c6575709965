//! An in-memory Ceph cluster for tests: objects with xattrs, omap and
//! `lock`-class locks, RBD images, a blocklist, a virtual clock and a crash
//! switch, with the semantics `RadosCluster` shows on a real cluster (the
//! shared behaviour tests in `tests/` run against both).
//!
//! One [`SimWorld`] is the cluster; each [`SimWorld::client`] is a client
//! instance with its own entity name and address, bound to a namespace.
//!
//! Crash model: every mutating call is one numbered operation. After
//! [`SimWorld::cut_at`]`(n)`, operation `n` and every later call (reads too:
//! the process is gone) fail with [`CephError::Cut`] and change nothing.
//! [`SimWorld::crash`] then models the process's death: image writes not yet
//! flushed are lost (RADOS operations are durable when they return, so
//! objects keep everything applied), and the cut is lifted so a new client
//! can recover. Locks survive the crash until they expire.

use crate::cluster::{
    Cluster, ClusterImage, LockRequest, Locker, OmapPage, Pending, Renew, WriteOp, WriteStep,
};
use crate::CephError;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The largest object the simulated OSD keeps: Ceph's default
/// `osd_max_object_size` (a write past it fails with `EFBIG`).
const MAX_OBJECT_SIZE: u64 = 128 << 20;
/// The pool the simulated images are named in (`pool/[namespace/]image`).
const SIM_POOL: &str = "sim";

/// The RBD object size the simulation reports allocation in (librbd's
/// default order 22).
const OBJECT_SIZE: u64 = 4 << 20;

/// A simulated cluster, shared by its clients.
#[derive(Debug, Clone, Default)]
pub struct SimWorld {
    inner: Arc<Mutex<World>>,
}

#[derive(Debug, Default)]
struct World {
    now: Duration,
    objects: BTreeMap<(String, String), Object>,
    images: BTreeMap<(String, String), ImageData>,
    /// Fenced client addresses and when their entry expires.
    blocklist: BTreeMap<String, Duration>,
    ops: u64,
    cut: Option<u64>,
    clients: u64,
}

#[derive(Debug, Clone, Default)]
struct Object {
    data: Vec<u8>,
    xattrs: BTreeMap<String, Vec<u8>>,
    omap: BTreeMap<String, Vec<u8>>,
    /// Lock name → holders.
    locks: BTreeMap<String, Vec<Held>>,
}

#[derive(Debug, Clone)]
struct Held {
    client: String,
    cookie: String,
    addr: String,
    /// `None`: until unlocked.
    expires: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
struct ImageData {
    written: Vec<u8>,
    durable: Vec<u8>,
    /// Objects (index by [`OBJECT_SIZE`]) ever written.
    allocated: BTreeSet<u64>,
    /// The exclusive lock's holder (client entity).
    owner: Option<Who>,
    snaps: BTreeSet<String>,
    /// The image and snapshot this one was cloned from, while it depends
    /// on it.
    parent: Option<((String, String), String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Who {
    client: String,
    addr: String,
}

impl World {
    fn live(&mut self, op: &'static str, who: &Who) -> Result<(), CephError> {
        if let Some(cut) = self.cut {
            if self.ops >= cut {
                return Err(CephError::Cut { op, index: cut });
            }
        }
        let now = self.now;
        self.blocklist.retain(|_, until| *until > now);
        if self.blocklist.contains_key(&who.addr) {
            return Err(CephError::Blocklisted { op });
        }
        Ok(())
    }

    /// Starts a mutating operation: counts it unless the world is cut.
    fn mutate(&mut self, op: &'static str, who: &Who) -> Result<(), CephError> {
        self.live(op, who)?;
        self.ops += 1;
        Ok(())
    }

    fn locks_of(&self, obj: &Object, name: &str) -> Vec<Held> {
        let now = self.now;
        obj.locks
            .get(name)
            .map(|held| {
                held.iter()
                    .filter(|h| h.expires.is_none_or(|e| e > now))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl SimWorld {
    /// An empty cluster at virtual time zero.
    pub fn new() -> SimWorld {
        SimWorld::default()
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        // A panic while the lock was held was a test failure already; the
        // world's data is still consistent for reporting it.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new client instance (its own entity name and address) in `namespace`.
    pub fn client(&self, namespace: &str) -> SimCluster {
        let mut world = self.lock();
        world.clients += 1;
        let n = world.clients;
        SimCluster {
            world: self.clone(),
            namespace: namespace.to_owned(),
            who: Who {
                client: format!("client.{}", 4100 + n),
                addr: format!("127.0.0.1:0/{}", 1000 + n),
            },
        }
    }

    /// Moves the virtual clock forward (lock and blocklist expiry).
    pub fn advance(&self, by: Duration) {
        self.lock().now += by;
    }

    /// The virtual clock.
    pub fn now(&self) -> Duration {
        self.lock().now
    }

    /// Mutating operations applied so far.
    pub fn ops(&self) -> u64 {
        self.lock().ops
    }

    /// Stops the world at `ops` applied operations (`None`: never).
    pub fn cut_at(&self, ops: Option<u64>) {
        self.lock().cut = ops;
    }

    /// The process died: unflushed image writes are lost and the cut is lifted.
    pub fn crash(&self) {
        let mut world = self.lock();
        world.cut = None;
        for image in world.images.values_mut() {
            image.written = image.durable.clone();
        }
    }

    /// The durable bytes of an image (what survives a crash), for checks.
    pub fn image_durable(&self, namespace: &str, name: &str) -> Option<Vec<u8>> {
        self.lock()
            .images
            .get(&(namespace.to_owned(), name.to_owned()))
            .map(|i| i.durable.clone())
    }
}

/// One client of a [`SimWorld`], bound to a namespace.
#[derive(Debug, Clone)]
pub struct SimCluster {
    world: SimWorld,
    namespace: String,
    who: Who,
}

/// A finished simulated asynchronous operation.
#[derive(Debug)]
pub struct SimPending(Result<(), CephError>);

impl Pending for SimPending {
    fn wait(self) -> Result<(), CephError> {
        self.0
    }
}

impl SimCluster {
    /// The world this client belongs to.
    pub fn world(&self) -> &SimWorld {
        &self.world
    }

    fn key(&self, name: &str) -> (String, String) {
        (self.namespace.clone(), name.to_owned())
    }

    fn apply(&self, world: &mut World, oid: &str, op: &WriteOp) -> Result<(), CephError> {
        const OP: &str = "rados_write_op_operate";
        let key = self.key(oid);
        // Guards read the object as stored before the operation (the OSD
        // reads attributes from the committed object, not from the steps
        // before them); data steps see the steps before them.
        let stored = world.objects.get(&key);
        let mut obj = stored.cloned();
        for step in &op.steps {
            match step {
                WriteStep::AssertLocked { name, cookie } => {
                    let current = stored.ok_or(CephError::NotFound { op: OP })?;
                    let ours = world
                        .locks_of(current, name)
                        .iter()
                        .any(|h| h.client == self.who.client && h.cookie == *cookie);
                    if !ours {
                        return Err(CephError::Busy { op: OP });
                    }
                }
                WriteStep::CmpXattr {
                    name,
                    op: cmp,
                    value,
                } => {
                    let current = stored.ok_or(CephError::NotFound { op: OP })?;
                    // A missing attribute compares as the empty value.
                    let stored_value = current.xattrs.get(name).map_or(&[][..], Vec::as_slice);
                    if !cmp.holds(value, stored_value) {
                        return Err(CephError::Canceled { op: OP });
                    }
                }
                WriteStep::Create { exclusive } => {
                    if obj.is_some() && *exclusive {
                        return Err(CephError::Exists { op: OP });
                    }
                    obj.get_or_insert_with(Object::default);
                }
                WriteStep::Write { offset, data } => {
                    let o = obj.get_or_insert_with(Object::default);
                    let start = to_usize(*offset)?;
                    let end = start
                        .checked_add(data.len())
                        .ok_or(CephError::Other { op: OP, errno: 27 })?;
                    if end as u64 > MAX_OBJECT_SIZE {
                        // As the OSD refuses a write past osd_max_object_size.
                        return Err(CephError::Other { op: OP, errno: 27 });
                    }
                    if o.data.len() < end {
                        o.data.resize(end, 0);
                    }
                    o.data[start..end].copy_from_slice(data);
                }
                WriteStep::WriteFull { data } => {
                    if data.len() as u64 > MAX_OBJECT_SIZE {
                        return Err(CephError::Other { op: OP, errno: 27 });
                    }
                    obj.get_or_insert_with(Object::default).data = data.clone()
                }
                WriteStep::Truncate { size } => {
                    // Truncating a missing object is a no-op; it is not created.
                    if let Some(o) = obj.as_mut() {
                        o.data.resize(to_usize(*size)?, 0);
                    }
                }
                WriteStep::Zero { offset, len } => {
                    // The OSD zeroes inside the object; a range reaching its
                    // end truncates it at `offset` instead; past the end, or
                    // on a missing object, nothing happens.
                    if let Some(o) = obj.as_mut() {
                        let size = o.data.len() as u64;
                        let end = offset.saturating_add(*len);
                        if *offset >= size {
                        } else if end >= size {
                            o.data.truncate(to_usize(*offset)?);
                        } else {
                            o.data[to_usize(*offset)?..to_usize(end)?].fill(0);
                        }
                    }
                }
                WriteStep::SetXattr { name, value } => {
                    obj.get_or_insert_with(Object::default)
                        .xattrs
                        .insert(name.clone(), value.clone());
                }
                WriteStep::Remove => {
                    if obj.take().is_none() {
                        return Err(CephError::NotFound { op: OP });
                    }
                }
                WriteStep::OmapSet { entries } => {
                    let o = obj.get_or_insert_with(Object::default);
                    o.omap.extend(entries.iter().cloned());
                }
                WriteStep::OmapRm { keys } => {
                    let o = obj.as_mut().ok_or(CephError::NotFound { op: OP })?;
                    for k in keys {
                        o.omap.remove(k);
                    }
                }
            }
        }
        match obj {
            Some(o) => world.objects.insert(key, o),
            None => world.objects.remove(&key),
        };
        Ok(())
    }

    fn open(&self, name: &str, read_only: bool, op: &'static str) -> Result<SimImage, CephError> {
        let mut world = self.world.lock();
        world.live(op, &self.who)?;
        if !world.images.contains_key(&self.key(name)) {
            return Err(CephError::NotFound { op });
        }
        Ok(SimImage {
            world: self.world.clone(),
            key: self.key(name),
            who: self.who.clone(),
            read_only,
        })
    }
}

fn to_usize(n: u64) -> Result<usize, CephError> {
    usize::try_from(n).map_err(|_| CephError::Other {
        op: "sim",
        errno: 27,
    })
}

impl Cluster for SimCluster {
    type Image = SimImage;
    type Pending = SimPending;

    fn read(&self, oid: &str, offset: u64, len: usize) -> Result<Vec<u8>, CephError> {
        let mut world = self.world.lock();
        world.live("rados_read", &self.who)?;
        let obj = world
            .objects
            .get(&self.key(oid))
            .ok_or(CephError::NotFound { op: "rados_read" })?;
        let size = obj.data.len();
        let start = to_usize(offset)?.min(size);
        let end = start.saturating_add(len).min(size);
        Ok(obj.data[start..end].to_vec())
    }

    fn stat(&self, oid: &str) -> Result<u64, CephError> {
        let mut world = self.world.lock();
        world.live("rados_stat", &self.who)?;
        let obj = world
            .objects
            .get(&self.key(oid))
            .ok_or(CephError::NotFound { op: "rados_stat" })?;
        Ok(obj.data.len() as u64)
    }

    fn operate(&self, oid: &str, op: &WriteOp) -> Result<(), CephError> {
        let mut world = self.world.lock();
        world.mutate("rados_write_op_operate", &self.who)?;
        self.apply(&mut world, oid, op)
    }

    fn operate_async(&self, oid: &str, op: &WriteOp) -> Result<SimPending, CephError> {
        let mut world = self.world.lock();
        world.mutate("rados_aio_write_op_operate", &self.who)?;
        Ok(SimPending(self.apply(&mut world, oid, op)))
    }

    fn xattrs(&self, oid: &str) -> Result<BTreeMap<String, Vec<u8>>, CephError> {
        let mut world = self.world.lock();
        world.live("rados_getxattrs", &self.who)?;
        let obj = world
            .objects
            .get(&self.key(oid))
            .ok_or(CephError::NotFound {
                op: "rados_getxattrs",
            })?;
        Ok(obj.xattrs.clone())
    }

    fn omap(&self, oid: &str, after: Option<&str>, max: u64) -> Result<OmapPage, CephError> {
        const OP: &str = "rados_read_op_operate";
        let mut world = self.world.lock();
        world.live(OP, &self.who)?;
        let obj = world
            .objects
            .get(&self.key(oid))
            .ok_or(CephError::NotFound { op: OP })?;
        let mut rest = obj
            .omap
            .iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a));
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let entries: Vec<_> = rest
            .by_ref()
            .take(max)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(OmapPage {
            entries,
            more: rest.next().is_some(),
        })
    }

    fn lock_exclusive(&self, oid: &str, lock: &LockRequest<'_>) -> Result<(), CephError> {
        const OP: &str = "rados_lock_exclusive";
        let mut world = self.world.lock();
        world.mutate(OP, &self.who)?;
        let now = world.now;
        let obj = world.objects.entry(self.key(oid)).or_default();
        let held = obj.locks.entry(lock.name.to_owned()).or_default();
        held.retain(|h| h.expires.is_none_or(|e| e > now));
        let expires = (!lock.duration.is_zero()).then(|| now + lock.duration);
        if let Some(mine) = held
            .iter_mut()
            .find(|h| h.client == self.who.client && h.cookie == lock.cookie)
        {
            if lock.renew == Renew::No {
                return Err(CephError::Exists { op: OP });
            }
            mine.expires = expires;
            return Ok(());
        }
        if lock.renew == Renew::Must {
            return Err(CephError::NotFound { op: OP });
        }
        if !held.is_empty() {
            return Err(CephError::Busy { op: OP });
        }
        held.push(Held {
            client: self.who.client.clone(),
            cookie: lock.cookie.to_owned(),
            addr: self.who.addr.clone(),
            expires,
        });
        Ok(())
    }

    fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), CephError> {
        let client = self.who.client.clone();
        self.remove_holder("rados_unlock", oid, name, &client, cookie)
    }

    fn break_lock(
        &self,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), CephError> {
        self.remove_holder("rados_break_lock", oid, name, client, cookie)
    }

    fn lockers(&self, oid: &str, name: &str) -> Result<Vec<Locker>, CephError> {
        const OP: &str = "rados_list_lockers";
        let mut world = self.world.lock();
        world.live(OP, &self.who)?;
        let obj = world
            .objects
            .get(&self.key(oid))
            .ok_or(CephError::NotFound { op: OP })?;
        Ok(world
            .locks_of(obj, name)
            .into_iter()
            .map(|h| Locker {
                client: h.client,
                cookie: h.cookie,
                addr: h.addr,
            })
            .collect())
    }

    fn blocklist(&self, addr: &str, expire: Duration) -> Result<(), CephError> {
        let mut world = self.world.lock();
        world.mutate("rados_blocklist_add", &self.who)?;
        let until = world.now + expire;
        // Lockers list addresses as `v1:IP:PORT/NONCE` (or `any:`), the
        // blocklist takes either form.
        let bare = addr
            .split_once(':')
            .filter(|(p, _)| matches!(*p, "v1" | "v2" | "any"))
            .map_or(addr, |(_, a)| a);
        world.blocklist.insert(bare.to_owned(), until);
        Ok(())
    }

    fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        self.world
            .lock()
            .live("rados_wait_for_latest_osdmap", &self.who)
    }

    fn my_addr(&self) -> Result<String, CephError> {
        self.world.lock().live("rados_getaddrs", &self.who)?;
        Ok(self.who.addr.clone())
    }

    fn image_create(&self, name: &str, size: u64) -> Result<(), CephError> {
        const OP: &str = "rbd_create2";
        let mut world = self.world.lock();
        world.mutate(OP, &self.who)?;
        let key = self.key(name);
        if world.images.contains_key(&key) {
            return Err(CephError::Exists { op: OP });
        }
        let zeroes = vec![0; to_usize(size)?];
        world.images.insert(
            key,
            ImageData {
                written: zeroes.clone(),
                durable: zeroes,
                ..ImageData::default()
            },
        );
        Ok(())
    }

    fn image_open(&self, name: &str) -> Result<SimImage, CephError> {
        self.open(name, false, "rbd_open")
    }

    fn image_open_read_only(&self, name: &str) -> Result<SimImage, CephError> {
        self.open(name, true, "rbd_open_read_only")
    }

    fn image_remove(&self, name: &str) -> Result<(), CephError> {
        const OP: &str = "rbd_remove";
        let mut world = self.world.lock();
        world.mutate(OP, &self.who)?;
        match world.images.get(&self.key(name)) {
            None => Err(CephError::NotFound { op: OP }),
            Some(image) if !image.snaps.is_empty() => Err(CephError::Other { op: OP, errno: 39 }),
            Some(_) => {
                world.images.remove(&self.key(name));
                Ok(())
            }
        }
    }

    fn snap_protect_clone(&self, image: &str, snap: &str, clone: &str) -> Result<(), CephError> {
        let mut world = self.world.lock();
        world.mutate("rbd_snap_create", &self.who)?;
        if world.images.contains_key(&self.key(clone)) {
            return Err(CephError::Exists { op: "rbd_clone" });
        }
        let parent = world
            .images
            .get_mut(&self.key(image))
            .ok_or(CephError::NotFound { op: "rbd_open" })?;
        if !parent.snaps.insert(snap.to_owned()) {
            return Err(CephError::Exists {
                op: "rbd_snap_create",
            });
        }
        let child = ImageData {
            written: parent.written.clone(),
            durable: parent.written.clone(),
            allocated: parent.allocated.clone(),
            parent: Some((self.key(image), snap.to_owned())),
            ..ImageData::default()
        };
        world.images.insert(self.key(clone), child);
        Ok(())
    }

    fn image_children(&self, image: &str) -> Result<Vec<String>, CephError> {
        const OP: &str = "rbd_list_children3";
        let mut world = self.world.lock();
        world.live(OP, &self.who)?;
        let key = self.key(image);
        if !world.images.contains_key(&key) {
            return Err(CephError::NotFound { op: "rbd_open" });
        }
        Ok(world
            .images
            .iter()
            .filter(|(_, data)| data.parent.as_ref().is_some_and(|(p, _)| *p == key))
            .map(|((ns, name), _)| match ns.as_str() {
                "" => format!("{SIM_POOL}/{name}"),
                ns => format!("{SIM_POOL}/{ns}/{name}"),
            })
            .collect())
    }

    fn image_snaps_remove(&self, image: &str) -> Result<(), CephError> {
        let mut world = self.world.lock();
        let key = self.key(image);
        let snaps: Vec<String> = world
            .images
            .get(&key)
            .ok_or(CephError::NotFound { op: "rbd_open" })?
            .snaps
            .iter()
            .cloned()
            .collect();
        for snap in snaps {
            world.mutate("rbd_snap_remove", &self.who)?;
            let cloned = world
                .images
                .values()
                .any(|d| d.parent.as_ref() == Some(&(key.clone(), snap.clone())));
            if cloned {
                return Err(CephError::Busy {
                    op: "rbd_snap_unprotect",
                });
            }
            if let Some(data) = world.images.get_mut(&key) {
                data.snaps.remove(&snap);
            }
        }
        Ok(())
    }
}

impl SimCluster {
    fn remove_holder(
        &self,
        op: &'static str,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), CephError> {
        let mut world = self.world.lock();
        world.mutate(op, &self.who)?;
        let now = world.now;
        let obj = world
            .objects
            .get_mut(&self.key(oid))
            .ok_or(CephError::NotFound { op })?;
        let held = obj.locks.entry(name.to_owned()).or_default();
        held.retain(|h| h.expires.is_none_or(|e| e > now));
        let before = held.len();
        held.retain(|h| !(h.client == client && h.cookie == cookie));
        if held.len() == before {
            return Err(CephError::NotFound { op });
        }
        Ok(())
    }
}

/// An open image of a [`SimCluster`].
#[derive(Debug)]
pub struct SimImage {
    world: SimWorld,
    key: (String, String),
    who: Who,
    read_only: bool,
}

impl SimImage {
    fn with<T>(
        &self,
        op: &'static str,
        mutating: bool,
        f: impl FnOnce(&mut ImageData) -> Result<T, CephError>,
    ) -> Result<T, CephError> {
        let mut world = self.world.lock();
        if mutating {
            world.mutate(op, &self.who)?;
        } else {
            world.live(op, &self.who)?;
        }
        let image = world
            .images
            .get_mut(&self.key)
            .ok_or(CephError::NotFound { op })?;
        f(image)
    }

    fn writable(&self, op: &'static str, image: &mut ImageData) -> Result<(), CephError> {
        if self.read_only {
            return Err(CephError::ReadOnly { op });
        }
        match &image.owner {
            Some(owner) if owner.client != self.who.client => Err(CephError::ReadOnly { op }),
            Some(_) => Ok(()),
            None => {
                // Like librbd's automatic exclusive lock: the first writer takes it.
                image.owner = Some(self.who.clone());
                Ok(())
            }
        }
    }

    fn range(
        image: &ImageData,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> Result<(usize, usize), CephError> {
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= image.written.len() as u64);
        match end {
            Some(end) => Ok((to_usize(offset)?, to_usize(end)?)),
            None => Err(CephError::Other { op, errno: 22 }),
        }
    }

    fn write_now(&self, op: &'static str, offset: u64, data: &[u8]) -> Result<(), CephError> {
        self.with(op, true, |image| {
            self.writable(op, image)?;
            let (start, end) = Self::range(image, op, offset, data.len() as u64)?;
            image.written[start..end].copy_from_slice(data);
            if !data.is_empty() {
                image
                    .allocated
                    .extend(offset / OBJECT_SIZE..=(offset + data.len() as u64 - 1) / OBJECT_SIZE);
            }
            Ok(())
        })
    }
}

impl ClusterImage for SimImage {
    type Pending = SimPending;

    fn size(&self) -> Result<u64, CephError> {
        self.with(
            "rbd_get_size",
            false,
            |image| Ok(image.written.len() as u64),
        )
    }

    fn resize(&self, size: u64) -> Result<(), CephError> {
        self.with("rbd_resize", true, |image| {
            self.writable("rbd_resize", image)?;
            let size = to_usize(size)?;
            image.written.resize(size, 0);
            image.durable.resize(size, 0);
            Ok(())
        })
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CephError> {
        self.with("rbd_read", false, |image| {
            let (start, end) = Self::range(image, "rbd_read", offset, buf.len() as u64)?;
            buf.copy_from_slice(&image.written[start..end]);
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), CephError> {
        self.write_now("rbd_write", offset, data)
    }

    fn write_async(&self, offset: u64, data: Vec<u8>) -> Result<SimPending, CephError> {
        match self.write_now("rbd_aio_write", offset, &data) {
            Err(e @ CephError::Cut { .. }) => Err(e),
            result => Ok(SimPending(result)),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CephError> {
        self.with("rbd_write_zeroes", true, |image| {
            self.writable("rbd_write_zeroes", image)?;
            let (start, end) = Self::range(image, "rbd_write_zeroes", offset, len)?;
            image.written[start..end].fill(0);
            Ok(())
        })
    }

    fn flush(&self) -> Result<(), CephError> {
        self.with("rbd_flush", true, |image| {
            image.durable = image.written.clone();
            Ok(())
        })
    }

    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, CephError> {
        self.with("rbd_diff_iterate2", false, |image| {
            let end = offset.saturating_add(len);
            let mut out: Vec<(u64, u64)> = Vec::new();
            for &index in &image.allocated {
                let start = (index * OBJECT_SIZE).max(offset);
                let stop = ((index + 1) * OBJECT_SIZE)
                    .min(end)
                    .min(image.written.len() as u64);
                if start >= stop {
                    continue;
                }
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += stop - start,
                    _ => out.push((start, stop - start)),
                }
            }
            Ok(out)
        })
    }

    fn lock_acquire_breaking(&self) -> Result<(), CephError> {
        let mut world = self.world.lock();
        world.mutate("rbd_lock_acquire", &self.who)?;
        if self.read_only {
            return Err(CephError::ReadOnly {
                op: "rbd_lock_acquire",
            });
        }
        let previous = {
            let image = world.images.get_mut(&self.key).ok_or(CephError::NotFound {
                op: "rbd_lock_acquire",
            })?;
            image.owner.replace(self.who.clone())
        };
        if let Some(previous) = previous.filter(|p| p.client != self.who.client) {
            // rbd_lock_break blocklists the previous holder.
            let until = world.now + Duration::from_secs(3600);
            world.blocklist.insert(previous.addr, until);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CmpOp;

    fn lock<'a>(cookie: &'a str, secs: u64, renew: Renew) -> LockRequest<'a> {
        LockRequest {
            name: "tidemark",
            cookie,
            desc: "d",
            duration: Duration::from_secs(secs),
            renew,
        }
    }

    #[test]
    fn a_failed_guard_applies_no_step() {
        let world = SimWorld::new();
        let a = world.client("ns");
        a.operate(
            "o",
            &WriteOp::new().write_full(b"abc").set_xattr("epoch", b"01"),
        )
        .unwrap();
        let err = a
            .operate(
                "o",
                &WriteOp::new()
                    .write(3, b"XYZ")
                    .cmp_xattr("epoch", CmpOp::Eq, b"02")
                    .set_xattr("epoch", b"02"),
            )
            .unwrap_err();
        assert!(matches!(err, CephError::Canceled { .. }), "{err}");
        assert_eq!(a.read("o", 0, 100).unwrap(), b"abc");
        assert_eq!(a.xattrs("o").unwrap()["epoch"], b"01");
    }

    #[test]
    fn the_cut_stops_every_later_call_and_crash_drops_unflushed_image_writes() {
        let world = SimWorld::new();
        let a = world.client("ns");
        a.image_create("img", 8192).unwrap();
        let img = a.image_open("img").unwrap();
        img.write(0, &[1; 4096]).unwrap();
        img.flush().unwrap();
        img.write(4096, &[2; 4096]).unwrap();
        let applied = world.ops();
        world.cut_at(Some(applied));
        assert!(matches!(img.flush(), Err(CephError::Cut { .. })));
        assert!(matches!(
            a.operate("o", &WriteOp::new().create(false)),
            Err(CephError::Cut { .. })
        ));
        assert!(matches!(a.stat("o"), Err(CephError::Cut { .. })));
        assert_eq!(world.ops(), applied);
        world.crash();
        let b = world.client("ns");
        assert!(b.stat("o").unwrap_err().is_not_found());
        let mut buf = vec![0; 8192];
        b.image_open_read_only("img")
            .unwrap()
            .read(0, &mut buf)
            .unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 1) && buf[4096..].iter().all(|&x| x == 0));
    }

    #[test]
    fn locks_expire_on_the_virtual_clock() {
        let world = SimWorld::new();
        let (a, b) = (world.client("ns"), world.client("ns"));
        a.lock_exclusive("s", &lock("ca", 10, Renew::No)).unwrap();
        assert!(matches!(
            b.lock_exclusive("s", &lock("cb", 10, Renew::No)),
            Err(CephError::Busy { .. })
        ));
        world.advance(Duration::from_secs(9));
        a.lock_exclusive("s", &lock("ca", 10, Renew::Must)).unwrap();
        world.advance(Duration::from_secs(9));
        assert!(matches!(
            b.lock_exclusive("s", &lock("cb", 10, Renew::No)),
            Err(CephError::Busy { .. })
        ));
        world.advance(Duration::from_secs(2));
        b.lock_exclusive("s", &lock("cb", 10, Renew::No)).unwrap();
        assert!(matches!(
            a.lock_exclusive("s", &lock("ca", 10, Renew::Must)),
            Err(CephError::NotFound { .. })
        ));
    }

    #[test]
    fn image_lock_break_fences_the_previous_writer() {
        let world = SimWorld::new();
        let (a, b) = (world.client("ns"), world.client("ns"));
        a.image_create("img", 4096).unwrap();
        let ia = a.image_open("img").unwrap();
        ia.lock_acquire_breaking().unwrap();
        let ib = b.image_open("img").unwrap();
        assert!(matches!(
            ib.write(0, &[7; 512]),
            Err(CephError::ReadOnly { .. })
        ));
        ib.lock_acquire_breaking().unwrap();
        ib.write(0, &[7; 512]).unwrap();
        assert!(matches!(
            ia.write(0, &[1; 512]),
            Err(CephError::Blocklisted { .. })
        ));
    }

    #[test]
    fn allocation_is_reported_per_object_and_clipped() {
        let world = SimWorld::new();
        let a = world.client("ns");
        a.image_create("img", 3 * OBJECT_SIZE).unwrap();
        let img = a.image_open("img").unwrap();
        assert_eq!(img.allocated(0, 3 * OBJECT_SIZE).unwrap(), vec![]);
        img.write(OBJECT_SIZE + 10, &[1; 10]).unwrap();
        img.write(2 * OBJECT_SIZE, &[1; 10]).unwrap();
        assert_eq!(
            img.allocated(0, 3 * OBJECT_SIZE).unwrap(),
            vec![(OBJECT_SIZE, 2 * OBJECT_SIZE)]
        );
        assert_eq!(
            img.allocated(OBJECT_SIZE + 5, 10).unwrap(),
            vec![(OBJECT_SIZE + 5, 10)]
        );
    }
}
