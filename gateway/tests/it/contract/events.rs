//! `Subscriptions` (backend/events.rs) and the events every role hands the `EventSink`: only
//! watched topics are heard, none after the last unwatch, presence in version order per user,
//! membership changes on the user's inbox, group and private messages, broadcasts.

use gateway::backend::{Audience, BackendEvent, Delivery, Origin, Topic};
use shared::{Destination, RouteResult, Status};

use super::{Factory, N1, entry, private, to_group};

contract!(
    presence_events_only_for_watched_users,
    no_events_after_unwatch,
    presence_events_in_version_order,
    changes_from_other_nodes_reach_watchers,
    watching_twice_is_watching_once,
    membership_events_reach_the_watched_inbox,
    membership_events_only_for_watched_inboxes,
    group_messages_reach_watched_groups,
    group_messages_only_for_watched_groups,
    private_messages_reach_both_inboxes_with_origin,
    broadcasts_reach_every_node,
    a_confirmed_watch_misses_no_change_after_it,
);

fn presence_topics(users: &[&str]) -> Vec<Topic> {
    users
        .iter()
        .map(|u| Topic::Presence(u.to_string()))
        .collect()
}

async fn presence_events_only_for_watched_users(f: Factory) {
    let mut b = f.backend().await;
    b.watch(presence_topics(&["watched"])).await;
    let changed = b
        .write(
            N1,
            &[
                ("watched", Some(entry(&[1])), None),
                ("other", Some(entry(&[1])), None),
            ],
        )
        .await;
    assert_eq!(changed.len(), 2, "both changed");
    let watched = changed
        .into_iter()
        .find(|c| c.record.user == "watched")
        .expect("watched changed");
    let events = b.sync().await;
    assert!(
        matches!(&events[..], [BackendEvent::Presence { record, .. }] if *record == watched.record),
        "one event, of the watched user: {events:?}"
    );
}

async fn no_events_after_unwatch(f: Factory) {
    let mut b = f.backend().await;
    b.watch(presence_topics(&["a", "b"])).await;
    b.connect("a", &[1]).await;
    b.connect("b", &[1]).await;
    assert_eq!(b.presence_events().await.len(), 2);
    b.unwatch(presence_topics(&["a"])).await;
    b.disconnect("a").await.expect("a offline");
    let b_off = b.disconnect("b").await.expect("b offline");
    assert_eq!(
        b.presence_events().await,
        vec![b_off.record],
        "a is no longer heard, b still is"
    );
    b.watch(presence_topics(&["a"])).await;
    let a_on = b.connect("a", &[2]).await.expect("a online");
    assert_eq!(
        b.presence_events().await,
        vec![a_on.record],
        "watched again"
    );
}

async fn presence_events_in_version_order(f: Factory) {
    let mut b = f.backend().await;
    b.watch(presence_topics(&["v"])).await;
    let mut written = Vec::new();
    written.extend(b.connect("v", &[1]).await);
    written.extend(b.connect("v", &[1, 2]).await);
    written.extend(b.set_status("v", Status::Busy, Some("1")).await);
    written.extend(b.set_status("v", Status::Busy, Some("2")).await);
    written.extend(b.connect("v", &[2]).await);
    written.extend(b.disconnect("v").await);
    written.extend(b.connect("v", &[3]).await);
    let records: Vec<_> = written.into_iter().map(|c| c.record).collect();
    assert_eq!(records.len(), 7, "every write changed something");
    let events = b.presence_events().await;
    assert_eq!(events, records, "each change once, in order");
    assert!(events.windows(2).all(|w| w[0].version < w[1].version));
}

async fn changes_from_other_nodes_reach_watchers(f: Factory) {
    let mut b = f.backend().await;
    let peer = b.peer("n2").await;
    b.watch(presence_topics(&["w"])).await;
    let changed = peer
        .presence
        .write_presence(
            &peer.node,
            vec![gateway::backend::PresenceWrite {
                user: "w".into(),
                entry: Some(entry(&[4])),
                before: None,
                status: None,
            }],
        )
        .await
        .expect("write_presence");
    assert_eq!(changed.len(), 1);
    assert_eq!(b.presence_events().await, vec![changed[0].record.clone()]);
}

async fn watching_twice_is_watching_once(f: Factory) {
    let mut b = f.backend().await;
    // A topic has one owner per node, which watches it once; a second watch changes nothing,
    // and one unwatch ends it.
    b.watch(presence_topics(&["twice"])).await;
    b.watch(presence_topics(&["twice"])).await;
    let on = b.connect("twice", &[1]).await.expect("online");
    assert_eq!(b.presence_events().await, vec![on.record], "one copy");
    b.unwatch(presence_topics(&["twice"])).await;
    b.disconnect("twice").await.expect("offline");
    assert_eq!(b.presence_events().await, vec![], "none after one unwatch");
}

async fn membership_events_reach_the_watched_inbox(f: Factory) {
    let mut b = f.backend().await;
    b.watch(vec![Topic::Inbox("m".into())]).await;
    b.groups.add_member("g1", "m").await.expect("add");
    b.groups.remove_member("g1", "m").await.expect("remove");
    let events = b.sync().await;
    let membership: Vec<_> = events
        .iter()
        .map(|e| match e {
            BackendEvent::Membership {
                user,
                group,
                joined,
            } => (user.as_str(), group.as_str(), *joined),
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    assert_eq!(membership, [("m", "g1", true), ("m", "g1", false)]);
}

async fn membership_events_only_for_watched_inboxes(f: Factory) {
    let mut b = f.backend().await;
    // Watched once, then no longer.
    b.watch(vec![Topic::Inbox("unwatched".into())]).await;
    b.unwatch(vec![Topic::Inbox("unwatched".into())]).await;
    b.groups.add_member("g1", "unwatched").await.expect("add");
    b.groups
        .remove_member("g1", "unwatched")
        .await
        .expect("remove");
    b.groups.add_member("g1", "unwatched").await.expect("add");
    let events = b.sync().await;
    assert!(
        events.is_empty(),
        "nobody watches the user's inbox: {events:?}"
    );
}

async fn group_messages_reach_watched_groups(f: Factory) {
    let mut b = f.backend().await;
    b.groups.add_member("g", "a").await.expect("add");
    b.groups.add_member("g", "b").await.expect("add");
    b.watch(vec![Topic::Group("g".into())]).await;
    b.sync().await;
    let origin = Origin {
        node: N1.into(),
        conn: 7,
    };
    let mut out = to_group("a", "g", "hi all", true);
    out.origin = Some(origin.clone());
    let outcome = b
        .messages
        .send(vec![out.clone()])
        .await
        .expect("send")
        .remove(0)
        .expect("a member may send");
    assert_eq!(outcome.result, RouteResult::Delivered);
    let events = b.sync().await;
    let [
        BackendEvent::Message(Delivery {
            audience,
            message,
            origin: got_origin,
        }),
    ] = &events[..]
    else {
        panic!("one group delivery: {events:?}");
    };
    assert_eq!(audience, &Audience::Group("g".into()));
    assert_eq!(got_origin.as_ref(), Some(&origin));
    assert_eq!(message.msg_id, outcome.msg_id);
    assert_eq!(
        (&message.from, &message.to, &message.body, message.sent_at),
        (&out.from, &out.to, &out.body, out.sent_at)
    );
    assert_eq!(message.offline, None);
}

async fn group_messages_only_for_watched_groups(f: Factory) {
    let mut b = f.backend().await;
    b.groups.add_member("quiet", "a").await.expect("add");
    b.groups.add_member("quiet", "b").await.expect("add");
    // Watched once, then no longer.
    b.watch(vec![Topic::Group("quiet".into())]).await;
    b.unwatch(vec![Topic::Group("quiet".into())]).await;
    b.sync().await;
    let outcome = b
        .messages
        .send(vec![to_group("a", "quiet", "anyone?", true)])
        .await
        .expect("send")
        .remove(0)
        .expect("a member may send");
    assert_eq!(outcome.result, RouteResult::Stored, "in history only");
    let events = b.sync().await;
    assert!(events.is_empty(), "nobody watches the group: {events:?}");
}

async fn private_messages_reach_both_inboxes_with_origin(f: Factory) {
    let mut b = f.backend().await;
    b.watch(vec![
        Topic::Inbox("alice".into()),
        Topic::Inbox("bob".into()),
    ])
    .await;
    let mut out = private("alice", "bob", "psst");
    out.origin = Some(Origin {
        node: N1.into(),
        conn: 3,
    });
    let outcome = b
        .messages
        .send(vec![out.clone()])
        .await
        .expect("send")
        .remove(0)
        .expect("sent");
    assert_eq!(outcome.result, RouteResult::Delivered);
    let mut deliveries: Vec<Delivery> = b
        .sync()
        .await
        .into_iter()
        .map(|e| match e {
            BackendEvent::Message(d) => d,
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    deliveries.sort_by_key(|d| format!("{:?}", d.audience));
    let audiences: Vec<_> = deliveries.iter().map(|d| d.audience.clone()).collect();
    assert_eq!(
        audiences,
        [Audience::User("alice".into()), Audience::User("bob".into())],
        "the recipient, and the sender's other devices"
    );
    for d in &deliveries {
        assert_eq!(d.message.msg_id, outcome.msg_id);
        assert_eq!(d.message.to, Destination::User { user: "bob".into() });
        assert_eq!(d.message.body, out.body);
        assert_eq!(d.origin, out.origin);
    }
}

async fn broadcasts_reach_every_node(f: Factory) {
    let mut b = f.backend().await;
    let out = gateway::backend::Outgoing {
        from: "system".into(),
        to: Destination::All { all: true },
        body: shared::Body::from("maintenance"),
        sent_at: gateway::clock::now_ms(),
        origin: None,
        check_membership: false,
        may_store: true,
        dedupe: None,
    };
    let outcome = b
        .messages
        .send(vec![out.clone()])
        .await
        .expect("send")
        .remove(0)
        .expect("sent");
    assert_eq!(outcome.result, RouteResult::Delivered);
    let events = b.sync().await;
    let [BackendEvent::Message(d)] = &events[..] else {
        panic!("one broadcast delivery: {events:?}");
    };
    assert_eq!(d.audience, Audience::All);
    assert_eq!(d.message.msg_id, outcome.msg_id);
    assert_eq!(d.message.body, out.body);
}

/// `watch_confirmed`: once it fires, a change made at once reaches the sink (what a
/// `subscribe`'s `presence_list` relies on: read after it, no change falls in between).
async fn a_confirmed_watch_misses_no_change_after_it(f: Factory) {
    let mut b = f.backend().await;
    for round in 0..5 {
        let user = format!("confirmed{round}");
        let (confirmed, confirmation) = tokio::sync::oneshot::channel();
        b.subscriptions
            .watch_confirmed(presence_topics(&[&user]), confirmed);
        confirmation.await.expect("the watch is confirmed");
        let changed = b.connect(&user, &[1]).await.expect("changed");
        let events = b.presence_events().await;
        assert_eq!(events, vec![changed.record], "round {round}");
    }
}
