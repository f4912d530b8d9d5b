//! Behind a real load balancer: HAProxy in front of three nodes on one Redis, health checks on
//! `/readyz`. Clients connect through it, watch each other and get group messages the app
//! backend sends (REST, through HAProxy too); a restart rolls through the nodes one at a time
//! (SIGTERM, wait for the exit, start again under the same id and port). Checked: every client
//! was drained (1001) and reconnected through HAProxy; no watcher saw a watched user offline; no
//! `user.offline` webhook; every connection got every message sent between the first and last it
//! got (and the last connection the final one), so nothing acknowledged was lost for members who
//! stayed connected; HAProxy sent no new connection to a node after it saw it draining.
//!
//! `make test` runs a short version (a few dozen clients, second-long drain); `make lb-test` the
//! full one (`LB_CLIENTS=1000`, the default drain settings), figures in docs/benchmarks.md.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use shared::{ClientFrame, Encoding, Presence, ServerFrame, Status};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    client::{Client, Closed, Rest, jwt},
    haproxy::{Haproxy, ServerStat},
    harness::{API_KEY, Backend, Node, NodeBuilder, Redis, free_port},
    receiver::{Receiver, SECRET},
};

/// Members per group: each group has a sender of its own.
const GROUP_SIZE: usize = 50;
/// Users each client watches (the next ones by number).
const WATCHES: usize = 5;
/// Between two messages of one group's sender.
const SEND_EVERY: Duration = Duration::from_millis(200);
/// Longest wait for something that should happen within seconds on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// One run's size and drain settings (seconds).
struct Plan {
    clients: usize,
    delay: u64,
    spread: u64,
    handover: u64,
    /// Presence TTL: the reaper runs every third of it, so handed-over entries are reaped that
    /// soon after their window; a node whose heartbeat is late by as much is reaped as dead.
    ttl: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_behind_haproxy_is_invisible() {
    roll(Plan {
        clients: 30,
        delay: 1,
        spread: 1,
        handover: 5,
        ttl: 6,
    })
    .await;
}

/// `make lb-test`: `LB_CLIENTS` clients (default 1,000) and the gateway's default drain settings
/// (`LB_DELAY`, `LB_SPREAD`, `LB_HANDOVER` override them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "make lb-test"]
async fn a_rolling_restart_behind_haproxy_at_scale() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    roll(Plan {
        clients: env("LB_CLIENTS", 1000) as usize,
        delay: env("LB_DELAY", 5),
        spread: env("LB_SPREAD", 10),
        handover: env("LB_HANDOVER", 10),
        // Long enough that a node starved of CPU by a thousand clients on this machine is not
        // taken for dead; its reaper still runs every 5 s.
        ttl: env("LB_TTL", 15),
    })
    .await;
}

/// What one client lived through.
#[derive(Default)]
struct Log {
    connected: bool,
    /// Group message sequence numbers, per connection (episode).
    episodes: Vec<Vec<u64>>,
    /// How each connection ended.
    closes: Vec<Closed>,
    /// Every presence heard of a watched user (`presence_list` items and events).
    presence: Vec<Presence>,
    /// From a close to the next `welcome`.
    reconnects: Vec<Duration>,
    /// Upgrades through HAProxy that failed (retried).
    failed_connects: u32,
}

/// Shared by the test and every client task.
struct Crowd {
    url: String,
    /// Clients subscribe once this is set (everyone is online by then).
    watching: AtomicBool,
    joined: AtomicUsize,
    stop: CancellationToken,
}

fn user(i: usize) -> String {
    format!("lb{i:05}")
}

fn group_of(i: usize) -> String {
    format!("lb-{}", i / GROUP_SIZE)
}

/// One client: connects through HAProxy, joins its group once, watches its users once told to,
/// records what it hears, and reconnects at once whenever the server closes it.
async fn client(crowd: Arc<Crowd>, i: usize, count: usize, log: Arc<Mutex<Log>>) {
    let me = user(i);
    let watches: Vec<String> = (1..=WATCHES.min(count - 1))
        .map(|k| user((i + k) % count))
        .collect();
    let mut closed_at: Option<Instant> = None;
    let mut joined = false;
    let url = format!("{}?token={}", crowd.url, jwt(&me, 1 + (i % 8) as u8));
    while !crowd.stop.is_cancelled() {
        let mut ws = match Client::open_url(&url, Some(Encoding::MsgPack)).await {
            Ok(ws) => ws,
            Err(_) => {
                log.lock().expect("log").failed_connects += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match ws.next_frame().await {
            Ok(ServerFrame::Welcome { .. }) => {}
            _ => {
                log.lock().expect("log").failed_connects += 1;
                continue;
            }
        }
        {
            let mut log = log.lock().expect("log");
            if let Some(at) = closed_at.take() {
                log.reconnects.push(at.elapsed());
            }
            log.connected = true;
            log.episodes.push(Vec::new());
        }
        let join = ClientFrame::Join {
            id: Some(1),
            group: group_of(i),
        };
        let mut sent = joined || ws.try_send(&join).await.is_ok();
        let mut subscribed = false;
        let closed = loop {
            if sent && !subscribed && crowd.watching.load(Ordering::Acquire) {
                let subscribe = ClientFrame::Subscribe {
                    id: Some(2),
                    users: watches.clone(),
                };
                sent = ws.try_send(&subscribe).await.is_ok();
                subscribed = true;
            }
            let frame = tokio::select! {
                frame = ws.next_frame() => frame,
                _ = crowd.stop.cancelled() => {
                    ws.close().await;
                    return;
                }
                // Looks at `watching` again now and then.
                _ = tokio::time::sleep(Duration::from_millis(100)), if !subscribed => continue,
            };
            let mut log = log.lock().expect("log");
            match frame {
                Ok(ServerFrame::Ok { id: Some(1), .. }) => {
                    joined = true;
                    crowd.joined.fetch_add(1, Ordering::AcqRel);
                }
                Ok(ServerFrame::PresenceList { items, .. }) => log.presence.extend(items),
                Ok(ServerFrame::Presence(p)) => log.presence.push(p),
                Ok(ServerFrame::Message(m)) => {
                    if let Some(seq) = m.body.as_str().and_then(|s| s.parse().ok())
                        && let Some(episode) = log.episodes.last_mut()
                    {
                        episode.push(seq);
                    }
                }
                Ok(_) => {}
                Err(closed) => break closed,
            }
        };
        let mut log = log.lock().expect("log");
        log.connected = false;
        log.closes.push(closed);
        closed_at = Some(Instant::now());
    }
}

/// One group's sender: the app backend sends `"<seq>"` to the group through HAProxy, each with a
/// `client_msg_id`, retried until acknowledged (so each is sent once, in order). Returns the last
/// acknowledged sequence number.
async fn sender(api: String, group: String, stop: CancellationToken) -> u64 {
    let http = reqwest::Client::new();
    let mut seq = 0;
    while !stop.is_cancelled() {
        seq += 1;
        let body = json!({
            "to": {"group": group},
            "body": seq.to_string(),
            "client_msg_id": format!("{group}-{seq}"),
        });
        let deadline = Instant::now() + PATIENCE;
        loop {
            let sent = http
                .post(format!("{api}/v1/messages"))
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await;
            if sent.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{group}: message {seq} never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(SEND_EVERY).await;
    }
    seq
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node(redis: &Redis, receiver: &Receiver, id: &str, port: u16, plan: &Plan) -> Node {
    NodeBuilder::new(&Backend::Redis(redis.url()))
        .with_id(id)
        .arg(format!("--listen=127.0.0.1:{port}"))
        .arg(format!("--webhook-urls=http://{}/hook", receiver.addr))
        .arg(format!("--webhook-secret={SECRET}"))
        .arg(format!("--ttl-secs={}", plan.ttl))
        .arg("--log=info")
        .arg(format!("--drain-delay-secs={}", plan.delay))
        .arg(format!("--drain-spread-secs={}", plan.spread))
        .arg(format!("--drain-handover-secs={}", plan.handover))
        .arg(format!(
            "--shutdown-grace-secs={}",
            plan.delay + plan.spread + 15
        ))
        .start()
}

/// Polls HAProxy until `server` of the backend is `status`; its stats then.
async fn server_status(haproxy: &Haproxy, server: &str, status: &str) -> ServerStat {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let servers = haproxy.servers("nodes");
        if let Some(s) = servers
            .iter()
            .find(|s| s.name == server && s.status.starts_with(status))
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{server} never {status}: {servers:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn roll(plan: Plan) {
    let n = plan.clients;
    let redis = Redis::start();
    let receiver = Receiver::start().await;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let ids: Vec<String> = (1..=3).map(|i| format!("lb-node-{i}")).collect();
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(node(&redis, &receiver, &ids[i], ports[i], &plan)))
        .collect();
    let front = free_port();
    let servers: String = (0..3)
        .map(|i| format!("    server {} 127.0.0.1:{} check\n", ids[i], ports[i]))
        .collect();
    // Checks every 250 ms, two failures to go down: a draining node is out within ~0.5 s, well
    // inside the drain delay.
    let haproxy = Haproxy::start(&format!(
        "defaults\n    mode http\n    timeout connect 2s\n    timeout client 1h\n    \
         timeout server 1h\n    timeout tunnel 1h\n    timeout http-request 10s\n    \
         option redispatch\n    retries 3\n\n\
         frontend gateway\n    bind 127.0.0.1:{front}\n    default_backend nodes\n\n\
         backend nodes\n    balance leastconn\n    option httpchk GET /readyz\n    \
         http-check expect status 200\n    default-server inter 250ms fall 2 rise 2\n{servers}"
    ));
    for id in &ids {
        haproxy.wait_status("nodes", id, "UP");
    }
    let api = format!("http://127.0.0.1:{front}");
    let rest = Rest::for_ws_url(&format!("ws://127.0.0.1:{front}/ws"));
    let groups: Vec<String> = (0..n.div_ceil(GROUP_SIZE))
        .map(|g| format!("lb-{g}"))
        .collect();
    for group in &groups {
        let status = rest
            .put(&format!("/groups/{group}"), Some(json!({"join": "open"})))
            .await;
        assert!((200..300).contains(&status), "open {group}: {status}");
    }

    let crowd = Arc::new(Crowd {
        url: format!("ws://127.0.0.1:{front}/ws"),
        watching: AtomicBool::new(false),
        joined: AtomicUsize::new(0),
        stop: CancellationToken::new(),
    });
    let logs: Vec<Arc<Mutex<Log>>> = (0..n).map(|_| Arc::default()).collect();
    let mut tasks = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        tasks.push(tokio::spawn(client(crowd.clone(), i, n, log.clone())));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let connected = |logs: &[Arc<Mutex<Log>>]| {
        logs.iter()
            .filter(|l| l.lock().expect("log").connected)
            .count()
    };
    wait_until("every client joined its group", || {
        crowd.joined.load(Ordering::Acquire) == n
    })
    .await;
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (_, stats) = rest.get("/stats").await;
        if stats["online_users"].as_u64() == Some(n as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "never all online: {stats}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    crowd.watching.store(true, Ordering::Release);
    let senders_stop = CancellationToken::new();
    let senders: Vec<_> = groups
        .iter()
        .map(|g| tokio::spawn(sender(api.clone(), g.clone(), senders_stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The roll: one node at a time.
    let rolled = Instant::now();
    let mut node_logs: Vec<(String, String)> = Vec::new();
    let mut routed_while_down = Vec::new();
    let mut routed_while_draining = Vec::new();
    for i in 0..3 {
        let before = haproxy.servers("nodes");
        let at_signal = before
            .iter()
            .find(|s| s.name == ids[i])
            .map_or(0, |s| s.total);
        let mut draining = nodes[i].take().expect("node running");
        let patience = Duration::from_secs(plan.delay + plan.spread + 30);
        let exit = tokio::task::spawn_blocking(move || {
            let clean = draining.terminate_within(patience);
            (clean, draining.logs())
        });
        let seen_down = server_status(&haproxy, &ids[i], "DOWN").await;
        let (clean, printed) = exit.await.expect("join");
        node_logs.push((format!("{}-run1", ids[i]), printed));
        assert!(clean, "{} drained and exited cleanly", ids[i]);
        let after = haproxy
            .servers("nodes")
            .into_iter()
            .find(|s| s.name == ids[i])
            .map_or(0, |s| s.total);
        routed_while_draining.push(seen_down.total - at_signal);
        routed_while_down.push(after - seen_down.total);
        nodes[i] = Some(node(&redis, &receiver, &ids[i], ports[i], &plan));
        server_status(&haproxy, &ids[i], "UP").await;
        wait_until("every client reconnected", || connected(&logs) == n).await;
    }
    let roll_time = rolled.elapsed();

    // Every handed-over name reaped (the handover windows ended), then barriers: a final message
    // per group and a user's online webhook come after anything those reaps could publish.
    wait_until("every handover reaped", || {
        !redis
            .cli(&["ZRANGE", "{presence}:hb", "0", "-1"])
            .contains('~')
    })
    .await;
    senders_stop.cancel();
    let mut last: HashMap<String, u64> = HashMap::new();
    for (group, sender) in groups.iter().zip(senders) {
        last.insert(group.clone(), sender.await.expect("sender"));
    }
    wait_until("every client got its group's last message", || {
        logs.iter().enumerate().all(|(i, log)| {
            let log = log.lock().expect("log");
            log.episodes
                .last()
                .and_then(|e| e.last())
                .is_some_and(|seq| Some(seq) == last.get(&group_of(i)))
        })
    })
    .await;
    let marker = Client::open_url(
        &format!("{}?token={}", crowd.url, jwt("lb-marker", 1)),
        Some(Encoding::MsgPack),
    )
    .await
    .expect("marker connects");
    receiver.delivered("lb-marker", "user.online").await;
    // What everyone heard up to here; stopping the clients makes them go offline for real.
    let heard: Vec<Log> = logs
        .iter()
        .map(|l| std::mem::take(&mut *l.lock().expect("log")))
        .collect();
    let offline_webhooks: Vec<String> = (0..n)
        .map(user)
        .filter(|u| !receiver.attempts(u, "user.offline").is_empty())
        .collect();
    crowd.stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    drop(marker);

    let mut problems = Vec::new();
    let mut reconnects = Vec::new();
    let mut failed_connects = 0;
    for (i, log) in heard.iter().enumerate() {
        let me = user(i);
        if log.closes.is_empty() || log.closes.iter().any(|c| *c != Closed::Code(1001)) {
            problems.push(format!(
                "{me}: closes {:?} (every node was drained once)",
                log.closes
            ));
        }
        if let Some(p) = log.presence.iter().find(|p| p.status != Status::Online) {
            problems.push(format!("{me} saw {} {:?}", p.user, p.status));
        }
        for (e, episode) in log.episodes.iter().enumerate() {
            if episode.windows(2).any(|w| w[1] != w[0] + 1) {
                problems.push(format!("{me}: connection {e} missed messages: {episode:?}"));
            }
        }
        if offline_webhooks.contains(&me) {
            problems.push(format!("{me}: a user.offline webhook"));
        }
        reconnects.extend(log.reconnects.iter().copied());
        failed_connects += log.failed_connects;
    }
    if routed_while_down.iter().any(|&r| r > 0) {
        problems.push(format!(
            "HAProxy sent connections to a node it saw draining: {routed_while_down:?}"
        ));
    }
    reconnects.sort();
    let messages: u64 = last.values().sum();
    eprintln!(
        "lb: clients={n} groups={} messages={messages} reconnects={} failed_upgrades={failed_connects} \
         reconnect p50={:?} p99={:?} max={:?} roll={:.1}s (delay {} s, spread {} s per node) \
         routed to a node between its SIGTERM and HAProxy seeing it down={routed_while_draining:?}",
        groups.len(),
        reconnects.len(),
        percentile(&reconnects, 0.5),
        percentile(&reconnects, 0.99),
        reconnects.last().copied().unwrap_or_default(),
        roll_time.as_secs_f64(),
        plan.delay,
        plan.spread,
    );
    if !problems.is_empty() {
        // The nodes' own account, for whoever looks into it.
        for (i, node) in nodes.iter().enumerate() {
            if let Some(node) = node {
                node_logs.push((format!("{}-run2", ids[i]), node.logs()));
            }
        }
        let dir = std::env::temp_dir().join(format!("lb-logs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        for (name, logs) in &node_logs {
            let _ = std::fs::write(dir.join(format!("{name}.log")), logs);
        }
        panic!(
            "{} problems (node logs in {}):\n{}",
            problems.len(),
            dir.display(),
            problems.join("\n")
        );
    }
    assert!(
        reconnects.len() >= n,
        "every client reconnected at least once"
    );
    drop(haproxy);
}
