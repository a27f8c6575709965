//! One client connection: the handshake, then the transmission phase, on
//! the connection's own thread.
//!
//! The handshake runs with blocking I/O under one deadline for the whole
//! negotiation, so a client that trickles bytes cannot hold the thread.
//! The transmission phase is the connection's event loop
//! ([`super::event_loop`]).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tidemark_changelog::DiskId;

use crate::backend::{Backend, ServedDisk};
use crate::nbd::constants::TransmissionFlags;
use crate::nbd::export::{BlockSizes, ExportCatalog, ExportInfo};
use crate::nbd::handshake::{
    AwaitClientFlags, HandshakeError, Negotiated, OptionHeader, OptionOutcome, CLIENT_FLAGS_LEN,
    OPTION_HEADER_LEN,
};
use crate::nbd::transmission::{FramingError, RequestError};

use super::event_loop::{self, LoopEnd};
use super::listener::Stream;
use super::{Frontend, ServerOptions, Shared};

/// Why a connection ended; for the log.
#[derive(Debug)]
enum Ended {
    /// The client closed the socket between messages.
    ClientClosed,
    /// The client ended the negotiation with `NBD_OPT_ABORT`.
    Aborted,
    /// The client sent `NBD_CMD_DISC`.
    Disconnected,
    /// The server is shutting down.
    Stopping,
    /// The handshake did not finish within the handshake timeout.
    TimedOut,
    /// The handshake broke the protocol (the client's fault).
    Handshake(HandshakeError),
    /// A request header lost the framing (the client's fault).
    Framing(FramingError),
    /// A refused write whose payload is too large to skip.
    OversizedWrite(RequestError),
    /// A reply could not be written; the socket is shut down.
    ReplyFailed,
    /// The socket failed.
    Io(io::Error),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ClientClosed => f.write_str("the client closed the connection"),
            Self::Aborted => f.write_str("the client aborted the negotiation"),
            Self::Disconnected => f.write_str("the client disconnected"),
            Self::Stopping => f.write_str("the server is stopping"),
            Self::TimedOut => f.write_str("the handshake timed out"),
            Self::Handshake(error) => write!(f, "handshake: {error}"),
            Self::Framing(error) => write!(f, "request: {error}"),
            Self::OversizedWrite(error) => write!(f, "refused a write too large to skip: {error}"),
            Self::ReplyFailed => f.write_str("a reply could not be written"),
            Self::Io(error) => write!(f, "socket: {error}"),
        }
    }
}

impl Ended {
    fn from_io(error: io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::UnexpectedEof => Self::ClientClosed,
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Self::TimedOut,
            _ => Self::Io(error),
        }
    }
}

/// The session and disk id of `export` for a client that skips the
/// handshake (the kernel attached over netlink): the export as this server
/// advertises it, flags as a connection without structured replies sees
/// them. `None` if the backend has no such export.
pub(crate) fn session_without_handshake(
    backend: &dyn Backend,
    options: &ServerOptions,
    export: &str,
) -> Option<(Negotiated, DiskId)> {
    let catalog = Catalog::new(backend, options);
    let disk = catalog.disk_of(export)?;
    let info = catalog.lookup(export)?;
    Some((Negotiated::without_handshake(info), disk))
}

/// Serves a connection that is already in the transmission phase (its
/// client was told the export's size and flags out of band), to close.
/// `told_size` is the size the client was told, raised when it is told a
/// larger one (the disk grew); requests are held to it.
pub(crate) fn run_negotiated(
    id: u64,
    stream: Stream,
    session: Negotiated,
    told_size: &AtomicU64,
    disk: DiskId,
    frontend: &Frontend,
    shared: &Shared,
) {
    tracing::debug!(conn = id, export = %session.export.name, "transmission without handshake");
    serve(id, stream, session, Some(told_size), disk, frontend, shared);
}

/// Serves one connection from handshake to close; `handshaken` is set once
/// the client is past the handshake (it is then never dropped to make
/// room for a newcomer).
pub(crate) fn run(
    id: u64,
    mut stream: Stream,
    frontend: &Frontend,
    shared: &Shared,
    handshaken: &AtomicBool,
) {
    match handshake(&mut stream, &*frontend.backend, &shared.options, handshaken) {
        Ok((session, disk)) => {
            tracing::debug!(
                conn = id,
                export = %session.export.name,
                structured_replies = session.structured_replies,
                block_status = session.base_allocation.is_some(),
                "transmission"
            );
            serve(id, stream, session, None, disk, frontend, shared);
        }
        Err(end) => finish(id, &stream, end, shared),
    }
}

/// The transmission phase of a negotiated connection, then its close.
fn serve(
    id: u64,
    stream: Stream,
    session: Negotiated,
    told_size: Option<&AtomicU64>,
    disk: DiskId,
    frontend: &Frontend,
    shared: &Shared,
) {
    let end = match event_loop::run(id, &stream, &session, told_size, disk, frontend, shared) {
        LoopEnd::ClientClosed => Ended::ClientClosed,
        LoopEnd::Disconnected => Ended::Disconnected,
        LoopEnd::Stopping => Ended::Stopping,
        LoopEnd::Framing(error) => Ended::Framing(error),
        LoopEnd::OversizedWrite(error) => Ended::OversizedWrite(error),
        LoopEnd::ReplyFailed => Ended::ReplyFailed,
        LoopEnd::Io(error) => Ended::from_io(error),
    };
    finish(id, &stream, end, shared);
}

/// Logs why a connection ended and closes its socket.
fn finish(id: u64, stream: &Stream, end: Ended, shared: &Shared) {
    let end = match end {
        Ended::ClientClosed | Ended::Io(_) if shared.is_stopping() => Ended::Stopping,
        end => end,
    };
    match &end {
        Ended::ClientClosed | Ended::Aborted | Ended::Disconnected | Ended::Stopping => {
            tracing::debug!(conn = id, reason = %end, "connection closed");
        }
        _ => tracing::info!(conn = id, reason = %end, "connection dropped"),
    }
    let _ = stream.shutdown(Shutdown::Both);
}

/// What a client may choose from: the backend's exports as this server
/// advertises them. Asked once per connection.
struct Catalog {
    exports: Vec<ExportInfo>,
    /// The disk id of each export.
    ids: Vec<DiskId>,
    default_export: Option<String>,
}

impl Catalog {
    fn new(backend: &dyn Backend, options: &ServerOptions) -> Self {
        let multi_conn = backend.multi_conn_safe();
        let disks = backend.disks();
        let ids = disks.iter().map(|d| d.disk.id).collect();
        let exports = disks
            .into_iter()
            .map(|disk| advertised(export_of(disk), multi_conn, options.block_sizes))
            .collect();
        Self {
            exports,
            ids,
            default_export: options.default_export.clone(),
        }
    }

    /// The disk id of an export (ids are stable, not places in the list).
    fn disk_of(&self, name: &str) -> Option<DiskId> {
        let index = self.exports.iter().position(|export| export.name == name)?;
        self.ids.get(index).copied()
    }
}

impl ExportCatalog for Catalog {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.exports
            .iter()
            .find(|export| export.name == name)
            .cloned()
    }

    fn list(&self) -> Vec<ExportInfo> {
        self.exports.clone()
    }

    /// The configured default, else the only export there is: with one
    /// disk there is nothing to choose (nbdkit and qemu-nbd do the same),
    /// and `nbd+unix:///?socket=…` URIs, nbdfuse `--unix` and nbd-client
    /// without `-N` ask for the empty name.
    fn default_export(&self) -> Option<ExportInfo> {
        match (&self.default_export, self.exports.as_slice()) {
            (Some(name), _) => self.lookup(name),
            (None, [only]) => Some(only.clone()),
            (None, _) => None,
        }
    }
}

/// A backend's disk as an NBD export, before [`advertised`] adds what this
/// server offers.
fn export_of(served: ServedDisk) -> ExportInfo {
    let mut flags = TransmissionFlags::HAS_FLAGS;
    if served.read_only {
        flags |= TransmissionFlags::READ_ONLY;
    }
    ExportInfo {
        name: served.export,
        description: served.description,
        size: served.disk.size,
        flags,
        block_sizes: served.block_sizes,
    }
}

/// An export as this server offers it. Of the backend's flags only
/// `READ_ONLY` and `ROTATIONAL` are kept: the commands offered are the ones
/// this server performs (every [`Backend`] can flush, honour FUA, trim and
/// write zeroes; reads are always one chunk, so DF is free).
/// `SEND_FAST_ZERO` is not offered: nothing here can promise that zeroing
/// is faster than writing. `CAN_MULTI_CONN` only when the backend says a
/// flush covers every connection.
pub(crate) fn advertised(
    mut export: ExportInfo,
    multi_conn: bool,
    limits: BlockSizes,
) -> ExportInfo {
    let mut flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_FUA
        | TransmissionFlags::SEND_TRIM
        | TransmissionFlags::SEND_WRITE_ZEROES
        | TransmissionFlags::SEND_DF
        | export
            .flags
            .intersection(TransmissionFlags::READ_ONLY | TransmissionFlags::ROTATIONAL);
    if multi_conn {
        flags |= TransmissionFlags::CAN_MULTI_CONN;
    }
    export.flags = flags;
    export.block_sizes = merged_block_sizes(export.block_sizes, limits);
    export
}

/// The stricter of the backend's and the server's block sizes: the larger
/// minimum and preferred size, the smaller maximum (rounded down to a
/// multiple of the minimum). Where the two cannot be reconciled, the
/// backend's own sizes win: it knows what it can perform.
pub(crate) fn merged_block_sizes(backend: BlockSizes, server: BlockSizes) -> BlockSizes {
    let min = backend.min().max(server.min());
    let preferred = backend.preferred().max(server.preferred());
    let max = backend.max().min(server.max());
    let max = max - max % min;
    BlockSizes::new(min, preferred, max).unwrap_or_else(|error| {
        tracing::warn!(%error, ?backend, ?server, "server block size limits conflict with the backend's; using the backend's");
        backend
    })
}

/// Runs the negotiation, all of it before `handshake_timeout` elapses;
/// sets `handshaken` before the final reply leaves, so a client that has
/// read it is never taken for one still in its handshake.
fn handshake(
    stream: &mut Stream,
    backend: &dyn Backend,
    options: &ServerOptions,
    handshaken: &AtomicBool,
) -> Result<(Negotiated, DiskId), Ended> {
    let deadline = Instant::now() + options.handshake_timeout;
    let catalog = Catalog::new(backend, options);
    let start = AwaitClientFlags::new();
    write_before(stream, &start.greeting(), deadline)?;
    let mut flags = [0; CLIENT_FLAGS_LEN];
    read_before(stream, &mut flags, deadline)?;
    let mut negotiation = start
        .handle_client_flags(&flags)
        .map_err(Ended::Handshake)?;
    let mut data = Vec::new();
    loop {
        let mut header = [0; OPTION_HEADER_LEN];
        read_before(stream, &mut header, deadline)?;
        let header = OptionHeader::decode(&header).map_err(Ended::Handshake)?;
        // At most MAX_OPTION_LEN (64 KiB): checked by decode.
        data.resize(usize::try_from(header.len).unwrap_or(usize::MAX), 0);
        read_before(stream, &mut data, deadline)?;
        match negotiation.handle_option(header.option, &data, &catalog) {
            OptionOutcome::Reply { options, reply } => {
                write_before(stream, &reply, deadline)?;
                negotiation = options;
            }
            OptionOutcome::Abort { reply } => {
                // The client may already be gone; the protocol allows that.
                let _ = write_before(stream, &reply, deadline);
                return Err(Ended::Aborted);
            }
            OptionOutcome::Go { session, reply } => {
                let Some(disk) = catalog.disk_of(&session.export.name) else {
                    // The catalog resolved the name, so it has an index.
                    return Err(Ended::Io(io::Error::other(
                        "export vanished from the catalog",
                    )));
                };
                handshaken.store(true, Ordering::SeqCst);
                write_before(stream, &reply, deadline)?;
                return Ok((session, disk));
            }
            OptionOutcome::Close(error) => return Err(Ended::Handshake(error)),
        }
    }
}

/// Fills `buf`, failing with [`Ended::TimedOut`] at `deadline` however
/// slowly the bytes trickle in.
fn read_before(stream: &mut Stream, buf: &mut [u8], deadline: Instant) -> Result<(), Ended> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Ended::TimedOut);
        }
        stream.set_read_timeout(Some(left)).map_err(Ended::Io)?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(Ended::ClientClosed),
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(Ended::from_io(error)),
        }
    }
    Ok(())
}

/// Writes all of `buf`, failing with [`Ended::TimedOut`] at `deadline`.
fn write_before(stream: &mut Stream, buf: &[u8], deadline: Instant) -> Result<(), Ended> {
    let mut written = 0;
    while written < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Ended::TimedOut);
        }
        stream.set_write_timeout(Some(left)).map_err(Ended::Io)?;
        match stream.write(&buf[written..]) {
            Ok(0) => return Err(Ended::Io(io::ErrorKind::WriteZero.into())),
            Ok(wrote) => written += wrote,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(Ended::from_io(error)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(min: u32, preferred: u32, max: u32) -> BlockSizes {
        BlockSizes::new(min, preferred, max).unwrap()
    }

    #[test]
    fn block_sizes_take_the_stricter_of_both() {
        assert_eq!(
            merged_block_sizes(sizes(512, 4096, 1 << 30), sizes(1, 4096, 32 << 20)),
            sizes(512, 4096, 32 << 20)
        );
        assert_eq!(
            merged_block_sizes(sizes(1, 512, 1 << 20), sizes(1, 4096, 32 << 20)),
            sizes(1, 4096, 1 << 20)
        );
        // A backend maximum below the server's preferred size: the backend's
        // sizes are used as they are.
        assert_eq!(
            merged_block_sizes(sizes(512, 512, 1024), sizes(1, 4096, 32 << 20)),
            sizes(512, 512, 1024)
        );
    }
}
