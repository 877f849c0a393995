/**
 * `bun run dev`: the proxy in front of an embedded PostgreSQL, ready to try.
 *
 *   bun run dev                              PGlite + sql/setup.sql + scripts/demo.sql
 *   bun run dev --listen 127.0.0.1:7432      choose the proxy's address (port 0: any free port)
 *   bun run dev --upstream 127.0.0.1:5432    no PGlite: proxy a real server instead
 *
 * Every other flag goes to `multigres start` unchanged. The embedded server
 * is PGlite (PostgreSQL compiled to WASM, in memory) behind
 * scripts/pglite-server.ts, which gives each connection its own session
 * (see there for why PGlite's own socket server is not enough). Prints
 * connection strings for the demo tenants once the proxy listens; Ctrl-C
 * (or SIGTERM) stops the proxy and the database.
 */
import { PGlite } from "@electric-sql/pglite";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { runSetup } from "../src/db/setup.ts";
import { deriveContextKey } from "../src/tenant/context.ts";
import { PGliteSessionServer } from "./pglite-server.ts";

const ROOT = join(import.meta.dir, "..");
const DEFAULT_LISTEN = "127.0.0.1:6432";
const DEFAULT_HTTP = "127.0.0.1:9187"; // the proxy's /healthz listener
const DEFAULT_TENANT_SETTING = "app.current_tenant_id";
const APP_ROLE = "app_user";
const TENANTS = ["acme", "globex"] as const;
/** The demo role's password at the proxy (its auth file); PGlite itself checks none. */
const DEV_PASSWORD = "dev";

const HELP = `bun run dev [--listen HOST:PORT] [--upstream HOST:PORT] [multigres start flags…]

Runs the Multigres proxy in front of an embedded PostgreSQL (PGlite, in memory)
loaded with sql/setup.sql and a two-tenant demo schema (scripts/demo.sql), and
prints connection strings for the tenants "acme" and "globex".

  --listen HOST:PORT     where the proxy listens (default ${DEFAULT_LISTEN}; if that
                         port is taken, a free one is used; port 0: any free port)
  --upstream HOST:PORT   skip PGlite and proxy this PostgreSQL server instead
                         (prepare it with sql/setup.sql and scripts/demo.sql)
  --http HOST:PORT       the proxy's health endpoint (default ${DEFAULT_HTTP}; if
                         that port is taken, a free one is used)

Any other flag is passed to \`multigres start\` (see \`bun src/index.ts --help\`).
With PGlite, dev mode makes up MULTIGRES_CONTEXT_SECRET (or uses the one set),
stores its key in the database, and gives the proxy an auth file in which
app_user's password is "${DEV_PASSWORD}". With --upstream, set MULTIGRES_CONTEXT_SECRET to
the secret the database's key came from (\`multigres setup\` prints it);
authentication is relayed to that server (--auth passthrough) unless you pass
--auth-file or --tenant-auth.`;

// ------------------------------------------------------------------ args

export interface DevArgs {
  listen: string;
  listenGiven: boolean;
  upstream?: string;
  separator: string;
  tenantSetting: string;
  /** Flags for `multigres start`, other than --listen and --upstream. */
  passthrough: string[];
  /** --http or MULTIGRES_HTTP was given. */
  httpGiven: boolean;
  help: boolean;
}

export function parseDevArgs(argv: string[], env: Record<string, string | undefined> = process.env): DevArgs {
  const out: DevArgs = {
    listen: env.MULTIGRES_LISTEN ?? DEFAULT_LISTEN,
    listenGiven: env.MULTIGRES_LISTEN !== undefined,
    separator: env.MULTIGRES_SEPARATOR ?? ".",
    tenantSetting: env.MULTIGRES_TENANT_SETTING ?? DEFAULT_TENANT_SETTING,
    passthrough: [],
    httpGiven: env.MULTIGRES_HTTP !== undefined,
    help: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === "--help" || arg === "-h") {
      out.help = true;
      continue;
    }
    const m = /^--([a-z-]+)(?:=(.*))?$/s.exec(arg);
    const name = m?.[1];
    const takeValue = (): string => {
      if (m?.[2] !== undefined) return m[2];
      const next = argv[i + 1];
      if (next === undefined) throw new Error(`${arg} needs a value`);
      i++;
      return next;
    };
    if (name === "listen") {
      out.listen = takeValue();
      out.listenGiven = true;
    } else if (name === "upstream") {
      out.upstream = takeValue();
    } else if (name === "separator" || name === "tenant-setting") {
      const value = takeValue();
      if (name === "separator") out.separator = value;
      else out.tenantSetting = value;
      out.passthrough.push(`--${name}`, value);
    } else {
      if (name === "http") out.httpGiven = true;
      out.passthrough.push(arg);
    }
  }
  return out;
}

// ---------------------------------------------------------- embedded db

export interface EmbeddedPostgres {
  db: PGlite;
  server: PGliteSessionServer;
  host: string;
  port: number;
  version: string;
  stop(): Promise<void>;
}

/**
 * PGlite in memory with sql/setup.sql, the context key for `contextSecret`
 * and the demo schema, served on host:port (0 = a free port), then hardened
 * by `multigres setup`'s own code.
 */
export async function startEmbeddedPostgres(opts: {
  contextSecret: string;
  tenantSetting?: string;
  host?: string;
  port?: number;
  /** The PGlite backend died; it cannot recover. */
  onCrash?: (error: Error) => void;
}): Promise<EmbeddedPostgres> {
  const tenantSetting = opts.tenantSetting ?? DEFAULT_TENANT_SETTING;
  const db = await PGlite.create();
  try {
    let setup = await Bun.file(join(ROOT, "sql/setup.sql")).text();
    // setup.sql is written for the default setting name (`multigres setup` does the same rewrite).
    if (tenantSetting !== DEFAULT_TENANT_SETTING) setup = setup.replaceAll(DEFAULT_TENANT_SETTING, tenantSetting);
    await db.exec(setup);
    const hasKeys = await db.query<{ ok: boolean }>(
      "SELECT to_regprocedure('multigres.add_context_key(bytea)') IS NOT NULL AS ok",
    );
    if (hasKeys.rows[0]?.ok) {
      await db.query("SELECT multigres.add_context_key($1)", [deriveContextKey(opts.contextSecret)]);
    }
    await db.exec(await Bun.file(join(ROOT, "scripts/demo.sql")).text());
    const version = (await db.query<{ v: string }>("SELECT current_setting('server_version') AS v")).rows[0]!.v;

    const server = new PGliteSessionServer({
      db,
      host: opts.host ?? "127.0.0.1",
      port: opts.port ?? 0,
      customSettings: [tenantSetting, `${tenantSetting}_sig`],
      log: (m) => process.stderr.write(`[pglite] ${m}\n`),
      onCrash: opts.onCrash,
    });
    await server.start();
    // What `multigres setup` does to a real server, so that the demo runs
    // under the same hardening (db/harden.ts) a deployment gets.
    await runSetup({
      databaseUrl: `postgres://postgres@${opts.host ?? "127.0.0.1"}:${server.port}/postgres`,
      appRole: APP_ROLE,
      tenantSetting,
      secret: opts.contextSecret,
    }).catch(async (e) => {
      await server.stop();
      throw e;
    });
    return {
      db,
      server,
      host: opts.host ?? "127.0.0.1",
      port: server.port,
      version,
      async stop() {
        await server.stop();
        // A crashed backend never answers close().
        if (!server.crashed) await db.close();
      },
    };
  } catch (err) {
    await db.close().catch(() => {});
    throw err;
  }
}

// ---------------------------------------------------------------- banner

function urlHost(host: string): string {
  if (host === "0.0.0.0" || host === "" || host === "*") return "127.0.0.1";
  if (host === "::" || host === "[::]") return "[::1]";
  return host.includes(":") && !host.startsWith("[") ? `[${host}]` : host;
}

export function banner(o: {
  proxyHost: string;
  proxyPort: number;
  separator: string;
  upstream: string;
  embedded?: { version: string };
}): string {
  const hostPort = `${urlHost(o.proxyHost)}:${o.proxyPort}`;
  const user = (tenant: string) => encodeURIComponent(`${APP_ROLE}${o.separator}${tenant}`);
  const password = o.embedded ? `:${DEV_PASSWORD}` : "";
  const width = Math.max(...TENANTS.map((t) => t.length), "superuser".length) + 2;
  const lines = [
    "",
    o.embedded
      ? `Multigres dev mode: proxy on ${hostPort}, upstream embedded PostgreSQL ${o.embedded.version} (PGlite, in memory) on ${o.upstream}`
      : `Multigres dev mode: proxy on ${hostPort}, upstream ${o.upstream}`,
    "",
    "Connection strings (postgres.js, node-postgres, libpq):",
    ...TENANTS.map((t) => `  ${t.padEnd(width)}postgres://${user(t)}${password}@${hostPort}/postgres`),
    `  ${"superuser".padEnd(width)}postgres://postgres${password}@${hostPort}/postgres   (bypass: no tenant, sees every row)`,
    "",
    "psql:",
    ...TENANTS.map((t) => `  psql "postgres://${user(t)}${password}@${hostPort}/postgres?sslmode=disable"`),
    "",
    "Try:  SELECT * FROM projects;   SELECT * FROM tasks;   (each tenant sees only its own rows)",
  ];
  if (o.embedded) {
    lines.push(
      "",
      `The proxy checks the tenants' password ("${DEV_PASSWORD}", from its auth file); the superuser's goes to`,
      "the embedded server, which accepts any. All connections share one PGlite backend, so one",
      "statement runs at a time and an open transaction makes the other connections wait until it ends;",
      "no cancel, no TLS; LISTEN/NOTIFY, temp tables and SQL PREPARE are shared. Data lives in memory.",
    );
  } else {
    lines.push(
      "",
      `Use app_user's real password and your database name (authentication is relayed to the server unless`,
      `you passed --auth-file or --tenant-auth). The upstream needs sql/setup.sql, the context key for`,
      `MULTIGRES_CONTEXT_SECRET and, for the tables above, scripts/demo.sql.`,
    );
  }
  lines.push("", "Ctrl-C stops everything.", "");
  return lines.join("\n");
}

// ------------------------------------------------------------------ main

function splitHostPort(address: string): [string, number] {
  const i = address.lastIndexOf(":");
  return [address.slice(0, i).replace(/^\[(.*)\]$/, "$1"), Number(address.slice(i + 1))];
}

async function portIsFree(host: string, port: number): Promise<boolean> {
  return await new Promise((resolve) => {
    const probe = createServer();
    probe.once("error", () => resolve(false));
    probe.listen(port, host, () => probe.close(() => resolve(true)));
  });
}

/** Copies a child's output stream to ours, calling onLine for each complete line. */
async function tee(stream: ReadableStream<Uint8Array>, out: NodeJS.WriteStream, onLine: (line: string) => void) {
  const decoder = new TextDecoder();
  let partial = "";
  for await (const chunk of stream) {
    out.write(chunk);
    partial += decoder.decode(chunk, { stream: true });
    const lines = partial.split("\n");
    partial = lines.pop()!;
    for (const line of lines) onLine(line);
  }
  if (partial) onLine(partial);
}

async function main(): Promise<number> {
  let args: DevArgs;
  try {
    args = parseDevArgs(process.argv.slice(2));
  } catch (e) {
    console.error(`dev: ${(e as Error).message}\n\n${HELP}`);
    return 2;
  }
  if (args.help) {
    console.log(HELP);
    return 0;
  }

  // Default ports that are taken (another proxy, another dev mode) give way to free ones.
  let listen = args.listen;
  const extra: string[] = [];
  if (!args.listenGiven && !(await portIsFree(...splitHostPort(listen)))) {
    console.error(`dev: ${listen} is in use, so the proxy listens on a free port (pass --listen HOST:PORT to choose one)`);
    listen = `${splitHostPort(listen)[0]}:0`;
  }
  if (!args.httpGiven && !(await portIsFree(...splitHostPort(DEFAULT_HTTP)))) {
    console.error(`dev: ${DEFAULT_HTTP} is in use, so the health endpoint uses a free port (pass --http HOST:PORT to choose one)`);
    extra.push("--http", `${splitHostPort(DEFAULT_HTTP)[0]}:0`);
  }

  let embedded: EmbeddedPostgres | undefined;
  let upstream = args.upstream;
  const env: Record<string, string | undefined> = { ...process.env };
  const ownAuth = args.passthrough.some((a) => /^--(auth|auth-file|tenant-auth)(=|$)/.test(a)) || env.MULTIGRES_AUTH_FILE || env.MULTIGRES_AUTH;
  let scratch: string | undefined;
  if (!ownAuth && upstream === undefined) {
    // The proxy authenticates the demo tenants itself, as in production.
    scratch = mkdtempSync(join(tmpdir(), "multigres-dev-"));
    const authFile = join(scratch, "userlist.txt");
    writeFileSync(authFile, `"${APP_ROLE}" "${DEV_PASSWORD}"\n`, { mode: 0o600 });
    extra.push("--auth-file", authFile);
    env.MULTIGRES_UPSTREAM_PASSWORD ??= DEV_PASSWORD;
    // The startup check then proves the embedded database ready (its log line).
    if (!args.passthrough.some((a) => a.startsWith("--database"))) extra.push("--database", "postgres");
  } else if (!ownAuth) {
    extra.push("--auth", "passthrough");
  }
  let crashed: Error | undefined;
  let onCrash = (_: Error) => {};
  if (upstream === undefined) {
    // Only this process and the database it made up need the secret; a real upstream has its own.
    env.MULTIGRES_CONTEXT_SECRET ??= randomBytes(32).toString("hex");
    embedded = await startEmbeddedPostgres({
      contextSecret: env.MULTIGRES_CONTEXT_SECRET,
      tenantSetting: args.tenantSetting,
      onCrash: (e) => onCrash(e),
    });
    upstream = `${embedded.host}:${embedded.port}`;
  }

  const child = Bun.spawn(
    [process.execPath, join(ROOT, "src/index.ts"), "start", "--listen", listen, "--upstream", upstream, ...extra, ...args.passthrough],
    {
      cwd: ROOT,
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
      env: { ...env, ...(process.stdout.isTTY ? { FORCE_COLOR: "1" } : {}) },
    },
  );

  let ready = false;
  const onLine = (raw: string) => {
    if (ready) return;
    const line = raw.replace(/\x1b\[[0-9;]*m/g, "");
    // "listening on HOST:PORT, upstream …" (not the health endpoint's "http listening on …").
    if (/\bhttp listening\b/i.test(line)) return;
    const m = /\blistening on (\S+):(\d+)/.exec(line);
    if (!m) return;
    ready = true;
    process.stdout.write(
      banner({
        proxyHost: m[1]!,
        proxyPort: Number(m[2]),
        separator: args.separator,
        upstream: upstream!,
        embedded: embedded && { version: embedded.version },
      }),
    );
  };
  const output = Promise.all([
    tee(child.stdout, process.stdout, onLine),
    tee(child.stderr, process.stderr, onLine),
  ]);

  let stopping = false;
  const stop = (signal: NodeJS.Signals) => {
    if (stopping) {
      console.error(`dev: ${signal} again, killing the proxy`);
      child.kill("SIGKILL");
      return;
    }
    stopping = true;
    child.kill("SIGTERM");
  };
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("exit", () => child.kill("SIGTERM")); // never leave the proxy behind
  onCrash = (e) => {
    crashed = e;
    console.error(`dev: ${e.message}; stopping (restart \`bun run dev\` for a fresh database)`);
    if (!stopping) {
      stopping = true;
      child.kill("SIGTERM");
    }
  };

  const code = await child.exited;
  await output;
  if (embedded) await embedded.stop();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
  if (crashed) return 1;
  if (stopping) {
    console.error("dev: stopped");
    return 0;
  }
  console.error(
    ready
      ? `dev: the proxy exited (code ${code})`
      : `dev: the proxy exited (code ${code}) before listening on ${listen}; see its output above`,
  );
  return code === 0 ? 1 : code;
}

if (import.meta.main) {
  process.exit(await main());
}
