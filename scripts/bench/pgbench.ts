/**
 * Running pgbench and reading what it says: tps from its summary, and
 * per-transaction latencies from its `-l` log.
 */
import { readdirSync, readFileSync, rmSync } from "node:fs";
import { basename, dirname, join } from "node:path";
import { libpqEnv, percentileSorted, run } from "./util.ts";

export interface PgbenchRun {
  pgbench: string;
  port: number;
  user: string;
  password: string;
  database: string;
  clients: number;
  protocol: "simple" | "prepared";
  /** Builtin select-only (-S), or a custom script file (-f). */
  script: { builtin: "select-only" } | { file: string };
  /** -C: a new connection per transaction. */
  connectPerTx?: boolean;
  durationS: number;
  /** -l --log-prefix=…: write per-transaction latencies. */
  logPrefix?: string;
  /** Extra libpq environment. */
  env?: Record<string, string>;
  /** -D NAME=VALUE script variables. */
  defines?: Record<string, string>;
}

export interface PgbenchResult {
  tps: number;
  transactions: number;
  failed: number;
  latencyAvgMs?: number;
  connTimeMs?: number;
  /** Per-transaction latencies from the -l log, µs, sorted ascending. */
  latenciesUs?: Float64Array;
  cmd: string;
}

export async function runPgbench(r: PgbenchRun): Promise<PgbenchResult> {
  const threads = Math.min(2, r.clients);
  const args = [
    r.pgbench,
    "-n", // no vacuum: the app role may not, and PgBouncer/Multigres should not see it
    "-h", "127.0.0.1",
    "-p", String(r.port),
    "-U", r.user,
    "-c", String(r.clients),
    "-j", String(threads),
    "-T", String(r.durationS),
    "-M", r.protocol,
    ...("builtin" in r.script ? ["-S"] : ["-f", r.script.file]),
    ...(r.connectPerTx ? ["-C"] : []),
    ...Object.entries(r.defines ?? {}).flatMap(([k, v]) => ["-D", `${k}=${v}`]),
    ...(r.logPrefix ? ["-l", `--log-prefix=${r.logPrefix}`] : []),
    r.database,
  ];
  const cmd = args.join(" ");
  const res = await run(args, {
    env: libpqEnv({ PGPASSWORD: r.password, ...(r.env ?? {}) }),
    timeoutMs: (r.durationS + 90) * 1000,
    cwd: r.logPrefix ? dirname(r.logPrefix) : undefined,
  });
  const out = res.stdout + "\n" + res.stderr;
  if (res.timedOut) throw new Error(`pgbench timed out: ${cmd}\n${out}`);
  if (res.exitCode !== 0) throw new Error(`pgbench failed (exit ${res.exitCode}): ${cmd}\n${out}`);
  const num = (re: RegExp) => {
    const m = re.exec(out);
    return m ? Number(m[1]) : undefined;
  };
  const tps = num(/^tps = ([\d.]+)/m);
  const transactions = num(/number of transactions actually processed: (\d+)/);
  if (tps === undefined || transactions === undefined) throw new Error(`cannot parse pgbench output: ${cmd}\n${out}`);
  const failed = num(/number of failed transactions: (\d+)/) ?? 0;
  if (failed > 0 || transactions === 0) throw new Error(`pgbench reported ${failed} failed / ${transactions} processed: ${cmd}\n${out}`);
  const result: PgbenchResult = {
    tps,
    transactions,
    failed,
    latencyAvgMs: num(/latency average = ([\d.]+) ms/),
    connTimeMs: num(/(?:average connection time|initial connection time) = ([\d.]+) ms/),
    cmd,
  };
  if (r.logPrefix) result.latenciesUs = readLatencies(r.logPrefix);
  return result;
}

/**
 * pgbench -l writes `PREFIX.PID` (thread 0) and `PREFIX.PID.N` (thread N):
 * `client_id transaction_no time_us script_no time_epoch time_us_frac …`.
 * Returns the latency column (µs) of every line, sorted; removes the files.
 */
function readLatencies(prefix: string): Float64Array {
  const dir = dirname(prefix);
  const base = basename(prefix) + ".";
  const values: number[] = [];
  for (const f of readdirSync(dir)) {
    if (!f.startsWith(base)) continue;
    const path = join(dir, f);
    const text = readFileSync(path, "utf8");
    let start = 0;
    while (start < text.length) {
      let end = text.indexOf("\n", start);
      if (end < 0) end = text.length;
      // third field
      const s1 = text.indexOf(" ", start);
      const s2 = s1 < 0 ? -1 : text.indexOf(" ", s1 + 1);
      const s3 = s2 < 0 ? -1 : text.indexOf(" ", s2 + 1);
      if (s3 > 0 && s3 < end) values.push(Number(text.slice(s2 + 1, s3)));
      start = end + 1;
    }
    rmSync(path, { force: true });
  }
  const arr = Float64Array.from(values);
  arr.sort();
  return arr;
}

export function latencySummary(sortedUs: Float64Array): { n: number; p50Us: number; p99Us: number; meanUs: number } {
  let sum = 0;
  for (const v of sortedUs) sum += v;
  return {
    n: sortedUs.length,
    p50Us: percentileSorted(sortedUs, 50),
    p99Us: percentileSorted(sortedUs, 99),
    meanUs: sortedUs.length ? sum / sortedUs.length : NaN,
  };
}
