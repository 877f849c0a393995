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
import { FUNCTIONS_SQL, PINNED_ROLE_SETTINGS, REGRANTED_TO, VIEWS_SQL, type HardeningId } from "../../src/db/hardening.ts";
import { contextKeyId, deriveContextKey } from "../../src/tenant/context.ts";
import { startPostgres, type PgInstance } from "../harness/index.ts";
import { writeTempFile } from "../harness/clients.ts";
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

/** A tenant table granted to the app role (its key led by the tenant column, as the index rules want). */
const table = (c: Ctx, name = "docs", column = "tenant_id") => `
  CREATE TABLE public.${name} (id serial, ${column} text NOT NULL, body text, PRIMARY KEY (${column}, id));
  GRANT SELECT, INSERT, UPDATE, DELETE ON public.${name} TO "${c.app}";`;
/** …with isolation turned on the recommended way. */
const isolated = (c: Ctx, name = "docs") => `${table(c, name)} SELECT multigres.enable_tenant_rls('public.${name}');`;

// ---------------------------------------------------------------------------

describe("a correctly set up database", () => {
  test("tenant tables with the recommended policy, an invoker view, a safe SECURITY DEFINER function: no error, exit 0", async () => {
    const a = await audit({
      plant: (c) => {
        // The function runs as a role that row-level security binds like any tenant.
        const definer = c.role("definer");
        return `
        ${isolated(c, "docs")}
        ${isolated(c, "orders")}
        CREATE POLICY only_live ON public.docs AS RESTRICTIVE USING (body IS NOT NULL);
        CREATE TABLE public.countries (code text PRIMARY KEY);  -- no tenant column: not a tenant table
        GRANT SELECT ON public.countries TO "${c.app}";
        CREATE VIEW public.docs_v WITH (security_invoker = true) AS SELECT * FROM public.docs;
        GRANT SELECT ON public.docs_v TO "${c.app}";
        CREATE ROLE "${definer}" NOLOGIN; GRANT SELECT ON public.docs TO "${definer}";
        CREATE FUNCTION public.doc_count() RETURNS bigint LANGUAGE sql SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp AS 'SELECT count(*) FROM public.docs';
        ALTER FUNCTION public.doc_count() OWNER TO "${definer}";`;
      },
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

describe("tenant columns: repeatable, a comma list, the config file", () => {
  let a: Audit;
  beforeAll(async () => {
    a = await audit({
      plant: (c) => `
        ${table(c, "docs")}
        ${table(c, "orgs", "org_id")}
        ${isolated(c, "good")}
        CREATE TABLE public.org_forced (id serial, org_id text NOT NULL, PRIMARY KEY (org_id, id));
        SELECT multigres.enable_tenant_rls('public.org_forced', 'org_id');
        CREATE TABLE public.org_unforced (id serial, org_id text NOT NULL, PRIMARY KEY (org_id, id));
        SELECT multigres.enable_tenant_rls('public.org_unforced', 'org_id'); ALTER TABLE public.org_unforced NO FORCE ROW LEVEL SECURITY;`,
    });
  });
  const both = (b: Audit) => {
    expectFinding(b, "rls-disabled", "table public.docs", "error");
    const f = expectFinding(b, "rls-disabled", "table public.orgs", "error");
    expect(f.message).toContain("tenant column org_id");
    expect(f.fix).toBe("SELECT multigres.enable_tenant_rls('public.orgs', 'org_id');");
    expectFinding(b, "rls-not-forced", "table public.org_unforced", "warning");
    expectNoFindingOn(b, "table public.org_forced");
    expectNoFindingOn(b, "table public.good");
  };

  test("by default only tenant_id: the org_id table without RLS passes unseen", () => {
    expectNoFindingOn(a, "table public.orgs");
    expectFinding(a, "rls-disabled", "table public.docs", "error");
  });
  test("--tenant-column repeated", async () => {
    both(await doctor(a, ["--tenant-column", "tenant_id", "--tenant-column", "org_id"]));
  });
  test("--tenant-column as a comma list, and with =", async () => {
    both(await doctor(a, ["--tenant-column", "tenant_id,org_id"]));
    both(await doctor(a, ["--tenant-column=tenant_id", "--tenant-column=org_id"]));
  });
  test("tenant_columns in the config file, and MULTIGRES_TENANT_COLUMNS", async () => {
    const config = writeTempFile(`doctor-columns-${process.pid}.toml`, `tenant_columns = ["tenant_id", "org_id"]\n`);
    both(await doctor(a, ["--config", config]));
    both(await doctor(a, [], a.ctx.app, { MULTIGRES_TENANT_COLUMNS: "tenant_id,org_id" }));
  });
  test("the flag beats the config file", async () => {
    const config = writeTempFile(`doctor-columns-flag-${process.pid}.toml`, `tenant_columns = ["tenant_id", "org_id"]\n`);
    const b = await doctor(a, ["--config", config, "--tenant-column", "org_id"]);
    expectFinding(b, "rls-disabled", "table public.orgs", "error");
    expectNoFindingOn(b, "table public.docs");
  });
  test("names that cannot be columns are usage errors (exit 2)", async () => {
    const url = scratch.url(a.ctx.db);
    const bad = writeTempFile(`doctor-columns-bad-${process.pid}.toml`, `tenant_columns = "org_id"\n`);
    for (const args of [["--tenant-column", ""], ["--tenant-column", "a,"], ["--tenant-column", "x".repeat(64)], ["--tenant-column"], ["--config", bad]]) {
      const r = await multigres(["doctor", "--database-url", url, "--app-role", a.ctx.app, ...args]);
      expect(r.exitCode, describeCli(r)).toBe(2);
      expect(r.stderr).toMatch(/tenant.column|tenant_columns/);
    }
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
  test("policy-null-arm clean: IS NULL on a column is no null arm on the tenant, but an OR doctor cannot prove → policy-unproven", () => {
    expectNoFinding(a, "policy-null-arm", 'policy "shared_or_own" on public.shared');
    const f = expectFinding(a, "policy-unproven", 'policy "shared_or_own" on public.shared', "error");
    // Its WITH CHECK (IS NOT NULL AND the tenant) is proven: only USING is named.
    expect(f.message).toContain("its USING for SELECT, UPDATE, DELETE may admit other tenants' rows");
    expect(f.message).not.toContain("WITH CHECK for");
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

describe("the policy prover", () => {
  let a: Audit;
  const rls = (name: string) => `ALTER TABLE public.${name} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;`;
  /** A tenant table whose only policy is `policy` (USING, and WITH CHECK the same unless given). */
  const only = (c: Ctx, name: string, using: string, check?: string) =>
    `${table(c, name)} ${rls(name)} CREATE POLICY p ON public.${name} USING (${using})${check ? ` WITH CHECK (${check})` : ""};`;
  beforeAll(async () => {
    a = await audit({
      plant: (c) => `
        CREATE FUNCTION public.is_staff() RETURNS boolean LANGUAGE sql STABLE AS 'SELECT false';
        CREATE FUNCTION public.always_eq(text, text) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true';
        CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.always_eq);
        CREATE COLLATION public.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);

        -- what the issue measured: doctor passed all of these
        ${only(c, "or_true", "tenant_id = current_tenant_id() OR true")}
        ${only(c, "or_staff", "tenant_id = current_tenant_id() OR public.is_staff()")}
        ${only(c, "like_prefix", "tenant_id LIKE current_tenant_id() || '%'")}
        ${only(c, "coalesced", "coalesce(current_tenant_id(), tenant_id) = tenant_id")}
        ${only(c, "not_false", "(tenant_id = current_tenant_id()) IS NOT FALSE")}
        -- and their kin
        ${only(c, "not_distinct", "tenant_id IS NOT DISTINCT FROM current_tenant_id()")}
        ${only(c, "trojan", "tenant_id OPERATOR(public.=) current_tenant_id()")}
        CREATE TABLE public.caseless (id serial, tenant_id text COLLATE public.ci NOT NULL, PRIMARY KEY (tenant_id, id));
        GRANT SELECT ON public.caseless TO "${c.app}"; SELECT multigres.enable_tenant_rls('public.caseless');
        ${only(c, "sub_from", "tenant_id = (SELECT current_tenant_id() FROM public.or_true LIMIT 1)")}
        ${only(c, "check_open", "tenant_id = (SELECT current_tenant_id())", "current_tenant_id() IS NOT NULL")}

        -- proven shapes
        ${only(c, "direct", "current_tenant_id() = tenant_id")}
        ${only(c, "narrowed", "tenant_id = (SELECT current_tenant_id()) AND body IS NOT NULL")}
        CREATE TABLE public.by_uuid (id serial, tenant_id uuid NOT NULL, PRIMARY KEY (tenant_id, id));
        GRANT SELECT ON public.by_uuid TO "${c.app}"; ${rls("by_uuid")}
        CREATE POLICY p ON public.by_uuid USING (tenant_id = (SELECT current_tenant_id())::uuid);
        CREATE TABLE public.by_varchar (id serial, tenant_id varchar(63) NOT NULL, PRIMARY KEY (tenant_id, id));
        GRANT SELECT ON public.by_varchar TO "${c.app}"; ${rls("by_varchar")}
        CREATE POLICY p ON public.by_varchar USING (tenant_id = multigres.current_tenant_id());
        -- an unproven permissive policy bounded by a proven restrictive one: for every command, or only for SELECT
        ${isolated(c, "bounded")} CREATE POLICY open ON public.bounded USING (true);
          CREATE POLICY tenant_bound ON public.bounded AS RESTRICTIVE USING (tenant_id = (SELECT current_tenant_id()));
        ${isolated(c, "half_bounded")} CREATE POLICY open ON public.half_bounded USING (true);
          CREATE POLICY tenant_bound ON public.half_bounded AS RESTRICTIVE FOR SELECT USING (tenant_id = (SELECT current_tenant_id()));

        -- leaks: PostgreSQL runs a policy's conditions in cost order, on every tenant's rows
        CREATE FUNCTION public.visible(body text) RETURNS boolean LANGUAGE sql STABLE AS 'SELECT true';
        ALTER FUNCTION public.visible(text) OWNER TO "${c.app}";  -- the tenant can make it RAISE NOTICE every row
        ${only(c, "cast_leak", "tenant_id = current_tenant_id() AND body::int > 0")}
        ${only(c, "own_function", "tenant_id = (SELECT current_tenant_id()) AND public.visible(body)")}
        ${isolated(c, "leaky_bound")} CREATE POLICY shown ON public.leaky_bound AS RESTRICTIVE USING (public.visible(body));
        ${isolated(c, "leaky_open")} CREATE POLICY open ON public.leaky_open USING (public.visible(body));
          CREATE POLICY tenant_bound ON public.leaky_open AS RESTRICTIVE USING (tenant_id = (SELECT current_tenant_id()));
        ${only(c, "leakproof_and", "tenant_id = current_tenant_id() AND body = 'x' AND body IS NOT NULL")}`,
    });
  });

  for (const name of ["or_true", "or_staff", "like_prefix", "coalesced", "not_false", "not_distinct", "trojan", "sub_from"]) {
    test(`policy-unproven: ${name} → error, showing the expression`, () => {
      const f = expectFinding(a, "policy-unproven", `policy "p" on public.${name}`, "error");
      expect(f.message).toContain("doctor cannot prove");
      expect(f.message).toContain("USING (");
      expect(f.fix).toContain(`CREATE POLICY tenant_bound ON public.${name} AS RESTRICTIVE`);
    });
  }
  test("policy-unproven: a case-insensitive collation (tenant acme would see ACME) → error", () => {
    expectFinding(a, "policy-unproven", 'policy "multigres_tenant_isolation" on public.caseless', "error");
  });
  test("policy-unproven: a proven USING with an unproven WITH CHECK names WITH CHECK only", () => {
    const f = expectFinding(a, "policy-unproven", 'policy "p" on public.check_open', "error");
    expect(f.message).toContain("its WITH CHECK for INSERT, UPDATE");
    expect(f.message).not.toContain("USING for");
  });
  test("the issue's examples fail the run (exit 1)", () => {
    expect(a.run.exitCode).toBe(1);
  });

  test("policy-unproven clean: either operand order, AND, casts on either side, multigres.current_tenant_id()", () => {
    for (const name of ["direct", "narrowed", "by_uuid", "by_varchar"]) expectNoFindingOn(a, `policy "p" on public.${name}`);
  });
  test("policy-unproven clean: a proven restrictive policy bounds USING (true)", () => {
    expectNoFindingOn(a, 'policy "open" on public.bounded');
    expectNoFindingOn(a, 'policy "tenant_bound" on public.bounded');
  });
  test("policy-unproven: an AND whose other condition casts the row (the error shows another tenant's value) → error", () => {
    const f = expectFinding(a, "policy-unproven", 'policy "p" on public.cast_leak', "error");
    expect(f.message).toContain("an I/O cast");
    expect(f.message).toContain("LEAKPROOF");
  });
  test("policy-unproven: an AND with a function the app role owns (it can replace it) → error, naming it", () => {
    expect(expectFinding(a, "policy-unproven", 'policy "p" on public.own_function', "error").message).toContain("public.visible(text)");
  });
  test("policy-unproven: a leaky restrictive policy, and a leaky permissive one however bounded → error", () => {
    expectFinding(a, "policy-unproven", 'policy "shown" on public.leaky_bound', "error");
    const f = expectFinding(a, "policy-unproven", 'policy "open" on public.leaky_open', "error");
    expect(f.message).not.toContain("may admit other tenants' rows"); // bounded: the leak is the problem
    expectNoFindingOn(a, 'policy "tenant_bound" on public.leaky_open');
  });
  test("policy-unproven clean: an AND of LEAKPROOF conditions", () => {
    expectNoFindingOn(a, 'policy "p" on public.leakproof_and');
  });
  test("policy-no-tenant-check: a restrictive bound for SELECT only leaves the other commands open", () => {
    const f = expectFinding(a, "policy-no-tenant-check", 'policy "open" on public.half_bounded', "error");
    expect(f.message).toContain("USING for UPDATE, DELETE");
    expect(f.message).toContain("USING (as its WITH CHECK) for INSERT, UPDATE");
    expect(f.message).not.toContain("SELECT");
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
      plant: (c) => {
        const definer = c.role("definer"); // bound by RLS like any tenant
        const bypasser = c.role("bypasser");
        const tableOwner = c.role("table_owner");
        const forcedOwner = c.role("forced_owner");
        const readers = c.role("readers");
        return `
        CREATE ROLE "${definer}" NOLOGIN;
        CREATE FUNCTION public.lookup(id int) RETURNS text LANGUAGE sql SECURITY DEFINER AS 'SELECT id::text';
        CREATE SCHEMA scratchpad; GRANT USAGE, CREATE ON SCHEMA scratchpad TO "${c.app}";
        CREATE FUNCTION public.writable_path() RETURNS int LANGUAGE sql SECURITY DEFINER
          SET search_path = scratchpad, pg_catalog, pg_temp AS 'SELECT 1';
        CREATE FUNCTION public.temp_first() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = public AS 'SELECT 1';
        CREATE FUNCTION public.fixed() RETURNS int LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT 1';
        ALTER FUNCTION public.fixed() OWNER TO "${definer}";
        CREATE FUNCTION public.admin_only() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1';
        REVOKE EXECUTE ON FUNCTION public.admin_only() FROM PUBLIC;
        CREATE FUNCTION public.own() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1';
        ALTER FUNCTION public.own() OWNER TO "${c.app}";
        CREATE FUNCTION public.invoker() RETURNS int LANGUAGE sql AS 'SELECT 1';

        -- security-definer-bypass: every tenant's rows, with a fixed search_path all the same
        ${isolated(c, "docs")}
        CREATE FUNCTION public.all_docs() RETURNS SETOF public.docs LANGUAGE sql SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp AS 'SELECT * FROM public.docs';
        CREATE ROLE "${bypasser}" NOLOGIN BYPASSRLS; GRANT SELECT ON public.docs TO "${bypasser}";
        CREATE FUNCTION public.bypassing() RETURNS bigint LANGUAGE sql SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp AS 'SELECT count(*) FROM public.docs';
        ALTER FUNCTION public.bypassing() OWNER TO "${bypasser}";
        CREATE ROLE "${tableOwner}" NOLOGIN;
        ${isolated(c, "unforced")} ALTER TABLE public.unforced NO FORCE ROW LEVEL SECURITY, OWNER TO "${tableOwner}";
        CREATE FUNCTION public.by_owner() RETURNS bigint LANGUAGE sql SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp AS 'SELECT count(*) FROM public.unforced';
        ALTER FUNCTION public.by_owner() OWNER TO "${tableOwner}";
        -- clean: the owner owns its table but FORCE binds it; SECURITY INVOKER; not executable by the app role
        CREATE ROLE "${forcedOwner}" NOLOGIN;
        ${isolated(c, "forced")} ALTER TABLE public.forced OWNER TO "${forcedOwner}";
        CREATE FUNCTION public.by_forced_owner() RETURNS bigint LANGUAGE sql SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp AS 'SELECT count(*) FROM public.forced';
        ALTER FUNCTION public.by_forced_owner() OWNER TO "${forcedOwner}";
        CREATE FUNCTION public.all_docs_invoker() RETURNS SETOF public.docs LANGUAGE sql
          SET search_path = pg_catalog, pg_temp AS 'SELECT * FROM public.docs';
        CREATE FUNCTION public.all_docs_revoked() RETURNS SETOF public.docs LANGUAGE sql SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp AS 'SELECT * FROM public.docs';
        REVOKE EXECUTE ON FUNCTION public.all_docs_revoked() FROM PUBLIC;
        CREATE ROLE "${readers}" NOLOGIN; GRANT "${readers}" TO "${c.app}";
        CREATE FUNCTION public.all_docs_members() RETURNS SETOF public.docs LANGUAGE sql SECURITY DEFINER
          SET search_path = pg_catalog, pg_temp AS 'SELECT * FROM public.docs';
        REVOKE EXECUTE ON FUNCTION public.all_docs_members() FROM PUBLIC;
        GRANT EXECUTE ON FUNCTION public.all_docs_members() TO "${readers}";`;
      },
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

  test("security-definer-bypass: a superuser's function returning every tenant's rows, search_path fixed → error", () => {
    const f = expectFinding(a, "security-definer-bypass", "function public.all_docs()", "error");
    expect(f.message).toContain("is a superuser");
    expect(f.fix).toContain("REVOKE EXECUTE ON FUNCTION public.all_docs() FROM PUBLIC");
    expectNoFinding(a, "security-definer-search-path", "function public.all_docs()");
  });
  test("security-definer-bypass: executable only through a role the app role is a member of → error", () => {
    expectFinding(a, "security-definer-bypass", "function public.all_docs_members()", "error");
  });
  test("security-definer-bypass: owned by a BYPASSRLS role, or by the owner of a tenant table that does not FORCE RLS → error", () => {
    expect(expectFinding(a, "security-definer-bypass", "function public.bypassing()", "error").message).toContain("has BYPASSRLS");
    expect(expectFinding(a, "security-definer-bypass", "function public.by_owner()", "error").message).toContain("public.unforced");
  });
  test("security-definer-bypass clean: an owner bound by FORCEd RLS, SECURITY INVOKER, not executable, setup's own functions", () => {
    for (const fn of ["by_forced_owner()", "all_docs_invoker()", "all_docs_revoked()", "fixed()"]) {
      expectNoFindingOn(a, `function public.${fn}`);
    }
    expectNoFinding(a, "security-definer-bypass", "function multigres.current_tenant_id()");
    expectNoFinding(a, "security-definer-bypass", "function multigres.backend_binding()");
    expectNoFinding(a, "security-definer-bypass", "function multigres.context_status(text)");
  });
});

describe("hardening: what one role shared by every tenant must not have", () => {
  // One database hardened like setup, then everything handed back one way or another.
  let a: Audit;
  let clean: Audit;
  let roles: { readers: string; owner: string };
  beforeAll(async () => {
    clean = await audit({ before: () => "CREATE EXTENSION pg_stat_statements;", plant: (c) => isolated(c, "docs") });
    a = await audit({
      plant: (c) => {
        roles = { readers: c.role("readers"), owner: c.role("owner") };
        return `
          CREATE ROLE "${roles.readers}" NOLOGIN; GRANT "${roles.readers}" TO "${c.app}";
          CREATE ROLE "${roles.owner}" NOLOGIN;
          GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO "${c.app}";
          GRANT SELECT ON pg_catalog.pg_stat_user_tables TO PUBLIC;
          CREATE EXTENSION pg_stat_statements;  -- grants its views to PUBLIC
          GRANT EXECUTE ON FUNCTION pg_catalog.lo_get(oid) TO "${roles.readers}";
          GRANT EXECUTE ON FUNCTION pg_catalog.pg_terminate_backend(integer, bigint) TO PUBLIC;
          CREATE SCHEMA open_to_all; GRANT CREATE ON SCHEMA open_to_all TO PUBLIC;
          CREATE SCHEMA apps_own AUTHORIZATION "${c.app}";
          CREATE SCHEMA usage_only; GRANT USAGE ON SCHEMA usage_only TO "${c.app}";
          ${isolated(c, "docs")} GRANT TRUNCATE ON public.docs TO "${c.app}";
          ${isolated(c, "refs")} GRANT REFERENCES ON public.refs TO PUBLIC;
          ${isolated(c, "fine")}
          CREATE TABLE public.countries (code text PRIMARY KEY);
          GRANT TRIGGER ON public.countries TO "${roles.readers}";
          CREATE TABLE public.lookup (code text PRIMARY KEY); GRANT TRUNCATE ON public.lookup TO "${c.app}";  -- no tenant rows
          ALTER DEFAULT PRIVILEGES FOR ROLE "${roles.owner}" IN SCHEMA public GRANT TRIGGER ON TABLES TO "${c.app}";
          ALTER ROLE "${c.app}" SET statement_timeout = 1;
          ALTER ROLE "${c.app}" IN DATABASE "${c.db}" SET search_path = open_to_all, public;
          ALTER ROLE "${c.app}" RESET log_parameter_max_length;
          DO $$ BEGIN EXECUTE format('ALTER LARGE OBJECT %s OWNER TO %I', lo_create(0), '${c.app}'); END $$;
          SELECT lo_create(0);  -- the superuser's: no tenant's`;
      },
    });
  });

  test("clean: hardened like setup, pg_stat_statements installed and revoked: no hardening finding, exit 0", () => {
    expect(clean.findings.filter((f) => f.rule.startsWith("hardening-") || f.rule === "large-objects-owned")).toEqual([]);
    expect(clean.run.exitCode).toBe(0);
  });

  test("hardening-activity: an activity function granted to the app role → error naming it", () => {
    const f = expectFinding(a, "hardening-activity", `role ${a.ctx.app}`, "error");
    expect(f.message).toContain("pg_stat_get_activity(integer)");
    expect(f.message).toContain("pg_stat_activity shows the running and last statements");
    expect(f.fix).toContain(`REVOKE EXECUTE ON FUNCTION pg_stat_get_activity(integer) FROM "${a.ctx.app}";`);
    expect(f.fix).toContain("TO pg_monitor;");
    expect(f.fix).toContain("multigres setup");
  });
  test("hardening-statistics: a statistics view granted to PUBLIC → error", () => {
    const f = expectFinding(a, "hardening-statistics", `role ${a.ctx.app}`, "error");
    expect(f.message).toContain("pg_stat_user_tables");
    expect(f.fix).toContain("REVOKE SELECT ON TABLE pg_stat_user_tables FROM PUBLIC;");
  });
  test("hardening-pg-stat-statements: the extension's views, readable by PUBLIC → error; not installed or revoked → none", () => {
    const f = expectFinding(a, "hardening-pg-stat-statements", `role ${a.ctx.app}`, "error");
    expect(f.message).toContain("public.pg_stat_statements");
  });
  test("hardening-large-objects: an lo function through a role the app role is a member of → error", () => {
    const f = expectFinding(a, "hardening-large-objects", `role ${a.ctx.app}`, "error");
    expect(f.message).toContain("lo_get(oid)");
    expect(f.fix).toContain(`FROM "${roles.readers}"`);
  });
  test("hardening-signals: pg_terminate_backend for PUBLIC → error", () => {
    expect(expectFinding(a, "hardening-signals", `role ${a.ctx.app}`, "error").fix).toContain("TO pg_signal_backend;");
  });
  test("hardening-schema-create: CREATE through PUBLIC, and a schema it owns → error; USAGE alone is fine", () => {
    const f = expectFinding(a, "hardening-schema-create", `role ${a.ctx.app}`, "error");
    expect(f.message).toContain("apps_own");
    expect(f.message).toContain("open_to_all");
    expect(f.message).not.toContain("usage_only");
    expect(f.fix).toContain("REVOKE CREATE ON SCHEMA open_to_all FROM PUBLIC;");
    expect(f.fix).toContain("ALTER SCHEMA apps_own OWNER TO");
  });
  test("hardening-table-privileges: TRUNCATE / REFERENCES on tenant tables, TRIGGER on any table → error", () => {
    const f = expectFinding(a, "hardening-table-privileges", `role ${a.ctx.app}`, "error");
    expect(f.message).toContain("public.docs");
    expect(f.message).toContain("public.refs");
    expect(f.message).toContain("can create triggers on public.countries");
    expect(f.message).not.toContain("public.fine");
    expect(f.message).not.toContain("public.lookup"); // TRUNCATE of a table without tenant rows
  });
  test("hardening-table-privileges: default privileges that would grant TRIGGER on future tables → warning", () => {
    const f = expectFinding(a, "hardening-table-privileges", `default privileges of role ${roles.owner} in schema public`, "warning");
    expect(f.fix).toBe(
      `ALTER DEFAULT PRIVILEGES FOR ROLE "${roles.owner}" IN SCHEMA "public" REVOKE TRUNCATE, TRIGGER, REFERENCES ON TABLES FROM "${a.ctx.app}";` +
        `  -- or: multigres setup --database-url "$ADMIN_URL" --app-role ${a.ctx.app} (it hardens this unless given --no-harden table-privileges)`,
    );
  });
  test("hardening-role-settings: role-level settings, in every database or this one → error; the pinned one missing → warning", () => {
    const f = expectFinding(a, "hardening-role-settings", `role ${a.ctx.app}`, "error");
    expect(f.message).toContain("statement_timeout=1");
    expect(f.message).toContain(`search_path=open_to_all, public (in ${a.ctx.db})`);
    expect(f.fix).toContain(`ALTER ROLE "${a.ctx.app}" RESET "statement_timeout";`);
    expect(f.fix).toContain(`ALTER ROLE "${a.ctx.app}" IN DATABASE "${a.ctx.db}" RESET "search_path";`);
    const [name, value] = PINNED_ROLE_SETTINGS[0]!;
    expectFinding(a, "hardening-role-settings", `setting ${name} of role ${a.ctx.app}`, "warning");
    expect(a.findings.find((x) => x.object === `setting ${name} of role ${a.ctx.app}`)!.fix).toContain(`SET "${name}" = ${value};`);
  });
  test("large-objects-owned: one owned by the app role → error; the superuser's do not count", () => {
    const f = expectFinding(a, "large-objects-owned", `role ${a.ctx.app}`, "error");
    expect(f.message).toContain("owns 1 large object:");
  });

  test("--no-harden <item> (repeatable, comma lists): that item's findings become info, kept by choice", async () => {
    const b = await doctor(a, ["--no-harden", "signals", "--no-harden", "table-privileges,role-settings"]);
    for (const [object, rule] of [
      [`role ${a.ctx.app}`, "hardening-signals"],
      [`role ${a.ctx.app}`, "hardening-table-privileges"],
      [`default privileges of role ${roles.owner} in schema public`, "hardening-table-privileges"],
      [`role ${a.ctx.app}`, "hardening-role-settings"],
    ] as const) {
      expect(expectFinding(b, rule, object, "info").message).toStartWith(`kept by choice (--no-harden ${rule.slice("hardening-".length)}): `);
    }
    expectFinding(b, "hardening-activity", `role ${a.ctx.app}`, "error");
  });
  test("--no-harden with an unknown item is a usage error (exit 2)", async () => {
    const r = await multigres(["doctor", "--database-url", scratch.url(a.ctx.db), "--app-role", a.ctx.app, "--no-harden", "everything"]);
    expect(r.exitCode, describeCli(r)).toBe(2);
    expect(r.stderr).toContain('--no-harden: "everything" is not a hardening item');
  });
});

describe("indexes on tenant tables", () => {
  let a: Audit;
  let open: Audit;
  beforeAll(async () => {
    a = await audit({
      plant: (c) => `
        ${isolated(c, "docs")}
        CREATE INDEX docs_body ON public.docs (body);
        CREATE INDEX docs_lower ON public.docs (lower(body));
        CREATE INDEX docs_partial ON public.docs (body) WHERE body IS NOT NULL;
        CREATE INDEX docs_tenant_body ON public.docs (tenant_id, body);
        CREATE TABLE public.users (id serial PRIMARY KEY, tenant_id text NOT NULL, email text NOT NULL, nick text NOT NULL,
                                   handle text NOT NULL, CONSTRAINT users_email UNIQUE (email), CONSTRAINT users_nick UNIQUE (nick, tenant_id),
                                   CONSTRAINT users_handle UNIQUE (tenant_id, handle));
        SELECT multigres.enable_tenant_rls('public.users');
        CREATE TABLE public.naturals (code text PRIMARY KEY, tenant_id text NOT NULL);
        SELECT multigres.enable_tenant_rls('public.naturals');
        CREATE TABLE public.bookings (tenant_id text NOT NULL, during tsrange NOT NULL, EXCLUDE USING gist (during WITH &&));
        SELECT multigres.enable_tenant_rls('public.bookings');
        CREATE TABLE public.events (tenant_id text NOT NULL, at date NOT NULL, ref text NOT NULL, UNIQUE (ref, at)) PARTITION BY RANGE (at);
        CREATE TABLE public.events_2026 PARTITION OF public.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
        SELECT multigres.enable_tenant_rls('public.events');
        -- a tenant table without the configured column: its policy says which column is the tenant's
        CREATE TABLE public.by_policy (id serial, org text NOT NULL, body text, PRIMARY KEY (org, id));
        ALTER TABLE public.by_policy ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
        CREATE POLICY p ON public.by_policy USING (org = (SELECT current_tenant_id()));
        CREATE INDEX by_policy_body ON public.by_policy (body);
        -- not a tenant table
        CREATE TABLE public.countries (code text PRIMARY KEY, name text UNIQUE);`,
    });
    open = await audit({
      plant: (c) => `${isolated(c, "docs")} CREATE INDEX docs_body ON public.docs (body);
        GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_tuples_fetched(oid) TO PUBLIC;`,
    });
  });

  test("index-not-tenant-led: a plain, an expression and a partial index → warning, fix leads with the tenant column", () => {
    const f = expectFinding(a, "index-not-tenant-led", "index public.docs_body", "warning");
    expect(f.message).toContain("Rows Removed by Filter");
    expect(f.fix).toBe(`CREATE INDEX ON public.docs ("tenant_id", body); DROP INDEX public.docs_body;`);
    expect(expectFinding(a, "index-not-tenant-led", "index public.docs_lower", "warning").fix).toContain(`("tenant_id", lower(body))`);
    expect(expectFinding(a, "index-not-tenant-led", "index public.docs_partial", "warning").fix).toContain("WHERE body IS NOT NULL");
  });
  test("index-not-tenant-led: an error when the app role can read the statistics (the count is exact)", () => {
    expectFinding(open, "hardening-statistics", `role ${open.ctx.app}`, "error");
    expectFinding(open, "index-not-tenant-led", "index public.docs_body", "error");
  });
  test("index-not-tenant-led: a primary key on a surrogate → info; a unique key led by another column → warning", () => {
    expectFinding(a, "index-not-tenant-led", "index public.users_pkey", "info");
    expectFinding(a, "index-not-tenant-led", "index public.users_nick", "warning");
  });
  test("index-not-tenant-led: the column a proven policy compares counts as the tenant column", () => {
    expect(expectFinding(a, "index-not-tenant-led", "index public.by_policy_body", "warning").fix).toContain(`("org", body)`);
    expectNoFindingOn(a, "index public.by_policy_pkey");
  });
  test("index-not-tenant-led clean: led by the tenant column; tables without tenant rows", () => {
    for (const ix of ["docs_tenant_body", "docs_pkey", "users_handle", "countries_pkey", "countries_name_key"]) {
      expectNoFindingOn(a, `index public.${ix}`);
    }
  });

  test("unique-not-tenant-led: a unique natural key without the tenant → error, fix adds it", () => {
    const f = expectFinding(a, "unique-not-tenant-led", "index public.users_email", "error");
    expect(f.message).toContain("unique across all tenants");
    expect(f.fix).toBe(`ALTER TABLE public.users DROP CONSTRAINT "users_email", ADD CONSTRAINT "users_email" UNIQUE ("tenant_id", email);`);
    expectFinding(a, "unique-not-tenant-led", "index public.naturals_pkey", "error");
  });
  test("unique-not-tenant-led: an exclusion constraint, and a partitioned table's unique key reported once", () => {
    expectFinding(a, "unique-not-tenant-led", "index public.bookings_during_excl", "error");
    expectFinding(a, "unique-not-tenant-led", "index public.events_ref_at_key", "error");
    expect(a.findings.filter((f) => f.object.startsWith("index public.events_2026"))).toEqual([]);
  });
  test("unique-not-tenant-led: a primary key on one generated column → warning", () => {
    expectFinding(a, "unique-not-tenant-led", "index public.users_pkey", "warning");
  });
  test("unique-not-tenant-led clean: the tenant column among the keys, in any position", () => {
    for (const ix of ["users_nick", "users_handle", "docs_pkey"]) expectNoFinding(a, "unique-not-tenant-led", `index public.${ix}`);
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
