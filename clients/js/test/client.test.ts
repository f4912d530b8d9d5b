// The client's state machine on fake timers, with a socket played by the test: reconnects and
// backoff, tokens and refresh, requests across reconnects, silence detection, stale presence,
// group catch-up. (The same behaviour against real nodes is in the integration tests.)

import assert from 'node:assert/strict';
import { afterEach, beforeEach, mock, test } from 'node:test';

import { PresenceClient, PresenceError, type ClientFrame, type ServerFrame, type State } from '../src/index.js';

/** A WebSocket played by the test: it records what the client sends and delivers what the test pushes. */
class FakeSocket {
  static all: FakeSocket[] = [];
  binaryType = 'blob';
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  sent: ClientFrame[] = [];
  closedWith: number | undefined;

  constructor(
    readonly url: string,
    readonly protocols?: string | string[],
  ) {
    FakeSocket.all.push(this);
  }

  send(data: string | Uint8Array): void {
    this.sent.push(JSON.parse(data as string));
  }

  close(code?: number): void {
    this.closedWith = code;
  }

  push(frame: ServerFrame): void {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }

  welcome(extra: Partial<Extract<ServerFrame, { type: 'welcome' }>> = {}): void {
    this.push({
      type: 'welcome',
      conn_id: `c${FakeSocket.all.length}`,
      user: 'alice',
      platform: 5,
      node: 'n1',
      heartbeat_ms: 25_000,
      server_time: Date.now(),
      ...extra,
    });
  }

  drop(code: number, reason = ''): void {
    this.onclose?.({ code, reason });
  }

  /** The last frame sent of `type`. */
  lastSent<T extends ClientFrame['type']>(type: T): Extract<ClientFrame, { type: T }> {
    const frame = this.sent.filter((f) => f.type === type).at(-1);
    assert.ok(frame, `no ${type} sent`);
    return frame as Extract<ClientFrame, { type: T }>;
  }
}

const latest = () => FakeSocket.all.at(-1)!;
/** Lets promise callbacks run (setImmediate is not faked). */
const settle = () => new Promise((resolve) => setImmediate(resolve));

function client(options: Partial<ConstructorParameters<typeof PresenceClient>[1]> = {}) {
  const c = new PresenceClient('ws://gw/ws', {
    token: 't0',
    format: 'json',
    websocket: FakeSocket,
    random: () => 0.5,
    ...options,
  });
  const states: State[] = [];
  c.on('state', (s) => void states.push(s));
  return { c, states };
}

beforeEach(() => {
  FakeSocket.all = [];
  mock.timers.enable({ apis: ['setTimeout', 'Date'], now: 1_763_790_000_000 });
});
afterEach(() => mock.timers.reset());

test('connects with the token and the subprotocol; connected at welcome', async () => {
  const { c, states } = client();
  const connected = c.connect();
  await settle();
  assert.equal(latest().url, 'ws://gw/ws?token=t0');
  assert.equal(latest().protocols, 'presence.v1.json');
  assert.equal(latest().binaryType, 'arraybuffer');
  assert.equal(c.state, 'connecting');
  latest().welcome();
  await connected;
  assert.deepEqual(states, ['connecting', 'connected']);
  assert.equal(c.welcome?.conn_id, 'c1');
});

test('abnormal closes back off with full jitter, doubling; a welcome starts over', async () => {
  const { c, states } = client();
  void c.connect();
  await settle();
  latest().welcome();
  const delays: (number | undefined)[] = [];
  c.on('close', (info) => void delays.push(info.delayMs));

  latest().drop(1006);
  assert.equal(c.state, 'connecting');
  // random 0.5 of ceilings 500, 1000, 2000: 250, 500, 1000.
  for (const delay of [250, 500, 1000]) {
    const sockets = FakeSocket.all.length;
    mock.timers.tick(delay - 1);
    await settle();
    assert.equal(FakeSocket.all.length, sockets, `not before ${delay} ms`);
    mock.timers.tick(1);
    await settle();
    assert.equal(FakeSocket.all.length, sockets + 1, `after ${delay} ms`);
    latest().drop(1006);
  }
  assert.deepEqual(delays, [250, 500, 1000, 2000]);
  mock.timers.tick(2000);
  await settle();
  latest().welcome();
  latest().drop(4008);
  assert.deepEqual(delays.at(-1), 250, 'a welcome resets the backoff');
  assert.deepEqual(states, ['connecting', 'connected', 'connecting', 'connected', 'connecting']);
});

test('1001 reconnects within the jitter without growing the backoff', async () => {
  const { c } = client();
  void c.connect();
  await settle();
  latest().drop(1006); // one failure
  mock.timers.tick(250);
  await settle();
  const closes: number[] = [];
  c.on('close', (info) => void closes.push(info.delayMs!));
  latest().drop(1001);
  latest(); // still the same socket count until the delay
  mock.timers.tick(500);
  await settle();
  assert.equal(FakeSocket.all.length, 3);
  latest().drop(1006);
  assert.deepEqual(closes, [500, 500], 'the failure after 1001 is the second in a row (ceiling 1000)');
});

for (const code of [4003, 4009, 4011]) {
  test(`${code}: no reconnect; the close event says so; pending requests reject`, async () => {
    const { c, states } = client();
    void c.connect();
    await settle();
    latest().welcome();
    const request = c.setStatus('busy');
    const infos: unknown[] = [];
    c.on('close', (info) => void infos.push(info));
    latest().drop(code, 'why');
    await assert.rejects(request, (e: unknown) => e instanceof PresenceError && e.code === 'closed');
    mock.timers.tick(120_000);
    await settle();
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(c.state, 'disconnected');
    assert.deepEqual(infos, [{ code, reason: 'why', reconnect: false }]);
    assert.deepEqual(states, ['connecting', 'connected', 'disconnected']);
  });
}

test('4001: the token function is asked again before the next socket', async () => {
  let n = 0;
  const { c } = client({ token: async () => `t${++n}` });
  void c.connect();
  await settle();
  assert.equal(latest().url, 'ws://gw/ws?token=t1');
  latest().welcome();
  latest().drop(1006);
  mock.timers.tick(250);
  await settle();
  assert.equal(latest().url, 'ws://gw/ws?token=t1', 'a token that worked is kept');
  latest().welcome();
  latest().drop(4001, 'token expired');
  mock.timers.tick(250);
  await settle();
  assert.equal(latest().url, 'ws://gw/ws?token=t2');
  // Never welcomed (a bad token shows in browsers only as a failed connect): asked again.
  latest().drop(1006);
  mock.timers.tick(500);
  await settle();
  assert.equal(latest().url, 'ws://gw/ws?token=t3');
  c.close();
});

test('a failing token function is reported and retried with backoff', async () => {
  let fail = true;
  const { c } = client({ token: async () => (fail ? Promise.reject(new Error('backend down')) : 'ok') });
  const errors: unknown[] = [];
  c.on('error', (e) => void errors.push(e));
  c.connect().catch(() => {}); // closed before any welcome
  await settle();
  assert.equal(FakeSocket.all.length, 0);
  assert.equal((errors[0] as Error).message, 'backend down');
  fail = false;
  mock.timers.tick(250);
  await settle();
  assert.equal(latest().url, 'ws://gw/ws?token=ok');
  c.close();
});

test('requests wait for the welcome, are sent again after a reconnect, and time out', async () => {
  const { c } = client({ requestTimeoutMs: 5000 });
  void c.connect();
  await settle();
  const sent = c.send({ group: 'team' }, { text: 'hi' });
  assert.equal(latest().sent.length, 0, 'nothing before welcome');
  latest().welcome();
  const first = latest().lastSent('send');
  assert.equal(first.type, 'send');
  assert.deepEqual(Object.keys(first).slice(0, 2), ['type', 'id'], 'type first, as the contract asks');
  latest().drop(1006);
  mock.timers.tick(250);
  await settle();
  latest().welcome();
  const again = latest().lastSent('send');
  assert.equal(again.client_msg_id, first.client_msg_id, 'the same client_msg_id: delivered once');
  latest().push({ type: 'ack', id: again.id, msg_id: '1-1', result: 'delivered', delivered: 1, stored: 0 });
  assert.deepEqual(await sent, { msg_id: '1-1', result: 'delivered', delivered: 1, stored: 0 });

  const unanswered = c.unread();
  mock.timers.tick(5000);
  await assert.rejects(unanswered, (e: unknown) => e instanceof PresenceError && e.code === 'timeout');
  c.close();
});

test('an error frame rejects with its code, and a send error carries its client_msg_id', async () => {
  const { c } = client();
  void c.connect();
  await settle();
  latest().welcome();
  const sent = c.send({ user: 'bob' }, 'x', { clientMsgId: 'mine' });
  const frame = latest().lastSent('send');
  latest().push({ type: 'error', id: frame.id, code: 'unavailable', message: 'store down', outcome: 'unknown' });
  await assert.rejects(sent, (e: unknown) => {
    assert.ok(e instanceof PresenceError);
    assert.deepEqual([e.code, e.outcome, e.clientMsgId], ['unavailable', 'unknown', 'mine']);
    return true;
  });
  c.close();
});

test('refresh: a new token is sent ahead of expires_at, and again after the new expiry', async () => {
  let n = 0;
  const { c } = client({ token: () => `t${++n}` });
  void c.connect();
  await settle();
  const tenMinutes = 600_000;
  latest().welcome({ expires_at: Date.now() + tenMinutes, heartbeat_ms: 3_600_000 });
  // Later of "60 s ahead" and "halfway": 540 s.
  mock.timers.tick(539_999);
  await settle();
  assert.equal(latest().sent.filter((f) => f.type === 'refresh').length, 0);
  mock.timers.tick(1);
  await settle();
  const refresh = latest().lastSent('refresh');
  assert.equal(refresh.token, 't2');
  latest().push({ type: 'ok', id: refresh.id, expires_at: Date.now() + 100_000 });
  await settle();
  // 100 s left: halfway (50 s) is later than 60 s ahead (40 s).
  mock.timers.tick(50_000);
  await settle();
  assert.equal(latest().lastSent('refresh').token, 't3');
  assert.equal(FakeSocket.all.length, 1, 'the connection stayed');
  c.close();
});

test('silence: a ping after a heartbeat interval, and a reconnect when it goes unanswered', async () => {
  const { c } = client();
  void c.connect();
  await settle();
  latest().welcome({ heartbeat_ms: 1000 });
  mock.timers.tick(999);
  latest().push({ type: 'presence', user: 'x', status: 'online', platforms: [], version: 1 }); // any frame resets
  mock.timers.tick(999);
  assert.equal(latest().sent.length, 0);
  mock.timers.tick(1);
  const ping = latest().lastSent('ping');
  latest().push({ type: 'pong', id: ping.id });
  await settle();
  mock.timers.tick(1000); // the next silent interval
  assert.equal(latest().sent.filter((f) => f.type === 'ping').length, 2);
  mock.timers.tick(1000); // unanswered
  await settle();
  assert.equal(latest().closedWith, 4010);
  assert.equal(c.state, 'connecting');
  mock.timers.tick(250);
  await settle();
  assert.equal(FakeSocket.all.length, 2);
  c.close();
});

test('presence: stale versions dropped; after a reconnect only what changed is emitted', async () => {
  const { c } = client();
  const seen: string[] = [];
  c.on('presence', (p, prev) => void seen.push(`${p.user}:${p.status}@${p.version}<${prev?.version ?? '-'}`));
  void c.connect();
  await settle();
  latest().welcome();
  const subscribed = c.subscribe(['bob', 'carol']);
  const sub = latest().lastSent('subscribe');
  assert.deepEqual(sub.users, ['bob', 'carol']);
  latest().push({
    type: 'presence_list',
    id: sub.id,
    items: [
      { user: 'bob', status: 'online', platforms: [1], version: 10 },
      { user: 'carol', status: 'offline', platforms: [], version: 5, last_seen: 1 },
    ],
  });
  await subscribed;
  latest().push({ type: 'presence', user: 'bob', status: 'busy', platforms: [1], version: 12 });
  latest().push({ type: 'presence', user: 'bob', status: 'online', platforms: [1], version: 11 }); // late
  latest().push({ type: 'presence', user: 'bob', status: 'busy', platforms: [1], version: 12 }); // repeat
  latest().push({ type: 'presence', user: 'mallory', status: 'online', platforms: [1], version: 99 }); // not watched
  assert.equal(c.presenceOf('bob')?.status, 'busy');

  latest().drop(1006);
  mock.timers.tick(250);
  await settle();
  latest().welcome();
  const resub = latest().lastSent('subscribe');
  assert.deepEqual(resub.users.sort(), ['bob', 'carol'], 'resubscribed');
  latest().push({
    type: 'presence_list',
    id: resub.id,
    items: [
      { user: 'bob', status: 'busy', platforms: [1], version: 12 },
      { user: 'carol', status: 'online', platforms: [2], version: 7 },
    ],
  });
  await settle();
  assert.deepEqual(seen, ['bob:online@10<-', 'carol:offline@5<-', 'bob:busy@12<10', 'carol:online@7<5']);
  c.close();
});

test('group catch-up: after a reconnect, history from the last message seen, live ones held back meanwhile', async () => {
  const { c } = client();
  const got: string[] = [];
  c.on('message', (m) => void got.push(m.msg_id));
  void c.connect();
  await settle();
  latest().welcome();
  const msg = (id: string) =>
    ({ type: 'message', msg_id: id, from: 'bob', to: { group: 'team' }, body: {}, sent_at: 1 }) as const;
  latest().push(msg('0000000000001-0000000001'));

  latest().drop(1006);
  mock.timers.tick(250);
  await settle();
  latest().welcome();
  const sync = latest().lastSent('sync');
  assert.deepEqual([sync.group, sync.since], ['team', '0000000000001-0000000001']);
  latest().push(msg('0000000000004-0000000004')); // live, before the history arrived: held
  assert.deepEqual(got, ['0000000000001-0000000001']);
  const page = (ids: string[], more: boolean) =>
    ({ messages: ids.map((id) => ({ ...msg(id), type: undefined })), more, group: 'team' });
  latest().push({ type: 'history', id: sync.id, ...page(['0000000000002-0000000002', '0000000000003-0000000003'], true) });
  await settle();
  const next = latest().lastSent('sync');
  assert.equal(next.since, '0000000000003-0000000003', 'pages on');
  latest().push({ type: 'history', id: next.id, ...page(['0000000000004-0000000004'], false) });
  await settle();
  latest().push(msg('0000000000004-0000000004')); // a repeat
  latest().push(msg('0000000000005-0000000005'));
  assert.deepEqual(got, [1, 2, 3, 4, 5].map((n) => `000000000000${n}-000000000${n}`));
  c.close();
});

test('close() during the backoff cancels the reconnect and rejects connect()', async () => {
  const { c } = client();
  const connecting = c.connect();
  await settle();
  latest().drop(1006);
  c.close();
  await assert.rejects(connecting, (e: unknown) => e instanceof PresenceError && e.code === 'closed');
  mock.timers.tick(60_000);
  await settle();
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(c.state, 'disconnected');
});

test('close() or connect() from a close handler: the client does what the app said', async () => {
  const { c } = client();
  void c.connect();
  await settle();
  latest().welcome();
  const off = c.on('close', () => c.close());
  latest().drop(1006);
  mock.timers.tick(60_000);
  await settle();
  assert.equal(FakeSocket.all.length, 1, 'no reconnect after close()');
  assert.equal(c.state, 'disconnected');
  off();

  void c.connect();
  await settle();
  latest().welcome();
  c.on('close', (info) => {
    if (!info.reconnect) c.connect().catch(() => {}); // e.g. after asking the user
  });
  latest().drop(4011);
  await settle();
  assert.equal(FakeSocket.all.length, 3, 'connected again at once');
  assert.equal(c.state, 'connecting');
  c.close();
});
