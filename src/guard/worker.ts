/**
 * The guard's lexer off the event loop. A megabyte of dense SQL takes a few
 * hundred milliseconds to lex; on the event loop that would stall every
 * session of the proxy, so statements above LEX_OFF_LOOP_ABOVE are checked
 * on one worker thread instead, and only their own session waits (its
 * scanner parks; see protocol/scanner.ts).
 *
 * The worker is the proxy's own entry point started again (`new
 * Worker(Bun.main)`; src/index.ts serves requests when it is not the main
 * thread), which works the same from source and from the compiled binary.
 * If it dies, pending and later statements are checked on the main thread:
 * slower, never unchecked.
 */
import { log } from "../log.ts";
import { guardMessage } from "./guard.ts";

interface Request {
  id: number;
  type: number;
  message: Uint8Array;
  names: readonly string[];
}

interface Reply {
  id: number;
  replacement: Uint8Array | null;
}

/** Worker side: answer each request with guardMessage's verdict. */
export function serveGuardRequests(): void {
  const port = globalThis as unknown as { onmessage: (e: MessageEvent<Request>) => void; postMessage(m: Reply, transfer?: ArrayBuffer[]): void };
  port.onmessage = (e) => {
    const { id, type, message, names } = e.data;
    const replacement = guardMessage(type, message, 0, message.length, names);
    port.postMessage({ id, replacement: replacement ?? null }, replacement ? [replacement.buffer as ArrayBuffer] : []);
  };
}

class GuardWorker {
  private worker: Worker | undefined;
  private broken = false;
  private next = 0;
  private readonly pending = new Map<number, { request: Request; resolve: (r: Uint8Array | undefined) => void }>();

  /** The verdict on `message` (a copy the caller hands over). */
  check(type: number, message: Uint8Array, names: readonly string[]): Promise<Uint8Array | undefined> {
    const request: Request = { id: ++this.next, type, message, names };
    if (this.broken) return Promise.resolve(onMainThread(request));
    return new Promise((resolve) => {
      this.pending.set(request.id, { request, resolve });
      this.started().postMessage(request);
    });
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(Bun.main);
    worker.unref(); // never what keeps the proxy running
    worker.onmessage = (e: MessageEvent<Reply>) => {
      const p = this.pending.get(e.data.id);
      this.pending.delete(e.data.id);
      p?.resolve(e.data.replacement ?? undefined);
    };
    worker.onerror = (e) => {
      log.error(`guard worker failed (${e.message}); checking statements on the main thread from now on`);
      this.broken = true;
      this.worker = undefined;
      for (const [id, p] of this.pending) {
        this.pending.delete(id);
        p.resolve(onMainThread(p.request));
      }
    };
    return (this.worker = worker);
  }
}

function onMainThread(r: Request): Uint8Array | undefined {
  return guardMessage(r.type, r.message, 0, r.message.length, r.names);
}

export const guardWorker = new GuardWorker();
