/**
 * Tenant isolation through the compiled proxy, against real PostgreSQL.
 *
 * Fixture (test/harness/postgres.ts): table `notes`, owned by the superuser,
 * ENABLE + FORCE RLS via multigres.enable_tenant_rls('notes'); tenant_a owns
 * 3 rows, tenant_b 2. `app_user` is NOSUPERUSER NOBYPASSRLS.
 *
 * Covers: each tenant sees exactly its rows in postgres.js, psql and a pgbench
 * custom script; the session context (tenant setting, current_user); writes
 * carrying another tenant's id are refused by the policy (42501); no context
 * = zero rows; missing / empty / bad / too-long tenant = 28000 and nothing
 * reaches the server (checked with a recording TCP relay in front of
 * Postgres); the superuser bypasses rewriting and sees every row.
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import {
  APP_USER,
  connect,
  connectError,
  describeRun,
  NOTES,
  PASSWORDS,
  pgbench,
  psql,
  startPostgres,
  startProxyFor,
  startTap,
  SUPERUSER,
  TENANT_A,
  TENANT_B,
  withClient,
  writeTempFile,
  type PgInstance,
  type ProxyHandle,
  type Tap,
} from "../harness/index.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

const TENANTS = [TENANT_A, TENANT_B] as const;
const appPw = PASSWORDS[APP_USER];

let pg: PgInstance;
let proxy: ProxyHandle;

beforeAll(async () => {
  pg = await startPostgres();
  proxy = await startProxyFor(pg, { args: ["--log-level", "debug"] });
});

afterAll(async () => {
  await proxy?.stop();
});

const tenantUrl = (tenant: string) => proxy.url({ user: `${APP_USER}.${tenant}`, password: appPw });

describe("no context (direct connection, no proxy)", () => {
  test("app_user connected straight to Postgres sees zero rows", async () => {
    await withClient(pg.url({ user: APP_USER, password: appPw }), async (sql) => {
      const [ctx] = await sql`SELECT current_user AS usr, current_tenant_id() AS tenant`;
      expect(ctx).toEqual({ usr: APP_USER, tenant: null });
      const n = (await sql`SELECT count(*)::int AS n FROM notes`)[0]!.n;
      expect(n).toBe(0);
      // Sanity: the rows exist (the superuser bypasses RLS).
      const total = (await pg.sql`SELECT count(*)::int AS total FROM notes WHERE tenant_id IN ${pg.sql([...TENANTS])}`)[0]!.total;
      expect(total).toBe(NOTES.tenant_a.length + NOTES.tenant_b.length);
    });
  });

  test("app_user without context cannot insert (policy refuses, 42501)", async () => {
    await withClient(pg.url({ user: APP_USER, password: appPw }), async (sql) => {
      const err = await sql`INSERT INTO notes (tenant_id, body) VALUES (${TENANT_A}, 'no context')`.catch((e) => e);
      expect(err).toBeInstanceOf(Error);
      expect(err.code).toBe("42501");
    });
  });
});

describe("two tenants through the proxy: postgres.js", () => {
  for (const tenant of TENANTS) {
    test(`${tenant} sees exactly its own rows`, async () => {
      await withClient(tenantUrl(tenant), async (sql) => {
        const rows = await sql`SELECT tenant_id, body FROM notes ORDER BY id`;
        expect(rows.map((r) => r.tenant_id)).toEqual(NOTES[tenant].map(() => tenant));
        expect(rows.map((r) => r.body)).toEqual([...NOTES[tenant]]);
        const foreign = (await sql`SELECT count(*)::int AS foreign FROM notes WHERE tenant_id <> ${tenant}`)[0]!.foreign;
        expect(foreign).toBe(0);
      });
    });

    test(`${tenant}: session has the tenant setting and runs as app_user`, async () => {
      await withClient(tenantUrl(tenant), async (sql) => {
        const [ctx] = await sql`
          SELECT current_setting('app.current_tenant_id') AS setting,
                 current_tenant_id() AS tenant,
                 current_user AS usr,
                 session_user AS session_usr`;
        expect(ctx).toEqual({ setting: tenant, tenant, usr: APP_USER, session_usr: APP_USER });
      });
    });
  }

  test("both tenants connected at the same time stay isolated", async () => {
    const a = connect(tenantUrl(TENANT_A));
    const b = connect(tenantUrl(TENANT_B));
    try {
      for (let round = 0; round < 5; round++) {
        const [ra, rb] = await Promise.all([
          a`SELECT current_tenant_id() AS t, array_agg(DISTINCT tenant_id) AS seen, count(*)::int AS n FROM notes`,
          b`SELECT current_tenant_id() AS t, array_agg(DISTINCT tenant_id) AS seen, count(*)::int AS n FROM notes`,
        ]);
        expect(ra[0]).toEqual({ t: TENANT_A, seen: [TENANT_A], n: NOTES.tenant_a.length });
        expect(rb[0]).toEqual({ t: TENANT_B, seen: [TENANT_B], n: NOTES.tenant_b.length });
      }
    } finally {
      await Promise.all([a.end(), b.end()]);
    }
  });

  test("a write carrying the other tenant's id is refused by the policy (42501)", async () => {
    await withClient(tenantUrl(TENANT_A), async (sql) => {
      const insert = await sql`INSERT INTO notes (tenant_id, body) VALUES (${TENANT_B}, 'forged by a')`.catch((e) => e);
      expect(insert).toBeInstanceOf(Error);
      expect(insert.code).toBe("42501");

      const update = await sql`UPDATE notes SET tenant_id = ${TENANT_B} WHERE tenant_id = ${TENANT_A}`.catch((e) => e);
      expect(update).toBeInstanceOf(Error);
      expect(update.code).toBe("42501");

      // The other tenant's rows are invisible, so they cannot be touched either.
      const del = await sql`DELETE FROM notes WHERE tenant_id = ${TENANT_B}`;
      expect(del.count).toBe(0);

      // The connection is still usable after the refusals.
      const n = (await sql`SELECT count(*)::int AS n FROM notes`)[0]!.n;
      expect(n).toBe(NOTES.tenant_a.length);
    });
    const rows = await pg.sql`SELECT tenant_id, body FROM notes WHERE tenant_id IN ${pg.sql([...TENANTS])} ORDER BY id`;
    expect(rows.filter((r) => r.tenant_id === TENANT_B).map((r) => r.body)).toEqual([...NOTES.tenant_b]);
    expect(rows.filter((r) => r.tenant_id === TENANT_A).map((r) => r.body)).toEqual([...NOTES.tenant_a]);
  });

  test("a write with the own tenant id is allowed", async () => {
    const rollback = new Error("rollback");
    await withClient(tenantUrl(TENANT_A), async (sql) => {
      const err = await sql
        .begin(async (tx) => {
          const [row] = await tx`INSERT INTO notes (tenant_id, body) VALUES (${TENANT_A}, 'own write') RETURNING tenant_id`;
          expect(row!.tenant_id).toBe(TENANT_A);
          const n = (await tx`SELECT count(*)::int AS n FROM notes`)[0]!.n;
          expect(n).toBe(NOTES.tenant_a.length + 1);
          throw rollback;
        })
        .catch((e) => e);
      expect(err).toBe(rollback);
    });
  });
});

describe("two tenants through the proxy: psql", () => {
  for (const tenant of TENANTS) {
    test(`${tenant} sees exactly its own rows`, async () => {
      const r = await psql(tenantUrl(tenant), "SELECT tenant_id, body FROM notes ORDER BY id");
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout.trim().split("\n")).toEqual(NOTES[tenant].map((body) => `${tenant}|${body}`));
    });

    test(`${tenant}: context as seen by psql`, async () => {
      const r = await psql(
        tenantUrl(tenant),
        "SELECT current_user, current_setting('app.current_tenant_id'), current_tenant_id()",
      );
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout.trim()).toBe(`${APP_USER}|${tenant}|${tenant}`);
    });
  }

  test("psql: inserting the other tenant's id fails with a row-level security error", async () => {
    const r = await psql(
      tenantUrl(TENANT_B),
      `INSERT INTO notes (tenant_id, body) VALUES ('${TENANT_A}', 'forged by b')`,
    );
    expect(r.exitCode, describeRun(r)).not.toBe(0);
    expect(r.stderr).toContain("new row violates row-level security policy");
  });
});

describe("two tenants through the proxy: pgbench custom script", () => {
  /**
   * Fails the pgbench client (pgbench exits 2, "division by zero" in a \set
   * expression) when the session sees any row of another tenant, a wrong
   * number of own rows, or a different tenant than expected.
   */
  const detector = (tenant: string, ownRows: number) => `
SELECT count(*) FILTER (WHERE tenant_id IS DISTINCT FROM current_tenant_id()) AS foreign_rows,
       count(*) FILTER (WHERE tenant_id = current_tenant_id()) AS own_rows,
       (coalesce(current_tenant_id(), '') = '${tenant}')::int AS right_tenant
  FROM notes \\gset
\\if :foreign_rows <> 0
\\set foreign_rows_seen 1 / 0
\\endif
\\if :own_rows <> ${ownRows}
\\set wrong_own_row_count 1 / 0
\\endif
\\if :right_tenant = 0
\\set wrong_tenant 1 / 0
\\endif
`;
  const scripts: Record<string, string> = {};
  beforeAll(() => {
    for (const t of TENANTS) scripts[t] = writeTempFile(`rls-${t}.pgbench.sql`, detector(t, NOTES[t].length));
  });

  test("the detector script fails when it can see foreign rows (superuser, direct)", async () => {
    const r = await pgbench(["-n", "-c", "1", "-t", "1", "-f", scripts[TENANT_A]!, pg.adminUrl]);
    expect(r.exitCode, describeRun(r)).toBe(2);
    expect(r.stderr).toContain("division by zero");
  });

  test("both tenants run concurrently and never see a foreign row (simple + prepared)", async () => {
    const runs = await Promise.all(
      TENANTS.flatMap((t) =>
        (["simple", "prepared"] as const).map((mode) =>
          pgbench(["-n", "-c", "4", "-j", "2", "-t", "25", "-M", mode, "-f", scripts[t]!, tenantUrl(t)]),
        ),
      ),
    );
    for (const r of runs) {
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout).toContain("number of transactions actually processed: 100/100");
    }
  });
});

describe("tenant validation (28000, never reaches the server)", () => {
  let tap: Tap;
  let guarded: ProxyHandle;

  beforeAll(async () => {
    tap = await startTap({ host: pg.host, port: pg.port });
    guarded = await startProxyFor(pg, { upstreamHost: tap.host, upstreamPort: tap.port, args: ["--log-level", "debug"] });
  });
  afterAll(async () => {
    await guarded?.stop();
    await tap?.stop();
  });

  /** A good connection through `guarded`, marked by application_name; resolves with its tap connection id. */
  const barrier = async (marker: string) => {
    await withClient(
      guarded.url({ user: `${APP_USER}.${TENANT_A}`, password: appPw, params: { application_name: marker } }),
      async (sql) => {
        const t = (await sql`SELECT current_tenant_id() AS t`)[0]!.t;
        expect(t).toBe(TENANT_A);
      },
    );
    return (await tap.waitForStartup((p) => p.application_name === marker)).id;
  };

  const badUsers: Array<[string, string]> = [
    ["missing tenant (no separator)", APP_USER],
    ["empty tenant", `${APP_USER}.`],
    ["bad characters", `${APP_USER}.bad!tenant`],
    ["quote injection", `${APP_USER}.x'; DROP TABLE notes; --`],
    ["too long (64 chars)", `${APP_USER}.${"t".repeat(64)}`],
  ];

  test("postgres.js: every bad tenant gets 28000 and no upstream connection", async () => {
    const before = await barrier("barrier-before");
    for (const [label, user] of badUsers) {
      const err = await connectError(guarded.url({ user, password: appPw }));
      expect({ label, code: err.code }).toEqual({ label, code: "28000" });
      expect(err.message.length).toBeGreaterThan(0);
    }
    const after = await barrier("barrier-after");
    const between = tap.connections.filter((c) => c.id > before && c.id < after);
    expect(between, `upstream connections opened for bad tenants:\n${guarded.logs()}`).toEqual([]);
    // Everything that reached Postgres so far is a barrier connection, with a good startup.
    const seen = tap.connections.filter((c) => c.id <= after).map((c) => c.startup?.application_name);
    expect(seen).toEqual(["barrier-before", "barrier-after"]);
  });

  test("a 63-character tenant is accepted (upper bound of the default pattern)", async () => {
    const tenant = "t".repeat(63);
    await withClient(guarded.url({ user: `${APP_USER}.${tenant}`, password: appPw }), async (sql) => {
      const [row] = await sql`SELECT current_tenant_id() AS t, count(*)::int AS n FROM notes`;
      expect(row).toEqual({ t: tenant, n: 0 });
    });
  });

  test("psql: missing and bad tenant are refused at connect", async () => {
    for (const user of [APP_USER, `${APP_USER}.bad!tenant`]) {
      const r = await psql(guarded.url({ user, password: appPw }), "SELECT 1");
      expect(r.exitCode, describeRun(r)).toBe(2);
      expect(r.stderr).toContain("FATAL");
      expect(r.stdout).toBe("");
    }
  });
});

describe("superuser bypass", () => {
  test("postgres through the proxy sees every tenant's rows, with no tenant context", async () => {
    await withClient(proxy.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }), async (sql) => {
      const [ctx] = await sql`
        SELECT current_user AS usr, session_user AS session_usr,
               current_setting('app.current_tenant_id', true) AS setting`;
      expect(ctx!.usr).toBe(SUPERUSER);
      expect(ctx!.session_usr).toBe(SUPERUSER);
      expect(ctx!.setting ?? "").toBe("");
      const seen = await sql`SELECT tenant_id, count(*)::int AS n FROM notes GROUP BY 1 ORDER BY 1`;
      const direct = await pg.sql`SELECT tenant_id, count(*)::int AS n FROM notes GROUP BY 1 ORDER BY 1`;
      expect([...seen]).toEqual([...direct]);
      const byTenant = Object.fromEntries(seen.map((r) => [r.tenant_id, r.n]));
      expect(byTenant[TENANT_A]).toBe(NOTES.tenant_a.length);
      expect(byTenant[TENANT_B]).toBe(NOTES.tenant_b.length);
    });
  });

  test("psql as postgres through the proxy sees both tenants", async () => {
    const r = await psql(
      proxy.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }),
      `SELECT string_agg(DISTINCT tenant_id, ',' ORDER BY tenant_id) FROM notes WHERE tenant_id IN ('${TENANT_A}', '${TENANT_B}')`,
    );
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stdout.trim()).toBe(`${TENANT_A},${TENANT_B}`);
  });
});
