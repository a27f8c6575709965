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
//! Ids are stable ([`DiskId`]): a group that removed a disk has a gap in
//! them. Version 1 (the first line) lists ids `0, 1, 2, …`; version 2 the
//! same lines with ids that only increase. Version 1 is written while the
//! ids are positions, so the releases that read only version 1 keep reading
//! the file of a group that never removed a disk; version 2 otherwise
//! (those releases refuse it as damaged rather than mislabel a disk). Both
//! are read; a file of another version reads as damaged.

use crate::disk::Disk;
use crate::DiskId;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use tidemark_names::Name;

const FILE: &str = "disks";
const TMP: &str = "disks.tmp";
const HEADER: &str = "tidemark-disks 1";
const HEADER_SPARSE: &str = "tidemark-disks 2";

/// One disk of the group and where the tracker reads and writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSource {
    /// The disk (id, name, size).
    pub disk: Disk,
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
    /// A path that is not UTF-8 or holds a line break cannot be written:
    /// it would read back as another path, or not at all.
    #[error("disk path {0:?} must be UTF-8 without line breaks")]
    BadPath(PathBuf),
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
    let dense = match lines.next() {
        Some(HEADER) => true,
        Some(HEADER_SPARSE) => false,
        _ => return Err(damaged("unknown header".into())),
    };
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
        let in_order = if dense {
            id as usize == disks.len()
        } else {
            disks
                .last()
                .is_none_or(|d: &DiskSource| d.disk.id < DiskId(id))
        };
        if !in_order {
            return Err(damaged(format!("disk ids out of order at {line:?}")));
        }
        let size = size
            .parse()
            .map_err(|_| damaged(format!("bad size in {line:?}")))?;
        let name = Name::new(name).map_err(|e| damaged(format!("disk {id}: {e}")))?;
        disks.push(DiskSource {
            disk: Disk {
                id: DiskId(id),
                name,
                size,
            },
            path: PathBuf::from(p),
        });
    }
    Ok(Some(disks))
}

/// Writes the disks of the group into `dir`, atomically; `disks` in id
/// order.
pub fn write_sources(dir: &Path, disks: &[DiskSource]) -> Result<(), SourcesError> {
    let dense = disks
        .iter()
        .zip(0u32..)
        .all(|(d, i)| d.disk.id == DiskId(i));
    let mut body = format!("{}\n", if dense { HEADER } else { HEADER_SPARSE });
    for d in disks {
        // The name needs no check: a Name holds no whitespace.
        let path = d
            .path
            .to_str()
            .filter(|p| !p.contains(['\n', '\r']))
            .ok_or_else(|| SourcesError::BadPath(d.path.clone()))?;
        body.push_str(&format!(
            "{} {} {} {path}\n",
            d.disk.id, d.disk.size, d.disk.name
        ));
    }
    crate::sealed::write_atomic(dir, TMP, FILE, &crate::sealed::seal(&body))
        .map_err(|(path, source)| SourcesError::Io { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn what_is_written_reads_back(
            disks in proptest::collection::vec(("[a-z0-9_][a-z0-9._-]{0,19}", any::<u64>(), "[^\u{0}]{1,40}", 0u32..3), 0..5),
        ) {
            let dir = tempfile::tempdir().unwrap();
            // Ids with gaps now and then (a removed disk's).
            let mut next = 0;
            let disks: Vec<DiskSource> = disks
                .into_iter()
                .map(|(name, size, path, gap)| {
                    next += gap / 2;
                    next += 1;
                    DiskSource {
                        disk: Disk { id: DiskId(next - 1), name: Name::new(name).unwrap(), size },
                        path: path.into(),
                    }
                })
                .collect();
            match write_sources(dir.path(), &disks) {
                Ok(()) => prop_assert_eq!(read_sources(dir.path()).unwrap(), Some(disks)),
                Err(SourcesError::BadPath(path)) => {
                    prop_assert!(path.to_str().is_none_or(|p| p.contains(['\n', '\r'])));
                }
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn arbitrary_files_never_panic(body in "(tidemark-disks 1\n)?[ -~\n]{0,200}", sealed in any::<bool>()) {
            let dir = tempfile::tempdir().unwrap();
            // Sealed text reaches the parsing behind the checksum.
            let text = if sealed { crate::sealed::seal(&body) } else { body };
            fs::write(dir.path().join(FILE), text).unwrap();
            let _ = read_sources(dir.path());
        }
    }

    #[test]
    fn round_trip_and_damage() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_sources(dir.path()).unwrap().is_none());
        let disks = vec![
            DiskSource {
                disk: Disk {
                    id: DiskId(0),
                    name: Name::new("data").unwrap(),
                    size: 1 << 30,
                },
                path: "/dev/sdb".into(),
            },
            DiskSource {
                disk: Disk {
                    id: DiskId(1),
                    name: Name::new("wal").unwrap(),
                    size: 4096,
                },
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
        // A disks file that names a disk with a path: refused, with the name.
        let body = format!("{HEADER}\n0 4096 ../../escaped /x\n");
        crate::sealed::write_atomic(dir.path(), TMP, FILE, &crate::sealed::seal(&body)).unwrap();
        let err = read_sources(dir.path()).unwrap_err();
        assert!(
            matches!(&err, SourcesError::Damaged { reason, .. } if reason.contains("../../escaped")),
            "{err}"
        );
    }

    #[test]
    fn ids_with_a_gap_are_written_as_version_2() {
        let dir = tempfile::tempdir().unwrap();
        let disk = |id, name| DiskSource {
            disk: Disk {
                id: DiskId(id),
                name: Name::new(name).unwrap(),
                size: 4096,
            },
            path: format!("/srv/{name}.raw").into(),
        };
        write_sources(dir.path(), &[disk(0, "a"), disk(1, "b")]).unwrap();
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.starts_with("tidemark-disks 1\n"), "{text}");
        let disks = vec![disk(0, "a"), disk(2, "c")];
        write_sources(dir.path(), &disks).unwrap();
        let text = fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(text.starts_with("tidemark-disks 2\n0 4096 a "), "{text}");
        assert_eq!(read_sources(dir.path()).unwrap().unwrap(), disks);
        // Version 1 holds no gap; neither version goes down.
        for body in [
            "tidemark-disks 1\n0 1 a /a\n2 1 c /c\n",
            "tidemark-disks 2\n2 1 c /c\n0 1 a /a\n",
            "tidemark-disks 2\n1 1 c /c\n1 1 a /a\n",
        ] {
            let text = crate::sealed::seal(body);
            fs::write(dir.path().join(FILE), text).unwrap();
            assert!(
                matches!(read_sources(dir.path()), Err(SourcesError::Damaged { .. })),
                "{body}"
            );
        }
    }

    #[test]
    fn a_path_the_file_cannot_hold_is_refused() {
        // Found by what_is_written_reads_back: a line break in a path (or
        // bytes that are not UTF-8, written as U+FFFD) read back as a
        // damaged file, or as another path.
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let not_utf8 = std::ffi::OsStr::from_bytes(b"/srv/disk\xff.raw");
        for path in [
            Path::new("/srv/a\nb.raw"),
            Path::new("/srv/a.raw\r"),
            Path::new(not_utf8),
        ] {
            let disk = [DiskSource {
                disk: Disk {
                    id: DiskId(0),
                    name: Name::from_static("data"),
                    size: 1,
                },
                path: path.to_path_buf(),
            }];
            assert!(
                matches!(write_sources(dir.path(), &disk), Err(SourcesError::BadPath(p)) if p == path),
                "{path:?}"
            );
        }
        assert!(
            read_sources(dir.path()).unwrap().is_none(),
            "nothing written"
        );
    }
}
