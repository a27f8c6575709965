//! Times as people read them: wall-clock timestamps (UTC, RFC 3339) of the
//! nanoseconds since the Unix epoch that points and status carry, and ages.

use std::time::{Duration, UNIX_EPOCH};

/// Formats nanoseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`
/// (milliseconds cut, not rounded).
pub(crate) fn utc(ns: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

/// An age in the coarsest unit that still reads well: `45s`, `12m`, `5h`,
/// `3d` (as `tidemark points` and `tidemark status` show ages).
pub(crate) fn age(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::{age, utc};

    #[test]
    fn ages_read_in_their_coarsest_unit() {
        assert_eq!(age(0), "0s");
        assert_eq!(age(119), "119s");
        assert_eq!(age(600), "10m");
        assert_eq!(age(5 * 3600), "5h");
        assert_eq!(age(3 * 86_400), "3d");
    }

    #[test]
    fn known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_795_425_053_123_000_000), "2026-11-23T09:10:53.123Z");
        // Milliseconds are cut, as the points' times always were.
        assert_eq!(utc(1_795_425_053_123_999_999), "2026-11-23T09:10:53.123Z");
        // The newest instant the field can hold.
        assert_eq!(utc(u64::MAX), "2554-07-21T23:34:33.709Z");
    }
}
