/**
 * Tenant context statements and signatures (src/tenant/context.ts).
 *
 * Covers: the binding round (Parse/Bind/Execute/Sync, the role as a bind
 * parameter) and the context round (set_config ×3 and context_status under
 * one Sync); the SQL is fixed, schema-qualified (pg_catalog.set_config),
 * session-level, and never contains the tenant, role or signature; every
 * value travels as a bind parameter; the role defaults to the one from the
 * user name and can be overridden; the key derivation, key id and HMAC
 * signature match values computed independently with openssl:
 *
 *   printf '%s' "multigres context key v1" | openssl dgst -sha256 -hmac "$SECRET"      → key
 *   printf '%s' "tenant_a/4242/1764480000123456" | openssl dgst -sha256 -mac HMAC -macopt hexkey:$key → signature
 *   printf "$key" | xxd -r -p | sha256sum                                               → key id (first 12)
 *   printf '%s' "multigres notify channel" | openssl dgst -sha256 -mac HMAC -macopt hexkey:$key → subkey
 *   printf '%s' "tenant_a" | openssl dgst -sha256 -mac HMAC -macopt hexkey:$subkey          → channel prefix (first 16)
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { Framer } from "../../src/protocol/framer.ts";
import {
  bindingQuery,
  channelPrefix,
  contextKeyId,
  contextQuery,
  deriveContextKey,
  readBinding,
  readStatus,
  signContext,
  signatureSetting,
} from "../../src/tenant/context.ts";

const dec = new TextDecoder();
const SECRET = "multigres-test-context-secret-0123456789";
const KEY_HEX = "b2df1c2d979ead3863811a05fc3b2290257babd6770daf8e374259168a31a9e1";
const BINDING = "4242/1764480000123456";
const SIG_TENANT_A = "98913b2d6775a562046a4383c3f3011f3deeaf2d492f11c02efcb5ae2b100948";
const KEY_ID = "0e042fa3e5c9";
const key = Uint8Array.from(Buffer.from(KEY_HEX, "hex"));

interface Decoded {
  types: string[];
  /** The SQL of the first Parse (the set_config statement). */
  sql: string;
  /** Every Parse's SQL, in order. */
  statements: string[];
  /** The first Bind's values. */
  params: string[];
  /** Every Bind's values, in order. */
  binds: string[][];
}

/** Frame the bytes and decode the Parse SQL and the Bind text values. */
function decode(bytes: Uint8Array): Decoded {
  const framer = new Framer(1 << 20);
  framer.push(bytes);
  const types: string[] = [];
  const statements: string[] = [];
  const binds: string[][] = [];
  for (let f = framer.next(); f; f = framer.next()) {
    const t = String.fromCharCode(f.type);
    types.push(t);
    const b = f.body;
    const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    if (t === "P") {
      const nameEnd = b.indexOf(0);
      const sqlEnd = b.indexOf(0, nameEnd + 1);
      statements.push(dec.decode(b.subarray(nameEnd + 1, sqlEnd)));
      expect(view.getInt16(sqlEnd + 1)).toBe(0); // no declared parameter types
    } else if (t === "B") {
      let at = b.indexOf(0) + 1; // portal
      at = b.indexOf(0, at) + 1; // statement
      expect(view.getInt16(at)).toBe(0); // all text
      at += 2;
      const n = view.getInt16(at);
      at += 2;
      const params: string[] = [];
      for (let i = 0; i < n; i++) {
        const len = view.getInt32(at);
        expect(len).toBeGreaterThanOrEqual(0); // never NULL
        params.push(dec.decode(b.subarray(at + 4, at + 4 + len)));
        at += 4 + len;
      }
      binds.push(params);
    }
  }
  expect(framer.buffered).toBe(0);
  return { types, sql: statements[0] ?? "", statements, params: binds[0] ?? [], binds };
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

  test("signContext is HMAC-SHA256(key, '<tenant>/<pid>/<backend start µs>') in hex", () => {
    expect(signContext(key, "tenant_a", BINDING)).toBe(SIG_TENANT_A);
  });

  test("the signature depends on tenant, backend pid, backend start and key", () => {
    const s = signContext(key, "tenant_a", BINDING);
    expect(signContext(key, "tenant_b", BINDING)).not.toBe(s);
    expect(signContext(key, "tenant_a", "4243/1764480000123456")).not.toBe(s);
    // the same pid in a later backend
    expect(signContext(key, "tenant_a", "4242/1764480000123457")).not.toBe(s);
    expect(signContext(deriveContextKey(SECRET + "x"), "tenant_a", BINDING)).not.toBe(s);
  });

  test("the signature lives next to the tenant setting", () => {
    expect(signatureSetting("app.current_tenant_id")).toBe("app.current_tenant_id_sig");
  });
});

describe("channel prefix (LISTEN/NOTIFY scoping)", () => {
  test("is mg + 16 hex of HMAC-SHA256(HMAC-SHA256(key, 'multigres notify channel'), tenant) + ':'", () => {
    expect(channelPrefix(key, "tenant_a")).toBe("mg42870a78a8b4477a:");
  });

  test("depends on the tenant and the key, always 19 bytes of [0-9a-g:m]", () => {
    const p = channelPrefix(key, "tenant_a");
    expect(channelPrefix(key, "tenant_b")).not.toBe(p);
    expect(channelPrefix(deriveContextKey(SECRET + "x"), "tenant_a")).not.toBe(p);
    fc.assert(
      fc.property(fc.string({ minLength: 1, maxLength: 63 }), (tenant) => {
        expect(channelPrefix(key, tenant)).toMatch(/^mg[0-9a-f]{16}:$/);
      }),
    );
  });
});

describe("the binding round", () => {
  test("one Parse/Bind/Execute/Sync with the role as the only bind value", () => {
    const d = decode(bindingQuery("app_user"));
    expect(d.types).toEqual(["P", "B", "E", "S"]);
    expect(d.sql).toContain("multigres.backend_binding()");
    expect(d.sql).not.toContain("app_user");
    expect(d.params).toEqual(["app_user"]);
  });

  test("readBinding: pid, binding, and whether RLS could be bypassed ('f' is the only no)", () => {
    expect(readBinding(["4242", BINDING, "f"])).toEqual({ pid: 4242, binding: BINDING, canBypassRls: false });
    expect(readBinding(["4242", BINDING, "t"]).canBypassRls).toBe(true);
    expect(readBinding(["4242", BINDING, null]).canBypassRls).toBe(true);
    for (const bad of [[null, BINDING, "f"], ["1", null, "f"], ["1", "4242", "f"], ["1", "x/1", "f"]]) expect(() => readBinding(bad)).toThrow();
  });
});

describe("the context round", () => {
  const rules = { tenantSetting: "app.current_tenant_id" };

  test("set_config ×3 then context_status(key id), both under one Sync", () => {
    const d = decode(contextQuery(rules, { role: "app_user", tenant: "tenant_a" }, key, BINDING));
    expect(d.types).toEqual(["P", "B", "E", "P", "B", "E", "S"]);
    expect(Object.fromEntries(settings(d))).toEqual({
      "app.current_tenant_id": "tenant_a",
      "app.current_tenant_id_sig": SIG_TENANT_A,
      role: "app_user",
    });
    expect(d.statements[1]).toBe("SELECT multigres.context_status($1)");
    expect(d.binds[1]).toEqual([KEY_ID]);
  });

  test("a configured role and setting name override the defaults", () => {
    const d = decode(contextQuery({ tenantSetting: "acme.tenant", role: "tenant_reader" }, { role: "app_user", tenant: "t1" }, key, "7/1"));
    expect(Object.fromEntries(settings(d))).toEqual({
      "acme.tenant": "t1",
      "acme.tenant_sig": signContext(key, "t1", "7/1"),
      role: "tenant_reader",
    });
  });

  test("property: the SQL is the same whatever the values; they only travel as bind values", () => {
    const fixed = decode(contextQuery(rules, { role: "r", tenant: "t" }, key, "1/1")).statements;
    fc.assert(
      fc.property(
        fc.string({ unit: "binary", maxLength: 40 }),
        fc.string({ unit: "binary", minLength: 1, maxLength: 40 }),
        fc.integer({ min: 1, max: 0x7fffffff }),
        (tenant, role, pid) => {
          const d = decode(contextQuery(rules, { role, tenant }, key, `${pid}/1`));
          expect(d.statements).toEqual(fixed);
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
    const d = decode(contextQuery(rules, { role: "r", tenant: "t" }, key, "1/1"));
    expect(d.sql).not.toMatch(/true/i);
    expect(settings(d).size).toBe(3);
  });

  test("readStatus accepts the four answers of context_status() and nothing else", () => {
    for (const s of ["ok", "no key", "no context", "invalid signature"] as const) expect(readStatus([s])).toBe(s);
    for (const bad of [[null], ["OK"], [""], []]) expect(() => readStatus(bad)).toThrow();
  });
});
