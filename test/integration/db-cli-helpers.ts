/**
 * Helpers for the `multigres setup` / `multigres doctor` tests: run the
 * compiled binary, give each test its own database (and its own roles:
 * roles are cluster-wide, and other test files use the fixture roles), and
 * drop them all at the end.
 */
import { copyFileSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ensureBuilt, onCleanup, type PgInstance } from "../harness/index.ts";
import { withClient, type Client } from "../harness/clients.ts";

let privateBin: string | undefined;
/**
 * The binary under test, copied once per process: dist/multigres is shared
 * by every test process in the checkout, and a rebuild by another one in the
 * middle of a setup-twice test would make the second run differ.
 */
function binary(): string {
  if (privateBin) return privateBin;
  const dir = mkdtempSync(join(tmpdir(), "multigres-cli-test-"));
  onCleanup(() => rmSync(dir, { recursive: true, force: true }));
  const bin = join(dir, "multigres");
  copyFileSync(ensureBuilt(), bin);
  return (privateBin = bin);
}

export interface CliResult {
  stdout: string;
  stderr: string;
  exitCode: number | null;
  cmd: string[];
}

export function describeCli(r: CliResult): string {
  return `$ ${r.cmd.map((a) => a.replace(/(\/\/[^:@/]+:)[^@]*@/, "$1***@")).join(" ")}\nexit=${r.exitCode}\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;
}

/**
 * Run `multigres <args>` with a clean environment: nothing MULTIGRES_*, PG*
 * or DATABASE_URL inherited from the test runner, only `env`.
 */
export async function multigres(args: string[], env: Record<string, string> = {}): Promise<CliResult> {
  const bin = binary();
  const clean: Record<string, string> = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined || k.startsWith("MULTIGRES_") || k.startsWith("PG") || k === "DATABASE_URL") continue;
    clean[k] = v;
  }
  const cmd = [bin, ...args];
  const proc = Bun.spawn(cmd, {
    env: { ...clean, NO_COLOR: "1", ...env },
    stdin: "ignore",
    stdout: "pipe",
    stderr: "pipe",
  });
  const [stdout, stderr] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  await proc.exited;
  return { stdout, stderr, exitCode: proc.exitCode, cmd };
}

let counter = 0;

/** Scratch databases and roles for one test file; drop() removes them all. */
export class Scratch {
  private databases: string[] = [];
  private roles: string[] = [];

  constructor(
    readonly pg: PgInstance,
    private readonly prefix: string,
  ) {}

  /** Superuser URL of a database on the test server. */
  url(database: string): string {
    const u = new URL(this.pg.adminUrl);
    u.pathname = "/" + encodeURIComponent(database);
    return u.toString();
  }

  /** A name for a role this file owns (created by the test or by setup); dropped at the end. */
  role(label: string): string {
    const name = `${this.prefix}_${process.pid}_${++counter}_${label}`.toLowerCase();
    this.roles.push(name);
    return name;
  }

  /** A new, empty database; returns its name and superuser URL. */
  async database(): Promise<{ name: string; url: string }> {
    const name = `${this.prefix}_${process.pid}_${++counter}`.toLowerCase();
    await this.pg.sql.unsafe(`CREATE DATABASE "${name}"`);
    this.databases.push(name);
    return { name, url: this.url(name) };
  }

  /** Run `fn` with a superuser client on `database`. */
  as<T>(database: string, fn: (sql: Client) => Promise<T>): Promise<T> {
    return withClient(this.url(database), fn);
  }

  async drop(): Promise<void> {
    for (const db of this.databases.splice(0)) {
      await this.pg.sql.unsafe(`DROP DATABASE IF EXISTS "${db}" WITH (FORCE)`);
    }
    for (const role of this.roles.splice(0).reverse()) {
      await this.pg.sql.unsafe(`DROP ROLE IF EXISTS "${role}"`);
    }
  }
}
