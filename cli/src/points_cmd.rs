//! `tidemark points`: the recovery points a receiver keeps for a protected
//! host's group (or, with `--span`, a span's points); and how every
//! replica-site command names a replica ([`ReplicaArgs`], or a replica or
//! a span: [`TargetArgs`]) and a point ([`choose`]).

use crate::timefmt;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tidemark_changelog::Seq;
use tidemark_config::{ReceiverConfig, StoreKind};
use tidemark_names::Name;
use tidemark_receiver::store::{open_engine, GroupState, RecoveryPoint, ReplicaStore, StoreEngine};

/// Where the replica stores are: the receiver's `--data-dir` (the local
/// store), or its `--config` (`[receiver.store]`: the local store in its
/// data-dir, or the Ceph store, reachable from any receiver node).
#[derive(Debug, Clone, Args)]
pub(crate) struct StoreArgs {
    /// The receiver's data directory (the local store).
    #[arg(long, value_name = "DIR", required_unless_present = "config")]
    data_dir: Option<PathBuf>,
    /// The receiver's configuration file: its [receiver.store] says where
    /// the replicas are (the local store in its data-dir, or the Ceph
    /// store, from any receiver node).
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    config: Option<PathBuf>,
}

impl StoreArgs {
    /// The local store in `data_dir`.
    pub(crate) fn local(data_dir: &Path) -> StoreArgs {
        StoreArgs {
            data_dir: Some(data_dir.to_path_buf()),
            config: None,
        }
    }

    /// The store of the receiver configured in `config`.
    pub(crate) fn of_config(config: &Path) -> StoreArgs {
        StoreArgs {
            data_dir: None,
            config: Some(config.to_path_buf()),
        }
    }

    /// The receiver's configuration: the file's, or the defaults with
    /// `--data-dir`.
    pub(crate) fn receiver(&self) -> Result<ReceiverConfig> {
        match (&self.config, &self.data_dir) {
            (Some(path), _) => {
                let loaded = tidemark_config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
                Ok(loaded
                    .require_receiver()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .clone())
            }
            (None, Some(dir)) => Ok(ReceiverConfig {
                data_dir: dir.clone(),
                ..ReceiverConfig::default()
            }),
            (None, None) => bail!("give --data-dir or --config"),
        }
    }

    /// The store engine the receiver's configuration selects.
    pub(crate) fn engine(&self) -> Result<Box<dyn StoreEngine>> {
        let cfg = self.receiver()?;
        Ok(open_engine(&cfg, "tidemark CLI")?)
    }
}

/// Which replica: `--data-dir` or `--config`, `--host`, `--group`.
#[derive(Debug, Args)]
pub(crate) struct ReplicaArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The protected host.
    #[arg(long)]
    pub(crate) host: Name,
    /// Its consistency group.
    #[arg(long, default_value = "default")]
    pub(crate) group: Name,
}

impl ReplicaArgs {
    /// Opens the replica read-only (a receiver may be writing it).
    pub(crate) fn open_read_only(&self) -> Result<std::sync::Arc<dyn ReplicaStore>> {
        let engine = self.store.engine()?;
        self.open_read_only_in(engine.as_ref())
    }

    /// Opens the replica read-only in `engine`.
    pub(crate) fn open_read_only_in(
        &self,
        engine: &dyn StoreEngine,
    ) -> Result<std::sync::Arc<dyn ReplicaStore>> {
        engine
            .open_read_only(&self.host, &self.group)
            .with_context(|| {
                format!(
                    "reading the replica {}",
                    engine.describe(&self.host, &self.group)
                )
            })
    }

    /// The group's directory in the receiver's data directory, after
    /// checking that the replica exists. With the local store it holds the
    /// replica; with another store it holds what stays on this node (a
    /// test failover's pin lock and scratch files; the VM specs and drain
    /// requests of the receiver that runs here), and is created if
    /// missing.
    pub(crate) fn dir(&self) -> Result<PathBuf> {
        let cfg = self.store.receiver()?;
        let dir = tidemark_receiver::daemon::group_dir(&cfg.data_dir, &self.host, &self.group);
        if cfg.store.kind == StoreKind::Local {
            if !dir.join("state").exists() {
                bail!(
                    "no replica of {}/{} under {}",
                    self.host,
                    self.group,
                    cfg.data_dir.display()
                );
            }
            return Ok(dir);
        }
        let engine = open_engine(&cfg, "tidemark CLI")?;
        if !engine.exists(&self.host, &self.group) {
            bail!(
                "no replica of {}/{} in {}",
                self.host,
                self.group,
                engine.describe(&self.host, &self.group)
            );
        }
        // The receiver (its own user) keeps the VM specs it is sent in
        // this directory too: it stays the data directory owner's.
        Ok(tidemark_receiver::pin::node_group_dir(
            &cfg.data_dir,
            &self.host,
            &self.group,
        )?)
    }
}

/// Which replica (`--host`, `--group`) or which span (`--span`: every
/// member's replica at once), in `--data-dir` (or the store of
/// `--config`).
#[derive(Debug, Args)]
pub(crate) struct TargetArgs {
    #[command(flatten)]
    pub(crate) store: StoreArgs,
    /// The protected host.
    #[arg(long, required_unless_present = "span")]
    host: Option<Name>,
    /// Its consistency group.
    #[arg(long, default_value = "default")]
    group: Name,
    /// A span (a `[[receiver.span]]` name) instead of one host's group:
    /// every member at once, at the same span point.
    #[arg(long, conflicts_with_all = ["host", "group"])]
    pub(crate) span: Option<Name>,
}

/// What a [`TargetArgs`] names.
pub(crate) enum Target {
    /// One host's group.
    Group(ReplicaArgs),
    /// Every member of a span.
    Span {
        /// Where the members' replicas (and the span's record) are.
        store: StoreArgs,
        /// The span.
        span: Name,
    },
}

impl TargetArgs {
    /// The target of one group.
    pub(crate) fn of_group(replica: ReplicaArgs) -> TargetArgs {
        TargetArgs {
            store: replica.store,
            host: Some(replica.host),
            group: replica.group,
            span: None,
        }
    }

    pub(crate) fn target(&self) -> Result<Target> {
        match (&self.span, &self.host) {
            (Some(span), _) => Ok(Target::Span {
                store: self.store.clone(),
                span: span.clone(),
            }),
            (None, Some(host)) => Ok(Target::Group(ReplicaArgs {
                store: self.store.clone(),
                host: host.clone(),
                group: self.group.clone(),
            })),
            (None, None) => bail!("give --host (and --group) or --span"),
        }
    }
}

/// `tidemark points`.
#[derive(Debug, Args)]
pub(crate) struct PointsArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn kind(p: &RecoveryPoint) -> &'static str {
    match (p.label.is_empty(), p.app_consistent) {
        (true, _) => "crash-consistent",
        (false, false) => "marker",
        (false, true) => "app-consistent",
    }
}

pub(crate) fn points(a: PointsArgs) -> Result<ExitCode> {
    let replica = match a.target.target()? {
        Target::Group(replica) => replica,
        Target::Span { store, span } => {
            return crate::span_cmd::list_in(&store, &span, false, a.json)
        }
    };
    let group = replica.open_read_only()?;
    let points = group.points();
    let now = tidemark_changelog::now_ns();
    if a.json {
        for p in &points {
            let line = serde_json::json!({
                "seq": p.seq,
                "time": timefmt::utc(p.timestamp_ns),
                "timestamp_ns": p.timestamp_ns,
                "kind": kind(p),
                "label": p.label,
                "age_seconds": now.saturating_sub(p.timestamp_ns) as f64 / 1e9,
            });
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let state = match group.position().state {
        GroupState::InitialSync => "initial sync (no point yet)".to_string(),
        GroupState::Consistent => "consistent".to_string(),
        GroupState::Resyncing { pending } => format!(
            "resyncing {} extents (no new points until it completes)",
            pending.len()
        ),
    };
    println!(
        "{}/{}: {} recovery points, {} MiB of history, {state}",
        replica.host,
        replica.group,
        points.len(),
        group.history_bytes() >> 20
    );
    if points.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:>12}  {:<24}  {:>6}  {:<16}  LABEL",
        "SEQ", "TIME (UTC)", "AGE", "KIND"
    );
    for p in &points {
        println!(
            "{:>12}  {:<24}  {:>6}  {:<16}  {}",
            p.seq,
            timefmt::utc(p.timestamp_ns),
            timefmt::age(now.saturating_sub(p.timestamp_ns) / 1_000_000_000),
            kind(p),
            p.label
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The point `spec` names among `points` (oldest first).
pub(crate) fn choose<'p>(points: &'p [RecoveryPoint], spec: &str) -> Result<&'p RecoveryPoint> {
    let Some(newest) = points.last() else {
        bail!("the replica has no recovery point yet");
    };
    if spec == "latest" {
        return Ok(newest);
    }
    if let Ok(seq) = spec.parse::<u64>() {
        return points.iter().find(|p| p.seq == Seq(seq)).with_context(|| {
            format!("no recovery point at sequence {seq} (see `tidemark points`)")
        });
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(spec) {
        let ns = t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
            .unwrap_or(0);
        return points
            .iter()
            .rev()
            .find(|p| p.timestamp_ns <= ns)
            .with_context(|| {
                format!(
                    "no recovery point at or before {spec}; the oldest is {}",
                    timefmt::utc(points[0].timestamp_ns)
                )
            });
    }
    points
        .iter()
        .rev()
        .find(|p| p.label == spec)
        .with_context(|| {
            format!("{spec:?} is not `latest`, a sequence number, a time or a marker's label")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(seq: u64, ts: u64, label: &str) -> RecoveryPoint {
        RecoveryPoint {
            seq: Seq(seq),
            timestamp_ns: ts,
            app_consistent: false,
            label: label.into(),
        }
    }

    #[test]
    fn points_are_chosen_by_latest_seq_time_and_label() {
        let s = 1_000_000_000u64;
        let points = [
            p(10, 1_795_425_000 * s, ""),
            p(20, 1_795_425_060 * s, "pre-upgrade"),
            p(30, 1_795_425_120 * s, ""),
        ];
        assert_eq!(choose(&points, "latest").unwrap().seq, Seq(30));
        assert_eq!(choose(&points, "20").unwrap().seq, Seq(20));
        assert!(choose(&points, "21").is_err());
        assert_eq!(choose(&points, "pre-upgrade").unwrap().seq, Seq(20));
        // 1_795_425_090 s = 2026-11-23T09:11:30Z: the point before it.
        assert_eq!(
            choose(&points, "2026-11-23T09:11:30Z").unwrap().seq,
            Seq(20)
        );
        assert!(choose(&points, "2020-01-01T00:00:00Z").is_err());
        assert!(choose(&points, "no-such-label").is_err());
        assert!(choose(&[], "latest").is_err());
    }
}
