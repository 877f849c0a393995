#!/usr/bin/env bun
/**
 * What the unforgeable context costs: a 100k-row scan under the signed
 * policy (current_tenant_id() verifying an HMAC) against the same scan under
 * a plain `current_setting()` policy, on a throwaway PostgreSQL.
 *
 *   bun run bench:context [--rows 100000] [--rounds 15]
 *
 * Not a test: it prints medians and the ratio, and the plan line showing the
 * verifier runs once per statement (an InitPlan), not once per row.
 */
import postgres from "postgres";
import { parseArgs } from "node:util";
import { deriveContextKey, signContext } from "../src/tenant/context.ts";
import { APP_USER, CONTEXT_SECRET, PASSWORDS, startPostgres } from "../test/harness/index.ts";

const { values } = parseArgs({ options: { rows: { type: "string", default: "100000" }, rounds: { type: "string", default: "15" } } });
const rows = Number(values.rows);
const rounds = Number(values.rounds);

const pg = await startPostgres();
try {
  await pg.sql.unsafe(`
    DROP TABLE IF EXISTS bench_signed, bench_plain, bench_plain_once;
    CREATE TABLE bench_signed (id int, tenant_id text NOT NULL, payload text);
    INSERT INTO bench_signed SELECT i, 't' || (i % 10), md5(i::text) FROM generate_series(1, ${rows}) i;
    CREATE TABLE bench_plain AS SELECT * FROM bench_signed;
    CREATE TABLE bench_plain_once AS SELECT * FROM bench_signed;
    SELECT multigres.enable_tenant_rls('bench_signed');
    ALTER TABLE bench_plain ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
    CREATE POLICY plain ON bench_plain USING (tenant_id = current_setting('app.current_tenant_id', true));
    ALTER TABLE bench_plain_once ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
    CREATE POLICY plain ON bench_plain_once USING (tenant_id = (SELECT current_setting('app.current_tenant_id', true)));
    GRANT SELECT ON bench_signed, bench_plain, bench_plain_once TO ${APP_USER};
    ANALYZE bench_signed, bench_plain, bench_plain_once;
  `);

  // Set the context exactly as the proxy does, on a direct connection.
  const sql = postgres(pg.url({ user: APP_USER, password: PASSWORDS[APP_USER] }), { max: 1, ssl: false });
  const [{ binding }] = (await sql`select multigres.backend_binding() as binding`) as unknown as [{ binding: string }];
  const sig = signContext(deriveContextKey(CONTEXT_SECRET), "t3", binding);
  await sql`select set_config('app.current_tenant_id', 't3', false), set_config('app.current_tenant_id_sig', ${sig}, false)`;

  const time = async (table: string) => {
    const started = performance.now();
    const [{ count }] = (await sql.unsafe(`select count(*) from ${table}`)) as unknown as [{ count: string }];
    const ms = performance.now() - started;
    if (Number(count) !== rows / 10) throw new Error(`${table}: expected ${rows / 10} rows, saw ${count}`);
    return ms;
  };
  for (let i = 0; i < 3; i++) for (const t of ["bench_signed", "bench_plain", "bench_plain_once"]) await time(t); // warm up

  const signed: number[] = [];
  const plain: number[] = [];
  const plainOnce: number[] = [];
  for (let i = 0; i < rounds; i++) {
    signed.push(await time("bench_signed"));
    plain.push(await time("bench_plain"));
    plainOnce.push(await time("bench_plain_once"));
  }
  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
  const plan = await sql.unsafe(`explain (analyze, costs off, timing off) select count(*) from bench_signed`);
  const initPlan = plan.map((r) => r["QUERY PLAN"] as string).filter((l) => /InitPlan|Result|Filter/.test(l));

  console.log(`\n${rows.toLocaleString()}-row scan, ${rounds} rounds, median:`);
  console.log(`| policy | median ms |\n|---|---|`);
  console.log(`| signed: tenant_id = (SELECT current_tenant_id()) | ${median(signed).toFixed(2)} |`);
  console.log(`| plain, per row: tenant_id = current_setting('app.current_tenant_id', true) | ${median(plain).toFixed(2)} |`);
  console.log(`| plain, per statement: tenant_id = (SELECT current_setting(…)) | ${median(plainOnce).toFixed(2)} |`);
  console.log(`\nratio signed / plain per row: ${(median(signed) / median(plain)).toFixed(3)}`);
  console.log(`ratio signed / plain per statement: ${(median(signed) / median(plainOnce)).toFixed(3)}`);
  console.log(`plan (verifier evaluated once per statement):\n  ${initPlan.join("\n  ")}`);
  await sql.end();
} finally {
  await pg.stop();
}
