/**
 * The statements that establish a tenant context on a server connection,
 * and the signature that makes it unforgeable.
 *
 * One extended-protocol round (Parse/Bind/Execute/Sync) with every value a
 * bind parameter: data, never spliced into SQL, whatever tenant pattern the
 * operator allows. `set_config('role', …)` is SET ROLE by another name,
 * usable with a parameter. Schema-qualified so a function named set_config
 * elsewhere on the search_path cannot intercept it.
 *
 * The signature is HMAC-SHA256(key, "<tenant>/<backend pid>"), checked by
 * current_tenant_id() in the database (sql/setup.sql). The pid binds it to
 * one server backend, so a signature seen in one session (or a log) cannot
 * be replayed in another.
 */
import { createHash, createHmac } from "node:crypto";
import { extendedQuery } from "../protocol/messages.ts";

/**
 * The last column answers: could this session escape row-level security?
 * True when the login role or the assumed role is a superuser, has
 * BYPASSRLS, or is a member of a role that is (a member may SET ROLE to
 * it). The proxy then refuses the session: a tenant context on such a role
 * would be a promise the database does not keep.
 */
const CONTEXT_SQL =
  "SELECT pg_catalog.set_config($1, $2, false), pg_catalog.set_config($3, $4, false), pg_catalog.set_config('role', $5, false)," +
  " EXISTS (SELECT FROM pg_catalog.pg_roles r WHERE (r.rolsuper OR r.rolbypassrls)" +
  " AND (pg_catalog.pg_has_role(session_user, r.oid, 'MEMBER') OR pg_catalog.pg_has_role($5::name, r.oid, 'MEMBER')))";

/** Where the signature lives: next to the tenant setting. */
export const signatureSetting = (tenantSetting: string) => `${tenantSetting}_sig`;

/**
 * The 32-byte key the database stores, derived from the operator's secret
 * so that the secret itself never needs to leave the proxy's config.
 */
export function deriveContextKey(secret: string): Uint8Array {
  return new Uint8Array(createHmac("sha256", secret).update("multigres context key v1").digest());
}

/** The id setup.sql gives a key: the first 12 hex digits of sha256(key). */
export function contextKeyId(key: Uint8Array): string {
  return createHash("sha256").update(key).digest("hex").slice(0, 12);
}

export function signContext(key: Uint8Array, tenant: string, backendPid: number): string {
  return createHmac("sha256", key).update(`${tenant}/${backendPid}`).digest("hex");
}

export interface ContextRules {
  tenantSetting: string;
  /** Role to assume; defaults to the role from the user name. */
  role?: string;
}

export function contextMessages(
  rules: ContextRules,
  identity: { role: string; tenant: string },
  key: Uint8Array,
  backendPid: number,
): Uint8Array {
  return extendedQuery(CONTEXT_SQL, [
    rules.tenantSetting,
    identity.tenant,
    signatureSetting(rules.tenantSetting),
    signContext(key, identity.tenant, backendPid),
    rules.role ?? identity.role,
  ]);
}
