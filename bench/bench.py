#!/usr/bin/env python3
"""The gateway's reference benchmark suite (called by bench/run.sh, i.e. `make bench`).

Starts a redis-server of its own (free port, no persistence, own --dir) and release-mode gateway
nodes on free loopback ports, runs the presence-loadtest scenarios at sizes a 2-core machine holds,
and writes one small JSON file per step under bench/results/ (the load tool's report plus the CPU
split between gateway, Redis, load tool and the rest of the machine over the measured phase).
Large raw logs (gateway logs, full reports, load-tool output) go to a directory under /tmp.

Every process started here is a child of this process and is stopped by PID (SIGTERM, then
SIGKILL) and waited for, on success, on failure and on SIGINT/SIGTERM.

Usage: bench/bench.py [--only GROUP[,GROUP...]]   (environment: BENCH_STORM_RATES, BENCH_STORM_USERS,
       BENCH_FANOUT_RATES, BENCH_FANOUT_ARGS, BENCH_IDLE_BIG=N,NODES, BENCH_QUIET_BUDGET,
       BENCH_QUIET_MAX_S, BENCH_TMP,
       BENCH_RESULTS, BENCH_RESULT_PREFIX, BENCH_PIN_SERVERS, BENCH_PIN_LOADTEST)
"""
import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where bench/run.sh's `cargo build --release` put them: cargo honours CARGO_TARGET_DIR (relative to
# the repo root, where run.sh runs it).
BIN = os.path.join(ROOT, os.environ.get('CARGO_TARGET_DIR') or 'target', 'release')
GATEWAY = os.path.join(BIN, 'presence-gateway')
LOADTEST = os.path.join(BIN, 'presence-loadtest')
# A run kept beside `make bench`'s files rather than over them: e.g. BENCH_RESULTS=bench/results/runs
# BENCH_RESULT_PREFIX=2026-11-30-topic- .
RESULTS = os.path.abspath(os.environ.get('BENCH_RESULTS') or os.path.join(ROOT, 'bench', 'results'))
RESULT_PREFIX = os.environ.get('BENCH_RESULT_PREFIX', '')
# `taskset -c` CPU lists (e.g. BENCH_PIN_SERVERS=0 BENCH_PIN_LOADTEST=1): the gateways and Redis on
# some cores, the load tool (and its worker processes, which inherit the mask) on others, so that
# on a small machine neither side's backlog is the other's scheduling delay. taskset execs the
# program, so the PIDs sampled below are still the programs' own.
PIN_SERVERS = os.environ.get('BENCH_PIN_SERVERS') or None
PIN_LOADTEST = os.environ.get('BENCH_PIN_LOADTEST') or None
# Throwaway credentials of the benchmark's own local nodes (loopback only, never deployed).
JWT_SECRET = 'bench-jwt-secret-local-only'
API_KEY = 'bench-api-key-local-only'
CLK_TCK = os.sysconf('SC_CLK_TCK')

T_START = time.time()


def log(*a):
    print(f'[bench {time.time() - T_START:6.1f}s]', *a, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------- processes we started
class Procs:
    """Every child process of the run, stopped by PID and waited for."""

    def __init__(self):
        self.live = []

    def start(self, name, argv, logfile, **kw):
        out = open(logfile, 'ab')
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        out.close()
        p.bench_name = name
        self.live.append(p)
        return p

    def stop(self, p, grace=10.0):
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
                p.wait()
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(reversed(self.live)):
            self.stop(p, grace=5.0)


PROCS = Procs()


def pinned(argv, cpus):
    return ['taskset', '-c', cpus, *argv] if cpus else argv


def on_signal(signum, _frame):
    log(f'signal {signum}: stopping everything this run started')
    PROCS.stop_all()
    sys.exit(128 + signum)


# ------------------------------------------------------------------------- CPU accounting
def proc_cpu(pid, children=False):
    """utime+stime (+ cutime+cstime of reaped children) of a process, in seconds; None if gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(')') + 2:].split()
    t = int(fields[11]) + int(fields[12])
    if children:
        t += int(fields[13]) + int(fields[14])
    return t / CLK_TCK


def descendants(pid):
    kids = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open(f'/proc/{d}/stat') as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(')') + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for k in kids.get(p, []):
            out.append(k)
            todo.append(k)
    return out


def scrape(port):
    """Counters (`*_total`) and histogram `_sum`/`_count` of one node's /metrics, by label set."""
    out = {}
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return out
    for line in text.splitlines():
        if not line or line.startswith('#'):
            continue
        m = re.match(r'^([a-z_]+)(\{[^}]*\})?\s+([0-9.eE+-]+|NaN)$', line)
        if not m:
            continue
        name = m.group(1)
        if not (name.endswith('_total') or name.endswith('_sum') or name.endswith('_count')):
            continue
        try:
            out[name + (m.group(2) or '')] = float(m.group(3))
        except ValueError:
            pass
    return out


def metric_deltas(before, after):
    """Non-zero changes of every counter, summed over nodes."""
    d = {}
    for b, a in zip(before, after):
        for k, v in a.items():
            x = v - b.get(k, 0.0)
            if x:
                d[k] = d.get(k, 0.0) + x
    return {k: round(v, 6) for k, v in sorted(d.items())}


def rustc_running():
    return subprocess.run(['pgrep', '-c', 'rustc'], capture_output=True, text=True).stdout.strip() or '0'


def machine_cpu():
    """Whole-machine busy seconds (all but idle and iowait) and softirq seconds, from /proc/stat."""
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6]  # user nice system irq softirq (not idle, iowait, steal)
    return busy / CLK_TCK, v[6] / CLK_TCK


class CpuSampler(threading.Thread):
    """Samples every 0.5 s: CPU seconds used so far by the gateways, Redis, the load tool (its
    coordinator, live workers and reaped workers) and the machine as a whole."""

    def __init__(self, gateways, redis_pid, loadtest_pid):
        super().__init__(daemon=True)
        self.gateways, self.redis_pid, self.lt = gateways, redis_pid, loadtest_pid
        self.samples = []
        self.stop_evt = threading.Event()
        self.gw_last = {}
        self.lt_kids_last = {}

    def sample(self):
        t = time.time()
        gw = 0.0
        for pid in self.gateways:
            c = proc_cpu(pid)
            if c is not None:
                self.gw_last[pid] = c
            gw += self.gw_last.get(pid, 0.0)
        redis = proc_cpu(self.redis_pid) or 0.0
        lt = proc_cpu(self.lt, children=True)
        if lt is not None:
            kids = 0.0
            for k in descendants(self.lt):
                c = proc_cpu(k)
                if c is not None:
                    kids += c
            lt += kids
        busy, softirq = machine_cpu()
        me = proc_cpu(os.getpid()) or 0.0
        self.samples.append({'t': t, 'gateway': gw, 'redis': redis, 'loadtest': lt, 'busy': busy,
                             'softirq': softirq, 'bench': me})

    def run(self):
        while not self.stop_evt.is_set():
            self.sample()
            self.stop_evt.wait(0.5)

    def finish(self):
        self.stop_evt.set()
        self.join()

    def split(self, t0, t1):
        """CPU seconds per role between wall times t0 and t1 (nearest samples inside)."""
        inside = [s for s in self.samples if t0 <= s['t'] <= t1 and s['loadtest'] is not None]
        if len(inside) < 2:
            return None
        a, b = inside[0], inside[-1]
        secs = b['t'] - a['t']
        d = {k: b[k] - a[k] for k in ('gateway', 'redis', 'loadtest', 'busy', 'softirq', 'bench')}
        other = d['busy'] - d['gateway'] - d['redis'] - d['loadtest'] - d['bench']
        r = {'window_s': round(secs, 2)}
        for k in ('gateway', 'redis', 'loadtest'):
            r[f'{k}_cpu_s'] = round(d[k], 2)
            r[f'{k}_cores'] = round(d[k] / secs, 2)
        r['machine_busy_cores'] = round(d['busy'] / secs, 2)
        r['softirq_cores'] = round(d['softirq'] / secs, 2)
        r['other_cores'] = round(other / secs, 2)  # softirq (loopback TCP) + processes not ours
        r['foreign_cores'] = round((other - d['softirq']) / secs, 2)  # processes not ours (e.g. compiles)
        return r


# ------------------------------------------------------------------------- the system under test
class Stack:
    def __init__(self, workdir):
        self.workdir = workdir
        self.redis = None
        self.redis_port = None
        self.nodes = []  # (port, Popen)

    def start_redis(self):
        self.redis_port = free_port()
        d = os.path.join(self.workdir, 'redis')
        os.makedirs(d, exist_ok=True)
        self.redis = PROCS.start('redis', pinned(['redis-server', '--port', str(self.redis_port), '--bind', '127.0.0.1',
                                           '--save', '', '--appendonly', 'no', '--dir', d,
                                           '--maxclients', '10000'], PIN_SERVERS),
                                 os.path.join(self.workdir, 'redis.log'))
        for _ in range(100):
            if self.redis.poll() is not None:
                raise RuntimeError(f'redis-server exited {self.redis.returncode}; see {self.workdir}/redis.log')
            r = subprocess.run(['redis-cli', '-p', str(self.redis_port), 'ping'], capture_output=True, text=True)
            if r.stdout.strip() == 'PONG':
                log(f'redis-server pid {self.redis.pid} on 127.0.0.1:{self.redis_port}')
                return
            time.sleep(0.1)
        raise RuntimeError('redis-server did not answer PING within 10 s')

    def flush_redis(self):
        subprocess.run(['redis-cli', '-p', str(self.redis_port), 'flushall'], capture_output=True, check=True)

    def start_nodes(self, count, extra=()):
        self.stop_nodes()
        self.flush_redis()
        for i in range(count):
            self.nodes.append(self.start_node(i, extra))
        log(f'{count} gateway node(s) ready: ' + ', '.join(f'pid {p.pid} :{port}' for port, p in self.nodes)
            + (f' ({" ".join(extra)})' if extra else ''))

    def start_node(self, i, extra, attempts=3):
        """Starts node i and waits for /readyz; a node that exits during start-up is started again
        (counted in STARTUP_RETRIES, see the gateway issue in docs/benchmarks.md)."""
        for attempt in range(1, attempts + 1):
            port = free_port()
            argv = [GATEWAY, '--listen', f'127.0.0.1:{port}', '--jwt-secret', JWT_SECRET, '--api-key', API_KEY,
                    '--redis-url', f'redis://127.0.0.1:{self.redis_port}', '--log-format', 'json',
                    '--log', 'warn', '--node-id', f'bench-{i}', '--shutdown-grace-secs', '5',
                    '--drain-delay-secs', '0', '--drain-spread-secs', '0',
                    # idle-38k holds 19,000 per node, above the default cap of 16,384 sessions; the
                    # cap plus the 512 sockets kept for probes stays under the 20,000 open files.
                    '--max-connections', str(MAX_CONNECTIONS), *extra]
            logfile = os.path.join(self.workdir, f'gateway-{i}-{port}.log')
            p = PROCS.start(f'gateway{i}', pinned(argv, PIN_SERVERS), logfile)
            deadline = time.time() + 25
            while p.poll() is None and time.time() < deadline:
                try:
                    with urllib.request.urlopen(f'http://127.0.0.1:{port}/readyz', timeout=2) as r:
                        if r.status == 200:
                            return port, p
                except Exception:
                    pass
                time.sleep(0.1)
            PROCS.stop(p)
            with open(logfile, errors='replace') as f:
                first = f.readline().strip()
            STARTUP_RETRIES.append({'node': i, 'attempt': attempt, 'exit_code': p.returncode, 'log': first[:200]})
            log(f'gateway {i} on {port} did not become ready (exit {p.returncode}: {first[:120]}); '
                f'attempt {attempt}/{attempts}')
        raise RuntimeError(f'gateway {i} did not start in {attempts} attempts; see {self.workdir}')

    def stop_nodes(self):
        for _, p in self.nodes:
            PROCS.stop(p)
        self.nodes = []

    def urls(self, k=None):
        nodes = self.nodes if k is None else self.nodes[:k]
        out = []
        for port, _ in nodes:
            out += ['--url', f'ws://127.0.0.1:{port}/ws']
        return out

    def pids(self, k=None):
        nodes = self.nodes if k is None else self.nodes[:k]
        return [p.pid for _, p in nodes]


# ------------------------------------------------------------------------- steps
def redact(argv):
    out, hide = [], False
    for a in argv:
        out.append('<secret>' if hide else a)
        hide = a in ('--jwt-secret', '--api-key')
    return out


def display_cmd(argv):
    # The same text whatever CARGO_TARGET_DIR is, so that runs compare line by line.
    return ' '.join(redact([os.path.join('target', 'release', os.path.relpath(a, BIN)) if a.startswith(BIN) else a
                            for a in argv]))


def write_result(name, doc):
    path = os.path.join(RESULTS, f'{RESULT_PREFIX}{name}.json')
    with open(path, 'w') as f:
        json.dump(doc, f, indent=1)
        f.write('\n')
    log(f'wrote {os.path.relpath(path, ROOT)} ({os.path.getsize(path)} bytes)')


QUIET = {'budget_s': float(os.environ.get('BENCH_QUIET_BUDGET', '90')), 'used_s': 0.0}
QUIET_MAX_S = float(os.environ.get('BENCH_QUIET_MAX_S', '16'))  # per step


def wait_quiet(stack, max_s=QUIET_MAX_S, threshold=0.3):
    """Waits (bounded per step and over the whole run) until processes that are not ours use less
    than `threshold` cores, measured over 2 s; returns what it saw."""
    ours = lambda: sum(proc_cpu(pid) or 0.0 for pid in [os.getpid(), stack.redis.pid] + stack.pids())
    waited = 0.0
    while True:
        b0, s0 = machine_cpu()
        o0 = ours()
        time.sleep(2.0)
        b1, s1 = machine_cpu()
        foreign = max(0.0, ((b1 - b0) - (s1 - s0) - (ours() - o0)) / 2.0)
        if foreign < threshold or waited >= max_s or QUIET['used_s'] >= QUIET['budget_s']:
            if waited:
                log(f'waited {waited:.0f} s for other processes to go quiet; foreign load now {foreign:.2f} cores')
            return {'waited_s': round(waited, 1), 'foreign_cores_before': round(foreign, 2)}
        if not waited:
            log(f'other processes use {foreign:.2f} cores; waiting (at most {max_s:.0f} s)')
        waited += 2.0
        QUIET['used_s'] += 2.0


def loadtest(stack, name, scenario, args, nodes, gateway_pids=(), timeout=180, meta=None):
    """Runs one presence-loadtest scenario against the first `nodes` nodes, samples CPU, writes
    bench/results/<name>.json. Returns the result document."""
    full = os.path.join(stack.workdir, f'{name}.report.json')
    # --api-key: the nodes' key (not `dev`), with which fanout opens its groups (closed by default).
    argv = [LOADTEST, scenario, '--jwt-secret', JWT_SECRET, '--api-key', API_KEY, '--quiet', '--report', full,
            *stack.urls(nodes), *args]
    for pid in gateway_pids:
        argv += ['--gateway-pid', str(pid)]
    quiet = wait_quiet(stack)
    log(f'{name}: {display_cmd(argv)}')
    ports = [port for port, _ in stack.nodes[:nodes]]
    m0 = [scrape(port) for port in ports]
    compiling = rustc_running()
    t0 = time.time()
    p = PROCS.start(f'loadtest-{name}', pinned(argv, PIN_LOADTEST), os.path.join(stack.workdir, f'{name}.out'))
    sampler = CpuSampler(stack.pids(nodes), stack.redis.pid, p.pid)
    sampler.start()
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f'{name}: no end within {timeout} s, stopping it')
        PROCS.stop(p)
        rc = None
    finally:
        sampler.finish()
        if p in PROCS.live:
            PROCS.live.remove(p)
    secs = time.time() - t0
    m1 = [scrape(port) for port in ports]
    report = None
    if os.path.exists(full):
        with open(full) as f:
            report = json.load(f)
    with open(os.path.join(stack.workdir, f'{name}.out')) as f:
        tail = f.read()[-3000:]
    doc = {'step': name, 'scenario': scenario, 'nodes': nodes, 'exit_code': rc, 'wall_s': round(secs, 1),
           'command': display_cmd(argv).replace(full, f'/tmp/.../{name}.report.json'),
           'gateway_flags': stack_flags(stack), 'rustc_processes_at_start': int(compiling), 'quiet_wait': quiet,
           'pinned_cpus': {'servers': PIN_SERVERS, 'loadtest': PIN_LOADTEST},
           **(meta or {})}
    if report:
        started = report['started_at_ms'] / 1000.0
        snaps = report.get('snapshots', {})
        a = snaps.get('after_setup') or {}
        b = snaps.get('after_run') or {}
        if 'at_ms' in a and 'at_ms' in b:
            doc['cpu_measured_phase'] = sampler.split(started + a['at_ms'] / 1000 - 0.3, started + b['at_ms'] / 1000 + 0.3)
            doc['cpu_setup_phase'] = sampler.split(started - 0.3, started + a['at_ms'] / 1000 + 0.3)
        doc['cpu_whole_run'] = sampler.split(t0 - 1, time.time() + 1)
        for k in ('ok', 'problems', 'warnings', 'setup_secs', 'run_secs', 'elapsed_secs', 'processes',
                  'figures', 'latency_ms', 'counters', 'error_samples'):
            doc[k] = report.get(k)
        received = (report.get('figures') or {}).get('received')
        cpu = doc.get('cpu_measured_phase')
        if received and cpu:
            # Every delivery of the run lands inside the measured phase (it ends after the drain).
            doc['cpu_us_per_delivery'] = {k: round(cpu[f'{k}_cpu_s'] * 1e6 / received, 3)
                                          for k in ('gateway', 'loadtest', 'redis')}
        if scenario == 'storm':
            # keep the storm's per-second series but not every /metrics snapshot
            doc['snapshots_kept'] = 'omitted (see figures.flush_series)'
        else:
            doc['snapshots'] = {k: v for k, v in snaps.items() if k != 'during'}
    else:
        doc['output_tail'] = tail
    doc['gateway_metric_deltas'] = metric_deltas(m0, m1)
    write_result(name, doc)
    if rc != 0:
        log(f'{name}: exit code {rc}; last output:\n{tail[-1500:]}')
    return doc


STORM_RATES = [int(x) for x in os.environ.get('BENCH_STORM_RATES', '10000,25000,50000,100000').split(',')]
STORM_USERS = int(os.environ.get('BENCH_STORM_USERS', '10000'))
STACK_FLAGS = {}
FANOUT_RATES = [int(x) for x in os.environ.get('BENCH_FANOUT_RATES', '25,100,200,400,800').split(',')]
# Private messages per second between 1,000 pairs on different nodes: a low rate, where every
# message pays each hop's wake-up, and a high one, where they batch.
PRIVATE_RATES = [int(x) for x in os.environ.get('BENCH_PRIVATE_RATES', '5000,50000').split(',')]
FANOUT_ARGS = shlex.split(os.environ.get('BENCH_FANOUT_ARGS', ''))  # e.g. '--per-process 250'
IDLE_BIG = tuple(int(x) for x in os.environ.get('BENCH_IDLE_BIG', '102000,6').split(','))
STARTUP_RETRIES = []
MAX_CONNECTIONS = 19400


def stack_flags(stack):
    return STACK_FLAGS.get('flags', [])


def nodes(stack, count, extra=()):
    stack.start_nodes(count, extra)
    STACK_FLAGS['flags'] = ['--log-format json', '--log warn', '--shutdown-grace-secs 5',
                           '--drain-delay-secs 0', '--drain-spread-secs 0',
                           f'--max-connections {MAX_CONNECTIONS}', *extra]


def step_redis_benchmark(stack):
    out = {}
    for pipe, n in ((16, 200000), (1, 50000)):
        argv = ['redis-benchmark', '-p', str(stack.redis_port), '-P', str(pipe), '-t', 'set,get', '-n', str(n), '-q']
        log('redis-benchmark: ' + ' '.join(argv))
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        text = r.stdout.replace('\r', '\n')
        for m in re.finditer(r'^(SET|GET): ([\d.]+) requests per second(?:, p50=([\d.]+) msec)?', text, re.M):
            out[f'{m.group(1).lower()}_per_s_P{pipe}'] = float(m.group(2))
            if m.group(3):
                out[f'{m.group(1).lower()}_p50_ms_P{pipe}'] = float(m.group(3))
        out[f'command_P{pipe}'] = ' '.join(argv).replace(str(stack.redis_port), 'PORT')
    stack.flush_redis()
    write_result('redis-benchmark', {'step': 'redis-benchmark', **out})


def step_sockpair():
    argv = [sys.executable, os.path.join(ROOT, 'bench', 'sockpair.py'), '9000']
    log('tcp socket pairs: ' + display_cmd(argv))
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    doc['command'] = 'python3 bench/sockpair.py 9000'
    write_result('tcp-socket-pairs', {'step': 'tcp-socket-pairs', **doc})


def sh(cmd):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    return (r.stdout or r.stderr).strip()


def step_machine():
    mem = {}
    for line in open('/proc/meminfo'):
        k, v = line.split(':', 1)
        mem[k] = int(v.split()[0])
    doc = {
        'step': 'machine',
        'date_utc': time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime()),
        'nproc': sh('nproc'),
        'cpu_model': sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip(),
        'mem_total_mib': mem['MemTotal'] // 1024,
        'mem_available_mib': mem['MemAvailable'] // 1024,
        'kernel': sh('uname -sr'),
        'redis': sh('redis-server --version'),
        'rustc': sh('rustc --version'),
        'node': sh('node --version'),
        'nofile_soft_hard': sh('ulimit -Sn; ulimit -Hn').replace('\n', '/'),
        'ip_local_port_range': sh('cat /proc/sys/net/ipv4/ip_local_port_range').replace('\t', '-'),
        'loadavg_at_start': sh('cat /proc/loadavg'),
        'rustc_processes_at_start': int(rustc_running()),
        'git_head': sh('git -C ' + ROOT + ' log -1 --format="%h %s"')[:120],
        'git_dirty_paths': sh('git -C ' + ROOT + ' status --short -- gateway shared loadtest Cargo.toml Cargo.lock | wc -l'),
        'commands': 'nproc; grep "model name" /proc/cpuinfo; grep MemTotal /proc/meminfo; uname -sr; '
                    'redis-server --version; rustc --version; node --version; ulimit -Hn',
    }
    write_result('machine', doc)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--only', help='comma-separated step groups: ref,idle,connect,churn,storm,fanout,private,idle100k')
    args = ap.parse_args()
    only = set(args.only.split(',')) if args.only else None
    want = lambda g: only is None or g in only

    for b in (GATEWAY, LOADTEST):
        if not os.access(b, os.X_OK):
            sys.exit(f'{b} missing: build with cargo build --release -p presence-gateway -p presence-loadtest')
    os.makedirs(RESULTS, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix='presence-bench.', dir=os.environ.get('BENCH_TMP', '/tmp'))
    log(f'raw logs and full reports: {workdir}')
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stack = Stack(workdir)
    failures = []

    def guarded(name, fn):
        try:
            fn()
        except Exception as e:  # one failed step must not lose the others
            log(f'{name} FAILED: {e!r}')
            failures.append(name)

    try:
        step_machine()
        stack.start_redis()
        if want('ref'):
            guarded('redis-benchmark', lambda: step_redis_benchmark(stack))
            guarded('sockpair', step_sockpair)

        ips4 = ['--source-ips', '127.0.0.1-127.0.0.24']  # few ports per address: bind() stays cheap
        if want('idle'):
            def idle():
                for n in (20000, 38000):
                    nodes(stack, 2)
                    loadtest(stack, f'idle-{n // 1000}k', 'idle',
                             ['-n', str(n), '--rate', '5000', '--hold', '10', '--settle-ms', '2000', *ips4],
                             2, gateway_pids=stack.pids(2), timeout=150)
            guarded('idle', idle)
        if want('idle100k'):
            def idle100k():
                n, k = IDLE_BIG
                nodes(stack, k)
                loadtest(stack, f'idle-{n // 1000}k-{k}nodes', 'idle',
                         ['-n', str(n), '--rate', '4000', '--hold', '10', '--settle-ms', '2000', '--per-process', '18000',
                          '--source-ips', '127.0.0.1-127.0.0.24'], k, gateway_pids=stack.pids(k), timeout=240)
            guarded('idle100k', idle100k)
        if want('connect'):
            def connect():
                nodes(stack, 1)
                loadtest(stack, 'connect-rate-1node', 'idle',
                         ['-n', '15000', '--rate', '10000', '--hold', '2', '--per-process', '5000', *ips4],
                         1, gateway_pids=stack.pids(1), timeout=120)
            guarded('connect', connect)
        if want('churn'):
            def churn():
                for interval in (1000, 10):
                    extra = () if interval == 1000 else ('--batch-interval-ms', str(interval))
                    nodes(stack, 2, extra)
                    loadtest(stack, f'churn-{interval}ms', 'churn',
                             ['-k', '200', '--duration', '10', '--lifetime-ms', '3000', '--watchers', '1',
                              '--drain-ms', '3000'], 2, timeout=120, meta={'batch_interval_ms': interval})
            guarded('churn', churn)
        if want('storm'):
            def storm():
                nodes(stack, 1)
                for rate in STORM_RATES:
                    loadtest(stack, f'storm-{rate // 1000}k', 'storm',
                             ['--users', str(STORM_USERS), '--rate', str(rate), '--duration', '10', '--connect-rate', '5000',
                              '--flush-wait-ms', '2500'], 1, timeout=120)
            guarded('storm', storm)
        if want('fanout'):
            def fanout():
                nodes(stack, 2)
                for rate in FANOUT_RATES:
                    loadtest(stack, f'fanout-{rate}', 'fanout',
                             ['--groups', '1', '--members', '1000', '--senders-per-group', '8', '--rate', str(rate),
                              '--duration', '10', '--body-bytes', '64', '--drain-ms', '3000', *FANOUT_ARGS], 2,
                             timeout=120)
            guarded('fanout', fanout)
        if want('private'):
            def private():
                for rate in PRIVATE_RATES:
                    # Fresh nodes per rate, so neither run's connects nor backlog lands in the other.
                    nodes(stack, 2)
                    name = 'private' if rate == 5000 else f'private-{rate}'
                    loadtest(stack, name, 'private',
                             ['--users', '2000', '--rate', str(rate), '--duration', '10', '--body-bytes', '64',
                              '--connect-rate', '5000'], 2, timeout=120)
            guarded('private', private)
    finally:
        stack.stop_nodes()
        PROCS.stop_all()
        write_result('suite', {'step': 'suite', 'wall_s': round(time.time() - T_START, 1), 'failed_steps': failures,
                               'quiet_wait_total_s': QUIET['used_s'],
                               'gateway_startup_retries': STARTUP_RETRIES, 'raw_logs': workdir})
    log(f'gateway suite done in {time.time() - T_START:.0f} s' + (f'; failed: {failures}' if failures else ''))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
