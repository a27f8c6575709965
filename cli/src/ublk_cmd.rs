//! `tidemark ublk`: the ublk devices on this host, and removing one a
//! tracker left behind (kept with `keep-device`, or after a crash) when no
//! tracker will take it over.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::process::ExitCode;
use tidemark_tracker::ublk::control::Control;
use tidemark_tracker::ublk::sys::state;

/// ublk devices.
#[derive(Debug, Subcommand)]
pub(crate) enum UblkCommand {
    /// Every ublk device: id, state, serving process, size.
    List(ListArgs),
    /// Remove a ublk device (its I/O held for a tracker fails). For a
    /// device no tracker will take over; a running tracker removes its own
    /// on SIGTERM.
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RemoveArgs {
    /// The device id N of /dev/ublkbN.
    id: u32,
}

pub(crate) fn run(cmd: UblkCommand) -> Result<ExitCode> {
    let mut control = Control::open()
        .context("cannot open /dev/ublk-control (is the ublk_drv module loaded? are you root?)")?;
    match cmd {
        UblkCommand::List(a) => {
            let mut rows = Vec::new();
            for id in tidemark_tracker::ublk::existing_ids() {
                let info = control
                    .info(id)
                    .with_context(|| format!("reading ublk device {id}"))?;
                let size = control.size(id).unwrap_or(0);
                let state = match info.state {
                    state::DEAD => "dead",
                    state::LIVE => "live",
                    state::QUIESCED => "quiesced",
                    _ => "unknown",
                };
                rows.push(serde_json::json!({
                    "id": id,
                    "device": format!("/dev/ublkb{id}"),
                    "state": state,
                    "pid": info.ublksrv_pid,
                    "size": size,
                    "queues": info.nr_hw_queues,
                    "queue_depth": info.queue_depth,
                    "user_copy": info.flags & tidemark_tracker::ublk::sys::flags::USER_COPY != 0,
                }));
            }
            if a.json {
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<14} {:<9} {:>8} {:>14} {:>6} {:>5} {:<6}",
                    "DEVICE", "STATE", "PID", "SIZE", "QUEUES", "DEPTH", "COPY"
                );
                for r in rows {
                    println!(
                        "{:<14} {:<9} {:>8} {:>14} {:>6} {:>5} {:<6}",
                        r["device"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        r["pid"],
                        r["size"],
                        r["queues"],
                        r["queue_depth"],
                        if r["user_copy"].as_bool().unwrap_or(false) {
                            "user"
                        } else {
                            "driver"
                        }
                    );
                }
            }
        }
        UblkCommand::Remove(a) => {
            let info = control
                .info(a.id)
                .with_context(|| format!("no ublk device {}", a.id))?;
            if info.state != state::DEAD {
                control
                    .stop(a.id)
                    .with_context(|| format!("stopping /dev/ublkb{}", a.id))?;
            }
            control
                .delete(a.id)
                .with_context(|| format!("deleting ublk device {}", a.id))?;
            println!("removed /dev/ublkb{}", a.id);
        }
    }
    Ok(ExitCode::SUCCESS)
}
