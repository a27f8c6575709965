//! Who is using the console and what they may do: the sessions, their
//! CSRF tokens, and the checks every request passes. Pure: no sockets, no
//! clock (`now` is passed in), no randomness of its own (ids and tokens
//! are given by the shell), so every rule is tested here.
//!
//! A session is made at login, by a password or by an admin certificate
//! (the certificate alone never authorizes a change: a browser sends it
//! cross-site too). A state-changing request needs all of: a live session
//! (its cookie), the session's CSRF token in the form, an `Origin` (else
//! `Referer`) of the console itself, and the operator role.

use std::collections::HashMap;
use std::time::Duration;

use subtle::ConstantTimeEq;
use tidemark_config::ConsoleRole;

/// A session ends after this long without a request.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after login whatever happens.
pub const ABSOLUTE_TIMEOUT: Duration = Duration::from_secs(12 * 60 * 60);
/// At most this many sessions are live: a login beyond it ends the
/// session idle for longest, so a flood of logins (a script presenting an
/// admin certificate without keeping the cookie) cannot grow memory
/// without bound.
pub const MAX_SESSIONS: usize = 1000;

/// How a user proved who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// An admin client certificate signed by the receiver's CA.
    Certificate,
    /// A password from `[[receiver.console.user]]`.
    Password,
}

/// Someone logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user's or the certificate's name.
    pub name: String,
    /// What they may do.
    pub role: ConsoleRole,
    /// How they logged in.
    pub proof: Proof,
}

/// A session: who, its CSRF token, and its times (ns on the shell's
/// clock).
#[derive(Debug, Clone)]
pub struct Session {
    /// Who.
    pub principal: Principal,
    /// The token every form of this session carries.
    pub csrf: String,
    created_ns: u64,
    last_seen_ns: u64,
}

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No session cookie, an unknown one or an expired one (the client
    /// logs in again).
    #[error("no valid session: log in")]
    NoSession,
    /// The form's CSRF token is missing or not the session's (a forged
    /// request, or a page from an earlier session).
    #[error("the form's CSRF token is missing or wrong")]
    Csrf,
    /// The request came from another origin (a cross-site request).
    #[error("the request does not come from the console's own pages")]
    Origin,
    /// The user's role does not allow the action.
    #[error("your role does not allow this")]
    Role,
}

/// What a state-changing request brings to prove it may change.
#[derive(Debug, Clone, Copy, Default)]
pub struct Change<'a> {
    /// The session cookie.
    pub session: Option<&'a str>,
    /// The form's CSRF token.
    pub csrf: Option<&'a str>,
    /// The `Origin` header.
    pub origin: Option<&'a str>,
    /// The `Referer` header.
    pub referer: Option<&'a str>,
}

/// The live sessions, by id.
#[derive(Debug, Default)]
pub struct Sessions {
    sessions: HashMap<String, Session>,
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

impl Sessions {
    /// An empty set.
    pub fn new() -> Sessions {
        Sessions::default()
    }

    /// Opens a session for `principal` under the random `id` with the
    /// random CSRF token `csrf` (both from the shell). With
    /// [`MAX_SESSIONS`] live already, the expired ones are swept and, if
    /// none was, the session idle for longest is ended: its principal is
    /// returned (for the log).
    pub fn handle_login(
        &mut self,
        principal: Principal,
        id: String,
        csrf: String,
        now_ns: u64,
    ) -> Option<Principal> {
        let mut evicted = None;
        if !self.sessions.contains_key(&id) && self.sessions.len() >= MAX_SESSIONS {
            self.poll_expired(now_ns);
            if self.sessions.len() >= MAX_SESSIONS {
                let idlest = self
                    .sessions
                    .iter()
                    .min_by_key(|(_, s)| s.last_seen_ns)
                    .map(|(id, _)| id.clone());
                evicted = idlest
                    .and_then(|id| self.sessions.remove(&id))
                    .map(|s| s.principal);
            }
        }
        self.sessions.insert(
            id,
            Session {
                principal,
                csrf,
                created_ns: now_ns,
                last_seen_ns: now_ns,
            },
        );
        evicted
    }

    /// Ends the session `id` (logout).
    pub fn handle_logout(&mut self, id: &str) {
        self.sessions.remove(id);
    }

    /// The session `id` if it is live, marked as seen now; an expired one
    /// is removed.
    pub fn check(&mut self, id: Option<&str>, now_ns: u64) -> Result<&Session, Refused> {
        let id = id.ok_or(Refused::NoSession)?;
        let live = match self.sessions.get(id) {
            None => return Err(Refused::NoSession),
            Some(s) => {
                now_ns.saturating_sub(s.last_seen_ns) <= ns(IDLE_TIMEOUT)
                    && now_ns.saturating_sub(s.created_ns) <= ns(ABSOLUTE_TIMEOUT)
            }
        };
        if !live {
            self.sessions.remove(id);
            return Err(Refused::NoSession);
        }
        let s = self.sessions.get_mut(id).ok_or(Refused::NoSession)?;
        s.last_seen_ns = now_ns;
        Ok(s)
    }

    /// Checks a state-changing request: a live session, its CSRF token,
    /// an origin equal to `console_origin` (from the `Origin` header, else
    /// the start of `Referer`), and a role at least `needs`.
    pub fn check_change(
        &mut self,
        request: &Change<'_>,
        console_origin: &str,
        needs: ConsoleRole,
        now_ns: u64,
    ) -> Result<&Session, Refused> {
        if !same_origin(request.origin, request.referer, console_origin) {
            return Err(Refused::Origin);
        }
        let session = self.check(request.session, now_ns)?;
        let token = request.csrf.ok_or(Refused::Csrf)?;
        if !bool::from(token.as_bytes().ct_eq(session.csrf.as_bytes())) {
            return Err(Refused::Csrf);
        }
        if session.principal.role < needs {
            return Err(Refused::Role);
        }
        Ok(session)
    }

    /// Removes every expired session.
    pub fn poll_expired(&mut self, now_ns: u64) {
        self.sessions.retain(|_, s| {
            now_ns.saturating_sub(s.last_seen_ns) <= ns(IDLE_TIMEOUT)
                && now_ns.saturating_sub(s.created_ns) <= ns(ABSOLUTE_TIMEOUT)
        });
    }

    /// How many sessions are open.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// Whether a request's `Origin` (or, without one, its `Referer`) is the
/// console's own origin (`https://host:port`).
fn same_origin(origin: Option<&str>, referer: Option<&str>, console: &str) -> bool {
    match (origin, referer) {
        (Some(o), _) => o == console,
        (None, Some(r)) => r
            .strip_prefix(console)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        (None, None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "https://127.0.0.1:8443";
    const S: u64 = 1_000_000_000;

    fn login(sessions: &mut Sessions, role: ConsoleRole, now: u64) {
        sessions.handle_login(
            Principal {
                name: "ops".into(),
                role,
                proof: Proof::Password,
            },
            "sid".into(),
            "token".into(),
            now,
        );
    }

    fn change(
        s: &mut Sessions,
        id: Option<&str>,
        token: Option<&str>,
        origin: Option<&str>,
        now: u64,
    ) -> Result<(), Refused> {
        let request = Change {
            session: id,
            csrf: token,
            origin,
            referer: None,
        };
        s.check_change(&request, ORIGIN, ConsoleRole::Operator, now)
            .map(drop)
    }

    #[test]
    fn an_operator_with_session_token_and_origin_may_change() {
        let mut s = Sessions::new();
        login(&mut s, ConsoleRole::Operator, 0);
        assert_eq!(
            change(&mut s, Some("sid"), Some("token"), Some(ORIGIN), S),
            Ok(())
        );
    }

    #[test]
    fn each_missing_proof_is_refused_with_its_reason() {
        let mut s = Sessions::new();
        login(&mut s, ConsoleRole::Operator, 0);
        assert_eq!(
            change(&mut s, None, Some("token"), Some(ORIGIN), S),
            Err(Refused::NoSession)
        );
        assert_eq!(
            change(&mut s, Some("other"), Some("token"), Some(ORIGIN), S),
            Err(Refused::NoSession)
        );
        assert_eq!(
            change(&mut s, Some("sid"), None, Some(ORIGIN), S),
            Err(Refused::Csrf)
        );
        assert_eq!(
            change(&mut s, Some("sid"), Some("tokem"), Some(ORIGIN), S),
            Err(Refused::Csrf)
        );
        assert_eq!(
            change(
                &mut s,
                Some("sid"),
                Some("token"),
                Some("https://evil.example"),
                S
            ),
            Err(Refused::Origin)
        );
        assert_eq!(
            change(&mut s, Some("sid"), Some("token"), None, S),
            Err(Refused::Origin)
        );
    }

    #[test]
    fn a_referer_of_the_console_stands_for_a_missing_origin() {
        let mut s = Sessions::new();
        login(&mut s, ConsoleRole::Operator, 0);
        let via = |s: &mut Sessions, r: &str| {
            let request = Change {
                session: Some("sid"),
                csrf: Some("token"),
                origin: None,
                referer: Some(r),
            };
            s.check_change(&request, ORIGIN, ConsoleRole::Operator, S)
                .map(drop)
        };
        assert_eq!(via(&mut s, "https://127.0.0.1:8443/group/a/b"), Ok(()));
        assert_eq!(
            via(&mut s, "https://127.0.0.1:84430/"),
            Err(Refused::Origin)
        );
    }

    #[test]
    fn a_read_only_user_may_not_change() {
        let mut s = Sessions::new();
        login(&mut s, ConsoleRole::ReadOnly, 0);
        assert_eq!(
            change(&mut s, Some("sid"), Some("token"), Some(ORIGIN), S),
            Err(Refused::Role)
        );
        assert!(s.check(Some("sid"), S).is_ok(), "but may read");
    }

    #[test]
    fn sessions_expire_when_idle_and_after_the_absolute_limit() {
        let mut s = Sessions::new();
        login(&mut s, ConsoleRole::Operator, 0);
        let idle = ns(IDLE_TIMEOUT);
        assert!(s.check(Some("sid"), idle).is_ok());
        assert_eq!(
            s.check(Some("sid"), 2 * idle + 1).map(drop),
            Err(Refused::NoSession)
        );
        assert!(s.is_empty(), "an expired session is removed");

        login(&mut s, ConsoleRole::Operator, 0);
        let mut now = 0;
        while now + idle / 2 <= ns(ABSOLUTE_TIMEOUT) {
            now += idle / 2;
            assert!(s.check(Some("sid"), now).is_ok());
        }
        assert!(s.check(Some("sid"), ns(ABSOLUTE_TIMEOUT) + 1).is_err());
    }

    #[test]
    fn the_sessions_are_bounded_and_the_idlest_goes_first() {
        let mut s = Sessions::new();
        let who = |n: usize| Principal {
            name: format!("u{n}"),
            role: ConsoleRole::ReadOnly,
            proof: Proof::Certificate,
        };
        for n in 0..MAX_SESSIONS {
            let evicted = s.handle_login(who(n), format!("id{n}"), "t".into(), n as u64);
            assert_eq!(evicted, None);
        }
        // The first session is used again: the second is now the idlest.
        assert!(s.check(Some("id0"), MAX_SESSIONS as u64).is_ok());
        let evicted = s.handle_login(who(9999), "new".into(), "t".into(), S);
        assert_eq!(evicted.map(|p| p.name), Some("u1".to_owned()));
        assert_eq!(s.len(), MAX_SESSIONS);
        assert!(s.check(Some("id0"), S).is_ok());
        assert!(s.check(Some("id1"), S).is_err());
        assert!(s.check(Some("new"), S).is_ok());

        // Expired sessions are swept before a live one is ended.
        let later = ns(IDLE_TIMEOUT) + 2 * S;
        assert!(s.check(Some("new"), ns(IDLE_TIMEOUT)).is_ok());
        let evicted = s.handle_login(who(10_000), "newer".into(), "t".into(), later);
        assert_eq!(evicted, None);
        assert_eq!(s.len(), 2, "the idle ones were swept");
    }

    #[test]
    fn logout_ends_the_session_and_poll_expired_sweeps() {
        let mut s = Sessions::new();
        login(&mut s, ConsoleRole::Operator, 0);
        s.handle_logout("sid");
        assert!(s.check(Some("sid"), 0).is_err());
        login(&mut s, ConsoleRole::Operator, 0);
        s.poll_expired(ns(IDLE_TIMEOUT) + 1);
        assert_eq!(s.len(), 0);
    }
}
