//! What the NBD server tests share: an in-memory backend, starting a
//! server on a private socket, a raw protocol client for hostile input, and
//! skipping loudly when a foreign tool is missing.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use tidemark_changelog::{Disk, DiskId};
use tidemark_names::Name;
use tidemark_tracker::backend::{all_data, Allocation, Backend, BackendError, ServedDisk};
use tidemark_tracker::nbd::constants::{CommandFlags, CommandType, OptionCode};
use tidemark_tracker::nbd::export::{BlockSizes, UNLIMITED_MAX_BLOCK};
use tidemark_tracker::nbd::handshake::OptionHeader;
use tidemark_tracker::nbd::transmission::RequestHeader;
use tidemark_tracker::server::{Server, ServerHandle, ServerOptions};

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;

/// Whether `tool` is on the PATH. When it is not, prints why the calling
/// test is skipped; under CI (`CI` set) a missing tool fails the test
/// instead, because CI installs every tool the tests need.
pub fn require_tool(tool: &str, test: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: `{tool}` is missing under CI; the test command must install it"
        );
        eprintln!("SKIP {test}: {tool} not installed");
    }
    found
}

/// One disk of [`MemoryBackend`].
pub struct MemoryDisk {
    pub name: String,
    pub data: Mutex<Vec<u8>>,
}

/// A `Vec<u8>` per export behind a mutex; block status reports all data.
pub struct MemoryBackend {
    pub disks: Vec<MemoryDisk>,
    pub multi_conn: bool,
    /// Each write sleeps this long before it lands (to keep writes in
    /// flight in the tests that need them).
    pub write_delay: Duration,
    /// Each read sleeps this long.
    pub read_delay: Duration,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
}

impl MemoryBackend {
    pub fn new(disks: &[(&str, usize)], multi_conn: bool) -> Self {
        Self {
            disks: disks
                .iter()
                .map(|(name, size)| MemoryDisk {
                    name: (*name).to_owned(),
                    data: Mutex::new(vec![0; *size]),
                })
                .collect(),
            multi_conn,
            write_delay: Duration::ZERO,
            read_delay: Duration::ZERO,
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            trims: AtomicU64::new(0),
            zeroes: AtomicU64::new(0),
        }
    }

    /// A copy of a disk's bytes.
    pub fn snapshot(&self, disk: usize) -> Vec<u8> {
        self.disks[disk].data.lock().unwrap().clone()
    }

    /// Overwrites a disk's bytes from `offset`.
    pub fn fill(&self, disk: usize, offset: usize, bytes: &[u8]) {
        self.disks[disk].data.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    fn range(
        &self,
        disk: DiskId,
        offset: u64,
        len: u64,
    ) -> Result<(&MemoryDisk, std::ops::Range<usize>), BackendError> {
        let found = self.disks.get(disk.index());
        let disk = found.ok_or(BackendError::NoSuchDisk(disk))?;
        let size = disk.data.lock().unwrap().len() as u64;
        let out = BackendError::OutOfRange {
            offset,
            length: len,
        };
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok((disk, offset as usize..end as usize)),
            _ => Err(out),
        }
    }
}

impl Backend for MemoryBackend {
    fn disks(&self) -> Vec<ServedDisk> {
        self.disks
            .iter()
            .zip(0u32..)
            .map(|(disk, id)| ServedDisk {
                disk: Disk {
                    id: DiskId(id),
                    name: Name::new(disk.name.as_str()).expect("test disk names are valid"),
                    size: disk.data.lock().unwrap().len() as u64,
                },
                export: disk.name.clone(),
                description: format!("in-memory disk {}", disk.name),
                read_only: false,
                block_sizes: BlockSizes::new(1, 512, UNLIMITED_MAX_BLOCK).unwrap(),
            })
            .collect()
    }

    fn multi_conn_safe(&self) -> bool {
        self.multi_conn
    }

    fn read(&self, disk: DiskId, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        std::thread::sleep(self.read_delay);
        let (disk, range) = self.range(disk, offset, buf.len() as u64)?;
        buf.copy_from_slice(&disk.data.lock().unwrap()[range]);
        Ok(())
    }

    fn write(
        &self,
        disk: DiskId,
        offset: u64,
        data: &[u8],
        _fua: bool,
    ) -> Result<(), BackendError> {
        std::thread::sleep(self.write_delay);
        let (disk, range) = self.range(disk, offset, data.len() as u64)?;
        disk.data.lock().unwrap()[range].copy_from_slice(data);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn write_zeroes(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
        _no_hole: bool,
        _fua: bool,
    ) -> Result<(), BackendError> {
        let (disk, range) = self.range(disk, offset, length)?;
        disk.data.lock().unwrap()[range].fill(0);
        self.zeroes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, disk: DiskId, offset: u64, length: u64, _fua: bool) -> Result<(), BackendError> {
        let (disk, range) = self.range(disk, offset, length)?;
        disk.data.lock().unwrap()[range].fill(0);
        self.trims.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn flush(&self, _disk: DiskId) -> Result<(), BackendError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn allocation(
        &self,
        disk: DiskId,
        offset: u64,
        length: u64,
    ) -> Result<Vec<Allocation>, BackendError> {
        self.range(disk, offset, length)?;
        Ok(all_data(disk, offset, length))
    }
}

/// A running server on a unix socket in its own temporary directory.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub handle: Option<ServerHandle>,
    pub backend: Arc<MemoryBackend>,
}

impl TestServer {
    pub fn start(backend: MemoryBackend) -> Self {
        Self::start_with(backend, ServerOptions::default())
    }

    pub fn start_with(backend: MemoryBackend, options: ServerOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let backend = Arc::new(backend);
        let server = Server::bind_unix(&socket, options).unwrap();
        let handle = server.serve(backend.clone()).unwrap();
        Self {
            dir,
            socket,
            handle: Some(handle),
            backend,
        }
    }

    /// The NBD URI of an export, as libnbd and qemu spell it.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn handle(&self) -> &ServerHandle {
        self.handle.as_ref().unwrap()
    }

    pub fn shutdown(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.shutdown();
        }
    }
}

/// A deterministic pseudo-random byte pattern.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

/// A reply as a raw client sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply: error value (0 = success) and cookie.
    Simple { error: u32, cookie: u64 },
    /// A structured chunk: flags, type, cookie, data.
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        data: Vec<u8>,
    },
}

/// A hand-driven NBD client over a unix socket, for hostile and exact
/// protocol tests. Every read times out after 10 s so a test never hangs.
pub struct RawClient {
    pub stream: UnixStream,
}

pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
pub const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";

impl RawClient {
    /// Connects and reads the greeting.
    pub fn connect(socket: &Path) -> Self {
        let stream = UnixStream::connect(socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut client = Self { stream };
        let greeting = client.read_bytes(18);
        assert_eq!(&greeting[..8], NBDMAGIC);
        assert_eq!(&greeting[8..16], IHAVEOPT);
        client
    }

    /// Connects, negotiates (structured replies and base:allocation if
    /// asked) and enters transmission on `export` with `NBD_OPT_GO`.
    /// Returns the export size and transmission flags.
    pub fn go(socket: &Path, export: &str, structured: bool) -> (Self, u64, u16) {
        let mut client = Self::connect(socket);
        client.send(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
        if structured {
            client.send_option(OptionCode::StructuredReply.code(), &[]);
            let (_, reply, _) = client.read_option_reply();
            assert_eq!(reply, 1, "structured replies acknowledged");
            let mut data = (export.len() as u32).to_be_bytes().to_vec();
            data.extend_from_slice(export.as_bytes());
            data.extend_from_slice(&1u32.to_be_bytes());
            data.extend_from_slice(&15u32.to_be_bytes());
            data.extend_from_slice(b"base:allocation");
            client.send_option(OptionCode::SetMetaContext.code(), &data);
            let (_, reply, _) = client.read_option_reply();
            assert_eq!(reply, 4, "base:allocation selected");
            let (_, reply, _) = client.read_option_reply();
            assert_eq!(reply, 1);
        }
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        client.send_option(OptionCode::Go.code(), &data);
        let (mut size, mut flags) = (None, None);
        loop {
            let (_, reply, data) = client.read_option_reply();
            match reply {
                1 => break,
                3 if data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                    flags = Some(u16::from_be_bytes(data[10..12].try_into().unwrap()));
                }
                3 => {}
                other => panic!("NBD_OPT_GO failed with reply type {other:#x}"),
            }
        }
        (client, size.unwrap(), flags.unwrap())
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends, ignoring failures (the server may already have closed).
    pub fn try_send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    pub fn read_bytes(&mut self, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf).unwrap();
        buf
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let header = OptionHeader {
            option,
            len: data.len() as u32,
        }
        .encode();
        self.send(&header);
        self.send(data);
    }

    /// Reads one option reply: option, reply type, data.
    pub fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let header = self.read_bytes(20);
        assert_eq!(
            u64::from_be_bytes(header[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let data = self.read_bytes(len as usize);
        (option, reply, data)
    }

    /// Sends a request header (and `payload` right after it).
    pub fn request(
        &mut self,
        kind: u16,
        flags: CommandFlags,
        cookie: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let header = RequestHeader {
            flags,
            kind,
            cookie,
            offset,
            length,
        }
        .encode();
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(payload);
        self.send(&bytes);
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(
            CommandType::Write.code(),
            CommandFlags::empty(),
            cookie,
            offset,
            data.len() as u32,
            data,
        );
    }

    pub fn read(&mut self, cookie: u64, offset: u64, length: u32) {
        self.request(
            CommandType::Read.code(),
            CommandFlags::empty(),
            cookie,
            offset,
            length,
            &[],
        );
    }

    /// Reads one reply (a simple reply or one structured chunk). The data of
    /// a successful simple read reply is not part of it: read it with
    /// [`read_bytes`](Self::read_bytes).
    pub fn read_reply(&mut self) -> Reply {
        let magic = self.read_bytes(4);
        match u32::from_be_bytes(magic.try_into().unwrap()) {
            0x6744_6698 => {
                let rest = self.read_bytes(12);
                Reply::Simple {
                    error: u32::from_be_bytes(rest[..4].try_into().unwrap()),
                    cookie: u64::from_be_bytes(rest[4..12].try_into().unwrap()),
                }
            }
            0x668e_33ef => {
                let rest = self.read_bytes(16);
                let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
                Reply::Chunk {
                    flags: u16::from_be_bytes(rest[..2].try_into().unwrap()),
                    kind: u16::from_be_bytes(rest[2..4].try_into().unwrap()),
                    cookie: u64::from_be_bytes(rest[4..12].try_into().unwrap()),
                    data: self.read_bytes(len as usize),
                }
            }
            other => panic!("reply magic {other:#010x}"),
        }
    }

    /// Reads a simple reply and returns its error value, checking the
    /// cookie.
    pub fn expect_simple(&mut self, cookie: u64) -> u32 {
        match self.read_reply() {
            Reply::Simple { error, cookie: got } => {
                assert_eq!(got, cookie, "reply cookie");
                error
            }
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// Whether the server closed the connection (EOF or reset) within the
    /// read timeout, discarding anything it still sent.
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0; 4096];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

/// A well-behaved client writing and reading back its own region of an
/// export in a loop on a thread, for as long as a test runs hostile
/// clients beside it.
pub struct Bystander {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl Bystander {
    /// Starts writing and verifying 4 KiB blocks at `offset..offset+64 KiB`.
    pub fn start(socket: &Path, export: &str, offset: u64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (mut client, _, _) = RawClient::go(socket, export, false);
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut rounds = 0u64;
            while !stopping.load(Ordering::SeqCst) || rounds < 4 {
                let block = offset + (rounds % 16) * 4096;
                let data = pseudo_random(4096, rounds + offset);
                client.write(rounds * 2, block, &data);
                assert_eq!(client.expect_simple(rounds * 2), 0, "bystander write");
                client.read(rounds * 2 + 1, block, 4096);
                assert_eq!(client.expect_simple(rounds * 2 + 1), 0, "bystander read");
                assert_eq!(client.read_bytes(4096), data, "bystander data");
                rounds += 1;
            }
            client.request(
                CommandType::Disc.code(),
                CommandFlags::empty(),
                0,
                0,
                0,
                &[],
            );
            assert!(client.closed_by_server(), "bystander disconnect");
            rounds
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the bystander and checks that it was served throughout.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().unwrap().join() {
            Ok(rounds) => rounds,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
