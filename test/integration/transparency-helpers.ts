/**
 * Small helpers shared by the transparency / large-data / load integration
 * tests (not a test file itself). Everything here waits on a real condition
 * with a deadline and fails loudly; nothing sleeps to synchronise.
 */
import { readFileSync } from "node:fs";
import type { Sql } from "../harness/index.ts";

/** Thrown from a waitFor check: stop waiting and fail at once with this error. */
export class WaitAbort extends Error {}

/**
 * Poll `check` until it returns a truthy value; throw with `what` (and the
 * last value / error seen) when `timeoutMs` passes first. Polling a condition
 * is the wait; the interval only spaces the polls.
 */
export async function waitFor<T>(
  what: string,
  check: () => T | Promise<T>,
  { timeoutMs = 15_000, intervalMs = 20 }: { timeoutMs?: number; intervalMs?: number } = {},
): Promise<NonNullable<T>> {
  const deadline = performance.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v as NonNullable<T>;
      last = v;
    } catch (e) {
      if (e instanceof WaitAbort) throw e;
      last = e;
    }
    if (performance.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
    }
    await Bun.sleep(intervalMs);
  }
}

/** Reject with a clear message if `p` does not settle within `timeoutMs`. */
export async function within<T>(what: string, p: Promise<T>, timeoutMs = 30_000): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, rej) => {
        timer = setTimeout(() => rej(new Error(`timed out after ${timeoutMs} ms: ${what}`)), timeoutMs);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

export interface MemStatus {
  /** Current resident set size, kB (VmRSS). */
  rssKb: number;
  /** Peak resident set size over the process's life, kB (VmHWM). */
  hwmKb: number;
}

/** VmRSS and VmHWM of a process from /proc/<pid>/status (Linux). */
export function memStatus(pid: number): MemStatus {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (key: string) => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(status);
    if (!m) throw new Error(`no ${key} in /proc/${pid}/status`);
    return Number(m[1]);
  };
  return { rssKb: kb("VmRSS"), hwmKb: kb("VmHWM") };
}

/**
 * Samples a process's VmRSS every `intervalMs` (plus on demand with
 * sample()) and keeps the maximum. stop() ends the sampling.
 */
export class RssSampler {
  maxKb = 0;
  samples = 0;
  private timer: ReturnType<typeof setInterval>;
  constructor(
    private readonly pid: number,
    intervalMs = 10,
  ) {
    this.sample();
    this.timer = setInterval(() => {
      try {
        this.sample();
      } catch {
        // reported by the next explicit sample()/memStatus()
      }
    }, intervalMs);
  }
  /** The process's current VmRSS (kB); records it. Stops sampling if the process is gone. */
  sample(): number {
    let rssKb: number;
    try {
      rssKb = memStatus(this.pid).rssKb;
    } catch (e) {
      clearInterval(this.timer);
      throw e;
    }
    this.samples++;
    if (rssKb > this.maxKb) this.maxKb = rssKb;
    return rssKb;
  }
  stop(): void {
    clearInterval(this.timer);
    try {
      this.sample();
    } catch {
      // process gone: keep what was sampled
    }
  }
}

export const mb = (kb: number) => Math.round((kb / 1024) * 10) / 10;

/**
 * Kernel send/receive queue sizes of the loopback TCP socket whose local
 * port is `localPort` and remote port is `remotePort` (from /proc/net/tcp).
 * rx = bytes received by the kernel that the owning process has not read.
 */
export function tcpQueues(localPort: number, remotePort: number): { tx: number; rx: number } | undefined {
  const hex = (n: number) => n.toString(16).toUpperCase().padStart(4, "0");
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 5) continue;
      if (f[1]!.endsWith(":" + hex(localPort)) && f[2]!.endsWith(":" + hex(remotePort))) {
        const [tx, rx] = f[4]!.split(":").map((x) => parseInt(x, 16));
        return { tx: tx!, rx: rx! };
      }
    }
  }
  return undefined;
}

export interface Backend {
  pid: number;
  /** The peer's port as the server sees it: the proxy's local port of its upstream socket. */
  client_port: number | null;
  state: string | null;
  wait_event_type: string | null;
  wait_event: string | null;
  query: string;
  usename: string;
}

/** Server backends whose application_name is `appName` (admin connection). */
export async function backendsOf(admin: Sql, appName: string): Promise<Backend[]> {
  return (await admin`
    SELECT pid, client_port, state, wait_event_type, wait_event, query, usename::text AS usename
    FROM pg_stat_activity
    WHERE application_name = ${appName} AND pid <> pg_backend_pid()
  `) as unknown as Backend[];
}

/** A unique application_name for this test process. */
let seq = 0;
export function appName(label: string): string {
  return `mg-${label}-${process.pid}-${++seq}`;
}
