//! The tracker daemon: a thin shell that opens the backing devices and the
//! group, serves them over NBD, answers the control socket, and on SIGTERM
//! or SIGINT stops accepting, drains, writes a final barrier and exits
//! clean.

use crate::backend::Backend;
use crate::control::ControlSocket;
use crate::group::{Group, GroupDisk, GroupOptions, OpenReport};
use crate::server::{Server, ServerOptions};
use crate::storage::{open_backing, BackingOptions};
use nix::sys::signal::{SigSet, Signal};
use std::path::PathBuf;
use std::sync::Arc;
use tidemark_changelog::LogOptions;
use tidemark_changelog::{write_sources, DiskSource};

/// One disk to protect.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Its name, also the NBD export name.
    pub name: String,
    /// The backing block device or image file.
    pub path: PathBuf,
}

/// Everything the daemon needs, from a config file or from flags.
#[derive(Debug, Clone)]
pub struct TrackerSettings {
    /// Consistency group name.
    pub group: String,
    /// The disks, in id order.
    pub disks: Vec<DiskSpec>,
    /// Change log directory.
    pub log_dir: PathBuf,
    /// Log sizes.
    pub log: LogOptions,
    /// NBD unix socket.
    pub socket: PathBuf,
    /// Also serve NBD over TCP here (the config allows only loopback unless
    /// remote NBD is explicitly allowed).
    pub tcp_listen: Option<std::net::SocketAddr>,
    /// Control socket.
    pub control_socket: PathBuf,
    /// Bytes per activity-map extent.
    pub activity_extent: u64,
    /// Largest NBD request.
    pub max_block: u32,
    /// Lock the daemon's memory (no page-in stalls in the I/O path).
    pub mlockall: bool,
    /// How backing devices are opened (engine, O_DIRECT).
    pub backing: BackingOptions,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A backing device could not be opened.
    #[error("disk {name}")]
    Backing {
        /// The disk.
        name: String,
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
    /// The final barrier or the clean-stop record failed.
    #[error("clean stop failed: {0}")]
    Stop(String),
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

/// Runs the tracker until SIGTERM or SIGINT. `ready` is called once the
/// NBD socket accepts connections, with what opening the group found.
pub fn run(settings: TrackerSettings, ready: impl FnOnce(&OpenReport)) -> Result<(), DaemonError> {
    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and only the wait below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.thread_block().map_err(DaemonError::Signals)?;

    set_io_flusher();
    if settings.mlockall {
        lock_memory();
    }
    let mut disks = Vec::new();
    for spec in &settings.disks {
        let device =
            open_backing(&spec.path, &settings.backing).map_err(|source| DaemonError::Backing {
                name: spec.name.clone(),
                source,
            })?;
        tracing::info!(disk = %spec.name, path = %spec.path.display(), size = device.size(), "backing device opened");
        disks.push(GroupDisk {
            name: spec.name.clone(),
            device,
        });
    }
    let (group, report) = Group::open(
        disks,
        GroupOptions {
            log_dir: settings.log_dir.clone(),
            log: settings.log,
            activity_extent: settings.activity_extent,
            max_block: settings.max_block,
        },
    )?;
    if report.unclean {
        tracing::warn!(
            generation = report.generation,
            extents = report.resync_needed.len(),
            "the previous run did not stop cleanly: hot extents recorded as resync-needed"
        );
    }
    let sources: Vec<DiskSource> = settings
        .disks
        .iter()
        .zip(group.disk_sizes())
        .enumerate()
        .map(|(id, (spec, size))| DiskSource {
            id: id as u32,
            name: spec.name.clone(),
            size,
            path: std::fs::canonicalize(&spec.path).unwrap_or_else(|_| spec.path.clone()),
        })
        .collect();
    write_sources(&settings.log_dir, &sources).map_err(|e| DaemonError::Stop(e.to_string()))?;
    let group = Arc::new(group);
    let maintenance = spawn_maintenance(group.clone());
    let control = ControlSocket::start(
        &settings.control_socket,
        settings.group.clone(),
        group.clone(),
    )
    .map_err(|source| DaemonError::Socket {
        what: "control socket",
        path: settings.control_socket.clone(),
        source,
    })?;
    let backend: Arc<dyn Backend> = group.clone();
    let server =
        Server::bind_unix(&settings.socket, ServerOptions::default()).map_err(|source| {
            DaemonError::Socket {
                what: "NBD socket",
                path: settings.socket.clone(),
                source,
            }
        })?;
    let tcp =
        match settings.tcp_listen {
            Some(addr) => Some(Server::bind_tcp(addr, ServerOptions::default()).map_err(
                |source| DaemonError::Socket {
                    what: "NBD TCP listener",
                    path: PathBuf::from(addr.to_string()),
                    source,
                },
            )?),
            None => None,
        };
    let handle = server.serve(backend.clone());
    let tcp_handle = tcp.map(|server| {
        tracing::info!(addr = ?server.addr(), "serving NBD over TCP too");
        server.serve(backend)
    });
    tracing::info!(socket = %settings.socket.display(), "serving");
    ready(&report);

    let signal = signals.wait().map_err(DaemonError::Signals)?;
    tracing::info!(
        ?signal,
        "stopping: no new connections, draining requests in flight"
    );
    handle.shutdown();
    if let Some(tcp) = tcp_handle {
        tcp.shutdown();
    }
    control.stop();
    drop(maintenance);
    group.close_clean().map_err(DaemonError::Stop)?;
    tracing::info!("stopped cleanly: final barrier written");
    Ok(())
}
