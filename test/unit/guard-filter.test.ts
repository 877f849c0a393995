import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { mayBeForbidden } from "../../src/guard/guard.ts";
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
