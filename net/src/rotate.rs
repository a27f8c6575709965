//! Rotating the receiver's CA without enrolling every host again.
//!
//! 1. [`introduce_ca`] creates a new CA beside the old one: `ca.crt`
//!    becomes the bundle of both (the receiver accepts hosts of either, and
//!    sends the bundle with every renewal), `ca.key` becomes the new CA's
//!    key (renewals and `tidemark receiver sign` are signed by it), and the
//!    old CA is kept as `ca-retiring.crt` / `ca-retiring.key`. The
//!    receiver's own certificate stays the old CA's: hosts that have not
//!    renewed yet trust only that one.
//! 2. Hosts move to certificates of the new CA as they renew; each renewal
//!    also gives them the bundle, so they trust the new CA too.
//! 3. [`retire_ca`] ends the rotation: a new receiver certificate (same
//!    key, same name) from the new CA, `ca.crt` without the old CA, the
//!    retiring files removed. Hosts still holding a certificate of the old
//!    CA are refused from then on; [`issued_by`] tells which ones do.
//!
//! Each step replaces files atomically (written beside, made durable,
//! renamed), keys first.

use crate::pki::{self, PkiError, CA_CERT_FILE, CA_KEY_FILE, RECEIVER_CERT_FILE};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use tidemark_names::Name;
use time::{Duration, OffsetDateTime};

/// The old CA's certificate during a rotation.
pub const RETIRING_CERT_FILE: &str = "ca-retiring.crt";
/// The old CA's key during a rotation.
pub const RETIRING_KEY_FILE: &str = "ca-retiring.key";

/// Why a rotation step could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    /// Reading or writing the PKI files failed, or they are damaged.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A rotation is already in progress (`ca-retiring.crt` exists):
    /// retire the old CA before introducing another.
    #[error("a CA rotation is already in progress in {}: retire the old CA first", dir.display())]
    InProgress {
        /// The PKI directory.
        dir: PathBuf,
    },
    /// No rotation is in progress: there is no old CA to retire.
    #[error("no CA rotation is in progress in {} (no {RETIRING_CERT_FILE})", dir.display())]
    NotInProgress {
        /// The PKI directory.
        dir: PathBuf,
    },
    /// A file could not be replaced (local disk).
    #[error("replacing {}", path.display())]
    Replace {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The receiver's certificate names no valid server name.
    #[error("the receiver certificate {} names no valid server name", path.display())]
    ServerName {
        /// The certificate.
        path: PathBuf,
    },
    /// Generating the new CA or certificate failed.
    #[error("generating the {what}")]
    Generate {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
}

/// What [`introduce_ca`] did.
#[derive(Debug, Clone)]
pub struct Introduced {
    /// The new CA's common name.
    pub ca_name: String,
}

fn replace(path: &Path, contents: &[u8]) -> Result<(), RotateError> {
    let dir = tidemark_durable::FsDir::at(path.parent().unwrap_or(Path::new(".")));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tidemark_durable::replace(
        &dir,
        &format!("{name}.new"),
        &name,
        contents,
        tidemark_durable::Durability::Durable,
    )
    .map_err(|e| RotateError::Replace {
        path: path.to_path_buf(),
        source: e.into(),
    })
}

/// Introduces a new CA in the receiver's PKI directory `dir` (see the
/// module). Refuses while a rotation is in progress.
pub fn introduce_ca(dir: &Path) -> Result<Introduced, RotateError> {
    let retiring_cert = dir.join(RETIRING_CERT_FILE);
    let retiring_key = dir.join(RETIRING_KEY_FILE);
    if retiring_cert.exists() {
        return Err(RotateError::InProgress {
            dir: dir.to_path_buf(),
        });
    }
    let old_cert = pki::read_text(&dir.join(CA_CERT_FILE))?;
    let old_key = pki::read_text(&dir.join(CA_KEY_FILE))?;
    let ca_name = format!("tidemark CA {}", random_id());
    let now = OffsetDateTime::now_utc();
    let key = pki::generate_key("CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = pki::common_name(&ca_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(pki::random_serial());
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(pki::CA_VALIDITY_DAYS.into());
    let cert = params
        .self_signed(&key)
        .map_err(|source| RotateError::Generate {
            what: "new CA certificate",
            source,
        })?;
    // The old CA kept first (a crash leaves it findable), then the new key,
    // then the bundle.
    pki::write_new_file(&retiring_key, old_key.as_bytes(), 0o600)?;
    pki::write_new_file(&retiring_cert, old_cert.as_bytes(), 0o644)?;
    replace(&dir.join(CA_KEY_FILE), key.serialize_pem().as_bytes())?;
    let mut bundle = old_cert;
    if !bundle.ends_with('\n') {
        bundle.push('\n');
    }
    bundle.push_str(&cert.pem());
    replace(&dir.join(CA_CERT_FILE), bundle.as_bytes())?;
    Ok(Introduced { ca_name })
}

/// Whether `cert` was signed by the CA certificate `ca`.
pub fn issued_by(cert: &CertificateDer<'_>, ca: &CertificateDer<'_>) -> bool {
    let (Ok((_, cert)), Ok((_, ca))) = (
        x509_parser::parse_x509_certificate(cert.as_ref()),
        x509_parser::parse_x509_certificate(ca.as_ref()),
    ) else {
        return false;
    };
    cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// The old CA of a rotation in progress in `dir`, if any.
pub fn retiring_ca(dir: &Path) -> Result<Option<CertificateDer<'static>>, PkiError> {
    let path = dir.join(RETIRING_CERT_FILE);
    if !path.exists() {
        return Ok(None);
    }
    Ok(pki::load_certs(&path)?.into_iter().next())
}

/// Ends the rotation in `dir` (see the module): the receiver certificate
/// is issued again by the new CA, the old CA leaves `ca.crt`, and the
/// retiring files are removed. The caller has checked that no host still
/// needs the old CA.
pub fn retire_ca(dir: &Path) -> Result<(), RotateError> {
    let Some(old) = retiring_ca(dir)? else {
        return Err(RotateError::NotInProgress {
            dir: dir.to_path_buf(),
        });
    };
    let bundle = pki::read_text(&dir.join(CA_CERT_FILE))?;
    let ca_key_pem = pki::read_text(&dir.join(CA_KEY_FILE))?;
    let bad_ca = |source| PkiError::BadCa {
        dir: dir.to_path_buf(),
        source,
    };
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(bad_ca)?;
    let new_ca = pki::signing_ca_cert(&bundle, &ca_key).ok_or_else(|| PkiError::NoSigningCa {
        dir: dir.to_path_buf(),
    })?;
    let issuer = Issuer::from_ca_cert_der(&new_ca, ca_key).map_err(bad_ca)?;

    let server_path = dir.join(RECEIVER_CERT_FILE);
    let server_der = pki::load_certs(&server_path)?.remove(0);
    let server_name = crate::tls::host_from_certificate(&server_der)
        .ok()
        .and_then(|n| Name::new(n).ok())
        .ok_or_else(|| RotateError::ServerName {
            path: server_path.clone(),
        })?;
    let server_key_pem = pki::read_text(&dir.join(pki::RECEIVER_KEY_FILE))?;
    let server_key = KeyPair::from_pem(&server_key_pem).map_err(bad_ca)?;
    let (_, new_ca_parsed) =
        x509_parser::parse_x509_certificate(new_ca.as_ref()).map_err(|_| {
            PkiError::NoSigningCa {
                dir: dir.to_path_buf(),
            }
        })?;
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = pki::common_name(&server_name);
    params.subject_alt_names = vec![pki::dns_san(&server_name)?];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(pki::random_serial());
    params.not_before = now - Duration::hours(1);
    params.not_after =
        OffsetDateTime::from_unix_timestamp(new_ca_parsed.validity().not_after.timestamp())
            .unwrap_or(now + Duration::days(pki::CA_VALIDITY_DAYS.into()));
    let server_cert =
        params
            .signed_by(&server_key, &issuer)
            .map_err(|source| RotateError::Generate {
                what: "receiver certificate",
                source,
            })?;

    let kept: String = pem_blocks(&bundle)
        .into_iter()
        .filter(|b| {
            CertificateDer::from_pem_slice(b.as_bytes())
                .map_or(true, |c| c.as_ref() != old.as_ref())
        })
        .collect();
    replace(&server_path, server_cert.pem().as_bytes())?;
    replace(&dir.join(CA_CERT_FILE), kept.as_bytes())?;
    for file in [RETIRING_CERT_FILE, RETIRING_KEY_FILE] {
        let path = dir.join(file);
        fs::remove_file(&path).map_err(|source| RotateError::Replace { path, source })?;
    }
    pki::sync_dir(dir)?;
    Ok(())
}

/// The PEM certificate blocks of `text`, each with its end line.
fn pem_blocks(text: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter(|b| b.contains(END))
        .map(|b| format!("{}\n", b.trim_start()))
        .collect()
}

fn random_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
