//! A span point on demand: `tidemark span take` leaves a request in the
//! span's directory; the span's coordinator (in the running receiver)
//! starts a round for it as soon as no other round runs, and answers
//! which point it is, or why none could start. The point's outcome is then
//! the span's record's (`crate::span`), like any other round's.
//!
//! ```text
//!  spans/SPAN/take.request   id N
//!                            label L
//!                            app-consistent yes   (absent: crash-consistent)
//!  spans/SPAN/take.result    id N
//!                            point P          (the round started)
//!                         or error TEXT       (why it could not start)
//! ```
//!
//! Both are sealed text files replaced atomically (as the drain request's,
//! `crate::drain`), so a torn or stale file reads as absent or as another
//! request, never as a wrong answer. A request whose answer is there
//! already is not taken again (a receiver restarting).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::drain::{field, read, write};
use crate::span::SpanDir;
use crate::store::StoreEngine;
use tidemark_config::{ReceiverConfig, StoreKind};
use tidemark_names::{Label, Name};

/// The request's file name in the span's directory.
pub const REQUEST: &str = "take.request";
/// The answer's file name in the span's directory.
pub const RESULT: &str = "take.result";

/// A request for a span point now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeRequest {
    /// Names the request (the answer names it back).
    pub id: u64,
    /// The markers' label.
    pub label: Label,
    /// Quiesce every member first (an application-consistent point).
    pub app_consistent: bool,
}

/// The answer to request `id`: the point's id, or why no round started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakeResult {
    /// The request it answers.
    pub id: u64,
    /// The point being taken, or why none.
    pub result: Result<u64, String>,
}

/// Leaves a request for the span's coordinator.
pub fn write_request(span_dir: &Path, request: &TakeRequest) -> io::Result<()> {
    write(
        span_dir,
        REQUEST,
        &format!(
            "id {}\nlabel {}\n{}",
            request.id,
            request.label,
            if request.app_consistent {
                "app-consistent yes\n"
            } else {
                ""
            }
        ),
    )
}

/// The pending request, if there is one and it is readable.
pub fn read_request(span_dir: &Path) -> io::Result<Option<TakeRequest>> {
    let Some(lines) = read(span_dir, REQUEST)? else {
        return Ok(None);
    };
    let id = field(&lines, "id").and_then(|v| v.parse().ok());
    let label = field(&lines, "label").and_then(|v| Label::new(v).ok());
    let app_consistent = field(&lines, "app-consistent") == Some("yes");
    Ok(id.zip(label).map(|(id, label)| TakeRequest {
        id,
        label,
        app_consistent,
    }))
}

/// Writes the answer to a request.
pub fn write_result(span_dir: &Path, result: &TakeResult) -> io::Result<()> {
    let body = match &result.result {
        Ok(point) => format!("id {}\npoint {point}\n", result.id),
        Err(why) => format!("id {}\nerror {}\n", result.id, why.replace('\n', " ")),
    };
    write(span_dir, RESULT, &body)
}

/// The answer to the last request, if there is one.
pub fn read_result(span_dir: &Path) -> io::Result<Option<TakeResult>> {
    let Some(lines) = read(span_dir, RESULT)? else {
        return Ok(None);
    };
    let Some(id) = field(&lines, "id").and_then(|v| v.parse().ok()) else {
        return Ok(None);
    };
    let result = match (field(&lines, "point"), field(&lines, "error")) {
        (Some(point), None) => match point.parse() {
            Ok(p) => Ok(p),
            Err(_) => return Ok(None),
        },
        (None, Some(why)) => Err(why.to_string()),
        _ => return Ok(None),
    };
    Ok(Some(TakeResult { id, result }))
}

/// Why a span point asked for on demand did not start.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The span is coordinated by another receiver (a store shared
    /// between receivers): the request must be made on that node.
    #[error("span {span} is coordinated by the receiver at {holder}, not this node's ({here}): ask on that node")]
    Elsewhere {
        /// The span.
        span: Name,
        /// The advertised address of the receiver holding its lease.
        holder: String,
        /// This node's.
        here: String,
    },
    /// No receiver has taken the span yet (a store shared between
    /// receivers, and none of its members' shippers has connected).
    #[error("span {0} has no coordinator yet: no receiver has taken it (none of its members' shippers has connected)")]
    NoCoordinator(Name),
    /// The span's directory could not be opened (the local disk).
    #[error("opening the directory of span {span}")]
    Dir {
        /// The span.
        span: Name,
        /// The cause.
        #[source]
        source: crate::span::SpanRecordError,
    },
    /// The request could not be written or the answer read (the local
    /// disk).
    #[error("asking for a point of span {span} in {}", dir.display())]
    Io {
        /// The span.
        span: Name,
        /// Its directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The coordinator answered that no round could start (a member not
    /// connected, another round running …).
    #[error("no span point of {span} could start: {why}")]
    Refused {
        /// The span.
        span: Name,
        /// The coordinator's reason.
        why: String,
    },
    /// No answer came in time: no receiver runs with this span in its
    /// configuration on this data directory.
    #[error("no answer within {} s while waiting for the receiver to start the round: is the receiver running with span {span} in its configuration?", within.as_secs())]
    NoAnswer {
        /// The span.
        span: Name,
        /// How long it waited.
        within: Duration,
    },
}

/// Asks the span's coordinator in the running receiver configured by
/// `cfg` for a span point now (`request`), and waits up to `within` for
/// the round to start: the point's id. With a store shared between
/// receivers the request goes through the data directory of the receiver
/// holding the span's lease: this node's, else refused. `tidemark span
/// take` and the console's "mark a point" both ask through this.
pub fn ask(
    cfg: &ReceiverConfig,
    engine: &dyn StoreEngine,
    span: &Name,
    request: &TakeRequest,
    within: Duration,
) -> Result<u64, AskError> {
    if cfg.store.kind != StoreKind::Local {
        let here = cfg
            .store
            .ceph()
            .and_then(|c| c.advertise.clone())
            .unwrap_or_else(|| cfg.listen.to_string());
        match engine.span_holder(span) {
            Some(holder) if holder != here => {
                return Err(AskError::Elsewhere {
                    span: span.clone(),
                    holder,
                    here,
                })
            }
            Some(_) => {}
            None => return Err(AskError::NoCoordinator(span.clone())),
        }
    }
    let io = |dir: &Path| {
        let (span, dir) = (span.clone(), dir.to_path_buf());
        move |source| AskError::Io { span, dir, source }
    };
    let dir = SpanDir::open(&cfg.data_dir, span).map_err(|source| AskError::Dir {
        span: span.clone(),
        source,
    })?;
    write_request(dir.path(), request).map_err(io(dir.path()))?;
    let deadline = Instant::now() + within;
    loop {
        match read_result(dir.path()).map_err(io(dir.path()))? {
            Some(r) if r.id == request.id => {
                return r.result.map_err(|why| AskError::Refused {
                    span: span.clone(),
                    why,
                })
            }
            _ if Instant::now() >= deadline => {
                return Err(AskError::NoAnswer {
                    span: span.clone(),
                    within,
                })
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_answers_read_back_and_damage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_request(dir.path()).unwrap(), None);
        let request = TakeRequest {
            id: 17,
            label: Label::new("before-upgrade").unwrap(),
            app_consistent: false,
        };
        write_request(dir.path(), &request).unwrap();
        assert_eq!(read_request(dir.path()).unwrap(), Some(request));
        let app = TakeRequest {
            id: 18,
            label: Label::new("quiesced").unwrap(),
            app_consistent: true,
        };
        write_request(dir.path(), &app).unwrap();
        assert_eq!(read_request(dir.path()).unwrap(), Some(app));
        for result in [Ok(42), Err("db1/default is not connected".to_string())] {
            let answer = TakeResult { id: 17, result };
            write_result(dir.path(), &answer).unwrap();
            assert_eq!(read_result(dir.path()).unwrap(), Some(answer));
        }
        let mut text = std::fs::read_to_string(dir.path().join(RESULT)).unwrap();
        text = text.replace("17", "18");
        std::fs::write(dir.path().join(RESULT), text).unwrap();
        assert_eq!(read_result(dir.path()).unwrap(), None, "a changed answer");
    }

    #[test]
    fn ask_waits_for_the_coordinators_answer_to_its_own_request() {
        let data = tempfile::tempdir().unwrap();
        let cfg = ReceiverConfig {
            data_dir: data.path().to_path_buf(),
            ..ReceiverConfig::default()
        };
        let engine = crate::store::LocalEngine::new(data.path());
        let span = Name::new("erp").unwrap();
        let dir = data.path().join(crate::span::SPANS_DIR).join("erp");
        let request = |id| TakeRequest {
            id,
            label: Label::new("before-upgrade").unwrap(),
            app_consistent: false,
        };

        // Nobody answers: a clear error after the wait.
        let none = ask(
            &cfg,
            &engine,
            &span,
            &request(1),
            Duration::from_millis(150),
        );
        assert!(matches!(none, Err(AskError::NoAnswer { .. })), "{none:?}");

        // A coordinator answering (an older answer first, then this one's).
        write_result(
            &dir,
            &TakeResult {
                id: 1,
                result: Ok(6),
            },
        )
        .unwrap();
        let coordinator = {
            let dir = dir.clone();
            std::thread::spawn(move || loop {
                if let Some(r) = read_request(&dir).unwrap() {
                    if r.id == 2 {
                        let answer = TakeResult {
                            id: 2,
                            result: Ok(7),
                        };
                        write_result(&dir, &answer).unwrap();
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            })
        };
        let point = ask(&cfg, &engine, &span, &request(2), Duration::from_secs(10));
        coordinator.join().unwrap();
        assert_eq!(point.unwrap(), 7);

        write_result(
            &dir,
            &TakeResult {
                id: 3,
                result: Err("db1/default is not connected".into()),
            },
        )
        .unwrap();
        let refused = ask(&cfg, &engine, &span, &request(3), Duration::from_secs(10));
        assert_eq!(
            refused.unwrap_err().to_string(),
            "no span point of erp could start: db1/default is not connected"
        );
    }
}
