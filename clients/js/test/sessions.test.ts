// Close codes and tokens against real nodes: 4003 (kick), 4009 (too many connections), 4011
// (replaced) end the client; 4001 (revoked) reconnects with a fresh token; refresh keeps a
// short-lived token's connection; 1001 (drain) and a SIGKILL reconnect once the node is back.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Gateway, jwt, Recorder, sleep, until } from './harness.js';

/** A token function that counts its calls. */
function minting(mint: () => string) {
  const tokens = { minted: 0, token: () => (tokens.minted++, mint()) };
  return tokens;
}

/** A client that must stay stopped: no reconnect attempt within a few of the shortest backoffs. */
async function staysStopped(r: Recorder): Promise<void> {
  const states = r.states.length;
  await sleep(1500);
  assert.equal(r.client.state, 'disconnected');
  assert.equal(r.states.length, states, 'no reconnect attempt');
}

test('4003: kicked by the app backend, the client stops and says why', async () => {
  const node = await Gateway.start();
  const alice = new Recorder(node.ws, { token: jwt('k-alice') });
  try {
    await alice.client.connect();
    const { status } = await node.rest('POST', '/v1/users/k-alice/disconnect', { reason: 'banned' });
    assert.equal(status, 202);
    await until('closed', () => alice.closes.length === 1);
    assert.deepEqual(alice.closes[0], { code: 4003, reason: 'banned', reconnect: false });
    await staysStopped(alice);
  } finally {
    alice.client.close();
    await node.stop();
  }
});

test('4009 and 4011: too many connections, and replaced by a newer login', async () => {
  const node = await Gateway.start({ args: ['--max-conns-per-user=1'] });
  const single = await Gateway.start({ args: ['--multi-login=single'] });
  const first = new Recorder(node.ws, { token: jwt('l-alice') });
  const second = new Recorder(node.ws, { token: jwt('l-alice') });
  const old = new Recorder(single.ws, { token: jwt('l-bob', 1) });
  const newer = new Recorder(single.ws, { token: jwt('l-bob', 5) });
  try {
    await first.client.connect();
    await assert.rejects(second.client.connect(), { code: 'closed' });
    assert.equal(second.closes[0].code, 4009);
    assert.equal(second.closes[0].reconnect, false);
    assert.equal(first.client.state, 'connected');

    await old.client.connect();
    await newer.client.connect();
    await until('the older login replaced', () => old.closes.length === 1);
    assert.equal(old.closes[0].code, 4011);
    assert.equal(old.closes[0].reconnect, false);
    await staysStopped(old);
    assert.equal(newer.client.state, 'connected');
  } finally {
    for (const r of [first, second, old, newer]) r.client.close();
    await node.stop();
    await single.stop();
  }
});

test('4001: a revoked token; the client reconnects with a fresh one from its token function', async () => {
  const node = await Gateway.start();
  const tokens = minting(() => jwt('r-alice'));
  const alice = new Recorder(node.ws, { token: tokens.token });
  try {
    await alice.client.connect();
    const before = alice.client.welcome!.conn_id;
    // `iat` has whole seconds: a token minted in the revoke's second is refused too.
    await sleep(1000 - (Date.now() % 1000));
    assert.equal((await node.rest('POST', '/v1/users/r-alice/revoke')).status, 202);
    await until('closed with 4001', () => alice.closes.some((c) => c.code === 4001));
    await until('welcomed again', () => alice.client.state === 'connected' && alice.client.welcome!.conn_id !== before);
    assert.ok(tokens.minted >= 2, 'a fresh token');
    assert.ok(alice.closes.every((c) => c.reconnect));
  } finally {
    alice.client.close();
    await node.stop();
  }
});

test('refresh: a token living four seconds keeps its connection past its expiry', async () => {
  const node = await Gateway.start();
  const tokens = minting(() => jwt('f-alice', 5, 4));
  const alice = new Recorder(node.ws, { token: tokens.token });
  try {
    await alice.client.connect();
    const first = alice.client.welcome!;
    assert.ok(first.expires_at, 'a JWT with exp tells the client when it expires');
    await until('past the first token expiry', () => Date.now() > first.expires_at! + 1500, 10_000);
    assert.ok(tokens.minted >= 2, `refreshed (${tokens.minted} tokens)`);
    assert.equal(alice.client.state, 'connected');
    assert.equal(alice.client.welcome!.conn_id, first.conn_id, 'the same connection');
    assert.deepEqual(alice.closes, []);
  } finally {
    alice.client.close();
    await node.stop();
  }
});

test('1001 and SIGKILL: the client reconnects once the node is back, its subscriptions too', async () => {
  const node = await Gateway.start();
  const alice = new Recorder(node.ws, { token: jwt('d-alice'), backoff: { maxDelayMs: 1000 } });
  const bob = new Recorder(node.ws, { token: jwt('d-bob'), backoff: { maxDelayMs: 1000 } });
  try {
    await alice.client.connect();
    await alice.client.subscribe(['d-bob']);
    await node.terminate(); // drain: 1001
    await until('1001 seen', () => alice.closes.some((c) => c.code === 1001 && c.reconnect));
    assert.equal(alice.client.state, 'connecting');
    await node.restart();
    await until('reconnected after the drain', () => alice.client.state === 'connected');

    await node.kill(); // no close frame: an abnormal close
    await until('the drop seen', () => alice.closes.length === 2);
    assert.equal(alice.closes[1].code, 1006);
    await node.restart();
    await until('reconnected after the kill', () => alice.client.state === 'connected');

    await bob.client.connect();
    await until('bob online through the resubscription', () => alice.client.presenceOf('d-bob')?.status === 'online');
  } finally {
    alice.client.close();
    bob.client.close();
    await node.stop();
  }
});
