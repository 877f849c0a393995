/**
 * Small helpers for the benchmark: process bookkeeping and teardown, ports,
 * running things as the `postgres` OS user, /proc reading, statistics.
 */
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { Socket } from "node:net";
import { join } from "node:path";

export const isRoot = typeof process.getuid === "function" && process.getuid() === 0;

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// teardown: everything the benchmark starts registers a synchronous stopper

const stoppers: Array<{ name: string; fn: () => void }> = [];

/** Register a synchronous teardown (run in reverse order). Returns an unregister function. */
export function onTeardown(name: string, fn: () => void): () => void {
  const entry = { name, fn };
  stoppers.push(entry);
  return () => {
    const i = stoppers.indexOf(entry);
    if (i >= 0) stoppers.splice(i, 1);
  };
}

/** Run every teardown now, newest first; errors are reported, not thrown. */
export function teardownAll(): void {
  while (stoppers.length > 0) {
    const s = stoppers.pop()!;
    try {
      s.fn();
    } catch (e) {
      process.stderr.write(`bench: teardown of ${s.name} failed: ${(e as Error).message}\n`);
    }
  }
}

let hooked = false;
export function installTeardownHooks(): void {
  if (hooked) return;
  hooked = true;
  process.on("exit", teardownAll);
  for (const [sig, n] of [["SIGINT", 2], ["SIGTERM", 15], ["SIGHUP", 1]] as const) {
    process.on(sig, () => {
      process.stderr.write(`\nbench: ${sig}, stopping everything it started…\n`);
      teardownAll();
      process.exit(128 + n);
    });
  }
}

/** Kill a pid if it is alive: `signal` first, SIGKILL after `graceMs` (synchronous, polling). */
export function killPidSync(pid: number, signal: NodeJS.Signals = "SIGTERM", graceMs = 3000): void {
  if (!pidAlive(pid)) return;
  try {
    process.kill(pid, signal);
  } catch {
    return;
  }
  const until = Date.now() + graceMs;
  while (Date.now() < until) {
    if (!pidAlive(pid)) return;
    Bun.sleepSync(10);
  }
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // gone
  }
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
  // A zombie still answers kill(0): treat it as dead.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------------------
// processes

/** Command line, prefixed with `runuser -u postgres --` when we are root. */
export function asPostgres(cmd: string[]): string[] {
  return isRoot ? ["runuser", "-u", "postgres", "--", ...cmd] : cmd;
}

export function postgresIds(): { uid: number; gid: number } {
  const u = Bun.spawnSync(["id", "-u", "postgres"], { stdout: "pipe", stderr: "pipe" });
  const g = Bun.spawnSync(["id", "-g", "postgres"], { stdout: "pipe", stderr: "pipe" });
  if (u.exitCode !== 0 || g.exitCode !== 0) {
    throw new Error("running as root needs a `postgres` OS user (Postgres and PgBouncer refuse root)");
  }
  return { uid: Number(u.stdout.toString().trim()), gid: Number(g.stdout.toString().trim()) };
}

/** Run synchronously; throws with the output on a non-zero exit. */
export function runSync(cmd: string[], opts: { cwd?: string; env?: Record<string, string>; timeoutMs?: number } = {}): string {
  const r = Bun.spawnSync(cmd, {
    cwd: opts.cwd,
    env: opts.env ?? baseEnv(),
    stdout: "pipe",
    stderr: "pipe",
    timeout: opts.timeoutMs ?? 300_000,
  });
  const out = r.stdout.toString() + r.stderr.toString();
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")} failed (exit ${r.exitCode ?? r.signalCode}):\n${out}`);
  return out;
}

/** The environment without any PG* or DATABASE_URL inherited from the caller. */
export function baseEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined || k.startsWith("PG") || k === "DATABASE_URL" || k.startsWith("MULTIGRES_")) continue;
    env[k] = v;
  }
  return { ...env, LC_ALL: "C", LANG: "C", ...extra };
}

/** libpq environment: no TLS (PGSSLMODE=disable for every client), no pgpass, bounded connect. */
export function libpqEnv(extra: Record<string, string> = {}): Record<string, string> {
  return baseEnv({
    PGSSLMODE: "disable",
    PGGSSENCMODE: "disable",
    PGCONNECT_TIMEOUT: "10",
    PGPASSFILE: "/nonexistent/multigres-bench/pgpass",
    ...extra,
  });
}

export interface RunResult {
  stdout: string;
  stderr: string;
  exitCode: number | null;
  timedOut: boolean;
}

/** Run to completion asynchronously, killed after timeoutMs. */
export async function run(cmd: string[], opts: { env?: Record<string, string>; timeoutMs: number; cwd?: string }): Promise<RunResult> {
  const proc = Bun.spawn(cmd, { cwd: opts.cwd, env: opts.env ?? baseEnv(), stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  const unregister = onTeardown(`${cmd[0]} pid ${proc.pid}`, () => killPidSync(proc.pid, "SIGKILL", 0));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    proc.kill("SIGKILL");
  }, opts.timeoutMs);
  try {
    const [stdout, stderr] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
    await proc.exited;
    return { stdout, stderr, exitCode: proc.exitCode, timedOut };
  } finally {
    clearTimeout(timer);
    unregister();
  }
}

/** Descendant of `pid` (itself included) whose comm is `comm`, found by scanning /proc. */
export function findDescendant(pid: number, comm: string): number | undefined {
  const children = new Map<number, number[]>();
  const names = new Map<number, string>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(join("/proc", entry, "stat"), "utf8");
      const close = stat.lastIndexOf(")");
      const name = stat.slice(stat.indexOf("(") + 1, close);
      const ppid = Number(stat.slice(close + 2).split(" ")[1]);
      const p = Number(entry);
      names.set(p, name);
      if (!children.has(ppid)) children.set(ppid, []);
      children.get(ppid)!.push(p);
    } catch {
      // raced with exit
    }
  }
  const queue = [pid];
  while (queue.length > 0) {
    const p = queue.shift()!;
    if (names.get(p) === comm) return p;
    queue.push(...(children.get(p) ?? []));
  }
  return undefined;
}

/** Resident set size of a process in bytes (VmRSS from /proc/PID/status). */
export function rssBytes(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const m = /^VmRSS:\s+(\d+)\s+kB/m.exec(status);
  if (!m) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]) * 1024;
}

/**
 * CPU time in clock ticks (USER_HZ, 100 on Linux): the whole machine's busy
 * time from /proc/stat (user, nice, system, irq, softirq) and one
 * process's user + system time. Read around a pgbench run, it says where a
 * transaction's CPU went: in the proxy, or in PostgreSQL and pgbench.
 */
export interface CpuTicks {
  machine: number;
  process: number;
  /** Context switches on the whole machine so far. */
  switches: number;
}

export const TICK_US = 10_000;

export function cpuTicks(pid: number | undefined): CpuTicks {
  const stat = readFileSync("/proc/stat", "utf8");
  const cpu = stat.split("\n")[0]!.split(/\s+/).slice(1).map(Number);
  const machine = cpu[0]! + cpu[1]! + cpu[2]! + cpu[5]! + cpu[6]!;
  const switches = Number(/^ctxt (\d+)/m.exec(stat)?.[1] ?? NaN);
  let process = 0;
  if (pid !== undefined) {
    const own = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = own.slice(own.lastIndexOf(")") + 2).split(" ");
    process = Number(fields[11]) + Number(fields[12]); // utime, stime
  }
  return { machine, process, switches };
}

// ---------------------------------------------------------------------------
// network

export { freePort } from "../../test/harness/postgres.ts";

/** One TCP connect attempt; resolves true when the connection was accepted (then closes it). */
export function tryConnect(port: number, host = "127.0.0.1", timeoutMs = 1000): Promise<boolean> {
  return new Promise((res) => {
    const s = new Socket();
    const done = (ok: boolean) => {
      s.removeAllListeners();
      s.on("error", () => {});
      s.destroy();
      res(ok);
    };
    s.setTimeout(timeoutMs, () => done(false));
    s.once("error", () => done(false));
    s.connect(port, host, () => done(true));
  });
}

/** Poll until a TCP connect succeeds; throws after timeoutMs or when `alive()` turns false. */
export async function waitForPort(port: number, timeoutMs: number, alive: () => boolean = () => true, what = `port ${port}`): Promise<void> {
  const until = performance.now() + timeoutMs;
  while (performance.now() < until) {
    if (await tryConnect(port)) return;
    if (!alive()) throw new Error(`${what} exited before accepting connections`);
    await sleep(5);
  }
  throw new Error(`${what} did not accept connections within ${timeoutMs} ms`);
}

// ---------------------------------------------------------------------------
// statistics

export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** Nearest-rank percentile of an ascending-sorted array (p in 0..100). */
export function percentileSorted(sorted: ArrayLike<number>, p: number): number {
  if (sorted.length === 0) return NaN;
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[Math.min(sorted.length, rank) - 1]!;
}

export function fileExists(p: string): boolean {
  return existsSync(p);
}
