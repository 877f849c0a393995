import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { FramingError } from "../../src/protocol/framer.ts";
import { MessageScanner, type ScannerHooks } from "../../src/protocol/scanner.ts";

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

describe("MessageScanner: verdicts that take a while, and messages too large to hold", () => {
  const hooks = (over: Partial<ScannerHooks> = {}): ScannerHooks & { parks: number; resumes: number } => {
    const h = {
      parks: 0,
      resumes: 0,
      maxWatched: 1 << 20,
      oversize: () => ({ feed() {}, end: () => msg("Q", "oversize") }),
      parked: () => void h.parks++,
      resumed: () => void h.resumes++,
      failed: (e: Error) => {
        throw e;
      },
      ...over,
    };
    return h;
  };

  test("property: with some verdicts as promises, bytes still leave complete, in order, with the replacements", async () => {
    const message = fc.tuple(fc.constantFrom("Q", "P", "d", "S"), fc.string({ maxLength: 30 }));
    await fc.assert(
      fc.asyncProperty(fc.array(message, { maxLength: 20 }), fc.array(fc.integer({ min: 1, max: 25 }), { maxLength: 40 }), async (messages, cuts) => {
        const all = messages.map(([t, b]) => msg(t, b));
        const stream = join(all);
        const h = hooks();
        const scanner = new MessageScanner(isWatched, 1 << 20, h);
        const out: number[] = [];
        const settle: Array<() => void> = [];
        const inspect = (t: number, bytes: Uint8Array, start: number) => {
          const replace = t === 0x51 && bytes[start + 5] === 0x78 ? msg("Q", "replaced") : undefined;
          // Every P is judged later (as the guard's worker would).
          if (t !== 0x50) return replace;
          return new Promise<Uint8Array | undefined>((resolve) => settle.push(() => resolve(replace)));
        };
        let at = 0;
        for (let i = 0; at < stream.length; i++) {
          const k = cuts.length > 0 ? cuts[i % cuts.length]! : stream.length;
          scanner.scan(stream.slice(at, at + k), (b) => out.push(...b), inspect);
          at += k;
          // Settle what is pending now and then, not always at once.
          if (i % 2 === 0) while (settle.length) { settle.shift()!(); await Promise.resolve(); await Promise.resolve(); }
        }
        while (scanner.isParked || settle.length) {
          settle.shift()?.();
          await new Promise((r) => setImmediate(r));
        }
        const expected = join(all.map((m) => (m[0] === 0x51 && m[5] === 0x78 ? msg("Q", "replaced") : m)));
        expect(Uint8Array.from(out)).toEqual(expected);
        expect(h.resumes).toBe(h.parks);
      }),
      { numRuns: 300 },
    );
  });

  test("a watched message over maxWatched is streamed into the sink, never held, and replaced in place", () => {
    const fed: number[] = [];
    const h = hooks({
      maxWatched: 64,
      oversize: (type, length) => {
        expect([String.fromCharCode(type), length]).toEqual(["Q", 4 + 200]);
        return { feed: (b) => fed.push(...b), end: () => msg("Q", "refused") };
      },
    });
    const scanner = new MessageScanner(isWatched, 1 << 20, h);
    const big = msg("Q", "z".repeat(200));
    const stream = join([msg("S", ""), big, msg("Q", "small")]);
    const out: number[] = [];
    for (let at = 0; at < stream.length; at += 7) scanner.scan(stream.slice(at, at + 7), (b) => out.push(...b), () => undefined);
    expect(Uint8Array.from(out)).toEqual(join([msg("S", ""), msg("Q", "refused"), msg("Q", "small")]));
    expect(String.fromCharCode(...fed)).toBe("z".repeat(200));
  });
});
