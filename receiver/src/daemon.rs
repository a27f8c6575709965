//! The receiver daemon: a QUIC server (mutual TLS, clients only from the
//! receiver's CA) that files each authenticated host's replicas under
//! `data-dir/<host>/<group>/` and runs the protocol session
//! ([`tidemark_wire::receiver`]) against that group's store. A host can only
//! ever name its own directory: the host part comes from its certificate,
//! never from what it sends.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tidemark_config::ReceiverConfig;
use tidemark_wire::{
    ErrorClass, ErrorCode, ExpectHello, Message, MessageDecoder, ReceiverConfig as SessionConfig,
    ReceiverError,
};
use tokio::sync::watch;

use crate::replica::StoreReplica;
use crate::store::ReplicaGroup;

/// Why the receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverFatal {
    /// Certificates, address or data directory.
    #[error("{0}")]
    Setup(String),
}

type GroupKey = (String, String);
type Groups = Arc<Mutex<HashMap<GroupKey, Arc<Mutex<StoreReplica>>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory of a host's group under `data_dir`.
pub fn group_dir(data_dir: &Path, host: &str, group: &str) -> PathBuf {
    data_dir.join(host).join(group)
}

/// A consistency-group name a shipper may use: it becomes a directory name.
pub fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

struct Server {
    data_dir: PathBuf,
    revoked: HashSet<String>,
    groups: Groups,
}

/// Runs the receiver until `stop` turns true; `ready` gets the bound
/// address once connections are accepted. Must run inside a multi-threaded
/// Tokio runtime.
pub async fn run(
    cfg: ReceiverConfig,
    mut stop: watch::Receiver<bool>,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ReceiverFatal> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| {
        ReceiverFatal::Setup(format!("data directory {}: {e}", cfg.data_dir.display()))
    })?;
    let server_cfg = tidemark_net::server_config(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)
        .map_err(|e| ReceiverFatal::Setup(format!("TLS: {e}")))?;
    let (endpoint, _buffers) = tidemark_net::server_endpoint(cfg.listen, server_cfg)
        .map_err(|e| ReceiverFatal::Setup(format!("listening on {}: {e}", cfg.listen)))?;
    let addr = endpoint
        .local_addr()
        .map_err(|e| ReceiverFatal::Setup(format!("listening on {}: {e}", cfg.listen)))?;
    let server = Arc::new(Server {
        data_dir: cfg.data_dir.clone(),
        revoked: cfg
            .hosts
            .iter()
            .filter(|h| h.revoked)
            .map(|h| h.name.clone())
            .collect(),
        groups: Arc::new(Mutex::new(HashMap::new())),
    });
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "receiver listening");
    ready(addr);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let server = server.clone();
                tokio::spawn(async move {
                    match incoming.await {
                        Ok(conn) => server.serve(conn).await,
                        Err(e) => tracing::info!(error = %e, "handshake failed"),
                    }
                });
            }
            _ = stop.changed() => {
                if *stop.borrow() {
                    break;
                }
            }
        }
    }
    endpoint.close(0u32.into(), b"receiver stopping");
    endpoint.wait_idle().await;
    tracing::info!("receiver stopped");
    Ok(())
}

/// Close codes of refused connections.
const CLOSE_REVOKED: u32 = 1;
const CLOSE_BAD_IDENTITY: u32 = 2;

impl Server {
    async fn serve(&self, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let host = match tidemark_net::peer_host(&conn) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%remote, error = %e, "refusing a peer without a usable host identity");
                conn.close(CLOSE_BAD_IDENTITY.into(), b"no usable host identity");
                return;
            }
        };
        if tidemark_net::pki::validate_host_name(&host).is_err() {
            tracing::warn!(%remote, %host, "refusing a certificate whose host name is not a valid directory name");
            conn.close(CLOSE_BAD_IDENTITY.into(), b"invalid host name");
            return;
        }
        if self.revoked.contains(&host) {
            tracing::warn!(%remote, %host, "refusing a revoked host");
            conn.close(CLOSE_REVOKED.into(), b"host revoked");
            return;
        }
        tracing::info!(%remote, %host, "host connected");
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::info!(%host, reason = %e, "connection ended");
                    return;
                }
            };
            if let Err(e) = self.session(&host, send, recv).await {
                tracing::warn!(%host, error = %e, "session ended");
            }
        }
    }

    /// Opens (or finds open) the store of a host's group.
    fn group(&self, host: &str, group: &str) -> Result<Arc<Mutex<StoreReplica>>, ReceiverError> {
        let key = (host.to_string(), group.to_string());
        let mut groups = lock(&self.groups);
        if let Some(g) = groups.get(&key) {
            if !lock(g).is_poisoned() {
                return Ok(g.clone());
            }
            // Dropped first so its lock file is released before reopening.
            groups.remove(&key);
        }
        let dir = group_dir(&self.data_dir, host, group);
        let opened = tokio::task::block_in_place(|| ReplicaGroup::open(&dir)).map_err(|e| {
            let (class, code) = crate::replica::classify(&e);
            ReceiverError::Peer {
                class,
                code,
                message: format!("opening the replica of {host}/{group}: {e}"),
            }
        })?;
        let g = Arc::new(Mutex::new(StoreReplica::new(opened)));
        groups.insert(key, g.clone());
        Ok(g)
    }

    async fn session(
        &self,
        host: &str,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), String> {
        let mut decoder = MessageDecoder::new();
        let mut buf = vec![0u8; 256 << 10];
        // The Hello.
        let hello = loop {
            match decoder.next_message() {
                Ok(Some(m)) => break m,
                Ok(None) => {}
                Err(e) => {
                    let err = ReceiverError::from_decode(&e);
                    return refuse(&mut send, err).await;
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(30), recv.read(&mut buf))
                .await
                .map_err(|_| "no hello within 30 s".to_string())?
                .map_err(|e| e.to_string())?
                .ok_or("the stream ended before the hello")?;
            decoder.feed(&buf[..n]);
        };
        let group_name = match &hello {
            Message::Hello { group, .. } => group.clone(),
            _ => String::new(),
        };
        if !valid_group_name(&group_name) {
            let err = ReceiverError::Peer {
                class: ErrorClass::Permanent,
                code: ErrorCode::Protocol,
                message: format!(
                    "consistency group name {group_name:?} must be 1-64 letters, digits, '-', '_' or '.'"
                ),
            };
            return refuse(&mut send, err).await;
        }
        let replica = match self.group(host, &group_name) {
            Ok(r) => r,
            Err(e) => return refuse(&mut send, e).await,
        };
        let session = ExpectHello::new(SessionConfig::new(host));
        let started =
            tokio::task::block_in_place(|| session.handle_message(hello, &mut *lock(&replica)));
        let (mut receiving, welcome) = match started {
            Ok(x) => x,
            Err(e) => return refuse(&mut send, e).await,
        };
        send.write_all(&welcome).await.map_err(|e| e.to_string())?;
        tracing::info!(%host, group = %group_name, "session started");
        loop {
            // Apply every complete message, then commit and acknowledge
            // once nothing more is buffered.
            loop {
                let msg = match decoder.next_message() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => return refuse(&mut send, ReceiverError::from_decode(&e)).await,
                };
                let out = tokio::task::block_in_place(|| {
                    receiving.handle_message(msg, &mut *lock(&replica))
                });
                match out {
                    Ok(frames) => {
                        for f in frames {
                            send.write_all(&f).await.map_err(|e| e.to_string())?;
                        }
                    }
                    Err(e) => return refuse(&mut send, e).await,
                }
            }
            let idle = tokio::task::block_in_place(|| receiving.handle_idle(&mut *lock(&replica)));
            match idle {
                Ok(frames) => {
                    for f in frames {
                        send.write_all(&f).await.map_err(|e| e.to_string())?;
                    }
                }
                Err(e) => return refuse(&mut send, e).await,
            }
            match recv.read(&mut buf).await {
                Ok(Some(n)) => decoder.feed(&buf[..n]),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
}

/// Sends the error to the shipper and ends the session.
async fn refuse(send: &mut quinn::SendStream, err: ReceiverError) -> Result<(), String> {
    if let Some(msg) = err.to_message() {
        if let Ok(frame) = msg.encode(tidemark_wire::Compression::None) {
            let _ = send.write_all(&frame).await;
        }
    }
    let _ = send.finish();
    // Give the frame a moment to leave before the stream is dropped.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Err(err.to_string())
}
