//! The console's HTTPS listener: TLS 1.3 with the console's certificate,
//! an optional client certificate that must be an admin's (signed by the
//! receiver's CA itself and carrying a console role, see
//! [`tidemark_net::role`]), and the admin it names handed to every request
//! of the connection ([`ConsolePeer`]). Handshakes run off the accept
//! loop, each with a time limit, so a stalled client holds up no one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use tidemark_config::ConsoleRole;
use tidemark_net::pki::{load_certs, load_key, PkiError};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// Why the console's TLS could not be set up (local configuration).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A certificate or key file could not be loaded.
    #[error(transparent)]
    Load(#[from] PkiError),
    /// The CA file holds something that is not a usable trust anchor.
    #[error("{} is not a usable CA certificate", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA.
    #[error("building the client certificate verifier from {}", path.display())]
    ClientVerifier {
        /// The CA file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The certificate and key cannot be used together, or TLS 1.3 is
    /// unavailable with the provider.
    #[error("the console certificate {} cannot be used with its key", cert.display())]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
}

/// An admin named by a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertAdmin {
    /// The certificate's name (first SAN DNS name, else CN).
    pub name: String,
    /// The console role it carries.
    pub role: ConsoleRole,
}

/// The peer of a console connection: its address and, if it presented
/// one, the admin certificate's holder.
#[derive(Debug, Clone)]
pub struct ConsolePeer {
    /// The client's address.
    pub addr: SocketAddr,
    /// The admin, when a certificate was presented (it was verified).
    pub admin: Option<CertAdmin>,
}

impl Connected<IncomingStream<'_, TlsListener>> for ConsolePeer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Why a client certificate is refused by the console although the CA
/// signed it: it carries no console role (a host's).
#[derive(thiserror::Error)]
#[error("the certificate carries no console role: a host certificate does not open the console (`tidemark receiver sign --admin`)")]
struct NotAnAdmin;

impl std::fmt::Debug for NotAnAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// The receiver CA's verifier, letting clients without a certificate in
/// (they log in with a password) and refusing a certificate without a
/// console role or one not issued by the CA itself.
#[derive(Debug)]
struct AdminsOnly(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for AdminsOnly {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let refuse = |e: Arc<dyn std::error::Error + Send + Sync>| {
            rustls::Error::from(rustls::CertificateError::Other(rustls::OtherError(e)))
        };
        // Verified without the intermediates the client sent (clients
        // often send the CA itself along): the only path left ends at the
        // CA right above the leaf, so a leaf an intermediate issued fails.
        let _ = intermediates;
        let verified = self.0.verify_client_cert(end_entity, &[], now)?;
        match tidemark_net::role::console_role(end_entity.as_ref()) {
            Ok(Some(_)) => Ok(verified),
            Ok(None) => Err(refuse(Arc::new(NotAnAdmin))),
            Err(e) => Err(refuse(Arc::new(e))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The console's TLS server configuration: `cert`/`key`, clients
/// optionally authenticated by an admin certificate of the CA in `ca`,
/// TLS 1.3, ALPN `http/1.1`.
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<rustls::ServerConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|source| TlsSetupError::BadCa {
            path: ca.to_owned(),
            source,
        })?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|source| TlsSetupError::ClientVerifier {
            path: ca.to_owned(),
            source,
        })?;
    let cert_key = |source| TlsSetupError::CertKey {
        cert: cert.to_owned(),
        source,
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cert_key)?
        .with_client_cert_verifier(Arc::new(AdminsOnly(verifier)))
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(cert_key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The admin a verified leaf certificate names.
fn admin_of(cert: &CertificateDer<'_>) -> Option<CertAdmin> {
    let role = tidemark_net::role::console_role(cert.as_ref()).ok()??;
    let name = tidemark_net::tls::host_from_certificate(cert).ok()?;
    Some(CertAdmin { name, role })
}

/// Accepts TCP connections, runs their TLS handshakes in tasks of their
/// own, and yields the finished ones.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, ConsolePeer)>,
}

impl TlsListener {
    /// Starts accepting on `tcp` with `config`.
    pub fn new(tcp: TcpListener, config: rustls::ServerConfig) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let (stream, addr) = match tcp.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "console: accepting a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let admin = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(admin_of);
                            let _ = tx.send((tls, ConsolePeer { addr, admin })).await;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(peer = %addr, error = %e, "console: TLS handshake refused")
                        }
                        Err(_) => tracing::info!(peer = %addr, "console: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = ConsolePeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // The accept task ends only when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(ConsolePeer {
            addr: self.local,
            admin: None,
        })
    }
}
