//! The live splice: put the tracker into the I/O path of a disk that is in
//! use, and take it out again, without unmounting anything.
//!
//! `protect` creates `/dev/mapper/tidemark-NAME`, a linear map over the
//! whole disk; the admin mounts that map (not the disk) from then on.
//! Splicing in reloads the map's table to point at the tracker's
//! `/dev/nbdN` (which serves the same disk): suspend — the filesystem on the
//! map is frozen, its dirty data and journal written and flushed through the
//! old table, I/O in flight drained — then the new table goes live and I/O
//! resumes through the tracker. Splicing out is the same swap back to the
//! disk. Between a splice-out and the next splice-in the disk is written
//! without the tracker seeing it: the caller must have the whole disk
//! resynced (see `tidemark splice`).
//!
//! The map's UUID, `TIDEMARK-MAJOR-MINOR-NAME`, records which disk it
//! protects: maps do not outlive a reboot, so the disk's device number is
//! stable for the map's lifetime, and `splice stop` / `unprotect` need no
//! argument but the name. A map without that prefix is never touched.

use crate::dm::{Control, DevId, DmError, MapInfo, Target, SECTOR};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark_names::Name;

/// Prefix of every map Tidemark creates.
pub const MAP_PREFIX: &str = "tidemark-";
/// Prefix of their UUIDs.
pub const UUID_PREFIX: &str = "TIDEMARK-";
/// The kernel NBD driver's major number.
pub const NBD_MAJOR: u32 = 43;

/// Why a splice operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    /// A path that must be a block device is something else.
    #[error("{} is not a block device", path.display())]
    NotBlockDevice {
        /// The path.
        path: PathBuf,
    },
    /// A block device could not be opened or asked its size.
    #[error("cannot read {}", path.display())]
    Probe {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A disk whose size is not a whole number of sectors (or zero).
    #[error("{} has {size} bytes, not a positive multiple of 512", path.display())]
    OddSize {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// No map of that name: the disk is not protected.
    #[error("{map} does not exist (run `tidemark protect DISK --name NAME` first)")]
    NotProtected {
        /// The map's name.
        map: String,
    },
    /// A map of that name exists but Tidemark did not create it.
    #[error("{map} exists but was not created by tidemark (uuid {uuid:?}); it is left alone")]
    NotOurs {
        /// The map's name.
        map: String,
        /// Its UUID.
        uuid: String,
    },
    /// `protect` found the name already protecting another disk.
    #[error("{map} exists already and protects device {existing}, not {} ({asked})", disk.display())]
    ProtectsOther {
        /// The map's name.
        map: String,
        /// The disk it protects.
        existing: DevId,
        /// The disk the admin named.
        disk: PathBuf,
        /// Its device number.
        asked: DevId,
    },
    /// `protect` of a disk that another device-mapper map (or md, bcache
    /// …) already uses: device-mapper lets maps share a disk, and writes
    /// through the other one would bypass the tracker.
    #[error("{} is already used by {holders}: protect a disk nothing else is stacked on", disk.display())]
    DiskHeld {
        /// The disk.
        disk: PathBuf,
        /// What holds it (`tidemark-x (dm-3)`, `md0`, …).
        holders: String,
    },
    /// The map's table is neither the disk nor a single NBD device.
    #[error("{map} has an unexpected table ({table}); fix it by hand with dmsetup")]
    UnexpectedTable {
        /// The map's name.
        map: String,
        /// The table, one line per target.
        table: String,
    },
    /// The NBD device is not attached to a server.
    #[error("{} has size 0: it is not connected to the tracker (attach it first)", nbd.display())]
    NotConnected {
        /// The NBD device.
        nbd: PathBuf,
    },
    /// The tracker's NBD device is not the disk's size: it serves another
    /// disk, or the wrong export.
    #[error("{} has {nbd_size} bytes but the protected disk has {disk_size}: it does not serve this disk", nbd.display())]
    SizeMismatch {
        /// The NBD device.
        nbd: PathBuf,
        /// Its size.
        nbd_size: u64,
        /// The disk's size.
        disk_size: u64,
    },
    /// The NBD device's logical block is larger than the disk's: a
    /// filesystem made with smaller blocks would see I/O errors.
    #[error("{} has {nbd_block}-byte logical blocks but the disk has {disk_block}: attach it with a block size of {disk_block} (nbd-client -b {disk_block})", nbd.display())]
    BlockSizeMismatch {
        /// The NBD device.
        nbd: PathBuf,
        /// Its logical block size.
        nbd_block: u64,
        /// The disk's.
        disk_block: u64,
    },
    /// Splicing the disk onto itself (or onto the map).
    #[error("{} is the protected disk itself (or its map), not the tracker's NBD device", nbd.display())]
    SameDevice {
        /// The device given.
        nbd: PathBuf,
    },
    /// `unprotect` of a map that still goes through the tracker.
    #[error("{map} is spliced onto device {device}: run `tidemark splice stop {name}` first")]
    StillSpliced {
        /// The map's name.
        map: String,
        /// Its NAME.
        name: Name,
        /// Where it points.
        device: DevId,
    },
    /// The map's device node could not be made or removed.
    #[error("device node {}", path.display())]
    Node {
        /// The node.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The swap failed after the map was suspended and the old table could
    /// not be resumed either: I/O on the map waits until an admin resumes it.
    #[error("{map} is left SUSPENDED: the new table could not be resumed and neither could the old one; `dmsetup resume {map}` once the cause is fixed")]
    LeftSuspended {
        /// The map's name.
        map: String,
        /// Why the new table could not go live.
        #[source]
        source: DmError,
    },
    /// A device-mapper request failed.
    #[error(transparent)]
    Dm(#[from] DmError),
}

/// The NAME `protect` picks without `--name`: the disk's file name
/// (`/dev/sdb` → `sdb`, `/dev/disk/by-id/x` → `x`), if it is a [`Name`].
pub fn default_name(disk: &Path) -> Option<Name> {
    Name::new(disk.file_name()?.to_str()?).ok()
}

/// `tidemark-NAME`: with a [`Name`] of at most 64 bytes, and the UUID
/// below, well under device-mapper's 127 bytes.
pub fn map_name(name: &Name) -> String {
    format!("{MAP_PREFIX}{name}")
}

/// `/dev/mapper/tidemark-NAME`.
pub fn map_path(name: &Name) -> PathBuf {
    Path::new("/dev/mapper").join(map_name(name))
}

/// The UUID of NAME's map over `disk`.
pub fn map_uuid(name: &Name, disk: DevId) -> String {
    format!("{UUID_PREFIX}{}-{}-{name}", disk.major, disk.minor)
}

/// The disk a map's UUID names, if it is one of ours for `name`.
pub fn disk_of_uuid(uuid: &str, name: &Name) -> Option<DevId> {
    let rest = uuid.strip_prefix(UUID_PREFIX)?;
    let (major, rest) = rest.split_once('-')?;
    let (minor, rest) = rest.split_once('-')?;
    (rest == name.as_str()).then_some(())?;
    Some(DevId {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

/// Where a protected map points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Straight to the disk: writes are not tracked.
    Disk,
    /// Through another whole device of the same size (the tracker's NBD).
    Spliced(DevId),
}

/// What a map's live table means for a map protecting `disk`.
pub fn route_of(table: &[Target], disk: DevId) -> Option<Route> {
    match table {
        [t] if t.start == 0 => match t.linear_device()? {
            d if d == disk => Some(Route::Disk),
            d => Some(Route::Spliced(d)),
        },
        _ => None,
    }
}

fn describe(table: &[Target]) -> String {
    if table.is_empty() {
        return "no table".into();
    }
    table
        .iter()
        .map(|t| format!("{} {} {} {}", t.start, t.length, t.kind, t.params))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The checks before splicing onto `nbd`, apart from any kernel: a device
/// other than the disk, of exactly the disk's size, whose logical blocks
/// are no larger than the disk's.
pub fn check_splice_target(
    nbd: &BlockDev,
    disk: DevId,
    map: DevId,
    disk_size: u64,
    disk_block: u64,
) -> Result<(), SpliceError> {
    if nbd.id == disk || nbd.id == map {
        return Err(SpliceError::SameDevice {
            nbd: nbd.path.clone(),
        });
    }
    if nbd.size == 0 {
        return Err(SpliceError::NotConnected {
            nbd: nbd.path.clone(),
        });
    }
    if nbd.size != disk_size {
        return Err(SpliceError::SizeMismatch {
            nbd: nbd.path.clone(),
            nbd_size: nbd.size,
            disk_size,
        });
    }
    if nbd.logical_block > disk_block {
        return Err(SpliceError::BlockSizeMismatch {
            nbd: nbd.path.clone(),
            nbd_block: nbd.logical_block,
            disk_block,
        });
    }
    Ok(())
}

/// A block device, probed.
#[derive(Debug, Clone)]
pub struct BlockDev {
    /// The path given.
    pub path: PathBuf,
    /// Its device number.
    pub id: DevId,
    /// Its size in bytes.
    pub size: u64,
    /// Its logical block size.
    pub logical_block: u64,
}

/// Stats and sizes the block device at `path` (without opening it
/// exclusively: it may be in use).
pub fn probe(path: &Path) -> Result<BlockDev, SpliceError> {
    let probe_error = |source| SpliceError::Probe {
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(probe_error)?;
    if !meta.file_type().is_block_device() {
        return Err(SpliceError::NotBlockDevice { path: path.into() });
    }
    let id = DevId::from_dev_t(meta.rdev());
    let size = sysfs_u64(id, "size").map_err(probe_error)? * SECTOR;
    let logical_block = sysfs_u64(id, "queue/logical_block_size").map_err(probe_error)?;
    Ok(BlockDev {
        path: path.into(),
        id,
        size,
        logical_block,
    })
}

/// A number from `/sys/dev/block/MAJOR:MINOR/ATTR` (a partition has no
/// `queue/`: its whole disk's is used).
fn sysfs_u64(id: DevId, attr: &str) -> std::io::Result<u64> {
    let dir = Path::new("/sys/dev/block").join(id.to_string());
    let mut path = dir.join(attr);
    if !path.exists() && dir.join("partition").exists() {
        path = dir.join("..").join(attr);
    }
    let text = std::fs::read_to_string(&path)?;
    text.trim().parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })
}

/// What is stacked on the block device `id` (`/sys/dev/block/M:m/holders`),
/// with a device-mapper holder's map name: `tidemark-x (dm-3)`.
pub fn holders(id: DevId) -> Vec<String> {
    let dir = Path::new("/sys/dev/block")
        .join(id.to_string())
        .join("holders");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .flatten()
        .map(|h| {
            let kernel_name = h.file_name().to_string_lossy().into_owned();
            match std::fs::read_to_string(h.path().join("dm/name")) {
                Ok(name) => format!("{} ({kernel_name})", name.trim()),
                Err(_) => kernel_name,
            }
        })
        .collect();
    found.sort();
    found
}

/// If the block device `id` is held by a Tidemark map (its linear table
/// over the disk), that map's name. The tracker uses this to share the disk
/// with its own map instead of insisting on an exclusive open.
pub fn held_by_map(id: DevId) -> Option<String> {
    let holders = Path::new("/sys/dev/block")
        .join(id.to_string())
        .join("holders");
    std::fs::read_dir(holders).ok()?.flatten().find_map(|h| {
        let dm = h.path().join("dm");
        let uuid = std::fs::read_to_string(dm.join("uuid")).ok()?;
        let name = std::fs::read_to_string(dm.join("name")).ok()?;
        uuid.trim()
            .starts_with(UUID_PREFIX)
            .then(|| name.trim().to_string())
    })
}

/// A protected map as found in the kernel.
#[derive(Debug, Clone)]
pub struct Protected {
    /// `tidemark-NAME`.
    pub map: String,
    /// Its state.
    pub info: MapInfo,
    /// The disk it protects.
    pub disk: DevId,
    /// Its size in bytes (the table's).
    pub size: u64,
    /// Where it points now.
    pub route: Route,
}

/// Finds NAME's map and what it points at.
pub fn inspect(ctl: &Control, name: &Name) -> Result<Protected, SpliceError> {
    let map = map_name(name);
    let (info, table) = match ctl.table(&map) {
        Ok(found) => found,
        Err(DmError::NoSuchMap { .. }) => return Err(SpliceError::NotProtected { map }),
        Err(e) => return Err(e.into()),
    };
    let Some(disk) = disk_of_uuid(&info.uuid, name) else {
        return Err(SpliceError::NotOurs {
            map,
            uuid: info.uuid,
        });
    };
    let Some(route) = route_of(&table, disk) else {
        return Err(SpliceError::UnexpectedTable {
            map,
            table: describe(&table),
        });
    };
    let size = table.iter().map(|t| t.length).sum::<u64>() * SECTOR;
    Ok(Protected {
        map,
        info,
        disk,
        size,
        route,
    })
}

/// What `protect` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtectOutcome {
    /// The map was created.
    Created,
    /// It existed already, over this disk.
    AlreadyProtected {
        /// Where it points now.
        route: Route,
    },
}

/// Creates `/dev/mapper/tidemark-NAME`, linear over the whole `disk`.
pub fn protect(ctl: &Control, disk: &Path, name: &Name) -> Result<ProtectOutcome, SpliceError> {
    let dev = probe(disk)?;
    if dev.size == 0 || dev.size % SECTOR != 0 {
        return Err(SpliceError::OddSize {
            path: disk.into(),
            size: dev.size,
        });
    }
    match inspect(ctl, name) {
        Ok(p) if p.disk == dev.id => {
            ensure_node(&map_path(name), p.info.dev)?;
            return Ok(ProtectOutcome::AlreadyProtected { route: p.route });
        }
        Ok(p) => {
            return Err(SpliceError::ProtectsOther {
                map: p.map,
                existing: p.disk,
                disk: disk.into(),
                asked: dev.id,
            })
        }
        Err(SpliceError::NotProtected { .. }) => {}
        Err(e) => return Err(e),
    }
    let stacked = holders(dev.id);
    if !stacked.is_empty() {
        return Err(SpliceError::DiskHeld {
            disk: disk.into(),
            holders: stacked.join(", "),
        });
    }
    let map = map_name(name);
    let info = ctl.create(
        &map,
        &map_uuid(name, dev.id),
        &[Target::linear_whole(dev.id, dev.size / SECTOR)],
    )?;
    ensure_node(&map_path(name), info.dev)?;
    Ok(ProtectOutcome::Created)
}

/// What a splice did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swapped {
    /// The table was swapped; the map was suspended this long (from the
    /// suspend request, which includes freezing the filesystem, to the end
    /// of the resume).
    Now {
        /// Time suspended.
        suspended: Duration,
    },
    /// The map pointed there already: nothing was done.
    Already,
}

/// Swaps the live table of `map` for `table`: load (the kernel opens the
/// new device here, so most failures happen before any suspend), suspend
/// with a filesystem freeze and flush, resume onto the new table.
fn swap(ctl: &Control, map: &str, table: &[Target]) -> Result<Duration, SpliceError> {
    ctl.load(map, table)?;
    let started = Instant::now();
    if let Err(e) = ctl.suspend(map) {
        // Nothing changed for the filesystem; drop the loaded table.
        let _ = ctl.clear(map);
        let _ = ctl.resume(map);
        return Err(e.into());
    }
    match ctl.resume(map) {
        Ok(_) => Ok(started.elapsed()),
        Err(source) => {
            // Back to the old table rather than leave I/O waiting.
            let _ = ctl.clear(map);
            match ctl.resume(map) {
                Ok(_) => Err(source.into()),
                Err(_) => Err(SpliceError::LeftSuspended {
                    map: map.into(),
                    source,
                }),
            }
        }
    }
}

/// Points NAME's map at `nbd` (the tracker serving the same disk).
pub fn splice_in(ctl: &Control, name: &Name, nbd: &Path) -> Result<Swapped, SpliceError> {
    let p = inspect(ctl, name)?;
    let target = probe(nbd)?;
    if p.route == Route::Spliced(target.id) {
        return Ok(Swapped::Already);
    }
    if let Route::Spliced(other) = p.route {
        return Err(SpliceError::UnexpectedTable {
            map: p.map,
            table: format!("already spliced onto {other}; splice it out first"),
        });
    }
    let disk_block =
        sysfs_u64(p.disk, "queue/logical_block_size").map_err(|source| SpliceError::Probe {
            path: Path::new("/sys/dev/block").join(p.disk.to_string()),
            source,
        })?;
    check_splice_target(&target, p.disk, p.info.dev, p.size, disk_block)?;
    let suspended = swap(
        ctl,
        &p.map,
        &[Target::linear_whole(target.id, p.size / SECTOR)],
    )?;
    Ok(Swapped::Now { suspended })
}

/// Points NAME's map straight at its disk again.
pub fn splice_out(ctl: &Control, name: &Name) -> Result<Swapped, SpliceError> {
    let p = inspect(ctl, name)?;
    if p.route == Route::Disk {
        return Ok(Swapped::Already);
    }
    let suspended = swap(
        ctl,
        &p.map,
        &[Target::linear_whole(p.disk, p.size / SECTOR)],
    )?;
    Ok(Swapped::Now { suspended })
}

/// Removes NAME's map; only while it points straight at its disk.
pub fn unprotect(ctl: &Control, name: &Name) -> Result<(), SpliceError> {
    let p = inspect(ctl, name)?;
    if let Route::Spliced(device) = p.route {
        return Err(SpliceError::StillSpliced {
            map: p.map,
            name: name.clone(),
            device,
        });
    }
    ctl.remove(&p.map)?;
    remove_node(&map_path(name), p.info.dev)
}

/// Whether udev makes the `/dev/mapper` nodes (it runs, and device-mapper
/// users were not told to do without it).
fn udev_makes_nodes() -> bool {
    Path::new("/run/udev/control").exists() && std::env::var_os("DM_DISABLE_UDEV").is_none()
}

/// Makes sure `/dev/mapper/NAME` exists: udev makes it where it runs (we
/// wait a little for it), otherwise we do, as `dmsetup` does without udev.
fn ensure_node(path: &Path, dev: DevId) -> Result<(), SpliceError> {
    let node_error = |source| SpliceError::Node {
        path: path.into(),
        source,
    };
    if udev_makes_nodes() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if path.exists() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() && DevId::from_dev_t(m.rdev()) == dev => {
            return Ok(())
        }
        // A stale node of an earlier map with this name.
        Ok(_) => std::fs::remove_file(path).map_err(node_error)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(node_error(e)),
    }
    nix::sys::stat::mknod(
        path,
        nix::sys::stat::SFlag::S_IFBLK,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        dev.dev_t(),
    )
    .map_err(|e| node_error(e.into()))
}

/// Removes the node [`ensure_node`] made (udev removes its own links).
fn remove_node(path: &Path, dev: DevId) -> Result<(), SpliceError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_block_device() && DevId::from_dev_t(m.rdev()) == dev => {
            std::fs::remove_file(path).map_err(|source| SpliceError::Node {
                path: path.into(),
                source,
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(major: u32, minor: u32) -> DevId {
        DevId { major, minor }
    }

    fn nbd(size: u64, logical_block: u64) -> BlockDev {
        BlockDev {
            path: "/dev/nbd0".into(),
            id: dev(NBD_MAJOR, 0),
            size,
            logical_block,
        }
    }

    #[test]
    fn the_longest_name_fits_device_mappers_limits() {
        let long = Name::new("x".repeat(tidemark_names::MAX_NAME_LEN)).unwrap();
        let uuid = map_uuid(&long, dev(4095, (1 << 20) - 1));
        assert!(uuid.len() < crate::dm::UUID_LEN);
        assert!(map_name(&long).len() < crate::dm::NAME_LEN);
        crate::dm::encode_request(&map_name(&long), Some(&uuid), 0, &[], 0).unwrap();
    }

    #[test]
    fn default_names_come_from_the_disk_path() {
        let default = |p: &str| default_name(Path::new(p)).map(String::from);
        assert_eq!(default("/dev/sdb").as_deref(), Some("sdb"));
        assert_eq!(
            default("/dev/disk/by-id/wwn-0x5000").as_deref(),
            Some("wwn-0x5000")
        );
        assert_eq!(default("/"), None);
        assert_eq!(default("/dev/disk/by-path/a:b"), None);
        assert_eq!(default("/dev/disk/by-id/ata-Samsung_SSD"), None);
    }

    #[test]
    fn the_uuid_records_the_disk_and_only_our_own_name() {
        let uuid = map_uuid(&Name::from_static("data"), dev(8, 16));
        assert_eq!(uuid, "TIDEMARK-8-16-data");
        assert_eq!(
            disk_of_uuid(&uuid, &Name::from_static("data")),
            Some(dev(8, 16))
        );
        assert_eq!(disk_of_uuid(&uuid, &Name::from_static("other")), None);
        assert_eq!(disk_of_uuid("LVM-abc", &Name::from_static("data")), None);
        assert_eq!(
            disk_of_uuid("TIDEMARK-x-1-data", &Name::from_static("data")),
            None
        );
        // Names with dashes survive the round trip.
        let uuid = map_uuid(&Name::from_static("db-wal-1"), dev(259, 3));
        assert_eq!(
            disk_of_uuid(&uuid, &Name::from_static("db-wal-1")),
            Some(dev(259, 3))
        );
    }

    #[test]
    fn routes_follow_the_table() {
        let disk = dev(7, 0);
        let linear = |d| vec![Target::linear_whole(d, 1000)];
        assert_eq!(route_of(&linear(disk), disk), Some(Route::Disk));
        assert_eq!(
            route_of(&linear(dev(43, 0)), disk),
            Some(Route::Spliced(dev(43, 0)))
        );
        assert_eq!(route_of(&[], disk), None);
        let two = [linear(disk), linear(dev(43, 0))].concat();
        assert_eq!(route_of(&two, disk), None);
        let mut offset = linear(disk);
        offset[0].params = "7:0 8".into();
        assert_eq!(route_of(&offset, disk), None);
        let mut other = linear(disk);
        other[0].kind = "error".into();
        assert_eq!(route_of(&other, disk), None);
    }

    #[test]
    fn the_splice_target_must_fit_the_disk() {
        let (disk, map) = (dev(7, 0), dev(253, 0));
        let size = 128 << 20;
        check_splice_target(&nbd(size, 512), disk, map, size, 512).unwrap();
        check_splice_target(&nbd(size, 512), disk, map, size, 4096).unwrap();
        assert!(matches!(
            check_splice_target(&nbd(size + 4096, 512), disk, map, size, 512),
            Err(SpliceError::SizeMismatch { nbd_size, disk_size, .. })
                if nbd_size == size + 4096 && disk_size == size
        ));
        assert!(matches!(
            check_splice_target(&nbd(0, 512), disk, map, size, 512),
            Err(SpliceError::NotConnected { .. })
        ));
        assert!(matches!(
            check_splice_target(&nbd(size, 4096), disk, map, size, 512),
            Err(SpliceError::BlockSizeMismatch { .. })
        ));
        let mut itself = nbd(size, 512);
        itself.id = disk;
        assert!(matches!(
            check_splice_target(&itself, disk, map, size, 512),
            Err(SpliceError::SameDevice { .. })
        ));
        itself.id = map;
        assert!(matches!(
            check_splice_target(&itself, disk, map, size, 512),
            Err(SpliceError::SameDevice { .. })
        ));
    }

    #[test]
    fn errors_tell_the_admin_what_to_do() {
        let e = check_splice_target(&nbd(1 << 20, 512), dev(7, 0), dev(253, 0), 2 << 20, 512)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1048576 bytes") && e.contains("2097152"), "{e}");
        let e = SpliceError::StillSpliced {
            map: "tidemark-data".into(),
            name: Name::from_static("data"),
            device: dev(43, 0),
        }
        .to_string();
        assert!(e.contains("tidemark splice stop data"), "{e}");
        let e = DmError::NoDeviceMapper {
            path: crate::dm::CONTROL_PATH.into(),
        }
        .to_string();
        assert!(e.contains("modprobe dm-mod"), "{e}");
    }

    #[test]
    fn probing_a_regular_file_says_it_is_not_a_block_device() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(
            probe(f.path()),
            Err(SpliceError::NotBlockDevice { .. })
        ));
        assert!(matches!(
            probe(Path::new("/nonexistent/disk")),
            Err(SpliceError::Probe { .. })
        ));
    }
}
