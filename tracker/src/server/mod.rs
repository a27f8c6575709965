//! The NBD server shell: sockets, threads and timeouts around the sans-IO
//! protocol layer ([`crate::nbd`]), performing requests through a
//! [`Backend`].
//!
//! # Threads
//!
//! ```text
//!  accept thread ──► connection thread, one per client
//!  (poll: listener,    handshake (blocking, one deadline for all of it),
//!   stop waker)        then: read header → validate → take an in-flight slot
//!                            → read a write's payload → push to the queue
//!                                       │        (refusals answered here)
//!                                       ▼
//!                      request queue ──► worker pool, N threads
//!                                        backend call → reply into the
//!                                        connection's outbox; the one worker
//!                                        writing for that connection sends it
//!                                        whole → slot released
//! ```
//!
//! - **Parallelism.** A client with 32 requests in flight gets up to
//!   [`ServerOptions::workers`] backend calls at once. Replies go out in
//!   completion order, which NBD allows; each is written header and data
//!   together, in one gathered write, by one writer at a time per
//!   connection. A worker finding another worker writing leaves its reply
//!   in the outbox and moves on, so it never queues behind a slow socket.
//! - **Bounded memory.** Per connection at most
//!   [`ServerOptions::max_in_flight`] requests and
//!   [`ServerOptions::max_in_flight_bytes`] of data buffers (one larger
//!   request may run alone). The connection thread takes a slot *before*
//!   reading a write's payload, so a client that floods writes is simply not
//!   read from. Small data buffers are pooled.
//! - **Hostile clients.** The handshake has one deadline
//!   ([`ServerOptions::handshake_timeout`]) however slowly bytes trickle in.
//!   Garbage ends the connection (never a panic); refused writes have their
//!   payload skipped or, when too large, the connection closed, as
//!   [`Recovery`](crate::nbd::transmission::Recovery) says. A client that
//!   stops reading replies holds one worker (its connection's writer), and
//!   only until [`ServerOptions::reply_timeout`], when it is dropped. A
//!   panicking backend call costs one `EIO` reply. Connections share
//!   nothing but the worker pool: one misbehaving client leaves the others
//!   served.
//! - **Ending a connection.** On `NBD_CMD_DISC`, EOF, garbage or shutdown
//!   the connection thread stops reading, waits until every request it
//!   dispatched has been answered, then closes the socket. A write whose
//!   payload never fully arrived is never performed.
//! - **Shutdown** ([`ServerHandle::shutdown`]): stop accepting, wake every
//!   connection thread (`shutdown(SHUT_RD)`: requests already received are
//!   still served, then the thread stops at the next request boundary), let
//!   requests in flight finish and reply, close, join every thread, remove
//!   the unix socket. When it returns, no backend call is running or will
//!   start, so the daemon can write its final barrier.
//!
//! # What is offered
//!
//! Exports are the backend's ([`Backend::exports`], asked at every
//! handshake; the disk id is the index in that list), with flush, FUA,
//! trim, write-zeroes and DF offered, `CAN_MULTI_CONN` only when
//! [`Backend::multi_conn_safe`], and block sizes the stricter of the
//! backend's and [`ServerOptions::block_sizes`].
//!
//! The process must not die of `SIGPIPE` when a client vanishes: Rust
//! programs ignore it from `main` on, and so must any other host of this
//! code.

mod connection;
mod listener;
mod reply;
mod worker;

use std::io::{self, Write};
use std::net::{Shutdown, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno as SysErrno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::backend::Backend;
use crate::nbd::export::BlockSizes;

pub use listener::ListenAddr;

/// Binds a unix socket that only its owner can connect to (0600 from the
/// first instant), replacing a stale one and refusing a live one: the same
/// rules as the NBD socket, for the daemons' other sockets (control).
pub fn bind_private_unix(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    match listener::bind_private_unix(path, None)?.0 {
        Listener::Unix(unix) => Ok(unix),
        Listener::Tcp(_) => Err(io::Error::other("a unix bind returned a TCP listener")),
    }
}
use listener::{Listener, SocketFile, Stream};
use worker::{lock, BufferPool, RequestQueue};

/// The server's block size limits unless configured: byte-granular
/// requests (what `qemu-io` and the kernel may send), 4 KiB preferred, and
/// 32 MiB per request.
pub const DEFAULT_BLOCK_SIZES: BlockSizes = match BlockSizes::new(1, 4096, 32 << 20) {
    Ok(sizes) => sizes,
    Err(_) => panic!("the default block sizes follow the protocol's rules"),
};

/// How the server behaves. Every field has a default ([`Default`]).
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Worker threads performing requests, shared by all connections.
    /// Default 8.
    pub workers: usize,
    /// Most connections served at once; more are closed as they arrive.
    /// Default 64.
    pub max_connections: usize,
    /// Most requests in flight per connection. Default 128.
    pub max_in_flight: usize,
    /// Most bytes of read and write data in flight per connection; a single
    /// larger request still runs, alone. Default 256 MiB.
    pub max_in_flight_bytes: u64,
    /// Time allowed for the whole handshake, from accept to transmission.
    /// Default 30 s.
    pub handshake_timeout: Duration,
    /// Time one reply may take to be written, however slowly the client
    /// reads, before the client is considered gone and its connection
    /// dropped. Default 30 s.
    pub reply_timeout: Duration,
    /// Block size limits; each export gets the stricter of these and its
    /// backend's. Default [`DEFAULT_BLOCK_SIZES`] (1, 4 KiB, 32 MiB).
    pub block_sizes: BlockSizes,
    /// The export a client gets when it asks for the empty name (as
    /// `nbd+unix:///?socket=…` URIs do). Default: the only export, when
    /// the backend has one; none when it has several.
    pub default_export: Option<String>,
    /// The group (gid) a unix socket is opened to: mode 0660 and this
    /// group instead of 0600, for a local client that runs as another
    /// user. Default none.
    pub socket_group: Option<u32>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            workers: 8,
            max_connections: 64,
            max_in_flight: 128,
            max_in_flight_bytes: 256 << 20,
            handshake_timeout: Duration::from_secs(30),
            reply_timeout: Duration::from_secs(30),
            block_sizes: DEFAULT_BLOCK_SIZES,
            default_export: None,
            socket_group: None,
        }
    }
}

impl ServerOptions {
    /// Refuses options the server cannot work with (a configuration fault).
    fn validate(&self) -> io::Result<()> {
        let problem = if self.workers == 0 {
            "workers must be at least 1"
        } else if self.max_connections == 0 {
            "max_connections must be at least 1"
        } else if self.max_in_flight == 0 {
            "max_in_flight must be at least 1"
        } else if self.handshake_timeout.is_zero() {
            "handshake_timeout must be positive"
        } else if self.reply_timeout.is_zero() {
            "reply_timeout must be positive"
        } else {
            return Ok(());
        };
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("NBD server options: {problem}"),
        ))
    }
}

/// Connection ids of adopted connections, apart from the accepted ones'
/// (which count from 1 per server); for the log only.
static ADOPTED_IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 32);

/// What the server's threads share.
pub(crate) struct Shared {
    pub(crate) options: ServerOptions,
    stopping: AtomicBool,
    pub(crate) queue: Arc<RequestQueue>,
    pub(crate) buffers: Arc<BufferPool>,
}

impl Shared {
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

/// A bound server, not yet serving. Binding does everything that can fail
/// (socket, threads); [`serve`](Self::serve) cannot. Dropping it unserved
/// releases everything.
pub struct Server {
    addr: ListenAddr,
    /// `None` only after `serve` handed it on.
    running: Option<Running>,
    start: Option<Sender<Arc<dyn Backend>>>,
}

/// A serving server. [`shutdown`](Self::shutdown) stops it; dropping it
/// does the same.
pub struct ServerHandle {
    addr: ListenAddr,
    /// `None` only once stopped.
    running: Option<Running>,
    /// What performs requests, for connections handed in by
    /// [`adopt`](Self::adopt).
    backend: Arc<dyn Backend>,
}

/// Hands connections already in transmission to a running server; see
/// [`ServerHandle::adopter`].
#[derive(Clone)]
pub struct Adopter {
    shared: Arc<Shared>,
    connections: Arc<Mutex<Vec<ConnectionEntry>>>,
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Adopter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adopter").finish_non_exhaustive()
    }
}

impl Adopter {
    /// As [`ServerHandle::adopt`].
    pub fn adopt(&self, stream: UnixStream, export: &str) -> io::Result<Adopted> {
        if self.shared.is_stopping() {
            return Err(io::Error::other("the NBD server has stopped"));
        }
        let (session, disk) =
            connection::session_without_handshake(&*self.backend, &self.shared.options, export)
                .ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("no export named {export:?}"),
                    )
                })?;
        stream.set_nonblocking(false)?;
        let stream = Stream::Unix(stream);
        let waker = stream.try_clone()?;
        let id = ADOPTED_IDS.fetch_add(1, Ordering::Relaxed);
        let info = session.export.clone();
        let (done, ended) = mpsc::channel::<()>();
        let backend = Arc::clone(&self.backend);
        let shared = Arc::clone(&self.shared);
        let thread = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                connection::run_negotiated(id, stream, session, disk, backend, shared);
                drop(done);
            })?;
        lock(&self.connections).push(ConnectionEntry {
            stream: waker,
            thread,
        });
        Ok(Adopted {
            export: info,
            ended,
        })
    }
}

/// A connection handed to the server by [`ServerHandle::adopt`].
#[derive(Debug)]
pub struct Adopted {
    /// The export as the client must be told about it: size, transmission
    /// flags (as a connection without structured replies has them), block
    /// sizes.
    pub export: crate::nbd::export::ExportInfo,
    /// Disconnected (its sender dropped) once the connection has ended
    /// and every request it brought has been answered.
    pub ended: Receiver<()>,
}

/// Everything a stop tears down.
struct Running {
    shared: Arc<Shared>,
    /// Writing a byte wakes the accept thread.
    waker: UnixStream,
    accept: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<ConnectionEntry>>>,
    workers: Vec<JoinHandle<()>>,
    socket_file: Option<SocketFile>,
    stopped: bool,
}

/// A live connection as the server tracks it, to stop and join it.
struct ConnectionEntry {
    /// Another handle to the client's socket, to wake its thread.
    stream: Stream,
    thread: JoinHandle<()>,
}

impl Server {
    /// Binds a unix socket at `path`, mode 0600 from the first instant
    /// (see the listener module for how). A stale socket file is replaced;
    /// a socket some process still accepts on is an error
    /// ([`io::ErrorKind::AddrInUse`]), and so is any other file there.
    pub fn bind_unix(path: impl AsRef<Path>, options: ServerOptions) -> io::Result<Self> {
        options.validate()?;
        let (listener, addr, file) =
            listener::bind_private_unix(path.as_ref(), options.socket_group)?;
        Self::start(listener, addr, Some(file), options)
    }

    /// Binds a TCP socket (port 0: the kernel picks one; see
    /// [`addr`](Self::addr)). NBD has no authentication here: bind to
    /// loopback or a trusted network only.
    pub fn bind_tcp(addr: impl ToSocketAddrs, options: ServerOptions) -> io::Result<Self> {
        options.validate()?;
        let (listener, addr) = Listener::bind_tcp(addr)?;
        Self::start(listener, addr, None, options)
    }

    /// Where the server listens.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Starts serving `backend`'s exports.
    pub fn serve(mut self, backend: Arc<dyn Backend>) -> ServerHandle {
        if let Some(start) = self.start.take() {
            // The accept thread waits for exactly this; it only goes away
            // when the server stops, which has not happened.
            let _ = start.send(Arc::clone(&backend));
        }
        ServerHandle {
            addr: self.addr.clone(),
            running: self.running.take(),
            backend,
        }
    }

    fn start(
        listener: Listener,
        addr: ListenAddr,
        mut socket_file: Option<SocketFile>,
        options: ServerOptions,
    ) -> io::Result<Self> {
        let result = Self::spawn(listener, addr, &mut socket_file, options);
        if result.is_err() {
            if let Some(file) = socket_file {
                file.remove();
            }
        }
        result
    }

    fn spawn(
        listener: Listener,
        addr: ListenAddr,
        socket_file: &mut Option<SocketFile>,
        options: ServerOptions,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let (waker, wakee) = UnixStream::pair()?;
        let queue = Arc::new(RequestQueue::default());
        let buffers = Arc::new(BufferPool::default());
        let workers = worker::spawn_workers(options.workers, &queue, &buffers)?;
        let shared = Arc::new(Shared {
            options,
            stopping: AtomicBool::new(false),
            queue,
            buffers,
        });
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (start, started) = mpsc::channel();
        let accept = {
            let shared = Arc::clone(&shared);
            let connections = Arc::clone(&connections);
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&listener, &wakee, &started, &shared, &connections))
        };
        let mut running = Running {
            shared,
            waker,
            accept: None,
            connections,
            workers,
            socket_file: None,
            stopped: false,
        };
        match accept {
            Ok(thread) => running.accept = Some(thread),
            Err(error) => {
                running.stop();
                return Err(error);
            }
        }
        running.socket_file = socket_file.take();
        Ok(Self {
            addr,
            running: Some(running),
            start: Some(start),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping the sender lets an unserved accept thread exit.
        self.start = None;
        if let Some(mut running) = self.running.take() {
            running.stop();
        }
    }
}

impl ServerHandle {
    /// Where the server listens.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// Connections currently open (in the handshake or transmission).
    pub fn connections(&self) -> usize {
        self.running.as_ref().map_or(0, |running| {
            lock(&running.connections)
                .iter()
                .filter(|entry| !entry.thread.is_finished())
                .count()
        })
    }

    /// Serves `stream` as a connection already in the transmission phase
    /// for `export`: its client does no handshake (the kernel's NBD client
    /// attached over netlink with the size and flags from the returned
    /// [`Adopted::export`]). It is served like any accepted connection and
    /// stopped by [`shutdown`](Self::shutdown) like one.
    pub fn adopt(&self, stream: UnixStream, export: &str) -> io::Result<Adopted> {
        self.adopter()?.adopt(stream, export)
    }

    /// What adopts connections from another thread (this handle is
    /// consumed by [`shutdown`](Self::shutdown)); it refuses once the
    /// server stops.
    pub fn adopter(&self) -> io::Result<Adopter> {
        let running = self
            .running
            .as_ref()
            .ok_or_else(|| io::Error::other("the NBD server has stopped"))?;
        Ok(Adopter {
            shared: Arc::clone(&running.shared),
            connections: Arc::clone(&running.connections),
            backend: Arc::clone(&self.backend),
        })
    }

    /// Stops accepting, lets every request in flight finish and reply,
    /// closes every connection and joins every thread; returns when all
    /// of that is done. Requests a client sends after this began are not
    /// performed (those already received may be).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut running) = self.running.take() {
            running.stop();
            tracing::debug!(addr = %self.addr, "NBD server stopped");
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Running {
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = (&self.waker).write_all(&[1]);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        // The listener is closed now: new clients are refused.
        if let Some(file) = self.socket_file.take() {
            file.remove();
        }
        let entries = std::mem::take(&mut *lock(&self.connections));
        for entry in &entries {
            // Wakes a thread blocked reading; data already received can
            // still be read, so a request in the socket is not cut short.
            let _ = entry.stream.shutdown(Shutdown::Read);
        }
        for entry in entries {
            let _ = entry.thread.join();
        }
        // No connection is left to queue work; let the workers drain.
        self.shared.queue.close();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// Accepts connections until the server stops. Waits for the backend
/// first: a server that is never served never accepts.
fn accept_loop(
    listener: &Listener,
    wakee: &UnixStream,
    started: &Receiver<Arc<dyn Backend>>,
    shared: &Arc<Shared>,
    connections: &Mutex<Vec<ConnectionEntry>>,
) {
    let Ok(backend) = started.recv() else {
        return;
    };
    let mut next_id = 0u64;
    while !shared.is_stopping() {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wakee.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(SysErrno::EINTR) => {}
            Err(error) => {
                tracing::error!(%error, "poll on the NBD listener failed; retrying");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        if fds[1].any().unwrap_or(false) || shared.is_stopping() {
            return;
        }
        // The listener is non-blocking: take every pending connection.
        loop {
            match listener.accept() {
                Ok(stream) => {
                    next_id += 1;
                    admit(next_id, stream, &backend, shared, connections);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning; the
                    // pending client waits in the backlog.
                    tracing::warn!(%error, "accepting an NBD connection failed");
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// Starts a thread for a new connection, within the connection limit.
fn admit(
    id: u64,
    stream: Stream,
    backend: &Arc<dyn Backend>,
    shared: &Arc<Shared>,
    connections: &Mutex<Vec<ConnectionEntry>>,
) {
    let mut entries = lock(connections);
    // Join the threads of connections that ended since the last accept.
    let (finished, live): (Vec<_>, Vec<_>) = std::mem::take(&mut *entries)
        .into_iter()
        .partition(|entry| entry.thread.is_finished());
    *entries = live;
    for entry in finished {
        let _ = entry.thread.join();
    }
    if entries.len() >= shared.options.max_connections {
        tracing::warn!(
            limit = shared.options.max_connections,
            "too many NBD connections; closing a new one"
        );
        return;
    }
    let waker = match stream.try_clone() {
        Ok(waker) => waker,
        Err(error) => {
            tracing::warn!(%error, "cannot track a new NBD connection; closing it");
            return;
        }
    };
    let spawned = {
        let backend = Arc::clone(backend);
        let shared = Arc::clone(shared);
        std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || connection::run(id, stream, backend, shared))
    };
    match spawned {
        Ok(thread) => {
            tracing::debug!(conn = id, "connection accepted");
            entries.push(ConnectionEntry {
                stream: waker,
                thread,
            });
        }
        Err(error) => tracing::warn!(%error, "cannot start a thread for a new NBD connection"),
    }
}
