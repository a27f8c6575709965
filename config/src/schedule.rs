//! Daily time windows for the bandwidth schedule: `"08:00-18:00"`.
//!
//! Times are the protected host's local wall-clock time, to the minute. A
//! window includes its start and excludes its end; `"22:00-06:00"` wraps past
//! midnight, `"00:00-24:00"` is the whole day. The shipper passes the current
//! minute of the day in, so nothing here reads a clock.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::ValueError;

const MINUTES_PER_DAY: u16 = 24 * 60;

/// A wall-clock time to the minute, `00:00` to `24:00` inclusive (`24:00`
/// only makes sense as the end of a window).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TimeOfDay {
    minutes: u16,
}

impl TimeOfDay {
    /// `hour:minute`, or `None` past `24:00`.
    pub fn new(hour: u8, minute: u8) -> Option<Self> {
        let minutes = u16::from(hour) * 60 + u16::from(minute);
        (minute < 60 && minutes <= MINUTES_PER_DAY).then_some(Self { minutes })
    }

    /// Minutes since midnight, `0..=1440`.
    pub fn minutes_since_midnight(self) -> u16 {
        self.minutes
    }

    /// Parses `"HH:MM"` (or `"H:MM"`).
    pub fn parse(input: &str) -> Result<Self, ValueError> {
        parse_time(input.trim()).map_err(|problem| ValueError::new("time of day", input, problem))
    }
}

fn parse_time(text: &str) -> Result<TimeOfDay, String> {
    let expected = r#"write a time as "HH:MM", such as "08:00" or "18:30""#;
    let Some((hour, minute)) = text.split_once(':') else {
        return Err(format!("{text:?} is not a time; {expected}"));
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !(1..=2).contains(&hour.len())
        || minute.len() != 2
        || !all_digits(hour)
        || !all_digits(minute)
    {
        return Err(format!("{text:?} is not a time; {expected}"));
    }
    let hour: u8 = hour.parse().map_err(|_| format!("{text:?}: bad hour"))?;
    let minute: u8 = minute
        .parse()
        .map_err(|_| format!("{text:?}: bad minute"))?;
    TimeOfDay::new(hour, minute).ok_or_else(|| format!("{text:?} is past 24:00"))
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.minutes / 60, self.minutes % 60)
    }
}

/// A daily window `start-end`, written `"08:00-18:00"`.
///
/// Never empty: `start != end`, and `start` is before `24:00`. When `end` is
/// earlier than `start` the window runs past midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimeWindow {
    start: TimeOfDay,
    end: TimeOfDay,
}

impl TimeWindow {
    /// Parses `"HH:MM-HH:MM"`.
    pub fn parse(input: &str) -> Result<Self, ValueError> {
        let fail = |problem: String| ValueError::new("time window", input, problem);
        let expected = r#"write a window as "HH:MM-HH:MM", such as "08:00-18:00""#;
        let Some((start, end)) = input.trim().split_once('-') else {
            return Err(fail(format!("no '-' between start and end; {expected}")));
        };
        let start = parse_time(start.trim()).map_err(|p| fail(format!("start {p}")))?;
        let end = parse_time(end.trim()).map_err(|p| fail(format!("end {p}")))?;
        if start.minutes == MINUTES_PER_DAY {
            return Err(fail(
                "a window cannot start at 24:00; write 00:00".to_owned(),
            ));
        }
        if start == end {
            return Err(fail(
                "start and end are the same time; for the whole day write \"00:00-24:00\""
                    .to_owned(),
            ));
        }
        Ok(Self { start, end })
    }

    /// First minute inside the window.
    pub fn start(&self) -> TimeOfDay {
        self.start
    }

    /// First minute after the window.
    pub fn end(&self) -> TimeOfDay {
        self.end
    }

    /// Whether the minute `minute_of_day` (minutes since local midnight;
    /// values of 1440 and more wrap around) falls inside the window.
    pub fn contains(&self, minute_of_day: u16) -> bool {
        let minute = minute_of_day % MINUTES_PER_DAY;
        self.ranges().any(|range| range.contains(&minute))
    }

    /// Whether two windows share at least one minute.
    pub fn overlaps(&self, other: &TimeWindow) -> bool {
        self.ranges()
            .any(|a| other.ranges().any(|b| a.start < b.end && b.start < a.end))
    }

    /// The window as one or two half-open minute ranges within one day.
    fn ranges(&self) -> impl Iterator<Item = Range<u16>> {
        let (start, end) = (self.start.minutes, self.end.minutes);
        let (first, second) = if start < end {
            (start..end, None)
        } else {
            (start..MINUTES_PER_DAY, Some(0..end))
        };
        std::iter::once(first).chain(second.filter(|r| !r.is_empty()))
    }
}

impl fmt::Display for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

impl FromStr for TimeWindow {
    type Err = ValueError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl Serialize for TimeWindow {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TimeWindow {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WindowVisitor;

        impl Visitor<'_> for WindowVisitor {
            type Value = TimeWindow;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a time window such as "08:00-18:00""#)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<TimeWindow, E> {
                TimeWindow::parse(text).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(WindowVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(text: &str) -> TimeWindow {
        TimeWindow::parse(text).expect(text)
    }

    #[test]
    fn windows_parse_and_display() {
        assert_eq!(window("08:00-18:00").to_string(), "08:00-18:00");
        assert_eq!(window(" 8:00 - 18:30 ").to_string(), "08:00-18:30");
        assert_eq!(window("00:00-24:00").to_string(), "00:00-24:00");
        assert_eq!(window("22:00-06:00").to_string(), "22:00-06:00");
    }

    #[test]
    fn bad_windows_say_why() {
        let cases = [
            ("", "no '-'"),
            ("08:00", "no '-'"),
            ("08:00-", "end"),
            ("8-18", "not a time"),
            ("08:0-18:00", "not a time"),
            ("08:60-18:00", "past 24:00"),
            ("25:00-26:00", "past 24:00"),
            ("24:00-06:00", "cannot start at 24:00"),
            ("08:00-08:00", "same time"),
            ("00:00-00:00", "same time"),
            ("08:00-18:00-19:00", "not a time"),
            ("+8:00-18:00", "not a time"),
        ];
        for (text, problem) in cases {
            let err = TimeWindow::parse(text).expect_err(text);
            assert!(err.to_string().contains(problem), "{text}: {err}");
        }
    }

    #[test]
    fn times_of_day() {
        assert_eq!(
            TimeOfDay::parse("08:30").unwrap().minutes_since_midnight(),
            510
        );
        assert_eq!(
            TimeOfDay::parse(" 24:00 ")
                .unwrap()
                .minutes_since_midnight(),
            1440
        );
        assert_eq!(TimeOfDay::new(24, 1), None);
        assert_eq!(TimeOfDay::new(7, 60), None);
        assert_eq!(TimeOfDay::new(7, 5).unwrap().to_string(), "07:05");
        let err = TimeOfDay::parse("7pm").unwrap_err();
        assert_eq!(err.what, "time of day");
    }

    #[test]
    fn containment_includes_start_and_excludes_end() {
        let day = window("08:00-18:00");
        assert!(!day.contains(8 * 60 - 1));
        assert!(day.contains(8 * 60));
        assert!(day.contains(18 * 60 - 1));
        assert!(!day.contains(18 * 60));

        let night = window("22:00-06:00");
        assert!(night.contains(23 * 60));
        assert!(night.contains(0));
        assert!(night.contains(5 * 60 + 59));
        assert!(!night.contains(6 * 60));
        assert!(!night.contains(12 * 60));
        assert!(night.contains(1440 + 60), "minutes past a day wrap");

        let all = window("00:00-24:00");
        assert!((0..1440).all(|m| all.contains(m)));
    }

    #[test]
    fn overlap_accounts_for_midnight() {
        assert!(window("08:00-18:00").overlaps(&window("17:00-19:00")));
        assert!(!window("08:00-18:00").overlaps(&window("18:00-19:00")));
        assert!(window("22:00-06:00").overlaps(&window("05:00-07:00")));
        assert!(!window("22:00-06:00").overlaps(&window("06:00-22:00")));
        assert!(window("00:00-24:00").overlaps(&window("12:00-12:01")));
    }
}
