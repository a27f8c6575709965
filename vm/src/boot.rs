//! Starting a protected VM on the replica site: at a test failover from
//! the point's copy-on-write NBD exports, at a failover from the
//! failed-over disks. The decisions are here, as pure functions and a
//! small state machine; the CLI spawns qemu and feeds its console in.
//!
//! - Disks: every disk of the spec is the replica's disk of the same name
//!   ([`replica_sources`]); a spec disk the replica lacks is refused.
//! - Accelerator: KVM where `/dev/kvm` can be opened, TCG otherwise
//!   ([`Accel`]).
//! - Networks ([`Networks`]): none; isolated (each NIC of the spec on
//!   qemu's user network with `restrict=on`: the guest gets an address
//!   from qemu's own DHCP and reaches nothing, so a test failover's VM
//!   cannot meet production even with production's MAC); or mapped, each
//!   spec NIC's bridge or libvirt network name translated to a bridge of
//!   this site ([`NetworkMap`]), a NIC without a mapping refused.
//! - The console is qemu's first serial port, written to a file; the guest
//!   is up when a console line contains the configured text
//!   ([`UpWatch`]), and the time from start to then is the recovery time.
//!
//! ```text
//! qemu-system-x86_64 -name … -machine … -smp … -m … [-kernel …]
//!     -blockdev …  -device virtio-blk-pci,…          (as crate::qemu renders)
//!     -accel kvm -cpu host | -accel tcg,thread=multi -cpu max
//!     -nic none | -netdev user,id=netN,restrict=on … | -netdev bridge,id=netN,br=LOCAL …
//!     -nodefaults -no-user-config -display none -monitor none
//!     -serial file:CONSOLE -daemonize -pidfile PIDFILE
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tidemark_config::{NicAttachment, VmSpec};

use std::path::Path;

use crate::{qemu, utf8, DiskSource, RenderError};

/// Why a VM cannot be started on the replica site, or did not come up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The spec names a disk the replica does not have (the spec and the
    /// protected group disagree).
    #[error(
        "the VM's disk {disk:?} is not a disk of the replica (it has: {}); \
         the VM spec does not match the replicated group",
        .replica.join(", ")
    )]
    MissingDisk {
        /// The spec's disk.
        disk: String,
        /// The replica's disks.
        replica: Vec<String>,
    },
    /// A NIC's network has no bridge on this site (the configuration's
    /// fault): a failover would attach the guest to nothing, or to the
    /// wrong network.
    #[error(
        "vm.nic[{nic}] is on {name:?}, which has no mapping to a network of this site; \
         map it to a local bridge ({name}=BRIDGE)"
    )]
    UnmappedNetwork {
        /// The NIC's index in the spec.
        nic: usize,
        /// The bridge or libvirt network it names.
        name: String,
    },
    /// A network mapping entry is not `NAME=BRIDGE`, or names an invalid
    /// bridge.
    #[error("invalid network mapping {0:?}: write NAME=BRIDGE, BRIDGE a host bridge")]
    BadMapping(String),
    /// The spec cannot be rendered.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The guest's console showed no up line in time.
    #[error(
        "the VM was not up within {}: no console line contained {line:?}",
        humantime::format_duration(*timeout)
    )]
    NotUp {
        /// The line waited for.
        line: String,
        /// How long it was waited for.
        timeout: Duration,
    },
}

/// How the guest's CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation, the host's CPU model.
    Kvm,
    /// qemu's emulator (slow, but everywhere), the most capable CPU model.
    Tcg,
}

impl Accel {
    /// KVM when it can be used, else TCG.
    pub fn for_host(kvm_usable: bool) -> Accel {
        if kvm_usable {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }

    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }

    /// The libvirt domain type.
    pub fn domain_type(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "qemu",
        }
    }
}

/// Where the VM's NICs go.
#[derive(Clone, Copy, Debug)]
pub enum Networks<'a> {
    /// No NIC at all.
    None,
    /// Every NIC on a network of its own that reaches nothing.
    Isolated,
    /// Every NIC on the local bridge its network is mapped to.
    Mapped(&'a NetworkMap),
}

/// The replica site's bridges for the protected site's networks: a spec
/// NIC on bridge or libvirt network `NAME` is attached to bridge
/// `map[NAME]` here. Written `NAME=BRIDGE`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkMap(BTreeMap<String, String>);

/// Longest Linux interface name.
const MAX_BRIDGE_LEN: usize = 15;

impl NetworkMap {
    /// The map of `entries`, each `NAME=BRIDGE`.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<NetworkMap, BootError> {
        let mut map = BTreeMap::new();
        for entry in entries {
            let bad = || BootError::BadMapping(entry.to_owned());
            let (name, bridge) = entry.split_once('=').ok_or_else(bad)?;
            let word = |w: &str, max: usize| {
                !w.is_empty()
                    && w.len() <= max
                    && w.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
            };
            if !word(name, 64) || !word(bridge, MAX_BRIDGE_LEN) {
                return Err(bad());
            }
            map.insert(name.to_owned(), bridge.to_owned());
        }
        Ok(NetworkMap(map))
    }

    /// `spec` with every NIC on its mapped bridge; a NIC whose network
    /// has no mapping is refused.
    pub fn apply(&self, spec: &VmSpec) -> Result<VmSpec, BootError> {
        let mut mapped = spec.clone();
        for (i, nic) in mapped.nics.iter_mut().enumerate() {
            let name = match nic.attachment() {
                NicAttachment::Bridge(n) | NicAttachment::Network(n) => n.to_owned(),
            };
            let bridge = self
                .0
                .get(&name)
                .ok_or(BootError::UnmappedNetwork { nic: i, name })?;
            nic.bridge = Some(bridge.clone());
            nic.network = None;
        }
        Ok(mapped)
    }
}

/// Every disk of `spec` read from the replica's disk of the same name,
/// `source(name)` saying where that is; `replica` lists the replica's
/// disks.
pub fn replica_sources(
    spec: &VmSpec,
    replica: &[String],
    source: impl Fn(&str) -> DiskSource,
) -> Result<Vec<DiskSource>, BootError> {
    spec.disks
        .iter()
        .map(|disk| {
            if replica.iter().any(|r| r == disk.name.as_str()) {
                Ok(source(disk.name.as_str()))
            } else {
                Err(BootError::MissingDisk {
                    disk: disk.name.to_string(),
                    replica: replica.to_vec(),
                })
            }
        })
        .collect()
}

/// How and where qemu runs the VM on this site.
#[derive(Clone, Copy, Debug)]
pub struct Launch<'a> {
    /// The accelerator.
    pub accel: Accel,
    /// The NICs' networks.
    pub networks: Networks<'a>,
    /// The file the guest's serial console is written to.
    pub console: &'a Path,
    /// The file qemu writes its process id to: qemu runs in the
    /// background (`-daemonize`), returning once the VM has started, and
    /// outlives the command that started it.
    pub pidfile: &'a Path,
}

/// The qemu arguments that start `spec` on this site, its disks read
/// from `sources`.
pub fn args(
    spec: &VmSpec,
    sources: &[DiskSource],
    launch: &Launch<'_>,
) -> Result<Vec<String>, BootError> {
    let mut args = match launch.networks {
        Networks::Mapped(map) => qemu::args(&map.apply(spec)?, sources)?,
        Networks::None | Networks::Isolated => {
            let mut args = qemu::machine_and_disks(spec, sources)?;
            if matches!(launch.networks, Networks::Isolated) {
                for (i, nic) in spec.nics.iter().enumerate() {
                    qemu::nic_args(&mut args, i, "user,restrict=on", nic);
                }
            }
            if spec.nics.is_empty() || matches!(launch.networks, Networks::None) {
                args.extend(["-nic".into(), "none".into()]);
            }
            args
        }
    };
    args.extend(launch.accel.args().map(String::from));
    args.extend(
        [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
        ]
        .map(String::from),
    );
    // The serial spec takes the rest of its text as the path: no escape.
    args.push("-serial".into());
    args.push(format!("file:{}", utf8(launch.console)?));
    args.push("-daemonize".into());
    args.push("-pidfile".into());
    args.push(utf8(launch.pidfile)?.into());
    Ok(args)
}

/// The most bytes of one console line kept while waiting for its end: a
/// guest that never ends a line cannot grow the watcher.
const MAX_LINE: usize = 4096;

/// Watches the guest's console for the line that says it is up.
#[derive(Debug)]
pub struct UpWatch {
    line: String,
    started: Instant,
    timeout: Duration,
    partial: Vec<u8>,
    up_after: Option<Duration>,
}

impl UpWatch {
    /// Waits, from `started`, at most `timeout` for a console line that
    /// contains `line`.
    pub fn new(line: &str, started: Instant, timeout: Duration) -> UpWatch {
        UpWatch {
            line: line.to_owned(),
            started,
            timeout,
            partial: Vec::new(),
            up_after: None,
        }
    }

    /// Takes console output read at `now`; the time from start to up,
    /// once the up line has appeared.
    pub fn handle_output(&mut self, bytes: &[u8], now: Instant) -> Option<Duration> {
        for &b in bytes {
            if self.up_after.is_some() {
                break;
            }
            if b == b'\n' {
                // The serial console ends lines with \r\n.
                let text = String::from_utf8_lossy(&self.partial);
                if text.trim_end_matches('\r').contains(&self.line) {
                    self.up_after = Some(now.saturating_duration_since(self.started));
                }
                self.partial.clear();
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
        self.up_after
    }

    /// Whether waiting is over: `Ok(Some(rto))` once up, `Ok(None)` while
    /// it may still come, the timeout's error after.
    pub fn poll(&self, now: Instant) -> Result<Option<Duration>, BootError> {
        match self.up_after {
            Some(after) => Ok(Some(after)),
            None if now.saturating_duration_since(self.started) < self.timeout => Ok(None),
            None => Err(BootError::NotUp {
                line: self.line.clone(),
                timeout: self.timeout,
            }),
        }
    }

    /// When waiting ends if the line does not come.
    pub fn deadline(&self) -> Instant {
        self.started + self.timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::{golden, spec, SPEC};
    use crate::{libvirt, qemu::command_line};
    use std::path::Path;

    fn launch(accel: Accel, networks: Networks<'_>) -> Launch<'_> {
        Launch {
            accel,
            networks,
            console: Path::new("/run/tidemark/web1.console"),
            pidfile: Path::new("/run/tidemark/web1.pid"),
        }
    }

    fn replica() -> Vec<String> {
        ["root", "base", "data"].map(String::from).to_vec()
    }

    fn test_failover_sources(spec: &VmSpec) -> Vec<DiskSource> {
        replica_sources(spec, &replica(), |name| DiskSource::Nbd {
            socket: "/run/tidemark/test-failover/web1.sock".into(),
            export: name.to_owned(),
        })
        .unwrap()
    }

    fn failover_sources(spec: &VmSpec) -> Vec<DiskSource> {
        replica_sources(spec, &replica(), |name| DiskSource::File {
            path: Path::new("/srv/failover/web1").join(format!("{name}.img")),
        })
        .unwrap()
    }

    #[test]
    fn a_test_failover_boots_from_the_exports_on_an_isolated_network() {
        let spec = spec(SPEC);
        let sources = test_failover_sources(&spec);
        let args = args(&spec, &sources, &launch(Accel::Tcg, Networks::Isolated)).unwrap();
        golden("web1.test-failover.qemu.sh", &command_line(&args));
        assert!(!args.iter().any(|a| a.contains("bridge")), "{args:?}");
        let none = super::args(&spec, &sources, &launch(Accel::Kvm, Networks::None)).unwrap();
        assert!(!none.iter().any(|a| a.contains("netdev")), "{none:?}");
        assert!(none.windows(2).any(|w| w == ["-nic", "none"]), "{none:?}");
        assert!(none.windows(2).any(|w| w == ["-accel", "kvm"]), "{none:?}");
    }

    #[test]
    fn a_failover_boots_from_the_files_on_the_mapped_bridges() {
        let spec = spec(SPEC);
        let sources = failover_sources(&spec);
        let map = NetworkMap::parse(["br0=br-dr0", "br1=br-dr1"]).unwrap();
        let args = args(&spec, &sources, &launch(Accel::Tcg, Networks::Mapped(&map))).unwrap();
        golden("web1.failover.qemu.sh", &command_line(&args));
        let xml = libvirt::domain_xml_of(&map.apply(&spec).unwrap(), &sources, "qemu").unwrap();
        golden("web1.failover.xml", &xml);
    }

    #[test]
    fn a_network_without_a_mapping_is_refused() {
        let spec = spec(SPEC);
        let sources = failover_sources(&spec);
        let map = NetworkMap::parse(["br0=br-dr0"]).unwrap();
        let err = args(&spec, &sources, &launch(Accel::Tcg, Networks::Mapped(&map))).unwrap_err();
        assert!(
            matches!(&err, BootError::UnmappedNetwork { nic: 1, name } if name == "br1"),
            "{err}"
        );
        assert!(err.to_string().contains("br1=BRIDGE"), "{err}");
        let libvirt =
            crate::golden::spec(&SPEC.replace("bridge = \"br1\"", "network = \"default\""));
        let err = map.apply(&libvirt).unwrap_err();
        assert!(
            matches!(&err, BootError::UnmappedNetwork { nic: 1, name } if name == "default"),
            "{err}"
        );
        for bad in [
            "br0",
            "=br1",
            "br0=",
            "br0=a-bridge-name-too-long",
            "br0=b r",
        ] {
            let err = NetworkMap::parse([bad]).unwrap_err();
            assert!(
                matches!(&err, BootError::BadMapping(e) if e == bad),
                "{err}"
            );
        }
    }

    #[test]
    fn a_spec_disk_the_replica_lacks_is_refused() {
        let spec = spec(SPEC);
        let err = replica_sources(&spec, &["root".into(), "data".into()], |_| {
            DiskSource::File { path: "/x".into() }
        })
        .unwrap_err();
        assert!(
            matches!(&err, BootError::MissingDisk { disk, .. } if disk == "base"),
            "{err}"
        );
        assert!(err.to_string().contains("it has: root, data"), "{err}");
    }

    #[test]
    fn the_guest_is_up_when_its_line_appears_within_the_timeout() {
        let t0 = Instant::now();
        let mut watch = UpWatch::new("TIDEMARK-VM-UP", t0, Duration::from_secs(120));
        assert_eq!(watch.handle_output(b"booting\r\nTIDEMARK-VM", t0), None);
        assert_eq!(watch.poll(t0 + Duration::from_secs(5)).unwrap(), None);
        let at = t0 + Duration::from_secs(15);
        assert_eq!(
            watch.handle_output(b"-UP: up 12 s\r\nmore", at),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watch.poll(t0 + Duration::from_secs(500)).unwrap(),
            Some(Duration::from_secs(15))
        );

        let mut late = UpWatch::new("TIDEMARK-VM-UP", t0, Duration::from_secs(120));
        // A line without its end is not up yet; nor is a long unended one
        // kept whole.
        late.handle_output(&[b'x'; 3 * MAX_LINE], t0);
        assert!(late.partial.len() <= MAX_LINE);
        late.handle_output(b"TIDEMARK-VM-UP", t0);
        let err = late.poll(t0 + Duration::from_secs(120)).unwrap_err();
        assert!(
            err.to_string()
                .contains("not up within 2m: no console line contained \"TIDEMARK-VM-UP\""),
            "{err}"
        );
        assert_eq!(late.deadline(), t0 + Duration::from_secs(120));
    }

    #[test]
    fn the_accelerator_follows_the_host() {
        assert_eq!(Accel::for_host(true), Accel::Kvm);
        assert_eq!(Accel::for_host(false), Accel::Tcg);
        assert_eq!(Accel::Tcg.domain_type(), "qemu");
    }
}
