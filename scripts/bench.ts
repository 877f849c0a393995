#!/usr/bin/env bun
/**
 * `bun run bench`: Multigres against a direct connection and PgBouncer.
 *
 * One command, everything throwaway and on loopback: boots a PostgreSQL
 * tuned for benchmarking, loads `pgbench -i` data and a FORCE-RLS tenant
 * table, builds and starts the compiled proxy (tenant injection on) and a
 * session-mode PgBouncer, then runs pgbench against the three targets in
 * interleaved rounds (direct, multigres, pgbouncer, direct, …) and reports
 * medians and ratios. Then startup time and idle-client memory. Writes
 * bench/results/<ISO date-time>.json and prints a markdown table.
 *
 *   bun run bench                      full run (~15 min on 2 cores)
 *   bun run bench --quick              smoke run (~2–3 min: 1 round × 3 s, 100 established clients)
 *   bun run bench --rounds 5 --duration 15
 *   bun run bench --only c16,c64 --no-memory --no-startup    iterate on one thing
 *   bun run bench --only c16 --baseline 29db0f1 --floor      before/after in one run
 *
 * Flags: --rounds N (default 3), --duration S per pgbench run (default 8),
 * --scale N (pgbench -i -s, default 10), --quick, --only a,b (scenario id
 * substrings), --no-pgbouncer, --no-memory, --no-startup, --label TEXT
 * (stored in the JSON, e.g. "after batching writes"), --out DIR
 * (default bench/results), --timeout-min N (hard stop, default 45),
 * --compare OLD.json (also print before → after against an earlier result;
 * standalone: bun scripts/bench/compare.ts OLD.json NEW.json),
 * --baseline REV[,REV…] (also build those commits and run each as target
 * "multigres@REV" in the same interleaved rounds and memory test: before/after
 * figures measured under the same machine conditions), --floor (also run
 * scripts/bench/relay.ts, a bare Bun byte relay, as target "relay": what any
 * proxy on Bun's sockets costs), --passthrough (also run this build with
 * --auth passthrough as target "multigres-passthrough": the proxy's own
 * authentication separated from the rest).
 * MULTIGRES_BIN=path skips `bun run build` and benchmarks that binary.
 *
 * Scenario details and the memory methodology are written into the JSON
 * (`notes`, `memoryMethod`) and printed under the table.
 */
import { cpus, loadavg, release, totalmem } from "node:os";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { compareMarkdown } from "./bench/compare.ts";
import { memoryProfile, type MemoryProfile } from "./bench/memory.ts";
import { latencySummary, runPgbench, type PgbenchRun } from "./bench/pgbench.ts";
import {
  APP_USER,
  BENCH_TENANT,
  bootPostgres,
  CONTEXT_SECRET,
  DB,
  installContextKey,
  makeWorkDir,
  manualContextSql,
  PASSWORD,
  pgTool,
  ROWS_PER_TENANT,
  SANITY_SQL,
  tenantScripts,
} from "./bench/postgres.ts";
import {
  markdown,
  TARGETS,
  type BenchResult,
  type BudgetLine,
  type RunRecord,
  type ScenarioResult,
  type StartupResult,
  type TargetName,
} from "./bench/report.ts";
import {
  buildMultigres,
  pgbouncerBin,
  pgbouncerVersion,
  REPO_ROOT,
  buildMultigresAt,
  startMultigres,
  startPgbouncer,
  startRelay,
  type Running,
} from "./bench/targets.ts";
import { cpuTicks, installTeardownHooks, libpqEnv, median, run, sleep, teardownAll, TICK_US, type CpuTicks } from "./bench/util.ts";

// ---------------------------------------------------------------------------
// options

const { values: argv } = parseArgs({
  args: Bun.argv.slice(2),
  options: {
    rounds: { type: "string" },
    duration: { type: "string" },
    scale: { type: "string" },
    quick: { type: "boolean", default: false },
    only: { type: "string" },
    "no-pgbouncer": { type: "boolean", default: false },
    "no-memory": { type: "boolean", default: false },
    "no-startup": { type: "boolean", default: false },
    label: { type: "string" },
    out: { type: "string" },
    "timeout-min": { type: "string" },
    compare: { type: "string" },
    baseline: { type: "string" },
    floor: { type: "boolean", default: false },
    passthrough: { type: "boolean", default: false },
    help: { type: "boolean", short: "h", default: false },
  },
  strict: true,
});

if (argv.help) {
  const src = readFileSync(import.meta.path, "utf8");
  process.stdout.write(src.slice(src.indexOf("/**") + 4, src.indexOf("*/")).replace(/^ \* ?/gm, "") + "\n");
  process.exit(0);
}

function intOpt(name: string, v: string | undefined, dflt: number, min: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isInteger(n) || n < min) {
    process.stderr.write(`bench: --${name} must be an integer ≥ ${min} (got ${v})\n`);
    process.exit(2);
  }
  return n;
}

const quick = argv.quick;
const opts = {
  quick,
  rounds: intOpt("rounds", argv.rounds, quick ? 1 : 3, 1),
  durationS: intOpt("duration", argv.duration, quick ? 3 : 8, 2),
  scale: intOpt("scale", argv.scale, 10, 1),
  warmupS: quick ? 1 : 3,
  startupRuns: quick ? 3 : 7,
  memEstablished: quick ? [1, 100] : [1, 1000],
  memPreStartup: quick ? [1000, 5000] : [1000, 5000],
  settleMs: quick ? 1000 : 2000,
  only: argv.only ? argv.only.split(",").map((s) => s.trim()).filter(Boolean) : undefined,
  pgbouncer: !argv["no-pgbouncer"],
  memory: !argv["no-memory"],
  startup: !argv["no-startup"],
  outDir: argv.out ?? join(REPO_ROOT, "bench", "results"),
  timeoutMin: intOpt("timeout-min", argv["timeout-min"], 45, 1),
  baselines: argv.baseline ? argv.baseline.split(",").map((s) => s.trim()).filter(Boolean) : [],
  floor: argv.floor,
  passthrough: argv.passthrough,
};

const t0 = performance.now();
const elapsed = () => `${((performance.now() - t0) / 1000).toFixed(0).padStart(4)}s`;
const log = (msg: string) => process.stderr.write(`[bench ${elapsed()}] ${msg}\n`);

// ---------------------------------------------------------------------------
// scenarios

interface Scenario {
  id: string;
  title: string;
  description: string;
  clients: number;
  protocol: "simple" | "prepared";
  script: "select-only" | "tenant";
  connectPerTx: boolean;
  latency: boolean;
}

const SCENARIOS: Scenario[] = [
  ...[1, 16, 64].flatMap((c) =>
    (["simple", "prepared"] as const).map(
      (p): Scenario => ({
        id: `select-c${c}-${p}`,
        title: `pgbench -S, ${c} client${c > 1 ? "s" : ""}, ${p}`,
        description: `builtin select-only (one primary-key SELECT on pgbench_accounts per transaction), -c ${c} -j ${Math.min(2, c)} -M ${p}` +
          (c === 1 ? "; per-transaction latencies logged with -l for the latency table" : ""),
        clients: c,
        protocol: p,
        script: "select-only",
        connectPerTx: false,
        latency: c === 1,
      }),
    ),
  ),
  {
    id: "tenant-c16-simple",
    title: "tenant RLS workload, 16 clients, simple",
    description:
      `custom script on FORCE-RLS table tenant_items (${ROWS_PER_TENANT} rows per tenant, 50 tenants): point SELECT + UPDATE of one of the tenant's rows. ` +
      `multigres: user app_user.${BENCH_TENANT}, context injected (and signed) by the proxy; direct and pgbouncer: user app_user, the script sets the ` +
      `context by hand once per connection in its first transaction (set_config of the tenant and, with signed contexts, of the HMAC signature ` +
      `computed in SQL from the key), so the database does the same RLS and current_tenant_id() verification work on every path`,
    clients: 16,
    protocol: "simple",
    script: "tenant",
    connectPerTx: false,
    latency: false,
  },
  {
    id: "churn-c4-simple",
    title: "connection churn (-C), 4 clients",
    description:
      "pgbench -S -C: a new connection (SCRAM auth, and through multigres the tenant context) for every transaction, -c 4 -j 2. " +
      "PgBouncer keeps its server connections across client reconnects; Multigres has no pool yet, so this pays a backend fork per connection",
    clients: 4,
    protocol: "simple",
    script: "select-only",
    connectPerTx: true,
    latency: false,
  },
];

/**
 * pgbench -T counts from before the clients connect, and a backend start
 * costs ~45 ms on the 2-core VM this was built on (Postgres forks them one
 * at a time), so 64 clients spend ~3 s connecting. pgbench's tps excludes
 * that time, but it would eat most of a short run: 64-client runs get 4 s
 * more so they still measure about --duration seconds of queries.
 */
const CONNECT_ALLOWANCE_S = 4;
const runDuration = (s: Scenario) => opts.durationS + (s.clients >= 64 && !s.connectPerTx ? CONNECT_ALLOWANCE_S : 0);

const scenarios = opts.only ? SCENARIOS.filter((s) => opts.only!.some((o) => s.id.includes(o))) : SCENARIOS;
if (scenarios.length === 0 && opts.only) {
  process.stderr.write(`bench: --only ${argv.only} matches none of: ${SCENARIOS.map((s) => s.id).join(", ")}\n`);
  process.exit(2);
}

// ---------------------------------------------------------------------------

interface Endpoint {
  name: TargetName;
  port: number;
  /** The proxy process, whose CPU is read around each run (none for direct). */
  pid?: number;
  user: string;
  /** Multigres establishes the tenant context; the others set it by hand. */
  injectsContext: boolean;
  /**
   * A build from an earlier commit: its signatures may follow an older
   * schema than the database has (before 0.3: pid only), so its contexts
   * need not verify; its -S and -C figures stand, its tenant-script ones not.
   */
  baseline?: boolean;
}

function machineInfo(): Record<string, string | number> {
  let os = "";
  try {
    os = /PRETTY_NAME="([^"]+)"/.exec(readFileSync("/etc/os-release", "utf8"))?.[1] ?? "";
  } catch {
    // unknown
  }
  return {
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model?.trim() ?? "?",
    memory: `${Math.round(totalmem() / 1024 ** 3)} GiB`,
    os: `${os} (Linux ${release()})`.trim(),
  };
}

function gitDescribe(): string {
  const head = Bun.spawnSync(["git", "rev-parse", "--short", "HEAD"], { cwd: REPO_ROOT, stdout: "pipe", stderr: "pipe" });
  const dirty = Bun.spawnSync(["git", "status", "--porcelain", "--", "src", "sql", "package.json"], { cwd: REPO_ROOT, stdout: "pipe", stderr: "pipe" });
  const h = head.exitCode === 0 ? head.stdout.toString().trim() : "unknown";
  return dirty.exitCode === 0 && dirty.stdout.toString().trim() ? `${h}+dirty` : h;
}

async function sanityCheck(ep: Endpoint, signed: boolean, notes: string[]): Promise<void> {
  const psql = pgTool("psql");
  const q = async (sqls: string[]) => {
    const r = await run([psql, "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", String(ep.port), "-U", ep.user, "-d", DB, ...sqls.flatMap((x) => ["-c", x])], {
      env: libpqEnv({ PGPASSWORD: PASSWORD }),
      timeoutMs: 30_000,
    });
    if (r.exitCode !== 0) throw new Error(`sanity check through ${ep.name} as ${ep.user} failed:\n${r.stdout}${r.stderr}`);
    return r.stdout.trim().split("\n").at(-1) ?? "";
  };
  const branches = await q(["SELECT count(*) FROM pgbench_branches"]);
  if (Number(branches) !== opts.scale) throw new Error(`sanity check through ${ep.name}: expected ${opts.scale} branches, got "${branches}"`);
  // Without the tenant context RLS shows zero rows and the tenant workload would measure nothing.
  const got = await q(ep.injectsContext ? [SANITY_SQL] : [manualContextSql(signed), SANITY_SQL]);
  const [count, role, tenant] = got.split(" ");
  if (Number(count) !== ROWS_PER_TENANT || tenant !== BENCH_TENANT) {
    if (ep.baseline) {
      const msg = `${ep.name}: its tenant contexts do not verify under this setup (an older signature scheme); its -S and -C figures stand, its tenant-script figures do not`;
      log(`  ${msg}`);
      notes.push(msg);
      return;
    }
    throw new Error(`sanity check through ${ep.name} as ${ep.user}: expected ${ROWS_PER_TENANT} rows of tenant ${BENCH_TENANT}, got "${got}"`);
  }
  log(`  ${ep.name}: ${ep.user} sees ${count} tenant rows as ${role}, tenant ${tenant}${ep.injectsContext ? " (injected)" : " (set by hand)"}`);
}

async function main(): Promise<void> {
  installTeardownHooks();
  const watchdog = setTimeout(() => {
    process.stderr.write(`bench: still running after --timeout-min ${opts.timeoutMin}; stopping everything\n`);
    teardownAll();
    process.exit(124);
  }, opts.timeoutMin * 60_000);
  watchdog.unref();

  const startedAt = new Date();
  const notes: string[] = [];
  const pgbench = pgTool("pgbench");
  const pgbBin = opts.pgbouncer ? pgbouncerBin() : undefined;
  if (opts.pgbouncer && !pgbBin) {
    log("PgBouncer not found — install it (Debian/Ubuntu: apt-get install pgbouncer) or set PGBOUNCER_BIN; continuing without it");
    notes.push("PgBouncer was not installed (apt-get install pgbouncer): no PgBouncer column in this run.");
  }
  const targetNames = [
    ...TARGETS.filter((t) => t !== "pgbouncer" || pgbBin),
    ...opts.baselines.map((rev) => `multigres@${rev}`),
    ...(opts.passthrough ? ["multigres-passthrough"] : []),
    ...(opts.floor ? ["relay"] : []),
  ];

  const estS = opts.rounds * targetNames.length * scenarios.reduce((a, s) => a + runDuration(s) + 0.5, 0) +
    targetNames.length * opts.warmupS + (opts.memory ? targetNames.length * (quick ? 20 : 75) : 0) + 30;
  log(`${scenarios.length} scenarios × ${targetNames.length} targets × ${opts.rounds} rounds × ${opts.durationS} s; estimated ${Math.round(estS / 60)} min`);

  const workDir = makeWorkDir();
  const bin = buildMultigres(workDir, log);
  const baselineBins = opts.baselines.map((rev) => ({ name: `multigres@${rev}`, bin: buildMultigresAt(rev, workDir, log) }));
  const loadBefore = loadavg();
  if (loadBefore[0]! > cpus().length * 0.5) {
    const msg = `load average ${loadBefore.map((x) => x.toFixed(1)).join(" ")} on ${cpus().length} CPUs before the run: something else is busy, the figures will be noisy`;
    log(`WARNING: ${msg}`);
    notes.push(`Warning: ${msg}.`);
  }

  log("booting PostgreSQL");
  const maxEstablished = Math.max(0, ...opts.memEstablished);
  const pg = await bootPostgres({ maxConnections: Math.max(200, maxEstablished + 100), scale: opts.scale, log });
  log(`PostgreSQL ${pg.version} on 127.0.0.1:${pg.port}`);

  const signed = installContextKey(pg);
  log(signed ? "signed tenant contexts: context key stored" : "setup.sql has no signed contexts: the tenant setting alone is the context");
  const scripts = tenantScripts(signed);
  const tenantScriptProxied = join(workDir, "tenant-proxied.sql");
  const tenantScriptManual = join(workDir, "tenant-manual.sql");
  writeFileSync(tenantScriptProxied, scripts.proxied);
  writeFileSync(tenantScriptManual, scripts.manual);
  // The proxy authenticates the bench user itself (SCRAM, its auth file) and
  // logs in with the database password; builds from before 0.3 ignore both.
  const authFile = join(workDir, "userlist.txt");
  writeFileSync(authFile, `"${APP_USER}" "${PASSWORD}"\n`, { mode: 0o600 });
  const mgEnv = { MULTIGRES_CONTEXT_SECRET: CONTEXT_SECRET, MULTIGRES_AUTH_FILE: authFile, MULTIGRES_UPSTREAM_PASSWORD: PASSWORD };

  // ---- targets for the throughput rounds
  const mg = await startMultigres({ bin, upstreamPort: pg.port, workDir, tag: "throughput", env: mgEnv });
  log(`multigres on 127.0.0.1:${mg.port} (pid ${mg.pid})`);
  let pgb: Running | undefined;
  if (pgbBin) {
    pgb = await startPgbouncer({
      bin: pgbBin,
      upstreamPort: pg.port,
      workDir,
      tag: "throughput",
      poolSize: 64,
      maxClientConn: 200,
      users: { [APP_USER]: PASSWORD },
      database: DB,
    });
    log(`pgbouncer on 127.0.0.1:${pgb.port} (pid ${pgb.pid})`);
  }

  const extras: Running[] = [];
  for (const b of baselineBins) {
    extras.push(await startMultigres({ bin: b.bin, name: b.name, upstreamPort: pg.port, workDir, tag: "throughput", env: mgEnv }));
    log(`${b.name} on 127.0.0.1:${extras.at(-1)!.port}`);
  }
  if (opts.passthrough) {
    extras.push(await startMultigres({ bin, name: "multigres-passthrough", upstreamPort: pg.port, workDir, tag: "throughput", env: { ...mgEnv, MULTIGRES_AUTH: "passthrough" } }));
    log(`multigres-passthrough on 127.0.0.1:${extras.at(-1)!.port}`);
  }
  if (opts.floor) {
    extras.push(await startRelay({ upstreamPort: pg.port, workDir, tag: "throughput" }));
    log(`relay (bare Bun floor) on 127.0.0.1:${extras.at(-1)!.port}`);
  }

  const active: Endpoint[] = [
    { name: "direct", port: pg.port, user: APP_USER, injectsContext: false },
    { name: "multigres", port: mg.port, pid: mg.pid, user: `${APP_USER}.${BENCH_TENANT}`, injectsContext: true },
    ...(pgb ? [{ name: "pgbouncer", port: pgb.port, pid: pgb.pid, user: APP_USER, injectsContext: false }] : []),
    // The relay passes bytes through as they are: its clients log in like direct ones.
    ...extras.map((x) =>
      x.name === "relay"
        ? { name: x.name, port: x.port, pid: x.pid, user: APP_USER, injectsContext: false }
        : { name: x.name, port: x.port, pid: x.pid, user: `${APP_USER}.${BENCH_TENANT}`, injectsContext: true, baseline: x.name.startsWith("multigres@") },
    ),
  ];

  log("sanity checks (tenant context visible through every target)");
  for (const ep of active) await sanityCheck(ep, signed, notes);

  const pgbenchArgs = (ep: Endpoint, s: Scenario, durationS: number, logPrefix?: string): PgbenchRun => {
    const tenant = s.script === "tenant";
    return {
      pgbench,
      port: ep.port,
      user: ep.user,
      password: PASSWORD,
      database: DB,
      clients: s.clients,
      protocol: s.protocol,
      script: tenant ? { file: ep.injectsContext ? tenantScriptProxied : tenantScriptManual } : { builtin: "select-only" },
      defines: tenant && !ep.injectsContext ? { ctx: "0" } : undefined,
      connectPerTx: s.connectPerTx,
      durationS,
      logPrefix,
    };
  };

  // ---- warm-up (not recorded): caches, Bun's JIT, PgBouncer's pool
  if (scenarios.length > 0) {
    for (const ep of active) {
      log(`warm-up ${ep.name} (${opts.warmupS} s, -S -c 16)`);
      await runPgbench(pgbenchArgs(ep, { ...SCENARIOS.find((s) => s.id === "select-c16-simple")!, latency: false }, opts.warmupS)).catch((e) =>
        log(`warm-up of ${ep.name} failed (continuing): ${(e as Error).message.split("\n")[0]}`),
      );
    }
  }

  // ---- interleaved rounds
  const results: ScenarioResult[] = scenarios.map((s) => ({
    id: s.id,
    title: s.title,
    description: s.description,
    clients: s.clients,
    protocol: s.protocol,
    connectPerTx: s.connectPerTx,
    durationS: runDuration(s),
    users: Object.fromEntries(active.map((ep) => [ep.name, ep.user])),
    runs: {},
    medianTps: {},
    ratios: {},
  }));
  const failures: string[] = [];
  for (let round = 1; round <= opts.rounds; round++) {
    for (const [i, s] of scenarios.entries()) {
      const line: string[] = [];
      for (const ep of active) {
        const logPrefix = s.latency ? join(workDir, `lat_${s.id}_${ep.name}_r${round}`) : undefined;
        let r;
        let cpuBefore: CpuTicks | undefined;
        try {
          cpuBefore = cpuTicks(ep.pid);
          r = await runPgbench(pgbenchArgs(ep, s, runDuration(s), logPrefix));
        } catch (e) {
          const msg = (e as Error).message;
          log(`round ${round} ${s.id} ${ep.name} FAILED: ${msg}`);
          (results[i]!.runs[ep.name] ??= []).push({ round, tps: NaN, transactions: 0, error: msg.split("\n")[0] });
          failures.push(`${s.id} / ${ep.name} / round ${round}: ${msg.split("\n")[0]}`);
          line.push(`${ep.name} FAILED`);
          continue;
        }
        const cpuAfter = cpuTicks(ep.pid);
        const rec: RunRecord = {
          round,
          tps: r.tps,
          transactions: r.transactions,
          latencyAvgMs: r.latencyAvgMs,
          connTimeMs: r.connTimeMs,
          // pgbench -T includes connecting; that CPU is counted too (it is small except for -C).
          machineCpuUs: ((cpuAfter.machine - cpuBefore!.machine) * TICK_US) / r.transactions,
          proxyCpuUs: ep.pid === undefined ? undefined : ((cpuAfter.process - cpuBefore!.process) * TICK_US) / r.transactions,
          switchesPerTx: (cpuAfter.switches - cpuBefore!.switches) / r.transactions,
        };
        if (r.latenciesUs) {
          const l = latencySummary(r.latenciesUs);
          Object.assign(rec, { p50Us: l.p50Us, p99Us: l.p99Us, meanUs: l.meanUs, samples: l.n });
        }
        (results[i]!.runs[ep.name] ??= []).push(rec);
        line.push(`${ep.name} ${Math.round(r.tps)}${rec.p50Us !== undefined ? ` (p50 ${Math.round(rec.p50Us)} µs)` : ""}`);
      }
      log(`round ${round}/${opts.rounds} ${s.id}: ${line.join(", ")} tps`);
    }
  }

  for (const [i, s] of scenarios.entries()) {
    const r = results[i]!;
    for (const t of active.map((ep) => ep.name)) {
      const runs = (r.runs[t] ?? []).filter((x) => !x.error);
      r.medianTps[t] = median(runs.map((x) => x.tps));
      r.cpu ??= {};
      const proxyCpu = runs.filter((x) => x.proxyCpuUs !== undefined).map((x) => x.proxyCpuUs!);
      r.cpu[t] = {
        machineUs: median(runs.map((x) => x.machineCpuUs!)),
        proxyUs: proxyCpu.length > 0 ? median(proxyCpu) : undefined,
        switchesPerTx: median(runs.map((x) => x.switchesPerTx!)),
      };
      if (s.latency) {
        r.latency ??= {};
        r.latency[t] = { p50Us: median(runs.map((x) => x.p50Us!)), p99Us: median(runs.map((x) => x.p99Us!)) };
      }
    }
    const m = r.medianTps;
    r.ratios = {
      multigresVsDirect: m.multigres! / m.direct!,
      multigresVsPgbouncer: m.pgbouncer !== undefined ? m.multigres! / m.pgbouncer : undefined,
      pgbouncerVsDirect: m.pgbouncer !== undefined ? m.pgbouncer / m.direct! : undefined,
    };
  }

  mg.stop();
  pgb?.stop();
  for (const x of extras) x.stop();

  // ---- startup time
  const startup: StartupResult[] = [];
  if (opts.startup) {
    log(`startup time (${opts.startupRuns} runs each)`);
    const samples: number[] = [];
    for (let i = 0; i < opts.startupRuns; i++) {
      const inst = await startMultigres({ bin, upstreamPort: pg.port, workDir, tag: `startup${i}`, env: mgEnv });
      samples.push(inst.spawnToAcceptMs);
      inst.stop();
    }
    startup.push({
      target: "multigres",
      samplesMs: samples,
      medianMs: median(samples),
      note: "compiled binary spawned directly; TCP connect polled every ~5 ms",
    });
    if (pgbBin) {
      const ps: number[] = [];
      for (let i = 0; i < opts.startupRuns; i++) {
        const t = performance.now();
        const inst = await startPgbouncer({
          bin: pgbBin, upstreamPort: pg.port, workDir, tag: `startup${i}`, poolSize: 4, maxClientConn: 100,
          users: { [APP_USER]: PASSWORD }, database: DB,
        });
        ps.push(performance.now() - t);
        inst.stop();
      }
      startup.push({ target: "pgbouncer", samplesMs: ps, medianMs: median(ps), note: "for reference: includes writing its ini and the runuser wrapper" });
    }
  }

  // ---- memory
  const memory: MemoryProfile[] = [];
  const memoryMethod =
    "VmRSS of the proxy process (/proc/PID/status; for PgBouncer the pgbouncer process under its runuser wrapper), median of 3 samples " +
    `taken ${opts.settleMs} ms after the clients are in place. Each kind of client gets a fresh instance; per client = (RSS with N clients − RSS of ` +
    "that instance idle) / N, counts are cumulative (1, then up to 1,000). 'established': postgres.js clients that completed startup, SCRAM and " +
    `(Multigres) tenant context as app_user.${BENCH_TENANT} (PgBouncer: ${APP_USER}), ran SELECT 1 and went idle; each holds a server connection ` +
    "inside the proxy, which is part of the cost. 'pre-startup': raw TCP connections accepted by the proxy that have not sent a startup packet " +
    "(Multigres --startup-timeout 0, PgBouncer client_login_timeout=0 so none are dropped). 5,000 established sessions would need 5,000 Postgres " +
    "backends in session mode, which this machine cannot hold, so 5,000 is measured pre-startup only. The 1-client figure is dominated by page granularity.";
  if (opts.memory) {
    const maxPre = Math.max(0, ...opts.memPreStartup);
    const countBackends = () =>
      Number(pg.psql(`SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = '${APP_USER}'`));
    const waitBackendsGone = async () => {
      for (let i = 0; i < 300 && countBackends() > 0; i++) await sleep(100);
    };
    const plan = {
      established: opts.memEstablished,
      preStartup: opts.memPreStartup,
      settleMs: opts.settleMs,
      password: PASSWORD,
      database: DB,
      countBackends,
      waitBackendsGone,
      log,
    };
    const attempt = async (target: string, f: () => Promise<MemoryProfile>) => {
      try {
        memory.push(await f());
      } catch (e) {
        log(`memory test of ${target} failed: ${(e as Error).message}`);
        notes.push(`The memory test of ${target} failed: ${(e as Error).message.split("\n")[0]}`);
        await waitBackendsGone();
      }
    };
    log("memory: multigres");
    await attempt("multigres", () =>
      memoryProfile("multigres", {
        ...plan,
        user: `${APP_USER}.${BENCH_TENANT}`,
        start: (kind) => startMultigres({ bin, upstreamPort: pg.port, workDir, tag: `mem-${kind}`, args: ["--startup-timeout", "0"], env: mgEnv }),
      }),
    );
    for (const b of baselineBins) {
      log(`memory: ${b.name}`);
      await attempt(b.name, () =>
        memoryProfile(b.name, {
          ...plan,
          user: `${APP_USER}.${BENCH_TENANT}`,
          start: (kind) => startMultigres({ bin: b.bin, name: b.name, upstreamPort: pg.port, workDir, tag: `mem-${kind}`, args: ["--startup-timeout", "0"], env: mgEnv }),
        }),
      );
    }
    if (opts.floor) {
      log("memory: relay");
      // Established sessions only: the relay connects upstream as soon as a
      // client is accepted, so idle pre-startup clients would each hold a
      // Postgres backend waiting for a startup packet (5,000 of them swamp it).
      await attempt("relay", () =>
        memoryProfile("relay", { ...plan, preStartup: [], user: APP_USER, start: (kind) => startRelay({ upstreamPort: pg.port, workDir, tag: `mem-${kind}` }) }),
      );
    }
    if (pgbBin) {
      log("memory: pgbouncer");
      await attempt("pgbouncer", () =>
        memoryProfile("pgbouncer", {
          ...plan,
          user: APP_USER,
          start: (kind) =>
            startPgbouncer({
              bin: pgbBin,
              upstreamPort: pg.port,
              workDir,
              tag: `mem-${kind}`,
              poolSize: maxEstablished + 10,
              maxClientConn: maxPre + maxEstablished + 100,
              users: { [APP_USER]: PASSWORD },
              database: DB,
            }),
        }),
      );
    }
  }

  // ---- budget lines from issue 3
  const budget: BudgetLine[] = [];
  if (pgbBin) {
    for (const c of [16, 64]) {
      for (const p of ["simple", "prepared"] as const) {
        const s = results.find((r) => r.id === `select-c${c}-${p}`);
        if (!s) continue;
        const ratio = s.ratios.multigresVsPgbouncer;
        const line = `throughput -S ${c} clients ${p} ≥ 1.0× PgBouncer`;
        if (ratio === undefined || Number.isNaN(ratio)) budget.push({ line, met: null, detail: "not measured (failed runs)" });
        else budget.push({ line, met: ratio >= 1.0, detail: `${ratio.toFixed(2)}× (${Math.round(s.medianTps.multigres!)} vs ${Math.round(s.medianTps.pgbouncer!)} tps)` });
      }
    }
    for (const s of results.filter((r) => r.latency)) {
      const l = s.latency!;
      const addMg = (l.multigres?.p50Us ?? NaN) - (l.direct?.p50Us ?? NaN);
      const addPgb = (l.pgbouncer?.p50Us ?? NaN) - (l.direct?.p50Us ?? NaN);
      const line = `added p50 at 1 client (${s.protocol}) ≤ PgBouncer's`;
      if (Number.isNaN(addMg) || Number.isNaN(addPgb)) budget.push({ line, met: null, detail: "not measured (failed runs)" });
      else budget.push({ line, met: addMg <= addPgb, detail: `multigres +${Math.round(addMg)} µs, pgbouncer +${Math.round(addPgb)} µs` });
    }
  }
  const mgMem = memory.find((m) => m.target === "multigres");
  if (mgMem) {
    for (const p of mgMem.points.filter((x) => x.clients >= 1000)) {
      budget.push({
        line: `idle memory ≤ 4 KB per client (${p.clients.toLocaleString("en-US")} ${p.kind})`,
        met: p.bytesPerClient <= 4096,
        detail: `${(p.bytesPerClient / 1024).toFixed(1)} KiB per client` + (mgMem && memory.find((m) => m.target === "pgbouncer") ? `; pgbouncer ${((memory.find((m) => m.target === "pgbouncer")!.points.find((x) => x.kind === p.kind && x.clients === p.clients)?.bytesPerClient ?? NaN) / 1024).toFixed(1)} KiB` : ""),
      });
    }
  }

  if (failures.length > 0) notes.push(`${failures.length} pgbench run(s) failed and are left out of the medians: ${failures.join("; ")}`);
  const loadAfter = loadavg();
  notes.push(
    `Load average before the run ${loadBefore.map((x) => x.toFixed(2)).join(" ")}, after ${loadAfter.map((x) => x.toFixed(2)).join(" ")} (${cpus().length} CPUs).`,
    "All clients use PGSSLMODE=disable and SCRAM-SHA-256 (pg_hba: scram for every TCP user; PgBouncer: auth_type scram-sha-256 with a plain-text userlist, SCRAM to the server too).",
    `Targets: direct = PostgreSQL as ${APP_USER}; multigres = compiled binary, user ${APP_USER}.${BENCH_TENANT} (tenant context injected on every connection, also for -S; pgbench tables have no RLS so the work is identical); pgbouncer = session mode, default_pool_size 64.`,
    `Each round runs every scenario against ${targetNames.join(", ")} in that order; the same PostgreSQL, pgbench (-j ≤ 2) and proxy share the 2 CPUs, so a proxy's CPU use is taken from Postgres and pgbench.`,
    "Server: fsync, synchronous_commit and full_page_writes off, autovacuum off, shared_buffers 512MB (the pgbench data fits).",
  );
  for (const s of scenarios) notes.push(`${s.id}: ${s.description}.`);

  const finishedAt = new Date();
  const result: BenchResult = {
    schema: 1,
    startedAt: startedAt.toISOString(),
    finishedAt: finishedAt.toISOString(),
    durationS: Math.round((finishedAt.getTime() - startedAt.getTime()) / 1000),
    label: argv.label,
    machine: machineInfo(),
    versions: {
      bun: Bun.version,
      postgres: pg.version,
      pgbench: (await run([pgbench, "--version"], { timeoutMs: 10_000 })).stdout.trim(),
      ...(pgbBin ? { pgbouncer: pgbouncerVersion(pgbBin) } : {}),
      multigres: gitDescribe(),
    },
    config: {
      rounds: opts.rounds,
      durationS: opts.durationS,
      scale: opts.scale,
      quick: opts.quick,
      warmupS: opts.warmupS,
      only: opts.only,
      memEstablished: opts.memEstablished,
      memPreStartup: opts.memPreStartup,
      pgMaxConnections: Math.max(200, maxEstablished + 100),
      signedContexts: signed,
      multigresArgs: "start --listen 127.0.0.1:PORT --upstream 127.0.0.1:PGPORT --http 127.0.0.1:0 --log-level warn (defaults otherwise: guard on, session per client); memory instances add --startup-timeout 0",
      baselines: opts.baselines,
      floor: opts.floor,
      passthrough: opts.passthrough,
      tenantScriptProxied: scripts.proxied,
      tenantScriptManual: scripts.manual,
    },
    scenarios: results,
    memory,
    memoryMethod,
    startup,
    budget,
    notes,
  };

  pg.stop();

  mkdirSync(opts.outDir, { recursive: true });
  const file = join(opts.outDir, `${startedAt.toISOString().replace(/\.\d+Z$/, "Z").replaceAll(":", "-")}.json`);
  writeFileSync(file, JSON.stringify(result, null, 2) + "\n");
  const md = markdown(result);
  process.stdout.write(md + "\n");
  if (opts.memory) process.stdout.write(`Memory method: ${memoryMethod}\n\n`);
  if (argv.compare) {
    try {
      process.stdout.write(compareMarkdown(JSON.parse(readFileSync(argv.compare, "utf8")) as BenchResult, result) + "\n");
    } catch (e) {
      log(`--compare ${argv.compare}: ${(e as Error).message}`);
    }
  }
  process.stdout.write(`Results: ${file}\n`);
  log(`done in ${result.durationS} s`);
}

main().then(
  () => {
    teardownAll();
    process.exit(0);
  },
  (e) => {
    process.stderr.write(`bench: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
    teardownAll();
    process.exit(1);
  },
);
