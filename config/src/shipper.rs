//! The `[shipper]` section: where the shipper finds the change log, which
//! receiver it dials and how, and how hard it may use the network.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tidemark_names::Name;

use crate::error::{ConfigError, FieldPath};
use crate::rules;
use crate::{ByteSize, Duration, HostPort, LivenessConfig, TimeWindow};

/// zstd levels the shipper accepts: the fast negative levels up to the
/// strongest regular level.
pub const COMPRESSION_LEVELS: std::ops::RangeInclusive<i32> = -7..=22;

/// Bounds of `batch-size`.
pub const MIN_BATCH_SIZE: ByteSize = ByteSize::kib(4);
/// Bounds of `batch-size`.
pub const MAX_BATCH_SIZE: ByteSize = ByteSize::mib(256);

/// Bounds of `sync-chunk-size`.
pub const MIN_SYNC_CHUNK_SIZE: ByteSize = ByteSize::kib(4);
/// Bounds of `sync-chunk-size`.
pub const MAX_SYNC_CHUNK_SIZE: ByteSize = ByteSize::mib(64);

/// Configuration of `tidemark-shipper`, the `[shipper]` table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [shipper] table"
)]
pub struct ShipperConfig {
    /// This protected host's identity: the name its client certificate was
    /// enrolled under, and under which the receiver files its replicas.
    /// A name (see [`tidemark_names`]). Required.
    pub host: Name,

    /// The consistency group whose log this shipper sends; must match the
    /// tracker's. Default: `"default"`.
    #[serde(default = "default_consistency_group")]
    pub consistency_group: Name,

    /// The tracker's change-log directory, which this shipper tails.
    /// Default: `/var/lib/tidemark/log`.
    #[serde(default = "default_log_dir")]
    pub log_dir: PathBuf,

    /// The receiver to dial, `"host:port"` (QUIC over UDP). The shipper
    /// always dials out; the protected host needs no inbound port. This or
    /// `receivers` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver: Option<HostPort>,

    /// The receivers of a replica site whose receivers share one store
    /// (a Ceph cluster), instead of `receiver`: the shipper dials them in
    /// an order of its own (the same for this host and group every time,
    /// spreading groups over the receivers) and follows a receiver's
    /// redirect to the one that owns its group. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub receivers: Vec<HostPort>,

    /// Name the receiver's TLS certificate must carry; checked instead of
    /// the host part of `receiver`, so the receiver can be dialled by
    /// address. Default: `"tidemark-receiver"`.
    #[serde(default = "default_server_name")]
    pub server_name: Name,

    /// zstd compression level for record batches, -7 (fastest) to 22
    /// (smallest); 0 means zstd's default (3). Default: `1`.
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,

    /// Records are sent in batches of about this many bytes before
    /// compression. 4KiB to 256MiB. Default: `"4MiB"`.
    #[serde(default = "default_batch_size")]
    pub batch_size: ByteSize,

    /// Unix socket of the control interface used by the `tidemark` CLI.
    /// Default: `/run/tidemark/shipper.ctl`.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,

    /// The tracker's control socket: a planned failover asked for on the
    /// replica site stops the tracker through it (a final barrier), then
    /// the shipper delivers everything. Default: `/run/tidemark/tracker.ctl`.
    #[serde(default = "default_tracker_control_socket")]
    pub tracker_control_socket: PathBuf,

    /// Address of the Prometheus `/metrics` endpoint.
    /// Default: `127.0.0.1:9722`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,

    /// The recovery point objective: how far the replica may lag behind
    /// the protected disks. Exported as `tidemark_shipper_rpo_target_seconds`
    /// (the lag alert compares against it) and shown by `tidemark shipper
    /// status`; it changes nothing in how the shipper works. Default:
    /// `"5m"`.
    #[serde(default = "default_rpo_target")]
    pub rpo_target: Duration,

    /// Initial sync and checksum resync read and compare the disk in blocks
    /// of this size. A power of two from 4KiB to 64MiB. Default: `"1MiB"`.
    #[serde(default = "default_sync_chunk_size")]
    pub sync_chunk_size: ByteSize,

    /// Certificates for mutual TLS, the `[shipper.tls]` table.
    /// Default: the files under `/etc/tidemark/pki/` that enrollment writes.
    #[serde(default)]
    pub tls: ClientTlsConfig,

    /// Bandwidth limits, the `[shipper.bandwidth]` table. Default: unlimited.
    #[serde(default)]
    pub bandwidth: BandwidthConfig,

    /// Backoff between retries after transient failures, the
    /// `[shipper.retry]` table. Default: 1s doubling up to 60s, 20% jitter.
    #[serde(default)]
    pub retry: RetryConfig,

    /// How fast a dead receiver is noticed, the `[shipper.liveness]`
    /// table. Default: a keep-alive every second, dead after 4 s of
    /// silence.
    #[serde(default)]
    pub liveness: LivenessConfig,

    /// The group's VM spec (a `[vm]` file, see `tidemark vm`), an absolute
    /// path: the shipper sends it to the receiver when a session starts
    /// and whenever the file changes (looked at every few seconds), so the
    /// replica site can boot the VM at a failover without a copy of its
    /// own. `tidemark vm protect` writes it into a VM's group
    /// configuration. A receiver of a release before protocol version 3
    /// cannot keep it (the shipper logs that once per session). Default:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_spec: Option<PathBuf>,
}

fn default_consistency_group() -> Name {
    Name::from_static("default")
}

fn default_log_dir() -> PathBuf {
    PathBuf::from("/var/lib/tidemark/log")
}

fn default_server_name() -> Name {
    Name::from_static("tidemark-receiver")
}

fn default_compression_level() -> i32 {
    1
}

fn default_batch_size() -> ByteSize {
    ByteSize::mib(4)
}

fn default_control_socket() -> PathBuf {
    PathBuf::from("/run/tidemark/shipper.ctl")
}

fn default_tracker_control_socket() -> PathBuf {
    PathBuf::from("/run/tidemark/tracker.ctl")
}

fn default_metrics_listen() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9722))
}

fn default_rpo_target() -> Duration {
    Duration::from_secs(300)
}

fn default_sync_chunk_size() -> ByteSize {
    ByteSize::mib(1)
}

impl ShipperConfig {
    /// A configuration with every setting at its default, for the given
    /// required ones.
    pub fn new(host: Name, receiver: HostPort) -> Self {
        Self {
            host,
            consistency_group: default_consistency_group(),
            log_dir: default_log_dir(),
            receiver: Some(receiver),
            receivers: Vec::new(),
            server_name: default_server_name(),
            compression_level: default_compression_level(),
            batch_size: default_batch_size(),
            control_socket: default_control_socket(),
            tracker_control_socket: default_tracker_control_socket(),
            metrics_listen: default_metrics_listen(),
            rpo_target: default_rpo_target(),
            sync_chunk_size: default_sync_chunk_size(),
            tls: ClientTlsConfig::default(),
            bandwidth: BandwidthConfig::default(),
            retry: RetryConfig::default(),
            liveness: LivenessConfig::default(),
            vm_spec: None,
        }
    }

    /// The receivers to dial: `receivers`, or the one `receiver`.
    pub fn receivers(&self) -> Vec<HostPort> {
        match &self.receiver {
            Some(one) => vec![one.clone()],
            None => self.receivers.clone(),
        }
    }

    /// Checks the rules a well-typed `[shipper]` table must also follow.
    /// Errors name the setting as `shipper.<key>`, without a file position.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at = FieldPath::root().key("shipper");
        let invalid = |key: &str, message: String| ConfigError::invalid(at.key(key), message);

        match (&self.receiver, self.receivers.is_empty()) {
            (Some(_), false) => return Err(invalid(
                "receivers",
                "set receiver (one receiver) or receivers (several sharing one store), not both"
                    .to_owned(),
            )),
            (None, true) => {
                return Err(ConfigError::invalid(
                    at.clone(),
                    "no receiver: add receiver = \"HOST:PORT\" (or receivers = [\"HOST:PORT\", …])"
                        .to_owned(),
                ))
            }
            _ => {}
        }
        for (i, r) in self.receivers.iter().enumerate() {
            if self.receivers[..i].contains(r) {
                return Err(invalid("receivers", format!("{r} is listed twice")));
            }
        }

        rules::check_path(&self.log_dir).map_err(|m| invalid("log-dir", m))?;
        if let Some(spec) = &self.vm_spec {
            rules::check_path(spec).map_err(|m| invalid("vm-spec", m))?;
            if !spec.is_absolute() {
                return Err(invalid(
                    "vm-spec",
                    format!("vm-spec {} must be an absolute path", spec.display()),
                ));
            }
        }
        if !COMPRESSION_LEVELS.contains(&self.compression_level) {
            return Err(invalid(
                "compression-level",
                format!(
                    "compression-level {} is outside {} to {}",
                    self.compression_level,
                    COMPRESSION_LEVELS.start(),
                    COMPRESSION_LEVELS.end()
                ),
            ));
        }
        rules::check_between(self.batch_size, MIN_BATCH_SIZE, MAX_BATCH_SIZE)
            .map_err(|m| invalid("batch-size", format!("batch-size {m}")))?;
        rules::check_unix_socket_path(&self.control_socket)
            .map_err(|m| invalid("control-socket", m))?;
        rules::check_unix_socket_path(&self.tracker_control_socket)
            .map_err(|m| invalid("tracker-control-socket", m))?;
        rules::check_power_of_two(
            self.sync_chunk_size,
            MIN_SYNC_CHUNK_SIZE,
            MAX_SYNC_CHUNK_SIZE,
        )
        .map_err(|m| invalid("sync-chunk-size", format!("sync-chunk-size {m}")))?;
        self.tls.validate(&at.key("tls"))?;
        self.bandwidth.validate(&at.key("bandwidth"))?;
        self.retry.validate(&at.key("retry"))?;
        self.liveness.validate(&at.key("liveness"))?;
        Ok(())
    }
}

/// The shipper's side of mutual TLS, the `[shipper.tls]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [shipper.tls] table"
)]
pub struct ClientTlsConfig {
    /// The receiver's CA certificate (PEM); the receiver's certificate must
    /// chain to it. Default: `/etc/tidemark/pki/ca.crt`.
    pub ca: PathBuf,
    /// This host's client certificate (PEM), issued at enrollment.
    /// Default: `/etc/tidemark/pki/host.crt`.
    pub cert: PathBuf,
    /// The private key of `cert` (PEM); keep it readable by the shipper
    /// only. Default: `/etc/tidemark/pki/host.key`.
    pub key: PathBuf,
    /// How long before `cert` expires the shipper asks the receiver for a
    /// new one (over its connection; the new certificate and the
    /// receiver's CA bundle replace `cert` and `ca`). `"0s"` turns it off.
    /// Default: `"30d"`.
    pub renew_before: Duration,
}

impl Default for ClientTlsConfig {
    fn default() -> Self {
        Self {
            ca: PathBuf::from("/etc/tidemark/pki/ca.crt"),
            cert: PathBuf::from("/etc/tidemark/pki/host.crt"),
            key: PathBuf::from("/etc/tidemark/pki/host.key"),
            renew_before: Duration::from_secs(30 * 86_400),
        }
    }
}

impl ClientTlsConfig {
    fn validate(&self, at: &FieldPath) -> Result<(), ConfigError> {
        for (key, path) in [("ca", &self.ca), ("cert", &self.cert), ("key", &self.key)] {
            rules::check_path(path).map_err(|m| ConfigError::invalid(at.key(key), m))?;
        }
        Ok(())
    }
}

/// Bandwidth limits, the `[shipper.bandwidth]` table.
///
/// Rates are bytes per second on the wire, after compression. A schedule
/// window, while it is open, replaces `limit`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [shipper.bandwidth] table"
)]
pub struct BandwidthConfig {
    /// Rate limit outside the schedule's windows, per second, e.g.
    /// `"100MiB"`. Default: not set (unlimited).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<ByteSize>,

    /// Daily windows with their own limit, one
    /// `[[shipper.bandwidth.schedule]]` table each; windows must not
    /// overlap. Default: none.
    #[serde(deserialize_with = "schedule_tables")]
    pub schedule: Vec<ScheduledLimit>,
}

fn schedule_tables<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<ScheduledLimit>, D::Error> {
    crate::table_list::deserialize(d, "shipper.bandwidth.schedule")
}

/// A rate limit for a daily time window, a
/// `[[shipper.bandwidth.schedule]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [[shipper.bandwidth.schedule]] table with `window` and `limit`"
)]
pub struct ScheduledLimit {
    /// Local time window, `"HH:MM-HH:MM"`, e.g. `"08:00-18:00"`; may run
    /// past midnight (`"22:00-06:00"`). Required.
    pub window: TimeWindow,
    /// Rate limit while the window is open, per second, e.g. `"20MiB"`.
    /// Required.
    pub limit: ByteSize,
}

impl BandwidthConfig {
    /// The rate limit in force at `minute_of_day` (minutes since local
    /// midnight): the open schedule window's, else `limit`; `None` is
    /// unlimited.
    pub fn limit_at(&self, minute_of_day: u16) -> Option<ByteSize> {
        self.schedule
            .iter()
            .find(|entry| entry.window.contains(minute_of_day))
            .map(|entry| entry.limit)
            .or(self.limit)
    }

    fn validate(&self, at: &FieldPath) -> Result<(), ConfigError> {
        if let Some(limit) = self.limit {
            rules::check_nonzero(limit).map_err(|m| {
                ConfigError::invalid(
                    at.key("limit"),
                    format!("limit {m}; leave it out for no limit"),
                )
            })?;
        }
        for (i, entry) in self.schedule.iter().enumerate() {
            let here = at.key("schedule").index(i);
            rules::check_nonzero(entry.limit)
                .map_err(|m| ConfigError::invalid(here.key("limit"), format!("limit {m}")))?;
            if let Some(first) = self.schedule[..i]
                .iter()
                .position(|earlier| earlier.window.overlaps(&entry.window))
            {
                return Err(ConfigError::invalid(
                    here.key("window"),
                    format!(
                        "window {} overlaps window {} of shipper.bandwidth.schedule[{first}]",
                        entry.window, self.schedule[first].window
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Backoff after transient failures, the `[shipper.retry]` table.
///
/// The n-th consecutive retry waits `initial-backoff * multiplier^(n-1)`,
/// capped at `max-backoff`, then moved at random by up to `jitter` of itself
/// either way so that many hosts do not reconnect in step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [shipper.retry] table"
)]
pub struct RetryConfig {
    /// Wait before the first retry; more than zero. Default: `"1s"`.
    pub initial_backoff: Duration,
    /// Longest wait between retries; at least `initial-backoff`.
    /// Default: `"60s"`.
    pub max_backoff: Duration,
    /// Growth of the wait per consecutive failure; at least 1.0.
    /// Default: `2.0`.
    pub multiplier: f64,
    /// Random spread of each wait, as a fraction of it, 0.0 to 1.0.
    /// Default: `0.2`.
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryConfig {
    fn validate(&self, at: &FieldPath) -> Result<(), ConfigError> {
        if self.initial_backoff.get().is_zero() {
            return Err(ConfigError::invalid(
                at.key("initial-backoff"),
                "initial-backoff must be more than zero",
            ));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(ConfigError::invalid(
                at.key("max-backoff"),
                format!(
                    "max-backoff {} is shorter than initial-backoff {}",
                    self.max_backoff, self.initial_backoff
                ),
            ));
        }
        // Written as "not (acceptable)" so that NaN fails too.
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(ConfigError::invalid(
                at.key("multiplier"),
                format!(
                    "multiplier {} must be a number of at least 1.0",
                    self.multiplier
                ),
            ));
        }
        if !(self.jitter.is_finite() && (0.0..=1.0).contains(&self.jitter)) {
            return Err(ConfigError::invalid(
                at.key("jitter"),
                format!("jitter {} must be a fraction from 0.0 to 1.0", self.jitter),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduled(window: &str, limit: ByteSize) -> ScheduledLimit {
        ScheduledLimit {
            window: TimeWindow::parse(window).unwrap(),
            limit,
        }
    }

    #[test]
    fn the_open_window_sets_the_limit() {
        let bandwidth = BandwidthConfig {
            limit: Some(ByteSize::mib(100)),
            schedule: vec![
                scheduled("08:00-18:00", ByteSize::mib(20)),
                scheduled("22:00-02:00", ByteSize::mib(500)),
            ],
        };
        assert_eq!(bandwidth.limit_at(7 * 60 + 59), Some(ByteSize::mib(100)));
        assert_eq!(bandwidth.limit_at(8 * 60), Some(ByteSize::mib(20)));
        assert_eq!(bandwidth.limit_at(18 * 60), Some(ByteSize::mib(100)));
        assert_eq!(bandwidth.limit_at(23 * 60), Some(ByteSize::mib(500)));
        assert_eq!(bandwidth.limit_at(60), Some(ByteSize::mib(500)));
    }

    #[test]
    fn no_limit_outside_windows_when_none_is_set() {
        let bandwidth = BandwidthConfig {
            limit: None,
            schedule: vec![scheduled("08:00-18:00", ByteSize::mib(20))],
        };
        assert_eq!(bandwidth.limit_at(12 * 60), Some(ByteSize::mib(20)));
        assert_eq!(bandwidth.limit_at(20 * 60), None);
        assert_eq!(BandwidthConfig::default().limit_at(0), None);
    }

    #[test]
    fn a_vm_spec_is_an_absolute_path() {
        let mut cfg = ShipperConfig::new(
            Name::from_static("h"),
            "dr.example.com:7480".parse().unwrap(),
        );
        cfg.vm_spec = Some(PathBuf::from("/etc/tidemark/vms/web1.toml"));
        assert!(cfg.validate().is_ok());
        cfg.vm_spec = Some(PathBuf::from("web1.toml"));
        let e = cfg.validate().unwrap_err().to_string();
        assert!(
            e.contains("shipper.vm-spec") && e.contains("absolute"),
            "{e}"
        );
    }
}
