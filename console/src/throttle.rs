//! How fast someone may guess passwords: failed password logins are
//! counted per client address and per user name, and after
//! [`FREE_FAILURES`] of either a login from that address or for that name
//! is refused for a delay that doubles with every further failure (from
//! [`FIRST_DELAY`] up to [`MAX_DELAY`]). A successful login clears both
//! counts. Pure: `now` is passed in, the shell answers and audits.
//!
//! Both keys matter: per address stops one client trying many names, per
//! name stops many clients (a botnet) trying one user's password. What is
//! remembered is bounded ([`MAX_TRACKED`] keys of each kind, the one whose
//! last failure is oldest forgotten first) and forgotten
//! [`FORGET_AFTER`] after the last failure, so a flood of failures from
//! random addresses or names cannot grow memory without bound.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::Duration;

/// Failures allowed before a delay is imposed.
pub const FREE_FAILURES: u32 = 5;
/// The delay after the first failure past [`FREE_FAILURES`]; each further
/// failure doubles it.
pub const FIRST_DELAY: Duration = Duration::from_secs(2);
/// The longest delay.
pub const MAX_DELAY: Duration = Duration::from_secs(15 * 60);
/// A key's count is forgotten this long after its last failure.
pub const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);
/// At most this many addresses, and this many names, are remembered.
pub const MAX_TRACKED: usize = 10_000;
/// A name is counted by its first this many bytes: what a client types
/// is untrusted, and a remembered key must stay small.
pub const NAME_KEY_BYTES: usize = 128;

/// The part of a typed name that is counted (and logged): its first
/// [`NAME_KEY_BYTES`] bytes, cut at a character boundary.
pub fn name_key(name: &str) -> &str {
    let mut end = name.len().min(NAME_KEY_BYTES);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

/// A login refused before its password is even checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many failed logins; try again in {} s", retry_after.as_secs().max(1))]
pub struct LockedOut {
    /// How long until a login may be tried again.
    pub retry_after: Duration,
}

/// A failure that locks a key out (for the audit trail).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    /// Failures counted for the address.
    pub address_failures: u32,
    /// Failures counted for the name.
    pub name_failures: u32,
    /// How long logins are refused now.
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last_ns: u64,
    locked_until_ns: u64,
}

/// Failure counts by key, bounded.
#[derive(Debug)]
struct Counts<K> {
    by_key: HashMap<K, Failures>,
}

impl<K: Hash + Eq + Clone> Counts<K> {
    fn new() -> Self {
        Counts {
            by_key: HashMap::new(),
        }
    }

    fn locked_until(&self, key: &K) -> u64 {
        self.by_key.get(key).map_or(0, |f| f.locked_until_ns)
    }

    /// Counts a failure; the new count and lock end.
    fn fail(&mut self, key: &K, now_ns: u64) -> Failures {
        if !self.by_key.contains_key(key) && self.by_key.len() >= MAX_TRACKED {
            self.forget_expired(now_ns);
            if self.by_key.len() >= MAX_TRACKED {
                // A key still locked out is kept over one that is not, so
                // a flood of new keys cannot lift a lockout.
                let oldest = self
                    .by_key
                    .iter()
                    .min_by_key(|(_, f)| (f.locked_until_ns > now_ns, f.last_ns))
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    self.by_key.remove(&k);
                }
            }
        }
        let f = self.by_key.entry(key.clone()).or_insert(Failures {
            count: 0,
            last_ns: now_ns,
            locked_until_ns: 0,
        });
        f.count = f.count.saturating_add(1);
        f.last_ns = now_ns;
        if f.count > FREE_FAILURES {
            f.locked_until_ns = now_ns.saturating_add(ns(delay(f.count)));
        }
        *f
    }

    fn clear(&mut self, key: &K) {
        self.by_key.remove(key);
    }

    fn forget_expired(&mut self, now_ns: u64) {
        self.by_key.retain(|_, f| {
            now_ns.saturating_sub(f.last_ns) <= ns(FORGET_AFTER) || f.locked_until_ns > now_ns
        });
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The delay imposed after the `count`th failure (past the free ones).
fn delay(count: u32) -> Duration {
    let doublings = count.saturating_sub(FREE_FAILURES + 1).min(20);
    FIRST_DELAY.saturating_mul(1u32 << doublings).min(MAX_DELAY)
}

/// Failed password logins, per client address and per user name.
#[derive(Debug)]
pub struct LoginThrottle {
    addresses: Counts<IpAddr>,
    names: Counts<String>,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle::new()
    }
}

impl LoginThrottle {
    /// Nothing counted yet.
    pub fn new() -> LoginThrottle {
        LoginThrottle {
            addresses: Counts::new(),
            names: Counts::new(),
        }
    }

    /// Whether a password login from `address` for `name` may be tried at
    /// `now_ns`.
    pub fn check(&self, address: IpAddr, name: &str, now_ns: u64) -> Result<(), LockedOut> {
        let until = self
            .addresses
            .locked_until(&address)
            .max(self.names.locked_until(&name_key(name).to_owned()));
        if until > now_ns {
            return Err(LockedOut {
                retry_after: Duration::from_nanos(until - now_ns),
            });
        }
        Ok(())
    }

    /// A password login from `address` for `name` failed at `now_ns`;
    /// `Some` when logins are refused for a while from now on.
    pub fn handle_failure(&mut self, address: IpAddr, name: &str, now_ns: u64) -> Option<Lockout> {
        let a = self.addresses.fail(&address, now_ns);
        let n = self.names.fail(&name_key(name).to_owned(), now_ns);
        let until = a.locked_until_ns.max(n.locked_until_ns);
        (until > now_ns).then(|| Lockout {
            address_failures: a.count,
            name_failures: n.count,
            retry_after: Duration::from_nanos(until - now_ns),
        })
    }

    /// A password login from `address` for `name` succeeded: both counts
    /// start again.
    pub fn handle_success(&mut self, address: IpAddr, name: &str) {
        self.addresses.clear(&address);
        self.names.clear(&name_key(name).to_owned());
    }

    /// Forgets the counts whose last failure is older than
    /// [`FORGET_AFTER`] and whose lock has ended.
    pub fn poll_expired(&mut self, now_ns: u64) {
        self.addresses.forget_expired(now_ns);
        self.names.forget_expired(now_ns);
    }

    /// How many addresses and names are remembered.
    pub fn tracked(&self) -> (usize, usize) {
        (self.addresses.by_key.len(), self.names.by_key.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const S: u64 = 1_000_000_000;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
    }

    #[test]
    fn the_free_failures_pass_then_a_delay_is_imposed() {
        let mut t = LoginThrottle::new();
        for i in 0..u64::from(FREE_FAILURES) {
            assert_eq!(t.check(ip(1), "ops", i * S), Ok(()));
            assert_eq!(t.handle_failure(ip(1), "ops", i * S), None);
        }
        let now = 10 * S;
        assert_eq!(t.check(ip(1), "ops", now), Ok(()));
        let lockout = t.handle_failure(ip(1), "ops", now).expect("locked out");
        assert_eq!(lockout.retry_after, FIRST_DELAY);
        assert_eq!(lockout.address_failures, FREE_FAILURES + 1);
        let refused = t.check(ip(1), "ops", now + S).unwrap_err();
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(
            refused.to_string(),
            "too many failed logins; try again in 1 s"
        );
        assert_eq!(t.check(ip(1), "ops", now + ns(FIRST_DELAY)), Ok(()));
    }

    #[test]
    fn the_delay_doubles_up_to_the_most() {
        assert_eq!(delay(FREE_FAILURES + 1), FIRST_DELAY);
        assert_eq!(delay(FREE_FAILURES + 2), FIRST_DELAY * 2);
        assert_eq!(delay(FREE_FAILURES + 3), FIRST_DELAY * 4);
        assert_eq!(delay(FREE_FAILURES + 40), MAX_DELAY);
        assert_eq!(delay(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn a_name_is_locked_from_every_address_and_an_address_for_every_name() {
        let mut t = LoginThrottle::new();
        for i in 0..=FREE_FAILURES {
            t.handle_failure(ip(i as u8), "ops", 0);
        }
        assert!(t.check(ip(200), "ops", S).is_err(), "the name is locked");
        assert_eq!(t.check(ip(200), "other", S), Ok(()));

        let mut t = LoginThrottle::new();
        for i in 0..=FREE_FAILURES {
            t.handle_failure(ip(1), &format!("user{i}"), 0);
        }
        assert!(t.check(ip(1), "fresh", S).is_err(), "the address is locked");
        assert_eq!(t.check(ip(2), "fresh", S), Ok(()));
    }

    #[test]
    fn a_long_name_is_counted_by_its_start() {
        let long = "é".repeat(NAME_KEY_BYTES);
        assert_eq!(name_key(&long).len(), NAME_KEY_BYTES);
        assert_eq!(name_key("ops"), "ops");
        let odd = format!("a{long}");
        assert_eq!(name_key(&odd).len(), NAME_KEY_BYTES - 1, "cut at a char");
        let mut t = LoginThrottle::new();
        for i in 0..=FREE_FAILURES {
            t.handle_failure(ip(i as u8), &format!("{long}{i}"), 0);
        }
        assert!(t.check(ip(99), &long, S).is_err(), "one key for all");
        assert_eq!(t.tracked().1, 1);
    }

    #[test]
    fn a_success_clears_both_counts() {
        let mut t = LoginThrottle::new();
        for _ in 0..FREE_FAILURES {
            t.handle_failure(ip(1), "ops", 0);
        }
        t.handle_success(ip(1), "ops");
        assert_eq!(t.handle_failure(ip(1), "ops", S), None, "counting anew");
        assert_eq!(t.tracked(), (1, 1));
    }

    #[test]
    fn counts_are_forgotten_and_bounded() {
        let mut t = LoginThrottle::new();
        t.handle_failure(ip(1), "ops", 0);
        t.poll_expired(ns(FORGET_AFTER));
        assert_eq!(t.tracked(), (1, 1), "not yet");
        t.poll_expired(ns(FORGET_AFTER) + 1);
        assert_eq!(t.tracked(), (0, 0));

        let mut t = LoginThrottle::new();
        for i in 0..MAX_TRACKED as u64 + 50 {
            let addr = IpAddr::V6((u128::from(i)).into());
            t.handle_failure(addr, &format!("n{i}"), i);
        }
        assert_eq!(t.tracked(), (MAX_TRACKED, MAX_TRACKED));
        let newest = IpAddr::V6(u128::from(MAX_TRACKED as u64 + 49).into());
        assert!(t.addresses.by_key.contains_key(&newest));
        assert!(
            !t.addresses.by_key.contains_key(&IpAddr::V6(0u128.into())),
            "the oldest is forgotten first"
        );
    }
}
