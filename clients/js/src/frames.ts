// The frames of wire contract version 1, as docs/protocol.md names them. Objects keep the wire's
// snake_case field names, so what the app reads is exactly what the protocol documents.

/** A status a user can choose. */
export type Status = 'online' | 'away' | 'busy' | 'invisible';
/** A status others can see: `offline` when the user has no connection (or is invisible). */
export type PresenceStatus = Status | 'offline';

/** 1 iOS, 2 Android, 3 Windows, 4 macOS, 5 Web, 6 mini-program web, 7 Linux, 8 admin console. */
export type Platform = number;

/** One user's presence, as in `presence` events and `presence_list` items. */
export interface Presence {
  user: string;
  status: PresenceStatus;
  platforms: Platform[];
  text?: string;
  /** Offline users: when they were last visibly online (ms since the epoch). */
  last_seen?: number;
  /** Grows with every change the viewer can see; an event at or below the last one is stale. */
  version: number;
}

export type Destination = { user: string } | { group: string } | { all: true };

export interface Message {
  /** `<ms, 13 digits>-<sequence, 10 digits>`: ids of one destination sort as strings in send order. */
  msg_id: string;
  from: string;
  to: Destination;
  body: unknown;
  sent_at: number;
  /** True when delivered from offline storage. */
  offline?: boolean;
}

export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'too_large'
  | 'rate_limited'
  | 'unavailable'
  | 'internal';

export type RouteResult = 'delivered' | 'partial' | 'stored' | 'no_recipients';

export interface Welcome {
  conn_id: string;
  user: string;
  platform: Platform;
  node: string;
  heartbeat_ms: number;
  server_time: number;
  expires_at?: number;
}

export interface Ack {
  msg_id: string;
  result: RouteResult;
  delivered: number;
  stored: number;
}

export type ServerFrame =
  | ({ type: 'welcome' } & Welcome)
  | { type: 'pong'; id?: number }
  | { type: 'ok'; id?: number; expires_at?: number }
  | { type: 'error'; id?: number; code: ErrorCode; message: string; outcome?: 'not_sent' | 'unknown' }
  | ({ type: 'presence' } & Presence)
  | { type: 'presence_list'; id?: number; items: Presence[]; denied?: string[] }
  | { type: 'member_list'; id?: number; group: string; users: string[] }
  | ({ type: 'message' } & Message)
  | ({ type: 'ack'; id?: number } & Ack)
  | { type: 'unread_counts'; id?: number; groups: Record<string, number> }
  | { type: 'history'; id?: number; group: string; messages: Message[]; more: boolean };

/** A client frame without its request `id`, which the client adds. */
export type Request =
  | { type: 'ping' }
  | { type: 'set_status'; status: Status; text?: string }
  | { type: 'subscribe'; users: string[] }
  | { type: 'unsubscribe'; users: string[] }
  | { type: 'query'; users: string[] }
  | { type: 'join'; group: string }
  | { type: 'leave'; group: string }
  | { type: 'group_online'; group: string }
  | { type: 'send'; to: Destination; body: unknown; client_msg_id?: string }
  | { type: 'ack_offline'; up_to: string }
  | { type: 'sync'; group: string; since?: string; limit?: number }
  | { type: 'read'; group: string; up_to: string }
  | { type: 'unread' }
  | { type: 'refresh'; token: string };

export type ClientFrame = Request & { id?: number };

/** Close codes of the protocol's table. */
export const CloseCode = {
  GoingAway: 1001,
  ProtocolError: 1002,
  InvalidData: 1007,
  Unauthorized: 4001,
  Kicked: 4003,
  Policy: 4008,
  TooManyConnections: 4009,
  HeartbeatTimeout: 4010,
  Replaced: 4011,
} as const;
