//! Property tests: the value parsers round-trip with their `Display`, and no
//! parser panics on any input (configuration text is untrusted input too).

use std::path::Path;

use proptest::prelude::*;
use tidemark_config::{parse_duration, parse_str, ByteSize, Duration, HostPort, TimeWindow};

/// Units with their multipliers, as a writer might use them.
const SIZE_UNITS: [(&str, u64); 13] = [
    ("", 1),
    ("B", 1),
    ("K", 1 << 10),
    ("KiB", 1 << 10),
    ("kib", 1 << 10),
    ("M", 1 << 20),
    ("MiB", 1 << 20),
    ("G", 1 << 30),
    ("GiB", 1 << 30),
    ("T", 1 << 40),
    ("TiB", 1 << 40),
    ("PiB", 1 << 50),
    ("EiB", 1 << 60),
];

const DURATION_UNITS: [(&str, u128); 9] = [
    ("d", 86_400_000_000_000),
    ("h", 3_600_000_000_000),
    ("m", 60_000_000_000),
    ("min", 60_000_000_000),
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("µs", 1_000),
    ("ns", 1),
];

/// Text a configuration parser is likely to choke on: TOML punctuation,
/// digits, unit letters, quotes, newlines and some non-ASCII.
fn config_like_text() -> impl Strategy<Value = String> {
    proptest::string::string_regex(r#"[\[\]{}=,."'#\n a-z0-9:_\-+µé\\]{0,200}"#)
        .expect("valid regex")
}

proptest! {
    #[test]
    fn size_display_parses_back(bytes in any::<u64>()) {
        let size = ByteSize(bytes);
        prop_assert_eq!(ByteSize::parse(&size.to_string()), Ok(size));
    }

    #[test]
    fn size_in_any_unit_parses_to_its_product(n in 0u64..100_000, unit in 0..SIZE_UNITS.len()) {
        let (suffix, multiplier) = SIZE_UNITS[unit];
        let expected = u128::from(n) * u128::from(multiplier);
        let parsed = ByteSize::parse(&format!("{n}{suffix}"));
        match u64::try_from(expected) {
            Ok(bytes) => prop_assert_eq!(parsed, Ok(ByteSize(bytes))),
            Err(_) => prop_assert!(parsed.is_err()),
        }
    }

    #[test]
    fn size_serde_round_trip(bytes in any::<u64>()) {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct Wrapper { size: ByteSize }
        let before = Wrapper { size: ByteSize(bytes) };
        let text = toml::to_string(&before).unwrap();
        let after: Wrapper = toml::from_str(&text).unwrap();
        prop_assert_eq!(after, before);
    }

    #[test]
    fn duration_display_parses_back(secs in any::<u64>(), nanos in 0u32..1_000_000_000) {
        let duration = Duration(std::time::Duration::new(secs, nanos));
        prop_assert_eq!(Duration::parse(&duration.to_string()), Ok(duration));
    }

    #[test]
    fn duration_parts_add_up(
        parts in proptest::sample::subsequence((0..DURATION_UNITS.len()).collect::<Vec<_>>(), 1..4),
        counts in proptest::collection::vec(0u64..1000, 4),
    ) {
        // Units in table order are largest first, except the aliases "min"
        // and "µs", which must not follow their twins.
        let mut text = String::new();
        let mut nanos: u128 = 0;
        let mut last_rank = None;
        for (&unit, &count) in parts.iter().zip(&counts) {
            let (name, unit_nanos) = DURATION_UNITS[unit];
            let rank = unit_nanos;
            if last_rank == Some(rank) {
                continue;
            }
            last_rank = Some(rank);
            text.push_str(&format!("{count}{name}"));
            nanos += u128::from(count) * unit_nanos;
        }
        let parsed = parse_duration(&text).map(|d| d.as_nanos());
        prop_assert_eq!(parsed, Ok(nanos), "{}", text);
    }

    #[test]
    fn window_display_parses_back(start in 0u16..1440, end in 0u16..=1440) {
        prop_assume!(start != end);
        let text = format!("{:02}:{:02}-{:02}:{:02}", start / 60, start % 60, end / 60, end % 60);
        let window = TimeWindow::parse(&text).unwrap();
        prop_assert_eq!(window.to_string(), text);
        prop_assert!(window.contains(start));
        prop_assert!(!window.contains(end % 1440) || (end == 1440 && start == 0));
    }

    #[test]
    fn value_parsers_never_panic(text in any::<String>()) {
        let _ = ByteSize::parse(&text);
        let _ = parse_duration(&text);
        let _ = TimeWindow::parse(&text);
        let _ = HostPort::parse(&text);
    }

    #[test]
    fn value_parsers_never_panic_on_near_misses(text in "[0-9.:\\[\\] a-zA-Zµ_-]{0,24}") {
        if let Ok(size) = ByteSize::parse(&text) {
            prop_assert_eq!(ByteSize::parse(&size.to_string()), Ok(size));
        }
        if let Ok(duration) = Duration::parse(&text) {
            prop_assert_eq!(Duration::parse(&duration.to_string()), Ok(duration));
        }
        if let Ok(window) = TimeWindow::parse(&text) {
            prop_assert_eq!(TimeWindow::parse(&window.to_string()), Ok(window));
        }
        if let Ok(address) = HostPort::parse(&text) {
            prop_assert_eq!(HostPort::parse(&address.to_string()), Ok(address));
        }
    }

    #[test]
    fn config_parser_never_panics(text in config_like_text()) {
        if let Err(err) = parse_str(&text, Path::new("fuzz.toml")) {
            // Every error about the contents has a position inside the text.
            if let Some(location) = err.location() {
                prop_assert!(location.line >= 1 && location.line <= text.lines().count() + 1);
                prop_assert!(location.column >= 1);
            }
            let _ = err.to_string();
        }
    }

    #[test]
    fn config_parser_never_panics_on_mangled_examples(
        example in 0usize..4,
        cut in any::<prop::sample::Index>(),
        splice in "[\\[\\]{}=\"'\\n.a-z0-9]{0,8}",
    ) {
        let name = ["tracker.toml", "shipper.toml", "receiver.toml", "all-in-one.toml"][example];
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name);
        let original = std::fs::read_to_string(&path).unwrap();
        let mut at = cut.index(original.len() + 1);
        while !original.is_char_boundary(at) {
            at -= 1;
        }
        let text = format!("{}{splice}{}", &original[..at], &original[at..]);
        if let Err(err) = parse_str(&text, &path) {
            let _ = err.to_string();
        }
    }
}
