//! Tidemark's configuration files: their schema, defaults, parsing and
//! validation, for all three daemons.
//!
//! This crate owns the `[tracker]`, `[shipper]` and `[receiver]` tables (as
//! [`TrackerConfig`], [`ShipperConfig`] and [`ReceiverConfig`]), the
//! human-friendly value types used in them ([`ByteSize`] `"64MiB"`,
//! [`Duration`] `"30s"`, [`TimeWindow`] `"08:00-18:00"`, [`HostPort`]
//! `"dr.example.com:7480"`), and the error messages an admin sees when a
//! file is wrong. It does no I/O beyond reading the file: opening devices,
//! binding sockets and loading certificates belong to the daemons.
//!
//! A file configures one or more daemons by having their tables; a single
//! host running a tracker and a shipper (or, for a lab, all three) may use
//! one file for all of them. Every table rejects unknown keys, every setting
//! but a few identities has a default, and [`load`] validates what it reads,
//! so a daemon given a [`LoadedConfig`] can trust it:
//!
//! ```
//! use std::path::Path;
//!
//! let text = r#"
//!     [tracker]
//!     [[tracker.disk]]
//!     name = "data"
//!     path = "/dev/disk/by-id/nvme-data"
//! "#;
//! let config = tidemark_config::parse_str(text, Path::new("tidemark.toml"))?;
//! let tracker = config.require_tracker()?;
//! assert_eq!(tracker.segment_size.to_string(), "64MiB");
//!
//! let err = tidemark_config::parse_str("[tracker]\nsegment-size = \"64XB\"\n", Path::new("t.toml"))
//!     .unwrap_err();
//! assert!(err.to_string().starts_with("t.toml:2:16: tracker.segment-size: invalid size"));
//! # Ok::<(), tidemark_config::ConfigError>(())
//! ```
//!
//! Errors name the file, line, column and setting, as
//! `tracker.toml:12:1: tracker.disk[0]: unknown field `pth`, expected one of
//! `name`, `path`, `export-name``; see [`ConfigError`]. Annotated examples of
//! every table are in the crate's `examples/` directory.

mod address;
pub mod console;
mod error;
mod liveness;
pub mod plan;
pub mod receiver;
mod rules;
mod schedule;
pub mod shipper;
mod source_map;
mod table_list;
pub mod tracker;
mod units;
pub mod vm;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::de::DeTable;

pub use address::HostPort;
pub use console::{ConsoleConfig, ConsoleRole, ConsoleUser};
pub use error::{ConfigError, FieldPath, SourceLocation, ValueError};
pub use liveness::LivenessConfig;
pub use plan::{GroupRef, PlanConfig, PlanStep, StartVm};
pub use receiver::{
    CephStoreConfig, HostEntry, ReceiverConfig, RetentionConfig, ServerTlsConfig, SpanEntry,
    SpanMember, StoreConfig, StoreKind,
};
pub use schedule::{TimeOfDay, TimeWindow};
pub use shipper::{BandwidthConfig, ClientTlsConfig, RetryConfig, ScheduledLimit, ShipperConfig};
pub use tracker::{
    AppConsistentConfig, AttachConfig, CacheMode, DiskConfig, TrackerConfig, UblkConfig,
};
pub use units::{parse_duration, ByteSize, Duration};
pub use vm::{
    DirectKernel, ImageFormat, MacAddress, MachineType, NicAttachment, VmDisk, VmNic, VmSpec,
    VmValueError,
};

use source_map::{line_column, SourceMap};

/// One of the three daemons a configuration file can configure; each has a
/// top-level table of its own name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DaemonKind {
    /// `tidemark-tracker`, the `[tracker]` table.
    Tracker,
    /// `tidemark-shipper`, the `[shipper]` table.
    Shipper,
    /// `tidemark-receiver`, the `[receiver]` table.
    Receiver,
}

impl DaemonKind {
    /// The name of the daemon's top-level table.
    pub fn table_name(self) -> &'static str {
        match self {
            Self::Tracker => "tracker",
            Self::Shipper => "shipper",
            Self::Receiver => "receiver",
        }
    }
}

impl fmt::Display for DaemonKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.table_name())
    }
}

/// A parsed and validated configuration file: the tables it has, at least
/// one of them.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct LoadedConfig {
    /// The file it came from, as named by the caller; used in messages.
    #[serde(skip)]
    pub origin: PathBuf,
    /// The `[tracker]` table, if the file has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracker: Option<TrackerConfig>,
    /// The `[shipper]` table, if the file has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipper: Option<ShipperConfig>,
    /// The `[receiver]` table, if the file has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receiver: Option<ReceiverConfig>,
}

/// The top level of a file, as deserialized before validation.
#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a document with [tracker], [shipper] or [receiver] tables"
)]
struct Document {
    tracker: Option<TrackerConfig>,
    shipper: Option<ShipperConfig>,
    receiver: Option<ReceiverConfig>,
}

impl LoadedConfig {
    /// The daemons this file configures, in the order tracker, shipper,
    /// receiver.
    pub fn daemons(&self) -> Vec<DaemonKind> {
        [
            (self.tracker.is_some(), DaemonKind::Tracker),
            (self.shipper.is_some(), DaemonKind::Shipper),
            (self.receiver.is_some(), DaemonKind::Receiver),
        ]
        .into_iter()
        .filter_map(|(present, kind)| present.then_some(kind))
        .collect()
    }

    /// The `[tracker]` table, or an error naming the file that lacks it.
    pub fn require_tracker(&self) -> Result<&TrackerConfig, ConfigError> {
        self.tracker
            .as_ref()
            .ok_or_else(|| self.missing(DaemonKind::Tracker))
    }

    /// The `[shipper]` table, or an error naming the file that lacks it.
    pub fn require_shipper(&self) -> Result<&ShipperConfig, ConfigError> {
        self.shipper
            .as_ref()
            .ok_or_else(|| self.missing(DaemonKind::Shipper))
    }

    /// The `[receiver]` table, or an error naming the file that lacks it.
    pub fn require_receiver(&self) -> Result<&ReceiverConfig, ConfigError> {
        self.receiver
            .as_ref()
            .ok_or_else(|| self.missing(DaemonKind::Receiver))
    }

    fn missing(&self, daemon: DaemonKind) -> ConfigError {
        ConfigError::MissingDaemonTable {
            file: self.origin.clone(),
            daemon,
        }
    }

    /// Validates every table present, then the rules between tables of one
    /// file: a tracker and shipper on the same host must agree on the log,
    /// and no two daemons may claim the same socket or metrics port.
    ///
    /// [`load`] and [`parse_str`] already call this; call it again after
    /// changing a configuration in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.daemons().is_empty() {
            return Err(ConfigError::NoDaemonTable {
                file: self.origin.clone(),
            });
        }
        if let Some(tracker) = &self.tracker {
            tracker.validate()?;
        }
        if let Some(shipper) = &self.shipper {
            shipper.validate()?;
        }
        if let Some(receiver) = &self.receiver {
            receiver.validate()?;
        }
        if let (Some(tracker), Some(shipper)) = (&self.tracker, &self.shipper) {
            let shipper_at = FieldPath::root().key("shipper");
            if shipper.consistency_group != tracker.consistency_group {
                return Err(ConfigError::invalid(
                    shipper_at.key("consistency-group"),
                    format!(
                        "consistency group {:?} differs from the tracker's {:?} in the same file",
                        shipper.consistency_group, tracker.consistency_group
                    ),
                ));
            }
            if shipper.log_dir != tracker.log_dir {
                return Err(ConfigError::invalid(
                    shipper_at.key("log-dir"),
                    format!(
                        "log-dir {} differs from the tracker's {} in the same file; the \
                         shipper must tail the tracker's log",
                        shipper.log_dir.display(),
                        tracker.log_dir.display()
                    ),
                ));
            }
        }
        self.validate_no_shared_endpoints()
    }

    /// Daemons sharing a file run on one host, so their sockets and metrics
    /// ports must not collide.
    fn validate_no_shared_endpoints(&self) -> Result<(), ConfigError> {
        let mut sockets: Vec<(FieldPath, &Path)> = Vec::new();
        let mut metrics: Vec<(FieldPath, SocketAddr)> = Vec::new();
        let root = FieldPath::root();
        if let Some(tracker) = &self.tracker {
            let at = root.key("tracker");
            sockets.push((at.key("socket"), &tracker.socket));
            sockets.push((at.key("control-socket"), &tracker.control_socket));
            metrics.push((at.key("metrics-listen"), tracker.metrics_listen));
        }
        if let Some(shipper) = &self.shipper {
            let at = root.key("shipper");
            sockets.push((at.key("control-socket"), &shipper.control_socket));
            metrics.push((at.key("metrics-listen"), shipper.metrics_listen));
        }
        if let Some(receiver) = &self.receiver {
            let at = root.key("receiver");
            sockets.push((at.key("control-socket"), &receiver.control_socket));
            metrics.push((at.key("metrics-listen"), receiver.metrics_listen));
        }
        for (i, (field, path)) in sockets.iter().enumerate() {
            if let Some((first, _)) = sockets[..i].iter().find(|(_, p)| p == path) {
                return Err(ConfigError::invalid(
                    field.clone(),
                    format!("{} is already used by {first}", path.display()),
                ));
            }
        }
        for (i, (field, addr)) in metrics.iter().enumerate() {
            let clash = |other: &SocketAddr| {
                other.port() == addr.port()
                    && addr.port() != 0
                    && (other.ip() == addr.ip()
                        || other.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            };
            if let Some((first, _)) = metrics[..i].iter().find(|(_, a)| clash(a)) {
                return Err(ConfigError::invalid(
                    field.clone(),
                    format!("{addr} collides with {first}"),
                ));
            }
        }
        Ok(())
    }
}

/// Reads, parses and validates a configuration file.
///
/// The file must have at least one of the `[tracker]`, `[shipper]` and
/// `[receiver]` tables; which ones it has is in [`LoadedConfig::daemons`].
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_str(&text, path)
}

/// Parses and validates configuration text; `origin` names it in messages
/// (it is not read).
pub fn parse_str(text: &str, origin: &Path) -> Result<LoadedConfig, ConfigError> {
    parse_document(text, origin, |document: Document| {
        let config = LoadedConfig {
            origin: origin.to_owned(),
            tracker: document.tracker,
            shipper: document.shipper,
            receiver: document.receiver,
        };
        config.validate().map(|()| config)
    })
}

/// Reads, parses and validates a recovery plan (a `[plan]` table with
/// `[[plan.step]]`s); errors name the file, line, column and setting like
/// those of the daemons' files.
pub fn load_plan(path: &Path) -> Result<PlanConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_plan(&text, path)
}

/// [`load_plan`] on text; `origin` names it in messages.
pub fn parse_plan(text: &str, origin: &Path) -> Result<PlanConfig, ConfigError> {
    parse_document(text, origin, |document: plan::PlanDocument| {
        document.plan.validate().map(|()| document.plan)
    })
}

/// Reads, parses and validates a virtual machine spec (a `[vm]` table
/// with `[[vm.disk]]` and `[[vm.nic]]` tables, see [`vm`]); errors name
/// the file, line, column and setting like those of the daemons' files.
pub fn load_vm_spec(path: &Path) -> Result<VmSpec, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_vm_spec(&text, path)
}

/// [`load_vm_spec`] on text; `origin` names it in messages.
pub fn parse_vm_spec(text: &str, origin: &Path) -> Result<VmSpec, ConfigError> {
    parse_document(text, origin, |document: vm::VmDocument| {
        document.vm.validate().map(|()| document.vm)
    })
}

/// Parses `text` as `D`, then `finish` (which validates) makes the result;
/// every error gets the file, line and column of the setting it names.
fn parse_document<D, T>(
    text: &str,
    origin: &Path,
    finish: impl FnOnce(D) -> Result<T, ConfigError>,
) -> Result<T, ConfigError>
where
    D: serde::de::DeserializeOwned,
{
    let locate = |offset: usize| {
        let (line, column) = line_column(text, offset);
        SourceLocation {
            file: origin.to_owned(),
            line,
            column,
        }
    };

    // The recovering parser still returns what it understood, so even a
    // syntax error can usually be pinned to a setting.
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    let map = SourceMap::new(root.get_ref(), text);
    if let Some(error) = syntax_errors.first() {
        let offset = error.span().map_or(0, |span| span.start);
        let field = map.field_at(offset);
        return Err(ConfigError::Syntax {
            location: locate(offset),
            field: (!field.is_root()).then_some(field),
            message: error.message().to_owned(),
        });
    }

    let document = D::deserialize(toml::de::Deserializer::from(root)).map_err(|error| {
        let offset = error.span().map_or(0, |span| span.start);
        ConfigError::Schema {
            location: locate(offset),
            field: map.field_at(offset),
            message: error.message().to_owned(),
        }
    })?;

    finish(document).map_err(|error| match error {
        ConfigError::Invalid {
            location: None,
            field,
            message,
        } => ConfigError::Invalid {
            location: Some(locate(map.offset_of(&field))),
            field,
            message,
        },
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file in `examples/` loads and validates, and the four promised
    /// ones are there.
    #[test]
    fn example_files_load_cleanly() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&dir).expect("examples directory") {
            let path = entry.expect("directory entry").path();
            if path.extension().is_some_and(|ext| ext == "toml") {
                let config = load(&path).unwrap_or_else(|e| panic!("{e}"));
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                seen.push((name, config.daemons()));
            }
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        use DaemonKind::*;
        assert_eq!(
            seen,
            vec![
                (
                    "all-in-one.toml".to_owned(),
                    vec![Tracker, Shipper, Receiver]
                ),
                ("receiver.toml".to_owned(), vec![Receiver]),
                ("shipper.toml".to_owned(), vec![Shipper]),
                ("tracker.toml".to_owned(), vec![Tracker]),
            ]
        );
    }
}
