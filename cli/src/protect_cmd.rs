//! `tidemark protect`, `tidemark splice …`, `tidemark unprotect`: the live
//! splice of the tracker into a mounted disk's I/O path with device-mapper
//! (the mechanism is `tidemark_tracker::splice`; this is its admin shell,
//! plus the talk with the tracker's control socket).
//!
//! Resync after a gap: between a splice-out and the next splice-in the
//! disk is written without the tracker, so the replica must compare the
//! whole disk. The record of that is made where it is correct, at the
//! splice-in: *after* the map resumes onto the tracker, the tracker is
//! asked (`resync-all DISK` on its control socket) to log the whole disk as
//! resync-needed, so every write from then on is logged and a resync that
//! reads the disk after the record sees every write of the gap. (Recording
//! it only at the splice-out, or in a marker file honoured at the next
//! `tracker serve`, would not do: the shipper may compare the disk before
//! the gap ends, and the tracker may keep running across the gap.) The
//! splice-out also asks, as early notice that the replica is behind; if no
//! tracker answers then, the next splice-in still records it.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use tidemark_changelog::Seq;
use tidemark_names::Name;
use tidemark_tracker::dm::Control;
use tidemark_tracker::splice::{self, ProtectOutcome, Route, Swapped};

/// The default control socket of the tracker.
const CONTROL_SOCKET: &str = "/run/tidemark/tracker.ctl";
/// How long the tracker may take to record the resync.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub(crate) struct ProtectArgs {
    /// The disk (a block device) to protect; from now on mount
    /// /dev/mapper/tidemark-NAME instead of it.
    disk: PathBuf,
    /// The map's NAME (default: the disk's file name, e.g. sdb).
    #[arg(long)]
    name: Option<Name>,
}

#[derive(Debug, Args)]
pub(crate) struct UnprotectArgs {
    /// The NAME given to `tidemark protect` (removes
    /// /dev/mapper/tidemark-NAME; refused while it is spliced or mounted).
    name: Name,
}

/// Splice the tracker into a protected disk's I/O path, or out of it.
#[derive(Debug, Subcommand)]
pub(crate) enum SpliceCommand {
    /// Point /dev/mapper/tidemark-NAME at the tracker's NBD device (which
    /// serves the same disk), without unmounting: suspend (filesystem
    /// frozen and flushed), swap, resume. The tracker then records the
    /// whole disk as resync-needed (it was written untracked before).
    Start(SpliceStartArgs),
    /// Point /dev/mapper/tidemark-NAME straight at its disk again. Writes
    /// from now on are not tracked; the next `splice start` has the whole
    /// disk resynced.
    Stop(SpliceStopArgs),
    /// Where /dev/mapper/tidemark-NAME points now.
    Status(SpliceStatusArgs),
}

#[derive(Debug, Args)]
pub(crate) struct TrackerLink {
    /// The tracker's control socket.
    #[arg(long, default_value = CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// The disk's name in the tracker's config (default: NAME).
    #[arg(long, value_name = "DISK_NAME")]
    tracker_disk: Option<Name>,
}

#[derive(Debug, Args)]
pub(crate) struct SpliceStartArgs {
    /// The NAME given to `tidemark protect`.
    name: Name,
    /// The tracker's device: its NBD device (e.g. /dev/nbd0, attached) or
    /// its ublk device (e.g. /dev/ublkb0); the disk's size.
    #[arg(long, visible_alias = "device")]
    nbd: PathBuf,
    #[command(flatten)]
    tracker: TrackerLink,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SpliceStopArgs {
    /// The NAME given to `tidemark protect`.
    name: Name,
    #[command(flatten)]
    tracker: TrackerLink,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SpliceStatusArgs {
    /// The NAME given to `tidemark protect`.
    name: Name,
}

pub(crate) fn protect(a: ProtectArgs) -> Result<ExitCode> {
    let name = match a.name {
        Some(n) => n,
        None => splice::default_name(&a.disk).with_context(|| {
            format!(
                "cannot derive a name from {}: give --name",
                a.disk.display()
            )
        })?,
    };
    // The admin's mistakes first, before device-mapper is asked anything.
    splice::probe(&a.disk)?;
    let ctl = Control::open()?;
    let path = splice::map_path(&name);
    match splice::protect(&ctl, &a.disk, &name)? {
        ProtectOutcome::Created => println!(
            "protected {}: mount {} instead of it from now on",
            a.disk.display(),
            path.display()
        ),
        ProtectOutcome::AlreadyProtected { route } => println!(
            "{} already protects {} ({})",
            path.display(),
            a.disk.display(),
            route_text(route)
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn unprotect(a: UnprotectArgs) -> Result<ExitCode> {
    let ctl = Control::open()?;
    splice::unprotect(&ctl, &a.name)?;
    println!("removed {}", splice::map_path(&a.name).display());
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run(cmd: SpliceCommand) -> Result<ExitCode> {
    match cmd {
        SpliceCommand::Start(a) => start(a),
        SpliceCommand::Stop(a) => stop(a),
        SpliceCommand::Status(a) => status(a),
    }
}

fn route_text(route: Route) -> String {
    match route {
        Route::Disk => "straight to the disk, untracked".into(),
        Route::Spliced(dev) => format!("spliced onto device {dev}"),
    }
}

/// Checks that a tracker answers on `socket` and serves `disk`.
fn check_tracker(socket: &Path, disk: &str) -> Result<()> {
    let status = tidemark_control::status(socket, CONTROL_TIMEOUT).with_context(|| {
        format!(
            "no tracker answers on {}: start it (tidemark tracker serve) and attach its NBD device first",
            socket.display()
        )
    })?;
    let serves = status.disks.iter().any(|d| d.name == disk);
    if !serves {
        bail!(
            "the tracker on {} serves no disk {disk:?} (give --tracker-disk)",
            socket.display()
        );
    }
    Ok(())
}

/// Asks the tracker to record the whole disk as resync-needed; returns the
/// record's sequence number (`None`: recorded in its dirty bitmap).
fn record_resync(socket: &Path, disk: &str) -> Result<Option<Seq>> {
    match tidemark_control::resync_all(socket, disk, CONTROL_TIMEOUT) {
        Ok(seq) => Ok(seq),
        Err(e @ tidemark_control::ControlError::Refused(_)) => bail!("{e}"),
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context(format!("asking the tracker on {}", socket.display())))
        }
    }
}

fn suspended_ms(s: Swapped) -> Option<f64> {
    match s {
        Swapped::Now { suspended } => Some(suspended.as_secs_f64() * 1e3),
        Swapped::Already => None,
    }
}

fn start(a: SpliceStartArgs) -> Result<ExitCode> {
    let disk = a.tracker.tracker_disk.as_ref().unwrap_or(&a.name);
    let socket = &a.tracker.control_socket;
    splice::probe(&a.nbd)?;
    check_tracker(socket, disk)?;
    let ctl = Control::open()?;
    let swapped = splice::splice_in(&ctl, &a.name, &a.nbd)?;
    let seq = record_resync(socket, disk).with_context(|| {
        format!(
            "{} now goes through the tracker, but the whole disk could not be recorded as \
             resync-needed: run `tidemark splice start {}` again",
            splice::map_path(&a.name).display(),
            a.name
        )
    })?;
    let map = splice::map_path(&a.name);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "map": map, "nbd": a.nbd, "spliced": true,
                "suspended_ms": suspended_ms(swapped), "resync_seq": seq,
            })
        );
    } else {
        match suspended_ms(swapped) {
            Some(ms) => println!(
                "{} spliced onto {} (suspended {ms:.1} ms)",
                map.display(),
                a.nbd.display()
            ),
            None => println!(
                "{} was spliced onto {} already",
                map.display(),
                a.nbd.display()
            ),
        }
        match seq {
            Some(seq) => println!("the whole disk is recorded as resync-needed (seq {seq})"),
            None => println!("the whole disk is recorded as resync-needed (dirty bitmap)"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn stop(a: SpliceStopArgs) -> Result<ExitCode> {
    let disk = a.tracker.tracker_disk.as_ref().unwrap_or(&a.name);
    let ctl = Control::open()?;
    // The swap comes first and never waits for the tracker: splicing out
    // is also the way back when the tracker is in trouble.
    let swapped = splice::splice_out(&ctl, &a.name)?;
    let map = splice::map_path(&a.name);
    let resync = match swapped {
        Swapped::Now { .. } => Some(record_resync(&a.tracker.control_socket, disk)),
        Swapped::Already => None,
    };
    if let Some(Err(e)) = &resync {
        eprintln!(
            "tidemark: warning: {e:#}; writes to {} are untracked now, and the next \
             `tidemark splice start {}` has the whole disk resynced",
            map.display(),
            a.name
        );
    }
    let seq = resync.and_then(|r| r.ok()).flatten();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "map": map, "spliced": false,
                "suspended_ms": suspended_ms(swapped), "resync_seq": seq,
            })
        );
    } else {
        match suspended_ms(swapped) {
            Some(ms) => println!(
                "{} points at its disk again (suspended {ms:.1} ms); writes are not tracked until the next splice start",
                map.display()
            ),
            None => println!("{} pointed at its disk already", map.display()),
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status(a: SpliceStatusArgs) -> Result<ExitCode> {
    let ctl = Control::open()?;
    let p = splice::inspect(&ctl, &a.name)?;
    println!(
        "{}: {} bytes over device {}, {}{}",
        splice::map_path(&a.name).display(),
        p.size,
        p.disk,
        route_text(p.route),
        if p.info.suspended() {
            " (SUSPENDED)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(result: Result<ExitCode>) -> String {
        format!("{:#}", result.expect_err("must be refused"))
    }

    #[test]
    fn protect_refuses_what_is_not_a_block_device_before_asking_the_kernel() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = error_of(protect(ProtectArgs {
            disk: file.path().into(),
            name: Some(Name::from_static("data")),
        }));
        assert!(e.contains("is not a block device"), "{e}");
        let e = <crate::Cli as clap::Parser>::try_parse_from([
            "tidemark",
            "protect",
            "/dev/null",
            "--name",
            "bad/name",
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"bad/name\" is not a valid name"), "{e}");
        let e = error_of(protect(ProtectArgs {
            disk: "/".into(),
            name: None,
        }));
        assert!(e.contains("give --name"), "{e}");
    }

    #[test]
    fn splice_start_refuses_a_missing_or_non_block_nbd_device() {
        let dir = tempfile::tempdir().unwrap();
        let link = || TrackerLink {
            control_socket: dir.path().join("tracker.ctl"),
            tracker_disk: None,
        };
        let e = error_of(start(SpliceStartArgs {
            name: Name::from_static("data"),
            nbd: dir.path().join("nbd0"),
            tracker: link(),
            json: false,
        }));
        assert!(e.contains("cannot read"), "{e}");
        // /dev/null is a character device, not the tracker's NBD device.
        let e = error_of(start(SpliceStartArgs {
            name: Name::from_static("data"),
            nbd: "/dev/null".into(),
            tracker: link(),
            json: false,
        }));
        assert!(e.contains("not a block device"), "{e}");
    }
}
