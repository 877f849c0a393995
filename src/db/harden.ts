/**
 * What `multigres setup` does for each hardening item (db/hardening.ts):
 * take away from PUBLIC and the app role what one role shared by every
 * tenant would otherwise share between tenants. Every step reads the
 * catalog before it acts and acts only on what it found, so a second run
 * changes nothing; every change is one line of setup's output.
 *
 * Access taken from PUBLIC goes where REGRANTED_TO says (pg_monitor, or
 * --monitoring-role instead; pg_signal_backend for signals), so monitoring
 * keeps working for roles meant to monitor.
 * What the app role still holds afterwards through a membership setup
 * cannot change without touching other roles: that becomes a note.
 */
import {
  APP_SCHEMA_SQL,
  FUNCTIONS_SQL,
  HARDENING,
  MONITORING_MEMBERSHIPS,
  MONITORING_ROLES,
  PINNED_ROLE_SETTINGS,
  REGRANTED_TO,
  TENANT_TABLES_SQL,
  VIEWS_SQL,
  type HardeningId,
} from "./hardening.ts";
import { privilegedMemberships, quoteIdent, quoteLiteral, UsageError, type Tx } from "./connect.ts";

export interface HardenOptions {
  appRole: string;
  appOid: number;
  /** Columns that mark a tenant table (db/hardening.ts TENANT_TABLES_SQL). */
  tenantColumns: readonly string[];
  /** Items kept as they are (--no-harden). */
  keep: ReadonlySet<HardeningId>;
  /** Who gets the read access taken from PUBLIC. */
  monitoringRole: string;
}

interface Out {
  changes: string[];
  notes: string[];
}

type Step = (tx: Tx, o: HardenOptions, out: Out) => Promise<void>;

export async function hardenDatabase(tx: Tx, o: HardenOptions, out: Out): Promise<void> {
  const [monitor] = await tx`SELECT pg_has_role(${o.appOid}::oid, rolname, 'MEMBER') AS app_is_member FROM pg_catalog.pg_roles WHERE rolname = ${o.monitoringRole}`;
  if (!monitor) throw new UsageError(`--monitoring-role: role ${o.monitoringRole} does not exist`);
  if (monitor.app_is_member && !(MONITORING_MEMBERSHIPS as readonly string[]).includes(o.monitoringRole)) {
    throw new UsageError(`--monitoring-role ${o.monitoringRole}: ${o.appRole} is a member of it, so it would keep everything taken away`);
  }
  for (const item of HARDENING) {
    if (o.keep.has(item.id)) out.notes.push(`kept ${item.id} as it is (--no-harden): ${item.why}`);
    else await STEPS[item.id](tx, o, out);
  }
}

const STEPS: Record<HardeningId, Step> = {
  activity: async (tx, o, out) => {
    await revokeMonitoringMemberships(tx, o, out, "activity");
    await catalogObjects(tx, o, out, "activity");
  },
  statistics: (tx, o, out) => catalogObjects(tx, o, out, "statistics"),
  "pg-stat-statements": (tx, o, out) => catalogObjects(tx, o, out, "pg-stat-statements"),
  "large-objects": (tx, o, out) => catalogObjects(tx, o, out, "large-objects"),
  signals: (tx, o, out) => catalogObjects(tx, o, out, "signals"),
  "schema-create": schemaCreate,
  "table-privileges": tablePrivileges,
  "role-settings": roleSettings,
};

/** Who gets an item's access instead of PUBLIC: REGRANTED_TO, with --monitoring-role standing in for pg_monitor. */
function grantee(o: HardenOptions, id: HardeningId): string | undefined {
  const to = REGRANTED_TO[id];
  return to === MONITORING_ROLES.read ? o.monitoringRole : to;
}

// ---------------------------------------------------------------------------
// helpers over ACLs

/** SQL: whether PUBLIC (grantee 0) or $1 holds `privilege` in `acl` (an aclitem[] expression, defaults applied). */
const held = (acl: string, privilege: string, who: "public" | "app") =>
  `EXISTS (SELECT 1 FROM aclexplode(${acl}) x WHERE x.grantee = ${who === "public" ? "0" : "$1::oid"} AND x.privilege_type = '${privilege}')`;

/** The grantees a REVOKE names: PUBLIC and the app role. */
const fromWhom = (o: HardenOptions) => `PUBLIC, ${quoteIdent(o.appRole)}`;
/** The same, for output. */
const whomText = (o: HardenOptions) => `PUBLIC and ${o.appRole}`;

function list(names: string[]): string {
  return names.join(", ");
}

/** "3 views (a, b, c)", or the first few and an ellipsis: the full list is doctor's and \dp's to show. */
function some(names: string[], noun: string): string {
  const shown = names.length > 4 ? [...names.slice(0, 3), "…"] : names;
  return `${names.length} ${noun}${names.length === 1 ? "" : "s"} (${list(shown)})`;
}

/** The app role's memberships in monitoring roles (directly or through others): revoked at the head of each path. */
async function revokeMonitoringMemberships(tx: Tx, o: HardenOptions, out: Out, item: HardeningId): Promise<void> {
  const names = [...new Set<string>([...MONITORING_MEMBERSHIPS, o.monitoringRole])];
  const where = `r.rolname IN (${names.map(quoteLiteral).join(", ")})`;
  const byVia = new Map<string, string[]>();
  for (const p of await privilegedMemberships(tx, o.appOid, where)) byVia.set(p.via, [...(byVia.get(p.via) ?? []), p.path]);
  for (const [via, paths] of byVia) {
    await revokeMembership(tx, o.appRole, o.appOid, via);
    out.changes.push(`${item}: ${o.appRole}: revoked membership in ${via} (${list(paths)}: reads every session's statements)`);
  }
}

/**
 * Revoke `role`'s direct membership in `via`. Since PostgreSQL 16 a
 * membership is one grant per grantor, so each is revoked.
 */
export async function revokeMembership(tx: Tx, role: string, roleOid: number, via: string): Promise<void> {
  const [{ oid: viaOid, v: serverVersion } = { oid: 0, v: 0 }] = await tx`
    SELECT oid::int AS oid, current_setting('server_version_num')::int AS v FROM pg_catalog.pg_roles WHERE rolname = ${via}`;
  if (serverVersion >= 160000) {
    const grantors = await tx`
      SELECT DISTINCT g.rolname FROM pg_catalog.pg_auth_members am
      JOIN pg_catalog.pg_roles g ON g.oid = am.grantor
      WHERE am.member = ${roleOid} AND am.roleid = ${viaOid}`;
    for (const g of grantors) await tx.unsafe(`REVOKE ${quoteIdent(via)} FROM ${quoteIdent(role)} GRANTED BY ${quoteIdent(g.rolname)} CASCADE`);
  } else {
    await tx.unsafe(`REVOKE ${quoteIdent(via)} FROM ${quoteIdent(role)}`);
  }
  const [still] = await tx`SELECT 1 AS yes FROM pg_catalog.pg_auth_members am WHERE am.member = ${roleOid} AND am.roleid = ${viaOid}`;
  if (still) throw new Error(`could not revoke membership of ${role} in ${via}`);
}

// ---------------------------------------------------------------------------
// catalog functions and views: activity, statistics, pg-stat-statements, large objects, signals

interface Grantable {
  name: string;
  /** PUBLIC or the app role holds the privilege directly. */
  open: boolean;
  /** The app role holds it in any way (memberships included). */
  reachable: boolean;
}

/** The functions and views of an item: pg_catalog's by predicate, or the pg_stat_statements extension's. */
async function itemObjects(tx: Tx, o: HardenOptions, id: HardeningId): Promise<{ functions: Grantable[]; views: Grantable[] }> {
  const fnAcl = "coalesce(p.proacl, acldefault('f', p.proowner))";
  const relAcl = "coalesce(c.relacl, acldefault('r', c.relowner))";
  const fnCols = `p.oid::regprocedure::text AS name,
    ${held(fnAcl, "EXECUTE", "public")} OR ${held(fnAcl, "EXECUTE", "app")} AS open,
    has_function_privilege($1::oid, p.oid, 'EXECUTE') AS reachable`;
  const relCols = `c.oid::regclass::text AS name,
    ${held(relAcl, "SELECT", "public")} OR ${held(relAcl, "SELECT", "app")} AS open,
    has_table_privilege($1::oid, c.oid, 'SELECT') AS reachable`;
  if (id === "pg-stat-statements") {
    // Whatever schema it was created in; its reset functions are not PUBLIC's anyway.
    const member = (catalog: string, alias: string) =>
      `EXISTS (SELECT 1 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid
               WHERE d.classid = '${catalog}'::regclass AND d.objid = ${alias}.oid AND d.deptype = 'e' AND e.extname = 'pg_stat_statements')`;
    return {
      functions: (await tx.unsafe(`SELECT ${fnCols} FROM pg_catalog.pg_proc p WHERE ${member("pg_catalog.pg_proc", "p")} ORDER BY 1`, [o.appOid])) as never,
      views: (await tx.unsafe(`SELECT ${relCols} FROM pg_catalog.pg_class c WHERE c.relkind = 'v' AND ${member("pg_catalog.pg_class", "c")} ORDER BY 1`, [o.appOid])) as never,
    };
  }
  const fnWhere = FUNCTIONS_SQL[id];
  const viewWhere = VIEWS_SQL[id];
  return {
    functions: fnWhere
      ? ((await tx.unsafe(`SELECT ${fnCols} FROM pg_catalog.pg_proc p WHERE p.pronamespace = 'pg_catalog'::regnamespace AND (${fnWhere}) ORDER BY 1`, [o.appOid])) as never)
      : [],
    views: viewWhere
      ? ((await tx.unsafe(`SELECT ${relCols} FROM pg_catalog.pg_class c WHERE c.relnamespace = 'pg_catalog'::regnamespace AND (${viewWhere}) ORDER BY 1`, [o.appOid])) as never)
      : [],
  };
}

async function catalogObjects(tx: Tx, o: HardenOptions, out: Out, id: HardeningId): Promise<void> {
  const grantTo = grantee(o, id);
  const { functions, views } = await itemObjects(tx, o, id);
  const fns = functions.filter((f) => f.open).map((f) => f.name);
  const rels = views.filter((v) => v.open).map((v) => v.name);
  const whom = fromWhom(o);
  if (rels.length > 0) await tx.unsafe(`REVOKE SELECT ON TABLE ${rels.join(", ")} FROM ${whom}`);
  if (fns.length > 0) await tx.unsafe(`REVOKE EXECUTE ON FUNCTION ${fns.join(", ")} FROM ${whom}`);
  if (grantTo) {
    if (rels.length > 0) await tx.unsafe(`GRANT SELECT ON TABLE ${rels.join(", ")} TO ${quoteIdent(grantTo)}`);
    if (fns.length > 0) await tx.unsafe(`GRANT EXECUTE ON FUNCTION ${fns.join(", ")} TO ${quoteIdent(grantTo)}`);
  }
  const what = [rels.length > 0 && `SELECT on ${some(rels, "view")}`, fns.length > 0 && `EXECUTE on ${some(fns, "function")}`].filter(Boolean).join(" and ");
  if (what) out.changes.push(`${id}: revoked ${what} from ${whomText(o)}${grantTo ? `; granted to ${grantTo}` : ""}`);

  // Still reachable through a role the app role is a member of.
  const again = await itemObjects(tx, o, id);
  const left = [...again.views, ...again.functions].filter((x) => x.reachable).map((x) => x.name);
  if (left.length > 0) {
    out.notes.push(`${id}: ${o.appRole} still reaches ${list(left)} through a role it is a member of: revoke it there (multigres doctor names it)`);
  }
}

// ---------------------------------------------------------------------------
// CREATE on schemas and on the database

async function schemaCreate(tx: Tx, o: HardenOptions, out: Out): Promise<void> {
  const nspAcl = "coalesce(n.nspacl, acldefault('n', n.nspowner))";
  const schemas = await tx.unsafe(
    `SELECT n.nspname AS name, ${held(nspAcl, "CREATE", "public")} OR ${held(nspAcl, "CREATE", "app")} AS open
     FROM pg_catalog.pg_namespace n WHERE ${APP_SCHEMA_SQL} ORDER BY 1`,
    [o.appOid],
  );
  for (const s of schemas.filter((s) => s.open)) {
    await tx.unsafe(`REVOKE CREATE ON SCHEMA ${quoteIdent(s.name)} FROM ${fromWhom(o)}`);
    out.changes.push(`schema-create: revoked CREATE on schema ${s.name} from ${whomText(o)}`);
  }
  // CREATE on the database is CREATE SCHEMA: a schema named after the role is first on the default search_path ("$user").
  const datAcl = "coalesce(d.datacl, acldefault('d', d.datdba))";
  const [db] = await tx.unsafe(
    `SELECT d.datname AS name, ${held(datAcl, "CREATE", "public")} OR ${held(datAcl, "CREATE", "app")} AS open
     FROM pg_catalog.pg_database d WHERE d.datname = current_database()`,
    [o.appOid],
  );
  if (db?.open) {
    await tx.unsafe(`REVOKE CREATE ON DATABASE ${quoteIdent(db.name)} FROM ${fromWhom(o)}`);
    out.changes.push(`schema-create: revoked CREATE on database ${db.name} (CREATE SCHEMA) from ${whomText(o)}`);
  }

  const left = await tx.unsafe(
    `SELECT n.nspname AS name, n.nspowner::regrole::text AS owner FROM pg_catalog.pg_namespace n
     WHERE ${APP_SCHEMA_SQL} AND has_schema_privilege($1::oid, n.oid, 'CREATE')
     UNION ALL
     SELECT 'database ' || d.datname, d.datdba::regrole::text FROM pg_catalog.pg_database d
     WHERE d.datname = current_database() AND has_database_privilege($1::oid, d.oid, 'CREATE')
     ORDER BY 1`,
    [o.appOid],
  );
  for (const l of left) {
    out.notes.push(
      `schema-create: ${o.appRole} can still create objects in ${l.name.startsWith("database ") ? l.name : `schema ${l.name}`} (owned by ${l.owner}${l.owner === o.appRole ? ", itself" : ""}, or through a role it is a member of): give it an owner ${o.appRole} is not a member of`,
    );
  }
}

// ---------------------------------------------------------------------------
// TRUNCATE, TRIGGER and REFERENCES

/** Table privileges one tenant can use against the others: on tenant tables all three, elsewhere TRIGGER. */
const TENANT_TABLE_PRIVILEGES = ["TRUNCATE", "TRIGGER", "REFERENCES"] as const;

async function tablePrivileges(tx: Tx, o: HardenOptions, out: Out): Promise<void> {
  const tenantOids = new Set((await tx.unsafe(TENANT_TABLES_SQL, [o.tenantColumns as string[]])).map((t) => t.oid as number));
  const relAcl = "coalesce(c.relacl, acldefault('r', c.relowner))";
  const rels = await tx.unsafe(
    `SELECT c.oid::int AS oid, c.oid::regclass::text AS name, c.relkind::text AS kind,
            ARRAY(SELECT DISTINCT x.privilege_type FROM aclexplode(${relAcl}) x
                  WHERE x.grantee IN (0, $1::oid) AND x.privilege_type IN ('TRUNCATE', 'TRIGGER', 'REFERENCES') ORDER BY 1) AS privileges,
            ARRAY(SELECT DISTINCT a.attname::text FROM pg_catalog.pg_attribute a, aclexplode(a.attacl) x
                  WHERE a.attrelid = c.oid AND x.grantee IN (0, $1::oid) AND x.privilege_type = 'REFERENCES' ORDER BY 1) AS reference_columns
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p', 'v', 'f') AND ${APP_SCHEMA_SQL}
     ORDER BY 2`,
    [o.appOid],
  );
  for (const r of rels) {
    const tenant = tenantOids.has(r.oid);
    const privileges = (r.privileges as string[]).filter((p) => tenant || p === "TRIGGER");
    const columns = tenant ? (r.reference_columns as string[]) : [];
    if (privileges.length > 0) await tx.unsafe(`REVOKE ${privileges.join(", ")} ON TABLE ${r.name} FROM ${fromWhom(o)}`);
    if (columns.length > 0) await tx.unsafe(`REVOKE REFERENCES (${columns.map(quoteIdent).join(", ")}) ON TABLE ${r.name} FROM ${fromWhom(o)}`);
    const what = [...privileges, ...(columns.length > 0 ? [`REFERENCES (${list(columns)})`] : [])];
    if (what.length > 0) out.changes.push(`table-privileges: revoked ${list(what)} on ${tenant ? "tenant table" : r.kind === "v" ? "view" : r.kind === "f" ? "foreign table" : "table"} ${r.name} from ${whomText(o)}`);
  }

  // Default privileges would grant them again on the next table created.
  const defaults = await tx.unsafe(
    `SELECT d.defaclrole::regrole::text AS owner, n.nspname AS schema,
            ARRAY(SELECT DISTINCT x.privilege_type FROM aclexplode(d.defaclacl) x
                  WHERE x.grantee IN (0, $1::oid) AND x.privilege_type IN ('TRUNCATE', 'TRIGGER', 'REFERENCES') ORDER BY 1) AS privileges
     FROM pg_catalog.pg_default_acl d LEFT JOIN pg_catalog.pg_namespace n ON n.oid = d.defaclnamespace
     WHERE d.defaclobjtype = 'r' ORDER BY 1, 2`,
    [o.appOid],
  );
  for (const d of defaults) {
    const privileges = d.privileges as string[];
    if (privileges.length === 0) continue;
    const scope = `FOR ROLE ${quoteIdent(d.owner)}${d.schema ? ` IN SCHEMA ${quoteIdent(d.schema)}` : ""}`;
    await tx.unsafe(`ALTER DEFAULT PRIVILEGES ${scope} REVOKE ${TENANT_TABLE_PRIVILEGES.join(", ")} ON TABLES FROM ${fromWhom(o)}`);
    out.changes.push(
      `table-privileges: default privileges of ${d.owner}${d.schema ? ` in schema ${d.schema}` : ""} no longer grant ${list(privileges)} on new tables to ${whomText(o)}`,
    );
  }

  const left = await tx.unsafe(
    `SELECT c.oid::int AS oid, c.oid::regclass::text AS name,
            has_table_privilege($1::oid, c.oid, 'TRUNCATE') AS truncate, has_table_privilege($1::oid, c.oid, 'TRIGGER') AS trigger,
            has_table_privilege($1::oid, c.oid, 'REFERENCES') OR has_any_column_privilege($1::oid, c.oid, 'REFERENCES') AS references
     FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.relkind IN ('r', 'p', 'v', 'f') AND ${APP_SCHEMA_SQL} ORDER BY 2`,
    [o.appOid],
  );
  for (const l of left) {
    const tenant = tenantOids.has(l.oid);
    const still = TENANT_TABLE_PRIVILEGES.filter((p) => (tenant || p === "TRIGGER") && l[p.toLowerCase()]);
    if (still.length > 0) {
      out.notes.push(`table-privileges: ${o.appRole} still holds ${list(still)} on ${l.name} through a role it is a member of (or as its owner): revoke it there`);
    }
  }
}

// ---------------------------------------------------------------------------
// role-level settings

/** `name=value` as pg_db_role_setting stores it. */
function splitSetting(entry: string): [string, string] {
  const eq = entry.indexOf("=");
  return eq < 0 ? [entry, ""] : [entry.slice(0, eq), entry.slice(eq + 1)];
}

/** A setting name as SQL: each dotted part quoted. */
const settingSql = (name: string) => name.split(".").map(quoteIdent).join(".");

async function roleSettings(tx: Tx, o: HardenOptions, out: Out): Promise<void> {
  const rows = await tx`
    SELECT s.setdatabase::int AS db, d.datname, s.setconfig AS config
    FROM pg_catalog.pg_db_role_setting s LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase
    WHERE s.setrole = ${o.appOid} ORDER BY 1`;
  const role = quoteIdent(o.appRole);
  const pinned = new Map(PINNED_ROLE_SETTINGS);
  let global: string[] = [];
  for (const r of rows) {
    const inDatabase = r.db === 0 ? "" : ` IN DATABASE ${quoteIdent(r.datname)}`;
    if (r.db === 0) global = r.config as string[];
    for (const entry of r.config as string[]) {
      const [name, value] = splitSetting(entry);
      if (r.db === 0 && pinned.get(name.toLowerCase()) === value) continue;
      await tx.unsafe(`ALTER ROLE ${role}${inDatabase} RESET ${settingSql(name)}`);
      // Custom settings (a dot in the name) are where applications keep their own values: not printed.
      const was = name.includes(".") ? "value not shown" : `was ${value}`;
      out.changes.push(`role-settings: ${o.appRole}: reset ${name}${r.db === 0 ? "" : ` in database ${r.datname}`} (${was})`);
    }
  }
  for (const [name, value] of PINNED_ROLE_SETTINGS) {
    if (global.some((e) => e === `${name}=${value}`)) continue;
    await tx.unsafe(`ALTER ROLE ${role} SET ${settingSql(name)} = ${quoteLiteral(value)}`);
    out.changes.push(`role-settings: ${o.appRole}: pinned ${name} = ${value} (a superuser-only setting: the role cannot change it back)`);
  }
}
