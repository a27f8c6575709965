//! What the shipper is doing, for `tidemark shipper status` and scripts:
//! `shipper.status` in the log directory, JSON, replaced atomically (tmp
//! file, rename) whenever something worth showing changes, at most a few
//! times a second.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const FILE: &str = "shipper.status";
const TMP: &str = "shipper.status.tmp";

/// The replication state of the group, as DESIGN.md names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Not connected yet, or reconnecting after a transient failure.
    Connecting,
    /// Copying the disks while shipping the log.
    InitialSync,
    /// Shipping the log; the replica follows.
    Protected,
    /// Comparing and sending blocks after bitmap mode or an unclean stop.
    Resyncing,
    /// Stopped on a permanent failure; needs an admin (see `reason`).
    Critical,
}

/// Initial sync progress of one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskProgress {
    /// The disk's name.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// Bytes the receiver has durably synced (from the start of the disk).
    pub synced: u64,
    /// Bytes sent as data (the rest were zero or unallocated).
    pub data_bytes: u64,
    /// Initial sync rate since this connection began, bytes per second.
    pub rate_bytes_per_sec: u64,
    /// Seconds until the initial sync completes at that rate.
    pub eta_seconds: Option<u64>,
    /// Where this connection's sync began, and when (for the rate).
    #[serde(skip)]
    pub started: Option<(u64, std::time::Instant)>,
}

impl DiskProgress {
    /// Records that the receiver has the disk synced up to `synced`.
    pub fn advance(&mut self, synced: u64) {
        self.synced = synced;
        let now = std::time::Instant::now();
        let (from, since) = *self.started.get_or_insert((synced, now));
        let secs = now.duration_since(since).as_secs_f64();
        if secs > 0.5 && synced > from {
            let rate = (synced - from) as f64 / secs;
            self.rate_bytes_per_sec = rate as u64;
            self.eta_seconds = Some((self.size.saturating_sub(synced) as f64 / rate).ceil() as u64);
        }
        if synced >= self.size {
            self.eta_seconds = Some(0);
        }
    }
}

/// The status file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipperStatus {
    /// The host identity.
    pub host: String,
    /// The consistency group.
    pub group: String,
    /// The state.
    pub state: State,
    /// Why the state is critical, or the last transient error.
    pub reason: Option<String>,
    /// Highest sequence number the receiver has made durable.
    pub durable_seq: u64,
    /// Highest sequence number sent.
    pub sent_seq: u64,
    /// Highest sequence number seen in the log.
    pub log_seq: u64,
    /// Reconnect attempts since the last successful connection.
    pub retries: u32,
    /// Bytes sent on the wire since start (after compression).
    pub wire_bytes: u64,
    /// Record bytes shipped since start (before compression).
    pub record_bytes: u64,
    /// Per-disk initial sync progress.
    pub disks: Vec<DiskProgress>,
    /// Resync blocks compared and sent since start.
    pub resync_blocks_compared: u64,
    /// Resync blocks that differed and were sent.
    pub resync_blocks_sent: u64,
    /// When this was written (Unix seconds).
    pub updated_unix: u64,
}

/// Writes `status` into the log directory `dir`.
pub fn write_status(dir: &Path, status: &ShipperStatus) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    let tmp = dir.join(TMP);
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(FILE))
}

/// Reads the status the shipper last wrote into `dir`.
pub fn read_status(dir: &Path) -> Result<ShipperStatus, String> {
    let path: PathBuf = dir.join(FILE);
    let text = std::fs::read(&path).map_err(|e| {
        format!(
            "{}: {e} (is a shipper running on this log directory?)",
            path.display()
        )
    })?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}
