// What the integration tests start, as gateway/tests/it/harness.rs does for the Rust suites: the
// built presence-gateway binary and redis-server on free ports, as child processes that are
// killed and waited for; REST calls; JWTs signed with the nodes' secret.

import { spawn, type ChildProcess } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

import WebSocket from 'ws';

import { PresenceClient, type ClientOptions, type Presence, type State } from '../src/index.js';

export const API_KEY = 'test-key';
export const JWT_SECRET = 'test-jwt-secret';

/** The repository's root (this file runs from clients/js/build/test/). */
export const REPO = path.resolve(fileURLToPath(import.meta.url), '../../../../..');

const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
});

function gatewayBinary(): string {
  const bin =
    process.env.PRESENCE_GATEWAY_BIN ??
    path.join(process.env.CARGO_TARGET_DIR ?? path.join(REPO, 'target'), 'debug', 'presence-gateway');
  if (!existsSync(bin)) {
    throw new Error(`no gateway binary at ${bin}: run cargo build -p presence-gateway --bins (or set PRESENCE_GATEWAY_BIN)`);
  }
  return bin;
}

/** A TCP port nobody listens on now, below 55535 like the Rust harness's. */
export async function freePort(): Promise<number> {
  for (;;) {
    const port = await new Promise<number>((resolve, reject) => {
      const server = net.createServer();
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => {
        const { port } = server.address() as net.AddressInfo;
        server.close(() => resolve(port));
      });
    });
    if (port < 55_535) return port;
  }
}

function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once('exit', () => resolve()));
}

async function killed(child: ChildProcess, signal: NodeJS.Signals): Promise<void> {
  child.kill(signal);
  await exited(child);
  children.delete(child);
}

/** A redis-server of our own on a free port, keeping nothing on disk. */
export class Redis {
  private constructor(
    private child: ChildProcess,
    readonly port: number,
    private dir: string,
  ) {}

  static async start(): Promise<Redis> {
    const port = await freePort();
    const dir = mkdtempSync(path.join(os.tmpdir(), 'sdk-redis-'));
    const child = spawn(
      'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
      { stdio: 'ignore' },
    );
    children.add(child);
    const redis = new Redis(child, port, dir);
    const deadline = Date.now() + 30_000;
    while (!(await redis.ping())) {
      if (Date.now() > deadline || child.exitCode !== null) throw new Error(`redis-server on ${port} did not start`);
      await sleep(20);
    }
    return redis;
  }

  get url(): string {
    return `redis://127.0.0.1:${this.port}`;
  }

  private ping(): Promise<boolean> {
    return new Promise((resolve) => {
      const socket = net.connect(this.port, '127.0.0.1');
      socket.once('error', () => resolve(false));
      socket.once('connect', () => socket.write('PING\r\n'));
      socket.once('data', (data) => {
        resolve(data.toString().startsWith('+PONG'));
        socket.destroy();
      });
    });
  }

  async stop(): Promise<void> {
    await killed(this.child, 'SIGKILL');
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export interface NodeOptions {
  redis?: Redis;
  /** More flags (`--name=value`; later flags win). */
  args?: string[];
}

/** A gateway node: the built binary, as a child process, on a free port. */
export class Gateway {
  private child: ChildProcess | null = null;
  readonly logs: string[] = [];
  port = 0;
  readonly id = `node-${randomBytes(4).toString('hex')}`;

  private constructor(private readonly opts: NodeOptions) {}

  static async start(opts: NodeOptions = {}): Promise<Gateway> {
    const node = new Gateway(opts);
    await node.run(0);
    return node;
  }

  get http(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  get ws(): string {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  private async run(port: number): Promise<void> {
    const args = [
      `--listen=127.0.0.1:${port}`,
      '--log-format=json',
      '--log=info',
      '--batch-interval-ms=50',
      '--shards=3',
      '--shutdown-grace-secs=5',
      // SIGTERM closes clients with 1001 at once (the load-balancer drain is tested in Rust).
      '--drain-delay-secs=0',
      '--drain-spread-secs=0',
      `--api-key=${API_KEY}`,
      `--jwt-secret=${JWT_SECRET}`,
      `--node-id=${this.id}`,
      ...(this.opts.redis ? [`--redis-url=${this.opts.redis.url}`] : []),
      ...(this.opts.args ?? []),
    ];
    const child = spawn(gatewayBinary(), args, {
      env: { PATH: process.env.PATH ?? '' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    children.add(child);
    this.child = child;
    const listening = new Promise<number>((resolve, reject) => {
      for (const stream of [child.stdout, child.stderr]) {
        createInterface({ input: stream! }).on('line', (line) => {
          this.logs.push(line);
          if (line.includes('"listening"')) {
            const addr: string = JSON.parse(line).fields.addr;
            resolve(Number(addr.slice(addr.lastIndexOf(':') + 1)));
          }
        });
      }
      child.once('exit', (code) => reject(new Error(`gateway exited (${code}):\n${this.logs.join('\n')}`)));
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`gateway did not start:\n${this.logs.join('\n')}`)), 20_000);
    });
    try {
      this.port = await Promise.race([listening, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** SIGKILL: the node dies without a word; its clients see their sockets drop. */
  async kill(): Promise<void> {
    if (this.child) await killed(this.child, 'SIGKILL');
    this.child = null;
  }

  /** SIGTERM: the node drains (its clients get 1001) and exits. */
  async terminate(): Promise<void> {
    if (this.child) await killed(this.child, 'SIGTERM');
    this.child = null;
  }

  /** Starts the node again on the same port under the same id (it must be stopped). */
  async restart(): Promise<void> {
    await this.run(this.port);
  }

  async stop(): Promise<void> {
    await this.kill();
  }

  /** A REST call with the API key; the parsed JSON answer (or null without a body). */
  async rest(method: string, route: string, body?: unknown): Promise<{ status: number; json: unknown }> {
    const res = await fetch(`${this.http}${route}`, {
      method,
      headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, json: text ? JSON.parse(text) : null };
  }

  async openGroup(group: string): Promise<void> {
    const { status } = await this.rest('PUT', `/v1/groups/${group}`, { join: 'open' });
    if (status !== 204) throw new Error(`PUT /v1/groups/${group}: ${status}`);
  }
}

function base64url(data: string | Buffer): string {
  return Buffer.from(data).toString('base64url');
}

/** An HS256 JWT for the nodes' secret, valid for `ttlSecs` (whole seconds, as `exp` has). */
export function jwt(sub: string, platform = 5, ttlSecs = 3600): string {
  const now = Math.floor(Date.now() / 1000);
  const head = base64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = base64url(JSON.stringify({ sub, platform, iat: now, exp: now + ttlSecs }));
  const signature = createHmac('sha256', JWT_SECRET).update(`${head}.${claims}`).digest('base64url');
  return `${head}.${claims}.${signature}`;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` until it holds (running `poll` before each look), failing with `what` after `timeoutMs`. */
export async function until(
  what: string,
  check: () => boolean,
  timeoutMs = 15_000,
  poll?: () => Promise<void>,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    await poll?.();
    if (check()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(poll ? 100 : 20);
  }
}

/** A client over `ws` that records what it saw, for assertions. */
export class Recorder {
  readonly client: PresenceClient;
  readonly presence: Presence[] = [];
  readonly messages: import('../src/index.js').Message[] = [];
  readonly closes: import('../src/index.js').CloseInfo[] = [];
  readonly states: State[] = [];
  readonly errors: unknown[] = [];

  constructor(url: string, options: Omit<ClientOptions, 'websocket'>) {
    this.client = new PresenceClient(url, { websocket: WebSocket, ...options });
    this.client.on('presence', (p) => void this.presence.push(p));
    this.client.on('message', (m) => void this.messages.push(m));
    this.client.on('close', (c) => void this.closes.push(c));
    this.client.on('state', (s) => void this.states.push(s));
    this.client.on('error', (e) => void this.errors.push(e));
  }

  /** The latest presence event of `user`. */
  last(user: string): Presence | undefined {
    return this.presence.filter((p) => p.user === user).at(-1);
  }

  texts(): string[] {
    return this.messages.map((m) => (m.body as { text?: string }).text ?? '');
  }
}
