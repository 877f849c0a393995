/**
 * --guard strict's rules (src/guard/rules.ts): EXPLAIN ANALYZE in every
 * spelling and LOCK above ROW EXCLUSIVE are refused, at the top level and
 * at statement starts in DO and function bodies; plain EXPLAIN, ANALYZE
 * false|off|0 and the weak lock modes pass; with strict off (the guard's
 * `on`) all of them pass. Properties: arbitrary input never throws; the
 * byte filter never hides a statement strict refuses.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { STRICT_WORDS, triggerWords } from "../../src/guard/guard.ts";
import { checkSql, protectedSettings } from "../../src/guard/rules.ts";

const NAMES = protectedSettings("app.current_tenant_id", "app.current_tenant_id_sig");
const strict = (sql: string) => checkSql(sql, NAMES, true);
const on = (sql: string) => checkSql(sql, NAMES, false);

const EXPLAIN_ANALYZE = [
  "EXPLAIN ANALYZE SELECT 1",
  "explain analyse select 1",
  "Explain Analyze Verbose select 1",
  "EXPLAIN VERBOSE ANALYZE SELECT 1", // a syntax error for the server; refused all the same
  "EXPLAIN (ANALYZE) SELECT 1",
  "EXPLAIN (analyse) SELECT 1",
  "EXPLAIN (ANALYZE TRUE) SELECT 1",
  "EXPLAIN (ANALYZE on) SELECT 1",
  "EXPLAIN (ANALYZE 1) SELECT 1",
  "EXPLAIN (ANALYZE 'true') SELECT 1",
  "EXPLAIN (ANALYZE yes) SELECT 1", // rejected by the server; refused here
  "EXPLAIN (ANALYZE -1) SELECT 1",
  "EXPLAIN (FORMAT JSON, ANALYZE) SELECT 1",
  "EXPLAIN (COSTS OFF, BUFFERS, ANALYZE TRUE, TIMING OFF) SELECT 1",
  "EXPLAIN (ANALYZE FALSE, ANALYZE) SELECT 1", // the last one wins
  `EXPLAIN ("analyze") SELECT 1`,
  "EXPLAIN (ANALYZE (1)) SELECT 1", // unreadable option lists are refused
  "EXPLAIN (ANALYZE",
  "select 1; explain analyze select 2",
  "/* c */ explain -- d\n analyze select 1",
  "PREPARE q AS SELECT 1; EXPLAIN ANALYZE EXECUTE q",
];

const EXPLAIN_ALLOWED = [
  "EXPLAIN SELECT 1",
  "EXPLAIN VERBOSE SELECT 1",
  "EXPLAIN (ANALYZE FALSE) SELECT 1",
  "EXPLAIN (analyze off, costs off) SELECT 1",
  "EXPLAIN (ANALYZE 0) SELECT 1",
  "EXPLAIN (ANALYZE 00) SELECT 1",
  "EXPLAIN (ANALYZE 'off') SELECT 1",
  `EXPLAIN (ANALYZE "false") SELECT 1`,
  "EXPLAIN (FORMAT JSON) SELECT 1",
  `EXPLAIN ("ANALYZE") SELECT 1`, // not the option (quoted names are not folded): the server rejects it
  "select 'explain analyze select 1'",
  "select 1 -- explain analyze",
  `select 1 as "explain analyze"`,
  "select explain from t",
  "ANALYZE notes",
];

const LOCKS = [
  "LOCK t",
  "LOCK TABLE t",
  "lock table only t nowait",
  "LOCK t IN SHARE UPDATE EXCLUSIVE MODE",
  "LOCK t IN SHARE MODE",
  "LOCK t IN SHARE ROW EXCLUSIVE MODE",
  "LOCK t IN EXCLUSIVE MODE",
  "LOCK t IN ACCESS EXCLUSIVE MODE",
  "lock table a, b.c, \"D\" * in access exclusive mode nowait",
  "Lock Table t In Share Mode",
  "LOCK t IN UNHEARD OF MODE",
  "begin; lock t; commit",
];

const LOCKS_ALLOWED = ["LOCK t IN ROW EXCLUSIVE MODE", "lock table only t in row share mode nowait", "LOCK a, b IN ACCESS SHARE MODE", "select 'lock t'", "select * from t for update", "select pg_advisory_lock(1)"];

const BODIES = [
  "DO $$ BEGIN LOCK t; END $$",
  "DO $$ BEGIN IF x THEN LOCK t IN SHARE MODE; END IF; END $$",
  "DO $$ BEGIN LOOP LOCK t; EXIT; END LOOP; END $$",
  "DO $$ DECLARE r record; BEGIN FOR r IN EXPLAIN ANALYZE SELECT 1 LOOP END LOOP; END $$",
  "CREATE FUNCTION f() RETURNS SETOF text LANGUAGE plpgsql AS $$ BEGIN RETURN QUERY EXPLAIN (ANALYZE) SELECT 1; END $$",
  "CREATE PROCEDURE p() LANGUAGE plpgsql AS 'BEGIN LOCK t; END'",
];

const RUN_TIME_SQL = [
  "DO $$ BEGIN EXECUTE 'ALTER ROLE app_user SET statement_timeout = 1'; END $$",
  "do 'begin null; end'",
  "DO LANGUAGE plpgsql $$ BEGIN END $$",
  "select 1; DO $$ BEGIN END $$",
  "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
  "create or replace function pg_temp.f() returns void language plpgsql as $$ begin execute 'lock t'; end $$",
  "CREATE PROCEDURE pg_temp.p() LANGUAGE plpgsql AS $$ BEGIN END $$",
  "/* c */ Create Or Replace Procedure p() language sql as 'select 1'",
];

const RUN_TIME_ALLOWED = [
  "INSERT INTO t VALUES (1) ON CONFLICT (id) DO NOTHING",
  "insert into t values (1) on conflict (id) do update set x = 1",
  "select 'do $$ begin end $$'",
  "select done, undo from t",
  "CALL p()",
  "SELECT f()",
  "DROP FUNCTION pg_temp.f()",
];

describe("--guard strict", () => {
  test.each(RUN_TIME_SQL)("refuses SQL built at run time: %s", (sql) => {
    const v = strict(sql);
    expect(v?.kind).toBe("strict");
    expect(v?.reason).toMatch(/^(DO blocks|CREATE (FUNCTION|PROCEDURE)) (are|is) not allowed under --guard strict/);
    expect(v?.hint).toContain("migrations");
    expect(on(sql)).toBeUndefined();
  });

  test.each(RUN_TIME_ALLOWED)("lets through %s", (sql) => {
    expect(strict(sql)).toBeUndefined();
  });

  test.each(EXPLAIN_ANALYZE)("refuses %s", (sql) => {
    const v = strict(sql);
    expect(v?.kind).toBe("strict");
    expect(v?.reason).toContain("EXPLAIN ANALYZE");
    expect(v?.hint).toContain("--guard strict");
    expect(on(sql)).toBeUndefined();
  });

  test.each(EXPLAIN_ALLOWED)("lets through %s", (sql) => {
    expect(strict(sql)).toBeUndefined();
  });

  test.each(LOCKS)("refuses %s", (sql) => {
    const v = strict(sql);
    expect(v?.kind).toBe("strict");
    expect(v?.reason).toMatch(/^LOCK in .* mode is not allowed/);
    expect(v?.hint).toContain("ROW EXCLUSIVE");
    expect(on(sql)).toBeUndefined();
  });

  test("says the mode, and that no mode is ACCESS EXCLUSIVE", () => {
    expect(strict("LOCK t IN SHARE MODE")!.reason).toContain("SHARE mode");
    expect(strict("LOCK t")!.reason).toContain("ACCESS EXCLUSIVE (the default)");
  });

  test.each(LOCKS_ALLOWED)("lets through %s", (sql) => {
    expect(strict(sql)).toBeUndefined();
  });

  test.each(BODIES)("refuses inside bodies: %s", (sql) => {
    expect(strict(sql)?.kind).toBe("strict");
    expect(on(sql)).toBeUndefined();
  });

  test("refuses what `on` refuses too", () => {
    expect(strict("SET ROLE postgres")?.kind).toBe("context");
  });
});

describe("properties", () => {
  const word = fc.constantFrom(
    "explain", "EXPLAIN", "analyze", "analyse", "verbose", "(", ")", ",", "true", "false", "off", "on", "0", "1", "'x'", '"analyze"', "-",
    "lock", "LOCK", "table", "only", "t", "*", "in", "share", "row", "exclusive", "access", "update", "mode", "nowait", ";",
    "do", "$$", "begin", "then", "loop", "else", "end", "select", "for", "r", "return", "query", "--", "\n", "/*", "*/",
    "create", "or", "replace", "function", "procedure", "f()", "undo", "on conflict",
  );
  const soup = fc.array(word, { maxLength: 16 }).map((w) => w.join(" "));

  test("arbitrary input never throws", () => {
    fc.assert(
      fc.property(fc.oneof(fc.string({ maxLength: 120 }), soup), (sql) => {
        strict(sql);
      }),
      { numRuns: 5000 },
    );
  });

  test("the byte filter never hides a statement strict refuses", () => {
    fc.assert(
      fc.property(soup, (sql) => {
        if (strict(sql)?.kind === "strict") expect(triggerWords(new TextEncoder().encode(sql)) & STRICT_WORDS).toBe(STRICT_WORDS);
      }),
      { numRuns: 5000 },
    );
  });

  test("a long body of allowed LOCKs and EXPLAINs with one refused LOCK at the end: a DO block, refused as one", () => {
    const body = `DO $$ BEGIN ${"BEGIN LOCK t IN ROW EXCLUSIVE MODE; EXPLAIN (COSTS off, VERBOSE) SELECT 1; ".repeat(2000)} LOCK t; END $$`;
    expect(strict(body)?.reason).toContain("DO blocks");
    expect(on(body)).toBeUndefined();
  });
});
