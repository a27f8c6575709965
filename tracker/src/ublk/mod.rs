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
//! executor and queue model; the tracker drives its own sans-IO queue core
//! on the queue's ring, and its recovery rules (below) are its own.
//! Written here it is ~2,000 lines with its unit tests, against the
//! kernel's uapi header, and tested in a real kernel.
//!
//! # Starting
//!
//! `ADD_DEV` (`queues` hardware queues, by default one per CPU;
//! `queue-depth` tags each; 1 MiB requests; user copy when the driver has
//! it; the tracker's identity of the device — a hash of
//! `tidemark:<group>:<export>` — in the driver's free `ublksrv_flags`
//! field), `SET_PARAMS` (size, 4 KiB blocks, volatile cache + FUA so the
//! kernel sends FLUSH and FUA, discard and write-zeroes), then per queue
//! `GET_QUEUE_AFFINITY` and a queue thread pinned to those CPUs that
//! fetches every tag (the `queue` module), and `START_DEV` creates `/dev/ublkbN`.
//!
//! # Memory
//!
//! Request data is bounded by the tracker's data budget, shared with the
//! NBD connections: under user copy each request takes its buffer from it
//! (and waits while it is spent); under driver copy the tags' fixed
//! buffers are sized so that all of them together take at most half of the
//! budget (smaller requests on many queues, at least 4 KiB), and are
//! reserved from it while the device is served.
//!
//! # User recovery
//!
//! Devices are created with `UBLK_F_USER_RECOVERY` and
//! `UBLK_F_USER_RECOVERY_REISSUE` when the driver has them: when the
//! tracker dies (or stops with `keep-device`) the driver quiesces the
//! device, holds new I/O, and re-issues the requests the tracker had not
//! completed. The next tracker finds its device by the identity above,
//! checks its size, and takes it over with `START_USER_RECOVERY`, a fetch
//! of every tag on every queue (the kept device's queue count, depth,
//! request size and copy mode), `END_USER_RECOVERY`: the held I/O goes on
//! and nothing fails. A request
//! performed twice (written and logged, then re-issued because its
//! completion never reached the driver) is harmless: the log holds the
//! same write twice, in order.
//!
//! # Growing
//!
//! When the disk grows while served (`tidemark tracker resize`), the
//! queues first take requests up to the new end, then `UPDATE_SIZE` tells
//! the driver the new size (Linux 6.15+, announced by
//! `UBLK_F_UPDATE_SIZE`; see [`crate::kernel_size`]): the block device's
//! capacity changes under a mounted file system.
//!
//! # Stopping
//!
//! [`UblkDevice::remove`]: `STOP_DEV` (the driver completes what is in
//! flight, removes `/dev/ublkbN` and aborts the fetches), the queue ends,
//! `DEL_DEV`. The daemon keeps a device that is in use (mounted) instead of
//! removing it under its user. [`UblkDevice::keep`]: every queue finishes
//! what its core holds and closes; the device stays, quiesced, for the
//! next tracker.

pub mod control;
mod queue;
pub mod sys;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_changelog::DiskId;

use crate::kernel_size::{GrowError, KernelDevice};
use crate::server::{DataBudget, Frontend};
use control::Control;
use queue::{Queue, QueueEnd, QueueSpec, Shared};
use sys::DevInfo;

/// The largest request (under user copy; under driver copy the tags'
/// buffers may make it smaller, see [`driver_copy_bytes`]).
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
    /// The disk's index in the group.
    pub disk: DiskId,
    /// The disk's size in bytes.
    pub size: u64,
    /// `Some(n)`: exactly `/dev/ublkbN`; `None`: the driver's choice (or
    /// the device a previous tracker left).
    pub dev_id: Option<u32>,
    /// Tags (requests in flight) per queue.
    pub queue_depth: u16,
    /// Hardware queues; `None`: one per CPU. A kept device keeps its own.
    pub queues: Option<u16>,
    /// Use the driver's user copy when it has it (see the module documentation); `false`:
    /// the driver copies into per-tag buffers.
    pub user_copy: bool,
}

/// The number of CPUs the tracker may run on: the default queue count.
pub fn cpu_count() -> u16 {
    std::thread::available_parallelism()
        .map_or(1, |n| u16::try_from(n.get()).unwrap_or(sys::MAX_QUEUES))
        .clamp(1, sys::MAX_QUEUES)
}

/// The size of each tag's buffer under driver copy: all of them together
/// (`queues` × `depth`) within half of the data budget, a power of two
/// from [`BLOCK_SIZE`] to [`MAX_IO_BYTES`].
pub fn driver_copy_bytes(budget: u64, queues: u16, depth: u16) -> u32 {
    let tags = u64::from(queues).max(1) * u64::from(depth).max(1);
    let share = (budget / 2 / tags).clamp(BLOCK_SIZE, u64::from(MAX_IO_BYTES));
    // The largest power of two not above the share.
    let bytes = 1u64 << (63 - share.leading_zeros());
    bytes as u32
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
    /// The disk it serves.
    disk: DiskId,
    /// Its size as the driver was told it (see [`queue::Shared::size`]).
    size: Arc<AtomicU64>,
    /// Whether the driver takes `UPDATE_SIZE` (the device can grow).
    update_size: bool,
    recovered: bool,
    recoverable: bool,
    user_copy: bool,
    control: Control,
    queues: Vec<Queue>,
    budget: Arc<DataBudget>,
    /// Budget bytes reserved for the tags' fixed buffers (driver copy).
    reserved: u64,
}

/// Grows a served device with `UPDATE_SIZE`, on a control ring of its own
/// (the device's is the daemon thread's).
struct UblkSize {
    dev_id: u32,
    disk: DiskId,
    size: Arc<AtomicU64>,
    supported: bool,
}

impl KernelDevice for UblkSize {
    fn disk(&self) -> DiskId {
        self.disk
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/ublkb{}", self.dev_id))
    }

    fn grow_to(&self, size: u64) -> Result<(), GrowError> {
        crate::kernel_size::check_blocks(&self.path(), size, BLOCK_SIZE)?;
        if !self.supported {
            return Err(GrowError::UblkUnsupported {
                device: self.path(),
            });
        }
        // The queues take requests up to the new end before the driver
        // may send them.
        self.size.fetch_max(size, Ordering::AcqRel);
        Control::open()
            .and_then(|mut control| control.update_size(self.dev_id, size))
            .map_err(|source| GrowError::Ublk {
                device: self.path(),
                source,
            })
    }
}

/// How the queues of one device are made.
struct Layout {
    queues: u16,
    depth: u16,
    max_bytes: u32,
    user_copy: bool,
}

impl Layout {
    fn log(&self, dev_id: u32, what: &str) {
        tracing::info!(
            device = %format!("/dev/ublkb{dev_id}"),
            queues = self.queues,
            depth = self.depth,
            max_request = self.max_bytes,
            user_copy = self.user_copy,
            "{what}"
        );
    }
}

impl UblkDevice {
    /// Creates the device, or takes over the one a previous tracker left.
    /// Its queues perform requests through `frontend`'s queue cores, with
    /// request data within `budget`.
    pub fn start(
        frontend: Arc<Frontend>,
        budget: Arc<DataBudget>,
        options: &UblkOptions,
    ) -> Result<Self, UblkError> {
        if !options.size.is_multiple_of(BLOCK_SIZE) || options.size == 0 {
            return Err(UblkError::Unaligned { size: options.size });
        }
        let mut control = Control::open().map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => UblkError::NoDriver,
            _ => kernel("opening /dev/ublk-control")(e),
        })?;
        let tag = identity_tag(&options.identity);
        if let Some(found) = find_device(&mut control, tag, options.dev_id)? {
            return Self::recover(control, frontend, budget, options, found);
        }
        Self::create(control, frontend, budget, options, tag)
    }

    fn create(
        mut control: Control,
        frontend: Arc<Frontend>,
        budget: Arc<DataBudget>,
        options: &UblkOptions,
        tag: u64,
    ) -> Result<Self, UblkError> {
        // Older drivers lack GET_FEATURES; they lack recovery-reissue and
        // user copy too.
        let features = control.features().unwrap_or(0);
        let recovery = sys::flags::USER_RECOVERY | sys::flags::USER_RECOVERY_REISSUE;
        let recoverable = features & recovery == recovery;
        if !recoverable {
            tracing::warn!(
                features,
                "the ublk driver lacks user recovery: a tracker restart will fail the device's I/O"
            );
        }
        let user_copy = options.user_copy && features & sys::flags::USER_COPY != 0;
        let queues = options
            .queues
            .unwrap_or_else(cpu_count)
            .clamp(1, sys::MAX_QUEUES);
        let max_bytes = if user_copy {
            MAX_IO_BYTES
        } else {
            driver_copy_bytes(budget.limit(), queues, options.queue_depth)
        };
        let asked = DevInfo {
            nr_hw_queues: queues,
            queue_depth: options.queue_depth,
            max_io_buf_bytes: max_bytes,
            dev_id: options.dev_id.unwrap_or(u32::MAX),
            ublksrv_pid: -1,
            flags: sys::flags::CMD_IOCTL_ENCODE
                | if recoverable { recovery } else { 0 }
                | if user_copy { sys::flags::USER_COPY } else { 0 },
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
        // What the driver granted (it holds the queues to the CPUs it has).
        let layout = Layout {
            queues: info.nr_hw_queues.max(1),
            depth: info.queue_depth,
            max_bytes: info.max_io_buf_bytes.min(max_bytes),
            user_copy: info.flags & sys::flags::USER_COPY != 0,
        };
        let size = Arc::new(AtomicU64::new(options.size));
        let setup = (|| {
            let sectors_per_io = layout.max_bytes >> 9;
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
            let (queues, reserved) = start_queues(
                &mut control,
                dev_id,
                &frontend,
                &budget,
                options,
                &layout,
                &size,
            )?;
            if let Err(e) = control.start(dev_id, std::process::id() as i32) {
                drop(queues);
                budget.give(reserved);
                return Err(kernel(format!("starting /dev/ublkb{dev_id}"))(e));
            }
            Ok((queues, reserved))
        })();
        match setup {
            Ok((queues, reserved)) => {
                layout.log(dev_id, "ublk device started");
                Ok(Self {
                    dev_id,
                    disk: options.disk,
                    size,
                    update_size: features & sys::flags::UPDATE_SIZE != 0,
                    recovered: false,
                    recoverable,
                    user_copy: layout.user_copy,
                    control,
                    queues,
                    budget,
                    reserved,
                })
            }
            Err(e) => {
                // Nothing half made stays behind.
                let _ = control.delete(dev_id);
                Err(e)
            }
        }
    }

    fn recover(
        mut control: Control,
        frontend: Arc<Frontend>,
        budget: Arc<DataBudget>,
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
        // The kept device keeps what it was made with.
        let layout = Layout {
            queues: found.nr_hw_queues.max(1),
            depth: found.queue_depth,
            max_bytes: found.max_io_buf_bytes.min(MAX_IO_BYTES),
            user_copy: found.flags & sys::flags::USER_COPY != 0,
        };
        if layout.depth != options.queue_depth || options.queues.is_some_and(|q| q != layout.queues)
        {
            tracing::info!(
                kept_depth = layout.depth,
                kept_queues = layout.queues,
                configured_depth = options.queue_depth,
                configured_queues = ?options.queues,
                "the kept device keeps its queues and depth"
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
        let size = Arc::new(AtomicU64::new(options.size));
        let (queues, reserved) = start_queues(
            &mut control,
            dev_id,
            &frontend,
            &budget,
            options,
            &layout,
            &size,
        )?;
        if let Err(e) = control.end_recovery(dev_id, std::process::id() as i32) {
            budget.give(reserved);
            return Err(kernel(format!("ending the recovery of /dev/ublkb{dev_id}"))(e));
        }
        layout.log(dev_id, "ublk device taken over");
        let features = control.features().unwrap_or(0);
        Ok(Self {
            dev_id,
            disk: options.disk,
            size,
            update_size: features & sys::flags::UPDATE_SIZE != 0,
            recovered: true,
            recoverable: true,
            user_copy: layout.user_copy,
            control,
            queues,
            budget,
            reserved,
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

    /// What tells the device that its disk grew (see
    /// [`crate::kernel_size`]). The daemon forgets it before it removes or
    /// keeps the device.
    pub fn kernel_device(&self) -> Arc<dyn KernelDevice> {
        Arc::new(UblkSize {
            dev_id: self.dev_id,
            disk: self.disk,
            size: Arc::clone(&self.size),
            supported: self.update_size,
        })
    }

    /// Whether this tracker took over a device a previous one left.
    pub fn recovered(&self) -> bool {
        self.recovered
    }

    /// Whether the next tracker can take the device over.
    pub fn recoverable(&self) -> bool {
        self.recoverable
    }

    /// The device's hardware queues (one thread each).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// Whether request data goes through the driver's user copy.
    pub fn user_copy(&self) -> bool {
        self.user_copy
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
    pub fn keep(mut self) -> Result<(), UblkError> {
        if !self.recoverable {
            tracing::warn!("the ublk driver cannot keep a device without its server: removing it");
            return self.remove();
        }
        for queue in &self.queues {
            queue.ask_to_leave();
        }
        let end = self
            .join_queues()
            .map_err(kernel("closing the device's queues"))?;
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
            .join_queues()
            .map_err(kernel("ending the device's queues"))?;
        self.control
            .delete(dev_id)
            .map_err(kernel(format!("deleting ublk device {dev_id}")))?;
        tracing::info!(device = %format!("/dev/ublkb{dev_id}"), completed = end.completed, "ublk device removed");
        Ok(())
    }

    /// Waits for every queue to end; the first error, after all ended.
    fn join_queues(&mut self) -> std::io::Result<QueueEnd> {
        let mut total = QueueEnd::default();
        let mut first_error = None;
        for queue in self.queues.drain(..) {
            match queue.join() {
                Ok(end) => total += end,
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(total), Err)
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        // Queues still running (a start that failed half way) end first.
        for queue in &self.queues {
            queue.ask_to_leave();
        }
        let _ = self.join_queues();
        self.budget.give(std::mem::take(&mut self.reserved));
    }
}

/// Starts every queue of the device, each pinned where the driver maps its
/// CPUs; returns them and the budget reserved for driver-copy buffers.
fn start_queues(
    control: &mut Control,
    dev_id: u32,
    frontend: &Arc<Frontend>,
    budget: &Arc<DataBudget>,
    options: &UblkOptions,
    layout: &Layout,
    size: &Arc<AtomicU64>,
) -> Result<(Vec<Queue>, u64), UblkError> {
    let char_dev =
        Arc::new(open_char_device(dev_id).map_err(kernel(format!("opening /dev/ublkc{dev_id}")))?);
    let reserved = if layout.user_copy {
        0
    } else {
        let bytes =
            u64::from(layout.queues) * u64::from(layout.depth) * u64::from(layout.max_bytes);
        budget.reserve(bytes);
        bytes
    };
    let shared = Shared {
        char_dev,
        frontend: Arc::clone(frontend),
        budget: Arc::clone(budget),
        size: Arc::clone(size),
    };
    let mut queues = Vec::with_capacity(usize::from(layout.queues));
    for q in 0..layout.queues {
        let cpus = control.queue_affinity(dev_id, q).unwrap_or_else(|error| {
            tracing::debug!(queue = q, %error, "no CPU affinity from the ublk driver: the queue runs unpinned");
            Vec::new()
        });
        let spec = QueueSpec {
            dev_id,
            queue: q,
            depth: layout.depth,
            disk: options.disk,
            max_bytes: layout.max_bytes,
            user_copy: layout.user_copy,
            cpus,
        };
        match Queue::start(shared.clone(), spec) {
            Ok(queue) => queues.push(queue),
            Err(e) => {
                for queue in &queues {
                    queue.ask_to_leave();
                }
                drop(queues);
                budget.give(reserved);
                return Err(kernel(format!("starting queue {q} of /dev/ublkc{dev_id}"))(
                    e,
                ));
            }
        }
    }
    Ok((queues, reserved))
}

/// Opens `/dev/ublkcN`, waiting a moment for devtmpfs/udev to create it.
fn open_char_device(dev_id: u32) -> std::io::Result<File> {
    let path = format!("/dev/ublkc{dev_id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        {
            Ok(f) => return Ok(f),
            Err(e)
                if Instant::now() < deadline
                    && matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EBUSY)) =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{path}: {e}"))),
        }
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
    fn driver_copy_buffers_stay_within_half_the_budget() {
        // 64 MiB budget, 2 queues of 64 tags: 256 KiB each, 32 MiB in all.
        assert_eq!(driver_copy_bytes(64 << 20, 2, 64), 256 << 10);
        // Few tags: capped at the largest request.
        assert_eq!(driver_copy_bytes(64 << 20, 1, 4), MAX_IO_BYTES);
        // A share that is no power of two is rounded down.
        assert_eq!(driver_copy_bytes(3 << 20, 1, 1), MAX_IO_BYTES);
        assert_eq!(driver_copy_bytes(80 << 20, 3, 64), 128 << 10);
        // Many queues: never below a block.
        assert_eq!(driver_copy_bytes(64 << 20, 4096, 4096), BLOCK_SIZE as u32);
        for (queues, depth) in [(1, 1), (2, 64), (16, 128), (64, 256)] {
            let per = driver_copy_bytes(64 << 20, queues, depth);
            let total = u64::from(per) * u64::from(queues) * u64::from(depth);
            assert!(
                total <= 32 << 20 || per == BLOCK_SIZE as u32,
                "{queues}×{depth}"
            );
        }
    }

    #[test]
    fn identity_tags_are_stable_distinct_and_never_zero() {
        let a = identity_tag("tidemark:g:disk0");
        assert_eq!(a, identity_tag("tidemark:g:disk0"));
        assert_ne!(a, identity_tag("tidemark:g:disk1"));
        assert_ne!(a, 0);
    }
}
