//! Chaos: three nodes on one Redis, random client churn, status changes and group messages, while
//! nodes are SIGKILLed and restarted and Redis is killed and restarted (with its data, or empty).
//! At the end the test compares what everyone sees with the truth it kept, and the online index
//! and counts with the records, and reports every difference (user, expected, got, where). A seeded RNG picks every action: `CHAOS_SEED=<n>`
//! replays a run's choices (timing still differs); `CHAOS_SECS` sets how long faults go on.
//! `make chaos` runs the long version.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Router, body::Bytes, extract::State, http::HeaderMap, routing::post};
use rand::{Rng, SeedableRng, rngs::StdRng, seq::IndexedRandom};
use shared::{RouteResult, ServerFrame, Status};
use tokio::time::Instant;

use crate::{
    client::Rest,
    faults::{presence_on, status_name},
    harness::{Backend, Node, NodeBuilder, Redis},
    peer::Peer,
};

const USERS: usize = 16;
const GROUPS: usize = 3;
const NODES: usize = 3;
const PLATFORMS: [u8; 3] = [1, 2, 3];
/// A status acknowledged this shortly before its node was killed may not have been written.
const UNFLUSHED: Duration = Duration::from_secs(1);

fn user(i: usize) -> String {
    format!("c{i}")
}

/// Each user is a member of two of the three groups.
fn groups_of(i: usize) -> [String; 2] {
    [format!("g{}", i % GROUPS), format!("g{}", (i + 1) % GROUPS)]
}

fn members(group: &str) -> Vec<String> {
    (0..USERS)
        .filter(|i| groups_of(*i).iter().any(|g| g == group))
        .map(user)
        .collect()
}

/// One `set_status` of a user, as the test saw it.
struct StatusSet {
    status: Status,
    node: usize,
    at: Instant,
    /// It may or may not have taken effect (no answer came, or Redis lost it).
    maybe: bool,
}

/// A group message acknowledged as `delivered`.
struct Sent {
    msg_id: String,
    group: String,
    sender: usize,
    sent_at: Instant,
}

/// What the webhook receiver got: (user, event, `X-Presence-Event-Id`).
type Hooks = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

async fn start_webhook_receiver() -> (SocketAddr, Hooks) {
    async fn receive(State(hooks): State<Hooks>, headers: HeaderMap, body: Bytes) -> &'static str {
        let event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let id = headers
            .get("x-presence-event-id")
            .and_then(|v| v.to_str().ok())
            .map(String::from);
        hooks.lock().expect("hooks").push((
            event["user"].as_str().unwrap_or_default().to_string(),
            event["event"].as_str().unwrap_or_default().to_string(),
            id,
        ));
        "ok"
    }
    let hooks: Hooks = Arc::default();
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(hooks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the webhook receiver");
    let addr = listener.local_addr().expect("receiver address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, hooks)
}

struct World {
    rng: StdRng,
    redis: Redis,
    backend: Backend,
    hook_url: String,
    nodes: Vec<Option<Node>>,
    ids: Vec<String>,
    /// When each node was last killed.
    killed: Vec<Vec<Instant>>,
    peers: Vec<Peer>,
    watchers: Vec<usize>,
    statuses: HashMap<String, Vec<StatusSet>>,
    sent: Vec<Sent>,
    /// Empty restarts of Redis: (went down, memberships written again).
    emptied: Vec<(Instant, Instant)>,
    /// What happened, each line stamped with the time since `began`.
    log: Vec<String>,
    began: Instant,
    watcher_runs: usize,
    /// Whether a Redis fault may bring it back empty.
    redis_may_lose_data: bool,
}

impl World {
    fn note(&mut self, line: String) {
        let at = self.began.elapsed().as_secs_f64();
        self.log.push(format!("{at:7.3}s {line}"));
    }

    fn start_node(&mut self, i: usize, keep_id: bool) {
        let mut builder = NodeBuilder::new(&self.backend)
            .arg("--ttl-secs=3")
            .arg("--rate-limit=100000")
            .arg(format!("--webhook-urls={}", self.hook_url))
            .arg("--webhook-secret=chaos");
        if std::env::var("CHAOS_DEBUG").is_ok() {
            builder = builder.arg("--log=info,gateway::shard=debug");
        }
        if keep_id && !self.ids[i].is_empty() {
            builder = builder.with_id(&self.ids[i].clone());
        }
        let node = builder.start();
        self.ids[i] = node.id.clone();
        self.nodes[i] = Some(node);
    }

    fn running(&self) -> Vec<usize> {
        (0..NODES).filter(|i| self.nodes[*i].is_some()).collect()
    }

    async fn add_watcher(&mut self, i: usize) {
        let Some(node) = &self.nodes[i] else { return };
        self.watcher_runs += 1;
        let name = format!("w{i}-{}", self.watcher_runs);
        match Peer::connect(node, i, &name, 1).await {
            Ok(w) => {
                let ok = w.subscribe((0..USERS).map(user).collect()).await;
                self.note(format!("watcher {name} on node {i}: subscribed {ok}"));
                self.peers.push(w);
                self.watchers.push(self.peers.len() - 1);
            }
            Err(e) => self.note(format!("watcher {name} on node {i}: {e}")),
        }
    }

    fn live_clients(&self) -> Vec<usize> {
        (0..self.peers.len())
            .filter(|p| !self.watchers.contains(p) && self.peers[*p].alive())
            .collect()
    }

    /// Memberships as the app backend keeps them, written (again) through a running node.
    async fn write_memberships(&mut self) {
        let Some(node) = self.running().first().and_then(|i| self.nodes[*i].as_ref()) else {
            return;
        };
        let rest = Rest::new(node);
        for i in 0..USERS {
            for group in groups_of(i) {
                let path = format!("/groups/{group}/members/{}", user(i));
                let deadline = Instant::now() + Duration::from_secs(20);
                while rest.put(&path, None).await != 204 {
                    assert!(Instant::now() < deadline, "membership {path} never written");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn step(&mut self) {
        let roll = self.rng.random_range(0..100);
        match roll {
            0..30 => self.connect().await,
            30..50 => {
                if let Some(&p) = self.live_clients().choose(&mut self.rng) {
                    self.peers[p].close();
                }
            }
            50..72 => self.set_status().await,
            72..96 => self.send().await,
            _ => self.fault().await,
        }
    }

    async fn connect(&mut self) {
        let u = self.rng.random_range(0..USERS);
        let name = user(u);
        let used: BTreeSet<u8> = self
            .peers
            .iter()
            .filter(|p| p.user == name && p.alive())
            .map(|p| p.platform)
            .collect();
        let free: Vec<u8> = PLATFORMS
            .iter()
            .copied()
            .filter(|p| !used.contains(p))
            .collect();
        let (Some(&platform), Some(&i)) = (
            free.choose(&mut self.rng),
            self.running().choose(&mut self.rng),
        ) else {
            return;
        };
        let Some(node) = &self.nodes[i] else { return };
        match Peer::connect(node, i, &name, platform).await {
            Ok(peer) => self.peers.push(peer),
            Err(e) => self
                .log
                .push(format!("connect {name}/{platform} on node {i}: {e}")),
        }
    }

    async fn set_status(&mut self) {
        let Some(&p) = self.live_clients().choose(&mut self.rng) else {
            return;
        };
        let status = *[Status::Online, Status::Away, Status::Busy]
            .choose(&mut self.rng)
            .expect("statuses");
        let ok = self.peers[p].set_status(status).await;
        let peer = &self.peers[p];
        self.statuses
            .entry(peer.user.clone())
            .or_default()
            .push(StatusSet {
                status,
                node: peer.node,
                at: Instant::now(),
                maybe: !ok,
            });
    }

    async fn send(&mut self) {
        let Some(&p) = self.live_clients().choose(&mut self.rng) else {
            return;
        };
        let index: usize = self.peers[p].user[1..].parse().expect("user index");
        let group = groups_of(index)[self.rng.random_range(0..2)].clone();
        let sent_at = Instant::now();
        let text = format!("chaos {}", self.sent.len());
        if let Some(ServerFrame::Ack {
            msg_id,
            result: RouteResult::Delivered,
            ..
        }) = self.peers[p].send_group(&group, &text).await
        {
            self.sent.push(Sent {
                msg_id,
                group,
                sender: p,
                sent_at,
            });
        }
    }

    async fn restart_redis_with_data(&mut self) {
        let pause = Duration::from_millis(self.rng.random_range(0..1000));
        self.redis.stop();
        tokio::time::sleep(pause).await;
        self.redis.kill_and_restart();
        self.note(format!(
            "Redis SIGKILLed, back with its data after {pause:?}"
        ));
    }

    async fn fault(&mut self) {
        let down: Vec<usize> = (0..NODES).filter(|i| self.nodes[*i].is_none()).collect();
        match self.rng.random_range(0..4) {
            0 if self.running().len() > 1 => {
                let Some(&i) = self.running().choose(&mut self.rng) else {
                    return;
                };
                if let Some(mut node) = self.nodes[i].take() {
                    node.kill();
                }
                self.killed[i].push(Instant::now());
                self.note(format!("SIGKILL node {i} ({})", self.ids[i]));
            }
            0 | 1 if !down.is_empty() => {
                let Some(&i) = down.choose(&mut self.rng) else {
                    return;
                };
                let keep_id = self.rng.random_bool(0.5);
                self.start_node(i, keep_id);
                self.note(format!(
                    "restart node {i} as {} (same id: {keep_id})",
                    self.ids[i]
                ));
                self.add_watcher(i).await;
            }
            2 => self.restart_redis_with_data().await,
            _ if !self.redis_may_lose_data => self.restart_redis_with_data().await,
            _ => {
                let pause = Duration::from_millis(self.rng.random_range(0..1000));
                let went = Instant::now();
                self.redis.stop();
                tokio::time::sleep(pause).await;
                self.redis.restart_empty();
                // A chosen status lives in Redis and in the node it was chosen through, while
                // that node holds a connection of the user (opened before the choice: a node
                // restarted since forgot it). Anything else was lost with Redis's data.
                let now = Instant::now();
                for i in 0..USERS {
                    let name = user(i);
                    let chosen = self
                        .statuses
                        .get(&name)
                        .and_then(|sets| sets.last())
                        .map(|set| (set.node, set.at));
                    let remembered = chosen.is_some_and(|(node, at)| {
                        self.peers
                            .iter()
                            .any(|p| p.user == name && p.alive() && p.node == node && p.since <= at)
                    });
                    if !remembered {
                        self.statuses.entry(name).or_default().push(StatusSet {
                            status: Status::Online,
                            node: usize::MAX,
                            at: now,
                            maybe: true,
                        });
                    }
                }
                self.write_memberships().await;
                self.emptied.push((went, Instant::now()));
                self.note(format!("Redis SIGKILLed, back empty after {pause:?}"));
            }
        }
    }

    /// The statuses a user may show: the last acknowledged one, and the ones before it as long as
    /// a later one may have been lost.
    fn accepted(&self, name: &str) -> BTreeSet<String> {
        let mut accepted = BTreeSet::new();
        for set in self.statuses.get(name).into_iter().flatten().rev() {
            accepted.insert(status_name(set.status));
            let lost_with_node = self.killed.get(set.node).is_some_and(|kills| {
                kills
                    .iter()
                    .any(|k| *k >= set.at && *k - set.at < UNFLUSHED)
            });
            if !(set.maybe || lost_with_node) {
                return accepted;
            }
        }
        accepted.insert(status_name(Status::Online));
        accepted
    }

    /// user → (accepted statuses, platforms) for users with a live connection; absent: offline.
    fn truth(&self) -> BTreeMap<String, (BTreeSet<String>, Vec<u8>)> {
        let mut truth = BTreeMap::new();
        for i in 0..USERS {
            let name = user(i);
            let platforms: BTreeSet<u8> = self
                .peers
                .iter()
                .filter(|p| p.user == name && p.alive())
                .map(|p| p.platform)
                .collect();
            if !platforms.is_empty() {
                truth.insert(
                    name.clone(),
                    (self.accepted(&name), platforms.into_iter().collect()),
                );
            }
        }
        truth
    }

    fn matches(
        truth: &BTreeMap<String, (BTreeSet<String>, Vec<u8>)>,
        name: &str,
        got: Option<&(String, Vec<u8>)>,
    ) -> Result<(), String> {
        let expected = truth.get(name);
        let ok = match (expected, got) {
            (None, Some((status, platforms))) => status == "offline" && platforms.is_empty(),
            (None, None) => true,
            // `away` is `online` after every connection idled for the idle timeout (the peers
            // send nothing for long stretches).
            (Some((statuses, platforms)), Some((s, p))) => {
                (statuses.contains(s) || (s == "away" && statuses.contains("online")))
                    && platforms == p
            }
            (Some(_), None) => false,
        };
        if ok {
            return Ok(());
        }
        let want = match expected {
            None => "offline".to_string(),
            Some((statuses, platforms)) => format!("one of {statuses:?} on {platforms:?}"),
        };
        Err(format!("{name}: expected {want}, got {got:?}"))
    }

    /// Every difference between what nodes and watchers show and the truth.
    async fn presence_differences(&self) -> Vec<String> {
        let truth = self.truth();
        let users: Vec<String> = (0..USERS).map(user).collect();
        let mut wrong = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            match presence_on(node, &users).await {
                Ok(got) => {
                    for name in &users {
                        if let Err(e) = Self::matches(&truth, name, got.get(name)) {
                            wrong.push(format!("node {i} ({}): {e}", node.id));
                        }
                    }
                }
                Err(e) => wrong.push(e),
            }
        }
        for &w in &self.watchers {
            let watcher = &self.peers[w];
            if !watcher.alive() {
                continue;
            }
            let heard = watcher.heard.lock().expect("heard");
            for name in &users {
                let got = heard
                    .latest
                    .get(name)
                    .map(|p| (status_name(p.status), p.platforms.clone()));
                if let Err(e) = Self::matches(&truth, name, got.as_ref()) {
                    wrong.push(format!(
                        "watcher {} on node {}: {e}",
                        watcher.user, watcher.node
                    ));
                }
            }
        }
        wrong
    }

    /// Every difference between the online index (`GET /v1/online`, `GET /v1/stats`) and the
    /// users' records as a running node reads them: the index must hold exactly the visibly
    /// online users (watchers included), and the counts must equal it, per platform too.
    async fn index_differences(&self) -> Vec<String> {
        let Some(node) = self.nodes.iter().flatten().next() else {
            return vec!["no node runs".into()];
        };
        let mut names: Vec<String> = (0..USERS).map(user).collect();
        for p in &self.peers {
            if !names.contains(&p.user) {
                names.push(p.user.clone());
            }
        }
        let records = match presence_on(node, &names).await {
            Ok(records) => records,
            Err(e) => return vec![e],
        };
        let visible: BTreeMap<&String, &Vec<u8>> = records
            .iter()
            .filter(|(_, (status, _))| ["online", "away", "busy"].contains(&status.as_str()))
            .map(|(name, (_, platforms))| (name, platforms))
            .collect();
        let rest = Rest::new(node);
        let (status, page) = rest.get("/online?limit=1000").await;
        let (stats_status, stats) = rest.get("/stats").await;
        if status != 200 || stats_status != 200 {
            return vec![format!(
                "index reads: {status} {page}, {stats_status} {stats}"
            )];
        }
        let listed: BTreeSet<String> = page["users"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|u| u.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let mut wrong = Vec::new();
        let expected: BTreeSet<String> = visible.keys().map(|n| (*n).clone()).collect();
        if listed != expected {
            wrong.push(format!(
                "index lists {:?} not in the records as online, misses {:?}",
                listed.difference(&expected).collect::<Vec<_>>(),
                expected.difference(&listed).collect::<Vec<_>>()
            ));
        }
        if stats["online_users"].as_u64() != Some(expected.len() as u64) {
            wrong.push(format!(
                "online_users {} for {} visibly online",
                stats["online_users"],
                expected.len()
            ));
        }
        for p in 1..=8u8 {
            let want = visible.values().filter(|ps| ps.contains(&p)).count() as u64;
            let got = stats["by_platform"][p.to_string()].as_u64().unwrap_or(0);
            if got != want {
                wrong.push(format!("by_platform {p}: {got} for {want}"));
            }
        }
        wrong
    }

    /// Acknowledged `delivered` group messages missing at a member connection that was there
    /// before the send and stayed to the end. A connection made while Redis was back empty and
    /// memberships not yet written again joins its groups later, so it is not counted for that
    /// window's messages.
    fn missing_messages(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for sent in &self.sent {
            let members = members(&sent.group);
            for (p, peer) in self.peers.iter().enumerate() {
                if p == sent.sender
                    || !peer.alive()
                    || !members.contains(&peer.user)
                    || peer.since >= sent.sent_at
                {
                    continue;
                }
                if self
                    .emptied
                    .iter()
                    .any(|(went, back)| peer.since >= *went && peer.since <= *back)
                {
                    continue;
                }
                if !peer
                    .heard
                    .lock()
                    .expect("heard")
                    .messages
                    .contains(&sent.msg_id)
                {
                    missing.push(format!(
                        "{} in {} (sent by {} on node {} at {:.3}s) missing at {}/{} on node {} (connected at {:.3}s)",
                        sent.msg_id,
                        sent.group,
                        self.peers[sent.sender].user,
                        self.peers[sent.sender].node,
                        sent.sent_at.duration_since(self.began).as_secs_f64(),
                        peer.user,
                        peer.platform,
                        peer.node,
                        peer.since.duration_since(self.began).as_secs_f64(),
                    ));
                }
            }
        }
        missing
    }

    /// Transitions watchers saw that no webhook reported: for each user and event, the most
    /// transitions any one watcher saw (in version order) is at most the number of such webhooks
    /// received. Per watcher, not the union over watchers: the versions of one transition can
    /// differ between watchers' nodes (an offline a node's re-read found after Redis came back
    /// empty is versioned by that node's clock).
    fn missing_webhooks(&self, hooks: &Hooks) -> Vec<String> {
        let mut seen: HashMap<(String, &'static str), usize> = HashMap::new();
        for &w in &self.watchers {
            let heard = self.peers[w].heard.lock().expect("heard");
            for (name, history) in &heard.history {
                let mut sorted: Vec<_> = history.iter().collect();
                sorted.sort_by_key(|p| p.version);
                let mut counts: HashMap<&'static str, usize> = HashMap::new();
                for pair in sorted.windows(2) {
                    let (before, after) = (
                        pair[0].status == Status::Offline,
                        pair[1].status == Status::Offline,
                    );
                    let event = match (before, after) {
                        (true, false) => "user.online",
                        (false, true) => "user.offline",
                        _ => continue,
                    };
                    *counts.entry(event).or_default() += 1;
                }
                for (event, n) in counts {
                    let most = seen.entry((name.clone(), event)).or_default();
                    *most = (*most).max(n);
                }
            }
        }
        let hooks = hooks.lock().expect("hooks");
        let mut missing = Vec::new();
        for ((name, event), transitions) in seen {
            let got = hooks
                .iter()
                .filter(|(u, e, _)| *u == name && e == event)
                .count();
            if got < transitions {
                missing.push(format!(
                    "{name}: a watcher saw {transitions} {event} transitions, {got} webhooks arrived"
                ));
            }
        }
        missing.sort();
        missing
    }
}

async fn run_chaos(secs: u64, redis_may_lose_data: bool) {
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("chaos: seed {seed} (replay with CHAOS_SEED={seed}), {secs} s of faults");
    let redis = Redis::start_persistent();
    let backend = Backend::Redis(redis.url());
    let (hook_addr, hooks) = start_webhook_receiver().await;
    let mut world = World {
        rng: StdRng::seed_from_u64(seed),
        redis,
        backend,
        hook_url: format!("http://{hook_addr}/hook"),
        nodes: (0..NODES).map(|_| None).collect(),
        ids: vec![String::new(); NODES],
        killed: vec![Vec::new(); NODES],
        peers: Vec::new(),
        watchers: Vec::new(),
        statuses: HashMap::new(),
        sent: Vec::new(),
        emptied: Vec::new(),
        log: Vec::new(),
        began: Instant::now(),
        watcher_runs: 0,
        redis_may_lose_data,
    };
    for i in 0..NODES {
        world.start_node(i, false);
    }
    world.write_memberships().await;
    for i in 0..NODES {
        world.add_watcher(i).await;
    }

    let started = Instant::now();
    let mut steps = 0u64;
    while started.elapsed() < Duration::from_secs(secs) {
        world.step().await;
        steps += 1;
        let pause = world.rng.random_range(10..60);
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    // Faults stop; every node runs again (with a watcher) and the system is left to settle.
    for i in 0..NODES {
        if world.nodes[i].is_none() {
            let keep_id = world.rng.random_bool(0.5);
            world.start_node(i, keep_id);
            world.note(format!("final restart of node {i}"));
            world.add_watcher(i).await;
        }
    }
    let summary = format!(
        "chaos: {steps} steps, {} connections, {} delivered group messages, {} webhooks; faults:\n  {}",
        world.peers.len(),
        world.sent.len(),
        hooks.lock().expect("hooks").len(),
        world.log.join("\n  ")
    );
    eprintln!("{summary}");

    // Everything converges once the faults stop, none of it at once: users of killed
    // incarnations go offline within TTL + TTL/3; messages a node missed while it was not
    // subscribed come with its re-read, a batch interval and a second after it subscribed again
    // (its reconnect backs off up to 2 s); webhooks are retried. Give it generous room.
    let strict = webhooks_strict(!world.emptied.is_empty());
    let settling = Instant::now();
    let deadline = settling + Duration::from_secs(30);
    let (mut presence, mut index, mut messages, mut webhooks);
    let mut last_differed = [0.0f64; 4];
    let mut told_slow = false;
    loop {
        presence = world.presence_differences().await;
        index = if presence.is_empty() {
            world.index_differences().await
        } else {
            vec!["not read: presence differs".into()]
        };
        messages = world.missing_messages();
        webhooks = world.missing_webhooks(&hooks);
        // When each part last differed, to say what took long.
        for (part, differs) in [
            (0, !presence.is_empty()),
            (1, !index.is_empty()),
            (2, !messages.is_empty()),
            (3, !webhooks.is_empty()),
        ] {
            if differs {
                last_differed[part] = settling.elapsed().as_secs_f64();
            }
        }
        if (!presence.is_empty() || !index.is_empty())
            && !told_slow
            && settling.elapsed() > Duration::from_secs(5)
        {
            told_slow = true;
            eprintln!(
                "chaos: still differs 5 s after the faults stopped:\n  {}",
                presence
                    .iter()
                    .chain(&index)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
        }
        let settled = presence.is_empty()
            && index.is_empty()
            && messages.is_empty()
            && (!strict || webhooks.is_empty());
        if settled || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settled_after = settling.elapsed().as_secs_f64();
    eprintln!(
        "chaos: {} after the faults stopped",
        if presence.is_empty() && index.is_empty() && messages.is_empty() {
            format!(
                "settled {settled_after:.1} s (last differed: presence {:.1} s, index {:.1} s, \
                 messages {:.1} s, webhooks {:.1} s)",
                last_differed[0], last_differed[1], last_differed[2], last_differed[3]
            )
        } else {
            "not settled within 30 s".to_string()
        }
    );
    let ids = hooks
        .lock()
        .expect("hooks")
        .iter()
        .filter(|(_, _, id)| id.is_some())
        .count();
    eprintln!(
        "chaos: webhook check ({}): {} users with transitions missing; {ids} webhooks carried an event id{}",
        if strict {
            "strict"
        } else {
            "report only: Redis lost its data"
        },
        webhooks.len(),
        if webhooks.is_empty() {
            String::new()
        } else {
            format!(":\n  {}", webhooks.join("\n  "))
        }
    );
    if !messages.is_empty() && std::env::var("CHAOS_DEBUG").is_ok() {
        for (i, node) in world.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            for line in node.logs().lines().filter(|l| {
                [
                    "subscrib",
                    "Resync",
                    "reconnected",
                    "re-read",
                    "reachable",
                    "resync",
                    "history",
                    "gap",
                    "repeat",
                ]
                .iter()
                .any(|k| l.contains(k))
            }) {
                eprintln!("node {i}: {}", &line[..line.len().min(600)]);
            }
        }
    }
    let mut report = Vec::new();
    if !presence.is_empty() {
        report.push(format!(
            "presence differs ({}):\n  {}",
            presence.len(),
            presence.join("\n  ")
        ));
    }
    if !index.is_empty() {
        report.push(format!(
            "online index differs from the records:\n  {}",
            index.join("\n  ")
        ));
    }
    if !messages.is_empty() {
        report.push(format!(
            "delivered messages missing ({}):\n  {}",
            messages.len(),
            messages.join("\n  ")
        ));
    }
    if strict && !webhooks.is_empty() {
        report.push(format!("webhooks missing:\n  {}", webhooks.join("\n  ")));
    }
    assert!(
        report.is_empty(),
        "chaos seed {seed} (CHAOS_SEED={seed} replays the choices):\n{}\n{summary}",
        report.join("\n")
    );
}

/// The webhook check fails the test unless Redis lost its data during the run: events waiting
/// in the stream then are gone with it, and so are the offline transitions of users whose node
/// died while Redis was away and came back empty (nobody is left who knew they were online).
/// `CHAOS_WEBHOOKS=strict` makes it fail those runs too; they report what they found.
fn webhooks_strict(redis_emptied: bool) -> bool {
    !redis_emptied || std::env::var("CHAOS_WEBHOOKS").is_ok_and(|v| v == "strict")
}

fn chaos_secs(default: u64) -> u64 {
    std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The short run: node SIGKILLs and restarts, Redis SIGKILLed and back with its data (Redis
/// coming back empty is left to `chaos_long`; `outage.rs` covers it deterministically in
/// `make test`). In `make test`; `make chaos` runs it, then the long one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short() {
    run_chaos(chaos_secs(15), false).await;
}

/// `make chaos`: minutes of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long: make chaos"]
async fn chaos_long() {
    run_chaos(chaos_secs(180), true).await;
}
