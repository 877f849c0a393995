/**
 * The server side of a proxied session: one TCP connection to PostgreSQL.
 *
 * Kept apart from the client session on purpose: the session owns a
 * ServerConnection only while attached to it, so a pool can later hand the
 * same connection to another session without either knowing the other.
 */
import type { Socket, SocketHandler } from "bun";
import { Outbox } from "./outbox.ts";

/** What a ServerConnection reports to whoever it is attached to. */
export interface ServerOwner {
  serverOpened(): void;
  serverData(bytes: Uint8Array): void;
  serverClosed(error?: Error): void;
  serverUnreachable(error: Error): void;
  /** The server stopped accepting our writes / caught up again. */
  serverBacklog(): void;
  serverClear(): void;
}

type ServerSocket = Socket<ServerConnection>;

const handlers: SocketHandler<ServerConnection, "uint8array"> = {
  binaryType: "uint8array",
  open(socket) {
    socket.data.opened(socket);
  },
  data(socket, bytes) {
    socket.data.owner?.serverData(bytes);
  },
  drain(socket) {
    socket.data.outbox?.flush();
  },
  close(socket, error) {
    socket.data.closed(error);
  },
  connectError(socket, error) {
    socket.data.unreachable(error);
  },
};

export class ServerConnection {
  private socket: ServerSocket | undefined;
  outbox: Outbox | undefined;
  private ended = false;

  private constructor(public owner: ServerOwner | undefined) {}

  static connect(host: string, port: number, owner: ServerOwner): ServerConnection {
    const conn = new ServerConnection(owner);
    Bun.connect({ hostname: host, port, socket: handlers as unknown as SocketHandler<ServerConnection>, data: conn }).catch(
      // connectError has reported it already; this only silences the promise.
      () => {},
    );
    return conn;
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

  /** Close after what was queued is written (a plain end() also sends our FIN). */
  end(): void {
    if (this.ended) return;
    this.ended = true;
    this.owner = undefined;
    this.socket?.end();
  }

  opened(socket: ServerSocket): void {
    this.socket = socket;
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 60_000);
    this.outbox = new Outbox(
      socket,
      () => this.owner?.serverBacklog(),
      () => this.owner?.serverClear(),
    );
    if (this.ended) {
      socket.end();
      return;
    }
    this.owner?.serverOpened();
  }

  closed(error?: Error): void {
    this.ended = true;
    const owner = this.owner;
    this.owner = undefined;
    owner?.serverClosed(error);
  }

  unreachable(error: Error): void {
    this.ended = true;
    const owner = this.owner;
    this.owner = undefined;
    owner?.serverUnreachable(error);
  }
}
