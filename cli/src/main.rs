//! `tidemark`: the admin command. It grows a subcommand for each capability
//! that really works; nothing here is a placeholder.

/// `println!` for this crate: writes through [`stdout::write`], which ends
/// the output quietly when the reader has gone away instead of panicking
/// as std's does.
macro_rules! println {
    () => {
        $crate::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for this crate; see [`println!`].
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*))
    };
}

mod config_cmd;
mod daemon_args;
mod drain_cmd;
mod failback_cmd;
mod failover_cmd;
mod generate_docs_cmd;
mod host_cmd;
mod log_cmd;
mod mark_cmd;
mod plan_cmd;
mod points_cmd;
mod protect_cmd;
mod receiver_cmd;
mod reprotect_cmd;
mod shipper_cmd;
mod span_cmd;
mod status_cmd;
mod stdout;
mod test_failover_cmd;
mod timefmt;
mod tracker_cmd;
mod ublk_cmd;
mod vm_boot;
mod vm_cmd;

use clap::{CommandFactory, Parser, Subcommand};
use std::io::IsTerminal;
use std::process::ExitCode;

/// Tidemark: disaster recovery for Linux servers.
#[derive(Debug, Parser)]
#[command(name = "tidemark", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect, verify and replay a change log.
    #[command(subcommand)]
    Log(log_cmd::LogCommand),
    /// Validate configuration files.
    #[command(subcommand)]
    Config(config_cmd::ConfigCommand),
    /// Run the tracker (the NBD server in the I/O path) and talk to it.
    #[command(subcommand)]
    Tracker(tracker_cmd::TrackerCommand),
    /// Set up and administer the receiver (replica site).
    #[command(subcommand)]
    Receiver(receiver_cmd::ReceiverCommand),
    /// Enrol this protected host with a receiver.
    #[command(subcommand)]
    Host(host_cmd::HostCommand),
    /// Run the shipper (drains the change log to the receiver) and ask it
    /// how replication goes.
    #[command(subcommand)]
    Shipper(shipper_cmd::ShipperCommand),
    /// Take over a replica: write its disks, as of a recovery point
    /// (default: the newest), into image files (the receiver applying the
    /// group must be stopped; with the Ceph store, --config, its lease must
    /// have expired, and it is fenced), or with --to-rbd into RBD clones;
    /// with --planned, first drain the protected host through the running
    /// receiver so nothing is lost; with --span, every member of a span
    /// to the same span point (the receiver may run).
    Failover(failover_cmd::FailoverArgs),
    /// Replicate in reverse after a failover (on the original site): the
    /// old primary's disks become the replica of the host now running the
    /// failed-over ones, and only blocks that differ will travel (the same
    /// as `tidemark receiver adopt`).
    Reprotect(reprotect_cmd::AdoptArgs),
    /// After a reprotect (on the original site, receiver running): drain
    /// the replica site's host and write its disks back onto the original
    /// primary's, losing nothing.
    Failback(failback_cmd::FailbackArgs),
    /// List the recovery points a receiver keeps for a host's group, or
    /// with --span a span's points (works while the receiver runs).
    Points(points_cmd::PointsArgs),
    /// Spans: consistency groups of several hosts whose recovery points are
    /// taken together (`[[receiver.span]]` on the replica site).
    #[command(subcommand)]
    Span(span_cmd::SpanCommand),
    /// Insert a labelled marker on this protected host: a named recovery
    /// point, application-consistent with --app-consistent (hooks and
    /// filesystem freeze around it).
    Mark(mark_cmd::MarkArgs),
    /// The protected host's half of a planned failover: stop the tracker
    /// (final barrier) and wait until the receiver has every record.
    Drain(drain_cmd::DrainArgs),
    /// Serve a recovery point over NBD on the replica site, read-write
    /// with the writes discarded afterwards, while replication goes on.
    #[command(subcommand)]
    TestFailover(test_failover_cmd::TestFailoverCommand),
    /// Recovery plans: fail over (or test) many hosts' groups in order,
    /// with hooks and manual pauses.
    #[command(subcommand)]
    Plan(plan_cmd::PlanCommand),
    /// One screen for an admin: every disk's tracking and replication
    /// state, lag, pending records, throughput and newest recovery point,
    /// from whichever of tracker, shipper and receiver data answer.
    Status(status_cmd::StatusArgs),
    /// Put a disk under a device-mapper map, /dev/mapper/tidemark-NAME, so
    /// the tracker can later be spliced into its I/O path while mounted.
    Protect(protect_cmd::ProtectArgs),
    /// Splice the tracker into a protected disk's I/O path (start) or out
    /// of it (stop), live, without unmounting.
    #[command(subcommand)]
    Splice(protect_cmd::SpliceCommand),
    /// Remove /dev/mapper/tidemark-NAME (when spliced out and unmounted).
    Unprotect(protect_cmd::UnprotectArgs),
    /// ublk devices on this host: list them, remove one no tracker will
    /// take over.
    #[command(subcommand)]
    Ublk(ublk_cmd::UblkCommand),
    /// Protect a virtual machine on its hypervisor: one consistency group
    /// per VM, its disks served to qemu or libvirt over the tracker's NBD
    /// socket.
    #[command(subcommand)]
    Vm(vm_cmd::VmCommand),
    /// Write the man pages and shell completions (for packaging).
    #[command(hide = true)]
    GenerateDocs(generate_docs_cmd::GenerateDocsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TIDEMARK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Command::Log(cmd) => log_cmd::run(cmd),
        Command::Config(cmd) => config_cmd::run(cmd),
        Command::Tracker(cmd) => tracker_cmd::run(cmd),
        Command::Receiver(cmd) => receiver_cmd::run_receiver(cmd),
        Command::Host(cmd) => host_cmd::run_host(cmd),
        Command::Shipper(cmd) => shipper_cmd::run_shipper(cmd),
        Command::Failover(a) => failover_cmd::failover(a),
        Command::Points(a) => points_cmd::points(a),
        Command::Span(c) => span_cmd::run(c),
        Command::Reprotect(a) => reprotect_cmd::adopt(a),
        Command::Failback(a) => failback_cmd::failback(a),
        Command::Mark(a) => mark_cmd::mark(a),
        Command::Drain(a) => drain_cmd::drain(a),
        Command::TestFailover(cmd) => test_failover_cmd::run(cmd),
        Command::Plan(cmd) => plan_cmd::run(cmd),
        Command::Status(a) => status_cmd::run(a),
        Command::Protect(a) => protect_cmd::protect(a),
        Command::Splice(cmd) => protect_cmd::run(cmd),
        Command::Unprotect(a) => protect_cmd::unprotect(a),
        Command::Ublk(cmd) => ublk_cmd::run(cmd),
        Command::Vm(cmd) => vm_cmd::run(cmd),
        Command::GenerateDocs(a) => generate_docs_cmd::run(a, Cli::command()),
    };
    // Output that could not be written (other than to a reader that went
    // away) fails a command that otherwise succeeded.
    let result = match (result, stdout::failure()) {
        (Ok(_), Some(e)) => Err(anyhow::Error::new(e).context("writing to standard output")),
        (result, _) => result,
    };
    match result {
        Ok(code) => code,
        // A reader that went away (`tidemark log dump | head`) is not an error.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether log lines get ANSI colours: only on a terminal (a file or the
/// journal would keep the escape codes as text), and never when `NO_COLOR`
/// is set to anything but the empty string (<https://no-color.org>).
fn colour_logs(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Tells systemd (`Type=notify` units) that the daemon serves. Outside
/// systemd (no `NOTIFY_SOCKET`) this does nothing; a failure to notify is
/// logged and otherwise ignored: systemd then times the start out itself.
pub(crate) fn notify_ready() {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        eprintln!("tidemark: warning: cannot notify systemd: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_are_coloured_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_logs(true, None));
        assert!(colour_logs(true, Some(OsStr::new(""))));
        assert!(!colour_logs(true, Some(OsStr::new("1"))));
        assert!(!colour_logs(false, None));
        assert!(!colour_logs(false, Some(OsStr::new("1"))));
    }

    /// The `tidemark` command lines in the README section that starts with
    /// `heading`, prompts (`host$ `) dropped and cut at a shell operator.
    fn readme_commands(heading: &str) -> Vec<String> {
        let readme = include_str!("../../README.md");
        let start = readme
            .find(&format!("\n{heading}"))
            .unwrap_or_else(|| panic!("the README has a section {heading:?}"));
        let section = &readme[start + 1..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let mut in_block = false;
        let mut commands = Vec::new();
        for line in section.lines() {
            if line.starts_with("```") {
                in_block = !in_block;
                continue;
            }
            if !in_block {
                continue;
            }
            let command = match line.split_once("$ ") {
                Some((prompt, rest)) if !prompt.contains(' ') => rest.trim(),
                _ => line.trim(),
            };
            if !command.starts_with("tidemark ") {
                continue;
            }
            let words: Vec<&str> = command
                .split_whitespace()
                .take_while(|w| !matches!(*w, ">" | "&&" | "|" | ";"))
                .collect();
            commands.push(words.join(" "));
        }
        commands
    }

    /// Every `tidemark` command the README's operator guide shows parses
    /// with the real command line: no renamed subcommand or flag goes
    /// unnoticed.
    #[test]
    fn operator_guide_commands_parse() {
        let mut checked = 0;
        for heading in ["## Operator guide", "## Protecting a virtual machine"] {
            for command in readme_commands(heading) {
                let args: Vec<&str> = command.split_whitespace().collect();
                if let Err(e) = Cli::try_parse_from(&args) {
                    panic!("README {heading}: `{command}` does not parse:\n{e}");
                }
                checked += 1;
            }
        }
        assert!(checked >= 23, "only {checked} commands found in the guide");
    }
}
