// The live presence page: a roster with status dots, platforms and "last seen", a status picker
// and the #demo group chat, all through the SDK (served as /sdk.js by demo/server.mjs).
import { PresenceClient } from '/sdk.js';

const $ = (id) => document.getElementById(id);
const PLATFORMS = { 1: 'iOS', 2: 'Android', 3: 'Windows', 4: 'macOS', 5: 'Web', 6: 'Mini program', 7: 'Linux', 8: 'Console' };
const params = new URLSearchParams(location.search);
const user = params.get('user');
const platform = Number(params.get('platform') ?? 5);

if (!user) {
  $('login').hidden = false;
  $('login').onsubmit = (e) => {
    e.preventDefault();
    location.search = `?user=${encodeURIComponent($('login-user').value)}&platform=${$('login-platform').value}`;
  };
} else {
  start().catch((e) => banner(`Could not start: ${e.message}`));
}

function banner(text) {
  $('banner').textContent = text;
  $('banner').hidden = !text;
}

async function fetchToken() {
  const res = await fetch(`/token?user=${encodeURIComponent(user)}&platform=${platform}`, { method: 'POST' });
  const json = await res.json();
  if (!res.ok) throw new Error(json.error);
  return json;
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return 'just now';
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

async function start() {
  const first = await fetchToken();
  let unused = first.token;
  const client = new PresenceClient(first.ws_url, {
    // The first token came with the URL; later ones (after 4001, before expiry) are fetched.
    token: async () => {
      const token = unused ?? (await fetchToken()).token;
      unused = undefined;
      return token;
    },
  });
  window.presenceClient = client; // for the console, and the browser test
  $('me').textContent = `${user} · ${PLATFORMS[platform] ?? platform}`;
  $('app').hidden = false;

  const roster = new Map(); // user -> presence (or undefined until known)
  const seen = new Set(); // message ids on the page

  function renderRoster() {
    const list = $('roster');
    list.replaceChildren(
      ...[...roster.keys()].sort().map((name) => {
        const p = roster.get(name);
        const li = document.createElement('li');
        li.dataset.user = name;
        li.dataset.status = p?.status ?? 'unknown';
        const detail = !p
          ? ''
          : p.status === 'offline'
            ? p.last_seen ? `last seen ${ago(p.last_seen)}` : 'never seen'
            : [p.text, p.platforms.map((n) => PLATFORMS[n] ?? n).join(', ')].filter(Boolean).join(' · ');
        li.innerHTML = '<span class="dot"></span><span class="name"></span><span class="status"></span><span class="detail"></span>';
        li.querySelector('.name').textContent = name === user ? `${name} (you)` : name;
        li.querySelector('.status').textContent = p?.status ?? '…';
        li.querySelector('.detail').textContent = detail;
        return li;
      }),
    );
  }

  function addMessage(m) {
    if (seen.has(m.msg_id)) return;
    seen.add(m.msg_id);
    const li = document.createElement('li');
    li.className = m.from === user ? 'mine' : '';
    li.dataset.msgId = m.msg_id;
    const from = document.createElement('span');
    from.className = 'from';
    from.textContent = m.from;
    const text = typeof m.body?.text === 'string' ? m.body.text : JSON.stringify(m.body);
    li.append(from, document.createTextNode(text));
    li.title = new Date(m.sent_at).toLocaleString();
    const list = $('messages');
    // Ids of one group sort in send order: keep the list in it whatever arrives first.
    const after = [...list.children].find((el) => el.dataset.msgId > m.msg_id);
    list.insertBefore(li, after ?? null);
    list.scrollTop = list.scrollHeight;
  }

  async function watchRoster() {
    const { users } = await (await fetch('/roster')).json();
    const fresh = [user, ...users].filter((u) => !roster.has(u));
    for (const u of fresh) roster.set(u, undefined);
    if (fresh.length) {
      renderRoster();
      await client.subscribe(fresh);
    }
  }

  client.on('state', (state) => {
    $('conn').dataset.state = state;
    $('conn').textContent = state;
    if (state === 'connected') banner('');
  });
  client.on('close', (info) => {
    if (!info.reconnect) banner(`Disconnected (${info.code}${info.reason ? `: ${info.reason}` : ''}). Reload to come back.`);
  });
  client.on('presence', (p) => {
    roster.set(p.user, p);
    renderRoster();
  });
  client.on('message', (m) => {
    if (m.to.group === 'demo' || m.to.user) addMessage(m);
  });

  await client.connect();
  await client.join('demo');
  await watchRoster();
  const { messages } = await client.sync('demo', { limit: 50 });
  messages.forEach(addMessage);
  if (messages.length) await client.read('demo', messages.at(-1).msg_id);
  setInterval(() => watchRoster().catch(() => {}), 5000);
  setInterval(renderRoster, 30_000);

  $('status-form').onsubmit = async (e) => {
    e.preventDefault();
    const text = $('status-text').value.trim();
    await client.setStatus($('status-pick').value, text || undefined).catch((err) => banner(err.message));
  };
  $('compose').onsubmit = async (e) => {
    e.preventDefault();
    const text = $('text').value.trim();
    if (!text) return;
    $('text').value = '';
    try {
      const ack = await client.send({ group: 'demo' }, { text });
      addMessage({ msg_id: ack.msg_id, from: user, to: { group: 'demo' }, body: { text }, sent_at: Date.now() });
    } catch (err) {
      banner(`Not sent: ${err.message}`);
    }
  };
}
