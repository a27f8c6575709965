//! `tidemark span`: a replica site's spans — consistency groups of several
//! hosts whose recovery points are taken together (`[[receiver.span]]`).
//! The span's record is the receiver's (`tidemark_receiver::span`); this
//! command only reads it, and the members' replicas to tell which span
//! points can still be had (`tidemark_receiver::span_point`).

use crate::points_cmd::StoreArgs;
use crate::timefmt;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tidemark_config::StoreKind;
use tidemark_names::{Label, Name};
use tidemark_receiver::span::{Outcome, PointEntry, SpanDir, SpanRecord};
use tidemark_receiver::span_point;
use tidemark_receiver::span_take::{self, TakeRequest};

/// `tidemark span …`.
#[derive(Debug, Subcommand)]
pub(crate) enum SpanCommand {
    /// List a span's points: each names one recovery point of every
    /// member, all consistent as of the same instant (works while the
    /// receiver runs).
    Points(PointsArgs),
    /// Take a span point now (the receiver must be running with the span
    /// in its configuration): waits until it is a span point on every
    /// member, or says why it was abandoned (exit status 1).
    Take(TakeArgs),
}

/// `tidemark span take`.
#[derive(Debug, Args)]
pub(crate) struct TakeArgs {
    /// The receiver (`--data-dir`, or `--config`: with the Ceph store, on
    /// the node of the receiver that coordinates the span).
    #[command(flatten)]
    store: StoreArgs,
    /// The span (a `[[receiver.span]]` name).
    #[arg(long)]
    span: Name,
    /// The label of the members' markers (default `span-SPAN-POINT`).
    #[arg(long)]
    label: Option<String>,
    /// Quiesce every member first (its `[tracker.app-consistent]` hooks,
    /// freeze and guest agent), then hold, release and thaw: an
    /// application-consistent span point. A member that cannot quiesce
    /// makes it crash-consistent, and the answer says which and why.
    #[arg(long)]
    app_consistent: bool,
    /// How long to wait for the point.
    #[arg(long, default_value = "2m", value_parser = tidemark_config::parse_duration)]
    timeout: std::time::Duration,
}

/// `tidemark span points`.
#[derive(Debug, Args)]
pub(crate) struct PointsArgs {
    /// The receiver (`--data-dir`, or `--config`: with the Ceph store,
    /// from any receiver node).
    #[command(flatten)]
    store: StoreArgs,
    /// The span (a `[[receiver.span]]` name).
    #[arg(long)]
    span: Name,
    /// Also the rounds that are no span point (yet): still waiting for a
    /// member's marker to be durable, or aborted, with why.
    #[arg(long)]
    all: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(command: SpanCommand) -> Result<ExitCode> {
    match command {
        SpanCommand::Points(a) => points(a),
        SpanCommand::Take(a) => take(a),
    }
}

fn take(a: TakeArgs) -> Result<ExitCode> {
    let cfg = a.store.receiver()?;
    // With a store shared between receivers the span's record is in the
    // cluster (`span_take::ask` sends the request to the lease holder's
    // data directory: this node's, or refused).
    let engine = a.store.engine()?;
    let shared = (cfg.store.kind != StoreKind::Local).then_some(&engine);
    let dir = SpanDir::open(&cfg.data_dir, &a.span).with_context(|| format!("span {}", a.span))?;
    let load = || -> Result<SpanRecord> {
        match shared.and_then(|e| e.read_span(&a.span)) {
            Some(record) => Ok(record?),
            None => Ok(dir.load()?),
        }
    };
    let id = tidemark_changelog::now_ns();
    let label = match &a.label {
        Some(l) => l.clone(),
        None => {
            let next = load().map(|r| r.next_point).unwrap_or(1);
            format!("span-{}-{next}", a.span)
        }
    };
    let label = Label::new(label).context("the label")?;
    let request = TakeRequest {
        id,
        label,
        app_consistent: a.app_consistent,
    };
    let point = span_take::ask(&cfg, engine.as_ref(), &a.span, &request, a.timeout)?;
    let deadline = Instant::now() + a.timeout;
    let wait = |what: &str| -> Result<()> {
        if Instant::now() >= deadline {
            bail!(
                "no answer within {} while waiting {what}: is the receiver running with span {} in its configuration?",
                humantime::format_duration(a.timeout),
                a.span
            );
        }
        std::thread::sleep(Duration::from_millis(100));
        Ok(())
    };
    eprintln!("span {}: taking point {point}", a.span);
    loop {
        let record = load()?;
        if let Some(p) = record.points.iter().find(|p| p.point == point) {
            match p.outcome {
                Outcome::Durable => {
                    let members: Vec<String> = p.members.iter().map(ToString::to_string).collect();
                    let kind = if p.app_consistent {
                        "app-consistent"
                    } else {
                        "crash-consistent"
                    };
                    println!(
                        "span point {point} ({}): {} [{kind}]",
                        p.label,
                        members.join(" ")
                    );
                    if let Some(why) = &p.reason {
                        eprintln!("span point {point} is {why}");
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                Outcome::Aborted => {
                    eprintln!(
                        "span point {point} was abandoned: {}",
                        p.reason.as_deref().unwrap_or("no reason recorded")
                    );
                    return Ok(ExitCode::FAILURE);
                }
                Outcome::Committed => {}
            }
        }
        wait("for every member's marker to be durable")?;
    }
}

fn outcome(p: &PointEntry, expired: bool) -> &'static str {
    match p.outcome {
        Outcome::Committed => "committed",
        Outcome::Durable if expired => "expired",
        Outcome::Durable => "span-point",
        Outcome::Aborted => "aborted",
    }
}

fn points(a: PointsArgs) -> Result<ExitCode> {
    list_in(&a.store, &a.span, a.all, a.json)
}

/// Lists the span points of `span` (`all`: every round), a table or
/// (`json`) a JSON object per line. A span point a member's replica no
/// longer holds is listed as expired, with the member and marker it lost.
/// With the Ceph store the record and the members' replicas are read from
/// the cluster, and the table says which receiver coordinates the span.
pub(crate) fn list_in(store: &StoreArgs, span: &Name, all: bool, json: bool) -> Result<ExitCode> {
    let cfg = store.receiver()?;
    let (record, expired, holder) = if cfg.store.kind == StoreKind::Local {
        let record = SpanDir::open(&cfg.data_dir, span)
            .and_then(|dir| dir.load())
            .with_context(|| format!("reading span {span}"))?;
        let expired = span_point::expired(&cfg.data_dir, &record);
        (record, expired, None)
    } else {
        let engine = store.engine()?;
        let record = match engine.read_span(span) {
            Some(read) => read.with_context(|| format!("reading span {span}"))?,
            None => bail!("this store keeps no span records"),
        };
        let expired = span_point::expired_in(&*engine, &record);
        (record, expired, engine.span_holder(span))
    };
    let shown: Vec<&PointEntry> = record
        .points
        .iter()
        .filter(|p| all || p.outcome == Outcome::Durable)
        .collect();
    let now = tidemark_changelog::now_ns();
    let lost = |p: &PointEntry| {
        expired.get(&p.point).map(|(host, group, marker)| {
            format!("expired: the replica of {host}/{group} no longer holds its marker at sequence {marker}")
        })
    };
    if json {
        for p in shown {
            let reason = p.reason.clone().or_else(|| lost(p));
            let line = serde_json::json!({
                "point": p.point,
                "time": timefmt::utc(p.taken_ns),
                "taken_ns": p.taken_ns,
                "outcome": outcome(p, expired.contains_key(&p.point)),
                "app_consistent": p.app_consistent,
                "label": p.label,
                "reason": reason,
                "members": p.members.iter().map(|m| serde_json::json!({
                    "host": m.host,
                    "group": m.group,
                    "seq": m.marker,
                    "generation": m.generation,
                })).collect::<Vec<_>>(),
            });
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(holder) = &holder {
        println!("span {span}: coordinated by the receiver at {holder}");
    }
    let span_points = record.span_points().count() - expired.len();
    if expired.is_empty() {
        println!("span {span}: {span_points} span points");
    } else {
        println!(
            "span {span}: {span_points} span points ({} expired: a member's retention folded its marker)",
            expired.len()
        );
    }
    let newest = record
        .span_points()
        .filter(|p| !expired.contains_key(&p.point))
        .max_by_key(|p| p.taken_ns);
    if let Some(p) = newest {
        let members: Vec<String> = p
            .members
            .iter()
            .map(|m| format!("{}/{}", m.host, m.group))
            .collect();
        println!(
            "newest: point {} taken {} ago; members {}",
            p.point,
            timefmt::age(now.saturating_sub(p.taken_ns) / 1_000_000_000),
            members.join(" ")
        );
    }
    if let Some(last) = record
        .points
        .last()
        .filter(|p| p.outcome == Outcome::Aborted)
    {
        println!(
            "last round: point {} abandoned {} ago: {}",
            last.point,
            timefmt::age(now.saturating_sub(last.taken_ns) / 1_000_000_000),
            last.reason.as_deref().unwrap_or("no reason recorded")
        );
    }
    if shown.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>8}  {:<24}  {:>6}  {:<10}  {:<15}  MEMBERS (HOST/GROUP@SEQ) OR REASON",
        "POINT", "TIME (UTC)", "AGE", "OUTCOME", "KIND"
    );
    for p in shown {
        let kind = if p.app_consistent {
            "app-consistent"
        } else {
            "crash-consistent"
        };
        let members = p
            .members
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let detail = match (p.outcome, p.reason.clone().or_else(|| lost(p))) {
            (Outcome::Aborted, Some(reason)) => reason,
            // A point asked for app-consistent that is crash-consistent:
            // its members, and why.
            (_, Some(reason)) => format!("{members} ({reason})"),
            (_, None) => members,
        };
        println!(
            "{:>8}  {:<24}  {:>6}  {:<10}  {:<15}  {detail}",
            p.point,
            timefmt::utc(p.taken_ns),
            timefmt::age(now.saturating_sub(p.taken_ns) / 1_000_000_000),
            outcome(p, expired.contains_key(&p.point)),
            kind,
        );
    }
    Ok(ExitCode::SUCCESS)
}
