//! Telling the kernel's block devices the tracker serves that their disk
//! grew: the last step of `tidemark tracker resize` ([`resize`]).
//!
//! The order is the contract. [`Group::resize`] makes the grow record
//! durable in the change log, then serves the new size (new NBD
//! connections and the group's extent checks see it); only then is each
//! kernel device of that disk told, so the kernel never sends a request
//! beyond the end the log knows. Where the protocol allows it the tracker
//! tells the device itself:
//!
//! - a ublk device (`tracker serve --ublk`) with `UBLK_U_CMD_UPDATE_SIZE`
//!   (Linux 6.15+; the driver announces it with `UBLK_F_UPDATE_SIZE`);
//! - a `/dev/nbdN` the tracker attached itself (`tracker serve --attach`)
//!   with `NBD_CMD_RECONFIGURE` carrying `NBD_ATTR_SIZE_BYTES`.
//!
//! Either way the kernel changes the device's capacity under a mounted
//! file system, which the admin then grows online (`resize2fs`). A
//! `/dev/nbdN` an admin attached with `nbd-client` is that client's: the
//! NBD protocol has no way for a server to announce a new size, and the
//! tracker does not reconfigure a device it did not attach.
//!
//! A device that refuses keeps its old size and the resize still
//! succeeds: the growth is durable and served, and the reply names the
//! device and what the admin does ([`GrowError`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tidemark_changelog::DiskId;

use crate::group::{Group, ResizeError, Resized};

/// A kernel block device the tracker serves a disk through, which can be
/// told that the disk grew.
pub trait KernelDevice: Send + Sync {
    /// The disk it shows.
    fn disk(&self) -> DiskId;
    /// Its block device node.
    fn path(&self) -> PathBuf;
    /// Tells the kernel the disk's new size, in bytes.
    fn grow_to(&self, size: u64) -> Result<(), GrowError>;
}

/// Why a kernel device keeps its old size. Each says what the admin does;
/// the disk itself is grown either way.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    /// The ublk driver has no `UPDATE_SIZE` (a kernel before 6.15): the
    /// host's kernel.
    #[error("{} keeps its old size: this kernel's ublk driver cannot change a device's size (UBLK_U_CMD_UPDATE_SIZE needs Linux 6.15+); unmount it and stop the tracker (a plain stop removes the device), then start it again: the new device has the new size", device.display())]
    UblkUnsupported {
        /// The device.
        device: PathBuf,
    },
    /// The ublk driver refused `UPDATE_SIZE`.
    #[error("{} keeps its old size: the kernel refused UBLK_U_CMD_UPDATE_SIZE; unmount it and stop the tracker (a plain stop removes the device), then start it again: the new device has the new size", device.display())]
    Ublk {
        /// The device.
        device: PathBuf,
        /// The driver's answer.
        #[source]
        source: std::io::Error,
    },
    /// The disk grew to a size that is not a whole number of the device's
    /// blocks (the admin's).
    #[error("{} keeps its old size: the disk grew to {size} bytes, not a multiple of the device's {block}-byte blocks; grow the backing to a multiple and resize again", device.display())]
    Unaligned {
        /// The device.
        device: PathBuf,
        /// The disk's new size.
        size: u64,
        /// The device's block size.
        block: u64,
    },
    /// The kernel's NBD driver refused the reconfigure.
    #[error("{} keeps its old size: the kernel refused NBD_CMD_RECONFIGURE with the new size; unmount it and restart the tracker without --keep-device: it attaches the device anew, at the new size", device.display())]
    Nbd {
        /// The device.
        device: PathBuf,
        /// The netlink request's error.
        #[source]
        source: crate::kernel_attach::AttachError,
    },
}

/// Refuses a size that is not a whole number of the device's blocks:
/// the kernel would cut the last part off (or refuse).
pub fn check_blocks(device: &std::path::Path, size: u64, block: u64) -> Result<(), GrowError> {
    if size.is_multiple_of(block) {
        Ok(())
    } else {
        Err(GrowError::Unaligned {
            device: device.to_path_buf(),
            size,
            block,
        })
    }
}

/// The kernel devices the tracker serves, for [`resize`]. The daemon adds
/// them once they are up and clears them before it takes them down.
#[derive(Default, Clone)]
pub struct KernelDevices(Arc<Mutex<Vec<Arc<dyn KernelDevice>>>>);

impl KernelDevices {
    /// No devices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a device.
    pub fn add(&self, device: Arc<dyn KernelDevice>) {
        self.lock().push(device);
    }

    /// Forgets every device (they are about to go away).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The devices of `disk`.
    fn of(&self, disk: DiskId) -> Vec<Arc<dyn KernelDevice>> {
        self.lock()
            .iter()
            .filter(|d| d.disk() == disk)
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<dyn KernelDevice>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What a kernel device made of a growth.
#[derive(Debug)]
pub struct DeviceGrowth {
    /// The device.
    pub device: PathBuf,
    /// `Ok`: it has the new size now.
    pub outcome: Result<(), GrowError>,
}

/// A disk grown while served, and what its kernel devices made of it.
#[derive(Debug)]
pub struct Grown {
    /// The group's growth.
    pub resized: Resized,
    /// One per kernel device of the disk, in the order they were added.
    pub devices: Vec<DeviceGrowth>,
}

/// Grows disk `name` ([`Group::resize`]: the grow record durable, then the
/// new size served), then tells each of its kernel devices. A device that
/// refuses does not fail the resize (the disk is grown); its outcome says
/// why.
pub fn resize(group: &Group, devices: &KernelDevices, name: &str) -> Result<Grown, ResizeError> {
    let resized = group.resize(name)?;
    let devices = devices
        .of(resized.id)
        .into_iter()
        .map(|device| {
            let outcome = device.grow_to(resized.size);
            match &outcome {
                Ok(()) => tracing::info!(device = %device.path().display(), size = resized.size, "the kernel device grew"),
                Err(error) => tracing::warn!(device = %device.path().display(), error = %error_chain(error), "the kernel device keeps its old size"),
            }
            DeviceGrowth {
                device: device.path(),
                outcome,
            }
        })
        .collect();
    Ok(Grown { resized, devices })
}

/// An error and its causes, one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
