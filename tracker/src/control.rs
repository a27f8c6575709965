//! The tracker's control socket: the admin plane, apart from the data plane.
//! A unix socket, 0600, one request line per connection, one JSON reply:
//!
//! ```text
//! status                      → {"ok":true,"status":{…}}
//! mark LABEL                  → {"ok":true,"seq":N}   crash-consistent marker
//! mark --app-consistent LABEL → {"ok":true,"seq":N}   after the caller quiesced
//! resync-all DISK             → {"ok":true,"seq":N|null}  the whole disk is
//!                               recorded as resync-needed (it was written
//!                               while spliced out; null: in the dirty bitmap)
//! stop                        → {"ok":true}  then stops as on SIGTERM: no new
//!                               connections, requests in flight finish, a
//!                               final barrier (a planned failover's drain)
//! anything else               → {"ok":false,"error":"…"}
//! ```

use crate::group::Group;
use serde::Serialize;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidemark_names::Label;

/// Status of the group as the control socket reports it.
#[derive(Debug, Serialize)]
pub struct StatusReply {
    /// Consistency group name.
    pub group: String,
    /// `data` or `bitmap`.
    pub tracking: &'static str,
    /// Why the group is in bitmap mode, if it is.
    pub bitmap_reason: Option<String>,
    /// Current generation.
    pub generation: u32,
    /// Next sequence number.
    pub next_seq: u64,
    /// Highest durable sequence number.
    pub durable_seq: u64,
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
#[derive(Debug, Serialize)]
pub struct DiskStatus {
    /// Its name (and export name).
    pub name: String,
    /// `data` or `bitmap`.
    pub tracking: &'static str,
    /// Hot extents in the activity map.
    pub hot_extents: u64,
    /// Dirty extents (bitmap mode).
    pub dirty_extents: u64,
}

/// Builds the status reply of `group`.
pub fn status_of(group_name: &str, group: &Group) -> StatusReply {
    let s = group.status();
    let reason = match &s.mode {
        crate::group::TrackingMode::Bitmap { cause } => Some(cause.to_string()),
        crate::group::TrackingMode::Data => None,
    };
    StatusReply {
        group: group_name.to_string(),
        tracking: s.mode.name(),
        bitmap_reason: reason,
        generation: s.generation,
        next_seq: s.next_seq,
        durable_seq: s.durable_seq,
        log_bytes: s.log_bytes,
        log_limit: s.log_limit,
        writes: s.writes,
        barriers: s.barriers,
        disks: group
            .disk_names()
            .into_iter()
            .enumerate()
            .map(|(i, name)| DiskStatus {
                name: name.into_string(),
                tracking: s.mode.name(),
                hot_extents: s.hot_extents[i],
                dirty_extents: s.dirty_extents[i],
            })
            .collect(),
    }
}

/// Answers one request line.
pub fn handle_line(line: &str, group_name: &str, group: &Group) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let reply = match words.as_slice() {
        ["status"] => serde_json::json!({"ok": true, "status": status_of(group_name, group)}),
        ["mark", "--app-consistent", label] => mark(group, label, true),
        ["mark", label] => mark(group, label, false),
        ["resync-all", disk] => match group.record_resync_all(disk) {
            Ok(seq) => serde_json::json!({"ok": true, "seq": seq}),
            Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
        },
        ["stop"] => serde_json::json!({"ok": true}),
        _ => {
            serde_json::json!({"ok": false, "error": format!("unknown request {line:?}; expected `status`, `mark [--app-consistent] LABEL`, `resync-all DISK` or `stop`")})
        }
    };
    reply.to_string()
}

fn mark(group: &Group, label: &str, app: bool) -> serde_json::Value {
    let label = match Label::new(label) {
        Ok(l) => l,
        Err(e) => return serde_json::json!({"ok": false, "error": e.to_string()}),
    };
    match group.marker(&label, app) {
        Ok(seq) => serde_json::json!({"ok": true, "seq": seq}),
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
    }
}

/// A running control socket.
pub struct ControlSocket {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: std::path::PathBuf,
}

impl ControlSocket {
    /// Listens on `path` (0600) and serves requests on a thread.
    pub fn start(
        path: &Path,
        group_name: String,
        group: Arc<Group>,
    ) -> std::io::Result<ControlSocket> {
        let listener = crate::server::bind_private_unix(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tracker-control".into())
            .spawn(move || serve(listener, &flag, &group_name, &group))?;
        Ok(ControlSocket {
            stop,
            thread: Some(thread),
            path: path.to_path_buf(),
        })
    }

    /// Stops serving and removes the socket.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: UnixListener, stop: &AtomicBool, group_name: &str, group: &Group) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, group_name, group) {
                    tracing::debug!(error = %e, "control request failed");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn answer(stream: UnixStream, group_name: &str, group: &Group) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(stream.try_clone()?, 4096)).read_line(&mut line)?;
    let reply = handle_line(line.trim(), group_name, group);
    let mut stream = stream;
    stream.write_all(reply.as_bytes())?;
    stream.write_all(b"\n")?;
    if line.trim() == "stop" {
        // The daemon's main thread waits for SIGTERM: stop exactly as it
        // would for one.
        tracing::info!("stop requested on the control socket");
        nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM)
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Sends one request to a control socket and returns the reply line.
pub fn request(path: &Path, line: &str) -> std::io::Result<serde_json::Value> {
    request_within(path, line, Duration::from_secs(60))
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
pub fn stop_tracker(path: &Path, timeout: Duration) -> Result<Stopped, String> {
    let deadline = std::time::Instant::now() + timeout;
    match request_within(path, "stop", Duration::from_secs(10).min(timeout)) {
        Ok(reply) if reply["ok"] == true => {
            while path.exists() {
                if std::time::Instant::now() > deadline {
                    return Err(format!("the tracker did not stop within {timeout:?}"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(Stopped::Now)
        }
        Ok(reply) => Err(format!(
            "the tracker refused to stop: {}",
            reply["error"].as_str().unwrap_or("no reason given")
        )),
        Err(e)
            if !path.exists()
                || matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
        {
            Ok(Stopped::NotRunning)
        }
        Err(e) => Err(format!(
            "asking the tracker at {} to stop: {e}",
            path.display()
        )),
    }
}

/// [`request`], waiting at most `timeout` for the reply.
pub fn request_within(
    path: &Path,
    line: &str,
    timeout: Duration,
) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
    stream.write_all(line.as_bytes())?;
    stream.write_all(b"\n")?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    serde_json::from_str(&reply)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
