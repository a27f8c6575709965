//! The group's VM spec as the replica keeps it: every version the
//! protected site sent, each with the first record it applies to, so a
//! failover to an older recovery point boots the VM as it was defined at
//! that point. This module is the file's one owner: the receiver adds
//! versions ([`VmSpecKeeper::keep`]), the CLI reads them ([`VmSpecs::load`]).
//!
//! File `vm-spec` in the group's directory, replaced whole, atomically and
//! durably through the storage seam ([`tidemark_durable::replace()`]: the
//! new file is written under `vm-spec.tmp`, synced, renamed over the old,
//! the directory synced), so a reader finds the old history or the new,
//! never a torn one. Little-endian:
//!
//! ```text
//!  offset  size  field
//!  0       8     magic "TMVMSPEC"
//!  8       2     format version (1)
//!  10      2     reserved, 0
//!  12      4     n: versions, 1 to MAX_VERSIONS
//!  16      …     n × (u64 from-seq, u32 len, len bytes of TOML, UTF-8),
//!                from-seq strictly increasing, len 1 to MAX_VM_SPEC
//!  end-4   4     CRC32C of every byte before it
//! ```
//!
//! Which version a point has: the newest whose `from-seq` is at or below
//! the point's sequence number. A point older than the first version
//! (replicated before the protected site named a spec) has the first
//! version: nothing older is known, and the first version is the
//! machine's best description. When a version is added, those no
//! recovery point can have any more are dropped: every version before
//! the one the oldest point has (never that one). At most
//! [`MAX_VERSIONS`] are kept; past that the oldest goes, whatever point
//! had it (a spec that changes that often within the retention window is
//! the exception; the point then boots with the oldest version kept).

use std::path::Path;

use tidemark_changelog::Seq;
use tidemark_config::VmSpec;
use tidemark_durable::{replace, Durability, FsDir, LogDir, LogFile, ReplaceError};
use tidemark_wire::MAX_VM_SPEC;

/// The history's file in the group directory.
pub const VM_SPEC_FILE: &str = "vm-spec";
/// The temporary name a new history is written under.
const VM_SPEC_TMP: &str = "vm-spec.tmp";
const MAGIC: &[u8; 8] = b"TMVMSPEC";
const FORMAT_VERSION: u16 = 1;
/// The most versions kept.
pub const MAX_VERSIONS: usize = 64;

/// One version of the group's VM spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpecVersion {
    /// The first record it applies to.
    pub from_seq: Seq,
    /// The spec's TOML text, as the protected site sent it.
    pub text: String,
}

/// Why the history could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VmSpecError {
    /// The file could not be read (local disk or permissions).
    #[error("reading {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a history this release wrote, or is damaged (its
    /// checksum or its structure does not hold).
    #[error("{path} is damaged: {reason}")]
    Damaged {
        /// The file.
        path: String,
        /// What does not hold.
        reason: &'static str,
    },
    /// The file was written by a newer release.
    #[error("{path} is of format version {version}; this release reads version {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The file.
        path: String,
        /// Its format version.
        version: u16,
    },
    /// The new history could not be written; the old one stays.
    #[error("writing the VM spec history")]
    Write(#[source] ReplaceError),
}

/// Checks that `text` is a VM spec this release can boot: what the
/// receiver accepts from a shipper (the same rules as `tidemark vm`'s).
pub fn check(text: &str) -> Result<VmSpec, String> {
    if text.is_empty() || text.len() > MAX_VM_SPEC {
        return Err(format!(
            "a VM spec is 1 byte to {} KiB, this one {} bytes",
            MAX_VM_SPEC >> 10,
            text.len()
        ));
    }
    tidemark_config::parse_vm_spec(text, Path::new("the replicated VM spec"))
        .map_err(|e| e.to_string())
}

/// Every version of a group's VM spec, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmSpecs {
    versions: Vec<VmSpecVersion>,
}

impl VmSpecs {
    /// The versions, oldest first.
    pub fn versions(&self) -> &[VmSpecVersion] {
        &self.versions
    }

    /// The newest version.
    pub fn current(&self) -> Option<&VmSpecVersion> {
        self.versions.last()
    }

    /// The version the recovery point `point` has (see the module
    /// documentation); `None` when the group has none.
    pub fn at(&self, point: Seq) -> Option<&VmSpecVersion> {
        let after = self.versions.partition_point(|v| v.from_seq <= point);
        self.versions.get(after.saturating_sub(1))
    }

    /// Adds `text` as the version from record `from_seq` on, unless it is
    /// the current version already; drops the versions no point at or
    /// after `oldest_point` can have. Returns the record the current
    /// version applies from and whether anything changed.
    pub fn add(&mut self, from_seq: Seq, text: &str, oldest_point: Option<Seq>) -> (Seq, bool) {
        if let Some(current) = self.current() {
            if current.text == text {
                return (current.from_seq, false);
            }
        }
        // A sequence number never goes back, but a replica restored from
        // elsewhere might: the newer text wins from there on.
        self.versions.retain(|v| v.from_seq < from_seq);
        self.versions.push(VmSpecVersion {
            from_seq,
            text: text.to_string(),
        });
        if let Some(oldest) = oldest_point {
            let keep_from = self
                .versions
                .partition_point(|v| v.from_seq <= oldest)
                .saturating_sub(1);
            self.versions.drain(..keep_from);
        }
        let over = self.versions.len().saturating_sub(MAX_VERSIONS);
        self.versions.drain(..over);
        (from_seq, true)
    }

    /// The file's bytes (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            20 + self
                .versions
                .iter()
                .map(|v| 12 + v.text.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.versions.len() as u32).to_le_bytes());
        for v in &self.versions {
            out.extend_from_slice(&v.from_seq.get().to_le_bytes());
            out.extend_from_slice(&(v.text.len() as u32).to_le_bytes());
            out.extend_from_slice(v.text.as_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads the file's bytes; `path` names it in errors.
    pub fn decode(bytes: &[u8], path: &str) -> Result<VmSpecs, VmSpecError> {
        let damaged = |reason| VmSpecError::Damaged {
            path: path.to_string(),
            reason,
        };
        if bytes.len() < 20 || &bytes[..8] != MAGIC {
            return Err(damaged("not a VM spec history"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(damaged("checksum mismatch"));
        }
        let version = u16::from_le_bytes([body[8], body[9]]);
        if version != FORMAT_VERSION {
            return Err(VmSpecError::UnsupportedVersion {
                path: path.to_string(),
                version,
            });
        }
        let n = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
        if n == 0 || n > MAX_VERSIONS {
            return Err(damaged("a count of versions out of bounds"));
        }
        let mut at = 16;
        let mut versions: Vec<VmSpecVersion> = Vec::with_capacity(n);
        for _ in 0..n {
            let head = body
                .get(at..at + 12)
                .ok_or(damaged("a version beyond the end"))?;
            let from_seq = Seq(u64::from_le_bytes(head[..8].try_into().expect("8 bytes")));
            let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
            if len == 0 || len > MAX_VM_SPEC {
                return Err(damaged("a version's length out of bounds"));
            }
            let text = body
                .get(at + 12..at + 12 + len)
                .ok_or(damaged("a version beyond the end"))?;
            let text = std::str::from_utf8(text).map_err(|_| damaged("a version not UTF-8"))?;
            if versions.last().is_some_and(|v| v.from_seq >= from_seq) {
                return Err(damaged("versions out of order"));
            }
            versions.push(VmSpecVersion {
                from_seq,
                text: text.to_string(),
            });
            at += 12 + len;
        }
        if at != body.len() {
            return Err(damaged("bytes after the last version"));
        }
        Ok(VmSpecs { versions })
    }

    /// The history in `dir` (empty when the group has none).
    pub fn read_from<D: LogDir>(dir: &D) -> Result<VmSpecs, VmSpecError> {
        let path = format!("{}/{VM_SPEC_FILE}", dir.describe());
        let read_err = |source| VmSpecError::Read {
            path: path.clone(),
            source,
        };
        let file = match dir.open(VM_SPEC_FILE, false) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(VmSpecs::default()),
            Err(e) => return Err(read_err(e)),
        };
        let size = file.size().map_err(read_err)?;
        // A history is at most MAX_VERSIONS of the largest spec.
        let max = 20 + MAX_VERSIONS as u64 * (12 + MAX_VM_SPEC as u64);
        if size > max {
            return Err(VmSpecError::Damaged {
                path,
                reason: "larger than any history",
            });
        }
        let mut bytes = vec![0u8; size as usize];
        let mut at = 0;
        while at < bytes.len() {
            let n = file
                .read_at(&mut bytes[at..], at as u64)
                .map_err(read_err)?;
            if n == 0 {
                break;
            }
            at += n;
        }
        bytes.truncate(at);
        VmSpecs::decode(&bytes, &path)
    }

    /// Replaces the history in `dir` with this one, atomically and
    /// durably.
    pub fn write_to<D: LogDir>(&self, dir: &D) -> Result<(), VmSpecError> {
        replace(
            dir,
            VM_SPEC_TMP,
            VM_SPEC_FILE,
            &self.encode(),
            Durability::Durable,
        )
        .map_err(VmSpecError::Write)
    }

    /// The history of the group whose directory is `group_dir`.
    pub fn load(group_dir: &Path) -> Result<VmSpecs, VmSpecError> {
        VmSpecs::read_from(&FsDir::at(group_dir))
    }
}

/// A group's history as the receiver keeps it: [`check`]s a spec, adds it
/// and writes the history before it answers.
#[derive(Debug)]
pub struct VmSpecKeeper<D: LogDir> {
    dir: D,
}

impl<D: LogDir> VmSpecKeeper<D> {
    /// The keeper of the history in `dir` (the group's directory).
    pub fn new(dir: D) -> VmSpecKeeper<D> {
        VmSpecKeeper { dir }
    }

    /// Keeps `text` from record `from_seq` on (see [`VmSpecs::add`]);
    /// returns the record the current version applies from.
    pub fn keep(
        &self,
        from_seq: Seq,
        text: &str,
        oldest_point: Option<Seq>,
    ) -> Result<Seq, tidemark_wire::VmSpecRefused> {
        use tidemark_wire::VmSpecRefused;
        check(text).map_err(|reason| VmSpecRefused::Invalid { reason })?;
        let not_kept = |e: VmSpecError| VmSpecRefused::NotKept {
            reason: crate::daemon::error_chain(&e),
        };
        let mut specs = VmSpecs::read_from(&self.dir).map_err(not_kept)?;
        let (from, changed) = specs.add(from_seq, text, oldest_point);
        if changed {
            specs.write_to(&self.dir).map_err(not_kept)?;
        }
        Ok(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_durable::SimDir;
    use tidemark_wire::VmSpecRefused;

    fn spec(name: &str, cpus: u32) -> String {
        format!(
            "[vm]\nname = \"{name}\"\ncpus = {cpus}\nmemory = \"512MiB\"\n\n\
             [[vm.disk]]\nname = \"root\"\npath = \"/var/lib/images/{name}.raw\"\nformat = \"raw\"\n"
        )
    }

    #[test]
    fn a_point_has_the_version_current_at_it() {
        let mut specs = VmSpecs::default();
        assert_eq!(specs.at(Seq(5)), None);
        assert_eq!(specs.add(Seq(10), &spec("a", 1), None), (Seq(10), true));
        assert_eq!(specs.add(Seq(20), &spec("a", 2), None), (Seq(20), true));
        assert_eq!(
            specs.add(Seq(30), &spec("a", 2), None),
            (Seq(20), false),
            "the same text adds no version"
        );
        let cpus = |p| specs.at(Seq(p)).map(|v| v.text.clone());
        assert_eq!(cpus(3), Some(spec("a", 1)), "before the first: the first");
        assert_eq!(cpus(10), Some(spec("a", 1)));
        assert_eq!(cpus(19), Some(spec("a", 1)));
        assert_eq!(cpus(20), Some(spec("a", 2)));
        assert_eq!(cpus(999), Some(spec("a", 2)));
    }

    #[test]
    fn retention_drops_only_versions_no_point_has() {
        let mut specs = VmSpecs::default();
        for (i, seq) in [10, 20, 30].into_iter().enumerate() {
            specs.add(Seq(seq), &spec("a", i as u32 + 1), Some(Seq(1)));
        }
        assert_eq!(specs.versions().len(), 3);
        // The oldest point is 25: it has the version from 20, which stays.
        specs.add(Seq(40), &spec("a", 9), Some(Seq(25)));
        let froms: Vec<u64> = specs.versions().iter().map(|v| v.from_seq.get()).collect();
        assert_eq!(froms, [20, 30, 40]);
        assert_eq!(specs.at(Seq(25)).unwrap().from_seq, Seq(20));
        // At most MAX_VERSIONS.
        for i in 0..MAX_VERSIONS as u64 + 5 {
            specs.add(Seq(100 + i), &spec("a", (i % 200) as u32 + 10), None);
        }
        assert_eq!(specs.versions().len(), MAX_VERSIONS);
    }

    #[test]
    fn the_file_round_trips_and_damage_is_refused() {
        let mut specs = VmSpecs::default();
        specs.add(Seq(1), &spec("a", 1), None);
        specs.add(Seq(7), &spec("a", 2), None);
        let bytes = specs.encode();
        assert_eq!(VmSpecs::decode(&bytes, "f").unwrap(), specs);
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(VmSpecs::decode(&bad, "f").is_err(), "flip at {at}");
            assert!(VmSpecs::decode(&bytes[..at], "f").is_err(), "cut at {at}");
        }
    }

    /// A new history replaces the old at once: a power cut at any sync of
    /// the replacement leaves the old history or the new one, whole.
    #[test]
    fn a_power_cut_leaves_the_old_history_or_the_new() {
        let first = spec("a", 1);
        let second = spec("a", 2);
        let probe = SimDir::new();
        let keeper = VmSpecKeeper::new(probe.clone());
        keeper.keep(Seq(1), &first, None).unwrap();
        let before = probe.syncs();
        keeper.keep(Seq(5), &second, None).unwrap();
        let syncs = probe.syncs() - before;
        assert!(syncs >= 2, "the file and the directory are synced");
        for cut in 1..=syncs + 1 {
            let dir = SimDir::new();
            let keeper = VmSpecKeeper::new(dir.clone());
            keeper.keep(Seq(1), &first, None).unwrap();
            dir.cut_power_at_sync(before + cut);
            let done = keeper.keep(Seq(5), &second, None);
            let after = SimDir::from_files(dir.after_power_cut());
            let specs = VmSpecs::read_from(&after).unwrap();
            let texts: Vec<&str> = specs.versions().iter().map(|v| v.text.as_str()).collect();
            if done.is_ok() {
                assert_eq!(
                    texts,
                    [first.as_str(), second.as_str()],
                    "cut at sync {cut}"
                );
            } else {
                assert!(
                    texts == [first.as_str()] || texts == [first.as_str(), second.as_str()],
                    "cut at sync {cut}: {texts:?}"
                );
            }
        }
    }

    #[test]
    fn a_spec_that_does_not_parse_is_refused_and_the_history_stays() {
        let dir = SimDir::new();
        let keeper = VmSpecKeeper::new(dir.clone());
        assert_eq!(keeper.keep(Seq(3), &spec("a", 1), None), Ok(Seq(3)));
        let refused = keeper.keep(Seq(9), &spec("a", 0), None);
        assert!(
            matches!(&refused, Err(VmSpecRefused::Invalid { reason }) if reason.contains("cpus")),
            "{refused:?}"
        );
        assert!(matches!(
            keeper.keep(Seq(9), &"#".repeat(MAX_VM_SPEC + 1), None),
            Err(VmSpecRefused::Invalid { .. })
        ));
        let specs = VmSpecs::read_from(&dir).unwrap();
        assert_eq!(specs.versions().len(), 1);
        assert_eq!(specs.current().unwrap().from_seq, Seq(3));
    }
}
