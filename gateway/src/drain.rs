//! The node's drain, as a load balancer needs it: on SIGTERM/SIGINT `/readyz` turns 503 while the
//! node keeps serving and accepting (`PRESENCE_DRAIN_DELAY_SECS`), so health checks take it out
//! of rotation before anyone is closed; then new upgrades are refused and the sessions close with
//! 1001 one after another, spread evenly over `PRESENCE_DRAIN_SPREAD_SECS`, so their reconnects
//! reach the other nodes as a trickle instead of all at once. `app.rs` runs the phases; sessions
//! and `/readyz` read them here.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Where the node's drain stands; shared by `/readyz`, the upgrade and every session.
#[derive(Default)]
pub struct Drain {
    /// Cancelled at SIGTERM: not ready any more, still serving and accepting.
    draining: CancellationToken,
    /// Cancelled when sessions start closing: upgrades are refused, each session takes a turn.
    closing: CancellationToken,
    /// When closing began, over how long, and how many sessions were open then.
    plan: OnceLock<(Instant, Duration, u64)>,
    /// Turns handed out so far.
    turns: AtomicU64,
}

impl Drain {
    /// The drain began (`/readyz` answers 503).
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Sessions are being closed (new upgrades are refused).
    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    pub(crate) fn begin(&self) {
        self.draining.cancel();
    }

    /// Starts closing the `sessions` open now, spread evenly over `spread`.
    pub(crate) fn close_sessions(&self, sessions: u64, spread: Duration) {
        let _ = self.plan.set((Instant::now(), spread, sessions.max(1)));
        self.draining.cancel();
        self.closing.cancel();
    }

    /// Resolves once sessions start closing.
    pub async fn closing(&self) {
        self.closing.cancelled().await
    }

    /// The token behind [`Drain::closing`]: a session registers its wake-up on it once and then
    /// checks [`Drain::is_closing`] (polling the shared token's future takes a lock every
    /// session shares).
    pub fn closing_token(&self) -> CancellationToken {
        self.closing.clone()
    }

    /// When the session asking should close: the k-th to ask gets k/n of the spread. A session
    /// that opened after the count was taken closes at the end of the spread.
    pub fn take_turn(&self) -> Instant {
        let Some(&(start, spread, sessions)) = self.plan.get() else {
            return Instant::now();
        };
        let turn = self.turns.fetch_add(1, Ordering::Relaxed).min(sessions);
        start + spread.mul_f64(turn as f64 / sessions as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn turns_spread_evenly_over_the_spread() {
        let drain = Drain::default();
        assert!(!drain.is_draining());
        drain.begin();
        assert!(drain.is_draining() && !drain.is_closing());
        let start = Instant::now();
        drain.close_sessions(4, Duration::from_secs(8));
        assert!(drain.is_closing());
        drain.closing().await;
        let offsets: Vec<u64> = (0..6)
            .map(|_| (drain.take_turn() - start).as_secs())
            .collect();
        assert_eq!(offsets, vec![0, 2, 4, 6, 8, 8]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_spread_closes_everyone_at_once() {
        let drain = Drain::default();
        let start = Instant::now();
        drain.close_sessions(0, Duration::ZERO);
        assert_eq!(drain.take_turn(), start);
        assert_eq!(drain.take_turn(), start);
    }
}
