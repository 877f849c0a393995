/**
 * Writes to one socket with backpressure. `socket.write` may take fewer
 * bytes than offered; the rest waits here (copied, since the caller's
 * buffer may be a view it reuses) and the producer is paused until the
 * socket drains. The queue is therefore bounded by one read's worth per
 * paused producer, never by the size of a result set.
 */

export interface Writable {
  write(data: Uint8Array): number;
}

export class Outbox {
  private queue: Uint8Array[] = [];
  private queuedBytes = 0;

  constructor(
    private readonly socket: Writable,
    /** Called when bytes start waiting: pause whoever produces them. */
    private readonly onBacklog: () => void,
    /** Called when the backlog is gone: resume the producer. */
    private readonly onClear: () => void,
  ) {}

  get backlog(): number {
    return this.queuedBytes;
  }

  send(bytes: Uint8Array): void {
    if (this.queue.length > 0) {
      this.enqueue(bytes);
      return;
    }
    const written = this.socket.write(bytes);
    if (written >= bytes.length) return;
    this.enqueue(bytes.subarray(Math.max(written, 0)));
    this.onBacklog();
  }

  /** Socket became writable again: push out what waits, in order. */
  flush(): void {
    while (this.queue.length > 0) {
      const head = this.queue[0]!;
      const written = this.socket.write(head);
      if (written < head.length) {
        const rest = head.subarray(Math.max(written, 0));
        this.queue[0] = rest;
        this.queuedBytes -= head.length - rest.length;
        return;
      }
      this.queue.shift();
      this.queuedBytes -= head.length;
    }
    this.onClear();
  }

  private enqueue(bytes: Uint8Array): void {
    const copy = bytes.slice();
    this.queue.push(copy);
    this.queuedBytes += copy.length;
  }
}
