//! Subscriptions on the embedded backend: one node, so a count of local listeners per topic decides what is delivered (and, for inboxes, what is stored instead).

use super::MemoryBackend;
use crate::backend::{Subscriptions, Topic};

impl Subscriptions for MemoryBackend {
    fn watch(&self, topics: Vec<Topic>) {
        let mut state = self.lock();
        for topic in topics {
            *state.listening.entry(topic).or_default() += 1;
        }
    }

    fn unwatch(&self, topics: Vec<Topic>) {
        let mut state = self.lock();
        for topic in topics {
            if let Some(n) = state.listening.get_mut(&topic) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    state.listening.remove(&topic);
                }
            }
        }
    }
}
