//! Renewing a host certificate before it expires, over the connection the
//! host has already authenticated with: the shipper asks (`renew-request`,
//! a certificate signing request), the receiver signs (`renewed`).
//!
//! - The host keeps its key: the request is signed with `host.key`, so only
//!   `host.crt` changes, and a single file is replaced atomically (the
//!   shipper writes it under a temporary name and renames it over the old
//!   one). To change the key, enrol the host again.
//! - The receiver signs for the name of the connection's certificate,
//!   never for a name the request carries: a request naming any other host
//!   is refused ([`RenewalSigner::sign`]). A revoked host cannot connect, so
//!   it cannot renew either.
//! - The receiver sends the CA certificates it trusts with the new
//!   certificate. During a CA rotation that bundle holds the old and the
//!   new CA, so a host that renews learns the new CA before the old one is
//!   retired; the shipper stores it as its `ca.crt`.
//! - The shipper checks what it receives before storing it: the same host
//!   name, its own public key, a signature by a CA of the bundle
//!   ([`check_renewed`]). A receiver cannot make it store a certificate it
//!   could not use.

use crate::pki::{self, PkiError};
use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_names::Name;

/// How long before expiry a host renews unless configured otherwise.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// Why a renewal could not be asked for, or what the receiver sent back
/// cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// A certificate or key file could not be read (local disk).
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// The host key cannot sign a request (damaged key file).
    #[error("the host key {} cannot sign a renewal request", path.display())]
    Key {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate cannot be parsed (local file, or what the receiver
    /// sent).
    #[error("{what} cannot be parsed: {reason}")]
    Unparseable {
        /// Which certificate.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The receiver sent a certificate for another key (the receiver's
    /// fault).
    #[error("the renewed certificate is not for this host's key")]
    OtherKey,
    /// The receiver sent a certificate for another host (the receiver's
    /// fault).
    #[error("the renewed certificate names {found:?}, not this host {expected:?}")]
    OtherName {
        /// This host.
        expected: String,
        /// The name in the certificate.
        found: String,
    },
    /// No CA certificate the receiver sent signed the new certificate (the
    /// receiver's fault).
    #[error("the renewed certificate is not signed by a CA the receiver sent")]
    NotSigned,
}

/// A certificate signing request for `host` with the key in `key_pem`
/// (read from `key_path`, named in errors).
pub fn renewal_request(key_pem: &str, key_path: &Path, host: &Name) -> Result<String, RenewError> {
    let key_error = |source| RenewError::Key {
        path: key_path.to_path_buf(),
        source,
    };
    let key = KeyPair::from_pem(key_pem).map_err(key_error)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = pki::common_name(host);
    params.subject_alt_names = vec![pki::dns_san(host)?];
    params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(key_error)
}

/// The end of a certificate's validity, in seconds since the Unix epoch.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<i64, RenewError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|e| {
        RenewError::Unparseable {
            what: "the certificate",
            reason: e.to_string(),
        }
    })?;
    Ok(parsed.validity().not_after.timestamp())
}

/// The first certificate of the PEM file at `path` and the end of its
/// validity (seconds since the Unix epoch).
pub fn certificate_not_after(path: &Path) -> Result<i64, RenewError> {
    let certs = pki::load_certs(path)?;
    not_after(&certs[0])
}

/// Whether a certificate valid until `not_after` (Unix seconds) is due for
/// renewal at `now`: it expires within `before`.
pub fn renewal_due(not_after: i64, now: i64, before: Duration) -> bool {
    let before = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
    not_after.saturating_sub(now) <= before
}

/// Days (fractional) from `now` to `not_after`, both Unix seconds;
/// negative once expired.
pub fn days_left(not_after: i64, now: i64) -> f64 {
    (not_after.saturating_sub(now)) as f64 / 86_400.0
}

/// Checks a renewed certificate (`cert_pem`) before the host stores it:
/// it names `host`, holds the public key of `key_pem`, and one of the CA
/// certificates in `ca_bundle_pem` signed it. Returns the end of its
/// validity (Unix seconds).
pub fn check_renewed(
    key_pem: &str,
    key_path: &Path,
    host: &Name,
    cert_pem: &str,
    ca_bundle_pem: &str,
) -> Result<i64, RenewError> {
    use rcgen::PublicKeyData;
    let unparseable = |what: &'static str| {
        move |e: &dyn std::fmt::Display| RenewError::Unparseable {
            what,
            reason: e.to_string(),
        }
    };
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| unparseable("the renewed certificate")(&e))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| unparseable("the renewed certificate")(&e))?;
    let found = crate::tls::host_from_certificate(&der)
        .map_err(|e| unparseable("the renewed certificate")(&e))?;
    if found != host.as_str() {
        return Err(RenewError::OtherName {
            expected: host.to_string(),
            found,
        });
    }
    let key = KeyPair::from_pem(key_pem).map_err(|source| RenewError::Key {
        path: key_path.to_path_buf(),
        source,
    })?;
    if cert.public_key().subject_public_key.data.as_ref() != key.der_bytes() {
        return Err(RenewError::OtherKey);
    }
    let signed = CertificateDer::pem_slice_iter(ca_bundle_pem.as_bytes())
        .filter_map(Result::ok)
        .any(|ca| {
            x509_parser::parse_x509_certificate(ca.as_ref())
                .is_ok_and(|(_, ca)| cert.verify_signature(Some(ca.public_key())).is_ok())
        });
    if !signed {
        return Err(RenewError::NotSigned);
    }
    Ok(cert.validity().not_after.timestamp())
}

/// What the receiver sends a host that asked to renew.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The new host certificate (PEM).
    pub certificate: String,
    /// Every CA certificate the receiver trusts (PEM, one or more).
    pub ca_bundle: String,
}

/// The receiver's side: signs renewals with its CA.
#[derive(Debug, Clone)]
pub struct RenewalSigner {
    /// The CA certificates the receiver trusts (PEM, one or more: the
    /// receiver's `ca`).
    pub ca: PathBuf,
    /// The CA key that signs (`ca-key`); the certificate in `ca` whose
    /// public key it is signs.
    pub ca_key: PathBuf,
    /// Validity of a renewed certificate, in days.
    pub days: u32,
}

impl RenewalSigner {
    /// Signs a new certificate for `host` (the name of the certificate the
    /// connection authenticated with) from `csr_pem`, which must name
    /// exactly that host. The files are read at each renewal, so a new CA
    /// introduced on disk signs from the next one.
    pub fn sign(&self, host: &Name, csr_pem: &str) -> Result<Renewal, PkiError> {
        let ca_bundle = pki::read_text(&self.ca)?;
        let ca_key = pki::read_text(&self.ca_key)?;
        let dir = self.ca_key.parent().unwrap_or(Path::new("."));
        let certificate = pki::sign_host_with(&ca_bundle, &ca_key, dir, csr_pem, host, self.days)?;
        Ok(Renewal {
            certificate,
            ca_bundle,
        })
    }
}
