/**
 * The client side of a proxied connection: one socket, its lifecycle state
 * and the ServerConnection it is attached to. Turns socket events into
 * lifecycle events (framing only where the lifecycle needs messages) and
 * performs the I/O and the procedures the lifecycle asks for.
 */
import type { Socket, SocketHandler } from "bun";
import { upstreamPasswordFor, type Config } from "../config.ts";
import { ConnectionLog } from "../log.ts";
import { Framer, FramingError, type Frame } from "../protocol/framer.ts";
import { errorResponse, type ErrorFields } from "../protocol/messages.ts";
import { MAX_STARTUP_PACKET, MIN_STARTUP_PACKET, parseStartupPacket } from "../protocol/startup.ts";
import { printable, type Identity } from "../tenant/identity.ts";
import type { ScramClient } from "../auth/scram-client.ts";
import type { Credentials } from "../auth/credentials.ts";
import { channelPrefix, signatureSetting } from "../tenant/context.ts";
import { guardMessage, guardWatches, LEX_OFF_LOOP_ABOVE, needsLexing, oversizeSink, type GuardOptions, type GuardResult } from "../guard/guard.ts";
import { guardWorker } from "../guard/worker.ts";
import { protectedSettings, type RefusalKind } from "../guard/rules.ts";
import { MessageScanner, type ScannerHooks, type Verdict } from "../protocol/scanner.ts";
import { DROPPED, MAX_NOTIFICATION, NOTIFICATION_RESPONSE, scopeNotification } from "../protocol/notification.ts";
import { QueryTracker } from "../protocol/ready.ts";
import type { CancelKey, CancelRegistry } from "./cancel.ts";
import { ClientAuth, type Step } from "./client-auth.ts";
import { establishContext } from "./context-round.ts";
import { errors } from "./errors.ts";
import { lifecycle, protocolViolation, type Input, type State } from "./lifecycle.ts";
import { Outbox } from "./outbox.ts";
import { logIn, type LoginResult } from "./server-login.ts";
import { ServerConnection, type ServerOwner } from "./server-connection.ts";
import { DirectTlsTransport, type ClientTransport, type ServerTls } from "./client-tls.ts";
import type { UpstreamHealth } from "./health.ts";

/** How long a closing session may wait for a client to read what is queued. */
const CLOSE_DEADLINE_MS = 10_000;
/** Client bytes held before the context is set, before the client is paused. */
export const MAX_HELD_BYTES = 64 * 1024;
/**
 * Under --auth proxy, superusers are relayed to PostgreSQL: each opens a
 * backend before anyone has checked who they are. A bounded number may be
 * logging in at once, so strangers cannot take PostgreSQL's connection
 * slots by starting superuser logins and never finishing them.
 */
export const MAX_RELAYED_LOGINS = 16;
/** Postgres's own limit on a client message (MaxAllocSize). */
const MAX_CLIENT_MESSAGE = 0x3fffffff;
/** The largest length a server message header can carry. */
const MAX_SERVER_MESSAGE = 0x7fffffff;

/** What the log says of a refusal (never the statement itself). */
const REFUSED: Record<RefusalKind, string> = {
  context: "refused a statement that would change the role or the tenant context (42501)",
  channel: "refused a LISTEN/NOTIFY form that multigres cannot scope to the tenant (42501)",
  strict: "refused a statement that --guard strict does not allow (42501)",
};

export type ClientSocket = Socket<Session>;

/** What every session shares: the proxy's config and registries. */
export interface ProxyContext {
  config: Config;
  /** Derived from config.contextSecret; what context signatures are made with. */
  contextKey: Uint8Array;
  /** Certificate and key for client TLS, when configured. */
  tls: ServerTls | undefined;
  /** PEM CA bundle for verifying the upstream, when configured. */
  upstreamCa: string | undefined;
  /** Client credentials (--auth proxy); undefined with --auth passthrough. */
  credentials: Credentials | undefined;
  /** PEM client certificate and key for the upstream, when configured. */
  upstreamCert: { cert: string; key: string } | undefined;
  health: UpstreamHealth;
  /** Relayed logins in progress under --auth proxy (superusers): nobody has authenticated them yet. */
  relayedLogins: number;
  cancelKeys: CancelRegistry;
  sendCancel(upstream: { host: string; port: number }, processId: number, secretKey: number): void;
  sessionClosed(session: Session): void;
}

let lastId = 0;

export class Session implements ServerOwner {
  readonly id = ++lastId;
  state: State = "startup";
  log: ConnectionLog;
  identity: Exclude<Identity, { kind: "rejected" }> | undefined;

  // Set by the lifecycle as the connection progresses.
  /** Startup parameters for the server (user rewritten to the role). */
  upstreamParams: Map<string, string> | undefined;
  /** The proxy authenticating this client (--auth proxy). */
  clientAuth: ClientAuth | undefined;
  md5Salt: Uint8Array | undefined;
  /** Passthrough: the proxy logs in upstream with SCRAM for a TLS client (auth/scram-client.ts). */
  scramPending = false;
  scram: ScramClient | undefined;
  private heldClient: Uint8Array[] = [];
  private heldBytes = 0;
  /** A step of the client's authentication is being computed: frame nothing more until it is. */
  private authPending = false;
  private contextStartedAt = 0;

  /** Whether the client leg is encrypted. */
  tls = false;
  /** tls-server-end-point of the certificate this client's TLS uses (SCRAM-SHA-256-PLUS). */
  private channelBinding: Uint8Array | undefined;
  /** The server this session went to (cancels follow it, whatever a reload changes). */
  private upstream: { host: string; port: number } | undefined;
  /** SSLRequest / GSSENCRequest seen (each is allowed once). */
  encryptionAsked = false;
  gssAsked = false;

  private server: ServerConnection | undefined;
  private transport: ClientTransport;
  private out: Outbox;
  private clientFrames: Framer | undefined = new Framer(MAX_STARTUP_PACKET, 256);
  private cancelKey: CancelKey | undefined;
  /** Set in the transparent state of a guarded tenant session. */
  private guard: MessageScanner | undefined;
  /** The guard waits for a verdict from its worker: the client is not read meanwhile. */
  private guardParked = false;
  /** The server is not taking our writes: the client is not read meanwhile. */
  private serverBacklogged = false;
  private guardOptions: GuardOptions = { names: [], strict: false };
  /**
   * Set in the transparent state of a guarded tenant session: the server's
   * NotificationResponses are scoped to the session's channels (see
   * protocol/notification.ts); everything else passes as it came.
   */
  private notifications: MessageScanner | undefined;
  /** The session's channel prefix, as bytes (set with `notifications`). */
  private channelPrefix = new Uint8Array(0);
  /** Transaction status and whether a query is in flight (transparent state). */
  private tracker: QueryTracker | undefined;
  private lastClientActivity = performance.now();
  /** Shutting down: end the session as soon as it is idle. */
  private draining = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private closing = false;
  private readonly openedAt = performance.now();
  private bytesIn = 0;
  private bytesOut = 0;

  constructor(
    private readonly ctx: ProxyContext,
    private readonly socket: ClientSocket,
  ) {
    this.log = new ConnectionLog({ conn: this.id, remote: socket.remoteAddress });
    this.transport = socket;
    this.out = this.outboxFor(socket);
    if (ctx.config.startupTimeout > 0) {
      this.timer = setTimeout(() => this.dispatch("timeout", undefined), ctx.config.startupTimeout);
    }
    this.log.debug("connection opened", { event: "open" });
  }

  private outboxFor(transport: ClientTransport): Outbox {
    return new Outbox(
      transport,
      () => this.server?.pause(),
      () => (this.closing ? this.transport.end() : this.server?.resume()),
    );
  }

  /** Events from the raw socket only count until TLS takes it over. */
  owns(socket: unknown): boolean {
    return socket === this.transport;
  }

  get config() {
    return this.ctx.config;
  }

  get contextKey() {
    return this.ctx.contextKey;
  }

  get tlsAvailable(): boolean {
    return this.ctx.tls !== undefined && this.config.clientTls !== "disable";
  }

  get clientIsLoopback(): boolean {
    const a = this.socket.remoteAddress;
    return a.startsWith("127.") || a === "::1" || a.startsWith("::ffff:127.");
  }

  // ------------------------------------------------------------- dispatch

  private dispatch(event: string, input: Input): void {
    const handler = lifecycle[this.state][event];
    if (handler) {
      try {
        this.state = handler(this, input as never);
      } catch (e) {
        // A message that decodes badly (say, truncated by a broken upstream)
        // ends this session, never the proxy.
        this.log.warn(`${event} in state ${this.state}: ${(e as Error).message}`);
        this.state = this.fail(errors.protocolError((e as Error).message));
      }
    } else if (this.state !== "closed") {
      this.log.warn(`${event} in state ${this.state}`);
      this.state = this.fail(protocolViolation(this, event));
    }
  }

  // --------------------------------------------------------- client events

  clientData(bytes: Uint8Array): void {
    const first = this.bytesIn === 0;
    this.bytesIn += bytes.length;
    if (!this.clientFrames) return this.dispatch("client:data", bytes);
    // A TLS ClientHello (record type 22) first: PostgreSQL 17's direct TLS.
    if (first && bytes[0] === 0x16 && this.state === "startup" && !this.tls) return this.dispatch("client:tls_hello", bytes);
    // Terminate ('X') before any startup packet: a driver giving up on a
    // connection it never used. PostgreSQL closes without a word; so do we.
    if (first && bytes[0] === 0x58 && this.state === "startup") {
      this.log.debug("client sent Terminate before its startup packet");
      this.state = this.close();
      return;
    }
    this.clientFrames.push(bytes);
    this.pumpClient();
  }

  clientDrained(): void {
    this.out.flush();
  }

  clientClosed(): void {
    this.dispatch("client:closed", undefined);
  }

  /** Frames client bytes while the lifecycle wants messages, not bytes. */
  private pumpClient(): void {
    const frames = this.clientFrames;
    if (!frames) return;
    try {
      while (!this.authPending) {
        if (this.state === "startup") {
          const f = frames.nextUntyped(MIN_STARTUP_PACKET);
          if (!f) return;
          const packet = parseStartupPacket(f.body);
          this.dispatch(`client:${packet.kind}`, packet);
        } else if (this.state === "authenticating" || this.state === "client_auth") {
          const f = frames.next();
          if (!f) return;
          this.dispatch(`client:${String.fromCharCode(f.type)}`, f);
        } else {
          break;
        }
      }
    } catch (e) {
      if (!(e instanceof FramingError)) throw e;
      this.state = this.fail(this.state === "startup" ? errors.invalidStartupPacket(e.message) : errors.invalidMessage(e.message));
      return;
    }
    if (this.authPending) return;
    // Relaying, a client has nothing to say while the proxy connects
    // upstream; one that keeps talking is not buffered without bound.
    if (this.state === "connecting" && this.relaysAuthentication) {
      if (frames.buffered > MAX_STARTUP_PACKET) this.state = this.fail(errors.dataBeforeAuthentication());
      return;
    }
    // Past authentication the client's bytes are no longer framed here.
    if (this.state !== "closed") {
      this.clientFrames = undefined;
      if (frames.buffered > 0) this.dispatch("client:data", frames.drain());
    }
  }

  // --------------------------------------------------------- server events

  serverOpened(): void {
    this.dispatch("server:opened", undefined);
    if (this.clientFrames) this.pumpClient();
  }

  serverData(bytes: Uint8Array): void {
    this.dispatch("server:data", bytes);
  }

  serverBroken(error: Error): void {
    this.dispatch("server:broken", error);
  }

  serverClosed(error?: Error): void {
    // The connection stays referenced (ended): its backend may still be
    // running this client's query, and close() cancels it with its key.
    if (error) this.log.debug(`upstream closed: ${error.message}`);
    this.dispatch("server:closed", undefined);
  }

  serverUnreachable(error: Error): void {
    this.dispatch("server:unreachable", error);
  }

  serverBacklog(): void {
    this.serverBacklogged = true;
    this.transport.pause();
  }

  serverClear(): void {
    this.serverBacklogged = false;
    if (!this.guardParked) this.transport.resume();
  }

  // ------------------------------------------- actions for the lifecycle

  toClient(bytes: Uint8Array): void {
    this.bytesOut += bytes.length;
    this.out.send(bytes);
  }

  toServer = (bytes: Uint8Array): void => {
    this.server?.send(bytes);
  };

  /** A client that pipelines before its first ReadyForQuery: keep its bytes, in order, until the context is in place. */
  holdClientBytes(bytes: Uint8Array): void {
    // Each data event brings a buffer of its own, so no copy is needed.
    this.heldClient.push(bytes);
    this.heldBytes += bytes.length;
    if (this.heldBytes > MAX_HELD_BYTES) this.transport.pause();
  }

  /** Client bytes in the transparent state: through the guard, if on. */
  clientToServer(bytes: Uint8Array): void {
    this.lastClientActivity = performance.now();
    try {
      this.tracker?.fromClient(bytes);
      if (!this.guard) return this.toServer(bytes);
      this.guard.scan(bytes, this.toServer, this.inspect);
    } catch (e) {
      if (!(e instanceof FramingError)) throw e;
      this.state = this.fail(errors.invalidMessage(e.message));
    }
  }

  /** Server bytes in the transparent state. */
  serverToClient(bytes: Uint8Array): void {
    try {
      this.tracker?.fromServer(bytes);
      if (this.notifications) this.notifications.scan(bytes, this.toClientUnlessEmpty, this.scopeNotification);
      else this.toClient(bytes);
    } catch (e) {
      if (!(e instanceof FramingError)) throw e;
      this.state = this.fail(errors.invalidServerMessage(e.message));
      return;
    }
    if (this.draining && this.idle) this.terminate();
  }

  private readonly toClientUnlessEmpty = (bytes: Uint8Array): void => {
    if (bytes.length > 0) this.toClient(bytes);
  };

  private readonly scopeNotification = (_type: number, bytes: Uint8Array, start: number, end: number): Uint8Array =>
    scopeNotification(bytes, start, end, this.channelPrefix);

  /** What the notification scanner does with a NotificationResponse too large to be one: drops it. */
  private readonly notificationHooks: ScannerHooks = {
    maxWatched: MAX_NOTIFICATION,
    oversize: () => ({ feed() {}, end: () => DROPPED }),
    parked() {},
    resumed() {},
    failed: (e) => {
      this.state = this.fail(errors.invalidServerMessage(e.message));
    },
  };

  /** No transaction open and no query in flight. */
  get idle(): boolean {
    return this.state === "transparent" && !!this.tracker?.idle;
  }

  /** The proxy is shutting down: go now if idle, else after the transaction. */
  drain(): void {
    this.draining = true;
    if (this.state !== "transparent" || this.idle) this.terminate();
  }

  terminate(): void {
    if (this.closing) return;
    this.state = this.fail(errors.shuttingDown());
  }

  closeIfIdle(now: number, limit: number): void {
    if (this.state !== "transparent" || this.tracker?.busy) return;
    if (now - this.lastClientActivity < limit) return;
    this.state = this.fail(errors.idleTimeout(limit));
  }

  private inspect = (type: number, bytes: Uint8Array, start: number, end: number): Verdict | Promise<Verdict> => {
    // A big statement is lexed off the event loop; this session waits for it alone.
    if (end - start > LEX_OFF_LOOP_ABOVE && needsLexing(type, bytes, start, end, this.guardOptions)) {
      // Turns are taken per <role>.<tenant>.
      const who = this.identity?.kind === "tenant" ? this.identity.user : "";
      return guardWorker.check(type, bytes.slice(start, end), this.guardOptions, who).then((r) => this.replacement(r));
    }
    return this.replacement(guardMessage(type, bytes, start, end, this.guardOptions));
  };

  private replacement(result: GuardResult | undefined): Verdict {
    if (result?.refused) this.log.warn(REFUSED[result.refused]);
    return result?.bytes;
  }

  /** What the guard's scanner tells the session (see protocol/scanner.ts). */
  private readonly scannerHooks: ScannerHooks = {
    maxWatched: 0, // set in goTransparent, from the config
    oversize: (type, length) => {
      this.log.warn(`refused a statement of ${length - 4} bytes, over --guard-max-statement (54000)`);
      return oversizeSink(type, length, this.config.guardMaxStatement);
    },
    parked: () => {
      this.guardParked = true;
      this.transport.pause();
    },
    resumed: () => {
      this.guardParked = false;
      if (!this.serverBacklogged) this.transport.resume();
    },
    failed: (e) => {
      this.state = this.fail(e instanceof FramingError ? errors.invalidMessage(e.message) : errors.protocolError(e.message));
    },
  };

  /** Answer an SSLRequest with 'S' and continue the connection over TLS. */
  startTls(): void {
    if (this.clientFrames && this.clientFrames.buffered > 0) {
      // Bytes sent after SSLRequest but before the handshake were never
      // encrypted: someone may have injected them (CVE-2021-23214).
      this.state = this.fail(errors.unencryptedAfterSslRequest());
      return;
    }
    this.toClient(Uint8Array.of(0x53));
    this.channelBinding = this.ctx.tls!.endPoint;
    const [, tlsSocket] = this.socket.upgradeTLS<Session>({
      data: this,
      socket: clientHandlers as unknown as SocketHandler<Session>,
      tls: { cert: this.ctx.tls!.cert, key: this.ctx.tls!.key },
    });
    this.tls = true;
    this.transport = tlsSocket;
    this.out = this.outboxFor(tlsSocket);
  }

  /** Direct TLS: the handshake already began with `hello`. */
  startDirectTls(hello: Uint8Array): void {
    this.clientFrames = new Framer(MAX_STARTUP_PACKET, 256);
    this.bytesIn = 0;
    const transport = new DirectTlsTransport(
      this.socket as never,
      this.ctx.tls!,
      {
        data: (bytes) => this.clientData(bytes),
        drain: () => this.clientDrained(),
        close: () => this.clientClosed(),
        error: (e) => this.log.warn(`client TLS error: ${e.message}`),
        secure: (alpn) => {
          // Direct TLS without ALPN "postgresql" could be some other protocol's
          // client talking to the wrong port; Postgres refuses it too.
          if (alpn !== "postgresql") this.state = this.fail(errors.directTlsWithoutAlpn());
        },
      },
      (raw, onClear) => new Outbox(raw, () => this.server?.pause(), () => { onClear(); this.server?.resume(); }),
    );
    this.direct = transport;
    this.tls = true;
    this.channelBinding = this.ctx.tls!.endPoint;
    this.transport = transport;
    this.out = this.outboxFor(transport);
    transport.feed(hello);
  }

  /** The raw socket under a direct-TLS transport. */
  direct: DirectTlsTransport | undefined;

  identify(identity: Exclude<Identity, { kind: "rejected" }>): void {
    this.identity = identity;
    // The role is whatever the client typed before the tenant: never let
    // it write a line break (a forged log line) into the log.
    this.log = new ConnectionLog({
      conn: this.id,
      remote: this.socket.remoteAddress,
      user: printable(identity.kind === "tenant" ? identity.role : identity.user),
      tenant: identity.kind === "tenant" ? identity.tenant : undefined,
    });
  }

  /** Superusers, and everyone under --auth passthrough: PostgreSQL authenticates them. */
  get relaysAuthentication(): boolean {
    return this.config.auth === "passthrough" || this.identity?.kind !== "tenant";
  }

  /** A relayed login under --auth proxy takes one of the MAX_RELAYED_LOGINS places, if one is free. */
  private relayedLogin = false;
  takeRelayedLogin(): boolean {
    if (this.config.auth !== "proxy") return true;
    if (this.ctx.relayedLogins >= MAX_RELAYED_LOGINS) return false;
    this.ctx.relayedLogins++;
    this.relayedLogin = true;
    return true;
  }
  private releaseRelayedLogin(): void {
    if (!this.relayedLogin) return;
    this.relayedLogin = false;
    this.ctx.relayedLogins--;
  }

  /** --auth proxy: the exchange with the client begins; returns its first message. */
  beginClientAuth(): Uint8Array {
    const id = this.identity as Extract<Identity, { kind: "tenant" }>;
    // Cleartext only where nobody can listen; SCRAM everywhere else.
    const method = this.config.authMethod === "password" && (this.tls || this.clientIsLoopback) ? "password" : "scram";
    this.clientAuth = new ClientAuth(this.ctx.credentials!, id, method, this.tls ? this.channelBinding : undefined);
    return this.clientAuth.request();
  }

  /** A step of the client's authentication that takes a moment: go on when it is ready. */
  awaitStep(step: Promise<Step>): void {
    this.authPending = true;
    step.then(
      (result) => {
        this.authPending = false;
        if (this.state !== "client_auth") return;
        this.dispatch("auth:step", result);
        this.pumpClient();
      },
      (error: Error) => {
        this.authPending = false;
        this.log.error(`client authentication: ${error.message}`);
        if (this.state === "client_auth") this.state = this.fail(errors.saslProtocol("internal error"));
      },
    );
  }

  authFailed(reason: string): void {
    this.ctx.health.authFailures++;
    this.log.warn(`authentication failed for user "${printable(this.identity!.kind === "tenant" ? this.identity!.user : "")}": ${reason}`, { event: "auth_failed" });
  }

  authSucceeded(): void {
    this.log.debug(`client authenticated (${this.clientAuth?.source})`);
    this.clientAuth = undefined;
  }

  connectUpstream(): void {
    const c = this.config;
    this.upstream = c.upstream;
    this.server = ServerConnection.connect(
      {
        host: c.upstream.host,
        port: c.upstream.port,
        tls: c.upstreamTls,
        ca: this.ctx.upstreamCa,
        serverName: c.upstreamServerName,
        cert: this.ctx.upstreamCert?.cert,
        key: this.ctx.upstreamCert?.key,
        connectTimeout: c.connectTimeout,
        keepalive: c.keepalive,
      },
      this,
    );
  }

  /** Relaying: server messages become lifecycle events until the session is transparent. */
  relayServerMessages(): void {
    this.server!.read((f: Frame) => {
      this.dispatch(`server:${String.fromCharCode(f.type)}`, f);
      return this.state === "transparent" || this.state === "closed" ? "done" : "more";
    });
  }

  /** --auth proxy: the server connection logs in with the proxy's own credential. */
  logInUpstream(): void {
    const role = this.upstreamParams!.get("user")!;
    logIn(this.server!, { params: this.upstreamParams!, password: upstreamPasswordFor(this.config, role) }, (result) => this.dispatch("server:login", result));
  }

  /** The upstream role and database, fit for a log line (both came from the client). */
  private get upstreamRole(): string {
    return printable(this.upstreamParams?.get("user") ?? "");
  }
  private get upstreamDatabase(): string {
    return printable(this.upstreamParams?.get("database") ?? "");
  }

  upstreamLoginFailed(result: Extract<LoginResult, { ok: false }>): void {
    this.log.error(`could not log in to PostgreSQL with the proxy's credential (login as ${this.upstreamRole}@${this.upstreamDatabase}): ${result.message}`, {
      event: "upstream_login_failed",
    });
    // Keyed by role: a refused password is wrong in every database.
    if (result.refused) this.ctx.health.report(`login as ${this.upstreamRole}`, result.message);
  }

  upstreamLoginSucceeded(): void {
    this.ctx.health.report(`login as ${this.upstreamRole}`, undefined);
  }

  /** ParameterStatus messages the server sent at login, for the client. */
  serverParameters(): Iterable<Uint8Array> {
    return this.server!.parameters.values();
  }

  setServerKey(key: CancelKey): void {
    this.server!.key = key;
  }

  get hasServerKey(): boolean {
    return this.server?.key !== undefined;
  }

  /** Run the context round on the server connection; the lifecycle hears "context:done". */
  establishContext(): State {
    const id = this.identity as Extract<Identity, { kind: "tenant" }>;
    this.contextStartedAt = performance.now();
    establishContext(
      this.server!,
      { rules: this.config, identity: id, key: this.ctx.contextKey, database: this.upstreamDatabase },
      (raw) => this.toClient(raw),
      (result) => this.dispatch("context:done", result),
    );
    return "injecting";
  }

  /** A context verified here: whatever the startup check found wrong for this role and database is fixed. */
  contextVerified(): void {
    this.ctx.health.report(`context check as ${this.upstreamRole}@${this.upstreamDatabase}`, undefined);
  }

  /**
   * Fail loud: the log says why, and in a served database (--database) the
   * failure is every tenant's, so /readyz says so too. (A database a client
   * merely asked for does not get to change readiness.)
   */
  contextFailed(why: string): void {
    this.log.error(`tenant context not established: ${why}`);
    const database = this.upstreamParams?.get("database") ?? "";
    if (this.config.databases.includes(database)) this.ctx.health.report(`context check as ${this.upstreamRole}@${this.upstreamDatabase}`, why);
  }

  /** Milliseconds the context round took (for the debug log). */
  contextMs(): number {
    return performance.now() - this.contextStartedAt;
  }

  issueCancelKey(): CancelKey {
    if (this.cancelKey) this.ctx.cancelKeys.release(this.cancelKey);
    this.cancelKey = this.ctx.cancelKeys.issue(this);
    return this.cancelKey;
  }

  /** A CancelRequest came in on this connection: pass it to its session. */
  forwardCancel(processId: number, secretKey: Uint8Array): void {
    const target = this.ctx.cancelKeys.find(processId, secretKey);
    if (target) target.cancel();
    else this.log.debug("cancel request with an unknown key ignored");
  }

  /** Someone asked to cancel what this session's server is running. */
  cancel(): void {
    const key = this.server?.key;
    if (!key) return;
    this.log.info("forwarding cancel request");
    if (this.upstream) this.ctx.sendCancel(this.upstream, key.processId, key.secretKey);
  }

  goTransparent(): State {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.releaseRelayedLogin();
    if (this.clientFrames) {
      if (this.clientFrames.buffered > 0) this.heldClient.push(this.clientFrames.drain());
      this.clientFrames = undefined;
    }
    this.log.info(this.identity?.kind === "tenant" ? "session ready, tenant context set" : "session ready (superuser, no tenant context)", {
      event: "ready",
      tls: this.tls,
    });
    this.tracker = new QueryTracker();
    this.lastClientActivity = performance.now();
    if (this.identity?.kind === "tenant" && this.config.guard !== "off") {
      // Statements up to --guard-max-statement are held and read (header included: +5).
      this.scannerHooks.maxWatched = this.config.guardMaxStatement + 5;
      this.guard = new MessageScanner(guardWatches, MAX_CLIENT_MESSAGE, this.scannerHooks);
      // Channels are this tenant's under the key the proxy holds now; a
      // rotation (SIGHUP) leaves this session's as they are.
      const prefix = channelPrefix(this.ctx.contextKey, this.identity.tenant);
      this.guardOptions = {
        names: protectedSettings(this.config.tenantSetting, signatureSetting(this.config.tenantSetting)),
        strict: this.config.guard === "strict",
        channelPrefix: prefix,
      };
      this.channelPrefix = new TextEncoder().encode(prefix);
      this.notifications = new MessageScanner((type) => type === NOTIFICATION_RESPONSE, MAX_SERVER_MESSAGE, this.notificationHooks);
    }
    for (const bytes of this.heldClient) this.clientToServer(bytes);
    this.heldClient = [];
    this.heldBytes = 0;
    if (!this.guardParked && !this.serverBacklogged) this.transport.resume();
    return this.closing ? "closed" : "transparent";
  }

  /** Send an ErrorResponse, then close. */
  fail(fields: ErrorFields): State {
    if (fields.code === "08P01" || fields.code === "08006") this.log.warn(fields.message);
    else this.log.info(`refused: ${fields.message}`);
    this.toClient(errorResponse(fields));
    return this.close();
  }

  close(): State {
    if (this.closing) return "closed";
    this.closing = true;
    clearTimeout(this.timer);
    this.releaseRelayedLogin();
    if (this.cancelKey) this.ctx.cancelKeys.release(this.cancelKey);
    // A client gone mid-query must not leave its backend running the query.
    if (this.tracker?.busy) this.cancel();
    this.server?.end();
    this.server = undefined;
    this.clientFrames = undefined;
    this.clientAuth = undefined;
    // What is still queued for the client goes out first (Outbox calls end
    // on clear), but a client that stopped reading does not keep its socket.
    if (this.out.backlog === 0) this.transport.end();
    else setTimeout(() => this.socket.terminate(), CLOSE_DEADLINE_MS).unref();
    this.log.info("connection closed", {
      event: "close",
      durationMs: Math.round(performance.now() - this.openedAt),
      bytesIn: this.bytesIn,
      bytesOut: this.bytesOut,
    });
    this.ctx.sessionClosed(this);
    return "closed";
  }
}


/**
 * Socket events of client connections. After an in-place TLS upgrade the
 * raw socket still reports the ciphertext: only the socket the session
 * currently talks through counts, except that under direct TLS the raw
 * socket feeds the TLS layer.
 */
export const clientHandlers: SocketHandler<Session, "uint8array"> = {
  binaryType: "uint8array",
  data(socket, bytes) {
    const s = socket.data;
    if (s.owns(socket)) s.clientData(bytes);
    else s.direct?.feed(bytes);
  },
  drain(socket) {
    const s = socket.data;
    if (s.owns(socket)) s.clientDrained();
    else s.direct?.rawDrained();
  },
  close(socket) {
    const s = socket.data;
    if (!s.owns(socket)) s.direct?.rawClosed();
    s.clientClosed();
  },
  error(socket, error) {
    socket.data.log.warn(`client socket error: ${error.message}`);
  },
};
