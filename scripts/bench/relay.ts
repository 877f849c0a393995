/**
 * The runtime's floor: the least a TCP proxy on Bun can do. Every client
 * connection gets one upstream connection and bytes are copied both ways
 * as they arrive — no framing, no tenant, no guard, no backpressure, no
 * timeouts. `bun run bench --floor` runs it as a target beside Multigres,
 * so the table shows how much of the gap to PgBouncer is Multigres's own
 * work and how much any proxy built on Bun's sockets pays.
 *
 *   bun scripts/bench/relay.ts LISTEN_PORT UPSTREAM_PORT
 *
 * Not a product: it drops nothing only because benchmark clients never
 * outrun the socket buffers.
 */
import type { Socket } from "bun";

interface Pair {
  peer: Socket<Pair> | undefined;
  early: Uint8Array[];
}

const [listenPort, upstreamPort] = Bun.argv.slice(2).map(Number);
if (!listenPort || !upstreamPort) {
  process.stderr.write("usage: bun scripts/bench/relay.ts LISTEN_PORT UPSTREAM_PORT\n");
  process.exit(2);
}

const upstream = {
  binaryType: "uint8array" as const,
  open(s: Socket<Pair>) {
    s.setNoDelay(true);
    const client = s.data.peer!;
    client.data.peer = s;
    for (const b of client.data.early) s.write(b);
    client.data.early = [];
  },
  data: (s: Socket<Pair>, b: Uint8Array) => void s.data.peer?.write(b),
  close: (s: Socket<Pair>) => void s.data.peer?.end(),
  connectError: (s: Socket<Pair>) => void s.data.peer?.end(),
};

Bun.listen<Pair>({
  hostname: "127.0.0.1",
  port: listenPort,
  socket: {
    binaryType: "uint8array",
    open(client) {
      client.data = { peer: undefined, early: [] };
      void Bun.connect<Pair>({ hostname: "127.0.0.1", port: upstreamPort, data: { peer: client, early: [] }, socket: upstream }).catch(() => client.end());
    },
    data(client, b) {
      if (client.data.peer) client.data.peer.write(b);
      else client.data.early.push(b.slice());
    },
    close: (client) => void client.data.peer?.end(),
  },
});
