//! Starts what the tests need: gateway nodes, as processes of the built binary or in the test
//! process (`inproc.rs`), and redis-server instances or a local Redis Cluster on free ports. Every
//! process is a child of the test and is killed and waited for when its handle drops; an
//! in-process node is told to shut down.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use crate::inproc::InProcess;

pub const API_KEY: &str = "test-key";
pub const JWT_SECRET: &str = "test-jwt-secret";

/// Which backend a node runs on.
#[derive(Clone, Debug)]
pub enum Backend {
    Embedded,
    Redis(String),
    Cluster(Vec<String>),
}

/// A gateway node on an ephemeral port: the real binary, or `gateway::serve` in this process.
pub struct Node {
    child: Option<Child>,
    in_process: Option<InProcess>,
    pub addr: SocketAddr,
    pub id: String,
    logs: Arc<Mutex<Vec<String>>>,
}

pub struct NodeBuilder {
    args: Vec<String>,
    id: String,
    in_process: bool,
}

impl NodeBuilder {
    pub fn new(backend: &Backend) -> Self {
        let id = format!("node-{:08x}", rand::random::<u32>());
        let mut args: Vec<String> = [
            "--listen=127.0.0.1:0",
            "--log-format=json",
            "--log=info,gateway=debug",
            "--batch-interval-ms=50",
            "--shards=3",
            "--shutdown-grace-secs=5",
            // Tests that drain set their own delay and spread (drain.rs).
            "--drain-delay-secs=0",
            "--drain-spread-secs=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--api-key={API_KEY}"));
        args.push(format!("--jwt-secret={JWT_SECRET}"));
        args.push(format!("--node-id={id}"));
        match backend {
            Backend::Embedded => {}
            Backend::Redis(url) => args.push(format!("--redis-url={url}")),
            Backend::Cluster(seeds) => args.push(format!("--redis-cluster={}", seeds.join(","))),
        }
        NodeBuilder {
            args,
            id,
            in_process: false,
        }
    }

    /// Runs under `id` instead of a fresh one: a node restarted after a crash keeps its id.
    pub fn with_id(mut self, id: &str) -> Self {
        self.id = id.to_string();
        self.args.push(format!("--node-id={id}"));
        self
    }

    /// Starts the node in this process instead of as a child process.
    pub fn in_process(mut self) -> Self {
        self.in_process = true;
        self
    }

    /// Adds or overrides a flag (`--name=value`; later flags win).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Starts the node; returns once it listens (an in-process node may still be building: its
    /// first connections wait in the listen backlog).
    pub fn start(self) -> Node {
        if self.in_process {
            return self.start_in_process();
        }
        let binary = env!("CARGO_BIN_EXE_presence-gateway");
        let mut child = Command::new(binary)
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start presence-gateway");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let logs = logs.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if line.contains("\"listening\"") {
                        let _ = tx.send(line.clone());
                    }
                    logs.lock().expect("log lock").push(line);
                }
            });
        }
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "gateway did not start; its output:\n{}",
                    logs.lock().expect("log lock").join("\n")
                );
            }
        };
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        let addr = parsed["fields"]["addr"]
            .as_str()
            .expect("addr field")
            .parse()
            .expect("socket address");
        Node {
            child: Some(child),
            in_process: None,
            addr,
            id: self.id,
            logs,
        }
    }

    /// The same flags, parsed as `main` parses them (without the environment), served by
    /// `gateway::serve` in a task of the current runtime.
    fn start_in_process(self) -> Node {
        let argv = std::iter::once("presence-gateway".to_string()).chain(self.args);
        let config = gateway::Config::try_parse_from_env(argv, |_| None).expect("node flags");
        let node = crate::inproc::serve(config).expect("serve in process");
        Node {
            child: None,
            addr: node.addr,
            in_process: Some(node),
            id: self.id,
            logs: Arc::default(),
        }
    }
}

impl Node {
    pub fn http(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// What a process node printed; nothing for an in-process node (it logs to the test's
    /// tracing subscriber, when there is one).
    pub fn logs(&self) -> String {
        self.logs.lock().expect("log lock").join("\n")
    }

    /// SIGKILL: the node dies without a word. Process nodes only.
    pub fn kill(&mut self) {
        assert!(
            self.in_process.is_none(),
            "an in-process node cannot be killed"
        );
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Shuts the node down as SIGTERM does and waits for it; true when it ended cleanly.
    pub async fn shut_down(mut self) -> bool {
        match self.in_process.take() {
            Some(node) => node.stop().await.is_ok(),
            None => tokio::task::spawn_blocking(move || self.terminate())
                .await
                .unwrap_or(false),
        }
    }

    /// SIGTERM, then waits for the node to drain and exit; returns its exit success. Process
    /// nodes only (see [`Node::shut_down`]).
    pub fn terminate(&mut self) -> bool {
        self.terminate_within(Duration::from_secs(15))
    }

    /// [`Node::terminate`], waiting up to `patience` for the drain (a long drain delay and spread).
    pub fn terminate_within(&mut self, patience: Duration) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        signal(child.id(), "-TERM");
        let deadline = Instant::now() + patience;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    }

    /// The value of one metric line (summed over label sets), from `/metrics`.
    /// Resident memory of a process node, in bytes (`VmRSS`).
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().expect("a process node").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(format!("{}/metrics", self.http()))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        metric_sum(&text, name)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // An in-process node's own drop cancels its shutdown token.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sums every sample of `name` in a Prometheus text page.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
}

/// A free TCP port on 127.0.0.1 below 55535 (cluster bus ports are port + 10000).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + (rand::random::<u16>() % 35_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port found");
}

/// A redis-server of our own, on a free port, keeping nothing on disk (unless `persistent`).
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    mode: RedisMode,
}

/// How a server runs; a restart keeps it.
#[derive(Clone, Copy, Debug, Default)]
struct RedisMode {
    /// A cluster member with this `cluster-node-timeout` (ms).
    cluster_timeout_ms: Option<u64>,
    /// An append-only file synced on every write, so a SIGKILL loses nothing acknowledged.
    persistent: bool,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_mode(free_port(), RedisMode::default())
    }

    /// A server whose data survives [`Redis::kill_and_restart`] (AOF, fsync always).
    pub fn start_persistent() -> Redis {
        let mode = RedisMode {
            persistent: true,
            ..RedisMode::default()
        };
        Self::start_mode(free_port(), mode)
    }

    fn start_mode(port: u16, mode: RedisMode) -> Redis {
        let dir =
            std::env::temp_dir().join(format!("presence-redis-{port}-{}", rand::random::<u32>()));
        Self::start_in(port, mode, dir)
    }

    fn start_in(port: u16, mode: RedisMode, dir: PathBuf) -> Redis {
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut cmd = Command::new("redis-server");
        let aof = if mode.persistent { "yes" } else { "no" };
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", aof])
            .args(["--appendfsync", "always"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(timeout) = mode.cluster_timeout_ms {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(dir.join("nodes.conf"))
                .args(["--cluster-node-timeout", &timeout.to_string()]);
        }
        let child = cmd
            .spawn()
            .expect("start redis-server (is the redis-server package installed?)");
        let redis = Redis {
            child: Some(child),
            port,
            dir,
            mode,
        };
        redis.wait_ready();
        redis
    }

    fn wait_ready(&self) {
        // Generous: six tests at a time start a dozen servers at once on two cores.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on {} did not start", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs a redis-cli command against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the server (SIGKILL): everything in it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, commands wait unanswered, as in a
    /// long stall; [`Redis::resume`] lets it run them.
    pub fn pause(&self) {
        if let Some(child) = &self.child {
            signal(child.id(), "-STOP");
        }
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        if let Some(child) = &self.child {
            signal(child.id(), "-CONT");
        }
    }

    /// Starts a fresh, empty server on the same port.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        let fresh = Redis::start_mode(self.port, self.mode);
        *self = fresh;
    }

    /// SIGKILL, then a new server on the same port and directory: a persistent server comes back
    /// with everything it acknowledged, any other empty.
    pub fn kill_and_restart(&mut self) {
        self.stop();
        let dir = std::mem::take(&mut self.dir);
        let fresh = Redis::start_in(self.port, self.mode, dir);
        *self = fresh;
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs the server ahead of other work on a shared machine, so that it is not preempted
    /// mid-command as often: `nice -10`, or with `realtime` the FIFO real-time class (the kernel
    /// still leaves others 5% of each second). Root only; false if refused.
    pub fn prefer(&self, realtime: bool) -> bool {
        let Some(child) = &self.child else {
            return false;
        };
        let pid = child.id().to_string();
        let mut cmd = if realtime {
            let mut c = Command::new("chrt");
            c.args(["-a", "-f", "-p", "10", &pid]);
            c
        } else {
            let mut c = Command::new("renice");
            c.args(["-n", "-10", "-p", &pid]);
            c
        };
        cmd.output().is_ok_and(|o| o.status.success())
    }

    /// Pins the server to the machine's last core and this test process (every thread) to the
    /// others, as production gives Redis a core of its own. Returns Redis's core; `None` on one
    /// core or if refused. (Ask here: once pinned, this process sees only its own cores.)
    pub fn pin_apart(&self) -> Option<usize> {
        let child = self.child.as_ref()?;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        if cores < 2 {
            return None;
        }
        let last = (cores - 1).to_string();
        let others = format!("0-{}", cores - 2);
        let taskset = |cpus: &str, pid: &str| {
            Command::new("taskset")
                .args(["-a", "-c", "-p", cpus, pid])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        (taskset(&last, &child.id().to_string())
            && taskset(&others, &std::process::id().to_string()))
        .then_some(cores - 1)
    }

    /// Calls of `command` in `INFO commandstats` (e.g. `evalsha`).
    pub fn command_calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A local Redis Cluster of three masters, optionally with one replica each.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::create(0, 2000)
    }

    /// Three masters and three replicas; a replica takes over `node_timeout_ms` (plus an election)
    /// after its master stops answering.
    pub fn start_with_replicas(node_timeout_ms: u64) -> RedisCluster {
        Self::create(1, node_timeout_ms)
    }

    fn create(replicas: usize, node_timeout_ms: u64) -> RedisCluster {
        let mode = RedisMode {
            cluster_timeout_ms: Some(node_timeout_ms),
            persistent: false,
        };
        let nodes: Vec<Redis> = (0..3 * (1 + replicas))
            .map(|_| Redis::start_mode(free_port(), mode))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_healthy(3, replicas * 3);
        cluster
    }

    /// (masters, replicas with a live link to their master) among running members, by port.
    fn roles(&self) -> (Vec<u16>, Vec<u16>) {
        let (mut masters, mut replicas) = (Vec::new(), Vec::new());
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let info = node.cli(&["INFO", "replication"]);
            if info.contains("role:master") {
                masters.push(node.port);
            } else if info.contains("master_link_status:up") {
                replicas.push(node.port);
            }
        }
        (masters, replicas)
    }

    /// Waits until every running member says `cluster_state:ok`, `masters` members are masters
    /// and `replicas` replicas are in sync.
    pub fn wait_healthy(&self, masters: usize, replicas: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|n| n.is_running())
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let (m, r) = self.roles();
            if ok && m.len() == masters && r.len() >= replicas {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not healthy: masters {m:?}, synced replicas {r:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The port of the master serving `key`'s slot now, from a running member's `CLUSTER NODES`.
    pub fn owner_of(&self, key: &str) -> u16 {
        let node = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .expect("a running member");
        let slot: u16 = node
            .cli(&["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT");
        let nodes = node.cli(&["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                let port = fields[1]
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("member address");
                return port;
            }
        }
        panic!("no master serves slot {slot}:\n{nodes}");
    }

    /// SIGKILLs the master on `port`; its replica takes over after the node timeout.
    pub fn kill(&mut self, port: u16) {
        if let Some(node) = self.nodes.iter_mut().find(|n| n.port == port) {
            node.stop();
        }
    }

    /// Every member, masters and replicas: a node may start from any of them.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }
}
