/**
 * Message codecs (src/protocol/messages.ts), checked byte for byte against
 * the PostgreSQL protocol documentation and against each other.
 *
 * Covers: ErrorResponse ↔ readErrorFields round trip (property), the exact
 * wire layout of each serializer, readAuthRequest / readBackendKeyData /
 * readPassword, NegotiateProtocolVersion, the extended-query round (framed
 * back into Parse/Bind/Execute/Sync with the parameters as bind values),
 * and concat.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { Framer } from "../../src/protocol/framer.ts";
import {
  AUTH,
  MSG,
  authenticationRequest,
  authenticationSASL,
  backendKeyData,
  concat,
  errorResponse,
  extendedQuery,
  negotiateProtocolVersion,
  passwordMessage,
  readAuthRequest,
  readBackendKeyData,
  readErrorFields,
  readPassword,
  type ErrorFields,
} from "../../src/protocol/messages.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

/** Split a buffer of typed messages into frames (copied). */
function frames(bytes: Uint8Array): { type: string; body: Uint8Array }[] {
  const f = new Framer(1 << 24);
  f.push(bytes);
  const out: { type: string; body: Uint8Array }[] = [];
  for (let m = f.next(); m; m = f.next()) out.push({ type: String.fromCharCode(m.type), body: m.body.slice() });
  expect(f.buffered).toBe(0);
  return out;
}
function one(bytes: Uint8Array): { type: string; body: Uint8Array } {
  const all = frames(bytes);
  expect(all.length).toBe(1);
  return all[0]!;
}
const i32 = (b: Uint8Array, at: number) => new DataView(b.buffer, b.byteOffset, b.byteLength).getInt32(at);
const i16 = (b: Uint8Array, at: number) => new DataView(b.buffer, b.byteOffset, b.byteLength).getInt16(at);

/** Reads NUL-terminated strings until the end of the buffer. */
function cstrings(b: Uint8Array): string[] {
  const out: string[] = [];
  let at = 0;
  while (at < b.length) {
    const nul = b.indexOf(0, at);
    expect(nul).toBeGreaterThanOrEqual(0);
    out.push(dec.decode(b.subarray(at, nul)));
    at = nul + 1;
  }
  return out;
}

const cstring = (min = 0) => fc.string({ unit: "binary", minLength: min, maxLength: 40 }).filter((s) => !s.includes("\0"));

describe("ErrorResponse", () => {
  test("layout: 'E', length, S V C M fields, terminator", () => {
    const bytes = errorResponse({ severity: "FATAL", code: "08P01", message: "bad" });
    expect(bytes[0]).toBe(0x45);
    expect(i32(bytes, 1)).toBe(bytes.length - 1);
    expect(dec.decode(bytes.subarray(5))).toBe("SFATAL\0VFATAL\0C08P01\0Mbad\0\0");
  });

  test("detail and hint are included when given", () => {
    const { body } = one(errorResponse({ severity: "ERROR", code: "28000", message: "m", detail: "d", hint: "h" }));
    const f = readErrorFields(body);
    expect(Object.fromEntries(f)).toEqual({ S: "ERROR", V: "ERROR", C: "28000", M: "m", D: "d", H: "h" });
  });

  test("round trip through readErrorFields for arbitrary text", () => {
    fc.assert(
      fc.property(
        fc.constantFrom<ErrorFields["severity"]>("ERROR", "FATAL"),
        fc.stringMatching(/^[0-9A-Z]{5}$/),
        cstring(),
        fc.option(cstring(1), { nil: undefined }),
        fc.option(cstring(1), { nil: undefined }),
        (severity, code, message, detail, hint) => {
          const fields: ErrorFields = { severity, code, message, detail, hint };
          const { type, body } = one(errorResponse(fields));
          expect(type).toBe("E");
          const expected: Record<string, string> = { S: severity, V: severity, C: code, M: message };
          if (detail) expected.D = detail;
          if (hint) expected.H = hint;
          expect(Object.fromEntries(readErrorFields(body))).toEqual(expected);
        },
      ),
      { numRuns: 1000 },
    );
  });

  test("readErrorFields reads a server-style ErrorResponse with many fields", () => {
    // As PostgreSQL 15 sends it for a failed login.
    const raw = "SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"x\"\0Fauth.c\0L335\0Rauth_failed\0\0";
    const f = readErrorFields(enc.encode(raw));
    expect(f.get("C")).toBe("28P01");
    expect(f.get("M")).toBe('password authentication failed for user "x"');
    expect(f.get("L")).toBe("335");
    expect(f.size).toBe(7);
  });

  test("readErrorFields never throws on arbitrary bytes", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (b) => {
        expect(readErrorFields(b)).toBeInstanceOf(Map);
      }),
      { numRuns: 2000 },
    );
  });

  test("readErrorFields stops at an unterminated field", () => {
    const f = readErrorFields(enc.encode("C08P01\0Mno end"));
    expect(Object.fromEntries(f)).toEqual({ C: "08P01" });
  });
});

describe("authentication", () => {
  test("authenticationRequest: 'R', length 8, code", () => {
    for (const code of Object.values(AUTH).filter((c) => c !== AUTH.md5Password && c !== AUTH.sasl)) {
      const bytes = authenticationRequest(code);
      expect([...bytes]).toEqual([0x52, 0, 0, 0, 8, 0, 0, 0, code]);
      expect(readAuthRequest(one(bytes).body)).toEqual({ code });
    }
  });

  test("authenticationSASL lists mechanisms and round-trips", () => {
    const bytes = authenticationSASL(["SCRAM-SHA-256"]);
    const { type, body } = one(bytes);
    expect(type).toBe("R");
    expect(i32(body, 0)).toBe(AUTH.sasl);
    expect(dec.decode(body.subarray(4))).toBe("SCRAM-SHA-256\0\0");
    expect(readAuthRequest(body)).toEqual({ code: AUTH.sasl, mechanisms: ["SCRAM-SHA-256"] });
    fc.assert(
      fc.property(fc.array(cstring(1), { maxLength: 5 }), (mechs) => {
        expect(readAuthRequest(one(authenticationSASL(mechs)).body)).toEqual({ code: AUTH.sasl, mechanisms: mechs });
      }),
    );
  });

  test("readAuthRequest: MD5 carries its 4-byte salt", () => {
    const body = Uint8Array.of(0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef);
    const req = readAuthRequest(body);
    expect(req).toEqual({ code: AUTH.md5Password, salt: Uint8Array.of(0xde, 0xad, 0xbe, 0xef) });
  });

  test("readAuthRequest: truncated messages throw a plain error", () => {
    expect(() => readAuthRequest(Uint8Array.of(0, 0))).toThrow(/truncated/);
    expect(() => readAuthRequest(Uint8Array.of(0, 0, 0, 5, 1))).toThrow(/truncated/);
  });

  test("SASL continue/final codes are recognised", () => {
    expect(readAuthRequest(Uint8Array.of(0, 0, 0, 11, ...enc.encode("r=abc")))).toEqual({ code: AUTH.saslContinue });
    expect(readAuthRequest(Uint8Array.of(0, 0, 0, 12, ...enc.encode("v=xyz")))).toEqual({ code: AUTH.saslFinal });
  });

  test("passwordMessage ↔ readPassword", () => {
    const bytes = passwordMessage("s3cret");
    expect(dec.decode(bytes)).toBe("p\0\0\0\x0bs3cret\0");
    fc.assert(
      fc.property(cstring(), (pw) => {
        const { type, body } = one(passwordMessage(pw));
        expect(type).toBe("p");
        expect(readPassword(body)).toBe(pw);
      }),
      { numRuns: 500 },
    );
  });

  test("readPassword without a terminator reads to the end", () => {
    expect(readPassword(enc.encode("abc"))).toBe("abc");
  });
});

describe("BackendKeyData", () => {
  test("layout and round trip", () => {
    expect([...backendKeyData({ processId: 1, secretKey: -1 })]).toEqual([0x4b, 0, 0, 0, 12, 0, 0, 0, 1, 255, 255, 255, 255]);
    fc.assert(
      fc.property(fc.integer(), fc.integer(), (processId, secretKey) => {
        const { type, body } = one(backendKeyData({ processId, secretKey }));
        expect(type).toBe("K");
        expect(readBackendKeyData(body)).toEqual({ processId, secretKey });
      }),
    );
  });

  test("truncated BackendKeyData throws a plain error", () => {
    expect(() => readBackendKeyData(new Uint8Array(7))).toThrow(/truncated/);
  });
});

describe("NegotiateProtocolVersion", () => {
  test("'v', newest supported version, count, option names", () => {
    const { type, body } = one(negotiateProtocolVersion(0, ["_pq_.test_option", "_pq_.other"]));
    expect(type).toBe("v");
    expect(i32(body, 0)).toBe(196608); // 3.0
    expect(i32(body, 4)).toBe(2);
    expect(cstrings(body.subarray(8))).toEqual(["_pq_.test_option", "_pq_.other"]);
  });

  test("no unrecognised options", () => {
    const { body } = one(negotiateProtocolVersion(0, []));
    expect(body.length).toBe(8);
    expect(i32(body, 4)).toBe(0);
  });
});

describe("extendedQuery", () => {
  test("Parse, Bind, Execute, Sync with the parameters as text bind values", () => {
    const sql = "SELECT set_config($1, $2, false)";
    const msgs = frames(extendedQuery(sql, ["app.current_tenant_id", "tenant'; DROP TABLE x; --"]));
    expect(msgs.map((m) => m.type)).toEqual(["P", "B", "E", "S"]);

    const [parse, bind, execute, sync] = msgs as [typeof msgs[0], typeof msgs[0], typeof msgs[0], typeof msgs[0]];
    // Parse: unnamed statement, the SQL, zero parameter types.
    expect(dec.decode(parse.body)).toBe(`\0${sql}\0\0\0`);

    // Bind: unnamed portal and statement, 0 format codes, 2 values, 0 result formats.
    const b = bind.body;
    expect([b[0], b[1]]).toEqual([0, 0]);
    expect(i16(b, 2)).toBe(0);
    expect(i16(b, 4)).toBe(2);
    let at = 6;
    const values: string[] = [];
    for (let i = 0; i < 2; i++) {
      const len = i32(b, at);
      values.push(dec.decode(b.subarray(at + 4, at + 4 + len)));
      at += 4 + len;
    }
    expect(values).toEqual(["app.current_tenant_id", "tenant'; DROP TABLE x; --"]);
    expect(i16(b, at)).toBe(0);
    expect(at + 2).toBe(b.length);

    // Execute: unnamed portal, no row limit. Sync: empty.
    expect([...execute.body]).toEqual([0, 0, 0, 0, 0]);
    expect(sync.body.length).toBe(0);
  });

  test("the SQL text never depends on the parameter values", () => {
    fc.assert(
      fc.property(fc.array(fc.string({ unit: "binary", maxLength: 30 }), { maxLength: 4 }), (params) => {
        const parse = frames(extendedQuery("SELECT $1", params))[0]!;
        expect(dec.decode(parse.body)).toBe("\0SELECT $1\0\0\0");
      }),
    );
  });

  test("multi-byte parameter values carry their byte length", () => {
    const bind = frames(extendedQuery("SELECT $1", ["✓"]))[1]!;
    expect(i32(bind.body, 6)).toBe(3);
  });
});

describe("concat and constants", () => {
  test("concat joins in order", () => {
    expect([...concat([Uint8Array.of(1), new Uint8Array(0), Uint8Array.of(2, 3)])]).toEqual([1, 2, 3]);
    expect(concat([]).length).toBe(0);
  });

  test("message type bytes are the protocol's letters", () => {
    expect(String.fromCharCode(MSG.authentication, MSG.backendKeyData, MSG.errorResponse, MSG.readyForQuery, MSG.negotiateProtocolVersion)).toBe("RKEZv");
  });
});
