//! Whether the backend is reachable, as this node last found out: the circuit in front of it.
//!
//! While it is down, a backend call that would only wait for the command timeout (seconds) is
//! refused at once instead (`BackendError::not_sent`: nothing was sent, so the caller knows
//! the outcome), connects are welcomed without the connect-time reads (they follow when the
//! backend is back), and `presence_backend_up` says 0. The Redis backend's probe
//! (`redis/probe.rs`) is the only writer; the embedded backend is always up.

use std::sync::Arc;

use tokio::sync::watch;

use super::BackendError;
use crate::metrics as m;

#[derive(Clone)]
pub struct Health {
    up: Arc<watch::Sender<bool>>,
}

impl Health {
    /// Starts up: a node only starts once it has reached its backend.
    pub fn new() -> Self {
        Health {
            up: Arc::new(watch::Sender::new(true)),
        }
    }

    /// Sets `presence_backend_up` to the current state (once the metrics recorder is installed;
    /// every change sets it after that).
    pub fn export(&self) {
        metrics::gauge!(m::BACKEND_UP).set(if self.is_up() { 1.0 } else { 0.0 });
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Records what the probe found; true when that changed the state.
    pub fn set(&self, up: bool) -> bool {
        let changed = self.up.send_if_modified(|now| {
            let changed = *now != up;
            *now = up;
            changed
        });
        if changed {
            metrics::gauge!(m::BACKEND_UP).set(if up { 1.0 } else { 0.0 });
            metrics::counter!(m::BACKEND_TRANSITIONS, "to" => if up { "up" } else { "down" })
                .increment(1);
            if up {
                tracing::info!("backend reachable again");
            } else {
                tracing::warn!("backend unreachable: refusing backend calls until it answers");
            }
        }
        changed
    }

    /// Refuses a call at once while the backend is known to be down.
    pub fn admit(&self, op: &'static str) -> Result<(), BackendError> {
        if self.is_up() {
            Ok(())
        } else {
            metrics::counter!(m::BACKEND_REFUSED, "op" => op).increment(1);
            Err(BackendError::not_sent(
                op,
                "the backend is down (circuit open)",
            ))
        }
    }

    /// Returns once the backend is up (at once if it is).
    pub async fn wait_up(&self) {
        let mut rx = self.up.subscribe();
        // Only fails when the sender is gone, which `self` prevents.
        let _ = rx.wait_for(|up| *up).await;
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_only_while_down_and_wakes_waiters_when_up() {
        let health = Health::new();
        assert!(health.admit("x").is_ok());
        assert!(health.set(false));
        assert!(!health.set(false), "no change, no transition");
        let refused = health.admit("x").expect_err("down refuses");
        assert!(refused.is_not_sent());
        let waiter = tokio::spawn({
            let health = health.clone();
            async move { health.wait_up().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        assert!(health.set(true));
        waiter.await.expect("waiter");
        assert!(health.admit("x").is_ok());
    }
}
