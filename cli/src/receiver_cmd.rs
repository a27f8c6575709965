//! `tidemark receiver init|sign|adopt|serve`: the receiver's CA and the
//! hosts' certificates (see `tidemark_net::pki`), adopting existing disks
//! as a replica (the same as `tidemark reprotect`), and running the
//! receiver.

use crate::daemon_args::{
    metrics_address, path_str, print_metrics_address, runtime, stop_on_signals, synthesize,
};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_config::ReceiverConfig;
use tidemark_names::Name;
use tidemark_net::pki;

/// Run and administer the receiver (replica site).
#[derive(Debug, Subcommand)]
pub(crate) enum ReceiverCommand {
    /// Failback, step one: make a new replica of a host from existing disk
    /// images (the original primary's disks), to be compared block by
    /// block with the host's disks when its shipper connects.
    Adopt(crate::reprotect_cmd::AdoptArgs),
    /// End a CA rotation: retire the old CA (refused while a host still
    /// holds one of its certificates, unless --force).
    CaRetire(CaRetireArgs),
    /// Start a CA rotation: a new CA beside the old one; hosts move to it
    /// as they renew.
    CaRotate(CaRotateArgs),
    /// Print the argon2id hash of a web console password read from
    /// standard input, for a `[[receiver.console.user]]` table.
    ConsolePassword,
    /// Create the receiver's CA and server certificate in --pki-dir.
    Init(InitArgs),
    /// Retire a host for good: refuse it from now on and remove its
    /// replicas and history, now or after --keep (the receiver must be
    /// stopped).
    Retire(RetireArgs),
    /// Issue a client certificate for a protected host from its request,
    /// or (--admin) a web console admin's, or (--console) the console's
    /// server certificate.
    Sign(SignArgs),
    /// Accept shippers over QUIC and apply their logs to the replicas
    /// (runs until SIGTERM).
    Serve(ReceiverServeArgs),
    /// Take a host off the list of retired hosts, so it can be enrolled
    /// again (the receiver must be stopped).
    Unretire(UnretireArgs),
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
#[command(group(clap::ArgGroup::new("who").required(true).args(["host", "admin", "console", "receiver"])))]
pub(crate) struct SignArgs {
    /// The receiver's PKI directory (from `tidemark receiver init`).
    #[arg(long)]
    pki_dir: PathBuf,
    /// The host you mean to enrol; the request must name exactly this host.
    #[arg(long, requires = "csr")]
    host: Option<Name>,
    /// The host's request (host.csr from `tidemark host request`).
    #[arg(long, requires = "host")]
    csr: Option<PathBuf>,
    /// Instead of a host: a web console admin of this name, with --role;
    /// the key is made here and written to --key-out. The certificate
    /// opens the console only, never replication.
    #[arg(long, requires_all = ["role", "key_out"])]
    admin: Option<Name>,
    /// The admin's console role: read-only or operator.
    #[arg(long, requires = "admin")]
    role: Option<tidemark_net::role::ConsoleRole>,
    /// Instead of a host: the web console's server certificate for this
    /// address (IP address or DNS name, as the browser is given it; it goes
    /// into the SAN); the key is made here and written to --key-out.
    #[arg(long, value_name = "ADDRESS", requires = "key_out")]
    console: Option<String>,
    /// Instead of a host: the server certificate of another receiver node
    /// of this site (several receivers on one Ceph store), for the name
    /// shippers dial (`server-name`, the one `receiver init` was given);
    /// the key is made here and written to --key-out.
    #[arg(long, value_name = "SERVER_NAME", requires = "key_out")]
    receiver: Option<Name>,
    /// Where to write the certificate (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// With --admin, --console or --receiver: where to write the new
    /// private key (must not exist; 0600).
    #[arg(long)]
    key_out: Option<PathBuf>,
    /// Validity of the certificate in days (default: 825 for a host or a
    /// receiver node, 397 for an admin or the console).
    #[arg(long)]
    days: Option<u32>,
}

#[derive(Debug, Args)]
pub(crate) struct RetireArgs {
    /// The receiver's data directory (the local store).
    #[arg(long, required_unless_present = "config", conflicts_with = "config")]
    data_dir: Option<PathBuf>,
    /// The receiver's configuration: its data directory and its store
    /// (with the Ceph store, the host's groups are removed from the
    /// cluster; refused while another receiver holds a group's lease).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The host to retire.
    #[arg(long)]
    host: Name,
    /// Keep its replicas this long ("30d"); the receiver removes them
    /// after. Without it they are removed now.
    #[arg(long, value_name = "DURATION")]
    keep: Option<tidemark_config::Duration>,
    /// Do not ask for confirmation (required when not on a terminal).
    #[arg(long)]
    yes: bool,
}

#[derive(Debug, Args)]
pub(crate) struct UnretireArgs {
    /// The receiver's data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The retired host.
    #[arg(long)]
    host: Name,
}

/// Takes the receiver's lock on `data_dir`: these commands change what a
/// running receiver reads and removes what it may have open.
fn receiver_stopped(data_dir: &std::path::Path) -> Result<tidemark_changelog::DirLock> {
    tidemark_changelog::DirLock::acquire(data_dir, tidemark_receiver::daemon::LOCK_FILE, "receiver")
        .map_err(|e| {
            anyhow::anyhow!(
            "{e}: stop the receiver first (systemctl stop tidemark-receiver), then start it again"
        )
        })
}

fn retire(a: RetireArgs) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let store = match (&a.config, &a.data_dir) {
        (Some(config), _) => crate::points_cmd::StoreArgs::of_config(config),
        (None, Some(dir)) => crate::points_cmd::StoreArgs::local(dir),
        (None, None) => bail!("give --data-dir or --config"),
    };
    let data_dir = store.receiver()?.data_dir;
    let _lock = receiver_stopped(&data_dir)?;
    let engine = store.engine()?;
    let groups = engine.groups(&a.host)?;
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "retiring {} cannot be undone for its replicas: give --yes",
                a.host
            );
        }
        let what = match a.keep {
            Some(k) => format!("kept for {k} then removed"),
            None => "removed now".to_string(),
        };
        print!(
            "retire {}: refused from now on; its replicas ({}) {what}. Type the host name to confirm: ",
            a.host,
            if groups.is_empty() { "none".to_string() } else { groups.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(", ") }
        );
        std::io::stdout().flush()?;
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if answer.trim() != a.host.as_str() {
            bail!("not confirmed; nothing changed");
        }
    }
    let now = i64::try_from(tidemark_changelog::now_ns() / 1_000_000_000).unwrap_or(0);
    let out = tidemark_receiver::retire::retire(
        &data_dir,
        engine.as_ref(),
        &a.host,
        a.keep.map(|k| k.get().as_secs()),
        now,
    )?;
    println!("{} is retired: the receiver refuses it", a.host);
    match out.remove_after_unix {
        Some(t) => println!(
            "its replicas ({} group(s)) are kept; the receiver removes them {} s from now",
            groups.len(),
            t - now
        ),
        None => println!("removed its replicas: {} group(s)", out.removed.len()),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Args)]
pub(crate) struct CaRotateArgs {
    /// The receiver's PKI directory (from `tidemark receiver init`).
    #[arg(long)]
    pki_dir: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct CaRetireArgs {
    /// The receiver's PKI directory.
    #[arg(long)]
    pki_dir: PathBuf,
    /// The receiver's data directory: the certificate each host last
    /// connected with is recorded there.
    #[arg(long)]
    data_dir: PathBuf,
    /// Retire the old CA even though the hosts named still hold its
    /// certificates (they are refused from then on).
    #[arg(long)]
    force: bool,
}

/// The hosts whose last certificate (recorded by the receiver in
/// `data_dir`) the CA certificate `ca` issued.
fn hosts_of_ca(
    data_dir: &std::path::Path,
    ca: &rustls_pki_types::CertificateDer<'_>,
) -> Result<Vec<String>> {
    let dir = data_dir.join(tidemark_receiver::renew::CERTIFICATES_DIR);
    let mut hosts = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(hosts),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(host) = name.strip_suffix(".der") else {
            continue;
        };
        let der = std::fs::read(entry.path())
            .with_context(|| format!("reading {}", entry.path().display()))?;
        if tidemark_net::rotate::issued_by(&rustls_pki_types::CertificateDer::from(der), ca) {
            hosts.push(host.to_string());
        }
    }
    hosts.sort();
    Ok(hosts)
}

pub(crate) fn run_receiver(cmd: ReceiverCommand) -> Result<ExitCode> {
    match cmd {
        ReceiverCommand::Retire(a) => retire(a),
        ReceiverCommand::Unretire(a) => {
            let _lock = receiver_stopped(&a.data_dir)?;
            tidemark_receiver::retire::unretire(&a.data_dir, &a.host)?;
            println!("{} is no longer retired: enrol it again", a.host);
            Ok(ExitCode::SUCCESS)
        }
        ReceiverCommand::CaRotate(a) => {
            let new = tidemark_net::rotate::introduce_ca(&a.pki_dir)?;
            println!(
                "new CA {} beside the old one in {}",
                new.ca_name,
                a.pki_dir.display()
            );
            println!("next:");
            println!("  1. restart the receiver: it then accepts hosts of either CA");
            println!("  2. hosts move to the new CA as they renew (or sign their host.csr again)");
            println!(
                "  3. then: tidemark receiver ca-retire --pki-dir {} --data-dir DIR",
                a.pki_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ReceiverCommand::CaRetire(a) => {
            let Some(old) = tidemark_net::rotate::retiring_ca(&a.pki_dir)? else {
                bail!("no CA rotation is in progress in {}", a.pki_dir.display());
            };
            let holding = hosts_of_ca(&a.data_dir, &old)?;
            if !holding.is_empty() && !a.force {
                bail!(
                    "these hosts still hold a certificate of the old CA: {}; let them renew (or sign their host.csr again), or give --force to refuse them",
                    holding.join(", ")
                );
            }
            tidemark_net::rotate::retire_ca(&a.pki_dir)?;
            if !holding.is_empty() {
                println!(
                    "forced: these hosts are refused until enrolled again: {}",
                    holding.join(", ")
                );
            }
            println!("the old CA is retired; the receiver certificate is the new CA's");
            println!("restart the receiver");
            Ok(ExitCode::SUCCESS)
        }
        ReceiverCommand::Serve(a) => receiver_serve(a),
        ReceiverCommand::ConsolePassword => {
            let mut password = String::new();
            std::io::stdin()
                .read_line(&mut password)
                .context("reading the password from standard input")?;
            let password = password.trim_end_matches(['\r', '\n']);
            if password.is_empty() {
                anyhow::bail!("the password is empty");
            }
            let hash = tidemark_console::hash_password(password)
                .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?;
            println!("{hash}");
            Ok(ExitCode::SUCCESS)
        }
        ReceiverCommand::Adopt(a) => crate::reprotect_cmd::adopt(a),
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
            let (Some(host), Some(csr)) = (&a.host, &a.csr) else {
                return sign_admin_or_console(a);
            };
            let days = a.days.unwrap_or(pki::DEFAULT_HOST_VALIDITY_DAYS);
            let csr = std::fs::read_to_string(csr)
                .with_context(|| format!("reading {}", csr.display()))?;
            let cert = pki::sign_host(&a.pki_dir, &csr, host, days)?;
            pki::write_new_file(&a.out, cert.as_bytes(), 0o644)?;
            println!("signed {host} for {days} days: {}", a.out.display());
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

/// `tidemark receiver sign --admin NAME --role ROLE`, `--console ADDRESS`
/// or `--receiver SERVER_NAME`: a certificate and a new key, both made
/// here.
fn sign_admin_or_console(a: SignArgs) -> Result<ExitCode> {
    let Some(key_out) = &a.key_out else {
        anyhow::bail!("give --key-out: where the new private key goes");
    };
    let (issued, what, days) = match (&a.admin, a.role, &a.console, &a.receiver) {
        (Some(name), Some(role), None, None) => {
            let days = a.days.unwrap_or(pki::DEFAULT_ADMIN_VALIDITY_DAYS);
            (
                pki::sign_admin(&a.pki_dir, name, role, days)?,
                format!("console admin {name} ({role})"),
                days,
            )
        }
        (None, None, Some(address), None) => {
            let days = a.days.unwrap_or(pki::DEFAULT_ADMIN_VALIDITY_DAYS);
            (
                pki::sign_console(&a.pki_dir, address, days)?,
                format!("the console at {address}"),
                days,
            )
        }
        (None, None, None, Some(server_name)) => {
            let days = a.days.unwrap_or(pki::DEFAULT_HOST_VALIDITY_DAYS);
            (
                pki::sign_receiver(&a.pki_dir, server_name, days)?,
                format!("a receiver node answering to {server_name}"),
                days,
            )
        }
        _ => anyhow::bail!("give --admin with --role, --console, or --receiver"),
    };
    pki::write_new_file(key_out, issued.key_pem.as_bytes(), 0o600)?;
    pki::write_new_file(&a.out, issued.cert_pem.as_bytes(), 0o644)?;
    println!(
        "signed {what} for {days} days: {} (key {})",
        a.out.display(),
        key_out.display()
    );
    if a.admin.is_some() {
        println!(
            "for a browser: openssl pkcs12 -export -in {} -inkey {} -out admin.p12, then import admin.p12 and trust {}",
            a.out.display(),
            key_out.display(),
            a.pki_dir.join(pki::CA_CERT_FILE).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `tidemark receiver serve`.
#[derive(Debug, Args)]
pub(crate) struct ReceiverServeArgs {
    /// A config file with a `[receiver]` table. Alternatively give
    /// --listen, --data-dir and --pki-dir.
    #[arg(long, conflicts_with_all = ["listen", "data_dir", "pki_dir"])]
    config: Option<PathBuf>,
    /// UDP address for QUIC ("0.0.0.0:7480"; port 0 picks one, printed).
    #[arg(long, requires_all = ["data_dir", "pki_dir"])]
    listen: Option<String>,
    /// Where replicas live (one directory per host and group).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory written by `tidemark receiver init`.
    #[arg(long)]
    pki_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (port 0 picks one;
    /// the address is printed). Overrides `metrics-listen` of a config
    /// file; without either, the one-line form serves no metrics.
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

fn receiver_config(a: &ReceiverServeArgs) -> Result<ReceiverConfig> {
    let loaded = match &a.config {
        Some(path) => tidemark_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => {
            let (Some(listen), Some(data_dir), Some(pki)) = (&a.listen, &a.data_dir, &a.pki_dir)
            else {
                bail!("give --config FILE, or --listen, --data-dir and --pki-dir");
            };
            let mut t = toml::Table::new();
            t.insert("listen".into(), toml::Value::String(listen.clone()));
            t.insert("data-dir".into(), path_str(data_dir));
            t.insert(
                "control-socket".into(),
                path_str(&data_dir.join("receiver.ctl")),
            );
            let mut tls = toml::Table::new();
            tls.insert("ca".into(), path_str(&pki.join("ca.crt")));
            tls.insert("ca-key".into(), path_str(&pki.join("ca.key")));
            tls.insert("cert".into(), path_str(&pki.join("receiver.crt")));
            tls.insert("key".into(), path_str(&pki.join("receiver.key")));
            t.insert("tls".into(), toml::Value::Table(tls));
            synthesize("receiver", t)?
        }
    };
    loaded
        .receiver
        .context("the configuration has no [receiver] table")
}

pub(crate) fn receiver_serve(a: ReceiverServeArgs) -> Result<ExitCode> {
    let cfg = receiver_config(&a)?;
    let metrics_listen = metrics_address(a.metrics_listen, a.config.is_some(), cfg.metrics_listen);
    let rt = runtime()?;
    rt.block_on(async {
        let stop = stop_on_signals()?;
        // The web console beside replication, reading the same store and
        // the shippers' reports the receiver keeps.
        let reports = tidemark_receiver::shipper_reports::ShipperReports::new(&cfg.data_dir);
        let (console, console_addr) = match cfg.console.enabled {
            true => {
                let bound = tidemark_console::bind(&cfg, reports.clone()).await?;
                let addr = bound.local_addr();
                (Some(tokio::spawn(bound.serve(stop.clone()))), Some(addr))
            }
            false => (None, None),
        };
        tidemark_receiver::daemon::run_with_reports(
            cfg,
            metrics_listen,
            stop,
            reports,
            |addr, metrics| {
                println!("receiver ready on {addr}");
                print_metrics_address(metrics);
                if let Some(console) = console_addr {
                    println!("console on https://{console}");
                }
                let _ = std::io::stdout().flush();
                crate::notify_ready();
            },
        )
        .await?;
        if let Some(console) = console {
            console.await??;
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}
