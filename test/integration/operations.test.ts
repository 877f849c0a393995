/**
 * Operating the proxy: health endpoint, structured logs, graceful lifecycle
 * and the idle timeout, against the compiled binary and a real PostgreSQL.
 *
 *   health     /healthz 200 JSON; /readyz 200 with the upstream up, 503 with
 *              it unreachable (a closed port) and 503 while shutting down
 *   logs       --log-format json: every line a JSON object with time, level,
 *              msg; connection lines with conn, remote, user, tenant, event;
 *              close lines with durationMs, bytesIn, bytesOut
 *   secrets    logins with every fixture password (SCRAM, MD5, cleartext,
 *              trust, superuser; right and wrong) at log level trace, in both
 *              formats: no password and no context secret in the log
 *   lifecycle  SIGTERM: stops accepting, idle sessions get 57P01, a
 *              transaction in flight may COMMIT and then gets 57P01, a query
 *              in flight finishes; after --shutdown-timeout a session still
 *              in a transaction gets 57P01; exit 0. SIGINT likewise. SIGHUP
 *              reloads the config file ("config reloaded")
 *   idle       --idle-timeout: an idle session is closed with 57P05, a busy
 *              one is not; a timeout set by SIGHUP applies
 *
 * Raw protocol clients (tls-helpers.ts Wire) are used where the exact
 * ErrorResponse a session receives matters: drivers hide it or reconnect.
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  APP_USER,
  CLEAR_USER,
  CONTEXT_SECRET,
  connectError,
  describeRun,
  freePort,
  MD5_USER,
  PASSWORDS,
  psql,
  startPostgres,
  startProxy,
  SUPERUSER,
  TENANT_A,
  TRUST_USER,
  withClient,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";
import { getJson, httpBase, jsonLines, openPlain, queryMessage, startReadyProxy, waitForEvents, Wire, type LogLine } from "./tls-helpers.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

let pg: PgInstance;
const proxies: ProxyHandle[] = [];
const dirs: string[] = [];
const TABLE = "ops_lifecycle";

const proxyWith = (args: string[]) => startReadyProxy(pg, args, proxies);

beforeAll(async () => {
  pg = await startPostgres();
  await pg.sql.unsafe(`DROP TABLE IF EXISTS ${TABLE}`);
  await pg.sql.unsafe(`CREATE TABLE ${TABLE} (id int PRIMARY KEY, note text)`);
  await pg.sql.unsafe(`GRANT SELECT, INSERT ON ${TABLE} TO ${TRUST_USER}`);
});

afterAll(async () => {
  await Promise.all(proxies.map((p) => p.stop("SIGKILL")));
  await pg?.sql.unsafe(`DROP TABLE IF EXISTS ${TABLE}`);
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const trustUser = `${TRUST_USER}.${TENANT_A}`;
const WRONG = "wrong-password-that-must-not-be-logged-7d1f";

/** A raw tenant session (trust_user, no password) at its first ReadyForQuery. */
async function session(p: ProxyHandle, label: string): Promise<Wire> {
  const w = new Wire(await openPlain(p.port), label);
  await w.startup({ user: trustUser, database: pg.database });
  return w;
}

/** The proxy's exit code, bounded. */
async function exitCode(p: ProxyHandle, timeoutMs = 20_000): Promise<number> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`multigres (pid ${p.pid}) did not exit within ${timeoutMs} ms\n--- log ---\n${p.logs()}`)), timeoutMs);
  });
  try {
    return await Promise.race([p.exited, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Connecting must fail: nothing listens any more. */
async function expectRefused(port: number): Promise<void> {
  const outcome = await openPlain(port).then(
    (s) => {
      s.destroy();
      return "accepted";
    },
    (e: NodeJS.ErrnoException) => e.code ?? e.message,
  );
  expect(outcome, "a new connection during shutdown").toBe("ECONNREFUSED");
}

/** Bounded poll of a condition on the database (not a sleep: it checks what it waits for). */
async function until(what: string, check: () => Promise<boolean>, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await Bun.sleep(50);
  }
}

// ====================================================================== health

describe("health endpoint", () => {
  test("/healthz is 200 JSON, /readyz is 200 with the upstream up, unknown paths 404", async () => {
    const p = await proxyWith([]);
    const base = await httpBase(p);
    const health = await getJson(`${base}/healthz`);
    expect(health.status).toBe(200);
    expect(health.contentType).toContain("application/json");
    expect(health.body.status).toBe("ok");
    const ready = await getJson(`${base}/readyz`);
    expect(ready.status, JSON.stringify(ready.body)).toBe(200);
    expect(ready.body.status).toBe("ready");
    const missing = await getJson(`${base}/nope`);
    expect(missing.status).toBe(404);
  });

  test("upstream unreachable (a closed port): /readyz 503, /healthz still 200", async () => {
    const closed = await freePort();
    const p = await startProxy({ upstreamPort: closed });
    proxies.push(p);
    const base = await httpBase(p);
    const ready = await getJson(`${base}/readyz`);
    expect(ready.status, JSON.stringify(ready.body)).toBe(503);
    expect(ready.body.status).toBe("upstream unreachable");
    const health = await getJson(`${base}/healthz`);
    expect(health.status).toBe(200);
    expect(health.body.status).toBe("ok");
  });
});

// ======================================================================== logs

describe("structured logs (--log-format json)", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await proxyWith(["--log-format", "json", "--log-level", "debug"]);
  });

  test("connection lines carry conn, remote, user, tenant, event; close lines duration and bytes", async () => {
    await withClient(proxy.url({ user: trustUser, password: PASSWORDS[TRUST_USER] }), async (sql) => {
      const [row] = await sql`SELECT current_tenant_id() AS t`;
      expect(row!.t).toBe(TENANT_A);
    });
    const r = await psql(proxy.url({ user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER] }), "SELECT 1");
    expect(r.exitCode, describeRun(r)).toBe(0);

    const closes = await waitForEvents(proxy, "close", 2);
    const readies = await waitForEvents(proxy, "ready", 2);
    const byUser = (lines: LogLine[], user: string) => lines.find((l) => l.user === user);
    for (const user of [TRUST_USER, APP_USER]) {
      const ready = byUser(readies, user);
      const close = byUser(closes, user);
      expect(ready, `ready line for ${user} in\n${proxy.logs()}`).toBeDefined();
      expect(close, `close line for ${user} in\n${proxy.logs()}`).toBeDefined();
      for (const line of [ready!, close!]) {
        expect(typeof line.conn).toBe("number");
        expect(line.remote).toBe("127.0.0.1");
        expect(line.tenant).toBe(TENANT_A);
        expect(typeof line.level).toBe("string");
        expect(typeof line.msg).toBe("string");
        expect(Number.isNaN(Date.parse(line.time))).toBe(false);
      }
      expect(close!.conn).toBe(ready!.conn);
      expect(typeof close!.durationMs).toBe("number");
      expect(close!.durationMs as number).toBeGreaterThanOrEqual(0);
      expect(close!.bytesIn as number).toBeGreaterThan(0);
      expect(close!.bytesOut as number).toBeGreaterThan(0);
    }
  });

  test("a refused connection is logged with its fields too", async () => {
    const before = jsonLines(proxy.logs()).filter((l) => l.event === "close").length;
    const err = await connectError(proxy.url({ user: `${APP_USER}.bad tenant!`, password: PASSWORDS[APP_USER] }));
    expect(err.code).toBe("28000");
    const closes = await waitForEvents(proxy, "close", before + 1);
    const last = closes.at(-1)!;
    expect(typeof last.conn).toBe("number");
    expect(last.remote).toBe("127.0.0.1");
    expect(typeof last.bytesIn).toBe("number");
  });

  test("every line on stdout and stderr, startup to exit, is a JSON object with time, level, msg", async () => {
    const { exitCode } = await proxy.stop("SIGTERM");
    expect(exitCode).toBe(0);
    const lines = jsonLines(proxy.logs()); // throws naming any line that is not JSON
    expect(lines.length).toBeGreaterThan(5);
    for (const l of lines) {
      expect(typeof l.time, JSON.stringify(l)).toBe("string");
      expect(typeof l.level, JSON.stringify(l)).toBe("string");
      expect(typeof l.msg, JSON.stringify(l)).toBe("string");
    }
    expect(lines.some((l) => /^listening on /.test(l.msg))).toBe(true);
    expect(lines.some((l) => /^http listening on /.test(l.msg))).toBe(true);
  });
});

describe("no passwords or secrets in the log", () => {
  for (const format of ["pretty", "json"] as const) {
    test(`${format} format, log level trace: logins with every fixture password, right and wrong`, async () => {
      const p = await proxyWith(["--log-format", format, "--log-level", "trace"]);
      const tenant = (user: string) => `${user}.${TENANT_A}`;

      // Right passwords: SCRAM, MD5 (the proxy takes the password in clear), cleartext, superuser.
      for (const user of [APP_USER, MD5_USER, CLEAR_USER] as const) {
        await withClient(p.url({ user: tenant(user), password: PASSWORDS[user] }), async (sql) => {
          expect((await sql`SELECT current_user AS u`)[0]!.u).toBe(user);
        });
        const r = await psql(p.url({ user: tenant(user), password: PASSWORDS[user] }), "SELECT 1");
        expect(r.exitCode, describeRun(r)).toBe(0);
      }
      await withClient(p.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }), async (sql) => {
        expect((await sql`SELECT current_user AS u`)[0]!.u).toBe(SUPERUSER);
      });
      // trust ignores the password the client has.
      await withClient(p.url({ user: trustUser, password: PASSWORDS[TRUST_USER] }), async (sql) => {
        await sql`SELECT 1`;
      });
      // Wrong passwords, and a password sent with a refused tenant.
      for (const user of [APP_USER, MD5_USER, CLEAR_USER, SUPERUSER] as const) {
        const err = await connectError(p.url({ user: user === SUPERUSER ? user : tenant(user), password: WRONG }));
        expect(err.code, err.message).toBe("28P01");
      }
      const r = await psql(p.url({ user: tenant(MD5_USER), password: WRONG }), "SELECT 1");
      expect(r.exitCode, describeRun(r)).not.toBe(0);
      expect((await connectError(p.url({ user: `${APP_USER}.no/such`, password: PASSWORDS[APP_USER] }))).code).toBe("28000");
      // A reload logs too.
      process.kill(p.pid, "SIGHUP");
      await p.waitForLog(/config reloaded/);

      await p.stop("SIGTERM");
      const log = p.logs();
      expect(log).toContain("session ready"); // the log did record these sessions
      const secrets: Record<string, string> = { ...PASSWORDS, wrong: WRONG, CONTEXT_SECRET };
      for (const [name, secret] of Object.entries(secrets)) {
        expect(log.includes(secret), `${name}'s secret "${secret}" appears in the ${format} log`).toBe(false);
      }
    });
  }
});

// =================================================================== lifecycle

describe("lifecycle", () => {
  test("SIGTERM: stop accepting, idle session 57P01, transaction in flight commits then 57P01, /readyz 503, exit 0", async () => {
    const p = await proxyWith(["--shutdown-timeout", "600000"]);
    const base = await httpBase(p);
    expect((await getJson(`${base}/readyz`)).status).toBe(200);

    const idle = await session(p, "idle");
    const tx = await session(p, "in-transaction");
    try {
      expect((await tx.query("BEGIN")).status).toBe("T");
      const ins = await tx.query(`INSERT INTO ${TABLE} VALUES (1, 'committed during shutdown')`);
      expect(ins.error).toBeUndefined();
      expect(ins.status).toBe("T");

      process.kill(p.pid, "SIGTERM");

      const fatal = await idle.expectFatalAndClose();
      expect(fatal).toMatchObject({ S: "FATAL", C: "57P01" });
      expect(fatal.M).toContain("shutting down");

      await expectRefused(p.port);
      const ready = await getJson(`${base}/readyz`);
      expect(ready.status).toBe(503);
      expect(ready.body.status).toBe("shutting down");
      expect((await getJson(`${base}/healthz`)).status).toBe(200);

      // The transaction is still served: more work, then COMMIT.
      const more = await tx.query(`SELECT count(*) FROM ${TABLE} WHERE id = 1`);
      expect(more.rows).toEqual([["1"]]);
      const commit = await tx.query("COMMIT");
      expect(commit.error).toBeUndefined();
      expect(commit.tags).toEqual(["COMMIT"]);
      expect(commit.status).toBe("I");
      const after = await tx.expectFatalAndClose();
      expect(after).toMatchObject({ S: "FATAL", C: "57P01" });

      expect(await exitCode(p)).toBe(0);
      const [row] = await pg.sql.unsafe(`SELECT note FROM ${TABLE} WHERE id = 1`);
      expect(row?.note).toBe("committed during shutdown");
      expect(p.logs()).toMatch(/SIGTERM: shutting down/);
      expect(p.logs()).toMatch(/all sessions closed/);
    } finally {
      idle.destroy();
      tx.destroy();
    }
  });

  test("SIGTERM: a query in flight finishes and its result arrives before 57P01", async () => {
    const p = await proxyWith(["--shutdown-timeout", "600000"]);
    const w = await session(p, "busy");
    // The query blocks on an advisory lock the test holds: in flight for as long as the test wants.
    const gate = await pg.sql.reserve();
    try {
      await gate`SELECT pg_advisory_lock(4242)`;
      const pid = Number((await w.query("SELECT pg_backend_pid()")).rows[0]![0]);
      w.write(queryMessage("SELECT pg_advisory_lock(4242), 'finished'"));
      await until("the query to wait on the lock", async () =>
        (await pg.sql`SELECT 1 FROM pg_stat_activity WHERE pid = ${pid} AND wait_event_type = 'Lock'`).length > 0,
      );
      process.kill(p.pid, "SIGTERM");
      await p.waitForLog(/shutting down: 1 session/);
      await expectRefused(p.port);

      await gate`SELECT pg_advisory_unlock(4242)`;
      const ms = await w.readUntil("Z");
      expect(ms.find((m) => m.type === "E")).toBeUndefined();
      expect(ms.filter((m) => m.type === "D").length).toBe(1);
      expect(await w.expectFatalAndClose()).toMatchObject({ S: "FATAL", C: "57P01" });
      expect(await exitCode(p)).toBe(0);
    } finally {
      await gate`SELECT pg_advisory_unlock_all()`.catch(() => {});
      gate.release();
      w.destroy();
    }
  });

  test("after --shutdown-timeout a session still in a transaction gets 57P01; the transaction is not committed; exit 0", async () => {
    const p = await proxyWith(["--shutdown-timeout", "300"]);
    const tx = await session(p, "stuck-transaction");
    try {
      await tx.query("BEGIN");
      expect((await tx.query(`INSERT INTO ${TABLE} VALUES (2, 'never committed')`)).status).toBe("T");
      process.kill(p.pid, "SIGTERM");
      const fatal = await tx.expectFatalAndClose();
      expect(fatal).toMatchObject({ S: "FATAL", C: "57P01" });
      expect(await exitCode(p)).toBe(0);
      expect(p.logs()).toMatch(/shutdown deadline reached/);
      const rows = await pg.sql.unsafe(`SELECT 1 FROM ${TABLE} WHERE id = 2`);
      expect(rows.length).toBe(0);
    } finally {
      tx.destroy();
    }
  });

  test("SIGTERM with no sessions exits 0; SIGINT shuts down the same way", async () => {
    const [a, b] = await Promise.all([proxyWith([]), proxyWith([])]);
    process.kill(a.pid, "SIGTERM");
    process.kill(b.pid, "SIGINT");
    expect(await exitCode(a)).toBe(0);
    expect(await exitCode(b)).toBe(0);
    expect(b.logs()).toMatch(/SIGINT: shutting down/);
  });

  test("SIGHUP reloads the config file: 'config reloaded', live sessions untouched, new settings apply", async () => {
    const dir = mkdtempSync(join(tmpdir(), "multigres-ops-config-"));
    dirs.push(dir);
    const file = join(dir, "multigres.toml");
    writeFileSync(file, `log_level = "info"\n`);
    const p = await proxyWith(["--config", file]);
    const live = await session(p, "live-across-reload");
    try {
      const pid = (await live.query("SELECT pg_backend_pid()")).rows[0]![0];
      expect(p.logs()).not.toContain("connection opened"); // a debug line

      writeFileSync(file, `log_level = "debug"\n`);
      process.kill(p.pid, "SIGHUP");
      await p.waitForLog(/config reloaded/);

      const again = await live.query("SELECT pg_backend_pid(), current_tenant_id()");
      expect(again.rows).toEqual([[pid!, TENANT_A]]);
      const fresh = await session(p, "after-reload");
      fresh.terminate();
      await fresh.waitClosed();
      await p.waitForLog(/connection opened/); // debug logging is on now
    } finally {
      live.terminate();
      live.destroy();
    }
  });
});

// ================================================================ idle timeout

describe("idle timeout", () => {
  test("--idle-timeout 500: an idle session is closed with 57P05", async () => {
    const p = await proxyWith(["--idle-timeout", "500"]);
    const w = await session(p, "idle");
    try {
      const fatal = await w.expectFatalAndClose();
      expect(fatal).toMatchObject({ S: "FATAL", C: "57P05" });
      expect(fatal.M).toContain("idle");
    } finally {
      w.destroy();
    }
  });

  test("--idle-timeout 500: a session busy with a query is not idle", async () => {
    const p = await proxyWith(["--idle-timeout", "500"]);
    const w = await session(p, "busy");
    try {
      // The sweep runs every second: at least one runs while this query does.
      const r = await w.query("SELECT pg_sleep(2.5), 'done'");
      expect(r.error).toBeUndefined();
      expect(r.rows).toEqual([["", "done"]]);
    } finally {
      w.destroy();
    }
  });

  test("an idle timeout set by SIGHUP applies", async () => {
    const dir = mkdtempSync(join(tmpdir(), "multigres-ops-idle-"));
    dirs.push(dir);
    const file = join(dir, "multigres.toml");
    writeFileSync(file, `idle_timeout = 0\n`);
    const p = await proxyWith(["--config", file]);
    writeFileSync(file, `idle_timeout = 500\n`);
    process.kill(p.pid, "SIGHUP");
    await p.waitForLog(/config reloaded/);
    const w = await session(p, "idle-after-reload");
    try {
      expect(await w.expectFatalAndClose()).toMatchObject({ C: "57P05" });
    } finally {
      w.destroy();
    }
  });
});
