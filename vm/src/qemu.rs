//! A VM spec as qemu command-line arguments.
//!
//! Every disk of the spec is a block node graph; only the disks that are
//! no other disk's backing file become guest devices:
//!
//! ```text
//! raw:    -blockdev driver=nbd,node-name=diskN,discard=unmap,server.type=unix,server.path=SOCK,export=NAME
//! qcow2:  -blockdev driver=nbd,node-name=diskN-file,discard=unmap,...,export=NAME
//!         -blockdev {"driver":"qcow2","node-name":"diskN","file":"diskN-file","backing":"diskM"|null,"discard":"unmap"}
//!         (a failed-over disk, a file on the replica site, reads the same
//!         with driver=file,filename=PATH in place of the nbd options)
//! guest:  -device virtio-blk-pci,drive=diskN,serial=NAME
//! agent:  -chardev socket,id=qga0,path=SOCK,server=on,wait=off -device virtio-serial-pci,id=vser0
//!         -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0
//! ```
//!
//! Node names are taken from the disk's index (qemu's node names allow
//! fewer characters and lengths than our names); the guest finds its
//! disk as `/dev/disk/by-id/virtio-NAME` by the serial. A qcow2 image
//! without a spec backing gets `"backing": null` (in qemu's JSON syntax,
//! the only one with a null): qemu must not open a backing file on its
//! own, around the tracker. The nodes of a backing
//! file are `read-only=on` instead of `discard=unmap`. Option values are escaped
//! the way qemu reads them (a `,` doubled).

use tidemark_config::{ImageFormat, NicAttachment, VmNic, VmSpec};

use crate::{check_sources, utf8, DiskSource, RenderError};

/// The qemu node name of disk `index`'s top node (what the guest device
/// or an overlay names).
pub fn node_name(index: usize) -> String {
    format!("disk{index}")
}

/// A value inside a qemu `-blockdev`/`-device` option list: commas are
/// doubled, the only escape qemu's option parser knows.
pub(crate) fn value(text: &str) -> String {
    text.replace(',', ",,")
}

/// The `-blockdev` options of the node that reads `source` (`access`:
/// `read-only=on` or `discard=unmap`).
fn source_node(node: &str, access: &str, source: &DiskSource) -> Result<String, RenderError> {
    match source {
        DiskSource::Nbd { socket, export } => Ok(format!(
            "driver=nbd,node-name={node},{access},server.type=unix,server.path={},export={}",
            value(utf8(socket)?),
            value(export)
        )),
        DiskSource::File { path } => Ok(format!(
            "driver=file,node-name={node},{access},filename={}",
            value(utf8(path)?)
        )),
    }
}

/// Appends the `-blockdev` nodes of disk `i` of `spec`, read from `source`.
fn disk_nodes(
    args: &mut Vec<String>,
    spec: &VmSpec,
    i: usize,
    source: &DiskSource,
) -> Result<(), RenderError> {
    let disk = &spec.disks[i];
    let top = node_name(i);
    // A backing file is only read, by the overlay above it.
    let read_only = spec.is_backing_file(&disk.name);
    let access = if read_only {
        "read-only=on"
    } else {
        "discard=unmap"
    };
    match disk.format {
        ImageFormat::Raw => {
            args.push("-blockdev".into());
            args.push(source_node(&top, access, source)?);
        }
        ImageFormat::Qcow2 => {
            let file = format!("{top}-file");
            args.push("-blockdev".into());
            args.push(source_node(&file, access, source)?);
            // qemu's key=value syntax has no null: a qcow2 node without a
            // spec backing says `"backing": null` in its JSON syntax.
            let backing = match disk.backing.as_ref().and_then(|b| spec.disk_index(b)) {
                Some(j) => serde_json::Value::from(node_name(j)),
                None => serde_json::Value::Null,
            };
            let mut node = serde_json::json!({
                "driver": "qcow2",
                "node-name": top,
                "file": file,
                "backing": backing,
            });
            if read_only {
                node["read-only"] = true.into();
            } else {
                node["discard"] = "unmap".into();
            }
            args.push("-blockdev".into());
            args.push(node.to_string());
        }
    }
    Ok(())
}

/// The arguments that start the VM of `spec` with disk `i` of the spec
/// read from `sources[i]` (see [`DiskSource::tracker_exports`]).
pub fn args(spec: &VmSpec, sources: &[DiskSource]) -> Result<Vec<String>, RenderError> {
    let mut args = machine_and_disks(spec, sources)?;
    for (i, nic) in spec.nics.iter().enumerate() {
        let bridge = match nic.attachment() {
            NicAttachment::Bridge(bridge) => bridge,
            NicAttachment::Network(network) => {
                return Err(RenderError::NetworkNeedsLibvirt {
                    nic: i,
                    network: network.to_owned(),
                })
            }
        };
        nic_args(&mut args, i, &format!("bridge,br={}", value(bridge)), nic);
    }
    if let Some(socket) = &spec.guest_agent {
        agent_args(&mut args, socket)?;
    }
    Ok(args)
}

/// Appends the guest agent's channel on the unix socket `socket`: qemu
/// listens; the tracker (to freeze the guest) or a boot (to see it up)
/// connects.
pub(crate) fn agent_args(
    args: &mut Vec<String>,
    socket: &std::path::Path,
) -> Result<(), RenderError> {
    args.extend([
        "-chardev".into(),
        format!(
            "socket,id=qga0,path={},server=on,wait=off",
            value(utf8(socket)?)
        ),
        "-device".into(),
        "virtio-serial-pci,id=vser0".into(),
        "-device".into(),
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".into(),
    ]);
    Ok(())
}

/// Appends NIC `i` of a spec: a `-netdev` of `backend` (its type and
/// options, e.g. `bridge,br=br0`) and the guest's virtio device with the
/// spec's MAC.
pub(crate) fn nic_args(args: &mut Vec<String>, i: usize, backend: &str, nic: &VmNic) {
    let (kind, options) = backend.split_once(',').unwrap_or((backend, ""));
    args.push("-netdev".into());
    args.push(if options.is_empty() {
        format!("{kind},id=net{i}")
    } else {
        format!("{kind},id=net{i},{options}")
    });
    args.push("-device".into());
    args.push(format!("virtio-net-pci,netdev=net{i},mac={}", nic.mac));
}

/// The arguments of everything but the NICs: the machine, the direct
/// kernel boot if any, the disks' nodes and the guest's disk devices.
pub(crate) fn machine_and_disks(
    spec: &VmSpec,
    sources: &[DiskSource],
) -> Result<Vec<String>, RenderError> {
    check_sources(spec, sources)?;
    let mut args: Vec<String> = vec![
        "-name".into(),
        format!("{},process=qemu-{}", spec.name, spec.name),
        "-machine".into(),
        spec.machine.as_str().into(),
        "-smp".into(),
        spec.cpus.to_string(),
        "-m".into(),
        format!("{}M", spec.memory.as_u64() >> 20),
    ];
    if let Some(kernel) = &spec.kernel {
        args.push("-kernel".into());
        args.push(utf8(&kernel.path)?.into());
        if let Some(initrd) = &kernel.initrd {
            args.push("-initrd".into());
            args.push(utf8(initrd)?.into());
        }
        if !kernel.append.is_empty() {
            args.push("-append".into());
            args.push(kernel.append.clone());
        }
    }
    // A node names its backing node, which qemu must know by then: the
    // disks' nodes go out backing files first.
    let mut emitted = vec![false; spec.disks.len()];
    for i in 0..spec.disks.len() {
        let mut chain = vec![i];
        while let Some(j) = chain
            .last()
            .and_then(|&k| spec.disks[k].backing.as_ref())
            .and_then(|b| spec.disk_index(b))
            .filter(|&j| !emitted[j] && chain.len() <= spec.disks.len())
        {
            chain.push(j);
        }
        for &k in chain.iter().rev() {
            if !emitted[k] {
                emitted[k] = true;
                disk_nodes(&mut args, spec, k, &sources[k])?;
            }
        }
    }
    for (i, disk) in spec.guest_disks() {
        args.push("-device".into());
        args.push(format!(
            "virtio-blk-pci,drive={},id={}-dev,serial={}",
            node_name(i),
            node_name(i),
            disk.name
        ));
    }
    Ok(args)
}

/// `args` as one shell command line: `qemu-system-x86_64` and every
/// argument, quoted where a shell would split or expand it, one option
/// per line.
pub fn command_line(args: &[String]) -> String {
    let mut line = "qemu-system-x86_64".to_owned();
    let mut iter = args.iter().peekable();
    while let Some(arg) = iter.next() {
        line.push_str(" \\\n    ");
        line.push_str(&shell_word(arg));
        if arg.starts_with('-') {
            if let Some(value) = iter.next_if(|v| !v.starts_with('-')) {
                line.push(' ');
                line.push_str(&shell_word(value));
            }
        }
    }
    line.push('\n');
    line
}

/// `word` quoted for a POSIX shell when it needs it.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.,:/=@%+".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden::{golden, spec, SPEC};
    use std::path::Path;

    #[test]
    fn the_golden_spec_renders_to_the_golden_qemu_command() {
        let spec = spec(SPEC);
        let sources = DiskSource::tracker_exports(&spec, Path::new("/run/tidemark/web1.nbd.sock"));
        let args = args(&spec, &sources).unwrap();
        golden("web1.qemu.sh", &command_line(&args));
    }

    #[test]
    fn commas_in_a_socket_path_are_doubled() {
        let spec = spec(SPEC);
        let sources = DiskSource::tracker_exports(&spec, Path::new("/run/a,b/nbd.sock"));
        let args = args(&spec, &sources).unwrap();
        assert!(
            args.iter()
                .any(|a| a.contains("server.path=/run/a,,b/nbd.sock,")),
            "{args:?}"
        );
    }

    #[test]
    fn a_guest_agent_gets_its_channel() {
        let spec = spec(&SPEC.replace(
            "machine = \"q35\"",
            "machine = \"q35\"\nguest-agent = \"/run/tidemark/web1.qga\"",
        ));
        let sources = DiskSource::tracker_exports(&spec, Path::new("/run/s"));
        let args = args(&spec, &sources).unwrap();
        let line = args.join(" ");
        assert!(
            line.contains("-chardev socket,id=qga0,path=/run/tidemark/web1.qga,server=on,wait=off")
                && line.ends_with("name=org.qemu.guest_agent.0"),
            "{line}"
        );
    }

    #[test]
    fn a_libvirt_network_cannot_be_rendered_for_plain_qemu() {
        let spec = spec(&SPEC.replace("bridge = \"br0\"", "network = \"default\""));
        let sources = DiskSource::tracker_exports(&spec, Path::new("/run/s"));
        let err = args(&spec, &sources).unwrap_err();
        assert!(
            matches!(&err, RenderError::NetworkNeedsLibvirt { nic: 0, network } if network == "default"),
            "{err}"
        );
        let err = super::args(&spec, &sources[..1]).unwrap_err();
        assert!(
            matches!(
                err,
                RenderError::SourceCount {
                    disks: 3,
                    sources: 1
                }
            ),
            "{err}"
        );
    }
}
