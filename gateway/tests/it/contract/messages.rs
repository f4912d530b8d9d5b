//! `MessageStore` (backend/messages.rs): private messages go live to a watched inbox or are stored
//! (capped) until acknowledged; group sends check membership when asked and land in a history
//! capped by count and age, paged with `since`/`limit`; read positions only move forward and never
//! past the group's last message; unread
//! counts; message ids sort in send order per destination; `connect_state`.

use std::time::Duration;

use gateway::backend::{
    BackendEvent, BackendSettings, Dedupe, MessageSettings, Outgoing, SendOutcome, SendRefused,
    Topic, parse_msg_id,
};
use shared::{Destination, Message, RouteResult};

use super::{Factory, Under, private, settings, sleep_past, to_group};

contract!(
    private_to_a_watched_inbox_is_delivered_live,
    private_to_an_unwatched_inbox_is_stored,
    offline_storage_is_capped_per_user,
    ack_offline_drops_up_to_and_including,
    group_sends_check_membership_when_asked,
    group_results_follow_members_and_listeners,
    history_pages_with_since_and_limit,
    history_is_capped_by_count,
    history_drops_messages_past_its_age,
    read_positions_only_move_forward,
    reads_beyond_the_last_message_clamp_to_it,
    reads_in_a_group_without_messages_set_nothing,
    unread_counts_follow_read_positions,
    msg_ids_sort_in_send_order,
    connect_state_has_groups_and_stored_messages,
    a_repeated_client_id_to_a_user_is_sent_once,
    a_repeated_client_id_to_a_group_is_sent_once,
    a_repeated_client_id_to_everyone_is_sent_once,
    client_ids_are_per_sender_and_destination,
    a_refused_send_is_not_remembered,
    client_ids_are_forgotten_after_the_window,
);

fn with_messages(messages: MessageSettings) -> BackendSettings {
    BackendSettings {
        messages,
        ..settings()
    }
}

async fn send_ok(b: &Under, messages: Vec<Outgoing>) -> Vec<SendOutcome> {
    b.messages
        .send(messages)
        .await
        .expect("send")
        .into_iter()
        .map(|r| r.expect("not refused"))
        .collect()
}

async fn send_one(b: &Under, message: Outgoing) -> SendOutcome {
    send_ok(b, vec![message]).await.remove(0)
}

/// What a recipient sees of a sent message.
fn as_sent(out: &Outgoing, msg_id: &str, offline: Option<bool>) -> Message {
    Message {
        msg_id: msg_id.to_string(),
        from: out.from.clone(),
        to: out.to.clone(),
        body: out.body.clone(),
        sent_at: out.sent_at,
        offline,
    }
}

fn ids(messages: &[Message]) -> Vec<&str> {
    messages.iter().map(|m| m.msg_id.as_str()).collect()
}

async fn offline(b: &Under, user: &str) -> Vec<Message> {
    b.messages.offline_messages(user).await.expect("offline")
}

async fn history(
    b: &Under,
    group: &str,
    since: Option<&str>,
    limit: usize,
) -> (Vec<Message>, bool) {
    b.messages
        .history(group, since, limit)
        .await
        .expect("history")
}

async fn private_to_a_watched_inbox_is_delivered_live(f: Factory) {
    let mut b = f.backend().await;
    b.watch(vec![Topic::Inbox("bob".into())]).await;
    let out = private("alice", "bob", "hello");
    let outcome = send_one(&b, out.clone()).await;
    assert_eq!(
        (outcome.result, outcome.delivered, outcome.stored),
        (RouteResult::Delivered, 1, 0)
    );
    assert_eq!(offline(&b, "bob").await, vec![], "nothing stored");
    let events = b.sync().await;
    let [gateway::backend::BackendEvent::Message(d)] = &events[..] else {
        panic!("one delivery: {events:?}");
    };
    assert_eq!(d.message, as_sent(&out, &outcome.msg_id, None));
}

async fn private_to_an_unwatched_inbox_is_stored(f: Factory) {
    let mut b = f.backend().await;
    let first = private("alice", "carol", "one");
    let second = private("dave", "carol", "two");
    let outcomes = send_ok(&b, vec![first.clone(), second.clone()]).await;
    for outcome in &outcomes {
        assert_eq!(
            (outcome.result, outcome.delivered, outcome.stored),
            (RouteResult::Stored, 0, 1)
        );
    }
    assert_eq!(
        offline(&b, "carol").await,
        vec![
            as_sent(&first, &outcomes[0].msg_id, Some(true)),
            as_sent(&second, &outcomes[1].msg_id, Some(true)),
        ],
        "oldest first, marked offline"
    );
    assert_eq!(b.sync().await.len(), 0, "nobody heard it");
    assert_eq!(
        offline(&b, "alice").await,
        vec![],
        "the sender stores nothing"
    );
}

async fn offline_storage_is_capped_per_user(f: Factory) {
    let b = f
        .backend_with(with_messages(MessageSettings {
            offline_cap: 3,
            ..settings().messages
        }))
        .await;
    let sent: Vec<Outgoing> = (0..5)
        .map(|i| private("a", "capped", &format!("m{i}")))
        .collect();
    let outcomes = send_ok(&b, sent.clone()).await;
    let kept = offline(&b, "capped").await;
    assert_eq!(
        kept,
        (2..5)
            .map(|i| as_sent(&sent[i], &outcomes[i].msg_id, Some(true)))
            .collect::<Vec<_>>(),
        "the newest 3"
    );
    send_one(&b, private("a", "other", "x")).await;
    assert_eq!(offline(&b, "other").await.len(), 1, "capped per user");
}

async fn ack_offline_drops_up_to_and_including(f: Factory) {
    let b = f.backend().await;
    let mut outcomes = Vec::new();
    for i in 0..4 {
        outcomes.push(send_one(&b, private("a", "acker", &format!("m{i}"))).await);
    }
    let all: Vec<String> = outcomes.iter().map(|o| o.msg_id.clone()).collect();
    b.messages.ack_offline("acker", &all[1]).await.expect("ack");
    assert_eq!(ids(&offline(&b, "acker").await), [&all[2], &all[3]]);
    b.messages
        .ack_offline("acker", &all[1])
        .await
        .expect("ack again");
    assert_eq!(ids(&offline(&b, "acker").await).len(), 2, "nothing more");
    b.messages
        .ack_offline("acker", &all[3])
        .await
        .expect("ack all");
    assert_eq!(offline(&b, "acker").await, vec![]);
    let later = send_one(&b, private("a", "acker", "later")).await;
    assert_eq!(ids(&offline(&b, "acker").await), [later.msg_id.as_str()]);
}

async fn group_sends_check_membership_when_asked(f: Factory) {
    let b = f.backend().await;
    b.groups.add_member("club", "member").await.expect("add");
    b.groups.add_member("club", "other").await.expect("add");
    let results = b
        .messages
        .send(vec![
            to_group("stranger", "club", "let me in", true),
            to_group("member", "club", "hi", true),
            to_group("stranger", "club", "from the app backend", false),
        ])
        .await
        .expect("send");
    assert_eq!(results[0], Err(SendRefused::NotMember));
    let member = results[1].clone().expect("a member may send");
    let app = results[2]
        .clone()
        .expect("the app backend may send anywhere");
    let (kept, more) = history(&b, "club", None, 10).await;
    assert_eq!(
        ids(&kept),
        [member.msg_id.as_str(), app.msg_id.as_str()],
        "the refused one is not kept"
    );
    assert!(!more);
}

async fn group_results_follow_members_and_listeners(f: Factory) {
    let mut b = f.backend().await;
    b.groups.add_member("solo", "me").await.expect("add");
    let alone = send_one(&b, to_group("me", "solo", "anyone?", true)).await;
    assert_eq!(alone.result, RouteResult::NoRecipients, "only the sender");
    assert_eq!(
        history(&b, "solo", None, 10).await.0.len(),
        1,
        "kept anyway"
    );

    b.groups.add_member("pair", "me").await.expect("add");
    b.groups.add_member("pair", "you").await.expect("add");
    let unheard = send_one(&b, to_group("me", "pair", "hello?", true)).await;
    assert_eq!(
        (unheard.result, unheard.delivered, unheard.stored),
        (RouteResult::Stored, 0, 0),
        "nobody listens: in history only"
    );
    b.watch(vec![Topic::Group("pair".into())]).await;
    let heard = send_one(&b, to_group("me", "pair", "hello!", true)).await;
    assert_eq!(
        (heard.result, heard.delivered, heard.stored),
        (RouteResult::Delivered, 1, 0),
        "published to the one listening node"
    );
}

async fn history_pages_with_since_and_limit(f: Factory) {
    let b = f.backend().await;
    let sent: Vec<Outgoing> = (0..5)
        .map(|i| to_group("app", "hist", &format!("m{i}"), false))
        .collect();
    let outcomes = send_ok(&b, sent.clone()).await;
    let all: Vec<&str> = outcomes.iter().map(|o| o.msg_id.as_str()).collect();

    let (page, more) = history(&b, "hist", None, 2).await;
    assert_eq!(
        page,
        vec![
            as_sent(&sent[0], all[0], None),
            as_sent(&sent[1], all[1], None)
        ],
        "oldest first"
    );
    assert!(more);
    let (page, more) = history(&b, "hist", Some(all[1]), 2).await;
    assert_eq!((ids(&page), more), (vec![all[2], all[3]], true));
    let (page, more) = history(&b, "hist", Some(all[3]), 2).await;
    assert_eq!((ids(&page), more), (vec![all[4]], false));
    let (page, more) = history(&b, "hist", Some(all[2]), 2).await;
    assert_eq!(
        (ids(&page), more),
        (vec![all[3], all[4]], false),
        "exactly the rest"
    );
    let (page, more) = history(&b, "hist", Some(all[4]), 2).await;
    assert_eq!((page, more), (vec![], false));
    let (page, more) = history(&b, "hist", None, 100).await;
    assert_eq!((ids(&page), more), (all.clone(), false));
    assert_eq!(history(&b, "unknown", None, 10).await, (vec![], false));
}

async fn history_is_capped_by_count(f: Factory) {
    let b = f
        .backend_with(with_messages(MessageSettings {
            history_cap: 3,
            ..settings().messages
        }))
        .await;
    b.groups.add_member("capped", "reader").await.expect("add");
    let outcomes = send_ok(
        &b,
        (0..5)
            .map(|i| to_group("app", "capped", &format!("m{i}"), false))
            .collect(),
    )
    .await;
    let all: Vec<&str> = outcomes.iter().map(|o| o.msg_id.as_str()).collect();
    let (kept, more) = history(&b, "capped", None, 10).await;
    assert_eq!(
        (ids(&kept), more),
        (all[2..].to_vec(), false),
        "the newest 3"
    );
    let unread = b.messages.unread("reader").await.expect("unread");
    assert_eq!(unread.get("capped"), Some(&3), "no more than is kept");
}

async fn history_drops_messages_past_its_age(f: Factory) {
    let age = Duration::from_millis(200);
    let b = f
        .backend_with(with_messages(MessageSettings {
            history_age: age,
            ..settings().messages
        }))
        .await;
    let old = send_one(&b, to_group("app", "aging", "old", false)).await;
    assert_eq!(
        ids(&history(&b, "aging", None, 10).await.0),
        [old.msg_id.as_str()]
    );
    sleep_past(age).await;
    let new = send_one(&b, to_group("app", "aging", "new", false)).await;
    let (kept, more) = history(&b, "aging", None, 10).await;
    assert_eq!((ids(&kept), more), (vec![new.msg_id.as_str()], false));
}

async fn read_positions_only_move_forward(f: Factory) {
    let b = f.backend().await;
    let outcomes = send_ok(
        &b,
        (0..3)
            .map(|i| to_group("app", "rp", &format!("m{i}"), false))
            .collect(),
    )
    .await;
    let all: Vec<&str> = outcomes.iter().map(|o| o.msg_id.as_str()).collect();
    let position = |group: &'static str| {
        let b = &b;
        async move {
            b.messages
                .read_position("reader", group)
                .await
                .expect("read_position")
        }
    };
    assert_eq!(position("rp").await, None);
    b.messages
        .set_read_position("reader", "rp", all[1])
        .await
        .expect("set");
    assert_eq!(position("rp").await.as_deref(), Some(all[1]));
    b.messages
        .set_read_position("reader", "rp", all[0])
        .await
        .expect("set");
    assert_eq!(position("rp").await.as_deref(), Some(all[1]), "never back");
    b.messages
        .set_read_position("reader", "rp", all[2])
        .await
        .expect("set");
    assert_eq!(position("rp").await.as_deref(), Some(all[2]));
    assert_eq!(position("other").await, None, "per group");
}

async fn reads_beyond_the_last_message_clamp_to_it(f: Factory) {
    let b = f.backend().await;
    b.groups.add_member("ahead", "reader").await.expect("add");
    let sent = send_ok(
        &b,
        (0..2)
            .map(|i| to_group("app", "ahead", &format!("m{i}"), false))
            .collect(),
    )
    .await;
    let (last_ms, last_seq) = parse_msg_id(&sent[1].msg_id).expect("msg_id");
    let set = |up_to: String| {
        let b = &b;
        async move {
            b.messages
                .set_read_position("reader", "ahead", &up_to)
                .await
                .expect("set");
            b.messages
                .read_position("reader", "ahead")
                .await
                .expect("read_position")
        }
    };
    // Later in time, in sequence, or both: all clamp to the last message.
    for up_to in [
        format!("{}-{last_seq}", last_ms + 86_400_000),
        format!("{last_ms}-{}", last_seq + 1),
        "18446744073709551615-18446744073709551615".to_string(),
    ] {
        assert_eq!(
            set(up_to.clone()).await,
            Some(sent[1].msg_id.clone()),
            "{up_to}"
        );
    }
    let unread = b.messages.unread("reader").await.expect("unread");
    assert_eq!(unread.get("ahead"), Some(&0));
    // The next message is after the position: unread, and in `since` order too.
    let next = send_one(&b, to_group("app", "ahead", "m2", false)).await;
    let unread = b.messages.unread("reader").await.expect("unread");
    assert_eq!(unread.get("ahead"), Some(&1));
    let position = b
        .messages
        .read_position("reader", "ahead")
        .await
        .expect("read_position");
    let (after, _) = history(&b, "ahead", position.as_deref(), 10).await;
    assert_eq!(ids(&after), [next.msg_id.as_str()]);
}

async fn reads_in_a_group_without_messages_set_nothing(f: Factory) {
    let b = f.backend().await;
    b.groups.add_member("quiet", "reader").await.expect("add");
    b.messages
        .set_read_position("reader", "quiet", "9999999999999-0000000001")
        .await
        .expect("set");
    let position = b
        .messages
        .read_position("reader", "quiet")
        .await
        .expect("read_position");
    assert_eq!(position, None);
    let first = send_one(&b, to_group("app", "quiet", "m0", false)).await;
    let unread = b.messages.unread("reader").await.expect("unread");
    assert_eq!(unread.get("quiet"), Some(&1), "{} is unread", first.msg_id);
}

async fn unread_counts_follow_read_positions(f: Factory) {
    let b = f.backend().await;
    for group in ["g3", "g1", "g0"] {
        b.groups.add_member(group, "reader").await.expect("add");
    }
    let g3 = send_ok(
        &b,
        (0..3)
            .map(|i| to_group("app", "g3", &format!("m{i}"), false))
            .collect(),
    )
    .await;
    send_one(&b, to_group("app", "g1", "m", false)).await;
    send_one(&b, to_group("app", "not-mine", "m", false)).await;
    let unread = b.messages.unread("reader").await.expect("unread");
    assert_eq!(
        unread.into_iter().collect::<Vec<_>>(),
        vec![("g0".into(), 0), ("g1".into(), 1), ("g3".into(), 3)],
        "per group of the user"
    );
    b.messages
        .set_read_position("reader", "g3", &g3[1].msg_id)
        .await
        .expect("set");
    let unread = b.messages.unread("reader").await.expect("unread");
    assert_eq!(unread.get("g3"), Some(&1));
    b.messages
        .set_read_position("reader", "g3", &g3[2].msg_id)
        .await
        .expect("set");
    let unread = b.messages.unread("reader").await.expect("unread");
    assert_eq!(unread.get("g3"), Some(&0));
    assert_eq!(b.messages.unread("nobody").await.expect("unread").len(), 0);
}

async fn msg_ids_sort_in_send_order(f: Factory) {
    let b = f.backend().await;
    let mut group_ids = Vec::new();
    let mut private_ids = Vec::new();
    for round in 0..3 {
        let outcomes = send_ok(
            &b,
            vec![
                to_group("app", "order", &format!("g{round}a"), false),
                private("a", "ordered", &format!("p{round}a")),
                to_group("app", "order", &format!("g{round}b"), false),
                private("b", "ordered", &format!("p{round}b")),
            ],
        )
        .await;
        group_ids.extend([outcomes[0].msg_id.clone(), outcomes[2].msg_id.clone()]);
        private_ids.extend([outcomes[1].msg_id.clone(), outcomes[3].msg_id.clone()]);
    }
    for ids in [&group_ids, &private_ids] {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids grow: {ids:?}");
        assert!(ids.iter().all(|id| parse_msg_id(id).is_some()), "{ids:?}");
    }
    let (kept, _) = history(&b, "order", None, 100).await;
    let bodies: Vec<String> = kept.iter().map(|m| m.body.to_string()).collect();
    assert_eq!(
        bodies,
        [
            "\"g0a\"", "\"g0b\"", "\"g1a\"", "\"g1b\"", "\"g2a\"", "\"g2b\""
        ],
        "history in send order"
    );
    let stored: Vec<String> = offline(&b, "ordered")
        .await
        .into_iter()
        .map(|m| m.msg_id)
        .collect();
    assert_eq!(stored, private_ids, "stored in send order");
}

async fn connect_state_has_groups_and_stored_messages(f: Factory) {
    let b = f.backend().await;
    b.groups
        .add_member("b-group", "newcomer")
        .await
        .expect("add");
    b.groups
        .add_member("a-group", "newcomer")
        .await
        .expect("add");
    let out = private("friend", "newcomer", "welcome");
    let sent = send_one(&b, out.clone()).await;
    let state = b.sessions.connect_state("newcomer").await;
    let mut groups = state.groups.expect("groups");
    groups.sort();
    assert_eq!(groups, ["a-group", "b-group"]);
    assert_eq!(
        state.offline.expect("offline"),
        vec![as_sent(&out, &sent.msg_id, Some(true))]
    );
    let empty = b.sessions.connect_state("stranger").await;
    assert_eq!(empty.groups.expect("groups"), Vec::<String>::new());
    assert_eq!(empty.offline.expect("offline"), vec![]);
}

/// `out` carrying the sender's `client_msg_id`.
fn with_id(out: Outgoing, id: &str) -> Outgoing {
    Outgoing {
        dedupe: Some(Dedupe::Client(id.into())),
        ..out
    }
}

fn messages_of(events: &[BackendEvent]) -> Vec<&str> {
    events
        .iter()
        .filter_map(|e| match e {
            BackendEvent::Message(d) => Some(d.message.msg_id.as_str()),
            _ => None,
        })
        .collect()
}

async fn a_repeated_client_id_to_a_user_is_sent_once(f: Factory) {
    let mut b = f.backend().await;
    let out = with_id(private("alice", "bob", "once"), "c-1");
    let first = send_one(&b, out.clone()).await;
    assert!(!first.duplicate);
    // The retry may come through another node, in a batch of its own or with others.
    let peer = b.peer("n2").await;
    let again = peer
        .messages
        .send(vec![out.clone(), out.clone()])
        .await
        .expect("send");
    for repeat in again {
        let repeat = repeat.expect("not refused");
        assert!(repeat.duplicate);
        assert_eq!(
            SendOutcome {
                duplicate: false,
                ..repeat
            },
            first,
            "the first one's outcome"
        );
    }
    assert_eq!(ids(&offline(&b, "bob").await), [first.msg_id.as_str()]);

    b.watch(vec![Topic::Inbox("carol".into())]).await;
    let live = with_id(private("alice", "carol", "live"), "c-1");
    let sent = send_ok(&b, vec![live.clone(), live.clone()]).await;
    assert_eq!(sent[0].msg_id, sent[1].msg_id);
    assert_eq!((sent[0].duplicate, sent[1].duplicate), (false, true));
    assert_eq!(messages_of(&b.sync().await), [sent[0].msg_id.as_str()]);
}

async fn a_repeated_client_id_to_a_group_is_sent_once(f: Factory) {
    let mut b = f.backend().await;
    b.groups.add_member("team", "alice").await.expect("add");
    b.groups.add_member("team", "bob").await.expect("add");
    b.watch(vec![Topic::Group("team".into())]).await;
    let out = with_id(to_group("alice", "team", "once", true), "c-1");
    let first = send_one(&b, out.clone()).await;
    let repeat = send_one(&b, out).await;
    assert_eq!(
        (repeat.msg_id.as_str(), repeat.result, repeat.duplicate),
        (first.msg_id.as_str(), first.result, true)
    );
    assert_eq!(
        ids(&history(&b, "team", None, 10).await.0),
        [first.msg_id.as_str()]
    );
    assert_eq!(messages_of(&b.sync().await), [first.msg_id.as_str()]);
}

async fn a_repeated_client_id_to_everyone_is_sent_once(f: Factory) {
    let mut b = f.backend().await;
    let all = Outgoing {
        to: Destination::All { all: true },
        ..private("system", "nobody", "maintenance")
    };
    let out = with_id(all, "c-1");
    let first = send_one(&b, out.clone()).await;
    let repeat = send_one(&b, out).await;
    assert_eq!(
        (repeat.msg_id.as_str(), repeat.duplicate),
        (first.msg_id.as_str(), true)
    );
    assert_eq!(messages_of(&b.sync().await), [first.msg_id.as_str()]);
}

async fn client_ids_are_per_sender_and_destination(f: Factory) {
    let b = f.backend().await;
    let sent = send_ok(
        &b,
        vec![
            with_id(private("alice", "bob", "1"), "c-1"),
            with_id(private("alice", "bob", "2"), "c-2"),
            // User ids may hold ':', and a client_msg_id anything: no pair may stand for another.
            with_id(private("alice:c", "bob", "3"), "1"),
            with_id(private("dave", "bob", "4"), "c-1"),
            with_id(private("alice", "carol", "5"), "c-1"),
            with_id(to_group("alice", "bob", "6", false), "c-1"),
            private("alice", "bob", "7"),
            private("alice", "bob", "8"),
        ],
    )
    .await;
    for outcome in &sent {
        assert!(!outcome.duplicate, "{outcome:?}");
    }
    assert_eq!(offline(&b, "bob").await.len(), 6, "every one stored");
}

async fn a_refused_send_is_not_remembered(f: Factory) {
    let b = f.backend().await;
    let out = with_id(to_group("late", "club", "hi", true), "c-1");
    let refused = b.messages.send(vec![out.clone()]).await.expect("send");
    assert_eq!(refused, vec![Err(SendRefused::NotMember)]);
    b.groups.add_member("club", "late").await.expect("add");
    let sent = send_one(&b, out).await;
    assert!(!sent.duplicate, "the retry goes out once allowed");
    assert_eq!(history(&b, "club", None, 10).await.0.len(), 1);
}

async fn client_ids_are_forgotten_after_the_window(f: Factory) {
    let window = Duration::from_millis(300);
    let b = f
        .backend_with(with_messages(MessageSettings {
            dedupe_window: window,
            ..settings().messages
        }))
        .await;
    let out = with_id(private("alice", "bob", "again"), "c-1");
    let first = send_one(&b, out.clone()).await;
    sleep_past(window).await;
    let later = send_one(&b, out).await;
    assert!(!later.duplicate);
    assert_ne!(later.msg_id, first.msg_id, "sent again");
    assert_eq!(offline(&b, "bob").await.len(), 2);
}
