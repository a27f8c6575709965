//! `tidemark shipper run|status`: run the shipper, and ask it how
//! replication goes.

use crate::daemon_args::{
    metrics_address, path_str, print_metrics_address, runtime, stop_on_signals, synthesize,
};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_config::ShipperConfig;
use tidemark_names::Name;

/// Run the shipper and ask it how replication goes.
#[derive(Debug, Subcommand)]
pub(crate) enum ShipperCommand {
    /// Ship a consistency group's change log to the receiver (runs until
    /// SIGTERM; exit status 2 on a permanent failure).
    Run(ShipperRunArgs),
    /// Show what the shipper on a log directory is doing.
    Status(ShipperStatusArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ShipperRunArgs {
    /// A config file with a `[shipper]` table. Alternatively give
    /// --log-dir, --receiver, --host and --pki-dir.
    #[arg(long, conflicts_with_all = ["log_dir", "receiver", "host", "pki_dir"])]
    config: Option<PathBuf>,
    /// The tracker's change log directory.
    #[arg(long, requires_all = ["receiver", "host", "pki_dir"])]
    log_dir: Option<PathBuf>,
    /// The receiver, "host:port".
    #[arg(long)]
    receiver: Option<String>,
    /// This host's enrolled name (the name in host.crt).
    #[arg(long)]
    host: Option<Name>,
    /// Directory with ca.crt, host.crt and host.key.
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// The consistency group.
    #[arg(long, default_value = "default")]
    group: Name,
    /// The name the receiver's certificate carries.
    #[arg(long, default_value = "tidemark-receiver")]
    server_name: Name,
    /// The tracker's control socket, through which a planned failover
    /// stops the tracker.
    #[arg(long, default_value = "/run/tidemark/tracker.ctl")]
    tracker_control_socket: PathBuf,
    /// Serve Prometheus metrics on http://ADDR/metrics (port 0 picks one;
    /// the address is printed). Overrides `metrics-listen` of a config
    /// file; without either, the one-line form serves no metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Args)]
pub(crate) struct ShipperStatusArgs {
    /// The change log directory the shipper drains.
    #[arg(long)]
    log_dir: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn shipper_config(a: &ShipperRunArgs) -> Result<ShipperConfig> {
    let loaded = match &a.config {
        Some(path) => tidemark_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => {
            let (Some(log_dir), Some(receiver), Some(host), Some(pki)) =
                (&a.log_dir, &a.receiver, &a.host, &a.pki_dir)
            else {
                bail!("give --config FILE, or --log-dir, --receiver, --host and --pki-dir");
            };
            let mut t = toml::Table::new();
            t.insert("host".into(), toml::Value::String(host.to_string()));
            t.insert("receiver".into(), toml::Value::String(receiver.clone()));
            t.insert(
                "server-name".into(),
                toml::Value::String(a.server_name.to_string()),
            );
            t.insert(
                "consistency-group".into(),
                toml::Value::String(a.group.to_string()),
            );
            t.insert("log-dir".into(), path_str(log_dir));
            t.insert(
                "control-socket".into(),
                path_str(&log_dir.join("shipper.ctl")),
            );
            t.insert(
                "tracker-control-socket".into(),
                path_str(&a.tracker_control_socket),
            );
            let mut tls = toml::Table::new();
            tls.insert("ca".into(), path_str(&pki.join("ca.crt")));
            tls.insert("cert".into(), path_str(&pki.join("host.crt")));
            tls.insert("key".into(), path_str(&pki.join("host.key")));
            t.insert("tls".into(), toml::Value::Table(tls));
            synthesize("shipper", t)?
        }
    };
    loaded
        .shipper
        .context("the configuration has no [shipper] table")
}

pub(crate) fn run_shipper(cmd: ShipperCommand) -> Result<ExitCode> {
    match cmd {
        ShipperCommand::Run(a) => {
            let cfg = shipper_config(&a)?;
            let metrics_listen =
                metrics_address(a.metrics_listen, a.config.is_some(), cfg.metrics_listen);
            let rt = runtime()?;
            let result = rt.block_on(async {
                let stop = stop_on_signals()?;
                let receivers: Vec<String> =
                    cfg.receivers().iter().map(|r| r.to_string()).collect();
                println!(
                    "shipper started: log {} → {} as {} (group {})",
                    cfg.log_dir.display(),
                    receivers.join(", "),
                    cfg.host,
                    cfg.consistency_group
                );
                let _ = std::io::stdout().flush();
                anyhow::Ok(
                    tidemark_shipper::daemon::run(cfg, metrics_listen, stop, |metrics| {
                        print_metrics_address(metrics);
                        crate::notify_ready();
                    })
                    .await,
                )
            })?;
            match result {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e @ tidemark_shipper::daemon::ShipperFatal::Critical(_)) => {
                    eprintln!("tidemark: error: {e}");
                    Ok(ExitCode::from(2))
                }
                Err(e) => Err(e.into()),
            }
        }
        ShipperCommand::Status(a) => {
            let s = tidemark_shipper::status::read_status(&a.log_dir)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(ExitCode::SUCCESS);
            }
            let state = serde_json::to_value(s.state)?;
            println!(
                "host {} group {}: {}",
                s.host,
                s.group,
                state.as_str().unwrap_or("?")
            );
            if let Some(r) = &s.reason {
                println!("  reason: {r}");
            }
            println!(
                "  durable at the receiver: seq {}   sent: seq {}   newest in log: seq {}",
                s.durable_seq, s.sent_seq, s.log_seq
            );
            println!(
                "  shipped {} record bytes as {} bytes on the wire; retries {}",
                s.record_bytes, s.wire_bytes, s.retries
            );
            if let Some(v) = s.protocol_version {
                let release = s
                    .receiver_software
                    .as_deref()
                    .map_or(String::new(), |r| format!(", receiver release {r}"));
                println!("  protocol version {v}{release}");
            }
            if let Some(spec) = &s.vm_spec {
                println!("  VM spec at the receiver: {spec}");
            }
            for d in &s.disks {
                let pct = if d.size == 0 {
                    100.0
                } else {
                    d.synced as f64 * 100.0 / d.size as f64
                };
                let eta = match d.eta_seconds {
                    Some(0) => "done".to_string(),
                    Some(s) => format!("{} MiB/s, about {s} s left", d.rate_bytes_per_sec >> 20),
                    None => "rate not known yet".to_string(),
                };
                println!(
                    "  disk {}: initial sync {:.1}% ({} of {} bytes; {} sent as data; {eta})",
                    d.name, pct, d.synced, d.size, d.data_bytes
                );
            }
            if s.resync_blocks_compared > 0 {
                println!(
                    "  resync: {} blocks compared, {} sent",
                    s.resync_blocks_compared, s.resync_blocks_sent
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
