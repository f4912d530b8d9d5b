//! `PresenceStore::counts` and `online_users` against the truth, which is what the users' records
//! say (`presence`): after every change of a random run over two nodes, after retried writes,
//! reaping, the loss of all data (and on Redis of only the records or only the index), and
//! writers racing each other; and the repair walk (`repair_index`) that finds what drifted.

use std::{collections::HashMap, time::Duration};

use gateway::{
    backend::{BackendSettings, Counts, PresenceWrite},
    presence::{ChosenStatus, NodeEntry, platforms_of, visibly_online},
};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use shared::Status;

use super::{Factory, N1, Under, chosen, entry, idle, short_ttl, sleep_past};

contract!(
    counts_follow_every_change,
    retried_writes_count_once,
    reaping_keeps_counts_exact,
    counts_come_back_after_the_backend_lost_everything,
    repair_drops_users_whose_entries_expired,
    repair_finds_an_index_whose_records_were_lost { memory: #[ignore = "Redis only: the embedded backend cannot lose part of its data"] },
    renewal_restores_a_lost_index { memory: #[ignore = "Redis only: the embedded backend cannot lose part of its data"] },
    racing_writers_leave_exact_counts,
    a_node_of_the_version_before_buckets_is_reaped { memory: #[ignore = "Redis only: key layouts of older versions"] },
);

fn users(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{i:02}")).collect()
}

/// A batch connecting every one of `users` on `platform`.
fn connected(
    users: &[String],
    platform: u8,
) -> Vec<(&str, Option<NodeEntry>, Option<ChosenStatus>)> {
    users
        .iter()
        .map(|u| (u.as_str(), Some(entry(&[platform])), None))
        .collect()
}

/// Counts and the online list (in id order) as the records of `users` say.
async fn truth(b: &Under, users: &[String], platform: Option<u8>) -> (Counts, Vec<String>) {
    let records = b.presence.presence(users).await.expect("presence");
    let mut counts = Counts::default();
    let mut online = Vec::new();
    for r in records.into_iter().filter(|r| visibly_online(r.status)) {
        counts.online_users += 1;
        for p in platforms_of(r.platforms) {
            *counts.by_platform.entry(p).or_default() += 1;
        }
        if platform.is_none_or(|p| platforms_of(r.platforms).contains(&p)) {
            online.push(r.user);
        }
    }
    online.sort();
    (counts, online)
}

/// Counts, the online list, and the online list of one platform equal the truth.
async fn assert_exact(b: &Under, users: &[String], when: &str) {
    let (counts, online) = truth(b, users, None).await;
    assert_eq!(
        b.presence.counts().await.expect("counts"),
        counts,
        "counts {when}"
    );
    assert_eq!(b.all_online(7, None).await, online, "online list {when}");
    let (_, on_two) = truth(b, users, Some(2)).await;
    assert_eq!(b.all_online(3, Some(2)).await, on_two, "platform 2 {when}");
}

/// A random entry: one to three platforms, sometimes idle.
fn random_entry(rng: &mut StdRng) -> NodeEntry {
    let platforms: Vec<u8> = (0..rng.random_range(1..=3))
        .map(|_| rng.random_range(1..=4))
        .collect();
    if rng.random_bool(0.2) {
        idle(&platforms)
    } else {
        entry(&platforms)
    }
}

fn random_status(rng: &mut StdRng) -> ChosenStatus {
    let status = *[
        Status::Online,
        Status::Away,
        Status::Busy,
        Status::Invisible,
    ]
    .choose(rng)
    .expect("four");
    chosen(status, None)
}

async fn counts_follow_every_change(f: Factory) {
    let mut b = f.backend().await;
    b.announce("n2").await;
    let all = users(12);
    let mut rng = StdRng::seed_from_u64(11);
    let mut connected: HashMap<(&str, String), NodeEntry> = HashMap::new();
    for step in 0..40 {
        let node = *[N1, "n2"].choose(&mut rng).expect("two");
        let mut batch = Vec::new();
        let mut picked: Vec<&String> = all.choose_multiple(&mut rng, 4).collect();
        picked.sort();
        for user in picked {
            let held = connected.get(&(node, user.clone())).copied();
            let (entry, status) = match rng.random_range(0..4) {
                0 => (None, None),
                1 if held.is_some() => (held, Some(random_status(&mut rng))),
                2 => (Some(random_entry(&mut rng)), Some(random_status(&mut rng))),
                _ => (Some(random_entry(&mut rng)), None),
            };
            match entry {
                Some(e) => connected.insert((node, user.clone()), e),
                None => connected.remove(&(node, user.clone())),
            };
            batch.push((user.as_str(), entry, status));
        }
        b.write(node, &batch).await;
        assert_exact(&b, &all, &format!("after step {step} ({node}: {batch:?})")).await;
    }
}

async fn retried_writes_count_once(f: Factory) {
    let mut b = f.backend().await;
    let all = users(6);
    let on: Vec<(&str, Option<NodeEntry>, Option<ChosenStatus>)> = all
        .iter()
        .enumerate()
        .map(|(i, u)| {
            let status = (i == 5).then(|| chosen(Status::Invisible, None));
            (u.as_str(), Some(entry(&[1 + (i % 3) as u8])), status)
        })
        .collect();
    b.write(N1, &on).await;
    // A write whose answer was lost is sent again as it was (the shard kept `before`).
    let again: Vec<PresenceWrite> = on
        .iter()
        .map(|(user, entry, status)| PresenceWrite {
            user: user.to_string(),
            entry: *entry,
            before: None,
            status: status.clone(),
        })
        .collect();
    for _ in 0..2 {
        b.presence
            .write_presence(N1, again.clone())
            .await
            .expect("write");
    }
    assert_exact(&b, &all, "after the same batch three times").await;
    assert_eq!(b.presence.counts().await.expect("counts").online_users, 5);
    let off: Vec<PresenceWrite> = again
        .iter()
        .take(2)
        .map(|w| PresenceWrite {
            entry: None,
            before: w.entry,
            status: None,
            ..w.clone()
        })
        .collect();
    for _ in 0..3 {
        b.presence
            .write_presence(N1, off.clone())
            .await
            .expect("write");
    }
    assert_exact(&b, &all, "after a removal sent three times").await;
    assert_eq!(b.presence.counts().await.expect("counts").online_users, 3);
    b.renew(N1, &[("c05", chosen(Status::Invisible, None))])
        .await;
    b.renew(N1, &[("c05", chosen(Status::Invisible, None))])
        .await;
    assert_exact(&b, &all, "after renewals").await;
    assert_eq!(
        b.presence.counts().await.expect("counts").online_users,
        5,
        "the harness renews what it wrote last: all six, c05 invisible"
    );
}

async fn reaping_keeps_counts_exact(f: Factory) {
    let ttl = Duration::from_millis(1500);
    let mut b = f.backend_with(short_ttl(ttl)).await;
    b.announce("n2").await;
    let all = users(8);
    b.write("n2", &connected(&all, 2)).await;
    // c00..c02 are also on n1, c02 invisible (chosen through n1).
    let invisible = chosen(Status::Invisible, None);
    b.write(
        N1,
        &[
            ("c00", Some(entry(&[1])), None),
            ("c01", Some(entry(&[3])), Some(chosen(Status::Busy, None))),
            ("c02", Some(entry(&[1])), Some(invisible.clone())),
        ],
    )
    .await;
    assert_exact(&b, &all, "with both nodes").await;
    // n2 dies; n1 keeps renewing and announcing.
    keep_n1_alive(&b, ttl, &[("c02", invisible)]).await;
    let reaped = b.registry.reap_dead_nodes(N1).await.expect("reap");
    // n1's last renewal already dropped n2's expired entries of c00..c02 (and published it).
    assert_eq!(reaped.len(), 5, "c03..c07 went offline: {reaped:?}");
    assert_exact(&b, &all, "after reaping n2").await;
    assert_eq!(
        b.presence.counts().await.expect("counts").online_users,
        2,
        "c00 and c01"
    );
}

/// Waits until every entry of a node other than n1 has expired, renewing n1's entries and
/// announcing it on the way, the last time just now: n1's entries live a whole `ttl` more.
async fn keep_n1_alive(b: &Under, ttl: Duration, chosen: &[(&str, ChosenStatus)]) {
    for _ in 0..2 {
        sleep_past(ttl / 2).await;
        b.renew(N1, chosen).await;
        b.announce(N1).await;
    }
}

async fn counts_come_back_after_the_backend_lost_everything(f: Factory) {
    let ttl = Duration::from_millis(300);
    let mut b = f
        .backend_with(BackendSettings {
            node_ttl: Duration::from_secs(30),
            ..short_ttl(ttl)
        })
        .await;
    let all = users(5);
    for (i, u) in all.iter().enumerate() {
        b.connect(u, &[1 + i as u8]).await;
    }
    b.lose_presence().await;
    assert_exact(&b, &all, "after the loss").await;
    b.renew(N1, &[]).await;
    assert_exact(&b, &all, "after the renewal that follows a resync").await;
    assert_eq!(b.presence.counts().await.expect("counts").online_users, 5);
}

async fn repair_drops_users_whose_entries_expired(f: Factory) {
    let ttl = Duration::from_millis(1500);
    let mut b = f.backend_with(short_ttl(ttl)).await;
    b.announce("n2").await;
    let all = users(4);
    b.write(
        "n2",
        &[
            ("c00", Some(entry(&[1])), None),
            ("c01", Some(entry(&[2])), None),
        ],
    )
    .await;
    b.write(N1, &[("c02", Some(entry(&[1])), None)]).await;
    assert_eq!(b.presence.counts().await.expect("counts").online_users, 3);
    // n2 crashed; n1 lives on. Nobody has reaped n2 yet when the repair walks by.
    keep_n1_alive(&b, ttl, &[]).await;
    let fixed = b.repair_pass().await;
    assert_exact(&b, &all, "after a repair pass").await;
    assert_eq!(b.all_online(10, None).await, ["c02"]);
    if f.kind() == super::Kind::Redis {
        assert_eq!(fixed, 2, "c00 and c01 corrected");
        assert_eq!(b.repair_pass().await, 0, "nothing left to correct");
    }
    let reaped = b.registry.reap_dead_nodes(N1).await.expect("reap");
    assert_eq!(reaped.len(), 2, "the reaper still publishes their offline");
    assert_exact(&b, &all, "after reaping").await;
}

async fn repair_finds_an_index_whose_records_were_lost(f: Factory) {
    let mut b = f.backend().await;
    let all = users(30);
    for u in &all {
        b.connect(u, &[1]).await;
    }
    assert!(b.lose_records() >= 30);
    // n1 died meanwhile, so nobody renews them: the repair walk has to find them.
    let fixed = b.repair_pass().await;
    assert_eq!(fixed, 30);
    assert_exact(&b, &all, "after the repair").await;
    assert_eq!(
        b.presence.counts().await.expect("counts"),
        Counts::default()
    );
    // n1 was only slow after all: its renewal puts everything back.
    b.renew(N1, &[]).await;
    assert_exact(&b, &all, "after n1's renewal").await;
    assert_eq!(b.presence.counts().await.expect("counts").online_users, 30);
}

async fn renewal_restores_a_lost_index(f: Factory) {
    let mut b = f.backend().await;
    let all = users(20);
    for (i, u) in all.iter().enumerate() {
        b.connect(u, &[1 + (i % 2) as u8]).await;
    }
    assert!(b.lose_index() > 0);
    assert_eq!(
        b.presence.counts().await.expect("counts"),
        Counts::default()
    );
    assert_eq!(
        b.repair_pass().await,
        0,
        "an empty index has nothing to walk"
    );
    b.renew(N1, &[]).await;
    assert_exact(&b, &all, "after the renewal").await;
    // Their removal finds them in the index again.
    for u in all.iter().take(5) {
        b.disconnect(u).await;
    }
    assert_exact(&b, &all, "after five left").await;
    assert_eq!(b.presence.counts().await.expect("counts").online_users, 15);
}

/// Two nodes write the same users at the same time, each after its own reads of nothing: on
/// Redis their index reports can arrive in either order, and the older must never win.
async fn racing_writers_leave_exact_counts(f: Factory) {
    let b = f.backend().await;
    b.announce("n2").await;
    let peer = b.peer("n2").await;
    let all = users(6);
    let run = |presence: std::sync::Arc<dyn gateway::backend::PresenceStore>,
               node: &'static str,
               seed: u64| {
        let all = all.clone();
        async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut held: HashMap<String, NodeEntry> = HashMap::new();
            for _ in 0..60 {
                let user = all.choose(&mut rng).expect("users").clone();
                let before = held.get(&user).copied();
                let entry = rng.random_bool(0.6).then(|| random_entry(&mut rng));
                let status = rng.random_bool(0.3).then(|| random_status(&mut rng));
                presence
                    .write_presence(
                        node,
                        vec![PresenceWrite {
                            user: user.clone(),
                            entry,
                            before,
                            status,
                        }],
                    )
                    .await
                    .expect("write");
                match entry {
                    Some(e) => held.insert(user, e),
                    None => held.remove(&user),
                };
            }
        }
    };
    tokio::join!(
        run(b.presence.clone(), N1, 1),
        run(peer.presence.clone(), "n2", 2)
    );
    assert_exact(&b, &all, "after two racing writers").await;
}

/// A node of a version from before the bucketed index kept its users in one set,
/// `{P}:n:<node>:u` (and one per platform): when it dies, a node of this version reaps them.
async fn a_node_of_the_version_before_buckets_is_reaped(f: Factory) {
    let ttl = Duration::from_millis(600);
    let mut b = f.backend_with(short_ttl(ttl)).await;
    b.announce("old").await;
    let all = users(5);
    b.write("old", &connected(&all, 1)).await;
    // What that version left in Redis: its users in the old set, none in the buckets' sets.
    assert!(b.delete_keys("{prefix}:ix:*:n:old") > 0);
    let mut zadd = vec!["ZADD".to_string(), b.key("{{prefix}}:n:old:u")];
    for u in &all {
        zadd.extend(["0".to_string(), u.clone()]);
    }
    b.redis_cli(&zadd);
    b.redis_cli(&[
        "ZADD".to_string(),
        b.key("{{prefix}}:n:old:p1"),
        "0".into(),
        "c00".into(),
    ]);
    keep_n1_alive(&b, ttl, &[]).await;
    let reaped = b.registry.reap_dead_nodes(N1).await.expect("reap");
    assert_eq!(reaped.len(), 5, "{reaped:?}");
    assert_exact(&b, &all, "after reaping the old node").await;
    assert_eq!(
        b.presence.counts().await.expect("counts"),
        Counts::default()
    );
    assert_eq!(
        b.delete_keys("{{prefix}}:n:old:*"),
        0,
        "its old sets are gone"
    );
}
