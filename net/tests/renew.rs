//! Renewal on real files: the receiver signs for the connection's host
//! only, the host keeps its key, and the host refuses what it could not
//! use (another name, another key, another CA).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_names::Name;
use tidemark_net::pki::{self, PkiError};
use tidemark_net::renew::{self, RenewError, RenewalSigner};

fn n(name: &str) -> Name {
    Name::new(name).unwrap()
}

/// A receiver PKI in `dir/r` and a host enrolled for `days` in `dir/<host>`.
fn enrolled(dir: &Path, host: &str, days: u32) -> (PathBuf, PathBuf) {
    let r = dir.join("r");
    if !r.join(pki::CA_CERT_FILE).exists() {
        pki::init_receiver(&r, &n("receiver")).unwrap();
    }
    let h = dir.join(host);
    let req = pki::host_request(&h, &n(host)).unwrap();
    let cert = pki::sign_host(&r, &req.csr_pem, &n(host), days).unwrap();
    fs::write(h.join(pki::HOST_CERT_FILE), cert).unwrap();
    (r, h)
}

fn signer(r: &Path) -> RenewalSigner {
    RenewalSigner {
        ca: r.join(pki::CA_CERT_FILE),
        ca_key: r.join(pki::CA_KEY_FILE),
        days: pki::DEFAULT_HOST_VALIDITY_DAYS,
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn a_host_renews_for_its_own_name_with_its_own_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (r, h) = enrolled(tmp.path(), "db1", 10);
    let cert = h.join(pki::HOST_CERT_FILE);
    let old = renew::certificate_not_after(&cert).unwrap();
    assert!(renew::renewal_due(old, now(), renew::DEFAULT_RENEW_BEFORE));
    assert!(!renew::renewal_due(old, now(), Duration::from_secs(86_400)));
    let left = renew::days_left(old, now());
    assert!((9.9..=10.0).contains(&left), "{left}");

    let key_path = h.join(pki::HOST_KEY_FILE);
    let key = fs::read_to_string(&key_path).unwrap();
    let csr = renew::renewal_request(&key, &key_path, &n("db1")).unwrap();
    let renewal = signer(&r).sign(&n("db1"), &csr).unwrap();
    assert_eq!(
        renewal.ca_bundle,
        fs::read_to_string(r.join(pki::CA_CERT_FILE)).unwrap()
    );
    let new = renew::check_renewed(
        &key,
        &key_path,
        &n("db1"),
        &renewal.certificate,
        &renewal.ca_bundle,
    )
    .unwrap();
    let days = renew::days_left(new, now());
    assert!(days > 824.0, "renewed for {days} days");
    assert!(!renew::renewal_due(new, now(), renew::DEFAULT_RENEW_BEFORE));
}

#[test]
fn the_receiver_signs_only_for_the_name_the_connection_authenticated() {
    let tmp = tempfile::tempdir().unwrap();
    let (r, h) = enrolled(tmp.path(), "db1", 10);
    let key_path = h.join(pki::HOST_KEY_FILE);
    let key = fs::read_to_string(&key_path).unwrap();
    // db1 asks for a certificate naming db2 over its own connection.
    let csr = renew::renewal_request(&key, &key_path, &n("db2")).unwrap();
    let err = signer(&r).sign(&n("db1"), &csr).unwrap_err();
    assert!(matches!(err, PkiError::RequestNameMismatch { .. }), "{err}");
    // Garbage is refused with an error, not a panic.
    let err = signer(&r).sign(&n("db1"), "not a request").unwrap_err();
    assert!(matches!(err, PkiError::InvalidRequest { .. }), "{err}");
}

#[test]
fn the_host_refuses_a_certificate_it_could_not_use() {
    let tmp = tempfile::tempdir().unwrap();
    let (r, h1) = enrolled(tmp.path(), "db1", 10);
    let (_, h2) = enrolled(tmp.path(), "db2", 10);
    let key1_path = h1.join(pki::HOST_KEY_FILE);
    let key1 = fs::read_to_string(&key1_path).unwrap();
    let key2_path = h2.join(pki::HOST_KEY_FILE);
    let key2 = fs::read_to_string(&key2_path).unwrap();
    let bundle = fs::read_to_string(r.join(pki::CA_CERT_FILE)).unwrap();

    // A certificate for another host.
    let csr2 = renew::renewal_request(&key2, &key2_path, &n("db2")).unwrap();
    let for_db2 = signer(&r).sign(&n("db2"), &csr2).unwrap().certificate;
    let err = renew::check_renewed(&key1, &key1_path, &n("db1"), &for_db2, &bundle).unwrap_err();
    assert!(matches!(err, RenewError::OtherName { .. }), "{err}");

    // A certificate for this name but another key.
    let csr_other_key = renew::renewal_request(&key2, &key2_path, &n("db1")).unwrap();
    let other_key = signer(&r)
        .sign(&n("db1"), &csr_other_key)
        .unwrap()
        .certificate;
    let err = renew::check_renewed(&key1, &key1_path, &n("db1"), &other_key, &bundle).unwrap_err();
    assert!(matches!(err, RenewError::OtherKey), "{err}");

    // A certificate no CA of the bundle signed.
    let foreign = tmp.path().join("foreign");
    pki::init_receiver(&foreign, &n("receiver")).unwrap();
    let csr1 = renew::renewal_request(&key1, &key1_path, &n("db1")).unwrap();
    let by_foreign = signer(&foreign).sign(&n("db1"), &csr1).unwrap().certificate;
    let err = renew::check_renewed(&key1, &key1_path, &n("db1"), &by_foreign, &bundle).unwrap_err();
    assert!(matches!(err, RenewError::NotSigned), "{err}");
    // With the foreign CA in the bundle it is accepted.
    let both = format!(
        "{bundle}{}",
        fs::read_to_string(foreign.join(pki::CA_CERT_FILE)).unwrap()
    );
    renew::check_renewed(&key1, &key1_path, &n("db1"), &by_foreign, &both).unwrap();
}

#[test]
fn the_signing_ca_is_the_one_of_the_key_among_several() {
    let tmp = tempfile::tempdir().unwrap();
    let (r, h) = enrolled(tmp.path(), "db1", 10);
    let other = tmp.path().join("other");
    pki::init_receiver(&other, &n("receiver")).unwrap();
    // The old CA first, the new one (whose key signs) after it.
    let bundle = tmp.path().join("bundle.crt");
    fs::write(
        &bundle,
        format!(
            "{}{}",
            fs::read_to_string(r.join(pki::CA_CERT_FILE)).unwrap(),
            fs::read_to_string(other.join(pki::CA_CERT_FILE)).unwrap()
        ),
    )
    .unwrap();
    let signer = RenewalSigner {
        ca: bundle.clone(),
        ca_key: other.join(pki::CA_KEY_FILE),
        days: 30,
    };
    let key_path = h.join(pki::HOST_KEY_FILE);
    let key = fs::read_to_string(&key_path).unwrap();
    let csr = renew::renewal_request(&key, &key_path, &n("db1")).unwrap();
    let renewal = signer.sign(&n("db1"), &csr).unwrap();
    let only_new = fs::read_to_string(other.join(pki::CA_CERT_FILE)).unwrap();
    renew::check_renewed(&key, &key_path, &n("db1"), &renewal.certificate, &only_new).unwrap();

    // A key that belongs to no certificate of the bundle cannot sign.
    let stranger = tmp.path().join("stranger");
    pki::init_receiver(&stranger, &n("receiver")).unwrap();
    let signer = RenewalSigner {
        ca: r.join(pki::CA_CERT_FILE),
        ca_key: stranger.join(pki::CA_KEY_FILE),
        days: 30,
    };
    let err = signer.sign(&n("db1"), &csr).unwrap_err();
    assert!(matches!(err, PkiError::NoSigningCa { .. }), "{err}");
}
