//! `tidemark vm`: protect a virtual machine on its hypervisor. The logic is
//! `tidemark_vm`'s; this module reads the options and prints.

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::points_cmd::{choose, ReplicaArgs};
use tidemark_config::ByteSize;
use tidemark_receiver::vm_spec::{VmSpecs, VM_SPEC_FILE};
use tidemark_vm::group::{GroupLayout, HostDirs, Protection};
use tidemark_vm::live::{self, Direction, DiskOutcome, LiveDisk, LiveMove};
use tidemark_vm::{libvirt, qemu, DiskSource};

/// `tidemark vm ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum VmCommand {
    /// Configure the VM's consistency group (one per VM): its tracker
    /// serves each disk image (a qcow2 file raw, qemu layering qcow2 on the
    /// NBD node), its shipper sends them like the host's other groups.
    /// Checks qcow2 backing chains; prints the units to enable.
    Protect(ProtectArgs),
    /// Print the VM's qemu arguments or libvirt domain XML, its disks on
    /// the tracker's NBD exports.
    Render(RenderArgs),
    /// Move a running VM's disks back from the tracker's exports onto
    /// their files, over its QMP socket, without stopping it.
    Unprotect(UnprotectArgs),
    /// On the replica site: print the VM spec the protected site
    /// replicated with a group, as of a recovery point (what `--boot`
    /// without a file starts), or list its versions.
    Spec(SpecArgs),
}

/// `tidemark vm spec`.
#[derive(Debug, Args)]
pub(crate) struct SpecArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
    /// The recovery point whose spec to print: `latest`, a sequence
    /// number, a time or a marker's label (as `tidemark failover
    /// --point`). Default: the current version.
    #[arg(long, conflicts_with = "all")]
    point: Option<String>,
    /// List every version kept (the first record each applies to, the
    /// VM's name, CPUs and memory) instead of printing one.
    #[arg(long)]
    all: bool,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

/// Where a host keeps its groups' files (the packages' paths by default).
#[derive(Debug, Args)]
struct DirArgs {
    /// The groups' configuration files (GROUP.toml, read by the units).
    #[arg(long, default_value = "/etc/tidemark/groups")]
    config_dir: PathBuf,
    /// The tracker's and shipper's sockets.
    #[arg(long, default_value = "/run/tidemark")]
    run_dir: PathBuf,
    /// State: the change logs go under STATE/groups/GROUP/log.
    #[arg(long, default_value = "/var/lib/tidemark")]
    state_dir: PathBuf,
    /// systemd's unit directory (the tracker's drop-in for the images).
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
}

impl DirArgs {
    fn dirs(&self) -> HostDirs {
        HostDirs {
            config_dir: self.config_dir.clone(),
            run_dir: self.run_dir.clone(),
            state_dir: self.state_dir.clone(),
            unit_dir: self.unit_dir.clone(),
        }
    }
}

/// `tidemark vm protect`.
#[derive(Debug, Args)]
pub(crate) struct ProtectArgs {
    /// The VM's spec: a `[vm]` table with `[[vm.disk]]` and `[[vm.nic]]` tables.
    spec: PathBuf,
    /// The host's shipper configuration: its identity, receiver and TLS
    /// are the group's.
    #[arg(long, default_value = "/etc/tidemark/shipper.toml")]
    shipper_config: PathBuf,
    /// The VM's log budget: the most space its change log takes before
    /// its disks fall back to bitmap mode.
    #[arg(long, default_value = "8GiB", value_parser = parse_size)]
    log_size_limit: ByteSize,
    /// The tracker's metrics on 127.0.0.1:PORT, the shipper's on PORT+1
    /// (default: a free port each).
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Let this group (libvirt's qemu: libvirt-qemu) use the NBD socket.
    #[arg(long)]
    socket_group: Option<String>,
    /// Extend qcow2 files (sparse) to the most they may grow: the
    /// tracker's NBD export cannot grow. Stop the VM first.
    #[arg(long)]
    grow_images: bool,
    /// Overwrite the group's configuration if it exists.
    #[arg(long)]
    replace: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Move the running VM's disks onto the group's tracker (already
    /// serving them) over its QMP socket, without stopping it; writes no
    /// configuration.
    #[arg(long, requires = "qmp")]
    live: bool,
    /// The running VM's QMP socket (`-qmp unix:PATH,server=on,wait=off`).
    #[arg(long, value_name = "SOCKET", requires = "live")]
    qmp: Option<PathBuf>,
    #[command(flatten)]
    dirs: DirArgs,
}

/// `tidemark vm unprotect`.
#[derive(Debug, Args)]
pub(crate) struct UnprotectArgs {
    /// The VM's spec.
    spec: PathBuf,
    /// The running VM's QMP socket.
    #[arg(long, value_name = "SOCKET")]
    qmp: PathBuf,
    /// The tracker's sockets (GROUP.nbd.sock in it).
    #[arg(long, default_value = "/run/tidemark")]
    run_dir: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// `tidemark vm render`.
#[derive(Debug, Args)]
pub(crate) struct RenderArgs {
    /// The VM's spec.
    spec: PathBuf,
    /// qemu command-line arguments (one shell command).
    #[arg(long, conflicts_with = "libvirt", required_unless_present = "libvirt")]
    qemu: bool,
    /// A libvirt domain definition (for `virsh define`).
    #[arg(long)]
    libvirt: bool,
    /// The tracker's sockets (GROUP.nbd.sock in it).
    #[arg(long, default_value = "/run/tidemark")]
    run_dir: PathBuf,
}

fn parse_size(text: &str) -> Result<ByteSize, String> {
    ByteSize::parse(text).map_err(|e| e.to_string())
}

pub(crate) fn run(cmd: VmCommand) -> Result<ExitCode> {
    match cmd {
        VmCommand::Protect(a) => protect(a),
        VmCommand::Render(a) => render(a),
        VmCommand::Spec(a) => spec(a),
        VmCommand::Unprotect(a) => {
            live_move(&a.spec, Direction::Unprotect, &a.qmp, a.run_dir, a.json)
        }
    }
}

/// How long qemu's monitor and the tracker have to answer each command.
const LIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Moves the running VM of `spec_path` onto the tracker's exports or
/// back (`tidemark_vm::live`), the tracker's sockets in `run_dir`.
fn live_move(
    spec_path: &Path,
    direction: Direction,
    qmp: &Path,
    run_dir: PathBuf,
    json: bool,
) -> Result<ExitCode> {
    use std::os::unix::fs::FileTypeExt;
    let spec = tidemark_config::load_vm_spec(spec_path).map_err(|e| anyhow!("{e}"))?;
    let dirs = HostDirs {
        run_dir,
        ..HostDirs::default()
    };
    let layout = GroupLayout::new(&dirs, &spec.name);
    let disks = LiveDisk::of_spec(&spec, |path| {
        std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
    });
    let core = LiveMove::new(direction, &layout.socket, disks);
    let control = &layout.control_socket;
    let report = live::run(qmp, core, LIVE_TIMEOUT, |disk| {
        tidemark_control::resync_all(control, disk, LIVE_TIMEOUT)
            .map(drop)
            .map_err(Into::into)
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let verb = match direction {
            Direction::Protect => "onto the tracker",
            Direction::Unprotect => "back onto its files",
        };
        println!(
            "VM {}: moving its disks {verb} over {}",
            spec.name,
            qmp.display()
        );
        for disk in &report.disks {
            let node = disk.node.as_deref().unwrap_or("?");
            let what = match disk.outcome {
                DiskOutcome::Moved => format!("moved from {} to {}", disk.from, disk.to),
                DiskOutcome::AlreadyThere => format!("already on {}", disk.to),
                DiskOutcome::NotMoved => format!("still on {}", disk.from),
                DiskOutcome::Unknown => "unknown (the monitor was lost)".to_owned(),
            };
            let mut line = format!("  disk {} (node {node}): {what}", disk.disk);
            if disk.resync_recorded {
                line.push_str("; recorded as resync-needed");
            }
            if let Some(old) = &disk.removed_node {
                line.push_str(&format!("; old node {old} removed"));
            }
            println!("{line}");
        }
        for warning in &report.warnings {
            eprintln!("tidemark: warning: {warning}");
        }
    }
    match &report.error {
        None => Ok(ExitCode::SUCCESS),
        Some(error) => {
            eprintln!("tidemark: the move failed: {error}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn protect(a: ProtectArgs) -> Result<ExitCode> {
    if let (true, Some(qmp)) = (a.live, &a.qmp) {
        return live_move(
            &a.spec,
            Direction::Protect,
            qmp,
            a.dirs.run_dir.clone(),
            a.json,
        );
    }
    let spec = tidemark_config::load_vm_spec(&a.spec).map_err(|e| anyhow!("{e}"))?;
    let host = tidemark_config::load(&a.shipper_config).map_err(|e| anyhow!("{e}"))?;
    let shipper = host.require_shipper().map_err(|e| anyhow!("{e}"))?;
    let protection = Protection {
        log_size_limit: a.log_size_limit,
        metrics_port: a.metrics_port,
        socket_group: a.socket_group,
        grow_images: a.grow_images,
        // The shipper reads it from wherever it runs.
        spec_file: Some(
            std::path::absolute(&a.spec)
                .with_context(|| format!("the path of {}", a.spec.display()))?,
        ),
    };
    let report =
        tidemark_vm::group::protect(&spec, &a.dirs.dirs(), &protection, shipper, a.replace)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let layout = &report.layout;
    println!(
        "VM {}: consistency group {}, {} disks served on {}",
        report.vm,
        layout.group,
        report.disks.len(),
        layout.socket.display()
    );
    println!(
        "wrote {} (log budget {})",
        layout.config.display(),
        report.log_size_limit
    );
    for growth in &report.grown {
        println!(
            "grew {} from {} to {} bytes (sparse): room for all the qcow2 image may grow",
            growth.path.display(),
            growth.from,
            growth.to
        );
    }
    if let Some(drop_in) = &report.drop_in {
        println!(
            "wrote {} (the tracker may write the images)",
            drop_in.path.display()
        );
    }
    println!("start protecting it:");
    for command in &report.systemctl {
        println!("  {command}");
    }
    println!("then run the VM on the tracker's exports (not on the image files):");
    println!("  tidemark vm render {} --qemu", a.spec.display());
    println!(
        "  tidemark vm render {} --libvirt > {}.xml && virsh define {}.xml",
        a.spec.display(),
        report.vm,
        report.vm
    );
    Ok(ExitCode::SUCCESS)
}

/// One version of a replicated spec, as `vm spec --json` prints it.
#[derive(serde::Serialize)]
struct SpecVersionJson<'a> {
    from_seq: u64,
    vm: &'a str,
    cpus: u32,
    memory: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

fn spec(a: SpecArgs) -> Result<ExitCode> {
    let dir = a.replica.dir()?;
    if a.all {
        let specs = VmSpecs::load(&dir)?;
        if specs.versions().is_empty() {
            // The same words as a failover's.
            crate::vm_boot::replicated_spec(&dir, None)?;
        }
        for v in specs.versions() {
            let parsed = tidemark_config::parse_vm_spec(&v.text, &dir.join(VM_SPEC_FILE))
                .map_err(|e| anyhow!("{e}"))?;
            if a.json {
                let line = SpecVersionJson {
                    from_seq: v.from_seq.get(),
                    vm: parsed.name.as_str(),
                    cpus: parsed.cpus,
                    memory: parsed.memory.to_string(),
                    text: None,
                };
                println!("{}", serde_json::to_string(&line)?);
            } else {
                println!(
                    "from record {:>10}  VM {}  {} CPUs  {} memory  {} disks  {} NICs",
                    v.from_seq,
                    parsed.name,
                    parsed.cpus,
                    parsed.memory,
                    parsed.disks.len(),
                    parsed.nics.len()
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let point = match &a.point {
        Some(p) => {
            let group = a.replica.open_read_only()?;
            Some(choose(&group.points(), p)?.seq)
        }
        None => None,
    };
    let (parsed, version) = crate::vm_boot::replicated_spec(&dir, point)?;
    if a.json {
        let out = SpecVersionJson {
            from_seq: version.from_seq.get(),
            vm: parsed.name.as_str(),
            cpus: parsed.cpus,
            memory: parsed.memory.to_string(),
            text: Some(&version.text),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        // A TOML comment: the output is the spec file as it came.
        let at = point.map_or("the current version".to_string(), |p| {
            format!("the version of recovery point {p}")
        });
        println!(
            "# the VM spec of {}/{} replicated from the protected site: {at}, from record {}",
            a.replica.host, a.replica.group, version.from_seq
        );
        print!("{}", version.text);
        if !version.text.ends_with('\n') {
            println!();
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render(a: RenderArgs) -> Result<ExitCode> {
    let spec = tidemark_config::load_vm_spec(&a.spec).map_err(|e| anyhow!("{e}"))?;
    let dirs = HostDirs {
        run_dir: a.run_dir,
        ..HostDirs::default()
    };
    let layout = GroupLayout::new(&dirs, &spec.name);
    let sources = DiskSource::tracker_exports(&spec, &layout.socket);
    if a.qemu {
        let args = qemu::args(&spec, &sources)?;
        print!("{}", qemu::command_line(&args));
    } else {
        print!("{}", libvirt::domain_xml(&spec, &sources)?);
    }
    Ok(ExitCode::SUCCESS)
}
