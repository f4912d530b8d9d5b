//! `WebhookQueue` (backend/webhooks.rs): events are claimed by one node at a time, stay held
//! until acked, are taken over by another node once held too long without a touch (or released),
//! and a full queue refuses new events.

use std::time::Duration;

use bytes::Bytes;
use gateway::backend::{
    ClaimedWebhook, QueuedWebhook, ReclaimCursor, WebhookWrites, WebhookWritten,
};

use super::{Factory, Kind, N1, entry, settings};

contract!(
    events_are_claimed_by_one_node_and_gone_after_ack,
    held_events_are_taken_over_only_after_the_idle_time,
    touched_events_stay_with_their_node,
    released_events_are_taken_over_at_once,
    a_full_queue_refuses_new_events,
    transitions_queue_their_event_in_the_same_write,
);

const FOREVER: Duration = Duration::from_secs(3600);

fn event(n: u32) -> QueuedWebhook {
    QueuedWebhook {
        id: format!("ev-{n}"),
        at: 1_700_000_000_000 + u64::from(n),
        body: Bytes::from(format!(r#"{{"n":{n}}}"#)),
    }
}

fn ids(claimed: &[ClaimedWebhook]) -> Vec<String> {
    let mut ids: Vec<String> = claimed.iter().map(|c| c.event.id.clone()).collect();
    ids.sort();
    ids
}

fn entries(claimed: &[ClaimedWebhook]) -> Vec<String> {
    claimed.iter().map(|c| c.entry.clone()).collect()
}

async fn events_are_claimed_by_one_node_and_gone_after_ack(f: Factory) {
    let b = f.backend().await;
    let peer = b.peer("n2").await;
    let done = b
        .webhooks
        .enqueue(&[event(1), event(2), event(3)], 100)
        .await
        .expect("enqueue");
    assert_eq!((done.added, done.len), (3, 3));

    let first = b.webhooks.claim(N1, 2).await.expect("claim");
    assert_eq!(first.len(), 2);
    let second = peer.webhooks.claim("n2", 10).await.expect("claim");
    assert_eq!(second.len(), 1, "each event goes to one node");
    assert!(b.webhooks.claim(N1, 10).await.expect("claim").is_empty());
    let mut all = first.clone();
    all.extend(second.clone());
    assert_eq!(ids(&all), ["ev-1", "ev-2", "ev-3"]);
    let original = event(2);
    let claimed = all.iter().find(|c| c.event.id == "ev-2").expect("ev-2");
    assert_eq!(claimed.event, original, "id, at and body travel unchanged");

    b.webhooks.ack(&entries(&first)).await.expect("ack");
    peer.webhooks.ack(&entries(&second)).await.expect("ack");
    let (taken, _) = peer
        .webhooks
        .reclaim("n2", &ReclaimCursor::start(), 10, Duration::ZERO)
        .await
        .expect("reclaim");
    assert!(taken.is_empty(), "acked events are gone: {taken:?}");
    let done = b.webhooks.enqueue(&[event(4)], 100).await.expect("enqueue");
    assert_eq!(done.len, 1, "acked events no longer count");
}

async fn held_events_are_taken_over_only_after_the_idle_time(f: Factory) {
    let b = f.backend().await;
    let peer = b.peer("n2").await;
    b.webhooks
        .enqueue(&[event(1), event(2)], 100)
        .await
        .expect("enqueue");
    let held = b.webhooks.claim(N1, 10).await.expect("claim");
    assert_eq!(held.len(), 2);
    let (taken, _) = peer
        .webhooks
        .reclaim("n2", &ReclaimCursor::start(), 10, FOREVER)
        .await
        .expect("reclaim");
    assert!(taken.is_empty(), "held for less than the idle time");

    tokio::time::sleep(Duration::from_millis(300)).await;
    let (taken, _) = peer
        .webhooks
        .reclaim(
            "n2",
            &ReclaimCursor::start(),
            10,
            Duration::from_millis(200),
        )
        .await
        .expect("reclaim");
    assert_eq!(
        ids(&taken),
        ["ev-1", "ev-2"],
        "the same events, ids unchanged"
    );
    let (again, _) = b
        .webhooks
        .reclaim(N1, &ReclaimCursor::start(), 10, Duration::from_millis(200))
        .await
        .expect("reclaim");
    assert!(again.is_empty(), "taking over restarts the idle time");
}

async fn touched_events_stay_with_their_node(f: Factory) {
    let b = f.backend().await;
    let peer = b.peer("n2").await;
    b.webhooks.enqueue(&[event(1)], 100).await.expect("enqueue");
    let held = b.webhooks.claim(N1, 10).await.expect("claim");
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.webhooks.touch(N1, &entries(&held)).await.expect("touch");
    let (taken, _) = peer
        .webhooks
        .reclaim(
            "n2",
            &ReclaimCursor::start(),
            10,
            Duration::from_millis(250),
        )
        .await
        .expect("reclaim");
    assert!(taken.is_empty(), "touched 0 ms ago: {taken:?}");
}

async fn released_events_are_taken_over_at_once(f: Factory) {
    let b = f.backend().await;
    let peer = b.peer("n2").await;
    b.webhooks.enqueue(&[event(1)], 100).await.expect("enqueue");
    let held = b.webhooks.claim(N1, 10).await.expect("claim");
    b.webhooks
        .release(N1, &entries(&held))
        .await
        .expect("release");
    let (taken, _) = peer
        .webhooks
        .reclaim("n2", &ReclaimCursor::start(), 10, FOREVER)
        .await
        .expect("reclaim");
    assert_eq!(ids(&taken), ["ev-1"]);
}

async fn a_full_queue_refuses_new_events(f: Factory) {
    let b = f.backend().await;
    let done = b
        .webhooks
        .enqueue(&[event(1), event(2), event(3)], 2)
        .await
        .expect("enqueue");
    assert_eq!((done.added, done.len), (2, 2));
    let held = b.webhooks.claim(N1, 1).await.expect("claim");
    assert_eq!(
        b.webhooks.queued().await.expect("len"),
        2,
        "waiting and held"
    );
    let done = b.webhooks.enqueue(&[event(4)], 2).await.expect("enqueue");
    assert_eq!((done.added, done.len), (0, 2), "held events count too");
    b.webhooks.ack(&entries(&held)).await.expect("ack");
    let done = b.webhooks.enqueue(&[event(5)], 2).await.expect("enqueue");
    assert_eq!((done.added, done.len), (1, 2));
    let rest = b.webhooks.claim(N1, 10).await.expect("claim");
    assert_eq!(
        ids(&rest),
        ["ev-2", "ev-5"],
        "the oldest kept, the newest refused"
    );
}

/// With webhooks on, one Redis queues a transition's event in the write that makes it: a node
/// SIGKILLed right after the write (before any outbox of its own ran) loses nothing. The embedded
/// backend leaves it to the caller (one process: nothing survives its death anyway).
async fn transitions_queue_their_event_in_the_same_write(f: Factory) {
    let mut b = f
        .backend_with(gateway::backend::BackendSettings {
            webhooks: Some(WebhookWrites {
                node: "reporter".into(),
                queue_max: 2,
            }),
            ..settings()
        })
        .await;
    let online = b.connect("wu", &[1, 3]).await.expect("online");
    let status = b
        .write(
            N1,
            &[(
                "wu",
                Some(entry(&[1, 3])),
                Some(super::chosen(shared::Status::Busy, None)),
            )],
        )
        .await;
    let offline = b.disconnect("wu").await.expect("offline");
    let again = b.connect("wu", &[2]).await.expect("online again");
    let queued = b.webhooks.claim(N1, 10).await.expect("claim");
    if f.kind() == Kind::Memory {
        assert_eq!(online.webhook, WebhookWritten::NotQueued);
        assert!(queued.is_empty(), "the caller queues them: {queued:?}");
        return;
    }
    assert_eq!(
        (online.webhook, offline.webhook, again.webhook),
        (
            WebhookWritten::Queued,
            WebhookWritten::Queued,
            WebhookWritten::Refused
        ),
        "two queued, the third refused at the bound"
    );
    assert!(
        status
            .iter()
            .all(|c| c.webhook == WebhookWritten::NotQueued),
        "a status change is no transition: {status:?}"
    );
    assert_eq!(queued.len(), 2);
    let bodies: Vec<serde_json::Value> = queued
        .iter()
        .map(|c| serde_json::from_slice(&c.event.body).expect("JSON body"))
        .collect();
    for (claimed, body) in queued.iter().zip(&bodies) {
        let id = &claimed.event.id;
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "event id {id}"
        );
        assert_eq!(body["id"], serde_json::json!(id), "the body carries the id");
        assert_eq!(body["at"], serde_json::json!(claimed.event.at));
        assert_eq!(body["user"], "wu");
        assert_eq!(body["node"], "reporter", "the reporting node");
    }
    assert_eq!(bodies[0]["event"], "user.online");
    assert_eq!(bodies[0]["platforms"], serde_json::json!([1, 3]));
    assert_eq!(bodies[1]["event"], "user.offline");
    assert_eq!(
        bodies[1]["platforms"],
        serde_json::json!([1, 3]),
        "the platforms the user left"
    );
    assert_ne!(queued[0].event.id, queued[1].event.id);
}
