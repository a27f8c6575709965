//! How fast a dead peer is noticed: the `[shipper.liveness]` and
//! `[receiver.liveness]` tables, one type for both ends of a replication
//! link.
//!
//! Each end sends a QUIC keep-alive every `keep-alive` while the link is
//! otherwise quiet, and takes the connection for dead when nothing at all
//! (data, acknowledgements, keep-alives) came from the peer for
//! `peer-timeout`. The two ends agree on the shorter of their two
//! timeouts. The defaults notice a killed, frozen or unreachable peer
//! within 4 s while one lost packet in three still keeps a link alive
//! (several keep-alives and their acknowledgements cross every window).

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, FieldPath};
use crate::Duration;

/// The shortest `keep-alive` accepted.
const MIN_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(100);
/// The longest `peer-timeout` accepted (QUIC carries it in milliseconds;
/// longer than this is no liveness check at all).
const MAX_PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// At least this many keep-alives fit in one `peer-timeout`, so that a lost
/// packet or two never ends a live link.
const KEEP_ALIVES_PER_TIMEOUT: u32 = 3;

/// The `[shipper.liveness]` / `[receiver.liveness]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a liveness table with `keep-alive` and `peer-timeout`"
)]
pub struct LivenessConfig {
    /// A keep-alive is sent after this long without traffic; at least
    /// 100ms, and at most a third of `peer-timeout`. Default: `"1s"`.
    pub keep_alive: Duration,
    /// The connection is dead after this long with nothing from the
    /// peer; at most 10 minutes. The shorter of the two ends' values
    /// holds. Default: `"4s"`.
    pub peer_timeout: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(4),
        }
    }
}

impl LivenessConfig {
    pub(crate) fn validate(&self, at: &FieldPath) -> Result<(), ConfigError> {
        if self.keep_alive.get() < MIN_KEEP_ALIVE {
            return Err(ConfigError::invalid(
                at.key("keep-alive"),
                format!(
                    "keep-alive {} is shorter than the minimum of 100ms",
                    self.keep_alive
                ),
            ));
        }
        if self.peer_timeout.get() > MAX_PEER_TIMEOUT {
            return Err(ConfigError::invalid(
                at.key("peer-timeout"),
                format!(
                    "peer-timeout {} is longer than the maximum of 10m",
                    self.peer_timeout
                ),
            ));
        }
        if self.keep_alive.get() * KEEP_ALIVES_PER_TIMEOUT > self.peer_timeout.get() {
            return Err(ConfigError::invalid(
                at.key("peer-timeout"),
                format!(
                    "peer-timeout {} must be at least three times keep-alive {}, so that a \
                     lost packet does not end a live connection",
                    self.peer_timeout, self.keep_alive
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(keep_alive_ms: u64, peer_timeout_ms: u64) -> Result<(), String> {
        LivenessConfig {
            keep_alive: Duration::from_millis(keep_alive_ms),
            peer_timeout: Duration::from_millis(peer_timeout_ms),
        }
        .validate(&FieldPath::root().key("shipper").key("liveness"))
        .map_err(|e| e.to_string())
    }

    #[test]
    fn the_defaults_are_valid_and_notice_a_dead_peer_within_five_seconds() {
        let d = LivenessConfig::default();
        d.validate(&FieldPath::root()).unwrap();
        assert!(d.peer_timeout.get() <= std::time::Duration::from_secs(5));
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_setting_named() {
        let e = check(50, 4000).unwrap_err();
        assert!(e.contains("shipper.liveness.keep-alive"), "{e}");
        assert!(e.contains("minimum of 100ms"), "{e}");
        let e = check(1000, 2000).unwrap_err();
        assert!(e.contains("shipper.liveness.peer-timeout"), "{e}");
        assert!(e.contains("three times keep-alive"), "{e}");
        let e = check(1000, 3_600_000).unwrap_err();
        assert!(e.contains("maximum of 10m"), "{e}");
        check(100, 300).unwrap();
        check(20_000, 600_000).unwrap();
    }
}
