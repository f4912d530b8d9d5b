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
}

impl Default for ChosenStatus {
    fn default() -> Self {
        ChosenStatus {
            status: Status::Online,
            text: None,
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
    pub version: u64,
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
        }
    }

    /// What `viewer` sees: invisible users look offline to everyone but themselves.
    pub fn view_for(&self, viewer: Option<&str>) -> Presence {
        if self.status == Status::Invisible && viewer != Some(self.user.as_str()) {
            self.public_view()
        } else {
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
    }

    /// What anyone but the user sees.
    pub fn public_view(&self) -> Presence {
        if matches!(self.status, Status::Invisible | Status::Offline) {
            Presence {
                user: self.user.clone(),
                status: Status::Offline,
                platforms: Vec::new(),
                text: None,
                last_seen: self.last_seen,
                version: self.version,
            }
        } else {
            self.view_for(Some(&self.user))
        }
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
/// version bump and no event).
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
    Some(PresenceRecord {
        user: prev.user.clone(),
        status,
        platforms,
        text,
        last_seen,
        version: next_version(prev.version, now_ms),
    })
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
        ChosenStatus { status, text: None }
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
}
