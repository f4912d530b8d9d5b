// The close-code policy as docs/protocol.md's table says, and full-jitter backoff.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { afterClose, backoffDelay, DEFAULT_BACKOFF } from '../src/index.js';

const top = () => 0.999_999;
const bottom = () => 0;

test('backoff ceilings double per failure up to the maximum; the delay is anywhere below', () => {
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 7, 20].map((n) => backoffDelay(n, DEFAULT_BACKOFF, top) + 1);
  assert.deepEqual(ceilings, [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000]);
  assert.equal(backoffDelay(5, DEFAULT_BACKOFF, bottom), 0);
  assert.equal(backoffDelay(2, DEFAULT_BACKOFF, () => 0.5), 1000);
});

test('1001: at once, within the going-away jitter, not counted as a failure', () => {
  const d = afterClose(1001, 9, DEFAULT_BACKOFF, top);
  assert.ok(d.reconnect);
  assert.ok(d.delayMs < DEFAULT_BACKOFF.goingAwayJitterMs);
  assert.equal(d.failure, false);
  assert.equal(d.newToken, false);
});

test('4001: a new token, with backoff', () => {
  const d = afterClose(4001, 2, DEFAULT_BACKOFF, () => 0.5);
  assert.deepEqual(d, { reconnect: true, delayMs: 1000, newToken: true, failure: true });
});

test('4003, 4009, 4011 (and the client-bug codes 1002, 1007): no reconnect', () => {
  for (const code of [4003, 4009, 4011, 1002, 1007]) {
    assert.deepEqual(afterClose(code, 0, DEFAULT_BACKOFF, top), { reconnect: false }, `code ${code}`);
  }
});

test('4008, 4010, an abnormal close and anything else: backoff, same token', () => {
  for (const code of [4008, 4010, 1006, 1011, 1000]) {
    const d = afterClose(code, 1, DEFAULT_BACKOFF, () => 0.5);
    assert.deepEqual(d, { reconnect: true, delayMs: 500, newToken: false, failure: true }, `code ${code}`);
  }
});
