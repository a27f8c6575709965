//! What the shipper is doing, for `tidemark shipper status` and scripts:
//! `shipper.status` in the log directory, JSON, replaced atomically (tmp
//! file, rename) whenever something worth showing changes, at most a few
//! times a second. It is the only file the shipper keeps of its own: its
//! position in the log is the change log's cursor, and where the initial
//! sync and resyncs stand the receiver tells it at every connection.
//!
//! # Format
//!
//! One JSON object, the fields of [`ShipperStatus`]. `format` (absent in
//! the files of releases before it was written, which are format 1) names
//! the format: a field added with a default for when it is absent keeps
//! the format; a field that goes away or changes meaning takes the next
//! one. A reader reads every format up to its own, fills what an older one
//! lacks with the defaults, ignores fields it does not know, and refuses a
//! newer format, naming both.

use std::path::{Path, PathBuf};
use tidemark_changelog::Seq;
use tidemark_durable::{replace, Durability, FsDir};

use serde::{Deserialize, Serialize};
use tidemark_wire::ErrorClass;

const FILE: &str = "shipper.status";
const TMP: &str = "shipper.status.tmp";
/// The format this code writes (see the module documentation).
pub const STATUS_FORMAT: u32 = 1;

fn format_1() -> u32 {
    1
}

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
}

/// The status file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShipperStatus {
    /// The file's format ([`STATUS_FORMAT`] when written by this code).
    #[serde(default = "format_1")]
    pub format: u32,
    /// The host identity.
    pub host: String,
    /// The consistency group.
    pub group: String,
    /// The state.
    pub state: State,
    /// Why the state is critical, or the last transient error.
    pub reason: Option<String>,
    /// Highest sequence number the receiver has made durable.
    pub durable_seq: Seq,
    /// Highest sequence number sent.
    pub sent_seq: Seq,
    /// Highest sequence number seen in the log.
    pub log_seq: Seq,
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
    /// The protocol version spoken with the receiver on the current
    /// connection; `None` while not connected.
    #[serde(default)]
    pub protocol_version: Option<u16>,
    /// The receiver's release as it named it (protocol version 2 on);
    /// `None` while not connected or not named.
    #[serde(default)]
    pub receiver_software: Option<String>,
    /// Connections since start that ended because the receiver sent
    /// nothing for the peer timeout (`[shipper.liveness]`): killed,
    /// frozen or unreachable.
    #[serde(default)]
    pub peer_timeouts_total: u64,
    /// What became of the group's VM spec (`[shipper] vm-spec`) at the
    /// receiver in this process's last session that sent it: `kept from
    /// record N`, `refused: WHY` or why it was not sent. `None`: no spec
    /// configured, or not sent yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_spec: Option<String>,
}

impl ShipperStatus {
    /// Records the shipper holds that the receiver has not made durable
    /// (newest in the log minus durable).
    pub fn pending_records(&self) -> u64 {
        self.log_seq.since(self.durable_seq).unwrap_or(0)
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
    // The status names the disks and how far they replicate: private to
    // the log directory's owner, like the rest of it (replace creates it
    // 0600). It is rewritten every few hundred milliseconds and a restart
    // rewrites it, so a crash may lose the last one: no syncs.
    let fs_dir = FsDir::existing(dir)?;
    replace(&fs_dir, TMP, FILE, &text, Durability::Visible)?;
    Ok(())
}

/// Why a status file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusReadError {
    /// No status file: no shipper has run on this log directory.
    #[error("{}: no such file (is a shipper running on this log directory?)", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// It could not be read.
    #[error("{}: {source} (is a shipper running on this log directory?)", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Its content is not a status this release reads.
    #[error("{}: {problem}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: ParseProblem,
    },
}

/// What is wrong with a status file's content.
#[derive(Debug, thiserror::Error)]
pub enum ParseProblem {
    /// Not the JSON of a status.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// A newer shipper wrote it.
    #[error(
        "written in format {0} by a newer shipper; this tidemark reads formats up to \
         {STATUS_FORMAT}: upgrade it to the shipper's release"
    )]
    Newer(u32),
}

/// Reads the status the shipper last wrote into `dir`.
pub fn read_status(dir: &Path) -> Result<ShipperStatus, StatusReadError> {
    let path: PathBuf = dir.join(FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StatusReadError::Missing { path })
        }
        Err(source) => return Err(StatusReadError::Io { path, source }),
    };
    parse_status(&text).map_err(|problem| StatusReadError::Unreadable { path, problem })
}

/// Parses a status file's content, of any format up to [`STATUS_FORMAT`].
fn parse_status(text: &[u8]) -> Result<ShipperStatus, ParseProblem> {
    #[derive(Deserialize)]
    struct Format {
        #[serde(default = "format_1")]
        format: u32,
    }
    let Format { format } = serde_json::from_slice(text)?;
    if format > STATUS_FORMAT {
        return Err(ParseProblem::Newer(format));
    }
    Ok(serde_json::from_slice(text)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> ShipperStatus {
        ShipperStatus {
            format: STATUS_FORMAT,
            host: "h".into(),
            group: "g".into(),
            state: State::Protected,
            reason: None,
            durable_seq: Seq(10),
            sent_seq: Seq(12),
            log_seq: Seq(15),
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
            protocol_version: Some(2),
            receiver_software: Some("0.1.0".into()),
            peer_timeouts_total: 0,
            vm_spec: Some("kept from record 3".into()),
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
        s.durable_seq = Seq(20);
        assert_eq!(s.pending_records(), 0);
    }

    /// What a shipper of the release before `format` wrote (format 1).
    const PREVIOUS_RELEASE: &str = r#"{
  "host": "db1",
  "group": "default",
  "state": "protected",
  "reason": null,
  "durable_seq": 1225,
  "sent_seq": 1225,
  "log_seq": 1225,
  "retries": 0,
  "wire_bytes": 6295180,
  "record_bytes": 5001214,
  "disks": [
    {
      "name": "disk",
      "size": 67108864,
      "synced": 67108864,
      "data_bytes": 3145728,
      "rate_bytes_per_sec": 0,
      "eta_seconds": 0
    }
  ],
  "resync_blocks_compared": 0,
  "resync_blocks_sent": 0,
  "resync_bytes_sent": 0,
  "updated_unix": 1795000000,
  "retries_total": 0,
  "last_error_class": null,
  "oldest_unacked_ns": null,
  "rpo_target_seconds": 300.0
}"#;

    #[test]
    fn the_previous_release_s_status_reads_and_a_newer_format_is_refused() {
        let s = parse_status(PREVIOUS_RELEASE.as_bytes()).unwrap();
        assert_eq!((s.format, s.durable_seq), (1, Seq(1225)));
        assert_eq!((s.protocol_version, s.receiver_software), (None, None));
        // What this code writes reads back.
        let written = serde_json::to_vec(&status()).unwrap();
        assert_eq!(parse_status(&written).unwrap(), status());
        // A newer shipper's format is named, not misread.
        let mut v = serde_json::to_value(status()).unwrap();
        v["format"] = (STATUS_FORMAT + 1).into();
        let e = parse_status(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(matches!(e, ParseProblem::Newer(f) if f == STATUS_FORMAT + 1));
        let e = e.to_string();
        assert!(
            e.contains(&format!("format {}", STATUS_FORMAT + 1)) && e.contains("up to 1"),
            "{e}"
        );
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
