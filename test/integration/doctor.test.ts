/**
 * `multigres doctor` through the compiled binary against real PostgreSQL.
 *
 * Every case gets a fresh database (CREATE DATABASE), a fresh app role, and
 * `multigres setup` run in it (unless the case is about a missing setup);
 * then it plants one problem as the superuser and runs `doctor --json`.
 * For each rule there are planted cases that must produce the finding
 * (rule id, object, severity) and clean cases — the corrected version of
 * the same object — that must not. A fully set-up database with properly
 * policied tables yields no error finding and exit 0; error findings exit 1.
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import { contextKeyId, deriveContextKey } from "../../src/tenant/context.ts";
import { startPostgres, type PgInstance } from "../harness/index.ts";
import { describeCli, multigres, Scratch, type CliResult } from "./db-cli-helpers.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

const SECRET = "doctor-test-secret-0123456789abcdefghijklmnop";
const OTHER_SECRET = "doctor-test-other-secret-0123456789abcdefghij";

interface Finding {
  rule: string;
  severity: "error" | "warning" | "info";
  object: string;
  message: string;
  fix: string;
}

let pg: PgInstance;
let scratch: Scratch;

beforeAll(async () => {
  pg = await startPostgres();
  scratch = new Scratch(pg, "mg_doctor");
});

afterAll(async () => {
  await scratch?.drop();
});

interface Ctx {
  /** The app role of this case (created by setup). */
  app: string;
  /** The case's database. */
  db: string;
  /** A fresh role name owned by this file (dropped at the end); the case creates it. */
  role(label: string): string;
}

interface AuditOptions {
  /** SQL run as the superuser in the case's database after setup. */
  plant?: (c: Ctx) => string;
  /** Skip `multigres setup` (the setup-missing cases). */
  noSetup?: boolean;
  /** SQL run before setup instead (e.g. an old setup.sql). */
  before?: (c: Ctx) => string;
  setupArgs?: string[];
  /** Extra setups after the first, with these secrets. */
  moreSecrets?: string[];
  doctorArgs?: string[];
  doctorEnv?: Record<string, string>;
  /** Audit this role instead of the case's app role. */
  auditRole?: (c: Ctx) => string;
}

interface Audit {
  ctx: Ctx;
  /** The role audited. */
  role: string;
  findings: Finding[];
  run: CliResult;
}

async function audit(o: AuditOptions = {}): Promise<Audit> {
  const db = await scratch.database();
  const ctx: Ctx = { app: scratch.role("app"), db: db.name, role: (label) => scratch.role(label) };
  if (o.before) await scratch.as(db.name, (sql) => sql.unsafe(o.before!(ctx)));
  if (o.noSetup) {
    await pg.sql.unsafe(`CREATE ROLE "${ctx.app}" LOGIN`);
  } else {
    for (const secret of [SECRET, ...(o.moreSecrets ?? [])]) {
      const s = await multigres(["setup", "--database-url", db.url, "--app-role", ctx.app, ...(o.setupArgs ?? [])], {
        MULTIGRES_CONTEXT_SECRET: secret,
      });
      if (s.exitCode !== 0) throw new Error(`setup failed:\n${describeCli(s)}`);
    }
  }
  if (o.plant) await scratch.as(db.name, (sql) => sql.unsafe(o.plant!(ctx)));
  return doctor({ ctx }, o.doctorArgs ?? [], o.auditRole ? o.auditRole(ctx) : ctx.app, o.doctorEnv);
}

/** Run `doctor --json` on an audited database (again), optionally for another role. */
async function doctor(on: { ctx: Ctx }, args: string[] = [], role = on.ctx.app, env: Record<string, string> = {}): Promise<Audit> {
  const run = await multigres(["doctor", "--database-url", scratch.url(on.ctx.db), "--app-role", role, "--json", ...args], env);
  let findings: Finding[];
  try {
    findings = JSON.parse(run.stdout) as Finding[];
  } catch {
    throw new Error(`doctor --json did not print JSON:\n${describeCli(run)}`);
  }
  const hasError = findings.some((f) => f.severity === "error");
  expect(run.exitCode, describeCli(run)).toBe(hasError ? 1 : 0);
  return { ctx: on.ctx, role, findings, run };
}

function expectFinding(a: Audit, rule: string, object: string, severity: Finding["severity"]): Finding {
  const f = a.findings.find((x) => x.rule === rule && x.object === object);
  expect(f, `no ${rule} finding on ${object}; got:\n${JSON.stringify(a.findings, null, 2)}`).toBeDefined();
  expect(f!.severity).toBe(severity);
  expect(f!.message.length).toBeGreaterThan(0);
  expect(f!.fix.length).toBeGreaterThan(0);
  return f!;
}

/** No finding of `rule` (on `object`, when given). */
function expectNoFinding(a: Audit, rule: string, object?: string): void {
  const hits = a.findings.filter((x) => x.rule === rule && (object === undefined || x.object === object));
  expect(hits, `unexpected ${rule} findings:\n${JSON.stringify(hits, null, 2)}`).toEqual([]);
}

/** No finding at all on `object`. */
function expectNoFindingOn(a: Audit, object: string): void {
  const hits = a.findings.filter((x) => x.object === object);
  expect(hits, `unexpected findings on ${object}:\n${JSON.stringify(hits, null, 2)}`).toEqual([]);
}

/** A tenant table granted to the app role. */
const table = (c: Ctx, name = "docs", column = "tenant_id") => `
  CREATE TABLE public.${name} (id serial PRIMARY KEY, ${column} text NOT NULL, body text);
  GRANT SELECT, INSERT, UPDATE, DELETE ON public.${name} TO "${c.app}";`;
/** …with isolation turned on the recommended way. */
const isolated = (c: Ctx, name = "docs") => `${table(c, name)} SELECT multigres.enable_tenant_rls('public.${name}');`;

// ---------------------------------------------------------------------------

describe("a correctly set up database", () => {
  test("tenant tables with the recommended policy, an invoker view, a safe SECURITY DEFINER function: no error, exit 0", async () => {
    const a = await audit({
      plant: (c) => `
        ${isolated(c, "docs")}
        ${isolated(c, "orders")}
        CREATE POLICY only_live ON public.docs AS RESTRICTIVE USING (body IS NOT NULL);
        CREATE TABLE public.countries (code text PRIMARY KEY);  -- no tenant column: not a tenant table
        GRANT SELECT ON public.countries TO "${c.app}";
        CREATE VIEW public.docs_v WITH (security_invoker = true) AS SELECT * FROM public.docs;
        GRANT SELECT ON public.docs_v TO "${c.app}";
        CREATE FUNCTION public.doc_count() RETURNS bigint LANGUAGE sql SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp AS 'SELECT count(*) FROM public.docs';`,
      doctorEnv: { MULTIGRES_CONTEXT_SECRET: SECRET },
    });
    expect(a.findings.filter((f) => f.severity !== "info")).toEqual([]);
    expect(a.run.exitCode).toBe(0);

    // The human format says so too.
    const human = await multigres(["doctor", "--database-url", scratch.url(a.ctx.db), "--app-role", a.ctx.app]);
    expect(human.exitCode, describeCli(human)).toBe(0);
    expect(human.stdout).toBe(`no problems found (database ${a.ctx.db}, app role ${a.ctx.app}, 2 tenant tables)\n`);
  });
});

describe("output", () => {
  test("--json is an array of {rule, severity, object, message, fix}; the text format shows the same; errors exit 1", async () => {
    const a = await audit({ plant: (c) => table(c) });
    expect(Array.isArray(a.findings)).toBe(true);
    for (const f of a.findings) {
      expect(Object.keys(f).sort()).toEqual(["fix", "message", "object", "rule", "severity"]);
      expect(["error", "warning", "info"]).toContain(f.severity);
    }
    expect(a.run.exitCode).toBe(1);

    const human = await multigres(["doctor", "--database-url", scratch.url(a.ctx.db), "--app-role", a.ctx.app]);
    expect(human.exitCode).toBe(1);
    expect(human.stdout).toContain("ERROR   rls-disabled  table public.docs\n");
    expect(human.stdout).toContain("fix: SELECT multigres.enable_tenant_rls('public.docs');");
    expect(human.stdout).toMatch(/^1 error, 0 warnings, 0 info \(database \S+, app role \S+, 1 tenant table\)$/m);
  });

  test("warnings alone exit 0", async () => {
    const a = await audit({ plant: (c) => `${isolated(c)} ALTER TABLE public.docs NO FORCE ROW LEVEL SECURITY;` });
    expectFinding(a, "rls-not-forced", "table public.docs", "warning");
    expect(a.run.exitCode).toBe(0);
  });

  test("usage errors and an unreachable server exit 2", async () => {
    const noRole = await multigres(["doctor", "--database-url", scratch.url("postgres")]);
    expect(noRole.exitCode).toBe(2);
    expect(noRole.stderr).toContain("--app-role is required");
    const closed = Bun.listen({ hostname: "127.0.0.1", port: 0, socket: { data() {} } });
    const port = closed.port;
    closed.stop(true);
    const down = await multigres(["doctor", "--database-url", `postgres://postgres@127.0.0.1:${port}/x`, "--app-role", "x"]);
    expect(down.exitCode).toBe(2);
    expect(down.stderr).toContain("multigres doctor failed");
  });
});

// ---------------------------------------------------------------------------

// The rules about SQL objects are independent per object, so each describe
// plants all its cases (and their clean counterparts) in one database and
// audits it once; each test then checks its own objects.

describe("tables", () => {
  let a: Audit;
  beforeAll(async () => {
    a = await audit({
      plant: (c) => `
        ${table(c, "off")}
        CREATE TABLE public.ungranted (tenant_id text, what text);
        CREATE TABLE public.events (tenant_id text NOT NULL, at date NOT NULL) PARTITION BY RANGE (at);
        CREATE TABLE public.events_2026 PARTITION OF public.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        SELECT multigres.enable_tenant_rls('public.events');
        GRANT SELECT ON public.events, public.events_2026 TO "${c.app}";
        ${table(c, "accounts", "org_id")}
        ${isolated(c, "not_forced")} ALTER TABLE public.not_forced NO FORCE ROW LEVEL SECURITY;
        ${table(c, "no_policy")} ALTER TABLE public.no_policy ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
        ${isolated(c, "good")}`,
    });
  });

  test("rls-disabled: tenant column, RLS off, granted to the app role → error", () => {
    expectFinding(a, "rls-disabled", "table public.off", "error");
  });
  test("rls-disabled: not granted to the app role → warning", () => {
    expectFinding(a, "rls-disabled", "table public.ungranted", "warning");
  });
  test("rls-disabled: a partition queried directly has its own RLS switch", () => {
    expectFinding(a, "rls-disabled", "table public.events_2026", "error");
    expectNoFindingOn(a, "table public.events");
  });
  test("rls-disabled: --tenant-column names the column", async () => {
    expectNoFindingOn(a, "table public.accounts"); // no tenant_id column: not a tenant table
    const b = await doctor(a, ["--tenant-column", "org_id"]);
    expectFinding(b, "rls-disabled", "table public.accounts", "error");
    expectNoFindingOn(b, "table public.off"); // now tenant_id is just a column
  });
  test("rls-disabled clean: enable_tenant_rls", () => {
    expectNoFindingOn(a, "table public.good");
  });

  test("rls-not-forced: RLS on without FORCE → warning", () => {
    expectFinding(a, "rls-not-forced", "table public.not_forced", "warning");
  });
  test("rls-not-forced clean: FORCE", () => {
    expectNoFinding(a, "rls-not-forced", "table public.good");
  });

  test("rls-no-policy: RLS on, no policy → warning", () => {
    expectFinding(a, "rls-no-policy", "table public.no_policy", "warning");
  });
  test("rls-no-policy clean: a policy", () => {
    expectNoFinding(a, "rls-no-policy", "table public.good");
  });
});

describe("policies", () => {
  let a: Audit;
  const rls = (name: string) => `ALTER TABLE public.${name} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;`;
  beforeAll(async () => {
    a = await audit({
      plant: (c) => {
        const auditor = c.role("auditor");
        const readers = c.role("readers");
        return `
          CREATE ROLE "${auditor}" NOLOGIN;
          CREATE ROLE "${readers}" NOLOGIN; GRANT "${readers}" TO "${c.app}";

          ${isolated(c, "open")} CREATE POLICY everyone ON public.open USING (true);
          ${isolated(c, "writable")} CREATE POLICY anyone_writes ON public.writable FOR INSERT WITH CHECK (true);
          ${table(c, "by_user")} ${rls("by_user")} CREATE POLICY by_user ON public.by_user USING (tenant_id = current_user);
          ${isolated(c, "extras")}
            CREATE POLICY not_deleted ON public.extras AS RESTRICTIVE USING (body IS NOT NULL);
            CREATE POLICY auditors_see_all ON public.extras TO "${auditor}" USING (true);
          ${isolated(c, "via_member")} CREATE POLICY readers_see_all ON public.via_member TO "${readers}" USING (true);

          ${table(c, "lenient")} ${rls("lenient")}
            CREATE POLICY lenient ON public.lenient USING (current_tenant_id() IS NULL OR tenant_id = current_tenant_id());
          ${isolated(c, "lenient_sub")}
            CREATE POLICY lenient ON public.lenient_sub
              USING ((SELECT current_tenant_id()) IS NULL OR tenant_id = (SELECT current_tenant_id()));
            CREATE POLICY no_context_sees_all ON public.lenient_sub USING (multigres.current_tenant_id() IS NULL);
          ${table(c, "shared")} ${rls("shared")}
            CREATE POLICY shared_or_own ON public.shared
              USING (tenant_id IS NULL OR tenant_id = (SELECT current_tenant_id()))
              WITH CHECK (current_tenant_id() IS NOT NULL AND tenant_id = (SELECT current_tenant_id()));

          ${table(c, "by_setting")} ${rls("by_setting")}
            CREATE POLICY by_setting ON public.by_setting USING (tenant_id = current_setting('app.current_tenant_id', true));
          ${table(c, "setting_null")} ${rls("setting_null")}
            CREATE POLICY p ON public.setting_null USING (
              current_setting('app.current_tenant_id', true) IS NULL OR tenant_id = current_setting('app.current_tenant_id', true));

          ${isolated(c, "good")}`;
      },
    });
  });

  test("policy-no-tenant-check: an extra permissive USING (true) → error", () => {
    expectFinding(a, "policy-no-tenant-check", 'policy "everyone" on public.open', "error");
  });
  test("policy-no-tenant-check: a permissive INSERT policy WITH CHECK (true) → error", () => {
    const f = expectFinding(a, "policy-no-tenant-check", 'policy "anyone_writes" on public.writable', "error");
    expect(f.message).toContain("WITH CHECK");
  });
  test("policy-no-tenant-check: the only policy compares with something else", () => {
    expectFinding(a, "policy-no-tenant-check", 'policy "by_user" on public.by_user', "error");
  });
  test("policy-no-tenant-check: a permissive policy for a role the app role is a member of counts", () => {
    expectFinding(a, "policy-no-tenant-check", 'policy "readers_see_all" on public.via_member', "error");
  });
  test("policy-no-tenant-check clean: restrictive extras, and permissive ones for roles the app role is not in", () => {
    expectNoFindingOn(a, "table public.extras");
    expectNoFindingOn(a, 'policy "not_deleted" on public.extras');
    expectNoFindingOn(a, 'policy "auditors_see_all" on public.extras');
    expectNoFindingOn(a, 'policy "multigres_tenant_isolation" on public.good');
  });

  test("policy-null-arm: current_tenant_id() IS NULL OR tenant_id = current_tenant_id() → error", () => {
    expectFinding(a, "policy-null-arm", 'policy "lenient" on public.lenient', "error");
    // It does call current_tenant_id(): the null arm is the problem, not a missing check.
    expectNoFinding(a, "policy-no-tenant-check", 'policy "lenient" on public.lenient');
  });
  test("policy-null-arm: the sub-select form, and the arm as a policy of its own", () => {
    expectFinding(a, "policy-null-arm", 'policy "lenient" on public.lenient_sub', "error");
    expectFinding(a, "policy-null-arm", 'policy "no_context_sees_all" on public.lenient_sub', "error");
  });
  test("policy-null-arm clean: IS NULL on a column (shared rows) and IS NOT NULL on the tenant", () => {
    expectNoFindingOn(a, 'policy "shared_or_own" on public.shared');
    expectNoFindingOn(a, "table public.shared");
  });

  test("policy-current-setting: a policy reading current_setting() directly → error", () => {
    expectFinding(a, "policy-current-setting", 'policy "by_setting" on public.by_setting', "error");
  });
  test("policy-current-setting: with an IS NULL arm on the setting it is also a null arm", () => {
    expectFinding(a, "policy-current-setting", 'policy "p" on public.setting_null', "error");
    expectFinding(a, "policy-null-arm", 'policy "p" on public.setting_null', "error");
  });
  test("policy-current-setting clean: current_tenant_id()", () => {
    expectNoFinding(a, "policy-current-setting", 'policy "multigres_tenant_isolation" on public.good');
  });
});

describe("views", () => {
  let a: Audit;
  beforeAll(async () => {
    a = await audit({
      plant: (c) => {
        const owner = c.role("viewowner");
        return `
          ${isolated(c, "docs")}
          CREATE VIEW public.all_docs AS SELECT * FROM public.docs;
          CREATE VIEW public.inner_v WITH (security_invoker = true) AS SELECT * FROM public.docs;
          CREATE VIEW public.outer_v AS SELECT * FROM public.inner_v;
          CREATE ROLE "${owner}" NOLOGIN; GRANT SELECT ON public.docs TO "${owner}";
          CREATE VIEW public.owned_v AS SELECT * FROM public.docs; ALTER VIEW public.owned_v OWNER TO "${owner}";
          CREATE VIEW public.invoker_v WITH (security_invoker = true) AS SELECT * FROM public.docs;
          CREATE MATERIALIZED VIEW public.docs_mv AS SELECT * FROM public.docs;
          CREATE TABLE public.countries (code text);
          CREATE MATERIALIZED VIEW public.countries_mv AS SELECT * FROM public.countries;
          GRANT SELECT ON public.all_docs, public.outer_v, public.owned_v, public.invoker_v, public.docs_mv, public.countries_mv
            TO "${c.app}";`;
      },
    });
  });

  test("view-not-security-invoker: a superuser's view over an RLS table, granted to the app role → error", () => {
    const f = expectFinding(a, "view-not-security-invoker", "view public.all_docs", "error");
    expect(f.fix).toBe("ALTER VIEW public.all_docs SET (security_invoker = true);");
  });
  test("view-not-security-invoker: through another view", () => {
    expectFinding(a, "view-not-security-invoker", "view public.outer_v", "error");
    expectNoFindingOn(a, "view public.inner_v");
  });
  test("view-not-security-invoker: owned by a role without bypass, over a FORCEd table → warning", () => {
    expectFinding(a, "view-not-security-invoker", "view public.owned_v", "warning");
  });
  test("view-not-security-invoker clean: security_invoker = true", () => {
    expectNoFindingOn(a, "view public.invoker_v");
  });

  test("matview-over-rls-table: a materialized view of an RLS table readable by the app role → error", () => {
    expectFinding(a, "matview-over-rls-table", "materialized view public.docs_mv", "error");
  });
  test("matview-over-rls-table clean: a materialized view of a table without RLS", () => {
    expectNoFindingOn(a, "materialized view public.countries_mv");
  });
});

describe("the app role", () => {
  const ATTRIBUTES = [
    ["app-role-superuser", "SUPERUSER", "error"],
    ["app-role-bypassrls", "BYPASSRLS", "error"],
    ["app-role-createrole", "CREATEROLE", "error"],
    ["app-role-replication", "REPLICATION", "error"],
    ["app-role-createdb", "CREATEDB", "warning"],
  ] as const;
  const ROLE_RULES = [...ATTRIBUTES.map(([rule]) => rule), "app-role-missing", "app-role-privileged-membership", "app-role-owns-table"];

  // One database: the app role (as setup left it) and roles with problems.
  let clean: Audit;
  let attrs: Audit;
  let members: Audit;
  let owners: Audit;
  let missing: Audit;
  beforeAll(async () => {
    let powerful = "";
    let joined = "";
    let owning = "";
    clean = await audit({
      plant: (c) => {
        powerful = c.role("powerful");
        joined = c.role("joined");
        owning = c.role("owning");
        const ops = c.role("ops");
        const root = c.role("root");
        const readers = c.role("readers");
        const tableOwners = c.role("table_owners");
        return `
          CREATE ROLE "${powerful}" LOGIN ${ATTRIBUTES.map(([, attr]) => attr).join(" ")};
          CREATE ROLE "${readers}" NOLOGIN; GRANT "${readers}" TO "${c.app}";
          CREATE ROLE "${joined}" LOGIN;
          GRANT pg_read_all_data TO "${joined}";
          CREATE ROLE "${ops}" NOLOGIN; GRANT pg_execute_server_program TO "${ops}"; GRANT "${ops}" TO "${joined}";
          CREATE ROLE "${root}" NOLOGIN SUPERUSER; GRANT "${root}" TO "${joined}";
          CREATE ROLE "${owning}" LOGIN;
          ${isolated({ ...c, app: owning }, "docs")} ALTER TABLE public.docs OWNER TO "${owning}";
          ${isolated({ ...c, app: owning }, "orders")}
          CREATE ROLE "${tableOwners}" NOLOGIN; ALTER TABLE public.orders OWNER TO "${tableOwners}";
          GRANT "${tableOwners}" TO "${owning}";
          ${isolated(c, "good")}`;
      },
    });
    attrs = await doctor(clean, [], powerful);
    members = await doctor(clean, [], joined);
    owners = await doctor(clean, [], owning);
    missing = await doctor(clean, [], clean.ctx.role("nobody"));
  });

  for (const [rule, attribute, severity] of ATTRIBUTES) {
    test(`${rule}: a role with ${attribute} → ${severity}`, () => {
      expectFinding(attrs, rule, `role ${attrs.role}`, severity);
    });
  }
  test("app-role-* clean: the role as setup leaves it (a member of an ordinary role, owning nothing)", () => {
    for (const rule of ROLE_RULES) expectNoFinding(clean, rule);
  });

  test("app-role-missing: the role does not exist → error", () => {
    expectFinding(missing, "app-role-missing", `role ${missing.role}`, "error");
  });

  test("app-role-privileged-membership: direct, indirect, and through a superuser role → error", () => {
    const mine = members.findings.filter((f) => f.rule === "app-role-privileged-membership");
    expect(mine.every((f) => f.severity === "error" && f.object === `role ${members.role}`)).toBe(true);
    const text = mine.map((f) => f.message).join("\n");
    expect(text).toContain("is a member of pg_read_all_data (reads every table, multigres.context_keys included)");
    expect(text).toMatch(/is a member of pg_execute_server_program .* through \S+ → \S+_ops → pg_execute_server_program/);
    expect(text).toMatch(/is a member of \S+_root \(SUPERUSER\)/);
    expect(mine.length).toBe(3);
  });

  test("app-role-owns-table: owning a tenant table, or being a member of its owner → error", () => {
    expectFinding(owners, "app-role-owns-table", "table public.docs", "error");
    const f = expectFinding(owners, "app-role-owns-table", "table public.orders", "error");
    expect(f.message).toContain("is a member of");
    expectNoFindingOn(owners, "table public.good");
  });
});

describe("SECURITY DEFINER functions", () => {
  let a: Audit;
  beforeAll(async () => {
    a = await audit({
      plant: (c) => `
        CREATE FUNCTION public.lookup(id int) RETURNS text LANGUAGE sql SECURITY DEFINER AS 'SELECT id::text';
        CREATE SCHEMA scratchpad; GRANT USAGE, CREATE ON SCHEMA scratchpad TO "${c.app}";
        CREATE FUNCTION public.writable_path() RETURNS int LANGUAGE sql SECURITY DEFINER
          SET search_path = scratchpad, pg_catalog, pg_temp AS 'SELECT 1';
        CREATE FUNCTION public.temp_first() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = public AS 'SELECT 1';
        CREATE FUNCTION public.fixed() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 1';
        CREATE FUNCTION public.admin_only() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1';
        REVOKE EXECUTE ON FUNCTION public.admin_only() FROM PUBLIC;
        CREATE FUNCTION public.own() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1';
        ALTER FUNCTION public.own() OWNER TO "${c.app}";
        CREATE FUNCTION public.invoker() RETURNS int LANGUAGE sql AS 'SELECT 1';`,
    });
  });

  test("security-definer-search-path: executable by the app role, no search_path → error", () => {
    expectFinding(a, "security-definer-search-path", "function public.lookup(integer)", "error");
  });
  test("security-definer-search-path: a search_path with a schema the app role can create in → error", () => {
    const f = expectFinding(a, "security-definer-search-path", "function public.writable_path()", "error");
    expect(f.message).toContain("can create objects in scratchpad");
  });
  test("security-definer-search-path: pg_temp not last → warning", () => {
    expectFinding(a, "security-definer-search-path", "function public.temp_first()", "warning");
  });
  test("security-definer-search-path clean: fixed search_path, not executable by the app role, owned by the app role, not SECURITY DEFINER", () => {
    for (const fn of ["fixed()", "admin_only()", "own()", "invoker()"]) expectNoFindingOn(a, `function public.${fn}`);
    // multigres.current_tenant_id() itself is SECURITY DEFINER with a fixed search_path.
    expectNoFindingOn(a, "function multigres.current_tenant_id()");
  });
});

describe("the setup itself", () => {
  // A database exactly as setup leaves it: the clean case of every setup rule.
  let fresh: Audit;
  beforeAll(async () => {
    fresh = await audit();
  });

  test("setup-missing: no multigres schema → error", async () => {
    const a = await audit({ noSetup: true });
    expectFinding(a, "setup-missing", `database ${a.ctx.db}`, "error");
  });
  test("setup-missing clean: after setup", async () => {
    expectNoFinding(fresh, "setup-missing");
  });

  test("setup-outdated: a schema-version-1 setup (unsigned current_tenant_id) → error", async () => {
    const a = await audit({
      noSetup: true,
      before: () => `
        CREATE SCHEMA multigres;
        CREATE FUNCTION multigres.current_tenant_id() RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog
          AS $$ SELECT nullif(current_setting('app.current_tenant_id', true), '') $$;
        CREATE FUNCTION public.current_tenant_id() RETURNS text LANGUAGE sql STABLE SET search_path = pg_catalog
          AS $$ SELECT multigres.current_tenant_id() $$;`,
    });
    const f = expectFinding(a, "setup-outdated", "schema multigres", "error");
    expect(f.message).toContain("not SECURITY DEFINER");
    expect(f.message).toContain("no schema_version");
  });
  test("setup-outdated: schema_version 1, a SECURITY INVOKER verifier, a verifier without search_path", async () => {
    for (const plant of [
      `UPDATE multigres.meta SET value = '1' WHERE key = 'schema_version';`,
      `ALTER FUNCTION multigres.current_tenant_id() SECURITY INVOKER;`,
      `ALTER FUNCTION multigres.current_tenant_id() RESET search_path;`,
    ]) {
      const a = await audit({ plant: () => plant });
      expectFinding(a, "setup-outdated", "schema multigres", "error");
    }
  });
  test("setup-newer: schema_version above this binary's → warning", async () => {
    const a = await audit({ plant: () => `UPDATE multigres.meta SET value = '99' WHERE key = 'schema_version';` });
    expectFinding(a, "setup-newer", "schema multigres", "warning");
  });
  test("setup-outdated clean: after setup", async () => {
    expectNoFinding(fresh, "setup-outdated");
    expectNoFinding(fresh, "setup-newer");
  });

  test("setup-no-context-key: no key stored → error", async () => {
    const a = await audit({ plant: () => `DELETE FROM multigres.context_keys;` });
    expectFinding(a, "setup-no-context-key", "table multigres.context_keys", "error");
  });
  test("setup-no-context-key clean: after setup", async () => {
    expectNoFinding(fresh, "setup-no-context-key");
  });

  test("context-key-not-stored: the configured secret's key is missing → error; clean with the right secret", async () => {
    const wrong = await doctor(fresh, [], fresh.ctx.app, { MULTIGRES_CONTEXT_SECRET: OTHER_SECRET });
    const f = expectFinding(wrong, "context-key-not-stored", "table multigres.context_keys", "error");
    expect(f.message).toContain(contextKeyId(deriveContextKey(OTHER_SECRET)));
    expect(wrong.run.stdout).not.toContain(OTHER_SECRET);
    expectNoFinding(await doctor(fresh, [], fresh.ctx.app, { MULTIGRES_CONTEXT_SECRET: SECRET }), "context-key-not-stored");
  });

  test("context-keys-multiple: two keys during a rotation → info (exit 0); clean with one", async () => {
    const a = await audit({ moreSecrets: [OTHER_SECRET] });
    expectFinding(a, "context-keys-multiple", "table multigres.context_keys", "info");
    expect(a.run.exitCode).toBe(0);
    expectNoFinding(fresh, "context-keys-multiple");
  });

  test("setup-setting-mismatch: verifier installed for another setting → error; clean with that --tenant-setting", async () => {
    const a = await audit({ setupArgs: ["--tenant-setting", "myapp.tenant"] });
    expectFinding(a, "setup-setting-mismatch", "function multigres.current_tenant_id()", "error");
    const b = await audit({ setupArgs: ["--tenant-setting", "myapp.tenant"], doctorArgs: ["--tenant-setting", "myapp.tenant"] });
    expectNoFinding(b, "setup-setting-mismatch");
    expect(b.run.exitCode).toBe(0);
  });

  test("setup-exposed: the app role can read the keys, add a key, or owns the verifier → error", async () => {
    const grants = [
      (r: string) => `GRANT SELECT ON multigres.context_keys TO "${r}";`,
      (r: string) => `GRANT SELECT (key_id, inner_pad) ON multigres.context_keys TO "${r}";`,
      (r: string) => `GRANT EXECUTE ON FUNCTION multigres.add_context_key(bytea) TO "${r}";`,
      (r: string) => `ALTER FUNCTION public.current_tenant_id() OWNER TO "${r}";`,
    ];
    const roles: string[] = [];
    const a = await audit({
      plant: (c) =>
        grants
          .map((grant, i) => {
            roles[i] = c.role(`exposed${i}`);
            return `CREATE ROLE "${roles[i]}" LOGIN; ${grant(roles[i]!)}`;
          })
          .join("\n"),
    });
    expectNoFinding(a, "setup-exposed"); // the app role setup hardened is not exposed
    for (const role of roles) {
      const b = await doctor(a, [], role);
      expectFinding(b, "setup-exposed", `role ${role}`, "error");
    }
  });
  test("setup-exposed clean: after setup", async () => {
    expectNoFinding(fresh, "setup-exposed");
  });
});
