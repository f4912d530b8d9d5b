//! Reading what the Redis scripts write: a user's hash and the event payload.

use std::collections::HashMap;

use shared::Status;

use crate::presence::{self, PresenceRecord};

pub fn parse_status(s: &str) -> Option<Status> {
    Some(match s {
        "online" => Status::Online,
        "offline" => Status::Offline,
        "away" => Status::Away,
        "busy" => Status::Busy,
        "invisible" => Status::Invisible,
        _ => return None,
    })
}

/// Parses `user|status|mask|version|last_seen|text` (text last: it may contain `|`) into the
/// record and whether others see the change (see [`parse_versions`]).
pub fn parse_payload(payload: &str) -> Option<(PresenceRecord, bool)> {
    let mut parts = payload.splitn(6, '|');
    let user = parts.next()?;
    let status = parse_status(parts.next()?)?;
    let mask: u16 = parts.next()?.parse().ok()?;
    let (version, public_version, public_changed) = parse_versions(parts.next()?)?;
    let last_seen = parts.next()?.parse().ok();
    let text = parts.next().filter(|t| !t.is_empty()).map(String::from);
    Some((
        PresenceRecord {
            user: user.to_string(),
            status,
            platforms: mask,
            text,
            last_seen,
            version,
            public_version,
        },
        public_changed,
    ))
}

/// The payload's version field: `version` when the public version is the same (so the change
/// is public; payloads from before public versions look like this too), else
/// `version:public_version:changed`, `changed` being `1` when others see this change, `0` when
/// only the user does.
fn parse_versions(field: &str) -> Option<(u64, u64, bool)> {
    let mut parts = field.split(':');
    let version = parts.next()?.parse().ok()?;
    let Some(public) = parts.next() else {
        return Some((version, version, true));
    };
    let public_version = public.parse().ok()?;
    let changed = match parts.next() {
        Some("0") => false,
        Some("1") | None => true,
        Some(_) => return None,
    };
    parts
        .next()
        .is_none()
        .then_some((version, public_version, changed))
}

/// A user's record from their hash, as of `now`: entries past their expiry no longer count, so
/// users of a node that died look offline even before the node is reaped.
pub fn from_hash(user: &str, hash: &HashMap<String, String>, now: u64) -> PresenceRecord {
    let mut mask = 0u16;
    let mut idle = true;
    let mut newest_expiry = 0u64;
    for (field, value) in hash {
        if !field.starts_with("n:") {
            continue;
        }
        let mut parts = value.split(':');
        let (Some(m), Some(i), Some(exp)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Ok(m), Ok(exp)) = (m.parse::<u16>(), exp.parse::<u64>()) else {
            continue;
        };
        newest_expiry = newest_expiry.max(exp);
        if exp > now {
            mask |= m;
            idle &= i == "1";
        }
    }
    let stored_status = hash
        .get("st")
        .and_then(|s| parse_status(s))
        .unwrap_or(Status::Offline);
    let stored_mask = hash.get("pl").and_then(|s| s.parse().ok()).unwrap_or(0u16);
    let version = hash.get("v").and_then(|s| s.parse().ok()).unwrap_or(0);
    // Hashes written before public versions have none: everything showed at `v` then.
    let public_version = hash
        .get("pv")
        .and_then(|s| s.parse().ok())
        .unwrap_or(version);
    let last_seen = hash.get("ls").and_then(|s| s.parse().ok());
    let text = hash.get("tx").filter(|t| !t.is_empty()).cloned();
    let chosen = hash
        .get("cs")
        .and_then(|s| parse_status(s))
        .unwrap_or(Status::Online);
    let status = presence::effective_status(mask, idle, chosen);
    if status == stored_status && mask == stored_mask {
        return PresenceRecord {
            user: user.to_string(),
            status,
            platforms: mask,
            text,
            last_seen,
            version,
            public_version,
        };
    }
    // Entries expired since the last write: show what is true now, with the stored versions (the
    // reaper's event will carry higher ones). `last_seen` moves only for a user who was visibly
    // online, as the reaper's write will: an invisible user's stays what others saw.
    let gone = presence::visibly_online(stored_status) && !presence::visibly_online(status);
    PresenceRecord {
        user: user.to_string(),
        status,
        platforms: mask,
        text: if status == Status::Offline {
            None
        } else {
            hash.get("ct").filter(|t| !t.is_empty()).cloned()
        },
        last_seen: if gone {
            last_seen.or(Some(newest_expiry))
        } else {
            last_seen
        },
        version,
        public_version,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_keep_pipes_in_text() {
        let (rec, public) = parse_payload("alice|busy|34|1700000000000|1699|a|b").expect("parses");
        assert_eq!(rec.platforms, 34);
        assert_eq!(rec.status, Status::Busy);
        assert_eq!(rec.version, 1_700_000_000_000);
        assert_eq!(
            rec.public_version, 1_700_000_000_000,
            "no public version: the same"
        );
        assert!(public);
        assert_eq!(rec.last_seen, Some(1699));
        assert_eq!(rec.text.as_deref(), Some("a|b"));
        assert!(parse_payload("alice|nope|1|1||").is_none());
    }

    #[test]
    fn payloads_carry_the_public_version_when_it_differs() {
        let (rec, public) = parse_payload("ivy|invisible|2|3000:2000:0|2000|").expect("parses");
        assert_eq!(
            (rec.version, rec.public_version, public),
            (3000, 2000, false)
        );
        assert_eq!(rec.last_seen, Some(2000));
        let (rec, public) = parse_payload("ivy|online|2|3000:2999:1||").expect("parses");
        assert_eq!(
            (rec.version, rec.public_version, public),
            (3000, 2999, true)
        );
        assert!(parse_payload("ivy|online|2|3000:2000:1:1||").is_none());
        assert!(parse_payload("ivy|online|2|3000:2000:x||").is_none());
    }

    #[test]
    fn hashes_without_a_public_version_show_the_version() {
        let hash = |fields: &[(&str, &str)]| -> HashMap<String, String> {
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let old = hash(&[
            ("st", "online"),
            ("pl", "2"),
            ("v", "10"),
            ("n:a", "2:0:1000"),
        ]);
        assert_eq!(from_hash("u", &old, 999).public_version, 10);
        let new = hash(&[
            ("st", "invisible"),
            ("cs", "invisible"),
            ("pl", "2"),
            ("v", "10"),
            ("pv", "0"),
            ("n:a", "2:0:1000"),
        ]);
        let now = from_hash("u", &new, 999);
        assert_eq!((now.version, now.public_version), (10, 0));
        let expired = from_hash("u", &new, 1001);
        assert_eq!(expired.status, Status::Offline);
        assert_eq!(
            expired.public_view(),
            now.public_view(),
            "an invisible user's expiry shows others nothing new"
        );
    }

    #[test]
    fn expired_entries_stop_counting_on_read() {
        let hash: HashMap<String, String> = [
            ("st", "online"),
            ("pl", "2"),
            ("v", "10"),
            ("n:a", "2:0:1000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(from_hash("u", &hash, 999).status, Status::Online);
        let later = from_hash("u", &hash, 1001);
        assert_eq!(later.status, Status::Offline);
        assert_eq!(later.platforms, 0);
        assert_eq!(later.version, 10);
        assert_eq!(later.last_seen, Some(1000));
    }
}
