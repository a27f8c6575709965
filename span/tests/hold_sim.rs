//! Simulation of the hold protocol (`tidemark_span`): the real
//! coordinator and three real participants, each participant in front of a
//! model tracker (a log numbering records, writes acknowledged through the
//! gate), joined by links with random delay that reset now and then; the
//! trackers and the coordinator restart at random. A virtual clock drives
//! everything.
//!
//! The workload is causal: each member's client writes numbered values,
//! and every write carries the newest value each other member had
//! acknowledged when it was issued (what the application may depend on).
//! Checked:
//! 1. at every committed point, no member's prefix (up to its marker)
//!    holds a write that saw a value of another member that is not in that
//!    member's prefix;
//! 2. no gate stays closed longer than the tracker's `hold_max`;
//! 3. every round ends within its bound;
//! 4. a point id is never sent by two coordinators (epochs);
//! 5. a point is committed only if every member answered `in-time`;
//! 6. no member writes two markers for one point;
//! 7. an application-consistent point (a third of the rounds; each
//!    member's quiesce fails now and then, and ends by itself at the
//!    tracker's own bound) is committed as such only if every member's
//!    marker was written while that member was quiesced for it, and every
//!    member was still quiesced when its thaw arrived;
//!
//! and the run commits points most of the time (the protocol is live).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};
use tidemark_changelog::Seq;
use tidemark_names::Label;
use tidemark_span::{
    Coordinator, CoordinatorConfig, Epoch, HeldOutcome, HoldMessage, Link, Participant,
    ParticipantConfig, PointId, QuiescedOutcome, QuiescedReply, Refusal, RefuseCode, ReleasedHow,
    Saved, SpanEvent, ThawedHow, ThawedReply,
};

const MEMBERS: usize = 3;
const STEP: Duration = Duration::from_micros(200);
/// The model trackers' own bound on a quiesce (their watchdog thaws then).
const QUIESCE_MAX: Duration = Duration::from_millis(150);

/// One record of a model log.
#[derive(Debug, Clone)]
enum Entry {
    Write {
        seq: u64,
        value: u64,
        saw: [u64; MEMBERS],
    },
    Marker {
        seq: u64,
        point: PointId,
        epoch: Epoch,
        /// Written while the member was quiesced for this point.
        app: bool,
    },
}

#[derive(Debug, Clone)]
struct Pending {
    seq: u64,
    value: u64,
    complete_at: Instant,
}

/// A member's tracker and its client.
struct Member {
    participant: Participant,
    log: Vec<Entry>,
    next_seq: u64,
    generation: u32,
    next_value: u64,
    acked: u64,
    in_flight: Vec<Pending>,
    /// Completed, waiting for the gate.
    gated: Vec<Pending>,
    gate_since: Option<Instant>,
    /// Down until then (the tracker restarting).
    down_until: Option<Instant>,
    /// The quiesce in force (or ended by its own bound, not yet told):
    /// its point, epoch, and until when it holds.
    quiesce: Option<(PointId, Epoch, Instant)>,
}

impl Member {
    fn new(config: ParticipantConfig) -> Member {
        Member {
            participant: Participant::new(config),
            log: Vec::new(),
            next_seq: 1,
            generation: 1,
            next_value: 1,
            acked: 0,
            in_flight: Vec::new(),
            gated: Vec::new(),
            gate_since: None,
            down_until: None,
            quiesce: None,
        }
    }

    fn value_at(&self, marker: u64) -> u64 {
        self.log
            .iter()
            .filter_map(|e| match e {
                Entry::Write { seq, value, .. } if *seq <= marker => Some(*value),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    fn saw_at(&self, marker: u64, other: usize) -> u64 {
        self.log
            .iter()
            .filter_map(|e| match e {
                Entry::Write { seq, saw, .. } if *seq <= marker => Some(saw[other]),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }
}

/// A message on its way, FIFO per direction (a QUIC stream is ordered).
struct Wire {
    queue: VecDeque<(Instant, HoldMessage)>,
}

impl Wire {
    fn new() -> Wire {
        Wire {
            queue: VecDeque::new(),
        }
    }

    fn send(&mut self, now: Instant, delay: Duration, message: HoldMessage) {
        let at = self
            .queue
            .back()
            .map(|(t, _)| *t)
            .unwrap_or(now)
            .max(now + delay);
        self.queue.push_back((at, message));
    }

    fn due(&mut self, now: Instant) -> Option<HoldMessage> {
        if self.queue.front().is_some_and(|(t, _)| *t <= now) {
            self.queue.pop_front().map(|(_, m)| m)
        } else {
            None
        }
    }
}

struct Sim {
    rng: StdRng,
    now: Instant,
    start: Instant,
    pcfg: ParticipantConfig,
    ccfg: CoordinatorConfig,
    members: Vec<Member>,
    coordinator: Coordinator,
    saved: Saved,
    /// Member links: up, and when a reset link comes back.
    up: Vec<bool>,
    back_at: Vec<Option<Instant>>,
    to_member: Vec<Wire>,
    to_coordinator: Vec<Wire>,
    delay: Vec<Duration>,
    /// Durability to report to the coordinator: (when, member, marker, generation).
    durable_at: Vec<(Instant, usize, Seq, u32)>,
    round_started: HashMap<PointId, Instant>,
    open_epochs: HashMap<PointId, HashSet<Epoch>>,
    released: HashMap<(PointId, Epoch), Vec<ReleasedHow>>,
    thawed: HashMap<(PointId, Epoch), Vec<(usize, ThawedHow)>>,
    /// Points whose round quiesced first.
    app_rounds: HashSet<PointId>,
    app_committed: usize,
    committed: usize,
    durable: usize,
    aborted: usize,
    faults: bool,
}

impl Sim {
    fn new(seed: u64, faults: bool) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let pcfg = ParticipantConfig::default();
        let ccfg = CoordinatorConfig {
            durable_timeout: Duration::from_secs(2),
            quiesce_timeout: Duration::from_millis(200),
            ..CoordinatorConfig::default()
        };
        let delay = (0..MEMBERS)
            .map(|_| Duration::from_micros(rng.random_range(100..20_000)))
            .collect();
        let now = Instant::now();
        let mut coordinator = Coordinator::new(ccfg, MEMBERS, Saved::default());
        let mut sim_delay: Vec<Duration> = delay;
        for (m, d) in sim_delay.iter_mut().enumerate() {
            coordinator.handle_link(
                m,
                Link::Up {
                    rtt: *d * 2,
                    holds: true,
                    quiesce: true,
                },
                now,
            );
        }
        Sim {
            rng,
            now,
            start: now,
            pcfg,
            ccfg,
            members: (0..MEMBERS).map(|_| Member::new(pcfg)).collect(),
            coordinator,
            saved: Saved::default(),
            up: vec![true; MEMBERS],
            back_at: vec![None; MEMBERS],
            to_member: (0..MEMBERS).map(|_| Wire::new()).collect(),
            to_coordinator: (0..MEMBERS).map(|_| Wire::new()).collect(),
            delay: sim_delay,
            durable_at: Vec::new(),
            round_started: HashMap::new(),
            open_epochs: HashMap::new(),
            released: HashMap::new(),
            thawed: HashMap::new(),
            app_rounds: HashSet::new(),
            app_committed: 0,
            committed: 0,
            durable: 0,
            aborted: 0,
            faults,
        }
    }

    /// A message's delay: the link's, some jitter, and under faults now
    /// and then a stall far longer than any hold (a member's holds then
    /// expire before their release arrives).
    fn jitter(&mut self, member: usize) -> Duration {
        let base = self.delay[member];
        let stall = if self.faults && self.rng.random_bool(0.002) {
            Duration::from_millis(self.rng.random_range(100..700))
        } else {
            Duration::ZERO
        };
        base + stall
            + Duration::from_micros(self.rng.random_range(0..=base.as_micros() as u64 / 2 + 1))
    }

    fn run(&mut self, virtual_time: Duration) {
        let mut next_point = self.now;
        while self.now < self.start + virtual_time {
            self.now += STEP;
            if self.faults {
                self.inject_faults();
            }
            self.restore();
            self.clients();
            self.trackers();
            self.network();
            if self.now >= next_point {
                next_point = self.now + Duration::from_millis(self.rng.random_range(5..40));
                let label = Label::new("span").unwrap();
                // A refusal (member down, round running) is normal here.
                let app = self.rng.random_bool(0.3);
                let _ = self.coordinator.start_point(app, label, self.now);
            }
            self.coordinator.handle_timeout(self.now);
            self.report_durable();
            self.coordinator_io();
            self.check_gates();
        }
    }

    fn inject_faults(&mut self) {
        let now = self.now;
        for m in 0..MEMBERS {
            if self.up[m] && self.rng.random_bool(0.0001) {
                // The connection resets: what was on its way is lost.
                self.up[m] = false;
                self.back_at[m] = Some(now + Duration::from_millis(self.rng.random_range(1..100)));
                self.to_member[m].queue.clear();
                self.to_coordinator[m].queue.clear();
                self.coordinator.handle_link(m, Link::Down, now);
                if self.rng.random_bool(0.5) {
                    // The shipper restarted too: its hold connection closed,
                    // which ends the hold and thaws.
                    self.members[m].participant.connection_lost(now);
                    self.members[m].quiesce = None;
                }
            }
            if self.members[m].down_until.is_none() && self.rng.random_bool(0.00005) {
                // The tracker restarts: its holds are gone, its clients'
                // writes in flight fail, its log stays.
                let member = &mut self.members[m];
                member.participant = Participant::new(self.pcfg);
                member.quiesce = None;
                member.in_flight.clear();
                member.gated.clear();
                member.generation += 1;
                member.down_until = Some(now + Duration::from_millis(self.rng.random_range(1..50)));
            }
        }
        if self.rng.random_bool(0.00005) {
            // The coordinator restarts from what it saved; frames of the
            // old one may still arrive at the trackers.
            self.coordinator = Coordinator::new(self.ccfg, MEMBERS, self.saved);
            self.durable_at.clear();
            for m in 0..MEMBERS {
                self.to_coordinator[m].queue.clear();
                if self.up[m] {
                    self.coordinator.handle_link(
                        m,
                        Link::Up {
                            rtt: self.delay[m] * 2,
                            holds: true,
                            quiesce: true,
                        },
                        now,
                    );
                }
            }
        }
    }

    fn restore(&mut self) {
        let now = self.now;
        for m in 0..MEMBERS {
            if self.back_at[m].is_some_and(|t| t <= now) {
                self.back_at[m] = None;
                self.up[m] = true;
                self.coordinator.handle_link(
                    m,
                    Link::Up {
                        rtt: self.delay[m] * 2,
                        holds: true,
                        quiesce: true,
                    },
                    now,
                );
            }
            let member = &mut self.members[m];
            if member.down_until.is_some_and(|t| t <= now) {
                member.down_until = None;
            }
        }
    }

    /// Each client keeps one or two writes in flight, each carrying what
    /// it saw acknowledged by the others.
    fn clients(&mut self) {
        let saw: [u64; MEMBERS] = std::array::from_fn(|m| self.members[m].acked);
        for m in 0..MEMBERS {
            let depth = self.rng.random_range(1..=2);
            let latency = Duration::from_micros(self.rng.random_range(50..2_000));
            let member = &mut self.members[m];
            if member.down_until.is_some() || member.in_flight.len() + member.gated.len() >= depth {
                continue;
            }
            let seq = member.next_seq;
            member.next_seq += 1;
            let value = member.next_value;
            member.next_value += 1;
            member.log.push(Entry::Write { seq, value, saw });
            member.in_flight.push(Pending {
                seq,
                value,
                complete_at: self.now + latency,
            });
        }
    }

    /// Device writes complete; the gate decides which are acknowledged.
    fn trackers(&mut self) {
        let now = self.now;
        for member in &mut self.members {
            member.participant.handle_timeout(now);
            if member.participant.gate().is_none() {
                member.gate_since = None;
            }
            let (done, rest): (Vec<Pending>, Vec<Pending>) = member
                .in_flight
                .drain(..)
                .partition(|p| p.complete_at <= now);
            member.in_flight = rest;
            member.gated.extend(done);
            let gate = member.participant.gate();
            let (ack, wait): (Vec<Pending>, Vec<Pending>) = member
                .gated
                .drain(..)
                .partition(|p| gate.is_none_or(|m| p.seq <= m.0));
            member.gated = wait;
            for p in ack {
                member.acked = member.acked.max(p.value);
            }
        }
    }

    fn network(&mut self) {
        let now = self.now;
        for m in 0..MEMBERS {
            while let Some(message) = self.to_member[m].due(now) {
                let reply = self.tracker_handles(m, message);
                if let Some(reply) = reply {
                    let delay = self.jitter(m);
                    self.to_coordinator[m].send(now, delay, reply);
                }
            }
            while let Some(message) = self.to_coordinator[m].due(now) {
                self.coordinator.handle_message(m, message, now);
            }
        }
    }

    fn tracker_handles(&mut self, m: usize, message: HoldMessage) -> Option<HoldMessage> {
        let now = self.now;
        let member = &mut self.members[m];
        match message {
            HoldMessage::Open(open) => {
                if member.down_until.is_some() {
                    let reply = tidemark_span::HeldReply {
                        point: open.point,
                        epoch: open.epoch,
                        outcome: HeldOutcome::Refused {
                            code: RefuseCode::TrackerUnreachable,
                            reason: "tracker restarting".into(),
                        },
                    };
                    return Some(HoldMessage::Held(reply));
                }
                let Member {
                    participant,
                    log,
                    next_seq,
                    generation,
                    ..
                } = member;
                let generation = *generation;
                let app = open.app_consistent
                    && member.quiesce.is_some_and(|(p, e, until)| {
                        p == open.point && e == open.epoch && now < until
                    });
                let reply = participant.open(&open, now, || {
                    let seq = *next_seq;
                    *next_seq += 1;
                    log.push(Entry::Marker {
                        seq,
                        point: open.point,
                        epoch: open.epoch,
                        app,
                    });
                    Ok::<_, Refusal>((Seq(seq), generation))
                });
                if member.participant.gate().is_some() && member.gate_since.is_none() {
                    member.gate_since = Some(now);
                }
                Some(HoldMessage::Held(reply))
            }
            HoldMessage::Release(release) => {
                let reply = member.participant.release(&release, now, 0);
                member.gate_since = None;
                self.released
                    .entry((release.point, release.epoch))
                    .or_default()
                    .push(reply.how);
                Some(HoldMessage::Released(reply))
            }
            HoldMessage::Quiesce(q) => {
                let reply = |outcome| {
                    Some(HoldMessage::Quiesced(QuiescedReply {
                        point: q.point,
                        epoch: q.epoch,
                        outcome,
                    }))
                };
                // Whatever was quiesced for another point thaws first.
                member.quiesce = None;
                if member.down_until.is_some() || self.rng.random_bool(0.15) {
                    return reply(QuiescedOutcome::NotQuiesced {
                        reason: "a pre-hook failed".into(),
                    });
                }
                member.quiesce = Some((q.point, q.epoch, now + q.timeout.min(QUIESCE_MAX)));
                reply(QuiescedOutcome::Quiesced)
            }
            HoldMessage::Thaw(t) => {
                let how = match member.quiesce.take() {
                    Some((p, e, until)) if p == t.point && e == t.epoch => {
                        if now < until {
                            ThawedHow::InTime
                        } else {
                            ThawedHow::Expired
                        }
                    }
                    other => {
                        member.quiesce = other;
                        ThawedHow::Unknown
                    }
                };
                self.thawed
                    .entry((t.point, t.epoch))
                    .or_default()
                    .push((m, how));
                Some(HoldMessage::Thawed(ThawedReply {
                    point: t.point,
                    epoch: t.epoch,
                    how,
                    note: String::new(),
                }))
            }
            other => panic!("a tracker got {other:?}"),
        }
    }

    fn coordinator_io(&mut self) {
        let now = self.now;
        loop {
            let mut progressed = false;
            while let Some(event) = self.coordinator.poll_event() {
                progressed = true;
                self.on_event(event);
            }
            while let Some((m, message)) = self.coordinator.poll_transmit() {
                progressed = true;
                if let HoldMessage::Quiesce(q) = &message {
                    self.app_rounds.insert(q.point);
                    self.round_started.entry(q.point).or_insert(now);
                }
                if let HoldMessage::Open(open) = &message {
                    self.round_started.entry(open.point).or_insert(now);
                    let epochs = self.open_epochs.entry(open.point).or_default();
                    epochs.insert(open.epoch);
                    assert_eq!(
                        epochs.len(),
                        1,
                        "point {:?} was sent by two coordinators",
                        open.point
                    );
                }
                if self.up[m] {
                    let delay = self.jitter(m);
                    self.to_member[m].send(now, delay, message);
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn on_event(&mut self, event: SpanEvent) {
        let now = self.now;
        match event {
            SpanEvent::Save(saved) => {
                self.saved = saved;
                self.coordinator.handle_saved(saved, now);
            }
            SpanEvent::Committed {
                point,
                markers,
                app_consistent,
                ..
            } => {
                self.committed += 1;
                self.check_round_time(point);
                let epoch = self.coordinator.epoch();
                if app_consistent {
                    self.app_committed += 1;
                    self.check_quiesced(point, epoch, &markers);
                }
                let answers = &self.released[&(point, epoch)];
                assert!(
                    answers.len() >= MEMBERS && answers.iter().all(|h| *h == ReleasedHow::InTime),
                    "point {point:?} committed with answers {answers:?}"
                );
                self.check_causality(point, &markers);
                for (m, (seq, generation)) in markers.into_iter().enumerate() {
                    let at = now + Duration::from_millis(self.rng.random_range(1..500));
                    self.durable_at.push((at, m, seq, generation));
                }
            }
            SpanEvent::Durable { .. } => self.durable += 1,
            SpanEvent::Aborted { point, reason } => {
                if std::env::var("HOLD_SIM_DEBUG").is_ok() {
                    eprintln!("aborted {point:?}: {reason}");
                }
                self.aborted += 1;
                self.check_round_time(point);
            }
        }
    }

    fn report_durable(&mut self) {
        let now = self.now;
        let (due, rest): (Vec<_>, Vec<_>) =
            self.durable_at.drain(..).partition(|(t, ..)| *t <= now);
        self.durable_at = rest;
        for (_, m, seq, generation) in due {
            self.coordinator.handle_durable(m, seq, generation);
        }
    }

    /// Every member's marker of `point` was written while it was quiesced
    /// for it, and every member was still quiesced when the thaw came.
    fn check_quiesced(&self, point: PointId, epoch: Epoch, markers: &[(Seq, u32)]) {
        for (m, (seq, _)) in markers.iter().enumerate() {
            let app = self.members[m].log.iter().any(|e| {
                matches!(e, Entry::Marker { seq: s, point: p, epoch: e, app: true }
                    if *s == seq.0 && *p == point && *e == epoch)
            });
            assert!(
                app,
                "point {point:?} committed app-consistent, member {m}'s marker was not quiesced"
            );
            let thawed = self.thawed.get(&(point, epoch)).into_iter().flatten();
            assert!(
                thawed
                    .filter(|(member, _)| *member == m)
                    .all(|(_, how)| *how == ThawedHow::InTime),
                "point {point:?} committed app-consistent, member {m} thawed late"
            );
        }
    }

    fn check_round_time(&self, point: PointId) {
        let Some(started) = self.round_started.get(&point) else {
            return; // aborted before anything was sent
        };
        let rtt_max = *self.delay.iter().max().unwrap() * 2;
        let mut bound = self.ccfg.collect_max * 2 + rtt_max * 3 + self.ccfg.hop * 2 + STEP * 2;
        if self.app_rounds.contains(&point) {
            // The quiesce phase before, the thaw answers after.
            bound += (self.ccfg.quiesce_timeout + rtt_max * 2 + self.ccfg.hop + STEP) * 2;
        }
        let took = self.now - *started;
        assert!(
            took <= bound,
            "point {point:?} took {took:?}, bound {bound:?}"
        );
    }

    /// No member's prefix holds a write that saw a value another member's
    /// prefix does not hold.
    fn check_causality(&self, point: PointId, markers: &[(Seq, u32)]) {
        for x in 0..MEMBERS {
            let marker = markers[x].0 .0;
            let count = self.members[x]
                .log
                .iter()
                .filter(|e| matches!(e, Entry::Marker { point: p, seq, .. } if *p == point && *seq == marker))
                .count();
            assert_eq!(count, 1, "member {x} has no single marker for {point:?}");
            for (y, (their_marker, _)) in markers.iter().enumerate() {
                if x == y {
                    continue;
                }
                let saw = self.members[x].saw_at(marker, y);
                let held = self.members[y].value_at(their_marker.0);
                assert!(
                    saw <= held,
                    "point {point:?}: member {x}'s prefix saw value {saw} of member {y}, whose prefix ends at {held}"
                );
            }
        }
        for (x, member) in self.members.iter().enumerate() {
            let mut seen = HashSet::new();
            for e in &member.log {
                if let Entry::Marker { point, epoch, .. } = e {
                    assert!(
                        seen.insert((*point, *epoch)),
                        "member {x} wrote two markers for {point:?}"
                    );
                }
            }
        }
    }

    fn check_gates(&self) {
        for (m, member) in self.members.iter().enumerate() {
            if let Some(since) = member.gate_since {
                if member.participant.gate().is_some() {
                    let closed = self.now - since;
                    assert!(
                        closed <= self.pcfg.hold_max + STEP,
                        "member {m}'s gate closed for {closed:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn points_commit_on_a_quiet_network() {
    for seed in 0..8 {
        let mut sim = Sim::new(seed, false);
        sim.run(Duration::from_secs(5));
        assert!(
            sim.committed >= 20 && sim.aborted == 0,
            "seed {seed}: {} committed, {} aborted",
            sim.committed,
            sim.aborted
        );
        assert!(
            sim.app_committed > 0 && sim.app_committed < sim.committed,
            "seed {seed}: {} app-consistent of {} committed",
            sim.app_committed,
            sim.committed
        );
        assert!(
            sim.durable + 10 >= sim.committed,
            "seed {seed}: {} durable of {}",
            sim.durable,
            sim.committed
        );
    }
}

#[test]
fn points_stay_causal_under_resets_restarts_and_delays() {
    let (mut committed, mut aborted, mut expired) = (0, 0, 0);
    for seed in 0..16 {
        let mut sim = Sim::new(1000 + seed, true);
        sim.run(Duration::from_secs(6));
        committed += sim.committed;
        aborted += sim.aborted;
        expired += sim
            .released
            .values()
            .flatten()
            .filter(|h| **h == ReleasedHow::Expired)
            .count();
    }
    // Faults abort some rounds; most still commit.
    assert!(aborted > 0, "the faults never aborted a round");
    assert!(expired > 0, "no hold ever expired");
    assert!(
        committed > aborted,
        "{committed} committed against {aborted} aborted"
    );
}
