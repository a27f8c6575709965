//! `tidemark config check` on the shipped examples and on broken files.

use std::fs;
use std::path::PathBuf;
use tidemark_e2e::{refused, tidemark, TrackerProcess};

fn examples() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_shipped_example_is_valid() {
    let files = examples();
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        let out = tidemark()
            .args(["config", "check"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": valid ("));
    }
}

#[test]
fn an_unknown_key_is_rejected_with_file_line_column_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tracker.toml");
    fs::write(
        &file,
        "[tracker]\nlog-dir = \"/var/lib/tidemark/log\"\n\n[[tracker.disk]]\nname = \"data\"\npth = \"/dev/vdb\"\n",
    )
    .unwrap();
    let out = tidemark()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = format!(
        "{}:6:1: tracker.disk[0]: unknown field `pth`",
        file.display()
    );
    assert!(
        stderr.contains(&expected),
        "expected {expected:?} in {stderr:?}"
    );
}

#[test]
fn a_bad_value_names_its_field_and_what_is_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("tracker.toml");
    fs::write(
        &file,
        "[tracker]\nlog-size-limit = \"lots\"\n\n[[tracker.disk]]\nname = \"data\"\npath = \"/dev/vdb\"\n",
    )
    .unwrap();
    let out = tidemark()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2:", file.display())),
        "{stderr}"
    );
    assert!(stderr.contains("tracker.log-size-limit"), "{stderr}");
}

#[test]
fn a_missing_file_is_a_clear_error() {
    let out = tidemark()
        .args(["config", "check", "/nonexistent/tidemark.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/tidemark.toml") && stderr.contains("No such file"),
        "{stderr}"
    );
}

/// One rule for each setting: a tracker configuration `config check`
/// accepts is one `tracker serve` starts with, and one it refuses is
/// refused by `serve` for the same reason.
#[test]
fn what_config_check_accepts_tracker_serve_accepts() {
    for size in ["4KiB", "32KiB", "64KiB", "1GiB", "2GiB", "96KiB"] {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("disk.img");
        fs::File::create(&image).unwrap().set_len(4 << 20).unwrap();
        let setting = format!("activity-extent-size = \"{size}\"");
        let config = TrackerProcess::write_config(tmp.path(), &image, &setting);
        let check = tidemark()
            .args(["config", "check"])
            .arg(&config)
            .output()
            .unwrap();
        if check.status.success() {
            let tracker = TrackerProcess::start_with_config(tmp.path(), &image, &setting);
            assert!(tracker.stop(), "{size}");
        } else {
            let serve = refused(
                tidemark()
                    .args(["tracker", "serve", "--config"])
                    .arg(&config),
            );
            let said = String::from_utf8_lossy(&serve.stderr);
            assert!(
                said.contains("activity-extent-size"),
                "{size}: config check said {:?}, serve said {said:?}",
                String::from_utf8_lossy(&check.stderr)
            );
        }
    }
}
