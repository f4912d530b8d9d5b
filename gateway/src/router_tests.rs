//! The router's retry policy, and its worker against a message store that fails on demand
//! (on a paused clock): which failures are tried again, with the same dedupe ids, and what the
//! answer says when none got through.

use std::{collections::VecDeque, sync::Mutex};

use async_trait::async_trait;
use shared::{Body, Destination, Message, RouteResult};

use super::*;

fn unavailable() -> BackendError {
    BackendError::unavailable("send", "down")
}

#[test]
fn three_attempts_with_growing_waits() {
    let p = RetryPolicy::new(Duration::from_secs(2));
    let zero = Duration::ZERO;
    assert_eq!(p.next_delay(&unavailable(), 1, zero), Some(BACKOFF[0]));
    assert_eq!(p.next_delay(&unavailable(), 2, zero), Some(BACKOFF[1]));
    assert_eq!(p.next_delay(&unavailable(), 3, zero), None);
    assert_eq!(p.next_delay(&unavailable(), 0, zero), None);
}

#[test]
fn no_retry_past_the_budget_or_of_internal_errors() {
    let p = RetryPolicy::new(Duration::from_secs(2));
    let late = Duration::from_millis(1_960);
    assert_eq!(p.next_delay(&unavailable(), 1, late), None);
    let internal = BackendError::internal("send", "bad reply");
    assert_eq!(p.next_delay(&internal, 1, Duration::ZERO), None);
}

#[test]
fn router_ids_do_not_repeat() {
    let mut ids = RetryIds {
        prefix: "a.0.".into(),
        next: 0,
    };
    let (first, second) = (ids.next(), ids.next());
    assert_ne!(first, second);
    assert!(first.starts_with("a.0."));
}

/// What the fake store does on one attempt.
enum Step {
    Fail(BackendError),
    /// Never answers (a frozen Redis).
    Stall,
}

/// A message store whose first attempts go as scripted, then succeed; it records what each
/// attempt carried.
#[derive(Default)]
struct Scripted {
    steps: Mutex<VecDeque<Step>>,
    attempts: Mutex<Vec<Vec<Outgoing>>>,
}

impl Scripted {
    fn new(steps: Vec<Step>) -> Arc<Self> {
        Arc::new(Scripted {
            steps: Mutex::new(steps.into()),
            attempts: Mutex::default(),
        })
    }

    fn attempts(&self) -> Vec<Vec<Outgoing>> {
        self.attempts.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl MessageStore for Scripted {
    async fn send(
        &self,
        messages: Vec<Outgoing>,
    ) -> Result<Vec<Result<SendOutcome, SendRefused>>, BackendError> {
        if let Ok(mut a) = self.attempts.lock() {
            a.push(messages.clone());
        }
        let step = self.steps.lock().ok().and_then(|mut s| s.pop_front());
        match step {
            Some(Step::Fail(e)) => Err(e),
            Some(Step::Stall) => std::future::pending().await,
            None => Ok(messages
                .iter()
                .enumerate()
                .map(|(i, _)| {
                    Ok(SendOutcome::new(
                        format!("m{i}"),
                        RouteResult::Delivered,
                        1,
                        0,
                    ))
                })
                .collect()),
        }
    }
    async fn offline_messages(&self, _: &str) -> Result<Vec<Message>, BackendError> {
        Ok(Vec::new())
    }
    async fn ack_offline(&self, _: &str, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    async fn history(
        &self,
        _: &str,
        _: Option<&str>,
        _: usize,
    ) -> Result<(Vec<Message>, bool), BackendError> {
        Ok((Vec::new(), false))
    }
    async fn read_position(&self, _: &str, _: &str) -> Result<Option<String>, BackendError> {
        Ok(None)
    }
    async fn set_read_position(&self, _: &str, _: &str, _: &str) -> Result<(), BackendError> {
        Ok(())
    }
    async fn unread(
        &self,
        _: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, BackendError> {
        Ok(Default::default())
    }
}

fn outgoing(dedupe: Option<Dedupe>) -> Outgoing {
    Outgoing {
        from: "system".into(),
        to: Destination::User { user: "bob".into() },
        body: Body::from("hi"),
        sent_at: 1,
        origin: None,
        check_membership: false,
        may_store: true,
        dedupe,
    }
}

/// Routes one message with a client id and one without, as one batch, through a router on
/// `store`, and returns both answers.
async fn route_two(store: Arc<Scripted>) -> (SendResult, SendResult) {
    let quota = StoreQuota {
        messages: 10,
        bytes: 1 << 20,
        window: Duration::from_secs(60),
    };
    let router = Router::spawn(
        1,
        store,
        quota,
        RetryPolicy::new(Duration::from_secs(2)),
        &TaskTracker::new(),
        CancellationToken::new(),
    );
    let (tx1, rx1) = oneshot::channel();
    let (tx2, rx2) = oneshot::channel();
    // Both queue before the worker runs (a paused runtime runs it only when this task waits).
    for (dedupe, tx) in [(Some(Dedupe::Client("c-1".into())), tx1), (None, tx2)] {
        let job = RouteJob {
            out: outgoing(dedupe),
            reply: Reply::Caller(tx),
        };
        assert!(router.route(job).await);
    }
    let first = rx1.await.expect("answered");
    let second = rx2.await.expect("answered");
    (first, second)
}

fn failed_outcome(result: &SendResult) -> Option<Outcome> {
    result.as_ref().err().map(|f| f.outcome)
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_the_same_ids() {
    let store = Scripted::new(vec![Step::Fail(unavailable()), Step::Fail(unavailable())]);
    let (first, second) = route_two(store.clone()).await;
    assert!(matches!(first, Ok(Ok(_))) && matches!(second, Ok(Ok(_))));
    let attempts = store.attempts();
    assert_eq!(attempts.len(), 3);
    let ids: Vec<_> = attempts
        .iter()
        .map(|a| a.iter().map(|o| o.dedupe.clone()).collect::<Vec<_>>())
        .collect();
    assert_eq!(ids[0][0], Some(Dedupe::Client("c-1".into())));
    assert!(
        matches!(ids[0][1], Some(Dedupe::Retry(_))),
        "the router's own"
    );
    assert!(ids.iter().all(|a| *a == ids[0]), "every attempt, same ids");
}

#[tokio::test(start_paused = true)]
async fn a_failure_after_three_attempts_is_an_unknown_outcome() {
    let store = Scripted::new((0..3).map(|_| Step::Fail(unavailable())).collect());
    let (first, second) = route_two(store.clone()).await;
    assert_eq!(store.attempts().len(), 3);
    assert_eq!(failed_outcome(&first), Some(Outcome::Unknown));
    assert_eq!(failed_outcome(&second), Some(Outcome::Unknown));
}

#[tokio::test(start_paused = true)]
async fn failures_before_sending_are_not_sent() {
    let not_sent = || Step::Fail(BackendError::not_sent("send", "circuit open"));
    let store = Scripted::new((0..3).map(|_| not_sent()).collect());
    let (first, _) = route_two(store).await;
    assert_eq!(failed_outcome(&first), Some(Outcome::NotSent));
}

#[tokio::test(start_paused = true)]
async fn a_stalled_attempt_is_cut_at_the_budget_and_unknown() {
    let store = Scripted::new(vec![Step::Stall]);
    let started = tokio::time::Instant::now();
    let (first, _) = route_two(store.clone()).await;
    assert_eq!(failed_outcome(&first), Some(Outcome::Unknown));
    assert_eq!(store.attempts().len(), 1, "no time left to try again");
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "paused clock: exact"
    );
}

#[tokio::test(start_paused = true)]
async fn internal_errors_are_not_retried() {
    let store = Scripted::new(vec![Step::Fail(BackendError::internal(
        "send",
        "bad reply",
    ))]);
    let (first, _) = route_two(store.clone()).await;
    assert_eq!(store.attempts().len(), 1);
    assert_eq!(failed_outcome(&first), Some(Outcome::Unknown));
}
