/**
 * Throwaway PostgreSQL for integration tests.
 *
 * `startPostgres()` returns one shared instance per test process (bun test runs
 * every file in one process, so the cluster boots once and is stopped when the
 * process exits). Two modes:
 *
 * - managed (default): `initdb` + `pg_ctl` from the system binaries into a
 *   fresh temp dir, on a free loopback port, with a pg_hba.conf that gives one
 *   user each of SCRAM, MD5, cleartext and trust (see HBA_LINES). As root the
 *   server binaries run as the `postgres` OS user (Postgres refuses root).
 *   Binaries: $PG_BIN, else the newest /usr/lib/postgresql/<v>/bin, else
 *   `pg_config --bindir`.
 * - external: when DATABASE_URL is set (a superuser URL, e.g. a CI service
 *   container) the harness creates a fresh database `multigres_test_<pid>_<n>`
 *   there plus the roles and fixtures, and drops the database on stop. The
 *   per-method auth tests need that server's pg_hba.conf to contain HBA_LINES.
 *
 * Fixtures (both modes), in database `db`:
 * - sql/setup.sql (current_tenant_id(), multigres.enable_tenant_rls()) and,
 *   when setup.sql has multigres.add_context_key(), the key for CONTEXT_SECRET
 *   (startProxy passes that secret to every proxy);
 * - roles app_user (SCRAM), md5_user (MD5 verifier), clear_user (cleartext
 *   method, SCRAM verifier), trust_user (trust): all LOGIN NOSUPERUSER
 *   NOBYPASSRLS, all granted the app tables, so each can act as an app role;
 * - table notes(id serial, tenant_id text not null, body text), owned by the
 *   superuser, FORCE RLS via multigres.enable_tenant_rls('notes'), with the
 *   rows in NOTES for tenant_a and tenant_b.
 */
import { chownSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createHmac } from "node:crypto";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import postgres from "postgres";
import { onCleanup } from "./cleanup.ts";

export type Sql = postgres.Sql<Record<string, never>>;

export const REPO_ROOT = resolve(import.meta.dir, "..", "..");
export const SETUP_SQL_PATH = join(REPO_ROOT, "sql", "setup.sql");

/** The superuser the harness administers the cluster with (and the proxy's default bypass user). */
export const SUPERUSER = "postgres";
/** The tenant-scoped application role (SCRAM-SHA-256). */
export const APP_USER = "app_user";
export const MD5_USER = "md5_user";
export const CLEAR_USER = "clear_user";
export const TRUST_USER = "trust_user";
/** Logs in with a TLS client certificate only (pg_hba `hostssl … cert`); no password in the database. */
export const CERT_USER = "cert_user";
/** Every role that acts as an app role (NOSUPERUSER NOBYPASSRLS, granted the tables). */
export const APP_ROLES = [APP_USER, MD5_USER, CLEAR_USER, TRUST_USER, CERT_USER] as const;

/**
 * Passwords of the fixture roles, also their client passwords at a harness
 * proxy. trust_user has one too, unused by the trust method; cert_user's is
 * only a client password (the database knows it by its certificate).
 */
export const PASSWORDS = {
  [SUPERUSER]: "postgres-superuser-pw",
  [APP_USER]: "app-user-scram-pw",
  [MD5_USER]: "md5-user-pw",
  [CLEAR_USER]: "clear-user-pw",
  [TRUST_USER]: "trust-user-pw",
  [CERT_USER]: "cert-user-client-pw",
} as const;

/** Authentication method each fixture role gets from 127.0.0.1 (managed mode). */
export const AUTH_METHODS = {
  [SUPERUSER]: "scram-sha-256",
  [APP_USER]: "scram-sha-256",
  [MD5_USER]: "md5",
  [CLEAR_USER]: "password",
  [TRUST_USER]: "trust",
  [CERT_USER]: "cert",
} as const;

/**
 * pg_hba.conf used by the managed cluster; an external server (DATABASE_URL)
 * needs the `host` lines for the per-method auth tests to mean what they say.
 */
export const HBA_LINES = [
  "# TYPE  DATABASE  USER        ADDRESS        METHOD",
  // The socket lives in the cluster's private temp dir (mode 0700).
  `local   all       ${SUPERUSER}                  trust`,
  `host    all       ${MD5_USER}    127.0.0.1/32   md5`,
  `host    all       ${CLEAR_USER}  127.0.0.1/32   password`,
  `host    all       ${TRUST_USER}  127.0.0.1/32   trust`,
  `hostssl all       ${CERT_USER}   127.0.0.1/32   cert`,
  "host    all       all         127.0.0.1/32   scram-sha-256",
];

/**
 * Secret the harness gives every proxy (MULTIGRES_CONTEXT_SECRET) to sign the
 * tenant context with; the matching key is stored in the fixture database.
 */
export const CONTEXT_SECRET = "multigres-test-context-secret-0123456789";

/**
 * The 32-byte key the database stores for a proxy secret, as documented in
 * sql/setup.sql (multigres.add_context_key): HMAC-SHA256(secret, "multigres
 * context key v1"). Derived here independently of src/ on purpose, so a
 * change in the proxy's derivation shows up as a failing test.
 */
export function contextKey(secret: string = CONTEXT_SECRET): Buffer {
  return createHmac("sha256", secret).update("multigres context key v1").digest();
}

/** Rows seeded into `notes` for the two fixture tenants (body per row). */
export const NOTES = {
  tenant_a: ["a: first note", "a: second note", "a: third note"],
  tenant_b: ["b: first note", "b: second note"],
} as const;
export const TENANT_A = "tenant_a";

/** The client password of `<role>.<tenant>` (or of a role) at a harness proxy: its role's PASSWORDS entry. */
export function passwordFor(user: string): string | undefined {
  const role = user.includes(".") ? user.slice(0, user.lastIndexOf(".")) : user;
  return (PASSWORDS as Record<string, string>)[role];
}
export const TENANT_B = "tenant_b";

export interface UrlOptions {
  user: string;
  /** Omit for no password (trust, or to provoke a missing-password error). */
  password?: string;
  host?: string;
  port?: number;
  database?: string;
  /** Extra query parameters, e.g. { application_name: "x", sslmode: "disable" }. */
  params?: Record<string, string>;
}

/** postgres://user:password@host:port/database?params, every part percent-encoded. */
export function buildUrl(o: Required<Pick<UrlOptions, "user" | "host" | "port" | "database">> & UrlOptions): string {
  const auth =
    encodeURIComponent(o.user) + (o.password !== undefined ? ":" + encodeURIComponent(o.password) : "");
  const host = o.host.includes(":") ? `[${o.host}]` : o.host;
  const q = o.params ? new URLSearchParams(o.params).toString() : "";
  return `postgres://${auth}@${host}:${o.port}/${encodeURIComponent(o.database)}${q ? "?" + q : ""}`;
}

export interface SeededTenant {
  tenant: string;
  /** Bodies of the rows this tenant owns in `notes`. */
  bodies: string[];
}

export interface PgInstance {
  /** "managed" = our own initdb cluster; "external" = DATABASE_URL. */
  mode: "managed" | "external";
  host: string;
  port: number;
  /** Database holding the fixtures (the default of url()). */
  database: string;
  /** Superuser URL of the fixture database. */
  adminUrl: string;
  /** URL for a direct connection to Postgres; host/port/database default to this instance. */
  url(o: UrlOptions): string;
  /** Admin (superuser) postgres.js client on the fixture database. */
  sql: Sql;
  /** Managed mode: the server log so far (log_connections is on). "" in external mode. */
  serverLog(): string;
  /**
   * Idempotently seed `count` tenants `${prefix}0..` into `notes`; tenant i owns
   * i + 1 rows (distinct counts make a leak visible in a count). Returns them.
   */
  seedTenants(count?: number, prefix?: string): Promise<SeededTenant[]>;
  /** Stop the server (managed: pg_ctl stop -m immediate, rm the temp dir; external: drop the database). */
  stop(): Promise<void>;
}

// ---------------------------------------------------------------------------

const isRoot = typeof process.getuid === "function" && process.getuid() === 0;

function pgBinDir(): string {
  if (process.env.PG_BIN) return process.env.PG_BIN;
  const base = "/usr/lib/postgresql";
  if (existsSync(base)) {
    const versions = readdirSync(base)
      .filter((v) => /^\d+$/.test(v) && Number(v) >= 15 && existsSync(join(base, v, "bin", "postgres")))
      .sort((a, b) => Number(b) - Number(a));
    if (versions[0]) return join(base, versions[0], "bin");
  }
  const r = Bun.spawnSync(["pg_config", "--bindir"], { stdout: "pipe", stderr: "pipe" });
  const dir = r.stdout.toString().trim();
  if (r.exitCode === 0 && dir && existsSync(join(dir, "postgres"))) return dir;
  throw new Error(
    "PostgreSQL server binaries not found: set PG_BIN, install postgresql-15 (apt), or set DATABASE_URL",
  );
}

/** Path of a client tool (psql, pgbench): PG_BIN / server bin dir first, then PATH. */
export function pgTool(name: string): string {
  try {
    const p = join(pgBinDir(), name);
    if (existsSync(p)) return p;
  } catch {
    // fall through to PATH
  }
  const p = Bun.which(name);
  if (!p) throw new Error(`${name} not found (install postgresql-client or set PG_BIN)`);
  return p;
}

function postgresIds(): { uid: number; gid: number } {
  const u = Bun.spawnSync(["id", "-u", "postgres"], { stdout: "pipe", stderr: "pipe" });
  const g = Bun.spawnSync(["id", "-g", "postgres"], { stdout: "pipe", stderr: "pipe" });
  if (u.exitCode !== 0 || g.exitCode !== 0) {
    throw new Error("running as root needs a `postgres` OS user to run the server (Postgres refuses root)");
  }
  return { uid: Number(u.stdout.toString().trim()), gid: Number(g.stdout.toString().trim()) };
}

/** Run a server binary (as the postgres OS user when we are root); throws with output on failure. */
function runPg(bin: string, args: string[], cwd: string): string {
  const cmd = isRoot ? ["runuser", "-u", "postgres", "--", bin, ...args] : [bin, ...args];
  const r = Bun.spawnSync(cmd, {
    cwd,
    stdout: "pipe",
    stderr: "pipe",
    env: { PATH: process.env.PATH ?? "/usr/bin:/bin", LC_ALL: "C", LANG: "C", TZ: "UTC" },
  });
  const out = r.stdout.toString() + r.stderr.toString();
  if (r.exitCode !== 0) {
    throw new Error(`${cmd.join(" ")} failed (exit ${r.exitCode ?? r.signalCode}):\n${out}`);
  }
  return out;
}

/** A currently free loopback port (the OS picks it; a race with other processes is retried by the caller). */
export function freePort(host = "127.0.0.1"): Promise<number> {
  return new Promise((res, rej) => {
    const srv = createServer();
    srv.unref();
    srv.once("error", rej);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      srv.close(() => (port ? res(port) : rej(new Error("could not get a free port"))));
    });
  });
}

function quoteLiteral(s: string): string {
  return "'" + s.replaceAll("'", "''") + "'";
}
function quoteIdent(s: string): string {
  return '"' + s.replaceAll('"', '""') + '"';
}

function adminClient(url: string, max = 4): Sql {
  return postgres(url, {
    max,
    ssl: false,
    onnotice: () => {},
    connect_timeout: 30,
    idle_timeout: 5,
    connection: { application_name: "multigres-test-harness" },
  }) as unknown as Sql;
}

/** Roles, setup.sql, the notes table and its rows. `sql` is a superuser client on the fixture db. */
async function installFixtures(sql: Sql): Promise<void> {
  // Roles are cluster-wide: create if missing, then (re)set attributes and passwords.
  for (const role of APP_ROLES) {
    await sql.unsafe(
      `DO $$ BEGIN
         IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = ${quoteLiteral(role)}) THEN
           CREATE ROLE ${quoteIdent(role)};
         END IF;
       END $$`,
    );
    await sql.unsafe(
      `ALTER ROLE ${quoteIdent(role)} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE`,
    );
  }
  // One session so SET password_encryption applies to the ALTER ROLE that follows.
  await sql.begin(async (tx) => {
    await tx.unsafe(`SET LOCAL password_encryption = 'scram-sha-256'`);
    for (const role of [APP_USER, CLEAR_USER, TRUST_USER] as const) {
      await tx.unsafe(`ALTER ROLE ${quoteIdent(role)} PASSWORD ${quoteLiteral(PASSWORDS[role])}`);
    }
    // The md5 method only does MD5 when the stored verifier is MD5 (else it upgrades to SCRAM).
    await tx.unsafe(`SET LOCAL password_encryption = 'md5'`);
    await tx.unsafe(`ALTER ROLE ${quoteIdent(MD5_USER)} PASSWORD ${quoteLiteral(PASSWORDS[MD5_USER])}`);
  });

  await sql.unsafe(readFileSync(SETUP_SQL_PATH, "utf8")); // no params → simple protocol, multi-statement
  // Signed contexts (setup.sql schema v2+): store the key of CONTEXT_SECRET.
  const [hasKeys] = await sql`SELECT to_regprocedure('multigres.add_context_key(bytea)') IS NOT NULL AS yes`;
  if (hasKeys?.yes) await sql`SELECT multigres.add_context_key(${contextKey()})`;

  await sql.unsafe(`
    DROP TABLE IF EXISTS public.notes;
    CREATE TABLE public.notes (
      id serial PRIMARY KEY,
      tenant_id text NOT NULL,
      body text
    );
    CREATE INDEX notes_tenant_id_idx ON public.notes (tenant_id);
    SELECT multigres.enable_tenant_rls('public.notes');
    GRANT USAGE ON SCHEMA public TO ${APP_ROLES.map(quoteIdent).join(", ")};
    GRANT SELECT, INSERT, UPDATE, DELETE ON public.notes TO ${APP_ROLES.map(quoteIdent).join(", ")};
    GRANT USAGE, SELECT ON SEQUENCE public.notes_id_seq TO ${APP_ROLES.map(quoteIdent).join(", ")};
  `);
  for (const [tenant, bodies] of Object.entries(NOTES)) {
    for (const body of bodies) {
      await sql`INSERT INTO public.notes (tenant_id, body) VALUES (${tenant}, ${body})`;
    }
  }
}

function makeSeeder(sql: Sql) {
  const done = new Map<string, Promise<SeededTenant[]>>();
  return (count = 10, prefix = "t"): Promise<SeededTenant[]> => {
    const key = `${prefix}\u0000${count}`;
    let p = done.get(key);
    if (!p) {
      p = (async () => {
        const tenants: SeededTenant[] = Array.from({ length: count }, (_, i) => ({
          tenant: `${prefix}${i}`,
          bodies: Array.from({ length: i + 1 }, (_, j) => `${prefix}${i}: note ${j + 1}`),
        }));
        await sql.begin(async (tx) => {
          await tx`DELETE FROM public.notes WHERE tenant_id IN ${tx(tenants.map((t) => t.tenant))}`;
          for (const t of tenants) {
            for (const body of t.bodies) {
              await tx`INSERT INTO public.notes (tenant_id, body) VALUES (${t.tenant}, ${body})`;
            }
          }
        });
        return tenants;
      })();
      done.set(key, p);
      p.catch(() => done.delete(key));
    }
    return p;
  };
}

// ---------------------------------------------------------------------------
// managed cluster

interface Managed {
  dir: string;
  dataDir: string;
  bin: string;
}
const liveManaged = new Set<Managed>();

function stopManagedSync(m: Managed): void {
  if (!liveManaged.has(m)) return;
  liveManaged.delete(m);
  try {
    runPg(join(m.bin, "pg_ctl"), ["stop", "-D", m.dataDir, "-m", "immediate", "-w", "-t", "30"], m.dir);
  } catch {
    // already down (or never up): still remove the directory
  }
  rmSync(m.dir, { recursive: true, force: true });
}

function writeServerConfig(dataDir: string, dir: string, port: number): void {
  const conf = [
    "# multigres test harness",
    `port = ${port}`,
    "listen_addresses = '127.0.0.1'",
    `unix_socket_directories = '${dir}'`,
    "unix_socket_permissions = 0700",
    "max_connections = 400",
    "shared_buffers = 128MB",
    "fsync = off",
    "synchronous_commit = off",
    "full_page_writes = off",
    "password_encryption = 'scram-sha-256'",
    "log_connections = on",
    "log_line_prefix = '%m [%p] %q%u@%d '",
    "log_min_messages = warning",
    "log_min_error_statement = error",
    "timezone = 'UTC'",
    "",
  ].join("\n");
  writeFileSync(join(dataDir, "postgresql.auto.conf"), conf);
  writeFileSync(join(dataDir, "pg_hba.conf"), HBA_LINES.join("\n") + "\n");
}

const DIR_PREFIX = "multigres-pg-";

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Stop and remove clusters left behind by test processes that died without
 * cleaning up (SIGKILL, crash): their owner.pid names a process that is gone.
 */
function reapOrphans(bin: string): void {
  const base = tmpdir();
  for (const name of readdirSync(base)) {
    if (!name.startsWith(DIR_PREFIX)) continue;
    const dir = join(base, name);
    try {
      const ownerFile = join(dir, "owner.pid");
      if (existsSync(ownerFile)) {
        if (pidAlive(Number(readFileSync(ownerFile, "utf8").trim()))) continue;
      } else if (Date.now() - statSync(dir).mtimeMs < 10 * 60_000) {
        continue; // being created right now, or not ours to judge yet
      }
      if (existsSync(join(dir, "data", "postmaster.pid"))) {
        try {
          runPg(join(bin, "pg_ctl"), ["stop", "-D", join(dir, "data"), "-m", "immediate", "-w", "-t", "30"], dir);
        } catch {
          // not running any more
        }
      }
      rmSync(dir, { recursive: true, force: true });
    } catch {
      // another process is reaping it, or it vanished: fine
    }
  }
}

async function bootManaged(): Promise<PgInstance> {
  const bin = pgBinDir();
  reapOrphans(bin);
  const dir = mkdtempSync(join(tmpdir(), DIR_PREFIX));
  writeFileSync(join(dir, "owner.pid"), String(process.pid));
  const dataDir = join(dir, "data");
  const logFile = join(dir, "server.log");
  const pwFile = join(dir, "pwfile");
  const m: Managed = { dir, dataDir, bin };
  try {
    writeFileSync(pwFile, PASSWORDS[SUPERUSER] + "\n", { mode: 0o600 });
    if (isRoot) {
      const { uid, gid } = postgresIds();
      chownSync(dir, uid, gid);
      chownSync(pwFile, uid, gid);
    }
    runPg(
      join(bin, "initdb"),
      [
        "-D", dataDir,
        "-U", SUPERUSER,
        "--pwfile", pwFile,
        "--auth-local=trust",
        "--auth-host=scram-sha-256",
        "-E", "UTF8",
        "--locale=C",
        "--no-sync",
      ],
      dir,
    );
    rmSync(pwFile, { force: true });

    // A free port can be taken between probing and binding: retry a few times.
    let port = 0;
    let lastErr: unknown;
    for (let attempt = 0; attempt < 5; attempt++) {
      port = await freePort();
      writeServerConfig(dataDir, dir, port);
      try {
        liveManaged.add(m);
        runPg(join(bin, "pg_ctl"), ["start", "-D", dataDir, "-l", logFile, "-w", "-t", "60"], dir);
        lastErr = undefined;
        break;
      } catch (e) {
        liveManaged.delete(m);
        lastErr = e;
        const log = existsSync(logFile) ? readFileSync(logFile, "utf8") : "";
        if (!/could not bind|Address already in use/i.test(log)) break;
      }
    }
    if (lastErr) {
      const log = existsSync(logFile) ? readFileSync(logFile, "utf8") : "";
      throw new Error(`${lastErr instanceof Error ? lastErr.message : String(lastErr)}\nserver log:\n${log}`);
    }

    const host = "127.0.0.1";
    const database = "multigres_test";
    const bootstrap = adminClient(
      buildUrl({ host, port, user: SUPERUSER, password: PASSWORDS[SUPERUSER], database: "postgres" }),
      1,
    );
    try {
      await bootstrap.unsafe(`CREATE DATABASE ${quoteIdent(database)}`);
    } finally {
      await bootstrap.end();
    }
    const adminUrl = buildUrl({ host, port, user: SUPERUSER, password: PASSWORDS[SUPERUSER], database });
    const sql = adminClient(adminUrl);
    await installFixtures(sql);

    const inst: PgInstance = {
      mode: "managed",
      host,
      port,
      database,
      adminUrl,
      url: (o) => buildUrl({ host, port, database, ...o }),
      sql,
      serverLog: () => (existsSync(logFile) ? readFileSync(logFile, "utf8") : ""),
      seedTenants: makeSeeder(sql),
      stop: async () => {
        await sql.end({ timeout: 5 }).catch(() => {});
        stopManagedSync(m);
      },
    };
    return inst;
  } catch (e) {
    stopManagedSync(m);
    rmSync(dir, { recursive: true, force: true });
    throw e;
  }
}

// ---------------------------------------------------------------------------
// external server (DATABASE_URL)

const liveExternal = new Set<{ adminUrl: string; database: string }>();

async function bootExternal(databaseUrl: string): Promise<PgInstance> {
  const u = new URL(databaseUrl);
  const host = u.hostname.replace(/^\[|\]$/g, "") || "127.0.0.1";
  const port = Number(u.port || 5432);
  const database = `multigres_test_${process.pid}_${Date.now().toString(36)}`;

  const bootstrap = adminClient(databaseUrl, 1);
  try {
    await bootstrap.unsafe(`CREATE DATABASE ${quoteIdent(database)}`);
  } finally {
    await bootstrap.end();
  }
  const ext = { adminUrl: databaseUrl, database };
  liveExternal.add(ext);

  const admin = new URL(databaseUrl);
  admin.pathname = "/" + encodeURIComponent(database);
  const adminUrl = admin.toString();
  const sql = adminClient(adminUrl);
  try {
    await installFixtures(sql);
  } catch (e) {
    await sql.end({ timeout: 5 }).catch(() => {});
    await dropExternal(ext);
    throw e;
  }
  return {
    mode: "external",
    host,
    port,
    database,
    adminUrl,
    url: (o) => buildUrl({ host, port, database, ...o }),
    sql,
    serverLog: () => "",
    seedTenants: makeSeeder(sql),
    stop: async () => {
      await sql.end({ timeout: 5 }).catch(() => {});
      await dropExternal(ext);
    },
  };
}

async function dropExternal(ext: { adminUrl: string; database: string }): Promise<void> {
  if (!liveExternal.delete(ext)) return;
  const c = adminClient(ext.adminUrl, 1);
  try {
    await c.unsafe(`DROP DATABASE IF EXISTS ${quoteIdent(ext.database)} WITH (FORCE)`);
  } finally {
    await c.end({ timeout: 5 });
  }
}

/** Synchronous best-effort drop for process exit (no event loop left). */
function dropExternalSync(ext: { adminUrl: string; database: string }): void {
  if (!liveExternal.delete(ext)) return;
  try {
    Bun.spawnSync(
      [pgTool("psql"), "-X", "-q", "-d", ext.adminUrl, "-c", `DROP DATABASE IF EXISTS ${quoteIdent(ext.database)} WITH (FORCE)`],
      { stdout: "ignore", stderr: "ignore", env: { ...process.env, PGCONNECT_TIMEOUT: "5" }, timeout: 15_000 },
    );
  } catch {
    // best effort
  }
}

// ---------------------------------------------------------------------------
// singleton + cleanup

let shared: Promise<PgInstance> | undefined;

/**
 * The shared PostgreSQL of this test process, booted on first call.
 * Do not call stop() from a test file: other files share it; it stops at exit.
 */
export function startPostgres(): Promise<PgInstance> {
  if (!shared) {
    const url = process.env.DATABASE_URL;
    const booting: Promise<PgInstance> = (url ? bootExternal(url) : bootManaged()).then((inst) => {
      const stop = inst.stop;
      inst.stop = async () => {
        if (shared === booting) shared = undefined;
        await stop();
      };
      return inst;
    });
    shared = booting;
  }
  return shared;
}

/**
 * Stop the shared instance if one was started (test/preload.ts calls this in
 * a preload-level afterAll: bun test emits no process "exit" event).
 */
export async function stopSharedPostgres(): Promise<void> {
  const p = shared;
  if (!p) return;
  const inst = await p.catch(() => undefined);
  await inst?.stop();
  if (shared === p) shared = undefined;
}

onCleanup(() => {
  for (const m of [...liveManaged]) stopManagedSync(m);
  for (const e of [...liveExternal]) dropExternalSync(e);
  shared = undefined;
});
