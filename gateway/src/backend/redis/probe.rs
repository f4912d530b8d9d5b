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
/// How much later than its deadline a PING's wait may end before the slow answer says more about
/// this node than about Redis. A node starved of CPU (a saturated machine, a backlog of runnable
/// tasks) is late to its own timers as much as to Redis's replies, which may have been waiting in
/// its socket: counting that as Redis being down turned a CPU-starved node into one that welcomes
/// clients without Redis (seen in `make bench`'s idle steps). A stalled Redis leaves the node's
/// timers on time, so a stall is still found within two seconds.
const OWN_LAG: Duration = Duration::from_millis(200);

/// Slow PINGs in a row after a probe: a lost connection opens the circuit at once, an answer
/// closes it, a slow answer is a strike unless the node itself was `late` past [`OWN_LAG`] (then
/// the probe says nothing either way).
fn strikes_after(strikes: u32, connected: bool, answered: bool, late: Duration) -> u32 {
    match (connected, answered) {
        (_, true) => 0,
        (false, _) => STRIKES,
        (true, false) if late > OWN_LAG => strikes,
        (true, false) => strikes + 1,
    }
}

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
        let asked = tokio::time::Instant::now();
        let answered = connected
            && matches!(
                tokio::time::timeout(PROBE_TIMEOUT, client.ping::<()>(None)).await,
                Ok(Ok(()))
            );
        let late = asked.elapsed().saturating_sub(PROBE_TIMEOUT);
        if connected && !answered && late > OWN_LAG {
            tracing::info!(
                late_ms = late.as_millis() as u64,
                "slow Redis PING not counted: this node was late to its own timer (CPU-starved)"
            );
        }
        strikes = strikes_after(strikes, connected, answered, late);
        let up = strikes < STRIKES;
        // Back from an outage: whatever was written or published meanwhile may be lost, even
        // without a reconnect (a stall), so the node rewrites its presence and re-reads what its
        // clients watch.
        if health.set(up) && up && events.send(BackendEvent::Resync).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_ping_is_a_strike_unless_the_node_itself_was_late() {
        let on_time = Duration::from_millis(3);
        let starved = OWN_LAG + Duration::from_millis(1);
        assert_eq!(strikes_after(0, true, false, on_time), 1);
        assert_eq!(
            strikes_after(1, true, false, on_time),
            STRIKES,
            "a stall opens it"
        );
        assert_eq!(
            strikes_after(1, true, false, starved),
            1,
            "neither strike nor reset"
        );
        assert_eq!(strikes_after(0, true, false, starved), 0);
        assert_eq!(
            strikes_after(1, true, true, starved),
            0,
            "an answer always counts"
        );
        assert_eq!(
            strikes_after(0, false, false, starved),
            STRIKES,
            "a lost connection opens it"
        );
    }
}
