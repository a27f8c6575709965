//! `tidemark log …`: inspect, verify, replay and recover a change-log
//! directory.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tidemark_changelog::record::FLAG_APP_CONSISTENT;
use tidemark_changelog::replay::{replay, ImageFile, ReplayError, StopAt};
use tidemark_changelog::{check, DiskId, FsDir, Kind, LogReader, Record, Seq};

use crate::timefmt::utc;

/// Inspect, verify and replay a change log.
#[derive(Debug, Subcommand)]
pub(crate) enum LogCommand {
    /// Print every record, oldest first; barriers and markers stand out.
    Dump(DumpArgs),
    /// Verify every record; on damage say where, and exit non-zero.
    Check(CheckArgs),
    /// Apply the records of one disk, in order, onto an image file.
    Replay(ReplayArgs),
    /// Cut a damaged log that the tracker refuses at its first damage
    /// (keeping the damaged segments aside as `<name>.damaged`), start a new
    /// generation above every sequence number, and record every disk
    /// resync-needed. Stop the tracker first.
    Recover(RecoverArgs),
}

#[derive(Debug, Args)]
pub(crate) struct RecoverArgs {
    /// The log directory.
    dir: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct DumpArgs {
    /// The log directory.
    dir: PathBuf,
    /// One JSON object per record (JSON lines).
    #[arg(long)]
    json: bool,
    /// Start at this sequence number (default: the oldest record).
    #[arg(long, default_value_t = 0)]
    from: u64,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The log directory.
    dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ReplayArgs {
    /// The log directory.
    dir: PathBuf,
    /// The image to apply the records to (created if missing).
    #[arg(long)]
    onto: PathBuf,
    /// Which disk of the group to replay (its id in the log).
    #[arg(long, default_value_t = 0)]
    disk: u32,
    /// Stop after the record with this sequence number.
    #[arg(long, group = "stop")]
    until: Option<u64>,
    /// Stop after the N-th barrier of the log (1-based).
    #[arg(long, group = "stop")]
    barrier: Option<u64>,
    /// Stop after the first marker with this label.
    #[arg(long, group = "stop")]
    label: Option<String>,
    /// Replaying to the end of a log that stops being valid (a damaged or
    /// missing segment, tail damage): apply the valid records before the
    /// damage and say where it stopped, instead of refusing.
    #[arg(long)]
    accept_prefix: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(cmd: LogCommand) -> Result<ExitCode> {
    match cmd {
        LogCommand::Dump(a) => dump(a),
        LogCommand::Check(a) => check_cmd(a),
        LogCommand::Replay(a) => replay_cmd(a),
        LogCommand::Recover(a) => recover_cmd(a),
    }
}

fn open_dir(path: &Path) -> Result<FsDir> {
    FsDir::existing(path).with_context(|| format!("cannot open log directory {}", path.display()))
}

#[derive(Serialize)]
struct RecordJson<'a> {
    seq: Seq,
    generation: u32,
    timestamp_ns: u64,
    kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<DiskId>,
    offset: u64,
    length: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    durable_upto: Option<Seq>,
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    app_consistent: Option<bool>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    no_hole: bool,
}

fn record_json(r: &Record) -> RecordJson<'_> {
    let h = &r.header;
    let group = matches!(h.kind, Kind::Barrier | Kind::Marker);
    RecordJson {
        seq: h.seq,
        generation: h.generation,
        timestamp_ns: h.timestamp_ns,
        kind: h.kind,
        disk: (!group).then_some(h.disk),
        // A barrier's offset field is its durable-upto.
        offset: if h.kind == Kind::Barrier { 0 } else { h.offset },
        durable_upto: h.durable_upto(),
        length: h.length,
        label: r.label(),
        app_consistent: (h.kind == Kind::Marker).then_some(h.flags & FLAG_APP_CONSISTENT != 0),
        no_hole: h.flags & tidemark_changelog::record::FLAG_NO_HOLE != 0,
    }
}

fn dump(a: DumpArgs) -> Result<ExitCode> {
    let dir = open_dir(&a.dir)?;
    let mut reader = LogReader::new(dir, Seq(a.from));
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    if !a.json {
        writeln!(
            out,
            "{:>12} {:>4} {:<24} {:<13} {:>4} {:>14} {:>10}",
            "SEQ", "GEN", "TIME (UTC)", "KIND", "DISK", "OFFSET", "LENGTH"
        )?;
    }
    let mut barriers = 0u64;
    while let Some(r) = reader.next_record()? {
        if a.json {
            serde_json::to_writer(&mut out, &record_json(&r))?;
            writeln!(out)?;
            continue;
        }
        let h = &r.header;
        let time = utc(h.timestamp_ns);
        match h.kind {
            Kind::Barrier => {
                barriers += 1;
                writeln!(
                    out,
                    "{:>12} {:>4} {:<24} ── BARRIER #{barriers} ── crash-consistent point ──",
                    h.seq, h.generation, time
                )?;
            }
            Kind::Marker => {
                let kind = if h.flags & FLAG_APP_CONSISTENT != 0 {
                    "application-consistent"
                } else {
                    "crash-consistent"
                };
                writeln!(
                    out,
                    "{:>12} {:>4} {:<24} ── MARKER {:?} ({kind}) ──",
                    h.seq,
                    h.generation,
                    time,
                    r.label().unwrap_or("")
                )?;
            }
            _ => writeln!(
                out,
                "{:>12} {:>4} {:<24} {:<13} {:>4} {:>14} {:>10}",
                h.seq,
                h.generation,
                time,
                h.kind.name(),
                h.disk,
                h.offset,
                h.length
            )?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn check_cmd(a: CheckArgs) -> Result<ExitCode> {
    let dir = open_dir(&a.dir)?;
    let report = check(&dir).with_context(|| format!("cannot read {}", a.dir.display()))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let range = match (report.first_seq, report.last_seq) {
            (Some(f), Some(l)) => format!("sequence numbers {f}..={l}"),
            _ => "no records".to_string(),
        };
        println!(
            "{}: {} segments, {} records ({range}), {} barriers, {} markers",
            a.dir.display(),
            report.segments.len(),
            report.records,
            report.barriers,
            report.markers
        );
        for note in &report.notes {
            println!("note: {note}");
        }
        for p in &report.problems {
            println!(
                "DAMAGED: segment {} at byte {}: {}",
                p.segment, p.offset, p.reason
            );
            match p.last_valid_seq {
                Some(s) => println!("last valid sequence number: {s}"),
                None => println!(
                    "last valid sequence number: none (no record before the damage verifies)"
                ),
            }
        }
        if report.is_clean() {
            match report.last_seq {
                Some(s) => println!("OK: every record verifies; last valid sequence number: {s}"),
                None => println!("OK: the log is empty"),
            }
        }
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn replay_cmd(a: ReplayArgs) -> Result<ExitCode> {
    let dir = open_dir(&a.dir)?;
    let stop = match (a.until, a.barrier, a.label) {
        (Some(s), _, _) => StopAt::Seq(Seq(s)),
        (_, Some(0), _) => bail!("--barrier counts from 1"),
        (_, Some(n), _) => StopAt::Barrier(n),
        (_, _, Some(l)) => StopAt::Label(l),
        _ => StopAt::End,
    };
    // A new image holds the disk's data: private, as every copy is.
    let file = tidemark_changelog::private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&a.onto)
        .with_context(|| format!("cannot open image {}", a.onto.display()))?;
    let mut image = ImageFile::new(file);
    let summary = match replay(dir, DiskId(a.disk), &stop, a.accept_prefix, &mut image) {
        Ok(s) => s,
        Err(e @ ReplayError::Damaged(_)) => {
            bail!("{e}\n(give --accept-prefix to replay the valid records before the damage)")
        }
        Err(e) => return Err(e.into()),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "replayed disk {} onto {}: sequence numbers {}..={}, {} records applied ({} bytes), {} barriers passed, {} records of other disks skipped",
            a.disk,
            a.onto.display(),
            summary.first_seq.unwrap_or(Seq::ZERO),
            summary.last_seq.unwrap_or(Seq::ZERO),
            summary.applied,
            summary.bytes,
            summary.barriers,
            summary.other_disks
        );
        if summary.first_seq.is_some_and(|f| f > Seq(1)) {
            println!(
                "note: the log starts at sequence number {}; the image must already hold the state before it",
                summary.first_seq.unwrap_or(Seq::ZERO)
            );
        }
    }
    if let Some(p) = &summary.stopped_early {
        eprintln!(
            "warning: replay stopped early at segment {} byte {}: {}; the image holds the records up to {} only",
            p.segment,
            p.offset,
            p.reason,
            p.last_valid_seq
                .map_or("none".to_string(), |s| s.to_string())
        );
    }
    for (offset, length) in &summary.resync_needed {
        eprintln!(
            "warning: extent {offset}+{length} is marked resync-needed: the log does not hold its content, so the image may differ from the source there"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn recover_cmd(a: RecoverArgs) -> Result<ExitCode> {
    let Some(report) = tidemark_tracker::recover::recover_damaged_log(&a.dir)
        .with_context(|| format!("cannot recover the log in {}", a.dir.display()))?
    else {
        println!(
            "{}: the log is not damaged; nothing to recover",
            a.dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    };
    if let Some(cut) = &report.cut {
        println!(
            "cut the log at segment {} byte {}: {}",
            cut.segment, cut.offset, cut.damage
        );
        println!(
            "records from sequence number {} on are no longer in the log ({} verified after the damage; {} the shipper had passed)",
            cut.first_seq, cut.records_after, cut.acknowledged
        );
        for name in &cut.kept_aside {
            println!("kept aside: {}", a.dir.join(name).display());
        }
    }
    if report.lost_acknowledged > 0 {
        println!(
            "the receiver holds {} records the log no longer has",
            report.lost_acknowledged
        );
    }
    println!(
        "generation {} begins at sequence number {}; recorded resync-needed: {}",
        report.generation,
        report.first_seq,
        report
            .resync_needed
            .iter()
            .map(|(id, size)| format!("disk {id} ({size} bytes)"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("start the tracker: the replica is compared with the disks block by block and receives only what differs");
    Ok(ExitCode::SUCCESS)
}
