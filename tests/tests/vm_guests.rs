//! Real guests in front of the tracker: a Debian bookworm with systemd as
//! PID 1 and qemu's guest agent, its root disk and a data disk served by
//! the tracker (`tidemark vm protect`, `tidemark vm render --qemu`), booted
//! under qemu (TCG) and replicated to a receiver. The guest writes numbered
//! records to its data disk, each fsync'ed, and prints each acknowledged
//! one on its serial console (`scripts/vm-scenarios/guest-records.sh`);
//! at every boot it first checks the data disk itself (the journal
//! replayed, then a full read-only e2fsck that must find nothing, then
//! every record) and prints its verdict, which is the line a failover
//! waits for. In sequence, on one guest image built once:
//!
//! 1. application-consistent points through the real qemu-guest-agent
//!    (`tidemark mark --app-consistent`): the mark says the agent froze
//!    the guest, and the guest's fsfreeze hook printed freeze and thaw;
//! 2. a test failover that boots (`test-failover start --boot`) at a
//!    point taken after record K was acknowledged, while the production
//!    guest keeps writing and replicating: the test guest finds its file
//!    system clean and records 1..N intact with N >= K; new points become
//!    durable meanwhile; ending the test leaves no VM, no scratch and the
//!    points listing unchanged but for new points;
//! 3. a failover that boots (`failover --boot`) at a point taken after
//!    record K was acknowledged, up when its guest agent answers (the
//!    spec names an agent, so that is the default): the recovery time
//!    from the command's start to the agent's answer, then the
//!    failed-over guest's own verdict;
//! 4. a copy of the guest started on its image files, not yet protected,
//!    moved onto its tracker while it writes (`vm protect --live --qmp`):
//!    the workload and the guest's kernel see no I/O error, and once the
//!    guest has shut down and replication (the resync the move recorded)
//!    has caught up, the replica of both disks equals the files byte for
//!    byte.
//!
//! The guest's root is cached (`tidemark_e2e::debian::bookworm_root`,
//! shared with `operator_guide_vm.rs`); four boots of Debian under TCG.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_e2e::debian::{bookworm_root, is_root, workspace, SYSTEMD_GUEST_PACKAGES};
use tidemark_e2e::replication::{enroll, free_port, start_receiver, wait_caught_up, Daemon, HOST};
use tidemark_e2e::{output_ok, require_kernel, require_tool, run, tidemark};

const TEST: &str = "a_debian_guest_on_the_tracker_checks_itself_after_failover";
/// The VM, which is also its consistency group.
const VM: &str = "web1";
/// The guest's verdict on its data disk: the line failovers wait for.
const CHECK_LINE: &str = "TIDEMARK-GUEST-CHECK";
/// Most time from starting qemu to the guest's verdict: Debian with
/// systemd under TCG on two shared cores.
const UP_TIMEOUT: Duration = Duration::from_secs(300);
/// Size of the data disk.
const DATA_DISK: u64 = 64 << 20;
/// The README's `vm protect` line.
const PROTECT: &str =
    "tidemark vm protect /etc/tidemark/vms/web1.toml --log-size-limit 16GiB --grow-images";

/// A process killed (SIGKILL, by its pid) when dropped: a qemu that the
/// test started or that a failover left running in the background.
struct Killed(Option<i32>);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether process `pid` is gone (or a zombie).
fn gone(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// The guest's console lines that carry `marker`, from the marker on
/// (the serial console ends lines with \r\n, and kernel messages may share
/// a line).
fn console_lines(console: &Path, marker: &str) -> Vec<String> {
    let text = fs::read(console).unwrap_or_default();
    String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|line| line.find(marker).map(|at| line[at..].trim_end().to_owned()))
        .collect()
}

/// Waits until the console shows a line with `marker` for which `done`
/// holds; returns it. Fails with the console when `timeout` passes.
fn wait_console(
    console: &Path,
    marker: &str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(line) = console_lines(console, marker).into_iter().find(|l| done(l)) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no {marker} line on the guest's console within {timeout:?}:\n{}",
            String::from_utf8_lossy(&fs::read(console).unwrap_or_default())
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The highest record the guest has acknowledged so far.
fn last_ack(console: &Path) -> u64 {
    console_lines(console, "TIDEMARK-GUEST-ACK ")
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Waits until the guest has acknowledged record `n` or a later one.
fn wait_ack(console: &Path, n: u64) -> u64 {
    wait_console(
        console,
        "TIDEMARK-GUEST-ACK ",
        Duration::from_secs(120),
        |_| last_ack(console) >= n,
    );
    last_ack(console)
}

/// The guest's verdict line as its `key=value` fields.
fn verdict(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Asserts the guest's verdict: a clean file system holding records
/// 1..N intact, N >= `acknowledged`. Returns N.
fn assert_verdict(line: &str, acknowledged: u64, what: &str) -> u64 {
    let fields = verdict(line);
    let records: u64 = fields["records"].parse().unwrap();
    eprintln!(
        "{what}: the guest says `{line}` (record {acknowledged} was acknowledged before the point)"
    );
    assert_eq!(fields["verdict"], "PASS", "{what}: {line}");
    assert_eq!(fields["clean"], "yes", "{what}: {line}");
    assert!(
        records >= acknowledged,
        "{what}: the guest holds {records} records, {acknowledged} were acknowledged before the point"
    );
    records
}

/// The replica's recovery points: (sequence number, label).
fn points(dir: &Path) -> Vec<(u64, Option<String>)> {
    let out = output_ok(
        tidemark()
            .args(["points", "--json", "--data-dir"])
            .arg(dir.join("replicas"))
            .args(["--host", HOST, "--group", VM]),
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["seq"].as_u64().unwrap(),
                v["label"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// A crash-consistent marker `label` in the group of `config`.
fn mark(config: &Path, label: &str) -> Command {
    let mut cmd = tidemark();
    cmd.args(["mark", label, "--json", "--config"]).arg(config);
    cmd
}

/// Inserts the marker `label` (`mark`, a `tidemark mark --json`), waits
/// until the receiver lists it as a recovery point, and returns the
/// mark's answer and the point's sequence number.
fn mark_durable(dir: &Path, mut mark: Command, label: &str) -> (Value, u64) {
    let out = output_ok(&mut mark);
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((seq, _)) = points(dir)
            .into_iter()
            .find(|(_, l)| l.as_deref() == Some(label))
        {
            return (answer, seq);
        }
        assert!(
            Instant::now() < deadline,
            "the marker {label} did not become a durable point in 120 s; shipper log:\n{}",
            fs::read_to_string(dir.join("shipper.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The README's section on protecting a virtual machine.
fn readme_vm_section() -> String {
    let readme = fs::read_to_string(workspace().join("README.md")).unwrap();
    let start = readme
        .find("\n## Protecting a virtual machine")
        .expect("the README has a section on protecting a VM");
    let section = &readme[start + 1..];
    section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)].to_owned()
}

/// A command line of the README's section on protecting a VM, to run
/// here as the admin would: the section must have `line` as written, and
/// each of its words that `paths` names is replaced by this test's file.
/// The caller adds what this machine needs (its directories, TCG).
fn readme_command(line: &str, paths: &[(&str, &Path)]) -> Command {
    assert!(
        readme_vm_section().lines().any(|l| l.trim() == line),
        "the README's section on protecting a VM no longer has `{line}`"
    );
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("tidemark"), "{line}");
    let mut cmd = tidemark();
    for word in words {
        match paths.iter().find(|(from, _)| *from == word) {
            Some((_, to)) => cmd.arg(to),
            None => cmd.arg(word),
        };
    }
    cmd
}

/// Starts a test failover (`cmd`, a `tidemark test-failover start
/// --boot`, its stderr to `log`) and waits until it says ready; returns
/// it and the lines it printed until then.
fn start_booting_test(cmd: &mut Command, log: &Path) -> (Daemon, Vec<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let rx = tidemark_e2e::replication::stdout_lines(child.stdout.take().unwrap());
    let test = Daemon::new(child, "test failover");
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(UP_TIMEOUT + Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the test failover did not become ready: {lines:?}\n{}",
                    fs::read_to_string(log).unwrap_or_default()
                )
            });
        let ready = line.starts_with("ready");
        lines.push(line);
        if ready {
            return (test, lines);
        }
    }
}

/// Puts the record workload, its unit, the agent's fsfreeze hook and its
/// configuration into the guest's root.
fn prepare_guest(root: &Path) {
    let scenarios = workspace().join("scripts/vm-scenarios");
    let install = |from: &str, to: &str, mode: u32| {
        let to = root.join(to);
        fs::create_dir_all(to.parent().unwrap()).unwrap();
        fs::copy(scenarios.join(from), &to).unwrap();
        fs::set_permissions(&to, fs::Permissions::from_mode(mode)).unwrap();
    };
    install(
        "guest-records.sh",
        "usr/local/sbin/tidemark-guest-records",
        0o755,
    );
    install(
        "guest-fsfreeze-hook.sh",
        "usr/local/sbin/tidemark-fsfreeze-hook",
        0o755,
    );
    install(
        "guest-records.service",
        "etc/systemd/system/tidemark-guest-records.service",
        0o644,
    );
    fs::write(
        root.join("etc/qemu/qemu-ga.conf"),
        "[general]\nfsfreeze-hook=/usr/local/sbin/tidemark-fsfreeze-hook\n",
    )
    .unwrap();
    let units = root.join("etc/systemd/system");
    let wants = units.join("multi-user.target.wants");
    fs::create_dir_all(&wants).unwrap();
    symlink(
        "/etc/systemd/system/tidemark-guest-records.service",
        wants.join("tidemark-guest-records.service"),
    )
    .unwrap();
    // The workload owns the serial console; what a boot does not need is
    // masked (TCG is slow).
    for unit in [
        "serial-getty@ttyS0.service",
        "getty@tty1.service",
        "systemd-timesyncd.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
    ] {
        let _ = fs::remove_file(units.join(unit));
        symlink("/dev/null", units.join(unit)).unwrap();
    }
    fs::write(root.join("etc/hostname"), format!("{VM}\n")).unwrap();
}

/// The host's shipper configuration: its identity, the receiver on
/// `port`, its keys in `hpki` (what `vm protect` takes the group's from).
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

/// Waits until `path` exists (a daemon's socket); fails with the
/// daemon's `log`.
fn wait_for(path: &Path, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no {what} at {}:\n{}",
            path.display(),
            fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The production VM: qemu started with the arguments `tidemark vm render
/// --qemu` prints (its disks on the tracker's exports, its agent channel),
/// plus how this machine runs it (TCG, the console to a file, no network).
struct ProductionVm {
    child: Child,
    console: PathBuf,
}

impl ProductionVm {
    /// The VM of `spec` on the tracker's exports, as `tidemark vm render
    /// --qemu` starts it.
    fn start(dir: &Path, spec: &Path) -> ProductionVm {
        let rendered = run(readme_command(
            "tidemark vm render /etc/tidemark/vms/web1.toml --qemu",
            &[("/etc/tidemark/vms/web1.toml", spec)],
        )
        .arg("--run-dir")
        .arg(dir.join("run")));
        assert!(rendered.starts_with("qemu-system-x86_64"), "{rendered}");
        Self::launch(dir, "production", rendered.trim_end())
    }

    /// The same guest not yet protected: its disks on their image files
    /// (a `raw` format node over a `file` node each, as qemu or libvirt
    /// open a raw image), with a QMP socket for the live move.
    fn start_on_files(
        dir: &Path,
        name: &str,
        boot: (&str, &Path),
        disks: &[(&str, &Path)],
        agent: &Path,
        qmp: &Path,
    ) -> ProductionVm {
        let mut line = format!(
            "qemu-system-x86_64 -name {name} -machine q35 -smp 2 -m 512M -kernel {} -initrd {} \
             -append 'console=ttyS0 panic=-1 quiet systemd.show_status=error tidemark.root=root'",
            boot.0,
            boot.1.display()
        );
        for (i, (serial, path)) in disks.iter().enumerate() {
            line.push_str(&format!(
                " -blockdev driver=file,node-name=file{i},filename={} \
                 -blockdev driver=raw,node-name=disk{i},file=file{i} \
                 -device virtio-blk-pci,drive=disk{i},serial={serial}",
                path.display()
            ));
        }
        line.push_str(&format!(
            " -chardev socket,id=qga0,path={},server=on,wait=off -device virtio-serial-pci,id=vser0 \
             -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0 \
             -qmp unix:{},server=on,wait=off",
            agent.display(),
            qmp.display()
        ));
        Self::launch(dir, name, &line)
    }

    /// Runs the qemu command `line` with how this machine runs guests
    /// (TCG, the serial console to `dir/WHAT.console`, no network).
    fn launch(dir: &Path, what: &str, line: &str) -> ProductionVm {
        let console = dir.join(format!("{what}.console"));
        let line = format!(
            "exec {line} -accel tcg,thread=multi -cpu max -nodefaults -no-user-config \
             -display none -monitor none -nic none -serial file:{}",
            console.display()
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(line)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join(format!("{what}.qemu.log"))).unwrap())
            .spawn()
            .expect("starting qemu");
        ProductionVm { child, console }
    }

    /// Shuts the guest down cleanly through its agent (`systemctl
    /// poweroff` run by `guest-exec`: the agent's own `guest-shutdown`
    /// schedules it through logind, which a guest without D-Bus lacks)
    /// and waits for qemu to exit.
    fn shut_down(mut self, agent: &Path) -> Duration {
        use std::io::BufRead;
        let started = Instant::now();
        let socket = std::os::unix::net::UnixStream::connect(agent).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        (&socket)
            .write_all(
                b"{\"execute\":\"guest-exec\",\"arguments\":\
                  {\"path\":\"/bin/systemctl\",\"arg\":[\"poweroff\"]}}\n",
            )
            .unwrap();
        let mut reply = String::new();
        std::io::BufReader::new(&socket)
            .read_line(&mut reply)
            .unwrap();
        assert!(reply.contains("\"pid\""), "guest-exec: {reply}");
        let deadline = started + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "qemu: {status}");
                return started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not power off within 120 s:\n{}",
                String::from_utf8_lossy(&fs::read(&self.console).unwrap_or_default())
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for ProductionVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_debian_guest_on_the_tracker_checks_itself_after_failover() {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{TEST}: CI must run the tests as root"
        );
        eprintln!("SKIP {TEST}: needs root (debootstrap, mkfs.ext4 -d of a root file system)");
        return;
    }
    for tool in [
        "debootstrap",
        "chroot",
        "qemu-system-x86_64",
        "busybox",
        "mkfs.ext4",
        "modprobe",
    ] {
        if !require_tool(tool, TEST) {
            return;
        }
    }
    if !require_kernel(TEST) {
        return;
    }
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // The guest: a Debian root with the workload, made an ext4 image; a
    // data disk; the initramfs and kernel that boot them.
    let root = bookworm_root(dir, &SYSTEMD_GUEST_PACKAGES);
    prepare_guest(&root);
    let system_vm = workspace().join("scripts/system-vm.sh");
    let root_image = dir.join("root.img");
    run(Command::new(&system_vm)
        .arg("image")
        .arg(&root)
        .arg(&root_image));
    fs::remove_dir_all(&root).unwrap();
    let data_image = dir.join("data.img");
    fs::File::create(&data_image)
        .unwrap()
        .set_len(DATA_DISK)
        .unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tidemark-data"])
        .arg(&data_image));
    let initrd = dir.join("initrd.gz");
    let kernel = run(Command::new(&system_vm).arg("initramfs").arg(&initrd));
    let kernel = kernel.lines().last().expect("the kernel's path").trim();
    eprintln!("{TEST}: guest image ready after {:?}", started.elapsed());

    // The VM's spec, as the README's "Protecting a virtual machine" has
    // it (a direct kernel boot: the initramfs finds the root disk by its
    // serial, the disk's name).
    let agent = dir.join("run").join(format!("{VM}.qga"));
    let spec = dir.join(format!("{VM}.toml"));
    fs::write(
        &spec,
        format!(
            "[vm]\nname = \"{VM}\"\ncpus = 2\nmemory = \"512MiB\"\nguest-agent = \"{}\"\n\n\
             [vm.kernel]\npath = \"{kernel}\"\ninitrd = \"{}\"\n\
             append = \"console=ttyS0 panic=-1 quiet systemd.show_status=error tidemark.root=root\"\n\n\
             [[vm.disk]]\nname = \"root\"\npath = \"{}\"\nformat = \"raw\"\n\n\
             [[vm.disk]]\nname = \"data\"\npath = \"{}\"\nformat = \"raw\"\n",
            agent.display(),
            initrd.display(),
            root_image.display(),
            data_image.display()
        ),
    )
    .unwrap();

    // Protected and replicated: `vm protect` writes the group's
    // configuration, the tracker and the shipper run on it.
    let (rpki, hpki) = enroll(dir, HOST);
    let port = free_port();
    let receiver = start_receiver(dir, &rpki, port, None);
    let shipper_config = host_shipper_config(dir, &hpki, port);
    let out = output_ok(
        readme_command(PROTECT, &[("/etc/tidemark/vms/web1.toml", &spec)])
            .arg("--json")
            .arg("--shipper-config")
            .arg(&shipper_config)
            .arg("--config-dir")
            .arg(dir.join("groups"))
            .arg("--run-dir")
            .arg(dir.join("run"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--unit-dir")
            .arg(dir.join("units")),
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = PathBuf::from(report["layout"]["config"].as_str().unwrap());
    // The sockets' directory (systemd's RuntimeDirectory under the units).
    fs::create_dir_all(dir.join("run")).unwrap();
    let tracker_log = dir.join("tracker.log");
    let tracker = start_daemon(&["tracker", "serve"], &config, &tracker_log, "tracker");
    wait_for(
        &dir.join("run").join(format!("{VM}.nbd.sock")),
        "NBD socket",
        &tracker_log,
    );
    let shipper = start_daemon(
        &["shipper", "run"],
        &config,
        &dir.join("shipper.log"),
        "shipper",
    );

    // The production guest boots on the tracker's exports and starts
    // writing (the initial sync runs meanwhile).
    let boot_started = Instant::now();
    let production = ProductionVm::start(dir, &spec);
    let console = production.console.clone();
    let line = wait_console(&console, CHECK_LINE, UP_TIMEOUT, |_| true);
    eprintln!(
        "{TEST}: production guest up (its verdict) {:?} after qemu started",
        boot_started.elapsed()
    );
    assert_verdict(&line, 0, "production boot");
    wait_ack(&console, 3);

    // 1. An application-consistent point through the guest's agent.
    let (answer, seq) = mark_durable(
        dir,
        readme_command(
            "tidemark mark nightly --app-consistent --config /etc/tidemark/groups/web1.toml --json",
            &[("/etc/tidemark/groups/web1.toml", &config)],
        ),
        "nightly",
    );
    assert_eq!(answer["app_consistent"], true, "{answer}");
    assert_eq!(answer["guest_agent"], "frozen", "{answer}");
    assert!(
        answer["guest_filesystems"].as_u64().unwrap_or(0) >= 2,
        "the agent froze the root and data file systems: {answer}"
    );
    let hooks = console_lines(&console, "TIDEMARK-GUEST-FSFREEZE ");
    assert!(
        hooks.iter().any(|l| l.ends_with("freeze")) && hooks.iter().any(|l| l.ends_with("thaw")),
        "the guest's fsfreeze hook did not run: {hooks:?}"
    );
    eprintln!(
        "{TEST}: app-consistent point at {seq}: {} guest file systems frozen for {} ms; hook: {hooks:?}",
        answer["guest_filesystems"], answer["frozen_ms"]
    );

    // 2. A test failover boots at a point while production writes and
    // replicates.
    let acked = wait_ack(&console, last_ack(&console) + 3);
    let (_, point) = mark_durable(dir, mark(&config, "test1"), "test1");
    let before = points(dir);
    let group_dir = dir.join("replicas").join(HOST).join(VM);
    let test_started = Instant::now();
    let (test, lines) = start_booting_test(
        readme_command(
            "tidemark test-failover start --data-dir /var/lib/tidemark/replicas --host hv1.example.com \
             --group web1 --socket /run/tidemark/web1-test.sock --boot --up-timeout 5m",
            &[
                ("/var/lib/tidemark/replicas", &dir.join("replicas")),
                ("hv1.example.com", Path::new(HOST)),
                ("/run/tidemark/web1-test.sock", &dir.join("test-failover.sock")),
            ],
        )
        .args(["--point", &point.to_string(), "--up-line", CHECK_LINE])
        .args(["--accel", "tcg"]),
        &dir.join("test-failover.log"),
    );
    let to_ready = test_started.elapsed();
    let pid: i32 = fs::read_to_string(group_dir.join("test-failover/vm.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _test_vm = Killed(Some(pid));
    let up = lines
        .iter()
        .find(|l| l.starts_with(&format!("the VM {VM} is up")))
        .unwrap_or_else(|| panic!("no up line: {lines:?}"));
    eprintln!("{TEST}: test failover: {up}; start to ready (RTO of the test): {to_ready:?}");
    let test_console = group_dir.join("test-failover/vm.console");
    let line = wait_console(&test_console, CHECK_LINE, Duration::from_secs(5), |_| true);
    let records = assert_verdict(&line, acked, "test failover");
    // Replication goes on: production writes, new points become durable.
    let during = wait_ack(&console, last_ack(&console) + 3);
    let (_, later) = mark_durable(dir, mark(&config, "during-test"), "during-test");
    assert!(later > point);
    eprintln!(
        "{TEST}: during the test failover production acknowledged record {during}, point {later} durable"
    );
    assert!(test.stop().success());
    assert!(gone(pid), "the test VM still runs after the test ended");
    assert!(
        !group_dir.join("test-failover").exists(),
        "the test failover left {}",
        group_dir.join("test-failover").display()
    );
    let after = points(dir);
    let newest_before = before.last().unwrap().0;
    for p in after.iter().filter(|p| p.0 <= newest_before) {
        assert!(
            before.contains(p),
            "point {p:?} appeared among the older points"
        );
    }
    assert!(
        after.iter().any(|p| p.0 == point),
        "the test's point is gone"
    );
    eprintln!("{TEST}: test failover's guest held {records} records");

    // 3. A failover boots at a point taken after record K was
    // acknowledged, and the guest checks itself.
    let acked = wait_ack(&console, last_ack(&console) + 3);
    let (_, point) = mark_durable(dir, mark(&config, "failover1"), "failover1");
    let took = production.shut_down(&agent);
    eprintln!(
        "{TEST}: production shut down cleanly through its agent in {took:?} after record {}",
        last_ack(&console)
    );
    assert!(shipper.stop().success());
    assert!(tracker.stop().success());
    assert!(receiver.stop().success());
    let to = dir.join("failover");
    let failover_started = Instant::now();
    let out = run(readme_command(
        "tidemark failover --data-dir /var/lib/tidemark/replicas --host hv1.example.com --group web1 \
         --to /srv/failover/web1 --boot --network br0=br-dr0",
        &[
            ("/var/lib/tidemark/replicas", &dir.join("replicas")),
            ("hv1.example.com", Path::new(HOST)),
            ("/srv/failover/web1", &to),
        ],
    )
    // No --up-line: the spec names a guest agent, so the VM is up when
    // the agent answers on the channel the boot gives it.
    .args(["--point", &point.to_string()])
    .args(["--up-timeout", &format!("{}s", UP_TIMEOUT.as_secs())])
    .args(["--accel", "tcg"]));
    let rto = failover_started.elapsed();
    let pid: i32 = fs::read_to_string(to.join(format!("{VM}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _failed_over = Killed(Some(pid));
    assert!(
        out.contains(&format!("the VM {VM} is up")) && out.contains("its guest agent answered"),
        "{out}"
    );
    // The guest's check may end before or after its agent starts.
    let line = wait_console(
        &to.join(format!("{VM}.console")),
        CHECK_LINE,
        UP_TIMEOUT,
        |_| true,
    );
    let to_verdict = failover_started.elapsed();
    assert_verdict(&line, acked, "failover");
    eprintln!(
        "{TEST}: failover --boot to the guest agent answering (RTO by agent): {rto:?}; \
         to the guest's verdict: {to_verdict:?}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !gone(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(gone(pid), "the failed-over VM did not stop");

    // 4. A running guest, not yet protected, moves onto the tracker while
    // it writes (`vm protect --live`), with no I/O error in the guest;
    // after the resync and a clean shutdown the replica equals the source.
    live_move_while_writing(
        dir,
        kernel,
        &initrd,
        &root_image,
        &shipper_config,
        &rpki,
        port,
    );
    eprintln!("{TEST}: whole test {:?}", started.elapsed());
}

/// Scenario 4: the VM `vm2`, a copy of the guest with a fresh data disk,
/// started on its image files, moved live under protection while its
/// workload writes; the replica of its disks is compared byte for byte
/// with the files once it has shut down and replication has caught up.
fn live_move_while_writing(
    dir: &Path,
    kernel: &str,
    initrd: &Path,
    root_image: &Path,
    shipper_config: &Path,
    rpki: &Path,
    port: u16,
) {
    const VM2: &str = "web2";
    let root = dir.join("vm2-root.img");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(root_image)
        .arg(&root));
    let data = dir.join("vm2-data.img");
    fs::File::create(&data).unwrap().set_len(DATA_DISK).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "tidemark-data"])
        .arg(&data));
    let run_dir = dir.join("run");
    let agent = run_dir.join(format!("{VM2}.qga"));
    let qmp = run_dir.join(format!("{VM2}.qmp"));
    let spec = dir.join(format!("{VM2}.toml"));
    fs::write(
        &spec,
        format!(
            "[vm]\nname = \"{VM2}\"\ncpus = 2\nmemory = \"512MiB\"\nguest-agent = \"{}\"\n\n\
             [[vm.disk]]\nname = \"root\"\npath = \"{}\"\nformat = \"raw\"\n\n\
             [[vm.disk]]\nname = \"data\"\npath = \"{}\"\nformat = \"raw\"\n",
            agent.display(),
            root.display(),
            data.display()
        ),
    )
    .unwrap();
    let receiver = start_receiver(dir, rpki, port, None);
    let out = output_ok(
        readme_command(PROTECT, &[("/etc/tidemark/vms/web1.toml", &spec)])
            .arg("--json")
            .arg("--shipper-config")
            .arg(shipper_config)
            .arg("--config-dir")
            .arg(dir.join("groups"))
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--unit-dir")
            .arg(dir.join("units")),
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let config = PathBuf::from(report["layout"]["config"].as_str().unwrap());
    let log_dir = PathBuf::from(report["layout"]["log_dir"].as_str().unwrap());
    // The group's tracker serves the files the running VM still writes
    // directly (the live move's precondition).
    let tracker_log = dir.join("tracker-vm2.log");
    let tracker = start_daemon(&["tracker", "serve"], &config, &tracker_log, "tracker");
    wait_for(
        &run_dir.join(format!("{VM2}.nbd.sock")),
        "NBD socket",
        &tracker_log,
    );
    let shipper = start_daemon(
        &["shipper", "run"],
        &config,
        &dir.join("shipper.log"),
        "shipper",
    );
    let boot_started = Instant::now();
    let vm = ProductionVm::start_on_files(
        dir,
        VM2,
        (kernel, initrd),
        &[("root", &root), ("data", &data)],
        &agent,
        &qmp,
    );
    let console = vm.console.clone();
    let line = wait_console(&console, CHECK_LINE, UP_TIMEOUT, |_| true);
    eprintln!(
        "{TEST}: unprotected guest up (its verdict) {:?} after qemu started",
        boot_started.elapsed()
    );
    assert_verdict(&line, 0, "unprotected boot");
    let before = wait_ack(&console, 3);
    let moved = Instant::now();
    let out = output_ok(
        readme_command(
            "tidemark vm protect /etc/tidemark/vms/web1.toml --live --qmp /run/web1.qmp",
            &[
                ("/etc/tidemark/vms/web1.toml", &spec),
                ("/run/web1.qmp", &qmp),
            ],
        )
        .arg("--json")
        .arg("--run-dir")
        .arg(&run_dir),
    );
    let took = moved.elapsed();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["error"], Value::Null, "{report}");
    for disk in report["disks"].as_array().unwrap() {
        assert_eq!(disk["outcome"], "moved", "{report}");
        assert_eq!(disk["resync-recorded"], true, "{report}");
    }
    let after = wait_ack(&console, last_ack(&console) + 10);
    eprintln!(
        "{TEST}: live move of 2 disks in {took:?} while the guest wrote (record {before} before, {after} after)"
    );
    let took = vm.shut_down(&agent);
    let last = last_ack(&console);
    eprintln!("{TEST}: the moved guest shut down cleanly in {took:?} after record {last}");
    let errors = console_lines(&console, "TIDEMARK-GUEST-IOERR");
    assert!(errors.is_empty(), "the workload saw I/O errors: {errors:?}");
    let text = String::from_utf8_lossy(&fs::read(&console).unwrap()).into_owned();
    assert!(
        !text.contains("I/O error") && !text.contains("EXT4-fs error"),
        "the guest's kernel logged I/O errors:\n{text}"
    );
    // The tracker's stop ends the log with a barrier; the replica's
    // newest point then holds everything.
    assert!(tracker.stop().success());
    let synced = Instant::now();
    wait_caught_up(dir, &log_dir, Duration::from_secs(300));
    eprintln!(
        "{TEST}: replication (the resync the move recorded) caught up {:?} after the shutdown",
        synced.elapsed()
    );
    assert!(shipper.stop().success());
    assert!(receiver.stop().success());
    let to = dir.join("failover-vm2");
    run(tidemark()
        .args(["failover", "--data-dir"])
        .arg(dir.join("replicas"))
        .args(["--host", HOST, "--group", VM2, "--to"])
        .arg(&to));
    for (name, source) in [("root", &root), ("data", &data)] {
        let replica = to.join(format!("{name}.img"));
        let out = Command::new("cmp")
            .arg(source)
            .arg(&replica)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the replica of {name} differs from its file: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    eprintln!("{TEST}: the replica of both disks equals the files byte for byte ({last} records)");
}
