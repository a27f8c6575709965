//! Simulated network between a shipper and a receiver session: an in-memory
//! source (two disks, a log of random writes / zeroes / trims / barriers /
//! markers, an unclean restart in the middle: unlogged writes, a new
//! generation that jumps the sequence and marks the hot extents
//! resync-needed), an in-memory replica that loses uncommitted changes when
//! the receiver crashes, and a network that drops connections, duplicates
//! frames, splits them, flips bytes and delivers stale frames of dropped
//! connections to their (fenced) sessions. Every seed must converge to the
//! source byte for byte without a permanent error.
//!
//! The shipper side is the shipping daemon's own [`ShipperCore`]: this file
//! only answers its needs (a log that grows as the steps pass and hands over
//! random numbers of records, disks read as they are after the last record
//! sent, chunks of a random size per connection) and carries its frames.
//! Its clock is virtual: steps of 10 ms, now and then a stall of up to
//! 400 ms, so the core's own timeouts (no welcome, a silent peer, the idle
//! poll of the log) end stalled sessions.
//!
//! The two ends are of mixed releases too: a connection's shipper may
//! offer only protocol version 1 (an older shipper), and its receiver may
//! speak only version 1, or be of the release before version negotiation
//! (which refuses a newer hello with a transient protocol error in a
//! version-1 frame, as that release did). Every frame of a session must be
//! of the version the session agreed on.

use rand::rngs::StdRng;
use rand::{Rng as _, RngCore, SeedableRng};
use std::collections::{BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};
use tidemark_changelog::record::{Entry, Kind, Record, RecordRef};
use tidemark_changelog::{DiskId, Seq};
use tidemark_names::Name;
use tidemark_wire::receiver::{
    DrainRefused, ExpectHello, Position, ReceiverConfig, ReceiverError, Receiving,
};
use tidemark_wire::shipper::{
    block_digests, AwaitingWelcome, HelloInfo, ShipperConfig, ShipperError,
};
use tidemark_wire::shipper_core::{CoreConfig, CoreEvent, Need, ShipperCore};
use tidemark_wire::{
    encode_frame, ChunkData, ChunkPurpose, Compression, DecodeError, Disk, DiskSync, ErrorClass,
    ErrorCode, Message, MessageDecoder, MessageType, Received, RecordBatch, RecordId, Replica,
    ReplicaError, Versions, VmSpecNews, VmSpecRefused, VmSpecReply, PROTOCOL_VERSION,
};

const HOST: &str = "db1";
const SIZES: [u64; 2] = [32 << 10, 24 << 10];
const CHUNK: u64 = 8 << 10;

/// The seeded generator every choice of a run comes from, so a seed
/// replays the run exactly.
struct Rng(StdRng);

impl Rng {
    fn seeded(seed: u64) -> Rng {
        Rng(StdRng::seed_from_u64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `0..n`, or 0 if `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        self.0.random_range(0..n.max(1))
    }
    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        if self.chance(300) {
            vec![self.next() as u8; n]
        } else {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }
}

type Disks = Vec<Vec<u8>>;

/// The protected side: the log and the disk images after each record.
struct Source {
    records: Vec<Vec<u8>>,
    ids: Vec<RecordId>,
    /// `images[i]`: the disks after the first `i` records.
    images: Vec<Disks>,
}

impl Source {
    fn build(rng: &mut Rng) -> Source {
        let mut disks: Disks = SIZES
            .iter()
            .map(|&s| {
                let mut d = rng.bytes(s as usize);
                let z = rng.below(s - 8192) as usize;
                d[z..z + 8192].fill(0);
                d
            })
            .collect();
        let mut src = Source {
            records: Vec::new(),
            ids: Vec::new(),
            images: vec![disks.clone()],
        };
        let mut seq = 1 + rng.below(3);
        let mut generation = 1;
        let ops = |rng: &mut Rng,
                   n: u64,
                   seq: &mut u64,
                   generation: u32,
                   src: &mut Source,
                   disks: &mut Disks| {
            for _ in 0..n {
                let disk = rng.below(2) as usize;
                let size = SIZES[disk];
                let offset = rng.below(size - 1);
                let len = 1 + rng.below((size - offset).min(4096));
                let data = rng.bytes(len as usize);
                let e = match rng.below(10) {
                    0..=4 => Entry::write(disk as u32, offset, &data, 1),
                    5 => Entry::write_zeroes(disk as u32, offset, len, false, 1),
                    6 => Entry::trim(disk as u32, offset, len, 1),
                    7 | 8 => Entry::barrier(1),
                    _ => Entry::marker("point", rng.chance(500), 1),
                };
                src.push(e, *seq, generation, disks);
                *seq += 1;
            }
        };
        let n1 = 40 + rng.below(60);
        ops(rng, n1, &mut seq, generation, &mut src, &mut disks);
        // Unclean restart: writes reached the disks but not the log.
        let mut hot = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let disk = rng.below(2) as usize;
            let offset = rng.below(SIZES[disk] - 3000);
            let len = 1 + rng.below(3000) as usize;
            let data = rng.bytes(len);
            disks[disk][offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            hot.push((disk as u32, offset, data.len() as u64));
        }
        generation = 2;
        seq += 500 + rng.below(500);
        for (disk, offset, len) in hot {
            src.push(
                Entry::resync_needed(disk, offset, len, 1),
                seq,
                generation,
                &mut disks,
            );
            seq += 1;
        }
        let n2 = 20 + rng.below(60);
        ops(rng, n2, &mut seq, generation, &mut src, &mut disks);
        src
    }

    fn push(&mut self, e: Entry<'_>, seq: u64, generation: u32, disks: &mut Disks) {
        let bytes = e.encode(seq, generation);
        let d = e.disk.index();
        let (o, l) = (e.offset as usize, e.length as usize);
        match e.kind {
            Kind::Write => disks[d][o..o + l].copy_from_slice(e.payload),
            Kind::WriteZeroes | Kind::Trim => disks[d][o..o + l].fill(0),
            Kind::Grow => disks[d].resize(o + l, 0),
            _ => {}
        }
        self.records.push(bytes);
        self.ids.push(RecordId {
            seq: Seq(seq),
            generation,
        });
        self.images.push(disks.clone());
    }

    /// The disks right after record `seq` (0: before the first).
    fn image_at(&self, seq: Seq) -> &Disks {
        &self.images[self.ids.partition_point(|r| r.seq <= seq)]
    }

    fn last(&self) -> RecordId {
        *self.ids.last().unwrap()
    }
}

/// The replica store: committed and working state; a crash drops the
/// working state. Checks every apply against the source.
struct MemReplica<'a> {
    source: &'a Source,
    committed: (Disks, Position, BTreeSet<(u32, u64, u64)>),
    work: (Disks, Position, BTreeSet<(u32, u64, u64)>),
    sizes: Vec<u64>,
    applied_since_commit: HashSet<u64>,
    lease: u64,
    record_applies: u64,
    commits: u64,
    /// A resync-needed record during the initial sync moved a disk's sync
    /// position back since the last commit.
    rewound: bool,
    /// The VM specs kept, with the record each applies from.
    vm_specs: Vec<(Seq, String)>,
}

impl<'a> MemReplica<'a> {
    fn new(source: &'a Source) -> Self {
        let empty = (Vec::new(), Position::default(), BTreeSet::new());
        MemReplica {
            source,
            committed: empty.clone(),
            work: empty,
            sizes: Vec::new(),
            applied_since_commit: HashSet::new(),
            lease: 0,
            record_applies: 0,
            commits: 0,
            rewound: false,
            vm_specs: Vec::new(),
        }
    }

    fn crash(&mut self) {
        self.work = self.committed.clone();
        self.applied_since_commit.clear();
        self.rewound = false;
    }

    fn synced(&mut self, disk: DiskId) -> &mut u64 {
        &mut self
            .work
            .1
            .disks
            .iter_mut()
            .find(|d| d.id == disk)
            .unwrap()
            .synced
    }
}

impl MemReplica<'_> {
    /// The committed position, with the extents it waits for (as the store
    /// reports them in the Welcome).
    fn committed_position(&self) -> Position {
        let mut p = self.committed.1.clone();
        p.resyncing = self
            .committed
            .2
            .iter()
            .map(|&(disk, offset, length)| tidemark_wire::Extent {
                disk: DiskId(disk),
                offset,
                length,
            })
            .collect();
        p
    }
}

impl Replica for MemReplica<'_> {
    fn position(&self) -> Position {
        self.committed_position()
    }

    /// Keeps specs that start with a `[vm]` table (the real check is the
    /// receiver's); the same text again adds no version.
    fn keep_vm_spec(&mut self, from_seq: Seq, text: &str) -> Result<Seq, VmSpecRefused> {
        if !text.starts_with("[vm]") {
            return Err(VmSpecRefused::Invalid {
                reason: "no [vm] table".into(),
            });
        }
        match self.vm_specs.last() {
            Some((seq, last)) if last == text => Ok(*seq),
            _ => {
                self.vm_specs.push((from_seq, text.to_string()));
                Ok(from_seq)
            }
        }
    }

    fn ensure_disks(&mut self, disks: &[Disk]) -> Result<(), ReplicaError> {
        for d in disks {
            match self.sizes.get(d.id.index()) {
                Some(&s) if s == d.size => {}
                Some(_) => {
                    return Err(ReplicaError {
                        class: ErrorClass::Permanent,
                        code: ErrorCode::UnknownDisk,
                        message: "disk size changed".into(),
                    })
                }
                None => {
                    assert_eq!(d.id.index(), self.sizes.len());
                    self.sizes.push(d.size);
                    for state in [&mut self.work, &mut self.committed] {
                        state.0.push(vec![0; d.size as usize]);
                        state.1.disks.push(DiskSync {
                            id: d.id,
                            synced: 0,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_record(&mut self, record: RecordRef<'_>) -> Result<(), ReplicaError> {
        let h = &record.header;
        // In order, once per commit interval, and exactly the source's bytes.
        assert!(
            h.seq > self.work.1.durable_seq,
            "record {} out of order",
            h.seq
        );
        assert!(
            self.applied_since_commit.insert(h.seq.get()),
            "record {} twice",
            h.seq
        );
        let i = self.source.ids.iter().position(|r| r.seq == h.seq).unwrap();
        // A version-1 session carries the source's record in version 1.
        let original = Record::decode(&self.source.records[i])
            .unwrap()
            .in_version(h.version)
            .unwrap();
        assert!(
            record == original.as_view(),
            "record {} differs from the source: {:?} vs {:?}",
            h.seq,
            record.header,
            original.header
        );
        self.record_applies += 1;
        let disks = &mut self.work.0;
        let (d, o, l) = (h.disk.index(), h.offset as usize, h.length as usize);
        match h.kind {
            Kind::Write => disks[d][o..o + l].copy_from_slice(record.payload),
            Kind::WriteZeroes | Kind::Trim => disks[d][o..o + l].fill(0),
            // As the replica store does: during the group's initial sync
            // the extent is copied again by it (the disk's sync position
            // goes back), afterwards it waits for a resync.
            Kind::ResyncNeeded => {
                let initial_sync = self
                    .work
                    .1
                    .disks
                    .iter()
                    .zip(&self.sizes)
                    .any(|(d, s)| d.synced < *s);
                if initial_sync {
                    let d = self.synced(h.disk);
                    *d = (*d).min(h.offset);
                    self.rewound = true;
                } else {
                    self.work.2.insert((h.disk.get(), h.offset, h.length));
                }
            }
            Kind::Barrier | Kind::Marker => {}
            Kind::Grow => {
                disks[d].resize(o + l, 0);
                self.sizes[d] = self.sizes[d].max((o + l) as u64);
            }
        }
        self.work.1.durable_seq = h.seq;
        self.work.1.generation = h.generation;
        Ok(())
    }

    fn apply_chunk(
        &mut self,
        disk: DiskId,
        offset: u64,
        purpose: ChunkPurpose,
        data: &ChunkData,
    ) -> Result<(), ReplicaError> {
        let (o, l) = (offset as usize, data.len() as usize);
        // The sim's shipper reads exactly at the position the chunk goes to.
        let at = self.work.1.durable_seq;
        assert_eq!(
            match data {
                ChunkData::Data(d) => d.clone(),
                ChunkData::Zero(n) => vec![0; *n as usize],
            },
            self.source.image_at(at)[disk.index()][o..o + l],
            "chunk of disk {disk} at {offset} differs from the source"
        );
        match data {
            ChunkData::Data(d) => self.work.0[disk.index()][o..o + l].copy_from_slice(d),
            ChunkData::Zero(_) => self.work.0[disk.index()][o..o + l].fill(0),
        }
        if purpose == ChunkPurpose::InitialSync {
            *self.synced(disk) = offset + data.len();
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
        let d = &self.work.0[disk.index()];
        Ok(block_digests(
            &d[offset as usize..(offset + length) as usize],
            block_size,
        ))
    }

    fn resync_done(&mut self, disk: DiskId, offset: u64, length: u64) -> Result<(), ReplicaError> {
        self.work.2.remove(&(disk.get(), offset, length));
        Ok(())
    }

    fn commit(&mut self) -> Result<Position, ReplicaError> {
        let before = &self.committed.1;
        let after = &self.work.1;
        assert!(
            after.durable_seq >= before.durable_seq,
            "durable seq went back"
        );
        for (a, b) in after.disks.iter().zip(&before.disks) {
            assert!(
                a.synced >= b.synced || self.rewound,
                "synced offset went back"
            );
        }
        self.committed = self.work.clone();
        self.applied_since_commit.clear();
        self.rewound = false;
        self.commits += 1;
        Ok(self.committed_position())
    }

    fn new_lease(&mut self) -> u64 {
        self.lease += 1;
        self.lease
    }

    fn current_lease(&self) -> u64 {
        self.lease
    }
}

/// What the simulated daemon keeps across connections: the versions to
/// offer next, after a receiver of version 1 refused a newer hello.
#[derive(Default)]
struct ShipperDaemon {
    next_offer: Option<Versions>,
}

/// The daemon's side of one connection: the real shipper core, and the
/// log position it has read up to.
struct ShipperConn {
    core: ShipperCore,
    /// Index in the source's records of the next record to hand over.
    next_index: usize,
    /// Initial-sync chunks read ahead, not handed over yet, in the order
    /// asked for (the disk as it was when each was asked for).
    reads: VecDeque<ChunkData>,
}

enum ReceiverSide {
    Hello(ExpectHello),
    Receiving(Receiving),
}

struct Conn {
    shipper: ShipperConn,
    receiver: Option<ReceiverSide>,
    /// The receiver is of the release before version negotiation: it reads
    /// only frames of version 1.
    legacy: bool,
    /// A frame to the receiver was damaged on this connection.
    damaged: bool,
    to_receiver: VecDeque<Vec<u8>>,
    to_shipper: VecDeque<Vec<u8>>,
    receiver_in: MessageDecoder,
    shipper_in: MessageDecoder,
}

/// The protocol version a frame's header names.
fn frame_version(frame: &[u8]) -> u16 {
    u16::from_le_bytes([frame[4], frame[5]])
}

impl Conn {
    /// The version the receiver answers in: its session's, else 1.
    fn receiver_version(&self) -> u16 {
        match &self.receiver {
            Some(ReceiverSide::Receiving(s)) => s.version(),
            _ => 1,
        }
    }
}

/// A dropped connection still delivering to its fenced session.
struct Stale {
    session: Receiving,
    decoder: MessageDecoder,
    frames: VecDeque<Vec<u8>>,
}

#[derive(Default, Debug)]
struct Stats {
    connections: u64,
    crashes: u64,
    corrupted: u64,
    duplicated: u64,
    stale_refused: u64,
    transient_errors: u64,
    steps: u64,
    /// Sessions, by protocol version (index: version).
    sessions: [u64; PROTOCOL_VERSION as usize + 1],
    /// Hellos a version-1 receiver refused, and the shipper offered
    /// version 1 alone on its next connection.
    offered_older: u64,
    /// Sessions the shipper core ended on a timeout (no welcome, a
    /// silent peer).
    timeouts: u64,
    /// Stalls of the shipper's host (virtual time jumping ahead).
    stalls: u64,
    /// Coarse resync blocks compared, and fine blocks sent, by the core.
    resync_compared: u64,
    resync_sent: u64,
    /// VM specs the receiver answered as kept, and sessions too old to
    /// carry one.
    vm_specs_kept: u64,
    vm_specs_not_carried: u64,
}

/// The VM spec every connection's shipper is given.
const SIM_SPEC: &str = "[vm]\nname = \"g\"\n";

fn hello() -> HelloInfo {
    HelloInfo {
        host: Name::from_static(HOST),
        group: Name::from_static("g"),
        generation: 2,
        disks: SIZES
            .iter()
            .enumerate()
            .map(|(i, &size)| Disk {
                id: DiskId(i as u32),
                name: Name::new(format!("disk{i}")).unwrap(),
                size,
            })
            .collect(),
    }
}

/// Milliseconds of virtual time per step of the simulation.
const STEP: Duration = Duration::from_millis(10);

fn connect(stats: &mut Stats, daemon: &mut ShipperDaemon, rng: &mut Rng, now: Instant) -> Conn {
    stats.connections += 1;
    let versions = daemon.next_offer.take().unwrap_or(if rng.chance(200) {
        Versions::only(1)
    } else {
        Versions::SUPPORTED
    });
    let config = CoreConfig {
        session: ShipperConfig {
            window_bytes: 4096 + rng.below(64 << 10),
            compression: if rng.chance(500) {
                Compression::Fast
            } else {
                Compression::None
            },
            versions,
        },
        // Random sync chunks; above 4 KiB they are coarse resync blocks too.
        chunk_bytes: 1 + rng.below(CHUNK),
        read_ahead: 1 + rng.below(4) as usize,
        // A stalled stream (a damaged length field, a dead peer) times out.
        welcome_timeout: STEP * 20,
        peer_timeout: STEP * 20,
        idle_poll: STEP * 3,
        ..CoreConfig::default()
    };
    let mut core = ShipperCore::new(hello(), config, now).unwrap();
    // Given before the session runs, as the daemon does: sent once it
    // runs, after the Welcome.
    core.handle_vm_spec(SIM_SPEC.to_string());
    let mut to_receiver = VecDeque::new();
    while let Some(f) = core.poll_transmit() {
        to_receiver.push_back(f);
    }
    let mut rc = ReceiverConfig::new(&Name::from_static(HOST));
    rc.commit_bytes = 1 + rng.below(32 << 10);
    let legacy = rng.chance(150);
    if legacy || rng.chance(150) {
        rc.versions = Versions::only(1);
    }
    Conn {
        shipper: ShipperConn {
            core,
            next_index: 0,
            reads: VecDeque::new(),
        },
        receiver: Some(ReceiverSide::Hello(ExpectHello::new(rc))),
        legacy,
        damaged: false,
        to_receiver,
        to_shipper: VecDeque::new(),
        receiver_in: MessageDecoder::new(),
        shipper_in: MessageDecoder::new(),
    }
}

fn first_after(source: &Source, seq: Seq) -> Option<RecordId> {
    source.ids.iter().copied().find(|r| r.seq > seq)
}

/// Answers the core's next need as the daemon does (the log hands over a
/// random number of the first `available` records; disks are read as they
/// are after the last record sent; initial-sync chunks are read ahead and
/// handed over later, in order, while the log goes on growing), then takes
/// its frames. Returns whether it did anything.
fn shipper_step(
    c: &mut ShipperConn,
    source: &Source,
    available: usize,
    rng: &mut Rng,
    now: Instant,
    out: &mut VecDeque<Vec<u8>>,
) -> bool {
    let mut acted = false;
    // A read ahead ends now and then, and whenever nothing else is asked.
    let need = if rng.chance(300) {
        None
    } else {
        c.core.poll_need()
    };
    if need.is_none() {
        if let Some(data) = c.reads.pop_front() {
            acted = true;
            c.core.handle_chunk(data);
        }
    }
    if let Some(need) = need {
        acted = true;
        match need {
            Need::FirstRecordAfter { after } => {
                c.core.handle_first_record(first_after(source, after), now)
            }
            Need::LogBatch { .. } => {
                let left = available.saturating_sub(c.next_index);
                if left == 0 {
                    c.core.handle_log_batch(None, now);
                } else {
                    let n = (1 + rng.below(6) as usize).min(left);
                    let slice = &source.records[c.next_index..c.next_index + n];
                    let batch = RecordBatch::from_records(slice.iter().map(Vec::as_slice)).unwrap();
                    c.next_index += n;
                    c.core.handle_log_batch(Some(batch), now);
                }
            }
            Need::Chunk {
                disk,
                offset,
                length,
                purpose,
            } => {
                let sent = c.core.status(now).sent_seq;
                let img = &source.image_at(sent)[disk.index()];
                let bytes = &img[offset as usize..(offset + length) as usize];
                let data = if purpose == ChunkPurpose::InitialSync && bytes.iter().all(|&b| b == 0)
                {
                    ChunkData::Zero(length)
                } else {
                    ChunkData::Data(bytes.to_vec())
                };
                if purpose == ChunkPurpose::InitialSync {
                    c.reads.push_back(data);
                } else {
                    assert!(
                        c.reads.is_empty(),
                        "a resync read while chunks are read ahead"
                    );
                    c.core.handle_chunk(data);
                }
            }
        }
    }
    while let Some(f) = c.core.poll_transmit() {
        acted = true;
        out.push_back(f);
    }
    acted
}

/// Acts on the core's events; returns whether the connection goes on.
fn shipper_events(
    c: &mut ShipperConn,
    daemon: &mut ShipperDaemon,
    stats: &mut Stats,
    source: &Source,
    conn_legacy_or_damaged: bool,
    seed: u64,
) -> bool {
    let mut alive = true;
    while let Some(ev) = c.core.poll_event() {
        match ev {
            CoreEvent::Connected(resume) => {
                c.next_index = source.ids.partition_point(|r| r.seq < resume.from_seq);
            }
            CoreEvent::CursorAdvanced { .. } => {}
            CoreEvent::DrainRequested { .. } => {
                panic!("seed {seed}: the simulated receiver never asks for a drain")
            }
            CoreEvent::Retry(e) => {
                if let ShipperError::OfferOlder { version } = e {
                    // A newer receiver's answer to a hello whose header
                    // was damaged (lengths, flags, type are checked
                    // before the checksum) reads the same: that
                    // connection goes on in version 1, which it serves.
                    assert!(
                        conn_legacy_or_damaged,
                        "seed {seed}: only a version-1 receiver says so"
                    );
                    daemon.next_offer = Some(Versions::only(version));
                    stats.offered_older += 1;
                }
                if matches!(
                    e,
                    ShipperError::PeerSilent { .. } | ShipperError::NoWelcome { .. }
                ) {
                    stats.timeouts += 1;
                }
                stats.transient_errors += 1;
                alive = false;
            }
            CoreEvent::Critical(e) => panic!("seed {seed}: permanent error: {e}"),
            CoreEvent::Stopped => unreachable!("the simulation never stops a session"),
            CoreEvent::VmSpec(VmSpecNews::Answered(VmSpecReply::Kept { .. })) => {
                stats.vm_specs_kept += 1;
            }
            CoreEvent::VmSpec(VmSpecNews::NotCarried { version }) => {
                assert!(version < 3, "seed {seed}: version {version} carries specs");
                stats.vm_specs_not_carried += 1;
            }
            CoreEvent::VmSpec(news) => panic!("seed {seed}: the valid spec was {news:?}"),
        }
    }
    alive
}

fn converged(replica: &MemReplica<'_>, source: &Source) -> bool {
    let p = &replica.committed.1;
    p.durable_seq == source.last().seq
        && p.disks.len() == SIZES.len()
        && p.disks.iter().zip(SIZES).all(|(d, s)| d.synced == s)
        && replica.committed.2.is_empty()
}

fn run(seed: u64) -> Stats {
    let mut rng = Rng::seeded(seed);
    let source = Source::build(&mut rng);
    let mut replica = MemReplica::new(&source);
    let mut daemon = ShipperDaemon::default();
    let mut stats = Stats::default();
    let mut conn: Option<Conn> = None;
    let mut stale: Vec<Stale> = Vec::new();
    let mut max_durable = Seq::ZERO;
    // The virtual clock every instant the shipper core sees comes from.
    let mut now = Instant::now();
    // The tracker appends a record every `pace` steps: the initial sync
    // runs beside a growing log, and may end before the unclean restart's
    // resync-needed records come (then they are resynced by digests).
    let pace = 1 + rng.below(6);
    let mut available = 0;

    while !converged(&replica, &source) {
        stats.steps += 1;
        assert!(
            stats.steps < 400_000,
            "seed {seed}: no convergence: {stats:?}; replica at {:?}, resync pending {:?}, log ends at {:?}",
            replica.committed.1,
            replica.committed.2,
            source.last()
        );
        // Time passes; now and then the shipper's host stalls for a while.
        now += if rng.chance(5) {
            stats.stalls += 1;
            STEP * (1 + rng.below(40) as u32)
        } else {
            STEP
        };
        let c = conn.get_or_insert_with(|| connect(&mut stats, &mut daemon, &mut rng, now));
        let mut alive = true;
        let grown = (stats.steps / pace).min(source.records.len() as u64) as usize;
        if grown > available {
            available = grown;
            // The log watcher's notification, sometimes lost: the core's
            // idle poll finds the records then.
            if rng.chance(800) {
                c.shipper.core.handle_log_changed();
            }
        }

        // Shipper sends (the core's Hello was queued at connect).
        if rng.chance(700) {
            let queued = c.to_receiver.len();
            shipper_step(
                &mut c.shipper,
                &source,
                available,
                &mut rng,
                now,
                &mut c.to_receiver,
            );
            if let Some(v) = c.shipper.core.version() {
                for f in c.to_receiver.iter().skip(queued) {
                    assert_eq!(frame_version(f), v, "seed {seed}");
                }
            }
        }

        // Network to the receiver: whole or split frames, duplicates, damage.
        if let Some(mut f) = c.to_receiver.pop_front() {
            if rng.chance(3) {
                let i = rng.below(f.len() as u64) as usize;
                f[i] ^= 1 << rng.below(8);
                stats.corrupted += 1;
                c.damaged = true;
            }
            if rng.chance(3) {
                c.to_receiver.push_front(f.clone());
                stats.duplicated += 1;
            }
            if rng.chance(200) && f.len() > 1 {
                let cut = 1 + rng.below(f.len() as u64 - 1) as usize;
                c.receiver_in.feed(&f[..cut]);
                c.to_receiver.push_front(f[cut..].to_vec());
            } else {
                c.receiver_in.feed(&f);
            }
            loop {
                let result = match c.receiver_in.next_message() {
                    Ok(None) => break,
                    // What the release before negotiation said to a frame
                    // of another version.
                    Ok(Some(msg)) if c.legacy && msg.version != 1 => {
                        let e = tidemark_wire::DecodeError::UnsupportedVersion(msg.version);
                        Err(ReceiverError::from_decode(&e, 1))
                    }
                    // What the release before negotiation said to a record
                    // of a newer format.
                    Ok(Some(Received {
                        version: 1,
                        message: Message::Records(batch),
                    })) if batch
                        .records()
                        .any(|r| r.is_ok_and(|r| r.header.version > 1)) =>
                    {
                        panic!(
                            "seed {seed}: a version-1 session carried a record of a newer format"
                        );
                    }
                    Ok(Some(msg)) => match c.receiver.take() {
                        Some(ReceiverSide::Hello(h)) => {
                            h.handle_message(msg, &mut replica).map(|(s, w)| {
                                stats.sessions[s.version() as usize] += 1;
                                c.receiver = Some(ReceiverSide::Receiving(s));
                                vec![w]
                            })
                        }
                        Some(ReceiverSide::Receiving(mut s)) => {
                            let r = s.handle_message(msg, &mut replica);
                            c.receiver = Some(ReceiverSide::Receiving(s));
                            r
                        }
                        None => break,
                    },
                    Err(e) => Err(ReceiverError::from_decode(&e, c.receiver_version())),
                };
                match result {
                    Ok(frames) => {
                        // The welcome and everything after it is sent in
                        // the session's version.
                        let Some(ReceiverSide::Receiving(s)) = &c.receiver else {
                            unreachable!("frames come from a session")
                        };
                        for f in &frames {
                            assert_eq!(frame_version(f), s.version(), "seed {seed}");
                        }
                        c.to_shipper.extend(frames)
                    }
                    Err(e) => {
                        assert_eq!(e.class(), ErrorClass::Transient, "seed {seed}: {e}");
                        stats.transient_errors += 1;
                        if let Some(f) = e.to_frame() {
                            c.to_shipper.push_back(f);
                        }
                        c.receiver = None;
                        break;
                    }
                }
            }
        } else if let Some(ReceiverSide::Receiving(s)) = &mut c.receiver {
            if c.receiver_in.buffered() == 0 && rng.chance(300) {
                match s.handle_idle(&mut replica) {
                    Ok(frames) => {
                        for f in &frames {
                            assert_eq!(frame_version(f), s.version(), "seed {seed}");
                        }
                        c.to_shipper.extend(frames);
                    }
                    Err(e) => panic!("seed {seed}: idle: {e}"),
                }
            }
        }

        // Network to the shipper (duplicates and damage too).
        if let Some(mut f) = c.to_shipper.pop_front() {
            if rng.chance(3) {
                let i = rng.below(f.len() as u64) as usize;
                f[i] ^= 1 << rng.below(8);
                stats.corrupted += 1;
            }
            if rng.chance(2) {
                c.to_shipper.push_front(f.clone());
                stats.duplicated += 1;
            }
            c.shipper_in.feed(&f);
            loop {
                match c.shipper_in.next_message() {
                    Ok(None) => break,
                    Ok(Some(m)) => c.shipper.core.handle_message(m, now),
                    Err(_) => {
                        stats.transient_errors += 1;
                        alive = false;
                        break;
                    }
                }
            }
        }
        // The core's timeouts: the welcome's, a dead peer's (a damaged
        // length field stalls the stream), the idle poll of the log.
        if c.shipper.core.poll_timeout().is_some_and(|t| now >= t) {
            c.shipper.core.handle_timeout(now);
        }
        let legacy_or_damaged = c.legacy || c.damaged;
        alive &= shipper_events(
            &mut c.shipper,
            &mut daemon,
            &mut stats,
            &source,
            legacy_or_damaged,
            seed,
        );
        // What an ended session still had to say (its Error) goes out.
        while let Some(f) = c.shipper.core.poll_transmit() {
            c.to_receiver.push_back(f);
        }
        if c.receiver.is_none() && c.to_shipper.is_empty() {
            alive = false;
        }

        // Stale frames of dropped connections reach their fenced sessions.
        let reconnected = matches!(c.receiver, Some(ReceiverSide::Receiving(_)));
        if reconnected && !stale.is_empty() && rng.chance(100) {
            let i = rng.below(stale.len() as u64) as usize;
            let st = &mut stale[i];
            match st.frames.pop_front() {
                None => {
                    stale.swap_remove(i);
                }
                Some(f) => {
                    st.decoder.feed(&f);
                    if let Ok(Some(msg)) = st.decoder.next_message() {
                        let e = st.session.handle_message(msg, &mut replica).unwrap_err();
                        assert_eq!(e.code(), ErrorCode::Busy);
                        stats.stale_refused += 1;
                        stale.swap_remove(i);
                    }
                }
            }
        }

        if rng.chance(4) {
            replica.crash();
            stats.crashes += 1;
            stale.clear();
            alive = false;
        } else if rng.chance(3) {
            alive = false;
        }
        if !alive {
            let c = conn.take().unwrap();
            let st = c.shipper.core.status(now);
            stats.resync_compared += st.resync_blocks_compared;
            stats.resync_sent += st.resync_blocks_sent;
            if let Some(ReceiverSide::Receiving(session)) = c.receiver {
                if !c.to_receiver.is_empty() && stale.len() < 3 {
                    stale.push(Stale {
                        session,
                        decoder: MessageDecoder::new(),
                        frames: c.to_receiver,
                    });
                }
            }
        }
        let d = replica.committed.1.durable_seq;
        assert!(d >= max_durable, "seed {seed}: durable seq went back");
        max_durable = d;
    }
    assert!(
        replica.committed.0 == *source.image_at(source.last().seq),
        "seed {seed}: the replica differs from the source"
    );
    // Sent again by every session, the same spec is one version.
    assert!(
        replica.vm_specs.len() <= 1 && replica.vm_specs.iter().all(|(_, t)| t == SIM_SPEC),
        "seed {seed}: {:?}",
        replica.vm_specs
    );
    stats
}

#[test]
fn replicas_converge_through_a_hostile_network() {
    let mut total = Stats::default();
    for seed in 1..=1000 {
        let s = run(seed);
        total.connections += s.connections;
        total.crashes += s.crashes;
        total.corrupted += s.corrupted;
        total.duplicated += s.duplicated;
        total.stale_refused += s.stale_refused;
        total.transient_errors += s.transient_errors;
        total.steps += s.steps;
        total.offered_older += s.offered_older;
        total.timeouts += s.timeouts;
        total.stalls += s.stalls;
        total.resync_compared += s.resync_compared;
        total.resync_sent += s.resync_sent;
        total.vm_specs_kept += s.vm_specs_kept;
        total.vm_specs_not_carried += s.vm_specs_not_carried;
        for (t, n) in total.sessions.iter_mut().zip(s.sessions) {
            *t += n;
        }
    }
    eprintln!("{total:?}");
    // The faults really happened.
    assert!(total.connections > 2000, "{total:?}");
    assert!(total.crashes > 200, "{total:?}");
    assert!(total.corrupted > 200, "{total:?}");
    assert!(total.duplicated > 150, "{total:?}");
    assert!(total.stale_refused > 50, "{total:?}");
    // Sessions of either version, and hellos refused by version-1
    // receivers, each many times over.
    assert!(total.sessions[1] > 300, "{total:?}");
    assert!(total.sessions[PROTOCOL_VERSION as usize] > 300, "{total:?}");
    assert!(total.offered_older > 100, "{total:?}");
    // The core's own timeouts ended stalled sessions, and its resync
    // compared coarse blocks and sent fine ones.
    assert!(total.timeouts > 100, "{total:?}");
    assert!(total.resync_compared > 100, "{total:?}");
    assert!(total.resync_sent > 100, "{total:?}");
    // The VM spec reached the replica through the faults, and sessions
    // of version 1 never carried it.
    assert!(total.vm_specs_kept > 300, "{total:?}");
    assert!(total.vm_specs_not_carried > 100, "{total:?}");
}

fn record(seq: u64, generation: u32) -> Vec<u8> {
    Entry::write(0, 0, &[1; 16], 0).encode(seq, generation)
}

/// `msg` in a frame of this code's newest version.
fn v(msg: Message) -> Received {
    Received::new(PROTOCOL_VERSION, msg)
}

fn hello_from(host: &str, min_version: u16) -> Message {
    Message::Hello {
        host: Name::new(host).unwrap(),
        group: Name::from_static("g"),
        generation: 2,
        disks: hello().disks,
        min_version,
        software: "0.0.0-test".into(),
    }
}

fn session(replica: &mut MemReplica<'_>) -> Receiving {
    ExpectHello::new(ReceiverConfig::new(&Name::from_static(HOST)))
        .handle_message(v(hello_from(HOST, 1)), replica)
        .unwrap()
        .0
}

fn tiny_source() -> Source {
    let mut src = Source {
        records: Vec::new(),
        ids: Vec::new(),
        images: vec![SIZES.iter().map(|&s| vec![0; s as usize]).collect()],
    };
    let mut disks = src.images[0].clone();
    for seq in [1, 2, 3, 5] {
        src.push(Entry::write(0, 0, &[1; 16], 0), seq, 1, &mut disks);
    }
    src
}

#[test]
fn a_true_gap_is_a_permanent_sequence_gap() {
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    let mut s = session(&mut replica);
    let batch =
        RecordBatch::from_records([&record(1, 1)[..], &record(2, 1)[..], &record(3, 1)[..]])
            .unwrap();
    s.handle_message(v(Message::Records(batch.clone())), &mut replica)
        .unwrap();
    // Committed (and acknowledged) once the input runs dry.
    let acks = s.handle_idle(&mut replica).unwrap();
    assert_eq!(acks.len(), 1);
    assert_eq!(replica.committed.1.durable_seq, Seq(3));
    // A resent batch is a duplicate, not an error, and applies nothing.
    let applies = replica.record_applies;
    s.handle_message(v(Message::Records(batch)), &mut replica)
        .unwrap();
    assert_eq!(replica.record_applies, applies);
    let gap = RecordBatch::from_records([&record(5, 1)[..]]).unwrap();
    let e = s
        .handle_message(v(Message::Records(gap)), &mut replica)
        .unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, ErrorCode::SequenceGap)
    );
    assert_eq!(replica.committed.1.durable_seq, Seq(3));
    assert!(matches!(e.to_message(), Some(Message::Error { .. })));
}

/// A newer generation that reuses sequence numbers the replica applied is
/// refused, permanently: skipping its records as duplicates would keep the
/// old generation's bytes on the replica without a word. One above every
/// number applied continues the stream, version-1 records and version-2
/// ones alike.
#[test]
fn a_generation_that_reuses_applied_sequence_numbers_is_refused() {
    // Record 3 as the version-1 code wrote it.
    let mut v1 = record(3, 1);
    v1[4] = 1;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&v1[..52]), &v1[56..]);
    v1[52..56].copy_from_slice(&crc.to_le_bytes());
    let mut source = Source {
        records: Vec::new(),
        ids: Vec::new(),
        images: vec![SIZES.iter().map(|&s| vec![0; s as usize]).collect()],
    };
    let mut disks = source.images[0].clone();
    for (seq, generation) in [(1, 1), (2, 1), (3, 1), (10, 2)] {
        source.push(Entry::write(0, 0, &[1; 16], 0), seq, generation, &mut disks);
    }
    source.records[2] = v1.clone();
    let mut replica = MemReplica::new(&source);
    let mut s = session(&mut replica);
    let batch = RecordBatch::from_records([&record(1, 1)[..], &record(2, 1)[..], &v1[..]]).unwrap();
    s.handle_message(v(Message::Records(batch)), &mut replica)
        .unwrap();
    s.handle_idle(&mut replica).unwrap();
    assert_eq!(replica.committed.1.durable_seq, Seq(3));
    for reused in [2, 3] {
        let batch = RecordBatch::from_records([&record(reused, 2)[..]]).unwrap();
        let e = s
            .handle_message(v(Message::Records(batch)), &mut replica)
            .unwrap_err();
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, ErrorCode::SequenceGap),
            "seq {reused} of generation 2"
        );
        assert_eq!(replica.committed.1.durable_seq, Seq(3));
        s = session(&mut replica);
    }
    let batch = RecordBatch::from_records([&record(10, 2)[..]]).unwrap();
    s.handle_message(v(Message::Records(batch)), &mut replica)
        .unwrap();
    s.handle_idle(&mut replica).unwrap();
    assert_eq!(
        (
            replica.committed.1.durable_seq,
            replica.committed.1.generation
        ),
        (Seq(10), 2)
    );
}

#[test]
fn a_wrong_host_is_permanently_unauthorized() {
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    let e = ExpectHello::new(ReceiverConfig::new(&Name::from_static(HOST)))
        .handle_message(v(hello_from("intruder", 1)), &mut replica)
        .unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, ErrorCode::Unauthorized)
    );
    assert!(
        replica.sizes.is_empty(),
        "nothing was created for the intruder"
    );
}

/// A Hello body of protocol `version` as any peer could write it: the
/// codec's own encoder cannot make one with a name that breaks the rule.
fn hello_body(version: u16, host: &str, group: &str, disk: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for name in [host, group] {
        b.push(name.len() as u8);
        b.extend_from_slice(name.as_bytes());
    }
    b.extend_from_slice(&2u32.to_le_bytes()); // generation
    b.extend_from_slice(&1u32.to_le_bytes()); // one disk
    b.extend_from_slice(&0u32.to_le_bytes()); // its id
    b.push(disk.len() as u8);
    b.extend_from_slice(disk.as_bytes());
    b.extend_from_slice(&SIZES[0].to_le_bytes());
    if version >= 2 {
        b.extend_from_slice(&1u16.to_le_bytes()); // min-version
        let software = b"0.0.0-test";
        b.push(software.len() as u8);
        b.extend_from_slice(software);
    }
    b
}

/// A host whose certificate is valid sends names that would make paths
/// outside its replica (or break the rule otherwise): the Hello does not
/// decode, the refusal is permanent and names the name, and no replica
/// sees it. The same Hello with sound names is welcome.
#[test]
fn a_hello_with_a_hostile_name_is_refused_for_good_before_any_replica_sees_it() {
    for (version, case) in [
        (HOST, "g", "../../escaped", "disk name", "\"../../escaped\""),
        (HOST, "g", "/srv/escaped", "disk name", "\"/srv/escaped\""),
        (HOST, "../../escaped", "disk0", "group", "\"../../escaped\""),
        (HOST, "/srv", "disk0", "group", "\"/srv\""),
        (HOST, "..", "disk0", "group", "\"..\""),
        ("../db1", "g", "disk0", "host", "\"../db1\""),
        (HOST, "g", "Disk0", "disk name", "\"Disk0\""),
        (HOST, "g", "", "disk name", "\"\""),
    ]
    .into_iter()
    .flat_map(|case| [(1, case), (PROTOCOL_VERSION, case)])
    {
        let (host, group, disk, field, named) = case;
        let frame = encode_frame(
            version,
            MessageType::Hello,
            &hello_body(version, host, group, disk),
            Compression::None,
        )
        .unwrap();
        let mut decoder = MessageDecoder::new();
        decoder.feed(&frame);
        let err = decoder.next_message().unwrap_err();
        assert!(
            matches!(&err, DecodeError::InvalidName { field: f, .. } if *f == field),
            "v{version} {host}/{group}/{disk}: {err:?}"
        );
        let refused = ReceiverError::from_decode(&err, version);
        assert_eq!(
            (refused.class(), refused.code()),
            (ErrorClass::Permanent, ErrorCode::Protocol),
            "{refused}"
        );
        match refused.to_message() {
            Some(Message::Error {
                class: ErrorClass::Permanent,
                message,
                ..
            }) => assert!(
                message.contains(named) && message.contains("not a valid name"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
    }
    let frame = encode_frame(
        PROTOCOL_VERSION,
        MessageType::Hello,
        &hello_body(PROTOCOL_VERSION, HOST, "g", "disk0"),
        Compression::None,
    )
    .unwrap();
    let mut decoder = MessageDecoder::new();
    decoder.feed(&frame);
    let hello = decoder.next_message().unwrap().unwrap();
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    ExpectHello::new(ReceiverConfig::new(&Name::from_static(HOST)))
        .handle_message(hello, &mut replica)
        .unwrap();
    assert_eq!(replica.sizes.len(), 1);
}

#[test]
fn a_chunk_at_the_wrong_position_is_refused() {
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    let mut s = session(&mut replica);
    let chunk = |after_seq, offset| Message::Chunk {
        disk: DiskId(0),
        offset,
        after_seq,
        purpose: ChunkPurpose::InitialSync,
        data: ChunkData::Zero(4096),
    };
    assert!(s.handle_message(v(chunk(Seq(0), 0)), &mut replica).is_ok());
    // Not after the last applied record.
    assert_eq!(
        s.handle_message(v(chunk(Seq(7), 4096)), &mut replica)
            .unwrap_err()
            .code(),
        ErrorCode::Protocol
    );
    let mut s = session(&mut replica);
    // A hole in the initial sync.
    assert_eq!(
        s.handle_message(v(chunk(Seq(0), 12288)), &mut replica)
            .unwrap_err()
            .code(),
        ErrorCode::Protocol
    );
    // Unknown disk.
    let m = Message::Chunk {
        disk: DiskId(9),
        offset: 0,
        after_seq: Seq(0),
        purpose: ChunkPurpose::Resync,
        data: ChunkData::Zero(1),
    };
    let mut s = session(&mut replica);
    assert_eq!(
        s.handle_message(v(m), &mut replica).unwrap_err().code(),
        ErrorCode::UnknownDisk
    );
}

/// A grow record makes the disk larger for the records after it, in the
/// same batch too, in a session of version 6; a session of version 5
/// carries no record of version 3 and refuses it.
#[test]
fn a_grow_record_widens_the_disk_for_what_follows_it_from_version_6_on() {
    let mut source = Source {
        records: Vec::new(),
        ids: Vec::new(),
        images: vec![SIZES.iter().map(|&s| vec![0; s as usize]).collect()],
    };
    let mut disks = source.images[0].clone();
    let old = SIZES[0];
    source.push(Entry::write(0, 0, &[1; 16], 0), 1, 1, &mut disks);
    source.push(Entry::grow(0, old, old + 8192, 0), 2, 1, &mut disks);
    source.push(Entry::write(0, old, &[2; 4096], 0), 3, 1, &mut disks);
    let batch = RecordBatch::from_records(source.records.iter().map(|r| &r[..])).unwrap();
    let mut replica = MemReplica::new(&source);
    let mut s = session(&mut replica);
    s.handle_message(v(Message::Records(batch.clone())), &mut replica)
        .unwrap();
    s.handle_idle(&mut replica).unwrap();
    assert_eq!(replica.committed.1.durable_seq, Seq(3));
    let grown = &replica.committed.0[0];
    assert_eq!(grown.len() as u64, old + 8192);
    assert!(grown[old as usize..][..4096] == [2; 4096]);
    // Without the grow record the write beyond the old end is refused.
    let mut replica = MemReplica::new(&source);
    let mut s = session(&mut replica);
    let beyond = RecordBatch::from_records([&source.records[0][..]]).unwrap();
    s.handle_message(v(Message::Records(beyond)), &mut replica)
        .unwrap();
    let e = s
        .handle_message(
            v(Message::Records(
                RecordBatch::from_records([&Entry::write(0, old, &[2; 4096], 0).encode(2, 1)[..]])
                    .unwrap(),
            )),
            &mut replica,
        )
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Protocol);
    // Version 5.
    let mut replica = MemReplica::new(&source);
    let (mut s, _) = ExpectHello::new(ReceiverConfig::new(&Name::from_static(HOST)))
        .handle_message(Received::new(5, hello_from(HOST, 1)), &mut replica)
        .unwrap();
    let e = s
        .handle_message(Received::new(5, Message::Records(batch)), &mut replica)
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Protocol);
    assert!(e.to_string().contains("version 3"), "{e}");
}

/// The durable record an Ack frame names.
fn acked_seq(frame: &[u8]) -> Seq {
    match decode_one(frame).message {
        Message::Ack { durable_seq, .. } => durable_seq,
        other => panic!("expected an ack, got {other:?}"),
    }
}

#[test]
fn record_batches_arriving_together_cost_one_commit() {
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    let mut s = session(&mut replica);
    let commits = replica.commits;
    for seq in 1..=3 {
        let batch = RecordBatch::from_records([&record(seq, 1)[..]]).unwrap();
        let out = s
            .handle_message(v(Message::Records(batch)), &mut replica)
            .unwrap();
        assert!(out.is_empty(), "no Ack before a commit: {out:?}");
    }
    assert_eq!(replica.commits, commits, "applied, not committed yet");
    // The input ran dry: one commit for the three batches, one Ack naming
    // the last of them.
    let acks = s.handle_idle(&mut replica).unwrap();
    assert_eq!(replica.commits, commits + 1);
    assert_eq!(acks.len(), 1);
    assert_eq!(acked_seq(&acks[0]), Seq(3));
    // Nothing new: no commit, no Ack.
    assert!(s.handle_idle(&mut replica).unwrap().is_empty());
    assert_eq!(replica.commits, commits + 1);
}

#[test]
fn a_steady_stream_of_records_is_committed_every_commit_record_bytes() {
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    let one = RecordBatch::from_records([&record(1, 1)[..]]).unwrap();
    let mut config = ReceiverConfig::new(&Name::from_static(HOST));
    // Two batches' worth: every second batch commits, without waiting for
    // the input to run dry.
    config.commit_record_bytes = 2 * one.byte_len() as u64;
    let mut s = ExpectHello::new(config)
        .handle_message(v(hello_from(HOST, 1)), &mut replica)
        .unwrap()
        .0;
    let commits = replica.commits;
    let mut acked = Vec::new();
    for seq in 1..=3 {
        let batch = RecordBatch::from_records([&record(seq, 1)[..]]).unwrap();
        for ack in s
            .handle_message(v(Message::Records(batch)), &mut replica)
            .unwrap()
        {
            acked.push(acked_seq(&ack));
        }
    }
    assert_eq!(acked, [Seq(2)]);
    assert_eq!(replica.commits, commits + 1);
    // The rest when the input runs dry.
    let last = s.handle_idle(&mut replica).unwrap();
    assert_eq!(acked_seq(&last[0]), Seq(3));
    assert_eq!(replica.commits, commits + 2);
}

#[test]
fn a_drain_is_reported_only_when_every_record_before_it_is_applied() {
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    let mut s = session(&mut replica);
    let req = s.request_drain(42).unwrap();
    assert!(!req.is_empty());
    let batch = RecordBatch::from_records([&record(1, 1)[..], &record(2, 1)[..]]).unwrap();
    s.handle_message(v(Message::Records(batch)), &mut replica)
        .unwrap();
    assert_eq!(s.take_drained(), None);
    // A drain claimed past what was applied is a protocol error.
    let early = Message::Drained {
        id: 42,
        last_seq: Seq(3),
        error: String::new(),
    };
    assert_eq!(
        s.handle_message(v(early), &mut replica).unwrap_err().code(),
        ErrorCode::Protocol
    );
    let mut s = session(&mut replica);
    let commits = replica.commits;
    let drained = Message::Drained {
        id: 42,
        last_seq: Seq(2),
        error: String::new(),
    };
    let acks = s.handle_message(v(drained), &mut replica).unwrap();
    assert_eq!(acks.len(), 1, "acknowledged");
    assert!(replica.commits > commits, "durable before it is reported");
    let outcome = s.take_drained().unwrap();
    assert_eq!((outcome.id, outcome.result), (42, Ok(Seq(2))));
    assert_eq!(s.take_drained(), None);
    // A failed drain is reported with its reason, and the session goes on.
    let failed = Message::Drained {
        id: 43,
        last_seq: Seq(0),
        error: "the tracker refused to stop".into(),
    };
    s.handle_message(v(failed), &mut replica).unwrap();
    assert_eq!(
        s.take_drained().unwrap().result,
        Err(DrainRefused {
            reason: "the tracker refused to stop".to_string()
        })
    );
}

/// A VM spec applies from the record after the last one applied when it
/// arrived; it is answered at once, kept or refused, and a refusal ends
/// nothing. A session of version 2 cannot carry one.
#[test]
fn a_vm_spec_is_kept_from_the_next_record_and_a_bad_one_refused_without_ending_the_session() {
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    let mut s = session(&mut replica);
    let batch = RecordBatch::from_records([&record(1, 1)[..], &record(2, 1)[..]]).unwrap();
    s.handle_message(v(Message::Records(batch)), &mut replica)
        .unwrap();
    let answer = |frames: Vec<Vec<u8>>| {
        let [frame] = &frames[..] else {
            panic!("one answer: {frames:?}")
        };
        decode_one(frame).message
    };
    let spec = |text: &str| {
        v(Message::VmSpec {
            text: text.to_string(),
        })
    };
    let out = s.handle_message(spec("[vm]\nname = \"g\""), &mut replica);
    assert_eq!(
        answer(out.unwrap()),
        Message::VmSpecReply(VmSpecReply::Kept { from_seq: Seq(3) })
    );
    assert_eq!(s.take_vm_spec(), Some(Ok(Seq(3))));
    assert_eq!(s.take_vm_spec(), None);
    let out = s.handle_message(spec("cpus = 0"), &mut replica).unwrap();
    assert!(matches!(
        answer(out),
        Message::VmSpecReply(VmSpecReply::Refused { reason }) if reason.contains("no [vm] table")
    ));
    assert!(matches!(
        s.take_vm_spec(),
        Some(Err(VmSpecRefused::Invalid { .. }))
    ));
    // The session goes on: the next records apply, and the same spec
    // again keeps its version.
    let batch = RecordBatch::from_records([&record(3, 1)[..]]).unwrap();
    s.handle_message(v(Message::Records(batch)), &mut replica)
        .unwrap();
    let out = s.handle_message(spec("[vm]\nname = \"g\""), &mut replica);
    assert_eq!(
        answer(out.unwrap()),
        Message::VmSpecReply(VmSpecReply::Kept { from_seq: Seq(3) })
    );
    assert_eq!(replica.vm_specs.len(), 1);

    // Version 2 has no VM spec: refused by the encoder, and a frame of
    // version 2 that carries one by the decoder.
    let msg = Message::VmSpec {
        text: "[vm]".into(),
    };
    assert!(msg.encode(2, Compression::None).is_err());
    let frame = encode_frame(2, MessageType::VmSpec, b"[vm]", Compression::None).unwrap();
    let mut d = MessageDecoder::new();
    d.feed(&frame);
    assert!(matches!(
        d.next_message(),
        Err(DecodeError::NotInVersion { .. })
    ));
}

/// The hello the previous release (protocol version 1, before
/// negotiation) sent, from the fixture of its frames.
fn v1_fixture(name: &str) -> Vec<u8> {
    let line = include_str!("fixtures/v1-frames.txt")
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap();
    let hex = &line[name.len() + 1..];
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

fn decode_one(frame: &[u8]) -> Received {
    let mut d = MessageDecoder::new();
    d.feed(frame);
    d.next_message().unwrap().unwrap()
}

/// A shipper of the previous release: its hello (version 1) is served in
/// version 1, and everything the receiver sends it is a version-1 frame
/// that release reads.
#[test]
fn an_older_shipper_is_served_in_its_version() {
    let source = tiny_source();
    let mut replica = MemReplica::new(&source);
    // Byte for byte what that release sends (see the next test).
    let config = ShipperConfig {
        versions: Versions::only(1),
        ..ShipperConfig::default()
    };
    let old_hello = decode_one(&AwaitingWelcome::start(hello(), config).unwrap().1);
    assert_eq!(old_hello.version, 1);
    let mut config = ReceiverConfig::new(&Name::from_static(HOST));
    config.commit_bytes = 1;
    let (mut s, welcome) = ExpectHello::new(config)
        .handle_message(old_hello, &mut replica)
        .unwrap();
    assert_eq!(s.version(), 1);
    assert_eq!(s.shipper_software(), "");
    let welcome = decode_one(&welcome);
    assert_eq!(welcome.version, 1);
    let Message::Welcome { software, .. } = &welcome.message else {
        panic!("{welcome:?}")
    };
    assert_eq!(software, "", "no field of version 2 reaches it");
    for frame in [
        s.request_drain(5).unwrap(),
        s.handle_message(
            Received::new(
                1,
                Message::Chunk {
                    disk: DiskId(0),
                    offset: 0,
                    after_seq: Seq(0),
                    purpose: ChunkPurpose::InitialSync,
                    data: ChunkData::Zero(4096),
                },
            ),
            &mut replica,
        )
        .unwrap()
        .remove(0),
    ] {
        assert_eq!(frame_version(&frame), 1);
    }
    // A frame of another version in the session is a protocol error, said
    // in the session's version.
    let e = s
        .handle_message(v(Message::DrainRequest { id: 1 }), &mut replica)
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::Protocol);
    assert_eq!(frame_version(&e.to_frame().unwrap()), 1);
}

/// A receiver of the previous release cannot read a newer hello and says
/// so in a version-1 frame (transient protocol error): the shipper then
/// offers version 1 alone, and its hello is then byte for byte the one
/// that release sent.
#[test]
fn a_newer_shipper_goes_on_in_version_1_with_a_receiver_of_the_previous_release() {
    let Message::Hello {
        host,
        group,
        generation,
        disks,
        ..
    } = decode_one(&v1_fixture("hello")).message
    else {
        unreachable!()
    };
    let info = HelloInfo {
        host,
        group,
        generation,
        disks,
    };
    let config = ShipperConfig {
        compression: Compression::None,
        ..ShipperConfig::default()
    };
    let (s, hello_v2) = AwaitingWelcome::start(info.clone(), config).unwrap();
    assert_eq!(frame_version(&hello_v2), PROTOCOL_VERSION);
    // What that release answered (see its frame decoder).
    let refusal = decode_one(&v1_fixture("error"));
    let e = s.handle_message(refusal.clone(), |_| None).unwrap_err();
    assert!(matches!(e, ShipperError::OfferOlder { version: 1 }), "{e}");
    assert_eq!(e.class(), ErrorClass::Transient);
    assert!(e.to_message().is_none(), "the receiver has closed already");

    let older = ShipperConfig {
        versions: Versions::only(1),
        ..config
    };
    let (s, hello_v1) = AwaitingWelcome::start(info, older).unwrap();
    assert_eq!(hello_v1, v1_fixture("hello"));
    // Its welcome, as that release encoded it, but for both disks.
    let Message::Welcome {
        durable_seq,
        generation,
        mut disks,
        resyncing,
        ..
    } = decode_one(&v1_fixture("welcome")).message
    else {
        unreachable!()
    };
    disks.push(DiskSync {
        id: DiskId(5),
        synced: 0,
    });
    let welcome = Message::Welcome {
        durable_seq,
        generation,
        disks,
        resyncing,
        software: String::new(),
    };
    let (shipping, resume) = s
        .handle_message(
            decode_one(&welcome.encode(1, Compression::None).unwrap()),
            |_| None,
        )
        .unwrap();
    assert_eq!((shipping.version(), resume.version), (1, 1));
    assert_eq!(resume.receiver_software, "");

    // A shipper that no longer speaks version 1 stops, naming both.
    let newer_only = ShipperConfig {
        versions: Versions::only(PROTOCOL_VERSION),
        ..config
    };
    let (s, _) = AwaitingWelcome::start(hello(), newer_only).unwrap();
    let e = s.handle_message(refusal, |_| None).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Permanent);
    let text = e.to_string();
    assert!(
        text.contains("receiver speaks version 1")
            && text.contains(&format!("version {PROTOCOL_VERSION}"))
            && text.contains("upgrade the receiver"),
        "{text}"
    );
    // Told to the receiver in a frame it reads.
    let told = decode_one(&e.to_frame(1).unwrap());
    assert_eq!(told.version, 1);
    assert!(matches!(told.message, Message::Error { .. }));
}

/// Ends of releases with no protocol version in common both refuse,
/// permanently, and the words name both ends' versions and the end to
/// upgrade; the refusal is a frame the shipper reads.
#[test]
fn ends_without_a_common_version_both_refuse_naming_both() {
    let source = tiny_source();
    // (shipper offers, receiver speaks, the end to upgrade)
    let newer = Versions::only(PROTOCOL_VERSION);
    for (offered, served, older) in [
        (Versions::only(1), newer, "shipper"),
        (newer, Versions::only(1), "receiver"),
    ] {
        let mut replica = MemReplica::new(&source);
        let config = ShipperConfig {
            versions: offered,
            ..ShipperConfig::default()
        };
        let (shipper, hello) = AwaitingWelcome::start(hello(), config).unwrap();
        let mut rc = ReceiverConfig::new(&Name::from_static(HOST));
        rc.versions = served;
        let e = ExpectHello::new(rc)
            .handle_message(decode_one(&hello), &mut replica)
            .unwrap_err();
        assert_eq!(
            (e.class(), e.code()),
            (ErrorClass::Permanent, ErrorCode::Protocol)
        );
        assert!(replica.sizes.is_empty(), "nothing was created");
        let frame = e.to_frame().unwrap();
        assert!(
            frame_version(&frame) <= offered.max,
            "a version the shipper reads"
        );
        let e = shipper
            .handle_message(decode_one(&frame), |_| None)
            .unwrap_err();
        assert_eq!(e.class(), ErrorClass::Permanent);
        let text = e.to_string();
        // A shipper names its release from version 2 on.
        let shipper = if offered.max >= 2 {
            format!("shipper (tidemark {}) speaks", tidemark_wire::SOFTWARE)
        } else {
            "shipper speaks".to_string()
        };
        for want in [
            shipper,
            format!("speaks {offered}"),
            format!("receiver (tidemark {}) {served}", tidemark_wire::SOFTWARE),
            format!("upgrade the {older}"),
        ] {
            assert!(text.contains(&want), "{want:?} not in {text:?}");
        }
    }
}

/// A welcome outside what the hello offered is refused.
#[test]
fn a_welcome_outside_the_offer_is_refused() {
    let welcome = |version| {
        Received::new(
            version,
            Message::Welcome {
                durable_seq: Seq(0),
                generation: 0,
                disks: vec![
                    DiskSync {
                        id: DiskId(0),
                        synced: 0,
                    },
                    DiskSync {
                        id: DiskId(1),
                        synced: 0,
                    },
                ],
                resyncing: Vec::new(),
                software: String::new(),
            },
        )
    };
    let start = |versions| {
        let config = ShipperConfig {
            versions,
            ..ShipperConfig::default()
        };
        AwaitingWelcome::start(hello(), config).unwrap().0
    };
    let e = start(Versions::only(1))
        .handle_message(welcome(2), |_| None)
        .unwrap_err();
    assert!(matches!(e, ShipperError::Protocol(_)), "{e}");
    let e = start(Versions::only(2))
        .handle_message(welcome(1), |_| None)
        .unwrap_err();
    assert!(matches!(e, ShipperError::NoCommonVersion { .. }), "{e}");
    assert!(start(Versions::SUPPORTED)
        .handle_message(welcome(1), |_| None)
        .is_ok());
}

/// A receiver that does not own the group answers the hello with a
/// redirect to the owner (version 5 on), which the shipper's session reads
/// as `Redirected` (transient: it connects there); a shipper that speaks
/// only version 4 gets a transient `busy` error naming the owner instead;
/// a hello from another host than the certificate's is refused as ever.
#[test]
fn a_receiver_that_does_not_own_the_group_redirects_the_shipper() {
    let receiver = || ExpectHello::new(ReceiverConfig::new(&Name::from_static(HOST)));
    let (s, hello_frame) = AwaitingWelcome::start(hello(), ShipperConfig::default()).unwrap();
    let answer = receiver()
        .redirect(decode_one(&hello_frame), "r2.example:7443")
        .unwrap();
    let answer = decode_one(&answer);
    assert_eq!(answer.version, PROTOCOL_VERSION);
    assert_eq!(
        answer.message,
        Message::Redirect {
            to: "r2.example:7443".into()
        }
    );
    match s.handle_message(answer, |_| None) {
        Err(e @ ShipperError::Redirected { .. }) => {
            assert_eq!(e.class(), ErrorClass::Transient);
            assert!(matches!(e, ShipperError::Redirected { ref to } if to == "r2.example:7443"));
            assert!(e.to_message().is_none(), "nothing is sent back");
        }
        other => panic!("{other:?}"),
    }

    let older = ShipperConfig {
        versions: Versions { min: 1, max: 4 },
        ..ShipperConfig::default()
    };
    let (s, hello_v4) = AwaitingWelcome::start(hello(), older).unwrap();
    let e = receiver()
        .redirect(decode_one(&hello_v4), "r2.example:7443")
        .unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Transient, ErrorCode::Busy)
    );
    let refusal = decode_one(&e.to_frame().unwrap());
    assert_eq!(refusal.version, 4);
    assert!(
        matches!(&refusal.message, Message::Error { message, .. } if message.contains("r2.example:7443"))
    );
    let e = s.handle_message(refusal, |_| None).unwrap_err();
    assert_eq!(e.class(), ErrorClass::Transient);

    let e = receiver()
        .redirect(v(hello_from("intruder", 1)), "r2.example:7443")
        .unwrap_err();
    assert_eq!(
        (e.class(), e.code()),
        (ErrorClass::Permanent, ErrorCode::Unauthorized)
    );
}
