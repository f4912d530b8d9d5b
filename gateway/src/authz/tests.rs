//! Tests of the authorization hook: request shapes, answer parsing, the bounded cache.

use super::*;

fn users(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn requests_serialize_as_the_contract_says() {
    let join = Ask::Join {
        user: "alice",
        platform: 5,
        group: "g1",
    };
    assert_eq!(
        serde_json::to_value(&join).expect("json"),
        serde_json::json!({"action": "join", "user": "alice", "platform": 5, "group": "g1"})
    );
    let named = users(&["bob", "carol"]);
    let subscribe = Ask::Subscribe {
        user: "alice",
        platform: 1,
        users: &named,
    };
    assert_eq!(
        serde_json::to_value(&subscribe).expect("json"),
        serde_json::json!({"action": "subscribe", "user": "alice", "platform": 1, "users": ["bob", "carol"]})
    );
}

#[test]
fn answers_are_read_strictly() {
    let named = users(&["bob", "carol"]);
    let subscribe = Ask::Subscribe {
        user: "alice",
        platform: 1,
        users: &named,
    };
    let join = Ask::Join {
        user: "alice",
        platform: 1,
        group: "g",
    };
    assert_eq!(verdict_of(&join, br#"{"allow": true}"#), Verdict::Allow);
    assert_eq!(
        verdict_of(&join, br#"{"allow": false, "why": "banned"}"#),
        Verdict::Deny(Refusal::Denied)
    );
    for junk in [
        &br#"{"allow": ["g"]}"#[..],
        br#"{"allow": "yes"}"#,
        br#"{}"#,
        b"",
        b"true",
    ] {
        assert_eq!(verdict_of(&join, junk), Verdict::Deny(Refusal::Failed));
    }
    assert_eq!(
        verdict_of(&subscribe, br#"{"allow": ["bob", "nobody"]}"#),
        Verdict::Only(Arc::new(["bob".to_string()].into()))
    );
    assert_eq!(
        verdict_of(&subscribe, br#"{"allow": ["carol", "bob"]}"#),
        Verdict::Allow
    );
    assert_eq!(
        verdict_of(&subscribe, br#"{"allow": []}"#),
        Verdict::Only(Arc::default())
    );
}

#[test]
fn keys_name_the_exact_request() {
    let a = users(&["bob", "carol"]);
    let b = users(&["carol", "bob"]);
    let c = users(&["bob"]);
    let sub = |user, platform, users| Ask::Subscribe {
        user,
        platform,
        users,
    };
    assert_eq!(
        cache_key(&sub("alice", 1, &a)),
        cache_key(&sub("alice", 1, &b))
    );
    assert_ne!(
        cache_key(&sub("alice", 1, &a)),
        cache_key(&sub("alice", 2, &a))
    );
    assert_ne!(
        cache_key(&sub("alice", 1, &a)),
        cache_key(&sub("alice", 1, &c))
    );
    assert_ne!(
        cache_key(&sub("alice", 1, &a)),
        cache_key(&sub("dave", 1, &a))
    );
    let join = |group| Ask::Join {
        user: "alice",
        platform: 1,
        group,
    };
    assert_ne!(cache_key(&join("g1")), cache_key(&join("g2")));
}

#[test]
fn the_cache_forgets_after_its_ttl() {
    let mut cache = Cache::new(Duration::from_secs(10));
    let t0 = Instant::now();
    cache.insert([1; 32], Verdict::Allow, t0);
    assert_eq!(cache.get(&[1; 32], t0), Some(Verdict::Allow));
    assert_eq!(
        cache.get(&[1; 32], t0 + Duration::from_secs(9)),
        Some(Verdict::Allow)
    );
    assert_eq!(cache.get(&[1; 32], t0 + Duration::from_secs(10)), None);
    // The next insert drops what expired.
    cache.insert([2; 32], Verdict::Allow, t0 + Duration::from_secs(11));
    assert_eq!(cache.entries.len(), 1);
    assert_eq!(cache.order.len(), 1);
    assert_eq!(cache.bytes, weight(&Verdict::Allow));
}

#[test]
fn the_cache_stays_within_its_bounds() {
    let mut cache = Cache::new(Duration::from_secs(3600));
    let now = Instant::now();
    for i in 0..(CACHE_MAX_ENTRIES as u32 + 10) {
        let mut key = [0; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        cache.insert(key, Verdict::Deny(Refusal::Denied), now);
    }
    assert_eq!(cache.entries.len(), CACHE_MAX_ENTRIES);
    // The oldest went first.
    assert_eq!(cache.get(&[0; 32], now), None);
    let big: HashSet<String> = (0..1000).map(|i| format!("{i:0>128}")).collect();
    let big = Verdict::Only(Arc::new(big));
    for i in 0..200u32 {
        let mut key = [1; 32];
        key[..4].copy_from_slice(&i.to_be_bytes());
        cache.insert(key, big.clone(), now);
    }
    assert!(cache.bytes <= CACHE_MAX_BYTES, "{}", cache.bytes);
    let counted: usize = cache.entries.values().map(|e| e.bytes).sum();
    assert_eq!(counted, cache.bytes);
}

#[test]
fn inserting_a_key_again_replaces_it() {
    let mut cache = Cache::new(Duration::from_secs(10));
    let t0 = Instant::now();
    cache.insert([1; 32], Verdict::Allow, t0);
    cache.insert(
        [1; 32],
        Verdict::Deny(Refusal::Denied),
        t0 + Duration::from_secs(5),
    );
    assert_eq!(
        cache.get(&[1; 32], t0 + Duration::from_secs(12)),
        Some(Verdict::Deny(Refusal::Denied))
    );
    // The first record's expiry passes without taking the newer entry along.
    cache.insert([2; 32], Verdict::Allow, t0 + Duration::from_secs(12));
    assert_eq!(
        cache.get(&[1; 32], t0 + Duration::from_secs(12)),
        Some(Verdict::Deny(Refusal::Denied))
    );
    assert_eq!(cache.bytes, 2 * weight(&Verdict::Allow));
}
