//! Safe wrappers of librados: a connected cluster handle ([`Rados`]), I/O
//! contexts bound to a pool and namespace ([`IoCtx`]), compound write
//! operations built from a [`WriteOp`], asynchronous writes ([`RadosPending`])
//! and the `lock` object class; and [`RadosCluster`], the real [`Cluster`].
//!
//! Threading (librados's rules, kept by these types):
//! - A connected `rados_t` is thread-safe; configuration happens only before
//!   `rados_connect`, inside [`Rados::connect`]. It is shut down when the last
//!   [`IoCtx`] and image holding it are gone (each holds an `Arc` of it), so
//!   never with an I/O context or image still open.
//! - An `rados_ioctx_t` takes I/O from any thread; its namespace is set once,
//!   right after creation, and never changed (one context per namespace).
//! - Operation and completion objects live on one thread, from build to
//!   release; no callbacks are registered, so no Rust code runs on a
//!   librados thread. A [`RadosPending`] owns everything the operation
//!   refers to and waits for it when dropped.
//! - Every call blocks: call from a blocking thread, never on an async
//!   executor's worker. Never `fork` without `exec` once connected.

use crate::cluster::{
    Cluster, CmpOp, LockRequest, Locker, OmapPage, Pending, Renew, WriteOp, WriteStep,
};
use crate::ffi;
use crate::rbd::{self, Image, ImagePending};
use crate::CephError;
use libc::{c_char, c_int, c_uchar, size_t};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::path::Path;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// The librados ABI major [`crate::ffi`] declares.
const RADOS_MAJOR: i32 = 3;
/// The lock type `assert_locked` checks (`ClsLockType::EXCLUSIVE`).
const LOCK_EXCLUSIVE: u8 = 1;

/// `s` as a C string for argument `what` of call `op`.
pub(crate) fn cstr(op: &'static str, what: &'static str, s: &str) -> Result<CString, CephError> {
    CString::new(s).map_err(|_| CephError::Nul { op, what })
}

/// Classes a C `int` result.
pub(crate) fn check(op: &'static str, ret: c_int) -> Result<u64, CephError> {
    CephError::check(op, i64::from(ret))
}

/// The loaded librados version (major, minor, extra).
pub fn version() -> (i32, i32, i32) {
    let (mut major, mut minor, mut extra) = (0, 0, 0);
    // SAFETY: three valid out-pointers; the call only writes them.
    unsafe { ffi::rados_version(&mut major, &mut minor, &mut extra) };
    (major, minor, extra)
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions<'a> {
    /// The `ceph.conf` to read.
    pub conf: &'a Path,
    /// The client's entity name, e.g. `client.tidemark`.
    pub user: &'a str,
    /// Timeout of every OSD and monitor operation, and of connecting;
    /// zero: wait forever.
    pub op_timeout: Duration,
    /// More configuration options, set after the file is read.
    pub settings: &'a [(&'a str, &'a str)],
}

/// The raw cluster handle; shut down when dropped.
#[derive(Debug)]
struct Handle(ffi::rados_t);

// SAFETY: a `rados_t` is usable from any thread once connected (librados
// guards its state internally), and `Handle` exists only connected (or
// unconfigured, inside `connect`, on one thread).
unsafe impl Send for Handle {}
// SAFETY: as above; every method called through `&Handle` is thread-safe.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `rados_create2`; every I/O context and
        // image holds an `Arc` of it, so none is left when this runs.
        unsafe { ffi::rados_shutdown(self.0) };
    }
}

/// A connected cluster handle.
#[derive(Debug, Clone)]
pub struct Rados {
    handle: Arc<Handle>,
}

impl Rados {
    /// Connects as `options.user` with the configuration file and op timeouts.
    pub fn connect(options: &ConnectOptions<'_>) -> Result<Rados, CephError> {
        let (major, minor, extra) = version();
        if major != RADOS_MAJOR {
            return Err(CephError::Version {
                library: "librados",
                major,
                minor,
                extra,
                expected: RADOS_MAJOR,
            });
        }
        let (rmajor, rminor, rextra) = rbd::version();
        if rmajor != rbd::RBD_MAJOR {
            return Err(CephError::Version {
                library: "librbd",
                major: rmajor,
                minor: rminor,
                extra: rextra,
                expected: rbd::RBD_MAJOR,
            });
        }
        let cluster = cstr("rados_create2", "cluster name", "ceph")?;
        let user = cstr("rados_create2", "user", options.user)?;
        let mut raw: ffi::rados_t = ptr::null_mut();
        // SAFETY: valid out-pointer and NUL-terminated strings that outlive the call.
        check("rados_create2", unsafe {
            ffi::rados_create2(&mut raw, cluster.as_ptr(), user.as_ptr(), 0)
        })?;
        let handle = Handle(raw);
        let conf = options.conf.to_str().ok_or(CephError::Nul {
            op: "rados_conf_read_file",
            what: "path",
        })?;
        let conf = cstr("rados_conf_read_file", "path", conf)?;
        // SAFETY: an unconnected handle of ours and a C string.
        check("rados_conf_read_file", unsafe {
            ffi::rados_conf_read_file(handle.0, conf.as_ptr())
        })?;
        let timeout = match options.op_timeout {
            t if t.is_zero() => "0".to_owned(),
            t => t.as_secs().max(1).to_string(),
        };
        let mut settings = vec![
            ("rados_osd_op_timeout", timeout.as_str()),
            ("rados_mon_op_timeout", timeout.as_str()),
            (
                "client_mount_timeout",
                if timeout == "0" {
                    "300"
                } else {
                    timeout.as_str()
                },
            ),
            ("log_to_stderr", "false"),
            ("err_to_stderr", "false"),
            // Completed RBD writes are then on the OSDs, and their errors
            // surface on them; commits still flush.
            ("rbd_cache", "false"),
        ];
        settings.extend_from_slice(options.settings);
        for (option, value) in settings {
            let (o, v) = (
                cstr("rados_conf_set", "option", option)?,
                cstr("rados_conf_set", "value", value)?,
            );
            // SAFETY: unconnected handle (configuration is allowed only now), C strings.
            check("rados_conf_set", unsafe {
                ffi::rados_conf_set(handle.0, o.as_ptr(), v.as_ptr())
            })?;
        }
        // SAFETY: a configured handle of ours.
        check("rados_connect", unsafe { ffi::rados_connect(handle.0) })?;
        Ok(Rados {
            handle: Arc::new(handle),
        })
    }

    /// An I/O context on `pool`, in `namespace` ("" for the pool's default).
    pub fn ioctx(&self, pool: &str, namespace: &str) -> Result<IoCtx, CephError> {
        let pool_c = cstr("rados_ioctx_create", "pool", pool)?;
        let ns = cstr("rados_ioctx_set_namespace", "namespace", namespace)?;
        let mut io: ffi::rados_ioctx_t = ptr::null_mut();
        // SAFETY: connected handle, C string, valid out-pointer.
        check("rados_ioctx_create", unsafe {
            ffi::rados_ioctx_create(self.handle.0, pool_c.as_ptr(), &mut io)
        })?;
        let inner = IoHandle {
            io,
            _cluster: self.handle.clone(),
        };
        // SAFETY: the context is new and not yet shared with any thread, the
        // only moment setting its namespace is safe.
        unsafe { ffi::rados_ioctx_set_namespace(inner.io, ns.as_ptr()) };
        Ok(IoCtx {
            inner: Arc::new(inner),
        })
    }

    /// Fences the client instance at `addr` (as lockers list it, with or
    /// without `v1:`) for `expire` (at least a second).
    pub fn blocklist_add(&self, addr: &str, expire: Duration) -> Result<(), CephError> {
        let mut addr = cstr("rados_blocklist_add", "address", addr)?.into_bytes_with_nul();
        let secs = u32::try_from(expire.as_secs().max(1)).unwrap_or(u32::MAX);
        // SAFETY: connected handle; a NUL-terminated buffer we own (the
        // function takes `char *` but does not write it).
        let ret = unsafe {
            ffi::rados_blocklist_add(self.handle.0, addr.as_mut_ptr().cast::<c_char>(), secs)
        };
        check("rados_blocklist_add", ret).map(drop)
    }

    /// Waits until this client has the newest OSD map.
    pub fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        // SAFETY: connected handle.
        check("rados_wait_for_latest_osdmap", unsafe {
            ffi::rados_wait_for_latest_osdmap(self.handle.0)
        })
        .map(drop)
    }

    /// This client instance's address(es), e.g. `127.0.0.1:0/123456`.
    pub fn addrs(&self) -> Result<String, CephError> {
        let mut out: *mut c_char = ptr::null_mut();
        // SAFETY: connected handle, valid out-pointer.
        check("rados_getaddrs", unsafe {
            ffi::rados_getaddrs(self.handle.0, &mut out)
        })?;
        if out.is_null() {
            return Err(CephError::NotFound {
                op: "rados_getaddrs",
            });
        }
        // SAFETY: on success `out` is a NUL-terminated `strdup`ed string,
        // ours to free with `free` after copying it.
        let addrs = unsafe { CStr::from_ptr(out) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: allocated by `strdup` in librados, freed once.
        unsafe { libc::free(out.cast()) };
        Ok(addrs)
    }

    /// This client instance's id (the number of its `client.N` entity).
    pub fn instance_id(&self) -> u64 {
        // SAFETY: connected handle.
        unsafe { ffi::rados_get_instance_id(self.handle.0) }
    }
}

/// The raw I/O context; destroyed when dropped, before its cluster handle.
#[derive(Debug)]
pub(crate) struct IoHandle {
    pub(crate) io: ffi::rados_ioctx_t,
    _cluster: Arc<Handle>,
}

// SAFETY: librados takes I/O on one context from any thread; the namespace
// (the one unsynchronised setting) is set before the context is shared.
unsafe impl Send for IoHandle {}
// SAFETY: as above.
unsafe impl Sync for IoHandle {}

impl Drop for IoHandle {
    fn drop(&mut self) {
        // SAFETY: created by `rados_ioctx_create`, destroyed once; every image
        // and pending operation on it holds an `Arc` of this handle.
        unsafe { ffi::rados_ioctx_destroy(self.io) };
    }
}

/// An I/O context: one pool and namespace.
#[derive(Debug, Clone)]
pub struct IoCtx {
    pub(crate) inner: Arc<IoHandle>,
}

/// A compound write operation built from a [`WriteOp`], with everything its
/// steps point to; released when dropped.
struct BuiltOp {
    op: ffi::rados_write_op_t,
    /// Strings, buffers and pointer arrays the steps refer to.
    _strings: Vec<CString>,
    _ptrs: Vec<Vec<*const c_char>>,
    _lens: Vec<Vec<size_t>>,
    /// Where `exec` steps report their own result, until the op completes.
    _prvals: Box<[c_int]>,
}

impl Drop for BuiltOp {
    fn drop(&mut self) {
        // SAFETY: created by `rados_create_write_op`, released once, after
        // the synchronous call returned or the asynchronous one completed.
        unsafe { ffi::rados_release_write_op(self.op) };
    }
}

fn cmp_code(op: CmpOp) -> u8 {
    match op {
        CmpOp::Eq => ffi::CMPXATTR_OP_EQ,
        CmpOp::Ne => ffi::CMPXATTR_OP_NE,
        CmpOp::Gt => ffi::CMPXATTR_OP_GT,
        CmpOp::Gte => ffi::CMPXATTR_OP_GTE,
        CmpOp::Lt => ffi::CMPXATTR_OP_LT,
        CmpOp::Lte => ffi::CMPXATTR_OP_LTE,
    }
}

/// The input of `lock.assert_locked`: `cls_lock_assert_op` in Ceph's
/// encoding (struct version 1, compat 1, u32 length; strings as u32 length +
/// bytes; the lock type as one byte).
fn assert_locked_input(name: &str, cookie: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (i, s) in [name, cookie, ""].into_iter().enumerate() {
        body.extend_from_slice(&(s.len() as u32).to_le_bytes());
        body.extend_from_slice(s.as_bytes());
        if i == 0 {
            body.push(LOCK_EXCLUSIVE);
        }
    }
    let mut out = vec![1, 1];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn build(op: &WriteOp) -> Result<BuiltOp, CephError> {
    const OP: &str = "rados_create_write_op";
    let execs = op
        .steps
        .iter()
        .filter(|s| matches!(s, WriteStep::AssertLocked { .. }))
        .count();
    // SAFETY: no arguments; a NULL result is checked below.
    let raw = unsafe { ffi::rados_create_write_op() };
    if raw.is_null() {
        return Err(CephError::Other {
            op: OP,
            errno: libc::ENOMEM,
        });
    }
    let mut built = BuiltOp {
        op: raw,
        _strings: Vec::new(),
        _ptrs: Vec::new(),
        _lens: Vec::new(),
        _prvals: vec![0; execs].into_boxed_slice(),
    };
    let mut exec_index = 0;
    // Every call below only appends a step to the op, copying its buffers
    // into the op (librados `bufferlist::append`); the kept copies in
    // `built` are for the pointers librados keeps (`prval`) and belt and braces.
    for step in &op.steps {
        match step {
            WriteStep::AssertLocked { name, cookie } => {
                let input = assert_locked_input(name, cookie);
                let prval: *mut c_int = &mut built._prvals[exec_index];
                exec_index += 1;
                // SAFETY: live op; static NUL-terminated class and method
                // names; `input` outlives the call; `prval` points into a
                // boxed slice the op's owner keeps until the op completes.
                unsafe {
                    ffi::rados_write_op_exec(
                        raw,
                        c"lock".as_ptr(),
                        c"assert_locked".as_ptr(),
                        input.as_ptr().cast(),
                        input.len(),
                        prval,
                    )
                };
            }
            WriteStep::CmpXattr {
                name,
                op: cmp,
                value,
            } => {
                let name = cstr("rados_write_op_cmpxattr", "name", name)?;
                // SAFETY: live op, C string, `value` outlives the call.
                unsafe {
                    ffi::rados_write_op_cmpxattr(
                        raw,
                        name.as_ptr(),
                        cmp_code(*cmp),
                        value.as_ptr().cast(),
                        value.len(),
                    )
                };
                built._strings.push(name);
            }
            WriteStep::Create { exclusive } => {
                let mode = if *exclusive {
                    ffi::CREATE_EXCLUSIVE
                } else {
                    ffi::CREATE_IDEMPOTENT
                };
                // SAFETY: live op; the category may be NULL.
                unsafe { ffi::rados_write_op_create(raw, mode, ptr::null()) };
            }
            WriteStep::Write { offset, data } => {
                // SAFETY: live op, `data` outlives the call.
                unsafe {
                    ffi::rados_write_op_write(raw, data.as_ptr().cast(), data.len(), *offset)
                };
            }
            WriteStep::WriteFull { data } => {
                // SAFETY: live op, `data` outlives the call.
                unsafe { ffi::rados_write_op_write_full(raw, data.as_ptr().cast(), data.len()) };
            }
            WriteStep::Truncate { size } => {
                // SAFETY: live op.
                unsafe { ffi::rados_write_op_truncate(raw, *size) };
            }
            WriteStep::Zero { offset, len } => {
                // SAFETY: live op.
                unsafe { ffi::rados_write_op_zero(raw, *offset, *len) };
            }
            WriteStep::SetXattr { name, value } => {
                let name = cstr("rados_write_op_setxattr", "name", name)?;
                // SAFETY: live op, C string, `value` outlives the call.
                unsafe {
                    ffi::rados_write_op_setxattr(
                        raw,
                        name.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                    )
                };
                built._strings.push(name);
            }
            WriteStep::Remove => {
                // SAFETY: live op.
                unsafe { ffi::rados_write_op_remove(raw) };
            }
            WriteStep::OmapSet { entries } => {
                let keys = entries
                    .iter()
                    .map(|(k, _)| cstr("rados_write_op_omap_set", "key", k))
                    .collect::<Result<Vec<_>, _>>()?;
                let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
                let val_ptrs: Vec<*const c_char> =
                    entries.iter().map(|(_, v)| v.as_ptr().cast()).collect();
                let lens: Vec<size_t> = entries.iter().map(|(_, v)| v.len()).collect();
                // SAFETY: live op; `n` keys, values and lengths, all alive
                // during the call (values are copied with their length).
                unsafe {
                    ffi::rados_write_op_omap_set(
                        raw,
                        key_ptrs.as_ptr(),
                        val_ptrs.as_ptr(),
                        lens.as_ptr(),
                        entries.len(),
                    )
                };
                built._strings.extend(keys);
                built._ptrs.push(key_ptrs);
                built._ptrs.push(val_ptrs);
                built._lens.push(lens);
            }
            WriteStep::OmapRm { keys } => {
                let keys = keys
                    .iter()
                    .map(|k| cstr("rados_write_op_omap_rm_keys", "key", k))
                    .collect::<Result<Vec<_>, _>>()?;
                let key_ptrs: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
                // SAFETY: live op; `n` C strings alive during the call.
                unsafe { ffi::rados_write_op_omap_rm_keys(raw, key_ptrs.as_ptr(), keys.len()) };
                built._strings.extend(keys);
                built._ptrs.push(key_ptrs);
            }
        }
    }
    Ok(built)
}

/// A completion of librados; released when dropped (after waiting).
struct Completion(ffi::rados_completion_t);

impl Completion {
    fn new() -> Result<Completion, CephError> {
        let mut c: ffi::rados_completion_t = ptr::null_mut();
        // SAFETY: no callback and no argument; valid out-pointer.
        let ret = unsafe { ffi::rados_aio_create_completion2(ptr::null_mut(), None, &mut c) };
        check("rados_aio_create_completion2", ret)?;
        Ok(Completion(c))
    }

    fn wait(&self, op: &'static str) -> Result<u64, CephError> {
        // SAFETY: a live completion of ours.
        unsafe { ffi::rados_aio_wait_for_complete(self.0) };
        // SAFETY: as above; complete, so the value is final.
        check(op, unsafe { ffi::rados_aio_get_return_value(self.0) })
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // SAFETY: a live completion; waiting first makes releasing it safe
        // even if its operation was never waited for.
        unsafe {
            ffi::rados_aio_wait_for_complete(self.0);
            ffi::rados_aio_release(self.0);
        }
    }
}

/// An asynchronous RADOS write in flight. It owns the operation's buffers;
/// dropping it waits for the operation.
pub struct RadosPending {
    op: &'static str,
    // Field order: the completion is waited for (dropped) before the
    // operation and buffers it refers to are released.
    completion: Completion,
    _op: Option<BuiltOp>,
    _data: Vec<u8>,
}

// SAFETY: the completion and operation are used by one thread at a time
// (moved with the value); librados's own threads only signal the completion.
unsafe impl Send for RadosPending {}

impl Pending for RadosPending {
    fn wait(self) -> Result<(), CephError> {
        self.completion.wait(self.op).map(drop)
    }
}

/// An asynchronous RADOS read in flight; owns its buffer.
pub struct ReadPending {
    completion: Completion,
    buf: Vec<u8>,
}

// SAFETY: as for `RadosPending`.
unsafe impl Send for ReadPending {}

impl ReadPending {
    /// Waits for the read; the bytes read (fewer at the object's end).
    pub fn wait(mut self) -> Result<Vec<u8>, CephError> {
        let n = self.completion.wait("rados_aio_read")?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.truncate(usize::try_from(n).unwrap_or(usize::MAX));
        Ok(buf)
    }
}

impl IoCtx {
    fn io(&self) -> ffi::rados_ioctx_t {
        self.inner.io
    }

    /// Reads up to `len` bytes at `offset`.
    pub fn read(&self, oid: &str, offset: u64, len: usize) -> Result<Vec<u8>, CephError> {
        let o = cstr("rados_read", "oid", oid)?;
        let mut buf = vec![0u8; len];
        // SAFETY: live context, C string, a buffer of `len` bytes.
        let n = check("rados_read", unsafe {
            ffi::rados_read(self.io(), o.as_ptr(), buf.as_mut_ptr().cast(), len, offset)
        })?;
        buf.truncate(usize::try_from(n).unwrap_or(len));
        Ok(buf)
    }

    /// The object's size.
    pub fn stat(&self, oid: &str) -> Result<u64, CephError> {
        let o = cstr("rados_stat", "oid", oid)?;
        let mut size = 0u64;
        // SAFETY: live context, C string, valid out-pointer; mtime may be NULL.
        check("rados_stat", unsafe {
            ffi::rados_stat(self.io(), o.as_ptr(), &mut size, ptr::null_mut())
        })?;
        Ok(size)
    }

    /// Removes the object.
    pub fn remove(&self, oid: &str) -> Result<(), CephError> {
        let o = cstr("rados_remove", "oid", oid)?;
        // SAFETY: live context, C string.
        check("rados_remove", unsafe {
            ffi::rados_remove(self.io(), o.as_ptr())
        })
        .map(drop)
    }

    /// Sets the object's size.
    pub fn trunc(&self, oid: &str, size: u64) -> Result<(), CephError> {
        let o = cstr("rados_trunc", "oid", oid)?;
        // SAFETY: live context, C string.
        check("rados_trunc", unsafe {
            ffi::rados_trunc(self.io(), o.as_ptr(), size)
        })
        .map(drop)
    }

    /// The object's extended attributes.
    pub fn xattrs(&self, oid: &str) -> Result<BTreeMap<String, Vec<u8>>, CephError> {
        let o = cstr("rados_getxattrs", "oid", oid)?;
        let mut iter: ffi::rados_xattrs_iter_t = ptr::null_mut();
        // SAFETY: live context, C string, valid out-pointer.
        check("rados_getxattrs", unsafe {
            ffi::rados_getxattrs(self.io(), o.as_ptr(), &mut iter)
        })?;
        let mut out = BTreeMap::new();
        let result = loop {
            let (mut name, mut val, mut len): (*const c_char, *const c_char, size_t) =
                (ptr::null(), ptr::null(), 0);
            // SAFETY: a live iterator; valid out-pointers.
            let ret = unsafe { ffi::rados_getxattrs_next(iter, &mut name, &mut val, &mut len) };
            if let Err(e) = check("rados_getxattrs_next", ret) {
                break Err(e);
            }
            if name.is_null() {
                break Ok(());
            }
            // SAFETY: `name` is a NUL-terminated string and `val` `len` bytes
            // (or NULL when empty), both valid until the next call on `iter`.
            let (key, value) = unsafe {
                let key = CStr::from_ptr(name).to_string_lossy().into_owned();
                let value = if val.is_null() || len == 0 {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(val.cast::<u8>(), len).to_vec()
                };
                (key, value)
            };
            out.insert(key, value);
        };
        // SAFETY: the iterator from `rados_getxattrs`, ended once.
        unsafe { ffi::rados_getxattrs_end(iter) };
        result.map(|()| out)
    }

    /// Applies a compound write, all-or-nothing; durable on return.
    pub fn operate(&self, oid: &str, op: &WriteOp) -> Result<(), CephError> {
        let o = cstr("rados_write_op_operate", "oid", oid)?;
        let built = build(op)?;
        // SAFETY: a built op whose referents live in `built`; live context; C
        // string; mtime NULL (the OSD's clock).
        let ret = unsafe {
            ffi::rados_write_op_operate(
                built.op,
                self.io(),
                o.as_ptr(),
                ptr::null_mut(),
                ffi::OPERATION_FULL_TRY,
            )
        };
        check("rados_write_op_operate", ret).map(drop)
    }

    /// Starts a compound write.
    pub fn operate_async(&self, oid: &str, op: &WriteOp) -> Result<RadosPending, CephError> {
        let o = cstr("rados_aio_write_op_operate", "oid", oid)?;
        let built = build(op)?;
        let completion = Completion::new()?;
        // SAFETY: as `operate`; the op and its referents move into the
        // pending value, which keeps them until the completion is done.
        let ret = unsafe {
            ffi::rados_aio_write_op_operate(
                built.op,
                self.io(),
                completion.0,
                o.as_ptr(),
                ptr::null_mut(),
                ffi::OPERATION_FULL_TRY,
            )
        };
        check("rados_aio_write_op_operate", ret)?;
        Ok(RadosPending {
            op: "rados_aio_write_op_operate",
            completion,
            _op: Some(built),
            _data: Vec::new(),
        })
    }

    /// Starts a plain write of `data` at `offset`.
    pub fn aio_write(
        &self,
        oid: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<RadosPending, CephError> {
        let o = cstr("rados_aio_write", "oid", oid)?;
        let completion = Completion::new()?;
        // SAFETY: live context and completion, C string; `data` moves into
        // the pending value and outlives the operation.
        let ret = unsafe {
            ffi::rados_aio_write(
                self.io(),
                o.as_ptr(),
                completion.0,
                data.as_ptr().cast(),
                data.len(),
                offset,
            )
        };
        check("rados_aio_write", ret)?;
        Ok(RadosPending {
            op: "rados_aio_write",
            completion,
            _op: None,
            _data: data,
        })
    }

    /// Starts a read of up to `len` bytes at `offset`.
    pub fn aio_read(&self, oid: &str, offset: u64, len: usize) -> Result<ReadPending, CephError> {
        let o = cstr("rados_aio_read", "oid", oid)?;
        let completion = Completion::new()?;
        let mut buf = vec![0u8; len];
        // SAFETY: live context and completion; `buf` (whose heap memory does
        // not move with the Vec) belongs to the pending value until it
        // completes.
        let ret = unsafe {
            ffi::rados_aio_read(
                self.io(),
                o.as_ptr(),
                completion.0,
                buf.as_mut_ptr().cast(),
                len,
                offset,
            )
        };
        check("rados_aio_read", ret)?;
        Ok(ReadPending { completion, buf })
    }

    /// Up to `max` omap entries with keys after `after`.
    pub fn omap(&self, oid: &str, after: Option<&str>, max: u64) -> Result<OmapPage, CephError> {
        const OP: &str = "rados_read_op_operate";
        let o = cstr(OP, "oid", oid)?;
        let after = after
            .map(|a| cstr("rados_read_op_omap_get_vals2", "start_after", a))
            .transpose()?;
        // SAFETY: no arguments; NULL checked.
        let op = unsafe { ffi::rados_create_read_op() };
        if op.is_null() {
            return Err(CephError::Other {
                op: "rados_create_read_op",
                errno: libc::ENOMEM,
            });
        }
        let mut iter: ffi::rados_omap_iter_t = ptr::null_mut();
        let (mut more, mut prval): (c_uchar, c_int) = (0, 0);
        // SAFETY: live read op; `after` NULL or a C string alive until
        // operate returns; out-pointers live until then too.
        unsafe {
            ffi::rados_read_op_omap_get_vals2(
                op,
                after.as_ref().map_or(ptr::null(), |a| a.as_ptr()),
                ptr::null(),
                max,
                &mut iter,
                &mut more,
                &mut prval,
            )
        };
        // SAFETY: live op, context and C string.
        let ret = unsafe { ffi::rados_read_op_operate(op, self.io(), o.as_ptr(), 0) };
        let mut entries = Vec::new();
        let result = check(OP, ret).and_then(|_| check("rados_read_op_omap_get_vals2", prval));
        let result = result.and_then(|_| loop {
            let (mut key, mut val, mut klen, mut vlen): (*mut c_char, *mut c_char, size_t, size_t) =
                (ptr::null_mut(), ptr::null_mut(), 0, 0);
            // SAFETY: the iterator filled by the successful operation.
            let ret = unsafe {
                ffi::rados_omap_get_next2(iter, &mut key, &mut val, &mut klen, &mut vlen)
            };
            check("rados_omap_get_next2", ret)?;
            if key.is_null() {
                break Ok(());
            }
            // SAFETY: `key` is `klen` bytes and `val` `vlen` bytes (NULL when
            // empty), valid until the next call on the iterator.
            let (k, v) = unsafe {
                let k = String::from_utf8_lossy(std::slice::from_raw_parts(key.cast::<u8>(), klen))
                    .into_owned();
                let v = if val.is_null() || vlen == 0 {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(val.cast::<u8>(), vlen).to_vec()
                };
                (k, v)
            };
            entries.push((k, v));
        });
        if !iter.is_null() {
            // SAFETY: the iterator the operation created, ended once.
            unsafe { ffi::rados_omap_get_end(iter) };
        }
        // SAFETY: created above, released once, after its iterator ended.
        unsafe { ffi::rados_release_read_op(op) };
        result.map(|()| OmapPage {
            entries,
            more: more != 0,
        })
    }

    /// Takes or renews an exclusive lock (creating the object empty).
    pub fn lock_exclusive(&self, oid: &str, lock: &LockRequest<'_>) -> Result<(), CephError> {
        const OP: &str = "rados_lock_exclusive";
        let (o, name) = (cstr(OP, "oid", oid)?, cstr(OP, "name", lock.name)?);
        let (cookie, desc) = (
            cstr(OP, "cookie", lock.cookie)?,
            cstr(OP, "desc", lock.desc)?,
        );
        let mut tv = libc::timeval {
            tv_sec: libc::time_t::try_from(lock.duration.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(lock.duration.subsec_micros() as i32),
        };
        let flags = match lock.renew {
            Renew::No => 0,
            Renew::May => ffi::LOCK_FLAG_MAY_RENEW,
            Renew::Must => ffi::LOCK_FLAG_MUST_RENEW,
        };
        // A zero duration means "until unlocked": pass NULL.
        let duration: *mut libc::timeval = if lock.duration.is_zero() {
            ptr::null_mut()
        } else {
            &mut tv
        };
        // SAFETY: live context, C strings and a timeval (or NULL) alive for the call.
        let ret = unsafe {
            ffi::rados_lock_exclusive(
                self.io(),
                o.as_ptr(),
                name.as_ptr(),
                cookie.as_ptr(),
                desc.as_ptr(),
                duration,
                flags,
            )
        };
        check(OP, ret).map(drop)
    }

    /// Releases our lock.
    pub fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), CephError> {
        const OP: &str = "rados_unlock";
        let (o, n, c) = (
            cstr(OP, "oid", oid)?,
            cstr(OP, "name", name)?,
            cstr(OP, "cookie", cookie)?,
        );
        // SAFETY: live context, C strings.
        check(OP, unsafe {
            ffi::rados_unlock(self.io(), o.as_ptr(), n.as_ptr(), c.as_ptr())
        })
        .map(drop)
    }

    /// Removes `client`'s lock with `cookie`.
    pub fn break_lock(
        &self,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), CephError> {
        const OP: &str = "rados_break_lock";
        let (o, n) = (cstr(OP, "oid", oid)?, cstr(OP, "name", name)?);
        let (cl, c) = (cstr(OP, "client", client)?, cstr(OP, "cookie", cookie)?);
        // SAFETY: live context, C strings.
        check(OP, unsafe {
            ffi::rados_break_lock(self.io(), o.as_ptr(), n.as_ptr(), cl.as_ptr(), c.as_ptr())
        })
        .map(drop)
    }

    /// The holders of lock `name`.
    pub fn lockers(&self, oid: &str, name: &str) -> Result<Vec<Locker>, CephError> {
        const OP: &str = "rados_list_lockers";
        let (o, n) = (cstr(OP, "oid", oid)?, cstr(OP, "name", name)?);
        let mut sizes = [256usize; 4];
        for _ in 0..4 {
            let mut bufs = sizes.map(|s| vec![0u8; s]);
            let mut lens = sizes;
            let mut exclusive: c_int = 0;
            let [tag, clients, cookies, addrs] = &mut bufs;
            let [tag_len, clients_len, cookies_len, addrs_len] = &mut lens;
            // SAFETY: live context, C strings; four buffers with their
            // lengths in the matching in/out size arguments.
            let ret = unsafe {
                ffi::rados_list_lockers(
                    self.io(),
                    o.as_ptr(),
                    n.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr().cast(),
                    tag_len,
                    clients.as_mut_ptr().cast(),
                    clients_len,
                    cookies.as_mut_ptr().cast(),
                    cookies_len,
                    addrs.as_mut_ptr().cast(),
                    addrs_len,
                )
            };
            match CephError::check(OP, ret as i64) {
                Ok(count) => {
                    let split = |buf: &[u8], len: usize| -> Vec<String> {
                        buf[..len.min(buf.len())]
                            .split(|&b| b == 0)
                            .filter(|s| !s.is_empty())
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect()
                    };
                    let clients = split(&bufs[1], lens[1]);
                    let cookies = split(&bufs[2], lens[2]);
                    let addrs = split(&bufs[3], lens[3]);
                    let count = usize::try_from(count).unwrap_or(0);
                    return Ok(
                        (0..count.min(clients.len()).min(cookies.len()).min(addrs.len()))
                            .map(|i| Locker {
                                client: clients[i].clone(),
                                cookie: cookies[i].clone(),
                                addr: addrs[i].clone(),
                            })
                            .collect(),
                    );
                }
                Err(CephError::Range { .. }) => {
                    // The sizes needed were written back; grow and ask again.
                    for (size, need) in sizes.iter_mut().zip(lens) {
                        *size = (*size).max(need) * 2;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(CephError::Range { op: OP })
    }
}

/// How [`RadosCluster::connect`] reaches the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions<'a> {
    /// Connection settings.
    pub connect: ConnectOptions<'a>,
    /// The pool.
    pub pool: &'a str,
    /// The RADOS and RBD namespace, created for RBD if missing ("": none).
    pub namespace: &'a str,
}

/// The real [`Cluster`]: one connected client, one pool and namespace.
#[derive(Debug, Clone)]
pub struct RadosCluster {
    rados: Rados,
    io: IoCtx,
}

impl RadosCluster {
    /// Connects and opens the pool and namespace (creating the RBD namespace
    /// if it is missing).
    pub fn connect(options: &ClusterOptions<'_>) -> Result<RadosCluster, CephError> {
        let rados = Rados::connect(&options.connect)?;
        if !options.namespace.is_empty() {
            let root = rados.ioctx(options.pool, "")?;
            if !rbd::namespace_exists(&root, options.namespace)? {
                match rbd::namespace_create(&root, options.namespace) {
                    // Another client created it meanwhile.
                    Ok(()) | Err(CephError::Exists { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let io = rados.ioctx(options.pool, options.namespace)?;
        Ok(RadosCluster { rados, io })
    }

    /// The cluster handle.
    pub fn rados(&self) -> &Rados {
        &self.rados
    }

    /// The I/O context of the pool and namespace.
    pub fn ioctx(&self) -> &IoCtx {
        &self.io
    }
}

impl Cluster for RadosCluster {
    type Image = Image;
    type Pending = RadosPending;

    fn read(&self, oid: &str, offset: u64, len: usize) -> Result<Vec<u8>, CephError> {
        self.io.read(oid, offset, len)
    }

    fn stat(&self, oid: &str) -> Result<u64, CephError> {
        self.io.stat(oid)
    }

    fn operate(&self, oid: &str, op: &WriteOp) -> Result<(), CephError> {
        self.io.operate(oid, op)
    }

    fn operate_async(&self, oid: &str, op: &WriteOp) -> Result<RadosPending, CephError> {
        self.io.operate_async(oid, op)
    }

    fn xattrs(&self, oid: &str) -> Result<BTreeMap<String, Vec<u8>>, CephError> {
        self.io.xattrs(oid)
    }

    fn omap(&self, oid: &str, after: Option<&str>, max: u64) -> Result<OmapPage, CephError> {
        self.io.omap(oid, after, max)
    }

    fn lock_exclusive(&self, oid: &str, lock: &LockRequest<'_>) -> Result<(), CephError> {
        self.io.lock_exclusive(oid, lock)
    }

    fn unlock(&self, oid: &str, name: &str, cookie: &str) -> Result<(), CephError> {
        self.io.unlock(oid, name, cookie)
    }

    fn break_lock(
        &self,
        oid: &str,
        name: &str,
        client: &str,
        cookie: &str,
    ) -> Result<(), CephError> {
        self.io.break_lock(oid, name, client, cookie)
    }

    fn lockers(&self, oid: &str, name: &str) -> Result<Vec<Locker>, CephError> {
        self.io.lockers(oid, name)
    }

    fn blocklist(&self, addr: &str, expire: Duration) -> Result<(), CephError> {
        self.rados.blocklist_add(addr, expire)
    }

    fn wait_for_latest_osdmap(&self) -> Result<(), CephError> {
        self.rados.wait_for_latest_osdmap()
    }

    fn my_addr(&self) -> Result<String, CephError> {
        self.rados.addrs()
    }

    fn image_create(&self, name: &str, size: u64) -> Result<(), CephError> {
        rbd::create(&self.io, name, size, rbd::BASE_FEATURES)
    }

    fn image_open(&self, name: &str) -> Result<Image, CephError> {
        Image::open(&self.io, name)
    }

    fn image_open_read_only(&self, name: &str) -> Result<Image, CephError> {
        Image::open_read_only(&self.io, name)
    }

    fn image_remove(&self, name: &str) -> Result<(), CephError> {
        rbd::remove(&self.io, name)
    }

    fn snap_protect_clone(&self, image: &str, snap: &str, clone: &str) -> Result<(), CephError> {
        let parent = Image::open(&self.io, image)?;
        parent.snap_create(snap)?;
        parent.snap_protect(snap)?;
        rbd::clone(&self.io, image, snap, &self.io, clone, rbd::BASE_FEATURES)
    }

    fn image_children(&self, image: &str) -> Result<Vec<String>, CephError> {
        Image::open_read_only(&self.io, image)?.children()
    }

    fn image_snaps_remove(&self, image: &str) -> Result<(), CephError> {
        let image = Image::open(&self.io, image)?;
        for snap in image.snap_names()? {
            if image.snap_is_protected(&snap)? {
                image.snap_unprotect(&snap)?;
            }
            image.snap_remove(&snap)?;
        }
        Ok(())
    }
}

impl crate::ClusterImage for Image {
    type Pending = ImagePending;

    fn size(&self) -> Result<u64, CephError> {
        Image::size(self)
    }

    fn resize(&self, size: u64) -> Result<(), CephError> {
        Image::resize(self, size)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), CephError> {
        Image::read(self, offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), CephError> {
        Image::write(self, offset, data)
    }

    fn write_async(&self, offset: u64, data: Vec<u8>) -> Result<ImagePending, CephError> {
        Image::aio_write(self, offset, data)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), CephError> {
        Image::write_zeroes(self, offset, len)
    }

    fn flush(&self) -> Result<(), CephError> {
        Image::flush(self)
    }

    fn allocated(&self, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, CephError> {
        Image::allocated(self, offset, len)
    }

    fn lock_acquire_breaking(&self) -> Result<(), CephError> {
        Image::lock_acquire_breaking(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assert_locked_input_matches_cls_lock_encoding() {
        // Bytes as the verified probe built them: v1 compat 1, u32 length,
        // then name, type (exclusive), cookie, empty tag.
        let mut body = Vec::new();
        body.extend_from_slice(&5u32.to_le_bytes());
        body.extend_from_slice(b"owner");
        body.push(1);
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(b"cA");
        body.extend_from_slice(&0u32.to_le_bytes());
        let mut want = vec![1, 1];
        want.extend_from_slice(&(body.len() as u32).to_le_bytes());
        want.extend_from_slice(&body);
        assert_eq!(assert_locked_input("owner", "cA"), want);
    }
}
