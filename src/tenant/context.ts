/**
 * The statements that establish a tenant context on a server connection.
 *
 * One extended-protocol round (Parse/Bind/Execute/Sync) with the tenant and
 * role as bind parameters: they are data, never spliced into SQL, whatever
 * pattern the operator allows. `set_config('role', …)` is SET ROLE by
 * another name, usable with a parameter. Schema-qualified so a function
 * named set_config elsewhere on the search_path cannot intercept it.
 */
import { extendedQuery } from "../protocol/messages.ts";

const CONTEXT_SQL =
  "SELECT pg_catalog.set_config($1, $2, false), pg_catalog.set_config('role', $3, false)";

export interface ContextRules {
  tenantSetting: string;
  /** Role to assume; defaults to the role from the user name. */
  role?: string;
}

export function contextMessages(rules: ContextRules, identity: { role: string; tenant: string }): Uint8Array {
  return extendedQuery(CONTEXT_SQL, [rules.tenantSetting, identity.tenant, rules.role ?? identity.role]);
}
