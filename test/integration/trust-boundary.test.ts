/**
 * The proxy as the trust boundary (`--auth proxy`), tried the way an
 * attacker with SQL injection in one tenant's app would (issue: "the tenant
 * becomes authenticated"). Real PostgreSQL, the compiled binary, postgres.js
 * and psql. A dedicated role, boundary_user, whose password the attack
 * changes, so no other suite shares it.
 *
 * - The attack: tenant a runs `ALTER ROLE … PASSWORD 'x'` through dynamic
 *   SQL the guard cannot read. It works in the database, and buys nothing:
 *   'x' is no client password, neither is the database password; b's
 *   clients still log in with their own credential.
 * - What the changed password does break (new server logins) is loud: the
 *   clients get 08006 naming the proxy's login, the log says why, /readyz
 *   turns 503 with the reason, and all recovers once the password is back.
 * - Tenant tokens: `multigres token`, the npm export and the README's Python
 *   lines make the same token; a's token never logs in as b; another secret's
 *   tokens are refused; tokens with an expiry work with --auth-method password
 *   and stop at their expiry.
 * - A verifier copied from pg_authid works as an auth-file entry.
 * - Wrong credentials: 28P01 naming the user as typed, logged without the
 *   secret, counted in /healthz.
 * - Fail loud: a PgBouncer between the proxy and PostgreSQL, a context key
 *   the database does not know, setup missing or outdated, a role-level
 *   setting planted by an injected session: each an error naming the cause
 *   (never 0 rows), at startup (log, /readyz) and per session.
 * - What --auth passthrough gives up: with the relay, the attack's password
 *   logs in as any tenant (the documented reason it is opt-in).
 */
import { afterAll, beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { randomBytes } from "node:crypto";
import { chmodSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import {
  connectError,
  CONTEXT_SECRET,
  contextKey,
  describeRun,
  ensureBuilt,
  NOTES,
  psql,
  REPO_ROOT,
  startPostgres,
  startProxyFor,
  TENANT_A,
  TENANT_B,
  userlistLine,
  withClient,
  writeTempFile,
  type PgInstance,
  type ProxyHandle,
} from "../harness/index.ts";
import { getJson, httpBase } from "./tls-helpers.ts";
import { pgbouncerBin, startPgbouncer, type Running } from "../../scripts/bench/targets.ts";

setDefaultTimeout(120_000);

const ROLE = "boundary_user";
const DB_PASSWORD = `db-${randomBytes(12).toString("hex")}`; // the database's: the proxy's upstream credential
const CLIENT_PASSWORD = "boundary-client-pw"; // the clients': in the proxy's auth file
const TOKEN_SECRET = "boundary-token-secret-0123456789-abcdef";

let pg: PgInstance;
let proxy: ProxyHandle;
const proxies: ProxyHandle[] = [];
const authFile = writeTempFile("boundary-userlist.txt", `${userlistLine(ROLE, CLIENT_PASSWORD)}\n`);
const upstreamFile = writeTempFile("boundary-upstream.txt", `${DB_PASSWORD}\n`);

async function start(args: string[], env: Record<string, string> = {}): Promise<ProxyHandle> {
  const p = await startProxyFor(pg, { args: ["--upstream-password-file", upstreamFile, ...args], env });
  proxies.push(p);
  return p;
}

const url = (p: ProxyHandle, tenant: string, password: string, database?: string) =>
  p.url({ user: `${ROLE}.${tenant}`, password, ...(database ? { database } : {}) });

/** The tenant, the rows it sees and any foreign row, through `p`. */
async function sees(p: ProxyHandle, tenant: string, password: string) {
  return withClient(url(p, tenant, password), async (sql) => {
    const [row] = await sql`SELECT current_tenant_id() AS tenant, (SELECT count(*)::int FROM notes) AS n,
                                   (SELECT count(*)::int FROM notes WHERE tenant_id <> ${tenant}) AS foreign_rows`;
    return row!;
  });
}

async function readyz(p: ProxyHandle): Promise<{ status: number; body: Record<string, unknown> }> {
  return getJson(`${await httpBase(p)}/readyz`);
}

beforeAll(async () => {
  pg = await startPostgres();
  await pg.sql.unsafe(`DROP ROLE IF EXISTS ${ROLE}`).catch(() => {});
  await pg.sql.unsafe(`CREATE ROLE ${ROLE} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD '${DB_PASSWORD}'`);
  await pg.sql.unsafe(`GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO ${ROLE}; GRANT USAGE ON SEQUENCE notes_id_seq TO ${ROLE}`);
  proxy = await start(["--auth-file", authFile, "--database", pg.database]);
});

afterAll(async () => {
  await Promise.all(proxies.map((p) => p.stop()));
});

describe("the attack from the issue, against --auth proxy", () => {
  test("tenant a changes the role's password from inside the database; that password logs in as nobody", async () => {
    await proxy.waitForLog(new RegExp(`startup check: database "${pg.database}" knows context key`));
    expect((await readyz(proxy)).status).toBe(200);
    const a = postgres(url(proxy, TENANT_A, CLIENT_PASSWORD), { max: 1, onnotice: () => {} });
    try {
      // Dynamic SQL hides the statement from the guard; the database runs it.
      await a.unsafe(`DO $$ BEGIN EXECUTE 'ALTER ROLE ' || current_user || ' PASS' || 'WORD ''x'''; END $$`);
      expect((await a`SELECT current_tenant_id() AS t`)[0]!.t).toBe(TENANT_A);

      for (const [who, password] of [["the injected password", "x"], ["the database's old password", DB_PASSWORD]] as const) {
        const err = await connectError(url(proxy, TENANT_B, password));
        expect(`${who}: ${err.code} ${err.message}`).toBe(`${who}: 28P01 password authentication failed for user "${ROLE}.${TENANT_B}"`);
        const r = await psql(url(proxy, TENANT_B, password), "SELECT count(*) FROM notes");
        expect(r.exitCode, describeRun(r)).toBe(2);
        expect(r.stdout).toBe("");
      }

      // The real clients are now locked out of new sessions, loudly: the
      // proxy's own login fails, and it says so. Nobody gets in with 'x'.
      const locked = await connectError(url(proxy, TENANT_B, CLIENT_PASSWORD));
      expect(`${locked.code} ${locked.message}`).toBe(`08006 multigres could not log in to PostgreSQL as "${ROLE}"`);
      await proxy.waitForLog(
        new RegExp(`could not log in to PostgreSQL with the proxy's credential \\(login as ${ROLE}@${pg.database}\\): password authentication failed for user "${ROLE}" \\(28P01\\)`),
      );
      const notReady = await readyz(proxy);
      expect(notReady.status).toBe(503);
      expect(notReady.body.problems).toEqual([`login as ${ROLE}: password authentication failed for user "${ROLE}" (28P01)`]);
      // The session that ran the attack is still tenant a and nothing more.
      expect((await a`SELECT count(*)::int AS n FROM notes`)[0]!.n).toBe(NOTES.tenant_a.length);
    } finally {
      await a.end();
    }

    // The operator restores the password: new sessions work, /readyz recovers.
    await pg.sql.unsafe(`ALTER ROLE ${ROLE} PASSWORD '${DB_PASSWORD}'`);
    expect(await sees(proxy, TENANT_B, CLIENT_PASSWORD)).toEqual({ tenant: TENANT_B, n: NOTES.tenant_b.length, foreign_rows: 0 });
    expect((await readyz(proxy)).status).toBe(200);
    expect(proxy.logs()).not.toContain(DB_PASSWORD);
    expect(proxy.logs()).not.toContain(CLIENT_PASSWORD);
  });

  test("--auth passthrough gives exactly this up: the injected password logs in as any tenant (why it is opt-in)", async () => {
    const relay = await startProxyFor(pg, { auth: "passthrough" });
    proxies.push(relay);
    const a = postgres(url(relay, TENANT_A, DB_PASSWORD), { max: 1, onnotice: () => {} });
    try {
      await a.unsafe(`DO $$ BEGIN EXECUTE 'ALTER ROLE ' || current_user || ' PASS' || 'WORD ''x'''; END $$`);
      // With the relay, whoever holds the role's password is every tenant.
      expect(await sees(relay, TENANT_B, "x")).toEqual({ tenant: TENANT_B, n: NOTES.tenant_b.length, foreign_rows: 0 });
    } finally {
      await a.end();
      await pg.sql.unsafe(`ALTER ROLE ${ROLE} PASSWORD '${DB_PASSWORD}'`);
    }
  });
});

describe("wrong credentials", () => {
  test("28P01 naming the user as typed; logged without the secret; counted in /healthz", async () => {
    const before = (await getJson(`${await httpBase(proxy)}/healthz`)).body.authFailures as number;
    const secretGuess = "a-guess-that-must-not-be-logged-9f2c";
    const err = await connectError(url(proxy, "acme", secretGuess));
    expect(`${err.code} ${err.message}`).toBe(`28P01 password authentication failed for user "${ROLE}.acme"`);
    const unknown = await connectError(proxy.url({ user: "nobody_role.acme", password: secretGuess }));
    expect(`${unknown.code} ${unknown.message}`).toBe(`28P01 password authentication failed for user "nobody_role.acme"`);
    await proxy.waitForLog(new RegExp(`authentication failed for user "${ROLE}\\.acme": password does not match \\(auth file entry "${ROLE}"\\)`));
    await proxy.waitForLog(/authentication failed for user "nobody_role\.acme": no auth-file entry or token for this user/);
    expect(proxy.logs()).not.toContain(secretGuess);
    expect((await getJson(`${await httpBase(proxy)}/healthz`)).body.authFailures).toBe(before + 2);
  });
});

describe("auth file entries", () => {
  test("a SCRAM verifier copied from pg_authid logs in (the client then uses the database's password)", async () => {
    const [{ rolpassword }] = (await pg.sql`SELECT rolpassword FROM pg_authid WHERE rolname = ${ROLE}`) as unknown as [{ rolpassword: string }];
    expect(rolpassword).toStartWith("SCRAM-SHA-256$4096:");
    const p = await start(["--auth-file", writeTempFile("copied-verifier.txt", `${userlistLine(ROLE, rolpassword)}\n`)]);
    expect(await sees(p, TENANT_A, DB_PASSWORD)).toEqual({ tenant: TENANT_A, n: NOTES.tenant_a.length, foreign_rows: 0 });
    expect((await connectError(url(p, TENANT_A, CLIENT_PASSWORD))).code).toBe("28P01");
  });

  test("an entry for one tenant beats the role's shared entry; SIGHUP re-reads the file", async () => {
    const file = writeTempFile("per-tenant.txt", `${userlistLine(ROLE, CLIENT_PASSWORD)}\n${userlistLine(`${ROLE}.${TENANT_B}`, "b-own-pw")}\n`);
    const p = await start(["--auth-file", file]);
    expect((await sees(p, TENANT_B, "b-own-pw")).tenant).toBe(TENANT_B);
    expect((await connectError(url(p, TENANT_B, CLIENT_PASSWORD))).code).toBe("28P01");
    expect((await sees(p, TENANT_A, CLIENT_PASSWORD)).tenant).toBe(TENANT_A);

    // Rewrite it (tenant a loses access), reload, and the new file is what counts.
    await Bun.write(file, `${userlistLine(`${ROLE}.${TENANT_B}`, "b-own-pw")}\n`);
    process.kill(p.pid, "SIGHUP");
    await p.waitForLog(/config reloaded/);
    expect((await connectError(url(p, TENANT_A, CLIENT_PASSWORD))).code).toBe("28P01");
    expect((await sees(p, TENANT_B, "b-own-pw")).tenant).toBe(TENANT_B);

    // A broken file on SIGHUP keeps the running credentials, and says why.
    await Bun.write(file, `not a userlist line\n`);
    process.kill(p.pid, "SIGHUP");
    await p.waitForLog(/configuration not reloaded:[\s\S]*line 1: expected "user" "password"/);
    expect((await sees(p, TENANT_B, "b-own-pw")).tenant).toBe(TENANT_B);
  });
});

describe("tenant tokens (--tenant-auth token)", () => {
  let tokens: ProxyHandle;
  let cleartext: ProxyHandle;
  const env = { MULTIGRES_TOKEN_SECRET: TOKEN_SECRET };
  beforeAll(async () => {
    [tokens, cleartext] = await Promise.all([
      start(["--tenant-auth", "token"], env),
      start(["--tenant-auth", "token", "--auth-method", "password"], env),
    ]);
  });

  /** `multigres token …` with the secret in the environment. */
  const mint = (args: string[], secret = TOKEN_SECRET) => {
    const r = Bun.spawnSync([ensureBuilt(), "token", ...args], { env: { ...process.env, MULTIGRES_TOKEN_SECRET: secret, NO_COLOR: "1" }, stdout: "pipe", stderr: "pipe" });
    if (r.exitCode !== 0) throw new Error(`multigres token ${args.join(" ")}: ${r.stderr.toString()}`);
    return { token: r.stdout.toString().trim(), stderr: r.stderr.toString() };
  };

  test("a token of a logs in as a (SCRAM), never as b; another secret's token is refused; so is the role's password", async () => {
    const { token } = mint([TENANT_A, "--role", ROLE]);
    expect(token).toMatch(/^mgt1\.0\.[A-Za-z0-9_-]{43}$/);
    expect(await sees(tokens, TENANT_A, token)).toEqual({ tenant: TENANT_A, n: NOTES.tenant_a.length, foreign_rows: 0 });
    const r = await psql(url(tokens, TENANT_A, token), "SELECT current_tenant_id()");
    expect(r.stdout.trim(), describeRun(r)).toBe(TENANT_A);
    for (const [what, user, password] of [
      ["a's token as b", `${ROLE}.${TENANT_B}`, token],
      ["a token from another secret", `${ROLE}.${TENANT_A}`, mint([TENANT_A, "--role", ROLE], `${TOKEN_SECRET}-other`).token],
      ["the role's auth-file password", `${ROLE}.${TENANT_A}`, CLIENT_PASSWORD],
      ["the database password", `${ROLE}.${TENANT_A}`, DB_PASSWORD],
    ] as const) {
      const err = await connectError(tokens.url({ user: user, password }));
      expect(`${what}: ${err.code} ${err.message}`).toBe(`${what}: 28P01 password authentication failed for user "${user}"`);
    }
    expect(tokens.logs()).not.toContain(token);
  });

  test("the npm export and the README's Python make the same token as `multigres token`", async () => {
    const { token } = mint([TENANT_B, "--role", ROLE]);
    const { tenantToken } = await import("multigres");
    expect(tenantToken(TOKEN_SECRET, ROLE, TENANT_B)).toBe(token);

    const readme = readFileSync(join(REPO_ROOT, "README.md"), "utf8");
    const python = /<!-- tenant_token\.py -->\s*```python\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(python, "README.md has the Python tenant_token block").toBeDefined();
    const run = Bun.spawnSync(["python3", "-c", `${python}\nimport sys\nprint(tenant_token(*sys.argv[1:4]))`, TOKEN_SECRET, ROLE, TENANT_B], { stdout: "pipe", stderr: "pipe" });
    expect(run.exitCode, run.stderr.toString()).toBe(0);
    expect(run.stdout.toString().trim()).toBe(token);
    expect(await sees(tokens, TENANT_B, run.stdout.toString().trim())).toEqual({ tenant: TENANT_B, n: NOTES.tenant_b.length, foreign_rows: 0 });
  });

  test("tokens with an expiry: checked in clear (--auth-method password), refused once expired, refused by SCRAM", async () => {
    const { token, stderr } = mint([TENANT_A, "--role", ROLE, "--ttl", "1h"]);
    expect(stderr).toContain("--auth-method password");
    expect(token).toMatch(/^mgt1\.[1-9]\d+\./);
    expect((await sees(cleartext, TENANT_A, token)).tenant).toBe(TENANT_A);
    // SCRAM cannot check a token whose expiry the proxy does not know in advance.
    expect((await connectError(url(tokens, TENANT_A, token))).code).toBe("28P01");
    // One that expired an hour ago (made with the library, as an app would).
    const { tenantToken } = await import("multigres");
    const expired = tenantToken(TOKEN_SECRET, ROLE, TENANT_A, { ttlSeconds: 60, now: Date.now() - 3_600_000 });
    expect((await connectError(url(cleartext, TENANT_A, expired))).code).toBe("28P01");
    await cleartext.waitForLog(new RegExp(`authentication failed for user "${ROLE}\\.${TENANT_A}": the token expired at `));
  });
});

describe("fail loud: the context round names the cause instead of 0 rows", () => {
  test("a PgBouncer between the proxy and PostgreSQL: 55000 naming the pooler, at startup and per session", async () => {
    const bin = pgbouncerBin();
    expect(bin, "pgbouncer is installed (.ci/run installs Debian's package)").toBeDefined();
    const work = mkdtempSync(join(tmpdir(), "multigres-bouncer-"));
    chmodSync(work, 0o755); // PgBouncer runs as the postgres OS user when we are root
    let bouncer: Running | undefined;
    try {
      bouncer = await startPgbouncer({ bin: bin!, upstreamPort: pg.port, workDir: work, tag: "between", poolSize: 2, maxClientConn: 20, users: { [ROLE]: DB_PASSWORD }, database: pg.database });
      const behind = await startProxyFor(pg, {
        upstreamPort: bouncer.port,
        args: ["--auth-file", authFile, "--upstream-password-file", upstreamFile, "--upstream-tls", "disable", "--database", pg.database],
      });
      proxies.push(behind);
      const err = await connectError(url(behind, TENANT_A, CLIENT_PASSWORD));
      // PgBouncer hands out its own cancel key (the pids differ), and now and
      // then syncs its settings on the line first (replies to nothing we
      // sent): either way the proxy names the pooler.
      expect(`${err.code} ${err.message}`).toMatch(/^55000 a connection pooler sits between multigres and PostgreSQL: (the server announced backend -?\d+, but the session runs in backend \d+|a reply \('[CDZ]'\) arrived for nothing the proxy sent)/);
      await behind.waitForLog(/startup check: context check as boundary_user@\S+: a connection pooler sits between the proxy and PostgreSQL/);
      const r = await readyz(behind);
      expect(r.status).toBe(503);
      expect(JSON.stringify(r.body.problems)).toContain("connection pooler");
    } finally {
      bouncer?.stop();
      rmSync(work, { recursive: true, force: true });
    }
  });

  test("a context key the database does not know: 55000 saying so; /readyz 503 after the startup check", async () => {
    const other = await start(["--auth-file", authFile, "--database", pg.database], { MULTIGRES_CONTEXT_SECRET: `${CONTEXT_SECRET}-not-stored` });
    const err = await connectError(url(other, TENANT_A, CLIENT_PASSWORD));
    expect(err.code).toBe("55000");
    expect(err.message).toMatch(new RegExp(`^the database "${pg.database}" does not know this proxy's context key [0-9a-f]{12}, so no tenant context would verify$`));
    await other.waitForLog(/startup check: .*the database does not know context key [0-9a-f]{12}: run multigres setup/);
    expect((await readyz(other)).status).toBe(503);
    // The proxy with the stored key carries on.
    expect((await sees(proxy, TENANT_A, CLIENT_PASSWORD)).tenant).toBe(TENANT_A);
  });

  test("setup missing or outdated in a database: 55000 naming it, with the command that fixes it", async () => {
    const db = `boundary_old_${process.pid}`;
    await pg.sql.unsafe(`DROP DATABASE IF EXISTS ${db}`);
    await pg.sql.unsafe(`CREATE DATABASE ${db}`);
    const admin = postgres(pg.url({ user: "postgres", password: "postgres-superuser-pw", database: db }), { max: 1, onnotice: () => {} });
    try {
      // A database set up by multigres 0.2: the verifier binds the pid only, and
      // there is no backend_binding().
      await admin.unsafe(readFileSync(join(REPO_ROOT, "sql", "setup.sql"), "utf8"));
      await admin`SELECT multigres.add_context_key(${contextKey()})`;
      await admin.unsafe(`DROP FUNCTION multigres.backend_binding(); DROP FUNCTION multigres.context_status(text)`);
      const p = await start(["--auth-file", authFile]);
      const err = await connectError(url(p, TENANT_A, CLIENT_PASSWORD, db));
      expect(err.code).toBe("55000");
      expect(err.message).toStartWith(`multigres setup is missing or older than this proxy in database "${db}"`);
      expect((err.error as { hint?: string }).hint).toContain("multigres setup");
      await p.waitForLog(/tenant context not established: multigres setup is missing or older/);
    } finally {
      await admin.end();
      await pg.sql.unsafe(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`);
    }
  });

  test("a role-level setting planted through dynamic SQL breaks every tenant's new sessions, loudly (closing it is setup's job, next)", async () => {
    const a = postgres(url(proxy, TENANT_A, CLIENT_PASSWORD), { max: 1, onnotice: () => {} });
    try {
      await a.unsafe(`DO $$ BEGIN EXECUTE 'ALTER ' || 'ROLE ' || current_user || ' SET statement_timeout = 1'; END $$`);
      const err = await connectError(url(proxy, TENANT_B, CLIENT_PASSWORD));
      expect(`${err.code} ${err.message}`).toBe("57014 could not establish the tenant context: canceling statement due to statement timeout");
      expect((err.error as { hint?: string }).hint).toContain("role-level setting of the app role");
      const r = await readyz(proxy);
      expect(r.status).toBe(503);
      expect(JSON.stringify(r.body.problems)).toContain(`context check as ${ROLE}@${pg.database}: could not establish the tenant context: canceling statement due to statement timeout`);
    } finally {
      await a.end();
      await pg.sql.unsafe(`ALTER ROLE ${ROLE} RESET ALL`);
    }
    expect((await sees(proxy, TENANT_B, CLIENT_PASSWORD)).tenant).toBe(TENANT_B);
    expect((await readyz(proxy)).status).toBe(200);
  });

  test("a database not in --database is refused before anything reaches the server (3D000)", async () => {
    const err = await connectError(url(proxy, TENANT_A, CLIENT_PASSWORD, "postgres"));
    expect(`${err.code} ${err.message}`).toBe(`3D000 database "postgres" is not served by this proxy`);
  });
});
