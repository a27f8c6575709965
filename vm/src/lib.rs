//! Protecting virtual machines on the hypervisor.
//!
//! A VM is described by Tidemark's own spec ([`tidemark_config::VmSpec`],
//! a small TOML file) and is one consistency group, named after it. This
//! crate turns the spec into what the hypervisor and the host need:
//!
//! - [`qemu`]: the qemu command-line arguments, every disk a `-blockdev
//!   driver=nbd` node on the tracker's unix socket (a qcow2 image gets
//!   qemu's qcow2 driver layered on that node, so the tracker serves and
//!   logs the qcow2 file as raw bytes and the replica is that file byte
//!   for byte);
//! - [`libvirt`]: the matching libvirt domain XML (`<disk type='network'>`
//!   with an `nbd` source on the same socket);
//! - [`qcow2`]: the checks of a qcow2 image served by the tracker: its
//!   backing chain is protected whole (read with `qemu-img info
//!   --backing-chain`), and its file has room for all it may grow, since
//!   an NBD export does not grow;
//! - [`group`]: the VM's consistency group on the host: its configuration
//!   file for the templated `tidemark-tracker@GROUP` and
//!   `tidemark-shipper@GROUP` units, with the VM's log-size budget, and
//!   what `tidemark vm protect` reports.
//! - [`live`]: a running VM's disks moved onto the tracker's exports and
//!   back over QMP (`blockdev-reopen` of each disk's format node), without
//!   stopping it;
//! - [`qga`]: a client of the guest agent (freeze and thaw the guest's
//!   filesystems for an application-consistent point), on the framing of
//!   [`qmp`], the client of qemu's monitor.
//!
//! - [`boot`]: starting the VM on the replica site, from a test
//!   failover's copy-on-write exports or from the failed-over disks: the
//!   accelerator, the networks (isolated, or mapped to the site's bridges)
//!   and knowing when the guest is up.
//!
//! Renderings take the spec and, per disk, where its bytes come from
//! ([`DiskSource`]): on the protected host that is the tracker's export.

pub mod boot;
pub mod group;
pub mod libvirt;
pub mod live;
pub mod qcow2;
pub mod qemu;
pub mod qga;
pub mod qmp;

use std::path::{Path, PathBuf};

use tidemark_config::VmSpec;

/// Where a rendered disk reads and writes its bytes: the image format
/// layer (qcow2) is put on top of it by the renderings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// An NBD export on a unix socket (the tracker's).
    Nbd {
        /// The server's unix socket.
        socket: PathBuf,
        /// The export's name.
        export: String,
    },
    /// A file or block device on this host (a failed-over disk).
    File {
        /// The image file or block device.
        path: PathBuf,
    },
}

impl DiskSource {
    /// Every disk of `spec` as the tracker of its group serves it: the
    /// export named after the disk on `socket`.
    pub fn tracker_exports(spec: &VmSpec, socket: &Path) -> Vec<DiskSource> {
        spec.disks
            .iter()
            .map(|disk| DiskSource::Nbd {
                socket: socket.to_owned(),
                export: disk.name.as_str().to_owned(),
            })
            .collect()
    }
}

/// Why a spec cannot be rendered for a hypervisor.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The renderer was given a number of disk sources other than the
    /// spec's number of disks (a caller's mistake).
    #[error("{sources} disk sources for the {disks} disks of the spec")]
    SourceCount {
        /// Disks in the spec.
        disks: usize,
        /// Sources given.
        sources: usize,
    },
    /// A NIC is on a libvirt network, which plain qemu does not have: the
    /// spec's fault for this hypervisor.
    #[error(
        "vm.nic[{nic}] is on the libvirt network {network:?}; plain qemu has no networks: \
         attach it to a `bridge` or use the libvirt rendering"
    )]
    NetworkNeedsLibvirt {
        /// The NIC's index in the spec.
        nic: usize,
        /// The network it names.
        network: String,
    },
    /// A path is not UTF-8 (qemu and libvirt take text).
    #[error("{} is not UTF-8: qemu and libvirt take paths as text", .0.display())]
    NotUtf8(PathBuf),
}

/// Checks that `sources` has one entry per disk of `spec`.
fn check_sources(spec: &VmSpec, sources: &[DiskSource]) -> Result<(), RenderError> {
    if spec.disks.len() == sources.len() {
        Ok(())
    } else {
        Err(RenderError::SourceCount {
            disks: spec.disks.len(),
            sources: sources.len(),
        })
    }
}

/// `path` as text.
fn utf8(path: &Path) -> Result<&str, RenderError> {
    path.to_str()
        .ok_or_else(|| RenderError::NotUtf8(path.to_owned()))
}

/// The golden files of the renderings' tests.
#[cfg(test)]
mod golden {
    use std::path::Path;

    /// The spec every golden rendering is made from.
    pub(crate) const SPEC: &str = include_str!("../tests/golden/web1.toml");

    /// `text`, a valid spec, parsed.
    pub(crate) fn spec(text: &str) -> tidemark_config::VmSpec {
        tidemark_config::parse_vm_spec(text, Path::new("web1.toml")).unwrap()
    }

    /// The golden file `name` is `rendered`, byte for byte;
    /// `TIDEMARK_BLESS=1` rewrites it after a deliberate change.
    pub(crate) fn golden(name: &str, rendered: &str) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(name);
        if std::env::var_os("TIDEMARK_BLESS").is_some() {
            std::fs::write(&path, rendered).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(
            rendered, expected,
            "{name} differs from the rendering (TIDEMARK_BLESS=1 to accept)"
        );
    }
}
