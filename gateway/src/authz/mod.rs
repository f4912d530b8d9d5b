//! The authorization hook (`PRESENCE_AUTH_HOOK_URL`): before a client's `join` and `subscribe`, the
//! gateway asks the app backend with one signed `POST` and obeys the answer. One job: ask, read the
//! answer, keep it for `PRESENCE_AUTH_HOOK_CACHE_SECS`. It fails closed: a non-2xx status, an answer
//! it cannot read, no answer within `PRESENCE_AUTH_HOOK_TIMEOUT_MS` are all refusals.
//!
//! Callers run [`AuthzHook::check`] inside a request's own task (`conn/requests.rs`), never in a
//! session's read loop.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::{hooks::signature, metrics as m};

/// Calls to the hook in flight at once, node-wide; more wait for a slot (within their timeout),
/// so a slow hook meets a bounded number of requests from this node.
const MAX_CONCURRENT_CALLS: usize = 256;
/// Largest answer read: an allow list of 1,000 ids of 128 bytes, with room to spare.
const MAX_ANSWER_BYTES: usize = 256 * 1024;
/// What the cache may hold, in (approximate) bytes and in entries.
const CACHE_MAX_BYTES: usize = 16 << 20;
const CACHE_MAX_ENTRIES: usize = 100_000;

/// What the gateway asks the hook; serialized as the request body.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Ask<'a> {
    Join {
        user: &'a str,
        platform: u8,
        group: &'a str,
    },
    Subscribe {
        user: &'a str,
        platform: u8,
        /// Distinct users, in the order the client named them.
        users: &'a [String],
    },
}

/// The hook's decision on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything asked is allowed.
    Allow,
    /// `subscribe` only: these of the users asked about, and no others (possibly none).
    Only(Arc<HashSet<String>>),
    /// Refused, and why.
    Deny(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The hook answered no (`{"allow": false}`).
    Denied,
    /// The hook could not be asked, answered a non-2xx status, or answered something else.
    Failed,
    /// No answer within the timeout.
    TimedOut,
}

impl Refusal {
    /// The `forbidden` error's message.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Denied => "not allowed by the app",
            Refusal::Failed => "the app's authorization check failed",
            Refusal::TimedOut => "the app's authorization check did not answer in time",
        }
    }
}

/// The answer's shape: `{"allow": true | false | [users]}`; other fields are ignored.
#[derive(Deserialize)]
struct Answer {
    allow: AllowField,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AllowField {
    Flag(bool),
    Users(Vec<String>),
}

/// Asks the app backend; shared by every connection of the node.
pub struct AuthzHook {
    client: reqwest::Client,
    url: String,
    secret: Box<[u8]>,
    timeout: Duration,
    in_flight: Semaphore,
    /// `None` when answers are not cached (`PRESENCE_AUTH_HOOK_CACHE_SECS=0`).
    cache: Option<Mutex<Cache>>,
}

impl AuthzHook {
    /// A hook at `url` whose requests are signed with `secret`; answers are kept for `cache_ttl`
    /// (zero: not kept).
    pub fn new(
        url: String,
        secret: &[u8],
        timeout: Duration,
        cache_ttl: Duration,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()?;
        Ok(AuthzHook {
            client,
            url,
            secret: secret.into(),
            timeout,
            in_flight: Semaphore::new(MAX_CONCURRENT_CALLS),
            cache: (!cache_ttl.is_zero()).then(|| Mutex::new(Cache::new(cache_ttl))),
        })
    }

    /// The decision on `ask`: from the cache, else from one call to the hook.
    pub async fn check(&self, ask: &Ask<'_>) -> Verdict {
        let key = self.cache.as_ref().map(|_| cache_key(ask));
        if let (Some(cache), Some(key)) = (&self.cache, &key)
            && let Some(verdict) = lock(cache).get(key, Instant::now())
        {
            metrics::counter!(m::AUTH_HOOK_CACHE_HITS).increment(1);
            return verdict;
        }
        let started = Instant::now();
        let verdict = match tokio::time::timeout(self.timeout, self.call(ask)).await {
            Ok(verdict) => verdict,
            Err(_) => Verdict::Deny(Refusal::TimedOut),
        };
        metrics::histogram!(m::AUTH_HOOK_SECONDS).record(started.elapsed().as_secs_f64());
        let result = match &verdict {
            Verdict::Allow => "allow",
            Verdict::Only(_) => "partial",
            Verdict::Deny(Refusal::Denied) => "deny",
            Verdict::Deny(Refusal::Failed) => "error",
            Verdict::Deny(Refusal::TimedOut) => "timeout",
        };
        metrics::counter!(m::AUTH_HOOK_CALLS, "result" => result).increment(1);
        // Answers are kept, refusals included; failures are not, so a recovered hook is asked again.
        let answered = !matches!(verdict, Verdict::Deny(Refusal::Failed | Refusal::TimedOut));
        if answered && let (Some(cache), Some(key)) = (&self.cache, key) {
            lock(cache).insert(key, verdict.clone(), Instant::now());
        }
        verdict
    }

    /// One signed POST and its answer (the caller bounds the time).
    async fn call(&self, ask: &Ask<'_>) -> Verdict {
        let Ok(_slot) = self.in_flight.acquire().await else {
            return Verdict::Deny(Refusal::Failed);
        };
        let body = match serde_json::to_vec(ask) {
            Ok(body) => body,
            Err(_) => return Verdict::Deny(Refusal::Failed),
        };
        let sent = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-presence-signature", signature(&self.secret, &body))
            .body(body)
            .send()
            .await;
        let mut response = match sent {
            Ok(response) if response.status().is_success() => response,
            Ok(response) => {
                tracing::debug!(status = %response.status(), "authorization hook refused");
                return Verdict::Deny(Refusal::Failed);
            }
            Err(e) => return failure(e),
        };
        let mut answer = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) if answer.len() + chunk.len() <= MAX_ANSWER_BYTES => {
                    answer.extend_from_slice(&chunk)
                }
                Ok(Some(_)) => {
                    tracing::debug!("authorization hook answer too large");
                    return Verdict::Deny(Refusal::Failed);
                }
                Ok(None) => break,
                Err(e) => return failure(e),
            }
        }
        verdict_of(ask, &answer)
    }
}

fn failure(e: reqwest::Error) -> Verdict {
    if e.is_timeout() {
        return Verdict::Deny(Refusal::TimedOut);
    }
    tracing::debug!(error = %e, "authorization hook unreachable");
    Verdict::Deny(Refusal::Failed)
}

/// Reads an answer body: `{"allow": true}` allows; `{"allow": false}` refuses; `{"allow": [users]}`
/// allows those of a `subscribe`'s users; anything else is a failure.
fn verdict_of(ask: &Ask<'_>, body: &[u8]) -> Verdict {
    let allow = match serde_json::from_slice::<Answer>(body) {
        Ok(answer) => answer.allow,
        Err(e) => {
            tracing::debug!(error = %e, "authorization hook answer unreadable");
            return Verdict::Deny(Refusal::Failed);
        }
    };
    match (allow, ask) {
        (AllowField::Flag(true), _) => Verdict::Allow,
        (AllowField::Flag(false), _) => Verdict::Deny(Refusal::Denied),
        (AllowField::Users(listed), Ask::Subscribe { users, .. }) => {
            let listed: HashSet<&str> = listed.iter().map(String::as_str).collect();
            let allowed: HashSet<String> = users
                .iter()
                .filter(|u| listed.contains(u.as_str()))
                .cloned()
                .collect();
            if allowed.len() == users.len() {
                Verdict::Allow
            } else {
                Verdict::Only(Arc::new(allowed))
            }
        }
        (AllowField::Users(_), Ask::Join { .. }) => {
            tracing::debug!("authorization hook answered a list to a join");
            Verdict::Deny(Refusal::Failed)
        }
    }
}

fn lock(cache: &Mutex<Cache>) -> std::sync::MutexGuard<'_, Cache> {
    // The cache holds no invariant a panic elsewhere could break half-way that matters more than
    // availability: a poisoned lock is used as is.
    cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

type Key = [u8; 32];

/// The exact request, as a SHA-256 digest (a subscribe's users sorted, so their order does not
/// matter): 32 bytes per entry however many users a subscribe names, and no two requests share a
/// key in practice, which an authorization cache must guarantee.
fn cache_key(ask: &Ask<'_>) -> Key {
    let mut hash = Sha256::new();
    // Ids never contain NUL, so it separates fields unambiguously.
    match ask {
        Ask::Join {
            user,
            platform,
            group,
        } => {
            hash.update(b"join\0");
            hash.update(user.as_bytes());
            hash.update([0, *platform, 0]);
            hash.update(group.as_bytes());
        }
        Ask::Subscribe {
            user,
            platform,
            users,
        } => {
            hash.update(b"subscribe\0");
            hash.update(user.as_bytes());
            hash.update([0, *platform, 0]);
            let mut sorted: Vec<&str> = users.iter().map(String::as_str).collect();
            sorted.sort_unstable();
            for u in sorted {
                hash.update(u.as_bytes());
                hash.update([0]);
            }
        }
    }
    hash.finalize().into()
}

/// Answers kept for a fixed time, bounded in bytes and entries. Every entry lives exactly `ttl`,
/// so insertion order is expiry order: one queue serves both expiry and eviction (oldest first),
/// with no scan and no dependency.
struct Cache {
    ttl: Duration,
    entries: HashMap<Key, Entry>,
    /// Keys in insertion order, with the expiry they were inserted with (a key inserted again
    /// leaves a stale record behind, skipped when it reaches the front).
    order: VecDeque<(Key, Instant)>,
    bytes: usize,
}

struct Entry {
    verdict: Verdict,
    expires: Instant,
    bytes: usize,
}

impl Cache {
    fn new(ttl: Duration) -> Self {
        Cache {
            ttl,
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
        }
    }

    fn get(&self, key: &Key, now: Instant) -> Option<Verdict> {
        self.entries
            .get(key)
            .filter(|e| e.expires > now)
            .map(|e| e.verdict.clone())
    }

    fn insert(&mut self, key: Key, verdict: Verdict, now: Instant) {
        let bytes = weight(&verdict);
        if bytes > CACHE_MAX_BYTES {
            return;
        }
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
        }
        self.evict(now, bytes);
        let expires = now + self.ttl;
        self.entries.insert(
            key,
            Entry {
                verdict,
                expires,
                bytes,
            },
        );
        self.order.push_back((key, expires));
        self.bytes += bytes;
    }

    /// Drops expired entries, and the oldest ones while `room` more bytes or one more entry would
    /// not fit.
    fn evict(&mut self, now: Instant, room: usize) {
        while let Some(&(key, expires)) = self.order.front() {
            let full =
                self.bytes + room > CACHE_MAX_BYTES || self.entries.len() >= CACHE_MAX_ENTRIES;
            if expires > now && !full {
                break;
            }
            self.order.pop_front();
            if self.entries.get(&key).is_some_and(|e| e.expires == expires)
                && let Some(gone) = self.entries.remove(&key)
            {
                self.bytes -= gone.bytes;
            }
        }
    }
}

/// Approximate heap bytes of an entry: key, map slot and queue record, plus an allow list.
fn weight(verdict: &Verdict) -> usize {
    let base = 128;
    match verdict {
        Verdict::Only(users) => base + users.iter().map(|u| u.len() + 32).sum::<usize>(),
        _ => base,
    }
}

#[cfg(test)]
mod tests;
