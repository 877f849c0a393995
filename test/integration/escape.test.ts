/**
 * Escaping the tenant: every way a session could try to become another
 * tenant (or lose its tenant and see everything), through the compiled proxy
 * against real PostgreSQL. DESIGN.md §2, issue 4 item 2.
 *
 * Each attempt runs through the proxy as tenant_a on a fresh connection and
 * is followed by a read: `SELECT tenant_id FROM notes` must show zero rows of
 * tenant_b, current_tenant_id() must not be 'tenant_b', and current_user must
 * still be app_user. Beyond that the read is exact (tenant_a's three rows
 * when the context survived, none when the attempt broke it), so a change in
 * behaviour shows.
 *
 * The whole suite runs twice:
 * - guard on (the default): statements the guard is meant to see are
 *   refused with 42501 and a message starting "multigres: ", and the
 *   context is untouched afterwards;
 * - guard off (`--guard off`): the statements reach the server and may
 *   succeed; the database check alone (the signature verified by
 *   current_tenant_id(), bound to the backend pid) keeps tenant_b's rows out.
 * Attempts the guard cannot see (names built at run time, bind parameters,
 * function SET clauses) run against the database check in both modes.
 *
 * Then: startup parameters and `options=-c …` (28000 in both modes), and a
 * direct connection to Postgres as app_user that forges whatever it likes
 * (zero rows; the one control that knows the secret shows the read would
 * have seen a leak).
 */
import { createHash, createHmac } from "node:crypto";
import { connect as netConnect, type Socket } from "node:net";
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import {
  APP_USER,
  connectError,
  contextKey,
  describeRun,
  NOTES,
  PASSWORDS,
  passwordFor,
  psql,
  startPostgres,
  startProxyFor,
  TENANT_A,
  TENANT_B,
  TRUST_USER,
  withClient,
  type Client,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";
import { authenticateToReady } from "../harness/raw-socket.ts";

// test/preload.ts sets this too, but under `bun test` with several files
// Bun 1.4 applies a preload's setDefaultTimeout to the first file only.
setDefaultTimeout(120_000);

const appPw = PASSWORDS[APP_USER];
/** A schema where app_user may create functions (granted below, dropped at the end). */
const FN_SCHEMA = "escape_fn";

let pg: PgInstance;
const proxies: { on?: ProxyHandle; off?: ProxyHandle } = {};

beforeAll(async () => {
  pg = await startPostgres();
  await pg.sql.unsafe(`
    DROP SCHEMA IF EXISTS ${FN_SCHEMA} CASCADE;
    CREATE SCHEMA ${FN_SCHEMA};
    GRANT USAGE, CREATE ON SCHEMA ${FN_SCHEMA} TO ${APP_USER};
  `);
  const [on, off] = await Promise.all([
    startProxyFor(pg, { args: ["--log-level", "debug"] }),
    startProxyFor(pg, { args: ["--log-level", "debug", "--guard", "off"] }),
  ]);
  proxies.on = on;
  proxies.off = off;
});

afterAll(async () => {
  await Promise.all([proxies.on?.stop(), proxies.off?.stop()]);
  await pg?.sql.unsafe(`DROP SCHEMA IF EXISTS ${FN_SCHEMA} CASCADE`);
});

// ------------------------------------------------------------------ helpers

type Outcome = { ok: true; result: unknown } | { ok: false; code: string | undefined; message: string };

/** Run one client call and capture success or the server's error. */
async function outcome(fn: () => PromiseLike<unknown>): Promise<Outcome> {
  try {
    return { ok: true, result: await fn() };
  } catch (error) {
    const e = error as { code?: string; message?: string };
    return { ok: false, code: e.code, message: String(e.message ?? error) };
  }
}

/** "ok" or "<SQLSTATE> <message>", so a mismatch prints what really happened. */
const show = (o: Outcome) => (o.ok ? "ok" : `${o.code} ${o.message}`);

type Row = Record<string, unknown>;
/** A simple-protocol query's rows as plain records. */
const rows = async (sql: Client, text: string): Promise<Row[]> => [...(await sql.unsafe(text))] as Row[];

/** The guard's refusal: 42501 with a message starting "multigres: ". */
function expectGuardRefusal(o: Outcome): void {
  expect(show(o)).toMatch(/^42501 multigres: /);
}

/** With the guard off nothing may carry the guard's message; `server` is what Postgres does. */
function expectServer(o: Outcome, server: "ok" | RegExp): void {
  if (!o.ok) expect(o.message).not.toStartWith("multigres:");
  if (server === "ok") expect(show(o)).toBe("ok");
  else expect(show(o)).toMatch(server);
}

interface Observed {
  /** tenant_id of every row `SELECT … FROM notes` returns. */
  rows: string[];
  tenant: string | null;
  usr: string;
}

/** The read after an attempt (simple protocol, so it works after DISCARD ALL too). */
async function observe(sql: Client): Promise<Observed> {
  const rows = await sql.unsafe(`SELECT tenant_id FROM notes ORDER BY id`);
  const [ctx] = await sql.unsafe(`SELECT public.current_tenant_id() AS tenant, current_user::text AS usr`);
  return { rows: rows.map((r) => r.tenant_id as string), tenant: ctx!.tenant, usr: ctx!.usr };
}

const TENANT_A_ROWS = NOTES.tenant_a.map(() => TENANT_A);

/**
 * The promise, then the exact state: zero rows of tenant_b, current_tenant_id()
 * not tenant_b, still app_user; and either tenant_a's context intact
 * (`"tenant_a"`) or no context at all (`null`: zero rows).
 */
async function expectIsolated(sql: Client, context: typeof TENANT_A | null): Promise<void> {
  const seen = await observe(sql);
  expect(seen.rows.filter((t) => t !== TENANT_A)).toEqual([]);
  expect(seen.tenant).not.toBe(TENANT_B);
  expect(seen.usr).toBe(APP_USER);
  expect(seen).toEqual({ rows: context === TENANT_A ? TENANT_A_ROWS : [], tenant: context, usr: APP_USER });
}

/**
 * The signature of `tenant` bound to a backend under `key` (the proxy's
 * scheme, sql/setup.sql): `binding` is "<pid>/<backend start in µs>".
 */
const sign = (key: Uint8Array, tenant: string, binding: string) => createHmac("sha256", key).update(`${tenant}/${binding}`).digest("hex");

/** What this session's signatures are bound to: "<pid>/<start µs>", read independently of multigres's function. */
const bindingOf = async (sql: Client): Promise<{ pid: number; binding: string }> => {
  const [r] = await sql.unsafe(
    `SELECT pg_backend_pid() AS pid, (extract(epoch FROM backend_start) * 1000000)::bigint::text AS start FROM pg_stat_activity WHERE pid = pg_backend_pid()`,
  );
  return { pid: r!.pid as number, binding: `${r!.pid}/${r!.start}` };
};

/** A genuine signature from a live tenant_b session, and that session's backend pid and binding. */
async function tenantBSignature(proxy: ProxyHandle): Promise<{ sig: string; pid: number; binding: string }> {
  return withClient(proxy.url({ user: `${APP_USER}.${TENANT_B}`, password: appPw }), async (sql) => {
    const { pid, binding } = await bindingOf(sql);
    const [r] = await sql.unsafe(`SELECT current_setting('app.current_tenant_id_sig') AS sig`);
    // It is the real thing: valid for tenant_b on *that* backend.
    expect(r!.sig).toBe(sign(contextKey(), TENANT_B, binding));
    return { sig: r!.sig as string, pid, binding };
  });
}

// -------------------------------------------------------------- the attempts

/** One statement sent as a simple Query. */
interface Attempt {
  name: string;
  sql: string;
  /**
   * "refuses": the guard must refuse it (42501 "multigres: …").
   * "blind": the guard cannot see it (a name built at run time, a SET clause
   * it does not look at …): it reaches the server in both modes. The test
   * still accepts a guard refusal, which would be stricter, not weaker.
   */
  guard: "refuses" | "blind";
  /** What Postgres answers when the statement reaches it: "ok", or "<SQLSTATE> <message>". */
  server: "ok" | RegExp;
  /** The context after the server ran it: tenant_a's intact, or none. */
  after: typeof TENANT_A | null;
}

const PERMISSION_DENIED_ROLE = /^42501 permission denied to set role "postgres"/;
const PERMISSION_DENIED_SESSION_AUTH = /^42501 permission denied to set session authorization/;
/** Calling a pg_temp function the guard kept from being created: no such function (or no temp schema yet). */
const NEVER_CREATED = /^(42883|3F000) /;
/** PostgreSQL 15+ refuses a custom setting in a function's SET clause to a non-superuser. */
const PERMISSION_DENIED_PARAMETER = /^42501 permission denied to set parameter "app\.current_tenant_id"/;

const GROUPS: Array<[threat: string, attempts: Attempt[]]> = [
  [
    "forging the tenant setting",
    [
      { name: "SET app.current_tenant_id = 'tenant_b'", sql: `SET app.current_tenant_id = 'tenant_b'`, guard: "refuses", server: "ok", after: null },
      { name: "SET SESSION app.current_tenant_id TO 'tenant_b'", sql: `SET SESSION app.current_tenant_id TO 'tenant_b'`, guard: "refuses", server: "ok", after: null },
      { name: `set "app"."current_tenant_id" = 'tenant_b' (quoted parts)`, sql: `set "app"."current_tenant_id" = 'tenant_b'`, guard: "refuses", server: "ok", after: null },
      { name: "SET APP.CURRENT_TENANT_ID = tenant_b (case)", sql: `SET APP.CURRENT_TENANT_ID = tenant_b`, guard: "refuses", server: "ok", after: null },
      { name: "SET app.current_tenant_id TO DEFAULT", sql: `SET app.current_tenant_id TO DEFAULT`, guard: "refuses", server: "ok", after: null },
      { name: "select set_config('app.current_tenant_id', 'tenant_b', false)", sql: `select set_config('app.current_tenant_id', 'tenant_b', false)`, guard: "refuses", server: "ok", after: null },
      { name: "select pg_catalog.set_config('APP.Current_Tenant_Id', 'tenant_b', false)", sql: `select pg_catalog.set_config('APP.Current_Tenant_Id', 'tenant_b', false)`, guard: "refuses", server: "ok", after: null },
      { name: "set_config inside a CTE: with x as (select set_config(…)) select * from x", sql: `with x as (select set_config('app.current_tenant_id', 'tenant_b', false)) select * from x`, guard: "refuses", server: "ok", after: null },
      { name: "set_config with the name concatenated at run time", sql: `select set_config('app.current_' || 'tenant_id', 'tenant_b', false)`, guard: "blind", server: "ok", after: null },
      { name: "set_config with the name in E'' escapes", sql: `select set_config(E'app.current\\x5ftenant\\137id', 'tenant_b', false)`, guard: "blind", server: "ok", after: null },
      { name: "set_config with the name in U&'' escapes", sql: `select set_config(U&'app.current\\005Ftenant_id', 'tenant_b', false)`, guard: "blind", server: "ok", after: null },
      { name: `SET U&"…" with the name in Unicode escapes`, sql: `SET U&"app.current\\005Ftenant_id" = 'tenant_b'`, guard: "blind", server: "ok", after: null },
    ],
  ],
  [
    "forging the signature setting",
    [
      { name: "SET app.current_tenant_id_sig to an invented value", sql: `SET app.current_tenant_id_sig = '${"ab".repeat(32)}'`, guard: "refuses", server: "ok", after: null },
      { name: "RESET app.current_tenant_id_sig", sql: `RESET app.current_tenant_id_sig`, guard: "refuses", server: "ok", after: null },
      { name: "set_config('app.current_tenant_id_sig', '', false)", sql: `select set_config('app.current_tenant_id_sig', '', false)`, guard: "refuses", server: "ok", after: null },
      {
        name: "tenant changed, own signature set again explicitly (one Query)",
        sql: `SELECT set_config('app.current_tenant_id', 'tenant_b', false), set_config('app.current_tenant_id_sig', current_setting('app.current_tenant_id_sig'), false)`,
        guard: "refuses",
        server: "ok",
        after: null,
      },
      {
        name: "tenant changed with a name built at run time, own signature kept",
        sql: `SELECT set_config(concat('app.', 'current_tenant_id'), 'tenant_b', false)`,
        guard: "blind",
        server: "ok",
        after: null,
      },
    ],
  ],
  [
    "role changes",
    [
      { name: "SET ROLE postgres", sql: `SET ROLE postgres`, guard: "refuses", server: PERMISSION_DENIED_ROLE, after: TENANT_A },
      { name: "SET SESSION ROLE postgres", sql: `SET SESSION ROLE postgres`, guard: "refuses", server: PERMISSION_DENIED_ROLE, after: TENANT_A },
      { name: "set role postgres (lower case)", sql: `set role postgres`, guard: "refuses", server: PERMISSION_DENIED_ROLE, after: TENANT_A },
      { name: "RESET ROLE", sql: `RESET ROLE`, guard: "refuses", server: "ok", after: TENANT_A },
      { name: "SET ROLE NONE", sql: `SET ROLE NONE`, guard: "refuses", server: "ok", after: TENANT_A },
      { name: "SET SESSION AUTHORIZATION postgres", sql: `SET SESSION AUTHORIZATION postgres`, guard: "refuses", server: PERMISSION_DENIED_SESSION_AUTH, after: TENANT_A },
      { name: "SET SESSION AUTHORIZATION DEFAULT", sql: `SET SESSION AUTHORIZATION DEFAULT`, guard: "refuses", server: "ok", after: TENANT_A },
      { name: "RESET SESSION AUTHORIZATION", sql: `RESET SESSION AUTHORIZATION`, guard: "refuses", server: "ok", after: TENANT_A },
      { name: "select set_config('role', 'postgres', false)", sql: `select set_config('role', 'postgres', false)`, guard: "refuses", server: PERMISSION_DENIED_ROLE, after: TENANT_A },
      { name: "select set_config('session_authorization', 'postgres', false)", sql: `select set_config('session_authorization', 'postgres', false)`, guard: "refuses", server: PERMISSION_DENIED_SESSION_AUTH, after: TENANT_A },
    ],
  ],
  [
    "reset and discard",
    [
      { name: "RESET app.current_tenant_id", sql: `RESET app.current_tenant_id`, guard: "refuses", server: "ok", after: null },
      { name: "RESET ALL", sql: `RESET ALL`, guard: "refuses", server: "ok", after: null },
      { name: "DISCARD ALL", sql: `DISCARD ALL`, guard: "refuses", server: "ok", after: null },
    ],
  ],
  [
    "dynamic SQL in DO blocks",
    [
      {
        name: "DO: PERFORM set_config('app.current_tenant_id', 'tenant_b', false)",
        sql: `DO $$ BEGIN PERFORM set_config('app.current_tenant_id', 'tenant_b', false); END $$`,
        guard: "refuses",
        server: "ok",
        after: null,
      },
      {
        name: "DO LANGUAGE plpgsql '…' (single-quoted body): PERFORM set_config(…)",
        sql: `DO LANGUAGE plpgsql 'BEGIN PERFORM set_config(''app.current_tenant_id'', ''tenant_b'', false); END'`,
        guard: "refuses",
        server: "ok",
        after: null,
      },
      {
        name: "DO: PERFORM set_config('role', 'postgres', false)",
        sql: `DO $$ BEGIN PERFORM set_config('role', 'postgres', false); END $$`,
        guard: "refuses",
        server: PERMISSION_DENIED_ROLE,
        after: TENANT_A,
      },
      {
        name: "DO: SET app.current_tenant_id as the block's first statement",
        sql: `DO $$ BEGIN SET app.current_tenant_id = 'tenant_b'; END $$`,
        guard: "refuses",
        server: "ok",
        after: null,
      },
      {
        name: "DO: SET ROLE postgres as the block's first statement",
        sql: `DO $$ BEGIN SET ROLE postgres; END $$`,
        guard: "refuses",
        server: PERMISSION_DENIED_ROLE,
        after: TENANT_A,
      },
      {
        name: "DO: RESET ALL after another statement",
        sql: `DO $$ BEGIN PERFORM 1; RESET ALL; END $$`,
        guard: "refuses",
        server: "ok",
        after: null,
      },
      {
        name: "DO: EXECUTE 'SET app.current_tenant_id = ''tenant_b'''",
        sql: `DO $$ BEGIN EXECUTE 'SET app.current_tenant_id = ''tenant_b'''; END $$`,
        guard: "blind",
        server: "ok",
        after: null,
      },
      {
        name: "DO: EXECUTE format('SET %I.%I = %L', 'app', 'current_tenant_id', 'tenant_b')",
        sql: `DO $$ BEGIN EXECUTE format('SET %I.%I = %L', 'app', 'current_tenant_id', 'tenant_b'); END $$`,
        guard: "blind",
        server: "ok",
        after: null,
      },
      {
        name: "DO: EXECUTE 'SET ' || 'ROLE postgres'",
        sql: `DO $$ BEGIN EXECUTE 'SET ' || 'ROLE postgres'; END $$`,
        guard: "blind",
        server: PERMISSION_DENIED_ROLE,
        after: TENANT_A,
      },
      {
        name: "DO: EXECUTE 'RE' || 'SET ALL'",
        sql: `DO $$ BEGIN EXECUTE 'RE' || 'SET ALL'; END $$`,
        guard: "blind",
        server: "ok",
        after: null,
      },
      {
        name: "DO: set_config with the name and value from variables",
        sql: `DO $$ DECLARE n text := 'app.' || 'current_tenant_id'; BEGIN PERFORM set_config(n, 'tenant_b', false); END $$`,
        guard: "blind",
        server: "ok",
        after: null,
      },
    ],
  ],
];

// ------------------------------------------------------------ the suites

const MODES = [
  { name: "guard on", guard: true, proxy: () => proxies.on! },
  { name: "guard off (the database check alone)", guard: false, proxy: () => proxies.off! },
] as const;

for (const mode of MODES) {
  describe(mode.name, () => {
    const tenantUrl = (tenant: string, user: string = APP_USER) =>
      mode.proxy().url({ user: `${user}.${tenant}`, password: PASSWORDS[user as keyof typeof PASSWORDS] });
    const asTenantA = <T>(fn: (sql: Client) => Promise<T>) => withClient(tenantUrl(TENANT_A), fn);

    test("baseline: tenant_a sees exactly its rows, and tenant_b's rows exist", async () => {
      await asTenantA((sql) => expectIsolated(sql, TENANT_A));
      await withClient(tenantUrl(TENANT_B), async (sql) => {
        expect((await observe(sql)).rows).toEqual(NOTES.tenant_b.map(() => TENANT_B));
      });
    });

    /** Whether the guard refused this; the guard-off proxy never may. */
    function refusedByGuard(o: Outcome): boolean {
      const refused = !o.ok && o.message.startsWith("multigres:");
      if (refused) {
        expect(mode.guard).toBe(true);
        expectGuardRefusal(o);
      }
      return refused;
    }

    /**
     * Run a single-statement attempt the way the table says. The promise is
     * checked first (zero tenant_b rows, whatever the guard did), then
     * whether the guard refused what it must.
     */
    async function attempt(sql: Client, a: Pick<Attempt, "guard" | "server" | "after">, run: () => PromiseLike<unknown>): Promise<void> {
      const o = await outcome(run);
      const refused = refusedByGuard(o);
      if (!refused) expectServer(o, a.server);
      await expectIsolated(sql, refused ? TENANT_A : a.after);
      if (mode.guard && a.guard === "refuses") expectGuardRefusal(o);
    }

    for (const [threat, attempts] of GROUPS) {
      describe(threat, () => {
        for (const a of attempts) {
          test(a.name, () => asTenantA((sql) => attempt(sql, a, () => sql.unsafe(a.sql))));
        }
      });
    }

    describe("forging the tenant setting", () => {
      test("SET LOCAL app.current_tenant_id inside a transaction", () =>
        asTenantA(async (sql) => {
          await sql.unsafe("BEGIN");
          const o = await outcome(() => sql.unsafe(`SET LOCAL app.current_tenant_id = 'tenant_b'`));
          if (mode.guard) {
            expectGuardRefusal(o);
            expect(show(await outcome(() => observe(sql)))).toMatch(/^25P02 /);
          } else {
            expectServer(o, "ok");
            await expectIsolated(sql, null);
          }
          await sql.unsafe("ROLLBACK");
          await expectIsolated(sql, TENANT_A);
        }));

      test("set_config('app.current_tenant_id', 'tenant_b', true) inside a transaction, read in it", () =>
        asTenantA(async (sql) => {
          await sql.unsafe("BEGIN");
          const o = await outcome(() => sql.unsafe(`select set_config('app.current_tenant_id', 'tenant_b', true)`));
          if (mode.guard) {
            expectGuardRefusal(o);
            expect(show(await outcome(() => observe(sql)))).toMatch(/^25P02 /);
            await sql.unsafe("ROLLBACK");
          } else {
            expectServer(o, "ok");
            await expectIsolated(sql, null);
            await sql.unsafe("COMMIT");
          }
          await expectIsolated(sql, TENANT_A);
        }));
    });

    describe("forging the signature setting", () => {
      test("the signature copied from a live tenant_b session (pid binding)", async () => {
        const b = await tenantBSignature(mode.proxy());
        await asTenantA(async (sql) => {
          const [{ pid }] = (await sql.unsafe(`SELECT pg_backend_pid() AS pid`)) as unknown as [{ pid: number }];
          expect(pid).not.toBe(b.pid);
          const o = await outcome(() =>
            sql.unsafe(`SET app.current_tenant_id = 'tenant_b'; SET app.current_tenant_id_sig = '${b.sig}'`),
          );
          if (mode.guard) {
            expectGuardRefusal(o);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(o, "ok");
            const [s] = await rows(sql, `SELECT current_setting('app.current_tenant_id') AS t, current_setting('app.current_tenant_id_sig') AS sig`);
            expect(s).toEqual({ t: TENANT_B, sig: b.sig });
            await expectIsolated(sql, null);
          }
        });
      });

      test("the copied tenant_b signature set with bind parameters (names the guard cannot read: refused as such)", async () => {
        const b = await tenantBSignature(mode.proxy());
        await asTenantA(async (sql) => {
          const o = await outcome(
            () => sql`SELECT set_config(${"app.current_tenant_id"}, ${TENANT_B}, false), set_config(${"app.current_tenant_id_sig"}, ${b.sig}, false)`,
          );
          if (mode.guard) {
            expectGuardRefusal(o);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(o, "ok");
            await expectIsolated(sql, null);
          }
        });
      });

      test("a signature for tenant_b on this very backend under a guessed key", () =>
        asTenantA(async (sql) => {
          const { binding } = await bindingOf(sql);
          for (const forged of [
            sign(contextKey("not-the-secret-but-long-enough-0123456789"), TENANT_B, binding),
            sign(new TextEncoder().encode("multigres-test-context-secret-0123456789"), TENANT_B, binding), // the secret itself as the key
            createHash("sha256").update(`${TENANT_B}/${binding}`).digest("hex"), // no key at all
          ]) {
            const o = await outcome(() => sql`SELECT set_config('app.current_tenant_id', ${TENANT_B}, false), set_config('app.current_tenant_id_sig', ${forged}, false)`);
            if (mode.guard) {
              expectGuardRefusal(o);
              await expectIsolated(sql, TENANT_A);
            } else {
              expectServer(o, "ok");
              await expectIsolated(sql, null);
            }
          }
        }));
    });

    describe("functions", () => {
      test("a pg_temp function that calls set_config('app.current_tenant_id', …)", () =>
        asTenantA(async (sql) => {
          const created = await outcome(() =>
            sql.unsafe(`CREATE FUNCTION pg_temp.escape() RETURNS void LANGUAGE plpgsql AS $$
              BEGIN PERFORM set_config('app.current_tenant_id', 'tenant_b', false); END $$`),
          );
          const called = await outcome(() => sql.unsafe(`SELECT pg_temp.escape()`));
          if (mode.guard) {
            expectGuardRefusal(created);
            expect(show(called)).toMatch(NEVER_CREATED);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(created, "ok");
            expectServer(called, "ok");
            await expectIsolated(sql, null);
          }
        }));

      test("a pg_temp SQL function whose body is SET ROLE postgres", () =>
        asTenantA(async (sql) => {
          const created = await outcome(() =>
            sql.unsafe(`CREATE FUNCTION pg_temp.escape_role() RETURNS void LANGUAGE sql AS 'SET ROLE postgres'`),
          );
          const called = await outcome(() => sql.unsafe(`SELECT pg_temp.escape_role()`));
          if (mode.guard) {
            expectGuardRefusal(created);
            expect(show(called)).toMatch(NEVER_CREATED);
          } else {
            expectServer(created, "ok");
            expectServer(called, PERMISSION_DENIED_ROLE);
          }
          await expectIsolated(sql, TENANT_A);
        }));

      test("a pg_temp plpgsql function whose first statement is SET app.current_tenant_id", () =>
        asTenantA(async (sql) => {
          const created = await outcome(() =>
            sql.unsafe(`CREATE FUNCTION pg_temp.escape_set() RETURNS void LANGUAGE plpgsql AS $$
              BEGIN SET app.current_tenant_id = 'tenant_b'; END $$`),
          );
          const called = await outcome(() => sql.unsafe(`SELECT pg_temp.escape_set()`));
          if (refusedByGuard(created)) {
            expect(show(called)).toMatch(NEVER_CREATED);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(created, "ok");
            expectServer(called, "ok");
            await expectIsolated(sql, null);
          }
          if (mode.guard) expectGuardRefusal(created);
        }));

      test(`a function app_user creates in its own schema, with dynamic SQL (guard cannot see)`, () =>
        asTenantA(async (sql) => {
          const fn = `${FN_SCHEMA}.forge_${mode.guard ? "on" : "off"}`;
          expectServer(
            await outcome(() =>
              sql.unsafe(`CREATE OR REPLACE FUNCTION ${fn}(t text) RETURNS void LANGUAGE plpgsql AS $$
                BEGIN EXECUTE format('SET %s = %L', 'app.' || 'current_tenant_id', t); END $$`),
            ),
            "ok",
          );
          expectServer(await outcome(() => sql.unsafe(`SELECT ${fn}('tenant_b')`)), "ok");
          expect((await sql.unsafe(`SELECT current_setting('app.current_tenant_id') AS t`))[0]!.t).toBe(TENANT_B);
          await expectIsolated(sql, null);
        }));

      test("a SECURITY DEFINER function app_user creates (it runs as app_user anyway)", () =>
        asTenantA(async (sql) => {
          const fn = `${FN_SCHEMA}.definer_${mode.guard ? "on" : "off"}`;
          expectServer(
            await outcome(() =>
              sql.unsafe(`CREATE OR REPLACE FUNCTION ${fn}() RETURNS SETOF text LANGUAGE plpgsql SECURITY DEFINER AS $$
                BEGIN EXECUTE 'SET ' || 'app.current_tenant_id = ''tenant_b'''; RETURN QUERY SELECT tenant_id FROM public.notes; END $$`),
            ),
            "ok",
          );
          const rows = await sql.unsafe(`SELECT * FROM ${fn}()`);
          expect(rows.map((r) => Object.values(r)[0])).toEqual([]);
          await expectIsolated(sql, null);
        }));

      test("a function SET clause: CREATE FUNCTION … SET app.current_tenant_id = 'tenant_b' reading notes", () =>
        asTenantA(async (sql) => {
          const created = await outcome(() =>
            sql.unsafe(`CREATE FUNCTION pg_temp.notes_as_b() RETURNS SETOF text LANGUAGE sql
              SET app.current_tenant_id = 'tenant_b' AS $$ SELECT tenant_id FROM public.notes $$`),
          );
          if (mode.guard && !created.ok && created.message.startsWith("multigres:")) {
            expectGuardRefusal(created);
          } else if (!created.ok) {
            expectServer(created, PERMISSION_DENIED_PARAMETER);
          } else {
            // Where the server allows the clause, the call runs with the forged tenant and no valid signature.
            const rows = await sql.unsafe(`SELECT pg_temp.notes_as_b() AS tenant_id`);
            expect(rows.map((r) => r.tenant_id)).toEqual([]);
          }
          await expectIsolated(sql, TENANT_A); // a SET clause ends with the call
        }));

      test("ALTER FUNCTION … SET app.current_tenant_id and the copied tenant_b signature", async () => {
        const b = await tenantBSignature(mode.proxy());
        await asTenantA(async (sql) => {
          await sql.unsafe(`CREATE FUNCTION pg_temp.notes_seen() RETURNS SETOF text LANGUAGE sql AS $$ SELECT tenant_id FROM public.notes $$`);
          const altered = await outcome(() =>
            sql.unsafe(`ALTER FUNCTION pg_temp.notes_seen() SET app.current_tenant_id = 'tenant_b';
                        ALTER FUNCTION pg_temp.notes_seen() SET app.current_tenant_id_sig = '${b.sig}'`),
          );
          if (mode.guard && !altered.ok && altered.message.startsWith("multigres:")) {
            expectGuardRefusal(altered);
          } else if (!altered.ok) {
            expectServer(altered, PERMISSION_DENIED_PARAMETER);
          } else {
            const rows = await sql.unsafe(`SELECT pg_temp.notes_seen() AS tenant_id`);
            expect(rows.map((r) => r.tenant_id)).toEqual([]);
          }
          await expectIsolated(sql, TENANT_A);
        });
      });

      test("shadowing current_tenant_id() on the search_path (the policy is bound to public.current_tenant_id)", () =>
        asTenantA(async (sql) => {
          const schema = FN_SCHEMA;
          await sql.unsafe(`CREATE OR REPLACE FUNCTION ${schema}.current_tenant_id() RETURNS text LANGUAGE sql AS $$ SELECT 'tenant_b'::text $$`);
          await sql.unsafe(`SET search_path = ${schema}, public`);
          expect((await sql.unsafe(`SELECT current_tenant_id() AS t`))[0]!.t).toBe(TENANT_B); // the shadow resolves
          await expectIsolated(sql, TENANT_A); // … and changes nothing
        }));
    });

    describe("PREPARE/EXECUTE", () => {
      test("PREPARE p AS SELECT set_config('app.current_tenant_id', 'tenant_b', false); EXECUTE p", () =>
        asTenantA(async (sql) => {
          const prepared = await outcome(() => sql.unsafe(`PREPARE p AS SELECT set_config('app.current_tenant_id', 'tenant_b', false)`));
          const executed = await outcome(() => sql.unsafe(`EXECUTE p`));
          if (mode.guard) {
            expectGuardRefusal(prepared);
            expect(show(executed)).toMatch(/^26000 /); // p was never prepared
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(prepared, "ok");
            expectServer(executed, "ok");
            await expectIsolated(sql, null);
          }
        }));

      test("PREPARE p AS SELECT set_config('role', 'postgres', false); EXECUTE p", () =>
        asTenantA(async (sql) => {
          const prepared = await outcome(() => sql.unsafe(`PREPARE p AS SELECT set_config('role', 'postgres', false)`));
          const executed = await outcome(() => sql.unsafe(`EXECUTE p`));
          if (mode.guard) {
            expectGuardRefusal(prepared);
            expect(show(executed)).toMatch(/^26000 /);
          } else {
            expectServer(prepared, "ok");
            expectServer(executed, PERMISSION_DENIED_ROLE);
          }
          await expectIsolated(sql, TENANT_A);
        }));

      test("PREPARE q(text, text) AS SELECT set_config($1, $2, false); EXECUTE q('app.current_tenant_id', 'tenant_b')", () =>
        asTenantA(async (sql) => {
          const prepared = await outcome(() => sql.unsafe(`PREPARE q(text, text) AS SELECT set_config($1, $2, false)`));
          const executed = await outcome(() => sql.unsafe(`EXECUTE q('app.current_tenant_id', 'tenant_b')`));
          if (mode.guard) {
            // A name the guard cannot read is refused at PREPARE.
            expectGuardRefusal(prepared);
            expect(show(executed)).toMatch(/^26000 /);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(prepared, "ok");
            expectServer(executed, "ok");
            await expectIsolated(sql, null);
          }
        }));
    });

    describe("multi-statement queries", () => {
      test("select 1; set app.current_tenant_id = 'tenant_b'; select * from notes", () =>
        asTenantA(async (sql) => {
          const o = await outcome(() => sql.unsafe(`select 1; set app.current_tenant_id = 'tenant_b'; select * from notes`));
          if (mode.guard) {
            expectGuardRefusal(o);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(o, "ok");
            // postgres.js returns one result per statement that has rows (the SET has none).
            const results = (o as { result: Array<unknown[] & { command: string }> }).result;
            expect([...results[0]!]).toEqual([{ "?column?": 1 }] as unknown[]);
            const read = results.at(-1)!;
            expect(read.command).toBe("SELECT");
            expect([...read]).toEqual([]); // the read inside the same Query already sees nothing
            await expectIsolated(sql, null);
          }
        }));

      test("select 1; set role postgres; select * from notes", () =>
        asTenantA(async (sql) => {
          const o = await outcome(() => sql.unsafe(`select 1; set role postgres; select * from notes`));
          if (mode.guard) expectGuardRefusal(o);
          else expectServer(o, PERMISSION_DENIED_ROLE);
          await expectIsolated(sql, TENANT_A);
        }));

      test("the forbidden statement hidden after a comment and a string: select '--'; /* ; */ reset all", () =>
        asTenantA(async (sql) => {
          const o = await outcome(() => sql.unsafe(`select '--'; /* ; */ reset all`));
          if (mode.guard) expectGuardRefusal(o);
          else expectServer(o, "ok");
          await expectIsolated(sql, mode.guard ? TENANT_A : null);
        }));

      test("psql -c 'select 1; set app.current_tenant_id = …; select count(*) from notes where tenant_id = …'", async () => {
        const r = await psql(
          tenantUrl(TENANT_A),
          `select 1; set app.current_tenant_id = 'tenant_b'; select count(*) from notes where tenant_id = 'tenant_b'`,
        );
        if (mode.guard) {
          expect(r.exitCode, describeRun(r)).not.toBe(0);
          expect(r.stderr).toContain("multigres: ");
          expect(r.stdout.trim()).toBe("");
        } else {
          expect(r.exitCode, describeRun(r)).toBe(0);
          expect(r.stdout.trim().split("\n").at(-1)).toBe("0");
        }
      });

      test("standard_conforming_strings = off, then select 'a\\'' ; set app.current_tenant_id = 'tenant_b'; --'", () =>
        asTenantA(async (sql) => {
          // With the setting off the server reads 'a\'' as the string a' and
          // the SET as a second statement; with it on, it is all one string.
          expectServer(await outcome(() => sql.unsafe(`SET standard_conforming_strings = off`)), "ok");
          const o = await outcome(() => sql.unsafe(`select 'a\\'' ; set app.current_tenant_id = 'tenant_b'; --'`));
          if (mode.guard) {
            expectGuardRefusal(o);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(o, "ok");
            expect(show(await outcome(() => sql.unsafe(`SELECT current_setting('app.current_tenant_id') AS t`)))).toBe("ok");
            expect((await sql.unsafe(`SELECT current_setting('app.current_tenant_id') AS t`))[0]!.t).toBe(TENANT_B);
            await expectIsolated(sql, null);
          }
        }));
    });

    describe("extended protocol", () => {
      test("postgres.js with bind parameters: set_config(${'app.current_tenant_id'}, ${'tenant_b'}, false)", () =>
        asTenantA(async (sql) => {
          // The names are bind parameters: the guard cannot read them, so it
          // refuses them; without it, the database check must hold.
          const o = await outcome(() => sql`select set_config(${"app.current_tenant_id"}, ${TENANT_B}, false)`);
          if (mode.guard) {
            expectGuardRefusal(o);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(o, "ok");
            expect((await sql.unsafe(`SELECT current_setting('app.current_tenant_id') AS t`))[0]!.t).toBe(TENANT_B);
            await expectIsolated(sql, null);
          }
        }));

      test("postgres.js with bind parameters: set_config(${'role'}, ${'postgres'}, false)", () =>
        asTenantA(async (sql) => {
          const o = await outcome(() => sql`select set_config(${"role"}, ${"postgres"}, false)`);
          if (mode.guard) expectGuardRefusal(o);
          else expectServer(o, PERMISSION_DENIED_ROLE);
          await expectIsolated(sql, TENANT_A);
        }));

      test("a computed name: set_config(lower('APP.CURRENT_TENANT_ID_SIG'), …) and set_config(lower('ROLE'), 'none', false)", () =>
        asTenantA(async (sql) => {
          const sig = await outcome(() => sql.unsafe(`select set_config(lower('APP.CURRENT_TENANT_ID'), 'tenant_b', false), set_config(lower('APP.CURRENT_TENANT_ID_SIG'), 'x', false)`));
          const role = await outcome(() => sql.unsafe(`select set_config(lower('ROLE'), 'none', false)`));
          if (mode.guard) {
            expectGuardRefusal(sig);
            expectGuardRefusal(role);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(sig, "ok");
            await expectIsolated(sql, null);
          }
        }));

      test("Parse with the name as a literal: sql.unsafe(\"select set_config('app.current_tenant_id', 'tenant_b', false)\", [], { prepare: true })", () =>
        asTenantA(async (sql) => {
          const o = await outcome(() => sql.unsafe(`select set_config('app.current_tenant_id', 'tenant_b', false)`, [], { prepare: true }));
          if (mode.guard) {
            expectGuardRefusal(o);
            await expectIsolated(sql, TENANT_A);
          } else {
            expectServer(o, "ok");
            await expectIsolated(sql, null);
          }
        }));

      test("Parse with the name as a literal and the value a bind parameter: set_config('app.current_tenant_id', ${'tenant_b'}, false)", () =>
        asTenantA(async (sql) => {
          const o = await outcome(() => sql`select set_config('app.current_tenant_id', ${TENANT_B}, false)`);
          // The context first: whatever error came back, the statement must not have run.
          await expectIsolated(sql, mode.guard ? TENANT_A : null);
          if (mode.guard) expectGuardRefusal(o);
          else expectServer(o, "ok");
        }));

      test("Parse inside a transaction (postgres.js sql.begin): set_config('app.current_tenant_id', 'tenant_b', true)", () =>
        asTenantA(async (sql) => {
          let inside: Observed | undefined;
          const o = await outcome(() =>
            sql.begin(async (tx) => {
              await tx`select set_config('app.current_tenant_id', 'tenant_b', true)`;
              inside = await observe(tx as unknown as Client);
            }),
          );
          if (mode.guard) {
            expectGuardRefusal(o);
            expect(inside).toBeUndefined();
          } else {
            expectServer(o, "ok");
            expect(inside).toEqual({ rows: [], tenant: null, usr: APP_USER });
          }
          await expectIsolated(sql, TENANT_A);
        }));

      test("fast-path FunctionCall of set_config (oid 2078) with 'app.current_tenant_id', 'tenant_b'", async () => {
        const proxy = mode.proxy();
        const c = await RawClient.open(proxy.host, proxy.port, `${TRUST_USER}.${TENANT_A}`, pg.database);
        try {
          const reply = await c.functionCall(2078, ["app.current_tenant_id", TENANT_B, "false"]);
          if (mode.guard) {
            expect(reply.error ? `${reply.error.C} ${reply.error.M}` : "ok").toMatch(/^42501 multigres: /);
          } else {
            expect(reply.error).toBeUndefined();
            expect(reply.result).toBe(TENANT_B);
          }
          const rows = await c.query(`SELECT tenant_id FROM notes ORDER BY id`);
          const [ctx] = await c.query(`SELECT public.current_tenant_id(), current_user`);
          const [tenant, usr] = ctx!;
          expect(rows.flat().filter((t) => t === TENANT_B)).toEqual([]);
          expect({ rows: rows.flat(), tenant, usr }).toEqual(
            mode.guard ? { rows: TENANT_A_ROWS, tenant: TENANT_A, usr: TRUST_USER } : { rows: [], tenant: null, usr: TRUST_USER },
          );
        } finally {
          c.close();
        }
      });
    });

    describe("persistent role defaults (ALTER ROLE … SET)", () => {
      test("ALTER ROLE app_user SET app.current_tenant_id = 'tenant_b', then new connections", async () => {
        try {
          const o = await asTenantA((sql) => outcome(() => sql.unsafe(`ALTER ROLE ${APP_USER} SET app.current_tenant_id = 'tenant_b'`)));
          if (mode.guard) expectGuardRefusal(o);
          else expectServer(o, /^(ok$|42501 permission denied to set parameter "app\.current_tenant_id")/);
          // Whatever the role default now says: the proxy's context wins …
          await asTenantA((sql) => expectIsolated(sql, TENANT_A));
          // … and without the proxy there is no valid context at all.
          await withClient(pg.url({ user: APP_USER, password: appPw }), (sql) => expectIsolated(sql, null));
        } finally {
          await pg.sql.unsafe(`ALTER ROLE ${APP_USER} RESET app.current_tenant_id`);
        }
      });
    });

    describe("disabling row-level security", () => {
      test("SET row_security = off makes the read fail (42501), not return rows", () =>
        asTenantA(async (sql) => {
          expectServer(await outcome(() => sql.unsafe(`SET row_security = off`)), "ok");
          expect(show(await outcome(() => sql.unsafe(`SELECT tenant_id FROM notes`)))).toMatch(/^42501 query would be affected by row-level security policy/);
          await sql.unsafe(`RESET row_security`);
          await expectIsolated(sql, TENANT_A);
        }));

      test("ALTER TABLE notes DISABLE ROW LEVEL SECURITY / DROP POLICY are refused (not the owner)", () =>
        asTenantA(async (sql) => {
          for (const stmt of [
            `ALTER TABLE notes DISABLE ROW LEVEL SECURITY`,
            `ALTER TABLE notes NO FORCE ROW LEVEL SECURITY`,
            `DROP POLICY multigres_tenant_isolation ON notes`,
            `CREATE POLICY escape ON notes USING (true)`,
          ]) {
            expect(show(await outcome(() => sql.unsafe(stmt)))).toMatch(/^42501 must be owner of (table|relation) notes/);
          }
          await expectIsolated(sql, TENANT_A);
        }));
    });

    describe("startup parameters", () => {
      const FORBIDDEN: Array<[string, Record<string, string>]> = [
        ["app.current_tenant_id=tenant_b", { "app.current_tenant_id": TENANT_B }],
        ["app.current_tenant_id_sig=…", { "app.current_tenant_id_sig": "ab".repeat(32) }],
        ["role=postgres", { role: "postgres" }],
        ["Role=postgres (case)", { Role: "postgres" }],
        ["session_authorization=postgres", { session_authorization: "postgres" }],
        ["options=-c app.current_tenant_id=tenant_b", { options: "-c app.current_tenant_id=tenant_b" }],
        ["options=-c role=postgres", { options: "-c role=postgres" }],
        ["options=-c session_authorization=postgres", { options: "-c session_authorization=postgres" }],
        ["options=-capp.current_tenant_id=tenant_b", { options: "-capp.current_tenant_id=tenant_b" }],
        ["options=--app.current_tenant_id=tenant_b", { options: "--app.current_tenant_id=tenant_b" }],
        ["options=-c app.current-tenant-id=tenant_b (dashes)", { options: "-c app.current-tenant-id=tenant_b" }],
        ["options=-c APP.Current_Tenant_Id=tenant_b (case)", { options: "-c APP.Current_Tenant_Id=tenant_b" }],
        ["options=-c search_path=public -c role=postgres (second)", { options: "-c search_path=public -c role=postgres" }],
        ["options=-c app.current_tenant_id_sig=… ", { options: `-c app.current_tenant_id_sig=${"ab".repeat(32)}` }],
      ];
      for (const [name, connection] of FORBIDDEN) {
        test(`postgres.js startup parameter ${name}: 28000`, async () => {
          const err = await connectError(tenantUrl(TENANT_A), { connection });
          expect(`${err.code} ${err.message}`).toMatch(/^28000 startup parameter .* is not allowed/);
        });
      }

      test("psql with options=-c app.current_tenant_id=tenant_b in the connection string", async () => {
        const url = `${tenantUrl(TENANT_A)}?options=${encodeURIComponent("-c app.current_tenant_id=tenant_b")}`;
        const r = await psql(url, "SELECT tenant_id FROM notes");
        expect(r.exitCode, describeRun(r)).not.toBe(0);
        expect(r.stderr).toMatch(/startup parameter options \(-c app\.current_tenant_id\) is not allowed/);
        expect(r.stdout).toBe("");
      });

      test("psql with PGOPTIONS='-c role=postgres'", async () => {
        const r = await psql(tenantUrl(TENANT_A), "SELECT tenant_id FROM notes", { env: { PGOPTIONS: "-c role=postgres" } });
        expect(r.exitCode, describeRun(r)).not.toBe(0);
        expect(r.stderr).toMatch(/startup parameter options \(-c role\) is not allowed/);
        expect(r.stdout).toBe("");
      });

      test("harmless startup parameters still connect (application_name, options=-c search_path=public)", async () => {
        await withClient(
          tenantUrl(TENANT_A),
          (sql) => expectIsolated(sql, TENANT_A),
          { connection: { application_name: "escape-test", options: "-c search_path=public" } },
        );
      });
    });
  });
}

describe("direct connection without the proxy", () => {
  const direct = <T>(fn: (sql: Client) => Promise<T>, options = {}) =>
    withClient(pg.url({ user: APP_USER, password: appPw }), fn, options);

  const forge = (sql: Client, sig: string) =>
    sql`SELECT set_config('app.current_tenant_id', ${TENANT_B}, false), set_config('app.current_tenant_id_sig', ${sig}, false)`;

  const backendPid = async (sql: Client) => (await bindingOf(sql)).pid;
  const backendBinding = async (sql: Client) => (await bindingOf(sql)).binding;

  test("SET app.current_tenant_id = 'tenant_b' alone: zero rows", () =>
    direct(async (sql) => {
      await sql.unsafe(`SET app.current_tenant_id = 'tenant_b'`);
      expect((await sql.unsafe(`SELECT current_setting('app.current_tenant_id') AS t`))[0]!.t).toBe(TENANT_B);
      await expectIsolated(sql, null);
    }));

  test("the tenant plus every signature app_user can invent: zero rows", () =>
    direct(async (sql) => {
      const binding = await backendBinding(sql);
      for (const sig of [
        "ab".repeat(32),
        "",
        sign(contextKey("not-the-secret-but-long-enough-0123456789"), TENANT_B, binding),
        sign(new TextEncoder().encode("multigres-test-context-secret-0123456789"), TENANT_B, binding),
        createHash("sha256").update(`${TENANT_B}/${binding}`).digest("hex"),
        sign(contextKey(), TENANT_B, binding).toUpperCase(), // right bytes, wrong spelling: still no
      ]) {
        await forge(sql, sig);
        await expectIsolated(sql, null);
      }
    }));

  test("the tenant plus the signature copied from a live tenant_b session: zero rows", async () => {
    const b = await tenantBSignature(proxies.on!);
    await direct(async (sql) => {
      expect(await backendPid(sql)).not.toBe(b.pid);
      await forge(sql, b.sig);
      await expectIsolated(sql, null);
    });
  });

  test("options=-c app.current_tenant_id=tenant_b -c app.current_tenant_id_sig=<copied> at startup: zero rows", async () => {
    const b = await tenantBSignature(proxies.on!);
    await direct(
      async (sql) => {
        expect((await sql.unsafe(`SELECT current_setting('app.current_tenant_id') AS t`))[0]!.t).toBe(TENANT_B);
        await expectIsolated(sql, null);
      },
      { connection: { options: `-c app.current_tenant_id=${TENANT_B} -c app.current_tenant_id_sig=${b.sig}` } },
    );
  });

  test("the keys cannot be read, added or replaced, and the verifier cannot be replaced (42501)", () =>
    direct(async (sql) => {
      const attempts = [
        `SELECT * FROM multigres.context_keys`,
        `SELECT * FROM multigres.meta`,
        `INSERT INTO multigres.context_keys (key_id, inner_pad, outer_pad) VALUES ('x', decode(repeat('00', 64), 'hex'), decode(repeat('00', 64), 'hex'))`,
        `DELETE FROM multigres.context_keys`,
        `SELECT multigres.add_context_key(decode(repeat('11', 32), 'hex'))`,
        `CREATE OR REPLACE FUNCTION multigres.current_tenant_id() RETURNS text LANGUAGE sql AS $$ SELECT 'tenant_b'::text $$`,
        `CREATE OR REPLACE FUNCTION public.current_tenant_id() RETURNS text LANGUAGE sql AS $$ SELECT 'tenant_b'::text $$`,
        `ALTER FUNCTION multigres.current_tenant_id() SECURITY INVOKER`,
      ];
      for (const stmt of attempts) {
        expect(`${stmt} → ${show(await outcome(() => sql.unsafe(stmt)))}`).toMatch(/ → 42501 (permission denied|must be owner)/);
      }
      await expectIsolated(sql, null);
    }));

  test("a signature replayed into a backend with the same pid and a different start (a reused pid): zero rows", () =>
    direct(async (sql) => {
      // Made with the real key, as if read from a log when an earlier backend
      // had this pid: everything matches but the start time.
      const { pid, binding } = await bindingOf(sql);
      const start = Number(binding.split("/")[1]);
      for (const earlier of [start - 1, start - 60_000_000, 0]) {
        await forge(sql, sign(contextKey(), TENANT_B, `${pid}/${earlier}`));
        await expectIsolated(sql, null);
      }
      // The pid alone, as signatures were bound before 0.3: no.
      await forge(sql, createHmac("sha256", contextKey()).update(`${TENANT_B}/${pid}`).digest("hex"));
      await expectIsolated(sql, null);
    }));

  test("control: with the secret (which only the proxy has) the same forgery does show tenant_b", () =>
    direct(async (sql) => {
      await forge(sql, sign(contextKey(), TENANT_B, await backendBinding(sql)));
      const seen = await observe(sql);
      expect(seen).toEqual({ rows: NOTES.tenant_b.map(() => TENANT_B), tenant: TENANT_B, usr: APP_USER });
    }));
});

// ---------------------------------------------------------------------------

/**
 * A bare protocol-3 client for what postgres.js cannot send: the fast-path
 * FunctionCall message. Authenticates with the user's harness password
 * (test/harness/scram.ts), no TLS.
 */
class RawClient {
  private buf = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  private ended = false;

  private constructor(private readonly sock: Socket) {
    sock.on("data", (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake?.();
    });
    sock.on("close", () => {
      this.ended = true;
      this.wake?.();
    });
    sock.on("error", () => {});
  }

  static async open(host: string, port: number, user: string, database: string): Promise<RawClient> {
    const sock = netConnect({ host, port });
    await new Promise<void>((res, rej) => {
      sock.once("connect", res);
      sock.once("error", rej);
    });
    const c = new RawClient(sock);
    const params = Buffer.from(`user\0${user}\0database\0${database}\0\0`);
    const head = Buffer.alloc(8);
    head.writeInt32BE(8 + params.length, 0);
    head.writeInt32BE(196608, 4);
    sock.write(Buffer.concat([head, params]));
    await authenticateToReady(() => c.next(), async (b) => void sock.write(b), passwordFor(user), user);
    return c;
  }

  async next(): Promise<{ type: string; body: Buffer }> {
    for (;;) {
      if (this.buf.length >= 5) {
        const len = this.buf.readInt32BE(1);
        if (this.buf.length >= 1 + len) {
          const msg = { type: String.fromCharCode(this.buf[0]!), body: Buffer.from(this.buf.subarray(5, 1 + len)) };
          this.buf = this.buf.subarray(1 + len);
          return msg;
        }
      }
      if (this.ended) throw new Error("connection closed");
      await new Promise<void>((res) => (this.wake = res));
      this.wake = undefined;
    }
  }

  private async untilReady(): Promise<Array<{ type: string; body: Buffer }>> {
    const out: Array<{ type: string; body: Buffer }> = [];
    for (;;) {
      const m = await this.next();
      out.push(m);
      if (m.type === "Z") return out;
    }
  }

  private send(type: string, payload: Buffer): void {
    const head = Buffer.alloc(5);
    head.write(type, 0, "latin1");
    head.writeInt32BE(4 + payload.length, 1);
    this.sock.write(Buffer.concat([head, payload]));
  }

  /** FunctionCall with text arguments and a text result. */
  async functionCall(oid: number, args: string[]): Promise<{ result?: string | null; error?: Record<string, string> }> {
    const parts: Buffer[] = [];
    const int32 = (n: number) => {
      const b = Buffer.alloc(4);
      b.writeInt32BE(n);
      return b;
    };
    const int16 = (n: number) => {
      const b = Buffer.alloc(2);
      b.writeInt16BE(n);
      return b;
    };
    parts.push(int32(oid), int16(1), int16(0), int16(args.length));
    for (const a of args) {
      const v = Buffer.from(a);
      parts.push(int32(v.length), v);
    }
    parts.push(int16(0));
    this.send("F", Buffer.concat(parts));
    const reply: { result?: string | null; error?: Record<string, string> } = {};
    for (const m of await this.untilReady()) {
      if (m.type === "E") reply.error = fields(m.body);
      if (m.type === "V") {
        const len = m.body.readInt32BE(0);
        reply.result = len < 0 ? null : m.body.subarray(4, 4 + len).toString();
      }
    }
    return reply;
  }

  /** Simple Query; returns the text rows, throws on ErrorResponse. */
  async query(sql: string): Promise<Array<Array<string | null>>> {
    this.send("Q", Buffer.from(`${sql}\0`));
    const rows: Array<Array<string | null>> = [];
    let error: Record<string, string> | undefined;
    for (const m of await this.untilReady()) {
      if (m.type === "E") error = fields(m.body);
      if (m.type === "D") {
        const n = m.body.readInt16BE(0);
        const row: Array<string | null> = [];
        let at = 2;
        for (let i = 0; i < n; i++) {
          const len = m.body.readInt32BE(at);
          at += 4;
          row.push(len < 0 ? null : m.body.subarray(at, at + len).toString());
          if (len > 0) at += len;
        }
        rows.push(row);
      }
    }
    if (error) throw new Error(`${error.C} ${error.M}`);
    return rows;
  }

  close(): void {
    this.send("X", Buffer.alloc(0));
    this.sock.end();
  }
}

function fields(body: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let at = 0;
  while (at < body.length && body[at] !== 0) {
    const code = String.fromCharCode(body[at]!);
    const end = body.indexOf(0, at + 1);
    out[code] = body.subarray(at + 1, end).toString();
    at = end + 1;
  }
  return out;
}
