/**
 * The side channels of one database role shared by every tenant (issue 10),
 * each tried the way an attacker with SQL injection in tenant `a` would,
 * through the compiled proxy, on a database prepared by `multigres setup`
 * from the state PostgreSQL 14 and `GRANT ALL` leave behind: PUBLIC may
 * create in `public`, the app role holds every table privilege and
 * pg_read_all_stats, pg_stat_statements is installed.
 *
 * Each attack comes with its positive control: what the superuser (or the
 * victim itself) sees, so a refusal cannot pass for an empty result. No
 * sleeps: each step waits for the statement before it.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CONTEXT_SECRET, connect, startPostgres, startProxy, userlistLine, writeTempFile, type Client, type PgInstance, type ProxyHandle } from "../harness/index.ts";
import { authenticateToReady } from "../harness/raw-socket.ts";
import { describeCli, multigres, Scratch } from "./db-cli-helpers.ts";
import { RawPg, startupPacket } from "./fault-helpers.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

const PASSWORD = { a: "tenant-a-password", b: "tenant-b-password" } as const;
type Tenant = keyof typeof PASSWORD;

let pg: PgInstance;
let scratch: Scratch;
let proxy: ProxyHandle;
/** The same, with --guard strict. */
let strictProxy: ProxyHandle;
let db: { name: string; url: string };
let role: string;
let dir: string;
const clients: Client[] = [];

/** A tenant's session through the proxy (postgres.js, one connection). */
function tenant(t: Tenant, through: ProxyHandle = proxy): Client {
  const c = connect(through.url({ user: `${role}.${t}`, password: PASSWORD[t], database: db.name }), { max: 1 });
  clients.push(c);
  return c;
}

/** The SQLSTATE a statement fails with, or "allowed". */
async function outcome(p: Promise<unknown>): Promise<string> {
  const e = (await p.then(
    () => undefined,
    (x) => x,
  )) as { code?: string } | undefined;
  return e ? String(e.code) : "allowed";
}

const superuser = <T,>(fn: (sql: Client) => Promise<T>) => scratch.as(db.name, fn);

/** A result as plain rows, for toEqual and destructuring. */
const rows = async (q: PromiseLike<readonly object[]>) => [...(await q)] as [Record<string, unknown>, ...Record<string, unknown>[]];

beforeAll(async () => {
  pg = await startPostgres();
  scratch = new Scratch(pg, "mg_side");
  db = await scratch.database();
  role = scratch.role("app");
  dir = mkdtempSync(join(tmpdir(), "multigres-side-"));

  // The open state setup finds.
  await pg.sql.unsafe(`CREATE ROLE "${role}" LOGIN; GRANT pg_read_all_stats TO "${role}";`);
  await superuser((sql) =>
    sql.unsafe(`
      GRANT CREATE ON SCHEMA public TO PUBLIC;
      CREATE EXTENSION pg_stat_statements;
      CREATE TABLE public.secrets (id bigserial PRIMARY KEY, tenant_id text NOT NULL, v text NOT NULL);
      CREATE INDEX ON public.secrets (v);  -- not led by the tenant column: the bisection oracle doctor warns about
      GRANT ALL ON ALL TABLES IN SCHEMA public TO "${role}";
      GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "${role}";`),
  );

  const upstreamFile = join(dir, "upstream.pw");
  const r = await multigres(["setup", "--database-url", db.url, "--app-role", role, "--upstream-password-file", upstreamFile], {
    MULTIGRES_CONTEXT_SECRET: CONTEXT_SECRET,
  });
  if (r.exitCode !== 0) throw new Error(describeCli(r));

  await superuser((sql) =>
    sql.unsafe(`
      SELECT multigres.enable_tenant_rls('public.secrets');
      INSERT INTO public.secrets (tenant_id, v) VALUES ('a', 'a1'), ('b', 'b1'), ('b', 'b-card-4111-1111');`),
  );
  const authFile = writeTempFile(`side-userlist-${process.pid}.txt`, `${(["a", "b"] as const).map((t) => userlistLine(`${role}.${t}`, PASSWORD[t])).join("\n")}\n`);
  const args = ["--auth-file", authFile, "--upstream-password-file", upstreamFile, "--database", db.name];
  proxy = await startProxy({ upstreamPort: pg.port, database: db.name, args });
  strictProxy = await startProxy({ upstreamPort: pg.port, database: db.name, args: [...args, "--guard", "strict"] });
});

afterAll(async () => {
  await Promise.all(clients.map((c) => c.end({ timeout: 5 }).catch(() => {})));
  await proxy?.stop();
  await strictProxy?.stop();
  await scratch?.drop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("pg_stat_activity: other tenants' statements", () => {
  test("tenant b's last statement, literal included, is there for the superuser and refused to tenant a", async () => {
    const b = tenant("b");
    expect(await rows(b`SELECT v FROM public.secrets WHERE v = 'b-card-4111-1111'`)).toEqual([{ v: "b-card-4111-1111" }]);
    const [seen] = await superuser((sql) => sql`SELECT count(*)::int AS n FROM pg_stat_activity WHERE query LIKE '%b-card-4111-1111%' AND usename = ${role}`);
    expect(seen?.n).toBe(1);

    const a = tenant("a");
    expect({
      view: await outcome(a`SELECT query FROM pg_stat_activity`),
      function: await outcome(a`SELECT query FROM pg_stat_get_activity(NULL)`),
      backend: await outcome(a`SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s`),
      locks: await outcome(a`SELECT objid FROM pg_locks`),
    }).toEqual({ view: "42501", function: "42501", backend: "42501", locks: "42501" });
  });
});

describe("index bisection: counters of the rows row-level security drops", () => {
  test("tenant a's range scans count tenant b's rows for the superuser's statistics, never for tenant a", async () => {
    const a = tenant("a");
    await a`SELECT v FROM public.secrets WHERE v > 'b'`;
    expect({
      xactTables: await outcome(a`SELECT idx_tup_fetch FROM pg_stat_xact_user_tables`),
      userIndexes: await outcome(a`SELECT idx_tup_read FROM pg_stat_user_indexes`),
      fetched: await outcome(a`SELECT pg_stat_get_xact_tuples_fetched('public.secrets'::regclass)`),
      returned: await outcome(a`SELECT pg_stat_get_tuples_returned('public.secrets'::regclass)`),
      database: await outcome(a`SELECT tup_fetched FROM pg_stat_database`),
    }).toEqual({ xactTables: "42501", userIndexes: "42501", fetched: "42501", returned: "42501", database: "42501" });
    const [control] = await superuser((sql) => sql`SELECT count(*)::int AS n FROM pg_stat_user_tables WHERE relname = 'secrets'`);
    expect(control?.n).toBe(1);
  });

  test("EXPLAIN ANALYZE shows the dropped rows under --guard on; --guard strict refuses it, also built at run time", async () => {
    const query = `EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT v FROM public.secrets WHERE v > 'b'`;
    const on = tenant("a");
    await on`SET enable_seqscan = off`; // the attacker's choice of plan: the index on v
    const plan = (await rows(on.unsafe(query))).map((r) => String(r["QUERY PLAN"])).join("\n");
    expect(plan).toContain("(actual rows=0 "); // a sees none of them...
    expect(plan).toMatch(/Rows Removed by Filter: 2\b/); // ...and learns that tenant b has two values above 'b'
    const a = tenant("a", strictProxy);
    expect({
      explain: await outcome(a.unsafe(query)),
      dynamic: await outcome(a.unsafe(`DO $$ DECLARE r record; BEGIN FOR r IN EXECUTE 'EXPLAIN ANALYZE SELECT 1' LOOP END LOOP; END $$`)),
    }).toEqual({ explain: "42501", dynamic: "42501" });
    expect(await rows(a`SELECT v FROM public.secrets`)).toEqual([{ v: "a1" }]);
  });
});

describe("pg_stat_statements: utility statements kept verbatim", () => {
  test("the view and its function are refused to tenant sessions", async () => {
    const a = tenant("a");
    expect({
      view: await outcome(a`SELECT query FROM pg_stat_statements`),
      function: await outcome(a`SELECT query FROM pg_stat_statements(true)`),
    }).toEqual({ view: "42501", function: "42501" });
  });
});

describe("trojans: objects planted for other tenants' statements to resolve to", () => {
  test("no schema to create in, no trigger, no TRUNCATE, no role change", async () => {
    const a = tenant("a");
    expect({
      operator: await outcome(a.unsafe(`CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = texteq)`)),
      function: await outcome(a.unsafe(`CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE sql AS 'SELECT $1'`)),
      schema: await outcome(a.unsafe(`CREATE SCHEMA "${role}"`)),
      trigger: await outcome(
        a.unsafe(`CREATE FUNCTION pg_temp.leak() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
                  CREATE TRIGGER leak BEFORE INSERT ON public.secrets FOR EACH ROW EXECUTE FUNCTION pg_temp.leak()`),
      ),
      truncate: await outcome(a`TRUNCATE public.secrets`),
      alterRole: await outcome(a.unsafe(`ALTER ROLE "${role}" SET search_path = "$user", public, pg_catalog`)),
    }).toEqual({ operator: "42501", function: "42501", schema: "42501", trigger: "42501", truncate: "42501", alterRole: "42501" });
    const [{ n }] = await superuser((sql) => rows(sql`SELECT count(*)::int AS n FROM public.secrets`));
    expect(n).toBe(3);
  });
});

describe("LISTEN/NOTIFY: channels are per database", () => {
  test("tenant a neither hears tenant b's notifications nor speaks into its channel; tenant b hears its own, by its own name", async () => {
    const heard: string[] = [];
    const b = tenant("b");
    const listening = await b.listen("orders", (payload) => heard.push(payload));
    try {
      const a = tenant("a");
      await a.notify("orders", "forged by a");
      await a`SELECT pg_notify('orders', 'forged by a, pg_notify')`;
      // Commit order is delivery order: had a's reached b, it would come first.
      await tenant("b").notify("orders", "from b");
      await b`SELECT 1`; // a round trip after the notification was sent
      while (heard.length === 0) await b`SELECT 1`;
      expect(heard).toEqual(["from b"]);
    } finally {
      await listening.unlisten();
    }
  });
});

describe("large objects: owned by the role, not a tenant", () => {
  test("neither SQL nor the fast-path function call reaches them", async () => {
    const oid = String((await superuser((sql) => rows(sql`SELECT lo_from_bytea(0, 'tenant b''s file') AS oid`)))[0].oid);
    const a = tenant("a");
    expect({
      read: await outcome(a`SELECT lo_get(${oid}::oid)`),
      write: await outcome(a`SELECT lo_put(${oid}::oid, 0, 'x')`),
      unlink: await outcome(a`SELECT lo_unlink(${oid}::oid)`),
      create: await outcome(a`SELECT lo_from_bytea(0, 'mine')`),
      list: await outcome(a`SELECT oid FROM pg_largeobject_metadata`),
    }).toEqual({ read: "42501", write: "42501", unlink: "42501", create: "42501", list: "42501" });

    // libpq's lo_open() is a FunctionCall message ('F'), not SQL: lo_open(oid, INV_READ) is OID 952.
    const raw = await RawPg.open(proxy.port, "fast-path");
    try {
      const user = `${role}.a`;
      await raw.send(startupPacket({ user, database: db.name }));
      await authenticateToReady((what) => raw.readMessage(what), (bytes) => raw.send(bytes), PASSWORD.a, user);
      const args = Buffer.alloc(4 + 2 + 2 + 2 + 2 * (4 + 4) + 2);
      let at = args.writeInt32BE(952, 0);
      at = args.writeInt16BE(1, at); // one format code: binary
      at = args.writeInt16BE(1, at);
      at = args.writeInt16BE(2, at); // two arguments
      at = args.writeInt32BE(4, at);
      at = args.writeUInt32BE(Number(oid), at);
      at = args.writeInt32BE(4, at);
      at = args.writeInt32BE(0x40000, at); // INV_READ
      args.writeInt16BE(1, at); // result format
      const header = Buffer.alloc(5);
      header.write("F", 0);
      header.writeInt32BE(4 + args.length, 1);
      await raw.send(Buffer.concat([header, args]));
      const replies = await raw.readUntil("Z", "the answer to lo_open by function call").catch((e: Error) => e);
      // readUntil throws on the ErrorResponse, with its fields in the message.
      expect(String(replies)).toContain('"C":"42501"');
    } finally {
      raw.destroy();
    }
  });
});

describe("availability: one tenant against every tenant's sessions", () => {
  test("tenant a cannot cancel or terminate tenant b's backend", async () => {
    const b = tenant("b");
    const pid = String((await rows(b`SELECT pg_backend_pid() AS pid`))[0].pid);
    const a = tenant("a");
    expect({
      cancel: await outcome(a`SELECT pg_cancel_backend(${pid}::int)`),
      terminate: await outcome(a`SELECT pg_terminate_backend(${pid}::int)`),
    }).toEqual({ cancel: "42501", terminate: "42501" });
    expect(await rows(b`SELECT v FROM public.secrets ORDER BY v`)).toEqual([{ v: "b-card-4111-1111" }, { v: "b1" }]);
  });

  test("--guard strict: no LOCK that stalls other tenants, no role-level setting built at run time", async () => {
    const a = tenant("a", strictProxy);
    await a`BEGIN`;
    expect(await outcome(a`LOCK TABLE public.secrets IN ACCESS EXCLUSIVE MODE`)).toBe("42501");
    await a`ROLLBACK`;
    expect(await outcome(a.unsafe(`DO $$ BEGIN EXECUTE format('ALTER ROLE %I SET statement_timeout = 1', current_user); END $$`))).toBe("42501");
    const [setting] = await superuser((sql) => rows(sql`SELECT count(*)::int AS n FROM pg_db_role_setting WHERE setrole = ${role}::regrole AND 'statement_timeout=1' = ANY (setconfig)`));
    expect(setting.n).toBe(0);
    // Under --guard on the same LOCK goes through (why strict refuses it).
    const on = tenant("a");
    await on`BEGIN`;
    expect(await outcome(on`LOCK TABLE public.secrets IN ACCESS EXCLUSIVE MODE`)).toBe("allowed");
    await on`ROLLBACK`;
  });

  test("ALTER ROLE … SET row_security = off, even through dynamic SQL, does not break other tenants' new sessions", async () => {
    const a = tenant("a");
    // The guard refuses the statement; a DO block builds it where the guard cannot read it.
    expect(await outcome(a.unsafe(`ALTER ROLE "${role}" SET row_security = off`))).toBe("42501");
    await a.unsafe(`DO $$ BEGIN EXECUTE format('ALTER ROLE %I SET row_security = off', current_user); END $$`);
    try {
      const [setting] = await superuser((sql) => sql`SELECT setconfig FROM pg_db_role_setting WHERE setrole = ${role}::regrole AND setdatabase = 0`);
      expect(setting?.setconfig).toContain("row_security=off");
      // A new session of tenant b: the proxy's startup parameter outranks the role's default.
      const b = tenant("b");
      expect(await rows(b`SELECT current_setting('row_security') AS rs`)).toEqual([{ rs: "on" }]);
      expect(await rows(b`SELECT v FROM public.secrets ORDER BY v`)).toEqual([{ v: "b-card-4111-1111" }, { v: "b1" }]);
    } finally {
      await pg.sql.unsafe(`ALTER ROLE "${role}" RESET row_security`);
    }
  });
});
