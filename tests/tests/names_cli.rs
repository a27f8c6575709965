//! Names that would make paths outside their place (`../../escaped`, an
//! absolute path) or break the rule otherwise are refused by every command
//! that takes one, before anything is written: the tracker's disk names,
//! configuration files, enrolment, and the replica-site commands that build
//! paths from a host, a group or a disk.

use std::fs;
use std::path::Path;
use std::process::Output;
use tidemark_e2e::tidemark;

/// Asserts that `out` is a refusal that quotes `name` as not a valid name.
#[track_caller]
fn refused(out: &Output, name: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "accepted {name:?}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(&format!("{name:?} is not a valid name")),
        "{stderr}"
    );
}

/// The entries of `dir`, sorted (what a refused command must not change).
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

const HOSTILE: [&str; 4] = ["../../escaped", "/tmp/escaped", "..", "Upper"];

#[test]
fn the_tracker_refuses_disk_and_group_names_that_are_not_names() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let before = entries(tmp.path());
    for flag in ["--name", "--group"] {
        for bad in HOSTILE {
            let out = tidemark()
                .args(["tracker", "serve", "--image"])
                .arg(&image)
                .args([flag, bad, "--socket"])
                .arg(tmp.path().join("nbd.sock"))
                .arg("--log-dir")
                .arg(tmp.path().join("log"))
                .output()
                .unwrap();
            refused(&out, bad);
        }
    }
    // Without --name the image's file name is the disk's name: it must be
    // one too.
    let odd = tmp.path().join("Disk 1.raw");
    fs::File::create(&odd).unwrap().set_len(1 << 20).unwrap();
    let out = tidemark()
        .args(["tracker", "serve", "--image"])
        .arg(&odd)
        .arg("--socket")
        .arg(tmp.path().join("nbd.sock"))
        .arg("--log-dir")
        .arg(tmp.path().join("log"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("give --name") && stderr.contains("\"Disk 1.raw\" is not a valid name"),
        "{stderr}"
    );
    fs::remove_file(&odd).unwrap();
    assert_eq!(entries(tmp.path()), before, "a refused tracker left files");
}

#[test]
fn a_config_with_a_disk_name_that_is_a_path_does_not_check() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("tracker.toml");
    fs::write(
        &config,
        "[tracker]\nlog-dir = \"/srv/log\"\n\n[[tracker.disk]]\nname = \"../../escaped\"\npath = \"/dev/sdb\"\n",
    )
    .unwrap();
    let out = tidemark()
        .args(["config", "check"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("tracker.disk[0].name")
            && text.contains("\"../../escaped\" is not a valid name"),
        "{text}"
    );
}

#[test]
fn enrolment_refuses_host_names_that_are_not_names_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    for bad in HOSTILE {
        let out = tidemark()
            .args(["host", "request", "--host", bad, "--pki-dir"])
            .arg(&pki)
            .output()
            .unwrap();
        refused(&out, bad);
        assert!(!pki.exists(), "host request wrote {}", pki.display());
    }
    let ok = tidemark()
        .args(["receiver", "init", "--pki-dir"])
        .arg(&pki)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let before = entries(&pki);
    for bad in HOSTILE {
        let out = tidemark()
            .args(["receiver", "sign", "--host", bad, "--pki-dir"])
            .arg(&pki)
            .arg("--csr")
            .arg(tmp.path().join("host.csr"))
            .arg("--out")
            .arg(tmp.path().join("host.crt"))
            .output()
            .unwrap();
        refused(&out, bad);
    }
    assert_eq!(entries(&pki), before);
    assert!(!tmp.path().join("host.crt").exists());
}

#[test]
fn replica_site_commands_refuse_hosts_and_groups_that_are_not_names() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("replicas");
    let to = tmp.path().join("a").join("b").join("failover");
    fs::create_dir_all(&data).unwrap();
    for bad in HOSTILE {
        for args in [
            vec!["failover", "--host", bad, "--to"],
            vec!["failover", "--host", "db1", "--group", bad, "--to"],
        ] {
            let out = tidemark()
                .args(&args)
                .arg(&to)
                .arg("--data-dir")
                .arg(&data)
                .output()
                .unwrap();
            refused(&out, bad);
        }
        let out = tidemark()
            .args(["points", "--host", bad, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        refused(&out, bad);
        let out = tidemark()
            .args(["receiver", "adopt", "--host", "db1", "--disk"])
            .arg(format!("{bad}={}", tmp.path().join("old.img").display()))
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        refused(&out, bad);
    }
    assert!(entries(&data).is_empty(), "{:?}", entries(&data));
    assert!(!tmp.path().join("a").exists());
    assert!(!tmp.path().join("escaped.img").exists());
}

/// A Hello body of protocol `version` as any peer can write it (the
/// codec's own encoder cannot make one with a name that breaks the rule).
fn hello_body(version: u16, host: &str, group: &str, disk: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for name in [host, group] {
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
    }
    b.extend_from_slice(&1u32.to_le_bytes()); // generation
    b.extend_from_slice(&1u32.to_le_bytes()); // one disk
    b.extend_from_slice(&0u32.to_le_bytes()); // its id
    b.push(disk.len() as u8);
    b.extend_from_slice(disk.as_bytes());
    b.extend_from_slice(&(1u64 << 20).to_le_bytes()); // its size
    if version >= 2 {
        b.extend_from_slice(&1u16.to_le_bytes()); // min-version
        let software = b"0.0.0-test";
        b.push(software.len() as u8);
        b.extend_from_slice(software);
    }
    b
}

/// Connects to the receiver at `port` as the host enrolled in `hpki`, sends
/// the Hello `body` in a frame of protocol `version` and returns the
/// receiver's first answer.
fn answer_to_hello(hpki: &Path, port: u16, version: u16, body: &[u8]) -> tidemark_wire::Message {
    use tidemark_wire::{encode_frame, Compression, MessageDecoder, MessageType};
    let frame = encode_frame(version, MessageType::Hello, body, Compression::None).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let config = tidemark_net::tls::client_config(
            &hpki.join("ca.crt"),
            &hpki.join("host.crt"),
            &hpki.join("host.key"),
        )
        .unwrap();
        let (endpoint, _) =
            tidemark_net::endpoint::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let conn = endpoint
            .connect_with(config, addr, "tidemark-receiver")
            .unwrap()
            .await
            .expect("the receiver accepts the host's certificate");
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&frame).await.unwrap();
        let mut decoder = MessageDecoder::new();
        let mut buf = vec![0u8; 64 << 10];
        let deadline = std::time::Duration::from_secs(30);
        loop {
            if let Some(received) = decoder.next_message().unwrap() {
                conn.close(0u32.into(), b"done");
                endpoint.wait_idle().await;
                return received.message;
            }
            let n = tokio::time::timeout(deadline, recv.read(&mut buf))
                .await
                .expect("the receiver answers the hello")
                .unwrap()
                .expect("the receiver answers before it closes the stream");
            decoder.feed(&buf[..n]);
        }
    })
}

/// Every path under `dir`, relative to it (to see what a session created).
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            out.push(path.strip_prefix(dir).unwrap().display().to_string());
            if path.is_dir() {
                todo.push(path);
            }
        }
    }
    out.sort();
    out
}

/// A host whose certificate the receiver's CA signed sends Hellos with
/// disk and group names that would make paths outside its replica (or that
/// break the rule otherwise): the real receiver refuses each for good,
/// naming the name, and creates nothing. The same Hello with sound names is
/// welcome, so the refusals are the names'.
#[test]
fn the_receiver_refuses_a_valid_host_whose_hello_names_a_path() {
    use tidemark_e2e::replication::{enroll, free_port, start_receiver_at, HOST};
    use tidemark_wire::{ErrorClass, Message, PROTOCOL_VERSION};
    let tmp = tempfile::tempdir().unwrap();
    let (rpki, hpki) = enroll(tmp.path(), HOST);
    let replicas = tmp.path().join("site").join("replicas");
    fs::create_dir_all(&replicas).unwrap();
    let port = free_port();
    let receiver = start_receiver_at(&replicas, tmp.path(), &rpki, port);
    let long = "d".repeat(65);
    for (version, case) in [
        ("default", "../../escaped", "../../escaped"),
        ("default", "/tmp/escaped", "/tmp/escaped"),
        ("default", "..", ".."),
        ("default", "Disk0", "Disk0"),
        ("default", long.as_str(), long.as_str()),
        ("../../escaped", "disk0", "../../escaped"),
        ("..", "disk0", ".."),
    ]
    .into_iter()
    .flat_map(|case| [(1, case), (PROTOCOL_VERSION, case)])
    {
        let (group, disk, bad) = case;
        let body = hello_body(version, HOST, group, disk);
        match answer_to_hello(&hpki, port, version, &body) {
            Message::Error {
                class: ErrorClass::Permanent,
                message,
                ..
            } => assert!(
                message.contains(&format!("{bad:?} is not a valid name")),
                "v{version} {group}/{disk}: {message}"
            ),
            other => panic!("v{version} {group}/{disk} got {other:?}"),
        }
        // Nothing but the receiver's own lock of its data directory, its
        // job registry's lock and the certificate the host connected with.
        let certificates = tidemark_receiver::renew::CERTIFICATES_DIR;
        let jobs = tidemark_receiver::jobs::JOBS_DIR;
        assert_eq!(
            tree(&replicas),
            vec![
                certificates.to_string(),
                format!("{certificates}/{HOST}.der"),
                jobs.to_string(),
                format!("{jobs}/{}", tidemark_receiver::jobs::JOBS_LOCK),
                tidemark_receiver::daemon::LOCK_FILE.to_string()
            ],
            "{group}/{disk}"
        );
        assert!(!tmp.path().join("escaped").exists());
        assert!(!tmp.path().join("site").join("escaped").exists());
    }
    let body = hello_body(PROTOCOL_VERSION, HOST, "default", "disk0");
    let welcome = answer_to_hello(&hpki, port, PROTOCOL_VERSION, &body);
    assert!(matches!(welcome, Message::Welcome { .. }), "{welcome:?}");
    assert!(replicas.join(HOST).join("default").is_dir());
    assert!(receiver.stop().success());
}
