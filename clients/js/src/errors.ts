import type { ErrorCode } from './frames.js';

/**
 * Why a request failed: a protocol error code from the server's `error` frame, or one of this
 * client's own: `timeout` (no answer in time), `closed` (the client stopped: `close()`, or a close
 * code that forbids reconnecting), `protocol` (the server sent something the contract does not allow).
 */
export type PresenceErrorCode = ErrorCode | 'timeout' | 'closed' | 'protocol';

export class PresenceError extends Error {
  override name = 'PresenceError';
  constructor(
    readonly code: PresenceErrorCode,
    message: string,
    /** On a `send` answered `unavailable`: `not_sent`, or `unknown` (it may have gone out). */
    readonly outcome?: 'not_sent' | 'unknown',
    /** On a failed `send`: its `client_msg_id`, to retry with (a repeat is not delivered twice). */
    readonly clientMsgId?: string,
  ) {
    super(message);
  }
}
