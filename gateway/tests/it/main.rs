//! Integration tests: real gateway nodes (processes of the binary, or `gateway::serve` in this
//! process), real redis-server processes, real WebSocket clients; and shard workers on a paused
//! clock.

mod client;
mod harness;
/// Nodes in the test process: `gateway::serve` in a task; two side by side.
mod inproc;
/// What the machine and a redis-server process did during a scale run (/proc, sampled).
mod machine;
/// A client in a task of its own that records what it hears (fault and chaos tests).
mod peer;
/// A webhook receiver in the test process that checks signatures and records every attempt.
mod receiver;

/// The authorization hook: a hook server in the test process decides `join` and `subscribe`.
mod access;
/// Chaos: nodes and Redis killed and restarted under random churn; the truth checked at the end.
mod chaos;
/// Connections: authentication, encodings, limits, bad input and close codes.
mod connect;
/// Backend role contracts, each test run in-process against the embedded and the Redis backend.
mod contract;
/// The drain on SIGTERM: readiness, the spread of closes, zero-flap handover on Redis.
mod drain;
/// Faults under traffic: a Redis Cluster master killed (failover), a node SIGKILLed.
mod faults;
/// The `rest` fuzz target's stored inputs, replayed through its check.
mod fuzz_corpus;
/// HAProxy as a child process with its stats socket (also included by the load tool's tests).
mod haproxy;
/// Hostile clients: memory bounds, poison bodies.
mod hostile;
/// Behind HAProxy: a rolling restart through three nodes is invisible to clients.
mod lb;
/// Messaging: groups, private messages, offline storage, history, broadcasts, slow consumers.
mod messaging;
/// `/metrics` under traffic: promtool, the dashboard's and alerts' metric names, docs/metrics.md.
mod metrics;
/// Many nodes on Redis and Redis Cluster: cross-node presence, crashes, batching, recovery.
mod multinode;
/// Redis stalled, killed and restarted empty under two nodes: nothing waits for it, nothing stays
/// stale after.
mod outage;
/// Presence behaviour, one suite run against the embedded backend (in a node process and in-process)
/// and the Redis backend.
mod presence;
/// The REST API of the app backend.
mod rest;
/// Safe retries of messages: `client_msg_id` on both backends and across nodes, REST, and a
/// client retrying through a Redis stall gets each message delivered once.
mod retries;
/// Scale: 100,000 (make test) or 1,000,000 (make scale) users in Redis through the backend, and
/// commands per master of a Redis Cluster.
mod scale;
/// Token lifetime, refresh, and the app backend's disconnect and revoke across nodes.
mod sessions;
/// One shard worker on a paused clock: batch interval and size, flap suppression, retry backoff,
/// renewal rounds in chunks, the idle check, the last flush at stop.
mod shard;
/// Webhooks: a receiver in the test process; signatures and event ids, retries, a killed node's
/// events delivered by another, giving up, the queue's bound.
mod webhooks;
/// Hand-written broken WebSocket framing and the close codes it gets.
mod wire;
