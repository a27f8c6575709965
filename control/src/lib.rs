//! The tracker's control protocol: the admin plane, apart from the data
//! plane. The tracker serves it on a unix socket (0600); the CLI and the
//! shipper are its clients through this crate, so neither links the
//! tracker. One request line per connection (but for a hold session), one JSON reply line:
//!
//! ```text
//! status                      → {"ok":true,"status":{…}}   (StatusReply)
//! mark LABEL                  → {"ok":true,"seq":N}   crash-consistent marker
//! mark --app-consistent LABEL → {"ok":true,"seq":N}   after the caller quiesced
//! resync-all DISK             → {"ok":true,"seq":N|null}  the whole disk is
//!                               recorded as resync-needed (it was written
//!                               while spliced out; null: in the dirty bitmap)
//! resize DISK                 → {"ok":true,"resized":{…}}   (ResizeReply)
//!                               the disk's backing grew: it is served at
//!                               its new size from the grow record on
//! stop                        → {"ok":true}  then stops as on SIGTERM: no new
//!                               connections, requests in flight finish, a
//!                               final barrier (a planned failover's drain)
//! hold-session                → {"ok":true,"session":"hold"}  the
//!                               connection stays open for span points'
//!                               holds (see [`hold`])
//! anything else               → {"ok":false,"error":"…"}
//! ```
//!
//! A request line is at most [`MAX_REQUEST_LINE`] bytes.

pub mod hold;

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark_changelog::Seq;
use tidemark_names::{Label, LabelError};

/// The longest request line the tracker reads.
pub const MAX_REQUEST_LINE: u64 = 4096;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The group's status.
    Status,
    /// A labelled marker and a barrier.
    Mark {
        /// The marker's label.
        label: Label,
        /// The caller quiesced the applications first.
        app_consistent: bool,
    },
    /// Record a whole disk as resync-needed.
    ResyncAll {
        /// The disk's name.
        disk: String,
    },
    /// Serve a disk at the size its backing grew to.
    Resize {
        /// The disk's name.
        disk: String,
    },
    /// Stop as on SIGTERM.
    Stop,
    /// Turn this connection into a hold session ([`hold`]).
    HoldSession,
}

/// A request line that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not a request of this protocol.
    #[error("unknown request {0:?}; expected `status`, `mark [--app-consistent] LABEL`, `resync-all DISK`, `resize DISK`, `stop` or `hold-session`")]
    Unknown(String),
    /// A marker's label breaks the rule of labels.
    #[error(transparent)]
    Label(#[from] LabelError),
}

impl Request {
    /// Reads a request line (surrounding white space ignored).
    pub fn parse(line: &str) -> Result<Request, RequestError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["status"] => Ok(Request::Status),
            ["mark", "--app-consistent", label] => Ok(Request::Mark {
                label: Label::new(*label)?,
                app_consistent: true,
            }),
            ["mark", label] => Ok(Request::Mark {
                label: Label::new(*label)?,
                app_consistent: false,
            }),
            ["resync-all", disk] => Ok(Request::ResyncAll {
                disk: disk.to_string(),
            }),
            ["resize", disk] => Ok(Request::Resize {
                disk: disk.to_string(),
            }),
            ["stop"] => Ok(Request::Stop),
            [hold::HOLD_SESSION] => Ok(Request::HoldSession),
            _ => Err(RequestError::Unknown(line.trim().to_string())),
        }
    }

    /// The request's line, without its line break.
    pub fn line(&self) -> String {
        match self {
            Request::Status => "status".into(),
            Request::Mark {
                label,
                app_consistent: true,
            } => format!("mark --app-consistent {label}"),
            Request::Mark { label, .. } => format!("mark {label}"),
            Request::ResyncAll { disk } => format!("resync-all {disk}"),
            Request::Resize { disk } => format!("resize {disk}"),
            Request::Stop => "stop".into(),
            Request::HoldSession => hold::HOLD_SESSION.into(),
        }
    }
}

/// How a group tracks writes, as the status reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tracking {
    /// Every write is in the change log.
    #[default]
    Data,
    /// Written extents are kept in the dirty bitmap until a resync.
    Bitmap,
}

impl Tracking {
    /// `data` or `bitmap`.
    pub fn name(self) -> &'static str {
        match self {
            Tracking::Data => "data",
            Tracking::Bitmap => "bitmap",
        }
    }
}

impl std::fmt::Display for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The status of a group (the `status` request's reply). A field an older
/// tracker does not send reads as its default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StatusReply {
    /// Consistency group name.
    pub group: String,
    /// Data or bitmap mode.
    pub tracking: Tracking,
    /// Why the group is in bitmap mode, if it is.
    pub bitmap_reason: Option<String>,
    /// Current generation.
    pub generation: u32,
    /// Next sequence number.
    pub next_seq: Seq,
    /// Highest durable sequence number.
    pub durable_seq: Seq,
    /// Bytes of log segments in use.
    pub log_bytes: u64,
    /// Log size limit.
    pub log_limit: u64,
    /// Writes since start.
    pub writes: u64,
    /// Barriers since start.
    pub barriers: u64,
    /// Per disk.
    pub disks: Vec<DiskStatus>,
}

/// One disk in a [`StatusReply`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DiskStatus {
    /// Its name (and export name).
    pub name: String,
    /// The size it is served at, in bytes (0 from a tracker that did not
    /// send it).
    pub size: u64,
    /// Data or bitmap mode.
    pub tracking: Tracking,
    /// Hot extents in the activity map.
    pub hot_extents: u64,
    /// Dirty extents (bitmap mode).
    pub dirty_extents: u64,
}

/// A disk grown while served (the `resize` request's reply).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeReply {
    /// The disk's name.
    pub disk: String,
    /// The size it was served at before, in bytes.
    pub before: u64,
    /// The size it is served at now, in bytes.
    pub size: u64,
    /// The grow record's sequence number in the change log.
    pub seq: Seq,
    /// What each kernel device the tracker serves the disk through (a ublk
    /// device, a `/dev/nbdN` it attached) made of the growth, told after
    /// the growth was durable and served; empty when there is none (from
    /// a tracker before this field, too).
    #[serde(default)]
    pub kernel: Vec<KernelGrowth>,
}

/// A kernel device told that its disk grew.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelGrowth {
    /// Its block device node.
    pub device: String,
    /// Whether it has the new size now.
    pub grown: bool,
    /// Why not, and what the admin does (the disk itself is grown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The reply line of a request that succeeded with `fields`.
pub fn ok_reply(fields: serde_json::Value) -> String {
    let mut reply = serde_json::json!({"ok": true});
    if let (Some(out), serde_json::Value::Object(fields)) = (reply.as_object_mut(), fields) {
        out.extend(fields);
    }
    reply.to_string()
}

/// The reply line of a request that failed.
pub fn error_reply(error: &dyn std::fmt::Display) -> String {
    serde_json::json!({"ok": false, "error": error.to_string()}).to_string()
}

/// Why a control request did not get what it asked for.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing could be asked: no socket, nobody listening, no reply in
    /// time.
    #[error("cannot reach the tracker at {}: {source}", path.display())]
    Unreachable {
        /// The control socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The tracker answered with an error.
    #[error("the tracker refused: {0}")]
    Refused(String),
    /// The tracker's reply is not what the protocol says.
    #[error("the tracker at {} sent a reply this release cannot read: {reason}", path.display())]
    BadReply {
        /// The control socket.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tracker took the stop but did not stop in time.
    #[error("the tracker did not stop within {0:?}")]
    NotStopped(Duration),
}

impl ControlError {
    /// Whether the tracker is simply not running there (no socket, or a
    /// socket nobody listens on), as opposed to unreachable otherwise.
    pub fn not_running(&self) -> bool {
        matches!(self, ControlError::Unreachable { source, .. }
            if matches!(source.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused))
    }
}

/// Sends `request` to the control socket at `path` and returns the reply,
/// waiting at most `timeout` for it; a reply with `"ok": false` is
/// [`ControlError::Refused`].
pub fn request(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, ControlError> {
    let unreachable = |source| ControlError::Unreachable {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(unreachable)?;
    let line = format!("{}\n", request.line());
    stream.write_all(line.as_bytes()).map_err(unreachable)?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(unreachable)?;
    check_reply(path, &reply)
}

/// Reads a reply line from the control socket at `path`: its JSON, or
/// [`ControlError::Refused`] when it says `"ok": false`.
fn check_reply(path: &Path, reply: &str) -> Result<serde_json::Value, ControlError> {
    let reply: serde_json::Value =
        serde_json::from_str(reply).map_err(|e| ControlError::BadReply {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    match reply["ok"].as_bool() {
        Some(true) => Ok(reply),
        Some(false) => Err(ControlError::Refused(
            reply["error"]
                .as_str()
                .unwrap_or("no reason given")
                .to_string(),
        )),
        None => Err(ControlError::BadReply {
            path: path.to_path_buf(),
            reason: "no \"ok\" field".into(),
        }),
    }
}

fn field<T: serde::de::DeserializeOwned>(
    path: &Path,
    reply: &serde_json::Value,
    name: &str,
) -> Result<T, ControlError> {
    serde_json::from_value(reply[name].clone()).map_err(|e| ControlError::BadReply {
        path: path.to_path_buf(),
        reason: format!("its {name:?}: {e}"),
    })
}

/// The group's status.
pub fn status(path: &Path, timeout: Duration) -> Result<StatusReply, ControlError> {
    let reply = request(path, &Request::Status, timeout)?;
    field(path, &reply, "status")
}

/// Inserts a marker and a barrier; returns the marker's sequence number.
pub fn mark(
    path: &Path,
    label: &Label,
    app_consistent: bool,
    timeout: Duration,
) -> Result<Seq, ControlError> {
    let reply = request(
        path,
        &Request::Mark {
            label: label.clone(),
            app_consistent,
        },
        timeout,
    )?;
    field(path, &reply, "seq")
}

/// Records the whole of `disk` as resync-needed; returns the record's
/// sequence number (`None`: recorded in the dirty bitmap).
pub fn resync_all(path: &Path, disk: &str, timeout: Duration) -> Result<Option<Seq>, ControlError> {
    let reply = request(
        path,
        &Request::ResyncAll {
            disk: disk.to_string(),
        },
        timeout,
    )?;
    field(path, &reply, "seq")
}

/// Tells the tracker that `disk`'s backing grew: it records the growth and
/// serves the new size.
pub fn resize(path: &Path, disk: &str, timeout: Duration) -> Result<ResizeReply, ControlError> {
    let reply = request(
        path,
        &Request::Resize {
            disk: disk.to_string(),
        },
        timeout,
    )?;
    field(path, &reply, "resized")
}

/// How [`stop_tracker`] found the tracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was running and has stopped: requests in flight finished, then a
    /// final barrier.
    Now,
    /// Nothing answered on the control socket: no tracker runs there.
    NotRunning,
}

/// Stops the tracker whose control socket is `path` — no new writes,
/// requests in flight finish, then a final barrier — and waits until it
/// has stopped (it removes its control socket last), at most `timeout`.
pub fn stop_tracker(path: &Path, timeout: Duration) -> Result<Stopped, ControlError> {
    let deadline = Instant::now() + timeout;
    match request(path, &Request::Stop, Duration::from_secs(10).min(timeout)) {
        Ok(_) => {
            while path.exists() {
                if Instant::now() > deadline {
                    return Err(ControlError::NotStopped(timeout));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(Stopped::Now)
        }
        Err(e @ ControlError::Unreachable { .. }) if e.not_running() || !path.exists() => {
            Ok(Stopped::NotRunning)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn requests_read_back_from_their_lines() {
        for request in [
            Request::Status,
            Request::Stop,
            Request::HoldSession,
            Request::ResyncAll {
                disk: "data".into(),
            },
            Request::Resize { disk: "wal".into() },
            Request::Mark {
                label: Label::new("nightly").unwrap(),
                app_consistent: false,
            },
            Request::Mark {
                label: Label::new("pre-upgrade").unwrap(),
                app_consistent: true,
            },
        ] {
            assert_eq!(Request::parse(&request.line()).unwrap(), request);
        }
    }

    #[test]
    fn a_bad_line_or_label_is_a_typed_refusal() {
        assert!(matches!(
            Request::parse("reboot now"),
            Err(RequestError::Unknown(line)) if line == "reboot now"
        ));
        assert!(matches!(Request::parse(""), Err(RequestError::Unknown(_))));
        assert!(matches!(
            Request::parse("mark a\u{7}b"),
            Err(RequestError::Label(_))
        ));
    }

    proptest! {
        #[test]
        fn any_line_parses_or_is_refused_without_a_panic(line in "\\PC{0,80}") {
            let _ = Request::parse(&line);
        }
    }

    /// The reply an older tracker sent (no `writes`/`barriers`) reads with
    /// defaults; the tracking mode reads as its type.
    #[test]
    fn a_status_reply_reads_as_its_type() {
        let reply: StatusReply = serde_json::from_value(serde_json::json!({
            "group": "db",
            "tracking": "bitmap",
            "bitmap_reason": "the change log reached its size limit of 1024 bytes",
            "generation": 3,
            "next_seq": 11,
            "durable_seq": 10,
            "log_bytes": 4096,
            "log_limit": 1024,
            "disks": [{"name": "data", "tracking": "bitmap", "hot_extents": 2, "dirty_extents": 5}],
        }))
        .unwrap();
        assert_eq!(reply.tracking, Tracking::Bitmap);
        assert_eq!(reply.writes, 0);
        assert_eq!(reply.disks[0].dirty_extents, 5);
        let again: StatusReply =
            serde_json::from_str(&serde_json::to_string(&reply).unwrap()).unwrap();
        assert_eq!(again, reply);
    }

    /// A one-shot server on a socket: answers one line with `reply`.
    fn serve_once(dir: &Path, reply: &'static str) -> (PathBuf, std::thread::JoinHandle<String>) {
        let path = dir.join("ctl");
        let listener = UnixListener::bind(&path).unwrap();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(stream.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            let mut stream = stream;
            stream.write_all(reply.as_bytes()).unwrap();
            stream.write_all(b"\n").unwrap();
            line
        });
        (path, thread)
    }

    #[test]
    fn the_client_sends_the_line_and_reads_typed_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (path, server) = serve_once(dir.path(), r#"{"ok":true,"seq":42}"#);
        let label = Label::new("nightly").unwrap();
        assert_eq!(
            mark(&path, &label, true, Duration::from_secs(5)).unwrap(),
            Seq(42)
        );
        assert_eq!(server.join().unwrap(), "mark --app-consistent nightly\n");
        std::fs::remove_file(&path).unwrap();

        let (path, server) = serve_once(dir.path(), r#"{"ok":false,"error":"bitmap mode"}"#);
        match resync_all(&path, "data", Duration::from_secs(5)) {
            Err(ControlError::Refused(why)) => assert_eq!(why, "bitmap mode"),
            other => panic!("{other:?}"),
        }
        assert_eq!(server.join().unwrap(), "resync-all data\n");
        std::fs::remove_file(&path).unwrap();

        let (path, server) = serve_once(
            dir.path(),
            r#"{"ok":true,"resized":{"disk":"data","before":4096,"size":8192,"seq":7}}"#,
        );
        assert_eq!(
            resize(&path, "data", Duration::from_secs(5)).unwrap(),
            ResizeReply {
                disk: "data".into(),
                before: 4096,
                size: 8192,
                seq: Seq(7),
                kernel: Vec::new(),
            }
        );
        assert_eq!(server.join().unwrap(), "resize data\n");
        std::fs::remove_file(&path).unwrap();

        let (path, server) = serve_once(
            dir.path(),
            r#"{"ok":true,"resized":{"disk":"data","before":4096,"size":8192,"seq":7,"kernel":[{"device":"/dev/ublkb0","grown":true},{"device":"/dev/nbd0","grown":false,"error":"/dev/nbd0 keeps its old size"}]}}"#,
        );
        let r = resize(&path, "data", Duration::from_secs(5)).unwrap();
        assert_eq!(
            r.kernel,
            vec![
                KernelGrowth {
                    device: "/dev/ublkb0".into(),
                    grown: true,
                    error: None
                },
                KernelGrowth {
                    device: "/dev/nbd0".into(),
                    grown: false,
                    error: Some("/dev/nbd0 keeps its old size".into())
                }
            ]
        );
        server.join().unwrap();
        std::fs::remove_file(&path).unwrap();

        let (path, server) = serve_once(dir.path(), r#"{"ok":true,"seq":"x"}"#);
        assert!(matches!(
            mark(&path, &label, false, Duration::from_secs(5)),
            Err(ControlError::BadReply { .. })
        ));
        server.join().unwrap();
    }

    #[test]
    fn nobody_listening_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl");
        assert_eq!(
            stop_tracker(&path, Duration::from_secs(1)).unwrap(),
            Stopped::NotRunning
        );
        let e = status(&path, Duration::from_secs(1)).unwrap_err();
        assert!(e.not_running(), "{e}");
    }
}
