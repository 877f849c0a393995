/**
 * The listening side: accepts client connections and gives each a Session.
 */
import type { SocketHandler, TCPSocketListener } from "bun";
import type { Config } from "../config.ts";
import { log } from "../log.ts";
import { cancelRequest } from "../protocol/messages.ts";
import { contextKeyId, deriveContextKey } from "../tenant/context.ts";
import { CancelRegistry } from "./cancel.ts";
import { Session, type ClientSocket, type ProxyContext } from "./session.ts";

const clientHandlers: SocketHandler<Session, "uint8array"> = {
  binaryType: "uint8array",
  data(socket, bytes) {
    socket.data.clientData(bytes);
  },
  drain(socket) {
    socket.data.clientDrained();
  },
  close(socket) {
    socket.data.clientClosed();
  },
  error(socket, error) {
    socket.data.log.warn(`client socket error: ${error.message}`);
  },
};

export interface RunningProxy {
  hostname: string;
  port: number;
  sessions: ReadonlySet<Session>;
  /** Apply a reloaded config: new sessions use it, live ones keep theirs. */
  reload(config: Config): void;
  stop(): void;
}

export function startProxy(config: Config): RunningProxy {
  const sessions = new Set<Session>();
  const ctx: ProxyContext = {
    config,
    contextKey: deriveContextKey(config.contextSecret),
    cancelKeys: new CancelRegistry(),
    sendCancel: (processId, secretKey) => sendCancel(config.upstream, processId, secretKey),
    sessionClosed: (s) => sessions.delete(s),
  };

  const listener: TCPSocketListener<Session> = Bun.listen<Session>({
    hostname: config.listen.host,
    port: config.listen.port,
    socket: {
      ...(clientHandlers as unknown as SocketHandler<Session>),
      open(socket: ClientSocket) {
        socket.setNoDelay(true);
        socket.setKeepAlive(true, 60_000);
        const session = new Session(ctx, socket);
        socket.data = session;
        sessions.add(session);
      },
    },
  });

  log.info(`listening on ${listener.hostname}:${listener.port}, upstream ${config.upstream.host}:${config.upstream.port}`);
  log.info(`signing tenant contexts with key ${contextKeyId(ctx.contextKey)}`);
  return {
    hostname: listener.hostname,
    port: listener.port,
    sessions,
    reload(next: Config) {
      const { host, port } = ctx.config.listen;
      if (next.listen.host !== host || next.listen.port !== port) {
        log.warn(`config reloaded, but listen stays ${host}:${port} until a restart`);
        next = { ...next, listen: ctx.config.listen };
      }
      const keyId = contextKeyId(ctx.contextKey);
      ctx.config = next;
      ctx.contextKey = deriveContextKey(next.contextSecret);
      const nextKeyId = contextKeyId(ctx.contextKey);
      log.info(nextKeyId === keyId ? "config reloaded" : `config reloaded; new sessions are signed with key ${nextKeyId}`);
    },
    stop: () => listener.stop(true),
  };
}

/** CancelRequest travels on a connection of its own, which the server closes. */
function sendCancel(upstream: { host: string; port: number }, processId: number, secretKey: number): void {
  Bun.connect({
    hostname: upstream.host,
    port: upstream.port,
    socket: {
      open(socket) {
        socket.end(cancelRequest(processId, secretKey));
      },
      data() {},
      connectError(_socket, error) {
        log.warn(`could not forward cancel request: ${error.message}`);
      },
    },
  }).catch(() => {});
}
