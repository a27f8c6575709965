//! Validation rules shared by the three daemons' sections. Each returns the
//! broken rule as a sentence; the caller knows which setting it checked and
//! attaches the field path.

use std::net::IpAddr;
use std::path::Path;

use crate::ByteSize;

/// Longest disk, host or consistency-group name. Names become file names,
/// metric labels and certificate identities; 64 keeps all of those sane.
pub(crate) const MAX_NAME_LEN: usize = 64;

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// A name of a disk, host or consistency group: `[A-Za-z0-9._-]+`, at most
/// [`MAX_NAME_LEN`] bytes, and not `.` or `..` (names are used as path
/// components).
pub(crate) fn check_name(name: &str, what: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if let Some(bad) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {name:?} contains {bad:?}; use only letters, digits, '.', '_' and '-'"
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} {name:?} is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("{what} must not be {name:?}"));
    }
    Ok(())
}

/// A host name as used for TLS and for dialling: an IP address, or DNS
/// labels of letters, digits and '-' (not at either end), 1 to 63 bytes
/// each, 253 bytes in all.
pub(crate) fn check_dns_name(name: &str) -> Result<(), String> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if name.is_empty() {
        return Err("host name must not be empty".to_owned());
    }
    if name.len() > 253 {
        return Err(format!(
            "host name is {} bytes long; the limit is 253",
            name.len()
        ));
    }
    let labels = name.strip_suffix('.').unwrap_or(name);
    for label in labels.split('.') {
        let well_formed = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !well_formed {
            return Err(format!(
                "{name:?} is not a valid host name; use letters, digits and '-' in \
                 dot-separated labels, or an IP address"
            ));
        }
    }
    Ok(())
}

/// A local group, as `groupadd` allows it: 1 to 32 bytes of letters,
/// digits, '.', '_' and '-', not starting with '-'; or a numeric gid.
/// Whether it exists is for the daemon to find out where it runs.
pub(crate) fn check_group_name(name: &str) -> Result<(), String> {
    let well_formed = (1..=32).contains(&name.len())
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !well_formed {
        return Err(format!(
            "{name:?} is not a group name: 1 to 32 letters, digits, '.', '_' or '-', not starting with '-'"
        ));
    }
    Ok(())
}

/// A filesystem path that must be given.
pub(crate) fn check_path(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("path must not be empty".to_owned());
    }
    Ok(())
}

/// A path a unix socket will be bound to.
pub(crate) fn check_unix_socket_path(path: &Path) -> Result<(), String> {
    check_path(path)?;
    let len = path.as_os_str().len();
    if len > MAX_UNIX_SOCKET_PATH {
        return Err(format!(
            "socket path is {len} bytes long; unix sockets allow at most \
             {MAX_UNIX_SOCKET_PATH}"
        ));
    }
    Ok(())
}

/// A size that must be a power of two within `min..=max`.
pub(crate) fn check_power_of_two(
    size: ByteSize,
    min: ByteSize,
    max: ByteSize,
) -> Result<(), String> {
    check_between(size, min, max)?;
    if !size.0.is_power_of_two() {
        return Err(format!("{size} is not a power of two"));
    }
    Ok(())
}

/// A size within `min..=max`.
pub(crate) fn check_between(size: ByteSize, min: ByteSize, max: ByteSize) -> Result<(), String> {
    if size < min || size > max {
        return Err(format!(
            "{size} is outside the allowed range {min} to {max}"
        ));
    }
    Ok(())
}

/// A rate or size that must not be zero.
pub(crate) fn check_nonzero(size: ByteSize) -> Result<(), String> {
    if size.0 == 0 {
        return Err("must be greater than zero".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["db", "data-1", "wal_2", "a.b", "A9", &"x".repeat(64)] {
            assert_eq!(check_name(good, "name"), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("a b", "' '"),
            ("a/b", "'/'"),
            ("dísk", "'í'"),
            (".", "must not be"),
            ("..", "must not be"),
            (&"x".repeat(65), "limit is 64"),
        ] {
            let err = check_name(bad, "name").expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn dns_names() {
        for good in [
            "tidemark-receiver",
            "dr.example.com",
            "dr.example.com.",
            "10.0.0.1",
            "::1",
        ] {
            assert_eq!(check_dns_name(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "a..b",
            "a_b",
            "a b",
            &"a".repeat(64),
            &"a.".repeat(127),
        ] {
            assert!(check_dns_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn group_names() {
        for good in ["libvirt-qemu", "kvm", "qemu_users", "107", "a.b"] {
            assert_eq!(check_group_name(good), Ok(()), "{good}");
        }
        for bad in ["", "-x", "a b", "a:b", "wheel,root", &"g".repeat(33)] {
            assert!(check_group_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn socket_paths() {
        assert!(check_unix_socket_path(Path::new("/run/tidemark/nbd.sock")).is_ok());
        assert!(check_unix_socket_path(Path::new("")).is_err());
        let long = format!("/{}", "s".repeat(107));
        assert!(check_unix_socket_path(Path::new(&long)).is_err());
    }
}
