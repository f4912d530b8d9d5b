//! Sends the embedded backend remembers by `client_msg_id`, so a repeat gets the first one's
//! outcome. Every entry lives the same window, so one queue in insertion order is both the
//! expiry order and the eviction order once the cap is reached.

use std::collections::{HashMap, VecDeque};

use shared::Destination;
use tokio::time::{Duration, Instant};

use crate::backend::SendOutcome;

/// Who sent what to where: an id is the sender's own, and scoped to one destination as on
/// Redis (whose key lives in the destination's slot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct SendKey {
    from: String,
    to: Destination,
    id: String,
}

impl SendKey {
    pub(super) fn new(from: &str, to: &Destination, id: &str) -> Self {
        SendKey {
            from: from.to_string(),
            to: to.clone(),
            id: id.to_string(),
        }
    }
}

pub(super) struct Remembered {
    window: Duration,
    max: usize,
    outcomes: HashMap<SendKey, SendOutcome>,
    /// Keys oldest first with when they were remembered. A key is in here exactly once while it
    /// is in `outcomes` (a key is only inserted when absent).
    order: VecDeque<(Instant, SendKey)>,
}

impl Remembered {
    pub(super) fn new(window: Duration, max: usize) -> Self {
        Remembered {
            window,
            max: max.max(1),
            outcomes: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The outcome of an earlier send under `key`, if still remembered.
    pub(super) fn get(&mut self, key: &SendKey, now: Instant) -> Option<SendOutcome> {
        self.expire(now);
        self.outcomes.get(key).cloned()
    }

    /// Remembers a send's outcome; the oldest entry goes when the cap is reached.
    pub(super) fn insert(&mut self, key: SendKey, outcome: SendOutcome, now: Instant) {
        self.expire(now);
        if self.outcomes.contains_key(&key) {
            return;
        }
        while self.order.len() >= self.max {
            if let Some((_, oldest)) = self.order.pop_front() {
                self.outcomes.remove(&oldest);
            }
        }
        self.outcomes.insert(key.clone(), outcome);
        self.order.push_back((now, key));
    }

    pub(super) fn len(&self) -> usize {
        self.outcomes.len()
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window {
                break;
            }
            if let Some((_, key)) = self.order.pop_front() {
                self.outcomes.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use shared::RouteResult;

    use super::*;

    fn outcome(id: &str) -> SendOutcome {
        SendOutcome::new(id.into(), RouteResult::Delivered, 1, 0)
    }

    fn key(from: &str, id: &str) -> SendKey {
        SendKey::new(from, &Destination::User { user: "bob".into() }, id)
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_the_window() {
        let mut r = Remembered::new(Duration::from_secs(10), 100);
        r.insert(key("a", "1"), outcome("m1"), Instant::now());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(r.get(&key("a", "1"), Instant::now()), Some(outcome("m1")));
        assert_eq!(r.get(&key("b", "1"), Instant::now()), None, "per sender");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(r.get(&key("a", "1"), Instant::now()), None);
        assert_eq!(r.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_go_past_the_cap() {
        let mut r = Remembered::new(Duration::from_secs(10), 2);
        for i in 0..3 {
            r.insert(key("a", &i.to_string()), outcome("m"), Instant::now());
        }
        assert_eq!(r.len(), 2);
        assert_eq!(r.get(&key("a", "0"), Instant::now()), None);
        assert!(r.get(&key("a", "2"), Instant::now()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_repeat_keeps_the_first_outcome() {
        let mut r = Remembered::new(Duration::from_secs(10), 2);
        r.insert(key("a", "1"), outcome("first"), Instant::now());
        r.insert(key("a", "1"), outcome("second"), Instant::now());
        assert_eq!(
            r.get(&key("a", "1"), Instant::now()),
            Some(outcome("first"))
        );
        assert_eq!(r.len(), 1);
    }
}
