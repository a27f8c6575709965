//! The tracker daemon: a thin shell that opens the backing devices and the
//! group, serves them over NBD, answers the control socket, and on SIGTERM
//! or SIGINT stops accepting, drains, writes a final barrier and exits
//! clean.

use crate::backend::Backend;
use crate::control::ControlSocket;
use crate::group::{Group, GroupDisk, GroupOptions, OpenReport};
use crate::kernel_attach::{backend_identifier, AttachError, AttachOptions, KernelAttachment};
use crate::kernel_size::KernelDevices;
use crate::server::{DataBudget, Frontend, Server, ServerOptions, DEFAULT_DATA_BUDGET};
use crate::storage::{open_backing, BackingOptions, CacheMode, EngineKind};
use crate::ublk::{UblkDevice, UblkOptions};
use nix::sys::signal::{SigSet, Signal};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_changelog::LogOptions;
use tidemark_changelog::{
    create_private_dir_all, read_cursor, read_sources, write_sources, DirLock, DiskSource, FsDir,
    LockError, Seq,
};
use tidemark_metrics::{labels, Exposition, MetricsThread, Unit};
use tidemark_names::Name;

/// How one disk is protected, from the config or flags: what it is
/// served as and where it lives. Its id is its place in
/// [`TrackerSettings::disks`]; its size is its backing's.
#[derive(Debug, Clone)]
pub struct DiskSettings {
    /// Its name: the receiver files its replica under it.
    pub name: Name,
    /// Its NBD export name.
    pub export: String,
    /// The backing block device or image file.
    pub path: PathBuf,
    /// How it is written; `None`: [`CacheMode::default_for`] its path.
    pub cache: Option<CacheMode>,
}

/// Everything the daemon needs, from a config file or from flags.
#[derive(Debug, Clone)]
pub struct TrackerSettings {
    /// Consistency group name.
    pub group: Name,
    /// The disks, in id order.
    pub disks: Vec<DiskSettings>,
    /// Change log directory.
    pub log_dir: PathBuf,
    /// Log sizes.
    pub log: LogOptions,
    /// NBD unix socket.
    pub socket: PathBuf,
    /// A group (name or numeric gid) the NBD socket is opened to (0660);
    /// `None`: the socket is the tracker's user's only (0600).
    pub socket_group: Option<String>,
    /// Also serve NBD over TCP here (the config allows only loopback unless
    /// remote NBD is explicitly allowed).
    pub tcp_listen: Option<std::net::SocketAddr>,
    /// Control socket.
    pub control_socket: PathBuf,
    /// Bytes per activity-map extent.
    pub activity_extent: u64,
    /// Largest NBD request.
    pub max_block: u32,
    /// Record every byte of every disk as resync-needed at start (see
    /// [`GroupOptions::resync_all`]).
    pub resync_all: bool,
    /// Lock the daemon's memory (no page-in stalls in the I/O path).
    pub mlockall: bool,
    /// How backing devices are opened (engine, O_DIRECT).
    pub backing: BackingOptions,
    /// Serve Prometheus metrics on `GET /metrics` here (port 0 picks one).
    /// `None`: no metrics endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Attach the kernel's NBD client to one of the disks (see
    /// [`crate::kernel_attach`]). `None`: clients connect themselves.
    pub attach: Option<KernelAttachSettings>,
    /// Serve one of the disks to the kernel through ublk (see
    /// [`crate::ublk`]). `None`: no ublk device.
    pub ublk: Option<UblkSettings>,
    /// What an application-consistent span point quiesces (the
    /// `[tracker.app-consistent]` table). `None`: nothing.
    pub app_consistent: Option<crate::quiesce::Quiesce>,
}

/// How the tracker serves a disk as `/dev/ublkbN`.
#[derive(Debug, Clone)]
pub struct UblkSettings {
    /// The disk, by export name; `None`: the first disk.
    pub export: Option<String>,
    /// `Some(n)`: exactly `/dev/ublkbN`; `None`: the driver's choice.
    pub dev_id: Option<u32>,
    /// Requests in flight per queue.
    pub queue_depth: u16,
    /// Hardware queues; `None`: one per CPU.
    pub queues: Option<u16>,
    /// Use the driver's user copy when it has it.
    pub user_copy: bool,
    /// On SIGTERM leave the device, quiesced, for the next tracker.
    pub keep_device: bool,
}

/// How the tracker attaches `/dev/nbdN` itself.
#[derive(Debug, Clone)]
pub struct KernelAttachSettings {
    /// The export to attach; `None`: the first disk's.
    pub export: Option<String>,
    /// `Some(n)`: exactly /dev/nbdN; `None`: the first free device.
    pub index: Option<u32>,
    /// The kernel's per-request timeout.
    pub io_timeout: std::time::Duration,
    /// How long the kernel holds I/O while no tracker serves the device.
    pub dead_connection_timeout: std::time::Duration,
    /// On SIGTERM leave the device configured for the next tracker instead
    /// of disconnecting it.
    pub keep_device: bool,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The change log directory could not be created.
    #[error("creating the change log directory {path}")]
    LogDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another tracker owns the log directory (or it could not be locked).
    #[error(transparent)]
    Locked(#[from] LockError),
    /// Two disks have one name: they would share one export and one
    /// activity map (a configuration fault).
    #[error(
        "disks {} and {} are both called {name:?}: every disk needs its own name \
         (give each --image a --name, or each [[tracker.disk]] its own export-name)",
        first.display(), second.display()
    )]
    DuplicateName {
        /// The name.
        name: Name,
        /// The first disk's path.
        first: PathBuf,
        /// The second disk's path.
        second: PathBuf,
    },
    /// Two disks are one file or device under two paths or names: its
    /// writes would be tracked twice, in two activity maps (a
    /// configuration fault).
    #[error(
        "disks {first:?} ({}) and {second:?} ({}) are the same file: a disk can be protected only once",
        first_path.display(), second_path.display()
    )]
    SameDisk {
        /// The first disk's name.
        first: Name,
        /// Its path.
        first_path: PathBuf,
        /// The second disk's name.
        second: Name,
        /// Its path.
        second_path: PathBuf,
    },
    /// A disk is smaller than the change log records it (it was shrunk):
    /// the log's records and the replica reach beyond its new end.
    #[error(
        "disk {name:?} ({}) is {size} bytes, but its change log records it as {recorded} bytes: \
         a protected disk may not shrink; restore its size, or protect it afresh with a new log directory",
        path.display()
    )]
    Shrunk {
        /// The disk.
        name: Name,
        /// Its path.
        path: PathBuf,
        /// Its size now.
        size: u64,
        /// The size the log records.
        recorded: u64,
    },
    /// The log directory's list of disks could not be read or written.
    #[error("the disks of the change log")]
    Sources(#[source] tidemark_changelog::sources::SourcesError),
    /// `socket-group` names no group of this machine.
    #[error("socket-group {name:?}: no such group")]
    NoSuchGroup {
        /// The group asked for.
        name: String,
        /// The lookup's failure, if it failed rather than found nothing.
        #[source]
        source: Option<nix::Error>,
    },
    /// A backing device could not be opened.
    #[error("disk {name}")]
    Backing {
        /// The disk.
        name: Name,
        /// The cause.
        #[source]
        source: crate::storage::StorageError,
    },
    /// The group could not be opened.
    #[error(transparent)]
    Group(#[from] crate::group::GroupError),
    /// A socket could not be set up.
    #[error("{what} {path}")]
    Socket {
        /// Which socket.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Signals could not be set up.
    #[error("setting up signal handling")]
    Signals(#[source] nix::Error),
    /// The kernel's NBD client could not be attached.
    #[error("attaching the kernel NBD device")]
    Attach(#[source] crate::kernel_attach::AttachError),
    /// The ublk device could not be set up.
    #[error("serving the disk through ublk")]
    Ublk(#[source] crate::ublk::UblkError),
    /// The final barrier or the clean-stop record failed.
    #[error("clean stop failed: {0}")]
    Stop(#[source] crate::group::CloseError),
}

/// Asks the kernel to treat this process as part of the I/O path
/// (`PR_SET_IO_FLUSHER`, Linux 5.6+), so memory reclaim does not wait on
/// I/O that only this process can complete. Needs CAP_SYS_RESOURCE.
fn set_io_flusher() {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; no memory is passed.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc == 0 {
        tracing::info!("PR_SET_IO_FLUSHER set: reclaim will not deadlock on our I/O");
    } else {
        let err = std::io::Error::last_os_error();
        tracing::warn!(
            error = %err,
            "PR_SET_IO_FLUSHER not permitted (needs CAP_SYS_RESOURCE and Linux 5.6+): under memory pressure the kernel may wait on I/O this process must complete"
        );
    }
}

fn lock_memory() {
    // SAFETY: mlockall takes flags only.
    let rc = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) };
    if rc == 0 {
        tracing::info!("memory locked (mlockall)");
    } else {
        tracing::warn!(error = %std::io::Error::last_os_error(), "mlockall failed; continuing unlocked");
    }
}

/// Periodic work off the I/O path: return from bitmap mode to data mode
/// once the shipper has freed room in the log.
struct Maintenance {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn spawn_maintenance(group: Arc<Group>) -> Maintenance {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("maintenance".into())
        .spawn(move || {
            let mut last_try = std::time::Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if last_try.elapsed() < RESUME_INTERVAL {
                    continue;
                }
                last_try = std::time::Instant::now();
                match group.try_resume_data_mode() {
                    Ok(Some(extents)) => tracing::info!(
                        extents,
                        "back in data mode: dirty extents recorded as resync-needed"
                    ),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot leave bitmap mode yet"),
                }
            }
        })
        .ok();
    Maintenance { stop, thread }
}

/// How often bitmap mode checks whether the log has room again.
const RESUME_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The states `tidemark_tracker_tracking_state` can show.
const TRACKING_STATES: &[&str] = &["data", "bitmap"];

/// The tracker's metrics, read from the group on each scrape: the status
/// snapshot, the write latency histogram and the log's durable cursor.
fn collect_metrics(group: &Group, name: &str, host: &str, log_dir: &Path) -> Exposition {
    let s = group.status();
    let mut e = Exposition::new();
    let g = labels(&[("host", host), ("group", name)]);
    for (id, disk) in group.disk_names().iter().enumerate() {
        let d = labels(&[("host", host), ("group", name), ("disk", disk)]);
        e.state_set(
            "tidemark_tracker_tracking_state",
            "How writes to the disk are tracked: data (every write in the change log) or bitmap (dirty extents only; a resync follows).",
            &d,
            TRACKING_STATES,
            s.mode.name(),
        );
        let hot = s.hot_extents.get(id).copied().unwrap_or(0);
        e.gauge(
            "tidemark_tracker_hot_extents",
            "Activity-map extents that may hold writes not yet durable in the log.",
            None,
            &d,
            hot as f64,
        );
        let dirty = s.dirty_extents.get(id).copied().unwrap_or(0);
        e.gauge(
            "tidemark_tracker_dirty_extents",
            "Dirty-bitmap extents waiting for a resync (bitmap mode).",
            None,
            &d,
            dirty as f64,
        );
    }
    e.gauge(
        "tidemark_tracker_log_fill",
        "Fraction of the change log's size limit its segments occupy.",
        Some(Unit::Ratio),
        &g,
        fill_ratio(s.log_bytes, s.log_limit),
    );
    e.gauge(
        "tidemark_tracker_log_size",
        "Bytes the change log's segments occupy.",
        Some(Unit::Bytes),
        &g,
        s.log_bytes as f64,
    );
    e.gauge(
        "tidemark_tracker_log_limit",
        "The change log's size limit.",
        Some(Unit::Bytes),
        &g,
        s.log_limit as f64,
    );
    // The cursor is what the replica site holds durably; unreadable (no
    // shipper yet) counts as nothing shipped.
    let cursor = FsDir::existing(log_dir)
        .ok()
        .and_then(|d| read_cursor(&d).ok())
        .unwrap_or(Seq::ZERO);
    e.gauge(
        "tidemark_tracker_pending_records",
        "Log records not yet durable at the replica site (newest sequence number minus the shipper's cursor).",
        None,
        &g,
        pending_records(s.next_seq, cursor) as f64,
    );
    e.gauge(
        "tidemark_tracker_generation",
        "The group's generation (raised after every unclean stop).",
        None,
        &g,
        f64::from(s.generation),
    );
    e.counter(
        "tidemark_tracker_written",
        "Bytes of acknowledged write requests.",
        Some(Unit::Bytes),
        &g,
        s.bytes_written,
    );
    e.counter(
        "tidemark_tracker_writes",
        "Acknowledged writes, write-zeroes and trims.",
        None,
        &g,
        s.writes,
    );
    e.counter(
        "tidemark_tracker_barriers",
        "Barriers (FLUSH and FUA) made durable.",
        None,
        &g,
        s.barriers,
    );
    e.histogram(
        "tidemark_tracker_write_latency",
        "Time from a write request reaching the tracker to its acknowledgement (FUA included).",
        Some(Unit::Seconds),
        &g,
        group.write_latency(),
    );
    e
}

/// Log fill as a ratio; 0 for a log without a limit.
fn fill_ratio(bytes: u64, limit: u64) -> f64 {
    if limit == 0 {
        0.0
    } else {
        bytes as f64 / limit as f64
    }
}

/// Records after the cursor: the newest record is the one before
/// `next_seq` (none before the first).
fn pending_records(next_seq: Seq, cursor: Seq) -> u64 {
    next_seq.saturating_prev().since(cursor).unwrap_or(0)
}

/// Runs the tracker until SIGTERM or SIGINT. `ready` is called once the
/// NBD socket accepts connections, with what opening the group found, the
/// address of the metrics endpoint (`None`: none was asked for, or its
/// address could not be bound; the tracker runs on without it) and the
/// kernel device the tracker attached, if asked to.
pub fn run(
    settings: TrackerSettings,
    ready: impl FnOnce(&OpenReport, Option<std::net::SocketAddr>, Frontends<'_>),
) -> Result<(), DaemonError> {
    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and only the wait below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(DaemonError::Signals)?;

    // One tracker per log directory (DESIGN invariant 9): the lock comes
    // before anything in the directory is read or written.
    create_private_dir_all(&settings.log_dir).map_err(|source| DaemonError::LogDir {
        path: settings.log_dir.clone(),
        source,
    })?;
    let _lock = DirLock::acquire(&settings.log_dir, LOCK_FILE, "tracker")?;
    let socket_group = settings
        .socket_group
        .as_deref()
        .map(resolve_group)
        .transpose()?;
    check_names(&settings.disks)?;

    set_io_flusher();
    if settings.mlockall {
        lock_memory();
    }
    let mut disks = Vec::new();
    // The event loops submit reads, writes and flushes on their own rings;
    // what they hand back to the device object (unaligned requests,
    // zeroing, trims) is done on the loop's thread, synchronously: the
    // synchronous engine is all the device object needs.
    for spec in &settings.disks {
        let cache = spec
            .cache
            .unwrap_or_else(|| CacheMode::default_for(&spec.path));
        let backing = BackingOptions {
            engine: EngineKind::Sync,
            direct_io: cache.direct_io(),
            ..settings.backing.clone()
        };
        tracing::info!(disk = %spec.name, cache = cache.name(), "cache mode");
        let device = open_backing(&spec.path, &backing).map_err(|source| DaemonError::Backing {
            name: spec.name.clone(),
            source,
        })?;
        tracing::info!(disk = %spec.name, path = %spec.path.display(), size = device.size(), "backing device opened");
        disks.push(GroupDisk {
            name: spec.name.clone(),
            export: spec.export.clone(),
            device,
        });
    }
    check_distinct_disks(&settings.disks)?;
    let sizes: Vec<u64> = disks.iter().map(|d| d.device.size()).collect();
    check_no_shrink(&settings.log_dir, &settings.disks, &sizes)?;
    let (group, report) = Group::open(
        disks,
        GroupOptions {
            log_dir: settings.log_dir.clone(),
            log: settings.log,
            activity_extent: settings.activity_extent,
            max_block: settings.max_block,
            resync_all: settings.resync_all,
        },
    )?;
    for &(id, before, size) in &report.grown {
        tracing::info!(
            disk = %id,
            before,
            size,
            "the disk grew since the last start: served at its new size, the growth recorded in the change log"
        );
    }
    if settings.resync_all {
        tracing::warn!(
            generation = report.generation,
            "--resync-all: every byte recorded as resync-needed; the replica is compared block by block"
        );
    } else if report.unclean {
        tracing::warn!(
            generation = report.generation,
            extents = report.resync_needed.len(),
            "the previous run did not stop cleanly: hot extents recorded as resync-needed"
        );
    }
    // The group's disks are in the configuration's order; the file lists
    // them by id.
    let mut sources: Vec<DiskSource> = settings
        .disks
        .iter()
        .zip(Backend::disks(&group))
        .map(|(spec, served)| DiskSource {
            disk: served.disk,
            path: std::fs::canonicalize(&spec.path).unwrap_or_else(|_| spec.path.clone()),
        })
        .collect();
    sources.sort_by_key(|s| s.disk.id);
    write_sources(&settings.log_dir, &sources).map_err(DaemonError::Sources)?;
    let group = Arc::new(group);
    // Everything that can still refuse the start comes before the group is
    // marked running: a refused start leaves the state file saying stopped.
    // One data budget for every frontend: the NBD sockets and the ublk
    // queues together bound the tracker's memory.
    let budget = DataBudget::new(DEFAULT_DATA_BUDGET);
    let server_options = ServerOptions {
        socket_group,
        budget: Arc::clone(&budget),
        ..ServerOptions::default()
    };
    let server = Server::bind_unix(&settings.socket, server_options).map_err(|source| {
        DaemonError::Socket {
            what: "NBD socket",
            path: settings.socket.clone(),
            source,
        }
    })?;
    let tcp = match settings.tcp_listen {
        Some(addr) => Some(
            Server::bind_tcp(
                addr,
                ServerOptions {
                    budget: Arc::clone(&budget),
                    ..ServerOptions::default()
                },
            )
            .map_err(|source| DaemonError::Socket {
                what: "NBD TCP listener",
                path: PathBuf::from(addr.to_string()),
                source,
            })?,
        ),
        None => None,
    };
    // Serves at once, but refuses markers and resyncs until the group runs.
    // The kernel devices a resize tells, added once they are up.
    let kernel_devices = KernelDevices::new();
    let control = ControlSocket::start_with(
        &settings.control_socket,
        settings.group.to_string(),
        group.clone(),
        settings.app_consistent.clone(),
        kernel_devices.clone(),
    )
    .map_err(|source| DaemonError::Socket {
        what: "control socket",
        path: settings.control_socket.clone(),
        source,
    })?;
    if let Err(e) = group.mark_running() {
        control.stop();
        return Err(DaemonError::Group(e.into()));
    }
    let maintenance = spawn_maintenance(group.clone());
    let use_ring = settings.backing.engine != EngineKind::Sync;
    let handle = server.serve_frontend(Frontend::group(group.clone(), use_ring));
    let tcp_handle = tcp.map(|server| {
        tracing::info!(addr = ?server.addr(), "serving NBD over TCP too");
        server.serve_frontend(Frontend::group(group.clone(), use_ring))
    });
    // Metrics are an observer: a port taken by something else must not
    // keep the disks unprotected, so failing to bind is a warning.
    let metrics = settings.metrics_listen.and_then(|addr| {
        let host = tidemark_metrics::local_host_name();
        let (group, name, log_dir) = (
            group.clone(),
            settings.group.clone(),
            settings.log_dir.clone(),
        );
        let render: tidemark_metrics::Render =
            Arc::new(move || collect_metrics(&group, &name, &host, &log_dir));
        match MetricsThread::spawn(addr, render) {
            Ok(m) => {
                tracing::info!(addr = %m.local_addr(), "serving metrics on /metrics");
                Some(m)
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot serve metrics; running without them");
                None
            }
        }
    });
    let serving = Serving {
        handle,
        tcp_handle,
        control,
        metrics,
        maintenance,
        group: group.clone(),
    };
    // From here on clients may have written: a failure still stops
    // cleanly, with a final barrier, so the state file tells the truth.
    let attachment = match &settings.attach {
        Some(attach) => match attach_kernel(&settings, attach, &serving.handle) {
            Ok(attachment) => Some(attachment),
            Err(e) => return serving.stop_after(e),
        },
        None => None,
    };
    let ublk = match &settings.ublk {
        Some(ublk) => match start_ublk(&settings, ublk, &group, use_ring, &budget) {
            Ok(device) => Some(device),
            Err(e) => {
                if let Some(attachment) = attachment {
                    if let Err(error) = attachment.detach() {
                        tracing::warn!(error = %error, "detaching the kernel NBD device failed");
                    }
                }
                return serving.stop_after(e);
            }
        },
        None => None,
    };
    if let Some(attachment) = &attachment {
        let export = attached_export(&settings, settings.attach.as_ref());
        let disk = Backend::disks(group.as_ref())
            .into_iter()
            .find(|d| Some(&d.export) == export.as_ref())
            .map(|d| d.disk.id);
        if let Some(disk) = disk {
            kernel_devices.add(attachment.kernel_device(disk));
        }
    }
    if let Some(ublk) = &ublk {
        kernel_devices.add(ublk.kernel_device());
    }
    tracing::info!(socket = %settings.socket.display(), "serving");
    ready(
        &report,
        serving.metrics.as_ref().map(MetricsThread::local_addr),
        Frontends {
            attached: attachment.as_ref(),
            ublk: ublk.as_ref(),
        },
    );

    let signal = signals.wait().map_err(DaemonError::Signals)?;
    tracing::info!(
        ?signal,
        "stopping: no new connections, draining requests in flight"
    );
    // A resize from here on tells no device that is going away.
    kernel_devices.clear();
    // Detach before the server stops, so the kernel's disconnect reaches a
    // live connection; or leave the device for the next tracker.
    if let Some(attachment) = attachment {
        let keep = settings.attach.as_ref().is_some_and(|a| a.keep_device);
        if keep {
            attachment.keep();
        } else if let Err(error) = attachment.detach() {
            tracing::warn!(error = %error, "detaching the kernel NBD device failed");
        }
    }
    if let Some(ublk) = ublk {
        let mut keep = settings.ublk.as_ref().is_some_and(|u| u.keep_device);
        if !keep && ublk.in_use() {
            tracing::warn!(
                device = %ublk.device().display(),
                "the device is in use (mounted?): kept for the next tracker instead of removed; its I/O waits until one takes it over (or `tidemark ublk remove`)"
            );
            keep = true;
        }
        let outcome = if keep { ublk.keep() } else { ublk.remove() };
        if let Err(error) = outcome {
            tracing::warn!(error = %error, "stopping the ublk device failed");
        }
    }
    serving.stop()?;
    tracing::info!("stopped cleanly: final barrier written");
    Ok(())
}

/// The tracker's lock file in its log directory.
pub const LOCK_FILE: &str = "tracker.lock";

/// What runs once the group is marked running, stopped together.
struct Serving {
    handle: crate::server::ServerHandle,
    tcp_handle: Option<crate::server::ServerHandle>,
    control: ControlSocket,
    metrics: Option<MetricsThread>,
    maintenance: Maintenance,
    group: Arc<Group>,
}

impl Serving {
    /// Stops accepting, drains requests in flight, writes the final
    /// barrier and records a clean stop.
    fn stop(self) -> Result<(), DaemonError> {
        self.handle.shutdown();
        if let Some(tcp) = self.tcp_handle {
            tcp.shutdown();
        }
        self.control.stop();
        drop(self.metrics);
        drop(self.maintenance);
        self.group.close_clean().map_err(DaemonError::Stop)
    }

    /// Stops as [`stop`](Self::stop) does after `cause` refused the start
    /// late, and returns `cause` (a failed stop is logged).
    fn stop_after(self, cause: DaemonError) -> Result<(), DaemonError> {
        if let Err(error) = self.stop() {
            tracing::error!(%error, "stopping after a refused start failed");
        }
        Err(cause)
    }
}

/// The gid of `socket-group`: a group name, or a number.
fn resolve_group(name: &str) -> Result<u32, DaemonError> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(DaemonError::NoSuchGroup {
            name: name.to_owned(),
            source: None,
        }),
        Err(e) => Err(DaemonError::NoSuchGroup {
            name: name.to_owned(),
            source: Some(e),
        }),
    }
}

/// Refuses two disks with one name: they would be one export, and share
/// one activity map and one dirty bitmap (files named after the disk).
fn check_names(disks: &[DiskSettings]) -> Result<(), DaemonError> {
    for (i, disk) in disks.iter().enumerate() {
        if let Some(first) = disks[..i].iter().find(|d| d.name == disk.name) {
            return Err(DaemonError::DuplicateName {
                name: disk.name.clone(),
                first: first.path.clone(),
                second: disk.path.clone(),
            });
        }
    }
    Ok(())
}

/// What a disk is on this machine, whatever path names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskIdentity {
    /// A block device, by its device number (two device nodes of one
    /// device are one disk).
    Block(u64),
    /// A file, by its filesystem's device and its inode.
    File(u64, u64),
}

impl DiskIdentity {
    fn of(path: &Path) -> std::io::Result<DiskIdentity> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let meta = std::fs::metadata(path)?;
        Ok(if meta.file_type().is_block_device() {
            DiskIdentity::Block(meta.rdev())
        } else {
            DiskIdentity::File(meta.dev(), meta.ino())
        })
    }
}

/// Refuses one file or device given twice (the same path, another path to
/// it, another device node of it). Called once every disk has opened, so
/// each path can be looked at.
fn check_distinct_disks(disks: &[DiskSettings]) -> Result<(), DaemonError> {
    let mut seen: Vec<(DiskIdentity, &DiskSettings)> = Vec::new();
    for disk in disks {
        let identity = DiskIdentity::of(&disk.path).map_err(|source| DaemonError::Backing {
            name: disk.name.clone(),
            source: crate::storage::StorageError::Open {
                path: disk.path.clone(),
                source,
            },
        })?;
        if let Some((_, first)) = seen.iter().find(|(id, _)| *id == identity) {
            return Err(DaemonError::SameDisk {
                first: first.name.clone(),
                first_path: first.path.clone(),
                second: disk.name.clone(),
                second_path: disk.path.clone(),
            });
        }
        seen.push((identity, disk));
    }
    Ok(())
}

/// Refuses a disk smaller than the size the log directory records for it
/// (by id, when the name there is the same): the log's records and the
/// replica reach beyond its end, and the replica keeps the recorded size.
fn check_no_shrink(
    log_dir: &Path,
    disks: &[DiskSettings],
    sizes: &[u64],
) -> Result<(), DaemonError> {
    let Some(recorded) = read_sources(log_dir).map_err(DaemonError::Sources)? else {
        return Ok(());
    };
    for (disk, &size) in disks.iter().zip(sizes) {
        let Some(was) = recorded.iter().find(|r| r.disk.name == disk.name) else {
            continue;
        };
        if size < was.disk.size {
            return Err(DaemonError::Shrunk {
                name: disk.name.clone(),
                path: disk.path.clone(),
                size,
                recorded: was.disk.size,
            });
        }
    }
    Ok(())
}

/// The kernel devices the tracker serves, for the `ready` callback.
#[derive(Clone, Copy)]
pub struct Frontends<'a> {
    /// The `/dev/nbdN` the tracker attached, if asked to.
    pub attached: Option<&'a KernelAttachment>,
    /// The `/dev/ublkbN` it serves, if asked to.
    pub ublk: Option<&'a UblkDevice>,
}

/// Creates (or takes over) the ublk device for `ublk`.
fn start_ublk(
    settings: &TrackerSettings,
    ublk: &UblkSettings,
    group: &Arc<Group>,
    use_ring: bool,
    budget: &Arc<DataBudget>,
) -> Result<UblkDevice, DaemonError> {
    let index = match &ublk.export {
        Some(export) => settings
            .disks
            .iter()
            .position(|d| &d.export == export)
            .ok_or_else(|| DaemonError::Attach(AttachError::NoSuchExport(export.clone())))?,
        None => 0,
    };
    // The export name, as the identity always was: a device kept across a
    // restart is found by it.
    let export = &settings.disks[index].export;
    // The group's disks are in the configuration's order.
    let disk = &Backend::disks(group.as_ref())[index].disk;
    let options = UblkOptions {
        identity: backend_identifier(&settings.group, export),
        disk: disk.id,
        size: disk.size,
        dev_id: ublk.dev_id,
        queue_depth: ublk.queue_depth,
        queues: ublk.queues,
        user_copy: ublk.user_copy,
    };
    // The same write path as an NBD connection's, one core per queue.
    let frontend = Arc::new(Frontend::group(Arc::clone(group), use_ring));
    UblkDevice::start(frontend, Arc::clone(budget), &options).map_err(DaemonError::Ublk)
}

/// The export `attach` attaches: the configured one, else the first disk's.
fn attached_export(
    settings: &TrackerSettings,
    attach: Option<&KernelAttachSettings>,
) -> Option<String> {
    match attach.and_then(|a| a.export.as_ref()) {
        Some(export) => Some(export.clone()),
        None => settings.disks.first().map(|d| d.export.clone()),
    }
}

/// Attaches (or re-adopts) the kernel device for `attach`.
fn attach_kernel(
    settings: &TrackerSettings,
    attach: &KernelAttachSettings,
    server: &crate::server::ServerHandle,
) -> Result<KernelAttachment, DaemonError> {
    let export = attached_export(settings, Some(attach))
        .ok_or_else(|| DaemonError::Attach(AttachError::NoSuchExport(String::new())))?;
    let options = AttachOptions {
        backend: backend_identifier(&settings.group, &export),
        export,
        index: attach.index,
        io_timeout: attach.io_timeout,
        dead_connection_timeout: attach.dead_connection_timeout,
        max_request: settings.max_block,
    };
    KernelAttachment::attach(server, &options).map_err(DaemonError::Attach)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_ratio_and_pending_records_stay_sane() {
        assert_eq!(fill_ratio(0, 0), 0.0);
        assert_eq!(fill_ratio(1 << 20, 4 << 20), 0.25);
        let p = |next: u64, cursor: u64| pending_records(Seq(next), Seq(cursor));
        assert_eq!(p(1, 0), 0, "an empty log has nothing pending");
        assert_eq!(p(11, 4), 6);
        assert_eq!(p(11, 10), 0);
        // A cursor ahead of the log (a new generation began after it was
        // read) is not a negative backlog.
        assert_eq!(p(5, 100), 0);
        assert_eq!(p(0, 0), 0);
    }
}
