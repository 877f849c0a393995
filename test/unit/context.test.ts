/**
 * Tenant context statements and signatures (src/tenant/context.ts).
 *
 * Covers: one extended-protocol round (Parse/Bind/Execute/Sync); the SQL is
 * fixed, schema-qualified (pg_catalog.set_config), session-level, and never
 * contains the tenant, role or signature; every value travels as a bind
 * parameter; the role defaults to the one from the user name and can be
 * overridden; the key derivation, key id and HMAC signature match values
 * computed independently with openssl:
 *
 *   printf '%s' "multigres context key v1" | openssl dgst -sha256 -hmac "$SECRET"      → key
 *   printf '%s' "tenant_a/4242" | openssl dgst -sha256 -mac HMAC -macopt hexkey:$key   → signature
 *   printf "$key" | xxd -r -p | sha256sum                                               → key id (first 12)
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { Framer } from "../../src/protocol/framer.ts";
import { contextKeyId, contextMessages, deriveContextKey, signContext, signatureSetting } from "../../src/tenant/context.ts";

const dec = new TextDecoder();
const SECRET = "multigres-test-context-secret-0123456789";
const KEY_HEX = "b2df1c2d979ead3863811a05fc3b2290257babd6770daf8e374259168a31a9e1";
const SIG_TENANT_A_4242 = "fe3e115a34695a1bf2ebd4aa0242b806221d6defe7d9867f9c616fceab9199b4";
const KEY_ID = "0e042fa3e5c9";
const key = Uint8Array.from(Buffer.from(KEY_HEX, "hex"));

interface Decoded {
  types: string[];
  sql: string;
  params: string[];
}

/** Frame the bytes and decode the Parse SQL and the Bind text values. */
function decode(bytes: Uint8Array): Decoded {
  const framer = new Framer(1 << 20);
  framer.push(bytes);
  const types: string[] = [];
  let sql = "";
  const params: string[] = [];
  for (let f = framer.next(); f; f = framer.next()) {
    const t = String.fromCharCode(f.type);
    types.push(t);
    const b = f.body;
    const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    if (t === "P") {
      const nameEnd = b.indexOf(0);
      const sqlEnd = b.indexOf(0, nameEnd + 1);
      sql = dec.decode(b.subarray(nameEnd + 1, sqlEnd));
      expect(view.getInt16(sqlEnd + 1)).toBe(0); // no declared parameter types
    } else if (t === "B") {
      let at = b.indexOf(0) + 1; // portal
      at = b.indexOf(0, at) + 1; // statement
      expect(view.getInt16(at)).toBe(0); // all text
      at += 2;
      const n = view.getInt16(at);
      at += 2;
      for (let i = 0; i < n; i++) {
        const len = view.getInt32(at);
        expect(len).toBeGreaterThanOrEqual(0); // never NULL
        params.push(dec.decode(b.subarray(at + 4, at + 4 + len)));
        at += 4 + len;
      }
    }
  }
  expect(framer.buffered).toBe(0);
  return { types, sql, params };
}

/** Which bind value ($n) the SQL passes as the value of set_config(<name param or literal>, $m, false). */
function settings(d: Decoded): Map<string, string> {
  const out = new Map<string, string>();
  const value = (ref: string) => (ref.startsWith("$") ? d.params[Number(ref.slice(1)) - 1]! : ref.replace(/^'|'$/g, ""));
  for (const m of d.sql.matchAll(/pg_catalog\.set_config\((\$\d+|'[^']*'), (\$\d+), false\)/g)) {
    out.set(value(m[1]!), value(m[2]!));
  }
  return out;
}

describe("key derivation and signatures", () => {
  test("deriveContextKey is HMAC-SHA256(secret, 'multigres context key v1')", () => {
    expect(Buffer.from(deriveContextKey(SECRET)).toString("hex")).toBe(KEY_HEX);
  });

  test("contextKeyId is the first 12 hex digits of sha256(key)", () => {
    expect(contextKeyId(key)).toBe(KEY_ID);
  });

  test("signContext is HMAC-SHA256(key, '<tenant>/<pid>') in hex", () => {
    expect(signContext(key, "tenant_a", 4242)).toBe(SIG_TENANT_A_4242);
  });

  test("the signature depends on tenant, backend pid and key", () => {
    const s = signContext(key, "tenant_a", 4242);
    expect(signContext(key, "tenant_b", 4242)).not.toBe(s);
    expect(signContext(key, "tenant_a", 4243)).not.toBe(s);
    expect(signContext(deriveContextKey(SECRET + "x"), "tenant_a", 4242)).not.toBe(s);
  });

  test("the signature lives next to the tenant setting", () => {
    expect(signatureSetting("app.current_tenant_id")).toBe("app.current_tenant_id_sig");
  });
});

describe("contextMessages", () => {
  test("one Parse/Bind/Execute/Sync round setting tenant, signature and role", () => {
    const d = decode(contextMessages({ tenantSetting: "app.current_tenant_id" }, { role: "app_user", tenant: "tenant_a" }, key, 4242));
    expect(d.types).toEqual(["P", "B", "E", "S"]);
    expect(Object.fromEntries(settings(d))).toEqual({
      "app.current_tenant_id": "tenant_a",
      "app.current_tenant_id_sig": SIG_TENANT_A_4242,
      role: "app_user",
    });
  });

  test("a configured role and setting name override the defaults", () => {
    const d = decode(contextMessages({ tenantSetting: "acme.tenant", role: "tenant_reader" }, { role: "app_user", tenant: "t1" }, key, 7));
    expect(Object.fromEntries(settings(d))).toEqual({
      "acme.tenant": "t1",
      "acme.tenant_sig": signContext(key, "t1", 7),
      role: "tenant_reader",
    });
  });

  test("property: the SQL is the same whatever the values; they only travel as bind values", () => {
    const fixed = decode(contextMessages({ tenantSetting: "app.current_tenant_id" }, { role: "r", tenant: "t" }, key, 1)).sql;
    fc.assert(
      fc.property(
        fc.string({ unit: "binary", maxLength: 40 }),
        fc.string({ unit: "binary", minLength: 1, maxLength: 40 }),
        fc.integer({ min: 1, max: 0x7fffffff }),
        (tenant, role, pid) => {
          const d = decode(contextMessages({ tenantSetting: "app.current_tenant_id" }, { role, tenant }, key, pid));
          expect(d.sql).toBe(fixed);
          expect(d.params).toContain(tenant);
          expect(d.params).toContain(role);
          expect(settings(d).get("app.current_tenant_id")).toBe(tenant);
          expect(settings(d).get("role")).toBe(role);
        },
      ),
      { numRuns: 500 },
    );
  });

  test("session-level set_config (is_local = false), so the context outlives transactions", () => {
    const d = decode(contextMessages({ tenantSetting: "app.current_tenant_id" }, { role: "r", tenant: "t" }, key, 1));
    expect(d.sql).not.toMatch(/true/i);
    expect(settings(d).size).toBe(3);
  });
});
