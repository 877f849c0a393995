/**
 * The server side of a proxied session: one connection to PostgreSQL,
 * optionally over TLS, and what the proxy knows about the backend behind it
 * (its cancel key, the parameters it reported, its binding for context
 * signatures, the tenant context it carries).
 *
 * Kept apart from the client session on purpose: the session owns a
 * ServerConnection only while attached to it, so a pool can later hand the
 * same connection to another session without either knowing the other.
 *
 * Bytes from the server go to the owner as they come, except while a
 * reader is installed (`read()`): then they are framed and handed to the
 * reader message by message. The proxy's own procedures on a connection,
 * logging in (server-login.ts) and establishing a tenant context
 * (context-round.ts), are readers.
 */
import type { Socket, SocketHandler } from "bun";
import { connect as netConnect, type Socket as NetSocket } from "node:net";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import { SSL_REQUEST } from "../protocol/messages.ts";
import { Framer, FramingError, type Frame } from "../protocol/framer.ts";
import type { CancelKey } from "./cancel.ts";
import { Outbox } from "./outbox.ts";

/** Largest server message accepted while the proxy reads messages itself. */
const MAX_FRAMED_MESSAGE = 1 << 20;

/** Takes one server message; "done" hands the bytes after it back to the owner. */
export type Reader = (message: Frame) => "more" | "done";

/** What a ServerConnection reports to whoever it is attached to. */
export interface ServerOwner {
  serverOpened(): void;
  serverData(bytes: Uint8Array): void;
  serverClosed(error?: Error): void;
  serverUnreachable(error: Error): void;
  /** A message the proxy reads itself was malformed, or its reader threw. */
  serverBroken(error: Error): void;
  /** The server stopped accepting our writes / caught up again. */
  serverBacklog(): void;
  serverClear(): void;
}

export type UpstreamTlsMode = "disable" | "prefer" | "require" | "verify-ca" | "verify-full";

export interface UpstreamOptions {
  host: string;
  port: number;
  tls: UpstreamTlsMode;
  /** PEM CA bundle (verify-ca / verify-full); Bun's root store otherwise. */
  ca?: string;
  /** Name to verify and send as SNI; defaults to host. */
  serverName?: string;
  /** PEM client certificate and key to present (pg_hba method cert). */
  cert?: string;
  key?: string;
  connectTimeout: number;
  keepalive: number;
}

type ServerSocket = Socket<ServerConnection>;

const SSL_REQUEST_PACKET = (() => {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setInt32(0, 8);
  new DataView(b.buffer).setInt32(4, SSL_REQUEST);
  return b;
})();

const handlers: SocketHandler<ServerConnection, "uint8array"> = {
  binaryType: "uint8array",
  open(socket) {
    socket.data.opened(socket);
  },
  data(socket, bytes) {
    socket.data.received(socket, bytes);
  },
  drain(socket) {
    if (socket.data.isCurrent(socket)) socket.data.outbox?.flush();
  },
  close(socket, error) {
    if (socket.data.isCurrent(socket)) socket.data.closed(error);
  },
  handshake(socket, success, error) {
    socket.data.handshaken(socket, success, error);
  },
};

export class ServerConnection {
  private socket: ServerSocket | undefined;
  outbox: Outbox | undefined;
  private ended = false;
  /** Waiting for the server's one-byte answer to our SSLRequest. */
  private awaitingSslAnswer = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  /** The connect in progress, which failed() can abandon. */
  private pending: NetSocket | undefined;
  private reader: Reader | undefined;
  private frames: Framer | undefined;

  // What the proxy knows about the backend (set by the procedures).
  /** The server's BackendKeyData: what a cancel for this backend carries. */
  key: CancelKey | undefined;
  /** ParameterStatus messages from the login, by name, as sent (replayed to clients). */
  readonly parameters = new Map<string, Uint8Array>();
  /** "<pid>/<start in µs>": what context signatures on this backend are bound to. */
  binding: string | undefined;
  /** The tenant whose context the backend carries now, once verified. */
  tenant: string | undefined;

  private constructor(
    public owner: ServerOwner | undefined,
    private readonly options: UpstreamOptions,
  ) {}

  static connect(options: UpstreamOptions, owner: ServerOwner): ServerConnection {
    const conn = new ServerConnection(owner, options);
    if (options.connectTimeout > 0) {
      conn.timer = setTimeout(
        () => conn.failed(new Error(`timed out after ${options.connectTimeout} ms`)),
        options.connectTimeout,
      );
    }
    // Bun.connect cannot abandon a connect in progress: against a host that
    // drops SYNs the socket would linger for the kernel's SYN retries (~2
    // minutes) after the client got its 08006. node:net can (destroy()),
    // and in Bun its socket wraps a native Bun socket, which we take over
    // with our own handlers once connected.
    const pending = netConnect({ host: options.host, port: options.port });
    conn.pending = pending;
    pending.once("error", (error) => conn.failed(error));
    pending.once("connect", () => {
      conn.pending = undefined;
      const native = (pending as unknown as { _handle?: ServerSocket & { reload?(o: { socket: unknown }): void } })._handle;
      if (!native?.reload) {
        pending.destroy();
        return conn.failed(new Error("this Bun cannot hand a node:net socket over (no _handle.reload)"));
      }
      pending.removeAllListeners();
      pending.on("error", () => {}); // the wrapper is abandoned; nothing it says matters
      // Let go of the wrapper (and its stream state): the native socket's
      // back reference is all that would keep it alive.
      for (const key of Object.getOwnPropertySymbols(native)) (native as unknown as Record<symbol, unknown>)[key] = undefined;
      native.reload({ socket: handlers });
      native.data = conn;
      conn.opened(native);
    });
    return conn;
  }

  isCurrent(socket: ServerSocket): boolean {
    return socket === this.socket;
  }

  /** Frame what the server sends and hand it to `reader` until it is done. */
  read(reader: Reader): void {
    this.reader = reader;
    this.frames ??= new Framer(MAX_FRAMED_MESSAGE, 1024);
  }

  private feed(bytes: Uint8Array): void {
    const frames = this.frames!;
    frames.push(bytes);
    try {
      let f: Frame | null;
      while (this.reader && !this.ended && (f = frames.next())) {
        const reader = this.reader;
        // A reader may hand over to the next one (login, then context).
        if (reader(f) === "done" && this.reader === reader) this.reader = undefined;
      }
    } catch (e) {
      if (!(e instanceof FramingError) && !(e instanceof Error)) throw e;
      this.reader = undefined;
      this.frames = undefined;
      this.owner?.serverBroken(e);
      return;
    }
    if (!this.reader && this.frames) {
      this.frames = undefined;
      if (frames.buffered > 0) this.owner?.serverData(frames.drain());
    }
  }

  send(bytes: Uint8Array): void {
    this.outbox?.send(bytes);
  }

  pause(): void {
    this.socket?.pause();
  }

  resume(): void {
    this.socket?.resume();
  }

  /** Close; a plain end() also sends our FIN. */
  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.owner = undefined;
    clearTimeout(this.timer);
    this.pending?.destroy();
    this.pending = undefined;
    this.socket?.end();
  }

  // ------------------------------------------------------- socket events

  opened(socket: ServerSocket): void {
    if (this.socket) return; // the TLS socket of an upgrade opening: handled in handshaken()
    if (this.ended) {
      socket.end();
      return;
    }
    this.socket = socket;
    socket.setNoDelay(true);
    if (this.options.keepalive > 0) socket.setKeepAlive(true, this.options.keepalive);
    if (this.options.tls === "disable") return this.ready(socket);
    this.awaitingSslAnswer = true;
    socket.write(SSL_REQUEST_PACKET);
  }

  received(socket: ServerSocket, bytes: Uint8Array): void {
    if (!this.isCurrent(socket)) return; // ciphertext seen by the raw socket after upgradeTLS
    if (!this.awaitingSslAnswer) {
      if (this.reader) this.feed(bytes);
      else this.owner?.serverData(bytes);
      return;
    }
    this.awaitingSslAnswer = false;
    // One byte and nothing more: anything else before the handshake would be
    // unencrypted data an attacker injected (CVE-2021-23222).
    if (bytes.length !== 1 || (bytes[0] !== 0x53 && bytes[0] !== 0x4e)) {
      return this.failed(new Error("the server answered SSLRequest with something other than S or N"));
    }
    if (bytes[0] === 0x4e) {
      if (this.options.tls === "prefer") return this.ready(socket);
      return this.failed(new Error(`the server does not support TLS, and --upstream-tls is ${this.options.tls}`));
    }
    const verify = this.options.tls === "verify-ca" || this.options.tls === "verify-full";
    const [, tlsSocket] = socket.upgradeTLS<ServerConnection>({
      data: this,
      socket: handlers as unknown as SocketHandler<ServerConnection>,
      tls: {
        // Verification happens in handshaken(), where verify-ca and
        // verify-full can differ on the host name.
        rejectUnauthorized: false,
        ca: verify ? this.options.ca : undefined,
        cert: this.options.cert,
        key: this.options.key,
        serverName: this.options.serverName ?? this.options.host,
      },
    });
    this.socket = tlsSocket;
  }

  handshaken(socket: ServerSocket, _success: boolean, error: Error | null): void {
    if (!this.isCurrent(socket)) return;
    const mode = this.options.tls;
    if (mode === "verify-ca" || mode === "verify-full") {
      // verify-ca trusts any name on a certificate from the CA; Bun reports a
      // name mismatch like any other verification error, so skip just that.
      const nameOnly = (error as NodeJS.ErrnoException | null)?.code === "ERR_TLS_CERT_ALTNAME_INVALID";
      const name = this.options.serverName ?? this.options.host;
      if (error && nameOnly && mode === "verify-full") {
        return this.failed(new Error(`the server's certificate does not match "${name}" (verify-full): ${error.message}`));
      }
      if (error && !nameOnly) {
        return this.failed(new Error(`the server's certificate is not trusted (${mode}): ${error.message}`));
      }
      if (mode === "verify-full") {
        const mismatch = checkServerIdentity(name, socket.getPeerCertificate() as PeerCertificate);
        if (mismatch) return this.failed(new Error(`the server's certificate does not match "${name}" (verify-full): ${mismatch.message}`));
      }
    }
    this.ready(socket);
  }

  closed(error?: Error): void {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer);
    const owner = this.owner;
    this.owner = undefined;
    if (!this.outbox) owner?.serverUnreachable(error ?? new Error("the server closed the connection"));
    else owner?.serverClosed(error);
  }

  failed(error: Error): void {
    if (this.ended) return;
    this.ended = true;
    clearTimeout(this.timer);
    this.pending?.destroy();
    this.pending = undefined;
    this.socket?.end();
    const owner = this.owner;
    this.owner = undefined;
    owner?.serverUnreachable(error);
  }

  private ready(socket: ServerSocket): void {
    clearTimeout(this.timer);
    this.timer = undefined; // a cleared timer still costs memory while referenced
    this.outbox = new Outbox(
      socket,
      () => this.owner?.serverBacklog(),
      () => this.owner?.serverClear(),
    );
    this.owner?.serverOpened();
  }
}
