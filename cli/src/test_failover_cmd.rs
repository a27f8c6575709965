//! `tidemark test-failover`: a recovery point served over NBD on the
//! replica site, read-write, while replication goes on. The test's writes
//! go to scratch files (copy-on-write in 4 KiB blocks); the point itself
//! is never changed, and retention does not fold it while the test runs
//! (the pin). Stopping the test (SIGTERM, Ctrl-C) or `tidemark
//! test-failover cleanup` removes every trace.
//!
//! Layout, in the group's directory:
//!
//! ```text
//! test-failover/lock             flock(2)ed by the running test (its pid)
//! test-failover/pin              the point's sequence number
//! test-failover/disk-<id>.scratch the test's writes, one per disk
//! ```
//!
//! The directory is 0700 and its files 0600, like the replica they copy;
//! the directory and the pin belong to the group directory's owner (the
//! receiver's user), which reads the pin.

use crate::points_cmd::{choose, kind, ReplicaArgs};
use crate::timefmt;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use tidemark_changelog::{DirLock, LockError};
use tidemark_durable::{zero_range, Zeroes};
use tidemark_receiver::store::{Disk, LocalEngine, PointReader, PIN_FILE, TEST_FAILOVER_DIR};
use tidemark_tracker::backend::Backend;
use tidemark_tracker::nbd::constants::{Errno, ExtentStatus, TransmissionFlags};
use tidemark_tracker::nbd::export::ExportInfo;
use tidemark_tracker::nbd::transmission::BlockStatusExtent;
use tidemark_tracker::server::{Server, ServerOptions, DEFAULT_BLOCK_SIZES};

/// `tidemark test-failover`.
#[derive(Debug, Subcommand)]
pub(crate) enum TestFailoverCommand {
    /// Serve a recovery point's disks over NBD (read-write, writes to
    /// scratch) until SIGTERM or Ctrl-C, then remove every trace.
    Start(StartArgs),
    /// Remove what a test failover that was killed left behind.
    Cleanup(CleanupArgs),
}

/// `tidemark test-failover start`.
#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
    /// The recovery point: `latest`, a sequence number, a time or a label
    /// (as for `tidemark failover`).
    #[arg(long, default_value = "latest")]
    point: String,
    /// The NBD unix socket to create (0600); the exports are named after
    /// the disks.
    #[arg(long)]
    socket: PathBuf,
}

/// `tidemark test-failover cleanup`.
#[derive(Debug, Args)]
pub(crate) struct CleanupArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
}

pub(crate) fn run(cmd: TestFailoverCommand) -> Result<ExitCode> {
    match cmd {
        TestFailoverCommand::Start(a) => start(a),
        TestFailoverCommand::Cleanup(a) => cleanup(a),
    }
}

const BLOCK: u64 = 4096;

/// One disk's scratch: the test's writes, and which 4 KiB blocks they
/// hold (every other block reads from the point).
struct Scratch {
    file: File,
    size: u64,
    /// One bit per block; the lock also orders copy-on-write.
    written: Mutex<Vec<u64>>,
}

/// The point plus the scratch files, as an NBD backend.
struct TestBackend {
    view: Arc<dyn PointReader>,
    disks: Vec<Disk>,
    scratch: Vec<Scratch>,
}

fn io(e: std::io::Error) -> Errno {
    Errno::from_io_error(&e)
}

impl TestBackend {
    fn disk(&self, index: u32) -> Result<(&Disk, &Scratch), Errno> {
        let i = index as usize;
        match (self.disks.get(i), self.scratch.get(i)) {
            (Some(d), Some(s)) => Ok((d, s)),
            _ => Err(Errno::Inval),
        }
    }

    fn read_point(&self, disk: &Disk, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.view.read(disk.id, offset, buf).map_err(|e| {
            tracing::warn!(disk = %disk.name, offset, error = %e, "reading the point");
            Errno::Io
        })
    }

    /// Changes `offset..offset+len` in the scratch: `data` (or zeroes).
    /// Blocks the change covers only in part are first copied from the
    /// point.
    fn change(&self, index: u32, offset: u64, len: u64, data: Option<&[u8]>) -> Result<(), Errno> {
        let (disk, s) = self.disk(index)?;
        let mut written = s.written.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + len;
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        for b in [first, last] {
            let (bs, be) = (b * BLOCK, ((b + 1) * BLOCK).min(s.size));
            let partial = offset > bs || end < be;
            if partial && !bit(&written, b) {
                let mut block = vec![0u8; (be - bs) as usize];
                self.read_point(disk, bs, &mut block)?;
                s.file.write_all_at(&block, bs).map_err(io)?;
                set_bits(&mut written, b, b);
            }
        }
        match data {
            Some(d) => s.file.write_all_at(d, offset).map_err(io)?,
            None => zero_range(&s.file, offset, len, Zeroes::Hole).map_err(io)?,
        }
        set_bits(&mut written, first, last);
        Ok(())
    }
}

fn bit(bits: &[u64], b: u64) -> bool {
    bits[(b / 64) as usize] & (1 << (b % 64)) != 0
}

fn set_bits(bits: &mut [u64], first: u64, last: u64) {
    for b in first..=last {
        bits[(b / 64) as usize] |= 1 << (b % 64);
    }
}

impl Backend for TestBackend {
    fn exports(&self) -> Vec<ExportInfo> {
        self.disks
            .iter()
            .map(|d| ExportInfo {
                name: d.name.to_string(),
                description: format!("tidemark test failover of disk {}", d.name),
                size: d.size,
                flags: TransmissionFlags::HAS_FLAGS
                    | TransmissionFlags::SEND_FLUSH
                    | TransmissionFlags::SEND_FUA
                    | TransmissionFlags::SEND_TRIM
                    | TransmissionFlags::SEND_WRITE_ZEROES
                    | TransmissionFlags::CAN_MULTI_CONN,
                block_sizes: DEFAULT_BLOCK_SIZES,
            })
            .collect()
    }

    fn multi_conn_safe(&self) -> bool {
        // Every connection writes the same scratch files; FLUSH syncs them.
        true
    }

    fn read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let (disk, s) = self.disk(index)?;
        let written = s.written.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let b = at / BLOCK;
            let from_scratch = bit(&written, b);
            // Extend the run while blocks come from the same place.
            let mut run_end = ((b + 1) * BLOCK).min(end);
            while run_end < end && bit(&written, run_end / BLOCK) == from_scratch {
                run_end = ((run_end / BLOCK + 1) * BLOCK).min(end);
            }
            let piece = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            if from_scratch {
                s.file.read_exact_at(piece, at).map_err(io)?;
            } else {
                self.read_point(disk, at, piece)?;
            }
            at = run_end;
        }
        Ok(())
    }

    fn write(&self, index: u32, offset: u64, data: &[u8], _fua: bool) -> Result<(), Errno> {
        if data.is_empty() {
            return Ok(());
        }
        self.change(index, offset, data.len() as u64, Some(data))
    }

    fn write_zeroes(
        &self,
        index: u32,
        offset: u64,
        length: u64,
        _no_hole: bool,
        _fua: bool,
    ) -> Result<(), Errno> {
        if length == 0 {
            return Ok(());
        }
        self.change(index, offset, length, None)
    }

    fn trim(&self, index: u32, offset: u64, length: u64, fua: bool) -> Result<(), Errno> {
        self.write_zeroes(index, offset, length, false, fua)
    }

    fn flush(&self, index: u32) -> Result<(), Errno> {
        let (_, s) = self.disk(index)?;
        s.file.sync_data().map_err(io)
    }

    fn block_status(
        &self,
        _disk: u32,
        _offset: u64,
        length: u32,
    ) -> Result<Vec<BlockStatusExtent>, Errno> {
        Ok(vec![BlockStatusExtent {
            length,
            status: ExtentStatus::empty(),
        }])
    }
}

/// Takes the test-failover lock of a group, or says who holds it. The
/// directory is made private (0700), and given to the owner of the group
/// directory: the CLI runs as root, the receiver as that owner, and the
/// receiver must read the pin to keep the point.
pub(crate) fn lock(dir: &Path) -> Result<DirLock> {
    tidemark_changelog::create_private_dir_all(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    give_to_group_owner(dir)?;
    match DirLock::acquire(dir, "lock", "test failover") {
        Ok(lock) => Ok(lock),
        Err(LockError::Held { pid, .. }) => bail!(
            "a test failover of this group is running (pid {}): stop it first",
            pid.map_or_else(|| "unknown".to_string(), |p| p.to_string())
        ),
        Err(e) => Err(e.into()),
    }
}

/// Pins the point `seq` in the locked test-failover directory `dir`:
/// retention keeps it while the file exists. Returns the pin's path.
pub(crate) fn pin(dir: &Path, seq: u64) -> Result<PathBuf> {
    let path = dir.join(PIN_FILE);
    let written = tidemark_changelog::private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(seq.to_string().as_bytes()));
    written.with_context(|| format!("pinning the point in {}", path.display()))?;
    give_to_group_owner(&path)?;
    Ok(path)
}

/// Gives `path` (in or below a group's test-failover directory) the owner
/// of the group directory, if it is not already its.
fn give_to_group_owner(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let group_dir = path
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == TEST_FAILOVER_DIR))
        .and_then(Path::parent)
        .with_context(|| format!("{} is not in a test-failover directory", path.display()))?;
    let owner = std::fs::metadata(group_dir)
        .with_context(|| format!("reading the owner of {}", group_dir.display()))?;
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if (meta.uid(), meta.gid()) != (owner.uid(), owner.gid()) {
        std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))
            .with_context(|| format!("giving {} to the owner of its group", path.display()))?;
    }
    Ok(())
}

fn remove_traces(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

fn start(a: StartArgs) -> Result<ExitCode> {
    // Signals are handled by the wait below, in every thread.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals
        .thread_block()
        .context("blocking SIGTERM and SIGINT")?;

    let group_dir = a.replica.dir()?;
    let dir = group_dir.join(TEST_FAILOVER_DIR);
    let _lock = lock(&dir)?;
    let result = serve(&a, &group_dir, &dir, &signals);
    let removed = remove_traces(&dir);
    let _ = std::fs::remove_file(&a.socket);
    result?;
    removed?;
    println!("test failover ended: its writes are discarded, nothing of it is left");
    Ok(ExitCode::SUCCESS)
}

fn serve(a: &StartArgs, group_dir: &Path, dir: &Path, signals: &SigSet) -> Result<()> {
    // Choose the point, pin it, then open: a fold between choosing and
    // pinning would be noticed when the point is looked up again.
    let chosen = {
        let group = LocalEngine::open_dir_read_only(group_dir)?;
        choose(&group.points(), &a.point)?.clone()
    };
    pin(dir, chosen.seq)?;
    let group = LocalEngine::open_dir_read_only(group_dir)?;
    let disks = group.disks();
    let view = group.shared_reader(chosen.seq).with_context(|| {
        format!(
            "the point at sequence {} was folded before it could be pinned; choose another",
            chosen.seq
        )
    })?;
    let mut scratch = Vec::new();
    for d in &disks {
        let path = dir.join(format!("disk-{}.scratch", d.id));
        let file = tidemark_changelog::private_file()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.set_len(d.size)?;
        scratch.push(Scratch {
            file,
            size: d.size,
            written: Mutex::new(vec![0u64; d.size.div_ceil(BLOCK).div_ceil(64) as usize]),
        });
    }
    let backend = Arc::new(TestBackend {
        view,
        disks: disks.clone(),
        scratch,
    });
    let server = Server::bind_unix(&a.socket, ServerOptions::default())
        .with_context(|| format!("creating the NBD socket {}", a.socket.display()))?;
    let handle = server
        .serve(backend)
        .context("starting the NBD server's threads")?;
    println!(
        "test failover of {}/{} at the recovery point at sequence {} ({}, {}); replication goes on",
        a.replica.host,
        a.replica.group,
        chosen.seq,
        timefmt::utc(chosen.timestamp_ns),
        kind(&chosen)
    );
    for d in &disks {
        println!(
            "  {}: nbd+unix:///{}?socket={}",
            d.name,
            d.name,
            a.socket.display()
        );
    }
    println!("ready; SIGTERM or Ctrl-C ends the test and discards its writes");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    crate::notify_ready();
    let signal = signals.wait().context("waiting for a signal")?;
    tracing::info!(?signal, "ending the test failover");
    handle.shutdown();
    Ok(())
}

fn cleanup(a: CleanupArgs) -> Result<ExitCode> {
    let dir = a.replica.dir()?.join(TEST_FAILOVER_DIR);
    if !dir.exists() {
        println!(
            "no test failover of {}/{} to clean up",
            a.replica.host, a.replica.group
        );
        return Ok(ExitCode::SUCCESS);
    }
    let lock = lock(&dir)?;
    remove_traces(&dir)?;
    drop(lock);
    println!(
        "removed what a test failover of {}/{} left (its pin and scratch files)",
        a.replica.host, a.replica.group
    );
    Ok(ExitCode::SUCCESS)
}
