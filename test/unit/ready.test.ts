import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { HeaderWalker, QueryTracker } from "../../src/protocol/ready.ts";

const msg = (type: string, body: number[] = []) => Uint8Array.from([type.charCodeAt(0), 0, 0, 0, 4 + body.length, ...body]);
const concat = (parts: Uint8Array[]) => Uint8Array.from(parts.flatMap((p) => [...p]));
const chunked = (bytes: Uint8Array, cuts: number[]) => {
  const out: Uint8Array[] = [];
  let at = 0;
  for (const c of cuts) {
    if (at >= bytes.length) break;
    out.push(bytes.subarray(at, Math.min(bytes.length, at + c)));
    at += c;
  }
  if (at < bytes.length) out.push(bytes.subarray(at));
  return out;
};

describe("HeaderWalker", () => {
  test("sees every header and the first byte of the chosen type, however the stream is cut", () => {
    const kinds = fc.array(fc.tuple(fc.constantFrom("D", "Z", "C", "T"), fc.array(fc.integer({ min: 0, max: 255 }), { maxLength: 20 })), { maxLength: 30 });
    fc.assert(
      fc.property(kinds, fc.array(fc.integer({ min: 1, max: 9 }), { maxLength: 80 }), (messages, cuts) => {
        const stream = concat(messages.map(([t, b]) => msg(t, t === "Z" ? [b[0] ?? 73, ...b.slice(1)] : b)));
        const types: string[] = [];
        const firsts: number[] = [];
        const w = new HeaderWalker((t) => types.push(String.fromCharCode(t)), 0x5a, (b) => firsts.push(b));
        for (const c of chunked(stream, cuts)) w.walk(c);
        expect(types).toEqual(messages.map(([t]) => t));
        expect(firsts).toEqual(messages.filter(([t]) => t === "Z").map(([, b]) => b[0] ?? 73));
        expect(w.atBoundary).toBe(true);
      }),
      { numRuns: 1000 },
    );
  });
});

describe("QueryTracker", () => {
  test("pipelined queries: idle only after the last ReadyForQuery", () => {
    const t = new QueryTracker();
    t.fromClient(concat([msg("Q", [0x78, 0]), msg("Q", [0x79, 0])]));
    expect(t.busy).toBe(true);
    t.fromServer(concat([msg("C", [0]), msg("Z", [0x49])]));
    expect(t.idle).toBe(false); // the second query is still running
    t.fromServer(concat([msg("C", [0]), msg("Z", [0x49])]));
    expect(t.idle).toBe(true);
  });

  test("an open transaction is not idle; the extended protocol counts Syncs", () => {
    const t = new QueryTracker();
    t.fromClient(concat([msg("P", [0, 0x78, 0, 0, 0]), msg("B", [0, 0, 0, 0, 0, 0]), msg("E", [0, 0, 0, 0, 0]), msg("S")]));
    expect(t.busy).toBe(true);
    t.fromServer(concat([msg("1"), msg("2"), msg("C", [0]), msg("Z", [0x54])]));
    expect(t.busy).toBe(false);
    expect(t.idle).toBe(false); // 'T': in a transaction
    t.fromClient(msg("Q", [0x63, 0]));
    t.fromServer(concat([msg("C", [0]), msg("Z", [0x49])]));
    expect(t.idle).toBe(true);
  });

  test("a ReadyForQuery cut before its status byte is not yet idle", () => {
    const t = new QueryTracker();
    t.fromClient(msg("Q", [0x78, 0]));
    const z = msg("Z", [0x49]);
    t.fromServer(z.subarray(0, 5));
    expect(t.idle).toBe(false);
    t.fromServer(z.subarray(5));
    expect(t.idle).toBe(true);
  });
});
