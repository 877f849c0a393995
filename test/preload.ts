/**
 * Loaded before every test file (bunfig.toml [test] preload).
 *
 * - Default per-test timeout: bunfig.toml has no working timeout key, so it is
 *   set here. Integration tests boot PostgreSQL, build and spawn the proxy and
 *   run psql/pgbench, which can exceed bun's 5 s default on a slow CI machine.
 *   Individual tests may still pass their own timeout.
 * - Teardown: bun test emits no process "exit" event, so a preload-level
 *   afterAll stops the shared PostgreSQL and kills any proxy a test left
 *   running (it runs once at the end of a serial run, after each file with
 *   --parallel). Importing the harness here starts nothing.
 */
import { afterAll, setDefaultTimeout } from "bun:test";
import { cleanupSync } from "./harness/cleanup.ts";
import { stopSharedPostgres } from "./harness/postgres.ts";

setDefaultTimeout(120_000);

afterAll(async () => {
  await stopSharedPostgres();
  cleanupSync();
});
