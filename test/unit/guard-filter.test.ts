import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { CHANNEL_WORDS, CONTEXT_WORDS, mayBeForbidden, oversizeSink, STRICT_WORDS, triggerWords } from "../../src/guard/guard.ts";
import { checkSql, protectedSettings } from "../../src/guard/rules.ts";

const names = protectedSettings("app.current_tenant_id", "app.current_tenant_id_sig");
const bytes = (s: string) => new TextEncoder().encode(s);

describe("guard byte filter", () => {
  test("lets the forbidden forms through to the rules", () => {
    for (const q of ["SET ROLE x", "reset all", "select pg_catalog.SET_CONFIG('role','x',false)", "DISCARD ALL", "alter role a set app.current_tenant_id = 'x'", `select U&"s\\0065t_config"('role', 'x', false)`, "ALTER USER a PASSWORD 'x'", "CREATE GROUP g", "drop user u"]) {
      expect(mayBeForbidden(bytes(q))).toBe(true);
    }
  });

  test("skips ordinary queries without decoding them", () => {
    for (const q of ["SELECT abalance FROM pgbench_accounts WHERE aid = $1", "insert into t values (1)", "BEGIN", "COMMIT"]) {
      expect(mayBeForbidden(bytes(q))).toBe(false);
    }
  });

  test("a window of a chunk reads exactly like the same bytes on their own", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), fc.nat(), fc.nat(), (b, x, y) => {
        const from = b.length === 0 ? 0 : x % (b.length + 1);
        const to = from + (b.length - from === 0 ? 0 : y % (b.length - from + 1));
        expect(mayBeForbidden(b, from, to)).toBe(mayBeForbidden(b.slice(from, to)));
      }),
      { numRuns: 5000 },
    );
    // the words straddling the window's edges do not count
    const q = bytes("xxSET LOCAL yy");
    expect(mayBeForbidden(q, 3, q.length)).toBe(false);
    expect(mayBeForbidden(q, 0, 4)).toBe(false);
    expect(mayBeForbidden(q, 2, 5)).toBe(true);
  });

  test("tells the groups apart: context, channel and strict words; u& is all of them", () => {
    const groups = (q: string, want?: number) => triggerWords(bytes(q), 0, q.length, want);
    expect(groups("SELECT abalance FROM pgbench_accounts WHERE aid = $1")).toBe(0);
    expect(groups("update t set x = 1")).toBe(CONTEXT_WORDS);
    expect(groups("LISTEN jobs")).toBe(CHANNEL_WORDS);
    expect(groups("select pg_notify($1, $2)")).toBe(CHANNEL_WORDS);
    expect(groups("EXPLAIN ANALYZE select 1")).toBe(STRICT_WORDS);
    expect(groups("lock t")).toBe(STRICT_WORDS);
    expect(groups("begin; lock t; notify x; set role r")).toBe(CONTEXT_WORDS | CHANNEL_WORDS | STRICT_WORDS);
    expect(groups(`select U&"\\0070g_notify"(a, b)`)).toBe(CONTEXT_WORDS | CHANNEL_WORDS | STRICT_WORDS);
    // only the groups asked for
    expect(groups("notify x; set role r", CHANNEL_WORDS)).toBe(CHANNEL_WORDS);
    expect(groups("explain select 1", CONTEXT_WORDS | CHANNEL_WORDS)).toBe(0);
  });

  test("never hides a statement the rules would refuse", () => {
    const word = fc.constantFrom("set", "SET", "reset", "role", "all", "discard", "select", "set_config", "(", "'role'", ",", "'x'", "false", ")", ";", "app.current_tenant_id", "session", "authorization", "alter", "do", "$$", "begin", "end", "u&", '"', "\\0065", "user", "USER", "group", "create", "drop", "mapping", "lower", "$1", "||", "password");
    fc.assert(
      fc.property(fc.array(word, { maxLength: 12 }), (words) => {
        const sql = words.join(" ");
        if (checkSql(sql, names)) expect(mayBeForbidden(bytes(sql))).toBe(true);
      }),
      { numRuns: 3000 },
    );
  });
});

describe("oversize sink (statements over --guard-max-statement)", () => {
  const parse = (name: string, sql: string, types: number[]) => {
    const enc = new TextEncoder();
    const t = new Uint8Array(2 + 4 * types.length);
    const v = new DataView(t.buffer);
    v.setInt16(0, types.length);
    types.forEach((oid, k) => v.setInt32(2 + 4 * k, oid));
    return Uint8Array.from([...enc.encode(name), 0, ...enc.encode(sql), 0, ...t]);
  };
  /** Name, SQL and declared parameter count of a Parse message. */
  const readParse = (m: Uint8Array) => {
    const body = m.subarray(5);
    const nameEnd = body.indexOf(0);
    const sqlEnd = body.indexOf(0, nameEnd + 1);
    const dec = new TextDecoder();
    return { type: String.fromCharCode(m[0]!), name: dec.decode(body.subarray(0, nameEnd)), sql: dec.decode(body.subarray(nameEnd + 1, sqlEnd)), count: new DataView(body.buffer, body.byteOffset + sqlEnd + 1).getInt16(0) };
  };

  test("property: a Parse fed in any pieces keeps its name and parameter count; the refusal says 54000", () => {
    fc.assert(
      fc.property(fc.stringMatching(/^[a-z0-9_]{0,20}$/), fc.string({ maxLength: 300 }).map((s) => s.replace(/\0/g, "")), fc.array(fc.integer({ min: 1, max: 5000 }), { maxLength: 40 }), fc.array(fc.integer({ min: 1, max: 50 }), { minLength: 1, maxLength: 20 }), (name, sql, types, cuts) => {
        const body = parse(name, sql, types);
        const sink = oversizeSink(0x50, body.length + 4, 1024);
        for (let at = 0, i = 0; at < body.length; i++) {
          const k = cuts[i % cuts.length]!;
          sink.feed(body.subarray(at, at + k));
          at += k;
        }
        const r = readParse(sink.end());
        expect({ type: r.type, name: r.name, count: r.count }).toEqual({ type: "P", name, count: types.length });
        expect(r.sql).toContain("ERRCODE = '54000'");
      }),
      { numRuns: 500 },
    );
  });

  test("a Query or FunctionCall becomes a Query raising 54000", () => {
    for (const type of [0x51, 0x46]) {
      const m = oversizeSink(type, 5_000_000, 1 << 20).end();
      expect(String.fromCharCode(m[0]!)).toBe("Q");
      expect(new TextDecoder().decode(m)).toContain("ERRCODE = '54000'");
    }
  });
});
