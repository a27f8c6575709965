//! Which receiver the shipper dials ([`ReceiverChoice`]), when a replica
//! site runs several receivers on one shared store (`receivers` in
//! `[shipper]`): a pure decision, no sockets.
//!
//! - The receivers are tried in an order of this host and group's own, by
//!   rendezvous hashing: each receiver's rank is a hash of (host, group,
//!   receiver), highest first. The order is the same on every start and
//!   spreads the groups of many hosts evenly over the receivers; removing
//!   one receiver moves only the groups it ranked first.
//! - A receiver that does not own the group redirects the shipper to the
//!   one that does: followed at once, up to [`MAX_REDIRECTS`] times per
//!   connection attempt; past that the shipper backs off as after any
//!   transient failure (a takeover is under way).
//! - A receiver that cannot be reached, or ends the connection before a
//!   session runs (it cannot open the group: say it was fenced by another
//!   receiver, or the store is unavailable to it), is left for the next
//!   one in the order at the next attempt.
//! - Once a session runs, its receiver is dialled first again after a
//!   disconnect (ownership is sticky).

use tidemark_config::HostPort;
use tidemark_names::Name;

/// Redirects followed per connection attempt before backing off.
pub const MAX_REDIRECTS: u32 = 3;

/// The receiver to dial next for one host's group.
#[derive(Debug, Clone)]
pub struct ReceiverChoice {
    /// The configured receivers, in this group's rendezvous order.
    order: Vec<HostPort>,
    /// The one to dial next.
    current: HostPort,
    /// Redirects followed since the last backoff or session.
    redirects: u32,
    /// A session ran on the connection dialled last.
    session: bool,
}

/// A redirect not followed: too many in a row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{MAX_REDIRECTS} redirects in a row (the group's owner is changing): backing off")]
pub struct TooManyRedirects;

/// The rank of `receiver` for `host`'s `group`: the first 8 bytes of a
/// BLAKE3 hash of the three (names cannot hold a NUL).
fn rank(host: &Name, group: &Name, receiver: &HostPort) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(host.as_bytes());
    h.update(&[0]);
    h.update(group.as_bytes());
    h.update(&[0]);
    h.update(receiver.to_string().as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(first)
}

impl ReceiverChoice {
    /// The choice among `receivers` (none: `None`) for `host`'s `group`.
    pub fn new(receivers: &[HostPort], host: &Name, group: &Name) -> Option<ReceiverChoice> {
        let mut order: Vec<(u64, HostPort)> = receivers
            .iter()
            .map(|r| (rank(host, group, r), r.clone()))
            .collect();
        order.sort_by(|a, b| {
            b.0.cmp(&a.0)
                .then_with(|| a.1.to_string().cmp(&b.1.to_string()))
        });
        let order: Vec<HostPort> = order.into_iter().map(|(_, r)| r).collect();
        let current = order.first()?.clone();
        Some(ReceiverChoice {
            order,
            current,
            redirects: 0,
            session: false,
        })
    }

    /// The receivers in this group's order.
    pub fn order(&self) -> &[HostPort] {
        &self.order
    }

    /// The receiver to dial now.
    pub fn current(&self) -> &HostPort {
        &self.current
    }

    /// The receiver dialled redirected the shipper to `to`: dial it at once
    /// (`Ok`), or back off first (`Err`: too many redirects in a row; the
    /// next attempt still starts at `to`).
    pub fn handle_redirect(&mut self, to: HostPort) -> Result<(), TooManyRedirects> {
        self.current = to;
        if self.redirects >= MAX_REDIRECTS {
            self.redirects = 0;
            return Err(TooManyRedirects);
        }
        self.redirects += 1;
        Ok(())
    }

    /// A connection to [`current`](Self::current) is being dialled.
    pub fn handle_dial(&mut self) {
        self.session = false;
    }

    /// A session runs with the receiver dialled: it is dialled first again.
    pub fn handle_session(&mut self) {
        self.session = true;
        self.redirects = 0;
    }

    /// The connection ended (or never started) otherwise than by a
    /// redirect; the shipper backs off. Without a session on it, the next
    /// attempt dials the next receiver in the order.
    pub fn handle_ended(&mut self) {
        self.redirects = 0;
        if self.session {
            return;
        }
        let next = match self.order.iter().position(|r| *r == self.current) {
            Some(i) => (i + 1) % self.order.len(),
            // A redirect target that is not configured: back to the first.
            None => 0,
        };
        self.current = self.order[next].clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receivers(n: usize) -> Vec<HostPort> {
        (1..=n)
            .map(|i| format!("r{i}.example.com:7480").parse().unwrap())
            .collect()
    }

    fn choice(host: &str, group: &str, of: &[HostPort]) -> ReceiverChoice {
        ReceiverChoice::new(of, &Name::new(host).unwrap(), &Name::new(group).unwrap()).unwrap()
    }

    /// The order is the same every time for a host and group, whatever
    /// the order of the configuration, and differs between groups.
    #[test]
    fn the_order_is_stable_per_group_and_spreads_groups() {
        let all = receivers(4);
        let mut reversed = all.clone();
        reversed.reverse();
        assert_eq!(
            choice("db1", "g", &all).order(),
            choice("db1", "g", &reversed).order()
        );
        let mut first = std::collections::HashMap::new();
        for h in 0..400 {
            let c = choice(&format!("host{h}"), "default", &all);
            *first.entry(c.current().to_string()).or_insert(0) += 1;
        }
        assert_eq!(first.len(), 4, "every receiver is someone's first");
        for (r, n) in &first {
            assert!((50..150).contains(n), "{r} is first for {n} of 400 groups");
        }
        assert!(
            ReceiverChoice::new(&[], &Name::from_static("h"), &Name::from_static("g")).is_none()
        );
    }

    /// Removing a receiver moves only the groups that ranked it first.
    #[test]
    fn removing_a_receiver_moves_only_its_groups() {
        let all = receivers(4);
        let fewer: Vec<HostPort> = all[..3].to_vec();
        for h in 0..200 {
            let host = format!("host{h}");
            let before = choice(&host, "g", &all).current().clone();
            let after = choice(&host, "g", &fewer).current().clone();
            if before != all[3] {
                assert_eq!(before, after, "{host} moved");
            }
        }
    }

    /// Redirects are followed up to the limit, then the shipper backs off
    /// (and starts at the last target); a session resets the count.
    #[test]
    fn redirects_are_followed_up_to_the_limit() {
        let all = receivers(3);
        let mut c = choice("db1", "g", &all);
        let to: HostPort = "r9.example.com:7480".parse().unwrap();
        for _ in 0..MAX_REDIRECTS {
            assert_eq!(c.handle_redirect(to.clone()), Ok(()));
            assert_eq!(c.current(), &to);
        }
        assert_eq!(c.handle_redirect(all[0].clone()), Err(TooManyRedirects));
        assert_eq!(c.current(), &all[0]);
        assert_eq!(c.handle_redirect(to.clone()), Ok(()), "counted again");
        c.handle_session();
        for _ in 0..MAX_REDIRECTS {
            assert_eq!(c.handle_redirect(to.clone()), Ok(()));
        }
    }

    /// A receiver with which no session ran passes the turn to the next
    /// in the order, round and round (an unconfigured redirect target to
    /// the first); one with which a session ran is dialled again.
    #[test]
    fn a_receiver_without_a_session_passes_to_the_next() {
        let all = receivers(3);
        let mut c = choice("db1", "g", &all);
        let order = c.order().to_vec();
        for i in 1..=4 {
            c.handle_dial();
            c.handle_ended();
            assert_eq!(c.current(), &order[i % 3]);
        }
        c.handle_dial();
        c.handle_redirect("elsewhere:7480".parse().unwrap())
            .unwrap();
        c.handle_dial();
        c.handle_ended();
        assert_eq!(c.current(), &order[0]);
        c.handle_dial();
        c.handle_session();
        c.handle_ended();
        assert_eq!(c.current(), &order[0], "sticky after a session");
        c.handle_dial();
        c.handle_ended();
        assert_eq!(c.current(), &order[1]);
    }
}
