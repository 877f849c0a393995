/**
 * TLS on both legs and channel binding, against the compiled binary and a
 * real PostgreSQL, with a CA made here with openssl (tls-helpers.ts).
 *
 * Client leg (client → multigres):
 *   - SSLRequest answered 'S' with a certificate set (client-tls allow), 'N'
 *     under client-tls disable or without a certificate;
 *   - psql with sslmode verify-full / require / prefer / disable, postgres.js
 *     with ssl, PostgreSQL 17 direct TLS (ALPN "postgresql") by hand, and
 *     direct TLS without that ALPN refused;
 *   - client-tls require refuses plaintext startups with 28000;
 *   - bytes sent after SSLRequest before the handshake are refused (08P01);
 *   - certificate and key reloaded on SIGHUP: new connections see the new
 *     certificate, an open connection keeps working, a broken key file keeps
 *     the old pair.
 * Server leg (multigres → PostgreSQL), each mode checked with
 *   `select ssl from pg_stat_ssl where pid = pg_backend_pid()`:
 *   - server without TLS: prefer falls back, require/verify-* fail with 08006;
 *   - server with ssl=on (turned on with ALTER SYSTEM, put back afterwards):
 *     disable/prefer/require/verify-ca/verify-full, wrong CA, wrong name.
 * Channel binding: the SASL offer the client sees has no -PLUS mechanism
 *   while PostgreSQL's own offer (over TLS) has one; libpq
 *   channel_binding=prefer connects, channel_binding=require fails with
 *   libpq's own message, promptly.
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import { copyFileSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import {
  APP_USER,
  CERT_USER,
  CONTEXT_SECRET,
  connectError,
  describeRun,
  ensureBuilt,
  NOTES,
  PASSWORDS,
  psql,
  startPostgres,
  startProxyFor,
  TENANT_A,
  TRUST_USER,
  withClient,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";
import { Client as pgClient } from "pg";
import { startupMessage } from "../../src/protocol/messages.ts";
import {
  directTls,
  startReadyProxy,
  disableUpstreamSsl,
  enableUpstreamSsl,
  errorFields,
  jsonLines,
  makeTestPki,
  openPlain,
  serverSslFiles,
  sslRequest,
  tlsViaSslRequest,
  waitForEvents,
  Wire,
  type TestPki,
} from "./tls-helpers.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

let pg: PgInstance;
let pki: TestPki;
const proxies: ProxyHandle[] = [];
const dirs: string[] = [];

const proxyWith = (args: string[]) => startReadyProxy(pg, args, proxies);

beforeAll(async () => {
  pg = await startPostgres();
  pki = makeTestPki();
});

afterAll(async () => {
  await Promise.all(proxies.map((p) => p.stop()));
  pki?.cleanup();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

const trustUser = `${TRUST_USER}.${TENANT_A}`;
/** trust_user's client password at the proxy (pg_hba trusts it upstream). */
const trustPw = PASSWORDS[TRUST_USER];
const appUser = `${APP_USER}.${TENANT_A}`;
const appPw = PASSWORDS[APP_USER];
const tenantRows = NOTES.tenant_a.length;

/** URL to the proxy for libpq that verifies the name "localhost" but connects to 127.0.0.1. */
function libpqUrl(p: ProxyHandle, user: string, params: Record<string, string>, password?: string): string {
  return p.url({ user, password, host: "localhost", params: { hostaddr: "127.0.0.1", ...params } });
}

/** Serial number of the certificate a TLS socket was shown. */
const serialOf = (t: tls.TLSSocket) => t.getPeerCertificate().serialNumber.toUpperCase().replace(/^0+/, "");

/** Ready lines (JSON log) of tenant sessions, with whether the client leg was TLS. */
async function readyLines(p: ProxyHandle, count: number) {
  return waitForEvents(p, "ready", count);
}
const readyCount = (p: ProxyHandle) => jsonLines(p.logs().slice(0, p.logs().lastIndexOf("\n") + 1)).filter((l) => l.event === "ready").length;

// ===================================================================== client leg

describe("client TLS: certificate set, client-tls allow (default)", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await proxyWith(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--log-format", "json"]);
  });

  test("SSLRequest is answered 'S'", async () => {
    const { socket, answer } = await sslRequest(proxy.port);
    socket.destroy();
    expect(answer).toBe("S");
  });

  test("psql sslmode=verify-full: the proxy's certificate verifies for localhost and the session works over TLS", async () => {
    const r = await psql(
      libpqUrl(proxy, appUser, { sslmode: "verify-full", sslrootcert: pki.ca }, appPw),
      "SELECT current_user || '|' || current_tenant_id() || '|' || (SELECT count(*) FROM notes)",
      { args: ["-c", "\\conninfo"] },
    );
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stdout).toMatch(/SSL connection \(protocol: TLSv1\.[23]/);
    expect(r.stdout).toContain(`${APP_USER}|${TENANT_A}|${tenantRows}`);
  });

  test("psql sslmode=verify-full with an unrelated CA fails verification", async () => {
    const r = await psql(libpqUrl(proxy, appUser, { sslmode: "verify-full", sslrootcert: pki.otherCa }, appPw), "SELECT 1", { timeoutMs: 30_000 });
    expect(r.timedOut, describeRun(r)).toBe(false);
    expect(r.exitCode, describeRun(r)).not.toBe(0);
    expect(r.stderr).toMatch(/certificate verify failed/);
  });

  test("psql sslmode=disable still works (TLS is allowed, not required)", async () => {
    const r = await psql(libpqUrl(proxy, trustUser, { sslmode: "disable" }, trustPw), "SELECT current_tenant_id()", { args: ["-c", "\\conninfo"] });
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stdout).not.toContain("SSL connection");
    expect(r.stdout).toContain(TENANT_A);
  });

  test("postgres.js with ssl {ca} (SCRAM over TLS): works, and the proxy logs the session as TLS", async () => {
    const before = readyCount(proxy);
    await withClient(
      proxy.url({ user: appUser, password: appPw }),
      async (sql) => {
        const [row] = await sql`SELECT current_user AS usr, current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes) AS n`;
        expect(row).toEqual({ usr: APP_USER, tenant: TENANT_A, n: tenantRows });
      },
      { ssl: { ca: pki.caPem, servername: "localhost" } },
    );
    const lines = await readyLines(proxy, before + 1);
    const mine = lines[before]!;
    expect(mine).toMatchObject({ event: "ready", user: APP_USER, tenant: TENANT_A, tls: true });
  });

  test("PostgreSQL 17 direct TLS with ALPN \"postgresql\": handshake, startup, query", async () => {
    const { wire, tls: t } = await directTls(proxy.port, { ca: pki.caPem, alpn: ["postgresql"] });
    try {
      expect(t.alpnProtocol).toBe("postgresql");
      expect(serialOf(t)).toBe(pki.server.serial);
      const startup = await wire.startup({ user: trustUser, database: pg.database });
      const auth = startup.find((m) => m.type === "R");
      expect(auth?.body.readInt32BE(0)).toBe(0); // AuthenticationOk
      expect(startup.at(-1)?.type).toBe("Z");
      const r = await wire.query("SELECT current_user, current_tenant_id(), (SELECT count(*) FROM notes)");
      expect(r.error).toBeUndefined();
      expect(r.rows).toEqual([[TRUST_USER, TENANT_A, String(tenantRows)]]);
    } finally {
      wire.terminate();
      wire.destroy();
    }
  });

  /**
   * Direct TLS whose client did not ask for ALPN "postgresql" must not reach
   * a session: either the handshake is refused, or the proxy answers the
   * startup with an ErrorResponse (08P01) and closes. Never AuthenticationOk.
   */
  async function expectDirectTlsRefused(alpn: string[] | undefined): Promise<void> {
    let session: { wire: Wire; tls: tls.TLSSocket } | undefined;
    try {
      session = await directTls(proxy.port, { ca: pki.caPem, alpn });
    } catch (e) {
      // Refused during the handshake (no_application_protocol alert, or closed).
      expect(String(e)).not.toContain("no TLS handshake within");
      return;
    }
    const { wire } = session;
    try {
      wire.write(startupMessage(new Map([["user", trustUser], ["database", pg.database]])));
      const got: string[] = [];
      let error: Record<string, string> | undefined;
      for (;;) {
        const m = await wire.next(15_000);
        if (!m) break;
        got.push(m.type);
        if (m.type === "E") error ??= errorFields(m.body);
      }
      expect(got).not.toContain("R");
      expect(got).not.toContain("Z");
      if (error) {
        expect(error.C).toBe("08P01");
        expect(error.M).toMatch(/ALPN/);
      }
    } finally {
      wire.destroy();
    }
  }

  test("direct TLS without ALPN is refused", async () => {
    await expectDirectTlsRefused(undefined);
  });

  test("direct TLS offering only another ALPN protocol (http/1.1) is refused", async () => {
    await expectDirectTlsRefused(["http/1.1"]);
  });

  test("bytes sent after SSLRequest but before the handshake are refused with 08P01 (CVE-2021-23214)", async () => {
    const socket = await openPlain(proxy.port);
    const wire = new Wire(socket, "ssl-then-plaintext");
    try {
      const ssl = Buffer.alloc(8);
      ssl.writeInt32BE(8, 0);
      ssl.writeInt32BE(80877103, 4);
      // One write: the startup packet rides in the same segment as the SSLRequest.
      socket.write(Buffer.concat([ssl, startupMessage(new Map([["user", trustUser], ["database", pg.database]]))]));
      const first = await wire.next();
      expect(first?.type, "the proxy must not answer 'S' and start TLS over injected plaintext").toBe("E");
      const fields = errorFields(first!.body);
      expect(fields.C).toBe("08P01");
      expect(fields.M).toContain("unencrypted data after SSL request");
      await wire.waitClosed();
    } finally {
      wire.destroy();
    }
  });
});

describe("client TLS: client-tls require", () => {
  let proxy: ProxyHandle;
  beforeAll(async () => {
    proxy = await proxyWith(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--client-tls", "require"]);
  });

  test("a plaintext startup (postgres.js, no ssl) is refused with 28000 saying TLS is required", async () => {
    const err = await connectError(proxy.url({ user: appUser, password: appPw }));
    expect(err.code, err.message).toBe("28000");
    expect(err.message).toContain("multigres requires TLS");
  });

  test("psql sslmode=disable is refused with the same message", async () => {
    const r = await psql(libpqUrl(proxy, trustUser, { sslmode: "disable" }, trustPw), "SELECT 1", { timeoutMs: 30_000 });
    expect(r.exitCode, describeRun(r)).not.toBe(0);
    expect(r.stderr).toContain("multigres requires TLS");
  });

  test("psql sslmode=require connects", async () => {
    const r = await psql(libpqUrl(proxy, appUser, { sslmode: "require" }, appPw), "SELECT current_tenant_id()", { args: ["-c", "\\conninfo"] });
    expect(r.exitCode, describeRun(r)).toBe(0);
    expect(r.stdout).toContain("SSL connection");
    expect(r.stdout).toContain(TENANT_A);
  });

  test("direct TLS (ALPN postgresql) satisfies require", async () => {
    const { wire } = await directTls(proxy.port, { ca: pki.caPem, alpn: ["postgresql"] });
    try {
      await wire.startup({ user: trustUser, database: pg.database });
      expect((await wire.query("SELECT current_tenant_id()")).rows).toEqual([[TENANT_A]]);
    } finally {
      wire.terminate();
      wire.destroy();
    }
  });
});

describe("client TLS: client-tls disable, and no certificate", () => {
  let disabled: ProxyHandle;
  let noCert: ProxyHandle;
  beforeAll(async () => {
    [disabled, noCert] = await Promise.all([
      proxyWith(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--client-tls", "disable"]),
      proxyWith([]),
    ]);
  });

  for (const which of ["client-tls disable", "no certificate"] as const) {
    const p = () => (which === "client-tls disable" ? disabled : noCert);

    test(`${which}: SSLRequest is answered 'N'`, async () => {
      const { socket, answer } = await sslRequest(p().port);
      socket.destroy();
      expect(answer).toBe("N");
    });

    test(`${which}: psql sslmode=require fails, sslmode=prefer falls back to plaintext`, async () => {
      const req = await psql(libpqUrl(p(), trustUser, { sslmode: "require" }, trustPw), "SELECT 1", { timeoutMs: 30_000 });
      expect(req.exitCode, describeRun(req)).not.toBe(0);
      expect(req.stderr).toContain("server does not support SSL, but SSL was required");

      const pref = await psql(libpqUrl(p(), trustUser, { sslmode: "prefer" }, trustPw), "SELECT current_tenant_id()", { args: ["-c", "\\conninfo"] });
      expect(pref.exitCode, describeRun(pref)).toBe(0);
      expect(pref.stdout).not.toContain("SSL connection");
      expect(pref.stdout).toContain(TENANT_A);
    });

    test(`${which}: direct TLS gets no session`, async () => {
      let wire: Wire | undefined;
      try {
        wire = (await directTls(p().port, { ca: pki.caPem, alpn: ["postgresql"] })).wire;
      } catch (e) {
        expect(String(e)).not.toContain("no TLS handshake within");
        return;
      }
      wire.destroy();
      throw new Error("a TLS handshake completed with a proxy that must not do TLS");
    });
  }

  test("config: --client-tls require without a certificate, and --tls-cert without --tls-key, exit 2 naming the problem", async () => {
    const bin = ensureBuilt();
    const run = (args: string[]) =>
      Bun.spawnSync([bin, "start", "--listen", "127.0.0.1:0", "--upstream", `${pg.host}:${pg.port}`, "--http", "127.0.0.1:0", ...args], {
        env: { PATH: process.env.PATH ?? "/usr/bin:/bin", MULTIGRES_CONTEXT_SECRET: CONTEXT_SECRET, NO_COLOR: "1" },
        stdout: "pipe",
        stderr: "pipe",
        timeout: 30_000,
      });
    const a = run(["--client-tls", "require"]);
    expect(a.exitCode, a.stderr.toString()).toBe(2);
    expect(a.stderr.toString()).toMatch(/client TLS "require" needs --tls-cert and --tls-key/);
    const b = run(["--tls-cert", pki.server.cert]);
    expect(b.exitCode, b.stderr.toString()).toBe(2);
    expect(b.stderr.toString()).toMatch(/--tls-cert and --tls-key go together/);
  });
});

describe("client TLS: certificate reload on SIGHUP", () => {
  let proxy: ProxyHandle;
  let live: { cert: string; key: string };
  beforeAll(async () => {
    const dir = mkdtempSync(join(tmpdir(), "multigres-live-cert-"));
    dirs.push(dir);
    live = { cert: join(dir, "live.crt"), key: join(dir, "live.key") };
    copyFileSync(pki.server.cert, live.cert);
    copyFileSync(pki.server.key, live.key);
    proxy = await proxyWith(["--tls-cert", live.cert, "--tls-key", live.key]);
  });

  test("new connections get the new certificate, an open TLS session carries on", async () => {
    // Before: both TLS paths show the first certificate; keep one session open.
    const old = await tlsViaSslRequest(proxy.port, pki.caPem);
    expect(serialOf(old.tls)).toBe(pki.server.serial);
    await old.wire.startup({ user: trustUser, database: pg.database });
    const pid = (await old.wire.query("SELECT pg_backend_pid()")).rows[0]![0];
    const direct = await directTls(proxy.port, { ca: pki.caPem, alpn: ["postgresql"] });
    expect(serialOf(direct.tls)).toBe(pki.server.serial);
    direct.wire.destroy();

    try {
      copyFileSync(pki.server2.cert, live.cert);
      copyFileSync(pki.server2.key, live.key);
      process.kill(proxy.pid, "SIGHUP");
      await proxy.waitForLog(/config reloaded/);

      const fresh = await tlsViaSslRequest(proxy.port, pki.caPem);
      try {
        expect(serialOf(fresh.tls)).toBe(pki.server2.serial);
        await fresh.wire.startup({ user: trustUser, database: pg.database });
        expect((await fresh.wire.query("SELECT current_tenant_id()")).rows).toEqual([[TENANT_A]]);
      } finally {
        fresh.wire.terminate();
        fresh.wire.destroy();
      }
      const direct2 = await directTls(proxy.port, { ca: pki.caPem, alpn: ["postgresql"] });
      expect(serialOf(direct2.tls)).toBe(pki.server2.serial);
      direct2.wire.destroy();

      // The session opened before the reload is the same backend and still answers.
      const after = await old.wire.query("SELECT pg_backend_pid(), current_tenant_id()");
      expect(after.error).toBeUndefined();
      expect(after.rows).toEqual([[pid!, TENANT_A]]);

      // psql verifies the renewed certificate too.
      const r = await psql(libpqUrl(proxy, appUser, { sslmode: "verify-full", sslrootcert: pki.ca }, appPw), "SELECT current_tenant_id()");
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout.trim()).toBe(TENANT_A);
    } finally {
      old.wire.terminate();
      old.wire.destroy();
    }
  });

  test("a reload with a broken key file keeps serving the previous certificate", async () => {
    writeFileSync(live.key, "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n");
    process.kill(proxy.pid, "SIGHUP");
    await proxy.waitForLog(/configuration not reloaded/);
    const t = await tlsViaSslRequest(proxy.port, pki.caPem);
    try {
      expect(serialOf(t.tls)).toBe(pki.server2.serial);
      await t.wire.startup({ user: trustUser, database: pg.database });
    } finally {
      t.wire.terminate();
      t.wire.destroy();
    }
  });
});

// ===================================================================== server leg

/** Whether the proxy's upstream connection for a fresh tenant session is TLS. */
async function upstreamSsl(p: ProxyHandle, user = trustUser, password = trustPw): Promise<boolean> {
  return withClient(p.url({ user, password }), async (sql) => {
    const [row] = await sql`select ssl from pg_stat_ssl where pid = pg_backend_pid()`;
    return row!.ssl as boolean;
  });
}

describe("upstream TLS: PostgreSQL without TLS (ssl=off)", () => {
  const p: Record<string, ProxyHandle> = {};
  beforeAll(async () => {
    const [row] = await pg.sql`SHOW ssl`;
    if (row!.ssl !== "off") await disableUpstreamSsl(pg);
    const modes = ["disable", "prefer", "require", "verify-ca", "verify-full"] as const;
    const started = await Promise.all(
      modes.map((m) => proxyWith(["--upstream-tls", m, ...(m.startsWith("verify") ? ["--upstream-ca", pki.ca] : [])])),
    );
    modes.forEach((m, i) => (p[m] = started[i]!));
  });

  test("disable: plaintext", async () => {
    expect(await upstreamSsl(p.disable!)).toBe(false);
  });

  test("prefer: the server answers 'N' and the proxy carries on in plaintext", async () => {
    expect(await upstreamSsl(p.prefer!)).toBe(false);
  });

  for (const mode of ["require", "verify-ca", "verify-full"] as const) {
    test(`${mode}: 08006 could not connect to the upstream server, saying it does not support TLS`, async () => {
      const err = await connectError(p[mode]!.url({ user: trustUser, password: trustPw }));
      expect(err.code, err.message).toBe("08006");
      expect(err.message).toContain("could not connect to the upstream server");
      expect(err.message).toContain(`does not support TLS, and --upstream-tls is ${mode}`);
    });
  }
});

describe("upstream TLS: PostgreSQL with ssl=on", () => {
  let sslDir: string | undefined;
  let enabled = false;
  beforeAll(async () => {
    const files = serverSslFiles(pki.server, pki.ca); // the CA also checks client certificates (cert_user)
    sslDir = files.dir;
    enabled = true;
    await enableUpstreamSsl(pg, files);
  });
  afterAll(async () => {
    if (enabled) await disableUpstreamSsl(pg);
    if (sslDir) rmSync(sslDir, { recursive: true, force: true });
  });

  const ok: Array<[string, string[], boolean]> = [
    ["disable", ["--upstream-tls", "disable"], false],
    ["prefer (the default)", [], true],
    ["require", ["--upstream-tls", "require"], true],
    ["require with an unrelated CA (require does not verify)", ["--upstream-tls", "require", "--upstream-ca", "OTHER_CA"], true],
    ["verify-ca with the right CA", ["--upstream-tls", "verify-ca", "--upstream-ca", "CA"], true],
    ["verify-ca ignores the name (--upstream-server-name db.example.com)", ["--upstream-tls", "verify-ca", "--upstream-ca", "CA", "--upstream-server-name", "db.example.com"], true],
    ["verify-full, name defaults to the upstream host 127.0.0.1 (IP SAN)", ["--upstream-tls", "verify-full", "--upstream-ca", "CA"], true],
    ["verify-full with --upstream-server-name localhost", ["--upstream-tls", "verify-full", "--upstream-ca", "CA", "--upstream-server-name", "localhost"], true],
  ];
  const files = (args: string[]) => args.map((a) => (a === "CA" ? pki.ca : a === "OTHER_CA" ? pki.otherCa : a));

  for (const [name, args, ssl] of ok) {
    test(`${name}: connects, pg_stat_ssl.ssl = ${ssl}`, async () => {
      const p = await proxyWith(files(args));
      expect(await upstreamSsl(p), p.logs()).toBe(ssl);
    });
  }

  test("the proxy logs in with a client certificate (pg_hba cert); the client still authenticates at the proxy", async () => {
    const cert = pki.client(CERT_USER);
    const p = await proxyWith(["--upstream-tls", "verify-full", "--upstream-ca", pki.ca, "--upstream-cert", cert.cert, "--upstream-key", cert.key]);
    const certUser = `${CERT_USER}.${TENANT_A}`;
    await withClient(p.url({ user: certUser, password: PASSWORDS[CERT_USER] }), async (sql) => {
      const [row] = await sql`SELECT current_user AS usr, current_tenant_id() AS tenant, pg_backend_pid() AS pid,
                                     (SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()) AS ssl`;
      expect({ usr: row!.usr, tenant: row!.tenant, ssl: row!.ssl }).toEqual({ usr: CERT_USER, tenant: TENANT_A, ssl: true });
      if (pg.mode === "managed") {
        const line = pg.serverLog().split("\n").find((l) => l.includes(`[${row!.pid}]`) && l.includes("connection authenticated:"));
        expect(line).toContain("method=cert");
      }
    });
    const err = await connectError(p.url({ user: certUser, password: "wrong" }));
    expect(err.code).toBe("28P01");
    // Without the certificate the server refuses the role: the client is told the proxy could not log in.
    const noCert = await proxyWith(["--upstream-tls", "verify-full", "--upstream-ca", pki.ca]);
    const refused = await connectError(noCert.url({ user: certUser, password: PASSWORDS[CERT_USER] }));
    expect(`${refused.code} ${refused.message}`).toBe(`08006 multigres could not log in to PostgreSQL as "${CERT_USER}"`);
  });

  test("verify-full, SCRAM user through TLS both ways (postgres.js)", async () => {
    const p = await proxyWith(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--upstream-tls", "verify-full", "--upstream-ca", pki.ca]);
    await withClient(
      p.url({ user: appUser, password: appPw }),
      async (sql) => {
        const [row] = await sql`select ssl, current_tenant_id() as tenant, (select count(*)::int from notes) as n from pg_stat_ssl where pid = pg_backend_pid()`;
        expect(row).toEqual({ ssl: true, tenant: TENANT_A, n: tenantRows });
      },
      { ssl: { ca: pki.caPem, servername: "localhost" } },
    );
  });

  const refused: Array<[string, string[], RegExp[]]> = [
    ["verify-full with a wrong --upstream-server-name", ["--upstream-tls", "verify-full", "--upstream-ca", "CA", "--upstream-server-name", "db.example.com"], [/db\.example\.com/, /does not match/i, /verify-full/]],
    ["verify-ca with an unrelated CA", ["--upstream-tls", "verify-ca", "--upstream-ca", "OTHER_CA"], [/not trusted/]],
    ["verify-full with an unrelated CA", ["--upstream-tls", "verify-full", "--upstream-ca", "OTHER_CA"], [/not trusted/]],
    ["verify-ca without --upstream-ca (system roots do not know the test CA)", ["--upstream-tls", "verify-ca"], [/not trusted/]],
  ];
  for (const [name, args, patterns] of refused) {
    test(`${name}: 08006 with a clear message`, async () => {
      const p = await proxyWith(files(args));
      const err = await connectError(p.url({ user: trustUser, password: trustPw }));
      expect(err.code, `${err.message}\n--- proxy log ---\n${p.logs()}`).toBe("08006");
      expect(err.message).toContain("could not connect to the upstream server");
      for (const re of patterns) expect(err.message).toMatch(re);
    });
  }

  // ------------------------------------------------------- channel binding

  /** Mechanisms of the AuthenticationSASL a TLS client is offered for app_user. */
  async function saslOffer(port: number, user: string): Promise<string[]> {
    const { wire } = await tlsViaSslRequest(port, pki.caPem);
    try {
      wire.write(startupMessage(new Map([["user", user], ["database", pg.database]])));
      const m = await wire.next();
      if (m?.type !== "R") throw new Error(`expected an authentication request, got ${m?.type} ${m ? JSON.stringify(errorFields(m.body)) : ""}`);
      expect(m.body.readInt32BE(0)).toBe(10); // AuthenticationSASL
      return m.body.subarray(4).toString("utf8").split("\0").filter(Boolean);
    } finally {
      wire.destroy();
    }
  }

  describe("channel binding, --auth proxy (the default): the client leg is bound to the proxy's certificate", () => {
    let proxy: ProxyHandle;
    let plainUpstream: ProxyHandle;
    beforeAll(async () => {
      [proxy, plainUpstream] = await Promise.all([
        proxyWith(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--upstream-tls", "require"]),
        proxyWith(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--upstream-tls", "disable"]),
      ]);
    });

    test("a TLS client is offered SCRAM-SHA-256-PLUS first; a plaintext client SCRAM-SHA-256 only", async () => {
      expect(await saslOffer(proxy.port, appUser)).toEqual(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
      const plain = new Wire(await openPlain(proxy.port), "plaintext offer");
      try {
        plain.write(startupMessage(new Map([["user", appUser], ["database", pg.database]])));
        const m = await plain.next();
        expect(m?.type).toBe("R");
        expect(m!.body.subarray(4).toString("utf8").split("\0").filter(Boolean)).toEqual(["SCRAM-SHA-256"]);
      } finally {
        plain.destroy();
      }
    });

    for (const [leg, p] of [["over TLS", () => proxy], ["in plaintext", () => plainUpstream]] as const) {
      for (const binding of ["require", "prefer", "disable"] as const) {
        test(`libpq channel_binding=${binding}, upstream leg ${leg}: connects, tenant context in place`, async () => {
          const r = await psql(
            libpqUrl(p(), appUser, { sslmode: "verify-full", sslrootcert: pki.ca, channel_binding: binding }, appPw),
            "SELECT current_user || '|' || current_tenant_id() || '|' || (SELECT count(*) FROM notes)",
            { timeoutMs: 30_000 },
          );
          expect(r.exitCode, describeRun(r)).toBe(0);
          expect(r.stdout.trim()).toBe(`${APP_USER}|${TENANT_A}|${tenantRows}`);
        });
      }
    }

    test("node-postgres with enableChannelBinding logs in with SCRAM-SHA-256-PLUS; postgres.js over TLS with SCRAM-SHA-256", async () => {
      const client = new pgClient({
        host: "127.0.0.1",
        port: proxy.port,
        user: appUser,
        password: appPw,
        database: pg.database,
        ssl: { ca: pki.caPem, servername: "localhost" },
        enableChannelBinding: true,
      });
      await client.connect();
      try {
        const { rows } = await client.query("SELECT current_tenant_id() AS t, (SELECT count(*)::int FROM notes) AS n");
        expect(rows).toEqual([{ t: TENANT_A, n: tenantRows }]);
      } finally {
        await client.end();
      }
      await withClient(
        proxy.url({ user: appUser, password: appPw }),
        async (sql) => expect((await sql`SELECT current_tenant_id() AS t`)[0]!.t).toBe(TENANT_A),
        { ssl: { ca: pki.caPem, servername: "localhost" } },
      );
    });

    test("a client whose TLS ends elsewhere (binding data of another certificate) is refused", async () => {
      // What a man in the middle with its own certificate would forward: the
      // proof binds to the certificate the client saw, not the proxy's.
      const { wire } = await tlsViaSslRequest(proxy.port, pki.caPem);
      try {
        wire.write(startupMessage(new Map([["user", appUser], ["database", pg.database]])));
        await wire.next();
        const other = Buffer.alloc(32, 1); // not the hash of the proxy's certificate
        const nonce = "cbtestnonce0123456789";
        const first = Buffer.from(`p=tls-server-end-point,,n=,r=${nonce}`);
        const len = Buffer.alloc(4);
        len.writeInt32BE(first.length);
        const initial = Buffer.concat([Buffer.from("SCRAM-SHA-256-PLUS\0"), len, first]);
        const head = Buffer.alloc(5);
        head.write("p");
        head.writeInt32BE(4 + initial.length, 1);
        wire.write(Buffer.concat([head, initial]));
        const cont = await wire.next();
        expect(cont?.type).toBe("R");
        const serverNonce = /r=([^,]+)/.exec(cont!.body.subarray(4).toString())![1]!;
        const c = Buffer.concat([Buffer.from("p=tls-server-end-point,,"), other]).toString("base64");
        const final = Buffer.from(`c=${c},r=${serverNonce},p=${Buffer.alloc(32).toString("base64")}`);
        const head2 = Buffer.alloc(5);
        head2.write("p");
        head2.writeInt32BE(4 + final.length, 1);
        wire.write(Buffer.concat([head2, final]));
        const e = await wire.next();
        expect(e?.type).toBe("E");
        expect(errorFields(e!.body)).toMatchObject({ C: "08P01", M: "SCRAM authentication failed: SCRAM channel binding check failed" });
      } finally {
        wire.destroy();
      }
    });
  });

  describe("channel binding, --auth passthrough", () => {
    let proxy: ProxyHandle;
    const passthrough = (args: string[]) => startProxyFor(pg, { args, auth: "passthrough" }).then((p) => (proxies.push(p), p));
    beforeAll(async () => {
      proxy = await passthrough(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--upstream-tls", "require"]);
    });
    const defaultsUrl = () => libpqUrl(proxy, appUser, { sslmode: "prefer" }, appPw);

    test("baseline: PostgreSQL over TLS offers SCRAM-SHA-256-PLUS; the relaying proxy never does", async () => {
      expect(await saslOffer(pg.port, APP_USER)).toContain("SCRAM-SHA-256-PLUS");
      // TLS on both legs: a libpq client would answer a -PLUS-less offer with
      // gs2 flag "y", which PostgreSQL rejects as a downgrade. So the proxy
      // asks the TLS client for its password and does SCRAM upstream itself.
      const { wire } = await tlsViaSslRequest(proxy.port, pki.caPem);
      try {
        wire.write(startupMessage(new Map([["user", appUser], ["database", pg.database]])));
        const m = await wire.next();
        expect(m?.type).toBe("R");
        expect(m!.body.readInt32BE(0)).toBe(3); // AuthenticationCleartextPassword, over TLS
      } finally {
        wire.destroy();
      }
      // With the upstream leg in plaintext, PostgreSQL offers no -PLUS and the
      // client's SCRAM passes through untouched.
      const plainUpstream = await passthrough(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--upstream-tls", "disable"]);
      const offered = await saslOffer(plainUpstream.port, appUser);
      expect(offered).toContain("SCRAM-SHA-256");
      expect(offered.filter((m) => m.endsWith("-PLUS"))).toEqual([]);
    });

    test("baseline: libpq channel_binding=require works directly against PostgreSQL", async () => {
      const r = await psql(pg.url({ user: APP_USER, password: appPw, host: "localhost", params: { hostaddr: "127.0.0.1", sslmode: "require", channel_binding: "require" } }), "SELECT 1");
      expect(r.exitCode, describeRun(r)).toBe(0);
    });

    test("libpq channel_binding=prefer, upstream leg over TLS, connects (SCRAM-SHA-256 without binding)", async () => {
      const r = await psql(
        libpqUrl(proxy, appUser, { sslmode: "verify-full", sslrootcert: pki.ca, channel_binding: "prefer" }, appPw),
        "SELECT current_user || '|' || current_tenant_id() || '|' || (SELECT count(*) FROM notes)",
        { timeoutMs: 30_000 },
      );
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout.trim()).toBe(`${APP_USER}|${TENANT_A}|${tenantRows}`);
    });

    test("libpq channel_binding=prefer, upstream leg in plaintext, connects", async () => {
      const plainUpstream = await passthrough(["--tls-cert", pki.server.cert, "--tls-key", pki.server.key, "--upstream-tls", "disable"]);
      const r = await psql(
        libpqUrl(plainUpstream, appUser, { sslmode: "verify-full", sslrootcert: pki.ca, channel_binding: "prefer" }, appPw),
        "SELECT current_user || '|' || current_tenant_id()",
        { timeoutMs: 30_000 },
      );
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout.trim()).toBe(`${APP_USER}|${TENANT_A}`);
    });

    test("libpq with its defaults (sslmode=prefer, channel_binding=prefer) logs in as a SCRAM user", async () => {
      const r = await psql(defaultsUrl(), "SELECT current_tenant_id()", { timeoutMs: 30_000, args: ["-c", "\\conninfo"] });
      expect(r.exitCode, describeRun(r)).toBe(0);
      expect(r.stdout).toContain("SSL connection");
      expect(r.stdout).toContain(TENANT_A);
    });

    test("libpq channel_binding=require fails promptly with libpq's channel binding message (a relay cannot bind)", async () => {
      const r = await psql(
        libpqUrl(proxy, appUser, { sslmode: "verify-full", sslrootcert: pki.ca, channel_binding: "require" }, appPw),
        "SELECT 1",
        { timeoutMs: 30_000 },
      );
      expect(r.timedOut, describeRun(r)).toBe(false);
      expect(r.exitCode, describeRun(r)).toBe(2);
      expect(r.stderr).toMatch(/channel binding/i);
      expect(r.stdout).toBe("");
    });
  });
});
