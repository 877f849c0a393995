/**
 * A recording TCP relay between the proxy and the real PostgreSQL.
 *
 * Bytes are forwarded unchanged both ways (node:net pipe, so backpressure is
 * respected); for each connection the tap records how many bytes the client
 * side sent and the decoded StartupMessage parameters. Tests use it to prove
 * what did or did not reach the server, e.g. that a bad tenant is refused by
 * the proxy without any upstream connection.
 */
import { createConnection, createServer, type Server, type Socket } from "node:net";

export interface TapConnection {
  id: number;
  /** Bytes received from the proxy side (towards Postgres). */
  bytesFromClient: number;
  /** Protocol code of the StartupMessage (196608 = 3.0), once seen. */
  protocol?: number;
  /** StartupMessage parameters (user, database, application_name, options …), once seen. */
  startup?: Record<string, string>;
  /** Request codes seen before the StartupMessage (80877103 SSLRequest, 80877104 GSSENCRequest, 80877102 CancelRequest). */
  preludes: number[];
  closed: boolean;
}

export interface Tap {
  host: string;
  port: number;
  connections: TapConnection[];
  /** Resolves with the first connection whose startup matches, as soon as it is seen. */
  waitForStartup(match: (params: Record<string, string>) => boolean, timeoutMs?: number): Promise<TapConnection>;
  stop(): Promise<void>;
}

const SSL_REQUEST = 80877103;
const GSSENC_REQUEST = 80877104;
const CANCEL_REQUEST = 80877102;

function parseStartup(buf: Buffer, conn: TapConnection): boolean {
  let off = 0;
  while (buf.length - off >= 8) {
    const len = buf.readInt32BE(off);
    const code = buf.readInt32BE(off + 4);
    if (code === SSL_REQUEST || code === GSSENC_REQUEST) {
      conn.preludes.push(code);
      off += 8;
      continue;
    }
    if (code === CANCEL_REQUEST) {
      conn.preludes.push(code);
      return true;
    }
    if (len < 8 || len > 10_000) return true; // not a startup packet; give up parsing
    if (buf.length - off < len) return false; // need more bytes
    const params: Record<string, string> = {};
    const parts = buf.subarray(off + 8, off + len).toString("utf8").split("\0");
    for (let i = 0; i + 1 < parts.length; i += 2) {
      if (parts[i] === "") break;
      params[parts[i]!] = parts[i + 1]!;
    }
    conn.protocol = code;
    conn.startup = params;
    return true;
  }
  return false;
}

export async function startTap(upstream: { host?: string; port: number }): Promise<Tap> {
  const upstreamHost = upstream.host ?? "127.0.0.1";
  const connections: TapConnection[] = [];
  const sockets = new Set<Socket>();
  const waiters = new Set<() => void>();
  let nextId = 1;

  const server: Server = createServer((client) => {
    const conn: TapConnection = { id: nextId++, bytesFromClient: 0, preludes: [], closed: false };
    connections.push(conn);
    const server = createConnection({ host: upstreamHost, port: upstream.port });
    sockets.add(client);
    sockets.add(server);
    let head: Buffer | undefined = Buffer.alloc(0);
    client.on("data", (chunk: Buffer) => {
      conn.bytesFromClient += chunk.length;
      if (head) {
        head = Buffer.concat([head, chunk]);
        if (parseStartup(head, conn) || head.length > 20_000) {
          head = undefined;
          for (const w of [...waiters]) w();
        }
      }
    });
    client.pipe(server);
    server.pipe(client);
    const close = () => {
      conn.closed = true;
      client.destroy();
      server.destroy();
      sockets.delete(client);
      sockets.delete(server);
    };
    client.on("close", close);
    server.on("close", close);
    client.on("error", close);
    server.on("error", close);
  });

  await new Promise<void>((res, rej) => {
    server.once("error", rej);
    server.listen(0, "127.0.0.1", () => res());
  });
  const addr = server.address();
  const port = typeof addr === "object" && addr ? addr.port : 0;

  return {
    host: "127.0.0.1",
    port,
    connections,
    waitForStartup(match, timeoutMs = 15_000) {
      return new Promise((res, rej) => {
        const check = () => {
          const c = connections.find((c) => c.startup && match(c.startup));
          if (c) {
            waiters.delete(check);
            clearTimeout(timer);
            res(c);
          }
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          rej(new Error(`tap: no matching StartupMessage within ${timeoutMs} ms; saw ${JSON.stringify(connections)}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    stop: () =>
      new Promise<void>((res) => {
        for (const s of sockets) s.destroy();
        server.close(() => res());
      }),
  };
}
