//! The circuit's probe: finds out within two seconds that Redis stopped answering (killed,
//! unreachable or stalled), and when it answers again. A stalled Redis keeps its sockets open, so
//! only a command with a deadline tells; a PING is the cheapest one.

use std::time::Duration;

use fred::{
    clients::{Client, SubscriberClient},
    prelude::*,
};
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendEvent, EventSink, Health};

/// How often the probe asks.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// A PING slower than this is a strike: far above a healthy Redis's round trip (well under a
/// millisecond), far below the command timeout callers would otherwise wait out.
const PROBE_TIMEOUT: Duration = Duration::from_millis(700);
/// Slow PINGs in a row that open the circuit: one late answer on a loaded machine is not an
/// outage; two in a row still open it within 2 s of a stall (250 + 2 × 700 ms at worst). A lost
/// connection opens it at once.
const STRIKES: u32 = 2;

pub async fn run_probe(
    client: Client,
    subscriber: SubscriberClient,
    cluster: bool,
    health: Health,
    events: EventSink,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut strikes = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        // On a cluster one node's connection coming and going (a failover) leaves the others
        // serving, so only the PING (to any node) decides there.
        let connected = cluster || (client.is_connected() && subscriber.is_connected());
        let answered = connected
            && matches!(
                tokio::time::timeout(PROBE_TIMEOUT, client.ping::<()>(None)).await,
                Ok(Ok(()))
            );
        strikes = match (connected, answered) {
            (_, true) => 0,
            (false, _) => STRIKES,
            (true, false) => strikes + 1,
        };
        let up = strikes < STRIKES;
        // Back from an outage: whatever was written or published meanwhile may be lost, even
        // without a reconnect (a stall), so the node rewrites its presence and re-reads what its
        // clients watch.
        if health.set(up) && up && events.send(BackendEvent::Resync).await.is_err() {
            break;
        }
    }
}
