/**
 * parseStartupPacket (src/protocol/startup.ts): the untyped first packet.
 *
 * Covers: SSLRequest, GSSENCRequest, CancelRequest (3.0 4-byte keys and 3.2
 * longer keys), StartupMessage 3.0 and 3.2, protocol 2.0 and unknown codes,
 * every malformed layout (no terminator, unterminated name/value, trailing
 * bytes, duplicates, invalid UTF-8), and properties: arbitrary bytes never
 * throw and always yield a well-typed verdict; garbage codes are `invalid`;
 * startupMessage() output round-trips for arbitrary parameter maps.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { CANCEL_REQUEST, GSSENC_REQUEST, PROTOCOL_3_0, SSL_REQUEST, cancelRequest, startupMessage } from "../../src/protocol/messages.ts";
import { MAX_STARTUP_PACKET, MIN_STARTUP_PACKET, parseStartupPacket, type StartupPacket } from "../../src/protocol/startup.ts";

const enc = new TextEncoder();

function int32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setInt32(0, n | 0);
  return b;
}
function cat(...parts: (Uint8Array | string | number[])[]): Uint8Array {
  const bytes = parts.map((p) => (typeof p === "string" ? enc.encode(p) : p instanceof Uint8Array ? p : Uint8Array.from(p)));
  const out = new Uint8Array(bytes.reduce((n, b) => n + b.length, 0));
  let at = 0;
  for (const b of bytes) {
    out.set(b, at);
    at += b.length;
  }
  return out;
}
/** The body of a packet: what parseStartupPacket receives (after the length word). */
const bodyOf = (packet: Uint8Array) => packet.subarray(4);

function expectInvalid(p: StartupPacket, reason?: RegExp): void {
  expect(p.kind).toBe("invalid");
  if (reason && p.kind === "invalid") expect(p.reason).toMatch(reason);
}

describe("constants", () => {
  test("limits match PostgreSQL", () => {
    expect(MAX_STARTUP_PACKET).toBe(10_000);
    expect(MIN_STARTUP_PACKET).toBe(8);
    expect(SSL_REQUEST).toBe((1234 << 16) | 5679);
    expect(GSSENC_REQUEST).toBe((1234 << 16) | 5680);
    expect(CANCEL_REQUEST).toBe((1234 << 16) | 5678);
    expect(PROTOCOL_3_0).toBe(3 << 16);
  });
});

describe("requests", () => {
  test("SSLRequest", () => {
    expect(parseStartupPacket(int32(SSL_REQUEST))).toEqual({ kind: "ssl" });
  });
  test("GSSENCRequest", () => {
    expect(parseStartupPacket(int32(GSSENC_REQUEST))).toEqual({ kind: "gssenc" });
  });
  test("SSLRequest / GSSENCRequest with extra bytes are invalid", () => {
    expectInvalid(parseStartupPacket(cat(int32(SSL_REQUEST), [0])), /SSLRequest/);
    expectInvalid(parseStartupPacket(cat(int32(GSSENC_REQUEST), [1, 2, 3, 4])), /GSSENCRequest/);
  });

  test("CancelRequest with a 4-byte key (protocol 3.0), built by cancelRequest()", () => {
    const p = parseStartupPacket(bodyOf(cancelRequest(12345, -559038737)));
    expect(p.kind).toBe("cancel");
    if (p.kind !== "cancel") return;
    expect(p.processId).toBe(12345);
    expect([...p.secretKey]).toEqual([...int32(-559038737)]);
  });

  test("CancelRequest with a longer key (protocol 3.2 allows up to 256 bytes)", () => {
    const key = new Uint8Array(32).map((_, i) => i);
    const p = parseStartupPacket(cat(int32(CANCEL_REQUEST), int32(7), key));
    expect(p).toEqual({ kind: "cancel", processId: 7, secretKey: key });
    const max = new Uint8Array(256).fill(0xab);
    expect(parseStartupPacket(cat(int32(CANCEL_REQUEST), int32(7), max)).kind).toBe("cancel");
  });

  test("CancelRequest too short or with a key over 256 bytes is invalid", () => {
    expectInvalid(parseStartupPacket(int32(CANCEL_REQUEST)), /CancelRequest/);
    expectInvalid(parseStartupPacket(cat(int32(CANCEL_REQUEST), int32(1))), /CancelRequest/);
    expectInvalid(parseStartupPacket(cat(int32(CANCEL_REQUEST), int32(1), [1, 2, 3])), /CancelRequest/);
    expectInvalid(parseStartupPacket(cat(int32(CANCEL_REQUEST), int32(1), new Uint8Array(257))), /CancelRequest/);
  });

  test("the secret key is a copy, not a view of the input", () => {
    const body = bodyOf(cancelRequest(1, 2)).slice();
    const p = parseStartupPacket(body);
    body.fill(0xff);
    expect(p.kind === "cancel" && [...p.secretKey]).toEqual([0, 0, 0, 2]);
  });
});

describe("StartupMessage", () => {
  test("protocol 3.0 with user and database", () => {
    const p = parseStartupPacket(cat(int32(PROTOCOL_3_0), "user\0app_user.t1\0database\0db\0\0"));
    expect(p).toEqual({
      kind: "startup",
      major: 3,
      minor: 0,
      params: new Map([
        ["user", "app_user.t1"],
        ["database", "db"],
      ]),
    });
  });

  test("protocol 3.2 (PG18 clients) parses with minor 2, _pq_ options kept", () => {
    const p = parseStartupPacket(cat(int32((3 << 16) | 2), "user\0u.t\0_pq_.test_option\0x\0\0"));
    expect(p.kind).toBe("startup");
    if (p.kind !== "startup") return;
    expect([p.major, p.minor]).toEqual([3, 2]);
    expect(p.params.get("_pq_.test_option")).toBe("x");
  });

  test("no parameters at all is a (useless but well-formed) startup", () => {
    expect(parseStartupPacket(cat(int32(PROTOCOL_3_0), [0]))).toEqual({ kind: "startup", major: 3, minor: 0, params: new Map() });
  });

  test("empty values are allowed", () => {
    const p = parseStartupPacket(cat(int32(PROTOCOL_3_0), "options\0\0\0"));
    expect(p.kind === "startup" && p.params.get("options")).toBe("");
  });

  test("UTF-8 names and values decode", () => {
    const p = parseStartupPacket(cat(int32(PROTOCOL_3_0), "application_name\0héllo ✓ 😀\0\0"));
    expect(p.kind === "startup" && p.params.get("application_name")).toBe("héllo ✓ 😀");
  });

  test("protocol 2.0 is invalid, and the reason names it", () => {
    // The 2.0 startup packet: version, then fixed-size database/user/options/unused/tty fields.
    const body = cat(int32(2 << 16), new Uint8Array(64 + 32 + 64 + 64 + 64));
    expectInvalid(parseStartupPacket(body), /2\.0/);
  });

  test("other major versions and unknown request codes are invalid", () => {
    for (const code of [0, 1 << 16, 4 << 16, (1234 << 16) | 5681, (1234 << 16) | 1, -1, 0x7fffffff]) {
      expectInvalid(parseStartupPacket(cat(int32(code), "user\0x\0\0")));
    }
  });

  test("malformed layouts are invalid, with a reason", () => {
    const v3 = int32(PROTOCOL_3_0);
    expectInvalid(parseStartupPacket(v3), /terminator/); // no terminator at all
    expectInvalid(parseStartupPacket(cat(v3, "user\0x\0")), /terminator/);
    expectInvalid(parseStartupPacket(cat(v3, "user")), /unterminated parameter name/);
    expectInvalid(parseStartupPacket(cat(v3, "user\0x")), /unterminated parameter value/);
    expectInvalid(parseStartupPacket(cat(v3, "user\0x\0\0junk")), /trailing/);
    expectInvalid(parseStartupPacket(cat(v3, "user\0x\0\0\0")), /trailing/);
    expectInvalid(parseStartupPacket(cat(v3, "user\0a\0user\0b\0\0")), /duplicate/);
    expectInvalid(parseStartupPacket(cat(v3, [0x75, 0xff, 0], "x\0\0")), /UTF-8/);
    expectInvalid(parseStartupPacket(cat(v3, "user\0", [0xc3, 0x28, 0], [0])), /UTF-8/);
  });

  test("fewer than 4 bytes is invalid", () => {
    for (const n of [0, 1, 2, 3]) expectInvalid(parseStartupPacket(new Uint8Array(n)), /short/);
  });

  test("works on a view at a non-zero offset of a larger buffer", () => {
    const packet = startupMessage(new Map([["user", "u.t"]]));
    const big = new Uint8Array(packet.length + 7).fill(0xff);
    big.set(packet, 3);
    const p = parseStartupPacket(big.subarray(3 + 4, 3 + packet.length));
    expect(p.kind === "startup" && p.params.get("user")).toBe("u.t");
  });
});

// ------------------------------------------------------------------ properties

/** Strings that can travel as a C string: no NUL (fast-check's binary unit has no lone surrogates). */
const cstring = (min = 0) => fc.string({ unit: "binary", minLength: min, maxLength: 24 }).filter((s) => !s.includes("\0"));

const REQUEST_CODES = new Set([SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST]);

describe("properties", () => {
  test("arbitrary bytes never throw, and the verdict is well-formed", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
        const p = parseStartupPacket(bytes);
        switch (p.kind) {
          case "ssl":
          case "gssenc":
            expect(bytes.length).toBe(4);
            break;
          case "cancel":
            expect(bytes.length).toBeGreaterThanOrEqual(12);
            expect(bytes.length).toBeLessThanOrEqual(264);
            expect(p.secretKey.length).toBe(bytes.length - 8);
            break;
          case "startup":
            expect(p.major).toBe(3);
            expect(bytes[bytes.length - 1]).toBe(0);
            break;
          case "invalid":
            expect(typeof p.reason).toBe("string");
            expect(p.reason.length).toBeGreaterThan(0);
            break;
          default:
            throw new Error(`unexpected verdict ${JSON.stringify(p)}`);
        }
      }),
      { numRuns: 5000 },
    );
  });

  test("arbitrary bytes after any request or version code never throw", () => {
    const code = fc.oneof(
      fc.constantFrom(SSL_REQUEST, GSSENC_REQUEST, CANCEL_REQUEST, PROTOCOL_3_0, (3 << 16) | 2, 2 << 16),
      fc.integer({ min: 3 << 16, max: (3 << 16) | 0xffff }),
      fc.integer(),
    );
    fc.assert(
      fc.property(code, fc.uint8Array({ maxLength: 300 }), (c, rest) => {
        expect(() => parseStartupPacket(cat(int32(c), rest))).not.toThrow();
      }),
      { numRuns: 3000 },
    );
  });

  test("garbage (a code that is neither a request nor protocol 3) is invalid", () => {
    const garbageCode = fc.integer().filter((c) => !REQUEST_CODES.has(c) && c >>> 16 !== 3);
    fc.assert(
      fc.property(garbageCode, fc.uint8Array({ maxLength: 200 }), (c, rest) => {
        expect(parseStartupPacket(cat(int32(c), rest)).kind).toBe("invalid");
      }),
      { numRuns: 3000 },
    );
  });

  test("startupMessage() round-trips arbitrary parameter maps", () => {
    const params = fc.uniqueArray(fc.tuple(cstring(1), cstring()), { selector: ([k]) => k, maxLength: 10 });
    fc.assert(
      fc.property(params, (entries) => {
        const map = new Map(entries);
        const packet = startupMessage(map);
        // The length word counts the whole packet, itself included.
        expect(new DataView(packet.buffer, packet.byteOffset).getInt32(0)).toBe(packet.length);
        const p = parseStartupPacket(bodyOf(packet));
        expect(p).toEqual({ kind: "startup", major: 3, minor: 0, params: map });
      }),
      { numRuns: 1000 },
    );
  });

  test("cancelRequest() round-trips arbitrary keys", () => {
    fc.assert(
      fc.property(fc.integer(), fc.integer(), (pid, secret) => {
        const p = parseStartupPacket(bodyOf(cancelRequest(pid, secret)));
        expect(p).toEqual({ kind: "cancel", processId: pid, secretKey: int32(secret) });
      }),
    );
  });

  test("a well-formed startup message with any byte removed or any trailing byte added is not mistaken", () => {
    fc.assert(
      fc.property(
        fc.uniqueArray(fc.tuple(cstring(1), cstring()), { selector: ([k]) => k, minLength: 1, maxLength: 4 }),
        fc.nat(),
        fc.integer({ min: 0, max: 255 }),
        (entries, at, extra) => {
          const body = bodyOf(startupMessage(new Map(entries)));
          // Appending a byte after the terminator is always invalid.
          expect(parseStartupPacket(cat(body, [extra])).kind).toBe("invalid");
          // Dropping the terminator is always invalid.
          expect(parseStartupPacket(body.subarray(0, body.length - 1)).kind).toBe("invalid");
          // Dropping some other byte never throws.
          const i = at % body.length;
          expect(() => parseStartupPacket(cat(body.subarray(0, i), body.subarray(i + 1)))).not.toThrow();
        },
      ),
      { numRuns: 1000 },
    );
  });
});

describe("text decoding", () => {
  test("a parameter value that begins with U+FEFF keeps it (found by the round-trip property)", () => {
    const map = new Map([["user", "\uFEFFapp_user.acme"], ["application_name", "\uFEFF"]]);
    const p = parseStartupPacket(bodyOf(startupMessage(map)));
    expect(p).toEqual({ kind: "startup", major: 3, minor: 0, params: map });
  });
});
