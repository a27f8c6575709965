//! A span point as the replica site's commands use it: which points of a
//! span's record can still be offered (every member's replica still holds
//! its marker), the span floor each member's retention keeps
//! ([`floors`]), and a chosen point pinned in every member at once
//! ([`PinnedSpanPoint`]) for a failover or a test failover that brings
//! every member to it.
//!
//! Invariants:
//! - A span point is offered only while every member's replica holds its
//!   marker as a recovery point with the point's label. A record entry
//!   whose marker was folded anyway (a receiver that ran without the
//!   span's configuration, say) is *expired*: listed as such, refused by
//!   name.
//! - [`PinnedSpanPoint::pin`] takes every member's pin lock, then pins
//!   every member's marker, and only then checks that every marker is
//!   still there: once it returns, no member's retention can fold its
//!   marker while another member's images are written or served, and a
//!   point that cannot be had whole is refused before anything is written.
//! - The floor of a member is its marker of the oldest span point the
//!   span keeps: the durable points within the retention window, and
//!   always the newest.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tidemark_changelog::Seq;
use tidemark_names::Name;

use crate::pin::{PinError, PinLock};
use crate::span::{Outcome, PointEntry, SpanDir, SpanRecord, SpanRecordError};
use crate::store::{LocalEngine, ReplicaStore, StoreEngine, StoreError};

/// Which span point: the newest one, or one by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointChoice {
    /// The newest span point.
    Latest,
    /// The span point with this id (`tidemark span points` lists them).
    Id(u64),
}

impl std::str::FromStr for PointChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<PointChoice, String> {
        if s == "latest" {
            return Ok(PointChoice::Latest);
        }
        s.parse().map(PointChoice::Id).map_err(|_| {
            format!(
                "{s:?} is no span point: give `latest` or a point's id (`tidemark span points`)"
            )
        })
    }
}

impl std::fmt::Display for PointChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointChoice::Latest => f.write_str("latest"),
            PointChoice::Id(id) => write!(f, "{id}"),
        }
    }
}

/// Why a span point cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum SpanPointError {
    /// The span's record could not be read (local disk, or a damaged
    /// record).
    #[error("reading the span's record")]
    Record(#[source] Box<SpanRecordError>),
    /// The span has no span point (yet).
    #[error("span {span} has no span point yet (`tidemark span points --all` shows its rounds)")]
    NoPoints {
        /// The span.
        span: Name,
    },
    /// No round of the span has this id (the admin's mistake).
    #[error("span {span} has no point {point} (`tidemark span points` lists them)")]
    NoSuchPoint {
        /// The span.
        span: Name,
        /// The id asked for.
        point: u64,
    },
    /// The round is no span point: a member's marker never became
    /// durable, or the round was aborted.
    #[error("point {point} of span {span} is no span point: it is {}", match outcome {
        Outcome::Committed => "still waiting for a member's marker to be durable",
        Outcome::Aborted => "aborted",
        Outcome::Durable => "durable",
    })]
    NotDurable {
        /// The span.
        span: Name,
        /// The point.
        point: u64,
        /// How its round ended.
        outcome: Outcome,
    },
    /// A member's replica no longer holds its marker: retention folded it
    /// (the span point expired).
    #[error("span point {point} of span {span} has expired: the replica of {host}/{group} no longer holds its marker at sequence {marker} (choose a newer point)")]
    Expired {
        /// The span.
        span: Name,
        /// The point.
        point: u64,
        /// The member's host.
        host: Name,
        /// The member's group.
        group: Name,
        /// Its marker.
        marker: Seq,
    },
    /// A member has no replica in this data directory.
    #[error("no replica of {host}/{group}, a member of span {span}, at {}", dir.display())]
    NoReplica {
        /// The span.
        span: Name,
        /// The member's host.
        host: Name,
        /// The member's group.
        group: Name,
        /// Where it was looked for.
        dir: PathBuf,
    },
    /// A member's replica could not be opened (local disk, or damaged).
    #[error("opening the replica of {host}/{group}")]
    Open {
        /// The member's host.
        host: Name,
        /// The member's group.
        group: Name,
        /// The cause.
        #[source]
        source: Box<StoreError>,
    },
    /// A member's point could not be pinned or unpinned (another test
    /// failover or failover of the member runs, or the local disk).
    #[error("pinning the point of {host}/{group}")]
    Pin {
        /// The member's host.
        host: Name,
        /// The member's group.
        group: Name,
        /// The cause.
        #[source]
        source: Box<PinError>,
    },
}

/// Reads the record of `span` in the receiver's data directory.
pub fn load(data_dir: &Path, span: &Name) -> Result<SpanRecord, SpanPointError> {
    SpanDir::open(data_dir, span)
        .and_then(|dir| dir.load())
        .map_err(|e| SpanPointError::Record(Box::new(e)))
}

/// Reads the record of `span` where the store of `engine` keeps it: in
/// the cluster with a store shared between receivers (from any node), else
/// in the receiver's data directory `data_dir`.
pub fn load_in(
    engine: &dyn StoreEngine,
    data_dir: &Path,
    span: &Name,
) -> Result<SpanRecord, SpanPointError> {
    match engine.read_span(span) {
        Some(read) => read.map_err(|e| SpanPointError::Record(Box::new(e))),
        None => load(data_dir, span),
    }
}

/// The durable entry `choice` names in `record`.
pub fn choose<'a>(
    span: &Name,
    record: &'a SpanRecord,
    choice: PointChoice,
) -> Result<&'a PointEntry, SpanPointError> {
    let entry = match choice {
        PointChoice::Latest => {
            return record
                .span_points()
                .last()
                .ok_or_else(|| SpanPointError::NoPoints { span: span.clone() })
        }
        PointChoice::Id(point) => {
            record
                .points
                .iter()
                .find(|p| p.point == point)
                .ok_or_else(|| SpanPointError::NoSuchPoint {
                    span: span.clone(),
                    point,
                })?
        }
    };
    if entry.outcome != Outcome::Durable {
        return Err(SpanPointError::NotDurable {
            span: span.clone(),
            point: entry.point,
            outcome: entry.outcome,
        });
    }
    Ok(entry)
}

/// The first member of `entry` whose replica (`store` opens it) no longer
/// holds its marker as a point with the entry's label, with its marker;
/// `None` when every member holds it.
pub fn first_missing(
    entry: &PointEntry,
    mut store: impl FnMut(&Name, &Name) -> Option<Arc<dyn ReplicaStore>>,
) -> Option<(&Name, &Name, Seq)> {
    entry.members.iter().find_map(|m| {
        let holds = store(&m.host, &m.group)
            .and_then(|s| s.point_at(m.marker))
            .is_some_and(|p| p.label == entry.label);
        (!holds).then_some((&m.host, &m.group, m.marker))
    })
}

/// Whether `entry` (a durable one) can still be had from the replicas in
/// `data_dir`: `Ok` or why not ([`SpanPointError::Expired`],
/// [`SpanPointError::NoReplica`]). Reads the replicas read-only: it works
/// while the receiver runs.
pub fn check(data_dir: &Path, span: &Name, entry: &PointEntry) -> Result<(), SpanPointError> {
    let engine = LocalEngine::new(data_dir);
    let mut opened = Ok(());
    let missing = first_missing(entry, |host, group| {
        if !engine.exists(host, group) {
            if opened.is_ok() {
                opened = Err(SpanPointError::NoReplica {
                    span: span.clone(),
                    host: host.clone(),
                    group: group.clone(),
                    dir: engine.group_dir(host, group),
                });
            }
            return None;
        }
        match engine.open_read_only(host, group) {
            Ok(s) => Some(s),
            Err(source) => {
                if opened.is_ok() {
                    opened = Err(SpanPointError::Open {
                        host: host.clone(),
                        group: group.clone(),
                        source: Box::new(source),
                    });
                }
                None
            }
        }
    });
    opened?;
    match missing {
        None => Ok(()),
        Some((host, group, marker)) => Err(SpanPointError::Expired {
            span: span.clone(),
            point: entry.point,
            host: host.clone(),
            group: group.clone(),
            marker,
        }),
    }
}

/// The durable entries of `record` that can no longer be had, by point
/// id, each with the first member whose replica in `data_dir` lost its
/// marker (or has none, or cannot be opened) and that marker. Each
/// member's replica is opened once, read-only: it works while the
/// receiver runs.
pub fn expired(data_dir: &Path, record: &SpanRecord) -> BTreeMap<u64, (Name, Name, Seq)> {
    expired_in(&LocalEngine::new(data_dir), record)
}

/// [`expired`], the members' replicas in the store of `engine` (the
/// local store, or the Ceph store from any receiver node).
pub fn expired_in(
    engine: &dyn crate::store::StoreEngine,
    record: &SpanRecord,
) -> BTreeMap<u64, (Name, Name, Seq)> {
    let mut stores: HashMap<(Name, Name), Option<Arc<dyn ReplicaStore>>> = HashMap::new();
    let mut expired = BTreeMap::new();
    for entry in record.span_points() {
        let missing = first_missing(entry, |host, group| {
            stores
                .entry((host.clone(), group.clone()))
                .or_insert_with(|| engine.open_read_only(host, group).ok())
                .clone()
        });
        if let Some((host, group, marker)) = missing {
            expired.insert(entry.point, (host.clone(), group.clone(), marker));
        }
    }
    expired
}

/// The span floor of each member of `members` (in their order): its
/// marker of the oldest span point the span keeps — the durable points
/// taken within `window` before `now_ns`, and always the newest one.
/// `None` for a member no kept point names (no floor: retention alone
/// decides).
pub fn floors(
    record: &SpanRecord,
    members: &[(Name, Name)],
    window: Duration,
    now_ns: u64,
) -> Vec<Option<Seq>> {
    let horizon = now_ns.saturating_sub(window.as_nanos().min(u128::from(u64::MAX)) as u64);
    let durable: Vec<&PointEntry> = record.span_points().collect();
    let newest = durable.len().saturating_sub(1);
    let kept = durable
        .iter()
        .enumerate()
        .filter(|(i, p)| *i == newest || p.taken_ns >= horizon)
        .map(|(_, p)| *p);
    let mut floors = vec![None; members.len()];
    for p in kept {
        for m in &p.members {
            let Some(i) = members
                .iter()
                .position(|(h, g)| *h == m.host && *g == m.group)
            else {
                continue;
            };
            let floor: &mut Option<Seq> = &mut floors[i];
            *floor = Some(floor.map_or(m.marker, |f: Seq| f.min(m.marker)));
        }
    }
    floors
}

/// One member of a pinned span point.
#[derive(Debug)]
pub struct PinnedMember {
    /// The member's host.
    pub host: Name,
    /// The member's group.
    pub group: Name,
    /// Its replica's directory.
    pub dir: PathBuf,
    /// Its marker: the recovery point to bring it to.
    pub marker: Seq,
    /// Its replica, read-only (the receiver may be writing it; the pin
    /// keeps the marker).
    pub store: Arc<dyn ReplicaStore>,
    lock: PinLock,
}

impl PinnedMember {
    /// Gives up the member's pin lock (the pin stays): a test failover
    /// takes it over.
    pub fn into_lock(self) -> PinLock {
        self.lock
    }
}

/// A span point pinned in every member: see the module's invariants.
#[derive(Debug)]
pub struct PinnedSpanPoint {
    /// The span point.
    pub entry: PointEntry,
    /// Every member, in the span's order.
    pub members: Vec<PinnedMember>,
}

impl PinnedSpanPoint {
    /// Chooses the span point `choice` of `span` in the receiver's data
    /// directory `data_dir`, takes every member's pin lock, pins every
    /// member's marker and then checks that each replica still holds it.
    /// Anything refused leaves no pin behind.
    pub fn pin(
        data_dir: &Path,
        span: &Name,
        choice: PointChoice,
    ) -> Result<PinnedSpanPoint, SpanPointError> {
        Self::pin_in(&LocalEngine::new(data_dir), data_dir, span, choice)
    }

    /// [`PinnedSpanPoint::pin`] in the store of `engine` (the local store,
    /// or the Ceph store from any receiver node), the span's record read
    /// where that store keeps it ([`load_in`]). Each member's pin lock is
    /// its group directory's under `data_dir` (created on a node that
    /// does not apply the member), and each pin is also written where the
    /// store's retention reads it (the engine's
    /// [`StorePin`](crate::pin::StorePin)) before the markers are checked.
    pub fn pin_in(
        engine: &dyn StoreEngine,
        data_dir: &Path,
        span: &Name,
        choice: PointChoice,
    ) -> Result<PinnedSpanPoint, SpanPointError> {
        let record = load_in(engine, data_dir, span)?;
        let entry = choose(span, &record, choice)?.clone();
        // Every lock first: a member of the span that another test
        // failover or failover holds is refused before any pin.
        let mut locks = Vec::new();
        for m in &entry.members {
            if !engine.exists(&m.host, &m.group) {
                return Err(SpanPointError::NoReplica {
                    span: span.clone(),
                    host: m.host.clone(),
                    group: m.group.clone(),
                    dir: PathBuf::from(engine.describe(&m.host, &m.group)),
                });
            }
            let lock = crate::pin::node_group_dir(data_dir, &m.host, &m.group)
                .and_then(|dir| {
                    let lock =
                        PinLock::acquire(&dir)?.with_store_pin(engine.store_pin(&m.host, &m.group));
                    Ok((dir, lock))
                })
                .map_err(|source| SpanPointError::Pin {
                    host: m.host.clone(),
                    group: m.group.clone(),
                    source: Box::new(source),
                })?;
            locks.push(lock);
        }
        // Then every pin, then the check: a fold that took a marker before
        // its pin is seen here.
        let pinned = (|| {
            for (m, (_, lock)) in entry.members.iter().zip(&locks) {
                lock.pin(m.marker).map_err(|source| SpanPointError::Pin {
                    host: m.host.clone(),
                    group: m.group.clone(),
                    source: Box::new(source),
                })?;
            }
            let mut stores = Vec::new();
            for m in &entry.members {
                let store = engine.open_read_only(&m.host, &m.group).map_err(|source| {
                    SpanPointError::Open {
                        host: m.host.clone(),
                        group: m.group.clone(),
                        source: Box::new(source),
                    }
                })?;
                stores.push(store);
            }
            let mut stores_iter = stores.iter();
            if let Some((host, group, marker)) =
                first_missing(&entry, |_, _| stores_iter.next().cloned())
            {
                return Err(SpanPointError::Expired {
                    span: span.clone(),
                    point: entry.point,
                    host: host.clone(),
                    group: group.clone(),
                    marker,
                });
            }
            Ok(stores)
        })();
        let stores = match pinned {
            Ok(stores) => stores,
            Err(e) => {
                for (_, lock) in &locks {
                    let _ = lock.unpin();
                }
                return Err(e);
            }
        };
        let members = entry
            .members
            .iter()
            .zip(locks)
            .zip(stores)
            .map(|((m, (dir, lock)), store)| PinnedMember {
                host: m.host.clone(),
                group: m.group.clone(),
                dir,
                marker: m.marker,
                store,
                lock,
            })
            .collect();
        Ok(PinnedSpanPoint { entry, members })
    }

    /// Removes every member's pin and releases the locks: retention may
    /// fold the markers again.
    pub fn release(self) -> Result<(), SpanPointError> {
        let mut result = Ok(());
        for m in self.members {
            if let Err(source) = m.lock.unpin() {
                if result.is_ok() {
                    result = Err(SpanPointError::Pin {
                        host: m.host,
                        group: m.group,
                        source: Box::new(source),
                    });
                }
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::MemberMarker;
    use crate::store::{ChunkRef, Disk, Purpose, ReplicaGroup};
    use tidemark_changelog::{DiskId, Entry, Record};

    fn span() -> Name {
        Name::from_static("shop")
    }

    fn members() -> Vec<(Name, Name)> {
        vec![
            (Name::from_static("web1"), Name::from_static("default")),
            (Name::from_static("db1"), Name::from_static("default")),
        ]
    }

    fn entry(point: u64, outcome: Outcome, taken_ns: u64, markers: [u64; 2]) -> PointEntry {
        PointEntry {
            point,
            taken_ns,
            app_consistent: false,
            label: format!("span-shop-{point}"),
            outcome,
            reason: None,
            members: members()
                .into_iter()
                .zip(markers)
                .map(|((host, group), m)| MemberMarker {
                    host,
                    group,
                    marker: Seq(m),
                    generation: 1,
                })
                .collect(),
        }
    }

    fn record(points: Vec<PointEntry>) -> SpanRecord {
        SpanRecord {
            points,
            ..SpanRecord::default()
        }
    }

    #[test]
    fn a_choice_names_a_durable_point_or_is_refused_by_why() {
        assert_eq!("latest".parse(), Ok(PointChoice::Latest));
        assert_eq!("12".parse(), Ok(PointChoice::Id(12)));
        assert!("x".parse::<PointChoice>().is_err());
        let empty = record(vec![]);
        assert!(matches!(
            choose(&span(), &empty, PointChoice::Latest),
            Err(SpanPointError::NoPoints { .. })
        ));
        let r = record(vec![
            entry(1, Outcome::Durable, 1, [10, 20]),
            entry(2, Outcome::Durable, 2, [12, 22]),
            entry(3, Outcome::Committed, 3, [14, 24]),
            entry(4, Outcome::Aborted, 4, [0, 0]),
        ]);
        assert_eq!(choose(&span(), &r, PointChoice::Latest).unwrap().point, 2);
        assert_eq!(choose(&span(), &r, PointChoice::Id(1)).unwrap().point, 1);
        for (id, outcome) in [(3, Outcome::Committed), (4, Outcome::Aborted)] {
            match choose(&span(), &r, PointChoice::Id(id)) {
                Err(SpanPointError::NotDurable {
                    point, outcome: o, ..
                }) => {
                    assert_eq!((point, o), (id, outcome))
                }
                other => panic!("{other:?}"),
            }
        }
        let e = choose(&span(), &r, PointChoice::Id(9)).unwrap_err();
        assert!(matches!(e, SpanPointError::NoSuchPoint { point: 9, .. }));
        assert!(e.to_string().contains("no point 9"), "{e}");
    }

    #[test]
    fn the_floor_is_each_members_marker_of_the_oldest_kept_point_and_the_newest_is_always_kept() {
        const S: u64 = 1_000_000_000;
        let r = record(vec![
            entry(1, Outcome::Durable, 10 * S, [10, 20]),
            entry(2, Outcome::Aborted, 15 * S, [0, 0]),
            entry(3, Outcome::Durable, 20 * S, [30, 25]),
            entry(4, Outcome::Committed, 25 * S, [40, 45]),
            entry(5, Outcome::Durable, 30 * S, [50, 55]),
        ]);
        let window = Duration::from_secs(15);
        // Everything within the window.
        assert_eq!(
            floors(&r, &members(), window, 20 * S),
            [Some(Seq(10)), Some(Seq(20))]
        );
        // Point 1 left the window; the committed one is no point.
        assert_eq!(
            floors(&r, &members(), window, 34 * S),
            [Some(Seq(30)), Some(Seq(25))]
        );
        // Nothing within the window: the newest still is kept.
        assert_eq!(
            floors(&r, &members(), window, 1000 * S),
            [Some(Seq(50)), Some(Seq(55))]
        );
        // A member no point names has no floor.
        let other = vec![
            members()[0].clone(),
            (Name::from_static("x"), Name::from_static("y")),
        ];
        assert_eq!(floors(&r, &other, window, 34 * S), [Some(Seq(30)), None]);
        assert_eq!(floors(&record(vec![]), &members(), window, 0), [None, None]);
    }

    /// A replica of one disk under `data/host/default` whose points are
    /// the markers `labels` at the given sequence numbers (a write before
    /// each).
    fn replica(data: &Path, host: &str, markers: &[(u64, &str)]) {
        let mut g = ReplicaGroup::open(&data.join(host).join("default")).unwrap();
        g.ensure_disks(&[Disk {
            id: DiskId(0),
            name: Name::from_static("disk"),
            size: 4096,
        }])
        .unwrap();
        g.apply_chunk(DiskId(0), 0, ChunkRef::Zero(4096), Purpose::InitialSync)
            .unwrap();
        g.commit().unwrap();
        let rec = |e: &Entry<'_>, seq: u64| Record::decode(&e.encode(seq, 0)).unwrap();
        let mut next = 1;
        for (seq, label) in markers {
            // Writes of the sequence number up to the marker.
            for s in next..*seq {
                g.apply_record(&rec(&Entry::write(0, 0, &s.to_le_bytes(), 0), s))
                    .unwrap();
            }
            next = seq + 1;
            // Now: the default retention window keeps it.
            let now = tidemark_changelog::now_ns();
            g.apply_record(&rec(&Entry::marker(label, false, now), *seq))
                .unwrap();
            g.commit().unwrap();
        }
    }

    #[test]
    fn a_point_is_pinned_in_every_member_or_refused_before_any_pin_stays() {
        let data = tempfile::tempdir().unwrap();
        let data = data.path();
        replica(data, "web1", &[(10, "span-shop-1"), (12, "span-shop-2")]);
        // db1's marker of point 1 is gone (folded, say).
        replica(data, "db1", &[(22, "span-shop-2")]);
        let dir = SpanDir::open(data, &span()).unwrap();
        dir.save(&record(vec![
            entry(1, Outcome::Durable, 1, [10, 20]),
            entry(2, Outcome::Durable, 2, [12, 22]),
            entry(3, Outcome::Committed, 3, [14, 24]),
        ]))
        .unwrap();
        let pin_of = |host: &str| {
            crate::pin::read(&tidemark_durable::FsDir::at(
                &data
                    .join(host)
                    .join("default")
                    .join(crate::pin::TEST_FAILOVER_DIR),
            ))
        };

        let e = PinnedSpanPoint::pin(data, &span(), PointChoice::Id(1)).unwrap_err();
        match &e {
            SpanPointError::Expired {
                point: 1,
                host,
                marker: Seq(20),
                ..
            } => assert_eq!(host.as_str(), "db1"),
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("expired"), "{e}");
        assert_eq!((pin_of("web1"), pin_of("db1")), (None, None));
        assert!(matches!(
            check(data, &span(), &entry(1, Outcome::Durable, 1, [10, 20])),
            Err(SpanPointError::Expired { .. })
        ));
        let gone = expired(data, &dir.load().unwrap());
        assert_eq!(gone.len(), 1, "{gone:?}");
        assert_eq!(gone[&1].2, Seq(20));
        assert!(matches!(
            PinnedSpanPoint::pin(data, &span(), PointChoice::Id(3)),
            Err(SpanPointError::NotDurable { .. })
        ));

        let pinned = PinnedSpanPoint::pin(data, &span(), PointChoice::Latest).unwrap();
        assert_eq!(pinned.entry.point, 2);
        assert_eq!(
            pinned.members.iter().map(|m| m.marker).collect::<Vec<_>>(),
            [Seq(12), Seq(22)]
        );
        assert_eq!(
            (pin_of("web1"), pin_of("db1")),
            (Some(Seq(12)), Some(Seq(22)))
        );
        let mut buf = [0u8; 8];
        pinned.members[1]
            .store
            .reader(Some(Seq(22)))
            .unwrap()
            .read(DiskId(0), 0, &mut buf)
            .unwrap();
        assert_eq!(u64::from_le_bytes(buf), 21, "the write before the marker");
        // A member pinned already: a second span failover is refused.
        assert!(matches!(
            PinnedSpanPoint::pin(data, &span(), PointChoice::Latest),
            Err(SpanPointError::Pin { .. })
        ));
        pinned.release().unwrap();
        assert_eq!((pin_of("web1"), pin_of("db1")), (None, None));

        // A member with no replica here.
        std::fs::remove_dir_all(data.join("db1")).unwrap();
        assert!(matches!(
            PinnedSpanPoint::pin(data, &span(), PointChoice::Latest),
            Err(SpanPointError::NoReplica { .. })
        ));
        assert_eq!(pin_of("web1"), None);
    }
}
