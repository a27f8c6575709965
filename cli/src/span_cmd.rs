//! `tidemark span`: a replica site's spans — consistency groups of several
//! hosts whose recovery points are taken together (`[[receiver.span]]`).
//! The span's record is the receiver's (`tidemark_receiver::span`); this
//! command only reads it.

use crate::timefmt;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_names::Name;
use tidemark_receiver::span::{Outcome, PointEntry, SpanDir};

/// `tidemark span …`.
#[derive(Debug, Subcommand)]
pub(crate) enum SpanCommand {
    /// List a span's points: each names one recovery point of every
    /// member, all consistent as of the same instant (works while the
    /// receiver runs).
    Points(PointsArgs),
}

/// `tidemark span points`.
#[derive(Debug, Args)]
pub(crate) struct PointsArgs {
    /// The receiver's data directory.
    #[arg(long)]
    data_dir: PathBuf,
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
    }
}

fn outcome(p: &PointEntry) -> &'static str {
    match p.outcome {
        Outcome::Committed => "committed",
        Outcome::Durable => "span-point",
        Outcome::Aborted => "aborted",
    }
}

fn points(a: PointsArgs) -> Result<ExitCode> {
    let record = SpanDir::open(&a.data_dir, &a.span)
        .and_then(|dir| dir.load())
        .with_context(|| format!("reading span {}", a.span))?;
    let shown: Vec<&PointEntry> = record
        .points
        .iter()
        .filter(|p| a.all || p.outcome == Outcome::Durable)
        .collect();
    let now = tidemark_changelog::now_ns();
    if a.json {
        for p in shown {
            let line = serde_json::json!({
                "point": p.point,
                "time": timefmt::utc(p.taken_ns),
                "taken_ns": p.taken_ns,
                "outcome": outcome(p),
                "app_consistent": p.app_consistent,
                "label": p.label,
                "reason": p.reason,
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
    let span_points = record.span_points().count();
    println!("span {}: {span_points} span points", a.span);
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
        let detail = match &p.reason {
            Some(reason) => reason.clone(),
            None => p
                .members
                .iter()
                .map(|m| format!("{}/{}@{}", m.host, m.group, m.marker))
                .collect::<Vec<_>>()
                .join(" "),
        };
        println!(
            "{:>8}  {:<24}  {:>6}  {:<10}  {:<15}  {detail}",
            p.point,
            timefmt::utc(p.taken_ns),
            timefmt::age(now.saturating_sub(p.taken_ns) / 1_000_000_000),
            outcome(p),
            kind,
        );
    }
    Ok(ExitCode::SUCCESS)
}
