//! qcow2 images served by the tracker: their backing chains, protected
//! whole or not at all, and their room to grow.
//!
//! **Backing chains.** A qcow2 image may read unwritten clusters from a backing file named in
//! its header. If that file were not served by the tracker, the replica
//! site would get an overlay without its base. So every qcow2 disk of a
//! spec is asked for its chain (`qemu-img info --output=json
//! --backing-chain`), and its backing file must be the disk its `backing`
//! names, in the format the spec gives; anything else is refused naming
//! the backing file. Each qcow2 disk is checked itself, so a whole chain
//! is checked one link at a time.
//!
//! **Room to grow.** The tracker serves a file at the size it has when the
//! tracker starts, and NBD has no way to grow an export; but qcow2
//! allocates new clusters past the end of its file. So a qcow2 file is
//! given room first: its length must reach its current end (`qemu-img
//! check`'s image end offset) plus what full allocation of the rest
//! takes (`qemu-img measure`'s fully-allocated size less the clusters
//! already allocated). Growing the file (sparse, with the VM stopped)
//! costs no space until qcow2 uses it; a file left short is refused.
//!
//! [`check_disk`] and [`room_needed`] decide on what `qemu-img` reported;
//! [`inspect`] runs `qemu-img` on one qcow2 image.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use tidemark_config::{ImageFormat, VmSpec};
use tidemark_names::Name;

/// One image of a backing chain, as `qemu-img info --output=json
/// --backing-chain` reports it (the fields used here).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChainImage {
    /// The image file.
    pub filename: String,
    /// Its format, as qemu names it (`qcow2`, `raw`, …).
    pub format: String,
    /// Its backing file, resolved against the image's directory.
    #[serde(default)]
    pub full_backing_filename: Option<String>,
    /// Its cluster size (qcow2 only).
    #[serde(default)]
    pub cluster_size: Option<u64>,
}

/// How full a qcow2 image is, from `qemu-img check` and `qemu-img measure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fill {
    /// Where the image's last used cluster ends.
    pub end_offset: u64,
    /// Guest clusters allocated, in bytes.
    pub allocated: u64,
    /// The image's size if every guest cluster were allocated.
    pub fully_allocated: u64,
}

/// Files grow to multiples of this.
const GROWTH_GRANULE: u64 = 1 << 20;

/// The length a qcow2 file needs so that qcow2 never writes past its end
/// (see the module's comment), rounded up to a MiB.
pub fn room_needed(fill: Fill) -> u64 {
    let rest = fill.fully_allocated.saturating_sub(fill.allocated);
    fill.end_offset
        .saturating_add(rest)
        .div_ceil(GROWTH_GRANULE)
        .saturating_mul(GROWTH_GRANULE)
}

/// What `qemu-img` says of one qcow2 image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inspection {
    /// The image and its backing files, in order.
    pub chain: Vec<ChainImage>,
    /// How full it is.
    pub fill: Fill,
}

/// Why a qcow2 disk cannot be protected as it is, or could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// `qemu-img` could not be started (not installed?): a local problem.
    #[error("cannot run qemu-img to read the backing chain of {} (install qemu-utils)", .image.display())]
    Spawn {
        /// The image whose chain was to be read.
        image: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// `qemu-img` failed on the image (missing, unreadable, not qcow2
    /// although the spec says so).
    #[error("qemu-img {subcommand} {} failed: {message}", .image.display())]
    QemuImg {
        /// What was asked (`info`, `check`, `measure`).
        subcommand: &'static str,
        /// The image.
        image: PathBuf,
        /// What qemu-img said.
        message: String,
    },
    /// `qemu-img` printed something that is not the JSON report read here.
    #[error("qemu-img {subcommand} {} printed no report this release reads", .image.display())]
    Output {
        /// What was asked (`info`, `check`, `measure`).
        subcommand: &'static str,
        /// The image.
        image: PathBuf,
        /// What did not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The image has a backing file that is no disk of the spec.
    #[error(
        "disk {disk:?}: its image {} has the backing file {backing}, which is not a disk of this VM: \
         add it as a [[vm.disk]] and name it in `backing` (the whole chain is protected), \
         or flatten the image first (qemu-img convert, or qemu-img rebase -b '')",
        .image.display()
    )]
    Unprotected {
        /// The disk whose image it is.
        disk: Name,
        /// The image.
        image: PathBuf,
        /// Its backing file, as qemu-img names it.
        backing: String,
    },
    /// The image's backing file is not the disk its `backing` names.
    #[error(
        "disk {disk:?}: its image's backing file is {found}, but `backing` names disk {named:?} ({})",
        .named_path.display()
    )]
    WrongBacking {
        /// The disk.
        disk: Name,
        /// The backing file the image names (or "none").
        found: String,
        /// The disk `backing` names.
        named: Name,
        /// That disk's path.
        named_path: PathBuf,
    },
    /// The backing file's format is not the one the spec gives its disk.
    #[error("disk {disk:?}: qemu-img reads its backing file as {found}, the spec says {spec}")]
    BackingFormat {
        /// The disk that is the backing file.
        disk: Name,
        /// The format qemu-img found.
        found: String,
        /// The format in the spec.
        spec: ImageFormat,
    },
}

/// Whether `a` and `b` name the same file (after resolving symbolic
/// links, when both exist).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Checks disk `index` of `spec` against its reported `chain` (the disk's
/// image first, then its backing files).
pub fn check_disk(spec: &VmSpec, index: usize, chain: &[ChainImage]) -> Result<(), Qcow2Error> {
    let disk = &spec.disks[index];
    let found = chain
        .first()
        .and_then(|i| i.full_backing_filename.as_deref());
    let named = disk
        .backing
        .as_ref()
        .and_then(|b| spec.disk_index(b))
        .map(|j| &spec.disks[j]);
    match (found, named) {
        (None, None) => Ok(()),
        (Some(backing), None) => Err(Qcow2Error::Unprotected {
            disk: disk.name.clone(),
            image: disk.path.clone(),
            backing: backing.to_owned(),
        }),
        (found, Some(named)) if !found.is_some_and(|f| same_file(Path::new(f), &named.path)) => {
            Err(Qcow2Error::WrongBacking {
                disk: disk.name.clone(),
                found: found.unwrap_or("none").to_owned(),
                named: named.name.clone(),
                named_path: named.path.clone(),
            })
        }
        (_, Some(named)) => match chain.get(1) {
            Some(base) if base.format != named.format.as_str() => Err(Qcow2Error::BackingFormat {
                disk: named.name.clone(),
                found: base.format.clone(),
                spec: named.format,
            }),
            _ => Ok(()),
        },
    }
}

/// Runs `qemu-img SUBCOMMAND -U --output=json -f qcow2 ARGS IMAGE` (`-U`:
/// the image may be in use) and parses what it prints.
fn qemu_img<T: serde::de::DeserializeOwned>(
    subcommand: &'static str,
    args: &[&str],
    image: &Path,
) -> Result<T, Qcow2Error> {
    let out = Command::new("qemu-img")
        .args([subcommand, "-U", "--output=json", "-f", "qcow2"])
        .args(args)
        .arg(image)
        .output()
        .map_err(|source| Qcow2Error::Spawn {
            image: image.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(Qcow2Error::QemuImg {
            subcommand,
            image: image.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|source| Qcow2Error::Output {
        subcommand,
        image: image.to_owned(),
        source,
    })
}

/// `qemu-img check`'s report, the fields used here.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct CheckReport {
    image_end_offset: u64,
    /// Left out when none are.
    #[serde(default)]
    allocated_clusters: u64,
}

/// `qemu-img measure`'s report, the field used here.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Measure {
    fully_allocated: u64,
}

/// Asks `qemu-img` for the backing chain and the fill of the qcow2 image
/// at `image`.
pub fn inspect(image: &Path) -> Result<Inspection, Qcow2Error> {
    let chain: Vec<ChainImage> = qemu_img("info", &["--backing-chain"], image)?;
    let check: CheckReport = qemu_img("check", &[], image)?;
    let measure: Measure = qemu_img("measure", &["-O", "qcow2"], image)?;
    let cluster = chain.first().and_then(|i| i.cluster_size).unwrap_or(0);
    Ok(Inspection {
        fill: Fill {
            end_offset: check.image_end_offset,
            allocated: check.allocated_clusters.saturating_mul(cluster),
            fully_allocated: measure.fully_allocated,
        },
        chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(backing: Option<&str>) -> VmSpec {
        let mut text = "[vm]\nname = \"web1\"\ncpus = 1\nmemory = \"1GiB\"\n\
             [[vm.disk]]\nname = \"root\"\npath = \"/images/root.qcow2\"\nformat = \"qcow2\"\n"
            .to_owned();
        if let Some(b) = backing {
            text.push_str(&format!("backing = \"{b}\"\n"));
        }
        text.push_str(
            "[[vm.disk]]\nname = \"base\"\npath = \"/images/base.qcow2\"\nformat = \"qcow2\"\n",
        );
        tidemark_config::parse_vm_spec(&text, Path::new("web1.toml")).unwrap()
    }

    fn image(file: &str, format: &str, backing: Option<&str>) -> ChainImage {
        ChainImage {
            filename: file.into(),
            format: format.into(),
            full_backing_filename: backing.map(Into::into),
            cluster_size: Some(65536),
        }
    }

    #[test]
    fn a_chain_is_accepted_only_when_its_backing_file_is_the_named_disk() {
        let root = image("/images/root.qcow2", "qcow2", Some("/images/base.qcow2"));
        let base = image("/images/base.qcow2", "qcow2", None);
        let chain = [root.clone(), base.clone()];
        check_disk(&spec(Some("base")), 0, &chain).unwrap();
        check_disk(&spec(None), 1, std::slice::from_ref(&base)).unwrap();

        let err = check_disk(&spec(None), 0, &chain).unwrap_err();
        assert!(matches!(err, Qcow2Error::Unprotected { .. }), "{err}");
        assert!(
            err.to_string().contains("backing file /images/base.qcow2"),
            "{err}"
        );

        let elsewhere = image("/images/root.qcow2", "qcow2", Some("/images/other.qcow2"));
        let err = check_disk(&spec(Some("base")), 0, &[elsewhere]).unwrap_err();
        assert!(matches!(err, Qcow2Error::WrongBacking { .. }), "{err}");
        assert!(err.to_string().contains("/images/other.qcow2"), "{err}");

        let flat = image("/images/root.qcow2", "qcow2", None);
        let err = check_disk(&spec(Some("base")), 0, &[flat]).unwrap_err();
        assert!(err.to_string().contains("backing file is none"), "{err}");

        let raw_base = image("/images/base.qcow2", "raw", None);
        let err = check_disk(&spec(Some("base")), 0, &[root, raw_base]).unwrap_err();
        assert!(matches!(err, Qcow2Error::BackingFormat { .. }), "{err}");
    }

    #[test]
    fn the_room_needed_is_the_end_plus_what_full_allocation_adds() {
        // A fresh 64MiB image (figures from qemu-img 10.0).
        let fresh = Fill {
            end_offset: 196_608,
            allocated: 0,
            fully_allocated: 67_436_544,
        };
        assert_eq!(room_needed(fresh), 65 << 20);
        // Writing 5MiB moves the end and the allocation alike: the room
        // needed stays, so protecting again asks for nothing more.
        let written = Fill {
            end_offset: 196_608 + (5 << 20),
            allocated: 5 << 20,
            ..fresh
        };
        assert_eq!(room_needed(written), room_needed(fresh));
    }
}
