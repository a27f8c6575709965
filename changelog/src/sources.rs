//! The group's disks, as the tracker serves them: `disks` in the log
//! directory. Records name disks by id; the shipper needs more than the id
//! for initial sync and resync, which read the disks themselves: the name
//! (the receiver files replicas under it), the size and the backing path.
//!
//! A short text file written by the tracker at every start, replaced
//! atomically (`disks.tmp`, fdatasync, rename, fsync of the directory); one
//! line per disk in id order, the path last (it may hold spaces), and a
//! CRC32C line over everything before it:
//!
//! ```text
//! tidemark-disks 1
//! 0 10737418240 data /dev/sdb
//! 1 2147483648 wal /srv/images/wal disk.raw
//! crc32c 1a2b3c4d
//! ```
//!
//! Version 1 (the first line) is the only version so far; a file of another
//! version reads as damaged.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const FILE: &str = "disks";
const TMP: &str = "disks.tmp";
const HEADER: &str = "tidemark-disks 1";

/// One disk of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSource {
    /// Its id in the log's records.
    pub id: u32,
    /// Its name (no whitespace).
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// The backing block device or image file the tracker serves.
    pub path: PathBuf,
}

/// Why the disks file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourcesError {
    /// Reading or writing failed.
    #[error("disks file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// It does not verify or does not parse.
    #[error("disks file {path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A name with whitespace or an empty name cannot be written.
    #[error("disk name {0:?} must be non-empty and without whitespace")]
    BadName(String),
}

/// Reads the disks of the group whose log is in `dir`; `None` if the
/// tracker never started there.
pub fn read_sources(dir: &Path) -> Result<Option<Vec<DiskSource>>, SourcesError> {
    let path = dir.join(FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(SourcesError::Io { path, source }),
    };
    let damaged = |reason: String| SourcesError::Damaged {
        path: path.clone(),
        reason,
    };
    let body = crate::sealed::unseal(&text).map_err(|r| damaged(r.into()))?;
    let mut lines = body.lines();
    if lines.next() != Some(HEADER) {
        return Err(damaged("unknown header".into()));
    }
    let mut disks = Vec::new();
    for line in lines {
        let mut parts = line.splitn(4, ' ');
        let (Some(id), Some(size), Some(name), Some(p)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(damaged(format!("bad line {line:?}")));
        };
        let id: u32 = id
            .parse()
            .map_err(|_| damaged(format!("bad disk id in {line:?}")))?;
        if id as usize != disks.len() {
            return Err(damaged(format!("disk ids out of order at {line:?}")));
        }
        let size = size
            .parse()
            .map_err(|_| damaged(format!("bad size in {line:?}")))?;
        disks.push(DiskSource {
            id,
            name: name.to_string(),
            size,
            path: PathBuf::from(p),
        });
    }
    Ok(Some(disks))
}

/// Writes the disks of the group into `dir`, atomically.
pub fn write_sources(dir: &Path, disks: &[DiskSource]) -> Result<(), SourcesError> {
    let mut body = format!("{HEADER}\n");
    for d in disks {
        if d.name.is_empty() || d.name.contains(char::is_whitespace) {
            return Err(SourcesError::BadName(d.name.clone()));
        }
        body.push_str(&format!(
            "{} {} {} {}\n",
            d.id,
            d.size,
            d.name,
            d.path.display()
        ));
    }
    crate::sealed::write_atomic(dir, TMP, FILE, &crate::sealed::seal(&body))
        .map_err(|(path, source)| SourcesError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_sources(dir.path()).unwrap().is_none());
        let disks = vec![
            DiskSource {
                id: 0,
                name: "data".into(),
                size: 1 << 30,
                path: "/dev/sdb".into(),
            },
            DiskSource {
                id: 1,
                name: "wal".into(),
                size: 4096,
                path: "/srv/a b/wal.raw".into(),
            },
        ];
        write_sources(dir.path(), &disks).unwrap();
        assert_eq!(read_sources(dir.path()).unwrap().unwrap(), disks);
        let path = dir.path().join(FILE);
        let text = fs::read_to_string(&path).unwrap().replace("4096", "8192");
        fs::write(&path, text).unwrap();
        assert!(matches!(
            read_sources(dir.path()),
            Err(SourcesError::Damaged { .. })
        ));
        let bad = [DiskSource {
            id: 0,
            name: "a b".into(),
            size: 1,
            path: "/x".into(),
        }];
        assert!(matches!(
            write_sources(dir.path(), &bad),
            Err(SourcesError::BadName(_))
        ));
    }
}
