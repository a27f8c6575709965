//! The replica store on a Ceph cluster ([`CephEngine`]): each group's disks
//! are RBD images and its history (journal, journal index, span floor, pin)
//! RADOS objects, in one pool and namespace, through the
//! [`Cluster`] seam (a real cluster with
//! `tidemark-ceph`'s feature `librados`, or its simulation in tests).
//!
//! Selected in `receiver.toml` by `[receiver.store] kind = "ceph"`
//! ([`open_engine`](super::open_engine), on a real cluster with the
//! receiver's feature `ceph`). The engine is tested on the simulation
//! (`tests/ceph_store_crash.rs`, `tests/ceph_lease.rs`) and on a real
//! cluster (`tests/ceph_store_live.rs`, feature `ceph`). Several receivers
//! share a cluster through group leases ([`CephEngine::with_lease`], see
//! [`crate::lease`]): a group is opened only under its lease, after its
//! previous owners were fenced (blocklisted), and every commit asserts the
//! lease on the cluster. Without leases ([`CephEngine::new`], one receiver)
//! a newer writer still fences an older one (the epoch and the images'
//! exclusive locks, below), but a group without disks yet fences by the
//! epoch alone (its journal writes are not fenced). A process opens a
//! group for writing once at a time: a second writable open from the same
//! cluster client would break the first one's image locks, which
//! blocklists that client, the opener included.
//!
//! The group's store is the local store's ([`ReplicaGroup`]) on a
//! directory of the storage seam whose files are objects and images
//! ([`CephDir`]): the apply rules, the journal, its points, folds and the
//! pin are the local store's code and formats, unchanged; only where each
//! file lives and what makes a commit durable differ. This is the format
//! document of the Ceph store.
//!
//! # Objects
//!
//! `G` is `HOST+GROUP` (names never hold `+`).
//!
//! ```text
//!  G+state              the local state file's bytes ("TMRS": meta, journal
//!                       start and end, fold-to); empty until the first
//!                       commit. Extended attributes (numbers as 16
//!                       lower-case hex digits, so that guards compare them
//!                       as strings):
//!                         format  "tidemark-ceph 1": the version of every
//!                                 object of the group (a newer one is refused)
//!                         epoch   the fencing epoch: each writer's open
//!                                 advances it
//!                         commit  the commit counter: each commit advances it
//!                         owner   who opened the group last (a receiver's
//!                                 advertised address): where shippers
//!                                 are redirected, and for messages
//!                         owner-addr  the cluster client address of the
//!                                 last opener: a takeover blocklists it
//!                         owner-since when the last opener opened the
//!                                 group (ns since the Unix epoch,
//!                                 decimal; for `tidemark status`)
//!                       Under leases, the lock `tidemark` (the `lock`
//!                       class, exclusive, with an expiry) is the group's
//!                       lease.
//!  G+journal.SSSSSSSS   journal segments (the local TMJE entries; a position
//!                       is segment << 40 | offset); the next one begins at
//!                       the first commit past [`SEGMENT_SIZE`] (64 MiB),
//!                       under the OSD's object size limit
//!  G+journal-index      the journal index (TMJI), replaced whole
//!  G+span-floor         the span floor (decimal), replaced whole; absent: none
//!  G+dir                omap: one key per object the journal created
//!                       (journal segments), so that an open finds leftovers
//!                       without listing the pool
//!  G+tf.pin             the point a test failover reads (decimal): retention
//!                       folds neither it nor a later point while it exists
//!  G+drain             a planned failover's drain request and its answer
//!                       (attributes; absent: none): `drain`'s module
//!                       documents it
//!  G+disk-N             RBD image per disk: the disk as of the history's
//!                       start
//!  tidemark+groups      omap: G -> "" for every group ever opened
//! ```
//!
//! Files the local store replaces atomically (`NAME.tmp`, sync, rename)
//! are staged in memory and written by the rename in one operation: the
//! object is replaced whole, never seen half written.
//!
//! # Open
//!
//! 0. Under leases: the lease is taken and every previous owner fenced
//!    (lock, blocklist the `owner-addr` and the lock's holders, newest OSD
//!    map: [`crate::lease`]). Every operation below on `G+state` then
//!    also asserts the lock.
//! 1. One operation on `G+state`: create it exclusively with `format`,
//!    `epoch` and `commit` at zero (every guarded attribute exists before a
//!    guard relies on it: a missing one compares as empty). It exists
//!    already: nothing changes (under leases, the lock created it empty:
//!    the same attributes are set then, by the lock's holder). The group
//!    is listed in `tidemark+groups`.
//! 2. `format` is checked; `epoch` E and `commit` N are read.
//! 3. One operation: `epoch == E`, `commit == N` guards, `epoch := E+1`,
//!    `owner := …`, `owner-addr := this client's address`. From here a writer that opened before, if still
//!    running, can commit nothing more (its epoch guard fails).
//! 4. The local store's open. Each image is opened with its exclusive
//!    lock taken, breaking the lock of the writer before (which blocklists
//!    that client: from here it can change neither images nor objects).
//!    An uncommitted journal tail is cut (the
//!    segment truncated at the committed end, later segments listed in
//!    `G+dir` removed), a fold cut short is finished.
//!
//! A crash at any step leaves a group the next open opens: step 1 is
//! atomic, step 3 only moves the epoch, step 4 is the local recovery.
//!
//! # Apply → commit → Ack
//!
//! 1. Records in a consistent or resyncing group are appended to the
//!    journal segment (contiguous appends gathered, up to 4 MiB, into one
//!    write operation, sent when full or at the commit);
//!    initial-sync chunks are written into the images. Crash: nothing is
//!    committed; the next open cuts the journal tail, and the images'
//!    unflushed writes are lost or not, which the position (the disk's
//!    `synced` offset, as committed) does not count either way.
//! 2. The commit mark is appended and what was gathered of the segment
//!    written (durable on return); the touched images are flushed. Crash:
//!    as 1.
//! 3. **The commit**: one operation on `G+state`: under leases, our lock
//!    asserted (and refused here first once the lease is lost locally);
//!    `epoch == mine`, `commit == N` guards, `commit := N+1`, the state
//!    bytes written whole.
//!    Atomic and durable on return; only then is the position returned and
//!    the shipper acknowledged. Crash before or during: the old state or
//!    the new, never a mix. A failed guard means another writer opened the
//!    group (fenced): the group is poisoned, nothing is acknowledged. A
//!    timed-out operation leaves the outcome unknown: poisoned as well; the
//!    next open reads whichever state won, and the counter guard keeps a
//!    late-executing old operation from landing after a newer one.
//!
//! # Points and folds
//!
//! A point reads as the images with the journal's pieces before it laid
//! over them (the local overlay), read from the segment objects: no disk is
//! copied, no snapshot taken. Retention folds as locally: the state object
//! records the fold (one guarded commit), the pieces are written into the
//! images and flushed, the state moves the history's start (a second
//! commit), then the segments wholly before it are removed (object, then
//! its `G+dir` key). A crash anywhere after the first step is finished by
//! the next open, writing the same bytes again.
//!
//! # Remove
//!
//! A retired host's group is removed under its lease (taken as for an
//! open, so its previous owner is fenced; refused while another live
//! receiver holds it): the images of every disk the group or a point of
//! it lists, the journal segments `G+dir` lists, `G+dir`, the journal
//! index, the span floor, the pin and the drain object, then the state object, and last its
//! key in `tidemark+groups`. A crash part way leaves the state object (or
//! the key): the next remove goes on from there; a missing object counts
//! as removed. Failovers to RBD leave a protected snapshot on each disk's
//! image and a clone of it: while any clone still depends on one (the
//! admin has not flattened or removed it), the remove is refused before
//! anything is removed, naming the clones; otherwise each image's
//! snapshots are unprotected and removed just before the image.
//!
//! The pin (`G+tf.pin`) is read when retention chooses what to fold, as
//! the local pin file is; a pin and a fold are not yet serialised by one
//! guarded operation, so a reader pins before it reads, as locally.

mod dir;
pub mod drain;
pub mod span;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use tidemark_ceph::{CephError, Cluster, ClusterImage, CmpOp, WriteOp};
use tidemark_changelog::Seq;
use tidemark_names::Name;

use dir::{io_error, Head};
pub use dir::{CephDir, CephFile, ObjectFile};

use super::{ReplicaGroup, ReplicaStore, SpanTakeoverError, StoreEngine, StoreError};
use crate::lease::LeaseConfig;
use crate::lease_task::{LeaseGate, LeaseKeeper, LeaseStats, TakeoverError};
use crate::span::{SpanRecord, SpanRecordError, SpanStore};

/// The format of a group's objects this release reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The `format` attribute's text before the version number.
const FORMAT_PREFIX: &str = "tidemark-ceph ";
/// The omap object listing every group of the namespace.
pub const GROUPS_OBJECT: &str = "tidemark+groups";

/// Where the journal begins a new segment (one RADOS object): half of
/// Ceph's default `osd_max_object_size` (128 MiB), which refuses any write
/// past it. A segment rolls at the first commit past this size, so it
/// ends at most one commit beyond it (a commit holds at most the session's
/// bound on uncommitted records, 16 MiB by default).
pub const SEGMENT_SIZE: u64 = 64 << 20;

const XATTR_FORMAT: &str = "format";
const XATTR_EPOCH: &str = "epoch";
const XATTR_COMMIT: &str = "commit";
/// The state-object attribute naming the last opener (a receiver's
/// advertised address): where a shipper is redirected.
pub const XATTR_OWNER: &str = "owner";
/// The state-object attribute naming the cluster client address of the
/// last opener: a takeover blocklists it (an expired lock no longer lists
/// its holder).
pub const XATTR_OWNER_ADDR: &str = "owner-addr";
/// The state-object attribute saying when the last opener opened the
/// group (ns since the Unix epoch, decimal).
pub const XATTR_OWNER_SINCE: &str = "owner-since";
/// Attempts at advancing the epoch when other openers race this one.
const OPEN_ATTEMPTS: usize = 8;

/// A counter as an attribute value: 16 lower-case hex digits.
fn hex(n: u64) -> String {
    format!("{n:016x}")
}

/// The group store on a cluster, as a [`ReplicaGroup`] on a [`CephDir`].
pub type CephGroup<C> = ReplicaGroup<CephDir<C>>;

/// Where the groups' stores live: a pool and namespace of a Ceph cluster.
pub struct CephEngine<C: Cluster + 'static> {
    cluster: Arc<C>,
    /// Written to `owner` at open: where shippers are redirected.
    owner: String,
    /// The group leases, when several receivers share the cluster.
    lease: Option<LeaseKeeper<C>>,
}

impl<C: Cluster + 'static> fmt::Debug for CephEngine<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CephEngine")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

fn prefix(host: &Name, group: &Name) -> String {
    format!("{host}+{group}+")
}

impl<C: Cluster + 'static> CephEngine<C> {
    /// The engine on `cluster` (bound to its pool and namespace); `owner`
    /// says who opens groups (e.g. the receiver's node and pid).
    pub fn new(cluster: C, owner: &str) -> CephEngine<C> {
        CephEngine {
            cluster: Arc::new(cluster),
            owner: owner.to_owned(),
            lease: None,
        }
    }

    /// The engine on `cluster` shared with other receivers: each group is
    /// opened under its lease (see [`crate::lease`]), taken over from a
    /// dead or paused owner by fencing it first, and renewed from a thread
    /// of its own. `owner` is this receiver's advertised address (where
    /// other receivers send the shippers of the groups it owns).
    pub fn with_lease(
        cluster: C,
        owner: &str,
        config: LeaseConfig,
    ) -> Result<CephEngine<C>, CephError> {
        let cluster = Arc::new(cluster);
        let keeper = LeaseKeeper::new(cluster.clone(), config, owner)?;
        Ok(CephEngine {
            cluster,
            owner: owner.to_owned(),
            lease: Some(keeper),
        })
    }

    /// The counters of the group leases (`None`: no leases).
    pub fn lease_stats(&self) -> Option<LeaseStats> {
        self.lease.as_ref().map(LeaseKeeper::stats)
    }

    /// Lets every group this engine holds go (unlocks their leases): a
    /// receiver that stops cleanly calls it after dropping its stores, so
    /// that the next receiver need not wait for the leases to expire.
    /// Dropping the engine does it too.
    pub fn release_all(&self) {
        if let Some(keeper) = &self.lease {
            keeper.release_all();
        }
    }

    /// Drops the engine as if its process had died: no lease is let go,
    /// each stays until it expires (tests model a crashed owner so).
    pub fn abandon(mut self) {
        if let Some(keeper) = self.lease.take() {
            keeper.abandon();
        }
    }

    /// Lets `host`'s `group` go (unlocks its lease) after its store was
    /// dropped: another receiver may take it at once.
    pub fn release(&self, host: &Name, group: &Name) {
        if let Some(keeper) = &self.lease {
            keeper.release(&format!("{}state", prefix(host, group)));
        }
    }

    fn err(&self, host: &Name, group: &Name, context: &'static str, e: CephError) -> StoreError {
        StoreError::Io {
            context,
            path: PathBuf::from(self.describe(host, group)),
            source: io_error(e),
        }
    }

    /// Opens `host`'s `group` for writing, creating it on first use and
    /// recovering it after a crash (see the module's Open); with leases,
    /// taking its lease first ([`StoreError::OwnedElsewhere`] if another
    /// live receiver holds it).
    pub fn open_group(&self, host: &Name, group: &Name) -> Result<CephGroup<C>, StoreError> {
        let Some(keeper) = &self.lease else {
            return self.open_fenced(host, group, None);
        };
        let state = format!("{}state", prefix(host, group));
        keeper
            .take_over(&state, |gate| {
                self.open_fenced(host, group, Some(gate.clone()))
            })
            .map_err(|e| match e {
                TakeoverError::Open(e) => e,
                TakeoverError::OwnedElsewhere { owner } => StoreError::OwnedElsewhere {
                    group: self.describe(host, group),
                    owner,
                },
                TakeoverError::Lost(source) => StoreError::LeaseLost {
                    group: self.describe(host, group),
                    source,
                },
            })
    }

    /// The open's steps after the lease (if any) was taken and the
    /// previous owners fenced.
    fn open_fenced(
        &self,
        host: &Name,
        group: &Name,
        lease: Option<Arc<LeaseGate>>,
    ) -> Result<CephGroup<C>, StoreError> {
        let prefix = prefix(host, group);
        let state = format!("{prefix}state");
        let guarded = |op: WriteOp| match &lease {
            Some(gate) => {
                let mut locked = WriteOp::new().assert_locked(gate.name(), gate.cookie());
                locked.steps.extend(op.steps);
                locked
            }
            None => op,
        };
        let initial = || {
            WriteOp::new()
                .set_xattr(
                    XATTR_FORMAT,
                    format!("{FORMAT_PREFIX}{FORMAT_VERSION}").as_bytes(),
                )
                .set_xattr(XATTR_EPOCH, hex(0).as_bytes())
                .set_xattr(XATTR_COMMIT, hex(0).as_bytes())
                .set_xattr(XATTR_OWNER, self.owner.as_bytes())
        };
        let mut first = WriteOp::new().create(true);
        first.steps.extend(initial().steps);
        let created = match self.cluster.operate(&state, &first) {
            Ok(()) => true,
            // Taking the lease created the object empty: the lock holder
            // gives it its attributes (nobody else can meanwhile).
            Err(CephError::Exists { .. }) if lease.is_some() => {
                let xattrs = self
                    .cluster
                    .xattrs(&state)
                    .map_err(|e| self.err(host, group, "reading the state of", e))?;
                let fresh = !xattrs.contains_key(XATTR_FORMAT)
                    && self.cluster.stat(&state).is_ok_and(|size| size == 0);
                if fresh {
                    self.cluster
                        .operate(&state, &guarded(initial()))
                        .map_err(|e| self.err(host, group, "creating the group", e))?;
                }
                fresh
            }
            Err(CephError::Exists { .. }) => false,
            Err(e) => return Err(self.err(host, group, "creating the group", e)),
        };
        if created {
            let listed = WriteOp::new().omap_set(vec![(format!("{host}+{group}"), Vec::new())]);
            self.cluster
                .operate(GROUPS_OBJECT, &listed)
                .map_err(|e| self.err(host, group, "listing the group", e))?;
        }
        // Recorded so that a later takeover fences this client even once
        // its lock has expired (and is no longer listed).
        let my_addr = self
            .cluster
            .my_addr()
            .map_err(|e| self.err(host, group, "asking the cluster for our address for", e))?;
        let my_addr = crate::lease::client_addr(&my_addr);
        let mut attempt = 0;
        let head = loop {
            let (epoch, commit) = self.read_head(host, group)?;
            let bump = WriteOp::new()
                .cmp_xattr(XATTR_EPOCH, CmpOp::Eq, hex(epoch).as_bytes())
                .cmp_xattr(XATTR_COMMIT, CmpOp::Eq, hex(commit).as_bytes())
                .set_xattr(XATTR_EPOCH, hex(epoch + 1).as_bytes())
                .set_xattr(XATTR_OWNER, self.owner.as_bytes())
                .set_xattr(XATTR_OWNER_ADDR, my_addr.as_bytes())
                .set_xattr(
                    XATTR_OWNER_SINCE,
                    tidemark_changelog::now_ns().to_string().as_bytes(),
                );
            match self.cluster.operate(&state, &guarded(bump)) {
                Ok(()) => {
                    break Head {
                        epoch: epoch + 1,
                        commit,
                        read_only: false,
                    }
                }
                Err(CephError::Canceled { .. }) if attempt + 1 < OPEN_ATTEMPTS => attempt += 1,
                Err(e) => return Err(self.err(host, group, "taking the group's epoch", e)),
            }
        };
        let dir = CephDir::new(self.cluster.clone(), prefix.clone(), Some(head), lease);
        let test_failover = CephDir::new(self.cluster.clone(), format!("{prefix}tf."), None, None);
        let mut group = ReplicaGroup::open_on(dir, test_failover)?;
        group.set_segment_size(SEGMENT_SIZE);
        Ok(group)
    }

    /// Opens an existing group to read its points while a writer may
    /// write it; every change fails.
    pub fn open_group_read_only(
        &self,
        host: &Name,
        group: &Name,
    ) -> Result<CephGroup<C>, StoreError> {
        let prefix = prefix(host, group);
        let (epoch, commit) = self.read_head(host, group)?;
        let head = Head {
            epoch,
            commit,
            read_only: true,
        };
        let dir = CephDir::new(self.cluster.clone(), prefix.clone(), Some(head), None);
        let test_failover = CephDir::new(self.cluster.clone(), format!("{prefix}tf."), None, None);
        ReplicaGroup::open_on_read_only(dir, test_failover)
    }

    /// Pins the point `seq` of `host`'s `group` (`None`: removes the pin):
    /// retention folds neither it nor any later point while it lasts.
    pub fn set_pin(&self, host: &Name, group: &Name, seq: Option<Seq>) -> Result<(), StoreError> {
        let oid = format!("{}tf.{}", prefix(host, group), crate::pin::PIN_FILE);
        set_pin(self.cluster.as_ref(), &oid, seq)
            .map_err(|e| self.err(host, group, "writing the pin of", e))
    }

    /// Fails the opened `group` (of `host`) over to new RBD images as of
    /// its point `seq`, without copying a disk: per disk, one snapshot of
    /// its base image (`G+disk-N@SNAP`), protected, and a clone of it named
    /// `{name}-{disk name}`; then the point's journal pieces (what the
    /// point reads otherwise than the base image) are written into the
    /// clone, and the clone is flushed. One snapshot per failover, never
    /// one per point. `snap` names the snapshots (unique per failover).
    /// Returns each disk with its clone's name.
    ///
    /// `group` must be this engine's writable open of the group, so that
    /// no receiver folds into the base images meanwhile (the open fenced
    /// it).
    pub fn failover_to_rbd(
        &self,
        host: &Name,
        group_name: &Name,
        group: &CephGroup<C>,
        seq: Seq,
        name: &str,
        snap: &str,
    ) -> Result<Vec<(super::Disk, String)>, StoreError> {
        const CHUNK: u64 = 4 << 20;
        let view = group.view(Some(seq))?;
        let prefix = prefix(host, group_name);
        let mut clones = Vec::new();
        for disk in group.disks_at(seq) {
            let base = format!("{prefix}disk-{}", disk.id);
            let clone = format!("{name}-{}", disk.name);
            let err = |context: &'static str| {
                let described = self.describe(host, group_name);
                move |e: CephError| StoreError::Io {
                    context,
                    path: PathBuf::from(described),
                    source: io_error(e),
                }
            };
            self.cluster
                .snap_protect_clone(&base, snap, &clone)
                .map_err(err("snapshotting and cloning a disk of"))?;
            let image = self
                .cluster
                .image_open(&clone)
                .map_err(err("opening the failover clone of"))?;
            // A point before a growth reads the disk at its size then; the
            // base image has the size of now.
            image
                .resize(disk.size)
                .map_err(err("sizing the failover clone of"))?;
            let mut buf = Vec::new();
            for (start, end) in view.changed(disk.id) {
                let mut at = start;
                while at < end {
                    let n = (end - at).min(CHUNK);
                    if view.is_zero(disk.id, at, n) {
                        image
                            .write_zeroes(at, n)
                            .map_err(err("zeroing the failover clone of"))?;
                    } else {
                        buf.resize(n as usize, 0);
                        view.read(disk.id, at, &mut buf)?;
                        image
                            .write(at, &buf)
                            .map_err(err("writing the failover clone of"))?;
                    }
                    at += n;
                }
            }
            image
                .flush()
                .map_err(err("flushing the failover clone of"))?;
            clones.push((disk, clone));
        }
        Ok(clones)
    }

    /// Removes every object and image of `host`'s `group` (see the
    /// module's Remove), under its lease if there are leases.
    pub fn remove_group(&self, host: &Name, group: &Name) -> Result<(), StoreError> {
        let Some(keeper) = &self.lease else {
            return self.remove_objects(host, group);
        };
        let state = format!("{}state", prefix(host, group));
        let removed = keeper
            .take_over(&state, |_gate| self.remove_objects(host, group))
            .map_err(|e| match e {
                TakeoverError::Open(e) => e,
                TakeoverError::OwnedElsewhere { owner } => StoreError::OwnedElsewhere {
                    group: self.describe(host, group),
                    owner,
                },
                TakeoverError::Lost(source) => StoreError::LeaseLost {
                    group: self.describe(host, group),
                    source,
                },
            });
        // The lock went with the state object; nothing to renew.
        keeper.release(&state);
        removed
    }

    fn remove_objects(&self, host: &Name, group: &Name) -> Result<(), StoreError> {
        let prefix = prefix(host, group);
        let gone = |r: Result<(), CephError>| match r {
            Ok(()) | Err(CephError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        };
        let failed = |context: &'static str| move |e| self.err(host, group, context, e);
        // The disks of now and of every point, and those whose image is
        // still to be removed after they left: their images.
        let mut disks = std::collections::BTreeSet::new();
        match self.open_group_read_only(host, group) {
            Ok(g) => {
                disks.extend(g.disk_images());
                for point in g.points() {
                    disks.extend(g.disks_at(point.seq).iter().map(|d| d.id));
                }
            }
            // Removed before, up to its registry key.
            Err(StoreError::Damaged { .. }) if !self.exists(host, group) => {}
            Err(e) => return Err(e),
        }
        // Failovers to RBD cloned snapshots of the images: while a clone
        // depends on one, nothing is removed (the admin flattens or
        // removes the clones first); then the snapshots go with the images.
        let mut clones = Vec::new();
        for disk in &disks {
            match self.cluster.image_children(&format!("{prefix}disk-{disk}")) {
                Ok(c) => clones.extend(c),
                Err(CephError::NotFound { .. }) => {}
                Err(e) => return Err(self.err(host, group, "listing the clones of", e)),
            }
        }
        if !clones.is_empty() {
            return Err(StoreError::ClonesRemain {
                group: self.describe(host, group),
                clones,
            });
        }
        for disk in disks {
            let image = format!("{prefix}disk-{disk}");
            gone(self.cluster.image_snaps_remove(&image))
                .map_err(failed("removing the failover snapshots of"))?;
            gone(self.cluster.image_remove(&image)).map_err(failed("removing a disk image of"))?;
        }
        let dir = format!("{prefix}dir");
        loop {
            let page = match self.cluster.omap(&dir, None, 1024) {
                Ok(page) => page,
                Err(CephError::NotFound { .. }) => break,
                Err(e) => return Err(self.err(host, group, "listing the journal of", e)),
            };
            if page.entries.is_empty() {
                break;
            }
            for (name, _) in &page.entries {
                gone(
                    self.cluster
                        .operate(&format!("{prefix}{name}"), &WriteOp::new().remove()),
                )
                .map_err(failed("removing a journal segment of"))?;
            }
            let keys = page.entries.into_iter().map(|(k, _)| k).collect();
            gone(self.cluster.operate(&dir, &WriteOp::new().omap_rm(keys)))
                .map_err(failed("unlisting the journal of"))?;
        }
        for name in [
            "dir".to_owned(),
            super::index::INDEX_FILE.to_owned(),
            super::FLOOR_FILE.to_owned(),
            format!("tf.{}", crate::pin::PIN_FILE),
            "drain".to_owned(),
            "state".to_owned(),
        ] {
            gone(
                self.cluster
                    .operate(&format!("{prefix}{name}"), &WriteOp::new().remove()),
            )
            .map_err(failed("removing an object of"))?;
        }
        let unlisted = WriteOp::new().omap_rm(vec![format!("{host}+{group}")]);
        gone(self.cluster.operate(GROUPS_OBJECT, &unlisted))
            .map_err(failed("unlisting the group"))?;
        Ok(())
    }

    /// The state object's format check, and its epoch and commit counter.
    fn read_head(&self, host: &Name, group: &Name) -> Result<(u64, u64), StoreError> {
        let path = PathBuf::from(self.describe(host, group));
        let state = format!("{}state", prefix(host, group));
        let xattrs = match self.cluster.xattrs(&state) {
            Ok(x) => x,
            Err(CephError::NotFound { .. }) => {
                return Err(StoreError::Damaged {
                    path,
                    reason: "no state object: not a replica group".into(),
                })
            }
            Err(e) => return Err(self.err(host, group, "reading the state of", e)),
        };
        check_format(&path, &xattrs)?;
        let number = |name: &str| {
            xattrs
                .get(name)
                .and_then(|v| std::str::from_utf8(v).ok())
                .filter(|v| v.len() == 16)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .ok_or_else(|| StoreError::Damaged {
                    path: path.clone(),
                    reason: format!("attribute {name} is missing or not 16 hex digits"),
                })
        };
        Ok((number(XATTR_EPOCH)?, number(XATTR_COMMIT)?))
    }
}

/// Refuses a group of another format than this release's.
fn check_format(
    path: &std::path::Path,
    xattrs: &BTreeMap<String, Vec<u8>>,
) -> Result<(), StoreError> {
    let damaged = |reason: String| StoreError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    let text = xattrs
        .get(XATTR_FORMAT)
        .and_then(|v| std::str::from_utf8(v).ok())
        .ok_or_else(|| damaged("no format attribute".into()))?;
    let found: u32 = text
        .strip_prefix(FORMAT_PREFIX)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| damaged(format!("format {text:?} is not tidemark-ceph's")))?;
    if found != FORMAT_VERSION {
        return Err(StoreError::UnsupportedVersion {
            path: path.to_path_buf(),
            found,
            oldest: FORMAT_VERSION,
            newest: FORMAT_VERSION,
        });
    }
    Ok(())
}

impl<C: Cluster + 'static> StoreEngine for CephEngine<C> {
    fn open(&self, host: &Name, group: &Name) -> Result<Box<dyn ReplicaStore>, StoreError> {
        Ok(Box::new(self.open_group(host, group)?))
    }

    fn open_read_only(
        &self,
        host: &Name,
        group: &Name,
    ) -> Result<Arc<dyn ReplicaStore>, StoreError> {
        Ok(Arc::new(self.open_group_read_only(host, group)?))
    }

    fn exists(&self, host: &Name, group: &Name) -> bool {
        let state = format!("{}state", prefix(host, group));
        self.cluster.stat(&state).is_ok_and(|size| size > 0)
    }

    fn answers(&self, host: &Name, group: &Name) -> Result<(), StoreError> {
        let state = format!("{}state", prefix(host, group));
        match self.cluster.stat(&state) {
            Ok(_) | Err(CephError::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(host, group, "asking the cluster about", e)),
        }
    }

    fn describe(&self, host: &Name, group: &Name) -> String {
        format!("ceph:{host}+{group}")
    }

    fn lease_stats(&self) -> Option<LeaseStats> {
        CephEngine::lease_stats(self)
    }

    fn release(&self, host: &Name, group: &Name) {
        CephEngine::release(self, host, group)
    }

    fn release_all(&self) {
        CephEngine::release_all(self)
    }

    fn take_span(&self, span: &Name) -> Option<Result<Box<dyn SpanStore>, SpanTakeoverError>> {
        match CephEngine::take_span(self, span) {
            Ok(None) => None,
            Ok(Some(store)) => Some(Ok(Box::new(store))),
            Err(e) => Some(Err(e)),
        }
    }

    fn release_span(&self, span: &Name) {
        CephEngine::release_span(self, span)
    }

    fn span_holder(&self, span: &Name) -> Option<String> {
        CephEngine::span_owner(self, span)
    }

    fn read_span(&self, span: &Name) -> Option<Result<SpanRecord, SpanRecordError>> {
        self.lease.as_ref()?;
        Some(CephEngine::read_span(self, span))
    }

    fn store_pin(&self, host: &Name, group: &Name) -> Option<Box<dyn crate::pin::StorePin>> {
        Some(Box::new(CephPin {
            cluster: self.cluster.clone(),
            oid: format!("{}tf.{}", prefix(host, group), crate::pin::PIN_FILE),
            describe: self.describe(host, group),
        }))
    }

    fn drain_channel(
        &self,
        host: &Name,
        group: &Name,
    ) -> Option<Box<dyn crate::drain::DrainChannel>> {
        Some(Box::new(drain::CephDrain::new(
            self.cluster.clone(),
            format!("{}drain", prefix(host, group)),
        )))
    }

    fn groups(&self, host: &Name) -> Result<Vec<Name>, StoreError> {
        Ok(self
            .all_groups()?
            .into_iter()
            .filter(|(h, _)| h == host)
            .map(|(_, g)| g)
            .collect())
    }

    /// The groups `tidemark+groups` lists whose state object holds a
    /// commit (a group is listed before its first commit).
    fn all_groups(&self) -> Result<Vec<(Name, Name)>, StoreError> {
        let failed = |e: CephError| StoreError::Io {
            context: "listing the groups in",
            path: PathBuf::from(format!("ceph:{GROUPS_OBJECT}")),
            source: io_error(e),
        };
        let mut groups = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = match self.cluster.omap(GROUPS_OBJECT, after.as_deref(), 1024) {
                Ok(page) => page,
                Err(CephError::NotFound { .. }) => break,
                Err(e) => return Err(failed(e)),
            };
            after = page.entries.last().map(|(k, _)| k.clone());
            for (key, _) in page.entries {
                let names = key.split_once('+').and_then(|(h, g)| {
                    Some((Name::new(h.to_owned()).ok()?, Name::new(g.to_owned()).ok()?))
                });
                // A key no release writes is not a group of ours.
                if let Some((host, group)) = names {
                    if self.exists(&host, &group) {
                        groups.push((host, group));
                    }
                }
            }
            if !page.more || after.is_none() {
                break;
            }
        }
        Ok(groups)
    }

    fn owner_of(&self, host: &Name, group: &Name) -> Result<Option<super::GroupOwner>, StoreError> {
        let state = format!("{}state", prefix(host, group));
        let xattrs = self
            .cluster
            .xattrs(&state)
            .map_err(|e| self.err(host, group, "reading the owner of", e))?;
        let text = |name: &str| {
            xattrs
                .get(name)
                .and_then(|v| String::from_utf8(v.clone()).ok())
                .filter(|v| !v.is_empty())
        };
        let held = !self
            .cluster
            .lockers(&state, crate::lease::LOCK_NAME)
            .map_err(|e| self.err(host, group, "reading the lease of", e))?
            .is_empty();
        Ok(Some(super::GroupOwner {
            owner: text(XATTR_OWNER),
            held,
            since_ns: text(XATTR_OWNER_SINCE).and_then(|v| v.parse().ok()),
        }))
    }

    fn remove(&self, host: &Name, group: &Name) -> Result<(), StoreError> {
        self.remove_group(host, group)
    }
}

/// The pin object of a group (`G+tf.pin`), for a reader outside the
/// receiver (a test failover from any node).
struct CephPin<C: Cluster> {
    cluster: Arc<C>,
    oid: String,
    describe: String,
}

impl<C: Cluster> fmt::Debug for CephPin<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CephPin").field("oid", &self.oid).finish()
    }
}

impl<C: Cluster + 'static> crate::pin::StorePin for CephPin<C> {
    fn set(&self, seq: Option<Seq>) -> Result<(), StoreError> {
        set_pin(self.cluster.as_ref(), &self.oid, seq).map_err(|e| StoreError::Io {
            context: "writing the pin of",
            path: PathBuf::from(&self.describe),
            source: io_error(e),
        })
    }
}

/// Writes (`Some`) or removes the pin object `oid`, whole in one operation.
fn set_pin<C: Cluster>(cluster: &C, oid: &str, seq: Option<Seq>) -> Result<(), CephError> {
    let op = match seq {
        Some(seq) => WriteOp::new().write_full(seq.get().to_string().as_bytes()),
        None => WriteOp::new().remove(),
    };
    match cluster.operate(oid, &op) {
        Err(CephError::NotFound { .. }) if seq.is_none() => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_ceph::SimWorld;

    fn names() -> (Name, Name) {
        (Name::from_static("h1"), Name::from_static("g"))
    }

    /// The first open creates the state object with every guarded
    /// attribute and lists the group; each open advances the epoch.
    #[test]
    fn the_first_open_creates_the_state_object_and_each_open_takes_an_epoch() {
        let world = SimWorld::new();
        let engine = CephEngine::new(world.client("ns"), "node-a");
        let (host, group) = names();
        assert!(!engine.exists(&host, &group));
        drop(engine.open_group(&host, &group).unwrap());
        let cluster = world.client("ns");
        let xattrs = cluster.xattrs("h1+g+state").unwrap();
        assert_eq!(xattrs[XATTR_FORMAT], b"tidemark-ceph 1");
        assert_eq!(xattrs[XATTR_EPOCH], hex(1).as_bytes());
        assert_eq!(xattrs[XATTR_COMMIT], hex(1).as_bytes(), "the empty state");
        assert_eq!(xattrs[XATTR_OWNER], b"node-a");
        let groups = cluster.omap(GROUPS_OBJECT, None, 10).unwrap();
        assert_eq!(groups.entries, [("h1+g".to_string(), Vec::new())]);
        assert!(engine.exists(&host, &group));

        drop(engine.open_group(&host, &group).unwrap());
        let xattrs = cluster.xattrs("h1+g+state").unwrap();
        assert_eq!(xattrs[XATTR_EPOCH], hex(2).as_bytes());
        assert_eq!(xattrs[XATTR_COMMIT], hex(1).as_bytes());
    }

    /// A failover to RBD clones the base image once per disk and writes
    /// the point's journal pieces into the clone: the clone reads as the
    /// point (not as the head), the base image is unchanged, and a second
    /// failover of the same name is refused.
    #[test]
    fn a_failover_to_rbd_clones_the_base_image_and_writes_the_point_into_it() {
        use tidemark_changelog::{DiskId, Entry, Record};
        const SIZE: u64 = 1 << 20;
        let world = SimWorld::new();
        let engine = CephEngine::new(world.client("ns"), "node-a");
        let (host, group) = names();
        let mut g = engine.open_group(&host, &group).unwrap();
        g.ensure_disks(&[super::super::Disk {
            id: DiskId(0),
            name: Name::from_static("data"),
            size: SIZE,
        }])
        .unwrap();
        let base: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        g.apply_chunk(
            DiskId(0),
            0,
            super::super::ChunkRef::Data(&base),
            super::super::Purpose::InitialSync,
        )
        .unwrap();
        let mut seq = 0u64;
        let mut apply = |g: &mut CephGroup<_>, entry: Entry<'_>| {
            seq += 1;
            g.apply_record(&Record::decode(&entry.encode(seq, 1)).unwrap())
                .unwrap();
        };
        apply(&mut g, Entry::barrier(0));
        g.commit().unwrap();
        apply(&mut g, Entry::write(0, 4096, &[7u8; 10_000], 0));
        apply(&mut g, Entry::trim(0, 300_000, 70_000, 0));
        apply(&mut g, Entry::barrier(1));
        g.commit().unwrap();
        let point = Seq(4);
        apply(&mut g, Entry::write(0, 8192, &[9u8; 4096], 0));
        apply(&mut g, Entry::barrier(2));
        g.commit().unwrap();

        let mut want = vec![0u8; SIZE as usize];
        g.view(Some(point))
            .unwrap()
            .read(DiskId(0), 0, &mut want)
            .unwrap();
        assert_eq!(
            &want[8192..8200],
            &[7u8; 8],
            "the point is before the last write"
        );
        assert!(want[300_000..370_000].iter().all(|b| *b == 0));

        let clones = engine
            .failover_to_rbd(&host, &group, &g, point, "fo", "tidemark-failover-4")
            .unwrap();
        assert_eq!(clones.len(), 1);
        assert_eq!(clones[0].1, "fo-data");
        let cluster = world.client("ns");
        let mut got = vec![0u8; SIZE as usize];
        cluster
            .image_open_read_only("fo-data")
            .unwrap()
            .read(0, &mut got)
            .unwrap();
        assert!(got == want, "the clone reads as the point");
        cluster
            .image_open_read_only("h1+g+disk-0")
            .unwrap()
            .read(0, &mut got)
            .unwrap();
        assert!(got == base, "the base image is untouched");
        assert!(engine
            .failover_to_rbd(&host, &group, &g, point, "fo", "tidemark-failover-4b")
            .is_err());
    }

    /// The engine's store pin is the group's pin object, which the group
    /// reads as its pin.
    #[test]
    fn the_store_pin_is_the_pin_object_the_group_reads() {
        let world = SimWorld::new();
        let engine = CephEngine::new(world.client("ns"), "node-a");
        let (host, group) = names();
        drop(engine.open_group(&host, &group).unwrap());
        let pin = engine.store_pin(&host, &group).unwrap();
        pin.set(Some(Seq(9))).unwrap();
        assert_eq!(
            world.client("ns").read("h1+g+tf.pin", 0, 100).unwrap(),
            b"9"
        );
        assert_eq!(
            engine.open_group(&host, &group).unwrap().pinned(),
            Some(Seq(9))
        );
        pin.set(None).unwrap();
        pin.set(None).unwrap();
        assert_eq!(engine.open_group(&host, &group).unwrap().pinned(), None);
    }

    /// A group of a newer format, or of none, is refused before anything
    /// of it changes; a missing group does not open read-only.
    #[test]
    fn a_group_of_another_format_is_refused() {
        let world = SimWorld::new();
        let engine = CephEngine::new(world.client("ns"), "node-a");
        let (host, group) = names();
        assert!(matches!(
            engine.open_group_read_only(&host, &group),
            Err(StoreError::Damaged { .. })
        ));
        drop(engine.open_group(&host, &group).unwrap());
        let cluster = world.client("ns");
        let set = |value: &[u8]| {
            cluster
                .operate("h1+g+state", &WriteOp::new().set_xattr(XATTR_FORMAT, value))
                .unwrap()
        };
        set(b"tidemark-ceph 2");
        assert!(matches!(
            engine.open_group(&host, &group),
            Err(StoreError::UnsupportedVersion { found: 2, .. })
        ));
        set(b"something else");
        assert!(matches!(
            engine.open_group(&host, &group),
            Err(StoreError::Damaged { .. })
        ));
        let xattrs = cluster.xattrs("h1+g+state").unwrap();
        assert_eq!(
            xattrs[XATTR_EPOCH],
            hex(1).as_bytes(),
            "the refused opens changed it"
        );
    }
}
