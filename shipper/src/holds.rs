//! The relay of span holds: a span's coordinator (a role of the receiver,
//! `tidemark_span` owns the protocol) reaches this host's tracker through
//! the shipper's connection, so a protected host opens no port.
//!
//! The receiver opens a stream of its own beside the session's once a
//! session of protocol version 3 or later runs (a hold never waits behind
//! queued records). Each hold message on it (`hold-open`, `hold-release`,
//! and from version 4 `hold-quiesce`, `hold-thaw`) is passed to the
//! tracker's hold session on its control socket
//! (`tidemark_control::hold`), one at a time, in order, and the tracker's
//! answer is sent back in the version of the frame that asked.
//!
//! The tracker's hold session is opened at the first open and kept while
//! the stream lasts. Whatever ends it (the stream or the connection ended,
//! the shipper stopped, an exchange failed) closes the session, which ends
//! any hold it opened at once: a lost shipper never holds a disk longer
//! than it takes the tracker to notice the closed socket. An open the
//! tracker cannot be asked is refused (`tracker-unreachable`); a release
//! that cannot be passed on is answered `aborted`, since the lost session
//! ended the hold. A quiesce the tracker cannot be asked is answered
//! not quiesced, a thaw `unknown` (the lost session thawed it).

use std::path::PathBuf;
use std::time::Duration;

use tidemark_control::hold::{HoldRequest, HoldSession};
use tidemark_control::ControlError;
use tidemark_span::{
    HeldOutcome, HeldReply, HoldMessage, QuiescedOutcome, QuiescedReply, RefuseCode, ReleasedHow,
    ReleasedReply, ThawedHow, ThawedReply,
};
use tidemark_wire::{Compression, ErrorClass, ErrorCode, Message, MessageDecoder};

/// How long one exchange with the tracker may take. A hold's own deadline
/// is far shorter: an answer this late is useless to the coordinator, but
/// is still read so that the session stays in step.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a thaw may take to be answered: the tracker runs the
/// post-hooks first, each bounded by its own timeout.
const THAW_TIMEOUT: Duration = Duration::from_secs(120);

/// The relay of one connection: ends (closing the tracker's hold session)
/// when it is dropped.
pub(crate) struct Relay(tokio::task::JoinHandle<()>);

impl Relay {
    /// Relays the hold streams the receiver opens on `conn` to the tracker
    /// whose control socket is `control`.
    pub(crate) fn start(conn: quinn::Connection, control: PathBuf) -> Relay {
        Relay(tokio::spawn(async move {
            let mut tracker = Tracker {
                control,
                session: None,
            };
            while let Ok((send, recv)) = conn.accept_bi().await {
                tracing::debug!("the receiver opened the hold stream");
                tracker = serve(send, recv, tracker).await;
                // A stream's holds end with it.
                tracker.session = None;
            }
        }))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The tracker's hold session, opened when first needed.
struct Tracker {
    control: PathBuf,
    session: Option<HoldSession>,
}

impl Tracker {
    /// Passes `request` to the tracker and returns its answer; blocking.
    fn ask(&mut self, request: &HoldRequest) -> Result<HoldMessage, ControlError> {
        if self.session.is_none() {
            self.session = Some(HoldSession::connect(&self.control, CONTROL_TIMEOUT)?);
        }
        let session = self.session.as_mut().expect("opened above");
        let answer = match request {
            HoldRequest::Open(open) => session.open(open, CONTROL_TIMEOUT).map(HoldMessage::Held),
            HoldRequest::Release(release) => session
                .release(release, CONTROL_TIMEOUT)
                .map(HoldMessage::Released),
            // The hooks and the freeze run before the answer.
            HoldRequest::Quiesce(quiesce) => session
                .quiesce(quiesce, quiesce.timeout + CONTROL_TIMEOUT)
                .map(HoldMessage::Quiesced),
            HoldRequest::Thaw(thaw) => session.thaw(thaw, THAW_TIMEOUT).map(HoldMessage::Thawed),
        };
        if answer.is_err() {
            // Out of step or gone: closing it ends its hold.
            self.session = None;
        }
        answer
    }
}

/// The request a hold message is, if it is one (an answer sent the wrong
/// way is not).
fn request(message: HoldMessage) -> Option<HoldRequest> {
    match message {
        HoldMessage::Open(open) => Some(HoldRequest::Open(open)),
        HoldMessage::Release(release) => Some(HoldRequest::Release(release)),
        HoldMessage::Quiesce(quiesce) => Some(HoldRequest::Quiesce(quiesce)),
        HoldMessage::Thaw(thaw) => Some(HoldRequest::Thaw(thaw)),
        HoldMessage::Held(_)
        | HoldMessage::Released(_)
        | HoldMessage::Quiesced(_)
        | HoldMessage::Thawed(_) => None,
    }
}

/// What the relay answers a request the tracker could not be asked
/// (`why`).
fn unreachable_answer(request: &HoldRequest, why: &str) -> HoldMessage {
    match request {
        HoldRequest::Open(open) => HoldMessage::Held(HeldReply {
            point: open.point,
            epoch: open.epoch,
            outcome: HeldOutcome::Refused {
                code: RefuseCode::TrackerUnreachable,
                reason: format!("the shipper cannot reach its tracker: {why}"),
            },
        }),
        HoldRequest::Release(release) => HoldMessage::Released(ReleasedReply {
            point: release.point,
            epoch: release.epoch,
            how: ReleasedHow::Aborted,
            held: Duration::ZERO,
            gated_writes: 0,
        }),
        HoldRequest::Quiesce(quiesce) => HoldMessage::Quiesced(QuiescedReply {
            point: quiesce.point,
            epoch: quiesce.epoch,
            outcome: QuiescedOutcome::NotQuiesced {
                reason: format!("the shipper cannot reach its tracker: {why}"),
            },
        }),
        HoldRequest::Thaw(thaw) => HoldMessage::Thawed(ThawedReply {
            point: thaw.point,
            epoch: thaw.epoch,
            how: ThawedHow::Unknown,
            note: format!("the shipper cannot reach its tracker: {why}"),
        }),
    }
}

/// Serves one hold stream until it ends; gives the tracker back.
async fn serve(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut tracker: Tracker,
) -> Tracker {
    let mut decoder = MessageDecoder::new();
    let mut buf = vec![0u8; 4096];
    loop {
        loop {
            let received = match decoder.next_message() {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "a bad frame on the hold stream; closing it");
                    return tracker;
                }
            };
            let msg_type = received.message.msg_type();
            let request = match received.message {
                Message::Hold(m) => request(m),
                _ => None,
            };
            let Some(request) = request else {
                tracing::warn!(
                    message = msg_type.name(),
                    "the hold stream carries only hold requests; closing it"
                );
                let refusal = Message::error(
                    ErrorClass::Transient,
                    ErrorCode::Protocol,
                    "the hold stream carries only hold-open, hold-release, hold-quiesce and hold-thaw",
                );
                if let Ok(frame) = refusal.encode(received.version, Compression::None) {
                    let _ = send.write_all(&frame).await;
                }
                return tracker;
            };
            let asked = request.clone();
            let control = tracker.control.clone();
            let (back, answer) = match tokio::task::spawn_blocking(move || {
                let answer = tracker.ask(&asked);
                (tracker, answer)
            })
            .await
            {
                Ok(x) => x,
                Err(e) => {
                    // The blocking task failed: the session went with it,
                    // and so did its hold.
                    tracing::error!(error = %e, "relaying a hold failed");
                    return Tracker {
                        control,
                        session: None,
                    };
                }
            };
            tracker = back;
            let answer = answer.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot pass a hold to the tracker");
                unreachable_answer(&request, &e.to_string())
            });
            let frame = match Message::Hold(answer).encode(received.version, Compression::None) {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a hold answer; closing the hold stream");
                    return tracker;
                }
            };
            if send.write_all(&frame).await.is_err() {
                return tracker;
            }
        }
        match recv.read(&mut buf).await {
            Ok(Some(n)) => decoder.feed(&buf[..n]),
            Ok(None) | Err(_) => return tracker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_names::Label;
    use tidemark_span::{Epoch, OpenHold, PointId, ReleaseHold};

    #[test]
    fn an_open_the_tracker_cannot_be_asked_is_refused_and_a_release_aborted() {
        let open = HoldRequest::Open(OpenHold {
            point: PointId(7),
            epoch: Epoch(2),
            deadline: Duration::from_millis(20),
            app_consistent: false,
            label: Label::new("span-shop-7").unwrap(),
        });
        match unreachable_answer(&open, "no socket") {
            HoldMessage::Held(HeldReply {
                point: PointId(7),
                epoch: Epoch(2),
                outcome: HeldOutcome::Refused { code, reason },
            }) => {
                assert_eq!(code, RefuseCode::TrackerUnreachable);
                assert!(reason.contains("no socket"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let release = HoldRequest::Release(ReleaseHold {
            point: PointId(7),
            epoch: Epoch(2),
            commit: true,
        });
        match unreachable_answer(&release, "gone") {
            HoldMessage::Released(r) => {
                assert_eq!(
                    (r.point, r.epoch, r.how),
                    (PointId(7), Epoch(2), ReleasedHow::Aborted)
                );
            }
            other => panic!("{other:?}"),
        }
        let quiesce = HoldRequest::Quiesce(tidemark_span::QuiesceHold {
            point: PointId(7),
            epoch: Epoch(2),
            timeout: Duration::from_secs(30),
        });
        match unreachable_answer(&quiesce, "no socket") {
            HoldMessage::Quiesced(QuiescedReply {
                outcome: QuiescedOutcome::NotQuiesced { reason },
                ..
            }) => assert!(reason.contains("no socket"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let thaw = HoldRequest::Thaw(tidemark_span::ThawHold {
            point: PointId(7),
            epoch: Epoch(2),
        });
        assert!(matches!(
            unreachable_answer(&thaw, "gone"),
            HoldMessage::Thawed(ThawedReply {
                how: ThawedHow::Unknown,
                ..
            })
        ));
    }

    #[test]
    fn an_answer_sent_to_the_shipper_is_no_request() {
        let held = HoldMessage::Held(HeldReply {
            point: PointId(1),
            epoch: Epoch(1),
            outcome: HeldOutcome::Held {
                marker: tidemark_changelog::Seq(5),
                generation: 1,
            },
        });
        assert!(request(held).is_none());
        let open = HoldMessage::Open(OpenHold {
            point: PointId(2),
            epoch: Epoch(1),
            deadline: Duration::from_millis(20),
            app_consistent: true,
            label: Label::new("span-shop-2").unwrap(),
        });
        assert!(matches!(request(open), Some(HoldRequest::Open(o)) if o.app_consistent));
    }
}
