//! A span's record in the cluster, and the span's lease: with several
//! receivers on one Ceph store, a span (`crate::coordinate`) is
//! coordinated by the receiver that holds its lease, and its record
//! ([`crate::span`]) is one object written only under that lease.
//!
//! # The object
//!
//! ```text
//!  span+NAME            the record: the bytes the local store keeps in
//!                       spans/NAME/record (JSON, version 1, the format of
//!                       crate::span), replaced whole by one operation;
//!                       empty until the first save (a new span).
//!                       Extended attributes (numbers as 16 lower-case hex
//!                       digits, compared as strings by the guards):
//!                         format      "tidemark-span 1"
//!                         epoch       the holders' fencing epoch: each
//!                                     holder's open advances it
//!                         commit      each save advances it
//!                         owner       the holder's advertised address:
//!                                     where members' shippers are sent
//!                         owner-addr  the holder's cluster client address:
//!                                     the next holder blocklists it
//!                       The lock `tidemark` (the `lock` class, exclusive,
//!                       with an expiry) is the span's lease.
//! ```
//!
//! The name has two `+`-separated parts, a group's objects three
//! (`HOST+GROUP+…`), so no group's object is ever a span's.
//!
//! # The span's lease
//!
//! Taken through the group leases' keeper ([`LeaseKeeper::take_over`](crate::lease_task::LeaseKeeper::take_over)),
//! the same steps as a group's: lock, blocklist the previous holders (the
//! lock's and the recorded `owner-addr`), newest OSD map, open. The open
//! gives the object its attributes if the lock just created it, then one
//! operation asserting the lock with `epoch == E`, `commit == N` guards
//! advances `epoch` and records `owner` and `owner-addr`; then the record
//! is read. From here the previous holder can write nothing: its client is
//! blocklisted, its lock gone and its epoch stale.
//!
//! Rules that follow from it (enforced by the receiver's daemon):
//! - A span's coordinator runs only on the receiver holding its lease.
//! - A member's group is opened (its group lease taken) only by the holder
//!   of its span's lease: all members are applied where the coordinator
//!   runs, so it sees their links and their stores. A receiver that gets
//!   a member's session and does not hold the span takes the span's lease
//!   if it is free (a new span, or its holder died: the lease expired), or
//!   else redirects the shipper to the holder.
//! - The coordinator's epoch (its hold messages' fencing) is the record's
//!   `epoch` field plus one, saved before the first message: the record is
//!   read from the cluster after the previous holder was fenced, and every
//!   save asserts the lock and the guards, so two coordinators never run
//!   rounds of one span with the same epoch, and a coordinator that lost
//!   the lease cannot save (so cannot start) a round.
//!
//! # Save
//!
//! One operation: assert the lock, `epoch == mine`, `commit == N`; write
//! the record whole; `commit := N+1`. Refused (the lock, a guard, the
//! blocklist): fenced, the coordinator stops. Timed out or failed
//! otherwise: the outcome is unknown, so the store refuses every later
//! save (fenced as well); the next holder reads whichever record won.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tidemark_ceph::{CephError, Cluster, CmpOp, WriteOp};
use tidemark_names::Name;

use super::{hex, CephEngine, XATTR_COMMIT, XATTR_EPOCH, XATTR_OWNER, XATTR_OWNER_ADDR};
use crate::lease_task::{LeaseGate, TakeoverError};
use crate::span::{self, SpanRecord, SpanRecordError, SpanStore};

/// The format attribute of a span's object.
const SPAN_FORMAT: &str = "tidemark-span 1";
const XATTR_FORMAT: &str = "format";

/// A span's object.
pub fn span_object(span: &Name) -> String {
    format!("span+{span}")
}

/// A span's record in the cluster, written under the span's lease.
pub struct CephSpanStore<C: Cluster + 'static> {
    cluster: Arc<C>,
    oid: String,
    gate: Arc<LeaseGate>,
    epoch: u64,
    commit: AtomicU64,
    fenced: AtomicBool,
}

impl<C: Cluster + 'static> std::fmt::Debug for CephSpanStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CephSpanStore")
            .field("oid", &self.oid)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

fn cluster_error(what: &'static str, oid: &str) -> impl FnOnce(CephError) -> SpanRecordError {
    let object = oid.to_owned();
    move |source| match source {
        CephError::Blocklisted { .. } => SpanRecordError::Fenced { object },
        source => SpanRecordError::Cluster {
            what,
            object,
            source,
        },
    }
}

/// The object's record, read whole (missing or empty: a new span's).
fn read_record<C: Cluster>(cluster: &C, oid: &str) -> Result<SpanRecord, SpanRecordError> {
    let size = match cluster.stat(oid) {
        Ok(size) => size,
        Err(CephError::NotFound { .. }) => return Ok(SpanRecord::default()),
        Err(e) => return Err(cluster_error("reading", oid)(e)),
    };
    if size == 0 {
        return Ok(SpanRecord::default());
    }
    let bytes = cluster
        .read(oid, 0, size as usize)
        .map_err(cluster_error("reading", oid))?;
    span::decode(&bytes, &PathBuf::from(format!("ceph:{oid}")))
}

/// A counter attribute of the object, or why it is damaged.
fn number(
    xattrs: &std::collections::BTreeMap<String, Vec<u8>>,
    name: &str,
    oid: &str,
) -> Result<u64, SpanRecordError> {
    xattrs
        .get(name)
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| v.len() == 16)
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .ok_or_else(|| SpanRecordError::Damaged {
            path: PathBuf::from(format!("ceph:{oid}")),
            reason: format!("attribute {name} is missing or not 16 hex digits"),
        })
}

impl<C: Cluster + 'static> CephSpanStore<C> {
    /// The open under the lease `gate` (the lease taken, the previous
    /// holders fenced): the object's attributes if new, the epoch
    /// advanced, `owner` recorded.
    fn open(
        cluster: Arc<C>,
        oid: String,
        gate: Arc<LeaseGate>,
        owner: &str,
    ) -> Result<CephSpanStore<C>, SpanRecordError> {
        let locked = |op: WriteOp| {
            let mut guarded = WriteOp::new().assert_locked(gate.name(), gate.cookie());
            guarded.steps.extend(op.steps);
            guarded
        };
        let xattrs = cluster
            .xattrs(&oid)
            .map_err(cluster_error("reading", &oid))?;
        if !xattrs.contains_key(XATTR_FORMAT) {
            let size = cluster.stat(&oid).map_err(cluster_error("reading", &oid))?;
            if size != 0 {
                return Err(SpanRecordError::Damaged {
                    path: PathBuf::from(format!("ceph:{oid}")),
                    reason: "a record without its format attribute".into(),
                });
            }
            // The lock created it empty: its holder gives it its
            // attributes (nobody else can meanwhile).
            let initial = WriteOp::new()
                .set_xattr(XATTR_FORMAT, SPAN_FORMAT.as_bytes())
                .set_xattr(XATTR_EPOCH, hex(0).as_bytes())
                .set_xattr(XATTR_COMMIT, hex(0).as_bytes());
            cluster
                .operate(&oid, &locked(initial))
                .map_err(cluster_error("creating", &oid))?;
        }
        let xattrs = cluster
            .xattrs(&oid)
            .map_err(cluster_error("reading", &oid))?;
        let format = xattrs.get(XATTR_FORMAT).map(Vec::as_slice);
        if format != Some(SPAN_FORMAT.as_bytes()) {
            return Err(SpanRecordError::Damaged {
                path: PathBuf::from(format!("ceph:{oid}")),
                reason: format!(
                    "format {:?} is not {SPAN_FORMAT:?}",
                    String::from_utf8_lossy(format.unwrap_or_default())
                ),
            });
        }
        let epoch = number(&xattrs, XATTR_EPOCH, &oid)?;
        let commit = number(&xattrs, XATTR_COMMIT, &oid)?;
        let my_addr = cluster.my_addr().map_err(cluster_error(
            "asking the cluster for our address for",
            &oid,
        ))?;
        let bump = WriteOp::new()
            .cmp_xattr(XATTR_EPOCH, CmpOp::Eq, hex(epoch).as_bytes())
            .cmp_xattr(XATTR_COMMIT, CmpOp::Eq, hex(commit).as_bytes())
            .set_xattr(XATTR_EPOCH, hex(epoch + 1).as_bytes())
            .set_xattr(XATTR_OWNER, owner.as_bytes())
            .set_xattr(
                XATTR_OWNER_ADDR,
                crate::lease::client_addr(&my_addr).as_bytes(),
            );
        cluster.operate(&oid, &locked(bump)).map_err(|e| match e {
            CephError::Canceled { .. } | CephError::Busy { .. } => SpanRecordError::Fenced {
                object: oid.clone(),
            },
            e => cluster_error("taking the epoch of", &oid)(e),
        })?;
        let store = CephSpanStore {
            cluster,
            oid,
            gate,
            epoch: epoch + 1,
            commit: AtomicU64::new(commit),
            fenced: AtomicBool::new(false),
        };
        // Damage is found at the open, before the span is coordinated.
        store.load()?;
        Ok(store)
    }

    /// The holders' fencing epoch this store writes under.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl<C: Cluster + 'static> SpanStore for CephSpanStore<C> {
    fn load(&self) -> Result<SpanRecord, SpanRecordError> {
        read_record(self.cluster.as_ref(), &self.oid)
    }

    fn save(&self, record: &SpanRecord) -> Result<(), SpanRecordError> {
        let fenced = || SpanRecordError::Fenced {
            object: self.oid.clone(),
        };
        if self.fenced.load(Ordering::Relaxed) || self.gate.check(Instant::now()).is_err() {
            self.fenced.store(true, Ordering::Relaxed);
            return Err(fenced());
        }
        let commit = self.commit.load(Ordering::Relaxed);
        let op = WriteOp::new()
            .assert_locked(self.gate.name(), self.gate.cookie())
            .cmp_xattr(XATTR_EPOCH, CmpOp::Eq, hex(self.epoch).as_bytes())
            .cmp_xattr(XATTR_COMMIT, CmpOp::Eq, hex(commit).as_bytes())
            .write_full(&span::encode(record))
            .set_xattr(XATTR_COMMIT, hex(commit + 1).as_bytes());
        match self.cluster.operate(&self.oid, &op) {
            Ok(()) => {
                self.commit.store(commit + 1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // Refused (the lock, a guard, the blocklist) or unknown:
                // never written again by this store.
                self.fenced.store(true, Ordering::Relaxed);
                Err(match e {
                    CephError::Canceled { .. }
                    | CephError::Busy { .. }
                    | CephError::NotFound { .. }
                    | CephError::Blocklisted { .. } => fenced(),
                    e => cluster_error("writing", &self.oid)(e),
                })
            }
        }
    }

    fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed) || self.gate.check(Instant::now()).is_err()
    }

    fn describe(&self) -> String {
        format!("ceph:{}", self.oid)
    }
}

impl<C: Cluster + 'static> CephEngine<C> {
    /// Takes the lease of `span` (see the module) and opens its record
    /// under it; `Ok(None)` without leases (one receiver: the record is
    /// then kept in the data directory, as with the local store).
    pub fn take_span(
        &self,
        span: &Name,
    ) -> Result<Option<CephSpanStore<C>>, TakeoverError<SpanRecordError>> {
        let Some(keeper) = &self.lease else {
            return Ok(None);
        };
        let oid = span_object(span);
        keeper
            .take_over(&oid, |gate| {
                CephSpanStore::open(self.cluster.clone(), oid.clone(), gate.clone(), &self.owner)
            })
            .map(Some)
    }

    /// Lets the lease of `span` go (its store refuses every save from
    /// now).
    pub fn release_span(&self, span: &Name) {
        if let Some(keeper) = &self.lease {
            keeper.release(&span_object(span));
        }
    }

    /// The record of `span` as the cluster holds it, for readers on any
    /// node (a new span's if there is none).
    pub fn read_span(&self, span: &Name) -> Result<SpanRecord, SpanRecordError> {
        read_record(self.cluster.as_ref(), &span_object(span))
    }

    /// The advertised address of the receiver that holds (or last held)
    /// the lease of `span`, if any.
    pub fn span_owner(&self, span: &Name) -> Option<String> {
        self.cluster
            .xattrs(&span_object(span))
            .ok()
            .and_then(|x| x.get(XATTR_OWNER).cloned())
            .and_then(|v| String::from_utf8(v).ok())
            .filter(|v| !v.is_empty())
    }
}
