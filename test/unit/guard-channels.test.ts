/**
 * LISTEN/NOTIFY scoping on the way in (src/guard/channels.ts) and through
 * guardMessage (src/guard/guard.ts), and the lexer's token positions it
 * relies on.
 *
 * Covers: LISTEN/UNLISTEN/NOTIFY get the quoted, prefixed name (unquoted
 * names fold ASCII only, quoted ones are kept, U&"…" with UESCAPE decoded);
 * UNLISTEN *, reserved words and "" pass untouched; 44 bytes is the longest
 * name, counted in bytes; pg_notify's first argument is wrapped in every
 * spelling (pg_catalog., "pg_notify", nested, bind parameters), and refused
 * with no argument; the same words in literals, comments and identifiers
 * are left alone; DO and function bodies, stored definitions (views,
 * rules, BEGIN ATOMIC) are refused; signatures (DROP/COMMENT/GRANT) are left
 * alone; a statement that reads differently with standard_conforming_strings
 * off is refused; Query and Parse messages are rebuilt (Parse keeps its
 * name and parameter types), bytes that are not UTF-8 are kept as they
 * were, FunctionCall of pg_notify is refused; sessions without a prefix
 * are not rewritten. Properties: arbitrary input never throws; the byte
 * filter never hides a statement the channel rules act on; wherever a
 * rewritten statement has a channel command or a pg_notify call, it is
 * scoped; channel words in comments change nothing.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { scopeChannels } from "../../src/guard/channels.ts";
import { CHANNEL_WORDS, guardMessage, triggerWords, type GuardOptions } from "../../src/guard/guard.ts";
import { lex, type Token } from "../../src/guard/lexer.ts";
import { protectedSettings } from "../../src/guard/rules.ts";

const P = "mg0123456789abcdef:";
const scope = (sql: string) => scopeChannels(sql, P);
const rewritten = (sql: string) => {
  const r = scope(sql);
  if (typeof r !== "string") throw new Error(`expected a rewrite of ${sql}, got ${JSON.stringify(r)}`);
  return r;
};
const refusal = (sql: string) => {
  const r = scope(sql);
  if (typeof r !== "object") throw new Error(`expected a refusal of ${sql}, got ${JSON.stringify(r)}`);
  return r;
};
const wrap = (arg: string) => `'${P}'::pg_catalog.text OPERATOR(pg_catalog.||) NULLIF((${arg})::pg_catalog.text, '')`;

describe("lexer positions", () => {
  test("each token's start and end, in order, for every kind of token", () => {
    const sql = `select "A""b", E'x\\'y' , $t$z$t$, $1, 1.5 -- c\n/* d */ U&"\\0061" UESCAPE '\\' ;`;
    const at: number[] = [];
    const tokens = lex(sql, false, at);
    expect(at.length).toBe(2 * tokens.length);
    const texts = tokens.map((_, k) => sql.slice(at[2 * k], at[2 * k + 1]));
    expect(texts).toEqual(["select", `"A""b"`, ",", `E'x\\'y'`, ",", "$t$z$t$", ",", "$1", ",", "1.5", `U&"\\0061"`, "UESCAPE", `'\\'`, ";"]);
  });

  test("the tokens are the same with and without positions (arbitrary input)", () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 80 }), fc.boolean(), (s, backslashes) => {
        const at: number[] = [];
        expect(lex(s, backslashes, at)).toEqual(lex(s, backslashes));
        for (let k = 0; k + 1 < at.length; k += 2) expect(at[k]! < at[k + 1]! && (k === 0 || at[k - 1]! <= at[k]!)).toBe(true);
      }),
      { numRuns: 3000 },
    );
  });
});

describe("channel commands", () => {
  test.each([
    ["LISTEN jobs", `LISTEN "${P}jobs"`],
    ["listen Jobs_Queue", `listen "${P}jobs_queue"`],
    [`LISTEN "Jobs Queue"`, `LISTEN "${P}Jobs Queue"`],
    [`LISTEN "a""b"`, `LISTEN "${P}a""b"`],
    ["LISTEN ÄBC", `LISTEN "${P}Äbc"`], // PostgreSQL folds ASCII letters only
    ["unlisten jobs", `unlisten "${P}jobs"`],
    ["NOTIFY jobs", `NOTIFY "${P}jobs"`],
    ["NOTIFY jobs, 'a payload with listen in it'", `NOTIFY "${P}jobs", 'a payload with listen in it'`],
    ["  /* c */ NOTIFY -- d\n jobs ,'x'", `  /* c */ NOTIFY -- d\n "${P}jobs" ,'x'`],
    [`LISTEN U&"d\\0061t"`, `LISTEN "${P}dat"`],
    [`LISTEN U&"d!0061t" UESCAPE '!'`, `LISTEN "${P}dat"`],
    ["LISTEN user_events", `LISTEN "${P}user_events"`],
    ["LISTEN int", `LISTEN "${P}int"`], // a column-name keyword is a name here
    ["begin; listen a; notify b; commit", `begin; listen "${P}a"; notify "${P}b"; commit`],
  ])("%s", (sql, expected) => {
    expect(rewritten(sql)).toBe(expected);
  });

  test.each(["UNLISTEN *", "LISTEN select", "LISTEN", `LISTEN ""`, "NOTIFY 'jobs'", "LISTEN $1", "select 'LISTEN jobs'", "select 1 -- LISTEN jobs", `select 1 as "listen jobs"`, "select notify from t"])(
    "%s passes untouched",
    (sql) => {
      expect(scope(sql)).toBeUndefined();
    },
  );

  test("44 bytes is the longest name; 45 is refused with the limit in the hint; bytes, not characters, count", () => {
    expect(rewritten(`LISTEN ${"x".repeat(44)}`)).toBe(`LISTEN "${P}${"x".repeat(44)}"`);
    const v = refusal(`LISTEN ${"x".repeat(45)}`);
    expect(v.reason).toContain("45 bytes");
    expect(v.hint).toContain("at most 44 bytes");
    expect(v.hint).toContain("63");
    expect(v.kind).toBe("channel");
    expect(rewritten(`LISTEN "${"é".repeat(22)}"`)).toBe(`LISTEN "${P}${"é".repeat(22)}"`);
    expect(refusal(`NOTIFY "${"é".repeat(23)}"`).reason).toContain("46 bytes");
    // A name PostgreSQL would truncate is refused too, never scoped truncated.
    expect(refusal(`LISTEN ${"x".repeat(100)}`).hint).toContain("at most 44 bytes");
  });
});

describe("pg_notify", () => {
  test.each([
    ["select pg_notify('jobs', 'x')", `select pg_notify(${wrap("'jobs'")}, 'x')`],
    ["SELECT PG_NOTIFY($1, $2)", `SELECT PG_NOTIFY(${wrap("$1")}, $2)`],
    ["select pg_catalog.pg_notify(ch, p) from t", `select pg_catalog.pg_notify(${wrap("ch")}, p) from t`],
    [`select "pg_notify"( 'a' || b , 'x')`, `select "pg_notify"( ${wrap("'a' || b")} , 'x')`],
    ["select pg_notify(f(a, b), g(c))", `select pg_notify(${wrap("f(a, b)")}, g(c))`],
    ["select pg_notify((array['a','b'])[1], 'x')", `select pg_notify(${wrap("(array['a','b'])[1]")}, 'x')`],
    ["select pg_notify(pg_notify('a', 'b')::text, 'c')", `select pg_notify(${wrap(`pg_notify(${wrap("'a'")}, 'b')::text`)}, 'c')`],
    ["with x as (select pg_notify('a', 'b')) select * from x", `with x as (select pg_notify(${wrap("'a'")}, 'b')) select * from x`],
    ["explain analyze select pg_notify('a', 'b')", `explain analyze select pg_notify(${wrap("'a'")}, 'b')`],
    ["prepare p as select pg_notify($1, 'x')", `prepare p as select pg_notify(${wrap("$1")}, 'x')`],
  ])("%s", (sql, expected) => {
    expect(rewritten(sql)).toBe(expected);
  });

  test("calls nested in each other's first arguments are each wrapped once (read in one pass)", () => {
    const depth = 3000;
    const sql = `select ${"pg_notify(".repeat(depth)}'a'${", 'p')".repeat(depth)}`;
    const r = rewritten(sql);
    expect(r.split(`'${P}'::pg_catalog.text`).length - 1).toBe(depth);
    expect(r.split(")::pg_catalog.text, '')").length - 1).toBe(depth);
    expect(r.endsWith(`'a')::pg_catalog.text, ''), 'p')${")::pg_catalog.text, ''), 'p')".repeat(depth - 1)}`)).toBe(true);
  });

  test.each(["select pg_notify()", "select pg_notify(, 'x')", "select pg_notify(", "select pg_notify((('a', 'b')"])("%s is refused: no first argument to scope", (sql) => {
    const v = refusal(sql);
    expect(v.hint).toContain("first argument");
    expect(v.kind).toBe("channel");
  });

  test.each([
    "select 'pg_notify(''a'', ''b'')'",
    "select pg_notify from t",
    `select "PG_NOTIFY"('a', 'b')`,
    "select my_pg_notify('a', 'b')",
    "drop function pg_notify(text, text)",
    "comment on function pg_notify(text, text) is 'x'",
    "grant execute on function pg_notify(text, text) to x",
    "revoke execute on function pg_notify(text, text) from x",
  ])("%s passes untouched", (sql) => {
    expect(scope(sql)).toBeUndefined();
  });
});

describe("code that runs later is refused, not rewritten", () => {
  test.each([
    "do $$ begin perform pg_notify('a', 'b'); end $$",
    "DO $$ BEGIN NOTIFY a; END $$",
    "DO LANGUAGE plpgsql $x$ BEGIN IF true THEN LISTEN a; END IF; END $x$",
    "do $$ begin loop unlisten a; end loop; end $$",
    "do 'begin perform pg_notify(''a'', ''b''); end'",
    "create function f() returns void language sql as 'select pg_notify(''a'', ''b'')'",
    "CREATE OR REPLACE PROCEDURE p() LANGUAGE plpgsql AS $$ BEGIN NOTIFY a, 'x'; END $$",
  ])("in a body: %s", (sql) => {
    expect(refusal(sql).hint).toContain("DO block or function body");
  });

  test.each([
    "create view v as select pg_notify('a', x) from t",
    "create table t (x int default pg_notify('a', 'b')::text::int)",
    "create policy p on t using (pg_notify('a', x) is null)",
    "alter table t add check (pg_notify('a', x) is null)",
    "create rule r as on insert to t do also notify foo",
    "create or replace rule r as on insert to t do instead notify foo",
    "create rule r as on insert to t do also (select 1; notify foo)",
    "create function f() returns void language sql begin atomic select 1; select pg_notify('a', 'b'); end",
    "create function f() returns void language sql begin atomic select 1; end; notify later",
  ])("in a stored definition: %s", (sql) => {
    expect(refusal(sql).hint).toContain("stored definition");
  });

  test.each([
    "do $$ begin unlisten *; end $$",
    "do $$ begin raise notice 'listen to this: pg_notify(a, b)'; end $$",
    "do $$ begin execute 'lis' || 'ten a'; end $$", // dynamic: raw channels, which no tenant receives (protocol/notification.ts)
    "create table t (notify text, listen int); listen x",
    "create function f() returns int language sql as 'select 1'; notify x",
  ])("left alone: %s", (sql) => {
    expect(typeof scope(sql)).not.toBe("object");
  });

  test("a CREATE that stores nothing channel-related leaves the next statement's channel scoped", () => {
    expect(rewritten("create temp table t (notify text); listen x")).toBe(`create temp table t (notify text); listen "${P}x"`);
  });
});

describe("both readings of '' strings", () => {
  test("a statement whose channel command depends on standard_conforming_strings is refused", () => {
    const v = refusal("select 'a\\'; listen x; --'");
    expect(v.hint).toContain("E'");
  });

  test("backslashes that read the same both ways are fine", () => {
    expect(rewritten("select E'a\\'b'; listen x")).toBe(`select E'a\\'b'; listen "${P}x"`);
    expect(rewritten("notify x, 'c:\\\\temp'")).toBe(`notify "${P}x", 'c:\\\\temp'`);
  });
});

describe("guardMessage: Query, Parse, FunctionCall", () => {
  const enc = new TextEncoder();
  const dec = new TextDecoder();
  const options: GuardOptions = { names: protectedSettings("app.current_tenant_id", "app.current_tenant_id_sig"), strict: false, channelPrefix: P };
  const message = (type: string, body: Uint8Array) => {
    const m = new Uint8Array(5 + body.length);
    m[0] = type.charCodeAt(0);
    new DataView(m.buffer).setInt32(1, 4 + body.length);
    m.set(body, 5);
    return m;
  };
  const query = (sql: string | Uint8Array) => message("Q", Uint8Array.from([...(typeof sql === "string" ? enc.encode(sql) : sql), 0]));
  const parse = (name: string, sql: string, types: number[]) => {
    const t = new Uint8Array(2 + 4 * types.length);
    const v = new DataView(t.buffer);
    v.setInt16(0, types.length);
    types.forEach((oid, k) => v.setInt32(2 + 4 * k, oid));
    return message("P", Uint8Array.from([...enc.encode(name), 0, ...enc.encode(sql), 0, ...t]));
  };
  const run = (m: Uint8Array, o = options) => guardMessage(m[0]!, m, 0, m.length, o);

  test("a Query is rebuilt with the scoped SQL; its length is right", () => {
    const r = run(query("LISTEN jobs"))!;
    expect(r.refused).toBeUndefined();
    expect(r.bytes).toEqual(query(`LISTEN "${P}jobs"`));
  });

  test("a Parse keeps its statement name and parameter types", () => {
    const r = run(parse("s1", "select pg_notify($1, $2)", [25, 0]))!;
    expect(r.bytes).toEqual(parse("s1", `select pg_notify(${wrap("$1")}, $2)`, [25, 0]));
  });

  test("bytes that are not UTF-8 (a LATIN1 client) come back as they were around the edit", () => {
    const latin1 = Uint8Array.from([...enc.encode("NOTIFY jobs, 'caf"), 0xe9, ...enc.encode("'")]);
    const r = run(query(latin1))!;
    expect(r.bytes).toEqual(query(Uint8Array.from([...enc.encode(`NOTIFY "${P}jobs", 'caf`), 0xe9, ...enc.encode("'")])));
    // and a name in such bytes is kept byte for byte
    const name = Uint8Array.from([...enc.encode("LISTEN caf"), 0xe9]);
    expect(run(query(name))!.bytes).toEqual(query(Uint8Array.from([...enc.encode(`LISTEN "${P}caf`), 0xe9, 0x22])));
  });

  test("a refusal replaces the message with one that raises 42501 and the hint", () => {
    const r = run(query("select pg_notify()"))!;
    expect(r.refused).toBe("channel");
    const text = dec.decode(r.bytes.subarray(5));
    expect(text).toContain("ERRCODE = '42501'");
    expect(text).toContain("first argument");
    const p = run(parse("s2", "LISTEN " + "x".repeat(50), [25]))!;
    expect(String.fromCharCode(p.bytes[0]!)).toBe("P");
    expect(dec.decode(p.bytes)).toContain("at most 44 bytes");
  });

  test("FunctionCall of pg_notify (OID 3036) is refused; of other functions passes", () => {
    const call = (oid: number) => {
      const b = new Uint8Array(10);
      new DataView(b.buffer).setInt32(0, oid);
      return message("F", b);
    };
    const r = run(call(3036))!;
    expect(r.refused).toBe("channel");
    expect(String.fromCharCode(r.bytes[0]!)).toBe("Q");
    expect(dec.decode(r.bytes)).toContain("in SQL");
    expect(run(call(1598))).toBeUndefined();
  });

  test("without a channel prefix nothing is scoped", () => {
    const o = { ...options, channelPrefix: undefined };
    expect(run(query("LISTEN jobs"), o)).toBeUndefined();
    expect(run(query("select pg_notify()"), o)).toBeUndefined();
  });

  test("a statement that the context rules refuse is refused as before, whatever channels it uses", () => {
    expect(run(query("LISTEN jobs; SET ROLE postgres"))!.refused).toBe("context");
  });

  test("the byte filter finds listen and notify in any case, and u& for all", () => {
    for (const s of ["LISTEN x", "unlisten *", "NoTiFy x", "select pg_notify(a, b)", `select U&"pg_n\\006ftify"(a, b)`]) {
      expect(triggerWords(enc.encode(s)) & CHANNEL_WORDS).toBe(CHANNEL_WORDS);
    }
    expect(triggerWords(enc.encode("select * from jobs where id = $1")) & CHANNEL_WORDS).toBe(0);
  });
});

describe("properties", () => {
  const word = fc.constantFrom(
    "listen", "LISTEN", "unlisten", "notify", "NOTIFY", "pg_notify", '"pg_notify"', "pg_catalog", ".", "(", ")", "[", "]", ",", ";", "*",
    "jobs", '"Jobs"', "'x'", "$1", "select", "do", "$$", "begin", "end", "atomic", "create", "alter", "rule", "view", "function", "as",
    "drop", "comment", "grant", "u&", '"\\0061"', "uescape", "'!'", "e'\\''", "'\\'", "--", "\n", "/*", "*/", "int", "all", "x".repeat(50),
  );
  const soup = fc.array(word, { maxLength: 14 }).map((w) => w.join(" "));

  test("arbitrary input never throws, and a refusal is always a channel refusal", () => {
    fc.assert(
      fc.property(fc.oneof(fc.string({ maxLength: 120 }), soup), (sql) => {
        const r = scope(sql);
        if (typeof r === "object") expect(r.kind).toBe("channel");
      }),
      { numRuns: 5000 },
    );
  });

  test("the byte filter never hides a statement the channel rules act on", () => {
    fc.assert(
      fc.property(soup, (sql) => {
        if (scope(sql) !== undefined) expect(triggerWords(new TextEncoder().encode(sql)) & CHANNEL_WORDS).toBe(CHANNEL_WORDS);
      }),
      { numRuns: 5000 },
    );
  });

  // Without the words that make code run later (refused) or name a
  // function (left alone), every channel in a rewritten statement is scoped.
  const plain = fc
    .array(fc.constantFrom("listen", "unlisten", "notify", "pg_notify", '"pg_notify"', "(", ")", ",", ";", "*", "jobs", '"Jobs"', "'x'", "$1", "select", "from", "t", "||", "1"), { maxLength: 14 })
    .map((w) => w.join(" "));

  const RESERVED_IN_SOUP = new Set(["select", "from"]);

  test("in a rewritten statement every channel command and every pg_notify call is scoped", () => {
    fc.assert(
      fc.property(plain, (sql) => {
        const r = scope(sql);
        if (typeof r !== "string") return;
        const t = lex(r);
        for (let k = 0; k < t.length; k++) {
          const prev = t[k - 1];
          const head = !prev || (prev.kind === "op" && prev.value === ";");
          const x = t[k]!;
          if (head && x.kind === "word" && ["listen", "unlisten", "notify"].includes(x.value)) {
            // What follows is a scoped name, or no name at all (*, a literal,
            // a reserved word: the server rejects those as it would have).
            const next: Token | undefined = t[k + 1];
            const unscoped = (next?.kind === "word" && !RESERVED_IN_SOUP.has(next.value)) || (next?.kind === "ident" && next.value !== "" && !next.value.startsWith(P));
            if (unscoped) throw new Error(`unscoped channel in ${r}`);
          }
          if ((x.kind === "word" || x.kind === "ident") && x.value === "pg_notify" && t[k + 1]?.value === "(") {
            expect(t[k + 2]).toEqual({ kind: "string", value: P });
          }
        }
      }),
      { numRuns: 5000 },
    );
  });

  test("channel words inside comments and literals change nothing", () => {
    fc.assert(
      fc.property(soup, (inner) => {
        const safe = inner.replace(/\*\//g, "").replace(/\\/g, "").replace(/'/g, "''");
        expect(scope(`select 1 /* ${safe} */`)).toBeUndefined();
        expect(scope(`select '${safe}'`)).toBeUndefined();
      }),
      { numRuns: 3000 },
    );
  });
});
