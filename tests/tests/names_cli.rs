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
