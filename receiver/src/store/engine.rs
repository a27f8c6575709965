//! The replica store as the receiver and the tools see it: the
//! [`ReplicaStore`] trait over a group's store, [`PointReader`] over its
//! disks as of one point, and [`StoreEngine`], where the groups' stores
//! live. The receiver's daemon, its wire adapter
//! ([`StoreReplica`](crate::replica::StoreReplica)) and the commands that
//! read points and export them talk to these traits only; the local store
//! ([`ReplicaGroup`] on a directory, engine [`LocalEngine`]) is one engine.
//!
//! The traits are shaped so that an engine on a distributed block store
//! (RBD images and snapshots, say) maps onto them without a translation
//! layer:
//!
//! - a disk ([`Disk`]) is one block image of the disk's size;
//! - a recovery point ([`RecoveryPoint`]) is a snapshot of every image of
//!   the group taken at the barrier or marker: [`ReplicaStore::points`]
//!   lists them, [`ReplicaStore::reader`] reads the images as of one
//!   (`None`: the heads);
//! - a batch of records and chunks is applied to the heads, and
//!   [`ReplicaStore::commit`] makes it durable together with the position
//!   the shipper resumes from (an engine keeps that position where it
//!   commits the data, so neither can survive without the other);
//! - retention ([`Retention`], [`ReplicaStore::apply_retention`]) removes
//!   the oldest snapshots, never one that is pinned
//!   ([`ReplicaStore::pinned`]: a protected snapshot), nor one at or
//!   after a span's floor ([`ReplicaStore::set_floor`]), nor the newest;
//! - resync extents are part of the position
//!   ([`GroupState::Resyncing`](super::GroupState)) and are compared by
//!   digests of the heads ([`ReplicaStore::digests`]).

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tidemark_changelog::{DiskId, Record, RecordRef, Seq};
use tidemark_durable::LogDir;
use tidemark_names::Name;

use super::{
    Applied, ChunkRef, Disk, FoldReport, Position, Purpose, RecoveryPoint, ReplicaGroup, Retention,
    SharedView, StoreError, View,
};

/// One consistency group's replica store, whatever engine keeps it. Every
/// method has the meaning the local store documents on its method of the
/// same name ([`ReplicaGroup`]); the apply rules and the durability rule
/// are the same for every engine (see the [store module](super)).
pub trait ReplicaStore: Send + Sync + Debug {
    /// The position as of the last commit: what the shipper resumes from.
    fn position(&self) -> Position;
    /// Makes sure the group has these disks (new ones start empty,
    /// durably); a known disk may change neither size nor name.
    fn ensure_disks(&mut self, disks: &[Disk]) -> Result<(), StoreError>;
    /// Disks `gone` leave the group: the points after here do not hold
    /// them, the older ones do until retention drops them, and their
    /// images go with the last such point.
    fn leave(&mut self, gone: &[DiskId]) -> Result<(), StoreError>;
    /// Applies the next record of the log, or ignores a duplicate.
    fn apply_record(&mut self, rec: &Record) -> Result<Applied, StoreError>;
    /// [`apply_record`](Self::apply_record) for a record whose checksum
    /// was verified against the bytes received (a `tidemark_wire`
    /// record batch verifies every record it holds): an engine need not
    /// read the payload again for it. The payload is borrowed (from the
    /// bytes received).
    fn apply_verified_record(&mut self, rec: RecordRef<'_>) -> Result<Applied, StoreError> {
        self.apply_record(&rec.to_record())
    }
    /// Applies an initial-sync or resync chunk.
    fn apply_chunk(
        &mut self,
        disk: DiskId,
        offset: u64,
        data: ChunkRef<'_>,
        purpose: Purpose,
    ) -> Result<(), StoreError>;
    /// BLAKE3 of each `block_size` block of an extent as the disk reads
    /// now (uncommitted changes included).
    fn digests(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
        block_size: u32,
    ) -> Result<Vec<[u8; 32]>, StoreError>;
    /// Marks an extent as resynced.
    fn resync_done(&mut self, disk: DiskId, offset: u64, length: u64) -> Result<(), StoreError>;
    /// Makes everything applied so far durable, with its position.
    fn commit(&mut self) -> Result<Position, StoreError>;
    /// Makes a new, empty group hold these disks from existing images
    /// (failback) and waits for a resync of every byte of them.
    fn adopt(&mut self, disks: &[(Disk, PathBuf)]) -> Result<(), StoreError>;

    /// The group's disks as last committed, by id.
    fn disks(&self) -> Vec<Disk>;
    /// The group's disks as the recovery point `seq` reads them, by id (a
    /// disk that grew after it at its size before). An engine that keeps
    /// no disk changes reads every point at the disks' present sizes.
    fn disks_at(&self, seq: Seq) -> Vec<Disk> {
        let _ = seq;
        self.disks()
    }
    /// The recovery points, oldest first.
    fn points(&self) -> Vec<RecoveryPoint>;
    /// The committed recovery point at `seq`, if there is one (a span's
    /// coordinator asks whether a member's marker is durable).
    fn point_at(&self, seq: Seq) -> Option<RecoveryPoint> {
        self.points().into_iter().find(|p| p.seq == seq)
    }
    /// The disks as of the recovery point `seq`, or (`None`) as of
    /// everything applied.
    fn reader(&self, seq: Option<Seq>) -> Result<Box<dyn PointReader + '_>, StoreError>;
    /// The disks as of the recovery point `seq`, for a server that reads
    /// them from many threads while it holds a share of the store.
    fn shared_reader(self: Arc<Self>, seq: Seq) -> Result<Arc<dyn PointReader>, StoreError>;
    /// The last barrier as of the last commit: (seq, timestamp in ns).
    fn last_barrier(&self) -> Option<(Seq, u64)>;
    /// Bytes the history behind the recovery points takes.
    fn history_bytes(&self) -> u64;

    /// Sets the retention of recovery points (applied at each commit).
    fn set_retention(&mut self, retention: Retention);
    /// Drops the points retention no longer keeps.
    fn apply_retention(
        &mut self,
        now_ns: u64,
        force: bool,
    ) -> Result<Option<FoldReport>, StoreError>;
    /// The point a reader has pinned (a test failover, a planned
    /// failover's final barrier): retention drops neither it nor any later
    /// point while the pin lasts.
    fn pinned(&self) -> Option<Seq>;
    /// Sets the span floor: retention drops neither the point at `floor`
    /// nor any later one, by any rule (max-space included), until it is
    /// moved or removed (`None`); kept durably by the engine.
    fn set_floor(&mut self, floor: Option<Seq>) -> Result<(), StoreError>;
    /// The span floor.
    fn floor(&self) -> Option<Seq>;
    /// Whether the span floor keeps the history over max-space.
    fn floor_holds_space(&self) -> bool;
}

/// The disks of a group as of one point.
pub trait PointReader: Send + Sync {
    /// Reads `buf.len()` bytes at `offset` of `disk`.
    fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError>;
    /// Whether `offset..offset+len` of `disk` surely reads as zeroes
    /// without reading it; `false` means unknown.
    fn is_zero(&self, disk: DiskId, offset: u64, len: u64) -> bool;
}

/// Who applies a group, for an engine whose groups are shared between
/// receivers (`tidemark status`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GroupOwner {
    /// The receiver that opened the group last (its advertised address).
    pub owner: Option<String>,
    /// Whether its lease is held now (a receiver renews it); not held: the
    /// owner stopped or died, and the next receiver a shipper reaches
    /// takes the group.
    pub held: bool,
    /// When the owner opened the group (ns since the Unix epoch), if
    /// recorded.
    pub since_ns: Option<u64>,
}
/// Why a span's lease could not be taken: held by another live receiver
/// (with its advertised address), lost on the way, or its record could not
/// be opened.
pub type SpanTakeoverError = crate::lease_task::TakeoverError<crate::span::SpanRecordError>;

/// Where the replica stores of the groups live.
pub trait StoreEngine: Send + Sync + Debug {
    /// Opens the store of `host`'s `group` for writing by this process
    /// alone, creating it on first use and recovering it after a crash.
    fn open(&self, host: &Name, group: &Name) -> Result<Box<dyn ReplicaStore>, StoreError>;
    /// Opens an existing store to read its points while a receiver may
    /// write it; every change fails.
    fn open_read_only(
        &self,
        host: &Name,
        group: &Name,
    ) -> Result<Arc<dyn ReplicaStore>, StoreError>;
    /// Whether a store of `host`'s `group` exists.
    fn exists(&self, host: &Name, group: &Name) -> bool;
    /// Whether the store of `host`'s `group` answers now (one cheap read).
    /// A group whose store stopped answering is not dropped and reopened
    /// until it does: closing a store while it cannot be told (a Ceph
    /// image's exclusive lock and watch) leaves state behind that blocks
    /// the reopen. Default: a local store always answers.
    fn answers(&self, host: &Name, group: &Name) -> Result<(), StoreError> {
        let _ = (host, group);
        Ok(())
    }
    /// Where the store of `host`'s `group` is, for messages.
    fn describe(&self, host: &Name, group: &Name) -> String;
    /// The counters of the group leases, for an engine whose groups are
    /// shared between receivers (`None`: no leases).
    fn lease_stats(&self) -> Option<crate::lease_task::LeaseStats> {
        None
    }
    /// Lets `host`'s `group` go after its store was dropped: with leases,
    /// unlocked, so that another receiver may take it at once. Default:
    /// nothing to let go.
    fn release(&self, host: &Name, group: &Name) {
        let _ = (host, group);
    }
    /// Lets every group go ([`release`](Self::release)): a receiver
    /// stopping cleanly, after dropping its stores.
    fn release_all(&self) {}
    /// With a store shared between receivers, takes the lease of `span`
    /// and opens its record under it (`store::ceph::span`): `None` when
    /// the engine keeps no span records (they are in the data directory,
    /// `crate::span::SpanDir`, and the span is coordinated by the one
    /// receiver that has it in its configuration).
    fn take_span(
        &self,
        span: &Name,
    ) -> Option<Result<Box<dyn crate::span::SpanStore>, SpanTakeoverError>> {
        let _ = span;
        None
    }
    /// Lets the lease of `span` go (see [`StoreEngine::take_span`]).
    fn release_span(&self, span: &Name) {
        let _ = span;
    }
    /// The record of `span` as the store keeps it, for readers on any node
    /// (`None`: the engine keeps no span records).
    fn read_span(
        &self,
        span: &Name,
    ) -> Option<Result<crate::span::SpanRecord, crate::span::SpanRecordError>> {
        let _ = span;
        None
    }
    /// The advertised address of the receiver that holds (or last held)
    /// the lease of `span` (`None`: none, or the engine has no span
    /// leases).
    fn span_holder(&self, span: &Name) -> Option<String> {
        let _ = span;
        None
    }
    /// The pin of `host`'s `group` kept with the store, when the store
    /// does not read the local pin ([`crate::pin`]) of the group's
    /// directory in the data directory. Default: none (the local pin is
    /// the store's).
    fn store_pin(&self, host: &Name, group: &Name) -> Option<Box<dyn crate::pin::StorePin>> {
        let _ = (host, group);
        None
    }
    /// Where the drain request of a planned failover of `host`'s `group`
    /// and its answer are kept, when the store keeps them
    /// ([`crate::drain`]): with a store shared between receivers, where
    /// the CLI of any node and the receiver applying the group both reach
    /// them. Default: none (the files in the group's directory).
    fn drain_channel(
        &self,
        host: &Name,
        group: &Name,
    ) -> Option<Box<dyn crate::drain::DrainChannel>> {
        let _ = (host, group);
        None
    }
    /// The groups of `host` that have a store.
    fn groups(&self, host: &Name) -> Result<Vec<Name>, StoreError>;
    /// Every group of every host that has a store, for an engine that
    /// keeps a registry of them. Default: refused ([`StoreError::Unsupported`]).
    fn all_groups(&self) -> Result<Vec<(Name, Name)>, StoreError> {
        Err(StoreError::Unsupported {
            engine: "local",
            what: "list every group (list the data directory)",
        })
    }
    /// Who applies `host`'s `group`, for an engine whose groups are shared
    /// between receivers. Default: `None` (one receiver owns its store).
    fn owner_of(&self, host: &Name, group: &Name) -> Result<Option<GroupOwner>, StoreError> {
        let _ = (host, group);
        Ok(None)
    }
    /// Removes the store of `host`'s `group` with all its points and
    /// history, durably; refused ([`StoreError::Locked`]) while a process
    /// has it open.
    fn remove(&self, host: &Name, group: &Name) -> Result<(), StoreError>;
}

/// The local engine: each group's store is a [`ReplicaGroup`] in its own
/// directory, `data-dir/<host>/<group>/`.
#[derive(Debug, Clone)]
pub struct LocalEngine {
    data_dir: PathBuf,
}

impl LocalEngine {
    /// The engine of the receiver whose data directory is `data_dir`.
    pub fn new(data_dir: &Path) -> LocalEngine {
        LocalEngine {
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// The directory of a host's group: names are single path components
    /// by their rule, so the directory is always inside the data
    /// directory.
    pub fn group_dir(&self, host: &Name, group: &Name) -> PathBuf {
        self.data_dir.join(host).join(group)
    }

    /// Opens the store in the group directory `dir` read-only, for tools
    /// that find groups by listing the data directory.
    pub fn open_dir_read_only(dir: &Path) -> Result<Arc<dyn ReplicaStore>, StoreError> {
        Ok(Arc::new(ReplicaGroup::open_read_only(dir)?))
    }
}

impl StoreEngine for LocalEngine {
    fn open(&self, host: &Name, group: &Name) -> Result<Box<dyn ReplicaStore>, StoreError> {
        Ok(Box::new(ReplicaGroup::open(&self.group_dir(host, group))?))
    }

    fn open_read_only(
        &self,
        host: &Name,
        group: &Name,
    ) -> Result<Arc<dyn ReplicaStore>, StoreError> {
        LocalEngine::open_dir_read_only(&self.group_dir(host, group))
    }

    fn exists(&self, host: &Name, group: &Name) -> bool {
        self.group_dir(host, group).join(super::STATE_FILE).exists()
    }

    fn describe(&self, host: &Name, group: &Name) -> String {
        self.group_dir(host, group).display().to_string()
    }

    fn groups(&self, host: &Name) -> Result<Vec<Name>, StoreError> {
        let dir = self.data_dir.join(host);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StoreError::Io {
                    context: "listing",
                    path: dir,
                    source,
                })
            }
        };
        let mut groups: Vec<Name> = entries
            .flatten()
            .filter_map(|e| Name::new(e.file_name().to_string_lossy().into_owned()).ok())
            .filter(|g| self.exists(host, g))
            .collect();
        groups.sort();
        Ok(groups)
    }

    fn remove(&self, host: &Name, group: &Name) -> Result<(), StoreError> {
        let dir = self.group_dir(host, group);
        let io = |context: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io {
                context,
                path,
                source,
            }
        };
        {
            // Held while the directory goes: no receiver opens it meanwhile.
            let _lock = tidemark_changelog::DirLock::acquire(&dir, super::LOCK_FILE, "process")
                .map_err(|e| match e {
                    tidemark_changelog::LockError::Held { .. } => StoreError::Locked(dir.clone()),
                    tidemark_changelog::LockError::Io { path, source } => {
                        io("locking", &path)(source)
                    }
                })?;
            std::fs::remove_dir_all(&dir).map_err(io("removing", &dir))?;
        }
        let host_dir = self.data_dir.join(host);
        // The host's directory goes with its last group.
        if std::fs::read_dir(&host_dir).is_ok_and(|mut d| d.next().is_none()) {
            std::fs::remove_dir(&host_dir).map_err(io("removing", &host_dir))?;
        }
        for d in [&host_dir, &self.data_dir] {
            if let Ok(f) = std::fs::File::open(d) {
                f.sync_all().map_err(io("syncing", d))?;
            }
        }
        Ok(())
    }
}

impl<D: LogDir + Debug + 'static> ReplicaStore for ReplicaGroup<D>
where
    D::File: Debug,
{
    fn position(&self) -> Position {
        ReplicaGroup::position(self)
    }

    fn ensure_disks(&mut self, disks: &[Disk]) -> Result<(), StoreError> {
        ReplicaGroup::ensure_disks(self, disks)
    }

    fn leave(&mut self, gone: &[DiskId]) -> Result<(), StoreError> {
        ReplicaGroup::leave(self, gone)
    }

    fn apply_record(&mut self, rec: &Record) -> Result<Applied, StoreError> {
        ReplicaGroup::apply_record(self, rec)
    }

    fn apply_verified_record(&mut self, rec: RecordRef<'_>) -> Result<Applied, StoreError> {
        ReplicaGroup::apply_verified_record(self, rec)
    }

    fn apply_chunk(
        &mut self,
        disk: DiskId,
        offset: u64,
        data: ChunkRef<'_>,
        purpose: Purpose,
    ) -> Result<(), StoreError> {
        ReplicaGroup::apply_chunk(self, disk, offset, data, purpose)
    }

    fn digests(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
        block_size: u32,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        ReplicaGroup::digests(self, disk, offset, length, block_size)
    }

    fn resync_done(&mut self, disk: DiskId, offset: u64, length: u64) -> Result<(), StoreError> {
        ReplicaGroup::resync_done(self, disk, offset, length)
    }

    fn commit(&mut self) -> Result<Position, StoreError> {
        ReplicaGroup::commit(self)
    }

    fn adopt(&mut self, disks: &[(Disk, PathBuf)]) -> Result<(), StoreError> {
        ReplicaGroup::adopt(self, disks)
    }

    fn disks(&self) -> Vec<Disk> {
        ReplicaGroup::disks(self)
    }

    fn disks_at(&self, seq: Seq) -> Vec<Disk> {
        ReplicaGroup::disks_at(self, seq)
    }

    fn points(&self) -> Vec<RecoveryPoint> {
        ReplicaGroup::points(self)
    }

    fn point_at(&self, seq: Seq) -> Option<RecoveryPoint> {
        ReplicaGroup::point_at(self, seq)
    }

    fn reader(&self, seq: Option<Seq>) -> Result<Box<dyn PointReader + '_>, StoreError> {
        Ok(Box::new(self.view(seq)?))
    }

    fn shared_reader(self: Arc<Self>, seq: Seq) -> Result<Arc<dyn PointReader>, StoreError> {
        Ok(Arc::new(SharedView::new(self, seq)?))
    }

    fn last_barrier(&self) -> Option<(Seq, u64)> {
        ReplicaGroup::last_barrier(self)
    }

    fn history_bytes(&self) -> u64 {
        ReplicaGroup::history_bytes(self)
    }

    fn set_retention(&mut self, retention: Retention) {
        ReplicaGroup::set_retention(self, retention)
    }

    fn apply_retention(
        &mut self,
        now_ns: u64,
        force: bool,
    ) -> Result<Option<FoldReport>, StoreError> {
        ReplicaGroup::apply_retention(self, now_ns, force)
    }

    fn pinned(&self) -> Option<Seq> {
        ReplicaGroup::pinned(self)
    }

    fn set_floor(&mut self, floor: Option<Seq>) -> Result<(), StoreError> {
        ReplicaGroup::set_floor(self, floor)
    }

    fn floor(&self) -> Option<Seq> {
        ReplicaGroup::floor(self)
    }

    fn floor_holds_space(&self) -> bool {
        ReplicaGroup::floor_holds_space(self)
    }
}

impl<D: LogDir> PointReader for View<'_, D> {
    fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        View::read(self, disk, offset, buf)
    }

    fn is_zero(&self, disk: DiskId, offset: u64, len: u64) -> bool {
        View::is_zero(self, disk, offset, len)
    }
}

impl<D: LogDir> PointReader for SharedView<D> {
    fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        SharedView::read(self, disk, offset, buf)
    }

    fn is_zero(&self, disk: DiskId, offset: u64, len: u64) -> bool {
        SharedView::is_zero(self, disk, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::StoreReplica;
    use tidemark_changelog::{DiskId, Entry, Seq};
    use tidemark_durable::SimDir;
    use tidemark_wire::{ChunkData, ChunkPurpose, Disk, Replica};

    fn record(entry: &Entry<'_>, seq: impl Into<Seq>) -> Record {
        Record::decode(&entry.encode(seq, 1)).unwrap()
    }

    /// The wire adapter takes any store: here one on a simulated
    /// directory, the way another engine would plug in. What it applied
    /// reads back through the trait at the point it made.
    #[test]
    fn the_wire_adapter_replicates_into_any_store() {
        let store = ReplicaGroup::open_on(SimDir::new(), SimDir::new()).unwrap();
        let mut replica = StoreReplica::new(Box::new(store));
        replica
            .ensure_disks(&[Disk {
                id: DiskId(0),
                name: Name::from_static("data"),
                size: 8192,
            }])
            .unwrap();
        replica
            .apply_chunk(
                DiskId(0),
                0,
                ChunkPurpose::InitialSync,
                &ChunkData::Zero(8192),
            )
            .unwrap();
        replica
            .apply_record(record(&Entry::write(0, 100, &[9u8; 50], 0), 1).as_view())
            .unwrap();
        replica
            .apply_record(record(&Entry::barrier(7), 2).as_view())
            .unwrap();
        assert_eq!(replica.commit().unwrap().durable_seq, Seq(2));
        replica
            .apply_record(record(&Entry::write(0, 100, &[1u8; 50], 0), 3).as_view())
            .unwrap();
        replica.commit().unwrap();

        let store = replica.group();
        let points: Vec<u64> = store.points().iter().map(|p| p.seq.get()).collect();
        assert_eq!(points, [2]);
        let mut buf = vec![0u8; 200];
        store
            .reader(Some(Seq(2)))
            .unwrap()
            .read(DiskId(0), 0, &mut buf)
            .unwrap();
        assert!(buf[100..150].iter().all(|b| *b == 9) && buf[..100].iter().all(|b| *b == 0));
        store
            .reader(None)
            .unwrap()
            .read(DiskId(0), 0, &mut buf)
            .unwrap();
        assert!(buf[100..150].iter().all(|b| *b == 1));
        assert!(matches!(
            store.reader(Some(Seq(3))),
            Err(StoreError::NoSuchPoint(Seq(3)))
        ));
    }

    /// The local engine keeps each group in `data-dir/<host>/<group>`: one
    /// writer, any number of readers, and a shared reader outlives the
    /// handle it came from.
    #[test]
    fn the_local_engine_opens_groups_by_host_and_name() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = LocalEngine::new(tmp.path());
        let (host, group) = (Name::from_static("h1"), Name::from_static("g"));
        assert!(!engine.exists(&host, &group));
        assert!(matches!(
            engine.open_read_only(&host, &group),
            Err(StoreError::Damaged { .. })
        ));
        let mut store = engine.open(&host, &group).unwrap();
        assert!(engine.exists(&host, &group));
        assert_eq!(
            engine.describe(&host, &group),
            tmp.path().join("h1/g").display().to_string()
        );
        assert!(matches!(
            engine.open(&host, &group),
            Err(StoreError::Locked(_))
        ));
        store
            .ensure_disks(&[Disk {
                id: DiskId(0),
                name: Name::from_static("data"),
                size: 4096,
            }])
            .unwrap();
        store
            .apply_chunk(
                DiskId(0),
                0,
                ChunkRef::Data(&[5u8; 4096]),
                Purpose::InitialSync,
            )
            .unwrap();
        store.apply_record(&record(&Entry::barrier(1), 1)).unwrap();
        store.commit().unwrap();
        assert_eq!(
            store.points().len(),
            1,
            "the barrier ending the sync is a point"
        );

        let reader = engine
            .open_read_only(&host, &group)
            .unwrap()
            .shared_reader(Seq(1))
            .unwrap();
        let mut buf = [0u8; 16];
        reader.read(DiskId(0), 4000, &mut buf).unwrap();
        assert_eq!(buf, [5u8; 16]);
        assert!(store
            .as_mut()
            .apply_record(&record(&Entry::barrier(2), 2))
            .is_ok());
    }
}
