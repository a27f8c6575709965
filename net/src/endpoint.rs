//! QUIC endpoints and the transport tuning both ends share.
//!
//! quinn's defaults are sized for a 100 ms, 100 Mbit/s path (1.25 MB stream
//! window); replication links are often faster and further. The windows
//! below cover a 1 Gbit/s × 100 ms bandwidth-delay product, and the UDP
//! socket buffers are raised so that bursts are not dropped by the kernel
//! before quinn reads them. `net/benches/quic.rs` measures both against
//! quinn's defaults.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Per-stream receive window: one stream carries a host's record stream, so
/// this bounds a single shipper's throughput at `window / RTT`
/// (16 MiB / 100 ms ≈ 1.3 Gbit/s).
pub const STREAM_RECEIVE_WINDOW: u32 = 16 << 20;
/// Connection-wide receive window (all streams of one host): bounds the
/// receiver's buffered memory per connection.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 32 << 20;
/// Bytes a sender may have unacknowledged across all streams.
pub const SEND_WINDOW: u64 = 32 << 20;
/// Keep-alive interval by default: keeps NAT and firewall state alive and
/// lets a peer that hears nothing tell a dead connection from a quiet one
/// (the `keep-alive` of the `[shipper.liveness]` / `[receiver.liveness]`
/// tables, which override it).
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);
/// By default, a connection with no traffic from the peer (not even
/// keep-alives) for this long is dead: a killed, frozen or unreachable
/// peer is noticed within it (the tables' `peer-timeout`). Four keep-alive
/// intervals: with one packet in three lost, a live link still gets
/// several packets through in every window.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// UDP socket buffer size requested for each direction. Linux caps it at
/// `net.core.rmem_max` / `net.core.wmem_max`.
pub const UDP_BUFFER_BYTES: usize = 8 << 20;

/// Why an endpoint could not be created (local: address in use, no
/// permission, not inside a Tokio runtime).
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Creating, configuring or binding the UDP socket failed.
    #[error("{what} (UDP {addr})")]
    Socket {
        /// What was being done.
        what: &'static str,
        /// The local address.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Endpoints run their I/O on the current Tokio runtime; there is none.
    #[error("QUIC endpoints must be created inside a Tokio runtime")]
    NoRuntime,
}

/// The UDP socket buffer sizes the kernel granted, as `getsockopt` reports
/// them. Linux reports twice the usable size (it counts its bookkeeping), so
/// a request is met in full when the reported size is at least twice it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// Bytes requested for each direction ([`UDP_BUFFER_BYTES`]).
    pub requested: usize,
    /// `SO_RCVBUF` after the request.
    pub receive: usize,
    /// `SO_SNDBUF` after the request.
    pub send: usize,
}

impl SocketBuffers {
    /// Whether the kernel granted less than requested in either direction
    /// (raise `net.core.rmem_max` / `net.core.wmem_max`).
    pub fn capped(&self) -> bool {
        self.receive / 2 < self.requested || self.send / 2 < self.requested
    }
}

/// The transport parameters both ends use: the windows above, keep-alive
/// [`KEEP_ALIVE`] and idle timeout [`IDLE_TIMEOUT`]. Everything else is
/// quinn's default (Cubic, GSO on, MTU discovery on).
pub fn transport_config() -> quinn::TransportConfig {
    transport_config_with(KEEP_ALIVE, IDLE_TIMEOUT)
}

/// [`transport_config`] with the keep-alive interval and the idle timeout
/// configured (the two ends agree on the shorter idle timeout). An idle
/// timeout beyond QUIC's range (2^62 ms) is taken as that maximum.
pub fn transport_config_with(
    keep_alive: Duration,
    idle_timeout: Duration,
) -> quinn::TransportConfig {
    let mut config = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(idle_timeout)
        .unwrap_or_else(|_| quinn::IdleTimeout::from(quinn::VarInt::MAX));
    config
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(idle));
    config
}

/// A QUIC server endpoint bound to `addr` with enlarged UDP buffers. Must be
/// called inside a Tokio runtime.
pub fn server_endpoint(
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<(quinn::Endpoint, SocketBuffers), EndpointError> {
    endpoint(addr, Some(config))
}

/// A QUIC client endpoint bound to `bind_addr` (usually `0.0.0.0:0` or
/// `[::]:0`) with enlarged UDP buffers; connect with
/// `endpoint.connect_with(client_config, receiver_addr, server_name)`. Must
/// be called inside a Tokio runtime.
pub fn client_endpoint(
    bind_addr: SocketAddr,
) -> Result<(quinn::Endpoint, SocketBuffers), EndpointError> {
    endpoint(bind_addr, None)
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> Result<(quinn::Endpoint, SocketBuffers), EndpointError> {
    use socket2::{Domain, Protocol, Socket, Type};
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(EndpointError::NoRuntime);
    }
    let failed = |what| move |source| EndpointError::Socket { what, addr, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(failed("creating the socket"))?;
    // A smaller buffer than asked for is not an error: the kernel caps the
    // request at its limit and we report what we got.
    socket
        .set_recv_buffer_size(UDP_BUFFER_BYTES)
        .map_err(failed("setting SO_RCVBUF"))?;
    socket
        .set_send_buffer_size(UDP_BUFFER_BYTES)
        .map_err(failed("setting SO_SNDBUF"))?;
    let buffers = SocketBuffers {
        requested: UDP_BUFFER_BYTES,
        receive: socket
            .recv_buffer_size()
            .map_err(failed("reading SO_RCVBUF"))?,
        send: socket
            .send_buffer_size()
            .map_err(failed("reading SO_SNDBUF"))?,
    };
    if buffers.capped() {
        tracing::warn!(
            requested = buffers.requested,
            receive = buffers.receive,
            send = buffers.send,
            "the kernel granted smaller UDP buffers than requested; \
             raise net.core.rmem_max and net.core.wmem_max for full throughput"
        );
    }
    socket.bind(&addr.into()).map_err(failed("binding"))?;
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(failed("starting the QUIC endpoint"))?;
    Ok((endpoint, buffers))
}
