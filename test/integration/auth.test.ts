/**
 * Authentication through the compiled proxy, one user per pg_hba method
 * (test/harness/postgres.ts HBA_LINES):
 *
 *   app_user   scram-sha-256   (pass-through: SCRAM ignores the SCRAM user name)
 *   md5_user   md5             (the proxy takes the cleartext password from the
 *                              loopback client and answers the MD5 challenge
 *                              for the rewritten user itself)
 *   clear_user password        (cleartext pass-through)
 *   trust_user trust
 *   postgres   scram-sha-256   (superuser: no rewrite)
 *
 * Right password logs in (as the rewritten user, with the tenant context);
 * wrong password yields the server's 28P01. A baseline block runs the same
 * checks straight against Postgres, proving the harness really exercises each
 * method (the server log names the method used for each backend pid).
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import {
  APP_USER,
  AUTH_METHODS,
  CLEAR_USER,
  connectError,
  describeRun,
  MD5_USER,
  NOTES,
  PASSWORDS,
  psql,
  startPostgres,
  startProxyFor,
  SUPERUSER,
  TENANT_A,
  TRUST_USER,
  withClient,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

const PASSWORD_USERS = [APP_USER, MD5_USER, CLEAR_USER] as const;
const WRONG = "definitely-not-the-password";

let pg: PgInstance;
let proxy: ProxyHandle;

beforeAll(async () => {
  pg = await startPostgres();
  proxy = await startProxyFor(pg, { args: ["--log-level", "debug"] });
});

afterAll(async () => {
  await proxy?.stop();
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

describe("through the proxy: postgres.js", () => {
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

describe("through the proxy: psql", () => {
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
