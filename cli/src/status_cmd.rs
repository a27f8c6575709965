//! `tidemark status`: one screen for an admin. It asks what this machine
//! runs — the tracker (its control socket), the shipper (the status file it
//! keeps in the log directory) and, on a replica site, the receiver's data
//! directory (read-only, as `tidemark points` does) — and shows one row per
//! protected disk and one per replica. A source that does not answer is
//! shown as such and never stops the others: the exit status is 0 when at
//! least one answered, 1 when none did.
//!
//! Asking (I/O, in [`gather`]) is kept apart from building the rows and
//! formatting them, which take the time in and are what the unit tests
//! check.

use crate::timefmt;
use anyhow::Result;
use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tidemark_receiver::store::{GroupState, LocalEngine};
use tidemark_shipper::status::{DiskProgress, ShipperStatus, State};

/// `tidemark status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The tracker's control socket.
    #[arg(long, value_name = "PATH", default_value = "/run/tidemark/tracker.ctl")]
    tracker_control: PathBuf,
    /// The change log directory the shipper drains (it keeps its status
    /// file there).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/tidemark/log")]
    log_dir: PathBuf,
    /// On a replica site: the receiver's data directory. Every replica
    /// under it is listed, and local disks show their newest recovery point.
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    data_dir: Option<PathBuf>,
    /// On a replica site: the receiver's configuration. With the Ceph
    /// store every group in the cluster is listed (from any receiver
    /// node) with the receiver that applies it, its lease, and whether the
    /// receiver on this node finds its store degraded; with the local
    /// store, as --data-dir with the configured data directory.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print one JSON document (with --watch: one per line per refresh).
    #[arg(long)]
    json: bool,
    /// Refresh every SECS seconds (default 2) until interrupted: progress
    /// bars on a terminal, else one plain line per disk and refresh.
    #[arg(
        long,
        value_name = "SECS",
        num_args = 0..=1,
        default_missing_value = "2",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    watch: Option<u64>,
}

/// The tracker's `status` reply (the control protocol's type).
type TrackerStatus = tidemark_control::StatusReply;

/// A source that did not answer: a short verdict for the screen and why.
#[derive(Debug, Clone, PartialEq)]
struct NoAnswer {
    /// `not running`, `not reachable`, `refused` or `unreadable`.
    verdict: &'static str,
    reason: String,
}

/// What one replica under the receiver's data directory holds.
#[derive(Debug, Clone, PartialEq)]
struct ReplicaSummary {
    host: String,
    group: String,
    /// `initial-sync`, `consistent`, `resyncing`, or `unreadable` (then
    /// `error` says why and the counts are zero).
    state: &'static str,
    /// Extents waiting for a resync (`resyncing` only).
    resync_pending: usize,
    points: usize,
    newest: Option<Point>,
    history_bytes: u64,
    error: Option<String>,
    /// With a store shared between receivers: who applies the group.
    owner: Option<tidemark_receiver::store::GroupOwner>,
    /// The receiver on this node finds the group's store degraded (why).
    degraded: Option<String>,
}

/// A recovery point, as this screen shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Point {
    seq: tidemark_changelog::Seq,
    timestamp_ns: u64,
}

/// Everything one look at the machine found.
#[derive(Debug)]
struct Snapshot {
    now_ns: u64,
    tracker_control: PathBuf,
    log_dir: PathBuf,
    tracker: Result<TrackerStatus, NoAnswer>,
    shipper: Result<ShipperStatus, NoAnswer>,
    /// `None` when no `--data-dir` was given.
    receiver: Option<(PathBuf, Result<Vec<ReplicaSummary>, NoAnswer>)>,
}

impl Snapshot {
    fn answered(&self) -> bool {
        self.tracker.is_ok() || self.shipper.is_ok() || matches!(&self.receiver, Some((_, Ok(_))))
    }

    fn replicas(&self) -> &[ReplicaSummary] {
        match &self.receiver {
            Some((_, Ok(r))) => r,
            _ => &[],
        }
    }

    fn rows(&self, record_rate: Option<u64>) -> Vec<DiskRow> {
        disk_rows(
            self.tracker.as_ref().ok(),
            self.shipper.as_ref().ok(),
            self.replicas(),
            record_rate,
            self.now_ns,
        )
    }
}

/// Where a row's THROUGHPUT comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ThroughputKind {
    /// The disk's initial sync rate, as the shipper measures it.
    InitialSync,
    /// Record bytes shipped for the group, between two looks (--watch).
    Records,
}

/// What is known of the newest recovery point of a disk's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NewestPoint {
    /// No `--data-dir`, or it holds no replica of the group.
    Unknown,
    /// The replica has no recovery point yet.
    NoPoint,
    /// The newest point.
    At(Point),
}

/// One protected disk, joined from the tracker, the shipper and the
/// receiver's data.
#[derive(Debug, Clone, PartialEq)]
struct DiskRow {
    /// The enrolled host name (only the shipper knows it).
    host: Option<String>,
    group: String,
    /// `-` when the shipper answered but has not announced its disks yet.
    disk: String,
    /// `data` or `bitmap`, from the tracker.
    tracking: Option<String>,
    replication: Option<State>,
    lag_seconds: Option<f64>,
    pending_records: Option<u64>,
    throughput: Option<(u64, ThroughputKind)>,
    newest_point: NewestPoint,
    last_error: Option<String>,
    /// The disk's initial sync progress while it runs.
    sync: Option<DiskProgress>,
    /// The group's resync blocks (compared, sent) while it resyncs.
    resync_blocks: Option<(u64, u64)>,
}

impl DiskRow {
    fn new(group: &str, disk: &str) -> DiskRow {
        DiskRow {
            host: None,
            group: group.to_string(),
            disk: disk.to_string(),
            tracking: None,
            replication: None,
            lag_seconds: None,
            pending_records: None,
            throughput: None,
            newest_point: NewestPoint::Unknown,
            last_error: None,
            sync: None,
            resync_blocks: None,
        }
    }

    /// `host/group/disk`.
    fn path(&self) -> String {
        format!(
            "{}/{}/{}",
            self.host.as_deref().unwrap_or("-"),
            self.group,
            self.disk
        )
    }

    fn state(&self) -> String {
        state_label(self.tracking.as_deref(), self.replication)
    }
}

pub(crate) fn run(a: StatusArgs) -> Result<ExitCode> {
    match a.watch {
        None => once(&a),
        Some(secs) => watch(&a, Duration::from_secs(secs)),
    }
}

fn once(a: &StatusArgs) -> Result<ExitCode> {
    let snap = gather(a);
    let rows = snap.rows(None);
    let mut out = std::io::stdout().lock();
    if a.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&document(&snap, &rows))?
        )?;
    } else {
        out.write_all(screen(&snap, &rows).as_bytes())?;
    }
    out.flush()?;
    if snap.answered() {
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("tidemark: {}", nothing_answered(&snap));
    Ok(ExitCode::FAILURE)
}

/// Says that no source answered, and what was asked.
fn nothing_answered(snap: &Snapshot) -> String {
    let mut asked = format!(
        "no tracker at {} and no shipper status in {}",
        snap.tracker_control.display(),
        snap.log_dir.display()
    );
    if let Some((dir, _)) = &snap.receiver {
        asked.push_str(&format!(" nor receiver data in {}", dir.display()));
    }
    format!(
        "nothing answered: {asked}; give --tracker-control, --log-dir or --data-dir if they are elsewhere"
    )
}

/// The record bytes shipped at one look, for THROUGHPUT between two.
struct RecordSample {
    host: String,
    group: String,
    record_bytes: u64,
    at: Instant,
}

fn watch(a: &StatusArgs, every: Duration) -> Result<ExitCode> {
    let mut bars = (!a.json && std::io::stdout().is_terminal()).then(SyncBars::new);
    let mut previous: Option<RecordSample> = None;
    loop {
        let snap = gather(a);
        let sample = snap.shipper.as_ref().ok().map(|s| RecordSample {
            host: s.host.clone(),
            group: s.group.clone(),
            record_bytes: s.record_bytes,
            at: Instant::now(),
        });
        let rate = match (&previous, &sample) {
            (Some(p), Some(c)) if p.host == c.host && p.group == c.group => {
                record_rate(p.record_bytes, c.record_bytes, c.at.duration_since(p.at))
            }
            _ => None,
        };
        previous = sample;
        let rows = snap.rows(rate);
        if a.json {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", document(&snap, &rows))?;
            out.flush()?;
        } else if let Some(bars) = &mut bars {
            let header = format!(
                "tidemark status at {} UTC, every {}s (Ctrl-C to stop)\n\n",
                clock(snap.now_ns),
                every.as_secs()
            );
            bars.show(&(header + &screen(&snap, &rows)), &rows)?;
        } else {
            let mut out = std::io::stdout().lock();
            for line in plain_lines(&snap, &rows) {
                writeln!(out, "{line}")?;
            }
            out.flush()?;
        }
        std::thread::sleep(every);
    }
}

/// Bytes per second between two samples of a counter; `None` when the
/// counter went back (the shipper restarted) or no time passed.
fn record_rate(before: u64, after: u64, elapsed: Duration) -> Option<u64> {
    let secs = elapsed.as_secs_f64();
    (after >= before && secs > 0.0).then(|| ((after - before) as f64 / secs) as u64)
}

// ---------------------------------------------------------------- asking

fn gather(a: &StatusArgs) -> Snapshot {
    Snapshot {
        now_ns: tidemark_changelog::now_ns(),
        tracker_control: a.tracker_control.clone(),
        log_dir: a.log_dir.clone(),
        tracker: ask_tracker(&a.tracker_control),
        shipper: ask_shipper(&a.log_dir),
        receiver: match (&a.config, &a.data_dir) {
            (Some(config), _) => Some(read_configured_replicas(config)),
            (None, Some(dir)) => Some((dir.clone(), read_replicas(dir))),
            (None, None) => None,
        },
    }
}

/// The replicas of the receiver configured in `config`: its store's
/// groups (every group in the cluster for the Ceph store) with their
/// owners, and what the receiver on this node finds degraded.
fn read_configured_replicas(config: &Path) -> (PathBuf, Result<Vec<ReplicaSummary>, NoAnswer>) {
    let cfg = match crate::points_cmd::StoreArgs::of_config(config).receiver() {
        Ok(c) => c,
        Err(e) => {
            let no = NoAnswer {
                verdict: "unreadable",
                reason: format!("{}: {e:#}", config.display()),
            };
            return (config.to_path_buf(), Err(no));
        }
    };
    let dir = cfg.data_dir.clone();
    if cfg.store.kind == tidemark_config::StoreKind::Local {
        let replicas = read_replicas(&dir);
        return (dir, replicas);
    }
    // The receiver on this node (if it runs) says which groups it finds
    // degraded; a file it cannot read is no reason to hide the rest.
    let degraded = tidemark_receiver::store_health::read(&dir).unwrap_or_default();
    // A cluster that does not answer still shows what the receiver here
    // finds degraded.
    let unreachable = |verdict: &'static str, reason: String| {
        if degraded.is_empty() {
            return Err(NoAnswer { verdict, reason });
        }
        Ok(degraded
            .iter()
            .map(|d| ReplicaSummary {
                host: d.host.clone(),
                group: d.group.clone(),
                state: "unreadable",
                resync_pending: 0,
                points: 0,
                newest: None,
                history_bytes: 0,
                error: Some(reason.clone()),
                owner: None,
                degraded: Some(d.degraded.reason.clone()),
            })
            .collect())
    };
    let engine = match tidemark_receiver::store::open_engine(&cfg, "tidemark status") {
        Ok(e) => e,
        Err(e) => {
            let reason = format!("{:#}", anyhow::Error::new(e));
            return (dir, unreachable("not reachable", reason));
        }
    };
    let groups = match engine.all_groups() {
        Ok(g) => g,
        Err(e) => {
            let reason = format!("{:#}", anyhow::Error::new(e));
            return (dir, unreachable("unreadable", reason));
        }
    };
    let replicas = groups
        .iter()
        .map(|(host, group)| {
            let mut summary = summarise_store_replica(engine.as_ref(), host, group);
            summary.degraded = degraded
                .iter()
                .find(|d| d.host == host.as_str() && d.group == group.as_str())
                .map(|d| d.degraded.reason.clone());
            summary
        })
        .collect();
    (dir, Ok(replicas))
}

/// One group of a store engine, as [`summarise_replica`] reads a local one.
fn summarise_store_replica(
    engine: &dyn tidemark_receiver::store::StoreEngine,
    host: &tidemark_names::Name,
    group: &tidemark_names::Name,
) -> ReplicaSummary {
    let mut summary = summarise_opened(
        host.as_str(),
        group.as_str(),
        engine.open_read_only(host, group),
    );
    match engine.owner_of(host, group) {
        Ok(owner) => summary.owner = owner,
        Err(e) => {
            summary.error.get_or_insert_with(|| e.to_string());
        }
    }
    summary
}

fn ask_tracker(control: &Path) -> Result<TrackerStatus, NoAnswer> {
    tidemark_control::status(control, std::time::Duration::from_secs(5))
        .map_err(|e| tracker_no_answer(control, e))
}

/// What a failed status request says on the screen.
fn tracker_no_answer(control: &Path, e: tidemark_control::ControlError) -> NoAnswer {
    use tidemark_control::ControlError;
    let verdict = match &e {
        // No socket, or a socket nobody listens on: the tracker is not
        // running. Anything else (permissions, a hung tracker) is worth
        // telling apart.
        e if e.not_running() => "not running",
        ControlError::Unreachable { .. } | ControlError::NotStopped(_) => "not reachable",
        ControlError::Refused(_) => "refused",
        ControlError::BadReply { .. } => "unreadable",
    };
    let reason = match e {
        ControlError::Refused(why) => why,
        ControlError::Unreachable { source, .. } => format!("{}: {source}", control.display()),
        e => e.to_string(),
    };
    NoAnswer { verdict, reason }
}

fn ask_shipper(log_dir: &Path) -> Result<ShipperStatus, NoAnswer> {
    tidemark_shipper::status::read_status(log_dir).map_err(|e| NoAnswer {
        // While there is no status file no shipper has run on this log
        // directory.
        verdict: match e {
            tidemark_shipper::status::StatusReadError::Missing { .. } => "not running",
            _ => "unreadable",
        },
        reason: e.to_string(),
    })
}

/// Every `<host>/<group>` replica under a receiver's data directory,
/// sorted; a replica that cannot be read is listed with its error.
fn read_replicas(data_dir: &Path) -> Result<Vec<ReplicaSummary>, NoAnswer> {
    let unreadable = |e: std::io::Error| NoAnswer {
        verdict: "unreadable",
        reason: format!("{}: {e}", data_dir.display()),
    };
    let mut replicas = Vec::new();
    for host in std::fs::read_dir(data_dir).map_err(unreadable)? {
        let host = host.map_err(unreadable)?;
        if !host.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        // A host directory we cannot list is skipped, not fatal: the
        // others are still worth showing.
        let Ok(groups) = std::fs::read_dir(host.path()) else {
            continue;
        };
        for group in groups.flatten() {
            let dir = group.path();
            if dir.join("state").exists() {
                replicas.push(summarise_replica(
                    &host.file_name().to_string_lossy(),
                    &group.file_name().to_string_lossy(),
                    &dir,
                ));
            }
        }
    }
    replicas.sort_by(|a, b| (&a.host, &a.group).cmp(&(&b.host, &b.group)));
    Ok(replicas)
}

fn summarise_replica(host: &str, group: &str, dir: &Path) -> ReplicaSummary {
    summarise_opened(host, group, LocalEngine::open_dir_read_only(dir))
}

/// A replica's summary from its read-only open (or why it failed).
fn summarise_opened(
    host: &str,
    group: &str,
    opened: Result<
        std::sync::Arc<dyn tidemark_receiver::store::ReplicaStore>,
        tidemark_receiver::store::StoreError,
    >,
) -> ReplicaSummary {
    let mut summary = ReplicaSummary {
        host: host.to_string(),
        group: group.to_string(),
        state: "unreadable",
        resync_pending: 0,
        points: 0,
        newest: None,
        history_bytes: 0,
        error: None,
        owner: None,
        degraded: None,
    };
    match opened {
        Ok(g) => {
            let points = g.points();
            (summary.state, summary.resync_pending) = match g.position().state {
                GroupState::InitialSync => ("initial-sync", 0),
                GroupState::Consistent => ("consistent", 0),
                GroupState::Resyncing { pending } => ("resyncing", pending.len()),
            };
            summary.points = points.len();
            summary.newest = points.last().map(|p| Point {
                seq: p.seq,
                timestamp_ns: p.timestamp_ns,
            });
            summary.history_bytes = g.history_bytes();
        }
        Err(e) => summary.error = Some(e.to_string()),
    }
    summary
}

// ---------------------------------------------------------------- rows

/// One row per disk: the tracker's disks, then any the shipper announced
/// that the tracker did not; the shipper's group-wide state goes on every
/// row of its group. A shipper that has not announced its disks yet still
/// gets a row (disk `-`), so its state shows.
fn disk_rows(
    tracker: Option<&TrackerStatus>,
    shipper: Option<&ShipperStatus>,
    replicas: &[ReplicaSummary],
    record_rate: Option<u64>,
    now_ns: u64,
) -> Vec<DiskRow> {
    let mut rows: Vec<DiskRow> = Vec::new();
    if let Some(t) = tracker {
        for d in &t.disks {
            let mut row = DiskRow::new(&t.group, &d.name);
            row.tracking = Some(d.tracking.name().to_string());
            rows.push(row);
        }
    }
    let Some(s) = shipper else {
        return rows;
    };
    for p in &s.disks {
        if !rows.iter().any(|r| r.group == s.group && r.disk == p.name) {
            rows.push(DiskRow::new(&s.group, &p.name));
        }
    }
    if !rows.iter().any(|r| r.group == s.group) {
        rows.push(DiskRow::new(&s.group, "-"));
    }
    let newest_point = replicas
        .iter()
        .find(|r| r.host == s.host && r.group == s.group)
        .map_or(NewestPoint::Unknown, |r| {
            r.newest.map_or(NewestPoint::NoPoint, NewestPoint::At)
        });
    for row in rows.iter_mut().filter(|r| r.group == s.group) {
        row.host = Some(s.host.clone());
        row.replication = Some(s.state);
        row.lag_seconds = Some(s.lag_seconds(now_ns));
        row.pending_records = Some(s.pending_records());
        row.last_error = s.reason.clone();
        row.newest_point = newest_point;
        row.sync = s
            .disks
            .iter()
            .find(|p| p.name == row.disk && s.state == State::InitialSync && p.synced < p.size)
            .cloned();
        row.throughput = match &row.sync {
            // A rate of 0 is one the shipper has not measured yet.
            Some(p) => (p.rate_bytes_per_sec > 0)
                .then_some((p.rate_bytes_per_sec, ThroughputKind::InitialSync)),
            None => record_rate.map(|r| (r, ThroughputKind::Records)),
        };
        row.resync_blocks = (s.state == State::Resyncing)
            .then_some((s.resync_blocks_compared, s.resync_blocks_sent));
    }
    rows
}

fn state_name(s: State) -> &'static str {
    s.name()
}

/// `tracking/replication`, `-` for what is not known: `data/protected`.
fn state_label(tracking: Option<&str>, replication: Option<State>) -> String {
    format!(
        "{}/{}",
        tracking.unwrap_or("-"),
        replication.map_or("-", state_name)
    )
}

// ---------------------------------------------------------------- formatting

/// Sizes in binary units: `512 B`, `3.2 MiB`, `120 MiB`.
fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ if v < 10.0 => format!("{v:.1} {}", UNITS[unit]),
        _ => format!("{v:.0} {}", UNITS[unit]),
    }
}

/// `120 MiB/s`.
fn fmt_rate(bytes_per_sec: u64) -> String {
    format!("{}/s", fmt_bytes(bytes_per_sec))
}

/// A replication lag: tenths of a second while it is small.
fn fmt_lag(secs: f64) -> String {
    if secs < 10.0 {
        format!("{secs:.1}s")
    } else {
        timefmt::age(secs as u64)
    }
}

/// Time left: `35s`, `4m05s`, `2h10m`.
fn fmt_eta(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs / 60) % 60),
    }
}

/// Whole per cent of `part` in `whole` (100 for an empty disk).
fn percent(part: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 100;
    }
    (u128::from(part.min(whole)) * 100 / u128::from(whole)) as u64
}

/// `HH:MM:SS` (UTC) of `now_ns`.
fn clock(now_ns: u64) -> String {
    timefmt::utc(now_ns)[11..19].to_string()
}

/// Text from a daemon (an error message) on one line of a table.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Columns padded to their widest cell, two spaces apart; the last column
/// is not padded (no trailing blanks).
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn source_line(name: &str, answer: Result<String, &NoAnswer>) -> String {
    match answer {
        Ok(summary) => format!("{name:<9} {summary}"),
        Err(e) => format!("{name:<9} {} ({})", e.verdict, one_line(&e.reason)),
    }
}

fn tracker_summary(t: &TrackerStatus) -> String {
    let reason = t
        .bitmap_reason
        .as_deref()
        .map(|r| format!(" ({})", one_line(r)))
        .unwrap_or_default();
    format!(
        "group {}, tracking {}{reason}, generation {}, log {} of {}",
        t.group,
        t.tracking,
        t.generation,
        fmt_bytes(t.log_bytes),
        fmt_bytes(t.log_limit)
    )
}

fn shipper_summary(s: &ShipperStatus, now_ns: u64) -> String {
    let written = (now_ns / 1_000_000_000).saturating_sub(s.updated_unix);
    format!(
        "{}/{} {}, durable seq {} of {}, status written {} ago",
        s.host,
        s.group,
        state_name(s.state),
        s.durable_seq,
        s.log_seq,
        timefmt::age(written)
    )
}

/// The whole screen: a line per source, the disks, the replicas.
fn screen(snap: &Snapshot, rows: &[DiskRow]) -> String {
    let mut out = String::new();
    out.push_str(&source_line(
        "tracker:",
        snap.tracker.as_ref().map(tracker_summary),
    ));
    out.push('\n');
    out.push_str(&source_line(
        "shipper:",
        snap.shipper
            .as_ref()
            .map(|s| shipper_summary(s, snap.now_ns)),
    ));
    out.push('\n');
    if let Some((dir, replicas)) = &snap.receiver {
        out.push_str(&source_line(
            "receiver:",
            replicas.as_ref().map(|r| {
                format!(
                    "{}: {} replica{}",
                    dir.display(),
                    r.len(),
                    if r.len() == 1 { "" } else { "s" }
                )
            }),
        ));
        out.push('\n');
    }
    out.push('\n');
    if rows.is_empty() {
        out.push_str("no protected disk known on this machine\n");
    } else {
        out.push_str(&disk_table(rows, snap.now_ns));
    }
    let replicas = snap.replicas();
    if !replicas.is_empty() {
        out.push('\n');
        out.push_str(&replica_table(replicas, snap.now_ns));
    }
    out
}

fn point_age(p: Point, now_ns: u64) -> String {
    format!(
        "{} ago",
        timefmt::age(now_ns.saturating_sub(p.timestamp_ns) / 1_000_000_000)
    )
}

fn disk_table(rows: &[DiskRow], now_ns: u64) -> String {
    let dash = || "-".to_string();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.host.clone().unwrap_or_else(dash),
                r.group.clone(),
                r.disk.clone(),
                r.state(),
                r.lag_seconds.map_or_else(dash, fmt_lag),
                r.pending_records.map_or_else(dash, |n| n.to_string()),
                r.throughput.map_or_else(dash, |(bps, _)| fmt_rate(bps)),
                match r.newest_point {
                    NewestPoint::Unknown => dash(),
                    NewestPoint::NoPoint => "none yet".to_string(),
                    NewestPoint::At(p) => point_age(p, now_ns),
                },
                r.last_error.as_deref().map_or_else(dash, one_line),
            ]
        })
        .collect();
    columns(
        &[
            "HOST",
            "GROUP",
            "DISK",
            "STATE",
            "LAG",
            "PENDING",
            "THROUGHPUT",
            "NEWEST POINT",
            "LAST ERROR",
        ],
        &cells,
    )
}

fn replica_table(replicas: &[ReplicaSummary], now_ns: u64) -> String {
    // A store shared between receivers: who applies each group.
    let shared = replicas.iter().any(|r| r.owner.is_some());
    let cells: Vec<Vec<String>> = replicas
        .iter()
        .map(|r| {
            let mut state = match (&r.error, r.state) {
                (Some(e), _) => format!("unreadable ({})", one_line(e)),
                (None, "resyncing") => format!("resyncing ({} extents)", r.resync_pending),
                (None, s) => s.to_string(),
            };
            if let Some(why) = &r.degraded {
                state = format!("degraded ({}), {state}", one_line(why));
            }
            let mut row = vec![
                r.host.clone(),
                r.group.clone(),
                r.points.to_string(),
                r.newest
                    .map_or_else(|| "none yet".to_string(), |p| point_age(p, now_ns)),
                fmt_bytes(r.history_bytes),
            ];
            if shared {
                let owner = r.owner.clone().unwrap_or_default();
                row.push(owner.owner.clone().unwrap_or_else(|| "-".into()));
                row.push(lease_label(&owner, now_ns));
            }
            row.push(state);
            row
        })
        .collect();
    let mut header = vec!["HOST", "GROUP", "POINTS", "NEWEST POINT", "HISTORY"];
    if shared {
        header.extend(["OWNER", "LEASE"]);
    }
    header.push("STATE");
    format!("REPLICAS\n{}", columns(&header, &cells))
}

/// `held for 3m` (a receiver renews it), or `free` (its owner stopped or
/// died: the next receiver a shipper reaches takes the group).
fn lease_label(owner: &tidemark_receiver::store::GroupOwner, now_ns: u64) -> String {
    match (owner.held, owner.since_ns) {
        (true, Some(since)) => format!(
            "held for {}",
            timefmt::age(now_ns.saturating_sub(since) / 1_000_000_000)
        ),
        (true, None) => "held".into(),
        (false, _) => "free".into(),
    }
}

/// One line for a disk at a refresh of a plain (not a terminal) --watch:
/// `12:00:01 db1/default/disk0 initial-sync 43% 120 MiB/s ETA 35s`.
fn progress_line(clock: &str, row: &DiskRow) -> String {
    let name = row.path();
    if let Some(p) = &row.sync {
        let pct = percent(p.synced, p.size);
        if p.rate_bytes_per_sec == 0 {
            return format!("{clock} {name} initial-sync {pct}% (rate not known yet)");
        }
        let eta = p
            .eta_seconds
            .map(|s| format!(" ETA {}", fmt_eta(s)))
            .unwrap_or_default();
        return format!(
            "{clock} {name} initial-sync {pct}% {}{eta}",
            fmt_rate(p.rate_bytes_per_sec)
        );
    }
    let mut line = format!("{clock} {name} {}", row.state());
    if let Some((compared, sent)) = row.resync_blocks {
        line.push_str(&format!(" ({compared} blocks compared, {sent} sent)"));
    }
    if let Some(lag) = row.lag_seconds {
        line.push_str(&format!(" lag {}", fmt_lag(lag)));
    }
    if let Some(n) = row.pending_records {
        line.push_str(&format!(" pending {n}"));
    }
    if let Some((bps, _)) = row.throughput {
        line.push_str(&format!(" {}", fmt_rate(bps)));
    }
    if let Some(e) = &row.last_error {
        line.push_str(&format!(" last error: {}", one_line(e)));
    }
    line
}

/// The lines of one plain --watch refresh: a line per source that did not
/// answer, then one per disk.
fn plain_lines(snap: &Snapshot, rows: &[DiskRow]) -> Vec<String> {
    let clock = clock(snap.now_ns);
    let mut lines = Vec::new();
    let mut silent = |name: &str, e: &NoAnswer| {
        lines.push(format!(
            "{clock} {name}: {} ({})",
            e.verdict,
            one_line(&e.reason)
        ));
    };
    if let Err(e) = &snap.tracker {
        silent("tracker", e);
    }
    if let Err(e) = &snap.shipper {
        silent("shipper", e);
    }
    if let Some((_, Err(e))) = &snap.receiver {
        silent("receiver", e);
    }
    lines.extend(rows.iter().map(|r| progress_line(&clock, r)));
    lines
}

// ---------------------------------------------------------------- JSON

fn point_json(p: Point, now_ns: u64) -> Value {
    json!({
        "seq": p.seq,
        "time": timefmt::utc(p.timestamp_ns),
        "timestamp_ns": p.timestamp_ns,
        "age_seconds": now_ns.saturating_sub(p.timestamp_ns) as f64 / 1e9,
    })
}

fn no_answer_json(e: &NoAnswer) -> Value {
    json!({"answered": false, "verdict": e.verdict, "error": e.reason})
}

fn disk_json(r: &DiskRow, now_ns: u64) -> Value {
    json!({
        "host": r.host,
        "group": r.group,
        "disk": r.disk,
        "tracking": r.tracking,
        "replication": r.replication,
        "state": r.state(),
        "lag_seconds": r.lag_seconds,
        "pending_records": r.pending_records,
        "throughput_bytes_per_sec": r.throughput.map(|(bps, _)| bps),
        "throughput_source": r.throughput.map(|(_, kind)| match kind {
            ThroughputKind::InitialSync => "initial-sync",
            ThroughputKind::Records => "records",
        }),
        // null unless a recovery point is known (see "replicas" for why).
        "newest_point": match r.newest_point {
            NewestPoint::At(p) => point_json(p, now_ns),
            NewestPoint::Unknown | NewestPoint::NoPoint => Value::Null,
        },
        "last_error": r.last_error,
        "initial_sync": r.sync.as_ref().map(|p| json!({
            "synced": p.synced,
            "size": p.size,
            "percent": percent(p.synced, p.size),
            "rate_bytes_per_sec": p.rate_bytes_per_sec,
            "eta_seconds": p.eta_seconds,
        })),
        "resync": r.resync_blocks.map(|(compared, sent)| json!({
            "blocks_compared": compared,
            "blocks_sent": sent,
        })),
    })
}

fn replica_json(r: &ReplicaSummary, now_ns: u64) -> Value {
    json!({
        "host": r.host,
        "group": r.group,
        "state": r.state,
        "resync_pending_extents": r.resync_pending,
        "points": r.points,
        "newest_point": r.newest.map(|p| point_json(p, now_ns)),
        "history_bytes": r.history_bytes,
        "error": r.error,
        "owner": r.owner.as_ref().map(|o| json!({
            "address": o.owner,
            "lease_held": o.held,
            "since": o.since_ns.map(timefmt::utc),
            "age_seconds": o.since_ns.map(|s| snap_age(now_ns, s)),
        })),
        "degraded": r.degraded.is_some(),
        "degraded_reason": r.degraded,
    })
}

/// Seconds from `then_ns` to `now_ns`.
fn snap_age(now_ns: u64, then_ns: u64) -> u64 {
    now_ns.saturating_sub(then_ns) / 1_000_000_000
}

/// The same data as [`screen`], as one JSON document.
fn document(snap: &Snapshot, rows: &[DiskRow]) -> Value {
    let tracker = match &snap.tracker {
        Ok(t) => json!({"answered": true, "status": t}),
        Err(e) => no_answer_json(e),
    };
    let shipper = match &snap.shipper {
        Ok(s) => json!({
            "answered": true,
            "status": s,
            "status_age_seconds": (snap.now_ns / 1_000_000_000).saturating_sub(s.updated_unix),
        }),
        Err(e) => no_answer_json(e),
    };
    let receiver = match &snap.receiver {
        None => Value::Null,
        Some((dir, Ok(_))) => json!({"answered": true, "data_dir": dir}),
        Some((dir, Err(e))) => {
            let mut v = no_answer_json(e);
            v["data_dir"] = json!(dir);
            v
        }
    };
    let mut tracker = tracker;
    tracker["control_socket"] = json!(snap.tracker_control);
    let mut shipper = shipper;
    shipper["log_dir"] = json!(snap.log_dir);
    json!({
        "time": timefmt::utc(snap.now_ns),
        "answered": snap.answered(),
        "tracker": tracker,
        "shipper": shipper,
        "receiver": receiver,
        "disks": rows.iter().map(|r| disk_json(r, snap.now_ns)).collect::<Vec<_>>(),
        "replicas": snap.replicas().iter().map(|r| replica_json(r, snap.now_ns)).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------- terminal

/// The --watch screen on a terminal: the table redrawn from the top at each
/// refresh, with a progress bar under it for every disk in initial sync and
/// a spinner for every group that resyncs (the shipper knows no resync
/// total, so there is no bar to fill).
struct SyncBars {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
}

impl SyncBars {
    fn new() -> SyncBars {
        SyncBars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stdout()),
            bars: HashMap::new(),
        }
    }

    fn bar(&mut self, key: &str, make: impl FnOnce() -> ProgressBar) -> ProgressBar {
        let multi = &self.multi;
        self.bars
            .entry(key.to_string())
            .or_insert_with(|| multi.add(make()))
            .clone()
    }

    fn show(&mut self, screen: &str, rows: &[DiskRow]) -> std::io::Result<()> {
        self.multi.suspend(|| {
            let mut out = std::io::stdout().lock();
            // Home the cursor and clear the screen: the table replaces the
            // last one instead of scrolling.
            out.write_all(b"\x1b[H\x1b[2J")?;
            out.write_all(screen.as_bytes())?;
            out.write_all(b"\n")?;
            out.flush()
        })?;
        let mut shown = HashSet::new();
        for row in rows {
            if let Some(p) = &row.sync {
                let key = format!("sync {}", row.path());
                let bar = self.bar(&key, || {
                    let style = ProgressStyle::with_template(
                        "{prefix} {percent:>3}% [{wide_bar}] {binary_bytes}/{binary_total_bytes} {msg}",
                    )
                    .map_or_else(|_| ProgressStyle::default_bar(), |s| s.progress_chars("=> "));
                    let bar = ProgressBar::new(p.size).with_style(style);
                    bar.set_prefix(format!("{} initial sync", row.path()));
                    bar
                });
                bar.set_length(p.size);
                bar.set_position(p.synced);
                bar.set_message(match (p.rate_bytes_per_sec, p.eta_seconds) {
                    (0, _) => "rate not known yet".to_string(),
                    (bps, Some(eta)) => format!("{} ETA {}", fmt_rate(bps), fmt_eta(eta)),
                    (bps, None) => fmt_rate(bps),
                });
                shown.insert(key);
            } else if let Some((compared, sent)) = row.resync_blocks {
                let key = format!(
                    "resync {}/{}",
                    row.host.as_deref().unwrap_or("-"),
                    row.group
                );
                let bar = self.bar(&key, || {
                    let style = ProgressStyle::with_template("{spinner} {prefix} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner());
                    let bar = ProgressBar::new_spinner().with_style(style);
                    bar.set_prefix(format!(
                        "{}/{} resync",
                        row.host.as_deref().unwrap_or("-"),
                        row.group
                    ));
                    bar
                });
                bar.set_message(format!("{compared} blocks compared, {sent} sent"));
                bar.tick();
                shown.insert(key);
            }
        }
        let multi = &self.multi;
        self.bars.retain(|key, bar| {
            let keep = shown.contains(key);
            if !keep {
                bar.finish_and_clear();
                multi.remove(bar);
            }
            keep
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const S: u64 = 1_000_000_000;
    /// 2026-11-23T12:00:01Z.
    const NOW: u64 = 1_795_435_201 * S;

    fn tracker() -> TrackerStatus {
        serde_json::from_value(json!({
                "group": "default",
                "tracking": "data",
                "bitmap_reason": null,
                "generation": 3,
                "next_seq": 101,
                "durable_seq": 100,
                "log_bytes": 3 << 20,
                "log_limit": 8u64 << 30,
                "writes": 50,
                "barriers": 7,
                "disks": [
                    {"name": "disk0", "tracking": "data", "hot_extents": 2, "dirty_extents": 0},
                    {"name": "disk1", "tracking": "data", "hot_extents": 0, "dirty_extents": 0}
                ]
        }))
        .unwrap()
    }

    fn progress(name: &str, size: u64, synced: u64, rate: u64, eta: Option<u64>) -> DiskProgress {
        DiskProgress {
            name: name.into(),
            size,
            synced,
            data_bytes: synced,
            rate_bytes_per_sec: rate,
            eta_seconds: eta,
        }
    }

    fn shipper(state: State) -> ShipperStatus {
        ShipperStatus {
            format: tidemark_shipper::status::STATUS_FORMAT,
            host: "db1".into(),
            group: "default".into(),
            state,
            reason: None,
            durable_seq: tidemark_changelog::Seq(90),
            sent_seq: tidemark_changelog::Seq(95),
            log_seq: tidemark_changelog::Seq(100),
            retries: 0,
            wire_bytes: 0,
            record_bytes: 0,
            disks: vec![
                progress("disk0", 100 << 20, 43 << 20, 120 << 20, Some(35)),
                progress("disk1", 1 << 30, 1 << 30, 0, Some(0)),
            ],
            resync_blocks_compared: 0,
            resync_blocks_sent: 0,
            resync_bytes_sent: 0,
            updated_unix: NOW / S - 1,
            retries_total: 0,
            last_error_class: None,
            oldest_unacked_ns: Some(NOW - 2_500_000_000),
            rpo_target_seconds: 300.0,
            protocol_version: Some(2),
            receiver_software: None,
            peer_timeouts_total: 0,
            vm_spec: None,
        }
    }

    fn replica(points: &[(u64, u64)]) -> ReplicaSummary {
        ReplicaSummary {
            host: "db1".into(),
            group: "default".into(),
            state: "consistent",
            resync_pending: 0,
            points: points.len(),
            newest: points.last().map(|&(seq, timestamp_ns)| Point {
                seq: tidemark_changelog::Seq(seq),
                timestamp_ns,
            }),
            history_bytes: 5 << 20,
            error: None,
            owner: None,
            degraded: None,
        }
    }

    fn snapshot(
        tracker: Result<TrackerStatus, NoAnswer>,
        shipper: Result<ShipperStatus, NoAnswer>,
    ) -> Snapshot {
        Snapshot {
            now_ns: NOW,
            tracker_control: "/run/tidemark/tracker.ctl".into(),
            log_dir: "/var/lib/tidemark/log".into(),
            tracker,
            shipper,
            receiver: None,
        }
    }

    fn not_running() -> NoAnswer {
        NoAnswer {
            verdict: "not running",
            reason: "/run/tidemark/tracker.ctl: No such file or directory".into(),
        }
    }

    #[test]
    fn the_tracker_reply_is_read_and_a_refusal_is_not_an_answer() {
        let t = tracker();
        assert_eq!(t.group, "default");
        assert_eq!(t.tracking, tidemark_control::Tracking::Data);
        assert_eq!(t.disks.len(), 2);
        assert_eq!(t.disks[0].hot_extents, 2);
        let control = Path::new("/run/tidemark/tracker.ctl");
        let refused = tracker_no_answer(
            control,
            tidemark_control::ControlError::Refused("busy".into()),
        );
        assert_eq!(
            (refused.verdict, refused.reason.as_str()),
            ("refused", "busy")
        );
        let nonsense = tracker_no_answer(
            control,
            tidemark_control::ControlError::BadReply {
                path: control.into(),
                reason: "its \"status\": invalid type".into(),
            },
        );
        assert_eq!(nonsense.verdict, "unreadable");
        let absent = tracker_no_answer(
            control,
            tidemark_control::ControlError::Unreachable {
                path: control.into(),
                source: std::io::ErrorKind::NotFound.into(),
            },
        );
        assert_eq!(absent.verdict, "not running");
    }

    #[test]
    fn rows_join_the_tracker_the_shipper_and_the_replica() {
        let t = tracker();
        let s = shipper(State::InitialSync);
        let r = [replica(&[(40, NOW - 90 * S), (80, NOW - 12 * S)])];
        let rows = disk_rows(Some(&t), Some(&s), &r, Some(4 << 20), NOW);
        assert_eq!(rows.len(), 2);
        let (d0, d1) = (&rows[0], &rows[1]);
        assert_eq!(d0.path(), "db1/default/disk0");
        assert_eq!(d0.state(), "data/initial-sync");
        assert_eq!(d0.lag_seconds, Some(2.5));
        assert_eq!(d0.pending_records, Some(10));
        // Still syncing: its own sync rate; done: the group's record rate.
        assert_eq!(
            d0.throughput,
            Some((120 << 20, ThroughputKind::InitialSync))
        );
        assert!(d0.sync.is_some());
        assert_eq!(d1.throughput, Some((4 << 20, ThroughputKind::Records)));
        assert_eq!(d1.sync, None);
        assert_eq!(
            d0.newest_point,
            NewestPoint::At(Point {
                seq: tidemark_changelog::Seq(80),
                timestamp_ns: NOW - 12 * S
            })
        );
        // A single look has no record rate.
        let rows = disk_rows(Some(&t), Some(&s), &[], None, NOW);
        assert_eq!(rows[1].throughput, None);
        assert_eq!(rows[0].newest_point, NewestPoint::Unknown);
        // A replica without points yet.
        let rows = disk_rows(Some(&t), Some(&s), &[replica(&[])], None, NOW);
        assert_eq!(rows[0].newest_point, NewestPoint::NoPoint);
    }

    #[test]
    fn rows_show_what_one_source_alone_knows() {
        let rows = disk_rows(Some(&tracker()), None, &[], None, NOW);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].path(), "-/default/disk0");
        assert_eq!(rows[0].state(), "data/-");
        assert_eq!(rows[0].lag_seconds, None);

        // A shipper still connecting has announced no disk: one row.
        let mut s = shipper(State::Connecting);
        s.disks.clear();
        s.reason = Some("connection refused\nby 127.0.0.1".into());
        let rows = disk_rows(None, Some(&s), &[], None, NOW);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].path(), "db1/default/-");
        assert_eq!(rows[0].state(), "-/connecting");
        assert_eq!(
            rows[0].last_error.as_deref(),
            Some("connection refused\nby 127.0.0.1")
        );

        // Resyncing: the group's block counts go on the rows.
        let mut s = shipper(State::Resyncing);
        s.resync_blocks_compared = 1200;
        s.resync_blocks_sent = 35;
        let rows = disk_rows(Some(&tracker()), Some(&s), &[], None, NOW);
        assert_eq!(rows[0].resync_blocks, Some((1200, 35)));
        assert_eq!(rows[0].sync, None, "not in initial sync");
    }

    #[test]
    fn sizes_rates_lags_and_times_read_well() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 << 20 | 200 << 10), "3.2 MiB");
        assert_eq!(fmt_bytes(8 << 30), "8.0 GiB");
        assert_eq!(fmt_rate(120 << 20), "120 MiB/s");
        assert_eq!(fmt_rate(0), "0 B/s");
        assert_eq!(fmt_lag(0.0), "0.0s");
        assert_eq!(fmt_lag(2.46), "2.5s");
        assert_eq!(fmt_lag(600.0), "10m");
        assert_eq!(fmt_eta(35), "35s");
        assert_eq!(fmt_eta(245), "4m05s");
        assert_eq!(fmt_eta(7800), "2h10m");
        assert_eq!(percent(43, 100), 43);
        assert_eq!(percent(0, 0), 100);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
        assert_eq!(clock(NOW), "12:00:01");
        assert_eq!(
            state_label(Some("bitmap"), Some(State::Critical)),
            "bitmap/critical"
        );
    }

    #[test]
    fn the_record_rate_needs_two_samples_of_one_shipper_run() {
        assert_eq!(
            record_rate(0, 10 << 20, Duration::from_secs(2)),
            Some(5 << 20)
        );
        assert_eq!(record_rate(10, 10, Duration::from_secs(2)), Some(0));
        assert_eq!(
            record_rate(10 << 20, 5, Duration::from_secs(2)),
            None,
            "restarted"
        );
        assert_eq!(record_rate(0, 5, Duration::ZERO), None);
    }

    #[test]
    fn the_plain_progress_line() {
        let s = shipper(State::InitialSync);
        let rows = disk_rows(Some(&tracker()), Some(&s), &[], Some(3 << 20), NOW);
        assert_eq!(
            progress_line("12:00:01", &rows[0]),
            "12:00:01 db1/default/disk0 initial-sync 43% 120 MiB/s ETA 35s"
        );
        assert_eq!(
            progress_line("12:00:01", &rows[1]),
            "12:00:01 db1/default/disk1 data/initial-sync lag 2.5s pending 10 3.0 MiB/s"
        );
        let mut fresh = rows[0].clone();
        fresh.sync.as_mut().unwrap().rate_bytes_per_sec = 0;
        assert_eq!(
            progress_line("12:00:01", &fresh),
            "12:00:01 db1/default/disk0 initial-sync 43% (rate not known yet)"
        );
        let mut failing = rows[1].clone();
        failing.last_error = Some("receiver busy".into());
        assert!(progress_line("x", &failing).ends_with(" last error: receiver busy"));

        let snap = snapshot(Err(not_running()), Ok(s));
        let rows = snap.rows(None);
        let lines = plain_lines(&snap, &rows);
        assert_eq!(
            lines[0],
            "12:00:01 tracker: not running (/run/tidemark/tracker.ctl: No such file or directory)"
        );
        assert_eq!(lines.len(), 3);
    }

    #[test]
    fn the_screen_names_each_source_and_aligns_the_table() {
        let mut s = shipper(State::Protected);
        s.disks[0].synced = s.disks[0].size;
        s.reason = Some("lost the connection\n(timeout)".into());
        let mut snap = snapshot(Ok(tracker()), Ok(s));
        snap.receiver = Some((
            "/srv/replicas".into(),
            Ok(vec![replica(&[(80, NOW - 12 * S)])]),
        ));
        let rows = snap.rows(None);
        let text = screen(&snap, &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "tracker:  group default, tracking data, generation 3, log 3.0 MiB of 8.0 GiB"
        );
        assert_eq!(
            lines[1],
            "shipper:  db1/default protected, durable seq 90 of 100, status written 1s ago"
        );
        assert_eq!(lines[2], "receiver: /srv/replicas: 1 replica");
        let header = lines[4];
        assert!(header.starts_with("HOST  GROUP    DISK   STATE           LAG   PENDING"));
        assert_eq!(
            lines[5],
            "db1   default  disk0  data/protected  2.5s  10       -           12s ago       lost the connection (timeout)"
        );
        assert_eq!(
            header.find("NEWEST POINT"),
            lines[5].find("12s ago"),
            "columns line up"
        );
        assert!(text.contains("REPLICAS\nHOST  GROUP    POINTS  NEWEST POINT  HISTORY  STATE\n"));
        assert!(text.contains("db1   default  1       12s ago       5.0 MiB  consistent\n"));
        assert!(
            text.lines().all(|l| l == l.trim_end()),
            "no trailing blanks"
        );

        let nothing = snapshot(Err(not_running()), Err(not_running()));
        assert!(!nothing.answered());
        let text = screen(&nothing, &nothing.rows(None));
        assert!(text.starts_with("tracker:  not running ("), "{text}");
        assert!(text.contains("no protected disk known"), "{text}");
        assert!(nothing_answered(&nothing).contains("nothing answered"));
    }

    #[test]
    fn the_json_document_carries_the_same_data() {
        let mut snap = snapshot(Ok(tracker()), Ok(shipper(State::InitialSync)));
        snap.receiver = Some((
            "/srv/replicas".into(),
            Ok(vec![replica(&[(80, NOW - 12 * S)])]),
        ));
        let rows = snap.rows(None);
        let doc = document(&snap, &rows);
        assert_eq!(doc["answered"], true);
        assert_eq!(doc["tracker"]["answered"], true);
        assert_eq!(doc["tracker"]["status"]["tracking"], "data");
        assert_eq!(doc["shipper"]["status"]["state"], "initial-sync");
        assert_eq!(doc["shipper"]["log_dir"], "/var/lib/tidemark/log");
        assert_eq!(doc["receiver"]["data_dir"], "/srv/replicas");
        let d0 = &doc["disks"][0];
        assert_eq!(d0["disk"], "disk0");
        assert_eq!(d0["replication"], "initial-sync");
        assert_eq!(d0["state"], "data/initial-sync");
        assert_eq!(d0["pending_records"], 10);
        assert_eq!(d0["throughput_source"], "initial-sync");
        assert_eq!(d0["initial_sync"]["percent"], 43);
        assert_eq!(d0["newest_point"]["seq"], 80);
        assert_eq!(d0["newest_point"]["age_seconds"], 12.0);
        assert_eq!(doc["disks"][1]["initial_sync"], Value::Null);
        assert_eq!(doc["replicas"][0]["points"], 1);

        let nothing = snapshot(Err(not_running()), Err(not_running()));
        let doc = document(&nothing, &[]);
        assert_eq!(doc["answered"], false);
        assert_eq!(doc["tracker"]["verdict"], "not running");
        assert_eq!(
            doc["tracker"]["control_socket"],
            "/run/tidemark/tracker.ctl"
        );
        assert_eq!(doc["receiver"], Value::Null);
    }

    #[test]
    fn watch_takes_an_optional_positive_interval() {
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            a: StatusArgs,
        }
        let parse = |args: &[&str]| Cli::try_parse_from([&["status"], args].concat());
        assert_eq!(parse(&[]).unwrap().a.watch, None);
        assert_eq!(parse(&["--watch"]).unwrap().a.watch, Some(2));
        assert_eq!(parse(&["--watch", "5"]).unwrap().a.watch, Some(5));
        assert!(parse(&["--watch", "0"]).is_err());
        let a = parse(&["--json"]).unwrap().a;
        assert_eq!(a.tracker_control, Path::new("/run/tidemark/tracker.ctl"));
        assert_eq!(a.log_dir, Path::new("/var/lib/tidemark/log"));
        assert_eq!(a.data_dir, None);
    }

    #[test]
    fn replicas_under_a_data_dir_are_found_and_damage_is_reported() {
        let tmp = tempfile_dir();
        let group = tmp.join("db1").join("default");
        std::fs::create_dir_all(&group).unwrap();
        // A state file that is not one: listed as unreadable, not fatal.
        std::fs::write(group.join("state"), b"garbage").unwrap();
        std::fs::create_dir_all(tmp.join("db2").join("not-a-replica")).unwrap();
        std::fs::write(tmp.join("receiver.ctl"), b"").unwrap();
        let found = read_replicas(&tmp).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].host.as_str(), found[0].group.as_str()),
            ("db1", "default")
        );
        assert_eq!(found[0].state, "unreadable");
        assert!(found[0].error.is_some());
        assert_eq!(
            read_replicas(&tmp.join("missing")).unwrap_err().verdict,
            "unreadable"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    /// A fresh directory under the system's temporary directory.
    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tidemark-status-test-{}-{}",
            std::process::id(),
            tidemark_changelog::now_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
