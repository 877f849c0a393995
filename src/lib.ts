/**
 * What the npm package `multigres` exports to applications (the proxy
 * itself is the `multigres` command): the tenant token helper, so an app
 * can log a tenant in under `--tenant-auth token` without shelling out.
 *
 *   import { tenantToken } from "multigres";
 *   const password = tenantToken(process.env.MULTIGRES_TOKEN_SECRET!, "app_user", "acme");
 *
 * Depends on node:crypto only, so it runs under Node as well as Bun.
 */
export { tenantToken, type TokenOptions } from "./auth/token.ts";
