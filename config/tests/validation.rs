//! Every validation rule, broken once: the error names the setting, points
//! at it (or at its table when the setting was left at its default) and
//! states the rule.

use std::path::Path;

use tidemark_config::{parse_str, ConfigError};

/// Parses `text`, which must fail validation on `field`, at `line`, with a
/// message containing `says`.
#[track_caller]
fn rejects(text: &str, line: usize, field: &str, says: &str) {
    let err = match parse_str(text, Path::new("t.toml")) {
        Ok(config) => panic!("accepted:\n{text}\n{config:#?}"),
        Err(err) => err,
    };
    let message = err.to_string();
    assert!(matches!(err, ConfigError::Invalid { .. }), "{message}");
    assert_eq!(err.field().unwrap().to_string(), field, "{message}");
    assert_eq!(err.location().unwrap().line, line, "{message}");
    assert!(message.starts_with(&format!("t.toml:{line}:")), "{message}");
    assert!(
        message.contains(says),
        "{message:?} should contain {says:?}"
    );
}

/// Like [`rejects`], for a name: names are refused as they are read (the
/// one rule of `tidemark_names`), so the error is a schema error, with the
/// same file, line and setting.
#[track_caller]
fn rejects_name(text: &str, line: usize, field: &str, says: &str) {
    let err = match parse_str(text, Path::new("t.toml")) {
        Ok(config) => panic!("accepted:\n{text}\n{config:#?}"),
        Err(err) => err,
    };
    let message = err.to_string();
    assert!(matches!(err, ConfigError::Schema { .. }), "{message}");
    assert_eq!(err.field().unwrap().to_string(), field, "{message}");
    assert!(message.starts_with(&format!("t.toml:{line}:")), "{message}");
    assert!(message.contains("is not a valid name"), "{message}");
    assert!(
        message.contains(says),
        "{message:?} should contain {says:?}"
    );
}

#[track_caller]
fn accepts(text: &str) {
    if let Err(err) = parse_str(text, Path::new("t.toml")) {
        panic!("rejected:\n{text}\n{err}");
    }
}

// ----------------------------------------------------------------- tracker

/// A `[tracker]` table with `settings` (line 2 on) and then `disks`.
fn tracker(settings: &str, disks: &str) -> String {
    format!("[tracker]\n{settings}\n{disks}")
}

const ONE_DISK: &str = "[[tracker.disk]]\nname = \"a\"\npath = \"/dev/a\"\n";

fn disks(entries: &[&str]) -> String {
    entries
        .iter()
        .map(|body| format!("[[tracker.disk]]\n{body}\n"))
        .collect()
}

#[test]
fn tracker_consistency_group_is_a_name() {
    rejects_name(
        &tracker("consistency-group = \"\"", ONE_DISK),
        2,
        "tracker.consistency-group",
        "it is empty",
    );
    rejects_name(
        &tracker("consistency-group = \"db group\"", ONE_DISK),
        2,
        "tracker.consistency-group",
        "contains ' '",
    );
}

#[test]
fn tracker_needs_a_disk() {
    rejects(
        "[tracker]\nmlockall = true\n",
        1,
        "tracker.disk",
        "no disks",
    );
}

#[test]
fn disk_names_are_non_empty_and_well_formed() {
    let at = |line, body: &str, says| {
        rejects_name(
            &tracker("", &disks(&[body])),
            line,
            "tracker.disk[0].name",
            says,
        )
    };
    at(4, "name = \"\"\npath = \"/a\"", "it is empty");
    at(4, "name = \"a/b\"\npath = \"/a\"", "contains '/'");
    at(4, "name = \"../../escaped\"\npath = \"/a\"", "contains '/'");
    at(4, "name = \"a b\"\npath = \"/a\"", "contains ' '");
    at(4, "name = \"..\"\npath = \"/a\"", "starts with '.'");
    at(4, "name = \".\"\npath = \"/a\"", "starts with '.'");
    at(4, "name = \"-x\"\npath = \"/a\"", "starts with '-'");
    at(
        4,
        "name = \"Data-1\"\npath = \"/a\"",
        "upper-case letters (write \"data-1\")",
    );
    at(
        4,
        &format!("name = \"{}\"\npath = \"/a\"", "n".repeat(65)),
        "65 bytes long, more than 64",
    );
    accepts(&tracker(
        "",
        &disks(&["name = \"data-1_x.y\"\npath = \"/a\""]),
    ));
}

#[test]
fn disk_names_are_unique() {
    let text = tracker(
        "",
        &disks(&["name = \"a\"\npath = \"/a\"", "name = \"a\"\npath = \"/b\""]),
    );
    rejects(
        &text,
        7,
        "tracker.disk[1].name",
        "disk name \"a\" is already used by tracker.disk[0]",
    );
}

#[test]
fn disk_paths_are_given_and_unique() {
    rejects(
        &tracker("", &disks(&["name = \"a\"\npath = \"\""])),
        5,
        "tracker.disk[0].path",
        "path must not be empty",
    );
    let text = tracker(
        "",
        &disks(&["name = \"a\"\npath = \"/a\"", "name = \"b\"\npath = \"/a\""]),
    );
    rejects(
        &text,
        8,
        "tracker.disk[1].path",
        "/a is already used by tracker.disk[0]",
    );
}

#[test]
fn export_names_are_valid_and_unique() {
    rejects(
        &tracker(
            "",
            &disks(&["name = \"a\"\npath = \"/a\"\nexport-name = \"\""]),
        ),
        6,
        "tracker.disk[0].export-name",
        "export-name must be 1 to 4096 bytes",
    );
    // disk[1]'s explicit export name equals disk[0]'s default one.
    let text = tracker(
        "",
        &disks(&[
            "name = \"a\"\npath = \"/a\"",
            "name = \"b\"\npath = \"/b\"\nexport-name = \"a\"",
        ]),
    );
    rejects(
        &text,
        9,
        "tracker.disk[1].export-name",
        "NBD export name \"a\" is already used",
    );
}

#[test]
fn log_dir_is_given() {
    rejects(
        &tracker("log-dir = \"\"", ONE_DISK),
        2,
        "tracker.log-dir",
        "must not be empty",
    );
}

#[test]
fn segment_size_has_a_floor() {
    rejects(
        &tracker(
            "segment-size = \"512KiB\"\nmax-block-size = \"64KiB\"",
            ONE_DISK,
        ),
        2,
        "tracker.segment-size",
        "segment-size 512KiB is below the minimum of 1MiB",
    );
}

#[test]
fn segment_size_is_aligned() {
    rejects(
        &tracker(
            "segment-size = \"1050000\"\nmax-block-size = \"64KiB\"",
            ONE_DISK,
        ),
        2,
        "tracker.segment-size",
        "not a multiple of 4KiB",
    );
}

#[test]
fn segment_size_fits_in_the_log() {
    rejects(
        &tracker(
            "log-size-limit = \"64MiB\"\nsegment-size = \"128MiB\"",
            ONE_DISK,
        ),
        3,
        "tracker.segment-size",
        "segment-size 128MiB is more than half of log-size-limit 64MiB: the log needs room for two segments",
    );
    // segment-size left at its default: the [tracker] header stands in.
    rejects(
        &tracker("log-size-limit = \"32MiB\"", ONE_DISK),
        1,
        "tracker.segment-size",
        "segment-size 64MiB is more than half of log-size-limit 32MiB: the log needs room for two segments",
    );
    rejects(
        &tracker("log-size-limit = \"64MiB\"", ONE_DISK),
        1,
        "tracker.segment-size",
        "segment-size 64MiB is more than half of log-size-limit 64MiB: the log needs room for two segments",
    );
    accepts(&tracker("log-size-limit = \"128MiB\"", ONE_DISK));
}

#[test]
fn segment_size_holds_the_largest_write() {
    rejects(
        &tracker("segment-size = \"32MiB\"", ONE_DISK),
        2,
        "tracker.segment-size",
        "must be larger than max-block-size 32MiB",
    );
    accepts(&tracker(
        "segment-size = \"32MiB\"\nmax-block-size = \"16MiB\"",
        ONE_DISK,
    ));
}

#[test]
fn max_block_size_is_a_power_of_two_from_4kib_to_32mib() {
    let field = "tracker.max-block-size";
    rejects(
        &tracker("max-block-size = \"3MiB\"", ONE_DISK),
        2,
        field,
        "not a power of two",
    );
    rejects(
        &tracker("max-block-size = \"2KiB\"", ONE_DISK),
        2,
        field,
        "outside the allowed range 4KiB to 32MiB",
    );
    rejects(
        &tracker("max-block-size = \"64MiB\"", ONE_DISK),
        2,
        field,
        "outside the allowed range",
    );
    accepts(&tracker("max-block-size = \"4KiB\"", ONE_DISK));
}

#[test]
fn activity_extent_size_is_a_power_of_two_in_range() {
    let field = "tracker.activity-extent-size";
    rejects(
        &tracker("activity-extent-size = \"3MiB\"", ONE_DISK),
        2,
        field,
        "not a power of two",
    );
    rejects(
        &tracker("activity-extent-size = \"1KiB\"", ONE_DISK),
        2,
        field,
        "outside the allowed range",
    );
    // The tracker's floor: 4KiB passed here once and was then refused by
    // `tracker serve`.
    rejects(
        &tracker("activity-extent-size = \"4KiB\"", ONE_DISK),
        2,
        field,
        "outside the allowed range 64KiB to 1GiB",
    );
    accepts(&tracker("activity-extent-size = \"64KiB\"", ONE_DISK));
    rejects(
        &tracker("activity-extent-size = \"2GiB\"", ONE_DISK),
        2,
        field,
        "outside the allowed range",
    );
}

#[test]
fn the_socket_group_is_one_group_name() {
    rejects(
        &tracker("socket-group = \"kvm,libvirt\"", ONE_DISK),
        2,
        "tracker.socket-group",
        "not a group name",
    );
    accepts(&tracker("socket-group = \"libvirt-qemu\"", ONE_DISK));
}

#[test]
fn sockets_are_usable_paths() {
    let long = format!("/run/{}.sock", "s".repeat(100));
    rejects(
        &tracker(&format!("socket = \"{long}\""), ONE_DISK),
        2,
        "tracker.socket",
        "at most 107",
    );
    rejects(
        &tracker("socket = \"\"", ONE_DISK),
        2,
        "tracker.socket",
        "must not be empty",
    );
    rejects(
        &tracker("control-socket = \"\"", ONE_DISK),
        2,
        "tracker.control-socket",
        "must not be empty",
    );
    rejects(
        &tracker("control-socket = \"/run/tidemark/nbd.sock\"", ONE_DISK),
        2,
        "tracker.control-socket",
        "must be different paths",
    );
}

#[test]
fn tcp_nbd_stays_on_loopback_unless_allowed() {
    rejects(
        &tracker("tcp-listen = \"0.0.0.0:10809\"", ONE_DISK),
        2,
        "tracker.tcp-listen",
        "needs `allow-remote-nbd = true`",
    );
    rejects(
        &tracker("tcp-listen = \"[2001:db8::1]:10809\"", ONE_DISK),
        2,
        "tracker.tcp-listen",
        "not a loopback address",
    );
    accepts(&tracker("tcp-listen = \"127.0.0.1:10809\"", ONE_DISK));
    accepts(&tracker("tcp-listen = \"[::1]:10809\"", ONE_DISK));
    accepts(&tracker(
        "tcp-listen = \"0.0.0.0:10809\"\nallow-remote-nbd = true",
        ONE_DISK,
    ));
}

#[test]
fn tracker_attach_names_a_disk_and_whole_second_timeouts() {
    let disk = "[[tracker.disk]]\nname = \"a\"\npath = \"/dev/a\"\n";
    rejects(
        &format!("[tracker]\n[tracker.attach]\nexport = \"b\"\n{disk}"),
        3,
        "tracker.attach.export",
        "not the export name of any [[tracker.disk]]",
    );
    rejects(
        &format!("[tracker]\n[tracker.attach]\nio-timeout = \"500ms\"\n{disk}"),
        3,
        "tracker.attach.io-timeout",
        "at least 1s",
    );
    rejects(
        &format!("[tracker]\n[tracker.attach]\ndead-connection-timeout = \"0s\"\n{disk}"),
        3,
        "tracker.attach.dead-connection-timeout",
        "at least 1s",
    );
    accepts(&format!(
        "[tracker]\n[tracker.attach]\nexport = \"a\"\nindex = 3\nkeep-device = true\n{disk}"
    ));
    accepts(&format!("[tracker]\n[tracker.attach]\n{disk}"));
}

#[test]
fn tracker_ublk_names_a_disk_a_sane_depth_and_not_the_attached_one() {
    let disks = "[[tracker.disk]]\nname = \"a\"\npath = \"/dev/a\"\n\
                 [[tracker.disk]]\nname = \"b\"\npath = \"/dev/b\"\n";
    rejects(
        &format!("[tracker]\n[tracker.ublk]\nexport = \"c\"\n{disks}"),
        3,
        "tracker.ublk.export",
        "not the export name of any [[tracker.disk]]",
    );
    rejects(
        &format!("[tracker]\n[tracker.ublk]\nqueue-depth = 0\n{disks}"),
        3,
        "tracker.ublk.queue-depth",
        "from 1 to 4096",
    );
    rejects(
        &format!("[tracker]\n[tracker.ublk]\nqueue-depth = 4097\n{disks}"),
        3,
        "tracker.ublk.queue-depth",
        "from 1 to 4096",
    );
    rejects(
        &format!("[tracker]\n[tracker.ublk]\nqueues = 0\n{disks}"),
        3,
        "tracker.ublk.queues",
        "from 1 to 4096",
    );
    // Both default to the first disk: one kernel device per disk.
    rejects(
        &format!("[tracker]\n[tracker.attach]\n[tracker.ublk]\n{disks}"),
        3,
        "tracker.ublk.export",
        "one kernel device per disk",
    );
    accepts(&format!(
        "[tracker]\n[tracker.attach]\n[tracker.ublk]\nexport = \"b\"\n{disks}"
    ));
    accepts(&format!(
        "[tracker]\n[tracker.ublk]\nexport = \"a\"\nid = 2\nqueue-depth = 128\nqueues = 4\nuser-copy = false\nkeep-device = true\n{disks}"
    ));
    accepts(&format!("[tracker]\n[tracker.ublk]\n{disks}"));
}

// ----------------------------------------------------------------- shipper

/// A `[shipper]` table with its required keys (lines 2-3) and `rest` from
/// line 4 on.
fn shipper(rest: &str) -> String {
    format!("[shipper]\nhost = \"db1\"\nreceiver = \"dr.example.com:7480\"\n{rest}\n")
}

#[test]
fn shipper_identities_are_names() {
    let text = "[shipper]\nhost = \"db 1\"\nreceiver = \"dr:7480\"\n";
    rejects_name(
        text,
        2,
        "shipper.host",
        "\"db 1\" is not a valid name: it contains ' '",
    );
    rejects_name(
        &shipper("consistency-group = \"\""),
        4,
        "shipper.consistency-group",
        "it is empty",
    );
    rejects_name(
        &shipper("server-name = \"Bad.Name\""),
        4,
        "shipper.server-name",
        "upper-case",
    );
    rejects(
        &shipper("log-dir = \"\""),
        4,
        "shipper.log-dir",
        "must not be empty",
    );
}

#[test]
fn compression_level_is_a_zstd_level() {
    let field = "shipper.compression-level";
    rejects(
        &shipper("compression-level = 23"),
        4,
        field,
        "compression-level 23 is outside -7 to 22",
    );
    rejects(
        &shipper("compression-level = -8"),
        4,
        field,
        "outside -7 to 22",
    );
    accepts(&shipper("compression-level = -7"));
    accepts(&shipper("compression-level = 22"));
}

#[test]
fn batch_size_is_in_range() {
    rejects(
        &shipper("batch-size = \"1KiB\""),
        4,
        "shipper.batch-size",
        "outside the allowed range 4KiB to 256MiB",
    );
    rejects(
        &shipper("batch-size = \"1GiB\""),
        4,
        "shipper.batch-size",
        "outside the allowed range",
    );
}

#[test]
fn sync_chunk_size_is_a_power_of_two_in_range() {
    let field = "shipper.sync-chunk-size";
    rejects(
        &shipper("sync-chunk-size = \"3MiB\""),
        4,
        field,
        "not a power of two",
    );
    rejects(
        &shipper("sync-chunk-size = \"128MiB\""),
        4,
        field,
        "outside the allowed range",
    );
}

#[test]
fn shipper_paths_are_given() {
    rejects(
        &shipper("control-socket = \"\""),
        4,
        "shipper.control-socket",
        "must not be empty",
    );
    rejects(
        &shipper("[shipper.tls]\nca = \"\""),
        5,
        "shipper.tls.ca",
        "must not be empty",
    );
    rejects(
        &shipper("[shipper.tls]\ncert = \"\""),
        5,
        "shipper.tls.cert",
        "must not be empty",
    );
    rejects(
        &shipper("[shipper.tls]\nkey = \"\""),
        5,
        "shipper.tls.key",
        "must not be empty",
    );
}

#[test]
fn bandwidth_limits_are_positive() {
    rejects(
        &shipper("[shipper.bandwidth]\nlimit = 0"),
        5,
        "shipper.bandwidth.limit",
        "must be greater than zero; leave it out for no limit",
    );
    rejects(
        &shipper("[[shipper.bandwidth.schedule]]\nwindow = \"08:00-18:00\"\nlimit = \"0MiB\""),
        6,
        "shipper.bandwidth.schedule[0].limit",
        "must be greater than zero",
    );
}

#[test]
fn schedule_windows_do_not_overlap() {
    let text = shipper(
        "[[shipper.bandwidth.schedule]]\nwindow = \"22:00-06:00\"\nlimit = \"1MiB\"\n\
         [[shipper.bandwidth.schedule]]\nwindow = \"08:00-18:00\"\nlimit = \"1MiB\"\n\
         [[shipper.bandwidth.schedule]]\nwindow = \"05:00-07:00\"\nlimit = \"1MiB\"",
    );
    rejects(
        &text,
        11,
        "shipper.bandwidth.schedule[2].window",
        "window 05:00-07:00 overlaps window 22:00-06:00 of shipper.bandwidth.schedule[0]",
    );
}

#[test]
fn retry_backoff_is_sane() {
    let retry = |body: &str| shipper(&format!("[shipper.retry]\n{body}"));
    rejects(
        &retry("initial-backoff = \"0s\""),
        5,
        "shipper.retry.initial-backoff",
        "more than zero",
    );
    rejects(
        &retry("initial-backoff = \"2m\"\nmax-backoff = \"1m\""),
        6,
        "shipper.retry.max-backoff",
        "max-backoff 1m is shorter than initial-backoff 2m",
    );
    // max-backoff left at its default 60s: [shipper.retry] stands in.
    rejects(
        &retry("initial-backoff = \"2m\""),
        4,
        "shipper.retry.max-backoff",
        "shorter",
    );
    rejects(
        &retry("multiplier = 0.5"),
        5,
        "shipper.retry.multiplier",
        "at least 1.0",
    );
    rejects(
        &retry("multiplier = nan"),
        5,
        "shipper.retry.multiplier",
        "at least 1.0",
    );
    rejects(
        &retry("multiplier = inf"),
        5,
        "shipper.retry.multiplier",
        "at least 1.0",
    );
    rejects(
        &retry("jitter = 1.5"),
        5,
        "shipper.retry.jitter",
        "from 0.0 to 1.0",
    );
    rejects(
        &retry("jitter = -0.1"),
        5,
        "shipper.retry.jitter",
        "from 0.0 to 1.0",
    );
    rejects(
        &retry("jitter = nan"),
        5,
        "shipper.retry.jitter",
        "from 0.0 to 1.0",
    );
    accepts(&retry(
        "multiplier = 1\njitter = 0\ninitial-backoff = \"1m\"\nmax-backoff = \"1m\"",
    ));
    accepts(&retry("jitter = 1.0"));
}

// ---------------------------------------------------------------- receiver

#[test]
fn receiver_paths_are_given() {
    rejects(
        "[receiver]\ndata-dir = \"\"\n",
        2,
        "receiver.data-dir",
        "must not be empty",
    );
    rejects(
        "[receiver]\ncontrol-socket = \"\"\n",
        2,
        "receiver.control-socket",
        "must not be empty",
    );
    for key in ["ca", "ca-key", "cert", "key"] {
        let text = format!("[receiver.tls]\n{key} = \"\"\n");
        rejects(
            &text,
            2,
            &format!("receiver.tls.{key}"),
            "must not be empty",
        );
    }
}

#[test]
fn retention_limits_are_positive() {
    rejects(
        "[receiver.retention]\nwindow = \"0s\"\n",
        2,
        "receiver.retention.window",
        "more than zero",
    );
    rejects(
        "[receiver.retention]\nmax-points = 0\n",
        2,
        "receiver.retention.max-points",
        "at least 1",
    );
    rejects(
        "[receiver.retention]\nmax-space = \"0\"\n",
        2,
        "receiver.retention.max-space",
        "greater than zero",
    );
    accepts("[receiver.retention]\nmax-space = \"1TiB\"\nwindow = \"15d\"\n");
}

/// The store is local unless `kind = "ceph"`; the Ceph store needs a
/// pool, and its settings are refused with the local store (a forgotten
/// `kind` would otherwise keep replicas where the admin did not mean).
#[test]
fn the_store_is_local_or_ceph_with_a_pool() {
    let config = parse_str("[receiver]\n", Path::new("t.toml")).unwrap();
    let receiver = config.require_receiver().unwrap();
    assert_eq!(receiver.store.kind, tidemark_config::StoreKind::Local);
    assert_eq!(receiver.store.ceph(), None);

    let config = parse_str(
        "[receiver.store]\nkind = \"ceph\"\npool = \"replicas\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let ceph = config.require_receiver().unwrap().store.ceph().unwrap();
    assert_eq!(ceph.conf, Path::new("/etc/ceph/ceph.conf"));
    assert_eq!(ceph.user, "client.tidemark");
    assert_eq!(ceph.pool, "replicas");
    assert_eq!(ceph.namespace, "");
    assert_eq!(ceph.op_timeout, std::time::Duration::from_secs(30));
    accepts(
        "[receiver.store]\nkind = \"ceph\"\nconf = \"/etc/ceph/dr.conf\"\nuser = \"client.dr\"\n\
         pool = \"rbd\"\nnamespace = \"site-b\"\nop-timeout = \"10s\"\n",
    );

    rejects(
        "[receiver.store]\nkind = \"ceph\"\n",
        1,
        "receiver.store",
        "needs a pool",
    );
    rejects(
        "[receiver.store]\npool = \"rbd\"\n",
        2,
        "receiver.store.pool",
        "set kind = \"ceph\"",
    );
    rejects(
        "[receiver.store]\nkind = \"ceph\"\npool = \"rbd\"\nuser = \"admin\"\n",
        4,
        "receiver.store.user",
        "\"client.NAME\"",
    );
    rejects(
        "[receiver.store]\nkind = \"ceph\"\npool = \"a b\"\n",
        3,
        "receiver.store.pool",
        "not a pool name",
    );
    rejects(
        "[receiver.store]\nkind = \"ceph\"\npool = \"rbd\"\nnamespace = \"a/b\"\n",
        4,
        "receiver.store.namespace",
        "not a namespace",
    );
    rejects(
        "[receiver.store]\nkind = \"ceph\"\npool = \"rbd\"\nop-timeout = \"0s\"\n",
        4,
        "receiver.store.op-timeout",
        "more than zero",
    );
    let err = parse_str("[receiver.store]\nkind = \"nfs\"\n", Path::new("t.toml")).unwrap_err();
    assert!(err.to_string().contains("receiver.store.kind"), "{err}");
}

/// Several receivers on one cluster: the lease (15 s, at least 3 s), the
/// blocklist's expiry (24 h, longer than the lease) and the address
/// shippers are redirected to (default: none, the listen address).
#[test]
fn the_ceph_store_has_a_lease_a_blocklist_expiry_and_an_advertised_address() {
    let config = parse_str(
        "[receiver.store]\nkind = \"ceph\"\npool = \"replicas\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let ceph = config.require_receiver().unwrap().store.ceph().unwrap();
    assert_eq!(ceph.lease, std::time::Duration::from_secs(15));
    assert_eq!(
        ceph.blocklist_expire,
        std::time::Duration::from_secs(24 * 3600)
    );
    assert_eq!(ceph.advertise, None);
    assert_eq!(ceph.release_idle, std::time::Duration::from_secs(60));
    let config = parse_str(
        "[receiver.store]\nkind = \"ceph\"\npool = \"rbd\"\nadvertise = \"r1.example.com:7480\"\n\
         lease = \"3s\"\nblocklist-expire = \"1h\"\nrelease-idle = \"10s\"\n",
        Path::new("t.toml"),
    )
    .unwrap();
    let ceph = config.require_receiver().unwrap().store.ceph().unwrap();
    assert_eq!(ceph.advertise.as_deref(), Some("r1.example.com:7480"));
    assert_eq!(ceph.lease, std::time::Duration::from_secs(3));
    assert_eq!(ceph.blocklist_expire, std::time::Duration::from_secs(3600));
    assert_eq!(ceph.release_idle, std::time::Duration::from_secs(10));
    rejects(
        "[receiver.store]\nkind = \"ceph\"\npool = \"rbd\"\nrelease-idle = \"0s\"\n",
        4,
        "receiver.store.release-idle",
        "more than zero",
    );

    rejects(
        "[receiver.store]\nkind = \"ceph\"\npool = \"rbd\"\nlease = \"1s\"\n",
        4,
        "receiver.store.lease",
        "too short",
    );
    rejects(
        "[receiver.store]\nkind = \"ceph\"\npool = \"rbd\"\nlease = \"1m\"\nblocklist-expire = \"30s\"\n",
        5,
        "receiver.store.blocklist-expire",
        "longer than the lease",
    );
    rejects(
        "[receiver.store]\nkind = \"ceph\"\npool = \"rbd\"\nadvertise = \"r1\"\n",
        4,
        "receiver.store.advertise",
        "HOST:PORT",
    );
    rejects(
        "[receiver.store]\nlease = \"15s\"\n",
        2,
        "receiver.store.lease",
        "set kind = \"ceph\"",
    );
}

#[test]
fn enrolled_host_names_are_valid_and_unique() {
    rejects_name(
        "[[receiver.host]]\nname = \"\"\n",
        2,
        "receiver.host[0].name",
        "it is empty",
    );
    rejects_name(
        "[[receiver.host]]\nname = \"a:b\"\n",
        2,
        "receiver.host[0].name",
        "contains ':'",
    );
    rejects(
        "[[receiver.host]]\nname = \"a\"\n[[receiver.host]]\nname = \"a\"\nrevoked = true\n",
        4,
        "receiver.host[1].name",
        "already used by receiver.host[0]",
    );
}

#[test]
fn spans_have_valid_unique_names_two_members_or_more_and_a_sane_schedule() {
    accepts("[[receiver.span]]\nname = \"shop\"\nmembers = [\"web1/default\", \"db1/data\"]\n");
    rejects_name(
        "[[receiver.span]]\nname = \"a b\"\nmembers = [\"web1/default\", \"db1/data\"]\n",
        2,
        "receiver.span[0].name",
        "contains ' '",
    );
    rejects(
        "[[receiver.span]]\nname = \"shop\"\nmembers = [\"web1/default\"]\n",
        3,
        "receiver.span[0].members",
        "at least two members",
    );
    rejects(
        "[[receiver.span]]\nname = \"a\"\nmembers = [\"web1/default\", \"db1/data\"]\n\
         [[receiver.span]]\nname = \"b\"\nmembers = [\"web2/default\", \"db1/data\"]\n",
        6,
        "receiver.span[1].members",
        "db1/data is a member of receiver.span[0] already",
    );
    rejects(
        "[[receiver.span]]\nname = \"a\"\nmembers = [\"w/d\", \"x/d\"]\n\
         [[receiver.span]]\nname = \"a\"\nmembers = [\"y/d\", \"z/d\"]\n",
        5,
        "receiver.span[1].name",
        "already used by receiver.span[0]",
    );
    rejects(
        "[[receiver.span]]\nname = \"a\"\nmembers = [\"w/d\", \"x/d\"]\ninterval = \"0s\"\n",
        4,
        "receiver.span[0].interval",
        "more than zero",
    );
    rejects(
        "[[receiver.span]]\nname = \"a\"\nmembers = [\"w/d\", \"x/d\"]\ninterval = \"1m\"\ntarget = \"30s\"\n",
        5,
        "receiver.span[0].target",
        "shorter than the interval",
    );
    accepts(
        "[[receiver.span]]\nname = \"a\"\nmembers = [\"w/d\", \"x/d\"]\napp-consistent-every = \"1h\"\n",
    );
    rejects(
        "[[receiver.span]]\nname = \"a\"\nmembers = [\"w/d\", \"x/d\"]\ninterval = \"1m\"\napp-consistent-every = \"30s\"\n",
        5,
        "receiver.span[0].app-consistent-every",
        "shorter than the interval",
    );
    let err = parse_str(
        "[[receiver.span]]\nname = \"a\"\nmembers = [\"web1\", \"x/d\"]\n",
        Path::new("t.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("\"web1\" is not \"HOST/GROUP\""), "{err}");
}
