// The demo page in headless Chromium (Debian's, driven by playwright-core; no browser download),
// on a real node: two pages as two users; one changes status and the other's roster shows it;
// one sends and the other sees it. A screenshot goes to test-results/.

import assert from 'node:assert/strict';
import { existsSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { chromium, type Page } from 'playwright-core';

import { API_KEY, Gateway, REPO } from './harness.js';

const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
export const SCREENSHOT_DIR = path.join(REPO, 'clients/js/test-results');

test('the demo page: live status and chat between two users in Chromium', async (t) => {
  assert.ok(existsSync(CHROMIUM), `no browser at ${CHROMIUM}: apt-get install chromium (make test does)`);
  const node = await Gateway.start();
  // @ts-expect-error: a plain ESM module without types, shared with `make demo`.
  const { startDemoServer } = await import('../../demo/server.mjs');
  const demo = await startDemoServer({ port: 0, gateway: node.http, apiKey: API_KEY });
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--headless=new'] });
  t.after(async () => {
    await browser.close();
    await demo.close();
    await node.stop();
  });

  const open = async (user: string, platform: number): Promise<Page> => {
    const page = await browser.newPage({ viewport: { width: 1100, height: 640 } });
    page.on('pageerror', (e) => assert.fail(`${user}'s page: ${e.message}`));
    await page.goto(`${demo.url}/?user=${user}&platform=${platform}`);
    await page.locator('#conn[data-state="connected"]').waitFor();
    return page;
  };
  const alice = await open('alice', 5);
  const bob = await open('bob', 1);

  // Each sees the other online, with the platform.
  await alice.locator('li[data-user="bob"][data-status="online"]').waitFor();
  assert.match(await alice.locator('li[data-user="bob"] .detail').innerText(), /iOS/);
  await bob.locator('li[data-user="alice"][data-status="online"]').waitFor();

  // Bob is busy; alice's roster shows it, with his text.
  await bob.selectOption('#status-pick', 'busy');
  await bob.fill('#status-text', 'in a meeting');
  await bob.click('#status-form button');
  await alice.locator('li[data-user="bob"][data-status="busy"]').waitFor();
  assert.match(await alice.locator('li[data-user="bob"] .detail').innerText(), /in a meeting/);

  // Alice says hello; bob sees it.
  await alice.fill('#text', 'hello from alice');
  await alice.click('#compose button');
  await bob.locator('#messages li', { hasText: 'hello from alice' }).waitFor();
  await bob.fill('#text', 'hi alice!');
  await bob.press('#text', 'Enter');
  await alice.locator('#messages li', { hasText: 'hi alice!' }).waitFor();

  mkdirSync(SCREENSHOT_DIR, { recursive: true });
  const shot = path.join(SCREENSHOT_DIR, 'demo-alice.png');
  await alice.screenshot({ path: shot, fullPage: true });
  t.diagnostic(`screenshot: ${shot}`);

  // Offline users show when they were last seen.
  await bob.close();
  await alice.locator('li[data-user="bob"][data-status="offline"]').waitFor();
  assert.match(await alice.locator('li[data-user="bob"] .detail').innerText(), /last seen/);
});
