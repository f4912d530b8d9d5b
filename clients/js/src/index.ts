// @presence-gateway/client: the presence gateway's client for browsers, React Native and Node.
export { PresenceClient } from './client.js';
export type {
  ClientEvents,
  ClientOptions,
  CloseInfo,
  State,
  TokenSource,
  WebSocketConstructor,
  WebSocketLike,
} from './client.js';
export { decodeFrame, encodeFrame, SUBPROTOCOL } from './codec.js';
export type { Format } from './codec.js';
export { PresenceError } from './errors.js';
export type { PresenceErrorCode } from './errors.js';
export { CloseCode } from './frames.js';
export type {
  Ack,
  ClientFrame,
  Destination,
  ErrorCode,
  Message,
  Platform,
  Presence,
  PresenceStatus,
  Request,
  RouteResult,
  ServerFrame,
  Status,
  Welcome,
} from './frames.js';
export { afterClose, backoffDelay, DEFAULT_BACKOFF, TERMINAL_CODES } from './reconnect.js';
export type { BackoffOptions, CloseDecision } from './reconnect.js';
