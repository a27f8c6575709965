//! `tidemark plan run`: a recovery plan (a TOML file, see
//! `tidemark_config::plan`) carried out step by step on the replica site.
//!
//! Each step runs its pre-hooks, then for each of its groups in order the
//! same command an admin would type — `tidemark failover --planned`,
//! `tidemark failover --point`, or `tidemark test-failover start` — then
//! its post-hooks, then its pause. A step that names a span runs one
//! command for all its members instead — `tidemark failover --span` or
//! `tidemark test-failover start --span` at the plan's point (a span
//! point). The first failure stops the plan; what
//! was done and what was not is printed. A test keeps every group's point
//! served until the plan ends, then removes every trace. `--dry-run`
//! prints the steps, the commands and each replica's state, and runs
//! nothing.
//!
//! Hooks run as `sh -c COMMAND` with stdin closed, under the plan's
//! `hook-timeout`, with these variables:
//!
//! ```text
//! TIDEMARK_PLAN        the plan file
//! TIDEMARK_PLAN_MODE   test | planned | unplanned
//! TIDEMARK_STEP        the step's name
//! TIDEMARK_GROUPS      the step's groups (a span step: the span point's
//!                      members), "host/group" separated by spaces
//! TIDEMARK_FAILOVER_DIR  <to>: the images are in <to>/<host>/<group>/
//! TIDEMARK_TEST_SOCKETS  (test) "host/group=SOCKET" separated by spaces,
//!                        every group served so far; exports are disk names
//! ```

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args, Subcommand};
use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};
use tidemark_config::{GroupRef, PlanConfig, PlanStep};
use tidemark_names::Name;
use tidemark_receiver::span_point::{self, PointChoice};
use tidemark_receiver::store::{GroupState, LocalEngine, StoreEngine, StoreError};

/// Most time a test failover takes to serve its point (a VM it starts has
/// its step's `up-timeout` on top).
const SERVE_TIMEOUT: Duration = Duration::from_secs(120);

/// `tidemark plan ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum PlanCommand {
    /// Carry out a recovery plan: its steps in order, each with its hooks,
    /// failovers and pause.
    Run(RunArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("mode").required(true).args(["test", "planned", "unplanned"])))]
pub(crate) struct RunArgs {
    /// The plan file (`[plan]` with `[[plan.step]]` tables).
    plan: PathBuf,
    /// A test: serve each group's point over NBD (writes discarded) while
    /// replication goes on; everything is removed when the plan ends.
    #[arg(long)]
    test: bool,
    /// A planned failover: each host is drained first (its tracker
    /// stopped, every record delivered), so nothing is lost.
    #[arg(long)]
    planned: bool,
    /// An unplanned failover: each group as of the plan's point (the
    /// receiver must be stopped).
    #[arg(long)]
    unplanned: bool,
    /// Print the steps and the commands, check the replicas, run nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Test,
    Planned,
    Unplanned,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Test => "test",
            Mode::Planned => "planned",
            Mode::Unplanned => "unplanned",
        }
    }
}

pub(crate) fn run(cmd: PlanCommand) -> Result<ExitCode> {
    match cmd {
        PlanCommand::Run(a) => run_plan(&a),
    }
}

/// The `tidemark` subcommand that takes over in `mode`.
fn takeover_verb(mode: Mode) -> &'static [&'static str] {
    match mode {
        Mode::Test => &["test-failover", "start"],
        Mode::Planned | Mode::Unplanned => &["failover"],
    }
}

/// The `tidemark` arguments that take over one group of `step` in `mode`
/// (and start its VM if the step says so).
fn group_command(plan: &PlanConfig, step: &PlanStep, mode: Mode, g: &GroupRef) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    let mut push = |s: &dyn AsRef<std::ffi::OsStr>| argv.push(s.as_ref().to_owned());
    for word in takeover_verb(mode) {
        push(word);
    }
    match &plan.receiver_config {
        Some(config) => {
            push(&"--config");
            push(config);
        }
        None => {
            push(&"--data-dir");
            push(&plan.data_dir);
        }
    }
    push(&"--host");
    push(&g.host);
    push(&"--group");
    push(&g.group);
    match mode {
        Mode::Test => {
            push(&"--point");
            push(&plan.point);
            push(&"--socket");
            push(&test_socket(plan, g));
        }
        Mode::Planned => {
            push(&"--planned");
            push(&"--timeout");
            push(&plan.drain_timeout.to_string());
            push(&"--to");
            push(&plan.to.join(&g.host).join(&g.group));
        }
        Mode::Unplanned => {
            push(&"--point");
            push(&plan.point);
            push(&"--to");
            push(&plan.to.join(&g.host).join(&g.group));
        }
    }
    if let Some(vm) = &step.start_vm {
        // Without a directory of specs, the replicated spec (`--boot`
        // alone).
        push(&"--boot");
        if let Some(specs) = &vm.specs {
            push(&specs.join(format!("{}.toml", g.group)));
        }
        if let Some(line) = &vm.up_line {
            push(&"--up-line");
            push(line);
        }
        if vm.up_agent {
            push(&"--up-agent");
        }
        push(&"--up-timeout");
        push(&vm.up_timeout.to_string());
        if mode != Mode::Test {
            for (name, bridge) in &plan.networks {
                push(&"--network");
                push(&format!("{name}={bridge}"));
            }
        }
    }
    argv
}

/// The `tidemark` arguments that take over every member of `span` in
/// `mode` (unplanned or test) at the plan's point.
fn span_command(plan: &PlanConfig, mode: Mode, span: &Name) -> Vec<OsString> {
    let mut argv: Vec<OsString> = Vec::new();
    let mut push = |s: &dyn AsRef<std::ffi::OsStr>| argv.push(s.as_ref().to_owned());
    for word in takeover_verb(mode) {
        push(word);
    }
    push(&"--data-dir");
    push(&plan.data_dir);
    push(&"--span");
    push(&span);
    push(&"--point");
    push(&plan.point);
    match mode {
        Mode::Test => {
            push(&"--socket-dir");
            push(&plan.test_socket_dir);
        }
        Mode::Planned | Mode::Unplanned => {
            push(&"--to");
            push(&plan.to);
        }
    }
    argv
}

/// The members of the span point the plan's point names in `span`, and
/// one line about it; or why it cannot be had (not durable, expired, a
/// member without replica).
fn span_point_state(plan: &PlanConfig, span: &Name) -> Result<(Vec<GroupRef>, String)> {
    let record = span_point::load(&plan.data_dir, span)?;
    let choice: PointChoice = plan.point.parse().map_err(anyhow::Error::msg)?;
    let entry = span_point::choose(span, &record, choice)?;
    span_point::check(&plan.data_dir, span, entry)?;
    let members = entry
        .members
        .iter()
        .map(|m| GroupRef {
            host: m.host.clone(),
            group: m.group.clone(),
        })
        .collect();
    let line = format!(
        "span point {} ({}): {}",
        entry.point,
        crate::timefmt::utc(entry.taken_ns),
        entry
            .members
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok((members, line))
}

fn test_socket(plan: &PlanConfig, g: &GroupRef) -> PathBuf {
    plan.test_socket_dir
        .join(format!("{}-{}.sock", g.host, g.group))
}

fn shell_words(argv: &[OsString]) -> String {
    std::iter::once("tidemark".to_string())
        .chain(argv.iter().map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || "'\"$\\".contains(c)) {
                format!("'{}'", s.replace('\'', "'\\''"))
            } else {
                s.into_owned()
            }
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a group of a plan has no replica to take over.
#[derive(Debug, thiserror::Error)]
enum NoReplica {
    /// No store of the group exists.
    #[error("no replica under {0}")]
    Missing(String),
    /// The store is there but cannot be read.
    #[error("unreadable")]
    Unreadable(#[source] StoreError),
    /// The receiver's configuration names a store that cannot be opened.
    #[error("{0}")]
    Store(String),
}

/// One line on a group's replica, or why there is none to take over.
fn replica_state(plan: &PlanConfig, g: &GroupRef) -> Result<String, NoReplica> {
    let engine: Box<dyn StoreEngine> = match &plan.receiver_config {
        Some(config) => crate::points_cmd::StoreArgs::of_config(config)
            .engine()
            .map_err(|e| NoReplica::Store(format!("{e:#}")))?,
        None => Box::new(LocalEngine::new(&plan.data_dir)),
    };
    if !engine.exists(&g.host, &g.group) {
        return Err(NoReplica::Missing(engine.describe(&g.host, &g.group)));
    }
    let group = engine
        .open_read_only(&g.host, &g.group)
        .map_err(NoReplica::Unreadable)?;
    let state = match group.position().state {
        GroupState::InitialSync => "initial sync (no recovery point yet)".to_string(),
        GroupState::Consistent => "consistent".to_string(),
        GroupState::Resyncing { pending } => format!("resyncing {} extents", pending.len()),
    };
    let points = group.points();
    Ok(match points.last() {
        Some(p) => format!(
            "{state}; {} points, newest at sequence {} ({})",
            points.len(),
            p.seq,
            crate::timefmt::utc(p.timestamp_ns)
        ),
        None => format!("{state}; no recovery point"),
    })
}

fn run_plan(a: &RunArgs) -> Result<ExitCode> {
    let plan = tidemark_config::load_plan(&a.plan).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mode = match (a.test, a.planned) {
        (true, _) => Mode::Test,
        (_, true) => Mode::Planned,
        _ => Mode::Unplanned,
    };
    if mode == Mode::Planned {
        if let Some(step) = plan.steps.iter().find(|s| s.span.is_some()) {
            bail!(
                "step {:?} names a span: its members fail over to one span point, which a planned failover (each host drained) does not take; run the plan with --unplanned or --test",
                step.name
            );
        }
    }
    let groups: usize = plan.steps.iter().map(|s| s.groups.len()).sum();
    println!(
        "plan {} ({} failover{}): {} steps, {groups} groups{}",
        a.plan.display(),
        mode.name(),
        if a.dry_run { ", dry run" } else { "" },
        plan.steps.len(),
        if plan.description.is_empty() {
            String::new()
        } else {
            format!(" — {}", plan.description)
        }
    );
    // Every replica must be there before anything is done.
    let mut missing = Vec::new();
    let mut states = Vec::new();
    for g in plan.steps.iter().flat_map(|s| &s.groups) {
        match replica_state(&plan, g) {
            Ok(line) => states.push((g.clone(), line)),
            Err(why) => missing.push(format!("{g}: {:#}", anyhow::Error::from(why))),
        }
    }
    // And every span step's point, whole.
    let mut span_states = Vec::new();
    for span in plan.steps.iter().filter_map(|s| s.span.as_ref()) {
        match span_point_state(&plan, span) {
            Ok((_, line)) => span_states.push((span.clone(), line)),
            Err(why) => missing.push(format!("span {span}: {why:#}")),
        }
    }
    if a.dry_run {
        print_dry_run(&plan, mode, &states, &span_states);
        if !missing.is_empty() {
            bail!("the plan cannot run: {}", missing.join("; "));
        }
        println!("dry run: nothing was run");
        return Ok(ExitCode::SUCCESS);
    }
    if !missing.is_empty() {
        bail!("nothing was run: {}", missing.join("; "));
    }
    let mut runner = Runner {
        plan_path: a.plan.clone(),
        plan: &plan,
        mode,
        tests: Vec::new(),
    };
    let outcome = runner.steps();
    let ended = runner.end_tests(outcome.is_ok());
    match outcome {
        Ok(()) => {
            ended?;
            println!("plan complete: {} steps, {groups} groups", plan.steps.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if let Err(cleanup) = ended {
                eprintln!("tidemark: error: {cleanup:#}");
            }
            Err(e)
        }
    }
}

fn print_dry_run(
    plan: &PlanConfig,
    mode: Mode,
    states: &[(GroupRef, String)],
    span_states: &[(Name, String)],
) {
    for (i, step) in plan.steps.iter().enumerate() {
        println!("step {}/{}: {}", i + 1, plan.steps.len(), step.name);
        for h in &step.pre {
            println!("  pre-hook: {h}");
        }
        if let Some(span) = &step.span {
            println!(
                "  span {span}: {}",
                shell_words(&span_command(plan, mode, span))
            );
            match span_states.iter().find(|(s, _)| s == span) {
                Some((_, line)) => println!("    {line}"),
                None => println!("    span point: MISSING"),
            }
        }
        for g in &step.groups {
            println!(
                "  {g}: {}",
                shell_words(&group_command(plan, step, mode, g))
            );
            match states.iter().find(|(s, _)| s == g) {
                Some((_, line)) => println!("    replica: {line}"),
                None => println!("    replica: MISSING"),
            }
        }
        for h in &step.post {
            println!("  post-hook: {h}");
        }
        if let Some(p) = &step.pause {
            println!("  pause: {p}");
        }
    }
    if mode == Mode::Test {
        println!("end: every test failover is stopped and its traces removed");
    }
}

/// A test failover the plan started.
struct ServedTest {
    /// What it serves: a group, or `span NAME`.
    what: String,
    /// Each group served and its socket.
    sockets: Vec<(GroupRef, PathBuf)>,
    child: Child,
}

struct Runner<'a> {
    plan_path: PathBuf,
    plan: &'a PlanConfig,
    mode: Mode,
    tests: Vec<ServedTest>,
}

impl Runner<'_> {
    fn steps(&mut self) -> Result<()> {
        let total = self.plan.steps.len();
        for (i, step) in self.plan.steps.iter().enumerate() {
            let started = Instant::now();
            println!("step {}/{total}: {}", i + 1, step.name);
            self.step(step).with_context(|| {
                format!(
                    "the plan stopped in step {}/{total} ({}); {}",
                    i + 1,
                    step.name,
                    match i {
                        0 => "no step was completed".to_string(),
                        _ => format!(
                            "steps done: {}",
                            self.plan.steps[..i]
                                .iter()
                                .map(|s| s.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }
                )
            })?;
            println!(
                "step {}/{total} done: {} ({:.1}s)",
                i + 1,
                step.name,
                started.elapsed().as_secs_f64()
            );
            if let Some(text) = &step.pause {
                pause(text)?;
            }
        }
        if self.mode == Mode::Test && !self.tests.is_empty() {
            println!(
                "test failover of {} groups is running; press Enter to end it and remove every trace",
                self.tests.len()
            );
            let mut line = String::new();
            // End of input ends the test too: cleaning up is the safe side.
            let _ = std::io::stdin().lock().read_line(&mut line);
        }
        Ok(())
    }

    fn step(&mut self, step: &PlanStep) -> Result<()> {
        let members = match &step.span {
            Some(span) => span_point_state(self.plan, span)?.0,
            None => step.groups.clone(),
        };
        for h in &step.pre {
            self.hook("pre", h, step, &members)?;
        }
        if let Some(span) = &step.span {
            let argv = span_command(self.plan, self.mode, span);
            println!("  span {span}: {}", shell_words(&argv));
            match self.mode {
                Mode::Test => {
                    let sockets = members
                        .iter()
                        .map(|g| (g.clone(), test_socket(self.plan, g)))
                        .collect();
                    self.start_test(format!("span {span}"), sockets, argv, SERVE_TIMEOUT)?
                }
                Mode::Planned | Mode::Unplanned => {
                    let status = Command::new(std::env::current_exe()?)
                        .args(&argv)
                        .stdin(Stdio::null())
                        .status()
                        .context("running tidemark")?;
                    if !status.success() {
                        bail!("the failover of span {span} failed ({status})");
                    }
                }
            }
        }
        for g in &step.groups {
            let argv = group_command(self.plan, step, self.mode, g);
            println!("  {g}: {}", shell_words(&argv));
            // Serving comes first; a VM then has its own time to come up.
            let up = step
                .start_vm
                .as_ref()
                .map_or(Duration::ZERO, |vm| vm.up_timeout.get());
            match self.mode {
                Mode::Test => {
                    let sockets = vec![(g.clone(), test_socket(self.plan, g))];
                    self.start_test(g.to_string(), sockets, argv, SERVE_TIMEOUT + up)?
                }
                Mode::Planned | Mode::Unplanned => {
                    let status = Command::new(std::env::current_exe()?)
                        .args(&argv)
                        .stdin(Stdio::null())
                        .status()
                        .context("running tidemark")?;
                    if !status.success() {
                        bail!("the failover of {g} failed ({status})");
                    }
                }
            }
        }
        for h in &step.post {
            self.hook("post", h, step, &members)?;
        }
        Ok(())
    }

    fn hook(&self, kind: &str, hook: &str, step: &PlanStep, groups: &[GroupRef]) -> Result<()> {
        println!("  {kind}-hook: {hook}");
        let mut env = vec![
            (
                "TIDEMARK_PLAN".to_string(),
                self.plan_path.display().to_string(),
            ),
            (
                "TIDEMARK_PLAN_MODE".to_string(),
                self.mode.name().to_string(),
            ),
            ("TIDEMARK_STEP".to_string(), step.name.clone()),
            (
                "TIDEMARK_GROUPS".to_string(),
                groups
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
            (
                "TIDEMARK_FAILOVER_DIR".to_string(),
                self.plan.to.display().to_string(),
            ),
        ];
        if self.mode == Mode::Test {
            env.push((
                "TIDEMARK_TEST_SOCKETS".to_string(),
                self.tests
                    .iter()
                    .flat_map(|t| &t.sockets)
                    .map(|(g, socket)| format!("{g}={}", socket.display()))
                    .collect::<Vec<_>>()
                    .join(" "),
            ));
        }
        let started = Instant::now();
        tidemark_tracker::quiesce::run_hook_with_env(
            hook,
            &env,
            started + self.plan.hook_timeout.get(),
        )
        .with_context(|| format!("{kind}-hook `{hook}` failed"))?;
        println!(
            "  {kind}-hook done ({:.1}s)",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Starts `tidemark test-failover start` for a group (or a span:
    /// `what`) that serves on `sockets`, and waits until it serves.
    fn start_test(
        &mut self,
        g: String,
        sockets: Vec<(GroupRef, PathBuf)>,
        argv: Vec<OsString>,
        timeout: Duration,
    ) -> Result<()> {
        for (_, socket) in &sockets {
            if let Some(dir) = socket.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        let mut child = Command::new(std::env::current_exe()?)
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("running tidemark test-failover start")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("    {line}");
                if line.starts_with("ready") {
                    let _ = tx.send(());
                }
            }
        });
        self.tests.push(ServedTest {
            what: g.clone(),
            sockets,
            child,
        });
        let deadline = Instant::now() + timeout;
        loop {
            if rx.recv_timeout(Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            let test = self.tests.last_mut().expect("pushed above");
            if let Some(status) = test.child.try_wait()? {
                bail!("the test failover of {g} ended before it served ({status})");
            }
            if Instant::now() > deadline {
                bail!(
                    "the test failover of {g} was not ready within {}",
                    humantime::format_duration(timeout)
                );
            }
        }
    }

    /// Ends every test failover the plan started (SIGTERM: each removes
    /// its traces), newest first.
    fn end_tests(&mut self, completed: bool) -> Result<()> {
        let mut failed = Vec::new();
        while let Some(mut t) = self.tests.pop() {
            if completed {
                println!("  ending the test failover of {}", t.what);
            }
            // SAFETY: kill(2) on a child this process started and has not
            // reaped; no memory is passed.
            unsafe { libc::kill(t.child.id() as libc::pid_t, libc::SIGTERM) };
            match t.child.wait() {
                Ok(s) if s.success() => {}
                Ok(s) => failed.push(format!("{} ({s})", t.what)),
                Err(e) => failed.push(format!("{} ({e})", t.what)),
            }
        }
        if !failed.is_empty() {
            bail!(
                "test failovers that did not end cleanly: {}; run `tidemark test-failover cleanup` for them",
                failed.join(", ")
            );
        }
        Ok(())
    }
}

/// Shows the pause's text and waits for Enter; end of input (nobody to
/// confirm) or "abort" stops the plan.
fn pause(text: &str) -> Result<()> {
    println!("paused: {text}");
    println!("press Enter to go on, or type abort");
    let mut line = String::new();
    let n = std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the answer to the pause")?;
    if n == 0 {
        bail!("the plan was paused and nobody answered (end of input): stopped");
    }
    if line.trim().eq_ignore_ascii_case("abort") {
        bail!("aborted at the pause");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn each_mode_runs_the_command_an_admin_would_type() {
        let plan = tidemark_config::parse_plan(
            "[plan]\ndata-dir = \"/r\"\nto = \"/f\"\n[[plan.step]]\nname = \"db\"\ngroups = [\"db1/orders\"]\n",
            Path::new("p.toml"),
        )
        .unwrap();
        let step = &plan.steps[0];
        let g = &step.groups[0];
        assert_eq!(
            shell_words(&group_command(&plan, step, Mode::Planned, g)),
            "tidemark failover --data-dir /r --host db1 --group orders --planned --timeout 10m --to /f/db1/orders"
        );
        assert_eq!(
            shell_words(&group_command(&plan, step, Mode::Unplanned, g)),
            "tidemark failover --data-dir /r --host db1 --group orders --point latest --to /f/db1/orders"
        );
        assert_eq!(
            shell_words(&group_command(&plan, step, Mode::Test, g)),
            "tidemark test-failover start --data-dir /r --host db1 --group orders --point latest --socket /run/tidemark/test-failover/db1-orders.sock"
        );
        let with_config = tidemark_config::PlanConfig {
            receiver_config: Some("/etc/tidemark/receiver.toml".into()),
            ..plan.clone()
        };
        assert_eq!(
            shell_words(&group_command(&with_config, step, Mode::Unplanned, g)),
            "tidemark failover --config /etc/tidemark/receiver.toml --host db1 --group orders --point latest --to /f/db1/orders"
        );
        assert_eq!(
            shell_words(&["a b".into(), "it's".into()]),
            "tidemark 'a b' 'it'\\''s'"
        );
    }

    #[test]
    fn a_span_step_runs_one_command_for_every_member() {
        let plan = tidemark_config::parse_plan(
            "[plan]\ndata-dir = \"/r\"\nto = \"/f\"\n[[plan.step]]\nname = \"shop\"\nspan = \"shop\"\n",
            Path::new("p.toml"),
        )
        .unwrap();
        let span = plan.steps[0].span.clone().unwrap();
        assert_eq!(
            shell_words(&span_command(&plan, Mode::Unplanned, &span)),
            "tidemark failover --data-dir /r --span shop --point latest --to /f"
        );
        assert_eq!(
            shell_words(&span_command(&plan, Mode::Test, &span)),
            "tidemark test-failover start --data-dir /r --span shop --point latest --socket-dir /run/tidemark/test-failover"
        );
        // The members' sockets are where the span's test makes them.
        let g: GroupRef = "web1/default".parse().unwrap();
        assert_eq!(
            test_socket(&plan, &g),
            Path::new("/run/tidemark/test-failover/web1-default.sock")
        );
        // No span point in an empty data directory: said by name.
        let data = tempfile::tempdir().unwrap();
        let plan = tidemark_config::PlanConfig {
            data_dir: data.path().to_path_buf(),
            ..plan
        };
        let e = span_point_state(&plan, &span).unwrap_err().to_string();
        assert!(e.contains("no span point"), "{e}");
    }

    #[test]
    fn a_step_with_start_vm_boots_each_group_s_vm() {
        let plan = tidemark_config::parse_plan(
            "[plan]\ndata-dir = \"/r\"\nto = \"/f\"\n[plan.networks]\nbr0 = \"br-dr0\"\n\
             [[plan.step]]\nname = \"web\"\ngroups = [\"hv1/web1\"]\n\
             start-vm = { specs = \"/v\", up-line = \"web1 login:\", up-timeout = \"2m\" }\n",
            Path::new("p.toml"),
        )
        .unwrap();
        let step = &plan.steps[0];
        let g = &step.groups[0];
        assert_eq!(
            shell_words(&group_command(&plan, step, Mode::Unplanned, g)),
            "tidemark failover --data-dir /r --host hv1 --group web1 --point latest --to /f/hv1/web1 \
             --boot /v/web1.toml --up-line 'web1 login:' --up-timeout 2m --network br0=br-dr0"
        );
        assert_eq!(
            shell_words(&group_command(&plan, step, Mode::Test, g)),
            "tidemark test-failover start --data-dir /r --host hv1 --group web1 --point latest \
             --socket /run/tidemark/test-failover/hv1-web1.sock \
             --boot /v/web1.toml --up-line 'web1 login:' --up-timeout 2m"
        );
        let plan = tidemark_config::parse_plan(
            "[plan]\ndata-dir = \"/r\"\nto = \"/f\"\n\
             [[plan.step]]\nname = \"web\"\ngroups = [\"hv1/web1\"]\nstart-vm = {}\n\
             [[plan.step]]\nname = \"db\"\ngroups = [\"hv1/db1\"]\nstart-vm = { up-agent = true }\n",
            Path::new("p.toml"),
        )
        .unwrap();
        let step = &plan.steps[0];
        assert_eq!(
            shell_words(&group_command(&plan, step, Mode::Unplanned, &step.groups[0])),
            "tidemark failover --data-dir /r --host hv1 --group web1 --point latest --to /f/hv1/web1 \
             --boot --up-timeout 5m",
            "the replicated spec, up as it says"
        );
        let step = &plan.steps[1];
        assert_eq!(
            shell_words(&group_command(&plan, step, Mode::Test, &step.groups[0])),
            "tidemark test-failover start --data-dir /r --host hv1 --group db1 --point latest \
             --socket /run/tidemark/test-failover/hv1-db1.sock --boot --up-agent --up-timeout 5m"
        );
    }
}
