/**
 * Fault tests: the compiled proxy in front of real PostgreSQL while things
 * break around it. Everything runs on loopback, every wait is a bounded poll
 * of something observable (a message, a close, pg_stat_activity, the proxy's
 * fd table), and every process and socket started here is stopped here.
 *
 * The file boots a PostgreSQL cluster of its own (fault-helpers.ts
 * bootCluster) rather than using the harness's shared one: it stops and
 * restarts its upstream, and it needs more connections than the shared
 * cluster allows; other test files must not notice either.
 *
 * Faults injected, and what the client must see:
 * 1. The upstream restarted (pg_ctl stop -m fast, start) under live
 *    postgres.js and raw clients, busy and idle: each gets the server's
 *    ErrorResponse 57P01 and a close (no hang); while it is down a new
 *    connection gets 08006; once it is back new connections (and the
 *    postgres.js clients, reconnecting) work; the proxy lives; and its fd
 *    count returns to the baseline once the clients are gone. Also the
 *    server leg of a single session dying mid-query (a relay killed): that
 *    client's connection is closed, the others are untouched.
 * 2. Upstream unreachable (closed port), refusing (accepts and closes),
 *    silent (accepts, reads, never answers; --startup-timeout 500) and
 *    black-holed (the TCP connect never completes; --connect-timeout 500):
 *    08006 with a message saying which, for a burst of clients at once, the
 *    proxy staying up and answering the next attempt the same way, and no
 *    socket left behind on either side.
 * 3. A client vanishing mid-query (FIN without Terminate, RST, psql killed
 *    with SIGKILL), mid-COPY (raw and psql), and inside an open transaction:
 *    the server backend stops running the statement and goes away, and
 *    nothing partial is committed.
 * 4. Slow-loris: 200 connections at a time that send half a startup packet
 *    (or nothing) and stall, replaced as the proxy drops them, against
 *    --startup-timeout 2000: each gets 08006 and a close, while normal
 *    clients connect and query throughout.
 * 5. 2,000 concurrent client connections to one proxy: FULL_SESSIONS of
 *    them full tenant sessions (each with its own server backend, each
 *    running a query and seeing its own tenant), the rest held open in the
 *    startup phase and answered (28000) once they finish it. See the test
 *    for why not 2,000 full sessions by default.
 */
import { afterAll, afterEach, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import { createConnection, type Socket } from "node:net";
import {
  APP_USER,
  connect,
  connectError,
  freePort,
  libpqEnv,
  PASSWORDS,
  pgTool,
  startProxy,
  TRUST_USER,
  type Client,
  type ProxyHandle,
} from "../harness/index.ts";
import {
  blackholeListener,
  bootCluster,
  copyDataMessage,
  ensureFdLimit,
  fakeUpstream,
  fdCount,
  fdSummary,
  pendingConnectsTo,
  poll,
  queryMessage,
  RawPg,
  startRelay,
  startupPacket,
  terminateMessage,
  type Cluster,
  type FakeUpstream,
  type Relay,
} from "./fault-helpers.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

/** Total concurrent connections in the 2,000-connection test. */
const TOTAL_CONNECTIONS = 2_000;
/**
 * How many of them are full sessions with a server backend each. 2,000 full
 * sessions works (the cluster is sized for it) but costs minutes on a small
 * shared box: set FAULTS_FULL_SESSIONS=2000 to run it that way.
 */
const FULL_SESSIONS = Math.min(TOTAL_CONNECTIONS, Math.max(1, Number(process.env.FAULTS_FULL_SESSIONS ?? 400)));

let cluster: Cluster;
const proxies: ProxyHandle[] = [];
const closers: Array<() => unknown> = [];

beforeAll(async () => {
  ensureFdLimit(TOTAL_CONNECTIONS * 3 + 1_000);
  cluster = await bootCluster({ maxConnections: FULL_SESSIONS + 100 });
  await cluster.sql.unsafe(`
    CREATE TABLE copy_sink (n int NOT NULL, note text NOT NULL);
    GRANT SELECT, INSERT ON copy_sink TO ${TRUST_USER}, ${APP_USER};
  `);
}, 180_000);

afterAll(async () => {
  for (const c of closers.splice(0).reverse()) {
    try {
      await c();
    } catch {
      // best effort
    }
  }
  await Promise.all(proxies.splice(0).map((p) => p.stop("SIGTERM", 5_000).catch(() => {})));
  await cluster?.destroy();
}, 60_000);

// ------------------------------------------------------------------ helpers

async function proxyFor(upstreamPort: number, args: string[] = []): Promise<ProxyHandle> {
  const p = await startProxy({ upstreamPort, database: cluster?.database ?? "faults", args });
  proxies.push(p);
  return p;
}

function assertAlive(p: ProxyHandle): void {
  if (p.proc.exitCode !== null || p.proc.signalCode !== null) {
    throw new Error(`the proxy died (exit ${p.proc.exitCode}, signal ${p.proc.signalCode}); its output:\n${p.logs().slice(-6000)}`);
  }
}

const count = (s: string, needle: string) => s.split(needle).length - 1;

/** Wait until the proxy has logged `n` closed connections in total. */
function closedLogged(p: ProxyHandle, n: number, timeoutMs = 20_000): Promise<unknown> {
  return poll(() => count(p.logs(), "connection closed") >= n, `${n} "connection closed" lines in the proxy log`, {
    timeoutMs,
    detail: () => `saw ${count(p.logs(), "connection closed")}; log tail:\n${p.logs().slice(-3000)}`,
  });
}

/** Wait for the proxy's fd count to come back down to `baseline`. */
function fdsBackTo(p: ProxyHandle, baseline: number, timeoutMs = 20_000, more?: () => string): Promise<unknown> {
  return poll(() => fdCount(p.pid) <= baseline, `the proxy's open fds to return to the baseline of ${baseline}`, {
    timeoutMs,
    detail: () => `now ${fdCount(p.pid)}: ${fdSummary(p.pid)}${more ? `; ${more()}` : ""}`,
  });
}

const trustUser = (tenant: string) => `${TRUST_USER}.${tenant}`;
const appUrl = (p: ProxyHandle, tenant: string, appName: string) =>
  p.url({ user: `${APP_USER}.${tenant}`, password: PASSWORDS[APP_USER], params: { application_name: appName } });

/** Open a raw client and finish startup as trust_user.<tenant>. */
async function rawSession(p: ProxyHandle, tenant: string, label: string, extra: Record<string, string> = {}): Promise<RawPg> {
  const r = await RawPg.open(p.port, label);
  closers.push(() => r.destroy());
  await r.startup({ user: trustUser(tenant), database: cluster.database, ...extra });
  return r;
}

interface Backend {
  pid: number;
  state: string | null;
  query: string;
  application_name: string;
}

/** Server backends (other than the admin's own) whose current query contains `marker`. */
async function backendsRunning(marker: string): Promise<Backend[]> {
  return (await cluster.sql`
    SELECT pid, state, query, application_name FROM pg_stat_activity
    WHERE pid <> pg_backend_pid() AND query LIKE ${"%" + marker + "%"}
  `) as unknown as Backend[];
}

async function backendAlive(pid: number): Promise<Backend | undefined> {
  const rows = (await cluster.sql`
    SELECT pid, state, query, application_name FROM pg_stat_activity WHERE pid = ${pid}
  `) as unknown as Backend[];
  return rows[0];
}

/** Wait for exactly one backend to be active running the statement tagged `marker`; returns it. */
async function activeBackend(marker: string, timeoutMs = 20_000): Promise<Backend> {
  let last: Backend[] = [];
  await poll(
    async () => {
      last = await backendsRunning(marker);
      return last.length === 1 && last[0]!.state === "active";
    },
    `a backend active with ${marker}`,
    { timeoutMs, detail: () => JSON.stringify(last) },
  );
  return last[0]!;
}

/** Wait for a backend to exit (gone from pg_stat_activity). */
async function backendGone(pid: number, what: string, timeoutMs = 20_000): Promise<void> {
  let last: Backend | undefined;
  await poll(
    async () => {
      last = await backendAlive(pid);
      return last === undefined;
    },
    `backend ${pid} (${what}) to exit`,
    { timeoutMs, detail: () => `still there: ${JSON.stringify(last)}` },
  );
}

/** count(*) of copy_sink rows carrying `note`. */
async function sinkRows(note: string): Promise<number> {
  const rows = (await cluster.sql`SELECT count(*)::int AS n FROM copy_sink WHERE note = ${note}`) as unknown as { n: number }[];
  return rows[0]!.n;
}

/** Backends whose application_name is `app`. */
async function backendsNamed(app: string): Promise<number> {
  const rows = (await cluster.sql`SELECT count(*)::int AS n FROM pg_stat_activity WHERE application_name = ${app}`) as unknown as { n: number }[];
  return rows[0]!.n;
}

const marker = (what: string) => `fault_${what}_${Math.random().toString(36).slice(2, 10)}`;

interface PgJsError {
  code?: string;
  message?: string;
}

async function settle<T>(p: Promise<T>): Promise<{ ok: true; value: T } | { ok: false; error: PgJsError }> {
  try {
    return { ok: true, value: await p };
  } catch (e) {
    return { ok: false, error: e as PgJsError };
  }
}

// ============================================================ 1. restarts

describe("upstream restarted or lost under live clients", () => {
  let restartPending = false;
  afterEach(async () => {
    if (restartPending) await cluster.startServer();
    restartPending = false;
  });

  test("busy and idle clients get 57P01, new ones 08006 while down, all work once it is back, no fd leak", async () => {
    const p = await proxyFor(cluster.port);

    // Baseline after one session has come and gone, so that whatever the
    // runtime opens lazily on first use is already counted.
    const warm = connect(appUrl(p, "warmup", "faults-warmup"));
    expect((await warm`SELECT current_tenant_id() AS t`)[0]?.t).toBe("warmup");
    await warm.end({ timeout: 5 });
    await closedLogged(p, 1);
    const baseline = fdCount(p.pid);

    const tag = marker("restart");
    const pgjs: Client[] = [];
    const open = (name: string) => {
      const c = connect(appUrl(p, `tenant_${name}`, `${tag}_${name}`), { idle_timeout: 0 });
      pgjs.push(c);
      closers.push(() => c.end({ timeout: 1 }));
      return c;
    };

    // postgres.js: three with a query in flight, three idle after a query.
    const busy = ["busy1", "busy2", "busy3"].map((n) => ({ name: n, sql: open(n) }));
    const idle = ["idle1", "idle2", "idle3"].map((n) => ({ name: n, sql: open(n) }));
    for (const c of idle) expect((await c.sql`SELECT current_tenant_id() AS t`)[0]?.t).toBe(`tenant_${c.name}`);
    const inFlight = busy.map((c) => settle(c.sql.unsafe(`SELECT pg_sleep(60) /* ${tag} */`)));

    // Raw clients: one busy, two idle, to see the exact bytes.
    const rawIdle = [await rawSession(p, "raw_idle1", "raw idle 1"), await rawSession(p, "raw_idle2", "raw idle 2")];
    const rawBusy = await rawSession(p, "raw_busy", "raw busy");
    await rawBusy.send(queryMessage(`SELECT pg_sleep(60) /* ${tag} */`));

    await poll(
      async () => (await backendsRunning(tag)).filter((b) => b.state === "active").length === 4,
      "the four pg_sleep queries to be running",
      { detail: async () => JSON.stringify(await backendsRunning(tag)) },
    );

    // Whatever fails below, the cluster comes back for the tests after this one.
    restartPending = true;
    await cluster.stopServer("fast");

    // Busy postgres.js clients: the query fails with an error, not a hang.
    // postgres.js reports the server's FATAL 57P01 as CONNECTION_CLOSED when
    // the close lands with it (it does so on a direct connection too); the
    // raw clients below see the exact bytes the proxy relays.
    for (const [i, r] of (await Promise.all(inFlight)).entries()) {
      expect(r.ok, `busy client ${busy[i]!.name} should have failed`).toBe(false);
      if (!r.ok) expect(["57P01", "CONNECTION_CLOSED", "ECONNRESET"]).toContain(r.error.code ?? String(r.error.message));
    }
    // Raw clients, busy and idle: ErrorResponse 57P01, then the close.
    for (const r of [rawBusy, ...rawIdle]) {
      const f = await r.finalError("the upstream shutting down");
      expect({ client: r.label, code: f?.C }).toEqual({ client: r.label, code: "57P01" });
    }

    // While it is down: a new connection is refused cleanly.
    const down = await connectError(appUrl(p, "tenant_down", "faults-down"));
    expect(down.code).toBe("08006");
    expect(down.message).toContain(`could not connect to the upstream server at 127.0.0.1:${cluster.port}`);
    assertAlive(p);

    await cluster.startServer();
    restartPending = false;

    // Back: new connections work, and the idle postgres.js clients reconnect.
    const fresh = connect(appUrl(p, "tenant_fresh", "faults-fresh"));
    pgjs.push(fresh);
    expect((await fresh`SELECT current_tenant_id() AS t`)[0]?.t).toBe("tenant_fresh");
    for (const c of idle) {
      expect((await c.sql`SELECT current_tenant_id() AS t`)[0]?.t).toBe(`tenant_${c.name}`);
    }
    // postgres.js 3.4.9 keeps the 57P01 of a query that died with its
    // connection and fails the first query after reconnecting with it (the
    // same happens on a direct connection): allow that one stale error.
    for (const c of busy) {
      const first = await settle(c.sql`SELECT current_tenant_id() AS t`);
      if (!first.ok) expect(first.error.code).toBe("57P01");
      const rows = first.ok ? first.value : await c.sql`SELECT current_tenant_id() AS t`;
      expect(rows[0]?.t).toBe(`tenant_${c.name}`);
    }
    const rawAfter = await rawSession(p, "raw_after", "raw after");
    expect(await rawAfter.query("SELECT current_tenant_id()")).toEqual([["raw_after"]]);
    await rawAfter.send(terminateMessage());
    await rawAfter.waitClosed();
    assertAlive(p);

    // Every client gone: the proxy's fds are back where they started.
    await Promise.all(pgjs.map((c) => c.end({ timeout: 5 })));
    for (const r of [rawBusy, ...rawIdle, rawAfter]) r.destroy();
    await fdsBackTo(p, baseline);
    assertAlive(p);
  }, 120_000);

  for (const how of ["dropped by the network", "terminated by the server"] as const) {
    test(`the server leg of one session is ${how} mid-query: that client is closed, the query stops, the others carry on`, async () => {
      const relay: Relay = await startRelay(cluster.port);
      closers.push(() => relay.stop());
      const p = await proxyFor(relay.port);
      const tag = marker("leg");

      const victim = await rawSession(p, "victim", "victim", { application_name: tag });
      const bystander = connect(appUrl(p, "bystander", "faults-bystander"));
      closers.push(() => bystander.end({ timeout: 1 }));
      expect((await bystander`SELECT current_tenant_id() AS t`)[0]?.t).toBe("bystander");

      await victim.send(queryMessage(`SELECT pg_sleep(60) /* ${tag} */`));
      const b = await activeBackend(tag);
      if (how === "dropped by the network") {
        expect(relay.drop(tag)).toBe(1);
      } else {
        await cluster.sql`SELECT pg_terminate_backend(${b.pid})`;
      }

      // The victim sees the server's own FATAL when there was one, and a
      // close either way: no hang.
      const f = await victim.finalError("its server leg ending");
      expect(f?.C ?? null).toBe(how === "terminated by the server" ? "57P01" : null);
      await victim.waitClosed("the proxy to close the victim's connection");
      victim.destroy();
      // The backend does not go on sleeping for nobody.
      await backendGone(b.pid, `running pg_sleep after its server leg was ${how}`);
      // The bystander is untouched.
      expect((await bystander`SELECT current_tenant_id() AS t`)[0]?.t).toBe("bystander");
      assertAlive(p);
    }, 60_000);
  }
});

// ============================================== 2. broken upstream servers

describe("upstream unreachable, refusing, silent, black-holed", () => {
  /** One raw client's startup answered with 08006 and a close; returns the message. */
  async function expect08006(p: ProxyHandle, label: string): Promise<string> {
    const r = await RawPg.open(p.port, label);
    try {
      await r.send(startupPacket({ user: trustUser("tenant_a"), database: "faults" }));
      await r.logIn(trustUser("tenant_a")); // the proxy authenticates the client before it goes upstream
      const f = await r.expectError("an unusable upstream", 30_000);
      expect({ label, code: f.C, severity: f.S }).toEqual({ label, code: "08006", severity: "FATAL" });
      return f.M ?? "";
    } finally {
      r.destroy();
    }
  }

  /**
   * The common script: one client (the baseline is taken after it), then a
   * burst of 20 at once, postgres.js, and one more; every answer matching
   * `expected`; the proxy alive and its fds back to the baseline.
   */
  async function refusedThroughout(
    p: ProxyHandle,
    expected: RegExp,
    afterEach?: () => Promise<unknown>,
    more?: () => string,
  ): Promise<void> {
    expect(await expect08006(p, "first")).toMatch(expected);
    await closedLogged(p, 1);
    await afterEach?.();
    const baseline = fdCount(p.pid);

    const burst = await Promise.all(Array.from({ length: 20 }, (_, i) => expect08006(p, `burst ${i}`)));
    for (const m of burst) expect(m).toMatch(expected);

    const e = await connectError(p.url({ user: trustUser("tenant_a"), password: PASSWORDS[TRUST_USER] }), { connect_timeout: 30 });
    expect(e.code).toBe("08006");
    expect(e.message).toMatch(expected);
    assertAlive(p);

    expect(await expect08006(p, "next")).toMatch(expected);
    assertAlive(p);
    await closedLogged(p, 23);
    await afterEach?.();
    await fdsBackTo(p, baseline, 20_000, more);
  }

  test("closed port → 08006 could not connect", async () => {
    const port = await freePort();
    const p = await proxyFor(port);
    await refusedThroughout(p, new RegExp(`^could not connect to the upstream server at 127\\.0\\.0\\.1:${port}: `));
  }, 60_000);

  test("accepts and closes at once → 08006", async () => {
    const up: FakeUpstream = await fakeUpstream("refuse");
    closers.push(() => up.stop());
    const p = await proxyFor(up.port);
    await refusedThroughout(
      p,
      /^(the upstream server closed the connection during startup|could not connect to the upstream server at 127\.0\.0\.1:\d+: .+)$/,
    );
    expect(up.accepted).toBeGreaterThanOrEqual(23);
  }, 60_000);

  test("accepts and never answers → 08006 at the startup deadline, upstream sockets closed", async () => {
    const up = await fakeUpstream("silent");
    closers.push(() => up.stop());
    const p = await proxyFor(up.port, ["--startup-timeout", "500"]);
    await refusedThroughout(p, /^startup and authentication did not complete within 500 ms$/, () =>
      poll(() => up.open === 0, "the proxy to close its connections to the silent upstream", {
        detail: () => `${up.open} still open`,
      }),
    );
    expect(up.accepted).toBeGreaterThanOrEqual(23);
    expect(up.bytesRead).toBeGreaterThan(0); // the StartupMessage did go out
  }, 60_000);

  test("TCP connect never completes → 08006 at the connect timeout, no socket left behind", async () => {
    const hole = blackholeListener();
    closers.push(() => hole.close());
    // Fill its accept queue (backlog 0 holds one): from now on SYNs are dropped.
    const filler: Socket = createConnection({ host: "127.0.0.1", port: hole.port });
    closers.push(() => filler.destroy());
    await new Promise<void>((res, rej) => {
      filler.once("connect", () => res());
      filler.once("error", rej);
    });
    const p = await proxyFor(hole.port, ["--connect-timeout", "500", "--startup-timeout", "60000"]);
    // After its 08006 the proxy must not keep the abandoned connect going
    // (the kernel would give up on its own only after its SYN retries, ~2 min).
    await refusedThroughout(
      p,
      new RegExp(`^could not connect to the upstream server at 127\\.0\\.0\\.1:${hole.port}: timed out after 500 ms$`),
      undefined,
      () => `${pendingConnectsTo(hole.port)} connect(s) to the black hole still in SYN_SENT`,
    );
  }, 60_000);
});

// ================================================== 3. clients that vanish

describe("a client vanishes mid-statement", () => {
  let p: ProxyHandle;
  beforeAll(async () => {
    p = await proxyFor(cluster.port);
  });

  for (const how of ["FIN without Terminate", "RST"] as const) {
    test(`mid-query (${how}): the backend stops running pg_sleep and exits`, async () => {
      const tag = marker("query");
      const r = await rawSession(p, "tenant_a", `vanishing ${how}`);
      await r.send(queryMessage(`SELECT pg_sleep(60) /* ${tag} */`));
      const b = await activeBackend(tag);
      if (how === "RST") r.reset();
      else r.destroy();
      await backendGone(b.pid, `running pg_sleep for a client that vanished (${how})`);
      expect(await backendsRunning(tag)).toEqual([]);
      assertAlive(p);
    }, 60_000);
  }

  test("mid-query, psql killed with SIGKILL: the backend exits", async () => {
    const tag = marker("psql");
    const proc = Bun.spawn(
      [pgTool("psql"), "-X", "-d", p.url({ user: trustUser("tenant_a"), password: PASSWORDS[TRUST_USER] }), "-c", `SELECT pg_sleep(60) /* ${tag} */`],
      { env: libpqEnv(), stdout: "ignore", stderr: "ignore" },
    );
    closers.push(() => proc.kill("SIGKILL"));
    const b = await activeBackend(tag);
    proc.kill("SIGKILL");
    await proc.exited;
    await backendGone(b.pid, "running pg_sleep for a killed psql");
    assertAlive(p);
  }, 60_000);

  test("mid-COPY FROM STDIN: the backend leaves COPY and exits, nothing is committed", async () => {
    const tag = marker("copy");
    const r = await rawSession(p, "tenant_a", "vanishing copy");
    await r.send(queryMessage(`COPY copy_sink (n, note) FROM STDIN /* ${tag} */`));
    const [g] = await r.readUntil("G", "CopyInResponse");
    expect(g?.type).toBe("G");
    // Part of the data: 2,000 rows in a few CopyData messages, no CopyDone.
    for (let chunk = 0; chunk < 4; chunk++) {
      const rows = Array.from({ length: 500 }, (_, i) => `${chunk * 500 + i}\t${tag}\n`).join("");
      await r.send(copyDataMessage(rows));
    }
    const b = await activeBackend(tag);
    expect(b.query).toContain("COPY copy_sink");
    r.destroy();
    await backendGone(b.pid, "in COPY FROM STDIN for a client that vanished");
    expect(await sinkRows(tag)).toBe(0);
    assertAlive(p);
  }, 60_000);

  test("mid-COPY, psql killed with SIGKILL: the backend exits, nothing is committed", async () => {
    const tag = marker("psqlcopy");
    const proc = Bun.spawn(
      [pgTool("psql"), "-X", "-v", "ON_ERROR_STOP=1", "-d", p.url({ user: trustUser("tenant_a"), password: PASSWORDS[TRUST_USER] }), "-c", `COPY copy_sink (n, note) FROM STDIN /* ${tag} */`],
      { env: libpqEnv(), stdin: "pipe", stdout: "ignore", stderr: "ignore" },
    );
    closers.push(() => proc.kill("SIGKILL"));
    for (let i = 0; i < 1_000; i++) proc.stdin.write(`${i}\t${tag}\n`);
    await proc.stdin.flush();
    const b = await activeBackend(tag);
    proc.kill("SIGKILL");
    await proc.exited;
    await backendGone(b.pid, "in COPY FROM STDIN for a killed psql");
    expect(await sinkRows(tag)).toBe(0);
    assertAlive(p);
  }, 60_000);

  test("inside an open transaction: the backend exits and the transaction is rolled back", async () => {
    const tag = marker("tx");
    const r = await rawSession(p, "tenant_a", "vanishing in a transaction", { application_name: tag });
    await r.query("BEGIN");
    await r.query(`INSERT INTO copy_sink SELECT g, '${tag}' FROM generate_series(1, 100) g`);
    let pid = 0;
    await poll(async () => {
      const rows = (await cluster.sql`SELECT pid, state FROM pg_stat_activity WHERE application_name = ${tag}`) as unknown as Backend[];
      pid = rows[0]?.state === "idle in transaction" ? rows[0].pid : 0;
      return pid !== 0;
    }, "the backend to be idle in transaction");
    r.destroy();
    await backendGone(pid, "idle in transaction for a client that vanished");
    expect(await sinkRows(tag)).toBe(0);
    assertAlive(p);
  }, 60_000);
});

// ======================================================== 4. slow-loris

describe("slow-loris startups", () => {
  test("200 stalled half-startups at a time are all dropped with 08006 while normal clients work", async () => {
    const TIMEOUT_MS = 2_000;
    const LORISES = 200;
    const p = await proxyFor(cluster.port, ["--startup-timeout", String(TIMEOUT_MS)]);

    const warm = await rawSession(p, "warmup", "warmup");
    await warm.send(terminateMessage());
    await warm.waitClosed();
    await closedLogged(p, 1);
    const baseline = fdCount(p.pid);

    const half = startupPacket({ user: trustUser("loris"), database: cluster.database }).subarray(0, 14);
    let attacking = true;
    let opened = 0;
    let dropped = 0;
    const failures: string[] = [];
    const live = new Set<RawPg>();

    // One loris: connect, send half a startup packet (every other one sends
    // nothing at all), stall; the proxy must answer 08006 and close.
    const loris = async (i: number) => {
      let r: RawPg | undefined;
      try {
        r = await RawPg.open(p.port, `loris ${i}`);
        live.add(r);
        opened++;
        if (i % 2 === 0) await r.send(half);
        const f = await r.expectError("the startup deadline", 30_000);
        if (f.C !== "08006" || f.M !== `startup and authentication did not complete within ${TIMEOUT_MS} ms`) {
          failures.push(`${r.label}: ${JSON.stringify(f)}`);
        }
        dropped++;
      } catch (e) {
        failures.push(String(e));
      } finally {
        if (r) {
          live.delete(r);
          r.destroy();
        }
      }
    };
    // Keep LORISES in flight until told to stop: each one dropped is replaced.
    let n = 0;
    const attack = Promise.all(
      Array.from({ length: LORISES }, async () => {
        while (attacking && failures.length === 0) await loris(n++);
      }),
    );

    // Normal clients, during the attack, until the proxy has dropped two
    // full waves of lorises (so they overlapped with its deadline work).
    let cycles = 0;
    try {
      await poll(() => opened >= LORISES || failures.length > 0, `${LORISES} lorises connected`);
      await Promise.all(
        Array.from({ length: 4 }, async (_, w) => {
          for (let k = 0; (k < 3 || dropped < 2 * LORISES) && failures.length === 0; k++) {
            const tenant = `normal_${w}_${k}`;
            const sql = connect(appUrl(p, tenant, "faults-normal"), { connect_timeout: 30 });
            try {
              const [row] = await sql`SELECT current_tenant_id() AS t, count(*)::int AS n FROM generate_series(1, 100)`;
              expect({ t: row?.t, n: row?.n }).toEqual({ t: tenant, n: 100 });
              cycles++;
            } finally {
              await sql.end({ timeout: 5 });
            }
          }
        }),
      );
    } finally {
      attacking = false;
      await attack;
    }

    expect(failures).toEqual([]);
    expect(dropped).toBe(opened);
    expect(dropped).toBeGreaterThanOrEqual(2 * LORISES);
    expect(cycles).toBeGreaterThanOrEqual(12);
    expect(live.size).toBe(0);
    assertAlive(p);
    await fdsBackTo(p, baseline);
  }, 120_000);
});

// ============================================ 5. 2,000 concurrent clients

describe("2,000 concurrent connections", () => {
  /*
   * Why not 2,000 full sessions by default: each one is a PostgreSQL backend
   * (fork, authentication, catalog warm-up, the context round). On the
   * 2-core box this was written on, shared with other jobs, backends started
   * at 13–20 per second, directly or through the proxy alike, so 2,000 took
   * about four minutes before the first query. The proxy's side of a
   * connection is the same work either way; the expensive part is Postgres.
   * So by default FULL_SESSIONS (400) are full sessions and the other 1,600
   * stay in the startup phase, all 2,000 open at the same time; a bigger or
   * quieter machine can run FAULTS_FULL_SESSIONS=2000 (the cluster is sized
   * for it).
   */
  const title =
    FULL_SESSIONS === TOTAL_CONNECTIONS
      ? `${TOTAL_CONNECTIONS} full tenant sessions at once`
      : `${TOTAL_CONNECTIONS} at once: ${FULL_SESSIONS} full tenant sessions, ${TOTAL_CONNECTIONS - FULL_SESSIONS} parked in startup`;
  test(title, async () => {
    // No startup deadline (parked clients wait on purpose) and a generous
    // connect timeout: a fork storm on a small box is slow, not broken.
    const p = await proxyFor(cluster.port, ["--startup-timeout", "0", "--connect-timeout", "120000"]);
    const warm = await rawSession(p, "warmup", "warmup");
    await warm.send(terminateMessage());
    await warm.waitClosed();
    await closedLogged(p, 1);
    const baseline = fdCount(p.pid);
    const app = marker("many");
    const PARKED = TOTAL_CONNECTIONS - FULL_SESSIONS;

    const all: RawPg[] = [];
    closers.push(() => all.forEach((r) => r.destroy()));

    // Parked: half a StartupMessage whose user has no tenant at all.
    const packet = startupPacket({ user: TRUST_USER, database: cluster.database, application_name: app });
    const cut = 12;
    const parked: RawPg[] = new Array(PARKED);
    await pool(PARKED, 64, async (i) => {
      const r = await RawPg.open(p.port, `parked ${i}`, 60_000);
      all.push(r);
      await r.send(packet.subarray(0, cut));
      parked[i] = r;
    });

    // Full sessions: each its own tenant.
    const full: RawPg[] = new Array(FULL_SESSIONS);
    await pool(FULL_SESSIONS, 32, async (i) => {
      const r = await RawPg.open(p.port, `full ${i}`, 60_000);
      all.push(r);
      await r.startup({ user: trustUser(`tenant_${i}`), database: cluster.database, application_name: app }, 120_000);
      full[i] = r;
    });

    // All open at once: the proxy holds every client socket plus one server
    // socket per full session, and the server has one backend per session.
    expect(parked.every((r) => !r.peerClosed) && full.every((r) => !r.peerClosed)).toBe(true);
    expect(fdCount(p.pid)).toBeGreaterThanOrEqual(baseline + TOTAL_CONNECTIONS + FULL_SESSIONS);
    expect(await backendsNamed(app)).toBe(FULL_SESSIONS);

    // Every full session runs a query, concurrently, and sees its own tenant.
    const results = await Promise.all(full.map((r) => r.query("SELECT 1, current_tenant_id()", 120_000)));
    const wrong = results.map((rows, i) => ({ i, rows })).filter(({ i, rows }) => JSON.stringify(rows) !== JSON.stringify([["1", `tenant_${i}`]]));
    expect(wrong).toEqual([]);

    // Every parked connection is still served: it finishes its packet and
    // gets the proxy's own answer (no tenant → 28000), no backend needed.
    const answers = await Promise.all(
      parked.map(async (r) => {
        await r.send(packet.subarray(cut));
        return (await r.expectError("a user without a tenant", 60_000)).C;
      }),
    );
    expect(answers.filter((c) => c !== "28000")).toEqual([]);

    // Sessions still answer after all that, then leave cleanly.
    expect(await full[0]!.query("SELECT current_tenant_id()")).toEqual([["tenant_0"]]);
    await Promise.all(
      full.map(async (r) => {
        await r.send(terminateMessage());
        r.end();
        await r.waitClosed("the proxy to close after Terminate", 60_000);
      }),
    );
    for (const r of all) r.destroy();
    assertAlive(p);
    await fdsBackTo(p, baseline, 60_000);
    await poll(async () => (await backendsNamed(app)) === 0, "every backend of the test to exit", { timeoutMs: 60_000 });
  }, 600_000);
});

/** Run fn(0..n-1) with at most `limit` in flight. */
async function pool(n: number, limit: number, fn: (i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(limit, n) }, async () => {
      while (next < n) await fn(next++);
    }),
  );
}
