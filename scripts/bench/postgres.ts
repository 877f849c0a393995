/**
 * A throwaway PostgreSQL tuned for benchmarking (not for durability):
 * initdb into a temp dir, fsync/synchronous_commit/full_page_writes off,
 * max_connections high enough for the 1,000-session memory test, loopback
 * only on a free port, SCRAM for every TCP user. As root the server runs as
 * the `postgres` OS user.
 *
 * Fixtures in database `bench`:
 *  - pgbench tables (`pgbench -i -s SCALE`), then VACUUM ANALYZE;
 *  - sql/setup.sql (current_tenant_id(), multigres.enable_tenant_rls());
 *  - tenant_items: TENANTS tenants × ROWS_PER_TENANT rows, FORCE RLS through
 *    multigres.enable_tenant_rls(); the benchmark tenant is BENCH_TENANT;
 *  - app_user: LOGIN NOSUPERUSER NOBYPASSRLS, SCRAM password, SELECT on the
 *    pgbench tables, SELECT/UPDATE on tenant_items — the role behind
 *    `app_user.bench` (Multigres) and behind the direct / PgBouncer runs;
 *  - the context key of the bench's proxy secret (multigres.add_context_key,
 *    when setup.sql has it), so the proxy's signed contexts verify.
 */
import { createHmac } from "node:crypto";
import { chmodSync, chownSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { asPostgres, freePort, isRoot, libpqEnv, onTeardown, postgresIds, runSync } from "./util.ts";

export const DB = "bench";
export const APP_USER = "app_user";
export const PASSWORD = "bench-app-pw";
export const BENCH_TENANT = "bench";
export const TENANTS = 50;
export const ROWS_PER_TENANT = 1000;

export interface Pg {
  host: string;
  port: number;
  bin: string;
  dir: string;
  socketDir: string;
  version: string;
  /** Run SQL as the superuser over the Unix socket; returns psql's unaligned output. */
  psql(sql: string, db?: string): string;
  stop(): void;
}

export function pgBinDir(): string {
  if (process.env.PG_BIN) return process.env.PG_BIN;
  const base = "/usr/lib/postgresql";
  try {
    const versions = Bun.spawnSync(["ls", base]).stdout.toString().split(/\s+/)
      .filter((v) => /^\d+$/.test(v) && Number(v) >= 15)
      .sort((a, b) => Number(b) - Number(a));
    for (const v of versions) {
      if (Bun.file(join(base, v, "bin", "postgres")).size > 0) return join(base, v, "bin");
    }
  } catch {
    // fall through
  }
  const r = Bun.spawnSync(["pg_config", "--bindir"], { stdout: "pipe", stderr: "pipe" });
  const dir = r.stdout.toString().trim();
  if (r.exitCode === 0 && dir) return dir;
  throw new Error("PostgreSQL 15+ server binaries not found: set PG_BIN or install postgresql-15");
}

export function pgTool(name: string): string {
  const p = join(pgBinDir(), name);
  if (Bun.file(p).size > 0) return p;
  const w = Bun.which(name);
  if (!w) throw new Error(`${name} not found (install postgresql-client or set PG_BIN)`);
  return w;
}

export interface PgOptions {
  maxConnections: number;
  scale: number;
  log: (msg: string) => void;
}

export async function bootPostgres(opts: PgOptions): Promise<Pg> {
  const bin = pgBinDir();
  const dir = mkdtempSync(join(tmpdir(), "multigres-bench-pg-"));
  const dataDir = join(dir, "data");
  const logFile = join(dir, "server.log");
  let started = false;
  const stop = () => {
    if (started) {
      started = false;
      try {
        runSync(asPostgres([join(bin, "pg_ctl"), "stop", "-D", dataDir, "-m", "immediate", "-w", "-t", "60"]), { cwd: dir });
      } catch {
        // already down
      }
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const unregister = onTeardown("postgres", stop);
  try {
    if (isRoot) {
      const { uid, gid } = postgresIds();
      chownSync(dir, uid, gid);
    }
    runSync(
      asPostgres([join(bin, "initdb"), "-D", dataDir, "-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"]),
      { cwd: dir },
    );
    let port = 0;
    for (let attempt = 0; ; attempt++) {
      port = await freePort();
      writeFileSync(join(dataDir, "postgresql.auto.conf"), serverConf(port, dir, opts.maxConnections));
      writeFileSync(
        join(dataDir, "pg_hba.conf"),
        ["local all postgres trust", "host all all 127.0.0.1/32 scram-sha-256", ""].join("\n"),
      );
      try {
        runSync(asPostgres([join(bin, "pg_ctl"), "start", "-D", dataDir, "-l", logFile, "-w", "-t", "120"]), { cwd: dir });
        started = true;
        break;
      } catch (e) {
        let log = "";
        try {
          log = readFileSync(logFile, "utf8");
        } catch {
          // none
        }
        if (attempt < 4 && /could not bind|already in use/i.test(log)) continue;
        throw new Error(`${(e as Error).message}\nserver log:\n${log}`);
      }
    }

    const psql = (sql: string, db = DB): string =>
      runSync([join(bin, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", dir, "-p", String(port), "-U", "postgres", "-d", db, "-c", sql], {
        env: libpqEnv(),
      }).trim();

    const version = psql("SHOW server_version", "postgres");
    psql(`CREATE DATABASE ${DB}`, "postgres");

    opts.log(`pgbench -i -s ${opts.scale}`);
    runSync([join(bin, "pgbench"), "-i", "-s", String(opts.scale), "-q", "-h", dir, "-p", String(port), "-U", "postgres", DB], {
      env: libpqEnv(),
      timeoutMs: 600_000,
    });

    psql(readFileSync(join(import.meta.dir, "..", "..", "sql", "setup.sql"), "utf8"));
    psql(fixtureSql());
    psql("VACUUM ANALYZE");
    psql("CHECKPOINT");

    return {
      host: "127.0.0.1",
      port,
      bin,
      dir,
      socketDir: dir,
      version,
      psql,
      stop: () => {
        unregister();
        stop();
      },
    };
  } catch (e) {
    unregister();
    stop();
    throw e;
  }
}

function serverConf(port: number, socketDir: string, maxConnections: number): string {
  return [
    "# multigres benchmark: throwaway, tuned for speed, not durability",
    `port = ${port}`,
    "listen_addresses = '127.0.0.1'",
    `unix_socket_directories = '${socketDir}'`,
    "unix_socket_permissions = 0700",
    `max_connections = ${maxConnections}`,
    "shared_buffers = 512MB",
    "fsync = off",
    "synchronous_commit = off",
    "full_page_writes = off",
    "wal_level = minimal",
    "max_wal_senders = 0",
    "max_wal_size = 4GB",
    "checkpoint_timeout = 30min",
    // autovacuum would wake up at random points of the interleaved rounds
    "autovacuum = off",
    "jit = off",
    "password_encryption = 'scram-sha-256'",
    "log_connections = off",
    "log_disconnections = off",
    "log_min_messages = warning",
    "log_line_prefix = '%m [%p] %q%u@%d '",
    "timezone = 'UTC'",
    "",
  ].join("\n");
}

function fixtureSql(): string {
  const roles = APP_USER;
  return `
    SET password_encryption = 'scram-sha-256';
    CREATE ROLE ${APP_USER} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '${PASSWORD}';
    GRANT USAGE ON SCHEMA public TO ${roles};
    GRANT SELECT ON pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history TO ${roles};

    CREATE TABLE tenant_items (
      tenant_id text NOT NULL,
      k int NOT NULL,
      counter bigint NOT NULL DEFAULT 0,
      payload text NOT NULL,
      PRIMARY KEY (tenant_id, k)
    ) WITH (fillfactor = 80);
    INSERT INTO tenant_items (tenant_id, k, payload)
      SELECT t, k, md5(t || ':' || k)
      FROM (SELECT 't' || i AS t FROM generate_series(1, ${TENANTS - 1}) i
            UNION ALL SELECT '${BENCH_TENANT}') ts,
           generate_series(1, ${ROWS_PER_TENANT}) k;
    SELECT multigres.enable_tenant_rls('public.tenant_items');
    GRANT SELECT, UPDATE ON tenant_items TO ${roles};
  `;
}

/** Secret the benchmark's proxies sign tenant contexts with (MULTIGRES_CONTEXT_SECRET). */
export const CONTEXT_SECRET = "multigres-bench-context-secret-0123456789abcdef";
export const TENANT_SETTING = "app.current_tenant_id";

/** The 32-byte key for a proxy secret, as sql/setup.sql documents it: HMAC-SHA256(secret, "multigres context key v1"). */
export function contextKey(secret = CONTEXT_SECRET): Buffer {
  return createHmac("sha256", secret).update("multigres context key v1").digest();
}

/**
 * Store the key of CONTEXT_SECRET when setup.sql has signed contexts
 * (multigres.add_context_key). Returns whether contexts are signed.
 */
export function installContextKey(pg: Pg): boolean {
  const signed = pg.psql("SELECT to_regprocedure('multigres.add_context_key(bytea)') IS NOT NULL") === "t";
  if (signed) pg.psql(`SELECT multigres.add_context_key('\\x${contextKey().toString("hex")}'::bytea)`);
  return signed;
}

/**
 * One statement that establishes the tenant context by hand, as an
 * application without the proxy would: the tenant setting and, for signed
 * contexts, HMAC-SHA256(key, tenant || '/' || multigres.backend_binding())
 * computed in SQL from the key's precomputed pads (what the proxy computes
 * in-process).
 */
export function manualContextSql(signed: boolean, tenant = BENCH_TENANT): string {
  const set = `pg_catalog.set_config('${TENANT_SETTING}', '${tenant}', false)`;
  if (!signed) return `SELECT ${set}`;
  const key = contextKey();
  const pad = (x: number) => {
    const b = Buffer.alloc(64);
    key.copy(b);
    for (let i = 0; i < 64; i++) b[i] = b[i]! ^ x;
    return `'\\x${b.toString("hex")}'::bytea`;
  };
  const sig = `encode(sha256(${pad(0x5c)} || sha256(${pad(0x36)} || convert_to('${tenant}/' || multigres.backend_binding(), 'UTF8'))), 'hex')`;
  return `SELECT ${set}, pg_catalog.set_config('${TENANT_SETTING}_sig', ${sig}, false)`;
}

const TENANT_BODY = `\\set k random(1, ${ROWS_PER_TENANT})
SELECT payload, counter FROM tenant_items WHERE k = :k;
UPDATE tenant_items SET counter = counter + 1 WHERE k = :k;
`;

/**
 * The tenant workload's pgbench scripts: a point read and an update of one
 * of the tenant's rows, RLS-filtered. `proxied`: the context is already
 * there (Multigres). `manual`: the client sets it itself once per
 * connection, in its first transaction (pgbench variables live per client;
 * run with -D ctx=0), then the same two statements.
 */
export function tenantScripts(signed: boolean): { proxied: string; manual: string } {
  return {
    proxied: TENANT_BODY,
    manual: `\\if :ctx = 0\n${manualContextSql(signed)};\n\\set ctx 1\n\\endif\n` + TENANT_BODY,
  };
}

/** Rows visible through RLS (must be ROWS_PER_TENANT), the effective role and the verified tenant. */
export const SANITY_SQL = "SELECT count(*) || ' ' || current_user || ' ' || coalesce(current_tenant_id(), '<null>') FROM tenant_items";

export function makeWorkDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "multigres-bench-"));
  // PgBouncer runs as the postgres OS user and must reach its ini in here.
  chmodSync(dir, 0o711);
  onTeardown("work dir", () => rmSync(dir, { recursive: true, force: true }));
  return dir;
}
