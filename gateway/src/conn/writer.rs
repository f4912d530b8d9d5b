//! The write side of a session: drains the connection's outbound queue into the socket in bursts,
//! sends the heartbeat pings, and closes the socket with the code (and reason) asked for. It is a
//! state machine polled by the session's one task (`session.rs`), not a task of its own: a second
//! task per connection cost ~0.6 KiB of every idle connection (docs/benchmarks.md).

use std::{
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::SinkExt;
use shared::Encoding;

use crate::{
    conn_handle::{ConnHandle, close_code},
    frame::EncodedFrame,
};

/// Bounds one write burst (see `Writer::poll_write`): enough to make one syscall carry a backlog,
/// small enough that a burst does not grow the connection's write buffer for good.
const WRITE_BURST_FRAMES: usize = 64;
pub(super) const WRITE_BURST_BYTES: usize = 16 * 1024;

/// What the write side has begun and not finished. Everything lives here, not in a future, so
/// the session may stop polling it at any point (to read, or to close) and lose nothing.
#[derive(Default)]
pub(super) struct Writer {
    /// Frames were handed to the socket and not yet flushed.
    flushing: bool,
    /// A heartbeat ping waits to be sent, carrying this time (ms since the epoch); 0: none.
    ping: u64,
}

impl Writer {
    /// Sends a ping carrying `now` with the next write.
    pub(super) fn ping(&mut self, now: u64) {
        self.ping = now;
    }

    /// Writes what is queued (and registers the task to be woken when more is, or a close is asked
    /// for): a due ping, then whatever frames are queued, up to
    /// `WRITE_BURST_FRAMES` frames or `WRITE_BURST_BYTES` per burst, each burst with one flush, so
    /// under load one `send()` carries many frames instead of one syscall and one loopback/TCP
    /// transmit per frame (the gateway's main per-delivery cost). Pending while there is nothing
    /// to write or the socket cannot take more (the task is woken by either); ready only when
    /// the socket failed.
    pub(super) fn poll_write(
        &mut self,
        socket: &mut WebSocket,
        conn: &ConnHandle,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), axum::Error>> {
        // Before looking at the queue, so a frame queued from now on wakes the task.
        conn.register_session(cx.waker());
        if self.flushing {
            ready!(socket.poll_flush_unpin(cx))?;
            self.flushing = false;
        }
        if self.ping != 0 {
            ready!(socket.poll_ready_unpin(cx))?;
            let now = std::mem::take(&mut self.ping);
            socket.start_send_unpin(Message::Ping(Bytes::copy_from_slice(&now.to_be_bytes())))?;
            self.flushing = true;
        }
        let mut frames = 0;
        let mut bytes = 0;
        while frames < WRITE_BURST_FRAMES && bytes < WRITE_BURST_BYTES {
            if socket.poll_ready_unpin(cx)?.is_pending() {
                break;
            }
            let Some(frame) = conn.pop_queued() else {
                break;
            };
            frames += 1;
            if let Some(message) = to_message(conn.encoding, &frame) {
                let size = message_len(&message);
                bytes += size;
                socket.start_send_unpin(message)?;
                conn.written(size);
                self.flushing = true;
            }
        }
        if self.flushing {
            ready!(socket.poll_flush_unpin(cx))?;
            self.flushing = false;
        }
        if frames == WRITE_BURST_FRAMES || bytes >= WRITE_BURST_BYTES {
            // More may wait: come back after the others had their turn.
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

fn message_len(message: &Message) -> usize {
    match message {
        Message::Binary(b) => b.len(),
        Message::Text(t) => t.len(),
        _ => 0,
    }
}

/// Closes the socket with `code` and `reason` (or the code's own reason). Frames queued before the
/// close still go out (e.g. an error explaining it), within a short bound; a slow consumer's
/// backlog is dropped so the close frame goes first. Then the queue is ended.
pub(super) async fn close_socket(
    socket: &mut WebSocket,
    conn: &ConnHandle,
    code: u16,
    reason: Option<Utf8Bytes>,
) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if code != close_code::POLICY {
            while let Some(frame) = conn.pop_queued() {
                let Some(message) = to_message(conn.encoding, &frame) else {
                    continue;
                };
                let size = message_len(&message);
                if socket.feed(message).await.is_err() {
                    return;
                }
                conn.written(size);
            }
        }
        let reason = reason.unwrap_or_else(|| Utf8Bytes::from_static(close_reason(code)));
        let _ = socket
            .send(Message::Close(Some(CloseFrame { code, reason })))
            .await;
        let _ = socket.close().await;
    })
    .await;
    conn.end_queue();
}

fn close_reason(code: u16) -> &'static str {
    match code {
        close_code::GOING_AWAY => "node going away",
        close_code::PROTOCOL_ERROR => "protocol error",
        close_code::INVALID_DATA => "text frame is not UTF-8",
        close_code::UNAUTHORIZED => "unauthorized",
        close_code::DISCONNECTED => "disconnected by the app",
        close_code::REPLACED => "replaced by a newer login",
        close_code::POLICY => "policy violation",
        close_code::TOO_MANY_CONNECTIONS => "too many connections for this user",
        close_code::HEARTBEAT_TIMEOUT => "heartbeat timeout",
        _ => "",
    }
}

/// The WebSocket message carrying `frame` in `encoding`; `None` if it cannot be encoded (logged
/// where it is encoded).
fn to_message(encoding: Encoding, frame: &Arc<EncodedFrame>) -> Option<Message> {
    let bytes = frame.bytes(encoding)?;
    Some(match encoding {
        Encoding::MsgPack => Message::Binary(bytes),
        // serde_json writes UTF-8 only, so this conversion does not fail in practice.
        Encoding::Json => Message::Text(Utf8Bytes::try_from(bytes).ok()?),
    })
}
