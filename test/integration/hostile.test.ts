/**
 * Hostile and broken clients (and upstreams) against the compiled proxy and
 * real PostgreSQL, over raw TCP.
 *
 * Every group runs against a proxy of its own and ends by checking that the
 * proxy process is alive and that a normal postgres.js tenant client still
 * connects through it and sees exactly its tenant's rows.
 *
 * Covers:
 * - fuzz: 2,000 random and malformed first packets (fast-check, 25 at a
 *   time), each answered exactly as an independent oracle in this file
 *   predicts: 'N' for the first SSLRequest and the first GSSENCRequest, then ErrorResponse
 *   08P01 for anything malformed (including a direct-TLS 0x16 opening to a
 *   proxy without a certificate), a silent close for a CancelRequest or an
 *   incomplete packet followed by the client's FIN;
 * - protocol 2.0 startup → 08P01; length words < 8 and > 10,000 → 08P01 as
 *   soon as the length word is in, the body never awaited nor allocated (RSS
 *   checked with generous bounds); exactly 10,000 bytes accepted;
 * - truncated packets then close; garbage and unexpected messages during
 *   authentication → 08P01;
 * - a startup packet trickled one byte at a time while other clients
 *   connect and query concurrently; it connects in the end;
 * - the startup timeout (dedicated proxy, --startup-timeout 500) drops a
 *   client that sends half a packet, nothing at all, or stalls in SCRAM,
 *   while an established session survives;
 * - PG18-style StartupMessage 3.2 with `_pq_.test_option`: NegotiateProtocolVersion
 *   (newest minor 0, the option listed), AuthenticationOk … ReadyForQuery,
 *   then a query in the tenant context;
 * - upstream down → 08006 with a message naming the upstream, the proxy
 *   staying up and serving again once the upstream is back;
 * - a tenant user with forbidden startup parameters (app.current_tenant_id,
 *   role, options=-c role=…) → 28000 from postgres.js, psql and raw packets,
 *   with nothing reaching the server (recording tap), harmless options allowed;
 * - a misbehaving upstream (closes at once, sends garbage lengths, truncated
 *   Authentication / BackendKeyData messages) → an ErrorResponse to the
 *   client, the proxy staying up.
 *
 * No sleeps: every wait is for an event (data, close, a log line), bounded,
 * and fails with what was received so far.
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import fc from "fast-check";
import { existsSync, readFileSync } from "node:fs";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import {
  APP_USER,
  connect,
  connectError,
  freePort,
  PASSWORDS,
  passwordFor,
  psql,
  startPostgres,
  startProxy,
  startProxyFor,
  startTap,
  TENANT_A,
  TENANT_B,
  TRUST_USER,
  withClient,
  type PgInstance,
  type ProxyHandle,
  type Tap,
} from "../harness/index.ts";
import { authenticate, authenticateToReady, errorFields, RawSocket, type Message } from "../harness/raw-socket.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

// ---------------------------------------------------------------- protocol

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
const CANCEL_REQUEST = 80877102;
const V3_0 = 196608;
const V3_2 = 196610;
const MAX_STARTUP = 10_000;

const enc = new TextEncoder();
const dec = new TextDecoder();

function be32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** An untyped startup-phase packet: Int32 length (itself included), then the body. */
function untyped(body: Uint8Array, declared = body.length + 4): Buffer {
  return Buffer.concat([be32(declared), body]);
}

function paramBytes(params: Iterable<[string, string]>): Buffer {
  const parts: Uint8Array[] = [];
  for (const [k, v] of params) parts.push(enc.encode(`${k}\0${v}\0`));
  parts.push(Uint8Array.of(0));
  return Buffer.concat(parts);
}

function startupPacket(params: Record<string, string>, version = V3_0): Buffer {
  return untyped(Buffer.concat([be32(version), paramBytes(Object.entries(params))]));
}

function typedMessage(type: string, body: Uint8Array): Buffer {
  return Buffer.concat([Buffer.from(type, "latin1"), be32(body.length + 4), body]);
}

const queryMessage = (sql: string) => typedMessage("Q", enc.encode(`${sql}\0`));
const terminateMessage = () => typedMessage("X", new Uint8Array(0));



function hex(b: Uint8Array, max = 96): string {
  const h = Buffer.from(b.subarray(0, max)).toString("hex").replace(/(..)/g, "$1 ").trim();
  return b.length > max ? `${h} … (${b.length} bytes)` : `${h} (${b.length} bytes)`;
}

function describeBytes(b: Buffer): string {
  return `${hex(b)} ${JSON.stringify(b.subarray(0, 200).toString("latin1"))}`;
}

// ---------------------------------------------------------------- raw client

/**
 * A raw TCP client that records everything it receives and whether the
 * proxy closed. allowHalfOpen: after our FIN (end()) we still read.
 */
class RawClient extends RawSocket {
  received = Buffer.alloc(0);
  private cursor = 0;

  static async open(port: number, label = "client", host = "127.0.0.1", timeoutMs = 10_000): Promise<RawClient> {
    return new RawClient(await RawSocket.connectSocket(host, port, label, timeoutMs), label, 10_000);
  }

  protected onBytes(d: Buffer): void {
    this.received = Buffer.concat([this.received, d]);
  }

  state(): string {
    return `${this.label}: received ${describeBytes(this.received)}; peer closed: ${this.peerClosed}; error: ${this.error?.message ?? "none"}`;
  }

  /** The next single byte (the answer to SSLRequest / GSSENCRequest). */
  async readByte(what = "a one-byte answer"): Promise<number> {
    await this.waitFor(() => this.received.length > this.cursor || this.peerClosed, what);
    if (this.received.length <= this.cursor) throw new Error(`connection closed while waiting for ${what}; ${this.state()}`);
    return this.received[this.cursor++]!;
  }

  /** The next typed backend message. */
  async readMessage(what = "a message"): Promise<Message> {
    const complete = () => {
      const avail = this.received.length - this.cursor;
      return avail >= 5 && avail >= 1 + this.received.readUInt32BE(this.cursor + 1);
    };
    await this.waitFor(() => complete() || this.peerClosed, what);
    if (!complete()) throw new Error(`connection closed while waiting for ${what}; ${this.state()}`);
    const type = String.fromCharCode(this.received[this.cursor]!);
    const len = this.received.readUInt32BE(this.cursor + 1);
    const body = this.received.subarray(this.cursor + 5, this.cursor + 1 + len);
    this.cursor += 1 + len;
    return { type, body };
  }

  /** Read messages until one of type `type`; returns all read, that one last. */
  async readUntil(type: string, what = `message '${type}'`): Promise<Message[]> {
    const out: Message[] = [];
    for (;;) {
      const m = await this.readMessage(what);
      out.push(m);
      if (m.type === type) return out;
      if (m.type === "E") throw new Error(`ErrorResponse while waiting for ${what}: ${JSON.stringify(errorFields(m.body))}`);
    }
  }

  /** Expect an ErrorResponse next, then a close; returns its fields. */
  async expectError(what: string): Promise<Record<string, string>> {
    const m = await this.readMessage(`an ErrorResponse (${what})`);
    if (m.type !== "E") throw new Error(`expected ErrorResponse for ${what}, got '${m.type}' ${describeBytes(m.body)}; ${this.state()}`);
    await this.waitClosed(`the proxy to close after the ErrorResponse (${what})`);
    return errorFields(m.body);
  }

  /** Bytes not consumed by readByte / readMessage. */
  rest(): Buffer {
    return this.received.subarray(this.cursor);
  }
}

/** Send a whole first packet, half-close, and collect everything until the proxy closes. */
async function exchange(port: number, bytes: Uint8Array, label: string): Promise<RawClient> {
  const c = await RawClient.open(port, label);
  try {
    if (bytes.length > 0) await c.send(bytes);
    c.end();
    await c.waitClosed();
    return c;
  } finally {
    c.destroy();
  }
}

/** Run `fn` over `items` with at most `limit` in flight. */
async function pool<T, R>(items: readonly T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i]!, i);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return out;
}

// ---------------------------------------------------------------- fixtures

let pg: PgInstance;

beforeAll(async () => {
  pg = await startPostgres();
});

const appPw = PASSWORDS[APP_USER];
const tenantUrl = (p: ProxyHandle, tenant: string = TENANT_A) => p.url({ user: `${APP_USER}.${tenant}`, password: appPw });

function assertAlive(p: ProxyHandle): void {
  if (p.proc.exitCode !== null || p.proc.signalCode !== null) {
    throw new Error(`the proxy died (exit ${p.proc.exitCode}, signal ${p.proc.signalCode}); its output:\n${p.logs().slice(-6000)}`);
  }
}

/** How many rows of `notes` the tenant owns (counted as the superuser, directly). */
async function tenantRows(tenant: string): Promise<number> {
  const rows = await pg.sql<{ n: number }[]>`SELECT count(*)::int AS n FROM notes WHERE tenant_id = ${tenant}`;
  return rows[0]!.n;
}

/** The proxy is alive and a normal postgres.js tenant client sees exactly its rows. */
async function assertHealthy(p: ProxyHandle, tenant: string = TENANT_A): Promise<void> {
  assertAlive(p);
  const expected = await tenantRows(tenant);
  await withClient(tenantUrl(p, tenant), async (sql) => {
    const [row] = await sql`SELECT current_tenant_id() AS tenant, current_user AS usr, (SELECT count(*)::int FROM notes) AS n,
                                   (SELECT count(*)::int FROM notes WHERE tenant_id <> current_tenant_id()) AS foreign_rows`;
    expect(row).toEqual({ tenant, usr: APP_USER, n: expected, foreign_rows: 0 });
  });
  assertAlive(p);
}

/** Run fn; if it fails and the proxy has died meanwhile, say so with the proxy's last output. */
async function explainCrash(p: ProxyHandle, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    // A dead process no longer listens: a refused connection tells, without waiting on a clock.
    const listening = await RawClient.open(p.port, "liveness probe").then(
      (c) => (c.destroy(), true),
      () => false,
    );
    if (!listening) {
      const code = await Promise.race([p.exited, new Promise<string>((r) => setTimeout(() => r("still running?"), 10_000))]);
      throw new Error(
        `${(e as Error).message}\n\nTHE PROXY DIED (exit ${code}, signal ${p.proc.signalCode}); its last output:\n${p.logs().slice(-3000)}`,
      );
    }
    throw e;
  }
}

function rssKb(pid: number): number | undefined {
  const path = `/proc/${pid}/status`;
  if (!existsSync(path)) return undefined;
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(path, "utf8"));
  return m ? Number(m[1]) : undefined;
}

/**
 * Read one raw startup exchange up to ReadyForQuery, authenticating as
 * `user` with its harness password; returns the messages from
 * AuthenticationOk on.
 */
async function readStartupToReady(c: RawClient, user = `${TRUST_USER}.${TENANT_A}`): Promise<Message[]> {
  return authenticateToReady((what) => c.readMessage(what), (b) => c.send(b), passwordFor(user), user);
}

/** Answer the proxy's authentication as `user` up to AuthenticationOk (what follows is left unread). */
async function logIn(c: RawClient, user = `${TRUST_USER}.${TENANT_A}`): Promise<void> {
  await authenticate((what) => c.readMessage(what), (b) => c.send(b), passwordFor(user), user);
}

/** Simple Query on a raw client; returns the rows (text) and the command tag. */
async function rawQuery(c: RawClient, sql: string): Promise<{ rows: (string | null)[][]; tag: string }> {
  await c.send(queryMessage(sql));
  const msgs = await c.readUntil("Z", `the result of ${sql}`);
  const rows: (string | null)[][] = [];
  let tag = "";
  for (const m of msgs) {
    if (m.type === "D") {
      const n = m.body.readUInt16BE(0);
      let at = 2;
      const row: (string | null)[] = [];
      for (let i = 0; i < n; i++) {
        const len = m.body.readInt32BE(at);
        at += 4;
        if (len < 0) row.push(null);
        else {
          row.push(dec.decode(m.body.subarray(at, at + len)));
          at += len;
        }
      }
      rows.push(row);
    } else if (m.type === "C") {
      tag = dec.decode(m.body.subarray(0, m.body.indexOf(0)));
    }
  }
  return { rows, tag };
}

// ================================================================ fuzz

/**
 * What the proxy must answer to a byte stream sent as the first thing on a
 * connection, followed by the client's FIN. Written from the protocol
 * documentation, independently of src/.
 */
type Outcome =
  | { kind: "reply"; ns: number; end: "08P01" | "close" } // ns × 'N', then an ErrorResponse 08P01 or a silent close
  | { kind: "startup" }; // a well-formed StartupMessage: not a malformed case

const fatalDecoder = new TextDecoder("utf-8", { fatal: true });

function wellFormedParams(params: Buffer): boolean {
  const seen = new Set<string>();
  let at = 0;
  for (;;) {
    if (at >= params.length) return false; // no terminator
    if (params[at] === 0) return at === params.length - 1; // terminator must be last
    const keyEnd = params.indexOf(0, at);
    if (keyEnd < 0) return false;
    const valueEnd = params.indexOf(0, keyEnd + 1);
    if (valueEnd < 0) return false;
    try {
      const key = fatalDecoder.decode(params.subarray(at, keyEnd));
      fatalDecoder.decode(params.subarray(keyEnd + 1, valueEnd));
      if (seen.has(key)) return false; // duplicate parameter
      seen.add(key);
    } catch {
      return false; // not UTF-8
    }
    at = valueEnd + 1;
  }
}

function oracle(bytes: Buffer): Outcome {
  // PostgreSQL 17 direct TLS: a connection that opens with a TLS handshake
  // record (0x16). The fuzzed proxy has no certificate, so that is refused.
  if (bytes[0] === 0x16) return { kind: "reply", ns: 0, end: "08P01" };
  // Terminate ('X') before any startup packet: a driver closing a connection
  // it never used. PostgreSQL closes without a word (the length word would
  // read as 0x58…, an invalid length it only logs).
  if (bytes[0] === 0x58) return { kind: "reply", ns: 0, end: "close" };
  let at = 0;
  let ns = 0;
  // Like PostgreSQL: one SSLRequest and one GSSENCRequest per connection;
  // a repeat of either is a protocol violation.
  const asked = new Set<number>();
  for (;;) {
    if (bytes.length - at < 4) return { kind: "reply", ns, end: "close" }; // incomplete length word
    const len = bytes.readUInt32BE(at);
    if (len < 8 || len > MAX_STARTUP) return { kind: "reply", ns, end: "08P01" };
    if (bytes.length - at < len) return { kind: "reply", ns, end: "close" }; // incomplete packet, then FIN
    const body = bytes.subarray(at + 4, at + len);
    const code = body.readInt32BE(0);
    if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
      if (len !== 8 || asked.has(code)) return { kind: "reply", ns, end: "08P01" };
      asked.add(code);
      ns++;
      at += len;
      continue;
    }
    if (code === CANCEL_REQUEST) {
      // 4-byte key (3.0) up to 256-byte key (3.2).
      return body.length >= 12 && body.length <= 8 + 256 ? { kind: "reply", ns, end: "close" } : { kind: "reply", ns, end: "08P01" };
    }
    if (code >>> 16 !== 3) return { kind: "reply", ns, end: "08P01" }; // protocol 2.0, garbage
    return wellFormedParams(body.subarray(4)) ? { kind: "startup" } : { kind: "reply", ns, end: "08P01" };
  }
}

/** Check what the proxy sent against the oracle; returns a problem or undefined. */
function judge(c: RawClient, expected: Extract<Outcome, { kind: "reply" }>): string | undefined {
  const got = c.received;
  let at = 0;
  for (let i = 0; i < expected.ns; i++) {
    if (got[at] !== 0x4e) return `expected 'N' #${i + 1} at offset ${at}`;
    at++;
  }
  if (expected.end === "08P01") {
    if (got.length - at < 5 || got[at] !== 0x45) return `expected an ErrorResponse at offset ${at}`;
    const len = got.readUInt32BE(at + 1);
    if (got.length - at < 1 + len) return `truncated ErrorResponse at offset ${at}`;
    const fields = errorFields(got.subarray(at + 5, at + 1 + len));
    if (fields.C !== "08P01") return `expected SQLSTATE 08P01, got ${JSON.stringify(fields)}`;
    if (!fields.M) return "ErrorResponse without a message";
    at += 1 + len;
  }
  if (at !== got.length) return `unexpected bytes after offset ${at}`;
  if (!c.peerClosed) return "the proxy did not close the connection";
  return undefined;
}

// Arbitraries for first packets.
const anyCode = fc.oneof(
  fc.constantFrom(SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST, V3_0, V3_2, (3 << 16) | 0xffff, 2 << 16, 1 << 16, (1234 << 16) | 5681, 0, -1),
  fc.integer(),
);
const arbitraryBytes = fc.uint8Array({ maxLength: 64 }).map((b) => Buffer.from(b));
const codeAndGarbage = fc
  .tuple(anyCode, fc.uint8Array({ maxLength: 300 }))
  .map(([code, rest]) => untyped(Buffer.concat([be32(code), rest])));
const badLength = fc
  .tuple(
    fc.oneof(
      fc.integer({ min: 0, max: 7 }),
      fc.integer({ min: MAX_STARTUP + 1, max: 0xffffffff }),
      fc.constantFrom(MAX_STARTUP + 1, 0x7fffffff, 0x80000000, 0xffffffff),
    ),
    fc.uint8Array({ maxLength: 32 }),
  )
  .map(([len, rest]) => Buffer.concat([be32(len), rest]));
/** Length word off from the truth: the packet is cut short or runs into the next. */
const wrongLength = fc
  .tuple(anyCode, fc.uint8Array({ maxLength: 100 }), fc.integer({ min: -20, max: 20 }).filter((d) => d !== 0))
  .map(([code, rest, delta]) => {
    const body = Buffer.concat([be32(code), rest]);
    return untyped(body, Math.max(0, body.length + 4 + delta));
  });
const paramString = fc.oneof(
  fc.constantFrom("user", "database", "options", "application_name", "app_user.tenant_a", "trust_user.tenant_a", "postgres", ""),
  fc.string({ maxLength: 12 }).filter((s) => !s.includes("\0")),
);
const malformedStartup = fc
  .tuple(
    fc.constantFrom(V3_0, V3_2, (3 << 16) | 0xffff),
    fc.array(fc.tuple(paramString.filter((k) => k !== ""), paramString), { maxLength: 4 }),
    fc.constantFrom("noTerminator", "trailing", "unterminatedKey", "unterminatedValue", "badUtf8", "duplicate", "truncated"),
    fc.uint8Array({ minLength: 1, maxLength: 8 }),
  )
  .map(([version, params, mutation, extra]) => {
    const p = paramBytes(params);
    let tail: Buffer;
    switch (mutation) {
      case "noTerminator":
        tail = p.subarray(0, p.length - 1);
        break;
      case "trailing":
        tail = Buffer.concat([p, extra]);
        break;
      case "unterminatedKey":
        tail = Buffer.concat([p.subarray(0, p.length - 1), Buffer.from("user")]);
        break;
      case "unterminatedValue":
        tail = Buffer.concat([p.subarray(0, p.length - 1), Buffer.from("user\0x")]);
        break;
      case "badUtf8":
        tail = Buffer.concat([Buffer.from([0x75, 0xff, 0xfe, 0]), Buffer.from("x\0"), p]);
        break;
      case "duplicate":
        tail = Buffer.concat([Buffer.from("user\0a.b\0user\0c.d\0"), p]);
        break;
      default: {
        // Declares the full length, sends part of it.
        const whole = untyped(Buffer.concat([be32(version), p]));
        return whole.subarray(0, Math.max(0, whole.length - extra.length));
      }
    }
    return untyped(Buffer.concat([be32(version), tail]));
  });
const protocol2 = fc
  .tuple(fc.string({ maxLength: 31 }), fc.string({ maxLength: 63 }))
  .map(([user, db]) => {
    const body = Buffer.alloc(4 + 64 + 32 + 64 + 64 + 64);
    body.writeUInt32BE(2 << 16, 0);
    body.write(db, 4, 63, "utf8");
    body.write(user, 4 + 64, 31, "utf8");
    return untyped(body);
  });
const encryptionRequests = fc.array(fc.constantFrom(SSL_REQUEST, GSSENC_REQUEST), { maxLength: 3 }).map((codes) => Buffer.concat(codes.map((c) => untyped(be32(c)))));

const firstPacket = fc
  .tuple(encryptionRequests, fc.oneof(arbitraryBytes, codeAndGarbage, badLength, wrongLength, malformedStartup, protocol2))
  .map(([prefix, rest]) => Buffer.concat([prefix, rest]))
  .filter((b) => oracle(b).kind === "reply");

describe("oracle sanity (the fuzz expectations themselves)", () => {
  test("known packets", () => {
    expect(oracle(untyped(be32(SSL_REQUEST)))).toEqual({ kind: "reply", ns: 1, end: "close" });
    expect(oracle(Buffer.concat([untyped(be32(SSL_REQUEST)), untyped(be32(2 << 16))]))).toEqual({ kind: "reply", ns: 1, end: "08P01" });
    expect(oracle(untyped(Buffer.concat([be32(CANCEL_REQUEST), be32(1), be32(2)])))).toEqual({ kind: "reply", ns: 0, end: "close" });
    expect(oracle(be32(7))).toEqual({ kind: "reply", ns: 0, end: "08P01" });
    expect(oracle(be32(10_001))).toEqual({ kind: "reply", ns: 0, end: "08P01" });
    expect(oracle(Buffer.from([0, 0]))).toEqual({ kind: "reply", ns: 0, end: "close" });
    expect(oracle(Buffer.from([0x16]))).toEqual({ kind: "reply", ns: 0, end: "08P01" });
    expect(oracle(startupPacket({ user: "x" }))).toEqual({ kind: "startup" });
    expect(oracle(startupPacket({ user: "x" }, V3_2))).toEqual({ kind: "startup" });
  });
});

describe("fuzz: random and malformed first packets", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await startProxyFor(pg);
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  test("2,000 first packets, 25 at a time: each answered as the protocol says, the proxy stays up", async () => {
    const BATCH = 25;
    let cases = 0;
    const seen = { encryptionAnswered: 0, error08P01: 0, silentClose: 0 };
    await fc.assert(
      fc.asyncProperty(fc.array(firstPacket, { minLength: BATCH, maxLength: BATCH }), async (batch) => {
        const problems = await pool(batch, BATCH, async (bytes, i) => {
          const expected = oracle(bytes) as Extract<Outcome, { kind: "reply" }>;
          if (expected.ns > 0) seen.encryptionAnswered++;
          if (expected.end === "08P01") seen.error08P01++;
          else seen.silentClose++;
          let c: RawClient;
          try {
            c = await exchange(proxy.port, bytes, `case ${i}`);
          } catch (e) {
            return `sent ${hex(bytes)}: ${(e as Error).message}`;
          }
          const problem = judge(c, expected);
          return problem
            ? `sent ${hex(bytes)}\n    expected ${expected.ns} × 'N' then ${expected.end === "08P01" ? "ErrorResponse 08P01" : "a silent close"}\n    problem: ${problem}\n    ${c.state()}`
            : undefined;
        });
        cases += batch.length;
        assertAlive(proxy);
        const failed = problems.filter(Boolean);
        if (failed.length > 0) throw new Error(`${failed.length} of ${batch.length} cases answered wrongly:\n  ${failed.join("\n  ")}`);
      }),
      { numRuns: 80, endOnFailure: true },
    );
    expect(cases).toBe(2000);
    // The generators reach every kind of answer (a guard against a fuzz that only tests one path).
    expect(seen.encryptionAnswered).toBeGreaterThan(0);
    expect(seen.error08P01).toBeGreaterThan(0);
    expect(seen.silentClose).toBeGreaterThan(0);
    await assertHealthy(proxy);
  }, 300_000);
});

// ================================================================ lengths and layouts

describe("garbage during the proxy's own authentication (--auth proxy)", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await startProxyFor(pg);
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  const user = `${TRUST_USER}.${TENANT_A}`;
  /** A SASLInitialResponse with arbitrary mechanism and data, a raw 'p' body, or another message type. */
  const garbage = fc.oneof(
    fc.record({ mechanism: fc.constantFrom("SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "PLAIN", ""), data: fc.string({ maxLength: 120 }) }).map(({ mechanism, data }) => {
      const d = enc.encode(data);
      return typedMessage("p", Buffer.concat([enc.encode(`${mechanism}\0`), be32(d.length), d]));
    }),
    fc.uint8Array({ maxLength: 200 }).map((b) => typedMessage("p", b)),
    fc.tuple(fc.constantFrom("Q", "X", "S", "E", "p"), fc.uint8Array({ maxLength: 40 })).map(([t, b]) => typedMessage(t, b)),
  );

  test("300 random first answers to the SASL request: an ErrorResponse (08P01 or 28P01) or a close, never AuthenticationOk; the proxy serves on", async () => {
    const cases = fc.sample(garbage, { numRuns: 300, seed: 20261130 });
    const seen = new Map<string, number>();
    await pool(cases, 20, async (bytes, i) => {
      const c = await RawClient.open(proxy.port, `garbage auth ${i}`);
      try {
        await c.send(startupPacket({ user, database: pg.database }));
        const sasl = await c.readMessage("the SASL request");
        expect(sasl.type).toBe("R");
        expect(sasl.body.readInt32BE(0)).toBe(10);
        await c.send(bytes);
        c.end();
        await c.waitClosed();
        const rest = c.rest();
        // Whatever came back, it is no AuthenticationOk: at most an error.
        if (rest.length > 0) {
          expect(String.fromCharCode(rest[0]!)).toMatch(/^[ER]$/);
          if (rest[0] === 0x52) expect(rest.readInt32BE(5)).toBe(11); // a SASL continue for a well-formed first message
          const e = rest.indexOf(0x45);
          if (e >= 0) {
            const code = errorFields(rest.subarray(e + 5, e + 1 + rest.readUInt32BE(e + 1))).C!;
            expect(code).toMatch(/^(08P01|28P01)$/);
            seen.set(code, (seen.get(code) ?? 0) + 1);
          }
        }
      } finally {
        c.destroy();
      }
    });
    expect(seen.get("08P01") ?? 0).toBeGreaterThan(0);
    await assertHealthy(proxy);
  }, 300_000);

  test("superuser logins are relayed a bounded number at a time: the 17th at once gets 53300, nobody's slots are taken", async () => {
    const parked: RawClient[] = [];
    try {
      for (let i = 0; i < 16; i++) {
        const c = await RawClient.open(proxy.port, `relayed ${i}`);
        parked.push(c);
        await c.send(startupPacket({ user: "postgres", database: pg.database }));
        expect((await c.readMessage("the server's authentication request, relayed")).type).toBe("R");
      }
      const extra = await RawClient.open(proxy.port, "relayed 17");
      try {
        await extra.send(startupPacket({ user: "postgres", database: pg.database }));
        const f = await extra.expectError("too many relayed logins");
        expect({ C: f.C, M: f.M }).toEqual({ C: "53300", M: "too many superuser logins in progress through multigres" });
      } finally {
        extra.destroy();
      }
      // Tenants log in at the proxy, unaffected.
      await assertHealthy(proxy);
    } finally {
      for (const c of parked) c.destroy();
    }
    // The places come back as those logins end.
    await withClient(proxy.url({ user: "postgres", password: PASSWORDS.postgres }), async (sql) => {
      expect((await sql`SELECT current_user AS u`)[0]!.u).toBe("postgres");
    });
  });

  test("a user name with line breaks cannot forge a log line (pretty format)", async () => {
    const forged = `x] forged\n2026-11-30T06:30:00.000Z info  [c77 app_user/tenant_b] session ready, tenant context set`;
    const err = await connectError(proxy.url({ user: `${forged}.${TENANT_A}`, password: "nope" }));
    expect(err.code).toBe("28P01");
    await proxy.waitForLog(/authentication failed for user "x\] forged\?2026/);
    expect(proxy.logs()).not.toMatch(/^2026-11-30T06:30:00\.000Z info {2}\[c77/m);
  });

  test("a correct SCRAM exchange with the proof of another password: 28P01, and the next client logs in", async () => {
    const c = await RawClient.open(proxy.port, "wrong proof");
    try {
      await c.send(startupPacket({ user, database: pg.database }));
      await expect(authenticate((what) => c.readMessage(what), (b) => c.send(b), "not-the-password", user)).rejects.toThrow(/"C":"28P01"/);
    } finally {
      c.destroy();
    }
    await assertHealthy(proxy);
  });
});

describe("malformed lengths and layouts", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await startProxyFor(pg);
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  test("Terminate before the startup packet: closed without a reply, as PostgreSQL does", async () => {
    const c = await exchange(proxy.port, typedMessage("X", new Uint8Array(0)), "terminate first");
    expect(c.received.length).toBe(0);
    expect(c.peerClosed).toBe(true);
    await assertHealthy(proxy);
  });

  test("protocol 2.0 startup → 08P01 naming the version", async () => {
    const body = Buffer.alloc(4 + 64 + 32 + 64 + 64 + 64);
    body.writeUInt32BE(2 << 16, 0);
    body.write(pg.database, 4);
    body.write(`${TRUST_USER}.${TENANT_A}`, 4 + 64);
    const c = await RawClient.open(proxy.port, "protocol 2.0");
    try {
      await c.send(untyped(body));
      const f = await c.expectError("protocol 2.0 startup");
      expect(f.C).toBe("08P01");
      expect(f.M).toMatch(/2\.0/);
      expect(c.rest().length).toBe(0);
    } finally {
      c.destroy();
    }
  });

  test("length words below 8 → 08P01 at once", async () => {
    for (const len of [0, 1, 4, 7]) {
      const c = await RawClient.open(proxy.port, `length ${len}`);
      try {
        await c.send(Buffer.concat([be32(len), be32(V3_0)]));
        expect((await c.expectError(`length ${len}`)).C).toBe("08P01");
      } finally {
        c.destroy();
      }
    }
  });

  test("length words above 10,000 → 08P01 as soon as the length word is in (the body is never awaited)", async () => {
    for (const len of [MAX_STARTUP + 1, 65_536, 1 << 30, 0x7fffffff, 0x80000000, 0xffffffff]) {
      const c = await RawClient.open(proxy.port, `length ${len}`);
      try {
        // Only the length word and a version: the proxy must answer without the rest.
        await c.send(Buffer.concat([be32(len), be32(V3_0)]));
        const f = await c.expectError(`length ${len}`);
        expect(f.C).toBe("08P01");
        expect(f.M).toMatch(/length/);
      } finally {
        c.destroy();
      }
    }
  });

  test("hundreds of connections claiming 2 GB packets do not grow the proxy's memory", async () => {
    const before = rssKb(proxy.pid);
    await pool(Array.from({ length: 300 }, (_, i) => i), 30, async (i) => {
      const c = await RawClient.open(proxy.port, `huge ${i}`);
      try {
        await c.send(Buffer.concat([be32(0x7fffffff), be32(V3_0), Buffer.from("user\0")]));
        expect((await c.expectError("a 2 GB length")).C).toBe("08P01");
      } finally {
        c.destroy();
      }
    });
    const after = rssKb(proxy.pid);
    if (before !== undefined && after !== undefined) {
      // Allocating even one claimed packet would add 2 GB; noise is a few MB.
      expect(after - before).toBeLessThan(128 * 1024);
    }
    await assertHealthy(proxy);
  });

  test("exactly 10,000 bytes is accepted as a packet (here refused for its user, 28000), 10,001 is not", async () => {
    const build = (total: number) => {
      const head = paramBytes([["user", "no_tenant_here"], ["database", pg.database]]).subarray(0, -1);
      const fixed = 4 + 4 + head.length + "application_name\0".length + 1 + 1;
      const pad = "x".repeat(total - fixed);
      const p = untyped(Buffer.concat([be32(V3_0), head, Buffer.from(`application_name\0${pad}\0\0`)]));
      expect(p.length).toBe(total);
      return p;
    };
    const ok = await RawClient.open(proxy.port, "10000 bytes");
    try {
      await ok.send(build(MAX_STARTUP));
      const f = await ok.expectError("a 10,000-byte startup packet with a tenantless user");
      expect(f.C).toBe("28000");
    } finally {
      ok.destroy();
    }
    const over = await RawClient.open(proxy.port, "10001 bytes");
    try {
      await over.send(build(MAX_STARTUP + 1));
      expect((await over.expectError("a 10,001-byte startup packet")).C).toBe("08P01");
    } finally {
      over.destroy();
    }
  });

  test("truncated packets followed by a close: the proxy closes too, with at most an 08P01", async () => {
    const whole = startupPacket({ user: `${TRUST_USER}.${TENANT_A}`, database: pg.database });
    const truncated = [
      whole.subarray(0, 2), // part of the length word
      whole.subarray(0, 4), // the length word only
      whole.subarray(0, 9),
      whole.subarray(0, whole.length - 1), // all but the terminator
      untyped(be32(SSL_REQUEST)).subarray(0, 6),
      Buffer.concat([be32(100), Buffer.alloc(20)]),
    ];
    for (const bytes of truncated) {
      const c = await exchange(proxy.port, bytes, `truncated ${hex(bytes, 12)}`);
      if (c.received.length > 0) {
        expect(c.received[0]).toBe(0x45);
        expect(errorFields(c.received.subarray(5)).C).toBe("08P01");
      }
    }
    // Truncated, then the client vanishes without a FIN being read back.
    for (const bytes of truncated) {
      const c = await RawClient.open(proxy.port, "truncated then destroyed");
      await c.send(bytes);
      c.destroy();
    }
    await assertHealthy(proxy);
  });

  test("an immediate close with nothing sent, many times over", async () => {
    await pool(Array.from({ length: 100 }, (_, i) => i), 20, async (i) => {
      const c = await exchange(proxy.port, new Uint8Array(0), `empty ${i}`);
      expect(c.received.length).toBe(0);
    });
    await assertHealthy(proxy);
  });

  test("garbage during SCRAM authentication: a huge length → 08P01", async () => {
    const c = await RawClient.open(proxy.port, "scram garbage");
    try {
      await c.send(startupPacket({ user: `${APP_USER}.${TENANT_A}`, database: pg.database }));
      const r = await c.readMessage("the SASL request");
      expect(r.type).toBe("R");
      expect(r.body.readInt32BE(0)).toBe(10); // AuthenticationSASL
      await c.send(Buffer.concat([Buffer.from("p"), be32(0x7fffffff), Buffer.from("junk")]));
      expect((await c.expectError("a 2 GB SASLInitialResponse")).C).toBe("08P01");
    } finally {
      c.destroy();
    }
  });

  test("an unexpected message during authentication (a Query instead of a password) → 08P01", async () => {
    const c = await RawClient.open(proxy.port, "query during auth");
    try {
      await c.send(startupPacket({ user: `${APP_USER}.${TENANT_A}`, database: pg.database }));
      expect((await c.readMessage("the SASL request")).type).toBe("R");
      await c.send(queryMessage("SELECT * FROM notes"));
      expect((await c.expectError("a Query during authentication")).C).toBe("08P01");
    } finally {
      c.destroy();
    }
    await assertHealthy(proxy);
  });
});

// ================================================================ slow partial packet

describe("slow partial packet", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await startProxyFor(pg);
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  test("a startup packet trickled one byte at a time while others connect and query; it connects in the end", async () => {
    const packet = startupPacket({ user: `${TRUST_USER}.${TENANT_A}`, database: pg.database, application_name: "trickle" });
    const slow = await RawClient.open(proxy.port, "trickler");
    const pacer = connect(tenantUrl(proxy, TENANT_B));
    let trickling = true;
    const served = [0, 0, 0, 0];
    const expectedB = await tenantRows(TENANT_B);

    // Other clients: each opens fresh connections and queries until the trickle is done (at least once).
    const workers = served.map(async (_, w) => {
      const tenant = w % 2 === 0 ? TENANT_A : TENANT_B;
      const expected = await tenantRows(tenant);
      do {
        await withClient(tenantUrl(proxy, tenant), async (sql) => {
          for (let q = 0; q < 3; q++) {
            const [row] = await sql`SELECT current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes) AS n`;
            expect(row).toEqual({ tenant, n: expected });
          }
        });
        served[w]!++;
      } while (trickling);
    });

    try {
      for (let i = 0; i < packet.length; i++) {
        await slow.send(packet.subarray(i, i + 1));
        // Pace the trickle by round trips of another session through the same proxy.
        const [row] = await pacer`SELECT current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes) AS n`;
        expect(row).toEqual({ tenant: TENANT_B, n: expectedB });
        if (i < packet.length - 1) expect(slow.received.length).toBe(0); // nothing answered to a partial packet
      }
      trickling = false;
      await Promise.all(workers);
      for (const n of served) expect(n).toBeGreaterThan(0);

      // The trickled packet was a good one: the session comes up in its tenant.
      const msgs = await readStartupToReady(slow);
      expect(msgs[0]!.type).toBe("R");
      expect(msgs[0]!.body.readInt32BE(0)).toBe(0);
      const { rows } = await rawQuery(slow, "SELECT current_tenant_id(), current_setting('application_name')");
      expect(rows).toEqual([[TENANT_A, "trickle"]]);
      await slow.send(terminateMessage());
    } finally {
      trickling = false;
      await Promise.allSettled(workers);
      slow.destroy();
      await pacer.end({ timeout: 5 }).catch(() => {});
    }
    await assertHealthy(proxy);
  });
});

// ================================================================ startup timeout

describe("startup timeout (--startup-timeout 500)", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await startProxyFor(pg, { args: ["--startup-timeout", "500"] });
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  /** Whatever a dropped client got must be (at most) one ErrorResponse. */
  function expectAtMostAnError(c: RawClient, skip = 0): void {
    const rest = c.received.subarray(skip);
    if (rest.length === 0) return;
    expect(String.fromCharCode(rest[0]!)).toBe("E");
    expect(rest.length).toBe(1 + rest.readUInt32BE(1));
    expect(errorFields(rest.subarray(5)).S).toBe("FATAL");
  }

  test("half a startup packet, nothing at all, or a stalled SCRAM exchange: dropped; an established session survives", async () => {
    // Established before the stalled clients start, so by the time they are
    // dropped this session is older than the timeout too.
    const established = connect(tenantUrl(proxy));
    const [first] = await established`SELECT current_tenant_id() AS tenant`;
    expect(first).toEqual({ tenant: TENANT_A });

    const whole = startupPacket({ user: `${TRUST_USER}.${TENANT_A}`, database: pg.database });
    const half = await RawClient.open(proxy.port, "half a startup packet");
    const silent = await RawClient.open(proxy.port, "silent client");
    const scram = await RawClient.open(proxy.port, "stalled SCRAM");
    try {
      await half.send(whole.subarray(0, Math.floor(whole.length / 2)));
      await scram.send(startupPacket({ user: `${APP_USER}.${TENANT_A}`, database: pg.database }));
      const sasl = await scram.readMessage("the SASL request");
      expect(sasl.type).toBe("R");

      await Promise.all([
        half.waitClosed("the startup timeout to drop the half-packet client", 30_000),
        silent.waitClosed("the startup timeout to drop the silent client", 30_000),
        scram.waitClosed("the startup timeout to drop the stalled SCRAM client", 30_000),
      ]);
      expectAtMostAnError(half);
      expectAtMostAnError(silent);
      expectAtMostAnError(scram, scram.received.length - scram.rest().length);

      // The session that finished its startup in time is not subject to the timeout.
      const [again] = await established`SELECT current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes WHERE tenant_id <> current_tenant_id()) AS foreign_rows`;
      expect(again).toEqual({ tenant: TENANT_A, foreign_rows: 0 });
    } finally {
      half.destroy();
      silent.destroy();
      scram.destroy();
      await established.end({ timeout: 5 }).catch(() => {});
    }
    await assertHealthy(proxy);
  }, 60_000);
});

// ================================================================ protocol 3.2

describe("PG18-style StartupMessage 3.2", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await startProxyFor(pg);
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  function readNegotiate(m: Message): { newest: number; options: string[] } {
    expect(m.type).toBe("v");
    const newest = m.body.readUInt32BE(0);
    const n = m.body.readUInt32BE(4);
    const options: string[] = [];
    let at = 8;
    for (let i = 0; i < n; i++) {
      const nul = m.body.indexOf(0, at);
      options.push(dec.decode(m.body.subarray(at, nul)));
      at = nul + 1;
    }
    expect(at).toBe(m.body.length);
    return { newest, options };
  }

  const cases: { name: string; version: number; extra: Record<string, string>; options: string[] }[] = [
    { name: "3.2 with _pq_.test_option", version: V3_2, extra: { "_pq_.test_option": "on" }, options: ["_pq_.test_option"] },
    { name: "3.2 with no options", version: V3_2, extra: {}, options: [] },
    { name: "3.0 with _pq_.test_option", version: V3_0, extra: { "_pq_.test_option": "on" }, options: ["_pq_.test_option"] },
  ];
  for (const tc of cases) {
    test(`${tc.name}: NegotiateProtocolVersion, then the normal startup and a query in the tenant context`, async () => {
      const c = await RawClient.open(proxy.port, tc.name);
      try {
        await c.send(startupPacket({ user: `${TRUST_USER}.${TENANT_A}`, database: pg.database, ...tc.extra }, tc.version));
        const v = readNegotiate(await c.readMessage("NegotiateProtocolVersion"));
        expect(v).toEqual({ newest: V3_0, options: tc.options }); // newest minor 0: 3.0

        const msgs = await readStartupToReady(c);
        expect(msgs[0]!.type).toBe("R");
        expect(msgs[0]!.body.readInt32BE(0)).toBe(0); // AuthenticationOk
        const types = msgs.map((m) => m.type);
        expect(types.at(-1)).toBe("Z");
        expect(types.filter((t) => t === "K")).toHaveLength(1);
        const key = msgs.find((m) => m.type === "K")!;
        expect(key.body.length).toBe(8); // 3.0 BackendKeyData: pid and a 4-byte key
        expect(types.every((t) => "RSKZN".includes(t))).toBe(true);

        const expected = await tenantRows(TENANT_A);
        const { rows, tag } = await rawQuery(c, "SELECT current_tenant_id(), current_user, count(*) FROM notes");
        expect(rows).toEqual([[TENANT_A, TRUST_USER, String(expected)]]);
        expect(tag).toBe("SELECT 1");
        await c.send(terminateMessage());
        await c.waitClosed("the proxy to close after Terminate");
      } finally {
        c.destroy();
      }
    });
  }

  test("SSLRequest, 'N', then a 3.2 startup on the same connection", async () => {
    const c = await RawClient.open(proxy.port, "ssl then 3.2");
    try {
      await c.send(untyped(be32(SSL_REQUEST)));
      expect(String.fromCharCode(await c.readByte("the answer to SSLRequest"))).toBe("N");
      await c.send(startupPacket({ user: `${TRUST_USER}.${TENANT_B}`, database: pg.database, "_pq_.test_option": "1" }, V3_2));
      expect(readNegotiate(await c.readMessage("NegotiateProtocolVersion")).newest).toBe(V3_0);
      await readStartupToReady(c);
      expect((await rawQuery(c, "SELECT current_tenant_id()")).rows).toEqual([[TENANT_B]]);
    } finally {
      c.destroy();
    }
    await assertHealthy(proxy);
  });
});

// ================================================================ upstream down

describe("upstream down", () => {
  let proxy: ProxyHandle;
  let downPort: number;
  beforeAll(async () => {
    downPort = await freePort(); // free now, nobody listens on it
    proxy = await startProxy({ upstreamPort: downPort, database: pg.database });
  });
  afterAll(async () => {
    await proxy?.stop();
  });

  test("raw startup → 08006 with a message naming the upstream", async () => {
    const c = await RawClient.open(proxy.port, "upstream down");
    try {
      await c.send(startupPacket({ user: `${TRUST_USER}.${TENANT_A}`, database: pg.database }));
      await logIn(c); // the proxy authenticates the client before it connects upstream
      const f = await c.expectError("an unreachable upstream");
      expect(f.C).toBe("08006");
      expect(f.M).toContain(`127.0.0.1:${downPort}`);
      expect(f.M).toMatch(/could not connect/i);
    } finally {
      c.destroy();
    }
  });

  test("postgres.js and psql get 08006; 50 concurrent attempts too; the proxy stays up", async () => {
    const e = await connectError(tenantUrl(proxy));
    expect(e.code).toBe("08006");
    const r = await psql(tenantUrl(proxy), "SELECT 1");
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr).toMatch(/could not connect to the upstream/);

    const codes = await pool(Array.from({ length: 50 }, (_, i) => i), 50, async (i) => {
      const c = await RawClient.open(proxy.port, `down ${i}`);
      try {
        await c.send(startupPacket({ user: `${APP_USER}.${TENANT_B}`, database: pg.database }));
        await logIn(c, `${APP_USER}.${TENANT_B}`);
        return (await c.expectError("an unreachable upstream")).C;
      } finally {
        c.destroy();
      }
    });
    expect(new Set(codes)).toEqual(new Set(["08006"]));
    assertAlive(proxy);

    // Still answering the startup protocol.
    const ssl = await RawClient.open(proxy.port, "ssl while down");
    try {
      await ssl.send(untyped(be32(SSL_REQUEST)));
      expect(String.fromCharCode(await ssl.readByte())).toBe("N");
    } finally {
      ssl.destroy();
    }
  });

  test("once the upstream is back, the same proxy serves tenants again", async () => {
    // A relay on the port the proxy points at, forwarding to the real server.
    const sockets = new Set<Socket>();
    const relay: Server = createServer((client) => {
      const server = createConnection({ host: pg.host, port: pg.port });
      for (const s of [client, server]) {
        sockets.add(s);
        s.on("error", () => {});
        s.on("close", () => {
          client.destroy();
          server.destroy();
        });
      }
      client.pipe(server);
      server.pipe(client);
    });
    await new Promise<void>((res, rej) => {
      relay.once("error", (e) => rej(new Error(`could not listen on the freed port ${downPort} again: ${e.message}`)));
      relay.listen(downPort, "127.0.0.1", () => res());
    });
    try {
      await assertHealthy(proxy);
      await assertHealthy(proxy, TENANT_B);
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise<void>((res) => relay.close(() => res()));
    }
  });
});

// ================================================================ forbidden startup parameters

describe("forbidden startup parameters", () => {
  let tap: Tap;
  let proxy: ProxyHandle;
  beforeAll(async () => {
    tap = await startTap({ host: pg.host, port: pg.port });
    proxy = await startProxy({ upstreamPort: tap.port, database: pg.database });
  });
  afterAll(async () => {
    await proxy?.stop();
    await tap?.stop();
  });

  /** Startup packets seen by the tap (i.e. by Postgres) that carry any of these parameters. */
  const reachedServer = (params: Record<string, string>) =>
    tap.connections
      .filter((c) => c.startup)
      .filter((c) =>
        Object.entries(params).some(([k, v]) =>
          Object.entries(c.startup!).some(([sk, sv]) => sk.toLowerCase() === k.toLowerCase() && sv === v),
        ),
      )
      .map((c) => c.startup);

  const forbidden: [string, Record<string, string>][] = [
    ["app.current_tenant_id as a parameter", { "app.current_tenant_id": TENANT_B }],
    ["APP.CURRENT_TENANT_ID (any case)", { "APP.CURRENT_TENANT_ID": TENANT_B }],
    ["role as a parameter", { role: "postgres" }],
    ["session_authorization as a parameter", { session_authorization: "postgres" }],
    ["options=-c role=postgres", { options: "-c role=postgres" }],
    ["options=-crole=postgres", { options: "-crole=postgres" }],
    ["options=--role=postgres", { options: "--role=postgres" }],
    ["options=-c app.current_tenant_id=tenant_b", { options: `-c app.current_tenant_id=${TENANT_B}` }],
    ["options with an escaped space before the forbidden switch", { options: "-c application_name=a\\ b -c role=postgres" }],
  ];

  for (const [name, params] of forbidden) {
    test(`${name} → 28000 (postgres.js and raw), nothing reaches the server`, async () => {
      const e = await connectError(tenantUrl(proxy), { connection: params });
      expect(e.code).toBe("28000");
      expect(e.message).toMatch(/not allowed/);

      const c = await RawClient.open(proxy.port, name);
      try {
        await c.send(startupPacket({ user: `${TRUST_USER}.${TENANT_A}`, database: pg.database, ...params }));
        expect((await c.expectError(name)).C).toBe("28000");
      } finally {
        c.destroy();
      }
      expect(reachedServer(params)).toEqual([]);
    });
  }

  test("psql with PGOPTIONS='-c role=postgres' → refused with 28000's message; nothing reaches the server", async () => {
    const r = await psql(tenantUrl(proxy), "SELECT current_user", { env: { PGOPTIONS: "-c role=postgres" } });
    expect(r.exitCode).not.toBe(0);
    expect(r.stderr).toMatch(/not allowed/);
    expect(reachedServer({ options: "-c role=postgres" })).toEqual([]);
  });

  test("harmless options and application_name pass and take effect", async () => {
    await withClient(
      tenantUrl(proxy),
      async (sql) => {
        const [row] = await sql`SELECT current_setting('statement_timeout') AS st, current_setting('application_name') AS app,
                                       current_tenant_id() AS tenant, current_user AS usr`;
        expect(row).toEqual({ st: "5s", app: "controller", tenant: TENANT_A, usr: APP_USER });
      },
      { connection: { options: "-c statement_timeout=5s", application_name: "controller" } },
    );
    const last = await tap.waitForStartup((p) => p.application_name === "controller");
    expect(last.startup?.options).toBe("-c statement_timeout=5s");
    await assertHealthy(proxy);
  });
});

// ================================================================ misbehaving upstream

describe("misbehaving upstream", () => {
  /** A fake server that reads the proxy's startup packet, then does `behave`. */
  let fake: Server;
  let behave: (s: Socket) => void = (s) => s.destroy();
  let fakePort: number;
  const sockets = new Set<Socket>();

  beforeAll(async () => {
    fake = createServer((s) => {
      sockets.add(s);
      s.on("error", () => {});
      s.on("close", () => sockets.delete(s));
      // Decline SSLRequest / GSSENCRequest like a server without TLS; misbehave after the StartupMessage.
      let buf = Buffer.alloc(0);
      const onData = (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        while (buf.length >= 8 && buf.length >= buf.readUInt32BE(0)) {
          const len = buf.readUInt32BE(0);
          const code = buf.readInt32BE(4);
          buf = buf.subarray(len);
          if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
            s.write("N");
            continue;
          }
          s.off("data", onData);
          behave(s);
          return;
        }
      };
      s.on("data", onData);
    });
    await new Promise<void>((res) => fake.listen(0, "127.0.0.1", () => res()));
    fakePort = (fake.address() as { port: number }).port;
  });
  afterAll(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((res) => fake?.close(() => res()));
  });

  const R = (code: number, extra: number[] = []) => typedMessage("R", Uint8Array.from([...be32(code), ...extra]));
  const behaviours: [string, (s: Socket) => void][] = [
    ["is silent, then closes", (s) => s.end()],
    ["closes right after the startup packet", (s) => s.destroy()],
    ["answers with a 2 GB message length", (s) => s.write(Buffer.concat([Buffer.from("R"), be32(0x7fffffff)]))],
    ["answers with a message length below 4", (s) => s.write(Buffer.from([0x52, 0, 0, 0, 2]))],
    ["sends an Authentication message with no code", (s) => s.write(Buffer.from([0x52, 0, 0, 0, 5, 1]))],
    ["sends AuthenticationMD5Password with a 2-byte salt", (s) => s.write(typedMessage("R", Uint8Array.from([0, 0, 0, 5, 1, 2])))],
    ["sends AuthenticationOk then a 3-byte BackendKeyData", (s) => s.write(Buffer.concat([R(0), typedMessage("K", Uint8Array.of(1, 2, 3))]))],
    ["sends a DataRow during authentication", (s) => s.write(typedMessage("D", Uint8Array.of(0, 0)))],
    ["sends AuthenticationOk then ReadyForQuery without BackendKeyData", (s) => s.write(Buffer.concat([R(0), typedMessage("Z", Buffer.from("I"))]))],
    ["offers only SCRAM-SHA-256-PLUS", (s) => s.write(typedMessage("R", Buffer.concat([be32(10), Buffer.from("SCRAM-SHA-256-PLUS\0\0")])))],
    ["asks for GSSAPI", (s) => s.write(R(7))],
  ];

  // Passthrough: the client's own login meets the upstream. Proxy: the
  // client logs in at the proxy, then the proxy's own login meets it.
  for (const [name, b] of behaviours) for (const auth of ["passthrough", "proxy"] as const) {
    test(`upstream ${name} (--auth ${auth}): the client gets an ErrorResponse and a close, the proxy stays up`, async () => {
      behave = b;
      // A proxy per case, so that one crash does not hide the verdict on the others.
      const proxy = await startProxy({ upstreamPort: fakePort, auth });
      try {
        await explainCrash(proxy, async () => {
          const c = await RawClient.open(proxy.port, name);
          try {
            await c.send(startupPacket({ user: `${TRUST_USER}.${TENANT_A}`, database: "db" }));
            if (auth === "proxy") await logIn(c);
            let m = await c.readMessage(`an ErrorResponse when the upstream ${name}`);
            // AuthenticationOk is relayed before the server's next message is judged.
            if (m.type === "R" && m.body.readInt32BE(0) === 0) m = await c.readMessage(`an ErrorResponse when the upstream ${name}`);
            expect(m.type).toBe("E");
            expect(errorFields(m.body).C).toMatch(/^(08P01|08006|28000)$/);
            await c.waitClosed();
          } finally {
            c.destroy();
          }
          assertAlive(proxy);
          // The proxy still answers the next client.
          const ssl = await RawClient.open(proxy.port, "ssl after a bad upstream");
          try {
            await ssl.send(untyped(be32(SSL_REQUEST)));
            expect(String.fromCharCode(await ssl.readByte())).toBe("N");
          } finally {
            ssl.destroy();
          }
          assertAlive(proxy);
        });
      } finally {
        await proxy.stop();
      }
    });
  }
});
