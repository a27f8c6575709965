//! The routes driven in-process, as a browser would call them (cookies,
//! `Origin`, form bodies, the client's address), without a browser or
//! TLS: the login throttle, the session bound, and "mark a point"
//! refused without a CSRF token or for a read-only user, done for an
//! operator and audited.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request};
use tidemark_changelog::DiskId;
use tidemark_config::{ConsoleRole, ConsoleUser, ReceiverConfig, SpanEntry, SpanMember};
use tidemark_names::Name;
use tidemark_receiver::jobs::JobKind;
use tidemark_receiver::store::{Disk, LocalEngine, StoreEngine};
use tower::ServiceExt;

use super::*;
use crate::auth::MAX_SESSIONS;
use crate::throttle::FREE_FAILURES;
use crate::tls::CertAdmin;

const HOST: &str = "console.test:8443";
const ORIGIN: &str = "https://console.test:8443";

/// An argon2id hash with the smallest parameters, so a test checks
/// passwords quickly (the parameters are read from the hash).
fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"sixteen-byte-slt").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

fn name(s: &str) -> Name {
    Name::new(s).unwrap()
}

/// A console over `data_dir` with users `ops` (operator, password
/// `right`) and `viewer` (read-only, password `look`), and span `erp`
/// of db1/default and db2/default.
fn console(data_dir: &Path) -> Shared {
    let mut cfg = ReceiverConfig {
        data_dir: data_dir.to_path_buf(),
        ..ReceiverConfig::default()
    };
    cfg.console.users = vec![
        ConsoleUser {
            name: name("ops"),
            role: ConsoleRole::Operator,
            password_hash: cheap_hash("right"),
        },
        ConsoleUser {
            name: name("viewer"),
            role: ConsoleRole::ReadOnly,
            password_hash: cheap_hash("look"),
        },
    ];
    cfg.spans = vec![SpanEntry {
        name: name("erp"),
        members: ["db1", "db2"]
            .iter()
            .map(|h| SpanMember {
                host: name(h),
                group: name("default"),
            })
            .collect(),
        interval: tidemark_config::Duration(Duration::from_secs(15)),
        target: tidemark_config::Duration(Duration::from_secs(60)),
        app_consistent_every: None,
    }];
    let engine = LocalEngine::new(data_dir);
    for host in ["db1", "db3"] {
        let mut g = engine.open(&name(host), &name("default")).unwrap();
        g.ensure_disks(&[Disk {
            id: DiskId(0),
            name: name("sda"),
            size: 1 << 20,
        }])
        .unwrap();
        g.commit().unwrap();
    }
    let reports = tidemark_receiver::shipper_reports::ShipperReports::new(data_dir);
    Console::new(&cfg, Box::new(engine), reports)
}

/// What a request brings.
#[derive(Default)]
struct Ask<'a> {
    cookie: Option<&'a str>,
    form: Option<&'a str>,
    from: Option<IpAddr>,
    admin: Option<(&'a str, ConsoleRole)>,
    no_origin: bool,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    /// The session id the answer sets.
    fn cookie(&self) -> String {
        let set = self.headers[header::SET_COOKIE].to_str().unwrap();
        let value = set.strip_prefix(&format!("{COOKIE}=")).unwrap();
        value.split(';').next().unwrap().to_owned()
    }

    /// The CSRF token in the page's forms.
    fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("a form");
        let rest = &self.body[at + "name=\"csrf\" value=\"".len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
}

async fn send(state: &Shared, method: Method, uri: &str, ask: Ask<'_>) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::HOST, HOST);
    if !ask.no_origin {
        req = req.header(header::ORIGIN, ORIGIN);
    }
    if let Some(c) = ask.cookie {
        req = req.header(header::COOKIE, format!("{COOKIE}={c}"));
    }
    let body = match ask.form {
        Some(f) => {
            req = req.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            Body::from(f.to_owned())
        }
        None => Body::empty(),
    };
    let mut req = req.body(body).unwrap();
    let peer = ConsolePeer {
        addr: SocketAddr::new(
            ask.from.unwrap_or(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
            50000,
        ),
        admin: ask.admin.map(|(name, role)| CertAdmin {
            name: name.to_owned(),
            role,
        }),
    };
    req.extensions_mut().insert(ConnectInfo(peer));
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn login(state: &Shared, user: &str, password: &str) -> Answer {
    let form = format!("name={user}&password={password}");
    send(
        state,
        Method::POST,
        "/login",
        Ask {
            form: Some(&form),
            ..Ask::default()
        },
    )
    .await
}

fn audit(data_dir: &Path) -> String {
    std::fs::read_to_string(data_dir.join(crate::audit::AUDIT_FILE)).unwrap_or_default()
}

#[tokio::test]
async fn failed_logins_get_429_after_the_free_ones_and_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let state = console(dir.path());
    for _ in 0..FREE_FAILURES {
        let a = login(&state, "ops", "wrong").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert!(a.body.contains("wrong name or password"));
    }
    let a = login(&state, "ops", "wrong").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        a.body.contains("too many failed logins; try again in 2 s"),
        "{}",
        a.body
    );
    assert_eq!(a.headers[header::RETRY_AFTER], "2");
    // Locked out: even the right password is not checked now.
    let a = login(&state, "ops", "right").await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(!a.headers.contains_key(header::SET_COOKIE));
    let trail = audit(dir.path());
    assert!(
        trail.contains("user=ops\trole=-\tproof=Password\taction=login lockout\ttarget=192.0.2.1\toutcome=locked out for 2 s after 6 failed logins"),
        "{trail}"
    );
}

#[tokio::test]
async fn a_successful_login_starts_the_count_again() {
    let dir = tempfile::tempdir().unwrap();
    let state = console(dir.path());
    for _ in 0..FREE_FAILURES - 1 {
        assert_eq!(
            login(&state, "ops", "wrong").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let a = login(&state, "ops", "right").await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert!(!a.cookie().is_empty());
    for _ in 0..FREE_FAILURES {
        assert_eq!(
            login(&state, "ops", "wrong").await.status,
            StatusCode::UNAUTHORIZED,
            "the count started again at the success"
        );
    }
    assert_eq!(
        login(&state, "ops", "wrong").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn a_flood_of_certificate_logins_keeps_the_sessions_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let state = console(dir.path());
    let first = send(
        &state,
        Method::GET,
        "/login",
        Ask {
            admin: Some(("alice", ConsoleRole::ReadOnly)),
            ..Ask::default()
        },
    )
    .await;
    let first = first.cookie();
    // A client presenting its certificate and never keeping the cookie
    // gets a session per request.
    for _ in 0..MAX_SESSIONS + 20 {
        let a = send(
            &state,
            Method::GET,
            "/login",
            Ask {
                admin: Some(("script", ConsoleRole::ReadOnly)),
                ..Ask::default()
            },
        )
        .await;
        assert_eq!(a.status, StatusCode::SEE_OTHER);
    }
    assert_eq!(state.lock_sessions().len(), MAX_SESSIONS);
    assert!(
        state.lock_sessions().check(Some(&first), now_ns()).is_err(),
        "the idlest session was ended"
    );
    // Expired sessions are swept without a request to find them.
    state.sweep(now_ns() + crate::auth::IDLE_TIMEOUT.as_nanos() as u64 + 1);
    assert_eq!(state.lock_sessions().len(), 0);
}

/// Logs `user` in; its session id and the CSRF token of the group
/// page of db1/default, and that page.
async fn session(state: &Shared, user: &str, password: &str) -> (String, String, Answer) {
    let id = login(state, user, password).await.cookie();
    let page = send(
        state,
        Method::GET,
        "/group/db1/default",
        Ask {
            cookie: Some(&id),
            ..Ask::default()
        },
    )
    .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    (id, page.csrf(), page)
}

async fn mark(state: &Shared, group: &str, id: &str, form: &str) -> Answer {
    send(
        state,
        Method::POST,
        &format!("/group/{group}/mark"),
        Ask {
            cookie: Some(id),
            form: Some(form),
            ..Ask::default()
        },
    )
    .await
}

#[tokio::test]
async fn marking_a_point_needs_the_token_and_the_operator_role() {
    let dir = tempfile::tempdir().unwrap();
    let state = console(dir.path());
    let span_dir = dir.path().join("spans/erp");

    let (viewer, viewer_csrf, page) = session(&state, "viewer", "look").await;
    assert!(
        !page.body.contains("id=\"mark\""),
        "no button for read-only"
    );
    assert!(page
        .body
        .contains("Marking a point needs the operator role"));
    let a = mark(
        &state,
        "db1/default",
        &viewer,
        &format!("csrf={viewer_csrf}&label=x"),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("your role does not allow this"));

    let (ops, ops_csrf, page) = session(&state, "ops", "right").await;
    assert!(page.body.contains("id=\"mark\""), "{}", page.body);
    let a = mark(&state, "db1/default", &ops, "label=before-upgrade").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(a.body.contains("CSRF token is missing or wrong"));
    let a = mark(
        &state,
        "db1/default",
        &ops,
        "csrf=0000&label=before-upgrade",
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let a = send(
        &state,
        Method::POST,
        "/group/db1/default/mark",
        Ask {
            cookie: Some(&ops),
            form: Some(&format!("csrf={ops_csrf}&label=before-upgrade")),
            no_origin: true,
            ..Ask::default()
        },
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "no Origin nor Referer");

    assert!(
        !span_dir.join(span_take::REQUEST).exists(),
        "no refused request reached the coordinator"
    );
    assert!(!audit(dir.path()).contains("action=mark"));
}

#[tokio::test]
async fn an_operator_marks_a_point_through_the_spans_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let state = console(dir.path());
    let span_dir = dir.path().join("spans/erp");
    let (ops, csrf, _) = session(&state, "ops", "right").await;

    // The span's coordinator, as the receiver's runs it: it answers the
    // request left in the span's directory with the point it starts.
    let coordinator = {
        let span_dir = span_dir.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(r)) = span_take::read_request(&span_dir) {
                    let answer = span_take::TakeResult {
                        id: r.id,
                        result: Ok(12),
                    };
                    span_take::write_result(&span_dir, &answer).unwrap();
                    return Some(r);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
    };
    let a = mark(
        &state,
        "db1/default",
        &ops,
        &format!("csrf={csrf}&label=before-upgrade&app_consistent=yes"),
    )
    .await;
    let asked = coordinator.join().unwrap().expect("a request");
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(
        a.body
            .contains("Span point 12 of span erp is being taken (application-consistent)"),
        "{}",
        a.body
    );
    assert_eq!(asked.label.as_str(), "before-upgrade");
    assert!(asked.app_consistent);
    let trail = audit(dir.path());
    assert!(
        trail.contains("user=ops\trole=operator\tproof=Password\taction=mark\ttarget=db1/default\toutcome=span point 12 of span erp started (application-consistent, label before-upgrade)"),
        "{trail}"
    );

    // A group in no span: refused with what to do instead, and audited.
    let a = mark(&state, "db3/default", &ops, &format!("csrf={csrf}&label=x")).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(
        a.body
            .contains("run `tidemark mark x` on the protected host"),
        "{}",
        a.body
    );
    assert!(audit(dir.path())
        .contains("target=db3/default\toutcome=refused: db3/default is in no span"));

    // A label that is not one word: refused before anything is asked.
    let a = mark(
        &state,
        "db1/default",
        &ops,
        &format!("csrf={csrf}&label=two+words"),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.body.contains("the label"), "{}", a.body);
}

#[tokio::test]
async fn the_jobs_page_and_its_live_stream_need_a_session_and_show_the_registry() {
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let state = console(dir.path());

    // Without a session: the page sends to the login page, the stream
    // is refused outright.
    let a = send(&state, Method::GET, "/jobs", Ask::default()).await;
    assert_eq!(a.status, StatusCode::SEE_OTHER);
    assert_eq!(a.headers[header::LOCATION], "/login");
    let a = send(&state, Method::GET, "/jobs/events", Ask::default()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = send(
        &state,
        Method::GET,
        "/jobs/events",
        Ask {
            cookie: Some("not-a-session"),
            ..Ask::default()
        },
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    // A test failover of a point the group does not have: refused to a
    // read-only user (no job), failed for an operator (a failed job
    // naming why).
    let (viewer, viewer_csrf, _) = session(&state, "viewer", "look").await;
    let a = send(
        &state,
        Method::POST,
        "/group/db1/default/test-failover",
        Ask {
            cookie: Some(&viewer),
            form: Some(&format!("csrf={viewer_csrf}&point=999")),
            ..Ask::default()
        },
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert!(
        state.jobs().jobs().is_empty(),
        "a refused request is no job"
    );
    let (ops, csrf, _) = session(&state, "ops", "right").await;
    let a = send(
        &state,
        Method::POST,
        "/group/db1/default/test-failover",
        Ask {
            cookie: Some(&ops),
            form: Some(&format!("csrf={csrf}&point=999")),
            ..Ask::default()
        },
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT, "{}", a.body);
    let jobs = state.jobs().jobs();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].kind, JobKind::TestFailover);
    assert_eq!(jobs[0].by, "ops");
    assert_eq!(jobs[0].state.word(), "failed");
    assert!(!jobs[0].state.reason().is_empty());

    // A sync the shipper reports, half done.
    let report = tidemark_wire::StatusReport {
        state: tidemark_wire::ReportState::InitialSync,
        reason: String::new(),
        pending_records: 0,
        pending_bytes: 0,
        lag_ms: 0,
        wire_bytes_per_sec: 0,
        record_bytes_per_sec: 0,
        sync: tidemark_wire::Progress {
            done: 512 << 10,
            total: 1 << 20,
        },
        sync_bytes_per_sec: 0,
        resync: tidemark_wire::Progress::default(),
    };
    state
        .reports
        .handle_report(&name("db3"), &name("default"), report, now_ns());

    let page = send(
        &state,
        Method::GET,
        "/jobs",
        Ask {
            cookie: Some(&viewer),
            ..Ask::default()
        },
    )
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body
            .contains("id=\"job-2-bar\" value=\"50\" max=\"100\""),
        "{}",
        page.body
    );
    assert!(page.body.contains("512.0 KiB of 1.0 MiB"), "{}", page.body);
    assert!(page.body.contains("#1 test failover"), "{}", page.body);
    assert!(page.body.contains("new EventSource('/jobs/events')"));

    // The stream: the rows at once, then again after a change.
    let resp = router(state.clone())
        .oneshot({
            let mut req = Request::builder()
                .uri("/jobs/events")
                .header(header::HOST, HOST)
                .header(header::COOKIE, format!("{COOKIE}={viewer}"))
                .body(Body::empty())
                .unwrap();
            req.extensions_mut().insert(ConnectInfo(ConsolePeer {
                addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 50000),
                admin: None,
            }));
            req
        })
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body().into_data_stream();
    let first = body.next().await.unwrap().unwrap();
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(first.starts_with("event: jobs\ndata: ["), "{first}");
    assert!(first.contains("\"percent\":50"), "{first}");
    let sync = state.jobs().jobs()[1].id;
    state.jobs().progress(sync, 1 << 20, 1 << 20, now_ns());
    let next = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .expect("an event after the change")
        .unwrap()
        .unwrap();
    let next = String::from_utf8_lossy(&next).into_owned();
    assert!(next.contains("\"percent\":100"), "{next}");
    // The console stopping ends the stream.
    state.stop_streams();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    assert!(end.is_ok(), "the stream ends when the console stops");
}
