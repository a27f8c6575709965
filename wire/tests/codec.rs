//! Property tests of the frame and message codec: round trips, streams split
//! anywhere, and arbitrary or damaged bytes (typed errors, never a panic).

use proptest::prelude::*;
use tidemark_changelog::record::Entry;
use tidemark_changelog::{DiskId, Seq};
use tidemark_names::Name;
use tidemark_span::HoldMessage;
use tidemark_wire::frame::{FRAME_HEADER_LEN, MAX_FRAME_BODY};
use tidemark_wire::{
    ChunkData, ChunkPurpose, Compression, Disk, DiskSync, EncodeError, ErrorClass, ErrorCode,
    Message, MessageDecoder, Progress, RecordBatch, Renewed, ReportState, StatusReport,
    VmSpecReply, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

fn arb_name() -> impl Strategy<Value = Name> {
    "[a-z0-9_][a-z0-9._-]{0,63}".prop_map(|s| Name::new(s).unwrap())
}

/// A release as a hello or welcome names it: any text a `str8` holds.
fn arb_software() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,20}",
        "\\PC{0,60}".prop_filter("≤255 bytes", |s| s.len() <= 255)
    ]
}

fn arb_disks() -> impl Strategy<Value = Vec<Disk>> {
    proptest::collection::vec(
        (any::<u32>(), arb_name(), any::<u64>()).prop_map(|(id, name, size)| Disk {
            id: DiskId(id),
            name,
            size,
        }),
        0..5,
    )
}

fn arb_syncs() -> impl Strategy<Value = Vec<DiskSync>> {
    proptest::collection::vec(
        (any::<u32>(), any::<u64>()).prop_map(|(id, synced)| DiskSync {
            id: DiskId(id),
            synced,
        }),
        0..5,
    )
}

/// Data that is sometimes compressible, sometimes not.
fn arb_data(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 1..max),
        (1..max, any::<u8>()).prop_map(|(n, b)| vec![b; n]),
        (1..max / 16 + 1).prop_map(|n| b"0123456789abcdef".repeat(n)),
    ]
}

fn arb_batch() -> impl Strategy<Value = RecordBatch> {
    (
        1u64..1 << 40,
        1u32..10,
        proptest::collection::vec((0u8..5, arb_data(3000), any::<bool>()), 0..8),
    )
        .prop_map(|(start, generation, items)| {
            let mut seq = start;
            let mut generation = generation;
            let mut batch = RecordBatch::new();
            for (i, (kind, data, jump)) in items.into_iter().enumerate() {
                if jump && i > 0 {
                    generation += 1;
                    seq += 1000;
                }
                let e = match kind {
                    0 | 1 => Entry::write(1, 4096, &data, 7),
                    2 => Entry::write_zeroes(2, 0, data.len() as u64, false, 7),
                    3 => Entry::barrier(8),
                    _ => Entry::marker("point", true, 9),
                };
                batch.push(&e.encode(seq, generation)).unwrap();
                seq += 1;
            }
            batch
        })
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            arb_name(),
            arb_name(),
            any::<u32>(),
            arb_disks(),
            1..=PROTOCOL_VERSION,
            arb_software()
        )
            .prop_map(|(host, group, generation, disks, min_version, software)| {
                Message::Hello {
                    host,
                    group,
                    generation,
                    disks,
                    min_version,
                    software,
                }
            }),
        (
            any::<u64>(),
            any::<u32>(),
            arb_syncs(),
            proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..4),
            arb_software()
        )
            .prop_map(
                |(durable_seq, generation, disks, ext, software)| Message::Welcome {
                    durable_seq: Seq(durable_seq),
                    generation,
                    disks,
                    resyncing: ext
                        .into_iter()
                        .map(|(disk, offset, length)| tidemark_wire::Extent {
                            disk: DiskId(disk),
                            offset,
                            length
                        })
                        .collect(),
                    software,
                }
            ),
        arb_batch().prop_map(Message::Records),
        (
            any::<u32>(),
            0u64..1 << 50,
            any::<u64>(),
            any::<bool>(),
            prop_oneof![
                arb_data(5000).prop_map(ChunkData::Data),
                (1u64..1 << 40).prop_map(ChunkData::Zero)
            ]
        )
            .prop_map(|(disk, offset, after_seq, resync, data)| Message::Chunk {
                disk: DiskId(disk),
                offset,
                after_seq: Seq(after_seq),
                purpose: if resync {
                    ChunkPurpose::Resync
                } else {
                    ChunkPurpose::InitialSync
                },
                data,
            }),
        (any::<u32>(), 0u64..1 << 50, 1u64..1 << 30, 4096u32..1 << 20).prop_map(
            |(disk, offset, length, block_size)| Message::DigestRequest {
                disk: DiskId(disk),
                offset,
                length,
                block_size,
            }
        ),
        (
            any::<u32>(),
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<[u8; 32]>(), 0..40)
        )
            .prop_map(|(disk, offset, block_size, digests)| Message::Digests {
                disk: DiskId(disk),
                offset,
                block_size,
                digests,
            }),
        (any::<u32>(), 0u64..1 << 50, 1u64..1 << 40, any::<u64>()).prop_map(
            |(disk, offset, length, after_seq)| Message::ResyncDone {
                disk: DiskId(disk),
                offset,
                length,
                after_seq: Seq(after_seq),
            }
        ),
        (any::<u64>(), any::<u32>(), any::<u64>(), arb_syncs()).prop_map(
            |(durable_seq, generation, frames, disks)| Message::Ack {
                durable_seq: Seq(durable_seq),
                generation,
                frames,
                disks,
            }
        ),
        (any::<bool>(), 0usize..8, "\\PC{0,100}").prop_map(|(p, code, text)| {
            let codes = [
                ErrorCode::Unauthorized,
                ErrorCode::UnknownDisk,
                ErrorCode::SequenceGap,
                ErrorCode::BadChecksum,
                ErrorCode::Busy,
                ErrorCode::NoSpace,
                ErrorCode::Protocol,
                ErrorCode::Internal,
            ];
            let class = if p {
                ErrorClass::Permanent
            } else {
                ErrorClass::Transient
            };
            Message::error(class, codes[code], &text)
        }),
        any::<u64>().prop_map(|id| Message::DrainRequest { id }),
        (any::<u64>(), any::<u64>(), "\\PC{0,100}").prop_map(|(id, last_seq, error)| {
            Message::Drained {
                id,
                last_seq: Seq(last_seq),
                error,
            }
        }),
        arb_hold().prop_map(Message::Hold),
        "\\PC{1,200}".prop_map(|text| Message::VmSpec { text }),
        any::<u64>().prop_map(|s| Message::VmSpecReply(VmSpecReply::Kept { from_seq: Seq(s) })),
        "\\PC{0,100}".prop_map(|reason| Message::VmSpecReply(VmSpecReply::Refused { reason })),
        "\\PC{1,200}".prop_map(|csr| Message::RenewRequest { csr }),
        ("\\PC{1,200}", "\\PC{1,200}").prop_map(|(certificate, ca_bundle)| Message::Renewed(
            Renewed::Issued {
                certificate,
                ca_bundle
            }
        )),
        "\\PC{0,100}".prop_map(|reason| Message::Renewed(Renewed::Refused { reason })),
        "[a-z0-9.-]{1,60}:[0-9]{1,5}".prop_map(|to| Message::Redirect { to }),
        arb_report().prop_map(Message::StatusReport),
    ]
}

/// A shipper's status report (protocol version 7 on).
fn arb_report() -> impl Strategy<Value = StatusReport> {
    let progress = || {
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| Progress {
            done: a.min(b),
            total: a.max(b),
        })
    };
    (
        (0u8..4).prop_map(|c| ReportState::from_code(c).unwrap()),
        "\\PC{0,100}",
        proptest::array::uniform5(any::<u64>()),
        progress(),
        any::<u64>(),
        progress(),
    )
        .prop_map(|(state, reason, n, sync, sync_rate, resync)| StatusReport {
            state,
            reason,
            pending_records: n[0],
            pending_bytes: n[1],
            lag_ms: n[2],
            wire_bytes_per_sec: n[3],
            record_bytes_per_sec: n[4],
            sync,
            sync_bytes_per_sec: sync_rate,
            resync,
        })
}

/// A span point's hold message (protocol version 3 on; quiesce and thaw 4 on).
fn arb_hold() -> impl Strategy<Value = HoldMessage> {
    use std::time::Duration;
    use tidemark_span::{
        Epoch, HeldOutcome, HeldReply, OpenHold, PointId, QuiesceHold, QuiescedOutcome,
        QuiescedReply, RefuseCode, ReleaseHold, ReleasedHow, ReleasedReply, ThawHold, ThawedHow,
        ThawedReply,
    };
    let ids = (any::<u64>(), any::<u64>());
    prop_oneof![
        (
            ids,
            any::<u32>(),
            any::<bool>(),
            "[a-z0-9][a-z0-9.:_-]{0,40}"
        )
            .prop_map(|((point, epoch), deadline, app_consistent, label)| {
                HoldMessage::Open(OpenHold {
                    point: PointId(point),
                    epoch: Epoch(epoch),
                    deadline: Duration::from_micros(u64::from(deadline)),
                    app_consistent,
                    label: tidemark_names::Label::new(label).unwrap(),
                })
            }),
        (ids, any::<u64>(), any::<u32>()).prop_map(|((point, epoch), marker, generation)| {
            HoldMessage::Held(HeldReply {
                point: PointId(point),
                epoch: Epoch(epoch),
                outcome: HeldOutcome::Held {
                    marker: Seq(marker),
                    generation,
                },
            })
        }),
        (ids, 0usize..RefuseCode::ALL.len(), "\\PC{0,100}").prop_map(
            |((point, epoch), code, reason)| HoldMessage::Held(HeldReply {
                point: PointId(point),
                epoch: Epoch(epoch),
                outcome: HeldOutcome::Refused {
                    code: RefuseCode::ALL[code],
                    reason,
                },
            })
        ),
        (ids, any::<bool>()).prop_map(|((point, epoch), commit)| HoldMessage::Release(
            ReleaseHold {
                point: PointId(point),
                epoch: Epoch(epoch),
                commit,
            }
        )),
        (
            ids,
            0usize..ReleasedHow::ALL.len(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |((point, epoch), how, held, gated_writes)| HoldMessage::Released(ReleasedReply {
                    point: PointId(point),
                    epoch: Epoch(epoch),
                    how: ReleasedHow::ALL[how],
                    held: Duration::from_micros(u64::from(held)),
                    gated_writes,
                })
            ),
        (ids, any::<u32>()).prop_map(|((point, epoch), timeout)| HoldMessage::Quiesce(
            QuiesceHold {
                point: PointId(point),
                epoch: Epoch(epoch),
                timeout: Duration::from_millis(u64::from(timeout)),
            }
        )),
        (ids, proptest::option::of("\\PC{0,100}")).prop_map(|((point, epoch), refused)| {
            HoldMessage::Quiesced(QuiescedReply {
                point: PointId(point),
                epoch: Epoch(epoch),
                outcome: match refused {
                    None => QuiescedOutcome::Quiesced,
                    Some(reason) => QuiescedOutcome::NotQuiesced { reason },
                },
            })
        }),
        ids.prop_map(|(point, epoch)| HoldMessage::Thaw(ThawHold {
            point: PointId(point),
            epoch: Epoch(epoch),
        })),
        (ids, 0usize..ThawedHow::ALL.len(), "\\PC{0,100}").prop_map(
            |((point, epoch), how, note)| HoldMessage::Thawed(ThawedReply {
                point: PointId(point),
                epoch: Epoch(epoch),
                how: ThawedHow::ALL[how],
                note,
            })
        ),
    ]
}

fn arb_compression() -> impl Strategy<Value = Compression> {
    prop_oneof![
        Just(Compression::None),
        Just(Compression::Fast),
        (-3i32..6).prop_map(Compression::Zstd)
    ]
}

/// Decodes everything the decoder yields until it needs more or fails.
fn drain(d: &mut MessageDecoder) -> (Vec<Message>, bool) {
    let mut out = Vec::new();
    loop {
        match d.next_message() {
            Ok(Some(m)) => out.push(m.message),
            Ok(None) => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_message_round_trips(msg in arb_message(), compression in arb_compression()) {
        let frame = msg.encode(PROTOCOL_VERSION, compression).unwrap();
        let mut d = MessageDecoder::new();
        d.feed(&frame);
        let (got, failed) = drain(&mut d);
        prop_assert!(!failed);
        prop_assert_eq!(got, vec![msg]);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_stream_split_anywhere_gives_the_same_messages(
        msgs in proptest::collection::vec(arb_message(), 1..6),
        cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
        compression in arb_compression(),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend_from_slice(&m.encode(PROTOCOL_VERSION, compression).unwrap());
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let mut d = MessageDecoder::new();
        let mut got = Vec::new();
        let mut at = 0;
        for c in cuts {
            d.feed(&stream[at..c]);
            at = c;
            let (m, failed) = drain(&mut d);
            prop_assert!(!failed);
            got.extend(m);
        }
        prop_assert_eq!(got, msgs);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut d = MessageDecoder::new();
        d.feed(&bytes);
        let _ = drain(&mut d);
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_header_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..600),
        msg_type in 0u8..11,
        zstd in any::<bool>(),
        raw_len in prop_oneof![Just(None), (0u32..MAX_FRAME_BODY + 10).prop_map(Some)],
    ) {
        // A correct CRC over garbage gets past the envelope into the
        // message decoders.
        let mut f = Vec::new();
        f.extend_from_slice(b"TMWF");
        f.extend_from_slice(&1u16.to_le_bytes());
        f.push(msg_type);
        f.push(u8::from(zstd));
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(&raw_len.unwrap_or(body.len() as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(crc32c::crc32c(&f), &body);
        f.extend_from_slice(&crc.to_le_bytes());
        f.extend_from_slice(&body);
        let mut d = MessageDecoder::new();
        d.feed(&f);
        let _ = drain(&mut d);
    }

    #[test]
    fn a_flipped_bit_never_yields_a_message(
        msg in arb_message(),
        compression in arb_compression(),
        bit in any::<proptest::sample::Index>(),
    ) {
        let mut frame = msg.encode(PROTOCOL_VERSION, compression).unwrap();
        let bit = bit.index(frame.len() * 8);
        frame[bit / 8] ^= 1 << (bit % 8);
        let mut d = MessageDecoder::new();
        d.feed(&frame);
        let (got, _) = drain(&mut d);
        prop_assert!(got.is_empty(), "bit {} flipped, still decoded {:?}", bit, got);
    }

    #[test]
    fn truncated_frames_wait_or_fail(msg in arb_message(), cut in any::<proptest::sample::Index>()) {
        let frame = msg.encode(PROTOCOL_VERSION, Compression::Fast).unwrap();
        let cut = cut.index(frame.len());
        let mut d = MessageDecoder::new();
        d.feed(&frame[..cut]);
        let (got, _) = drain(&mut d);
        prop_assert!(got.is_empty());
    }

    #[test]
    fn changed_length_fields_never_yield_a_wrong_message(
        msg in arb_message(),
        field in prop_oneof![Just(8usize), Just(12usize)],
        value in prop_oneof![any::<u32>(), 0u32..10_000],
        tail in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut frame = msg.encode(PROTOCOL_VERSION, Compression::Fast).unwrap();
        let old = frame[field..field + 4].to_vec();
        frame[field..field + 4].copy_from_slice(&value.to_le_bytes());
        let changed = old != frame[field..field + 4];
        frame.extend_from_slice(&tail);
        let mut d = MessageDecoder::new();
        d.feed(&frame);
        let (got, _) = drain(&mut d);
        if changed {
            prop_assert!(got.is_empty());
        } else {
            prop_assert_eq!(got.first(), Some(&msg));
        }
        prop_assert!(frame.len() >= FRAME_HEADER_LEN);
    }
}

/// `msg` as a peer of protocol `version` sees it: without the fields that
/// version does not have.
fn as_of(msg: &Message, version: u16) -> Message {
    let mut m = msg.clone();
    if version < 2 {
        match &mut m {
            Message::Hello {
                min_version,
                software,
                ..
            } => {
                *min_version = 1;
                software.clear();
            }
            Message::Welcome { software, .. } => software.clear(),
            _ => {}
        }
    }
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn every_message_round_trips_in_every_version_spoken(
        msg in arb_message(),
        compression in arb_compression(),
        version in MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION,
    ) {
        if version < msg.msg_type().since() {
            // Never sent in an older session: the encoder refuses it.
            let refused = matches!(
                msg.encode(version, compression),
                Err(EncodeError::NotInVersion { .. })
            );
            prop_assert!(refused, "sent in a session of version {}", version);
            return Ok(());
        }
        if let Message::Hello { min_version, .. } = &msg {
            // A hello offers versions up to its frame's.
            prop_assume!(*min_version <= version || version < 2);
        }
        let frame = msg.encode(version, compression).unwrap();
        prop_assert_eq!(u16::from_le_bytes([frame[4], frame[5]]), version);
        let mut d = MessageDecoder::new();
        d.feed(&frame);
        let got = d.next_message().unwrap().unwrap();
        prop_assert_eq!(got.version, version);
        prop_assert_eq!(got.message, as_of(&msg, version));
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The frames the previous release (protocol version 1, no negotiation)
/// sent: read here as the same messages, and encoded in version 1 to the
/// very same bytes, so a peer of that release reads what this one sends.
#[test]
fn version_1_frames_of_the_previous_release_read_and_encode_byte_for_byte() {
    let text = include_str!("fixtures/v1-frames.txt");
    let mut names = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name, frame) = line.split_once(' ').unwrap();
        let frame = hex(frame);
        let mut d = MessageDecoder::new();
        d.feed(&frame);
        let got = d
            .next_message()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .unwrap();
        assert_eq!(got.version, 1, "{name}");
        assert_eq!(
            got.message.msg_type().name(),
            name.trim_start_matches("zero-")
        );
        assert_eq!(
            got.message.encode(1, Compression::None).unwrap(),
            frame,
            "{name} encodes differently in version 1"
        );
        if let Message::Hello {
            min_version,
            software,
            ..
        } = &got.message
        {
            assert_eq!((*min_version, software.as_str()), (1, ""));
        }
        names.push(name);
    }
    assert_eq!(
        names.len(),
        12,
        "every message type of version 1: {names:?}"
    );
}

/// A frame of `version` around `body`, uncompressed.
fn raw_frame(version: u16, msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"TMWF");
    f.extend_from_slice(&version.to_le_bytes());
    f.push(msg_type);
    f.push(0);
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f), body);
    f.extend_from_slice(&crc.to_le_bytes());
    f.extend_from_slice(body);
    f
}

fn hello_v2() -> Message {
    Message::Hello {
        host: Name::from_static("db1"),
        group: Name::from_static("g"),
        generation: 3,
        disks: vec![Disk {
            id: DiskId(0),
            name: Name::from_static("vda"),
            size: 1 << 30,
        }],
        min_version: 1,
        software: "9.9.9".into(),
    }
}

/// A hello of a version newer than this code's (fields appended at its end)
/// is read for the fields known here, with the newer version kept, so the
/// receiver can answer in the version both speak. Nothing else of a newer
/// version is read.
#[test]
fn a_newer_hello_is_read_for_what_this_version_knows() {
    let next = PROTOCOL_VERSION + 1;
    let mut body = hello_v2().encode_body(PROTOCOL_VERSION).unwrap();
    body.extend_from_slice(b"fields of a newer version");
    let mut d = MessageDecoder::new();
    d.feed(&raw_frame(next, 1, &body));
    let got = d.next_message().unwrap().unwrap();
    assert_eq!(got.version, next);
    assert_eq!(got.message, hello_v2());

    // An error too: its layout is the same in every version.
    let err = Message::error(ErrorClass::Permanent, ErrorCode::Protocol, "no");
    let body = err.encode_body(1).unwrap();
    let mut d = MessageDecoder::new();
    d.feed(&raw_frame(next, 9, &body));
    assert_eq!(d.next_message().unwrap().unwrap().message, err);

    let ack = Message::Ack {
        durable_seq: Seq(1),
        generation: 1,
        frames: 1,
        disks: Vec::new(),
    };
    let body = ack.encode_body(PROTOCOL_VERSION).unwrap();
    let mut d = MessageDecoder::new();
    d.feed(&raw_frame(next, 8, &body));
    assert!(matches!(
        d.next_message(),
        Err(tidemark_wire::DecodeError::UnsupportedVersion(v)) if v == next
    ));
    // Version 0 is no version at all.
    let mut d = MessageDecoder::new();
    d.feed(&raw_frame(0, 1, &hello_v2().encode_body(1).unwrap()));
    assert!(matches!(
        d.next_message(),
        Err(tidemark_wire::DecodeError::UnsupportedVersion(0))
    ));
}

/// Nothing is encoded in a version this code does not speak (but the
/// error and the hello in any older one), and a hello never claims a
/// minimum above its own version.
#[test]
fn messages_are_encoded_only_in_versions_that_have_them() {
    let ack = Message::Ack {
        durable_seq: Seq(1),
        generation: 1,
        frames: 1,
        disks: Vec::new(),
    };
    for v in [0, PROTOCOL_VERSION + 1] {
        assert!(matches!(
            ack.encode(v, Compression::None),
            Err(tidemark_wire::EncodeError::NotInVersion { .. })
        ));
        assert!(hello_v2().encode(v, Compression::None).is_err());
    }
    let err = Message::error(ErrorClass::Permanent, ErrorCode::Protocol, "no");
    for v in 1..=PROTOCOL_VERSION {
        assert!(err.encode(v, Compression::None).is_ok());
    }
    let mut too_high = hello_v2();
    if let Message::Hello { min_version, .. } = &mut too_high {
        *min_version = PROTOCOL_VERSION + 1;
    }
    assert!(too_high
        .encode(PROTOCOL_VERSION, Compression::None)
        .is_err());
    // Decoded, such a hello is refused too.
    let mut body = hello_v2().encode_body(2).unwrap();
    let at = body.len() - (1 + "9.9.9".len()) - 2;
    body[at..at + 2].copy_from_slice(&3u16.to_le_bytes());
    let mut d = MessageDecoder::new();
    d.feed(&raw_frame(2, 1, &body));
    assert!(d.next_message().is_err());
}
