/**
 * Dev mode (`bun run dev` = scripts/dev.ts): the proxy, from source, in front
 * of PGlite served by scripts/pglite-server.ts.
 *
 * - End to end: spawn `bun scripts/dev.ts --listen 127.0.0.1:0` (and
 *   `--http 127.0.0.1:0`, passed through to the proxy), wait for
 *   the printed connection strings, connect with postgres.js (and psql, with
 *   the printed command) as both demo tenants: each sees only its own rows,
 *   also with the two connections interleaved; a write with the other
 *   tenant's id is refused; the printed superuser string sees both tenants.
 *   SIGINT stops dev mode: it exits 0, and neither the proxy's nor PGlite's
 *   port accepts connections any more.
 * - The PGlite session server on its own: PGlite is one backend, so the
 *   server must keep each connection's session (role, settings, prepared
 *   statement names) apart, survive COPY FROM STDIN (which kills PGlite when
 *   the data arrives in a later call) and clean up after a client that
 *   disconnects mid-transaction.
 *
 * No sleeps: every wait is for output or for a protocol answer, and bounded.
 */
import { PGlite } from "@electric-sql/pglite";
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { connect as netConnect } from "node:net";
import { join } from "node:path";
import { connect, onCleanup, psql, type Client } from "../harness/index.ts";
import { PGliteSessionServer } from "../../scripts/pglite-server.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

const ROOT = join(import.meta.dir, "../..");
const STARTUP_WAIT_MS = 150_000; // PGlite boots slowly on a loaded machine; a bound, not a budget

/** A child process whose output is collected, with a bounded wait for a pattern. */
function spawnCollecting(cmd: string[]) {
  const proc = Bun.spawn(cmd, { cwd: ROOT, stdin: "ignore", stdout: "pipe", stderr: "pipe", env: { ...process.env, NO_COLOR: "1" } });
  // SIGTERM: dev.ts passes it on to the proxy it started.
  const unregister = onCleanup(() => proc.kill("SIGTERM"));
  let output = "";
  const listeners = new Set<() => void>();
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      output += decoder.decode(chunk, { stream: true });
      for (const l of listeners) l();
    }
  };
  const done = Promise.all([pump(proc.stdout), pump(proc.stderr)]);
  void proc.exited.then(() => {
    for (const l of listeners) l();
  });
  return {
    proc,
    get output() {
      return output;
    },
    /** Resolves with the match once `pattern` appears; rejects (with the output) on exit or after ms. */
    waitFor(pattern: RegExp, ms: number): Promise<RegExpMatchArray> {
      return new Promise((resolve, reject) => {
        const check = () => {
          const m = output.match(pattern);
          if (m) finish(() => resolve(m));
          else if (proc.exitCode !== null || proc.signalCode !== null) {
            finish(() => reject(new Error(`exited (${proc.exitCode ?? proc.signalCode}) before printing ${pattern}:\n${output}`)));
          }
        };
        const timer = setTimeout(() => finish(() => reject(new Error(`no ${pattern} within ${ms} ms:\n${output}`))), ms);
        const finish = (f: () => void) => {
          clearTimeout(timer);
          listeners.delete(check);
          f();
        };
        listeners.add(check);
        check();
      });
    },
    async exited(ms: number): Promise<number> {
      const timer = setTimeout(() => proc.kill("SIGKILL"), ms);
      const code = await proc.exited;
      clearTimeout(timer);
      await done;
      unregister();
      return code;
    },
  };
}

/** Whether something accepts TCP connections on host:port (an answer either way, no timing). */
function accepts(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = netConnect(port, host);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

describe("bun run dev", () => {
  let dev: ReturnType<typeof spawnCollecting>;
  const urls: Record<"acme" | "globex" | "superuser", string> = { acme: "", globex: "", superuser: "" };
  const psqlUrls: string[] = [];
  let proxyPort = 0;
  let pglitePort = 0;
  const clients: Client[] = [];
  const client = (url: string) => {
    const c = connect(url);
    clients.push(c);
    return c;
  };

  beforeAll(async () => {
    dev = spawnCollecting([process.execPath, "scripts/dev.ts", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"]);
    await dev.waitFor(/Ctrl-C stops everything/, STARTUP_WAIT_MS);
    const out = dev.output;
    for (const name of ["acme", "globex", "superuser"] as const) {
      const m = out.match(new RegExp(`^\\s+${name}\\s+(postgres://\\S+)`, "m"));
      expect(m, `no ${name} connection string in:\n${out}`).not.toBeNull();
      urls[name] = m![1]!;
    }
    for (const m of out.matchAll(/^\s+psql "([^"]+)"$/gm)) psqlUrls.push(m[1]!);
    proxyPort = Number(out.match(/proxy on 127\.0\.0\.1:(\d+)/)?.[1]);
    pglitePort = Number(out.match(/\(PGlite, in memory\) on 127\.0\.0\.1:(\d+)/)?.[1]);
  }, STARTUP_WAIT_MS + 30_000); // waitFor's own bound fails first, with the output

  afterAll(async () => {
    await Promise.all(clients.map((c) => c.end({ timeout: 5 }).catch(() => {})));
    if (dev && dev.proc.exitCode === null) {
      dev.proc.kill("SIGTERM");
      await dev.exited(30_000);
    }
  });

  test("prints connection strings for both tenants, the superuser and psql", () => {
    expect(urls.acme).toBe(`postgres://app_user.acme:dev@127.0.0.1:${proxyPort}/postgres`);
    expect(urls.globex).toBe(`postgres://app_user.globex:dev@127.0.0.1:${proxyPort}/postgres`);
    expect(urls.superuser).toBe(`postgres://postgres:dev@127.0.0.1:${proxyPort}/postgres`);
    expect(psqlUrls).toEqual([
      `postgres://app_user.acme:dev@127.0.0.1:${proxyPort}/postgres?sslmode=disable`,
      `postgres://app_user.globex:dev@127.0.0.1:${proxyPort}/postgres?sslmode=disable`,
    ]);
    expect(proxyPort).toBeGreaterThan(0);
    expect(pglitePort).toBeGreaterThan(0);
  });

  test("the proxy authenticates the tenants (another password is refused) and checked the embedded database at startup", async () => {
    const wrong = client(urls.acme.replace(":dev@", ":not-dev@"));
    const err = await wrong`SELECT 1`.catch((e) => e);
    expect(`${err.code} ${err.message}`).toBe('28P01 password authentication failed for user "app_user.acme"');
    await dev.waitFor(/startup check: database "postgres" knows context key [0-9a-f]{12}/, 15_000);
  });

  test("postgres.js: each tenant sees only its own rows, also interleaved", async () => {
    const acme = client(urls.acme);
    const globex = client(urls.globex);
    for (let round = 0; round < 5; round++) {
      const [a, g, at, gt] = await Promise.all([
        acme`SELECT tenant_id, name FROM projects ORDER BY name`,
        globex`SELECT tenant_id, name FROM projects ORDER BY name`,
        acme`SELECT DISTINCT tenant_id FROM tasks`,
        globex`SELECT DISTINCT tenant_id FROM tasks`,
      ]);
      expect(a.map((r) => `${r.tenant_id}/${r.name}`)).toEqual(["acme/Giant magnet", "acme/Rocket skates"]);
      expect(g.map((r) => `${r.tenant_id}/${r.name}`)).toEqual(["globex/Doomsday device"]);
      expect(at.map((r) => r.tenant_id)).toEqual(["acme"]);
      expect(gt.map((r) => r.tenant_id)).toEqual(["globex"]);
    }
  });

  test("writes: the tenant id defaults to the session's, another tenant's id is refused", async () => {
    const acme = client(urls.acme);
    const globex = client(urls.globex);
    const [inserted] = await acme`INSERT INTO projects (name) VALUES ('Dev test project') RETURNING tenant_id`;
    expect(inserted!.tenant_id).toBe("acme");
    const refused = await globex`INSERT INTO projects (tenant_id, name) VALUES ('acme', 'Sneaky')`.catch((e) => e);
    expect(refused.code).toBe("42501");
    const seen = await globex`SELECT count(*)::int AS n FROM projects WHERE name = 'Dev test project'`;
    expect(seen[0]!.n).toBe(0);
  });

  test("the embedded database is hardened as multigres setup hardens: the demo works, other sessions' statements do not show", async () => {
    const acme = client(urls.acme);
    const done = await acme`UPDATE tasks SET done = NOT done WHERE title IS NOT NULL RETURNING tenant_id`;
    expect(new Set(done.map((r) => r.tenant_id))).toEqual(new Set(["acme"]));
    await acme`UPDATE tasks SET done = NOT done WHERE title IS NOT NULL`;
    const refused = await acme`SELECT query FROM pg_stat_activity`.catch((e) => e);
    expect(refused.code).toBe("42501");
    const [pinned] = await acme`SELECT current_setting('row_security') AS rs`;
    expect(pinned!.rs).toBe("on");
  });

  test("the superuser connection string bypasses the tenant and sees every tenant", async () => {
    const admin = client(urls.superuser);
    const rows = await admin`SELECT DISTINCT tenant_id FROM projects ORDER BY 1`;
    expect(rows.map((r) => r.tenant_id)).toEqual(["acme", "globex"]);
  });

  test("scripts/demo.sql is idempotent: running it again changes nothing", async () => {
    const admin = client(urls.superuser);
    const count = async () => (await admin`SELECT (SELECT count(*) FROM projects) + (SELECT count(*) FROM tasks) AS n`)[0]!.n;
    const before = await count();
    await admin.unsafe(await Bun.file(join(ROOT, "scripts/demo.sql")).text());
    expect(await count()).toBe(before);
  });

  test.skipIf(!Bun.which("psql"))("psql with the printed commands sees only the tenant's rows", async () => {
    const expected = ["acme", "globex"];
    for (const [i, url] of psqlUrls.entries()) {
      const r = await psql(url, "SELECT string_agg(DISTINCT tenant_id, ',') FROM projects");
      expect(r.exitCode, r.stderr).toBe(0);
      expect(r.stdout.trim()).toBe(expected[i]!);
    }
  });

  test("SIGINT stops the proxy and the embedded server, exit code 0", async () => {
    await Promise.all(clients.splice(0).map((c) => c.end({ timeout: 5 })));
    dev.proc.kill("SIGINT");
    const code = await dev.exited(30_000);
    expect(code, dev.output).toBe(0);
    expect(dev.output).toContain("dev: stopped");
    expect(await accepts("127.0.0.1", proxyPort)).toBe(false);
    expect(await accepts("127.0.0.1", pglitePort)).toBe(false);
  });
});

describe("PGlite session server", () => {
  let db: PGlite;
  let server: PGliteSessionServer;
  const clients: Client[] = [];
  const url = (user: string) => `postgres://${user}@127.0.0.1:${server.port}/postgres`;
  const client = (user: string, options: Parameters<typeof connect>[1] = {}) => {
    const c = connect(url(user), options);
    clients.push(c);
    return c;
  };

  beforeAll(async () => {
    db = await PGlite.create();
    await db.exec(`
      CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN; CREATE ROLE nologin NOLOGIN;
      CREATE TABLE items (n int, who text DEFAULT current_user);
      GRANT SELECT, INSERT ON items TO alice, bob;
    `);
    server = new PGliteSessionServer({ db, customSettings: ["demo.tenant"] });
    await server.start();
  }, STARTUP_WAIT_MS);

  afterAll(async () => {
    await Promise.all(clients.map((c) => c.end({ timeout: 5 }).catch(() => {})));
    await server?.stop();
    await db?.close();
  });

  test("the startup user is the session user; unknown roles and databases are refused", async () => {
    const [row] = await client("alice")`SELECT session_user AS s, current_user AS c`;
    expect(row).toEqual({ s: "alice", c: "alice" });
    const nobody = await client("nobody")`SELECT 1`.catch((e) => e);
    expect(nobody.code).toBe("28000");
    const nologin = await client("nologin")`SELECT 1`.catch((e) => e);
    expect(nologin.code).toBe("28000");
    const elsewhere = connect(`postgres://alice@127.0.0.1:${server.port}/elsewhere`);
    clients.push(elsewhere);
    const noDb = await elsewhere`SELECT 1`.catch((e) => e);
    expect(noDb.code).toBe("3D000");
  });

  test("settings and roles stay with their connection, interleaved", async () => {
    const a = client("postgres", { connection: { application_name: "conn-a" } });
    const b = client("postgres", { connection: { application_name: "conn-b" } });
    await a`SELECT set_config('demo.tenant', 'A', false), set_config('role', 'alice', false), set_config('work_mem', '7MB', false)`;
    // The setting name as a bind parameter, as the proxy sends it.
    await b`SELECT set_config(${"demo.other"}, 'B', false), set_config('role', 'bob', false)`;
    for (let i = 0; i < 5; i++) {
      const [ra, rb] = await Promise.all([
        a`SELECT current_user AS u, current_setting('demo.tenant', true) AS t, current_setting('demo.other', true) AS o,
                 current_setting('work_mem') AS w, current_setting('application_name') AS app`,
        b`SELECT current_user AS u, current_setting('demo.tenant', true) AS t, current_setting('demo.other', true) AS o,
                 current_setting('work_mem') AS w, current_setting('application_name') AS app`,
      ]);
      expect(ra[0]).toEqual({ u: "alice", t: "A", o: "", w: "7MB", app: "conn-a" });
      expect(rb[0]).toEqual({ u: "bob", t: "", o: "B", w: "4MB", app: "conn-b" });
    }
    // A new connection starts clean, whatever the others left behind.
    const [fresh] = await client("postgres")`SELECT current_user AS u, current_setting('demo.tenant', true) AS t`;
    expect(fresh).toEqual({ u: "postgres", t: "" });
  });

  test("a transaction holds the backend; the other connection runs after it", async () => {
    const a = client("alice");
    const b = client("bob");
    await Promise.all([a`SELECT 1`, b`SELECT 1`]); // both logged in
    let opened!: () => void;
    const isOpen = new Promise<void>((r) => (opened = r));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const inTx = a.begin(async (tx) => {
      await tx`INSERT INTO items (n) VALUES (1)`;
      opened();
      await gate;
      await tx`INSERT INTO items (n) VALUES (2)`;
    });
    await isOpen;
    // Sent while the transaction is open: it must not run inside it (it would see one
    // uncommitted row); it runs after COMMIT and sees both.
    const seen = b`SELECT count(*)::int AS n FROM items WHERE who = 'alice'`;
    release();
    await inTx;
    expect((await seen)[0]!.n).toBe(2);
  });

  test("prepared statement names are per connection", async () => {
    // Raw extended protocol: two connections both prepare "S_1" (as JDBC does).
    const [a, b] = await Promise.all([rawSession(server.port), rawSession(server.port)]);
    try {
      expect(types(await a.round(parse("S_1", "SELECT 'from a'"), sync()))).toBe("1Z");
      expect(types(await b.round(parse("S_1", "SELECT 'from b'"), sync()))).toBe("1Z");
      const ra = await a.round(bind("S_1"), execute(), sync());
      const rb = await b.round(bind("S_1"), execute(), sync());
      expect(types(ra)).toBe("2DCZ");
      expect(ra.toString("latin1")).toContain("from a");
      expect(rb.toString("latin1")).toContain("from b");
    } finally {
      a.close();
      b.close();
    }
  });

  test("COPY FROM STDIN works (PGlite dies when its data comes in a later call)", async () => {
    const a = client("postgres");
    const writable = await a`COPY items (n, who) FROM STDIN`.writable();
    writable.write("10\tcopy\n");
    writable.write("11\tcopy\n");
    await new Promise<void>((resolve, reject) => writable.end((e?: Error | null) => (e ? reject(e) : resolve())));
    expect((await a`SELECT count(*)::int AS n FROM items WHERE who = 'copy'`)[0]!.n).toBe(2);
    // An invalid COPY fails up front, as with a real server, and the connection stays usable.
    const bad = await a`COPY nosuchtable FROM STDIN`.writable().catch((e) => e);
    expect(bad.code).toBe("42P01");
    // Inside a transaction, too; and the transaction is undisturbed.
    await a.begin(async (tx) => {
      const w = await tx`COPY items (n, who) FROM STDIN`.writable();
      await new Promise<void>((resolve, reject) => w.end("12\tcopy-tx\n", (e?: Error | null) => (e ? reject(e) : resolve())));
      expect((await tx`SELECT count(*)::int AS n FROM items WHERE who = 'copy-tx'`)[0]!.n).toBe(1);
    });
    expect((await client("bob")`SELECT count(*)::int AS n FROM items WHERE who LIKE 'copy%'`)[0]!.n).toBe(3);
  });

  test.skipIf(!Bun.which("psql"))("psql \\copy … from stdin", async () => {
    const r = await psql(url("postgres"), null, { stdin: "\\copy items (n, who) from stdin\n20\tpsql\n21\tpsql\n\\.\nSELECT count(*) FROM items WHERE who = 'psql';\n" });
    expect(r.exitCode, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe("2");
  });

  test("a client that disconnects mid-transaction is rolled back", async () => {
    const s = await rawSession(server.port);
    await s.round(query("BEGIN; INSERT INTO items (n, who) VALUES (99, 'gone')"));
    s.destroy();
    const [row] = await client("postgres")`SELECT count(*)::int AS n FROM items WHERE who = 'gone'`;
    expect(row!.n).toBe(0);
  });
});

// ------------------------------------------------------- raw protocol bits

function frame(type: string, body: Buffer): Buffer {
  const out = Buffer.alloc(5 + body.length);
  out.write(type, 0, "latin1");
  out.writeInt32BE(4 + body.length, 1);
  body.copy(out, 5);
  return out;
}
const query = (sql: string) => frame("Q", Buffer.from(`${sql}\0`));
const parse = (name: string, sql: string) => frame("P", Buffer.from(`${name}\0${sql}\0\0\0`));
const bind = (stmt: string) => frame("B", Buffer.from(`\0${stmt}\0\0\0\0\0\0\0`));
const execute = () => frame("E", Buffer.from("\0\0\0\0\0"));
const sync = () => frame("S", Buffer.alloc(0));

/** Message types of a reply, e.g. "2DCZ". */
function types(reply: Buffer): string {
  let out = "";
  for (let at = 0; at + 5 <= reply.length; at += 1 + reply.readInt32BE(at + 1)) out += String.fromCharCode(reply[at]!);
  return out;
}

/** A hand-driven connection: round() sends messages and resolves with the reply up to ReadyForQuery. */
async function rawSession(port: number) {
  const socket = netConnect(port, "127.0.0.1");
  await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
  let buffered = Buffer.alloc(0);
  let waiting: ((reply: Buffer) => void) | null = null;
  socket.on("data", (d: Buffer) => {
    buffered = Buffer.concat([buffered, d]);
    // Complete messages only; a reply ends with ReadyForQuery.
    let at = 0;
    let ready = false;
    while (at + 5 <= buffered.length && at + 1 + buffered.readInt32BE(at + 1) <= buffered.length) {
      if (buffered[at] === 0x5a) ready = true;
      at += 1 + buffered.readInt32BE(at + 1);
    }
    if (ready && at === buffered.length && waiting) {
      const reply = buffered;
      buffered = Buffer.alloc(0);
      const w = waiting;
      waiting = null;
      w(reply);
    }
  });
  const round = (...messages: Buffer[]) =>
    new Promise<Buffer>((resolve) => {
      waiting = resolve;
      socket.write(Buffer.concat(messages));
    });
  const params = Buffer.from("user\0postgres\0database\0postgres\0\0");
  const startup = Buffer.alloc(8 + params.length);
  startup.writeInt32BE(startup.length, 0);
  startup.writeInt32BE(196608, 4);
  params.copy(startup, 8);
  await new Promise<Buffer>((resolve) => {
    waiting = resolve;
    socket.write(startup);
  });
  return { round, close: () => socket.end(frame("X", Buffer.alloc(0))), destroy: () => socket.destroy() };
}
