//! Attaching the kernel's NBD client (`/dev/nbdN`) to one of the tracker's
//! own exports, without `nbd-client`: the control plane of `tidemark
//! tracker serve --attach`.
//!
//! # Attaching
//!
//! The tracker makes a unix socketpair, serves one end itself as a
//! connection already in the transmission phase
//! ([`ServerHandle::adopt`]: the kernel does no handshake), and hands the
//! other end to the kernel with `NBD_CMD_CONNECT` over the `nbd` generic
//! netlink family, together with what a handshake would have told it: the
//! export's size, 4 KiB blocks, the transmission flags the server offers,
//! the request and dead-connection timeouts, and a backend identifier
//! naming the tracker's group and export. Then it raises the device's
//! largest request (`queue/max_sectors_kb`; the kernel starts at 128 KiB)
//! to the tracker's largest block.
//!
//! # Re-adopting after a restart
//!
//! A tracker that stops with `keep-device` (or dies) leaves the device
//! configured: the kernel sees the socket close, marks the connection
//! dead and holds new requests for up to the dead-connection timeout. The
//! next tracker finds the device by its backend identifier
//! (`/sys/block/nbdN/backend`, present only while the device is
//! configured) and hands it a fresh socket with `NBD_CMD_RECONFIGURE`
//! (`NBD_ATTR_SOCKETS`). The kernel puts the socket in the dead one's
//! place and wakes the requests waiting for a connection; requests that
//! were in flight on the dead socket are requeued onto the new one when
//! their timeout fires (the kernel does this for a single-connection
//! device only when a request timeout is set, hence the timeout is always
//! sent). None of them fails, so the filesystem on top sees no I/O error.
//!
//! The kernel quietly ignores a new socket when no connection of the
//! device is dead (a tracker still serving it). So after the reconfigure
//! the tracker checks that the kernel really holds the socket's other end
//! (its own end does not see the peer gone) and otherwise retries for a
//! moment — the kernel may not have noticed the old socket close yet —
//! before it gives up with [`AttachError::StillConnected`].
//!
//! # Keeping the device served
//!
//! The kernel also gives up on a live connection when a request outlives
//! the request timeout (a stalled backing disk): it shuts the socket down
//! and requeues the requests as above. A watcher thread of the attachment
//! sees its connection end while the tracker runs and hands the device a
//! new socket the same way, so such a stall costs time, not I/O errors.
//!
//! # Growing
//!
//! When the disk grows while served (`tidemark tracker resize`), the
//! device's connections first take requests up to the new end, then
//! `NBD_CMD_RECONFIGURE` with `NBD_ATTR_SIZE_BYTES` tells the kernel the
//! new size (see [`crate::kernel_size`]): the block device's capacity
//! changes under a mounted file system. A re-adoption does not send a size
//! (the kernel would freeze the device's queue while the requests it holds
//! wait for the very socket being handed over): a kept device re-adopted
//! after its disk grew offline keeps its old size until it is attached
//! anew (the offline growth stops the tracker without `keep-device`).
//!
//! # Detaching
//!
//! [`KernelAttachment::detach`] sends `NBD_CMD_DISCONNECT` (the kernel
//! sends the server `NBD_CMD_DISC`, then removes the device's
//! configuration); [`KernelAttachment::keep`] leaves the device for the
//! next tracker.

pub mod netlink;
pub mod sysfs;

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use tidemark_changelog::DiskId;

use crate::kernel_size::{GrowError, KernelDevice};
use crate::nbd::constants::TransmissionFlags;
use crate::server::{Adopted, Adopter, ServerHandle};
use netlink::{ConnectRequest, NbdFamily, ReconfigureRequest};

/// The block size the device gets: a page, what filesystems use anyway.
pub const BLOCK_SIZE: u64 = 4096;

/// The transmission flags the kernel's client understands: what the server
/// offers any client, less DF, cache and fast zero.
const KERNEL_FLAGS: TransmissionFlags = crate::nbd::handshake::OFFERABLE_FLAGS.difference(
    TransmissionFlags::SEND_DF
        .union(TransmissionFlags::SEND_CACHE)
        .union(TransmissionFlags::SEND_FAST_ZERO),
);

/// How long a new tracker keeps trying to hand a kept device its socket
/// while the kernel has not yet seen the old one close.
const READOPT_PATIENCE: Duration = Duration::from_secs(3);

/// Why the kernel device could not be attached, re-adopted or detached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The kernel has no `nbd` generic netlink family: the nbd module is
    /// not loaded (or not built). The host's configuration.
    #[error(
        "the kernel has no \"nbd\" generic netlink family: load the nbd module (modprobe nbd)"
    )]
    NoNbdFamily,
    /// The kernel refused for lack of privilege (`CAP_SYS_ADMIN`).
    #[error("attaching /dev/nbd devices needs CAP_SYS_ADMIN: run the tracker as root")]
    PermissionDenied,
    /// No unused device was left and none could be created.
    #[error("no free /dev/nbd device (every one is in use and no new one could be created)")]
    NoFreeDevice,
    /// The configured device is already attached to something else.
    #[error("/dev/nbd{index} is already in use; choose another index or leave it unset")]
    DeviceBusy {
        /// The device.
        index: u32,
    },
    /// A kept device still has a live connection: another tracker (or
    /// nbd-client) serves it.
    #[error("/dev/nbd{index} still has a live connection; is another tracker serving it?")]
    StillConnected {
        /// The device.
        index: u32,
    },
    /// The export to attach is not one the tracker serves (configuration).
    #[error("no export named {0:?} to attach")]
    NoSuchExport(String),
    /// The kernel refused a command for another reason.
    #[error("the kernel refused {command}")]
    Kernel {
        /// The command.
        command: &'static str,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// The netlink socket failed.
    #[error("netlink: {0}")]
    Netlink(String),
    /// A netlink message could not be built or read.
    #[error("netlink message: {0}")]
    Message(String),
    /// A local system call failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl AttachError {
    /// The error an errno from the kernel's answer to `command` means.
    pub fn from_errno(command: u8, errno: i32) -> Self {
        let name = match command {
            netlink::cmd::CONNECT => "NBD_CMD_CONNECT",
            netlink::cmd::DISCONNECT => "NBD_CMD_DISCONNECT",
            netlink::cmd::RECONFIGURE => "NBD_CMD_RECONFIGURE",
            netlink::cmd::STATUS => "NBD_CMD_STATUS",
            _ => "an nbd netlink command",
        };
        match errno {
            libc::EPERM | libc::EACCES => Self::PermissionDenied,
            libc::ENOSPC | libc::ENFILE if command == netlink::cmd::CONNECT => Self::NoFreeDevice,
            _ => Self::Kernel {
                command: name,
                source: std::io::Error::from_raw_os_error(errno),
            },
        }
    }

    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// What to attach, and how the kernel should treat it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachOptions {
    /// The export (disk) to attach.
    pub export: String,
    /// `Some(n)`: /dev/nbdN; `None`: the first free device.
    pub index: Option<u32>,
    /// How long one request may take before the kernel requeues it (and,
    /// with the connection alive, considers the connection dead).
    pub io_timeout: Duration,
    /// How long the kernel holds requests once the connection died,
    /// waiting for a new one, before failing them.
    pub dead_connection_timeout: Duration,
    /// Largest request the device may send, bytes.
    pub max_request: u32,
    /// Identifies the server to the kernel; a restart finds its device
    /// again by it. [`backend_identifier`] makes one.
    pub backend: String,
}

/// The backend identifier of a group's export.
pub fn backend_identifier(group: &str, export: &str) -> String {
    format!("tidemark:{group}:{export}")
}

/// Whole seconds, rounded up, at least one (the kernel reads 0 as "none").
fn seconds(duration: Duration) -> u64 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    secs.max(1)
}

/// A device attached to the tracker.
///
/// While it lives, a watcher thread keeps the device served: should the
/// kernel give up on the connection while the tracker runs (a request
/// outlived `io_timeout`, say the backing disk stalled), the kernel marks it
/// dead and requeues its requests; the watcher then hands the device a new
/// socket the same way a restarted tracker would, and the requests go on.
pub struct KernelAttachment {
    family: Arc<NbdFamily>,
    index: u32,
    /// The backend identifier the device was attached with.
    backend: String,
    /// The size the kernel was told: what the device's connections hold
    /// requests to ([`Adopter::adopt_told`]).
    told: Arc<AtomicU64>,
    readopted: bool,
    watcher: Option<Watcher>,
}

/// The thread that re-hands the device a socket when its connection ends.
struct Watcher {
    stop: Arc<AtomicBool>,
    /// True while the current connection is served.
    connected: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl std::fmt::Debug for KernelAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelAttachment")
            .field("index", &self.index)
            .field("readopted", &self.readopted)
            .finish_non_exhaustive()
    }
}

impl KernelAttachment {
    /// Attaches `options.export` of `server`: re-adopts a device a
    /// previous tracker left configured for the same backend identifier,
    /// else connects a new one.
    pub fn attach(server: &ServerHandle, options: &AttachOptions) -> Result<Self, AttachError> {
        let adopter = server
            .adopter()
            .map_err(|e| AttachError::io("serving the kernel's connection", e))?;
        let family = Arc::new(NbdFamily::open()?);
        let told = Arc::new(AtomicU64::new(0));
        let kept = sysfs::find_by_backend(&options.backend)
            .map_err(|e| AttachError::io("looking for a kept /dev/nbd device in /sys/block", e))?;
        let (index, adopted, readopted) = match kept {
            Some(index) => (
                index,
                readopt(&family, &adopter, options, index, &told)?,
                true,
            ),
            None => {
                let (index, adopted) = connect(&family, &adopter, options, &told)?;
                (index, adopted, false)
            }
        };
        if let Err(error) = sysfs::raise_max_request(index, options.max_request) {
            tracing::warn!(device = %device_path(index), %error, "cannot raise the largest request; the kernel keeps its default");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(true));
        let thread = {
            let (family, options) = (Arc::clone(&family), options.clone());
            let (stop, connected, told) =
                (Arc::clone(&stop), Arc::clone(&connected), Arc::clone(&told));
            std::thread::Builder::new()
                .name("nbd-attach-watch".into())
                .spawn(move || {
                    watch(
                        &family, &adopter, &options, index, &told, adopted, &stop, &connected,
                    )
                })
                .map_err(|e| AttachError::io("starting the attachment's watcher", e))?
        };
        Ok(Self {
            family,
            index,
            backend: options.backend.clone(),
            told,
            readopted,
            watcher: Some(Watcher {
                stop,
                connected,
                thread,
            }),
        })
    }

    /// N of /dev/nbdN.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The device node.
    pub fn device(&self) -> PathBuf {
        PathBuf::from(device_path(self.index))
    }

    /// What tells the device that disk `disk` (the one it shows) grew:
    /// `NBD_CMD_RECONFIGURE` with the new size (see [`crate::kernel_size`]).
    /// The daemon forgets it before it detaches or keeps the device.
    pub fn kernel_device(&self, disk: DiskId) -> Arc<dyn KernelDevice> {
        Arc::new(NbdSize {
            family: Arc::clone(&self.family),
            index: self.index,
            backend: self.backend.clone(),
            told: Arc::clone(&self.told),
            disk,
        })
    }

    /// Whether a device a previous tracker kept was taken over (rather
    /// than a new one connected).
    pub fn readopted(&self) -> bool {
        self.readopted
    }

    /// Whether the connection the kernel uses is being served (false only
    /// while the watcher is handing the device a new one).
    pub fn is_connected(&self) -> bool {
        self.watcher
            .as_ref()
            .is_some_and(|w| w.connected.load(Ordering::SeqCst))
    }

    /// Stops the watcher: from here on an ending connection is meant to.
    fn stop_watching(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.stop.store(true, Ordering::SeqCst);
            let _ = watcher.thread.join();
        }
    }

    /// Detaches the device (`NBD_CMD_DISCONNECT`): the kernel sends the
    /// server a disconnect and drops the device's configuration; I/O still
    /// queued fails. Call it before the server stops.
    pub fn detach(mut self) -> Result<(), AttachError> {
        self.stop_watching();
        self.family
            .request(netlink::disconnect_message(self.index)?)?;
        tracing::info!(device = %device_path(self.index), "kernel NBD client detached");
        Ok(())
    }

    /// Leaves the device configured for the next tracker to re-adopt
    /// within the dead-connection timeout; new I/O waits until then.
    pub fn keep(mut self) {
        self.stop_watching();
        tracing::info!(device = %device_path(self.index), "kernel NBD device kept for the next tracker");
    }
}

impl Drop for KernelAttachment {
    fn drop(&mut self) {
        self.stop_watching();
    }
}

/// Grows an attached device with `NBD_CMD_RECONFIGURE`.
struct NbdSize {
    family: Arc<NbdFamily>,
    index: u32,
    backend: String,
    told: Arc<AtomicU64>,
    disk: DiskId,
}

impl KernelDevice for NbdSize {
    fn disk(&self) -> DiskId {
        self.disk
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(device_path(self.index))
    }

    fn grow_to(&self, size: u64) -> Result<(), GrowError> {
        crate::kernel_size::check_blocks(&self.path(), size, BLOCK_SIZE)?;
        // The connection takes requests up to the new end before the
        // kernel may send them.
        self.told.fetch_max(size, Ordering::AcqRel);
        netlink::resize_message(self.index, &self.backend, size)
            .and_then(|message| self.family.request(message))
            .map(drop)
            .map_err(|source| GrowError::Nbd {
                device: self.path(),
                source,
            })
    }
}

/// Connects a new device to a new connection of `options.export`.
fn connect(
    family: &NbdFamily,
    adopter: &Adopter,
    options: &AttachOptions,
    told: &Arc<AtomicU64>,
) -> Result<(u32, Adopted), AttachError> {
    let (ours, kernels) =
        UnixStream::pair().map_err(|e| AttachError::io("creating a socketpair", e))?;
    let adopted = adopt(adopter, ours, &options.export, told)?;
    let flags = adopted.export.flags.intersection(KERNEL_FLAGS);
    let message = netlink::connect_message(&ConnectRequest {
        index: options.index,
        size: adopted.export.size,
        block_size: BLOCK_SIZE,
        server_flags: u64::from(flags.bits()),
        timeout_secs: seconds(options.io_timeout),
        dead_conn_timeout_secs: seconds(options.dead_connection_timeout),
        backend: options.backend.clone(),
        socket: kernels.as_raw_fd(),
    })?;
    let replies = family.request(message).map_err(|error| match error {
        AttachError::Kernel { source, .. }
            if source.raw_os_error() == Some(libc::EBUSY) && options.index.is_some() =>
        {
            AttachError::DeviceBusy {
                index: options.index.unwrap_or_default(),
            }
        }
        other => other,
    })?;
    // The kernel holds its own reference to the socket now.
    drop(kernels);
    let index = replies
        .first()
        .ok_or_else(|| AttachError::Message("no reply to NBD_CMD_CONNECT".into()))
        .and_then(netlink::connect_reply_index)?;
    tracing::info!(device = %device_path(index), export = %options.export, flags = ?flags, "kernel NBD client attached");
    Ok((index, adopted))
}

/// Hands a kept device a new connection, retrying while the kernel has
/// not yet seen the old one die.
fn readopt(
    family: &NbdFamily,
    adopter: &Adopter,
    options: &AttachOptions,
    index: u32,
    told: &Arc<AtomicU64>,
) -> Result<Adopted, AttachError> {
    let started = std::time::Instant::now();
    loop {
        if let Some(adopted) = hand_new_socket(family, adopter, options, index, told)? {
            tracing::info!(device = %device_path(index), export = %options.export, "kept kernel NBD device re-adopted");
            return Ok(adopted);
        }
        if started.elapsed() >= READOPT_PATIENCE {
            return Err(AttachError::StillConnected { index });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One `NBD_CMD_RECONFIGURE` with a new socket: `Some` if the kernel took
/// it, `None` if it had no dead connection to replace.
fn hand_new_socket(
    family: &NbdFamily,
    adopter: &Adopter,
    options: &AttachOptions,
    index: u32,
    told: &Arc<AtomicU64>,
) -> Result<Option<Adopted>, AttachError> {
    let (ours, kernels) =
        UnixStream::pair().map_err(|e| AttachError::io("creating a socketpair", e))?;
    let probe = ours
        .try_clone()
        .map_err(|e| AttachError::io("duplicating a socket", e))?;
    let adopted = adopt(adopter, ours, &options.export, told)?;
    let message = netlink::reconfigure_message(&ReconfigureRequest {
        index,
        backend: options.backend.clone(),
        timeout_secs: seconds(options.io_timeout),
        dead_conn_timeout_secs: seconds(options.dead_connection_timeout),
        socket: kernels.as_raw_fd(),
    })?;
    family.request(message)?;
    drop(kernels);
    // The kernel answers success even when it found no dead connection
    // to replace and dropped the socket: then nobody holds the other end
    // any more, which our end sees at once.
    Ok((!peer_gone(&probe)).then_some(adopted))
}

/// How often the watcher looks whether it must stop.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// The watcher's loop: while the attachment lives, a connection that ends
/// is replaced by a new one (see [`KernelAttachment`]).
#[allow(clippy::too_many_arguments)]
fn watch(
    family: &NbdFamily,
    adopter: &Adopter,
    options: &AttachOptions,
    index: u32,
    told: &Arc<AtomicU64>,
    mut current: Adopted,
    stop: &AtomicBool,
    connected: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        if let Err(RecvTimeoutError::Timeout) = current.ended.recv_timeout(WATCH_INTERVAL) {
            continue;
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        connected.store(false, Ordering::SeqCst);
        tracing::warn!(device = %device_path(index), "the kernel dropped the connection (a request outlived io-timeout?); handing it a new one");
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            match hand_new_socket(family, adopter, options, index, told) {
                Ok(Some(adopted)) => {
                    tracing::info!(device = %device_path(index), "kernel NBD device served again");
                    current = adopted;
                    connected.store(true, Ordering::SeqCst);
                    break;
                }
                // The kernel has not marked the old connection dead yet.
                Ok(None) => {}
                Err(error) => {
                    // A device someone else disconnected is gone for good.
                    if !matches!(sysfs::find_by_backend(&options.backend), Ok(Some(i)) if i == index)
                    {
                        tracing::error!(device = %device_path(index), %error, "the kernel NBD device is no longer configured; not reconnecting");
                        return;
                    }
                    tracing::warn!(device = %device_path(index), %error, "handing the kernel NBD device a new connection failed; retrying");
                }
            }
            std::thread::sleep(WATCH_INTERVAL);
        }
    }
}

fn device_path(index: u32) -> String {
    format!("/dev/nbd{index}")
}

fn adopt(
    adopter: &Adopter,
    ours: UnixStream,
    export: &str,
    told: &Arc<AtomicU64>,
) -> Result<Adopted, AttachError> {
    adopter
        .adopt_told(ours, export, Arc::clone(told))
        .map_err(|error| {
            if error.kind() == std::io::ErrorKind::NotFound {
                AttachError::NoSuchExport(export.to_string())
            } else {
                AttachError::io("serving the kernel's connection", error)
            }
        })
}

/// Whether nobody holds the other end of `stream` any more (a unix
/// stream socket reports `POLLHUP` once its peer is closed, asked or not).
fn peer_gone(stream: &UnixStream) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errnos_become_errors_an_admin_can_act_on() {
        assert!(matches!(
            AttachError::from_errno(netlink::cmd::CONNECT, libc::EPERM),
            AttachError::PermissionDenied
        ));
        assert!(matches!(
            AttachError::from_errno(netlink::cmd::RECONFIGURE, libc::EACCES),
            AttachError::PermissionDenied
        ));
        assert!(matches!(
            AttachError::from_errno(netlink::cmd::CONNECT, libc::ENOSPC),
            AttachError::NoFreeDevice
        ));
        let other = AttachError::from_errno(netlink::cmd::RECONFIGURE, libc::EINVAL);
        assert_eq!(other.to_string(), "the kernel refused NBD_CMD_RECONFIGURE");
        assert!(AttachError::NoNbdFamily
            .to_string()
            .contains("modprobe nbd"));
    }

    #[test]
    fn timeouts_are_whole_seconds_never_zero() {
        assert_eq!(seconds(Duration::from_millis(1)), 1);
        assert_eq!(seconds(Duration::ZERO), 1);
        assert_eq!(seconds(Duration::from_millis(2500)), 3);
        assert_eq!(seconds(Duration::from_secs(30)), 30);
    }

    #[test]
    fn the_kernel_is_offered_only_flags_it_knows() {
        let offered = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_DF
            | TransmissionFlags::SEND_FAST_ZERO;
        assert_eq!(offered.intersection(KERNEL_FLAGS).bits(), 0b110_1101);
    }

    #[test]
    fn a_socket_whose_peer_is_gone_is_seen_at_once() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(!peer_gone(&a));
        drop(b);
        assert!(peer_gone(&a));
    }
}
