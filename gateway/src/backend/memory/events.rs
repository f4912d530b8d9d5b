//! Subscriptions on the embedded backend: one node, so the set of topics someone here listens to decides what is delivered (and, for inboxes, what is stored instead).

use super::MemoryBackend;
use crate::backend::{Subscriptions, Topic};

impl Subscriptions for MemoryBackend {
    fn watch(&self, topics: Vec<Topic>) {
        self.lock().listening.extend(topics);
    }

    fn unwatch(&self, topics: Vec<Topic>) {
        let mut state = self.lock();
        for topic in topics {
            state.listening.remove(&topic);
        }
    }
}
