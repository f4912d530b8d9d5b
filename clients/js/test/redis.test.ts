// Two nodes on one real Redis: presence and messages cross nodes; a node killed and restarted
// under its clients loses them nothing: they reconnect, resubscribe, see what changed while they
// were away, and get the group's messages they missed, once and in order, before the live ones.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { Gateway, jwt, Recorder, Redis, until } from './harness.js';

describe('two nodes on Redis', () => {
  let redis: Redis;
  let a: Gateway;
  let b: Gateway;
  before(async () => {
    redis = await Redis.start();
    [a, b] = await Promise.all([Gateway.start({ redis }), Gateway.start({ redis })]);
  });
  after(async () => {
    await Promise.all([a?.stop(), b?.stop()]);
    await redis?.stop();
  });

  test('presence and messages cross nodes', async () => {
    await a.openGroup('x-team');
    const alice = new Recorder(a.ws, { token: jwt('x-alice') });
    const bob = new Recorder(b.ws, { token: jwt('x-bob', 2) });
    try {
      await Promise.all([alice.client.connect(), bob.client.connect()]);
      await alice.client.subscribe(['x-bob']);
      await until('bob online at alice', () => alice.client.presenceOf('x-bob')?.status === 'online');
      assert.deepEqual(alice.client.presenceOf('x-bob')?.platforms, [2]);
      await bob.client.setStatus('away', 'lunch');
      await until('bob away at alice', () => alice.client.presenceOf('x-bob')?.status === 'away');

      await alice.client.join('x-team');
      await bob.client.join('x-team');
      const ack = await alice.client.send({ group: 'x-team' }, { text: 'across' });
      assert.equal(ack.result, 'delivered');
      await until('bob got it on the other node', () => bob.texts().includes('across'));
      const dm = await bob.client.send({ user: 'x-alice' }, { text: 'private' });
      assert.equal(dm.result, 'delivered');
      await until('alice got the private one', () => alice.texts().includes('private'));
    } finally {
      alice.client.close();
      bob.client.close();
    }
  });

  test('a node killed and restarted: resubscribed, presence re-read, group messages caught up', async () => {
    await a.openGroup('k-team');
    const alice = new Recorder(a.ws, { token: jwt('k-alice'), backoff: { maxDelayMs: 1000 } });
    const bob = new Recorder(b.ws, { token: jwt('k-bob') });
    try {
      await Promise.all([alice.client.connect(), bob.client.connect()]);
      await alice.client.join('k-team');
      await bob.client.join('k-team');
      await alice.client.subscribe(['k-bob']);
      await until('bob online at alice', () => alice.client.presenceOf('k-bob')?.status === 'online');
      await bob.client.send({ group: 'k-team' }, { text: 'm1' });
      await until('m1 live', () => alice.texts().includes('m1'));

      await a.kill();
      await until('alice lost her node', () => alice.client.state === 'connecting');
      // While alice is away: two messages and a status change.
      await bob.client.send({ group: 'k-team' }, { text: 'm2' });
      await bob.client.send({ group: 'k-team' }, { text: 'm3' });
      await bob.client.setStatus('busy', 'away from alice');
      await a.restart();
      await until('alice back', () => alice.client.state === 'connected');
      await until('alice caught up', () => alice.texts().includes('m3'));
      await until('bob busy at alice', () => alice.client.presenceOf('k-bob')?.status === 'busy');
      assert.equal(alice.last('k-bob')?.text, 'away from alice');

      await bob.client.send({ group: 'k-team' }, { text: 'm4' });
      await until('m4 live', () => alice.texts().includes('m4'));
      assert.deepEqual(alice.texts(), ['m1', 'm2', 'm3', 'm4'], 'every message once, in order');
      const ids = alice.messages.map((m) => m.msg_id);
      assert.deepEqual(ids, [...ids].sort());
      assert.ok(alice.closes.every((c) => c.reconnect));
    } finally {
      alice.client.close();
      bob.client.close();
    }
  });
});
