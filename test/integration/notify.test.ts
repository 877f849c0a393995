/**
 * LISTEN/NOTIFY scoped per tenant (issue 10, part 3), through the compiled
 * proxy (guard on, the default) against real PostgreSQL, with real clients:
 * postgres.js (sql.listen / sql.notify), node-postgres (LISTEN, the
 * 'notification' event, bind parameters, a named statement), psql, and a
 * raw protocol client for FunctionCall.
 *
 * "Nothing delivered" is proven without waiting: notifications reach a
 * listener in commit order, so after the cross-tenant attempts have
 * committed, a same-tenant notification follows, and the listener's FIRST
 * notification must be that one (each test uses channels of its own).
 *
 * Covers:
 * - same tenant: delivered with the client's own channel name and payload
 *   (postgres.js, node-postgres with NOTIFY and pg_notify($1, $2), psql,
 *   a named prepared LISTEN, a statement over 32 KiB lexed on the guard's
 *   worker); quoted and mixed-case names as PostgreSQL folds them; 44
 *   bytes, the longest name; UNLISTEN and UNLISTEN *; pg_listening_channels()
 *   shows the server-side (prefixed) names;
 * - across tenants: nothing either way (NOTIFY, pg_notify, sql.notify);
 *   tenant B made to LISTEN on tenant A's prefixed channel with dynamic SQL
 *   hears nothing through the proxy (the server does send it); raw channels
 *   reached by dynamic SQL (EXECUTE in DO, a function the admin created)
 *   reach no tenant, while a session without a tenant does hear them;
 * - refused forms (42501, a hint, the session goes on): a name over 44
 *   bytes, pg_notify() with no channel, LISTEN/NOTIFY/pg_notify in DO and
 *   function bodies and stored definitions, FunctionCall of pg_notify; the
 *   log names the refusal, never the prefix;
 * - superusers keep raw channels; --guard off leaves channels unscoped.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { createHmac } from "node:crypto";
import { Client as PgClient } from "pg";
import {
  APP_USER,
  connect,
  contextKey,
  NOTES,
  PASSWORDS,
  psql,
  describeRun,
  startPostgres,
  startProxyFor,
  SUPERUSER,
  TENANT_A,
  TENANT_B,
  withClient,
  type Client,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";
import { errorFields } from "../harness/raw-socket.ts";
import { RawPg } from "./fault-helpers.ts";

setDefaultTimeout(120_000);

/** A function the admin made, which notifies on whatever channel it is given: dynamic SQL the guard cannot see into. */
const RAW_NOTIFY = "public.notify_test_raw";

let pg: PgInstance;
let proxy: ProxyHandle;

beforeAll(async () => {
  pg = await startPostgres();
  await pg.sql.unsafe(`CREATE OR REPLACE FUNCTION ${RAW_NOTIFY}(ch text, payload text) RETURNS void LANGUAGE sql AS 'SELECT pg_notify(ch, payload)'`);
  await pg.sql.unsafe(`GRANT EXECUTE ON FUNCTION ${RAW_NOTIFY}(text, text) TO ${APP_USER}`);
  proxy = await startProxyFor(pg); // the guard is on by default
});

afterAll(async () => {
  await Promise.all(open.map((l) => l.close()));
  await proxy?.stop();
  await pg?.sql.unsafe(`DROP FUNCTION IF EXISTS ${RAW_NOTIFY}(text, text)`);
});

const userOf = (tenant: string) => `${APP_USER}.${tenant}`;
const tenantUrl = (tenant: string, p: ProxyHandle = proxy) => p.url({ user: userOf(tenant), password: PASSWORDS[APP_USER] });
const asTenant = <T>(tenant: string, fn: (sql: Client) => Promise<T>) => withClient(tenantUrl(tenant), fn);

/** The prefix the proxy gives a tenant's channels, derived here independently of src/ (see tenant/context.ts). */
function prefixFor(tenant: string): string {
  const subkey = createHmac("sha256", contextKey()).update("multigres notify channel").digest();
  return `mg${createHmac("sha256", subkey).update(tenant).digest("hex").slice(0, 16)}:`;
}

let channels = 0;
/** A channel name no other test uses. */
const channel = (name: string) => `${name}_${++channels}`;

interface Note {
  channel: string;
  payload: string;
}

/** Notifications as they arrive; next() waits for the next one. */
class Inbox {
  private readonly items: Note[] = [];
  private readonly waiting: ((n: Note) => void)[] = [];
  push(n: Note): void {
    const w = this.waiting.shift();
    if (w) w(n);
    else this.items.push(n);
  }
  next(): Promise<Note> {
    const n = this.items.shift();
    return n ? Promise.resolve(n) : new Promise((resolve) => this.waiting.push(resolve));
  }
  async take(count: number): Promise<Note[]> {
    const out: Note[] = [];
    for (let k = 0; k < count; k++) out.push(await this.next());
    return out;
  }
}

interface Listener {
  client: PgClient;
  inbox: Inbox;
  query(sql: string, values?: unknown[]): Promise<unknown[]>;
  close(): Promise<void>;
}

/** Listeners to close before the proxy stops. */
const open: Listener[] = [];

/** A node-postgres session that records every notification it gets, whatever its channel. */
async function listener(o: { tenant?: string; proxy?: ProxyHandle; direct?: boolean }): Promise<Listener> {
  const p = o.proxy ?? proxy;
  const client = o.direct
    ? new PgClient({ host: pg.host, port: pg.port, user: SUPERUSER, password: PASSWORDS[SUPERUSER], database: pg.database })
    : new PgClient({
        host: p.host,
        port: p.port,
        user: o.tenant ? userOf(o.tenant) : SUPERUSER,
        password: o.tenant ? PASSWORDS[APP_USER] : PASSWORDS[SUPERUSER],
        database: pg.database,
      });
  const inbox = new Inbox();
  client.on("error", () => {}); // a session the proxy ends (--guard off's, at the end) is no failure here
  client.on("notification", (m) => inbox.push({ channel: m.channel, payload: m.payload ?? "" }));
  await client.connect();
  const l: Listener = {
    client,
    inbox,
    query: async (sql, values) => (await client.query(sql, values)).rows,
    close: () => client.end().catch(() => {}),
  };
  open.push(l);
  return l;
}

type Outcome = { ok: true } | { ok: false; code: string | undefined; message: string; hint: string | undefined };

async function outcome(fn: () => PromiseLike<unknown>): Promise<Outcome> {
  try {
    await fn();
    return { ok: true };
  } catch (error) {
    const e = error as { code?: string; message?: string; hint?: string };
    return { ok: false, code: e.code, message: String(e.message ?? error), hint: e.hint };
  }
}

/** 42501 from the guard, with a hint that says `hint`. */
function expectRefused(o: Outcome, hint: RegExp | string): void {
  if (o.ok) throw new Error("expected a refusal, the statement ran");
  expect(`${o.code} ${o.message}`).toMatch(/^42501 multigres: /);
  expect(o.hint ?? "").toMatch(hint);
}

/** The session still has tenant_a's context and rows. */
async function expectWorking(sql: Client): Promise<void> {
  const [row] = [...(await sql.unsafe(`SELECT public.current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes) AS n`))] as Record<string, unknown>[];
  expect(row).toEqual({ tenant: TENANT_A, n: NOTES.tenant_a.length });
}

// ------------------------------------------------------------ same tenant

describe("within a tenant, channels work as in PostgreSQL", () => {
  test("postgres.js: sql.listen hears sql.notify (pg_notify with bind parameters) under its own channel name", async () => {
    const ch = channel("Jobs Queue");
    const sql = connect(tenantUrl(TENANT_A));
    try {
      let heard: (payload: string) => void = () => {};
      const got = new Promise<string>((resolve) => (heard = resolve));
      // postgres.js dispatches by the channel name the server reports: it
      // must be the client's own name, not the prefixed one.
      await sql.listen(ch, (payload) => heard(payload));
      await asTenant(TENANT_A, (other) => other.notify(ch, "hello from a"));
      expect(await got).toBe("hello from a");
    } finally {
      await sql.end({ timeout: 5 });
    }
  });

  test("node-postgres: LISTEN, then NOTIFY and pg_notify($1, $2) from another session, in order", async () => {
    const ch = channel("orders");
    const a = await listener({ tenant: TENANT_A });
    await a.query(`LISTEN ${ch}`);
    const sender = await listener({ tenant: TENANT_A });
    await sender.query(`NOTIFY ${ch}, 'one'`);
    await sender.query(`SELECT pg_notify($1, $2)`, [ch, "two"]);
    await sender.query(`SELECT pg_catalog.pg_notify('${ch}', 'three')`);
    expect(await a.inbox.take(3)).toEqual([
      { channel: ch, payload: "one" },
      { channel: ch, payload: "two" },
      { channel: ch, payload: "three" },
    ]);
  });

  test("a named prepared LISTEN (Parse) and a notification from the same session", async () => {
    const ch = channel("prepared");
    const a = await listener({ tenant: TENANT_A });
    await a.client.query({ name: "listen_stmt", text: `LISTEN ${ch}` });
    await a.client.query({ name: "notify_stmt", text: `SELECT pg_notify($1, $2)`, values: [ch, "to myself"] });
    expect(await a.inbox.next()).toEqual({ channel: ch, payload: "to myself" });
  });

  test("psql prints the client's channel name", async () => {
    const ch = channel("psql_jobs");
    const r = await psql(tenantUrl(TENANT_A), `LISTEN ${ch}; NOTIFY ${ch}, 'from psql'`);
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stdout).toContain(`Asynchronous notification "${ch}" with payload "from psql" received`);
    expect(r.stdout).not.toContain(prefixFor(TENANT_A));
  });

  test("quoted and mixed-case names: unquoted names fold to lower case, quoted ones do not, as in PostgreSQL", async () => {
    const n = ++channels;
    const quoted = `Mixed_${n}`;
    const folded = `mixed_lower_${n}`;
    const a = await listener({ tenant: TENANT_A });
    await a.query(`LISTEN "${quoted}"`);
    await a.query(`LISTEN Mixed_Lower_${n}`);
    const b = await listener({ tenant: TENANT_A });
    await b.query(`NOTIFY "${quoted}", '1'`);
    await b.query(`SELECT pg_notify('${quoted}', '2')`);
    await b.query(`NOTIFY MIXED_LOWER_${n}, '3'`);
    await b.query(`SELECT pg_notify('${folded}', '4')`);
    await b.query(`SELECT pg_notify('Mixed_Lower_${n}', 'not listened to: pg_notify does not fold')`);
    await b.query(`NOTIFY "${quoted}", 'end'`);
    expect(await a.inbox.take(5)).toEqual([
      { channel: quoted, payload: "1" },
      { channel: quoted, payload: "2" },
      { channel: folded, payload: "3" },
      { channel: folded, payload: "4" },
      { channel: quoted, payload: "end" },
    ]);
  });

  test("44 bytes is the longest name (63 less the 19-byte prefix); multi-byte characters count in bytes", async () => {
    const longest = `l${++channels}_`.padEnd(44, "x");
    const accents = `${"é".repeat(20)}${channels}`; // 40 bytes of é and a number: within 44
    const a = await listener({ tenant: TENANT_A });
    await a.query(`LISTEN ${longest}`);
    await a.query(`LISTEN "${accents}"`);
    const b = await listener({ tenant: TENANT_A });
    await b.query(`NOTIFY ${longest}, 'long'`);
    await b.query(`SELECT pg_notify($1, 'accents')`, [accents]);
    expect(await a.inbox.take(2)).toEqual([
      { channel: longest, payload: "long" },
      { channel: accents, payload: "accents" },
    ]);
  });

  test("UNLISTEN a channel and UNLISTEN *", async () => {
    const [x, y, z] = [channel("x"), channel("y"), channel("z")];
    const a = await listener({ tenant: TENANT_A });
    await a.query(`LISTEN ${x}; LISTEN ${y}`);
    await a.query(`UNLISTEN ${x}`);
    const b = await listener({ tenant: TENANT_A });
    await b.query(`NOTIFY ${x}, 'after unlisten'`);
    await b.query(`NOTIFY ${y}, 'still listening'`);
    expect(await a.inbox.next()).toEqual({ channel: y, payload: "still listening" });
    await a.query(`UNLISTEN *`);
    await a.query(`LISTEN ${z}`);
    await b.query(`NOTIFY ${y}, 'after unlisten *'`);
    await b.query(`NOTIFY ${z}, 'new'`);
    expect(await a.inbox.next()).toEqual({ channel: z, payload: "new" });
  });

  test("pg_listening_channels() shows the server-side names (a documented limit)", async () => {
    const ch = channel("shown");
    const a = await listener({ tenant: TENANT_A });
    await a.query(`LISTEN ${ch}`);
    expect(await a.query(`SELECT pg_listening_channels() AS c`)).toEqual([{ c: `${prefixFor(TENANT_A)}${ch}` }]);
  });

  test("a statement over 32 KiB (lexed on the guard's worker thread) is scoped too", async () => {
    const ch = channel("big");
    const padding = `/* ${"x".repeat(40 * 1024)} */`;
    const a = await listener({ tenant: TENANT_A });
    await a.query(`${padding} LISTEN ${ch}`);
    const b = await listener({ tenant: TENANT_A });
    await b.query(`${padding} NOTIFY ${ch}, 'big one'`);
    await b.query(`SELECT pg_notify($1, $2) ${padding}`, [ch, "big two"]);
    expect(await a.inbox.take(2)).toEqual([
      { channel: ch, payload: "big one" },
      { channel: ch, payload: "big two" },
    ]);
    const refused = await outcome(() => b.query(`${padding} LISTEN ${"y".repeat(45)}`));
    expectRefused(refused, /at most 44 bytes/);
  });
});

// ---------------------------------------------------------- across tenants

describe("across tenants, nothing is delivered", () => {
  test("tenant B's NOTIFY, pg_notify and sql.notify on the same name reach no tenant_a listener, and the reverse", async () => {
    const ch = channel("shared_name");
    const a = await listener({ tenant: TENANT_A });
    const b = await listener({ tenant: TENANT_B });
    await a.query(`LISTEN ${ch}`);
    await b.query(`LISTEN ${ch}`);

    await asTenant(TENANT_B, async (sql) => {
      await sql.unsafe(`NOTIFY ${ch}, 'b: notify'`);
      await sql.unsafe(`SELECT pg_notify('${ch}', 'b: pg_notify')`);
      await sql.notify(ch, "b: sql.notify");
    });
    await asTenant(TENANT_A, (sql) => sql.unsafe(`NOTIFY ${ch}, 'a: marker'`));
    await asTenant(TENANT_B, (sql) => sql.unsafe(`NOTIFY ${ch}, 'b: marker'`));

    // A hears its own marker first: none of B's three, which committed before it.
    expect(await a.inbox.next()).toEqual({ channel: ch, payload: "a: marker" });
    // B hears its own four, and nothing of A's in between.
    expect((await b.inbox.take(4)).map((n) => n.payload)).toEqual(["b: notify", "b: pg_notify", "b: sql.notify", "b: marker"]);
  });

  test("tenant B made to LISTEN on tenant A's channel with dynamic SQL: the server sends, the proxy drops", async () => {
    const ch = channel("secret_jobs");
    const a = await listener({ tenant: TENANT_A });
    const b = await listener({ tenant: TENANT_B });
    await a.query(`LISTEN ${ch}`);
    await b.query(`LISTEN ${ch}`);
    // Suppose B learned A's prefix: EXECUTE builds a LISTEN the guard never reads.
    const foreign = `${prefixFor(TENANT_A)}${ch}`;
    await b.query(`DO $$ BEGIN EXECUTE format('LIS' || 'TEN %I', '${foreign}'); END $$`);
    const listening = (await b.query(`SELECT pg_listening_channels() AS c ORDER BY 1`)) as { c: string }[];
    expect(listening.map((r) => r.c)).toContain(foreign); // the server really delivers A's notifications to B's backend

    await asTenant(TENANT_A, (sql) => sql.unsafe(`NOTIFY ${ch}, 'a: secret'`));
    await asTenant(TENANT_B, (sql) => sql.unsafe(`NOTIFY ${ch}, 'b: marker'`));
    expect(await b.inbox.next()).toEqual({ channel: ch, payload: "b: marker" });
    expect(await a.inbox.next()).toEqual({ channel: ch, payload: "a: secret" });
  });

  test("raw channels reached by dynamic SQL or an admin's function reach no tenant (a session without a tenant hears them)", async () => {
    const ch = channel("raw");
    const a = await listener({ tenant: TENANT_A });
    await a.query(`LISTEN ${ch}`);
    // A's backend also listens on the raw name, by dynamic SQL.
    await a.query(`DO $$ BEGIN EXECUTE 'LIS' || 'TEN ${ch}'; END $$`);
    const admin = await listener({ direct: true });
    await admin.query(`LISTEN ${ch}`);

    await pg.sql.unsafe(`NOTIFY ${ch}, 'raw: admin'`);
    await asTenant(TENANT_B, async (sql) => {
      await sql.unsafe(`DO $$ BEGIN EXECUTE 'SELECT pg_' || 'notify(' || quote_literal('${ch}') || ', ''raw: b dynamic'')'; END $$`);
      await sql.unsafe(`SELECT ${RAW_NOTIFY}('${ch}', 'raw: b function')`);
    });
    await asTenant(TENANT_A, (sql) => sql.unsafe(`NOTIFY ${ch}, 'a: marker'`));

    expect(await a.inbox.next()).toEqual({ channel: ch, payload: "a: marker" });
    // Raw channels are shared by everything outside the proxy's tenants: documented, not trusted.
    expect((await admin.inbox.take(3)).map((n) => n.payload)).toEqual(["raw: admin", "raw: b dynamic", "raw: b function"]);
  });
});

// ---------------------------------------------------------------- refusals

describe("forms the proxy cannot scope are refused with 42501 and a hint; the session goes on", () => {
  const long = "n".repeat(45);
  const REFUSED: Array<[string, string, RegExp]> = [
    ["LISTEN with a 45-byte name", `LISTEN ${long}`, /at most 44 bytes.*63 bytes/],
    ["NOTIFY with a 45-byte quoted name", `NOTIFY "${long}", 'x'`, /at most 44 bytes/],
    ["pg_notify() with no channel", `SELECT pg_notify()`, /first argument/],
    ["pg_notify inside a DO block", `DO $$ BEGIN PERFORM pg_notify('x', 'y'); END $$`, /DO block or function body/],
    ["NOTIFY inside a DO block", `DO $$ BEGIN NOTIFY x; END $$`, /DO block or function body/],
    ["LISTEN inside a DO block", `DO $body$ BEGIN IF true THEN LISTEN x; END IF; END $body$`, /DO block or function body/],
    ["pg_notify in a function body", `CREATE FUNCTION notify_f() RETURNS void LANGUAGE sql AS $$ SELECT pg_notify('x', 'y') $$`, /DO block or function body/],
    ["NOTIFY in a procedure body", `CREATE PROCEDURE notify_p() LANGUAGE plpgsql AS $$ BEGIN NOTIFY x; END $$`, /DO block or function body/],
    ["pg_notify in a view", `CREATE VIEW notify_v AS SELECT pg_notify('x', body) FROM notes`, /stored definition/],
    ["pg_notify in a SQL-standard function body", `CREATE FUNCTION notify_g() RETURNS void LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT pg_notify('x', 'y'); END`, /stored definition/],
  ];

  for (const [name, sql, hint] of REFUSED) {
    test(`${name}: simple Query`, () =>
      asTenant(TENANT_A, async (c) => {
        expectRefused(await outcome(() => c.unsafe(sql)), hint);
        await expectWorking(c);
      }));
    test(`${name}: Parse`, () =>
      asTenant(TENANT_A, async (c) => {
        expectRefused(await outcome(() => c.unsafe(sql, [], { prepare: true })), hint);
        await expectWorking(c);
      }));
  }

  test("inside a transaction a refusal aborts it, as an error would; ROLLBACK recovers", () =>
    asTenant(TENANT_A, async (c) => {
      await c.unsafe("BEGIN");
      expectRefused(await outcome(() => c.unsafe(`LISTEN ${long}`)), /at most 44 bytes/);
      const next = await outcome(() => c.unsafe("SELECT 1"));
      expect(next.ok ? "ok" : next.code).toBe("25P02");
      await c.unsafe("ROLLBACK");
      await expectWorking(c);
    }));

  test("FunctionCall ('F') of pg_notify (OID 3036) is refused; the session goes on", async () => {
    const raw = await RawPg.open(proxy.port, "function call");
    try {
      await raw.startup({ user: userOf(TENANT_A), database: pg.database });
      const arg = (s: string) => {
        const b = Buffer.from(s);
        const head = Buffer.alloc(4);
        head.writeInt32BE(b.length);
        return Buffer.concat([head, b]);
      };
      const int16 = (n: number) => Buffer.from([n >> 8, n & 0xff]);
      const oid = Buffer.alloc(4);
      oid.writeInt32BE(3036);
      const body = Buffer.concat([oid, int16(0), int16(2), arg("x"), arg("y"), int16(0)]);
      const head = Buffer.alloc(5);
      head.write("F");
      head.writeInt32BE(4 + body.length, 1);
      await raw.send(Buffer.concat([head, body]));
      const replies = [];
      for (;;) {
        const m = await raw.readMessage("the reply to FunctionCall");
        replies.push(m);
        if (m.type === "Z") break;
      }
      const error = replies.find((m) => m.type === "E");
      expect(error && errorFields(error.body)).toMatchObject({ C: "42501", H: expect.stringContaining("in SQL") });
      expect(await raw.query("SELECT public.current_tenant_id()")).toEqual([[TENANT_A]]);
    } finally {
      raw.destroy();
    }
  });

  test("the log names the refusal and never the channel prefix", async () => {
    await asTenant(TENANT_A, async (c) => expectRefused(await outcome(() => c.unsafe(`SELECT pg_notify()`)), /first argument/));
    await proxy.waitForLog(/refused a LISTEN\/NOTIFY form/);
    expect(proxy.logs()).not.toContain(prefixFor(TENANT_A));
    expect(proxy.logs()).not.toContain(prefixFor(TENANT_B));
  });
});

// ------------------------------------------------------ sessions left alone

describe("sessions the proxy does not scope", () => {
  test("a superuser through the proxy keeps raw channel names", async () => {
    const ch = channel("su");
    const su = await listener({});
    await su.query(`LISTEN ${ch}`);
    expect(await su.query(`SELECT pg_listening_channels() AS c`)).toEqual([{ c: ch }]);
    await su.query(`NOTIFY ${ch}, 'raw'`);
    expect(await su.inbox.next()).toEqual({ channel: ch, payload: "raw" });
  });

  test("--guard off reads no SQL: tenants' channels are PostgreSQL's, shared by every tenant", async () => {
    const off = await startProxyFor(pg, { args: ["--guard", "off"] });
    try {
      const ch = channel("unguarded");
      const a = await listener({ tenant: TENANT_A, proxy: off });
      await a.query(`LISTEN ${ch}`);
      expect(await a.query(`SELECT pg_listening_channels() AS c`)).toEqual([{ c: ch }]);
      await withClient(tenantUrl(TENANT_B, off), (sql) => sql.unsafe(`NOTIFY ${ch}, 'from b'`));
      expect(await a.inbox.next()).toEqual({ channel: ch, payload: "from b" });
      await a.close();
    } finally {
      await off.stop();
    }
  });
});
