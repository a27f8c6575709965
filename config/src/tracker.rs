//! The `[tracker]` section: which disks one tracker process serves, where
//! its change log lives, and how it is reached.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tidemark_names::Name;

use crate::error::{ConfigError, FieldPath};
use crate::rules;
use crate::{ByteSize, Duration};

/// Smallest change-log segment. Smaller segments mean more files and more
/// fsyncs of the log directory for nothing.
pub const MIN_SEGMENT_SIZE: ByteSize = ByteSize::mib(1);

/// Segments are preallocated and written with O_DIRECT, so their size is a
/// multiple of this.
pub const SEGMENT_ALIGNMENT: ByteSize = ByteSize::kib(4);

/// Smallest allowed `max-block-size`: one page, the smallest block the
/// kernel sends.
pub const MIN_MAX_BLOCK_SIZE: ByteSize = ByteSize::kib(4);

/// Largest allowed `max-block-size`: the most the kernel NBD client will ask
/// for in one request, and what the tracker accepts whatever it announces.
pub const MAX_MAX_BLOCK_SIZE: ByteSize = ByteSize::mib(32);

/// Smallest `activity-extent-size`: the tracker keeps about 13 bytes of
/// memory per extent and scans every extent once a second, so smaller
/// extents cost a large disk gigabytes and stall writes; it is also the
/// granularity of the dirty bitmap, which finer hot extents would not
/// sharpen.
pub const MIN_ACTIVITY_EXTENT_SIZE: ByteSize = ByteSize::kib(64);
/// Largest `activity-extent-size`.
pub const MAX_ACTIVITY_EXTENT_SIZE: ByteSize = ByteSize::gib(1);

/// The rule for `activity-extent-size`, checked by `config check` and by
/// the tracker on whatever it is given (a configuration file or not): a
/// power of two from [`MIN_ACTIVITY_EXTENT_SIZE`] to
/// [`MAX_ACTIVITY_EXTENT_SIZE`]. The error names the setting.
pub fn check_activity_extent_size(size: ByteSize) -> Result<(), ConfigError> {
    rules::check_power_of_two(size, MIN_ACTIVITY_EXTENT_SIZE, MAX_ACTIVITY_EXTENT_SIZE).map_err(
        |m| {
            ConfigError::invalid(
                FieldPath::root().key("tracker").key("activity-extent-size"),
                format!("activity-extent-size {m}"),
            )
        },
    )
}

/// Longest NBD export name the protocol allows.
const MAX_EXPORT_NAME_LEN: usize = 4096;

/// Configuration of `tidemark-tracker`, the `[tracker]` table.
///
/// One tracker serves one consistency group: every disk listed here shares
/// one ordered change log, so a recovery point is consistent across them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [tracker] table"
)]
pub struct TrackerConfig {
    /// Name of the consistency group this tracker serves; the shipper and
    /// the receiver use it to keep the group's recovery points together.
    /// A name (see [`tidemark_names`]). Default: `"default"`.
    pub consistency_group: Name,

    /// Directory of the change log's segment files, shared with the shipper
    /// (which tails it). Put it on a fast disk that is not one of the
    /// protected disks. Default: `/var/lib/tidemark/log`.
    pub log_dir: PathBuf,

    /// Most space the change log may take. When the shipper falls this far
    /// behind, the tracker switches the disks to bitmap mode (only dirty
    /// extents are remembered) and a resync follows; application I/O never
    /// blocks on a full log. Default: `"8GiB"`.
    pub log_size_limit: ByteSize,

    /// Size of each preallocated segment file. At least 1MiB, a multiple of
    /// 4KiB, larger than `max-block-size` (a record never spans segments)
    /// and at most half of `log-size-limit`. Default: `"64MiB"`.
    pub segment_size: ByteSize,

    /// Unix socket on which the disks are served over NBD to the kernel's
    /// NBD client. Default: `/run/tidemark/nbd.sock`.
    pub socket: PathBuf,

    /// A group allowed to connect to `socket` besides the tracker's own
    /// user, for a local service that runs as another user (libvirt's
    /// qemu): the socket is then made 0660 and given to this group instead
    /// of 0600. A group name (or a numeric gid) that must exist when the
    /// tracker starts. Never more than one group: no setting gives the
    /// socket to every local user. Default: not set (0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,

    /// Also serve NBD on this TCP address. NBD has no authentication, so the
    /// address must be a loopback address unless `allow-remote-nbd` is set.
    /// Default: not set (unix socket only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_listen: Option<SocketAddr>,

    /// Allow `tcp-listen` on a non-loopback address, exposing the disks
    /// unauthenticated to the network. Default: `false`.
    pub allow_remote_nbd: bool,

    /// Unix socket of the control interface used by the `tidemark` CLI.
    /// Default: `/run/tidemark/tracker.ctl`.
    pub control_socket: PathBuf,

    /// Address of the Prometheus `/metrics` endpoint.
    /// Default: `127.0.0.1:9721`.
    pub metrics_listen: SocketAddr,

    /// Granularity of the persistent activity map: extents that may hold
    /// writes not yet in the log are recorded at this size before the write
    /// is issued, and re-sent whole after an unclean restart. Smaller means
    /// less to resend, more map updates (and about 13 bytes of the
    /// tracker's memory per extent). A power of two from 64KiB to 1GiB.
    /// Default: `"4MiB"`.
    pub activity_extent_size: ByteSize,

    /// Lock the tracker's memory (`mlockall`) so it never waits on swap while
    /// it sits in the block I/O path. Default: `false`.
    pub mlockall: bool,

    /// Largest single request announced to the NBD client. Clients that
    /// read the announcement (qemu, libnbd, nbdfuse) split larger requests,
    /// and `tracker serve --attach` limits the kernel device to it. It is a
    /// request, not a limit: the kernel NBD client attached by `nbd-client`
    /// never hears it and sends up to 32MiB, and such requests are served
    /// all the same (a write longer than a segment is logged as several
    /// consecutive records). A power of two from 4KiB to 32MiB.
    /// Default: `"32MiB"`.
    pub max_block_size: ByteSize,

    /// The protected disks, one `[[tracker.disk]]` table each. At least one
    /// is required. Tables may be added, removed or reordered between
    /// starts: the tracker keeps each disk's id by its name (a removed
    /// disk's id is never given again). Default: none.
    #[serde(rename = "disk", deserialize_with = "disk_tables")]
    pub disks: Vec<DiskConfig>,

    /// Application-consistent recovery points, the
    /// `[tracker.app-consistent]` table: what `tidemark mark
    /// --app-consistent` and an application-consistent span point
    /// quiesce, and an optional schedule. Default: nothing quiesced, no
    /// schedule.
    pub app_consistent: AppConsistentConfig,

    /// Attach the kernel's NBD client to one of the disks, the
    /// `[tracker.attach]` table: the tracker connects `/dev/nbdN` itself
    /// over netlink (no `nbd-client`). The table's presence turns it on
    /// (so does `tidemark tracker serve --attach`). Default: not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attach: Option<AttachConfig>,

    /// Serve one of the disks to the kernel as `/dev/ublkbN` through ublk,
    /// the `[tracker.ublk]` table (so does `tidemark tracker serve
    /// --ublk`). Needs the ublk_drv module (Linux 6.0+). Default: not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ublk: Option<UblkConfig>,
}

/// The ublk device the tracker serves, the `[tracker.ublk]` table.
///
/// The device is made with user recovery where the kernel has it: a
/// tracker that stops with `keep-device` (or dies) leaves it quiesced,
/// holding I/O, and the next tracker takes it over without an I/O error.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [tracker.ublk] table"
)]
pub struct UblkConfig {
    /// The disk to serve, by its NBD export name. Default: the first
    /// `[[tracker.disk]]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// Use exactly `/dev/ublkb<id>`. Default: the kernel's choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// Requests in flight per queue, 1 to 4096. Default: `64`.
    pub queue_depth: u16,
    /// Hardware queues, 1 to 4096; each is served by its own thread,
    /// pinned to the CPUs whose requests the kernel sends it. Default: one
    /// per CPU the tracker may run on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    /// Copy request data with the driver's user copy (`UBLK_F_USER_COPY`,
    /// Linux 6.5+) when it has it: buffers are taken per request from the
    /// tracker's data budget. `false`: the driver copies into fixed per-tag
    /// buffers. Default: `true`.
    pub user_copy: bool,
    /// On SIGTERM leave the device, quiesced, for the next tracker to
    /// take over, instead of removing it. Default: `false`.
    pub keep_device: bool,
}

impl Default for UblkConfig {
    fn default() -> Self {
        Self {
            export: None,
            id: None,
            queue_depth: 64,
            queues: None,
            user_copy: true,
            keep_device: false,
        }
    }
}

/// The kernel NBD device the tracker attaches itself, the
/// `[tracker.attach]` table.
///
/// The tracker hands the kernel one end of a socketpair for the disk and
/// serves the other. A tracker that stops with `keep-device` (or dies)
/// leaves the device configured; the next one re-adopts it within
/// `dead-connection-timeout`, and the I/O waiting meanwhile goes on
/// without errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [tracker.attach] table"
)]
pub struct AttachConfig {
    /// The disk to attach, by its NBD export name. Default: the first
    /// `[[tracker.disk]]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<String>,
    /// Use exactly `/dev/nbd<index>`. Default: the first free device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// How long one request may take before the kernel gives up on the
    /// connection and requeues the request (also how long requests in
    /// flight when a tracker dies wait before they are sent again). At
    /// least 1s. Default: `"30s"`.
    pub io_timeout: Duration,
    /// How long the kernel holds I/O while no tracker serves the device
    /// (a restart), before failing it. At least 1s. Default: `"2m"`.
    pub dead_connection_timeout: Duration,
    /// On SIGTERM leave the device configured, for the next tracker to
    /// re-adopt, instead of disconnecting it. Default: `false`.
    pub keep_device: bool,
}

impl Default for AttachConfig {
    fn default() -> Self {
        Self {
            export: None,
            index: None,
            io_timeout: Duration::from_secs(30),
            dead_connection_timeout: Duration::from_secs(120),
            keep_device: false,
        }
    }
}

/// Application-consistent points, the `[tracker.app-consistent]` table.
///
/// A mark runs `pre-hooks` in order, freezes the `freeze` filesystems
/// (FIFREEZE, as `fsfreeze -f`), inserts the marker, thaws them and runs
/// `post-hooks`. Hooks and the frozen time are bounded by `timeout`: a
/// filesystem is thawed when it runs out, whatever else happens, and the
/// mark then fails without a marker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [tracker.app-consistent] table"
)]
pub struct AppConsistentConfig {
    /// Mount points to freeze (filesystems on the protected disks).
    /// Default: none.
    pub freeze: Vec<PathBuf>,
    /// Shell commands run before freezing (`sh -c`), e.g. a database's
    /// "flush and hold" script; a failure aborts the mark. Default: none.
    pub pre_hooks: Vec<String>,
    /// Shell commands run after thawing, e.g. the database's "resume";
    /// run even when the mark failed. Default: none.
    pub post_hooks: Vec<String>,
    /// Most time the pre-hooks and the freeze may take together, e.g.
    /// `"30s"`; more than zero. Default: `"30s"`.
    pub timeout: Duration,
    /// Take an application-consistent point this often (the tracker does
    /// it itself, labelled `scheduled`), e.g. `"1h"`. Default: not set
    /// (only on request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Duration>,
    /// A VM's group: the unix socket of the guest agent
    /// (`qemu-guest-agent`) of the VM whose disks the group holds, an
    /// absolute path. A mark freezes the guest's filesystems through it
    /// (`guest-fsfreeze-freeze`, marker, `guest-fsfreeze-thaw`, within
    /// `timeout`); when no agent answers, the point is crash-consistent
    /// and the mark says so. Default: not set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_agent: Option<PathBuf>,
}

impl Default for AppConsistentConfig {
    fn default() -> Self {
        Self {
            freeze: Vec::new(),
            pre_hooks: Vec::new(),
            post_hooks: Vec::new(),
            timeout: Duration::from_secs(30),
            schedule: None,
            guest_agent: None,
        }
    }
}

fn disk_tables<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<DiskConfig>, D::Error> {
    crate::table_list::deserialize(d, "tracker.disk")
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self {
            consistency_group: Name::from_static("default"),
            log_dir: PathBuf::from("/var/lib/tidemark/log"),
            log_size_limit: ByteSize::gib(8),
            segment_size: ByteSize::mib(64),
            socket: PathBuf::from("/run/tidemark/nbd.sock"),
            socket_group: None,
            tcp_listen: None,
            allow_remote_nbd: false,
            control_socket: PathBuf::from("/run/tidemark/tracker.ctl"),
            metrics_listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9721)),
            activity_extent_size: ByteSize::mib(4),
            mlockall: false,
            max_block_size: ByteSize::mib(32),
            disks: Vec::new(),
            app_consistent: AppConsistentConfig::default(),
            attach: None,
            ublk: None,
        }
    }
}

/// One protected disk, a `[[tracker.disk]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [[tracker.disk]] table with `name` and `path`"
)]
pub struct DiskConfig {
    /// Name of the disk, unique within the consistency group and stable for
    /// its lifetime: replicas and recovery points at the receiver are filed
    /// under it, and the tracker knows the disk's id by it (a disk renamed
    /// is a disk removed and a new one added). A name (see
    /// [`tidemark_names`]). Required.
    pub name: Name,

    /// The backing block device (`/dev/disk/by-id/...` is stable across
    /// reboots; `/dev/sdb` is not) or image file that holds the disk's data.
    /// Required.
    pub path: PathBuf,

    /// Name of the NBD export the kernel client connects to.
    /// Default: the disk's `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_name: Option<String>,

    /// How the tracker writes the backing device: `"none"` (O_DIRECT, no
    /// page cache: what is acknowledged is on the device, and a barrier
    /// only has to flush the device's own cache) or `"writeback"` (through
    /// the page cache, made durable with `fdatasync` at every barrier, as
    /// nbdkit and qemu-nbd do by default). Both keep every guarantee: what
    /// a barrier acknowledged is durable either way, and the activity map
    /// covers everything else after a crash. Default: `"none"` on a block
    /// device (the filesystem above it already caches; caching twice only
    /// costs memory), `"writeback"` on an image file (small writes are
    /// absorbed in memory and written in the filesystem's larger units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheMode>,
}

/// How a disk's backing device is written (see [`DiskConfig::cache`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheMode {
    /// O_DIRECT: no page cache.
    None,
    /// The page cache, `fdatasync` at barriers.
    Writeback,
}

impl DiskConfig {
    /// The NBD export name: `export-name` if set, else `name`.
    pub fn effective_export_name(&self) -> &str {
        self.export_name.as_deref().unwrap_or(&self.name)
    }
}

impl TrackerConfig {
    /// Checks the rules a well-typed `[tracker]` table must also follow.
    /// Errors name the setting as `tracker.<key>`, without a file position.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at = FieldPath::root().key("tracker");
        let invalid = |key: &str, message: String| ConfigError::invalid(at.key(key), message);

        let app = at.key("app-consistent");
        if self.app_consistent.timeout.get().is_zero() {
            return Err(ConfigError::invalid(
                app.key("timeout"),
                "timeout must be more than zero: a filesystem must never stay frozen",
            ));
        }
        if self
            .app_consistent
            .schedule
            .is_some_and(|s| s.get() < std::time::Duration::from_secs(60))
        {
            return Err(ConfigError::invalid(
                app.key("schedule"),
                "schedule must be at least 1m",
            ));
        }
        if let Some(path) = &self.app_consistent.guest_agent {
            if !path.is_absolute() {
                return Err(ConfigError::invalid(
                    app.key("guest-agent"),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        for (i, path) in self.app_consistent.freeze.iter().enumerate() {
            if !path.is_absolute() {
                return Err(ConfigError::invalid(
                    app.key("freeze").index(i),
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        self.validate_disks(&at)?;
        self.validate_attach(&at)?;
        self.validate_ublk(&at)?;
        rules::check_path(&self.log_dir).map_err(|m| invalid("log-dir", m))?;

        if self.segment_size < MIN_SEGMENT_SIZE {
            return Err(invalid(
                "segment-size",
                format!(
                    "segment-size {} is below the minimum of {MIN_SEGMENT_SIZE}",
                    self.segment_size
                ),
            ));
        }
        if !self.segment_size.0.is_multiple_of(SEGMENT_ALIGNMENT.0) {
            return Err(invalid(
                "segment-size",
                format!(
                    "segment-size {} is not a multiple of {SEGMENT_ALIGNMENT}",
                    self.segment_size
                ),
            ));
        }
        // The log always keeps the segment being written and the one being
        // opened next, so it needs room for two.
        if self.segment_size.as_u64().saturating_mul(2) > self.log_size_limit.as_u64() {
            return Err(invalid(
                "segment-size",
                format!(
                    "segment-size {} is more than half of log-size-limit {}: the log needs room for two segments",
                    self.segment_size, self.log_size_limit
                ),
            ));
        }
        rules::check_power_of_two(self.max_block_size, MIN_MAX_BLOCK_SIZE, MAX_MAX_BLOCK_SIZE)
            .map_err(|m| invalid("max-block-size", format!("max-block-size {m}")))?;
        if self.segment_size <= self.max_block_size {
            return Err(invalid(
                "segment-size",
                format!(
                    "segment-size {} must be larger than max-block-size {}, so that a write \
                     of the announced largest size is one record",
                    self.segment_size, self.max_block_size
                ),
            ));
        }
        check_activity_extent_size(self.activity_extent_size)?;

        rules::check_unix_socket_path(&self.socket).map_err(|m| invalid("socket", m))?;
        if let Some(group) = &self.socket_group {
            rules::check_group_name(group).map_err(|m| invalid("socket-group", m))?;
        }
        rules::check_unix_socket_path(&self.control_socket)
            .map_err(|m| invalid("control-socket", m))?;
        if self.control_socket == self.socket {
            return Err(invalid(
                "control-socket",
                "control-socket and socket must be different paths".to_owned(),
            ));
        }
        if let Some(tcp) = self.tcp_listen {
            if !tcp.ip().is_loopback() && !self.allow_remote_nbd {
                return Err(invalid(
                    "tcp-listen",
                    format!(
                        "{tcp} is not a loopback address; NBD has no authentication, so \
                         serving it to the network needs `allow-remote-nbd = true`"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_ublk(&self, at: &FieldPath) -> Result<(), ConfigError> {
        let Some(ublk) = &self.ublk else {
            return Ok(());
        };
        let here = at.key("ublk");
        let first = || {
            self.disks
                .first()
                .map(|d| d.effective_export_name().to_owned())
        };
        let served = ublk.export.clone().or_else(first);
        if let Some(export) = &ublk.export {
            if !self
                .disks
                .iter()
                .any(|d| d.effective_export_name() == export)
            {
                return Err(ConfigError::invalid(
                    here.key("export"),
                    format!("export {export:?} is not the export name of any [[tracker.disk]]"),
                ));
            }
        }
        if !(1..=4096).contains(&ublk.queue_depth) {
            return Err(ConfigError::invalid(
                here.key("queue-depth"),
                "queue-depth must be from 1 to 4096 (the kernel's limit)",
            ));
        }
        if ublk.queues.is_some_and(|q| !(1..=4096).contains(&q)) {
            return Err(ConfigError::invalid(
                here.key("queues"),
                "queues must be from 1 to 4096 (the kernel's limit); leave it unset for one per CPU",
            ));
        }
        if let Some(attach) = &self.attach {
            if attach.export.clone().or_else(first) == served {
                return Err(ConfigError::invalid(
                    here.key("export"),
                    "[tracker.attach] already gives this disk to the kernel as /dev/nbdN: one kernel device per disk",
                ));
            }
        }
        Ok(())
    }

    fn validate_attach(&self, at: &FieldPath) -> Result<(), ConfigError> {
        let Some(attach) = &self.attach else {
            return Ok(());
        };
        let here = at.key("attach");
        if let Some(export) = &attach.export {
            if !self
                .disks
                .iter()
                .any(|d| d.effective_export_name() == export)
            {
                return Err(ConfigError::invalid(
                    here.key("export"),
                    format!("export {export:?} is not the export name of any [[tracker.disk]]"),
                ));
            }
        }
        for (key, value) in [
            ("io-timeout", attach.io_timeout),
            ("dead-connection-timeout", attach.dead_connection_timeout),
        ] {
            if value.get() < std::time::Duration::from_secs(1) {
                return Err(ConfigError::invalid(
                    here.key(key),
                    format!("{key} must be at least 1s: the kernel counts it in seconds"),
                ));
            }
        }
        Ok(())
    }

    fn validate_disks(&self, at: &FieldPath) -> Result<(), ConfigError> {
        if self.disks.is_empty() {
            return Err(ConfigError::invalid(
                at.key("disk"),
                "no disks; add at least one [[tracker.disk]] table with `name` and `path`",
            ));
        }
        let mut names: HashMap<&Name, usize> = HashMap::new();
        let mut exports: HashMap<&str, usize> = HashMap::new();
        let mut paths: HashMap<&PathBuf, usize> = HashMap::new();
        for (i, disk) in self.disks.iter().enumerate() {
            let here = at.key("disk").index(i);
            let invalid = |key: &str, message: String| ConfigError::invalid(here.key(key), message);
            let duplicate = |key: &str, what: &str, first: usize| {
                invalid(key, format!("{what} already used by tracker.disk[{first}]"))
            };

            if let Some(&first) = names.get(&disk.name) {
                return Err(duplicate(
                    "name",
                    &format!("disk name {:?} is", disk.name),
                    first,
                ));
            }
            names.insert(&disk.name, i);

            rules::check_path(&disk.path).map_err(|m| invalid("path", m))?;
            if let Some(&first) = paths.get(&disk.path) {
                return Err(duplicate(
                    "path",
                    &format!("{} is", disk.path.display()),
                    first,
                ));
            }
            paths.insert(&disk.path, i);

            let export = disk.effective_export_name();
            if export.is_empty() || export.len() > MAX_EXPORT_NAME_LEN || export.contains('\0') {
                return Err(invalid(
                    "export-name",
                    format!("export-name must be 1 to {MAX_EXPORT_NAME_LEN} bytes without NUL"),
                ));
            }
            if let Some(&first) = exports.get(export) {
                return Err(duplicate(
                    "export-name",
                    &format!("NBD export name {export:?} is"),
                    first,
                ));
            }
            exports.insert(export, i);
        }
        Ok(())
    }
}
