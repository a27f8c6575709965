//! Sizes and durations as people write them: `"64MiB"`, `"4096"`,
//! `"1.5GiB"`, `"30s"`, `"2h30m"`, `"250ms"`.
//!
//! Both parse to exact integers (bytes, nanoseconds); a fraction is allowed
//! only if it comes out whole (`"0.5KiB"` is 512 bytes, `"0.3B"` is an
//! error). `Display` writes the shortest exact form and always parses back to
//! the same value.
//!
//! Size units are binary: `KiB`, `MiB`, `GiB`, `TiB`, `PiB`, `EiB` (any
//! case), or the single letters `K`, `M`, `G`, `T`, `P`, `E` with the same
//! meaning, as in `dd`, `lvcreate` and systemd. `KB`, `MB`, ... are rejected
//! as ambiguous: half the world reads them as powers of 1000, and a
//! bandwidth written `"100Mb"` may even mean bits.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ValueError;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A number of bytes, written in a configuration file as `"64MiB"`,
/// `"512KiB"`, `"1.5GiB"`, `"4096"` or a plain integer `4096`.
///
/// Units are binary: `B`, `KiB`, `MiB`, `GiB`, `TiB`, `PiB`, `EiB` (any case
/// but the `B` of bytes), or `K`, `M`, `G`, `T`, `P`, `E` with the same
/// meaning. `KB`, `MB`, ... are rejected as ambiguous. A fraction must come
/// out to whole bytes. Serializes as the string [`Display`](fmt::Display)
/// produces (`"64MiB"`), which parses back to the same size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` bytes.
    pub const fn b(n: u64) -> Self {
        Self(n)
    }

    /// `n` KiB (1024 bytes each).
    ///
    /// Panics if the result does not fit in a `u64` (a compile error in a
    /// constant).
    pub const fn kib(n: u64) -> Self {
        Self(n * KIB)
    }

    /// `n` MiB.
    ///
    /// Panics if the result does not fit in a `u64` (a compile error in a
    /// constant).
    pub const fn mib(n: u64) -> Self {
        Self(n * MIB)
    }

    /// `n` GiB.
    ///
    /// Panics if the result does not fit in a `u64` (a compile error in a
    /// constant).
    pub const fn gib(n: u64) -> Self {
        Self(n * GIB)
    }

    /// The number of bytes.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Parses a size as written in a configuration file or on the command
    /// line.
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        parse_size(text)
    }
}

/// (suffix, multiplier) in descending order, for display.
const BINARY_UNITS: [(&str, u64); 6] = [
    ("EiB", 1 << 60),
    ("PiB", 1 << 50),
    ("TiB", 1 << 40),
    ("GiB", GIB),
    ("MiB", MIB),
    ("KiB", KIB),
];

const SIZE_EXAMPLES: &str =
    r#"write a size such as "64MiB", "512KiB", "1GiB" or a byte count such as "4096""#;

fn parse_size(input: &str) -> Result<ByteSize, ValueError> {
    let fail = |problem: String| ValueError::new("size", input, problem);
    let text = input.trim();
    if text.is_empty() {
        return Err(fail(format!("empty; {SIZE_EXAMPLES}")));
    }
    let (number, rest) = split_number(text);
    if number.is_empty() {
        return Err(fail(format!(
            "does not start with a number; {SIZE_EXAMPLES}"
        )));
    }
    let unit = rest.trim_start();
    let multiplier = size_unit(unit).map_err(fail)?;
    let decimal = Decimal::parse(number).map_err(|p| fail(p.to_string()))?;
    let bytes = decimal.times(u128::from(multiplier)).map_err(|problem| {
        fail(match problem {
            ScaleProblem::Overflow => "too large".to_owned(),
            ScaleProblem::NotWhole => "is not a whole number of bytes".to_owned(),
        })
    })?;
    u64::try_from(bytes)
        .map(ByteSize)
        .map_err(|_| fail("too large (the limit is 16EiB - 1 byte)".to_owned()))
}

fn size_unit(unit: &str) -> Result<u64, String> {
    // Only an upper-case B means bytes: a lower-case b is a bit.
    if unit.is_empty() || unit == "B" {
        return Ok(1);
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        "e" | "eib" => 60,
        "kb" | "mb" | "gb" | "tb" | "pb" | "eb" => {
            let binary = format!("{}iB", unit[..1].to_ascii_uppercase());
            return Err(format!(
                "unit {unit:?} is ambiguous (powers of 1000 or 1024?); write {binary:?} \
                 for the binary unit"
            ));
        }
        _ => {
            return Err(format!(
                "unknown unit {unit:?}; use B, KiB, MiB, GiB, TiB, PiB or EiB (or K, M, G, \
                 T, P, E); {SIZE_EXAMPLES}"
            ))
        }
    };
    Ok(1 << shift)
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly: `64MiB`,
    /// `1536MiB`, `4KiB`; otherwise bytes, `1000B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 != 0 {
            for (suffix, multiplier) in BINARY_UNITS {
                if self.0.is_multiple_of(multiplier) {
                    return write!(f, "{}{suffix}", self.0 / multiplier);
                }
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl FromStr for ByteSize {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a size such as "64MiB", "512KiB", "1GiB" or a byte count"#)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
                ByteSize::parse(text).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(bytes))
            }

            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
                u64::try_from(bytes)
                    .map(ByteSize)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(bytes), &self))
            }
        }

        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A span of time, written in a configuration file as `"30s"`, `"5m"`,
/// `"1h"`, `"250ms"`, `"2h30m"` or `"1.5h"`.
///
/// Units: `d`, `h`, `m` (or `min`), `s`, `ms`, `us` (or `µs`), `ns`, largest
/// first, each at most once; spaces between parts are allowed. A bare number
/// is rejected (seconds? milliseconds?) except `"0"`. Integers are rejected
/// for the same reason. Serializes as the string
/// [`Display`](fmt::Display) produces (`"2h30m"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// `n` seconds.
    pub const fn from_secs(n: u64) -> Self {
        Self(std::time::Duration::from_secs(n))
    }

    /// `n` milliseconds.
    pub const fn from_millis(n: u64) -> Self {
        Self(std::time::Duration::from_millis(n))
    }

    /// The standard library duration, for timers and arithmetic.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// Parses a duration as written in a configuration file or on the
    /// command line.
    pub fn parse(text: &str) -> Result<Self, ValueError> {
        parse_duration(text).map(Self)
    }
}

impl From<std::time::Duration> for Duration {
    fn from(duration: std::time::Duration) -> Self {
        Self(duration)
    }
}

impl From<Duration> for std::time::Duration {
    fn from(duration: Duration) -> Self {
        duration.0
    }
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// (unit as displayed, nanoseconds) in descending order; also the order in
/// which parts must be written.
const DURATION_UNITS: [(&str, u128); 7] = [
    ("d", 86_400 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

const DURATION_EXAMPLES: &str = r#"write a duration such as "30s", "5m", "250ms" or "2h30m""#;

/// Parses a duration (`"30s"`, `"2h30m"`, `"250ms"`, ...) into a
/// [`std::time::Duration`]. The grammar is described on [`Duration`].
pub fn parse_duration(input: &str) -> Result<std::time::Duration, ValueError> {
    let fail = |problem: String| ValueError::new("duration", input, problem);
    let text = input.trim();
    if text.is_empty() {
        return Err(fail(format!("empty; {DURATION_EXAMPLES}")));
    }
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut rest = text;
    let mut total: u128 = 0;
    // Index into DURATION_UNITS of the previous part; parts must descend.
    let mut previous: Option<usize> = None;
    while !rest.is_empty() {
        let (number, after) = split_number(rest);
        if number.is_empty() {
            return Err(fail(format!(
                "expected a number at {:?}; {DURATION_EXAMPLES}",
                rest.chars().take(16).collect::<String>()
            )));
        }
        let after = after.trim_start();
        let unit_len = after
            .find(|c: char| !(c.is_alphabetic()))
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        if unit.is_empty() {
            return Err(fail(format!("{number} has no unit; {DURATION_EXAMPLES}")));
        }
        let rank = duration_unit(unit).ok_or_else(|| {
            fail(format!(
                "unknown unit {unit:?}; use d, h, m, s, ms, us or ns; {DURATION_EXAMPLES}"
            ))
        })?;
        if previous.is_some_and(|p| p >= rank) {
            return Err(fail(format!(
                "unit {unit:?} out of order; write each unit once, largest first, as in \"2h30m\""
            )));
        }
        previous = Some(rank);
        let decimal = Decimal::parse(number).map_err(|p| fail(p.to_string()))?;
        let nanos = decimal.times(DURATION_UNITS[rank].1).map_err(|problem| {
            fail(match problem {
                ScaleProblem::Overflow => "too long".to_owned(),
                ScaleProblem::NotWhole => "is not a whole number of nanoseconds".to_owned(),
            })
        })?;
        total = total
            .checked_add(nanos)
            .ok_or_else(|| fail("too long".to_owned()))?;
        rest = after.trim_start();
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| fail("too long".to_owned()))?;
    let nanos = u32::try_from(total % NANOS_PER_SEC).expect("remainder of division by 10^9");
    Ok(std::time::Duration::new(secs, nanos))
}

/// Index into [`DURATION_UNITS`] for a unit as written.
fn duration_unit(unit: &str) -> Option<usize> {
    let canonical = match unit {
        "min" => "m",
        "µs" | "μs" => "us",
        other => other,
    };
    DURATION_UNITS
        .iter()
        .position(|(name, _)| *name == canonical)
}

impl fmt::Display for Duration {
    /// Whole parts, largest unit first: `2h30m`, `1s500ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0.as_nanos();
        if rest == 0 {
            return f.write_str("0s");
        }
        for (unit, nanos) in DURATION_UNITS {
            let count = rest / nanos;
            if count > 0 {
                write!(f, "{count}{unit}")?;
                rest %= nanos;
            }
        }
        Ok(())
    }
}

impl FromStr for Duration {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;

        impl Visitor<'_> for DurationVisitor {
            type Value = Duration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration string such as "30s", "5m", "250ms" or "2h30m""#)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
                Duration::parse(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(DurationVisitor)
    }
}

/// Splits `"1.5GiB"` into `("1.5", "GiB")`.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    text.split_at(end)
}

/// A non-negative decimal number, exactly: `mantissa / 10^fraction_digits`.
#[derive(Debug)]
struct Decimal {
    mantissa: u128,
    fraction_digits: u32,
}

#[derive(Debug)]
enum ScaleProblem {
    Overflow,
    NotWhole,
}

impl Decimal {
    /// Parses `digits[.digits]`; the caller has already cut the text to
    /// digits and dots.
    fn parse(number: &str) -> Result<Self, &'static str> {
        let (whole, fraction) = match number.split_once('.') {
            Some((whole, fraction)) => (whole, fraction),
            None => (number, ""),
        };
        if whole.is_empty() || (number.contains('.') && fraction.is_empty()) {
            return Err("a number needs digits on both sides of its decimal point");
        }
        if fraction.contains('.') {
            return Err("a number may have only one decimal point");
        }
        let mut mantissa: u128 = 0;
        for digit in whole.bytes().chain(fraction.bytes()) {
            mantissa = mantissa
                .checked_mul(10)
                .and_then(|m| m.checked_add(u128::from(digit - b'0')))
                .ok_or("too many digits")?;
        }
        let fraction_digits = u32::try_from(fraction.len()).map_err(|_| "too many digits")?;
        Ok(Self {
            mantissa,
            fraction_digits,
        })
    }

    /// `self * unit`, which must be a whole number.
    fn times(&self, unit: u128) -> Result<u128, ScaleProblem> {
        let product = self
            .mantissa
            .checked_mul(unit)
            .ok_or(ScaleProblem::Overflow)?;
        let divisor = 10u128
            .checked_pow(self.fraction_digits)
            .ok_or(ScaleProblem::NotWhole)?;
        if product % divisor != 0 {
            return Err(ScaleProblem::NotWhole);
        }
        Ok(product / divisor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as StdDuration;

    #[test]
    fn sizes_in_every_accepted_spelling() {
        let cases = [
            ("4096", 4096),
            ("4096B", 4096),
            ("0", 0),
            ("512KiB", 512 * KIB),
            ("512kib", 512 * KIB),
            ("512K", 512 * KIB),
            ("512k", 512 * KIB),
            ("64MiB", 64 * MIB),
            ("64 MiB", 64 * MIB),
            (" 64M ", 64 * MIB),
            ("1GiB", GIB),
            ("1.5GiB", 3 * GIB / 2),
            ("0.5KiB", 512),
            ("2TiB", 2 << 40),
            ("1PiB", 1 << 50),
            ("15EiB", 15 << 60),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, bytes) in cases {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn bad_sizes_say_why() {
        let cases = [
            ("", "empty"),
            ("  ", "empty"),
            ("MiB", "does not start with a number"),
            ("-1MiB", "does not start with a number"),
            ("64MB", "ambiguous"),
            ("100Mb", "ambiguous"),
            ("64XiB", "unknown unit"),
            ("64b", "unknown unit"),
            ("64MiB/s", "unknown unit"),
            ("1.MiB", "both sides"),
            (".5MiB", "both sides"),
            ("1.2.3MiB", "only one decimal point"),
            ("0.3B", "whole number of bytes"),
            ("16EiB", "too large"),
            ("18446744073709551616", "too large"),
            (
                "99999999999999999999999999999999999999999",
                "too many digits",
            ),
        ];
        for (text, problem) in cases {
            let err = ByteSize::parse(text).expect_err(text);
            assert!(err.to_string().contains(problem), "{text}: {err}");
            assert_eq!(err.what, "size");
        }
    }

    #[test]
    fn sizes_display_in_the_largest_exact_unit() {
        assert_eq!(ByteSize::mib(64).to_string(), "64MiB");
        assert_eq!(ByteSize::mib(1536).to_string(), "1536MiB");
        assert_eq!(ByteSize::gib(8).to_string(), "8GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert_eq!(ByteSize(0).to_string(), "0B");
        assert_eq!(ByteSize(u64::MAX).to_string(), "18446744073709551615B");
    }

    #[test]
    fn durations_in_every_accepted_spelling() {
        let cases = [
            ("30s", StdDuration::from_secs(30)),
            ("5m", StdDuration::from_secs(300)),
            ("5min", StdDuration::from_secs(300)),
            ("1h", StdDuration::from_secs(3600)),
            ("250ms", StdDuration::from_millis(250)),
            ("2h30m", StdDuration::from_secs(9000)),
            ("2h 30m", StdDuration::from_secs(9000)),
            ("1d", StdDuration::from_secs(86_400)),
            ("1.5h", StdDuration::from_secs(5400)),
            ("0.5s", StdDuration::from_millis(500)),
            ("10us", StdDuration::from_micros(10)),
            ("10µs", StdDuration::from_micros(10)),
            ("7ns", StdDuration::from_nanos(7)),
            ("1s500ms", StdDuration::from_millis(1500)),
            ("0", StdDuration::ZERO),
            ("0s", StdDuration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_durations_say_why() {
        let cases = [
            ("", "empty"),
            ("30", "has no unit"),
            ("s", "expected a number"),
            ("30x", "unknown unit"),
            ("30S", "unknown unit"),
            ("30m2h", "out of order"),
            ("1m1m", "out of order"),
            ("1.5ns", "whole number of nanoseconds"),
            ("-1s", "expected a number"),
            ("1s-", "expected a number"),
            ("99999999999999999999d", "too long"),
            ("1.s", "both sides"),
        ];
        for (text, problem) in cases {
            let err = parse_duration(text).expect_err(text);
            assert!(err.to_string().contains(problem), "{text}: {err}");
            assert_eq!(err.what, "duration");
        }
    }

    #[test]
    fn durations_display_as_whole_parts() {
        assert_eq!(Duration::from_secs(9000).to_string(), "2h30m");
        assert_eq!(Duration::from_millis(1500).to_string(), "1s500ms");
        assert_eq!(Duration::from_secs(0).to_string(), "0s");
        assert_eq!(Duration::from_secs(90_061).to_string(), "1d1h1m1s");
        let max = Duration(StdDuration::MAX);
        assert_eq!(Duration::parse(&max.to_string()), Ok(max));
    }
}
