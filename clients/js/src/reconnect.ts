// What to do after a socket closed, as docs/protocol.md's close-code table says. Pure, so the
// whole policy is tested without sockets or clocks.

import { CloseCode } from './frames.js';

export interface BackoffOptions {
  /** Ceiling of the first retry's delay; it doubles with each failure in a row. */
  minDelayMs: number;
  /** Largest ceiling. */
  maxDelayMs: number;
  /** Ceiling of the delay after 1001 (a draining node): at once, spread so a node's clients do not all come back together. */
  goingAwayJitterMs: number;
}

export const DEFAULT_BACKOFF: BackoffOptions = {
  minDelayMs: 500,
  maxDelayMs: 30_000,
  goingAwayJitterMs: 1_000,
};

export type CloseDecision =
  | { reconnect: false }
  | {
      reconnect: true;
      delayMs: number;
      /** Fetch a new token first (4001: bad, expired or revoked). */
      newToken: boolean;
      /** Whether this close counts as a failure that grows the next backoff. */
      failure: boolean;
    };

/** Codes after which the client must not reconnect by itself: kicked, too many connections, replaced, and its own bugs. */
export const TERMINAL_CODES: readonly number[] = [
  CloseCode.Kicked,
  CloseCode.TooManyConnections,
  CloseCode.Replaced,
  CloseCode.ProtocolError,
  CloseCode.InvalidData,
];

/** Full jitter (uniform between 0 and the ceiling), the ceiling doubling per failure in a row. */
export function backoffDelay(failures: number, opts: BackoffOptions, random: () => number): number {
  const ceiling = Math.min(opts.maxDelayMs, opts.minDelayMs * 2 ** Math.min(failures, 30));
  return Math.floor(random() * ceiling);
}

/** `failures`: closes in a row without a `welcome` in between, this one not counted. */
export function afterClose(
  code: number,
  failures: number,
  opts: BackoffOptions,
  random: () => number,
): CloseDecision {
  if (TERMINAL_CODES.includes(code)) return { reconnect: false };
  if (code === CloseCode.GoingAway) {
    return {
      reconnect: true,
      delayMs: Math.floor(random() * opts.goingAwayJitterMs),
      newToken: false,
      failure: false,
    };
  }
  return {
    reconnect: true,
    delayMs: backoffDelay(failures, opts, random),
    newToken: code === CloseCode.Unauthorized,
    failure: true,
  };
}
