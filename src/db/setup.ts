/**
 * `multigres setup`: install or upgrade the database side, harden the app
 * role, store the context key. One transaction, so a failure changes
 * nothing; every change is found by comparing the catalog before and after
 * (or checked before acting), so a second run prints "nothing to change".
 *
 *   1. sql/setup.sql (embedded), with the setting names rewritten when the
 *      proxy uses another --tenant-setting. The multigres objects are
 *      snapshotted (definitions, owners, privileges, schema_version) before
 *      and after, and each difference becomes one line.
 *   2. The app role: created (LOGIN NOSUPERUSER NOBYPASSRLS …) or hardened
 *      attribute by attribute; its memberships that lead to a privileged
 *      role (superuser, BYPASSRLS, CREATEROLE, CREATEDB, REPLICATION, or
 *      pg_read_all_data and the like) are revoked; direct grants on the key
 *      table and add_context_key() are revoked.
 *   3. The context key derived from MULTIGRES_CONTEXT_SECRET (or the config
 *      file's context_secret). With no secret and no key stored yet, a
 *      secret is generated and printed once. --retire-other-keys deletes
 *      every other key (the last step of a rotation).
 *
 *   4. Hardening (db/harden.ts): what one role shared by every tenant would
 *      share between them is taken from PUBLIC and the app role — other
 *      sessions' statements and statistics, large objects, signals, CREATE
 *      on schemas, TRUNCATE/TRIGGER/REFERENCES, role-level settings — item
 *      by item, each skippable with --no-harden <item>.
 *
 *   5. With --upstream-password-file: the app role's password, which the
 *      proxy logs in with (`--auth proxy`). A missing file gets a random
 *      password (written 0600 before the role is changed, so a failed run
 *      loses nothing); an existing one is applied. Sent as a SCRAM verifier
 *      computed here, so the password itself never reaches the server (or
 *      its log); an equal password is no change.
 *
 * The secret is printed only when generated; the key never; passwords never.
 */
import { randomBytes } from "node:crypto";
import { existsSync, writeFileSync } from "node:fs";
import { upstreamPasswordFor } from "../config.ts";
import { buildVerifier, formatVerifier, parseVerifier, passwordMatches } from "../auth/scram.ts";
import { defineCommand } from "citty";
import setupSql from "../../sql/setup.sql" with { type: "text" };
import { ConfigError } from "../config.ts";
import { hardenDatabase, revokeMembership } from "./harden.ts";
import { HARDENING_IDS, MONITORING_ROLES, type HardeningId } from "./hardening.ts";
import { contextKeyId, deriveContextKey, signatureSetting } from "../tenant/context.ts";
import {
  connectAdmin,
  DEFAULT_TENANT_COLUMNS,
  DEFAULT_TENANT_SETTING,
  describeError,
  noHardenItems,
  privilegedMemberships,
  repeatedFlag,
  quoteIdent,
  quoteLiteral,
  resolveCommon,
  SCHEMA_VERSION,
  UsageError,
  type Tx,
} from "./connect.ts";

export interface SetupOptions {
  databaseUrl: string;
  appRole: string;
  tenantSetting?: string;
  /** From MULTIGRES_CONTEXT_SECRET / context_secret; undefined = none set. */
  secret?: string;
  retireOtherKeys?: boolean;
  /** Generate a new secret even though keys are stored (first step of a rotation). */
  generateSecret?: boolean;
  /** Set the app role's password from this file, generating it when the file does not exist. */
  upstreamPasswordFile?: string;
  /** Columns that mark a tenant table [default: tenant_id]. */
  tenantColumns?: string[];
  /** Hardening items to keep as they are (--no-harden). */
  keep?: HardeningId[];
  /** Who gets the read access taken from PUBLIC [default: pg_monitor]. */
  monitoringRole?: string;
}

export interface SetupResult {
  /** One line per change, in the order made. Empty: nothing changed. */
  changes: string[];
  /** Things the operator should know that are not changes (no password set, keys kept, …). */
  notes: string[];
  /** Set when setup generated the secret; shown to the operator once. */
  generatedSecret?: string;
  /** Id of the key the proxy's secret corresponds to, when known. */
  keyId?: string;
}

/** sql/setup.sql for a tenant setting: only the quoted setting names change. */
export function setupSqlFor(tenantSetting: string = DEFAULT_TENANT_SETTING): string {
  if (tenantSetting === DEFAULT_TENANT_SETTING) return setupSql;
  const sig = `'${DEFAULT_TENANT_SETTING}_sig'`;
  const plain = `'${DEFAULT_TENANT_SETTING}'`;
  if (!setupSql.includes(sig) || !setupSql.includes(plain)) {
    throw new Error("sql/setup.sql does not mention the default setting names; cannot rewrite them");
  }
  return setupSql
    .replaceAll(sig, quoteLiteral(signatureSetting(tenantSetting)))
    .replaceAll(plain, quoteLiteral(tenantSetting));
}

/** A new secret: 48 random bytes, base64url (64 characters). */
export function generateSecret(): string {
  return randomBytes(48).toString("base64url");
}

// ---------------------------------------------------------------------------
// catalog snapshot of what setup.sql manages

interface Snapshot {
  schema?: { owner: string; acl: string; comment: string };
  relations: Map<string, { kind: string; owner: string; acl: string; columns: string; constraints: string }>;
  functions: Map<string, { def: string; owner: string; acl: string }>;
  meta: Map<string, string>;
}

async function snapshot(sql: Tx): Promise<Snapshot> {
  const snap: Snapshot = { relations: new Map(), functions: new Map(), meta: new Map() };
  const [schema] = await sql`
    SELECT n.nspowner::regrole::text AS owner, coalesce(n.nspacl::text, '') AS acl,
           coalesce(obj_description(n.oid, 'pg_namespace'), '') AS comment
    FROM pg_catalog.pg_namespace n WHERE n.nspname = 'multigres'`;
  if (schema) snap.schema = schema as Snapshot["schema"] & object;

  const rels = await sql`
    SELECT c.oid::regclass::text AS name, c.relkind::text AS kind, c.relowner::regrole::text AS owner,
           coalesce(c.relacl::text, '') AS acl,
           coalesce((SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                       || coalesce(' acl=' || a.attacl::text, ''), ', ' ORDER BY a.attnum)
                     FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '') AS columns,
           coalesce((SELECT string_agg(pg_get_constraintdef(k.oid), ', ' ORDER BY k.conname)
                     FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid), '') AS constraints
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'multigres' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')`;
  for (const r of rels) snap.relations.set(r.name, r as never);

  const fns = await sql`
    SELECT p.oid::regprocedure::text AS name, pg_get_functiondef(p.oid) AS def,
           p.proowner::regrole::text AS owner, coalesce(p.proacl::text, '') AS acl
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
    WHERE p.prokind = 'f'
      AND (n.nspname = 'multigres' OR (n.nspname = 'public' AND p.proname = 'current_tenant_id'))`;
  for (const f of fns) snap.functions.set(f.name, f as never);

  const [hasMeta] = await sql`SELECT to_regclass('multigres.meta') IS NOT NULL AS yes`;
  if (hasMeta?.yes) {
    for (const row of await sql`SELECT key, value FROM multigres.meta`) snap.meta.set(row.key, row.value);
  }
  return snap;
}

const KIND: Record<string, string> = { r: "table", p: "table", v: "view", m: "materialized view", S: "sequence", f: "foreign table" };

function diffSnapshots(before: Snapshot, after: Snapshot): string[] {
  const out: string[] = [];
  if (!before.schema && after.schema) out.push("created schema multigres");
  else if (before.schema && after.schema) {
    if (before.schema.acl !== after.schema.acl) out.push("changed privileges on schema multigres");
    if (before.schema.comment !== after.schema.comment) out.push("updated comment on schema multigres");
    if (before.schema.owner !== after.schema.owner) out.push("changed owner of schema multigres");
  }
  for (const [name, a] of after.relations) {
    const b = before.relations.get(name);
    const kind = KIND[a.kind] ?? "relation";
    if (!b) {
      out.push(`created ${kind} ${name}`);
      continue;
    }
    if (b.columns !== a.columns || b.constraints !== a.constraints) out.push(`altered ${kind} ${name}`);
    if (b.acl !== a.acl) out.push(`changed privileges on ${kind} ${name}`);
    if (b.owner !== a.owner) out.push(`changed owner of ${kind} ${name}`);
  }
  for (const name of before.relations.keys()) {
    if (!after.relations.has(name)) out.push(`dropped ${name}`);
  }
  for (const [name, a] of after.functions) {
    const b = before.functions.get(name);
    if (!b) {
      out.push(`created function ${name}`);
      continue;
    }
    if (b.def !== a.def) out.push(`updated function ${name}`);
    if (b.acl !== a.acl) out.push(`changed privileges on function ${name}`);
    if (b.owner !== a.owner) out.push(`changed owner of function ${name}`);
  }
  for (const [key, value] of after.meta) {
    const was = before.meta.get(key);
    if (was === undefined) out.push(`set ${key} ${value}`);
    else if (was !== value) out.push(`set ${key} ${value} (was ${was})`);
  }
  return out;
}

// ---------------------------------------------------------------------------

interface RoleRow {
  oid: number;
  rolname: string;
  rolsuper: boolean;
  rolbypassrls: boolean;
  rolcreaterole: boolean;
  rolcreatedb: boolean;
  rolreplication: boolean;
  rolcanlogin: boolean;
}

/** The attributes setup enforces on the app role: [pg_roles column, wanted value, keyword]. */
const ROLE_ATTRIBUTES = [
  ["rolsuper", false, "NOSUPERUSER"],
  ["rolbypassrls", false, "NOBYPASSRLS"],
  ["rolcreaterole", false, "NOCREATEROLE"],
  ["rolcreatedb", false, "NOCREATEDB"],
  ["rolreplication", false, "NOREPLICATION"],
  ["rolcanlogin", true, "LOGIN"],
] as const;

/** Create the app role or fix its attributes and memberships; returns its oid. */
async function hardenRole(tx: Tx, appRole: string, changes: string[], notes: string[], passwordComing: boolean): Promise<number> {
  const role = quoteIdent(appRole);
  const [me] = await tx`SELECT current_user AS name`;
  if (me?.name === appRole) {
    throw new UsageError(`--app-role ${appRole} is the role this connection logs in as; connect as an administrator instead`);
  }
  const rows = await tx`
    SELECT oid::int AS oid, rolname, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication, rolcanlogin
    FROM pg_catalog.pg_roles WHERE rolname = ${appRole}`;
  let r = rows[0] as RoleRow | undefined;
  if (!r) {
    await tx.unsafe(`CREATE ROLE ${role} ${ROLE_ATTRIBUTES.map(([, , kw]) => kw).join(" ")}`);
    changes.push(`created role ${appRole} (${ROLE_ATTRIBUTES.map(([, , kw]) => kw).join(" ")})`);
    if (!passwordComing) notes.push(`role ${appRole} has no password yet: use --upstream-password-file FILE (or ALTER ROLE ${role} PASSWORD '…', stored as SCRAM)`);
    const [created] = await tx`SELECT oid::int AS oid FROM pg_catalog.pg_roles WHERE rolname = ${appRole}`;
    return created!.oid as number;
  }
  for (const [column, wanted, keyword] of ROLE_ATTRIBUTES) {
    if (r[column] !== wanted) {
      await tx.unsafe(`ALTER ROLE ${role} ${keyword}`);
      changes.push(`${appRole}: set ${keyword}`);
    }
  }

  // Memberships (direct or through other roles) that reach a privileged role:
  // revoke the app role's direct membership at the head of each path.
  const byVia = new Map<string, string[]>();
  for (const p of await privilegedMemberships(tx, r.oid)) {
    const why = p.via === p.role ? p.reasons.join(", ") : `through it: ${p.path} (${p.reasons.join(", ")})`;
    byVia.set(p.via, [...(byVia.get(p.via) ?? []), why]);
  }
  for (const [via, why] of byVia) {
    await revokeMembership(tx, appRole, r.oid, via);
    changes.push(`${appRole}: revoked membership in ${via} (${why.join("; ")})`);
  }

  // Direct grants that would let the app role read the keys or add its own.
  const [keyGrants] = await tx.unsafe(
    `SELECT
       EXISTS (SELECT 1 FROM pg_catalog.pg_class c, aclexplode(c.relacl) a
               WHERE c.oid = 'multigres.context_keys'::regclass AND a.grantee = $1::oid)
       OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute t, aclexplode(t.attacl) a
               WHERE t.attrelid = 'multigres.context_keys'::regclass AND a.grantee = $1::oid) AS on_table,
       EXISTS (SELECT 1 FROM pg_catalog.pg_proc p, aclexplode(p.proacl) a
               WHERE p.oid = 'multigres.add_context_key(bytea)'::regprocedure AND a.grantee = $1::oid) AS on_function`,
    [r.oid],
  );
  if (keyGrants?.on_table) {
    await tx.unsafe(`REVOKE ALL ON TABLE multigres.context_keys FROM ${role}`);
    changes.push(`${appRole}: revoked its privileges on multigres.context_keys`);
  }
  if (keyGrants?.on_function) {
    await tx.unsafe(`REVOKE ALL ON FUNCTION multigres.add_context_key(bytea) FROM ${role}`);
    changes.push(`${appRole}: revoked EXECUTE on multigres.add_context_key(bytea)`);
  }
  return r.oid;
}

/** Run setup against the database; throws on failure (nothing is changed then). */
export async function runSetup(opts: SetupOptions): Promise<SetupResult> {
  const tenantSetting = opts.tenantSetting ?? DEFAULT_TENANT_SETTING;
  const script = setupSqlFor(tenantSetting);
  const changes: string[] = [];
  const notes: string[] = [];
  const result: SetupResult = { changes, notes };

  const sql = connectAdmin(opts.databaseUrl, "multigres setup");
  try {
    await sql.begin(async (tx) => {
      // Two setups at once would race on CREATE … IF NOT EXISTS.
      await tx`SELECT pg_advisory_xact_lock(hashtext('multigres setup'))`;
      // Only the catalog resolves unqualified names (nothing a less
      // privileged role planted elsewhere), and names print schema-qualified.
      await tx`SET LOCAL search_path = pg_catalog, pg_temp`;

      const before = await snapshot(tx);
      const installed = Number(before.meta.get("schema_version") ?? 0);
      if (installed > SCHEMA_VERSION) {
        throw new UsageError(
          `the database has multigres schema version ${installed}, newer than this binary's ${SCHEMA_VERSION}: use a newer multigres`,
        );
      }
      await tx.unsafe(script); // several statements: simple protocol
      const after = await snapshot(tx);
      changes.push(...diffSnapshots(before, after));

      const appOid = await hardenRole(tx, opts.appRole, changes, notes, opts.upstreamPasswordFile !== undefined);
      if (opts.upstreamPasswordFile) await setUpstreamPassword(tx, opts.appRole, opts.upstreamPasswordFile, changes);
      await storeKey(tx, opts, result);
      await hardenDatabase(
        tx,
        {
          appRole: opts.appRole,
          appOid,
          tenantColumns: opts.tenantColumns ?? DEFAULT_TENANT_COLUMNS,
          keep: new Set(opts.keep ?? []),
          monitoringRole: opts.monitoringRole ?? MONITORING_ROLES.read,
        },
        result,
      );
      // A run that changes nothing writes nothing either: CREATE OR REPLACE
      // rewrites catalog rows even when they come out the same.
      if (changes.length === 0) throw NOTHING_CHANGED;
    });
  } catch (e) {
    if (e !== NOTHING_CHANGED) throw e;
  } finally {
    await sql.end({ timeout: 5 }).catch(() => {});
  }
  return result;
}

const NOTHING_CHANGED = Symbol("nothing changed");

/** The proxy's upstream password for the app role: from the file, or generated into it. */
async function setUpstreamPassword(tx: Tx, appRole: string, file: string, changes: string[]): Promise<void> {
  let password: string | undefined;
  let generated = false;
  if (existsSync(file)) {
    password = upstreamPasswordFor({ upstreamPassword: (await Bun.file(file).text()).replace(/\r?\n$/, "") }, appRole);
    if (!password) throw new UsageError(`${file} has no password for role ${appRole} (a single line, or a "${appRole}" "password" line)`);
  } else {
    password = randomBytes(32).toString("base64url");
    writeFileSync(file, `${password}\n`, { mode: 0o600, flag: "wx" });
    generated = true;
  }
  const [row] = await tx`SELECT rolpassword FROM pg_catalog.pg_authid WHERE rolname = ${appRole}`;
  const current = typeof row?.rolpassword === "string" ? parseVerifier(row.rolpassword) : undefined;
  if (current && (await passwordMatches(password, current))) return;
  // A verifier, not the password: nothing secret in the statement or the server log.
  await tx.unsafe(`ALTER ROLE ${quoteIdent(appRole)} PASSWORD ${quoteLiteral(formatVerifier(buildVerifier(password)))}`);
  changes.push(
    generated
      ? `${appRole}: generated a random password, wrote it to ${file} (mode 0600), and set it: give the file to the proxy as --upstream-password-file`
      : `${appRole}: set the password from ${file} (the proxy's --upstream-password-file)`,
  );
}

/** Store the key of the secret (generating one when none is set and none is stored); retire others on request. */
async function storeKey(tx: Tx, opts: SetupOptions, result: SetupResult): Promise<void> {
  const { changes, notes } = result;
  const stored = (await tx`SELECT key_id FROM multigres.context_keys ORDER BY created_at, key_id`).map((k) => k.key_id as string);
  let secret = opts.secret;
  if (secret === undefined && (stored.length === 0 || opts.generateSecret)) {
    secret = result.generatedSecret = generateSecret();
  }
  if (secret === undefined) {
    if (opts.retireOtherKeys) {
      throw new UsageError("--retire-other-keys needs the current secret (MULTIGRES_CONTEXT_SECRET or context_secret) to know which key to keep");
    }
    notes.push(
      `no context secret given (MULTIGRES_CONTEXT_SECRET): kept the stored context key${stored.length > 1 ? "s" : ""} ${stored.join(", ")}`,
    );
    return;
  }
  const key = deriveContextKey(secret);
  const id = contextKeyId(key);
  result.keyId = id;
  if (!stored.includes(id)) {
    const [added] = await tx`SELECT multigres.add_context_key(${Buffer.from(key)}) AS id`;
    if (added?.id !== id) throw new Error(`multigres.add_context_key returned ${added?.id}, expected ${id}`);
    changes.push(`stored context key ${id}${result.generatedSecret ? " (for the generated secret below)" : ""}`);
  }
  if (opts.retireOtherKeys) {
    const retired = await tx`DELETE FROM multigres.context_keys WHERE key_id <> ${id} RETURNING key_id`;
    for (const k of retired.map((x) => x.key_id as string).sort()) changes.push(`retired context key ${k}`);
  } else if (stored.some((k) => k !== id)) {
    notes.push(
      `other context keys stay valid: ${stored.filter((k) => k !== id).join(", ")} (once every proxy uses the new secret, run setup again with --retire-other-keys)`,
    );
  }
}

// ---------------------------------------------------------------------------

function printResult(r: SetupResult): void {
  const out: string[] = [...r.changes];
  if (r.changes.length === 0) out.push("nothing to change");
  for (const n of r.notes) out.push(`note: ${n}`);
  if (r.generatedSecret) {
    out.push(
      "",
      "Generated a new context secret. It is shown only this once and is not stored anywhere:",
      "",
      `  MULTIGRES_CONTEXT_SECRET=${r.generatedSecret}`,
      "",
      "Give it to every proxy: MULTIGRES_CONTEXT_SECRET in its environment, or a file named by",
      "--context-secret-file, or context_secret in its config file. Keep it secret: whoever has",
      "it can sign any tenant.",
    );
  }
  process.stdout.write(out.join("\n") + "\n");
}

export const setupCommand = defineCommand({
  meta: {
    name: "setup",
    description:
      "Install or upgrade multigres in a database (idempotent), harden the app role and store the context key from MULTIGRES_CONTEXT_SECRET",
  },
  args: {
    "database-url": { type: "string", description: "Admin (superuser) connection string [env: MULTIGRES_DATABASE_URL]", valueHint: "URL" },
    "app-role": { type: "string", description: "The role tenant connections use (created or hardened)", valueHint: "NAME" },
    "tenant-setting": {
      type: "string",
      description: `Setting that carries the tenant id, as the proxy's --tenant-setting [default: ${DEFAULT_TENANT_SETTING}]`,
      valueHint: "NAME",
    },
    config: { type: "string", description: "TOML config file (context_secret, context_secret_file, tenant_setting)", valueHint: "FILE" },
    "context-secret-file": {
      type: "string",
      description: "File holding the context secret (else MULTIGRES_CONTEXT_SECRET) [env: MULTIGRES_CONTEXT_SECRET_FILE]",
      valueHint: "FILE",
    },
    "retire-other-keys": { type: "boolean", description: "Delete every stored context key except the current secret's (last step of a rotation)" },
    "generate-secret": { type: "boolean", description: "Generate a new secret and store its key even though keys exist (first step of a rotation)" },
    "upstream-password-file": {
      type: "string",
      description: "Set the app role's password (the proxy's upstream credential) from FILE, generating a random one into FILE when it does not exist",
      valueHint: "FILE",
    },
    // Read from the raw arguments (citty keeps one value per flag, and reads --no-x as "not x"); here for --help.
    "tenant-column": {
      type: "string",
      description: "Column that marks a tenant table, for TRUNCATE/TRIGGER/REFERENCES (repeatable, or a comma list) [default: tenant_id]",
      valueHint: "NAME",
    },
    "no-harden": {
      type: "string",
      description: `Keep one hardening item as it is (repeatable, or a comma list): ${HARDENING_IDS.join(", ")}`,
      valueHint: "ITEM",
    },
    "monitoring-role": {
      type: "string",
      description: `Role given the statistics and activity views taken from PUBLIC [default: ${MONITORING_ROLES.read}]`,
      valueHint: "NAME",
    },
  },
  async run({ args, rawArgs }) {
    let result: SetupResult;
    try {
      const c = await resolveCommon({
        databaseUrl: args["database-url"] as string | undefined,
        appRole: args["app-role"] as string | undefined,
        tenantSetting: args["tenant-setting"] as string | undefined,
        tenantColumns: repeatedFlag(rawArgs, "tenant-column"),
        config: args.config as string | undefined,
        contextSecretFile: args["context-secret-file"] as string | undefined,
      });
      if (args["generate-secret"] && c.secret !== undefined) {
        throw new UsageError("--generate-secret: a secret is already configured (MULTIGRES_CONTEXT_SECRET, a secret file or context_secret); unset it first");
      }
      result = await runSetup({
        databaseUrl: c.databaseUrl,
        appRole: c.appRole,
        tenantSetting: c.tenantSetting,
        secret: c.secret,
        retireOtherKeys: Boolean(args["retire-other-keys"]),
        generateSecret: Boolean(args["generate-secret"]),
        upstreamPasswordFile: args["upstream-password-file"] as string | undefined,
        tenantColumns: c.tenantColumns,
        keep: noHardenItems(rawArgs),
        monitoringRole: (args["monitoring-role"] as string | undefined) || undefined,
      });
    } catch (e) {
      if (e instanceof UsageError || e instanceof ConfigError) {
        process.stderr.write(`multigres setup: ${e.message}\n`);
        process.exit(2);
      }
      process.stderr.write(`multigres setup failed, nothing was changed: ${describeError(e)}\n`);
      process.exit(1);
    }
    printResult(result);
  },
});
