// A minimal typed event emitter: browsers, React Native and Node share no common one.

type Handler = (...args: any[]) => unknown;

export class Emitter<Events extends { [K in keyof Events]: Handler }> {
  private handlers = new Map<keyof Events, Set<Handler>>();

  /** Calls `handler` on every `event`; returns a function that stops it. */
  on<K extends keyof Events>(event: K, handler: Events[K]): () => void {
    let set = this.handlers.get(event);
    if (!set) this.handlers.set(event, (set = new Set()));
    set.add(handler);
    return () => this.off(event, handler);
  }

  off<K extends keyof Events>(event: K, handler: Events[K]): void {
    this.handlers.get(event)?.delete(handler);
  }

  /** Calls every handler; returns what they returned (a promise from an async handler). A handler that throws is reported through `onThrow`. */
  protected emit<K extends keyof Events>(
    event: K,
    onThrow: (e: unknown) => void,
    ...args: Parameters<Events[K]>
  ): unknown[] {
    const results: unknown[] = [];
    for (const handler of [...(this.handlers.get(event) ?? [])]) {
      try {
        results.push(handler(...args));
      } catch (e) {
        onThrow(e);
      }
    }
    return results;
  }
}
