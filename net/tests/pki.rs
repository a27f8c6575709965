//! The receiver CA and host enrolment on real files: what is created, with
//! which modes, what is refused, and what the issued certificates say.

use rustls_pki_types::pem::PemObject;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use tidemark_names::Name;
use tidemark_net::pki::{self, PkiError};
use tidemark_net::tls::host_from_certificate;
use x509_parser::prelude::*;

const HOST: &str = "db-01.example";

fn n(name: &str) -> Name {
    Name::new(name).unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn parse_pem_cert(pem: &str) -> Vec<u8> {
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[test]
fn init_creates_a_ca_and_a_server_certificate_with_private_modes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let created = pki::init_receiver(&dir, &n("replica.example")).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&created.ca_key), 0o600);
    assert_eq!(mode(&created.server_key), 0o600);
    assert_eq!(mode(&created.ca_cert), 0o644);
    assert_eq!(mode(&created.server_cert), 0o644);
    assert!(
        created.ca_name.starts_with("tidemark CA "),
        "{}",
        created.ca_name
    );

    let ca_der = pki::load_certs(&created.ca_cert).unwrap().remove(0);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    assert!(ca.is_ca());
    assert_eq!(
        ca.subject()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap(),
        created.ca_name
    );
    let years = (ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp())
        / (365 * 86400);
    assert!((9..=10).contains(&years), "{years}");

    let server_der = pki::load_certs(&created.server_cert).unwrap().remove(0);
    assert_eq!(
        host_from_certificate(&server_der).unwrap(),
        "replica.example"
    );
    let (_, server) = X509Certificate::from_der(&server_der).unwrap();
    assert!(!server.is_ca());
    assert_eq!(server.issuer(), ca.subject());
    server.verify_signature(Some(ca.public_key())).unwrap();
    let eku = server.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    // The key on disk is the one the certificate is for.
    pki::load_key(&created.server_key).unwrap();
}

#[test]
fn two_receivers_get_different_cas() {
    let tmp = tempfile::tempdir().unwrap();
    let a = pki::init_receiver(&tmp.path().join("a"), &n("r")).unwrap();
    let b = pki::init_receiver(&tmp.path().join("b"), &n("r")).unwrap();
    assert_ne!(a.ca_name, b.ca_name);
    assert_ne!(fs::read(&a.ca_key).unwrap(), fs::read(&b.ca_key).unwrap());
}

#[test]
fn init_refuses_to_overwrite_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let created = pki::init_receiver(&dir, &n(pki::DEFAULT_SERVER_NAME)).unwrap();
    let ca_before = fs::read(&created.ca_key).unwrap();
    let err = pki::init_receiver(&dir, &n(pki::DEFAULT_SERVER_NAME)).unwrap_err();
    assert!(
        matches!(&err, PkiError::Exists { path } if path.ends_with("ca.crt")),
        "{err:?}"
    );
    assert!(err.to_string().contains("ca.crt"), "{err}");
    assert_eq!(fs::read(&created.ca_key).unwrap(), ca_before);

    // A single leftover file is enough to refuse, and nothing else is written.
    let other = tmp.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("receiver.key"), "precious").unwrap();
    let err = pki::init_receiver(&other, &n(pki::DEFAULT_SERVER_NAME)).unwrap_err();
    assert!(
        matches!(&err, PkiError::Exists { path } if path.ends_with("receiver.key")),
        "{err:?}"
    );
    assert_eq!(fs::read_dir(&other).unwrap().count(), 1);
    assert_eq!(
        fs::read_to_string(other.join("receiver.key")).unwrap(),
        "precious"
    );
}

#[test]
fn host_request_writes_a_private_key_and_a_request_naming_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("host");
    let request = pki::host_request(&dir, &n(HOST)).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&request.key), 0o600);
    assert_eq!(fs::read_to_string(&request.csr).unwrap(), request.csr_pem);
    assert!(request
        .csr_pem
        .starts_with("-----BEGIN CERTIFICATE REQUEST-----"));

    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(request.csr_pem.as_bytes())
            .unwrap();
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref()).unwrap();
    csr.verify_signature().unwrap();
    let info = &csr.certification_request_info;
    let cn = info
        .subject
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap();
    assert_eq!(cn, HOST);
    let sans: Vec<String> = csr
        .requested_extensions()
        .unwrap()
        .filter_map(|e| match e {
            ParsedExtension::SubjectAlternativeName(san) => Some(
                san.general_names
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>(),
            ),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(sans, vec![format!("DNSName({HOST})")]);

    let err = pki::host_request(&dir, &n(HOST)).unwrap_err();
    assert!(
        matches!(&err, PkiError::Exists { path } if path.ends_with("host.key")),
        "{err:?}"
    );
}

#[test]
fn sign_issues_a_client_certificate_for_exactly_that_host() {
    let tmp = tempfile::tempdir().unwrap();
    let receiver = pki::init_receiver(&tmp.path().join("r"), &n("r")).unwrap();
    let request = pki::host_request(&tmp.path().join("h"), &n(HOST)).unwrap();
    let pem = pki::sign_host(&receiver.dir, &request.csr_pem, &n(HOST), 90).unwrap();
    let der = parse_pem_cert(&pem);
    assert_eq!(
        host_from_certificate(&rustls_pki_types::CertificateDer::from(der.clone())).unwrap(),
        HOST
    );
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let ca_der = pki::load_certs(&receiver.ca_cert).unwrap().remove(0);
    let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let days =
        (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp()) / 86400;
    assert!((90..=91).contains(&days), "{days}");
    // The certificate is for the key the host holds.
    let csr_der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(request.csr_pem.as_bytes())
            .unwrap();
    let (_, csr) = X509CertificationRequest::from_der(csr_der.as_ref()).unwrap();
    assert_eq!(
        cert.public_key().raw,
        csr.certification_request_info.subject_pki.raw
    );
    // Two signatures of one request get distinct serial numbers.
    let again =
        parse_pem_cert(&pki::sign_host(&receiver.dir, &request.csr_pem, &n(HOST), 90).unwrap());
    let (_, again) = X509Certificate::from_der(&again).unwrap();
    assert_ne!(cert.serial, again.serial);
}

#[test]
fn sign_refuses_a_request_for_another_host() {
    let tmp = tempfile::tempdir().unwrap();
    let receiver = pki::init_receiver(&tmp.path().join("r"), &n("r")).unwrap();
    let request = pki::host_request(&tmp.path().join("h"), &n("web-07")).unwrap();
    let err = pki::sign_host(&receiver.dir, &request.csr_pem, &n(HOST), 90).unwrap_err();
    match &err {
        PkiError::RequestNameMismatch { expected, found } => {
            assert_eq!(expected, HOST);
            assert!(
                found.contains("CN=web-07") && found.contains("DNS=web-07"),
                "{found}"
            );
        }
        other => panic!("expected a name mismatch, got {other:?}"),
    }
}

/// A request built by hand, the way another tool might.
fn custom_request(cn: &str, sans: &[&str], ca: bool) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

#[test]
fn sign_refuses_extra_names_and_ignores_requested_rights() {
    let tmp = tempfile::tempdir().unwrap();
    let receiver = pki::init_receiver(&tmp.path().join("r"), &n("r")).unwrap();

    let extra = custom_request(HOST, &[HOST, "web-07"], false);
    let err = pki::sign_host(&receiver.dir, &extra, &n(HOST), 90).unwrap_err();
    assert!(
        matches!(err, PkiError::RequestNameMismatch { .. }),
        "{err:?}"
    );

    let cn_only_other = custom_request("web-07", &[HOST], false);
    let err = pki::sign_host(&receiver.dir, &cn_only_other, &n(HOST), 90).unwrap_err();
    assert!(
        matches!(err, PkiError::RequestNameMismatch { .. }),
        "{err:?}"
    );

    // Without a SAN the CN decides; the certificate gets the SAN anyway.
    let cn_only = custom_request(HOST, &[], false);
    let pem = pki::sign_host(&receiver.dir, &cn_only, &n(HOST), 90).unwrap();
    let der = parse_pem_cert(&pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(cert.subject_alternative_name().unwrap().is_some());

    // A request asking to be a CA gets a plain client certificate.
    let wants_ca = custom_request(HOST, &[HOST], true);
    let pem = pki::sign_host(&receiver.dir, &wants_ca, &n(HOST), 90).unwrap();
    let der = parse_pem_cert(&pem);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert!(!cert.is_ca());
}

#[test]
fn sign_rejects_damaged_requests_and_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let receiver = pki::init_receiver(&tmp.path().join("r"), &n("r")).unwrap();
    let request = pki::host_request(&tmp.path().join("h"), &n(HOST)).unwrap();

    // Flip one bit in the signed body: the signature no longer verifies.
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(request.csr_pem.as_bytes())
            .unwrap();
    let mut bytes = der.as_ref().to_vec();
    let at = bytes
        .windows(HOST.len())
        .position(|w| w == HOST.as_bytes())
        .unwrap();
    bytes[at] ^= 0x01;
    let tampered = pem_encode("CERTIFICATE REQUEST", &bytes);
    let err = pki::sign_host(&receiver.dir, &tampered, &n(HOST), 90).unwrap_err();
    assert!(matches!(err, PkiError::InvalidRequest { .. }), "{err:?}");

    for garbage in [
        "",
        "hello",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        let err = pki::sign_host(&receiver.dir, garbage, &n(HOST), 90).unwrap_err();
        assert!(
            matches!(err, PkiError::InvalidRequest { .. }),
            "{garbage:?}: {err:?}"
        );
    }
    // Truncations of a valid request never panic.
    for cut in 0..bytes.len() {
        let pem = pem_encode("CERTIFICATE REQUEST", &der.as_ref()[..cut]);
        assert!(pki::sign_host(&receiver.dir, &pem, &n(HOST), 90).is_err());
    }

    for days in [0, pki::MAX_HOST_VALIDITY_DAYS + 1] {
        let err = pki::sign_host(&receiver.dir, &request.csr_pem, &n(HOST), days).unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity { .. }), "{err:?}");
    }
    let err =
        pki::sign_host(&tmp.path().join("nowhere"), &request.csr_pem, &n(HOST), 90).unwrap_err();
    assert!(err.to_string().contains("nowhere/ca.crt"), "{err}");
}

#[test]
fn loading_names_the_file_in_every_error() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.pem");
    let err = pki::load_certs(&missing).unwrap_err();
    assert!(matches!(err, PkiError::Io { .. }) && err.to_string().contains("missing.pem"));
    let err = pki::load_key(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");

    let text = tmp.path().join("text.pem");
    fs::write(&text, "not pem at all\n").unwrap();
    let err = pki::load_certs(&text).unwrap_err();
    assert!(
        matches!(&err, PkiError::NoCertificate { path } if path == &text),
        "{err:?}"
    );
    let err = pki::load_key(&text).unwrap_err();
    assert!(
        matches!(&err, PkiError::Pem { path, .. } if path == &text),
        "{err:?}"
    );
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[test]
fn admin_certificates_carry_their_role_and_host_certificates_none() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use tidemark_net::role::{console_role, ConsoleRole};
    let tmp = tempfile::tempdir().unwrap();
    let receiver = pki::init_receiver(
        &tmp.path().join("r"),
        &Name::new("tidemark-receiver").unwrap(),
    )
    .unwrap();
    for role in ConsoleRole::ALL {
        let issued =
            pki::sign_admin(&receiver.dir, &Name::new("alice").unwrap(), role, 30).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(console_role(&der).unwrap(), Some(role));
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth, "a client certificate");
        assert!(!eku.server_auth);
    }
    let request = pki::host_request(&tmp.path().join("h"), &Name::new("db-01").unwrap()).unwrap();
    let host = pki::sign_host(
        &receiver.dir,
        &request.csr_pem,
        &Name::new("db-01").unwrap(),
        30,
    )
    .unwrap();
    let der = CertificateDer::from_pem_slice(host.as_bytes()).unwrap();
    assert_eq!(console_role(&der).unwrap(), None);
}

#[test]
fn the_console_certificate_names_its_address_in_the_san() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use x509_parser::extensions::GeneralName;
    let tmp = tempfile::tempdir().unwrap();
    let receiver = pki::init_receiver(
        &tmp.path().join("r"),
        &Name::new("tidemark-receiver").unwrap(),
    )
    .unwrap();
    let issued = pki::sign_console(&receiver.dir, "127.0.0.1", 30).unwrap();
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        vec![GeneralName::IPAddress(&[127, 0, 0, 1])]
    );
    let issued = pki::sign_console(&receiver.dir, "replica.example", 30).unwrap();
    let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert_eq!(
        san.general_names,
        vec![GeneralName::DNSName("replica.example")]
    );
    assert!(pki::sign_console(&receiver.dir, "not a name!", 30).is_err());
}
