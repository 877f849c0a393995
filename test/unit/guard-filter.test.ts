import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { mayBeForbidden } from "../../src/guard/guard.ts";
import { checkSql, protectedSettings } from "../../src/guard/rules.ts";

const names = protectedSettings("app.current_tenant_id", "app.current_tenant_id_sig");
const bytes = (s: string) => new TextEncoder().encode(s);

describe("guard byte filter", () => {
  test("lets the forbidden forms through to the rules", () => {
    for (const q of ["SET ROLE x", "reset all", "select pg_catalog.SET_CONFIG('role','x',false)", "DISCARD ALL", "alter role a set app.current_tenant_id = 'x'", `select U&"s\\0065t_config"('role', 'x', false)`]) {
      expect(mayBeForbidden(bytes(q))).toBe(true);
    }
  });

  test("skips ordinary queries without decoding them", () => {
    for (const q of ["SELECT abalance FROM pgbench_accounts WHERE aid = $1", "insert into t values (1)", "BEGIN", "COMMIT"]) {
      expect(mayBeForbidden(bytes(q))).toBe(false);
    }
  });

  test("never hides a statement the rules would refuse", () => {
    const word = fc.constantFrom("set", "SET", "reset", "role", "all", "discard", "select", "set_config", "(", "'role'", ",", "'x'", "false", ")", ";", "app.current_tenant_id", "session", "authorization", "alter", "do", "$$", "begin", "end", "u&", '"', "\\0065");
    fc.assert(
      fc.property(fc.array(word, { maxLength: 12 }), (words) => {
        const sql = words.join(" ");
        if (checkSql(sql, names)) expect(mayBeForbidden(bytes(sql))).toBe(true);
      }),
      { numRuns: 3000 },
    );
  });
});
