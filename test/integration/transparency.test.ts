/**
 * The transparent state, through the compiled proxy against real PostgreSQL,
 * with real clients (postgres.js and psql): everything a client does after
 * its first ReadyForQuery must pass untouched.
 *
 * Covers, as a tenant user (app_user.tenant_a, SCRAM) and, where it makes
 * sense, as the bypassing superuser:
 * - extended protocol: postgres.js named prepared statements (prepare: true,
 *   visible in pg_prepared_statements and reused), unnamed statements
 *   (prepare: false), type round trips; psql PREPARE / EXECUTE. (psql 15 has
 *   no \bind; libpq's extended protocol and named statements are covered by
 *   pgbench -M extended / -M prepared in load.test.ts.)
 * - pipelining: 500 queries in flight on one connection, answered in order
 *   (a temp sequence proves the server ran them in send order), an error in
 *   the middle of a pipeline affects only its own query, a large result in
 *   the middle of a pipeline;
 * - multi-statement simple Query: several result sets, implicit-transaction
 *   rollback when a later statement fails; psql -c with two statements;
 * - errors inside transactions: 22012 then 25P02 on the next statement,
 *   ROLLBACK, connection usable, tenant context intact; savepoints;
 * - NOTICE / WARNING from DO blocks (postgres.js onnotice, psql stderr),
 *   thousands of notices in order;
 * - LISTEN / NOTIFY between two proxied connections of one tenant, in
 *   order, and from a committed transaction (across tenants nothing
 *   arrives: test/integration/notify.test.ts);
 * - cancel: postgres.js q.cancel() of pg_sleep(60) ends with the server's
 *   57014 and the CancelRequest demonstrably travels proxy → Postgres; a
 *   CancelRequest with a key that does not exist reaches nothing and harms
 *   no one.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { connect as netConnect } from "node:net";
import {
  APP_USER,
  connect,
  describeRun,
  PASSWORDS,
  psql,
  startPostgres,
  startProxyFor,
  startTap,
  SUPERUSER,
  TENANT_A,
  TENANT_B,
  NOTES,
  withClient,
  type Client,
  type PgInstance,
  type ProxyHandle,
  type Tap,
} from "../harness/index.ts";
import { appName, backendsOf, waitFor, within } from "./transparency-helpers.ts";

// test/preload.ts sets a 120 s default, but under bun 1.4.5 a preload's
// setDefaultTimeout only holds for the first test file of a run; later files
// fall back to 5 s. Set it here so this file does not depend on its position.
setDefaultTimeout(120_000);

let pg: PgInstance;
let proxy: ProxyHandle;

beforeAll(async () => {
  pg = await startPostgres();
  proxy = await startProxyFor(pg, { args: ["--log-level", "debug"] });
});

afterAll(async () => {
  await proxy?.stop();
});

interface Who {
  label: string;
  url: () => string;
  /** The role current_user reports. */
  role: string;
  /** current_tenant_id() as this identity sees it. */
  tenant: string | null;
}

const tenantA: Who = {
  label: `tenant ${APP_USER}.${TENANT_A}`,
  url: () => proxy.url({ user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER] }),
  role: APP_USER,
  tenant: TENANT_A,
};
const superuser: Who = {
  label: `superuser ${SUPERUSER}`,
  url: () => proxy.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }),
  role: SUPERUSER,
  tenant: null,
};
const tenantUrl = (tenant: string) => proxy.url({ user: `${APP_USER}.${tenant}`, password: PASSWORDS[APP_USER] });

/** Error thrown by a promise (fails the test if it resolves). */
async function rejection(p: Promise<unknown>): Promise<Error & Record<string, unknown>> {
  try {
    await p;
  } catch (e) {
    return e as Error & Record<string, unknown>;
  }
  throw new Error("expected the query to fail, but it succeeded");
}

async function expectContext(sql: Client, who: Who): Promise<void> {
  const [ctx] = await sql`SELECT current_user::text AS usr, current_tenant_id() AS tenant`;
  expect(ctx).toEqual({ usr: who.role, tenant: who.tenant });
}

// ---------------------------------------------------------------------------

describe("extended protocol and prepared statements", () => {
  for (const who of [tenantA, superuser]) {
    test(`${who.label}: postgres.js prepare:true uses named statements, parsed once and reused`, async () => {
      await withClient(
        who.url(),
        async (sql) => {
          for (let i = 0; i < 5; i++) {
            const [row] = await sql`SELECT ${i}::int4 * 2 AS doubled, ${"v" + i}::text AS label`;
            expect(row).toEqual({ doubled: i * 2, label: `v${i}` });
          }
          // Same connection (max: 1): the server holds the statement under a name.
          const prepared = await sql`
            SELECT name, statement FROM pg_prepared_statements
            WHERE statement = 'SELECT $1::int4 * 2 AS doubled, $2::text AS label'
          `;
          expect(prepared.length).toBe(1);
          expect(prepared[0]!.name).not.toBe("");
          await expectContext(sql, who);
        },
        { prepare: true },
      );
    });

    test(`${who.label}: postgres.js parameter and result types round-trip (named and unnamed statements)`, async () => {
      for (const prepare of [true, false]) {
        await withClient(
          who.url(),
          async (sql) => {
            const bytes = Buffer.from(Array.from({ length: 256 }, (_, i) => i));
            const json = { a: [1, 2, { b: "ü ✓ 日本" }], n: null, t: true };
            const text = "quotes ' \" back\\slash tab\t newline\n nul-free ✓ 日本語 😀";
            const [row] = await sql`
              SELECT ${42}::int4 AS i, ${"9007199254740993"}::int8::text AS big, ${1.5}::float8 AS f,
                     ${text}::text AS t, ${bytes}::bytea AS b, ${sql.json(json)}::jsonb AS j,
                     ${null}::text AS nothing, ${[1, 2, 3]}::int4[] AS arr, ${true}::bool AS yes
            `;
            expect(row!.i).toBe(42);
            expect(row!.big).toBe("9007199254740993");
            expect(row!.f).toBe(1.5);
            expect(row!.t).toBe(text);
            expect(Buffer.compare(row!.b as Buffer, bytes)).toBe(0);
            expect(row!.j).toEqual(json);
            expect(row!.nothing).toBeNull();
            expect(row!.arr).toEqual([1, 2, 3]);
            expect(row!.yes).toBe(true);
            const names = await sql`SELECT count(*)::int AS n FROM pg_prepared_statements`;
            // prepare:false leaves no named statement behind; prepare:true does.
            if (prepare) expect(names[0]!.n).toBeGreaterThan(0);
            else expect(names[0]!.n).toBe(0);
          },
          { prepare },
        );
      }
    });
  }

  test("tenant: prepared statements see only the tenant's rows (RLS applies at execute)", async () => {
    await withClient(
      tenantUrl(TENANT_A),
      async (sql) => {
        for (let i = 0; i < 3; i++) {
          const rows = await sql`SELECT tenant_id, body FROM notes WHERE body LIKE ${"%"} ORDER BY id`;
          expect(rows.map((r) => r.tenant_id)).toEqual(NOTES.tenant_a.map(() => TENANT_A));
          expect(rows.map((r) => r.body)).toEqual([...NOTES.tenant_a]);
        }
      },
      { prepare: true },
    );
  });

  test("psql: PREPARE / EXECUTE / DEALLOCATE as a tenant", async () => {
    const r = await psql(
      tenantUrl(TENANT_A),
      [
        "PREPARE q(text) AS SELECT count(*) FROM notes WHERE body LIKE $1;",
        "EXECUTE q('a:%');",
        "EXECUTE q('%');",
        "EXECUTE q('b:%');",
        "SELECT count(*) FROM pg_prepared_statements WHERE name = 'q';",
        "DEALLOCATE q;",
        "SELECT count(*) FROM pg_prepared_statements;",
      ].join("\n"),
    );
    expect(r.exitCode, describeRun(r)).toBe(0);
    const n = NOTES.tenant_a.length;
    expect(r.stdout.trim().split("\n")).toEqual([String(n), String(n), "0", "1", "0"]);
  });
});

// ---------------------------------------------------------------------------

describe("pipelining", () => {
  for (const who of [tenantA, superuser]) {
    test(`${who.label}: 500 queries in flight on one connection come back complete and in order`, async () => {
      await withClient(who.url(), async (sql) => {
        await sql`CREATE TEMP SEQUENCE pipeline_seq`;
        const [{ pid }] = await sql<[{ pid: number }]>`SELECT pg_backend_pid() AS pid`;
        const N = 500;
        const resolvedOrder: number[] = [];
        const queries = Array.from({ length: N }, (_, i) =>
          sql`SELECT ${i}::int AS i, md5(${"row " + i}) AS h, nextval('pipeline_seq')::int AS seq, pg_backend_pid() AS pid`.then(
            (rows) => {
              resolvedOrder.push(i);
              return rows;
            },
          ),
        );
        const results = await within("500 pipelined queries", Promise.all(queries), 60_000);
        expect(resolvedOrder).toEqual(Array.from({ length: N }, (_, i) => i));
        for (let i = 0; i < N; i++) {
          const row = results[i]![0]!;
          expect(row.i).toBe(i);
          expect(row.h).toBe(new Bun.CryptoHasher("md5").update(`row ${i}`).digest("hex"));
          // The server executed them in the order they were sent, on one backend.
          expect(row.seq).toBe(i + 1);
          expect(row.pid).toBe(pid);
        }
        await expectContext(sql, who);
      });
    });
  }

  test("tenant: an error in the middle of a pipeline fails only that query", async () => {
    await withClient(tenantUrl(TENANT_A), async (sql) => {
      const N = 200;
      const bad = new Set([0, 57, 100, 199]);
      const settled = await within(
        "pipelined queries with errors",
        Promise.allSettled(
          Array.from({ length: N }, (_, i) =>
            bad.has(i) ? sql`SELECT 1 / ${i - i}::int AS boom` : sql`SELECT ${i}::int AS i`,
          ),
        ),
        60_000,
      );
      for (let i = 0; i < N; i++) {
        const s = settled[i]!;
        if (bad.has(i)) {
          expect(s.status).toBe("rejected");
          expect((s as PromiseRejectedResult).reason.code).toBe("22012");
        } else {
          expect(s.status).toBe("fulfilled");
          expect((s as unknown as PromiseFulfilledResult<{ i: number }[]>).value[0]!.i).toBe(i);
        }
      }
      await expectContext(sql, tenantA);
    });
  });

  test("tenant: a large result in the middle of a pipeline keeps everything in order", async () => {
    await withClient(tenantUrl(TENANT_A), async (sql) => {
      const results = await within(
        "pipeline with a large result",
        Promise.all([
          sql`SELECT 'before' AS tag`,
          sql`SELECT g AS n, repeat(md5(g::text), 8) AS pad FROM generate_series(1, 20000) g`,
          sql`SELECT 'after' AS tag`,
          sql`SELECT count(*)::int AS n FROM notes`,
        ]),
        60_000,
      );
      expect(results[0]![0]!.tag).toBe("before");
      const big = results[1]!;
      expect(big.length).toBe(20000);
      for (let i = 0; i < big.length; i += 997) {
        expect(big[i]!.n).toBe(i + 1);
        expect(big[i]!.pad).toBe(new Bun.CryptoHasher("md5").update(String(i + 1)).digest("hex").repeat(8));
      }
      expect(big[19999]!.n).toBe(20000);
      expect(results[2]![0]!.tag).toBe("after");
      expect(results[3]![0]!.n).toBe(NOTES.tenant_a.length);
    });
  });
});

// ---------------------------------------------------------------------------

describe("multi-statement simple Query", () => {
  for (const who of [tenantA, superuser]) {
    test(`${who.label}: postgres.js sql.unsafe with several statements returns every result set`, async () => {
      await withClient(who.url(), async (sql) => {
        const res = (await sql.unsafe(
          "SELECT 1 AS a; SELECT 2 AS b, 'two' AS c; SELECT current_tenant_id() AS t; SELECT g FROM generate_series(1, 3) g",
        )) as unknown as Record<string, unknown>[][];
        expect(res.length).toBe(4);
        expect([...res[0]!]).toEqual([{ a: 1 }]);
        expect([...res[1]!]).toEqual([{ b: 2, c: "two" }]);
        expect([...res[2]!]).toEqual([{ t: who.tenant }]);
        expect([...res[3]!]).toEqual([{ g: 1 }, { g: 2 }, { g: 3 }]);
      });
    });
  }

  test("tenant: a failing statement rolls back the whole implicit transaction; the connection stays usable", async () => {
    await withClient(tenantUrl(TENANT_A), async (sql) => {
      await sql`CREATE TEMP TABLE multi (n int)`;
      const err = await rejection(
        sql.unsafe("INSERT INTO multi VALUES (1); SELECT 1/0; INSERT INTO multi VALUES (3)"),
      );
      expect(err.code).toBe("22012");
      const [{ n }] = await sql<[{ n: number }]>`SELECT count(*)::int AS n FROM multi`;
      expect(n).toBe(0);
      await expectContext(sql, tenantA);
    });
  });

  test("psql -c with two statements prints both results", async () => {
    for (const who of [tenantA, superuser]) {
      const r = await psql(who.url(), "select 1; select 2; select coalesce(current_tenant_id(), '<none>')");
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout.trim().split("\n")).toEqual(["1", "2", who.tenant ?? "<none>"]);
    }
  });
});

// ---------------------------------------------------------------------------

describe("errors inside transactions", () => {
  test("tenant: error, then 25P02 on the next statement, ROLLBACK, connection usable and context intact", async () => {
    await withClient(tenantUrl(TENANT_A), async (sql) => {
      const c = await sql.reserve();
      try {
        await c`BEGIN`;
        await c`SELECT 1`;
        const first = await rejection(c`SELECT 1/0`);
        expect(first.code).toBe("22012");
        const aborted = await rejection(c`SELECT 1`);
        expect(aborted.code).toBe("25P02");
        const again = await rejection(c`SELECT count(*) FROM notes`);
        expect(again.code).toBe("25P02");
        await c`ROLLBACK`;
        const [{ one }] = await c<[{ one: number }]>`SELECT 1 AS one`;
        expect(one).toBe(1);
        const [ctx] = await c`SELECT current_user::text AS usr, current_tenant_id() AS tenant, count(*)::int AS n FROM notes`;
        expect(ctx).toEqual({ usr: APP_USER, tenant: TENANT_A, n: NOTES.tenant_a.length });
      } finally {
        c.release();
      }
    });
  });

  test("tenant: a failed sql.begin rolls back; savepoints roll back to the savepoint", async () => {
    await withClient(tenantUrl(TENANT_A), async (sql) => {
      await sql`CREATE TEMP TABLE tx_t (n int)`;
      const err = await rejection(
        sql.begin(async (tx) => {
          await tx`INSERT INTO tx_t VALUES (1)`;
          await tx`SELECT 1/0`;
        }),
      );
      expect(err.code).toBe("22012");
      expect((await sql`SELECT count(*)::int AS n FROM tx_t`)[0]!.n).toBe(0);

      await sql.begin(async (tx) => {
        await tx`INSERT INTO tx_t VALUES (1)`;
        const spErr = await rejection(
          tx.savepoint(async (sp) => {
            await sp`INSERT INTO tx_t VALUES (2)`;
            await sp`SELECT 1/0`;
          }),
        );
        expect(spErr.code).toBe("22012");
        await tx`INSERT INTO tx_t VALUES (3)`;
      });
      const rows = await sql`SELECT n FROM tx_t ORDER BY n`;
      expect(rows.map((r) => r.n)).toEqual([1, 3]);
      await expectContext(sql, tenantA);
    });
  });

  test("psql: error inside a transaction, 25P02, ROLLBACK, then the session goes on", async () => {
    const r = await psql(
      tenantUrl(TENANT_A),
      null,
      {
        args: ["-v", "ON_ERROR_STOP=0", "-v", "VERBOSITY=verbose"],
        stdin: [
          "\\set VERBOSITY verbose",
          "BEGIN;",
          "SELECT 1/0;",
          "SELECT 1;",
          "ROLLBACK;",
          "SELECT 'after', current_tenant_id(), count(*) FROM notes;",
        ].join("\n"),
      },
    );
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stderr).toContain("22012");
    expect(r.stderr).toContain("25P02");
    expect(r.stdout.trim()).toBe(`after|${TENANT_A}|${NOTES.tenant_a.length}`);
  });
});

// ---------------------------------------------------------------------------

describe("NOTICE", () => {
  test("tenant: RAISE NOTICE / WARNING in a DO block reach postgres.js onnotice, before the result, in order", async () => {
    const notices: { severity: string; code: string; message: string }[] = [];
    let doneAt = -1;
    const sql = connect(tenantUrl(TENANT_A), {
      onnotice: (n) => notices.push({ severity: String(n.severity), code: String(n.code), message: String(n.message) }),
    });
    try {
      await sql.unsafe(`
        DO $$
        BEGIN
          RAISE NOTICE 'hello %', current_tenant_id();
          RAISE NOTICE 'second notice';
          RAISE WARNING 'a warning';
        END
        $$`).then(() => {
        doneAt = notices.length;
      });
      expect(doneAt).toBe(3);
      expect(notices).toEqual([
        { severity: "NOTICE", code: "00000", message: `hello ${TENANT_A}` },
        { severity: "NOTICE", code: "00000", message: "second notice" },
        { severity: "WARNING", code: "01000", message: "a warning" },
      ]);

      // Thousands of small asynchronous messages interleaved with nothing else.
      notices.length = 0;
      await sql.unsafe(`DO $$ BEGIN FOR i IN 1..3000 LOOP RAISE NOTICE 'n%', i; END LOOP; END $$`);
      expect(notices.length).toBe(3000);
      expect(notices.every((n, i) => n.message === `n${i + 1}`)).toBe(true);
    } finally {
      await sql.end({ timeout: 5 });
    }
  });

  test("psql prints the NOTICE on stderr", async () => {
    const r = await psql(tenantUrl(TENANT_B), "DO $$ BEGIN RAISE NOTICE 'tenant is %', current_tenant_id(); END $$");
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stderr).toContain(`NOTICE:  tenant is ${TENANT_B}`);
  });
});

// ---------------------------------------------------------------------------

describe("LISTEN / NOTIFY", () => {
  test("between two proxied connections of one tenant: every notification arrives, in order", async () => {
    const listener = connect(tenantUrl(TENANT_A));
    const notifier = connect(tenantUrl(TENANT_A));
    try {
      const channel = "mg_transparency_chan";
      const got: string[] = [];
      const N = 200;
      let wake: () => void = () => {};
      const enough = (n: number) =>
        new Promise<void>((res) => {
          const check = () => (got.length >= n ? res() : (wake = check));
          check();
        });
      await listener.listen(channel, (payload) => {
        got.push(payload);
        wake();
      });
      for (let i = 0; i < N; i++) await notifier.notify(channel, `payload ${i}`);
      await within(`${N} notifications`, enough(N), 30_000);
      expect(got).toEqual(Array.from({ length: N }, (_, i) => `payload ${i}`));

      // From a committed transaction, with an odd payload.
      const odd = "ü ✓ 'quoted' \"double\" \\ tab\t";
      await notifier.begin(async (tx) => {
        await tx`SELECT pg_notify(${channel}, ${odd})`;
      });
      await within("notification from a transaction", enough(N + 1), 30_000);
      expect(got[N]).toBe(odd);

      // The listening connection is still an ordinary, correctly scoped session.
      await expectContext(listener, tenantA);
    } finally {
      await listener.end({ timeout: 5 });
      await notifier.end({ timeout: 5 });
    }
  });
});

// ---------------------------------------------------------------------------

const CANCEL_REQUEST = 80877102;

/** Send one CancelRequest on a raw connection and resolve when the peer closes it. */
function sendRawCancel(host: string, port: number, processId: number, secretKey: number): Promise<void> {
  return new Promise((res, rej) => {
    const packet = Buffer.alloc(16);
    packet.writeInt32BE(16, 0);
    packet.writeInt32BE(CANCEL_REQUEST, 4);
    packet.writeInt32BE(processId, 8);
    packet.writeInt32BE(secretKey | 0, 12);
    const sock = netConnect({ host, port }, () => sock.write(packet));
    const timer = setTimeout(() => {
      sock.destroy();
      rej(new Error("the proxy did not close the CancelRequest connection within 10 s"));
    }, 10_000);
    sock.on("data", () => {}); // a CancelRequest gets no answer; drain anything anyway
    sock.on("error", () => {});
    sock.on("close", () => {
      clearTimeout(timer);
      res();
    });
  });
}

describe("cancel", () => {
  let tap: Tap;
  let tapped: ProxyHandle;

  beforeAll(async () => {
    // A recording relay between this proxy and Postgres shows which
    // CancelRequests actually reach the server side.
    tap = await startTap({ host: pg.host, port: pg.port });
    tapped = await startProxyFor(pg, { upstreamHost: tap.host, upstreamPort: tap.port, args: ["--log-level", "debug"] });
  });

  afterAll(async () => {
    await tapped?.stop();
    await tap?.stop();
  });

  const cancelsSeen = () => tap.connections.filter((c) => c.preludes.includes(CANCEL_REQUEST)).length;
  const tappedTenantUrl = (tenant: string, params?: Record<string, string>) =>
    tapped.url({ user: `${APP_USER}.${tenant}`, password: PASSWORDS[APP_USER], params });

  test("a CancelRequest with a key nobody holds reaches nothing and harms no one", async () => {
    const name = appName("bogus-cancel");
    const victim = connect(tappedTenantUrl(TENANT_A), { connection: { application_name: name } });
    const bystander = connect(tappedTenantUrl(TENANT_B));
    const admin = await pg.sql.reserve();
    try {
      await victim`CREATE TEMP TABLE IF NOT EXISTS warmup (n int)`; // session is up
      await admin`CREATE TABLE IF NOT EXISTS public.cancel_lock (n int)`;
      await admin`GRANT SELECT ON public.cancel_lock TO ${admin(APP_USER)}`;
      // The victim's query blocks on a lock the admin holds: it is running
      // on the server while the bogus cancels arrive.
      await admin`BEGIN`;
      await admin`LOCK TABLE public.cancel_lock IN ACCESS EXCLUSIVE MODE`;
      const blocked = victim`SELECT count(*)::int AS n, 'finished' AS tag FROM public.cancel_lock`.then(
        (r) => r,
        (e) => e as Error,
      );
      const [backend] = await waitFor("the victim's query to wait on the lock", async () => {
        const b = await backendsOf(pg.sql, name);
        return b.length === 1 && b[0]!.wait_event_type === "Lock" ? b : null;
      });

      const before = cancelsSeen();
      // Random keys, and the server's real backend pid with a guessed secret:
      // neither is a key the proxy handed out.
      const keys: [number, number][] = [
        [1 + Math.floor(Math.random() * 0x7ffffffe), Math.floor(Math.random() * 0xffffffff)],
        [backend!.pid, Math.floor(Math.random() * 0xffffffff)],
        [backend!.pid, 0],
        [0, 0],
      ];
      for (const [pid, secret] of keys) await sendRawCancel(tapped.host, tapped.port, pid, secret);

      // Other sessions keep working and the proxy still accepts connections.
      const [{ n }] = await bystander<[{ n: number }]>`SELECT count(*)::int AS n FROM notes`;
      expect(n).toBe(NOTES.tenant_b.length);
      await withClient(tappedTenantUrl(TENANT_B), async (sql) => {
        expect((await sql`SELECT current_tenant_id() AS t`)[0]!.t).toBe(TENANT_B);
      });
      expect(cancelsSeen()).toBe(before);

      // Release the lock: the victim's query completes normally, not cancelled.
      await admin`COMMIT`;
      const result = await within("the blocked query to finish", blocked, 30_000);
      const shown: unknown =
        result instanceof Error ? `error ${(result as Error & { code?: string }).code}: ${result.message}` : [...result];
      expect(shown).toEqual([
        { n: 0, tag: "finished" },
      ]);
      expect(cancelsSeen()).toBe(before);
    } finally {
      await admin`ROLLBACK`.catch(() => {});
      admin.release();
      await pg.sql`DROP TABLE IF EXISTS public.cancel_lock`;
      await victim.end({ timeout: 5 });
      await bystander.end({ timeout: 5 });
    }
  });

  test("postgres.js q.cancel() of pg_sleep(60) goes through the proxy and ends with 57014", async () => {
    const name = appName("cancel");
    const sql = connect(tappedTenantUrl(TENANT_A), { connection: { application_name: name } });
    try {
      await expectContext(sql, tenantA);
      const before = cancelsSeen();
      const q = sql`SELECT pg_sleep(60)`;
      const outcome = q.then(
        () => new Error("pg_sleep(60) finished instead of being cancelled"),
        (e) => e as Error & Record<string, unknown>,
      );
      await waitFor("pg_sleep(60) to be running on the server", async () => {
        const b = await backendsOf(pg.sql, name);
        return b.some((x) => x.state === "active" && /pg_sleep\(60\)/.test(x.query));
      });
      // q.cancel() returns a promise at runtime (typed void): it settles once the CancelRequest connection closes.
      await within("q.cancel()", Promise.resolve(q.cancel() as unknown), 15_000);
      const err = (await within("the cancelled query to end", outcome, 30_000)) as Error & Record<string, unknown>;
      expect(err.message).toContain("canceling statement due to user request");
      expect(err.code).toBe("57014");
      // The server's own error (postgres.js's local "not sent yet" 57014 has no severity).
      expect(err.severity).toBe("ERROR");
      // The CancelRequest reached the server side through the proxy.
      expect(cancelsSeen()).toBe(before + 1);
      // The connection is usable afterwards, with its context.
      await expectContext(sql, tenantA);
      expect((await backendsOf(pg.sql, name)).every((b) => !/pg_sleep\(60\)/.test(b.query) || b.state !== "active")).toBe(true);
    } finally {
      await sql.end({ timeout: 5 });
    }
  });

  test("superuser: q.cancel() through the proxy ends with 57014", async () => {
    const name = appName("cancel-su");
    const sql = connect(tapped.url({ user: SUPERUSER, password: PASSWORDS[SUPERUSER] }), {
      connection: { application_name: name },
    });
    try {
      const q = sql`SELECT pg_sleep(60)`;
      const outcome = q.then(
        () => new Error("pg_sleep(60) finished instead of being cancelled"),
        (e) => e as Error & Record<string, unknown>,
      );
      await waitFor("pg_sleep(60) to be running on the server", async () => {
        const b = await backendsOf(pg.sql, name);
        return b.some((x) => x.state === "active" && /pg_sleep\(60\)/.test(x.query));
      });
      // q.cancel() returns a promise at runtime (typed void): it settles once the CancelRequest connection closes.
      await within("q.cancel()", Promise.resolve(q.cancel() as unknown), 15_000);
      const err = (await within("the cancelled query to end", outcome, 30_000)) as Error & Record<string, unknown>;
      expect(err.code).toBe("57014");
      expect(err.severity).toBe("ERROR");
      expect((await sql`SELECT 1 AS one`)[0]!.one).toBe(1);
    } finally {
      await sql.end({ timeout: 5 });
    }
  });
});
