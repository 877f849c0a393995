/** Integration test harness: real PostgreSQL, the compiled proxy, real clients. */
export * from "./postgres.ts";
export * from "./proxy.ts";
export * from "./clients.ts";
export * from "./tap.ts";
export { onCleanup, cleanupSync } from "./cleanup.ts";
