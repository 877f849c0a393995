/**
 * Rotating the context secret without downtime: two keys are valid at once,
 * the proxy picks up a new secret file on SIGHUP, sessions signed with the
 * old key keep working until that key is retired.
 */
import { afterAll, beforeAll, describe, expect, test, setDefaultTimeout } from "bun:test";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import postgres from "postgres";
import { contextKeyId, deriveContextKey, signContext } from "../../src/tenant/context.ts";
import { APP_USER, CONTEXT_SECRET, PASSWORDS, SETUP_SQL_PATH, startPostgres, startProxy, type PgInstance, type ProxyHandle } from "../harness/index.ts";

// Per file: bun applies setDefaultTimeout only to the file that calls it.
setDefaultTimeout(120_000);

const DB = "rotation_test";
const NEW_SECRET = "rotated-context-secret-abcdefghijklmnopqrstuvwxyz";

let pg: PgInstance;
let proxy: ProxyHandle;
let admin: postgres.Sql;
let dir: string;
const clients: postgres.Sql[] = [];

const tenantClient = () => {
  const c = postgres(proxy.url({ user: `${APP_USER}.acme`, password: PASSWORDS[APP_USER], database: DB }), { max: 1, ssl: false, onnotice: () => {} });
  clients.push(c);
  return c;
};
const visible = async (c: postgres.Sql) => (await c`select body from rotation_notes order by body`).map((r) => r.body);

beforeAll(async () => {
  pg = await startPostgres();
  await pg.sql.unsafe(`DROP DATABASE IF EXISTS ${DB}`);
  await pg.sql.unsafe(`CREATE DATABASE ${DB}`);
  admin = postgres(pg.url({ user: "postgres", password: PASSWORDS.postgres, database: DB }), { max: 1, ssl: false, onnotice: () => {} });
  await admin.unsafe(readFileSync(SETUP_SQL_PATH, "utf8"));
  await admin.unsafe(`
    CREATE TABLE rotation_notes (tenant_id text NOT NULL, body text NOT NULL);
    SELECT multigres.enable_tenant_rls('rotation_notes');
    GRANT SELECT ON rotation_notes TO ${APP_USER};
    INSERT INTO rotation_notes VALUES ('acme', 'acme 1'), ('acme', 'acme 2'), ('globex', 'globex 1');
  `);
  await admin`SELECT multigres.add_context_key(${Buffer.from(deriveContextKey(CONTEXT_SECRET))})`;

  dir = mkdtempSync(join(tmpdir(), "multigres-rotation-"));
  writeFileSync(join(dir, "secret"), `${CONTEXT_SECRET}\n`);
  proxy = await startProxy({ upstreamPort: pg.port, args: ["--context-secret-file", join(dir, "secret")] });
});

afterAll(async () => {
  await Promise.all(clients.map((c) => c.end()));
  await proxy?.stop();
  await admin?.end();
  await pg?.sql.unsafe(`DROP DATABASE IF EXISTS ${DB} WITH (FORCE)`);
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe("context secret rotation", () => {
  test("a session keeps its rows across a rotation; new sessions use the new key", async () => {
    const oldKeyId = contextKeyId(deriveContextKey(CONTEXT_SECRET));
    const newKey = deriveContextKey(NEW_SECRET);
    const before = tenantClient();
    expect(await visible(before)).toEqual(["acme 1", "acme 2"]);

    // 1. Store the new key next to the old one: both verify now.
    const [{ id }] = (await admin`SELECT multigres.add_context_key(${Buffer.from(newKey)}) AS id`) as unknown as [{ id: string }];
    expect(id).toBe(contextKeyId(newKey));

    // 2. Point the proxy at the new secret and reload.
    writeFileSync(join(dir, "secret"), `${NEW_SECRET}\n`);
    process.kill(proxy.pid, "SIGHUP");
    await proxy.waitForLog(new RegExp(`new sessions are signed with key ${contextKeyId(newKey)}`));

    const after = tenantClient();
    expect(await visible(after)).toEqual(["acme 1", "acme 2"]);
    const [{ binding, sig }] = (await after`select multigres.backend_binding() as binding, current_setting('app.current_tenant_id_sig') as sig`) as unknown as [{ binding: string; sig: string }];
    expect(sig).toBe(signContext(newKey, "acme", binding));

    // The session from before the rotation is untouched.
    expect(await visible(before)).toEqual(["acme 1", "acme 2"]);

    // 3. Retire the old key once its sessions are gone: they would fail
    //    closed (no rows), never open; the new ones carry on.
    await admin`DELETE FROM multigres.context_keys WHERE key_id = ${oldKeyId}`;
    expect(await visible(before)).toEqual([]);
    expect(await visible(after)).toEqual(["acme 1", "acme 2"]);
    expect(await visible(tenantClient())).toEqual(["acme 1", "acme 2"]);
  });

  test("an unreadable secret file on SIGHUP keeps the running config", async () => {
    rmSync(join(dir, "secret"));
    process.kill(proxy.pid, "SIGHUP");
    await proxy.waitForLog(/configuration not reloaded:[\s\S]*cannot read --context-secret-file/);
    expect(await visible(tenantClient())).toEqual(["acme 1", "acme 2"]);
    expect(proxy.logs()).not.toContain(NEW_SECRET);
  });
});
