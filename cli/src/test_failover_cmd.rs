//! `tidemark test-failover`: a recovery point served over NBD on the
//! replica site, read-write, while replication goes on. The point, its
//! pin and the test's copy-on-write scratch files are the receiver crate's
//! ([`tidemark_receiver::test_failover`]), and so is serving it over NBD
//! ([`tidemark_receiver::test_failover::nbd`]); this module chooses the
//! point, with `--boot` starts the group's VM on the exports (isolated,
//! see [`crate::vm_boot`]), and ends the test on SIGTERM or Ctrl-C, the
//! VM first.
//! `tidemark test-failover cleanup` removes what a killed test left.
//! With `--span`, every member of a span is served at the same span point
//! (one socket per member, in `--socket-dir`), and cleanup cleans every
//! member.

use crate::points_cmd::{choose, kind, ReplicaArgs, StoreArgs, Target, TargetArgs};
use crate::timefmt;
use crate::vm_boot::{self, BootArgs, RunningVm, VmFiles};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tidemark_config::VmSpec;
use tidemark_names::Name;
use tidemark_receiver::pin::{PinLock, TEST_FAILOVER_DIR};
use tidemark_receiver::span_point::{self, PinnedSpanPoint, PointChoice};
use tidemark_receiver::store::{Disk, RecoveryPoint, StoreEngine};
use tidemark_receiver::test_failover::nbd::{ServeError, ServedTestFailover};
use tidemark_receiver::test_failover::TestFailover;
use tidemark_vm::boot::{self, Networks};
use tidemark_vm::DiskSource;

/// `tidemark test-failover`.
#[derive(Debug, Subcommand)]
pub(crate) enum TestFailoverCommand {
    /// Serve a recovery point's disks over NBD (read-write, writes to
    /// scratch) until SIGTERM or Ctrl-C, then remove every trace.
    Start(StartArgs),
    /// Remove what a test failover that was killed left behind.
    Cleanup(CleanupArgs),
}

/// `tidemark test-failover start`.
#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// The recovery point: `latest`, a sequence number, a time or a label
    /// (as for `tidemark failover`). With --span: `latest` or a span
    /// point's id.
    #[arg(long, default_value = "latest")]
    point: String,
    /// The NBD unix socket to create (0600); the exports are named after
    /// the disks.
    #[arg(long, required_unless_present = "socket_dir", conflicts_with = "span")]
    socket: Option<PathBuf>,
    /// With --span: the directory where each member's NBD socket is
    /// created, `HOST-GROUP.sock` (its exports named after the member's
    /// disks).
    #[arg(long, requires = "span")]
    socket_dir: Option<PathBuf>,
    /// Start the group's VM from the point's exports, on an isolated
    /// network (each NIC on a network of its own that reaches nothing),
    /// before saying ready; it is stopped when the test ends.
    #[command(flatten)]
    boot: BootArgs,
}

/// `tidemark test-failover cleanup`.
#[derive(Debug, Args)]
pub(crate) struct CleanupArgs {
    #[command(flatten)]
    target: TargetArgs,
}

pub(crate) fn run(cmd: TestFailoverCommand) -> Result<ExitCode> {
    match cmd {
        TestFailoverCommand::Start(a) => start(a),
        TestFailoverCommand::Cleanup(a) => cleanup(a),
    }
}

fn start(a: StartArgs) -> Result<ExitCode> {
    // Signals are handled by the wait below, in every thread.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("blocking SIGTERM and SIGINT")?;

    let replica = match a.target.target()? {
        Target::Group(replica) => replica,
        Target::Span { store, span } => return start_span(&a, &store, &span, &signals),
    };
    let Some(socket) = a.socket.clone() else {
        anyhow::bail!("give --socket");
    };
    let group_dir = replica.dir()?;
    let engine = replica.store.engine()?;
    let lock = PinLock::acquire(&group_dir)?
        .with_store_pin(engine.store_pin(&replica.host, &replica.group));
    let result = serve(
        &a,
        &replica,
        engine.as_ref(),
        &socket,
        &group_dir,
        lock,
        &signals,
    );
    let _ = std::fs::remove_file(&socket);
    result?;
    println!("test failover ended: its writes are discarded, nothing of it is left");
    Ok(ExitCode::SUCCESS)
}

/// Serves the test failover until a signal, then removes every trace of
/// it (also when it fails).
fn serve(
    a: &StartArgs,
    replica: &ReplicaArgs,
    engine: &dyn StoreEngine,
    socket: &Path,
    group_dir: &Path,
    lock: PinLock,
    signals: &SigSet,
) -> Result<()> {
    // The VM (if one boots) as it was defined at the point chosen.
    let chosen = replica
        .open_read_only_in(engine)
        .and_then(|group| Ok(choose(&group.points(), &a.point)?.clone()))
        .and_then(|p| Ok((a.boot.spec(group_dir, Some(p.seq))?, p)));
    let (spec, chosen) = match chosen {
        Ok(p) => p,
        Err(e) => {
            let _ = lock.remove_all();
            return Err(e);
        }
    };
    // On an error, start removes what it made.
    let test = TestFailover::start_on(
        || engine.open_read_only(&replica.host, &replica.group),
        lock,
        chosen.seq,
    )?;
    let served = ServedTestFailover::serve(test, chosen.seq, socket)?;
    let waited = serve_until_signal(
        a,
        replica,
        spec.as_ref(),
        group_dir,
        &served,
        &chosen,
        signals,
    );
    let ended = served.end();
    waited?;
    ended?;
    Ok(())
}

/// Says where the test is served, boots its VM if asked, and waits for a
/// signal; the VM is stopped before this returns.
fn serve_until_signal(
    a: &StartArgs,
    replica: &ReplicaArgs,
    spec: Option<&VmSpec>,
    group_dir: &Path,
    served: &ServedTestFailover,
    chosen: &RecoveryPoint,
    signals: &SigSet,
) -> Result<()> {
    let disks = served.disks();
    let socket = served.socket();
    println!(
        "test failover of {}/{} at the recovery point at sequence {} ({}, {}); replication goes on",
        replica.host,
        replica.group,
        chosen.seq,
        timefmt::utc(chosen.timestamp_ns),
        kind(chosen)
    );
    for d in disks {
        println!("  {}: {}", d.name, served.uri(d));
    }
    let vm = match spec {
        Some(spec) => Some(boot_vm(a, socket, spec, group_dir, disks)?),
        None => None,
    };
    println!("ready; SIGTERM or Ctrl-C ends the test and discards its writes");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    crate::notify_ready();
    let signal = signals.wait().context("waiting for a signal")?;
    tracing::info!(?signal, "ending the test failover");
    // The VM first: it is the exports' client.
    vm.map(RunningVm::stop).transpose().map(drop)
}

/// The test's VM files: in its scratch directory, gone with it (the
/// console where `--console` says).
fn test_vm_files(group_dir: &Path, console: Option<&Path>) -> VmFiles {
    let dir = group_dir.join(TEST_FAILOVER_DIR);
    VmFiles {
        console: console.map_or_else(|| dir.join("vm.console"), Path::to_owned),
        pidfile: dir.join("vm.pid"),
        agent: dir.join("vm.qga"),
    }
}

/// Starts the VM of `spec` on the test's exports, isolated, and waits
/// until it is up.
fn boot_vm(
    a: &StartArgs,
    socket: &Path,
    spec: &VmSpec,
    group_dir: &Path,
    disks: &[Disk],
) -> Result<RunningVm> {
    let names: Vec<String> = disks.iter().map(|d| d.name.to_string()).collect();
    let socket = std::path::absolute(socket)?;
    let sources = boot::replica_sources(spec, &names, |export| DiskSource::Nbd {
        socket: socket.clone(),
        export: export.to_owned(),
    })?;
    let files = test_vm_files(group_dir, a.boot.console.as_deref());
    // Beside a failed-over or production domain of the VM's name.
    let domain = format!("{}-test", spec.name);
    vm_boot::start(spec, &sources, Networks::Isolated, &a.boot, &files, &domain)
}

fn cleanup(a: CleanupArgs) -> Result<ExitCode> {
    match a.target.target()? {
        Target::Group(replica) => cleanup_group(&replica),
        Target::Span { store, span } => {
            // Every group the span's record names (its members now and
            // before).
            let data_dir = store.receiver()?.data_dir;
            let record = span_point::load_in(store.engine()?.as_ref(), &data_dir, &span)?;
            let mut members: Vec<(Name, Name)> = Vec::new();
            for m in record.points.iter().flat_map(|p| &p.members) {
                if !members.iter().any(|(h, g)| *h == m.host && *g == m.group) {
                    members.push((m.host.clone(), m.group.clone()));
                }
            }
            for (host, group) in members {
                let replica = ReplicaArgs {
                    store: store.clone(),
                    host,
                    group,
                };
                if replica.dir().is_ok() {
                    cleanup_group(&replica)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn cleanup_group(replica: &ReplicaArgs) -> Result<ExitCode> {
    let group_dir = replica.dir()?;
    let store_pin = replica
        .store
        .engine()?
        .store_pin(&replica.host, &replica.group);
    if !group_dir.join(TEST_FAILOVER_DIR).exists() {
        // A test failover killed on another receiver node leaves its pin
        // in the store and its files there.
        if let Some(pin) = store_pin {
            pin.set(None)?;
            println!(
                "no test failover of {}/{} on this node; its pin in the store is removed",
                replica.host, replica.group
            );
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "no test failover of {}/{} to clean up",
            replica.host, replica.group
        );
        return Ok(ExitCode::SUCCESS);
    }
    let lock = PinLock::acquire(&group_dir)?.with_store_pin(store_pin);
    if let Some(vm) = RunningVm::of_pidfile(&test_vm_files(&group_dir, None).pidfile) {
        vm.stop()?;
    }
    lock.remove_all()?;
    println!(
        "removed what a test failover of {}/{} left (its pin and scratch files)",
        replica.host, replica.group
    );
    Ok(ExitCode::SUCCESS)
}

/// A test failover of every member of `span` at the same span point: the
/// point is pinned in every member first (refused whole), then each
/// member's overlay is served on its own socket in `--socket-dir` until a
/// signal; every member's test is ended after, also when one fails.
fn start_span(a: &StartArgs, store: &StoreArgs, span: &Name, signals: &SigSet) -> Result<ExitCode> {
    let Some(socket_dir) = &a.socket_dir else {
        anyhow::bail!("with --span, give --socket-dir: one socket per member is made there");
    };
    if a.boot.requested() {
        anyhow::bail!("--boot starts one group's VM: test the span without it");
    }
    let choice: PointChoice = a.point.parse().map_err(anyhow::Error::msg)?;
    tidemark_changelog::create_private_dir_all(socket_dir)
        .with_context(|| format!("creating {}", socket_dir.display()))?;
    let data_dir = store.receiver()?.data_dir;
    let engine = store.engine()?;
    let pinned = PinnedSpanPoint::pin_in(engine.as_ref(), &data_dir, span, choice)
        .with_context(|| format!("span {span}: no test failover"))?;
    let point = pinned.entry.clone();
    let mut tests = Vec::new();
    let mut started = Ok(());
    for m in pinned.members {
        let (host, group, marker) = (m.host.clone(), m.group.clone(), m.marker);
        if started.is_err() {
            // Pinned, not started: the pin goes with its lock's directory.
            let _ = m.into_lock().remove_all();
            continue;
        }
        let socket = socket_dir.join(format!("{host}-{group}.sock"));
        let open = || engine.open_read_only(&host, &group);
        let served = TestFailover::start_on(open, m.into_lock(), marker)
            .map_err(ServeError::from)
            .and_then(|test| ServedTestFailover::serve(test, marker, &socket));
        match served {
            Ok(test) => tests.push((host, group, test)),
            Err(e) => {
                started = Err(anyhow::Error::new(e)
                    .context(format!("starting the test failover of {host}/{group}")))
            }
        }
    }
    let waited = started.and_then(|()| {
        println!(
            "test failover of span {span} at span point {} ({}); replication goes on",
            point.point,
            timefmt::utc(point.taken_ns)
        );
        for (host, group, test) in &tests {
            for d in test.disks() {
                println!("  {host}/{group} {}: {}", d.name, test.uri(d));
            }
        }
        println!("ready; SIGTERM or Ctrl-C ends the test and discards its writes");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        crate::notify_ready();
        let signal = signals.wait().context("waiting for a signal")?;
        tracing::info!(?signal, "ending the span's test failover");
        Ok(())
    });
    let mut ended = Ok(());
    for (host, group, test) in tests {
        if let Err(e) = test.end() {
            ended = Err(anyhow::Error::new(e).context(format!(
                "ending the test failover of {host}/{group} (`tidemark test-failover cleanup --span {span}` removes what is left)"
            )));
        }
    }
    waited?;
    ended?;
    println!("test failover ended: its writes are discarded, nothing of it is left");
    Ok(ExitCode::SUCCESS)
}
