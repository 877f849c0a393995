/**
 * The result document (written as JSON) and its markdown rendering.
 */
import type { MemoryProfile } from "./memory.ts";

/**
 * direct, multigres and pgbouncer are always there (PgBouncer when
 * installed); `--baseline REV` adds "multigres@REV" and `--floor` "relay".
 */
export type TargetName = string;
export const TARGETS: readonly TargetName[] = ["direct", "multigres", "pgbouncer"];

/** Core targets first, then the extras in the order they were run. */
export function targetsOf(s: ScenarioResult): TargetName[] {
  const present = Object.keys(s.medianTps);
  return [...TARGETS.filter((t) => present.includes(t)), ...present.filter((t) => !TARGETS.includes(t))];
}

export interface RunRecord {
  round: number;
  tps: number;
  transactions: number;
  latencyAvgMs?: number;
  connTimeMs?: number;
  p50Us?: number;
  p99Us?: number;
  meanUs?: number;
  samples?: number;
  /** CPU per transaction in µs: the whole machine, and the proxy process (not for direct). */
  machineCpuUs?: number;
  proxyCpuUs?: number;
  /** Context switches on the whole machine per transaction. */
  switchesPerTx?: number;
  /** Set when this pgbench run failed (left out of the medians). */
  error?: string;
}

export interface ScenarioResult {
  id: string;
  title: string;
  description: string;
  clients: number;
  protocol: "simple" | "prepared";
  connectPerTx: boolean;
  /** pgbench -T of each run (64 clients get a connection allowance). */
  durationS: number;
  users: Record<TargetName, string>;
  runs: Record<TargetName, RunRecord[]>;
  medianTps: Record<TargetName, number>;
  ratios: { multigresVsDirect?: number; multigresVsPgbouncer?: number; pgbouncerVsDirect?: number };
  /** Medians over rounds of each round's p50/p99 (µs), when latency was logged. */
  latency?: Record<TargetName, { p50Us: number; p99Us: number }>;
  /** Medians over rounds of CPU per transaction (µs), see RunRecord. */
  cpu?: Record<TargetName, { machineUs: number; proxyUs?: number; switchesPerTx: number }>;
}

export interface StartupResult {
  target: string;
  samplesMs: number[];
  medianMs: number;
  note: string;
}

export interface BudgetLine {
  line: string;
  met: boolean | null;
  detail: string;
}

export interface BenchResult {
  schema: 1;
  startedAt: string;
  finishedAt: string;
  durationS: number;
  label?: string;
  machine: Record<string, string | number>;
  versions: Record<string, string>;
  config: Record<string, unknown>;
  scenarios: ScenarioResult[];
  memory: MemoryProfile[];
  memoryMethod: string;
  startup: StartupResult[];
  budget: BudgetLine[];
  notes: string[];
}

const fmtInt = (n: number | undefined) => (n === undefined || Number.isNaN(n) ? "–" : Math.round(n).toLocaleString("en-US"));
const fmtRatio = (r: number | undefined) => (r === undefined || Number.isNaN(r) ? "–" : `${r.toFixed(2)}×`);
const fmtUs = (n: number | undefined) => (n === undefined || Number.isNaN(n) ? "–" : `${Math.round(n)}`);
const fmtSignedUs = (n: number | undefined) => (n === undefined || Number.isNaN(n) ? "–" : `${n >= 0 ? "+" : ""}${Math.round(n)}`);
export function fmtBytes(n: number | undefined): string {
  if (n === undefined || Number.isNaN(n)) return "–";
  const a = Math.abs(n);
  if (a >= 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  if (a >= 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${Math.round(n)} B`;
}

export function markdown(r: BenchResult): string {
  const out: string[] = [];
  const hasPgb = r.scenarios.some((s) => s.medianTps.pgbouncer !== undefined);
  out.push(`### Multigres benchmark — ${r.startedAt}${r.label ? ` (${r.label})` : ""}`);
  out.push("");
  out.push(
    `${r.machine.cpus} × ${r.machine.cpuModel}, ${r.machine.memory}, ${r.machine.os}; PostgreSQL ${r.versions.postgres}, ` +
      `${r.versions.pgbouncer ?? "no PgBouncer"}, Bun ${r.versions.bun}, multigres ${r.versions.multigres}. ` +
      `${r.config.rounds} interleaved round${r.config.rounds === 1 ? "" : "s"} × ${r.config.durationS} s per run (64 clients: +4 s for connecting), medians shown; pgbench -s ${r.config.scale}, -j ≤ 2.`,
  );
  out.push("");

  out.push("**Throughput** (tps, median of rounds)");
  out.push("");
  out.push(`| scenario | direct | multigres | ${hasPgb ? "pgbouncer | " : ""}multigres / direct | ${hasPgb ? "multigres / pgbouncer | pgbouncer / direct |" : ""}`);
  out.push(`|---|--:|--:|${hasPgb ? "--:|" : ""}--:|${hasPgb ? "--:|--:|" : ""}`);
  for (const s of r.scenarios) {
    const cells = [s.title, fmtInt(s.medianTps.direct), fmtInt(s.medianTps.multigres)];
    if (hasPgb) cells.push(fmtInt(s.medianTps.pgbouncer));
    cells.push(fmtRatio(s.ratios.multigresVsDirect));
    if (hasPgb) cells.push(fmtRatio(s.ratios.multigresVsPgbouncer), fmtRatio(s.ratios.pgbouncerVsDirect));
    out.push(`| ${cells.join(" | ")} |`);
  }
  out.push("");

  const extras = [...new Set(r.scenarios.flatMap((s) => targetsOf(s).filter((t) => !TARGETS.includes(t))))];
  if (extras.length > 0) {
    out.push("**Other targets in the same rounds** (tps; ratios to multigres and to pgbouncer)");
    out.push("");
    out.push(`| scenario | ${extras.map((t) => `${t} | ÷ multigres${hasPgb ? " | ÷ pgbouncer" : ""}`).join(" | ")} |`);
    out.push(`|---|${extras.map(() => (hasPgb ? "--:|--:|--:" : "--:|--:")).join("|")}|`);
    for (const s of r.scenarios) {
      const cells = extras.map((t) => {
        const v = s.medianTps[t];
        const vs = (other: number | undefined) => fmtRatio(v !== undefined && other !== undefined ? v / other : undefined);
        return [fmtInt(v), vs(s.medianTps.multigres), ...(hasPgb ? [vs(s.medianTps.pgbouncer)] : [])].join(" | ");
      });
      out.push(`| ${s.title} | ${cells.join(" | ")} |`);
    }
    out.push("");
  }

  const withCpu = r.scenarios.filter((s) => s.cpu);
  if (withCpu.length > 0) {
    const names = [...new Set(withCpu.flatMap((s) => targetsOf(s)))];
    out.push(
      "**CPU per transaction** (median of rounds: µs of the whole machine / µs of it in the proxy process / context switches on the machine; from /proc, clock-tick resolution)",
    );
    out.push("");
    out.push(`| scenario | ${names.join(" | ")} |`);
    out.push(`|---|${names.map(() => "--:").join("|")}|`);
    for (const s of withCpu) {
      const cells = names.map((t) => {
        const c = s.cpu![t];
        return c ? `${fmtUs(c.machineUs)} / ${c.proxyUs !== undefined ? fmtUs(c.proxyUs) : "–"} / ${c.switchesPerTx.toFixed(1)}` : "–";
      });
      out.push(`| ${s.title} | ${cells.join(" | ")} |`);
    }
    out.push("");
  }

  const lat = r.scenarios.filter((s) => s.latency);
  if (lat.length > 0) {
    out.push("**Latency at 1 client** (µs per query from pgbench -l; median over rounds of each round's percentile)");
    out.push("");
    out.push("| protocol | target | p50 | p99 | added p50 vs direct | added p99 vs direct |");
    out.push("|---|---|--:|--:|--:|--:|");
    for (const s of lat) {
      const d = s.latency!.direct;
      for (const t of targetsOf(s)) {
        const l = s.latency![t];
        if (!l) continue;
        out.push(
          `| ${s.protocol} | ${t} | ${fmtUs(l.p50Us)} | ${fmtUs(l.p99Us)} | ${t === "direct" || !d ? "–" : fmtSignedUs(l.p50Us - d.p50Us)} | ${t === "direct" || !d ? "–" : fmtSignedUs(l.p99Us - d.p99Us)} |`,
        );
      }
    }
    out.push("");
  }

  if (r.memory.length > 0) {
    out.push("**Idle memory** (VmRSS of the proxy process; per client = (RSS − idle baseline of that fresh instance) / clients)");
    out.push("");
    const targets = r.memory.map((m) => m.target);
    out.push(`| idle clients | state | ${targets.map((t) => `${t} RSS | ${t} per client`).join(" | ")} |`);
    out.push(`|--:|---|${targets.map(() => "--:|--:").join("|")}|`);
    out.push(`| 0 | idle baseline | ${r.memory.map((m) => `${fmtBytes(m.idleBaselineBytes)} | –`).join(" | ")} |`);
    const keys = new Map<string, { clients: number; kind: string }>();
    for (const m of r.memory) for (const p of m.points) keys.set(`${p.kind}:${p.clients}`, { clients: p.clients, kind: p.kind });
    for (const [key, k] of keys) {
      const cells = r.memory.map((m) => {
        const p = m.points.find((x) => `${x.kind}:${x.clients}` === key);
        if (!p) return "– | –";
        const short = p.stillConnected < p.clients ? ` (only ${p.stillConnected} connected)` : "";
        return `${fmtBytes(p.rssBytes)} | ${fmtBytes(p.bytesPerClient)}${short}`;
      });
      const state = k.kind === "established" ? "established session (auth + context done, holds a server conn)" : "TCP accepted, no startup packet yet";
      out.push(`| ${k.clients.toLocaleString("en-US")} | ${state} | ${cells.join(" | ")} |`);
    }
    if (r.memory.some((m) => m.afterCloseBytes !== undefined)) {
      out.push(`| 0 | after the established clients left | ${r.memory.map((m) => `${fmtBytes(m.afterCloseBytes)} | –`).join(" | ")} |`);
    }
    out.push("");
  }

  if (r.startup.length > 0) {
    out.push("**Startup** (spawn → first accepted TCP connection)");
    out.push("");
    out.push("| binary | median | min | max | runs | note |");
    out.push("|---|--:|--:|--:|--:|---|");
    for (const s of r.startup) {
      out.push(
        `| ${s.target} | ${s.medianMs.toFixed(1)} ms | ${Math.min(...s.samplesMs).toFixed(1)} ms | ${Math.max(...s.samplesMs).toFixed(1)} ms | ${s.samplesMs.length} | ${s.note} |`,
      );
    }
    out.push("");
  }

  if (r.budget.length > 0) {
    out.push("**Budget (issue 3)**");
    out.push("");
    out.push("| budget line | met | measured |");
    out.push("|---|---|---|");
    for (const b of r.budget) out.push(`| ${b.line} | ${b.met === null ? "n/a" : b.met ? "yes" : "**no**"} | ${b.detail} |`);
    out.push("");
  }
  if (r.notes.length > 0) {
    for (const n of r.notes) out.push(`- ${n}`);
    out.push("");
  }
  return out.join("\n");
}
