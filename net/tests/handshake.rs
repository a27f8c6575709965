//! Mutual TLS over real quinn endpoints on 127.0.0.1: who gets in, who is
//! refused, and what the receiver learns about the host.

use quinn::{ConnectionError, TransportErrorCode};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tidemark_names::Name;
use tidemark_net::pki::{self, ReceiverPki};
use tidemark_net::{client_config, client_endpoint, peer_host, server_config, server_endpoint};

const HOST: &str = "db-01.example";
const SERVER_NAME: &str = "tidemark-receiver";
fn n(name: &str) -> Name {
    Name::new(name).unwrap()
}

/// Long enough for a loaded 2-core machine, short enough that a bug cannot
/// hang the test run.
const LIMIT: Duration = Duration::from_secs(15);

/// TLS alerts as carried in QUIC's CRYPTO_ERROR codes (RFC 9001 §4.8).
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_CERTIFICATE_UNKNOWN: u8 = 46;
const ALERT_UNKNOWN_CA: u8 = 48;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;

struct Enrolled {
    receiver: ReceiverPki,
    host_key: PathBuf,
    host_cert: PathBuf,
}

/// A receiver PKI in `root/receiver` and a host enrolled with it in
/// `root/host`.
fn enrol(root: &Path, host: &str) -> Enrolled {
    let receiver = pki::init_receiver(&root.join("receiver"), &n(SERVER_NAME)).unwrap();
    let host_dir = root.join("host");
    let request = pki::host_request(&host_dir, &n(host)).unwrap();
    let cert = pki::sign_host(&receiver.dir, &request.csr_pem, &n(host), 30).unwrap();
    let host_cert = host_dir.join(pki::HOST_CERT_FILE);
    pki::write_new_file(&host_cert, cert.as_bytes(), 0o644).unwrap();
    Enrolled {
        receiver,
        host_key: request.key,
        host_cert,
    }
}

fn start_server(receiver: &ReceiverPki) -> (quinn::Endpoint, SocketAddr) {
    let config = server_config(
        &receiver.ca_cert,
        &receiver.server_cert,
        &receiver.server_key,
    )
    .unwrap();
    let (endpoint, _) = server_endpoint("127.0.0.1:0".parse().unwrap(), config).unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

/// Accepts one incoming connection and returns the peer's host name, or the
/// error that ended the handshake.
async fn accept_one(endpoint: quinn::Endpoint) -> Result<(quinn::Connection, Name), String> {
    let incoming = endpoint.accept().await.ok_or("endpoint closed")?;
    let conn = incoming.await.map_err(|e| e.to_string())?;
    let host = peer_host(&conn).map_err(|e| e.to_string())?;
    Ok((conn, host))
}

/// The TLS alert a connection was closed with, if it was closed by one.
fn alert(error: &ConnectionError) -> Option<u8> {
    let code = match error {
        ConnectionError::ConnectionClosed(close) => close.error_code,
        ConnectionError::TransportError(e) => e.code,
        _ => return None,
    };
    (0..=255u8).find(|a| TransportErrorCode::crypto(*a) == code)
}

/// Connects with `config`; returns how the connection ended: its handshake
/// error, or the reason it was closed afterwards (a client with a refused
/// certificate finishes its side of the handshake first).
async fn refused_reason(
    config: quinn::ClientConfig,
    server: SocketAddr,
    server_name: &str,
) -> ConnectionError {
    let (endpoint, _) = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let connecting = endpoint.connect_with(config, server, server_name).unwrap();
    let result = tokio::time::timeout(LIMIT, async {
        match connecting.await {
            Err(e) => e,
            Ok(conn) => {
                // If the server let us in, the stream must not work either.
                if let Ok((mut send, mut recv)) = conn.open_bi().await {
                    let _ = send.write_all(b"hello").await;
                    let _ = send.finish();
                    let _ = recv.read_to_end(1024).await;
                }
                conn.closed().await
            }
        }
    })
    .await;
    result.expect("the refused connection did not end within the limit")
}

/// Connects to a receiver of `enrolled`'s CA with the certificate `cert`
/// (key `key`), which it must refuse; returns what the receiver's accept
/// said and how the client's connection ended.
async fn refused_by_the_receiver(
    enrolled: &Enrolled,
    cert: &Path,
    key: &Path,
) -> (String, ConnectionError) {
    let (server, addr) = start_server(&enrolled.receiver);
    let config = client_config(&enrolled.receiver.ca_cert, cert, key).unwrap();
    let client = tokio::spawn(refused_reason(config, addr, SERVER_NAME));
    let server_side = tokio::time::timeout(LIMIT, accept_one(server))
        .await
        .expect("the server's accept hung");
    let said = match server_side {
        Ok((_, host)) => panic!("the receiver accepted {host:?}"),
        Err(e) => e,
    };
    (said, client.await.unwrap())
}

#[tokio::test]
async fn a_properly_enrolled_host_connects_and_is_identified() {
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let (server, addr) = start_server(&enrolled.receiver);
    let accepted = tokio::spawn(async move {
        let (conn, host) = accept_one(server).await?;
        let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let got = recv.read_to_end(1024).await.map_err(|e| e.to_string())?;
        send.write_all(&got).await.map_err(|e| e.to_string())?;
        send.finish().map_err(|e| e.to_string())?;
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        // Wait for the client to read the echo and close.
        let _ = conn.closed().await;
        Ok::<_, String>((host, alpn))
    });

    let config = client_config(
        &enrolled.receiver.ca_cert,
        &enrolled.host_cert,
        &enrolled.host_key,
    )
    .unwrap();
    let (client, _) = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = tokio::time::timeout(
        LIMIT,
        client.connect_with(config, addr, SERVER_NAME).unwrap(),
    )
    .await
    .unwrap()
    .unwrap();
    // The client sees the receiver's identity too.
    assert_eq!(peer_host(&conn).unwrap(), SERVER_NAME);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"a batch of records").await.unwrap();
    send.finish().unwrap();
    let echo = tokio::time::timeout(LIMIT, recv.read_to_end(1024))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(echo, b"a batch of records");
    conn.close(0u32.into(), b"done");

    let (host, alpn) = tokio::time::timeout(LIMIT, accepted)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(host, HOST);
    assert_eq!(alpn.as_deref(), Some(tidemark_net::ALPN));
}

/// Two receiver nodes of one site (several receivers on one Ceph store):
/// the second has its own certificate and key from `pki::sign_receiver`,
/// for the same name shippers dial. An enrolled host connects to either
/// node with one configuration and is identified, and each node presents
/// its own certificate.
#[tokio::test]
async fn each_receiver_node_of_a_site_presents_its_own_certificate() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let issued = pki::sign_receiver(&enrolled.receiver.dir, &n(SERVER_NAME), 30).unwrap();
    let second = ReceiverPki {
        server_cert: tmp.path().join("node2.crt"),
        server_key: tmp.path().join("node2.key"),
        ..enrolled.receiver.clone()
    };
    pki::write_new_file(&second.server_cert, issued.cert_pem.as_bytes(), 0o644).unwrap();
    pki::write_new_file(&second.server_key, issued.key_pem.as_bytes(), 0o600).unwrap();
    let config = client_config(
        &enrolled.receiver.ca_cert,
        &enrolled.host_cert,
        &enrolled.host_key,
    )
    .unwrap();
    let (client, _) = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut presented = Vec::new();
    for node in [&enrolled.receiver, &second] {
        let (server, addr) = start_server(node);
        let accepted = tokio::spawn(accept_one(server));
        let conn = tokio::time::timeout(
            LIMIT,
            client
                .connect_with(config.clone(), addr, SERVER_NAME)
                .unwrap(),
        )
        .await
        .unwrap()
        .unwrap();
        let (_server_side, host) = tokio::time::timeout(LIMIT, accepted)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(host, HOST);
        let leaf = conn
            .peer_identity()
            .unwrap()
            .downcast::<Vec<CertificateDer<'static>>>()
            .unwrap()[0]
            .clone();
        let own = CertificateDer::from_pem_file(&node.server_cert).unwrap();
        assert_eq!(leaf, own, "a node presented another node's certificate");
        presented.push(leaf);
        conn.close(0u32.into(), b"done");
    }
    assert_ne!(presented[0], presented[1]);
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(&tmp.path().join("real"), HOST);
    // Same host name, same server name, but a different CA signed it.
    let foreign = enrol(&tmp.path().join("foreign"), HOST);
    let (server, addr) = start_server(&enrolled.receiver);
    let accepted = tokio::spawn(tokio::time::timeout(LIMIT, accept_one(server)));

    // The client trusts the real receiver, so only its own certificate is wrong.
    let config = client_config(
        &enrolled.receiver.ca_cert,
        &foreign.host_cert,
        &foreign.host_key,
    )
    .unwrap();
    let reason = refused_reason(config, addr, SERVER_NAME).await;
    assert_eq!(alert(&reason), Some(ALERT_UNKNOWN_CA), "{reason}");
    let server_side = accepted.await.unwrap().expect("the server's accept hung");
    assert!(server_side.is_err(), "the server accepted a foreign host");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let (server, addr) = start_server(&enrolled.receiver);
    let accepted = tokio::spawn(tokio::time::timeout(LIMIT, accept_one(server)));

    let mut roots = rustls::RootCertStore::empty();
    for cert in pki::load_certs(&enrolled.receiver.ca_cert).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![tidemark_net::ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));

    let reason = refused_reason(config, addr, SERVER_NAME).await;
    assert_eq!(alert(&reason), Some(ALERT_CERTIFICATE_REQUIRED), "{reason}");
    let server_side = accepted.await.unwrap().expect("the server's accept hung");
    assert!(
        server_side.is_err(),
        "the server accepted a host without a certificate"
    );
}

#[tokio::test]
async fn a_server_certificate_for_another_name_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let (server, addr) = start_server(&enrolled.receiver);
    let accepted = tokio::spawn(tokio::time::timeout(LIMIT, accept_one(server)));

    let config = client_config(
        &enrolled.receiver.ca_cert,
        &enrolled.host_cert,
        &enrolled.host_key,
    )
    .unwrap();
    // The shipper expects another receiver than the one answering.
    let reason = refused_reason(config, addr, "other-receiver").await;
    assert!(
        matches!(reason, ConnectionError::TransportError(_)),
        "the client itself must refuse: {reason}"
    );
    assert_eq!(alert(&reason), Some(ALERT_BAD_CERTIFICATE), "{reason}");
    let server_side = accepted.await.unwrap().expect("the server's accept hung");
    assert!(server_side.is_err());
}

#[tokio::test]
async fn a_server_from_another_ca_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(&tmp.path().join("real"), HOST);
    let impostor = enrol(&tmp.path().join("impostor"), HOST);
    // An impostor receiver with the right name but its own CA.
    let (server, addr) = start_server(&impostor.receiver);
    let _accepting = tokio::spawn(tokio::time::timeout(LIMIT, accept_one(server)));

    let config = client_config(
        &enrolled.receiver.ca_cert,
        &enrolled.host_cert,
        &enrolled.host_key,
    )
    .unwrap();
    let reason = refused_reason(config, addr, SERVER_NAME).await;
    assert!(
        matches!(reason, ConnectionError::TransportError(_)),
        "{reason}"
    );
    assert_eq!(alert(&reason), Some(ALERT_UNKNOWN_CA), "{reason}");
}

#[tokio::test]
async fn configs_from_mismatched_or_missing_files_are_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let r = &enrolled.receiver;
    // Host key with the receiver certificate.
    let err = server_config(&r.ca_cert, &r.server_cert, &enrolled.host_key).unwrap_err();
    assert!(
        matches!(err, tidemark_net::tls::TlsError::CertKey { .. }),
        "{err:?}"
    );
    let missing = tmp.path().join("nope.crt");
    let err = client_config(&missing, &enrolled.host_cert, &enrolled.host_key).unwrap_err();
    assert!(err.to_string().contains("nope.crt"), "{err}");
    // A key file given as the CA.
    let err = client_config(&r.ca_key, &enrolled.host_cert, &enrolled.host_key).unwrap_err();
    assert!(
        matches!(
            err,
            tidemark_net::tls::TlsError::Load(pki::PkiError::NoCertificate { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn endpoints_outside_a_runtime_are_an_error_not_a_panic() {
    let err = client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap_err();
    assert!(matches!(
        err,
        tidemark_net::endpoint::EndpointError::NoRuntime
    ));
}

/// Whether `openssl` can be run; a missing one skips the test, except under
/// CI (`CI` set), which installs it.
fn have_openssl(test: &str) -> bool {
    let found = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: `openssl` is missing under CI; the test command must install it"
        );
        eprintln!("SKIP {test}: `openssl` is not installed");
    }
    found
}

/// Runs `openssl` with `args` in `dir`; panics with its stderr on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `{name}.key` (P-256) and `{name}.crt` in `dir` with the openssl
/// CLI, as someone holding the issuer's key could: subject `/CN={cn}`,
/// the extensions `ext` (openssl's extfile syntax), signed by `issuer`.
fn openssl_issue(dir: &Path, name: &str, cn: &str, ext: &str, issuer: (&Path, &Path)) {
    let (key, csr, crt, extfile) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    std::fs::write(dir.join(&extfile), ext).unwrap();
    let subject = format!("/CN={cn}");
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            issuer.0.to_str().unwrap(),
            "-CAkey",
            issuer.1.to_str().unwrap(),
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &extfile,
            "-out",
            &crt,
        ],
    );
}

/// The extensions of a host certificate for `host`.
fn leaf_ext(host: &str) -> String {
    format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\nsubjectAltName=DNS:{host}\n"
    )
}

/// The receiver's CA signs an intermediate CA (made with the openssl CLI,
/// as an attacker holding the CA key for a moment, or a mistaken admin,
/// would), and the intermediate signs a leaf for a host. The chain verifies
/// under plain WebPKI rules if the CA's `pathlen:0` is not enforced, but the
/// receiver accepts only certificates the enrolment CA signed itself.
#[tokio::test]
async fn a_host_certificate_from_an_intermediate_ca_is_rejected() {
    if !have_openssl("a_host_certificate_from_an_intermediate_ca_is_rejected") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let dir = tmp.path().join("intermediate");
    std::fs::create_dir(&dir).unwrap();
    let ca = (
        enrolled.receiver.ca_cert.as_path(),
        enrolled.receiver.ca_key.as_path(),
    );
    openssl_issue(
        &dir,
        "int",
        "intermediate",
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
        ca,
    );
    let int = (dir.join("int.crt"), dir.join("int.key"));
    openssl_issue(&dir, "leaf", HOST, &leaf_ext(HOST), (&int.0, &int.1));
    // The host presents the whole chain: leaf, then the intermediate.
    let chain = [
        std::fs::read_to_string(dir.join("leaf.crt")).unwrap(),
        std::fs::read_to_string(dir.join("int.crt")).unwrap(),
    ]
    .concat();
    std::fs::write(dir.join("chain.crt"), chain).unwrap();

    let (said, reason) =
        refused_by_the_receiver(&enrolled, &dir.join("chain.crt"), &dir.join("leaf.key")).await;
    assert!(said.contains("intermediate CA"), "{said}");
    assert_eq!(alert(&reason), Some(ALERT_CERTIFICATE_UNKNOWN), "{reason}");
}

/// A certificate the CA really issued, for a name that breaks the rule of
/// names (upper case, as an older enrolment allowed): the handshake passes,
/// but the receiver cannot use the name as the host's identity, and says
/// why.
#[tokio::test]
async fn a_certificate_for_a_name_that_breaks_the_rule_gives_no_identity() {
    if !have_openssl("a_certificate_for_a_name_that_breaks_the_rule_gives_no_identity") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let dir = tmp.path().join("legacy");
    std::fs::create_dir(&dir).unwrap();
    let legacy = "DB-01.Example";
    openssl_issue(
        &dir,
        "leaf",
        legacy,
        &leaf_ext(legacy),
        (&enrolled.receiver.ca_cert, &enrolled.receiver.ca_key),
    );
    let (server, addr) = start_server(&enrolled.receiver);
    let config = client_config(
        &enrolled.receiver.ca_cert,
        &dir.join("leaf.crt"),
        &dir.join("leaf.key"),
    )
    .unwrap();
    let client = tokio::spawn(refused_reason(config, addr, SERVER_NAME));
    let incoming = tokio::time::timeout(LIMIT, server.accept())
        .await
        .unwrap()
        .unwrap();
    let conn = incoming.await.expect("the CA issued the certificate");
    let err = peer_host(&conn).unwrap_err();
    assert!(
        matches!(&err, tidemark_net::tls::PeerIdentityError::InvalidName { name, .. } if name == legacy),
        "{err:?}"
    );
    assert!(err.to_string().contains("enrol the host again"), "{err}");
    conn.close(2u32.into(), b"invalid host name");
    drop(client);
}

#[tokio::test]
async fn an_admin_certificate_of_the_same_ca_does_not_replicate_as_a_host() {
    use tidemark_net::role::ConsoleRole;
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let admin = pki::sign_admin(
        &enrolled.receiver.dir,
        &n("alice"),
        ConsoleRole::Operator,
        30,
    )
    .unwrap();
    let cert = tmp.path().join("admin.crt");
    let key = tmp.path().join("admin.key");
    pki::write_new_file(&cert, admin.cert_pem.as_bytes(), 0o644).unwrap();
    pki::write_new_file(&key, admin.key_pem.as_bytes(), 0o600).unwrap();
    let (server, addr) = start_server(&enrolled.receiver);
    let accepted = tokio::spawn(tokio::time::timeout(LIMIT, accept_one(server)));
    let config = client_config(&enrolled.receiver.ca_cert, &cert, &key).unwrap();
    let reason = refused_reason(config, addr, SERVER_NAME).await;
    assert!(
        alert(&reason).is_some(),
        "not refused by a TLS alert: {reason}"
    );
    let server_side = accepted.await.unwrap().expect("the server's accept hung");
    let err = server_side.expect_err("the receiver let an admin replicate");
    assert!(err.contains("must not replicate as a host"), "{err}");
}

/// A certificate of the same CA whose extended key usage names both
/// console roles (not something `tidemark receiver sign` issues, but what
/// someone holding the CA key could make with openssl): its role cannot be
/// read, and it is not taken for a host's either.
#[tokio::test]
async fn a_certificate_with_two_console_roles_does_not_replicate_as_a_host() {
    if !have_openssl("a_certificate_with_two_console_roles_does_not_replicate_as_a_host") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let enrolled = enrol(tmp.path(), HOST);
    let dir = tmp.path().join("two-roles");
    std::fs::create_dir(&dir).unwrap();
    let arc = "2.25.201338833876323180311371667709132664435";
    let ext = format!(
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth,{arc}.1,{arc}.2\nsubjectAltName=DNS:{HOST}\n"
    );
    let ca = (
        enrolled.receiver.ca_cert.as_path(),
        enrolled.receiver.ca_key.as_path(),
    );
    openssl_issue(&dir, "leaf", HOST, &ext, ca);
    let (said, reason) =
        refused_by_the_receiver(&enrolled, &dir.join("leaf.crt"), &dir.join("leaf.key")).await;
    assert!(said.contains("more than one console role"), "{said}");
    assert!(
        alert(&reason).is_some(),
        "not refused by a TLS alert: {reason}"
    );
}
