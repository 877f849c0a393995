#!/usr/bin/env bun
/**
 * Build the standalone binary: `bun run build` → dist/multigres.
 *
 * Equivalent to `bun build --compile src/index.ts --outfile dist/multigres`.
 * sql/setup.sql is embedded by src/ itself (imported `with { type: "text" }`).
 *
 * Extra arguments are passed through to `bun build`, e.g.
 *   bun run build --target=bun-linux-arm64 --outfile dist/multigres-arm64
 * (a later --outfile wins over the default).
 */
import { mkdirSync } from "node:fs";
import { dirname, join, resolve } from "node:path";

const root = resolve(import.meta.dir, "..");
const outfile = join(root, "dist", "multigres");
mkdirSync(dirname(outfile), { recursive: true });

const extra = process.argv.slice(2);
const cmd = [
  process.execPath,
  "build",
  "--compile",
  join(root, "src", "index.ts"),
  "--outfile",
  outfile,
  ...extra,
];

const started = performance.now();
const proc = Bun.spawnSync(cmd, { cwd: root, stdout: "inherit", stderr: "inherit" });
if (proc.exitCode !== 0) {
  console.error(`build failed (exit ${proc.exitCode ?? proc.signalCode}): ${cmd.join(" ")}`);
  process.exit(proc.exitCode || 1);
}
console.log(`built ${outfile} in ${Math.round(performance.now() - started)} ms`);
