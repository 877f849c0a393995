/**
 * Run the compiled multigres binary for integration tests.
 *
 * - ensureBuilt(): `bun run build` when dist/multigres is missing or older
 *   than any build input (src/, sql/, scripts/build.ts, package.json,
 *   bun.lock, tsconfig.json). Serialised across processes with flock(1), so
 *   parallel test workers do not rebuild a binary another one is running.
 *   MULTIGRES_BIN=/path/to/binary skips the build and tests that binary.
 * - startProxy(): spawn `multigres start --listen 127.0.0.1:0 --upstream …`,
 *   wait for its "listening on HOST:PORT" log line, capture stdout+stderr
 *   for the whole run, and make sure the process dies with the test process.
 *   Unless told otherwise the proxy authenticates clients itself (`--auth
 *   proxy`, the default) against HARNESS_AUTH_FILE, which gives every
 *   fixture role its PASSWORDS entry as the client password, and logs in
 *   upstream with HARNESS_UPSTREAM_FILE (each role's database password).
 *   `auth: "passthrough"` relays authentication to PostgreSQL instead.
 *
 * Set MULTIGRES_TEST_PROXY_LOGS=1 to print every proxy's output when it stops.
 */
import { existsSync, mkdirSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import type { Subprocess } from "bun";
import { onCleanup } from "./cleanup.ts";
import { writeTempFile } from "./clients.ts";
import { APP_ROLES, buildUrl, CONTEXT_SECRET, PASSWORDS, REPO_ROOT, type PgInstance, type UrlOptions } from "./postgres.ts";

export const DEFAULT_BIN = join(REPO_ROOT, "dist", "multigres");
export const BIN = process.env.MULTIGRES_BIN ?? DEFAULT_BIN;

const BUILD_INPUTS = ["src", "sql", "scripts/build.ts", "package.json", "bun.lock", "tsconfig.json"];

function newestMtime(path: string): number {
  if (!existsSync(path)) return 0;
  const st = statSync(path);
  if (!st.isDirectory()) return st.mtimeMs;
  let newest = st.mtimeMs;
  for (const entry of readdirSync(path)) newest = Math.max(newest, newestMtime(join(path, entry)));
  return newest;
}

/** True when dist/multigres is missing or older than one of its inputs. */
export function binaryIsStale(bin = DEFAULT_BIN): boolean {
  if (!existsSync(bin)) return true;
  const built = statSync(bin).mtimeMs;
  return BUILD_INPUTS.some((p) => newestMtime(join(REPO_ROOT, p)) > built);
}

function buildNow(): void {
  const r = Bun.spawnSync([process.execPath, "run", "build"], {
    cwd: REPO_ROOT,
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, NO_COLOR: "1" },
  });
  if (r.exitCode !== 0) {
    throw new Error(
      `\`bun run build\` failed (exit ${r.exitCode ?? r.signalCode}):\n${r.stdout.toString()}${r.stderr.toString()}`,
    );
  }
}

let built: string | undefined;

/** Path of the binary to test, building it first when stale. Synchronous; cached per process. */
export function ensureBuilt(): string {
  if (built) return built;
  if (process.env.MULTIGRES_BIN) {
    if (!existsSync(BIN)) throw new Error(`MULTIGRES_BIN=${BIN} does not exist`);
    return (built = BIN);
  }
  if (binaryIsStale()) {
    const flock = Bun.which("flock");
    if (flock) {
      mkdirSync(join(REPO_ROOT, "dist"), { recursive: true });
      // Re-check under the lock: another process may have just built it.
      const r = Bun.spawnSync(
        [flock, join(REPO_ROOT, "dist", ".build.lock"), process.execPath, import.meta.path, "--build-if-stale"],
        { cwd: REPO_ROOT, stdout: "pipe", stderr: "pipe", env: { ...process.env, NO_COLOR: "1" } },
      );
      if (r.exitCode !== 0) {
        throw new Error(`building ${DEFAULT_BIN} failed:\n${r.stdout.toString()}${r.stderr.toString()}`);
      }
    } else {
      buildNow();
    }
  }
  if (!existsSync(DEFAULT_BIN)) throw new Error(`${DEFAULT_BIN} missing after build`);
  return (built = DEFAULT_BIN);
}

if (import.meta.main && process.argv.includes("--build-if-stale")) {
  if (binaryIsStale()) buildNow();
  process.exit(0);
}

// ---------------------------------------------------------------------------

/** A userlist line, quoting as PgBouncer's format wants. */
export const userlistLine = (user: string, secret: string) => `"${user.replace(/"/g, '""')}" "${secret.replace(/"/g, '""')}"`;

/** Client credentials of every harness proxy: each fixture role with its PASSWORDS entry (shared by its tenants). */
export const HARNESS_AUTH_FILE = writeTempFile(`harness-userlist-${process.pid}.txt`, `${APP_ROLES.map((r) => userlistLine(r, PASSWORDS[r])).join("\n")}\n`);
/** The proxy's upstream credential: each role's database password. */
export const HARNESS_UPSTREAM_FILE = writeTempFile(`harness-upstream-${process.pid}.txt`, `${APP_ROLES.map((r) => userlistLine(r, PASSWORDS[r])).join("\n")}\n`);

export interface ProxyOptions {
  upstreamPort: number;
  upstreamHost?: string;
  /** Default database of url() (e.g. the fixture database). Default "postgres". */
  database?: string;
  /** Extra CLI arguments after `start --listen … --upstream …`. */
  args?: string[];
  /**
   * Extra environment. MULTIGRES_* from the test runner's env are not
   * inherited; MULTIGRES_CONTEXT_SECRET defaults to CONTEXT_SECRET.
   */
  env?: Record<string, string>;
  /** How long to wait for the "listening on" line (default 20 s). */
  startTimeoutMs?: number;
  /**
   * "proxy" (default): unless args/env name their own client credentials,
   * add --auth-file HARNESS_AUTH_FILE and --upstream-password-file
   * HARNESS_UPSTREAM_FILE. "passthrough": --auth passthrough.
   */
  auth?: "proxy" | "passthrough";
}

export interface ProxyHandle {
  host: string;
  port: number;
  pid: number;
  proc: Subprocess<"ignore", "pipe", "pipe">;
  /** Connection URL through the proxy; host/port/database default to this proxy. */
  url(o: UrlOptions): string;
  /** Everything the proxy wrote to stdout and stderr so far (ANSI stripped). */
  logs(): string;
  /** Resolves with the logs once they match `re` (checked on every new output chunk). */
  waitForLog(re: RegExp, timeoutMs?: number): Promise<string>;
  /** Resolves with the exit code when the process ends. */
  exited: Promise<number>;
  /** SIGTERM (or `signal`), then SIGKILL after `timeoutMs`; resolves with how it ended. */
  stop(signal?: NodeJS.Signals, timeoutMs?: number): Promise<{ exitCode: number | null; signal: string | null }>;
}

const live = new Set<Subprocess>();
onCleanup(() => {
  for (const p of live) {
    try {
      p.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
  live.clear();
});

// eslint-disable-next-line no-control-regex
const ANSI = /\u001b\[[0-9;?]*[ -/]*[@-~]/g;
const LISTENING = /listening on \[?([0-9A-Za-z.:-]+?)\]?:([1-9]\d*)\b/;
const MAX_LOG = 32 * 1024 * 1024;

/** Start the proxy in front of `upstreamHost:upstreamPort`; resolves once it listens. */
export async function startProxy(opts: ProxyOptions): Promise<ProxyHandle> {
  const bin = ensureBuilt();
  const upstream = `${opts.upstreamHost ?? "127.0.0.1"}:${opts.upstreamPort}`;
  // The health listener defaults to a fixed port; tests run many proxies at once.
  const http = opts.args?.includes("--http") ? [] : ["--http", "127.0.0.1:0"];
  const cmd = [bin, "start", "--listen", "127.0.0.1:0", "--upstream", upstream, ...http, ...authArgs(opts), ...(opts.args ?? [])];

  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v !== undefined && !k.startsWith("MULTIGRES_")) env[k] = v;
  }
  Object.assign(
    env,
    { NO_COLOR: "1", FORCE_COLOR: "0", MULTIGRES_CONTEXT_SECRET: CONTEXT_SECRET },
    opts.env ?? {},
  );

  const proc = Bun.spawn(cmd, { cwd: REPO_ROOT, env, stdin: "ignore", stdout: "pipe", stderr: "pipe" });
  live.add(proc);
  const exited = proc.exited.then((code) => {
    live.delete(proc);
    return code;
  });

  let log = "";
  const listeners = new Set<() => void>();
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      log += decoder.decode(chunk, { stream: true }).replace(ANSI, "");
      if (log.length > MAX_LOG) log = log.slice(log.length - MAX_LOG / 2);
      for (const l of [...listeners]) l();
    }
  };
  const pumped = Promise.all([pump(proc.stdout), pump(proc.stderr)]).catch(() => {});

  const waitForLog = (re: RegExp, timeoutMs = 15_000): Promise<string> =>
    new Promise((res, rej) => {
      const check = () => {
        if (re.test(log)) {
          done();
          res(log);
        }
      };
      const onExit = () => {
        // Let the pumps drain what the process wrote before it died.
        pumped.then(() => {
          if (re.test(log)) return res(log);
          done();
          rej(new Error(`multigres exited (code ${proc.exitCode}, signal ${proc.signalCode}) before logging ${re}\n$ ${cmd.join(" ")}\n--- output ---\n${log}`));
        });
      };
      const timer = setTimeout(() => {
        done();
        rej(new Error(`multigres did not log ${re} within ${timeoutMs} ms\n$ ${cmd.join(" ")}\n--- output ---\n${log}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        listeners.delete(check);
      };
      listeners.add(check);
      exited.then(onExit);
      check();
    });

  const stop = async (signal: NodeJS.Signals = "SIGTERM", timeoutMs = 10_000) => {
    if (proc.exitCode === null && proc.signalCode === null) {
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill("SIGKILL"), timeoutMs);
      await exited;
      clearTimeout(timer);
    }
    await pumped;
    if (process.env.MULTIGRES_TEST_PROXY_LOGS) {
      console.error(`--- multigres pid ${proc.pid} output ---\n${log}--- end ---`);
    }
    return { exitCode: proc.exitCode, signal: proc.signalCode === null ? null : String(proc.signalCode) };
  };

  let match: RegExpExecArray | null;
  try {
    await waitForLog(LISTENING, opts.startTimeoutMs ?? 20_000);
    match = LISTENING.exec(log);
    if (!match) throw new Error("unreachable");
  } catch (e) {
    await stop("SIGKILL");
    throw e;
  }
  const host = match[1] === "0.0.0.0" || match[1] === "localhost" ? "127.0.0.1" : match[1]!;
  const port = Number(match[2]);
  const database = opts.database ?? "postgres";

  return {
    host,
    port,
    pid: proc.pid,
    proc,
    url: (o) => buildUrl({ host, port, database, ...o }),
    logs: () => log,
    waitForLog,
    exited,
    stop,
  };
}

/** The harness's default credentials, unless the test brings its own. */
function authArgs(opts: ProxyOptions): string[] {
  if (opts.auth === "passthrough") return ["--auth", "passthrough"];
  const named = (flag: string, env: string) => opts.args?.includes(flag) || opts.env?.[env] !== undefined;
  const out: string[] = [];
  if (!named("--auth", "MULTIGRES_AUTH") && !named("--auth-file", "MULTIGRES_AUTH_FILE") && !named("--tenant-auth", "MULTIGRES_TENANT_AUTH")) {
    out.push("--auth-file", HARNESS_AUTH_FILE);
  }
  if (!named("--upstream-password-file", "MULTIGRES_UPSTREAM_PASSWORD_FILE") && opts.env?.MULTIGRES_UPSTREAM_PASSWORD === undefined) {
    out.push("--upstream-password-file", HARNESS_UPSTREAM_FILE);
  }
  return out;
}

/** startProxy in front of a harness PostgreSQL, url() defaulting to its fixture database. */
export function startProxyFor(
  pg: PgInstance,
  opts: Omit<ProxyOptions, "upstreamPort" | "upstreamHost" | "database"> & { upstreamPort?: number; upstreamHost?: string } = {},
): Promise<ProxyHandle> {
  return startProxy({ upstreamPort: pg.port, upstreamHost: pg.host, database: pg.database, ...opts });
}
