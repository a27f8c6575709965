//! What the shippers said of themselves: the newest status report of each
//! host's group (in memory; `tidemark_wire::status_report` says what one
//! holds) and its lag history (a [`crate::lag_ring`] per group in the
//! group's directory). The receiver's sessions fill it; the web console,
//! in the same process, reads it.
//!
//! A report comes on a unidirectional stream the shipper opens beside its
//! session (protocol version 7 on): [`read_reports`] reads one such stream.
//! Reports are never answered: a stream that breaks the protocol is
//! dropped with a warning, and the session goes on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tidemark_durable::{FsDir, LogDir, LogFile};
use tidemark_names::Name;
use tidemark_wire::{Message, MessageDecoder, StatusReport};

use crate::daemon::group_dir;
use crate::jobs::JobRegistry;
use crate::lag_ring::{LagRing, LagRingFile, LagSlot, FILE_LEN, LAG_RING_FILE};

/// The newest report of a group, as the receiver got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedReport {
    /// The report.
    pub report: StatusReport,
    /// When it arrived, ns since the Unix epoch by the receiver's clock.
    pub received_ns: u64,
    /// Whether the session that sent it still runs (a report of an ended
    /// session is what the shipper last said, not what it says now).
    pub live: bool,
}

/// Why a report stream was dropped.
#[derive(Debug, thiserror::Error)]
pub enum ReportStreamError {
    /// The shipper sent bytes that are not a report (its fault).
    #[error("the shipper's status report stream does not decode")]
    Decode(#[source] tidemark_wire::DecodeError),
    /// A message other than a report, or a report in a frame of another
    /// version than the session's (the shipper's fault).
    #[error("the shipper sent {what} on its status report stream")]
    Unexpected {
        /// The message, or the frame's version.
        what: String,
    },
    /// The stream could not be read (the connection ended).
    #[error("reading the status report stream")]
    Read(#[source] quinn::ReadError),
}

#[derive(Default)]
struct GroupReports {
    latest: Option<ReceivedReport>,
    ring: Option<LagRingFile<FsDir>>,
}

/// Every group's newest report and lag history (see the module
/// documentation). Shared by the receiver's sessions and its console.
pub struct ShipperReports {
    data_dir: PathBuf,
    groups: Mutex<HashMap<(Name, Name), GroupReports>>,
    /// The job registry: the syncs and resyncs the reports show, and the
    /// console's jobs.
    jobs: Arc<JobRegistry>,
}

impl std::fmt::Debug for ShipperReports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShipperReports")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl ShipperReports {
    /// The reports of the receiver whose data directory is `data_dir`.
    pub fn new(data_dir: &Path) -> Arc<ShipperReports> {
        Arc::new(ShipperReports {
            data_dir: data_dir.to_path_buf(),
            groups: Mutex::new(HashMap::new()),
            jobs: Arc::new(JobRegistry::open(data_dir, tidemark_changelog::now_ns())),
        })
    }

    /// The receiver's job registry.
    pub fn jobs(&self) -> &Arc<JobRegistry> {
        &self.jobs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Name, Name), GroupReports>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a report of `host`'s `group` that arrived at `now_ns`: it
    /// replaces the one before and counts in the lag history. Writes the
    /// history's file: call from a blocking context.
    pub fn handle_report(&self, host: &Name, group: &Name, report: StatusReport, now_ns: u64) {
        self.jobs.handle_report(host, group, &report, now_ns);
        let mut groups = self.lock();
        let g = groups.entry((host.clone(), group.clone())).or_default();
        if g.ring.is_none() {
            let dir = group_dir(&self.data_dir, host, group);
            match tidemark_durable::create_private_dir_all(&dir)
                .and_then(|()| FsDir::existing(&dir))
                .and_then(|d| LagRingFile::open(&d, now_ns))
            {
                Ok(r) => g.ring = Some(r),
                Err(e) => {
                    tracing::warn!(%host, %group, error = %e, "cannot open the group's lag history; it is not kept")
                }
            }
        }
        if let Some(ring) = &mut g.ring {
            let critical = report.state == tidemark_wire::ReportState::Critical;
            if let Err(e) =
                ring.handle_report(report.lag_ms, report.pending_bytes, critical, now_ns)
            {
                tracing::warn!(%host, %group, error = %e, "cannot write the group's lag history; it is not kept");
                g.ring = None;
            }
        }
        g.latest = Some(ReceivedReport {
            report,
            received_ns: now_ns,
            live: true,
        });
    }

    /// The session of `host`'s `group` ended: its last report is kept as
    /// what the shipper last said, and the history is made durable.
    /// Blocking.
    pub fn handle_session_end(&self, host: &Name, group: &Name) {
        self.jobs.flush(tidemark_changelog::now_ns());
        let mut groups = self.lock();
        let Some(g) = groups.get_mut(&(host.clone(), group.clone())) else {
            return;
        };
        if let Some(latest) = &mut g.latest {
            latest.live = false;
        }
        if let Some(ring) = &mut g.ring {
            if let Err(e) = ring.sync() {
                tracing::warn!(%host, %group, error = %e, "cannot sync the group's lag history");
            }
        }
    }

    /// The newest report of `host`'s `group` since the receiver started.
    pub fn latest(&self, host: &Name, group: &Name) -> Option<ReceivedReport> {
        self.lock()
            .get(&(host.clone(), group.clone()))
            .and_then(|g| g.latest.clone())
    }

    /// The newest reports of the groups whose session runs, as metrics:
    /// the shipper's lag and pending bytes, by host and group (a group
    /// whose shipper is not connected, or sends no reports, has none).
    pub fn metrics(&self, e: &mut tidemark_metrics::Exposition) {
        let groups = self.lock();
        let mut live: Vec<_> = groups
            .iter()
            .filter_map(|(key, g)| g.latest.as_ref().filter(|l| l.live).map(|l| (key, l)))
            .collect();
        live.sort_by(|a, b| a.0.cmp(b.0));
        for ((host, group), l) in live {
            let labels =
                tidemark_metrics::labels(&[("host", host.as_str()), ("group", group.as_str())]);
            e.gauge(
                "tidemark_receiver_shipper_lag",
                "The lag the group's shipper last reported: the age of its oldest record not yet durable here, by the protected host's clock.",
                Some(tidemark_metrics::Unit::Seconds),
                &labels,
                l.report.lag_ms as f64 / 1e3,
            );
            e.gauge(
                "tidemark_receiver_shipper_pending_bytes",
                "Bytes of records the group's shipper last reported read from its log and not yet durable here.",
                None,
                &labels,
                l.report.pending_bytes as f64,
            );
        }
    }

    /// The lag history of `host`'s `group` over the 24 hours up to
    /// `now_ns`, oldest first: from memory, or read from the group's file
    /// when no report came since the receiver started. Blocking.
    pub fn lag_history(&self, host: &Name, group: &Name, now_ns: u64) -> Vec<LagSlot> {
        if let Some(ring) = self
            .lock()
            .get(&(host.clone(), group.clone()))
            .and_then(|g| g.ring.as_ref())
        {
            return ring.ring().slots(now_ns);
        }
        let read = || -> std::io::Result<Vec<u8>> {
            let dir = FsDir::existing(&group_dir(&self.data_dir, host, group))?;
            let file = dir.open(LAG_RING_FILE, false)?;
            let mut bytes = vec![0u8; FILE_LEN];
            let got = file.read_full_at(&mut bytes, 0)?;
            bytes.truncate(got);
            Ok(bytes)
        };
        read()
            .map(|bytes| LagRing::from_bytes(&bytes, now_ns).slots(now_ns))
            .unwrap_or_default()
    }
}

/// Reads the status reports of one stream of `host`'s `group`, whose
/// session speaks `version`, into `reports`, until the stream ends.
pub async fn read_reports(
    reports: &ShipperReports,
    host: &Name,
    group: &Name,
    version: u16,
    mut recv: quinn::RecvStream,
) -> Result<(), ReportStreamError> {
    let mut decoder = MessageDecoder::new();
    let mut buf = vec![0u8; 4096];
    loop {
        loop {
            match decoder.next_message().map_err(ReportStreamError::Decode)? {
                None => break,
                Some(m) if m.version != version => {
                    return Err(ReportStreamError::Unexpected {
                        what: format!("a frame of version {}", m.version),
                    })
                }
                Some(m) => match m.message {
                    Message::StatusReport(report) => {
                        let now = tidemark_changelog::now_ns();
                        tokio::task::block_in_place(|| {
                            reports.handle_report(host, group, report, now)
                        });
                    }
                    other => {
                        return Err(ReportStreamError::Unexpected {
                            what: other.msg_type().name().to_string(),
                        })
                    }
                },
            }
        }
        match recv.read(&mut buf).await.map_err(ReportStreamError::Read)? {
            Some(n) => decoder.feed(&buf[..n]),
            None => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_wire::{Progress, ReportState};

    fn report(lag_ms: u64) -> StatusReport {
        StatusReport {
            state: ReportState::Protected,
            reason: String::new(),
            pending_records: 2,
            pending_bytes: 8192,
            lag_ms,
            wire_bytes_per_sec: 0,
            record_bytes_per_sec: 0,
            sync: Progress::default(),
            sync_bytes_per_sec: 0,
            resync: Progress::default(),
        }
    }

    #[test]
    fn the_newest_report_wins_and_its_lag_is_kept_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let (host, group) = (Name::new("db1").unwrap(), Name::new("default").unwrap());
        let now = 29_610_000 * 60_000_000_000;
        let reports = ShipperReports::new(tmp.path());
        assert_eq!(reports.latest(&host, &group), None);
        reports.handle_report(&host, &group, report(4_000), now);
        reports.handle_report(&host, &group, report(1_500), now + 1);
        let latest = reports.latest(&host, &group).unwrap();
        assert_eq!((latest.report.lag_ms, latest.live), (1_500, true));
        let mut e = tidemark_metrics::Exposition::new();
        reports.metrics(&mut e);
        let text = e.render(tidemark_metrics::Format::Classic);
        assert!(
            text.contains(
                "tidemark_receiver_shipper_lag_seconds{host=\"db1\",group=\"default\"} 1.5"
            ),
            "{text}"
        );
        reports.handle_session_end(&host, &group);
        assert!(!reports.latest(&host, &group).unwrap().live);
        let mut e = tidemark_metrics::Exposition::new();
        reports.metrics(&mut e);
        assert!(!e.render(tidemark_metrics::Format::Classic).contains("db1"));
        // A receiver started afresh reads the history from the file.
        let again = ShipperReports::new(tmp.path());
        let slots = again.lag_history(&host, &group, now);
        assert_eq!(slots.len(), 1);
        assert_eq!((slots[0].max_lag_ms, slots[0].last_lag_ms), (4_000, 1_500));
    }
}
