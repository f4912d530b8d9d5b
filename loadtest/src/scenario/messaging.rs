//! What `fanout` and `private` share: member connections that may join a group, send timestamped
//! messages at a paced rate, and count deliveries (latency, duplicates by msg_id, misroutes),
//! acks and errors; and the delivery part of their summaries.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures_util::FutureExt;
use rustc_hash::{FxHashMap, FxHashSet};
use shared::{Body, ClientFrame, Destination, ErrorCode, RouteResult, ServerFrame};
use tokio::{
    sync::{mpsc::UnboundedSender, watch},
    time::Instant,
};

use super::support::{
    CLOSE_WAIT, Shared, WorkerCtx, connect_member, count_undecodable, epoch_us, gate,
    join_connections, pace, per_sec, percent, share, wait_flag, wait_phase,
};
use crate::{
    cli::MessagingArgs,
    client::{Conn, Incoming, Raw},
    delivery::{self, Delivery, MsgId},
    fleet::Phase,
    report::{Figures, LatencySummary, Stats, Summary, figures, round},
};

const JOIN_WAIT: Duration = Duration::from_secs(15);
/// Latency samples a member keeps before adding them to the worker's histograms.
const SAMPLE_BATCH: usize = 256;
/// Frames a member handles in one go before it looks at its timers again.
const DRAIN_BATCH: usize = 64;
/// Sends a member tracks for ack latency.
const MAX_PENDING: usize = 10_000;
/// Longest a member keeps deliveries from the progress counter, in µs (it batches them, so that
/// the tasks do not all write one shared atomic for every delivery).
const REPORT_EVERY_US: u64 = 200_000;

/// One member connection's role.
pub struct Member {
    /// Run-wide client number (chooses URL and source address).
    pub index: usize,
    /// Position in this worker (for `Board::welcomed`).
    pub local: usize,
    pub user: String,
    /// Group to join during setup.
    pub join: Option<String>,
    /// What a delivery to this member must be addressed to.
    pub expect_to: Destination,
    /// Where this member sends, and how often.
    pub send: Option<Sending>,
    /// Accounting slot (the group, for fanout).
    pub slot: usize,
    /// For private messages: the recipient's position in this worker, so an ack counts as
    /// expected only when the recipient is connected.
    pub partner_local: Option<usize>,
    /// About how many messages this member should receive (to size its duplicate check).
    pub expect_messages: usize,
}

pub struct Sending {
    pub to: Destination,
    pub every: Duration,
    /// Offset of the first send after `go`, to spread senders.
    pub first: Duration,
}

/// State a worker's members share.
pub struct Board {
    pub welcomed: Vec<AtomicBool>,
    unavailable: watch::Sender<Option<String>>,
    pub duration: Duration,
    pub pad: String,
}

impl Board {
    pub fn new(members: usize, args: &MessagingArgs) -> Arc<Board> {
        Arc::new(Board {
            welcomed: (0..members).map(|_| AtomicBool::new(false)).collect(),
            unavailable: watch::channel(None).0,
            duration: Duration::from_secs(args.duration),
            pad: "x".repeat(args.body_bytes as usize),
        })
    }

    fn set_unavailable(&self, message: &str) {
        self.unavailable.send_if_modified(|u| {
            let first = u.is_none();
            if first {
                *u = Some(message.to_string());
            }
            first
        });
    }

    pub fn unavailable(&self) -> Option<String> {
        self.unavailable.borrow().clone()
    }

    fn is_welcomed(&self, local: usize) -> bool {
        self.welcomed
            .get(local)
            .is_some_and(|w| w.load(Ordering::Relaxed))
    }
}

/// Runs a worker of a messaging scenario: members `0..n` (built by `member`) connect at
/// `connect_rate` and set up; on `go` they send for the duration; deliveries drain for
/// `drain_ms`; on `stop` they close.
pub async fn worker(
    args: &MessagingArgs,
    mut ctx: WorkerCtx,
    n: usize,
    connect_rate: f64,
    member: impl Fn(usize) -> Member,
) -> anyhow::Result<Stats> {
    let shared = ctx.shared.clone();
    let board = Board::new(n, args);
    let (gate_tx, mut gate) = gate();
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for k in 0..n {
        pace(start, k as u64, connect_rate).await;
        if ctx.phase_now() == Phase::Stop || board.unavailable().is_some() {
            break;
        }
        tasks.push(tokio::spawn(run_member(
            member(k),
            shared.clone(),
            board.clone(),
            gate_tx.clone(),
            ctx.phase.clone(),
        )));
    }
    drop(gate_tx);
    let bound = shared.env.connect_timeout + JOIN_WAIT;
    gate.wait(tasks.len(), bound).await;
    let unavailable = board.unavailable();
    ctx.ready(unavailable.clone());
    if unavailable.is_none() && ctx.wait_go(Duration::from_secs(120)).await {
        let mut flag = board.unavailable.subscribe();
        let run = board.duration + Duration::from_millis(args.drain_ms);
        tokio::select! {
            _ = ctx.sleep_unless_stopped(run) => {}
            _ = wait_flag(&mut flag, |u| u.is_some()) => {}
        }
    }
    ctx.run_done();
    ctx.wait_stop(Duration::from_secs(120)).await;
    join_connections(&shared, tasks).await;
    let mut stats = shared.rec.take();
    stats.unavailable = board.unavailable();
    Ok(stats)
}

/// A member's counters, merged into the worker's statistics at the end.
struct Local {
    stats: Stats,
    delivery: Vec<u64>,
    ack: Vec<u64>,
    acked: u64,
    /// Acks by result, indexed by `result_index`.
    ack_results: [u64; 4],
    ack_delivered_connections: u64,
    ack_stored_recipients: u64,
    expected: u64,
    received: u64,
    /// Deliveries not yet added to `shared.counters.received`, and when it was last done (µs).
    unreported: u64,
    reported_at: u64,
    seen: Seen,
    pending: FxHashMap<u64, Instant>,
    first_delivery: Option<u64>,
    last_delivery: u64,
}

/// The `msg_id`s a member has received, to count duplicates, exactly: an id is a duplicate only
/// when the same text came before.
///
/// An id in the form the gateway writes, `<ms, 13 digits>-<seq, 10 digits>`, is kept as its two
/// numbers; the form is fixed-width, so two such ids have the same numbers only when they are
/// the same text. The sequence counts the messages of a destination, so a member's ids have
/// nearly consecutive sequences: `window` holds the `ms` (plus one; 0 is free) of each sequence
/// from `base` on, written one after the other. A hash set of every id instead touched a random
/// cache line per delivery (1,000 members × 5,000 ids at 500 msg/s for 10 s: ~128 MB of tables),
/// a sixth of the tool's CPU. Ids that do not fit the window (a sequence before `base` or too
/// far past it, a second `ms` for a sequence, another form) go to the sets, as before.
#[derive(Default)]
struct Seen {
    base: u64,
    window: Vec<u64>,
    /// Most entries `window` may grow to.
    limit: usize,
    /// About how many ids the member expects.
    expect: usize,
    numeric: FxHashSet<(u64, u64)>,
    other: FxHashSet<String>,
}

/// Sequences before the first one a member sees that the window still holds (deliveries from
/// two nodes may come out of order).
const WINDOW_SLACK: u64 = 1024;

impl Seen {
    /// A window for about `n` ids.
    fn with_capacity(n: usize) -> Self {
        Seen {
            limit: n.saturating_mul(2).max(4 * WINDOW_SLACK as usize),
            expect: n,
            ..Seen::default()
        }
    }

    /// True the first time `id` is seen.
    fn insert(&mut self, id: MsgId<'_>) -> bool {
        match id {
            MsgId::Numeric(ms, seq) => {
                if self.window.is_empty() && self.limit > 0 {
                    self.base = seq.saturating_sub(WINDOW_SLACK);
                    // Allocated once: growing by doubling during the run copied the window and
                    // faulted in fresh pages each time (about 6% of the tool's CPU at 500 msg/s).
                    self.window
                        .reserve((self.expect + 2 * WINDOW_SLACK as usize).min(self.limit));
                }
                let slot = seq
                    .checked_sub(self.base)
                    .and_then(|i| usize::try_from(i).ok())
                    .filter(|i| *i < self.limit);
                if let Some(i) = slot {
                    if i >= self.window.len() {
                        self.window.resize(i + 1, 0);
                    }
                    let held = &mut self.window[i];
                    // `base` and `limit` are fixed from the first id on, so a sequence always
                    // has this slot: an id whose slot was free has not been seen.
                    if *held == 0 {
                        *held = ms + 1;
                        return true;
                    }
                    if *held == ms + 1 {
                        return false;
                    }
                }
                self.numeric.insert((ms, seq))
            }
            MsgId::Text(id) => !self.other.contains(id) && self.other.insert(id.to_string()),
        }
    }
}

impl Local {
    fn new(expect: usize) -> Self {
        Local {
            stats: Stats::default(),
            delivery: Vec::new(),
            ack: Vec::new(),
            acked: 0,
            ack_results: [0; 4],
            ack_delivered_connections: 0,
            ack_stored_recipients: 0,
            expected: 0,
            received: 0,
            unreported: 0,
            reported_at: 0,
            seen: Seen::with_capacity(expect),
            pending: FxHashMap::default(),
            first_delivery: None,
            last_delivery: 0,
        }
    }

    fn flush_samples(&mut self, shared: &Shared) {
        if self.delivery.is_empty() && self.ack.is_empty() {
            return;
        }
        let mut rec = shared.rec.lock();
        rec.record_all("delivery", self.delivery.drain(..));
        rec.record_all("ack", self.ack.drain(..));
    }

    /// Adds the deliveries not yet reported to the progress counter.
    fn report(&mut self, shared: &Shared, now: u64) {
        shared
            .counters
            .received
            .fetch_add(std::mem::take(&mut self.unreported), Ordering::Relaxed);
        self.reported_at = now;
    }

    fn finish(mut self, shared: &Shared, slot: usize) {
        self.flush_samples(shared);
        self.report(shared, 0);
        for (result, n) in RESULTS.iter().zip(self.ack_results) {
            self.stats.add(ack_label(*result), n);
        }
        self.stats
            .add("ack_delivered_connections", self.ack_delivered_connections);
        self.stats
            .add("ack_stored_recipients", self.ack_stored_recipients);
        self.stats.add("expected", self.expected);
        let mut rec = shared.rec.lock();
        rec.vec_add("acked", slot, self.acked);
        rec.vec_add("received", slot, self.received);
        if let Some(first) = self.first_delivery {
            rec.min("first_delivery_us", first);
            rec.max("last_delivery_us", self.last_delivery);
        }
        rec.merge(self.stats);
    }
}

async fn run_member(
    m: Member,
    shared: Arc<Shared>,
    board: Arc<Board>,
    gate: UnboundedSender<bool>,
    mut phase: watch::Receiver<Phase>,
) {
    let Some(connected) = connect_member(&shared, m.index, &m.user, &gate).await else {
        return;
    };
    if let Some(w) = board.welcomed.get(m.local) {
        w.store(true, Ordering::Relaxed);
    }
    let mut conn = connected.conn;
    let mut local = Local::new(m.expect_messages);
    if let Some(group) = &m.join {
        match join(&mut conn, group).await {
            Ok(()) => shared.rec.lock().vec_add("joined", m.slot, 1),
            Err((kind, message)) => {
                if kind == "unavailable" {
                    board.set_unavailable(&message);
                }
                {
                    let mut rec = shared.rec.lock();
                    rec.add(&format!("join_failed.{kind}"), 1);
                    rec.sample(&format!("join_failed.{kind}"), &message);
                }
                let _ = gate.send(false);
                if kind != "closed" {
                    conn.close(CLOSE_WAIT).await;
                }
                shared.counters.closed();
                return;
            }
        }
    }
    let _ = gate.send(true);

    // Until go: keep reading (pings, early frames).
    // Biased, the phase first: a message that arrives once go was given (from a sender that
    // saw it sooner) is counted as a delivery, not as early.
    let go = loop {
        tokio::select! {
            biased;
            p = wait_phase(&mut phase, Phase::Go, Duration::from_secs(86_400)) => break p == Phase::Go,
            incoming = conn.recv_raw() => {
                if !handle(incoming, &conn, &m, &shared, &board, &mut local, false) {
                    break false;
                }
            }
        }
    };
    let mut alive = true;
    if go {
        let started = Instant::now();
        let end = started + board.duration;
        let mut seq: u64 = 1;
        let mut next = m.send.as_ref().map(|s| started + s.first);
        // Made once, not on every turn of the loop (one per delivery), which would register and
        // drop the phase wait's timeout timer and watch waiter for every delivery, and for a
        // sender also the send timer and the `unavailable` waiter.
        let mut unavailable = board.unavailable.subscribe();
        let flagged = wait_flag(&mut unavailable, |u| u.is_some()).fuse();
        let stop = wait_phase(&mut phase, Phase::Stop, Duration::from_secs(86_400));
        let send_timer = tokio::time::sleep_until(next.unwrap_or(end));
        tokio::pin!(flagged, stop, send_timer);
        loop {
            let due = next.filter(|t| *t < end);
            tokio::select! {
                incoming = conn.recv_raw() => {
                    if !handle(incoming, &conn, &m, &shared, &board, &mut local, true) {
                        alive = false;
                        break;
                    }
                    // The frames already read from the socket, without a turn of the `select!`
                    // (and its polls of the other branches) for each. `now_or_never` polls with a
                    // no-op waker; the next turn of the loop polls `recv_raw` again with the
                    // task's own before the task sleeps.
                    let mut more = true;
                    for _ in 0..DRAIN_BATCH {
                        let Some(incoming) = conn.recv_raw().now_or_never() else {
                            break;
                        };
                        if !handle(incoming, &conn, &m, &shared, &board, &mut local, true) {
                            more = false;
                            break;
                        }
                    }
                    if !more {
                        alive = false;
                        break;
                    }
                }
                _ = &mut send_timer, if due.is_some() => {
                    if let (Some(send), Some(at)) = (&m.send, due) {
                        seq += 1;
                        let frame = ClientFrame::Send {
                            id: Some(seq),
                            to: send.to.clone(),
                            body: body(seq, m.index, &board.pad),
                            client_msg_id: None,
                        };
                        if local.pending.len() < MAX_PENDING {
                            local.pending.insert(seq, Instant::now());
                        }
                        if conn.send(&frame).await.is_err() {
                            local.stats.add("send_failed", 1);
                            alive = false;
                            break;
                        }
                        local.stats.add("sent", 1);
                        shared.counters.sent.fetch_add(1, Ordering::Relaxed);
                        // Paced from the schedule, not from now, so the rate holds.
                        let at = at + send.every;
                        next = Some(at);
                        send_timer.as_mut().reset(at);
                    }
                }
                // Fused: once set, the flag is never waited for again (`next` stays `None`).
                _ = &mut flagged, if next.is_some() => {
                    next = None;
                }
                // `wait_phase` returns `Stop` (or a later phase) and nothing else here.
                _ = &mut stop => break,
            }
        }
    }
    local.finish(&shared, m.slot);
    if alive {
        conn.close(CLOSE_WAIT).await;
    }
    shared.counters.closed();
}

/// Sends `join` and waits for its answer; the error kind and message on failure.
async fn join(conn: &mut Conn, group: &str) -> Result<(), (String, String)> {
    let frame = ClientFrame::Join {
        id: Some(1),
        group: group.to_string(),
    };
    let answer = async {
        conn.send(&frame)
            .await
            .map_err(|e| ("send".to_string(), e))?;
        loop {
            match conn.recv().await {
                Incoming::Frame(f) => match f {
                    ServerFrame::Ok { id: Some(1), .. } => return Ok(()),
                    ServerFrame::Error { code, message, .. } => {
                        return Err((code.as_str().to_string(), message));
                    }
                    _ => {}
                },
                Incoming::Undecodable(_) => {}
                Incoming::Closed(code) => {
                    return Err(("closed".to_string(), format!("closed with {code:?}")));
                }
                Incoming::Failed(e) => return Err(("closed".to_string(), e)),
            }
        }
    };
    tokio::time::timeout(JOIN_WAIT, answer)
        .await
        .unwrap_or_else(|_| Err(("timeout".into(), "no answer to join".into())))
}

/// A message body: send time (µs since the epoch), sequence, sender, padding.
fn body(seq: u64, sender: usize, pad: &str) -> Body {
    let mut fields = vec![
        (Body::from("ts"), Body::from(epoch_us())),
        (Body::from("seq"), Body::from(seq)),
        (Body::from("from"), Body::from(sender as u64)),
    ];
    if !pad.is_empty() {
        fields.push((Body::from("pad"), Body::from(pad)));
    }
    Body::Map(fields)
}

/// Counts an `error` answer by its code (`error.<code>`), keeping the first message of each code.
pub fn count_error(stats: &mut Stats, code: ErrorCode, message: &str) {
    let key = format!("error.{}", code.as_str());
    stats.add(&key, 1);
    stats.sample(&key, message);
}

/// Every ack result, in `result_index` order.
const RESULTS: [RouteResult; 4] = [
    RouteResult::Delivered,
    RouteResult::Partial,
    RouteResult::Stored,
    RouteResult::NoRecipients,
];

fn result_index(r: RouteResult) -> usize {
    match r {
        RouteResult::Delivered => 0,
        RouteResult::Partial => 1,
        RouteResult::Stored => 2,
        RouteResult::NoRecipients => 3,
    }
}

/// The counter of acks with result `r`.
fn ack_label(r: RouteResult) -> &'static str {
    match r {
        RouteResult::Delivered => "ack.delivered",
        RouteResult::Partial => "ack.partial",
        RouteResult::Stored => "ack.stored",
        RouteResult::NoRecipients => "ack.no_recipients",
    }
}

/// Counts one incoming frame; false when the connection ended. A `message` frame is read by
/// `delivery::read` when it can be, and decoded in full otherwise.
fn handle(
    incoming: Raw,
    conn: &Conn,
    m: &Member,
    shared: &Shared,
    board: &Board,
    local: &mut Local,
    running: bool,
) -> bool {
    let incoming = match incoming {
        Raw::Bytes(bytes) => match delivery::read(&bytes) {
            Some(d) => {
                count_delivery(d, m, shared, local, running);
                return true;
            }
            None => conn.decode_bytes(&bytes),
        },
        Raw::Other(incoming) => incoming,
    };
    let frame = match incoming {
        Incoming::Frame(f) => f,
        Incoming::Undecodable(e) => {
            count_undecodable(&mut local.stats, &e);
            return true;
        }
        Incoming::Closed(code) => {
            local.stats.add("dropped", 1);
            let code = code.map_or("none".to_string(), |c| c.to_string());
            local.stats.add(&format!("dropped_close.{code}"), 1);
            return false;
        }
        Incoming::Failed(e) => {
            local.stats.add("dropped", 1);
            local.stats.sample("dropped_io_error", &e);
            return false;
        }
    };
    match frame {
        ServerFrame::Message(msg) => count_delivery(Delivery::of(&msg), m, shared, local, running),
        ServerFrame::Ack {
            id,
            result,
            delivered,
            stored,
            ..
        } => {
            local.acked += 1;
            if let Some(n) = local.ack_results.get_mut(result_index(result)) {
                *n += 1;
            }
            local.ack_delivered_connections += delivered;
            local.ack_stored_recipients += stored;
            if m.partner_local.is_some_and(|p| board.is_welcomed(p)) {
                local.expected += 1;
            }
            if let Some(sent) = id.and_then(|id| local.pending.remove(&id)) {
                local.ack.push(sent.elapsed().as_micros() as u64);
            }
        }
        ServerFrame::Error {
            id, code, message, ..
        } => {
            count_error(&mut local.stats, code, &message);
            shared.counters.errors.fetch_add(1, Ordering::Relaxed);
            if let Some(id) = id {
                local.pending.remove(&id);
            }
            if code == ErrorCode::Unavailable {
                board.set_unavailable(&message);
            }
        }
        _ => {}
    }
    true
}

/// Counts one delivered message.
fn count_delivery(d: Delivery<'_>, m: &Member, shared: &Shared, local: &mut Local, running: bool) {
    let now = epoch_us();
    if !running {
        local.stats.add("early_messages", 1);
        return;
    }
    if !d.to.is(&m.expect_to) {
        local.stats.add("misrouted", 1);
        return;
    }
    if d.from == m.user {
        local.stats.add("self_copies", 1);
    }
    if !local.seen.insert(d.msg_id) {
        local.stats.add("duplicates", 1);
        return;
    }
    local.received += 1;
    local.unreported += 1;
    if now.saturating_sub(local.reported_at) >= REPORT_EVERY_US {
        local.report(shared, now);
    }
    local.first_delivery.get_or_insert(now);
    local.last_delivery = now;
    match d.ts {
        Some(ts) => local.delivery.push(now.saturating_sub(ts)),
        None => local.stats.add("no_timestamp", 1),
    }
    if local.delivery.len() >= SAMPLE_BATCH {
        local.flush_samples(shared);
    }
}

/// Sender timing: `senders` senders share `rate`; sender `ordinal` starts at its share of the
/// first interval.
pub fn sending(to: Destination, rate: u64, senders: u64, ordinal: u64) -> Sending {
    let every = Duration::from_secs_f64(senders.max(1) as f64 / rate.max(1) as f64);
    let first = every.mul_f64(ordinal as f64 / senders.max(1) as f64);
    Sending { to, every, first }
}

/// About how many messages a member receives when the run's messages are spread evenly over
/// `streams` destinations (groups, or users); at most 2^20, the set grows past that if it must.
pub fn expected_per_member(args: &MessagingArgs, streams: u64) -> usize {
    let n = args.rate.saturating_mul(args.duration) / streams.max(1);
    n.min(1 << 20) as usize
}

/// A worker's share of the connect rate.
pub fn connect_rate(args: &MessagingArgs, part: u64, total: u64) -> f64 {
    share(args.connect_rate, part, total)
}

figures! {
    /// What `fanout` and `private` both measure.
    pub struct MessagingFigures {
        "connections" {
            connections_planned: u64,
            connected: u64,
            connect_failed: u64,
            failure_kinds: BTreeMap<String, u64>,
            dropped: u64,
        }
        "messages" {
            sent: u64,
            target_rate: u64,
            achieved_send_rate: f64,
            acked: u64,
            ack_results: BTreeMap<String, u64>,
            errors: BTreeMap<String, u64>,
            ack_latency_ms: LatencySummary,
        }
        "deliveries" {
            /// What the acks call for.
            expected_deliveries: u64,
            /// Unique deliveries.
            received: u64,
            lost: u64,
            loss_percent: f64,
            duplicates: u64,
            beyond_expected: u64,
            misrouted: u64,
            self_copies: u64,
            deliveries_per_sec: f64,
            delivery_latency_ms: LatencySummary,
            decode_errors: u64,
            /// The gateway's message when it answered `unavailable`.
            unavailable: Option<String>,
        }
    }
}

/// The figures common to both messaging scenarios. `expected` is the number of deliveries the
/// acks call for.
pub fn common_figures(
    args: &MessagingArgs,
    planned: u64,
    expected: u64,
    s: &Stats,
) -> MessagingFigures {
    let sent = s.get("sent");
    let received: u64 = s.vector("received").iter().sum();
    let lost = expected.saturating_sub(received);
    let span = match (
        s.mins.get("first_delivery_us"),
        s.maxs.get("last_delivery_us"),
    ) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / 1e6,
        _ => 0.0,
    };
    MessagingFigures {
        connections_planned: planned,
        connected: s.get("connected"),
        connect_failed: s.get("connect_failed"),
        failure_kinds: s.with_prefix("connect_error."),
        dropped: s.get("dropped"),
        sent,
        target_rate: args.rate,
        achieved_send_rate: round(per_sec(sent, args.duration as f64), 2),
        acked: s.vector("acked").iter().sum(),
        ack_results: s.with_prefix("ack."),
        errors: s.with_prefix("error."),
        ack_latency_ms: s.hist("ack").summary(),
        expected_deliveries: expected,
        received,
        lost,
        loss_percent: round(percent(lost, expected), 4),
        duplicates: s.get("duplicates"),
        beyond_expected: received.saturating_sub(expected),
        misrouted: s.get("misrouted"),
        self_copies: s.get("self_copies"),
        deliveries_per_sec: round(per_sec(received, span), 1),
        delivery_latency_ms: s.hist("delivery").summary(),
        decode_errors: s.get("decode_errors"),
        unavailable: s.unavailable.clone(),
    }
}

/// The summary of a messaging scenario (`what`: `group` or `private`) from its `figures`, which
/// hold the common `messaging` ones.
pub fn summary(what: &str, figures: &impl Figures, messaging: &MessagingFigures) -> Summary {
    let mut summary = Summary::new(figures);
    if messaging.connected == 0 {
        summary.problems.push("no member connected".into());
    }
    if let Some(message) = &messaging.unavailable {
        summary.problems.push(format!(
            "{what} messaging is unavailable on the gateway (error code `unavailable`: \
             {message}); nothing was measured"
        ));
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::{body_timestamp, numeric_id};
    use shared::Encoding;

    #[test]
    fn timestamps_survive_both_encodings() -> anyhow::Result<()> {
        let b = body(7, 3, "pad");
        let ts = body_timestamp(&b);
        assert!(ts.is_some_and(|t| t > 1_600_000_000_000_000));
        for enc in Encoding::ALL {
            let frame = ServerFrame::Message(shared::Message {
                msg_id: "1".into(),
                from: "a".into(),
                to: Destination::Group { group: "g".into() },
                body: b.clone(),
                sent_at: 1,
                offline: None,
            });
            let bytes = enc.encode(&frame)?;
            let back = enc.decode_server(&bytes)?;
            let ServerFrame::Message(m) = back else {
                anyhow::bail!("not a message");
            };
            assert_eq!(body_timestamp(&m.body), ts);
        }
        Ok(())
    }

    #[test]
    fn duplicates_are_the_same_msg_id_text() {
        assert_eq!(
            numeric_id(b"1700000000000-0000000042"),
            Some((1_700_000_000_000, 42))
        );
        for other in [
            "5-1",
            "1700000000000-42",
            "01700000000000-0000000042",
            "1700000000000-000000004x",
            "1700000000000+0000000042",
            "+700000000000-0000000042",
            "",
        ] {
            assert_eq!(numeric_id(other.as_bytes()), None, "{other}");
        }
        for mut seen in [Seen::default(), Seen::with_capacity(16)] {
            for id in [
                "1700000000000-0000000042",
                "1700000000000-0000000043",
                "1700000000001-0000000042",
                // The same numbers in other text are other ids, as strings would be.
                "1700000000000-42",
                "0000000000005-0000000001",
                "0000000000000-0000000000",
                "5-1",
                "x",
            ] {
                assert!(seen.insert(MsgId::of(id)), "{id} counted as a duplicate");
            }
            for id in [
                "1700000000000-0000000042",
                "1700000000001-0000000042",
                "0000000000000-0000000000",
                "5-1",
                "x",
            ] {
                assert!(
                    !seen.insert(MsgId::of(id)),
                    "{id} not counted as a duplicate"
                );
            }
        }
    }

    /// The window counts exactly what a set of the ids' text counts, for sequences in and out of
    /// it, out of order, and several ids per sequence.
    #[test]
    fn the_window_counts_as_a_set_of_strings_would() {
        let mut seen = Seen::with_capacity(100);
        let mut reference = FxHashSet::default();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let seq = match x % 4 {
                0 => 5_000 + x % 300,
                1 => 5_000 + (x >> 8) % 5_000,
                2 => x % 20_000,
                _ => (x >> 4) % 1_000_000,
            };
            let ms = 1_700_000_000_000 + (x >> 20) % 3;
            let id = format!("{ms:013}-{seq:010}");
            assert_eq!(
                seen.insert(MsgId::of(&id)),
                reference.insert(id.clone()),
                "{id}"
            );
        }
        assert!(!seen.window.is_empty() && !seen.numeric.is_empty());
    }

    #[test]
    fn senders_share_the_rate() {
        let s = sending(Destination::User { user: "u".into() }, 100, 10, 5);
        assert_eq!(s.every, Duration::from_millis(100));
        assert_eq!(s.first, Duration::from_millis(50));
    }
}
