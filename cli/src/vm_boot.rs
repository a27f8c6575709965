//! `--boot` of `tidemark failover` and `tidemark test-failover start`:
//! start the group's VM on the replica site and wait until it is up. The
//! decisions (disks, accelerator, networks, when the guest is up) are
//! [`tidemark_vm::boot`]'s; this module runs qemu in the background and
//! reads its console file.

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
use tidemark_vm::boot::{self, Accel, Launch, Networks, UpWatch};
use tidemark_vm::DiskSource;

/// The qemu binary that starts VMs.
const QEMU: &str = "qemu-system-x86_64";

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
    #[arg(long, default_value = "login:", requires = "boot")]
    pub(crate) up_line: String,
    /// Most time from starting the VM to its up line; after it the VM is
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
            up_line: String::new(),
            up_timeout: Duration::ZERO,
            console: None,
            accel: AccelChoice::Auto,
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

/// A VM started in the background by qemu.
#[derive(Debug)]
pub(crate) struct RunningVm {
    name: String,
    pid: Pid,
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
    /// qemu's process id, for whoever stops the VM.
    pub(crate) pidfile: PathBuf,
}

/// Starts `spec` from `sources`, waits until it is up and prints the
/// time it took (the recovery time). A VM that is not up in time is
/// stopped.
pub(crate) fn start(
    spec: &VmSpec,
    sources: &[DiskSource],
    networks: Networks<'_>,
    a: &BootArgs,
    files: &VmFiles,
) -> Result<RunningVm> {
    // qemu runs from / once in the background: it is given absolute paths.
    let console = std::path::absolute(&files.console)?;
    let pidfile = std::path::absolute(&files.pidfile)?;
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
        pidfile: &pidfile,
    };
    let args = boot::args(spec, sources, &launch)?;
    let _ = std::fs::remove_file(console);
    let _ = std::fs::remove_file(pidfile.as_path());
    let started = Instant::now();
    println!(
        "starting the VM {} ({accel:?}); waiting up to {} for a console line with {:?} (console: {})",
        spec.name,
        humantime::format_duration(a.up_timeout),
        a.up_line,
        console.display()
    );
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
    let pid = std::fs::read_to_string(pidfile.as_path())
        .with_context(|| format!("reading qemu's pid file {}", pidfile.display()))?;
    let vm = RunningVm {
        name: spec.name.to_string(),
        pid: Pid::from_raw(
            pid.trim()
                .parse()
                .with_context(|| format!("qemu's pid file {} holds {pid:?}", pidfile.display()))?,
        ),
    };
    match wait_up(
        &vm,
        console,
        UpWatch::new(&a.up_line, started, a.up_timeout),
    ) {
        Ok(after) => {
            println!(
                "the VM {} is up {:.1} s after it was started (pid {})",
                vm.name,
                after.as_secs_f64(),
                vm.pid
            );
            Ok(vm)
        }
        Err(e) => {
            let _ = vm.stop();
            Err(e)
        }
    }
}

/// Reads the console as it grows until `watch` sees the up line, the VM
/// ends or the time is up.
fn wait_up(vm: &RunningVm, console: &Path, mut watch: UpWatch) -> Result<Duration> {
    let mut file = None;
    let mut buf = vec![0u8; 64 << 10];
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
        if let Some(after) = watch.poll(now)? {
            return Ok(after);
        }
        if !vm.runs() {
            bail!(
                "the VM {} ended before it was up; its console is {}",
                vm.name,
                console.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl RunningVm {
    /// Whether the qemu process is still there (and not a zombie waiting
    /// for a parent that does not reap).
    fn runs(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    /// The VM whose qemu wrote `pidfile`, if that process still runs
    /// (a test failover that was killed left it).
    pub(crate) fn of_pidfile(pidfile: &Path) -> Option<RunningVm> {
        let text = std::fs::read_to_string(pidfile).ok()?;
        let vm = RunningVm {
            name: format!("of {}", pidfile.display()),
            pid: Pid::from_raw(text.trim().parse().ok()?),
        };
        // Only a qemu: the number may have been reused since.
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", vm.pid)).ok()?;
        (vm.runs() && comm.trim_end().starts_with("qemu")).then_some(vm)
    }

    /// Stops the VM: SIGTERM (qemu stops the guest at once, as a power
    /// cut), SIGKILL if it is still there after 10 s.
    pub(crate) fn stop(self) -> Result<()> {
        kill(self.pid, Signal::SIGTERM)
            .with_context(|| format!("stopping the VM {} (pid {})", self.name, self.pid))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut killed = false;
        while self.runs() {
            if !killed && Instant::now() > deadline {
                let _ = kill(self.pid, Signal::SIGKILL);
                killed = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("stopped the VM {}", self.name);
        Ok(())
    }
}
