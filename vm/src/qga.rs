//! A client of the qemu guest agent (`qemu-guest-agent` in the guest,
//! reached through the unix socket of the VM's
//! `org.qemu.guest_agent.0` virtio-serial port): synchronise, freeze and
//! thaw the guest's filesystems.
//!
//! The protocol is newline-delimited JSON with no greeting. The channel
//! is a byte stream that outlives agent restarts and host reconnects, so
//! replies to an earlier client may still be queued in it: a session
//! starts by synchronising.
//!
//! ```text
//! host  -> FF                                        resets the agent's JSON parser
//! host  -> {"execute":"guest-sync-delimited","arguments":{"id":ID}} 0A
//! agent -> {"error":{...}} 0A                        (its answer to the FF; stale replies)
//! agent -> FF {"return":ID} 0A                       synchronised: what follows is ours
//! host  -> {"execute":"guest-fsfreeze-freeze"} 0A
//! agent -> {"return":N} 0A                           N filesystems frozen
//! host  -> {"execute":"guest-fsfreeze-thaw"} 0A
//! agent -> {"return":N} 0A
//! agent -> {"error":{"class":C,"desc":D}} 0A        a refused command
//! ```
//!
//! [`Session`] is the protocol without I/O (bytes in, replies out);
//! [`GuestAgent`] drives it over the socket with a timeout per answer.
//! The socket takes one client at a time: a second connection waits
//! until the first closes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::qmp::{command_bytes, FramingError, Lines, Message};

/// The byte that resets the agent's parser and precedes its answer to
/// `guest-sync-delimited`.
const DELIMITER: u8 = 0xFF;

/// The agent's answer to one command.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// `{"return": VALUE}`.
    Return(Value),
    /// `{"error": {"class": CLASS, "desc": DESC}}`: the agent refused.
    Error {
        /// The error's class, e.g. `GenericError`, `CommandNotFound`.
        class: String,
        /// Its description.
        desc: String,
    },
}

/// Where a [`Session`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for `FF {"return": id}`; everything before is stale.
    Syncing { id: u64 },
    /// Synchronised: every line is the reply to the next command.
    Ready,
}

/// The guest agent protocol without I/O: [`Session::sync_request`]
/// starts it, [`Session::handle_bytes`] takes what the socket read,
/// [`Session::is_synced`] and [`Session::poll_reply`] say what came of it.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    lines: Lines,
}

impl Session {
    /// A session that synchronises with `id` (any number unlikely to be
    /// in a stale reply), and the bytes to send for it.
    pub fn sync_request(id: u64) -> (Session, Vec<u8>) {
        let mut bytes = vec![DELIMITER];
        bytes.extend(command_bytes(
            "guest-sync-delimited",
            Some(&serde_json::json!({ "id": id })),
            None,
        ));
        (
            Session {
                phase: Phase::Syncing { id },
                lines: Lines::default(),
            },
            bytes,
        )
    }

    /// Takes bytes read from the socket.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.lines.handle_bytes(bytes);
    }

    /// Whether the agent has answered the synchronisation (consumes the
    /// stale lines before it).
    pub fn is_synced(&mut self) -> Result<bool, FramingError> {
        while let Phase::Syncing { id } = self.phase {
            let Some(line) = self.lines.poll_line()? else {
                return Ok(false);
            };
            // The answer follows the agent's FF; a stale line has none,
            // or answers another id.
            let Some(at) = line.iter().rposition(|&b| b == DELIMITER) else {
                continue;
            };
            let answer: Option<Value> = serde_json::from_slice(&line[at + 1..]).ok();
            if answer.and_then(|v| v.get("return").and_then(Value::as_u64)) == Some(id) {
                self.phase = Phase::Ready;
            }
        }
        Ok(true)
    }

    /// The next reply, once synchronised and a whole line has arrived.
    pub fn poll_reply(&mut self) -> Result<Option<Reply>, FramingError> {
        if !self.is_synced()? {
            return Ok(None);
        }
        let Some(line) = self.lines.poll_line()? else {
            return Ok(None);
        };
        match Message::parse(&line)? {
            Message::Return { value, .. } => Ok(Some(Reply::Return(value))),
            Message::Error { class, desc, .. } => Ok(Some(Reply::Error { class, desc })),
            Message::Greeting(_) | Message::Event { .. } => Err(FramingError::Malformed(
                String::from_utf8_lossy(&line).into_owned(),
            )),
        }
    }
}

/// Why talking to the guest agent failed.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// Its socket could not be reached (no VM, or no agent channel).
    #[error("cannot connect to the guest agent's socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time (no agent running in the guest, or it is busy).
    #[error("the guest agent did not answer {command} within {after:?}")]
    NoAnswer {
        /// The command.
        command: &'static str,
        /// How long it was given.
        after: Duration,
    },
    /// The connection closed before the answer.
    #[error("the guest agent's socket closed before it answered {command}")]
    Closed {
        /// The command.
        command: &'static str,
    },
    /// Reading or writing the socket failed.
    #[error("talking to the guest agent")]
    Io(#[source] std::io::Error),
    /// The agent broke the protocol.
    #[error("the guest agent")]
    Protocol(#[from] FramingError),
    /// The agent refused the command.
    #[error("the guest agent refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: &'static str,
        /// The error's class.
        class: String,
        /// Its description.
        desc: String,
    },
    /// The agent answered with a value the command does not return.
    #[error("the guest agent answered {command} with {value}")]
    Unexpected {
        /// The command.
        command: &'static str,
        /// The answer.
        value: Value,
    },
}

impl QgaError {
    /// Whether this says that no agent is there to answer (as opposed to
    /// an agent that answered badly).
    pub fn is_absent(&self) -> bool {
        matches!(
            self,
            QgaError::Connect { .. } | QgaError::NoAnswer { .. } | QgaError::Closed { .. }
        )
    }
}

/// A synchronised connection to a guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    stream: UnixStream,
    session: Session,
}

impl GuestAgent {
    /// Connects to the agent's socket at `path` and synchronises, waiting
    /// at most `timeout` for its answer.
    pub fn connect(path: &Path, timeout: Duration) -> Result<GuestAgent, QgaError> {
        let stream = UnixStream::connect(path).map_err(|source| QgaError::Connect {
            path: path.to_owned(),
            source,
        })?;
        // Any number a stale reply is unlikely to carry.
        let id = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        let (session, request) = Session::sync_request(id);
        let mut agent = GuestAgent { stream, session };
        agent.stream.write_all(&request).map_err(QgaError::Io)?;
        let deadline = Instant::now() + timeout;
        let command = "guest-sync-delimited";
        while !agent.session.is_synced()? {
            agent.read_some(command, deadline, timeout)?;
        }
        Ok(agent)
    }

    /// A handle on the socket, to shut it down from another thread (which
    /// ends a command waiting on it).
    pub fn shutdown_handle(&self) -> Result<UnixStream, QgaError> {
        self.stream.try_clone().map_err(QgaError::Io)
    }

    /// Runs `command` and waits at most `timeout` for its reply.
    pub fn execute(
        &mut self,
        command: &'static str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        self.stream
            .write_all(&command_bytes(command, arguments.as_ref(), None))
            .map_err(QgaError::Io)?;
        let deadline = Instant::now() + timeout;
        loop {
            match self.session.poll_reply()? {
                Some(Reply::Return(value)) => return Ok(value),
                Some(Reply::Error { class, desc }) => {
                    return Err(QgaError::Refused {
                        command,
                        class,
                        desc,
                    })
                }
                None => self.read_some(command, deadline, timeout)?,
            }
        }
    }

    /// Freezes the guest's filesystems; returns how many.
    pub fn freeze(&mut self, timeout: Duration) -> Result<u64, QgaError> {
        self.count("guest-fsfreeze-freeze", timeout)
    }

    /// Thaws the guest's filesystems; returns how many were frozen.
    pub fn thaw(&mut self, timeout: Duration) -> Result<u64, QgaError> {
        self.count("guest-fsfreeze-thaw", timeout)
    }

    fn count(&mut self, command: &'static str, timeout: Duration) -> Result<u64, QgaError> {
        let value = self.execute(command, None, timeout)?;
        value
            .as_u64()
            .ok_or(QgaError::Unexpected { command, value })
    }

    /// Reads what has arrived into the session, waiting until `deadline`.
    fn read_some(
        &mut self,
        command: &'static str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), QgaError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QgaError::NoAnswer {
                command,
                after: timeout,
            });
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(QgaError::Io)?;
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => Err(QgaError::Closed { command }),
            Ok(n) => {
                self.session.handle_bytes(&chunk[..n]);
                Ok(())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(QgaError::NoAnswer {
                    command,
                    after: timeout,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(QgaError::Io(e)),
        }
    }
}

/// Connects anew to the agent at `path` and thaws (what a watchdog does
/// when the connection that froze is stuck): returns how many
/// filesystems were frozen.
pub fn thaw_at(path: &Path, timeout: Duration) -> Result<u64, QgaError> {
    let started = Instant::now();
    let mut agent = GuestAgent::connect(path, timeout)?;
    agent.thaw(
        timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(100)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synced(id: u64) -> Session {
        let (mut session, _) = Session::sync_request(id);
        let mut answer = vec![0xFF];
        answer.extend(format!("{{\"return\": {id}}}\n").bytes());
        session.handle_bytes(&answer);
        assert!(session.is_synced().unwrap());
        session
    }

    #[test]
    fn the_sync_request_is_the_delimiter_then_the_command() {
        let (_, bytes) = Session::sync_request(42);
        assert_eq!(bytes[0], 0xFF);
        let command: Value = serde_json::from_slice(&bytes[1..]).unwrap();
        assert_eq!(
            command,
            serde_json::json!({"execute": "guest-sync-delimited", "arguments": {"id": 42}})
        );
        assert_eq!(bytes.last(), Some(&b'\n'));
    }

    #[test]
    fn stale_lines_before_the_delimited_answer_are_skipped() {
        let (mut session, _) = Session::sync_request(7);
        // What qemu-ga answers: an error for the FF, a stale reply of an
        // earlier client, a delimited answer to another id, then ours,
        // split across reads.
        session.handle_bytes(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\ufffd'\"}}\n");
        session.handle_bytes(b"{\"return\": 3}\n\xff{\"return\": 6}\n\xff{\"ret");
        assert!(!session.is_synced().unwrap());
        assert_eq!(session.poll_reply().unwrap(), None);
        session.handle_bytes(b"urn\": 7}\n{\"return\": 2}\n");
        assert!(session.is_synced().unwrap());
        assert_eq!(
            session.poll_reply().unwrap(),
            Some(Reply::Return(Value::from(2)))
        );
        assert_eq!(session.poll_reply().unwrap(), None);
    }

    #[test]
    fn errors_and_malformed_lines_are_told_apart() {
        let mut session = synced(7);
        session.handle_bytes(
            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"disabled\"}}\nnot json\n",
        );
        assert_eq!(
            session.poll_reply().unwrap(),
            Some(Reply::Error {
                class: "CommandNotFound".into(),
                desc: "disabled".into()
            })
        );
        assert!(matches!(
            session.poll_reply(),
            Err(FramingError::Malformed(line)) if line == "not json"
        ));
        session.handle_bytes(b"{\"neither\": 1}\n");
        assert!(matches!(
            session.poll_reply(),
            Err(FramingError::Malformed(_))
        ));
    }

    #[test]
    fn an_endless_line_is_refused() {
        let (mut session, _) = Session::sync_request(1);
        session.handle_bytes(&vec![b'x'; crate::qmp::MAX_LINE + 1]);
        assert!(matches!(
            session.is_synced(),
            Err(FramingError::LineTooLong)
        ));
    }

    #[test]
    fn no_socket_and_no_answer_mean_no_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let err = GuestAgent::connect(&path, Duration::from_millis(100)).unwrap_err();
        assert!(err.is_absent(), "{err}");
        // A socket nobody answers on: qemu's chardev without an agent.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let started = Instant::now();
        let err = GuestAgent::connect(&path, Duration::from_millis(200)).unwrap_err();
        assert!(
            matches!(
                err,
                QgaError::NoAnswer {
                    command: "guest-sync-delimited",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.is_absent());
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
