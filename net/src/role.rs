//! Console roles carried in client certificates.
//!
//! An admin of the replica site's web console proves who they are with a
//! client certificate signed by the receiver's CA, like a host; what they
//! may do is in the certificate too, as an extended key usage (EKU) of
//! ours beside `clientAuth`. The OIDs live under a UUID arc (ITU-T X.667,
//! `2.25.<uuid as an integer>`), so they need no registration:
//!
//! | OID                     | role                  |
//! |-------------------------|-----------------------|
//! | [`ROLE_ARC`]`.1`        | console, read-only    |
//! | [`ROLE_ARC`]`.2`        | console, operator     |
//!
//! The arc's second component is 128 bits wide, wider than what
//! certificate builders usually take, so the EKU extension (OID
//! 2.5.29.37, content `SEQUENCE OF OBJECT IDENTIFIER`) is written here
//! ([`extended_key_usage`]) and the roles read back with x509-parser
//! ([`console_role`]).
//!
//! Both endpoints enforce the split: the replication endpoint refuses a
//! certificate carrying a console role (an admin must not replicate as a
//! host), the console refuses one without (a host must not open it).

use std::fmt;

/// The arc our console role OIDs hang under, in dotted form.
pub const ROLE_ARC: &str = "2.25.201338833876323180311371667709132664435";

/// The arc's UUID component.
const ARC_UUID: u128 = 201_338_833_876_323_180_311_371_667_709_132_664_435;

/// `id-kp-clientAuth`, 1.3.6.1.5.5.7.3.2, as DER content bytes.
const CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// The extended key usage extension's OID, 2.5.29.37.
pub const EXTENDED_KEY_USAGE_OID: &[u64] = &[2, 5, 29, 37];

pub use tidemark_config::ConsoleRole;

/// The last arc of `role`'s OID under [`ROLE_ARC`].
fn arc(role: ConsoleRole) -> u8 {
    match role {
        ConsoleRole::ReadOnly => 1,
        ConsoleRole::Operator => 2,
    }
}

/// `role`'s OID as DER content bytes (no tag, no length).
pub fn oid_content(role: ConsoleRole) -> Vec<u8> {
    // 2.25 packs into one first byte: 2 * 40 + 25.
    let mut out = vec![2 * 40 + 25];
    push_base128(&mut out, ARC_UUID);
    push_base128(&mut out, arc(role).into());
    out
}

/// Appends `value` in the base-128 form of OID arcs (high groups first,
/// the continuation bit on all but the last).
fn push_base128(out: &mut Vec<u8>, value: u128) {
    let mut groups = vec![(value & 0x7f) as u8];
    let mut rest = value >> 7;
    while rest != 0 {
        groups.push((rest & 0x7f) as u8 | 0x80);
        rest >>= 7;
    }
    out.extend(groups.iter().rev());
}

/// The DER content of an extended key usage extension listing
/// `clientAuth` and `role`: what an admin certificate carries.
pub fn extended_key_usage(role: ConsoleRole) -> Vec<u8> {
    let role = oid_content(role);
    yasna::construct_der(|w| {
        w.write_sequence(|w| {
            w.next().write_der(&oid_tlv(CLIENT_AUTH));
            w.next().write_der(&oid_tlv(&role));
        })
    })
}

/// An OBJECT IDENTIFIER's full DER encoding from its content bytes (all
/// ours are shorter than 128 bytes: one length byte).
fn oid_tlv(content: &[u8]) -> Vec<u8> {
    debug_assert!(content.len() < 0x80);
    let mut out = vec![0x06, content.len() as u8];
    out.extend_from_slice(content);
    out
}

/// Why the role in a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// The certificate, or its extended key usage extension, does not
    /// parse (the peer's certificate is damaged).
    #[error("the certificate cannot be parsed: {reason}")]
    Unparseable {
        /// What the parser said.
        reason: String,
    },
    /// The certificate names more than one console role (not issued by
    /// `tidemark receiver sign`).
    #[error("the certificate carries more than one console role")]
    Ambiguous,
}

/// The console role the DER certificate `cert` carries in its extended
/// key usage, if any.
pub fn console_role(cert: &[u8]) -> Result<Option<ConsoleRole>, RoleError> {
    let unparseable = |e: &dyn fmt::Display| RoleError::Unparseable {
        reason: e.to_string(),
    };
    let (_, cert) = x509_parser::parse_x509_certificate(cert).map_err(|e| unparseable(&e))?;
    let Some(eku) = cert.extended_key_usage().map_err(|e| unparseable(&e))? else {
        return Ok(None);
    };
    let mut found = None;
    for oid in &eku.value.other {
        let role = ConsoleRole::ALL
            .into_iter()
            .find(|r| oid_content(*r) == oid.as_bytes());
        match (found, role) {
            (_, None) => {}
            (None, Some(r)) => found = Some(r),
            (Some(_), Some(_)) => return Err(RoleError::Ambiguous),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The roles' OIDs as `openssl asn1parse -genstr OID:2.25.….N`
    /// encodes them (content bytes, after the tag 06 and length 15).
    const OPENSSL_READ_ONLY: &str = "6982aef8b9bafef18aa6d59ebe8bedb1bac7dc7301";
    const OPENSSL_OPERATOR: &str = "6982aef8b9bafef18aa6d59ebe8bedb1bac7dc7302";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn role_oids_encode_the_uuid_arc() {
        assert_eq!(hex(&oid_content(ConsoleRole::ReadOnly)), OPENSSL_READ_ONLY);
        assert_eq!(hex(&oid_content(ConsoleRole::Operator)), OPENSSL_OPERATOR);
    }

    #[test]
    fn the_extension_lists_client_auth_and_the_role() {
        let der = extended_key_usage(ConsoleRole::Operator);
        let (rest, eku) =
            <x509_parser::extensions::ExtendedKeyUsage as x509_parser::prelude::FromDer<
                x509_parser::error::X509Error,
            >>::from_der(&der)
            .unwrap();
        assert!(rest.is_empty());
        assert!(eku.client_auth);
        assert_eq!(eku.other.len(), 1);
        assert_eq!(hex(eku.other[0].as_bytes()), OPENSSL_OPERATOR);
    }

    #[test]
    fn role_names_round_trip_and_unknown_ones_are_refused() {
        for role in ConsoleRole::ALL {
            assert_eq!(role.as_str().parse::<ConsoleRole>().unwrap(), role);
        }
        assert!("admin".parse::<ConsoleRole>().is_err());
    }

    #[test]
    fn console_role_refuses_garbage_without_panicking() {
        assert!(matches!(
            console_role(b"not a certificate"),
            Err(RoleError::Unparseable { .. })
        ));
    }
}
