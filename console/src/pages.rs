//! The routes: each reads the session, asks the store or the library,
//! and renders a template. Decisions are in [`crate::auth`] and
//! [`crate::view`]; what changes state is in the receiver library.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use askama::Template;
use axum::extract::{ConnectInfo, Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use rand::RngCore;
use serde::Deserialize;
use tidemark_changelog::Seq;
use tidemark_config::{ConsoleRole, ConsoleUser, ReceiverConfig};
use tidemark_names::{Label, Name};
use tidemark_receiver::jobs::{JobId, JobKind, JobState};
use tidemark_receiver::span_take::{self, TakeRequest};
use tidemark_receiver::store::StoreEngine;
use tidemark_receiver::test_failover::nbd::ServedTestFailover;

use crate::audit::Audit;
use crate::auth::{Change, Principal, Proof, Refused, Sessions};
use crate::throttle::LoginThrottle;
use crate::tls::ConsolePeer;
use crate::view::{self, size, GroupRow, JobRow, PointRow, ShipperRow};
use tidemark_receiver::shipper_reports::ShipperReports;

/// How often expired sessions and old login failures are swept.
pub(crate) const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The session cookie: `__Host-` so it is only ever set by this origin
/// over HTTPS, for every path.
const COOKIE: &str = "__Host-tidemark-session";

pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hashes `password` as the console's configuration wants it: an
/// argon2id PHC string with a random salt.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt)?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

fn password_matches(password: &str, hash: &str) -> bool {
    use argon2::password_hash::{PasswordHash, PasswordVerifier};
    PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// A test failover started from the console.
struct RunningTest {
    served: ServedTestFailover,
    by: String,
    started_ns: u64,
    /// Its job in the registry.
    job: JobId,
}

/// What every request shares.
pub(crate) struct Console {
    /// The receiver's configuration (spans, store) for the actions.
    receiver: ReceiverConfig,
    data_dir: PathBuf,
    engine: Box<dyn StoreEngine>,
    users: Vec<ConsoleUser>,
    hosts: Vec<Name>,
    sessions: Mutex<Sessions>,
    /// Failed password logins, per address and per name.
    throttle: Mutex<LoginThrottle>,
    tests: Mutex<BTreeMap<(Name, Name), RunningTest>>,
    audit: Audit,
    /// What the shippers reported (filled by the receiver's sessions),
    /// and the job registry.
    reports: Arc<ShipperReports>,
    /// Turns true when the console stops: live streams end then, or the
    /// server's graceful shutdown would wait for them forever.
    shutdown: tokio::sync::watch::Sender<bool>,
}

pub(crate) type Shared = Arc<Console>;

impl Console {
    pub(crate) fn new(
        cfg: &ReceiverConfig,
        engine: Box<dyn StoreEngine>,
        reports: Arc<ShipperReports>,
    ) -> Shared {
        Arc::new(Console {
            receiver: cfg.clone(),
            data_dir: cfg.data_dir.clone(),
            engine,
            users: cfg.console.users.clone(),
            hosts: cfg.hosts.iter().map(|h| h.name.clone()).collect(),
            sessions: Mutex::new(Sessions::new()),
            throttle: Mutex::new(LoginThrottle::new()),
            tests: Mutex::new(BTreeMap::new()),
            audit: Audit::new(&cfg.data_dir),
            reports,
            shutdown: tokio::sync::watch::channel(false).0,
        })
    }

    /// Ends the live streams (at shutdown).
    pub(crate) fn stop_streams(&self) {
        self.shutdown.send_replace(true);
    }

    fn jobs(&self) -> &tidemark_receiver::jobs::JobRegistry {
        self.reports.jobs()
    }

    /// Ends every test failover the console started (at shutdown).
    pub(crate) async fn end_all(&self) {
        let tests: Vec<_> =
            std::mem::take(&mut *self.tests.lock().unwrap_or_else(|e| e.into_inner()))
                .into_values()
                .collect();
        let jobs = self.reports.jobs().clone();
        for t in tests {
            let jobs = jobs.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let ended = t.served.end();
                let reason = match &ended {
                    Ok(()) => "ended when the console stopped".to_string(),
                    Err(e) => format!("ended when the console stopped: {}", error_chain(e)),
                };
                jobs.end(t.job, JobState::Interrupted(reason), now_ns());
            })
            .await;
        }
        let _ = tokio::task::spawn_blocking(move || jobs.flush(now_ns())).await;
    }

    /// The hosts: the configured ones and those with replicas.
    fn hosts(&self) -> Vec<Name> {
        let mut hosts = self.hosts.clone();
        if let Ok(entries) = std::fs::read_dir(&self.data_dir) {
            for e in entries.flatten() {
                if let Ok(name) = Name::new(e.file_name().to_string_lossy().into_owned()) {
                    if !hosts.contains(&name) && e.path().is_dir() {
                        hosts.push(name);
                    }
                }
            }
        }
        hosts.sort();
        hosts
    }

    fn overview(&self, now: u64) -> Vec<(GroupRow, Option<ShipperRow>)> {
        let mut rows = Vec::new();
        for host in self.hosts() {
            let groups = match self.engine.groups(&host) {
                Ok(g) => g,
                Err(e) => {
                    let row = GroupRow::unreadable(host.as_ref(), "-", error_chain(&e));
                    rows.push((row, None));
                    continue;
                }
            };
            for group in groups {
                let shipper = ShipperRow::new(self.reports.latest(&host, &group).as_ref(), now);
                let row = match self.engine.open_read_only(&host, &group) {
                    Ok(g) => GroupRow::new(
                        host.as_ref(),
                        group.as_ref(),
                        &g.position().state,
                        &g.points(),
                        now,
                    ),
                    Err(e) => GroupRow::unreadable(host.as_ref(), group.as_ref(), error_chain(&e)),
                };
                rows.push((row, shipper));
            }
        }
        rows
    }

    /// The span whose member `host`/`group` is, in this receiver's
    /// configuration.
    fn span_of(&self, host: &Name, group: &Name) -> Option<Name> {
        self.receiver
            .spans
            .iter()
            .find(|s| {
                s.members
                    .iter()
                    .any(|m| &m.host == host && &m.group == group)
            })
            .map(|s| s.name.clone())
    }

    fn socket(&self, host: &Name, group: &Name) -> PathBuf {
        crate::console_dir(&self.data_dir).join(format!("{host}-{group}.sock"))
    }
}

impl Console {
    /// Ends the expired sessions and forgets old login failures (driven
    /// every [`SWEEP_EVERY`] by [`crate::BoundConsole::serve`]).
    pub(crate) fn sweep(&self, now_ns: u64) {
        self.lock_sessions().poll_expired(now_ns);
        self.lock_throttle().poll_expired(now_ns);
    }

    /// Opens a session; logs the one ended to stay within the bound.
    fn open_session(&self, principal: Principal, id: String, csrf: String, now_ns: u64) {
        let evicted = self
            .lock_sessions()
            .handle_login(principal, id, csrf, now_ns);
        if let Some(p) = evicted {
            tracing::warn!(
                user = %p.name,
                max = crate::auth::MAX_SESSIONS,
                "console: too many sessions: the one idle for longest is ended"
            );
        }
    }

    fn lock_throttle(&self) -> std::sync::MutexGuard<'_, LoginThrottle> {
        self.throttle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_tests(&self) -> std::sync::MutexGuard<'_, BTreeMap<(Name, Name), RunningTest>> {
        self.tests.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An error and its causes, one line (as the receiver logs them).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    tidemark_receiver::store_health::chain(e)
}

pub(crate) fn router(state: Shared) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/group/{host}/{group}", get(group_page))
        .route("/group/{host}/{group}/test-failover", post(start_test))
        .route(
            "/group/{host}/{group}/test-failover/cleanup",
            post(cleanup_test),
        )
        .route("/group/{host}/{group}/mark", post(mark_point))
        .route("/test-failovers", get(tests_page))
        .route("/jobs", get(jobs_page))
        .route("/jobs/events", get(job_events))
        .with_state(state)
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn set_cookie(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{COOKIE}={id}; Secure; HttpOnly; SameSite=Strict; Path=/"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The layout's facts about the user.
struct Who {
    principal: Principal,
    csrf: String,
    new_cookie: Option<HeaderValue>,
}

impl Who {
    fn operator(&self) -> bool {
        self.principal.role >= ConsoleRole::Operator
    }
}

/// The session of a reading request: the cookie's, else a new one for an
/// admin certificate's holder (a certificate logs in by itself).
fn reader(state: &Console, headers: &HeaderMap, peer: &ConsolePeer) -> Option<Who> {
    let now = now_ns();
    let mut sessions = state.lock_sessions();
    if let Ok(s) = sessions.check(cookie(headers), now) {
        return Some(Who {
            principal: s.principal.clone(),
            csrf: s.csrf.clone(),
            new_cookie: None,
        });
    }
    let admin = peer.admin.as_ref()?;
    let principal = Principal {
        name: admin.name.clone(),
        role: admin.role,
        proof: Proof::Certificate,
    };
    drop(sessions);
    let (id, csrf) = (random_token(), random_token());
    state.open_session(principal.clone(), id.clone(), csrf.clone(), now);
    tracing::info!(user = %principal.name, role = %principal.role, "console: certificate login");
    Some(Who {
        principal,
        csrf,
        new_cookie: Some(set_cookie(&id)),
    })
}

fn page(who: Option<&Who>, body: Result<String, askama::Error>) -> Response {
    match body {
        Ok(html) => {
            let mut resp = Html(html).into_response();
            if let Some(c) = who.and_then(|w| w.new_cookie.clone()) {
                resp.headers_mut().insert(header::SET_COOKIE, c);
            }
            resp
        }
        Err(e) => {
            tracing::error!(error = %e, "console: rendering a page");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

fn refused(reason: Refused) -> Response {
    // Every refusal is a 403: the request is not carried out.
    let status = StatusCode::FORBIDDEN;
    let body = ErrorPage {
        title: "Refused",
        message: reason.to_string(),
    }
    .render()
    .unwrap_or_else(|_| reason.to_string());
    (status, Html(body)).into_response()
}

/// The console's own origin for this request: `https://` and the Host
/// the browser addressed (what a same-origin request's `Origin` says).
fn console_origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    format!("https://{host}")
}

/// Checks a state-changing request; the session's principal if allowed.
fn changer(
    state: &Console,
    headers: &HeaderMap,
    csrf: Option<&str>,
    needs: ConsoleRole,
) -> Result<Principal, Refused> {
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let request = Change {
        session: cookie(headers),
        csrf,
        origin: header(header::ORIGIN),
        referer: header(header::REFERER),
    };
    let origin = console_origin(headers);
    let mut sessions = state.lock_sessions();
    let refused = match sessions.check_change(&request, &origin, needs, now_ns()) {
        Ok(s) => return Ok(s.principal.clone()),
        Err(r) => r,
    };
    tracing::warn!(reason = %refused, "console: a state-changing request refused");
    Err(refused)
}

// ---------------------------------------------------------------- pages

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    title: &'static str,
    message: String,
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    error: Option<String>,
    password_users: bool,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage<'a> {
    who: &'a Who,
    rows: Vec<(GroupRow, Option<ShipperRow>)>,
    tests: usize,
}

struct DiskRow {
    name: String,
    size: String,
}

struct TestRow {
    host: String,
    group: String,
    seq: u64,
    by: String,
    started: String,
    uris: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "group.html")]
struct GroupPage<'a> {
    who: &'a Who,
    host: String,
    group: String,
    row: GroupRow,
    shipper: Option<ShipperRow>,
    /// The 24 h lag chart (inline SVG made by [`crate::chart::lag_chart`])
    /// and its text summary.
    chart: String,
    summary: String,
    disks: Vec<DiskRow>,
    points: Vec<PointRow>,
    test: Option<TestRow>,
    /// The span the group is a member of (a point can be marked from
    /// here only through a span's coordinator).
    span: Option<String>,
}

#[derive(Template)]
#[template(path = "done.html")]
struct DonePage {
    title: &'static str,
    message: String,
    back: String,
}

#[derive(Template)]
#[template(path = "tests.html")]
struct TestsPage<'a> {
    who: &'a Who,
    tests: Vec<TestRow>,
}

fn test_row(host: &Name, group: &Name, t: &RunningTest) -> TestRow {
    TestRow {
        host: host.to_string(),
        group: group.to_string(),
        seq: t.served.seq().0,
        by: t.by.clone(),
        started: view::utc(t.started_ns),
        uris: t
            .served
            .disks()
            .iter()
            .map(|d| (d.name.to_string(), t.served.uri(d)))
            .collect(),
    }
}

async fn overview(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<ConsolePeer>,
    headers: HeaderMap,
) -> Response {
    let Some(who) = reader(&state, &headers, &peer) else {
        return Redirect::to("/login").into_response();
    };
    let st = state.clone();
    let rows = tokio::task::spawn_blocking(move || st.overview(now_ns()))
        .await
        .unwrap_or_default();
    let tests = state.lock_tests().len();
    page(
        Some(&who),
        OverviewPage {
            who: &who,
            rows,
            tests,
        }
        .render(),
    )
}

async fn login_page(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<ConsolePeer>,
    headers: HeaderMap,
) -> Response {
    if let Some(who) = reader(&state, &headers, &peer) {
        let mut resp = Redirect::to("/").into_response();
        if let Some(c) = who.new_cookie {
            resp.headers_mut().insert(header::SET_COOKIE, c);
        }
        return resp;
    }
    page(
        None,
        LoginPage {
            error: None,
            password_users: !state.users.is_empty(),
        }
        .render(),
    )
}

#[derive(Deserialize)]
struct LoginForm {
    name: String,
    password: String,
}

async fn login(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<ConsolePeer>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    // Login CSRF: a login form posted from another site is refused too.
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    if origin != Some(console_origin(&headers).as_str()) {
        return refused(Refused::Origin);
    }
    let address = peer.addr.ip();
    // A locked-out client is answered before any password is hashed.
    if let Err(locked) = state.lock_throttle().check(address, &form.name, now_ns()) {
        let user = crate::throttle::name_key(&form.name);
        tracing::warn!(user, %address, "console: a password login refused: locked out");
        return locked_out(locked);
    }
    let user = state
        .users
        .iter()
        .find(|u| u.name.as_ref() == form.name)
        .cloned();
    let checked = match user {
        Some(u) => {
            let hash = u.password_hash.clone();
            let password = form.password.clone();
            tokio::task::spawn_blocking(move || password_matches(&password, &hash).then_some(u))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    let Some(user) = checked else {
        let user = crate::throttle::name_key(&form.name);
        tracing::warn!(user, %address, "console: a password login failed");
        let now = now_ns();
        let lockout = state
            .lock_throttle()
            .handle_failure(address, &form.name, now);
        if let Some(l) = lockout {
            let failures = l.address_failures.max(l.name_failures);
            let name = crate::throttle::name_key(&form.name);
            state
                .audit
                .record_lockout(name, address, failures, l.retry_after, now);
            return locked_out(crate::throttle::LockedOut {
                retry_after: l.retry_after,
            });
        }
        let body = LoginPage {
            error: Some("wrong name or password".into()),
            password_users: true,
        }
        .render();
        let mut resp = page(None, body);
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        return resp;
    };
    state.lock_throttle().handle_success(address, &form.name);
    let principal = Principal {
        name: user.name.to_string(),
        role: user.role,
        proof: Proof::Password,
    };
    let id = random_token();
    tracing::info!(user = %principal.name, role = %principal.role, "console: password login");
    state.open_session(principal, id.clone(), random_token(), now_ns());
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, set_cookie(&id));
    resp
}

/// 429 with the login page saying how long to wait, and `Retry-After`.
fn locked_out(locked: crate::throttle::LockedOut) -> Response {
    let secs = locked.retry_after.as_secs().max(1);
    let body = LoginPage {
        error: Some(locked.to_string()),
        password_users: true,
    }
    .render();
    let mut resp = page(None, body);
    *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

#[derive(Deserialize)]
struct ActionForm {
    csrf: Option<String>,
    point: Option<u64>,
}

async fn logout(
    State(state): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<ActionForm>,
) -> Response {
    if let Err(r) = changer(
        &state,
        &headers,
        form.csrf.as_deref(),
        ConsoleRole::ReadOnly,
    ) {
        return refused(r);
    }
    if let Some(id) = cookie(&headers) {
        state.lock_sessions().handle_logout(id);
    }
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "__Host-tidemark-session=; Secure; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        ),
    );
    resp
}

#[derive(Deserialize)]
struct PointQuery {
    point: Option<u64>,
}

fn names(host: &str, group: &str) -> Option<(Name, Name)> {
    Some((Name::new(host).ok()?, Name::new(group).ok()?))
}

/// What every operator action on one group checks first: the session, its
/// CSRF token and origin, and the operator role ([`changer`]), then the
/// group's names. The principal, the names, and `host/group` for the
/// audit trail; else the response that refuses the request.
fn group_action(
    state: &Console,
    headers: &HeaderMap,
    csrf: Option<&str>,
    host: &str,
    group: &str,
) -> Result<(Principal, Name, Name, String), Box<Response>> {
    let who =
        changer(state, headers, csrf, ConsoleRole::Operator).map_err(|r| Box::new(refused(r)))?;
    let Some((h, g)) = names(host, group) else {
        return Err(Box::new(
            (StatusCode::NOT_FOUND, "no such group").into_response(),
        ));
    };
    let target = format!("{h}/{g}");
    Ok((who, h, g, target))
}

async fn group_page(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<ConsolePeer>,
    headers: HeaderMap,
    Path((host, group)): Path<(String, String)>,
    Query(q): Query<PointQuery>,
) -> Response {
    let Some(who) = reader(&state, &headers, &peer) else {
        return Redirect::to("/login").into_response();
    };
    let Some((h, g)) = names(&host, &group) else {
        return (StatusCode::NOT_FOUND, "no such group").into_response();
    };
    let st = state.clone();
    let (hh, gg) = (h.clone(), g.clone());
    let read = tokio::task::spawn_blocking(move || {
        let now = now_ns();
        match st.engine.open_read_only(&hh, &gg) {
            Ok(store) => {
                let points = store.points();
                let row = GroupRow::new(
                    hh.as_ref(),
                    gg.as_ref(),
                    &store.position().state,
                    &points,
                    now,
                );
                let disks = store
                    .disks()
                    .iter()
                    .map(|d| DiskRow {
                        name: d.name.to_string(),
                        size: size(d.size),
                    })
                    .collect();
                Some((row, disks, view::timeline(&points, q.point, now), now))
            }
            Err(_) if !st.engine.exists(&hh, &gg) => None,
            Err(e) => Some((
                GroupRow::unreadable(hh.as_ref(), gg.as_ref(), error_chain(&e)),
                Vec::new(),
                Vec::new(),
                now,
            )),
        }
    })
    .await
    .ok()
    .flatten();
    let Some((row, disks, points, now)) = read else {
        return (StatusCode::NOT_FOUND, "no such group").into_response();
    };
    let shipper = ShipperRow::new(state.reports.latest(&h, &g).as_ref(), now);
    let st = state.clone();
    let (hh, gg) = (h.clone(), g.clone());
    let slots = tokio::task::spawn_blocking(move || st.reports.lag_history(&hh, &gg, now))
        .await
        .unwrap_or_default();
    let chart = crate::chart::lag_chart(&slots, now, 720, 180);
    let summary = crate::chart::lag_summary(&slots, now);
    let test = state
        .lock_tests()
        .get(&(h.clone(), g.clone()))
        .map(|t| test_row(&h, &g, t));
    let span = state.span_of(&h, &g).map(|s| s.to_string());
    page(
        Some(&who),
        GroupPage {
            who: &who,
            host,
            group,
            row,
            shipper,
            chart,
            summary,
            disks,
            points,
            test,
            span,
        }
        .render(),
    )
}

async fn tests_page(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<ConsolePeer>,
    headers: HeaderMap,
) -> Response {
    let Some(who) = reader(&state, &headers, &peer) else {
        return Redirect::to("/login").into_response();
    };
    let tests = state
        .lock_tests()
        .iter()
        .map(|((h, g), t)| test_row(h, g, t))
        .collect();
    page(Some(&who), TestsPage { who: &who, tests }.render())
}

#[derive(Template)]
#[template(path = "jobs.html")]
struct JobsPage<'a> {
    who: &'a Who,
    running: Vec<JobRow>,
    finished: Vec<JobRow>,
}

/// The rows of the registry's jobs at `now`, newest first.
fn job_rows(state: &Console, now: u64) -> Vec<JobRow> {
    state
        .jobs()
        .jobs()
        .iter()
        .rev()
        .map(|j| JobRow::new(j, now))
        .collect()
}

async fn jobs_page(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<ConsolePeer>,
    headers: HeaderMap,
) -> Response {
    let Some(who) = reader(&state, &headers, &peer) else {
        return Redirect::to("/login").into_response();
    };
    let (running, finished) = job_rows(&state, now_ns())
        .into_iter()
        .partition(|r| r.state == JobState::Running.word());
    page(
        Some(&who),
        JobsPage {
            who: &who,
            running,
            finished,
        }
        .render(),
    )
}

/// How long the live stream waits after a change before it sends, so a
/// burst of changes (every group's report in the same second) is one
/// event.
const EVENTS_COALESCE: std::time::Duration = std::time::Duration::from_millis(300);
/// How often the live stream sends even without a change (the time left
/// moves with the clock).
const EVENTS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The jobs, live: a server-sent event `jobs` whose data is the JSON of
/// every job's row, at once and after every change of the registry. It
/// needs a session like every page (401 without one: an `EventSource`
/// does not follow a redirect to the login page usefully).
async fn job_events(
    State(state): State<Shared>,
    ConnectInfo(peer): ConnectInfo<ConsolePeer>,
    headers: HeaderMap,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let Some(who) = reader(&state, &headers, &peer) else {
        return (StatusCode::UNAUTHORIZED, "log in first").into_response();
    };
    let changes = state.jobs().watch();
    let stop = state.shutdown.subscribe();
    let stream = futures_util::stream::unfold(
        (state, changes, stop, true),
        |(state, mut changes, mut stop, first)| async move {
            if *stop.borrow() {
                return None;
            }
            if !first {
                tokio::select! {
                    changed = changes.changed() => {
                        changed.ok()?;
                        tokio::time::sleep(EVENTS_COALESCE).await;
                    }
                    _ = tokio::time::sleep(EVENTS_EVERY) => {}
                    // Only `true` is ever sent: any change is the stop.
                    _ = stop.changed() => return None,
                }
            }
            changes.borrow_and_update();
            let rows = job_rows(&state, now_ns());
            let data = serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into());
            let event = Event::default().event("jobs").data(data);
            Some((
                Ok::<_, std::convert::Infallible>(event),
                (state, changes, stop, false),
            ))
        },
    );
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    if let Some(c) = who.new_cookie {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
    resp
}

fn failed(message: String) -> Response {
    let body = ErrorPage {
        title: "The action failed",
        message: message.clone(),
    }
    .render()
    .unwrap_or(message);
    (StatusCode::CONFLICT, Html(body)).into_response()
}

async fn start_test(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((host, group)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let (who, h, g, target) =
        match group_action(&state, &headers, form.csrf.as_deref(), &host, &group) {
            Ok(a) => a,
            Err(r) => return *r,
        };
    let Some(seq) = form.point else {
        return failed("choose a recovery point".into());
    };
    if state.lock_tests().contains_key(&(h.clone(), g.clone())) {
        let outcome = "refused: a test failover of this group is running";
        state
            .audit
            .record(&who, "test-failover start", &target, outcome, now_ns());
        return failed(outcome.into());
    }
    let st = state.clone();
    let (hh, gg) = (h.clone(), g.clone());
    let by = who.name.clone();
    let started = tokio::task::spawn_blocking(move || {
        let job = st
            .jobs()
            .start(JobKind::TestFailover, &hh, &gg, &by, now_ns());
        let started = (|| {
            let socket = st.socket(&hh, &gg);
            tidemark_durable::create_private_dir_all(&crate::console_dir(&st.data_dir))
                .map_err(|e| e.to_string())?;
            let group_dir = tidemark_receiver::daemon::group_dir(&st.data_dir, &hh, &gg);
            ServedTestFailover::start(st.engine.as_ref(), &group_dir, &hh, &gg, Seq(seq), &socket)
                .map_err(|e| error_chain(&e))
        })();
        if let Err(e) = &started {
            st.jobs().end(job, JobState::Failed(e.clone()), now_ns());
        }
        started.map(|served| (served, job))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let now = now_ns();
    match started {
        Ok((served, job)) => {
            state.audit.record(
                &who,
                "test-failover start",
                &target,
                &format!(
                    "started at point {seq}, socket {}",
                    served.socket().display()
                ),
                now,
            );
            state.lock_tests().insert(
                (h, g),
                RunningTest {
                    served,
                    by: who.name.clone(),
                    started_ns: now,
                    job,
                },
            );
            Redirect::to(&format!("/group/{host}/{group}?point={seq}")).into_response()
        }
        Err(e) => {
            state.audit.record(
                &who,
                "test-failover start",
                &target,
                &format!("failed: {e}"),
                now,
            );
            failed(e)
        }
    }
}

async fn cleanup_test(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((host, group)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let (who, h, g, target) =
        match group_action(&state, &headers, form.csrf.as_deref(), &host, &group) {
            Ok(a) => a,
            Err(r) => return *r,
        };
    let Some(test) = state.lock_tests().remove(&(h, g)) else {
        return failed("no test failover of this group was started here".into());
    };
    let st = state.clone();
    let ended = tokio::task::spawn_blocking(move || {
        let ended = test.served.end().map_err(|e| error_chain(&e));
        let end = match &ended {
            Ok(()) => JobState::Done,
            Err(e) => JobState::Failed(format!("cleaning up: {e}")),
        };
        st.jobs().end(test.job, end, now_ns());
        ended
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let outcome = match &ended {
        Ok(()) => "ended: its writes are discarded, nothing of it is left".to_owned(),
        Err(e) => format!("failed: {e}"),
    };
    state
        .audit
        .record(&who, "test-failover cleanup", &target, &outcome, now_ns());
    match ended {
        Ok(()) => Redirect::to(&format!("/group/{host}/{group}")).into_response(),
        Err(e) => failed(e),
    }
}

/// How long "mark a point" waits for the span's coordinator to start the
/// round (it starts one as soon as no other round runs).
const MARK_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

#[derive(Deserialize)]
struct MarkForm {
    csrf: Option<String>,
    label: Option<String>,
    /// A checkbox: present when ticked.
    app_consistent: Option<String>,
}

/// "Mark a point": asks the group's span coordinator for a span point
/// now, as `tidemark span take` does ([`span_take::ask`]): every member's
/// tracker appends a marker with the label, through the hold stream its
/// shipper keeps open to this receiver. A group in no span cannot be
/// marked from the replica site: its tracker is reached only on its host
/// (`tidemark mark`).
async fn mark_point(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path((host, group)): Path<(String, String)>,
    Form(form): Form<MarkForm>,
) -> Response {
    let (who, h, g, target) =
        match group_action(&state, &headers, form.csrf.as_deref(), &host, &group) {
            Ok(a) => a,
            Err(r) => return *r,
        };
    let label = match Label::new(form.label.unwrap_or_default().trim()) {
        Ok(l) => l,
        Err(e) => {
            let outcome = format!("refused: the label: {e}");
            state
                .audit
                .record(&who, "mark", &target, &outcome, now_ns());
            return failed(outcome);
        }
    };
    let Some(span) = state.span_of(&h, &g) else {
        let outcome = format!(
            "refused: {target} is in no span, so this receiver cannot reach its tracker: run `tidemark mark {label}` on the protected host"
        );
        state
            .audit
            .record(&who, "mark", &target, &outcome, now_ns());
        return failed(outcome);
    };
    let app_consistent = form.app_consistent.is_some();
    let request = TakeRequest {
        id: now_ns(),
        label: label.clone(),
        app_consistent,
    };
    let st = state.clone();
    let sp = span.clone();
    let asked = tokio::task::spawn_blocking(move || {
        span_take::ask(&st.receiver, st.engine.as_ref(), &sp, &request, MARK_WAIT)
            .map_err(|e| error_chain(&e))
    })
    .await
    .unwrap_or_else(|e| Err(e.to_string()));
    let kind = if app_consistent {
        "application-consistent"
    } else {
        "crash-consistent"
    };
    match asked {
        Ok(point) => {
            let outcome =
                format!("span point {point} of span {span} started ({kind}, label {label})");
            state
                .audit
                .record(&who, "mark", &target, &outcome, now_ns());
            let body = DonePage {
                title: "Marking a point",
                message: format!(
                    "Span point {point} of span {span} is being taken ({kind}): every member's tracker appends a marker labelled {label}. It shows among the recovery points once every member's replica holds it."
                ),
                back: format!("/group/{host}/{group}"),
            }
            .render();
            page(None, body)
        }
        Err(e) => {
            state
                .audit
                .record(&who, "mark", &target, &format!("failed: {e}"), now_ns());
            failed(e)
        }
    }
}

#[cfg(test)]
#[path = "pages_tests.rs"]
mod tests;
