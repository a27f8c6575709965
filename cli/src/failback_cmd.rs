//! `tidemark failback`: after a reprotect, a planned failover back onto
//! the original primary's disks (see [`crate::failover_cmd`]).

use crate::failover_cmd::{failover, FailoverArgs};
use crate::points_cmd::{ReplicaArgs, TargetArgs};
use crate::vm_boot::BootArgs;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// `tidemark failback`: a planned failover back onto the original
/// primary's disks.
#[derive(Debug, Args)]
pub(crate) struct FailbackArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
    /// The original primary's disk (block device or image, for a group of
    /// one disk, written in place) or a directory for `<disk>.img` files.
    #[arg(long)]
    to: PathBuf,
    /// Most time to wait for the replica site's host to drain.
    #[arg(long, default_value = "10m", value_parser = tidemark_config::parse_duration)]
    timeout: std::time::Duration,
}

pub(crate) fn failback(a: FailbackArgs) -> Result<ExitCode> {
    let code = failover(FailoverArgs {
        target: TargetArgs::of_group(a.replica),
        point: "latest".into(),
        to: Some(a.to),
        to_rbd: None,
        planned: true,
        timeout: a.timeout,
        boot: BootArgs::none(),
        networks: Vec::new(),
    })?;
    println!(
        "failed back: start the original host's tracker with --resync-all (its disks were written \
         behind its back) and its shipper; only the blocks that differ from the replica site's old \
         replica travel"
    );
    Ok(code)
}
