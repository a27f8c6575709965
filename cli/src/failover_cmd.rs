//! `tidemark failover`: take a replica over, writing its disks as of a
//! recovery point into images, a block device or the original primary's
//! disk. `--planned` first drains the protected host through the running
//! receiver (the drain request of [`tidemark_receiver::drain`]) and pins
//! the final barrier ([`tidemark_receiver::pin`]) while it is written, so
//! nothing is lost. `--boot` then starts the group's VM from the disks
//! written (see [`crate::vm_boot`]). `--span` brings every member of a
//! span to the same span point, each member's disks under `TO/HOST/GROUP/`
//! (the span point is chosen and pinned in every member by
//! [`tidemark_receiver::span_point`]).

use crate::points_cmd::{choose, kind, ReplicaArgs, StoreArgs, Target, TargetArgs};
use crate::timefmt;
use crate::vm_boot::{self, BootArgs, VmFiles};
use anyhow::{bail, Context, Result};
use clap::Args;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tidemark_changelog::{DiskId, Seq};
use tidemark_names::Name;
use tidemark_receiver::drain::DrainChannel;
use tidemark_receiver::pin::PinLock;
use tidemark_receiver::span_point::{PinnedSpanPoint, PointChoice};
use tidemark_receiver::store::{GroupState, PointReader, RecoveryPoint, ReplicaStore, StoreEngine};
use tidemark_vm::boot::{self, NetworkMap, Networks};
use tidemark_vm::DiskSource;

/// `tidemark failover`.
#[derive(Debug, Args)]
pub(crate) struct FailoverArgs {
    #[command(flatten)]
    pub(crate) target: TargetArgs,
    /// The recovery point: `latest`, a sequence number, a time (RFC 3339,
    /// e.g. 2026-11-23T10:00:00Z: the newest point at or before it) or a
    /// marker's label (its newest point). With --span: `latest` or a span
    /// point's id (`tidemark span points`).
    #[arg(long, default_value = "latest")]
    pub(crate) point: String,
    /// Where the disks go: a directory (one sparse `<disk>.img` per disk,
    /// created), or, for a group of one disk, a block device or an
    /// existing image file of the disk's size, overwritten in place (e.g.
    /// the original primary's disk, for a failback). With --span: a
    /// directory, each member's disks in `HOST/GROUP/` under it.
    #[arg(long, required_unless_present = "to_rbd")]
    pub(crate) to: Option<PathBuf>,
    /// With the Ceph store (`--config`): fail over to new RBD images in
    /// the store's pool and namespace, `NAME-<disk>`, each a clone of a
    /// snapshot of the disk's replica image with the point written into
    /// it: nothing is copied but the point's recent changes. Map them
    /// where the kernel has rbd (`rbd map POOL/[NAMESPACE/]NAME-<disk>`),
    /// or `rbd flatten` them to part them from the replica. Like any
    /// failover of a Ceph store's group that is not planned, it takes the
    /// group's lease: it is refused while a running receiver applies the
    /// group (stop that receiver first, and run again once its lease
    /// expired); the old owner is then fenced (blocklisted by the
    /// cluster).
    #[arg(long, value_name = "NAME", conflicts_with_all = ["to", "planned", "span", "boot"])]
    pub(crate) to_rbd: Option<String>,
    /// A planned failover, with the receiver running: ask the protected
    /// host (through its shipper) to stop its tracker and deliver every
    /// record, then fail over to that final barrier: nothing is lost.
    #[arg(long, conflicts_with_all = ["point", "span"])]
    pub(crate) planned: bool,
    /// With --planned: most time to wait for the protected host to drain.
    #[arg(long, default_value = "10m", value_parser = tidemark_config::parse_duration)]
    pub(crate) timeout: std::time::Duration,
    /// Start the group's VM from the failed-over disks, its NICs on this
    /// site's bridges (see --network), and wait until it is up.
    #[command(flatten)]
    pub(crate) boot: BootArgs,
    /// With --boot: the bridge of this site for a network of the VM's
    /// spec (a NIC's `bridge` or `network`), NAME=BRIDGE, once per
    /// network. A NIC whose network has no mapping is refused before
    /// anything is written.
    #[arg(long = "network", value_name = "NAME=BRIDGE", requires = "boot")]
    pub(crate) networks: Vec<String>,
}

/// The VM to start after a failover, checked before anything is written.
struct VmToBoot {
    spec: tidemark_config::VmSpec,
    networks: NetworkMap,
}

impl VmToBoot {
    /// The VM of the recovery point `point` (`None`: the current spec).
    fn of(a: &FailoverArgs, dir: &Path, point: Option<Seq>) -> Result<Option<VmToBoot>> {
        let Some(spec) = a.boot.spec(dir, point)? else {
            return Ok(None);
        };
        let networks = NetworkMap::parse(a.networks.iter().map(String::as_str))?;
        networks.apply(&spec)?;
        Ok(Some(VmToBoot { spec, networks }))
    }

    /// Starts the VM from the disks written, `written` (name, path).
    fn boot(&self, a: &FailoverArgs, written: &[(String, PathBuf)]) -> Result<()> {
        let names: Vec<String> = written.iter().map(|(n, _)| n.clone()).collect();
        let sources = boot::replica_sources(&self.spec, &names, |name| DiskSource::File {
            path: written
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p.clone())
                .unwrap_or_default(),
        })?;
        let name = self.spec.name.as_str();
        let to = a.to.as_deref().context("--boot needs --to")?;
        let files = match (&a.boot.console, to.is_dir()) {
            (Some(console), _) => VmFiles::beside(console.clone()),
            (None, true) => VmFiles::beside(to.join(format!("{name}.console"))),
            (None, false) => {
                bail!("with --to a device or file, give --console for the VM's console")
            }
        };
        // The VM runs on after this command, in the background.
        vm_boot::start(
            &self.spec,
            &sources,
            Networks::Mapped(&self.networks),
            &a.boot,
            &files,
            name,
        )?;
        Ok(())
    }
}

pub(crate) fn failover(a: FailoverArgs) -> Result<ExitCode> {
    let replica = match a.target.target()? {
        Target::Group(replica) => replica,
        Target::Span { store, span } => return span_failover(&a, &store, &span),
    };
    if a.planned {
        return planned_failover(&a, &replica);
    }
    if let Some(name) = &a.to_rbd {
        return failover_to_rbd(&a, &replica, name);
    }
    let to = a.to.as_deref().context("give --to (or --to-rbd)")?;
    let dir = replica.dir()?;
    let engine = replica.store.engine()?;
    // The writable open: a local replica is refused while its receiver
    // runs, a Ceph one until the lease of the receiver that applied it
    // expired (that receiver is then fenced).
    let group = engine
        .open(&replica.host, &replica.group)
        .with_context(|| {
            format!(
                "opening the replica {} (a running receiver holds it: stop it first; on the Ceph store, run again once its lease expired)",
                engine.describe(&replica.host, &replica.group)
            )
        })?;
    let points = group.points();
    let point = choose(&points, &a.point)?;
    let vm = VmToBoot::of(&a, &dir, Some(point.seq))?;
    let view = group.reader(Some(point.seq))?;
    let written = write_images(to, &replica, group.as_ref(), point, view.as_ref())?;
    if let Some(vm) = vm {
        vm.boot(&a, &written)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A failover of a Ceph store's group to new RBD images (`--to-rbd`):
/// one snapshot and clone per disk, the point written into the clone.
#[cfg(feature = "ceph")]
fn failover_to_rbd(a: &FailoverArgs, replica: &ReplicaArgs, name: &str) -> Result<ExitCode> {
    let cfg = replica.store.receiver()?;
    let Some(ceph) = cfg.store.ceph() else {
        bail!("--to-rbd needs the Ceph store: give --config with a receiver.toml whose [receiver.store] has kind = \"ceph\"");
    };
    let engine = tidemark_receiver::store::connect(&cfg, "tidemark failover")?;
    // The writable open takes the group's lease (refused while a running
    // receiver holds it): no fold changes the replica images while they
    // are snapshotted.
    let group = engine
        .open_group(&replica.host, &replica.group)
        .with_context(|| {
            format!(
                "opening the replica {} (a running receiver holds it: stop it first, and run again once its lease expired)",
                tidemark_receiver::store::StoreEngine::describe(
                    &engine,
                    &replica.host,
                    &replica.group
                )
            )
        })?;
    let points = group.points();
    let point = choose(&points, &a.point)?;
    println!(
        "failing over {}/{} to the recovery point at sequence {} ({}, {}) as RBD clones",
        replica.host,
        replica.group,
        point.seq,
        timefmt::utc(point.timestamp_ns),
        kind(point)
    );
    let started = Instant::now();
    let snap = format!(
        "tidemark-failover-{}-{}",
        point.seq,
        tidemark_changelog::now_ns() / 1_000_000_000
    );
    let clones = engine.failover_to_rbd(
        &replica.host,
        &replica.group,
        &group,
        point.seq,
        name,
        &snap,
    )?;
    let spec = |image: &str| match ceph.namespace.as_str() {
        "" => format!("{}/{image}", ceph.pool),
        ns => format!("{}/{ns}/{image}", ceph.pool),
    };
    for (disk, clone) in &clones {
        println!(
            "  {} → rbd {} ({} bytes, a clone of snapshot {snap})",
            disk.name,
            spec(clone),
            disk.size
        );
    }
    println!(
        "failed over in {:.1}s. Map the images where the kernel has rbd (rbd map IMAGE), or rbd flatten them to part them from the replica",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "ceph"))]
fn failover_to_rbd(_: &FailoverArgs, _: &ReplicaArgs, _: &str) -> Result<ExitCode> {
    bail!("--to-rbd needs the Ceph store, and this tidemark was built without it (cargo feature `ceph`)")
}

/// A failover of every member of `span` to the same span point: every
/// member's marker is pinned and checked before anything is written, each
/// member's disks go to `TO/HOST/GROUP/`, and the pins are removed after.
/// With the Ceph store it runs on any receiver node: the span's record
/// and the members' replicas are read from the cluster, and each pin is
/// written there too (retention on the receiver that applies the member
/// reads it).
fn span_failover(a: &FailoverArgs, store: &StoreArgs, span: &Name) -> Result<ExitCode> {
    if a.boot.requested() {
        bail!("--boot starts one group's VM: fail the span over without it, then start each member's VM");
    }
    let to = a.to.as_deref().context("give --to")?;
    let choice: PointChoice = a.point.parse().map_err(anyhow::Error::msg)?;
    let data_dir = store.receiver()?.data_dir;
    let engine = store.engine()?;
    let pinned = PinnedSpanPoint::pin_in(engine.as_ref(), &data_dir, span, choice)
        .with_context(|| format!("span {span}: no failover, nothing was written"))?;
    let written = (|| {
        // Every member's images must be new: refused before any is
        // written.
        for m in &pinned.members {
            let dir = member_dir(to, &m.host, &m.group);
            if dir.exists() && !dir.is_dir() {
                bail!("{} exists and is no directory", dir.display());
            }
            for d in m.store.disks() {
                let img = dir.join(format!("{}.img", d.name));
                if img.exists() {
                    bail!(
                        "{} exists: give --to a directory without this span's images",
                        img.display()
                    );
                }
            }
        }
        println!(
            "failing over span {span} to span point {} ({}{}): {} members",
            pinned.entry.point,
            timefmt::utc(pinned.entry.taken_ns),
            if pinned.entry.app_consistent {
                ", app-consistent"
            } else {
                ""
            },
            pinned.members.len()
        );
        for m in &pinned.members {
            let point = m.store.point_at(m.marker).with_context(|| {
                format!(
                    "{}/{}: no recovery point at its marker {} any more",
                    m.host, m.group, m.marker
                )
            })?;
            let view = m.store.reader(Some(m.marker))?;
            let replica = ReplicaArgs {
                store: store.clone(),
                host: m.host.clone(),
                group: m.group.clone(),
            };
            write_images(
                &member_dir(to, &m.host, &m.group),
                &replica,
                m.store.as_ref(),
                &point,
                view.as_ref(),
            )?;
        }
        Ok(())
    })();
    let released = pinned.release();
    written?;
    released?;
    println!(
        "span {span} failed over: every member is at the same span point under {}",
        to.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Where a span failover writes a member's disks.
pub(crate) fn member_dir(to: &Path, host: &Name, group: &Name) -> PathBuf {
    to.join(host.as_str()).join(group.as_str())
}

/// Writes every disk of `group` (the replica `replica`) as `view` (at
/// `point`) reads it into `to`; returns each disk's name and where it
/// went.
fn write_images(
    to: &Path,
    replica: &ReplicaArgs,
    group: &dyn ReplicaStore,
    point: &RecoveryPoint,
    view: &dyn PointReader,
) -> Result<Vec<(String, PathBuf)>> {
    let mut written = Vec::new();
    let target = WriteTarget::of(to, group, point.seq)?;
    println!(
        "failing over {}/{} to the recovery point at sequence {} ({}, {}{})",
        replica.host,
        replica.group,
        point.seq,
        timefmt::utc(point.timestamp_ns),
        kind(point),
        if point.label.is_empty() {
            String::new()
        } else {
            format!(" {:?}", point.label)
        }
    );
    for d in group.disks_at(point.seq) {
        let (dst, in_place) = match &target {
            WriteTarget::Dir(dir) => (dir.join(format!("{}.img", d.name)), false),
            WriteTarget::InPlace(path) => (path.clone(), true),
        };
        let copied = materialise(view, d.id, d.size, &dst, &d.name, in_place)?;
        println!(
            "  {} → {} ({} bytes, {} bytes of data)",
            d.name,
            dst.display(),
            d.size,
            copied
        );
        written.push((d.name.to_string(), dst));
    }
    Ok(written)
}

/// A planned failover: the drain request goes to the receiver, which
/// passes it to the host's shipper; the shipper stops the tracker (a final
/// barrier) and delivers every record; then the images are written as of
/// that barrier while the receiver keeps running. With the Ceph store the
/// request and the answer are in the cluster ([`tidemark_receiver::drain`]):
/// this runs on any receiver node, whichever receiver applies the group.
fn planned_failover(a: &FailoverArgs, replica: &ReplicaArgs) -> Result<ExitCode> {
    use tidemark_receiver::drain::{self, DrainRequest};
    let dir = replica.dir()?;
    // The final barrier will be the newest point: it has the current spec.
    let vm = VmToBoot::of(a, &dir, None)?;
    let engine = replica.store.engine()?;
    let channel = drain::channel(engine.as_ref(), &dir, &replica.host, &replica.group);
    let now = tidemark_changelog::now_ns();
    let request = DrainRequest {
        id: (now ^ u64::from(std::process::id()) << 32).max(1),
        // Past it, no receiver passes the request on: a request this
        // command leaves behind (killed) stops no tracker later.
        expires_ns: Some(now.saturating_add(a.timeout.as_nanos().min(u128::from(u64::MAX)) as u64)),
    };
    channel.request(&request)?;
    println!(
        "planned failover of {}/{}: asking the protected host to stop its tracker and deliver every record (request {}, left in {})",
        replica.host,
        replica.group,
        request.id,
        channel.describe()
    );
    let answer = wait_drained(
        channel.as_ref(),
        engine.as_ref(),
        replica,
        request.id,
        a.timeout,
    );
    // Never leave a request behind: it would stop the tracker whenever
    // the host's shipper next connects.
    let cleared = channel.clear();
    let seq = Seq(answer?);
    cleared?;
    println!(
        "drained: the protected host is stopped; every record up to sequence {seq} is durable here"
    );

    // The final barrier is the newest point. Pin it (under the pin's
    // lock, so no test failover runs meanwhile) so retention cannot fold
    // it while the images are written.
    let store_pin = engine.store_pin(&replica.host, &replica.group);
    let lock = PinLock::acquire(&dir)?.with_store_pin(store_pin);
    lock.pin(seq)?;
    let written = (|| {
        let group = replica.open_read_only_in(engine.as_ref())?;
        if group.position().state != GroupState::Consistent {
            bail!("the replica is not consistent after the drain; fail over to an earlier point with --point");
        }
        let points = group.points();
        let Some(point) = points.iter().find(|p| p.seq == seq) else {
            bail!("no recovery point at sequence {seq}, the final barrier, in the replica");
        };
        if points.last().map(|p| p.seq) != Some(seq) {
            bail!("the replica holds points newer than the final barrier {seq}: the host is still writing");
        }
        let view = group.reader(Some(seq))?;
        let to = a.to.as_deref().context("give --to")?;
        write_images(to, replica, group.as_ref(), point, view.as_ref())
    })();
    let unpinned = lock.unpin();
    let written = written?;
    unpinned?;
    println!("planned failover complete: nothing was lost (the source stopped at sequence {seq})");
    if let Some(vm) = vm {
        vm.boot(a, &written)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits for the answer to drain request `id` in `channel`, with a line
/// now and then (the replica's position read from `engine`).
fn wait_drained(
    channel: &dyn DrainChannel,
    engine: &dyn StoreEngine,
    replica: &ReplicaArgs,
    id: u64,
    timeout: std::time::Duration,
) -> Result<u64> {
    let started = Instant::now();
    let mut next_report = started + std::time::Duration::from_secs(10);
    loop {
        match channel.answered()? {
            Some(r) if r.id == id => {
                return r
                    .result
                    .map_err(|why| anyhow::anyhow!("the protected host could not drain: {why}"))
            }
            _ => {}
        }
        let now = Instant::now();
        if now > started + timeout {
            bail!(
                "no answer from the protected host within {timeout:?}: is the receiver running and the host's shipper connected (`tidemark status`)? The request is withdrawn."
            );
        }
        if now >= next_report {
            let at = engine
                .open_read_only(&replica.host, &replica.group)
                .map(|g| g.position().durable_seq)
                .unwrap_or(Seq(0));
            println!(
                "  waiting for the protected host to drain ({}s; the replica is at sequence {at})",
                started.elapsed().as_secs()
            );
            next_report = now + std::time::Duration::from_secs(10);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Where a failover writes the disks.
enum WriteTarget {
    /// A directory: one new sparse image per disk.
    Dir(PathBuf),
    /// The one disk's block device or image file, overwritten in place.
    InPlace(PathBuf),
}

impl WriteTarget {
    fn of(to: &Path, group: &dyn ReplicaStore, seq: Seq) -> Result<WriteTarget> {
        use std::os::unix::fs::FileTypeExt;
        let meta = match std::fs::metadata(to) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tidemark_changelog::create_private_dir_all(to)
                    .with_context(|| format!("creating {}", to.display()))?;
                return Ok(WriteTarget::Dir(to.to_path_buf()));
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", to.display())),
        };
        if meta.is_dir() {
            return Ok(WriteTarget::Dir(to.to_path_buf()));
        }
        let disks = group.disks_at(seq);
        let [disk] = disks.as_slice() else {
            bail!(
                "{} is not a directory, and the group has {} disks: give a directory",
                to.display(),
                disks.len()
            );
        };
        if !meta.file_type().is_block_device() && !meta.is_file() {
            bail!(
                "{} is neither a directory, a block device nor a file",
                to.display()
            );
        }
        let size = tidemark_tracker::storage::backing_size(to)
            .with_context(|| format!("reading the size of {}", to.display()))?;
        if size != disk.size {
            bail!(
                "{} holds {size} bytes, the disk {} holds {}: they must be the same size",
                to.display(),
                disk.name,
                disk.size
            );
        }
        Ok(WriteTarget::InPlace(to.to_path_buf()))
    }
}

/// Progress of writing one disk: a bar with rate and ETA on a terminal,
/// a line per 10 % otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    name: String,
    size: u64,
    next_report: u64,
    started: Instant,
}

impl Progress {
    fn new(name: &str, size: u64) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stdout().is_terminal().then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "  {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> ");
            indicatif::ProgressBar::new(size)
                .with_style(style)
                .with_message(name.to_string())
        });
        Progress {
            bar,
            name: name.to_string(),
            size,
            next_report: size / 10,
            started: Instant::now(),
        }
    }

    fn at(&mut self, at: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(at);
        } else if at >= self.next_report && at < self.size {
            println!(
                "  {}: {}% ({} MiB/s)",
                self.name,
                at * 100 / self.size,
                (at as f64 / 1048576.0 / self.started.elapsed().as_secs_f64().max(1e-3)) as u64
            );
            self.next_report = at + self.size / 10;
        }
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Writes `disk` as `view` reads it into `dst`, with progress. A new image
/// is created sparse (zero ranges stay holes); in place (an existing
/// device or file), zero ranges are written as zeroes. Returns the bytes
/// of data written.
fn materialise(
    view: &dyn PointReader,
    disk: DiskId,
    size: u64,
    dst: &Path,
    name: &str,
    in_place: bool,
) -> Result<u64> {
    const CHUNK: u64 = 4 << 20;
    let output = if in_place {
        std::fs::OpenOptions::new()
            .write(true)
            .open(dst)
            .with_context(|| format!("opening {}", dst.display()))?
    } else {
        // A copy of a protected disk: as private as its replica.
        let f = tidemark_changelog::private_file()
            .write(true)
            .create_new(true)
            .open(dst)
            .with_context(|| format!("creating {} (it must not exist)", dst.display()))?;
        f.set_len(size)?;
        f
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0u64;
    let mut at = 0u64;
    let mut progress = Progress::new(name, size);
    while at < size {
        let n = (size - at).min(CHUNK);
        let chunk = &mut buf[..n as usize];
        if !view.is_zero(disk, at, n) {
            view.read(disk, at, chunk)?;
        } else if in_place {
            chunk.fill(0);
        } else {
            at += n;
            progress.at(at);
            continue;
        }
        // Write the 64 KiB pieces that hold data; zero pieces of a new
        // image stay holes.
        for (i, piece) in chunk.chunks(64 << 10).enumerate() {
            let data = piece.iter().any(|b| *b != 0);
            if data || in_place {
                output
                    .write_all_at(piece, at + (i as u64) * (64 << 10))
                    .with_context(|| format!("writing {}", dst.display()))?;
            }
            if data {
                written += piece.len() as u64;
            }
        }
        at += n;
        progress.at(at);
    }
    progress.done();
    output
        .sync_all()
        .with_context(|| format!("syncing {}", dst.display()))?;
    Ok(written)
}
