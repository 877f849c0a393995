/**
 * Doctor's checks of what one role shared by every tenant must not have
 * (the items of hardening.ts, one rule each, `hardening-<id>`), and of
 * large objects the app role owns. Each finding names the objects the app
 * role can reach and the grantees it reaches them through (PUBLIC, itself,
 * or a role it is a member of), so that the fix revokes from the right
 * ones.
 */
import { quoteIdent, quoteLiteral } from "./connect.ts";
import { nameFew, plural, type AuditContext, type Finding } from "./doctor-findings.ts";
import {
  APP_SCHEMA_SQL,
  FUNCTIONS_SQL,
  HARDENING,
  PINNED_ROLE_SETTINGS,
  REGRANTED_TO,
  TENANT_TABLES_SQL,
  VIEWS_SQL,
  type HardeningId,
} from "./hardening.ts";

/** An object the app role can use, and how. */
export interface Reach {
  name: string;
  /** Grantees it holds the privilege through: PUBLIC, itself, or roles it is a member of. */
  grantees: string[];
  /** The app role owns it, or is a member of its owner. */
  owned: boolean;
}

/**
 * SQL: the grantees of an object's ACL (or the default ACL of its kind)
 * holding one of `privileges` that role `role` is, or is a member of (a
 * member can SET ROLE to a role whatever INHERIT says), or PUBLIC. The
 * owner's own entry is left out: what an owner can do is a matter of
 * ownership, reported as such.
 */
export function granteesSql(acl: string, kind: "f" | "r" | "n", owner: string, privileges: readonly string[], role: string): string {
  return `ARRAY(SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname::text END
                FROM pg_catalog.aclexplode(coalesce(${acl}, pg_catalog.acldefault('${kind}', ${owner}))) AS a
                LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
                WHERE a.privilege_type IN (${privileges.map((p) => `'${p}'`).join(", ")}) AND a.grantee <> ${owner}
                  AND (a.grantee = 0 OR pg_catalog.pg_has_role(${role}::oid, a.grantee, 'MEMBER'))
                ORDER BY 1)`;
}

/** SQL columns `grantees` and `owned` (by the role or a role it is a member of) of an object, for role $1. */
const reachColumns = (acl: string, kind: "f" | "r" | "n", owner: string, privileges: readonly string[]) =>
  `${granteesSql(acl, kind, owner, privileges, "$1")} AS grantees, pg_catalog.pg_has_role($1::oid, ${owner}, 'MEMBER') AS owned`;

/** Rows with reachColumns that the role can actually use. */
const reachable = (rows: readonly Record<string, unknown>[]): Reach[] =>
  rows
    .map((r) => ({ name: r.name as string, grantees: r.grantees as string[], owned: Boolean(r.owned) }))
    .filter((r) => r.grantees.length > 0 || r.owned);

/** PUBLIC, "app", … for a REVOKE. */
const granteeList = (grantees: Iterable<string>) => [...new Set(grantees)].map((g) => (g === "PUBLIC" ? g : quoteIdent(g))).join(", ");

/** `REVOKE <privileges> ON <kind> a, b FROM PUBLIC, "app"` for the objects held through grants. */
function revokeStatement(privileges: string, kind: string, reach: readonly Reach[]): string | undefined {
  const granted = reach.filter((r) => r.grantees.length > 0);
  if (granted.length === 0) return undefined;
  return `REVOKE ${privileges} ON ${kind} ${granted.map((r) => r.name).join(", ")} FROM ${granteeList(granted.flatMap((r) => r.grantees))}`;
}

/** `ALTER <kind> x OWNER TO …` for the objects the role has through ownership. */
const ownerStatements = (kind: string, reach: readonly Reach[], app: string) =>
  reach.filter((r) => r.owned).map((r) => `ALTER ${kind} ${r.name} OWNER TO <a role ${app} is not a member of>`);

const item = (id: HardeningId) => HARDENING.find((h) => h.id === id)!;

/** The finding of one catalog item: functions it may execute, relations it may read. */
function catalogFinding(ctx: AuditContext, id: HardeningId, functions: Reach[], relations: Reach[]): Finding | undefined {
  if (functions.length === 0 && relations.length === 0) return undefined;
  const can: string[] = [];
  if (functions.length > 0) can.push(`execute ${nameFew(functions.map((f) => f.name))} (${plural(functions.length, "function")})`);
  if (relations.length > 0) can.push(`read ${nameFew(relations.map((r) => r.name))} (${plural(relations.length, "relation")})`);
  const to = REGRANTED_TO[id];
  const statements = [revokeStatement("EXECUTE", "FUNCTION", functions), revokeStatement("SELECT", "TABLE", relations)];
  if (to) {
    if (functions.length > 0) statements.push(`GRANT EXECUTE ON FUNCTION ${functions.map((f) => f.name).join(", ")} TO ${to}`);
    if (relations.length > 0) statements.push(`GRANT SELECT ON TABLE ${relations.map((r) => r.name).join(", ")} TO ${to}`);
  }
  return hardeningFinding(ctx, id, `role ${ctx.app}`, `${ctx.app} can ${can.join(" and ")}`, statements);
}

/** A hardening-<id> error: what the role can do, why that crosses tenants (the item's why, unless said otherwise), and the statements that take it away. */
function hardeningFinding(
  ctx: AuditContext,
  id: HardeningId,
  object: string,
  what: string,
  statements: (string | undefined)[],
  why = item(id).why,
): Finding {
  const sql = statements.filter((s): s is string => s !== undefined).map((s) => `${s};`);
  return {
    rule: `hardening-${id}`,
    severity: "error",
    object,
    message: `${what}: ${why}`,
    fix: `${sql.join(" ")}  -- or: ${ctx.setupFix} (it hardens this unless given --no-harden ${id})`,
  };
}

/** How to read the objects an item names: functions to execute, relations to read. */
const OBJECTS = {
  function: { name: "p.oid::regprocedure::text", from: "pg_catalog.pg_proc p", acl: "p.proacl", kind: "f", owner: "p.proowner", privilege: "EXECUTE" },
  relation: { name: "c.oid::regclass::text", from: "pg_catalog.pg_class c", acl: "c.relacl", kind: "r", owner: "c.relowner", privilege: "SELECT" },
} as const;

/** Objects matching `where` (over pg_proc `p` or pg_class `c`) that the app role can use. */
async function reached(ctx: AuditContext, of: keyof typeof OBJECTS, where: string): Promise<Reach[]> {
  const o = OBJECTS[of];
  const rows = await ctx.tx.unsafe(
    `SELECT ${o.name} AS name, ${reachColumns(o.acl, o.kind, o.owner, [o.privilege])} FROM ${o.from} WHERE ${where} ORDER BY 1`,
    [ctx.appOid],
  );
  return reachable(rows);
}

/** pg_catalog functions and relations of an item that the app role can use. */
async function catalogReach(ctx: AuditContext, id: HardeningId): Promise<[Reach[], Reach[]]> {
  const fnSql = FUNCTIONS_SQL[id];
  const viewSql = VIEWS_SQL[id];
  return [
    fnSql ? await reached(ctx, "function", `p.pronamespace = 'pg_catalog'::regnamespace AND (${fnSql})`) : [],
    viewSql ? await reached(ctx, "relation", `c.relnamespace = 'pg_catalog'::regnamespace AND (${viewSql})`) : [],
  ];
}

/** pg_stat_statements' functions and relations, in whatever schema it is installed (none when it is not). */
async function statementsReach(ctx: AuditContext): Promise<[Reach[], Reach[]]> {
  const members = (catalog: string) =>
    `SELECT d.objid FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e
       ON d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.refobjid = e.oid
     WHERE e.extname = 'pg_stat_statements' AND d.deptype = 'e' AND d.classid = '${catalog}'::regclass`;
  return [
    await reached(ctx, "function", `p.oid IN (${members("pg_catalog.pg_proc")})`),
    await reached(ctx, "relation", `c.oid IN (${members("pg_catalog.pg_class")}) AND c.relkind IN ('r', 'v', 'm', 'p', 'f')`),
  ];
}

async function schemaCreate(ctx: AuditContext): Promise<Finding | undefined> {
  const schemas = reachable(
    await ctx.tx.unsafe(
      `SELECT quote_ident(n.nspname) AS name, ${reachColumns("n.nspacl", "n", "n.nspowner", ["CREATE"])}
       FROM pg_catalog.pg_namespace n WHERE ${APP_SCHEMA_SQL} ORDER BY 1`,
      [ctx.appOid],
    ),
  );
  if (schemas.length === 0) return undefined;
  return hardeningFinding(ctx, "schema-create", `role ${ctx.app}`, `${ctx.app} can create objects in schema ${nameFew(schemas.map((s) => s.name))}`, [
    revokeStatement("CREATE", "SCHEMA", schemas),
    ...ownerStatements("SCHEMA", schemas, ctx.app),
  ]);
}

/** Privileges on tenant tables (TRUNCATE, TRIGGER, REFERENCES) and on every other table of the application (TRIGGER). */
const TENANT_TABLE_PRIVILEGES = ["TRUNCATE", "TRIGGER", "REFERENCES"] as const;

async function tablePrivileges(ctx: AuditContext): Promise<Finding[]> {
  // $1: tenant columns (TENANT_TABLES_SQL), $2: the app role.
  const rows = await ctx.tx.unsafe(
    `WITH t AS (${TENANT_TABLES_SQL})
     SELECT c.oid::regclass::text AS name, t.oid IS NOT NULL AS tenant,
            ${granteesSql("c.relacl", "r", "c.relowner", TENANT_TABLE_PRIVILEGES, "$2")} AS all_grantees,
            ${granteesSql("c.relacl", "r", "c.relowner", ["TRIGGER"], "$2")} AS trigger_grantees,
            pg_catalog.pg_has_role($2::oid, c.relowner, 'MEMBER') AS owned
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     LEFT JOIN t ON t.oid = c.oid
     WHERE c.relkind IN ('r', 'p', 'v', 'f') AND ${APP_SCHEMA_SQL}
     ORDER BY 1`,
    [ctx.tenantColumns, ctx.appOid],
  );
  // Tenant tables owned by the app role are app-role-owns-table's; other tables it owns it can put triggers on.
  const tenant = reachable(rows.filter((r) => r.tenant).map((r) => ({ ...r, grantees: r.all_grantees, owned: false })));
  const other = reachable(rows.filter((r) => !r.tenant).map((r) => ({ ...r, grantees: r.trigger_grantees })));
  const out: Finding[] = [];
  if (tenant.length > 0 || other.length > 0) {
    const what: string[] = [];
    if (tenant.length > 0) what.push(`holds TRUNCATE, TRIGGER or REFERENCES on tenant table ${nameFew(tenant.map((t) => t.name))}`);
    if (other.length > 0) what.push(`can create triggers on ${nameFew(other.map((t) => t.name))}`);
    out.push(
      hardeningFinding(ctx, "table-privileges", `role ${ctx.app}`, `${ctx.app} ${what.join(" and ")}`, [
        revokeStatement(TENANT_TABLE_PRIVILEGES.join(", "), "TABLE", tenant),
        revokeStatement("TRIGGER", "TABLE", other),
        ...ownerStatements("TABLE", other, ctx.app),
      ]),
    );
  }
  for (const d of await defaultPrivileges(ctx)) out.push(d);
  return out;
}

/** Default privileges that would grant the table privileges on tables created later: a warning each. */
async function defaultPrivileges(ctx: AuditContext): Promise<Finding[]> {
  const rows = await ctx.tx.unsafe(
    `SELECT d.defaclrole::regrole::text AS owner, n.nspname AS schema,
            array_agg(DISTINCT a.privilege_type) AS privileges,
            array_agg(DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname::text END) AS grantees
     FROM pg_catalog.pg_default_acl d
     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = d.defaclnamespace
     CROSS JOIN LATERAL pg_catalog.aclexplode(d.defaclacl) AS a
     LEFT JOIN pg_catalog.pg_roles r ON r.oid = a.grantee
     WHERE d.defaclobjtype = 'r' AND a.privilege_type IN (${TENANT_TABLE_PRIVILEGES.map((p) => `'${p}'`).join(", ")})
       AND (a.grantee = 0 OR pg_catalog.pg_has_role($1::oid, a.grantee, 'MEMBER'))
     GROUP BY d.oid, d.defaclrole, n.nspname ORDER BY 1, 2`,
    [ctx.appOid],
  );
  return rows.map((r) => {
    const scope = `FOR ROLE ${quoteIdent(r.owner)}${r.schema ? ` IN SCHEMA ${quoteIdent(r.schema)}` : ""}`;
    const grantees = granteeList(r.grantees as string[]);
    return {
      ...hardeningFinding(
        ctx,
        "table-privileges",
        `default privileges of role ${r.owner}${r.schema ? ` in schema ${r.schema}` : ""}`,
        `tables ${r.owner} creates${r.schema ? ` in ${r.schema}` : ""} will grant ${(r.privileges as string[]).join(", ")} to ${grantees}, and so to ${ctx.app}`,
        [`ALTER DEFAULT PRIVILEGES ${scope} REVOKE ${TENANT_TABLE_PRIVILEGES.join(", ")} ON TABLES FROM ${grantees}`],
      ),
      severity: "warning" as const,
    };
  });
}

// ---- role-level settings ----------------------------------------------------

export interface RoleSettingRow {
  /** null: ALTER ROLE … SET for every database. */
  database: string | null;
  /** pg_db_role_setting.setconfig: "name=value" entries. */
  config: readonly string[];
}

export interface RoleSettingProblems {
  /** Settings other than the pinned ones, where they are set. */
  extra: { database: string | null; name: string; value: string }[];
  /** Pinned settings not in effect in `database`. */
  missing: (readonly [string, string])[];
}

const splitSetting = (entry: string): [string, string] => {
  const eq = entry.indexOf("=");
  return eq < 0 ? [entry, ""] : [entry.slice(0, eq), entry.slice(eq + 1)];
};

/**
 * Which role-level settings of the app role are not the pinned ones, and
 * which pinned ones are not in effect in `database` (a database-specific
 * setting overrides the one for every database, as in PostgreSQL).
 */
export function roleSettingProblems(
  rows: readonly RoleSettingRow[],
  database: string,
  pinned: readonly (readonly [string, string])[] = PINNED_ROLE_SETTINGS,
): RoleSettingProblems {
  const isPinned = (name: string, value: string) => pinned.some(([n, v]) => n === name && v === value);
  const extra = rows.flatMap((r) =>
    r.config.map(splitSetting).flatMap(([name, value]) => (isPinned(name, value) ? [] : [{ database: r.database, name, value }])),
  );
  const effective = (name: string): string | undefined => {
    const find = (db: string | null) => rows.find((r) => r.database === db)?.config.map(splitSetting).find(([n]) => n === name)?.[1];
    return find(database) ?? find(null);
  };
  const missing = pinned.filter(([name, value]) => effective(name) !== value);
  return { extra, missing };
}

async function roleSettings(ctx: AuditContext, database: string): Promise<Finding[]> {
  const rows = await ctx.tx.unsafe(
    `SELECT d.datname AS database, s.setconfig AS config
     FROM pg_catalog.pg_db_role_setting s LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
     WHERE s.setrole = $1::oid ORDER BY 1 NULLS FIRST`,
    [ctx.appOid],
  );
  const { extra, missing } = roleSettingProblems(
    rows.map((r) => ({ database: r.database as string | null, config: (r.config as string[] | null) ?? [] })),
    database,
  );
  const inDb = (db: string | null) => (db === null ? "" : ` IN DATABASE ${quoteIdent(db)}`);
  const out: Finding[] = [];
  if (extra.length > 0) {
    const shown = extra.map((e) => `${e.name}=${e.value}${e.database === null ? "" : ` (in ${e.database})`}`);
    out.push(
      hardeningFinding(
        ctx,
        "role-settings",
        `role ${ctx.app}`,
        `${ctx.app} has role-level setting${extra.length === 1 ? "" : "s"} ${nameFew(shown)}`,
        extra.map((e) => `ALTER ROLE ${ctx.appQ}${inDb(e.database)} RESET ${quoteIdent(e.name)}`),
      ),
    );
  }
  for (const [name, value] of missing) {
    out.push({
      ...hardeningFinding(
        ctx,
        "role-settings",
        `setting ${name} of role ${ctx.app}`,
        `${name} is not pinned to ${value} on ${ctx.app}`,
        [`ALTER ROLE ${ctx.appQ} SET ${quoteIdent(name)} = ${value}`],
        "setup pins it where only a superuser can change it, so that no tenant's session can undo it (it keeps bind parameters, tenant data, out of the log lines of every tenant's statements)",
      ),
      severity: "warning",
    });
  }
  return out;
}

/** Large objects the app role (or a role it is a member of) owns: shared by every tenant. */
async function largeObjectsOwned(ctx: AuditContext): Promise<Finding | undefined> {
  const [r] = await ctx.tx.unsafe(
    `SELECT count(*)::int AS n FROM pg_catalog.pg_largeobject_metadata WHERE pg_catalog.pg_has_role($1::oid, lomowner, 'MEMBER')`,
    [ctx.appOid],
  );
  const n = r!.n as number;
  if (n === 0) return undefined;
  return {
    rule: "large-objects-owned",
    severity: "error",
    object: `role ${ctx.app}`,
    message: `${ctx.app} owns ${plural(n, "large object")}: ${item("large-objects").why}`,
    fix: `move the data into bytea columns of tables under row-level security, then SELECT pg_catalog.lo_unlink(oid) FROM pg_catalog.pg_largeobject_metadata WHERE lomowner = ${quoteLiteral(ctx.appQ)}::regrole; or ALTER LARGE OBJECT <oid> OWNER TO <a role ${ctx.app} is not a member of>`,
  };
}

/**
 * Every hardening rule, and large-objects-owned. Returns the items found
 * open (before --no-harden: a kept item is open all the same).
 */
export async function checkHardening(ctx: AuditContext, database: string): Promise<Set<HardeningId>> {
  const found: Finding[] = [];
  const push = (f: Finding | undefined) => f && found.push(f);
  for (const id of ["activity", "statistics", "large-objects", "signals"] as const) {
    push(catalogFinding(ctx, id, ...(await catalogReach(ctx, id))));
  }
  push(catalogFinding(ctx, "pg-stat-statements", ...(await statementsReach(ctx))));
  push(await schemaCreate(ctx));
  found.push(...(await tablePrivileges(ctx)), ...(await roleSettings(ctx, database)));
  push(await largeObjectsOwned(ctx));
  for (const f of found) ctx.add(f);
  const open = found.filter((f) => f.severity === "error" && f.rule.startsWith("hardening-"));
  return new Set(open.map((f) => f.rule.slice("hardening-".length) as HardeningId));
}

/** `--no-harden <id>`: that item's findings become info, kept by choice. */
export function keptByChoice(findings: readonly Finding[], kept: ReadonlySet<string>): Finding[] {
  return findings.map((f) => {
    const id = f.rule.startsWith("hardening-") ? f.rule.slice("hardening-".length) : undefined;
    if (id === undefined || !kept.has(id)) return f;
    return { ...f, severity: "info", message: `kept by choice (--no-harden ${id}): ${f.message}` };
  });
}
