//! Loading whole files: what an admin sees when a file is wrong (file, line,
//! column, setting, expectation), the defaults a sparse file gets, and the
//! checks between tables of one file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tidemark_config::{
    load, parse_str, ByteSize, ConfigError, DaemonKind, Duration, LoadedConfig, ReceiverConfig,
    ShipperConfig, TrackerConfig,
};

const ORIGIN: &str = "config/examples/tracker.toml";

fn parse(text: &str) -> Result<LoadedConfig, ConfigError> {
    parse_str(text, Path::new(ORIGIN))
}

fn parse_err(text: &str) -> ConfigError {
    match parse(text) {
        Ok(config) => panic!("expected an error, got {config:#?}"),
        Err(err) => err,
    }
}

/// Checks an error's position and setting, and that its message contains
/// `says`; returns the message for further checks.
#[track_caller]
fn assert_points_at(
    err: &ConfigError,
    line: usize,
    column: usize,
    field: &str,
    says: &str,
) -> String {
    let message = err.to_string();
    let location = err
        .location()
        .unwrap_or_else(|| panic!("no location in {message:?}"));
    assert_eq!(location.file, PathBuf::from(ORIGIN), "{message}");
    assert_eq!(
        (location.line, location.column),
        (line, column),
        "{message}"
    );
    assert_eq!(
        err.field().map(ToString::to_string).as_deref(),
        Some(field),
        "{message}"
    );
    assert!(
        message.contains(says),
        "{message:?} should contain {says:?}"
    );
    message
}

const DISK: &str = "[[tracker.disk]]\nname = \"a\"\npath = \"/dev/a\"\n";

// ---------------------------------------------------------------- schema --

#[test]
fn unknown_key_names_file_line_column_table_and_the_known_keys() {
    let text = "\
[tracker]
log-dir = \"/var/lib/tidemark/log\"

[[tracker.disk]]
name = \"a\"
path = \"/dev/a\"

[[tracker.disk]]
name = \"b\"
pth = \"/dev/b\"
";
    let err = parse_err(text);
    assert!(matches!(err, ConfigError::Schema { .. }), "{err:?}");
    let message = assert_points_at(&err, 10, 1, "tracker.disk[1]", "unknown field `pth`");
    assert_eq!(
        message,
        "config/examples/tracker.toml:10:1: tracker.disk[1]: unknown field `pth`, \
         expected one of `name`, `path`, `export-name`, `cache`"
    );
}

#[test]
fn unknown_key_in_nested_table() {
    let text = "[shipper]\nhost = \"h\"\nreceiver = \"r:1\"\n[shipper.retry]\n  multiplyer = 3\n";
    let err = parse_err(text);
    assert_points_at(&err, 5, 3, "shipper.retry", "unknown field `multiplyer`");
    assert!(err.to_string().contains("`multiplier`"), "{err}");
}

#[test]
fn unknown_key_as_dotted_key() {
    let err = parse_err("tracker.lgo-dir = \"/x\"\n");
    assert_points_at(&err, 1, 9, "tracker", "unknown field `lgo-dir`");
}

#[test]
fn unknown_top_level_table() {
    let err = parse_err("[trakcer]\nlog-dir = \"/x\"\n");
    assert_points_at(
        &err,
        1,
        2,
        "top level",
        "unknown field `trakcer`, expected one of `tracker`, `shipper`, `receiver`",
    );
}

#[test]
fn wrong_type_names_the_setting_and_the_expected_type() {
    let text = "[shipper]\nhost = \"h\"\nreceiver = \"r:1\"\ncompression-level = \"high\"\n";
    let err = parse_err(text);
    assert_points_at(
        &err,
        4,
        21,
        "shipper.compression-level",
        "invalid type: string \"high\", expected i32",
    );
}

#[test]
fn wrong_type_for_a_flag_and_an_address() {
    let err = parse_err(&format!("[tracker]\nmlockall = \"yes\"\n{DISK}"));
    assert_points_at(&err, 2, 12, "tracker.mlockall", "expected a boolean");

    let err = parse_err(&format!(
        "[tracker]\nmetrics-listen = \"localhost\"\n{DISK}"
    ));
    assert_points_at(&err, 2, 18, "tracker.metrics-listen", "socket address");
}

#[test]
fn wrong_type_for_a_table() {
    let err = parse_err("tracker = 5\n");
    assert_points_at(&err, 1, 11, "tracker", "expected a [tracker] table");

    let err = parse_err("[tracker]\ndisk = 5\n");
    assert_points_at(&err, 2, 8, "tracker.disk", "invalid type: integer `5`");

    let err = parse_err("[tracker]\ndisk = [3]\n");
    assert_points_at(
        &err,
        2,
        9,
        "tracker.disk[0]",
        "expected a [[tracker.disk]] table",
    );
}

#[test]
fn single_brackets_for_a_list_of_tables_get_a_hint() {
    let err = parse_err("[tracker]\n[tracker.disk]\nname = \"a\"\npath = \"/a\"\n");
    assert_points_at(
        &err,
        2,
        1,
        "tracker.disk",
        "expected [[tracker.disk]] tables, one per entry (note the double brackets)",
    );
    let err = parse_err("[receiver.host]\nname = \"a\"\n");
    assert_points_at(
        &err,
        1,
        1,
        "receiver.host",
        "expected [[receiver.host]] tables",
    );
    let text = "[shipper]\nhost = \"h\"\nreceiver = \"r:1\"\n\
                [shipper.bandwidth.schedule]\nwindow = \"08:00-09:00\"\nlimit = 1\n";
    let err = parse_err(text);
    assert_points_at(
        &err,
        4,
        1,
        "shipper.bandwidth.schedule",
        "[[shipper.bandwidth.schedule]]",
    );
}

#[test]
fn missing_required_key_points_at_its_table_header() {
    let text = format!("[tracker]\n{DISK}\n[[tracker.disk]]\nname = \"b\"\n");
    let err = parse_err(&text);
    assert_points_at(&err, 6, 1, "tracker.disk[1]", "missing field `path`");

    let err = parse_err("[shipper]\nhost = \"h\"\n");
    assert_points_at(&err, 1, 1, "shipper", "no receiver");
}

/// A shipper dials one `receiver`, or several `receivers` sharing one
/// store; not both, and none twice.
#[test]
fn a_shipper_names_one_receiver_or_several() {
    let shipper = parse("[shipper]\nhost = \"h\"\nreceivers = [\"r1:7480\", \"r2:7480\"]\n")
        .unwrap()
        .shipper
        .unwrap();
    let dialled: Vec<String> = shipper.receivers().iter().map(|r| r.to_string()).collect();
    assert_eq!(dialled, ["r1:7480", "r2:7480"]);
    let err =
        parse_err("[shipper]\nhost = \"h\"\nreceiver = \"r1:7480\"\nreceivers = [\"r2:7480\"]\n");
    assert!(err.to_string().contains("not both"), "{err}");
    let err = parse_err("[shipper]\nhost = \"h\"\nreceivers = [\"r1:7480\", \"r1:7480\"]\n");
    assert!(err.to_string().contains("listed twice"), "{err}");
    let err = parse_err("[shipper]\nhost = \"h\"\nreceivers = []\n");
    assert!(err.to_string().contains("no receiver"), "{err}");
}

#[test]
fn missing_required_key_in_inline_table() {
    let err = parse_err("[tracker]\ndisk = [{ name = \"a\", path = \"/a\" }, { name = \"b\" }]\n");
    assert_points_at(&err, 2, 38, "tracker.disk[1]", "missing field `path`");
}

#[test]
fn bad_size_says_what_sizes_look_like() {
    let err = parse_err(&format!("[tracker]\nsegment-size = \"64MB\"\n{DISK}"));
    let message = assert_points_at(&err, 2, 16, "tracker.segment-size", "invalid size \"64MB\"");
    assert!(message.contains("ambiguous"), "{message}");
    assert!(message.contains("\"MiB\""), "{message}");

    let err = parse_err(&format!("[tracker]\nsegment-size = \"lots\"\n{DISK}"));
    assert_points_at(&err, 2, 16, "tracker.segment-size", "\"64MiB\"");

    let err = parse_err(&format!("[tracker]\nsegment-size = -1\n{DISK}"));
    assert_points_at(
        &err,
        2,
        16,
        "tracker.segment-size",
        "invalid value: integer `-1`",
    );

    let err = parse_err(&format!("[tracker]\nsegment-size = 1.5\n{DISK}"));
    assert_points_at(&err, 2, 16, "tracker.segment-size", "expected a size");
}

#[test]
fn sizes_accept_strings_and_integers() {
    let text = format!(
        "[tracker]\nsegment-size = 16777216\nlog-size-limit = \"1.5GiB\"\nmax-block-size = 1048576\n{DISK}"
    );
    let tracker = parse(&text).unwrap().tracker.unwrap();
    assert_eq!(tracker.segment_size, ByteSize::mib(16));
    assert_eq!(tracker.log_size_limit, ByteSize::mib(1536));
}

#[test]
fn bad_duration_says_what_durations_look_like() {
    let base = "[shipper]\nhost = \"h\"\nreceiver = \"r:1\"\n[shipper.retry]\n";
    let err = parse_err(&format!("{base}max-backoff = \"60\"\n"));
    assert_points_at(
        &err,
        5,
        15,
        "shipper.retry.max-backoff",
        "invalid duration \"60\": 60 has no unit",
    );

    let err = parse_err(&format!("{base}max-backoff = 60\n"));
    assert_points_at(
        &err,
        5,
        15,
        "shipper.retry.max-backoff",
        "invalid type: integer `60`, expected a duration string such as \"30s\"",
    );

    let err = parse_err(&format!("{base}max-backoff = \"1 minute\"\n"));
    assert_points_at(
        &err,
        5,
        15,
        "shipper.retry.max-backoff",
        "unknown unit \"minute\"",
    );
}

#[test]
fn bad_window_and_address_are_schema_errors() {
    let base = "[shipper]\nhost = \"h\"\nreceiver = \"r:1\"\n";
    let err = parse_err(&format!(
        "{base}[[shipper.bandwidth.schedule]]\nwindow = \"8-18\"\nlimit = \"1MiB\"\n"
    ));
    assert_points_at(
        &err,
        5,
        10,
        "shipper.bandwidth.schedule[0].window",
        "invalid time window \"8-18\"",
    );

    let err = parse_err("[shipper]\nhost = \"h\"\nreceiver = \"dr.example.com\"\n");
    assert_points_at(&err, 3, 12, "shipper.receiver", "missing port");
}

// ---------------------------------------------------------------- syntax --

#[test]
fn syntax_error_names_the_setting_when_it_can() {
    let err = parse_err("[tracker]\nlog-dir = /var/lib\n");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert_points_at(
        &err,
        2,
        11,
        "tracker.log-dir",
        "invalid TOML: string values must be quoted",
    );
}

#[test]
fn syntax_error_duplicate_key() {
    let err = parse_err("[tracker]\nmlockall = true\nmlockall = false\n");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert_points_at(&err, 3, 1, "tracker", "duplicate key");
}

#[test]
fn syntax_error_in_a_header() {
    let err = parse_err("[tracker]\n[[tracker.disk]\n");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    assert_points_at(&err, 2, 16, "tracker.disk[0]", "unclosed array table");
}

#[test]
fn syntax_error_without_a_setting() {
    let err = parse_err("= 1\n");
    assert!(
        matches!(err, ConfigError::Syntax { field: None, .. }),
        "{err:?}"
    );
    let location = err.location().unwrap();
    assert_eq!(location.line, 1);
    assert!(
        err.to_string()
            .starts_with("config/examples/tracker.toml:1:"),
        "{err}"
    );
}

// ------------------------------------------------------------ top level --

#[test]
fn a_file_without_daemon_tables_is_an_error() {
    for text in ["", "# only a comment\n"] {
        let err = parse_err(text);
        assert!(matches!(err, ConfigError::NoDaemonTable { .. }), "{err:?}");
        assert!(err
            .to_string()
            .contains("no [tracker], [shipper] or [receiver] table"));
    }
}

#[test]
fn daemons_are_detected_by_their_tables() {
    let config = parse("[receiver]\n").unwrap();
    assert_eq!(config.daemons(), vec![DaemonKind::Receiver]);
    assert!(config.require_receiver().is_ok());
    let err = config.require_tracker().unwrap_err();
    assert!(matches!(
        err,
        ConfigError::MissingDaemonTable {
            daemon: DaemonKind::Tracker,
            ..
        }
    ));
    assert_eq!(
        err.to_string(),
        format!("{ORIGIN}: no [tracker] table in this file")
    );

    let both = parse(&format!(
        "[tracker]\n{DISK}[shipper]\nhost = \"h\"\nreceiver = \"r:1\"\n"
    ))
    .unwrap();
    assert_eq!(
        both.daemons(),
        vec![DaemonKind::Tracker, DaemonKind::Shipper]
    );
}

#[test]
fn load_reads_files_and_names_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tidemark.toml");
    std::fs::write(&path, format!("[tracker]\n{DISK}")).unwrap();
    let config = load(&path).unwrap();
    assert_eq!(config.origin, path);
    assert_eq!(config.daemons(), vec![DaemonKind::Tracker]);

    std::fs::write(&path, format!("[tracker]\nsegment-size = \"1KiB\"\n{DISK}")).unwrap();
    let err = load(&path).unwrap_err();
    assert_eq!(err.location().unwrap().file, path);
    assert!(
        err.to_string()
            .starts_with(&format!("{}:2:16: ", path.display())),
        "{err}"
    );

    let missing = dir.path().join("missing.toml");
    let err = load(&missing).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(
        err.to_string(),
        format!("cannot read configuration file {}", missing.display())
    );
}

// -------------------------------------------------------------- defaults --

#[test]
fn tracker_defaults() {
    let tracker = parse(&format!("[tracker]\n{DISK}"))
        .unwrap()
        .tracker
        .unwrap();
    assert_eq!(tracker.consistency_group, "default");
    assert_eq!(tracker.log_dir, PathBuf::from("/var/lib/tidemark/log"));
    assert_eq!(tracker.log_size_limit, ByteSize::gib(8));
    assert_eq!(tracker.segment_size, ByteSize::mib(64));
    assert_eq!(tracker.socket, PathBuf::from("/run/tidemark/nbd.sock"));
    assert_eq!(tracker.tcp_listen, None);
    assert!(!tracker.allow_remote_nbd);
    assert_eq!(
        tracker.control_socket,
        PathBuf::from("/run/tidemark/tracker.ctl")
    );
    assert_eq!(
        tracker.metrics_listen,
        "127.0.0.1:9721".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(tracker.activity_extent_size, ByteSize::mib(4));
    assert!(!tracker.mlockall);
    assert_eq!(tracker.max_block_size, ByteSize::mib(32));
    assert_eq!(tracker.disks.len(), 1);
    assert_eq!(tracker.disks[0].export_name, None);
    assert_eq!(tracker.disks[0].effective_export_name(), "a");
    assert_eq!(
        TrackerConfig {
            disks: tracker.disks.clone(),
            ..TrackerConfig::default()
        },
        tracker
    );
}

#[test]
fn shipper_defaults() {
    let shipper = parse("[shipper]\nhost = \"h\"\nreceiver = \"dr:7480\"\n")
        .unwrap()
        .shipper
        .unwrap();
    assert_eq!(shipper.consistency_group, "default");
    assert_eq!(shipper.log_dir, PathBuf::from("/var/lib/tidemark/log"));
    assert_eq!(shipper.receivers()[0].to_string(), "dr:7480");
    assert_eq!(shipper.server_name, "tidemark-receiver");
    assert_eq!(shipper.tls.ca, PathBuf::from("/etc/tidemark/pki/ca.crt"));
    assert_eq!(
        shipper.tls.cert,
        PathBuf::from("/etc/tidemark/pki/host.crt")
    );
    assert_eq!(shipper.tls.key, PathBuf::from("/etc/tidemark/pki/host.key"));
    assert_eq!(shipper.tls.renew_before, Duration::from_secs(30 * 86_400));
    assert_eq!(shipper.compression_level, 1);
    assert_eq!(shipper.batch_size, ByteSize::mib(4));
    assert_eq!(shipper.bandwidth.limit, None);
    assert!(shipper.bandwidth.schedule.is_empty());
    assert_eq!(shipper.retry.initial_backoff, Duration::from_secs(1));
    assert_eq!(shipper.retry.max_backoff, Duration::from_secs(60));
    assert_eq!(shipper.retry.multiplier, 2.0);
    assert_eq!(shipper.retry.jitter, 0.2);
    assert_eq!(
        shipper.control_socket,
        PathBuf::from("/run/tidemark/shipper.ctl")
    );
    assert_eq!(
        shipper.metrics_listen,
        "127.0.0.1:9722".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(shipper.sync_chunk_size, ByteSize::mib(1));
    assert_eq!(
        ShipperConfig::new(
            tidemark_names::Name::from_static("h"),
            "dr:7480".parse().unwrap()
        ),
        shipper
    );
}

#[test]
fn receiver_defaults() {
    let receiver = parse("[receiver]\n").unwrap().receiver.unwrap();
    assert_eq!(
        receiver.listen,
        "0.0.0.0:7480".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        receiver.data_dir,
        PathBuf::from("/var/lib/tidemark/replicas")
    );
    assert_eq!(receiver.tls.ca, PathBuf::from("/etc/tidemark/pki/ca.crt"));
    assert_eq!(
        receiver.tls.ca_key,
        PathBuf::from("/etc/tidemark/pki/ca.key")
    );
    assert_eq!(
        receiver.tls.cert,
        PathBuf::from("/etc/tidemark/pki/receiver.crt")
    );
    assert_eq!(
        receiver.tls.key,
        PathBuf::from("/etc/tidemark/pki/receiver.key")
    );
    assert_eq!(receiver.retention.window, Duration::from_secs(24 * 3600));
    assert_eq!(receiver.retention.max_points, 100_000);
    assert_eq!(receiver.retention.max_space, None);
    assert_eq!(
        receiver.metrics_listen,
        "127.0.0.1:9723".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(
        receiver.control_socket,
        PathBuf::from("/run/tidemark/receiver.ctl")
    );
    assert!(receiver.hosts.is_empty());
    assert_eq!(ReceiverConfig::default(), receiver);

    let host = parse("[[receiver.host]]\nname = \"h\"\n")
        .unwrap()
        .receiver
        .unwrap();
    assert!(!host.hosts[0].revoked);
}

#[test]
fn the_defaults_together_are_valid() {
    // Daemons sharing a host with every default must not collide.
    let text =
        format!("[tracker]\n{DISK}[shipper]\nhost = \"h\"\nreceiver = \"r:1\"\n[receiver]\n");
    assert_eq!(parse(&text).unwrap().daemons().len(), 3);
}

// ------------------------------------------------------------ round trip --

#[test]
fn serialized_configs_parse_back_equal() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for name in [
        "tracker.toml",
        "shipper.toml",
        "receiver.toml",
        "all-in-one.toml",
    ] {
        let path = dir.join(name);
        let config = load(&path).unwrap();
        let text = toml::to_string(&config).unwrap();
        let again = parse_str(&text, &path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(again, config, "{name}:\n{text}");
    }
}

// ---------------------------------------------------------- between tables --

fn tracker_and_shipper(tracker_extra: &str, shipper_extra: &str) -> String {
    format!(
        "[tracker]\n{tracker_extra}\n{DISK}\n[shipper]\nhost = \"h\"\nreceiver = \"r:1\"\n{shipper_extra}\n"
    )
}

#[test]
fn tracker_and_shipper_must_agree_on_the_log() {
    let err = parse_err(&tracker_and_shipper("", "consistency-group = \"other\""));
    assert_points_at(
        &err,
        10,
        21,
        "shipper.consistency-group",
        "differs from the tracker's",
    );

    let err = parse_err(&tracker_and_shipper("log-dir = \"/a\"", ""));
    // Left at its default in [shipper]: the [shipper] header stands in.
    assert_points_at(
        &err,
        7,
        1,
        "shipper.log-dir",
        "differs from the tracker's /a",
    );
}

#[test]
fn daemons_in_one_file_must_not_share_sockets_or_metrics_ports() {
    let err = parse_err(&tracker_and_shipper(
        "",
        "control-socket = \"/run/tidemark/tracker.ctl\"",
    ));
    assert_points_at(
        &err,
        10,
        18,
        "shipper.control-socket",
        "already used by tracker.control-socket",
    );

    let err = parse_err(&tracker_and_shipper(
        "metrics-listen = \"0.0.0.0:9722\"",
        "",
    ));
    assert_points_at(
        &err,
        7,
        1,
        "shipper.metrics-listen",
        "collides with tracker.metrics-listen",
    );

    let text = format!(
        "{}[receiver]\nmetrics-listen = \"127.0.0.1:9721\"\n",
        tracker_and_shipper("", "")
    );
    let err = parse_err(&text);
    assert_points_at(
        &err,
        12,
        18,
        "receiver.metrics-listen",
        "collides with tracker.metrics-listen",
    );
}

#[test]
fn invalid_config_built_in_code_has_no_location() {
    let mut tracker = TrackerConfig::default();
    let err = tracker.validate().unwrap_err();
    assert!(err.location().is_none());
    assert_eq!(
        err.to_string(),
        "tracker.disk: no disks; add at least one [[tracker.disk]] table with `name` and `path`"
    );
    tracker.disks.push(tidemark_config::DiskConfig {
        name: tidemark_names::Name::from_static("a"),
        path: "/dev/a".into(),
        export_name: None,
        cache: None,
    });
    tracker.validate().unwrap();
}

#[test]
fn renew_before_is_a_duration_and_zero_turns_renewal_off() {
    let shipper = |tls: &str| {
        parse(&format!(
            "[shipper]\nhost = \"h\"\nreceiver = \"dr:7480\"\n[shipper.tls]\n{tls}\n"
        ))
        .unwrap()
        .shipper
        .unwrap()
    };
    assert_eq!(
        shipper("renew-before = \"45d\"").tls.renew_before,
        Duration::from_secs(45 * 86_400)
    );
    assert_eq!(
        shipper("renew-before = \"0s\"").tls.renew_before,
        Duration::from_secs(0)
    );
}
