/**
 * One place that tears down what the harness started (clusters, proxies,
 * scratch files) however the test process ends.
 *
 * bun test emits no process "exit" event, so test/preload.ts runs
 * cleanupAll() in a preload-level afterAll (once per run; once per file with
 * --parallel). The "exit" event and SIGINT/SIGTERM/SIGHUP handlers cover
 * plain `bun script.ts` use and interrupted runs. Processes that die by
 * SIGKILL leave clusters behind; the next boot reaps those (postgres.ts).
 */

const hooks: Array<() => void> = [];

/** Register a synchronous teardown; hooks run in reverse registration order. Returns an unregister function. */
export function onCleanup(fn: () => void): () => void {
  hooks.push(fn);
  return () => {
    const i = hooks.indexOf(fn);
    if (i >= 0) hooks.splice(i, 1);
  };
}

/** Run every registered teardown now (synchronously, errors ignored; hooks are idempotent and stay registered). */
export function cleanupSync(): void {
  for (const fn of [...hooks].reverse()) {
    try {
      fn();
    } catch {
      // best effort: keep tearing down the rest
    }
  }
}

let installed = false;
export function installProcessHooks(): void {
  if (installed) return;
  installed = true;
  process.on("exit", cleanupSync);
  for (const [sig, n] of [["SIGINT", 2], ["SIGTERM", 15], ["SIGHUP", 1]] as const) {
    process.once(sig, () => {
      cleanupSync();
      process.exit(128 + n);
    });
  }
}
installProcessHooks();
