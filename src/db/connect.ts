/**
 * What `multigres setup` and `multigres doctor` share: the admin
 * connection, identifier quoting, the schema version the embedded
 * sql/setup.sql installs, the roles that count as privileged, and where the
 * context secret and tenant setting come from (environment, then config
 * file, as for the proxy).
 */
import postgres from "postgres";
import setupSql from "../../sql/setup.sql" with { type: "text" };
import * as v from "valibot";
import { OPTIONS, readConfigFile, TenantColumnsSchema } from "../config.ts";
import { HARDENING_IDS, type HardeningId } from "./hardening.ts";

export type Sql = postgres.Sql<Record<string, unknown>>;
/** What queries run on: the client or a transaction of it. */
export type Tx = postgres.TransactionSql<Record<string, unknown>>;

export const DEFAULT_TENANT_SETTING = "app.current_tenant_id";
export const DEFAULT_TENANT_COLUMNS = OPTIONS.find((o) => o.key === "tenantColumns")!.default as string[];

/** The schema version this binary's sql/setup.sql installs (its multigres.meta row). */
export const SCHEMA_VERSION: number = (() => {
  const m = /INSERT INTO multigres\.meta VALUES \('schema_version', '(\d+)'\)/.exec(setupSql);
  if (!m) throw new Error("sql/setup.sql does not set schema_version");
  return Number(m[1]);
})();

/**
 * Predefined roles whose members can read or write every table (including
 * multigres.context_keys, whose contents forge any tenant), run programs or
 * read files as the server, or signal other backends.
 */
export const PRIVILEGED_PREDEFINED_ROLES = [
  "pg_read_all_data",
  "pg_write_all_data",
  "pg_execute_server_program",
  "pg_read_server_files",
  "pg_write_server_files",
  "pg_signal_backend",
] as const;

const PREDEFINED_ROLE_POWERS: Record<string, string> = {
  pg_read_all_data: "reads every table, multigres.context_keys included",
  pg_write_all_data: "writes every table, multigres.context_keys included",
  pg_execute_server_program: "runs programs on the database server",
  pg_read_server_files: "reads the server's files",
  pg_write_server_files: "writes the server's files",
  pg_signal_backend: "cancels and terminates other sessions",
};

/**
 * SQL predicate over a pg_roles row aliased `r`: the role is privileged
 * (its members can escape or subvert row-level security).
 */
export const PRIVILEGED_ROLE_SQL = `(r.rolsuper OR r.rolbypassrls OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication
  OR r.rolname IN (${PRIVILEGED_PREDEFINED_ROLES.map(quoteLiteral).join(", ")}))`;

/** Why a pg_roles row is privileged, for messages. */
export function privilegeReasons(r: {
  rolname: string;
  rolsuper: boolean;
  rolbypassrls: boolean;
  rolcreaterole: boolean;
  rolcreatedb: boolean;
  rolreplication: boolean;
}): string[] {
  const out: string[] = [];
  if (r.rolsuper) out.push("SUPERUSER");
  if (r.rolbypassrls) out.push("BYPASSRLS");
  if (r.rolcreaterole) out.push("CREATEROLE");
  if (r.rolcreatedb) out.push("CREATEDB");
  if (r.rolreplication) out.push("REPLICATION");
  const predefined = PREDEFINED_ROLE_POWERS[r.rolname];
  if (predefined) out.push(predefined);
  return out;
}

export interface PrivilegedPath {
  /** The role the app role is directly a member of, at the head of the path. */
  via: string;
  /** The privileged role reached. */
  role: string;
  /** app → … → role, for messages. */
  path: string;
  reasons: string[];
}

/**
 * Every privileged role the given role reaches through memberships (direct
 * or through other roles, whatever INHERIT says: a member can SET ROLE).
 * `where` (over pg_roles `r`) says which roles count; by default the
 * privileged ones.
 */
export async function privilegedMemberships(sql: Tx, roleOid: number, where = PRIVILEGED_ROLE_SQL): Promise<PrivilegedPath[]> {
  const rows = await sql.unsafe(
    `WITH RECURSIVE m(roleid, via, path) AS (
       SELECT am.roleid, am.roleid, ARRAY[am.member, am.roleid]
       FROM pg_catalog.pg_auth_members am WHERE am.member = $1::oid
       UNION
       SELECT am.roleid, m.via, m.path || am.roleid
       FROM pg_catalog.pg_auth_members am JOIN m ON am.member = m.roleid
       WHERE NOT am.roleid = ANY (m.path)
     )
     SELECT DISTINCT ON (v.rolname, r.rolname)
            v.rolname AS via, r.rolname, r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolcreatedb, r.rolreplication,
            (SELECT string_agg(x.rolname, ' → ' ORDER BY u.i) FROM unnest(m.path) WITH ORDINALITY AS u(oid, i)
               JOIN pg_catalog.pg_roles x ON x.oid = u.oid) AS path
     FROM m JOIN pg_catalog.pg_roles r ON r.oid = m.roleid JOIN pg_catalog.pg_roles v ON v.oid = m.via
     WHERE ${where}
     ORDER BY v.rolname, r.rolname, array_length(m.path, 1)`,
    [roleOid],
  );
  return rows.map((r) => ({
    via: r.via as string,
    role: r.rolname as string,
    path: r.path as string,
    reasons: privilegeReasons(r as never),
  }));
}

export function quoteIdent(s: string): string {
  return '"' + s.replaceAll('"', '""') + '"';
}

export function quoteLiteral(s: string): string {
  return "'" + s.replaceAll("'", "''") + "'";
}

/** A usage problem: printed without a stack, exit status 2. */
export class UsageError extends Error {}

/** One admin connection; notices (CREATE … IF NOT EXISTS chatter) are dropped. */
export function connectAdmin(url: string, application: string): Sql {
  return postgres(url, {
    max: 1,
    onnotice: () => {},
    connect_timeout: 15,
    idle_timeout: 0,
    prepare: false,
    connection: { application_name: application },
  }) as unknown as Sql;
}

/** One line for a database error: message, SQLSTATE, detail and hint. */
export function describeError(e: unknown): string {
  const err = e as { message?: string; code?: string; detail?: string; hint?: string };
  let s = String(err?.message ?? e);
  if (err?.code && /^[0-9A-Z]{5}$/.test(err.code)) s += ` (SQLSTATE ${err.code})`;
  if (err?.detail) s += `\n  detail: ${err.detail}`;
  if (err?.hint) s += `\n  hint: ${err.hint}`;
  return s;
}

const SETTING_NAME = /^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$.]*$/;

/**
 * Every value of a repeatable flag, `--name a --name b,c` or `--name=a`,
 * comma-separated lists split; undefined when the flag is absent. citty
 * keeps only the last of a repeated flag (and reads `--no-x` as `--x
 * false`), so these are read from the raw arguments.
 */
export function repeatedFlag(rawArgs: readonly string[], name: string): string[] | undefined {
  const flag = `--${name}`;
  let out: string[] | undefined;
  for (let i = 0; i < rawArgs.length; i++) {
    const arg = rawArgs[i]!;
    if (arg === "--") break;
    let value: string | undefined;
    if (arg === flag) {
      value = rawArgs[++i];
      if (value === undefined || value.startsWith("--")) throw new UsageError(`${flag} needs a value`);
    } else if (arg.startsWith(`${flag}=`)) {
      value = arg.slice(flag.length + 1);
    } else continue;
    (out ??= []).push(...value.split(",").map((s) => s.trim()));
  }
  return out;
}

/** `--no-harden <item>` (repeatable, comma lists too): the hardening items kept as they are. */
export function noHardenItems(rawArgs: readonly string[]): HardeningId[] {
  const items = repeatedFlag(rawArgs, "no-harden") ?? [];
  for (const id of items) {
    if (!(HARDENING_IDS as string[]).includes(id)) {
      throw new UsageError(`--no-harden: "${id}" is not a hardening item (one of ${HARDENING_IDS.join(", ")})`);
    }
  }
  return items as HardeningId[];
}

export interface CommonSources {
  databaseUrl?: string;
  appRole?: string;
  tenantSetting?: string;
  /** From --tenant-column (repeatedFlag). */
  tenantColumns?: string[];
  config?: string;
  contextSecretFile?: string;
}

export interface Resolved {
  databaseUrl: string;
  appRole: string;
  tenantSetting: string;
  /** The columns that hold the tenant id (at least one). */
  tenantColumns: string[];
  /** undefined when neither MULTIGRES_CONTEXT_SECRET nor context_secret is set. */
  secret: string | undefined;
}

/**
 * Flags, then the environment, then the config file, as for `start`:
 * --database-url / MULTIGRES_DATABASE_URL, --app-role, --tenant-setting /
 * MULTIGRES_TENANT_SETTING / tenant_setting, --tenant-column (repeatable,
 * comma lists) / MULTIGRES_TENANT_COLUMNS / tenant_columns (a list), and the secret from
 * --context-secret-file / MULTIGRES_CONTEXT_SECRET_FILE / context_secret_file,
 * else MULTIGRES_CONTEXT_SECRET / context_secret (never the secret itself as
 * a flag: it would show in ps).
 */
export async function resolveCommon(args: CommonSources, env = process.env): Promise<Resolved> {
  const file = args.config ? await readConfigFile(args.config) : undefined;
  const fromFile = (key: string): string | undefined => {
    const v = file?.data[key];
    if (v === undefined) return undefined;
    if (typeof v !== "string") throw new UsageError(`${file!.path}: ${key} must be a string`);
    return v;
  };
  const nonEmpty = (s: string | undefined) => (s === undefined || s === "" ? undefined : s);

  const databaseUrl = nonEmpty(args.databaseUrl) ?? nonEmpty(env.MULTIGRES_DATABASE_URL);
  if (!databaseUrl) throw new UsageError("--database-url is required (an admin connection string; or set MULTIGRES_DATABASE_URL)");
  if (!/^postgres(ql)?:\/\//.test(databaseUrl)) {
    throw new UsageError("--database-url must be a postgres:// or postgresql:// URL");
  }

  const appRole = nonEmpty(args.appRole);
  if (!appRole) throw new UsageError("--app-role is required (the role tenant connections use, e.g. app_user)");
  if (Buffer.byteLength(appRole) > 63) throw new UsageError(`--app-role: "${appRole}" is longer than 63 bytes`);
  if (/^pg_/i.test(appRole) || appRole.toLowerCase() === "public") {
    throw new UsageError(`--app-role: "${appRole}" is a reserved role name`);
  }

  const tenantSetting =
    nonEmpty(args.tenantSetting) ?? nonEmpty(env.MULTIGRES_TENANT_SETTING) ?? fromFile("tenant_setting") ?? DEFAULT_TENANT_SETTING;
  if (!SETTING_NAME.test(tenantSetting)) {
    throw new UsageError(`--tenant-setting: must be a custom setting name like app.current_tenant_id (got ${JSON.stringify(tenantSetting)})`);
  }

  const tenantColumns = resolveTenantColumns(args.tenantColumns, env.MULTIGRES_TENANT_COLUMNS, file);

  // As for the proxy: a secret file (flag, environment, config) wins over
  // MULTIGRES_CONTEXT_SECRET, which wins over context_secret in the config.
  const secretPath =
    nonEmpty(args.contextSecretFile) ?? nonEmpty(env.MULTIGRES_CONTEXT_SECRET_FILE) ?? nonEmpty(fromFile("context_secret_file"));
  let secret: string | undefined;
  let secretOrigin: string;
  if (secretPath) {
    try {
      secret = (await Bun.file(secretPath).text()).trim();
    } catch (e) {
      throw new UsageError(`${secretPath}: cannot read the context secret file (${(e as Error).message})`);
    }
    secretOrigin = `the context secret file ${secretPath}`;
  } else if (nonEmpty(env.MULTIGRES_CONTEXT_SECRET)) {
    secret = env.MULTIGRES_CONTEXT_SECRET;
    secretOrigin = "MULTIGRES_CONTEXT_SECRET";
  } else {
    secret = nonEmpty(fromFile("context_secret"));
    secretOrigin = `context_secret in ${file?.path}`;
  }
  if (secret !== undefined && secret.length < 32) {
    throw new UsageError(`the context secret (${secretOrigin}) must be at least 32 characters, as the proxy requires`);
  }
  return { databaseUrl, appRole, tenantSetting, tenantColumns, secret };
}

function resolveTenantColumns(
  flag: string[] | undefined,
  env: string | undefined,
  file: { path: string; data: Record<string, unknown> } | undefined,
): string[] {
  let value: unknown = DEFAULT_TENANT_COLUMNS;
  let origin = "--tenant-column";
  if (flag !== undefined) value = flag;
  else if (env) [value, origin] = [env.split(",").map((s) => s.trim()), "MULTIGRES_TENANT_COLUMNS"];
  else if (file?.data.tenant_columns !== undefined) [value, origin] = [file.data.tenant_columns, `${file.path}: tenant_columns`];
  const r = v.safeParse(TenantColumnsSchema, value);
  if (!r.success) throw new UsageError(`${origin}: ${r.issues[0].message} (got ${JSON.stringify(value)})`);
  return [...new Set(r.output)];
}
