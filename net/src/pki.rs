//! The receiver's small certificate authority and host enrolment.
//!
//! Trust is set up once, by hand, with three steps:
//!
//! 1. On the receiver, [`init_receiver`] creates the CA and the receiver's own
//!    server certificate (SAN DNS = the name the shippers dial).
//! 2. On the protected host, [`host_request`] creates the host's private key
//!    (it never leaves the host) and a certificate signing request naming the
//!    host.
//! 3. Back on the receiver, [`sign_host`] checks the request and issues a
//!    client certificate for exactly the host the admin meant to enrol.
//!
//! The host name in the client certificate (SAN DNS and CN) *is* the host's
//! identity: the receiver maps it to that host's replicas, so a host can only
//! ever write its own. It is a [`Name`], as is the receiver's server name:
//! nothing here issues a certificate for a name that breaks the rule, and
//! the receiver refuses, at connection, one issued before the rule was
//! (see [`crate::tls::peer_host`]).
//!
//! Files (all PEM):
//!
//! | file           | where     | mode |
//! |----------------|-----------|------|
//! | `ca.crt`       | receiver, copied to hosts | 0644 |
//! | `ca.key`       | receiver  | 0600 |
//! | `receiver.crt` | receiver  | 0644 |
//! | `receiver.key` | receiver  | 0600 |
//! | `host.key`     | host      | 0600 |
//! | `host.csr`     | host → receiver | 0644 |
//! | `host.crt`     | receiver → host | 0644 |
//!
//! Files are created with `O_EXCL`: nothing here ever overwrites a key or a
//! certificate.

use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tidemark_names::Name;
use time::{Duration, OffsetDateTime};

/// The server name shippers expect in the receiver's certificate unless
/// configured otherwise.
pub const DEFAULT_SERVER_NAME: &str = "tidemark-receiver";
/// CA certificate file name in the receiver's PKI directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// CA private key file name in the receiver's PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Receiver (server) certificate file name.
pub const RECEIVER_CERT_FILE: &str = "receiver.crt";
/// Receiver (server) private key file name.
pub const RECEIVER_KEY_FILE: &str = "receiver.key";
/// Host private key file name in the host's PKI directory.
pub const HOST_KEY_FILE: &str = "host.key";
/// Host certificate signing request file name.
pub const HOST_CSR_FILE: &str = "host.csr";
/// Host certificate file name (as the CLI suggests to store it).
pub const HOST_CERT_FILE: &str = "host.crt";

/// How long the CA and the receiver certificate are valid.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// Default validity of a host certificate.
pub const DEFAULT_HOST_VALIDITY_DAYS: u32 = 825;
/// Longest validity [`sign_host`] accepts (the CA's own lifetime).
pub const MAX_HOST_VALIDITY_DAYS: u32 = CA_VALIDITY_DAYS;

/// Clock skew between the receiver and hosts that certificates tolerate:
/// `not_before` is set this far in the past.
const BACKDATE: Duration = Duration::hours(1);

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file that would be created already exists (local state; refusing to
    /// overwrite a key or certificate).
    #[error("{} already exists; refusing to overwrite it", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// Reading or writing a file failed (local disk or permissions).
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done ("reading", "creating", …).
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A file is not valid PEM of the expected kind (bad input file).
    #[error("{} does not hold a valid PEM {kind}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected in it ("certificate", "private key").
        kind: &'static str,
        /// The underlying error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file holds no certificate (bad input file).
    #[error("{} holds no certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The requested validity is out of range (caller's input).
    #[error("invalid validity of {days} days: must be 1 to {max}")]
    InvalidValidity {
        /// The requested number of days.
        days: u32,
        /// The largest accepted number.
        max: u32,
    },
    /// The certificate signing request cannot be parsed or its signature does
    /// not verify (bad request file).
    #[error("invalid certificate signing request: {reason}")]
    InvalidRequest {
        /// What is wrong with it.
        reason: String,
    },
    /// The request names another host than the admin said to sign for.
    #[error(
        "the certificate signing request is for {found}, not for {expected:?}; refusing to sign"
    )]
    RequestNameMismatch {
        /// The host the admin asked to sign for.
        expected: String,
        /// The names the request carries (CN and SAN), as text.
        found: String,
    },
    /// The CA's certificate or key could not be used for signing (damaged or
    /// foreign PKI directory).
    #[error("the CA in {} is not usable", dir.display())]
    BadCa {
        /// The PKI directory.
        dir: PathBuf,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// No CA certificate in the PKI directory belongs to the CA key (the
    /// key or the certificates were replaced by others).
    #[error("no CA certificate in {} belongs to its CA key", dir.display())]
    NoSigningCa {
        /// The PKI directory.
        dir: PathBuf,
    },
    /// Generating a key or certificate failed (should not happen with valid
    /// input; kept typed rather than a panic).
    #[error("generating the {what}")]
    Generate {
        /// What was being generated.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
}

/// What [`init_receiver`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverPki {
    /// The PKI directory.
    pub dir: PathBuf,
    /// The CA's common name (`tidemark CA <random id>`).
    pub ca_name: String,
    /// The name in the receiver certificate's SAN; shippers dial it.
    pub server_name: Name,
    /// `ca.crt`.
    pub ca_cert: PathBuf,
    /// `ca.key`.
    pub ca_key: PathBuf,
    /// `receiver.crt`.
    pub server_cert: PathBuf,
    /// `receiver.key`.
    pub server_key: PathBuf,
}

/// What [`host_request`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRequest {
    /// The host name the request is for.
    pub host: Name,
    /// `host.key`.
    pub key: PathBuf,
    /// `host.csr`.
    pub csr: PathBuf,
    /// The request itself (PEM), as written to `host.csr`.
    pub csr_pem: String,
}

/// Creates the receiver's PKI in `dir` (created with mode 0700 if missing):
/// a CA (ECDSA P-256, [`CA_VALIDITY_DAYS`]) and a server certificate signed
/// by it whose SAN DNS name is `server_name`. Refuses, before writing
/// anything, if any of the four files already exists.
pub fn init_receiver(dir: &Path, server_name: &Name) -> Result<ReceiverPki, PkiError> {
    let pki = ReceiverPki {
        dir: dir.to_path_buf(),
        ca_name: format!("tidemark CA {}", random_id()),
        server_name: server_name.clone(),
        ca_cert: dir.join(CA_CERT_FILE),
        ca_key: dir.join(CA_KEY_FILE),
        server_cert: dir.join(RECEIVER_CERT_FILE),
        server_key: dir.join(RECEIVER_KEY_FILE),
    };
    for path in [&pki.ca_cert, &pki.ca_key, &pki.server_cert, &pki.server_key] {
        refuse_existing(path)?;
    }

    let now = OffsetDateTime::now_utc();
    let ca_key = generate_key("CA key")?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = common_name(&pki.ca_name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.serial_number = Some(random_serial());
    ca_params.not_before = now - BACKDATE;
    ca_params.not_after = now + Duration::days(CA_VALIDITY_DAYS.into());
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| PkiError::Generate {
            what: "CA certificate",
            source,
        })?;

    let server_key = generate_key("receiver key")?;
    let mut server_params = CertificateParams::default();
    server_params.distinguished_name = common_name(server_name);
    server_params.subject_alt_names = vec![dns_san(server_name)?];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.use_authority_key_identifier_extension = true;
    server_params.serial_number = Some(random_serial());
    server_params.not_before = now - BACKDATE;
    // Never outlive the CA: a chain is only as valid as its shortest link.
    server_params.not_after = ca_params.not_after;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let server_cert = server_params
        .signed_by(&server_key, &issuer)
        .map_err(|source| PkiError::Generate {
            what: "receiver certificate",
            source,
        })?;

    create_private_dir(dir)?;
    // Keys first: a crash in between leaves a key without a certificate,
    // which a rerun reports, never a certificate whose key is lost.
    write_new_file(&pki.ca_key, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_new_file(
        &pki.server_key,
        server_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new_file(&pki.ca_cert, ca_cert.pem().as_bytes(), 0o644)?;
    write_new_file(&pki.server_cert, server_cert.pem().as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(pki)
}

/// Creates the host's private key (`host.key`, 0600) and a certificate
/// signing request (`host.csr`) with CN and SAN DNS = `host`, in `dir`
/// (created with mode 0700 if missing). Refuses to overwrite either file.
pub fn host_request(dir: &Path, host: &Name) -> Result<HostRequest, PkiError> {
    let key_path = dir.join(HOST_KEY_FILE);
    let csr_path = dir.join(HOST_CSR_FILE);
    refuse_existing(&key_path)?;
    refuse_existing(&csr_path)?;

    let key = generate_key("host key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(host);
    params.subject_alt_names = vec![dns_san(host)?];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|source| PkiError::Generate {
            what: "certificate signing request",
            source,
        })?;

    create_private_dir(dir)?;
    write_new_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new_file(&csr_path, csr.as_bytes(), 0o644)?;
    sync_dir(dir)?;
    Ok(HostRequest {
        host: host.clone(),
        key: key_path,
        csr: csr_path,
        csr_pem: csr,
    })
}

/// Issues a client certificate (EKU clientAuth, valid `days` days) for the
/// host that sent `csr_pem`, signed by the CA in `pki_dir`.
///
/// The request's signature must verify (the requester holds the key) and its
/// names must be exactly `expected_host`: a common name equal to it and, if
/// the request has a SAN extension, only that DNS name. The certificate's
/// contents come from here, not from the request: whatever else the request
/// asks for (CA rights, other usages) is not granted.
pub fn sign_host(
    pki_dir: &Path,
    csr_pem: &str,
    expected_host: &Name,
    days: u32,
) -> Result<String, PkiError> {
    check_validity(days)?;
    let ca_cert_path = pki_dir.join(CA_CERT_FILE);
    let ca_key_path = pki_dir.join(CA_KEY_FILE);
    let ca_cert_pem = read_text(&ca_cert_path)?;
    let ca_key_pem = read_text(&ca_key_path)?;
    sign_host_with(
        &ca_cert_pem,
        &ca_key_pem,
        pki_dir,
        csr_pem,
        expected_host,
        days,
    )
}

/// [`sign_host`] with the CA given as PEM text: `ca_certs_pem` holds one
/// or more CA certificates (during a CA rotation, the old and the new
/// one); the one whose public key is `ca_key_pem`'s signs. `ca_dir` names
/// where they came from, for errors.
pub fn sign_host_with(
    ca_certs_pem: &str,
    ca_key_pem: &str,
    ca_dir: &Path,
    csr_pem: &str,
    expected_host: &Name,
    days: u32,
) -> Result<String, PkiError> {
    check_validity(days)?;
    let csr_der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
            .map_err(|e| PkiError::InvalidRequest {
                reason: format!("not a PEM certificate request: {e}"),
            })?;
    check_request_names(&csr_der, expected_host)?;
    let mut request = CertificateSigningRequestParams::from_der(&csr_der).map_err(|e| {
        PkiError::InvalidRequest {
            reason: e.to_string(),
        }
    })?;

    let bad_ca = |source| PkiError::BadCa {
        dir: ca_dir.to_path_buf(),
        source,
    };
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(bad_ca)?;
    let ca_cert = signing_ca_cert(ca_certs_pem, &ca_key).ok_or_else(|| PkiError::NoSigningCa {
        dir: ca_dir.to_path_buf(),
    })?;
    let issuer = Issuer::from_ca_cert_der(&ca_cert, ca_key).map_err(bad_ca)?;

    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(expected_host);
    params.subject_alt_names = vec![dns_san(expected_host)?];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days.into());
    request.params = params;
    let cert = request
        .signed_by(&issuer)
        .map_err(|source| PkiError::Generate {
            what: "host certificate",
            source,
        })?;
    Ok(cert.pem())
}

/// A certificate and the private key made for it (both PEM): what
/// [`sign_admin`] and [`sign_console`] issue, the key made on the
/// receiver (an admin imports both into a browser).
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    /// The certificate, signed by the CA.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// Default validity of an admin certificate and of the console's server
/// certificate.
pub const DEFAULT_ADMIN_VALIDITY_DAYS: u32 = 397;

/// Issues a client certificate for the console admin `name` with `role`
/// (EKU `clientAuth` plus the role's OID, see [`crate::role`]), valid
/// `days` days, signed by the CA in `pki_dir`, with a new key. The
/// replication endpoint refuses it; only the console accepts it.
pub fn sign_admin(
    pki_dir: &Path,
    name: &Name,
    role: crate::role::ConsoleRole,
    days: u32,
) -> Result<IssuedCertificate, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(name);
    params.subject_alt_names = vec![dns_san(name)?];
    // rcgen takes OID arcs as u64 and ours is wider: the whole extension
    // is ours (and rcgen writes none of its own).
    params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(
        crate::role::EXTENDED_KEY_USAGE_OID,
        crate::role::extended_key_usage(role),
    )];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    issue_with_new_key(pki_dir, params, days, "admin certificate")
}

/// Issues the web console's server certificate for `address` (an IP
/// address or a DNS name: what the browser's address bar holds, which it
/// checks against the certificate's SAN), valid `days` days, signed by
/// the CA in `pki_dir`, with a new key.
pub fn sign_console(
    pki_dir: &Path,
    address: &str,
    days: u32,
) -> Result<IssuedCertificate, PkiError> {
    let san = match address.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => {
            let name = Name::new(address).map_err(|e| PkiError::InvalidRequest {
                reason: format!(
                    "the console address {address:?} is no IP address or host name: {e}"
                ),
            })?;
            dns_san(&name)?
        }
    };
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(address);
    params.subject_alt_names = vec![san];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    issue_with_new_key(pki_dir, params, days, "console certificate")
}

/// Issues the server certificate of another receiver node of the site
/// (several receivers sharing a Ceph store, each with a key of its own),
/// signed by the CA in `pki_dir`, with a new key: like the one
/// [`init_receiver`] makes, for the name shippers dial, `server_name`
/// (every node of the site answers to it: a shipper checks the name it
/// dials, not the node's address), valid `days` days.
pub fn sign_receiver(
    pki_dir: &Path,
    server_name: &Name,
    days: u32,
) -> Result<IssuedCertificate, PkiError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(server_name);
    params.subject_alt_names = vec![dns_san(server_name)?];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    issue_with_new_key(pki_dir, params, days, "receiver certificate")
}

fn issue_with_new_key(
    pki_dir: &Path,
    mut params: CertificateParams,
    days: u32,
    what: &'static str,
) -> Result<IssuedCertificate, PkiError> {
    check_validity(days)?;
    let ca_cert_pem = read_text(&pki_dir.join(CA_CERT_FILE))?;
    let ca_key_pem = read_text(&pki_dir.join(CA_KEY_FILE))?;
    let bad_ca = |source| PkiError::BadCa {
        dir: pki_dir.to_path_buf(),
        source,
    };
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(bad_ca)?;
    let ca_cert = signing_ca_cert(&ca_cert_pem, &ca_key).ok_or_else(|| PkiError::NoSigningCa {
        dir: pki_dir.to_path_buf(),
    })?;
    let issuer = Issuer::from_ca_cert_der(&ca_cert, ca_key).map_err(bad_ca)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| PkiError::Generate { what, source })?;
    let now = OffsetDateTime::now_utc();
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days.into());
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|source| PkiError::Generate { what, source })?;
    Ok(IssuedCertificate {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn check_validity(days: u32) -> Result<(), PkiError> {
    if days == 0 || days > MAX_HOST_VALIDITY_DAYS {
        return Err(PkiError::InvalidValidity {
            days,
            max: MAX_HOST_VALIDITY_DAYS,
        });
    }
    Ok(())
}

/// The certificate in `ca_certs_pem` whose public key is `key`'s, if any.
pub fn signing_ca_cert(ca_certs_pem: &str, key: &KeyPair) -> Option<CertificateDer<'static>> {
    use rcgen::PublicKeyData;
    CertificateDer::pem_slice_iter(ca_certs_pem.as_bytes())
        .filter_map(Result::ok)
        .find(|der| {
            x509_parser::parse_x509_certificate(der.as_ref()).is_ok_and(|(_, cert)| {
                cert.tbs_certificate
                    .subject_pki
                    .subject_public_key
                    .data
                    .as_ref()
                    == key.der_bytes()
            })
        })
}

/// Verifies the request's signature and that every name in it is `expected`.
///
/// Done with x509-parser directly, before rcgen sees the request, so that
/// malformed subjects are reported as errors (rcgen assumes well-formed ones)
/// and the admin learns which name the request really carries.
fn check_request_names(
    csr_der: &rustls_pki_types::CertificateSigningRequestDer<'_>,
    expected: &str,
) -> Result<(), PkiError> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    let invalid = |reason: String| PkiError::InvalidRequest { reason };
    let (rest, csr) = X509CertificationRequest::from_der(csr_der.as_ref())
        .map_err(|e| invalid(format!("cannot parse it: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after the request".into()));
    }
    csr.verify_signature()
        .map_err(|e| invalid(format!("its signature does not verify: {e}")))?;

    let subject = &csr.certification_request_info.subject;
    if subject.iter_rdn().any(|rdn| rdn.iter().count() != 1) {
        return Err(invalid(
            "its subject has an empty or multi-valued name".into(),
        ));
    }
    let mut found = Vec::new();
    let mut all_match = true;
    let mut common_names = 0;
    for cn in subject.iter_common_name() {
        common_names += 1;
        match cn.as_str() {
            Ok(name) => {
                all_match &= name == expected;
                found.push(format!("CN={name}"));
            }
            Err(_) => {
                all_match = false;
                found.push("CN=<not a string>".into());
            }
        }
    }
    if common_names != 1 {
        all_match = false;
    }
    if let Some(extensions) = csr.requested_extensions() {
        for ext in extensions {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(dns) => {
                            all_match &= *dns == expected;
                            found.push(format!("DNS={dns}"));
                        }
                        other => {
                            all_match = false;
                            found.push(format!("{other}"));
                        }
                    }
                }
            }
        }
    }
    if all_match {
        Ok(())
    } else {
        Err(PkiError::RequestNameMismatch {
            expected: expected.to_owned(),
            found: if found.is_empty() {
                "no name".into()
            } else {
                found.join(", ")
            },
        })
    }
}

/// Loads every certificate from the PEM file at `path` (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = read_bytes(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PkiError::Pem {
            path: path.to_path_buf(),
            kind: "certificate",
            source,
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Loads the (first) private key from the PEM file at `path`.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = read_bytes(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| PkiError::Pem {
        path: path.to_path_buf(),
        kind: "private key",
        source,
    })
}

/// Creates `path` with `mode` and writes `contents`, durably; fails with
/// [`PkiError::Exists`] if the file exists (never overwrites).
pub fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                PkiError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                PkiError::Io {
                    what: "creating",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| PkiError::Io {
            what: "writing",
            path: path.to_path_buf(),
            source,
        })
}

fn refuse_existing(path: &Path) -> Result<(), PkiError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Err(PkiError::Exists {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PkiError::Io {
            what: "checking",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            what: "creating directory",
            path: dir.to_path_buf(),
            source,
        })
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), PkiError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| PkiError::Io {
            what: "syncing directory",
            path: dir.to_path_buf(),
            source,
        })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|source| PkiError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a PEM (or any text) file.
pub fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn generate_key(what: &'static str) -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|source| PkiError::Generate { what, source })
}

pub(crate) fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

pub(crate) fn dns_san(name: &Name) -> Result<SanType, PkiError> {
    // Names are ASCII, so this cannot fail; keep it typed anyway.
    name.as_str()
        .to_owned()
        .try_into()
        .map(SanType::DnsName)
        .map_err(|source| PkiError::Generate {
            what: "subject alternative name",
            source,
        })
}

/// A positive 16-byte serial: unique per certificate, unlike rcgen's default
/// (a hash of the public key, which repeats when a key is re-signed).
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn random_id() -> String {
    let mut bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
