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
//! - The console is qemu's first serial port, written to a file; the
//!   guest agent's channel (`org.qemu.guest_agent.0`) is a unix socket
//!   beside it, whatever socket the protected site's spec named. The
//!   guest is up ([`UpWatch`]) when its agent answers (the shell asks
//!   every [`AGENT_PING_INTERVAL`]) or when a console line contains the
//!   configured text, as [`UpSign`] says; the time from start to then is
//!   the recovery time.
//!
//! ```text
//! qemu-system-x86_64 -name … -machine … -smp … -m … [-kernel …]
//!     -blockdev …  -device virtio-blk-pci,…          (as crate::qemu renders)
//!     -accel kvm -cpu host | -accel tcg,thread=multi -cpu max
//!     -nic none | -netdev user,id=netN,restrict=on … | -netdev bridge,id=netN,br=LOCAL …
//!     -nodefaults -no-user-config -display none -monitor none
//!     -serial file:CONSOLE
//!     -chardev socket,id=qga0,path=AGENT,server=on,wait=off -device virtio-serial-pci,id=vser0
//!     -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0
//!     -daemonize -pidfile PIDFILE
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
    /// The guest agent did not answer in time (no agent in the guest, or
    /// the guest did not get as far as starting it).
    #[error(
        "the VM was not up within {}: its guest agent did not answer in {attempts} tries \
         (the last: {last})",
        humantime::format_duration(*timeout)
    )]
    AgentSilent {
        /// How long it was waited for.
        timeout: Duration,
        /// How many times the agent was asked.
        attempts: u32,
        /// Why the last try got no answer.
        last: String,
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
    /// The unix socket of the guest agent's channel (qemu listens on it).
    pub agent: &'a Path,
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
    // The protected site's agent socket means nothing here: the channel
    // is added on this site's socket below.
    let spec = &VmSpec {
        guest_agent: None,
        ..spec.clone()
    };
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
    qemu::agent_args(&mut args, launch.agent)?;
    args.push("-daemonize".into());
    args.push("-pidfile".into());
    args.push(utf8(launch.pidfile)?.into());
    Ok(args)
}

/// The libvirt domain that starts `spec` on this site, its disks read
/// from `sources`: the domain type of the accelerator, the NICs as
/// `launch` says, the console and the agent's channel on `launch`'s
/// files (`launch.pidfile` is libvirt's business and unused).
pub fn domain_xml(
    spec: &VmSpec,
    sources: &[DiskSource],
    launch: &Launch<'_>,
) -> Result<String, BootError> {
    let mut spec = match launch.networks {
        Networks::Mapped(map) => map.apply(spec)?,
        Networks::None => VmSpec {
            nics: Vec::new(),
            ..spec.clone()
        },
        Networks::Isolated => spec.clone(),
    };
    spec.guest_agent = Some(launch.agent.to_owned());
    let devices = crate::libvirt::BootDevices {
        console: launch.console,
        isolated_nics: matches!(launch.networks, Networks::Isolated),
    };
    Ok(crate::libvirt::boot_domain_xml(
        &spec,
        sources,
        launch.accel.domain_type(),
        Some(&devices),
    )?)
}

/// The most bytes of one console line kept while waiting for its end: a
/// guest that never ends a line cannot grow the watcher.
const MAX_LINE: usize = 4096;

/// How often the guest agent is asked whether it is there, from the
/// start of one try to the start of the next.
pub const AGENT_PING_INTERVAL: Duration = Duration::from_secs(1);

/// What says that the guest is up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpSign {
    /// Its guest agent answers (`guest-sync-delimited`): the guest's
    /// services are starting, whatever its console shows.
    Agent,
    /// A line of its serial console contains this text.
    Line(String),
}

impl UpSign {
    /// The default for `spec`: its agent when the spec names one (the
    /// guest runs `qemu-guest-agent`), else a console line with
    /// `login:` (what a getty on the serial console prints).
    pub fn default_for(spec: &VmSpec) -> UpSign {
        if spec.guest_agent.is_some() {
            UpSign::Agent
        } else {
            UpSign::Line("login:".into())
        }
    }
}

impl std::fmt::Display for UpSign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpSign::Agent => write!(f, "its guest agent to answer"),
            UpSign::Line(line) => write!(f, "a console line with {line:?}"),
        }
    }
}

/// Watches for the sign that the guest is up: the shell feeds it the
/// console's bytes ([`UpWatch::handle_output`]) and, when
/// [`UpWatch::poll_agent_try`] says so, asks the agent and reports how
/// that went ([`UpWatch::handle_agent_answer`],
/// [`UpWatch::handle_agent_silence`]); [`UpWatch::poll`] says up, keep
/// waiting, or too late.
#[derive(Debug)]
pub struct UpWatch {
    sign: UpSign,
    started: Instant,
    timeout: Duration,
    partial: Vec<u8>,
    up_after: Option<Duration>,
    /// When the agent is to be asked next (with [`UpSign::Agent`]).
    next_try: Instant,
    attempts: u32,
    last_silence: Option<String>,
}

impl UpWatch {
    /// Waits, from `started`, at most `timeout` for `sign`.
    pub fn new(sign: UpSign, started: Instant, timeout: Duration) -> UpWatch {
        UpWatch {
            sign,
            started,
            timeout,
            partial: Vec::new(),
            up_after: None,
            next_try: started,
            attempts: 0,
            last_silence: None,
        }
    }

    /// What it waits for.
    pub fn sign(&self) -> &UpSign {
        &self.sign
    }

    fn up_at(&mut self, now: Instant) {
        if self.up_after.is_none() {
            self.up_after = Some(now.saturating_duration_since(self.started));
        }
    }

    /// Takes console output read at `now`; the time from start to up,
    /// once up.
    pub fn handle_output(&mut self, bytes: &[u8], now: Instant) -> Option<Duration> {
        let UpSign::Line(line) = &self.sign else {
            return self.up_after;
        };
        let mut seen = false;
        for &b in bytes {
            if self.up_after.is_some() || seen {
                break;
            }
            if b == b'\n' {
                // The serial console ends lines with \r\n.
                let text = String::from_utf8_lossy(&self.partial);
                seen = text.trim_end_matches('\r').contains(line.as_str());
                self.partial.clear();
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
        if seen {
            self.up_at(now);
        }
        self.up_after
    }

    /// Whether the agent is to be asked now (it is up to the shell how,
    /// within [`AGENT_PING_INTERVAL`]); the next try is then due an
    /// interval after `now`. Never while waiting for a console line, nor
    /// once up or too late.
    pub fn poll_agent_try(&mut self, now: Instant) -> bool {
        if self.sign != UpSign::Agent
            || self.up_after.is_some()
            || now < self.next_try
            || now >= self.deadline()
        {
            return false;
        }
        self.attempts += 1;
        self.next_try = now + AGENT_PING_INTERVAL;
        true
    }

    /// The agent answered at `now`: the guest is up (if it still counts:
    /// an answer after the deadline is too late).
    pub fn handle_agent_answer(&mut self, now: Instant) -> Option<Duration> {
        if self.sign == UpSign::Agent && now < self.deadline() {
            self.up_at(now);
        }
        self.up_after
    }

    /// The agent did not answer a try, for `why` (kept for the error if
    /// none ever does).
    pub fn handle_agent_silence(&mut self, why: String) {
        self.last_silence = Some(why);
    }

    /// Whether waiting is over: `Ok(Some(rto))` once up, `Ok(None)` while
    /// it may still come, the timeout's error after.
    pub fn poll(&self, now: Instant) -> Result<Option<Duration>, BootError> {
        match self.up_after {
            Some(after) => Ok(Some(after)),
            None if now < self.deadline() => Ok(None),
            None => Err(match &self.sign {
                UpSign::Line(line) => BootError::NotUp {
                    line: line.clone(),
                    timeout: self.timeout,
                },
                UpSign::Agent => BootError::AgentSilent {
                    timeout: self.timeout,
                    attempts: self.attempts,
                    last: self
                        .last_silence
                        .clone()
                        .unwrap_or_else(|| "never asked".into()),
                },
            }),
        }
    }

    /// When waiting ends if the sign does not come.
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
            agent: Path::new("/run/tidemark/web1.boot.qga"),
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
        let line = || UpSign::Line("TIDEMARK-VM-UP".into());
        let mut watch = UpWatch::new(line(), t0, Duration::from_secs(120));
        // No agent is asked while a line is waited for.
        assert!(!watch.poll_agent_try(t0));
        assert_eq!(watch.handle_agent_answer(t0), None);
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

        let mut late = UpWatch::new(line(), t0, Duration::from_secs(120));
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
    fn the_guest_is_up_when_its_agent_answers_within_the_timeout() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut watch = UpWatch::new(UpSign::Agent, t0, s(60));
        // Asked at once, then once an interval has passed since each try.
        assert!(watch.poll_agent_try(t0));
        assert!(!watch.poll_agent_try(t0 + Duration::from_millis(999)));
        watch.handle_agent_silence("no answer within 1s".into());
        assert_eq!(watch.poll(t0 + s(1)).unwrap(), None);
        assert!(watch.poll_agent_try(t0 + s(1)));
        // A slow try: the next one is due an interval after it began.
        assert!(watch.poll_agent_try(t0 + s(5)));
        assert!(!watch.poll_agent_try(t0 + Duration::from_millis(5500)));
        // The console says nothing about up here, even the line a getty
        // prints.
        assert_eq!(
            watch.handle_output(b"login:\r\nTIDEMARK\r\n", t0 + s(6)),
            None
        );
        assert_eq!(watch.handle_agent_answer(t0 + s(7)), Some(s(7)));
        assert_eq!(watch.poll(t0 + s(100)).unwrap(), Some(s(7)));
        // Up once: no more tries, a later answer changes nothing.
        assert!(!watch.poll_agent_try(t0 + s(8)));
        assert_eq!(watch.handle_agent_answer(t0 + s(9)), Some(s(7)));
        assert_eq!(watch.sign(), &UpSign::Agent);
    }

    #[test]
    fn an_agent_that_never_answers_times_out_with_its_last_silence() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut watch = UpWatch::new(UpSign::Agent, t0, s(3));
        let err = watch.poll(t0 + s(3)).unwrap_err();
        assert!(
            err.to_string()
                .contains("in 0 tries (the last: never asked)"),
            "{err}"
        );
        for t in 0..3 {
            assert!(watch.poll_agent_try(t0 + s(t)));
            watch.handle_agent_silence(format!("silence {t}"));
        }
        // No try at or after the deadline, and an answer then is too late.
        assert!(!watch.poll_agent_try(t0 + s(3)));
        assert_eq!(watch.handle_agent_answer(t0 + s(3)), None);
        let err = watch.poll(t0 + s(3)).unwrap_err();
        assert!(
            matches!(&err, BootError::AgentSilent { attempts: 3, last, .. } if last == "silence 2"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with(
                "the VM was not up within 3s: its guest agent did not answer in 3 tries"
            ),
            "{err}"
        );
    }

    #[test]
    fn the_default_sign_is_the_agent_when_the_spec_names_one() {
        let with = spec(SPEC);
        let mut without = with.clone();
        without.guest_agent = None;
        assert_eq!(UpSign::default_for(&without), UpSign::Line("login:".into()));
        assert_eq!(
            UpSign::default_for(&VmSpec {
                guest_agent: Some("/run/tidemark/web1.qga".into()),
                ..without
            }),
            UpSign::Agent
        );
        assert_eq!(UpSign::Agent.to_string(), "its guest agent to answer");
    }

    #[test]
    fn a_booted_vm_gets_its_agent_channel_on_this_sites_socket() {
        let mut spec = spec(SPEC);
        spec.guest_agent = Some("/run/tidemark/web1.qga".into());
        for networks in [Networks::None, Networks::Isolated] {
            let args = args(
                &spec,
                &test_failover_sources(&spec),
                &launch(Accel::Tcg, networks),
            )
            .unwrap();
            let line = command_line(&args);
            assert!(
                line.contains("-chardev socket,id=qga0,path=/run/tidemark/web1.boot.qga,"),
                "{line}"
            );
            assert!(!line.contains("/run/tidemark/web1.qga"), "{line}");
            assert_eq!(line.matches("org.qemu.guest_agent.0").count(), 1, "{line}");
        }
    }

    #[test]
    fn a_libvirt_boot_has_the_sites_files_and_networks() {
        let spec = spec(SPEC);
        let sources = test_failover_sources(&spec);
        let xml = domain_xml(&spec, &sources, &launch(Accel::Tcg, Networks::Isolated)).unwrap();
        golden("web1.test-failover.xml", &xml);
        let none = domain_xml(&spec, &sources, &launch(Accel::Kvm, Networks::None)).unwrap();
        assert!(none.starts_with("<domain type='kvm'>"), "{none}");
        assert!(!none.contains("<interface"), "{none}");
        let map = NetworkMap::parse(["br0=br-dr0"]).unwrap();
        let err =
            domain_xml(&spec, &sources, &launch(Accel::Tcg, Networks::Mapped(&map))).unwrap_err();
        assert!(
            matches!(err, BootError::UnmappedNetwork { nic: 1, .. }),
            "{err}"
        );
    }

    #[test]
    fn the_accelerator_follows_the_host() {
        assert_eq!(Accel::for_host(true), Accel::Kvm);
        assert_eq!(Accel::for_host(false), Accel::Tcg);
        assert_eq!(Accel::Tcg.domain_type(), "qemu");
    }
}
