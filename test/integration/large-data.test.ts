/**
 * Large data through the compiled proxy, against real PostgreSQL: bytes
 * arrive complete and in order, and backpressure keeps the proxy's memory
 * bounded. Each test runs its own proxy, so the proxy's peak RSS (VmHWM in
 * /proc/<pid>/status) belongs to that test alone.
 *
 * Covers, as a tenant user (app_user.tenant_a):
 * - COPY FROM STDIN of > 100 MiB (postgres.js .writable(), rows from a
 *   deterministic generator) and COPY TO STDOUT of the same data
 *   (.readable()): sha256 of what was sent == sha256 of what came back, and
 *   the server agrees on row count, byte total and a per-line md5 sum. The table is a plain one owned by the
 *   superuser and granted to app_user: Postgres refuses COPY FROM into a
 *   table with row-level security for a role it applies to. COPY TO of the
 *   FORCE-RLS `notes` table is checked to be tenant-filtered.
 * - slow reader, 200 MB SELECT result: a minimal client that speaks the
 *   protocol on a plain socket (trust_user.tenant_a, trust auth) sends one
 *   simple Query and then stops reading: the proxy must stop reading
 *   upstream instead of buffering (the server backend blocks in ClientWrite
 *   and unread bytes stand still in the proxy's upstream socket, seen in
 *   /proc/net/tcp), and the proxy's RSS stays bounded; then the client reads
 *   at a paced rate to the end: 200,000 rows, checksum equal.
 * - slow reader, real client: psql `COPY (SELECT …) TO STDOUT` piped into a
 *   reader that stops, then reads slowly (psql stops reading its socket while
 *   its stdout pipe is full). Same checks.
 *
 * Observed on the dev box (2 cores, shared with other test runs; the tests
 * print these figures, only the < 200 MB bound is asserted). Proxy RSS at
 * start ≈ 46-48 MiB.
 *   COPY round trip, 105 MiB / 470,000 rows: in 1.6-4.5 s, out 1.6-9.9 s;
 *     proxy peak RSS (VmHWM) 67-77 MiB.
 *   slow reader, raw client, 194.6 MiB of DataRows: RSS while the client is
 *     stopped 54-59 MiB; peak 66-79 MiB.
 *   slow reader, psql COPY, 192.2 MiB: RSS while stopped 55-56 MiB; peak
 *     67-72 MiB.
 *   With the proxy's backpressure disabled (a locally sabotaged build, Outbox
 *   never pausing the producer) the same tests fail: the backend finishes
 *   while the client reads nothing, peak RSS 241-297 MiB.
 * The bound asserted is < 200 MB, as the issue asks.
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { connect as netConnect, type Socket } from "node:net";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import {
  APP_USER,
  connect,
  NOTES,
  PASSWORDS,
  passwordFor,
  pgTool,
  libpqEnv,
  startPostgres,
  startProxyFor,
  TENANT_A,
  TRUST_USER,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";
import { AuthAnswers } from "../harness/scram.ts";
import { appName, backendsOf, mb, memStatus, RssSampler, tcpQueues, waitFor, WaitAbort, within } from "./transparency-helpers.ts";

const RSS_BOUND_KB = 200 * 1024;

// test/preload.ts sets a 120 s default, but under bun 1.4.5 a preload's
// setDefaultTimeout only holds for the first test file of a run; later files
// fall back to 5 s. Set it here so this file does not depend on its position.
setDefaultTimeout(120_000);

let pg: PgInstance;
const proxies: ProxyHandle[] = [];

beforeAll(async () => {
  pg = await startPostgres();
});

afterAll(async () => {
  for (const p of proxies) await p.stop();
  if (pg) await pg.sql`DROP TABLE IF EXISTS public.bulk_copy`;
});

async function freshProxy(): Promise<ProxyHandle> {
  const p = await startProxyFor(pg);
  proxies.push(p);
  return p;
}

const sha256 = () => new Bun.CryptoHasher("sha256");
const md5hex = (s: string) => Bun.CryptoHasher.hash("md5", s, "hex") as string;

// ---------------------------------------------------------------------------
// COPY in and out

/**
 * Consume a postgres.js COPY TO stream in flowing mode ('data' events).
 *
 * Not `for await`: postgres.js 3.4.x pauses its socket when a CopyData push
 * hits the stream's highWaterMark, and if CopyDone arrives in the same read
 * the stream ends without ever calling read() again, so the socket stays
 * paused and the *next* query on the connection hangs forever (known client
 * bug: porsager/postgres#499, fix proposed in porsager/postgres#1016). It
 * reproduces against Postgres directly, without the proxy. In flowing mode
 * push() never reports a full buffer, so the socket is never paused.
 */
function drain(readable: NodeJS.ReadableStream, onChunk: (chunk: Buffer) => void): Promise<void> {
  return new Promise((res, rej) => {
    readable.on("data", (chunk) => onChunk(chunk as Buffer));
    readable.on("end", () => res());
    readable.on("error", rej);
  });
}

/** Deterministic text: ASCII plus multi-byte UTF-8, nothing COPY text format would escape. */
const ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:-_+=!?()[]{}<>/|@#$%^&*~'\"éü✓日本";
const POOL = (() => {
  let x = 0x9e3779b9;
  let s = "";
  for (let i = 0; i < 8192; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    s += ALPHABET[(x >>> 0) % ALPHABET.length];
  }
  return s;
})();
function payload(n: number): string {
  const len = 100 + ((n * 31) % 201);
  const start = Math.imul(n, 2654435761 >>> 0) >>> 0;
  const off = start % (POOL.length - 301);
  return POOL.slice(off, off + len);
}

const COPY_TARGET_BYTES = 105 * 1024 * 1024; // > 100 MiB

describe("COPY", () => {
  beforeAll(async () => {
    await pg.sql.unsafe(`
      DROP TABLE IF EXISTS public.bulk_copy;
      CREATE TABLE public.bulk_copy (n int NOT NULL, tenant_id text NOT NULL, payload text NOT NULL);
      GRANT SELECT, INSERT, DELETE ON public.bulk_copy TO ${APP_USER};
    `);
  });

  test("COPY FROM STDIN and COPY TO STDOUT of > 100 MiB through the proxy: checksums equal", async () => {
    const proxy = await freshProxy();
    const rss = new RssSampler(proxy.pid);
    const rssAtStart = rss.maxKb;
    const sql = connect(proxy.url({ user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER] }));
    try {
      // --- in
      // What was sent: its sha256 (compared with what COPY TO gives back) and
      // an order-independent checksum the server can compute without a sort
      // (sum of the first 60 bits of each line's md5).
      const sent = { bytes: 0, rows: 0, sha: sha256(), lineSum: 0n };
      async function* generate() {
        let n = 0;
        while (sent.bytes < COPY_TARGET_BYTES) {
          const lines: string[] = [];
          for (let i = 0; i < 1000; i++) {
            n++;
            const line = `${n}\t${TENANT_A}\t${payload(n)}\n`;
            sent.lineSum += BigInt("0x" + md5hex(line).slice(0, 15));
            lines.push(line);
          }
          const chunk = Buffer.from(lines.join(""), "utf8");
          sent.bytes += chunk.length;
          sent.rows = n;
          sent.sha.update(chunk);
          yield chunk;
        }
      }
      const t0 = performance.now();
      const writable = await within("COPY FROM STDIN to start", sql`COPY public.bulk_copy (n, tenant_id, payload) FROM STDIN`.writable());
      await within("COPY FROM STDIN", pipeline(Readable.from(generate()), writable), 120_000);
      const inSeconds = (performance.now() - t0) / 1000;
      const sentSha = sent.sha.digest("hex");
      expect(sent.bytes).toBeGreaterThanOrEqual(100 * 1024 * 1024);

      // The server has exactly what was sent (asked through the proxy, as the tenant).
      const [server] = await within("the server-side checksum", sql`
        SELECT count(*)::int AS rows,
               sum(('x' || left(md5(n::text || E'\t' || tenant_id || E'\t' || payload || E'\n'), 15))::bit(60)::bigint)::text AS linesum,
               sum(octet_length(n::text || E'\t' || tenant_id || E'\t' || payload || E'\n'))::bigint::text AS bytes,
               count(DISTINCT n)::int AS distinct_n, min(n) AS lo, max(n) AS hi
        FROM public.bulk_copy
      `, 60_000);
      expect(server).toEqual({
        rows: sent.rows,
        linesum: sent.lineSum.toString(),
        bytes: String(sent.bytes),
        distinct_n: sent.rows,
        lo: 1,
        hi: sent.rows,
      });

      // --- out
      await within("SET work_mem", sql`SET work_mem = '256MB'`); // sort in memory
      const got = { bytes: 0, sha: sha256() };
      const t1 = performance.now();
      const readable = await within(
        "COPY TO STDOUT to start",
        sql`COPY (SELECT n, tenant_id, payload FROM public.bulk_copy ORDER BY n) TO STDOUT`.readable(),
        60_000,
      );
      await within(
        "COPY TO STDOUT",
        drain(readable, (chunk) => {
          got.bytes += chunk.length;
          got.sha.update(chunk);
        }),
        120_000,
      );
      const outSeconds = (performance.now() - t1) / 1000;
      expect(got.bytes).toBe(sent.bytes);
      expect(got.sha.digest("hex")).toBe(sentSha);

      // The session is intact after both copies.
      const [ctx] = await within("a query after the COPYs", sql`SELECT current_user::text AS usr, current_tenant_id() AS tenant`);
      expect(ctx).toEqual({ usr: APP_USER, tenant: TENANT_A });

      rss.stop();
      const { hwmKb } = memStatus(proxy.pid);
      console.log(
        `COPY: ${mb(sent.bytes / 1024)} MiB / ${sent.rows} rows in ${inSeconds.toFixed(1)} s, out ${outSeconds.toFixed(1)} s; ` +
          `proxy RSS at start ${mb(rssAtStart)} MiB, max sampled ${mb(rss.maxKb)} MiB (${rss.samples} samples), peak VmHWM ${mb(hwmKb)} MiB`,
      );
      expect(rss.maxKb).toBeLessThan(RSS_BOUND_KB);
      expect(hwmKb).toBeLessThan(RSS_BOUND_KB);
    } finally {
      rss.stop();
      await sql.end({ timeout: 5 });
      await pg.sql`TRUNCATE public.bulk_copy`;
    }
  }, 180_000);

  test("COPY TO STDOUT of the FORCE-RLS table is filtered to the tenant", async () => {
    const proxy = proxies[0] ?? (await freshProxy());
    const sql = connect(proxy.url({ user: `${APP_USER}.${TENANT_A}`, password: PASSWORDS[APP_USER] }));
    try {
      const readable = await sql`COPY (SELECT tenant_id, body FROM notes ORDER BY id) TO STDOUT`.readable();
      let text = "";
      await within("COPY notes TO STDOUT", drain(readable, (chunk) => (text += chunk.toString("utf8"))));
      expect(text).toBe(NOTES.tenant_a.map((b) => `${TENANT_A}\t${b}\n`).join(""));
      const whole = await sql`COPY notes TO STDOUT`.readable();
      let all = "";
      await within("COPY notes TO STDOUT", drain(whole, (chunk) => (all += chunk.toString("utf8"))));
      const lines = all.split("\n").filter((l) => l !== "");
      expect(lines.length).toBe(NOTES.tenant_a.length);
      for (const line of lines) expect(line.split("\t")[1]).toBe(TENANT_A);
      // The connection is usable after both copies.
      expect((await within("a query after COPY", sql`SELECT current_tenant_id() AS t`))[0]!.t).toBe(TENANT_A);
    } finally {
      await sql.end({ timeout: 5 });
    }
  });
});

// ---------------------------------------------------------------------------
// slow readers

const SLOW_ROWS = 200_000;
/** 200,000 rows of (n, 1000 characters): ≈ 204 MB of DataRow messages. */
const SLOW_QUERY = `SELECT n, md5(n::text) || repeat('x', 968) AS pad FROM generate_series(1, ${SLOW_ROWS}) n`;

let expectedSlow: string | undefined;
/** sha256 over "n\tpad\n" for every row, i.e. exactly COPY text output of SLOW_QUERY. */
function expectedSlowSha(): string {
  if (expectedSlow) return expectedSlow;
  const h = sha256();
  const xs = "x".repeat(968);
  const lines: string[] = [];
  for (let n = 1; n <= SLOW_ROWS; n++) {
    lines.push(`${n}\t${md5hex(String(n))}${xs}\n`);
    if (lines.length === 1000) {
      h.update(lines.join(""));
      lines.length = 0;
    }
  }
  if (lines.length) h.update(lines.join(""));
  return (expectedSlow = h.digest("hex"));
}

/**
 * While the client reads nothing, the proxy must stop reading from the
 * server: for 12 consecutive polls (25 ms apart) the server backend is
 * blocked writing (wait_event ClientWrite) *and* the proxy's upstream socket
 * has unread bytes in its kernel receive queue that do not move (nobody
 * reads them). A proxy that buffers instead keeps draining that queue (and
 * its RSS grows), or lets the backend finish the query.
 */
async function expectServerBlocked(name: string, rss: RssSampler): Promise<void> {
  let streak = 0;
  let lastRx = -1;
  await waitFor(
    "the proxy to stop reading from the server while the client reads nothing " +
      "(backend wait_event ClientWrite, unread bytes standing in the proxy's upstream socket)",
    async () => {
      rss.sample();
      const [b] = await backendsOf(pg.sql, name);
      if (!b) throw new Error("backend not found");
      if (b.state !== "active") {
        throw new WaitAbort(
          `the backend finished the 200 MB query (state ${b.state}) while the client read nothing: the proxy buffered it`,
        );
      }
      const q = b.client_port ? tcpQueues(b.client_port, pg.port) : undefined;
      const still = b.wait_event === "ClientWrite" && q !== undefined && q.rx > 0 && q.rx === lastRx;
      lastRx = q?.rx ?? -1;
      streak = still ? streak + 1 : 0;
      return streak >= 12;
    },
    { timeoutMs: 30_000, intervalMs: 25 },
  );
}

/** Minimal protocol-3 client on a plain socket, for a reader that controls when it reads. */
class RawClient {
  private pending: Buffer = Buffer.alloc(0);
  private onMessage: ((type: number, body: Buffer) => void) | undefined;
  private failure: ((e: Error) => void) | undefined;
  bytesRead = 0;

  private constructor(readonly sock: Socket) {
    sock.on("data", (chunk: Buffer) => this.feed(chunk));
    sock.on("error", (e) => this.failure?.(e));
    sock.on("close", () => this.failure?.(new Error("connection closed")));
  }

  static open(host: string, port: number): Promise<RawClient> {
    return new Promise((res, rej) => {
      const sock = netConnect({ host, port }, () => res(new RawClient(sock)));
      sock.once("error", rej);
    });
  }

  private feed(chunk: Buffer): void {
    this.bytesRead += chunk.length;
    let buf = this.pending.length ? Buffer.concat([this.pending, chunk]) : chunk;
    let off = 0;
    while (buf.length - off >= 5) {
      const len = buf.readInt32BE(off + 1);
      if (buf.length - off < 1 + len) break;
      this.onMessage?.(buf[off]!, buf.subarray(off + 5, off + 1 + len));
      off += 1 + len;
    }
    this.pending = off === buf.length ? Buffer.alloc(0) : Buffer.from(buf.subarray(off));
  }

  /** Handle messages until `handler` returns true (done) or an ErrorResponse arrives. */
  until(handler: (type: number, body: Buffer) => boolean): Promise<void> {
    return new Promise((res, rej) => {
      this.failure = rej;
      this.onMessage = (type, body) => {
        if (type === 0x45 /* E */) {
          const fields = body.toString("utf8").split("\0").filter(Boolean);
          rej(new Error(`ErrorResponse: ${fields.join(" | ")}`));
          return;
        }
        try {
          if (handler(type, body)) {
            this.onMessage = undefined;
            this.failure = undefined;
            res();
          }
        } catch (e) {
          rej(e as Error);
        }
      };
    });
  }

  async startup(params: Record<string, string>): Promise<void> {
    const kv = Object.entries(params).flatMap(([k, v]) => [k, v]);
    const body = Buffer.from(kv.join("\0") + "\0\0", "utf8");
    const head = Buffer.alloc(8);
    head.writeInt32BE(8 + body.length, 0);
    head.writeInt32BE(196608, 4);
    // Authenticate with the user's harness password (SCRAM at the proxy).
    const answers = new AuthAnswers(passwordFor(params.user ?? "") ?? "", params.user);
    const ready = this.until((type, b) => {
      if (type === 0x52 /* R */ && b.readInt32BE(0) !== 0) {
        const reply = answers.answer(b);
        if (reply) this.sock.write(reply);
      }
      return type === 0x5a; /* Z */
    });
    this.sock.write(Buffer.concat([head, body]));
    await ready;
  }

  query(text: string): void {
    const body = Buffer.from(text + "\0", "utf8");
    const head = Buffer.alloc(5);
    head[0] = 0x51; // Q
    head.writeInt32BE(4 + body.length, 1);
    this.sock.write(Buffer.concat([head, body]));
  }

  end(): void {
    this.failure = undefined;
    this.sock.destroy();
  }
}

describe("slow reader, 200 MB result", () => {
  test("raw socket client that stops reading, then reads slowly: proxy RSS bounded, every byte arrives", async () => {
    const proxy = await freshProxy();
    const expected = expectedSlowSha();
    const name = appName("slow-raw");
    const rss = new RssSampler(proxy.pid);
    const rssAtStart = rss.maxKb;
    const started = performance.now();
    const seconds = () => ((performance.now() - started) / 1000).toFixed(1);
    const client = await RawClient.open(proxy.host, proxy.port);
    try {
      await within(
        "raw client startup",
        client.startup({ user: `${TRUST_USER}.${TENANT_A}`, database: pg.database, application_name: name }),
        15_000,
      );

      let rows = 0;
      let tag = "";
      const hash = sha256();
      const done = client.until((type, body) => {
        if (type === 0x44 /* D */) {
          // DataRow: int16 count, then (int32 len, bytes) per column.
          let off = 2;
          const cols: string[] = [];
          for (let i = body.readInt16BE(0); i > 0; i--) {
            const len = body.readInt32BE(off);
            cols.push(body.toString("utf8", off + 4, off + 4 + len));
            off += 4 + len;
          }
          hash.update(cols.join("\t") + "\n");
          rows++;
        } else if (type === 0x43 /* C */) {
          tag = body.toString("utf8", 0, body.length - 1);
        } else if (type === 0x5a /* Z */) {
          return true;
        }
        return false;
      });

      // Read the first chunk, then stop reading altogether.
      client.sock.once("data", () => client.sock.pause());
      client.query(SLOW_QUERY);
      await expectServerBlocked(name, rss);
      const pausedAt = client.bytesRead;
      const rssWhilePaused = rss.sample();

      // Now read, but slowly: pause after every chunk, resume a few ms later (pacing, not synchronisation).
      client.sock.on("data", () => {
        client.sock.pause();
        setTimeout(() => client.sock.resume(), 3);
      });
      client.sock.resume();
      await within("the paced read of 200 MB", done, 170_000);
      rss.stop();
      const { hwmKb } = memStatus(proxy.pid);

      expect(tag).toBe(`SELECT ${SLOW_ROWS}`);
      expect(rows).toBe(SLOW_ROWS);
      expect(hash.digest("hex")).toBe(expected);
      console.log(
        `slow reader (raw): ${mb(client.bytesRead / 1024)} MiB read (${mb(pausedAt / 1024)} MiB before the pause) in ${seconds()} s; ` +
          `proxy RSS at start ${mb(rssAtStart)} MiB, while paused ${mb(rssWhilePaused)} MiB, max sampled ${mb(rss.maxKb)} MiB (${rss.samples} samples), peak VmHWM ${mb(hwmKb)} MiB`,
      );
      expect(client.bytesRead).toBeGreaterThan(200 * 1000 * 1000);
      expect(rss.maxKb).toBeLessThan(RSS_BOUND_KB);
      expect(hwmKb).toBeLessThan(RSS_BOUND_KB);
    } finally {
      rss.stop();
      client.end();
    }
  }, 240_000);

  test("psql COPY (SELECT …) TO STDOUT into a reader that stops, then reads slowly: proxy RSS bounded, every byte arrives", async () => {
    const proxy = await freshProxy();
    const expected = expectedSlowSha();
    const name = appName("slow-psql");
    const rss = new RssSampler(proxy.pid);
    const rssAtStart = rss.maxKb;
    const started = performance.now();
    const seconds = () => ((performance.now() - started) / 1000).toFixed(1);
    const url = proxy.url({
      user: `${APP_USER}.${TENANT_A}`,
      password: PASSWORDS[APP_USER],
      params: { application_name: name },
    });
    const proc = Bun.spawn([pgTool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", `COPY (${SLOW_QUERY}) TO STDOUT`], {
      env: libpqEnv(),
      stdin: "ignore",
      stdout: "pipe",
      stderr: "pipe",
    });
    const killer = setTimeout(() => proc.kill("SIGKILL"), 200_000);
    const stderr = new Response(proc.stderr).text();
    const reader = proc.stdout.getReader();
    try {
      const hash = sha256();
      let bytes = 0;
      // First chunk, then read nothing until the server is blocked.
      const first = await within("psql's first output", reader.read(), 30_000);
      expect(first.done, await (first.done ? stderr : Promise.resolve(""))).toBe(false);
      hash.update(first.value!);
      bytes += first.value!.length;
      await expectServerBlocked(name, rss);
      const rssWhilePaused = rss.sample();

      // Slow, paced reading to the end.
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        hash.update(value);
        bytes += value.length;
        await Bun.sleep(1); // pacing, not synchronisation
      }
      const exitCode = await within("psql to exit", proc.exited, 30_000);
      rss.stop();
      const { hwmKb } = memStatus(proxy.pid);
      expect(exitCode, await stderr).toBe(0);
      expect(hash.digest("hex")).toBe(expected);
      console.log(
        `slow reader (psql COPY): ${mb(bytes / 1024)} MiB in ${seconds()} s; proxy RSS at start ${mb(rssAtStart)} MiB, while paused ${mb(rssWhilePaused)} MiB, ` +
          `max sampled ${mb(rss.maxKb)} MiB (${rss.samples} samples), peak VmHWM ${mb(hwmKb)} MiB`,
      );
      expect(bytes).toBeGreaterThan(200 * 1000 * 1000);
      expect(rss.maxKb).toBeLessThan(RSS_BOUND_KB);
      expect(hwmKb).toBeLessThan(RSS_BOUND_KB);
    } finally {
      rss.stop();
      clearTimeout(killer);
      reader.releaseLock();
      proc.kill("SIGKILL");
      await proc.exited;
    }
  }, 240_000);
});
