//! A VM's consistency group on the protected host, and `tidemark vm
//! protect`.
//!
//! One VM is one group, named after the VM, so a host runs one tracker and
//! one shipper per VM: the templated units `tidemark-tracker@GROUP` and
//! `tidemark-shipper@GROUP` read `/etc/tidemark/groups/GROUP.toml`, one
//! file with the group's `[tracker]` and `[shipper]` tables. Its paths
//! follow from the group's name ([`GroupLayout`]):
//!
//! ```text
//! /etc/tidemark/groups/GROUP.toml          the group's configuration
//! /var/lib/tidemark/groups/GROUP/log/      its change log (log-size-limit: the VM's budget)
//! /run/tidemark/GROUP.nbd.sock             the tracker's NBD socket (qemu's disks)
//! /run/tidemark/GROUP.tracker.ctl          the tracker's control socket
//! /run/tidemark/GROUP.shipper.ctl          the shipper's control socket
//! ```
//!
//! The shipper's identity and receiver (host, receiver, TLS, bandwidth,
//! retries) are the host's, taken from its `shipper.toml`; only the
//! group's own settings differ. The single-group units
//! (`tidemark-tracker`, `tidemark-shipper` on `/etc/tidemark/*.toml`) are
//! untouched and may run beside the VMs' groups.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tidemark_config::{
    AppConsistentConfig, ByteSize, CacheMode, ConfigError, DiskConfig, ImageFormat, LoadedConfig,
    ShipperConfig, TrackerConfig, VmSpec,
};
use tidemark_names::Name;

use crate::qcow2::{self, Qcow2Error};
use crate::{libvirt, qemu, DiskSource, RenderError};

/// The smallest log-size budget of a VM: eight segments of 1MiB, the
/// smallest segment, and the least that leaves room to absorb a burst.
pub const MIN_LOG_SIZE_LIMIT: ByteSize = ByteSize::mib(8);

/// Budgets from this size up use the tracker's default segment size
/// (64MiB) and largest request (32MiB); smaller ones scale both down.
const DEFAULT_SEGMENTS_FROM: ByteSize = ByteSize::mib(512);

/// Where a host keeps its groups' files: the packages' paths by default,
/// others for a test or a second installation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostDirs {
    /// The groups' configuration files. Default: `/etc/tidemark/groups`.
    pub config_dir: PathBuf,
    /// Sockets. Default: `/run/tidemark`.
    pub run_dir: PathBuf,
    /// State: the change logs go under `STATE/groups/GROUP/log`.
    /// Default: `/var/lib/tidemark`.
    pub state_dir: PathBuf,
    /// systemd's unit directory, for the tracker's drop-in that lets it
    /// write the images. Default: `/etc/systemd/system`.
    pub unit_dir: PathBuf,
}

impl Default for HostDirs {
    fn default() -> Self {
        Self {
            config_dir: PathBuf::from("/etc/tidemark/groups"),
            run_dir: PathBuf::from("/run/tidemark"),
            state_dir: PathBuf::from("/var/lib/tidemark"),
            unit_dir: PathBuf::from("/etc/systemd/system"),
        }
    }
}

/// The paths of one group, from its name (see the module's table).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupLayout {
    /// The group's name (the VM's).
    pub group: Name,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its change log.
    pub log_dir: PathBuf,
    /// The tracker's NBD socket.
    pub socket: PathBuf,
    /// The tracker's control socket.
    pub control_socket: PathBuf,
    /// The shipper's control socket.
    pub shipper_control_socket: PathBuf,
}

impl GroupLayout {
    /// The layout of `group` under `dirs`.
    pub fn new(dirs: &HostDirs, group: &Name) -> Self {
        Self {
            group: group.clone(),
            config: dirs.config_dir.join(format!("{group}.toml")),
            log_dir: dirs.state_dir.join("groups").join(group).join("log"),
            socket: dirs.run_dir.join(format!("{group}.nbd.sock")),
            control_socket: dirs.run_dir.join(format!("{group}.tracker.ctl")),
            shipper_control_socket: dirs.run_dir.join(format!("{group}.shipper.ctl")),
        }
    }

    /// The templated units that run the group.
    pub fn units(&self) -> [String; 2] {
        [
            format!("tidemark-tracker@{}.service", self.group),
            format!("tidemark-shipper@{}.service", self.group),
        ]
    }
}

/// How a VM is protected, beyond its spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protection {
    /// The VM's log-size budget: the most space its change log may take
    /// before its disks fall back to bitmap mode (at least
    /// [`MIN_LOG_SIZE_LIMIT`]).
    pub log_size_limit: ByteSize,
    /// The tracker's metrics on `127.0.0.1:PORT`, the shipper's on the
    /// next port; `None`: a free port each (printed in their logs).
    pub metrics_port: Option<u16>,
    /// The group allowed on the NBD socket besides root, for a qemu that
    /// runs as another user (libvirt's `libvirt-qemu`).
    pub socket_group: Option<String>,
    /// Grow qcow2 files that lack room for all they may grow (sparse; the
    /// VM must be stopped) instead of refusing them.
    pub grow_images: bool,
    /// The spec's file, an absolute path: the group's shipper sends it to
    /// the replica site (its `vm-spec`). `None`: the spec does not travel.
    pub spec_file: Option<PathBuf>,
}

/// Why `tidemark vm protect` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    /// A qcow2 disk's backing chain is not protected whole, or the image
    /// could not be inspected.
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    /// A qcow2 file is too short for what it may grow, and growing it was
    /// not asked for: the tracker's export cannot grow.
    #[error(
        "disk {disk:?}: the qcow2 file {} is {length} bytes; served over NBD it cannot grow, \
         and it may need {needed}: --grow-images extends it (sparse; stop the VM first)",
        .path.display()
    )]
    NoRoom {
        /// The disk.
        disk: Name,
        /// Its image.
        path: PathBuf,
        /// The file's length.
        length: u64,
        /// The length it needs.
        needed: u64,
    },
    /// The group's configuration came out invalid (from the host's
    /// shipper configuration or the options given).
    #[error("the group's configuration would be invalid")]
    Config(#[source] ConfigError),
    /// The spec cannot be rendered for qemu or libvirt.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The budget is below [`MIN_LOG_SIZE_LIMIT`]: the admin's choice.
    #[error("log-size limit {0} is below the minimum of {MIN_LOG_SIZE_LIMIT}")]
    LogBudget(ByteSize),
    /// `--metrics-port` leaves no room for the shipper's port.
    #[error("metrics port {0} leaves no next port for the shipper")]
    MetricsPort(u16),
    /// The group is already configured; replacing it is asked for
    /// explicitly.
    #[error("{} exists: the VM's group is already configured (--replace to overwrite it)", .0.display())]
    Exists(PathBuf),
    /// An image's length could not be read: a local problem.
    #[error("cannot read the length of {}", .path.display())]
    Stat {
        /// The image.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written: a local problem.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
}

/// The segment size and largest request for a log of `budget`: the
/// tracker's defaults for a large budget; for a small one, segments of
/// about an eighth of it (so the log holds several) and requests half a
/// segment (a record never spans segments).
fn log_geometry(budget: ByteSize) -> (ByteSize, ByteSize) {
    if budget >= DEFAULT_SEGMENTS_FROM {
        return (ByteSize::mib(64), ByteSize::mib(32));
    }
    // The largest power of two within an eighth of the budget.
    let eighth = (budget.as_u64() / 8).max(1);
    let segment = (1u64 << (63 - eighth.leading_zeros())).max(1 << 20);
    (ByteSize::b(segment), ByteSize::b(segment / 2))
}

/// The group's configuration: a `[tracker]` serving every disk of `spec`
/// (image files as they are: a qcow2 file is served raw) and a
/// `[shipper]` that is `host_shipper` with the group's own settings.
pub fn group_config(
    spec: &VmSpec,
    layout: &GroupLayout,
    protection: &Protection,
    host_shipper: &ShipperConfig,
) -> Result<LoadedConfig, ProtectError> {
    if protection.log_size_limit < MIN_LOG_SIZE_LIMIT {
        return Err(ProtectError::LogBudget(protection.log_size_limit));
    }
    let (tracker_metrics, shipper_metrics) = match protection.metrics_port {
        Some(port) => (
            port,
            port.checked_add(1).ok_or(ProtectError::MetricsPort(port))?,
        ),
        None => (0, 0),
    };
    let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let (segment_size, max_block_size) = log_geometry(protection.log_size_limit);
    let tracker = TrackerConfig {
        consistency_group: spec.name.clone(),
        log_dir: layout.log_dir.clone(),
        log_size_limit: protection.log_size_limit,
        segment_size,
        max_block_size,
        socket: layout.socket.clone(),
        socket_group: protection.socket_group.clone(),
        control_socket: layout.control_socket.clone(),
        metrics_listen: local(tracker_metrics),
        disks: spec
            .disks
            .iter()
            .map(|disk| DiskConfig {
                name: disk.name.clone(),
                path: disk.path.clone(),
                export_name: None,
                // An image file is written through the page cache like
                // qemu's own default; a block device with O_DIRECT.
                cache: match disk.format {
                    ImageFormat::Qcow2 => Some(CacheMode::Writeback),
                    ImageFormat::Raw => None,
                },
            })
            .collect(),
        app_consistent: AppConsistentConfig {
            guest_agent: spec.guest_agent.clone(),
            ..AppConsistentConfig::default()
        },
        ..TrackerConfig::default()
    };
    let mut shipper = host_shipper.clone();
    shipper.consistency_group = spec.name.clone();
    shipper.log_dir = layout.log_dir.clone();
    shipper.control_socket = layout.shipper_control_socket.clone();
    shipper.tracker_control_socket = layout.control_socket.clone();
    shipper.metrics_listen = local(shipper_metrics);
    shipper.vm_spec = protection.spec_file.clone();
    let config = LoadedConfig {
        origin: layout.config.clone(),
        tracker: Some(tracker),
        shipper: Some(shipper),
        receiver: None,
    };
    config.validate().map_err(ProtectError::Config)?;
    Ok(config)
}

/// The text of a group's configuration file.
pub fn config_text(spec: &VmSpec, config: &LoadedConfig) -> String {
    let body = toml::to_string(config).expect("a configuration serializes to TOML");
    format!(
        "# The consistency group of the virtual machine {name}, written by\n\
         # `tidemark vm protect`; read by tidemark-tracker@{name} and\n\
         # tidemark-shipper@{name}. The shipper's identity and receiver are\n\
         # the host's (shipper.toml); tracker.log-size-limit is the VM's log budget.\n\n{body}",
        name = spec.name
    )
}

/// One disk of a protected VM, as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProtectedDisk {
    /// The disk's name and NBD export.
    pub name: Name,
    /// The image the tracker serves.
    pub path: PathBuf,
    /// The image's format (qemu's layer on the NBD node).
    pub format: ImageFormat,
    /// The disk whose backing file it is, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing: Option<Name>,
}

/// A drop-in of the tracker's unit that lets it write the images
/// (`ProtectSystem=strict` leaves only its own directories writable).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DropIn {
    /// Where it is written.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
}

/// A qcow2 file grown to have room for all it may grow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Growth {
    /// The disk.
    pub disk: Name,
    /// Its image.
    pub path: PathBuf,
    /// Its length before.
    pub from: u64,
    /// Its length after.
    pub to: u64,
}

/// What `tidemark vm protect` did and what the admin does next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProtectReport {
    /// The VM, which is also the group.
    pub vm: Name,
    /// The group's paths.
    pub layout: GroupLayout,
    /// The VM's log-size budget.
    pub log_size_limit: ByteSize,
    /// The disks the tracker serves.
    pub disks: Vec<ProtectedDisk>,
    /// The qcow2 files grown (or to grow) to have room.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grown: Vec<Growth>,
    /// The units that run the group.
    pub units: [String; 2],
    /// The tracker's drop-in, when an image lies outside its writable
    /// directories.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_in: Option<DropIn>,
    /// The commands that start protecting the VM.
    pub systemctl: Vec<String>,
    /// The qemu arguments of the VM on the tracker's exports (`None` when
    /// a NIC is on a libvirt network, which plain qemu does not have).
    pub qemu_args: Option<Vec<String>>,
    /// The libvirt domain of the VM on the tracker's exports.
    pub libvirt_xml: String,
}

/// The tracker's drop-in for the images of `spec` outside `/dev` and the
/// tracker's own directories.
fn drop_in(spec: &VmSpec, dirs: &HostDirs) -> Option<DropIn> {
    let mut writable: Vec<&Path> = spec
        .disks
        .iter()
        .filter(|d| !d.path.starts_with("/dev"))
        .filter_map(|d| d.path.parent())
        .collect();
    writable.sort();
    writable.dedup();
    if writable.is_empty() {
        return None;
    }
    let paths: Vec<String> = writable.iter().map(|p| p.display().to_string()).collect();
    Some(DropIn {
        path: dirs
            .unit_dir
            .join(format!("tidemark-tracker@{}.service.d", spec.name))
            .join("images.conf"),
        text: format!(
            "# Written by `tidemark vm protect`: the tracker of {} writes its images here.\n\
             [Service]\nReadWritePaths={}\n",
            spec.name,
            paths.join(" ")
        ),
    })
}

/// Checks every qcow2 disk of `spec` with `qemu-img` (backing chain,
/// room to grow); returns the files to grow, refusing them unless
/// `grow`.
fn check_qcow2_disks(spec: &VmSpec, grow: bool) -> Result<Vec<Growth>, ProtectError> {
    let mut growths = Vec::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        if disk.format != ImageFormat::Qcow2 {
            continue;
        }
        let inspection = qcow2::inspect(&disk.path)?;
        qcow2::check_disk(spec, i, &inspection.chain)?;
        // A backing file is only read: it never grows.
        if spec.is_backing_file(&disk.name) {
            continue;
        }
        let length = fs::metadata(&disk.path)
            .map_err(|source| ProtectError::Stat {
                path: disk.path.clone(),
                source,
            })?
            .len();
        let needed = qcow2::room_needed(inspection.fill);
        if length < needed {
            if !grow {
                return Err(ProtectError::NoRoom {
                    disk: disk.name.clone(),
                    path: disk.path.clone(),
                    length,
                    needed,
                });
            }
            growths.push(Growth {
                disk: disk.name.clone(),
                path: disk.path.clone(),
                from: length,
                to: needed,
            });
        }
    }
    Ok(growths)
}

/// Everything `tidemark vm protect` decides, without writing anything:
/// the qcow2 images are checked (with `qemu-img`), the configuration
/// built and validated, the renderings made.
pub fn plan(
    spec: &VmSpec,
    dirs: &HostDirs,
    protection: &Protection,
    host_shipper: &ShipperConfig,
) -> Result<(ProtectReport, LoadedConfig), ProtectError> {
    let grown = check_qcow2_disks(spec, protection.grow_images)?;
    let layout = GroupLayout::new(dirs, &spec.name);
    let config = group_config(spec, &layout, protection, host_shipper)?;
    let sources = DiskSource::tracker_exports(spec, &layout.socket);
    let qemu_args = match qemu::args(spec, &sources) {
        Ok(args) => Some(args),
        Err(RenderError::NetworkNeedsLibvirt { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let libvirt_xml = libvirt::domain_xml(spec, &sources)?;
    let units = layout.units();
    let mut systemctl = Vec::new();
    let drop_in = drop_in(spec, dirs);
    if drop_in.is_some() {
        systemctl.push("systemctl daemon-reload".to_owned());
    }
    systemctl.push(format!("systemctl enable --now {} {}", units[0], units[1]));
    let report = ProtectReport {
        vm: spec.name.clone(),
        log_size_limit: protection.log_size_limit,
        disks: spec
            .disks
            .iter()
            .map(|d| ProtectedDisk {
                name: d.name.clone(),
                path: d.path.clone(),
                format: d.format,
                backing: d.backing.clone(),
            })
            .collect(),
        grown,
        units,
        drop_in,
        systemctl,
        qemu_args,
        libvirt_xml,
        layout,
    };
    Ok((report, config))
}

/// Writes `text` to `path` whole or not at all (a temporary file renamed
/// over it), creating its directory; refuses an existing file unless
/// `replace`.
fn write_file(path: &Path, text: &str, replace: bool) -> Result<(), ProtectError> {
    let failed = |source| ProtectError::Write {
        path: path.to_owned(),
        source,
    };
    if !replace && path.exists() {
        return Err(ProtectError::Exists(path.to_owned()));
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(failed)?;
    }
    let temporary = path.with_extension("toml.new");
    let mut file = fs::File::create(&temporary).map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)?;
    file.sync_all().map_err(failed)?;
    fs::rename(&temporary, path).map_err(failed)
}

/// `tidemark vm protect`: checks the VM's backing chains, writes its
/// group's configuration (and the tracker's drop-in), and reports what
/// the admin runs next. Nothing is written when a check fails.
pub fn protect(
    spec: &VmSpec,
    dirs: &HostDirs,
    protection: &Protection,
    host_shipper: &ShipperConfig,
    replace: bool,
) -> Result<ProtectReport, ProtectError> {
    let (report, config) = plan(spec, dirs, protection, host_shipper)?;
    if !replace && report.layout.config.exists() {
        return Err(ProtectError::Exists(report.layout.config.clone()));
    }
    for growth in &report.grown {
        let failed = |source| ProtectError::Write {
            path: growth.path.clone(),
            source,
        };
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&growth.path)
            .map_err(failed)?;
        file.set_len(growth.to).map_err(failed)?;
        file.sync_all().map_err(failed)?;
    }
    write_file(&report.layout.config, &config_text(spec, &config), replace)?;
    if let Some(drop_in) = &report.drop_in {
        write_file(&drop_in.path, &drop_in.text, true)?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let text = "[vm]\nname = \"web1\"\ncpus = 1\nmemory = \"1GiB\"\n\
             [[vm.disk]]\nname = \"root\"\npath = \"/images/root.qcow2\"\nformat = \"qcow2\"\n\
             [[vm.disk]]\nname = \"data\"\npath = \"/dev/vdb\"\nformat = \"raw\"\n";
        tidemark_config::parse_vm_spec(text, Path::new("web1.toml")).unwrap()
    }

    fn shipper() -> ShipperConfig {
        ShipperConfig::new(
            Name::from_static("db1.example.com"),
            "dr.example.com:7480".parse().unwrap(),
        )
    }

    fn protection(budget: ByteSize) -> Protection {
        Protection {
            log_size_limit: budget,
            metrics_port: Some(9800),
            socket_group: None,
            grow_images: false,
            spec_file: Some(PathBuf::from("/etc/tidemark/vms/web1.toml")),
        }
    }

    #[test]
    fn the_group_config_serves_every_disk_and_loads_back() {
        let spec = spec();
        let layout = GroupLayout::new(&HostDirs::default(), &spec.name);
        let config =
            group_config(&spec, &layout, &protection(ByteSize::gib(4)), &shipper()).unwrap();
        let text = config_text(&spec, &config);
        let loaded = tidemark_config::parse_str(&text, &layout.config).unwrap();
        let tracker = loaded.require_tracker().unwrap();
        assert_eq!(tracker.consistency_group.as_str(), "web1");
        assert_eq!(tracker.log_size_limit, ByteSize::gib(4));
        assert_eq!(
            tracker.log_dir,
            Path::new("/var/lib/tidemark/groups/web1/log")
        );
        assert_eq!(tracker.socket, Path::new("/run/tidemark/web1.nbd.sock"));
        let disks: Vec<(&str, &Path)> = tracker
            .disks
            .iter()
            .map(|d| (d.name.as_str(), d.path.as_path()))
            .collect();
        assert_eq!(
            disks,
            [
                ("root", Path::new("/images/root.qcow2")),
                ("data", Path::new("/dev/vdb"))
            ]
        );
        let shipper = loaded.require_shipper().unwrap();
        assert_eq!(shipper.host.as_str(), "db1.example.com");
        assert_eq!(shipper.tracker_control_socket, tracker.control_socket);
        assert_eq!(
            shipper.vm_spec.as_deref(),
            Some(Path::new("/etc/tidemark/vms/web1.toml")),
            "the spec travels with the group"
        );
        assert_eq!(tracker.metrics_listen.port(), 9800);
        assert_eq!(shipper.metrics_listen.port(), 9801);
    }

    #[test]
    fn small_budgets_get_smaller_segments_and_tiny_ones_are_refused() {
        for (budget, segment) in [
            (ByteSize::gib(8), ByteSize::mib(64)),
            (ByteSize::mib(512), ByteSize::mib(64)),
            (ByteSize::mib(256), ByteSize::mib(32)),
            (ByteSize::mib(100), ByteSize::mib(8)),
            (ByteSize::mib(8), ByteSize::mib(1)),
        ] {
            let spec = spec();
            let layout = GroupLayout::new(&HostDirs::default(), &spec.name);
            let config = group_config(&spec, &layout, &protection(budget), &shipper())
                .unwrap_or_else(|e| panic!("{budget}: {e:?}"));
            assert_eq!(config.tracker.unwrap().segment_size, segment, "{budget}");
        }
        let spec = spec();
        let layout = GroupLayout::new(&HostDirs::default(), &spec.name);
        let err =
            group_config(&spec, &layout, &protection(ByteSize::mib(4)), &shipper()).unwrap_err();
        assert!(matches!(err, ProtectError::LogBudget(_)), "{err}");
    }

    #[test]
    fn images_outside_dev_get_a_drop_in_for_the_tracker() {
        let drop_in = drop_in(&spec(), &HostDirs::default()).unwrap();
        assert_eq!(
            drop_in.path,
            Path::new("/etc/systemd/system/tidemark-tracker@web1.service.d/images.conf")
        );
        assert!(
            drop_in.text.contains("\nReadWritePaths=/images\n"),
            "{}",
            drop_in.text
        );
    }
}
