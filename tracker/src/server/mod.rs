//! The NBD server shell: sockets, threads and timeouts around the sans-IO
//! protocol layer ([`crate::nbd`]) and a queue core ([`crate::queue`])
//! that performs requests.
//!
//! # Threads
//!
//! ```text
//!  accept thread ──► connection thread, one per client
//!  (poll: listener,    handshake (blocking, one deadline for all of it),
//!   stop waker)        then the transmission phase: an event loop on the
//!                      connection's own io_uring (`event_loop`): read
//!                      requests, submit their device I/O, send replies;
//!                      no hand-off to another thread per request
//! ```
//!
//! - **Parallelism.** A client with 32 requests in flight has 32 requests
//!   in the kernel at once, submitted by its connection's loop in batches.
//!   Replies go out in completion order, which NBD allows, each whole.
//!   Connections of one group share the group's change log through a short
//!   critical section and its committer thread (see [`crate::commit`]).
//! - **Bounded memory.** Per connection at most
//!   [`ServerOptions::max_in_flight`] requests and
//!   [`ServerOptions::max_in_flight_bytes`] of data buffers, and for all
//!   connections together [`ServerOptions::budget`] (one larger request may
//!   run alone; a connection holding nothing may run one request of up to
//!   [`FLOOR_BYTES`] past a spent budget, within [`FLOOR_RESERVE`] for all).
//!   A header is only taken off the stream once its request
//!   fits, so a client that floods requests is simply not read from.
//! - **Hostile clients.** The handshake has one deadline
//!   ([`ServerOptions::handshake_timeout`]) however slowly bytes trickle in,
//!   and when [`ServerOptions::max_connections`] is reached a new client
//!   takes the place of the oldest one still in its handshake: clients that
//!   connect and say nothing cannot lock real ones out. Garbage ends the
//!   connection (never a panic); refused writes have their payload skipped
//!   or, when too large, the connection closed, as
//!   [`Recovery`](crate::nbd::transmission::Recovery) says. A client that
//!   stops reading replies stalls only its own connection, and is dropped
//!   when a reply makes no progress for [`ServerOptions::reply_timeout`].
//!   Connections share no thread: one misbehaving client leaves the others
//!   served.
//! - **Ending a connection.** On `NBD_CMD_DISC`, EOF, garbage or shutdown
//!   the loop stops reading, waits until every request it handed to its
//!   queue has been answered, then closes the socket. A write whose
//!   payload never fully arrived is never performed.
//! - **Shutdown** ([`ServerHandle::shutdown`]): stop accepting, wake every
//!   connection (`shutdown(SHUT_RD)`: requests already received are still
//!   served, then the loop stops at the next request boundary), let
//!   requests in flight finish and reply, close, join every thread, remove
//!   the unix socket. When it returns, no request is running or will
//!   start, so the daemon can write its final barrier.
//!
//! # What is offered
//!
//! Exports are the backend's ([`Backend::disks`], asked at every
//! handshake; the disk id is the index in that list), with flush, FUA,
//! trim, write-zeroes and DF offered, `CAN_MULTI_CONN` only when
//! [`Backend::multi_conn_safe`], and block sizes the stricter of the
//! backend's and [`ServerOptions::block_sizes`].
//!
//! The process must not die of `SIGPIPE` when a client vanishes: Rust
//! programs ignore it from `main` on, and so must any other host of this
//! code.

mod connection;
mod event_loop;
mod listener;

use std::io::{self, Write};
use std::net::{Shutdown, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno as SysErrno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::backend::{Allocation, AllocationKind, Backend};
use crate::group::Group;
use crate::nbd::constants::ExtentStatus;
use crate::nbd::export::BlockSizes;
use crate::nbd::transmission::BlockStatusExtent;
use crate::queue::{BlockingPool, Queue, QueueWaker};
use crate::storage::BlockDevice;
use crate::write_path::GroupQueue;

pub(crate) use event_loop::{build_ring, Buffers};
pub use event_loop::{DataBudget, FLOOR_BYTES, FLOOR_RESERVE};
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here leaves its data half-changed across a panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The default of [`ServerOptions::budget`]: data buffers in flight for all
/// connections together.
pub const DEFAULT_DATA_BUDGET: u64 = 64 << 20;

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
    /// Most connections served at once. At the limit, a new client takes
    /// the place of the oldest connection still in its handshake; if there
    /// is none, the new one is closed. Default 64.
    pub max_connections: usize,
    /// Most requests in flight per connection. Default 128.
    pub max_in_flight: usize,
    /// Most bytes of read and write data in flight per connection; a single
    /// larger request still runs, alone. Default 64 MiB.
    pub max_in_flight_bytes: u64,
    /// Data buffers in flight for every connection together (and every
    /// server and ublk queue given the same budget): what bounds the
    /// tracker's memory. Default [`DEFAULT_DATA_BUDGET`], a budget of the
    /// server's own.
    pub budget: Arc<DataBudget>,
    /// Time allowed for the whole handshake, from accept to transmission.
    /// Default 10 s.
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
            max_connections: 64,
            max_in_flight: 128,
            max_in_flight_bytes: 64 << 20,
            budget: DataBudget::new(DEFAULT_DATA_BUDGET),
            handshake_timeout: Duration::from_secs(10),
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
        let problem = if self.max_connections == 0 {
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
static ADOPTED_IDS: AtomicU64 = AtomicU64::new(1 << 32);

/// What the server's threads share.
pub(crate) struct Shared {
    pub(crate) options: ServerOptions,
    pub(crate) stopping: AtomicBool,
    pub(crate) budget: Arc<DataBudget>,
}

/// Makes the queue core of a new connection, woken through the waker.
pub type QueueFactory =
    dyn Fn(&Arc<QueueWaker>, std::time::Instant) -> Box<dyn Queue> + Send + Sync;

/// What a server serves: the backend (exports, block status) and the
/// queue core that performs a connection's requests.
pub struct Frontend {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) queues: Box<QueueFactory>,
    /// The backing devices by disk id (`None` where no disk has the id),
    /// for the loops' own device I/O.
    pub(crate) devices: Vec<Option<Arc<dyn BlockDevice>>>,
    /// Submit device reads, writes and flushes on the loops' rings.
    pub(crate) use_ring: bool,
}

impl Frontend {
    /// Any synchronous backend, its requests performed on a pool of
    /// `threads` threads shared by every connection
    /// ([`BlockingQueue`](crate::queue::BlockingQueue)).
    pub fn blocking(backend: Arc<dyn Backend>, threads: usize) -> io::Result<Frontend> {
        let pool = BlockingPool::start(Arc::clone(&backend), threads)?;
        Ok(Frontend {
            backend,
            queues: Box::new(move |waker, _| Box::new(pool.queue(waker))),
            devices: Vec::new(),
            use_ring: false,
        })
    }

    /// A consistency group through its write path ([`GroupQueue`]); with
    /// `use_ring`, device I/O goes through each connection's io_uring,
    /// otherwise through the synchronous engine on the connection's thread.
    pub fn group(group: Arc<Group>, use_ring: bool) -> Frontend {
        let devices = group.devices_by_id();
        let backend: Arc<dyn Backend> = group.clone();
        Frontend {
            backend,
            queues: Box::new(move |waker, now| {
                Box::new(GroupQueue::new(Arc::clone(&group), Arc::clone(waker), now))
            }),
            devices,
            use_ring,
        }
    }
}

/// A backend's allocation of `offset..offset+length` as `base:allocation`
/// extents, held to what the protocol allows: in order from `offset`, no
/// zero-length extents, none past the requested range, one with `REQ_ONE`;
/// neighbours with the same status merged. A hole reads as zeroes
/// (`HOLE | ZERO`), allocated zeroes are `ZERO`, data is no flag. A run
/// that leaves a gap or goes backwards ends the answer there; an empty
/// answer becomes "all data", which is always correct.
pub(crate) fn block_status_extents(
    runs: &[Allocation],
    offset: u64,
    length: u32,
    req_one: bool,
) -> Vec<BlockStatusExtent> {
    let end = offset + u64::from(length);
    let mut at = offset;
    let mut extents: Vec<BlockStatusExtent> = Vec::new();
    for run in runs {
        let (start, stop) = (
            run.extent.offset,
            run.extent.offset.saturating_add(run.extent.length),
        );
        if stop <= at {
            continue;
        }
        if start > at || at >= end {
            break;
        }
        let take = (stop.min(end) - at) as u32;
        let status = match run.kind {
            AllocationKind::Data => ExtentStatus::empty(),
            AllocationKind::Zero => ExtentStatus::ZERO,
            AllocationKind::Hole => ExtentStatus::HOLE | ExtentStatus::ZERO,
        };
        let started = !extents.is_empty();
        match extents.last_mut() {
            Some(last) if last.status == status => last.length += take,
            _ if req_one && started => break,
            _ => extents.push(BlockStatusExtent {
                length: take,
                status,
            }),
        }
        at += u64::from(take);
    }
    if extents.is_empty() {
        extents.push(BlockStatusExtent {
            length,
            status: ExtentStatus::empty(),
        });
    }
    extents
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
    start: Option<Sender<Arc<Frontend>>>,
}

/// A serving server. [`shutdown`](Self::shutdown) stops it; dropping it
/// does the same.
pub struct ServerHandle {
    addr: ListenAddr,
    /// `None` only once stopped.
    running: Option<Running>,
    /// What performs requests, for connections handed in by
    /// [`adopt`](Self::adopt).
    frontend: Arc<Frontend>,
}

/// Hands connections already in transmission to a running server; see
/// [`ServerHandle::adopter`].
#[derive(Clone)]
pub struct Adopter {
    shared: Arc<Shared>,
    connections: Arc<Mutex<Vec<ConnectionEntry>>>,
    frontend: Arc<Frontend>,
}

impl std::fmt::Debug for Adopter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adopter").finish_non_exhaustive()
    }
}

impl Adopter {
    /// As [`ServerHandle::adopt`].
    pub fn adopt(&self, stream: UnixStream, export: &str) -> io::Result<Adopted> {
        self.adopt_told(stream, export, Arc::new(AtomicU64::new(0)))
    }

    /// [`adopt`](Self::adopt), holding the connection's requests to
    /// `told_size`: the size its client was told out of band, raised first
    /// to the export's size now. Whoever tells the client a larger size
    /// raises it first (see [`crate::kernel_size`]), so the connection
    /// takes requests up to the new end as soon as the client may send
    /// them; it is shared by the successive connections of one client.
    pub fn adopt_told(
        &self,
        stream: UnixStream,
        export: &str,
        told_size: Arc<AtomicU64>,
    ) -> io::Result<Adopted> {
        if self.shared.is_stopping() {
            return Err(io::Error::other("the NBD server has stopped"));
        }
        let (session, disk) = connection::session_without_handshake(
            &*self.frontend.backend,
            &self.shared.options,
            export,
        )
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
        told_size.fetch_max(info.size, Ordering::AcqRel);
        let (done, ended) = mpsc::channel::<()>();
        let frontend = Arc::clone(&self.frontend);
        let shared = Arc::clone(&self.shared);
        let thread = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                connection::run_negotiated(
                    id, stream, session, &told_size, disk, &frontend, &shared,
                );
                drop(done);
            })?;
        lock(&self.connections).push(ConnectionEntry {
            stream: waker,
            thread,
            handshake: None,
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
    socket_file: Option<SocketFile>,
    stopped: bool,
}

/// A live connection as the server tracks it, to stop and join it.
struct ConnectionEntry {
    /// Another handle to the client's socket, to wake its thread.
    stream: Stream,
    thread: JoinHandle<()>,
    /// While the client is in its handshake: set by the connection once it
    /// is past it, and when it started (the oldest goes first when a new
    /// client needs the place).
    handshake: Option<(Arc<AtomicBool>, std::time::Instant)>,
}

impl ConnectionEntry {
    fn in_handshake(&self) -> bool {
        self.handshake
            .as_ref()
            .is_some_and(|(done, _)| !done.load(Ordering::SeqCst))
    }
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

    /// Starts serving a synchronous `backend`'s exports, its requests
    /// performed on a pool of eight threads ([`Frontend::blocking`]).
    /// Fails only if no thread can be started.
    pub fn serve(self, backend: Arc<dyn Backend>) -> io::Result<ServerHandle> {
        Ok(self.serve_frontend(Frontend::blocking(backend, 8)?))
    }

    /// Starts serving what `frontend` serves.
    pub fn serve_frontend(mut self, frontend: Frontend) -> ServerHandle {
        let frontend = Arc::new(frontend);
        if let Some(start) = self.start.take() {
            // The accept thread waits for exactly this; it only goes away
            // when the server stops, which has not happened.
            let _ = start.send(Arc::clone(&frontend));
        }
        ServerHandle {
            addr: self.addr.clone(),
            running: self.running.take(),
            frontend,
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
        let shared = Arc::new(Shared {
            budget: Arc::clone(&options.budget),
            options,
            stopping: AtomicBool::new(false),
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
            frontend: Arc::clone(&self.frontend),
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
    }
}

/// Accepts connections until the server stops. Waits for the backend
/// first: a server that is never served never accepts.
fn accept_loop(
    listener: &Listener,
    wakee: &UnixStream,
    started: &Receiver<Arc<Frontend>>,
    shared: &Arc<Shared>,
    connections: &Mutex<Vec<ConnectionEntry>>,
) {
    let Ok(frontend) = started.recv() else {
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
                    admit(next_id, stream, &frontend, shared, connections);
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
    frontend: &Arc<Frontend>,
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
    let live = entries.iter().filter(|e| !e.thread.is_finished()).count();
    if live >= shared.options.max_connections {
        // Idle clients must not lock real ones out: the oldest connection
        // still in its handshake makes room (its thread ends at once, and
        // is joined at a later accept). Connections past the handshake are
        // never dropped for a newcomer.
        let oldest = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.in_handshake() && !e.thread.is_finished())
            .min_by_key(|(_, e)| e.handshake.as_ref().map(|(_, since)| *since))
            .map(|(i, _)| i);
        match oldest {
            Some(i) => {
                let entry = &mut entries[i];
                tracing::info!(
                    limit = shared.options.max_connections,
                    "connection limit reached: dropping the oldest connection still in its handshake"
                );
                let _ = entry.stream.shutdown(Shutdown::Both);
                // It no longer counts as a handshake to evict.
                entry.handshake = None;
            }
            None => {
                tracing::warn!(
                    limit = shared.options.max_connections,
                    "too many NBD connections; closing a new one"
                );
                return;
            }
        }
    }
    let waker = match stream.try_clone() {
        Ok(waker) => waker,
        Err(error) => {
            tracing::warn!(%error, "cannot track a new NBD connection; closing it");
            return;
        }
    };
    let handshaken = Arc::new(AtomicBool::new(false));
    let spawned = {
        let frontend = Arc::clone(frontend);
        let shared = Arc::clone(shared);
        let handshaken = Arc::clone(&handshaken);
        std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || connection::run(id, stream, &frontend, &shared, &handshaken))
    };
    match spawned {
        Ok(thread) => {
            tracing::debug!(conn = id, "connection accepted");
            entries.push(ConnectionEntry {
                stream: waker,
                thread,
                handshake: Some((handshaken, std::time::Instant::now())),
            });
        }
        Err(error) => tracing::warn!(%error, "cannot start a thread for a new NBD connection"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_changelog::{DiskId, Extent};

    fn run(offset: u64, length: u64, kind: AllocationKind) -> Allocation {
        Allocation {
            extent: Extent {
                disk: DiskId(0),
                offset,
                length,
            },
            kind,
        }
    }

    fn flags(extents: &[BlockStatusExtent]) -> Vec<(u32, u32)> {
        extents
            .iter()
            .map(|e| (e.length, e.status.bits()))
            .collect()
    }

    /// Holes are HOLE|ZERO, allocated zeroes ZERO, data no flag; runs are
    /// clipped to the request, neighbours of one status merged.
    #[test]
    fn allocation_becomes_base_allocation_extents() {
        let runs = [
            run(0, 4096, AllocationKind::Data),
            run(4096, 4096, AllocationKind::Hole),
            run(8192, 4096, AllocationKind::Hole),
            run(12288, 4096, AllocationKind::Zero),
            run(16384, 1 << 20, AllocationKind::Data),
        ];
        let hole_zero = (ExtentStatus::HOLE | ExtentStatus::ZERO).bits();
        let zero = ExtentStatus::ZERO.bits();
        assert_eq!(
            flags(&block_status_extents(&runs, 2048, 20480, false)),
            [(2048, 0), (8192, hole_zero), (4096, zero), (6144, 0)]
        );
        assert_eq!(
            flags(&block_status_extents(&runs, 4096, 20480, true)),
            [(8192, hole_zero)]
        );
    }

    /// What the protocol forbids never reaches the client: an empty answer
    /// or one that starts late is "all data", a gap ends the answer.
    #[test]
    fn a_bad_answer_is_cut_or_becomes_data() {
        assert_eq!(flags(&block_status_extents(&[], 0, 512, false)), [(512, 0)]);
        let late = [run(4096, 4096, AllocationKind::Hole)];
        assert_eq!(
            flags(&block_status_extents(&late, 0, 8192, false)),
            [(8192, 0)]
        );
        let gap = [
            run(0, 4096, AllocationKind::Hole),
            run(8192, 4096, AllocationKind::Data),
        ];
        let hole_zero = (ExtentStatus::HOLE | ExtentStatus::ZERO).bits();
        assert_eq!(
            flags(&block_status_extents(&gap, 0, 12288, false)),
            [(4096, hole_zero)]
        );
    }
}
