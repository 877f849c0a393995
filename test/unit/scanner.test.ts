import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { FramingError } from "../../src/protocol/framer.ts";
import { MessageScanner } from "../../src/protocol/scanner.ts";

const msg = (type: string, body: string) => {
  const b = new TextEncoder().encode(body);
  const m = new Uint8Array(5 + b.length);
  m[0] = type.charCodeAt(0);
  new DataView(m.buffer).setInt32(1, 4 + b.length);
  m.set(b, 5);
  return m;
};
const join = (parts: Uint8Array[]) => Uint8Array.from(parts.flatMap((p) => [...p]));
const isWatched = (t: number) => t === 0x51 || t === 0x50; // Q, P

describe("MessageScanner", () => {
  test("bytes leave complete and in order, replacements in place, however the stream is cut", () => {
    const message = fc.tuple(fc.constantFrom("Q", "P", "d", "S", "B"), fc.string({ maxLength: 40 }));
    fc.assert(
      fc.property(fc.array(message, { maxLength: 25 }), fc.array(fc.integer({ min: 1, max: 30 }), { maxLength: 60 }), (messages, cuts) => {
        const all = messages.map(([t, b]) => msg(t, b));
        const stream = join(all);
        const scanner = new MessageScanner(isWatched, 1 << 20);
        const out: number[] = [];
        const seen: string[] = [];
        let at = 0;
        for (let i = 0; at < stream.length; i++) {
          const k = cuts.length > 0 ? cuts[i % cuts.length]! : stream.length;
          scanner.scan(stream.slice(at, at + k), (b) => out.push(...b), (t, bytes, start, end) => {
            const m = bytes.subarray(start, end);
            expect(m[0]).toBe(t);
            expect(new DataView(m.buffer, m.byteOffset).getInt32(1)).toBe(m.length - 1);
            seen.push(String.fromCharCode(t));
            // Replace Query "x…" messages; let the rest through.
            return t === 0x51 && m[5] === 0x78 ? msg("Q", "replaced") : undefined;
          });
          at += k;
        }
        const expected = join(all.map((m) => (m[0] === 0x51 && m[5] === 0x78 ? msg("Q", "replaced") : m)));
        expect(Uint8Array.from(out)).toEqual(expected);
        expect(seen).toEqual(all.filter((m) => isWatched(m[0]!)).map((m) => String.fromCharCode(m[0]!)));
      }),
      { numRuns: 1500 },
    );
  });

  test("a chunk is written in one piece unless something in it is replaced", () => {
    const scanner = new MessageScanner(isWatched, 1 << 20);
    const chunk = join([msg("P", "select 1"), msg("B", ""), msg("E", ""), msg("S", "")]);
    const writes: Uint8Array[] = [];
    scanner.scan(chunk, (b) => writes.push(b), () => undefined);
    expect(writes.length).toBe(1);
    expect(writes[0]).toEqual(chunk);
  });

  test("a header claiming a huge message allocates nothing up front, and lengths are checked", () => {
    const scanner = new MessageScanner(isWatched, 0x3fffffff);
    const header = Uint8Array.from([0x51, 0x3f, 0xff, 0xff, 0xff, 0x73]);
    scanner.scan(header, () => {}, () => undefined); // held as the 6 bytes that came
    expect(() => new MessageScanner(isWatched, 100).scan(Uint8Array.from([0x51, 0, 0, 1, 0]), () => {}, () => undefined)).toThrow(FramingError);
    expect(() => new MessageScanner(isWatched, 100).scan(Uint8Array.from([0x44, 0, 0, 0, 3]), () => {}, () => undefined)).toThrow(FramingError);
  });
});
