//! What the shipper is doing, for `tidemark shipper status` and scripts:
//! `shipper.status` in the log directory, JSON, replaced atomically (tmp
//! file, rename) whenever something worth showing changes, at most a few
//! times a second.

use std::io::Write;
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

impl State {
    /// The state's name, as in the status file and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::InitialSync => "initial-sync",
            State::Protected => "protected",
            State::Resyncing => "resyncing",
            State::Critical => "critical",
        }
    }
}

/// The class of the last failure, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorClass {
    /// Retried with backoff (network, receiver busy, disk full).
    Transient,
    /// Replication stopped; needs an admin.
    Permanent,
}

impl ErrorClass {
    /// `transient` or `permanent`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
        }
    }
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
    /// Resync blocks (of `sync-chunk-size`) compared since start.
    pub resync_blocks_compared: u64,
    /// Resync 4 KiB blocks that differed and were sent: a coarse block
    /// that differs is compared again in 4 KiB blocks.
    pub resync_blocks_sent: u64,
    /// Bytes of the resync blocks sent (before compression).
    #[serde(default)]
    pub resync_bytes_sent: u64,
    /// When this was written (Unix seconds).
    pub updated_unix: u64,
    /// Reconnect attempts since start (never reset, unlike `retries`).
    #[serde(default)]
    pub retries_total: u64,
    /// The class of the last failure since start; `None` if there was none.
    #[serde(default)]
    pub last_error_class: Option<ErrorClass>,
    /// Timestamp (ns since the Unix epoch) of the oldest record sent but
    /// not yet acknowledged durable; `None` when the receiver has all that
    /// was sent. Its age is the replication lag.
    #[serde(default)]
    pub oldest_unacked_ns: Option<u64>,
    /// The configured recovery point objective, in seconds.
    #[serde(default)]
    pub rpo_target_seconds: f64,
}

impl ShipperStatus {
    /// Records the shipper holds that the receiver has not made durable
    /// (newest in the log minus durable).
    pub fn pending_records(&self) -> u64 {
        self.log_seq.saturating_sub(self.durable_seq)
    }

    /// The replication lag at `now_ns`: the age of the oldest record not yet
    /// acknowledged, in seconds; 0 when caught up.
    pub fn lag_seconds(&self, now_ns: u64) -> f64 {
        self.oldest_unacked_ns
            .map_or(0.0, |t| now_ns.saturating_sub(t) as f64 / 1e9)
    }
}

/// Writes `status` into the log directory `dir`.
pub fn write_status(dir: &Path, status: &ShipperStatus) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    let tmp = dir.join(TMP);
    // The status names the disks and how far they replicate: private to
    // the log directory's owner, like the rest of it.
    tidemark_changelog::private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?
        .write_all(&text)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> ShipperStatus {
        ShipperStatus {
            host: "h".into(),
            group: "g".into(),
            state: State::Protected,
            reason: None,
            durable_seq: 10,
            sent_seq: 12,
            log_seq: 15,
            retries: 0,
            wire_bytes: 0,
            record_bytes: 0,
            disks: Vec::new(),
            resync_blocks_compared: 0,
            resync_blocks_sent: 0,
            resync_bytes_sent: 0,
            updated_unix: 0,
            retries_total: 0,
            last_error_class: None,
            oldest_unacked_ns: None,
            rpo_target_seconds: 300.0,
        }
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unacked_record() {
        let mut s = status();
        assert_eq!(s.lag_seconds(5_000_000_000), 0.0, "caught up");
        s.oldest_unacked_ns = Some(2_000_000_000);
        assert_eq!(s.lag_seconds(5_500_000_000), 3.5);
        // A record stamped later than now (clock step) is not negative lag.
        assert_eq!(s.lag_seconds(1_000_000_000), 0.0);
        assert_eq!(s.pending_records(), 5);
        s.durable_seq = 20;
        assert_eq!(s.pending_records(), 0);
    }

    #[test]
    fn a_status_file_of_an_older_shipper_still_reads() {
        let mut v = serde_json::to_value(status()).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("retries_total");
        o.remove("last_error_class");
        o.remove("oldest_unacked_ns");
        let s: ShipperStatus = serde_json::from_value(v).unwrap();
        assert_eq!(s.retries_total, 0);
        assert_eq!(s.last_error_class, None);
    }
}
