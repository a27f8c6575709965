//! `tidemark span points`: a span's record, as the receiver keeps it,
//! listed for the admin (span points only, or every round with --all) and
//! as JSON; a damaged record is refused by name.

use std::path::Path;
use std::process::Output;
use tidemark_changelog::{Disk, DiskId, Entry, Record, Seq};
use tidemark_e2e::tidemark;
use tidemark_names::Name;
use tidemark_receiver::span::{SpanDir, SpanRecord};
use tidemark_receiver::store::{ChunkRef, Purpose, ReplicaGroup};
use tidemark_span::{AbortReason, PointId, SpanEvent};

fn run(args: &[&str]) -> Output {
    tidemark().args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A member's replica, synced, whose records up to the last of `markers`
/// are barriers but for its markers (seq, label), all committed.
fn replica(data: &Path, host: &str, group: &str, markers: &[(u64, &str)]) {
    let mut g = ReplicaGroup::open(&data.join(host).join(group)).unwrap();
    g.ensure_disks(&[Disk {
        id: DiskId(0),
        name: Name::from_static("a"),
        size: 65536,
    }])
    .unwrap();
    g.apply_chunk(
        DiskId(0),
        0,
        ChunkRef::Data(&[0u8; 65536]),
        Purpose::InitialSync,
    )
    .unwrap();
    let last = markers.iter().map(|m| m.0).max().unwrap();
    // Written now: retention keeps them.
    let now = tidemark_changelog::now_ns();
    for seq in 1..=last {
        let entry = match markers.iter().find(|m| m.0 == seq) {
            Some((_, label)) => Entry::marker(label, false, now + seq),
            None => Entry::barrier(now + seq),
        };
        g.apply_record(&Record::decode(&entry.encode(seq, 0)).unwrap())
            .unwrap();
    }
    g.commit().unwrap();
}

#[test]
fn a_spans_points_are_listed_with_every_members_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let members = vec![
        (Name::from_static("web1"), Name::from_static("default")),
        (Name::from_static("db1"), Name::from_static("data")),
    ];
    let shop = Name::from_static("shop");
    let dir = SpanDir::open(data, &shop).unwrap();
    let mut record = SpanRecord::default();
    let now = tidemark_changelog::now_ns();
    for (point, markers) in [(1, [10, 20]), (2, [15, 31])] {
        let markers = markers.iter().map(|m| (Seq(*m), 1)).collect();
        let event = SpanEvent::Committed {
            point: PointId(point),
            markers,
            app_consistent: point == 2,
            not_quiesced: Vec::new(),
        };
        record.apply(&event, &members, "span-shop", point == 2, now);
    }
    record.apply(
        &SpanEvent::Durable { point: PointId(1) },
        &members,
        "",
        false,
        now,
    );
    record.apply(
        &SpanEvent::Aborted {
            point: PointId(3),
            reason: AbortReason::LinkLost(1),
        },
        &members,
        "span-shop",
        false,
        now,
    );
    dir.save(&record).unwrap();
    // The members' replicas hold their markers (else the points are
    // listed as expired).
    replica(
        data,
        "web1",
        "default",
        &[(10, "span-shop"), (15, "span-shop")],
    );
    replica(data, "db1", "data", &[(20, "span-shop"), (31, "span-shop")]);
    let data = data.to_str().unwrap();

    let out = run(&["span", "points", "--data-dir", data, "--span", "shop"]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("span shop: 1 span points"), "{shown}");
    assert!(shown.contains("web1/default@10 db1/data@20"), "{shown}");
    assert!(!shown.contains("aborted"), "{shown}");
    assert!(
        shown.contains("newest: point 1 taken") && shown.contains("members web1/default db1/data"),
        "{shown}"
    );
    assert!(
        shown.contains("last round: point 3 abandoned")
            && shown.contains("db1/data's connection went down"),
        "{shown}"
    );

    let out = run(&[
        "span",
        "points",
        "--data-dir",
        data,
        "--span",
        "shop",
        "--all",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcomes: Vec<&str> = lines
        .iter()
        .map(|l| l["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["span-point", "committed", "aborted"]);
    assert_eq!(lines[1]["app_consistent"], true);
    assert_eq!(lines[0]["members"][1]["seq"], 20);
    assert_eq!(lines[2]["reason"], "db1/data's connection went down");
}

#[test]
fn a_damaged_span_record_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let shop = Name::from_static("shop");
    SpanDir::open(tmp.path(), &shop).unwrap();
    let record = tmp.path().join("spans/shop/record");
    std::fs::write(&record, b"{\"version\":1,\"epoch\":").unwrap();
    let out = run(&[
        "span",
        "points",
        "--data-dir",
        tmp.path().to_str().unwrap(),
        "--span",
        "shop",
    ]);
    let shown = text(&out);
    assert!(!out.status.success(), "{shown}");
    assert!(shown.contains("is damaged"), "{shown}");
    assert!(shown.contains("spans/shop/record"), "{shown}");
}
