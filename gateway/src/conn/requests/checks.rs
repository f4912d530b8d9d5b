//! What a request must satisfy before anything runs: ids, limits, the frame rate.

use std::{collections::HashSet, time::Instant};

use shared::{ErrorCode, ServerFrame, ids};

use super::MAX_USERS;
use crate::backend::parse_msg_id;

pub(super) fn forbidden(id: Option<u64>, message: &str) -> ServerFrame {
    ServerFrame::error(id, ErrorCode::Forbidden, message)
}

pub(super) fn check_msg_id(id: &str) -> Result<(), (ErrorCode, String)> {
    parse_msg_id(id)
        .map(|_| ())
        .ok_or_else(|| bad("message ids look like 1700000000000-0000000001"))
}

/// A `send`'s optional `client_msg_id`: 1 to 64 bytes, any text (it only ever names a key).
pub(super) fn check_client_msg_id(id: Option<&str>) -> Result<(), (ErrorCode, String)> {
    id.map_or(Ok(()), ids::check_client_msg_id).map_err(bad)
}

pub(super) fn bad(message: impl Into<String>) -> (ErrorCode, String) {
    (ErrorCode::BadRequest, message.into())
}

pub(super) fn unavailable() -> (ErrorCode, String) {
    (ErrorCode::Unavailable, "node is stopping".into())
}

/// Validates a request's user list: at most [`MAX_USERS`], every id valid; duplicates dropped.
pub(super) fn checked_users(users: Vec<String>) -> Result<Vec<String>, (ErrorCode, String)> {
    if users.len() > MAX_USERS {
        return Err(bad(format!("at most {MAX_USERS} users per request")));
    }
    let mut seen = HashSet::with_capacity(users.len());
    let mut out = Vec::with_capacity(users.len());
    for user in users {
        ids::check_id("user", &user).map_err(bad)?;
        if seen.insert(user.clone()) {
            out.push(user);
        }
    }
    Ok(out)
}

/// Frames per second a connection may send: `rate` sustained, bursts of up to `rate`. Every
/// connection carries one, hence `f32` (whole frames need no more precision).
pub(super) struct TokenBucket {
    rate: f32,
    tokens: f32,
    last: Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: u32) -> Self {
        TokenBucket {
            rate: rate as f32,
            tokens: rate as f32,
            last: Instant::now(),
        }
    }

    pub(super) fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f32() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
