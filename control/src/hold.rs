//! The hold session: the one long-lived connection on which a shipper
//! relays its span coordinator's holds to its tracker (the protocol and
//! its guarantees are `tidemark_span`'s). A connection becomes a hold
//! session with the request line `hold-session`; then it carries one
//! request line and one JSON reply line at a time, with no accept latency
//! on the hold's critical path:
//!
//! ```text
//! hold-session                    → {"ok":true,"session":"hold"}
//!                                   (refused while another one is open)
//! hold-open POINT EPOCH DEADLINE_US [--app-consistent] LABEL
//!     → {"ok":true,"held":{"point":P,"epoch":E,"marker":SEQ,"generation":G}}
//!     | {"ok":true,"refused":{"point":P,"epoch":E,"code":"busy","reason":"…"}}
//! hold-release POINT EPOCH commit|abort
//!     → {"ok":true,"released":{"point":P,"epoch":E,"how":"in-time",
//!                              "held_us":N,"gated_writes":N}}
//! hold-quiesce POINT EPOCH TIMEOUT_MS
//!     → {"ok":true,"quiesced":{"point":P,"epoch":E}}
//!     | {"ok":true,"not_quiesced":{"point":P,"epoch":E,"reason":"…"}}
//! hold-thaw POINT EPOCH
//!     → {"ok":true,"thawed":{"point":P,"epoch":E,"how":"in-time","note":""}}
//! ```
//!
//! The session closing (the shipper stopped or died) releases any hold it
//! opened at once, and thaws what it quiesced; a hold also ends by the
//! tracker's own deadline, a quiesce by the tracker's own timeout.

use crate::{ControlError, MAX_REQUEST_LINE};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_changelog::Seq;
use tidemark_names::{Label, LabelError};
use tidemark_span::{
    Epoch, HeldOutcome, HeldReply, OpenHold, PointId, QuiesceHold, QuiescedOutcome, QuiescedReply,
    RefuseCode, ReleaseHold, ReleasedHow, ReleasedReply, ThawHold, ThawedHow, ThawedReply,
};

/// The request line that turns a control connection into a hold session.
pub const HOLD_SESSION: &str = "hold-session";

/// A request of a hold session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldRequest {
    /// Append the point's marker and hold.
    Open(OpenHold),
    /// End the hold.
    Release(ReleaseHold),
    /// Quiesce the applications (hooks, freeze, guest agent) until the
    /// thaw.
    Quiesce(QuiesceHold),
    /// Thaw what the quiesce froze.
    Thaw(ThawHold),
}

/// A hold session's line that is not a request of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldLineError {
    /// Not a request of the hold session.
    #[error("unknown hold request {0:?}; expected `hold-open POINT EPOCH DEADLINE_US [--app-consistent] LABEL`, `hold-release POINT EPOCH commit|abort`, `hold-quiesce POINT EPOCH TIMEOUT_MS` or `hold-thaw POINT EPOCH`")]
    Unknown(String),
    /// A number that is not one.
    #[error("{what} {value:?} is not a number")]
    Number {
        /// Which field.
        what: &'static str,
        /// What was there.
        value: String,
    },
    /// The marker's label breaks the rule of labels.
    #[error(transparent)]
    Label(#[from] LabelError),
}

fn number(what: &'static str, value: &str) -> Result<u64, HoldLineError> {
    value.parse().map_err(|_| HoldLineError::Number {
        what,
        value: value.to_string(),
    })
}

impl HoldRequest {
    /// Reads a request line (surrounding white space ignored).
    pub fn parse(line: &str) -> Result<HoldRequest, HoldLineError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let open = |point: &str, epoch: &str, deadline: &str, app: bool, label: &str| {
            Ok(HoldRequest::Open(OpenHold {
                point: PointId(number("point", point)?),
                epoch: Epoch(number("epoch", epoch)?),
                deadline: Duration::from_micros(number("deadline", deadline)?),
                app_consistent: app,
                label: Label::new(label)?,
            }))
        };
        match words.as_slice() {
            ["hold-open", point, epoch, deadline, "--app-consistent", label] => {
                open(point, epoch, deadline, true, label)
            }
            ["hold-open", point, epoch, deadline, label] => {
                open(point, epoch, deadline, false, label)
            }
            ["hold-quiesce", point, epoch, timeout] => Ok(HoldRequest::Quiesce(QuiesceHold {
                point: PointId(number("point", point)?),
                epoch: Epoch(number("epoch", epoch)?),
                timeout: Duration::from_millis(number("timeout", timeout)?),
            })),
            ["hold-thaw", point, epoch] => Ok(HoldRequest::Thaw(ThawHold {
                point: PointId(number("point", point)?),
                epoch: Epoch(number("epoch", epoch)?),
            })),
            ["hold-release", point, epoch, action @ ("commit" | "abort")] => {
                Ok(HoldRequest::Release(ReleaseHold {
                    point: PointId(number("point", point)?),
                    epoch: Epoch(number("epoch", epoch)?),
                    commit: *action == "commit",
                }))
            }
            _ => Err(HoldLineError::Unknown(line.trim().to_string())),
        }
    }

    /// The request's line, without its line break.
    pub fn line(&self) -> String {
        match self {
            HoldRequest::Open(o) => format!(
                "hold-open {} {} {}{} {}",
                o.point.0,
                o.epoch.0,
                o.deadline.as_micros(),
                if o.app_consistent {
                    " --app-consistent"
                } else {
                    ""
                },
                o.label
            ),
            HoldRequest::Release(r) => format!(
                "hold-release {} {} {}",
                r.point.0,
                r.epoch.0,
                if r.commit { "commit" } else { "abort" }
            ),
            HoldRequest::Quiesce(q) => format!(
                "hold-quiesce {} {} {}",
                q.point.0,
                q.epoch.0,
                q.timeout.as_millis()
            ),
            HoldRequest::Thaw(t) => format!("hold-thaw {} {}", t.point.0, t.epoch.0),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct HeldJson {
    point: u64,
    epoch: u64,
    marker: u64,
    generation: u32,
}

#[derive(Serialize, Deserialize)]
struct RefusedJson {
    point: u64,
    epoch: u64,
    code: String,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct ReleasedJson {
    point: u64,
    epoch: u64,
    how: String,
    held_us: u64,
    gated_writes: u32,
}

#[derive(Serialize, Deserialize)]
struct QuiescedJson {
    point: u64,
    epoch: u64,
}

#[derive(Serialize, Deserialize)]
struct NotQuiescedJson {
    point: u64,
    epoch: u64,
    reason: String,
}

#[derive(Serialize, Deserialize)]
struct ThawedJson {
    point: u64,
    epoch: u64,
    how: String,
    note: String,
}

/// The reply line of a quiesce.
pub fn quiesced_reply(reply: &QuiescedReply) -> String {
    let (point, epoch) = (reply.point.0, reply.epoch.0);
    match &reply.outcome {
        QuiescedOutcome::Quiesced => crate::ok_reply(serde_json::json!({
            "quiesced": QuiescedJson { point, epoch }
        })),
        QuiescedOutcome::NotQuiesced { reason } => crate::ok_reply(serde_json::json!({
            "not_quiesced": NotQuiescedJson { point, epoch, reason: reason.clone() }
        })),
    }
}

/// The reply line of a thaw.
pub fn thawed_reply(reply: &ThawedReply) -> String {
    crate::ok_reply(serde_json::json!({
        "thawed": ThawedJson {
            point: reply.point.0,
            epoch: reply.epoch.0,
            how: reply.how.name().into(),
            note: reply.note.clone(),
        }
    }))
}

/// The reply line of an open.
pub fn held_reply(reply: &HeldReply) -> String {
    let (point, epoch) = (reply.point.0, reply.epoch.0);
    match &reply.outcome {
        HeldOutcome::Held { marker, generation } => crate::ok_reply(serde_json::json!({
            "held": HeldJson { point, epoch, marker: marker.get(), generation: *generation }
        })),
        HeldOutcome::Refused { code, reason } => crate::ok_reply(serde_json::json!({
            "refused": RefusedJson { point, epoch, code: code.name().into(), reason: reason.clone() }
        })),
    }
}

/// The reply line of a release.
pub fn released_reply(reply: &ReleasedReply) -> String {
    crate::ok_reply(serde_json::json!({
        "released": ReleasedJson {
            point: reply.point.0,
            epoch: reply.epoch.0,
            how: reply.how.name().into(),
            held_us: u64::try_from(reply.held.as_micros()).unwrap_or(u64::MAX),
            gated_writes: reply.gated_writes,
        }
    }))
}

/// A shipper's hold session with its tracker.
#[derive(Debug)]
pub struct HoldSession {
    path: PathBuf,
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl HoldSession {
    /// Opens a hold session on the control socket at `path`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<HoldSession, ControlError> {
        let unreachable = |source| ControlError::Unreachable {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(unreachable)?;
        let reader = BufReader::new(stream.try_clone().map_err(unreachable)?);
        let mut session = HoldSession {
            path: path.to_path_buf(),
            stream,
            reader,
        };
        session.exchange(HOLD_SESSION, timeout)?;
        Ok(session)
    }

    /// Asks for a hold.
    pub fn open(&mut self, open: &OpenHold, timeout: Duration) -> Result<HeldReply, ControlError> {
        let reply = self.exchange(&HoldRequest::Open(open.clone()).line(), timeout)?;
        if let Some(held) = reply.get("held") {
            let h: HeldJson = self.decode(held)?;
            return Ok(HeldReply {
                point: PointId(h.point),
                epoch: Epoch(h.epoch),
                outcome: HeldOutcome::Held {
                    marker: Seq(h.marker),
                    generation: h.generation,
                },
            });
        }
        let r: RefusedJson = self.decode(&reply["refused"])?;
        let code = RefuseCode::from_name(&r.code)
            .ok_or_else(|| self.bad(format!("unknown refusal code {:?}", r.code)))?;
        Ok(HeldReply {
            point: PointId(r.point),
            epoch: Epoch(r.epoch),
            outcome: HeldOutcome::Refused {
                code,
                reason: r.reason,
            },
        })
    }

    /// Ends a hold.
    pub fn release(
        &mut self,
        release: &ReleaseHold,
        timeout: Duration,
    ) -> Result<ReleasedReply, ControlError> {
        let reply = self.exchange(&HoldRequest::Release(*release).line(), timeout)?;
        let r: ReleasedJson = self.decode(&reply["released"])?;
        let how = ReleasedHow::from_name(&r.how)
            .ok_or_else(|| self.bad(format!("unknown release answer {:?}", r.how)))?;
        Ok(ReleasedReply {
            point: PointId(r.point),
            epoch: Epoch(r.epoch),
            how,
            held: Duration::from_micros(r.held_us),
            gated_writes: r.gated_writes,
        })
    }

    /// Asks the tracker to quiesce; `timeout` bounds the wait for the
    /// answer (the hooks and the freeze run before it).
    pub fn quiesce(
        &mut self,
        quiesce: &QuiesceHold,
        timeout: Duration,
    ) -> Result<QuiescedReply, ControlError> {
        let reply = self.exchange(&HoldRequest::Quiesce(*quiesce).line(), timeout)?;
        if let Some(q) = reply.get("quiesced") {
            let q: QuiescedJson = self.decode(q)?;
            return Ok(QuiescedReply {
                point: PointId(q.point),
                epoch: Epoch(q.epoch),
                outcome: QuiescedOutcome::Quiesced,
            });
        }
        let q: NotQuiescedJson = self.decode(&reply["not_quiesced"])?;
        Ok(QuiescedReply {
            point: PointId(q.point),
            epoch: Epoch(q.epoch),
            outcome: QuiescedOutcome::NotQuiesced { reason: q.reason },
        })
    }

    /// Asks the tracker to thaw; `timeout` bounds the wait for the answer
    /// (the post-hooks run before it).
    pub fn thaw(
        &mut self,
        thaw: &ThawHold,
        timeout: Duration,
    ) -> Result<ThawedReply, ControlError> {
        let reply = self.exchange(&HoldRequest::Thaw(*thaw).line(), timeout)?;
        let t: ThawedJson = self.decode(&reply["thawed"])?;
        let how = ThawedHow::from_name(&t.how)
            .ok_or_else(|| self.bad(format!("unknown thaw answer {:?}", t.how)))?;
        Ok(ThawedReply {
            point: PointId(t.point),
            epoch: Epoch(t.epoch),
            how,
            note: t.note,
        })
    }

    fn bad(&self, reason: String) -> ControlError {
        ControlError::BadReply {
            path: self.path.clone(),
            reason,
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        value: &serde_json::Value,
    ) -> Result<T, ControlError> {
        serde_json::from_value(value.clone()).map_err(|e| self.bad(e.to_string()))
    }

    fn exchange(
        &mut self,
        line: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value, ControlError> {
        let unreachable = |source| ControlError::Unreachable {
            path: self.path.clone(),
            source,
        };
        self.stream
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .map_err(unreachable)?;
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .map_err(unreachable)?;
        let mut reply = String::new();
        std::io::Read::take(&mut self.reader, MAX_REQUEST_LINE)
            .read_line(&mut reply)
            .map_err(unreachable)?;
        if reply.is_empty() {
            return Err(unreachable(std::io::ErrorKind::UnexpectedEof.into()));
        }
        crate::check_reply(&self.path, &reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_requests_read_back_from_their_lines() {
        let requests = [
            HoldRequest::Open(OpenHold {
                point: PointId(7),
                epoch: Epoch(3),
                deadline: Duration::from_micros(17_500),
                app_consistent: false,
                label: Label::new("span-shop-7").unwrap(),
            }),
            HoldRequest::Open(OpenHold {
                point: PointId(8),
                epoch: Epoch(3),
                deadline: Duration::from_millis(40),
                app_consistent: true,
                label: Label::new("span-shop-8").unwrap(),
            }),
            HoldRequest::Release(ReleaseHold {
                point: PointId(8),
                epoch: Epoch(3),
                commit: false,
            }),
            HoldRequest::Quiesce(QuiesceHold {
                point: PointId(9),
                epoch: Epoch(3),
                timeout: Duration::from_secs(30),
            }),
            HoldRequest::Thaw(ThawHold {
                point: PointId(9),
                epoch: Epoch(3),
            }),
        ];
        for r in requests {
            assert_eq!(HoldRequest::parse(&r.line()), Ok(r.clone()), "{}", r.line());
        }
    }

    #[test]
    fn bad_hold_lines_are_refused_by_name() {
        assert!(matches!(
            HoldRequest::parse("hold-open x 1 1000 l"),
            Err(HoldLineError::Number { what: "point", .. })
        ));
        assert!(matches!(
            HoldRequest::parse("hold-release 1 1 maybe"),
            Err(HoldLineError::Unknown(_))
        ));
        assert!(matches!(
            HoldRequest::parse("hold-open 1 1 1000 bad\u{7}label"),
            Err(HoldLineError::Label(_))
        ));
    }
}
