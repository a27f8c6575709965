//! A client of qemu's monitor protocol (QMP) on its unix socket
//! (`-qmp unix:PATH,server=on,wait=off`).
//!
//! Newline-delimited JSON. qemu greets, the client leaves negotiation
//! mode, then every command gets one reply carrying the command's `id`;
//! events arrive at any time, also between a command and its reply:
//!
//! ```text
//! qemu   -> {"QMP":{"version":{...},"capabilities":[...]}} 0A     greeting
//! client -> {"execute":"qmp_capabilities","id":0} 0A
//! qemu   -> {"return":{},"id":0} 0A
//! client -> {"execute":CMD,"arguments":{...},"id":N} 0A
//! qemu   -> {"event":NAME,"data":{...},"timestamp":{...}} 0A      any number, any time
//! qemu   -> {"return":VALUE,"id":N} 0A                            or
//! qemu   -> {"error":{"class":C,"desc":D},"id":N} 0A
//! ```
//!
//! [`Lines`] and [`Message::parse`] are the framing without I/O (the
//! guest agent's protocol, `crate::qga`, uses them too); [`Qmp`] drives
//! them over the socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest line accepted from qemu or the guest agent; a longer one
/// is refused rather than buffered without bound.
pub const MAX_LINE: usize = 16 << 20;

/// The bytes read from a socket, cut into lines.
#[derive(Debug, Default)]
pub struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    /// Takes bytes read from the socket.
    pub fn handle_bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole line (without its `\n`), if one has arrived.
    pub fn poll_line(&mut self) -> Result<Option<Vec<u8>>, FramingError> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(end) => {
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                Ok(Some(line))
            }
            None if self.buf.len() > MAX_LINE => Err(FramingError::LineTooLong),
            None => Ok(None),
        }
    }
}

/// The peer sent what the protocol does not allow (its fault).
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    /// A line that is not one of the protocol's messages.
    #[error("a line that is not a message of the protocol: {0:?}")]
    Malformed(String),
    /// A line longer than [`MAX_LINE`].
    #[error("a line of more than {MAX_LINE} bytes")]
    LineTooLong,
}

/// One message from qemu or the guest agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// qemu's greeting (`{"QMP": ...}`).
    Greeting(Value),
    /// A command succeeded: `{"return": VALUE}`.
    Return {
        /// The command's `id`, echoed.
        id: Option<Value>,
        /// What it returned.
        value: Value,
    },
    /// A command was refused: `{"error": {"class": C, "desc": D}}`.
    Error {
        /// The command's `id`, echoed.
        id: Option<Value>,
        /// The error's class, e.g. `GenericError`.
        class: String,
        /// Its description.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// Its name, e.g. `BLOCK_JOB_ERROR`.
        name: String,
        /// Its data (`null` when it has none).
        data: Value,
    },
}

impl Message {
    /// Parses one line.
    pub fn parse(line: &[u8]) -> Result<Message, FramingError> {
        let malformed = || FramingError::Malformed(String::from_utf8_lossy(line).into_owned());
        let mut value: Value = serde_json::from_slice(line).map_err(|_| malformed())?;
        let object = value.as_object_mut().ok_or_else(malformed)?;
        let id = object.remove("id");
        if let Some(greeting) = object.remove("QMP") {
            return Ok(Message::Greeting(greeting));
        }
        if let Some(value) = object.remove("return") {
            return Ok(Message::Return { id, value });
        }
        if let Some(error) = object.remove("error") {
            let text = |key: &str| {
                error
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            return Ok(Message::Error {
                id,
                class: text("class"),
                desc: text("desc"),
            });
        }
        match object.remove("event") {
            Some(Value::String(name)) => Ok(Message::Event {
                name,
                data: object.remove("data").unwrap_or(Value::Null),
            }),
            _ => Err(malformed()),
        }
    }
}

/// A command as the bytes to send.
pub fn command_bytes(execute: &str, arguments: Option<&Value>, id: Option<u64>) -> Vec<u8> {
    let mut command = serde_json::json!({ "execute": execute });
    if let Some(arguments) = arguments {
        command["arguments"] = arguments.clone();
    }
    if let Some(id) = id {
        command["id"] = id.into();
    }
    let mut bytes = command.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// Why talking to qemu's monitor failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Its socket could not be reached.
    #[error("cannot connect to qemu's monitor socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The first message was not a greeting: not a QMP socket.
    #[error("{} did not greet as a QMP monitor: {message:?}", path.display())]
    NoGreeting {
        /// The socket.
        path: PathBuf,
        /// What came instead.
        message: Message,
    },
    /// The connection was lost (closed, reset or silent past the timeout):
    /// what the last command did is unknown.
    #[error("lost qemu's monitor while waiting for the answer to {command}")]
    Lost {
        /// The command.
        command: String,
        /// What happened.
        #[source]
        source: std::io::Error,
    },
    /// qemu broke the protocol.
    #[error("qemu's monitor")]
    Framing(#[from] FramingError),
    /// qemu refused the command.
    #[error("qemu refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// The error's class.
        class: String,
        /// Its description.
        desc: String,
    },
}

/// A connection to qemu's monitor, out of negotiation mode.
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    lines: Lines,
    next_id: u64,
    timeout: Duration,
}

impl Qmp {
    /// Connects to the monitor at `path`, reads the greeting and leaves
    /// negotiation mode; every answer is awaited at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let mut qmp = Qmp {
            stream,
            lines: Lines::default(),
            next_id: 0,
            timeout,
        };
        match qmp.next_message("the greeting")? {
            Message::Greeting(_) => {}
            message => {
                return Err(QmpError::NoGreeting {
                    path: path.to_owned(),
                    message,
                })
            }
        }
        qmp.execute("qmp_capabilities", None, &mut |_, _| {})?;
        Ok(qmp)
    }

    /// Runs `command` and returns its reply; events that arrive before
    /// the reply go to `on_event` (name, data).
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<&Value>,
        on_event: &mut dyn FnMut(&str, &Value),
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let lost = |source| QmpError::Lost {
            command: command.to_owned(),
            source,
        };
        self.stream
            .write_all(&command_bytes(command, arguments, Some(id)))
            .map_err(lost)?;
        loop {
            match self.next_message(command)? {
                Message::Event { name, data } => on_event(&name, &data),
                Message::Return {
                    id: Some(got),
                    value,
                } if got == id => return Ok(value),
                Message::Error {
                    id: Some(got),
                    class,
                    desc,
                } if got == id => {
                    return Err(QmpError::Refused {
                        command: command.to_owned(),
                        class,
                        desc,
                    })
                }
                // A reply to another id: an earlier command's, abandoned.
                _ => {}
            }
        }
    }

    fn next_message(&mut self, command: &str) -> Result<Message, QmpError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(line) = self.lines.poll_line()? {
                return Ok(Message::parse(&line)?);
            }
            let lost = |source| QmpError::Lost {
                command: command.to_owned(),
                source,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(lost(std::io::ErrorKind::TimedOut.into()));
            }
            self.stream.set_read_timeout(Some(left)).map_err(lost)?;
            let mut chunk = [0u8; 16 << 10];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(lost(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => self.lines.handle_bytes(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(lost(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_told_apart() {
        let parse = |text: &str| Message::parse(text.as_bytes()).unwrap();
        assert!(matches!(
            parse(r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#),
            Message::Greeting(_)
        ));
        assert_eq!(
            parse(r#"{"return": {}, "id": 3}"#),
            Message::Return {
                id: Some(3.into()),
                value: serde_json::json!({})
            }
        );
        assert_eq!(
            parse(r#"{"error": {"class": "GenericError", "desc": "no"}, "id": 4}"#),
            Message::Error {
                id: Some(4.into()),
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        assert_eq!(
            parse(r#"{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}"#),
            Message::Event {
                name: "STOP".into(),
                data: Value::Null
            }
        );
        for bad in [&b"[1]"[..], b"{\"x\": 1}", b"{\"event\": 3}", b"\xff{"] {
            assert!(matches!(
                Message::parse(bad),
                Err(FramingError::Malformed(_))
            ));
        }
    }

    #[test]
    fn lines_are_cut_at_newlines_and_bounded() {
        let mut lines = Lines::default();
        lines.handle_bytes(b"{\"a\"");
        assert_eq!(lines.poll_line().unwrap(), None);
        lines.handle_bytes(b": 1}\n{}\n");
        assert_eq!(lines.poll_line().unwrap().unwrap(), b"{\"a\": 1}");
        assert_eq!(lines.poll_line().unwrap().unwrap(), b"{}");
        assert_eq!(lines.poll_line().unwrap(), None);
        lines.handle_bytes(&vec![b' '; MAX_LINE + 1]);
        assert!(matches!(lines.poll_line(), Err(FramingError::LineTooLong)));
    }

    #[test]
    fn a_command_carries_its_id() {
        let bytes = command_bytes(
            "blockdev-del",
            Some(&serde_json::json!({"node-name": "f0"})),
            Some(9),
        );
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"execute": "blockdev-del", "arguments": {"node-name": "f0"}, "id": 9})
        );
    }
}
