//! `tidemark host request`: this protected host's key and certificate
//! request, the host's half of enrolling with a receiver (see
//! `tidemark_net::pki`).

use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_names::Name;
use tidemark_net::pki;

/// Work on the protected host.
#[derive(Debug, Subcommand)]
pub(crate) enum HostCommand {
    /// Create this host's key and a certificate signing request.
    Request(RequestArgs),
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
