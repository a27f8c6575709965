//! Hostile clients against the real tracker: clients that stop reading
//! their replies, and clients that connect and never say a word, must cost
//! only their own connections. A well-behaved client beside them is served
//! promptly; how long it waited is printed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use tidemark_e2e::TrackerProcess;

const SIZE: u64 = 64 << 20;
const MIB: u32 = 1 << 20;

/// A minimal NBD client speaking the fixed newstyle handshake with
/// `NBD_OPT_EXPORT_NAME`, then raw requests.
struct Client {
    stream: UnixStream,
}

impl Client {
    /// Connects and negotiates the export `disk`.
    fn connect(socket: &Path) -> std::io::Result<Client> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
        stream.write_all(&3u32.to_be_bytes())?;
        let name = b"disk";
        let mut option = Vec::new();
        option.extend_from_slice(b"IHAVEOPT");
        option.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        option.extend_from_slice(&(name.len() as u32).to_be_bytes());
        option.extend_from_slice(name);
        stream.write_all(&option)?;
        let mut export = [0u8; 10];
        stream.read_exact(&mut export)?;
        assert_eq!(u64::from_be_bytes(export[..8].try_into().unwrap()), SIZE);
        Ok(Client { stream })
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, length: u32) {
        let mut header = Vec::with_capacity(28);
        header.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&kind.to_be_bytes());
        header.extend_from_slice(&cookie.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        self.stream.write_all(&header).unwrap();
    }

    /// A 4 KiB read, answered: returns the data.
    fn read_4k(&mut self, cookie: u64, offset: u64) -> Vec<u8> {
        self.request(0, cookie, offset, 4096);
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(&reply[4..8], &0u32.to_be_bytes(), "read error");
        assert_eq!(&reply[8..16], &cookie.to_be_bytes());
        let mut data = vec![0u8; 4096];
        self.stream.read_exact(&mut data).unwrap();
        data
    }
}

fn tracker(dir: &Path) -> TrackerProcess {
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(SIZE)
        .unwrap();
    TrackerProcess::start(dir, &image, &[])
}

#[test]
fn clients_that_never_read_their_replies_do_not_stall_another_client() {
    let tmp = tempfile::tempdir().unwrap();
    let tracker = tracker(tmp.path());
    // Eight clients queue 1 MiB reads and never read a reply: their
    // sockets fill up, and stay full.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut client = Client::connect(&tracker.socket).unwrap();
        for cookie in 0..48 {
            client.request(
                0,
                cookie,
                u64::from(cookie as u32 % 60) * u64::from(MIB),
                MIB,
            );
        }
        stalled.push(client);
    }
    std::thread::sleep(Duration::from_millis(500));
    // A good client beside them.
    let started = Instant::now();
    let mut good = Client::connect(&tracker.socket).unwrap();
    for round in 0..16u64 {
        good.read_4k(round, round * 4096);
    }
    let waited = started.elapsed();
    eprintln!("the good client was served in {waited:?} beside 8 stalled clients");
    assert!(
        waited < Duration::from_secs(3),
        "a client beside 8 stalled ones waited {waited:?}"
    );
    drop(stalled);
    assert!(tracker.stop());
}

#[test]
fn idle_connections_do_not_lock_out_a_new_client() {
    let tmp = tempfile::tempdir().unwrap();
    let tracker = tracker(tmp.path());
    // 64 connections that never send a byte (the server's connection limit).
    let idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&tracker.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let mut good = Client::connect(&tracker.socket)
        .expect("a real client gets a connection beside 64 idle ones");
    good.read_4k(1, 0);
    let waited = started.elapsed();
    eprintln!("the new client was served in {waited:?} beside 64 idle connections");
    assert!(
        waited < Duration::from_secs(3),
        "a new client beside 64 idle connections waited {waited:?}"
    );
    drop(idle);
    assert!(tracker.stop());
}
