//! The receiver's side of certificate renewal (`tidemark_net::renew`): a
//! host that asks on a stream of its own gets a new certificate for the
//! name it authenticated with, signed by the receiver's CA, with the CA
//! certificates the receiver trusts.

use std::time::Duration;

use tidemark_names::Name;
use tidemark_net::renew::RenewalSigner;
use tidemark_wire::{Compression, Message, Renewed};

/// Answers a renewal request on `send` and ends the stream. The request is
/// refused (and the host keeps its certificate) when it names another host
/// or the CA cannot sign; the reason goes to the host and to the log.
pub(crate) async fn answer(
    signer: &RenewalSigner,
    host: &Name,
    version: u16,
    csr: &str,
    send: &mut quinn::SendStream,
) -> Result<(), quinn::WriteError> {
    let signed = tokio::task::block_in_place(|| signer.sign(host, csr));
    let reply = match signed {
        Ok(renewal) => {
            tracing::info!(%host, days = signer.days, "renewed the host's certificate");
            Renewed::Issued {
                certificate: renewal.certificate,
                ca_bundle: renewal.ca_bundle,
            }
        }
        Err(e) => {
            let reason = crate::daemon::error_chain(&e);
            tracing::warn!(%host, error = %reason, "refusing to renew the host's certificate");
            let mut end = reason.len().min(tidemark_wire::message::MAX_RENEW_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            Renewed::Refused {
                reason: reason[..end].to_string(),
            }
        }
    };
    // In the version the request came in: the shipper reads it.
    let frame = match Message::Renewed(reply).encode(version, Compression::None) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(%host, error = %e, "cannot encode the renewal answer");
            let refused = Message::Renewed(Renewed::Refused {
                reason: format!("the receiver cannot send the certificate: {e}"),
            });
            match refused.encode(version, Compression::None) {
                Ok(f) => f,
                Err(_) => return Ok(()),
            }
        }
    };
    send.write_all(&frame).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Ok(())
}

/// Where the receiver keeps the certificate each host last connected
/// with (DER, `<host>.der`): a name never starts with a dot, so the
/// directory is never taken for a host's.
pub const CERTIFICATES_DIR: &str = ".certificates";

/// Keeps the certificate `conn`'s peer authenticated with as the one
/// `host` holds, so that retiring a CA can tell which hosts still need
/// it. A failure is logged: it must not refuse the host.
pub(crate) fn record_certificate(
    data_dir: &std::path::Path,
    host: &Name,
    conn: &quinn::Connection,
) {
    let Some(der) = conn
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().cloned())
    else {
        return;
    };
    let dir = data_dir.join(CERTIFICATES_DIR);
    let written = tokio::task::block_in_place(|| {
        tidemark_durable::create_private_dir_all(&dir)?;
        let name = format!("{host}.der");
        tidemark_durable::replace(
            &tidemark_durable::FsDir::at(&dir),
            &format!("{name}.new"),
            &name,
            der.as_ref(),
            tidemark_durable::Durability::Durable,
        )
        .map_err(std::io::Error::from)
    });
    if let Err(e) = written {
        tracing::warn!(%host, error = %e, "cannot record the host's certificate (CA retirement cannot see it)");
    }
}
