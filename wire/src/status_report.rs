//! What the shipper tells the receiver of itself (protocol version 7 on):
//! the [`StatusReport`] a `status-report` message carries (its layout is in
//! [`crate::message`]), and the [`Reporter`] that decides when one is sent.
//!
//! The receiver cannot see what only the protected host knows: the records
//! and bytes still waiting in the change log, the age of the oldest record
//! not yet durable at the replica (the lag, by the shipper's clock, so no
//! two hosts' clocks are compared), how fast the shipper sends, and how
//! far an initial sync or a resync has come. A report says all of that at
//! one instant; it is never acknowledged, and the newest one replaces every
//! earlier one, so a lost or late report costs nothing but freshness.
//!
//! Reports travel on a unidirectional stream the shipper opens beside the
//! session's once a session of version 7 or later runs: they never wait
//! behind queued records. A shipper whose session runs in version 6 or
//! older sends none; a receiver of version 7 serves older shippers without
//! them (their groups show no report).
//!
//! The [`Reporter`] is pure: the shell hands it what the shipper knows
//! ([`Facts`]), the records it read from the log and what the receiver made
//! durable, with `now`; [`Reporter::poll_report`] says when a report is
//! due: at once when the state (or the reason of a critical one) changes,
//! else every [`ReporterConfig::interval`] if anything in it changed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tidemark_changelog::Seq;

/// The longest reason a report carries, in bytes.
pub const MAX_REPORT_REASON: usize = 4096;

/// The group's replication state, as the shipper sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReportState {
    /// Copying the disks while shipping the log.
    InitialSync,
    /// Comparing and sending blocks after bitmap mode or an unclean stop.
    Resyncing,
    /// Shipping the log; the replica follows.
    Protected,
    /// Stopped on a permanent failure; the report's reason says why.
    Critical,
}

impl ReportState {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            ReportState::InitialSync => 0,
            ReportState::Resyncing => 1,
            ReportState::Protected => 2,
            ReportState::Critical => 3,
        }
    }

    /// The state a byte stands for, if any.
    pub fn from_code(code: u8) -> Option<ReportState> {
        Some(match code {
            0 => ReportState::InitialSync,
            1 => ReportState::Resyncing,
            2 => ReportState::Protected,
            3 => ReportState::Critical,
            _ => return None,
        })
    }

    /// The kebab-case name, as the shipper's status file names it.
    pub fn name(self) -> &'static str {
        match self {
            ReportState::InitialSync => "initial-sync",
            ReportState::Resyncing => "resyncing",
            ReportState::Protected => "protected",
            ReportState::Critical => "critical",
        }
    }
}

/// Bytes done of a total: an initial sync's or a resync's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Bytes done; never more than `total`.
    pub done: u64,
    /// Bytes in all (0: nothing to do).
    pub total: u64,
}

/// One status report: the shipper's view of its group at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    /// The state.
    pub state: ReportState,
    /// Why the group is critical (empty otherwise); at most
    /// [`MAX_REPORT_REASON`] bytes.
    pub reason: String,
    /// Records in the log the receiver has not made durable.
    pub pending_records: u64,
    /// Their bytes, as far as the shipper has read them from the log (the
    /// records it has not read yet are counted in `pending_records` only).
    pub pending_bytes: u64,
    /// The age of the oldest record sent and not yet durable at the
    /// replica, in milliseconds by the shipper's clock; 0 when none is.
    pub lag_ms: u64,
    /// Bytes sent on the wire per second (after compression), over the
    /// time since the previous report.
    pub wire_bytes_per_sec: u64,
    /// Record bytes shipped per second (before compression), likewise.
    pub record_bytes_per_sec: u64,
    /// The initial sync of all the group's disks (done: durable at the
    /// replica).
    pub sync: Progress,
    /// The initial sync's rate, bytes per second (0: unknown or done).
    pub sync_bytes_per_sec: u64,
    /// The resync under way: bytes compared of the extents it covers.
    pub resync: Progress,
}

impl StatusReport {
    /// Seconds until the initial sync completes at its rate; `None` when
    /// the rate is unknown, `Some(0)` when it is done.
    pub fn sync_eta_seconds(&self) -> Option<u64> {
        let left = self.sync.total.saturating_sub(self.sync.done);
        match (left, self.sync_bytes_per_sec) {
            (0, _) => Some(0),
            (_, 0) => None,
            (left, rate) => Some(left.div_ceil(rate)),
        }
    }
}

/// What the shipper knows at one instant, as the shell gathers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The state.
    pub state: ReportState,
    /// Why it is critical (empty otherwise).
    pub reason: String,
    /// The newest record in the log.
    pub log_seq: Seq,
    /// The newest record durable at the replica.
    pub durable_seq: Seq,
    /// Timestamp (ns since the Unix epoch) of the oldest record sent and
    /// not yet durable.
    pub oldest_unacked_ns: Option<u64>,
    /// The wall clock now, ns since the Unix epoch (the lag's reference).
    pub now_ns: u64,
    /// Bytes sent on the wire since start.
    pub wire_bytes: u64,
    /// Record bytes shipped since start.
    pub record_bytes: u64,
    /// The initial sync of all the disks.
    pub sync: Progress,
    /// Its rate, bytes per second.
    pub sync_bytes_per_sec: u64,
    /// Bytes of resync extents still to compare.
    pub resync_left: u64,
}

/// When reports are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReporterConfig {
    /// A report is sent this often while something in it changes (a change
    /// of state is sent at once).
    pub interval: Duration,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            interval: Duration::from_secs(2),
        }
    }
}

/// Decides when the shipper sends a status report (see the module
/// documentation). One per session.
#[derive(Debug)]
pub struct Reporter {
    config: ReporterConfig,
    facts: Option<Facts>,
    /// The last report sent, when, and the counters it was computed from.
    last: Option<Sent>,
    /// (last seq, bytes) of each batch read from the log and not yet
    /// durable, oldest first.
    read: VecDeque<(Seq, u64)>,
    read_bytes: u64,
    /// The resync's total: the most bytes left since it began, plus what
    /// was added to it since.
    resync_total: u64,
    resync_left: u64,
}

#[derive(Debug)]
struct Sent {
    at: Instant,
    report: StatusReport,
    wire_bytes: u64,
    record_bytes: u64,
}

impl Reporter {
    /// A reporter that has sent nothing yet.
    pub fn new(config: ReporterConfig) -> Reporter {
        Reporter {
            config,
            facts: None,
            last: None,
            read: VecDeque::new(),
            read_bytes: 0,
            resync_total: 0,
            resync_left: 0,
        }
    }

    /// A batch of records up to `last_seq`, `bytes` long, was read from
    /// the log to be sent.
    pub fn handle_records_read(&mut self, last_seq: Seq, bytes: u64) {
        self.read.push_back((last_seq, bytes));
        self.read_bytes += bytes;
    }

    /// Every record up to `seq` is durable at the replica.
    pub fn handle_durable(&mut self, seq: Seq) {
        while let Some(&(last, bytes)) = self.read.front() {
            if last > seq {
                break;
            }
            self.read.pop_front();
            self.read_bytes -= bytes;
        }
    }

    /// What the shipper knows now.
    pub fn handle_facts(&mut self, facts: Facts) {
        let left = facts.resync_left;
        if left == 0 {
            self.resync_total = 0;
        } else if left > self.resync_left {
            // A resync began, or extents joined the one under way.
            self.resync_total += left - self.resync_left;
        }
        self.resync_left = left;
        self.facts = Some(facts);
    }

    /// The report to send now, if one is due.
    pub fn poll_report(&mut self, now: Instant) -> Option<StatusReport> {
        let facts = self.facts.as_ref()?;
        let (wire_rate, record_rate) = match &self.last {
            Some(last) => {
                let secs = now.saturating_duration_since(last.at).as_secs_f64();
                let rate = |now: u64, then: u64| match secs {
                    s if s > 0.0 => (now.saturating_sub(then) as f64 / s) as u64,
                    _ => 0,
                };
                (
                    rate(facts.wire_bytes, last.wire_bytes),
                    rate(facts.record_bytes, last.record_bytes),
                )
            }
            None => (0, 0),
        };
        let report = StatusReport {
            state: facts.state,
            reason: truncate(&facts.reason, MAX_REPORT_REASON),
            pending_records: facts.log_seq.since(facts.durable_seq).unwrap_or(0),
            pending_bytes: self.read_bytes,
            lag_ms: facts
                .oldest_unacked_ns
                .map_or(0, |t| facts.now_ns.saturating_sub(t) / 1_000_000),
            wire_bytes_per_sec: wire_rate,
            record_bytes_per_sec: record_rate,
            sync: Progress {
                done: facts.sync.done.min(facts.sync.total),
                total: facts.sync.total,
            },
            sync_bytes_per_sec: facts.sync_bytes_per_sec,
            resync: Progress {
                done: self.resync_total - self.resync_left,
                total: self.resync_total,
            },
        };
        let due = match &self.last {
            None => true,
            Some(last) => {
                last.report.state != report.state
                    || last.report.reason != report.reason
                    || (now.saturating_duration_since(last.at) >= self.config.interval
                        && last.report != report)
            }
        };
        if !due {
            return None;
        }
        self.last = Some(Sent {
            at: now,
            report: report.clone(),
            wire_bytes: facts.wire_bytes,
            record_bytes: facts.record_bytes,
        });
        Some(report)
    }

    /// When [`Reporter::poll_report`] may next have a report (`None`:
    /// only after new facts).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.last.as_ref().map(|l| l.at + self.config.interval)
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(state: ReportState) -> Facts {
        Facts {
            state,
            reason: String::new(),
            log_seq: Seq(10),
            durable_seq: Seq(4),
            oldest_unacked_ns: Some(1_000_000_000),
            now_ns: 3_500_000_000,
            wire_bytes: 0,
            record_bytes: 0,
            sync: Progress { done: 0, total: 0 },
            sync_bytes_per_sec: 0,
            resync_left: 0,
        }
    }

    #[test]
    fn the_first_report_is_sent_at_once_and_says_what_the_facts_say() {
        let t0 = Instant::now();
        let mut r = Reporter::new(ReporterConfig::default());
        assert_eq!(r.poll_report(t0), None, "nothing known, nothing sent");
        r.handle_records_read(Seq(6), 600);
        r.handle_records_read(Seq(10), 400);
        r.handle_durable(Seq(6));
        r.handle_facts(facts(ReportState::Protected));
        let report = r.poll_report(t0).expect("the first report is due");
        assert_eq!(report.pending_records, 6);
        assert_eq!(report.pending_bytes, 400, "the batch up to 6 is durable");
        assert_eq!(report.lag_ms, 2_500);
        assert_eq!(r.poll_report(t0), None, "not twice");
    }

    #[test]
    fn a_state_change_is_sent_at_once_other_changes_at_the_interval() {
        let t0 = Instant::now();
        let cfg = ReporterConfig::default();
        let mut r = Reporter::new(cfg);
        r.handle_facts(facts(ReportState::InitialSync));
        assert!(r.poll_report(t0).is_some());
        let mut f = facts(ReportState::InitialSync);
        f.now_ns += 1_000_000_000;
        r.handle_facts(f.clone());
        assert_eq!(
            r.poll_report(t0 + cfg.interval / 2),
            None,
            "the lag moved: later"
        );
        assert!(
            r.poll_report(t0 + cfg.interval).is_some(),
            "at the interval"
        );
        let mut critical = f.clone();
        critical.state = ReportState::Critical;
        critical.reason = "the log is damaged".into();
        r.handle_facts(critical);
        let sent = r
            .poll_report(t0 + cfg.interval)
            .expect("a state change at once");
        assert_eq!(
            (sent.state, sent.reason.as_str()),
            (ReportState::Critical, "the log is damaged")
        );
        assert_eq!(
            r.poll_report(t0 + cfg.interval * 5),
            None,
            "nothing changed"
        );
        assert_eq!(r.poll_timeout(), Some(t0 + cfg.interval * 2));
    }

    #[test]
    fn rates_are_over_the_time_since_the_previous_report() {
        let t0 = Instant::now();
        let mut r = Reporter::new(ReporterConfig::default());
        r.handle_facts(facts(ReportState::Protected));
        r.poll_report(t0).unwrap();
        let mut f = facts(ReportState::Protected);
        f.wire_bytes = 4_000;
        f.record_bytes = 10_000;
        r.handle_facts(f.clone());
        let report = r.poll_report(t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(
            (report.wire_bytes_per_sec, report.record_bytes_per_sec),
            (2_000, 5_000)
        );
        // Idle: the rates fall to zero once, then nothing more is sent.
        r.handle_facts(f);
        let report = r.poll_report(t0 + Duration::from_secs(4)).unwrap();
        assert_eq!(report.wire_bytes_per_sec, 0);
        assert_eq!(r.poll_report(t0 + Duration::from_secs(6)), None);
    }

    #[test]
    fn a_resync_counts_its_progress_from_the_most_left() {
        let t0 = Instant::now();
        let cfg = ReporterConfig::default();
        let mut r = Reporter::new(cfg);
        let mut f = facts(ReportState::Resyncing);
        f.resync_left = 1_000;
        r.handle_facts(f.clone());
        let first = r.poll_report(t0).unwrap();
        assert_eq!(
            first.resync,
            Progress {
                done: 0,
                total: 1_000
            }
        );
        f.resync_left = 400;
        r.handle_facts(f.clone());
        let report = r.poll_report(t0 + cfg.interval).unwrap();
        assert_eq!(
            report.resync,
            Progress {
                done: 600,
                total: 1_000
            }
        );
        f.resync_left = 900; // an extent joined
        r.handle_facts(f.clone());
        let report = r.poll_report(t0 + cfg.interval * 2).unwrap();
        assert_eq!(
            report.resync,
            Progress {
                done: 600,
                total: 1_500
            }
        );
        f.resync_left = 0;
        f.state = ReportState::Protected;
        r.handle_facts(f);
        let report = r.poll_report(t0 + cfg.interval * 2).unwrap();
        assert_eq!(report.resync, Progress::default());
    }

    #[test]
    fn the_sync_eta_follows_the_rate() {
        let mut report = StatusReport {
            state: ReportState::InitialSync,
            reason: String::new(),
            pending_records: 0,
            pending_bytes: 0,
            lag_ms: 0,
            wire_bytes_per_sec: 0,
            record_bytes_per_sec: 0,
            sync: Progress {
                done: 100,
                total: 1_000,
            },
            sync_bytes_per_sec: 0,
            resync: Progress::default(),
        };
        assert_eq!(report.sync_eta_seconds(), None);
        report.sync_bytes_per_sec = 100;
        assert_eq!(report.sync_eta_seconds(), Some(9));
        report.sync.done = 1_000;
        assert_eq!(report.sync_eta_seconds(), Some(0));
    }
}
