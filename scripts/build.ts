#!/usr/bin/env bun
/**
 * Build the standalone binary: `bun run build` → dist/multigres, and the
 * package's library entry (src/lib.ts) for Node → dist/lib.js.
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
// The library part of the npm package (src/lib.ts), for Node as well as Bun.
const lib = Bun.spawnSync([process.execPath, "build", join(root, "src", "lib.ts"), "--target", "node", "--outfile", join(root, "dist", "lib.js")], {
  cwd: root,
  stdout: "inherit",
  stderr: "inherit",
});
if (lib.exitCode !== 0) {
  console.error("build of dist/lib.js failed");
  process.exit(lib.exitCode || 1);
}
console.log(`built ${outfile} and dist/lib.js in ${Math.round(performance.now() - started)} ms`);
