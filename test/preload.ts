/**
 * Loaded before every test file (bunfig.toml [test] preload).
 *
 * - Default per-test timeout: bunfig.toml has no working timeout key, and
 *   bun applies setDefaultTimeout only to the file that calls it, so this
 *   covers the first file only: every integration file sets its own.
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
