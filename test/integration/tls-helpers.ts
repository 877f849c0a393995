/**
 * Helpers for the TLS and operations tests (test/integration/tls.test.ts,
 * operations.test.ts):
 *
 * - makeTestPki(): a throwaway CA made with openssl, server certificates it
 *   signs (CN=localhost, SAN DNS:localhost + IP:127.0.0.1, chosen serials)
 *   and an unrelated CA, for "not trusted" cases.
 * - enableUpstreamSsl() / disableUpstreamSsl(): turn ssl on/off on the
 *   harness's PostgreSQL with ALTER SYSTEM, and wait (bounded) until new
 *   connections see it.
 * - Wire: a small raw protocol client over a net or TLS socket, for what real
 *   drivers hide (the exact ErrorResponse a session gets at shutdown, direct
 *   TLS with ALPN, the byte answering an SSLRequest).
 * - HTTP and log helpers: the health listener's port from the proxy log,
 *   JSON log lines, waiting for a log condition.
 */
import { authenticateToReady, dataRow, errorFields, type Message } from "../harness/raw-socket.ts";
export { errorFields, type Message };
import { chownSync, chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import postgres from "postgres";
import { startupMessage } from "../../src/protocol/messages.ts";
import { passwordFor, startProxyFor, type PgInstance, type ProxyHandle } from "../harness/index.ts";

// ------------------------------------------------------------------ openssl

function openssl(args: string[], cwd: string): void {
  const r = Bun.spawnSync(["openssl", ...args], { cwd, stdout: "pipe", stderr: "pipe" });
  if (r.exitCode !== 0) {
    throw new Error(`openssl ${args.join(" ")} failed (exit ${r.exitCode}):\n${r.stdout.toString()}${r.stderr.toString()}`);
  }
}

export interface CertFiles {
  cert: string;
  key: string;
  /** Serial number as node reports it (upper-case hex, no leading zeros). */
  serial: string;
}

export interface TestPki {
  dir: string;
  /** CA certificate (PEM path) that signed `server` and `server2`. */
  ca: string;
  caPem: string;
  /** CN=localhost, SAN DNS:localhost, IP:127.0.0.1. */
  server: CertFiles;
  /** Same names, another key and serial: the "renewed" certificate. */
  server2: CertFiles;
  /** A CA that signed nothing we use. */
  otherCa: string;
  /** A client certificate from the CA for `cn` (pg_hba method cert matches the CN to the role). */
  client(cn: string): CertFiles;
  cleanup(): void;
}

const CA_CONFIG = `
[req]
distinguished_name = dn
prompt = no
[dn]
CN = placeholder
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
`;

/** A fresh CA and server certificates in a temp dir (EC P-256: fast to make). */
export function makeTestPki(): TestPki {
  const dir = mkdtempSync(join(tmpdir(), "multigres-pki-"));
  writeFileSync(join(dir, "openssl.cnf"), CA_CONFIG);
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  const makeCa = (name: string, cn: string) =>
    openssl(["req", "-x509", "-config", "openssl.cnf", "-extensions", "ca", ...ec, "-keyout", `${name}.key`, "-out", `${name}.crt`, "-days", "2", "-subj", `/CN=${cn}`], dir);
  makeCa("ca", "Multigres Test CA");
  makeCa("other-ca", "Unrelated Test CA");
  const issue = (name: string, serial: string, cn: string, extensions: "server" | "client"): CertFiles => {
    openssl(["req", "-new", "-config", "openssl.cnf", ...ec, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${cn}`], dir);
    openssl(
      ["x509", "-req", "-in", `${name}.csr`, "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial", `0x${serial}`, "-days", "2",
        "-extfile", "openssl.cnf", "-extensions", extensions, "-out", `${name}.crt`],
      dir,
    );
    chmodSync(join(dir, `${name}.key`), 0o600);
    return { cert: join(dir, `${name}.crt`), key: join(dir, `${name}.key`), serial };
  };
  const server = issue("server", "5EC0A1", "localhost", "server");
  const server2 = issue("server2", "5EC0B2", "localhost", "server");
  let clients = 0;
  return {
    dir,
    ca: join(dir, "ca.crt"),
    caPem: readFileSync(join(dir, "ca.crt"), "utf8"),
    server,
    server2,
    otherCa: join(dir, "other-ca.crt"),
    client: (cn) => issue(`client-${++clients}`, `C1E47${clients}`, cn, "client"),
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

// ------------------------------------------------------- upstream ssl = on

const isRoot = typeof process.getuid === "function" && process.getuid() === 0;

function postgresIds(): { uid: number; gid: number } {
  const id = (flag: string) => Bun.spawnSync(["id", flag, "postgres"], { stdout: "pipe" }).stdout.toString().trim();
  return { uid: Number(id("-u")), gid: Number(id("-g")) };
}

/**
 * Copies of a certificate and key the server process can read (key 0600,
 * owned by it), and of the CA it checks client certificates against.
 */
export function serverSslFiles(cert: CertFiles, ca?: string): { dir: string; cert: string; key: string; ca?: string } {
  const dir = mkdtempSync(join(tmpdir(), "multigres-pgssl-"));
  const certPath = join(dir, "server.crt");
  const keyPath = join(dir, "server.key");
  const caPath = ca ? join(dir, "ca.crt") : undefined;
  writeFileSync(certPath, readFileSync(cert.cert));
  writeFileSync(keyPath, readFileSync(cert.key), { mode: 0o600 });
  if (ca && caPath) writeFileSync(caPath, readFileSync(ca));
  if (isRoot) {
    // The managed cluster runs as the postgres OS user.
    const { uid, gid } = postgresIds();
    for (const p of [dir, certPath, keyPath, caPath]) if (p) chownSync(p, uid, gid);
  }
  return { dir, cert: certPath, key: keyPath, ca: caPath };
}

/**
 * Poll (bounded) until a brand-new direct connection sees TLS as wanted:
 * pg_reload_conf() only signals the postmaster, which applies it later.
 */
async function waitForUpstreamSsl(pg: PgInstance, want: boolean, timeoutMs = 20_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last = "";
  for (;;) {
    const sql = postgres(pg.adminUrl, { max: 1, ssl: want ? "require" : "prefer", onnotice: () => {}, connect_timeout: 5 });
    try {
      const [row] = await sql`select ssl from pg_stat_ssl where pid = pg_backend_pid()`;
      if (row?.ssl === want) return;
      last = `pg_stat_ssl.ssl = ${row?.ssl}`;
    } catch (e) {
      last = (e as Error).message;
    } finally {
      await sql.end({ timeout: 1 }).catch(() => {});
    }
    if (Date.now() > deadline) {
      throw new Error(`PostgreSQL did not ${want ? "enable" : "disable"} ssl within ${timeoutMs} ms (last: ${last})\nserver log tail:\n${pg.serverLog().slice(-3000)}`);
    }
    await Bun.sleep(100); // poll interval, not synchronisation: the loop checks the condition
  }
}

/** ALTER SYSTEM ssl = on with this certificate, reload, wait until it applies. */
export async function enableUpstreamSsl(pg: PgInstance, files: { cert: string; key: string; ca?: string }): Promise<void> {
  const lit = (s: string) => `'${s.replaceAll("'", "''")}'`;
  await pg.sql.unsafe(`ALTER SYSTEM SET ssl_cert_file = ${lit(files.cert)}`);
  await pg.sql.unsafe(`ALTER SYSTEM SET ssl_key_file = ${lit(files.key)}`);
  if (files.ca) await pg.sql.unsafe(`ALTER SYSTEM SET ssl_ca_file = ${lit(files.ca)}`);
  await pg.sql.unsafe(`ALTER SYSTEM SET ssl = on`);
  await pg.sql.unsafe(`SELECT pg_reload_conf()`);
  await waitForUpstreamSsl(pg, true);
}

/** Undo enableUpstreamSsl (or make sure ssl is off). */
export async function disableUpstreamSsl(pg: PgInstance): Promise<void> {
  await pg.sql.unsafe(`ALTER SYSTEM SET ssl = off`);
  await pg.sql.unsafe(`SELECT pg_reload_conf()`);
  await waitForUpstreamSsl(pg, false);
  await pg.sql.unsafe(`ALTER SYSTEM RESET ssl`);
  await pg.sql.unsafe(`ALTER SYSTEM RESET ssl_cert_file`);
  await pg.sql.unsafe(`ALTER SYSTEM RESET ssl_key_file`);
  await pg.sql.unsafe(`ALTER SYSTEM RESET ssl_ca_file`);
  await pg.sql.unsafe(`SELECT pg_reload_conf()`);
}

// ------------------------------------------------------------ raw protocol



function describeMessages(ms: Message[]): string {
  return ms
    .map((m) => (m.type === "E" || m.type === "N" ? `${m.type}${JSON.stringify(errorFields(m.body))}` : m.type))
    .join(" ");
}

export function queryMessage(sql: string): Buffer {
  const text = Buffer.from(`${sql}\0`, "utf8");
  const head = Buffer.alloc(5);
  head[0] = 0x51; // 'Q'
  head.writeInt32BE(4 + text.length, 1);
  return Buffer.concat([head, text]);
}

const TERMINATE = Buffer.from([0x58, 0, 0, 0, 4]);

export interface QueryResult {
  rows: (string | null)[][];
  tags: string[];
  /** Fields of the ErrorResponse, if any. */
  error?: Record<string, string>;
  /** Transaction status of the ReadyForQuery ('I', 'T', 'E'). */
  status: string;
}

/**
 * A raw PostgreSQL protocol client on a connected socket (plain or TLS):
 * buffers what arrives, hands out whole messages, notices the close.
 */
export class Wire {
  private buf: Buffer = Buffer.alloc(0);
  private wake: (() => void) | undefined;
  closed = false;
  error: Error | undefined;
  /** Every message read so far, for failure messages. */
  readonly seen: Message[] = [];

  constructor(
    readonly socket: net.Socket,
    readonly label = "client",
  ) {
    socket.on("data", (b: Buffer) => {
      this.buf = this.buf.length === 0 ? b : Buffer.concat([this.buf, b]);
      this.notify();
    });
    socket.on("close", () => {
      this.closed = true;
      this.notify();
    });
    socket.on("error", (e) => {
      this.error = e;
      this.notify();
    });
  }

  private notify(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  private async until<T>(what: string, timeoutMs: number, take: () => T | undefined): Promise<T> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const v = take();
      if (v !== undefined) return v;
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`${this.label}: no ${what} within ${timeoutMs} ms (closed=${this.closed}, error=${this.error?.message}; received: ${describeMessages(this.seen)})`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  write(bytes: Uint8Array): void {
    this.socket.write(bytes);
  }

  /** The next message, or null once the connection is closed with nothing left. */
  next(timeoutMs = 15_000): Promise<Message | null> {
    return this.until("message", timeoutMs, (): Message | null | undefined => {
      if (this.buf.length >= 5) {
        const len = this.buf.readInt32BE(1);
        if (this.buf.length >= 1 + len) {
          const msg: Message = { type: String.fromCharCode(this.buf[0]!), body: Buffer.from(this.buf.subarray(5, 1 + len)) };
          this.buf = this.buf.subarray(1 + len);
          this.seen.push(msg);
          return msg;
        }
      }
      if (this.closed || this.error) return null;
      return undefined;
    });
  }

  /** Messages up to and including the first of `type` (throws if the connection ends first). */
  async readUntil(type: string, timeoutMs = 15_000): Promise<Message[]> {
    const out: Message[] = [];
    for (;;) {
      const m = await this.next(timeoutMs);
      if (!m) throw new Error(`${this.label}: connection closed before '${type}'; received: ${describeMessages(this.seen)}`);
      out.push(m);
      if (m.type === type) return out;
    }
  }

  /**
   * Send a StartupMessage, authenticate with the user's harness password,
   * and read to the first ReadyForQuery (messages from AuthenticationOk on);
   * throws on ErrorResponse.
   */
  async startup(params: Record<string, string>, timeoutMs = 15_000): Promise<Message[]> {
    this.write(startupMessage(new Map(Object.entries(params))));
    const user = params.user ?? "";
    const read = async () => {
      const m = await this.next(timeoutMs);
      if (!m) throw new Error(`${this.label}: connection closed during startup; received: ${describeMessages(this.seen)}`);
      return m;
    };
    try {
      return await authenticateToReady(read, async (b) => this.write(b), passwordFor(user), user);
    } catch (e) {
      throw new Error(`${this.label}: startup failed: ${(e as Error).message}`);
    }
  }

  /** A simple-protocol query, read to its ReadyForQuery. */
  async query(sql: string, timeoutMs = 15_000): Promise<QueryResult> {
    this.write(queryMessage(sql));
    const ms = await this.readUntil("Z", timeoutMs);
    const res: QueryResult = { rows: [], tags: [], status: String.fromCharCode(ms.at(-1)!.body[0]!) };
    for (const m of ms) {
      if (m.type === "D") res.rows.push(dataRow(m.body));
      else if (m.type === "C") res.tags.push(m.body.subarray(0, m.body.length - 1).toString("utf8"));
      else if (m.type === "E") res.error = errorFields(m.body);
    }
    return res;
  }

  /**
   * What the server sends unprompted until it closes the connection: the
   * ErrorResponse fields of the first 'E' (throws if none comes, or if the
   * connection stays open past the bound).
   */
  async expectFatalAndClose(timeoutMs = 20_000): Promise<Record<string, string>> {
    let fields: Record<string, string> | undefined;
    for (;;) {
      const m = await this.next(timeoutMs);
      if (!m) break;
      if (m.type === "E" && !fields) fields = errorFields(m.body);
    }
    if (!fields) throw new Error(`${this.label}: closed without an ErrorResponse; received: ${describeMessages(this.seen)}`);
    return fields;
  }

  /** Resolves once the peer has closed (bounded). */
  async waitClosed(timeoutMs = 15_000): Promise<void> {
    await this.until("close", timeoutMs, () => (this.closed ? true : undefined));
  }

  terminate(): void {
    if (!this.closed) this.socket.end(TERMINATE);
  }

  destroy(): void {
    this.socket.destroy();
  }
}


/** A plain TCP connection to host:port (bounded). */
export function openPlain(port: number, host = "127.0.0.1", timeoutMs = 10_000): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect({ host, port });
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`could not connect to ${host}:${port} within ${timeoutMs} ms`));
    }, timeoutMs);
    s.once("connect", () => {
      clearTimeout(timer);
      resolve(s);
    });
    s.once("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** Wait for a TLS socket's handshake (bounded); rejects on a TLS error or an early close. */
export function secured(s: tls.TLSSocket, what: string, timeoutMs = 10_000): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`${what}: no TLS handshake within ${timeoutMs} ms`));
    }, timeoutMs);
    const fail = (e: Error) => {
      clearTimeout(timer);
      reject(e);
    };
    s.once("secureConnect", () => {
      clearTimeout(timer);
      s.off("error", fail);
      resolve(s);
    });
    s.once("error", fail);
    s.once("close", () => fail(new Error(`${what}: connection closed during the TLS handshake`)));
  });
}

/** The single byte a server answers an SSLRequest with ('S' or 'N'), on a fresh connection. */
export async function sslRequest(port: number, timeoutMs = 10_000): Promise<{ socket: net.Socket; answer: string }> {
  const socket = await openPlain(port);
  const packet = Buffer.alloc(8);
  packet.writeInt32BE(8, 0);
  packet.writeInt32BE(80877103, 4);
  const answer = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no answer to SSLRequest within ${timeoutMs} ms`)), timeoutMs);
    socket.once("data", (b: Buffer) => {
      clearTimeout(timer);
      if (b.length !== 1) reject(new Error(`SSLRequest answered with ${b.length} bytes (${b.toString("hex").slice(0, 64)}), not one`));
      else resolve(String.fromCharCode(b[0]!));
    });
    socket.once("close", () => reject(new Error("closed before answering SSLRequest")));
    socket.write(packet);
  });
  socket.pause();
  return { socket, answer };
}

/** SSLRequest, 'S', then a verified TLS handshake for `servername`: a Wire over it. */
export async function tlsViaSslRequest(port: number, ca: string, servername = "localhost"): Promise<{ wire: Wire; tls: tls.TLSSocket }> {
  const { socket, answer } = await sslRequest(port);
  if (answer !== "S") {
    socket.destroy();
    throw new Error(`SSLRequest answered '${answer}', expected 'S'`);
  }
  const t = await secured(tls.connect({ socket, ca, servername }), "TLS after SSLRequest");
  return { wire: new Wire(t, "tls-after-sslrequest"), tls: t };
}

/** PostgreSQL 17 direct TLS: a TLS handshake first, ALPN as given. */
export async function directTls(
  port: number,
  opts: { ca: string; alpn?: string[]; servername?: string },
): Promise<{ wire: Wire; tls: tls.TLSSocket }> {
  const t = tls.connect({
    host: "127.0.0.1",
    port,
    ca: opts.ca,
    servername: opts.servername ?? "localhost",
    ...(opts.alpn ? { ALPNProtocols: opts.alpn } : {}),
  });
  await secured(t, "direct TLS");
  return { wire: new Wire(t, "direct-tls"), tls: t };
}

// ------------------------------------------------------------- HTTP, logs

/** Address of the proxy's health listener, from its log line. */
export async function httpBase(proxy: ProxyHandle): Promise<string> {
  const re = /http listening on \[?([0-9A-Za-z.:-]+?)\]?:(\d+) /;
  const log = await proxy.waitForLog(re);
  const m = re.exec(log)!;
  return `http://${m[1]}:${m[2]}`;
}

/**
 * Wait until the proxy can take signals: its handlers are installed right
 * after the health listener logs its address, in the same synchronous run,
 * so one answered /healthz request proves they are in place. (The "listening
 * on" line comes earlier: a signal sent right after it kills the process.)
 */
/** A proxy in front of `pg`, kept in `into` for teardown, started and ready for signals. */
export async function startReadyProxy(pg: PgInstance, args: string[], into: ProxyHandle[]): Promise<ProxyHandle> {
  const p = await startProxyFor(pg, { args });
  into.push(p);
  // A signal sent before the proxy's handlers are in place would kill it.
  await readyForSignals(p);
  return p;
}

export async function readyForSignals(proxy: ProxyHandle): Promise<string> {
  const base = await httpBase(proxy);
  const res = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(10_000) });
  await res.arrayBuffer();
  return base;
}

export async function getJson(url: string, timeoutMs = 10_000): Promise<{ status: number; body: Record<string, unknown>; contentType: string | null }> {
  const res = await fetch(url, { signal: AbortSignal.timeout(timeoutMs) });
  const text = await res.text();
  let body: Record<string, unknown>;
  try {
    body = JSON.parse(text);
  } catch {
    throw new Error(`GET ${url} → ${res.status}, body is not JSON: ${text.slice(0, 500)}`);
  }
  return { status: res.status, body, contentType: res.headers.get("content-type") };
}

export type LogLine = Record<string, unknown> & { time: string; level: string; msg: string };

/** Every line of a JSON-format log, parsed; throws naming the first line that is not a JSON object. */
export function jsonLines(log: string): LogLine[] {
  const out: LogLine[] = [];
  for (const line of log.split("\n")) {
    if (line.trim() === "") continue;
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch {
      throw new Error(`log line is not JSON: ${line}`);
    }
    if (!v || typeof v !== "object" || Array.isArray(v)) throw new Error(`log line is not a JSON object: ${line}`);
    out.push(v as LogLine);
  }
  return out;
}

/**
 * Wait (bounded) until `check(log)` holds for the proxy's log so far;
 * `what` names the condition in the failure message.
 */
export function waitForLogCondition(proxy: ProxyHandle, what: string, check: (log: string) => boolean, timeoutMs = 15_000): Promise<string> {
  // waitForLog only calls .test() and prints the pattern: a RegExp-shaped condition.
  const condition = { test: check, toString: () => what } as unknown as RegExp;
  return proxy.waitForLog(condition, timeoutMs);
}

/** Parsed JSON log lines with event === `event`, waiting until there are at least `count`. */
export async function waitForEvents(proxy: ProxyHandle, event: string, count: number, timeoutMs = 15_000): Promise<LogLine[]> {
  const pick = (log: string) => jsonLines(log).filter((l) => l.event === event);
  const log = await waitForLogCondition(proxy, `${count} "${event}" event line(s)`, (s) => pick(completeLines(s)).length >= count, timeoutMs);
  return pick(completeLines(log));
}

/** The log without a trailing partial line (the pipe may deliver half a line). */
function completeLines(log: string): string {
  const cut = log.lastIndexOf("\n");
  return cut < 0 ? "" : log.slice(0, cut + 1);
}
