//! `tidemark tracker …`: run the tracker, ask it for status, mark points.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tidemark_changelog::{LogOptions, Seq};
use tidemark_config::ByteSize;
use tidemark_names::Name;
use tidemark_tracker::daemon::{DiskSettings, KernelAttachSettings, TrackerSettings, UblkSettings};
use tidemark_tracker::quiesce::Quiesce;
use tidemark_tracker::storage::{BackingOptions, CacheMode, EngineKind};

/// Run the tracker and talk to it.
#[derive(Debug, Subcommand)]
pub(crate) enum TrackerCommand {
    /// Serve protected disks over NBD, logging every acknowledged write.
    Serve(ServeArgs),
    /// Ask a running tracker for its status.
    Status(ControlArgs),
    /// Insert a labelled marker (a named recovery point) and a barrier.
    Mark(crate::mark_cmd::MarkArgs),
    /// Serve a disk at the size its backing grew to, without a restart:
    /// grow the image or device first (truncate, lvextend, qemu-img
    /// resize), then run this. The growth is recorded in the change log;
    /// then the tracker's own kernel devices (ublk, `--attach`) are told
    /// the new size; other NBD clients reconnect to see it.
    Resize(ResizeArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ResizeArgs {
    /// The disk's name (as `tidemark tracker status` lists it).
    #[arg(long)]
    disk: Name,
    /// The tracker's control socket.
    #[arg(long, default_value = "/run/tidemark/tracker.ctl")]
    control_socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Engine {
    /// io_uring where the kernel allows it, else synchronous I/O.
    Auto,
    /// io_uring only.
    Uring,
    /// Synchronous pread/pwrite.
    Sync,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Cache {
    /// O_DIRECT: no page cache (the default on block devices).
    None,
    /// The page cache, fdatasync at barriers (the default on image files).
    Writeback,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// A tracker config file (`[tracker]` table). Alternatively give
    /// --image, --socket and --log-dir.
    #[arg(long, conflicts_with_all = ["image", "socket", "log_dir"])]
    config: Option<PathBuf>,
    /// An image file or block device to protect (repeat for several disks
    /// in one consistency group).
    #[arg(long, requires_all = ["socket", "log_dir"])]
    image: Vec<PathBuf>,
    /// The disks were written while the tracker did not run (a failback
    /// wrote them in place): record every byte as resync-needed, so the
    /// replica compares every block and receives only those that differ.
    #[arg(long)]
    resync_all: bool,
    /// The consistency group (one ordered log for all its disks).
    #[arg(long, default_value = "default")]
    group: Name,
    /// Names of the disks, in the order of the images (default: their file
    /// names); also their NBD export names. 1 to 64 bytes of lower-case
    /// letters, digits, '.', '_' and '-': the receiver files the replica
    /// under it.
    #[arg(long)]
    name: Vec<Name>,
    /// The NBD unix socket to create (0600).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Open the NBD socket to this group too (0660), for a local client
    /// that runs as another user (libvirt's qemu). Overrides the config's
    /// `socket-group`.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// The change log directory.
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// The control socket (default: the NBD socket's path + ".ctl").
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Most space the change log may take.
    #[arg(long, default_value = "8GiB")]
    log_size_limit: ByteSize,
    /// Size of each log segment file.
    #[arg(long, default_value = "64MiB")]
    segment_size: ByteSize,
    /// Backing I/O engine.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    engine: Engine,
    /// How every disk's backing device is written (overrides the config's
    /// `cache`); default: none on block devices, writeback on image files.
    #[arg(long, value_enum)]
    cache: Option<Cache>,
    /// Serve Prometheus metrics on http://ADDR/metrics (port 0 picks one;
    /// the address is printed). Overrides `metrics-listen` of a config
    /// file; without either, the one-line form serves no metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Attach the kernel's NBD client to the first disk (or the config's
    /// `[tracker.attach]` export) over netlink, without nbd-client; a
    /// device kept by a previous tracker is re-adopted. Needs root and
    /// the nbd module.
    #[arg(long)]
    attach: bool,
    /// Serve the first disk (or the config's `[tracker.ublk]` export) to
    /// the kernel as /dev/ublkbN through ublk; a device kept by a previous
    /// tracker is taken over. Needs root and the ublk_drv module.
    #[arg(long)]
    ublk: bool,
    /// On SIGTERM leave the attached (or ublk) device for the next tracker
    /// to re-adopt, instead of disconnecting (removing) it.
    #[arg(long)]
    keep_device: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ControlArgs {
    /// The tracker's control socket.
    #[arg(long, default_value = "/run/tidemark/tracker.ctl")]
    control_socket: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(cmd: TrackerCommand) -> Result<ExitCode> {
    match cmd {
        TrackerCommand::Serve(a) => serve(a),
        TrackerCommand::Status(a) => status(a),
        TrackerCommand::Mark(a) => crate::mark_cmd::mark(a),
        TrackerCommand::Resize(a) => resize(a),
    }
}

fn resize(a: ResizeArgs) -> Result<ExitCode> {
    let r = tidemark_control::resize(
        &a.control_socket,
        a.disk.as_str(),
        std::time::Duration::from_secs(60),
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "disk {} grew from {} to {} bytes (grow record at sequence number {}); new NBD connections see the new size",
            r.disk, r.before, r.size, r.seq
        );
        for k in &r.kernel {
            match &k.error {
                None => println!(
                    "{} has the new size: grow its file system online (resize2fs, xfs_growfs)",
                    k.device
                ),
                Some(why) => println!("{why}"),
            }
        }
        println!("a /dev/nbd device attached with nbd-client keeps its old size until it is reconnected (nbd-client -d, then nbd-client again, with its file system unmounted)");
    }
    Ok(ExitCode::SUCCESS)
}

/// With `[tracker.app-consistent] schedule` set: what starts the thread
/// that takes an application-consistent point (label `scheduled`) that
/// often, through the control socket like `tidemark mark` does.
fn scheduled_marks(path: &Path, control: PathBuf) -> Result<Option<impl FnOnce()>> {
    let loaded = tidemark_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let table = loaded
        .require_tracker()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .app_consistent
        .clone();
    let Some(every) = table.schedule else {
        return Ok(None);
    };
    let quiesce = quiesce_of(&table);
    Ok(Some(move || {
        std::thread::spawn(move || loop {
            std::thread::sleep(every.get());
            let result = quiesce.run(|left, app| {
                let label = tidemark_names::Label::new("scheduled").expect("a valid label");
                tidemark_control::mark(&control, &label, app, left)
            });
            match result {
                Ok(r) if r.app_consistent => {
                    tracing::info!(seq = r.seq.get(), "scheduled application-consistent point")
                }
                Ok(r) => tracing::warn!(
                    seq = r.seq.get(),
                    guest_agent = ?r.guest_agent,
                    "scheduled point is crash-consistent: no guest agent answered"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "scheduled application-consistent point failed")
                }
            }
        });
    }))
}

/// What `[tracker.app-consistent]` quiesces (for `mark --app-consistent`,
/// the schedule and application-consistent span points alike).
fn quiesce_of(table: &tidemark_config::AppConsistentConfig) -> Quiesce {
    Quiesce {
        freeze: table.freeze.clone(),
        pre_hooks: table.pre_hooks.clone(),
        post_hooks: table.post_hooks.clone(),
        timeout: table.timeout.get(),
        guest_agent: table
            .guest_agent
            .clone()
            .map(tidemark_tracker::quiesce::GuestAgentSettings::new),
    }
}

fn settings_from_config(path: &Path) -> Result<TrackerSettings> {
    let loaded = tidemark_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let t = loaded
        .require_tracker()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(TrackerSettings {
        group: t.consistency_group.clone(),
        disks: t
            .disks
            .iter()
            .map(|d| DiskSettings {
                name: d.name.clone(),
                export: d.effective_export_name().to_string(),
                path: d.path.clone(),
                cache: d.cache.map(|c| match c {
                    tidemark_config::CacheMode::None => CacheMode::None,
                    tidemark_config::CacheMode::Writeback => CacheMode::Writeback,
                }),
            })
            .collect(),
        log_dir: t.log_dir.clone(),
        log: LogOptions {
            segment_size: t.segment_size.as_u64(),
            size_limit: t.log_size_limit.as_u64(),
        },
        socket: t.socket.clone(),
        socket_group: t.socket_group.clone(),
        tcp_listen: t.tcp_listen,
        control_socket: t.control_socket.clone(),
        activity_extent: t.activity_extent_size.as_u64(),
        max_block: u32::try_from(t.max_block_size.as_u64()).context("max-block-size")?,
        mlockall: t.mlockall,
        backing: BackingOptions::default(),
        metrics_listen: Some(t.metrics_listen),
        resync_all: false,
        attach: t.attach.as_ref().map(|a| KernelAttachSettings {
            export: a.export.clone(),
            index: a.index,
            io_timeout: a.io_timeout.get(),
            dead_connection_timeout: a.dead_connection_timeout.get(),
            keep_device: a.keep_device,
        }),
        ublk: t.ublk.as_ref().map(|u| UblkSettings {
            export: u.export.clone(),
            dev_id: u.id,
            queue_depth: u.queue_depth,
            queues: u.queues,
            user_copy: u.user_copy,
            keep_device: u.keep_device,
        }),
        app_consistent: Some(quiesce_of(&t.app_consistent)),
    })
}

/// The name of a disk given without `--name`: its image's file name, which
/// must then be a valid name.
fn default_disk_name(path: &Path, index: usize) -> Result<Name> {
    let Some(file_name) = path.file_name() else {
        return Ok(Name::new(format!("disk{index}"))?);
    };
    Name::new(file_name.to_string_lossy()).with_context(|| {
        format!(
            "{} cannot name the disk (its name becomes a file name on the replica site); \
             give --name NAME",
            path.display()
        )
    })
}

fn settings_from_flags(a: &ServeArgs) -> Result<TrackerSettings> {
    if a.image.is_empty() {
        bail!("give --config FILE, or --image PATH --socket PATH --log-dir DIR");
    }
    if !a.name.is_empty() && a.name.len() != a.image.len() {
        bail!("--name must be given once per --image, or not at all");
    }
    let disks = a
        .image
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let name = match a.name.get(i) {
                Some(name) => name.clone(),
                None => default_disk_name(path, i)?,
            };
            Ok(DiskSettings {
                export: name.to_string(),
                name,
                path: path.clone(),
                cache: None,
            })
        })
        .collect::<Result<_>>()?;
    let socket = a
        .socket
        .clone()
        .context("--socket is required with --image")?;
    let control_socket = a.control_socket.clone().unwrap_or_else(|| {
        let mut s = socket.clone().into_os_string();
        s.push(".ctl");
        PathBuf::from(s)
    });
    Ok(TrackerSettings {
        group: a.group.clone(),
        disks,
        log_dir: a
            .log_dir
            .clone()
            .context("--log-dir is required with --image")?,
        log: LogOptions {
            segment_size: a.segment_size.as_u64(),
            size_limit: a.log_size_limit.as_u64(),
        },
        socket,
        socket_group: None,
        tcp_listen: None,
        control_socket,
        activity_extent: 4 << 20,
        max_block: 32 << 20,
        mlockall: false,
        backing: BackingOptions {
            engine: match a.engine {
                Engine::Auto => EngineKind::Auto,
                Engine::Uring => EngineKind::Uring,
                Engine::Sync => EngineKind::Sync,
            },
            ..BackingOptions::default()
        },
        metrics_listen: None,
        resync_all: false,
        attach: None,
        ublk: None,
        app_consistent: None,
    })
}

fn serve(a: ServeArgs) -> Result<ExitCode> {
    let mut settings = match &a.config {
        Some(path) => settings_from_config(path)?,
        None => settings_from_flags(&a)?,
    };
    if let Some(addr) = a.metrics_listen {
        settings.metrics_listen = Some(addr);
    }
    if let Some(group) = &a.socket_group {
        settings.socket_group = Some(group.clone());
    }
    settings.resync_all = a.resync_all;
    if let Some(cache) = a.cache {
        let cache = match cache {
            Cache::None => CacheMode::None,
            Cache::Writeback => CacheMode::Writeback,
        };
        for disk in &mut settings.disks {
            disk.cache = Some(cache);
        }
    }
    if a.attach && settings.attach.is_none() {
        let defaults = tidemark_config::AttachConfig::default();
        settings.attach = Some(KernelAttachSettings {
            export: None,
            index: None,
            io_timeout: defaults.io_timeout.get(),
            dead_connection_timeout: defaults.dead_connection_timeout.get(),
            keep_device: false,
        });
    }
    if a.ublk && settings.ublk.is_none() {
        let defaults = tidemark_config::UblkConfig::default();
        settings.ublk = Some(UblkSettings {
            export: None,
            dev_id: None,
            queue_depth: defaults.queue_depth,
            queues: defaults.queues,
            user_copy: defaults.user_copy,
            keep_device: false,
        });
    }
    if a.ublk && a.attach && settings.attach.as_ref().is_some_and(|t| t.export.is_none()) {
        bail!("--attach and --ublk would both serve the first disk: give one, or name different exports in the config");
    }
    if a.keep_device {
        if settings.attach.is_none() && settings.ublk.is_none() {
            bail!("--keep-device needs --attach, --ublk, or a [tracker.attach] or [tracker.ublk] table");
        }
        if let Some(attach) = settings.attach.as_mut() {
            attach.keep_device = true;
        }
        if let Some(ublk) = settings.ublk.as_mut() {
            ublk.keep_device = true;
        }
    }
    let socket = settings.socket.clone();
    let schedule = match &a.config {
        Some(path) => scheduled_marks(path, settings.control_socket.clone())?,
        None => None,
    };
    tidemark_tracker::daemon::run(settings, |report, metrics, frontends| {
        // One line on stdout when ready, for scripts and tests.
        println!(
            "tracker ready on {} (generation {}, {})",
            socket.display(),
            report.generation,
            if report.unclean {
                format!(
                    "unclean restart: {} extents recorded as resync-needed",
                    report.resync_needed.len()
                )
            } else {
                "clean start".to_string()
            }
        );
        // A reader that stopped after the first line must not kill the
        // daemon: a closed stdout is ignored.
        if let Some(addr) = metrics {
            let _ = writeln!(std::io::stdout(), "metrics on http://{addr}/metrics");
        }
        if let Some(device) = frontends.ublk {
            let _ = writeln!(
                std::io::stdout(),
                "ublk {} ({})",
                device.device().display(),
                if device.recovered() {
                    "took over a kept device"
                } else {
                    "new device"
                }
            );
        }
        if let Some(device) = frontends.attached {
            let _ = writeln!(
                std::io::stdout(),
                "attached {} ({})",
                device.device().display(),
                if device.readopted() {
                    "re-adopted a kept device"
                } else {
                    "new connection"
                }
            );
        }
        let _ = std::io::stdout().flush();
        crate::notify_ready();
        if let Some(start) = schedule {
            start();
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn status(a: ControlArgs) -> Result<ExitCode> {
    let s = tidemark_control::status(&a.control_socket, std::time::Duration::from_secs(60))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "group {}: tracking {}{}, generation {}, sequence {} (durable {}), log {} of {} bytes, {} writes, {} barriers",
        s.group,
        s.tracking,
        s.bitmap_reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
        s.generation,
        s.next_seq.prev().unwrap_or(Seq::ZERO),
        s.durable_seq,
        s.log_bytes,
        s.log_limit,
        s.writes,
        s.barriers
    );
    for d in &s.disks {
        println!(
            "  disk {}: {} bytes, {} mode, {} hot extents, {} dirty extents",
            d.name, d.size, d.tracking, d.hot_extents, d.dirty_extents
        );
    }
    Ok(ExitCode::SUCCESS)
}
