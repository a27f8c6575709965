//! Renewing this host's certificate before it expires
//! (`tidemark_net::renew` owns the rules): while a connection lives, its
//! certificate is looked at when the connection starts and every
//! [`CHECK_EVERY`] after; once it expires within `renew-before`
//! (`[shipper.tls]`), the shipper asks the receiver for a new one on a
//! stream of its own beside the session's.
//!
//! What comes back is checked (this host's name and key, signed by a CA
//! the receiver sent) and stored over `cert` atomically (written under a
//! temporary name, made durable, renamed); the CA bundle that comes with
//! it is stored over `ca` the same way when it differs, so a host that
//! renews during a CA rotation trusts the new CA too. The connection goes
//! on with the certificate it authenticated with; the next one uses the
//! new files (see `client_config`).
//!
//! A refusal or a failure is logged and tried again at the next check,
//! never in a loop: replication goes on either way, and the metric of days
//! left (`tidemark_shipper_certificate_expiry_seconds`) and its alert tell the
//! admin before the certificate expires.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tidemark_config::ShipperConfig;
use tidemark_durable::{Durability, FsDir};
use tidemark_metrics::{labels, Exposition, Unit};
use tidemark_names::Name;
use tidemark_net::renew::{self, RenewError};
use tidemark_wire::{Compression, Message, MessageDecoder, MessageType, Renewed};

/// How often a live connection looks at the certificate's expiry.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(3600);

/// How long the receiver may take to answer a renewal.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The most bytes an answer may have (a certificate and a CA bundle).
const MAX_ANSWER: usize = 160 << 10;

/// Why a renewal did not happen; the host keeps its certificate.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RenewFailed {
    /// The local files could not be read, or what came back is unusable.
    #[error(transparent)]
    Renew(#[from] RenewError),
    /// The request could not be encoded (a damaged key makes no request
    /// this large; kept typed).
    #[error("encoding the renewal request")]
    Encode(#[source] tidemark_wire::EncodeError),
    /// The stream could not be opened, written or read (the network).
    #[error("talking to the receiver: {0}")]
    Stream(String),
    /// The receiver took longer than [`ANSWER_TIMEOUT`].
    #[error("the receiver did not answer within {ANSWER_TIMEOUT:?}")]
    Timeout,
    /// The receiver's answer is not a frame or not a renewal answer.
    #[error("the receiver's answer is not a renewal answer: {0}")]
    BadAnswer(String),
    /// The receiver refused (it said why).
    #[error("the receiver refused: {0}")]
    Refused(String),
    /// The receiver answered with an error: an older release that cannot
    /// renew certificates, or it failed.
    #[error("the receiver cannot renew certificates: {0}")]
    Unsupported(String),
    /// The new certificate or CA bundle could not be stored (local disk).
    #[error("storing {}", path.display())]
    Store {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: tidemark_durable::ReplaceError,
    },
}

/// What the renewal of one connection needs.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    host: Name,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    before: Duration,
}

impl Settings {
    pub(crate) fn from_config(cfg: &ShipperConfig) -> Settings {
        Settings {
            host: cfg.host.clone(),
            ca: cfg.tls.ca.clone(),
            cert: cfg.tls.cert.clone(),
            key: cfg.tls.key.clone(),
            before: cfg.tls.renew_before.get(),
        }
    }
}

/// The renewal task of one connection: it ends with the connection (or
/// when dropped).
pub(crate) struct Renewer(tokio::task::JoinHandle<()>);

impl Drop for Renewer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Renewer {
    /// Watches the certificate's expiry while `conn` lives, renewing it
    /// over `conn` when it is due. `renew-before = "0s"` turns it off.
    pub(crate) fn start(conn: quinn::Connection, settings: Settings) -> Renewer {
        Renewer(tokio::spawn(async move {
            if settings.before.is_zero() {
                return;
            }
            loop {
                match due(&settings) {
                    Ok(false) => {}
                    Ok(true) => match renew_over(&conn, &settings).await {
                        Ok(not_after) => tracing::info!(
                            cert = %settings.cert.display(),
                            days_left = renew::days_left(not_after, now_unix()).floor(),
                            "renewed this host's certificate; the next connection uses it"
                        ),
                        Err(e) => tracing::warn!(
                            error = %error_chain(&e),
                            retry_in = ?CHECK_EVERY,
                            "cannot renew this host's certificate; replication goes on with the current one"
                        ),
                    },
                    Err(e) => tracing::warn!(
                        error = %error_chain(&e),
                        "cannot read this host's certificate to see when it expires"
                    ),
                }
                tokio::select! {
                    _ = tokio::time::sleep(CHECK_EVERY) => {}
                    _ = conn.closed() => return,
                }
            }
        }))
    }
}

fn now_unix() -> i64 {
    i64::try_from(tidemark_changelog::now_ns() / 1_000_000_000).unwrap_or(i64::MAX)
}

fn due(s: &Settings) -> Result<bool, RenewError> {
    let not_after = tokio::task::block_in_place(|| renew::certificate_not_after(&s.cert))?;
    Ok(renew::renewal_due(not_after, now_unix(), s.before))
}

/// Asks the receiver for a new certificate on a stream of its own and
/// stores it; returns the end of its validity (Unix seconds).
async fn renew_over(conn: &quinn::Connection, s: &Settings) -> Result<i64, RenewFailed> {
    let key_pem = tokio::task::block_in_place(|| tidemark_net::pki::read_text(&s.key))
        .map_err(RenewError::from)?;
    let csr = renew::renewal_request(&key_pem, &s.key, &s.host)?;
    let frame = Message::RenewRequest { csr }
        .encode(MessageType::RenewRequest.since(), Compression::None)
        .map_err(RenewFailed::Encode)?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| RenewFailed::Stream(e.to_string()))?;
    send.write_all(&frame)
        .await
        .map_err(|e| RenewFailed::Stream(e.to_string()))?;
    let _ = send.finish();
    let bytes = tokio::time::timeout(ANSWER_TIMEOUT, recv.read_to_end(MAX_ANSWER))
        .await
        .map_err(|_| RenewFailed::Timeout)?
        .map_err(|e| RenewFailed::Stream(e.to_string()))?;
    let mut decoder = MessageDecoder::new();
    decoder.feed(&bytes);
    let answer = decoder
        .next_message()
        .map_err(|e| RenewFailed::BadAnswer(e.to_string()))?
        .ok_or_else(|| RenewFailed::BadAnswer("the stream ended without one".into()))?;
    let (certificate, ca_bundle) = match answer.message {
        Message::Renewed(Renewed::Issued {
            certificate,
            ca_bundle,
        }) => (certificate, ca_bundle),
        Message::Renewed(Renewed::Refused { reason }) => return Err(RenewFailed::Refused(reason)),
        Message::Error { message, .. } => return Err(RenewFailed::Unsupported(message)),
        other => {
            return Err(RenewFailed::BadAnswer(format!(
                "a {} message",
                other.msg_type().name()
            )))
        }
    };
    let not_after = renew::check_renewed(&key_pem, &s.key, &s.host, &certificate, &ca_bundle)?;
    tokio::task::block_in_place(|| {
        // The CA bundle first: it holds every CA the receiver trusts, so
        // the host never holds a certificate of a CA it does not know.
        let current = std::fs::read_to_string(&s.ca).unwrap_or_default();
        if current != ca_bundle {
            store(&s.ca, &ca_bundle)?;
        }
        store(&s.cert, &certificate)
    })?;
    Ok(not_after)
}

/// Replaces `path` with `contents`, atomically and durably.
fn store(path: &Path, contents: &str) -> Result<(), RenewFailed> {
    let dir = FsDir::at(path.parent().unwrap_or(Path::new(".")));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = format!("{name}.renewed");
    tidemark_durable::replace(&dir, &tmp, &name, contents.as_bytes(), Durability::Durable).map_err(
        |source| RenewFailed::Store {
            path: path.to_path_buf(),
            source,
        },
    )
}

/// The client configuration from the files as they are now: a renewed
/// certificate or CA bundle is used from the next connection on.
pub(crate) fn client_config(
    cfg: &ShipperConfig,
) -> Result<quinn::ClientConfig, tidemark_net::tls::TlsError> {
    let mut client = tidemark_net::client_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    client.transport_config(Arc::new(tidemark_net::transport_config_with(
        cfg.liveness.keep_alive.get(),
        cfg.liveness.peer_timeout.get(),
    )));
    Ok(client)
}

/// Adds the time left until the certificate at `cert` expires to `e`;
/// nothing when it cannot be read (the connection's errors say why).
pub(crate) fn expose_expiry(e: &mut Exposition, cert: &Path, host: &str, now_ns: u64) {
    let Ok(not_after) = renew::certificate_not_after(cert) else {
        return;
    };
    let now = i64::try_from(now_ns / 1_000_000_000).unwrap_or(i64::MAX);
    e.gauge(
        "tidemark_shipper_certificate_expiry",
        "Time until this host's certificate expires (negative once expired); the shipper renews it renew-before ahead",
        Some(Unit::Seconds),
        &labels(&[("host", host)]),
        not_after.saturating_sub(now) as f64,
    );
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
