//! `tidemark mark`: insert a labelled marker on this protected host (a
//! named recovery point), application-consistent with `--app-consistent`
//! (hooks and filesystem freeze around it, `tidemark_tracker::quiesce`).

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_names::Label;
use tidemark_tracker::quiesce::{GuestAgentOutcome, GuestAgentSettings, Quiesce};

/// `tidemark mark`.
#[derive(Debug, Args)]
pub(crate) struct MarkArgs {
    /// The marker's label: one word (no white space or control
    /// characters), at most 1024 bytes.
    label: Label,
    /// Quiesce first: run the pre-hooks, freeze the filesystems, insert
    /// the marker, thaw, run the post-hooks (from the config's
    /// `[tracker.app-consistent]` table and the options below), all within
    /// the timeout.
    #[arg(long)]
    app_consistent: bool,
    /// The tracker config: its control socket and `[tracker.app-consistent]`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The tracker's control socket (default: the config's, else
    /// /run/tidemark/tracker.ctl).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Also freeze this mount point (repeat for several).
    #[arg(long, value_name = "MOUNT_POINT")]
    freeze: Vec<PathBuf>,
    /// Also run this shell command before freezing (repeat for several).
    #[arg(long, value_name = "COMMAND")]
    pre_hook: Vec<String>,
    /// Also run this shell command after thawing (repeat for several).
    #[arg(long, value_name = "COMMAND")]
    post_hook: Vec<String>,
    /// Most time the pre-hooks and the freeze may take (default: the
    /// config's, else 30s).
    #[arg(long, value_parser = tidemark_config::parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Freeze the guest's filesystems through the guest agent on this
    /// socket (default: the config's `guest-agent`, if any). No agent
    /// answering: a crash-consistent point, and the output says so.
    #[arg(long, value_name = "SOCKET")]
    guest_agent: Option<PathBuf>,
    /// Print the point as JSON.
    #[arg(long)]
    json: bool,
}

/// `tidemark mark --json`.
#[derive(Debug, serde::Serialize)]
struct MarkAnswer<'a> {
    label: &'a Label,
    seq: u64,
    /// Inserted as application-consistent.
    app_consistent: bool,
    /// Host filesystems frozen.
    frozen_filesystems: usize,
    /// How long they (and the guest) were frozen.
    frozen_ms: Option<u128>,
    /// The guest agent: `not-configured`, `frozen` or `absent`.
    guest_agent: &'static str,
    /// Filesystems the guest agent froze.
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_filesystems: Option<u64>,
    /// Why no agent answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_agent_absent: Option<&'a str>,
    post_hook_failures: &'a [String],
}

pub(crate) fn mark(a: MarkArgs) -> Result<ExitCode> {
    let config = match &a.config {
        Some(path) => {
            let loaded = tidemark_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            Some(
                loaded
                    .require_tracker()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .clone(),
            )
        }
        None => None,
    };
    let socket = a
        .control_socket
        .clone()
        .or_else(|| config.as_ref().map(|c| c.control_socket.clone()))
        .unwrap_or_else(|| PathBuf::from("/run/tidemark/tracker.ctl"));
    let insert = |within: std::time::Duration, app: bool| {
        tidemark_control::mark(&socket, &a.label, app, within)
    };
    if !a.app_consistent {
        let seq = insert(std::time::Duration::from_secs(60), false)?;
        if a.json {
            let answer = MarkAnswer {
                label: &a.label,
                seq: seq.get(),
                app_consistent: false,
                frozen_filesystems: 0,
                frozen_ms: None,
                guest_agent: "not-configured",
                guest_filesystems: None,
                guest_agent_absent: None,
                post_hook_failures: &[],
            };
            println!("{}", serde_json::to_string_pretty(&answer)?);
        } else {
            println!("marker {:?} at sequence number {seq}", a.label);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let table = config.map(|c| c.app_consistent).unwrap_or_default();
    let guest_agent = a
        .guest_agent
        .clone()
        .or(table.guest_agent)
        .map(GuestAgentSettings::new);
    let quiesce = Quiesce {
        freeze: table.freeze.into_iter().chain(a.freeze.clone()).collect(),
        pre_hooks: table
            .pre_hooks
            .into_iter()
            .chain(a.pre_hook.clone())
            .collect(),
        post_hooks: table
            .post_hooks
            .into_iter()
            .chain(a.post_hook.clone())
            .collect(),
        timeout: a.timeout.unwrap_or(table.timeout.get()),
        guest_agent,
    };
    let report = quiesce
        .run(insert)
        .map_err(|e| anyhow::anyhow!("no application-consistent point: {e}"))?;
    let (guest_agent, guest_filesystems, absent) = match &report.guest_agent {
        GuestAgentOutcome::NotConfigured => ("not-configured", None, None),
        GuestAgentOutcome::Frozen { filesystems } => ("frozen", Some(*filesystems), None),
        GuestAgentOutcome::Absent { reason } => ("absent", None, Some(reason.as_str())),
    };
    if a.json {
        let answer = MarkAnswer {
            label: &a.label,
            seq: report.seq.get(),
            app_consistent: report.app_consistent,
            frozen_filesystems: quiesce.freeze.len(),
            frozen_ms: Some(report.frozen_for.as_millis()),
            guest_agent,
            guest_filesystems,
            guest_agent_absent: absent,
            post_hook_failures: &report.post_hook_failures,
        };
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else if let Some(reason) = absent {
        println!(
            "crash-consistent marker {:?} at sequence number {}: no guest agent answered, \
             the guest's filesystems were not frozen ({reason})",
            a.label, report.seq
        );
    } else {
        let guest = guest_filesystems
            .map(|n| format!(", {n} guest filesystems frozen through its agent"))
            .unwrap_or_default();
        println!(
            "application-consistent marker {:?} at sequence number {} ({} filesystems frozen{guest} for {} ms)",
            a.label,
            report.seq,
            quiesce.freeze.len(),
            report.frozen_for.as_millis()
        );
    }
    for failure in &report.post_hook_failures {
        eprintln!("tidemark: warning: post-hook failed: {failure}");
    }
    Ok(ExitCode::SUCCESS)
}
