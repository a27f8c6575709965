//! The configuration loader (`config/src`): daemon configuration files,
//! recovery plans and the value types in them, from arbitrary text.
//!
//! Besides "never panics": what loads is written back (as the CLI writes
//! configurations) to text that loads to the same thing, and every value
//! that parses prints as text that parses to it.

use std::collections::BTreeMap;
use std::path::Path;
use tidemark_config::{
    parse_duration, parse_plan, parse_str, ByteSize, Duration, HostPort, TimeWindow,
};

const ORIGIN: &str = "fuzz.toml";

/// `data` as the text of a configuration file, a plan, and a value.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let origin = Path::new(ORIGIN);
    match parse_str(&text, origin) {
        Ok(config) => {
            let written = toml::to_string(&config).expect("a loaded configuration serializes");
            let again = parse_str(&written, origin)
                .unwrap_or_else(|e| panic!("written back as\n{written}\nit fails: {e}"));
            assert_eq!(again, config, "written back as\n{written}");
        }
        Err(error) => drop(error.to_string()),
    }
    match parse_plan(&text, origin) {
        Ok(plan) => {
            let document = BTreeMap::from([("plan", &plan)]);
            let written = toml::to_string(&document).expect("a loaded plan serializes");
            let again = parse_plan(&written, origin)
                .unwrap_or_else(|e| panic!("written back as\n{written}\nit fails: {e}"));
            assert_eq!(again, plan, "written back as\n{written}");
        }
        Err(error) => drop(error.to_string()),
    }
    values(text.trim());
}

/// Every value type that parses prints back to itself.
fn values(text: &str) {
    if let Ok(size) = ByteSize::parse(text) {
        assert_eq!(ByteSize::parse(&size.to_string()), Ok(size));
    }
    if let Ok(duration) = Duration::parse(text) {
        assert_eq!(Duration::parse(&duration.to_string()), Ok(duration));
    }
    let _ = parse_duration(text);
    if let Ok(address) = HostPort::parse(text) {
        assert_eq!(HostPort::parse(&address.to_string()), Ok(address));
    }
    if let Ok(window) = TimeWindow::parse(text) {
        assert_eq!(TimeWindow::parse(&window.to_string()), Ok(window));
    }
}

/// The annotated examples of every table, a plan, and values of every
/// type.
pub fn config_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let plan = r#"[plan]
description = "two tiers"
data-dir = "/var/lib/tidemark/replicas"
to = "/srv/failover"
test-socket-dir = "/run/tidemark/test"
hook-timeout = "30s"
drain-timeout = "2m"

[[plan.step]]
name = "databases"
groups = ["db1.example.com/db", "db2.example.com"]
pre = ["/usr/local/bin/stop-app"]
post = ['echo "post $TIDEMARK_STEP"']
pause = "check the database"

[[plan.step]]
name = "applications"
groups = ["app1.example.com"]
"#;
    vec![
        (
            "tracker",
            include_str!("../../config/examples/tracker.toml"),
        ),
        (
            "shipper",
            include_str!("../../config/examples/shipper.toml"),
        ),
        (
            "receiver",
            include_str!("../../config/examples/receiver.toml"),
        ),
        (
            "all-in-one",
            include_str!("../../config/examples/all-in-one.toml"),
        ),
        ("plan", plan),
        ("size", "64MiB"),
        ("duration", "1h30m"),
        ("address", "[2001:db8::1]:7480"),
        ("window", "22:00-06:30"),
    ]
    .into_iter()
    .map(|(name, text)| (name, text.as_bytes().to_vec()))
    .collect()
}
