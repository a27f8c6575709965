//! The C functions of librados (`librados.h`, LIBRADOS 3.x) and librbd
//! (`librbd.h`, LIBRBD 1.x) that Tidemark calls, declared by hand.
//!
//! Why declared here rather than taken from `rados-sys`/`rbd-sys`: those
//! crates (0.1) need Rust 1.88, above the workspace's `rust-version`, and run
//! bindgen at build time, which needs libclang and the `-dev` headers on every
//! build machine. The surface used is about sixty functions of a C API that
//! Ceph keeps stable across releases, so declaring them costs less than either.
//!
//! The libraries are linked by their SONAME (`librados.so.2`, `librbd.so.1`,
//! with `+verbatim`), so building needs only the runtime packages (`librados2`,
//! `librbd1`), not the `-dev` ones that provide the unversioned `.so` link,
//! and a library of another ABI major cannot be picked up by accident. The
//! safe wrappers check `rados_version`/`rbd_version` at connect, and
//! `tests/live.rs` calls every function below against a real cluster, which
//! is what guards these declarations against drift.
//!
//! Conventions of both libraries: an `int`/`ssize_t` result is `>= 0`
//! (success or a byte count) or `-errno`. Nothing here is called with a
//! callback except `rbd_diff_iterate2`, whose callback runs on the caller's
//! thread before the call returns.

#![allow(non_camel_case_types)]

use libc::{c_char, c_int, c_uchar, c_void, size_t, ssize_t, time_t, timeval};

/// A cluster handle (`rados_t`).
pub(crate) type rados_t = *mut c_void;
/// An I/O context: a pool and a namespace (`rados_ioctx_t`).
pub(crate) type rados_ioctx_t = *mut c_void;
/// A compound write operation (`rados_write_op_t`).
pub(crate) type rados_write_op_t = *mut c_void;
/// A compound read operation (`rados_read_op_t`).
pub(crate) type rados_read_op_t = *mut c_void;
/// An asynchronous operation's completion (`rados_completion_t`).
pub(crate) type rados_completion_t = *mut c_void;
/// An iterator over omap values (`rados_omap_iter_t`).
pub(crate) type rados_omap_iter_t = *mut c_void;
/// An iterator over extended attributes (`rados_xattrs_iter_t`).
pub(crate) type rados_xattrs_iter_t = *mut c_void;
/// An open RBD image (`rbd_image_t`).
pub(crate) type rbd_image_t = *mut c_void;
/// An RBD asynchronous operation's completion (`rbd_completion_t`).
pub(crate) type rbd_completion_t = *mut c_void;

/// `rados_callback_t`; always passed as `None` here.
pub(crate) type rados_callback_t = Option<unsafe extern "C" fn(rados_completion_t, *mut c_void)>;
/// `rbd_callback_t`; always passed as `None` here.
pub(crate) type rbd_callback_t = Option<unsafe extern "C" fn(rbd_completion_t, *mut c_void)>;
/// The callback of `rbd_diff_iterate2`: offset, length, whether the extent
/// exists, the caller's argument; a negative return stops the iteration.
pub(crate) type rbd_diff_cb = unsafe extern "C" fn(u64, size_t, c_int, *mut c_void) -> c_int;

/// `rbd_snap_info_t`: one snapshot as `rbd_snap_list` fills it (freed by
/// `rbd_snap_list_end`).
#[repr(C)]
pub(crate) struct rbd_snap_info_t {
    pub(crate) id: u64,
    pub(crate) size: u64,
    pub(crate) name: *const c_char,
}

/// `rbd_linked_image_spec_t`: a clone as `rbd_list_children3` fills it
/// (freed by `rbd_linked_image_spec_list_cleanup`).
#[repr(C)]
pub(crate) struct rbd_linked_image_spec_t {
    pub(crate) pool_id: i64,
    pub(crate) pool_name: *mut c_char,
    pub(crate) pool_namespace: *mut c_char,
    pub(crate) image_id: *mut c_char,
    pub(crate) image_name: *mut c_char,
    pub(crate) trash: bool,
}

/// `LIBRADOS_CMPXATTR_OP_EQ`: the op's value equals the stored one.
pub(crate) const CMPXATTR_OP_EQ: u8 = 1;
/// `LIBRADOS_CMPXATTR_OP_NE`.
pub(crate) const CMPXATTR_OP_NE: u8 = 2;
/// `LIBRADOS_CMPXATTR_OP_GT`: the op's value is greater than the stored one.
pub(crate) const CMPXATTR_OP_GT: u8 = 3;
/// `LIBRADOS_CMPXATTR_OP_GTE`.
pub(crate) const CMPXATTR_OP_GTE: u8 = 4;
/// `LIBRADOS_CMPXATTR_OP_LT`: the op's value is less than the stored one.
pub(crate) const CMPXATTR_OP_LT: u8 = 5;
/// `LIBRADOS_CMPXATTR_OP_LTE`.
pub(crate) const CMPXATTR_OP_LTE: u8 = 6;
/// `LIBRADOS_LOCK_FLAG_MAY_RENEW`: renew the lock if it is ours, else take it.
pub(crate) const LOCK_FLAG_MAY_RENEW: u8 = 1;
/// `LIBRADOS_LOCK_FLAG_MUST_RENEW`: renew the lock only if it is still ours.
pub(crate) const LOCK_FLAG_MUST_RENEW: u8 = 2;
/// `LIBRADOS_CREATE_EXCLUSIVE`.
pub(crate) const CREATE_EXCLUSIVE: c_int = 1;
/// `LIBRADOS_CREATE_IDEMPOTENT`.
pub(crate) const CREATE_IDEMPOTENT: c_int = 0;
/// `LIBRADOS_OPERATION_FULL_TRY`: a full pool fails the op (`-ENOSPC`,
/// `-EDQUOT`) instead of blocking it until space frees up.
pub(crate) const OPERATION_FULL_TRY: c_int = 64;
/// `RBD_LOCK_MODE_EXCLUSIVE`.
pub(crate) const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;

#[link(name = "librados.so.2", kind = "dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    // Cluster.
    pub(crate) fn rados_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    pub(crate) fn rados_create2(
        pcluster: *mut rados_t,
        clustername: *const c_char,
        name: *const c_char,
        flags: u64,
    ) -> c_int;
    pub(crate) fn rados_conf_read_file(cluster: rados_t, path: *const c_char) -> c_int;
    pub(crate) fn rados_conf_set(
        cluster: rados_t,
        option: *const c_char,
        value: *const c_char,
    ) -> c_int;
    pub(crate) fn rados_connect(cluster: rados_t) -> c_int;
    pub(crate) fn rados_shutdown(cluster: rados_t);
    pub(crate) fn rados_wait_for_latest_osdmap(cluster: rados_t) -> c_int;
    pub(crate) fn rados_getaddrs(cluster: rados_t, addrs: *mut *mut c_char) -> c_int;
    pub(crate) fn rados_get_instance_id(cluster: rados_t) -> u64;
    pub(crate) fn rados_blocklist_add(
        cluster: rados_t,
        client_address: *mut c_char,
        expire_seconds: u32,
    ) -> c_int;

    // I/O contexts.
    pub(crate) fn rados_ioctx_create(
        cluster: rados_t,
        pool_name: *const c_char,
        ioctx: *mut rados_ioctx_t,
    ) -> c_int;
    pub(crate) fn rados_ioctx_destroy(io: rados_ioctx_t);
    pub(crate) fn rados_ioctx_set_namespace(io: rados_ioctx_t, nspace: *const c_char);

    // Synchronous object calls.
    pub(crate) fn rados_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        buf: *mut c_char,
        len: size_t,
        off: u64,
    ) -> c_int;
    pub(crate) fn rados_stat(
        io: rados_ioctx_t,
        oid: *const c_char,
        psize: *mut u64,
        pmtime: *mut time_t,
    ) -> c_int;
    pub(crate) fn rados_remove(io: rados_ioctx_t, oid: *const c_char) -> c_int;
    pub(crate) fn rados_trunc(io: rados_ioctx_t, oid: *const c_char, size: u64) -> c_int;
    pub(crate) fn rados_getxattrs(
        io: rados_ioctx_t,
        oid: *const c_char,
        iter: *mut rados_xattrs_iter_t,
    ) -> c_int;
    pub(crate) fn rados_getxattrs_next(
        iter: rados_xattrs_iter_t,
        name: *mut *const c_char,
        val: *mut *const c_char,
        len: *mut size_t,
    ) -> c_int;
    pub(crate) fn rados_getxattrs_end(iter: rados_xattrs_iter_t);

    // Write operations.
    pub(crate) fn rados_create_write_op() -> rados_write_op_t;
    pub(crate) fn rados_release_write_op(op: rados_write_op_t);
    pub(crate) fn rados_write_op_cmpxattr(
        op: rados_write_op_t,
        name: *const c_char,
        comparison_operator: u8,
        value: *const c_char,
        value_len: size_t,
    );
    pub(crate) fn rados_write_op_setxattr(
        op: rados_write_op_t,
        name: *const c_char,
        value: *const c_char,
        value_len: size_t,
    );
    pub(crate) fn rados_write_op_create(
        op: rados_write_op_t,
        exclusive: c_int,
        category: *const c_char,
    );
    pub(crate) fn rados_write_op_write(
        op: rados_write_op_t,
        buffer: *const c_char,
        len: size_t,
        offset: u64,
    );
    pub(crate) fn rados_write_op_write_full(
        op: rados_write_op_t,
        buffer: *const c_char,
        len: size_t,
    );
    pub(crate) fn rados_write_op_truncate(op: rados_write_op_t, offset: u64);
    pub(crate) fn rados_write_op_zero(op: rados_write_op_t, offset: u64, len: u64);
    pub(crate) fn rados_write_op_remove(op: rados_write_op_t);
    pub(crate) fn rados_write_op_exec(
        op: rados_write_op_t,
        cls: *const c_char,
        method: *const c_char,
        in_buf: *const c_char,
        in_len: size_t,
        prval: *mut c_int,
    );
    pub(crate) fn rados_write_op_omap_set(
        op: rados_write_op_t,
        keys: *const *const c_char,
        vals: *const *const c_char,
        lens: *const size_t,
        num: size_t,
    );
    pub(crate) fn rados_write_op_omap_rm_keys(
        op: rados_write_op_t,
        keys: *const *const c_char,
        keys_len: size_t,
    );
    pub(crate) fn rados_write_op_operate(
        op: rados_write_op_t,
        io: rados_ioctx_t,
        oid: *const c_char,
        mtime: *mut time_t,
        flags: c_int,
    ) -> c_int;
    pub(crate) fn rados_aio_write_op_operate(
        op: rados_write_op_t,
        io: rados_ioctx_t,
        completion: rados_completion_t,
        oid: *const c_char,
        mtime: *mut time_t,
        flags: c_int,
    ) -> c_int;

    // Read operations.
    pub(crate) fn rados_create_read_op() -> rados_read_op_t;
    pub(crate) fn rados_release_read_op(op: rados_read_op_t);
    pub(crate) fn rados_read_op_omap_get_vals2(
        op: rados_read_op_t,
        start_after: *const c_char,
        filter_prefix: *const c_char,
        max_return: u64,
        iter: *mut rados_omap_iter_t,
        pmore: *mut c_uchar,
        prval: *mut c_int,
    );
    pub(crate) fn rados_read_op_operate(
        op: rados_read_op_t,
        io: rados_ioctx_t,
        oid: *const c_char,
        flags: c_int,
    ) -> c_int;
    pub(crate) fn rados_omap_get_next2(
        iter: rados_omap_iter_t,
        key: *mut *mut c_char,
        val: *mut *mut c_char,
        key_len: *mut size_t,
        val_len: *mut size_t,
    ) -> c_int;
    pub(crate) fn rados_omap_get_end(iter: rados_omap_iter_t);

    // Asynchronous I/O.
    pub(crate) fn rados_aio_create_completion2(
        cb_arg: *mut c_void,
        cb_complete: rados_callback_t,
        pc: *mut rados_completion_t,
    ) -> c_int;
    pub(crate) fn rados_aio_write(
        io: rados_ioctx_t,
        oid: *const c_char,
        completion: rados_completion_t,
        buf: *const c_char,
        len: size_t,
        off: u64,
    ) -> c_int;
    pub(crate) fn rados_aio_read(
        io: rados_ioctx_t,
        oid: *const c_char,
        completion: rados_completion_t,
        buf: *mut c_char,
        len: size_t,
        off: u64,
    ) -> c_int;
    pub(crate) fn rados_aio_wait_for_complete(c: rados_completion_t) -> c_int;
    pub(crate) fn rados_aio_get_return_value(c: rados_completion_t) -> c_int;
    pub(crate) fn rados_aio_release(c: rados_completion_t);

    // Advisory locks (the `lock` object class).
    pub(crate) fn rados_lock_exclusive(
        io: rados_ioctx_t,
        oid: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
        desc: *const c_char,
        duration: *mut timeval,
        flags: u8,
    ) -> c_int;
    pub(crate) fn rados_unlock(
        io: rados_ioctx_t,
        oid: *const c_char,
        name: *const c_char,
        cookie: *const c_char,
    ) -> c_int;
    pub(crate) fn rados_list_lockers(
        io: rados_ioctx_t,
        oid: *const c_char,
        name: *const c_char,
        exclusive: *mut c_int,
        tag: *mut c_char,
        tag_len: *mut size_t,
        clients: *mut c_char,
        clients_len: *mut size_t,
        cookies: *mut c_char,
        cookies_len: *mut size_t,
        addrs: *mut c_char,
        addrs_len: *mut size_t,
    ) -> ssize_t;
    pub(crate) fn rados_break_lock(
        io: rados_ioctx_t,
        oid: *const c_char,
        name: *const c_char,
        client: *const c_char,
        cookie: *const c_char,
    ) -> c_int;
}

#[link(name = "librbd.so.1", kind = "dylib", modifiers = "+verbatim")]
unsafe extern "C" {
    pub(crate) fn rbd_version(major: *mut c_int, minor: *mut c_int, extra: *mut c_int);
    pub(crate) fn rbd_namespace_exists(
        io: rados_ioctx_t,
        namespace_name: *const c_char,
        exists: *mut bool,
    ) -> c_int;
    pub(crate) fn rbd_namespace_create(io: rados_ioctx_t, namespace_name: *const c_char) -> c_int;
    pub(crate) fn rbd_create2(
        io: rados_ioctx_t,
        name: *const c_char,
        size: u64,
        features: u64,
        order: *mut c_int,
    ) -> c_int;
    pub(crate) fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
    pub(crate) fn rbd_open(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub(crate) fn rbd_open_read_only(
        io: rados_ioctx_t,
        name: *const c_char,
        image: *mut rbd_image_t,
        snap_name: *const c_char,
    ) -> c_int;
    pub(crate) fn rbd_close(image: rbd_image_t) -> c_int;
    pub(crate) fn rbd_get_size(image: rbd_image_t, size: *mut u64) -> c_int;
    pub(crate) fn rbd_resize(image: rbd_image_t, size: u64) -> c_int;
    pub(crate) fn rbd_read(image: rbd_image_t, ofs: u64, len: size_t, buf: *mut c_char) -> ssize_t;
    pub(crate) fn rbd_write(
        image: rbd_image_t,
        ofs: u64,
        len: size_t,
        buf: *const c_char,
    ) -> ssize_t;
    pub(crate) fn rbd_write_zeroes(
        image: rbd_image_t,
        ofs: u64,
        len: size_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> ssize_t;
    pub(crate) fn rbd_flush(image: rbd_image_t) -> c_int;
    pub(crate) fn rbd_aio_create_completion(
        cb_arg: *mut c_void,
        complete_cb: rbd_callback_t,
        c: *mut rbd_completion_t,
    ) -> c_int;
    pub(crate) fn rbd_aio_write(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        buf: *const c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub(crate) fn rbd_aio_read(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        buf: *mut c_char,
        c: rbd_completion_t,
    ) -> c_int;
    pub(crate) fn rbd_aio_write_zeroes(
        image: rbd_image_t,
        off: u64,
        len: size_t,
        c: rbd_completion_t,
        zero_flags: c_int,
        op_flags: c_int,
    ) -> c_int;
    pub(crate) fn rbd_aio_flush(image: rbd_image_t, c: rbd_completion_t) -> c_int;
    pub(crate) fn rbd_aio_wait_for_complete(c: rbd_completion_t) -> c_int;
    pub(crate) fn rbd_aio_get_return_value(c: rbd_completion_t) -> ssize_t;
    pub(crate) fn rbd_aio_release(c: rbd_completion_t);
    pub(crate) fn rbd_diff_iterate2(
        image: rbd_image_t,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: rbd_diff_cb,
        arg: *mut c_void,
    ) -> c_int;
    pub(crate) fn rbd_lock_acquire(image: rbd_image_t, lock_mode: c_int) -> c_int;
    pub(crate) fn rbd_lock_release(image: rbd_image_t) -> c_int;
    pub(crate) fn rbd_lock_get_owners(
        image: rbd_image_t,
        lock_mode: *mut c_int,
        lock_owners: *mut *mut c_char,
        max_lock_owners: *mut size_t,
    ) -> c_int;
    pub(crate) fn rbd_lock_get_owners_cleanup(
        lock_owners: *mut *mut c_char,
        lock_owner_count: size_t,
    );
    pub(crate) fn rbd_lock_break(
        image: rbd_image_t,
        lock_mode: c_int,
        lock_owner: *const c_char,
    ) -> c_int;
    pub(crate) fn rbd_snap_create(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub(crate) fn rbd_snap_protect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    pub(crate) fn rbd_snap_unprotect(image: rbd_image_t, snap_name: *const c_char) -> c_int;
    pub(crate) fn rbd_snap_remove(image: rbd_image_t, snapname: *const c_char) -> c_int;
    pub(crate) fn rbd_snap_is_protected(
        image: rbd_image_t,
        snap_name: *const c_char,
        is_protected: *mut c_int,
    ) -> c_int;
    pub(crate) fn rbd_snap_list(
        image: rbd_image_t,
        snaps: *mut rbd_snap_info_t,
        max_snaps: *mut c_int,
    ) -> c_int;
    pub(crate) fn rbd_snap_list_end(snaps: *mut rbd_snap_info_t);
    pub(crate) fn rbd_list_children3(
        image: rbd_image_t,
        images: *mut rbd_linked_image_spec_t,
        max_images: *mut size_t,
    ) -> c_int;
    pub(crate) fn rbd_linked_image_spec_list_cleanup(
        images: *mut rbd_linked_image_spec_t,
        num_images: size_t,
    );
    pub(crate) fn rbd_clone(
        p_ioctx: rados_ioctx_t,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: rados_ioctx_t,
        c_name: *const c_char,
        features: u64,
        c_order: *mut c_int,
    ) -> c_int;
}
