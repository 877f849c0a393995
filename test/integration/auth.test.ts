/**
 * Authentication through the compiled proxy, one user per pg_hba method
 * (test/harness/postgres.ts HBA_LINES):
 *
 *   app_user   scram-sha-256   md5_user   md5   clear_user password
 *   trust_user trust           postgres   scram-sha-256 (superuser: no rewrite)
 *
 * --auth proxy (the default): the client authenticates at the proxy (SCRAM
 * against the harness auth file) and the proxy logs in upstream with its own
 * credential, answering whichever method pg_hba.conf asks for (the server
 * log shows it); a wrong client password is the proxy's 28P01 naming the
 * user as typed, and nothing reaches the server. Superusers are relayed.
 *
 * --auth passthrough: authentication relayed both ways (SCRAM ignores the
 * SCRAM user name; for MD5 the proxy takes the cleartext password from the
 * loopback client and answers the challenge for the rewritten user); a wrong
 * password is the server's own 28P01.
 *
 * A baseline block runs the same checks straight against Postgres, proving
 * the harness really exercises each method (the server log names the method
 * used for each backend pid).
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import { Client as pgClient } from "pg";
import {
  APP_USER,
  AUTH_METHODS,
  CLEAR_USER,
  connectError,
  describeRun,
  MD5_USER,
  NOTES,
  PASSWORDS,
  pgbench,
  psql,
  startPostgres,
  startProxyFor,
  SUPERUSER,
  TENANT_A,
  TRUST_USER,
  withClient,
  writeTempFile,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

const PASSWORD_USERS = [APP_USER, MD5_USER, CLEAR_USER] as const;
const WRONG = "definitely-not-the-password";

let pg: PgInstance;
let proxy: ProxyHandle; // --auth passthrough
let own: ProxyHandle; // --auth proxy

beforeAll(async () => {
  pg = await startPostgres();
  [proxy, own] = await Promise.all([
    startProxyFor(pg, { auth: "passthrough", args: ["--log-level", "debug"] }),
    startProxyFor(pg, { args: ["--log-level", "debug"] }),
  ]);
});

afterAll(async () => {
  await Promise.all([proxy?.stop(), own?.stop()]);
});

/**
 * The method Postgres used to authenticate backend `pid`, from the server log
 * (log_connections: `[pid] … connection authenticated: identity="u" method=m`).
 * Only the managed cluster has a readable log; returns undefined otherwise.
 */
function authMethodOf(pid: number): string | undefined {
  if (pg.mode !== "managed") return undefined;
  const line = pg
    .serverLog()
    .split("\n")
    .find((l) => l.includes(`[${pid}]`) && l.includes("connection authenticated:"));
  return line?.match(/method=(\S+)/)?.[1] ?? "(no 'connection authenticated' line: trust, or not logged)";
}

describe("direct to PostgreSQL (harness baseline)", () => {
  for (const user of PASSWORD_USERS) {
    test(`${user} (${AUTH_METHODS[user]}): right password works, server used ${AUTH_METHODS[user]}`, async () => {
      await withClient(pg.url({ user, password: PASSWORDS[user] }), async (sql) => {
        const [row] = await sql`SELECT current_user AS usr, pg_backend_pid() AS pid`;
        expect(row!.usr).toBe(user);
        if (pg.mode === "managed") expect(authMethodOf(row!.pid)).toBe(AUTH_METHODS[user]);
      });
    });

    test(`${user} (${AUTH_METHODS[user]}): wrong password is 28P01`, async () => {
      const err = await connectError(pg.url({ user, password: WRONG }));
      expect(err.code).toBe("28P01");
    });
  }

  test("trust_user logs in without a password", async () => {
    await withClient(pg.url({ user: TRUST_USER }), async (sql) => {
      const [row] = await sql`SELECT current_user AS usr`;
      expect(row!.usr).toBe(TRUST_USER);
    });
  });
});

describe("--auth proxy: the client authenticates at the proxy, the proxy logs in with each method", () => {
  for (const user of [...PASSWORD_USERS, TRUST_USER] as const) {
    test(`${user}: the client's SCRAM login at the proxy, the proxy's ${AUTH_METHODS[user]} login upstream`, async () => {
      await withClient(own.url({ user: `${user}.${TENANT_A}`, password: PASSWORDS[user] }), async (sql) => {
        const [row] = await sql`
          SELECT current_user AS usr, current_tenant_id() AS tenant, pg_backend_pid() AS pid, (SELECT count(*)::int FROM notes) AS n`;
        expect({ usr: row!.usr, tenant: row!.tenant, n: row!.n }).toEqual({ usr: user, tenant: TENANT_A, n: NOTES.tenant_a.length });
        if (pg.mode === "managed" && user !== TRUST_USER) expect(authMethodOf(row!.pid)).toBe(AUTH_METHODS[user]);
      });
    });

    test(`${user}: a wrong password is the proxy's 28P01 naming the user as typed; nothing reaches the server`, async () => {
      // Every TCP connection the server accepts logs "connection received" (log_connections).
      const connections = () => (pg.serverLog().match(/connection received:/g) ?? []).length;
      const before = pg.mode === "managed" ? connections() : 0;
      const err = await connectError(own.url({ user: `${user}.${TENANT_A}`, password: WRONG }));
      expect(`${err.code} ${err.message}`).toBe(`28P01 password authentication failed for user "${user}.${TENANT_A}"`);
      await own.waitForLog(new RegExp(`authentication failed for user "${user}\\.${TENANT_A}": password does not match`));
      if (pg.mode === "managed") expect(connections()).toBe(before);
    });
  }

  test("node-postgres (pg) logs in with SCRAM at the proxy; a wrong password is the proxy's 28P01", async () => {
    const client = new pgClient({ host: own.host, port: own.port, user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER], database: pg.database });
    await client.connect();
    try {
      const { rows } = await client.query("SELECT current_user AS usr, current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes) AS n");
      expect(rows).toEqual([{ usr: APP_USER, tenant: TENANT_A, n: NOTES.tenant_a.length }]);
    } finally {
      await client.end();
    }
    const wrong = new pgClient({ host: own.host, port: own.port, user: `${APP_USER}.${TENANT_A}`, password: WRONG, database: pg.database });
    const err = (await wrong.connect().catch((e) => e)) as { code?: string; message?: string };
    expect(`${err.code} ${err.message}`).toBe(`28P01 password authentication failed for user "${APP_USER}.${TENANT_A}"`);
    await wrong.end().catch(() => {});
  });

  test("psql and pgbench log in with SCRAM at the proxy", async () => {
    const r = await psql(own.url({ user: `${MD5_USER}.${TENANT_A}`, password: PASSWORDS[MD5_USER] }), "SELECT current_user, current_tenant_id()");
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stdout.trim()).toBe(`${MD5_USER}|${TENANT_A}`);
    const bad = await psql(own.url({ user: `${APP_USER}.${TENANT_A}`, password: WRONG }), "SELECT 1");
    expect(bad.exitCode, describeRun(bad)).toBe(2);
    expect(bad.stderr).toContain(`password authentication failed for user "${APP_USER}.${TENANT_A}"`);
    // pgbench: a new connection (and SCRAM exchange) per transaction.
    const script = writeTempFile("auth-pgbench.sql", "SELECT current_tenant_id();\n");
    const r2 = await pgbench(["-n", "-C", "-c", "2", "-t", "10", "-f", script, own.url({ user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER] })], { env: { PGSSLMODE: "disable" } });
    expect(r2.exitCode, describeRun(r2)).toBe(0);
    expect(r2.stdout).toMatch(/number of transactions actually processed: 20\/20/);
  });

  test("the superuser is relayed to PostgreSQL (its own password, pg_hba decides)", async () => {
    await withClient(own.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }), async (sql) => {
      const [row] = await sql`SELECT current_user AS usr, pg_backend_pid() AS pid, current_tenant_id() AS tenant`;
      expect({ usr: row!.usr, tenant: row!.tenant }).toEqual({ usr: SUPERUSER, tenant: null });
      if (pg.mode === "managed") expect(authMethodOf(row!.pid)).toBe(AUTH_METHODS[SUPERUSER]);
    });
    const err = await connectError(own.url({ user: SUPERUSER, password: WRONG }));
    expect(`${err.code} ${err.message}`).toBe(`28P01 password authentication failed for user "${SUPERUSER}"`);
  });
});

describe("--auth passthrough: postgres.js", () => {
  for (const user of PASSWORD_USERS) {
    test(`${user} (${AUTH_METHODS[user]}): right password logs in with tenant context`, async () => {
      await withClient(proxy.url({ user: `${user}.${TENANT_A}`, password: PASSWORDS[user] }), async (sql) => {
        const [row] = await sql`
          SELECT current_user AS usr, session_user AS session_usr,
                 current_tenant_id() AS tenant, pg_backend_pid() AS pid,
                 (SELECT count(*)::int FROM notes) AS n`;
        expect({ usr: row!.usr, session_usr: row!.session_usr, tenant: row!.tenant, n: row!.n }).toEqual({
          usr: user,
          session_usr: user,
          tenant: TENANT_A,
          n: NOTES.tenant_a.length,
        });
        // The server really authenticated this backend with the method under test.
        if (pg.mode === "managed") expect(authMethodOf(row!.pid)).toBe(AUTH_METHODS[user]);
      });
    });

    test(`${user} (${AUTH_METHODS[user]}): wrong password is the server's 28P01`, async () => {
      const err = await connectError(proxy.url({ user: `${user}.${TENANT_A}`, password: WRONG }));
      expect(err.code, `${err.message}\n--- proxy logs ---\n${proxy.logs()}`).toBe("28P01");
      expect(err.message).toContain(`password authentication failed for user "${user}"`);
    });
  }

  test("trust_user (trust) logs in without a password", async () => {
    await withClient(proxy.url({ user: `${TRUST_USER}.${TENANT_A}` }), async (sql) => {
      const [row] = await sql`SELECT current_user AS usr, current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes) AS n`;
      expect(row).toEqual({ usr: TRUST_USER, tenant: TENANT_A, n: NOTES.tenant_a.length });
    });
  });

  test("trust_user (trust) logs in even when the client has some password", async () => {
    await withClient(proxy.url({ user: `${TRUST_USER}.${TENANT_A}`, password: WRONG }), async (sql) => {
      const [row] = await sql`SELECT current_user AS usr, current_tenant_id() AS tenant`;
      expect(row).toEqual({ usr: TRUST_USER, tenant: TENANT_A });
    });
  });

  test("superuser postgres (scram-sha-256): right password logs in untouched", async () => {
    await withClient(proxy.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }), async (sql) => {
      const [row] = await sql`SELECT current_user AS usr, pg_backend_pid() AS pid`;
      expect(row!.usr).toBe(SUPERUSER);
      if (pg.mode === "managed") expect(authMethodOf(row!.pid)).toBe(AUTH_METHODS[SUPERUSER]);
    });
  });

  test("superuser postgres (scram-sha-256): wrong password is 28P01", async () => {
    const err = await connectError(proxy.url({ user: SUPERUSER, password: WRONG }));
    expect(err.code).toBe("28P01");
  });
});

describe("--auth passthrough: psql", () => {
  for (const user of PASSWORD_USERS) {
    test(`${user} (${AUTH_METHODS[user]}): right password`, async () => {
      const r = await psql(
        proxy.url({ user: `${user}.${TENANT_A}`, password: PASSWORDS[user] }),
        "SELECT current_user, current_tenant_id()",
      );
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout.trim()).toBe(`${user}|${TENANT_A}`);
    });

    test(`${user} (${AUTH_METHODS[user]}): wrong password`, async () => {
      const r = await psql(proxy.url({ user: `${user}.${TENANT_A}`, password: WRONG }), "SELECT 1");
      expect(r.exitCode, describeRun(r)).toBe(2);
      expect(r.stderr).toContain(`password authentication failed for user "${user}"`);
      expect(r.stdout).toBe("");
    });
  }

  test("trust_user (trust): no password", async () => {
    const r = await psql(proxy.url({ user: `${TRUST_USER}.${TENANT_A}` }), "SELECT current_user, current_tenant_id()");
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stdout.trim()).toBe(`${TRUST_USER}|${TENANT_A}`);
  });
});
