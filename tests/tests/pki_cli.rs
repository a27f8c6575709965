//! Enrolment with the CLI: `tidemark receiver init`, `tidemark host request`,
//! `tidemark receiver sign`, and the chain checked by OpenSSL.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use tidemark_e2e::{require_tool, tidemark};

const HOST: &str = "db-01.example";

fn run(args: &[&str], paths: &[&Path]) -> Output {
    let mut cmd = tidemark();
    cmd.args(args);
    for p in paths {
        cmd.arg(p);
    }
    cmd.output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `openssl verify` of `cert` against `ca` for `purpose`; returns its verdict.
fn openssl_verify(ca: &Path, cert: &Path, purpose: &str) -> bool {
    let out = Command::new("openssl")
        .args(["verify", "-purpose", purpose, "-CAfile"])
        .arg(ca)
        .arg(cert)
        .output()
        .unwrap();
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK")
}

fn openssl_stdout(args: &[&str], path: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// init + request + sign in `root`; returns (receiver dir, host dir).
fn enrol(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let receiver = root.join("receiver");
    let host = root.join("host");
    let out = ok(&run(&["receiver", "init", "--pki-dir"], &[&receiver]));
    assert!(
        out.contains("ca.crt") && out.contains("tidemark-receiver"),
        "{out}"
    );
    let out = ok(&run(
        &["host", "request", "--host", HOST, "--pki-dir"],
        &[&host],
    ));
    assert!(out.contains("tidemark receiver sign"), "{out}");
    assert!(out.contains(&format!("--host {HOST}")), "{out}");
    let out = ok(&run(
        &[
            "receiver",
            "sign",
            "--host",
            HOST,
            "--days",
            "30",
            "--pki-dir",
        ],
        &[
            &receiver,
            Path::new("--csr"),
            &host.join("host.csr"),
            Path::new("--out"),
            &host.join("host.crt"),
        ],
    ));
    assert!(out.contains(HOST), "{out}");
    (receiver, host)
}

#[test]
fn init_request_sign_yields_a_verifiable_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let (receiver, host) = enrol(tmp.path());
    assert_eq!(mode(&receiver), 0o700);
    assert_eq!(mode(&receiver.join("ca.key")), 0o600);
    assert_eq!(mode(&receiver.join("receiver.key")), 0o600);
    assert_eq!(mode(&host.join("host.key")), 0o600);
    assert!(host.join("host.crt").exists());

    if !require_tool("openssl", "init_request_sign_yields_a_verifiable_chain") {
        return;
    }
    let ca = receiver.join("ca.crt");
    assert!(openssl_verify(&ca, &host.join("host.crt"), "sslclient"));
    assert!(openssl_verify(
        &ca,
        &receiver.join("receiver.crt"),
        "sslserver"
    ));
    // The host certificate is for client authentication only.
    assert!(!openssl_verify(&ca, &host.join("host.crt"), "sslserver"));
    let text = openssl_stdout(&["x509", "-noout", "-text", "-in"], &host.join("host.crt"));
    assert!(text.contains(&format!("DNS:{HOST}")), "{text}");
    assert!(
        text.contains(&format!("CN = {HOST}")) || text.contains(&format!("CN={HOST}")),
        "{text}"
    );
    // The certificate carries the key the host holds.
    let cert_key = openssl_stdout(
        &["x509", "-noout", "-pubkey", "-in"],
        &host.join("host.crt"),
    );
    let host_key = openssl_stdout(&["pkey", "-pubout", "-in"], &host.join("host.key"));
    assert_eq!(cert_key, host_key);

    // Another receiver's CA does not vouch for this host.
    let other = tmp.path().join("other");
    ok(&run(&["receiver", "init", "--pki-dir"], &[&other]));
    assert!(!openssl_verify(
        &other.join("ca.crt"),
        &host.join("host.crt"),
        "sslclient"
    ));
}

#[test]
fn signing_for_another_host_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let receiver = tmp.path().join("receiver");
    let host = tmp.path().join("host");
    ok(&run(&["receiver", "init", "--pki-dir"], &[&receiver]));
    ok(&run(
        &["host", "request", "--host", HOST, "--pki-dir"],
        &[&host],
    ));
    let out_file = tmp.path().join("web-07.crt");
    let out = run(
        &["receiver", "sign", "--host", "web-07", "--pki-dir"],
        &[
            &receiver,
            Path::new("--csr"),
            &host.join("host.csr"),
            Path::new("--out"),
            &out_file,
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("CN={HOST}"))
            && stderr.contains("\"web-07\"")
            && stderr.contains("refusing"),
        "{stderr}"
    );
    assert!(!out_file.exists());
}

#[test]
fn nothing_is_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let (receiver, host) = enrol(tmp.path());
    let out = run(&["receiver", "init", "--pki-dir"], &[&receiver]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ca.crt") && stderr.contains("already exists"),
        "{stderr}"
    );

    let out = run(&["host", "request", "--host", HOST, "--pki-dir"], &[&host]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host.key"));

    let before = fs::read(host.join("host.crt")).unwrap();
    let out = run(
        &["receiver", "sign", "--host", HOST, "--pki-dir"],
        &[
            &receiver,
            Path::new("--csr"),
            &host.join("host.csr"),
            Path::new("--out"),
            &host.join("host.crt"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("host.crt"));
    assert_eq!(fs::read(host.join("host.crt")).unwrap(), before);
}

#[test]
fn a_bad_host_name_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = run(
        &["host", "request", "--host=-db", "--pki-dir"],
        &[tmp.path()],
    );
    // A name is checked as the command line is parsed: a usage error.
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("\"-db\" is not a valid name: it starts with '-'"),
        "{stderr}"
    );
}
