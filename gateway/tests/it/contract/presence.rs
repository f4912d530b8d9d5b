//! `PresenceStore` (backend/presence.rs): records follow visible changes only, with versions that
//! grow per change (public versions only per change others see); entries expire without renewal; renewal keeps and re-creates them; online lists
//! page in id order and hide invisible users; counts; unknown users; `Changed::transition`.

use std::time::Duration;

use gateway::{
    backend::{BackendSettings, Counts, Topic},
    presence::{ChosenStatus, PresenceRecord},
};
use shared::Status;

use super::{Factory, MARGIN, N1, chosen, entry, idle, mask, short_ttl, sleep_past, strings};

contract!(
    write_reads_back_with_growing_versions,
    invisible_changes_nothing_visible_twice,
    invisible_activity_moves_only_the_own_version,
    an_invisible_first_connect_shows_others_nothing,
    an_invisible_users_expiry_shows_others_nothing,
    nothing_visible_changed_means_no_version_and_no_event,
    records_fold_every_nodes_entries,
    transitions_mark_first_connect_and_last_disconnect,
    batches_return_one_change_per_changed_user,
    unknown_users_are_offline_at_version_0,
    entries_expire_without_renewal,
    crashed_nodes_users_stop_counting_once_reaped,
    renewal_keeps_entries,
    renewal_recreates_lost_entries_and_restores_invisible,
    renewal_restores_the_chosen_status_only_when_lost,
    renewal_restores_the_newest_choice_whatever_the_order,
    online_users_page_in_id_order,
    online_users_filter_by_platform,
    counts_overall_and_per_platform,
);

async fn write_reads_back_with_growing_versions(f: Factory) {
    let mut b = f.backend().await;
    let mut versions = Vec::new();

    let on = b
        .connect("alice", &[1])
        .await
        .expect("first connect changes");
    assert_eq!(on.record.user, "alice");
    assert_eq!(on.record.status, Status::Online);
    assert_eq!(on.record.platforms, mask(&[1]));
    assert_eq!(on.record.text, None);
    assert_eq!(on.record.last_seen, None);
    assert!(on.record.version > 0);
    assert_eq!(b.record("alice").await, on.record);
    versions.push(on.record.version);

    let two = b.connect("alice", &[1, 5]).await.expect("a new platform");
    assert_eq!(two.record.platforms, mask(&[1, 5]));
    assert_eq!(b.record("alice").await, two.record);
    versions.push(two.record.version);

    let busy = b
        .set_status("alice", Status::Busy, Some("in a call"))
        .await
        .expect("a new status");
    assert_eq!(busy.record.status, Status::Busy);
    assert_eq!(busy.record.text.as_deref(), Some("in a call"));
    assert_eq!(busy.record.platforms, mask(&[1, 5]));
    assert_eq!(b.record("alice").await, busy.record);
    versions.push(busy.record.version);

    let off = b.disconnect("alice").await.expect("last connection gone");
    assert_eq!(off.record.status, Status::Offline);
    assert_eq!(off.record.platforms, 0);
    assert_eq!(off.record.text, None, "offline records carry no text");
    assert!(
        off.record.last_seen.is_some(),
        "going offline sets last_seen"
    );
    assert_eq!(b.record("alice").await, off.record);
    versions.push(off.record.version);

    let back = b.connect("alice", &[2]).await.expect("back online");
    assert_eq!(
        back.record.status,
        Status::Busy,
        "the chosen status outlives the connections"
    );
    assert_eq!(back.record.text.as_deref(), Some("in a call"));
    versions.push(back.record.version);
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions grow per change: {versions:?}"
    );
}

async fn invisible_changes_nothing_visible_twice(f: Factory) {
    let mut b = f.backend().await;
    b.connect("ivy", &[1]).await.expect("online");
    let inv = b
        .set_status("ivy", Status::Invisible, None)
        .await
        .expect("invisible is a change");
    assert_eq!(
        inv.record.status,
        Status::Invisible,
        "the record is the truth"
    );
    assert_eq!(inv.record.platforms, mask(&[1]));
    assert_eq!(
        b.set_status("ivy", Status::Invisible, None).await,
        None,
        "choosing the same status again changes nothing"
    );
    let online = b
        .set_status("ivy", Status::Online, None)
        .await
        .expect("visible again");
    assert_eq!(online.record.status, Status::Online);
    assert!(online.record.version > inv.record.version);
}

async fn invisible_activity_moves_only_the_own_version(f: Factory) {
    let mut b = f.backend().await;
    b.announce("n2").await;
    b.watch(vec![Topic::Presence("ivy".into())]).await;
    let online = b.connect("ivy", &[1]).await.expect("online").record;
    assert_eq!(
        online.public_version, online.version,
        "a visible change is everyone's"
    );
    let hidden = b
        .set_status("ivy", Status::Invisible, None)
        .await
        .expect("invisible is a change");
    assert!(hidden.public_changed, "others see ivy go offline");
    assert!(hidden.record.public_version > online.public_version);
    let public = hidden.record.public_view();
    assert_eq!(
        (public.status, public.version),
        (Status::Offline, hidden.record.public_version)
    );
    assert!(public.last_seen.is_some());
    b.presence_events().await;

    // Changes only ivy sees: a second device, another node, a switch, every device gone, back.
    let mut changes = vec![b.connect("ivy", &[1, 5]).await];
    changes.push(
        b.write("n2", &[("ivy", Some(entry(&[2])), None)])
            .await
            .pop(),
    );
    changes.push(b.connect("ivy", &[5]).await);
    changes.push(b.disconnect("ivy").await);
    changes.push(b.write("n2", &[("ivy", None, None)]).await.pop());
    changes.push(b.connect("ivy", &[3]).await);
    let changes: Vec<_> = changes
        .into_iter()
        .map(|c| c.expect("each is a change to ivy"))
        .collect();
    assert_eq!(changes.len(), 6);
    let mut own = hidden.record.version;
    for change in &changes {
        let record = &change.record;
        assert!(record.version > own, "ivy sees every change: {record:?}");
        own = record.version;
        assert!(!change.public_changed, "{record:?}");
        assert_eq!(record.public_version, hidden.record.public_version);
        assert_eq!(record.public_view(), public, "others see nothing move");
        assert_eq!(record.view_for(Some("bob")), public);
        assert_eq!(record.view_for(Some("ivy")).version, record.version);
    }
    assert_eq!(changes[3].record.status, Status::Invisible, "still on n2");
    assert_eq!(changes[4].record.status, Status::Offline, "no device left");
    assert_eq!(changes[5].record.status, Status::Invisible, "back");
    let read = b.record("ivy").await;
    assert_eq!(read, changes[5].record);
    assert_eq!(read.public_view(), public, "a poller sees nothing move");
    let events = b.public_flagged_events().await;
    assert_eq!(
        events,
        changes
            .iter()
            .map(|c| (c.record.clone(), false))
            .collect::<Vec<_>>(),
        "each published, flagged as the user's own"
    );

    let visible = b
        .set_status("ivy", Status::Online, None)
        .await
        .expect("visible again");
    assert!(visible.public_changed);
    assert!(visible.record.version > own);
    assert!(visible.record.public_version > hidden.record.public_version);
    assert!(visible.record.public_version <= visible.record.version);
    let seen = visible.record.view_for(Some("bob"));
    assert_eq!(
        (seen.status, seen.platforms, seen.version),
        (Status::Online, vec![3], visible.record.public_version)
    );
    assert_eq!(
        b.public_flagged_events().await,
        vec![(visible.record, true)]
    );
}

async fn an_invisible_first_connect_shows_others_nothing(f: Factory) {
    let mut b = f.backend().await;
    let hidden = b
        .write(
            N1,
            &[(
                "ghost",
                Some(entry(&[1])),
                Some(chosen(Status::Invisible, None)),
            )],
        )
        .await;
    assert_eq!(hidden.len(), 1);
    assert!(!hidden[0].public_changed);
    let record = b.record("ghost").await;
    assert!(record.version > 0);
    assert_eq!(
        record.public_view(),
        PresenceRecord::unknown("ghost").public_view(),
        "as if ghost never came: offline, no last_seen, version 0"
    );
    let gone = b.disconnect("ghost").await.expect("offline");
    assert!(!gone.public_changed);
    assert_eq!(gone.record.public_version, 0);
}

async fn an_invisible_users_expiry_shows_others_nothing(f: Factory) {
    let ttl = Duration::from_millis(300);
    let mut b = f
        .backend_with(BackendSettings {
            node_ttl: Duration::from_secs(30),
            ..short_ttl(ttl)
        })
        .await;
    b.connect("ivy", &[1]).await.expect("online");
    b.set_status("ivy", Status::Invisible, None)
        .await
        .expect("invisible");
    b.write(
        N1,
        &[(
            "ghost",
            Some(entry(&[2])),
            Some(chosen(Status::Invisible, None)),
        )],
    )
    .await;
    let hidden = [b.record("ivy").await, b.record("ghost").await];
    assert!(hidden[0].public_view().last_seen.is_some());
    assert_eq!(hidden[1].public_view().last_seen, None, "never visible");
    sleep_past(ttl).await;
    for before in hidden {
        let expired = b.record(&before.user).await;
        assert_eq!(
            (expired.status, expired.platforms),
            (Status::Offline, 0),
            "they see themselves offline: {expired:?}"
        );
        assert_eq!(expired.public_view(), before.public_view());
    }
}

async fn nothing_visible_changed_means_no_version_and_no_event(f: Factory) {
    let mut b = f.backend().await;
    b.announce("n2").await;
    b.watch(vec![Topic::Presence("bob".into())]).await;
    let on = b.connect("bob", &[3]).await.expect("online");

    assert_eq!(b.connect("bob", &[3]).await, None, "the same entry again");
    assert_eq!(
        b.set_status("bob", Status::Online, None).await,
        None,
        "the status it already has"
    );
    let other_node = b.write("n2", &[("bob", Some(entry(&[3])), None)]).await;
    assert_eq!(
        other_node,
        vec![],
        "a second node on the same platform changes no visible field"
    );
    assert_eq!(b.record("bob").await, on.record, "version unchanged");
    assert_eq!(
        b.presence_events().await,
        vec![on.record],
        "only the visible change was published"
    );
}

async fn records_fold_every_nodes_entries(f: Factory) {
    let mut b = f.backend().await;
    b.announce("n2").await;
    b.write(N1, &[("carol", Some(idle(&[1])), None)]).await;
    assert_eq!(
        b.record("carol").await.status,
        Status::Away,
        "idle everywhere and chose online: away"
    );
    let both = b.write("n2", &[("carol", Some(entry(&[5])), None)]).await;
    assert_eq!(both.len(), 1);
    assert_eq!(both[0].record.status, Status::Online, "active on n2");
    assert_eq!(
        both[0].record.platforms,
        mask(&[1, 5]),
        "platforms of both nodes"
    );
    let n1_gone = b.write(N1, &[("carol", None, None)]).await;
    assert_eq!(n1_gone.len(), 1);
    assert_eq!(n1_gone[0].record.platforms, mask(&[5]));
    assert_eq!(n1_gone[0].record.status, Status::Online);
    b.write(
        "n2",
        &[("carol", Some(idle(&[5])), Some(chosen(Status::Busy, None)))],
    )
    .await;
    assert_eq!(
        b.record("carol").await.status,
        Status::Busy,
        "idle keeps a chosen busy"
    );
}

async fn transitions_mark_first_connect_and_last_disconnect(f: Factory) {
    let mut b = f.backend().await;
    b.announce("n2").await;
    let first = b.write(N1, &[("dave", Some(entry(&[1])), None)]).await;
    assert_eq!(first[0].before_platforms, 0);
    assert_eq!(first[0].transition(), Some(true));
    let second = b.write("n2", &[("dave", Some(entry(&[2])), None)]).await;
    assert_eq!(second[0].before_platforms, mask(&[1]));
    assert_eq!(second[0].transition(), None, "already connected elsewhere");
    let status = b
        .set_status("dave", Status::Busy, None)
        .await
        .expect("busy");
    assert_eq!(
        status.transition(),
        None,
        "a status change is no transition"
    );
    let first_gone = b.write(N1, &[("dave", None, None)]).await;
    assert_eq!(first_gone[0].before_platforms, mask(&[1, 2]));
    assert_eq!(first_gone[0].transition(), None, "still connected on n2");
    let last_gone = b.write("n2", &[("dave", None, None)]).await;
    assert_eq!(last_gone[0].before_platforms, mask(&[2]));
    assert_eq!(last_gone[0].record.platforms, 0);
    assert_eq!(last_gone[0].transition(), Some(false));
}

async fn batches_return_one_change_per_changed_user(f: Factory) {
    let mut b = f.backend().await;
    b.connect("u2", &[1]).await;
    let changed = b
        .write(
            N1,
            &[
                ("u1", Some(entry(&[1])), None),
                ("u2", Some(entry(&[1])), None),
                (
                    "u3",
                    Some(entry(&[4])),
                    Some(chosen(Status::Busy, Some("x"))),
                ),
            ],
        )
        .await;
    let mut users: Vec<&str> = changed.iter().map(|c| c.record.user.as_str()).collect();
    users.sort();
    assert_eq!(users, ["u1", "u3"], "u2 did not change");
    let records = b
        .presence
        .presence(&strings(&["u3", "u1"]))
        .await
        .expect("presence");
    for record in &records {
        let change = changed
            .iter()
            .find(|c| c.record.user == record.user)
            .expect("changed");
        assert_eq!(&change.record, record);
    }
    assert_eq!(records[0].status, Status::Busy);
}

async fn unknown_users_are_offline_at_version_0(f: Factory) {
    let mut b = f.backend().await;
    let known = b.connect("known", &[2]).await.expect("online").record;
    let records = b
        .presence
        .presence(&strings(&["nobody", "known", "ghost"]))
        .await
        .expect("presence");
    assert_eq!(
        records,
        vec![
            PresenceRecord::unknown("nobody"),
            known,
            PresenceRecord::unknown("ghost")
        ],
        "in the order asked"
    );
    assert_eq!(records[0].version, 0);
    assert_eq!(records[0].status, Status::Offline);
    assert_eq!(b.presence.presence(&[]).await.expect("presence"), vec![]);
}

async fn entries_expire_without_renewal(f: Factory) {
    let ttl = Duration::from_millis(300);
    let mut b = f
        .backend_with(BackendSettings {
            node_ttl: Duration::from_secs(30),
            ..short_ttl(ttl)
        })
        .await;
    let on = b.connect("erin", &[1]).await.expect("online");
    sleep_past(ttl).await;
    let record = b.record("erin").await;
    assert_eq!(
        (record.status, record.platforms),
        (Status::Offline, 0),
        "the node (still alive) stopped renewing: {record:?}"
    );
    assert!(record.version >= on.record.version);
}

/// A crashed node's users read offline once their entries expire; the online list and counts
/// drop them when the node is reaped (or a repair step finds the entries expired: counts.rs).
async fn crashed_nodes_users_stop_counting_once_reaped(f: Factory) {
    let ttl = Duration::from_millis(300);
    let mut b = f.backend_with(short_ttl(ttl)).await;
    b.connect("frank", &[1]).await.expect("online");
    assert_eq!(b.all_online(10, None).await, ["frank"]);
    // N1 stops announcing and renewing (it crashed).
    sleep_past(ttl).await;
    assert_eq!(b.record("frank").await.status, Status::Offline);
    let reaped = b.registry.reap_dead_nodes("n2").await.expect("reap");
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert_eq!(b.all_online(10, None).await, Vec::<String>::new());
    assert_eq!(
        b.presence.counts().await.expect("counts"),
        Counts::default()
    );
}

async fn renewal_keeps_entries(f: Factory) {
    let ttl = Duration::from_millis(400);
    let mut b = f.backend_with(short_ttl(ttl)).await;
    let written = tokio::time::Instant::now();
    let on = b.connect("gina", &[1]).await.expect("online");
    tokio::time::sleep(ttl / 2).await;
    let renewed = tokio::time::Instant::now();
    assert_eq!(
        b.renew(N1, &[]).await,
        vec![],
        "renewal changes nothing visible"
    );
    b.announce(N1).await;
    tokio::time::sleep_until(written + ttl + MARGIN).await;
    // Past the first expiry. The embedded backend applies expiry when it sweeps: sweep too.
    let swept = b.registry.reap_dead_nodes("n2").await.expect("reap");
    let record = b.record("gina").await;
    if tokio::time::Instant::now() < renewed + ttl {
        assert_eq!(swept, vec![], "nothing expired");
        assert_eq!(record, on.record, "renewed: still online, same version");
        assert_eq!(b.all_online(10, None).await, ["gina"]);
    }
}

async fn renewal_recreates_lost_entries_and_restores_invisible(f: Factory) {
    let ttl = Duration::from_millis(300);
    let mut b = f
        .backend_with(BackendSettings {
            node_ttl: Duration::from_secs(30),
            ..short_ttl(ttl)
        })
        .await;
    b.watch(vec![
        Topic::Presence("hana".into()),
        Topic::Presence("ian".into()),
    ])
    .await;
    let hidden = b
        .write(
            N1,
            &[
                (
                    "hana",
                    Some(entry(&[1])),
                    Some(chosen(Status::Invisible, None)),
                ),
                ("ian", Some(entry(&[2])), None),
            ],
        )
        .await;
    let before = hidden
        .iter()
        .map(|c| c.record.version)
        .max()
        .expect("two changes");
    b.lose_presence().await;
    assert_eq!(b.record("hana").await.status, Status::Offline, "lost");
    assert_eq!(b.record("ian").await.status, Status::Offline, "lost");
    b.presence_events().await;
    tokio::time::sleep(Duration::from_millis(2)).await;

    let renewed = b
        .renew(N1, &[("hana", chosen(Status::Invisible, None))])
        .await;
    assert_eq!(renewed.len(), 2, "both re-created: {renewed:?}");
    let hana = b.record("hana").await;
    assert_eq!(
        (hana.status, hana.platforms),
        (Status::Invisible, mask(&[1])),
        "an invisible user stays invisible"
    );
    let ian = b.record("ian").await;
    assert_eq!((ian.status, ian.platforms), (Status::Online, mask(&[2])));
    assert!(
        hana.version > before && ian.version > before,
        "versions grow even after data loss"
    );
    assert_eq!(b.all_online(10, None).await, ["ian"]);
    let mut events = b.presence_events().await;
    events.sort_by(|a, c| a.user.cmp(&c.user));
    assert_eq!(events, vec![hana, ian], "renewal publishes what it changed");
}

async fn renewal_restores_the_chosen_status_only_when_lost(f: Factory) {
    let mut b = f.backend().await;
    b.connect("jack", &[1]).await;
    // Chosen before `busy` (through another node, say): renewing it must not undo `busy`.
    let older = chosen(Status::Invisible, None);
    let busy = b
        .set_status("jack", Status::Busy, None)
        .await
        .expect("busy");
    let renewed = b.renew(N1, &[("jack", older)]).await;
    assert_eq!(renewed, vec![], "the record was not lost");
    assert_eq!(b.record("jack").await, busy.record);
}

/// A user on two nodes chose `busy` through one, then `online` (with a text) through the other.
/// After the backend lost the record, each node restores the choice it holds: the newest wins,
/// whichever renews first (chaos found the first renewal winning, with an older `busy`).
async fn renewal_restores_the_newest_choice_whatever_the_order(f: Factory) {
    let ttl = Duration::from_millis(300);
    for first in [N1, "n2"] {
        let mut b = f
            .backend_with(BackendSettings {
                node_ttl: Duration::from_secs(30),
                ..short_ttl(ttl)
            })
            .await;
        b.announce("n2").await;
        let older = chosen(Status::Busy, Some("old"));
        let newer = ChosenStatus {
            at: older.at + 1000,
            ..chosen(Status::Online, Some("new"))
        };
        b.write(N1, &[("kim", Some(entry(&[1])), Some(older.clone()))])
            .await;
        b.write("n2", &[("kim", Some(entry(&[2])), Some(newer.clone()))])
            .await;
        let before = b.record("kim").await;
        assert_eq!(
            (before.status, before.text.as_deref()),
            (Status::Online, Some("new"))
        );
        b.lose_presence().await;
        b.announce("n2").await;
        tokio::time::sleep(Duration::from_millis(2)).await;

        let (second, first_choice, second_choice) = if first == N1 {
            ("n2", &older, &newer)
        } else {
            (N1, &newer, &older)
        };
        b.renew(first, &[("kim", first_choice.clone())]).await;
        b.renew(second, &[("kim", second_choice.clone())]).await;
        let after = b.record("kim").await;
        assert_eq!(
            (after.status, after.platforms, after.text.as_deref()),
            (Status::Online, mask(&[1, 2]), Some("new")),
            "{first} renewed first"
        );
        assert!(after.version > before.version, "versions grow after loss");
        assert_eq!(
            b.renew(N1, &[("kim", older.clone())]).await,
            vec![],
            "{first} renewed first: the older choice stays beaten"
        );
        assert_eq!(b.record("kim").await, after);
    }
}

async fn online_users_page_in_id_order(f: Factory) {
    let mut b = f.backend().await;
    b.announce("n2").await;
    for user in ["u5", "u1", "u4"] {
        b.connect(user, &[1]).await;
    }
    b.write(
        "n2",
        &[
            ("u2", Some(idle(&[2])), None),
            ("u6", Some(entry(&[2])), None),
        ],
    )
    .await;
    b.write(
        N1,
        &[(
            "u3",
            Some(entry(&[1])),
            Some(chosen(Status::Invisible, None)),
        )],
    )
    .await;
    b.connect("u0", &[1]).await;
    b.disconnect("u0").await;
    let visible = strings(&["u1", "u2", "u4", "u5", "u6"]);

    let (page, next) = b
        .presence
        .online_users(None, 2, None)
        .await
        .expect("online");
    assert_eq!(page, ["u1", "u2"]);
    assert_eq!(next.as_deref(), Some("u2"));
    let (page, next) = b
        .presence
        .online_users(Some("u2"), 3, None)
        .await
        .expect("online");
    assert_eq!(page, ["u4", "u5", "u6"], "invisible u3 left out");
    assert_eq!(next, None, "the end, even on a full page");
    for limit in [1, 2, 4, 5, 100] {
        assert_eq!(b.all_online(limit, None).await, visible, "pages of {limit}");
    }
    let (page, next) = b
        .presence
        .online_users(Some("u55"), 10, None)
        .await
        .expect("online");
    assert_eq!(
        (page, next),
        (strings(&["u6"]), None),
        "a cursor between ids"
    );
}

async fn online_users_filter_by_platform(f: Factory) {
    let mut b = f.backend().await;
    b.connect("p1", &[1]).await;
    b.connect("p15", &[1, 5]).await;
    b.connect("p5", &[5]).await;
    b.write(
        N1,
        &[(
            "p5i",
            Some(entry(&[5])),
            Some(chosen(Status::Invisible, None)),
        )],
    )
    .await;
    b.write(N1, &[("p5a", Some(idle(&[5])), None)]).await;
    assert_eq!(b.all_online(1, Some(5)).await, ["p15", "p5", "p5a"]);
    assert_eq!(b.all_online(2, Some(1)).await, ["p1", "p15"]);
    assert_eq!(b.all_online(2, Some(3)).await, Vec::<String>::new());
}

async fn counts_overall_and_per_platform(f: Factory) {
    let mut b = f.backend().await;
    assert_eq!(
        b.presence.counts().await.expect("counts"),
        Counts::default()
    );
    b.announce("n2").await;
    b.connect("a", &[1]).await;
    b.connect("b", &[1, 5]).await;
    b.write(
        "n2",
        &[
            ("b", Some(entry(&[5])), None),
            ("c", Some(idle(&[2])), None),
        ],
    )
    .await;
    b.write(
        N1,
        &[(
            "i",
            Some(entry(&[1])),
            Some(chosen(Status::Invisible, None)),
        )],
    )
    .await;
    b.connect("gone", &[8]).await;
    b.disconnect("gone").await;
    let counts = b.presence.counts().await.expect("counts");
    assert_eq!(
        counts.online_users, 3,
        "a, b and c; not invisible i nor gone"
    );
    assert_eq!(
        counts.by_platform.into_iter().collect::<Vec<_>>(),
        vec![(1, 2), (2, 1), (5, 1)]
    );
}
