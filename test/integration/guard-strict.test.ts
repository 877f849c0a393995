/**
 * --guard strict (issue 10, part 3) through the compiled proxy against real
 * PostgreSQL: on top of what `on` refuses, tenant sessions get 42501 with a
 * hint for EXPLAIN ANALYZE in every spelling (its "Rows Removed by Filter"
 * counts the rows row-level security hides) and for LOCK above ROW
 * EXCLUSIVE (it stalls every tenant), also inside DO and function bodies;
 * plain EXPLAIN, ANALYZE false|off|0 and the weak lock modes run. With
 * `on` both run (and EXPLAIN ANALYZE shows the rows it filtered out), and
 * superusers are never held back.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import {
  APP_USER,
  NOTES,
  PASSWORDS,
  startPostgres,
  startProxyFor,
  SUPERUSER,
  TENANT_A,
  withClient,
  type Client,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";

setDefaultTimeout(120_000);

let pg: PgInstance;
let strict: ProxyHandle;
let on: ProxyHandle;

beforeAll(async () => {
  pg = await startPostgres();
  [strict, on] = await Promise.all([startProxyFor(pg, { args: ["--guard", "strict"] }), startProxyFor(pg)]);
});

afterAll(async () => {
  await Promise.all([strict?.stop(), on?.stop()]);
});

const asTenantA = <T>(p: ProxyHandle, fn: (sql: Client) => Promise<T>) =>
  withClient(p.url({ user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER] }), fn);

type Outcome = { ok: true; rows: Record<string, unknown>[] } | { ok: false; code: string | undefined; message: string; hint: string | undefined };

async function outcome(fn: () => PromiseLike<Iterable<unknown>>): Promise<Outcome> {
  try {
    return { ok: true, rows: [...(await fn())] as Record<string, unknown>[] };
  } catch (error) {
    const e = error as { code?: string; message?: string; hint?: string };
    return { ok: false, code: e.code, message: String(e.message ?? error), hint: e.hint };
  }
}
const show = (o: Outcome) => (o.ok ? "ok" : `${o.code} ${o.message}`);

function expectStrictRefusal(o: Outcome, what: RegExp): void {
  expect(show(o)).toMatch(/^42501 multigres: /);
  expect(show(o)).toMatch(what);
  expect((o as { hint?: string }).hint ?? "").toContain("--guard strict");
}

/** In a transaction (LOCK needs one), then rolled back; the session must still work. */
async function inTransaction(sql: Client, statement: string, prepare = false): Promise<Outcome> {
  await sql.unsafe("BEGIN");
  const o = await outcome(() => sql.unsafe(statement, [], { prepare }));
  await sql.unsafe("ROLLBACK");
  return o;
}

async function expectWorking(sql: Client): Promise<void> {
  const [row] = [...(await sql.unsafe(`SELECT public.current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes) AS n`))] as Record<string, unknown>[];
  expect(row).toEqual({ tenant: TENANT_A, n: NOTES.tenant_a.length });
}

const EXPLAIN_ANALYZE = [
  "EXPLAIN ANALYZE SELECT * FROM notes",
  "explain analyse select * from notes",
  "EXPLAIN ANALYZE VERBOSE SELECT * FROM notes",
  "EXPLAIN (ANALYZE) SELECT * FROM notes",
  "EXPLAIN (analyze true) SELECT * FROM notes",
  "EXPLAIN (ANALYZE on, FORMAT json) SELECT * FROM notes",
  "EXPLAIN (COSTS off, ANALYZE 1, BUFFERS) SELECT * FROM notes",
  `EXPLAIN ("analyze") SELECT * FROM notes`,
  "EXPLAIN (ANALYZE 'true') SELECT * FROM notes",
  "EXPLAIN (ANALYZE false, ANALYZE) SELECT * FROM notes",
  "/* why not */ Explain ( Analyse ) select 1",
];

const EXPLAIN_ALLOWED = [
  "EXPLAIN SELECT * FROM notes",
  "EXPLAIN VERBOSE SELECT * FROM notes",
  "EXPLAIN (ANALYZE false) SELECT * FROM notes",
  "EXPLAIN (ANALYZE off, COSTS off) SELECT * FROM notes",
  "EXPLAIN (ANALYZE 0) SELECT * FROM notes",
  "EXPLAIN (FORMAT json) SELECT * FROM notes",
  "SELECT 'EXPLAIN ANALYZE SELECT 1' AS s",
  "SELECT 1 AS one -- explain analyze",
];

const LOCKS_REFUSED = [
  "LOCK notes",
  "LOCK TABLE notes",
  "lock table only notes nowait",
  "LOCK TABLE notes IN SHARE UPDATE EXCLUSIVE MODE",
  "LOCK TABLE notes IN SHARE MODE",
  "LOCK notes IN SHARE ROW EXCLUSIVE MODE",
  "LOCK notes IN EXCLUSIVE MODE",
  "LOCK TABLE ONLY public.notes, notes * IN ACCESS EXCLUSIVE MODE NOWAIT",
];

const LOCKS_ALLOWED = ["LOCK TABLE notes IN ROW EXCLUSIVE MODE", "LOCK notes IN ROW SHARE MODE", "lock table only notes in access share mode nowait"];

/** SQL built at run time (DO blocks, new functions): refused whatever it holds, readable or not. */
const BODIES = [
  `DO $$ BEGIN LOCK notes; END $$`,
  `DO $$ BEGIN IF true THEN LOCK TABLE notes IN SHARE MODE; END IF; END $$`,
  `DO $$ DECLARE r record; BEGIN FOR r IN EXPLAIN ANALYZE SELECT * FROM notes LOOP RAISE NOTICE '%', r; END LOOP; END $$`,
  `DO $$ BEGIN EXECUTE 'LOCK ' || 'notes'; END $$`,
  `DO $$ BEGIN EXECUTE format('ALTER ROLE %I SET statement_timeout = 1', current_user); END $$`,
  // Refused before the server could say whether the role may create it.
  `CREATE FUNCTION strict_plan() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY EXPLAIN (ANALYZE) SELECT * FROM notes; END $$`,
  `CREATE OR REPLACE FUNCTION pg_temp.run(q text) RETURNS void LANGUAGE plpgsql AS $$ BEGIN EXECUTE q; END $$`,
  `CREATE PROCEDURE pg_temp.p() LANGUAGE sql AS 'SELECT 1'`,
];

describe("--guard strict refuses, for tenant sessions", () => {
  for (const sql of EXPLAIN_ANALYZE) {
    test(`${sql} (simple Query and Parse)`, () =>
      asTenantA(strict, async (c) => {
        expectStrictRefusal(await outcome(() => c.unsafe(sql)), /EXPLAIN ANALYZE/);
        expectStrictRefusal(await outcome(() => c.unsafe(sql, [], { prepare: true })), /EXPLAIN ANALYZE/);
        await expectWorking(c);
      }));
  }
  for (const sql of LOCKS_REFUSED) {
    test(`${sql} (in a transaction; simple Query and Parse)`, () =>
      asTenantA(strict, async (c) => {
        expectStrictRefusal(await inTransaction(c, sql), /LOCK in .* mode/);
        expectStrictRefusal(await inTransaction(c, sql, true), /LOCK in .* mode/);
        await expectWorking(c);
      }));
  }
  for (const sql of BODIES) {
    test(`SQL built at run time: ${sql}`, () =>
      asTenantA(strict, async (c) => {
        expectStrictRefusal(await outcome(() => c.unsafe(sql)), /multigres: (DO blocks|CREATE (FUNCTION|PROCEDURE)) (are|is) not allowed under --guard strict/);
        expectStrictRefusal(await outcome(() => c.unsafe(sql, [], { prepare: true })), /not allowed under --guard strict/);
        await expectWorking(c);
      }));
  }
});

describe("--guard strict lets through", () => {
  for (const sql of EXPLAIN_ALLOWED) {
    test(sql, () =>
      asTenantA(strict, async (c) => {
        const o = await outcome(() => c.unsafe(sql));
        expect(show(o)).toBe("ok");
        expect(JSON.stringify(o)).not.toContain("actual time");
      }));
  }
  for (const sql of LOCKS_ALLOWED) {
    test(`${sql} (in a transaction)`, () =>
      asTenantA(strict, async (c) => {
        expect(show(await inTransaction(c, sql))).toBe("ok");
        await expectWorking(c);
      }));
  }

  test("everything `on` lets through, and refuses what `on` refuses", () =>
    asTenantA(strict, async (c) => {
      expect(show(await outcome(() => c.unsafe("SELECT count(*) FROM notes")))).toBe("ok");
      expect(show(await outcome(() => c.unsafe("SET ROLE postgres")))).toMatch(/^42501 multigres: role/);
    }));

  test("superusers: EXPLAIN ANALYZE and LOCK run", () =>
    withClient(strict.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }), async (c) => {
      expect(show(await outcome(() => c.unsafe("EXPLAIN ANALYZE SELECT 1")))).toBe("ok");
      expect(show(await inTransaction(c, "LOCK notes"))).toBe("ok");
    }));
});

describe("--guard on lets them through", () => {
  test("EXPLAIN ANALYZE runs, and counts the rows row-level security filtered out (why strict refuses it)", () =>
    asTenantA(on, async (c) => {
      // A sequential scan, where the policy is a filter (the fixture's index would hide it).
      await c.unsafe("SET enable_indexscan = off; SET enable_bitmapscan = off");
      const o = await outcome(() => c.unsafe("EXPLAIN ANALYZE SELECT * FROM notes"));
      expect(show(o)).toBe("ok");
      expect(JSON.stringify(o)).toMatch(/Rows Removed by Filter: [1-9]/);
    }));

  test("LOCK … IN ACCESS EXCLUSIVE MODE runs", () =>
    asTenantA(on, async (c) => {
      expect(show(await inTransaction(c, "LOCK TABLE notes IN ACCESS EXCLUSIVE MODE NOWAIT"))).toBe("ok");
      expect(show(await inTransaction(c, "LOCK notes"))).toBe("ok");
      await expectWorking(c);
    }));

  test("the same in a DO block", () =>
    asTenantA(on, async (c) => {
      expect(show(await inTransaction(c, `DO $$ BEGIN LOCK notes IN SHARE MODE; END $$`))).toBe("ok");
    }));
});
