//! What the machine and the redis-server process did during a scale run, sampled every 100 ms,
//! so that each SLOWLOG entry can be printed beside what coincided with it. SLOWLOG measures wall
//! time: a command that was not running on a CPU for part of it (the vCPU frozen, a spin on a
//! kernel lock, a page fault the hypervisor serves) is logged as slow although it cost nothing
//! more. The run cannot see the hypervisor, only its traces in the guest:
//! - the kernel's memory init. A guest booted with `deferred_init=lazy` (this sandbox's VMs) has
//!   struct pages for only part of its memory initialized; when the initialized free pages run
//!   out, whichever process allocates next initializes another 128 MiB section in
//!   `deferred_grow_zone`, about 4.5 ms with interrupts off, and every other CPU that allocates
//!   meanwhile spins on the same lock. `managed` pages in /proc/zoneinfo grow by a section each
//!   time;
//! - page faults of the Redis process (first touches of memory), its main thread's involuntary
//!   context switches and time spent runnable but waiting (schedstat), and the vCPUs' steal time;
//! - Redis's own key count (DBSIZE at each second), for the hash tables' doubling at 2^n keys;
//! - [`CoreProbe`]: when Redis's core itself was unavailable, to the µs; [`SlowlogWatch`]: when
//!   each SLOWLOG entry was logged, to 10 ms (SLOWLOG keeps whole seconds).

use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Every 100 ms: /proc; every 10th also Redis's `INFO`.
const EVERY: Duration = Duration::from_millis(100);

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub at_ms: u64,
    /// Sum of `managed` over the zones of /proc/zoneinfo, in pages.
    pub managed_pages: u64,
    /// Steal time per CPU, in USER_HZ ticks (/proc/stat).
    pub steal: Vec<u64>,
    /// The redis-server process's minor and major page faults (all its threads).
    pub minflt: u64,
    pub majflt: u64,
    /// Its main thread's involuntary context switches and nanoseconds spent runnable but not
    /// running (the second field of schedstat).
    pub nvcsw: u64,
    pub run_delay_ns: u64,
    /// From `INFO` (each second): keys and keys with an expiry in db0, objects waiting to be
    /// freed in the background.
    pub info: Option<RedisInfo>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RedisInfo {
    pub keys: u64,
    pub expires: u64,
    pub lazyfree_pending: u64,
}

pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Sampler {
    /// Samples the machine and the redis-server `pid` (port `port`) until [`Sampler::stop`].
    pub fn start(pid: u32, port: u16) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut s = sample(pid);
                    if n.is_multiple_of(10) {
                        s.info = redis_info(port);
                    }
                    n += 1;
                    samples.lock().expect("samples").push(s);
                    std::thread::sleep(EVERY);
                }
            })
        };
        Sampler {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// The samples so far.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }

    pub fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.samples()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Managed pages over all zones.
fn managed_pages() -> u64 {
    read("/proc/zoneinfo")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("managed "))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

fn sample(pid: u32) -> Sample {
    let at_ms = unix_ms();
    let managed_pages = managed_pages();
    let steal = read("/proc/stat")
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .filter_map(|l| l.split_whitespace().nth(8)?.parse().ok())
        .collect();
    // /proc/<pid>/stat: the fields after the command's closing parenthesis, from state (3rd).
    let stat = read(&format!("/proc/{pid}/stat"));
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> u64 { fields.get(n - 3).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let status = read(&format!("/proc/{pid}/task/{pid}/status"));
    let nvcsw = status
        .lines()
        .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let run_delay_ns = read(&format!("/proc/{pid}/task/{pid}/schedstat"))
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Sample {
        at_ms,
        managed_pages,
        steal,
        minflt: field(10),
        majflt: field(12),
        nvcsw,
        run_delay_ns,
        info: None,
    }
}

fn redis_info(port: u16) -> Option<RedisInfo> {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", "keyspace", "memory"])
        .output()
        .ok()?;
    let info = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let db0 = info
        .lines()
        .find_map(|l| l.strip_prefix("db0:"))
        .unwrap_or("");
    let db0_field = |name: &str| -> u64 {
        db0.split(',')
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(RedisInfo {
        keys: db0_field("keys"),
        expires: db0_field("expires"),
        lazyfree_pending: field("lazyfree_pending_objects"),
    })
}

/// What changed between the last sample at or before `from_ms` and the first at or after `to_ms`.
#[derive(Debug, Default)]
pub struct Window {
    /// Sections the kernel initialized (128 MiB each, 32,768 pages).
    pub grown_mib: u64,
    pub minflt: u64,
    pub majflt: u64,
    pub nvcsw: u64,
    pub run_delay_us: u64,
    /// Steal per CPU, in ms.
    pub steal_ms: Vec<u64>,
    /// Redis's keys and expires at the nearest `INFO` sample before, and after.
    pub keys: (u64, u64),
    pub expires: (u64, u64),
    pub lazyfree_pending: u64,
}

pub fn window(samples: &[Sample], from_ms: u64, to_ms: u64) -> Window {
    let Some(first) = samples.iter().rev().find(|s| s.at_ms <= from_ms) else {
        return Window::default();
    };
    let Some(last) = samples.iter().find(|s| s.at_ms >= to_ms).or(samples.last()) else {
        return Window::default();
    };
    let before = samples
        .iter()
        .rev()
        .filter(|s| s.at_ms <= from_ms)
        .find_map(|s| s.info);
    let after = samples
        .iter()
        .filter(|s| s.at_ms >= to_ms)
        .find_map(|s| s.info)
        .or(before);
    let (before, after) = (before.unwrap_or_default(), after.unwrap_or_default());
    let tick_ms = 1000 / clock_ticks();
    Window {
        grown_mib: last.managed_pages.saturating_sub(first.managed_pages) * 4 / 1024,
        minflt: last.minflt.saturating_sub(first.minflt),
        majflt: last.majflt.saturating_sub(first.majflt),
        nvcsw: last.nvcsw.saturating_sub(first.nvcsw),
        run_delay_us: last.run_delay_ns.saturating_sub(first.run_delay_ns) / 1000,
        steal_ms: last
            .steal
            .iter()
            .zip(&first.steal)
            .map(|(a, b)| a.saturating_sub(*b) * tick_ms)
            .collect(),
        keys: (before.keys, after.keys),
        expires: (before.expires, after.expires),
        lazyfree_pending: before.lazyfree_pending.max(after.lazyfree_pending),
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let crossed = |(a, b): (u64, u64)| {
            (a..=b)
                .find(|n| n.is_power_of_two() && *n > 1 << 10)
                .map_or(String::new(), |p| {
                    format!(" (crosses 2^{})", p.trailing_zeros())
                })
        };
        write!(
            f,
            "kernel memory init {} MiB, Redis page faults {} minor {} major, main thread {} involuntary switches {} us runnable-waiting, steal ms per CPU {:?}, keys {}..{}{}, expires {}..{}{}, lazyfree pending {}",
            self.grown_mib,
            self.minflt,
            self.majflt,
            self.nvcsw,
            self.run_delay_us,
            self.steal_ms,
            self.keys.0,
            self.keys.1,
            crossed(self.keys),
            self.expires.0,
            self.expires.1,
            crossed(self.expires),
            self.lazyfree_pending
        )
    }
}

/// USER_HZ: ticks per second of /proc/stat (100 on Linux everywhere this runs).
fn clock_ticks() -> u64 {
    100
}

/// The whole run in the same terms, for the totals line.
pub fn totals(samples: &[Sample]) -> Window {
    match (samples.first(), samples.last()) {
        (Some(a), Some(b)) => window(samples, a.at_ms, b.at_ms),
        _ => Window::default(),
    }
}

/// The kernel's boot options ask for memory to be initialized as it is first needed.
pub fn lazy_memory_init() -> bool {
    read("/proc/cmdline")
        .split_whitespace()
        .any(|o| o == "deferred_init=lazy")
}

/// A thread pinned to Redis's core at a real-time priority above Redis's (FIFO 20; the strict run
/// gives Redis FIFO 10), waking every [`PROBE_PERIOD`] and noting how late it woke. Nothing in
/// the guest can keep a FIFO 20 thread off its core for long but interrupts-off kernel work
/// (`deferred_grow_zone` above) or the hypervisor not running the vCPU at all, so a late wake-up
/// is time in which Redis could not run either: a command in progress then is logged slower than
/// it was by about that much. It costs Redis a few µs per wake-up (about 1% of its core).
pub struct CoreProbe {
    stalls: Arc<Mutex<Vec<Stall>>>,
    wakeups: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Whether the thread got its core and priority (root only).
    pub placed: bool,
}

/// A late wake-up of the probe: when it woke (unix µs) and how late (µs).
#[derive(Clone, Copy, Debug)]
pub struct Stall {
    pub at_us: u64,
    pub late_us: u64,
}

/// The probe's period: a stall shorter than this can fall between two wake-ups, and one that
/// covers a wake-up is seen at most this much shorter than it was.
pub const PROBE_PERIOD: Duration = Duration::from_micros(250);
/// Late wake-ups below this are not noted (timer and wake-up costs of a VM).
const PROBE_NOTE: Duration = Duration::from_micros(150);

pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl CoreProbe {
    pub fn start(core: usize) -> CoreProbe {
        let stalls = Arc::new(Mutex::new(Vec::new()));
        let wakeups = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (placed_tx, placed_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stalls, wakeups, stop) = (stalls.clone(), wakeups.clone(), stop.clone());
            std::thread::spawn(move || {
                let tid = std::fs::read_link("/proc/thread-self")
                    .ok()
                    .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok());
                let run = |cmd: &str, args: &[&str]| {
                    Command::new(cmd)
                        .args(args)
                        .output()
                        .is_ok_and(|o| o.status.success())
                };
                let placed = tid.is_some_and(|tid| {
                    let (tid, core) = (tid.to_string(), core.to_string());
                    run("taskset", &["-c", "-p", &core, &tid])
                        && run("chrt", &["-f", "-p", "20", &tid])
                });
                let _ = placed_tx.send(placed);
                let started = std::time::Instant::now();
                let mut next = started + PROBE_PERIOD;
                while !stop.load(Ordering::Relaxed) {
                    let now = std::time::Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    let woke = std::time::Instant::now();
                    let late = woke.saturating_duration_since(next);
                    wakeups.fetch_add(1, Ordering::Relaxed);
                    if late >= PROBE_NOTE {
                        stalls.lock().expect("stalls").push(Stall {
                            at_us: unix_us(),
                            late_us: late.as_micros() as u64,
                        });
                    }
                    // The next deadline from now: a long stall is one late wake-up, not many.
                    next = woke + PROBE_PERIOD;
                }
            })
        };
        let placed = placed_rx.recv().unwrap_or(false);
        CoreProbe {
            stalls,
            wakeups,
            stop,
            thread: Some(thread),
            placed,
        }
    }

    /// The late wake-ups noted, and how many wake-ups in all.
    pub fn stop(mut self) -> (Vec<Stall>, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let stalls = self.stalls.lock().expect("stalls").clone();
        (stalls, self.wakeups.load(Ordering::Relaxed))
    }
}

impl Drop for CoreProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Polls `SLOWLOG LEN` every 10 ms over a connection of its own, so that the n-th entry since the
/// reset is known to have been logged between two polls (SLOWLOG itself keeps whole seconds).
pub struct SlowlogWatch {
    polls: Arc<Mutex<Vec<(u64, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SlowlogWatch {
    pub fn start(port: u16) -> SlowlogWatch {
        let polls = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (polls, stop) = (polls.clone(), stop.clone());
            std::thread::spawn(move || {
                use std::io::{BufRead, BufReader, Write};
                let Ok(conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                    return;
                };
                let _ = conn.set_nodelay(true);
                let Ok(mut writer) = conn.try_clone() else {
                    return;
                };
                let mut reader = BufReader::new(conn);
                let mut line = String::new();
                while !stop.load(Ordering::Relaxed) {
                    if writer
                        .write_all(b"*2\r\n$7\r\nSLOWLOG\r\n$3\r\nLEN\r\n")
                        .is_err()
                    {
                        return;
                    }
                    line.clear();
                    if reader.read_line(&mut line).is_err() {
                        return;
                    }
                    if let Some(n) = line.trim().strip_prefix(':').and_then(|n| n.parse().ok()) {
                        polls.lock().expect("polls").push((unix_us(), n));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        };
        SlowlogWatch {
            polls,
            stop,
            thread: Some(thread),
        }
    }

    /// (unix µs of the poll, SLOWLOG LEN then), in order.
    pub fn stop(mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.polls.lock().expect("polls").clone()
    }
}

impl Drop for SlowlogWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// When the `n`-th SLOWLOG entry since the reset (0-based) was logged: after the last poll that
/// saw at most `n` entries and at or before the first that saw more (unix µs).
pub fn logged_between(polls: &[(u64, u64)], n: u64) -> Option<(u64, u64)> {
    let first_after = polls.iter().position(|(_, len)| *len > n)?;
    let before = first_after
        .checked_sub(1)
        .map_or(polls[first_after].0, |i| polls[i].0);
    Some((before, polls[first_after].0))
}

/// The probe's late wake-ups within `[from_us, to_us]`, in µs of lateness.
pub fn stalls_within(stalls: &[Stall], from_us: u64, to_us: u64) -> Vec<u64> {
    stalls
        .iter()
        .filter(|s| s.at_us >= from_us && s.at_us <= to_us)
        .map(|s| s.late_us)
        .collect()
}
