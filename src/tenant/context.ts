/**
 * The statements that establish a tenant context on a server connection,
 * and the signature that makes it unforgeable. Pure: values in, protocol
 * messages and verdicts out (proxy/context-round.ts runs them).
 *
 * Two extended-protocol rounds, every value a bind parameter (data, never
 * spliced into SQL, whatever tenant pattern the operator allows):
 *
 *   1. binding, once per server connection: the backend's pid and
 *      multigres.backend_binding() ("<pid>/<backend start in µs>"), and
 *      whether the roles involved could bypass row-level security;
 *   2. context: set_config() of the tenant, of its signature and of the
 *      role (SET ROLE by another name, usable with a parameter), then
 *      multigres.context_status(<key id>), which says whether the database
 *      really accepts the context, and if not, why.
 *
 * The signature is HMAC-SHA256(key, "<tenant>/<pid>/<backend start>"),
 * checked by current_tenant_id() in the database (sql/setup.sql). The pid
 * binds it to one backend, the start time to one lifetime of that pid: a
 * signature read from a log is worthless in any other backend, including a
 * later one that happens to get the same pid.
 */
import { createHash, createHmac } from "node:crypto";
import { concat, extendedQuery } from "../protocol/messages.ts";

/**
 * Round 1. The last column answers: could this session escape row-level
 * security? True when the login role or the assumed role is a superuser,
 * has BYPASSRLS, or is a member of a role that is (a member may SET ROLE to
 * it). The proxy then refuses the session: a tenant context on such a role
 * would be a promise the database does not keep.
 */
const BINDING_SQL =
  "SELECT pg_catalog.pg_backend_pid(), multigres.backend_binding()," +
  " EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE (r.rolsuper OR r.rolbypassrls)" +
  " AND (pg_catalog.pg_has_role(session_user, r.oid, 'MEMBER') OR pg_catalog.pg_has_role($1::name, r.oid, 'MEMBER')))";

/**
 * Round 2, first statement. Schema-qualified so nothing on the search_path
 * can stand in. row_security is set on because a role-level default
 * (`ALTER ROLE … SET row_security = off`, which any session of the role may
 * run) would otherwise fail every tenant's queries; a session-level value
 * outranks it.
 */
const SET_SQL =
  "SELECT pg_catalog.set_config($1, $2, false), pg_catalog.set_config($3, $4, false)," +
  " pg_catalog.set_config('row_security', 'on', false), pg_catalog.set_config('role', $5, false)";
/** Round 2, second statement: 'ok', 'no key', 'no context' or 'invalid signature'. */
const STATUS_SQL = "SELECT multigres.context_status($1)";

/** Where the signature lives: next to the tenant setting. */
export const signatureSetting = (tenantSetting: string) => `${tenantSetting}_sig`;

/**
 * The 32-byte key the database stores, derived from the operator's secret
 * so that the secret itself never needs to leave the proxy's config.
 */
export function deriveContextKey(secret: string): Uint8Array {
  return new Uint8Array(createHmac("sha256", secret).update("multigres context key v1").digest());
}

/**
 * The prefix of a tenant session's LISTEN/NOTIFY channels (guard/channels.ts):
 * `mg<16 hex>:`, the hex being HMAC-SHA256(subkey, tenant) with subkey =
 * HMAC-SHA256(key, "multigres notify channel"). Keyed, so that a tenant who
 * knows its own prefix (pg_listening_channels() shows it) still cannot
 * compute another tenant's, not even with SQL the proxy cannot read; the
 * subkey keeps this use of the context key apart from signing contexts.
 * Sessions prefixed under different keys (proxies with different secrets,
 * or before and after a rotation) do not hear each other.
 */
export function channelPrefix(key: Uint8Array, tenant: string): string {
  const subkey = createHmac("sha256", key).update("multigres notify channel").digest();
  return `mg${createHmac("sha256", subkey).update(tenant).digest("hex").slice(0, 16)}:`;
}

/** The id setup.sql gives a key: the first 12 hex digits of sha256(key). */
export function contextKeyId(key: Uint8Array): string {
  return createHash("sha256").update(key).digest("hex").slice(0, 12);
}

/** @param binding what multigres.backend_binding() returned on that backend */
export function signContext(key: Uint8Array, tenant: string, binding: string): string {
  return createHmac("sha256", key).update(`${tenant}/${binding}`).digest("hex");
}

export function bindingQuery(role: string): Uint8Array {
  return extendedQuery(BINDING_SQL, [role]);
}

export interface Binding {
  pid: number;
  binding: string;
  canBypassRls: boolean;
}

/** The DataRow of round 1. */
export function readBinding(values: readonly (string | null)[]): Binding {
  const [pid, binding, bypass] = values;
  if (pid == null || binding == null || !/^\d+\/\d+$/.test(binding)) throw new Error("unexpected reply to the backend binding query");
  return { pid: Number(pid), binding, canBypassRls: bypass !== "f" };
}

export interface ContextRules {
  tenantSetting: string;
  /** Role to assume; defaults to the role from the user name. */
  role?: string;
}

export function contextQuery(
  rules: ContextRules,
  identity: { role: string; tenant: string },
  key: Uint8Array,
  binding: string,
): Uint8Array {
  const set = extendedQuery(
    SET_SQL,
    [rules.tenantSetting, identity.tenant, signatureSetting(rules.tenantSetting), signContext(key, identity.tenant, binding), rules.role ?? identity.role],
    false,
  );
  return concat([set, statusQuery(key)]);
}

/** multigres.context_status() alone: with no context set, 'no context' means the key is stored. */
export function statusQuery(key: Uint8Array): Uint8Array {
  return extendedQuery(STATUS_SQL, [contextKeyId(key)]);
}

export type ContextStatus = "ok" | "no key" | "no context" | "invalid signature";

export function readStatus(values: readonly (string | null)[]): ContextStatus {
  const s = values[0];
  if (s === "ok" || s === "no key" || s === "no context" || s === "invalid signature") return s;
  throw new Error("unexpected reply to multigres.context_status()");
}
