//! `tidemark reprotect` (and `tidemark receiver adopt`, the same): after a
//! failover, the old primary's disks become the replica of the host now
//! running the failed-over ones, so that only blocks that differ travel
//! when its shipper connects.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_changelog::DiskId;
use tidemark_names::Name;
use tidemark_receiver::store::{LocalEngine, StoreEngine};

/// `tidemark reprotect` and `tidemark receiver adopt`.
#[derive(Debug, Args)]
pub(crate) struct AdoptArgs {
    /// The receiver's data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// The host whose shipper will connect (for a failback: the host now
    /// running the failed-over disks).
    #[arg(long)]
    host: Name,
    /// The consistency group.
    #[arg(long, default_value = "default")]
    group: Name,
    /// `NAME=IMAGE`: a disk and the image (or block device) holding its
    /// old content, in the order of the host's tracker (repeat).
    #[arg(long = "disk", value_name = "NAME=IMAGE", required = true)]
    disks: Vec<String>,
}

pub(crate) fn adopt(a: AdoptArgs) -> Result<ExitCode> {
    use tidemark_receiver::store::Disk;
    let dir = tidemark_receiver::daemon::group_dir(&a.data_dir, &a.host, &a.group);
    if dir.join("state").exists() {
        bail!(
            "{} already holds a replica of {}/{}: adopt only into a new one",
            dir.display(),
            a.host,
            a.group
        );
    }
    let mut disks = Vec::new();
    for (id, arg) in a.disks.iter().enumerate() {
        let Some((name, image)) = arg.split_once('=') else {
            bail!("--disk {arg:?}: expected NAME=IMAGE");
        };
        let name = Name::new(name).with_context(|| format!("--disk {arg:?}"))?;
        let image = PathBuf::from(image);
        let size = std::fs::metadata(&image)
            .with_context(|| format!("reading {}", image.display()))?
            .len();
        disks.push((
            Disk {
                id: DiskId(id as u32),
                name,
                size,
            },
            image,
        ));
    }
    let mut group = LocalEngine::new(&a.data_dir).open(&a.host, &a.group)?;
    group.adopt(&disks)?;
    println!(
        "adopted {} disks as the replica of {}/{}; when its shipper connects, every block is compared and only blocks that differ are sent",
        disks.len(),
        a.host,
        a.group
    );
    Ok(ExitCode::SUCCESS)
}
