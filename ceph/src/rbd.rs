//! Safe wrappers of librbd: namespaces, images (create, open, read, write,
//! exact zeroing, flush, allocation map, exclusive lock, snapshots and
//! clones) and asynchronous image I/O ([`ImagePending`]).
//!
//! Threading: an open image takes I/O from any thread (librbd serialises
//! its image state internally); it holds its I/O context (and so the
//! cluster) alive and is closed when dropped. librbd may write from the
//! caller's buffer without copying it (zero-copy), so an asynchronous
//! operation owns its buffer until it completes, and dropping an
//! [`ImagePending`] waits for it.
//!
//! Zeroing is [`Image::write_zeroes`], never a discard: librbd skips a
//! discard of a range that does not cover whole objects and still reports
//! success (`rbd_skip_partial_discard`), leaving the old bytes.

use crate::cluster::Pending;
use crate::ffi;
use crate::rados::{check, cstr, IoCtx, IoHandle};
use crate::CephError;
use libc::{c_char, c_int, c_void, size_t};
use std::ffi::CStr;
use std::ptr;
use std::sync::Arc;

/// The librbd ABI major [`crate::ffi`] declares.
pub(crate) const RBD_MAJOR: i32 = 1;

/// Features of the images Tidemark creates: layering, exclusive-lock,
/// object-map, fast-diff, deep-flatten (Ceph's default set; object map and
/// fast diff make [`Image::allocated`] cheap).
pub const BASE_FEATURES: u64 = 1 | 4 | 8 | 16 | 32;

/// The loaded librbd version (major, minor, extra).
pub fn version() -> (i32, i32, i32) {
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: three valid out-pointers; the call only writes them.
    unsafe { ffi::rbd_version(&mut major, &mut minor, &mut extra) };
    (major, minor, extra)
}

/// Whether the RBD namespace exists in `io`'s pool (`io` in the pool's
/// default namespace).
pub fn namespace_exists(io: &IoCtx, namespace: &str) -> Result<bool, CephError> {
    let ns = cstr("rbd_namespace_exists", "namespace", namespace)?;
    let mut exists = false;
    // SAFETY: live context, C string, valid out-pointer.
    check("rbd_namespace_exists", unsafe {
        ffi::rbd_namespace_exists(io.inner.io, ns.as_ptr(), &mut exists)
    })?;
    Ok(exists)
}

/// Creates an RBD namespace (needed before any image lives in it).
pub fn namespace_create(io: &IoCtx, namespace: &str) -> Result<(), CephError> {
    let ns = cstr("rbd_namespace_create", "namespace", namespace)?;
    // SAFETY: live context, C string.
    check("rbd_namespace_create", unsafe {
        ffi::rbd_namespace_create(io.inner.io, ns.as_ptr())
    })
    .map(drop)
}

/// Creates an image of `size` bytes with `features` (default object size).
pub fn create(io: &IoCtx, name: &str, size: u64, features: u64) -> Result<(), CephError> {
    let n = cstr("rbd_create2", "name", name)?;
    let mut order: c_int = 0;
    // SAFETY: live context, C string, valid in/out order (0: default).
    check("rbd_create2", unsafe {
        ffi::rbd_create2(io.inner.io, n.as_ptr(), size, features, &mut order)
    })
    .map(drop)
}

/// Removes an image (it must have no snapshots).
pub fn remove(io: &IoCtx, name: &str) -> Result<(), CephError> {
    let n = cstr("rbd_remove", "name", name)?;
    // SAFETY: live context, C string.
    check("rbd_remove", unsafe {
        ffi::rbd_remove(io.inner.io, n.as_ptr())
    })
    .map(drop)
}

/// Clones the protected snapshot `parent@snap` as `child`.
pub fn clone(
    parent_io: &IoCtx,
    parent: &str,
    snap: &str,
    child_io: &IoCtx,
    child: &str,
    features: u64,
) -> Result<(), CephError> {
    const OP: &str = "rbd_clone";
    let (p, s, c) = (
        cstr(OP, "parent", parent)?,
        cstr(OP, "snap", snap)?,
        cstr(OP, "child", child)?,
    );
    let mut order: c_int = 0;
    // SAFETY: live contexts, C strings, valid in/out order.
    let ret = unsafe {
        ffi::rbd_clone(
            parent_io.inner.io,
            p.as_ptr(),
            s.as_ptr(),
            child_io.inner.io,
            c.as_ptr(),
            features,
            &mut order,
        )
    };
    check(OP, ret).map(drop)
}

/// The raw image; closed when the last [`Image`] or [`ImagePending`]
/// holding it is gone, so never with an operation in flight.
#[derive(Debug)]
struct ImageHandle {
    image: ffi::rbd_image_t,
    _io: Arc<IoHandle>,
}

// SAFETY: librbd takes I/O on one image from any thread and guards its
// image state (locks, snapshots, size) internally.
unsafe impl Send for ImageHandle {}
// SAFETY: as above.
unsafe impl Sync for ImageHandle {}

impl Drop for ImageHandle {
    fn drop(&mut self) {
        // SAFETY: opened by `rbd_open*`, closed once; every pending operation
        // holds an `Arc` of this handle, so none is in flight. A close error
        // leaves nothing to do.
        unsafe { ffi::rbd_close(self.image) };
    }
}

/// An open image; closed when it and its pending operations are gone.
#[derive(Debug, Clone)]
pub struct Image {
    inner: Arc<ImageHandle>,
}

/// An RBD completion; released when dropped (after waiting).
struct RbdCompletion(ffi::rbd_completion_t);

impl RbdCompletion {
    fn new() -> Result<RbdCompletion, CephError> {
        let mut c: ffi::rbd_completion_t = ptr::null_mut();
        // SAFETY: no callback, no argument, valid out-pointer.
        check("rbd_aio_create_completion", unsafe {
            ffi::rbd_aio_create_completion(ptr::null_mut(), None, &mut c)
        })?;
        Ok(RbdCompletion(c))
    }

    fn wait(&self, op: &'static str) -> Result<u64, CephError> {
        // SAFETY: a live completion of ours.
        unsafe { ffi::rbd_aio_wait_for_complete(self.0) };
        // SAFETY: as above; complete, so the value is final.
        CephError::check(op, unsafe { ffi::rbd_aio_get_return_value(self.0) } as i64)
    }
}

impl Drop for RbdCompletion {
    fn drop(&mut self) {
        // SAFETY: a live completion; waiting first makes releasing it (and
        // then the buffer it may point into) safe.
        unsafe {
            ffi::rbd_aio_wait_for_complete(self.0);
            ffi::rbd_aio_release(self.0);
        }
    }
}

/// An asynchronous image operation in flight. Owns its buffer; dropping it
/// waits for the operation.
pub struct ImagePending {
    op: &'static str,
    // Dropped (waited for) before the buffer.
    completion: RbdCompletion,
    buf: Vec<u8>,
    _image: Arc<ImageHandle>,
}

// SAFETY: the completion is used by one thread at a time (moved with the
// value); librbd's threads only signal it.
unsafe impl Send for ImagePending {}

impl Pending for ImagePending {
    fn wait(self) -> Result<(), CephError> {
        self.completion.wait(self.op).map(drop)
    }
}

impl ImagePending {
    /// Waits for an asynchronous read; the bytes read.
    pub fn wait_read(mut self) -> Result<Vec<u8>, CephError> {
        let n = self.completion.wait(self.op)?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(buf)
    }
}

/// Collects the extents `rbd_diff_iterate2` reports as existing.
///
/// # Safety
/// `arg` must point to a live `Vec<(u64, u64)>` not otherwise borrowed.
unsafe extern "C" fn collect_extent(
    offset: u64,
    len: size_t,
    exists: c_int,
    arg: *mut c_void,
) -> c_int {
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: the caller's contract: `arg` is our live, unaliased Vec.
        let out = unsafe { &mut *arg.cast::<Vec<(u64, u64)>>() };
        if exists != 0 {
            match out.last_mut() {
                Some((s, l)) if *s + *l == offset => *l += len as u64,
                _ => out.push((offset, len as u64)),
            }
        }
    }));
    // A panic must not unwind into C: stop the iteration with an error.
    if run.is_ok() {
        0
    } else {
        -libc::EIO
    }
}

impl Image {
    fn open_with(io: &IoCtx, name: &str, read_only: bool) -> Result<Image, CephError> {
        let op = if read_only {
            "rbd_open_read_only"
        } else {
            "rbd_open"
        };
        let n = cstr(op, "name", name)?;
        let mut image: ffi::rbd_image_t = ptr::null_mut();
        // SAFETY: live context, C string, valid out-pointer; no snapshot (NULL).
        let ret = unsafe {
            if read_only {
                ffi::rbd_open_read_only(io.inner.io, n.as_ptr(), &mut image, ptr::null())
            } else {
                ffi::rbd_open(io.inner.io, n.as_ptr(), &mut image, ptr::null())
            }
        };
        check(op, ret)?;
        Ok(Image {
            inner: Arc::new(ImageHandle {
                image,
                _io: io.inner.clone(),
            }),
        })
    }

    /// Opens an image for reading and writing.
    pub fn open(io: &IoCtx, name: &str) -> Result<Image, CephError> {
        Self::open_with(io, name, false)
    }

    /// Opens an image for reading only.
    pub fn open_read_only(io: &IoCtx, name: &str) -> Result<Image, CephError> {
        Self::open_with(io, name, true)
    }

    /// The image's size in bytes.
    pub fn size(&self) -> Result<u64, CephError> {
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer.
        check("rbd_get_size", unsafe {
            ffi::rbd_get_size(self.inner.image, &mut size)
        })?;
        Ok(size)
    }

    /// Changes the image's size.
    pub fn resize(&self, size: u64) -> Result<(), CephError> {
        // SAFETY: open image.
        check("rbd_resize", unsafe {
            ffi::rbd_resize(self.inner.image, size)
        })
        .map(drop)
    }

    /// Fills `buf` from `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CephError> {
        // SAFETY: open image; `buf` is writable for its length.
        let n = unsafe {
            ffi::rbd_read(
                self.inner.image,
                offset,
                buf.len(),
                buf.as_mut_ptr().cast::<c_char>(),
            )
        };
        let n = CephError::check("rbd_read", n as i64)?;
        if n != buf.len() as u64 {
            return Err(CephError::Other {
                op: "rbd_read",
                errno: libc::EIO,
            });
        }
        Ok(())
    }

    /// Writes `data` at `offset` (durable after [`Image::flush`]).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), CephError> {
        // SAFETY: open image; `data` is readable for its length during the
        // (synchronous) call.
        let n = unsafe {
            ffi::rbd_write(
                self.inner.image,
                offset,
                data.len(),
                data.as_ptr().cast::<c_char>(),
            )
        };
        let n = CephError::check("rbd_write", n as i64)?;
        if n != data.len() as u64 {
            return Err(CephError::Other {
                op: "rbd_write",
                errno: libc::EIO,
            });
        }
        Ok(())
    }

    /// Zeroes exactly `len` bytes at `offset`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CephError> {
        let len = usize::try_from(len).map_err(|_| CephError::Other {
            op: "rbd_write_zeroes",
            errno: libc::EINVAL,
        })?;
        // SAFETY: open image; no flags.
        let n = unsafe { ffi::rbd_write_zeroes(self.inner.image, offset, len, 0, 0) };
        CephError::check("rbd_write_zeroes", n as i64).map(drop)
    }

    /// Makes every write completed before it durable.
    pub fn flush(&self) -> Result<(), CephError> {
        // SAFETY: open image.
        check("rbd_flush", unsafe { ffi::rbd_flush(self.inner.image) }).map(drop)
    }

    /// Starts a write of `data` at `offset`; the pending value owns `data`.
    pub fn aio_write(&self, offset: u64, data: Vec<u8>) -> Result<ImagePending, CephError> {
        let completion = RbdCompletion::new()?;
        // SAFETY: open image and live completion; `data`'s heap buffer moves
        // into the pending value (it does not move with the Vec) and is kept
        // until the completion is done, as zero-copy writes need.
        let ret = unsafe {
            ffi::rbd_aio_write(
                self.inner.image,
                offset,
                data.len(),
                data.as_ptr().cast::<c_char>(),
                completion.0,
            )
        };
        check("rbd_aio_write", ret)?;
        Ok(ImagePending {
            op: "rbd_aio_write",
            completion,
            buf: data,
            _image: self.inner.clone(),
        })
    }

    /// Starts a read of `len` bytes at `offset`.
    pub fn aio_read(&self, offset: u64, len: usize) -> Result<ImagePending, CephError> {
        let completion = RbdCompletion::new()?;
        let mut buf = vec![0u8; len];
        // SAFETY: open image, live completion; `buf` is kept by the pending
        // value until the completion is done.
        let ret = unsafe {
            ffi::rbd_aio_read(
                self.inner.image,
                offset,
                len,
                buf.as_mut_ptr().cast::<c_char>(),
                completion.0,
            )
        };
        check("rbd_aio_read", ret)?;
        Ok(ImagePending {
            op: "rbd_aio_read",
            completion,
            buf,
            _image: self.inner.clone(),
        })
    }

    /// Starts zeroing `len` bytes at `offset`.
    pub fn aio_write_zeroes(&self, offset: u64, len: usize) -> Result<ImagePending, CephError> {
        let completion = RbdCompletion::new()?;
        // SAFETY: open image, live completion; no flags.
        let ret =
            unsafe { ffi::rbd_aio_write_zeroes(self.inner.image, offset, len, completion.0, 0, 0) };
        check("rbd_aio_write_zeroes", ret)?;
        Ok(ImagePending {
            op: "rbd_aio_write_zeroes",
            completion,
            buf: Vec::new(),
            _image: self.inner.clone(),
        })
    }

    /// Starts a flush.
    pub fn aio_flush(&self) -> Result<ImagePending, CephError> {
        let completion = RbdCompletion::new()?;
        // SAFETY: open image, live completion.
        check("rbd_aio_flush", unsafe {
            ffi::rbd_aio_flush(self.inner.image, completion.0)
        })?;
        Ok(ImagePending {
            op: "rbd_aio_flush",
            completion,
            buf: Vec::new(),
            _image: self.inner.clone(),
        })
    }

    /// Ranges of `[offset, offset+len)` that may hold data, at object
    /// granularity, parents included; the rest reads as zeroes.
    pub fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, CephError> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        // SAFETY: open image; the callback runs on this thread before the call
        // returns, with `arg` pointing to `out`, which nothing else borrows meanwhile.
        let ret = unsafe {
            ffi::rbd_diff_iterate2(
                self.inner.image,
                ptr::null(),
                offset,
                len,
                1,
                1,
                collect_extent,
                (&mut out as *mut Vec<(u64, u64)>).cast(),
            )
        };
        check("rbd_diff_iterate2", ret)?;
        Ok(out)
    }

    /// Takes the image's exclusive lock (manual mode: librbd no longer hands
    /// it to another client on request).
    pub fn lock_acquire(&self) -> Result<(), CephError> {
        // SAFETY: open image.
        check("rbd_lock_acquire", unsafe {
            ffi::rbd_lock_acquire(self.inner.image, ffi::RBD_LOCK_MODE_EXCLUSIVE)
        })
        .map(drop)
    }

    /// Releases the image's exclusive lock.
    pub fn lock_release(&self) -> Result<(), CephError> {
        // SAFETY: open image.
        check("rbd_lock_release", unsafe {
            ffi::rbd_lock_release(self.inner.image)
        })
        .map(drop)
    }

    /// The holders of the image's lock (empty when none).
    pub fn lock_owners(&self) -> Result<Vec<String>, CephError> {
        let mut capacity = 4usize;
        loop {
            let mut owners: Vec<*mut c_char> = vec![ptr::null_mut(); capacity];
            let mut count: size_t = capacity;
            let mut mode: c_int = 0;
            // SAFETY: open image; an array of `count` pointer slots.
            let ret = unsafe {
                ffi::rbd_lock_get_owners(
                    self.inner.image,
                    &mut mode,
                    owners.as_mut_ptr(),
                    &mut count,
                )
            };
            match check("rbd_lock_get_owners", ret) {
                Ok(_) => {
                    let count = count.min(capacity);
                    let names = owners[..count]
                        .iter()
                        .filter(|p| !p.is_null())
                        // SAFETY: librbd filled `count` NUL-terminated strings.
                        .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
                        .collect();
                    // SAFETY: frees the `count` strings librbd allocated, once.
                    unsafe { ffi::rbd_lock_get_owners_cleanup(owners.as_mut_ptr(), count) };
                    return Ok(names);
                }
                Err(CephError::NotFound { .. }) => return Ok(Vec::new()),
                Err(CephError::Range { .. }) if capacity < 1024 => {
                    capacity = count.max(capacity * 2)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Breaks `owner`'s exclusive lock, blocklisting it.
    pub fn lock_break(&self, owner: &str) -> Result<(), CephError> {
        let o = cstr("rbd_lock_break", "owner", owner)?;
        // SAFETY: open image, C string.
        check("rbd_lock_break", unsafe {
            ffi::rbd_lock_break(self.inner.image, ffi::RBD_LOCK_MODE_EXCLUSIVE, o.as_ptr())
        })
        .map(drop)
    }

    /// Takes the exclusive lock, breaking (and so fencing) any other holder.
    pub fn lock_acquire_breaking(&self) -> Result<(), CephError> {
        match self.lock_acquire() {
            Err(CephError::ReadOnly { .. } | CephError::Busy { .. }) => {
                for owner in self.lock_owners()? {
                    match self.lock_break(&owner) {
                        Ok(()) | Err(CephError::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                self.lock_acquire()
            }
            other => other,
        }
    }

    /// Creates snapshot `name`.
    pub fn snap_create(&self, name: &str) -> Result<(), CephError> {
        let n = cstr("rbd_snap_create", "name", name)?;
        // SAFETY: open image, C string.
        check("rbd_snap_create", unsafe {
            ffi::rbd_snap_create(self.inner.image, n.as_ptr())
        })
        .map(drop)
    }

    /// Protects snapshot `name` (a clone's parent must be protected).
    pub fn snap_protect(&self, name: &str) -> Result<(), CephError> {
        let n = cstr("rbd_snap_protect", "name", name)?;
        // SAFETY: open image, C string.
        check("rbd_snap_protect", unsafe {
            ffi::rbd_snap_protect(self.inner.image, n.as_ptr())
        })
        .map(drop)
    }

    /// Unprotects snapshot `name` (fails while clones of it exist).
    pub fn snap_unprotect(&self, name: &str) -> Result<(), CephError> {
        let n = cstr("rbd_snap_unprotect", "name", name)?;
        // SAFETY: open image, C string.
        check("rbd_snap_unprotect", unsafe {
            ffi::rbd_snap_unprotect(self.inner.image, n.as_ptr())
        })
        .map(drop)
    }

    /// Whether snapshot `name` is protected.
    pub fn snap_is_protected(&self, name: &str) -> Result<bool, CephError> {
        let n = cstr("rbd_snap_is_protected", "name", name)?;
        let mut protected: c_int = 0;
        // SAFETY: open image, C string, an int to fill.
        check("rbd_snap_is_protected", unsafe {
            ffi::rbd_snap_is_protected(self.inner.image, n.as_ptr(), &mut protected)
        })?;
        Ok(protected != 0)
    }

    /// The names of the image's snapshots.
    pub fn snap_names(&self) -> Result<Vec<String>, CephError> {
        let mut capacity: c_int = 8;
        loop {
            let mut snaps: Vec<ffi::rbd_snap_info_t> = (0..capacity)
                .map(|_| ffi::rbd_snap_info_t {
                    id: 0,
                    size: 0,
                    name: ptr::null(),
                })
                .collect();
            let mut max = capacity;
            // SAFETY: open image; an array of `max` entries to fill.
            let ret = unsafe { ffi::rbd_snap_list(self.inner.image, snaps.as_mut_ptr(), &mut max) };
            match check("rbd_snap_list", ret) {
                Ok(count) => {
                    let count = usize::try_from(count).unwrap_or(0).min(snaps.len());
                    let names = snaps[..count]
                        .iter()
                        .filter(|s| !s.name.is_null())
                        .map(|s| {
                            // SAFETY: librbd filled NUL-terminated names.
                            unsafe { CStr::from_ptr(s.name) }
                                .to_string_lossy()
                                .into_owned()
                        })
                        .collect();
                    // SAFETY: frees the names librbd allocated, once; the
                    // list ends at the entry after the last (zeroed by it).
                    unsafe { ffi::rbd_snap_list_end(snaps.as_mut_ptr()) };
                    return Ok(names);
                }
                Err(CephError::Range { .. }) if capacity < 1 << 16 => {
                    capacity = max.max(capacity * 2)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The images cloned from any snapshot of this one, as
    /// `pool/[namespace/]name` (` (in the trash)` for one moved there).
    pub fn children(&self) -> Result<Vec<String>, CephError> {
        let mut capacity: size_t = 4;
        loop {
            let mut images: Vec<ffi::rbd_linked_image_spec_t> = (0..capacity)
                .map(|_| ffi::rbd_linked_image_spec_t {
                    pool_id: 0,
                    pool_name: ptr::null_mut(),
                    pool_namespace: ptr::null_mut(),
                    image_id: ptr::null_mut(),
                    image_name: ptr::null_mut(),
                    trash: false,
                })
                .collect();
            let mut count: size_t = capacity;
            // SAFETY: open image; an array of `count` entries to fill.
            let ret = unsafe {
                ffi::rbd_list_children3(self.inner.image, images.as_mut_ptr(), &mut count)
            };
            match check("rbd_list_children3", ret) {
                Ok(_) => {
                    let count = count.min(capacity);
                    let text = |p: *mut c_char| {
                        if p.is_null() {
                            String::new()
                        } else {
                            // SAFETY: librbd filled a NUL-terminated string.
                            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
                        }
                    };
                    let names = images[..count]
                        .iter()
                        .map(|i| {
                            let (pool, ns) = (text(i.pool_name), text(i.pool_namespace));
                            let mut name = if ns.is_empty() {
                                format!("{pool}/{}", text(i.image_name))
                            } else {
                                format!("{pool}/{ns}/{}", text(i.image_name))
                            };
                            if i.trash {
                                name.push_str(" (in the trash)");
                            }
                            name
                        })
                        .collect();
                    // SAFETY: frees the `count` entries librbd filled, once.
                    unsafe { ffi::rbd_linked_image_spec_list_cleanup(images.as_mut_ptr(), count) };
                    return Ok(names);
                }
                Err(CephError::Range { .. }) if capacity < 1 << 16 => {
                    capacity = count.max(capacity * 2)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes snapshot `name`.
    pub fn snap_remove(&self, name: &str) -> Result<(), CephError> {
        let n = cstr("rbd_snap_remove", "name", name)?;
        // SAFETY: open image, C string.
        check("rbd_snap_remove", unsafe {
            ffi::rbd_snap_remove(self.inner.image, n.as_ptr())
        })
        .map(drop)
    }
}
