//! Points that hold across hosts ("span points"): the hold protocol
//! between a span's coordinator (a role of the receiver) and the tracker
//! of each member (a host's consistency group), as two sans-IO cores in the
//! manner of the shipper's core (`tidemark_wire::ShipperCore`): no
//! sockets, no files, no clock of their own. The caller feeds each core
//! what happened and sends what it says; every instant comes from the
//! caller, so a simulation drives the same code with a virtual clock
//! (`span/tests/hold_sim.rs`). The tracker runs the participant behind
//! its control socket, the receiver the coordinator.
//!
//! # What a span point guarantees
//!
//! A span point names one marker record in the log of every member. If a
//! write on member B was issued after an *acknowledged* write on member A
//! (it may depend on it), then B's write is never inside B's point while
//! A's write is outside A's point. So the members' disks, each rolled back
//! to its marker, show a state the application could have seen as a whole.
//! Reads are not covered: a read may see data a hold keeps unacknowledged,
//! exactly as it may see data a crash then loses.
//!
//! # The protocol
//!
//! ```text
//!  coordinator                     member tracker (through its shipper)
//!  persist (epoch, next point)
//!  Open{point, epoch, deadline} ──────►  append marker(point) + barrier;
//!                                        close the gate: no write logged
//!                                        after the marker is acknowledged
//!        ◄──────────────────────────── Held{marker seq, generation}
//!                                        or Refused{code, reason}
//!  (all Held, in time)
//!  Release{commit} ───────────────────►  open the gate
//!        ◄──────────────────────────── Released{in-time | expired |
//!                                        unknown | aborted}
//!  every member in-time: committed; the point is a span point once every
//!  member's replica holds its marker as a committed recovery point.
//! ```
//!
//! **Why it holds.** A member's gate is closed from its marker's append
//! until the release arrives or its own deadline passes: one interval. The
//! coordinator releases only after every member answered Held, i.e. after
//! every marker was appended; if every member then reports that its gate
//! was still closed when the release arrived (`in-time`), all the gates
//! were closed together at the instant the last marker was appended. A
//! write on A logged after A's marker is acknowledged only after that
//! instant, so any write that depends on it is issued after B's marker was
//! appended, and is logged after it. Any other answer (refused, expired,
//! unknown, missing) aborts the point: a lost answer is always safe.
//!
//! **A hold always ends.** The tracker bounds every hold by a deadline of
//! its own ([`ParticipantConfig::hold_max`]): the coordinator asks for a
//! duration (relative: no clocks are compared across hosts) and the
//! tracker clamps it. A dead coordinator, network or shipper costs a member
//! at most that long a pause of its acknowledgements; the shipper's hold
//! connection closing releases at once.
//!
//! **Fencing.** Every coordinator start takes a higher epoch, persisted
//! before its first message, and so does every point id: an id once sent
//! is never sent again, and a tracker refuses an epoch below the highest
//! it has seen (a stale coordinator cannot hold a disk).
//!
//! **Timing.** The coordinator waits for the Held answers `collect` =
//! `clamp(2 × rtt_max + hop, collect_min, collect_max)` and asks each
//! tracker to hold `collect + rtt_max + hop`, leaving the release the time
//! to arrive; `rtt_max` is the largest round trip among the members'
//! connections and `hop` the shipper ↔ tracker allowance. A round ends, one
//! way or the other, by `deadline + rtt_max + hop` after it started.
//!
//! Rounds are taken one at a time; a committed round then waits for its
//! markers to be durable on the replica site (several may wait at once),
//! bounded by [`CoordinatorConfig::durable_timeout`].
//!
//! # Application-consistent points
//!
//! Quiescing an application (its hooks, a filesystem freeze, a guest
//! agent) takes seconds; a hold delays every acknowledgement of the disk
//! and is sized from the round trip. So an application-consistent round
//! quiesces first, in a phase of its own, and holds only once every member
//! is quiesced:
//!
//! ```text
//!  coordinator                     member tracker (through its shipper)
//!  persist (epoch, next point)
//!  Quiesce{point, epoch, timeout} ──►  pre-hooks, freeze (its own
//!                                        watchdog thaws at its own timeout)
//!        ◄──────────────────────────── Quiesced{yes | no, why}
//!  (all answered, or the quiesce collect time passed: abort + Thaw)
//!  Open{…, app-consistent: that member is quiesced} … Release (as above)
//!  Thaw{point, epoch}  ───────────────►  thaw, post-hooks
//!        ◄──────────────────────────── Thawed{in-time | expired | unknown}
//! ```
//!
//! Rules:
//! - The quiesce answers are waited for `quiesce_timeout + 2 × rtt_max +
//!   hop` ([`CoordinatorConfig::quiesce_timeout`] is also what each member
//!   is asked for; its tracker clamps it to its own timeout). A silent
//!   member or a lost link in this phase aborts the round (nothing is held
//!   yet) and every connected member is told to thaw.
//! - A member that cannot quiesce (nothing configured, a hook failed, no
//!   guest agent, or its shipper speaks a protocol without the quiesce
//!   messages) does not abort the point: the hold round runs, and the
//!   point is committed **crash-consistent** for the whole span, with
//!   every such member and its reason in [`SpanEvent::Committed`]. (A
//!   span point is application-consistent only if every member is.)
//! - The Thaw follows the Release on the same stream, so a member thaws
//!   only after its gate opened; it is sent whatever the round's outcome
//!   to every member that was asked to quiesce. The round ends when every
//!   Released and every Thawed answer is in, or by `end_by` (extended by
//!   the quiesce allowance, the post-hooks' time).
//! - The point is application-consistent only if every member was still
//!   quiesced when its thaw arrived (`in-time`): a member whose own
//!   watchdog thawed first (`expired`), or that does not answer, makes it
//!   crash-consistent. Quiesce answers and thaws never decide whether the
//!   point is committed: the holds alone do.
//! - A member's tracker thaws by itself at its own timeout, when the hold
//!   connection closes, and when a newer coordinator quiesces it: no
//!   message lost anywhere leaves a filesystem frozen.

use std::collections::VecDeque;
use std::time::{Duration, Instant};
use thiserror::Error;
use tidemark_changelog::Seq;
use tidemark_names::Label;

/// A span point's id: unique within the span for ever (persisted before
/// it is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PointId(pub u64);

/// A coordinator's fencing number: higher at every coordinator start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

/// A message of the hold protocol (on the connection's own hold stream).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldMessage {
    /// Coordinator → tracker: append a marker and hold.
    Open(OpenHold),
    /// Tracker → coordinator: the marker's place, or why not.
    Held(HeldReply),
    /// Coordinator → tracker: end the hold.
    Release(ReleaseHold),
    /// Tracker → coordinator: how the hold ended.
    Released(ReleasedReply),
    /// Coordinator → tracker: quiesce the applications before the hold.
    Quiesce(QuiesceHold),
    /// Tracker → coordinator: whether it is quiesced.
    Quiesced(QuiescedReply),
    /// Coordinator → tracker: thaw (after the release).
    Thaw(ThawHold),
    /// Tracker → coordinator: how the quiesce ended.
    Thawed(ThawedReply),
}

impl HoldMessage {
    /// The point the message is about.
    pub fn point(&self) -> PointId {
        match self {
            HoldMessage::Open(m) => m.point,
            HoldMessage::Held(m) => m.point,
            HoldMessage::Release(m) => m.point,
            HoldMessage::Released(m) => m.point,
            HoldMessage::Quiesce(m) => m.point,
            HoldMessage::Quiesced(m) => m.point,
            HoldMessage::Thaw(m) => m.point,
            HoldMessage::Thawed(m) => m.point,
        }
    }
}

/// Quiesce a member's applications for an application-consistent point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuiesceHold {
    /// The span point.
    pub point: PointId,
    /// The coordinator's epoch.
    pub epoch: Epoch,
    /// How long the member may take to quiesce and then stay quiesced,
    /// from the moment it receives this (its tracker's own timeout may be
    /// shorter).
    pub timeout: Duration,
}

/// The answer to [`QuiesceHold`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuiescedReply {
    /// The span point.
    pub point: PointId,
    /// The epoch of the quiesce.
    pub epoch: Epoch,
    /// Whether the member is quiesced.
    pub outcome: QuiescedOutcome,
}

/// What a quiesce did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuiescedOutcome {
    /// The hooks ran and the filesystems are frozen until the thaw (or the
    /// tracker's own timeout).
    Quiesced,
    /// Nothing stays quiesced; the member's marker will be
    /// crash-consistent.
    NotQuiesced {
        /// Why, for the admin.
        reason: String,
    },
}

/// Thaw after the release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThawHold {
    /// The span point.
    pub point: PointId,
    /// The coordinator's epoch.
    pub epoch: Epoch,
}

/// The answer to [`ThawHold`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThawedReply {
    /// The span point.
    pub point: PointId,
    /// The epoch of the thaw.
    pub epoch: Epoch,
    /// How the quiesce had ended.
    pub how: ThawedHow,
    /// What went wrong while thawing (a post-hook, the guest agent), for
    /// the admin; empty when nothing did.
    pub note: String,
}

/// How a quiesce ended, as the tracker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThawedHow {
    /// Still quiesced when the thaw arrived: thawed now.
    InTime,
    /// The tracker's own timeout had thawed it first.
    Expired,
    /// No such quiesce (never quiesced, or it ended otherwise).
    Unknown,
}

impl ThawedHow {
    /// Every answer, in the order of their numbers on the wire.
    pub const ALL: [ThawedHow; 3] = [ThawedHow::InTime, ThawedHow::Expired, ThawedHow::Unknown];

    /// The answer's name in text protocols.
    pub fn name(self) -> &'static str {
        match self {
            ThawedHow::InTime => "in-time",
            ThawedHow::Expired => "expired",
            ThawedHow::Unknown => "unknown",
        }
    }

    /// The answer named `name`.
    pub fn from_name(name: &str) -> Option<ThawedHow> {
        ThawedHow::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// Open a hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenHold {
    /// The span point.
    pub point: PointId,
    /// The coordinator's epoch.
    pub epoch: Epoch,
    /// How long the tracker may hold, from the moment it receives this.
    pub deadline: Duration,
    /// The marker is application-consistent (the member was quiesced).
    pub app_consistent: bool,
    /// The marker's label.
    pub label: Label,
}

/// The answer to [`OpenHold`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldReply {
    /// The span point.
    pub point: PointId,
    /// The epoch of the open.
    pub epoch: Epoch,
    /// The marker, or why there is none.
    pub outcome: HeldOutcome,
}

/// What an open did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeldOutcome {
    /// The marker is in the log and the gate is closed behind it.
    Held {
        /// The marker record's sequence number.
        marker: Seq,
        /// The tracker generation it was written in.
        generation: u32,
    },
    /// Nothing was appended; the gate stays open.
    Refused {
        /// Why, for the coordinator.
        code: RefuseCode,
        /// Why, for the admin.
        reason: String,
    },
}

/// Why a tracker refused a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseCode {
    /// The group records to its bitmap: a point would miss writes.
    BitmapMode,
    /// The tracker is still starting.
    Starting,
    /// Another hold is open, or this point already ended.
    Busy,
    /// The epoch is below one the tracker has seen: a stale coordinator.
    StaleEpoch,
    /// The shipper could not reach its tracker.
    TrackerUnreachable,
    /// The group is resyncing: its barriers are no points.
    Resyncing,
}

impl RefuseCode {
    /// Every code, in the order of their numbers on the wire.
    pub const ALL: [RefuseCode; 6] = [
        RefuseCode::BitmapMode,
        RefuseCode::Starting,
        RefuseCode::Busy,
        RefuseCode::StaleEpoch,
        RefuseCode::TrackerUnreachable,
        RefuseCode::Resyncing,
    ];

    /// The code's name in text protocols.
    pub fn name(self) -> &'static str {
        match self {
            RefuseCode::BitmapMode => "bitmap-mode",
            RefuseCode::Starting => "starting",
            RefuseCode::Busy => "busy",
            RefuseCode::StaleEpoch => "stale-epoch",
            RefuseCode::TrackerUnreachable => "tracker-unreachable",
            RefuseCode::Resyncing => "resyncing",
        }
    }

    /// The code named `name`.
    pub fn from_name(name: &str) -> Option<RefuseCode> {
        RefuseCode::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// End a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseHold {
    /// The span point.
    pub point: PointId,
    /// The coordinator's epoch.
    pub epoch: Epoch,
    /// Every member held in time (false: the point is abandoned).
    pub commit: bool,
}

/// The answer to [`ReleaseHold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleasedReply {
    /// The span point.
    pub point: PointId,
    /// The epoch of the release.
    pub epoch: Epoch,
    /// How the hold had ended.
    pub how: ReleasedHow,
    /// How long the gate was closed.
    pub held: Duration,
    /// Acknowledgements the gate delayed.
    pub gated_writes: u32,
}

/// How a hold ended, as the tracker saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReleasedHow {
    /// The gate was still closed when the commit arrived.
    InTime,
    /// The tracker's own deadline had opened the gate first.
    Expired,
    /// No such hold (never opened, or the tracker restarted since).
    Unknown,
    /// Abandoned: by the coordinator, a newer coordinator, or the
    /// shipper's hold connection closing.
    Aborted,
}

impl ReleasedHow {
    /// Every answer, in the order of their numbers on the wire.
    pub const ALL: [ReleasedHow; 4] = [
        ReleasedHow::InTime,
        ReleasedHow::Expired,
        ReleasedHow::Unknown,
        ReleasedHow::Aborted,
    ];

    /// The answer's name in text protocols.
    pub fn name(self) -> &'static str {
        match self {
            ReleasedHow::InTime => "in-time",
            ReleasedHow::Expired => "expired",
            ReleasedHow::Unknown => "unknown",
            ReleasedHow::Aborted => "aborted",
        }
    }

    /// The answer named `name`.
    pub fn from_name(name: &str) -> Option<ReleasedHow> {
        ReleasedHow::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// Bounds a tracker puts on every hold: the tracker, not the coordinator,
/// decides how long its disk's acknowledgements may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParticipantConfig {
    /// The shortest hold granted (a deadline below is raised to it).
    pub hold_min: Duration,
    /// The longest hold granted (a deadline above is cut to it).
    pub hold_max: Duration,
}

impl Default for ParticipantConfig {
    fn default() -> Self {
        ParticipantConfig {
            hold_min: Duration::from_millis(5),
            hold_max: Duration::from_millis(500),
        }
    }
}

/// Why the tracker's group could not append a hold's marker (the answer of
/// the `append` step of [`Participant::open`]).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{reason}")]
pub struct Refusal {
    /// Why, for the coordinator.
    pub code: RefuseCode,
    /// Why, for the admin.
    pub reason: String,
}

/// Holds remembered after they ended, to answer duplicates the same way.
const RECENT: usize = 16;

#[derive(Debug, Clone, Copy)]
struct Holding {
    point: PointId,
    epoch: Epoch,
    marker: Seq,
    generation: u32,
    opened: Instant,
    until: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Ended {
    point: PointId,
    epoch: Epoch,
    how: ReleasedHow,
    held: Duration,
    gated_writes: u32,
}

/// The tracker's side: at most one hold at a time, every hold bounded by
/// the tracker's own deadline.
///
/// The gate itself lives in the tracker's write path: while [`Self::gate`]
/// is `Some(marker)`, no write whose record's sequence number is above the
/// marker is acknowledged. The caller closes it inside the same lock that
/// appends the marker (the `append` step of [`Self::open`]), so every
/// record numbered after the marker finds it closed, and opens it whenever
/// a call here ends the hold.
#[derive(Debug)]
pub struct Participant {
    config: ParticipantConfig,
    holding: Option<Holding>,
    epoch_seen: Epoch,
    recent: VecDeque<Ended>,
}

impl Ended {
    fn reply(&self) -> ReleasedReply {
        ReleasedReply {
            point: self.point,
            epoch: self.epoch,
            how: self.how,
            held: self.held,
            gated_writes: self.gated_writes,
        }
    }
}

impl Participant {
    /// A tracker with no hold open.
    pub fn new(config: ParticipantConfig) -> Self {
        Participant {
            config,
            holding: None,
            epoch_seen: Epoch::default(),
            recent: VecDeque::with_capacity(RECENT),
        }
    }

    /// The marker behind which acknowledgements wait, while a hold is open.
    pub fn gate(&self) -> Option<Seq> {
        self.holding.map(|h| h.marker)
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.holding.map(|h| h.until)
    }

    /// An open arrived at `now`. `append` writes the marker (and its
    /// barrier) and closes the gate, or says why not; it is called only
    /// when a new hold is to be opened, so a duplicate open never writes a
    /// second marker.
    pub fn open(
        &mut self,
        open: &OpenHold,
        now: Instant,
        append: impl FnOnce() -> Result<(Seq, u32), Refusal>,
    ) -> HeldReply {
        self.handle_timeout(now);
        let reply = |outcome| HeldReply {
            point: open.point,
            epoch: open.epoch,
            outcome,
        };
        let refused = |code, reason: String| reply(HeldOutcome::Refused { code, reason });
        if open.epoch < self.epoch_seen {
            return refused(
                RefuseCode::StaleEpoch,
                format!(
                    "coordinator epoch {} is older than epoch {} seen already",
                    open.epoch.0, self.epoch_seen.0
                ),
            );
        }
        if let Some(h) = self.holding {
            if h.point == open.point && h.epoch == open.epoch {
                return reply(HeldOutcome::Held {
                    marker: h.marker,
                    generation: h.generation,
                });
            }
            if open.epoch > h.epoch {
                // A newer coordinator took over: the old hold is abandoned.
                self.end(ReleasedHow::Aborted, now, 0);
            } else {
                return refused(
                    RefuseCode::Busy,
                    format!("point {} is still held", h.point.0),
                );
            }
        }
        if self
            .recent
            .iter()
            .any(|e| e.point == open.point && e.epoch == open.epoch)
        {
            return refused(
                RefuseCode::Busy,
                format!("point {} has ended already", open.point.0),
            );
        }
        self.epoch_seen = open.epoch;
        match append() {
            Ok((marker, generation)) => {
                let granted = open
                    .deadline
                    .clamp(self.config.hold_min, self.config.hold_max);
                self.holding = Some(Holding {
                    point: open.point,
                    epoch: open.epoch,
                    marker,
                    generation,
                    opened: now,
                    until: now + granted,
                });
                reply(HeldOutcome::Held { marker, generation })
            }
            Err(refusal) => refused(refusal.code, refusal.reason),
        }
    }

    /// A release arrived at `now`; `gated_writes` is how many
    /// acknowledgements the gate delayed during this hold. The gate is open
    /// when this returns.
    pub fn release(
        &mut self,
        release: &ReleaseHold,
        now: Instant,
        gated_writes: u32,
    ) -> ReleasedReply {
        self.handle_timeout(now);
        if let Some(h) = self.holding {
            if h.point == release.point && h.epoch == release.epoch {
                let how = if release.commit {
                    ReleasedHow::InTime
                } else {
                    ReleasedHow::Aborted
                };
                let ended = self.end(how, now, gated_writes);
                return ended.reply();
            }
        }
        if let Some(e) = self
            .recent
            .iter()
            .find(|e| e.point == release.point && e.epoch == release.epoch)
        {
            return e.reply();
        }
        ReleasedReply {
            point: release.point,
            epoch: release.epoch,
            how: ReleasedHow::Unknown,
            held: Duration::ZERO,
            gated_writes: 0,
        }
    }

    /// Time passed: a hold past its deadline ends (expired). Returns true
    /// when that opened the gate.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        match self.holding {
            Some(h) if now >= h.until => {
                self.end(ReleasedHow::Expired, h.until, 0);
                true
            }
            _ => false,
        }
    }

    /// The connection the holds come over closed: any open hold ends now
    /// (aborted). Returns true when that opened the gate.
    pub fn connection_lost(&mut self, now: Instant) -> bool {
        self.handle_timeout(now);
        if self.holding.is_some() {
            self.end(ReleasedHow::Aborted, now, 0);
            true
        } else {
            false
        }
    }

    fn end(&mut self, how: ReleasedHow, at: Instant, gated_writes: u32) -> Ended {
        let h = self.holding.take().expect("a hold to end");
        let ended = Ended {
            point: h.point,
            epoch: h.epoch,
            how,
            held: at.saturating_duration_since(h.opened),
            gated_writes,
        };
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(ended);
        ended
    }
}

/// Timing of the coordinator's rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoordinatorConfig {
    /// Allowance for the hop between a member's shipper and its tracker.
    pub hop: Duration,
    /// The shortest wait for the members' Held answers.
    pub collect_min: Duration,
    /// The longest wait for the members' Held answers.
    pub collect_max: Duration,
    /// How long a committed point may wait for every member's marker to be
    /// durable on the replica site before it is abandoned.
    pub durable_timeout: Duration,
    /// How long each member of an application-consistent round may take
    /// to quiesce (asked of its tracker, which clamps it to its own
    /// timeout); the quiesce answers are waited for this plus the round
    /// trip, and so are the thaw answers.
    pub quiesce_timeout: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            // Measured end to end (tests/tests/span.rs, debug build, a
            // loaded 2-core machine): with 5 ms and 10 ms a third of the
            // rounds on loopback missed the window. A wider window costs
            // nothing when every member answers (the release goes out at
            // the last answer); it bounds the pause a slow member adds.
            hop: Duration::from_millis(10),
            collect_min: Duration::from_millis(50),
            collect_max: Duration::from_millis(300),
            durable_timeout: Duration::from_secs(150),
            quiesce_timeout: Duration::from_secs(30),
        }
    }
}

/// What the coordinator knows of a member's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Not connected: no point can be taken.
    Down,
    /// Connected, with the connection's round-trip time, and whether its
    /// session speaks the hold protocol.
    Up {
        /// The connection's smoothed round-trip time.
        rtt: Duration,
        /// The session's protocol version has the hold messages.
        holds: bool,
        /// The session's protocol version has the quiesce and thaw
        /// messages (application-consistent points).
        quiesce: bool,
    },
}

/// What the coordinator saved, and must save again before it sends
/// anything that uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Saved {
    /// The epoch of the coordinator that saved it.
    pub epoch: Epoch,
    /// The next point id to hand out.
    pub next_point: PointId,
}

impl Default for PointId {
    fn default() -> Self {
        PointId(1)
    }
}

/// Why no round was started.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StartRefused {
    /// A round is running (rounds are taken one at a time).
    #[error("point {} is still being taken", .0 .0)]
    Busy(PointId),
    /// A member is not connected.
    #[error("member {0} is not connected")]
    MemberDown(usize),
    /// A member's session does not speak the hold protocol.
    #[error("member {0} runs a release without span points")]
    MemberTooOld(usize),
    /// The span has no members.
    #[error("the span has no members")]
    NoMembers,
}

/// Why a point was abandoned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AbortReason {
    /// A member refused to hold.
    #[error("member {member} refused: {reason}")]
    Refused {
        /// The member.
        member: usize,
        /// Its code.
        code: RefuseCode,
        /// Its words.
        reason: String,
    },
    /// Members did not answer the open in time.
    #[error("members {members:?} did not answer in time")]
    Silent {
        /// The members that did not answer.
        members: Vec<usize>,
    },
    /// A member's hold had ended before the release arrived, or it did not
    /// answer the release.
    #[error("member {member}'s hold ended {how:?} before the release")]
    NotInTime {
        /// The member.
        member: usize,
        /// What it said (`None`: nothing, in time).
        how: Option<ReleasedHow>,
    },
    /// A member's connection went down during the round.
    #[error("member {0}'s connection went down")]
    LinkLost(usize),
    /// Members did not answer the quiesce in time (an
    /// application-consistent round; nothing was held).
    #[error("members {members:?} did not answer the quiesce in time")]
    SilentQuiesce {
        /// The members that did not answer.
        members: Vec<usize>,
    },
    /// A member's replica did not hold its marker as a committed point in
    /// time.
    #[error("member {0}'s marker did not become durable in time")]
    NotDurable(usize),
}

/// A member whose quiesce did not cover its marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotQuiesced {
    /// The member.
    pub member: usize,
    /// Why, for the admin.
    pub reason: String,
}

impl std::fmt::Display for NotQuiesced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "member {} was not quiesced: {}",
            self.member, self.reason
        )
    }
}

/// What happened, for the caller to record and report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpanEvent {
    /// Save this durably, then call [`Coordinator::handle_saved`]: nothing
    /// that uses it is sent before.
    Save(Saved),
    /// Every member held in time: the point's markers. It becomes a span
    /// point when [`SpanEvent::Durable`] follows.
    Committed {
        /// The point.
        point: PointId,
        /// Each member's marker and generation, by member index.
        markers: Vec<(Seq, u32)>,
        /// Every member was quiesced from before its marker until its
        /// thaw (only in an application-consistent round).
        app_consistent: bool,
        /// In an application-consistent round, the members that were not
        /// quiesced throughout, and why: the point is crash-consistent.
        not_quiesced: Vec<NotQuiesced>,
    },
    /// Every member's replica holds its marker as a committed point.
    Durable {
        /// The point.
        point: PointId,
    },
    /// The point was abandoned.
    Aborted {
        /// The point.
        point: PointId,
        /// Why.
        reason: AbortReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the point id to be saved.
    Saving,
    /// Quiesce sent (application-consistent round): collecting Quiesced
    /// answers.
    Quiescing,
    /// Open sent: collecting Held answers.
    Opening,
    /// Release sent: collecting Released answers.
    Releasing { commit: bool },
}

#[derive(Debug)]
struct Round {
    point: PointId,
    app_consistent: bool,
    label: Label,
    phase: Phase,
    /// Until when the Held answers are waited for (set when sent).
    collect_by: Instant,
    /// The hold asked of each tracker.
    deadline: Duration,
    /// Until when the Released answers are waited for (set when sent).
    end_by: Instant,
    held: Vec<Option<(Seq, u32)>>,
    released: Vec<Option<ReleasedHow>>,
    abort: Option<AbortReason>,
    /// Application-consistent round: each member's quiesce answer
    /// (`Err`: why it is not quiesced).
    quiesced: Vec<Option<Result<(), String>>>,
    /// Members asked to quiesce, and so to thaw.
    asked_quiesce: Vec<bool>,
    /// Each thaw answer (`Err`: why the quiesce did not last).
    thawed: Vec<Option<Result<(), String>>>,
}

#[derive(Debug)]
struct Waiting {
    point: PointId,
    markers: Vec<(Seq, u32)>,
    durable: Vec<bool>,
    by: Instant,
}

/// The coordinator of one span: takes its points one round at a time and
/// follows each committed one until it is durable on every member.
#[derive(Debug)]
pub struct Coordinator {
    config: CoordinatorConfig,
    links: Vec<Link>,
    epoch: Epoch,
    next_point: PointId,
    saved: Saved,
    round: Option<Round>,
    waiting: Vec<Waiting>,
    transmits: VecDeque<(usize, HoldMessage)>,
    events: VecDeque<SpanEvent>,
}

impl Coordinator {
    /// A coordinator for `members` members (all down), starting after
    /// `saved`, what the previous coordinator of the span saved (or the
    /// default for a new span). It takes the next epoch.
    pub fn new(config: CoordinatorConfig, members: usize, saved: Saved) -> Self {
        Coordinator {
            config,
            links: vec![Link::Down; members],
            epoch: Epoch(saved.epoch.0 + 1),
            next_point: saved.next_point,
            saved,
            round: None,
            waiting: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// This coordinator's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The point being taken, if a round runs.
    pub fn current(&self) -> Option<PointId> {
        self.round.as_ref().map(|r| r.point)
    }

    /// A member's connection changed. A member lost during a round aborts
    /// it: its tracker's own deadline ends its hold.
    pub fn handle_link(&mut self, member: usize, link: Link, now: Instant) {
        self.links[member] = link;
        if link == Link::Down {
            if let Some(round) = &self.round {
                if round.phase != Phase::Saving {
                    self.abort(AbortReason::LinkLost(member), now);
                }
            }
        }
    }

    /// Start taking a point (on schedule or on demand).
    pub fn start_point(
        &mut self,
        app_consistent: bool,
        label: Label,
        now: Instant,
    ) -> Result<PointId, StartRefused> {
        if let Some(round) = &self.round {
            return Err(StartRefused::Busy(round.point));
        }
        if self.links.is_empty() {
            return Err(StartRefused::NoMembers);
        }
        for (i, link) in self.links.iter().enumerate() {
            match link {
                Link::Down => return Err(StartRefused::MemberDown(i)),
                Link::Up { holds: false, .. } => return Err(StartRefused::MemberTooOld(i)),
                Link::Up { .. } => {}
            }
        }
        let point = self.next_point;
        self.next_point = PointId(point.0 + 1);
        let n = self.links.len();
        self.round = Some(Round {
            point,
            app_consistent,
            label,
            phase: Phase::Saving,
            collect_by: now,
            deadline: Duration::ZERO,
            end_by: now,
            held: vec![None; n],
            released: vec![None; n],
            abort: None,
            quiesced: vec![None; n],
            asked_quiesce: vec![false; n],
            thawed: vec![None; n],
        });
        let wanted = Saved {
            epoch: self.epoch,
            next_point: self.next_point,
        };
        self.events.push_back(SpanEvent::Save(wanted));
        Ok(point)
    }

    /// `saved` is durable: a round waiting for it sends its opens.
    pub fn handle_saved(&mut self, saved: Saved, now: Instant) {
        if saved.epoch > self.saved.epoch
            || (saved.epoch == self.saved.epoch && saved.next_point > self.saved.next_point)
        {
            self.saved = saved;
        }
        let covered = self.saved.epoch == self.epoch;
        let Some(round) = &mut self.round else { return };
        if round.phase != Phase::Saving || !covered || self.saved.next_point <= round.point {
            return;
        }
        if let Some(member) = self.links.iter().position(|l| *l == Link::Down) {
            // Lost while the id was being saved: nothing was sent yet.
            self.abort(AbortReason::LinkLost(member), now);
            return;
        }
        if !round.app_consistent {
            self.send_opens(now);
            return;
        }
        let rtt_max = self.links.iter().map(link_rtt).max().unwrap_or_default();
        round.phase = Phase::Quiescing;
        round.collect_by = now + self.config.quiesce_timeout + rtt_max * 2 + self.config.hop;
        for (member, link) in self.links.iter().enumerate() {
            if matches!(link, Link::Up { quiesce: false, .. }) {
                round.quiesced[member] = Some(Err(
                    "its shipper speaks a protocol without application-consistent span points"
                        .into(),
                ));
                continue;
            }
            round.asked_quiesce[member] = true;
            self.transmits.push_back((
                member,
                HoldMessage::Quiesce(QuiesceHold {
                    point: round.point,
                    epoch: self.epoch,
                    timeout: self.config.quiesce_timeout,
                }),
            ));
        }
        if round.quiesced.iter().all(Option::is_some) {
            self.send_opens(now);
        }
    }

    /// The hold phase: send every member its open.
    fn send_opens(&mut self, now: Instant) {
        let round = self.round.as_mut().expect("a round");
        let rtt_max = self.links.iter().map(link_rtt).max().unwrap_or_default();
        let collect =
            (rtt_max * 2 + self.config.hop).clamp(self.config.collect_min, self.config.collect_max);
        round.deadline = collect + rtt_max + self.config.hop;
        round.collect_by = now + collect;
        round.end_by = now + round.deadline + rtt_max + self.config.hop;
        round.phase = Phase::Opening;
        for member in 0..self.links.len() {
            let quiesced = matches!(round.quiesced[member], Some(Ok(())));
            self.transmits.push_back((
                member,
                HoldMessage::Open(OpenHold {
                    point: round.point,
                    epoch: self.epoch,
                    deadline: round.deadline,
                    app_consistent: round.app_consistent && quiesced,
                    label: round.label.clone(),
                }),
            ));
        }
    }

    /// A member's tracker answered. Answers to another point or epoch are
    /// stale and ignored.
    pub fn handle_message(&mut self, member: usize, message: HoldMessage, now: Instant) {
        let Some(round) = &mut self.round else { return };
        match message {
            HoldMessage::Held(reply)
                if reply.point == round.point
                    && reply.epoch == self.epoch
                    && round.phase == Phase::Opening =>
            {
                match reply.outcome {
                    HeldOutcome::Held { marker, generation } => {
                        round.held[member] = Some((marker, generation));
                        if round.held.iter().all(Option::is_some) {
                            self.release(true, now);
                        }
                    }
                    HeldOutcome::Refused { code, reason } => {
                        self.abort(
                            AbortReason::Refused {
                                member,
                                code,
                                reason,
                            },
                            now,
                        );
                    }
                }
            }
            HoldMessage::Released(reply)
                if reply.point == round.point
                    && reply.epoch == self.epoch
                    && matches!(round.phase, Phase::Releasing { .. }) =>
            {
                round.released[member] = Some(reply.how);
                if round.abort.is_none() && reply.how != ReleasedHow::InTime {
                    round.abort = Some(AbortReason::NotInTime {
                        member,
                        how: Some(reply.how),
                    });
                }
                if round.answered() {
                    self.finish(now);
                }
            }
            HoldMessage::Quiesced(reply)
                if reply.point == round.point
                    && reply.epoch == self.epoch
                    && round.phase == Phase::Quiescing =>
            {
                round.quiesced[member] = Some(match reply.outcome {
                    QuiescedOutcome::Quiesced => Ok(()),
                    QuiescedOutcome::NotQuiesced { reason } => Err(reason),
                });
                if round.quiesced.iter().all(Option::is_some) {
                    self.send_opens(now);
                }
            }
            HoldMessage::Thawed(reply)
                if reply.point == round.point
                    && reply.epoch == self.epoch
                    && matches!(round.phase, Phase::Releasing { .. }) =>
            {
                round.thawed[member] = Some(match reply.how {
                    ThawedHow::InTime => Ok(()),
                    ThawedHow::Expired => Err(format!(
                        "its own timeout thawed it before the thaw arrived{}",
                        note(&reply.note)
                    )),
                    ThawedHow::Unknown => Err(format!(
                        "it was no longer quiesced when the thaw arrived{}",
                        note(&reply.note)
                    )),
                });
                if round.answered() {
                    self.finish(now);
                }
            }
            _ => {}
        }
    }

    /// `marker` of `member` (written in `generation`) is a committed
    /// recovery point of its replica.
    pub fn handle_durable(&mut self, member: usize, marker: Seq, generation: u32) {
        for w in &mut self.waiting {
            if w.markers[member] == (marker, generation) {
                w.durable[member] = true;
            }
        }
        let events = &mut self.events;
        self.waiting.retain(|w| {
            let done = w.durable.iter().all(|d| *d);
            if done {
                events.push_back(SpanEvent::Durable { point: w.point });
            }
            !done
        });
    }

    /// Time passed: answers not in by their time abort the round; points
    /// not durable in time are abandoned.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(round) = &self.round {
            match round.phase {
                Phase::Quiescing if now >= round.collect_by => {
                    let members = (0..round.quiesced.len())
                        .filter(|m| round.quiesced[*m].is_none())
                        .collect();
                    self.abort(AbortReason::SilentQuiesce { members }, now);
                }
                Phase::Opening if now >= round.collect_by => {
                    let members = (0..round.held.len())
                        .filter(|m| round.held[*m].is_none())
                        .collect();
                    self.abort(AbortReason::Silent { members }, now);
                }
                Phase::Releasing { .. } if now >= round.end_by => {
                    let round = self.round.as_mut().expect("a round");
                    if round.abort.is_none() {
                        if let Some(member) = round.released.iter().position(Option::is_none) {
                            round.abort = Some(AbortReason::NotInTime { member, how: None });
                        }
                    }
                    self.finish(now);
                }
                _ => {}
            }
        }
        let events = &mut self.events;
        self.waiting.retain(|w| {
            if now < w.by {
                return true;
            }
            let member = w.durable.iter().position(|d| !d).unwrap_or(0);
            events.push_back(SpanEvent::Aborted {
                point: w.point,
                reason: AbortReason::NotDurable(member),
            });
            false
        });
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let round = self.round.as_ref().and_then(|r| match r.phase {
            Phase::Saving => None,
            Phase::Quiescing | Phase::Opening => Some(r.collect_by),
            Phase::Releasing { .. } => Some(r.end_by),
        });
        self.waiting.iter().map(|w| w.by).chain(round).min()
    }

    /// The next message to send, and to which member.
    pub fn poll_transmit(&mut self) -> Option<(usize, HoldMessage)> {
        self.transmits.pop_front()
    }

    /// The next thing that happened.
    pub fn poll_event(&mut self) -> Option<SpanEvent> {
        self.events.pop_front()
    }

    /// Send the release to every member still connected, and after it the
    /// thaw to every member asked to quiesce.
    fn release(&mut self, commit: bool, now: Instant) {
        let round = self.round.as_mut().expect("a round");
        round.phase = Phase::Releasing { commit };
        for (member, link) in self.links.iter().enumerate() {
            if *link == Link::Down {
                continue;
            }
            self.transmits.push_back((
                member,
                HoldMessage::Release(ReleaseHold {
                    point: round.point,
                    epoch: self.epoch,
                    commit,
                }),
            ));
        }
        self.send_thaws(now);
    }

    /// Tell every connected member asked to quiesce to thaw; the round
    /// then waits for their answers too (members down count as answered:
    /// their trackers thaw by themselves).
    fn send_thaws(&mut self, now: Instant) {
        let round = self.round.as_mut().expect("a round");
        if !round.app_consistent {
            return;
        }
        let rtt_max = self.links.iter().map(link_rtt).max().unwrap_or_default();
        round.end_by = round
            .end_by
            .max(now + self.config.quiesce_timeout + rtt_max * 2 + self.config.hop);
        for (member, link) in self.links.iter().enumerate() {
            if !round.asked_quiesce[member] {
                round.thawed[member].get_or_insert(Ok(()));
                continue;
            }
            if *link == Link::Down {
                round.thawed[member]
                    .get_or_insert(Err("its connection went down before the thaw".into()));
                continue;
            }
            self.transmits.push_back((
                member,
                HoldMessage::Thaw(ThawHold {
                    point: round.point,
                    epoch: self.epoch,
                }),
            ));
        }
    }

    /// Abandon the round: release what may be held, report why.
    fn abort(&mut self, reason: AbortReason, now: Instant) {
        let round = self.round.as_mut().expect("a round");
        match round.phase {
            Phase::Saving => {
                // Nothing was sent: no tracker holds anything.
                let point = round.point;
                self.round = None;
                self.events.push_back(SpanEvent::Aborted { point, reason });
            }
            Phase::Quiescing => {
                // Nothing is held: thaw whoever was asked to quiesce; the
                // round ends now (late answers are stale).
                round.abort = Some(reason.clone());
                let point = round.point;
                self.send_thaws(now);
                self.round = None;
                self.events.push_back(SpanEvent::Aborted { point, reason });
            }
            Phase::Opening => {
                round.abort = Some(reason);
                self.release(false, now);
                // Members already down answer nothing: count them done.
                let round = self.round.as_mut().expect("a round");
                for (member, link) in self.links.iter().enumerate() {
                    if *link == Link::Down {
                        round.released[member] = Some(ReleasedHow::Aborted);
                    }
                }
                if round.answered() {
                    self.finish(now);
                }
            }
            Phase::Releasing { .. } => {
                if let AbortReason::LinkLost(member) = reason {
                    // It answers nothing more: its own deadline ends its
                    // hold, its own timeout its quiesce.
                    round.released[member].get_or_insert(ReleasedHow::Aborted);
                    round.thawed[member]
                        .get_or_insert(Err("its connection went down before the thaw".into()));
                }
                round.abort.get_or_insert(reason);
                if round.answered() {
                    self.finish(now);
                }
            }
        }
    }

    /// Every answer is in (or late): the round ends.
    fn finish(&mut self, now: Instant) {
        let round = self.round.take().expect("a round");
        let commit = matches!(round.phase, Phase::Releasing { commit: true });
        match round.abort {
            None if commit => {
                let markers: Vec<(Seq, u32)> = round
                    .held
                    .iter()
                    .map(|h| h.expect("every member held"))
                    .collect();
                let mut not_quiesced = Vec::new();
                if round.app_consistent {
                    for member in 0..markers.len() {
                        let why = match (&round.quiesced[member], &round.thawed[member]) {
                            (Some(Err(why)), _) => Some(why.clone()),
                            (_, Some(Err(why))) => Some(why.clone()),
                            (_, None) => Some("it did not answer the thaw in time".into()),
                            _ => None,
                        };
                        if let Some(reason) = why {
                            not_quiesced.push(NotQuiesced { member, reason });
                        }
                    }
                }
                self.events.push_back(SpanEvent::Committed {
                    point: round.point,
                    markers: markers.clone(),
                    app_consistent: round.app_consistent && not_quiesced.is_empty(),
                    not_quiesced,
                });
                self.waiting.push(Waiting {
                    point: round.point,
                    durable: vec![false; markers.len()],
                    markers,
                    by: now + self.config.durable_timeout,
                });
            }
            reason => self.events.push_back(SpanEvent::Aborted {
                point: round.point,
                reason: reason.unwrap_or(AbortReason::Silent {
                    members: Vec::new(),
                }),
            }),
        }
    }
}

impl Round {
    /// Every Released answer is in, and every Thawed one.
    fn answered(&self) -> bool {
        self.released.iter().all(Option::is_some)
            && (!self.app_consistent || self.thawed.iter().all(Option::is_some))
    }
}

/// `note` as the end of a sentence, if there is one.
fn note(note: &str) -> String {
    if note.is_empty() {
        String::new()
    } else {
        format!(" ({note})")
    }
}

fn link_rtt(link: &Link) -> Duration {
    match link {
        Link::Down => Duration::ZERO,
        Link::Up { rtt, .. } => *rtt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label() -> Label {
        Label::new("span-shop").unwrap()
    }

    fn open(point: u64, epoch: u64, deadline_ms: u64) -> OpenHold {
        OpenHold {
            point: PointId(point),
            epoch: Epoch(epoch),
            deadline: Duration::from_millis(deadline_ms),
            app_consistent: false,
            label: label(),
        }
    }

    fn release(point: u64, epoch: u64, commit: bool) -> ReleaseHold {
        ReleaseHold {
            point: PointId(point),
            epoch: Epoch(epoch),
            commit,
        }
    }

    /// A participant whose appends number markers from 10 on.
    struct Tracker {
        p: Participant,
        appended: u64,
    }

    impl Tracker {
        fn new() -> Tracker {
            Tracker {
                p: Participant::new(ParticipantConfig::default()),
                appended: 0,
            }
        }
        fn open(&mut self, o: &OpenHold, now: Instant) -> HeldOutcome {
            let appended = &mut self.appended;
            self.p
                .open(o, now, || {
                    *appended += 1;
                    Ok((Seq(9 + *appended), 1))
                })
                .outcome
        }
    }

    #[test]
    fn a_hold_closes_the_gate_until_its_release() {
        let now = Instant::now();
        let mut t = Tracker::new();
        assert_eq!(
            t.open(&open(1, 1, 50), now),
            HeldOutcome::Held {
                marker: Seq(10),
                generation: 1
            }
        );
        assert_eq!(t.p.gate(), Some(Seq(10)));
        let r =
            t.p.release(&release(1, 1, true), now + Duration::from_millis(20), 3);
        assert_eq!(r.how, ReleasedHow::InTime);
        assert_eq!(r.held, Duration::from_millis(20));
        assert_eq!(r.gated_writes, 3);
        assert_eq!(t.p.gate(), None);
        // The same release again: the same answer, nothing else changes.
        let again =
            t.p.release(&release(1, 1, true), now + Duration::from_millis(30), 0);
        assert_eq!(again, r);
    }

    #[test]
    fn a_duplicate_open_writes_no_second_marker() {
        let now = Instant::now();
        let mut t = Tracker::new();
        let first = t.open(&open(1, 1, 50), now);
        assert_eq!(t.open(&open(1, 1, 50), now), first);
        assert_eq!(t.appended, 1);
        t.p.release(&release(1, 1, true), now, 0);
        // An open of a point that ended is refused, and appends nothing.
        assert!(matches!(
            t.open(&open(1, 1, 50), now),
            HeldOutcome::Refused {
                code: RefuseCode::Busy,
                ..
            }
        ));
        assert_eq!(t.appended, 1);
    }

    #[test]
    fn the_tracker_bounds_every_hold_by_its_own_deadline() {
        let now = Instant::now();
        let mut t = Tracker::new();
        // Asked for an hour: granted hold_max.
        t.open(&open(1, 1, 3_600_000), now);
        let max = ParticipantConfig::default().hold_max;
        assert_eq!(t.p.poll_timeout(), Some(now + max));
        assert!(!t.p.handle_timeout(now + max - Duration::from_millis(1)));
        assert!(t.p.handle_timeout(now + max));
        assert_eq!(t.p.gate(), None);
        // The release that arrives late learns the hold expired.
        let r = t.p.release(&release(1, 1, true), now + max * 2, 0);
        assert_eq!(r.how, ReleasedHow::Expired);
        assert_eq!(r.held, max);
        // Asked for nothing: granted hold_min.
        t.open(&open(2, 1, 0), now);
        let min = ParticipantConfig::default().hold_min;
        assert_eq!(t.p.poll_timeout(), Some(now + min));
    }

    #[test]
    fn a_release_after_the_deadline_is_expired_even_unpolled() {
        let now = Instant::now();
        let mut t = Tracker::new();
        t.open(&open(1, 1, 10), now);
        let r =
            t.p.release(&release(1, 1, true), now + Duration::from_millis(11), 0);
        assert_eq!(r.how, ReleasedHow::Expired);
    }

    #[test]
    fn stale_and_newer_coordinators() {
        let now = Instant::now();
        let mut t = Tracker::new();
        t.open(&open(1, 5, 100), now);
        // A stale coordinator cannot hold the disk.
        assert!(matches!(
            t.open(&open(7, 4, 100), now),
            HeldOutcome::Refused {
                code: RefuseCode::StaleEpoch,
                ..
            }
        ));
        // Another point of the same coordinator while one is held: busy.
        assert!(matches!(
            t.open(&open(2, 5, 100), now),
            HeldOutcome::Refused {
                code: RefuseCode::Busy,
                ..
            }
        ));
        // A newer coordinator takes over: the old hold ends aborted.
        assert!(matches!(
            t.open(&open(9, 6, 100), now),
            HeldOutcome::Held { .. }
        ));
        assert_eq!(
            t.p.release(&release(1, 5, true), now, 0).how,
            ReleasedHow::Aborted
        );
        assert_eq!(
            t.p.release(&release(3, 6, true), now, 0).how,
            ReleasedHow::Unknown
        );
        assert_eq!(t.p.gate(), Some(Seq(11)));
    }

    #[test]
    fn a_refused_append_leaves_the_gate_open() {
        let now = Instant::now();
        let mut p = Participant::new(ParticipantConfig::default());
        let reply = p.open(&open(1, 1, 100), now, || {
            Err(Refusal {
                code: RefuseCode::BitmapMode,
                reason: "the group records to its bitmap".into(),
            })
        });
        assert!(matches!(
            reply.outcome,
            HeldOutcome::Refused {
                code: RefuseCode::BitmapMode,
                ..
            }
        ));
        assert_eq!(p.gate(), None);
    }

    #[test]
    fn a_lost_hold_connection_opens_the_gate_at_once() {
        let now = Instant::now();
        let mut t = Tracker::new();
        t.open(&open(1, 1, 100), now);
        assert!(t.p.connection_lost(now));
        assert_eq!(t.p.gate(), None);
        assert!(!t.p.connection_lost(now));
        assert_eq!(
            t.p.release(&release(1, 1, true), now, 0).how,
            ReleasedHow::Aborted
        );
    }

    fn up(rtt_ms: u64) -> Link {
        Link::Up {
            rtt: Duration::from_millis(rtt_ms),
            holds: true,
            quiesce: true,
        }
    }

    fn coordinator(members: usize, now: Instant) -> Coordinator {
        let mut c = Coordinator::new(CoordinatorConfig::default(), members, Saved::default());
        for m in 0..members {
            c.handle_link(m, up(2), now);
        }
        c
    }

    fn transmits(c: &mut Coordinator) -> Vec<(usize, HoldMessage)> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    fn events(c: &mut Coordinator) -> Vec<SpanEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn held(point: PointId, epoch: Epoch, marker: u64) -> HoldMessage {
        HoldMessage::Held(HeldReply {
            point,
            epoch,
            outcome: HeldOutcome::Held {
                marker: Seq(marker),
                generation: 1,
            },
        })
    }

    fn released(point: PointId, epoch: Epoch, how: ReleasedHow) -> HoldMessage {
        HoldMessage::Released(ReleasedReply {
            point,
            epoch,
            how,
            held: Duration::from_millis(1),
            gated_writes: 0,
        })
    }

    #[test]
    fn nothing_is_sent_before_the_point_id_is_saved() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        assert_eq!(c.epoch(), Epoch(1));
        let point = c.start_point(false, label(), now).unwrap();
        assert!(transmits(&mut c).is_empty());
        let saved = Saved {
            epoch: Epoch(1),
            next_point: PointId(point.0 + 1),
        };
        assert_eq!(events(&mut c), vec![SpanEvent::Save(saved)]);
        // An older save does not cover the point.
        c.handle_saved(Saved::default(), now);
        assert!(transmits(&mut c).is_empty());
        c.handle_saved(saved, now);
        let sent = transmits(&mut c);
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|(_, m)| matches!(m, HoldMessage::Open(o)
            if o.point == point && o.epoch == Epoch(1)
                // collect = clamp(2·2 + 10, 50, 300) ms; deadline = 50 + 2 + 10
                && o.deadline == Duration::from_millis(62))));
        // A restarted coordinator continues after what was saved.
        let next = Coordinator::new(CoordinatorConfig::default(), 2, saved);
        assert_eq!(next.epoch(), Epoch(2));
    }

    fn opened(c: &mut Coordinator, now: Instant) -> PointId {
        let point = c.start_point(false, label(), now).unwrap();
        for e in events(c) {
            if let SpanEvent::Save(s) = e {
                c.handle_saved(s, now);
            }
        }
        transmits(c);
        point
    }

    #[test]
    fn every_member_in_time_commits_and_then_waits_for_durability() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        let p = opened(&mut c, now);
        let e = c.epoch();
        c.handle_message(0, held(p, e, 10), now);
        assert!(transmits(&mut c).is_empty(), "released before all held");
        c.handle_message(1, held(p, e, 20), now);
        let sent = transmits(&mut c);
        assert!(sent
            .iter()
            .all(|(_, m)| matches!(m, HoldMessage::Release(r) if r.commit)));
        assert!(matches!(
            c.start_point(false, label(), now),
            Err(StartRefused::Busy(_))
        ));
        c.handle_message(0, released(p, e, ReleasedHow::InTime), now);
        c.handle_message(1, released(p, e, ReleasedHow::InTime), now);
        assert_eq!(
            events(&mut c),
            vec![SpanEvent::Committed {
                point: p,
                markers: vec![(Seq(10), 1), (Seq(20), 1)],
                app_consistent: false,
                not_quiesced: Vec::new(),
            }]
        );
        c.handle_durable(0, Seq(10), 1);
        c.handle_durable(1, Seq(20), 2); // another generation: not this marker
        assert!(events(&mut c).is_empty());
        c.handle_durable(1, Seq(20), 1);
        assert_eq!(events(&mut c), vec![SpanEvent::Durable { point: p }]);
    }

    #[test]
    fn an_expired_hold_aborts_the_point() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        let p = opened(&mut c, now);
        let e = c.epoch();
        c.handle_message(0, held(p, e, 10), now);
        c.handle_message(1, held(p, e, 20), now);
        transmits(&mut c);
        c.handle_message(0, released(p, e, ReleasedHow::InTime), now);
        c.handle_message(1, released(p, e, ReleasedHow::Expired), now);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Aborted {
                reason: AbortReason::NotInTime {
                    member: 1,
                    how: Some(ReleasedHow::Expired)
                },
                ..
            }]
        ));
    }

    #[test]
    fn a_refusal_releases_the_others_as_abandoned() {
        let now = Instant::now();
        let mut c = coordinator(3, now);
        let p = opened(&mut c, now);
        let e = c.epoch();
        c.handle_message(0, held(p, e, 10), now);
        c.handle_message(
            1,
            HoldMessage::Held(HeldReply {
                point: p,
                epoch: e,
                outcome: HeldOutcome::Refused {
                    code: RefuseCode::BitmapMode,
                    reason: "bitmap".into(),
                },
            }),
            now,
        );
        let sent = transmits(&mut c);
        assert_eq!(sent.len(), 3);
        assert!(sent
            .iter()
            .all(|(_, m)| matches!(m, HoldMessage::Release(r) if !r.commit)));
        // A late Held changes nothing.
        c.handle_message(2, held(p, e, 30), now);
        assert!(transmits(&mut c).is_empty());
        for m in 0..3 {
            c.handle_message(m, released(p, e, ReleasedHow::Aborted), now);
        }
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Aborted {
                reason: AbortReason::Refused { member: 1, .. },
                ..
            }]
        ));
        assert!(c.current().is_none());
    }

    #[test]
    fn silent_members_abort_at_the_collect_time() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        let p = opened(&mut c, now);
        c.handle_message(0, held(p, c.epoch(), 10), now);
        let by = c.poll_timeout().unwrap();
        assert_eq!(by, now + Duration::from_millis(50));
        c.handle_timeout(by);
        assert_eq!(transmits(&mut c).len(), 2);
        // Nobody answers the abort either: the round still ends.
        let end = c.poll_timeout().unwrap();
        c.handle_timeout(end);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Aborted {
                reason: AbortReason::Silent { members },
                ..
            }] if members == &vec![1]
        ));
        assert!(c.current().is_none());
    }

    #[test]
    fn no_point_without_every_member_connected() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        c.handle_link(1, Link::Down, now);
        assert_eq!(
            c.start_point(false, label(), now),
            Err(StartRefused::MemberDown(1))
        );
        c.handle_link(
            1,
            Link::Up {
                rtt: Duration::ZERO,
                holds: false,
                quiesce: false,
            },
            now,
        );
        assert_eq!(
            c.start_point(false, label(), now),
            Err(StartRefused::MemberTooOld(1))
        );
        // A member lost during the round aborts it; the others are released.
        c.handle_link(1, up(1), now);
        let p = opened(&mut c, now);
        c.handle_link(1, Link::Down, now);
        let sent = transmits(&mut c);
        assert_eq!(sent.len(), 1);
        c.handle_message(0, released(p, c.epoch(), ReleasedHow::Aborted), now);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Aborted {
                reason: AbortReason::LinkLost(1),
                ..
            }]
        ));
    }

    #[test]
    fn a_point_not_durable_in_time_is_abandoned() {
        let now = Instant::now();
        let mut c = coordinator(1, now);
        let p = opened(&mut c, now);
        c.handle_message(0, held(p, c.epoch(), 10), now);
        transmits(&mut c);
        c.handle_message(0, released(p, c.epoch(), ReleasedHow::InTime), now);
        events(&mut c);
        let by = c.poll_timeout().unwrap();
        assert_eq!(by, now + CoordinatorConfig::default().durable_timeout);
        c.handle_timeout(by);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Aborted {
                reason: AbortReason::NotDurable(0),
                ..
            }]
        ));
    }

    fn quiesced(point: PointId, epoch: Epoch, ok: bool) -> HoldMessage {
        HoldMessage::Quiesced(QuiescedReply {
            point,
            epoch,
            outcome: if ok {
                QuiescedOutcome::Quiesced
            } else {
                QuiescedOutcome::NotQuiesced {
                    reason: "pre-hook `db-flush` failed".into(),
                }
            },
        })
    }

    fn thawed(point: PointId, epoch: Epoch, how: ThawedHow) -> HoldMessage {
        HoldMessage::Thawed(ThawedReply {
            point,
            epoch,
            how,
            note: String::new(),
        })
    }

    /// Starts an application-consistent round and saves its id; returns
    /// the point and what was sent.
    fn quiescing(c: &mut Coordinator, now: Instant) -> (PointId, Vec<(usize, HoldMessage)>) {
        let point = c.start_point(true, label(), now).unwrap();
        for e in events(c) {
            if let SpanEvent::Save(s) = e {
                c.handle_saved(s, now);
            }
        }
        (point, transmits(c))
    }

    fn kinds(sent: &[(usize, HoldMessage)]) -> Vec<(usize, &'static str)> {
        sent.iter()
            .map(|(m, msg)| {
                let kind = match msg {
                    HoldMessage::Open(o) if o.app_consistent => "open-app",
                    HoldMessage::Open(_) => "open",
                    HoldMessage::Release(_) => "release",
                    HoldMessage::Quiesce(_) => "quiesce",
                    HoldMessage::Thaw(_) => "thaw",
                    _ => "answer",
                };
                (*m, kind)
            })
            .collect()
    }

    #[test]
    fn an_app_consistent_point_quiesces_all_then_holds_then_releases_then_thaws() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        let (p, sent) = quiescing(&mut c, now);
        let e = c.epoch();
        assert_eq!(kinds(&sent), vec![(0, "quiesce"), (1, "quiesce")]);
        assert!(sent.iter().all(|(_, m)| matches!(m, HoldMessage::Quiesce(q)
            if q.timeout == CoordinatorConfig::default().quiesce_timeout)));
        // The quiesce has its own, long, collect time: not the hold's.
        let by = c.poll_timeout().unwrap();
        assert_eq!(
            by,
            now + Duration::from_secs(30) + Duration::from_millis(4 + 10)
        );
        let later = now + Duration::from_secs(5);
        c.handle_message(0, quiesced(p, e, true), later);
        assert!(transmits(&mut c).is_empty(), "opened before all quiesced");
        c.handle_message(1, quiesced(p, e, true), later);
        let sent = transmits(&mut c);
        assert_eq!(kinds(&sent), vec![(0, "open-app"), (1, "open-app")]);
        // The hold's window is sized from the round trip, from the open.
        assert_eq!(c.poll_timeout(), Some(later + Duration::from_millis(50)));
        c.handle_message(0, held(p, e, 10), later);
        c.handle_message(1, held(p, e, 20), later);
        let sent = transmits(&mut c);
        assert_eq!(
            kinds(&sent),
            vec![(0, "release"), (1, "release"), (0, "thaw"), (1, "thaw")],
            "each member's thaw follows its release"
        );
        c.handle_message(0, released(p, e, ReleasedHow::InTime), later);
        c.handle_message(1, released(p, e, ReleasedHow::InTime), later);
        c.handle_message(0, thawed(p, e, ThawedHow::InTime), later);
        assert!(events(&mut c).is_empty(), "ended before every thaw answer");
        c.handle_message(1, thawed(p, e, ThawedHow::InTime), later);
        assert_eq!(
            events(&mut c),
            vec![SpanEvent::Committed {
                point: p,
                markers: vec![(Seq(10), 1), (Seq(20), 1)],
                app_consistent: true,
                not_quiesced: Vec::new(),
            }]
        );
        assert!(c.current().is_none());
    }

    #[test]
    fn a_member_that_cannot_quiesce_makes_the_point_crash_consistent() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        let (p, _) = quiescing(&mut c, now);
        let e = c.epoch();
        c.handle_message(0, quiesced(p, e, true), now);
        c.handle_message(1, quiesced(p, e, false), now);
        let sent = transmits(&mut c);
        // Its marker is not asked to be app-consistent; the other's is.
        assert_eq!(kinds(&sent), vec![(0, "open-app"), (1, "open")]);
        c.handle_message(0, held(p, e, 10), now);
        c.handle_message(1, held(p, e, 20), now);
        let sent = transmits(&mut c);
        assert_eq!(
            kinds(&sent),
            vec![(0, "release"), (1, "release"), (0, "thaw"), (1, "thaw")]
        );
        for m in 0..2 {
            c.handle_message(m, released(p, e, ReleasedHow::InTime), now);
        }
        c.handle_message(0, thawed(p, e, ThawedHow::InTime), now);
        c.handle_message(1, thawed(p, e, ThawedHow::Unknown), now);
        match &events(&mut c)[..] {
            [SpanEvent::Committed {
                app_consistent: false,
                not_quiesced,
                ..
            }] => {
                assert_eq!(not_quiesced.len(), 1);
                assert_eq!(not_quiesced[0].member, 1);
                assert!(
                    not_quiesced[0].reason.contains("db-flush"),
                    "{not_quiesced:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_quiesce_that_expired_before_the_thaw_is_no_app_consistent_point() {
        let now = Instant::now();
        let mut c = coordinator(1, now);
        let (p, _) = quiescing(&mut c, now);
        let e = c.epoch();
        c.handle_message(0, quiesced(p, e, true), now);
        c.handle_message(0, held(p, e, 10), now);
        c.handle_message(0, released(p, e, ReleasedHow::InTime), now);
        c.handle_message(0, thawed(p, e, ThawedHow::Expired), now);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Committed { app_consistent: false, not_quiesced, .. }]
                if not_quiesced[0].reason.contains("own timeout")
        ));
    }

    #[test]
    fn an_old_member_is_not_asked_to_quiesce_and_the_point_is_crash_consistent() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        c.handle_link(
            1,
            Link::Up {
                rtt: Duration::from_millis(2),
                holds: true,
                quiesce: false,
            },
            now,
        );
        let (p, sent) = quiescing(&mut c, now);
        let e = c.epoch();
        assert_eq!(kinds(&sent), vec![(0, "quiesce")]);
        c.handle_message(0, quiesced(p, e, true), now);
        assert_eq!(
            kinds(&transmits(&mut c)),
            vec![(0, "open-app"), (1, "open")]
        );
        c.handle_message(0, held(p, e, 10), now);
        c.handle_message(1, held(p, e, 20), now);
        // Only the member asked to quiesce is told to thaw.
        assert_eq!(
            kinds(&transmits(&mut c)),
            vec![(0, "release"), (1, "release"), (0, "thaw")]
        );
        c.handle_message(0, released(p, e, ReleasedHow::InTime), now);
        c.handle_message(1, released(p, e, ReleasedHow::InTime), now);
        c.handle_message(0, thawed(p, e, ThawedHow::InTime), now);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Committed { app_consistent: false, not_quiesced, .. }]
                if not_quiesced.len() == 1 && not_quiesced[0].member == 1
        ));
    }

    #[test]
    fn a_silent_quiesce_aborts_before_any_hold_and_thaws_everyone() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        let (p, _) = quiescing(&mut c, now);
        let e = c.epoch();
        c.handle_message(0, quiesced(p, e, true), now);
        let by = c.poll_timeout().unwrap();
        c.handle_timeout(by - Duration::from_millis(1));
        assert!(transmits(&mut c).is_empty());
        c.handle_timeout(by);
        assert_eq!(kinds(&transmits(&mut c)), vec![(0, "thaw"), (1, "thaw")]);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Aborted {
                reason: AbortReason::SilentQuiesce { members },
                ..
            }] if members == &vec![1]
        ));
        assert!(c.current().is_none());
        // A late answer is stale.
        c.handle_message(1, quiesced(p, e, true), by);
        assert!(transmits(&mut c).is_empty());
    }

    #[test]
    fn a_member_lost_while_quiescing_aborts_and_the_others_thaw() {
        let now = Instant::now();
        let mut c = coordinator(3, now);
        let (p, _) = quiescing(&mut c, now);
        c.handle_message(0, quiesced(p, c.epoch(), true), now);
        c.handle_link(2, Link::Down, now);
        assert_eq!(kinds(&transmits(&mut c)), vec![(0, "thaw"), (1, "thaw")]);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Aborted {
                reason: AbortReason::LinkLost(2),
                ..
            }]
        ));
    }

    #[test]
    fn a_member_lost_during_the_hold_still_thaws_the_others_and_the_round_ends() {
        let now = Instant::now();
        let mut c = coordinator(2, now);
        let (p, _) = quiescing(&mut c, now);
        let e = c.epoch();
        c.handle_message(0, quiesced(p, e, true), now);
        c.handle_message(1, quiesced(p, e, true), now);
        transmits(&mut c);
        c.handle_message(0, held(p, e, 10), now);
        c.handle_link(1, Link::Down, now);
        assert_eq!(kinds(&transmits(&mut c)), vec![(0, "release"), (0, "thaw")]);
        c.handle_message(0, released(p, e, ReleasedHow::Aborted), now);
        assert!(events(&mut c).is_empty(), "the thaw answer is awaited");
        c.handle_message(0, thawed(p, e, ThawedHow::InTime), now);
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Aborted {
                reason: AbortReason::LinkLost(1),
                ..
            }]
        ));
    }

    #[test]
    fn unanswered_thaws_end_the_round_by_the_quiesce_allowance() {
        let now = Instant::now();
        let mut c = coordinator(1, now);
        let (p, _) = quiescing(&mut c, now);
        let e = c.epoch();
        c.handle_message(0, quiesced(p, e, true), now);
        c.handle_message(0, held(p, e, 10), now);
        c.handle_message(0, released(p, e, ReleasedHow::InTime), now);
        let end = c.poll_timeout().unwrap();
        assert!(end >= now + CoordinatorConfig::default().quiesce_timeout);
        c.handle_timeout(end);
        // The holds were in time: committed, but not app-consistent.
        assert!(matches!(
            &events(&mut c)[..],
            [SpanEvent::Committed { app_consistent: false, not_quiesced, .. }]
                if not_quiesced[0].reason.contains("did not answer the thaw")
        ));
    }
}
