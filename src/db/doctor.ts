/**
 * `multigres doctor`: audit a database for the ways tenant isolation can
 * fail open, read-only (one REPEATABLE READ READ ONLY transaction over the
 * catalogs). Each finding has a rule id, a severity, the object, what is
 * wrong and the fix. Exit status 1 when any finding is an error.
 *
 * Rules (ids are stable; scripts may rely on them):
 *
 *   setup-missing                  no multigres schema / current_tenant_id()
 *   setup-outdated                 schema_version below this binary's, verifier not
 *                                  SECURITY DEFINER or without a fixed search_path, …
 *   setup-newer                    schema_version above this binary's (warning)
 *   setup-setting-mismatch         current_tenant_id() reads another setting than --tenant-setting
 *   setup-no-context-key           no key stored: no tenant ever sees a row
 *   context-key-not-stored         the secret in MULTIGRES_CONTEXT_SECRET has no stored key
 *   context-keys-multiple          more than one key valid (rotation in progress; info)
 *   setup-exposed                  the app role can read/write the keys, add a key, or owns
 *                                  the multigres objects (so it could forge any tenant)
 *   app-role-missing               the app role does not exist
 *   app-role-superuser             … is SUPERUSER (RLS never applies)
 *   app-role-bypassrls             … has BYPASSRLS
 *   app-role-createrole            … has CREATEROLE (can grant itself privileged roles)
 *   app-role-replication           … has REPLICATION (can stream every row)
 *   app-role-createdb              … has CREATEDB (warning)
 *   app-role-privileged-membership … is a member, directly or not, of a privileged role
 *   app-role-owns-table            … owns (or is a member of the owner of) a tenant table
 *   rls-disabled                   tenant table with row-level security off
 *   rls-not-forced                 RLS on without FORCE: the owner bypasses it (warning)
 *   rls-no-policy                  RLS on with no policy: nobody sees rows (warning)
 *   policy-unproven                a permissive policy doctor cannot prove confines rows to
 *                                  the tenant (policy-prover.ts lists the proven shapes), or
 *                                  any policy whose USING may leak the rows it runs on
 *   policy-no-tenant-check         … one that does not call current_tenant_id() at all
 *   policy-null-arm                … one with a `current_tenant_id() IS NULL OR …` arm: no
 *                                  context = all rows (warning on a restrictive policy)
 *   policy-current-setting         … one reading current_setting() directly: forgeable with
 *                                  SET (warning on a restrictive policy)
 *   view-not-security-invoker      a view over RLS tables checked as its owner, not the caller
 *   matview-over-rls-table         a materialized view holding rows of RLS tables, with no RLS
 *   security-definer-search-path   a SECURITY DEFINER function the app role can run whose
 *                                  search_path is not fixed (or includes a schema it can write)
 *   security-definer-bypass        a SECURITY DEFINER function the app role can run whose
 *                                  owner bypasses RLS on a tenant table
 *   hardening-<item>               the app role still has what setup takes away from it
 *                                  (hardening.ts: activity, statistics, pg-stat-statements,
 *                                  large-objects, signals, schema-create, table-privileges,
 *                                  role-settings); info with --no-harden <item>
 *   large-objects-owned            large objects owned by the app role (shared by every tenant)
 *   index-not-tenant-led           an index on a tenant table not led by a tenant column
 *                                  (warning; error when the statistics are readable; info
 *                                  for a primary key)
 *   unique-not-tenant-led          a unique index or constraint on a tenant table without a
 *                                  tenant column (warning for a generated surrogate key)
 *
 * A "tenant table" is what hardening.ts's TENANT_TABLES_SQL says: a table
 * (partitions included) with one of the tenant columns (--tenant-column,
 * repeatable), with row-level security on, or with a policy.
 */
import { defineCommand } from "citty";
import { ConfigError } from "../config.ts";
import { contextKeyId, deriveContextKey, signatureSetting } from "../tenant/context.ts";
import {
  connectAdmin,
  DEFAULT_TENANT_COLUMNS,
  DEFAULT_TENANT_SETTING,
  describeError,
  noHardenItems,
  privilegedMemberships,
  quoteIdent,
  quoteLiteral,
  repeatedFlag,
  resolveCommon,
  SCHEMA_VERSION,
  UsageError,
} from "./connect.ts";
import { nameFew, plural, type AuditContext, type Finding, type Severity } from "./doctor-findings.ts";
import { checkHardening, granteesSql, keptByChoice } from "./doctor-hardening.ts";
import { indexFindings, readIndexes } from "./doctor-indexes.ts";
import { APP_SCHEMA_SQL, HARDENING_IDS, TENANT_TABLES_SQL, type HardeningId } from "./hardening.ts";
import { parseNodeTree, type PgValue } from "./node-tree.ts";
import {
  diagnose,
  judgeClause,
  unprovenPolicies,
  type Clause,
  type ClauseJudgement,
  type Command,
  type Diagnosis,
  type JudgedPolicy,
  type Leak,
  type PolCmd,
  type ProverCatalog,
  type Shortfalls,
} from "./policy-prover.ts";

export type { Finding, Severity } from "./doctor-findings.ts";

export interface DoctorOptions {
  databaseUrl: string;
  appRole: string;
  /** The columns that hold the tenant id [default: tenant_id]. */
  tenantColumns?: readonly string[];
  tenantSetting?: string;
  /** When known, doctor checks that its key is stored. */
  secret?: string;
  /** Hardening items kept by choice: their findings are info. */
  noHarden?: readonly HardeningId[];
}

export interface DoctorReport {
  database: string;
  appRole: string;
  findings: Finding[];
  /** Tenant tables examined, for the summary. */
  tenantTables: number;
}

const SEVERITY_ORDER: Record<Severity, number> = { error: 0, warning: 1, info: 2 };

function tryParse(text: string | null): PgValue | undefined {
  if (!text) return undefined;
  try {
    return parseNodeTree(text);
  } catch {
    return undefined;
  }
}

const TRUE_OPTION = /^(true|on|yes|1)$/i;

/** The schema names on a proconfig search_path value ("$user", public → ["$user", "public"]). */
export function parseSearchPath(value: string): string[] {
  const out: string[] = [];
  let cur = "";
  let quoted = false;
  for (let i = 0; i < value.length; i++) {
    const c = value[i]!;
    if (c === '"') {
      if (quoted && value[i + 1] === '"') {
        cur += '"';
        i++;
      } else quoted = !quoted;
    } else if (c === "," && !quoted) {
      out.push(cur.trim());
      cur = "";
    } else cur += c;
  }
  out.push(cur.trim());
  return out.filter((s) => s !== "");
}

export async function runDoctor(opts: DoctorOptions): Promise<DoctorReport> {
  const app = opts.appRole;
  const findings: Finding[] = [];
  const sql = connectAdmin(opts.databaseUrl, "multigres doctor");
  let database = "";
  let tenantTableCount = 0;
  try {
    await sql.begin("ISOLATION LEVEL REPEATABLE READ READ ONLY", async (tx) => {
      // Only the catalog resolves unqualified names, and names print schema-qualified.
      await tx`SET LOCAL search_path = pg_catalog, pg_temp`;
      const [info] = (await tx`
        SELECT current_database() AS db,
               to_regnamespace('multigres') IS NOT NULL AS has_schema,
               to_regprocedure('multigres.current_tenant_id()')::oid::int AS mfn,
               to_regprocedure('public.current_tenant_id()')::oid::int AS pfn,
               to_regprocedure('multigres.add_context_key(bytea)')::oid::int AS addkey,
               to_regclass('multigres.meta')::oid::int AS meta,
               to_regclass('multigres.context_keys')::oid::int AS keys`) as unknown as SetupInfo[];
      database = info!.db;
      const [role] = await tx`SELECT oid::int AS oid FROM pg_catalog.pg_roles WHERE rolname = ${app}`;
      const ctx: AuditContext = {
        tx,
        app,
        appQ: quoteIdent(app),
        appOid: role ? (role.oid as number) : null,
        setupFix: `multigres setup --database-url "$ADMIN_URL" --app-role ${app}`,
        tenantColumns: opts.tenantColumns ?? DEFAULT_TENANT_COLUMNS,
        add: (f) => findings.push(f),
      };

      const appRole = await checkAppRole(ctx);
      await checkSetup(ctx, info!, opts.tenantSetting ?? DEFAULT_TENANT_SETTING, opts.secret, appRole?.superuser ?? false);
      const tables = await checkTenantTables(ctx, await proverCatalog(ctx, info!, appRole?.superuser ?? false));
      tenantTableCount = tables.size;
      await checkViews(ctx);
      await checkSecurityDefinerSearchPath(ctx);
      await checkSecurityDefinerBypass(ctx);
      // A missing role is app-role-missing, a superuser app-role-superuser: nothing is left to harden.
      const open = appRole && !appRole.superuser ? await checkHardening(ctx, database) : new Set<HardeningId>();
      for (const ix of await readIndexes(ctx)) {
        const tenant = tables.get(ix.relid);
        if (tenant) for (const f of indexFindings(ix, tenant, open.has("statistics"))) ctx.add(f);
      }
    });
  } finally {
    await sql.end({ timeout: 5 }).catch(() => {});
  }

  const reported = keptByChoice(findings, new Set(opts.noHarden ?? []));
  reported.sort(
    (a, b) => SEVERITY_ORDER[a.severity] - SEVERITY_ORDER[b.severity] || a.rule.localeCompare(b.rule) || a.object.localeCompare(b.object),
  );
  return { database, appRole: app, findings: reported, tenantTables: tenantTableCount };
}

// ---- the app role -------------------------------------------------------------

async function checkAppRole(ctx: AuditContext): Promise<{ oid: number; superuser: boolean } | undefined> {
  const { app, appQ, setupFix, add } = ctx;
  const [role] = await ctx.tx`
    SELECT oid::int AS oid, rolname, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolcanlogin
    FROM pg_catalog.pg_roles WHERE rolname = ${app}`;
  if (!role) {
    add({
      rule: "app-role-missing",
      severity: "error",
      object: `role ${app}`,
      message: `role ${app} does not exist; the checks that depend on its privileges assume it could reach everything`,
      fix: setupFix,
    });
  } else {
    const attr = (col: string, rule: string, severity: Severity, keyword: string, why: string) => {
      if (role[col]) {
        add({ rule, severity, object: `role ${app}`, message: `${app} ${why}`, fix: `ALTER ROLE ${appQ} ${keyword};  -- or: ${setupFix}` });
      }
    };
    attr("rolsuper", "app-role-superuser", "error", "NOSUPERUSER", "is a superuser: row-level security never applies to it, every tenant sees every row");
    attr("rolbypassrls", "app-role-bypassrls", "error", "NOBYPASSRLS", "has BYPASSRLS: row-level security never applies to it, every tenant sees every row");
    attr("rolcreaterole", "app-role-createrole", "error", "NOCREATEROLE", "has CREATEROLE: it can create roles and grant itself membership in roles that read every table");
    attr("rolreplication", "app-role-replication", "error", "NOREPLICATION", "has REPLICATION: a replication connection streams every row of every tenant");
    attr("rolcreatedb", "app-role-createdb", "warning", "NOCREATEDB", "has CREATEDB, which an application role does not need");

    for (const p of await privilegedMemberships(ctx.tx, role.oid)) {
      add({
        rule: "app-role-privileged-membership",
        severity: "error",
        object: `role ${app}`,
        message: `${app} is a member of ${p.role} (${p.reasons.join(", ")})${p.via !== p.role ? ` through ${p.path}` : ""}: it can act with that role's privileges and escape row-level security`,
        fix: `REVOKE ${quoteIdent(p.via)} FROM ${appQ};  -- or: ${setupFix}`,
      });
    }
  }
  return role ? { oid: role.oid as number, superuser: Boolean(role.rolsuper) } : undefined;
}

// ---- setup ----------------------------------------------------------------------

interface SetupInfo {
  db: string;
  has_schema: boolean;
  mfn: number | null;
  pfn: number | null;
  addkey: number | null;
  meta: number | null;
  keys: number | null;
}

async function checkSetup(ctx: AuditContext, info: SetupInfo, tenantSetting: string, secret: string | undefined, superuser: boolean): Promise<void> {
  const { app, appQ, appOid, setupFix, add } = ctx;
  const missing: string[] = [];
  if (!info.has_schema) missing.push("schema multigres");
  if (!info.mfn) missing.push("multigres.current_tenant_id()");
  if (!info.pfn) missing.push("public.current_tenant_id()");
  if (missing.length > 0) {
    add({
      rule: "setup-missing",
      severity: "error",
      object: "database " + info.db,
      message: `multigres is not set up in this database (missing: ${missing.join(", ")}); policies cannot verify the tenant context`,
      fix: setupFix,
    });
  }
  if (info.has_schema) {
    const outdated: string[] = [];
    let version: number | undefined;
    if (info.meta) {
      const [v] = await ctx.tx`SELECT value FROM multigres.meta WHERE key = 'schema_version'`;
      if (v) version = Number(v.value);
    }
    if (version === undefined || Number.isNaN(version)) outdated.push("no schema_version (setup from before version 2)");
    else if (version < SCHEMA_VERSION) outdated.push(`schema_version ${version}, this multigres needs ${SCHEMA_VERSION}`);
    else if (version > SCHEMA_VERSION) {
      add({
        rule: "setup-newer",
        severity: "warning",
        object: "schema multigres",
        message: `schema_version ${version} is newer than this multigres (${SCHEMA_VERSION}); its checks may be out of date`,
        fix: "run a newer multigres doctor",
      });
    }
    if (!info.keys) outdated.push("no multigres.context_keys table");
    if (!info.addkey) outdated.push("no multigres.add_context_key(bytea)");
    if (info.mfn) {
      const [f] = await ctx.tx`SELECT prosecdef, proconfig, prosrc FROM pg_catalog.pg_proc WHERE oid = ${info.mfn}`;
      if (!f!.prosecdef) outdated.push("multigres.current_tenant_id() is not SECURITY DEFINER (it cannot verify signed contexts)");
      if (!(f!.proconfig as string[] | null)?.some((c) => c.startsWith("search_path="))) {
        outdated.push("multigres.current_tenant_id() has no fixed search_path");
      }
      const src = String(f!.prosrc);
      if (f!.prosecdef && (!src.includes(quoteLiteral(tenantSetting)) || !src.includes(quoteLiteral(signatureSetting(tenantSetting))))) {
        add({
          rule: "setup-setting-mismatch",
          severity: "error",
          object: "function multigres.current_tenant_id()",
          message: `multigres.current_tenant_id() does not read ${tenantSetting} and ${signatureSetting(tenantSetting)}, the settings a proxy with --tenant-setting ${tenantSetting} sets: through such a proxy no tenant sees its rows`,
          fix: `install the verifier for the proxy's setting: ${setupFix} --tenant-setting ${tenantSetting} (or, if the proxy uses another setting, give doctor that --tenant-setting)`,
        });
      }
    }
    if (info.pfn) {
      const [f] = await ctx.tx`SELECT prosrc FROM pg_catalog.pg_proc WHERE oid = ${info.pfn}`;
      if (!String(f!.prosrc).includes("multigres.current_tenant_id()")) {
        outdated.push("public.current_tenant_id() does not call multigres.current_tenant_id()");
      }
    }
    if (outdated.length > 0) {
      add({
        rule: "setup-outdated",
        severity: "error",
        object: "schema multigres",
        message: `the multigres setup is outdated: ${outdated.join("; ")}`,
        fix: setupFix,
      });
    }

    if (info.keys) {
      const keys = (await ctx.tx`SELECT key_id FROM multigres.context_keys ORDER BY created_at, key_id`).map((k) => k.key_id as string);
      if (keys.length === 0) {
        add({
          rule: "setup-no-context-key",
          severity: "error",
          object: "table multigres.context_keys",
          message: "no context key is stored: current_tenant_id() is NULL for every session, so no tenant sees any row",
          fix: `MULTIGRES_CONTEXT_SECRET=… ${setupFix}`,
        });
      } else if (keys.length > 1) {
        add({
          rule: "context-keys-multiple",
          severity: "info",
          object: "table multigres.context_keys",
          message: `${keys.length} context keys are valid (${keys.join(", ")}): a secret rotation is in progress, or an old key was never retired`,
          fix: `once every proxy uses the new secret: MULTIGRES_CONTEXT_SECRET=<new> ${setupFix} --retire-other-keys`,
        });
      }
      if (secret !== undefined) {
        const id = contextKeyId(deriveContextKey(secret));
        if (!keys.includes(id)) {
          add({
            rule: "context-key-not-stored",
            severity: "error",
            object: "table multigres.context_keys",
            message: `the key of the configured secret (${id}) is not stored: the proxy's contexts will not verify and tenants will see no rows`,
            fix: `MULTIGRES_CONTEXT_SECRET=… ${setupFix}`,
          });
        }
      }
    }

    // Anything that lets the app role read the keys, add its own, or
    // replace the verifier lets it sign any tenant.
    if (appOid !== null && !superuser) {
      const exposed: string[] = [];
      if (info.keys) {
        const [k] = await ctx.tx.unsafe(
          `SELECT has_table_privilege($1::oid, $2::oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
               OR has_any_column_privilege($1::oid, $2::oid, 'SELECT,INSERT,UPDATE,REFERENCES') AS yes`,
          [appOid, info.keys],
        );
        if (k!.yes) exposed.push("has privileges on multigres.context_keys");
      }
      if (info.addkey) {
        const [k] = await ctx.tx.unsafe(`SELECT has_function_privilege($1::oid, $2::oid, 'EXECUTE') AS yes`, [appOid, info.addkey]);
        if (k!.yes) exposed.push("can execute multigres.add_context_key(bytea)");
      }
      const owned = await ctx.tx.unsafe(
        `SELECT what, owner::regrole::text AS owner FROM (
           SELECT 'schema multigres' AS what, nspowner AS owner FROM pg_catalog.pg_namespace WHERE nspname = 'multigres'
           UNION ALL SELECT 'table ' || oid::regclass::text, relowner FROM pg_catalog.pg_class
             WHERE oid IN (to_regclass('multigres.context_keys'), to_regclass('multigres.meta'))
           UNION ALL SELECT 'function ' || oid::regprocedure::text, proowner FROM pg_catalog.pg_proc
             WHERE oid IN (to_regprocedure('multigres.current_tenant_id()'), to_regprocedure('public.current_tenant_id()'),
                           to_regprocedure('multigres.add_context_key(bytea)'))
         ) o WHERE pg_has_role($1::oid, o.owner, 'MEMBER') ORDER BY 1`,
        [appOid],
      );
      for (const o of owned) exposed.push(`${o.owner === app ? "owns" : `is a member of ${o.owner}, which owns`} ${o.what}`);
      if (exposed.length > 0) {
        add({
          rule: "setup-exposed",
          severity: "error",
          object: `role ${app}`,
          message: `${app} ${exposed.join("; ")}: it can read or plant context keys or replace the verifier, and so sign any tenant`,
          fix: `REVOKE ALL ON multigres.context_keys FROM ${appQ}; REVOKE ALL ON FUNCTION multigres.add_context_key(bytea) FROM ${appQ}; give the multigres objects an owner ${app} is not a member of; ${setupFix}`,
        });
      }
    }
  }
}

// ---- tenant tables and their policies -------------------------------------------

/**
 * What the prover needs of the catalog. A superuser app role could replace
 * any function, but nothing binds it anyway (app-role-superuser), so it
 * makes no function replaceable here.
 */
async function proverCatalog(ctx: AuditContext, info: SetupInfo, appIsSuperuser: boolean): Promise<Catalog> {
  const [c] = await ctx.tx`
    SELECT ARRAY(SELECT oid::int FROM pg_catalog.pg_operator
                 WHERE oprname = '=' AND oprnamespace = 'pg_catalog'::regnamespace) AS eq,
           ARRAY(SELECT oid::int FROM pg_catalog.pg_collation WHERE NOT collisdeterministic) AS nondeterministic,
           ARRAY(SELECT oid::int FROM pg_catalog.pg_proc
                 WHERE proname = 'current_setting' AND pronamespace = 'pg_catalog'::regnamespace) AS setting,
           ARRAY(SELECT oid::int FROM pg_catalog.pg_proc WHERE proleakproof) AS leakproof,
           ARRAY(SELECT oid::int FROM pg_catalog.pg_proc
                 WHERE NOT ${appIsSuperuser} AND pg_has_role(${ctx.appOid}::oid, proowner, 'MEMBER')) AS replaceable`;
  return {
    tenantFunctions: new Set([info.mfn, info.pfn].filter((x): x is number => typeof x === "number")),
    equalityOperators: new Set(c!.eq as number[]),
    nondeterministicCollations: new Set(c!.nondeterministic as number[]),
    settingFunctions: new Set(c!.setting as number[]),
    leakproofFunctions: new Set(c!.leakproof as number[]),
    replaceableFunctions: new Set(c!.replaceable as number[]),
  };
}

interface Catalog extends ProverCatalog {
  /** Oids of pg_catalog.current_setting(…). */
  settingFunctions: ReadonlySet<number>;
}

interface TenantTable {
  oid: number;
  name: string;
  rls: boolean;
  force: boolean;
  owner: string;
  app_owns_directly: boolean | null;
  app_owns: boolean | null;
  app_access: boolean | null;
  /** The configured tenant columns the table has. */
  columns: string[];
  /** Every column name by attnum - 1 (dropped ones included, so the index holds). */
  attnames: string[];
}

/** A tenant table with its tenant columns known: what the index rules need too. */
interface Judged extends TenantTable {
  /** The configured tenant columns it has and the columns its policies provably compare. */
  attnums: Set<number>;
  /** The tenant column a fix puts first. */
  lead: string;
}

interface Policy {
  relid: number;
  name: string;
  cmd: PolCmd;
  permissive: boolean;
  qual: string | null;
  withcheck: string | null;
  qual_sql: string | null;
  check_sql: string | null;
  applies: boolean;
}

/** A policy with its trees parsed (undefined: no such clause, or text the reader could not parse) and judged. */
interface ParsedPolicy extends Policy {
  q?: PgValue;
  w?: PgValue;
  /** undefined: no such clause. */
  using?: ClauseJudgement;
  check?: ClauseJudgement;
}

/** A clause doctor could not read proves nothing and may do anything. */
const UNREADABLE: ClauseJudgement = { leaks: [{ node: "UNREADABLE" }] };

function parsePolicy(p: Policy, cat: Catalog): ParsedPolicy {
  const q = tryParse(p.qual);
  const w = tryParse(p.withcheck);
  const judge = (text: string | null, tree: PgValue | undefined) => (text === null ? undefined : tree === undefined ? UNREADABLE : judgeClause(tree, cat));
  return { ...p, q, w, using: judge(p.qual, q), check: judge(p.withcheck, w) };
}

/**
 * rls-*, app-role-owns-table and policy-* for every tenant table. Returns
 * the tenant tables by oid, each with the attnums of its tenant columns
 * (the configured ones it has and the ones its policies provably compare)
 * and the column a fix should lead with.
 */
async function checkTenantTables(ctx: AuditContext, cat: Catalog): Promise<Map<number, Judged>> {
  // $1: tenant columns (TENANT_TABLES_SQL), $2: the app role.
  const tables = (await ctx.tx.unsafe(
    `WITH t AS (${TENANT_TABLES_SQL})
     SELECT t.oid, t.name, c.relrowsecurity AS rls, c.relforcerowsecurity AS force,
            c.relowner::regrole::text AS owner, c.relowner = $2::oid AS app_owns_directly,
            pg_has_role($2::oid, c.relowner, 'MEMBER') AS app_owns,
            has_table_privilege($2::oid, c.oid, 'SELECT,INSERT,UPDATE,DELETE')
              OR has_any_column_privilege($2::oid, c.oid, 'SELECT,INSERT,UPDATE') AS app_access,
            ARRAY(SELECT a.attname::text FROM unnest($1::name[]) WITH ORDINALITY AS u(col, i)
                  JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attname = u.col AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY u.i) AS columns,
            ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
                  ORDER BY a.attnum) AS attnames
     FROM t JOIN pg_catalog.pg_class c ON c.oid = t.oid
     ORDER BY t.name`,
    [ctx.tenantColumns, ctx.appOid],
  )) as unknown as TenantTable[];
  const policies = (await ctx.tx.unsafe(
    `SELECT p.polrelid::int AS relid, p.polname AS name, p.polcmd::text AS cmd, p.polpermissive AS permissive,
            p.polqual::text AS qual, p.polwithcheck::text AS withcheck,
            pg_get_expr(p.polqual, p.polrelid) AS qual_sql, pg_get_expr(p.polwithcheck, p.polrelid) AS check_sql,
            (0::oid = ANY (p.polroles) OR $1::oid IS NULL
             OR EXISTS (SELECT 1 FROM unnest(p.polroles) AS r(oid) WHERE pg_has_role($1::oid, r.oid, 'MEMBER'))) AS applies
     FROM pg_catalog.pg_policy p ORDER BY p.polname`,
    [ctx.appOid],
  )) as unknown as Policy[];
  const byTable = new Map<number, ParsedPolicy[]>();
  for (const p of policies) byTable.set(p.relid, [...(byTable.get(p.relid) ?? []), parsePolicy(p, cat)]);
  const names = await functionNames(ctx, [...byTable.values()].flat());

  const out = new Map<number, Judged>();
  for (const t of tables) {
    const pols = byTable.get(t.oid) ?? [];
    const proven = pols.flatMap((p) => [p.using?.column, p.check?.column]).filter((a): a is number => a !== undefined);
    const attnums = new Set([...t.columns.map((c) => t.attnames.indexOf(c) + 1), ...proven]);
    const lead = t.columns[0] ?? (proven[0] !== undefined ? t.attnames[proven[0] - 1] : undefined) ?? ctx.tenantColumns[0]!;
    const judged = { ...t, attnums, lead };
    checkTable(ctx, judged, pols, cat, names);
    out.set(t.oid, judged);
  }
  return out;
}

/** `SELECT multigres.enable_tenant_rls('t'[, 'col'])`, the fix that turns isolation on the recommended way. */
function enableFix(t: TenantTable): string {
  const column = t.columns[0];
  const arg = column === undefined ? ", '<tenant column>'" : column === "tenant_id" ? "" : `, ${quoteLiteral(column)}`;
  return `SELECT multigres.enable_tenant_rls(${quoteLiteral(t.name)}${arg});`;
}

function checkTable(ctx: AuditContext, t: Judged, pols: ParsedPolicy[], cat: Catalog, names: Map<number, string>): void {
  const { app, appQ, add } = ctx;
  const table = t.name;
  if (t.app_owns === true) {
    add({
      rule: "app-role-owns-table",
      severity: "error",
      object: `table ${table}`,
      message: t.app_owns_directly
        ? `${app} owns ${table}: an owner can turn row-level security off (ALTER TABLE … DISABLE/NO FORCE ROW LEVEL SECURITY) and is exempt from it unless FORCE is set`
        : `${app} is a member of ${t.owner}, which owns ${table}: it can act as the owner, who can turn row-level security off`,
      fix: t.app_owns_directly
        ? `ALTER TABLE ${table} OWNER TO <a role ${app} is not a member of>;`
        : `REVOKE ${quoteIdent(t.owner)} FROM ${appQ};  -- or give ${table} another owner`,
    });
  }

  if (!t.rls) {
    const has = t.columns.length > 0 ? `the tenant column ${t.columns.join(", ")}` : "a policy";
    add({
      rule: "rls-disabled",
      severity: t.app_access === false ? "warning" : "error",
      object: `table ${table}`,
      message:
        `${table} has ${has} but row-level security is off: ` +
        (t.app_access === false
          ? `${app} has no privileges on it today, but any GRANT would expose every tenant's rows`
          : `${app} sees and writes every tenant's rows`),
      fix: enableFix(t),
    });
    return;
  }
  if (!t.force) {
    add({
      rule: "rls-not-forced",
      severity: "warning",
      object: `table ${table}`,
      message: `row-level security on ${table} is not FORCEd: its owner (${t.owner}), and any role with the owner's privileges, sees every tenant's rows`,
      fix: `ALTER TABLE ${table} FORCE ROW LEVEL SECURITY;`,
    });
  }
  if (pols.length === 0) {
    add({
      rule: "rls-no-policy",
      severity: "warning",
      object: `table ${table}`,
      message: `row-level security is on for ${table} but it has no policy: nobody subject to RLS sees or writes any row`,
      fix: enableFix(t),
    });
    return;
  }
  checkPolicies(ctx, t, pols.filter((p) => p.applies), cat, names);
}

/** The names of the functions the policies' leaks name, for messages. */
async function functionNames(ctx: AuditContext, pols: ParsedPolicy[]): Promise<Map<number, string>> {
  const oids = pols.flatMap((p) => [...(p.using?.leaks ?? []), ...(p.check?.leaks ?? [])]).flatMap((l) => ("function" in l ? [l.function] : []));
  if (oids.length === 0) return new Map();
  const rows = await ctx.tx`SELECT oid::int AS oid, oid::regprocedure::text AS name FROM pg_catalog.pg_proc WHERE oid = ANY (${[...new Set(oids)]}::oid[])`;
  return new Map(rows.map((r) => [r.oid as number, r.name as string]));
}

/** Computing nodes a leak may name, in words. */
const NODE_WORDS: Record<string, string> = {
  UNREADABLE: "an expression doctor could not read",
  COERCEVIAIO: "an I/O cast",
  ARRAYCOERCEEXPR: "an array cast",
  COERCETODOMAIN: "a domain check",
  MINMAXEXPR: "GREATEST/LEAST",
  ROWCOMPAREEXPR: "a row comparison",
  AGGREF: "an aggregate",
};

const describeLeaks = (leaks: readonly Leak[], names: Map<number, string>): string => {
  const words = leaks.map((l) => ("function" in l ? (names.get(l.function) ?? `function ${l.function}`) : (NODE_WORDS[l.node] ?? l.node.toLowerCase())));
  return [...new Set(words)].join(", ");
};

/** The rules an unproven permissive clause breaks, the most specific diagnosis first. */
function permissiveRules(d: Diagnosis): string[] {
  const rules: string[] = [];
  if (d.readsSetting) rules.push("policy-current-setting");
  if (d.nullArm) rules.push("policy-null-arm");
  if (rules.length === 0) rules.push(d.callsTenant ? "policy-unproven" : "policy-no-tenant-check");
  return rules;
}

/** Where a clause falls short: "USING for SELECT, DELETE". */
interface Shortfall {
  clause: Clause;
  commands: Command[];
  /** The clause is the policy's USING standing in for its missing WITH CHECK. */
  usingAsCheck: boolean;
}

const describeShortfalls = (s: readonly Shortfall[]) =>
  s.map((x) => `${x.usingAsCheck ? "USING (as its WITH CHECK)" : x.clause} for ${x.commands.join(", ")}`).join(" and ");

function shortfalls(p: ParsedPolicy, of: Shortfalls): Shortfall[] {
  return [...of].map(([clause, commands]) => ({ clause, commands, usingAsCheck: clause === "WITH CHECK" && p.withcheck === null }));
}

/** The tree and judgement of a clause as it applies (USING standing in for a missing WITH CHECK). */
const clauseOf = (p: ParsedPolicy, s: Shortfall) => (s.clause === "USING" || s.usingAsCheck ? { tree: p.q, j: p.using } : { tree: p.w, j: p.check });

/**
 * policy-*: judge the policies that apply to the app role as PostgreSQL
 * combines them (policy-prover.ts), and report every permissive one that
 * nothing bounds, by its most specific diagnosis, and every one that leaks
 * (policy-unproven).
 */
function checkPolicies(ctx: AuditContext, t: Judged, pols: ParsedPolicy[], cat: Catalog, names: Map<number, string>): void {
  const judged: JudgedPolicy<ParsedPolicy>[] = pols.map((p) => ({
    policy: p,
    cmd: p.cmd,
    permissive: p.permissive,
    using: p.using,
    withCheck: p.check,
  }));
  for (const u of unprovenPolicies(judged)) {
    const p = u.policy;
    const byRule = new Map<string, Shortfall[]>();
    for (const s of shortfalls(p, u.unbounded)) {
      const { tree } = clauseOf(p, s);
      const rules = tree === undefined ? ["policy-unproven"] : permissiveRules(diagnose(tree, cat, cat.settingFunctions, true));
      for (const rule of rules) byRule.set(rule, [...(byRule.get(rule) ?? []), s]);
    }
    const leaky = shortfalls(p, u.leaky);
    if (leaky.length > 0 && !byRule.has("policy-unproven")) byRule.set("policy-unproven", []);
    for (const [rule, unbounded] of byRule) {
      const leak =
        rule === "policy-unproven" && leaky.length > 0
          ? { where: describeShortfalls(leaky), what: describeLeaks(leaky.flatMap((s) => clauseOf(p, s).j?.leaks ?? []), names) }
          : undefined;
      ctx.add(policyFinding(ctx, t, p, rule, "error", unbounded, leak));
    }
  }
  // A restrictive policy only narrows what permissive ones admit; still,
  // one that trusts a NULL or forgeable tenant is not the bound it looks like.
  for (const p of pols.filter((p) => !p.permissive)) {
    const trees = [p.q, p.w].filter((x): x is PgValue => x !== undefined);
    const ds = trees.map((tree) => diagnose(tree, cat, cat.settingFunctions, false));
    if (ds.some((d) => d.readsSetting)) ctx.add(policyFinding(ctx, t, p, "policy-current-setting", "warning", []));
    if (ds.some((d) => d.nullArm)) ctx.add(policyFinding(ctx, t, p, "policy-null-arm", "warning", []));
  }
}

function policyFinding(
  ctx: AuditContext,
  t: Judged,
  p: ParsedPolicy,
  rule: string,
  severity: Severity,
  unbounded: Shortfall[],
  leak?: { where: string; what: string },
): Finding {
  const object = `policy ${quoteIdent(p.name)} on ${t.name}`;
  const drop = `DROP POLICY ${quoteIdent(p.name)} ON ${t.name}; ${enableFix(t)}`;
  const shown = [p.qual_sql && `USING (${p.qual_sql})`, p.check_sql && `WITH CHECK (${p.check_sql})`].filter(Boolean).join(" ") || "no expression";
  const where = describeShortfalls(unbounded);
  const col = quoteIdent(t.lead);
  switch (rule) {
    case "policy-current-setting":
      return {
        rule,
        severity,
        object,
        message: `${object} reads current_setting() directly (${shown}): any session can SET that setting and become any tenant`,
        fix: `compare with (SELECT current_tenant_id()) instead, which only trusts contexts the proxy signed: ${drop}`,
      };
    case "policy-null-arm":
      return {
        rule,
        severity,
        object,
        message: `${object} admits rows when the tenant is NULL (${shown}): a session with no context, or a forged one, sees every tenant's rows`,
        fix: `remove the "IS NULL OR" arm; no context must mean no rows: ${drop}`,
      };
    case "policy-no-tenant-check":
      return {
        rule,
        severity,
        object,
        message: `${object} is permissive and its ${where} does not call current_tenant_id() (${shown}): permissive policies are OR-ed, so it lets tenants reach rows regardless of the tenant`,
        fix: `make it AS RESTRICTIVE, or compare the tenant column with (SELECT current_tenant_id()): ${drop}`,
      };
  }
  const why: string[] = [];
  const fixes: string[] = [];
  if (unbounded.length > 0) {
    why.push(`its ${where} may admit other tenants' rows: permissive policies are OR-ed, and a session can make current_tenant_id() NULL at will`);
    fixes.push(
      `rewrite it as ${col} = (SELECT current_tenant_id()) [AND …], or bound the table with a restrictive policy: ` +
        `CREATE POLICY tenant_bound ON ${t.name} AS RESTRICTIVE USING (${col} = (SELECT current_tenant_id())) WITH CHECK (${col} = (SELECT current_tenant_id()));`,
    );
  }
  if (leak) {
    why.push(
      `its ${leak.where} passes the rows it is evaluated on, other tenants' included, to ${leak.what}: PostgreSQL orders a policy's conditions by cost, ` +
        `not as written, and code that is not LEAKPROOF (or that ${ctx.app} can replace) can reveal those rows in an error or a notice`,
    );
    fixes.push(`keep row values away from such code in the policy (filter in the query instead), and give functions ${ctx.app} owns another owner`);
  }
  return {
    rule,
    severity,
    object,
    message:
      `doctor cannot prove that ${object} keeps each session to its tenant's rows (${shown}): ${why.join("; and ")}. ` +
      `Proven shapes: <column> = current_tenant_id(), <column> = (SELECT current_tenant_id()), and an AND of one of those with leak-free conditions`,
    fix: fixes.join("; "),
  };
}

// ---- views over RLS tables ------------------------------------------------------

async function checkViews(ctx: AuditContext): Promise<void> {
  const { app, appQ, appOid, add } = ctx;
  const views = await ctx.tx.unsafe(
    `WITH RECURSIVE deps(view_oid, rel_oid, depth) AS (
       SELECT r.ev_class, d.refobjid, 1
       FROM pg_catalog.pg_rewrite r
       JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
                                  AND d.refclassid = 'pg_catalog.pg_class'::regclass
       WHERE d.refobjid <> r.ev_class
       UNION
       SELECT deps.view_oid, d.refobjid, deps.depth + 1
       FROM deps
       JOIN pg_catalog.pg_rewrite r ON r.ev_class = deps.rel_oid
       JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
                                  AND d.refclassid = 'pg_catalog.pg_class'::regclass
       WHERE d.refobjid <> r.ev_class AND deps.depth < 32
     )
     SELECT v.oid::regclass::text AS view, v.relkind::text AS kind, coalesce(v.reloptions, '{}') AS options,
            v.relowner::regrole::text AS owner, o.rolsuper, o.rolbypassrls,
            array_agg(DISTINCT t.oid::regclass::text) AS tables,
            bool_or(pg_has_role(v.relowner, t.relowner, 'USAGE') AND NOT t.relforcerowsecurity) AS owner_exempt,
            has_table_privilege($1::oid, v.oid, 'SELECT,INSERT,UPDATE,DELETE') AS app_access
     FROM (SELECT DISTINCT view_oid, rel_oid FROM deps) d
     JOIN pg_catalog.pg_class v ON v.oid = d.view_oid
     JOIN pg_catalog.pg_namespace n ON n.oid = v.relnamespace
     JOIN pg_catalog.pg_roles o ON o.oid = v.relowner
     JOIN pg_catalog.pg_class t ON t.oid = d.rel_oid
     WHERE v.relkind IN ('v', 'm') AND t.relkind IN ('r', 'p') AND t.relrowsecurity AND ${APP_SCHEMA_SQL}
     GROUP BY v.oid, v.relkind, v.reloptions, v.relowner, o.rolsuper, o.rolbypassrls
     ORDER BY 1`,
    [appOid],
  );
  for (const v of views) {
    const view = v.view as string;
    const over = (v.tables as string[]).sort().join(", ");
    const bypass = v.rolsuper || v.rolbypassrls || v.owner_exempt;
    if (v.kind === "v") {
      const invoker = (v.options as string[]).some((o) => {
        const [k, val] = o.split("=");
        return k === "security_invoker" && TRUE_OPTION.test(val ?? "");
      });
      if (invoker) continue;
      add({
        rule: "view-not-security-invoker",
        severity: bypass && v.app_access !== false ? "error" : "warning",
        object: `view ${view}`,
        message:
          `view ${view} over ${over} checks row-level security as its owner ${v.owner}, not as the caller` +
          (bypass
            ? ` — and ${v.owner} ${v.rolsuper ? "is a superuser" : v.rolbypassrls ? "has BYPASSRLS" : "owns a table that does not FORCE row-level security"}, so ${v.app_access !== false ? `${app} reads every tenant's rows through it` : "anyone granted it reads every tenant's rows"}`
            : ""),
        fix: `ALTER VIEW ${view} SET (security_invoker = true);`,
      });
    } else {
      add({
        rule: "matview-over-rls-table",
        severity: v.app_access !== false ? "error" : "warning",
        object: `materialized view ${view}`,
        message: `materialized view ${view} stores rows of ${over} computed as ${v.owner} and has no row-level security of its own${v.app_access !== false ? `; ${app} can read it` : ""}`,
        fix: `REVOKE ALL ON ${view} FROM PUBLIC, ${appQ}; or replace it with a view WITH (security_invoker = true)`,
      });
    }
  }
}

// ---- SECURITY DEFINER functions -------------------------------------------------

async function checkSecurityDefinerSearchPath(ctx: AuditContext): Promise<void> {
  const { app, appQ, appOid, add } = ctx;
  const fns = await ctx.tx.unsafe(
    `SELECT p.oid::regprocedure::text AS fn, p.proowner::regrole::text AS owner, p.proconfig AS config
     FROM pg_catalog.pg_proc p
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
     JOIN pg_catalog.pg_language l ON l.oid = p.prolang
     WHERE p.prosecdef
       AND n.nspname NOT IN ('pg_catalog', 'information_schema')
       AND l.lanname NOT IN ('c', 'internal')
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                       WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
       AND coalesce(has_function_privilege($1::oid, p.oid, 'EXECUTE'), true)
       AND NOT coalesce(pg_has_role($1::oid, p.proowner, 'MEMBER'), false)
     ORDER BY 1`,
    [appOid],
  );
  if (fns.length > 0) {
    const schemas = new Map<string, boolean | null>();
    for (const s of await ctx.tx.unsafe(
      `SELECT nspname, has_schema_privilege($1::oid, oid, 'CREATE') AS can_create FROM pg_catalog.pg_namespace`,
      [appOid],
    )) {
      schemas.set(s.nspname, s.can_create);
    }
    for (const f of fns) {
      const fn = f.fn as string;
      const object = `function ${fn}`;
      const sp = ((f.config as string[] | null) ?? []).find((c) => c.startsWith("search_path="));
      const fixSp = `ALTER FUNCTION ${fn} SET search_path = pg_catalog, pg_temp;  -- and schema-qualify what it uses; or REVOKE EXECUTE ON FUNCTION ${fn} FROM PUBLIC, ${appQ}`;
      if (!sp) {
        add({
          rule: "security-definer-search-path",
          severity: "error",
          object,
          message: `${fn} runs as ${f.owner} (SECURITY DEFINER), ${app} can execute it, and it has no fixed search_path: objects ${app} creates on its search_path run with ${f.owner}'s privileges`,
          fix: fixSp,
        });
        continue;
      }
      const path = parseSearchPath(sp.slice("search_path=".length)).map((s) => (s === "$user" ? f.owner : s));
      const writable = path.filter((s) => s !== "pg_temp" && schemas.get(s) !== false && schemas.has(s));
      if (writable.length > 0) {
        add({
          rule: "security-definer-search-path",
          severity: "error",
          object,
          message: `${fn} runs as ${f.owner} (SECURITY DEFINER) with search_path ${path.join(", ")}, and ${app} can create objects in ${writable.join(", ")}: it can plant a function or table that runs or is read with ${f.owner}'s privileges`,
          fix: fixSp,
        });
      } else if (path.at(-1) !== "pg_temp") {
        add({
          rule: "security-definer-search-path",
          severity: "warning",
          object,
          message: `${fn} runs as ${f.owner} (SECURITY DEFINER) with search_path ${path.join(", ") || "''"} not ending in pg_temp: the session's temporary schema is searched first for tables and views`,
          fix: fixSp,
        });
      }
    }
  }
}

/**
 * security-definer-bypass: a SECURITY DEFINER function runs with its
 * owner's row-level security, whatever search_path it has; if the owner is
 * exempt from RLS on a tenant table, the function reads and writes every
 * tenant's rows for whoever calls it. "Can call" counts EXECUTE held
 * directly, through PUBLIC, or through any role the app role is a member
 * of (it can SET ROLE to one whatever INHERIT says). Setup's own functions (the multigres
 * schema, public.current_tenant_id()) are SECURITY DEFINER by design, and
 * extensions' members are the extension's business.
 */
async function checkSecurityDefinerBypass(ctx: AuditContext): Promise<void> {
  // $1: tenant columns (TENANT_TABLES_SQL), $2: the app role.
  const rows = await ctx.tx.unsafe(
    `WITH t AS (${TENANT_TABLES_SQL})
     SELECT p.oid::regprocedure::text AS fn, o.rolname AS owner, o.rolsuper, o.rolbypassrls,
            ARRAY(SELECT t.name FROM t JOIN pg_catalog.pg_class c ON c.oid = t.oid
                  WHERE NOT c.relforcerowsecurity AND pg_has_role(p.proowner, c.relowner, 'MEMBER') ORDER BY 1) AS exempt
     FROM pg_catalog.pg_proc p
     JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
     JOIN pg_catalog.pg_roles o ON o.oid = p.proowner
     WHERE p.prosecdef
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'multigres')
       AND p.oid IS DISTINCT FROM to_regprocedure('public.current_tenant_id()')::oid
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                       WHERE d.classid = 'pg_catalog.pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
       AND ($2::oid IS NULL OR cardinality(${granteesSql("p.proacl", "f", "p.proowner", ["EXECUTE"], "$2")}) > 0)
       AND NOT coalesce(pg_has_role($2::oid, p.proowner, 'MEMBER'), false)
     ORDER BY 1`,
    [ctx.tenantColumns, ctx.appOid],
  );
  for (const f of rows) {
    const exempt = f.exempt as string[];
    if (!f.rolsuper && !f.rolbypassrls && exempt.length === 0) continue;
    const why = f.rolsuper
      ? "is a superuser"
      : f.rolbypassrls
        ? "has BYPASSRLS"
        : `owns (or is a member of the owner of) ${nameFew(exempt)}, which ${exempt.length === 1 ? "does" : "do"} not FORCE row-level security`;
    ctx.add({
      rule: "security-definer-bypass",
      severity: "error",
      object: `function ${f.fn}`,
      message:
        `${f.fn} runs as ${f.owner} (SECURITY DEFINER), which ${why}, and ${ctx.app} can execute it: ` +
        `whatever it reads or writes of tenant tables, it reads or writes for every tenant, and doctor cannot prove it filters by current_tenant_id()`,
      fix:
        `REVOKE EXECUTE ON FUNCTION ${f.fn} FROM PUBLIC, ${ctx.appQ}; or ALTER FUNCTION ${f.fn} SECURITY INVOKER; ` +
        `or give it an owner subject to FORCEd row-level security (ALTER FUNCTION ${f.fn} OWNER TO <role>)`,
    });
  }
}

// ---------------------------------------------------------------------------

export function formatReport(r: DoctorReport): string {
  const lines: string[] = [];
  for (const f of r.findings) {
    lines.push(`${f.severity.toUpperCase().padEnd(7)} ${f.rule}  ${f.object}`);
    lines.push(`        ${f.message}`);
    lines.push(`        fix: ${f.fix}`);
    lines.push("");
  }
  const count = (s: Severity) => r.findings.filter((f) => f.severity === s).length;
  const [e, w, i] = [count("error"), count("warning"), count("info")];
  const scope = `database ${r.database}, app role ${r.appRole}, ${plural(r.tenantTables, "tenant table")}`;
  if (e + w + i === 0) lines.push(`no problems found (${scope})`);
  else lines.push(`${plural(e, "error")}, ${plural(w, "warning")}, ${i} info (${scope})`);
  return lines.join("\n") + "\n";
}

export const doctorCommand = defineCommand({
  meta: {
    name: "doctor",
    description: "Audit a database for every way tenant isolation can fail open; exit status 1 on errors",
  },
  args: {
    "database-url": { type: "string", description: "Admin (superuser) connection string [env: MULTIGRES_DATABASE_URL]", valueHint: "URL" },
    "app-role": { type: "string", description: "The role tenant connections use", valueHint: "NAME" },
    json: { type: "boolean", description: "Print the findings as a JSON array" },
    // Read from rawArgs (repeatedFlag): declared here for --help only.
    "tenant-column": {
      type: "string",
      description: "Column that holds the tenant id; repeatable, or a comma-separated list [default: tenant_id] [env: MULTIGRES_TENANT_COLUMNS]",
      valueHint: "NAME",
    },
    "no-harden": {
      type: "string",
      description: `Keep a hardening item by choice: its findings become info; repeatable (${HARDENING_IDS.join(", ")})`,
      valueHint: "ITEM",
    },
    "tenant-setting": {
      type: "string",
      description: `Setting the proxy carries the tenant in [default: ${DEFAULT_TENANT_SETTING}]`,
      valueHint: "NAME",
    },
    config: { type: "string", description: "TOML config file (context_secret, context_secret_file, tenant_setting, tenant_columns)", valueHint: "FILE" },
    "context-secret-file": {
      type: "string",
      description: "File holding the context secret (else MULTIGRES_CONTEXT_SECRET) [env: MULTIGRES_CONTEXT_SECRET_FILE]",
      valueHint: "FILE",
    },
  },
  async run({ args, rawArgs }) {
    let report: DoctorReport;
    try {
      const c = await resolveCommon({
        databaseUrl: args["database-url"] as string | undefined,
        appRole: args["app-role"] as string | undefined,
        tenantSetting: args["tenant-setting"] as string | undefined,
        config: args.config as string | undefined,
        contextSecretFile: args["context-secret-file"] as string | undefined,
        tenantColumns: repeatedFlag(rawArgs, "tenant-column"),
      });
      report = await runDoctor({ ...c, noHarden: noHardenItems(rawArgs) });
    } catch (e) {
      if (e instanceof UsageError || e instanceof ConfigError) {
        process.stderr.write(`multigres doctor: ${e.message}\n`);
        process.exit(2);
      }
      process.stderr.write(`multigres doctor failed: ${describeError(e)}\n`);
      process.exit(2);
    }
    process.stdout.write(args.json ? JSON.stringify(report.findings, null, 2) + "\n" : formatReport(report));
    process.exit(report.findings.some((f) => f.severity === "error") ? 1 : 0);
  },
});
