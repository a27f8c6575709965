//! Serving a disk to the kernel through ublk (`/dev/ublkbN`): the same
//! group, log and invariants as the NBD frontend, with requests arriving
//! as io_uring commands instead of over a socket. `tidemark tracker serve
//! --ublk` / `[tracker.ublk]`; NBD stays the default.
//!
//! # Why in-house and not libublk
//!
//! The ublk ABI the tracker needs is small (a dozen commands, four
//! structures; `sys`), and the io_uring crate already in the tracker issues
//! `URING_CMD`s. libublk generates its bindings with bindgen at build
//! time, which needs libclang on every build machine (the same reason the
//! device-mapper code uses the ioctls directly), and brings its own
//! executor and queue model; the tracker's backend is synchronous and its
//! recovery rules (below) are its own. Written here it is ~1,800 lines
//! with its unit tests, against the kernel's uapi header, and tested in a
//! real kernel.
//!
//! # Starting
//!
//! `ADD_DEV` (one queue, `queue-depth` tags, 1 MiB requests; the
//! tracker's identity of the device — a hash of `tidemark:<group>:<export>`
//! — in the driver's free `ublksrv_flags` field), `SET_PARAMS` (size, 4 KiB
//! blocks, volatile cache + FUA so the kernel sends FLUSH and FUA, discard
//! and write-zeroes), the queue thread fetches every tag, `START_DEV`
//! creates `/dev/ublkbN`.
//!
//! # User recovery
//!
//! Devices are created with `UBLK_F_USER_RECOVERY` and
//! `UBLK_F_USER_RECOVERY_REISSUE` when the driver has them: when the
//! tracker dies (or stops with `keep-device`) the driver quiesces the
//! device, holds new I/O, and re-issues the requests the tracker had not
//! completed. The next tracker finds its device by the identity above,
//! checks its size, and takes it over with `START_USER_RECOVERY`, fetches,
//! `END_USER_RECOVERY`: the held I/O goes on and nothing fails. A request
//! performed twice (written and logged, then re-issued because its
//! completion never reached the driver) is harmless: the log holds the
//! same write twice, in order.
//!
//! # Stopping
//!
//! [`UblkDevice::remove`]: `STOP_DEV` (the driver completes what is in
//! flight, removes `/dev/ublkbN` and aborts the fetches), the queue ends,
//! `DEL_DEV`. The daemon keeps a device that is in use (mounted) instead of
//! removing it under its user. [`UblkDevice::keep`]: the queue finishes what its workers hold
//! and closes; the device stays, quiesced, for the next tracker.

pub mod control;
mod queue;
pub mod sys;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use control::Control;
use queue::{Queue, QueueSpec};
use sys::DevInfo;

/// Bytes per request (and per tag buffer).
pub const MAX_IO_BYTES: u32 = 1 << 20;

/// The block size the device gets.
pub const BLOCK_SIZE: u64 = 4096;

/// How long a new tracker waits for the driver to notice that the old one
/// is gone (its char device closed, the device quiesced).
const RECOVERY_PATIENCE: Duration = Duration::from_secs(5);

/// What to serve, and how.
#[derive(Debug, Clone)]
pub struct UblkOptions {
    /// `tidemark:<group>:<export>`: who the device belongs to.
    pub identity: String,
    /// The backend's disk id.
    pub disk: u32,
    /// The disk's size in bytes.
    pub size: u64,
    /// `Some(n)`: exactly `/dev/ublkbN`; `None`: the driver's choice (or
    /// the device a previous tracker left).
    pub dev_id: Option<u32>,
    /// Tags (requests in flight).
    pub queue_depth: u16,
    /// Threads performing requests.
    pub workers: usize,
}

/// Why the ublk device could not be set up, recovered or removed.
#[derive(Debug, thiserror::Error)]
pub enum UblkError {
    /// No `/dev/ublk-control`.
    #[error("the kernel has no ublk (/dev/ublk-control is missing): load the ublk_drv module (modprobe ublk_drv, Linux 6.0+), or serve over NBD")]
    NoDriver,
    /// Not privileged.
    #[error("creating ublk devices needs CAP_SYS_ADMIN: run the tracker as root")]
    PermissionDenied,
    /// The disk's size is not a whole number of blocks.
    #[error("the disk's size {size} is not a multiple of {BLOCK_SIZE} bytes")]
    Unaligned {
        /// The size.
        size: u64,
    },
    /// The requested device number belongs to another device.
    #[error(
        "/dev/ublkb{dev_id} exists and is not this disk's; choose another id or leave it unset"
    )]
    DeviceBusy {
        /// The device.
        dev_id: u32,
    },
    /// A live tracker serves the device.
    #[error(
        "/dev/ublkb{dev_id} is served by a live process (pid {pid}); is another tracker running?"
    )]
    StillServed {
        /// The device.
        dev_id: u32,
        /// The server.
        pid: i32,
    },
    /// A kept device has another size than the disk now.
    #[error("the kept /dev/ublkb{dev_id} has {device} bytes but the disk has {disk}: remove it first (tidemark ublk remove {dev_id})")]
    SizeMismatch {
        /// The device.
        dev_id: u32,
        /// Its size.
        device: u64,
        /// The disk's.
        disk: u64,
    },
    /// A driver command failed.
    #[error("ublk {what}")]
    Kernel {
        /// What was done.
        what: String,
        /// The driver's answer.
        #[source]
        source: std::io::Error,
    },
}

fn kernel(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UblkError {
    let what = what.into();
    move |source| {
        if source.raw_os_error() == Some(libc::EPERM) {
            UblkError::PermissionDenied
        } else {
            UblkError::Kernel { what, source }
        }
    }
}

/// The value the tracker stores in the driver's `ublksrv_flags` to know its
/// device again: the first 8 bytes of BLAKE3 of the identity.
pub fn identity_tag(identity: &str) -> u64 {
    let hash = blake3::hash(identity.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    // Never 0: a device made by another server leaves the field 0.
    u64::from_le_bytes(first).max(1)
}

/// A served ublk device.
pub struct UblkDevice {
    dev_id: u32,
    recovered: bool,
    recoverable: bool,
    control: Control,
    queue: Queue,
}

impl UblkDevice {
    /// Creates the device, or takes over the one a previous tracker left.
    pub fn start(backend: Arc<dyn Backend>, options: &UblkOptions) -> Result<Self, UblkError> {
        if options.size % BLOCK_SIZE != 0 || options.size == 0 {
            return Err(UblkError::Unaligned { size: options.size });
        }
        let mut control = Control::open().map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => UblkError::NoDriver,
            _ => kernel("opening /dev/ublk-control")(e),
        })?;
        let tag = identity_tag(&options.identity);
        if let Some(found) = find_device(&mut control, tag, options.dev_id)? {
            return Self::recover(control, backend, options, found);
        }
        Self::create(control, backend, options, tag)
    }

    fn queue_spec(dev_id: u32, options: &UblkOptions) -> QueueSpec {
        QueueSpec {
            dev_id,
            depth: options.queue_depth,
            buf_bytes: MAX_IO_BYTES as usize,
            disk: options.disk,
            size: options.size,
            workers: options.workers,
        }
    }

    fn create(
        mut control: Control,
        backend: Arc<dyn Backend>,
        options: &UblkOptions,
        tag: u64,
    ) -> Result<Self, UblkError> {
        // Older drivers lack GET_FEATURES; they lack recovery-reissue too.
        let features = control.features().unwrap_or(0);
        let recovery = sys::flags::USER_RECOVERY | sys::flags::USER_RECOVERY_REISSUE;
        let recoverable = features & recovery == recovery;
        if !recoverable {
            tracing::warn!(
                features,
                "the ublk driver lacks user recovery: a tracker restart will fail the device's I/O"
            );
        }
        let asked = DevInfo {
            nr_hw_queues: 1,
            queue_depth: options.queue_depth,
            max_io_buf_bytes: MAX_IO_BYTES,
            dev_id: options.dev_id.unwrap_or(u32::MAX),
            ublksrv_pid: -1,
            flags: sys::flags::CMD_IOCTL_ENCODE | if recoverable { recovery } else { 0 },
            ublksrv_flags: tag,
            ..DevInfo::default()
        };
        let info = control.add(&asked).map_err(|e| match e.raw_os_error() {
            Some(libc::EEXIST) if options.dev_id.is_some() => UblkError::DeviceBusy {
                dev_id: asked.dev_id,
            },
            _ => kernel("adding a device")(e),
        })?;
        let dev_id = info.dev_id;
        let setup = (|| {
            let sectors_per_io = MAX_IO_BYTES >> 9;
            control
                .set_params(
                    dev_id,
                    &sys::Params {
                        types: sys::param_type::BASIC | sys::param_type::DISCARD,
                        attrs: sys::attr::VOLATILE_CACHE | sys::attr::FUA,
                        logical_bs_shift: 12,
                        physical_bs_shift: 12,
                        io_opt_shift: 12,
                        io_min_shift: 12,
                        max_sectors: sectors_per_io,
                        dev_sectors: options.size >> 9,
                        discard_granularity: BLOCK_SIZE as u32,
                        max_discard_sectors: sectors_per_io,
                        max_write_zeroes_sectors: sectors_per_io,
                        max_discard_segments: 1,
                    },
                )
                .map_err(kernel("setting the device's parameters"))?;
            let queue = Queue::start(backend, Self::queue_spec(dev_id, options))
                .map_err(kernel(format!("starting queue 0 of /dev/ublkc{dev_id}")))?;
            control
                .start(dev_id, std::process::id() as i32)
                .map_err(kernel(format!("starting /dev/ublkb{dev_id}")))?;
            Ok(queue)
        })();
        match setup {
            Ok(queue) => Ok(Self {
                dev_id,
                recovered: false,
                recoverable,
                control,
                queue,
            }),
            Err(e) => {
                // Nothing half made stays behind.
                let _ = control.delete(dev_id);
                Err(e)
            }
        }
    }

    fn recover(
        mut control: Control,
        backend: Arc<dyn Backend>,
        options: &UblkOptions,
        found: DevInfo,
    ) -> Result<Self, UblkError> {
        let dev_id = found.dev_id;
        let size = control
            .size(dev_id)
            .map_err(kernel(format!("reading /dev/ublkb{dev_id}'s parameters")))?;
        if size != options.size {
            return Err(UblkError::SizeMismatch {
                dev_id,
                device: size,
                disk: options.size,
            });
        }
        if found.queue_depth != options.queue_depth {
            tracing::info!(
                kept = found.queue_depth,
                configured = options.queue_depth,
                "the kept device keeps its queue depth"
            );
        }
        // The driver accepts the takeover once the old server's char
        // device is closed and the device quiesced; a moment after a crash.
        let deadline = Instant::now() + RECOVERY_PATIENCE;
        loop {
            match control.start_recovery(dev_id) {
                Ok(()) => break,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => {
                    return Err(kernel(format!(
                        "starting the recovery of /dev/ublkb{dev_id}"
                    ))(e))
                }
            }
        }
        let spec = QueueSpec {
            depth: found.queue_depth,
            ..Self::queue_spec(dev_id, options)
        };
        let queue = Queue::start(backend, spec)
            .map_err(kernel(format!("starting queue 0 of /dev/ublkc{dev_id}")))?;
        control
            .end_recovery(dev_id, std::process::id() as i32)
            .map_err(kernel(format!("ending the recovery of /dev/ublkb{dev_id}")))?;
        Ok(Self {
            dev_id,
            recovered: true,
            recoverable: true,
            control,
            queue,
        })
    }

    /// The block device.
    pub fn device(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    /// The device number.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// Whether this tracker took over a device a previous one left.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Whether the next tracker can take the device over.
    pub fn recoverable(&self) -> bool {
        self.recoverable
    }

    /// Whether something holds the block device exclusively (a mounted
    /// filesystem, a device-mapper table, a RAID member): removing it then
    /// would fail that user's I/O.
    pub fn in_use(&self) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(self.device())
            .is_err_and(|e| e.raw_os_error() == Some(libc::EBUSY))
    }

    /// Stops serving and leaves the device, quiesced, for the next tracker.
    /// Without driver support for recovery the device is removed instead.
    pub fn keep(self) -> Result<(), UblkError> {
        if !self.recoverable {
            tracing::warn!("the ublk driver cannot keep a device without its server: removing it");
            return self.remove();
        }
        let end = self
            .queue
            .leave()
            .map_err(kernel("closing the device's queue"))?;
        tracing::info!(
            device = %format!("/dev/ublkb{}", self.dev_id),
            completed = end.completed,
            left_for_next = end.left,
            "ublk device kept for the next tracker"
        );
        Ok(())
    }

    /// Removes the block device and the ublk device.
    pub fn remove(mut self) -> Result<(), UblkError> {
        let dev_id = self.dev_id;
        self.control
            .stop(dev_id)
            .map_err(kernel(format!("stopping /dev/ublkb{dev_id}")))?;
        let end = self
            .queue
            .join()
            .map_err(kernel("ending the device's queue"))?;
        self.control
            .delete(dev_id)
            .map_err(kernel(format!("deleting ublk device {dev_id}")))?;
        tracing::info!(device = %format!("/dev/ublkb{dev_id}"), completed = end.completed, "ublk device removed");
        Ok(())
    }
}

/// The existing device carrying `tag`: exactly `dev_id` when given (another
/// device there is an error), else any. A device made but never started
/// (a tracker that failed half way) is deleted, not returned.
fn find_device(
    control: &mut Control,
    tag: u64,
    dev_id: Option<u32>,
) -> Result<Option<DevInfo>, UblkError> {
    let candidates = match dev_id {
        Some(id) => vec![id],
        None => existing_ids(),
    };
    for id in candidates {
        let info = match control.info(id) {
            Ok(info) => info,
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => continue,
            Err(e) => return Err(kernel(format!("reading ublk device {id}"))(e)),
        };
        if info.ublksrv_flags != tag {
            if dev_id.is_some() {
                return Err(UblkError::DeviceBusy { dev_id: id });
            }
            continue;
        }
        return match info.state {
            sys::state::DEAD => {
                tracing::warn!(
                    dev_id = id,
                    "removing a ublk device a failed start left behind"
                );
                control
                    .delete(id)
                    .map_err(kernel(format!("deleting ublk device {id}")))?;
                Ok(None)
            }
            sys::state::LIVE if process_alive(info.ublksrv_pid) => Err(UblkError::StillServed {
                dev_id: id,
                pid: info.ublksrv_pid,
            }),
            // Quiesced, or live with its server gone (the driver is still
            // quiescing it): recovery waits for it.
            _ => Ok(Some(info)),
        };
    }
    Ok(None)
}

/// Device numbers of the ublk devices present (`/sys/class/ublk-char`).
pub fn existing_ids() -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir("/sys/class/ublk-char")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("ublkc")?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

fn process_alive(pid: i32) -> bool {
    if pid <= 0 || pid as u32 == std::process::id() {
        return false;
    }
    // SAFETY: signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_tags_are_stable_distinct_and_never_zero() {
        let a = identity_tag("tidemark:g:disk0");
        assert_eq!(a, identity_tag("tidemark:g:disk0"));
        assert_ne!(a, identity_tag("tidemark:g:disk1"));
        assert_ne!(a, 0);
    }
}
