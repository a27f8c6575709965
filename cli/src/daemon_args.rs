//! What the daemon commands (`tidemark shipper run`, `tidemark receiver
//! serve`) share: the async runtime, stopping on SIGTERM or SIGINT, a
//! config built from flags, and where metrics are served.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;
use tokio::sync::watch;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// A watch that turns true on SIGTERM or SIGINT.
pub(crate) fn stop_on_signals() -> Result<watch::Receiver<bool>> {
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
pub(crate) fn synthesize(
    table: &str,
    values: toml::Table,
) -> Result<tidemark_config::LoadedConfig> {
    let mut root = toml::Table::new();
    root.insert(table.to_string(), toml::Value::Table(values));
    let text = toml::to_string(&root).context("building the configuration")?;
    tidemark_config::parse_str(&text, Path::new("<command line>"))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

pub(crate) fn path_str(p: &Path) -> toml::Value {
    toml::Value::String(p.display().to_string())
}

/// Where to serve metrics: the flag, else a config file's address; the
/// one-line form without the flag serves none (several daemons started
/// from flags on one machine would fight over the default port).
pub(crate) fn metrics_address(
    flag: Option<std::net::SocketAddr>,
    from_file: bool,
    configured: std::net::SocketAddr,
) -> Option<std::net::SocketAddr> {
    flag.or(from_file.then_some(configured))
}

/// Prints the metrics endpoint on stdout (after the daemon's first line).
pub(crate) fn print_metrics_address(addr: Option<std::net::SocketAddr>) {
    // A reader that stopped after the first line must not kill the
    // daemon: a closed stdout is ignored.
    if let Some(addr) = addr {
        let _ = writeln!(std::io::stdout(), "metrics on http://{addr}/metrics");
        let _ = std::io::stdout().flush();
    }
}
