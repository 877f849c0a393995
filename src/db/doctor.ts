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
 *   policy-no-tenant-check         a permissive policy that does not call current_tenant_id()
 *   policy-null-arm                an `current_tenant_id() IS NULL OR …` arm: no context = all rows
 *   policy-current-setting         a policy reading current_setting() directly: forgeable with SET
 *   view-not-security-invoker      a view over RLS tables checked as its owner, not the caller
 *   matview-over-rls-table         a materialized view holding rows of RLS tables, with no RLS
 *   security-definer-search-path   a SECURITY DEFINER function the app role can run whose
 *                                  search_path is not fixed (or includes a schema it can write)
 *
 * A "tenant table" is an ordinary or partitioned table (partitions
 * included) with the tenant column, or with a policy calling
 * current_tenant_id().
 */
import { defineCommand } from "citty";
import { ConfigError } from "../config.ts";
import { contextKeyId, deriveContextKey, signatureSetting } from "../tenant/context.ts";
import {
  connectAdmin,
  DEFAULT_TENANT_SETTING,
  describeError,
  privilegedMemberships,
  quoteIdent,
  quoteLiteral,
  resolveCommon,
  SCHEMA_VERSION,
  UsageError,
} from "./connect.ts";
import { calledFunctions, hasNullArm, parseNodeTree, type PgValue } from "./node-tree.ts";

export type Severity = "error" | "warning" | "info";

export interface Finding {
  rule: string;
  severity: Severity;
  /** The object concerned: a table, policy ("policy p on t"), role, function, or "database". */
  object: string;
  message: string;
  fix: string;
}

export interface DoctorOptions {
  databaseUrl: string;
  appRole: string;
  tenantColumn?: string;
  tenantSetting?: string;
  /** When known, doctor checks that its key is stored. */
  secret?: string;
}

export interface DoctorReport {
  database: string;
  appRole: string;
  findings: Finding[];
  /** Tenant tables examined, for the summary. */
  tenantTables: number;
}

const SYSTEM_SCHEMAS_SQL = `n.nspname NOT IN ('pg_catalog', 'information_schema', 'multigres')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'`;

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
  const tenantColumn = opts.tenantColumn ?? "tenant_id";
  const tenantSetting = opts.tenantSetting ?? DEFAULT_TENANT_SETTING;
  const app = opts.appRole;
  const setupFix = `multigres setup --database-url "$ADMIN_URL" --app-role ${app}`;
  const findings: Finding[] = [];
  const add = (f: Finding) => findings.push(f);

  const sql = connectAdmin(opts.databaseUrl, "multigres doctor");
  let database = "";
  let tenantTableCount = 0;
  try {
    await sql.begin("ISOLATION LEVEL REPEATABLE READ READ ONLY", async (tx) => {
      // Only the catalog resolves unqualified names, and names print schema-qualified.
      await tx`SET LOCAL search_path = pg_catalog, pg_temp`;
      const [info] = await tx`
        SELECT current_database() AS db,
               to_regnamespace('multigres') IS NOT NULL AS has_schema,
               to_regprocedure('multigres.current_tenant_id()')::oid::int AS mfn,
               to_regprocedure('public.current_tenant_id()')::oid::int AS pfn,
               to_regprocedure('multigres.add_context_key(bytea)')::oid::int AS addkey,
               to_regclass('multigres.meta')::oid::int AS meta,
               to_regclass('multigres.context_keys')::oid::int AS keys`;
      database = info!.db;

      // ---- the app role ---------------------------------------------------
      const [role] = await tx`
        SELECT oid::int AS oid, rolname, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolcanlogin
        FROM pg_catalog.pg_roles WHERE rolname = ${app}`;
      const appOid: number | null = role ? (role.oid as number) : null;
      const appQ = quoteIdent(app);
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

        for (const p of await privilegedMemberships(tx, role.oid)) {
          add({
            rule: "app-role-privileged-membership",
            severity: "error",
            object: `role ${app}`,
            message: `${app} is a member of ${p.role} (${p.reasons.join(", ")})${p.via !== p.role ? ` through ${p.path}` : ""}: it can act with that role's privileges and escape row-level security`,
            fix: `REVOKE ${quoteIdent(p.via)} FROM ${appQ};  -- or: ${setupFix}`,
          });
        }
      }
      const appIsSuper = Boolean(role?.rolsuper);

      // ---- setup ------------------------------------------------------------
      const missing: string[] = [];
      if (!info!.has_schema) missing.push("schema multigres");
      if (!info!.mfn) missing.push("multigres.current_tenant_id()");
      if (!info!.pfn) missing.push("public.current_tenant_id()");
      if (missing.length > 0) {
        add({
          rule: "setup-missing",
          severity: "error",
          object: "database " + database,
          message: `multigres is not set up in this database (missing: ${missing.join(", ")}); policies cannot verify the tenant context`,
          fix: setupFix,
        });
      }
      const tenantFns = new Set<number>([info!.mfn, info!.pfn].filter((x): x is number => typeof x === "number"));
      const settingFns = new Set<number>(
        (await tx`SELECT oid::int AS oid FROM pg_catalog.pg_proc WHERE proname = 'current_setting' AND pronamespace = 'pg_catalog'::regnamespace`).map(
          (r) => r.oid as number,
        ),
      );

      if (info!.has_schema) {
        const outdated: string[] = [];
        let version: number | undefined;
        if (info!.meta) {
          const [v] = await tx`SELECT value FROM multigres.meta WHERE key = 'schema_version'`;
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
        if (!info!.keys) outdated.push("no multigres.context_keys table");
        if (!info!.addkey) outdated.push("no multigres.add_context_key(bytea)");
        if (info!.mfn) {
          const [f] = await tx`SELECT prosecdef, proconfig, prosrc FROM pg_catalog.pg_proc WHERE oid = ${info!.mfn}`;
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
        if (info!.pfn) {
          const [f] = await tx`SELECT prosrc FROM pg_catalog.pg_proc WHERE oid = ${info!.pfn}`;
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

        if (info!.keys) {
          const keys = (await tx`SELECT key_id FROM multigres.context_keys ORDER BY created_at, key_id`).map((k) => k.key_id as string);
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
          if (opts.secret !== undefined) {
            const id = contextKeyId(deriveContextKey(opts.secret));
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
        if (appOid !== null && !appIsSuper) {
          const exposed: string[] = [];
          if (info!.keys) {
            const [k] = await tx.unsafe(
              `SELECT has_table_privilege($1::oid, $2::oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
                   OR has_any_column_privilege($1::oid, $2::oid, 'SELECT,INSERT,UPDATE,REFERENCES') AS yes`,
              [appOid, info!.keys],
            );
            if (k!.yes) exposed.push("has privileges on multigres.context_keys");
          }
          if (info!.addkey) {
            const [k] = await tx.unsafe(`SELECT has_function_privilege($1::oid, $2::oid, 'EXECUTE') AS yes`, [appOid, info!.addkey]);
            if (k!.yes) exposed.push("can execute multigres.add_context_key(bytea)");
          }
          const owned = await tx.unsafe(
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

      // ---- tenant tables ------------------------------------------------------
      const tables = await tx.unsafe(
        `SELECT c.oid::int AS oid, c.oid::regclass::text AS name, c.relrowsecurity AS rls, c.relforcerowsecurity AS force,
                c.relowner::regrole::text AS owner, c.relowner = $1::oid AS app_owns_directly,
                pg_has_role($1::oid, c.relowner, 'MEMBER') AS app_owns,
                has_table_privilege($1::oid, c.oid, 'SELECT,INSERT,UPDATE,DELETE')
                  OR has_any_column_privilege($1::oid, c.oid, 'SELECT,INSERT,UPDATE') AS app_access,
                EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                        WHERE a.attrelid = c.oid AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped) AS has_column
         FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p') AND ${SYSTEM_SCHEMAS_SQL}
         ORDER BY 2`,
        [appOid, tenantColumn],
      );
      const policies = await tx.unsafe(
        `SELECT p.polrelid::int AS relid, p.polname AS name, p.polcmd::text AS cmd, p.polpermissive AS permissive,
                p.polqual::text AS qual, p.polwithcheck::text AS withcheck,
                pg_get_expr(p.polqual, p.polrelid) AS qual_sql, pg_get_expr(p.polwithcheck, p.polrelid) AS check_sql,
                (0::oid = ANY (p.polroles) OR $1::oid IS NULL
                 OR EXISTS (SELECT 1 FROM unnest(p.polroles) AS r(oid) WHERE pg_has_role($1::oid, r.oid, 'MEMBER'))) AS applies
         FROM pg_catalog.pg_policy p ORDER BY p.polname`,
        [appOid],
      );
      type Pol = {
        relid: number;
        name: string;
        cmd: string;
        permissive: boolean;
        qual: string | null;
        withcheck: string | null;
        qual_sql: string | null;
        check_sql: string | null;
        applies: boolean;
        q?: PgValue;
        w?: PgValue;
        fns: Set<number>;
      };
      const byTable = new Map<number, Pol[]>();
      for (const row of policies) {
        const p = row as unknown as Pol;
        p.q = tryParse(p.qual);
        p.w = tryParse(p.withcheck);
        p.fns = new Set([...(p.q ? calledFunctions(p.q) : []), ...(p.w ? calledFunctions(p.w) : [])]);
        byTable.set(p.relid, [...(byTable.get(p.relid) ?? []), p]);
      }
      const callsAny = (fns: Set<number>, of: Set<number>) => [...fns].some((f) => of.has(f));
      const enableFix = (table: string, hasColumn: boolean) =>
        `SELECT multigres.enable_tenant_rls(${quoteLiteral(table)}${hasColumn ? (tenantColumn === "tenant_id" ? "" : `, ${quoteLiteral(tenantColumn)}`) : ", '<tenant column>'"});`;

      for (const t of tables) {
        const pols = byTable.get(t.oid) ?? [];
        if (!t.has_column && !pols.some((p) => callsAny(p.fns, tenantFns))) continue;
        tenantTableCount++;
        const table = t.name as string;
        const column = t.has_column ? `tenant column ${tenantColumn}` : "tenant policy";

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
          add({
            rule: "rls-disabled",
            severity: t.app_access === false ? "warning" : "error",
            object: `table ${table}`,
            message:
              `${table} has the ${column} but row-level security is off: ` +
              (t.app_access === false
                ? `${app} has no privileges on it today, but any GRANT would expose every tenant's rows`
                : `${app} sees and writes every tenant's rows`),
            fix: enableFix(table, t.has_column),
          });
          continue;
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
            fix: enableFix(table, t.has_column),
          });
          continue;
        }

        for (const p of pols) {
          if (!p.applies) continue;
          const object = `policy ${quoteIdent(p.name)} on ${table}`;
          const drop = `DROP POLICY ${quoteIdent(p.name)} ON ${table}; ${enableFix(table, t.has_column)}`;
          const shown = [p.qual_sql && `USING (${p.qual_sql})`, p.check_sql && `WITH CHECK (${p.check_sql})`].filter(Boolean).join(" ");

          const readsSetting = callsAny(p.fns, settingFns);
          if (readsSetting) {
            add({
              rule: "policy-current-setting",
              severity: "error",
              object,
              message: `${object} reads current_setting() directly (${shown}): any session can SET that setting and become any tenant`,
              fix: `compare with (SELECT current_tenant_id()) instead, which only trusts contexts the proxy signed: ${drop}`,
            });
          }
          const nullFns = new Set([...tenantFns, ...settingFns]);
          const nullArm =
            (p.q !== undefined && hasNullArm(p.q, nullFns, p.permissive)) || (p.w !== undefined && hasNullArm(p.w, nullFns, p.permissive));
          if (nullArm) {
            add({
              rule: "policy-null-arm",
              severity: p.permissive ? "error" : "warning",
              object,
              message: `${object} admits rows when the tenant is NULL (${shown}): a session with no context, or a forged one, sees every tenant's rows`,
              fix: `remove the "IS NULL OR" arm; no context must mean no rows: ${drop}`,
            });
          }
          if (p.permissive && !readsSetting) {
            // Permissive policies are OR-ed: each one must check the tenant
            // in the clauses that apply to its command.
            const needUsing = p.cmd !== "a";
            const needCheck = p.cmd === "a" || p.cmd === "w" || p.cmd === "*";
            const usingOk = p.q !== undefined && callsAny(calledFunctions(p.q), tenantFns);
            const checkTree = p.w ?? (p.cmd === "a" ? undefined : p.q);
            const checkOk = checkTree !== undefined && callsAny(calledFunctions(checkTree), tenantFns);
            const bad: string[] = [];
            if (needUsing && !usingOk) bad.push("USING");
            if (needCheck && !checkOk) bad.push("WITH CHECK");
            if (bad.length > 0) {
              add({
                rule: "policy-no-tenant-check",
                severity: "error",
                object,
                message: `${object} is permissive and its ${bad.join(" and ")} ${bad.length > 1 ? "do" : "does"} not call current_tenant_id() (${shown || "no expression"}): permissive policies are OR-ed, so it lets tenants ${bad.length > 1 ? "read and write" : bad[0] === "USING" ? "read" : "write"} rows regardless of the tenant`,
                fix: `make it AS RESTRICTIVE, or compare the tenant column with (SELECT current_tenant_id()): ${drop}`,
              });
            }
          }
        }
      }

      // ---- views over RLS tables ---------------------------------------------
      const views = await tx.unsafe(
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
         WHERE v.relkind IN ('v', 'm') AND t.relkind IN ('r', 'p') AND t.relrowsecurity AND ${SYSTEM_SCHEMAS_SQL}
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

      // ---- SECURITY DEFINER functions ----------------------------------------
      const fns = await tx.unsafe(
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
        for (const s of await tx.unsafe(
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
    });
  } finally {
    await sql.end({ timeout: 5 }).catch(() => {});
  }

  findings.sort(
    (a, b) => SEVERITY_ORDER[a.severity] - SEVERITY_ORDER[b.severity] || a.rule.localeCompare(b.rule) || a.object.localeCompare(b.object),
  );
  return { database, appRole: app, findings, tenantTables: tenantTableCount };
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
  const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? "" : "s"}`;
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
    "tenant-column": { type: "string", description: "Column that holds the tenant id [default: tenant_id]", valueHint: "NAME" },
    "tenant-setting": {
      type: "string",
      description: `Setting the proxy carries the tenant in [default: ${DEFAULT_TENANT_SETTING}]`,
      valueHint: "NAME",
    },
    config: { type: "string", description: "TOML config file (context_secret, context_secret_file, tenant_setting)", valueHint: "FILE" },
    "context-secret-file": {
      type: "string",
      description: "File holding the context secret (else MULTIGRES_CONTEXT_SECRET) [env: MULTIGRES_CONTEXT_SECRET_FILE]",
      valueHint: "FILE",
    },
  },
  async run({ args }) {
    let report: DoctorReport;
    try {
      const c = await resolveCommon({
        databaseUrl: args["database-url"] as string | undefined,
        appRole: args["app-role"] as string | undefined,
        tenantSetting: args["tenant-setting"] as string | undefined,
        config: args.config as string | undefined,
        contextSecretFile: args["context-secret-file"] as string | undefined,
      });
      const tenantColumn = (args["tenant-column"] as string | undefined) ?? "tenant_id";
      if (tenantColumn === "" || Buffer.byteLength(tenantColumn) > 63) throw new UsageError("--tenant-column: must be a column name");
      report = await runDoctor({ ...c, tenantColumn });
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
