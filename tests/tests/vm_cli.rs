//! `tidemark vm`: a VM's qcow2 disk protected on the hypervisor. The group
//! configuration `vm protect` writes is the one the tracker and shipper
//! run on; qemu's own block layer (qemu-io, qemu-storage-daemon) reads and
//! writes the disk through the tracker's NBD export with its qcow2 driver
//! on top, exactly as the rendered arguments say; the source passes
//! `qemu-img check` and the replica is the qcow2 file byte for byte.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tidemark_e2e::replication::{
    enroll, free_port, run_ok, start_receiver_at, wait_caught_up, Daemon, HOST,
};
use tidemark_e2e::{output_ok, refused, require_tool, tidemark, TrackerProcess};

/// The host's shipper configuration, `dir/shipper.toml`: its identity,
/// the receiver on `port`, its keys in `hpki`.
fn host_shipper_config(dir: &Path, hpki: &Path, port: u16) -> PathBuf {
    let path = dir.join("shipper.toml");
    fs::write(
        &path,
        format!(
            "[shipper]\nhost = \"{HOST}\"\nreceiver = \"127.0.0.1:{port}\"\n\
             [shipper.tls]\nca = \"{h}/ca.crt\"\ncert = \"{h}/host.crt\"\nkey = \"{h}/host.key\"\n",
            h = hpki.display()
        ),
    )
    .unwrap();
    path
}

/// A spec of the VM `web1` with these `[[vm.disk]]` tables.
fn write_spec(dir: &Path, disks: &str) -> PathBuf {
    let path = dir.join("web1.toml");
    fs::write(
        &path,
        format!(
            "[vm]\nname = \"web1\"\ncpus = 1\nmemory = \"512MiB\"\n{disks}\n\
             [[vm.nic]]\nbridge = \"br0\"\nmac = \"52:54:00:00:00:01\"\n"
        ),
    )
    .unwrap();
    path
}

fn qcow2_disk(name: &str, path: &Path, backing: Option<&str>) -> String {
    let mut table = format!(
        "[[vm.disk]]\nname = \"{name}\"\npath = \"{}\"\nformat = \"qcow2\"\n",
        path.display()
    );
    if let Some(b) = backing {
        table.push_str(&format!("backing = \"{b}\"\n"));
    }
    table
}

/// `tidemark vm protect` with every host directory under `dir`.
fn protect(dir: &Path, spec: &Path, shipper: &Path, extra: &[&str]) -> Command {
    let mut cmd = tidemark();
    cmd.args(["vm", "protect"])
        .arg(spec)
        .arg("--shipper-config")
        .arg(shipper)
        .arg("--config-dir")
        .arg(dir.join("groups"))
        .arg("--run-dir")
        .arg(dir.join("run"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--unit-dir")
        .arg(dir.join("units"))
        .args(extra);
    cmd
}

/// Runs a `tidemark` daemon on the group's configuration file.
fn start_daemon(args: &[&str], config: &Path, log: &Path, what: &'static str) -> Daemon {
    let child = tidemark()
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    Daemon::new(child, what)
}

/// `qemu-io` on the tracker's export with qemu's qcow2 driver on the NBD
/// node, as the rendered qemu arguments layer them.
fn qemu_io_qcow2(socket: &Path, export: &str, cmds: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--image-opts");
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(format!(
        "driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={},file.export={export}",
        socket.display()
    ));
    let out = output_ok(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("failed") && !text.contains("Pattern verification failed"),
        "qemu-io: {text}"
    );
    text
}

#[test]
fn a_qcow2_vm_is_protected_served_written_and_replicated_byte_for_byte() {
    let test = "a_qcow2_vm_is_protected_served_written_and_replicated_byte_for_byte";
    for tool in ["qemu-img", "qemu-io", "qemu-storage-daemon"] {
        if !require_tool(tool, test) {
            return;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let image = dir.join("web1-root.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("64M"),
    );
    let (rpki, hpki) = enroll(dir, HOST);
    let port = free_port();
    let shipper_config = host_shipper_config(dir, &hpki, port);
    let spec = write_spec(dir, &qcow2_disk("root", &image, None));

    // A fresh qcow2 file is a few hundred KiB: served over NBD it could
    // not grow, so it is refused until protect may grow it.
    let out = refused(&mut protect(dir, &spec, &shipper_config, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot grow") && err.contains("--grow-images"),
        "{err}"
    );
    assert!(
        !dir.join("groups").exists(),
        "a refused protect wrote files"
    );

    let out = run_ok(&mut protect(
        dir,
        &spec,
        &shipper_config,
        &["--grow-images", "--log-size-limit", "64MiB", "--json"],
    ));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let config = PathBuf::from(report["layout"]["config"].as_str().unwrap());
    let socket = PathBuf::from(report["layout"]["socket"].as_str().unwrap());
    let log_dir = PathBuf::from(report["layout"]["log_dir"].as_str().unwrap());
    assert_eq!(config, dir.join("groups/web1.toml"));
    assert_eq!(socket, dir.join("run/web1.nbd.sock"));
    assert_eq!(
        report["systemctl"].as_array().unwrap().last().unwrap(),
        "systemctl enable --now tidemark-tracker@web1.service tidemark-shipper@web1.service"
    );
    let grown = report["grown"][0]["to"].as_u64().unwrap();
    assert_eq!(fs::metadata(&image).unwrap().len(), grown);
    assert!(grown >= 64 << 20, "{report:#}");
    let drop_in =
        fs::read_to_string(dir.join("units/tidemark-tracker@web1.service.d/images.conf")).unwrap();
    assert!(
        drop_in.contains(&format!("ReadWritePaths={}\n", dir.display())),
        "{drop_in}"
    );
    let checked = run_ok(tidemark().args(["config", "check"]).arg(&config));
    assert!(checked.contains("valid"), "{checked}");
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains("log-size-limit = \"64MiB\""), "{text}");

    // Protecting it again is refused unless asked: the group exists.
    let out = refused(&mut protect(dir, &spec, &shipper_config, &[]));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already configured"),
        "{out:?}"
    );
    let out = run_ok(&mut protect(
        dir,
        &spec,
        &shipper_config,
        &["--replace", "--log-size-limit", "64MiB", "--json"],
    ));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(report.get("grown").is_none(), "grown twice: {report:#}");

    // The qemu arguments: each disk's block nodes on the tracker's socket
    // (opened below by qemu's own block layer, qemu-storage-daemon).
    let args: Vec<String> = serde_json::from_value(report["qemu_args"].clone()).unwrap();
    let blockdevs: Vec<&String> = args
        .iter()
        .zip(&args[1..])
        .filter(|(flag, _)| *flag == "-blockdev")
        .map(|(_, node)| node)
        .collect();
    assert_eq!(blockdevs.len(), 2, "{args:?}");
    assert!(
        blockdevs[0].starts_with("driver=nbd,")
            && blockdevs[0].contains(&format!(
                "server.type=unix,server.path={},export=root",
                socket.display()
            )),
        "{args:?}"
    );
    assert!(blockdevs[1].contains("\"driver\":\"qcow2\""), "{args:?}");
    assert!(args.contains(&"virtio-blk-pci,drive=disk0,id=disk0-dev,serial=root".to_owned()));
    // `vm render` prints the same, as one shell command.
    let rendered = run_ok(
        tidemark()
            .args(["vm", "render"])
            .arg(&spec)
            .arg("--qemu")
            .arg("--run-dir")
            .arg(dir.join("run")),
    );
    assert!(
        rendered.starts_with("qemu-system-x86_64 \\\n"),
        "{rendered}"
    );
    assert!(rendered.contains(blockdevs[0].as_str()), "{rendered}");

    // The tracker and shipper run on the group's file, as their units do
    // (systemd makes their runtime directory).
    fs::create_dir_all(dir.join("run")).unwrap();
    let receiver = start_receiver_at(&dir.join("replicas"), dir, &rpki, port);
    let tracker = {
        let mut cmd = tidemark();
        cmd.args(["tracker", "serve", "--config"]).arg(&config);
        TrackerProcess::spawn(&dir.join("run"), cmd)
    };
    let shipper = start_daemon(
        &["shipper", "run"],
        &config,
        &dir.join("shipper.log"),
        "shipper",
    );

    // qemu's block layer, from the rendered nodes, opens the disk through
    // the tracker.
    let mut daemon = Command::new("qemu-storage-daemon");
    for node in &blockdevs {
        daemon.arg("--blockdev").arg(node);
    }
    let qmp = dir.join("qsd.qmp");
    let mut daemon = daemon
        .arg("--chardev")
        .arg(format!(
            "socket,id=qmp,path={},server=on,wait=off",
            qmp.display()
        ))
        .args(["--monitor", "chardev=qmp"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !qmp.exists() {
        if let Some(status) = daemon.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(daemon.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("qemu-storage-daemon refused the rendered nodes ({status}): {err}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "qemu-storage-daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon.kill().unwrap();
    daemon.wait().unwrap();

    // Writes through the qcow2 layer: new clusters, one past the file's
    // first length, a rewrite, a discard.
    qemu_io_qcow2(
        &socket,
        "root",
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 60M 4M",
            "write -P 0x5a 512k 64k",
            "discard 2M 1M",
            "flush",
        ],
    );
    qemu_io_qcow2(
        &socket,
        "root",
        &[
            "read -P 0xab 0 512k",
            "read -P 0x5a 512k 64k",
            "read -P 0xcd 60M 4M",
        ],
    );

    assert!(tracker.stop(), "the tracker did not stop cleanly");
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    shipper.stop();
    receiver.stop();
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&image),
    );

    let to = dir.join("failover");
    run_ok(
        tidemark()
            .args(["failover", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--group", "web1", "--to"])
            .arg(&to),
    );
    let source = fs::read(&image).unwrap();
    let replica = fs::read(to.join("root.img")).unwrap();
    assert_eq!(source.len(), replica.len());
    if let Some(at) = source.iter().zip(&replica).position(|(a, b)| a != b) {
        panic!("the replica differs from the qcow2 file at byte {at}");
    }
    // And it is the same qcow2 image: qemu reads the guest's data from it.
    run_ok(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(to.join("root.img")),
    );
    let replica_io = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0xcd 60M 4M"])
        .arg(to.join("root.img"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&replica_io.stdout);
    assert!(
        replica_io.status.success() && !text.contains("fail"),
        "{text}"
    );
}

#[test]
fn a_backing_chain_is_refused_unless_every_file_of_it_is_protected() {
    let test = "a_backing_chain_is_refused_unless_every_file_of_it_is_protected";
    if !require_tool("qemu-img", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let base = dir.join("debian-12.qcow2");
    let overlay = dir.join("web1-root.qcow2");
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("64M"),
    );
    run_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&base)
            .arg(&overlay),
    );
    // The host's keys are not read by `vm protect`: no enrolment needed.
    let shipper_config = host_shipper_config(dir, &dir.join("pki"), free_port());

    let spec = write_spec(dir, &qcow2_disk("root", &overlay, None));
    let out = refused(&mut protect(
        dir,
        &spec,
        &shipper_config,
        &["--grow-images"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("has the backing file {}", base.display()))
            && err.contains("not a disk of this VM"),
        "{err}"
    );
    assert!(
        !dir.join("groups").exists(),
        "a refused protect wrote files"
    );
    assert_eq!(
        fs::metadata(&overlay).unwrap().len(),
        fs::metadata(&base).unwrap().len(),
        "a refused protect grew an image"
    );

    let chain = format!(
        "{}{}",
        qcow2_disk("root", &overlay, Some("base")),
        qcow2_disk("base", &base, None)
    );
    let spec = write_spec(dir, &chain);
    let out = run_ok(&mut protect(
        dir,
        &spec,
        &shipper_config,
        &["--grow-images", "--json"],
    ));
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    // The overlay grows; the backing file, only ever read, does not.
    let grown: Vec<&str> = report["grown"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["disk"].as_str().unwrap())
        .collect();
    assert_eq!(grown, ["root"]);
    let config = fs::read_to_string(dir.join("groups/web1.toml")).unwrap();
    assert!(config.contains(&base.display().to_string()), "{config}");
    let xml = report["libvirt_xml"].as_str().unwrap();
    assert!(xml.contains("<source protocol='nbd' name='base'>"), "{xml}");
}

/// The libvirt domain `vm render --libvirt` prints passes libvirt's own
/// schema (`virt-xml-validate`), for NICs on a bridge and on a network.
#[test]
fn the_rendered_libvirt_domain_passes_libvirts_schema() {
    let test = "the_rendered_libvirt_domain_passes_libvirts_schema";
    if !require_tool("virt-xml-validate", test) || !require_tool("xmllint", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vm/tests/golden/web1.toml");
    let spec = fs::read_to_string(golden).unwrap();
    for (name, text) in [
        ("bridges", spec.clone()),
        (
            "network",
            spec.replace("bridge = \"br0\"", "network = \"default\""),
        ),
    ] {
        let path = dir.join(format!("{name}.toml"));
        fs::write(&path, text).unwrap();
        let xml = run_ok(
            tidemark()
                .args(["vm", "render"])
                .arg(&path)
                .arg("--libvirt"),
        );
        assert!(xml.contains("<source protocol='nbd' name='root'>"), "{xml}");
        let file = dir.join(format!("{name}.xml"));
        fs::write(&file, xml).unwrap();
        let out = Command::new("virt-xml-validate")
            .arg(&file)
            .arg("domain")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: virt-xml-validate refused the domain:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
