//! The stream of status reports (`tidemark_wire::status_report` says what
//! a report holds and its `Reporter` decides when one is due): the
//! shipper opens a unidirectional stream of its own once a session of
//! protocol version 7 or later runs, so a report never waits behind queued
//! records, and writes each report on it as one frame.
//!
//! Latest wins: the session hands the newest report to the stream's task
//! through a watch channel, and a report the task has not written yet is
//! replaced by a newer one, never queued behind it. A report that cannot
//! be written (the stream or the connection ended) is dropped: reports are
//! never acknowledged, and the session's own stream tells of a lost
//! connection.

use std::time::Duration;

use tidemark_wire::{Compression, Message, StatusReport};
use tokio::sync::watch;

/// The stream's task; ends when the stream is dropped or flushed.
pub(crate) struct ReportStream {
    latest: Option<watch::Sender<Option<StatusReport>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReportStream {
    /// Opens the report stream on `conn`, whose session speaks `version`
    /// (7 or later: a report is never sent in an older session, whose
    /// receiver would not read it).
    pub(crate) fn start(conn: quinn::Connection, version: u16) -> ReportStream {
        let (latest, mut rx) = watch::channel(None::<StatusReport>);
        let task = tokio::spawn(async move {
            let mut send = match conn.open_uni().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open the status report stream");
                    return;
                }
            };
            // Ends once the session dropped its end and the last report
            // it gave is written.
            while rx.changed().await.is_ok() {
                let Some(report) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let frame = match Message::StatusReport(report).encode(version, Compression::None) {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(error = %e, "a status report does not encode; none is sent");
                        return;
                    }
                };
                if let Err(e) = send.write_all(&frame).await {
                    tracing::debug!(error = %e, "the status report stream ended");
                    return;
                }
            }
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
        });
        ReportStream {
            latest: Some(latest),
            task,
        }
    }

    /// Sends `report`, replacing any not written yet.
    pub(crate) fn send(&self, report: StatusReport) {
        if let Some(latest) = &self.latest {
            latest.send_replace(Some(report));
        }
    }

    /// Writes the last report given, waiting at most `timeout`: the
    /// report of a shipper that stops on a permanent failure reaches the
    /// receiver before the connection closes.
    pub(crate) async fn flush(mut self, timeout: Duration) {
        self.latest = None;
        // Not done in time: dropping `self` ends it.
        let _ = tokio::time::timeout(timeout, &mut self.task).await;
    }
}

impl Drop for ReportStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
