//! The write path of one queue (an NBD connection, a ublk queue) as a
//! sans-IO core: [`GroupQueue`] takes requests and I/O completions and
//! gives out backing-device I/O and replies ([`crate::queue::Queue`]),
//! following the group's rules ([`crate::group`], DESIGN invariants 1–8)
//! without ever blocking its thread.
//!
//! A modifying request (write, write-zeroes, trim) goes through:
//!
//! ```text
//!  Range ──► Map ──► Record ──► Device ──► (FUA: Barrier) ──► reply
//!   │         │        │          │
//!   │ parked  │parked  │ parked   │ I/O on the shell's ring; the record
//!   │ while an│ until  │ while the│ is already in the log's buffer, which
//!   │ overlap-│ the    │ log's    │ the committer writes out in groups
//!   │ ping    │ activ- │ buffer is│ meanwhile: the reply waits only for
//!   │ range is│ ity map│ full     │ the device (and, with FUA, the
//!   ▼ held    │ is     ▼          ▼ barrier)
//!   (inv. 6)  │ durable
//! ```
//!
//! The log append and the device write are thus under way together
//! (DESIGN invariant 1): appending is a copy into the log's buffer, with
//! its CRC, taken just before the device I/O is handed to the shell, and
//! nothing waits for one before starting the other. The sequence number
//! is taken before the device I/O is submitted, so a write acknowledged
//! before another was submitted has the smaller one (invariant 2); the
//! range lock spans both (invariant 6).
//!
//! **A device write that fails after its record was appended** is
//! answered with its error, and a resync-needed record for its range
//! follows it in the log (stage `Compensate`, which parks while the log's
//! buffer is full; in bitmap mode the range's dirty bits do the same). A
//! failed write leaves its range undefined on any disk (the device may
//! have written part of it), so the replica must take the range from what
//! the source disk really holds, not from the record: the shipper's
//! checksum resync of a resync-needed range does exactly that. Like a
//! write in flight at a crash, the failed write may show in a point taken
//! while it was in flight; from the resync-needed record on, replica and
//! source agree again. The range also stays hot in the activity map, so
//! a crash before the compensation is durable re-reads it too.
//!
//! A FLUSH (or the FUA part of a write) is a barrier: the barrier record
//! goes into the log and the committer is asked for it to be durable; the
//! device flush is I/O of this queue, beside it; the reply waits for both.
//! Reads go straight to the device.
//!
//! Parked requests stay in the core; the queue parks its waker on the group
//! and tries them again, in arrival order, when woken. The core never
//! holds a lock across I/O: every call into the group is a short critical
//! section.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_changelog::{DiskId, Entry, Seq};

use crate::backend::BackendError;
use crate::group::{BarrierWait, Group, Recorded, NEVER_COOLS};
use crate::queue::{Io, IoKind, Op, Queue, QueueWaker, Reply, Request};
use crate::range_lock::RangeTicket;
use crate::storage::AlignedBuf;

/// The group's queue core (see the [module documentation](self)).
pub struct GroupQueue {
    group: Arc<Group>,
    waker: Arc<QueueWaker>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Slots waiting on the group, in arrival order.
    parked: VecDeque<usize>,
    ios: VecDeque<Io>,
    replies: VecDeque<Reply>,
    in_flight: usize,
    /// Wall clock at `anchor`, for record timestamps (the core reads no
    /// clock: `now` comes in with every event).
    wall_anchor_ns: u64,
    anchor: Instant,
}

struct Slot {
    id: u64,
    disk: DiskId,
    op: Op,
    /// The request's range ([`GroupQueue::extent`]).
    offset: u64,
    len: u64,
    buf: Option<AlignedBuf>,
    started: Instant,
    /// Wall clock at arrival, ns since the epoch: the record's timestamp.
    timestamp_ns: u64,
    stage: Stage,
    range: Option<RangeTicket>,
    /// Why its device I/O (a modification, or a barrier's flush) failed:
    /// the answer once the stage allows one.
    failed: Option<BackendError>,
    /// A modification's record ([`Seq::ZERO`] until recorded, and in
    /// bitmap mode): what an open hold's gate compares.
    seq: Seq,
}

#[derive(Debug, Clone, Copy)]
enum Stage {
    /// Parked until its range is free.
    Range,
    /// Parked until the activity map is durable up to the ticket.
    Map(u64),
    /// Parked until the log's buffer has room for its record.
    Record,
    /// Its record is in (sequence number `seq`; [`Seq::ZERO`] in bitmap
    /// mode) and its device I/O in flight.
    Device { seq: Seq },
    /// Written (and with FUA, flushed): parked until the open hold lets
    /// its acknowledgement go ([`Group::held_back`]), then answered.
    Held { seq: Seq, counted: bool },
    /// Its device I/O failed: parked until the log's buffer has room for
    /// the resync-needed record of its range; then answered with the
    /// failure ([`Slot::failed`]).
    Compensate,
    /// A read in flight.
    Read,
    /// A barrier: the device flush `epoch` and the log (or dirty bitmap).
    Barrier {
        epoch: u64,
        wait: BarrierWait,
        /// The device flush completed (a failure is [`Slot::failed`]).
        flushed: bool,
    },
}

/// What trying to move a request on found.
enum Progress {
    /// It is waiting for I/O or was answered.
    Moved,
    /// It waits on the group.
    Blocked,
}

impl GroupQueue {
    /// A queue of `group`, woken through `waker` (registered with the
    /// group here).
    pub fn new(group: Arc<Group>, waker: Arc<QueueWaker>, now: Instant) -> GroupQueue {
        group.register_waker(&waker);
        GroupQueue {
            group,
            waker,
            slots: Vec::new(),
            free: Vec::new(),
            parked: VecDeque::new(),
            ios: VecDeque::new(),
            replies: VecDeque::new(),
            in_flight: 0,
            wall_anchor_ns: tidemark_changelog::now_ns(),
            anchor: now,
        }
    }

    fn wall_ns(&self, now: Instant) -> u64 {
        let since = now
            .checked_duration_since(self.anchor)
            .unwrap_or(Duration::ZERO);
        self.wall_anchor_ns
            .saturating_add(u64::try_from(since.as_nanos()).unwrap_or(u64::MAX))
    }

    fn slot(&mut self, token: usize) -> &mut Slot {
        match self.slots.get_mut(token).and_then(Option::as_mut) {
            Some(slot) => slot,
            None => unreachable!("a token names a live slot"),
        }
    }

    /// Answers and frees a slot.
    fn answer(&mut self, token: usize, result: Result<(), BackendError>) {
        if let Some(slot) = self.slots.get_mut(token).and_then(Option::take) {
            self.free.push(token);
            self.in_flight -= 1;
            self.replies.push_back(Reply {
                id: slot.id,
                result,
                buf: slot.buf,
            });
        }
    }

    /// The range of a request (a write's length is its buffer's, which the
    /// shell holds while the write is in flight: it is taken on arrival).
    fn extent(op: &Op, buf: Option<&AlignedBuf>) -> (u64, u64) {
        match *op {
            Op::Write { offset, .. } => (offset, buf.map_or(0, |b| b.len() as u64)),
            Op::WriteZeroes { offset, len, .. } | Op::Trim { offset, len, .. } => (offset, len),
            Op::Read { offset, len } => (offset, u64::from(len)),
            Op::Flush => (0, 0),
        }
    }

    /// Moves a modifying request or barrier on as far as it goes now.
    fn advance(&mut self, token: usize, now: Instant) -> Progress {
        loop {
            let slot = self.slot(token);
            let (disk, op, stage) = (slot.disk, slot.op, slot.stage);
            let (offset, len) = (slot.offset, slot.len);
            match stage {
                Stage::Range => {
                    let Some(ticket) = self.group.try_lock_range(disk, offset, len) else {
                        return Progress::Blocked;
                    };
                    let next = match self.group.mark_hot(disk, offset, len) {
                        Some(map_ticket) => Stage::Map(map_ticket),
                        None => Stage::Record,
                    };
                    let slot = self.slot(token);
                    slot.range = Some(ticket);
                    slot.stage = next;
                }
                Stage::Map(ticket) => match self.group.maps_ready(ticket) {
                    None => return Progress::Blocked,
                    Some(Err(error)) => {
                        tracing::error!("persisting the activity map failed; failing the write");
                        self.release(token, NEVER_COOLS);
                        self.answer(token, Err(error));
                        return Progress::Moved;
                    }
                    Some(Ok(())) => self.slot(token).stage = Stage::Record,
                },
                Stage::Record => {
                    let Some(slot) = self.slots.get(token).and_then(Option::as_ref) else {
                        unreachable!("a token names a live slot")
                    };
                    let ts = slot.timestamp_ns;
                    let entry = match op {
                        Op::Write { offset, .. } => {
                            Entry::write(disk, offset, slot.buf.as_deref().unwrap_or(&[]), ts)
                        }
                        Op::WriteZeroes {
                            offset,
                            len,
                            no_hole,
                            ..
                        } => Entry::write_zeroes(disk, offset, len, no_hole, ts),
                        Op::Trim { offset, len, .. } => Entry::trim(disk, offset, len, ts),
                        Op::Read { .. } | Op::Flush => {
                            unreachable!("only modifications are recorded")
                        }
                    };
                    let seq = match self.group.record(disk, &entry) {
                        Recorded::Logged(seq) => seq,
                        Recorded::Dirty => Seq::ZERO,
                        Recorded::NoRoom => return Progress::Blocked,
                    };
                    // The record is in the log's buffer: the device write
                    // goes out now, beside the log's write-out.
                    let slot = self.slot(token);
                    slot.stage = Stage::Device { seq };
                    slot.seq = seq;
                    self.issue(token);
                    return Progress::Moved;
                }
                Stage::Compensate => {
                    let entry = Entry::resync_needed(disk, offset, len, self.wall_ns(now));
                    if let Recorded::NoRoom = self.group.record(disk, &entry) {
                        return Progress::Blocked;
                    }
                    // The extent stays hot (never cooled), so a crash
                    // before the compensation is durable re-reads it too.
                    self.release(token, NEVER_COOLS);
                    let failed = self.slot(token).failed.take();
                    self.answer(token, Err(failed.unwrap_or(BackendError::Unavailable)));
                    return Progress::Moved;
                }
                Stage::Barrier {
                    epoch,
                    mut wait,
                    flushed,
                } => {
                    let ready = self.group.barrier_ready(&mut wait);
                    self.slot(token).stage = Stage::Barrier {
                        epoch,
                        wait,
                        flushed,
                    };
                    // The device flush is this queue's I/O: nothing is
                    // answered while it is in flight.
                    if !flushed {
                        return Progress::Moved;
                    }
                    let outcome = match (self.slot(token).failed.take(), ready) {
                        (Some(error), _) | (None, Some(Err(error))) => Err(error),
                        (None, Some(Ok(()))) => Ok(()),
                        (None, None) => return Progress::Blocked,
                    };
                    if outcome.is_ok() {
                        self.group.end_barrier(disk, epoch);
                        if !matches!(op, Op::Flush) {
                            // A FUA modification: answered as any other
                            // once written, through the hold's gate.
                            let seq = self.slot(token).seq;
                            self.slot(token).stage = Stage::Held {
                                seq,
                                counted: false,
                            };
                            continue;
                        }
                    }
                    self.answer(token, outcome);
                    return Progress::Moved;
                }
                Stage::Held { seq, counted } => {
                    if self.group.held_back(seq) {
                        if !counted {
                            self.group.count_gated();
                            self.slot(token).stage = Stage::Held { seq, counted: true };
                        }
                        return Progress::Blocked;
                    }
                    self.acknowledge(token, now);
                    return Progress::Moved;
                }
                Stage::Device { .. } | Stage::Read => return Progress::Moved,
            }
        }
    }

    /// Submits a modification's device I/O.
    fn issue(&mut self, token: usize) {
        let slot = self.slot(token);
        let (disk, op) = (slot.disk, slot.op);
        let (kind, buf) = match op {
            Op::Write { offset, .. } => (IoKind::Write { offset }, slot.buf.take()),
            Op::WriteZeroes { offset, len, .. } => (IoKind::WriteZeroes { offset, len }, None),
            Op::Trim { offset, len, .. } => (IoKind::Trim { offset, len }, None),
            Op::Read { .. } | Op::Flush => unreachable!("not a modification"),
        };
        self.ios.push_back(Io {
            token: token as u64,
            disk,
            kind,
            buf,
        });
    }

    /// A modification's device I/O completed and its record (sequence
    /// number `seq`) is in: it is answered, or with FUA its barrier starts.
    fn written(&mut self, token: usize, seq: Seq, now: Instant) {
        self.release(token, seq);
        if op_fua(&self.slot(token).op) {
            // The write's own part is done; its latency counts the barrier
            // too, when the barrier answers it (its device flush is in
            // flight now: nothing else to try before it completes).
            self.start_barrier(token);
            return;
        }
        if !self.group.held_back(seq) {
            self.acknowledge(token, now);
            return;
        }
        // An open hold keeps its answer (its range and extents are let go
        // already: a held reply holds no lock).
        self.slot(token).stage = Stage::Held {
            seq,
            counted: false,
        };
        self.advance_or_park(token, now);
    }

    /// Answers a modification that was written (and, with FUA, flushed),
    /// counting it.
    fn acknowledge(&mut self, token: usize, now: Instant) {
        let slot = self.slot(token);
        let bytes = match slot.op {
            Op::Write { .. } => slot.len,
            _ => 0,
        };
        let started = slot.started;
        self.group.count_write(started, now, bytes);
        self.answer(token, Ok(()));
    }

    /// Starts the barrier of a FLUSH or of a FUA modification whose record
    /// is in.
    fn start_barrier(&mut self, token: usize) {
        let disk = self.slot(token).disk;
        let (epoch, wait) = self.group.begin_barrier(disk);
        self.slot(token).stage = Stage::Barrier {
            epoch,
            wait,
            flushed: false,
        };
        self.ios.push_back(Io {
            token: token as u64,
            disk,
            kind: IoKind::Flush,
            buf: None,
        });
    }

    /// Lets go of a modification's range and extents; `seq` as for
    /// [`Group::release_hot`].
    fn release(&mut self, token: usize, seq: Seq) {
        let slot = self.slot(token);
        let disk = slot.disk;
        let (offset, len) = (slot.offset, slot.len);
        let range = slot.range.take();
        self.group.release_hot(disk, offset, len, seq);
        if let Some(ticket) = range {
            self.group.unlock_range(disk, ticket);
        }
    }

    /// Moves a request on; if it now waits on the group, parks it behind
    /// the others (and tries those again, in order).
    fn advance_or_park(&mut self, token: usize, now: Instant) {
        if let Progress::Blocked = self.advance(token, now) {
            self.parked.push_back(token);
            self.retry_parked(now);
        }
    }

    /// Tries every parked request again, in order; parks the queue first
    /// so that a change made meanwhile wakes it.
    fn retry_parked(&mut self, now: Instant) {
        if self.parked.is_empty() {
            return;
        }
        self.group.park(&self.waker);
        let parked = std::mem::take(&mut self.parked);
        for token in parked {
            if matches!(self.advance(token, now), Progress::Blocked) {
                self.parked.push_back(token);
            }
        }
    }
}

fn op_fua(op: &Op) -> bool {
    match *op {
        Op::Write { fua, .. } | Op::WriteZeroes { fua, .. } | Op::Trim { fua, .. } => fua,
        Op::Read { .. } | Op::Flush => false,
    }
}

impl Queue for GroupQueue {
    fn handle_request(&mut self, request: Request, now: Instant) {
        let Request { id, disk, op, buf } = request;
        // Nothing changes the disks or the log before the group runs (see
        // `Group::mark_running`).
        let refused = match op {
            Op::Read { .. } => self.group.disk(disk).err(),
            _ => self
                .group
                .disk(disk)
                .err()
                .or_else(|| self.group.check_running().err()),
        };
        let (offset, len) = Self::extent(&op, buf.as_ref());
        // Within the size served now: the frontends check the size their
        // client was told, which a resize never makes smaller.
        let refused = refused.or_else(|| match op {
            Op::Flush => None,
            _ => self.group.check_extent(disk, offset, len).err(),
        });
        if let Some(error) = refused {
            self.replies.push_back(Reply {
                id,
                result: Err(error),
                buf,
            });
            return;
        }
        let stage = match op {
            Op::Read { .. } => Stage::Read,
            Op::Flush => Stage::Range, // replaced by the barrier below
            Op::Write { .. } | Op::WriteZeroes { .. } | Op::Trim { .. } => Stage::Range,
        };
        let slot = Slot {
            id,
            disk,
            op,
            offset,
            len,
            buf,
            started: now,
            timestamp_ns: self.wall_ns(now),
            stage,
            range: None,
            failed: None,
            seq: Seq::ZERO,
        };
        let token = match self.free.pop() {
            Some(token) => {
                self.slots[token] = Some(slot);
                token
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.in_flight += 1;
        match op {
            Op::Read { offset, .. } => {
                let buf = self.slot(token).buf.take();
                self.ios.push_back(Io {
                    token: token as u64,
                    disk,
                    kind: IoKind::Read { offset },
                    buf,
                });
            }
            Op::Flush => {
                self.start_barrier(token);
            }
            Op::Write { .. } | Op::WriteZeroes { .. } | Op::Trim { .. } => {
                // Requests already parked go first: a later one must not
                // overtake an earlier one of the same queue forever.
                if self.parked.is_empty() {
                    self.advance_or_park(token, now);
                } else {
                    self.parked.push_back(token);
                    self.retry_parked(now);
                }
            }
        }
    }

    fn handle_io(
        &mut self,
        token: u64,
        result: Result<(), BackendError>,
        buf: Option<AlignedBuf>,
        now: Instant,
    ) {
        let token = token as usize;
        let Some(slot) = self.slots.get_mut(token).and_then(Option::as_mut) else {
            tracing::error!(token, "I/O completion for no request");
            return;
        };
        if buf.is_some() {
            slot.buf = buf;
        }
        match slot.stage {
            Stage::Read => self.answer(token, result),
            Stage::Device { seq } => match result {
                Ok(()) => self.written(token, seq, now),
                Err(error) => {
                    let slot = self.slot(token);
                    slot.failed = Some(error);
                    slot.stage = Stage::Compensate;
                    self.advance_or_park(token, now);
                }
            },
            Stage::Barrier { epoch, wait, .. } => {
                slot.stage = Stage::Barrier {
                    epoch,
                    wait,
                    flushed: true,
                };
                slot.failed = result.err();
                self.advance_or_park(token, now);
            }
            Stage::Range
            | Stage::Map(_)
            | Stage::Record
            | Stage::Compensate
            | Stage::Held { .. } => {
                tracing::error!(token, "I/O completion for a request not waiting for one");
            }
        }
    }

    fn handle_wake(&mut self, now: Instant) {
        self.retry_parked(now);
    }

    fn poll_io(&mut self) -> Option<Io> {
        self.ios.pop_front()
    }

    fn poll_reply(&mut self) -> Option<Reply> {
        self.replies.pop_front()
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.replies.len()
    }
}
