/**
 * The proxy's HTTP listener: health now, metrics and the admin API later.
 *
 *   GET /healthz  200 while the process runs (liveness), with a few counters
 *   GET /readyz   200 when PostgreSQL accepts a TCP connection and nothing
 *                 the proxy learned says sessions will fail (its credential
 *                 refused, the context key unknown); 503 otherwise, with the
 *                 reasons, and 503 while shutting down (readiness)
 */
import type { Server } from "bun";
import { log } from "../log.ts";

export interface HttpDeps {
  /** Resolves true when the upstream is reachable. */
  upstreamReachable(): Promise<boolean>;
  shuttingDown(): boolean;
  sessions(): number;
  /** Why sessions would fail although the upstream is reachable; empty when fine. */
  problems(): string[];
  authFailures(): number;
}

export interface HttpListener {
  hostname: string;
  port: number;
  stop(): void;
}

export function startHttp(address: { host: string; port: number }, deps: HttpDeps): HttpListener {
  const json = (status: number, body: unknown) =>
    new Response(`${JSON.stringify(body)}\n`, { status, headers: { "content-type": "application/json" } });

  const server: Server<undefined> = Bun.serve({
    hostname: address.host,
    port: address.port,
    routes: {
      "/healthz": () => json(200, { status: "ok", sessions: deps.sessions(), authFailures: deps.authFailures() }),
      "/readyz": async () => {
        if (deps.shuttingDown()) return json(503, { status: "shutting down" });
        if (!(await deps.upstreamReachable())) return json(503, { status: "upstream unreachable" });
        const problems = deps.problems();
        return problems.length > 0 ? json(503, { status: "not ready", problems }) : json(200, { status: "ready" });
      },
    },
    fetch: () => json(404, { error: "not found", endpoints: ["/healthz", "/readyz"] }),
  });
  log.info(`http listening on ${server.hostname}:${server.port} (/healthz, /readyz)`);
  return { hostname: server.hostname ?? address.host, port: server.port ?? address.port, stop: () => server.stop(true) };
}

/** A TCP connect to host:port within `timeoutMs`. */
export function tcpReachable(host: string, port: number, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    let settled = false;
    const settle = (ok: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(ok);
    };
    const timer = setTimeout(() => settle(false), timeoutMs);
    Bun.connect({
      hostname: host,
      port,
      socket: {
        open(socket) {
          settle(true);
          socket.end();
        },
        data() {},
        connectError() {
          settle(false);
        },
      },
    }).catch(() => settle(false));
  });
}
