/**
 * The listening side: accepts client connections, gives each a Session, and
 * runs the proxy's own lifecycle (reload, graceful shutdown, idle sweep).
 */
import type { SocketHandler, TCPSocketListener } from "bun";
import type { Config } from "../config.ts";
import { log } from "../log.ts";
import { cancelRequest } from "../protocol/messages.ts";
import { contextKeyId, deriveContextKey } from "../tenant/context.ts";
import { CancelRegistry } from "./cancel.ts";
import { loadServerTls } from "./client-tls.ts";
import { clientHandlers, Session, type ClientSocket, type ProxyContext } from "./session.ts";

export interface RunningProxy {
  hostname: string;
  port: number;
  sessions: ReadonlySet<Session>;
  readonly shuttingDown: boolean;
  /** The config in force (it changes on reload). */
  readonly config: Config;
  /** Apply a reloaded config: new sessions use it, live ones keep theirs. */
  reload(config: Config): Promise<void>;
  /**
   * Stop accepting, let transactions in flight finish for up to
   * config.shutdownTimeout ms, then end every session with 57P01.
   * Resolves when the last session is gone.
   */
  shutdown(): Promise<void>;
}

export async function startProxy(config: Config): Promise<RunningProxy> {
  const sessions = new Set<Session>();
  let shuttingDown = false;
  let allClosed: (() => void) | undefined;
  const ctx: ProxyContext = {
    config,
    contextKey: deriveContextKey(config.contextSecret),
    ...(await loadFiles(config)),
    cancelKeys: new CancelRegistry(),
    sendCancel,
    sessionClosed: (s) => {
      sessions.delete(s);
      if (sessions.size === 0) allClosed?.();
    },
  };

  const listener: TCPSocketListener<Session> = Bun.listen<Session>({
    hostname: config.listen.host,
    port: config.listen.port,
    socket: {
      ...(clientHandlers as unknown as SocketHandler<Session>),
      open(socket: ClientSocket) {
        socket.setNoDelay(true);
        if (ctx.config.keepalive > 0) socket.setKeepAlive(true, ctx.config.keepalive);
        const session = new Session(ctx, socket);
        socket.data = session;
        sessions.add(session);
      },
    },
  });

  // One timer for every session's idle check, rather than a timer each.
  const sweep = setInterval(() => {
    const limit = ctx.config.idleTimeout;
    if (limit <= 0) return;
    const now = performance.now();
    for (const s of sessions) s.closeIfIdle(now, limit);
  }, 1000);
  sweep.unref();

  log.info(`listening on ${listener.hostname}:${listener.port}, upstream ${config.upstream.host}:${config.upstream.port}`);
  log.info(`signing tenant contexts with key ${contextKeyId(ctx.contextKey)}${ctx.tls ? "; client TLS on" : ""}`);

  return {
    hostname: listener.hostname,
    port: listener.port,
    sessions,
    get shuttingDown() {
      return shuttingDown;
    },
    get config() {
      return ctx.config;
    },

    async reload(next: Config) {
      const current = ctx.config;
      if (next.listen.host !== current.listen.host || next.listen.port !== current.listen.port) {
        log.warn(`config reloaded, but listen stays ${current.listen.host}:${current.listen.port} until a restart`);
        next = { ...next, listen: current.listen };
      }
      // Certificates and keys are read again: a renewed certificate takes
      // effect for new connections without dropping the live ones.
      Object.assign(ctx, await loadFiles(next));
      const keyId = contextKeyId(ctx.contextKey);
      ctx.config = next;
      ctx.contextKey = deriveContextKey(next.contextSecret);
      const nextKeyId = contextKeyId(ctx.contextKey);
      log.info(nextKeyId === keyId ? "config reloaded" : `config reloaded; new sessions are signed with key ${nextKeyId}`);
    },

    shutdown() {
      if (!shuttingDown) {
        shuttingDown = true;
        listener.stop(false);
        clearInterval(sweep);
        log.info(`shutting down: ${sessions.size} session(s), waiting up to ${ctx.config.shutdownTimeout} ms for transactions to finish`);
      }
      const done = new Promise<void>((resolve) => {
        if (sessions.size === 0) return resolve();
        allClosed = resolve;
      });
      for (const s of sessions) s.drain();
      const deadline = setTimeout(() => {
        if (sessions.size > 0) log.warn(`shutdown deadline reached: ending ${sessions.size} session(s)`);
        for (const s of sessions) s.terminate();
      }, ctx.config.shutdownTimeout);
      return done.finally(() => {
        clearTimeout(deadline);
        listener.stop(true);
      });
    },
  };
}

/** Files the config names, read (and validated) together. */
async function loadFiles(config: Config): Promise<Pick<ProxyContext, "tls" | "upstreamCa">> {
  const tls = config.tlsCert && config.tlsKey ? await loadServerTls(config.tlsCert, config.tlsKey) : undefined;
  const upstreamCa = config.upstreamCa ? await Bun.file(config.upstreamCa).text() : undefined;
  return { tls, upstreamCa };
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
