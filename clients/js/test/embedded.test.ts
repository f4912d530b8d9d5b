// The SDK against one real gateway node on the embedded backend: presence, messaging, stored
// messages, both encodings.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';

import { PresenceError } from '../src/index.js';
import { Gateway, jwt, Recorder, until } from './harness.js';

describe('one embedded node', () => {
  let node: Gateway;
  before(async () => {
    node = await Gateway.start();
  });
  after(async () => {
    await node.stop();
  });

  for (const format of ['msgpack', 'json'] as const) {
    test(`presence: subscribe, events, stale-free cache, query (${format})`, async () => {
      const alice = new Recorder(node.ws, { token: jwt(`alice-${format}`), format });
      const bob = new Recorder(node.ws, { token: jwt(`bob-${format}`, 1), format });
      try {
        await alice.client.connect();
        const { items } = await alice.client.subscribe([`bob-${format}`]);
        assert.equal(items[0].status, 'offline');
        assert.equal(alice.client.presenceOf(`bob-${format}`)?.status, 'offline');

        await bob.client.connect();
        await until('bob online at alice', () => alice.client.presenceOf(`bob-${format}`)?.status === 'online');
        assert.deepEqual(alice.client.presenceOf(`bob-${format}`)?.platforms, [1]);

        await bob.client.setStatus('busy', 'in a meeting');
        await until('bob busy at alice', () => alice.last(`bob-${format}`)?.status === 'busy');
        assert.equal(alice.last(`bob-${format}`)?.text, 'in a meeting');
        const versions = alice.presence.map((p) => p.version);
        assert.deepEqual(versions, [...versions].sort((a, b) => a - b), 'events come in version order');
        assert.equal(new Set(versions).size, versions.length, 'no version twice');

        const [queried] = await alice.client.query([`bob-${format}`]);
        assert.equal(queried.status, 'busy');

        await alice.client.unsubscribe([`bob-${format}`]);
        assert.equal(alice.client.presenceOf(`bob-${format}`), undefined);
        const seen = alice.presence.length;
        await bob.client.setStatus('away');
        let status = '';
        await until('bob away in a query', () => status === 'away', 10_000, async () => {
          status = (await bob.client.query([`bob-${format}`]))[0].status;
        });
        await alice.client.query([`bob-${format}`]); // a round trip: an event would be here by now
        assert.equal(alice.presence.length, seen, 'no event after unsubscribe');
      } finally {
        alice.client.close();
        bob.client.close();
      }
    });
  }

  test('messaging: join, send with ack, group_online, sync, read, unread', async () => {
    await node.openGroup('team');
    const alice = new Recorder(node.ws, { token: jwt('m-alice') });
    const bob = new Recorder(node.ws, { token: jwt('m-bob') });
    try {
      await Promise.all([alice.client.connect(), bob.client.connect()]);
      await alice.client.join('team');
      await bob.client.join('team');
      // Online members as presence has them: after the connects' batch is flushed.
      let online: string[] = [];
      await until('both online in the group', () => online.length === 2, 10_000, async () => {
        online = await alice.client.groupOnline('team');
      });
      assert.deepEqual(online.sort(), ['m-alice', 'm-bob']);

      const ack = await alice.client.send({ group: 'team' }, { text: 'hello' });
      assert.equal(ack.result, 'delivered');
      assert.match(ack.msg_id, /^\d{13}-\d{10}$/);
      await until('bob got hello', () => bob.messages.length === 1);
      assert.equal(bob.messages[0].msg_id, ack.msg_id);
      assert.equal(bob.messages[0].from, 'm-alice');
      assert.deepEqual(bob.messages[0].body, { text: 'hello' });

      // A repeated client_msg_id is the same message: same ack, nothing delivered twice.
      const first = await alice.client.send({ group: 'team' }, { text: 'once' }, { clientMsgId: 'c-42' });
      const again = await alice.client.send({ group: 'team' }, { text: 'once' }, { clientMsgId: 'c-42' });
      assert.equal(again.msg_id, first.msg_id);
      await until('bob got once', () => bob.texts().includes('once'));
      assert.equal(bob.texts().filter((t) => t === 'once').length, 1);

      const history = await bob.client.sync('team', { since: ack.msg_id });
      assert.deepEqual(history.messages.map((m) => m.msg_id), [first.msg_id]);
      assert.equal(history.more, false);
      assert.deepEqual(await bob.client.unread(), { team: 2 });
      await bob.client.read('team', first.msg_id);
      assert.deepEqual(await bob.client.unread(), { team: 0 });

      await alice.client.leave('team');
      await assert.rejects(
        alice.client.send({ group: 'team' }, { text: 'not a member' }),
        (e: unknown) => e instanceof PresenceError && e.code === 'forbidden' && typeof e.clientMsgId === 'string',
      );
    } finally {
      alice.client.close();
      bob.client.close();
    }
  });

  test('errors carry the protocol code', async () => {
    const carol = new Recorder(node.ws, { token: jwt('e-carol') });
    try {
      await carol.client.connect();
      await assert.rejects(carol.client.join('closed-group'), (e: unknown) => e instanceof PresenceError && e.code === 'forbidden');
      await assert.rejects(
        carol.client.query(['not a valid id']),
        (e: unknown) => e instanceof PresenceError && e.code === 'bad_request',
      );
    } finally {
      carol.client.close();
    }
  });

  test('stored private messages are acknowledged once the handler finished, not before', async () => {
    const sender = new Recorder(node.ws, { token: jwt('o-sender') });
    let probed = -1;
    const probe = async () => {
      const p = new Recorder(node.ws, { token: jwt('o-dave') });
      try {
        await p.client.connect();
        await p.client.unread(); // a round trip: stored messages come right after welcome
        probed = p.messages.length;
      } finally {
        p.client.close();
      }
    };
    try {
      await sender.client.connect();
      const ack = await sender.client.send({ user: 'o-dave' }, { text: 'while you were out' });
      assert.equal(ack.result, 'stored');

      // A handler that fails: no ack_offline, so the message comes again on the next connect.
      const failing = new Recorder(node.ws, { token: jwt('o-dave') });
      failing.client.on('message', async () => {
        throw new Error('the app could not store it');
      });
      await failing.client.connect();
      await until('the failing handler saw it', () => failing.messages.length === 1);
      assert.equal(failing.messages[0].offline, true);
      await until('the failure reported', () => failing.errors.length === 1);
      failing.client.close();

      const dave = new Recorder(node.ws, { token: jwt('o-dave') });
      let finished = false;
      dave.client.on('message', async () => {
        await new Promise((resolve) => setTimeout(resolve, 100));
        finished = true;
      });
      await dave.client.connect();
      await until('dave got it again', () => dave.messages.length === 1 && finished);
      assert.equal(dave.messages[0].msg_id, ack.msg_id);
      dave.client.close();
      // Acknowledged: soon a connect finds nothing stored (the ack may still be on its way).
      await until('nothing stored any more', () => probed === 0, 10_000, probe);
    } finally {
      sender.client.close();
    }
  });
});
