#!/usr/bin/env bun
/**
 * Before/after view of two benchmark results:
 *
 *   bun scripts/bench/compare.ts bench/results/OLD.json bench/results/NEW.json
 *   bun run bench --compare bench/results/OLD.json      (compares with the new run)
 *
 * Ratios to direct and to PgBouncer are the figures to compare across runs
 * (each is measured within one run, under the same machine conditions);
 * absolute tps moves with whatever else the machine is doing.
 */
import { readFileSync } from "node:fs";
import { fmtBytes, type BenchResult } from "./report.ts";

const pct = (a: number | undefined, b: number | undefined) =>
  a === undefined || b === undefined || !Number.isFinite(a) || !Number.isFinite(b) || a === 0 ? "–" : `${b >= a ? "+" : ""}${(((b - a) / a) * 100).toFixed(0)}%`;
const ratio = (r: number | undefined) => (r === undefined || !Number.isFinite(r) ? "–" : `${r.toFixed(2)}×`);
const int = (n: number | undefined) => (n === undefined || !Number.isFinite(n) ? "–" : Math.round(n).toLocaleString("en-US"));

export function compareMarkdown(before: BenchResult, after: BenchResult): string {
  const out: string[] = [];
  const name = (r: BenchResult) => `${r.startedAt}${r.label ? ` (${r.label})` : ""}, multigres ${r.versions.multigres}`;
  out.push(`**Before → after**: ${name(before)} → ${name(after)}`);
  out.push("");
  out.push("| scenario | multigres tps | Δ | multigres / direct | multigres / pgbouncer |");
  out.push("|---|--:|--:|--:|--:|");
  for (const s of after.scenarios) {
    const b = before.scenarios.find((x) => x.id === s.id);
    if (!b) continue;
    out.push(
      `| ${s.title} | ${int(b.medianTps.multigres)} → ${int(s.medianTps.multigres)} | ${pct(b.medianTps.multigres, s.medianTps.multigres)} | ` +
        `${ratio(b.ratios.multigresVsDirect)} → ${ratio(s.ratios.multigresVsDirect)} | ${ratio(b.ratios.multigresVsPgbouncer)} → ${ratio(s.ratios.multigresVsPgbouncer)} |`,
    );
  }
  const lat = after.scenarios.filter((s) => s.latency);
  if (lat.length > 0) {
    out.push("");
    out.push("| 1-client latency | added p50 vs direct (multigres) | added p50 (pgbouncer) | added p99 (multigres) |");
    out.push("|---|--:|--:|--:|");
    for (const s of lat) {
      const b = before.scenarios.find((x) => x.id === s.id)?.latency;
      const a = s.latency!;
      const add = (l: typeof a | undefined, t: "multigres" | "pgbouncer", p: "p50Us" | "p99Us") =>
        l?.[t] && l.direct ? `${Math.round(l[t]![p] - l.direct[p])} µs` : "–";
      out.push(
        `| ${s.protocol} | ${add(b, "multigres", "p50Us")} → ${add(a, "multigres", "p50Us")} | ${add(b, "pgbouncer", "p50Us")} → ${add(a, "pgbouncer", "p50Us")} | ${add(b, "multigres", "p99Us")} → ${add(a, "multigres", "p99Us")} |`,
      );
    }
  }
  const mb = before.memory.find((m) => m.target === "multigres");
  const ma = after.memory.find((m) => m.target === "multigres");
  if (mb && ma) {
    out.push("");
    out.push("| multigres idle memory | before | after |");
    out.push("|---|--:|--:|");
    out.push(`| idle baseline RSS | ${fmtBytes(mb.idleBaselineBytes)} | ${fmtBytes(ma.idleBaselineBytes)} |`);
    for (const p of ma.points) {
      const q = mb.points.find((x) => x.kind === p.kind && x.clients === p.clients);
      out.push(`| per client, ${p.clients.toLocaleString("en-US")} ${p.kind} | ${fmtBytes(q?.bytesPerClient)} | ${fmtBytes(p.bytesPerClient)} |`);
    }
  }
  const sb = before.startup.find((s) => s.target === "multigres");
  const sa = after.startup.find((s) => s.target === "multigres");
  if (sb && sa) out.push("", `Startup (median): ${sb.medianMs.toFixed(1)} ms → ${sa.medianMs.toFixed(1)} ms`);
  out.push("");
  return out.join("\n");
}

if (import.meta.main) {
  const [a, b] = Bun.argv.slice(2);
  if (!a || !b) {
    process.stderr.write("usage: bun scripts/bench/compare.ts BEFORE.json AFTER.json\n");
    process.exit(2);
  }
  const load = (p: string) => JSON.parse(readFileSync(p, "utf8")) as BenchResult;
  process.stdout.write(compareMarkdown(load(a), load(b)) + "\n");
}
