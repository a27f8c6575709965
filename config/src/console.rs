//! The `[receiver.console]` table: the replica site's web console, served
//! by the receiver over HTTPS. Off unless enabled; on loopback unless
//! told otherwise.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tidemark_names::Name;

use crate::error::{ConfigError, FieldPath};
use crate::rules;

/// What a console user may do: in a password user's table here, and in an
/// admin's client certificate (see `tidemark_net::role`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsoleRole {
    /// Sees every page, changes nothing.
    ReadOnly,
    /// Also starts and cleans up test failovers.
    Operator,
}

impl ConsoleRole {
    /// Every role, weakest first.
    pub const ALL: [ConsoleRole; 2] = [ConsoleRole::ReadOnly, ConsoleRole::Operator];

    /// The name used in configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ConsoleRole::ReadOnly => "read-only",
            ConsoleRole::Operator => "operator",
        }
    }
}

impl fmt::Display for ConsoleRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of [`ConsoleRole`]'s.
#[derive(Debug, thiserror::Error)]
#[error("unknown console role {0:?}: read-only or operator")]
pub struct UnknownRole(pub String);

impl FromStr for ConsoleRole {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConsoleRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// The web console, the `[receiver.console]` table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    default,
    expecting = "a [receiver.console] table"
)]
pub struct ConsoleConfig {
    /// Serve the console. Default: `false`.
    pub enabled: bool,
    /// The HTTPS address. Default: `127.0.0.1:8443` (this machine only).
    pub listen: SocketAddr,
    /// The console's server certificate (PEM), signed by the receiver's
    /// CA with the address browsers use in its SAN (`tidemark receiver
    /// sign --console ADDRESS`). Default: `console.crt` beside
    /// `[receiver.tls] ca`.
    pub cert: Option<PathBuf>,
    /// The private key of `cert` (PEM). Default: `console.key` beside
    /// `[receiver.tls] ca`.
    pub key: Option<PathBuf>,
    /// Users who log in with a password, one `[[receiver.console.user]]`
    /// table each. Default: none (admin certificates only).
    #[serde(rename = "user", skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<ConsoleUser>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8443),
            cert: None,
            key: None,
            users: Vec::new(),
        }
    }
}

/// A console user who logs in with a password, a
/// `[[receiver.console.user]]` table.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "kebab-case",
    expecting = "a [[receiver.console.user]] table with `name`, `role` and `password-hash`"
)]
pub struct ConsoleUser {
    /// The user's name. Required.
    pub name: Name,
    /// What the user may do: `read-only` or `operator`. Required.
    pub role: ConsoleRole,
    /// The password's argon2id hash, a PHC string (`$argon2id$v=19$…`,
    /// from `tidemark receiver console-password`). Required.
    pub password_hash: String,
}

impl fmt::Debug for ConsoleUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleUser")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl ConsoleConfig {
    /// Whether this is the default (so it is left out when written).
    pub(crate) fn is_default(&self) -> bool {
        *self == ConsoleConfig::default()
    }

    /// The server certificate: `cert`, else `console.crt` in `tls_dir`.
    pub fn cert_path(&self, tls_dir: &Path) -> PathBuf {
        self.cert
            .clone()
            .unwrap_or_else(|| tls_dir.join("console.crt"))
    }

    /// The server key: `key`, else `console.key` in `tls_dir`.
    pub fn key_path(&self, tls_dir: &Path) -> PathBuf {
        self.key
            .clone()
            .unwrap_or_else(|| tls_dir.join("console.key"))
    }

    pub(crate) fn validate(&self, at: &FieldPath) -> Result<(), ConfigError> {
        for (key, path) in [("cert", &self.cert), ("key", &self.key)] {
            if let Some(path) = path {
                rules::check_path(path).map_err(|m| ConfigError::invalid(at.key(key), m))?;
            }
        }
        for (i, user) in self.users.iter().enumerate() {
            let field = at.key("user").index(i);
            if !user.password_hash.starts_with("$argon2id$") {
                return Err(ConfigError::invalid(
                    field.key("password-hash"),
                    "must be an argon2id PHC string ($argon2id$…), from `tidemark receiver console-password`",
                ));
            }
            if self.users[..i].iter().any(|u| u.name == user.name) {
                return Err(ConfigError::invalid(
                    field.key("name"),
                    format!("the user {} is named twice", user.name),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<crate::ReceiverConfig, ConfigError> {
        let cfg: crate::ReceiverConfig = toml::from_str(text)
            .map_err(|e| ConfigError::invalid(FieldPath::root(), e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn the_console_is_off_and_on_loopback_by_default() {
        let cfg = parse("").unwrap();
        assert!(!cfg.console.enabled);
        assert_eq!(cfg.console.listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(
            cfg.console.cert_path(Path::new("/etc/tidemark/pki")),
            Path::new("/etc/tidemark/pki/console.crt")
        );
    }

    #[test]
    fn users_need_an_argon2id_hash_and_a_known_role() {
        let ok = parse(
            "[console]\nenabled = true\n[[console.user]]\nname = \"ops\"\nrole = \"operator\"\npassword-hash = \"$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA\"\n",
        )
        .unwrap();
        assert_eq!(ok.console.users[0].role, ConsoleRole::Operator);
        let bad_hash = parse(
            "[console]\n[[console.user]]\nname = \"ops\"\nrole = \"operator\"\npassword-hash = \"secret\"\n",
        )
        .unwrap_err();
        assert!(bad_hash.to_string().contains("password-hash"), "{bad_hash}");
        assert!(parse(
            "[console]\n[[console.user]]\nname = \"ops\"\nrole = \"admin\"\npassword-hash = \"$argon2id$x\"\n",
        )
        .is_err());
    }
}
