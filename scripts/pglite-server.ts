/**
 * A PostgreSQL wire-protocol server in front of one PGlite instance, for dev
 * mode, that gives every TCP connection its own *session*.
 *
 * Why not `PGLiteSocketServer` from @electric-sql/pglite-socket? PGlite is a
 * single Postgres backend. Its socket server multiplexes connections onto
 * that backend message by message, so every connection shares one session:
 * `SET ROLE`, `set_config('app.current_tenant_id', …)` and every other
 * setting made by one connection is seen by all the others, and it outlives
 * the connection that made it. In front of a tenant proxy that is a
 * cross-tenant leak: the last tenant to connect wins for everyone. It also
 * ignores the startup user (everyone is `postgres`) and interleaves the
 * messages of different clients in the middle of an extended-protocol batch.
 *
 * This server does the multiplexing at session granularity instead:
 *
 * - A connection owns the backend from its first message until the backend
 *   is idle again (ReadyForQuery 'I' with no batch, COPY or transaction in
 *   progress); others queue, first come first served.
 * - When ownership passes to another connection, the previous connection's
 *   session state is captured (session user, role, every setting from
 *   pg_settings with source 'session', and custom `x.y` settings such as
 *   app.current_tenant_id) and the next connection's is restored on top of
 *   RESET SESSION AUTHORIZATION / RESET ROLE / RESET ALL.
 * - The startup user becomes the session user (SET SESSION AUTHORIZATION),
 *   so a direct login as `app_user` is really `app_user`; unknown roles and
 *   databases get the server's usual FATAL errors. There is no password
 *   check: PGlite has no authentication, every login is `trust`.
 * - Named prepared statements and portals are renamed per connection
 *   (protocol level), so two clients may both use `S_1`, and are closed
 *   when their connection ends.
 *
 * - COPY FROM STDIN: PGlite must get the COPY and all of its data in one
 *   call (otherwise the WASM backend exits, and the server with it), while a
 *   client sends data only after CopyInResponse. So the COPY is first tried
 *   with an immediate CopyFail (in a savepoint inside a transaction): its
 *   CopyInResponse, or its error, goes to the client; the data is collected
 *   and the COPY then runs for real. Over the extended protocol it is
 *   refused with an error (0A000); clients use the simple protocol for COPY.
 * - Message types a client may not send after startup are refused (08P01)
 *   before they reach the backend, where FATAL would end the process.
 *
 * What stays shared, because there is one backend: SQL-level PREPARE names,
 * temporary tables, LISTEN registrations (notifications may reach another
 * connection), advisory locks, and pg_backend_pid() (every connection is told
 * the same pid, the real one, which the proxy signs tenant contexts with). A
 * query blocks every other connection while it runs (WASM is synchronous),
 * so does an open transaction until it ends (a client that waits for another
 * connection inside a transaction waits forever), and CancelRequest cannot
 * interrupt anything. Custom settings are found by name: the names are
 * learnt from the SQL text and bind parameters the clients send, plus
 * `customSettings`; a custom setting the server never saw named is reset (to
 * unset, never to another session's value) on a switch.
 */
import type { PGlite } from "@electric-sql/pglite";
import { type AddressInfo, createServer, type Server, type Socket } from "node:net";

export interface SessionServerOptions {
  db: PGlite;
  /** PGlite's backend died (it cannot be restarted): every connection is closed. */
  onCrash?: (error: Error) => void;
  host?: string;
  /** 0 (the default) picks a free port; read it back from `port`. */
  port?: number;
  /** Custom settings to carry across session switches, e.g. app.current_tenant_id. */
  customSettings?: string[];
  /** Diagnostics (connection errors); silent by default. */
  log?: (message: string) => void;
}

interface CopyIn {
  /** The COPY Query, then the client's CopyData… and CopyDone or CopyFail. */
  messages: Buffer[];
  /** The backend answered the probe with CopyInResponse. */
  accepted: boolean;
}

interface SessionState {
  sessionUser: string;
  /** current_setting('role'): 'none' when no SET ROLE is in effect. */
  role: string;
  settings: Array<[string, string]>;
}

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
const CANCEL_REQUEST = 80877102;
const PROTOCOL_3_0 = 196608;
/**
 * Message types a client may send after startup. Anything else would make the
 * backend end the session with FATAL, which for PGlite means the process.
 */
const FRONTEND_TYPES = new Set([..."BCdcfDEFHPQSX"].map((c) => c.charCodeAt(0)));
const MAX_STARTUP_LENGTH = 10_000;
const MAX_LEARNT_SETTINGS = 512;
const EXTENDED_COPY_REFUSAL =
  "DO $mg$BEGIN RAISE EXCEPTION USING ERRCODE = '0A000', MESSAGE = 'the dev server (PGlite) runs COPY FROM STDIN only as a simple query, not through the extended protocol'; END$mg$";
const DOTTED_NAME = /[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)+/g;
const DOTTED_NAME_EXACT = /^[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)+$/;

// ---------------------------------------------------------------- messages

function message(type: string, body: Buffer): Buffer {
  const out = Buffer.allocUnsafe(5 + body.length);
  out.write(type, 0, "latin1");
  out.writeInt32BE(4 + body.length, 1);
  body.copy(out, 5);
  return out;
}

function cstr(s: string): Buffer {
  return Buffer.from(`${s}\0`, "utf8");
}

function int32(n: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeInt32BE(n, 0);
  return b;
}

function errorResponse(severity: "FATAL" | "ERROR", code: string, text: string): Buffer {
  return message(
    "E",
    Buffer.concat([
      Buffer.from("S"), cstr(severity),
      Buffer.from("V"), cstr(severity),
      Buffer.from("C"), cstr(code),
      Buffer.from("M"), cstr(text),
      Buffer.from([0]),
    ]),
  );
}

/** Reads a NUL-terminated string at `at`; returns it and the offset after the NUL. */
function readCstr(buf: Buffer, at: number): [string, number] {
  const end = buf.indexOf(0, at);
  if (end < 0) throw new Error("unterminated string in message");
  return [buf.toString("utf8", at, end), end + 1];
}

function simpleQuery(sql: string): Buffer {
  return message("Q", cstr(sql));
}

/** Whole messages of a complete backend reply. */
function splitFrames(buf: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let at = 0; at + 5 <= buf.length; ) {
    const end = at + 1 + buf.readInt32BE(at + 1);
    out.push(buf.subarray(at, end));
    at = end;
  }
  return out;
}

function sqlLiteral(s: string): string {
  return `'${s.replaceAll("'", "''")}'`;
}

/**
 * Whether a query is `COPY … FROM STDIN` (its first statement, after
 * comments). PGlite needs the whole COPY, data and
 * CopyDone included, in one call: a COPY FROM STDIN whose data has not
 * arrived yet ends the WASM backend ("unexpected EOF"), killing the server.
 */
function copyFromStdin(sql: string): boolean {
  const s = sql.replace(/^(?:\s+|--[^\n]*(?:\n|$)|\/\*[\s\S]*?\*\/)*/, "");
  return /^copy\b/i.test(s) && /\bfrom\s+stdin\b/i.test(s.split(";")[0]!);
}

/** Splits a libpq `options` value (`-c a=b --c=d`, backslash escapes) into settings. */
function parseOptions(options: string): Array<[string, string]> {
  const words: string[] = [];
  let cur = "";
  let inWord = false;
  for (let i = 0; i < options.length; i++) {
    const ch = options[i]!;
    if (ch === "\\" && i + 1 < options.length) {
      cur += options[++i];
      inWord = true;
    } else if (/\s/.test(ch)) {
      if (inWord) words.push(cur);
      cur = "";
      inWord = false;
    } else {
      cur += ch;
      inWord = true;
    }
  }
  if (inWord) words.push(cur);
  const out: Array<[string, string]> = [];
  for (let i = 0; i < words.length; i++) {
    let w = words[i]!;
    if (w === "-c" && i + 1 < words.length) w = words[++i]!;
    else if (w.startsWith("-c")) w = w.slice(2);
    else if (w.startsWith("--")) w = w.slice(2);
    else continue;
    const eq = w.indexOf("=");
    if (eq > 0) out.push([w.slice(0, eq).replaceAll("-", "_"), w.slice(eq + 1)]);
  }
  return out;
}

/** Follows backend message framing across chunks: which message came last, and the last ReadyForQuery status. */
class ReadyScanner {
  private header = Buffer.alloc(5);
  private headerLen = 0;
  private remaining = 0;
  /** Type byte of the last message begun since reset(), 0 if none. */
  lastType = 0;
  /** Status byte of the last ReadyForQuery seen since reset(), or null. */
  lastStatus: string | null = null;

  reset(): void {
    this.lastType = 0;
    this.lastStatus = null;
  }

  feed(chunk: Uint8Array): void {
    let i = 0;
    while (i < chunk.length) {
      if (this.remaining > 0) {
        const n = Math.min(this.remaining, chunk.length - i);
        if (this.lastType === 0x5a /* Z */ && this.remaining === 1) this.lastStatus = String.fromCharCode(chunk[i]!);
        this.remaining -= n;
        i += n;
        continue;
      }
      this.header[this.headerLen++] = chunk[i++]!;
      if (this.headerLen === 5) {
        this.lastType = this.header[0]!;
        this.remaining = this.header.readInt32BE(1) - 4;
        this.headerLen = 0;
      }
    }
  }
}

// ------------------------------------------------------------- connection

class Connection {
  state: SessionState = { sessionUser: "", role: "none", settings: [] };
  phase: "startup" | "ready" | "closed" = "startup";
  /** Backend status as this client last saw it, and whether a batch/COPY is open. */
  status = "I";
  pending = false;
  readonly statements = new Set<string>();
  private input: Buffer = Buffer.alloc(0);
  private jobs: Array<() => Promise<void>> = [];
  private running = false;
  /** Set once an error has been sent: nothing more is read or run. */
  private ending = false;
  private retired = false;
  /** Terminate received: what came before still runs, nothing after is read. */
  private terminated = false;
  private readonly prefix: string;
  /** Complete messages not yet handed to a job. */
  private batch: Buffer[] = [];
  /** A COPY FROM STDIN whose data is being collected, until CopyDone/CopyFail. */
  private copyIn: CopyIn | null = null;

  constructor(
    readonly id: number,
    readonly socket: Socket,
    private readonly server: PGliteSessionServer,
  ) {
    this.prefix = `c${id}_`;
  }

  get closed(): boolean {
    return this.phase === "closed";
  }

  write(data: Uint8Array): void {
    if (!this.closed && this.socket.writable) this.socket.write(data);
  }

  fatal(code: string, text: string): void {
    this.write(errorResponse("FATAL", code, text));
    this.ending = true;
    this.jobs.length = 0;
    this.socket.end();
  }

  onData(chunk: Buffer): void {
    this.input = this.input.length === 0 ? chunk : Buffer.concat([this.input, chunk]);
    while (!this.closed && !this.ending && !this.terminated) {
      if (this.phase === "startup") {
        if (this.input.length < 8) return;
        const len = this.input.readInt32BE(0);
        if (len < 8 || len > MAX_STARTUP_LENGTH) {
          this.fatal("08P01", "invalid length of startup packet");
          return;
        }
        if (this.input.length < len) return;
        const packet = this.input.subarray(0, len);
        this.input = this.input.subarray(len);
        this.onStartupPacket(packet);
      } else {
        let at = 0;
        while (this.input.length - at >= 5) {
          const len = this.input.readInt32BE(at + 1);
          if (len < 4) {
            this.fatal("08P01", "invalid message length");
            return;
          }
          if (this.input.length - at < 1 + len) break;
          this.route(Buffer.from(this.input.subarray(at, at + 1 + len)));
          at += 1 + len;
          if (this.ending || this.terminated) break;
        }
        this.input = this.input.subarray(at);
        // Everything complete goes to the backend in one call: far cheaper than one call per message.
        this.flush();
        return;
      }
    }
  }

  private flush(): void {
    if (this.batch.length === 0) return;
    const messages = this.batch;
    this.batch = [];
    this.enqueue(() => this.onMessages(messages));
  }

  private route(msg: Buffer): void {
    if (!FRONTEND_TYPES.has(msg[0]!)) {
      this.fatal("08P01", `invalid frontend message type ${msg[0]}`);
      return;
    }
    const copy = this.copyIn;
    if (copy) {
      copy.messages.push(msg);
      if (msg[0] === 0x63 /* c: CopyDone */ || msg[0] === 0x66 /* f: CopyFail */) {
        this.copyIn = null;
        this.enqueue(() => this.runCopy(copy));
      }
      return;
    }
    if (msg[0] === 0x58 /* X: Terminate */) {
      this.flush();
      this.terminated = true;
      this.enqueue(async () => void this.socket.end());
      return;
    }
    if (msg[0] === 0x51 /* Q */ && copyFromStdin(readCstr(msg, 5)[0])) {
      this.flush();
      const started: CopyIn = { messages: [msg], accepted: false };
      this.copyIn = started;
      this.enqueue(() => this.probeCopy(started));
      return;
    }
    this.batch.push(msg);
  }

  /**
   * COPY FROM STDIN, step 1. The backend must get the COPY and all its data
   * in one call, but the client sends the data only after CopyInResponse.
   * So try the COPY with an immediate CopyFail (inside a savepoint when in a
   * transaction, so that nothing changes): if the backend answers with
   * CopyInResponse, pass that on and collect the data; otherwise its answer
   * (an error, say) is the real one.
   */
  private async probeCopy(copy: CopyIn): Promise<void> {
    const srv = this.server;
    await srv.acquire(this);
    if (this.closed) return;
    const inTransaction = this.status === "T";
    const run = async (...messages: Buffer[]) =>
      Buffer.from(await srv.exec(() => srv.db.execProtocolRaw(new Uint8Array(Buffer.concat(messages)))));
    if (inTransaction) await run(simpleQuery("SAVEPOINT multigres_dev_copy"));
    const reply = await run(srv.rewrite(this, copy.messages[0]!), message("f", cstr("dev server probe")));
    const frames = splitFrames(reply);
    const response = frames.find((f) => f[0] === 0x47 /* G */);
    if (response) {
      copy.accepted = true;
      this.write(response);
      if (inTransaction) await run(simpleQuery("ROLLBACK TO SAVEPOINT multigres_dev_copy; RELEASE SAVEPOINT multigres_dev_copy"));
      else srv.release(this); // nothing is open in the backend while the client sends its data
      return;
    }
    // Not a COPY after all, or an error: that answer stands. Data the client may send anyway goes
    // to runCopy() (if CopyDone/CopyFail came) or back to routing; the backend ignores stray copy messages.
    if (this.copyIn === copy) {
      this.copyIn = null;
      for (const m of copy.messages.slice(1)) this.route(m);
      this.flush();
    }
    this.deliver(frames);
    if (inTransaction && this.status === "T") await run(simpleQuery("RELEASE SAVEPOINT multigres_dev_copy"));
    if (this.status === "I" && !this.pending) srv.release(this);
  }

  /** COPY FROM STDIN, step 2: all the data is here; run the COPY for real. */
  private async runCopy(copy: CopyIn): Promise<void> {
    if (!copy.accepted) {
      if (copy.messages.length > 1) await this.onMessages(copy.messages.slice(1));
      return;
    }
    const srv = this.server;
    await srv.acquire(this);
    if (this.closed) return;
    const input = Buffer.concat([srv.rewrite(this, copy.messages[0]!), ...copy.messages.slice(1)]);
    const reply = Buffer.from(await srv.exec(() => srv.db.execProtocolRaw(new Uint8Array(input))));
    // The client already has its CopyInResponse.
    this.deliver(splitFrames(reply).filter((f) => f[0] !== 0x47 /* G */));
    if (this.status === "I" && !this.pending) srv.release(this);
  }

  /** Sends whole backend messages to the client, tracking ReadyForQuery. */
  private deliver(frames: Buffer[]): void {
    for (const f of frames) {
      if (f[0] === 0x5a /* Z */) {
        this.status = String.fromCharCode(f[5]!);
        this.pending = false;
      }
      this.write(f);
    }
  }

  private onStartupPacket(packet: Buffer): void {
    const code = packet.readInt32BE(4);
    if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
      this.write(Buffer.from("N"));
      return;
    }
    if (code === CANCEL_REQUEST) {
      // The backend is WASM running on this thread: nothing can interrupt it.
      this.socket.end();
      return;
    }
    if (code >>> 16 !== 3) {
      this.fatal("0A000", `unsupported frontend protocol ${code >>> 16}.${code & 0xffff}: server supports 3.0`);
      return;
    }
    const params = new Map<string, string>();
    try {
      let at = 8;
      while (at < packet.length && packet[at] !== 0) {
        const [k, a] = readCstr(packet, at);
        const [v, b] = readCstr(packet, a);
        params.set(k, v);
        at = b;
      }
    } catch {
      this.fatal("08P01", "invalid startup packet layout");
      return;
    }
    this.phase = "ready";
    this.enqueue(() => this.startSession(params, code & 0xffff));
  }

  private enqueue(job: () => Promise<void>): void {
    this.jobs.push(job);
    if (!this.running) void this.run();
  }

  private async run(): Promise<void> {
    this.running = true;
    try {
      while (this.jobs.length > 0 && !this.closed && !this.ending) {
        const job = this.jobs.shift()!;
        try {
          await job();
        } catch (err) {
          this.server.log(`connection ${this.id}: ${(err as Error).message}`);
          this.fatal("XX000", `dev server: ${(err as Error).message}`);
          this.server.release(this);
        }
      }
    } finally {
      this.running = false;
      if (this.closed) await this.retire();
    }
  }

  private async retire(): Promise<void> {
    if (this.retired) return;
    this.retired = true;
    await this.server.retire(this);
  }

  private async startSession(params: Map<string, string>, minor: number): Promise<void> {
    const user = params.get("user") ?? "";
    const database = params.get("database") || user;
    if (!user) return this.fatal("28000", "no PostgreSQL user name specified in startup packet");
    const settings: Array<[string, string]> = [];
    const unknownProtocolOptions: string[] = [];
    for (const [k, v] of params) {
      if (k === "user" || k === "database" || k === "replication") continue;
      if (k === "options") settings.push(...parseOptions(v));
      else if (k.startsWith("_pq_.")) unknownProtocolOptions.push(k);
      else settings.push([k, v]);
    }
    const srv = this.server;
    await srv.acquire(this, { switchSession: false });
    try {
      const check = await srv.db.query<{ canlogin: boolean | null; db: string }>(
        "SELECT (SELECT rolcanlogin FROM pg_catalog.pg_roles WHERE rolname = $1) AS canlogin," +
          " pg_catalog.current_database() AS db",
        [user],
      );
      const row = check.rows[0]!;
      if (row.canlogin === null) return this.fatal("28000", `role "${user}" does not exist`);
      if (!row.canlogin) return this.fatal("28000", `role "${user}" is not permitted to log in`);
      if (database !== row.db) {
        return this.fatal("3D000", `database "${database}" does not exist (the dev server has only "${row.db}")`);
      }
      this.state = { sessionUser: user, role: "none", settings };
      try {
        await srv.switchTo(this); // applies the startup parameters, as a server would
      } catch (err) {
        return this.fatal((err as { code?: string }).code ?? "22023", (err as Error).message);
      }
      const report = await srv.db.query<{ n: string; v: string | null }>(
        "SELECT n, pg_catalog.current_setting(n, true) AS v FROM pg_catalog.unnest($1::text[]) AS n",
        [srv.reportedSettings],
      );
      const out: Buffer[] = [message("R", int32(0))];
      if (minor > 0 || unknownProtocolOptions.length > 0) {
        out.push(
          message("v", Buffer.concat([int32(0), int32(unknownProtocolOptions.length), ...unknownProtocolOptions.map(cstr)])),
        );
      }
      for (const { n, v } of report.rows) out.push(message("S", Buffer.concat([cstr(n), cstr(v ?? "")])));
      // The real pg_backend_pid(): the proxy binds its context signature to the pid it is told.
      out.push(message("K", Buffer.concat([int32(srv.backendPid), int32((Math.random() * 0x7fffffff) | 0)])));
      out.push(message("Z", Buffer.from("I")));
      this.write(Buffer.concat(out));
    } finally {
      srv.release(this);
    }
  }

  private async onMessages(batch: Buffer[]): Promise<void> {
    const srv = this.server;
    let input: Uint8Array;
    try {
      input = new Uint8Array(Buffer.concat(batch.map((msg) => srv.rewrite(this, msg))));
    } catch (err) {
      return this.fatal("08P01", `invalid message format: ${(err as Error).message}`);
    }
    await srv.acquire(this);
    if (this.closed) return; // still the owner: retire() cleans up and releases
    const scanner = srv.scanner;
    scanner.reset();
    await srv.exec(() =>
      srv.db.execProtocolRawStream(input, {
        onRawData: (data) => {
          scanner.feed(data);
          this.write(Buffer.from(data));
        },
      }),
    );
    if (scanner.lastType === 0x5a /* Z */) {
      this.status = scanner.lastStatus ?? "I";
      this.pending = false;
    } else if (batch.some((m) => m[0] !== 0x48 /* H: Flush */)) {
      this.pending = true; // an extended-protocol batch is open until the next ReadyForQuery
    }
    if (this.status === "I" && !this.pending) srv.release(this);
  }

  /** Gives this connection's named statements and portals a private prefix. */
  rewriteNames(msg: Buffer): Buffer {
    const type = String.fromCharCode(msg[0]!);
    const body = msg.subarray(5);
    const rename = (name: string) => (name === "" ? "" : this.prefix + name);
    switch (type) {
      case "P": {
        const [name, at] = readCstr(body, 0);
        const [query, rest] = readCstr(body, at);
        // Not the simple-query COPY handled in onData: would end the backend, so make it an error.
        const text = copyFromStdin(query) ? EXTENDED_COPY_REFUSAL : query;
        if (name === "" && text === query) return msg;
        if (name !== "") this.statements.add(rename(name));
        return message("P", Buffer.concat([cstr(rename(name)), cstr(text), body.subarray(rest)]));
      }
      case "B": {
        const [portal, a] = readCstr(body, 0);
        const [stmt, b] = readCstr(body, a);
        if (portal === "" && stmt === "") return msg;
        return message("B", Buffer.concat([cstr(rename(portal)), cstr(rename(stmt)), body.subarray(b)]));
      }
      case "D":
      case "C": {
        const kind = body.subarray(0, 1);
        const [name] = readCstr(body, 1);
        if (name === "") return msg;
        if (type === "C" && kind[0] === 0x53 /* S */) this.statements.delete(rename(name));
        return message(type, Buffer.concat([kind, cstr(rename(name))]));
      }
      case "E": {
        const [portal, at] = readCstr(body, 0);
        if (portal === "") return msg;
        return message("E", Buffer.concat([cstr(rename(portal)), body.subarray(at)]));
      }
      default:
        return msg;
    }
  }

  onClose(): void {
    if (this.closed) return;
    this.phase = "closed";
    this.jobs.length = 0;
    // A running job finishes first (it may be waiting for the backend); run() retires after it.
    if (!this.running) void this.retire();
  }
}

// ----------------------------------------------------------------- server

export class PGliteSessionServer {
  readonly db: PGlite;
  /** Parameters the backend reports at startup (server_version, TimeZone, …). */
  reportedSettings: string[] = [];
  /** PGlite's one backend: every connection reports this pid, as pg_backend_pid() does. */
  backendPid = 0;
  readonly scanner = new ReadyScanner();
  private readonly host: string;
  private requestedPort: number;
  private server: Server | null = null;
  private readonly connections = new Set<Connection>();
  private nextId = 1;
  private owner: Connection | null = null;
  private waiters: Array<{ conn: Connection; resolve: () => void }> = [];
  /** The connection whose session state the backend currently holds. */
  private loaded: Connection | null = null;
  private readonly seedSettings: string[];
  private readonly learnt = new Set<string>();
  private readonly logger: (message: string) => void;
  private readonly onCrash: (error: Error) => void;
  /** Set when the backend has died; nothing reaches it again. */
  crashed: Error | null = null;

  constructor(options: SessionServerOptions) {
    this.db = options.db;
    this.onCrash = options.onCrash ?? (() => {});
    this.host = options.host ?? "127.0.0.1";
    this.requestedPort = options.port ?? 0;
    this.seedSettings = (options.customSettings ?? []).map((s) => s.toLowerCase());
    this.logger = options.log ?? (() => {});
  }

  log(message: string): void {
    this.logger(message);
  }

  /**
   * Runs raw protocol bytes through the backend. PGlite throws only when
   * the backend itself is gone (e.g. exit(1) on an unexpected end of input):
   * then no connection can be served any more.
   */
  async exec<T>(run: () => Promise<T>): Promise<T> {
    if (this.crashed) throw this.crashed;
    try {
      return await this.db.runExclusive(run);
    } catch (err) {
      const error = new Error(`embedded PostgreSQL (PGlite) stopped: ${(err as Error).message ?? String(err)}`);
      this.crashed = error;
      for (const c of this.connections) c.fatal("XX000", error.message);
      this.onCrash(error);
      throw error;
    }
  }

  get port(): number {
    return (this.server?.address() as AddressInfo | null)?.port ?? this.requestedPort;
  }

  async start(): Promise<void> {
    await this.db.waitReady;
    // Ask the backend which parameters it reports to a new client.
    const params = Buffer.from("user\0postgres\0database\0postgres\0\0");
    const startup = Buffer.concat([int32(8 + params.length), int32(PROTOCOL_3_0), params]);
    const reply = Buffer.from(await this.db.execProtocolRaw(new Uint8Array(startup)));
    for (let at = 0; at + 5 <= reply.length; at += 1 + reply.readInt32BE(at + 1)) {
      if (reply[at] === 0x53 /* S */) this.reportedSettings.push(readCstr(reply, at + 5)[0]);
    }
    this.backendPid = (await this.db.query<{ pid: number }>("SELECT pg_catalog.pg_backend_pid() AS pid")).rows[0]!.pid;
    const server = createServer((socket) => this.accept(socket));
    this.server = server;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(this.requestedPort, this.host, () => {
        server.off("error", reject);
        resolve();
      });
    });
  }

  async stop(): Promise<void> {
    const server = this.server;
    this.server = null;
    for (const c of this.connections) c.socket.destroy();
    if (server) await new Promise<void>((resolve) => server.close(() => resolve()));
    // Let in-flight queries and retire() (ROLLBACK, closing statements) finish before the caller closes the db.
    for (let i = 0; i < 500 && (this.owner !== null || this.waiters.length > 0); i++) {
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  private accept(socket: Socket): void {
    socket.setNoDelay(true);
    const conn = new Connection(this.nextId++, socket, this);
    if (this.crashed) {
      conn.fatal("57P03", this.crashed.message);
      return;
    }
    this.connections.add(conn);
    socket.on("data", (chunk: Buffer) => conn.onData(chunk));
    socket.on("error", () => socket.destroy());
    socket.on("close", () => {
      this.connections.delete(conn);
      conn.onClose();
    });
  }

  /** What the backend gets for a client message: names made private, setting names learnt. */
  rewrite(conn: Connection, msg: Buffer): Buffer {
    this.learnSettingNames(msg);
    return conn.rewriteNames(msg);
  }

  learnSettingNames(msg: Buffer): void {
    const type = String.fromCharCode(msg[0]!);
    if (this.learnt.size >= MAX_LEARNT_SETTINGS) return;
    const add = (name: string) => {
      if (this.learnt.size < MAX_LEARNT_SETTINGS) this.learnt.add(name.toLowerCase());
    };
    try {
      if (type === "Q") {
        for (const m of readCstr(msg, 5)[0].matchAll(DOTTED_NAME)) add(m[0]);
      } else if (type === "P") {
        const [, at] = readCstr(msg, 5);
        for (const m of readCstr(msg, at)[0].matchAll(DOTTED_NAME)) add(m[0]);
      } else if (type === "B") {
        // set_config($1, …): the setting's name may arrive as a text parameter.
        let at = readCstr(msg, readCstr(msg, 5)[1])[1];
        const nFormats = msg.readInt16BE(at);
        const formats: number[] = [];
        for (let i = 0; i < nFormats; i++) formats.push(msg.readInt16BE(at + 2 + 2 * i));
        at += 2 + 2 * nFormats;
        const nParams = msg.readInt16BE(at);
        at += 2;
        for (let i = 0; i < nParams; i++) {
          const len = msg.readInt32BE(at);
          at += 4;
          if (len < 0) continue;
          const format = nFormats === 0 ? 0 : nFormats === 1 ? formats[0] : formats[i];
          if (format === 0 && len <= 128) {
            const value = msg.toString("utf8", at, at + len);
            if (DOTTED_NAME_EXACT.test(value)) add(value);
          }
          at += len;
        }
      }
    } catch {
      // A malformed message: the backend will say so; learning is best effort.
    }
  }

  /**
   * Waits until `conn` owns the backend (FIFO). Unless told otherwise, also
   * makes the backend hold `conn`'s session state.
   */
  async acquire(conn: Connection, opts: { switchSession?: boolean } = {}): Promise<void> {
    if (this.crashed) throw this.crashed;
    if (this.owner !== conn) {
      if (this.owner === null) this.owner = conn;
      else await new Promise<void>((resolve) => this.waiters.push({ conn, resolve }));
    }
    if (this.crashed) throw this.crashed; // a dead backend never answers db.query()
    if ((opts.switchSession ?? true) && !conn.closed && this.loaded !== conn) await this.switchTo(conn);
  }

  release(conn: Connection): void {
    if (this.owner !== conn) return;
    const next = this.waiters.shift();
    this.owner = next?.conn ?? null;
    next?.resolve();
  }

  /** Saves the loaded connection's session, then restores `conn`'s. Caller owns the backend. */
  async switchTo(conn: Connection): Promise<void> {
    const previous = this.loaded;
    if (previous && previous !== conn && !previous.closed) {
      try {
        previous.state = await this.capture();
      } catch (err) {
        // e.g. the previous client set statement_timeout absurdly low; it keeps its last known state.
        this.log(`connection ${previous.id}: could not save session state: ${(err as Error).message}`);
      }
    }
    this.loaded = null;
    const s = conn.state;
    const script = ["RESET SESSION AUTHORIZATION", "RESET ROLE", "RESET ALL"];
    for (const [k, v] of s.settings) script.push(`SELECT pg_catalog.set_config(${sqlLiteral(k)}, ${sqlLiteral(v)}, false)`);
    script.push(`SELECT pg_catalog.set_config('session_authorization', ${sqlLiteral(s.sessionUser)}, false)`);
    if (s.role !== "none") script.push(`SELECT pg_catalog.set_config('role', ${sqlLiteral(s.role)}, false)`);
    await this.db.exec(script.join(";\n"));
    this.loaded = conn;
  }

  private async capture(): Promise<SessionState> {
    const names = [...new Set([...this.seedSettings, ...this.learnt])];
    const r = await this.db.query<{ su: string; role: string; settings: Array<[string, string]> }>(
      `SELECT session_user::text AS su, pg_catalog.current_setting('role') AS role,
         (SELECT coalesce(pg_catalog.json_agg(pg_catalog.json_build_array(name, v)), '[]')
            FROM (SELECT name, pg_catalog.current_setting(name) AS v FROM pg_catalog.pg_settings
                   WHERE source = 'session' AND name NOT IN ('role', 'session_authorization')
                  UNION ALL
                  SELECT n, pg_catalog.current_setting(n, true) FROM pg_catalog.unnest($1::text[]) AS n) s
           WHERE v IS NOT NULL AND v <> '') AS settings`,
      [names],
    );
    const row = r.rows[0]!;
    return { sessionUser: row.su, role: row.role, settings: row.settings };
  }

  /** A connection ended: leave the backend clean and close its statements. */
  async retire(conn: Connection): Promise<void> {
    // Called once the connection's jobs are done, so it is not among the waiters.
    const mine = this.owner === conn;
    if (this.crashed || (!mine && conn.statements.size === 0)) {
      this.release(conn);
      return;
    }
    try {
      await this.acquire(conn, { switchSession: false });
      // Close its statements, and end an unfinished extended-protocol batch (Sync) and transaction.
      const cleanup: Buffer[] = [];
      for (const name of conn.statements) cleanup.push(message("C", Buffer.concat([Buffer.from("S"), cstr(name)])));
      if (cleanup.length > 0 || (mine && conn.pending)) cleanup.push(message("S", Buffer.alloc(0)));
      if (cleanup.length > 0) await this.exec(() => this.db.execProtocolRaw(new Uint8Array(Buffer.concat(cleanup))));
      if (this.db.isInTransaction()) await this.db.exec("ROLLBACK");
    } catch (err) {
      this.log(`connection ${conn.id}: cleanup failed: ${(err as Error).message}`);
    } finally {
      if (this.loaded === conn) this.loaded = null;
      this.release(conn);
    }
  }
}
