//! The replication protocol's decoders (`wire/src`): the frame decoder fed
//! a byte stream in pieces, the message decoder fed one frame body, and
//! the receiver's session fed the frames a shipper (or an attacker holding
//! a valid certificate) sends.
//!
//! Besides "never panics": a decoded frame or message encodes back to the
//! bytes it came from, a failed decoder stays failed, and the receiver's
//! session hands its replica only records in order and extents within the
//! disks the hello announced.

use crate::checksums::{fix_frames, fix_records};
use crate::input::{Input, Output};
use std::collections::BTreeMap;
use tidemark_changelog::record::{Entry, RecordRef};
use tidemark_changelog::{DiskId, Seq};
use tidemark_names::Name;
use tidemark_wire::frame::{encode_frame, Frame, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tidemark_wire::message::{digest_count, Received};
use tidemark_wire::receiver::{ExpectHello, Position, ReceiverConfig, ReceiverError, Receiving};
use tidemark_wire::{
    ChunkData, ChunkPurpose, Compression, DecodeError, Disk, DiskSync, ErrorClass, ErrorCode,
    FrameDecoder, Message, MessageDecoder, MessageType, RecordBatch, RecordId, Replica,
    ReplicaError,
};

/// The host the fuzzed peer's certificate names.
const HOST: &str = "db1";

/// A stream of frames, fed to the frame decoder in pieces: `data` is a
/// mode byte (bit 0: repair checksums), a piece length (0: all at once),
/// then the stream.
pub fn frames(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let piece = usize::from(input.u8());
    let mut stream = input.rest().to_vec();
    if mode & 1 != 0 {
        fix_records(&mut stream);
        fix_frames(&mut stream);
    }
    let piece = if piece == 0 {
        stream.len().max(1)
    } else {
        piece
    };
    let mut decoder = FrameDecoder::new();
    let mut fed = 0;
    for bytes in stream.chunks(piece) {
        decoder.feed(bytes);
        fed += bytes.len();
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => check_frame(frame),
                Ok(None) => break,
                Err(error) => return check_failed(error, || decoder.next_frame().map(drop)),
            }
            assert!(decoder.buffered() <= fed);
        }
    }
}

/// A decoder that failed stays failed: a stream that lost its framing is
/// never trusted again.
fn check_failed(error: DecodeError, mut next: impl FnMut() -> Result<(), DecodeError>) {
    let _ = (error.to_string(), error.is_corruption());
    assert!(matches!(next(), Err(DecodeError::Failed)));
}

/// A decoded frame encodes back (raw) to a frame that decodes to it.
fn check_frame(frame: Frame) {
    let bytes = encode_frame(
        frame.version,
        frame.msg_type,
        &frame.body,
        Compression::None,
    )
    .expect("a decoded body fits a frame");
    let mut again = FrameDecoder::new();
    again.feed(&bytes);
    assert_eq!(
        again.next_frame().expect("re-encoded frame"),
        Some(frame.clone())
    );
    let _ = Message::decode(frame).map_err(|e| e.to_string());
}

/// One frame body: `data` is the type byte, a mode byte (bit 0: repair
/// the checksums of the records in it; bit 1: protocol version 1 rather
/// than the newest), then the body.
pub fn message(data: &[u8]) {
    let mut input = Input::new(data);
    let Some(msg_type) = MessageType::from_code(input.u8()) else {
        return;
    };
    let mode = input.u8();
    let mut body = input.rest().to_vec();
    if mode & 1 != 0 {
        fix_records(&mut body);
    }
    let version = if mode & 2 != 0 {
        MIN_PROTOCOL_VERSION
    } else {
        PROTOCOL_VERSION
    };
    let frame = Frame {
        version,
        msg_type,
        body: body.clone().into(),
    };
    let msg = match Message::decode(frame) {
        Ok(msg) => msg,
        Err(error) => return drop(error.to_string()),
    };
    assert_eq!(msg.msg_type(), msg_type);
    // A message has one encoding: what decoded encodes to the same bytes.
    let encoded = msg.encode_body(version).expect("a decoded message encodes");
    assert_eq!(encoded, body, "{msg:?} encodes to other bytes");
    if let Message::Records(batch) = &msg {
        let mut count = 0;
        for record in batch.records() {
            record.expect("a decoded batch's records verify");
            count += 1;
        }
        assert_eq!(count, batch.len());
    }
    let frame = msg
        .encode(version, Compression::Fast)
        .expect("a decoded message encodes");
    let mut decoder = MessageDecoder::new();
    decoder.feed(&frame);
    assert_eq!(
        decoder.next_message().expect("re-encoded message"),
        Some(Received::new(version, msg))
    );
}

/// A replica that holds nothing but checks what the session asks of it:
/// records strictly in order, never one already applied, and every extent
/// within a disk of the hello.
#[derive(Default)]
struct CheckingReplica {
    sizes: BTreeMap<DiskId, u64>,
    synced: BTreeMap<DiskId, u64>,
    applied: Option<RecordId>,
    durable: Option<RecordId>,
    lease: u64,
}

impl CheckingReplica {
    fn check_extent(&self, disk: DiskId, offset: u64, length: u64) {
        let size = self.sizes.get(&disk).expect("a disk of the hello");
        assert!(length > 0, "an empty extent");
        assert!(
            offset.checked_add(length).is_some_and(|end| end <= *size),
            "{offset}+{length} beyond disk {disk} of {size} bytes"
        );
    }
}

impl Replica for CheckingReplica {
    fn position(&self) -> Position {
        let durable = self.durable.unwrap_or(RecordId {
            seq: Seq::ZERO,
            generation: 0,
        });
        Position {
            durable_seq: durable.seq,
            generation: durable.generation,
            disks: self
                .synced
                .iter()
                .map(|(&id, &synced)| DiskSync { id, synced })
                .collect(),
            resyncing: Vec::new(),
        }
    }

    fn ensure_disks(&mut self, disks: &[Disk]) -> Result<(), ReplicaError> {
        for d in disks {
            if *self.sizes.entry(d.id).or_insert(d.size) != d.size {
                return Err(ReplicaError {
                    class: ErrorClass::Permanent,
                    code: ErrorCode::UnknownDisk,
                    message: "disk size changed".into(),
                });
            }
            self.synced.entry(d.id).or_insert(0);
        }
        Ok(())
    }

    fn apply_record(&mut self, record: RecordRef<'_>) -> Result<(), ReplicaError> {
        let h = &record.header;
        let id = RecordId {
            seq: h.seq,
            generation: h.generation,
        };
        if let Some(prev) = self.applied {
            assert!(id.follows(prev), "{id:?} applied after {prev:?}");
        }
        if h.disk != DiskId::GROUP {
            self.check_extent(h.disk, h.offset, h.length);
        }
        self.applied = Some(id);
        Ok(())
    }

    fn apply_chunk(
        &mut self,
        disk: DiskId,
        offset: u64,
        purpose: ChunkPurpose,
        data: &ChunkData,
    ) -> Result<(), ReplicaError> {
        self.check_extent(disk, offset, data.len());
        if purpose == ChunkPurpose::InitialSync {
            self.synced.insert(disk, offset + data.len());
        }
        Ok(())
    }

    fn digests(
        &mut self,
        disk: DiskId,
        offset: u64,
        length: u64,
        block_size: u32,
    ) -> Result<Vec<[u8; 32]>, ReplicaError> {
        self.check_extent(disk, offset, length);
        let n = digest_count(offset, length, block_size).expect("a valid digest request");
        Ok(vec![[0; 32]; n as usize])
    }

    fn resync_done(&mut self, disk: DiskId, offset: u64, length: u64) -> Result<(), ReplicaError> {
        self.check_extent(disk, offset, length);
        Ok(())
    }

    fn commit(&mut self) -> Result<Position, ReplicaError> {
        self.durable = self.applied.or(self.durable);
        Ok(self.position())
    }

    fn new_lease(&mut self) -> u64 {
        self.lease += 1;
        self.lease
    }

    fn current_lease(&self) -> u64 {
        self.lease
    }

    /// The receiver's own check of a spec: it parses the text as the
    /// store keeps it (the parser is fed what a shipper sends).
    fn keep_vm_spec(
        &mut self,
        from_seq: Seq,
        text: &str,
    ) -> Result<Seq, tidemark_wire::VmSpecRefused> {
        let after = self.applied.map_or(Seq::ZERO, |a| a.seq);
        assert!(from_seq > after || after == Seq(u64::MAX), "a spec applies after what is applied");
        tidemark_receiver::vm_spec::check(text)
            .map(|_| from_seq)
            .map_err(|reason| tidemark_wire::VmSpecRefused::Invalid { reason })
    }
}

/// Sends what the session answers through a decoder, as the shipper
/// reads it.
fn check_answers(frames: &[Vec<u8>]) {
    let mut decoder = MessageDecoder::new();
    for frame in frames {
        decoder.feed(frame);
        let msg = decoder
            .next_message()
            .expect("the receiver's frames decode");
        assert!(msg.is_some());
    }
}

/// A receiver session: `data` is a mode byte (bit 0: repair checksums;
/// bit 1: commit after every chunk byte), a record id the replica starts
/// from, then the shipper's frames.
pub fn receiver(data: &[u8]) {
    let mut input = Input::new(data);
    let mode = input.u8();
    let start = RecordId {
        seq: Seq(input.u64()),
        generation: input.u32(),
    };
    let mut stream = input.rest().to_vec();
    if mode & 1 != 0 {
        fix_records(&mut stream);
        fix_frames(&mut stream);
    }
    let mut config = ReceiverConfig::new(&Name::from_static(HOST));
    if mode & 2 != 0 {
        config.commit_bytes = 1;
    }
    let mut replica = CheckingReplica {
        durable: (start.seq != Seq::ZERO).then_some(start),
        applied: (start.seq != Seq::ZERO).then_some(start),
        ..CheckingReplica::default()
    };
    let mut decoder = MessageDecoder::new();
    decoder.feed(&stream);
    let refused = |error: ReceiverError| {
        if error.to_message().is_some() {
            error.to_frame().expect("an error message encodes");
        }
        let _ = (error.class(), error.code(), error.to_string());
    };
    let first = match decoder.next_message() {
        Ok(Some(msg)) => msg,
        Ok(None) => return,
        Err(error) => return refused(ReceiverError::from_decode(&error, MIN_PROTOCOL_VERSION)),
    };
    let mut session: Receiving = match ExpectHello::new(config).handle_message(first, &mut replica)
    {
        Ok((session, welcome)) => {
            check_answers(&[welcome]);
            session
        }
        Err(error) => return refused(error),
    };
    loop {
        let result = match decoder.next_message() {
            Ok(Some(msg)) => session.handle_message(msg, &mut replica),
            Ok(None) => {
                if let Ok(frames) = session.handle_idle(&mut replica) {
                    check_answers(&frames);
                }
                return;
            }
            Err(error) => return refused(ReceiverError::from_decode(&error, session.version())),
        };
        match result {
            Ok(frames) => check_answers(&frames),
            Err(error) => return refused(error),
        }
        let _ = session.take_drained();
        let applied = session.applied();
        if let Some(replica_applied) = replica.applied {
            assert_eq!(applied, replica_applied);
        }
    }
}

/// Records of every kind, consecutive from `seq` in `generation`.
fn records(seq: u64, generation: u32) -> RecordBatch {
    let data = [0x5a; 700];
    let entries = [
        Entry::write(0, 4096, &data, 1),
        Entry::write_zeroes(0, 8192, 4096, true, 2),
        Entry::trim(1, 0, 512, 3),
        Entry::barrier(4),
        Entry::marker("before upgrade", true, 5),
        Entry::resync_needed(1, 1024, 2048, 6),
    ];
    let encoded: Vec<Vec<u8>> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| e.encode(seq + i as u64, generation))
        .collect();
    RecordBatch::from_records(encoded.iter().map(Vec::as_slice)).expect("consecutive records")
}

/// A VM spec as `tidemark vm protect` reads it.
const VM_SPEC: &str = "[vm]\nname = \"db\"\ncpus = 2\nmemory = \"1GiB\"\n\n\
    [[vm.disk]]\nname = \"data\"\npath = \"/var/lib/images/db-data.qcow2\"\nformat = \"qcow2\"\n\n\
    [[vm.nic]]\nbridge = \"br0\"\nmac = \"52:54:00:12:34:56\"\n";

/// A whole session as a shipper sends it: hello, initial sync, a VM spec,
/// records, a spec that is refused, a resync by digests, a drain.
fn session_messages() -> Vec<Message> {
    let disk = |id: u32, name: &'static str, size| Disk {
        id: DiskId(id),
        name: Name::from_static(name),
        size,
    };
    let batch = records(1, 1);
    let last = batch.last().expect("records").seq;
    vec![
        Message::Hello {
            host: Name::from_static(HOST),
            group: Name::from_static("db"),
            generation: 1,
            disks: vec![disk(0, "data", 64 << 10), disk(1, "logs", 16 << 10)],
            min_version: MIN_PROTOCOL_VERSION,
            software: "fuzz".into(),
        },
        Message::Chunk {
            disk: DiskId(0),
            offset: 0,
            after_seq: Seq(0),
            purpose: ChunkPurpose::InitialSync,
            data: ChunkData::Data(vec![7; 4096]),
        },
        Message::Chunk {
            disk: DiskId(0),
            offset: 4096,
            after_seq: Seq(0),
            purpose: ChunkPurpose::InitialSync,
            data: ChunkData::Zero(60 << 10),
        },
        Message::VmSpec {
            text: VM_SPEC.to_string(),
        },
        Message::Records(batch),
        Message::VmSpec {
            text: "[vm]\nname = \"db\"\ncpus = 0\n".to_string(),
        },
        Message::DigestRequest {
            disk: DiskId(1),
            offset: 0,
            length: 4096,
            block_size: 1024,
        },
        Message::Chunk {
            disk: DiskId(1),
            offset: 1024,
            after_seq: last,
            purpose: ChunkPurpose::Resync,
            data: ChunkData::Data(vec![9; 2048]),
        },
        Message::ResyncDone {
            disk: DiskId(1),
            offset: 1024,
            length: 2048,
            after_seq: last,
        },
        Message::Drained {
            id: 1,
            last_seq: last,
            error: String::new(),
        },
    ]
}

/// The messages only a receiver sends, and an error.
fn receiver_messages() -> Vec<Message> {
    vec![
        Message::Welcome {
            durable_seq: Seq(6),
            generation: 1,
            disks: vec![DiskSync {
                id: DiskId(0),
                synced: 4096,
            }],
            resyncing: vec![tidemark_wire::Extent {
                disk: DiskId(1),
                offset: 0,
                length: 512,
            }],
            software: "fuzz".into(),
        },
        Message::Ack {
            durable_seq: Seq(6),
            generation: 1,
            frames: 3,
            disks: vec![DiskSync {
                id: DiskId(1),
                synced: 0,
            }],
        },
        Message::Digests {
            disk: DiskId(1),
            offset: 0,
            block_size: 1024,
            digests: vec![[3; 32]; 4],
        },
        Message::DrainRequest { id: 1 },
        Message::VmSpecReply(tidemark_wire::VmSpecReply::Kept { from_seq: Seq(7) }),
        Message::VmSpecReply(tidemark_wire::VmSpecReply::Refused {
            reason: "cpus: 0 is out of range".into(),
        }),
        Message::error(ErrorClass::Transient, ErrorCode::Busy, "try later"),
    ]
}

/// A shipper's status report (on a stream of its own, not the session's).
fn status_report() -> Message {
    use tidemark_wire::{Progress, ReportState, StatusReport};
    Message::StatusReport(StatusReport {
        state: ReportState::InitialSync,
        reason: String::new(),
        pending_records: 12,
        pending_bytes: 49_152,
        lag_ms: 1_500,
        wire_bytes_per_sec: 1 << 20,
        record_bytes_per_sec: 3 << 20,
        sync: Progress {
            done: 1 << 20,
            total: 4 << 20,
        },
        sync_bytes_per_sec: 8 << 20,
        resync: Progress::default(),
    })
}

fn stream(messages: &[Message], compression: Compression) -> Vec<u8> {
    messages
        .iter()
        .flat_map(|m| {
            m.encode(PROTOCOL_VERSION, compression)
                .expect("seed messages encode")
        })
        .collect()
}

/// Streams of every message, raw and compressed.
pub fn frames_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let all: Vec<Message> = session_messages()
        .into_iter()
        .chain(receiver_messages())
        .collect();
    let seed = |piece: u8, compression| {
        Output::new()
            .u8(1)
            .u8(piece)
            .bytes(&stream(&all, compression))
            .finish()
    };
    vec![
        ("raw", seed(0, Compression::None)),
        ("zstd-in-pieces", seed(13, Compression::Fast)),
    ]
}

/// One body of every message type.
pub fn message_seeds() -> Vec<(&'static str, Vec<u8>)> {
    session_messages()
        .into_iter()
        .chain(receiver_messages())
        .chain([status_report()])
        .map(|m| {
            let name = m.msg_type().name();
            let body = m
                .encode_body(PROTOCOL_VERSION)
                .expect("seed messages encode");
            (
                name,
                Output::new()
                    .u8(m.msg_type().code())
                    .u8(1)
                    .bytes(&body)
                    .finish(),
            )
        })
        .collect()
}

/// A fresh replica and one that resumes: the whole session, and one whose
/// records are partly applied already.
pub fn receiver_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let messages = session_messages();
    let fresh = Output::new()
        .u8(1)
        .u64(0)
        .u32(0)
        .bytes(&stream(&messages, Compression::None))
        .finish();
    // Records 1..=3 were applied by an earlier session: the hello, the
    // records again (the first three are duplicates) and the drain.
    let again = [&messages[0], &messages[4], &messages[messages.len() - 1]].map(Clone::clone);
    let resumed = Output::new()
        .u8(3)
        .u64(3)
        .u32(1)
        .bytes(&stream(&again, Compression::Fast))
        .finish();
    vec![("fresh", fresh), ("resumed", resumed)]
}
