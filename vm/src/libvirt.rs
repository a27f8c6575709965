//! A VM spec as a libvirt domain definition (`virsh define FILE`).
//!
//! Each guest disk is a network disk on the tracker's NBD export, its
//! format layer named by the driver, and a qcow2 overlay's backing file
//! its `<backingStore>`, served by the tracker the same way:
//!
//! ```xml
//! <disk type='network' device='disk'>
//!   <driver name='qemu' type='qcow2' discard='unmap'/>
//!   <source protocol='nbd' name='root'>
//!     <host transport='unix' socket='/run/tidemark/web1.nbd.sock'/>
//!   </source>
//!   <backingStore type='network'>
//!     <format type='qcow2'/>
//!     <source protocol='nbd' name='base'>…</source>
//!     <backingStore/>
//!   </backingStore>
//!   <target dev='vda' bus='virtio'/>
//!   <serial>root</serial>
//! </disk>
//! ```
//!
//! The socket must be reachable by libvirt's qemu user: the tracker's
//! `socket-group` (e.g. `libvirt-qemu`).
//!
//! A spec's `guest-agent` becomes the agent's channel (libvirt connects
//! to it itself: `virsh qemu-agent-command` reaches the agent):
//!
//! ```xml
//! <channel type='unix'>
//!   <source mode='bind' path='/run/tidemark/web1.qga'/>
//!   <target type='virtio' name='org.qemu.guest_agent.0'/>
//! </channel>
//! ```
//!
//! A boot on the replica site ([`BootDevices`]) adds the serial console
//! as a file (`<serial type='file'>`) and may isolate each NIC: an
//! `<interface type='ethernet'>` is a tap device libvirt creates and
//! attaches to nothing, so the guest's NIC has a link that reaches no
//! network (qemu's `user,restrict=on` of a plain qemu boot has no libvirt
//! element; given as `<qemu:commandline>` its device collides with
//! libvirt's PCI addresses).

use std::fmt::Write;
use std::path::Path;

use tidemark_config::{NicAttachment, VmSpec};

use crate::{check_sources, utf8, DiskSource, RenderError};

/// Text for an XML attribute value in single quotes, or element content.
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The guest's name for its `n`-th virtio disk: `vda` … `vdz`, `vdaa` …
fn target_dev(n: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = n + 1;
    while n > 0 {
        n -= 1;
        suffix.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

/// `<source …>` of a disk read from `source`, indented by `pad`.
fn source(out: &mut String, pad: &str, source: &DiskSource) -> Result<(), RenderError> {
    match source {
        DiskSource::Nbd { socket, export } => {
            let _ = writeln!(out, "{pad}<source protocol='nbd' name='{}'>", xml(export));
            let _ = writeln!(
                out,
                "{pad}  <host transport='unix' socket='{}'/>",
                xml(utf8(socket)?)
            );
            let _ = writeln!(out, "{pad}</source>");
        }
        DiskSource::File { path } => {
            let _ = writeln!(out, "{pad}<source file='{}'/>", xml(utf8(path)?));
        }
    }
    Ok(())
}

/// The libvirt disk type of a disk read from `source`.
fn disk_type(source: &DiskSource) -> &'static str {
    match source {
        DiskSource::Nbd { .. } => "network",
        DiskSource::File { .. } => "file",
    }
}

/// The `<backingStore>` chain below disk `index`, indented by `pad`.
fn backing_chain(
    out: &mut String,
    pad: &str,
    spec: &VmSpec,
    sources: &[DiskSource],
    index: usize,
) -> Result<(), RenderError> {
    // A validated spec's chains end within as many steps as it has disks.
    let mut pad = pad.to_owned();
    let mut next = spec.disks[index]
        .backing
        .as_ref()
        .and_then(|b| spec.disk_index(b));
    let mut depth = 0;
    while let Some(j) = next.filter(|_| depth < spec.disks.len()) {
        let _ = writeln!(out, "{pad}<backingStore type='{}'>", disk_type(&sources[j]));
        let _ = writeln!(out, "{pad}  <format type='{}'/>", spec.disks[j].format);
        source(out, &format!("{pad}  "), &sources[j])?;
        pad.push_str("  ");
        depth += 1;
        next = spec.disks[j]
            .backing
            .as_ref()
            .and_then(|b| spec.disk_index(b));
    }
    // An empty backingStore says the chain ends here: libvirt must not
    // probe the image for a backing file of its own.
    let _ = writeln!(out, "{pad}<backingStore/>");
    for _ in 0..depth {
        pad.truncate(pad.len() - 2);
        let _ = writeln!(out, "{pad}</backingStore>");
    }
    Ok(())
}

/// The domain XML of `spec` with disk `i` of the spec read from
/// `sources[i]` (see [`DiskSource::tracker_exports`]).
pub fn domain_xml(spec: &VmSpec, sources: &[DiskSource]) -> Result<String, RenderError> {
    domain_xml_of(spec, sources, "kvm")
}

/// What a boot on the replica site adds to a domain.
#[derive(Clone, Copy, Debug)]
pub struct BootDevices<'a> {
    /// The file the serial console is written to.
    pub console: &'a Path,
    /// Every NIC of the spec on a network of its own that reaches
    /// nothing, in place of its bridge or network.
    pub isolated_nics: bool,
}

/// [`domain_xml`] with the domain type `kind`: `kvm`, or `qemu` (TCG)
/// where the host has no KVM.
pub fn domain_xml_of(
    spec: &VmSpec,
    sources: &[DiskSource],
    kind: &str,
) -> Result<String, RenderError> {
    boot_domain_xml(spec, sources, kind, None)
}

/// [`domain_xml_of`] with what a boot adds, if any.
pub fn boot_domain_xml(
    spec: &VmSpec,
    sources: &[DiskSource],
    kind: &str,
    boot: Option<&BootDevices<'_>>,
) -> Result<String, RenderError> {
    check_sources(spec, sources)?;
    let isolated = boot.is_some_and(|b| b.isolated_nics);
    let mut out = String::new();
    let _ = writeln!(out, "<domain type='{kind}'>");
    let _ = writeln!(out, "  <name>{}</name>", xml(&spec.name));
    let _ = writeln!(
        out,
        "  <memory unit='KiB'>{}</memory>",
        spec.memory.as_u64() >> 10
    );
    let _ = writeln!(out, "  <vcpu>{}</vcpu>", spec.cpus);
    let _ = writeln!(out, "  <os>");
    let _ = writeln!(
        out,
        "    <type arch='x86_64' machine='{}'>hvm</type>",
        xml(spec.machine.as_str())
    );
    if let Some(kernel) = &spec.kernel {
        let _ = writeln!(out, "    <kernel>{}</kernel>", xml(utf8(&kernel.path)?));
        if let Some(initrd) = &kernel.initrd {
            let _ = writeln!(out, "    <initrd>{}</initrd>", xml(utf8(initrd)?));
        }
        if !kernel.append.is_empty() {
            let _ = writeln!(out, "    <cmdline>{}</cmdline>", xml(&kernel.append));
        }
    }
    let _ = writeln!(out, "  </os>");
    let _ = writeln!(out, "  <features>\n    <acpi/>\n  </features>");
    let _ = writeln!(out, "  <devices>");
    for (n, (i, disk)) in spec.guest_disks().enumerate() {
        let _ = writeln!(
            out,
            "    <disk type='{}' device='disk'>",
            disk_type(&sources[i])
        );
        let _ = writeln!(
            out,
            "      <driver name='qemu' type='{}' discard='unmap'/>",
            disk.format
        );
        source(&mut out, "      ", &sources[i])?;
        backing_chain(&mut out, "      ", spec, sources, i)?;
        let _ = writeln!(out, "      <target dev='{}' bus='virtio'/>", target_dev(n));
        let _ = writeln!(out, "      <serial>{}</serial>", xml(&disk.name));
        let _ = writeln!(out, "    </disk>");
    }
    for nic in &spec.nics {
        let (kind, attribute, name) = match nic.attachment() {
            _ if isolated => ("ethernet", "", ""),
            NicAttachment::Bridge(bridge) => ("bridge", "bridge", bridge),
            NicAttachment::Network(network) => ("network", "network", network),
        };
        let _ = writeln!(out, "    <interface type='{kind}'>");
        let _ = writeln!(out, "      <mac address='{}'/>", nic.mac);
        if !isolated {
            let _ = writeln!(out, "      <source {attribute}='{}'/>", xml(name));
        }
        let _ = writeln!(out, "      <model type='virtio'/>");
        let _ = writeln!(out, "    </interface>");
    }
    if let Some(boot) = boot {
        let _ = writeln!(out, "    <serial type='file'>");
        let _ = writeln!(out, "      <source path='{}'/>", xml(utf8(boot.console)?));
        let _ = writeln!(out, "      <target port='0'/>");
        let _ = writeln!(out, "    </serial>");
    }
    if let Some(socket) = &spec.guest_agent {
        let _ = writeln!(out, "    <channel type='unix'>");
        let _ = writeln!(
            out,
            "      <source mode='bind' path='{}'/>",
            xml(utf8(socket)?)
        );
        let _ = writeln!(
            out,
            "      <target type='virtio' name='org.qemu.guest_agent.0'/>"
        );
        let _ = writeln!(out, "    </channel>");
    }
    let _ = writeln!(out, "  </devices>");
    let _ = writeln!(out, "</domain>");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::{golden, spec, SPEC};
    use std::path::Path;

    #[test]
    fn the_golden_spec_renders_to_the_golden_domain() {
        let spec = spec(SPEC);
        let sources = DiskSource::tracker_exports(&spec, Path::new("/run/tidemark/web1.nbd.sock"));
        golden("web1.xml", &domain_xml(&spec, &sources).unwrap());
    }

    #[test]
    fn a_libvirt_network_is_rendered_and_markup_in_paths_escaped() {
        let spec = spec(&SPEC.replace("bridge = \"br0\"", "network = \"default\""));
        let sources = DiskSource::tracker_exports(&spec, Path::new("/run/a'<&>/s"));
        let xml = domain_xml(&spec, &sources).unwrap();
        assert!(xml.contains("<interface type='network'>"), "{xml}");
        assert!(xml.contains("<source network='default'/>"), "{xml}");
        assert!(
            xml.contains("socket='/run/a&apos;&lt;&amp;&gt;/s'"),
            "{xml}"
        );
    }

    #[test]
    fn a_guest_agent_gets_its_channel_and_a_boot_its_console_and_isolated_nics() {
        let mut spec = spec(SPEC);
        spec.guest_agent = Some("/run/tidemark/web1.qga".into());
        let sources = DiskSource::tracker_exports(&spec, Path::new("/run/tidemark/web1.nbd.sock"));
        let xml = domain_xml(&spec, &sources).unwrap();
        assert!(
            xml.contains(
                "    <channel type='unix'>\n      <source mode='bind' path='/run/tidemark/web1.qga'/>\n      \
                 <target type='virtio' name='org.qemu.guest_agent.0'/>\n    </channel>\n"
            ),
            "{xml}"
        );
        assert!(!xml.contains("<serial type"), "{xml}");
        assert!(!xml.contains("qemu:"), "{xml}");
        let boot = BootDevices {
            console: Path::new("/run/tidemark/web1.console"),
            isolated_nics: true,
        };
        let xml = boot_domain_xml(&spec, &sources, "qemu", Some(&boot)).unwrap();
        assert!(xml.starts_with("<domain type='qemu'>"), "{xml}");
        assert!(
            xml.contains("<serial type='file'>\n      <source path='/run/tidemark/web1.console'/>"),
            "{xml}"
        );
        assert!(!xml.contains("<source bridge"), "{xml}");
        assert!(
            xml.contains(
                "    <interface type='ethernet'>\n      <mac address='52:54:00:12:34:57'/>\n      \
                 <model type='virtio'/>\n"
            ),
            "{xml}"
        );
        // Not isolated: the NICs as the spec has them.
        let mapped = BootDevices {
            isolated_nics: false,
            ..boot
        };
        let xml = boot_domain_xml(&spec, &sources, "qemu", Some(&mapped)).unwrap();
        assert_eq!(xml.matches("<interface type='bridge'>").count(), 2, "{xml}");
    }

    #[test]
    fn guest_disks_are_named_like_the_kernel_names_them() {
        let names: Vec<String> = [0, 1, 25, 26, 27, 51, 52, 701, 702]
            .into_iter()
            .map(target_dev)
            .collect();
        assert_eq!(
            names,
            ["vda", "vdb", "vdz", "vdaa", "vdab", "vdaz", "vdba", "vdzz", "vdaaa"]
        );
    }
}
