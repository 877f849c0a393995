/**
 * TLS on the client leg.
 *
 * After an SSLRequest the proxy answers 'S' and upgrades the Bun socket in
 * place (native TLS). PostgreSQL 17's direct TLS (sslnegotiation=direct)
 * starts with a ClientHello instead, which the socket has already handed
 * us by the time we see it, so it cannot be upgraded in place: node:tls
 * runs over a small duplex fed with those bytes, and DirectTlsTransport
 * gives the session the same face as a socket (write/pause/resume/end).
 */
import type { Socket } from "bun";
import { Duplex } from "node:stream";
import { createSecureContext, TLSSocket, type SecureContext } from "node:tls";
import type { Outbox } from "./outbox.ts";
import { tlsServerEndPoint } from "../auth/channel-binding.ts";

/** What a session needs of the connection to its client. */
export interface ClientTransport {
  readonly remoteAddress: string;
  write(bytes: Uint8Array): number;
  pause(): void;
  resume(): void;
  end(): void;
}

/** Certificate and key as read from disk, in both shapes the two paths need. */
export interface ServerTls {
  cert: string;
  key: string;
  context: SecureContext;
  /** tls-server-end-point channel binding data of `cert`, when it allows binding. */
  endPoint: Uint8Array | undefined;
}

export async function loadServerTls(certPath: string, keyPath: string): Promise<ServerTls> {
  const [cert, key] = await Promise.all([Bun.file(certPath).text(), Bun.file(keyPath).text()]);
  // Builds (and so validates) the pair now, not at the first client.
  const context = createSecureContext({ cert, key });
  return { cert, key, context, endPoint: tlsServerEndPoint(cert) };
}

export interface DirectTlsEvents {
  data(bytes: Uint8Array): void;
  drain(): void;
  close(): void;
  /** Handshake done; `alpn` is the protocol the client chose, if any. */
  secure(alpn: string | false): void;
  error(error: Error): void;
}

export class DirectTlsTransport implements ClientTransport {
  private readonly tls: TLSSocket;
  private readonly wire: Duplex;
  private rawOut: Outbox | undefined;

  constructor(
    private readonly raw: Socket<unknown>,
    tls: ServerTls,
    events: DirectTlsEvents,
    makeOutbox: (raw: Socket<unknown>, onClear: () => void) => Outbox,
  ) {
    let pendingWrite: (() => void) | undefined;
    // Ciphertext out goes through an Outbox on the raw socket; node waits
    // for the callback, so a slow client pushes back on the TLS layer.
    this.rawOut = makeOutbox(raw, () => {
      const cb = pendingWrite;
      pendingWrite = undefined;
      cb?.();
    });
    this.wire = new Duplex({
      read: () => raw.resume(),
      write: (chunk: Buffer, _encoding, callback) => {
        this.rawOut!.send(chunk);
        if (this.rawOut!.backlog > 0) pendingWrite = () => callback();
        else callback();
      },
      final: (callback) => {
        raw.end();
        callback();
      },
    });
    this.tls = new TLSSocket(this.wire, { isServer: true, secureContext: tls.context, ALPNProtocols: ["postgresql"] });
    this.tls.on("secure", () => events.secure(this.tls.alpnProtocol ?? false));
    this.tls.on("data", (b: Buffer) => events.data(new Uint8Array(b.buffer, b.byteOffset, b.byteLength)));
    this.tls.on("drain", () => events.drain());
    this.tls.on("close", () => events.close());
    this.tls.on("error", (e) => {
      events.error(e);
      this.raw.end();
    });
  }

  get remoteAddress(): string {
    return this.raw.remoteAddress;
  }

  /** Ciphertext from the raw socket. */
  feed(bytes: Uint8Array): void {
    if (!this.wire.push(Buffer.from(bytes))) this.raw.pause();
  }

  rawDrained(): void {
    this.rawOut?.flush();
  }

  rawClosed(): void {
    this.wire.push(null);
    this.tls.destroy();
  }

  /** Takes all or nothing: nothing while node's own buffer is full. */
  write(bytes: Uint8Array): number {
    if (this.tls.writableNeedDrain) return 0;
    // A copy: node may hold the buffer after write() returns, and ours may
    // be a view into a framer that is reused.
    this.tls.write(Buffer.from(bytes));
    return bytes.length;
  }

  pause(): void {
    this.tls.pause();
  }

  resume(): void {
    this.tls.resume();
  }

  end(): void {
    this.tls.end();
  }
}
