//! What other tasks hold of a connection: who it is, a way to queue frames for it, and a way to
//! close it. Pushing never waits: a full queue makes the connection a slow consumer, closed with 4008.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock, PoisonError,
        atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering},
    },
    task::Waker,
};

use futures_util::task::AtomicWaker;
use shared::{Encoding, Platform, ServerFrame};

use crate::{frame::EncodedFrame, metrics as m};

pub type ConnId = u64;

/// `rtt_ms` before the first ping came back.
pub const RTT_UNMEASURED: u64 = u64::MAX;

/// Close codes of the contract.
pub mod close_code {
    /// The session ended (the client left, or the socket broke).
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket protocol (reserved bits, unknown opcode, bad control frame).
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    pub const UNAUTHORIZED: u16 = 4001;
    /// Disconnected by the app backend (kick, ban).
    pub const DISCONNECTED: u16 = 4003;
    pub const POLICY: u16 = 4008;
    pub const TOO_MANY_CONNECTIONS: u16 = 4009;
    pub const HEARTBEAT_TIMEOUT: u16 = 4010;
    /// Replaced by a newer login of the same user (multi-login policy).
    pub const REPLACED: u16 = 4011;
}

/// Longest close reason sent: a close frame's payload is at most 125 bytes with its code.
pub const MAX_CLOSE_REASON_BYTES: usize = 100;

/// A connection's outbound queue.
#[derive(Default)]
struct Outbound {
    frames: VecDeque<Arc<EncodedFrame>>,
    /// The session is over: nothing more is queued.
    ended: bool,
}

pub struct ConnHandle {
    pub id: ConnId,
    pub user: String,
    pub platform: Platform,
    pub encoding: Encoding,
    pub peer: SocketAddr,
    pub user_agent: Option<String>,
    pub connected_at: u64,
    /// Ms since the epoch of the last frame other than `ping`; the shard reads it for auto-away.
    pub last_activity: AtomicU64,
    /// Ms since the epoch of the last thing heard from the client (any frame, pong included); the
    /// writer closes the socket with 4010 when it is two heartbeats old.
    pub last_heard: AtomicU64,
    /// Last measured WebSocket ping round trip, in ms; [`RTT_UNMEASURED`] before the first.
    pub rtt_ms: AtomicU64,
    /// Ms since the epoch when the connection's token was issued (0: it did not say); a revoke
    /// closes connections whose token is older. `refresh` moves it.
    pub token_issued_at: AtomicU64,
    /// This login's sequence in its scope under a multi-login policy (0: none); a newer login
    /// closes older ones.
    login_seq: AtomicU64,
    /// Ms since the epoch when the token expires (0: never); the writer closes with 4001 then.
    /// `refresh` moves it.
    pub token_expires_at: AtomicU64,
    /// Ms since the epoch when the drain closes this session (0: not draining): its turn, kept
    /// here rather than in the session's task, which every idle connection holds.
    pub drain_close_at: AtomicU64,
    /// Frames on their way to the socket; bounded in frames by `max_queued_frames` and in bytes
    /// by `queued_bytes`, so one slow client costs bounded memory. A plain deque rather than a
    /// channel: it allocates only while it holds frames, where a tokio `mpsc` channel kept
    /// 0.8 KiB per connection for its whole life (heaptrack, docs/benchmarks.md).
    outbound: Mutex<Outbound>,
    /// Most frames the queue holds before the connection counts as a slow consumer.
    max_queued_frames: usize,
    /// Wakes the session's task when a frame is queued or a close is asked for.
    session: AtomicWaker,
    /// Bytes (in this connection's encoding) queued and not yet written to the socket.
    queued_bytes: AtomicUsize,
    /// Most bytes `queued_bytes` may reach before the connection counts as a slow consumer.
    max_queued_bytes: AtomicUsize,
    /// The first close code asked for wins; 0 until one is. Asking wakes the session, which
    /// closes the socket with it.
    close_code: AtomicU16,
    /// The close frame's reason, when the closer gave one (the app backend's kick).
    close_reason: OnceLock<Box<str>>,
}

impl ConnHandle {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: ConnId,
        user: String,
        platform: Platform,
        encoding: Encoding,
        peer: SocketAddr,
        user_agent: Option<String>,
        now: u64,
        max_queued_frames: usize,
    ) -> Self {
        ConnHandle {
            id,
            user,
            platform,
            encoding,
            peer,
            user_agent,
            connected_at: now,
            last_activity: AtomicU64::new(now),
            last_heard: AtomicU64::new(now),
            rtt_ms: AtomicU64::new(RTT_UNMEASURED),
            token_issued_at: AtomicU64::new(0),
            token_expires_at: AtomicU64::new(0),
            drain_close_at: AtomicU64::new(0),
            login_seq: AtomicU64::new(0),
            outbound: Mutex::new(Outbound::default()),
            max_queued_frames,
            session: AtomicWaker::new(),
            queued_bytes: AtomicUsize::new(0),
            max_queued_bytes: AtomicUsize::new(usize::MAX),
            close_code: AtomicU16::new(0),
            close_reason: OnceLock::new(),
        }
    }

    /// Records the lifetime of the token the connection holds (at connect and on `refresh`).
    pub fn set_token(&self, issued_at: Option<u64>, expires_at: u64) {
        self.token_issued_at
            .store(issued_at.unwrap_or(0), Ordering::Relaxed);
        self.token_expires_at.store(expires_at, Ordering::Relaxed);
    }

    pub fn set_login_seq(&self, seq: u64) {
        self.login_seq.store(seq, Ordering::Relaxed);
    }

    pub fn login_seq(&self) -> u64 {
        self.login_seq.load(Ordering::Relaxed)
    }

    /// Whether the token was issued before `at` (or does not say when it was).
    pub fn token_issued_before(&self, at: u64) -> bool {
        self.token_issued_at.load(Ordering::Relaxed) < at
    }

    /// Asks the session to close with `code` and a reason for the close frame (cut to
    /// [`MAX_CLOSE_REASON_BYTES`] on a character boundary). True if this call decided the code.
    pub fn close_with(&self, code: u16, reason: &str) -> bool {
        let mut end = reason.len().min(MAX_CLOSE_REASON_BYTES);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let first = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first && end > 0 {
            let _ = self.close_reason.set(reason[..end].into());
        }
        self.session.wake();
        first
    }

    /// The reason given with the close code, if any.
    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.get().map(|r| &**r)
    }

    /// Bounds the bytes queued for this connection (see `push`).
    pub fn set_max_queued_bytes(&self, max: usize) {
        self.max_queued_bytes.store(max, Ordering::Relaxed);
    }

    /// Queues a frame shared with other connections (encoded at most once per encoding, by the
    /// first connection that needs it). False when the connection is closing, the frame cannot
    /// be encoded for it, or it was just found too slow: more frames than the queue holds, or
    /// more bytes than `max_queued_bytes` (a single frame larger than that still goes to an empty
    /// queue: its size is bounded by the reply and frame limits).
    pub fn push(&self, frame: &Arc<EncodedFrame>) -> bool {
        let Some(size) = frame.bytes(self.encoding).map(|b| b.len()) else {
            return false;
        };
        let queued = self.queued_bytes.fetch_add(size, Ordering::AcqRel);
        if queued > 0 && queued + size > self.max_queued_bytes.load(Ordering::Relaxed) {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            self.too_slow();
            return false;
        }
        let mut outbound = self.outbound();
        if outbound.ended {
            drop(outbound);
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            return false;
        }
        if outbound.frames.len() >= self.max_queued_frames {
            drop(outbound);
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            self.too_slow();
            return false;
        }
        outbound.frames.push_back(frame.clone());
        drop(outbound);
        self.session.wake();
        true
    }

    /// The oldest queued frame, for the session to write (or a test to read). The queue's memory
    /// goes once it is empty, so an idle connection holds none.
    pub fn pop_queued(&self) -> Option<Arc<EncodedFrame>> {
        let mut outbound = self.outbound();
        let frame = outbound.frames.pop_front();
        if outbound.frames.is_empty() && outbound.frames.capacity() > 0 {
            outbound.frames = VecDeque::new();
        }
        frame
    }

    /// Whether frames wait in the queue.
    pub fn has_queued(&self) -> bool {
        !self.outbound().frames.is_empty()
    }

    /// The session's task is woken when a frame is queued or a close is asked for.
    pub fn register_session(&self, waker: &Waker) {
        self.session.register(waker);
    }

    /// The session has ended: what is still queued is dropped, and pushes fail from now on.
    pub fn end_queue(&self) {
        let mut outbound = self.outbound();
        outbound.ended = true;
        outbound.frames = VecDeque::new();
    }

    fn outbound(&self) -> std::sync::MutexGuard<'_, Outbound> {
        // Nothing panics while holding the lock, and a deque is valid whatever happened.
        self.outbound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer wrote `size` bytes of queued frames.
    pub fn written(&self, size: usize) {
        self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
    }

    fn too_slow(&self) {
        if self.close(close_code::POLICY) {
            metrics::counter!(m::SLOW_CONSUMER_CLOSES).increment(1);
            tracing::info!(conn = self.id, user = %self.user, "closing slow consumer");
        }
    }

    /// Queues a frame for this connection only.
    pub fn push_frame(&self, frame: ServerFrame) -> bool {
        self.push(&EncodedFrame::new(frame))
    }

    /// Asks the session to close with `code`. True if this call decided the code.
    pub fn close(&self, code: u16) -> bool {
        let first = self
            .close_code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        self.session.wake();
        first
    }

    pub fn requested_close_code(&self) -> Option<u16> {
        match self.close_code.load(Ordering::Acquire) {
            0 => None,
            code => Some(code),
        }
    }

    /// Whether a close was asked for (the socket may still be closing).
    pub fn is_closing(&self) -> bool {
        self.close_code.load(Ordering::Acquire) != 0
    }

    pub fn last_activity(&self) -> u64 {
        self.last_activity.load(Ordering::Relaxed)
    }

    /// Records activity; returns the previous time.
    pub fn touch(&self, now: u64) -> u64 {
        self.last_activity.swap(now, Ordering::Relaxed)
    }
}
