//! The `[receiver]` section: where replicas and recovery points are kept,
//! for how long, and which protected hosts may send.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tidemark_names::Name;

use crate::console::ConsoleConfig;
use crate::error::{ConfigError, FieldPath};
use crate::rules;
use crate::{ByteSize, Duration, LivenessConfig};

/// Configuration of `tidemark-receiver`, the `[receiver]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [receiver] table"
)]
pub struct ReceiverConfig {
    /// UDP address the QUIC server listens on; shippers dial it.
    /// Default: `0.0.0.0:7480`.
    pub listen: SocketAddr,

    /// Directory of the replica volumes and recovery points, one
    /// subdirectory per host and consistency group.
    /// Default: `/var/lib/tidemark/replicas`.
    pub data_dir: PathBuf,

    /// Address of the Prometheus `/metrics` endpoint.
    /// Default: `127.0.0.1:9723`.
    pub metrics_listen: SocketAddr,

    /// Unix socket of the control interface used by the `tidemark` CLI.
    /// Default: `/run/tidemark/receiver.ctl`.
    pub control_socket: PathBuf,

    /// The receiver's certificates and its small CA, the `[receiver.tls]`
    /// table. Default: the files under `/etc/tidemark/pki/` that
    /// `tidemark init` writes.
    pub tls: ServerTlsConfig,

    /// How long recovery points are kept, the `[receiver.retention]` table.
    /// Default: 24 hours, at most 100000 points, no space limit.
    pub retention: RetentionConfig,

    /// Where the replica stores live, the `[receiver.store]` table.
    /// Default: the local store in `data-dir`.
    #[serde(skip_serializing_if = "StoreConfig::is_default")]
    pub store: StoreConfig,

    /// How fast a dead shipper is noticed, the `[receiver.liveness]`
    /// table. Default: a keep-alive every second, dead after 4 s of
    /// silence.
    pub liveness: LivenessConfig,

    /// Enrolled protected hosts, one `[[receiver.host]]` table each.
    /// Default: none (hosts can be enrolled at run time with the CLI).
    #[serde(rename = "host", deserialize_with = "host_tables")]
    pub hosts: Vec<HostEntry>,

    /// Spans: recovery points consistent across several hosts' groups,
    /// one `[[receiver.span]]` table each. This configuration is the
    /// authority on membership: a host takes part only in the spans named
    /// here. Default: none.
    #[serde(
        rename = "span",
        deserialize_with = "span_tables",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub spans: Vec<SpanEntry>,

    /// The web console, the `[receiver.console]` table. Default: off.
    #[serde(skip_serializing_if = "ConsoleConfig::is_default")]
    pub console: ConsoleConfig,
}

fn host_tables<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<HostEntry>, D::Error> {
    crate::table_list::deserialize(d, "receiver.host")
}

fn span_tables<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<SpanEntry>, D::Error> {
    crate::table_list::deserialize(d, "receiver.span")
}

/// A span, a `[[receiver.span]]` table: consistency groups of several
/// hosts whose recovery points are taken together, so that they come
/// back as of the same instant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [[receiver.span]] table with `name` and `members`"
)]
pub struct SpanEntry {
    /// The span's name (see [`tidemark_names`]). Required.
    pub name: Name,
    /// Its members, each `"HOST/GROUP"`: a host's consistency group. At
    /// least two; a group is in one span at most. Required.
    pub members: Vec<SpanMember>,
    /// How often a span point is taken, e.g. `"15s"`; more than zero.
    /// Default: `"15s"`.
    #[serde(default = "SpanEntry::default_interval")]
    pub interval: Duration,
    /// How old the newest span point may grow before it is an alert (the
    /// span's RPO target), e.g. `"1m"`; at least `interval`.
    /// Default: `"1m"`.
    #[serde(default = "SpanEntry::default_target")]
    pub target: Duration,
    /// Make a scheduled span point application-consistent this often,
    /// e.g. `"1h"`: every member quiesces first (its
    /// `[tracker.app-consistent]` hooks, freeze and guest agent), then the
    /// hold runs, then every member thaws. At least `interval`. Default:
    /// not set (application-consistent span points only on demand, `tidemark
    /// span take --app-consistent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_consistent_every: Option<Duration>,
}

impl SpanEntry {
    fn default_interval() -> Duration {
        Duration::from_secs(15)
    }

    fn default_target() -> Duration {
        Duration::from_secs(60)
    }
}

/// A member of a span: one host's consistency group, written
/// `"HOST/GROUP"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpanMember {
    /// The host.
    pub host: Name,
    /// Its consistency group.
    pub group: Name,
}

impl std::fmt::Display for SpanMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.host, self.group)
    }
}

impl std::str::FromStr for SpanMember {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, group) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not \"HOST/GROUP\""))?;
        let name = |what: &str, n: &str| Name::new(n).map_err(|e| format!("{s:?}: the {what} {e}"));
        Ok(SpanMember {
            host: name("host", host)?,
            group: name("group", group)?,
        })
    }
}

impl Serialize for SpanMember {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpanMember {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 7480)),
            data_dir: PathBuf::from("/var/lib/tidemark/replicas"),
            metrics_listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9723),
            control_socket: PathBuf::from("/run/tidemark/receiver.ctl"),
            tls: ServerTlsConfig::default(),
            retention: RetentionConfig::default(),
            store: StoreConfig::default(),
            liveness: LivenessConfig::default(),
            hosts: Vec::new(),
            spans: Vec::new(),
            console: ConsoleConfig::default(),
        }
    }
}

/// The receiver's side of mutual TLS, the `[receiver.tls]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [receiver.tls] table"
)]
pub struct ServerTlsConfig {
    /// The CA certificate (PEM) that client certificates must chain to.
    /// Default: `/etc/tidemark/pki/ca.crt`.
    pub ca: PathBuf,
    /// The CA's private key (PEM), used to sign client certificates when a
    /// host is enrolled. Keep it readable by the receiver only.
    /// Default: `/etc/tidemark/pki/ca.key`.
    pub ca_key: PathBuf,
    /// The receiver's own certificate (PEM); it must name the shippers'
    /// `server-name`. Default: `/etc/tidemark/pki/receiver.crt`.
    pub cert: PathBuf,
    /// The private key of `cert` (PEM).
    /// Default: `/etc/tidemark/pki/receiver.key`.
    pub key: PathBuf,
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        Self {
            ca: PathBuf::from("/etc/tidemark/pki/ca.crt"),
            ca_key: PathBuf::from("/etc/tidemark/pki/ca.key"),
            cert: PathBuf::from("/etc/tidemark/pki/receiver.crt"),
            key: PathBuf::from("/etc/tidemark/pki/receiver.key"),
        }
    }
}

/// Retention of recovery points, the `[receiver.retention]` table.
///
/// A point is pruned when it is older than `window`, or when keeping it
/// would exceed `max-points` or `max-space`; the newest point is never
/// pruned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [receiver.retention] table"
)]
pub struct RetentionConfig {
    /// How far back recovery points reach, e.g. `"24h"`, `"7d"`; more than
    /// zero. Default: `"24h"`.
    pub window: Duration,
    /// Most recovery points kept per consistency group; at least 1.
    /// Default: `100000`.
    pub max_points: u64,
    /// Most space the history behind the recovery points (not the replicas
    /// themselves) may take per consistency group, e.g. `"500GiB"`. A
    /// fold for space goes a sixteenth of it (at most 16 MiB) below, so
    /// that a busy group does not fold at every commit. Default: not set (limited by `window` and `max-points` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_space: Option<ByteSize>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(24 * 3600),
            max_points: 100_000,
            max_space: None,
        }
    }
}

/// Where the replica stores live, the `[receiver.store]` table.
///
/// The local store keeps each group in `data-dir`; the Ceph store keeps
/// its disks as RBD images and its history as RADOS objects in one pool
/// and namespace, so that any receiver node (and the CLI on it) reaches
/// every group. The Ceph settings are refused with `kind = "local"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [receiver.store] table"
)]
pub struct StoreConfig {
    /// `"local"` (replica stores in `data-dir`) or `"ceph"` (in a Ceph
    /// cluster; needs a build with the receiver's cargo feature `ceph`).
    /// Default: `"local"`.
    pub kind: StoreKind,
    /// Ceph only: the cluster's configuration file (monitors, keyring).
    /// Default: `/etc/ceph/ceph.conf`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conf: Option<PathBuf>,
    /// Ceph only: the client's entity name, `client.NAME`; its key is
    /// found through the keyring that `conf` names (by default
    /// `/etc/ceph/ceph.client.NAME.keyring`). Default: `"client.tidemark"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Ceph only: the pool, initialised for RBD (`rbd pool init`).
    /// Required with `kind = "ceph"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Ceph only: the RADOS and RBD namespace within the pool (created
    /// on first use); every receiver of one replica site names the same.
    /// Default: `""` (the pool's default namespace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Ceph only: how long an operation on a monitor or an OSD may take
    /// before it fails (the group then stops applying until the cluster
    /// answers again), e.g. `"30s"`; more than zero. Default: `"30s"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op_timeout: Option<Duration>,
    /// Ceph only: this receiver's address as shippers reach it,
    /// `host:port`: the other receivers sharing the cluster send a
    /// group's shipper here while this one owns the group. Default: the
    /// `listen` address (set it when `listen` is a wildcard address).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// Ceph only: how long a group's lease lasts without renewal: a dead
    /// receiver's groups are taken over by another this long after its
    /// last renewal (renewed every third of it), e.g. `"15s"`; 3 s or
    /// more. Default: `"15s"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease: Option<Duration>,
    /// Ceph only: how long a receiver fenced by a takeover stays
    /// blocklisted in the cluster (a process paused longer than this could
    /// resume writing images, never committing), e.g. `"24h"`; more than
    /// the lease. Default: `"24h"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocklist_expire: Option<Duration>,
    /// Ceph only: how long a group this receiver owns may go without a
    /// shipper session before its lease is let go (unlocked), so that the
    /// group's shipper, connecting to another receiver, is applied there
    /// at once, e.g. `"60s"`; more than zero. Default: `"60s"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release_idle: Option<Duration>,
}

/// Which store engine keeps the replicas, `[receiver.store] kind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreKind {
    /// Image files and a journal in the receiver's `data-dir`.
    #[default]
    Local,
    /// RBD images and RADOS objects in a Ceph cluster.
    Ceph,
}

/// The Ceph store's settings with their defaults filled in, from
/// [`StoreConfig::ceph`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CephStoreConfig {
    /// The cluster's `ceph.conf`.
    pub conf: PathBuf,
    /// The client's entity name, `client.NAME`.
    pub user: String,
    /// The pool.
    pub pool: String,
    /// The namespace (`""`: the pool's default).
    pub namespace: String,
    /// Timeout of every cluster operation.
    pub op_timeout: std::time::Duration,
    /// Where shippers reach this receiver (`host:port`), `None`: the
    /// `listen` address.
    pub advertise: Option<String>,
    /// The group lease's duration.
    pub lease: std::time::Duration,
    /// How long a fenced receiver stays blocklisted.
    pub blocklist_expire: std::time::Duration,
    /// How long an owned group may go without a shipper session before
    /// its lease is let go.
    pub release_idle: std::time::Duration,
}

impl StoreConfig {
    /// The default `ceph.conf`.
    pub const DEFAULT_CONF: &'static str = "/etc/ceph/ceph.conf";
    /// The default client.
    pub const DEFAULT_USER: &'static str = "client.tidemark";
    /// The default operation timeout, in seconds.
    pub const DEFAULT_OP_TIMEOUT_SECS: u64 = 30;
    /// The default group lease, in seconds.
    pub const DEFAULT_LEASE_SECS: u64 = 15;
    /// The shortest group lease, in seconds.
    pub const MIN_LEASE_SECS: u64 = 3;
    /// The default time a fenced receiver stays blocklisted, in seconds.
    pub const DEFAULT_BLOCKLIST_EXPIRE_SECS: u64 = 24 * 3600;
    /// The default time an owned group may go without a session, in
    /// seconds.
    pub const DEFAULT_RELEASE_IDLE_SECS: u64 = 60;

    fn is_default(&self) -> bool {
        *self == StoreConfig::default()
    }

    /// The Ceph store's settings, `None` for the local store. A validated
    /// configuration with `kind = "ceph"` has a pool.
    pub fn ceph(&self) -> Option<CephStoreConfig> {
        if self.kind != StoreKind::Ceph {
            return None;
        }
        Some(CephStoreConfig {
            conf: self
                .conf
                .clone()
                .unwrap_or_else(|| PathBuf::from(Self::DEFAULT_CONF)),
            user: self
                .user
                .clone()
                .unwrap_or_else(|| Self::DEFAULT_USER.to_owned()),
            pool: self.pool.clone().unwrap_or_default(),
            namespace: self.namespace.clone().unwrap_or_default(),
            op_timeout: self.op_timeout.map_or(
                std::time::Duration::from_secs(Self::DEFAULT_OP_TIMEOUT_SECS),
                |t| t.get(),
            ),
            advertise: self.advertise.clone(),
            lease: self.lease.map_or(
                std::time::Duration::from_secs(Self::DEFAULT_LEASE_SECS),
                |t| t.get(),
            ),
            blocklist_expire: self.blocklist_expire.map_or(
                std::time::Duration::from_secs(Self::DEFAULT_BLOCKLIST_EXPIRE_SECS),
                |t| t.get(),
            ),
            release_idle: self.release_idle.map_or(
                std::time::Duration::from_secs(Self::DEFAULT_RELEASE_IDLE_SECS),
                |t| t.get(),
            ),
        })
    }

    fn validate(&self, at: &FieldPath) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::invalid(at.key(key), message);
        let ceph_settings = [
            ("conf", self.conf.is_some()),
            ("user", self.user.is_some()),
            ("pool", self.pool.is_some()),
            ("namespace", self.namespace.is_some()),
            ("op-timeout", self.op_timeout.is_some()),
            ("advertise", self.advertise.is_some()),
            ("lease", self.lease.is_some()),
            ("blocklist-expire", self.blocklist_expire.is_some()),
            ("release-idle", self.release_idle.is_some()),
        ];
        if self.kind == StoreKind::Local {
            if let Some((key, _)) = ceph_settings.iter().find(|(_, set)| *set) {
                return Err(invalid(
                    key,
                    format!(
                        "{key} is a setting of the Ceph store; set kind = \"ceph\" or remove it"
                    ),
                ));
            }
            return Ok(());
        }
        if let Some(conf) = &self.conf {
            rules::check_path(conf).map_err(|m| invalid("conf", m))?;
        }
        if let Some(user) = &self.user {
            let name = user.strip_prefix("client.").unwrap_or("");
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(invalid(
                    "user",
                    format!("{user:?} is not a client's entity name; write it \"client.NAME\" (e.g. \"client.tidemark\")"),
                ));
            }
        }
        match &self.pool {
            None => {
                return Err(ConfigError::invalid(
                    at.clone(),
                    "the Ceph store needs a pool: add pool = \"NAME\" (a pool initialised with `rbd pool init`)".to_owned(),
                ))
            }
            Some(pool) if !ceph_identifier(pool) => {
                return Err(invalid(
                    "pool",
                    format!("{pool:?} is not a pool name: 1 to 255 printable characters without spaces"),
                ))
            }
            Some(_) => {}
        }
        if let Some(namespace) = &self.namespace {
            if !namespace.is_empty() && !ceph_identifier(namespace) {
                return Err(invalid(
                    "namespace",
                    format!("{namespace:?} is not a namespace: up to 255 printable characters without spaces or '/'"),
                ));
            }
        }
        if let Some(timeout) = &self.op_timeout {
            if timeout.get().is_zero() {
                return Err(invalid(
                    "op-timeout",
                    "op-timeout must be more than zero (zero would wait for an unavailable cluster forever)".to_owned(),
                ));
            }
        }
        if self.release_idle.is_some_and(|t| t.get().is_zero()) {
            return Err(invalid(
                "release-idle",
                "release-idle must be more than zero (a group would be let go between two of its shipper's connections)".to_owned(),
            ));
        }
        if let Some(advertise) = &self.advertise {
            let port = advertise
                .rsplit_once(':')
                .filter(|(host, _)| !host.is_empty() && !host.contains(char::is_whitespace))
                .and_then(|(_, port)| port.parse::<u16>().ok())
                .filter(|port| *port != 0);
            if port.is_none() || advertise.len() > 255 {
                return Err(invalid(
                    "advertise",
                    format!("{advertise:?} is not an address shippers can dial: write it \"HOST:PORT\" (e.g. \"r1.example.com:7480\")"),
                ));
            }
        }
        let lease = self.ceph().map_or(std::time::Duration::ZERO, |c| c.lease);
        if lease < std::time::Duration::from_secs(Self::MIN_LEASE_SECS) {
            return Err(invalid(
                "lease",
                format!(
                    "a lease of {lease:?} is too short to be renewed reliably: {} s or more",
                    Self::MIN_LEASE_SECS
                ),
            ));
        }
        let expire = self
            .ceph()
            .map_or(std::time::Duration::ZERO, |c| c.blocklist_expire);
        if expire <= lease {
            return Err(invalid(
                "blocklist-expire",
                "blocklist-expire must be longer than the lease (a fenced receiver would be let back before its lease could expire)".to_owned(),
            ));
        }
        Ok(())
    }
}

/// A pool or namespace name as Ceph accepts it and as we can pass it to
/// the C API: printable, no spaces, no '/' (RBD's image spec separator).
fn ceph_identifier(name: &str) -> bool {
    (1..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
}

/// An enrolled protected host, a `[[receiver.host]]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [[receiver.host]] table with `name`"
)]
pub struct HostEntry {
    /// The host's name, as in its client certificate and its shipper's
    /// `host`. A name (see [`tidemark_names`]). Required.
    pub name: Name,
    /// Refuse the host's connections while keeping its replicas and
    /// recovery points (for a decommissioned or compromised host).
    /// Default: `false`.
    #[serde(default)]
    pub revoked: bool,
}

impl ReceiverConfig {
    /// Checks the rules a well-typed `[receiver]` table must also follow.
    /// Errors name the setting as `receiver.<key>`, without a file position.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let at = FieldPath::root().key("receiver");
        let invalid = |field: FieldPath, message: String| ConfigError::invalid(field, message);

        rules::check_path(&self.data_dir).map_err(|m| invalid(at.key("data-dir"), m))?;
        rules::check_unix_socket_path(&self.control_socket)
            .map_err(|m| invalid(at.key("control-socket"), m))?;

        let tls = at.key("tls");
        for (key, path) in [
            ("ca", &self.tls.ca),
            ("ca-key", &self.tls.ca_key),
            ("cert", &self.tls.cert),
            ("key", &self.tls.key),
        ] {
            rules::check_path(path).map_err(|m| invalid(tls.key(key), m))?;
        }

        self.liveness.validate(&at.key("liveness"))?;
        self.store.validate(&at.key("store"))?;
        self.console.validate(&at.key("console"))?;

        let retention = at.key("retention");
        if self.retention.window.get().is_zero() {
            return Err(invalid(
                retention.key("window"),
                "window must be more than zero".to_owned(),
            ));
        }
        if self.retention.max_points == 0 {
            return Err(invalid(
                retention.key("max-points"),
                "max-points must be at least 1".to_owned(),
            ));
        }
        if let Some(space) = self.retention.max_space {
            rules::check_nonzero(space).map_err(|m| {
                invalid(
                    retention.key("max-space"),
                    format!("max-space {m}; leave it out for no limit"),
                )
            })?;
        }

        let mut names: HashMap<&Name, usize> = HashMap::new();
        for (i, host) in self.hosts.iter().enumerate() {
            let here = at.key("host").index(i).key("name");
            if let Some(first) = names.insert(&host.name, i) {
                return Err(invalid(
                    here,
                    format!(
                        "host name {:?} is already used by receiver.host[{first}]",
                        host.name
                    ),
                ));
            }
        }

        let mut spans: HashMap<&Name, usize> = HashMap::new();
        let mut members: HashMap<&SpanMember, usize> = HashMap::new();
        for (i, span) in self.spans.iter().enumerate() {
            let here = at.key("span").index(i);
            if let Some(first) = spans.insert(&span.name, i) {
                return Err(invalid(
                    here.key("name"),
                    format!(
                        "span name {:?} is already used by receiver.span[{first}]",
                        span.name
                    ),
                ));
            }
            if span.members.len() < 2 {
                return Err(invalid(
                    here.key("members"),
                    "a span has at least two members (\"HOST/GROUP\"); one group's points are consistent already".to_owned(),
                ));
            }
            for member in &span.members {
                if let Some(other) = members.insert(member, i) {
                    return Err(invalid(
                        here.key("members"),
                        format!(
                            "{member} is a member of receiver.span[{other}] already; a group is in one span at most"
                        ),
                    ));
                }
            }
            if span.interval.get().is_zero() {
                return Err(invalid(
                    here.key("interval"),
                    "interval must be more than zero".to_owned(),
                ));
            }
            if let Some(every) = &span.app_consistent_every {
                if every.get() < span.interval.get() {
                    return Err(invalid(
                        here.key("app-consistent-every"),
                        format!(
                            "app-consistent-every {every} is shorter than the interval {}",
                            span.interval
                        ),
                    ));
                }
            }
            if span.target.get() < span.interval.get() {
                return Err(invalid(
                    here.key("target"),
                    format!(
                        "target {} is shorter than the interval {}: every point would be late",
                        span.target, span.interval
                    ),
                ));
            }
        }
        Ok(())
    }
}
