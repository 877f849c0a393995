/**
 * The proxy guard (defence in depth, DESIGN.md §2.5; issue 4 item 3),
 * through the compiled proxy with the guard on (the default), against real
 * PostgreSQL.
 *
 * Covers:
 * - false positives pass untouched, in simple Query and in Parse: the words
 *   inside string literals ('', E'', dollar-quoted, U&''), comments (line,
 *   block, nested), quoted identifiers (a table and column named "set role" /
 *   "reset all" in a test schema), other settings (set_config of
 *   application_name, SET statement_timeout / search_path, custom settings
 *   that merely start like the tenant setting), reading settings (SHOW role,
 *   current_setting), UPDATE … SET role, ON CONFLICT DO UPDATE SET role,
 *   RAISE NOTICE with the words in a DO block, DISCARD PLANS/TEMP; also
 *   through psql;
 * - a refusal is an ordinary server error: 42501, message "multigres: …",
 *   a hint, the session goes on; inside a transaction block it aborts the
 *   transaction (25P02 next) and ROLLBACK (or ROLLBACK TO SAVEPOINT)
 *   recovers with the context intact;
 * - Parse: postgres.js sql.unsafe("set role postgres", [], { prepare: true })
 *   gets 42501 (again from the cached statement), in a pipeline the queries
 *   around it still succeed;
 * - a Query larger than one TCP read is still inspected whole; one over
 *   --guard-max-statement that might change the context is refused (54000),
 *   one with none of the words passes, a larger limit reads it;
 * - ALTER/CREATE/DROP ROLE in its forms and set_config with a computed or
 *   bound name are refused (42501); a literal name with a bound value runs;
 * - the log says a statement was refused without echoing it;
 * - superuser sessions (no tenant) are not guarded.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { connect as netConnect } from "node:net";
import { readFileSync } from "node:fs";
import {
  APP_USER,
  connect,
  describeRun,
  NOTES,
  PASSWORDS,
  psql,
  startPostgres,
  startProxyFor,
  SUPERUSER,
  TENANT_A,
  withClient,
  writeTempFile,
  passwordFor,
  connectError,
  type Client,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";
import { authenticateToReady, errorFields as errorFieldsOf, type Message } from "../harness/raw-socket.ts";

// test/preload.ts sets this too, but under `bun test` with several files
// Bun 1.4 applies a preload's setDefaultTimeout to the first file only.
setDefaultTimeout(120_000);

const SCHEMA = "guard_fp";

let pg: PgInstance;
let proxy: ProxyHandle;

beforeAll(async () => {
  pg = await startPostgres();
  await pg.sql.unsafe(`
    DROP SCHEMA IF EXISTS ${SCHEMA} CASCADE;
    CREATE SCHEMA ${SCHEMA};
    GRANT USAGE, CREATE ON SCHEMA ${SCHEMA} TO ${APP_USER};
  `);
  proxy = await startProxyFor(pg, { args: ["--log-level", "debug"] }); // the guard is on by default
});

afterAll(async () => {
  await proxy?.stop();
  await pg?.sql.unsafe(`DROP SCHEMA IF EXISTS ${SCHEMA} CASCADE`);
});

const tenantUrl = () => proxy.url({ user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER] });

function rssKb(pid: number): number {
  return Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1] ?? 0);
}

const queryMessage = (sql: string) => {
  const body = Buffer.from(`${sql}\0`);
  const head = Buffer.alloc(5);
  head.write("Q");
  head.writeInt32BE(4 + body.length, 1);
  return Buffer.concat([head, body]);
};

/** A raw tenant_a session, for messages postgres.js would not send (a 64 MiB header first, then its body). */
async function connectRaw() {
  const user = `${APP_USER}.${TENANT_A}`;
  const socket = netConnect({ host: proxy.host, port: proxy.port });
  await new Promise<void>((res, rej) => socket.once("connect", res).once("error", rej));
  let buf = Buffer.alloc(0);
  let wake: (() => void) | undefined;
  socket.on("data", (d: Buffer) => {
    buf = Buffer.concat([buf, d]);
    wake?.();
  });
  const read = async (what: string): Promise<Message> => {
    for (;;) {
      if (buf.length >= 5 && buf.length >= 1 + buf.readInt32BE(1)) {
        const len = buf.readInt32BE(1);
        const m = { type: String.fromCharCode(buf[0]!), body: buf.subarray(5, 1 + len) };
        buf = buf.subarray(1 + len);
        return m;
      }
      if (socket.destroyed) throw new Error(`closed while waiting for ${what}`);
      await new Promise<void>((r) => (wake = r));
    }
  };
  const write = (b: Uint8Array) => new Promise<void>((res, rej) => socket.write(b, (e) => (e ? rej(e) : res())));
  return {
    write,
    async login() {
      const params = Buffer.from(`user\0${user}\0database\0${pg.database}\0\0`);
      const head = Buffer.alloc(8);
      head.writeInt32BE(8 + params.length, 0);
      head.writeInt32BE(196608, 4);
      await write(Buffer.concat([head, params]));
      await authenticateToReady(read, write, passwordFor(user), user);
    },
    async untilReady(): Promise<Message[]> {
      const out: Message[] = [];
      for (;;) {
        const m = await read("ReadyForQuery");
        out.push(m);
        if (m.type === "Z") return out;
      }
    },
    close: () => socket.destroy(),
  };
}
const asTenantA = <T>(fn: (sql: Client) => Promise<T>) => withClient(tenantUrl(), fn);

type Outcome = { ok: true; result: unknown } | { ok: false; code: string | undefined; message: string; hint: string | undefined };

async function outcome(fn: () => PromiseLike<unknown>): Promise<Outcome> {
  try {
    return { ok: true, result: await fn() };
  } catch (error) {
    const e = error as { code?: string; message?: string; hint?: string };
    return { ok: false, code: e.code, message: String(e.message ?? error), hint: e.hint };
  }
}
const show = (o: Outcome) => (o.ok ? "ok" : `${o.code} ${o.message}`);

type Row = Record<string, unknown>;
/** A simple-protocol query's rows as plain records. */
const rows = async (sql: Client, text: string): Promise<Row[]> => [...(await sql.unsafe(text))] as Row[];

function expectGuardRefusal(o: Outcome): void {
  expect(show(o)).toMatch(/^42501 multigres: /);
}

/** The session still has tenant_a's context, role and rows. */
async function expectContextIntact(sql: Client): Promise<void> {
  const [ctx] = await rows(sql, `SELECT public.current_tenant_id() AS tenant, current_user::text AS usr, (SELECT array_agg(tenant_id ORDER BY id) FROM notes) AS rows`);
  expect(ctx).toEqual({ tenant: TENANT_A, usr: APP_USER, rows: NOTES.tenant_a.map(() => TENANT_A) });
}

/** A statement that must pass the guard, and what its (first) row must be. */
interface Allowed {
  sql: string;
  row?: Record<string, unknown>;
}

const LITERALS: Allowed[] = [
  { sql: `select 'SET ROLE postgres' as s`, row: { s: "SET ROLE postgres" } },
  { sql: `select 'reset all; discard all; set app.current_tenant_id = ''tenant_b''' as s`, row: { s: "reset all; discard all; set app.current_tenant_id = 'tenant_b'" } },
  { sql: `select 'set_config(''role'', ''postgres'', false)' as s`, row: { s: "set_config('role', 'postgres', false)" } },
  { sql: `select E'SET ROLE postgres' as s`, row: { s: "SET ROLE postgres" } },
  { sql: `select E'RESET ALL\\' ; SET ROLE postgres' as s`, row: { s: "RESET ALL' ; SET ROLE postgres" } },
  { sql: `select $$SET ROLE postgres$$ as s`, row: { s: "SET ROLE postgres" } },
  { sql: `select $t$ reset all; set app.current_tenant_id = 'tenant_b' $t$ as s`, row: { s: " reset all; set app.current_tenant_id = 'tenant_b' " } },
  { sql: `select U&'SET ROLE \\0070ostgres' as s`, row: { s: "SET ROLE postgres" } },
  // standard_conforming_strings is on: all of this is one string.
  { sql: `select 'a\\'' ; select 1; --' as s`, row: { s: "a\\' ; select 1; --" } },
];

const COMMENTS: Allowed[] = [
  { sql: `select 1 as one -- reset all`, row: { one: 1 } },
  { sql: `-- set role postgres\nselect 1 as one`, row: { one: 1 } },
  { sql: `/* set role /* x */ */ select 1 as one`, row: { one: 1 } },
  { sql: `/* outer /* inner */ set role postgres */ select 1 as one`, row: { one: 1 } },
  { sql: `select 1 as one /* ; discard all */`, row: { one: 1 } },
];

const IDENTIFIERS: Allowed[] = [
  { sql: `select 1 as "reset all"`, row: { "reset all": 1 } },
  { sql: `select 1 as "set role"`, row: { "set role": 1 } },
  { sql: `select 1 as "set app.current_tenant_id = 'tenant_b'"`, row: { "set app.current_tenant_id = 'tenant_b'": 1 } },
];

const OTHER_SETTINGS: Allowed[] = [
  { sql: `select set_config('application_name', 'x', false) as v`, row: { v: "x" } },
  { sql: `select set_config('app.current_tenant_id_other', 'x', false) as v`, row: { v: "x" } },
  { sql: `select set_config('app.current_tenant', 'x', false) as v`, row: { v: "x" } },
  { sql: `SET statement_timeout = '5s'` },
  { sql: `SET search_path TO public` },
  { sql: `SET application_name = 'set role postgres'` },
  { sql: `SET app.flag = 'on'` },
  { sql: `SET TIME ZONE 'UTC'` },
  { sql: `RESET statement_timeout` },
  { sql: `DISCARD PLANS` },
  { sql: `DISCARD TEMP` },
];

const READS: Allowed[] = [
  { sql: `SHOW role`, row: { role: APP_USER } },
  { sql: `SHOW app.current_tenant_id`, row: { "app.current_tenant_id": TENANT_A } },
  { sql: `select current_setting('role') as r, current_setting('app.current_tenant_id') as t`, row: { r: APP_USER, t: TENANT_A } },
  { sql: `select current_tenant_id() as t`, row: { t: TENANT_A } },
];

const SAME_WORDS: Allowed[] = [
  { sql: `DO $$ BEGIN RAISE NOTICE 'SET ROLE postgres'; END $$` },
  { sql: `DO $$ BEGIN RAISE NOTICE 'reset all'; END $$` },
  { sql: `select role from (values ('set role')) as v(role)`, row: { role: "set role" } },
];

const GROUPS: Array<[string, Allowed[]]> = [
  ["words inside string literals ('', E'', dollar quotes, U&'')", LITERALS],
  ["words inside comments (line, block, nested)", COMMENTS],
  ["quoted identifiers", IDENTIFIERS],
  ["other settings", OTHER_SETTINGS],
  ["reading the protected settings", READS],
  ["the same words in other statements", SAME_WORDS],
];

describe("false positives pass through the guard", () => {
  for (const [group, cases] of GROUPS) {
    describe(group, () => {
      for (const c of cases) {
        test(`simple Query: ${JSON.stringify(c.sql)}`, () =>
          asTenantA(async (sql) => {
            const o = await outcome(() => sql.unsafe(c.sql));
            expect(show(o)).toBe("ok");
            if (c.row) expect((o as { result: unknown[] }).result[0]).toEqual(c.row);
            await expectContextIntact(sql);
          }));

        test(`Parse (extended protocol): ${JSON.stringify(c.sql)}`, () =>
          asTenantA(async (sql) => {
            const o = await outcome(() => sql.unsafe(c.sql, [], { prepare: true }));
            expect(show(o)).toBe("ok");
            if (c.row) expect((o as { result: unknown[] }).result[0]).toEqual(c.row);
            await expectContextIntact(sql);
          }));
      }
    });
  }

  test(`a table and a column named "set role" / "reset all" in a test schema`, () =>
    asTenantA(async (sql) => {
      const t = `${SCHEMA}."set role"`;
      for (const stmt of [
        `CREATE TABLE ${t} ("reset all" int, "set app.current_tenant_id" text, "discard all" text)`,
        `INSERT INTO ${t} ("reset all", "set app.current_tenant_id", "discard all") VALUES (1, 'tenant_b', 'SET ROLE postgres')`,
        `UPDATE ${t} SET "reset all" = 2, "set app.current_tenant_id" = 'x'`,
        `ALTER TABLE ${t} RENAME COLUMN "discard all" TO "set role"`,
      ]) {
        expect(`${stmt} → ${show(await outcome(() => sql.unsafe(stmt)))}`).toBe(`${stmt} → ok`);
      }
      expect(await rows(sql, `SELECT "reset all", "set app.current_tenant_id", "set role" FROM ${t}`)).toEqual([{ "reset all": 2, "set app.current_tenant_id": "x", "set role": "SET ROLE postgres" }]);
      await sql.unsafe(`DROP TABLE ${t}`);
      await expectContextIntact(sql);
    }));

  test("UPDATE … SET role and INSERT … ON CONFLICT DO UPDATE SET role on a column named role", () =>
    asTenantA(async (sql) => {
      const t = `${SCHEMA}.members`;
      await sql.unsafe(`CREATE TABLE ${t} (id int PRIMARY KEY, role text, reset int)`);
      for (const stmt of [
        `INSERT INTO ${t} (id, role, reset) VALUES (1, 'member', 0)`,
        `UPDATE ${t} SET role = 'admin', reset = 1 WHERE id = 1`,
        `INSERT INTO ${t} (id, role) VALUES (1, 'owner') ON CONFLICT (id) DO UPDATE SET role = excluded.role`,
        `ALTER TABLE ${t} ALTER COLUMN role SET DEFAULT 'member'`,
      ]) {
        expect(`${stmt} → ${show(await outcome(() => sql.unsafe(stmt)))}`).toBe(`${stmt} → ok`);
      }
      expect(await rows(sql, `SELECT id, role, reset FROM ${t}`)).toEqual([{ id: 1, role: "owner", reset: 1 }]);
      await sql.unsafe(`DROP TABLE ${t}`);
      await expectContextIntact(sql);
    }));

  test("SET then SHOW of the allowed settings really took effect", () =>
    asTenantA(async (sql) => {
      await sql.unsafe(`SET statement_timeout = '5s'`);
      await sql.unsafe(`SET search_path TO public`);
      await sql.unsafe(`select set_config('application_name', 'guard-fp', false)`);
      const [s] = await rows(
        sql,
        `select current_setting('statement_timeout') as st, current_setting('search_path') as sp, current_setting('application_name') as an`,
      );
      expect(s).toEqual({ st: "5s", sp: "public", an: "guard-fp" });
      await expectContextIntact(sql);
    }));

  test("psql runs a script of false positives with ON_ERROR_STOP", async () => {
    const file = writeTempFile(
      "guard-false-positives.sql",
      [
        `select 'SET ROLE postgres';`,
        `select E'RESET ALL\\' ; SET ROLE postgres';`,
        `select $$discard all$$;`,
        `-- set role postgres`,
        `/* reset all /* nested */ set role postgres */ select 1 as "set role";`,
        `select set_config('application_name', 'psql-fp', false);`,
        `SET statement_timeout = '5s';`,
        `SET search_path TO public;`,
        `SHOW role;`,
        `select current_tenant_id();`,
      ].join("\n"),
    );
    const r = await psql(tenantUrl(), null, { file });
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stdout.trim().split("\n")).toEqual([
      "SET ROLE postgres",
      "RESET ALL' ; SET ROLE postgres",
      "discard all",
      "1",
      "psql-fp",
      APP_USER,
      TENANT_A,
    ]);
  });
});

describe("a refusal is an ordinary server error", () => {
  test("42501, a message starting 'multigres: ', a hint, and the session goes on", () =>
    asTenantA(async (sql) => {
      const o = await outcome(() => sql.unsafe(`SET ROLE postgres`));
      expectGuardRefusal(o);
      expect((o as { hint?: string }).hint).toContain("<role>.<tenant>");
      expect(await rows(sql, `select 1 as one`)).toEqual([{ one: 1 }]);
      await expectContextIntact(sql);
    }));

  test("inside a transaction block: the transaction is aborted (25P02) and ROLLBACK recovers", () =>
    asTenantA(async (sql) => {
      await sql.unsafe(`BEGIN`);
      await sql.unsafe(`INSERT INTO notes (tenant_id, body) VALUES ('tenant_a', 'inside the refused transaction')`);
      expectGuardRefusal(await outcome(() => sql.unsafe(`SET ROLE postgres`)));
      expect(show(await outcome(() => sql.unsafe(`select 1`)))).toMatch(/^25P02 current transaction is aborted/);
      expect(show(await outcome(() => sql.unsafe(`ROLLBACK`)))).toBe("ok");
      await expectContextIntact(sql); // the insert is gone too
      const [status] = await rows(sql, `select count(*)::int as n from notes where body = 'inside the refused transaction'`);
      expect(status).toEqual({ n: 0 });
    }));

  test("inside a transaction block: ROLLBACK TO SAVEPOINT recovers and COMMIT works", () =>
    asTenantA(async (sql) => {
      await sql.unsafe(`BEGIN`);
      await sql.unsafe(`SAVEPOINT s`);
      expectGuardRefusal(await outcome(() => sql.unsafe(`RESET ALL`)));
      expect(show(await outcome(() => sql.unsafe(`select 1`)))).toMatch(/^25P02 /);
      await sql.unsafe(`ROLLBACK TO SAVEPOINT s`);
      expect(await rows(sql, `select current_tenant_id() as t`)).toEqual([{ t: TENANT_A }]);
      expect(show(await outcome(() => sql.unsafe(`COMMIT`)))).toBe("ok");
      await expectContextIntact(sql);
    }));

  test("postgres.js sql.begin: a refused Parse aborts the transaction, which rolls back", () =>
    asTenantA(async (sql) => {
      let after: Outcome | undefined;
      const o = await outcome(() =>
        sql.begin(async (tx) => {
          await tx`select 1`;
          const refused = await outcome(() => tx.unsafe(`select set_config('role', 'postgres', false)`, [], { prepare: true }));
          expectGuardRefusal(refused);
          after = await outcome(() => tx`select 2`);
          throw new Error("done");
        }),
      );
      expect(show(o)).toContain("done");
      expect(show(after!)).toMatch(/^25P02 /);
      await expectContextIntact(sql);
    }));
});

describe("the guard on Parse (extended protocol)", () => {
  test(`sql.unsafe("set role postgres", [], { prepare: true }) gets 42501, twice (cached statement), then the session goes on`, () =>
    asTenantA(async (sql) => {
      expectGuardRefusal(await outcome(() => sql.unsafe("set role postgres", [], { prepare: true })));
      expectGuardRefusal(await outcome(() => sql.unsafe("set role postgres", [], { prepare: true })));
      expectGuardRefusal(await outcome(() => sql.unsafe("reset all", [], { prepare: true })));
      expectGuardRefusal(await outcome(() => sql.unsafe("set app.current_tenant_id = 'tenant_b'", [], { prepare: true })));
      expect([...(await sql`select ${1}::int as one`)]).toEqual([{ one: 1 }]);
      await expectContextIntact(sql);
    }));

  test("in a pipeline, the refused statement fails and the ones around it succeed, in order", () =>
    asTenantA(async (sql) => {
      const results = await Promise.all([
        outcome(() => sql`select 1::int as a`),
        outcome(() => sql.unsafe("set role postgres", [], { prepare: true })),
        outcome(() => sql`select 2::int as b`),
        outcome(() => sql.unsafe("discard all", [], { prepare: true })),
        outcome(() => sql`select current_tenant_id() as t`),
      ]);
      expect(show(results[0]!)).toBe("ok");
      expect([...((results[0] as { result: unknown[] }).result)]).toEqual([{ a: 1 }]);
      expectGuardRefusal(results[1]!);
      expect([...((results[2] as { result: unknown[] }).result)]).toEqual([{ b: 2 }]);
      expectGuardRefusal(results[3]!);
      expect([...((results[4] as { result: unknown[] }).result)]).toEqual([{ t: TENANT_A }]);
      await expectContextIntact(sql);
    }));
});

describe("messages larger than one read", () => {
  const big = "x".repeat(300_000);

  test("a 300 kB Query with SET ROLE at the very end is refused", () =>
    asTenantA(async (sql) => {
      expectGuardRefusal(await outcome(() => sql.unsafe(`select '${big}' as s; set role postgres`)));
      await expectContextIntact(sql);
    }));

  test("a 300 kB Query of harmless text containing the words passes whole", () =>
    asTenantA(async (sql) => {
      const [row] = await rows(sql, `select length('${big} set role postgres; reset all') as n`);
      expect(row).toEqual({ n: big.length + " set role postgres; reset all".length });
      await expectContextIntact(sql);
    }));
});

describe("statements over --guard-max-statement (1 MiB by default)", () => {
  const huge = "y".repeat(1_200_000);

  test("a larger Query that might change the context is refused with 54000; the session goes on", () =>
    asTenantA(async (sql) => {
      const o = await outcome(() => sql.unsafe(`select length('${huge}'); set role postgres`));
      expect(o.ok).toBe(false);
      expect(!o.ok && o.code).toBe("54000");
      expect(!o.ok && o.message).toMatch(/^multigres: a statement of \d+ bytes is larger than the guard reads \(--guard-max-statement 1048576\)/);
      await expectContextIntact(sql);
      // The same over Parse: a bind parameter would have been the place for the data.
      const p = await outcome(() => sql.unsafe(`select length('${huge}'), current_setting('role')`, [], { prepare: true }));
      expect(!p.ok && p.code).toBe("54000");
      await expectContextIntact(sql);
    }));

  test("a larger Query is refused whatever it says: it is never held, so it cannot be read", () =>
    asTenantA(async (sql) => {
      const o = await outcome(() => sql.unsafe(`select length('${huge}') as n`));
      expect(!o.ok && o.code).toBe("54000");
      expect(!o.ok && o.message).toContain("send bulk data with COPY or as bind parameters");
      // The same data as a bind parameter is not the guard's business.
      const [row] = await sql`select length(${huge}) as n`;
      expect(row).toEqual({ n: huge.length });
      await expectContextIntact(sql);
    }));

  test("a 64 MiB Query is refused without being held: the proxy's memory stays flat while it streams past", async () => {
    const sock = await connectRaw();
    try {
      await sock.login();
      const before = rssKb(proxy.pid);
      const size = 64 << 20;
      const head = Buffer.alloc(5);
      head.write("Q");
      head.writeInt32BE(4 + size, 1);
      await sock.write(head);
      const block = Buffer.alloc(1 << 20, 0x61);
      let peak = before;
      for (let sent = 0; sent < size; sent += block.length) {
        await sock.write(sent + block.length >= size ? Buffer.concat([block.subarray(0, block.length - 1), Buffer.from([0])]) : block);
        peak = Math.max(peak, rssKb(proxy.pid));
      }
      const reply = await sock.untilReady();
      const err = reply.find((m) => m.type === "E");
      expect(err && errorFieldsOf(err.body).C).toBe("54000");
      // Far less than the message: what is in flight, not what was sent.
      expect(peak - before).toBeLessThan(32 * 1024);
    } finally {
      sock.close();
    }
  });

  test("a larger limit reads it: an ordinary statement of the same size then passes", async () => {
    const roomy = await startProxyFor(pg, { args: ["--guard-max-statement", String(4 << 20)] });
    try {
      await withClient(roomy.url({ user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER] }), async (sql) => {
        const [row] = await rows(sql, `select length('${huge}') as n, current_setting('role') as r`);
        expect(row).toEqual({ n: huge.length, r: APP_USER });
        expectGuardRefusal(await outcome(() => sql.unsafe(`select length('${huge}'); set role postgres`)));
        await expectContextIntact(sql);
      });
    } finally {
      await roomy.stop();
    }
  });
});

describe("big statements are lexed off the event loop", () => {
  test("while one session's megabyte of dense SQL is being read, another session's queries go on", async () => {
    // Dense (a token every other byte) and just under the limit; the comment
    // only makes the byte filter hand it to the lexer. PostgreSQL stops at
    // its first word (a syntax error), so its reply is immediate: what takes
    // time is the guard reading it.
    const dense = `frobnicate ${"a,".repeat(500_000)}a -- set`;
    const a = await connectRaw();
    const b = connect(tenantUrl());
    try {
      await a.login();
      await b`select 1`; // b is logged in and idle
      const events: string[] = [];
      // a's whole statement is at the proxy (the kernel took it) before b starts.
      await a.write(queryMessage(dense));
      const big = a.untilReady().then(() => events.push("a: done"));
      for (let i = 0; i < 20; i++) {
        await b`select ${i}::int as i`;
        events.push(`b: ${i}`);
      }
      await big;
      // Lexing that statement takes far longer than 20 round trips: had it
      // run on the event loop, b's first query would have waited for it.
      expect(events.indexOf("a: done")).toBe(20);
    } finally {
      a.close();
      await b.end();
    }
  });
});

describe("roles and computed setting names (the credential store is the fix; this is defence in depth)", () => {
  const refused = [
    `ALTER ROLE ${APP_USER} PASSWORD 'x'`,
    "ALTER ROLE CURRENT_USER WITH PASSWORD 'x'",
    `ALTER USER ${APP_USER} VALID UNTIL 'infinity'`,
    `ALTER ROLE ${APP_USER} SET search_path = pg_temp, public`,
    "CREATE ROLE guard_evil",
    "DROP ROLE IF EXISTS guard_evil",
    `DO $$ BEGIN ALTER ROLE ${APP_USER} PASSWORD 'x'; END $$`,
    "select set_config(lower('ROLE'), 'none', false)",
    "select set_config(lower('APP.CURRENT_TENANT_ID_SIG'), '', false)",
  ];
  for (const sql of refused) {
    test(`${JSON.stringify(sql)}: 42501, simple Query and Parse`, () =>
      asTenantA(async (c) => {
        expectGuardRefusal(await outcome(() => c.unsafe(sql)));
        expectGuardRefusal(await outcome(() => c.unsafe(sql, [], { prepare: true })));
        await expectContextIntact(c);
      }));
  }

  test("set_config with the name as a bind parameter: 42501; with a literal name and a bound value: runs", () =>
    asTenantA(async (c) => {
      expectGuardRefusal(await outcome(() => c`select set_config(${"app.other"}, ${"x"}, false)`));
      expect(await rows(c, `select set_config('app.other', 'y', false) as v`)).toEqual([{ v: "y" }]);
      const [bound] = await c`select set_config('app.other', ${"z"}, false) as v`;
      expect(bound).toEqual({ v: "z" });
      await expectContextIntact(c);
    }));
});

describe("what the attacker review found (each was a way past the guard)", () => {
  test("a -- comment ended by \\r (PostgreSQL ends it there too): the statement after it is read and refused", async () => {
    for (const sql of ["SELECT 1; -- x\rALTER ROLE app_user SET work_mem = '88kB'", "-- x\rSET ROLE postgres", "SELECT 1; -- x\rSET app.current_tenant_id = 'tenant_b'"]) {
      const r = await psql(tenantUrl(), sql);
      expect(r.exitCode, describeRun(r)).not.toBe(0);
      expect(r.stderr).toContain("multigres: ");
    }
    const [{ config }] = (await pg.sql`SELECT rolconfig::text AS config FROM pg_roles WHERE rolname = ${APP_USER}`) as unknown as [{ config: string | null }];
    expect(config).toBeNull();
  });

  test("lexer edges: a string continued across lines keeps E'' escapes; long dollar tags; UESCAPE after a comment", async () => {
    const tag = "a".repeat(300);
    for (const sql of ["SELECT '\\', E''\n'\\' ', '\\'; SET ROLE NONE; --", `SELECT $${tag}$ ' $${tag}$; SET ROLE NONE; SELECT ' '`, `SET U&"r!006Fle" /**/ UESCAPE '!' TO NONE`]) {
      await asTenantA(async (c) => {
        expectGuardRefusal(await outcome(() => c.unsafe(sql)));
        await expectContextIntact(c);
      });
    }
  });

  test("client encodings the guard cannot read (SJIS and kin) are refused at startup and by SET", async () => {
    const r = await psql(tenantUrl(), "SELECT 1", { env: { PGCLIENTENCODING: "SJIS" } });
    expect(r.exitCode, describeRun(r)).not.toBe(0);
    expect(r.stderr).toContain("client_encoding SJIS cannot be read by multigres's guard");
    // The setting's name in another case, and a name PostgreSQL cleans to SJIS.
    for (const connection of [{ CLIENT_ENCODING: "SJIS" }, { client_encoding: "SJIS\u212A" }]) {
      const err = await connectError(tenantUrl(), { connection });
      expect(`${err.code} ${err.message}`).toMatch(/^28000 client_encoding SJIS.? cannot be read by multigres's guard$/);
    }
    await asTenantA(async (sql) => {
      for (const stmt of ["SET client_encoding TO 'SJIS'", "SET NAMES 'BIG5'", "select set_config('client_encoding', 'GBK', false)"]) {
        expectGuardRefusal(await outcome(() => sql.unsafe(stmt)));
      }
      expect(await rows(sql, "SHOW client_encoding")).toEqual([{ client_encoding: "UTF8" }]);
      // A readable one is fine.
      expect(show(await outcome(() => sql.unsafe("SET client_encoding TO 'LATIN1'")))).toBe("ok");
      await sql.unsafe("SET client_encoding TO 'UTF8'");
      await expectContextIntact(sql);
    });
  });
});

describe("logs", () => {
  test("a refusal is logged without the statement", async () => {
    const marker = "guard-log-marker-7f3a";
    await asTenantA(async (sql) => {
      expectGuardRefusal(await outcome(() => sql.unsafe(`SET app.current_tenant_id = '${marker}'`)));
    });
    await proxy.waitForLog(/refused a statement/);
    expect(proxy.logs()).not.toContain(marker);
  });
});

describe("superuser sessions", () => {
  test("are not guarded: postgres can SET ROLE and RESET ROLE through the proxy", async () => {
    await withClient(proxy.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }), async (sql) => {
      expect(show(await outcome(() => sql.unsafe(`SET ROLE ${APP_USER}`)))).toBe("ok");
      expect(await rows(sql, `select current_user::text as u`)).toEqual([{ u: APP_USER }]);
      expect(show(await outcome(() => sql.unsafe(`RESET ROLE`)))).toBe("ok");
      expect(await rows(sql, `select current_user::text as u`)).toEqual([{ u: SUPERUSER }]);
    });
  });
});
