/**
 * The things pgbench talks to besides Postgres itself: the compiled
 * Multigres binary (also as built from earlier commits, for before/after
 * figures in one run), PgBouncer (session mode, run as the postgres OS user
 * with its own ini in a temp dir) and the bare Bun relay (relay.ts).
 */
import { chownSync, closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import {
  asPostgres,
  baseEnv,
  findDescendant,
  freePort,
  isRoot,
  killPidSync,
  onTeardown,
  pidAlive,
  postgresIds,
  runSync,
  sleep,
  waitForPort,
} from "./util.ts";

export const REPO_ROOT = resolve(import.meta.dir, "..", "..");
const MULTIGRES_BIN = process.env.MULTIGRES_BIN ?? "";

/** A running server process we can point clients at and measure. */
export interface Running {
  name: string;
  port: number;
  /** The pid of the server process itself (not a runuser wrapper): what RSS is read from. */
  pid: number;
  logFile: string;
  log(): string;
  stop(): void;
}

/**
 * `bun run build --outfile <workDir>/multigres`: the same build as
 * dist/multigres, from the current source, into the benchmark's own temp dir
 * (so it never overwrites a binary someone else's test is running).
 * MULTIGRES_BIN=path skips the build and benchmarks that binary.
 */
export function buildMultigres(workDir: string, log: (m: string) => void): string {
  if (process.env.MULTIGRES_BIN) {
    if (!existsSync(MULTIGRES_BIN)) throw new Error(`MULTIGRES_BIN=${MULTIGRES_BIN} does not exist`);
    log(`using MULTIGRES_BIN=${MULTIGRES_BIN} (no build)`);
    return MULTIGRES_BIN;
  }
  const out = join(workDir, "multigres");
  log(`bun run build --outfile ${out}`);
  runSync([process.execPath, "run", "build", "--outfile", out], { cwd: REPO_ROOT, env: baseEnv({ NO_COLOR: "1" }), timeoutMs: 300_000 });
  if (!existsSync(out)) throw new Error(`${out} missing after bun run build`);
  return out;
}

/**
 * The binary as it was at an earlier commit (`--baseline REV`): a detached
 * git worktree in the benchmark's temp dir, sharing this checkout's
 * node_modules, built with that commit's own build script.
 */
export function buildMultigresAt(rev: string, workDir: string, log: (m: string) => void): string {
  const tree = join(workDir, `tree-${rev.replace(/[^\w.-]/g, "_")}`);
  const out = join(workDir, `multigres-${rev.replace(/[^\w.-]/g, "_")}`);
  log(`building multigres at ${rev} (git worktree in ${tree})`);
  runSync(["git", "worktree", "add", "--detach", "--force", tree, rev], { cwd: REPO_ROOT, timeoutMs: 60_000 });
  onTeardown(`worktree ${rev}`, () => {
    Bun.spawnSync(["git", "worktree", "remove", "--force", tree], { cwd: REPO_ROOT, stdout: "ignore", stderr: "ignore" });
    rmSync(tree, { recursive: true, force: true });
  });
  symlinkSync(join(REPO_ROOT, "node_modules"), join(tree, "node_modules"));
  runSync([process.execPath, "run", "build", "--outfile", out], { cwd: tree, env: baseEnv({ NO_COLOR: "1" }), timeoutMs: 300_000 });
  if (!existsSync(out)) throw new Error(`${out} missing after building ${rev}`);
  return out;
}

function readTail(path: string): string {
  try {
    const s = readFileSync(path, "utf8");
    return s.length > 20_000 ? s.slice(-20_000) : s;
  } catch {
    return "";
  }
}

export interface MultigresOptions {
  bin: string;
  /** Target name in results (default "multigres"; baselines are "multigres@REV"). */
  name?: string;
  upstreamPort: number;
  workDir: string;
  /** Extra flags, e.g. ["--startup-timeout", "0"]. */
  args?: string[];
  /** Extra environment, e.g. MULTIGRES_CONTEXT_SECRET. */
  env?: Record<string, string>;
  tag: string;
}

/** Spawn the binary on a port we chose; resolves once it accepts TCP connections. */
export function startMultigres(o: MultigresOptions): Promise<Running & { spawnToAcceptMs: number }> {
  return spawnListening(o.name ?? "multigres", o.tag, o.workDir, (port) => [
    o.bin, "start", "--listen", `127.0.0.1:${port}`, "--upstream", `127.0.0.1:${o.upstreamPort}`,
    // Several instances run side by side: none may take the default health port.
    "--http", "127.0.0.1:0", "--log-level", "warn", ...(o.args ?? []),
  ], o.env);
}

/** The bare Bun relay (relay.ts) in front of the upstream: the runtime's floor. */
export function startRelay(o: { upstreamPort: number; workDir: string; tag: string }): Promise<Running> {
  return spawnListening("relay", o.tag, o.workDir, (port) => [process.execPath, join(import.meta.dir, "relay.ts"), String(port), String(o.upstreamPort)]);
}

async function spawnListening(
  name: string,
  tag: string,
  workDir: string,
  command: (port: number) => string[],
  env: Record<string, string> = {},
): Promise<Running & { spawnToAcceptMs: number }> {
  const port = await freePort();
  const logFile = join(workDir, `${name}-${tag}-${port}.log`);
  const fd = openSync(logFile, "a");
  const t0 = performance.now();
  const proc = Bun.spawn(command(port), { cwd: workDir, env: baseEnv({ NO_COLOR: "1", ...env }), stdin: "ignore", stdout: fd, stderr: fd });
  closeSync(fd);
  const stop = () => killPidSync(proc.pid, "SIGTERM", 5000);
  const unregister = onTeardown(`${name} ${tag}`, stop);
  try {
    await waitForPort(port, 20_000, () => proc.exitCode === null && proc.signalCode === null, `${name} (${tag})`);
  } catch (e) {
    unregister();
    stop();
    throw new Error(`${(e as Error).message}\n--- ${name} log ---\n${readTail(logFile)}`);
  }
  const spawnToAcceptMs = performance.now() - t0;
  return {
    name,
    port,
    pid: proc.pid,
    logFile,
    log: () => readTail(logFile),
    spawnToAcceptMs,
    stop: () => {
      unregister();
      stop();
    },
  };
}

// ---------------------------------------------------------------------------

export function pgbouncerBin(): string | undefined {
  if (process.env.PGBOUNCER_BIN) return process.env.PGBOUNCER_BIN;
  for (const p of ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"]) if (existsSync(p)) return p;
  return Bun.which("pgbouncer") ?? undefined;
}

export function pgbouncerVersion(bin: string): string {
  const r = Bun.spawnSync([bin, "--version"], { stdout: "pipe", stderr: "pipe" });
  return (r.stdout.toString() + r.stderr.toString()).split("\n")[0]?.trim() ?? "?";
}

export interface PgbouncerOptions {
  bin: string;
  upstreamPort: number;
  workDir: string;
  tag: string;
  /** default_pool_size (server connections per user/database pair). */
  poolSize: number;
  maxClientConn: number;
  /** user → plain-text password (PgBouncer uses it for SCRAM both ways). */
  users: Record<string, string>;
  database: string;
}

/** PgBouncer in session mode, SCRAM to the client and to the server, its own ini and userlist. */
export async function startPgbouncer(o: PgbouncerOptions): Promise<Running> {
  const port = await freePort();
  const dir = join(o.workDir, `pgbouncer-${o.tag}-${port}`);
  mkdirSync(dir, { recursive: true });
  const ini = join(dir, "pgbouncer.ini");
  const userlist = join(dir, "userlist.txt");
  const logFile = join(dir, "pgbouncer.log");
  const q = (s: string) => `"${s.replaceAll('"', '""')}"`;
  writeFileSync(userlist, Object.entries(o.users).map(([u, p]) => `${q(u)} ${q(p)}`).join("\n") + "\n", { mode: 0o600 });
  writeFileSync(
    ini,
    [
      "[databases]",
      `${o.database} = host=127.0.0.1 port=${o.upstreamPort} dbname=${o.database}`,
      "",
      "[pgbouncer]",
      "listen_addr = 127.0.0.1",
      `listen_port = ${port}`,
      "unix_socket_dir =",
      "auth_type = scram-sha-256",
      `auth_file = ${userlist}`,
      "pool_mode = session",
      `default_pool_size = ${o.poolSize}`,
      "min_pool_size = 0",
      "reserve_pool_size = 0",
      `max_client_conn = ${o.maxClientConn}`,
      "server_reset_query = DISCARD ALL",
      "server_tls_sslmode = disable",
      // idle clients in the memory test may sit before startup for a while
      "client_login_timeout = 0",
      "log_connections = 0",
      "log_disconnections = 0",
      "log_pooler_errors = 1",
      "stats_period = 3600",
      `logfile = ${logFile}`,
      `pidfile = ${join(dir, "pgbouncer.pid")}`,
      "",
    ].join("\n"),
  );
  if (isRoot) {
    const { uid, gid } = postgresIds();
    for (const f of [dir, ini, userlist]) chownSync(f, uid, gid);
  }
  const outFile = join(dir, "stdout.log");
  const fd = openSync(outFile, "a");
  // runuser resets the soft fd limit to 1024: raise it to the hard limit so
  // PgBouncer can hold thousands of clients (it sizes itself from it).
  const cmd = asPostgres(["sh", "-c", 'ulimit -n "$(ulimit -Hn)" && exec "$@"', "sh", o.bin, ini]);
  const proc = Bun.spawn(cmd, { cwd: dir, env: baseEnv(), stdin: "ignore", stdout: fd, stderr: fd });
  closeSync(fd);
  let pid: number | undefined;
  const stop = () => {
    const p = pid ?? findDescendant(proc.pid, "pgbouncer");
    if (p !== undefined) killPidSync(p, "SIGTERM", 5000); // SIGTERM: immediate shutdown
    killPidSync(proc.pid, "SIGTERM", 2000);
  };
  const unregister = onTeardown(`pgbouncer ${o.tag}`, stop);
  const logs = () => readTail(logFile) + readTail(outFile);
  try {
    await waitForPort(port, 20_000, () => proc.exitCode === null && proc.signalCode === null, `pgbouncer (${o.tag})`);
    for (let i = 0; i < 200 && pid === undefined; i++) {
      pid = findDescendant(proc.pid, "pgbouncer");
      if (pid === undefined) await sleep(10);
    }
    if (pid === undefined || !pidAlive(pid)) throw new Error("could not find the pgbouncer process under its runuser wrapper");
  } catch (e) {
    unregister();
    stop();
    throw new Error(`${(e as Error).message}\n--- pgbouncer log ---\n${logs()}`);
  }
  return {
    name: "pgbouncer",
    port,
    pid,
    logFile,
    log: logs,
    stop: () => {
      unregister();
      stop();
    },
  };
}
