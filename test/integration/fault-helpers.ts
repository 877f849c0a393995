/**
 * Helpers for the fault tests (faults.test.ts): a dedicated throwaway
 * PostgreSQL cluster that a test may stop and restart without disturbing the
 * harness's shared one, a raw wire-protocol client, broken upstreams, and
 * bounded polling.
 */
import { authenticate, authenticateToReady, dataRow, errorFields, RawSocket, type Message } from "../harness/raw-socket.ts";
export { errorFields, type Message };
import { chownSync, existsSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, writeFileSync } from "node:fs";
import { createConnection, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { dlopen, FFIType, ptr } from "bun:ffi";
import postgres from "postgres";
import {
  APP_USER,
  buildUrl,
  contextKey,
  freePort,
  HBA_LINES,
  onCleanup,
  PASSWORDS,
  passwordFor,
  pgTool,
  SETUP_SQL_PATH,
  SUPERUSER,
  TRUST_USER,
  type Sql,
} from "../harness/index.ts";

// ------------------------------------------------------------------ polling

/** Resolve once `cond()` is truthy (checked every `everyMs`); reject after `timeoutMs` with `what` and the last detail. */
export async function poll<T>(
  cond: () => T | Promise<T>,
  what: string,
  { timeoutMs = 15_000, everyMs = 50, detail }: { timeoutMs?: number; everyMs?: number; detail?: () => string | Promise<string> } = {},
): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (performance.now() > deadline) {
      const extra = detail ? `; ${await detail()}` : "";
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${extra}`);
    }
    await Bun.sleep(everyMs); // polling interval, not synchronisation
  }
}

/** Number of open file descriptors of a process (sockets, pipes, files). */
export function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/** What the fds of a process point to, summarised (for failure messages). */
export function fdSummary(pid: number): string {
  const kinds = new Map<string, number>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target = "?";
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      // closed meanwhile
    }
    const kind = target.replace(/\[\d+\]$/, "[…]");
    kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
  }
  return [...kinds].map(([k, n]) => `${n}× ${k}`).join(", ");
}

// ------------------------------------------------------- dedicated cluster

const isRoot = typeof process.getuid === "function" && process.getuid() === 0;

function binDir(): string {
  // pgTool() resolves PG_BIN / the newest server bin dir first.
  return join(pgTool("pg_ctl"), "..");
}

function pgCommand(args: string[]): string[] {
  return isRoot ? ["runuser", "-u", "postgres", "--", ...args] : args;
}
const PG_ENV = { PATH: process.env.PATH ?? "/usr/bin:/bin", LC_ALL: "C", LANG: "C", TZ: "UTC" };

function runPg(args: string[], cwd: string): string {
  const cmd = pgCommand(args);
  const r = Bun.spawnSync(cmd, { cwd, stdout: "pipe", stderr: "pipe", env: PG_ENV });
  const out = r.stdout.toString() + r.stderr.toString();
  if (r.exitCode !== 0) throw new Error(`${cmd.join(" ")} failed (exit ${r.exitCode ?? r.signalCode}):\n${out}`);
  return out;
}

/** runPg without blocking the event loop (sockets keep being serviced meanwhile). */
async function runPgAsync(args: string[], cwd: string): Promise<string> {
  const cmd = pgCommand(args);
  const proc = Bun.spawn(cmd, { cwd, stdout: "pipe", stderr: "pipe", env: PG_ENV });
  const [out, err] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text()]);
  const code = await proc.exited;
  if (code !== 0) throw new Error(`${cmd.join(" ")} failed (exit ${code}):\n${out}${err}`);
  return out + err;
}

export interface Cluster {
  host: string;
  port: number;
  database: string;
  /** Superuser URL of `database`. */
  adminUrl: string;
  /** Superuser postgres.js client (a pool of a few connections). */
  sql: Sql;
  url(o: { user: string; password?: string }): string;
  serverLog(): string;
  /** pg_ctl stop -m <mode> -w: a fast shutdown sends every backend's client 57P01. */
  stopServer(mode?: "fast" | "immediate" | "smart"): Promise<void>;
  /** pg_ctl start -w on the same port and data directory. */
  startServer(): Promise<void>;
  /** Stop for good and remove the directory. */
  destroy(): Promise<void>;
}

export interface ClusterOptions {
  maxConnections?: number;
  /** Extra postgresql.conf lines. */
  conf?: string[];
}

/**
 * A throwaway cluster of this file's own (initdb + pg_ctl, as the postgres OS
 * user when root), with the harness's pg_hba lines, roles app_user (SCRAM)
 * and trust_user (trust), sql/setup.sql and the context key of the harness's
 * CONTEXT_SECRET. Unlike startPostgres() it may be stopped and restarted.
 */
export async function bootCluster(opts: ClusterOptions = {}): Promise<Cluster> {
  const bin = binDir();
  const dir = mkdtempSync(join(tmpdir(), "multigres-faults-pg-"));
  const dataDir = join(dir, "data");
  const logFile = join(dir, "server.log");
  const pwFile = join(dir, "pwfile");
  writeFileSync(pwFile, PASSWORDS[SUPERUSER] + "\n", { mode: 0o600 });
  if (isRoot) {
    const ids = (flag: string) => Number(Bun.spawnSync(["id", flag, "postgres"], { stdout: "pipe" }).stdout.toString().trim());
    chownSync(dir, ids("-u"), ids("-g"));
    chownSync(pwFile, ids("-u"), ids("-g"));
  }
  let running = false;
  const stopSync = (mode: string) => {
    if (!running) return;
    try {
      runPg([join(bin, "pg_ctl"), "stop", "-D", dataDir, "-m", mode, "-w", "-t", "60"], dir);
    } catch {
      // already down
    }
    running = false;
  };
  let removed = false;
  const removeSync = () => {
    if (removed) return;
    removed = true;
    stopSync("immediate");
    rmSync(dir, { recursive: true, force: true });
  };
  const unregister = onCleanup(removeSync);

  try {
    runPg(
      [join(bin, "initdb"), "-D", dataDir, "-U", SUPERUSER, "--pwfile", pwFile, "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"],
      dir,
    );
    rmSync(pwFile, { force: true });

    let port = 0;
    for (let attempt = 0; ; attempt++) {
      port = await freePort();
      writeFileSync(
        join(dataDir, "postgresql.auto.conf"),
        [
          `port = ${port}`,
          "listen_addresses = '127.0.0.1'",
          `unix_socket_directories = '${dir}'`,
          "unix_socket_permissions = 0700",
          `max_connections = ${opts.maxConnections ?? 100}`,
          "shared_buffers = 16MB",
          "huge_pages = off",
          "fsync = off",
          "synchronous_commit = off",
          "full_page_writes = off",
          "password_encryption = 'scram-sha-256'",
          "log_line_prefix = '%m [%p] %q%u@%d '",
          "log_min_messages = warning",
          "timezone = 'UTC'",
          ...(opts.conf ?? []),
          "",
        ].join("\n"),
      );
      writeFileSync(join(dataDir, "pg_hba.conf"), HBA_LINES.join("\n") + "\n");
      try {
        running = true;
        runPg([join(bin, "pg_ctl"), "start", "-D", dataDir, "-l", logFile, "-w", "-t", "60"], dir);
        break;
      } catch (e) {
        running = false;
        const log = existsSync(logFile) ? readFileSync(logFile, "utf8") : "";
        if (attempt < 4 && /could not bind|Address already in use/i.test(log)) continue;
        throw new Error(`${(e as Error).message}\nserver log:\n${log}`);
      }
    }

    const host = "127.0.0.1";
    const database = "faults";
    const adminFor = (db: string, max: number) =>
      postgres(buildUrl({ host, port, user: SUPERUSER, password: PASSWORDS[SUPERUSER], database: db }), {
        max,
        ssl: false,
        onnotice: () => {},
        connect_timeout: 30,
        idle_timeout: 5,
        connection: { application_name: "multigres-faults-admin" },
      }) as unknown as Sql;
    const boot = adminFor("postgres", 1);
    try {
      await boot.unsafe(`CREATE DATABASE ${database}`);
    } finally {
      await boot.end();
    }
    const sql = adminFor(database, 3);
    for (const role of [APP_USER, TRUST_USER] as const) {
      await sql.unsafe(`CREATE ROLE ${role} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '${PASSWORDS[role]}'`);
      await sql.unsafe(`GRANT ALL ON SCHEMA public TO ${role}`);
    }
    await sql.unsafe(readFileSync(SETUP_SQL_PATH, "utf8"));
    await sql`SELECT multigres.add_context_key(${contextKey()})`;

    return {
      host,
      port,
      database,
      adminUrl: buildUrl({ host, port, user: SUPERUSER, password: PASSWORDS[SUPERUSER], database }),
      sql,
      url: (o) => buildUrl({ host, port, database, ...o }),
      serverLog: () => (existsSync(logFile) ? readFileSync(logFile, "utf8") : ""),
      async stopServer(mode = "fast") {
        if (!running) return;
        await runPgAsync([join(bin, "pg_ctl"), "stop", "-D", dataDir, "-m", mode, "-w", "-t", "60"], dir);
        running = false;
      },
      async startServer() {
        if (running) return;
        running = true;
        try {
          await runPgAsync([join(bin, "pg_ctl"), "start", "-D", dataDir, "-l", logFile, "-w", "-t", "60"], dir);
        } catch (e) {
          running = false;
          throw new Error(`${(e as Error).message}\nserver log:\n${existsSync(logFile) ? readFileSync(logFile, "utf8").slice(-4000) : ""}`);
        }
      },
      async destroy() {
        await sql.end({ timeout: 5 }).catch(() => {});
        removeSync();
        unregister();
      },
    };
  } catch (e) {
    removeSync();
    unregister();
    throw e;
  }
}

// ---------------------------------------------------------- wire protocol

const enc = new TextEncoder();

function be32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

export function startupPacket(params: Record<string, string>): Buffer {
  const parts: Uint8Array[] = [be32(196608)];
  for (const [k, v] of Object.entries(params)) parts.push(enc.encode(`${k}\0${v}\0`));
  parts.push(Uint8Array.of(0));
  const body = Buffer.concat(parts);
  return Buffer.concat([be32(body.length + 4), body]);
}

export function typedMessage(type: string, body: Uint8Array): Buffer {
  return Buffer.concat([Buffer.from(type, "latin1"), be32(body.length + 4), body]);
}

export const queryMessage = (sql: string) => typedMessage("Q", enc.encode(`${sql}\0`));
export const copyDataMessage = (data: string) => typedMessage("d", enc.encode(data));
export const terminateMessage = () => typedMessage("X", new Uint8Array(0));




function describe(b: Buffer): string {
  const head = b.subarray(0, 160);
  return `${head.toString("hex").replace(/(..)/g, "$1 ").trim()}${b.length > 160 ? ` … (${b.length} bytes)` : ""} ${JSON.stringify(head.toString("latin1"))}`;
}

/**
 * A raw TCP client speaking just enough of the protocol to start up as a
 * trust user, run simple queries and COPY, and vanish when told to.
 * allowHalfOpen: after our FIN we still read what the peer sends.
 */
export class RawPg extends RawSocket {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private received = Buffer.alloc(0);
  private cursor = 0;

  static async open(port: number, label = "raw", timeoutMs = 15_000): Promise<RawPg> {
    return new RawPg(await RawSocket.connectSocket("127.0.0.1", port, label, timeoutMs), label, 15_000);
  }

  protected onBytes(d: Buffer): void {
    this.chunks.push(d);
    this.buffered += d.length;
  }

  private all(): Buffer {
    if (this.chunks.length > 0) {
      this.received = Buffer.concat([this.received.subarray(this.cursor), ...this.chunks]);
      this.cursor = 0;
      this.chunks = [];
      this.buffered = 0;
    }
    return this.received;
  }

  /** Bytes received and not yet read as messages. */
  pending(): number {
    return this.received.length - this.cursor + this.buffered;
  }

  /** Vanish with a TCP RST (SO_LINGER 0) where the runtime supports it. */
  reset(): void {
    const s = this.socket as Socket & { resetAndDestroy?: () => void };
    if (typeof s.resetAndDestroy === "function") s.resetAndDestroy();
    else s.destroy();
  }

  state(): string {
    return `${this.label}: unread ${describe(this.all().subarray(this.cursor))}; peer closed: ${this.peerClosed}; error: ${this.error?.message ?? "none"}`;
  }

  private complete(): boolean {
    const b = this.all();
    const avail = b.length - this.cursor;
    return avail >= 5 && avail >= 1 + b.readUInt32BE(this.cursor + 1);
  }

  /** The next message, or null when the peer closed before a whole one arrived. */
  async nextMessage(what = "a message", timeoutMs = 15_000): Promise<Message | null> {
    await this.waitFor(() => this.complete() || this.peerClosed, what, timeoutMs);
    if (!this.complete()) return null;
    const b = this.received;
    const type = String.fromCharCode(b[this.cursor]!);
    const len = b.readUInt32BE(this.cursor + 1);
    const body = b.subarray(this.cursor + 5, this.cursor + 1 + len);
    this.cursor += 1 + len;
    return { type, body };
  }

  async readMessage(what = "a message", timeoutMs = 15_000): Promise<Message> {
    const m = await this.nextMessage(what, timeoutMs);
    if (!m) throw new Error(`connection closed while waiting for ${what}; ${this.state()}`);
    return m;
  }

  /** Read until a message of `type`; an ErrorResponse on the way throws. */
  async readUntil(type: string, what = `message '${type}'`, timeoutMs = 15_000): Promise<Message[]> {
    const out: Message[] = [];
    for (;;) {
      const m = await this.readMessage(what, timeoutMs);
      out.push(m);
      if (m.type === type) return out;
      if (m.type === "E") throw new Error(`${this.label}: ErrorResponse while waiting for ${what}: ${JSON.stringify(errorFields(m.body))}`);
    }
  }

  /** Answer the proxy's authentication as `user` (its harness password) up to AuthenticationOk. */
  async logIn(user: string, timeoutMs = 15_000): Promise<void> {
    await authenticate((what) => this.readMessage(what, timeoutMs), (b) => this.send(b), passwordFor(user), user);
  }

  /** StartupMessage, authentication (the user's harness password), up to the first ReadyForQuery. */
  async startup(params: Record<string, string>, timeoutMs = 15_000): Promise<void> {
    await this.send(startupPacket(params));
    const user = params.user ?? "";
    const msgs = await authenticateToReady((what) => this.readMessage(what, timeoutMs), (b) => this.send(b), passwordFor(user), user);
    if (msgs[0]?.type !== "R") throw new Error(`${this.label}: expected AuthenticationOk, got ${msgs.map((m) => m.type).join("")}`);
  }

  /** Simple query; resolves with the DataRows at ReadyForQuery. */
  async query(sql: string, timeoutMs = 15_000): Promise<(string | null)[][]> {
    await this.send(queryMessage(sql));
    const msgs = await this.readUntil("Z", `the result of ${sql}`, timeoutMs);
    return msgs.filter((m) => m.type === "D").map((m) => dataRow(m.body));
  }

  /**
   * Skip whatever else comes (a RowDescription sent before the statement
   * ran, …) until an ErrorResponse, then expect the close; returns its
   * fields, or null when the connection closed with no ErrorResponse.
   */
  async finalError(what: string, timeoutMs = 15_000): Promise<Record<string, string> | null> {
    for (;;) {
      const m = await this.nextMessage(`an ErrorResponse or the close (${what})`, timeoutMs);
      if (!m) return null;
      if (m.type === "E") {
        await this.waitClosed(`the close after the ErrorResponse (${what})`, timeoutMs);
        return errorFields(m.body);
      }
    }
  }

  /** Expect an ErrorResponse next, then the close; returns its fields. */
  async expectError(what: string, timeoutMs = 15_000): Promise<Record<string, string>> {
    const m = await this.readMessage(`an ErrorResponse (${what})`, timeoutMs);
    if (m.type !== "E") throw new Error(`${this.label}: expected ErrorResponse for ${what}, got '${m.type}' ${describe(m.body)}`);
    await this.waitClosed(`the close after the ErrorResponse (${what})`, timeoutMs);
    return errorFields(m.body);
  }
}

// ------------------------------------------------------- broken upstreams

export interface FakeUpstream {
  port: number;
  /** Connections accepted so far. */
  accepted: number;
  /** Connections currently open (the proxy has not closed them yet). */
  open: number;
  /** Bytes read from all connections so far. */
  bytesRead: number;
  stop(): Promise<void>;
}

/**
 * A TCP server that misbehaves as an upstream: "refuse" accepts and closes
 * at once; "silent" accepts and reads everything but never writes a byte.
 */
export async function fakeUpstream(kind: "refuse" | "silent"): Promise<FakeUpstream> {
  const sockets = new Set<Socket>();
  const state = { accepted: 0, bytesRead: 0 };
  const server: Server = createServer((s) => {
    state.accepted++;
    if (kind === "refuse") {
      s.destroy();
      return;
    }
    sockets.add(s);
    s.on("data", (d) => {
      state.bytesRead += d.length;
    });
    s.on("error", () => {});
    s.on("close", () => sockets.delete(s));
  });
  await new Promise<void>((res, rej) => {
    server.once("error", rej);
    server.listen(0, "127.0.0.1", () => res());
  });
  const addr = server.address();
  const port = typeof addr === "object" && addr ? addr.port : 0;
  return {
    port,
    get accepted() {
      return state.accepted;
    },
    get bytesRead() {
      return state.bytesRead;
    },
    get open() {
      return sockets.size;
    },
    stop: () =>
      new Promise<void>((res) => {
        for (const s of sockets) s.destroy();
        server.close(() => res());
      }),
  };
}

/**
 * A listening socket that never accepts (bun:ffi → libc socket/bind/listen,
 * backlog 0). Once its accept queue holds one connection the kernel drops
 * further SYNs, so a connect to it hangs: the only way to exercise a TCP
 * connect timeout on loopback.
 */
export function blackholeListener(): { port: number; close(): void } {
  const libc = dlopen("libc.so.6", {
    socket: { args: [FFIType.i32, FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    bind: { args: [FFIType.i32, FFIType.ptr, FFIType.u32], returns: FFIType.i32 },
    listen: { args: [FFIType.i32, FFIType.i32], returns: FFIType.i32 },
    getsockname: { args: [FFIType.i32, FFIType.ptr, FFIType.ptr], returns: FFIType.i32 },
    close: { args: [FFIType.i32], returns: FFIType.i32 },
  });
  const AF_INET = 2;
  const SOCK_STREAM = 1;
  const fd = libc.symbols.socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) throw new Error("socket() failed");
  const addr = new Uint8Array(16);
  const view = new DataView(addr.buffer);
  view.setUint16(0, AF_INET, true); // sa_family, host byte order
  view.setUint16(2, 0, false); // port 0: the kernel picks
  addr.set([127, 0, 0, 1], 4);
  if (libc.symbols.bind(fd, ptr(addr), 16) !== 0) throw new Error("bind() failed");
  if (libc.symbols.listen(fd, 0) !== 0) throw new Error("listen() failed");
  const len = new Uint32Array([16]);
  if (libc.symbols.getsockname(fd, ptr(addr), ptr(len)) !== 0) throw new Error("getsockname() failed");
  const port = view.getUint16(2, false);
  let closed = false;
  return {
    port,
    close() {
      if (closed) return;
      closed = true;
      libc.symbols.close(fd);
      libc.close();
    },
  };
}

// ------------------------------------------------------------- fd limit

/**
 * Make sure this process may open `want` file descriptors, raising the soft
 * RLIMIT_NOFILE (up to the hard limit) via libc when it is lower. Processes
 * spawned afterwards (the proxy) inherit it. Returns the soft limit in force.
 */
export function ensureFdLimit(want: number): number {
  const RLIMIT_NOFILE = 7;
  const libc = dlopen("libc.so.6", {
    getrlimit: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
    setrlimit: { args: [FFIType.i32, FFIType.ptr], returns: FFIType.i32 },
  });
  try {
    const lim = new BigUint64Array(2);
    if (libc.symbols.getrlimit(RLIMIT_NOFILE, ptr(lim)) !== 0) throw new Error("getrlimit failed");
    if (lim[0]! >= BigInt(want)) return Number(lim[0]);
    const target = lim[1]! < BigInt(want) ? lim[1]! : BigInt(want);
    lim[0] = target;
    if (libc.symbols.setrlimit(RLIMIT_NOFILE, ptr(lim)) !== 0) throw new Error("setrlimit failed");
    return Number(target);
  } finally {
    libc.close();
  }
}

// ---------------------------------------------------------------- relay

export interface Relay {
  port: number;
  /** Connections currently relayed. */
  readonly open: number;
  /**
   * Drop (destroy both sockets of) every open connection whose first bytes
   * from the proxy contain `needle` (e.g. an application_name); returns how many.
   */
  drop(needle: string): number;
  stop(): Promise<void>;
}

/**
 * A TCP relay between the proxy and PostgreSQL whose connections can be
 * dropped one by one: the server leg of a single session dying without a
 * word (no ErrorResponse, no FIN from Postgres).
 */
export async function startRelay(upstreamPort: number): Promise<Relay> {
  const conns = new Set<{ head: Buffer; client: Socket; server: Socket }>();
  const server: Server = createServer((client) => {
    const upstream = createConnection({ host: "127.0.0.1", port: upstreamPort });
    const conn = { head: Buffer.alloc(0), client, server: upstream };
    conns.add(conn);
    client.on("data", (d: Buffer) => {
      if (conn.head.length < 10_000) conn.head = Buffer.concat([conn.head, d]);
    });
    client.pipe(upstream);
    upstream.pipe(client);
    const close = () => {
      client.destroy();
      upstream.destroy();
      conns.delete(conn);
    };
    for (const s of [client, upstream]) {
      s.on("close", close);
      s.on("error", close);
    }
  });
  await new Promise<void>((res, rej) => {
    server.once("error", rej);
    server.listen(0, "127.0.0.1", () => res());
  });
  const addr = server.address();
  return {
    port: typeof addr === "object" && addr ? addr.port : 0,
    get open() {
      return conns.size;
    },
    drop(needle) {
      let n = 0;
      for (const c of [...conns]) {
        if (c.head.includes(needle)) {
          c.client.destroy();
          c.server.destroy();
          conns.delete(c);
          n++;
        }
      }
      return n;
    },
    stop: () =>
      new Promise<void>((res) => {
        for (const c of conns) {
          c.client.destroy();
          c.server.destroy();
        }
        conns.clear();
        server.close(() => res());
      }),
  };
}

/** Loopback TCP sockets (system-wide) in SYN_SENT towards 127.0.0.1:`port`: connects still pending. */
export function pendingConnectsTo(port: number): number {
  const want = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  let n = 0;
  for (const line of readFileSync("/proc/net/tcp", "utf8").split("\n").slice(1)) {
    const cols = line.trim().split(/\s+/);
    if (cols[2] === want && cols[3] === "02") n++;
  }
  return n;
}
