//! The ublk driver's user ABI (`include/uapi/linux/ublk_cmd.h`): command
//! numbers, flags and the structures exchanged through io_uring commands
//! and the mmapped descriptor array. Each structure is a `#[repr(C)]` copy
//! of the kernel's, field for field with its padding spelled out, so that
//! zerocopy turns it into the kernel's bytes and back (native byte order,
//! as the kernel reads them) and no binding generator is needed at build
//! time; a compile-time check pins every size.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The control device every ublk command starts from.
pub const CONTROL_DEVICE: &str = "/dev/ublk-control";

/// `_IOC(dir, 'u', nr, size)` of asm-generic/ioctl.h.
const fn ioc(dir: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_READ: u32 = 2;
const IOC_READ_WRITE: u32 = 3;

/// Size of `struct ublksrv_ctrl_cmd`.
pub const CTRL_CMD_LEN: usize = 32;
/// Size of `struct ublksrv_io_cmd`.
pub const IO_CMD_LEN: usize = 16;
/// Size of `struct ublksrv_ctrl_dev_info`.
pub const DEV_INFO_LEN: usize = 64;
/// Size of `struct ublksrv_io_desc`.
pub const IO_DESC_LEN: usize = 24;
/// Size of `struct ublk_params` (with its trailing padding).
pub const PARAMS_LEN: usize = 112;

const _: () = assert!(size_of::<CtrlCmd>() == CTRL_CMD_LEN);
const _: () = assert!(size_of::<IoCmd>() == IO_CMD_LEN);
const _: () = assert!(size_of::<DevInfo>() == DEV_INFO_LEN);
const _: () = assert!(size_of::<IoDesc>() == IO_DESC_LEN);
const _: () = assert!(size_of::<RawParams>() == PARAMS_LEN);

/// Control commands, ioctl-encoded (`UBLK_U_CMD_*`).
pub mod cmd {
    use super::{ioc, CTRL_CMD_LEN, IOC_READ, IOC_READ_WRITE};
    const N: u32 = CTRL_CMD_LEN as u32;
    /// The CPUs whose requests a queue receives (`data[0]`: the queue; the
    /// answer: a CPU bitmap).
    pub const GET_QUEUE_AFFINITY: u32 = ioc(IOC_READ, 0x01, N);
    /// Device information of one device.
    pub const GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, N);
    /// Creates a device (its char device `/dev/ublkcN`).
    pub const ADD_DEV: u32 = ioc(IOC_READ_WRITE, 0x04, N);
    /// Removes a device.
    pub const DEL_DEV: u32 = ioc(IOC_READ_WRITE, 0x05, N);
    /// Adds the block device `/dev/ublkbN` once every queue has fetched.
    pub const START_DEV: u32 = ioc(IOC_READ_WRITE, 0x06, N);
    /// Removes the block device.
    pub const STOP_DEV: u32 = ioc(IOC_READ_WRITE, 0x07, N);
    /// Sets size, block sizes, limits.
    pub const SET_PARAMS: u32 = ioc(IOC_READ_WRITE, 0x08, N);
    /// Reads them back.
    pub const GET_PARAMS: u32 = ioc(IOC_READ, 0x09, N);
    /// A new server takes over a quiesced device.
    pub const START_USER_RECOVERY: u32 = ioc(IOC_READ_WRITE, 0x10, N);
    /// The new server fetches on every queue; I/O resumes.
    pub const END_USER_RECOVERY: u32 = ioc(IOC_READ_WRITE, 0x11, N);
    /// The driver's feature flags.
    pub const GET_FEATURES: u32 = ioc(IOC_READ, 0x13, N);
    /// Changes a live device's capacity (`data[0]`: the new size in
    /// 512-byte sectors); the kernel tells the block device's users.
    /// Linux 6.15+, announced by [`flags::UPDATE_SIZE`](super::flags::UPDATE_SIZE).
    pub const UPDATE_SIZE: u32 = ioc(IOC_READ_WRITE, 0x15, N);
}

/// Queue commands on `/dev/ublkcN`, ioctl-encoded (`UBLK_U_IO_*`).
pub mod io {
    use super::{ioc, IOC_READ_WRITE, IO_CMD_LEN};
    const N: u32 = IO_CMD_LEN as u32;
    /// Hands the driver a tag and its buffer; completes with a request.
    pub const FETCH_REQ: u32 = ioc(IOC_READ_WRITE, 0x20, N);
    /// Completes the tag's request and fetches the next one.
    pub const COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_READ_WRITE, 0x21, N);
}

/// A fetch completed with a request (`UBLK_IO_RES_OK`).
pub const IO_RES_OK: i32 = 0;
/// The queue is going away: no more requests on this tag
/// (`UBLK_IO_RES_ABORT`, `-ENODEV`).
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// Device flags (`UBLK_F_*`).
pub mod flags {
    /// A new server may take over the device after the old one died.
    pub const USER_RECOVERY: u64 = 1 << 3;
    /// Requests the dead server had not completed are re-issued to the
    /// next one instead of failed.
    pub const USER_RECOVERY_REISSUE: u64 = 1 << 4;
    /// Commands are ioctl-encoded.
    pub const CMD_IOCTL_ENCODE: u64 = 1 << 6;
    /// The server copies request data itself, with `pread`/`pwrite` on
    /// `/dev/ublkcN` at [`user_copy_offset`](super::user_copy_offset),
    /// instead of the driver copying into per-tag buffers.
    pub const USER_COPY: u64 = 1 << 7;
    /// The driver takes [`cmd::UPDATE_SIZE`](super::cmd::UPDATE_SIZE). A
    /// feature bit only: the driver's handler of the command does not look
    /// at the device's flags, so the tracker does not ask for it at
    /// `ADD_DEV` (and a device kept by an older tracker can grow too).
    pub const UPDATE_SIZE: u64 = 1 << 10;
}

/// Device states (`UBLK_S_DEV_*`).
pub mod state {
    /// Added, not started (or stopped).
    pub const DEAD: u16 = 0;
    /// Served.
    pub const LIVE: u16 = 1;
    /// Its server died; I/O is held for a recovering one.
    pub const QUIESCED: u16 = 2;
}

/// Request operations (`UBLK_IO_OP_*`), the low byte of `op_flags`.
pub mod op {
    /// Read.
    pub const READ: u8 = 0;
    /// Write.
    pub const WRITE: u8 = 1;
    /// Flush the volatile cache.
    pub const FLUSH: u8 = 2;
    /// Discard.
    pub const DISCARD: u8 = 3;
    /// Write zeroes.
    pub const WRITE_ZEROES: u8 = 5;
}

/// Request flags (`UBLK_IO_F_*`), `op_flags >> 0`.
pub mod io_flags {
    /// Forced unit access.
    pub const FUA: u32 = 1 << 13;
    /// Write zeroes must not deallocate.
    pub const NOUNMAP: u32 = 1 << 15;
}

/// Parameter types (`UBLK_PARAM_TYPE_*`).
pub mod param_type {
    /// `struct ublk_param_basic`.
    pub const BASIC: u32 = 1 << 0;
    /// `struct ublk_param_discard`.
    pub const DISCARD: u32 = 1 << 1;
}

/// Basic attributes (`UBLK_ATTR_*`).
pub mod attr {
    /// The device has a volatile cache: the kernel sends FLUSH.
    pub const VOLATILE_CACHE: u32 = 1 << 2;
    /// The device honours FUA writes.
    pub const FUA: u32 = 1 << 3;
}

/// Most tags per queue (`UBLK_MAX_QUEUE_DEPTH`).
pub const MAX_QUEUE_DEPTH: u16 = 4096;

/// The mmap offset of queue `q`'s descriptor array: the driver lays the
/// queues out `UBLK_MAX_QUEUE_DEPTH` descriptors (page-rounded) apart.
pub fn descriptors_offset(queue: u16, page_size: usize) -> i64 {
    let stride = round_up(usize::from(MAX_QUEUE_DEPTH) * IO_DESC_LEN, page_size);
    (usize::from(queue) * stride) as i64
}

/// Bytes of queue descriptors to map for `depth` tags.
pub fn descriptors_len(depth: u16, page_size: usize) -> usize {
    round_up(usize::from(depth) * IO_DESC_LEN, page_size)
}

/// Where a tag's request data sits in `/dev/ublkcN` for `pread`/`pwrite`
/// under [`flags::USER_COPY`] (`ublk_pos` of the uapi header):
///
/// ```text
///  bit 63      53 52     41 40      25 24        0
///  ┌───────────┬──────────┬──────────┬───────────┐
///  │ 0         │ queue    │ tag      │ byte in   │   + 0x8000_0000
///  │           │ 12 bits  │ 16 bits  │ request   │     (UBLKSRV_IO_BUF_OFFSET)
///  └───────────┴──────────┴──────────┴───────────┘
/// ```
pub fn user_copy_offset(queue: u16, tag: u16) -> u64 {
    const IO_BUF_OFFSET: u64 = 0x8000_0000;
    const TAG_SHIFT: u32 = 25;
    const QUEUE_SHIFT: u32 = TAG_SHIFT + 16;
    IO_BUF_OFFSET + (u64::from(queue) << QUEUE_SHIFT) + (u64::from(tag) << TAG_SHIFT)
}

/// Most queues of a device (`UBLK_MAX_NR_QUEUES`).
pub const MAX_QUEUES: u16 = 4096;

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// `struct ublksrv_ctrl_cmd`, placed at the start of a 128-byte SQE's
/// command area.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct CtrlCmd {
    /// The device (`u32::MAX`: let the driver choose, for ADD_DEV).
    pub dev_id: u32,
    /// The queue, `u16::MAX` for device commands.
    pub queue_id: u16,
    /// Length of the buffer at `addr`.
    pub len: u16,
    /// A buffer in our address space, in or out.
    pub addr: u64,
    /// Inline data (the server's pid for START_DEV, END_USER_RECOVERY).
    pub data: u64,
    /// Length of the device path for unprivileged devices: 0, the tracker
    /// runs privileged.
    pub dev_path_len: u16,
    /// Zero.
    pub pad: u16,
    /// Zero.
    pub reserved: u32,
}

impl CtrlCmd {
    /// The 80-byte command area of the SQE: the command, then zeroes.
    pub fn encode(&self) -> [u8; 80] {
        let mut b = [0u8; 80];
        b[..CTRL_CMD_LEN].copy_from_slice(self.as_bytes());
        b
    }
}

/// `struct ublksrv_io_cmd`, the 16-byte command area of a plain SQE.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct IoCmd {
    /// The queue.
    pub queue: u16,
    /// The tag.
    pub tag: u16,
    /// The result of the committed request: bytes, or a negative errno.
    pub result: i32,
    /// The tag's data buffer.
    pub addr: u64,
}

impl IoCmd {
    /// The command area.
    pub fn encode(&self) -> [u8; IO_CMD_LEN] {
        zerocopy::transmute!(*self)
    }
}

/// `struct ublksrv_ctrl_dev_info`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct DevInfo {
    /// Queues.
    pub nr_hw_queues: u16,
    /// Tags per queue.
    pub queue_depth: u16,
    /// `state::*`.
    pub state: u16,
    /// Zero.
    pub pad0: u16,
    /// Largest request, bytes (also each tag's buffer size).
    pub max_io_buf_bytes: u32,
    /// The device number N of `/dev/ublkcN`, `/dev/ublkbN`.
    pub dev_id: u32,
    /// The serving process (-1: none).
    pub ublksrv_pid: i32,
    /// Zero.
    pub pad1: u32,
    /// `flags::*`.
    pub flags: u64,
    /// Free for the server's own use; the driver keeps it. The tracker
    /// stores its identity of the device here.
    pub ublksrv_flags: u64,
    /// The uid of the process that added the device (the driver fills it).
    pub owner_uid: u32,
    /// Its gid (the driver fills it).
    pub owner_gid: u32,
    /// Zero.
    pub reserved1: u64,
    /// Zero.
    pub reserved2: u64,
}

impl DevInfo {
    /// The kernel's 64 bytes.
    pub fn encode(&self) -> [u8; DEV_INFO_LEN] {
        zerocopy::transmute!(*self)
    }

    /// From the kernel's 64 bytes.
    pub fn decode(b: &[u8; DEV_INFO_LEN]) -> Self {
        zerocopy::transmute!(*b)
    }
}

/// The parameters the tracker sets: `struct ublk_params` with the basic
/// and discard parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Params {
    /// `param_type::*` present.
    pub types: u32,
    /// `attr::*`.
    pub attrs: u32,
    /// log2 of the logical block size.
    pub logical_bs_shift: u8,
    /// log2 of the physical block size.
    pub physical_bs_shift: u8,
    /// log2 of the optimal I/O size.
    pub io_opt_shift: u8,
    /// log2 of the minimal I/O size.
    pub io_min_shift: u8,
    /// Largest request, sectors.
    pub max_sectors: u32,
    /// Size, sectors.
    pub dev_sectors: u64,
    /// Discard granularity, bytes.
    pub discard_granularity: u32,
    /// Largest discard, sectors.
    pub max_discard_sectors: u32,
    /// Largest write-zeroes, sectors.
    pub max_write_zeroes_sectors: u32,
    /// Discard segments per request (the driver supports 1).
    pub max_discard_segments: u16,
}

/// `struct ublk_params` as the kernel lays it out: `len` and `types`,
/// `struct ublk_param_basic` at 8, `struct ublk_param_discard` at 40, and
/// the parts the tracker does not set (devt, zoned, the trailing padding)
/// as zeroes.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
struct RawParams {
    len: u32,
    types: u32,
    // struct ublk_param_basic
    attrs: u32,
    logical_bs_shift: u8,
    physical_bs_shift: u8,
    io_opt_shift: u8,
    io_min_shift: u8,
    max_sectors: u32,
    chunk_sectors: u32,
    dev_sectors: u64,
    virt_boundary_mask: u64,
    // struct ublk_param_discard
    discard_alignment: u32,
    discard_granularity: u32,
    max_discard_sectors: u32,
    max_write_zeroes_sectors: u32,
    max_discard_segments: u16,
    discard_reserved: u16,
    // struct ublk_param_devt, struct ublk_param_zoned, padding
    unset: [u8; 52],
}

impl Params {
    /// The kernel's layout: len, types, basic at 8, discard at 40.
    pub fn encode(&self) -> [u8; PARAMS_LEN] {
        zerocopy::transmute!(RawParams {
            len: PARAMS_LEN as u32,
            types: self.types,
            attrs: self.attrs,
            logical_bs_shift: self.logical_bs_shift,
            physical_bs_shift: self.physical_bs_shift,
            io_opt_shift: self.io_opt_shift,
            io_min_shift: self.io_min_shift,
            max_sectors: self.max_sectors,
            chunk_sectors: 0,
            dev_sectors: self.dev_sectors,
            virt_boundary_mask: 0,
            discard_alignment: 0,
            discard_granularity: self.discard_granularity,
            max_discard_sectors: self.max_discard_sectors,
            max_write_zeroes_sectors: self.max_write_zeroes_sectors,
            max_discard_segments: self.max_discard_segments,
            discard_reserved: 0,
            unset: [0; 52],
        })
    }

    /// The device size in sectors out of a GET_PARAMS answer.
    pub fn decode_dev_sectors(b: &[u8; PARAMS_LEN]) -> u64 {
        let raw: RawParams = zerocopy::transmute!(*b);
        raw.dev_sectors
    }
}

/// `struct ublksrv_io_desc`: what the driver asks of one tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct IoDesc {
    /// `op::*` in the low byte, `io_flags::*` above.
    pub op_flags: u32,
    /// Length, sectors.
    pub nr_sectors: u32,
    /// Start, sectors.
    pub start_sector: u64,
    /// The tag's buffer in the server (unused under
    /// [`flags::USER_COPY`]).
    pub addr: u64,
}

impl IoDesc {
    /// From the descriptor's 24 bytes.
    pub fn decode(b: &[u8; IO_DESC_LEN]) -> Self {
        zerocopy::transmute!(*b)
    }

    /// The operation.
    pub fn op(&self) -> u8 {
        (self.op_flags & 0xff) as u8
    }

    /// Whether `flag` (one of `io_flags::*`) is set.
    pub fn has(&self, flag: u32) -> bool {
        self.op_flags & flag != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_ioctl_encoded_like_the_header_says() {
        // _IOWR('u', 0x20, struct ublksrv_io_cmd), as ublk servers print it.
        assert_eq!(io::FETCH_REQ, 0xc010_7520);
        assert_eq!(io::COMMIT_AND_FETCH_REQ, 0xc010_7521);
        // _IOWR('u', 0x04, struct ublksrv_ctrl_cmd) and _IOR(..., 0x02, ...).
        assert_eq!(cmd::ADD_DEV, 0xc020_7504);
        assert_eq!(cmd::GET_DEV_INFO, 0x8020_7502);
        assert_eq!(cmd::GET_FEATURES, 0x8020_7513);
        assert_eq!(cmd::GET_QUEUE_AFFINITY, 0x8020_7501);
        // _IOWR('u', 0x15, struct ublksrv_ctrl_cmd).
        assert_eq!(cmd::UPDATE_SIZE, 0xc020_7515);
    }

    #[test]
    fn user_copy_offsets_name_the_queue_and_the_tag() {
        // ublk_pos(q, tag, 0) of the uapi header.
        assert_eq!(user_copy_offset(0, 0), 0x8000_0000);
        assert_eq!(user_copy_offset(0, 1), 0x8000_0000 + (1 << 25));
        assert_eq!(user_copy_offset(1, 0), 0x8000_0000 + (1 << 41));
        assert_eq!(
            user_copy_offset(3, 4095),
            0x8000_0000 + (3 << 41) + (4095 << 25)
        );
    }

    #[test]
    fn structures_sit_where_the_kernel_reads_them() {
        let c = CtrlCmd {
            dev_id: 7,
            queue_id: u16::MAX,
            len: 64,
            addr: 0x1122_3344_5566_7788,
            data: 99,
            ..CtrlCmd::default()
        }
        .encode();
        assert_eq!(&c[0..4], &7u32.to_le_bytes());
        assert_eq!(&c[4..6], &[0xff, 0xff]);
        assert_eq!(&c[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&c[16..24], &99u64.to_le_bytes());
        assert!(c[24..].iter().all(|&b| b == 0));

        let info = DevInfo {
            nr_hw_queues: 1,
            queue_depth: 64,
            state: state::QUIESCED,
            max_io_buf_bytes: 1 << 20,
            dev_id: 3,
            ublksrv_pid: -1,
            flags: flags::USER_RECOVERY,
            ublksrv_flags: 0xdead_beef_0bad_cafe,
            ..DevInfo::default()
        };
        assert_eq!(DevInfo::decode(&info.encode()), info);
        let b = info.encode();
        assert_eq!(&b[0..6], &[1, 0, 64, 0, 2, 0]);
        assert_eq!(&b[8..12], &(1u32 << 20).to_le_bytes());
        assert_eq!(&b[12..20], &[3, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(&b[24..32], &flags::USER_RECOVERY.to_le_bytes());
        assert_eq!(&b[32..40], &0xdead_beef_0bad_cafe_u64.to_le_bytes());
        assert!(b[40..].iter().all(|&b| b == 0));

        let io = IoCmd {
            queue: 2,
            tag: 9,
            result: -5,
            addr: 0x1000,
        }
        .encode();
        assert_eq!(&io[0..8], &[2, 0, 9, 0, 0xfb, 0xff, 0xff, 0xff]);
        assert_eq!(&io[8..16], &0x1000u64.to_le_bytes());

        let p = Params {
            types: param_type::BASIC,
            attrs: attr::FUA,
            logical_bs_shift: 12,
            physical_bs_shift: 13,
            io_opt_shift: 14,
            io_min_shift: 15,
            max_sectors: 256,
            dev_sectors: 1 << 21,
            discard_granularity: 4096,
            max_discard_sectors: 512,
            max_write_zeroes_sectors: 1024,
            max_discard_segments: 1,
        }
        .encode();
        assert_eq!(&p[0..4], &(PARAMS_LEN as u32).to_le_bytes());
        assert_eq!(&p[4..8], &param_type::BASIC.to_le_bytes());
        assert_eq!(&p[8..12], &attr::FUA.to_le_bytes());
        assert_eq!(&p[12..16], &[12, 13, 14, 15]);
        assert_eq!(&p[16..20], &256u32.to_le_bytes());
        assert_eq!(&p[24..32], &(1u64 << 21).to_le_bytes());
        assert_eq!(&p[44..48], &4096u32.to_le_bytes());
        assert_eq!(&p[48..52], &512u32.to_le_bytes());
        assert_eq!(&p[52..56], &1024u32.to_le_bytes());
        assert_eq!(&p[56..58], &1u16.to_le_bytes());
        for zero in [20..24, 32..44, 58..PARAMS_LEN] {
            assert!(p[zero.clone()].iter().all(|&b| b == 0), "{zero:?}");
        }
        assert_eq!(Params::decode_dev_sectors(&p), 1 << 21);

        let mut d = [0u8; IO_DESC_LEN];
        d[0..4].copy_from_slice(&(u32::from(op::WRITE) | io_flags::FUA).to_le_bytes());
        d[4..8].copy_from_slice(&8u32.to_le_bytes());
        d[8..16].copy_from_slice(&2048u64.to_le_bytes());
        let desc = IoDesc::decode(&d);
        assert_eq!(desc.op(), op::WRITE);
        assert!(desc.has(io_flags::FUA) && !desc.has(io_flags::NOUNMAP));
        assert_eq!((desc.nr_sectors, desc.start_sector), (8, 2048));
    }

    #[test]
    fn queue_descriptors_are_laid_out_a_full_queue_apart() {
        assert_eq!(descriptors_offset(0, 4096), 0);
        // 4096 descriptors of 24 bytes = 96 KiB per queue.
        assert_eq!(descriptors_offset(1, 4096), 96 << 10);
        assert_eq!(descriptors_len(64, 4096), 4096);
        assert_eq!(descriptors_len(200, 4096), 8192);
    }
}
