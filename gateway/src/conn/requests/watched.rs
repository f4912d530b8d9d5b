//! The users one connection watches, so they can be unwatched when it closes.

use std::collections::HashSet;

/// A set made at the first subscribe and boxed: every connection carries this field, and an idle
/// one that watches nobody then carries a pointer instead of an empty table (48 bytes).
#[derive(Default)]
#[allow(clippy::box_collection)] // the point: 8 bytes inline instead of 48
pub(super) struct Watched(Option<Box<HashSet<String>>>);

impl Watched {
    pub(super) fn contains(&self, user: &str) -> bool {
        self.0.as_ref().is_some_and(|set| set.contains(user))
    }

    pub(super) fn count(&self) -> usize {
        self.0.as_ref().map_or(0, |set| set.len())
    }

    /// True if `user` was not watched yet.
    pub(super) fn insert(&mut self, user: String) -> bool {
        self.0.get_or_insert_default().insert(user)
    }

    /// True if `user` was watched.
    pub(super) fn remove(&mut self, user: &str) -> bool {
        self.0.as_mut().is_some_and(|set| set.remove(user))
    }

    /// Every watched user; the set is gone afterwards.
    pub(super) fn take_all(&mut self) -> Vec<String> {
        self.0
            .take()
            .map(|set| set.into_iter().collect())
            .unwrap_or_default()
    }
}
