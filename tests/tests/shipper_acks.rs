//! The real shipper's state follows what the receiver acknowledged, not
//! what it sent: against a receiver (the test's own, speaking the wire
//! protocol with the receiver's real certificate) that takes every
//! initial-sync chunk and acknowledges none, the shipper must not report
//! the group `protected`; once the last chunk is acknowledged it must.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tidemark_changelog::{DiskId, Seq};
use tidemark_e2e::replication::{enroll, free_port, shipper_status, start_shipper};
use tidemark_e2e::TrackerProcess;
use tidemark_wire::{
    ChunkData, ChunkPurpose, Compression, DiskSync, Message, MessageDecoder, Received, RecordId,
    PROTOCOL_VERSION,
};

const SIZE: u64 = 8 << 20;

/// What the test's receiver tells the test.
enum Seen {
    /// Every byte of the initial sync arrived; no Ack was sent.
    AllChunks,
}

/// Serves one shipper session on `port` with the receiver PKI in `rpki`:
/// welcomes it at the start of the initial sync, reads everything, says
/// when all `SIZE` bytes of the initial sync arrived, and acknowledges
/// them (and the records sent) only when `ack` says so.
fn lagging_receiver(
    rpki: PathBuf,
    port: u16,
    seen: mpsc::Sender<Seen>,
    ack: tokio::sync::oneshot::Receiver<()>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let config = tidemark_net::tls::server_config(
            &rpki.join("ca.crt"),
            &rpki.join("receiver.crt"),
            &rpki.join("receiver.key"),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        let (endpoint, _) = tidemark_net::endpoint::server_endpoint(addr, config).unwrap();
        let conn = endpoint.accept().await.unwrap().await.unwrap();
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let mut decoder = MessageDecoder::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut ack = Some(ack);
        let (mut generation, mut frames, mut synced) = (0, 0u64, 0u64);
        // The session's protocol version: the newest both ends speak.
        let mut version = PROTOCOL_VERSION;
        let mut last: Option<RecordId> = None;
        loop {
            while let Some(Received {
                message,
                version: v,
                ..
            }) = decoder.next_message().unwrap()
            {
                frames += 1;
                match message {
                    Message::Hello {
                        generation: g,
                        disks,
                        ..
                    } => {
                        assert_eq!(disks.len(), 1);
                        generation = g;
                        version = v.min(PROTOCOL_VERSION);
                        frames = 0;
                        let welcome = Message::Welcome {
                            durable_seq: Seq(0),
                            generation,
                            disks: vec![DiskSync {
                                id: DiskId(0),
                                synced: 0,
                            }],
                            resyncing: vec![],
                            software: "0.0.0-test".into(),
                        };
                        send.write_all(&welcome.encode(version, Compression::None).unwrap())
                            .await
                            .unwrap();
                    }
                    Message::Records(batch) => last = batch.last().or(last),
                    Message::Chunk {
                        purpose: ChunkPurpose::InitialSync,
                        offset,
                        data,
                        ..
                    } => {
                        assert_eq!(offset, synced, "chunks in order");
                        synced += match data {
                            ChunkData::Zero(n) => n,
                            ChunkData::Data(d) => d.len() as u64,
                        };
                        if synced == SIZE {
                            seen.send(Seen::AllChunks).unwrap();
                        }
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            tokio::select! {
                n = recv.read(&mut buf) => match n {
                    Ok(Some(n)) => decoder.feed(&buf[..n]),
                    // The shipper went away: the test is over.
                    Ok(None) | Err(_) => return,
                },
                go = async { ack.as_mut().unwrap().await }, if ack.is_some() => {
                    ack = None;
                    if go.is_err() {
                        return; // the test failed before it let the Ack go
                    }
                    let durable = last.unwrap_or(RecordId { seq: Seq::ZERO, generation });
                    let message = Message::Ack {
                        durable_seq: durable.seq,
                        generation: durable.generation,
                        frames,
                        disks: vec![DiskSync { id: DiskId(0), synced }],
                    };
                    send.write_all(&message.encode(version, Compression::None).unwrap())
                        .await
                        .unwrap();
                }
            }
        }
    });
}

/// The shipper's status once `ok` holds of it, or the last one seen.
fn status_when(
    log_dir: &Path,
    timeout: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let status = shipper_status(log_dir);
        if let Some(s) = &status {
            if ok(s) || Instant::now() > deadline {
                return s.clone();
            }
        } else if Instant::now() > deadline {
            panic!("the shipper wrote no status in {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_shipper_is_protected_only_once_the_initial_sync_is_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, tidemark_e2e::replication::HOST);
    let image = dir.join("disk.img");
    let f = fs::File::create(&image).unwrap();
    f.set_len(SIZE).unwrap();
    let noise: Vec<u8> = (0..SIZE as u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    f.write_all_at(&noise, 0).unwrap();
    drop(f);
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let port = free_port();
    let (seen_tx, seen) = mpsc::channel();
    let (ack, ack_rx) = tokio::sync::oneshot::channel();
    // Not joined: it ends when the shipper's connection does.
    std::thread::spawn(move || lagging_receiver(rpki, port, seen_tx, ack_rx));
    let shipper = start_shipper(dir, &tracker.log_dir, &hpki, port);

    let Ok(Seen::AllChunks) = seen.recv_timeout(Duration::from_secs(60)) else {
        panic!(
            "the initial sync did not arrive; shipper log:\n{}",
            fs::read_to_string(dir.join("shipper.log")).unwrap_or_default()
        );
    };
    // Everything is sent, nothing acknowledged: give the shipper time to
    // say otherwise, then read what it says.
    let lagging = status_when(&tracker.log_dir, Duration::from_secs(3), |s| {
        s["state"] == "protected"
    });
    assert_eq!(lagging["state"], "initial-sync", "{lagging:#}");
    assert_eq!(lagging["disks"][0]["synced"], 0, "{lagging:#}");

    ack.send(()).unwrap();
    let acked = status_when(&tracker.log_dir, Duration::from_secs(30), |s| {
        s["state"] == "protected"
    });
    assert_eq!(acked["state"], "protected", "{acked:#}");
    assert_eq!(acked["disks"][0]["synced"], SIZE, "{acked:#}");

    assert!(shipper.stop().success());
    assert!(tracker.stop());
}
