//! Device-mapper, the small part of it the live splice needs: create a map,
//! load a table, suspend, resume, remove, read a map's status and table.
//!
//! The DM control interface is a handful of ioctls on `/dev/mapper/control`,
//! each taking one buffer: a fixed `struct dm_ioctl` header (312 bytes,
//! native endian, ABI version 4.x, stable since Linux 2.6) followed by a
//! payload (target specs for a table load; specs or strings in replies):
//!
//! ```text
//!  offset size  field (struct dm_ioctl)
//!       0   12  version[3]      in: what we speak (4.0.0); out: the kernel's
//!      12    4  data_size       bytes of the whole buffer (header + payload)
//!      16    4  data_start      where the payload starts (312)
//!      20    4  target_count    in: specs in a table load; out: in a table
//!      24    4  open_count      out: how many openers the map has
//!      28    4  flags           DM_*_FLAG below, in and out
//!      32    4  event_nr
//!      36    4  padding
//!      40    8  dev             out: the map's dev_t (kernel encoding)
//!      48  128  name            NUL-terminated
//!     176  129  uuid            NUL-terminated
//!     305    7  data            padding to 312
//!
//!  target spec (struct dm_target_spec), then its NUL-terminated parameters:
//!       0    8  sector_start
//!       8    8  length          in 512-byte sectors
//!      16    4  status
//!      20    4  next            in: from this spec to the next (8-aligned);
//!                               out: from the payload start to the next
//!      24   16  target_type     e.g. "linear", NUL-padded
//! ```
//!
//! Why raw ioctls and not the `devicemapper` crate: that crate's `-sys`
//! part runs bindgen at build time, so every build machine (CI included)
//! would need libclang for five ioctls of a versioned, stable ABI. Encoding
//! and decoding live in pure functions here ([`encode_request`],
//! [`decode_header`], [`decode_table`]) and are tested without a kernel;
//! [`Control`] is the thin shell that issues them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The DM control device.
pub const CONTROL_PATH: &str = "/dev/mapper/control";
/// Size of `struct dm_ioctl`.
pub const HEADER_SIZE: usize = 312;
/// Size of `struct dm_target_spec`.
const SPEC_SIZE: usize = 40;
/// Longest name, NUL included (`DM_NAME_LEN`).
pub const NAME_LEN: usize = 128;
/// Longest UUID, NUL included (`DM_UUID_LEN`).
pub const UUID_LEN: usize = 129;
/// Longest target type, NUL included (`DM_MAX_TYPE_NAME`).
const TYPE_LEN: usize = 16;
/// Bytes per sector in DM tables.
pub const SECTOR: u64 = 512;
/// The ioctl "type" byte of DM (`DM_IOCTL`).
const DM_IOCTL: u8 = 0xfd;
/// Reply buffer for status and table queries: a handful of targets.
const REPLY_BUFFER: usize = 16 << 10;

/// `DM_SUSPEND_FLAG`: in a suspend request, suspend (else resume); in a
/// reply, the map is suspended.
pub const FLAG_SUSPEND: u32 = 1 << 1;
/// `DM_STATUS_TABLE_FLAG`: a table-status request returns the table.
const FLAG_STATUS_TABLE: u32 = 1 << 4;
/// `DM_ACTIVE_PRESENT_FLAG`: the map has a live table.
pub const FLAG_ACTIVE_PRESENT: u32 = 1 << 5;
/// `DM_INACTIVE_PRESENT_FLAG`: a loaded table waits for a resume.
pub const FLAG_INACTIVE_PRESENT: u32 = 1 << 6;
/// `DM_BUFFER_FULL_FLAG`: the reply did not fit.
const FLAG_BUFFER_FULL: u32 = 1 << 8;

/// The DM commands used here (`DM_*_CMD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// Ask the kernel's DM version (checks the control device works).
    Version = 0,
    /// Create an empty map.
    DevCreate = 3,
    /// Remove a map.
    DevRemove = 4,
    /// Suspend (with [`FLAG_SUSPEND`]) or resume (without it).
    DevSuspend = 6,
    /// A map's state.
    DevStatus = 7,
    /// Load an inactive table.
    TableLoad = 9,
    /// Drop the inactive table.
    TableClear = 10,
    /// A map's state and table.
    TableStatus = 12,
}

impl Cmd {
    /// `_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`.
    fn request_code(self) -> libc::c_ulong {
        const IOC_READ_WRITE: libc::c_ulong = 3;
        (IOC_READ_WRITE << 30)
            | ((HEADER_SIZE as libc::c_ulong) << 16)
            | ((DM_IOCTL as libc::c_ulong) << 8)
            | self as libc::c_ulong
    }
}

/// One line of a DM table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector it covers.
    pub start: u64,
    /// Sectors it covers.
    pub length: u64,
    /// Target type (`linear`, …).
    pub kind: String,
    /// Its parameters (for `linear`: `MAJOR:MINOR OFFSET`).
    pub params: String,
}

impl Target {
    /// A linear map of `sectors` sectors onto `device` from its start.
    pub fn linear_whole(device: DevId, sectors: u64) -> Target {
        Target {
            start: 0,
            length: sectors,
            kind: "linear".into(),
            params: format!("{}:{} 0", device.major, device.minor),
        }
    }

    /// For a linear target that starts at offset 0 of its device, that
    /// device.
    pub fn linear_device(&self) -> Option<DevId> {
        if self.kind != "linear" {
            return None;
        }
        let mut words = self.params.split_whitespace();
        let dev = words.next()?;
        if words.next()? != "0" || words.next().is_some() {
            return None;
        }
        let (major, minor) = dev.split_once(':')?;
        Some(DevId {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

/// A block device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DevId {
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
}

impl DevId {
    /// From a `dev_t` (`st_rdev`, or the `dev` of a DM reply: the kernel
    /// encodes both the way glibc's `makedev` does).
    pub fn from_dev_t(dev: u64) -> DevId {
        DevId {
            major: libc::major(dev),
            minor: libc::minor(dev),
        }
    }

    /// As a `dev_t`.
    pub fn dev_t(self) -> u64 {
        libc::makedev(self.major, self.minor)
    }
}

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// What a reply header says about a map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapInfo {
    /// The kernel's DM version.
    pub version: [u32; 3],
    /// Reply flags (`FLAG_*`).
    pub flags: u32,
    /// Openers of the map (a mounted filesystem is one).
    pub open_count: i32,
    /// Targets in the table the request asked about.
    pub target_count: u32,
    /// The map's block device.
    pub dev: DevId,
    /// Its name.
    pub name: String,
    /// Its UUID (empty if none).
    pub uuid: String,
    /// Where the payload starts.
    pub data_start: u32,
    /// Bytes of header + payload the kernel filled.
    pub data_size: u32,
}

impl MapInfo {
    /// The map is suspended.
    pub fn suspended(&self) -> bool {
        self.flags & FLAG_SUSPEND != 0
    }
}

/// Why a DM request could not be encoded or a reply decoded (a bug or a
/// kernel we do not understand, never the admin's fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A name or UUID too long, or with a NUL in it.
    #[error("{what} {value:?} is not valid for device-mapper (at most {max} bytes, no NUL)")]
    BadString {
        /// `name`, `uuid`, `target type` or `parameters`.
        what: &'static str,
        /// The value.
        value: String,
        /// Its limit in bytes.
        max: usize,
    },
    /// A reply shorter than its header or with offsets outside it.
    #[error("malformed device-mapper reply: {0}")]
    Reply(String),
}

fn put_str(
    buf: &mut [u8],
    at: usize,
    max: usize,
    what: &'static str,
    value: &str,
) -> Result<(), CodecError> {
    if value.len() >= max || value.as_bytes().contains(&0) {
        return Err(CodecError::BadString {
            what,
            value: value.into(),
            max: max - 1,
        });
    }
    buf[at..at + value.len()].copy_from_slice(value.as_bytes());
    Ok(())
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

fn get_cstr(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Encodes one request: header for map `name` (and `uuid`, for a create),
/// `flags`, then `targets` as the payload; the buffer is at least
/// `min_size` bytes so a reply fits in it.
pub fn encode_request(
    name: &str,
    uuid: Option<&str>,
    flags: u32,
    targets: &[Target],
    min_size: usize,
) -> Result<Vec<u8>, CodecError> {
    let mut payload = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let start = payload.len();
        let len = align8(SPEC_SIZE + t.params.len() + 1);
        payload.resize(start + len, 0);
        let spec = &mut payload[start..];
        spec[0..8].copy_from_slice(&t.start.to_ne_bytes());
        spec[8..16].copy_from_slice(&t.length.to_ne_bytes());
        // `next`, relative to this spec: the following one (none after the
        // last, where the kernel does not read it).
        let next = if i + 1 < targets.len() { len } else { 0 } as u32;
        spec[20..24].copy_from_slice(&next.to_ne_bytes());
        put_str(spec, 24, TYPE_LEN, "target type", &t.kind)?;
        put_str(spec, SPEC_SIZE, usize::MAX, "parameters", &t.params)?;
    }
    let size = (HEADER_SIZE + payload.len()).max(min_size);
    let mut buf = vec![0u8; size];
    buf[0..4].copy_from_slice(&4u32.to_ne_bytes());
    buf[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
    buf[16..20].copy_from_slice(&(HEADER_SIZE as u32).to_ne_bytes());
    buf[20..24].copy_from_slice(&(targets.len() as u32).to_ne_bytes());
    buf[28..32].copy_from_slice(&flags.to_ne_bytes());
    put_str(&mut buf, 48, NAME_LEN, "name", name)?;
    if let Some(uuid) = uuid {
        put_str(&mut buf, 176, UUID_LEN, "uuid", uuid)?;
    }
    buf[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(&payload);
    Ok(buf)
}

/// Decodes a reply's header.
pub fn decode_header(buf: &[u8]) -> Result<MapInfo, CodecError> {
    if buf.len() < HEADER_SIZE {
        return Err(CodecError::Reply(format!(
            "{} bytes, shorter than the header",
            buf.len()
        )));
    }
    Ok(MapInfo {
        version: [get_u32(buf, 0), get_u32(buf, 4), get_u32(buf, 8)],
        data_size: get_u32(buf, 12),
        data_start: get_u32(buf, 16),
        target_count: get_u32(buf, 20),
        open_count: get_u32(buf, 24) as i32,
        flags: get_u32(buf, 28),
        dev: DevId::from_dev_t(get_u64(buf, 40)),
        name: get_cstr(&buf[48..48 + NAME_LEN]),
        uuid: get_cstr(&buf[176..176 + UUID_LEN]),
    })
}

/// Decodes the table of a table-status reply (`next` offsets are relative
/// to the payload's start in replies).
pub fn decode_table(buf: &[u8]) -> Result<Vec<Target>, CodecError> {
    let info = decode_header(buf)?;
    if info.flags & FLAG_BUFFER_FULL != 0 {
        return Err(CodecError::Reply("the table did not fit the buffer".into()));
    }
    let end = (info.data_size as usize).min(buf.len());
    let base = info.data_start as usize;
    let mut targets = Vec::new();
    let mut at = base;
    for _ in 0..info.target_count {
        if at + SPEC_SIZE > end {
            return Err(CodecError::Reply(format!(
                "target spec at {at} past the end {end}"
            )));
        }
        let spec = &buf[at..end];
        let params = get_cstr(&spec[SPEC_SIZE..]);
        targets.push(Target {
            start: get_u64(spec, 0),
            length: get_u64(spec, 8),
            kind: get_cstr(&spec[24..24 + TYPE_LEN]),
            params,
        });
        at = base + get_u32(spec, 20) as usize;
    }
    Ok(targets)
}

/// Why a DM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    /// No `/dev/mapper/control`: the kernel has no device-mapper (module
    /// `dm-mod` not loaded, or not built).
    #[error("device-mapper is not available: {path} does not exist (load the dm-mod module: `modprobe dm-mod`)")]
    NoDeviceMapper {
        /// The control device's path.
        path: PathBuf,
    },
    /// The control device could not be opened (usually: not root).
    #[error("cannot open {path} (device-mapper needs root)")]
    Control {
        /// The control device's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No map of that name.
    #[error("no device-mapper map {name:?}")]
    NoSuchMap {
        /// The map's name.
        name: String,
    },
    /// A map of that name exists already.
    #[error("a device-mapper map {name:?} exists already")]
    Exists {
        /// The map's name.
        name: String,
    },
    /// The kernel refused because something holds a device: the map is
    /// open (mounted) or a device of the table is held exclusively.
    #[error("{op} of map {name:?}: device busy (mounted, or held by another process)")]
    Busy {
        /// What was asked.
        op: &'static str,
        /// The map's name.
        name: String,
    },
    /// Any other refusal by the kernel.
    #[error("{op} of map {name:?} failed")]
    Kernel {
        /// What was asked.
        op: &'static str,
        /// The map's name.
        name: String,
        /// The kernel's error.
        #[source]
        source: std::io::Error,
    },
    /// A request or reply could not be encoded or decoded.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The open DM control device.
#[derive(Debug)]
pub struct Control {
    file: File,
}

impl Control {
    /// Opens [`CONTROL_PATH`] and checks the kernel speaks DM ioctl 4.x.
    pub fn open() -> Result<Control, DmError> {
        Self::open_at(Path::new(CONTROL_PATH))
    }

    /// Opens the control device at `path`.
    pub fn open_at(path: &Path) -> Result<Control, DmError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    DmError::NoDeviceMapper { path: path.into() }
                } else {
                    DmError::Control {
                        path: path.into(),
                        source,
                    }
                }
            })?;
        let control = Control { file };
        control.call(Cmd::Version, "", None, 0, &[], HEADER_SIZE, "version")?;
        Ok(control)
    }

    /// Issues one command; returns the whole reply buffer.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &self,
        cmd: Cmd,
        name: &str,
        uuid: Option<&str>,
        flags: u32,
        targets: &[Target],
        min_size: usize,
        op: &'static str,
    ) -> Result<Vec<u8>, DmError> {
        let mut buf = encode_request(name, uuid, flags, targets, min_size)?;
        // SAFETY: every DM ioctl reads a `struct dm_ioctl` header and up to
        // its `data_size` bytes from the pointer and writes at most
        // `data_size` bytes back; `buf` is live, exclusively borrowed and
        // exactly `data_size` bytes long (encode_request sets it so).
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                cmd.request_code() as _,
                buf.as_mut_ptr(),
            )
        };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            let name = name.to_string();
            return Err(match source.raw_os_error() {
                Some(libc::ENXIO) => DmError::NoSuchMap { name },
                Some(libc::EBUSY) if cmd == Cmd::DevCreate => DmError::Exists { name },
                Some(libc::EBUSY) => DmError::Busy { op, name },
                _ => DmError::Kernel { op, name, source },
            });
        }
        Ok(buf)
    }

    /// Creates map `name` with `uuid`, loads `table` and activates it.
    /// On a failure after the create, the empty map is removed again.
    pub fn create(&self, name: &str, uuid: &str, table: &[Target]) -> Result<MapInfo, DmError> {
        self.call(Cmd::DevCreate, name, Some(uuid), 0, &[], 0, "create")?;
        let activated = self
            .load(name, table)
            .and_then(|()| self.resume(name).map(|_| ()));
        if let Err(e) = activated {
            let _ = self.remove(name);
            return Err(e);
        }
        self.status(name)
    }

    /// Loads `table` as the inactive table of `name` (it goes live at the
    /// next resume). The kernel opens the table's devices now, so a busy or
    /// missing device fails here, before anything is suspended.
    pub fn load(&self, name: &str, table: &[Target]) -> Result<(), DmError> {
        self.call(Cmd::TableLoad, name, None, 0, table, 0, "loading a table")
            .map(|_| ())
    }

    /// Drops the inactive table of `name`.
    pub fn clear(&self, name: &str) -> Result<(), DmError> {
        self.call(
            Cmd::TableClear,
            name,
            None,
            0,
            &[],
            0,
            "clearing the inactive table",
        )
        .map(|_| ())
    }

    /// Suspends `name`: waits for the I/O in flight, and (without
    /// `DM_SKIP_LOCKFS_FLAG`, which we never set) freezes a filesystem
    /// mounted on it first, so its dirty data and journal reach the current
    /// table's device, flushed, before the table can change.
    pub fn suspend(&self, name: &str) -> Result<(), DmError> {
        self.call(Cmd::DevSuspend, name, None, FLAG_SUSPEND, &[], 0, "suspend")
            .map(|_| ())
    }

    /// Resumes `name`, swapping in its inactive table if one was loaded.
    pub fn resume(&self, name: &str) -> Result<MapInfo, DmError> {
        let buf = self.call(Cmd::DevSuspend, name, None, 0, &[], 0, "resume")?;
        Ok(decode_header(&buf)?)
    }

    /// Removes `name` (refused while it is open).
    pub fn remove(&self, name: &str) -> Result<(), DmError> {
        self.call(Cmd::DevRemove, name, None, 0, &[], 0, "remove")
            .map(|_| ())
    }

    /// State of `name`.
    pub fn status(&self, name: &str) -> Result<MapInfo, DmError> {
        let buf = self.call(Cmd::DevStatus, name, None, 0, &[], 0, "status")?;
        Ok(decode_header(&buf)?)
    }

    /// State and live table of `name`.
    pub fn table(&self, name: &str) -> Result<(MapInfo, Vec<Target>), DmError> {
        let buf = self.call(
            Cmd::TableStatus,
            name,
            None,
            FLAG_STATUS_TABLE,
            &[],
            REPLY_BUFFER,
            "reading the table",
        )?;
        Ok((decode_header(&buf)?, decode_table(&buf)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_the_kernels_size_and_the_ioctl_numbers_match_its_headers() {
        // _IOWR(0xfd, 0, struct dm_ioctl) and _IOWR(0xfd, 9, …) as the
        // kernel's <linux/dm-ioctl.h> defines them on x86-64 and arm64.
        assert_eq!(Cmd::Version.request_code(), 0xc138_fd00);
        assert_eq!(Cmd::TableLoad.request_code(), 0xc138_fd09);
        assert_eq!(Cmd::DevSuspend.request_code(), 0xc138_fd06);
    }

    #[test]
    fn a_table_load_encodes_header_and_specs() {
        let t = Target::linear_whole(DevId { major: 7, minor: 0 }, 262_144);
        let buf = encode_request("tidemark-data", None, 0, std::slice::from_ref(&t), 0).unwrap();
        // 312 header + 40 spec + "7:0 0\0" padded to 8.
        assert_eq!(buf.len(), HEADER_SIZE + 48);
        let h = decode_header(&buf).unwrap();
        assert_eq!(h.version, [4, 0, 0]);
        assert_eq!(h.data_size as usize, buf.len());
        assert_eq!(h.data_start as usize, HEADER_SIZE);
        assert_eq!(h.target_count, 1);
        assert_eq!(h.name, "tidemark-data");
        let spec = &buf[HEADER_SIZE..];
        assert_eq!(get_u64(spec, 0), 0);
        assert_eq!(get_u64(spec, 8), 262_144);
        assert_eq!(get_cstr(&spec[24..40]), "linear");
        assert_eq!(get_cstr(&spec[40..]), "7:0 0");
    }

    #[test]
    fn several_targets_chain_by_aligned_next_offsets() {
        let a = Target {
            start: 0,
            length: 8,
            kind: "linear".into(),
            params: "7:0 0".into(),
        };
        let b = Target {
            start: 8,
            length: 8,
            kind: "zero".into(),
            params: String::new(),
        };
        let buf = encode_request("m", None, 0, &[a, b], 0).unwrap();
        let spec = &buf[HEADER_SIZE..];
        let next = get_u32(spec, 20) as usize;
        assert_eq!(next, 48);
        assert_eq!(get_cstr(&spec[next + 24..next + 40]), "zero");
    }

    #[test]
    fn a_table_reply_decodes_with_offsets_from_the_payload_start() {
        // What the kernel writes: specs at data_start, `next` counted from
        // data_start, data_size the bytes used.
        let mut buf = encode_request("m", None, 0, &[], REPLY_BUFFER).unwrap();
        let base = HEADER_SIZE;
        let mut put_spec = |at: usize, start: u64, len: u64, kind: &str, params: &str, next| {
            let s = &mut buf[base + at..];
            s[0..8].copy_from_slice(&start.to_ne_bytes());
            s[8..16].copy_from_slice(&len.to_ne_bytes());
            s[20..24].copy_from_slice(&(next as u32).to_ne_bytes());
            s[24..24 + kind.len()].copy_from_slice(kind.as_bytes());
            s[40..40 + params.len()].copy_from_slice(params.as_bytes());
        };
        put_spec(0, 0, 100, "linear", "43:0 0", 48);
        put_spec(48, 100, 28, "linear", "7:1 100", 96);
        buf[20..24].copy_from_slice(&2u32.to_ne_bytes());
        buf[12..16].copy_from_slice(&((base + 96) as u32).to_ne_bytes());
        let table = decode_table(&buf).unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(
            table[0].linear_device(),
            Some(DevId {
                major: 43,
                minor: 0
            })
        );
        assert_eq!(table[1].start, 100);
        assert_eq!(table[1].params, "7:1 100");
        // Not from offset 0 of its device: not a whole-disk linear map.
        assert_eq!(table[1].linear_device(), None);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        assert!(decode_header(&[0u8; 100]).is_err());
        let mut buf = encode_request("m", None, 0, &[], 0).unwrap();
        // Claims a target the buffer does not hold.
        buf[20..24].copy_from_slice(&1u32.to_ne_bytes());
        assert!(matches!(decode_table(&buf), Err(CodecError::Reply(_))));
        // A `next` pointing far away.
        let mut buf = encode_request("m", None, 0, &[], 1024).unwrap();
        buf[20..24].copy_from_slice(&2u32.to_ne_bytes());
        buf[HEADER_SIZE + 20..HEADER_SIZE + 24].copy_from_slice(&100_000u32.to_ne_bytes());
        assert!(matches!(decode_table(&buf), Err(CodecError::Reply(_))));
        let mut buf = encode_request("m", None, 0, &[], 1024).unwrap();
        buf[16..20].copy_from_slice(&u32::MAX.to_ne_bytes());
        buf[20..24].copy_from_slice(&1u32.to_ne_bytes());
        assert!(decode_table(&buf).is_err());
    }

    proptest::proptest! {
        /// Whatever bytes a reply holds, decoding returns a table or an
        /// error, never a panic.
        #[test]
        fn decoding_arbitrary_replies_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024),
            count in 0u32..6,
            start in 0u32..2048,
            size in 0u32..2048,
        ) {
            let mut buf = bytes;
            if buf.len() >= HEADER_SIZE {
                buf[12..16].copy_from_slice(&size.to_ne_bytes());
                buf[16..20].copy_from_slice(&start.to_ne_bytes());
                buf[20..24].copy_from_slice(&count.to_ne_bytes());
                buf[28..32].copy_from_slice(&0u32.to_ne_bytes());
            }
            let _ = decode_table(&buf);
        }
    }

    #[test]
    fn names_that_do_not_fit_are_refused() {
        let long = "x".repeat(NAME_LEN);
        assert!(matches!(
            encode_request(&long, None, 0, &[], 0),
            Err(CodecError::BadString { what: "name", .. })
        ));
        assert!(encode_request("a\0b", None, 0, &[], 0).is_err());
        assert!(encode_request(&"x".repeat(NAME_LEN - 1), None, 0, &[], 0).is_ok());
    }

    #[test]
    fn dev_ids_round_trip_the_kernel_encoding() {
        // Minor numbers above 255 take the high bits (dm-300, nbd15 = 43:480).
        for (major, minor) in [(7, 0), (43, 480), (253, 300), (259, 1 << 19)] {
            let id = DevId { major, minor };
            assert_eq!(DevId::from_dev_t(id.dev_t()), id);
        }
        assert_eq!(
            DevId::from_dev_t((43 << 8) | 0x10 | (1 << 20)),
            DevId {
                major: 43,
                minor: 256 + 16
            }
        );
    }
}
