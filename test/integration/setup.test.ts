/**
 * `multigres setup` through the compiled binary against real PostgreSQL.
 * Every test gets a fresh database (CREATE DATABASE) and its own role names,
 * so nothing here touches the shared fixtures.
 *
 * Covers: a first run creates the schema, tables, functions, role and key
 * and says so line by line; a second run prints "nothing to change" and
 * writes nothing (catalog rows keep their xmin); the stored key is the one
 * derived from MULTIGRES_CONTEXT_SECRET (id and pads); the secret is never
 * printed unless generated; a generated secret works end to end through the
 * proxy; an existing role is hardened (SUPERUSER, BYPASSRLS, CREATEROLE,
 * NOLOGIN, direct and indirect membership in privileged roles, grants on
 * the key table); rotation with --retire-other-keys; --tenant-setting
 * rewrites the verifier; --config and the secret file; upgrade from a
 * schema-version-1 setup; a failing setup changes nothing; usage errors.
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import { createHmac } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { connectError, startPostgres, startProxy, writeTempFile, withClient, type PgInstance } from "../harness/index.ts";
import { contextKeyId, deriveContextKey, signContext } from "../../src/tenant/context.ts";
import { describeCli, multigres, Scratch } from "./db-cli-helpers.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

const SECRET_A = "setup-test-secret-A-0123456789abcdefghijkl";
const SECRET_B = "setup-test-secret-B-0123456789abcdefghijkl";
const idOf = (secret: string) => contextKeyId(deriveContextKey(secret));

let pg: PgInstance;
let scratch: Scratch;

beforeAll(async () => {
  pg = await startPostgres();
  scratch = new Scratch(pg, "mg_setup");
});

afterAll(async () => {
  await scratch?.drop();
});

function setup(url: string, role: string, opts: { secret?: string; args?: string[]; env?: Record<string, string> } = {}) {
  return multigres(
    ["setup", "--database-url", url, "--app-role", role, ...(opts.args ?? [])],
    { ...(opts.secret !== undefined ? { MULTIGRES_CONTEXT_SECRET: opts.secret } : {}), ...(opts.env ?? {}) },
  );
}

const lines = (s: string) => s.split("\n").filter((l) => l !== "");

/** The key setup.sql stores for a 32-byte key: HMAC pads, as in multigres.add_context_key. */
function pads(secret: string): { inner: Buffer; outer: Buffer } {
  const key = Buffer.from(deriveContextKey(secret));
  const padded = Buffer.concat([key, Buffer.alloc(64 - key.length)]);
  return { inner: Buffer.from(padded.map((b) => b ^ 0x36)), outer: Buffer.from(padded.map((b) => b ^ 0x5c)) };
}

describe("a fresh database", () => {
  test("first run installs everything and prints one line per change; the second prints nothing to change and writes nothing", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");

    const first = await setup(db.url, role, { secret: SECRET_A });
    expect(first.exitCode, describeCli(first)).toBe(0);
    expect(lines(first.stdout)).toEqual([
      "created schema multigres",
      "created table multigres.meta",
      "created table multigres.context_keys",
      "created function multigres.add_context_key(bytea)",
      "created function multigres.backend_binding()",
      "created function multigres.current_tenant_id()",
      "created function multigres.context_status(text)",
      "created function public.current_tenant_id()",
      "created function multigres.enable_tenant_rls(regclass,name)",
      "set schema_version 3",
      `created role ${role} (NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB NOREPLICATION LOGIN)`,
      `stored context key ${idOf(SECRET_A)}`,
      // What a fresh PostgreSQL 15 database lets every role do (see the hardening tests).
      expect.stringMatching(new RegExp(`^activity: revoked SELECT on \\d+ views \\(pg_locks, pg_prepared_xacts, pg_stat_activity, …\\) .* from PUBLIC and ${role}; granted to pg_monitor$`)),
      expect.stringMatching(/^statistics: revoked SELECT on \d+ views .* EXECUTE on \d+ functions .*; granted to pg_monitor$/),
      expect.stringMatching(/^large-objects: revoked SELECT on 1 view \(pg_largeobject_metadata\) and EXECUTE on \d+ functions /),
      `signals: revoked EXECUTE on 2 functions (pg_cancel_backend(integer), pg_terminate_backend(integer,bigint)) from PUBLIC and ${role}; granted to pg_signal_backend`,
      `role-settings: ${role}: pinned log_parameter_max_length = 0 (a superuser-only setting: the role cannot change it back)`,
      expect.stringMatching(new RegExp(`^note: role ${role} has no password yet`)),
    ]);

    // What it says it did, it did.
    await scratch.as(db.name, async (sql) => {
      const [r] = await sql`
        SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolcanlogin
        FROM pg_roles WHERE rolname = ${role}`;
      expect(r).toEqual({ rolsuper: false, rolbypassrls: false, rolcreaterole: false, rolcreatedb: false, rolreplication: false, rolcanlogin: true });
      const [f] = await sql`SELECT prosecdef, proconfig FROM pg_proc WHERE oid = 'multigres.current_tenant_id()'::regprocedure`;
      expect(f).toEqual({ prosecdef: true, proconfig: ["search_path=pg_catalog, pg_temp"] });
      const [v] = await sql`SELECT value FROM multigres.meta WHERE key = 'schema_version'`;
      expect(v?.value).toBe("3");
      // The app role cannot read the keys.
      const [p] = await sql`SELECT has_table_privilege(${role}, 'multigres.context_keys', 'SELECT') AS can_read`;
      expect(p?.can_read).toBe(false);
    });

    const xmins = () =>
      scratch.as(db.name, (sql) =>
        sql`SELECT (SELECT array_agg(xmin::text ORDER BY oid) FROM pg_proc WHERE pronamespace = 'multigres'::regnamespace OR oid = 'public.current_tenant_id()'::regprocedure) AS procs,
                   (SELECT xmin::text FROM multigres.meta WHERE key = 'schema_version') AS meta,
                   (SELECT xmin::text FROM pg_authid WHERE rolname = ${role}) AS role`,
      );
    const before = await xmins();

    const second = await setup(db.url, role, { secret: SECRET_A });
    expect(second.exitCode, describeCli(second)).toBe(0);
    expect(second.stdout).toBe("nothing to change\n");
    expect(second.stderr).toBe("");
    expect(await xmins()).toEqual(before);
  });

  test("the stored key is the one derived from MULTIGRES_CONTEXT_SECRET, and neither secret nor key is printed", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    const r = await setup(db.url, role, { secret: SECRET_A });
    expect(r.exitCode, describeCli(r)).toBe(0);

    const rows = await scratch.as(db.name, (sql) => sql`SELECT key_id, inner_pad, outer_pad FROM multigres.context_keys`);
    expect(rows.length).toBe(1);
    const { inner, outer } = pads(SECRET_A);
    expect(rows[0]!.key_id).toBe(contextKeyId(deriveContextKey(SECRET_A)));
    expect(Buffer.from(rows[0]!.inner_pad as Uint8Array).equals(inner)).toBe(true);
    expect(Buffer.from(rows[0]!.outer_pad as Uint8Array).equals(outer)).toBe(true);

    const key = Buffer.from(deriveContextKey(SECRET_A));
    const all = r.stdout + r.stderr;
    for (const leak of [SECRET_A, key.toString("hex"), key.toString("base64"), key.toString("base64url")]) {
      expect(all).not.toContain(leak);
    }
  });

  test("the secret can come from --config (context_secret) or a secret file", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    const config = writeTempFile(`setup-${process.pid}.toml`, `context_secret = "${SECRET_A}"\n`);
    const r1 = await setup(db.url, role, { args: ["--config", config] });
    expect(r1.exitCode, describeCli(r1)).toBe(0);
    expect(r1.stdout).toContain(`stored context key ${idOf(SECRET_A)}`);

    const secretFile = writeTempFile(`secret-${process.pid}`, `${SECRET_B}\n`);
    const r2 = await setup(db.url, role, { env: { MULTIGRES_CONTEXT_SECRET_FILE: secretFile, MULTIGRES_CONTEXT_SECRET: SECRET_A } });
    expect(r2.exitCode, describeCli(r2)).toBe(0);
    // The file wins over the environment, as for the proxy.
    expect(lines(r2.stdout)[0]).toBe(`stored context key ${idOf(SECRET_B)}`);
  });
});

describe("no secret set", () => {
  test("generates one, stores its key, prints it once; the proxy works with it end to end", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    const r = await setup(db.url, role);
    expect(r.exitCode, describeCli(r)).toBe(0);

    const m = /^ {2}MULTIGRES_CONTEXT_SECRET=(\S+)$/m.exec(r.stdout);
    expect(m, describeCli(r)).not.toBeNull();
    const secret = m![1]!;
    expect(secret).toMatch(/^[A-Za-z0-9_-]{64}$/); // 48 random bytes, base64url
    expect(r.stdout.split(secret).length - 1).toBe(1); // printed once
    const id = contextKeyId(deriveContextKey(secret));
    expect(r.stdout).toContain(`stored context key ${id}`);
    const stored = await scratch.as(db.name, (sql) => sql`SELECT key_id FROM multigres.context_keys`);
    expect(stored.map((k) => k.key_id)).toEqual([id]);

    // A second run without the secret keeps the key and generates nothing.
    const again = await setup(db.url, role);
    expect(again.exitCode, describeCli(again)).toBe(0);
    expect(lines(again.stdout)).toEqual(["nothing to change", `note: no context secret given (MULTIGRES_CONTEXT_SECRET): kept the stored context key ${id}`]);
    expect(again.stdout).not.toContain("MULTIGRES_CONTEXT_SECRET=");

    // The proxy's upstream credential: setup generates it into a file (0600) and sets it, once.
    const upstreamFile = writeTempFile(`upstream-${role}`, "").replace(/$/, ".new"); // a path that does not exist yet
    const up = await setup(db.url, role, { args: ["--upstream-password-file", upstreamFile] });
    expect(up.exitCode, describeCli(up)).toBe(0);
    expect(lines(up.stdout)[0]).toBe(
      `${role}: generated a random password, wrote it to ${upstreamFile} (mode 0600), and set it: give the file to the proxy as --upstream-password-file`,
    );
    const upstreamPassword = readFileSync(upstreamFile, "utf8").trim();
    expect(upstreamPassword).toMatch(/^[A-Za-z0-9_-]{43}$/);
    expect(statSync(upstreamFile).mode & 0o777).toBe(0o600);
    expect(up.stdout + up.stderr).not.toContain(upstreamPassword);
    const upAgain = await setup(db.url, role, { args: ["--upstream-password-file", upstreamFile] });
    expect(lines(upAgain.stdout)[0]).toBe("nothing to change");

    // End to end: clients log in at the proxy with their own password; the
    // proxy logs in with the generated one; the contexts verify.
    const password = "setup-e2e-client-pw";
    const authFile = writeTempFile(`userlist-${role}`, `"${role}" "${password}"\n`);
    await scratch.as(db.name, async (sql) => {
      await sql.unsafe(`
        CREATE TABLE items (id serial PRIMARY KEY, tenant_id text NOT NULL, name text);
        SELECT multigres.enable_tenant_rls('items');
        GRANT SELECT, INSERT ON items TO "${role}";
        INSERT INTO items (tenant_id, name) VALUES ('acme', 'a1'), ('acme', 'a2'), ('globex', 'g1');`);
    });
    const proxy = await startProxy({
      upstreamPort: pg.port,
      upstreamHost: pg.host,
      database: db.name,
      env: { MULTIGRES_CONTEXT_SECRET: secret },
      args: ["--auth-file", authFile, "--upstream-password-file", upstreamFile, "--database", db.name],
    });
    try {
      const names = await withClient(proxy.url({ user: `${role}.acme`, password }), async (sql) =>
        (await sql`SELECT name FROM items ORDER BY name`).map((x) => x.name),
      );
      expect(names).toEqual(["a1", "a2"]);
      // The database's own password is not a client password.
      const err = await connectError(proxy.url({ user: `${role}.acme`, password: upstreamPassword }));
      expect(err.code).toBe("28P01");
      await proxy.waitForLog(new RegExp(`startup check: database "${db.name}" knows context key ${id}`));
    } finally {
      await proxy.stop();
    }
    // Neither password reached the server's log: setup sent a verifier.
    if (pg.mode === "managed") expect(pg.serverLog()).not.toContain(upstreamPassword);
  });

  test("--generate-secret adds a new key next to the stored one (first step of a rotation)", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    expect((await setup(db.url, role, { secret: SECRET_A })).exitCode).toBe(0);
    const r = await setup(db.url, role, { args: ["--generate-secret"] });
    expect(r.exitCode, describeCli(r)).toBe(0);
    const secret = /^ {2}MULTIGRES_CONTEXT_SECRET=(\S+)$/m.exec(r.stdout)?.[1];
    expect(secret).toBeDefined();
    const stored = await scratch.as(db.name, (sql) => sql`SELECT key_id FROM multigres.context_keys ORDER BY key_id`);
    expect(stored.map((k) => k.key_id)).toEqual([idOf(SECRET_A), idOf(secret!)].sort());
  });
});

describe("rotation", () => {
  test("a second secret adds a key, --retire-other-keys deletes the old one, then nothing to change", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    expect((await setup(db.url, role, { secret: SECRET_A })).exitCode).toBe(0);

    const add = await setup(db.url, role, { secret: SECRET_B });
    expect(add.exitCode, describeCli(add)).toBe(0);
    expect(lines(add.stdout)).toEqual([
      `stored context key ${idOf(SECRET_B)}`,
      `note: other context keys stay valid: ${idOf(SECRET_A)} (once every proxy uses the new secret, run setup again with --retire-other-keys)`,
    ]);
    const keys = () => scratch.as(db.name, async (sql) => (await sql`SELECT key_id FROM multigres.context_keys ORDER BY key_id`).map((k) => k.key_id));
    expect(await keys()).toEqual([idOf(SECRET_A), idOf(SECRET_B)].sort());

    const retire = await setup(db.url, role, { secret: SECRET_B, args: ["--retire-other-keys"] });
    expect(retire.exitCode, describeCli(retire)).toBe(0);
    expect(lines(retire.stdout)).toEqual([`retired context key ${idOf(SECRET_A)}`]);
    expect(await keys()).toEqual([idOf(SECRET_B)]);

    const again = await setup(db.url, role, { secret: SECRET_B, args: ["--retire-other-keys"] });
    expect(again.stdout).toBe("nothing to change\n");
  });

  test("--retire-other-keys without a secret is refused and deletes nothing", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    expect((await setup(db.url, role, { secret: SECRET_A })).exitCode).toBe(0);
    const r = await setup(db.url, role, { args: ["--retire-other-keys"] });
    expect(r.exitCode, describeCli(r)).toBe(2);
    expect(r.stderr).toContain("--retire-other-keys needs the current secret");
    const stored = await scratch.as(db.name, (sql) => sql`SELECT key_id FROM multigres.context_keys`);
    expect(stored.map((k) => k.key_id)).toEqual([idOf(SECRET_A)]);
  });
});

describe("hardening an existing app role", () => {
  test("SUPERUSER, BYPASSRLS, CREATEROLE, NOLOGIN and privileged memberships are removed, one line each; then nothing to change", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    const ops = scratch.role("ops");
    const harmless = scratch.role("readers");
    await pg.sql.unsafe(`
      CREATE ROLE "${ops}" NOLOGIN;
      GRANT pg_write_all_data TO "${ops}";
      CREATE ROLE "${harmless}" NOLOGIN;
      CREATE ROLE "${role}" NOLOGIN SUPERUSER BYPASSRLS CREATEROLE;
      GRANT pg_read_all_data TO "${role}";
      GRANT "${ops}" TO "${role}";
      GRANT "${harmless}" TO "${role}";`);

    const r = await setup(db.url, role, { secret: SECRET_A });
    expect(r.exitCode, describeCli(r)).toBe(0);
    const out = lines(r.stdout);
    expect(out).toContain(`${role}: set NOSUPERUSER`);
    expect(out).toContain(`${role}: set NOBYPASSRLS`);
    expect(out).toContain(`${role}: set NOCREATEROLE`);
    expect(out).toContain(`${role}: set LOGIN`);
    expect(out).toContain(`${role}: revoked membership in pg_read_all_data (reads every table, multigres.context_keys included)`);
    expect(out).toContain(
      `${role}: revoked membership in ${ops} (through it: ${role} → ${ops} → pg_write_all_data (writes every table, multigres.context_keys included))`,
    );
    expect(out.some((l) => l.includes(harmless))).toBe(false);

    const [attrs] = await pg.sql`SELECT rolsuper, rolbypassrls, rolcreaterole, rolcanlogin FROM pg_roles WHERE rolname = ${role}`;
    expect(attrs).toEqual({ rolsuper: false, rolbypassrls: false, rolcreaterole: false, rolcanlogin: true });
    const memberOf = await pg.sql`
      SELECT r.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid
      WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = ${role}) ORDER BY 1`;
    expect(memberOf.map((x) => x.rolname)).toEqual([harmless]); // the harmless membership stays
    // The intermediate role keeps its own grant; only the app role's path to it is cut.
    const [opsStill] = await pg.sql`SELECT pg_has_role(${ops}, 'pg_write_all_data', 'MEMBER') AS yes`;
    expect(opsStill?.yes).toBe(true);

    const again = await setup(db.url, role, { secret: SECRET_A });
    expect(again.stdout).toBe("nothing to change\n");
  });

  test("direct grants on the key table and add_context_key() are revoked", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    expect((await setup(db.url, role, { secret: SECRET_A })).exitCode).toBe(0);
    await scratch.as(db.name, (sql) =>
      sql.unsafe(`GRANT SELECT ON multigres.context_keys TO "${role}";
                  GRANT EXECUTE ON FUNCTION multigres.add_context_key(bytea) TO "${role}";`),
    );
    const r = await setup(db.url, role, { secret: SECRET_A });
    expect(r.exitCode, describeCli(r)).toBe(0);
    expect(lines(r.stdout)).toEqual([
      `${role}: revoked its privileges on multigres.context_keys`,
      `${role}: revoked EXECUTE on multigres.add_context_key(bytea)`,
    ]);
    const [p] = await scratch.as(db.name, (sql) =>
      sql`SELECT has_table_privilege(${role}, 'multigres.context_keys', 'SELECT') AS t,
                 has_function_privilege(${role}, 'multigres.add_context_key(bytea)', 'EXECUTE') AS f`,
    );
    expect(p).toEqual({ t: false, f: false });
  });

  test("refuses to use the admin login itself as the app role, and a failed setup changes nothing", async () => {
    const db = await scratch.database();
    const admin = new URL(pg.adminUrl).username;
    const r = await setup(db.url, decodeURIComponent(admin), { secret: SECRET_A });
    expect(r.exitCode, describeCli(r)).toBe(2);
    expect(r.stderr).toContain("is the role this connection logs in as");
    expect(r.stdout).toBe("");
    // setup.sql ran before the role check, inside the same transaction: rolled back.
    const [s] = await scratch.as(db.name, (sql) => sql`SELECT to_regnamespace('multigres') IS NULL AS absent`);
    expect(s?.absent).toBe(true);
  });
});

describe("hardening the database (what one role shared by every tenant would share)", () => {
  /** A database the way PostgreSQL 14, GRANT ALL and a helpful ALTER ROLE leave it. */
  async function openDatabase(role: string) {
    const db = await scratch.database();
    await pg.sql.unsafe(`CREATE ROLE "${role}" LOGIN PASSWORD 'app-pw'; GRANT pg_read_all_stats TO "${role}";
                         GRANT CREATE ON DATABASE "${db.name}" TO "${role}";
                         ALTER ROLE "${role}" SET search_path = "$user", public, pg_catalog;
                         ALTER ROLE "${role}" SET row_security = off;
                         ALTER ROLE "${role}" IN DATABASE "${db.name}" SET statement_timeout = '1ms';
                         ALTER ROLE "${role}" SET app.api_key = 'not-for-the-output';`);
    await scratch.as(db.name, (sql) =>
      sql.unsafe(`
        GRANT CREATE ON SCHEMA public TO PUBLIC;  -- PostgreSQL 14 and older, and upgraded clusters
        CREATE EXTENSION pg_stat_statements;
        CREATE TABLE public.notes (id bigserial PRIMARY KEY, tenant_id text NOT NULL, body text);
        CREATE TABLE public.countries (code text PRIMARY KEY);
        GRANT ALL ON ALL TABLES IN SCHEMA public TO "${role}";
        GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "${role}";
        GRANT REFERENCES (tenant_id) ON public.notes TO PUBLIC;
        ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT ALL ON TABLES TO "${role}";`),
    );
    return db;
  }

  const asApp = <T,>(db: { name: string }, role: string, fn: (sql: Parameters<Parameters<typeof withClient>[1]>[0]) => Promise<T>) => {
    const u = new URL(scratch.url(db.name));
    u.username = role;
    u.password = "app-pw";
    return withClient(u.toString(), fn);
  };
  const refused = async (p: Promise<unknown>) => {
    const e = (await p.then(() => undefined, (x) => x)) as { code?: string; message?: string } | undefined;
    return e ? `${e.code}` : "allowed";
  };

  test("every item is closed, one line each; the app role is refused each; the second run changes nothing", async () => {
    const role = scratch.role("app");
    const db = await openDatabase(role);
    const admin = decodeURIComponent(new URL(pg.adminUrl).username);

    const r = await setup(db.url, role, { secret: SECRET_A });
    expect(r.exitCode, describeCli(r)).toBe(0);
    const out = lines(r.stdout).filter((l) => /^[a-z-]+: /.test(l) && !l.startsWith(`${role}:`));
    expect(out).toEqual([
      `activity: ${role}: revoked membership in pg_read_all_stats (${role} → pg_read_all_stats: reads every session's statements)`,
      expect.stringMatching(/^activity: revoked SELECT on \d+ views \(pg_locks, pg_prepared_xacts, pg_stat_activity, …\) /),
      expect.stringMatching(/^statistics: revoked /),
      `pg-stat-statements: revoked SELECT on 2 views (public.pg_stat_statements, public.pg_stat_statements_info) and EXECUTE on 2 functions (public.pg_stat_statements(boolean), public.pg_stat_statements_info()) from PUBLIC and ${role}; granted to pg_monitor`,
      expect.stringMatching(/^large-objects: revoked /),
      expect.stringMatching(/^signals: revoked /),
      `schema-create: revoked CREATE on schema public from PUBLIC and ${role}`,
      `schema-create: revoked CREATE on database ${db.name} (CREATE SCHEMA) from PUBLIC and ${role}`,
      `table-privileges: revoked TRIGGER on table public.countries from PUBLIC and ${role}`,
      `table-privileges: revoked REFERENCES, TRIGGER, TRUNCATE, REFERENCES (tenant_id) on tenant table public.notes from PUBLIC and ${role}`,
      // GRANT ALL ON ALL TABLES reached the extension's views too.
      `table-privileges: revoked TRIGGER on view public.pg_stat_statements from PUBLIC and ${role}`,
      `table-privileges: revoked TRIGGER on view public.pg_stat_statements_info from PUBLIC and ${role}`,
      `table-privileges: default privileges of ${admin} in schema public no longer grant REFERENCES, TRIGGER, TRUNCATE on new tables to PUBLIC and ${role}`,
      `role-settings: ${role}: reset search_path (was "$user", public, pg_catalog)`,
      `role-settings: ${role}: reset row_security (was off)`,
      `role-settings: ${role}: reset app.api_key (value not shown)`,
      `role-settings: ${role}: reset statement_timeout in database ${db.name} (was 1ms)`,
      `role-settings: ${role}: pinned log_parameter_max_length = 0 (a superuser-only setting: the role cannot change it back)`,
    ]);
    expect(r.stdout).not.toContain("not-for-the-output");

    await asApp(db, role, async (sql) => {
      // What it still does: its own tables.
      await sql`INSERT INTO public.notes (tenant_id, body) VALUES ('a', 'x')`;
      expect((await sql`SELECT count(*)::int AS n FROM public.notes`)[0]?.n).toBe(1);
      // What it no longer does, each with permission denied.
      const attempts: Record<string, string> = {
        "pg_stat_activity": await refused(sql`SELECT query FROM pg_stat_activity`),
        "pg_stat_get_activity()": await refused(sql`SELECT * FROM pg_stat_get_activity(NULL)`),
        "pg_locks": await refused(sql`SELECT * FROM pg_locks`),
        "pg_stat_xact_user_tables": await refused(sql`SELECT idx_tup_fetch FROM pg_stat_xact_user_tables`),
        "pg_stat_get_xact_tuples_fetched()": await refused(sql`SELECT pg_stat_get_xact_tuples_fetched('public.notes'::regclass)`),
        "pg_stat_statements": await refused(sql`SELECT query FROM pg_stat_statements`),
        "lo_create()": await refused(sql`SELECT lo_create(0)`),
        "lo_get()": await refused(sql`SELECT lo_get(1)`),
        "pg_terminate_backend()": await refused(sql`SELECT pg_terminate_backend(pg_backend_pid() + 1)`),
        "CREATE FUNCTION public.f": await refused(sql`CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'`),
        "CREATE SCHEMA": await refused(sql`CREATE SCHEMA ${sql(role)}`),
        "TRUNCATE tenant table": await refused(sql`TRUNCATE public.notes`),
        "CREATE TRIGGER": await refused(
          sql.unsafe(`CREATE FUNCTION pg_temp.t() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NEW; END';
                      CREATE TRIGGER t BEFORE INSERT ON public.countries FOR EACH ROW EXECUTE FUNCTION pg_temp.t()`),
        ),
        "ALTER ROLE RESET pinned": await refused(sql.unsafe(`ALTER ROLE "${role}" RESET log_parameter_max_length`)),
      };
      expect(attempts).toEqual(Object.fromEntries(Object.keys(attempts).map((k) => [k, "42501"])));
      const [settings] = await sql`SELECT current_setting('log_parameter_max_length') AS lp, current_setting('row_security') AS rs,
                                          current_setting('statement_timeout') AS st, current_setting('search_path') AS sp`;
      expect(settings).toEqual({ lp: "0", rs: "on", st: "0", sp: '"$user", public' });
    });
    // Monitoring keeps working for monitoring roles.
    const [monitor] = await scratch.as(db.name, (sql) =>
      sql`SELECT has_table_privilege('pg_monitor', 'pg_stat_activity', 'SELECT') AS activity,
                 has_function_privilege('pg_signal_backend', 'pg_terminate_backend(integer,bigint)', 'EXECUTE') AS signal`,
    );
    expect(monitor).toEqual({ activity: true, signal: true });

    const again = await setup(db.url, role, { secret: SECRET_A });
    expect(again.exitCode, describeCli(again)).toBe(0);
    expect(again.stdout).toBe("nothing to change\n");
  });

  test("--no-harden keeps an item as it is and says so; an unknown item is a usage error", async () => {
    const role = scratch.role("app");
    const db = await openDatabase(role);
    const r = await setup(db.url, role, { secret: SECRET_A, args: ["--no-harden", "activity", "--no-harden=signals,role-settings"] });
    expect(r.exitCode, describeCli(r)).toBe(0);
    const out = lines(r.stdout);
    expect(out.filter((l) => /^(activity|signals|role-settings): /.test(l))).toEqual([]);
    expect(out.filter((l) => l.startsWith("note: kept ")).map((l) => l.split(":")[1])).toEqual([
      " kept activity as it is (--no-harden)",
      " kept signals as it is (--no-harden)",
      " kept role-settings as it is (--no-harden)",
    ]);
    expect(out).toContain(`schema-create: revoked CREATE on schema public from PUBLIC and ${role}`);
    const [p] = await scratch.as(db.name, (sql) =>
      sql`SELECT has_table_privilege(${role}, 'pg_stat_activity', 'SELECT') AS activity,
                 (SELECT setconfig FROM pg_db_role_setting WHERE setrole = ${role}::regrole AND setdatabase = 0) AS settings`,
    );
    expect(p?.activity).toBe(true);
    expect(p?.settings).toContain("row_security=off");

    const bad = await setup(db.url, role, { secret: SECRET_A, args: ["--no-harden", "activty"] });
    expect(bad.exitCode, describeCli(bad)).toBe(2);
    expect(bad.stderr).toContain(`--no-harden: "activty" is not a hardening item (one of activity, statistics, pg-stat-statements, large-objects, signals, schema-create, table-privileges, role-settings)`);
  });

  test("--tenant-column names the tenant tables: TRUNCATE and REFERENCES go there, TRIGGER everywhere", async () => {
    const role = scratch.role("app");
    const db = await scratch.database();
    await pg.sql.unsafe(`CREATE ROLE "${role}" LOGIN`);
    await scratch.as(db.name, (sql) =>
      sql.unsafe(`CREATE TABLE public.orgs_notes (org_id text NOT NULL, body text);
                  CREATE TABLE public.plain (x int);
                  GRANT ALL ON public.orgs_notes, public.plain TO "${role}";`),
    );
    const tableLines = (out: string) => lines(out).filter((l) => l.startsWith("table-privileges: "));
    const plain = await setup(db.url, role, { secret: SECRET_A });
    expect(tableLines(plain.stdout)).toEqual([
      `table-privileges: revoked TRIGGER on table public.orgs_notes from PUBLIC and ${role}`,
      `table-privileges: revoked TRIGGER on table public.plain from PUBLIC and ${role}`,
    ]);
    const named = await setup(db.url, role, { secret: SECRET_A, args: ["--tenant-column", "tenant_id", "--tenant-column=org_id"] });
    expect(named.exitCode, describeCli(named)).toBe(0);
    expect(tableLines(named.stdout)).toEqual([`table-privileges: revoked REFERENCES, TRUNCATE on tenant table public.orgs_notes from PUBLIC and ${role}`]);
  });

  test("--monitoring-role gets the read access PUBLIC loses; one the app role belongs to is refused", async () => {
    const role = scratch.role("app");
    const watcher = scratch.role("watcher");
    const db = await scratch.database();
    await pg.sql.unsafe(`CREATE ROLE "${watcher}" NOLOGIN`);
    const r = await setup(db.url, role, { secret: SECRET_A, args: ["--monitoring-role", watcher] });
    expect(r.exitCode, describeCli(r)).toBe(0);
    expect(lines(r.stdout).filter((l) => l.endsWith(`; granted to ${watcher}`)).map((l) => l.split(":")[0])).toEqual(["activity", "statistics"]);
    const [p] = await scratch.as(db.name, (sql) =>
      sql`SELECT has_table_privilege(${watcher}, 'pg_stat_activity', 'SELECT') AS watcher, has_table_privilege(${role}, 'pg_stat_activity', 'SELECT') AS app`,
    );
    expect(p).toEqual({ watcher: true, app: false });

    await pg.sql.unsafe(`GRANT "${watcher}" TO "${role}"`);
    const bad = await setup(db.url, role, { secret: SECRET_A, args: ["--monitoring-role", watcher] });
    expect(bad.exitCode, describeCli(bad)).toBe(2);
    expect(bad.stderr).toContain(`--monitoring-role ${watcher}: ${role} is a member of it`);
  });
});

describe("--tenant-setting", () => {
  test("rewrites the settings the verifier reads; a context signed for them verifies", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    const r = await setup(db.url, role, { secret: SECRET_A, args: ["--tenant-setting", "myapp.tenant"] });
    expect(r.exitCode, describeCli(r)).toBe(0);

    await scratch.as(db.name, async (sql) => {
      const [{ binding }] = (await sql`SELECT multigres.backend_binding() AS binding`) as unknown as [{ binding: string }];
      const sig = signContext(deriveContextKey(SECRET_A), "acme", binding);
      await sql`SELECT set_config('myapp.tenant', 'acme', false), set_config('myapp.tenant_sig', ${sig}, false)`;
      const [ok] = await sql`SELECT current_tenant_id() AS t`;
      expect(ok?.t).toBe("acme");
      // The default names mean nothing to this verifier.
      await sql`SELECT set_config('myapp.tenant', '', false), set_config('app.current_tenant_id', 'acme', false),
                       set_config('app.current_tenant_id_sig', ${sig}, false)`;
      const [none] = await sql`SELECT current_tenant_id() AS t`;
      expect(none?.t).toBeNull();
    });

    const back = await setup(db.url, role, { secret: SECRET_A });
    expect(lines(back.stdout)).toEqual(["updated function multigres.current_tenant_id()", "updated function multigres.context_status(text)"]);
  });

  test("rejects a setting name that is not a custom setting", async () => {
    const db = await scratch.database();
    const r = await setup(db.url, scratch.role("app"), { secret: SECRET_A, args: ["--tenant-setting", "search_path"] });
    expect(r.exitCode).toBe(2);
    expect(r.stderr).toContain("--tenant-setting");
  });
});

describe("upgrade", () => {
  // What sql/setup.sql installed before schema version 2: an unsigned
  // current_tenant_id() that trusted the setting, no key table, no meta.
  const V1 = `
    CREATE SCHEMA IF NOT EXISTS multigres;
    GRANT USAGE ON SCHEMA multigres TO PUBLIC;
    CREATE OR REPLACE FUNCTION multigres.current_tenant_id() RETURNS text
      LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog
    AS $$ SELECT nullif(current_setting('app.current_tenant_id', true), '') $$;
    CREATE OR REPLACE FUNCTION public.current_tenant_id() RETURNS text
      LANGUAGE sql STABLE PARALLEL SAFE SET search_path = pg_catalog
    AS $$ SELECT multigres.current_tenant_id() $$;`;

  test("from schema version 1: the verifier becomes SECURITY DEFINER, the key table and version appear; a forged setting stops working", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    await scratch.as(db.name, (sql) => sql.unsafe(V1));

    const r = await setup(db.url, role, { secret: SECRET_A });
    expect(r.exitCode, describeCli(r)).toBe(0);
    const out = lines(r.stdout);
    expect(out).toContain("created table multigres.context_keys");
    expect(out).toContain("created table multigres.meta");
    expect(out).toContain("updated function multigres.current_tenant_id()");
    expect(out).toContain("set schema_version 3");
    expect(out).not.toContain("created schema multigres");

    await scratch.as(db.name, async (sql) => {
      await sql`SELECT set_config('app.current_tenant_id', 'acme', false)`;
      const [t] = await sql`SELECT current_tenant_id() AS t`;
      expect(t?.t).toBeNull();
    });
    expect((await setup(db.url, role, { secret: SECRET_A })).stdout).toBe("nothing to change\n");
  });

  test("refuses to downgrade a newer schema version", async () => {
    const db = await scratch.database();
    const role = scratch.role("app");
    expect((await setup(db.url, role, { secret: SECRET_A })).exitCode).toBe(0);
    await scratch.as(db.name, (sql) => sql`UPDATE multigres.meta SET value = '99' WHERE key = 'schema_version'`);
    const r = await setup(db.url, role, { secret: SECRET_A });
    expect(r.exitCode).toBe(2);
    expect(r.stderr).toContain("schema version 99, newer than this binary's 3");
  });
});

describe("usage errors (exit 2)", () => {
  test("missing --database-url, missing --app-role, a short secret, an unreachable server", async () => {
    const noUrl = await multigres(["setup", "--app-role", "x"]);
    expect(noUrl.exitCode).toBe(2);
    expect(noUrl.stderr).toContain("--database-url is required");

    const db = await scratch.database();
    const noRole = await multigres(["setup", "--database-url", db.url]);
    expect(noRole.exitCode).toBe(2);
    expect(noRole.stderr).toContain("--app-role is required");

    const short = await setup(db.url, scratch.role("app"), { secret: "too-short" });
    expect(short.exitCode).toBe(2);
    expect(short.stderr).toContain("at least 32 characters");
    expect(short.stderr).not.toContain("too-short");
    const [s] = await scratch.as(db.name, (sql) => sql`SELECT to_regnamespace('multigres') IS NULL AS absent`);
    expect(s?.absent).toBe(true);

    // A port nothing listens on: one the OS just handed out and we closed again.
    const closed = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    const port = closed.port;
    closed.stop(true);
    const down = await setup(`postgres://postgres@127.0.0.1:${port}/x`, "x", { secret: SECRET_A });
    expect(down.exitCode).toBe(1);
    expect(down.stderr).toContain("multigres setup failed, nothing was changed");
  });
});

// The harness derives keys independently of src/ (test/harness/postgres.ts);
// make sure this file's expectations use the same derivation.
test("deriveContextKey matches the documented derivation", () => {
  expect(Buffer.from(deriveContextKey(SECRET_A))).toEqual(createHmac("sha256", SECRET_A).update("multigres context key v1").digest());
});
