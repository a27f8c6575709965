//! The replica site's web console: server-rendered pages over HTTPS,
//! served by the receiver process beside replication (`[receiver.console]`
//! in receiver.toml, off by default).
//!
//! | module     | owns                                                    |
//! |------------|---------------------------------------------------------|
//! | [`auth`]   | sessions, CSRF tokens and the checks of every request (pure) |
//! | [`view`]   | page models from store facts and `now` (pure)           |
//! | [`chart`]  | the 24 h lag chart as inline SVG (pure)                 |
//! | [`tls`]    | the HTTPS listener and the admin certificate's holder   |
//! | [`throttle`] | failed password logins per address and name (pure)  |
//! | [`audit`]  | the trail of every state-changing action                |
//! | `pages`    | the routes: a thin shell over the above                 |
//!
//! Actions call the same library code as the CLI: a test failover is
//! [`tidemark_receiver::test_failover::nbd::ServedTestFailover`], as for
//! `tidemark test-failover start`.

pub mod audit;
pub mod auth;
pub mod chart;
mod pages;
pub mod throttle;
pub mod tls;
pub mod view;

use std::net::SocketAddr;
use std::path::PathBuf;

use tidemark_config::ReceiverConfig;
use tokio::sync::watch;

pub use pages::hash_password;

/// Why the console could not start (local configuration or resources).
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Its TLS could not be set up from the configured files.
    #[error("setting up the console's TLS")]
    Tls(#[from] tls::TlsSetupError),
    /// The store of the replicas could not be opened.
    #[error("opening the replica store for the console")]
    Store(#[source] tidemark_receiver::store::OpenEngineError),
    /// The listen address could not be bound.
    #[error("binding the console to {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("serving the console")]
    Serve(#[source] std::io::Error),
}

/// A console bound to its address, not serving yet.
pub struct BoundConsole {
    listener: tls::TlsListener,
    addr: SocketAddr,
    state: pages::Shared,
}

impl std::fmt::Debug for BoundConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundConsole")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// The directory of the console's own files (audit trail, test
/// failovers' sockets) in the receiver's data directory.
pub fn console_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join(".console")
}

/// Binds the console of the receiver configured by `cfg` (whose
/// `[receiver.console]` is enabled) to its address; it shows what the
/// shippers reported into `reports` (the receiver's, given to
/// `tidemark_receiver::daemon::run_with_reports`).
pub async fn bind(
    cfg: &ReceiverConfig,
    reports: std::sync::Arc<tidemark_receiver::shipper_reports::ShipperReports>,
) -> Result<BoundConsole, ConsoleError> {
    let console = &cfg.console;
    let tls_dir = cfg
        .tls
        .ca
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let tls = tls::server_config(
        &cfg.tls.ca,
        &console.cert_path(&tls_dir),
        &console.key_path(&tls_dir),
    )?;
    let engine =
        tidemark_receiver::store::open_engine(cfg, "console").map_err(ConsoleError::Store)?;
    let tcp = tokio::net::TcpListener::bind(console.listen)
        .await
        .map_err(|source| ConsoleError::Bind {
            addr: console.listen,
            source,
        })?;
    let addr = tcp.local_addr().map_err(|source| ConsoleError::Bind {
        addr: console.listen,
        source,
    })?;
    let listener = tls::TlsListener::new(tcp, tls).map_err(|source| ConsoleError::Bind {
        addr: console.listen,
        source,
    })?;
    let state = pages::Console::new(cfg, engine, reports);
    Ok(BoundConsole {
        listener,
        addr,
        state,
    })
}

impl BoundConsole {
    /// The address it is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` turns true; running test failovers started
    /// from the console are ended then.
    pub async fn serve(self, mut stop: watch::Receiver<bool>) -> Result<(), ConsoleError> {
        let state = self.state.clone();
        // Expired sessions and old login failures are swept even when no
        // request comes to find them.
        let sweeper = {
            let state = state.clone();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(pages::SWEEP_EVERY);
                loop {
                    tokio::select! {
                        _ = tick.tick() => state.sweep(pages::now_ns()),
                        _ = stop.wait_for(|s| *s) => break,
                    }
                }
                state.stop_streams();
            })
        };
        let app =
            pages::router(self.state).into_make_service_with_connect_info::<tls::ConsolePeer>();
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
            .map_err(ConsoleError::Serve);
        sweeper.abort();
        state.end_all().await;
        served
    }
}
