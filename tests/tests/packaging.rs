//! The distribution packages, proven with the real tools: man pages that
//! groff renders without a warning and that name every subcommand, bash
//! completion that completes, systemd units that `systemd-analyze verify`
//! passes clean, and .debs (built by scripts/package.sh) that install into
//! a freshly debootstrapped Debian bookworm, run there, and go away again
//! with `dpkg -r` / `dpkg --purge`; the .rpm lists what it must.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use tidemark_e2e::debian::{bookworm_root, build_packages, is_root, workspace};
use tidemark_e2e::{require_tool, run, tidemark, tidemark_bin};

const UNITS: [&str; 3] = [
    "tidemark-tracker.service",
    "tidemark-shipper.service",
    "tidemark-receiver.service",
];
const CONFIGS: [&str; 3] = ["tracker", "shipper", "receiver"];
/// The templated units of one consistency group each (a protected VM's),
/// the instance being the group: installed, never enabled by a package.
const TEMPLATES: [&str; 2] = ["tidemark-tracker@.service", "tidemark-shipper@.service"];

/// The top-level subcommands, as `tidemark --help` lists them.
fn top_level_subcommands() -> Vec<String> {
    let help = run(tidemark().arg("--help"));
    let commands: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    assert!(
        commands.len() >= 7,
        "expected at least 7 subcommands in --help, got {commands:?}"
    );
    commands
}

fn generate_docs(out: &Path) {
    run(tidemark().arg("generate-docs").arg("--out").arg(out));
}

#[test]
fn man_pages_render_cleanly_and_name_every_subcommand() {
    if !require_tool(
        "groff",
        "man_pages_render_cleanly_and_name_every_subcommand",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    generate_docs(dir.path());
    let man = dir.path().join("man");
    let mut pages: Vec<String> = fs::read_dir(&man)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();

    for page in &pages {
        // -ww: every warning; -z: parse and format, print nothing.
        let out = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(man.join(page))
            .output()
            .unwrap();
        assert!(out.status.success(), "groff failed on {page}");
        assert!(
            out.stderr.is_empty(),
            "groff warns about {page}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let rendered = run(Command::new("groff")
        .args(["-man", "-Tutf8", "-P-c", "-P-b", "-P-u"])
        .arg(man.join("tidemark.1")));
    for sub in top_level_subcommands() {
        assert!(
            rendered.contains(&format!("tidemark-{sub}(1)")),
            "tidemark.1 does not list `{sub}`:\n{rendered}"
        );
        assert!(
            pages.contains(&format!("tidemark-{sub}.1")),
            "no page for `tidemark {sub}` in {pages:?}"
        );
    }
    // Pages one level down too, and none for the hidden or help commands.
    for page in [
        "tidemark-tracker-serve.1",
        "tidemark-shipper-run.1",
        "tidemark-receiver-serve.1",
    ] {
        assert!(
            pages.contains(&page.to_string()),
            "{page} missing: {pages:?}"
        );
    }
    assert!(
        !pages
            .iter()
            .any(|p| p.contains("help") || p.contains("generate-docs")),
        "{pages:?}"
    );
    let serve = fs::read_to_string(man.join("tidemark-tracker-serve.1")).unwrap();
    assert!(
        serve.contains("\\-\\-log\\-dir"),
        "tracker serve options missing"
    );
}

#[test]
fn completions_complete_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    generate_docs(dir.path());
    let completions = dir.path().join("completions");
    for file in ["tidemark.bash", "_tidemark", "tidemark.fish"] {
        let text = fs::read_to_string(completions.join(file)).unwrap();
        for sub in top_level_subcommands() {
            assert!(text.contains(&sub), "{file} does not offer `{sub}`");
        }
        assert!(
            !text.contains("generate-docs"),
            "{file} offers the hidden command"
        );
    }

    // Drive the bash completion as bash would: "tidemark tr<TAB>", then
    // "tidemark tracker s<TAB>".
    let bash = completions.join("tidemark.bash");
    let complete = |words: &str| {
        let script = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             COMP_LINE='{words}'; COMP_POINT=${{#COMP_LINE}}; \
             _tidemark tidemark \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
             printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            bash.display()
        );
        let mut words: Vec<String> = run(Command::new("bash").arg("-c").arg(script))
            .lines()
            .map(str::to_string)
            .collect();
        words.sort();
        words
    };
    assert_eq!(complete("tidemark tr"), ["tracker"]);
    assert_eq!(complete("tidemark tracker s"), ["serve", "status"]);
    if Command::new("zsh").arg("--version").output().is_ok() {
        run(Command::new("zsh")
            .arg("-n")
            .arg(completions.join("_tidemark")));
    }
}

/// A root directory holding the units, the binary they start, the man
/// pages they name and the host's own units they order against, for
/// `systemd-analyze verify --root`.
fn unit_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    let system = root.join("usr/lib/systemd");
    fs::create_dir_all(&system).unwrap();
    let host_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|d| Path::new(d).join("multi-user.target").exists())
        .expect("the host's systemd units (multi-user.target)");
    run(Command::new("cp").arg("-a").arg(host_units).arg(&system));
    let units = root.join("etc/systemd/system");
    fs::create_dir_all(&units).unwrap();
    for unit in UNITS.iter().chain(&TEMPLATES) {
        fs::copy(
            workspace().join("packaging/systemd").join(unit),
            units.join(unit),
        )
        .unwrap();
    }
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::copy(tidemark_bin(), root.join("usr/bin/tidemark")).unwrap();
    generate_docs(&dir.join("docs"));
    fs::create_dir_all(root.join("usr/share/man")).unwrap();
    run(Command::new("cp")
        .arg("-a")
        .arg(dir.join("docs/man"))
        .arg(root.join("usr/share/man/man1")));
    root
}

#[test]
fn systemd_units_verify_clean() {
    if !require_tool("systemd-analyze", "systemd_units_verify_clean") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = unit_root(dir.path());
    // verify also runs `man` for every Documentation=man: page; MANPATH
    // points it at the pages in the root.
    // A template is verified through an instance of it.
    let instances = TEMPLATES.map(|t| t.replace("@.", "@web1."));
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(UNITS)
        .args(&instances)
        .env("MANPATH", root.join("usr/share/man"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    // What the units promise, checked on the text systemd just accepted.
    let unit =
        |name: &str| fs::read_to_string(workspace().join("packaging/systemd").join(name)).unwrap();
    let shipper = unit("tidemark-shipper.service");
    assert!(shipper.contains("\nRestartPreventExitStatus=2\n"));
    assert!(shipper.contains("\nRestart=on-failure\n"));
    let receiver = unit("tidemark-receiver.service");
    assert!(
        receiver.contains("\nUser=tidemark\n") && receiver.contains("\nProtectSystem=strict\n")
    );
    for (name, daemon) in [
        ("tidemark-tracker.service", "tracker serve"),
        ("tidemark-shipper.service", "shipper run"),
        ("tidemark-receiver.service", "receiver serve"),
    ] {
        let text = unit(name);
        let config = name
            .trim_start_matches("tidemark-")
            .trim_end_matches(".service");
        let exec = format!(
            "\nExecStart=/usr/bin/tidemark {daemon} --config /etc/tidemark/{config}.toml\n"
        );
        assert!(text.contains(&exec), "{name}: expected {exec:?}");
        assert!(text.contains("\nRestart=on-failure\n"), "{name}");
        // The group's template (the tracker's and the shipper's) runs the
        // same daemon on the group's file, with the same settings.
        let template = name.replace(".service", "@.service");
        if TEMPLATES.contains(&template.as_str()) {
            let template_text = unit(&template);
            let exec = format!(
                "\nExecStart=/usr/bin/tidemark {daemon} --config /etc/tidemark/groups/%i.toml\n"
            );
            assert!(
                template_text.contains(&exec),
                "{template}: expected {exec:?}"
            );
            assert_eq!(
                settings(&template_text),
                settings(&text),
                "{template}: its [Service] settings differ from {name}'s"
            );
        }
        // The default config the packages install there is valid.
        run(tidemark()
            .args(["config", "check"])
            .arg(workspace().join(format!("config/examples/{config}.toml"))));
    }
}

/// The `[Service]` settings of a unit, but its `ExecStart`.
fn settings(unit: &str) -> Vec<&str> {
    unit.lines()
        .skip_while(|l| *l != "[Service]")
        .take_while(|l| *l != "[Install]")
        .filter(|l| !l.starts_with('#') && !l.starts_with("ExecStart="))
        .collect()
}

fn in_chroot(root: &Path, args: &[&str]) -> String {
    run(Command::new("chroot").arg(root).args(args))
}

fn chroot_has(root: &Path, path: &str) -> bool {
    root.join(path.trim_start_matches('/'))
        .symlink_metadata()
        .is_ok()
}

/// The whole package flow, once: scripts/package.sh builds the packages
/// (with the profile these tests were built with), the .debs go in and out
/// of a Debian chroot, the .rpm's file list is checked.
#[test]
fn packages_install_run_and_remove() {
    let test = "packages_install_run_and_remove";
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: CI must run the tests as root"
        );
        eprintln!("SKIP {test}: needs root (debootstrap, chroot, dpkg)");
        return;
    }
    for tool in [
        "debootstrap",
        "chroot",
        "dpkg-deb",
        "rpm",
        "cargo-deb",
        "cargo-generate-rpm",
    ] {
        if !require_tool(tool, test) {
            return;
        }
    }
    let packages = build_packages();
    let (out, version) = (&packages.dir, &packages.version);
    let deb = |pkg: &str| packages.deb(pkg);

    // The role packages pin the exact common package that holds the binary.
    for pkg in ["tidemark-agent", "tidemark-receiver"] {
        let depends = run(Command::new("dpkg-deb")
            .arg("-f")
            .arg(deb(pkg))
            .arg("Depends"));
        assert_eq!(
            depends.trim(),
            format!("tidemark-common (= {version}-1)"),
            "{pkg}: update the pin in cli/Cargo.toml [package.metadata.deb.variants]"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let root = bookworm_root(dir.path(), &[]);
    fs::create_dir_all(root.join("tmp/debs")).unwrap();
    let mut in_root = Vec::new();
    for pkg in ["tidemark-common", "tidemark-agent", "tidemark-receiver"] {
        let name = deb(pkg).file_name().unwrap().to_string_lossy().into_owned();
        fs::copy(deb(pkg), root.join("tmp/debs").join(&name)).unwrap();
        in_root.push(format!("/tmp/debs/{name}"));
    }
    let mut install = vec!["dpkg", "-i"];
    install.extend(in_root.iter().map(String::as_str));
    in_chroot(&root, &install);

    assert_eq!(
        in_chroot(&root, &["tidemark", "--version"]).trim(),
        format!("tidemark {version}")
    );
    for config in CONFIGS {
        let path = format!("/etc/tidemark/{config}.toml");
        let checked = in_chroot(&root, &["tidemark", "config", "check", &path]);
        assert!(checked.contains("valid"), "{checked}");
    }
    let conffiles = in_chroot(
        &root,
        &[
            "dpkg-query",
            "-W",
            "-f",
            "${Conffiles}\n",
            "tidemark-agent",
            "tidemark-receiver",
        ],
    );
    for config in CONFIGS {
        assert!(
            conffiles.contains(&format!("/etc/tidemark/{config}.toml")),
            "{conffiles}"
        );
    }
    for path in [
        "/usr/share/man/man1/tidemark.1.gz",
        "/usr/share/man/man1/tidemark-tracker-serve.1.gz",
        "/usr/share/bash-completion/completions/tidemark",
        "/usr/share/zsh/vendor-completions/_tidemark",
        "/usr/share/fish/vendor_completions.d/tidemark.fish",
        "/usr/share/tidemark/prometheus/tidemark-alerts.yml",
        "/usr/share/tidemark/grafana/tidemark-dashboard.json",
    ] {
        assert!(chroot_has(&root, path), "{path} not installed");
    }
    // Templates installed, and no instance of them enabled.
    for unit in TEMPLATES {
        assert!(
            chroot_has(&root, &format!("/usr/lib/systemd/system/{unit}")),
            "{unit}"
        );
    }
    // Units installed and enabled (not started: there is no systemd here,
    // and the maintainer scripts must not need one).
    for unit in UNITS {
        assert!(
            chroot_has(&root, &format!("/usr/lib/systemd/system/{unit}")),
            "{unit}"
        );
        assert!(
            chroot_has(
                &root,
                &format!("/etc/systemd/system/multi-user.target.wants/{unit}")
            ),
            "{unit} not enabled"
        );
    }
    let user = in_chroot(&root, &["getent", "passwd", "tidemark"]);
    assert!(user.contains("/usr/sbin/nologin"), "{user}");
    let owner = in_chroot(
        &root,
        &["stat", "-c", "%U %a", "/var/lib/tidemark/replicas"],
    );
    assert_eq!(owner.trim(), "tidemark 750");

    // Upgrade (the same packages installed over themselves: dpkg runs the
    // upgrade path of every maintainer script): an admin's edit of a
    // config survives, and the units stay enabled.
    in_chroot(
        &root,
        &[
            "sh",
            "-c",
            "echo '# edited by the admin' >> /etc/tidemark/receiver.toml",
        ],
    );
    in_chroot(&root, &install);
    let kept = in_chroot(&root, &["cat", "/etc/tidemark/receiver.toml"]);
    assert!(kept.contains("# edited by the admin"), "{kept}");
    for unit in UNITS {
        assert!(
            chroot_has(
                &root,
                &format!("/etc/systemd/system/multi-user.target.wants/{unit}")
            ),
            "{unit} not enabled after the upgrade"
        );
    }
    assert!(in_chroot(
        &root,
        &["tidemark", "config", "check", "/etc/tidemark/receiver.toml"]
    )
    .contains("valid"));

    // Remove: binary and units go, conffiles stay (dpkg's rule) ...
    in_chroot(
        &root,
        &[
            "dpkg",
            "-r",
            "tidemark-agent",
            "tidemark-receiver",
            "tidemark-common",
        ],
    );
    assert!(!chroot_has(&root, "/usr/bin/tidemark"));
    for unit in UNITS.iter().chain(&TEMPLATES) {
        assert!(
            !chroot_has(&root, &format!("/usr/lib/systemd/system/{unit}")),
            "{unit}"
        );
    }
    assert!(chroot_has(&root, "/etc/tidemark/tracker.toml"));
    // ... purge takes the rest: configs, enablement links, empty state dirs.
    in_chroot(
        &root,
        &[
            "dpkg",
            "--purge",
            "tidemark-agent",
            "tidemark-receiver",
            "tidemark-common",
        ],
    );
    for gone in [
        "/etc/tidemark",
        "/var/lib/tidemark",
        "/usr/share/man/man1/tidemark.1.gz",
    ] {
        assert!(!chroot_has(&root, gone), "{gone} left after purge");
    }
    for unit in UNITS {
        assert!(
            !chroot_has(
                &root,
                &format!("/etc/systemd/system/multi-user.target.wants/{unit}")
            ),
            "{unit} still enabled after purge"
        );
    }
    let listed = in_chroot(
        &root,
        &["dpkg-query", "-W", "-f", "${Package} ${db:Status-Abbrev}\n"],
    );
    assert!(!listed.contains("tidemark"), "dpkg still knows:\n{listed}");

    // The rpm: everything in one package, configs marked as such.
    let rpm = out.join(format!("tidemark-{version}-1.x86_64.rpm"));
    let files = run(Command::new("rpm").arg("-qpl").arg(&rpm));
    let files: Vec<&str> = files.lines().collect();
    let mut expected = vec![
        "/usr/bin/tidemark".to_string(),
        "/usr/share/bash-completion/completions/tidemark".into(),
        "/usr/share/zsh/site-functions/_tidemark".into(),
        "/usr/share/fish/vendor_completions.d/tidemark.fish".into(),
        "/usr/share/tidemark/prometheus/tidemark-alerts.yml".into(),
        "/usr/share/tidemark/grafana/tidemark-dashboard.json".into(),
    ];
    expected.extend(
        UNITS
            .iter()
            .chain(&TEMPLATES)
            .map(|u| format!("/usr/lib/systemd/system/{u}")),
    );
    expected.extend(CONFIGS.iter().map(|c| format!("/etc/tidemark/{c}.toml")));
    for page in fs::read_dir(out.join("docs/man")).unwrap() {
        let page = page.unwrap().file_name();
        expected.push(format!("/usr/share/man/man1/{}", page.to_string_lossy()));
    }
    for path in &expected {
        assert!(
            files.contains(&path.as_str()),
            "{path} not in the rpm:\n{files:#?}"
        );
    }
    assert_eq!(
        files.len(),
        expected.len(),
        "unexpected files in the rpm:\n{files:#?}"
    );
    let configs = run(Command::new("rpm").arg("-qpc").arg(&rpm));
    assert_eq!(configs.lines().count(), 3, "{configs}");
}

/// The units are `Type=notify`: the tracker must send READY=1 to
/// `NOTIFY_SOCKET` once it serves, and not before (the NBD socket exists
/// by then).
#[test]
fn tracker_notifies_systemd_when_ready() {
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    fs::File::create(&image).unwrap().set_len(16 << 20).unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let socket = dir.path().join("nbd.sock");
    let mut child = tidemark()
        .args(["tracker", "serve", "--image"])
        .arg(&image)
        .arg("--socket")
        .arg(&socket)
        .arg("--control-socket")
        .arg(dir.path().join("tracker.ctl"))
        .arg("--log-dir")
        .arg(dir.path().join("log"))
        .env("NOTIFY_SOCKET", &notify)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let received = listener.recv(&mut buf);
    let serving = socket.exists();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait().unwrap();
    let n = received.expect("no sd_notify message within 60 s");
    let message = String::from_utf8_lossy(&buf[..n]);
    assert!(
        message.lines().any(|l| l == "READY=1"),
        "unexpected notification {message:?}"
    );
    assert!(serving, "READY=1 came before the NBD socket existed");
    assert!(status.success(), "tracker exit: {status:?}");
}
