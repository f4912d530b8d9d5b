//! `Registry` (backend/registry.rs): announcements listed in id order, leaving, silent nodes dying
//! after `node_ttl`, and each dead node reaped by exactly one caller, who alone gets its users'
//! changes (which are published too).
//!
//! Reaping across two callers runs on two backends over the same data: on Redis two connections
//! on one prefix; on the embedded backend (one process holds every node, so "another node" is
//! the same backend) two concurrent calls, where reaping means sweeping the entries past their
//! expiry, which with `presence_ttl == node_ttl` are exactly the dead node's.
//!
//! A drained node's handover (zero-flap restarts): its users stay online, unpublished, until the
//! window ends; one who is written by another node meanwhile never changes; the rest are reaped
//! offline afterwards, once; a new run under the node's id finds nothing of it.

use std::time::Duration;

use gateway::backend::{BackendSettings, Topic};
use shared::Status;

use super::{Factory, N1, entry, mask, node_info, short_ttl, sleep_past};

contract!(
    announced_nodes_are_listed_in_id_order,
    leaving_removes_the_node,
    leaving_removes_the_nodes_entries,
    silent_nodes_drop_out,
    dead_nodes_are_reaped_exactly_once,
    a_reap_left_part_way_is_taken_up_by_its_reaper { memory: #[ignore = "Redis only: the embedded backend has no reap lock"] },
    me_is_never_reaped,
    handed_over_entries_stay_until_the_window_ends,
);

fn ids(nodes: &[gateway::backend::NodeInfo]) -> Vec<&str> {
    nodes.iter().map(|n| n.id.as_str()).collect()
}

async fn announced_nodes_are_listed_in_id_order(f: Factory) {
    let b = f.backend().await;
    let n3 = node_info("n3", 4);
    let n0 = node_info("n0", 0);
    b.registry.announce_node(&n3).await.expect("announce");
    b.registry.announce_node(&n0).await.expect("announce");
    let nodes = b.registry.nodes().await.expect("nodes");
    assert_eq!(ids(&nodes), ["n0", N1, "n3"]);
    assert_eq!(nodes[0], n0, "as announced");
    assert_eq!(nodes[2], n3);

    let refreshed = node_info("n3", 9);
    b.registry
        .announce_node(&refreshed)
        .await
        .expect("announce");
    let nodes = b.registry.nodes().await.expect("nodes");
    assert_eq!(ids(&nodes), ["n0", N1, "n3"], "refreshed, not added");
    assert_eq!(nodes[2], refreshed);
}

async fn leaving_removes_the_node(f: Factory) {
    let b = f.backend().await;
    b.announce("n2").await;
    b.registry.leave_node("n2").await.expect("leave");
    assert_eq!(ids(&b.registry.nodes().await.expect("nodes")), [N1]);
    b.registry.leave_node("never-there").await.expect("leave");
}

async fn leaving_removes_the_nodes_entries(f: Factory) {
    let mut b = f.backend().await;
    b.announce("n2").await;
    b.watch(vec![Topic::Presence("left".into())]).await;
    b.write(
        "n2",
        &[
            ("left", Some(entry(&[1])), None),
            ("both", Some(entry(&[2])), None),
        ],
    )
    .await;
    b.connect("both", &[1]).await;
    b.presence_events().await;
    // n2 shuts down after a final flush that failed: it still holds entries.
    b.registry.leave_node("n2").await.expect("leave");
    let left = b.record("left").await;
    assert_eq!((left.status, left.platforms), (Status::Offline, 0));
    let both = b.record("both").await;
    assert_eq!((both.status, both.platforms), (Status::Online, mask(&[1])));
    assert_eq!(b.all_online(10, None).await, ["both"]);
    assert_eq!(
        b.presence_events().await,
        vec![left],
        "the change is published"
    );
}

async fn silent_nodes_drop_out(f: Factory) {
    let ttl = Duration::from_millis(200);
    let b = f.backend_with(short_ttl(ttl)).await;
    b.announce("n2").await;
    assert_eq!(ids(&b.registry.nodes().await.expect("nodes")), [N1, "n2"]);
    sleep_past(ttl).await;
    b.announce(N1).await;
    assert_eq!(
        ids(&b.registry.nodes().await.expect("nodes")),
        [N1],
        "n2 stopped announcing"
    );
}

async fn dead_nodes_are_reaped_exactly_once(f: Factory) {
    let ttl = Duration::from_millis(300);
    let mut b = f.backend_with(short_ttl(ttl)).await;
    let peer = b.peer("n2").await;
    b.announce("dead").await;
    b.watch(vec![Topic::Presence("d1".into())]).await;
    let written = b
        .write(
            "dead",
            &[
                ("d1", Some(entry(&[1])), None),
                ("d2", Some(entry(&[1, 3])), None),
            ],
        )
        .await;
    assert_eq!(b.presence_events().await.len(), 1, "d1's change");
    // "dead" stops announcing and renewing; N1 and n2 keep announcing.
    sleep_past(ttl).await;
    b.announce(N1).await;
    b.announce(&peer.node).await;

    let (mine, theirs) = tokio::join!(
        b.registry.reap_dead_nodes(N1),
        peer.registry.reap_dead_nodes(&peer.node)
    );
    let (mine, theirs) = (mine.expect("reap"), theirs.expect("reap"));
    assert!(
        mine.is_empty() || theirs.is_empty(),
        "one caller reaps the dead node: {mine:?} / {theirs:?}"
    );
    let mut reaped: Vec<_> = mine.into_iter().chain(theirs).collect();
    reaped.sort_by(|a, c| a.record.user.cmp(&c.record.user));
    let users: Vec<&str> = reaped.iter().map(|c| c.record.user.as_str()).collect();
    assert_eq!(users, ["d1", "d2"], "each user's change once");
    for (change, before) in reaped.iter().zip(&written) {
        assert_eq!(change.before_platforms, before.record.platforms);
        assert_eq!(change.record.status, Status::Offline);
        assert_eq!(change.record.platforms, 0);
        assert_eq!(change.transition(), Some(false));
        assert!(change.record.version > before.record.version);
        assert_eq!(b.record(&change.record.user).await, change.record);
    }
    assert_eq!(
        b.presence_events().await,
        vec![reaped[0].record.clone()],
        "published once"
    );
    assert!(!ids(&b.registry.nodes().await.expect("nodes")).contains(&"dead"));
    assert_eq!(b.all_online(10, None).await, Vec::<String>::new());

    let again = peer
        .registry
        .reap_dead_nodes(&peer.node)
        .await
        .expect("reap");
    assert_eq!(again, vec![], "nothing left to reap");
    assert_eq!(b.registry.reap_dead_nodes(N1).await.expect("reap"), vec![]);
}

/// A reaper whose reap of a dead node failed part-way (Redis went away) still holds that node's
/// lock: the next round it takes up the reap itself, rather than leaving the dead node's users
/// online until the lock expires. A lock another survivor holds is left to it.
async fn a_reap_left_part_way_is_taken_up_by_its_reaper(f: Factory) {
    let ttl = Duration::from_millis(300);
    let mut b = f.backend_with(short_ttl(ttl)).await;
    let peer = b.peer("n2").await;
    b.announce("dead").await;
    b.write("dead", &[("d1", Some(entry(&[1])), None)]).await;
    sleep_past(ttl).await;
    b.announce(N1).await;
    b.announce(&peer.node).await;
    b.hold_reap_lock("dead", N1);

    let theirs = peer
        .registry
        .reap_dead_nodes(&peer.node)
        .await
        .expect("reap");
    assert_eq!(theirs, vec![], "the lock is N1's");
    let mine = b.registry.reap_dead_nodes(N1).await.expect("reap");
    let users: Vec<&str> = mine.iter().map(|c| c.record.user.as_str()).collect();
    assert_eq!(users, ["d1"], "N1 takes up its own reap");
    assert_eq!(b.record("d1").await.status, Status::Offline);
    assert_eq!(b.all_online(10, None).await, Vec::<String>::new());
}

async fn me_is_never_reaped(f: Factory) {
    // The node's heartbeat stalled past node_ttl (its entries are still fresh): it is not its own
    // reaper.
    let mut b = f
        .backend_with(BackendSettings {
            node_ttl: Duration::from_millis(150),
            ..super::settings()
        })
        .await;
    let on = b.connect("mine", &[1]).await.expect("online");
    sleep_past(Duration::from_millis(150)).await;
    assert_eq!(b.registry.reap_dead_nodes(N1).await.expect("reap"), vec![]);
    assert_eq!(b.record("mine").await, on.record, "still online");
}

async fn handed_over_entries_stay_until_the_window_ends(f: Factory) {
    let window = Duration::from_millis(400);
    let mut b = f.backend().await;
    b.announce("n2").await;
    b.watch(vec![
        Topic::Presence("back".into()),
        Topic::Presence("gone".into()),
    ])
    .await;
    let written = b
        .write(
            "n2",
            &[
                ("back", Some(entry(&[1])), None),
                ("gone", Some(entry(&[1, 3])), None),
            ],
        )
        .await;
    assert_eq!(b.presence_events().await.len(), 2);

    let handed = b.registry.hand_over("n2", window).await.expect("hand over");
    assert_eq!(handed, 2);
    assert_eq!(ids(&b.registry.nodes().await.expect("nodes")), [N1]);
    for before in &written {
        assert_eq!(
            b.record(&before.record.user).await,
            before.record,
            "unchanged"
        );
    }
    assert_eq!(b.all_online(10, None).await, ["back", "gone"]);
    assert_eq!(b.all_online(10, Some(3)).await, ["gone"]);
    assert_eq!(b.presence.counts().await.expect("counts").online_users, 2);
    // "back" reconnects through N1: nothing anyone sees changes.
    assert_eq!(b.connect("back", &[1]).await, None);
    assert_eq!(b.registry.reap_dead_nodes(N1).await.expect("reap"), vec![]);
    assert_eq!(b.presence_events().await, vec![], "nothing published");
    // A new run under the same id starts clean: the handed-over entries are not its own.
    assert_eq!(
        b.registry.reap_previous_run("n2").await.expect("reap"),
        vec![]
    );
    assert_eq!(b.record("gone").await, written[1].record);

    sleep_past(window).await;
    b.announce(N1).await;
    let gone = b.record("gone").await;
    assert_eq!(
        (gone.status, gone.platforms),
        (Status::Offline, 0),
        "expired"
    );
    assert_eq!(b.record("back").await, written[0].record, "still online");
    let reaped = b.registry.reap_dead_nodes(N1).await.expect("reap");
    let users: Vec<&str> = reaped.iter().map(|c| c.record.user.as_str()).collect();
    assert_eq!(
        users,
        ["gone"],
        "the offline change goes to the reaper, for webhooks"
    );
    assert_eq!(reaped[0].transition(), Some(false));
    assert_eq!(reaped[0].record.status, Status::Offline);
    assert_eq!(
        b.presence_events().await,
        vec![reaped[0].record.clone()],
        "published once"
    );
    assert_eq!(b.all_online(10, None).await, ["back"]);
    assert_eq!(b.presence.counts().await.expect("counts").online_users, 1);
    assert_eq!(b.registry.reap_dead_nodes(N1).await.expect("reap"), vec![]);
}
