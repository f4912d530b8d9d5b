//! Command line: the scenarios, their options (documented for `--help`) and the options all share.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use shared::Encoding;

const AFTER_HELP: &str = "\
Examples (against `presence-gateway --dev --jwt-secret s --listen 127.0.0.1:8080`):
  presence-loadtest idle  --jwt-secret s -n 2000 --rate 1000 --hold 10 --gateway-pid PID
  presence-loadtest churn --jwt-secret s -k 50 --duration 10 --lifetime-ms 3000
  presence-loadtest storm --jwt-secret s --users 1000 --rate 5000 --duration 10
  presence-loadtest fanout --jwt-secret s --groups 10 --members 20 --rate 200
  presence-loadtest private --jwt-secret s --users 200 --rate 1000
  presence-loadtest idle --jwt-secret s -n 60000 --source-ips 127.0.0.1-127.0.0.4 \\
      --url ws://127.0.0.1:8080/ws --url ws://127.0.0.1:8081/ws --report idle.json

Groups are closed by default on the gateway: before any member joins, `fanout` opens each of its
groups over the gateway's REST API (`PUT /v1/groups/{group}` with `{\"join\":\"open\"}`) with
`--api-key` (default `dev`, the key of a `--dev` gateway; for a gateway started with
`--api-key KEY` or `PRESENCE_API_KEY=KEY`, pass the same key). A wrong key stops the run (exit 2).

Exit codes: 0 the run measured what it should; 1 it could not (no connection succeeded, a
worker failed or timed out); 2 bad options or setup error; 3 the gateway answered `unavailable`
for something the scenario needs (e.g. messaging not enabled).";

/// Load-test tool for the presence gateway.
///
/// Every scenario is bounded in time and in count and stops by itself. Targets must be loopback
/// (127.0.0.0/8, localhost, ::1) unless `--allow-remote` is given; `wss://` URLs speak TLS.
/// Tokens are HS256 JWTs minted locally from `--jwt-secret`. Runs that need more sockets than
/// `--per-process` re-execute this binary as several worker processes and merge their results.
///
/// Run `presence-loadtest <SCENARIO> --help` for the options of a scenario.
#[derive(Parser, Debug)]
#[command(name = "presence-loadtest", version, about, long_about, after_long_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Ramp to N idle connections at a given connect rate, hold them, and report connect latency,
    /// failures, the achieved rate and each gateway's memory per connection.
    Idle(IdleArgs),
    /// K clients per second connect and disconnect while observers subscribe to them; report
    /// presence propagation latency (online and offline) and missing or duplicate events.
    Churn(ChurnArgs),
    /// G groups of M members; senders send to their group at a target total rate; report delivery
    /// latency, deliveries per second, loss and duplicates. The groups are opened first over the
    /// gateway's REST API with `--api-key`; members then `join` them over the WebSocket.
    Fanout(FanoutArgs),
    /// Pairs of users send private messages to each other (across nodes when several URLs are
    /// given); report delivery latency, deliveries per second, loss and duplicates.
    Private(PrivateArgs),
    /// Many connected users change status (online/away/busy) at a target rate; report presence
    /// changes flushed per second and backend round trips per change from `/metrics`.
    Storm(StormArgs),
    /// Internal: one worker process of a multi-process run (JSON events on stdout).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// Frame encoding of the client connections.
#[derive(ValueEnum, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Binary MessagePack frames (`presence.v1.msgpack`).
    Msgpack,
    /// Text JSON frames (`presence.v1.json`).
    Json,
}

impl Format {
    pub fn encoding(self) -> Encoding {
        match self {
            Format::Msgpack => Encoding::MsgPack,
            Format::Json => Encoding::Json,
        }
    }
}

/// Options every scenario takes.
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
pub struct CommonArgs {
    /// Gateway WebSocket URL (`ws://host:port/ws`, or `wss://` through a load balancer that
    /// terminates TLS); repeat for several nodes, clients are spread over them round-robin. Only
    /// loopback hosts are accepted unless `--allow-remote`. Each node's `/metrics` is read from the
    /// same host and port (plain HTTP, also for `wss://` URLs).
    #[arg(
        long = "url",
        value_name = "URL",
        default_value = "ws://127.0.0.1:8080/ws"
    )]
    pub urls: Vec<String>,

    /// Accept non-loopback `--url` hosts (a real deployment). Without it every other host is
    /// refused. Load only what you run, or are allowed to test.
    #[arg(long)]
    #[serde(default)]
    pub allow_remote: bool,

    /// PEM file of CA certificates to trust for `wss://` URLs, besides the system's store (a
    /// load balancer with a private or self-signed certificate).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub ca_file: Option<PathBuf>,

    /// HS256 secret the gateway checks JWTs with (the gateway's `--jwt-secret`). Tokens are minted
    /// locally with claims `sub`, `platform` and `exp`.
    #[arg(long, env = "PRESENCE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,

    /// API key of the gateway's `/v1` REST API (the gateway's `--api-key`; `dev` is the key of a
    /// `presence-gateway --dev` that has none). Groups are closed by default, so scenarios whose
    /// members join groups (`fanout`) first open each group with it (`PUT /v1/groups/{group}`,
    /// `{"join":"open"}`, on the first `--url`'s host and port); a 401 or any other non-2xx
    /// answer stops the run. Kept out of the report and the worker processes.
    #[arg(
        long,
        env = "PRESENCE_API_KEY",
        hide_env_values = true,
        value_name = "KEY",
        default_value = "dev"
    )]
    #[serde(skip)]
    pub api_key: String,

    /// Frame encoding.
    #[arg(long, value_enum, default_value_t = Format::Msgpack)]
    pub format: Format,

    /// Select the encoding with `?format=` on the URL instead of a WebSocket subprotocol.
    #[arg(long)]
    pub format_in_query: bool,

    /// Loopback source addresses client sockets are bound to, round-robin: a range
    /// (`127.0.0.1-127.0.0.20`), a count (`20` = 127.0.0.1 to 127.0.0.20) or a comma list. Each
    /// address holds up to about 27,000 connections to each `--url` (the ephemeral port is chosen
    /// at connect time, so only the address/port 4-tuple has to be free).
    #[arg(long, value_name = "IPS", default_value = "127.0.0.1")]
    pub source_ips: String,

    /// Most sockets one process holds; a run that needs more starts several worker processes.
    #[arg(long, value_name = "N", default_value_t = 15_000,
          value_parser = clap::value_parser!(u64).range(10..=19_000))]
    pub per_process: u64,

    /// Worker threads of each process's runtime; 1 runs tokio's single-threaded runtime (no
    /// wake-ups across threads: cheaper per delivery, and the right choice for a process pinned
    /// to one core, e.g. with `taskset -c`), 0 takes one per core.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=256))]
    #[serde(default)]
    pub threads: u16,

    /// Prefix of every user and group id of the run (default: unique per run, `lt` + time).
    #[arg(long)]
    pub prefix: Option<String>,

    /// Platform claim of every token (1 to 8); by default platforms cycle through 1 to 8.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=8))]
    pub platform: Option<u8>,

    /// Lifetime of the minted tokens, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(60..=86_400))]
    pub token_ttl_secs: u64,

    /// Longest wait for one connection (TCP, upgrade and `welcome`), in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub connect_timeout_ms: u64,

    /// Write a JSON report with every figure and the exact command line (the JWT secret
    /// redacted) to this file.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// No progress bar (it is also hidden when stdout is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
}

/// `idle`: how many connections, at what connect rate, at what memory.
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Connections to open in all (one user each).
    #[arg(long, short = 'n', default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub connections: u64,

    /// Target connect rate, connections per second, over all URLs and processes.
    #[arg(long, value_name = "PER_SEC", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,

    /// Seconds to hold the connections open after the ramp.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub hold: u64,

    /// Gateway process id whose VmRSS (/proc/PID/status) is read before the ramp, after it and at
    /// the end of the hold; repeat in the order of `--url` to get memory per connection per node.
    #[arg(long = "gateway-pid", value_name = "PID")]
    pub gateway_pids: Vec<u32>,

    /// Pause after the ramp before memory and connection counts are read, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub settle_ms: u64,
}

/// `churn`: presence propagation latency.
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Clients that connect per second (each a new user), over all URLs and processes.
    #[arg(long, short = 'k', value_name = "PER_SEC", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub clients_per_sec: u64,

    /// Seconds during which clients keep arriving; the run makes `clients-per-sec × duration`
    /// clients in all.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,

    /// How long each client stays connected, in milliseconds. Keep it above the gateway's batch
    /// interval (default 1 s): a connect and a disconnect inside one batch cancel out and no
    /// event is sent (flap suppression), which this tool counts as missing.
    #[arg(long, value_name = "MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub lifetime_ms: u64,

    /// Observer connections that watch each churning user.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub watchers: u64,

    /// Users one observer connection subscribes to (the gateway allows at most 1,000).
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub users_per_observer: u64,

    /// Wait after the last disconnect for late events, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(0..=120_000))]
    pub drain_ms: u64,
}

/// Options of the two messaging scenarios.
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
pub struct MessagingArgs {
    /// Target send rate, messages per second over all senders and processes.
    #[arg(long, value_name = "PER_SEC", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub rate: u64,

    /// Seconds of sending.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,

    /// Padding added to each message body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub body_bytes: u64,

    /// Connect rate of the setup phase, connections per second.
    #[arg(long, value_name = "PER_SEC", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub connect_rate: u64,

    /// Wait after the last send for deliveries in flight, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(0..=120_000))]
    pub drain_ms: u64,
}

/// `fanout`: group messaging.
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Groups.
    #[arg(long, short = 'g', default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub groups: u64,

    /// Members per group, one connection each; members of a group are spread over the URLs.
    #[arg(long, short = 'm', default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(2..=100_000))]
    pub members: u64,

    /// Members of each group that send (the first ones); the total rate is split over them all.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub senders_per_group: u64,

    #[command(flatten)]
    pub messaging: MessagingArgs,
}

/// `private`: user-to-user messages.
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
pub struct PrivateArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Users, one connection each, in pairs that message each other (rounded up to even). With
    /// several URLs the two users of a pair sit on different nodes.
    #[arg(long, short = 'u', default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(2..=1_000_000))]
    pub users: u64,

    #[command(flatten)]
    pub messaging: MessagingArgs,
}

/// `storm`: presence write throughput.
#[derive(Args, Serialize, Deserialize, Debug, Clone)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Connected users that change status.
    #[arg(long, short = 'u', default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub users: u64,

    /// Target status changes per second over all users (each user cycles away, busy, online).
    /// The gateway limits each connection to 200 frames/s by default.
    #[arg(long, value_name = "PER_SEC", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rate: u64,

    /// Seconds of status changes.
    #[arg(long, value_name = "SECS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,

    /// Connect rate of the setup phase, connections per second.
    #[arg(long, value_name = "PER_SEC", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub connect_rate: u64,

    /// Wait for the gateway to flush before `/metrics` is read (before the storm and after it),
    /// in milliseconds; keep it above the gateway's batch interval.
    #[arg(long, value_name = "MS", default_value_t = 2500,
          value_parser = clap::value_parser!(u64).range(0..=120_000))]
    pub flush_wait_ms: u64,
}

/// The hidden `worker` subcommand.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// The worker's assignment, as JSON.
    #[arg(long)]
    pub spec: String,
}
