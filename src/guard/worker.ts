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
 * It checks one statement at a time, and tenants take turns: a tenant that
 * sends many big statements waits behind itself, not in front of others
 * (a parked session sends nothing more, so each session has at most one
 * statement waiting). If the worker dies, pending and later statements are
 * checked on the main thread: slower, never unchecked.
 */
import { log } from "../log.ts";
import { guardMessage, type GuardOptions, type GuardResult } from "./guard.ts";

interface Request {
  id: number;
  type: number;
  message: Uint8Array;
  options: GuardOptions;
}

interface Reply {
  id: number;
  result: GuardResult | null;
}

/** Worker side: answer each request with guardMessage's verdict (a refusal or a rewrite). */
export function serveGuardRequests(): void {
  const port = globalThis as unknown as { onmessage: (e: MessageEvent<Request>) => void; postMessage(m: Reply, transfer?: ArrayBuffer[]): void };
  port.onmessage = (e) => {
    const { id, type, message, options } = e.data;
    const result = guardMessage(type, message, 0, message.length, options);
    port.postMessage({ id, result: result ?? null }, result ? [result.bytes.buffer as ArrayBuffer] : []);
  };
}

interface Job {
  request: Request;
  resolve: (result: GuardResult | undefined) => void;
}

class GuardWorker {
  private worker: Worker | undefined;
  private broken = false;
  private next = 0;
  /** Waiting jobs by tenant, tenants in turn order (a Map keeps insertion order). */
  private readonly queues = new Map<string, Job[]>();
  private inFlight: Job | undefined;

  /** The verdict on `message` (a copy the caller hands over), checked in `tenant`'s turn. */
  check(type: number, message: Uint8Array, options: GuardOptions, tenant: string): Promise<GuardResult | undefined> {
    const request: Request = { id: ++this.next, type, message, options };
    if (this.broken) return Promise.resolve(onMainThread(request));
    return new Promise((resolve) => {
      const queue = this.queues.get(tenant);
      if (queue) queue.push({ request, resolve });
      else this.queues.set(tenant, [{ request, resolve }]);
      this.pump();
    });
  }

  /** Send the next tenant's oldest job, if the worker is free. */
  private pump(): void {
    if (this.inFlight || this.broken) return;
    const first = this.queues.entries().next();
    if (first.done) return;
    const [tenant, queue] = first.value;
    const job = queue.shift()!;
    this.queues.delete(tenant);
    if (queue.length > 0) this.queues.set(tenant, queue); // to the back of the line
    this.inFlight = job;
    this.started().postMessage(job.request);
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const worker = new Worker(Bun.main);
    worker.unref(); // never what keeps the proxy running
    worker.onmessage = (e: MessageEvent<Reply>) => {
      const job = this.inFlight;
      this.inFlight = undefined;
      if (job?.request.id === e.data.id) job.resolve(e.data.result ?? undefined);
      this.pump();
    };
    worker.onerror = (e) => {
      log.error(`guard worker failed (${e.message}); checking statements on the main thread from now on`);
      this.broken = true;
      this.worker = undefined;
      const jobs = [...(this.inFlight ? [this.inFlight] : []), ...[...this.queues.values()].flat()];
      this.inFlight = undefined;
      this.queues.clear();
      for (const job of jobs) job.resolve(onMainThread(job.request));
    };
    return (this.worker = worker);
  }
}

function onMainThread(r: Request): GuardResult | undefined {
  return guardMessage(r.type, r.message, 0, r.message.length, r.options);
}

export const guardWorker = new GuardWorker();
