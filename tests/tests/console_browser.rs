//! The web console in a real browser: Debian's chromium driven through
//! chromedriver (WebDriver, fantoccini), against a real receiver with a
//! real replicating host. An operator logs in with an admin certificate
//! (the CA trusted and the certificate imported into the browser's NSS
//! database, chosen by the AutoSelectCertificateForUrls policy), a
//! read-only user with a password; a test failover is started from the
//! page, read back with `nbdcopy`, and cleaned up from the page; the
//! refusals (read-only, no session, no CSRF token) are POSTs from inside
//! the logged-in pages. The jobs page shows the test failover running,
//! with its progress bar and the live stream connected, then finished.
//! One browser per identity; screenshots of each
//! page go to target/console-screenshots/.

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tidemark_e2e::replication::{
    enroll, free_port, newest_point, run_ok, start_receiver_with, start_shipper, wait_caught_up,
    HOST,
};
use tidemark_e2e::{qemu_io, require_tool, tidemark_bin, TrackerProcess};

const SIZE: u64 = 64 << 20;
const TEST: &str = "the_console_logs_in_shows_points_and_runs_a_test_failover";
/// Where Chromium reads the policy that picks the client certificate
/// without asking (headless Chromium cannot show its picker).
const POLICY_DIR: &str = "/etc/chromium/policies/managed";
const P12_PASSWORD: &str = "tidemark-test";

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/console-screenshots");
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether a policy file selects client certificates for 127.0.0.1.
fn policy_present() -> bool {
    let found = fs::read_dir(POLICY_DIR).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            fs::read_to_string(e.path()).is_ok_and(|t| {
                t.contains("AutoSelectCertificateForUrls") && t.contains("https://127.0.0.1")
            })
        })
    });
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{TEST}: no AutoSelectCertificateForUrls policy for https://127.0.0.1 in {POLICY_DIR} under CI; scripts/test.sh writes it"
        );
        eprintln!("SKIP {TEST}: no AutoSelectCertificateForUrls policy in {POLICY_DIR} (scripts/test.sh writes it)");
    }
    found
}

/// A chromedriver (and the browser it starts) for one identity: its own
/// HOME with an NSS database trusting the CA and holding that identity's
/// certificate, if any. The whole process group is killed on drop.
struct Browser {
    driver: Child,
    client: Option<Client>,
}

impl Browser {
    async fn start(home: &Path, ca: &Path, p12: Option<&Path>) -> Browser {
        let db = home.join(".pki/nssdb");
        fs::create_dir_all(&db).unwrap();
        let sql = format!("sql:{}", db.display());
        run_ok(Command::new("certutil").args(["-d", &sql, "-N", "--empty-password"]));
        run_ok(
            Command::new("certutil")
                .args(["-d", &sql, "-A", "-n", "tidemark-ca", "-t", "C,,", "-i"])
                .arg(ca),
        );
        if let Some(p12) = p12 {
            run_ok(
                Command::new("pk12util")
                    .args(["-d", &sql, "-W", P12_PASSWORD, "-i"])
                    .arg(p12),
            );
        }
        let port = free_tcp_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("HOME", home)
            .stdout(Stdio::null())
            .stderr(fs::File::create(home.join("chromedriver.log")).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let mut browser = Browser {
            driver,
            client: None,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = home.join("profile");
        let caps = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "timeouts": {"pageLoad": 20000},
            "goog:chromeOptions": {
                "binary": "/usr/lib/chromium/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                         "--disable-gpu", format!("--user-data-dir={}", profile.display()),
                         "--window-size=1280,1000"],
            }
        });
        let caps = caps.as_object().unwrap().clone();
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("starting a chromium session");
        browser.client = Some(client);
        browser
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// The text of the element `css` names; waits (up to 20 s) for a page
    /// that is still loading after a click.
    async fn text(&self, css: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let read = match self.c().find(Locator::Css(css)).await {
                Ok(e) => e.text().await,
                Err(e) => Err(e),
            };
            match read {
                Ok(text) => return text,
                Err(e) if Instant::now() > deadline => panic!("{css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Reloads `url` until the text of `css` satisfies `ok` (up to 30 s:
    /// a report comes every 2 s while something changes); that text.
    async fn wait_for_text(&self, url: &str, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.c().goto(url).await.unwrap();
            let text = self.text(css).await;
            if ok(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "{css} still reads {text:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn shot(&self, name: &str) {
        let png = self.c().screenshot().await.unwrap();
        fs::write(screenshots().join(name), png).unwrap();
    }

    /// POSTs `body` (form-encoded) to `path` from inside the page, with
    /// the page's cookies unless `omit_cookies`; the HTTP status.
    async fn post(&self, path: &str, body: &str, omit_cookies: bool) -> u64 {
        let script = "const [path, body, omit, done] = arguments;
            fetch(path, {method: 'POST', body: new URLSearchParams(body),
                         credentials: omit ? 'omit' : 'same-origin', redirect: 'manual'})
              .then(r => done(r.status), e => done('error ' + e));";
        let status = self
            .c()
            .execute_async(script, vec![json!(path), json!(body), json!(omit_cookies)])
            .await
            .unwrap();
        status
            .as_u64()
            .unwrap_or_else(|| panic!("the POST failed: {status}"))
    }

    async fn quit(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver's children (the browser's processes) are in its
        // group: kill them all, not just the driver.
        let pgid = nix::unistd::Pid::from_raw(-(self.driver.id() as i32));
        let _ = nix::sys::signal::kill(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}

#[test]
fn the_console_logs_in_shows_points_and_runs_a_test_failover() {
    let tools = [
        "chromium",
        "chromedriver",
        "certutil",
        "pk12util",
        "openssl",
        "nbdcopy",
        "qemu-io",
    ];
    if !tools.iter().all(|t| require_tool(t, TEST)) || !policy_present() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (rpki, hpki) = enroll(dir, HOST);
    let bin = tidemark_bin();
    // The console's certificate, beside the CA where the console looks.
    run_ok(
        Command::new(&bin)
            .args(["receiver", "sign", "--pki-dir"])
            .arg(&rpki)
            .args(["--console", "127.0.0.1", "--out"])
            .arg(rpki.join("console.crt"))
            .arg("--key-out")
            .arg(rpki.join("console.key")),
    );
    // The operator's admin certificate, as a browser imports it.
    let (cert, key, p12) = (
        dir.join("alice.crt"),
        dir.join("alice.key"),
        dir.join("alice.p12"),
    );
    run_ok(
        Command::new(&bin)
            .args(["receiver", "sign", "--pki-dir"])
            .arg(&rpki)
            .args(["--admin", "alice", "--role", "operator", "--out"])
            .arg(&cert)
            .arg("--key-out")
            .arg(&key),
    );
    run_ok(
        Command::new("openssl")
            .args(["pkcs12", "-export", "-passout"])
            .arg(format!("pass:{P12_PASSWORD}"))
            .arg("-in")
            .arg(&cert)
            .arg("-inkey")
            .arg(&key)
            .arg("-out")
            .arg(&p12),
    );
    let mut hasher = Command::new(&bin)
        .args(["receiver", "console-password"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        hasher
            .stdin
            .take()
            .unwrap()
            .write_all(b"viewer-pass\n")
            .unwrap();
    }
    let hash = String::from_utf8(hasher.wait_with_output().unwrap().stdout).unwrap();
    let console_port = free_tcp_port();
    let port = free_port();
    let data_dir = dir.join("replicas");
    let _receiver = start_receiver_with(
        &data_dir,
        dir,
        &rpki,
        port,
        &format!(
            "[receiver.console]\nenabled = true\nlisten = \"127.0.0.1:{console_port}\"\n\
             [[receiver.console.user]]\nname = \"viewer\"\nrole = \"read-only\"\npassword-hash = \"{}\"\n",
            hash.trim()
        ),
    );

    // A host replicating: data written, caught up, a point.
    let image = dir.join("disk.img");
    fs::File::create(&image).unwrap().set_len(SIZE).unwrap();
    let tracker = TrackerProcess::start(dir, &image, &[]);
    let log_dir = tracker.log_dir.clone();
    let uri = tracker.uri();
    let _shipper = start_shipper(dir, &log_dir, &hpki, port);
    qemu_io(
        &uri,
        &["write -P 0x5a 0 3M", "write -P 0x6b 40M 1M", "flush"],
    );
    wait_caught_up(dir, &log_dir, Duration::from_secs(60));
    let reference = fs::read(&image).unwrap();
    let point = newest_point(dir);

    let base = format!("https://127.0.0.1:{console_port}");
    let group = format!("/group/{HOST}/default");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The operator, by certificate.
        let started = Instant::now();
        let op = Browser::start(&dir.join("home-alice"), &rpki.join("ca.crt"), Some(&p12)).await;
        op.c().goto(&format!("{base}/")).await.unwrap();
        assert_eq!(
            op.text("#user").await,
            "alice",
            "logged in by the certificate"
        );
        assert_eq!(op.text("#role").await, "operator");
        let row = op
            .text(&format!("tr.group-row[data-host=\"{HOST}\"]"))
            .await;
        assert!(row.contains("protected"), "{row}");
        // What the shipper reported: its state, lag now and pending.
        let cell = |c: &str| format!("tr.group-row[data-host=\"{HOST}\"] td.{c}");
        assert_eq!(
            op.text(&format!("{} .state", cell("shipper-state"))).await,
            "protected",
            "the state from the shipper's report: {row}"
        );
        let lag_now = op.text(&cell("lag-now")).await;
        assert!(
            lag_now.ends_with(" ms") || lag_now.ends_with(" s"),
            "the lag now: {lag_now}"
        );
        let pending = op.text(&cell("pending")).await;
        assert!(pending.contains("record(s)"), "pending: {pending}");
        op.shot("overview.png").await;

        op.c().goto(&format!("{base}{group}")).await.unwrap();
        let chosen = op.text("tr.point.chosen").await;
        assert!(
            chosen.contains(&point.to_string()),
            "the newest point is chosen: {chosen}"
        );
        op.shot("group.png").await;

        // Without the CSRF token, and without the session: refused.
        let body = format!("point={point}");
        assert_eq!(
            op.post(&format!("{group}/test-failover"), &body, false)
                .await,
            403
        );
        assert_eq!(
            op.post(&format!("{group}/test-failover"), &body, true)
                .await,
            403
        );

        op.c()
            .find(Locator::Css("#start-test"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        let export = op.text("code.nbd-uri").await;
        op.shot("group-test-failover.png").await;
        let copy = dir.join("copy.img");
        let out = Command::new("nbdcopy")
            .arg(&export)
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            fs::read(&copy).unwrap() == reference,
            "the export is not the point"
        );

        op.c()
            .goto(&format!("{base}/test-failovers"))
            .await
            .unwrap();
        assert!(op.text("#tests").await.contains(&export));
        op.shot("test-failovers.png").await;

        // The jobs page: the running test failover, with its (unmeasured)
        // progress bar, and the live stream connected (its script shows
        // that it follows the server's events).
        let jobs_started = Instant::now();
        op.c().goto(&format!("{base}/jobs")).await.unwrap();
        let running = op
            .text("#running-jobs tr.job[data-state=\"running\"]")
            .await;
        assert!(
            running.contains("test failover") && running.contains(&format!("{HOST}/default")),
            "{running}"
        );
        assert!(running.contains("alice"), "{running}");
        op.c()
            .find(Locator::Css("#running-jobs tr.job progress.job-bar"))
            .await
            .expect("a progress bar");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !op
            .c()
            .find(Locator::Css("#live-on"))
            .await
            .unwrap()
            .is_displayed()
            .await
            .unwrap()
        {
            assert!(Instant::now() < deadline, "the live stream did not connect");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        op.shot("jobs.png").await;
        eprintln!("jobs page checked in {:.1?}", jobs_started.elapsed());

        op.c().goto(&format!("{base}{group}")).await.unwrap();
        op.c()
            .find(Locator::Css("#cleanup"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        assert!(op.text("h2 + p").await.contains("None running"));
        let socket = export.rsplit("socket=").next().unwrap().to_owned();
        assert!(!Path::new(&socket).exists(), "the socket is left");
        assert!(
            !data_dir.join(HOST).join("default/test-failover").exists(),
            "traces left"
        );
        // The test failover is a finished job now.
        op.c().goto(&format!("{base}/jobs")).await.unwrap();
        let finished = op.text("#finished-jobs tr.job").await;
        assert!(
            finished.contains("test failover") && finished.contains("done"),
            "{finished}"
        );

        // The shipper's report on the group page moves as the host
        // writes: idle first (no records shipped since the last report),
        // then records shipped, then idle again.
        let reported = Instant::now();
        op.c().goto(&format!("{base}{group}")).await.unwrap();
        assert_eq!(op.text("#shipper-state").await, "protected");
        let idle = "0 B/s on the wire, 0 B/s of records";
        op.wait_for_text(&format!("{base}{group}"), "#shipper-throughput", |t| {
            t == idle
        })
        .await;
        qemu_io(&uri, &["write -P 0x7c 8M 24M", "flush"]);
        let busy = op
            .wait_for_text(&format!("{base}{group}"), "#shipper-throughput", |t| {
                !t.ends_with(", 0 B/s of records")
            })
            .await;
        eprintln!("shipper report while writing: {busy}");
        let pending = op.text("#shipper-pending").await;
        assert!(pending.contains("record(s)"), "{pending}");
        // The 24 h chart, with this minute's lag in it, and its summary.
        assert!(op.c().find(Locator::Css("#lag-chart title")).await.is_ok());
        op.c()
            .find(Locator::Css("#lag-chart path.lag"))
            .await
            .expect("the chart draws this minute's lag");
        let summary = op.text("#lag-summary").await;
        assert!(summary.starts_with("Lag "), "{summary}");
        op.shot("group-lag.png").await;
        op.wait_for_text(&format!("{base}{group}"), "#shipper-throughput", |t| {
            t == idle
        })
        .await;
        eprintln!(
            "reports seen idle, busy, idle in {:.1?}",
            reported.elapsed()
        );
        op.quit().await;
        eprintln!("operator session: {:.1?}", started.elapsed());

        // The read-only user, by password.
        let started = Instant::now();
        let ro = Browser::start(&dir.join("home-viewer"), &rpki.join("ca.crt"), None).await;
        ro.c().goto(&format!("{base}/")).await.unwrap();
        ro.c()
            .wait()
            .for_element(Locator::Css("#password"))
            .await
            .unwrap();
        ro.shot("login.png").await;
        ro.c()
            .find(Locator::Css("#name"))
            .await
            .unwrap()
            .send_keys("viewer")
            .await
            .unwrap();
        ro.c()
            .find(Locator::Css("#password"))
            .await
            .unwrap()
            .send_keys("viewer-pass")
            .await
            .unwrap();
        ro.c()
            .find(Locator::Css("#login"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        assert_eq!(ro.text("#role").await, "read-only");
        ro.c().goto(&format!("{base}{group}")).await.unwrap();
        assert!(
            ro.c().find(Locator::Css("#start-test")).await.is_err(),
            "a read-only user sees a start button"
        );
        ro.shot("group-read-only.png").await;
        // Its own session and token, still refused.
        let csrf = ro
            .c()
            .find(Locator::Css("input[name=csrf]"))
            .await
            .unwrap()
            .attr("value")
            .await
            .unwrap()
            .unwrap();
        let body = format!("point={point}&csrf={csrf}");
        assert_eq!(
            ro.post(&format!("{group}/test-failover"), &body, false)
                .await,
            403
        );
        ro.quit().await;
        eprintln!("read-only session: {:.1?}", started.elapsed());
    });
    let audit = fs::read_to_string(data_dir.join(".console/audit.log")).unwrap();
    assert!(
        audit.contains("user=alice\trole=operator") && audit.contains("test-failover start"),
        "{audit}"
    );
    assert!(audit.contains("test-failover cleanup"), "{audit}");
    drop(tracker);
}
