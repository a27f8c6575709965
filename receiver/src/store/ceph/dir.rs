//! The group's objects and images as the storage seam's directory
//! ([`CephDir`]): how each file name of the local layout maps onto RADOS
//! objects and RBD images, and the state file's replacement as the one
//! guarded write that commits. The format itself is documented once, in
//! the [engine's module](super).

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use tidemark_ceph::{CephError, Cluster, ClusterImage, CmpOp, WriteOp};
use tidemark_durable::{LogDir, LogFile};

use super::{hex, XATTR_COMMIT, XATTR_EPOCH};
use crate::lease_task::LeaseGate;

/// The group's state file, whose replacement is the commit.
const STATE: &str = "state";
/// Files whose name ends so are staged in memory until renamed.
const TMP_SUFFIX: &str = ".tmp";
/// Omap entries listed per page.
const OMAP_PAGE: u64 = 1024;

/// A Ceph error as the storage seam's I/O error (kind `NotFound` for a
/// missing object or image, the Ceph error as the source).
pub(super) fn io_error(e: CephError) -> io::Error {
    let kind = match e {
        CephError::NotFound { .. } => io::ErrorKind::NotFound,
        CephError::TimedOut { .. } => io::ErrorKind::TimedOut,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it was a bug reported already; the data is a
    // buffer or two counters, consistent between statements.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A file staged in memory.
type Buffer = Arc<Mutex<Vec<u8>>>;

/// What this writer knows of the state object's guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Head {
    /// The fencing epoch this writer took at open.
    pub(super) epoch: u64,
    /// The commit counter as of this writer's last commit.
    pub(super) commit: u64,
    /// Opened to read only: the commit is refused.
    pub(super) read_only: bool,
}

/// One group's objects and images on a cluster, as a directory of the
/// storage seam: `ReplicaGroup` runs on it unchanged.
pub struct CephDir<C: Cluster> {
    cluster: Arc<C>,
    /// Object and image names are `prefix + file name` (`HOST+GROUP+`).
    prefix: String,
    /// The state object's guards; `None`: a directory without a state file
    /// (the test failover's).
    head: Option<Arc<Mutex<Head>>>,
    /// Files staged in memory until renamed (`*.tmp`).
    staged: Arc<Mutex<BTreeMap<String, Buffer>>>,
    /// The group's lease, when receivers share the cluster: every commit
    /// asserts it on the cluster, and is refused here once it is lost.
    lease: Option<Arc<LeaseGate>>,
}

impl<C: Cluster> Clone for CephDir<C> {
    fn clone(&self) -> Self {
        CephDir {
            cluster: self.cluster.clone(),
            prefix: self.prefix.clone(),
            head: self.head.clone(),
            staged: self.staged.clone(),
            lease: self.lease.clone(),
        }
    }
}

impl<C: Cluster> fmt::Debug for CephDir<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CephDir")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// What a file name of the layout is on the cluster.
enum Kind {
    /// `disk-N.img`: the RBD image `PREFIX disk-N`.
    Image(String),
    /// `*.tmp`: staged in memory.
    Staged,
    /// The state file: the state object.
    State,
    /// Anything else: the object `PREFIX name`.
    Object(String),
}

impl<C: Cluster> CephDir<C> {
    /// The directory of the objects named `prefix…`; with `head`, its
    /// `state` file is the state object guarded by it (and by `lease`).
    pub(super) fn new(
        cluster: Arc<C>,
        prefix: String,
        head: Option<Head>,
        lease: Option<Arc<LeaseGate>>,
    ) -> CephDir<C> {
        CephDir {
            cluster,
            prefix,
            head: head.map(|h| Arc::new(Mutex::new(h))),
            staged: Arc::default(),
            lease,
        }
    }

    fn dir_oid(&self) -> String {
        format!("{}dir", self.prefix)
    }

    fn kind(&self, name: &str) -> Kind {
        if name.ends_with(TMP_SUFFIX) {
            Kind::Staged
        } else if let Some(disk) = name.strip_suffix(".img").filter(|n| n.starts_with("disk-")) {
            Kind::Image(format!("{}{disk}", self.prefix))
        } else if name == STATE && self.head.is_some() {
            Kind::State
        } else {
            Kind::Object(format!("{}{name}", self.prefix))
        }
    }

    fn state_oid(&self) -> String {
        format!("{}{STATE}", self.prefix)
    }

    /// Replaces the state object's data in one write guarded by the
    /// fencing epoch and the commit counter, which it advances: the commit.
    fn commit_state(&self, bytes: &[u8]) -> io::Result<()> {
        let Some(head) = &self.head else {
            return Err(io::Error::other("no state object in this directory"));
        };
        let mut head = lock(head);
        if head.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the group is open read-only",
            ));
        }
        let mut op = WriteOp::new();
        if let Some(lease) = &self.lease {
            // The early refusal; the cluster's assertion is the fence.
            lease
                .check(std::time::Instant::now())
                .map_err(|reason| io::Error::new(io::ErrorKind::PermissionDenied, reason))?;
            op = op.assert_locked(lease.name(), lease.cookie());
        }
        let op = op
            .cmp_xattr(XATTR_EPOCH, CmpOp::Eq, hex(head.epoch).as_bytes())
            .cmp_xattr(XATTR_COMMIT, CmpOp::Eq, hex(head.commit).as_bytes())
            .set_xattr(XATTR_COMMIT, hex(head.commit + 1).as_bytes())
            .write_full(bytes);
        self.cluster
            .operate(&self.state_oid(), &op)
            .map_err(io_error)?;
        head.commit += 1;
        Ok(())
    }
}

impl<C: Cluster + 'static> LogDir for CephDir<C> {
    type File = CephFile<C>;

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = match self
                .cluster
                .omap(&self.dir_oid(), after.as_deref(), OMAP_PAGE)
            {
                Ok(page) => page,
                Err(CephError::NotFound { .. }) => break,
                Err(e) => return Err(io_error(e)),
            };
            after = page.entries.last().map(|(k, _)| k.clone());
            names.extend(page.entries.into_iter().map(|(k, _)| k));
            if !page.more || after.is_none() {
                break;
            }
        }
        // A name is listed before its object is created: a crash between
        // the two leaves a name without an object, unlisted here.
        let mut present = Vec::with_capacity(names.len());
        for name in names {
            let oid = format!("{}{name}", self.prefix);
            match self.cluster.stat(&oid) {
                Ok(_) => present.push(name),
                Err(CephError::NotFound { .. }) => {
                    let unlisted = WriteOp::new().omap_rm(vec![name]);
                    self.cluster
                        .operate(&self.dir_oid(), &unlisted)
                        .map_err(io_error)?;
                }
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(present)
    }

    fn open(&self, name: &str, writable: bool) -> io::Result<CephFile<C>> {
        match self.kind(name) {
            Kind::Image(image) => {
                if !writable {
                    let open = self.cluster.image_open_read_only(&image);
                    return Ok(CephFile::Image(Arc::new(open.map_err(io_error)?)));
                }
                self.open_image_writable(&image)
            }
            Kind::Staged => match lock(&self.staged).get(name) {
                Some(buf) => Ok(CephFile::Staged(buf.clone())),
                None => Err(io::Error::new(io::ErrorKind::NotFound, name.to_owned())),
            },
            Kind::State => {
                // Created empty (with its attributes) by the group's first
                // open: no state file until the first commit wrote one.
                let oid = self.state_oid();
                if self.cluster.stat(&oid).map_err(io_error)? == 0 {
                    return Err(io::Error::new(io::ErrorKind::NotFound, oid));
                }
                Ok(self.object(oid))
            }
            Kind::Object(oid) => {
                self.cluster.stat(&oid).map_err(io_error)?;
                Ok(self.object(oid))
            }
        }
    }

    fn create(&self, name: &str) -> io::Result<CephFile<C>> {
        match self.kind(name) {
            Kind::Image(image) => {
                match self.cluster.image_remove(&image) {
                    Ok(()) | Err(CephError::NotFound { .. }) => {}
                    Err(e) => return Err(io_error(e)),
                }
                self.cluster.image_create(&image, 0).map_err(io_error)?;
                self.open_image_writable(&image)
            }
            Kind::Staged => {
                let buf = Arc::new(Mutex::new(Vec::new()));
                lock(&self.staged).insert(name.to_owned(), buf.clone());
                Ok(CephFile::Staged(buf))
            }
            Kind::State => Err(io::Error::other(
                "the state object is only ever replaced whole",
            )),
            Kind::Object(oid) => {
                // Listed before it exists, so that a crash leaves no object
                // the next open cannot find and remove.
                let listed = WriteOp::new().omap_set(vec![(name.to_owned(), Vec::new())]);
                self.cluster
                    .operate(&self.dir_oid(), &listed)
                    .map_err(io_error)?;
                let op = WriteOp::new().create(false).truncate(0);
                self.cluster.operate(&oid, &op).map_err(io_error)?;
                Ok(self.object(oid))
            }
        }
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        if !matches!(self.kind(from), Kind::Staged) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("only a staged file is renamed, not {from}"),
            ));
        }
        let Some(buf) = lock(&self.staged).get(from).cloned() else {
            return Err(io::Error::new(io::ErrorKind::NotFound, from.to_owned()));
        };
        let bytes = lock(&buf).clone();
        match self.kind(to) {
            Kind::State => self.commit_state(&bytes)?,
            Kind::Object(oid) => {
                let op = WriteOp::new().write_full(&bytes);
                self.cluster.operate(&oid, &op).map_err(io_error)?;
            }
            Kind::Image(_) | Kind::Staged => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("a staged file is not renamed to {to}"),
                ))
            }
        }
        lock(&self.staged).remove(from);
        Ok(())
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        match self.kind(name) {
            Kind::Image(image) => self.cluster.image_remove(&image).map_err(io_error),
            Kind::Staged => match lock(&self.staged).remove(name) {
                Some(_) => Ok(()),
                None => Err(io::Error::new(io::ErrorKind::NotFound, name.to_owned())),
            },
            Kind::State => Err(io::Error::other("the state object is never removed")),
            Kind::Object(oid) => {
                let removed = self.cluster.operate(&oid, &WriteOp::new().remove());
                let unlisted = WriteOp::new().omap_rm(vec![name.to_owned()]);
                match self.cluster.operate(&self.dir_oid(), &unlisted) {
                    Ok(()) | Err(CephError::NotFound { .. }) => {}
                    Err(e) => return Err(io_error(e)),
                }
                removed.map_err(io_error)
            }
        }
    }

    fn sync_dir(&self) -> io::Result<()> {
        // Every object operation is durable when it returns.
        Ok(())
    }

    fn describe(&self) -> String {
        format!("ceph:{}", self.prefix.trim_end_matches('+'))
    }
}

impl<C: Cluster> CephDir<C> {
    /// Opens an image to write it, taking its exclusive lock and breaking
    /// (which blocklists) the lock of whoever wrote it before: a writer that
    /// lost the group writes neither the image nor anything else again.
    fn open_image_writable(&self, image: &str) -> io::Result<CephFile<C>> {
        let open = self.cluster.image_open(image).map_err(io_error)?;
        open.lock_acquire_breaking().map_err(io_error)?;
        Ok(CephFile::Image(Arc::new(open)))
    }

    fn object(&self, oid: String) -> CephFile<C> {
        CephFile::Object(ObjectFile {
            cluster: self.cluster.clone(),
            oid,
            pending: Arc::default(),
        })
    }
}

/// Appends gathered into one write: [`APPEND_LIMIT`] bytes at most.
const APPEND_LIMIT: usize = 4 << 20;

/// Bytes written to an object and not yet sent: one contiguous run.
#[derive(Debug, Default)]
struct Append {
    at: u64,
    data: Vec<u8>,
}

/// A RADOS object of a [`CephDir`]. Contiguous writes (the journal's
/// appends) are gathered and sent as one operation when they reach
/// 4 MiB, at `sync_data`, or before anything else touches the
/// object through this handle (or a clone of it); each operation is
/// durable when it returns. A write that is not contiguous sends what was
/// gathered first.
pub struct ObjectFile<C: Cluster> {
    cluster: Arc<C>,
    oid: String,
    pending: Arc<Mutex<Append>>,
}

impl<C: Cluster> ObjectFile<C> {
    fn append(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut pending = lock(&self.pending);
        if !pending.data.is_empty() && pending.at + pending.data.len() as u64 != offset {
            self.send(&mut pending)?;
        }
        if pending.data.is_empty() {
            pending.at = offset;
        }
        for b in bufs {
            pending.data.extend_from_slice(b);
        }
        if pending.data.len() >= APPEND_LIMIT {
            self.send(&mut pending)?;
        }
        Ok(())
    }

    /// Sends what was gathered and waits until it is durable.
    fn flush(&self) -> io::Result<()> {
        let mut pending = lock(&self.pending);
        self.send(&mut pending)
    }

    fn send(&self, pending: &mut Append) -> io::Result<()> {
        if pending.data.is_empty() {
            return Ok(());
        }
        // Gone whether the write succeeds or not: a failed write is fatal
        // to the group, never retried (as a failed fdatasync).
        let data = std::mem::take(&mut pending.data);
        let op = WriteOp::new().write(pending.at, &data);
        self.cluster.operate(&self.oid, &op).map_err(io_error)
    }
}

/// A file of a [`CephDir`].
pub enum CephFile<C: Cluster> {
    /// A RADOS object; appends are gathered and written at `sync_data`.
    Object(ObjectFile<C>),
    /// An RBD image; writes are durable at `sync_data` (a flush).
    Image(Arc<C::Image>),
    /// A file staged in memory until renamed.
    Staged(Arc<Mutex<Vec<u8>>>),
}

impl<C: Cluster> fmt::Debug for CephFile<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CephFile::Object(o) => write!(f, "CephFile::Object({})", o.oid),
            CephFile::Image(image) => write!(f, "CephFile::Image({image:?})"),
            CephFile::Staged(_) => write!(f, "CephFile::Staged"),
        }
    }
}

impl<C: Cluster> LogFile for CephFile<C> {
    fn size(&self) -> io::Result<u64> {
        match self {
            CephFile::Object(o) => {
                o.flush()?;
                o.cluster.stat(&o.oid).map_err(io_error)
            }
            CephFile::Image(image) => image.size().map_err(io_error),
            CephFile::Staged(buf) => Ok(lock(buf).len() as u64),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self {
            CephFile::Object(o) => {
                o.flush()?;
                let data = o
                    .cluster
                    .read(&o.oid, offset, buf.len())
                    .map_err(io_error)?;
                let n = data.len().min(buf.len());
                buf[..n].copy_from_slice(&data[..n]);
                Ok(n)
            }
            CephFile::Image(image) => {
                let size = image.size().map_err(io_error)?;
                let n = size.saturating_sub(offset).min(buf.len() as u64) as usize;
                if n > 0 {
                    image.read(offset, &mut buf[..n]).map_err(io_error)?;
                }
                Ok(n)
            }
            CephFile::Staged(data) => {
                let data = lock(data);
                let from = (offset as usize).min(data.len());
                let n = (data.len() - from).min(buf.len());
                buf[..n].copy_from_slice(&data[from..from + n]);
                Ok(n)
            }
        }
    }

    fn write_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        match self {
            CephFile::Object(o) => o.append(bufs, offset),
            CephFile::Image(image) => {
                let mut at = offset;
                for b in bufs {
                    image.write(at, b).map_err(io_error)?;
                    at += b.len() as u64;
                }
                Ok(())
            }
            CephFile::Staged(data) => {
                let mut data = lock(data);
                let mut at = offset as usize;
                for b in bufs {
                    if data.len() < at + b.len() {
                        data.resize(at + b.len(), 0);
                    }
                    data[at..at + b.len()].copy_from_slice(b);
                    at += b.len();
                }
                Ok(())
            }
        }
    }

    fn allocate(&self, len: u64) -> io::Result<()> {
        // Objects and images reserve nothing; only the length is kept.
        if self.size()? < len {
            self.set_len(len)?;
        }
        Ok(())
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self {
            CephFile::Object(o) => {
                o.flush()?;
                let (cluster, oid) = (&o.cluster, &o.oid);
                // A zero reaching the object's end would truncate it: write
                // zeroes there instead, keeping the length.
                let size = cluster.stat(oid).map_err(io_error)?;
                let op = if offset + len >= size {
                    WriteOp::new().write(offset, &vec![0u8; len as usize])
                } else {
                    WriteOp::new().zero(offset, len)
                };
                cluster.operate(oid, &op).map_err(io_error)
            }
            CephFile::Image(image) => image.write_zeroes(offset, len).map_err(io_error),
            CephFile::Staged(data) => {
                let mut data = lock(data);
                let end = ((offset + len) as usize).min(data.len());
                let from = (offset as usize).min(end);
                data[from..end].fill(0);
                Ok(())
            }
        }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        match self {
            CephFile::Object(o) => {
                o.flush()?;
                o.cluster
                    .operate(&o.oid, &WriteOp::new().truncate(len))
                    .map_err(io_error)
            }
            CephFile::Image(image) => image.resize(len).map_err(io_error),
            CephFile::Staged(data) => {
                lock(data).resize(len as usize, 0);
                Ok(())
            }
        }
    }

    fn sync_data(&self) -> io::Result<()> {
        match self {
            CephFile::Image(image) => image.flush().map_err(io_error),
            CephFile::Object(o) => o.flush(),
            CephFile::Staged(_) => Ok(()),
        }
    }

    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            CephFile::Object(o) => CephFile::Object(ObjectFile {
                cluster: o.cluster.clone(),
                oid: o.oid.clone(),
                pending: o.pending.clone(),
            }),
            CephFile::Image(image) => CephFile::Image(image.clone()),
            CephFile::Staged(data) => CephFile::Staged(data.clone()),
        })
    }

    fn is_hole(&self, offset: u64, len: u64) -> bool {
        match self {
            CephFile::Image(image) => image
                .allocated(offset, len)
                .map(|ranges| ranges.is_empty())
                .unwrap_or(false),
            CephFile::Object(_) | CephFile::Staged(_) => false,
        }
    }
}
