//! The circuit's probe: finds out within about two seconds that Redis stopped answering (killed,
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
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// A PING slower than this counts as down: far above a healthy Redis's round trip (well under a
/// millisecond), far below the command timeout callers would otherwise wait out.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn run_probe(
    client: Client,
    subscriber: SubscriberClient,
    health: Health,
    events: EventSink,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let up = client.is_connected()
            && subscriber.is_connected()
            && matches!(
                tokio::time::timeout(PROBE_TIMEOUT, client.ping::<()>(None)).await,
                Ok(Ok(()))
            );
        // Back from an outage: whatever was written or published meanwhile may be lost, even
        // without a reconnect (a stall), so the node rewrites its presence and re-reads what its
        // clients watch.
        if health.set(up) && up && events.send(BackendEvent::Resync).await.is_err() {
            break;
        }
    }
}
