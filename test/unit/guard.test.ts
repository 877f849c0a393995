/**
 * The guard's lexer and rules (src/guard/lexer.ts, src/guard/rules.ts).
 *
 * Lexer: words are lowercased, quoted identifiers kept as written with ""
 * undoubled; -- and nested /* *\/ comments vanish; '' strings, E'' strings
 * (backslash escapes), dollar quotes with and without tags, U&'' / B'' / X''
 * strings are single tokens; $1 is a parameter; both readings of '' strings
 * (standard_conforming_strings on and off); statements split at top-level
 * semicolons only; arbitrary input never throws (fast-check).
 *
 * Rules: every forbidden form is refused (SET/RESET of the tenant setting,
 * its signature, role, session authorization; RESET ALL; DISCARD ALL;
 * set_config('<protected>', …) anywhere and set_config with a computed name;
 * ALTER/CREATE/DROP ROLE, USER and GROUP in every form; the
 * same inside DO blocks and function bodies; a forbidden statement after
 * others in one string, including the standard_conforming_strings = off
 * trick), case-insensitively and however the name is quoted or spelled as a
 * literal; and the false positives pass: the same words in literals,
 * comments, quoted identifiers, other settings, UPDATE … SET role, and so on.
 * Properties: text inside a literal, comment or identifier never trips the
 * guard; a forbidden statement after any literal always does.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { lex, statements, type Token } from "../../src/guard/lexer.ts";
import { checkSql, protectedSettings } from "../../src/guard/rules.ts";

const NAMES = protectedSettings("app.current_tenant_id", "app.current_tenant_id_sig");
const check = (sql: string) => checkSql(sql, NAMES);

const word = (value: string): Token => ({ kind: "word", value });
const str = (value: string): Token => ({ kind: "string", value });
const ident = (value: string): Token => ({ kind: "ident", value });
const op = (value: string): Token => ({ kind: "op", value });
const num = (value: string): Token => ({ kind: "number", value });

// ------------------------------------------------------------------- lexer

describe("lexer", () => {
  test("words are lowercased; numbers, operators and parameters are tokens", () => {
    expect(lex("SELECT Foo, 1.5e3 FROM t WHERE a = $1")).toEqual([
      word("select"),
      word("foo"),
      op(","),
      num("1.5e3"),
      word("from"),
      word("t"),
      word("where"),
      word("a"),
      op("="),
      { kind: "param", value: "$1" },
    ]);
  });

  test("a $ inside a word is part of it, not a dollar quote", () => {
    expect(lex("select a$b$c, x$$ from t")).toEqual([word("select"), word("a$b$c"), op(","), word("x$$"), word("from"), word("t")]);
  });

  test("-- comments run to the end of the line (or the input)", () => {
    expect(lex("select 1 -- reset all; set role x\n, 2 -- set role")).toEqual([word("select"), num("1"), op(","), num("2")]);
    expect(lex("-- only a comment")).toEqual([]);
  });

  test("/* */ comments vanish, and nest", () => {
    expect(lex("select /* set role x */ 1")).toEqual([word("select"), num("1")]);
    expect(lex("/* set role /* x */ */ select 1")).toEqual([word("select"), num("1")]);
    // A lexer that did not nest would see "set role postgres */ select 1" here.
    expect(lex("/* outer /* inner */ set role postgres */ select 1")).toEqual([word("select"), num("1")]);
    expect(lex("/* a /* b /* c */ d */ e */ f")).toEqual([word("f")]);
    expect(lex("select 1 /* unterminated /* set role x */")).toEqual([word("select"), num("1")]);
  });

  test("comment starters inside literals and identifiers are not comments", () => {
    expect(lex(`select '--', "/*", $$ -- $$, 1`)).toEqual([word("select"), str("--"), op(","), ident("/*"), op(","), str(" -- "), op(","), num("1")]);
  });

  test("standard '' strings: a doubled quote stands for itself, a backslash is just a backslash", () => {
    expect(lex("select 'it''s', 'a\\'")).toEqual([word("select"), str("it's"), op(","), str("a\\")]);
    expect(lex("select ''")).toEqual([word("select"), str("")]);
  });

  test("the backslash reading ('' strings with standard_conforming_strings = off)", () => {
    // Standard: 'a\'' is the string a\' … up to the next quote. Backslash: 'a\'' is a'.
    const sql = "select 'a\\'' ; SET ROLE p; --'";
    expect(lex(sql)).toEqual([word("select"), str("a\\' ; SET ROLE p; --")]);
    expect(lex(sql, true)).toEqual([word("select"), str("a'"), op(";"), word("set"), word("role"), word("p"), op(";")]);
  });

  test("quoted identifiers keep their case and undouble \"\"", () => {
    expect(lex(`select 1 as "Set ""Role""", "reset all" from "T"`)).toEqual([
      word("select"),
      num("1"),
      word("as"),
      ident('Set "Role"'),
      op(","),
      ident("reset all"),
      word("from"),
      ident("T"),
    ]);
  });

  test("E'' strings: backslash escapes, \\' and '' both stand for a quote, in both readings", () => {
    for (const reading of [false, true]) {
      expect(lex("select E'a\\'b', e'c''d', E'\\\\', E'x\\ny\\tz'", reading)).toEqual([
        word("select"),
        str("a'b"),
        op(","),
        str("c'd"),
        op(","),
        str("\\"),
        op(","),
        str("x\ny\tz"),
      ]);
    }
  });

  test("E'' strings: an escaped quote does not end the string", () => {
    expect(lex("select E'RESET ALL\\' ; SET ROLE postgres'")).toEqual([word("select"), str("RESET ALL' ; SET ROLE postgres")]);
  });

  test("E'' strings: octal, hex and unicode escapes are decoded", () => {
    expect(lex("select E'\\x41\\101\\u0041\\U00000041'")).toEqual([word("select"), str("AAAA")]);
    expect(lex("select E'\\x72ole'")).toEqual([word("select"), str("role")]);
  });

  test("dollar quotes: $$ and $tag$, tags must match exactly, anything goes inside", () => {
    expect(lex("select $$it's \"x\" -- /* $$")).toEqual([word("select"), str(`it's "x" -- /* `)]);
    expect(lex("select $tag$ a $$ b $other$ c $tag$, 1")).toEqual([word("select"), str(" a $$ b $other$ c "), op(","), num("1")]);
    expect(lex("select $A$ x $a$ y $A$")).toEqual([word("select"), str(" x $a$ y ")]);
    expect(lex("select $_1$reset all$_1$")).toEqual([word("select"), str("reset all")]);
    expect(lex("select $q$ unterminated; set role x")).toEqual([word("select"), str(" unterminated; set role x")]);
  });

  test("U&'' strings and U&\"\" identifiers are single tokens", () => {
    const tokens = lex("select U&'d\\0061t\\+000061', u&'x''y; set role p'");
    expect(tokens.map((t) => t.kind)).toEqual(["word", "string", "op", "string"]);
    expect(tokens[3]).toEqual(str("x'y; set role p"));
    expect(lex(`select 1 as U&"reset all"`)).toEqual([word("select"), num("1"), word("as"), ident("reset all")]);
    expect(lex("select U&'d!0061t' UESCAPE '!'").map((t) => t.kind)).toEqual(["word", "string", "word", "string"]);
  });

  test("B'' and X'' strings", () => {
    expect(lex("select B'1010', x'ff'")).toEqual([word("select"), str("1010"), op(","), str("ff")]);
  });

  test("unterminated literals and identifiers run to the end without throwing", () => {
    expect(lex("select 'abc")).toEqual([word("select"), str("abc")]);
    expect(lex(`select "abc`)).toEqual([word("select"), ident("abc")]);
    expect(lex("select E'abc\\")).toEqual([word("select"), str("abc\\")]);
  });

  test("statements split at top-level semicolons only", () => {
    const split = (sql: string) => statements(lex(sql)).map((s) => s.map((t) => t.value).join(" "));
    expect(split("select 1; select 2")).toEqual(["select 1", "select 2"]);
    expect(split(";; select 1 ;; ; select 2;")).toEqual(["select 1", "select 2"]);
    expect(split(`select ';', ";", $$;$$, E'\\';' /* ; */ -- ;\n; set role x`)).toEqual([`select ; , ; , ; , ';`, "set role x"]);
    expect(split("")).toEqual([]);
  });

  test("never throws, on anything", () => {
    fc.assert(
      fc.property(fc.string({ unit: "binary", maxLength: 300 }), fc.boolean(), (s, backslashes) => {
        const tokens = lex(s, backslashes);
        expect(Array.isArray(tokens)).toBe(true);
        statements(tokens);
      }),
      { numRuns: 2000 },
    );
    const alphabet = fc.constantFrom("'", '"', "$", "$$", "$a$", "/*", "*/", "--", "\n", "\\", ";", "E'", "U&'", "set", "role", " ", "x");
    fc.assert(
      fc.property(fc.array(alphabet, { maxLength: 60 }), fc.boolean(), (parts, backslashes) => {
        const sql = parts.join("");
        lex(sql, backslashes);
        check(sql);
      }),
      { numRuns: 3000 },
    );
  });
});

// ------------------------------------------------------------------- rules

/** Forbidden: must be refused. */
const FORBIDDEN: Record<string, string[]> = {
  "SET/RESET ROLE": [
    "SET ROLE postgres",
    "set role postgres",
    "SeT RoLe postgres",
    "SET LOCAL ROLE postgres",
    "SET SESSION ROLE postgres",
    "SET ROLE NONE",
    "SET role TO DEFAULT",
    "SET role = 'postgres'",
    `SET "ROLE" = 'postgres'`,
    `SET "role" TO postgres`,
    "RESET ROLE",
    "  \n\t set\nrole\npostgres",
    "/* hi */ SET ROLE postgres",
    "-- hi\nSET ROLE postgres",
  ],
  "session authorization": [
    "SET SESSION AUTHORIZATION postgres",
    "SET SESSION AUTHORIZATION DEFAULT",
    "set session authorization 'postgres'",
    "SET LOCAL SESSION AUTHORIZATION postgres",
    "SET SESSION SESSION AUTHORIZATION postgres",
    "RESET SESSION AUTHORIZATION",
    "SET session_authorization = 'postgres'",
    "RESET session_authorization",
  ],
  "the tenant setting and its signature": [
    "SET app.current_tenant_id = 'tenant_b'",
    "SET app.current_tenant_id TO 'tenant_b'",
    "SET app.current_tenant_id TO DEFAULT",
    "SET app.current_tenant_id FROM CURRENT",
    "set APP.CURRENT_TENANT_ID = tenant_b",
    `set "app"."current_tenant_id" = 'tenant_b'`,
    `SET "app".current_tenant_id = 'tenant_b'`,
    `SET "APP"."Current_Tenant_Id" = 'tenant_b'`,
    "SET app . current_tenant_id = 'tenant_b'",
    "SET app/**/./**/current_tenant_id = 'tenant_b'",
    "SET LOCAL app.current_tenant_id = 'tenant_b'",
    "SET SESSION app.current_tenant_id = 'tenant_b'",
    "RESET app.current_tenant_id",
    "SET app.current_tenant_id_sig = 'abc'",
    "RESET app.current_tenant_id_sig",
  ],
  "RESET ALL and DISCARD ALL": ["RESET ALL", "reset all", "Reset\nAll", "DISCARD ALL", "discard all"],
  "set_config('<protected>', …)": [
    "select set_config('app.current_tenant_id', 'tenant_b', false)",
    "select set_config('app.current_tenant_id', 'tenant_b', true)",
    "SELECT set_config('APP.Current_Tenant_Id', 'tenant_b', false)",
    "select set_config('app.current_tenant_id_sig', '', false)",
    "select set_config('role', 'postgres', false)",
    "SELECT pg_catalog.set_config('ROLE', 'postgres', false)",
    "select pg_catalog . set_config ( 'role' , 'postgres' , false )",
    `select "set_config"('role', 'postgres', false)`,
    `select pg_catalog."set_config"('role', 'postgres', false)`,
    "select SET_CONFIG('session_authorization', 'postgres', false)",
    "select set_config /* c */ ('role', 'postgres', false)",
    "select set_config(E'role', 'postgres', false)",
    "select set_config($$role$$, 'postgres', false)",
    "select set_config($x$app.current_tenant_id$x$, 'tenant_b', false)",
    "select set_config('role'::text, 'postgres', false)",
    "select 1, (select set_config('role', 'postgres', false))",
    "with x as (select set_config('app.current_tenant_id', 'b', false)) select * from x",
    "select * from notes where set_config('app.current_tenant_id', 'b', false) is not null",
    "PREPARE p AS SELECT set_config('app.current_tenant_id', 'tenant_b', false)",
    "PREPARE p(text) AS SELECT set_config('role', $1, false)",
  ],
  "literal names spelled with escapes": [
    "select set_config(E'\\x72ole', 'postgres', false)",
    "select set_config(E'r\\157le', 'postgres', false)",
    "select set_config(E'app.current\\x5ftenant_id', 'tenant_b', false)",
    "select set_config(U&'r\\006Fle', 'postgres', false)",
    "select set_config(U&'app.current\\005Ftenant_id', 'tenant_b', false)",
    `SET U&"r\\006Fle" = postgres`,
    `SET U&"app.current\\005Ftenant_id" = 'tenant_b'`,
  ],
  "ALTER/CREATE/DROP ROLE, USER, GROUP, in every form": [
    "ALTER ROLE app_user PASSWORD 'x'",
    "alter role current_user with password 'x'",
    "ALTER USER app_user WITH ENCRYPTED PASSWORD 'x'",
    "ALTER ROLE app_user VALID UNTIL 'infinity'",
    "ALTER ROLE app_user RENAME TO other",
    "ALTER ROLE app_user SET statement_timeout = 0",
    "ALTER ROLE app_user RESET search_path",
    "ALTER ROLE app_user SET search_path = pg_temp, public",
    "ALTER GROUP staff ADD USER app_user",
    "CREATE ROLE evil LOGIN PASSWORD 'x'",
    "create user evil",
    "CREATE GROUP evil",
    "DROP ROLE someone",
    "DROP USER IF EXISTS someone",
    "drop group g",
    "select 1; ALTER ROLE app_user PASSWORD 'x'",
    "DO $$ BEGIN ALTER ROLE app_user PASSWORD 'x'; END $$",
    "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN CREATE ROLE evil; END $$",
  ],
  "set_config whose name is not one string literal": [
    "select set_config(lower('ROLE'), 'none', false)",
    "select set_config(lower('APP.CURRENT_TENANT_ID_SIG'), '', false)",
    "select set_config($1, $2, false)",
    "select set_config('app.' || 'current_tenant_id', 'b', false)",
    "select set_config((select 'role'), 'x', false)",
    "select set_config(name, setting, false) from pg_settings",
    "select set_config(concat('ro', 'le'), 'x', false)",
    "select set_config(",
  ],
  "lexer edges found in review (each once reached the server)": [
    "SELECT '\\', E''\n'\\' ', '\\'; SET ROLE NONE; --",
    "SELECT 'x'\n  -- a comment between\n'y'; SET ROLE NONE",
    `SELECT $${"a".repeat(300)}$ ' $${"a".repeat(300)}$; SET ROLE NONE; SELECT ' '`,
    `DO $${"a".repeat(300)}$ BEGIN SET ROLE NONE; END $${"a".repeat(300)}$`,
    `SET U&"r!006Fle" /**/ UESCAPE '!' TO NONE`,
    `SET U&"r!006Fle"${" ".repeat(70)}UESCAPE '!' TO NONE`,
    `SET app.U&"current!005Ftenant!005Fid" /* x */ UESCAPE '!' = 'tenant_b'`,
    "CREATE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql SET role = 'none' AS 'select 1'",
    "ALTER FUNCTION pg_temp.f() SET session_authorization = 'app_user'",
    "ALTER PROCEDURE p() SET client_encoding = 'SJIS'",
  ],
  "client encodings the guard cannot read": [
    "SET client_encoding = 'SJIS\u212A'",
    "select set_config('client_encoding', 'S-J-I-S', false)",
    "SET client_encoding TO 'SJIS'",
    "set client_encoding = sjis",
    "SET NAMES 'BIG5'",
    "SET SESSION client_encoding TO 'gbk'",
    "set client_encoding to 'Shift_JIS'",
    "SET client_encoding = 'WIN932'",
    "select set_config('client_encoding', 'GB18030', false)",
    "select set_config('client_encoding', $1, false)",
    "DO $$ BEGIN SET client_encoding = 'UHC'; END $$",
  ],
  "comments end at \\r as well as \\n": [
    "SELECT 1; -- x\rALTER ROLE app_user SET work_mem = '88kB'",
    "-- x\rSET ROLE postgres",
    "SELECT 1; -- x\rRESET ALL",
  ],
  "ALTER ROLE … SET/RESET": [
    "ALTER ROLE app_user SET app.current_tenant_id = 'tenant_b'",
    "ALTER ROLE app_user SET app.current_tenant_id TO 'tenant_b'",
    "alter user app_user set role = 'postgres'",
    "ALTER ROLE app_user IN DATABASE d SET app.current_tenant_id = 'tenant_b'",
    "ALTER ROLE CURRENT_USER SET app.current_tenant_id_sig = ''",
    "ALTER ROLE ALL SET role TO postgres",
    `ALTER ROLE "app_user" SET "app"."current_tenant_id" = 'tenant_b'`,
    "ALTER ROLE app_user RESET app.current_tenant_id",
    "ALTER ROLE app_user RESET ALL",
    "ALTER ROLE app_user SET session_authorization = 'postgres'",
  ],
  "several statements in one string": [
    "select 1; SET ROLE postgres",
    "select 1;SET ROLE postgres;select 2",
    "select 1; set app.current_tenant_id = 'tenant_b'; select * from notes",
    "select 1 /* ; */; -- x\n RESET ALL",
    "select '--'; /* ; */ reset all",
    `select ';', ";", $$;$$; discard all`,
    // standard_conforming_strings = off: the server reads 'a\'' as a' and the SET as a statement.
    "select 'a\\'' ; SET ROLE p; --'",
  ],
  "DO blocks": [
    "DO $$ BEGIN PERFORM set_config('app.current_tenant_id', 'tenant_b', false); END $$",
    "DO $$ BEGIN PERFORM set_config('role', 'postgres', false); END $$",
    "DO $$ BEGIN PERFORM 1; SET ROLE postgres; END $$",
    "DO $$ BEGIN PERFORM 1; RESET ALL; END $$",
    "DO $do$ BEGIN PERFORM 1; set app.current_tenant_id = 'tenant_b'; END $do$",
    "do language plpgsql $f$ begin perform set_config('role', 'x', false); end $f$",
    "do 'begin perform set_config(''role'', ''x'', false); end'",
    "DO E'BEGIN PERFORM set_config(\\'role\\', \\'x\\', false); END'",
    "select 1; DO $$ BEGIN PERFORM set_config('role', 'x', false); END $$",
  ],
  "a statement at the start of a PL/pgSQL block": [
    "DO $$ BEGIN SET ROLE postgres; END $$",
    "DO $$ BEGIN SET app.current_tenant_id = 'tenant_b'; END $$",
    "DO $$ BEGIN RESET ALL; END $$",
    "DO $$ DECLARE x int; BEGIN SET ROLE postgres; END $$",
    "DO $$ BEGIN IF true THEN SET ROLE postgres; END IF; END $$",
    "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$ BEGIN SET app.current_tenant_id = 'tenant_b'; END $$",
  ],
  "function and procedure bodies": [
    "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'SET ROLE postgres'",
    "CREATE OR REPLACE FUNCTION pg_temp.f() RETURNS text LANGUAGE sql AS $$ SELECT set_config('app.current_tenant_id', 'x', false) $$",
    "create function f() returns void as $body$ begin perform set_config('role', 'x', false); end $body$ language plpgsql",
    "CREATE PROCEDURE p() LANGUAGE sql AS $$ RESET ALL $$",
    "CREATE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN PERFORM 1; DISCARD ALL; END $$",
  ],
};

/** False positives: must pass. */
const ALLOWED: Record<string, string[]> = {
  "string literals": [
    "select 'SET ROLE postgres'",
    "select 'reset all'",
    "select 'set_config(''role'', ''x'', false)'",
    "select E'SET ROLE postgres'",
    "select E'RESET ALL\\' ; SET ROLE postgres'",
    "select e'\\\\'",
    "select $$SET ROLE postgres$$",
    "select $t$ reset all; set app.current_tenant_id = 'x'; discard all $t$",
    "select U&'SET ROLE postgres'",
    "select 'a\\'' ; select 1; --'",
    "insert into notes (tenant_id, body) values ('tenant_a', 'please SET ROLE postgres; RESET ALL')",
    "COMMENT ON TABLE notes IS 'set role postgres'",
  ],
  comments: [
    "select 1 -- reset all",
    "-- set role postgres\nselect 1",
    "/* set role /* x */ */ select 1",
    "/* outer /* inner */ set role postgres */ select 1",
    "select 1 /* ; discard all */",
    "select 1; -- ; set role postgres",
  ],
  "quoted identifiers": [
    `select 1 as "reset all"`,
    `select 1 as "set role"`,
    `select * from "set role"`,
    `create table s."set role" ("reset all" int, "set app.current_tenant_id" text)`,
    `select "set_config"`,
    `select 1 as U&"discard all"`,
  ],
  "other settings": [
    "select set_config('application_name', 'x', false)",
    "select set_config('app.other', 'x', false)",
    "select set_config('app.current_tenant', 'x', false)",
    "select set_config('app.current_tenant_id_other', 'x', false)",
    "SET app.current_tenant_id_other = 'x'",
    "SET statement_timeout = '5s'",
    "SET search_path TO public",
    "SET search_path TO \"role\", public",
    "SET LOCAL statement_timeout = 0",
    "SET SESSION statement_timeout = 0",
    "SET application_name = 'set role postgres'",
    "SET application_name = 'app.current_tenant_id'",
    "SET TIME ZONE 'UTC'",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "RESET statement_timeout",
    "RESET search_path",
    "select set_config('app.other', $1, false)",
    "select set_config('search_path', $1 || ', public', true)",
  ],
  "functions with harmless SET clauses": [
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql SET search_path = pg_catalog AS 'select 1'",
    "ALTER FUNCTION f() SET work_mem = '64MB'",
    "ALTER FUNCTION f() SET SCHEMA other",
    "ALTER FUNCTION f() RESET ALL",
  ],
  "readable client encodings": [
    "SET client_encoding TO 'UTF8'",
    "SET NAMES 'LATIN1'",
    "set client_encoding = default",
    "RESET client_encoding",
    "select set_config('client_encoding', 'EUC_JP', false)",
  ],
  "foreign-data user mappings and tables named like roles": [
    "CREATE USER MAPPING FOR app_user SERVER s OPTIONS (user 'x')",
    "ALTER USER MAPPING FOR app_user SERVER s OPTIONS (SET password 'y')",
    "DROP USER MAPPING IF EXISTS FOR app_user SERVER s",
    "SELECT * FROM users WHERE role = 'admin'",
    "select u.user_id, g.group_id from users u join groups g using (id)",
    "CREATE TABLE roles (id int)",
    "DROP TABLE user_groups",
  ],
  "reading is fine": [
    "SHOW role",
    "SHOW app.current_tenant_id",
    "SHOW ALL",
    "select current_setting('role')",
    "select current_setting('app.current_tenant_id'), current_setting('app.current_tenant_id_sig')",
    "select current_tenant_id()",
  ],
  "other statements with the same words": [
    "DISCARD PLANS",
    "DISCARD TEMP",
    "DISCARD SEQUENCES",
    "UPDATE members SET role = 'admin'",
    "update members set role = 'admin', app = 'x' where id = 1",
    "INSERT INTO members (id, role) VALUES (1, 'x') ON CONFLICT (id) DO UPDATE SET role = excluded.role",
    "ALTER TABLE members ALTER COLUMN role SET DEFAULT 'member'",
    "ALTER TABLE members RENAME COLUMN role TO kind",
    "select role from members",
    "select 1 as set_config",
    "select set_config",
    "DO $$ BEGIN RAISE NOTICE 'SET ROLE postgres'; END $$",
    "DO $$ BEGIN RAISE NOTICE 'reset all'; END $$",
    "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT 'RESET ALL' $$",
    "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS $$ SELECT current_setting('role') $$",
    "CREATE TABLE t (role text, reset int, discard boolean)",
    "",
    "   ",
    ";",
  ],
};

describe("rules: forbidden statements are refused", () => {
  for (const [group, cases] of Object.entries(FORBIDDEN)) {
    describe(group, () => {
      for (const sql of cases) {
        test(JSON.stringify(sql), () => {
          const verdict = check(sql);
          expect(verdict).toBeDefined();
          expect(verdict!.reason.length).toBeGreaterThan(0);
          expect(verdict!.statement.length).toBeGreaterThan(0);
        });
      }
    });
  }
});

describe("rules: false positives pass", () => {
  for (const [group, cases] of Object.entries(ALLOWED)) {
    describe(group, () => {
      for (const sql of cases) {
        test(JSON.stringify(sql), () => {
          expect(check(sql)).toBeUndefined();
        });
      }
    });
  }
});

describe("rules: verdicts", () => {
  test("say what was refused and why", () => {
    expect(check("SET ROLE postgres")).toMatchObject({ statement: "SET ROLE POSTGRES", reason: expect.stringContaining("role"), kind: "context" });
    expect(check("RESET ALL")!.reason).toContain("RESET ALL");
    expect(check("DISCARD ALL")!.reason).toContain("DISCARD ALL");
    expect(check("SET SESSION AUTHORIZATION postgres")!.reason).toContain("session user");
    expect(check("SET app.current_tenant_id = 'b'")!.reason).toContain("app.current_tenant_id");
    // Literal values are not echoed into the message.
    expect(check("select set_config('role', 'secret-value', false)")!.statement).not.toContain("secret-value");
  });

  test("the protected names follow the configured tenant setting", () => {
    const names = protectedSettings("myapp.tenant", "myapp.tenant_sig");
    expect(names).toEqual(["myapp.tenant", "myapp.tenant_sig", "role", "session_authorization"]);
    expect(checkSql("SET myapp.tenant = 'b'", names)).toBeDefined();
    expect(checkSql("select set_config('MYAPP.TENANT_SIG', '', false)", names)).toBeDefined();
    expect(checkSql("SET ROLE postgres", names)).toBeDefined();
    expect(checkSql("SET app.current_tenant_id = 'b'", names)).toBeUndefined();
  });
});

describe("rules: properties", () => {
  const text = fc.string({ unit: "grapheme", maxLength: 80 });
  const FORBIDDEN_TAILS = ["SET ROLE postgres", "RESET ALL", "DISCARD ALL", "set app.current_tenant_id = 'b'", "select set_config('role', 'x', false)"];

  test("any text inside a standard string without backslashes passes", () => {
    fc.assert(
      fc.property(text, (s) => {
        const body = s.replace(/\\/g, "");
        expect(check(`select '${body.replace(/'/g, "''")}'`)).toBeUndefined();
      }),
      { numRuns: 1000 },
    );
  });

  test("any text inside an E'' string passes", () => {
    fc.assert(
      fc.property(text, (s) => {
        expect(check(`select E'${s.replace(/\\/g, "\\\\").replace(/'/g, "\\'")}'`)).toBeUndefined();
      }),
      { numRuns: 1000 },
    );
  });

  test("any text inside a dollar quote whose tag it does not contain passes", () => {
    fc.assert(
      fc.property(text, (s) => {
        fc.pre(!s.includes("$q$"));
        expect(check(`select $q$${s}$q$`)).toBeUndefined();
      }),
      { numRuns: 1000 },
    );
  });

  test("any text inside a block comment, a line comment or a quoted identifier passes", () => {
    fc.assert(
      fc.property(text, (s) => {
        fc.pre(!s.includes("/*") && !s.includes("*/"));
        expect(check(`/* ${s} */ select 1`)).toBeUndefined();
        expect(check(`select 1 -- ${s.replace(/[\n\r]/g, " ")}`)).toBeUndefined();
        expect(check(`select 1 as "${s.replace(/"/g, '""')}"`)).toBeUndefined();
      }),
      { numRuns: 1000 },
    );
  });

  test("a forbidden statement after any string literal is refused, however the literal is spelled", () => {
    fc.assert(
      fc.property(text, fc.constantFrom(...FORBIDDEN_TAILS), (s, tail) => {
        expect(check(`select '${s.replace(/'/g, "''")}'; ${tail}`)).toBeDefined();
        expect(check(`select E'${s.replace(/\\/g, "\\\\").replace(/'/g, "\\'")}'; ${tail}`)).toBeDefined();
        expect(check(`select '${s.replace(/'/g, "''")}' /* x */ ; -- y\n ${tail}`)).toBeDefined();
      }),
      { numRuns: 1000 },
    );
  });
});
