// The frames the Rust `shared` crate writes (shared/tests/golden/, pinned by its golden test) read
// by this SDK: every server frame decodes, in both encodings, to the same object, and drives the
// client; every client frame the SDK writes has the shape the crate writes. A change of shape on
// either side fails here.

import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { decodeFrame, PresenceClient, type ClientFrame, type Message, type Presence } from '../src/index.js';
import { REPO } from './harness.js';

const GOLDEN = path.join(REPO, 'shared/tests/golden');
const serverNames = readdirSync(path.join(GOLDEN, 'server'))
  .filter((f) => f.endsWith('.json'))
  .map((f) => f.slice(0, -'.json'.length));

function server(name: string, ext: 'json' | 'msgpack') {
  const bytes = readFileSync(path.join(GOLDEN, 'server', `${name}.${ext}`));
  return ext === 'json' ? bytes.toString('utf8') : new Uint8Array(bytes);
}

/** MessagePack's binary values reach JSON clients as arrays of byte values. */
function binaryAsArrays(value: unknown): unknown {
  if (value instanceof Uint8Array) return [...value];
  if (Array.isArray(value)) return value.map(binaryAsArrays);
  if (value && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, binaryAsArrays(v)]));
  }
  return value;
}

test('the golden files are there (the Rust test writes them)', () => {
  assert.ok(serverNames.length >= 15, `only ${serverNames.length} server frames in ${GOLDEN}`);
});

for (const name of serverNames) {
  test(`server frame ${name}: both encodings decode to the same checked frame`, () => {
    const fromJson = decodeFrame(server(name, 'json'));
    const fromMsgpack = decodeFrame(server(name, 'msgpack'));
    assert.ok(name.startsWith(fromJson.type), `${name} holds a ${fromJson.type}`);
    assert.deepEqual(binaryAsArrays(fromMsgpack), fromJson);
  });
}

test('a binary body stays binary through MessagePack', () => {
  const m = decodeFrame(server('message_group', 'msgpack')) as Message & { type: string };
  assert.deepEqual((m.body as { raw: Uint8Array }).raw, new Uint8Array([0, 1, 254, 255]));
  assert.equal((m.body as { text: string }).text, 'héllo');
});

test('a frame missing a field the contract promises is refused', () => {
  const frame = JSON.parse(server('presence', 'json') as string);
  delete frame.version;
  assert.throws(() => decodeFrame(JSON.stringify(frame)), /malformed presence frame/);
  assert.throws(() => decodeFrame('[1,2]'), /one map with a type/);
  assert.equal(decodeFrame('{"type":"a_future_frame","x":1}').type, 'a_future_frame');
});

/** A socket that plays the golden server frames to the client and records what it sends. */
class GoldenSocket {
  static last: GoldenSocket;
  binaryType = '';
  onmessage: ((ev: { data: unknown }) => void) | null = null;
  onclose: ((ev: { code: number; reason: string }) => void) | null = null;
  onerror: ((ev: unknown) => void) | null = null;
  sent: ClientFrame[] = [];
  constructor() {
    GoldenSocket.last = this;
  }
  send(data: string | Uint8Array) {
    this.sent.push(JSON.parse(data as string));
  }
  close() {}
  play(name: string, id?: number) {
    let data = server(name, 'msgpack') as Uint8Array;
    if (id !== undefined) {
      // Answer the request the client made: the golden frame with the client's id.
      const frame = { ...(decodeFrame(data) as object), id };
      data = new TextEncoder().encode(JSON.stringify(frame));
      this.onmessage?.({ data: new TextDecoder().decode(data) });
      return;
    }
    this.onmessage?.({ data: data.buffer.slice(data.byteOffset, data.byteOffset + data.byteLength) });
  }
}

test('the client runs on golden frames: welcome, presence, messages, answers', async () => {
  const c = new PresenceClient('ws://gw/ws', { token: 't', format: 'json', websocket: GoldenSocket });
  const presence: Presence[] = [];
  const messages: Message[] = [];
  c.on('presence', (p) => void presence.push(p));
  c.on('message', (m) => void messages.push(m));
  const connected = c.connect();
  await new Promise((resolve) => setImmediate(resolve));
  const socket = GoldenSocket.last;
  socket.play('welcome');
  await connected;
  assert.equal(c.welcome?.user, 'alice');

  const subscribed = c.subscribe(['bob', 'carol']);
  socket.play('presence_list', socket.sent.at(-1)!.id);
  const { items } = await subscribed;
  assert.deepEqual(
    items.map((p) => p.user),
    ['bob', 'carol'],
  );
  assert.equal(c.presenceOf('carol')?.last_seen, 1_763_780_000_000);

  socket.play('message_group');
  socket.play('message_all');
  assert.deepEqual(
    messages.map((m) => m.to),
    [{ group: 'team' }, { all: true }],
  );

  const sent = c.send({ group: 'team' }, { text: 'hello' });
  socket.play('ack', socket.sent.at(-1)!.id);
  assert.equal((await sent).result, 'delivered');
  const unread = c.unread();
  socket.play('unread_counts', socket.sent.at(-1)!.id);
  assert.deepEqual(await unread, { ops: 0, team: 3 });
  const history = c.sync('team');
  socket.play('history', socket.sent.at(-1)!.id);
  assert.equal((await history).messages.length, 2);
  const online = c.groupOnline('team');
  socket.play('member_list', socket.sent.at(-1)!.id);
  assert.deepEqual(await online, ['alice', 'bob']);
  const joined = c.join('team');
  socket.play('error', socket.sent.at(-1)!.id);
  await assert.rejects(joined, { code: 'forbidden' });
  c.close();
});

test('every client frame the SDK writes has the shape the Rust crate writes', async () => {
  const c = new PresenceClient('ws://gw/ws', { token: 't', format: 'json', websocket: GoldenSocket });
  void c.connect();
  await new Promise((resolve) => setImmediate(resolve));
  const socket = GoldenSocket.last;
  socket.play('welcome_no_expiry');
  const since = '1763790000456-0000000001';
  const calls: Record<string, () => Promise<unknown>> = {
    set_status: () => c.setStatus('busy', 'in a meeting'),
    subscribe: () => c.subscribe(['bob', 'carol']),
    unsubscribe: () => c.unsubscribe(['bob', 'carol']),
    query: () => c.query(['bob', 'carol']),
    join: () => c.join('team'),
    leave: () => c.leave('team'),
    group_online: () => c.groupOnline('team'),
    send: () => c.send({ group: 'team' }, { text: 'hello' }, { clientMsgId: 'c-1' }),
    sync: () => c.sync('team', { since, limit: 50 }),
    read: () => c.read('team', since),
    unread: () => c.unread(),
  };
  const written = readdirSync(path.join(GOLDEN, 'client')).map((f) => f.slice(0, -'.json'.length));
  // The client writes the others itself: ack_offline after a stored message (below), ping on
  // silence and refresh ahead of a token's expiry (client.test.ts).
  assert.deepEqual(
    written.filter((name) => !(name in calls)).sort(),
    ['ack_offline', 'ping', 'refresh'],
  );
  calls.ack_offline = async () => {
    socket.play('message_offline');
    await new Promise((resolve) => setTimeout(resolve, 10));
  };
  for (const [name, call] of Object.entries(calls)) {
    if (name === 'ack_offline') await call();
    else void call().catch(() => {});
    const frame = socket.sent.at(-1)!;
    const golden = JSON.parse(readFileSync(path.join(GOLDEN, 'client', `${name}.json`), 'utf8'));
    assert.equal(typeof frame.id, 'number');
    assert.deepEqual({ ...frame, id: golden.id }, golden, name);
    assert.deepEqual(Object.keys(frame), Object.keys(golden), `${name}: fields in the crate's order`);
  }
  c.close();
});
