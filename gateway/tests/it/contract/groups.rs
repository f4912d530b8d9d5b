//! `Groups` (backend/groups.rs) and `online_members`: membership kept both ways and visible at
//! once, members paged in id order, adding twice or removing a non-member changes nothing (the
//! embedded backend announces nothing again; Redis may announce again, as the doc allows), a user's
//! groups bounded by `max_groups_per_user`.

use gateway::backend::{Added, BackendEvent, BackendSettings, Topic, online_members};
use shared::Status;

use super::{Factory, Kind, N1, chosen, entry, idle, strings};

contract!(
    membership_is_kept_both_ways,
    members_page_in_id_order,
    adding_twice_and_removing_non_members_change_nothing,
    unknown_groups_and_users_are_empty,
    online_members_are_the_visibly_online_members,
    a_user_is_in_at_most_max_groups,
);

async fn user_groups(b: &super::Under, user: &str) -> Vec<String> {
    let mut groups = b.groups.user_groups(user).await.expect("user_groups");
    groups.sort();
    groups
}

async fn all_members(b: &super::Under, group: &str) -> Vec<String> {
    b.groups
        .members(group, None, 1000)
        .await
        .expect("members")
        .0
}

async fn membership_is_kept_both_ways(f: Factory) {
    let b = f.backend().await;
    b.groups.add_member("g", "b").await.expect("add");
    b.groups.add_member("g", "a").await.expect("add");
    b.groups.add_member("h", "a").await.expect("add");
    assert_eq!(all_members(&b, "g").await, ["a", "b"]);
    assert_eq!(all_members(&b, "h").await, ["a"]);
    assert_eq!(user_groups(&b, "a").await, ["g", "h"]);
    assert!(b.groups.is_member("g", "a").await.expect("is_member"));
    assert!(!b.groups.is_member("h", "b").await.expect("is_member"));

    b.groups.remove_member("g", "a").await.expect("remove");
    assert_eq!(all_members(&b, "g").await, ["b"]);
    assert_eq!(user_groups(&b, "a").await, ["h"]);
    assert!(!b.groups.is_member("g", "a").await.expect("is_member"));
    let peer = b.peer("n2").await;
    assert_eq!(
        peer.groups.user_groups("a").await.expect("user_groups"),
        ["h"],
        "visible to every node"
    );
}

async fn members_page_in_id_order(f: Factory) {
    let b = f.backend().await;
    let users = ["m5", "m1", "m6", "m3", "m2", "m4"];
    for user in users {
        b.groups.add_member("big", user).await.expect("add");
    }
    let (page, next) = b.groups.members("big", None, 4).await.expect("members");
    assert_eq!(page, ["m1", "m2", "m3", "m4"]);
    assert_eq!(next.as_deref(), Some("m4"));
    let (page, next) = b
        .groups
        .members("big", Some("m4"), 2)
        .await
        .expect("members");
    assert_eq!(page, ["m5", "m6"]);
    assert_eq!(next, None, "the end, even on a full page");
    for limit in [1, 2, 3, 5, 6, 7] {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = b
                .groups
                .members("big", after.as_deref(), limit)
                .await
                .expect("members");
            assert!(page.len() <= limit);
            all.extend(page);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(
            all,
            strings(&["m1", "m2", "m3", "m4", "m5", "m6"]),
            "pages of {limit}"
        );
    }
    let (page, next) = b
        .groups
        .members("big", Some("m35"), 10)
        .await
        .expect("members");
    assert_eq!((page, next), (strings(&["m4", "m5", "m6"]), None));
}

async fn adding_twice_and_removing_non_members_change_nothing(f: Factory) {
    let mut b = f.backend().await;
    b.watch(vec![Topic::Inbox("twice".into())]).await;
    b.groups.add_member("g", "twice").await.expect("add");
    b.groups.add_member("g", "twice").await.expect("add again");
    assert_eq!(all_members(&b, "g").await, ["twice"]);
    assert_eq!(user_groups(&b, "twice").await, ["g"]);
    let joined: Vec<_> = b
        .sync()
        .await
        .into_iter()
        .map(|e| match e {
            BackendEvent::Membership {
                user,
                group,
                joined,
            } => (user, group, joined),
            other => panic!("unexpected event {other:?}"),
        })
        .collect();
    let expected = ("twice".to_string(), "g".to_string(), true);
    match f.kind() {
        Kind::Memory => assert_eq!(joined, [expected], "announced once"),
        Kind::Redis => assert_eq!(joined, [expected.clone(), expected], "announced again"),
    }

    b.groups
        .remove_member("g", "stranger")
        .await
        .expect("remove a non-member");
    b.groups
        .remove_member("nowhere", "twice")
        .await
        .expect("remove from an unknown group");
    assert_eq!(all_members(&b, "g").await, ["twice"]);
    assert_eq!(user_groups(&b, "twice").await, ["g"]);
    b.groups.remove_member("g", "twice").await.expect("remove");
    b.groups
        .remove_member("g", "twice")
        .await
        .expect("remove again");
    assert_eq!(all_members(&b, "g").await, Vec::<String>::new());
    assert_eq!(user_groups(&b, "twice").await, Vec::<String>::new());
    let left = b
        .sync()
        .await
        .into_iter()
        .filter(|e| matches!(e, BackendEvent::Membership { joined: false, user, .. } if user == "twice"))
        .count();
    match f.kind() {
        Kind::Memory => assert_eq!(left, 1, "announced once"),
        Kind::Redis => assert!(left >= 1, "announced, maybe again"),
    }
}

async fn unknown_groups_and_users_are_empty(f: Factory) {
    let b = f.backend().await;
    assert_eq!(
        b.groups.members("none", None, 10).await.expect("members"),
        (Vec::new(), None)
    );
    assert!(!b.groups.is_member("none", "x").await.expect("is_member"));
    assert_eq!(user_groups(&b, "x").await, Vec::<String>::new());
}

async fn online_members_are_the_visibly_online_members(f: Factory) {
    let mut b = f.backend().await;
    for user in ["on", "hidden", "off", "idle", "gone"] {
        b.groups.add_member("team", user).await.expect("add");
    }
    b.write(
        N1,
        &[
            ("on", Some(entry(&[1])), None),
            (
                "hidden",
                Some(entry(&[1])),
                Some(chosen(Status::Invisible, None)),
            ),
            ("idle", Some(idle(&[2])), None),
            ("gone", Some(entry(&[1])), None),
            ("outsider", Some(entry(&[1])), None),
        ],
    )
    .await;
    b.disconnect("gone").await;
    let mut online = online_members(&*b.groups, &*b.presence, "team")
        .await
        .expect("online_members");
    online.sort();
    assert_eq!(online, ["idle", "on"]);
    assert_eq!(
        online_members(&*b.groups, &*b.presence, "empty")
            .await
            .expect("online_members"),
        Vec::<String>::new()
    );
}

async fn a_user_is_in_at_most_max_groups(f: Factory) {
    let b = f
        .backend_with(BackendSettings {
            max_groups_per_user: 3,
            ..super::settings()
        })
        .await;
    for g in ["g1", "g2", "g3"] {
        assert_eq!(
            b.groups.add_member(g, "u").await.expect("add"),
            Added::Member
        );
    }
    assert_eq!(
        b.groups.add_member("g4", "u").await.expect("add"),
        Added::TooManyGroups,
        "a fourth group is refused"
    );
    assert_eq!(
        user_groups(&b, "u").await,
        ["g1", "g2", "g3"],
        "nothing changed"
    );
    assert_eq!(all_members(&b, "g4").await, Vec::<String>::new());
    assert!(!b.groups.is_member("g4", "u").await.expect("is_member"));
    assert_eq!(
        b.groups.add_member("g2", "u").await.expect("add"),
        Added::Member,
        "adding again to a group the user is in is never refused"
    );
    assert_eq!(
        b.groups.add_member("g4", "v").await.expect("add"),
        Added::Member,
        "the limit is per user"
    );
    b.groups.remove_member("g1", "u").await.expect("remove");
    assert_eq!(
        b.groups.add_member("g4", "u").await.expect("add"),
        Added::Member,
        "leaving a group makes room"
    );
    assert_eq!(user_groups(&b, "u").await, ["g2", "g3", "g4"]);
    assert_eq!(all_members(&b, "g4").await, ["u", "v"]);
}
