//! `tidemark mark`: insert a labelled marker on this protected host (a
//! named recovery point), application-consistent with `--app-consistent`
//! (hooks and filesystem freeze around it, `tidemark_tracker::quiesce`).

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_names::Label;
use tidemark_tracker::quiesce::Quiesce;

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
    let insert = |app: bool, within: std::time::Duration| {
        tidemark_control::mark(&socket, &a.label, app, within)
    };
    if !a.app_consistent {
        let seq = insert(false, std::time::Duration::from_secs(60))?;
        println!("marker {:?} at sequence number {seq}", a.label);
        return Ok(ExitCode::SUCCESS);
    }
    let table = config.map(|c| c.app_consistent).unwrap_or_default();
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
    };
    let report = quiesce
        .run(|left| insert(true, left))
        .map_err(|e| anyhow::anyhow!("no application-consistent point: {e}"))?;
    println!(
        "application-consistent marker {:?} at sequence number {} ({} filesystems frozen for {} ms)",
        a.label,
        report.seq,
        quiesce.freeze.len(),
        report.frozen_for.as_millis()
    );
    for failure in &report.post_hook_failures {
        eprintln!("tidemark: warning: post-hook failed: {failure}");
    }
    Ok(ExitCode::SUCCESS)
}
