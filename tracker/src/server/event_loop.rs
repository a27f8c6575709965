//! The transmission phase of one NBD connection: an event loop on the
//! connection's own io_uring, driving the connection's [`Queue`].
//!
//! ```text
//!   socket ──read──► parse, validate ──► Queue ──poll_io──► ring (device I/O)
//!     ▲                                   ▲  │                  │
//!     └──writev── replies ◄──poll_reply───┘  └──handle_io◄──────┘
//!                                         ▲
//!                      waker (eventfd) ───┘ handle_wake: parked requests,
//!                                            budget, shutdown
//! ```
//!
//! One thread, one ring, no hand-off per request: requests are read in
//! batches (one `read` may carry many), their device I/O is submitted
//! together with one `io_uring_enter` that also waits for whatever comes
//! next (a completion, the socket, the waker), and replies leave in
//! gathered writes. The socket is non-blocking: a client that stops
//! reading its replies stalls only its own connection (no more requests
//! are read from it once its limits are reached), and is dropped when a
//! reply makes no progress for [`ServerOptions::reply_timeout`].
//!
//! Limits: at most [`ServerOptions::max_in_flight`] requests and
//! [`ServerOptions::max_in_flight_bytes`] of data buffers per connection,
//! and data buffers within the server's [`DataBudget`] (shared by every
//! connection, and with the ublk queues of the same tracker); one request
//! larger than a limit still runs, alone. A header is only taken off the
//! stream when its request fits, so a client that floods requests is
//! simply not read from.
//!
//! Ending: on `NBD_CMD_DISC`, EOF, garbage, a broken reply or shutdown the
//! loop stops reading, lets every request handed to the queue finish (a
//! write whose payload never fully arrived is never handed over), sends
//! the replies it still can, and returns.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};
use tidemark_changelog::DiskId;

use crate::backend::BackendError;
use crate::nbd::constants::Errno;
use crate::nbd::handshake::Negotiated;
use crate::nbd::transmission::{
    encode_block_status, encode_offset_data_header, encode_simple_reply, Command, ErrorReply,
    Recovery, RequestHeader, ERROR_CHUNK_LEN, OFFSET_DATA_HEADER_LEN, REQUEST_HEADER_LEN,
    SIMPLE_REPLY_LEN,
};
use crate::queue::{Op, Queue, QueueWaker, Request, Wakers};
use crate::ring::{arm_waker, drain_completions, push, DeviceIo, DEVICE_TAG, TAG_MASK};
use crate::storage::AlignedBuf;

use super::listener::Stream;
use super::{Frontend, Shared};

/// Room for the longest fixed reply header the server sends.
const MAX_REPLY_HEADER: usize = 32;

const _: () = assert!(
    SIMPLE_REPLY_LEN <= MAX_REPLY_HEADER
        && OFFSET_DATA_HEADER_LEN <= MAX_REPLY_HEADER
        && ERROR_CHUNK_LEN <= MAX_REPLY_HEADER
);

/// Bytes read from the socket at a time (headers and small payloads).
const RX_BYTES: usize = 128 << 10;
/// Most iovecs one `writev` gathers.
const MAX_IOVECS: usize = 64;
/// The request size a connection holding no buffer may start beyond the
/// server's budget, within [`FLOOR_RESERVE`] (see `Conn::admit`).
pub const FLOOR_BYTES: u64 = 1 << 20;
/// How far past its limit the budget goes for such requests, all
/// connections together: the bound on the memory they add.
pub const FLOOR_RESERVE: u64 = 16 << 20;
/// How long the loop sleeps at most without an event (to notice a reply
/// that makes no progress).
const TICK: Duration = Duration::from_millis(250);

const SOCKET_IN: u64 = 1 << 56;
const SOCKET_OUT: u64 = 2 << 56;
const WAKE: u64 = 3 << 56;

/// The data buffers in flight of every connection of a server (and of the
/// ublk queues that share it): bounded, so the tracker's memory is.
#[derive(Debug)]
pub struct DataBudget {
    limit: u64,
    in_use: AtomicU64,
    /// Queues that found the budget spent and wait for it.
    waiters: Wakers,
}

impl DataBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<DataBudget> {
        Arc::new(DataBudget {
            limit,
            in_use: AtomicU64::new(0),
            waiters: Wakers::default(),
        })
    }

    /// Takes `bytes` if they fit; a request larger than the whole budget
    /// is let through when nothing else is in flight.
    pub fn try_take(&self, bytes: u64) -> bool {
        bytes == 0 || self.take_within(bytes, self.limit, true)
    }

    /// Takes `bytes` of the reserve past the limit, if they fit in it (see
    /// the connection loop's floor).
    pub fn try_take_reserve(&self, bytes: u64) -> bool {
        self.take_within(bytes, self.limit.saturating_add(FLOOR_RESERVE), false)
    }

    /// Takes `bytes` if the total stays within `ceiling` (or, `alone`, if
    /// nothing else is in flight).
    fn take_within(&self, bytes: u64, ceiling: u64, alone: bool) -> bool {
        let mut in_use = self.in_use.load(Ordering::SeqCst);
        loop {
            let fits = in_use.saturating_add(bytes) <= ceiling || (alone && in_use == 0);
            if !fits {
                return false;
            }
            match self.in_use.compare_exchange_weak(
                in_use,
                in_use + bytes,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => in_use = now,
            }
        }
    }

    /// Takes `bytes` whatever is in use: memory held for as long as its
    /// owner lives, which sized it within the limit (a ublk device's fixed
    /// tag buffers). Given back with [`give`](Self::give).
    pub fn reserve(&self, bytes: u64) {
        self.in_use.fetch_add(bytes, Ordering::SeqCst);
    }

    /// Gives `bytes` back, waking whoever waits for them.
    pub fn give(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.in_use.fetch_sub(bytes, Ordering::SeqCst);
        self.waiters.wake_parked();
    }

    /// Lets `waker`'s queue wait for the budget.
    pub fn register(&self, waker: &Arc<QueueWaker>) {
        self.waiters.register(waker);
    }

    /// Asks to be woken when budget is given back (park, then look again).
    pub fn park(&self, waker: &QueueWaker) {
        self.waiters.park(waker);
    }

    /// Bytes in flight now.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::SeqCst)
    }

    /// The limit.
    pub fn limit(&self) -> u64 {
        self.limit
    }
}

/// Why the transmission phase ended.
#[derive(Debug)]
pub(crate) enum LoopEnd {
    /// The client closed the socket between requests.
    ClientClosed,
    /// `NBD_CMD_DISC`.
    Disconnected,
    /// The server is stopping.
    Stopping,
    /// The stream lost its framing.
    Framing(crate::nbd::transmission::FramingError),
    /// A refused write too large to skip.
    OversizedWrite(crate::nbd::transmission::RequestError),
    /// A reply could not be written in time.
    ReplyFailed,
    /// The socket or the ring failed.
    Io(io::Error),
}

/// What the parser is in the middle of.
enum RxState {
    /// Expecting a request header.
    Header,
    /// Reading a write's payload into its buffer.
    Payload {
        id: u64,
        offset: u64,
        fua: bool,
        data: AlignedBuf,
        filled: usize,
    },
    /// Dropping a refused write's payload, then answering with `errno`.
    Discard {
        left: u64,
        cookie: u64,
        errno: Errno,
    },
}

/// A request the client is owed a reply for.
struct Owed {
    cookie: u64,
    /// Bytes of data buffer it holds (budget and limits).
    bytes: u64,
    /// A read's offset (structured replies name it), or `None`.
    read_at: Option<u64>,
}

/// One reply on its way out.
struct OutReply {
    header: [u8; MAX_REPLY_HEADER],
    header_len: usize,
    data: Payload,
    sent: usize,
    /// Budget bytes to give back once sent.
    bytes: u64,
}

enum Payload {
    None,
    Buf(AlignedBuf, usize),
    Vec(Vec<u8>),
}

impl Payload {
    fn as_slice(&self) -> &[u8] {
        match self {
            Payload::None => &[],
            Payload::Buf(buf, len) => &buf[..*len],
            Payload::Vec(v) => v,
        }
    }
}

impl OutReply {
    fn new(header: &[u8], data: Payload, bytes: u64) -> OutReply {
        let header_len = header.len().min(MAX_REPLY_HEADER);
        let mut fixed = [0; MAX_REPLY_HEADER];
        fixed[..header_len].copy_from_slice(&header[..header_len]);
        OutReply {
            header: fixed,
            header_len,
            data,
            sent: 0,
            bytes,
        }
    }

    fn len(&self) -> usize {
        self.header_len + self.data.as_slice().len()
    }
}

/// Data buffers of one loop (an NBD connection, a ublk queue), reused by
/// size: at most `keep` of up to `keep_size` bytes stay for reuse, so
/// what a loop holds idle is bounded.
pub(crate) struct Buffers {
    free: Vec<AlignedBuf>,
    keep: usize,
    keep_size: usize,
}

impl Buffers {
    /// A connection's: 32 buffers of up to 1 MiB.
    pub(crate) const CONNECTION: (usize, usize) = (32, 1 << 20);

    pub(crate) fn new((keep, keep_size): (usize, usize)) -> Buffers {
        Buffers {
            free: Vec::new(),
            keep,
            keep_size,
        }
    }

    pub(crate) fn take(&mut self, len: usize) -> AlignedBuf {
        if let Some(i) = self.free.iter().position(|b| b.len() == len) {
            return self.free.swap_remove(i);
        }
        AlignedBuf::page_aligned(len)
    }

    pub(crate) fn give(&mut self, buf: AlignedBuf) {
        if buf.len() <= self.keep_size && self.free.len() < self.keep {
            self.free.push(buf);
        }
    }
}

/// One connection's loop state.
struct Conn<'a> {
    id: u64,
    stream: &'a Stream,
    fd: i32,
    /// What the client was told (its size raised from `told_size`).
    session: Negotiated,
    /// For a client told the export's size out of band (the kernel
    /// attached over netlink): that size, raised when the client is told
    /// a larger one. Requests are held to it instead of the handshake's.
    told_size: Option<&'a AtomicU64>,
    disk: DiskId,
    frontend: &'a Frontend,
    shared: &'a Shared,
    ring: IoUring,
    queue: Box<dyn Queue>,
    waker: Arc<QueueWaker>,
    dev: DeviceIo,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    state: RxState,
    owed: Vec<Option<Owed>>,
    owed_free: Vec<usize>,
    owed_count: usize,
    owed_bytes: u64,
    tx: VecDeque<OutReply>,
    /// When the first byte of `tx` stopped moving.
    tx_stalled: Option<Instant>,
    buffers: Buffers,
    /// Still taking requests.
    reading: bool,
    /// The socket may have more to read now.
    readable: bool,
    writable: bool,
    /// Reading waits for a reply to free room (a limit was reached).
    throttled: bool,
    poll_in: bool,
    poll_out: bool,
    wake_armed: bool,
    broken: bool,
    end: Option<LoopEnd>,
    stopping: &'a AtomicBool,
}

/// Runs the transmission phase of a negotiated connection until it ends.
pub(crate) fn run(
    id: u64,
    stream: &Stream,
    session: &Negotiated,
    told_size: Option<&AtomicU64>,
    disk: DiskId,
    frontend: &Frontend,
    shared: &Shared,
) -> LoopEnd {
    let setup = (|| -> io::Result<(IoUring, Arc<QueueWaker>)> {
        stream.set_nonblocking(true)?;
        let entries = (shared.options.max_in_flight as u32 + 8).next_power_of_two();
        let ring = build_ring(entries)?;
        Ok((ring, QueueWaker::new()?))
    })();
    let (ring, waker) = match setup {
        Ok(parts) => parts,
        Err(error) => return LoopEnd::Io(error),
    };
    shared.budget.register(&waker);
    let now = Instant::now();
    let queue = (frontend.queues)(&waker, now);
    let mut conn = Conn {
        id,
        stream,
        fd: stream.as_raw_fd(),
        session: session.clone(),
        told_size,
        disk,
        frontend,
        shared,
        ring,
        queue,
        waker,
        dev: DeviceIo::new(frontend.devices.clone(), frontend.use_ring),
        rx: vec![0; RX_BYTES].into_boxed_slice(),
        rx_start: 0,
        rx_end: 0,
        state: RxState::Header,
        owed: Vec::new(),
        owed_free: Vec::new(),
        owed_count: 0,
        owed_bytes: 0,
        tx: VecDeque::new(),
        tx_stalled: None,
        buffers: Buffers::new(Buffers::CONNECTION),
        reading: true,
        readable: true,
        writable: true,
        throttled: false,
        poll_in: false,
        poll_out: false,
        wake_armed: false,
        broken: false,
        end: None,
        stopping: &shared.stopping,
    };
    conn.run();
    conn.finish()
}

/// A ring for one loop: cooperative task running where the kernel has it
/// (fewer interrupts of the loop's thread), plain otherwise.
pub(crate) fn build_ring(entries: u32) -> io::Result<IoUring> {
    match IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .build(entries)
    {
        Ok(ring) => Ok(ring),
        Err(_) => IoUring::new(entries),
    }
}

impl Conn<'_> {
    fn run(&mut self) {
        loop {
            let now = Instant::now();
            if self.stopping.load(Ordering::SeqCst) && self.reading {
                self.stop_reading(LoopEnd::Stopping);
            }
            // A client that does not take its replies gets no more
            // requests read until it does.
            if self.reading && self.readable && !self.throttled && self.writable {
                self.receive(now);
            }
            self.pump(now);
            self.send(now);
            if self.end.is_some() && self.idle() {
                return;
            }
            if let Err(error) = self.wait(now) {
                tracing::error!(conn = self.id, %error, "the connection's io_uring failed");
                self.end.get_or_insert(LoopEnd::Io(error));
                self.reading = false;
                self.broken = true;
                // Nothing can complete any more; what is in flight is
                // abandoned only once the ring says so (never: wait out).
                if self.dev.in_flight() == 0 {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    /// Nothing is left in flight and nothing is left to send.
    fn idle(&self) -> bool {
        self.queue.in_flight() == 0
            && self.dev.in_flight() == 0
            && (self.tx.is_empty() || self.broken)
    }

    fn stop_reading(&mut self, end: LoopEnd) {
        self.reading = false;
        if self.end.is_none() {
            self.end = Some(end);
        }
    }

    fn finish(mut self) -> LoopEnd {
        // Replies never sent give their budget back, and so does a write
        // whose payload never fully arrived (it was never handed over).
        while let Some(reply) = self.tx.pop_front() {
            self.retire(reply);
        }
        self.shared.budget.give(self.partial_payload_bytes());
        self.end.take().unwrap_or(LoopEnd::ClientClosed)
    }

    fn partial_payload_bytes(&self) -> u64 {
        match &self.state {
            RxState::Payload { data, .. } => data.len() as u64,
            _ => 0,
        }
    }

    /// Moves device I/O and replies between the queue, the ring and the
    /// reply list, until the queue has nothing more to give.
    fn pump(&mut self, now: Instant) {
        loop {
            let mut moved = self.dev.start_all(&mut self.ring, &mut *self.queue, now);
            while let Some(reply) = self.queue.poll_reply() {
                moved = true;
                self.reply(reply.id, reply.result, reply.buf);
            }
            if !moved {
                return;
            }
        }
    }

    /// Turns a finished request into its NBD reply.
    fn reply(&mut self, id: u64, result: Result<(), BackendError>, buf: Option<AlignedBuf>) {
        let index = id as usize;
        let Some(owed) = self.owed.get_mut(index).and_then(Option::take) else {
            tracing::error!(conn = self.id, id, "a reply for no request");
            return;
        };
        self.owed_free.push(index);
        self.owed_count -= 1;
        self.owed_bytes -= owed.bytes;
        self.throttled = false;
        let structured = self.session.structured_replies;
        let out = match (result, owed.read_at, buf) {
            (Ok(()), Some(offset), Some(buf)) => {
                let len = buf.len();
                if structured {
                    // One chunk, so DF is honoured whatever the client asked.
                    match encode_offset_data_header(owed.cookie, offset, len as u32, true) {
                        Ok(header) => OutReply::new(&header, Payload::Buf(buf, len), owed.bytes),
                        Err(error) => {
                            tracing::error!(conn = self.id, %error, "cannot encode a read reply");
                            self.buffers.give(buf);
                            self.error_reply(owed.cookie, Errno::Io, owed.bytes)
                        }
                    }
                } else {
                    OutReply::new(
                        &encode_simple_reply(owed.cookie, None),
                        Payload::Buf(buf, len),
                        owed.bytes,
                    )
                }
            }
            (Ok(()), _, buf) => {
                if let Some(buf) = buf {
                    self.buffers.give(buf);
                }
                OutReply::new(
                    &encode_simple_reply(owed.cookie, None),
                    Payload::None,
                    owed.bytes,
                )
            }
            (Err(error), _, buf) => {
                if let Some(buf) = buf {
                    self.buffers.give(buf);
                }
                self.error_reply(owed.cookie, Errno::of_backend(&error), owed.bytes)
            }
        };
        self.tx.push_back(out);
    }

    fn error_reply(&self, cookie: u64, errno: Errno, bytes: u64) -> OutReply {
        let reply = ErrorReply::new(cookie, errno, self.session.structured_replies);
        OutReply::new(reply.as_bytes(), Payload::None, bytes)
    }

    /// A slot for a request the client is owed a reply for.
    fn owe(&mut self, cookie: u64, bytes: u64, read_at: Option<u64>) -> u64 {
        let owed = Owed {
            cookie,
            bytes,
            read_at,
        };
        self.owed_count += 1;
        self.owed_bytes += bytes;
        match self.owed_free.pop() {
            Some(index) => {
                self.owed[index] = Some(owed);
                index as u64
            }
            None => {
                self.owed.push(Some(owed));
                (self.owed.len() - 1) as u64
            }
        }
    }

    /// Whether a request needing `bytes` of data buffer may start now;
    /// if so its bytes are taken from the server's budget.
    ///
    /// A connection that holds no buffer may take one request of up to
    /// [`FLOOR_BYTES`] past the budget, from its [`FLOOR_RESERVE`]: clients
    /// that spent the budget (on replies they never read, say) cannot stop
    /// the others, which go on one request at a time until it comes back.
    /// The memory this adds is bounded by [`FLOOR_RESERVE`].
    fn admit(&mut self, bytes: u64) -> bool {
        let options = &self.shared.options;
        let fits = self.owed_count < options.max_in_flight
            && (self.owed_count == 0
                || self.owed_bytes.saturating_add(bytes) <= options.max_in_flight_bytes);
        if !fits {
            self.throttled = true;
            return false;
        }
        let budget = &self.shared.budget;
        if budget.try_take(bytes) {
            return true;
        }
        if self.owed_bytes == 0 && bytes <= FLOOR_BYTES && budget.try_take_reserve(bytes) {
            return true;
        }
        // Wait for the budget: park, then look once more.
        budget.park(&self.waker);
        if budget.try_take(bytes) {
            return true;
        }
        self.throttled = true;
        false
    }

    /// Reads and handles what the socket has, within the limits.
    fn receive(&mut self, now: Instant) {
        loop {
            if !self.reading || self.throttled {
                return;
            }
            // A payload being read goes straight into its buffer.
            if let RxState::Payload { .. } = self.state {
                if !self.fill_payload(now) {
                    return;
                }
                continue;
            }
            if let RxState::Discard { .. } = self.state {
                if !self.drain_discard() {
                    return;
                }
                continue;
            }
            if self.rx_end - self.rx_start >= REQUEST_HEADER_LEN {
                self.parse_header(now);
                continue;
            }
            if !self.read_more() {
                return;
            }
        }
    }

    /// Reads into the receive buffer; false when nothing more can be read
    /// now (the socket is then watched, or the connection ends).
    fn read_more(&mut self) -> bool {
        if self.rx_start > 0 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let fd = self.fd;
        let free = &mut self.rx[self.rx_end..];
        match read_fd(fd, free) {
            Ok(0) => {
                let end = if self.rx_end > 0 || !matches!(self.state, RxState::Header) {
                    // A request cut short: it is not performed.
                    LoopEnd::Io(io::ErrorKind::UnexpectedEof.into())
                } else {
                    LoopEnd::ClientClosed
                };
                self.stop_reading(end);
                false
            }
            Ok(n) => {
                self.rx_end += n;
                true
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                self.readable = false;
                false
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => true,
            Err(error) => {
                self.stop_reading(LoopEnd::Io(error));
                false
            }
        }
    }

    /// Decodes, validates and dispatches the header at the front of the
    /// receive buffer (it is left there if its request must wait).
    fn parse_header(&mut self, now: Instant) {
        let bytes: [u8; REQUEST_HEADER_LEN] = self.rx
            [self.rx_start..self.rx_start + REQUEST_HEADER_LEN]
            .try_into()
            .unwrap_or([0; REQUEST_HEADER_LEN]);
        let header = match RequestHeader::decode(&bytes) {
            Ok(header) => header,
            Err(error) => {
                self.stop_reading(LoopEnd::Framing(error));
                return;
            }
        };
        if let Some(told) = self.told_size {
            self.session.export.size = told.load(Ordering::Acquire);
        }
        let command = match header.validate(&self.session) {
            Ok(command) => command,
            Err(rejection) => {
                tracing::debug!(conn = self.id, reason = %rejection.reason, "request refused");
                self.rx_start += REQUEST_HEADER_LEN;
                let errno = rejection.errno();
                match rejection.recovery {
                    Recovery::Reply => self.refuse(header.cookie, errno),
                    Recovery::DiscardThenReply { payload } => {
                        self.state = RxState::Discard {
                            left: u64::from(payload),
                            cookie: header.cookie,
                            errno,
                        };
                    }
                    Recovery::Close => {
                        self.refuse(header.cookie, errno);
                        self.stop_reading(LoopEnd::OversizedWrite(rejection.reason));
                    }
                }
                return;
            }
        };
        let bytes = match command {
            Command::Read { length, .. } | Command::Write { length, .. } => u64::from(length),
            _ => 0,
        };
        if !matches!(command, Command::Disconnect) && !self.admit(bytes) {
            return;
        }
        self.rx_start += REQUEST_HEADER_LEN;
        let disk = self.disk;
        match command {
            Command::Disconnect => self.stop_reading(LoopEnd::Disconnected),
            Command::Read { offset, length, .. } => {
                let id = self.owe(header.cookie, bytes, Some(offset));
                let buf = self.buffers.take(length as usize);
                self.queue.handle_request(
                    Request {
                        id,
                        disk,
                        op: Op::Read {
                            offset,
                            len: length,
                        },
                        buf: Some(buf),
                    },
                    now,
                );
            }
            Command::Write {
                offset,
                length,
                fua,
            } => {
                let id = self.owe(header.cookie, bytes, None);
                let data = self.buffers.take(length as usize);
                self.state = RxState::Payload {
                    id,
                    offset,
                    fua,
                    data,
                    filled: 0,
                };
            }
            Command::Flush => {
                let id = self.owe(header.cookie, 0, None);
                self.handle(id, Op::Flush, now);
            }
            Command::Trim {
                offset,
                length,
                fua,
            } => {
                let id = self.owe(header.cookie, 0, None);
                let op = Op::Trim {
                    offset,
                    len: u64::from(length),
                    fua,
                };
                self.handle(id, op, now);
            }
            // Never offered (SEND_FAST_ZERO is not advertised), so the
            // validator refuses it; answered as the protocol asks anyway.
            Command::WriteZeroes {
                fast_zero: true, ..
            } => self.refuse(header.cookie, Errno::NotSup),
            Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast_zero: false,
            } => {
                let id = self.owe(header.cookie, 0, None);
                let op = Op::WriteZeroes {
                    offset,
                    len: u64::from(length),
                    no_hole,
                    fua,
                };
                self.handle(id, op, now);
            }
            // A hint; the backend has no cache to warm.
            Command::Cache { .. } => {
                self.tx.push_back(OutReply::new(
                    &encode_simple_reply(header.cookie, None),
                    Payload::None,
                    0,
                ));
            }
            Command::BlockStatus {
                offset,
                length,
                context,
                req_one,
            } => {
                let asked = self
                    .frontend
                    .backend
                    .allocation(disk, offset, u64::from(length));
                let reply = match asked {
                    Ok(runs) => {
                        let extents = super::block_status_extents(&runs, offset, length, req_one);
                        let mut out = Vec::with_capacity(24 + 8 * extents.len());
                        match encode_block_status(header.cookie, context, &extents, true, &mut out)
                        {
                            Ok(()) => OutReply::new(&[], Payload::Vec(out), 0),
                            Err(error) => {
                                tracing::error!(conn = self.id, %error, "cannot encode a block-status reply");
                                self.error_reply(header.cookie, Errno::Io, 0)
                            }
                        }
                    }
                    Err(error) => {
                        tracing::warn!(conn = self.id, error = ?error, "block status failed");
                        self.error_reply(header.cookie, Errno::of_backend(&error), 0)
                    }
                };
                self.tx.push_back(reply);
            }
        }
    }

    fn handle(&mut self, id: u64, op: Op, now: Instant) {
        self.queue.handle_request(
            Request {
                id,
                disk: self.disk,
                op,
                buf: None,
            },
            now,
        );
    }

    /// Answers a refused request at once.
    fn refuse(&mut self, cookie: u64, errno: Errno) {
        let reply = self.error_reply(cookie, errno, 0);
        self.tx.push_back(reply);
    }

    /// Fills the current write's payload; hands the write over once it is
    /// complete. False when the socket has nothing more now.
    fn fill_payload(&mut self, now: Instant) -> bool {
        let RxState::Payload { data, filled, .. } = &mut self.state else {
            return true;
        };
        let buffered = self.rx_end - self.rx_start;
        if buffered > 0 {
            let n = buffered.min(data.len() - *filled);
            data[*filled..*filled + n].copy_from_slice(&self.rx[self.rx_start..self.rx_start + n]);
            *filled += n;
            self.rx_start += n;
        } else if data.len() - *filled >= RX_BYTES / 2 {
            // A large rest goes straight into the buffer, not via rx.
            match read_fd(self.fd, &mut data[*filled..]) {
                Ok(0) => {
                    self.stop_reading(LoopEnd::Io(io::ErrorKind::UnexpectedEof.into()));
                    return false;
                }
                Ok(n) => *filled += n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return false;
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    self.stop_reading(LoopEnd::Io(error));
                    return false;
                }
            }
        } else if !self.read_more() {
            return false;
        }
        let RxState::Payload { data, filled, .. } = &self.state else {
            return true;
        };
        if *filled == data.len() {
            let RxState::Payload {
                id,
                offset,
                fua,
                data,
                ..
            } = std::mem::replace(&mut self.state, RxState::Header)
            else {
                return true;
            };
            self.queue.handle_request(
                Request {
                    id,
                    disk: self.disk,
                    op: Op::Write { offset, fua },
                    buf: Some(data),
                },
                now,
            );
        }
        true
    }

    /// Drops a refused write's payload, then answers it.
    fn drain_discard(&mut self) -> bool {
        let RxState::Discard { left, .. } = &mut self.state else {
            return true;
        };
        let buffered = (self.rx_end - self.rx_start) as u64;
        if *left > 0 && buffered > 0 {
            let n = buffered.min(*left);
            *left -= n;
            self.rx_start += n as usize;
        } else if *left > 0 && !self.read_more() {
            return false;
        }
        if let RxState::Discard {
            left: 0,
            cookie,
            errno,
        } = self.state
        {
            self.state = RxState::Header;
            self.refuse(cookie, errno);
        }
        true
    }

    /// Writes queued replies, gathered; each whole, never interleaved.
    fn send(&mut self, now: Instant) {
        if self.broken {
            // Nothing more goes out; buffers and budget come back.
            while let Some(reply) = self.tx.pop_front() {
                self.retire(reply);
            }
            return;
        }
        while !self.tx.is_empty() && self.writable {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(MAX_IOVECS);
            for reply in self.tx.iter() {
                if slices.len() + 2 > MAX_IOVECS {
                    break;
                }
                let mut skip = reply.sent;
                let header = &reply.header[..reply.header_len];
                if skip < header.len() {
                    slices.push(IoSlice::new(&header[skip..]));
                    skip = 0;
                } else {
                    skip -= header.len();
                }
                let data = reply.data.as_slice();
                if skip < data.len() {
                    slices.push(IoSlice::new(&data[skip..]));
                }
            }
            match send_fd(self.fd, &slices) {
                Ok(mut n) => {
                    self.tx_stalled = None;
                    while n > 0 {
                        let Some(front) = self.tx.front_mut() else {
                            break;
                        };
                        let rest = front.len() - front.sent;
                        if n >= rest {
                            n -= rest;
                            if let Some(done) = self.tx.pop_front() {
                                self.retire(done);
                            }
                        } else {
                            front.sent += n;
                            n = 0;
                        }
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.writable = false;
                    self.tx_stalled.get_or_insert(now);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::debug!(conn = self.id, %error, "writing a reply failed; closing the connection");
                    self.fail_replies();
                    return;
                }
            }
        }
        if let Some(since) = self.tx_stalled {
            if now.saturating_duration_since(since) >= self.shared.options.reply_timeout {
                tracing::info!(conn = self.id, "the client reads no replies; dropping it");
                self.fail_replies();
            }
        }
    }

    /// The socket cannot take replies: stop everything but the requests
    /// in flight, which finish without being answered.
    fn fail_replies(&mut self) {
        self.broken = true;
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        self.stop_reading(LoopEnd::ReplyFailed);
        while let Some(reply) = self.tx.pop_front() {
            self.retire(reply);
        }
    }

    fn retire(&mut self, reply: OutReply) {
        self.shared.budget.give(reply.bytes);
        if let Payload::Buf(buf, _) = reply.data {
            self.buffers.give(buf);
        }
    }

    /// Arms what the loop waits for and waits for the next event (or the
    /// tick), then handles the completions.
    fn wait(&mut self, now: Instant) -> io::Result<()> {
        let want_in =
            self.reading && !self.readable && !self.throttled && self.writable && !self.poll_in;
        if want_in {
            self.arm_poll(SOCKET_IN, libc::POLLIN);
            self.poll_in = true;
        }
        let want_out = !self.broken && !self.tx.is_empty() && !self.writable && !self.poll_out;
        if want_out {
            self.arm_poll(SOCKET_OUT, libc::POLLOUT);
            self.poll_out = true;
        }
        if !self.wake_armed {
            arm_waker(&mut self.ring, &self.waker, WAKE);
            self.wake_armed = true;
        }
        // More to do without waiting: the socket has data we may read, or
        // replies may be written.
        let busy = (self.reading && self.readable && !self.throttled && self.writable)
            || (!self.tx.is_empty() && self.writable && !self.broken);
        let submitted = if busy {
            self.ring.submit()
        } else {
            let ts = types::Timespec::from(TICK);
            let args = types::SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        };
        match submitted {
            Ok(_) => {}
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(error) => return Err(error),
        }
        self.reap(now);
        Ok(())
    }

    fn arm_poll(&mut self, tag: u64, events: i16) {
        push(
            &mut self.ring,
            &opcode::PollAdd::new(types::Fd(self.fd), events as u32)
                .build()
                .user_data(tag),
        );
    }

    /// Handles every completion the ring holds.
    fn reap(&mut self, _before: Instant) {
        let now = Instant::now();
        for (data, result) in drain_completions(&mut self.ring) {
            match data & TAG_MASK {
                DEVICE_TAG => {
                    self.dev
                        .complete_into(&mut self.ring, data, result, &mut *self.queue, now);
                }
                SOCKET_IN => {
                    self.poll_in = false;
                    self.readable = true;
                }
                SOCKET_OUT => {
                    self.poll_out = false;
                    self.writable = true;
                }
                WAKE => {
                    self.wake_armed = false;
                    self.waker.reset();
                    // Parked requests, the budget, a stop: look at all.
                    self.throttled = false;
                    self.queue.handle_wake(now);
                }
                _ => tracing::error!(conn = self.id, data, "a completion for nothing"),
            }
        }
    }
}

fn read_fd(fd: i32, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: reads into a live, writable buffer of the given length from
    // an fd the connection owns for the whole call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A gathered, non-blocking send that never raises SIGPIPE.
fn send_fd(fd: i32, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    // IoSlice is ABI-compatible with iovec (std guarantees it); the kernel
    // only reads through these pointers.
    msg.msg_iov = slices.as_ptr().cast::<libc::iovec>().cast_mut();
    msg.msg_iovlen = slices.len();
    // SAFETY: every slice borrows memory that lives for the whole call; the
    // fd is the connection's.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_past_a_spent_budget_are_bounded_by_the_reserve() {
        let budget = DataBudget::new(8 << 20);
        assert!(budget.try_take(8 << 20));
        assert!(!budget.try_take(4096));
        let mut floor = 0;
        while budget.try_take_reserve(FLOOR_BYTES) {
            floor += 1;
            assert!(floor <= 64, "the reserve never runs out");
        }
        assert_eq!(floor, FLOOR_RESERVE / FLOOR_BYTES);
        assert_eq!(budget.in_use(), (8 << 20) + FLOOR_RESERVE);
        budget.give(FLOOR_BYTES);
        assert!(budget.try_take_reserve(FLOOR_BYTES));
    }
}
