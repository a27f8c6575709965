//! One bidirectional stream over loopback with mutual TLS: quinn's default
//! transport and sockets against Tidemark's tuning, one setting at a time.
//!
//! `cargo bench -p tidemark-net --bench quic` (bytes per run:
//! `TIDEMARK_BENCH_BYTES`, default 1 GiB). Both ends share the machine's
//! cores, so figures are a floor for a real link, and loopback has no delay:
//! window sizes matter on long paths, which this cannot show.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use tidemark_net::{endpoint, pki, tls};

const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    tuned_transport: bool,
    tuned_sockets: bool,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        name: "quinn defaults",
        tuned_transport: false,
        tuned_sockets: false,
    },
    Variant {
        name: "tuned windows only",
        tuned_transport: true,
        tuned_sockets: false,
    },
    Variant {
        name: "tuned UDP buffers only",
        tuned_transport: false,
        tuned_sockets: true,
    },
    Variant {
        name: "tidemark (both)",
        tuned_transport: true,
        tuned_sockets: true,
    },
];

struct Files {
    ca: std::path::PathBuf,
    server_cert: std::path::PathBuf,
    server_key: std::path::PathBuf,
    host_cert: std::path::PathBuf,
    host_key: std::path::PathBuf,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bytes: u64 = match std::env::var("TIDEMARK_BENCH_BYTES") {
        Ok(v) => v.parse()?,
        Err(_) => 1 << 30,
    };
    let tmp = tempfile::tempdir()?;
    let server_name = tidemark_names::Name::from_static(pki::DEFAULT_SERVER_NAME);
    let host = tidemark_names::Name::from_static("bench-host");
    let receiver = pki::init_receiver(&tmp.path().join("r"), &server_name)?;
    let request = pki::host_request(&tmp.path().join("h"), &host)?;
    let cert = pki::sign_host(&receiver.dir, &request.csr_pem, &host, 1)?;
    let host_cert = tmp.path().join("h").join(pki::HOST_CERT_FILE);
    pki::write_new_file(&host_cert, cert.as_bytes(), 0o644)?;
    let files = Files {
        ca: receiver.ca_cert,
        server_cert: receiver.server_cert,
        server_key: receiver.server_key,
        host_cert,
        host_key: request.key,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!("one stream, {} MiB over loopback, mutual TLS", bytes >> 20);
    let mut results = Vec::new();
    for variant in VARIANTS {
        let rate = runtime.block_on(run(&files, variant, bytes))?;
        println!("{:<24} {:>8.0} MB/s", variant.name, rate);
        results.push(rate);
    }
    println!(
        "ratio tidemark / quinn defaults: {:.2}",
        results[3] / results[0]
    );
    Ok(())
}

async fn run(
    files: &Files,
    variant: Variant,
    bytes: u64,
) -> Result<f64, Box<dyn std::error::Error>> {
    let mut server_config = tls::server_config(&files.ca, &files.server_cert, &files.server_key)?;
    let mut client_config = tls::client_config(&files.ca, &files.host_cert, &files.host_key)?;
    if !variant.tuned_transport {
        server_config.transport_config(Arc::new(quinn::TransportConfig::default()));
        client_config.transport_config(Arc::new(quinn::TransportConfig::default()));
    }
    let any: SocketAddr = "127.0.0.1:0".parse()?;
    let (server, client) = if variant.tuned_sockets {
        let (server, granted) = endpoint::server_endpoint(any, server_config)?;
        let (client, _) = endpoint::client_endpoint(any)?;
        // Linux reports twice what is usable (see `SocketBuffers`).
        eprintln!(
            "  UDP buffers: requested {} KiB, usable rcv {} KiB snd {} KiB",
            granted.requested >> 10,
            granted.receive >> 11,
            granted.send >> 11
        );
        (server, client)
    } else {
        (
            quinn::Endpoint::server(server_config, any)?,
            quinn::Endpoint::client(any)?,
        )
    };
    let addr = server.local_addr()?;

    let sink = tokio::spawn(async move {
        let conn = server.accept().await.ok_or("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut received = 0u64;
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
            received += chunk.bytes.len() as u64;
        }
        send.write_all(&received.to_le_bytes()).await?;
        send.finish()?;
        conn.closed().await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(received)
    });

    let conn = client
        .connect_with(client_config, addr, pki::DEFAULT_SERVER_NAME)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let data = bytes_of(CHUNK);
    let start = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        send.write_all(&data[..n]).await?;
        sent += n as u64;
    }
    send.finish()?;
    let ack = recv.read_to_end(8).await?;
    let elapsed = start.elapsed();
    let acked = u64::from_le_bytes(ack.as_slice().try_into()?);
    if acked != bytes {
        return Err(format!("the receiver counted {acked} bytes, {bytes} were sent").into());
    }
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(Duration::from_secs(5), sink).await;
    client.wait_idle().await;
    Ok(bytes as f64 / elapsed.as_secs_f64() / 1e6)
}

fn bytes_of(len: usize) -> Vec<u8> {
    // Pseudo-random, so nothing on the path can shortcut on zeroes.
    let mut out = vec![0; len];
    SmallRng::seed_from_u64(1).fill_bytes(&mut out);
    out
}
