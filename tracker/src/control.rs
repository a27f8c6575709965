//! The tracker's control socket: the server side of the control
//! protocol (`tidemark_control`, where the requests, the replies and the
//! client live), on a unix socket (0600), one request per connection —
//! but for the shipper's hold session (span points), which stays open on
//! a thread of its own and drives the group's hold participant
//! (`tidemark_span::Participant`) and its span quiesce
//! ([`crate::span_quiesce`]).

use crate::group::{Group, MarkerError};
use crate::kernel_size::{error_chain, Grown, KernelDevices};
use crate::quiesce::Quiesce;
use crate::span_quiesce::SpanQuiesce;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidemark_control::hold::{
    held_reply, quiesced_reply, released_reply, thawed_reply, HoldRequest,
};
use tidemark_control::{
    error_reply, ok_reply, DiskStatus, KernelGrowth, Request, ResizeReply, StatusReply, Tracking,
    MAX_REQUEST_LINE,
};
use tidemark_span::{Participant, ParticipantConfig, Refusal, RefuseCode};

/// Builds the status reply of `group`.
pub fn status_of(group_name: &str, group: &Group) -> StatusReply {
    let s = group.status();
    let (tracking, reason) = match &s.mode {
        crate::group::TrackingMode::Bitmap { cause } => (Tracking::Bitmap, Some(cause.to_string())),
        crate::group::TrackingMode::Data => (Tracking::Data, None),
    };
    StatusReply {
        group: group_name.to_string(),
        tracking,
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
            .zip(group.disk_sizes())
            .enumerate()
            .map(|(i, (name, size))| DiskStatus {
                name: name.into_string(),
                size,
                tracking,
                hot_extents: s.hot_extents[i],
                dirty_extents: s.dirty_extents[i],
            })
            .collect(),
    }
}

/// Answers one request line; a resize tells `devices` too.
pub fn handle_line(line: &str, group_name: &str, group: &Group, devices: &KernelDevices) -> String {
    let request = match Request::parse(line) {
        Ok(r) => r,
        Err(e) => return error_reply(&e),
    };
    match request {
        Request::Status => ok_reply(serde_json::json!({"status": status_of(group_name, group)})),
        Request::Mark {
            label,
            app_consistent,
        } => match group.marker(&label, app_consistent) {
            Ok(seq) => ok_reply(serde_json::json!({ "seq": seq })),
            Err(e) => error_reply(&e),
        },
        Request::ResyncAll { disk } => match group.record_resync_all(&disk) {
            Ok(seq) => ok_reply(serde_json::json!({ "seq": seq })),
            Err(e) => error_reply(&e),
        },
        Request::Resize { disk } => match crate::kernel_size::resize(group, devices, &disk) {
            Ok(grown) => ok_reply(serde_json::json!({ "resized": resize_reply(grown) })),
            Err(e) => error_reply(&e),
        },
        Request::Stop => ok_reply(serde_json::json!({})),
        Request::HoldSession => error_reply(&"a hold session is the first request of a connection"),
    }
}

/// The wire form of a growth.
fn resize_reply(grown: Grown) -> ResizeReply {
    let r = grown.resized;
    ResizeReply {
        disk: r.disk.into_string(),
        before: r.before,
        size: r.size,
        seq: r.seq,
        kernel: grown
            .devices
            .into_iter()
            .map(|d| KernelGrowth {
                device: d.device.display().to_string(),
                grown: d.outcome.is_ok(),
                error: d.outcome.err().map(|e| error_chain(&e)),
            })
            .collect(),
    }
}

/// The group's one hold participant, shared by the hold sessions (one open
/// at a time).
struct Holds {
    participant: Mutex<Participant>,
    quiesce: Mutex<SpanQuiesce>,
    session_open: AtomicBool,
}

impl Holds {
    fn participant(&self) -> std::sync::MutexGuard<'_, Participant> {
        self.participant
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn span_quiesce(&self) -> std::sync::MutexGuard<'_, SpanQuiesce> {
        self.quiesce
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Opens the group's gate if the participant no longer holds.
    fn sync_gate(&self, participant: &Participant, group: &Group) {
        if participant.gate().is_none() {
            group.hold_release();
        }
    }

    /// Answers one line of a hold session.
    fn handle(&self, line: &str, group: &Group) -> String {
        let now = Instant::now();
        match HoldRequest::parse(line) {
            Err(e) => error_reply(&e),
            Ok(HoldRequest::Open(open)) => {
                // Application-consistent only while this point's quiesce
                // holds (its watchdog may have thawed already).
                let app_consistent =
                    open.app_consistent && self.span_quiesce().frozen_for(open.point, open.epoch);
                let mut p = self.participant();
                let reply = p.open(&open, now, || {
                    group
                        .hold_open(&open.label, app_consistent)
                        .map_err(refusal)
                });
                self.sync_gate(&p, group);
                held_reply(&reply)
            }
            Ok(HoldRequest::Release(release)) => {
                let mut p = self.participant();
                let holding = p.gate().is_some();
                // The writes the gate kept are counted by the group; a
                // release that ends nothing reports none.
                let gated = if holding { group.hold_gated() } else { 0 };
                let reply = p.release(&release, now, gated);
                self.sync_gate(&p, group);
                released_reply(&reply)
            }
            Ok(HoldRequest::Quiesce(quiesce)) => {
                quiesced_reply(&self.span_quiesce().quiesce(&quiesce))
            }
            Ok(HoldRequest::Thaw(thaw)) => thawed_reply(&self.span_quiesce().thaw(&thaw)),
        }
    }

    /// Time passed: a hold past its deadline ends.
    fn tick(&self, group: &Group) {
        let mut p = self.participant();
        if p.handle_timeout(Instant::now()) {
            self.sync_gate(&p, group);
        }
    }

    /// The session closed: its hold ends now, and its quiesce thaws.
    fn lost(&self, group: &Group) {
        {
            let mut p = self.participant();
            if p.connection_lost(Instant::now()) {
                self.sync_gate(&p, group);
            }
        }
        self.span_quiesce().end();
    }

    /// How long a session may wait for its next line.
    fn wait(&self) -> Duration {
        match self.participant().poll_timeout() {
            Some(at) => at
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
            None => SESSION_IDLE,
        }
    }
}

/// How long a hold session waits for a line when nothing is held, before
/// it checks whether the tracker stops.
const SESSION_IDLE: Duration = Duration::from_millis(250);

/// Why a group appended no hold marker, as the coordinator reads it.
fn refusal(error: MarkerError) -> Refusal {
    let code = match error {
        MarkerError::Starting => RefuseCode::Starting,
        MarkerError::BitmapMode => RefuseCode::BitmapMode,
        MarkerError::Label(_) | MarkerError::Append(_) | MarkerError::NotDurable => {
            RefuseCode::Busy
        }
    };
    Refusal {
        code,
        reason: error.to_string(),
    }
}

/// Serves a hold session until it closes or the tracker stops.
fn hold_session(stream: UnixStream, stop: &AtomicBool, holds: &Holds, group: &Group) {
    let result = (|| -> std::io::Result<()> {
        let mut writer = stream.try_clone()?;
        writer.write_all(ok_reply(serde_json::json!({"session": "hold"})).as_bytes())?;
        writer.write_all(b"\n")?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        while !stop.load(Ordering::SeqCst) {
            stream.set_read_timeout(Some(holds.wait()))?;
            // A line cut by the timeout stays in `line` and is completed
            // by the next read.
            match std::io::Read::take(&mut reader, MAX_REQUEST_LINE).read_line(&mut line) {
                Ok(0) => return Ok(()),
                Ok(_) if !line.ends_with('\n') && line.len() as u64 >= MAX_REQUEST_LINE => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "hold request line too long",
                    ));
                }
                Ok(_) if !line.ends_with('\n') => return Ok(()),
                Ok(_) => {
                    let reply = holds.handle(line.trim(), group);
                    line.clear();
                    writer.write_all(reply.as_bytes())?;
                    writer.write_all(b"\n")?;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    holds.tick(group);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "hold session ended");
    }
    holds.lost(group);
    holds.session_open.store(false, Ordering::SeqCst);
}

/// A running control socket.
pub struct ControlSocket {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    path: std::path::PathBuf,
}

impl ControlSocket {
    /// Listens on `path` (0600) and serves requests on a thread; span
    /// quiesces are answered not quiesced.
    pub fn start(
        path: &Path,
        group_name: String,
        group: Arc<Group>,
    ) -> std::io::Result<ControlSocket> {
        ControlSocket::start_quiescing(path, group_name, group, None)
    }

    /// [`Self::start`], with what an application-consistent span point
    /// quiesces (`[tracker.app-consistent]`).
    pub fn start_quiescing(
        path: &Path,
        group_name: String,
        group: Arc<Group>,
        quiesce: Option<Quiesce>,
    ) -> std::io::Result<ControlSocket> {
        ControlSocket::start_with(path, group_name, group, quiesce, KernelDevices::new())
    }

    /// [`Self::start_quiescing`], telling `devices` when a disk grows
    /// (`resize`).
    pub fn start_with(
        path: &Path,
        group_name: String,
        group: Arc<Group>,
        quiesce: Option<Quiesce>,
        devices: KernelDevices,
    ) -> std::io::Result<ControlSocket> {
        let listener = crate::server::bind_private_unix(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tracker-control".into())
            .spawn(move || serve(listener, &flag, &group_name, &group, quiesce, &devices))?;
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

fn serve(
    listener: UnixListener,
    stop: &Arc<AtomicBool>,
    group_name: &str,
    group: &Arc<Group>,
    quiesce: Option<Quiesce>,
    devices: &KernelDevices,
) {
    let holds = Arc::new(Holds {
        participant: Mutex::new(Participant::new(ParticipantConfig::default())),
        quiesce: Mutex::new(SpanQuiesce::new(quiesce)),
        session_open: AtomicBool::new(false),
    });
    let mut sessions = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => match answer(stream, group_name, group, &holds, devices) {
                Ok(Some(stream)) => {
                    let (stop, session, group) = (stop.clone(), holds.clone(), group.clone());
                    let spawned = std::thread::Builder::new()
                        .name("tracker-holds".into())
                        .spawn(move || hold_session(stream, &stop, &session, &group));
                    match spawned {
                        Ok(thread) => sessions.push(thread),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot serve a hold session");
                            holds.session_open.store(false, Ordering::SeqCst);
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "control request failed"),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                tracing::warn!(error = %e, "control socket accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        sessions.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
    }
    for session in sessions {
        let _ = session.join();
    }
}

/// Answers a connection's request; a hold session's connection is given
/// back to be served on a thread of its own.
fn answer(
    stream: UnixStream,
    group_name: &str,
    group: &Group,
    holds: &Holds,
    devices: &KernelDevices,
) -> std::io::Result<Option<UnixStream>> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    // (A hold session's client waits for the session's reply before it
    // sends more: nothing after this line is buffered here.)
    BufReader::new(std::io::Read::take(stream.try_clone()?, MAX_REQUEST_LINE))
        .read_line(&mut line)?;
    if matches!(Request::parse(&line), Ok(Request::HoldSession)) {
        if holds.session_open.swap(true, Ordering::SeqCst) {
            let mut stream = stream;
            stream.write_all(error_reply(&"another hold session is open").as_bytes())?;
            stream.write_all(b"\n")?;
            return Ok(None);
        }
        return Ok(Some(stream));
    }
    let reply = handle_line(line.trim(), group_name, group, devices);
    let mut stream = stream;
    stream.write_all(reply.as_bytes())?;
    stream.write_all(b"\n")?;
    if matches!(Request::parse(&line), Ok(Request::Stop)) {
        // The daemon's main thread waits for SIGTERM: stop exactly as it
        // would for one.
        tracing::info!("stop requested on the control socket");
        nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGTERM)
            .map_err(std::io::Error::from)?;
    }
    Ok(None)
}
