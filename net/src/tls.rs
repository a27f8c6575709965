//! Mutual TLS for the shipper → receiver QUIC connection.
//!
//! Both ends trust exactly one CA, the receiver's (never the system roots):
//! the receiver requires a client certificate issued by it, and the shipper
//! requires the receiver's certificate to be issued by it for the configured
//! server name. A host certificate must be signed by the CA itself: a chain
//! through an intermediate CA is refused even where WebPKI rules would let
//! it verify (they do not apply the CA's own `pathlen:0` to the trust
//! anchor). TLS 1.3 only (QUIC has no other), ALPN [`ALPN`], and the
//! *ring* crypto provider only: the process must never depend on a
//! process-wide default provider being installed.

use crate::endpoint::transport_config;
use crate::pki::{load_certs, load_key, PkiError};
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_names::{Name, NameError};

/// The application protocol both ends announce; a peer speaking anything
/// else is refused during the handshake.
pub const ALPN: &[u8] = b"tidemark/1";

/// Why a TLS configuration could not be built (local configuration: the
/// files given are missing, damaged or do not belong together).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be loaded.
    #[error(transparent)]
    Load(#[from] PkiError),
    /// The CA file holds something that is not a usable trust anchor.
    #[error("{} is not a usable CA certificate", path.display())]
    BadCa {
        /// The CA file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built from the CA.
    #[error("building the client certificate verifier from {}", path.display())]
    ClientVerifier {
        /// The CA file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// The certificate and key cannot be used together (mismatch, or an
    /// unsupported key type).
    #[error("the certificate {} and key {} cannot be used", cert.display(), key.display())]
    CertKey {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The underlying error.
        #[source]
        source: rustls::Error,
    },
    /// The crypto provider does not offer TLS 1.3 (should not happen with ring).
    #[error("the crypto provider does not support TLS 1.3")]
    Protocol(#[source] rustls::Error),
    /// The TLS configuration lacks the cipher suite QUIC's initial packets need.
    #[error("the TLS configuration cannot be used for QUIC")]
    Quic(#[source] NoInitialCipherSuite),
}

/// Why the authenticated peer's host name could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum PeerIdentityError {
    /// The peer presented no certificate (the handshake has not completed, or
    /// this end did not require one).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The peer's certificate cannot be parsed.
    #[error("the peer's certificate cannot be parsed: {reason}")]
    Unparseable {
        /// What is wrong with it.
        reason: String,
    },
    /// The peer's certificate names no host (no SAN DNS name, no CN).
    #[error("the peer's certificate names no host")]
    NoName,
    /// The peer's certificate names a host that breaks the rule of names
    /// (issued before the rule, or by hand): refused, since the name would
    /// become the path of the host's replicas.
    #[error(
        "the peer's certificate names the host {name:?}, which is not a valid name; \
         enrol the host again under a valid name (`tidemark host request`, \
         `tidemark receiver sign`)"
    )]
    InvalidName {
        /// The name as the certificate spells it.
        name: String,
        /// What is wrong with it.
        #[source]
        source: NameError,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|source| TlsError::BadCa {
            path: ca.to_path_buf(),
            source,
        })?;
    }
    Ok(Arc::new(roots))
}

/// Why a host certificate that verifies under WebPKI rules is still refused.
/// rustls shows it with `Debug` in its handshake error (what the receiver
/// logs), so `Debug` says the sentence too.
#[derive(thiserror::Error)]
#[error(
    "the host certificate came with {intermediates} intermediate CA certificate(s); \
     only certificates the receiver's CA signed itself are accepted \
     (enrol the host with `tidemark receiver sign`)"
)]
pub struct IntermediateRefused {
    /// How many intermediates the peer presented.
    pub intermediates: usize,
}

impl std::fmt::Debug for IntermediateRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// Why a certificate of the receiver's CA is refused on the replication
/// endpoint: it is an admin's, for the web console (see [`crate::role`]).
#[derive(thiserror::Error)]
#[error(
    "the certificate is a console admin's ({role}); an admin certificate must not replicate as a host"
)]
pub struct AdminRefused {
    /// The console role it carries.
    pub role: crate::role::ConsoleRole,
}

impl std::fmt::Debug for AdminRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// Why a certificate of the receiver's CA is refused on the replication
/// endpoint: its console roles cannot be read (see [`crate::role`]), so it
/// is not taken for a host's either.
#[derive(thiserror::Error)]
#[error("the certificate's console role cannot be read ({0}); it does not replicate as a host")]
pub struct RoleUnreadable(#[source] pub crate::role::RoleError);

impl std::fmt::Debug for RoleUnreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

/// WebPKI client verification against the receiver's CA, restricted to
/// chains of length one: the CA is made `pathlen:0`, but WebPKI does not
/// apply a trust anchor's own constraints, so a leaf issued by an
/// intermediate the CA once signed would otherwise verify. A certificate
/// carrying a console role is refused too ([`AdminRefused`]).
#[derive(Debug)]
struct CaSignedOnly(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for CaSignedOnly {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
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
        // Refused before any path building: with no intermediates the only
        // path WebPKI can find ends at the CA right above the leaf.
        if !intermediates.is_empty() {
            let refused = IntermediateRefused {
                intermediates: intermediates.len(),
            };
            return Err(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(refused))).into(),
            );
        }
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        // An admin certificate is signed by the same CA; it opens the
        // console and nothing else. One whose roles cannot be read (or
        // that names two) is not taken for a host's either.
        match crate::role::console_role(end_entity.as_ref()) {
            Ok(None) => Ok(verified),
            Ok(Some(role)) => {
                let refused = AdminRefused { role };
                Err(rustls::CertificateError::Other(rustls::OtherError(Arc::new(refused))).into())
            }
            Err(e) => {
                let refused = RoleUnreadable(e);
                Err(rustls::CertificateError::Other(rustls::OtherError(Arc::new(refused))).into())
            }
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

    fn requires_raw_public_keys(&self) -> bool {
        self.0.requires_raw_public_keys()
    }
}

/// The receiver's QUIC server configuration: presents `cert`/`key`, requires
/// every client to present a certificate issued by the CA in `ca` itself
/// (no other CA, no intermediate), TLS 1.3, ALPN [`ALPN`], transport tuning from
/// [`transport_config`].
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider.clone())
        .build()
        .map_err(|source| TlsError::ClientVerifier {
            path: ca.to_path_buf(),
            source,
        })?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .with_client_cert_verifier(Arc::new(CaSignedOnly(verifier)))
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::CertKey {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(TlsError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The shipper's QUIC client configuration: trusts only the CA in `ca`,
/// presents the host certificate `cert` with `key`, TLS 1.3, ALPN [`ALPN`],
/// transport tuning from [`transport_config`]. The server name to expect is
/// given per connection (`quinn::Endpoint::connect_with`).
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Protocol)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|source| TlsError::CertKey {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        })?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(TlsError::Quic)?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// The authenticated host name of the peer of `conn`: the first SAN DNS name
/// of its certificate, else its common name; it must be a [`Name`].
///
/// On the receiver this is the identity that selects the host's replicas;
/// the certificate was verified against the CA during the handshake.
pub fn peer_host(conn: &quinn::Connection) -> Result<Name, PeerIdentityError> {
    let identity = conn
        .peer_identity()
        .ok_or(PeerIdentityError::NoCertificate)?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| PeerIdentityError::Unparseable {
            reason: "the TLS session holds no X.509 chain".into(),
        })?;
    let leaf = certs.first().ok_or(PeerIdentityError::NoCertificate)?;
    let name = host_from_certificate(leaf)?;
    Name::new(name.clone()).map_err(|source| PeerIdentityError::InvalidName { name, source })
}

/// The host name a certificate names: its first SAN DNS name, else its
/// common name.
pub fn host_from_certificate(cert: &CertificateDer<'_>) -> Result<String, PeerIdentityError> {
    use x509_parser::extensions::GeneralName;
    let unparseable = |e: &dyn std::fmt::Display| PeerIdentityError::Unparseable {
        reason: e.to_string(),
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| unparseable(&e))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| unparseable(&e))?;
    if let Some(san) = san {
        let dns = san.value.general_names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some(*dns),
            _ => None,
        });
        if let Some(dns) = dns {
            return Ok(dns.to_owned());
        }
    }
    let common_name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    common_name.ok_or(PeerIdentityError::NoName)
}
