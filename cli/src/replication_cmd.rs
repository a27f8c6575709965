//! `tidemark shipper …`, `tidemark receiver serve` and `tidemark failover`:
//! run the replication daemons and take a replica over.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tidemark_config::{ReceiverConfig, ShipperConfig};
use tidemark_names::Name;
use tokio::sync::watch;

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

/// `tidemark receiver serve`.
#[derive(Debug, Args)]
pub(crate) struct ReceiverServeArgs {
    /// A config file with a `[receiver]` table. Alternatively give
    /// --listen, --data-dir and --pki-dir.
    #[arg(long, conflicts_with_all = ["listen", "data_dir", "pki_dir"])]
    config: Option<PathBuf>,
    /// UDP address for QUIC ("0.0.0.0:7480"; port 0 picks one, printed).
    #[arg(long, requires_all = ["data_dir", "pki_dir"])]
    listen: Option<String>,
    /// Where replicas live (one directory per host and group).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory written by `tidemark receiver init`.
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (port 0 picks one;
    /// the address is printed). Overrides `metrics-listen` of a config
    /// file; without either, the one-line form serves no metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// A watch that turns true on SIGTERM or SIGINT.
fn stop_on_signals() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping");
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Builds a config table from flags and runs it through the same parser
/// and checks as a config file.
fn synthesize(table: &str, values: toml::Table) -> Result<tidemark_config::LoadedConfig> {
    let mut root = toml::Table::new();
    root.insert(table.to_string(), toml::Value::Table(values));
    let text = toml::to_string(&root).context("building the configuration")?;
    tidemark_config::parse_str(&text, Path::new("<command line>"))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn path_str(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
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

fn receiver_config(a: &ReceiverServeArgs) -> Result<ReceiverConfig> {
    let loaded = match &a.config {
        Some(path) => tidemark_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => {
            let (Some(listen), Some(data_dir), Some(pki)) = (&a.listen, &a.data_dir, &a.pki_dir)
            else {
                bail!("give --config FILE, or --listen, --data-dir and --pki-dir");
            };
            let mut t = toml::Table::new();
            t.insert("listen".into(), toml::Value::String(listen.clone()));
            t.insert("data-dir".into(), path_str(data_dir));
            t.insert(
                "control-socket".into(),
                path_str(&data_dir.join("receiver.ctl")),
            );
            let mut tls = toml::Table::new();
            tls.insert("ca".into(), path_str(&pki.join("ca.crt")));
            tls.insert("ca-key".into(), path_str(&pki.join("ca.key")));
            tls.insert("cert".into(), path_str(&pki.join("receiver.crt")));
            tls.insert("key".into(), path_str(&pki.join("receiver.key")));
            t.insert("tls".into(), toml::Value::Table(tls));
            synthesize("receiver", t)?
        }
    };
    loaded
        .receiver
        .context("the configuration has no [receiver] table")
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
                println!(
                    "shipper started: log {} → {} as {} (group {})",
                    cfg.log_dir.display(),
                    cfg.receiver,
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

/// Where to serve metrics: the flag, else a config file's address; the
/// one-line form without the flag serves none (several daemons started
/// from flags on one machine would fight over the default port).
fn metrics_address(
    flag: Option<std::net::SocketAddr>,
    from_file: bool,
    configured: std::net::SocketAddr,
) -> Option<std::net::SocketAddr> {
    flag.or(from_file.then_some(configured))
}

/// Prints the metrics endpoint on stdout (after the daemon's first line).
fn print_metrics_address(addr: Option<std::net::SocketAddr>) {
    // A reader that stopped after the first line must not kill the
    // daemon: a closed stdout is ignored.
    if let Some(addr) = addr {
        let _ = writeln!(std::io::stdout(), "metrics on http://{addr}/metrics");
        let _ = std::io::stdout().flush();
    }
}

pub(crate) fn receiver_serve(a: ReceiverServeArgs) -> Result<ExitCode> {
    let cfg = receiver_config(&a)?;
    let metrics_listen = metrics_address(a.metrics_listen, a.config.is_some(), cfg.metrics_listen);
    let rt = runtime()?;
    rt.block_on(async {
        let stop = stop_on_signals()?;
        tidemark_receiver::daemon::run(cfg, metrics_listen, stop, |addr, metrics| {
            println!("receiver ready on {addr}");
            print_metrics_address(metrics);
            let _ = std::io::stdout().flush();
            crate::notify_ready();
        })
        .await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
