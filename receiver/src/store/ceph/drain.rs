//! A group's drain request and its answer in the cluster
//! ([`crate::drain`]'s seam for the Ceph store): the CLI of a planned
//! failover on any receiver node leaves the request here, the receiver
//! that applies the group (whichever holds its lease, now or after a
//! takeover) finds it, passes it to the group's shipper and leaves the
//! answer here.
//!
//! # The object
//!
//! ```text
//!  G+drain      no data. Extended attributes:
//!                 format   "tidemark-drain 1"
//!                 request  the request's sealed body (crate::drain), or
//!                          empty: none pending
//!                 answer   the answer's sealed body, or empty: none
//!               absent: no request, no answer
//! ```
//!
//! Every change is one operation, so the object is never seen half
//! written:
//! - a request: create (not exclusive), `format`, `request := body`,
//!   `answer := ""` (the old answer goes with the old request);
//! - an answer: guarded by `format == "tidemark-drain 1"` (so a withdrawn
//!   request, the object removed, is not brought back), `answer := body`;
//!   if the request it answers is pending, also guarded by
//!   `request == its body` and `request := ""` (one operation: a newer
//!   request written meanwhile fails the guard and stays, and the answer is
//!   then written alone);
//! - a clear: remove the object.
//!
//! A `format` other than this release's (or none) is refused by name
//! ([`DrainError::Foreign`]); a body that does not unseal or parse is
//! damage ([`DrainError::Damaged`]): never read as another request or as
//! an answer.
//!
//! The owner changing while a request is pending needs nothing more: the
//! request is in the cluster, and the new owner's session with the
//! group's shipper finds it as the old owner's did. A request left by a
//! CLI that died expires at its deadline (`expires-ns`) and is passed on
//! no more; the next planned failover replaces it.

use std::sync::Arc;

use tidemark_ceph::{CephError, Cluster, CmpOp, WriteOp};
use tidemark_changelog::sealed::{seal, unseal};

use super::dir::io_error;
use crate::drain::{DrainChannel, DrainError, DrainRequest, DrainResult};

/// The format attribute of a drain object.
pub const DRAIN_FORMAT: &str = "tidemark-drain 1";
const XATTR_FORMAT: &str = "format";
const XATTR_REQUEST: &str = "request";
const XATTR_ANSWER: &str = "answer";

/// The drain object of one group in the cluster.
pub struct CephDrain<C: Cluster> {
    cluster: Arc<C>,
    oid: String,
}

impl<C: Cluster> std::fmt::Debug for CephDrain<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CephDrain").field("oid", &self.oid).finish()
    }
}

/// What the object holds: the raw request and answer attributes (empty:
/// none).
struct Held {
    request: Vec<u8>,
    answer: Vec<u8>,
}

impl<C: Cluster> CephDrain<C> {
    /// The drain object `oid` (`HOST+GROUP+drain`) on `cluster`.
    pub fn new(cluster: Arc<C>, oid: String) -> CephDrain<C> {
        CephDrain { cluster, oid }
    }

    fn err(&self, what: &'static str) -> impl FnOnce(CephError) -> DrainError + '_ {
        move |e| DrainError::Io {
            what,
            at: format!("ceph:{}", self.oid),
            source: io_error(e),
        }
    }

    /// The object's attributes; `None` if it is absent.
    fn held(&self) -> Result<Option<Held>, DrainError> {
        let xattrs = match self.cluster.xattrs(&self.oid) {
            Ok(x) => x,
            Err(CephError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("reading the drain object")(e)),
        };
        let format = xattrs.get(XATTR_FORMAT).cloned().unwrap_or_default();
        if format != DRAIN_FORMAT.as_bytes() {
            return Err(DrainError::Foreign {
                at: format!("ceph:{}", self.oid),
                format: String::from_utf8_lossy(&format).into_owned(),
            });
        }
        let get = |name: &str| xattrs.get(name).cloned().unwrap_or_default();
        Ok(Some(Held {
            request: get(XATTR_REQUEST),
            answer: get(XATTR_ANSWER),
        }))
    }

    /// The lines of a sealed attribute; `None` if it is empty.
    fn lines(
        &self,
        raw: &[u8],
        what: &'static str,
    ) -> Result<Option<Vec<(String, String)>>, DrainError> {
        if raw.is_empty() {
            return Ok(None);
        }
        let damaged = |why: String| DrainError::Damaged {
            at: format!("ceph:{}", self.oid),
            what,
            why,
        };
        let text = std::str::from_utf8(raw).map_err(|_| damaged("not UTF-8".into()))?;
        let body = unseal(text).map_err(|why| damaged(why.into()))?;
        Ok(Some(
            body.lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    fn request_of(&self, held: &Held) -> Result<Option<DrainRequest>, DrainError> {
        let Some(lines) = self.lines(&held.request, "request")? else {
            return Ok(None);
        };
        DrainRequest::parse(&lines)
            .map(Some)
            .ok_or_else(|| DrainError::Damaged {
                at: format!("ceph:{}", self.oid),
                what: "request",
                why: "no request id".into(),
            })
    }
}

impl<C: Cluster + 'static> DrainChannel for CephDrain<C> {
    fn request(&self, request: &DrainRequest) -> Result<(), DrainError> {
        let op = WriteOp::new()
            .create(false)
            .set_xattr(XATTR_FORMAT, DRAIN_FORMAT.as_bytes())
            .set_xattr(XATTR_REQUEST, seal(&request.body()).as_bytes())
            .set_xattr(XATTR_ANSWER, b"");
        self.cluster
            .operate(&self.oid, &op)
            .map_err(self.err("leaving the drain request in"))
    }

    fn pending(&self) -> Result<Option<DrainRequest>, DrainError> {
        match self.held()? {
            Some(held) => self.request_of(&held),
            None => Ok(None),
        }
    }

    fn answer(&self, result: &DrainResult) -> Result<(), DrainError> {
        let Some(held) = self.held()? else {
            // Withdrawn: nobody waits for the answer.
            return Ok(());
        };
        let body = seal(&result.body());
        let answer_only = WriteOp::new()
            .cmp_xattr(XATTR_FORMAT, CmpOp::Eq, DRAIN_FORMAT.as_bytes())
            .set_xattr(XATTR_ANSWER, body.as_bytes());
        let answers_pending = self.request_of(&held)?.map(|r| r.id) == Some(result.id);
        let written = if answers_pending {
            let retiring = WriteOp::new()
                .cmp_xattr(XATTR_FORMAT, CmpOp::Eq, DRAIN_FORMAT.as_bytes())
                .cmp_xattr(XATTR_REQUEST, CmpOp::Eq, &held.request)
                .set_xattr(XATTR_ANSWER, body.as_bytes())
                .set_xattr(XATTR_REQUEST, b"");
            match self.cluster.operate(&self.oid, &retiring) {
                // A newer request came meanwhile (or the object went):
                // it stays; the answer alone.
                Err(CephError::Canceled { .. }) => self.cluster.operate(&self.oid, &answer_only),
                other => other,
            }
        } else {
            self.cluster.operate(&self.oid, &answer_only)
        };
        match written {
            // Withdrawn meanwhile.
            Err(CephError::NotFound { .. }) => Ok(()),
            other => other.map_err(self.err("writing the drain answer in")),
        }
    }

    fn answered(&self) -> Result<Option<DrainResult>, DrainError> {
        let Some(held) = self.held()? else {
            return Ok(None);
        };
        let Some(lines) = self.lines(&held.answer, "answer")? else {
            return Ok(None);
        };
        DrainResult::parse(&lines)
            .map(Some)
            .ok_or_else(|| DrainError::Damaged {
                at: format!("ceph:{}", self.oid),
                what: "answer",
                why: "no id with last-seq or error".into(),
            })
    }

    fn clear(&self) -> Result<(), DrainError> {
        match self.cluster.operate(&self.oid, &WriteOp::new().remove()) {
            Ok(()) | Err(CephError::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("removing the drain object")(e)),
        }
    }

    fn describe(&self) -> String {
        format!("ceph:{}", self.oid)
    }
}
