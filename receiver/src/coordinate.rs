//! The receiver's span coordinators: one task per `[[receiver.span]]`,
//! the thin shell around `tidemark_span::Coordinator` (whose module
//! documents the protocol). The task
//!
//! - learns each member's link from the sessions: a member's session of
//!   protocol version 3 or later opens the hold stream beside it on the
//!   same connection (the shipper relays what comes on it to its tracker:
//!   the protected host opens no port); an older session is a link that
//!   cannot hold; the session's end is the link's end;
//! - starts a round every `interval` (application-consistent every
//!   `app-consistent-every`, and on demand when asked so), and saves the
//!   span's record
//!   (`crate::span`) whenever the core asks, before it sends what uses it;
//! - follows each committed point until every member's replica holds its
//!   marker as a committed recovery point (the marker's sequence number
//!   and label), by looking at the members' stores;
//! - records every outcome in the span's record, durably.
//!
//! Membership comes from this receiver's configuration only: a session is
//! a member's when its host (from its certificate) and group (from its
//! hello) are named in a span. Rounds stop for a member whose link is
//! down; nothing waits on a member for longer than the core's bounds.
//!
//! Where the span's record is kept is the store engine's
//! ([`crate::span::SpanStore`]). With the local store it is the span's
//! directory and every configured span's task starts with the receiver.
//! With a store shared between receivers (Ceph) the record is an object
//! written under the span's lease (`crate::store::ceph::span` documents
//! the rules): a span's task starts only once this receiver took the
//! span's lease, which it does when a member's session arrives
//! ([`Spans::ensure_held`]: taken if free, else the session is sent to
//! the holder), and it stops as soon as the lease is gone (a save
//! refused, the lease lost or fenced); the members' sessions here then
//! end, and their shippers find the span's new holder.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidemark_changelog::Seq;
use tidemark_config::SpanEntry;
use tidemark_names::{Label, Name};
use tidemark_span::{
    AbortReason, Coordinator, CoordinatorConfig, HoldMessage, Link, PointId, SpanEvent,
    StartRefused,
};
use tidemark_wire::{Compression, Message, MessageDecoder, MessageType, PROTOCOL_VERSION};
use tokio::sync::{mpsc, watch};

use crate::replica::StoreReplica;
use crate::span::{Outcome, SpanDir, SpanRecord, SpanRecordError, SpanStore};
use crate::span_take;
use crate::store::StoreEngine;

/// The replica stores open in this receiver, by (host, group).
pub(crate) type OpenGroups = Arc<Mutex<HashMap<(Name, Name), Arc<Mutex<StoreReplica>>>>>;

/// The first protocol version whose sessions carry holds.
const HOLDS_SINCE: u16 = 3;
/// How often committed points are looked for in the members' stores.
const DURABLE_POLL: Duration = Duration::from_millis(200);
/// How often a request for a point on demand is looked for.
const TAKE_POLL: Duration = Duration::from_millis(250);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a span's task hears from the sessions.
#[derive(Debug)]
enum Input {
    /// A member's session started (its link replaces any older one).
    Up { member: usize, link: HoldLink },
    /// The link `id` of a member ended.
    Down { member: usize, id: u64 },
    /// An answer arrived on the link `id` of a member.
    Hold {
        member: usize,
        id: u64,
        message: HoldMessage,
    },
}

/// A member's connection as its span's task uses it.
#[derive(Debug)]
struct HoldLink {
    id: u64,
    conn: quinn::Connection,
    /// The hold stream's sender (`None`: the session is too old to hold).
    frames: Option<mpsc::UnboundedSender<HoldMessage>>,
    /// The session's version has the quiesce messages.
    quiesce: bool,
}

impl HoldLink {
    fn link(&self) -> Link {
        Link::Up {
            rtt: self.conn.rtt(),
            holds: self.frames.is_some(),
            quiesce: self.frames.is_some() && self.quiesce,
        }
    }
}

/// What one scrape reports of one span.
#[derive(Debug, Clone, Default)]
pub(crate) struct SpanSample {
    /// The span's name.
    pub(crate) name: String,
    /// Its members.
    pub(crate) members: usize,
    /// Members whose session is connected and can hold.
    pub(crate) connected: usize,
    /// The span's RPO target.
    pub(crate) target: Duration,
    /// When the newest span point was taken (ns since the Unix epoch).
    pub(crate) last_point_ns: Option<u64>,
    /// When this coordinator started (ns since the Unix epoch).
    pub(crate) started_ns: u64,
    /// Rounds since the coordinator started that became span points.
    pub(crate) durable: u64,
    /// Rounds since the coordinator started that were abandoned.
    pub(crate) aborted: u64,
    /// Rounds due that could not start (a member down or too old).
    pub(crate) not_started: u64,
}

/// The spans of this receiver, by member.
#[derive(Debug)]
pub(crate) struct Spans {
    /// Each member's span (an index in `spans`) and place in it.
    members: HashMap<(Name, Name), (usize, usize)>,
    spans: Vec<SpanSlot>,
    next_link: AtomicU64,
    /// What a task started later needs.
    data_dir: std::path::PathBuf,
    groups: OpenGroups,
    window: Duration,
    stop: watch::Receiver<bool>,
}

/// One configured span and its task, if it runs here.
#[derive(Debug)]
struct SpanSlot {
    entry: SpanEntry,
    /// The running task's input (closed once the task ended).
    task: Mutex<Option<Running>>,
}

/// A running span task: its input and its metrics' sample.
type Running = (mpsc::UnboundedSender<Input>, Arc<Mutex<SpanSample>>);

impl SpanSlot {
    /// The running task's input, if it runs.
    fn running(&self) -> Option<mpsc::UnboundedSender<Input>> {
        lock(&self.task)
            .as_ref()
            .filter(|(tx, _)| !tx.is_closed())
            .map(|(tx, _)| tx.clone())
    }
}

/// Why a member's group is not to be applied here.
#[derive(Debug)]
pub(crate) enum NotHeld {
    /// Another receiver holds the span's lease (at this advertised
    /// address, if it recorded one).
    Elsewhere(Option<String>),
    /// Taking the span's lease failed (the cluster, or a damaged record).
    Failed(String),
}

/// A session's place in its span: the link ends when it is dropped.
#[must_use = "the member's link ends when this is dropped"]
pub(crate) struct Attached {
    tx: mpsc::UnboundedSender<Input>,
    member: usize,
    id: u64,
    stream: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(stream) = &self.stream {
            stream.abort();
        }
        let _ = self.tx.send(Input::Down {
            member: self.member,
            id: self.id,
        });
    }
}

impl Spans {
    /// The spans of `spans`, stopping when `stop` turns true. The span
    /// points within `window` (the receiver's retention window) are kept:
    /// see [`SpanTask::set_floors`]. With an engine that keeps no span
    /// records (the local store), every span's task starts now, its record
    /// in `data_dir`; else each starts once its lease is taken
    /// ([`Spans::ensure_held`]).
    pub(crate) fn start(
        spans: &[SpanEntry],
        data_dir: &std::path::Path,
        groups: OpenGroups,
        window: Duration,
        stop: watch::Receiver<bool>,
        shared: bool,
    ) -> Result<Spans, SpanRecordError> {
        let mut members = HashMap::new();
        let mut slots = Vec::new();
        for (s, entry) in spans.iter().enumerate() {
            for (i, m) in entry.members.iter().enumerate() {
                members.insert((m.host.clone(), m.group.clone()), (s, i));
            }
            slots.push(SpanSlot {
                entry: entry.clone(),
                task: Mutex::new(None),
            });
        }
        let spans = Spans {
            members,
            spans: slots,
            next_link: AtomicU64::new(1),
            data_dir: data_dir.to_path_buf(),
            groups,
            window,
            stop,
        };
        if !shared {
            for slot in &spans.spans {
                let store = SpanDir::open(data_dir, &slot.entry.name)?;
                let running = spans.run(&slot.entry, Box::new(store))?;
                *lock(&slot.task) = Some(running);
            }
        }
        Ok(spans)
    }

    /// Starts the task of the span `entry` with its record in `store`:
    /// its input and its metrics' sample.
    fn run(
        &self,
        entry: &SpanEntry,
        store: Box<dyn SpanStore>,
    ) -> Result<Running, SpanRecordError> {
        let record = store.load()?;
        let dir = SpanDir::open(&self.data_dir, &entry.name)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut task = SpanTask::new(entry.clone(), dir, store, record, self.groups.clone());
        task.window = self.window;
        let sample = task.sample.clone();
        tokio::spawn(task.run(rx, self.stop.clone()));
        Ok((tx, sample))
    }

    /// Makes sure that the span of `host`'s `group` (if it is a member)
    /// is coordinated here before the group is applied here: its task
    /// runs, or this receiver takes the span's lease from `engine` (free:
    /// a new span, or its holder's lease expired) and starts it. Another
    /// live holder: [`NotHeld::Elsewhere`], the member's shipper is to be
    /// sent there.
    pub(crate) fn ensure_held(
        &self,
        host: &Name,
        group: &Name,
        engine: &dyn StoreEngine,
    ) -> Result<(), NotHeld> {
        let Some(&(s, _)) = self.members.get(&(host.clone(), group.clone())) else {
            return Ok(());
        };
        let slot = &self.spans[s];
        // One taker at a time per span: two members' sessions arriving
        // together take the lease once.
        let mut task = lock(&slot.task);
        if task.as_ref().is_some_and(|(tx, _)| !tx.is_closed()) {
            return Ok(());
        }
        let span = &slot.entry.name;
        let taken = tokio::task::block_in_place(|| engine.take_span(span));
        let store = match taken {
            // Spans kept in the data directory run from the start.
            None => return Ok(()),
            Some(Ok(store)) => store,
            Some(Err(crate::lease_task::TakeoverError::OwnedElsewhere { owner })) => {
                return Err(NotHeld::Elsewhere(owner))
            }
            Some(Err(e)) => {
                let why = crate::daemon::error_chain(&e);
                tracing::warn!(%span, error = %why, "cannot take the span's lease");
                return Err(NotHeld::Failed(why));
            }
        };
        tracing::info!(%span, record = %store.describe(), "span lease taken: this receiver coordinates the span and applies its members");
        match self.run(&slot.entry, store) {
            Ok(running) => {
                *task = Some(running);
                Ok(())
            }
            Err(e) => {
                engine.release_span(span);
                Err(NotHeld::Failed(crate::daemon::error_chain(&e)))
            }
        }
    }

    /// Whether the span of `host`'s `group` (if it is a member) is
    /// coordinated here: a member's session ends once it is not.
    pub(crate) fn holds_span_of(&self, host: &Name, group: &Name) -> bool {
        match self.members.get(&(host.clone(), group.clone())) {
            None => true,
            Some(&(s, _)) => self.spans[s].running().is_some(),
        }
    }

    /// Every span's sample coordinated here, for the metrics.
    pub(crate) fn samples(&self) -> Vec<SpanSample> {
        self.spans
            .iter()
            .filter_map(|slot| {
                let task = lock(&slot.task);
                let (tx, sample) = task.as_ref()?;
                (!tx.is_closed()).then(|| lock(sample).clone())
            })
            .collect()
    }

    /// Whether `host`'s `group` is a member of a span here.
    pub(crate) fn is_member(&self, host: &Name, group: &Name) -> bool {
        self.members.contains_key(&(host.clone(), group.clone()))
    }

    /// A session of `host`'s `group` in protocol `version` started on
    /// `conn`: if the group is a span's member, its hold stream is opened
    /// (version 3 on) and the span's task told.
    pub(crate) fn attach(
        &self,
        host: &Name,
        group: &Name,
        conn: &quinn::Connection,
        version: u16,
    ) -> Option<Attached> {
        let &(s, member) = self.members.get(&(host.clone(), group.clone()))?;
        let member = &member;
        let tx = &self.spans[s].running()?;
        let id = self.next_link.fetch_add(1, Ordering::Relaxed);
        let (frames, stream) = if version >= HOLDS_SINCE {
            let (ftx, frx) = mpsc::unbounded_channel();
            let stream = tokio::spawn(hold_stream(
                conn.clone(),
                version.min(PROTOCOL_VERSION),
                frx,
                tx.clone(),
                *member,
                id,
            ));
            (Some(ftx), Some(stream))
        } else {
            tracing::warn!(%host, %group, version, "this member's shipper speaks a protocol without span holds: the span takes no points until it is upgraded");
            (None, None)
        };
        let link = HoldLink {
            id,
            conn: conn.clone(),
            frames,
            quiesce: version.min(PROTOCOL_VERSION) >= MessageType::HoldQuiesce.since(),
        };
        let _ = tx.send(Input::Up {
            member: *member,
            link,
        });
        Some(Attached {
            tx: tx.clone(),
            member: *member,
            id,
            stream,
        })
    }
}

/// Runs a member's hold stream: what the task sends goes out in `version`,
/// what comes back goes to the task; its end is the link's end.
async fn hold_stream(
    conn: quinn::Connection,
    version: u16,
    mut outgoing: mpsc::UnboundedReceiver<HoldMessage>,
    task: mpsc::UnboundedSender<Input>,
    member: usize,
    id: u64,
) {
    let ended = |why: String| {
        tracing::info!(member, reason = %why, "a span member's hold stream ended");
        let _ = task.send(Input::Down { member, id });
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return ended(e.to_string()),
    };
    let mut decoder = MessageDecoder::new();
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            out = outgoing.recv() => {
                let Some(message) = out else { return };
                let frame = match Message::Hold(message).encode(version, Compression::None) {
                    Ok(f) => f,
                    Err(e) => return ended(format!("encoding a hold: {e}")),
                };
                if let Err(e) = send.write_all(&frame).await {
                    return ended(e.to_string());
                }
            }
            read = recv.read(&mut buf) => {
                match read {
                    Ok(Some(n)) => decoder.feed(&buf[..n]),
                    Ok(None) => return ended("closed by the shipper".into()),
                    Err(e) => return ended(e.to_string()),
                }
                loop {
                    match decoder.next_message() {
                        Ok(Some(m)) => match m.message {
                            Message::Hold(message) => {
                                let _ = task.send(Input::Hold { member, id, message });
                            }
                            Message::Error { message, .. } => {
                                return ended(format!("the shipper refused: {message}"))
                            }
                            other => {
                                return ended(format!(
                                    "unexpected {} on the hold stream",
                                    other.msg_type().name()
                                ))
                            }
                        },
                        Ok(None) => break,
                        Err(e) => return ended(format!("a bad frame: {e}")),
                    }
                }
            }
        }
    }
}

/// A committed point being followed until every member's replica holds
/// its marker.
#[derive(Debug)]
struct Following {
    point: PointId,
    label: String,
    markers: Vec<(Seq, u32)>,
    durable: Vec<bool>,
    /// Committed before this coordinator started: the core does not know
    /// it; it is decided here, by `by`.
    inherited: Option<Instant>,
}

/// One span's coordinator task.
struct SpanTask {
    entry: SpanEntry,
    members: Vec<(Name, Name)>,
    /// Where the record is kept.
    store: Box<dyn SpanStore>,
    /// The span's directory on this node: requests for a point on demand.
    dir: SpanDir,
    record: SpanRecord,
    core: Coordinator,
    links: Vec<Option<HoldLink>>,
    groups: OpenGroups,
    /// The round running: its point, label and consistency.
    round: Option<(PointId, Label, bool)>,
    following: Vec<Following>,
    next_round: Instant,
    /// When the next scheduled application-consistent round is due
    /// (`None`: the span has no such schedule).
    next_app_round: Option<Instant>,
    /// Why the last round could not start (said once until it changes).
    last_refusal: Option<StartRefused>,
    /// What the metrics show of this span.
    sample: Arc<Mutex<SpanSample>>,
    /// The last request for a point on demand that was answered.
    answered_take: Option<u64>,
    /// How long span points are kept (the receiver's retention window).
    window: Duration,
}

impl SpanTask {
    fn new(
        entry: SpanEntry,
        dir: SpanDir,
        store: Box<dyn SpanStore>,
        record: SpanRecord,
        groups: OpenGroups,
    ) -> SpanTask {
        let members: Vec<(Name, Name)> = entry
            .members
            .iter()
            .map(|m| (m.host.clone(), m.group.clone()))
            .collect();
        let now = Instant::now();
        let core = Coordinator::new(CoordinatorConfig::default(), members.len(), record.saved());
        let by = now + CoordinatorConfig::default().durable_timeout;
        let following = record
            .points
            .iter()
            .filter(|p| p.outcome == Outcome::Committed && p.members.len() == members.len())
            .map(|p| Following {
                point: PointId(p.point),
                label: p.label.clone(),
                markers: p.members.iter().map(|m| (m.marker, m.generation)).collect(),
                durable: vec![false; members.len()],
                inherited: Some(by),
            })
            .collect();
        let sample = Arc::new(Mutex::new(SpanSample {
            name: entry.name.to_string(),
            members: members.len(),
            target: entry.target.get(),
            last_point_ns: newest_point_ns(&record),
            started_ns: tidemark_changelog::now_ns(),
            ..SpanSample::default()
        }));
        SpanTask {
            sample,
            answered_take: None,
            links: (0..members.len()).map(|_| None).collect(),
            next_round: now + entry.interval.get(),
            next_app_round: entry.app_consistent_every.map(|every| now + every.get()),
            entry,
            members,
            store,
            dir,
            record,
            core,
            groups,
            round: None,
            following,
            last_refusal: None,
            window: Duration::MAX,
        }
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Input>,
        mut stop: watch::Receiver<bool>,
    ) {
        tracing::info!(span = %self.entry.name, members = self.members.len(), epoch = self.core.epoch().0, record = %self.store.describe(), "span coordinator started");
        loop {
            if self.store.fenced() {
                // Another receiver holds the span now (or will): nothing
                // more is sent or saved from here; the members' sessions
                // here end and their shippers find the holder.
                tracing::warn!(span = %self.entry.name, "the span's lease is gone: this receiver stops coordinating the span");
                return;
            }
            let now = Instant::now();
            let mut wake = self.next_round.min(now + TAKE_POLL);
            if let Some(t) = self.core.poll_timeout() {
                wake = wake.min(t);
            }
            if !self.following.is_empty() {
                wake = wake.min(now + DURABLE_POLL);
            }
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.handle(input, Instant::now()),
                    None => return,
                },
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = stop.changed() => {
                    if *stop.borrow() {
                        return;
                    }
                }
            }
            let now = Instant::now();
            self.core.handle_timeout(now);
            if now >= self.next_round {
                self.next_round = now + self.entry.interval.get();
                self.set_floors();
                let label = format!("span-{}-{}", self.entry.name, self.record.next_point.max(1));
                // An application-consistent round stays due until one
                // starts.
                let app = self.next_app_round.is_some_and(|due| now >= due);
                if self.start_round(&label, app, now).is_ok() && app {
                    self.next_app_round = self
                        .entry
                        .app_consistent_every
                        .map(|every| now + every.get());
                }
            }
            self.look_for_take(now);
            self.look_for_durable();
            self.drive(Instant::now());
            self.publish();
        }
    }

    /// Brings the metrics' sample up to date.
    fn publish(&self) {
        let mut sample = lock(&self.sample);
        sample.connected = self
            .links
            .iter()
            .filter(|l| l.as_ref().is_some_and(|l| l.frames.is_some()))
            .count();
        sample.last_point_ns = newest_point_ns(&self.record);
    }

    fn handle(&mut self, input: Input, now: Instant) {
        match input {
            Input::Up { member, link } => {
                self.core.handle_link(member, link.link(), now);
                self.links[member] = Some(link);
            }
            Input::Down { member, id } => {
                if self.links[member].as_ref().is_some_and(|l| l.id == id) {
                    self.links[member] = None;
                    self.core.handle_link(member, Link::Down, now);
                }
            }
            Input::Hold {
                member,
                id,
                message,
            } => {
                if self.links[member].as_ref().is_some_and(|l| l.id == id) {
                    self.core.handle_message(member, message, now);
                }
            }
        }
    }

    /// Starts a round whose markers are labelled `label` (`app`: quiesce
    /// every member first): the point's id, or why it could not start.
    fn start_round(&mut self, label: &str, app: bool, now: Instant) -> Result<PointId, String> {
        // The round's timing comes from the links' round trips now.
        for (member, link) in self.links.iter().enumerate() {
            if let Some(link) = link {
                self.core.handle_link(member, link.link(), now);
            }
        }
        let label = Label::new(label).map_err(|e| {
            tracing::error!(span = %self.entry.name, error = %e, "cannot label the span's markers");
            e.to_string()
        })?;
        match self.core.start_point(app, label.clone(), now) {
            Ok(id) => {
                self.round = Some((id, label, app));
                self.last_refusal = None;
                Ok(id)
            }
            Err(why) => {
                lock(&self.sample).not_started += 1;
                let why_text = self.refusal_text(&why);
                if self.last_refusal.as_ref() != Some(&why) {
                    tracing::warn!(span = %self.entry.name, reason = %why_text, "no span point taken");
                    self.last_refusal = Some(why);
                }
                Err(why_text)
            }
        }
    }

    /// A request for a point on demand, once no round runs: starts it and
    /// answers which point it is, or why none.
    fn look_for_take(&mut self, now: Instant) {
        if self.round.is_some() {
            return;
        }
        let dir = self.dir.path().to_path_buf();
        let request = match span_take::read_request(&dir) {
            Ok(Some(r)) if self.answered_take != Some(r.id) => r,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(span = %self.entry.name, error = %e, "cannot read the request for a span point");
                return;
            }
        };
        if matches!(span_take::read_result(&dir), Ok(Some(r)) if r.id == request.id) {
            // Answered before a restart.
            self.answered_take = Some(request.id);
            return;
        }
        let result = self
            .start_round(request.label.as_str(), request.app_consistent, now)
            .map(|point| point.0);
        tracing::info!(span = %self.entry.name, label = %request.label, app_consistent = request.app_consistent, ?result, "span point asked for");
        let answer = span_take::TakeResult {
            id: request.id,
            result,
        };
        match tokio::task::block_in_place(|| span_take::write_result(&dir, &answer)) {
            Ok(()) => self.answered_take = Some(request.id),
            Err(e) => {
                tracing::warn!(span = %self.entry.name, error = %e, "cannot answer the request for a span point")
            }
        }
    }

    fn refusal_text(&self, why: &StartRefused) -> String {
        let name = |m: usize| {
            self.members
                .get(m)
                .map_or_else(|| format!("member {m}"), |(h, g)| format!("{h}/{g}"))
        };
        match why {
            StartRefused::MemberDown(m) => format!("{} is not connected", name(*m)),
            StartRefused::MemberTooOld(m) => {
                format!("{}'s shipper runs a release without span points", name(*m))
            }
            other => other.to_string(),
        }
    }

    /// Sends what the core says, records what happened.
    fn drive(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(event) = self.core.poll_event() {
                progressed = true;
                self.on_event(event, now);
            }
            while let Some((member, message)) = self.core.poll_transmit() {
                progressed = true;
                let sent = self.links[member]
                    .as_ref()
                    .and_then(|l| l.frames.as_ref())
                    .is_some_and(|f| f.send(message).is_ok());
                if !sent {
                    self.core.handle_link(member, Link::Down, now);
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn on_event(&mut self, event: SpanEvent, now: Instant) {
        let (label, app) = match (&event, &self.round) {
            (
                SpanEvent::Committed { point, .. } | SpanEvent::Aborted { point, .. },
                Some((p, l, a)),
            ) if p == point => (l.to_string(), *a),
            _ => (String::new(), false),
        };
        match &event {
            SpanEvent::Save(saved) => {
                let saved = *saved;
                if self.persist(&event, &label, app) {
                    self.core.handle_saved(saved, now);
                } else {
                    // Nothing that needed it was sent: a new coordinator
                    // (a higher epoch) starts from what is saved.
                    self.restart_core(now);
                }
                return;
            }
            SpanEvent::Committed {
                point,
                markers,
                app_consistent,
                not_quiesced,
            } => {
                tracing::info!(span = %self.entry.name, point = point.0, app_consistent, "span point committed; waiting for every member's marker on the replica site");
                for n in not_quiesced {
                    let (host, group) = &self.members[n.member];
                    tracing::warn!(span = %self.entry.name, point = point.0, %host, %group, reason = %n.reason, "a member was not quiesced: the span point is crash-consistent");
                }
                self.following.push(Following {
                    point: *point,
                    label: label.clone(),
                    markers: markers.clone(),
                    durable: vec![false; markers.len()],
                    inherited: None,
                });
                self.round = None;
            }
            SpanEvent::Durable { point } => {
                tracing::info!(span = %self.entry.name, point = point.0, "span point durable on every member");
                lock(&self.sample).durable += 1;
                self.following.retain(|f| f.point != *point);
                self.persist(&event, &label, app);
                self.set_floors();
                return;
            }
            SpanEvent::Aborted { point, reason } => {
                tracing::warn!(span = %self.entry.name, point = point.0, reason = %reason, "span point abandoned");
                lock(&self.sample).aborted += 1;
                self.following.retain(|f| f.point != *point);
                if self.round.as_ref().is_some_and(|(p, ..)| p == point) {
                    self.round = None;
                }
            }
        }
        self.persist(&event, &label, app);
    }

    /// Applies `event` to the record and writes it; whether it was
    /// written.
    fn persist(&mut self, event: &SpanEvent, label: &str, app: bool) -> bool {
        let mut next = self.record.clone();
        if !next.apply(
            event,
            &self.members,
            label,
            app,
            tidemark_changelog::now_ns(),
        ) {
            return true;
        }
        match tokio::task::block_in_place(|| self.store.save(&next)) {
            Ok(()) => {
                self.record = next;
                true
            }
            Err(e) => {
                tracing::error!(span = %self.entry.name, error = %e, "cannot write the span's record");
                false
            }
        }
    }

    fn restart_core(&mut self, now: Instant) {
        self.core = Coordinator::new(
            CoordinatorConfig::default(),
            self.members.len(),
            self.record.saved(),
        );
        self.round = None;
        // Points the old core followed are decided here now.
        let by = now + CoordinatorConfig::default().durable_timeout;
        for f in &mut self.following {
            f.inherited.get_or_insert(by);
        }
        for (member, link) in self.links.iter().enumerate() {
            if let Some(link) = link {
                self.core.handle_link(member, link.link(), now);
            }
        }
    }

    /// Sets each open member's span floor from the record (its marker of
    /// the oldest span point kept, `crate::span_point::floors`), so that no
    /// member's retention folds a marker the span still offers. A member
    /// opened later keeps the floor its store saved, and gets the new one
    /// at the next round.
    fn set_floors(&self) {
        let floors = crate::span_point::floors(
            &self.record,
            &self.members,
            self.window,
            tidemark_changelog::now_ns(),
        );
        for ((host, group), floor) in self.members.iter().zip(floors) {
            let replica = lock(&self.groups)
                .get(&(host.clone(), group.clone()))
                .cloned();
            let Some(replica) = replica else { continue };
            let set = tokio::task::block_in_place(|| lock(&replica).set_floor(floor));
            if let Err(e) = set {
                tracing::error!(span = %self.entry.name, %host, %group, error = %e, "cannot set the member's span floor");
            }
        }
    }

    /// Looks in the members' stores for the markers of the points being
    /// followed; decides inherited ones.
    fn look_for_durable(&mut self) {
        if self.following.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut events = Vec::new();
        for f in &mut self.following {
            for (member, (host, group)) in self.members.iter().enumerate() {
                if f.durable[member] {
                    continue;
                }
                let (marker, generation) = f.markers[member];
                if holds_marker(&self.groups, host, group, marker, &f.label) {
                    f.durable[member] = true;
                    if f.inherited.is_none() {
                        self.core.handle_durable(member, marker, generation);
                    }
                }
            }
            if let Some(by) = f.inherited {
                if f.durable.iter().all(|d| *d) {
                    events.push(SpanEvent::Durable { point: f.point });
                } else if now >= by {
                    let member = f.durable.iter().position(|d| !d).unwrap_or(0);
                    events.push(SpanEvent::Aborted {
                        point: f.point,
                        reason: AbortReason::NotDurable(member),
                    });
                }
            }
        }
        for event in events {
            self.on_event(event, now);
        }
    }
}

/// When the record's newest span point was taken.
fn newest_point_ns(record: &SpanRecord) -> Option<u64> {
    record.span_points().map(|p| p.taken_ns).max()
}

/// Whether the store of `host`'s `group`, if open here, has a committed
/// recovery point at `marker` labelled `label`.
fn holds_marker(groups: &OpenGroups, host: &Name, group: &Name, marker: Seq, label: &str) -> bool {
    let replica = lock(groups).get(&(host.clone(), group.clone())).cloned();
    let Some(replica) = replica else { return false };
    tokio::task::block_in_place(|| {
        lock(&replica)
            .group()
            .point_at(marker)
            .is_some_and(|p| p.label == label)
    })
}
