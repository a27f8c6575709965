//! Planned failover, the replica site's half: `tidemark failover --planned`
//! leaves a drain request for the group; the receiver that applies the
//! group, while the group's shipper is connected, passes it on (a
//! `drain-request` message), and leaves the shipper's answer beside it.
//!
//! Where request and answer are kept is the [`DrainChannel`] seam, one code
//! path for the daemon and the CLI ([`channel`] picks it):
//! - the local store: two files in the group's directory ([`DrainDir`],
//!   below), read and written on the receiver's node;
//! - the Ceph store: one object of the group in the cluster, so that the
//!   CLI on any receiver node reaches the receiver that applies the group,
//!   whichever it is (`crate::store::ceph::drain`, whose module documents
//!   the object).
//!
//! Both keep the same bodies, sealed text (a crc32c line, see
//! `tidemark_changelog::sealed`):
//!
//! ```text
//!  request   id N
//!            expires-ns T      (absent in requests of older releases: no
//!                               expiry) the CLI's deadline: a request
//!                               left by a CLI that died is passed on to
//!                               no shipper after it
//!  answer    id N
//!            last-seq M        (drained: every record up to M is durable
//!                               at the replica)
//!         or error TEXT        (why it could not drain)
//! ```
//!
//! Rules (both implementations):
//! - A new request replaces the old request and removes the old answer.
//! - An answer retires the request it answers, never a newer one: a CLI
//!   that asked again meanwhile waits for its own answer.
//! - An answer to a withdrawn request (none pending, nothing kept) is
//!   dropped: nobody waits for it.
//! - Files are replaced atomically, so a torn or stale local file reads as
//!   absent or as another request, never as a wrong answer; a cluster
//!   object is changed whole by one operation, so a damaged or foreign one
//!   is refused by name ([`DrainError`]).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use tidemark_changelog::sealed::{seal, unseal, write_atomic};
pub use tidemark_wire::DrainRefused;

/// The request's file name in the group directory.
pub const REQUEST: &str = "drain.request";
/// The answer's file name in the group directory.
pub const RESULT: &str = "drain.result";

/// The answer to drain request `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrainResult {
    /// The request it answers.
    pub id: u64,
    /// The last record of the stopped tracker, durable at the replica; or
    /// why the group could not be drained.
    pub result: Result<u64, DrainRefused>,
}

/// A drain request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainRequest {
    /// Its id (the answer names it).
    pub id: u64,
    /// Until when it may be passed on (ns since the Unix epoch): the
    /// CLI's deadline. `None`: no expiry (a request of an older release).
    pub expires_ns: Option<u64>,
}

impl DrainRequest {
    /// Whether the request may still be passed to a shipper at `now_ns`:
    /// past its deadline the CLI that left it has given up (or died), and
    /// draining would stop a protected host nobody fails over.
    pub fn live(&self, now_ns: u64) -> bool {
        self.expires_ns.is_none_or(|t| now_ns < t)
    }

    /// Its sealed body.
    pub fn body(&self) -> String {
        match self.expires_ns {
            Some(t) => format!("id {}\nexpires-ns {t}\n", self.id),
            None => format!("id {}\n", self.id),
        }
    }

    /// The request of `lines`; `None` if they hold none.
    pub fn parse(lines: &[(String, String)]) -> Option<DrainRequest> {
        let id = field(lines, "id")?.parse().ok()?;
        let expires_ns = match field(lines, "expires-ns") {
            Some(t) => Some(t.parse().ok()?),
            None => None,
        };
        Some(DrainRequest { id, expires_ns })
    }
}

impl DrainResult {
    /// Its sealed body.
    pub fn body(&self) -> String {
        match &self.result {
            Ok(seq) => format!("id {}\nlast-seq {seq}\n", self.id),
            Err(why) => format!("id {}\nerror {}\n", self.id, why.reason.replace('\n', " ")),
        }
    }

    /// The answer of `lines`; `None` if they hold none.
    pub fn parse(lines: &[(String, String)]) -> Option<DrainResult> {
        let id = field(lines, "id")?.parse().ok()?;
        let result = match (field(lines, "last-seq"), field(lines, "error")) {
            (Some(seq), None) => Ok(seq.parse().ok()?),
            (None, Some(why)) => Err(DrainRefused {
                reason: why.to_string(),
            }),
            _ => return None,
        };
        Some(DrainResult { id, result })
    }
}

/// Why a drain request or answer could not be kept or read.
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    /// The local disk, or the cluster (a failed or timed-out operation).
    #[error("{what} {at}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where: a path, or the cluster's object.
        at: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The store's object is no drain object of this release (a newer
    /// release's format, or another program's object under the name).
    #[error("{at} is no drain object this release reads (format {format:?})")]
    Foreign {
        /// The object.
        at: String,
        /// Its format attribute.
        format: String,
    },
    /// The store's object holds a request or answer that does not verify
    /// (its checksum, or a missing field): damage in the store.
    #[error("{at} is damaged: its {what} does not verify ({why})")]
    Damaged {
        /// The object.
        at: String,
        /// `request` or `answer`.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// Where a group's drain request and its answer are kept: see the module.
pub trait DrainChannel: Send + Sync + std::fmt::Debug {
    /// Leaves `request`, replacing any other, and removes an old answer.
    fn request(&self, request: &DrainRequest) -> Result<(), DrainError>;
    /// The pending request, if there is one.
    fn pending(&self) -> Result<Option<DrainRequest>, DrainError>;
    /// Keeps the answer `result` and retires the request it answers (a
    /// newer request stays pending); dropped if no request or answer is
    /// kept (the request was withdrawn).
    fn answer(&self, result: &DrainResult) -> Result<(), DrainError>;
    /// The answer to the last request, if there is one.
    fn answered(&self) -> Result<Option<DrainResult>, DrainError>;
    /// Removes the request and the answer (after a planned failover, or
    /// to withdraw a request).
    fn clear(&self) -> Result<(), DrainError>;
    /// Where they are kept, for messages.
    fn describe(&self) -> String;
}

/// The drain channel of `host`'s `group`: the store's (`engine`, e.g. the
/// cluster's object), or the files in the group's directory `group_dir`.
pub fn channel(
    engine: &dyn crate::store::StoreEngine,
    group_dir: &Path,
    host: &tidemark_names::Name,
    group: &tidemark_names::Name,
) -> Box<dyn DrainChannel> {
    engine
        .drain_channel(host, group)
        .unwrap_or_else(|| Box::new(DrainDir::new(group_dir)))
}

/// The drain request and answer as files in a group's directory (the
/// local store).
#[derive(Debug, Clone)]
pub struct DrainDir {
    dir: PathBuf,
}

impl DrainDir {
    /// The files in `group_dir`.
    pub fn new(group_dir: &Path) -> DrainDir {
        DrainDir {
            dir: group_dir.to_path_buf(),
        }
    }

    fn io(&self, what: &'static str) -> impl FnOnce(io::Error) -> DrainError + '_ {
        move |source| DrainError::Io {
            what,
            at: self.dir.display().to_string(),
            source,
        }
    }
}

impl DrainChannel for DrainDir {
    fn request(&self, request: &DrainRequest) -> Result<(), DrainError> {
        clear(&self.dir).map_err(self.io("clearing an old drain request in"))?;
        write(&self.dir, REQUEST, &request.body()).map_err(self.io("leaving the drain request in"))
    }

    fn pending(&self) -> Result<Option<DrainRequest>, DrainError> {
        Ok(read(&self.dir, REQUEST)
            .map_err(self.io("reading the drain request in"))?
            .and_then(|lines| DrainRequest::parse(&lines)))
    }

    fn answer(&self, result: &DrainResult) -> Result<(), DrainError> {
        if !self.dir.join(REQUEST).exists() && !self.dir.join(RESULT).exists() {
            // Withdrawn: nobody waits for the answer.
            return Ok(());
        }
        write(&self.dir, RESULT, &result.body()).map_err(self.io("writing the drain answer in"))?;
        if self.pending()?.map(|r| r.id) == Some(result.id) {
            match std::fs::remove_file(self.dir.join(REQUEST)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io("retiring the drain request in")(e)),
            }
        }
        Ok(())
    }

    fn answered(&self) -> Result<Option<DrainResult>, DrainError> {
        read_result(&self.dir).map_err(self.io("reading the drain answer in"))
    }

    fn clear(&self) -> Result<(), DrainError> {
        clear(&self.dir).map_err(self.io("removing the drain request in"))
    }

    fn describe(&self) -> String {
        self.dir.display().to_string()
    }
}

/// Writes `body` sealed into `name` of `group_dir`, atomically, owned by the
/// directory's owner (also a span's directory).
pub(crate) fn write(group_dir: &Path, name: &str, body: &str) -> io::Result<()> {
    write_atomic(group_dir, &format!("{name}.tmp"), name, &seal(body)).map_err(|(path, e)| {
        io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
    })?;
    // The CLI runs as root, the receiver as the directory's owner: the
    // file belongs to whoever owns the directory, so both can read it.
    let dir = std::fs::metadata(group_dir)?;
    let path = group_dir.join(name);
    let file = std::fs::metadata(&path)?;
    if (file.uid(), file.gid()) != (dir.uid(), dir.gid()) {
        std::os::unix::fs::chown(&path, Some(dir.uid()), Some(dir.gid()))
            .map_err(|e| io::Error::new(e.kind(), format!("chown {}: {e}", path.display())))?;
    }
    Ok(())
}

/// The lines of a sealed file as (key, value); `None` if it is absent,
/// torn or damaged.
pub(crate) fn read(group_dir: &Path, name: &str) -> io::Result<Option<Vec<(String, String)>>> {
    let text = match std::fs::read_to_string(group_dir.join(name)) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Ok(body) = unseal(&text) else {
        return Ok(None);
    };
    Ok(Some(
        body.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    ))
}

/// The value of `key` among `lines`.
pub(crate) fn field<'a>(lines: &'a [(String, String)], key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Leaves drain request `id` for the receiver.
pub fn write_request(group_dir: &Path, id: u64) -> io::Result<()> {
    write(group_dir, REQUEST, &format!("id {id}\n"))
}

/// The pending drain request's id, if there is one.
pub fn read_request(group_dir: &Path) -> io::Result<Option<u64>> {
    Ok(read(group_dir, REQUEST)?
        .and_then(|lines| DrainRequest::parse(&lines))
        .map(|r| r.id))
}

/// Writes the answer to a request.
pub fn write_result(group_dir: &Path, result: &DrainResult) -> io::Result<()> {
    write(group_dir, RESULT, &result.body())
}

/// The answer to the last request, if there is one.
pub fn read_result(group_dir: &Path) -> io::Result<Option<DrainResult>> {
    Ok(read(group_dir, RESULT)?.and_then(|lines| DrainResult::parse(&lines)))
}

/// Removes the request and the answer (after a planned failover, or to
/// cancel one).
pub fn clear(group_dir: &Path) -> io::Result<()> {
    for name in [REQUEST, RESULT] {
        match std::fs::remove_file(group_dir.join(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_and_damage_reads_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(read_request(d).unwrap(), None);
        assert_eq!(read_result(d).unwrap(), None);
        write_request(d, 7).unwrap();
        assert_eq!(read_request(d).unwrap(), Some(7));
        let ok = DrainResult {
            id: 7,
            result: Ok(1234),
        };
        write_result(d, &ok).unwrap();
        assert_eq!(read_result(d).unwrap(), Some(ok));
        let failed = DrainResult {
            id: 8,
            result: Err(DrainRefused {
                reason: "the tracker refused:\nbusy".into(),
            }),
        };
        write_result(d, &failed).unwrap();
        assert_eq!(
            read_result(d).unwrap().unwrap().result,
            Err(DrainRefused {
                reason: "the tracker refused: busy".to_string()
            })
        );
        // A flipped byte: no answer rather than a wrong one.
        let path = d.join(RESULT);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[3] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(read_result(d).unwrap(), None);
        clear(d).unwrap();
        assert_eq!(read_request(d).unwrap(), None);
        clear(d).unwrap();
    }
}
