//! What the pages show, from what the store knows: the page models are
//! plain data made from store facts and `now`, so the wording and the
//! arithmetic are tested without a store or a browser.

use tidemark_receiver::jobs::{Job, JobState};
use tidemark_receiver::shipper_reports::ReceivedReport;
use tidemark_receiver::store::{GroupState, RecoveryPoint};
use tidemark_wire::{Progress, ReportState};

/// A group's replication state as the store tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Consistent: recovery points are being made.
    Protected,
    /// The first full copy is still under way.
    InitialSync,
    /// Blocks are being compared and repaired; `pending` extents left.
    Resync {
        /// Extents still to resync.
        pending: usize,
    },
    /// The store cannot be read: the reason is shown.
    Critical,
}

impl ReplicaState {
    /// From the store's group state.
    pub fn of(state: &GroupState) -> ReplicaState {
        match state {
            GroupState::InitialSync => ReplicaState::InitialSync,
            GroupState::Consistent => ReplicaState::Protected,
            GroupState::Resyncing { pending } => ReplicaState::Resync {
                pending: pending.len(),
            },
        }
    }

    /// The word on the page.
    pub fn label(self) -> &'static str {
        match self {
            ReplicaState::Protected => "protected",
            ReplicaState::InitialSync => "initial sync",
            ReplicaState::Resync { .. } => "resync",
            ReplicaState::Critical => "critical",
        }
    }

    /// The CSS class (colour and icon) of the state.
    pub fn class(self) -> &'static str {
        match self {
            ReplicaState::Protected => "ok",
            ReplicaState::InitialSync | ReplicaState::Resync { .. } => "busy",
            ReplicaState::Critical => "bad",
        }
    }
}

/// One row of the overview.
#[derive(Debug, Clone)]
pub struct GroupRow {
    /// The protected host.
    pub host: String,
    /// Its consistency group.
    pub group: String,
    /// Its state.
    pub state: ReplicaState,
    /// Why it is critical, or the resync's extents left; empty otherwise.
    pub detail: String,
    /// The RPO lag: the newest point's age, as people read it ("-" with
    /// no point).
    pub lag: String,
    /// How many recovery points are kept.
    pub points: usize,
}

impl GroupRow {
    /// The row of a readable group.
    pub fn new(
        host: &str,
        group: &str,
        state: &GroupState,
        points: &[RecoveryPoint],
        now_ns: u64,
    ) -> GroupRow {
        let state = ReplicaState::of(state);
        let detail = match state {
            ReplicaState::Resync { pending } => format!("{pending} extent(s) left"),
            _ => String::new(),
        };
        GroupRow {
            host: host.into(),
            group: group.into(),
            state,
            detail,
            lag: points.last().map_or_else(
                || "-".into(),
                |p| age(now_ns.saturating_sub(p.timestamp_ns)),
            ),
            points: points.len(),
        }
    }

    /// The row of a group whose store cannot be read.
    pub fn unreadable(host: &str, group: &str, reason: String) -> GroupRow {
        GroupRow {
            host: host.into(),
            group: group.into(),
            state: ReplicaState::Critical,
            detail: reason,
            lag: "-".into(),
            points: 0,
        }
    }
}

/// What the group's shipper last reported, as the pages show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipperRow {
    /// The state's words: "initial sync", "resync", "protected",
    /// "critical".
    pub state: &'static str,
    /// Its CSS class (as [`ReplicaState::class`]).
    pub class: &'static str,
    /// Why it is critical; empty otherwise.
    pub reason: String,
    /// The initial sync's or the resync's progress, in percent, while
    /// one runs.
    pub percent: Option<u8>,
    /// What the progress stands at: "1.0 GiB of 4.0 GiB, about 2 min
    /// left" (empty without progress).
    pub progress: String,
    /// The lag now: the age of the oldest record not yet durable.
    pub lag: String,
    /// Records and bytes the replica does not have yet.
    pub pending: String,
    /// Bytes per second on the wire and of records.
    pub throughput: String,
    /// When the report came, and whether its session still runs.
    pub received: String,
    /// Whether the report's session still runs.
    pub live: bool,
}

impl ShipperRow {
    /// The row of the newest report, if the shipper sent any since the
    /// receiver started.
    pub fn new(latest: Option<&ReceivedReport>, now_ns: u64) -> Option<ShipperRow> {
        let latest = latest?;
        let r = &latest.report;
        let (state, class) = match r.state {
            ReportState::InitialSync => ("initial sync", "busy"),
            ReportState::Resyncing => ("resync", "busy"),
            ReportState::Protected => ("protected", "ok"),
            ReportState::Critical => ("critical", "bad"),
        };
        let progress_of = |p: Progress| {
            let pct = if p.total == 0 {
                100
            } else {
                (u128::from(p.done) * 100 / u128::from(p.total)) as u8
            };
            (pct, format!("{} of {}", size(p.done), size(p.total)))
        };
        let (percent, progress) = match r.state {
            ReportState::InitialSync => {
                let (pct, mut text) = progress_of(r.sync);
                match r.sync_eta_seconds() {
                    Some(eta) => text.push_str(&format!(
                        ", about {} left at {}/s",
                        age(eta * 1_000_000_000),
                        size(r.sync_bytes_per_sec)
                    )),
                    None => text.push_str(", time left not known yet"),
                }
                (Some(pct), text)
            }
            ReportState::Resyncing if r.resync.total > 0 => {
                let (pct, text) = progress_of(r.resync);
                (Some(pct), format!("{text} compared"))
            }
            _ => (None, String::new()),
        };
        Some(ShipperRow {
            state,
            class,
            reason: r.reason.clone(),
            percent,
            progress,
            lag: lag_ms(r.lag_ms),
            pending: format!("{} record(s), {}", r.pending_records, size(r.pending_bytes)),
            throughput: format!(
                "{}/s on the wire, {}/s of records",
                size(r.wire_bytes_per_sec),
                size(r.record_bytes_per_sec)
            ),
            received: format!(
                "{} ago{}",
                age(now_ns.saturating_sub(latest.received_ns)),
                if latest.live {
                    ""
                } else {
                    ", the shipper is not connected"
                }
            ),
            live: latest.live,
        })
    }
}

/// A lag in ms as people read it: "350 ms" below a second, else as
/// [`age`].
pub fn lag_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else {
        age(ms * 1_000_000)
    }
}

/// Bytes as people read them: "512 B", "1.5 MiB".
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One recovery point on a group's timeline.
#[derive(Debug, Clone)]
pub struct PointRow {
    /// Its sequence number.
    pub seq: u64,
    /// When the host wrote it, UTC.
    pub time: String,
    /// "app-consistent" or "crash-consistent".
    pub kind: &'static str,
    /// The marker's label (empty for a barrier).
    pub label: String,
    /// Its age.
    pub age: String,
    /// Whether it is the point chosen on the page.
    pub chosen: bool,
}

/// The timeline of `points`, newest first, with `chosen` (else the
/// newest) highlighted.
pub fn timeline(points: &[RecoveryPoint], chosen: Option<u64>, now_ns: u64) -> Vec<PointRow> {
    let chosen = chosen
        .filter(|c| points.iter().any(|p| p.seq.0 == *c))
        .or_else(|| points.last().map(|p| p.seq.0));
    points
        .iter()
        .rev()
        .map(|p| PointRow {
            seq: p.seq.0,
            time: utc(p.timestamp_ns),
            kind: if p.app_consistent {
                "app-consistent"
            } else {
                "crash-consistent"
            },
            label: p.label.clone(),
            age: age(now_ns.saturating_sub(p.timestamp_ns)),
            chosen: Some(p.seq.0) == chosen,
        })
        .collect()
}

/// A duration as people read it: "42 s", "3 min 5 s", "2 h 10 min",
/// "3 d 4 h".
pub fn age(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// A time in ns since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic
/// Gregorian calendar (H. Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// One job of the registry, as the jobs page shows it (and its live
/// updates send).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct JobRow {
    /// Its id.
    pub id: u64,
    /// What it does ("initial sync", "test failover", ...).
    pub kind: &'static str,
    /// `host/group`.
    pub target: String,
    /// Who started it.
    pub by: String,
    /// When it started, UTC.
    pub started: String,
    /// When it ended, UTC (empty while running).
    pub ended: String,
    /// "running", "done", "failed" or "interrupted".
    pub state: &'static str,
    /// The state's CSS class.
    pub class: &'static str,
    /// Why it failed or was interrupted (empty otherwise).
    pub reason: String,
    /// Progress as a percent (0..=100) if the job measures it.
    pub percent: Option<u8>,
    /// Progress in words: "1.0 MiB of 4.0 MiB, about 3 s left", or what
    /// the job is doing when it has no measure.
    pub progress: String,
}

impl JobRow {
    /// The row of `job` at `now_ns`.
    pub fn new(job: &Job, now_ns: u64) -> JobRow {
        let class = match job.state {
            JobState::Running => "busy",
            JobState::Done => "ok",
            JobState::Failed(_) | JobState::Interrupted(_) => "bad",
        };
        let percent = job
            .fraction()
            .map(|f| (f * 100.0).floor().clamp(0.0, 100.0) as u8);
        let progress = match (job.total, &job.state) {
            (0, JobState::Running) => "running; no measure of progress".to_string(),
            (0, _) => String::new(),
            (total, state) => {
                let mut text = format!("{} of {}", size(job.done), size(total));
                if !state.ended() {
                    match job.eta(now_ns) {
                        Some(eta) => {
                            text.push_str(&format!(", about {} left", age(eta.as_nanos() as u64)))
                        }
                        None => text.push_str(", time left not known yet"),
                    }
                }
                text
            }
        };
        JobRow {
            id: job.id.0,
            kind: job.kind.describe(),
            target: format!("{}/{}", job.host, job.group),
            by: job.by.clone(),
            started: utc(job.started_ns),
            ended: job.ended_ns.map(utc).unwrap_or_default(),
            state: job.state.word(),
            class,
            reason: job.state.reason().to_string(),
            percent,
            progress,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_changelog::Seq;

    const S: u64 = 1_000_000_000;

    fn point(seq: u64, ts_s: u64, app: bool, label: &str) -> RecoveryPoint {
        RecoveryPoint {
            seq: Seq(seq),
            timestamp_ns: ts_s * S,
            app_consistent: app,
            label: label.into(),
        }
    }

    #[test]
    fn ages_and_times_read_as_people_write_them() {
        assert_eq!(age(42 * S), "42 s");
        assert_eq!(
            (lag_ms(350), lag_ms(2_500)),
            ("350 ms".into(), "2 s".into())
        );
        assert_eq!(age(185 * S), "3 min 5 s");
        assert_eq!(age((2 * 3600 + 600) * S), "2 h 10 min");
        assert_eq!(age((3 * 86400 + 4 * 3600) * S), "3 d 4 h");
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(
            utc(1_796_601_600 * S + 3_723 * S),
            "2026-12-07 01:02:03 UTC"
        );
    }

    #[test]
    fn a_row_says_the_state_and_the_newest_points_age() {
        let points = [point(5, 100, false, ""), point(9, 160, true, "nightly")];
        let row = GroupRow::new("db", "default", &GroupState::Consistent, &points, 170 * S);
        assert_eq!(row.state, ReplicaState::Protected);
        assert_eq!((row.lag.as_str(), row.points), ("10 s", 2));
        let row = GroupRow::new("db", "default", &GroupState::InitialSync, &[], 0);
        assert_eq!((row.state.label(), row.lag.as_str()), ("initial sync", "-"));
        let row = GroupRow::unreadable("db", "default", "damaged".into());
        assert_eq!(
            (row.state.label(), row.detail.as_str()),
            ("critical", "damaged")
        );
    }

    fn received(state: ReportState) -> ReceivedReport {
        ReceivedReport {
            report: tidemark_wire::StatusReport {
                state,
                reason: String::new(),
                pending_records: 3,
                pending_bytes: 3 << 20,
                lag_ms: 2_500,
                wire_bytes_per_sec: 1 << 20,
                record_bytes_per_sec: 2 << 20,
                sync: Progress {
                    done: 1 << 30,
                    total: 4 << 30,
                },
                sync_bytes_per_sec: 64 << 20,
                resync: Progress { done: 0, total: 0 },
            },
            received_ns: 100 * S,
            live: true,
        }
    }

    #[test]
    fn the_shipper_row_says_state_progress_lag_and_pending() {
        assert_eq!(ShipperRow::new(None, 0), None, "no report, no row");
        let r = received(ReportState::InitialSync);
        let row = ShipperRow::new(Some(&r), 103 * S).unwrap();
        assert_eq!(
            (row.state, row.class, row.percent),
            ("initial sync", "busy", Some(25))
        );
        assert_eq!(
            row.progress,
            "1.0 GiB of 4.0 GiB, about 48 s left at 64.0 MiB/s"
        );
        assert_eq!(row.lag, "2 s");
        assert_eq!(row.pending, "3 record(s), 3.0 MiB");
        assert_eq!(row.received, "3 s ago");
        let mut r = received(ReportState::Critical);
        r.report.reason = "the log is damaged".into();
        r.live = false;
        let row = ShipperRow::new(Some(&r), 100 * S).unwrap();
        assert_eq!(
            (row.state, row.class, row.percent),
            ("critical", "bad", None)
        );
        assert_eq!(row.reason, "the log is damaged");
        assert!(row.received.ends_with("not connected"));
        let mut r = received(ReportState::Resyncing);
        r.report.resync = Progress {
            done: 512,
            total: 2048,
        };
        let row = ShipperRow::new(Some(&r), 100 * S).unwrap();
        assert_eq!(
            (row.percent, row.progress.as_str()),
            (Some(25), "512 B of 2.0 KiB compared")
        );
    }

    #[test]
    fn the_timeline_is_newest_first_and_highlights_the_chosen_point() {
        let points = [point(5, 100, false, ""), point(9, 160, true, "nightly")];
        let rows = timeline(&points, None, 200 * S);
        assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), [9, 5]);
        assert!(rows[0].chosen && !rows[1].chosen, "the newest by default");
        assert_eq!(
            (rows[0].kind, rows[0].label.as_str()),
            ("app-consistent", "nightly")
        );
        let rows = timeline(&points, Some(5), 200 * S);
        assert!(!rows[0].chosen && rows[1].chosen);
        let rows = timeline(&points, Some(7), 200 * S);
        assert!(rows[0].chosen, "an unknown choice falls back to the newest");
    }
}
