//! A peer to dial, written `"host:port"`: a DNS name, an IPv4 address, or an
//! IPv6 address in brackets (`"[2001:db8::1]:7480"`).
//!
//! Kept as text rather than resolved here: DNS answers change, and the
//! shipper re-resolves on every reconnect.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ValueError;
use crate::rules::check_dns_name;

/// A host name or address with a port, written `"host:port"`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    host: String,
    port: u16,
}

impl HostPort {
    /// Parses `"host:port"`, `"10.0.0.5:7480"` or `"[2001:db8::1]:7480"`.
    pub fn parse(input: &str) -> Result<Self, ValueError> {
        parse_host_port(input.trim()).map_err(|problem| ValueError::new("address", input, problem))
    }

    /// The host name or IP address, without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, never 0.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn parse_host_port(text: &str) -> Result<HostPort, String> {
    let expected = r#"write "host:port", such as "dr.example.com:7480" or "[2001:db8::1]:7480""#;
    let (host, port) = if let Some(bracketed) = text.strip_prefix('[') {
        let (host, rest) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("missing ']' after the IPv6 address; {expected}"))?;
        host.parse::<Ipv6Addr>()
            .map_err(|_| format!("{host:?} is not an IPv6 address; {expected}"))?;
        let port = rest
            .strip_prefix(':')
            .ok_or_else(|| format!("missing port; {expected}"))?;
        (host, port)
    } else {
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("missing port; {expected}"))?;
        if host.contains(':') {
            return Err(format!("an IPv6 address must be in brackets; {expected}"));
        }
        check_dns_name(host)?;
        (host, port)
    };
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{port:?} is not a port number (1 to 65535)"))?;
    Ok(HostPort {
        host: host.to_owned(),
        port,
    })
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for HostPort {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HostPortVisitor;

        impl Visitor<'_> for HostPortVisitor {
            type Value = HostPort;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"an address such as "dr.example.com:7480""#)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<HostPort, E> {
                HostPort::parse(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(HostPortVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms_round_trip() {
        for (text, host, port) in [
            ("dr.example.com:7480", "dr.example.com", 7480),
            ("10.0.0.5:1", "10.0.0.5", 1),
            ("[2001:db8::1]:7480", "2001:db8::1", 7480),
            ("localhost:65535", "localhost", 65535),
        ] {
            let parsed = HostPort::parse(text).expect(text);
            assert_eq!((parsed.host(), parsed.port()), (host, port));
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn rejected_forms_say_why() {
        for (text, why) in [
            ("dr.example.com", "missing port"),
            ("dr.example.com:", "not a port number"),
            ("dr.example.com:0", "not a port number"),
            ("dr.example.com:65536", "not a port number"),
            (":7480", "must not be empty"),
            ("2001:db8::1:7480", "brackets"),
            ("[2001:db8::1]", "missing port"),
            ("[2001:db8::1:7480", "missing ']'"),
            ("[nope]:7480", "not an IPv6 address"),
            ("bad_host:7480", "not a valid host name"),
        ] {
            let err = HostPort::parse(text).expect_err(text);
            assert!(err.to_string().contains(why), "{text}: {err}");
        }
    }
}
