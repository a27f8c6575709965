//! Trust and transport: the receiver CA, host certificates, mutual-TLS QUIC endpoints.
//!
//! - [`pki`]: the receiver's small CA, host enrolment (request → sign), and
//!   loading certificates and keys from PEM files.
//! - [`renew`]: renewing a host certificate over the authenticated
//!   connection before it expires.
//! - [`rotate`]: rotating the receiver's CA while hosts move to the new
//!   one as they renew.
//! - [`tls`]: quinn client and server configurations with mutual TLS against
//!   that CA only, and the authenticated host name of a connection's peer.
//! - [`endpoint`]: the shared transport tuning and endpoint constructors that
//!   size the UDP socket buffers.
//!
//! Only the *ring* crypto provider is compiled and used.

pub mod endpoint;
pub mod pki;
pub mod renew;
pub mod role;
pub mod rotate;
pub mod tls;

pub use endpoint::{
    client_endpoint, server_endpoint, transport_config, transport_config_with, SocketBuffers,
};
pub use pki::{host_request, init_receiver, sign_host, PkiError};
pub use tls::{client_config, peer_host, server_config, ALPN};
