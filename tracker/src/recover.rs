//! `tidemark log recover`: the explicit way out when the tracker refuses a
//! damaged change log (see [`tidemark_changelog::log`]'s recovery rules).
//!
//! The log is cut at its first damage, wherever it lies: the damaged
//! segment is copied aside and every later one renamed aside
//! (`<name>.damaged`), never removed. A new generation then begins above
//! every sequence number a reader could have seen, and every disk of the
//! group is recorded resync-needed from its first to its last byte, made
//! durable by a barrier: the records that were cut may be on the replica or
//! not, so the replica is compared with the source block by block and only
//! what differs travels. The tracker must not be running.

use crate::state::{GroupState, StateDisk, StateError};
use std::path::Path;
use tidemark_changelog::segment::{read_segment_header, segment_indices, segment_name};
use tidemark_changelog::sources::SourcesError;
use tidemark_changelog::DiskId;
use tidemark_changelog::{
    now_ns, read_sources, AppendError, ChangeLog, Cut, Entry, FsDir, LogDir, LogOptions, OpenError,
    RecoveryPolicy, Seq,
};

/// Why the log could not be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The change log could not be opened even to cut it.
    #[error(transparent)]
    Log(#[from] OpenError),
    /// The tracker's state file could not be read or written.
    #[error(transparent)]
    State(#[from] StateError),
    /// The log's disks file could not be read.
    #[error(transparent)]
    Sources(#[from] SourcesError),
    /// The log directory holds no disks file: no tracker ever started on
    /// it, so the disks to resync are unknown.
    #[error(
        "{dir} holds no disks file: no tracker ever served this log, so there is nothing to resync"
    )]
    NoSources {
        /// The log directory.
        dir: String,
    },
    /// Writing the new generation failed.
    #[error("starting the new generation")]
    Append(#[source] AppendError),
}

/// What the recovery did.
#[derive(Debug, Clone)]
pub struct RecoverReport {
    /// Where the log was cut, and the files kept aside.
    pub cut: Option<Cut>,
    /// Records the shipper's cursor had passed that the log no longer
    /// holds.
    pub lost_acknowledged: u64,
    /// The new generation.
    pub generation: u32,
    /// Its first sequence number.
    pub first_seq: Seq,
    /// Disks recorded resync-needed in full: (id, size).
    pub resync_needed: Vec<(DiskId, u64)>,
}

/// Recovers the damaged change log in `log_dir` (see the module
/// documentation). `None`: nothing to recover, the log opens as it is.
pub fn recover_damaged_log(log_dir: &Path) -> Result<Option<RecoverReport>, RecoverError> {
    let dir = FsDir::existing(log_dir).map_err(|source| OpenError::Io {
        dir: log_dir.display().to_string(),
        context: "opening the log directory".into(),
        source,
    })?;
    let sources = read_sources(log_dir)?.ok_or_else(|| RecoverError::NoSources {
        dir: log_dir.display().to_string(),
    })?;
    let mut state = match GroupState::load(log_dir)? {
        Some(s) => s,
        None => {
            let mut state = GroupState::fresh(&[]);
            state.disks = sources
                .iter()
                .map(|d| StateDisk {
                    id: d.disk.id,
                    name: d.disk.name.to_string(),
                })
                .collect();
            state.next_disk_id = sources.last().map_or(0, |d| d.disk.id.get() + 1);
            state
        }
    };
    let opts = options_of(&dir)?;
    let last_seq = state.last_seq.filter(|_| !state.running);
    let now = now_ns();
    let (mut log, recovery) =
        ChangeLog::open(dir, opts, RecoveryPolicy::CutDamage { last_seq }, now)?;
    if recovery.cut.is_none() && recovery.lost_acknowledged == 0 {
        return Ok(None);
    }
    let generation = state.generation.max(recovery.generation) + 1;
    let first_seq = recovery.max_exposed_seq.next();
    log.begin_generation(generation, first_seq, now)
        .map_err(RecoverError::Append)?;
    let mut resync_needed = Vec::new();
    for disk in sources.iter().map(|s| &s.disk).filter(|d| d.size > 0) {
        log.append(&Entry::resync_needed(disk.id, 0, disk.size, now))
            .map_err(RecoverError::Append)?;
        resync_needed.push((disk.id, disk.size));
    }
    log.barrier(now).map_err(RecoverError::Append)?;
    state.generation = generation;
    if !state.running {
        state.last_seq = Some(log.durable_seq());
    }
    state.save(log_dir)?;
    Ok(Some(RecoverReport {
        cut: recovery.cut,
        lost_acknowledged: recovery.lost_acknowledged,
        generation,
        first_seq,
        resync_needed,
    }))
}

/// The log's sizes, as its segments say: the segment size of the first
/// header that verifies (the default if none does), and room for every
/// segment there is plus the new generation's.
fn options_of(dir: &FsDir) -> Result<LogOptions, OpenError> {
    let io_err = |source| OpenError::Io {
        dir: dir.describe(),
        context: "reading segment headers".into(),
        source,
    };
    let indices = segment_indices(dir).map_err(io_err)?;
    let mut segment_size = None;
    for &index in &indices {
        let Ok(file) = dir.open(&segment_name(index), false) else {
            continue;
        };
        if let Ok(h) = read_segment_header(&file).map_err(io_err)? {
            segment_size = Some(h.segment_size);
            break;
        }
    }
    let segment_size = segment_size.unwrap_or(LogOptions::default().segment_size);
    Ok(LogOptions {
        segment_size,
        size_limit: segment_size.saturating_mul(indices.len() as u64 + 2),
    })
}
