// The two encodings (MessagePack maps with string keys, JSON objects) and the check that a decoded
// frame has the fields docs/protocol.md promises, so a drifted server fails loudly here and not
// deep in an app's handler.

import { decode, encode } from '@msgpack/msgpack';

import { PresenceError } from './errors.js';
import type { ClientFrame, ServerFrame } from './frames.js';

export type Format = 'msgpack' | 'json';

/** The WebSocket subprotocol that picks each encoding. */
export const SUBPROTOCOL: Record<Format, string> = {
  msgpack: 'presence.v1.msgpack',
  json: 'presence.v1.json',
};

/** A frame as the socket sends it: MessagePack as binary, JSON as text. */
export function encodeFrame(frame: ClientFrame, format: Format): string | Uint8Array {
  return format === 'json' ? JSON.stringify(frame) : encode(frame, { ignoreUndefined: true });
}

// Field kinds: s string, n number, b boolean, a array, o object, p array of presence objects,
// m array of message objects, * present with any value.
type Kind = 's' | 'n' | 'b' | 'a' | 'o' | 'p' | 'm' | '*';
const PRESENCE: Record<string, Kind> = { user: 's', status: 's', platforms: 'a', version: 'n' };
const MESSAGE: Record<string, Kind> = { msg_id: 's', from: 's', to: 'o', body: '*', sent_at: 'n' };
const REQUIRED: Record<string, Record<string, Kind>> = {
  welcome: { conn_id: 's', user: 's', platform: 'n', node: 's', heartbeat_ms: 'n', server_time: 'n' },
  pong: {},
  ok: {},
  error: { code: 's', message: 's' },
  presence: PRESENCE,
  presence_list: { items: 'p' },
  member_list: { group: 's', users: 'a' },
  message: MESSAGE,
  ack: { msg_id: 's', result: 's', delivered: 'n', stored: 'n' },
  unread_counts: { groups: 'o' },
  history: { group: 's', messages: 'm', more: 'b' },
};

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array);
}

function fits(v: unknown, kind: Kind): boolean {
  switch (kind) {
    case 's':
      return typeof v === 'string';
    case 'n':
      return typeof v === 'number';
    case 'b':
      return typeof v === 'boolean';
    case 'a':
      return Array.isArray(v);
    case 'o':
      return isObject(v);
    case 'p':
      return Array.isArray(v) && v.every((x) => hasFields(x, PRESENCE));
    case 'm':
      return Array.isArray(v) && v.every((x) => hasFields(x, MESSAGE));
    default:
      return v !== undefined;
  }
}

function hasFields(v: unknown, fields: Record<string, Kind>): boolean {
  return isObject(v) && Object.keys(fields).every((k) => fits(v[k], fields[k]));
}

/**
 * Decodes one server frame: a string is JSON, bytes are MessagePack. Throws a `PresenceError`
 * with code `protocol` when it is not one object with a `type` and the fields that type promises.
 * Frame types this client does not know pass unchecked (the protocol may add some).
 */
export function decodeFrame(data: string | ArrayBuffer | Uint8Array): ServerFrame {
  let value: unknown;
  try {
    value =
      typeof data === 'string'
        ? JSON.parse(data)
        : decode(data instanceof Uint8Array ? data : new Uint8Array(data));
  } catch (e) {
    throw new PresenceError('protocol', `undecodable frame: ${String(e)}`);
  }
  if (!isObject(value) || typeof value.type !== 'string') {
    throw new PresenceError('protocol', 'a frame must be one map with a type');
  }
  const fields = REQUIRED[value.type];
  if (fields && !hasFields(value, fields)) {
    throw new PresenceError('protocol', `malformed ${value.type} frame`);
  }
  return value as ServerFrame;
}
