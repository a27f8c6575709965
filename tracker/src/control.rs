//! The tracker's control socket: the server side of the control
//! protocol (`tidemark_control`, where the requests, the replies and the
//! client live), on a unix socket (0600), one request per connection.

use crate::group::Group;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidemark_control::{
    error_reply, ok_reply, DiskStatus, Request, StatusReply, Tracking, MAX_REQUEST_LINE,
};

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
            .enumerate()
            .map(|(i, name)| DiskStatus {
                name: name.into_string(),
                tracking,
                hot_extents: s.hot_extents[i],
                dirty_extents: s.dirty_extents[i],
            })
            .collect(),
    }
}

/// Answers one request line.
pub fn handle_line(line: &str, group_name: &str, group: &Group) -> String {
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
        Request::Stop => ok_reply(serde_json::json!({})),
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
    BufReader::new(std::io::Read::take(stream.try_clone()?, MAX_REQUEST_LINE))
        .read_line(&mut line)?;
    let reply = handle_line(line.trim(), group_name, group);
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
    Ok(())
}
