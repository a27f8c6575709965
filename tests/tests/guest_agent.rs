//! `tidemark mark --app-consistent` for a VM's group freezes the guest
//! through its guest agent; with no agent answering, the point is
//! crash-consistent and the mark's answer (text and `--json`) says so.
//! The protocol's freeze/marker/thaw order and the watchdog are tested
//! against a fake agent in the tracker's `quiesce` module; here the CLI
//! and a real tracker.

use std::fs;
use std::os::unix::net::UnixListener;

use tidemark_changelog::record::FLAG_APP_CONSISTENT;
use tidemark_changelog::{FsDir, Kind, LogReader, Seq};
use tidemark_e2e::{output_ok, tidemark, TrackerProcess};

#[test]
fn a_mark_without_an_answering_agent_is_crash_consistent_and_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.img");
    fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let absent = tmp.path().join("absent.qga");
    let tracker = TrackerProcess::start_with_config(
        tmp.path(),
        &image,
        &format!(
            "\n[tracker.app-consistent]\ntimeout = \"20s\"\nguest-agent = \"{}\"\n",
            absent.display()
        ),
    );
    let config = tmp.path().join("tracker.toml");

    // The config's agent: no socket at all.
    let out = output_ok(
        tidemark()
            .args(["mark", "nightly", "--app-consistent", "--json", "--config"])
            .arg(&config),
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["app_consistent"], false, "{answer}");
    assert_eq!(answer["guest_agent"], "absent", "{answer}");
    assert!(
        answer["guest_agent_absent"]
            .as_str()
            .is_some_and(|r| r.contains(&absent.display().to_string())),
        "{answer}"
    );

    // An agent channel nobody answers on (qemu with no agent in the guest):
    // the text says so too.
    let silent = tmp.path().join("silent.qga");
    let _listener = UnixListener::bind(&silent).unwrap();
    let out = output_ok(
        tidemark()
            .args(["mark", "weekly", "--app-consistent", "--config"])
            .arg(&config)
            .arg("--guest-agent")
            .arg(&silent),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("crash-consistent marker \"weekly\"")
            && text.contains("no guest agent answered")
            && text.contains("did not answer guest-sync-delimited"),
        "{text}"
    );

    // Both markers are in the log, neither flagged application-consistent.
    let mut reader = LogReader::new(FsDir::existing(&tracker.log_dir).unwrap(), Seq::ZERO);
    let markers: Vec<(String, bool)> = std::iter::from_fn(|| reader.next_record().unwrap())
        .filter(|r| r.header.kind == Kind::Marker)
        .map(|r| {
            (
                r.label().unwrap_or_default().to_owned(),
                r.header.flags & FLAG_APP_CONSISTENT != 0,
            )
        })
        .collect();
    assert_eq!(
        markers,
        [("nightly".to_owned(), false), ("weekly".to_owned(), false)]
    );
    assert!(tracker.stop());
}
