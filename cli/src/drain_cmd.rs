//! `tidemark drain`: the protected host's half of a planned failover.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// `tidemark drain`: the protected host's half of a planned failover.
#[derive(Debug, Args)]
pub(crate) struct DrainArgs {
    /// The tracker config (its control socket and log directory).
    #[arg(long, conflicts_with_all = ["control_socket", "log_dir"])]
    config: Option<PathBuf>,
    /// The tracker's control socket.
    #[arg(long, default_value = "/run/tidemark/tracker.ctl")]
    control_socket: PathBuf,
    /// The change log directory (where the shipper's status is).
    #[arg(long, default_value = "/var/lib/tidemark/log")]
    log_dir: PathBuf,
    /// Most time to wait for the shipper to deliver everything.
    #[arg(long, default_value = "10m", value_parser = tidemark_config::parse_duration)]
    timeout: std::time::Duration,
}

/// Stops the tracker (no new writes; requests in flight finish; a final
/// barrier) and waits until the shipper has made every record durable at
/// the receiver: the final barrier is then the newest recovery point, and
/// failing over to it loses nothing.
pub(crate) fn drain(a: DrainArgs) -> Result<ExitCode> {
    use std::time::{Duration, Instant};
    let (control, log_dir) = match &a.config {
        Some(path) => {
            let loaded = tidemark_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
            let t = loaded
                .require_tracker()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            (t.control_socket.clone(), t.log_dir.clone())
        }
        None => (a.control_socket.clone(), a.log_dir.clone()),
    };
    let deadline = Instant::now() + a.timeout;
    println!(
        "stopping the tracker: no new writes; requests in flight finish, then a final barrier"
    );
    match tidemark_control::stop_tracker(&control, a.timeout)? {
        tidemark_control::Stopped::Now => println!("tracker stopped"),
        tidemark_control::Stopped::NotRunning => println!(
            "no tracker answers on {}; draining what its log holds",
            control.display()
        ),
    }
    let dir = tidemark_changelog::FsDir::existing(&log_dir)
        .with_context(|| format!("opening the log {}", log_dir.display()))?;
    let report = tidemark_changelog::check(&dir)
        .with_context(|| format!("reading the log {}", log_dir.display()))?;
    if !report.is_clean() {
        bail!(
            "the log {} is damaged: run `tidemark log check` on it",
            log_dir.display()
        );
    }
    let last = report.last_seq.unwrap_or(tidemark_changelog::Seq::ZERO);
    let mut next_report = Instant::now();
    loop {
        let status = tidemark_shipper::status::read_status(&log_dir)?;
        if status.state == tidemark_shipper::status::State::Critical {
            bail!(
                "the shipper is critical: {}",
                status.reason.as_deref().unwrap_or("no reason given")
            );
        }
        if status.durable_seq >= last && status.state == tidemark_shipper::status::State::Protected
        {
            println!(
                "drained: every record up to sequence {last} (the final barrier) is durable at the receiver"
            );
            println!(
                "on the replica site: tidemark failover --data-dir DIR --host {} --group {} --point {last} --to DIR",
                status.host, status.group
            );
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            bail!(
                "the shipper has {} of {last} durable after {:?} (state {}); the tracker stays stopped",
                status.durable_seq,
                a.timeout,
                status.state.name()
            );
        }
        if Instant::now() >= next_report {
            println!(
                "waiting for the shipper: durable at the receiver {} of {last} ({})",
                status.durable_seq,
                status.state.name()
            );
            next_report = Instant::now() + Duration::from_secs(5);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
