//! A test failover served over NBD on a unix socket: the one way the
//! replica site hands a test's disks to a client, used by the CLI
//! (`tidemark test-failover start`, which ends it on a signal) and by the
//! web console (which ends it when an operator cleans it up). The test's
//! overlay ([`CowOverlay`]) is the NBD server's backend; one export per
//! disk, named after the disk.
//!
//! [`ServedTestFailover`] owns the running test and its server: dropping
//! it or calling [`ServedTestFailover::end`] stops serving, removes the
//! socket, and ends the test (its pin and scratch files removed).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tidemark_changelog::{DiskId, Seq};
use tidemark_names::Name;
use tidemark_tracker::backend::{from_runs, Allocation, Backend, BackendError, ServedDisk};
use tidemark_tracker::server::{Server, ServerHandle, ServerOptions, DEFAULT_BLOCK_SIZES};

use super::{CowOverlay, OverlayError, TestFailover, TestFailoverError};
use crate::pin::{PinError, PinLock};
use crate::store::{Disk, StoreEngine};

/// Why a served test failover could not start or end.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The group's pin lock could not be taken (another test failover or
    /// a failover holds it), or the point pinned.
    #[error("pinning the point")]
    Pin(#[source] PinError),
    /// The test failover itself could not start.
    #[error(transparent)]
    Start(#[from] TestFailoverError),
    /// The NBD socket could not be created (local disk or the path).
    #[error("creating the NBD socket {}", path.display())]
    Socket {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The NBD server's threads could not be started (local resources).
    #[error("starting the NBD server's threads")]
    Threads(#[source] io::Error),
    /// The test's pin or scratch files could not be removed when it ended
    /// (`tidemark test-failover cleanup` removes what is left).
    #[error("ending the test failover")]
    End(#[source] PinError),
}

/// The test failover's overlay as a backend the NBD server serves.
struct NbdExport(Arc<CowOverlay>);

fn backend_error(e: OverlayError) -> BackendError {
    match e {
        OverlayError::NoSuchDisk(id) => BackendError::NoSuchDisk(DiskId(id)),
        OverlayError::Point(e) => {
            tracing::warn!(error = %e, "reading the point");
            BackendError::Io(io::Error::other(e))
        }
        OverlayError::Scratch(e) => BackendError::from(e),
    }
}

impl Backend for NbdExport {
    fn disks(&self) -> Vec<ServedDisk> {
        self.0
            .disks()
            .iter()
            .map(|d| ServedDisk {
                disk: d.clone(),
                export: d.name.to_string(),
                description: format!("tidemark test failover of disk {}", d.name),
                read_only: false,
                block_sizes: DEFAULT_BLOCK_SIZES,
            })
            .collect()
    }

    fn multi_conn_safe(&self) -> bool {
        // Every connection writes the same scratch files; FLUSH syncs them.
        true
    }

    fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.0.read(disk.get(), offset, buf).map_err(backend_error)
    }

    fn write(
        &self,
        disk: DiskId,
        offset: u64,
        data: &[u8],
        _fua: bool,
    ) -> Result<(), BackendError> {
        self.0
            .write(disk.get(), offset, data)
            .map_err(backend_error)
    }

    fn write_zeroes(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
        _no_hole: bool,
        _fua: bool,
    ) -> Result<(), BackendError> {
        self.0
            .write_zeroes(disk.get(), offset, length)
            .map_err(backend_error)
    }

    fn trim(&self, disk: DiskId, offset: u64, length: u64, _fua: bool) -> Result<(), BackendError> {
        self.0
            .write_zeroes(disk.get(), offset, length)
            .map_err(backend_error)
    }

    fn flush(&self, disk: DiskId) -> Result<(), BackendError> {
        self.0.flush(disk.get()).map_err(backend_error)
    }

    fn allocation(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Allocation>, BackendError> {
        let runs = self
            .0
            .allocation(disk.get(), offset, length)
            .map_err(backend_error)?;
        Ok(from_runs(disk, runs))
    }
}

/// A running test failover and the NBD server that serves it. Serving
/// goes on until [`ServedTestFailover::end`] (or a drop, which ends it
/// the same way and only logs a failure).
pub struct ServedTestFailover {
    test: Option<TestFailover>,
    server: Option<ServerHandle>,
    socket: PathBuf,
    disks: Vec<Disk>,
    seq: Seq,
}

impl std::fmt::Debug for ServedTestFailover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedTestFailover")
            .field("socket", &self.socket)
            .field("seq", &self.seq)
            .field("disks", &self.disks)
            .finish_non_exhaustive()
    }
}

impl ServedTestFailover {
    /// Takes the pin lock of `host`'s `group` (its directory `group_dir`
    /// under the receiver's data directory), starts a test failover of
    /// the point at `seq` from `engine`, and serves it on `socket`. If
    /// any step fails, what the earlier ones made is removed.
    pub fn start(
        engine: &dyn StoreEngine,
        group_dir: &Path,
        host: &Name,
        group: &Name,
        seq: Seq,
        socket: &Path,
    ) -> Result<ServedTestFailover, ServeError> {
        let lock = PinLock::acquire(group_dir)
            .map_err(ServeError::Pin)?
            .with_store_pin(engine.store_pin(host, group));
        let test = TestFailover::start_on(|| engine.open_read_only(host, group), lock, seq)?;
        Self::serve(test, seq, socket)
    }

    /// Serves the started `test` (of the point at `seq`) on `socket`; if
    /// the server cannot start, the test is ended.
    pub fn serve(
        test: TestFailover,
        seq: Seq,
        socket: &Path,
    ) -> Result<ServedTestFailover, ServeError> {
        let overlay = test.overlay();
        let disks = overlay.disks().to_vec();
        let started = Server::bind_unix(socket, ServerOptions::default())
            .map_err(|source| ServeError::Socket {
                path: socket.to_owned(),
                source,
            })
            .and_then(|server| {
                server
                    .serve(Arc::new(NbdExport(overlay)))
                    .map_err(ServeError::Threads)
            });
        match started {
            Ok(server) => Ok(ServedTestFailover {
                test: Some(test),
                server: Some(server),
                socket: socket.to_owned(),
                disks,
                seq,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(socket);
                // The error that stopped the start is the one to report.
                let _ = test.end();
                Err(e)
            }
        }
    }

    /// The NBD unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The point's sequence number.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The disks served, in index order; each is an export named after it.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// The NBD URI of `disk`'s export.
    pub fn uri(&self, disk: &Disk) -> String {
        nbd_uri(disk.name.as_ref(), &self.socket)
    }

    /// Stops serving (requests in flight finish), removes the socket, and
    /// ends the test: its writes are discarded, its pin and scratch files
    /// removed. Blocks until the server's threads are joined.
    pub fn end(mut self) -> Result<(), ServeError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), ServeError> {
        if let Some(server) = self.server.take() {
            server.shutdown();
            let _ = std::fs::remove_file(&self.socket);
        }
        match self.test.take() {
            Some(test) => test.end().map_err(ServeError::End),
            None => Ok(()),
        }
    }
}

impl Drop for ServedTestFailover {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(error = %e, socket = %self.socket.display(), "ending a test failover");
        }
    }
}

/// The NBD URI of `export` on the unix socket `socket`.
pub fn nbd_uri(export: &str, socket: &Path) -> String {
    format!("nbd+unix:///{export}?socket={}", socket.display())
}
