//! The quiesce phase of an application-consistent span point on this
//! tracker (the protocol is `tidemark_span`'s): a `hold-quiesce` runs the
//! group's `[tracker.app-consistent]` quiesce (pre-hooks, freeze, guest
//! agent; [`Quiesce`]) on a thread of its own and answers once everything
//! is frozen; the span's hold then writes its marker while it stays
//! frozen; `hold-thaw` thaws and runs the post-hooks.
//!
//! A quiesce always ends by itself: [`Quiesce`]'s watchdog thaws at its
//! timeout (the tracker's own, or the coordinator's if shorter) whatever
//! the coordinator does, and the hold session closing, a newer
//! coordinator's quiesce and the tracker stopping thaw at once. So no lost
//! message, link or coordinator leaves a filesystem frozen.

use crate::quiesce::{GuestAgentOutcome, Quiesce, QuiesceError, QuiesceReport};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tidemark_changelog::Seq;
use tidemark_span::{
    Epoch, PointId, QuiesceHold, QuiescedOutcome, QuiescedReply, ThawHold, ThawedHow, ThawedReply,
};

/// Extra time, past the quiesce's own timeout, that an answer is waited
/// for: the watchdog has thawed by then, so only a stuck hook or agent
/// call is left to wait for.
const ANSWER_SLACK: Duration = Duration::from_secs(2);

/// What the quiesce thread says.
enum Progress {
    /// Everything is frozen; the thread waits for the thaw.
    Frozen,
    /// The guest agent did not answer: nothing of the guest is frozen,
    /// the thread thaws the rest at once.
    NoAgent(String),
}

/// A quiesce in force (or ended by its watchdog, not yet told).
struct Active {
    point: PointId,
    epoch: Epoch,
    /// Until when the quiesce holds (its watchdog thaws then).
    until: Instant,
    /// Dropped or sent to: thaw now.
    thaw: Option<mpsc::Sender<()>>,
    thread: JoinHandle<Result<QuiesceReport, QuiesceError>>,
}

/// The tracker's span quiesce: at most one at a time.
pub struct SpanQuiesce {
    config: Option<Quiesce>,
    active: Option<Active>,
    epoch_seen: Epoch,
}

impl SpanQuiesce {
    /// `config`: what the group quiesces (`None`, or nothing in it:
    /// every quiesce is answered not quiesced).
    pub fn new(config: Option<Quiesce>) -> Self {
        SpanQuiesce {
            config,
            active: None,
            epoch_seen: Epoch::default(),
        }
    }

    /// Quiesces for `asked`; returns once frozen (or why not).
    pub fn quiesce(&mut self, asked: &QuiesceHold) -> QuiescedReply {
        let reply = |outcome| QuiescedReply {
            point: asked.point,
            epoch: asked.epoch,
            outcome,
        };
        let not = |reason: String| reply(QuiescedOutcome::NotQuiesced { reason });
        if let Some(a) = &self.active {
            if a.point == asked.point && a.epoch == asked.epoch {
                // A duplicate: the quiesce in force answers it.
                return if Instant::now() < a.until && !a.thread.is_finished() {
                    reply(QuiescedOutcome::Quiesced)
                } else {
                    not("the quiesce of this point has ended".into())
                };
            }
        }
        if asked.epoch < self.epoch_seen {
            return not(format!(
                "coordinator epoch {} is older than epoch {} seen already",
                asked.epoch.0, self.epoch_seen.0
            ));
        }
        self.epoch_seen = asked.epoch;
        // A newer point (or coordinator): whatever was quiesced for the
        // old one is thawed first.
        self.end();
        let Some(config) = self.config.clone().filter(quiesces_something) else {
            return not(
                "nothing to quiesce: [tracker.app-consistent] names no hook, filesystem or guest agent"
                    .into(),
            );
        };
        let mut config = config;
        config.timeout = config.timeout.min(asked.timeout);
        let timeout = config.timeout;
        let started = Instant::now();
        let (progress_tx, progress_rx) = mpsc::channel();
        let (thaw_tx, thaw_rx) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("tracker-quiesce".into())
            .spawn(move || {
                config.run(|left, app_consistent| {
                    if !app_consistent {
                        let _ = progress_tx.send(Progress::NoAgent(
                            "no guest agent answered: the guest is not frozen".into(),
                        ));
                        return Ok(Seq(0));
                    }
                    let _ = progress_tx.send(Progress::Frozen);
                    // Frozen until the thaw, the session's end (the sender
                    // dropped) or the deadline (the watchdog thaws, and the
                    // run reports it timed out).
                    let _ = thaw_rx.recv_timeout(left);
                    Ok(Seq(0))
                })
            });
        let thread = match spawned {
            Ok(t) => t,
            Err(e) => return not(format!("cannot start the quiesce: {e}")),
        };
        let answer = progress_rx.recv_timeout(timeout + ANSWER_SLACK);
        let active = Active {
            point: asked.point,
            epoch: asked.epoch,
            until: started + timeout,
            thaw: Some(thaw_tx),
            thread,
        };
        match answer {
            Ok(Progress::Frozen) => {
                self.active = Some(active);
                reply(QuiescedOutcome::Quiesced)
            }
            Ok(Progress::NoAgent(reason)) => {
                let _ = finish(active);
                not(reason)
            }
            Err(_) => {
                // The run ended without freezing (a pre-hook or a freeze
                // failed, the deadline passed): its error says why.
                let reason = match finish(active) {
                    Err(e) => e.to_string(),
                    Ok(_) => format!("not frozen within {timeout:?}"),
                };
                not(reason)
            }
        }
    }

    /// Whether `point` of `epoch` is quiesced now: its marker may be
    /// written application-consistent.
    pub fn frozen_for(&self, point: PointId, epoch: Epoch) -> bool {
        self.active.as_ref().is_some_and(|a| {
            a.point == point
                && a.epoch == epoch
                && Instant::now() < a.until
                && !a.thread.is_finished()
        })
    }

    /// Thaws for `thaw`; returns once thawed and the post-hooks ran.
    pub fn thaw(&mut self, thaw: &ThawHold) -> ThawedReply {
        let mut reply = ThawedReply {
            point: thaw.point,
            epoch: thaw.epoch,
            how: ThawedHow::Unknown,
            note: String::new(),
        };
        let ours = self
            .active
            .as_ref()
            .is_some_and(|a| a.point == thaw.point && a.epoch == thaw.epoch);
        if !ours {
            return reply;
        }
        let active = self.active.take().expect("checked above");
        match finish(active) {
            Ok(report) => {
                reply.how = ThawedHow::InTime;
                reply.note = report.post_hook_failures.join("; ");
                if let GuestAgentOutcome::Absent { reason } = report.guest_agent {
                    reply.note = reason;
                }
            }
            Err(QuiesceError::TimedOut(_)) => reply.how = ThawedHow::Expired,
            Err(e) => {
                // Thawed late or not at all by the guest agent: say so.
                reply.how = ThawedHow::InTime;
                reply.note = e.to_string();
            }
        }
        reply
    }

    /// The hold session closed (or the tracker stops): thaw at once.
    pub fn end(&mut self) {
        if let Some(active) = self.active.take() {
            tracing::warn!(
                point = active.point.0,
                "a span quiesce ended without its thaw: thawing"
            );
            if let Err(e) = finish(active) {
                tracing::warn!(error = %e, "the span quiesce did not end cleanly");
            }
        }
    }
}

impl Drop for SpanQuiesce {
    fn drop(&mut self) {
        self.end();
    }
}

/// Tells the quiesce thread to thaw and waits for it (it is bounded by
/// the quiesce's timeout and the post-hooks' own).
fn finish(mut active: Active) -> Result<QuiesceReport, QuiesceError> {
    drop(active.thaw.take());
    match active.thread.join() {
        Ok(result) => result,
        Err(_) => Err(QuiesceError::TimedOut(Duration::ZERO)),
    }
}

fn quiesces_something(q: &Quiesce) -> bool {
    !q.freeze.is_empty()
        || !q.pre_hooks.is_empty()
        || !q.post_hooks.is_empty()
        || q.guest_agent.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hooks that append "freeze"/"thaw" to a journal.
    fn journaled(dir: &std::path::Path, timeout: Duration) -> (Quiesce, std::path::PathBuf) {
        let journal = dir.join("journal");
        let q = Quiesce {
            pre_hooks: vec![format!("echo freeze >> {}", journal.display())],
            post_hooks: vec![format!("echo thaw >> {}", journal.display())],
            timeout,
            ..Quiesce::default()
        };
        (q, journal)
    }

    fn lines(journal: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(journal)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn asked(point: u64, epoch: u64, secs: u64) -> QuiesceHold {
        QuiesceHold {
            point: PointId(point),
            epoch: Epoch(epoch),
            timeout: Duration::from_secs(secs),
        }
    }

    #[test]
    fn quiesced_until_the_thaw() {
        let dir = tempfile::tempdir().unwrap();
        let (q, journal) = journaled(dir.path(), Duration::from_secs(30));
        let mut s = SpanQuiesce::new(Some(q));
        let r = s.quiesce(&asked(1, 1, 30));
        assert_eq!(r.outcome, QuiescedOutcome::Quiesced);
        assert!(s.frozen_for(PointId(1), Epoch(1)));
        assert!(!s.frozen_for(PointId(2), Epoch(1)));
        assert_eq!(lines(&journal), vec!["freeze"]);
        let t = s.thaw(&ThawHold {
            point: PointId(1),
            epoch: Epoch(1),
        });
        assert_eq!((t.how, t.note.as_str()), (ThawedHow::InTime, ""));
        assert_eq!(lines(&journal), vec!["freeze", "thaw"]);
        // A second thaw knows of nothing.
        let again = s.thaw(&ThawHold {
            point: PointId(1),
            epoch: Epoch(1),
        });
        assert_eq!(again.how, ThawedHow::Unknown);
    }

    #[test]
    fn a_quiesce_thaws_by_itself_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let (q, journal) = journaled(dir.path(), Duration::from_secs(30));
        let mut s = SpanQuiesce::new(Some(q));
        // The coordinator's timeout is shorter than the tracker's: it wins.
        let mut short = asked(1, 1, 0);
        short.timeout = Duration::from_millis(300);
        assert_eq!(s.quiesce(&short).outcome, QuiescedOutcome::Quiesced);
        // No thaw comes: the post-hook runs by itself after the deadline.
        let by = Instant::now() + Duration::from_secs(5);
        while lines(&journal).len() < 2 {
            assert!(Instant::now() < by, "never thawed: {:?}", lines(&journal));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!s.frozen_for(PointId(1), Epoch(1)));
        let t = s.thaw(&ThawHold {
            point: PointId(1),
            epoch: Epoch(1),
        });
        assert_eq!(t.how, ThawedHow::Expired);
        assert_eq!(lines(&journal), vec!["freeze", "thaw"]);
    }

    #[test]
    fn a_lost_session_thaws_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (q, journal) = journaled(dir.path(), Duration::from_secs(30));
        let mut s = SpanQuiesce::new(Some(q));
        assert_eq!(
            s.quiesce(&asked(1, 1, 30)).outcome,
            QuiescedOutcome::Quiesced
        );
        let started = Instant::now();
        s.end();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(lines(&journal), vec!["freeze", "thaw"]);
    }

    #[test]
    fn nothing_configured_or_a_failing_hook_is_not_quiesced() {
        let mut none = SpanQuiesce::new(None);
        assert!(matches!(
            none.quiesce(&asked(1, 1, 30)).outcome,
            QuiescedOutcome::NotQuiesced { reason } if reason.contains("nothing to quiesce")
        ));
        let mut failing = SpanQuiesce::new(Some(Quiesce {
            pre_hooks: vec!["exit 3".into()],
            timeout: Duration::from_secs(5),
            ..Quiesce::default()
        }));
        assert!(matches!(
            failing.quiesce(&asked(1, 1, 30)).outcome,
            QuiescedOutcome::NotQuiesced { reason } if reason.contains("exit 3")
        ));
        assert!(!failing.frozen_for(PointId(1), Epoch(1)));
    }

    #[test]
    fn a_newer_coordinator_thaws_the_old_quiesce_and_a_stale_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (q, journal) = journaled(dir.path(), Duration::from_secs(30));
        let mut s = SpanQuiesce::new(Some(q));
        assert_eq!(
            s.quiesce(&asked(1, 2, 30)).outcome,
            QuiescedOutcome::Quiesced
        );
        assert!(matches!(
            s.quiesce(&asked(5, 1, 30)).outcome,
            QuiescedOutcome::NotQuiesced { reason } if reason.contains("older")
        ));
        assert!(s.frozen_for(PointId(1), Epoch(2)));
        assert_eq!(
            s.quiesce(&asked(2, 3, 30)).outcome,
            QuiescedOutcome::Quiesced
        );
        assert_eq!(lines(&journal), vec!["freeze", "thaw", "freeze"]);
        drop(s);
        assert_eq!(lines(&journal), vec!["freeze", "thaw", "freeze", "thaw"]);
    }
}
