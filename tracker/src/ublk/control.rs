//! The control device, `/dev/ublk-control`: device commands as io_uring
//! `URING_CMD`s on 128-byte SQEs, one at a time.
//!
//! Commands block in the kernel (START_DEV and END_USER_RECOVERY wait for
//! every queue to fetch), so each one is issued from the thread that needs
//! its answer while the queue threads run on their own.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::sys::{self, CtrlCmd, DevInfo, Params};

/// An open control device.
pub struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl Control {
    /// Opens `/dev/ublk-control`.
    pub fn open() -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(sys::CONTROL_DEVICE)?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(Self { file, ring })
    }

    /// Issues one command and waits for its result (>= 0, or the error).
    fn command(&mut self, op: u32, cmd: CtrlCmd) -> std::io::Result<i32> {
        let entry = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(cmd.encode())
            .build()
            .user_data(u64::from(op));
        // SAFETY: the command's buffer (`cmd.addr`, if any) is borrowed by
        // the caller for the whole call, and the call waits for the
        // command's completion before returning.
        unsafe {
            self.ring
                .submission()
                .push(&entry)
                .map_err(|_| std::io::Error::other("control ring full"))?;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            if let Some(cqe) = self.ring.completion().next() {
                let res = cqe.result();
                return if res < 0 {
                    Err(std::io::Error::from_raw_os_error(-res))
                } else {
                    Ok(res)
                };
            }
        }
    }

    /// The driver's feature flags (`sys::flags::*`).
    pub fn features(&mut self) -> std::io::Result<u64> {
        let mut out = [0u8; 8];
        self.command(
            sys::cmd::GET_FEATURES,
            CtrlCmd {
                dev_id: u32::MAX,
                queue_id: u16::MAX,
                len: 8,
                addr: out.as_mut_ptr() as u64,
                data: 0,
                ..CtrlCmd::default()
            },
        )?;
        Ok(u64::from_le_bytes(out))
    }

    /// The CPUs whose requests queue `queue` of the device receives (the
    /// block layer's mapping, known once the device is added).
    pub fn queue_affinity(&mut self, dev_id: u32, queue: u16) -> std::io::Result<Vec<usize>> {
        // A bitmap of up to 4096 CPUs, in whole longs as the driver wants.
        let mut mask = [0u8; 512];
        self.command(
            sys::cmd::GET_QUEUE_AFFINITY,
            CtrlCmd {
                dev_id,
                queue_id: u16::MAX,
                len: mask.len() as u16,
                addr: mask.as_mut_ptr() as u64,
                data: u64::from(queue),
                ..CtrlCmd::default()
            },
        )?;
        Ok(cpus_of(&mask))
    }

    /// Creates a device; `info.dev_id` `u32::MAX` lets the driver choose.
    /// Returns what the driver made of it (its id, the flags it granted).
    pub fn add(&mut self, info: &DevInfo) -> std::io::Result<DevInfo> {
        let mut buf = info.encode();
        self.command(
            sys::cmd::ADD_DEV,
            CtrlCmd {
                dev_id: info.dev_id,
                queue_id: u16::MAX,
                len: sys::DEV_INFO_LEN as u16,
                addr: buf.as_mut_ptr() as u64,
                data: 0,
                ..CtrlCmd::default()
            },
        )?;
        Ok(DevInfo::decode(&buf))
    }

    /// The device's information; `NotFound` when there is no such device.
    pub fn info(&mut self, dev_id: u32) -> std::io::Result<DevInfo> {
        let mut buf = [0u8; sys::DEV_INFO_LEN];
        self.command(
            sys::cmd::GET_DEV_INFO,
            device_cmd(dev_id, buf.len(), buf.as_mut_ptr() as u64),
        )?;
        Ok(DevInfo::decode(&buf))
    }

    /// Sets the device's parameters (before it is started).
    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> std::io::Result<()> {
        let buf = params.encode();
        self.command(
            sys::cmd::SET_PARAMS,
            device_cmd(dev_id, buf.len(), buf.as_ptr() as u64),
        )?;
        Ok(())
    }

    /// The device's size in bytes, from its parameters.
    pub fn size(&mut self, dev_id: u32) -> std::io::Result<u64> {
        // The driver fills in what it has, up to the length we give.
        let mut buf = Params::default().encode();
        self.command(
            sys::cmd::GET_PARAMS,
            device_cmd(dev_id, buf.len(), buf.as_mut_ptr() as u64),
        )?;
        Ok(Params::decode_dev_sectors(&buf) << 9)
    }

    /// Tells the driver a live device's new size (`UPDATE_SIZE`): the
    /// block device's capacity changes and its users are notified.
    pub fn update_size(&mut self, dev_id: u32, bytes: u64) -> std::io::Result<()> {
        self.command(sys::cmd::UPDATE_SIZE, update_size_cmd(dev_id, bytes))?;
        Ok(())
    }

    /// Adds the block device; returns once every queue has fetched.
    pub fn start(&mut self, dev_id: u32, pid: i32) -> std::io::Result<()> {
        self.with_pid(sys::cmd::START_DEV, dev_id, pid)
    }

    /// Removes the block device (I/O in flight completes first).
    pub fn stop(&mut self, dev_id: u32) -> std::io::Result<()> {
        self.command(sys::cmd::STOP_DEV, device_cmd(dev_id, 0, 0))?;
        Ok(())
    }

    /// Removes the device; waits until its char device is closed.
    pub fn delete(&mut self, dev_id: u32) -> std::io::Result<()> {
        self.command(sys::cmd::DEL_DEV, device_cmd(dev_id, 0, 0))?;
        Ok(())
    }

    /// Prepares a quiesced device for a new server.
    pub fn start_recovery(&mut self, dev_id: u32) -> std::io::Result<()> {
        self.command(sys::cmd::START_USER_RECOVERY, device_cmd(dev_id, 0, 0))?;
        Ok(())
    }

    /// Resumes I/O once every queue of the new server has fetched.
    pub fn end_recovery(&mut self, dev_id: u32, pid: i32) -> std::io::Result<()> {
        self.with_pid(sys::cmd::END_USER_RECOVERY, dev_id, pid)
    }

    fn with_pid(&mut self, op: u32, dev_id: u32, pid: i32) -> std::io::Result<()> {
        let mut cmd = device_cmd(dev_id, 0, 0);
        cmd.data = pid as u64;
        self.command(op, cmd)?;
        Ok(())
    }
}

/// The CPU numbers set in a little-endian CPU bitmap.
fn cpus_of(mask: &[u8]) -> Vec<usize> {
    (0..mask.len() * 8)
        .filter(|cpu| mask[cpu / 8] & (1 << (cpu % 8)) != 0)
        .collect()
}

/// `UPDATE_SIZE` for `dev_id`: the size goes inline, in 512-byte sectors.
fn update_size_cmd(dev_id: u32, bytes: u64) -> CtrlCmd {
    let mut cmd = device_cmd(dev_id, 0, 0);
    cmd.data = bytes >> 9;
    cmd
}

fn device_cmd(dev_id: u32, len: usize, addr: u64) -> CtrlCmd {
    CtrlCmd {
        dev_id,
        queue_id: u16::MAX,
        len: len as u16,
        addr,
        data: 0,
        ..CtrlCmd::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_bitmap_reads_as_its_cpu_numbers() {
        let mut mask = [0u8; 16];
        mask[0] = 0b0000_0101;
        mask[9] = 0b1000_0000;
        assert_eq!(cpus_of(&mask), [0, 2, 79]);
        assert!(cpus_of(&[0u8; 8]).is_empty());
    }

    #[test]
    fn update_size_carries_the_size_in_sectors_inline() {
        let cmd = update_size_cmd(3, 96 << 20).encode();
        assert_eq!(&cmd[0..4], &3u32.to_le_bytes());
        assert_eq!(&cmd[4..6], &[0xff, 0xff], "a device command, no queue");
        // No buffer: len and addr stay zero.
        assert!(cmd[6..16].iter().all(|&b| b == 0));
        assert_eq!(&cmd[16..24], &((96u64 << 20) / 512).to_le_bytes());
        assert!(cmd[24..].iter().all(|&b| b == 0));
    }
}
