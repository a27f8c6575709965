//! `--boot` of `tidemark failover` and `tidemark test-failover start`:
//! start the group's VM on the replica site and wait until it is up. The
//! decisions (disks, accelerator, networks, when the guest is up) are
//! [`tidemark_vm::boot`]'s; this module runs qemu in the background (or
//! has libvirt run it: `--libvirt`, through `virsh`), reads its console
//! file and asks its guest agent whether it is there.

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tidemark_changelog::Seq;
use tidemark_config::VmSpec;
use tidemark_receiver::vm_spec::{VmSpecVersion, VmSpecs, VM_SPEC_FILE};
use tidemark_vm::boot::{self, Accel, Launch, Networks, UpSign, UpWatch};
use tidemark_vm::qga::GuestAgent;
use tidemark_vm::DiskSource;

/// The qemu binary that starts VMs.
const QEMU: &str = "qemu-system-x86_64";

/// libvirt's command-line client.
const VIRSH: &str = "virsh";

/// The libvirt connection `--libvirt` uses without a URI.
const DEFAULT_LIBVIRT_URI: &str = "qemu:///system";

/// The options that start a VM at a failover or a test failover.
#[derive(Debug, Args)]
pub(crate) struct BootArgs {
    /// Start the group's VM once its disks are ready, and wait until it
    /// is up: alone, as the VM spec the protected site replicated, in the
    /// version current at the chosen point (`tidemark vm spec` shows it);
    /// with SPEC, as that `[vm]` file instead. The VM's disks are the
    /// replica's disks of the same names.
    #[arg(long, value_name = "SPEC", num_args = 0..=1)]
    pub(crate) boot: Option<Option<PathBuf>>,
    /// The VM is up when a line of its serial console contains this text.
    /// Default: when the spec names a guest agent (`guest-agent`), the
    /// agent answering (as --up-agent); else a line with `login:`.
    #[arg(
        long,
        value_name = "TEXT",
        requires = "boot",
        conflicts_with = "up_agent"
    )]
    pub(crate) up_line: Option<String>,
    /// The VM is up when its guest agent (`qemu-guest-agent` in the
    /// guest, on the channel every booted VM gets) answers; it is asked
    /// every second.
    #[arg(long, requires = "boot")]
    pub(crate) up_agent: bool,
    /// Most time from starting the VM to it being up; after it the VM is
    /// stopped and the command fails.
    #[arg(long, default_value = "5m", requires = "boot", value_parser = tidemark_config::parse_duration)]
    pub(crate) up_timeout: Duration,
    /// The file the VM's serial console is written to. Default: beside
    /// the disks (a failover) or in the test's scratch directory,
    /// removed with it (a test failover).
    #[arg(long, requires = "boot")]
    pub(crate) console: Option<PathBuf>,
    /// How the guest's CPU runs: `kvm`, `tcg` (qemu's emulator), or `auto`
    /// (KVM where /dev/kvm opens; a host whose KVM is broken, as nested
    /// virtualisation can be, needs `tcg`).
    #[arg(long, value_enum, default_value = "auto", requires = "boot")]
    pub(crate) accel: AccelChoice,
    /// Have libvirt start the VM (`virsh -c URI define` and `start`; URI
    /// by default qemu:///system) instead of running qemu: the domain is
    /// the spec's rendering with this site's disks, networks, console and
    /// agent channel, named after the VM (a test failover's with
    /// `-test`); a domain of that name must not exist. Stopping it
    /// destroys and undefines it; a failover's runs on, defined.
    #[arg(long, value_name = "URI", num_args = 0..=1, requires = "boot")]
    pub(crate) libvirt: Option<Option<String>>,
}

/// `--accel`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum AccelChoice {
    /// KVM where /dev/kvm opens, else TCG.
    Auto,
    /// KVM.
    Kvm,
    /// TCG.
    Tcg,
}

impl BootArgs {
    /// No VM to start (a failover that only writes the disks).
    pub(crate) fn none() -> BootArgs {
        BootArgs {
            boot: None,
            up_line: None,
            up_agent: false,
            up_timeout: Duration::ZERO,
            console: None,
            accel: AccelChoice::Auto,
            libvirt: None,
        }
    }

    /// What says that the VM of `spec` is up.
    pub(crate) fn up_sign(&self, spec: &VmSpec) -> UpSign {
        match (&self.up_line, self.up_agent) {
            (Some(line), _) => UpSign::Line(line.clone()),
            (None, true) => UpSign::Agent,
            (None, false) => UpSign::default_for(spec),
        }
    }

    /// Whether a VM is to be started (with or without a spec file).
    pub(crate) fn requested(&self) -> bool {
        self.boot.is_some()
    }

    /// The spec to boot, read and validated, if `--boot` was given: its
    /// file, or the version the replica in `group_dir` holds for the
    /// recovery point `point` (`None`: the current version).
    pub(crate) fn spec(&self, group_dir: &Path, point: Option<Seq>) -> Result<Option<VmSpec>> {
        match &self.boot {
            None => Ok(None),
            Some(Some(path)) => tidemark_config::load_vm_spec(path)
                .map(Some)
                .map_err(|e| anyhow!("{e}")),
            Some(None) => replicated_spec(group_dir, point).map(|(spec, _)| Some(spec)),
        }
    }
}

/// The replicated VM spec of the group in `group_dir` for the recovery
/// point `point` (`None`: the current version), parsed, with its version.
pub(crate) fn replicated_spec(
    group_dir: &Path,
    point: Option<Seq>,
) -> Result<(VmSpec, VmSpecVersion)> {
    let specs = VmSpecs::load(group_dir)?;
    let version = match point {
        Some(seq) => specs.at(seq),
        None => specs.current(),
    };
    let Some(version) = version.cloned() else {
        bail!(
            "the replica {} holds no VM spec: name the spec in the protected site's shipper \
             configuration (`vm-spec`, which `tidemark vm protect` writes) and let it connect, \
             or give the spec's file to --boot",
            group_dir.display()
        );
    };
    let origin = group_dir.join(VM_SPEC_FILE);
    let spec =
        tidemark_config::parse_vm_spec(&version.text, &origin).map_err(|e| anyhow!("{e}"))?;
    Ok((spec, version))
}

/// A VM started in the background by qemu, or by libvirt.
#[derive(Debug)]
pub(crate) struct RunningVm {
    name: String,
    runner: Runner,
}

/// Who runs a VM.
#[derive(Debug)]
enum Runner {
    /// qemu, this process id.
    Qemu(Pid),
    /// libvirt: the domain `domain` on the connection `uri`.
    Libvirt { uri: String, domain: String },
}

impl std::fmt::Display for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Runner::Qemu(pid) => write!(f, "pid {pid}"),
            Runner::Libvirt { uri, domain } => write!(f, "libvirt domain {domain} on {uri}"),
        }
    }
}

/// Runs `virsh -c URI ARGS`; its output, or its error.
fn virsh(uri: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(VIRSH)
        .arg("-c")
        .arg(uri)
        .args(args)
        .output()
        .with_context(|| format!("running {VIRSH} (is libvirt's client installed?)"))?;
    if !out.status.success() {
        bail!(
            "{VIRSH} -c {uri} {} failed ({}): {}",
            args.first().copied().unwrap_or_default(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether KVM can be used: `/dev/kvm` opens read-write.
fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// Where a started VM's files go.
pub(crate) struct VmFiles {
    /// Its serial console.
    pub(crate) console: PathBuf,
    /// qemu's process id, for whoever stops the VM. With libvirt, the
    /// same name with `.libvirt` records the connection and the domain,
    /// and with `.xml` holds the domain's definition.
    pub(crate) pidfile: PathBuf,
    /// The unix socket of its guest agent's channel.
    pub(crate) agent: PathBuf,
}

impl VmFiles {
    /// The files of a VM whose console is `console`: the others beside
    /// it, named after it.
    pub(crate) fn beside(console: PathBuf) -> VmFiles {
        VmFiles {
            pidfile: console.with_extension("pid"),
            agent: console.with_extension("qga"),
            console,
        }
    }
}

/// Starts `spec` from `sources`, waits until it is up and prints the
/// time it took (the recovery time). A VM that is not up in time is
/// stopped. `domain` names it under libvirt.
pub(crate) fn start(
    spec: &VmSpec,
    sources: &[DiskSource],
    networks: Networks<'_>,
    a: &BootArgs,
    files: &VmFiles,
    domain: &str,
) -> Result<RunningVm> {
    // qemu runs from / once in the background: it is given absolute paths.
    let console = std::path::absolute(&files.console)?;
    let pidfile = std::path::absolute(&files.pidfile)?;
    let agent = std::path::absolute(&files.agent)?;
    let console = console.as_path();
    let accel = match a.accel {
        AccelChoice::Auto => Accel::for_host(kvm_usable()),
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
    };
    let launch = Launch {
        accel,
        networks,
        console,
        agent: &agent,
        pidfile: &pidfile,
    };
    let _ = std::fs::remove_file(console);
    let _ = std::fs::remove_file(pidfile.as_path());
    let _ = std::fs::remove_file(&agent);
    let sign = a.up_sign(spec);
    let started = Instant::now();
    println!(
        "starting the VM {} ({accel:?}); waiting up to {} for {sign} (console: {}, agent: {})",
        spec.name,
        humantime::format_duration(a.up_timeout),
        console.display(),
        agent.display()
    );
    let vm = match &a.libvirt {
        None => start_qemu(spec, sources, &launch)?,
        Some(uri) => {
            let uri = uri.as_deref().unwrap_or(DEFAULT_LIBVIRT_URI);
            start_libvirt(spec, sources, &launch, uri, domain)?
        }
    };
    match wait_up(
        &vm,
        console,
        &agent,
        UpWatch::new(sign, started, a.up_timeout),
    ) {
        Ok((after, sign)) => {
            let by = match sign {
                UpSign::Agent => "its guest agent answered",
                UpSign::Line(_) => "its console line appeared",
            };
            println!(
                "the VM {} is up {:.1} s after it was started ({by}; {})",
                vm.name,
                after.as_secs_f64(),
                vm.runner
            );
            Ok(vm)
        }
        Err(e) => {
            let _ = vm.stop();
            Err(e)
        }
    }
}

/// Runs qemu in the background.
fn start_qemu(spec: &VmSpec, sources: &[DiskSource], launch: &Launch<'_>) -> Result<RunningVm> {
    let args = boot::args(spec, sources, launch)?;
    // With -daemonize, qemu returns once the VM runs, or fails before.
    let out = Command::new(QEMU)
        .args(&args)
        .output()
        .with_context(|| format!("running {QEMU}"))?;
    if !out.status.success() {
        bail!(
            "{QEMU} could not start the VM {} ({}): {}",
            spec.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let pidfile = launch.pidfile;
    let pid = std::fs::read_to_string(pidfile)
        .with_context(|| format!("reading qemu's pid file {}", pidfile.display()))?;
    Ok(RunningVm {
        name: spec.name.to_string(),
        runner: Runner::Qemu(Pid::from_raw(pid.trim().parse().with_context(|| {
            format!("qemu's pid file {} holds {pid:?}", pidfile.display())
        })?)),
    })
}

/// Has libvirt at `uri` define and start the VM as the domain `domain`;
/// the connection and the domain are recorded beside the pid file (for
/// `test-failover cleanup`).
fn start_libvirt(
    spec: &VmSpec,
    sources: &[DiskSource],
    launch: &Launch<'_>,
    uri: &str,
    domain: &str,
) -> Result<RunningVm> {
    let named = VmSpec {
        name: tidemark_names::Name::new(domain)
            .map_err(|e| anyhow!("the libvirt domain name {domain:?}: {e}"))?,
        ..spec.clone()
    };
    let xml = boot::domain_xml(&named, sources, launch)?;
    if virsh(uri, &["domstate", domain]).is_ok() {
        bail!(
            "libvirt at {uri} has a domain {domain} already: undefine it (virsh -c {uri} \
             undefine {domain}, after destroy if it runs) or boot without --libvirt"
        );
    }
    let definition = launch.pidfile.with_extension("xml");
    std::fs::write(&definition, &xml)
        .with_context(|| format!("writing the domain's definition {}", definition.display()))?;
    let _ = std::fs::remove_file(launch.console);
    virsh(uri, &["define", utf8_path(&definition)?])?;
    let record = launch.pidfile.with_extension("libvirt");
    let vm = RunningVm {
        name: spec.name.to_string(),
        runner: Runner::Libvirt {
            uri: uri.to_owned(),
            domain: domain.to_owned(),
        },
    };
    let started = std::fs::write(&record, format!("{uri}\n{domain}\n"))
        .with_context(|| format!("writing {}", record.display()))
        .and_then(|()| virsh(uri, &["start", domain]));
    if let Err(e) = started {
        let _ = vm.stop();
        return Err(e.context(format!("starting the VM {} under libvirt", spec.name)));
    }
    Ok(vm)
}

fn utf8_path(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))
}

/// Whether the guest agent of `vm` answers, its agent's socket being
/// `agent` (a libvirt domain's agent is libvirt's to talk to).
fn agent_answers(vm: &RunningVm, agent: &Path, wait: Duration) -> Result<()> {
    match &vm.runner {
        Runner::Qemu(_) => {
            GuestAgent::connect(agent, wait)?;
            Ok(())
        }
        Runner::Libvirt { uri, domain } => {
            let secs = wait.as_secs().max(1).to_string();
            virsh(
                uri,
                &[
                    "qemu-agent-command",
                    domain,
                    "--timeout",
                    &secs,
                    r#"{"execute":"guest-ping"}"#,
                ],
            )
            .map(drop)
        }
    }
}

/// Reads the console as it grows and asks the guest agent at `agent`
/// when `watch` says, until the VM is up, ends or the time is up.
fn wait_up(
    vm: &RunningVm,
    console: &Path,
    agent: &Path,
    mut watch: UpWatch,
) -> Result<(Duration, UpSign)> {
    let mut file = None;
    let mut buf = vec![0u8; 64 << 10];
    let mut next_run_check = Instant::now();
    loop {
        let now = Instant::now();
        if file.is_none() {
            file = std::fs::File::open(console).ok();
        }
        if let Some(f) = file.as_mut() {
            loop {
                let n = f
                    .read(&mut buf)
                    .with_context(|| format!("reading the console {}", console.display()))?;
                if n == 0 {
                    break;
                }
                watch.handle_output(&buf[..n], now);
            }
        }
        if watch.poll_agent_try(now) {
            // One synchronisation, never past the deadline: the agent
            // answers at once when it runs.
            let wait =
                boot::AGENT_PING_INTERVAL.min(watch.deadline().saturating_duration_since(now));
            match agent_answers(vm, agent, wait) {
                Ok(()) => {
                    watch.handle_agent_answer(Instant::now());
                }
                Err(e) => watch.handle_agent_silence(format!("{e:#}")),
            }
        }
        if let Some(after) = watch.poll(Instant::now())? {
            return Ok((after, watch.sign().clone()));
        }
        if now >= next_run_check {
            if !vm.runs() {
                bail!(
                    "the VM {} ended before it was up; its console is {}",
                    vm.name,
                    console.display()
                );
            }
            // Asking libvirt is a process each time.
            next_run_check = now
                + match vm.runner {
                    Runner::Qemu(_) => Duration::from_millis(100),
                    Runner::Libvirt { .. } => Duration::from_secs(1),
                };
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl RunningVm {
    /// Whether the VM still runs: its qemu process is there (and not a
    /// zombie waiting for a parent that does not reap), or libvirt knows
    /// its domain as running.
    fn runs(&self) -> bool {
        match &self.runner {
            Runner::Qemu(pid) => match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                // The state follows the parenthesised command name.
                Ok(stat) => stat
                    .rsplit_once(')')
                    .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
                Err(_) => false,
            },
            Runner::Libvirt { uri, domain } => virsh(uri, &["domstate", domain])
                .is_ok_and(|state| !matches!(state.trim(), "shut off" | "crashed")),
        }
    }

    /// The VM whose qemu wrote `pidfile`, if that process still runs, or
    /// the libvirt domain recorded beside it, if libvirt still has it (a
    /// test failover that was killed left it).
    pub(crate) fn of_pidfile(pidfile: &Path) -> Option<RunningVm> {
        if let Ok(record) = std::fs::read_to_string(pidfile.with_extension("libvirt")) {
            let mut lines = record.lines();
            let (uri, domain) = (lines.next()?, lines.next()?);
            virsh(uri, &["domstate", domain]).ok()?;
            return Some(RunningVm {
                name: domain.to_owned(),
                runner: Runner::Libvirt {
                    uri: uri.to_owned(),
                    domain: domain.to_owned(),
                },
            });
        }
        let text = std::fs::read_to_string(pidfile).ok()?;
        let pid = Pid::from_raw(text.trim().parse().ok()?);
        let vm = RunningVm {
            name: format!("of {}", pidfile.display()),
            runner: Runner::Qemu(pid),
        };
        // Only a qemu: the number may have been reused since.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (vm.runs() && comm.trim_end().starts_with("qemu")).then_some(vm)
    }

    /// Stops the VM. qemu: SIGTERM (qemu stops the guest at once, as a
    /// power cut), SIGKILL if it is still there after 10 s. libvirt: the
    /// domain destroyed (the same cut) and undefined.
    pub(crate) fn stop(self) -> Result<()> {
        match &self.runner {
            Runner::Qemu(pid) => {
                kill(*pid, Signal::SIGTERM)
                    .with_context(|| format!("stopping the VM {} (pid {pid})", self.name))?;
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut killed = false;
                while self.runs() {
                    if !killed && Instant::now() > deadline {
                        let _ = kill(*pid, Signal::SIGKILL);
                        killed = true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            Runner::Libvirt { uri, domain } => {
                // Not running (it never started, or it ended) is fine.
                if self.runs() {
                    virsh(uri, &["destroy", domain])?;
                }
                virsh(uri, &["undefine", domain])?;
            }
        }
        println!("stopped the VM {} ({})", self.name, self.runner);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        boot: BootArgs,
    }

    fn spec(agent: bool) -> VmSpec {
        let agent = if agent {
            "guest-agent = \"/run/tidemark/web1.qga\"\n"
        } else {
            ""
        };
        let text = format!(
            "[vm]\nname = \"web1\"\ncpus = 1\nmemory = \"256MiB\"\n{agent}\n\
             [[vm.disk]]\nname = \"root\"\npath = \"/var/lib/images/web1.img\"\nformat = \"raw\"\n"
        );
        tidemark_config::parse_vm_spec(&text, Path::new("web1.toml")).unwrap()
    }

    fn sign(args: &[&str], agent: bool) -> UpSign {
        let cli = Cli::try_parse_from(["boot"].iter().chain(args)).unwrap();
        cli.boot.up_sign(&spec(agent))
    }

    #[test]
    fn the_up_sign_is_the_agent_by_default_when_the_spec_names_one() {
        assert_eq!(sign(&["--boot"], true), UpSign::Agent);
        assert_eq!(sign(&["--boot"], false), UpSign::Line("login:".into()));
        assert_eq!(sign(&["--boot", "--up-agent"], false), UpSign::Agent);
        assert_eq!(
            sign(&["--boot", "--up-line", "ready"], true),
            UpSign::Line("ready".into())
        );
        let err = Cli::try_parse_from(["boot", "--boot", "--up-agent", "--up-line", "x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot be used with"), "{err}");
        let cli = Cli::try_parse_from(["boot", "--boot", "--libvirt"]).unwrap();
        assert_eq!(cli.boot.libvirt, Some(None));
    }
}
