//! Virtual machine specs: the small TOML file that says what a protected
//! VM is (CPUs, memory, machine type, disks, NICs), read by `tidemark vm`.
//! It is Tidemark's own definition of the machine: plain qemu has none to
//! replicate, and libvirt's XML is rendered from it, not the other way
//! round. One VM is one consistency group, named after the VM.
//!
//! ```toml
//! [vm]
//! name = "web1"
//! cpus = 2
//! memory = "2GiB"
//! # machine = "q35"
//!
//! [[vm.disk]]
//! name = "root"
//! path = "/var/lib/images/web1-root.qcow2"
//! format = "qcow2"
//! backing = "base"
//!
//! [[vm.disk]]                    # root's backing file
//! name = "base"
//! path = "/var/lib/images/debian-12.qcow2"
//! format = "qcow2"
//!
//! [[vm.nic]]
//! bridge = "br0"                 # or: network = "default" (libvirt)
//! mac = "52:54:00:12:34:56"
//! ```
//!
//! Errors name the file, line, column and setting like those of the
//! daemons' files (see [`ConfigError`]).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tidemark_names::Name;

use crate::error::{ConfigError, FieldPath};
use crate::ByteSize;

/// Fewest virtual CPUs.
pub const MIN_CPUS: u32 = 1;
/// Most virtual CPUs: what qemu's q35 machine takes without extra options.
pub const MAX_CPUS: u32 = 288;
/// Least memory a VM is given: less does not boot a Linux kernel.
pub const MIN_MEMORY: ByteSize = ByteSize::mib(16);
/// Memory is given to qemu in MiB, so it is a multiple of this.
pub const MEMORY_GRANULE: ByteSize = ByteSize::mib(1);
/// Longest Linux network interface name (`IFNAMSIZ` less the NUL).
const MAX_IFNAME_LEN: usize = 15;

/// The top level of a VM spec file.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a document with a [vm] table"
)]
pub(crate) struct VmDocument {
    pub(crate) vm: VmSpec,
}

/// A virtual machine, the `[vm]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [vm] table with `name`, `cpus`, `memory` and [[vm.disk]] tables"
)]
pub struct VmSpec {
    /// The VM's name; also the name of its consistency group, the
    /// instance of its tracker and shipper units and the libvirt domain.
    /// A name (see [`tidemark_names`]). Required.
    pub name: Name,

    /// Virtual CPUs, 1 to 288. Required.
    pub cpus: u32,

    /// Guest memory, at least 16MiB, a multiple of 1MiB, e.g. `"2GiB"`.
    /// Required.
    pub memory: ByteSize,

    /// qemu machine type (`qemu-system-x86_64 -machine help`), e.g.
    /// `"pc-q35-7.2"`. Default: `"q35"`.
    #[serde(default = "default_machine")]
    pub machine: MachineType,

    /// The VM's disks, one `[[vm.disk]]` table each, in the order the guest
    /// sees them. At least one. Default: none.
    #[serde(rename = "disk", deserialize_with = "disk_tables")]
    pub disks: Vec<VmDisk>,

    /// The VM's network interfaces, one `[[vm.nic]]` table each.
    /// Default: none.
    #[serde(
        rename = "nic",
        default,
        deserialize_with = "nic_tables",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub nics: Vec<VmNic>,

    /// Direct kernel boot, a `[vm.kernel]` table: qemu loads the kernel
    /// and initramfs from host files instead of the guest's boot loader
    /// (the files must exist on every site that starts the VM: the
    /// protected host and, for a failover, the replica site). Default:
    /// none, the guest boots from its disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<DirectKernel>,

    /// The unix socket of the VM's guest agent channel (qemu's
    /// `org.qemu.guest_agent.0` virtio-serial port, `qemu-guest-agent` in
    /// the guest), an absolute path. `tidemark vm protect` writes it into
    /// the group's `[tracker.app-consistent] guest-agent`: application-
    /// consistent points freeze the guest's filesystems through it.
    /// Default: not set (points are crash-consistent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<PathBuf>,
}

/// Direct kernel boot (see [`VmSpec::kernel`]), the `[vm.kernel]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [vm.kernel] table with `path` and optionally `initrd` and `append`"
)]
pub struct DirectKernel {
    /// The kernel image, an absolute path. Required.
    pub path: PathBuf,
    /// The initramfs, an absolute path. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// The kernel command line, e.g. `"console=ttyS0 root=/dev/vda1"`.
    /// Default: empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub append: String,
}

fn default_machine() -> MachineType {
    MachineType("q35".to_owned())
}

fn disk_tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<VmDisk>, D::Error> {
    crate::table_list::deserialize(d, "vm.disk")
}

fn nic_tables<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<VmNic>, D::Error> {
    crate::table_list::deserialize(d, "vm.nic")
}

/// A virtual disk, a `[[vm.disk]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [[vm.disk]] table with `name`, `path` and `format`"
)]
pub struct VmDisk {
    /// The disk's name in the VM's group: the tracker's disk and NBD
    /// export, the replica's file name. A name. Required.
    pub name: Name,

    /// The image file or block device holding the disk, an absolute path.
    /// The tracker serves it; the VM no longer opens it. Required.
    pub path: PathBuf,

    /// What the file holds: `"raw"` (the disk's bytes) or `"qcow2"` (a
    /// qcow2 image, served by the tracker as its raw file, with qemu's
    /// qcow2 driver on top of the NBD node so the replica is the qcow2
    /// file byte for byte). Required: guessing a format from the contents
    /// lets a guest that writes a qcow2 header into a raw disk change how
    /// the host reads it.
    pub format: ImageFormat,

    /// For a qcow2 image with a backing file: the disk of this spec that
    /// is that backing file. It is served by the tracker and replicated
    /// like every disk (a chain is protected whole or not at all), and is
    /// not given to the guest as a device of its own. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<Name>,
}

/// The format of a disk's image file (see [`VmDisk::format`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// The disk's bytes as they are (an image file or a block device).
    Raw,
    /// A qcow2 image file.
    Qcow2,
}

impl ImageFormat {
    /// The name qemu and libvirt give the format.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A network interface, a `[[vm.nic]]` table: on a host bridge, or on a
/// libvirt network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [[vm.nic]] table with `mac` and `bridge` or `network`"
)]
pub struct VmNic {
    /// A Linux bridge on the host, e.g. `"br0"`. Exactly one of `bridge`
    /// and `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,

    /// A libvirt network, e.g. `"default"` (libvirt only: plain qemu has
    /// no networks). Exactly one of `bridge` and `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,

    /// The interface's MAC address, `"52:54:00:12:34:56"`: unicast, and
    /// fixed here so the guest keeps its interface names and leases after
    /// a failover. Required.
    pub mac: MacAddress,
}

/// Where a NIC is attached (see [`VmNic`]), once validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NicAttachment<'a> {
    /// A host bridge.
    Bridge(&'a str),
    /// A libvirt network.
    Network(&'a str),
}

impl VmNic {
    /// Where the NIC is attached. A validated spec has exactly one of
    /// `bridge` and `network`; `bridge` wins on an unvalidated one.
    pub fn attachment(&self) -> NicAttachment<'_> {
        match (&self.bridge, &self.network) {
            (Some(bridge), _) => NicAttachment::Bridge(bridge),
            (None, Some(network)) => NicAttachment::Network(network),
            (None, None) => NicAttachment::Bridge(""),
        }
    }
}

/// A qemu machine type: 1 to 64 bytes of `[a-z0-9._-]`, starting with a
/// letter (every type `-machine help` lists).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct MachineType(String);

impl MachineType {
    /// The type as qemu spells it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A VM spec value that breaks its rule, with the text as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmValueError {
    /// Not a machine type qemu could name.
    #[error(
        "invalid machine type {0:?}: 1 to 64 of a-z, 0-9, '.', '_' and '-', \
         starting with a letter (see `qemu-system-x86_64 -machine help`)"
    )]
    MachineType(String),
    /// Not six hex octets separated by colons.
    #[error("invalid MAC address {0:?}: six hex octets, as 52:54:00:12:34:56")]
    MacAddress(String),
}

impl FromStr for MachineType {
    type Err = VmValueError;
    fn from_str(text: &str) -> Result<Self, VmValueError> {
        let ok = (1..=64).contains(&text.len())
            && text.starts_with(|c: char| c.is_ascii_lowercase())
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(VmValueError::MachineType(text.to_owned()))
        }
    }
}

impl<'de> Deserialize<'de> for MachineType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for MachineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An Ethernet MAC address, written `52:54:00:12:34:56` (lower or upper
/// case hex, shown lower case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// Whether the address names one interface (the group bit, the least
    /// significant bit of the first octet, is clear).
    pub fn is_unicast(self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl FromStr for MacAddress {
    type Err = VmValueError;
    fn from_str(text: &str) -> Result<Self, VmValueError> {
        let bad = || VmValueError::MacAddress(text.to_owned());
        let mut octets = [0u8; 6];
        let mut parts = text.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(octets))
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A bridge or network name that is one word safe in a qemu option value
/// and in XML: 1 to `max` bytes, none of them white space, a control
/// character, `,` `/` `<` `>` `&` `'` or `"`.
fn check_interface_word(word: &str, max: usize) -> Result<(), String> {
    if word.is_empty() || word.len() > max {
        return Err(format!("must be 1 to {max} bytes long"));
    }
    if let Some(c) = word
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || ",/<>&'\"=".contains(*c))
    {
        return Err(format!("must not contain {c:?}"));
    }
    Ok(())
}

impl VmSpec {
    /// The disks the guest sees, in order: every disk that is not another
    /// disk's backing file.
    pub fn guest_disks(&self) -> impl Iterator<Item = (usize, &VmDisk)> {
        self.disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !self.is_backing_file(&d.name))
    }

    /// Whether the disk named `name` is another disk's backing file.
    pub fn is_backing_file(&self, name: &Name) -> bool {
        self.disks.iter().any(|d| d.backing.as_ref() == Some(name))
    }

    /// The index of the disk named `name`.
    pub fn disk_index(&self, name: &Name) -> Option<usize> {
        self.disks.iter().position(|d| &d.name == name)
    }

    /// Checks the rules a well-typed `[vm]` table must also follow. Errors
    /// name the setting as `vm.<key>`, without a file position.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at = FieldPath::root().key("vm");
        if !(MIN_CPUS..=MAX_CPUS).contains(&self.cpus) {
            return Err(ConfigError::invalid(
                at.key("cpus"),
                format!("cpus must be from {MIN_CPUS} to {MAX_CPUS}"),
            ));
        }
        if self.memory < MIN_MEMORY {
            return Err(ConfigError::invalid(
                at.key("memory"),
                format!(
                    "memory {} is below the minimum of {MIN_MEMORY}",
                    self.memory
                ),
            ));
        }
        if !self.memory.as_u64().is_multiple_of(MEMORY_GRANULE.as_u64()) {
            return Err(ConfigError::invalid(
                at.key("memory"),
                format!(
                    "memory {} is not a multiple of {MEMORY_GRANULE}",
                    self.memory
                ),
            ));
        }
        if let Some(path) = &self.guest_agent {
            if !path.is_absolute() {
                return Err(ConfigError::invalid(
                    at.key("guest-agent"),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        self.validate_disks(&at)?;
        self.validate_nics(&at)?;
        self.validate_kernel(&at)
    }

    fn validate_kernel(&self, at: &FieldPath) -> Result<(), ConfigError> {
        let Some(kernel) = &self.kernel else {
            return Ok(());
        };
        let at = at.key("kernel");
        let files = [
            ("path", Some(&kernel.path)),
            ("initrd", kernel.initrd.as_ref()),
        ];
        for (key, path) in files {
            let Some(path) = path else { continue };
            if !path.is_absolute() || path.to_str().is_none() {
                return Err(ConfigError::invalid(
                    at.key(key),
                    format!("{} is not an absolute UTF-8 path", path.display()),
                ));
            }
        }
        Ok(())
    }

    fn validate_disks(&self, at: &FieldPath) -> Result<(), ConfigError> {
        if self.disks.is_empty() {
            return Err(ConfigError::invalid(
                at.key("disk"),
                "no disks; add at least one [[vm.disk]] table with `name`, `path` and `format`",
            ));
        }
        let mut names: HashMap<&Name, usize> = HashMap::new();
        let mut paths: HashMap<&PathBuf, usize> = HashMap::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let here = at.key("disk").index(i);
            if let Some(first) = names.insert(&disk.name, i) {
                return Err(ConfigError::invalid(
                    here.key("name"),
                    format!(
                        "disk name {:?} is already used by vm.disk[{first}]",
                        disk.name.as_str()
                    ),
                ));
            }
            if !disk.path.is_absolute() {
                return Err(ConfigError::invalid(
                    here.key("path"),
                    format!("{} is not an absolute path", disk.path.display()),
                ));
            }
            if disk.path.to_str().is_none() {
                return Err(ConfigError::invalid(
                    here.key("path"),
                    format!(
                        "{} is not UTF-8: qemu and libvirt take paths as text",
                        disk.path.display()
                    ),
                ));
            }
            if let Some(first) = paths.insert(&disk.path, i) {
                return Err(ConfigError::invalid(
                    here.key("path"),
                    format!(
                        "{} is already the path of vm.disk[{first}]",
                        disk.path.display()
                    ),
                ));
            }
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let Some(backing) = &disk.backing else {
                continue;
            };
            let here = at.key("disk").index(i).key("backing");
            if disk.format != ImageFormat::Qcow2 {
                return Err(ConfigError::invalid(
                    here,
                    "only a qcow2 image has a backing file; this disk's format is raw",
                ));
            }
            if self.disk_index(backing).is_none() {
                return Err(ConfigError::invalid(
                    here,
                    format!("no [[vm.disk]] is named {:?}", backing.as_str()),
                ));
            }
            // Follow the chain: it must end, within as many steps as there
            // are disks, at a disk without a backing file.
            let mut next = Some(backing);
            for _ in 0..self.disks.len() {
                next = next
                    .and_then(|n| self.disk_index(n))
                    .and_then(|j| self.disks[j].backing.as_ref());
            }
            if next.is_some() {
                return Err(ConfigError::invalid(
                    here,
                    "the backing files form a loop: a chain must end at a disk without `backing`",
                ));
            }
        }
        Ok(())
    }

    fn validate_nics(&self, at: &FieldPath) -> Result<(), ConfigError> {
        let mut macs: HashMap<MacAddress, usize> = HashMap::new();
        for (i, nic) in self.nics.iter().enumerate() {
            let here = at.key("nic").index(i);
            match (&nic.bridge, &nic.network) {
                (Some(bridge), None) => check_interface_word(bridge, MAX_IFNAME_LEN)
                    .map_err(|m| ConfigError::invalid(here.key("bridge"), format!("bridge {m}")))?,
                (None, Some(network)) => check_interface_word(network, 64).map_err(|m| {
                    ConfigError::invalid(here.key("network"), format!("network {m}"))
                })?,
                (Some(_), Some(_)) => {
                    return Err(ConfigError::invalid(
                        here.key("network"),
                        "give either `bridge` or `network`, not both",
                    ))
                }
                (None, None) => {
                    return Err(ConfigError::invalid(
                        here,
                        "no `bridge` or `network`: say where the interface is attached",
                    ))
                }
            }
            if !nic.mac.is_unicast() {
                return Err(ConfigError::invalid(
                    here.key("mac"),
                    format!(
                        "{} is a multicast address; an interface needs a unicast one \
                         (the first octet even, as 52:54:00:…)",
                        nic.mac
                    ),
                ));
            }
            if let Some(first) = macs.insert(nic.mac, i) {
                return Err(ConfigError::invalid(
                    here.key("mac"),
                    format!("{} is already the MAC of vm.nic[{first}]", nic.mac),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const GOOD: &str = r#"
[vm]
name = "web1"
cpus = 2
memory = "2GiB"

[[vm.disk]]
name = "root"
path = "/var/lib/images/web1-root.qcow2"
format = "qcow2"

[[vm.disk]]
name = "data"
path = "/dev/disk/by-id/nvme-data"
format = "raw"

[[vm.nic]]
bridge = "br0"
mac = "52:54:00:12:34:56"
"#;

    fn parse(text: &str) -> Result<VmSpec, ConfigError> {
        crate::parse_vm_spec(text, Path::new("web1.toml"))
    }

    /// `text` is GOOD with `from` replaced by `to`; it must be refused, the
    /// error naming `field`, and its message containing `says`.
    fn refused(from: &str, to: &str, field: &str, says: &str) {
        assert!(GOOD.contains(from), "{from:?} is not in the spec");
        let err = parse(&GOOD.replacen(from, to, 1)).expect_err(to);
        let shown = err.to_string();
        assert_eq!(
            err.field().map(ToString::to_string).as_deref(),
            Some(field),
            "{shown}"
        );
        assert!(shown.starts_with("web1.toml:"), "{shown}");
        assert!(shown.contains(says), "{shown}");
    }

    #[test]
    fn a_good_spec_parses_with_its_defaults() {
        let spec = parse(GOOD).unwrap();
        assert_eq!(spec.name.as_str(), "web1");
        assert_eq!(spec.memory, ByteSize::gib(2));
        assert_eq!(spec.machine.as_str(), "q35");
        assert_eq!(spec.disks[0].format, ImageFormat::Qcow2);
        assert_eq!(spec.nics[0].attachment(), NicAttachment::Bridge("br0"));
        assert_eq!(spec.nics[0].mac.to_string(), "52:54:00:12:34:56");
    }

    #[test]
    fn bad_values_are_refused_naming_the_field() {
        refused("\"web1\"", "\"Web1\"", "vm.name", "upper-case");
        refused("cpus = 2", "cpus = 0", "vm.cpus", "from 1 to 288");
        refused("\"2GiB\"", "\"8MiB\"", "vm.memory", "below the minimum");
        refused("\"2GiB\"", "\"20481KiB\"", "vm.memory", "multiple of 1MiB");
        refused("\"2GiB\"", "\"2GB\"", "vm.memory", "");
        refused(
            "name = \"web1\"",
            "name = \"web1\"\nmachine = \"Q35\"",
            "vm.machine",
            "invalid machine type",
        );
        refused(
            "name = \"data\"",
            "name = \"root\"",
            "vm.disk[1].name",
            "already used by vm.disk[0]",
        );
        refused(
            "\"/dev/disk/by-id/nvme-data\"",
            "\"images/data.raw\"",
            "vm.disk[1].path",
            "not an absolute path",
        );
        refused(
            "\"/dev/disk/by-id/nvme-data\"",
            "\"/var/lib/images/web1-root.qcow2\"",
            "vm.disk[1].path",
            "already the path of vm.disk[0]",
        );
        refused(
            "format = \"raw\"",
            "format = \"vmdk\"",
            "vm.disk[1].format",
            "unknown variant",
        );
        refused(
            "format = \"raw\"\n",
            "",
            "vm.disk[1]",
            "missing field `format`",
        );
        refused(
            "\"52:54:00:12:34:56\"",
            "\"52:54:00:12:34\"",
            "vm.nic[0].mac",
            "invalid MAC address",
        );
        refused(
            "\"52:54:00:12:34:56\"",
            "\"53:54:00:12:34:56\"",
            "vm.nic[0].mac",
            "multicast",
        );
        refused(
            "bridge = \"br0\"",
            "bridge = \"br0\"\nnetwork = \"default\"",
            "vm.nic[0].network",
            "not both",
        );
        refused(
            "bridge = \"br0\"\n",
            "",
            "vm.nic[0]",
            "no `bridge` or `network`",
        );
        refused(
            "\"br0\"",
            "\"a-very-long-bridge-name\"",
            "vm.nic[0].bridge",
            "1 to 15 bytes",
        );
        refused("\"br0\"", "\"br,0\"", "vm.nic[0].bridge", "','");
        refused("cpus = 2", "cpus = 2\ncpu = 2", "vm", "unknown field `cpu`");
        refused(
            "[[vm.disk]]",
            "[vm.kernel]\npath = \"vmlinuz\"\n\n[[vm.disk]]",
            "vm.kernel.path",
            "not an absolute UTF-8 path",
        );
    }

    #[test]
    fn a_direct_kernel_boot_parses() {
        let text = GOOD.replacen(
            "[[vm.disk]]",
            "[vm.kernel]\npath = \"/boot/vmlinuz\"\nappend = \"console=ttyS0\"\n\n[[vm.disk]]",
            1,
        );
        let kernel = parse(&text).unwrap().kernel.unwrap();
        assert_eq!(kernel.path, Path::new("/boot/vmlinuz"));
        assert_eq!(kernel.initrd, None);
        assert_eq!(kernel.append, "console=ttyS0");
        assert_eq!(parse(GOOD).unwrap().kernel, None);
    }

    #[test]
    fn backing_files_must_be_disks_of_the_spec_and_form_no_loop() {
        let chain = GOOD.replace(
            "format = \"qcow2\"",
            "format = \"qcow2\"\nbacking = \"data\"",
        );
        let spec = parse(&chain).unwrap();
        let guest: Vec<&str> = spec.guest_disks().map(|(_, d)| d.name.as_str()).collect();
        assert_eq!(guest, ["root"], "a backing file is not a guest disk");
        let err = parse(&chain.replace("backing = \"data\"", "backing = \"base\"")).unwrap_err();
        assert_eq!(err.field().unwrap().to_string(), "vm.disk[0].backing");
        assert!(
            err.to_string().contains("no [[vm.disk]] is named \"base\""),
            "{err}"
        );
        let looped = chain.replace("format = \"raw\"", "format = \"qcow2\"\nbacking = \"root\"");
        let err = parse(&looped).unwrap_err();
        assert!(err.to_string().contains("loop"), "{err}");
        let raw = chain.replace("format = \"qcow2\"", "format = \"raw\"");
        let err = parse(&raw).unwrap_err();
        assert_eq!(err.field().unwrap().to_string(), "vm.disk[0].backing");
    }

    #[test]
    fn a_spec_without_disks_is_refused() {
        let text = "[vm]\nname = \"web1\"\ncpus = 1\nmemory = \"1GiB\"\ndisk = []\n";
        let err = parse(text).unwrap_err();
        assert_eq!(err.field().unwrap().to_string(), "vm.disk");
        assert!(err.to_string().contains("no disks"), "{err}");
        let single = "[vm]\nname = \"web1\"\ncpus = 1\nmemory = \"1GiB\"\n\
                      [vm.disk]\nname = \"root\"\npath = \"/r\"\nformat = \"raw\"\n";
        let err = parse(single).unwrap_err();
        assert_eq!(err.field().unwrap().to_string(), "vm.disk");
        assert!(err.to_string().contains("double brackets"), "{err}");
    }

    #[test]
    fn mac_addresses_round_trip_in_lower_case() {
        let mac: MacAddress = "52:54:00:AB:cd:0F".parse().unwrap();
        assert_eq!(mac.to_string(), "52:54:00:ab:cd:0f");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:00",
            "5:54:00:ab:cd:0f",
        ] {
            assert!(bad.parse::<MacAddress>().is_err(), "{bad}");
        }
    }
}
