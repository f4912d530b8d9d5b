//! The writer half of a session: drains the connection's outbound queue into the socket in
//! bursts, pings every heartbeat, and closes the socket with the code (and reason) asked for, when
//! the client falls silent (4010), or when its token expires (4001).

use std::{sync::Arc, time::Duration};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{SinkExt, stream::SplitSink};
use shared::Encoding;
use tokio::sync::mpsc;

use crate::{
    clock::now_ms,
    conn_handle::{ConnHandle, close_code},
    frame::EncodedFrame,
    metrics as m,
};

/// Bounds one write burst (see `send_burst`): enough to make one syscall carry a backlog, small
/// enough that a burst does not grow the connection's write buffer for good.
const WRITE_BURST_FRAMES: usize = 64;
pub(super) const WRITE_BURST_BYTES: usize = 16 * 1024;

/// Drains the outbound queue into the socket, pings every `heartbeat`, and closes the socket with
/// the requested code once the connection is asked to close (or the client is silent for two
/// heartbeats: 4010; or its token expired: 4001).
pub(super) async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<Arc<EncodedFrame>>,
    conn: Arc<ConnHandle>,
    heartbeat: Duration,
) {
    // One timer serves the heartbeat and the token's expiry: it fires at whichever comes first,
    // so an idle connection carries no second timer.
    let mut next_ping = tokio::time::Instant::now() + heartbeat;
    let timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(timer);
    let closer = conn.close_requested().clone();
    loop {
        let deadline = next_ping.min(token_deadline(&conn));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        tokio::select! {
            biased;
            _ = closer.cancelled() => break,
            frame = out.recv() => {
                let Some(frame) = frame else { break };
                let sent = tokio::select! {
                    r = Box::pin(send_burst(&mut sink, &mut out, &conn, frame)) => r.is_ok(),
                    _ = closer.cancelled() => false,
                };
                if !sent {
                    conn.close(close_code::NORMAL);
                    break;
                }
            }
            _ = &mut timer => {
                let now = now_ms();
                let expires = conn.token_expires_at.load(std::sync::atomic::Ordering::Relaxed);
                if expires != 0 && now >= expires {
                    metrics::counter!(m::SESSION_CLOSES, "reason" => "token_expired").increment(1);
                    conn.close_with(close_code::UNAUTHORIZED, "token expired");
                    break;
                }
                if tokio::time::Instant::now() < next_ping {
                    continue;
                }
                next_ping += heartbeat;
                let heard = conn.last_heard.load(std::sync::atomic::Ordering::Relaxed);
                if now.saturating_sub(heard) > 2 * heartbeat.as_millis() as u64 {
                    conn.close(close_code::HEARTBEAT_TIMEOUT);
                    break;
                }
                let ping = Message::Ping(Bytes::copy_from_slice(&now.to_be_bytes()));
                if sink.send(ping).await.is_err() {
                    conn.close(close_code::NORMAL);
                    break;
                }
            }
        }
    }
    let code = conn.requested_close_code().unwrap_or(close_code::NORMAL);
    let reason = conn.close_reason().map(Utf8Bytes::from);
    Box::pin(close_socket(sink, out, conn.encoding, code, reason)).await;
}

/// When the token expires, on tokio's clock (far away for a token that does not expire).
fn token_deadline(conn: &ConnHandle) -> tokio::time::Instant {
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    match conn
        .token_expires_at
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        0 => far,
        expires => {
            let left = Duration::from_millis(expires.saturating_sub(now_ms()));
            (tokio::time::Instant::now() + left).min(far)
        }
    }
}

/// Frames queued before the close was asked for still go out (e.g. an error explaining it),
/// within a short bound; a slow consumer's backlog is dropped so the close frame goes first.
async fn close_socket(
    mut sink: SplitSink<WebSocket, Message>,
    mut out: mpsc::Receiver<Arc<EncodedFrame>>,
    encoding: Encoding,
    code: u16,
    reason: Option<Utf8Bytes>,
) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        if code != close_code::POLICY {
            while let Ok(frame) = out.try_recv() {
                let Some(message) = to_message(encoding, &frame) else {
                    continue;
                };
                if sink.feed(message).await.is_err() {
                    return;
                }
            }
        }
        let reason = reason.unwrap_or_else(|| Utf8Bytes::from_static(close_reason(code)));
        let _ = sink
            .send(Message::Close(Some(CloseFrame { code, reason })))
            .await;
        let _ = sink.close().await;
    })
    .await;
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

/// Writes `first` and what else is already queued, up to `WRITE_BURST_FRAMES` frames or
/// `WRITE_BURST_BYTES`, with one flush: under load one `send()` carries many frames instead of one
/// syscall and one loopback/TCP transmit per frame, the gateway's main per-delivery cost.
async fn send_burst(
    sink: &mut SplitSink<WebSocket, Message>,
    out: &mut mpsc::Receiver<Arc<EncodedFrame>>,
    conn: &ConnHandle,
    first: Arc<EncodedFrame>,
) -> Result<(), axum::Error> {
    let encoding = conn.encoding;
    let mut frames = 0;
    let mut bytes = 0;
    let mut next = Some(first);
    while let Some(frame) = next.take() {
        if let Some(message) = to_message(encoding, &frame) {
            let size = match &message {
                Message::Binary(b) => b.len(),
                Message::Text(t) => t.len(),
                _ => 0,
            };
            bytes += size;
            sink.feed(message).await?;
            conn.written(size);
        }
        frames += 1;
        if frames < WRITE_BURST_FRAMES && bytes < WRITE_BURST_BYTES {
            next = out.try_recv().ok();
        }
    }
    sink.flush().await
}

/// The WebSocket message carrying `frame` in `encoding`; `None` if it cannot be encoded (logged
/// where it is encoded).
fn to_message(encoding: Encoding, frame: &EncodedFrame) -> Option<Message> {
    let bytes = frame.bytes(encoding)?;
    Some(match encoding {
        Encoding::MsgPack => Message::Binary(bytes),
        // serde_json writes UTF-8 only, so this conversion does not fail in practice.
        Encoding::Json => Message::Text(Utf8Bytes::try_from(bytes).ok()?),
    })
}
