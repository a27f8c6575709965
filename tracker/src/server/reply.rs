//! Writing a connection's replies: each one whole (header and data in one
//! gathered write, never interleaved with another), in completion order,
//! without making a worker wait behind another worker's write.
//!
//! A finished request's reply goes into the connection's outbox. If nobody
//! is writing to the socket, the worker that queued it becomes the writer
//! and sends queued replies until the outbox is empty; otherwise it leaves
//! the reply to the current writer and goes back to the pool. The
//! `writing` flag is the per-connection writer lock, held across exactly
//! one reply per iteration. So a client that stops reading its replies
//! holds at most one worker (for at most the reply timeout, after which
//! the connection is dropped), not every worker that finished one of its
//! requests — the other connections keep their workers.
//!
//! A reply carries its request's in-flight slot, released only once the
//! reply is on the socket (or the connection is broken), so "nothing in
//! flight" means "every reply sent".

use std::collections::VecDeque;
use std::io::IoSlice;
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::nbd::transmission::{ERROR_CHUNK_LEN, OFFSET_DATA_HEADER_LEN, SIMPLE_REPLY_LEN};

use super::connection::InFlightSlot;
use super::listener::{write_all_within, Stream};
use super::worker::{lock, BufferPool};

/// Room for the longest fixed reply header the server sends.
const MAX_REPLY_HEADER: usize = 32;

const _: () = assert!(
    SIMPLE_REPLY_LEN <= MAX_REPLY_HEADER
        && OFFSET_DATA_HEADER_LEN <= MAX_REPLY_HEADER
        && ERROR_CHUNK_LEN <= MAX_REPLY_HEADER
);

/// One reply, owning everything it sends.
pub(crate) struct OutgoingReply {
    header: [u8; MAX_REPLY_HEADER],
    header_len: usize,
    /// Read data or an encoded chunk; a pooled buffer, returned after.
    data: Vec<u8>,
    /// The request's in-flight slot.
    slot: InFlightSlot,
}

impl OutgoingReply {
    /// A reply of a fixed header (at most 32 bytes; all the protocol layer
    /// produces are) followed by `data`.
    pub(crate) fn new(header: &[u8], data: Vec<u8>, slot: InFlightSlot) -> Self {
        debug_assert!(header.len() <= MAX_REPLY_HEADER, "reply header too long");
        let header_len = header.len().min(MAX_REPLY_HEADER);
        let mut fixed = [0; MAX_REPLY_HEADER];
        fixed[..header_len].copy_from_slice(&header[..header_len]);
        Self {
            header: fixed,
            header_len,
            data,
            slot,
        }
    }
}

/// The queue of replies waiting for a connection's socket.
pub(crate) struct Outbox {
    state: Mutex<OutboxState>,
    /// Only ever locked by the current writer, so never contended; a mutex
    /// rather than a cell only to keep this code free of `unsafe`.
    stream: Mutex<Stream>,
    buffers: Arc<BufferPool>,
    /// Longest time one reply may take to write.
    reply_timeout: Duration,
    conn_id: u64,
}

#[derive(Default)]
struct OutboxState {
    queue: VecDeque<OutgoingReply>,
    /// Someone is sending the queue: the writer lock.
    writing: bool,
    /// A write failed or timed out; the stream may hold half a reply, so
    /// nothing more is sent and the socket is shut down.
    broken: bool,
}

impl Outbox {
    /// An outbox writing to `stream`, whose write timeout must already be
    /// `reply_timeout`.
    pub(crate) fn new(
        stream: Stream,
        buffers: Arc<BufferPool>,
        reply_timeout: Duration,
        conn_id: u64,
    ) -> Self {
        Self {
            state: Mutex::new(OutboxState::default()),
            stream: Mutex::new(stream),
            buffers,
            reply_timeout,
            conn_id,
        }
    }

    /// Whether replies can no longer be sent.
    pub(crate) fn is_broken(&self) -> bool {
        lock(&self.state).broken
    }

    /// Sends `reply`, now or (if another thread is writing) soon. Returns
    /// once the reply is written or in the hands of the current writer.
    pub(crate) fn send(&self, reply: OutgoingReply) {
        let mut state = lock(&self.state);
        if state.broken {
            drop(state);
            self.retire(reply);
            return;
        }
        state.queue.push_back(reply);
        if state.writing {
            return;
        }
        state.writing = true;
        while let Some(next) = state.queue.pop_front() {
            drop(state);
            let written = {
                let mut stream = lock(&self.stream);
                let mut slices = [
                    IoSlice::new(&next.header[..next.header_len]),
                    IoSlice::new(&next.data),
                ];
                write_all_within(&mut stream, &mut slices, self.reply_timeout)
            };
            self.retire(next);
            state = lock(&self.state);
            if let Err(error) = written {
                tracing::debug!(conn = self.conn_id, %error, "writing a reply failed; closing the connection");
                state.broken = true;
                let _ = lock(&self.stream).shutdown(Shutdown::Both);
                let abandoned = std::mem::take(&mut state.queue);
                state.writing = false;
                drop(state);
                abandoned.into_iter().for_each(|reply| self.retire(reply));
                return;
            }
        }
        state.writing = false;
    }

    /// Returns a sent (or abandoned) reply's buffer and frees its slot.
    fn retire(&self, reply: OutgoingReply) {
        let OutgoingReply { data, slot, .. } = reply;
        self.buffers.give_back(data);
        drop(slot);
    }
}
