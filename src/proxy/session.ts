/**
 * The client side of a proxied connection: one socket, its lifecycle state
 * and the ServerConnection it is attached to. Turns socket events into
 * lifecycle events (framing only where the lifecycle needs messages) and
 * performs the I/O the lifecycle asks for.
 */
import type { Socket } from "bun";
import type { Config } from "../config.ts";
import { log, type Logger } from "../log.ts";
import { Framer, FramingError, type Frame } from "../protocol/framer.ts";
import { errorResponse, type ErrorFields } from "../protocol/messages.ts";
import { MAX_STARTUP_PACKET, MIN_STARTUP_PACKET, parseStartupPacket } from "../protocol/startup.ts";
import type { Identity } from "../tenant/identity.ts";
import { signatureSetting } from "../tenant/context.ts";
import { guardMessage, guardWatches } from "../guard/guard.ts";
import { protectedSettings } from "../guard/rules.ts";
import { MessageScanner } from "../protocol/scanner.ts";
import type { CancelKey, CancelRegistry } from "./cancel.ts";
import { lifecycle, protocolViolation, type Input, type State } from "./lifecycle.ts";
import { Outbox } from "./outbox.ts";
import { ServerConnection, type ServerOwner } from "./server-connection.ts";

/** Largest server message accepted before the transparent state. */
const MAX_SERVER_STARTUP_MESSAGE = 1 << 20;
/** Postgres's own limit on a client message (MaxAllocSize). */
const MAX_CLIENT_MESSAGE = 0x3fffffff;

export type ClientSocket = Socket<Session>;

/** What every session shares: the proxy's config and registries. */
export interface ProxyContext {
  config: Config;
  /** Derived from config.contextSecret; what context signatures are made with. */
  contextKey: Uint8Array;
  cancelKeys: CancelRegistry;
  sendCancel(processId: number, secretKey: number): void;
  sessionClosed(session: Session): void;
}

let lastId = 0;

export class Session implements ServerOwner {
  readonly id = ++lastId;
  state: State = "startup";
  log: Logger;
  identity: Exclude<Identity, { kind: "rejected" }> | undefined;

  // Set by the lifecycle as the connection progresses.
  upstreamStartup: Uint8Array | undefined;
  md5Salt: Uint8Array | undefined;
  serverKey: CancelKey | undefined;
  heldReady: Uint8Array | undefined;
  heldReadyAt = 0;
  heldClient: Uint8Array[] = [];

  private server: ServerConnection | undefined;
  private readonly out: Outbox;
  private clientFrames: Framer | undefined = new Framer(MAX_STARTUP_PACKET, 256);
  private serverFrames: Framer | undefined;
  private cancelKey: CancelKey | undefined;
  /** Set in the transparent state of a guarded tenant session. */
  private guard: MessageScanner | undefined;
  private protectedNames: string[] = [];
  private timer: ReturnType<typeof setTimeout> | undefined;
  private closing = false;
  private readonly openedAt = performance.now();
  private bytesIn = 0;
  private bytesOut = 0;

  constructor(
    private readonly ctx: ProxyContext,
    private readonly socket: ClientSocket,
  ) {
    this.log = log.withTag(`c${this.id}`);
    this.out = new Outbox(
      socket,
      () => this.server?.pause(),
      () => (this.closing ? this.socket.end() : this.server?.resume()),
    );
    if (ctx.config.startupTimeout > 0) {
      this.timer = setTimeout(() => this.dispatch("timeout", undefined), ctx.config.startupTimeout);
    }
    this.log.debug(`connection from ${socket.remoteAddress}`);
  }

  get config() {
    return this.ctx.config;
  }

  get contextKey() {
    return this.ctx.contextKey;
  }

  get clientIsLoopback(): boolean {
    const a = this.socket.remoteAddress;
    return a.startsWith("127.") || a === "::1" || a.startsWith("::ffff:127.");
  }

  // ------------------------------------------------------------- dispatch

  private dispatch(event: string, input: Input): void {
    const handler = lifecycle[this.state][event];
    if (handler) {
      this.state = handler(this, input as never);
    } else if (this.state !== "closed") {
      this.log.warn(`${event} in state ${this.state}`);
      this.state = this.fail(protocolViolation(this, event));
    }
  }

  // --------------------------------------------------------- client events

  clientData(bytes: Uint8Array): void {
    this.bytesIn += bytes.length;
    if (!this.clientFrames) return this.dispatch("client:data", bytes);
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
    const frames = this.clientFrames!;
    try {
      for (;;) {
        if (this.state === "startup") {
          const f = frames.nextUntyped(MIN_STARTUP_PACKET);
          if (!f) return;
          const packet = parseStartupPacket(f.body);
          this.dispatch(`client:${packet.kind}`, packet);
        } else if (this.state === "authenticating") {
          const f = frames.next();
          if (!f) return;
          this.dispatch(`client:${String.fromCharCode(f.type)}`, f);
        } else {
          break;
        }
      }
    } catch (e) {
      if (!(e instanceof FramingError)) throw e;
      this.state = this.fail({ severity: "FATAL", code: "08P01", message: `invalid ${this.state === "startup" ? "startup packet" : "message"}: ${e.message}` });
      return;
    }
    // Past authentication the client's bytes are no longer framed here.
    if (this.state !== "connecting" && this.state !== "closed") {
      this.clientFrames = undefined;
      if (frames.buffered > 0) this.dispatch("client:data", frames.drain());
    }
  }

  // --------------------------------------------------------- server events

  serverOpened(): void {
    this.serverFrames = new Framer(MAX_SERVER_STARTUP_MESSAGE, 1024);
    this.dispatch("server:opened", undefined);
    if (this.clientFrames) this.pumpClient();
  }

  serverData(bytes: Uint8Array): void {
    if (!this.serverFrames) return this.dispatch("server:data", bytes);
    const frames = this.serverFrames;
    frames.push(bytes);
    let f: Frame | null;
    try {
      while (this.state !== "transparent" && this.state !== "closed" && (f = frames.next())) {
        this.dispatch(`server:${String.fromCharCode(f.type)}`, f);
      }
    } catch (e) {
      if (!(e instanceof FramingError)) throw e;
      this.state = this.fail({ severity: "FATAL", code: "08P01", message: `invalid message from the upstream server: ${e.message}` });
      return;
    }
    if (this.state === "transparent" && frames.buffered > 0) this.serverData(frames.drain());
  }

  serverClosed(error?: Error): void {
    this.server = undefined;
    if (error) this.log.debug(`upstream closed: ${error.message}`);
    this.dispatch("server:closed", undefined);
  }

  serverUnreachable(error: Error): void {
    this.server = undefined;
    this.dispatch("server:unreachable", error);
  }

  serverBacklog(): void {
    this.socket.pause();
  }

  serverClear(): void {
    this.socket.resume();
  }

  // ------------------------------------------- actions for the lifecycle

  toClient(bytes: Uint8Array): void {
    this.bytesOut += bytes.length;
    this.out.send(bytes);
  }

  toServer = (bytes: Uint8Array): void => {
    this.server?.send(bytes);
  };

  /** Client bytes in the transparent state: through the guard, if on. */
  clientToServer(bytes: Uint8Array): void {
    if (!this.guard) return this.toServer(bytes);
    try {
      this.guard.scan(bytes, this.toServer, this.inspect);
    } catch (e) {
      if (!(e instanceof FramingError)) throw e;
      this.state = this.fail({ severity: "FATAL", code: "08P01", message: `invalid message: ${e.message}` });
    }
  }

  private inspect = (type: number, message: Uint8Array): Uint8Array | undefined => {
    const replacement = guardMessage(type, message, this.protectedNames);
    if (replacement) this.log.warn("refused a statement that would change the role or the tenant context (42501)");
    return replacement;
  };

  identify(identity: Exclude<Identity, { kind: "rejected" }>): void {
    this.identity = identity;
    const who = identity.kind === "tenant" ? `${identity.role}/${identity.tenant}` : `${identity.user} (superuser)`;
    this.log = log.withTag(`c${this.id} ${who}`);
  }

  connectUpstream(): void {
    const { host, port } = this.config.upstream;
    this.server = ServerConnection.connect(host, port, this);
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
    if (!this.serverKey) return;
    this.log.info("forwarding cancel request");
    this.ctx.sendCancel(this.serverKey.processId, this.serverKey.secretKey);
  }

  goTransparent(): State {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.serverFrames = undefined;
    if (this.clientFrames) {
      if (this.clientFrames.buffered > 0) this.heldClient.push(this.clientFrames.drain());
      this.clientFrames = undefined;
    }
    this.log.info(this.identity?.kind === "tenant" ? "session ready, tenant context set" : "session ready");
    if (this.identity?.kind === "tenant" && this.config.guard) {
      this.guard = new MessageScanner(guardWatches, MAX_CLIENT_MESSAGE);
      this.protectedNames = protectedSettings(this.config.tenantSetting, signatureSetting(this.config.tenantSetting));
    }
    for (const bytes of this.heldClient) this.clientToServer(bytes);
    this.heldClient = [];
    return "transparent";
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
    if (this.cancelKey) this.ctx.cancelKeys.release(this.cancelKey);
    this.server?.end();
    this.server = undefined;
    this.clientFrames = this.serverFrames = undefined;
    // What is still queued for the client goes out first (Outbox calls end on clear).
    if (this.out.backlog === 0) this.socket.end();
    const seconds = ((performance.now() - this.openedAt) / 1000).toFixed(3);
    this.log.debug(`closed after ${seconds}s, ${this.bytesIn} bytes in, ${this.bytesOut} bytes out`);
    this.ctx.sessionClosed(this);
    return "closed";
  }
}

