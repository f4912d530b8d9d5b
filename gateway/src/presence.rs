//! The presence model, as pure functions: how one node's connections of a user become that node's
//! entry, how all nodes' entries and the user's chosen status become one presence, and what each
//! viewer may see of it. Both backends call these, and the Redis Lua scripts mirror them.

use serde::{Deserialize, Serialize};
use shared::{Platform, Presence, Status};

/// What one node holds of one user: the platforms of its live connections, and whether every one of
/// them has been idle for `idle_away`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Bit `p` set when platform `p` has a connection.
    pub platforms: u16,
    pub idle: bool,
}

/// The status a user chose with `set_status`; `online` until they choose another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChosenStatus {
    pub status: Status,
    pub text: Option<String>,
    /// When it was chosen (ms, the choosing node's clock). A user connected to several nodes has
    /// one choice remembered per node; after the backend lost the record, each node restores its
    /// own, and the newest must win whatever order they arrive in.
    pub at: u64,
}

impl Default for ChosenStatus {
    fn default() -> Self {
        ChosenStatus {
            status: Status::Online,
            text: None,
            at: 0,
        }
    }
}

/// A user's presence as the backend stores and publishes it: the truth, before visibility rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub user: String,
    /// Effective status: `offline` without connections, `away` when every node is idle and the user
    /// chose `online`, else the chosen status.
    pub status: Status,
    pub platforms: u16,
    pub text: Option<String>,
    pub last_seen: Option<u64>,
    /// Bumped on every change of the record: the version the user sees of themselves.
    pub version: u64,
    /// Bumped only when what others see changes ([`PresenceRecord::public_view`]): the version
    /// everyone but the user sees, so an invisible user's activity moves nothing they can see.
    /// Never above `version`.
    pub public_version: u64,
}

impl PresenceRecord {
    /// A user the backend knows nothing about.
    pub fn unknown(user: &str) -> Self {
        PresenceRecord {
            user: user.to_string(),
            status: Status::Offline,
            platforms: 0,
            text: None,
            last_seen: None,
            version: 0,
            public_version: 0,
        }
    }

    /// What `viewer` sees: the user sees [`Self::own_view`], everyone else
    /// [`Self::public_view`].
    pub fn view_for(&self, viewer: Option<&str>) -> Presence {
        if viewer == Some(self.user.as_str()) {
            self.own_view()
        } else {
            self.public_view()
        }
    }

    /// What the user sees of themselves: the truth, at `version`.
    pub fn own_view(&self) -> Presence {
        Presence {
            user: self.user.clone(),
            status: self.status,
            platforms: platforms_of(self.platforms),
            text: self.text.clone(),
            last_seen: (self.status == Status::Offline)
                .then_some(self.last_seen)
                .flatten(),
            version: self.version,
        }
    }

    /// What anyone but the user sees, at `public_version`: invisible users look offline (no
    /// platforms, no text, `last_seen` of when they were last visibly online).
    pub fn public_view(&self) -> Presence {
        let (status, platforms, text, last_seen) = self.public_state();
        Presence {
            user: self.user.clone(),
            status,
            platforms: platforms_of(platforms),
            text: text.map(String::from),
            last_seen,
            version: self.public_version,
        }
    }

    /// The fields of [`Self::public_view`]: status, platform mask, text, last_seen. `write.lua`
    /// reaches the same verdict on a change without building them: the public view changed
    /// exactly when the user was or is visibly online (see `next_record`).
    fn public_state(&self) -> (Status, u16, Option<&str>, Option<u64>) {
        if visibly_online(self.status) {
            (self.status, self.platforms, self.text.as_deref(), None)
        } else {
            (Status::Offline, 0, None, self.last_seen)
        }
    }

    /// True when `self`, the next record after `prev`, shows others something new.
    pub fn public_changed_from(&self, prev: &PresenceRecord) -> bool {
        self.public_version != prev.public_version
    }
}

/// True when others see the user as online (online, away or busy).
pub fn visibly_online(status: Status) -> bool {
    matches!(status, Status::Online | Status::Away | Status::Busy)
}

/// Folds every node's entry of one user into (platform mask, all idle).
pub fn fold_entries(entries: impl IntoIterator<Item = NodeEntry>) -> (u16, bool) {
    entries.into_iter().fold((0u16, true), |(mask, idle), e| {
        (mask | e.platforms, idle && e.idle)
    })
}

/// The effective status of a user with the given platform mask, idleness and chosen status.
pub fn effective_status(platforms: u16, all_idle: bool, chosen: Status) -> Status {
    match (platforms, chosen) {
        (0, _) => Status::Offline,
        (_, Status::Online) if all_idle => Status::Away,
        (_, Status::Offline) => Status::Online,
        (_, s) => s,
    }
}

/// Computes a user's next record from the previous one; `None` when nothing visible changed (so no
/// version bump and no event). `version` moves on every change; `public_version` only when the
/// public view does (so not while an invisible user connects, disconnects or switches platforms).
pub fn next_record(
    prev: &PresenceRecord,
    platforms: u16,
    all_idle: bool,
    chosen: &ChosenStatus,
    now_ms: u64,
) -> Option<PresenceRecord> {
    let status = effective_status(platforms, all_idle, chosen.status);
    let text = if status == Status::Offline {
        None
    } else {
        chosen.text.clone()
    };
    if status == prev.status && platforms == prev.platforms && text == prev.text {
        return None;
    }
    let last_seen = if visibly_online(prev.status) && !visibly_online(status) {
        Some(now_ms)
    } else {
        prev.last_seen
    };
    let mut next = PresenceRecord {
        user: prev.user.clone(),
        status,
        platforms,
        text,
        last_seen,
        version: next_version(prev.version, now_ms),
        public_version: prev.public_version,
    };
    if next.public_state() != prev.public_state() {
        next.public_version = next_version(prev.public_version, now_ms);
    }
    Some(next)
}

/// Versions follow the clock, and always grow: a backend that lost its data (Redis restarted empty)
/// still hands out versions above every one a client saw before.
pub fn next_version(prev: u64, now_ms: u64) -> u64 {
    (prev + 1).max(now_ms)
}

/// The platform mask bit of one platform.
pub fn platform_bit(platform: Platform) -> u16 {
    1u16 << platform
}

/// The platforms of a mask, ascending.
pub fn platforms_of(mask: u16) -> Vec<Platform> {
    shared::ids::PLATFORMS
        .filter(|p| mask & platform_bit(*p) != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chosen(status: Status) -> ChosenStatus {
        ChosenStatus {
            status,
            text: None,
            at: 0,
        }
    }

    #[test]
    fn masks_round_trip() {
        let mask = platform_bit(1) | platform_bit(5) | platform_bit(8);
        assert_eq!(platforms_of(mask), vec![1, 5, 8]);
    }

    #[test]
    fn entries_fold_into_union_and_all_idle() {
        let a = NodeEntry {
            platforms: platform_bit(1),
            idle: true,
        };
        let b = NodeEntry {
            platforms: platform_bit(2),
            idle: false,
        };
        assert_eq!(
            fold_entries([a, b]),
            (platform_bit(1) | platform_bit(2), false)
        );
        assert_eq!(fold_entries([a]), (platform_bit(1), true));
    }

    #[test]
    fn idle_turns_online_into_away_but_keeps_busy() {
        assert_eq!(effective_status(2, true, Status::Online), Status::Away);
        assert_eq!(effective_status(2, true, Status::Busy), Status::Busy);
        assert_eq!(effective_status(2, false, Status::Online), Status::Online);
        assert_eq!(effective_status(0, false, Status::Busy), Status::Offline);
    }

    #[test]
    fn only_visible_changes_bump_the_version() {
        let prev = PresenceRecord::unknown("u");
        let on = next_record(&prev, 2, false, &chosen(Status::Online), 1000).expect("changed");
        assert_eq!(on.version, 1000);
        assert!(next_record(&on, 2, false, &chosen(Status::Online), 2000).is_none());
        let off = next_record(&on, 0, false, &chosen(Status::Online), 3000).expect("changed");
        assert_eq!(off.status, Status::Offline);
        assert_eq!(off.last_seen, Some(3000));
        assert!(off.version > on.version);
    }

    #[test]
    fn versions_grow_even_when_the_clock_does_not() {
        assert_eq!(next_version(5000, 10), 5001);
        assert_eq!(next_version(5, 10), 10);
    }

    #[test]
    fn invisible_looks_offline_to_others_only() {
        let prev = PresenceRecord::unknown("u");
        let on = next_record(&prev, 2, false, &chosen(Status::Online), 1000).expect("changed");
        let inv = next_record(&on, 2, false, &chosen(Status::Invisible), 2000).expect("changed");
        assert_eq!(inv.last_seen, Some(2000));
        assert_eq!(inv.view_for(Some("u")).status, Status::Invisible);
        let public = inv.view_for(Some("v"));
        assert_eq!(public.status, Status::Offline);
        assert!(public.platforms.is_empty());
        assert_eq!(public.last_seen, Some(2000));
    }

    #[test]
    fn invisible_activity_moves_only_the_own_version() {
        let prev = PresenceRecord::unknown("u");
        let on = next_record(&prev, 2, false, &chosen(Status::Online), 1000).expect("changed");
        assert_eq!((on.version, on.public_version), (1000, 1000));
        let inv = next_record(&on, 2, false, &chosen(Status::Invisible), 2000).expect("changed");
        assert_eq!(
            (inv.version, inv.public_version),
            (2000, 2000),
            "went offline"
        );
        assert!(inv.public_changed_from(&on));
        let public = inv.public_view();
        let mut last = inv;
        for (mask, now) in [(6, 3000), (4, 4000), (0, 5000), (2, 6000)] {
            let next =
                next_record(&last, mask, false, &chosen(Status::Invisible), now).expect("changed");
            assert_eq!(next.version, now, "the user sees every change");
            assert_eq!(next.public_version, 2000, "others see none");
            assert!(!next.public_changed_from(&last));
            assert_eq!(next.public_view(), public);
            assert_eq!(next.view_for(Some("v")), public);
            assert_eq!(next.view_for(Some("u")).version, now);
            last = next;
        }
        let visible = next_record(&last, 2, false, &chosen(Status::Busy), 7000).expect("changed");
        assert_eq!((visible.version, visible.public_version), (7000, 7000));
        assert_eq!(visible.view_for(Some("v")).status, Status::Busy);
    }

    #[test]
    fn an_invisible_first_connect_shows_others_nothing() {
        let prev = PresenceRecord::unknown("u");
        let inv = next_record(&prev, 2, false, &chosen(Status::Invisible), 1000).expect("changed");
        assert_eq!((inv.version, inv.public_version), (1000, 0));
        assert_eq!(inv.public_view(), prev.public_view());
    }

    #[test]
    fn public_versions_grow_even_when_the_clock_does_not() {
        let prev = PresenceRecord {
            version: 5000,
            public_version: 4000,
            ..PresenceRecord::unknown("u")
        };
        let on = next_record(&prev, 2, false, &chosen(Status::Online), 10).expect("changed");
        assert_eq!((on.version, on.public_version), (5001, 4001));
    }
}
