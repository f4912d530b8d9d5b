// The demo's web server, playing the app backend: it serves the page and the SDK bundle, and
// hands the page tokens from the gateway's REST API (the API key stays here, never in the
// browser). Nothing but Node: `node demo/server.mjs` after `npm run build`, with a gateway in
// dev mode on 127.0.0.1:8080 (`make run`). `make demo` does both steps.
//
//   --port 8081  --gateway http://127.0.0.1:8080  --api-key dev  (or DEMO_PORT, DEMO_GATEWAY, DEMO_API_KEY)

import { readFile } from 'node:fs/promises';
import { createServer } from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const FILES = {
  '/': ['index.html', 'text/html; charset=utf-8'],
  '/demo.js': ['demo.js', 'text/javascript; charset=utf-8'],
  '/sdk.js': ['../dist/presence-client.min.js', 'text/javascript; charset=utf-8'],
};
/** The group the page chats in, and the users its roster always shows. */
export const GROUP = 'demo';
const ROSTER = ['alice', 'bob', 'carol', 'dave'];
const ID = /^[A-Za-z0-9_.:@-]{1,128}$/;

/** Starts the server; resolves to its URL and a `close()`. */
export async function startDemoServer({ port = 8081, gateway = 'http://127.0.0.1:8080', apiKey = 'dev' } = {}) {
  const api = async (method, route, body) => {
    const res = await fetch(`${gateway}${route}`, {
      method,
      headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (!res.ok) throw new Error(`${method} ${route}: ${res.status} ${await res.text()}`);
    return res.status === 204 ? null : res.json();
  };
  await api('PUT', `/v1/groups/${GROUP}`, { join: 'open' });

  const server = createServer(async (req, res) => {
    const url = new URL(req.url ?? '/', 'http://demo');
    const reply = (status, body, type = 'application/json') => {
      res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store' });
      res.end(typeof body === 'string' || body instanceof Buffer ? body : JSON.stringify(body));
    };
    try {
      if (req.method === 'POST' && url.pathname === '/token') {
        const user = url.searchParams.get('user') ?? '';
        const platform = Number(url.searchParams.get('platform') ?? 5);
        if (!ID.test(user) || user === 'system') return reply(400, { error: 'pick a user name of [A-Za-z0-9_.:@-]' });
        const { token, node } = await api('POST', '/v1/tokens', { user, platform, ttl_secs: 3600 });
        const ws = node?.ws_url ?? `${gateway.replace(/^http/, 'ws')}/ws`;
        return reply(200, { token, ws_url: ws });
      }
      if (req.method === 'GET' && url.pathname === '/roster') {
        const { users } = await api('GET', `/v1/groups/${GROUP}/members?limit=100`);
        return reply(200, { users: [...new Set([...ROSTER, ...users])].sort(), group: GROUP });
      }
      const file = req.method === 'GET' && FILES[url.pathname];
      if (!file) return reply(404, { error: 'not found' });
      return reply(200, await readFile(path.join(HERE, file[0])), file[1]);
    } catch (e) {
      return reply(502, { error: String(e.message ?? e) });
    }
  });
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  const bound = server.address().port;
  return {
    url: `http://127.0.0.1:${bound}`,
    close: () => new Promise((resolve) => server.close(resolve)),
  };
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const arg = (name, env, fallback) => {
    const i = process.argv.indexOf(`--${name}`);
    return i > 0 ? process.argv[i + 1] : (process.env[env] ?? fallback);
  };
  const demo = await startDemoServer({
    port: Number(arg('port', 'DEMO_PORT', 8081)),
    gateway: arg('gateway', 'DEMO_GATEWAY', 'http://127.0.0.1:8080'),
    apiKey: arg('api-key', 'DEMO_API_KEY', 'dev'),
  }).catch((e) => {
    console.error(`demo: ${e.message}\nIs the gateway running? Start it with \`make run\` in another terminal.`);
    process.exit(1);
  });
  console.log(`demo: open ${demo.url}/?user=alice and ${demo.url}/?user=bob (two windows, two users)`);
}
