//! The NBD server against hand-made bytes: the socket it creates, hostile
//! and broken clients (each with a well-behaved client served beside it
//! throughout), exact replies, concurrency limits and shutdown.

mod server_support;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use server_support::{
    pseudo_random, Bystander, MemoryBackend, RawClient, Reply, TestServer, KIB, MIB,
};
use tidemark_tracker::nbd::constants::{CommandFlags, CommandType, OptionCode, TransmissionFlags};
use tidemark_tracker::nbd::export::BlockSizes;
use tidemark_tracker::server::{ListenAddr, Server, ServerOptions};

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

fn one_disk(size: usize) -> MemoryBackend {
    MemoryBackend::new(&[("disk", size)], true)
}

#[test]
fn socket_is_private_from_the_start_and_never_stolen() {
    let mut server = TestServer::start(one_disk(MIB));
    let meta = std::fs::metadata(&server.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(
        server.handle().addr(),
        &ListenAddr::Unix(server.socket.clone())
    );
    // No staging directory is left beside it.
    assert_eq!(std::fs::read_dir(server.dir.path()).unwrap().count(), 1);

    // A live socket is refused...
    let error = Server::bind_unix(&server.socket, ServerOptions::default())
        .err()
        .expect("binding over a live socket must fail");
    assert_eq!(error.kind(), ErrorKind::AddrInUse);
    // ...and shutdown removes ours.
    server.shutdown();
    assert!(!server.socket.exists());

    // A stale socket (nobody listening) is replaced.
    let stale = server.dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let replaced = Server::bind_unix(&stale, ServerOptions::default()).unwrap();
    assert_eq!(
        std::fs::metadata(&stale).unwrap().permissions().mode() & 0o777,
        0o600
    );
    drop(replaced);
    assert!(!stale.exists(), "an unserved server cleans up too");

    // Anything else at the path is left alone.
    let file = server.dir.path().join("regular");
    std::fs::write(&file, b"keep me").unwrap();
    let error = Server::bind_unix(&file, ServerOptions::default())
        .err()
        .expect("binding over a regular file must fail");
    assert_eq!(error.kind(), ErrorKind::AlreadyExists);
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn unusable_options_are_refused_at_bind() {
    let dir = tempfile::tempdir().unwrap();
    let options = ServerOptions {
        max_in_flight: 0,
        ..ServerOptions::default()
    };
    let error = Server::bind_unix(dir.path().join("s"), options)
        .err()
        .expect("no request may ever be in flight");
    assert_eq!(error.kind(), ErrorKind::InvalidInput);
    assert!(!dir.path().join("s").exists());
}

#[test]
fn garbage_and_truncated_handshakes_close_only_their_connection() {
    let server = TestServer::start(one_disk(4 * MIB));
    let bystander = Bystander::start(&server.socket, "disk", 0);

    // Not NBD at all: an HTTP request in place of the client flags.
    let mut http = RawClient::connect(&server.socket);
    http.try_send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(http.closed_by_server());

    // Client flags with bits nobody advertised.
    let mut flags = RawClient::connect(&server.socket);
    flags.send(&0xffff_ffffu32.to_be_bytes());
    assert!(flags.closed_by_server());

    // Good flags, then an option header with the wrong magic.
    let mut magic = RawClient::connect(&server.socket);
    magic.send(&3u32.to_be_bytes());
    magic.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    assert!(magic.closed_by_server());

    // An option announcing far more data than any option needs.
    let mut huge = RawClient::connect(&server.socket);
    huge.send(&3u32.to_be_bytes());
    huge.send(b"IHAVEOPT\0\0\0\x07\x7f\xff\xff\xff");
    assert!(huge.closed_by_server());

    // Truncated: an option announcing 100 bytes, 10 sent, then close.
    let mut truncated = RawClient::connect(&server.socket);
    truncated.send(&3u32.to_be_bytes());
    truncated.send(b"IHAVEOPT\0\0\0\x07\0\0\0\x64");
    truncated.send(&[0; 10]);
    truncated
        .stream
        .shutdown(std::net::Shutdown::Write)
        .unwrap();
    assert!(truncated.closed_by_server());

    // Closed right after the greeting, and mid client flags.
    drop(RawClient::connect(&server.socket));
    let mut half = RawClient::connect(&server.socket);
    half.send(&[0, 0]);
    drop(half);

    // NBD_OPT_EXPORT_NAME for an export that does not exist.
    let mut unknown = RawClient::connect(&server.socket);
    unknown.send(&3u32.to_be_bytes());
    unknown.send_option(OptionCode::ExportName.code(), b"nope");
    assert!(unknown.closed_by_server());

    // Only the bystander wrote: one write per round.
    let rounds = bystander.finish();
    assert!(rounds >= 4);
    assert_eq!(server.backend.writes.load(Ordering::SeqCst), rounds);
}

#[test]
fn unknown_options_are_refused_and_negotiation_continues() {
    let server = TestServer::start(one_disk(MIB));
    let mut client = RawClient::connect(&server.socket);
    client.send(&3u32.to_be_bytes());
    client.send_option(0x4242, b"whatever");
    let (option, reply, _) = client.read_option_reply();
    assert_eq!((option, reply), (0x4242, 0x8000_0001), "NBD_REP_ERR_UNSUP");
    client.send_option(OptionCode::StartTls.code(), &[]);
    let (_, reply, _) = client.read_option_reply();
    assert_eq!(reply, 0x8000_0001, "no TLS on a local socket");
    // Still negotiating: list, then abort cleanly.
    client.send_option(OptionCode::List.code(), &[]);
    let (_, reply, data) = client.read_option_reply();
    assert_eq!(reply, 2, "NBD_REP_SERVER");
    assert_eq!(&data[4..8], b"disk");
    let (_, reply, _) = client.read_option_reply();
    assert_eq!(reply, 1, "NBD_REP_ACK");
    client.send_option(OptionCode::Abort.code(), &[]);
    let (_, reply, _) = client.read_option_reply();
    assert_eq!(reply, 1);
    assert!(client.closed_by_server());
}

#[test]
fn refused_requests_get_errors_and_the_connection_goes_on() {
    let options = ServerOptions {
        block_sizes: BlockSizes::new(1, 4096, MIB as u32).unwrap(),
        ..ServerOptions::default()
    };
    let server = TestServer::start_with(one_disk(4 * MIB), options);
    let bystander = Bystander::start(&server.socket, "disk", MIB as u64);
    let (mut client, size, _) = RawClient::go(&server.socket, "disk", false);
    assert_eq!(size, 4 * MIB as u64);

    // Unknown command type.
    client.request(99, CommandFlags::empty(), 1, 0, 512, &[]);
    assert_eq!(client.expect_simple(1), EINVAL);
    // Unknown command flag.
    client.request(
        CommandType::Read.code(),
        CommandFlags::from_bits_retain(0x8000),
        2,
        0,
        512,
        &[],
    );
    assert_eq!(client.expect_simple(2), EINVAL);
    // Read past the end.
    client.read(3, size - 512, 1024);
    assert_eq!(client.expect_simple(3), EINVAL);
    // Offset near 2^64 (overflowing end).
    client.read(4, u64::MAX - 10, 512);
    assert_eq!(client.expect_simple(4), EINVAL);
    // Write past the end: the payload is skipped, ENOSPC.
    client.write(5, size - 100, &[0xee; 200]);
    assert_eq!(client.expect_simple(5), ENOSPC);
    // A write above the announced maximum block size but within 32 MiB is
    // served: the kernel's NBD client may never have heard the maximum.
    // (Past the bystander's 64 KiB at 1 MiB.)
    let large = MIB + 64 * KIB;
    client.write(6, large as u64, &vec![0xdd; 2 * MIB]);
    assert_eq!(client.expect_simple(6), 0);
    // Trim and write-zeroes out of range, flush with a range.
    client.request(
        CommandType::Trim.code(),
        CommandFlags::empty(),
        7,
        size,
        1,
        &[],
    );
    assert_eq!(client.expect_simple(7), EINVAL);
    client.request(
        CommandType::Flush.code(),
        CommandFlags::empty(),
        8,
        1,
        0,
        &[],
    );
    assert_eq!(client.expect_simple(8), EINVAL);
    // Block status without a negotiated context.
    client.request(
        CommandType::BlockStatus.code(),
        CommandFlags::empty(),
        9,
        0,
        512,
        &[],
    );
    assert_eq!(client.expect_simple(9), EINVAL);
    // Zero-length read.
    client.read(10, 0, 0);
    assert_eq!(client.expect_simple(10), EINVAL);

    // The stream is still in step: a real write and read work.
    let data = pseudo_random(3000, 7);
    client.write(11, 12345, &data);
    assert_eq!(client.expect_simple(11), 0);
    client.read(12, 12345, 3000);
    assert_eq!(client.expect_simple(12), 0);
    assert_eq!(client.read_bytes(3000), data);
    // None of the refused writes touched the disk; the large one did.
    let disk = server.backend.snapshot(0);
    assert!(disk[size as usize - 100..].iter().all(|&b| b == 0));
    assert!(disk[..12345].iter().all(|&b| b == 0));
    assert!(disk[large..large + 2 * MIB].iter().all(|&b| b == 0xdd));

    // A write too large to skip (beyond 32 MiB): error, then closed.
    client.request(
        CommandType::Write.code(),
        CommandFlags::empty(),
        13,
        0,
        64 * MIB as u32,
        &[],
    );
    assert_eq!(client.expect_simple(13), EINVAL);
    assert!(client.closed_by_server());

    assert!(bystander.finish() >= 4);
}

#[test]
fn garbage_and_short_payloads_in_transmission_never_reach_the_backend() {
    let server = TestServer::start(one_disk(4 * MIB));
    let bystander = Bystander::start(&server.socket, "disk", 0);
    let writes_before = server.backend.writes.load(Ordering::SeqCst);

    // A request with a bad magic: the framing is lost, the connection closed.
    let (mut garbage, _, _) = RawClient::go(&server.socket, "disk", false);
    garbage.send(&[0x5a; 28]);
    assert!(garbage.closed_by_server());

    // A write whose payload stops short, then the client closes.
    let (mut short, _, _) = RawClient::go(&server.socket, "disk", false);
    let header = tidemark_tracker::nbd::transmission::RequestHeader {
        flags: CommandFlags::empty(),
        kind: CommandType::Write.code(),
        cookie: 1,
        offset: 2 * MIB as u64,
        length: 64 * KIB as u32,
    }
    .encode();
    short.send(&header);
    short.send(&[0xab; 1000]);
    short.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(short.closed_by_server());

    // Half a request header, then close.
    let (mut half, _, _) = RawClient::go(&server.socket, "disk", false);
    half.send(&header[..13]);
    drop(half);

    let rounds = bystander.finish();
    // The bystander writes once per round; none of the broken clients'
    // writes were performed.
    assert_eq!(
        server.backend.writes.load(Ordering::SeqCst) - writes_before,
        rounds
    );
    let disk = server.backend.snapshot(0);
    assert!(disk[2 * MIB..].iter().all(|&b| b == 0));
}

#[test]
fn structured_replies_carry_data_errors_and_block_status() {
    let server = TestServer::start(one_disk(MIB));
    let data = pseudo_random(4096, 3);
    server.backend.fill(0, 8192, &data);
    let (mut client, size, _) = RawClient::go(&server.socket, "disk", true);

    client.read(1, 8192, 4096);
    let Reply::Chunk {
        flags,
        kind,
        cookie,
        data: chunk,
    } = client.read_reply()
    else {
        panic!("a structured read reply")
    };
    assert_eq!(
        (flags, kind, cookie),
        (1, 1, 1),
        "one OFFSET_DATA chunk, DONE"
    );
    assert_eq!(&chunk[..8], &8192u64.to_be_bytes());
    assert_eq!(&chunk[8..], &data[..]);

    // An error is an ERROR chunk.
    client.read(2, size, 512);
    let Reply::Chunk {
        flags, kind, data, ..
    } = client.read_reply()
    else {
        panic!("a structured error reply")
    };
    assert_eq!((flags, kind), (1, 0x8001));
    assert_eq!(&data[..4], &EINVAL.to_be_bytes());

    // Block status answers for context 1 (base:allocation), all data.
    client.request(
        CommandType::BlockStatus.code(),
        CommandFlags::empty(),
        3,
        4096,
        65536,
        &[],
    );
    let Reply::Chunk {
        flags, kind, data, ..
    } = client.read_reply()
    else {
        panic!("a block status reply")
    };
    assert_eq!((flags, kind), (1, 5));
    assert_eq!(&data[..4], &1u32.to_be_bytes());
    assert_eq!(&data[4..8], &65536u32.to_be_bytes());
    assert_eq!(&data[8..12], &0u32.to_be_bytes());

    // Writes still get simple replies, which NBD allows.
    client.write(4, 0, &[1; 512]);
    assert_eq!(client.expect_simple(4), 0);
}

#[test]
fn pipelined_requests_run_in_parallel_and_all_get_replies() {
    let mut backend = one_disk(MIB);
    backend.read_delay = Duration::from_millis(100);
    let server = TestServer::start(backend);
    let (mut client, _, _) = RawClient::go(&server.socket, "disk", false);
    let started = Instant::now();
    for cookie in 0..16 {
        client.read(cookie, cookie * 4096, 4096);
    }
    let mut cookies = Vec::new();
    for _ in 0..16 {
        let Reply::Simple { error, cookie } = client.read_reply() else {
            panic!("simple replies")
        };
        assert_eq!(error, 0);
        client.read_bytes(4096);
        cookies.push(cookie);
    }
    let elapsed = started.elapsed();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..16).collect::<Vec<_>>());
    // Serially this is 1.6 s; eight workers make it about 0.2 s.
    assert!(
        elapsed < Duration::from_millis(1000),
        "16 reads of 100 ms took {elapsed:?}"
    );
}

#[test]
fn in_flight_requests_are_bounded_per_connection() {
    let mut backend = one_disk(MIB);
    backend.read_delay = Duration::from_millis(100);
    let options = ServerOptions {
        max_in_flight: 2,
        ..ServerOptions::default()
    };
    let server = TestServer::start_with(backend, options);
    let (mut client, _, _) = RawClient::go(&server.socket, "disk", false);
    let started = Instant::now();
    for cookie in 0..8 {
        client.read(cookie, 0, 512);
    }
    for _ in 0..8 {
        assert!(matches!(
            client.read_reply(),
            Reply::Simple { error: 0, .. }
        ));
        client.read_bytes(512);
    }
    // Two at a time: at least four rounds of 100 ms.
    assert!(started.elapsed() >= Duration::from_millis(390));
}

#[test]
fn disconnect_waits_for_replies_in_flight() {
    let mut backend = one_disk(MIB);
    backend.write_delay = Duration::from_millis(150);
    let server = TestServer::start(backend);
    let (mut client, _, _) = RawClient::go(&server.socket, "disk", false);
    for cookie in 0..8u64 {
        client.write(cookie, cookie * 4096, &[cookie as u8 + 1; 4096]);
    }
    client.request(
        CommandType::Disc.code(),
        CommandFlags::empty(),
        99,
        0,
        0,
        &[],
    );
    let mut replied = Vec::new();
    for _ in 0..8 {
        let Reply::Simple { error, cookie } = client.read_reply() else {
            panic!("simple replies")
        };
        assert_eq!(error, 0);
        replied.push(cookie);
    }
    assert!(client.closed_by_server());
    replied.sort_unstable();
    assert_eq!(replied, (0..8).collect::<Vec<_>>());
    let disk = server.backend.snapshot(0);
    for cookie in 0..8usize {
        assert!(disk[cookie * 4096..(cookie + 1) * 4096]
            .iter()
            .all(|&b| b == cookie as u8 + 1));
    }
}

#[test]
fn a_slow_handshake_is_cut_off() {
    let options = ServerOptions {
        handshake_timeout: Duration::from_millis(800),
        ..ServerOptions::default()
    };
    let server = TestServer::start_with(one_disk(MIB), options);
    let mut slow = RawClient::connect(&server.socket);
    let started = Instant::now();
    // One byte every 200 ms would never finish an option; each read
    // arrives well within any per-read timeout.
    let mut cut = false;
    for byte in [0u8, 0, 0, 3, b'I', b'H', b'A', b'V', b'E', b'O', b'P'] {
        if !slow.try_send(&[byte]) {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(cut || slow.closed_by_server());
    assert!(started.elapsed() < Duration::from_secs(5));
    // An idle client that never answers the greeting is cut off too.
    let mut idle = RawClient::connect(&server.socket);
    let started = Instant::now();
    assert!(idle.closed_by_server());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn too_many_connections_are_closed_on_arrival() {
    let options = ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    };
    let server = TestServer::start_with(one_disk(MIB), options);
    let (first, _, _) = RawClient::go(&server.socket, "disk", false);
    let (second, _, _) = RawClient::go(&server.socket, "disk", false);
    let mut third = UnixStream::connect(&server.socket).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0; 18];
    assert!(
        third.read_exact(&mut buf).is_err(),
        "no greeting past the limit"
    );
    drop((first, second));
    // Once the others are gone, a new client is served again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.handle().connections() > 0 {
        assert!(Instant::now() < deadline, "connections did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut again, _, _) = RawClient::go(&server.socket, "disk", false);
    again.read(1, 0, 512);
    assert_eq!(again.expect_simple(1), 0);
}

#[test]
fn shutdown_with_a_writing_client_keeps_every_acknowledged_write() {
    let mut backend = one_disk(8 * MIB);
    backend.write_delay = Duration::from_millis(5);
    let mut server = TestServer::start(backend);
    let (client, _, _) = RawClient::go(&server.socket, "disk", false);
    let mut reader = RawClient {
        stream: client.stream.try_clone().unwrap(),
    };
    let mut writer = client;

    // The writer pipelines writes of distinct blocks until the socket
    // fails; the reader collects the acknowledged cookies.
    let writing = std::thread::spawn(move || {
        let mut sent = 0u64;
        for cookie in 0..2048u64 {
            let data = pseudo_random(4096, cookie + 1);
            let header = tidemark_tracker::nbd::transmission::RequestHeader {
                flags: CommandFlags::empty(),
                kind: CommandType::Write.code(),
                cookie,
                offset: cookie * 4096,
                length: 4096,
            }
            .encode();
            let mut bytes = header.to_vec();
            bytes.extend_from_slice(&data);
            if writer.stream.write_all(&bytes).is_err() {
                break;
            }
            sent += 1;
            std::thread::sleep(Duration::from_micros(200));
        }
        sent
    });
    let acked = std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut header = [0; 16];
        while reader.stream.read_exact(&mut header).is_ok() {
            assert_eq!(&header[..4], &[0x67, 0x44, 0x66, 0x98]);
            assert_eq!(&header[4..8], &[0; 4], "write failed");
            acked.push(u64::from_be_bytes(header[8..16].try_into().unwrap()));
        }
        acked
    });

    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    server.shutdown();
    assert!(started.elapsed() < Duration::from_secs(10));
    let acked = acked.join().unwrap();
    let sent = writing.join().unwrap();
    eprintln!("sent {sent}, acknowledged {}", acked.len());
    assert!(!acked.is_empty(), "some writes were acknowledged");
    assert!(acked.len() as u64 <= sent);
    let disk = server.backend.snapshot(0);
    for &cookie in &acked {
        let at = cookie as usize * 4096;
        assert_eq!(
            &disk[at..at + 4096],
            &pseudo_random(4096, cookie + 1)[..],
            "acknowledged write {cookie} is in the backend"
        );
    }
    // Nothing more happens after shutdown returned.
    let writes = server.backend.writes.load(Ordering::SeqCst);
    assert!(writes >= acked.len() as u64);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(server.backend.writes.load(Ordering::SeqCst), writes);
    assert!(UnixStream::connect(&server.socket).is_err());
}

#[test]
fn shutdown_with_idle_and_negotiating_clients_returns() {
    let mut server = TestServer::start(one_disk(MIB));
    let (_idle, _, _) = RawClient::go(&server.socket, "disk", true);
    let _greeted = RawClient::connect(&server.socket);
    let backend: Arc<MemoryBackend> = server.backend.clone();
    let started = Instant::now();
    server.shutdown();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(backend.writes.load(Ordering::SeqCst), 0);
}

#[test]
fn tcp_listener_serves_the_same_protocol() {
    let backend = Arc::new(one_disk(MIB));
    let server = Server::bind_tcp("127.0.0.1:0", ServerOptions::default()).unwrap();
    let ListenAddr::Tcp(addr) = server.addr().clone() else {
        panic!("a TCP address")
    };
    assert_ne!(addr.port(), 0);
    let handle = server.serve(backend.clone()).unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = [0; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&3u32.to_be_bytes()).unwrap();
    let mut option = b"IHAVEOPT".to_vec();
    option.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
    option.extend_from_slice(&4u32.to_be_bytes());
    option.extend_from_slice(b"disk");
    stream.write_all(&option).unwrap();
    let mut export = [0; 10];
    stream.read_exact(&mut export).unwrap();
    assert_eq!(&export[..8], &(MIB as u64).to_be_bytes());
    handle.shutdown();
}

#[test]
fn a_client_that_stops_reading_replies_stalls_only_itself_then_is_dropped() {
    let options = ServerOptions {
        reply_timeout: Duration::from_secs(3),
        ..ServerOptions::default()
    };
    let server = TestServer::start_with(one_disk(4 * MIB), options);
    // 64 reads of 1 MiB whose replies are never read: the socket fills and
    // the connection's loop waits for it.
    let (mut stalled, _, _) = RawClient::go(&server.socket, "disk", false);
    for cookie in 0..64 {
        stalled.read(cookie, 0, MIB as u32);
    }
    std::thread::sleep(Duration::from_millis(300));

    // Every other connection is still served, promptly.
    let (mut client, _, _) = RawClient::go(&server.socket, "disk", false);
    let started = Instant::now();
    for round in 0..20u64 {
        client.write(round, round * 4096, &[round as u8; 4096]);
        assert_eq!(client.expect_simple(round), 0);
        client.read(round, round * 4096, 4096);
        assert_eq!(client.expect_simple(round), 0);
        assert_eq!(client.read_bytes(4096), vec![round as u8; 4096]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served in {:?} beside a stalled client",
        started.elapsed()
    );

    // After the reply timeout the stalled client is dropped: what was
    // written before arrives, then EOF.
    std::thread::sleep(Duration::from_secs(4));
    assert!(stalled.closed_by_server());
    client.read(99, 0, 4096);
    assert_eq!(client.expect_simple(99), 0);
}

#[test]
fn a_refusal_right_before_disconnect_still_gets_its_reply() {
    let mut backend = one_disk(MIB);
    backend.write_delay = Duration::from_millis(50);
    let server = TestServer::start(backend);
    let (mut client, _, _) = RawClient::go(&server.socket, "disk", false);
    // Slow writes keep workers busy sending replies while the refusal and
    // the disconnect arrive.
    for cookie in 0..4u64 {
        client.write(cookie, cookie * 512, &[7; 512]);
    }
    client.request(99, CommandFlags::empty(), 42, 0, 512, &[]);
    client.request(
        CommandType::Disc.code(),
        CommandFlags::empty(),
        43,
        0,
        0,
        &[],
    );
    let mut replies = Vec::new();
    for _ in 0..5 {
        let Reply::Simple { error, cookie } = client.read_reply() else {
            panic!("simple replies")
        };
        replies.push((cookie, error));
    }
    replies.sort_unstable();
    assert_eq!(replies, vec![(0, 0), (1, 0), (2, 0), (3, 0), (42, EINVAL)]);
    assert!(client.closed_by_server());
}

#[test]
fn an_adopted_connection_is_served_without_a_handshake_and_stopped_with_the_server() {
    let mut server = TestServer::start(MemoryBackend::new(&[("a", MIB), ("b", 2 * MIB)], false));
    let (ours, theirs) = UnixStream::pair().unwrap();
    let adopted = server.handle().adopt(ours, "b").unwrap();
    // What the kernel is told instead of a handshake: the export's size and
    // the flags of a connection without structured replies.
    assert_eq!(adopted.export.name, "b");
    assert_eq!(adopted.export.size, 2 * MIB as u64);
    let flags = adopted.export.flags;
    assert!(flags.contains(TransmissionFlags::HAS_FLAGS | TransmissionFlags::SEND_FLUSH));
    assert!(flags.contains(TransmissionFlags::SEND_FUA | TransmissionFlags::SEND_TRIM));
    assert!(
        !flags.contains(TransmissionFlags::SEND_DF),
        "DF needs structured replies"
    );

    // The first bytes on the socket are a request, answered simply.
    theirs
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut client = RawClient { stream: theirs };
    let data = pseudo_random(8 * KIB, 7);
    client.write(1, 4 * KIB as u64, &data);
    assert_eq!(client.expect_simple(1), 0);
    client.read(2, 4 * KIB as u64, data.len() as u32);
    assert_eq!(client.expect_simple(2), 0);
    assert_eq!(client.read_bytes(data.len()), data);
    assert_eq!(server.backend.snapshot(1)[4 * KIB..12 * KIB], data[..]);
    assert!(
        server.backend.snapshot(0).iter().all(|&b| b == 0),
        "export a untouched"
    );
    assert!(matches!(
        adopted.ended.try_recv(),
        Err(std::sync::mpsc::TryRecvError::Empty)
    ));

    // An unknown export is refused; shutdown ends the adopted connection.
    let (spare, _) = UnixStream::pair().unwrap();
    let error = server.handle().adopt(spare, "nope").unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound);
    server.shutdown();
    assert_eq!(
        adopted.ended.recv_timeout(Duration::from_secs(10)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected),
        "the adopted connection ended with the server"
    );
    assert!(client.closed_by_server());
}
