/**
 * The listening side: accepts client connections, gives each a Session, and
 * runs the proxy's own lifecycle (reload, graceful shutdown, idle sweep).
 */
import type { SocketHandler, TCPSocketListener } from "bun";
import { ConfigError, type Config } from "../config.ts";
import { log } from "../log.ts";
import { cancelRequest } from "../protocol/messages.ts";
import { contextKeyId, deriveContextKey } from "../tenant/context.ts";
import { Credentials, CredentialsError } from "../auth/credentials.ts";
import { resolveIdentity } from "../tenant/identity.ts";
import { CancelRegistry } from "./cancel.ts";
import { loadServerTls } from "./client-tls.ts";
import { UpstreamHealth } from "./health.ts";
import { clientHandlers, Session, type ClientSocket, type ProxyContext } from "./session.ts";
import { checkUpstream } from "./startup-check.ts";

export interface RunningProxy {
  hostname: string;
  port: number;
  sessions: ReadonlySet<Session>;
  readonly shuttingDown: boolean;
  /** Upstream logins refused, the context key missing: why /readyz says 503. */
  readonly health: UpstreamHealth;
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
    health: new UpstreamHealth(),
    relayedLogins: 0,
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
  log.info(describeAuth(config, ctx));
  void checkUpstream(ctx);

  return {
    hostname: listener.hostname,
    port: listener.port,
    sessions,
    health: ctx.health,
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
      void checkUpstream(ctx); // a new key, password or database list: check again
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

/** Files the config names, read (and validated) together; again on SIGHUP. */
async function loadFiles(config: Config): Promise<Pick<ProxyContext, "tls" | "upstreamCa" | "upstreamCert" | "credentials">> {
  const tls = config.tlsCert && config.tlsKey ? await loadServerTls(config.tlsCert, config.tlsKey) : undefined;
  const upstreamCa = config.upstreamCa ? await Bun.file(config.upstreamCa).text() : undefined;
  const upstreamCert =
    config.upstreamCert && config.upstreamKey
      ? { cert: await Bun.file(config.upstreamCert).text(), key: await Bun.file(config.upstreamKey).text() }
      : undefined;
  return { tls, upstreamCa, upstreamCert, credentials: await loadCredentials(config) };
}

async function loadCredentials(config: Config): Promise<Credentials | undefined> {
  if (config.auth === "passthrough") return undefined;
  let authFile: { path: string; text: string } | undefined;
  if (config.authFile) {
    try {
      authFile = { path: config.authFile, text: await Bun.file(config.authFile).text() };
    } catch (e) {
      throw new ConfigError([`${config.authFile}: cannot read --auth-file (${(e as Error).message})`]);
    }
  }
  try {
    return await Credentials.load({
      authFile,
      tenantAuth: config.tenantAuth,
      tokenSecret: config.tokenSecret,
      isTenantName: (name) => resolveIdentity(name, config).kind === "tenant",
    });
  } catch (e) {
    if (e instanceof CredentialsError) throw new ConfigError(e.problems);
    throw e;
  }
}

/** One line saying who authenticates whom. */
function describeAuth(config: Config, ctx: ProxyContext): string {
  if (config.auth === "passthrough") return "authentication: relayed to PostgreSQL (--auth passthrough: the tenant is not authenticated by the proxy)";
  const clients = [
    config.authFile && `${ctx.credentials?.names.length ?? 0} auth-file entries`,
    config.tenantAuth === "token" && "tenant tokens",
  ].filter(Boolean);
  const upstream = config.upstreamPassword !== undefined ? "the upstream password" : ctx.upstreamCert ? "a client certificate" : "no credential (trust)";
  return `authentication: clients by the proxy (${config.authMethod}; ${clients.join(" and ")}), upstream with ${upstream}; superusers relayed to PostgreSQL`;
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
