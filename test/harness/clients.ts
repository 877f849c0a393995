/**
 * Real clients for integration tests: psql and pgbench as subprocesses, and a
 * postgres.js factory with test-friendly defaults.
 */
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { onCleanup } from "./cleanup.ts";
import { pgTool } from "./postgres.ts";

export interface RunResult {
  stdout: string;
  stderr: string;
  exitCode: number | null;
  signal: string | null;
  /** True when the harness killed the process after timeoutMs. */
  timedOut: boolean;
  /** The command line, for assertion messages. */
  cmd: string[];
}

export interface RunOptions {
  /** Extra environment (merged over the sanitised one). */
  env?: Record<string, string>;
  /** Written to stdin, then stdin is closed. */
  stdin?: string;
  /** Kill the process after this long (default 60 s). */
  timeoutMs?: number;
  cwd?: string;
}

/**
 * Environment for libpq tools: no PG* or DATABASE_URL leaking in from the
 * caller, English messages, no TLS, no ~/.pgpass, bounded connect time.
 */
export function libpqEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined || k.startsWith("PG") || k === "DATABASE_URL") continue;
    env[k] = v;
  }
  return {
    ...env,
    LC_ALL: "C",
    LANG: "C",
    PGSSLMODE: "disable",
    PGGSSENCMODE: "disable",
    PGCONNECT_TIMEOUT: "10",
    PGPASSFILE: "/dev/null",
    ...extra,
  };
}

/** Run a command to completion, capturing stdout and stderr. */
export async function run(cmd: string[], opts: RunOptions = {}): Promise<RunResult> {
  const timeoutMs = opts.timeoutMs ?? 60_000;
  const proc = Bun.spawn(cmd, {
    cwd: opts.cwd,
    env: libpqEnv(opts.env),
    stdin: opts.stdin !== undefined ? new TextEncoder().encode(opts.stdin) : "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    proc.kill("SIGKILL");
  }, timeoutMs);
  try {
    const [stdout, stderr] = await Promise.all([
      new Response(proc.stdout).text(),
      new Response(proc.stderr).text(),
    ]);
    await proc.exited;
    const signal = proc.signalCode === null ? null : String(proc.signalCode);
    return { stdout, stderr, exitCode: proc.exitCode, signal, timedOut, cmd };
  } finally {
    clearTimeout(timer);
  }
}

/** One-line description of a RunResult for expect(...) messages. */
export function describeRun(r: RunResult): string {
  return (
    `$ ${r.cmd.join(" ")}\nexit=${r.exitCode} signal=${r.signal}${r.timedOut ? " (timed out)" : ""}\n` +
    `--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`
  );
}

export interface PsqlOptions extends RunOptions {
  /** Extra psql arguments, placed before -c / -f. */
  args?: string[];
  /** Run this file (-f) instead of / in addition to the SQL string. */
  file?: string;
}

/**
 * psql against a connection URL: `psql -X -A -t -q -v ON_ERROR_STOP=1 -d URL -c SQL`.
 * Output is unaligned, tuples only (`a|b` per row). Pass sql = null to only
 * use opts.file / opts.stdin.
 */
export function psql(url: string, sql: string | null, opts: PsqlOptions = {}): Promise<RunResult> {
  const cmd = [pgTool("psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, ...(opts.args ?? [])];
  if (sql !== null) cmd.push("-c", sql);
  if (opts.file) cmd.push("-f", opts.file);
  return run(cmd, opts);
}

/**
 * pgbench with the given arguments (the connection URL goes last, as the
 * dbname argument). Exit status: 0 ok, 1 bad arguments / connect failure,
 * 2 when a client aborted (an error in the script).
 */
export function pgbench(args: string[], opts: RunOptions = {}): Promise<RunResult> {
  return run([pgTool("pgbench"), ...args], { timeoutMs: 120_000, ...opts });
}

let scratch: string | undefined;
/** Write a file into a per-process scratch dir (removed at exit); returns its path. */
export function writeTempFile(name: string, content: string): string {
  scratch ??= mkdtempSync(join(tmpdir(), "multigres-test-"));
  const p = join(scratch, name);
  writeFileSync(p, content, { mode: 0o600 }); // secrets go in some of them
  return p;
}
onCleanup(() => {
  if (scratch) rmSync(scratch, { recursive: true, force: true });
  scratch = undefined;
});

export type Client = postgres.Sql<Record<string, never>>;

/**
 * postgres.js client with test defaults: one connection, no TLS, notices
 * ignored, bounded connect time, no automatic retry of the initial connect.
 * Close it with `await client.end()`.
 */
export function connect(url: string, options: postgres.Options<Record<string, never>> = {}): Client {
  return postgres(url, {
    max: 1,
    ssl: false,
    onnotice: () => {},
    connect_timeout: 10,
    idle_timeout: 10,
    ...options,
  }) as unknown as Client;
}

/** Run `fn` with a fresh client and always close it. */
export async function withClient<T>(
  url: string,
  fn: (sql: Client) => Promise<T>,
  options: postgres.Options<Record<string, never>> = {},
): Promise<T> {
  const sql = connect(url, options);
  try {
    return await fn(sql);
  } finally {
    await sql.end({ timeout: 5 }).catch(() => {});
  }
}

export interface PgError {
  code: string | undefined;
  message: string;
  severity: string | undefined;
  error: unknown;
}

/**
 * Connect and run `SELECT 1`, expecting failure; returns the error's SQLSTATE
 * and message (throws if the connection unexpectedly works).
 */
export async function connectError(url: string, options: postgres.Options<Record<string, never>> = {}): Promise<PgError> {
  const sql = connect(url, options);
  try {
    await sql`SELECT 1`;
  } catch (error) {
    const e = error as { code?: string; message?: string; severity?: string };
    return { code: e.code, message: String(e.message ?? error), severity: e.severity, error };
  } finally {
    await sql.end({ timeout: 5 }).catch(() => {});
  }
  throw new Error(`expected connecting to ${redact(url)} to fail, but it succeeded`);
}

/** URL with the password replaced by ***, for messages. */
export function redact(url: string): string {
  return url.replace(/(\/\/[^:@/]+:)[^@]*@/, "$1***@");
}
