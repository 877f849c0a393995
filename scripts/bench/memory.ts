/**
 * Idle-client memory: the RSS of a proxy process (VmRSS from
 * /proc/PID/status) with N idle clients attached, as bytes per client over
 * a fresh instance's idle baseline.
 *
 * Two kinds of idle client, because a fully established session through a
 * session-mode proxy (Multigres today, PgBouncer in session mode) holds a
 * Postgres backend, and 5,000 backends do not fit this machine:
 *  - "established": startup + SCRAM + (Multigres) tenant context done, one
 *    `SELECT 1` run, then idle. Each one also holds a server connection in
 *    the proxy, which is counted (it is part of what an idle client costs).
 *  - "pre-startup": a TCP connection that was accepted and sent nothing yet
 *    (the proxy's cost of an accepted socket and its session object).
 *    Multigres runs with --startup-timeout 0 and PgBouncer with
 *    client_login_timeout = 0 so these are not dropped during the test.
 */
import { Socket } from "node:net";
import postgres from "postgres";
import { median, rssBytes, sleep } from "./util.ts";
import type { Running } from "./targets.ts";

export interface MemoryPoint {
  clients: number;
  kind: "established" | "pre-startup";
  rssBytes: number;
  baselineBytes: number;
  bytesPerClient: number;
  /**
   * Clients still connected when RSS was read (a proxy that dropped some would
   * look cheaper): for "established", the Postgres backends of the bench user;
   * for "pre-startup", client sockets not closed by the proxy.
   */
  stillConnected: number;
}

export interface MemoryProfile {
  target: string;
  /** RSS of a fresh instance with no clients (established-stage instance). */
  idleBaselineBytes: number;
  points: MemoryPoint[];
  /** RSS after the established clients disconnected again (shows what is retained). */
  afterCloseBytes?: number;
}

/** Median of a few RSS samples taken after letting the process settle. */
async function settledRss(pid: number, settleMs: number): Promise<number> {
  await sleep(settleMs);
  const samples: number[] = [];
  for (let i = 0; i < 3; i++) {
    samples.push(rssBytes(pid));
    await sleep(300);
  }
  return median(samples);
}

interface Established {
  end(): Promise<void>;
}

async function openEstablished(o: { port: number; user: string; password: string; database: string }): Promise<Established> {
  const sql = postgres({
    host: "127.0.0.1",
    port: o.port,
    user: o.user,
    pass: o.password,
    database: o.database,
    max: 1,
    ssl: false,
    idle_timeout: 0,
    max_lifetime: 0,
    connect_timeout: 60,
    fetch_types: false,
    prepare: false,
    onnotice: () => {},
  });
  await sql`SELECT 1`;
  return {
    end: () => sql.end({ timeout: 5 }),
  };
}

interface Raw {
  socket: Socket;
  open: boolean;
}

function openRaw(port: number): Promise<Raw> {
  return new Promise((res, rej) => {
    const s = new Socket();
    s.once("error", rej);
    s.connect(port, "127.0.0.1", () => {
      s.removeListener("error", rej);
      const raw: Raw = { socket: s, open: true };
      s.on("error", () => {});
      s.on("close", () => (raw.open = false));
      s.on("end", () => (raw.open = false));
      res(raw);
    });
  });
}

async function inBatches<T>(n: number, batch: number, open: () => Promise<T>, into: T[]): Promise<void> {
  while (into.length < n) {
    const k = Math.min(batch, n - into.length);
    const got = await Promise.all(Array.from({ length: k }, open));
    into.push(...got);
  }
}

export interface MemoryPlan {
  established: number[];
  preStartup: number[];
  settleMs: number;
  user: string;
  password: string;
  database: string;
  /** A fresh instance of the target (one for each kind of client). */
  start(kind: "established" | "pre-startup"): Promise<Running>;
  /** Client backends of `user` in Postgres now (each established idle client holds one). */
  countBackends(): number;
  /** Wait until Postgres has dropped the backends of the previous stage. */
  waitBackendsGone(): Promise<void>;
  log(msg: string): void;
}

export async function memoryProfile(target: string, plan: MemoryPlan): Promise<MemoryProfile> {
  const points: MemoryPoint[] = [];
  let idleBaselineBytes = NaN;
  let afterCloseBytes: number | undefined;

  if (plan.established.length > 0) {
    const inst = await plan.start("established");
    const conns: Established[] = [];
    try {
      const base = await settledRss(inst.pid, plan.settleMs);
      idleBaselineBytes = base;
      for (const n of plan.established) {
        plan.log(`${target}: ${n} established idle clients`);
        await inBatches(n, 25, () => openEstablished({ port: inst.port, user: plan.user, password: plan.password, database: plan.database }), conns);
        const rss = await settledRss(inst.pid, plan.settleMs);
        const stillConnected = plan.countBackends();
        points.push({ clients: n, kind: "established", rssBytes: rss, baselineBytes: base, bytesPerClient: (rss - base) / n, stillConnected });
      }
      await Promise.all(conns.splice(0).map((c) => c.end().catch(() => {})));
      afterCloseBytes = await settledRss(inst.pid, plan.settleMs);
    } finally {
      await Promise.all(conns.map((c) => c.end().catch(() => {})));
      inst.stop();
      await plan.waitBackendsGone();
    }
  }

  if (plan.preStartup.length > 0) {
    const inst = await plan.start("pre-startup");
    const socks: Raw[] = [];
    try {
      const base = await settledRss(inst.pid, plan.settleMs);
      if (Number.isNaN(idleBaselineBytes)) idleBaselineBytes = base;
      for (const n of plan.preStartup) {
        plan.log(`${target}: ${n} idle TCP clients before startup`);
        await inBatches(n, 250, () => openRaw(inst.port), socks);
        const rss = await settledRss(inst.pid, plan.settleMs);
        const stillConnected = socks.filter((s) => s.open).length;
        points.push({ clients: n, kind: "pre-startup", rssBytes: rss, baselineBytes: base, bytesPerClient: (rss - base) / n, stillConnected });
      }
    } finally {
      for (const s of socks) s.socket.destroy();
      inst.stop();
    }
  }
  return { target, idleBaselineBytes, points, afterCloseBytes };
}
