//! Planned failover, the replica site's half: `tidemark failover --planned`
//! leaves a drain request in the group's directory; the receiver, while the
//! group's shipper is connected, passes it on (a `drain-request` message),
//! and writes the shipper's answer next to it.
//!
//! ```text
//!  <group dir>/drain.request   id N
//!  <group dir>/drain.result    id N
//!                              last-seq M        (drained: every record up
//!                                                 to M is durable here)
//!                           or error TEXT        (why it could not drain)
//! ```
//!
//! Both are sealed text files (a crc32c line, see
//! `tidemark_changelog::sealed`) replaced atomically, so a torn or stale
//! file reads as absent or as another request, never as a wrong answer.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
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
    Ok(
        read(group_dir, REQUEST)?
            .and_then(|lines| field(&lines, "id").and_then(|v| v.parse().ok())),
    )
}

/// Writes the answer to a request.
pub fn write_result(group_dir: &Path, result: &DrainResult) -> io::Result<()> {
    let body = match &result.result {
        Ok(seq) => format!("id {}\nlast-seq {seq}\n", result.id),
        Err(why) => format!(
            "id {}\nerror {}\n",
            result.id,
            why.reason.replace('\n', " ")
        ),
    };
    write(group_dir, RESULT, &body)
}

/// The answer to the last request, if there is one.
pub fn read_result(group_dir: &Path) -> io::Result<Option<DrainResult>> {
    let Some(lines) = read(group_dir, RESULT)? else {
        return Ok(None);
    };
    let Some(id) = field(&lines, "id").and_then(|v| v.parse().ok()) else {
        return Ok(None);
    };
    let result = match (field(&lines, "last-seq"), field(&lines, "error")) {
        (Some(seq), None) => match seq.parse() {
            Ok(seq) => Ok(seq),
            Err(_) => return Ok(None),
        },
        (None, Some(why)) => Err(DrainRefused {
            reason: why.to_string(),
        }),
        _ => return Ok(None),
    };
    Ok(Some(DrainResult { id, result }))
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
