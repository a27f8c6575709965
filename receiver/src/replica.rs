//! The replica store as the protocol session sees it: [`StoreReplica`]
//! implements [`tidemark_wire::Replica`] over a [`ReplicaStore`] of any
//! engine, and maps store errors to what the shipper is told (retry or
//! stop).

use tidemark_changelog::{DiskId, RecordRef, Seq};
use tidemark_durable::FsDir;
use tidemark_wire::{
    ChunkData, ChunkPurpose, Disk, ErrorClass, ErrorCode, Position, Replica, ReplicaError,
    VmSpecRefused,
};

use crate::store::{ChunkRef, Purpose, ReplicaStore, StoreError};
use crate::vm_spec::VmSpecKeeper;

/// One group's store, with the session lease that fences old connections.
#[derive(Debug)]
pub struct StoreReplica {
    group: Box<dyn ReplicaStore>,
    lease: u64,
    poisoned: bool,
    /// The last store error said the store did not answer in time (one
    /// line): the daemon reports the group degraded.
    unanswered: Option<String>,
    /// Where the group's VM spec history is kept, if anywhere.
    vm_specs: Option<VmSpecKeeper<FsDir>>,
}

impl StoreReplica {
    /// Wraps an open group.
    pub fn new(group: Box<dyn ReplicaStore>) -> StoreReplica {
        StoreReplica {
            group,
            lease: 0,
            poisoned: false,
            unanswered: None,
            vm_specs: None,
        }
    }

    /// Keeps the group's VM specs in `group_dir` (beside the store's own
    /// files; see [`crate::vm_spec`]).
    pub fn with_vm_specs(mut self, group_dir: &std::path::Path) -> StoreReplica {
        self.vm_specs = Some(VmSpecKeeper::new(FsDir::at(group_dir)));
        self
    }

    /// The store.
    pub fn group(&self) -> &dyn ReplicaStore {
        self.group.as_ref()
    }

    /// Sets the store's span floor ([`ReplicaStore::set_floor`]); an I/O
    /// error poisons the store as any other.
    pub fn set_floor(&mut self, floor: Option<tidemark_changelog::Seq>) -> Result<(), StoreError> {
        let set = self.group.set_floor(floor);
        if matches!(set, Err(StoreError::Poisoned | StoreError::Io { .. })) {
            self.poisoned = true;
        }
        set
    }

    /// An I/O error poisoned the store: it must be dropped and reopened.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Why the last failed store operation failed, if the store did not
    /// answer in time (see [`crate::store_health`]); taken once.
    pub fn take_unanswered(&mut self) -> Option<String> {
        self.unanswered.take()
    }

    fn map(&mut self, e: StoreError) -> ReplicaError {
        let (class, code) = classify(&e);
        if crate::store_health::cluster_unanswered(&e) {
            self.unanswered = Some(crate::store_health::chain(&e));
        }
        if matches!(e, StoreError::Poisoned | StoreError::Io { .. }) {
            self.poisoned = true;
        }
        ReplicaError {
            class,
            code,
            message: e.to_string(),
        }
    }
}

/// What the shipper is told about a store error.
pub fn classify(e: &StoreError) -> (ErrorClass, ErrorCode) {
    use ErrorClass::{Permanent, Transient};
    match e {
        StoreError::SequenceGap { .. } => (Permanent, ErrorCode::SequenceGap),
        StoreError::UnknownDisk(_) | StoreError::DiskLeft { .. } => {
            (Permanent, ErrorCode::UnknownDisk)
        }
        StoreError::BadDisk { .. } | StoreError::AddWhileResyncing(_) => {
            (Permanent, ErrorCode::UnknownDisk)
        }
        StoreError::OutOfRange { .. }
        | StoreError::InvalidRecord { .. }
        | StoreError::UnexpectedChunk { .. }
        | StoreError::InvalidBlockSize
        | StoreError::NoSuchPoint(_) => (Permanent, ErrorCode::Protocol),
        StoreError::ChecksumMismatch { .. } => (Transient, ErrorCode::BadChecksum),
        StoreError::Damaged { .. }
        | StoreError::UnsupportedVersion { .. }
        | StoreError::Unsupported { .. }
        | StoreError::ClonesRemain { .. } => (Permanent, ErrorCode::Internal),
        StoreError::Locked(_)
        | StoreError::OwnedElsewhere { .. }
        | StoreError::LeaseLost { .. } => (Transient, ErrorCode::Busy),
        StoreError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => {
            (Transient, ErrorCode::NoSpace)
        }
        StoreError::Io { .. } | StoreError::Poisoned => (Transient, ErrorCode::Internal),
    }
}

fn position(p: crate::store::Position) -> Position {
    Position {
        durable_seq: p.durable_seq,
        generation: p.generation,
        disks: p.disks,
        resyncing: match &p.state {
            crate::store::GroupState::Resyncing { pending } => pending.clone(),
            _ => Vec::new(),
        },
    }
}

impl Replica for StoreReplica {
    fn position(&self) -> Position {
        position(self.group.position())
    }

    /// The hello's disks are the group's: a known disk it no longer lists
    /// leaves the group (see the store's "Disks that leave" for why its
    /// absence is enough), then new ones are added and grown ones grown.
    /// An empty list (no hello announces one) changes nothing.
    fn ensure_disks(&mut self, disks: &[Disk]) -> Result<(), ReplicaError> {
        if !disks.is_empty() {
            let gone: Vec<DiskId> = self
                .group
                .disks()
                .iter()
                .map(|d| d.id)
                .filter(|id| disks.iter().all(|d| d.id != *id))
                .collect();
            self.group.leave(&gone).map_err(|e| self.map(e))?;
        }
        self.group.ensure_disks(disks).map_err(|e| self.map(e))
    }

    fn apply_record(&mut self, record: RecordRef<'_>) -> Result<(), ReplicaError> {
        // The session hands over records of a verified batch (the trait's
        // contract): their checksums held against the bytes received.
        self.group
            .apply_verified_record(record)
            .map(|_| ())
            .map_err(|e| self.map(e))
    }

    fn apply_chunk(
        &mut self,
        disk: DiskId,
        offset: u64,
        purpose: ChunkPurpose,
        data: &ChunkData,
    ) -> Result<(), ReplicaError> {
        let chunk = match data {
            ChunkData::Data(d) => ChunkRef::Data(d),
            ChunkData::Zero(n) => ChunkRef::Zero(*n),
        };
        let purpose = match purpose {
            ChunkPurpose::InitialSync => Purpose::InitialSync,
            ChunkPurpose::Resync => Purpose::Resync,
        };
        self.group
            .apply_chunk(disk, offset, chunk, purpose)
            .map_err(|e| self.map(e))
    }

    fn digests(
        &mut self,
        disk: DiskId,
        offset: u64,
        length: u64,
        block_size: u32,
    ) -> Result<Vec<[u8; 32]>, ReplicaError> {
        self.group
            .digests(disk, offset, length, block_size)
            .map_err(|e| self.map(e))
    }

    fn resync_done(&mut self, disk: DiskId, offset: u64, length: u64) -> Result<(), ReplicaError> {
        self.group
            .resync_done(disk, offset, length)
            .map_err(|e| self.map(e))
    }

    fn commit(&mut self) -> Result<Position, ReplicaError> {
        self.group.commit().map(position).map_err(|e| self.map(e))
    }

    fn new_lease(&mut self) -> u64 {
        self.lease += 1;
        self.lease
    }

    fn current_lease(&self) -> u64 {
        self.lease
    }

    fn keep_vm_spec(&mut self, from_seq: Seq, text: &str) -> Result<Seq, VmSpecRefused> {
        let Some(keeper) = &self.vm_specs else {
            return Err(VmSpecRefused::Unsupported);
        };
        // Versions no point can have any more are dropped as this one is
        // added: the oldest point's own version stays.
        let oldest = self.group.points().first().map(|p| p.seq);
        keeper.keep(from_seq, text, oldest)
    }
}
