// PresenceClient: one WebSocket to a gateway node, kept open as the close codes say, with the
// state an app needs to see no gap across reconnects: what it watches (resubscribed and re-read),
// the presence it last saw per user (stale versions dropped), and per group the last message it
// saw (synced from there after a reconnect, live messages held back meanwhile).

import { decodeFrame, encodeFrame, SUBPROTOCOL, type Format } from './codec.js';
import { Emitter } from './emitter.js';
import { PresenceError } from './errors.js';
import {
  CloseCode,
  type Ack,
  type ClientFrame,
  type Destination,
  type Message,
  type Presence,
  type Request,
  type ServerFrame,
  type Status,
  type Welcome,
} from './frames.js';
import { afterClose, DEFAULT_BACKOFF, type BackoffOptions } from './reconnect.js';

export type State = 'connecting' | 'connected' | 'disconnected';

/** What the client needs of a WebSocket: the browser's, React Native's, or `ws` in Node. */
// Events are `any` so that the browser's class and `ws`'s (whose event types differ) both fit.
export interface WebSocketLike {
  binaryType: string;
  onmessage: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string | Uint8Array): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** A token, or a function that fetches a new one (first connect, after 4001, before `expires_at`). */
export type TokenSource = string | (() => string | Promise<string>);

export interface ClientOptions {
  token: TokenSource;
  /** `msgpack` (default) or `json`. */
  format?: Format;
  /** The WebSocket class; defaults to `globalThis.WebSocket` (pass `ws`'s in Node). */
  websocket?: WebSocketConstructor;
  /** How long a request waits for its answer, connecting included (default 10 s). */
  requestTimeoutMs?: number;
  backoff?: Partial<BackoffOptions>;
  /** With a token function: refresh this long before the token expires, or halfway, whichever is later (default 60 s). */
  refreshAheadMs?: number;
  /** Uniform in [0, 1): the jitter's source (tests pass their own). */
  random?: () => number;
}

/** One socket's end. */
export interface CloseInfo {
  code: number;
  reason: string;
  /** False after 4003, 4009, 4011 (and 1002/1007): the app decides what happens next. */
  reconnect: boolean;
  delayMs?: number;
}

export interface ClientEvents {
  state: (state: State) => void;
  connected: (welcome: Welcome) => void;
  close: (info: CloseInfo) => void;
  /** A watched user's presence changed (stale and repeated versions are dropped). */
  presence: (presence: Presence, previous: Presence | undefined) => void;
  /** A message; for stored ones (`offline`), `ack_offline` waits for a returned promise. */
  message: (message: Message) => unknown;
  /** Something went wrong in the background (token fetch, refresh, catch-up, a handler threw). */
  error: (error: unknown) => void;
}

type ReplyOf<T extends ServerFrame['type']> = Extract<ServerFrame, { type: T }>;

interface Pending {
  frame: ClientFrame;
  resolve(frame: ServerFrame): void;
  reject(e: PresenceError): void;
  timer: ReturnType<typeof setTimeout>;
  /** The socket generation it was last sent on: after a reconnect it is sent again. */
  sentOn: number;
}

interface GroupCursor {
  /** The last message id seen (or a made-up one from the server's clock): catch-up reads after it. */
  last: string;
  /** While catching up: live messages held back until the history before them is delivered. */
  held: Message[] | null;
}

const SYNC_PAGE = 100;
const MAX_HELD = 10_000;
// A group joined before any message was seen is read from a bit before the join, so no message
// is missed to clock skew between the nodes that number messages.
const JOIN_MARGIN_MS = 2_000;

export class PresenceClient extends Emitter<ClientEvents> {
  state: State = 'disconnected';
  /** The welcome of the current (or last) connection. */
  welcome: Welcome | undefined;

  private readonly url: string;
  private readonly format: Format;
  private readonly WS: WebSocketConstructor;
  private readonly timeoutMs: number;
  private readonly backoff: BackoffOptions;
  private readonly refreshAheadMs: number;
  private readonly random: () => number;

  private ws: WebSocketLike | null = null;
  /** Counts sockets: events of an older one are ignored. */
  private generation = 0;
  private stopped = true;
  /** Closes in a row without a welcome: the backoff's exponent. */
  private failures = 0;
  private token: string | undefined;
  /** The token worked (a welcome came): reuse it on reconnect until it expires. */
  private tokenGood = false;
  private tokenExpiresAt: number | undefined;
  private clockOffset = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private silenceTimer: ReturnType<typeof setTimeout> | undefined;
  private ackTimer: ReturnType<typeof setTimeout> | undefined;
  private nextId = 1;
  private pending = new Map<number, Pending>();
  private waiters: { resolve(): void; reject(e: PresenceError): void }[] = [];
  private watched = new Set<string>();
  private cache = new Map<string, Presence>();
  private groups = new Map<string, GroupCursor>();
  /** Stored messages are acknowledged in order, each once its handlers finished. */
  private offlineChain: Promise<boolean> = Promise.resolve(true);
  private offlineUpTo: string | undefined;

  constructor(url: string, options: ClientOptions) {
    super();
    const WS =
      options.websocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new TypeError('no WebSocket here: pass one as the websocket option');
    this.url = url;
    this.WS = WS;
    this.tokenSource = options.token;
    this.format = options.format ?? 'msgpack';
    this.timeoutMs = options.requestTimeoutMs ?? 10_000;
    this.backoff = { ...DEFAULT_BACKOFF, ...options.backoff };
    this.refreshAheadMs = options.refreshAheadMs ?? 60_000;
    this.random = options.random ?? Math.random;
  }

  private readonly tokenSource: TokenSource;

  /** Connects (and keeps reconnecting); resolves at the first welcome, rejects if the client stops first. */
  connect(): Promise<void> {
    if (this.state === 'connected') return Promise.resolve();
    const connected = new Promise<void>((resolve, reject) => this.waiters.push({ resolve, reject }));
    if (this.stopped) {
      this.stopped = false;
      this.failures = 0;
      this.setState('connecting');
      void this.open();
    }
    return connected;
  }

  /** Closes the connection for good (until `connect()`); pending requests reject with `closed`. */
  close(): void {
    const ws = this.ws;
    this.stop(new PresenceError('closed', 'the client was closed'));
    try {
      ws?.close(1000, 'client closed');
    } catch {
      // already closing
    }
  }

  // ---- presence ----

  /** Watches users: their presence now (also as `presence` events), then an event per change. */
  async subscribe(users: string[]): Promise<{ items: Presence[]; denied: string[] }> {
    for (const user of users) this.watched.add(user);
    const list = await this.watch(users);
    return { items: list.items, denied: list.denied ?? [] };
  }

  async unsubscribe(users: string[]): Promise<void> {
    for (const user of users) {
      this.watched.delete(user);
      this.cache.delete(user);
    }
    await this.request({ type: 'unsubscribe', users });
  }

  /** Presence of any users, once (watched ones also update the cache). */
  async query(users: string[]): Promise<Presence[]> {
    const list = (await this.request({ type: 'query', users })) as ReplyOf<'presence_list'>;
    for (const p of list.items) this.apply(p);
    return list.items;
  }

  async setStatus(status: Status, text?: string): Promise<void> {
    await this.request(text === undefined ? { type: 'set_status', status } : { type: 'set_status', status, text });
  }

  /** The last presence seen of a watched user. */
  presenceOf(user: string): Presence | undefined {
    return this.cache.get(user);
  }

  // ---- messaging ----

  /** Joins a group (for the user, on every device) and follows it: catch-up after reconnects. */
  async join(group: string): Promise<void> {
    await this.request({ type: 'join', group });
    if (!this.groups.has(group)) {
      this.groups.set(group, { last: msgIdAt(this.serverNow() - JOIN_MARGIN_MS), held: null });
    }
  }

  async leave(group: string): Promise<void> {
    await this.request({ type: 'leave', group });
    this.groups.delete(group);
  }

  async groupOnline(group: string): Promise<string[]> {
    return ((await this.request({ type: 'group_online', group })) as ReplyOf<'member_list'>).users;
  }

  /**
   * Sends to `{ user }` or `{ group }`; resolves to the `ack`. Without `clientMsgId` one is made
   * up, and a request cut by a reconnect is sent again with it: the server delivers it once.
   */
  async send(to: Destination, body: unknown, options: { clientMsgId?: string } = {}): Promise<Ack> {
    const client_msg_id = options.clientMsgId ?? newClientMsgId();
    const { msg_id, result, delivered, stored } = (await this.request({
      type: 'send',
      to,
      body,
      client_msg_id,
    })) as ReplyOf<'ack'>;
    return { msg_id, result, delivered, stored };
  }

  /** A group's messages after `since` (default: the user's read position). */
  async sync(
    group: string,
    options: { since?: string; limit?: number } = {},
  ): Promise<{ messages: Message[]; more: boolean }> {
    const h = (await this.request({ type: 'sync', group, ...options })) as ReplyOf<'history'>;
    return { messages: h.messages, more: h.more };
  }

  async read(group: string, upTo: string): Promise<void> {
    await this.request({ type: 'read', group, up_to: upTo });
  }

  /** Unread messages per group of the user. */
  async unread(): Promise<Record<string, number>> {
    return ((await this.request({ type: 'unread' })) as ReplyOf<'unread_counts'>).groups;
  }

  // ---- the connection ----

  private async open(): Promise<void> {
    const gen = ++this.generation;
    let token: string;
    try {
      token = await this.currentToken();
    } catch (e) {
      if (gen !== this.generation || this.stopped) return;
      this.report(e);
      this.retry(0, '', afterClose(-1, this.failures, this.backoff, this.random));
      return;
    }
    if (gen !== this.generation || this.stopped) return;
    const url = `${this.url}${this.url.includes('?') ? '&' : '?'}token=${encodeURIComponent(token)}`;
    let ws: WebSocketLike;
    try {
      ws = new this.WS(url, SUBPROTOCOL[this.format]);
    } catch (e) {
      this.report(e);
      this.retry(0, '', afterClose(-1, this.failures, this.backoff, this.random));
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.ws = ws;
    ws.onmessage = (ev: { data: unknown }) => {
      if (gen === this.generation) this.onFrame(ev.data);
    };
    ws.onclose = (ev: { code: number; reason: string }) => {
      if (gen === this.generation) this.onClose(ev.code, ev.reason);
    };
    // A close always follows an error; the error itself says nothing more in browsers.
    ws.onerror = () => {};
  }

  private async currentToken(): Promise<string> {
    const source = this.tokenSource;
    if (typeof source === 'string') return source;
    const expired = this.tokenExpiresAt !== undefined && this.serverNow() >= this.tokenExpiresAt;
    if (this.token === undefined || !this.tokenGood || expired) {
      this.token = await source();
      this.tokenGood = false;
      this.tokenExpiresAt = undefined;
    }
    return this.token;
  }

  private onFrame(data: unknown): void {
    let frame: ServerFrame;
    try {
      frame = decodeFrame(data as string | ArrayBuffer | Uint8Array);
    } catch (e) {
      this.report(e);
      return;
    }
    this.armSilence();
    switch (frame.type) {
      case 'welcome':
        return this.onWelcome(withoutType(frame));
      case 'presence':
        return this.apply(withoutType(frame));
      case 'message':
        return this.onMessage(withoutType(frame));
      default: {
        const id = (frame as { id?: unknown }).id;
        const pending = typeof id === 'number' ? this.pending.get(id) : undefined;
        if (pending) this.settle(id as number, pending, frame);
        else if (frame.type === 'error') this.report(new PresenceError(frame.code, frame.message));
      }
    }
  }

  private onWelcome(welcome: Welcome): void {
    this.welcome = welcome;
    this.clockOffset = welcome.server_time - Date.now();
    this.failures = 0;
    this.tokenGood = true;
    this.tokenExpiresAt = welcome.expires_at;
    this.offlineChain = Promise.resolve(true);
    this.setState('connected');
    this.scheduleRefresh(welcome.expires_at);
    this.armSilence();
    // Watches first, then whatever waited or was cut off, then the groups' catch-up.
    if (this.watched.size > 0) this.watch([...this.watched]).catch((e) => this.report(e));
    for (const pending of this.pending.values()) {
      if (pending.sentOn !== this.generation) this.transmit(pending);
    }
    for (const [group, cursor] of this.groups) {
      if (!cursor.held) void this.catchUp(group, cursor);
    }
    for (const waiter of this.waiters.splice(0)) waiter.resolve();
    this.emit('connected', (e) => this.report(e), welcome);
  }

  private onClose(code: number, reason: string): void {
    this.ws = null;
    this.clearConnectionTimers();
    const decision = afterClose(code, this.failures, this.backoff, this.random);
    if (!decision.reconnect) {
      // Stopped before the app hears of it, so a handler may connect() again.
      this.stop(new PresenceError('closed', `closed by the server: ${code} ${reason}`.trim()));
      this.emit('close', (e) => this.report(e), { code, reason, reconnect: false });
      return;
    }
    this.retry(code, reason, decision);
  }

  private retry(code: number, reason: string, decision: ReturnType<typeof afterClose>): void {
    if (!decision.reconnect) return;
    if (decision.failure) this.failures++;
    if (decision.newToken) this.tokenGood = false;
    if (code) {
      this.emit('close', (e) => this.report(e), { code, reason, reconnect: true, delayMs: decision.delayMs });
      if (this.stopped) return; // a handler closed the client
    }
    this.setState('connecting');
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      void this.open();
    }, decision.delayMs);
  }

  /** Ends every connection activity; requests and `connect()` callers reject with `error`. */
  private stop(error: PresenceError): void {
    this.stopped = true;
    this.generation++;
    this.ws = null;
    clearTimeout(this.reconnectTimer);
    this.clearConnectionTimers();
    for (const pending of this.pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(error);
    }
    this.pending.clear();
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
    this.setState('disconnected');
  }

  private clearConnectionTimers(): void {
    clearTimeout(this.refreshTimer);
    clearTimeout(this.silenceTimer);
    this.refreshTimer = this.silenceTimer = undefined;
  }

  private setState(state: State): void {
    if (this.state === state) return;
    this.state = state;
    this.emit('state', (e) => this.report(e), state);
  }

  /**
   * Browsers hide WebSocket pings, so a dead peer shows only as silence: after a heartbeat
   * interval without a frame the client pings, and a ping unanswered for another interval ends
   * the socket (as 4010) and reconnects.
   */
  private armSilence(): void {
    clearTimeout(this.silenceTimer);
    const interval = this.welcome?.heartbeat_ms;
    if (!interval || !this.ws || this.state !== 'connected') return;
    const ws = this.ws;
    this.silenceTimer = setTimeout(() => {
      this.request({ type: 'ping' }, interval).catch(() => {
        if (this.ws !== ws) return;
        this.generation++;
        try {
          ws.close(CloseCode.HeartbeatTimeout, 'no answer to ping');
        } catch {
          // already closing
        }
        this.onClose(CloseCode.HeartbeatTimeout, 'no answer to ping');
      });
    }, interval);
  }

  private scheduleRefresh(expiresAt: number | undefined): void {
    clearTimeout(this.refreshTimer);
    if (expiresAt === undefined || typeof this.tokenSource === 'string') return;
    const left = expiresAt - this.serverNow();
    this.refreshTimer = setTimeout(() => void this.refresh(), Math.max(left - this.refreshAheadMs, left / 2, 0));
  }

  private async refresh(): Promise<void> {
    const gen = this.generation;
    try {
      const token = await (this.tokenSource as () => string | Promise<string>)();
      if (gen !== this.generation) return;
      const ok = (await this.request({ type: 'refresh', token })) as ReplyOf<'ok'>;
      this.token = token;
      this.tokenExpiresAt = ok.expires_at;
      if (gen === this.generation) this.scheduleRefresh(ok.expires_at);
    } catch (e) {
      this.report(e);
      // Once more halfway to the expiry; after it the server closes with 4001 and the
      // reconnect fetches a new token anyway.
      const left = (this.tokenExpiresAt ?? 0) - this.serverNow();
      if (gen === this.generation && left > 2_000) {
        this.refreshTimer = setTimeout(() => void this.refresh(), left / 2);
      }
    }
  }

  // ---- requests ----

  /** Sends a request and waits for its answer; it waits for a connection first and is sent again after a reconnect, all within its timeout. */
  private request(req: Request, timeoutMs = this.timeoutMs): Promise<ServerFrame> {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      const clientMsgId = (req as { client_msg_id?: string }).client_msg_id;
      // `type` first, as the contract asks: the server reads such frames in one pass.
      const { type, ...fields } = req;
      const pending: Pending = {
        frame: { type, id, ...fields } as ClientFrame,
        resolve,
        reject,
        sentOn: -1,
        timer: setTimeout(() => {
          this.pending.delete(id);
          reject(new PresenceError('timeout', `no answer to ${req.type} within ${timeoutMs} ms`, undefined, clientMsgId));
        }, timeoutMs),
      };
      this.pending.set(id, pending);
      if (this.state === 'connected') this.transmit(pending);
    });
  }

  private transmit(pending: Pending): void {
    pending.sentOn = this.generation;
    try {
      this.ws?.send(encodeFrame(pending.frame, this.format));
    } catch (e) {
      this.report(e);
    }
  }

  private settle(id: number, pending: Pending, frame: ServerFrame): void {
    this.pending.delete(id);
    clearTimeout(pending.timer);
    if (frame.type === 'error') {
      const clientMsgId = (pending.frame as { client_msg_id?: string }).client_msg_id;
      pending.reject(new PresenceError(frame.code, frame.message, frame.outcome, clientMsgId));
    } else {
      pending.resolve(frame);
    }
  }

  // ---- what arrives ----

  private async watch(users: string[]): Promise<ReplyOf<'presence_list'>> {
    const list = (await this.request({ type: 'subscribe', users })) as ReplyOf<'presence_list'>;
    for (const user of list.denied ?? []) {
      this.watched.delete(user);
      this.cache.delete(user);
    }
    for (const p of list.items) this.apply(p);
    return list;
  }

  private apply(p: Presence): void {
    if (!this.watched.has(p.user)) return;
    const previous = this.cache.get(p.user);
    if (previous && p.version <= previous.version) return;
    this.cache.set(p.user, p);
    this.emit('presence', (e) => this.report(e), p, previous);
  }

  private onMessage(m: Message): void {
    const group = (m.to as { group?: unknown }).group;
    if (typeof group !== 'string') return this.deliver(m);
    let cursor = this.groups.get(group);
    if (!cursor) this.groups.set(group, (cursor = { last: '', held: null }));
    if (!cursor.held) return this.deliverInGroup(cursor, m);
    if (cursor.held.length < MAX_HELD) cursor.held.push(m);
    else this.report(new PresenceError('internal', `more than ${MAX_HELD} messages held back in ${group}`));
  }

  private deliverInGroup(cursor: GroupCursor, m: Message): void {
    if (m.msg_id <= cursor.last) return;
    cursor.last = m.msg_id;
    this.deliver(m);
  }

  private deliver(m: Message): void {
    let threw = false;
    const results = this.emit(
      'message',
      (e) => {
        threw = true;
        this.report(e);
      },
      m,
    );
    if (m.offline) this.ackWhenHandled(m.msg_id, results, threw);
  }

  /**
   * `ack_offline` for a stored message once every handler finished; a handler that failed stops
   * the acknowledgements for this connection, so that message and the later ones come again.
   */
  private ackWhenHandled(msgId: string, results: unknown[], threw: boolean): void {
    const gen = this.generation;
    this.offlineChain = this.offlineChain.then(async (ok) => {
      if (!ok || threw) return false;
      const settled = await Promise.allSettled(results);
      const failed = settled.filter((s): s is PromiseRejectedResult => s.status === 'rejected');
      for (const f of failed) this.report(f.reason);
      if (failed.length > 0 || gen !== this.generation) return false;
      this.offlineUpTo = msgId;
      // One ack for whatever finished meanwhile.
      this.ackTimer ??= setTimeout(() => {
        this.ackTimer = undefined;
        const upTo = this.offlineUpTo;
        if (upTo) this.request({ type: 'ack_offline', up_to: upTo }).catch((e) => this.report(e));
      }, 0);
      return true;
    });
  }

  /** After a reconnect: the group's messages after the last one seen, then those held back. */
  private async catchUp(group: string, cursor: GroupCursor): Promise<void> {
    if (!cursor.last) return;
    cursor.held = [];
    try {
      for (let more = true; more; ) {
        const page = (await this.request({
          type: 'sync',
          group,
          since: cursor.last,
          limit: SYNC_PAGE,
        })) as ReplyOf<'history'>;
        for (const m of page.messages) this.deliverInGroup(cursor, m);
        more = page.more && page.messages.length > 0;
      }
    } catch (e) {
      if (e instanceof PresenceError && e.code === 'forbidden') this.groups.delete(group);
      else this.report(e);
    } finally {
      const held = cursor.held ?? [];
      cursor.held = null;
      for (const m of held) this.deliverInGroup(cursor, m);
    }
  }

  private serverNow(): number {
    return Date.now() + this.clockOffset;
  }

  private report(error: unknown): void {
    this.emit('error', () => {}, error);
  }
}

function withoutType<T extends { type: string }>(frame: T): Omit<T, 'type'> {
  const { type: _type, ...rest } = frame;
  return rest;
}

/** The smallest message id at `ms`: `sync` with it as `since` returns everything sent from then on. */
function msgIdAt(ms: number): string {
  return `${String(Math.max(0, Math.floor(ms))).padStart(13, '0')}-0000000000`;
}

function newClientMsgId(): string {
  const crypto = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (crypto?.randomUUID) return crypto.randomUUID();
  const part = () => Math.random().toString(36).slice(2, 10);
  return `${Date.now().toString(36)}-${part()}${part()}`;
}
