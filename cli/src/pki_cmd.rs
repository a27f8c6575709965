//! `tidemark receiver init|sign` and `tidemark host request`: setting up the
//! trust between protected hosts and the receiver (see `tidemark_net::pki`).

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_names::Name;
use tidemark_net::pki;

/// Run and administer the receiver (replica site).
#[derive(Debug, Subcommand)]
pub(crate) enum ReceiverCommand {
    /// Failback, step one: make a new replica of a host from existing disk
    /// images (the original primary's disks), to be compared block by
    /// block with the host's disks when its shipper connects.
    Adopt(crate::points_cmd::AdoptArgs),
    /// Create the receiver's CA and server certificate in --pki-dir.
    Init(InitArgs),
    /// Issue a client certificate for a protected host from its request.
    Sign(SignArgs),
    /// Accept shippers over QUIC and apply their logs to the replicas
    /// (runs until SIGTERM).
    Serve(crate::replication_cmd::ReceiverServeArgs),
}

/// Work on the protected host.
#[derive(Debug, Subcommand)]
pub(crate) enum HostCommand {
    /// Create this host's key and a certificate signing request.
    Request(RequestArgs),
}

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// Directory for ca.crt, ca.key, receiver.crt, receiver.key (created, mode 0700).
    #[arg(long)]
    pki_dir: PathBuf,
    /// The name shippers dial; it goes into the receiver certificate's SAN.
    #[arg(long, default_value = pki::DEFAULT_SERVER_NAME)]
    server_name: Name,
}

#[derive(Debug, Args)]
pub(crate) struct SignArgs {
    /// The receiver's PKI directory (from `tidemark receiver init`).
    #[arg(long)]
    pki_dir: PathBuf,
    /// The host you mean to enrol; the request must name exactly this host.
    #[arg(long)]
    host: Name,
    /// The host's request (host.csr from `tidemark host request`).
    #[arg(long)]
    csr: PathBuf,
    /// Where to write the host certificate (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Validity of the certificate in days.
    #[arg(long, default_value_t = pki::DEFAULT_HOST_VALIDITY_DAYS)]
    days: u32,
}

#[derive(Debug, Args)]
pub(crate) struct RequestArgs {
    /// This host's name, as the receiver will know it: 1 to 64 bytes of
    /// lower-case letters, digits, '.', '_' and '-'.
    #[arg(long)]
    host: Name,
    /// Directory for host.key and host.csr (created, mode 0700).
    #[arg(long)]
    pki_dir: PathBuf,
}

pub(crate) fn run_receiver(cmd: ReceiverCommand) -> Result<ExitCode> {
    match cmd {
        ReceiverCommand::Serve(a) => crate::replication_cmd::receiver_serve(a),
        ReceiverCommand::Adopt(a) => crate::points_cmd::adopt(a),
        ReceiverCommand::Init(a) => {
            let created = pki::init_receiver(&a.pki_dir, &a.server_name)?;
            println!(
                "created {} ({})",
                created.ca_cert.display(),
                created.ca_name
            );
            println!("created {}", created.ca_key.display());
            println!(
                "created {} (server name {})",
                created.server_cert.display(),
                created.server_name
            );
            println!("created {}", created.server_key.display());
            println!("keep ca.key secret; hosts need ca.crt");
            Ok(ExitCode::SUCCESS)
        }
        ReceiverCommand::Sign(a) => {
            let csr = std::fs::read_to_string(&a.csr)
                .with_context(|| format!("reading {}", a.csr.display()))?;
            let cert = pki::sign_host(&a.pki_dir, &csr, &a.host, a.days)?;
            pki::write_new_file(&a.out, cert.as_bytes(), 0o644)?;
            println!("signed {} for {} days: {}", a.host, a.days, a.out.display());
            println!(
                "copy {} and {} to the host's PKI directory (as {} and {})",
                a.out.display(),
                a.pki_dir.join(pki::CA_CERT_FILE).display(),
                pki::HOST_CERT_FILE,
                pki::CA_CERT_FILE
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

pub(crate) fn run_host(cmd: HostCommand) -> Result<ExitCode> {
    match cmd {
        HostCommand::Request(a) => {
            let request = pki::host_request(&a.pki_dir, &a.host)?;
            println!("created {}", request.key.display());
            println!("created {}", request.csr.display());
            println!("next:");
            println!("  1. copy {} to the receiver", request.csr.display());
            println!(
                "  2. there, run: tidemark receiver sign --pki-dir DIR --host {} --csr {} --out {}",
                request.host,
                pki::HOST_CSR_FILE,
                pki::HOST_CERT_FILE
            );
            println!(
                "  3. copy {} and the receiver's {} back into {}",
                pki::HOST_CERT_FILE,
                pki::CA_CERT_FILE,
                a.pki_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
