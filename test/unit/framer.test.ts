/**
 * Framer (src/protocol/framer.ts): typed and untyped framing, no I/O.
 *
 * Covers: whole and split delivery, every chunk boundary, arbitrary
 * chunkings, buffer growth and compaction (tiny initial capacities), the
 * length bounds of next() and nextUntyped(), drain(), and a fuzz property:
 * arbitrary bytes in arbitrary chunks never raise anything but FramingError
 * and never yield a frame longer than the maximum.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { Framer, FramingError, type Frame } from "../../src/protocol/framer.ts";

interface Msg {
  type: number;
  body: Uint8Array;
}

/** Serialise a typed message: type byte, Int32 length (counting itself), body. */
function typed(type: number, body: Uint8Array): Uint8Array {
  const out = new Uint8Array(5 + body.length);
  out[0] = type;
  new DataView(out.buffer).setInt32(1, body.length + 4);
  out.set(body, 5);
  return out;
}

/** Serialise an untyped (startup-phase) packet: Int32 length, body. */
function untyped(body: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + body.length);
  new DataView(out.buffer).setInt32(0, body.length + 4);
  out.set(body, 4);
  return out;
}

function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** A frame copied out of the framer (frames are views valid until the next push). */
interface Copied {
  type: number;
  body: number[];
  raw: number[];
}
const copy = (f: Frame): Copied => ({ type: f.type, body: [...f.body], raw: [...f.raw] });

/** Push chunks one by one, taking every complete typed frame after each push. */
function frameTyped(chunks: readonly Uint8Array[], max: number, capacity?: number): { frames: Copied[]; framer: Framer } {
  const framer = new Framer(max, capacity);
  const frames: Copied[] = [];
  for (const c of chunks) {
    framer.push(c);
    for (let f = framer.next(); f; f = framer.next()) frames.push(copy(f));
  }
  return { frames, framer };
}

function frameUntyped(chunks: readonly Uint8Array[], max: number, min: number, capacity?: number): Copied[] {
  const framer = new Framer(max, capacity);
  const frames: Copied[] = [];
  for (const c of chunks) {
    framer.push(c);
    for (let f = framer.nextUntyped(min); f; f = framer.nextUntyped(min)) frames.push(copy(f));
  }
  return frames;
}

/** Split `bytes` at the given (unsorted, possibly repeated) cut points. */
function splitAt(bytes: Uint8Array, cuts: readonly number[]): Uint8Array[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const out: Uint8Array[] = [];
  let prev = 0;
  for (const p of points) {
    out.push(bytes.subarray(prev, p));
    prev = p;
  }
  out.push(bytes.subarray(prev));
  return out;
}

const MAX = 4096;
const msgArb: fc.Arbitrary<Msg> = fc.record({
  type: fc.integer({ min: 0x20, max: 0x7e }),
  body: fc.uint8Array({ maxLength: 300 }),
});
const expectedFrames = (msgs: readonly Msg[]): Copied[] =>
  msgs.map((m) => {
    const raw = typed(m.type, m.body);
    return { type: m.type, body: [...m.body], raw: [...raw] };
  });

describe("typed messages", () => {
  test("a whole message comes out as one frame with type, body and raw", () => {
    const body = new TextEncoder().encode("SELECT 1\0");
    const framer = new Framer(MAX);
    framer.push(typed(0x51, body));
    const f = framer.next();
    expect(f).not.toBeNull();
    expect(f!.type).toBe(0x51);
    expect([...f!.body]).toEqual([...body]);
    expect([...f!.raw]).toEqual([...typed(0x51, body)]);
    expect(framer.next()).toBeNull();
    expect(framer.buffered).toBe(0);
  });

  test("an empty-bodied message (length 4) is a frame", () => {
    const framer = new Framer(MAX);
    framer.push(typed(0x53, new Uint8Array(0))); // Sync
    const f = framer.next();
    expect(f?.type).toBe(0x53);
    expect(f?.body.length).toBe(0);
    expect(f?.raw.length).toBe(5);
  });

  test("fewer than 5 bytes is incomplete, not an error", () => {
    const framer = new Framer(MAX);
    for (const b of [0x51, 0, 0, 0]) {
      framer.push(Uint8Array.of(b));
      expect(framer.next()).toBeNull();
    }
    expect(framer.buffered).toBe(4);
  });

  test("a body not yet complete waits for more bytes", () => {
    const whole = typed(0x44, new Uint8Array(100).fill(7));
    const framer = new Framer(MAX);
    framer.push(whole.subarray(0, 50));
    expect(framer.next()).toBeNull();
    framer.push(whole.subarray(50));
    expect([...framer.next()!.raw]).toEqual([...whole]);
  });

  test("length words below 4 are framing errors", () => {
    for (const len of [0, 1, 2, 3]) {
      const framer = new Framer(MAX);
      framer.push(Uint8Array.of(0x51, 0, 0, 0, len));
      expect(() => framer.next()).toThrow(FramingError);
    }
  });

  test("length words above the maximum are framing errors, before the body arrives", () => {
    for (const len of [MAX + 1, 0x7fffffff, 0x80000000, 0xffffffff]) {
      const framer = new Framer(MAX);
      const header = new Uint8Array(5);
      header[0] = 0x44;
      new DataView(header.buffer).setUint32(1, len);
      framer.push(header);
      expect(() => framer.next()).toThrow(FramingError);
      // Only the header was buffered: nothing was sized by the claimed length.
      expect(framer.buffered).toBe(5);
    }
  });

  test("a length word exactly at the maximum is accepted", () => {
    const framer = new Framer(MAX, 16);
    const whole = typed(0x44, new Uint8Array(MAX - 4).fill(1));
    framer.push(whole);
    const f = framer.next();
    expect(f?.body.length).toBe(MAX - 4);
    expect(f?.raw.length).toBe(MAX + 1);
  });

  test("the error message names the type and the length", () => {
    const framer = new Framer(MAX);
    framer.push(Uint8Array.of(0x51, 0xff, 0xff, 0xff, 0xff));
    expect(() => framer.next()).toThrow(/4294967295.*'Q'/);
  });

  test("several messages in one chunk come out in order", () => {
    const msgs = [typed(0x31, new Uint8Array(0)), typed(0x32, new Uint8Array(0)), typed(0x44, Uint8Array.of(1, 2, 3))];
    const { frames, framer } = frameTyped([concat(msgs)], MAX);
    expect(frames.map((f) => f.type)).toEqual([0x31, 0x32, 0x44]);
    expect(frames.map((f) => f.raw)).toEqual(msgs.map((m) => [...m]));
    expect(framer.buffered).toBe(0);
  });

  test("split at every possible boundary, a stream frames exactly as when whole", () => {
    const msgs: Msg[] = [
      { type: 0x52, body: Uint8Array.of(0, 0, 0, 0) },
      { type: 0x53, body: new TextEncoder().encode("client_encoding\0UTF8\0") },
      { type: 0x4b, body: Uint8Array.of(0, 0, 1, 2, 3, 4, 5, 6) },
      { type: 0x5a, body: Uint8Array.of(0x49) },
      { type: 0x44, body: new Uint8Array(0) },
    ];
    const stream = concat(msgs.map((m) => typed(m.type, m.body)));
    const whole = frameTyped([stream], MAX).frames;
    expect(whole).toEqual(expectedFrames(msgs));
    for (let i = 0; i <= stream.length; i++) {
      for (const capacity of [1, 8, 1024]) {
        const { frames, framer } = frameTyped([stream.subarray(0, i), stream.subarray(i)], MAX, capacity);
        expect(frames).toEqual(whole);
        expect(framer.buffered).toBe(0);
      }
    }
  });

  test("one byte at a time frames exactly as when whole", () => {
    const msgs = [typed(0x51, new TextEncoder().encode("SELECT 1\0")), typed(0x58, new Uint8Array(0))];
    const stream = concat(msgs);
    const chunks = [...stream].map((b) => Uint8Array.of(b));
    expect(frameTyped(chunks, MAX, 1).frames).toEqual(frameTyped([stream], MAX).frames);
  });

  test("a frame pushed in a view of a larger buffer is copied, not aliased", () => {
    const backing = new Uint8Array(64).fill(9);
    const msg = typed(0x44, Uint8Array.of(1, 2, 3));
    backing.set(msg, 10);
    const framer = new Framer(MAX);
    framer.push(backing.subarray(10, 10 + msg.length));
    backing.fill(0); // the caller reuses its buffer
    expect([...framer.next()!.raw]).toEqual([...msg]);
  });
});

describe("untyped (startup-phase) packets", () => {
  test("fewer than 4 bytes is incomplete", () => {
    const framer = new Framer(10_000);
    framer.push(Uint8Array.of(0, 0, 0));
    expect(framer.nextUntyped(8)).toBeNull();
  });

  test("a packet comes out with type 0, body after the length word", () => {
    const body = Uint8Array.of(4, 0xd2, 0x16, 0x2f); // SSLRequest code
    const framer = new Framer(10_000);
    framer.push(untyped(body));
    const f = framer.nextUntyped(8)!;
    expect(f.type).toBe(0);
    expect([...f.body]).toEqual([...body]);
    expect(f.raw.length).toBe(8);
  });

  test("lengths below the minimum or above the maximum are framing errors", () => {
    for (const len of [0, 1, 4, 7, 10_001, 0x7fffffff, 0xffffffff]) {
      const framer = new Framer(10_000);
      const header = new Uint8Array(4);
      new DataView(header.buffer).setUint32(0, len);
      framer.push(header);
      expect(() => framer.nextUntyped(8)).toThrow(FramingError);
    }
  });

  test("the minimum and the maximum themselves are accepted", () => {
    for (const len of [8, 10_000]) {
      const framer = new Framer(10_000, 4);
      framer.push(untyped(new Uint8Array(len - 4)));
      expect(framer.nextUntyped(8)?.raw.length).toBe(len);
    }
  });

  test("an SSLRequest followed by a StartupMessage in one chunk: two packets, in order", () => {
    const ssl = untyped(Uint8Array.of(4, 0xd2, 0x16, 0x2f));
    const startup = untyped(Uint8Array.of(0, 3, 0, 0, 0x75, 0, 0x78, 0, 0));
    const frames = frameUntyped([concat([ssl, startup])], 10_000, 8);
    expect(frames.map((f) => f.raw)).toEqual([[...ssl], [...startup]]);
  });
});

describe("drain", () => {
  test("hands over exactly the unconsumed bytes and empties the framer", () => {
    const a = typed(0x52, Uint8Array.of(0, 0, 0, 0));
    const partial = typed(0x44, Uint8Array.of(1, 2, 3, 4, 5)).subarray(0, 6);
    const framer = new Framer(MAX, 4);
    framer.push(concat([a, partial]));
    expect([...framer.next()!.raw]).toEqual([...a]);
    expect(framer.next()).toBeNull();
    const rest = framer.drain();
    expect([...rest]).toEqual([...partial]);
    expect(framer.buffered).toBe(0);
    expect(framer.next()).toBeNull();
    // drain() returns a copy: later pushes do not change it.
    framer.push(new Uint8Array(32).fill(0xee));
    expect([...rest]).toEqual([...partial]);
  });

  test("after drain the framer frames a fresh stream", () => {
    const framer = new Framer(MAX);
    framer.push(Uint8Array.of(0x44, 0, 0));
    framer.drain();
    framer.push(typed(0x5a, Uint8Array.of(0x49)));
    expect(framer.next()?.type).toBe(0x5a);
  });
});

describe("properties", () => {
  test("any chunking of a message stream frames identically to whole delivery", () => {
    fc.assert(
      fc.property(
        fc.array(msgArb, { maxLength: 12 }),
        fc.array(fc.nat(), { maxLength: 40 }),
        fc.integer({ min: 1, max: 64 }),
        (msgs, cuts, capacity) => {
          const stream = concat(msgs.map((m) => typed(m.type, m.body)));
          const { frames, framer } = frameTyped(splitAt(stream, cuts), MAX, capacity);
          expect(frames).toEqual(expectedFrames(msgs));
          expect(framer.buffered).toBe(0);
        },
      ),
      { numRuns: 500 },
    );
  });

  test("every single split point of a random stream frames identically to whole delivery", () => {
    fc.assert(
      fc.property(fc.array(msgArb, { minLength: 1, maxLength: 5 }), (msgs) => {
        const stream = concat(msgs.map((m) => typed(m.type, m.body.subarray(0, 40))));
        const whole = frameTyped([stream], MAX).frames;
        for (let i = 0; i <= stream.length; i++) {
          expect(frameTyped([stream.subarray(0, i), stream.subarray(i)], MAX, 2).frames).toEqual(whole);
        }
      }),
      { numRuns: 100 },
    );
  });

  test("the bytes of all frames plus what is buffered are the input, in order", () => {
    fc.assert(
      fc.property(
        fc.array(msgArb, { maxLength: 8 }),
        fc.uint8Array({ maxLength: 4 }), // an incomplete header at the end
        fc.array(fc.nat(), { maxLength: 20 }),
        (msgs, tail, cuts) => {
          const stream = concat([...msgs.map((m) => typed(m.type, m.body)), tail]);
          const { frames, framer } = frameTyped(splitAt(stream, cuts), MAX, 3);
          const out = [...frames.flatMap((f) => f.raw), ...framer.drain()];
          expect(out).toEqual([...stream]);
        },
      ),
      { numRuns: 300 },
    );
  });

  test("untyped packets: any chunking frames identically to whole delivery", () => {
    fc.assert(
      fc.property(
        fc.array(fc.uint8Array({ minLength: 4, maxLength: 200 }), { maxLength: 8 }),
        fc.array(fc.nat(), { maxLength: 30 }),
        (bodies, cuts) => {
          const stream = concat(bodies.map(untyped));
          const frames = frameUntyped(splitAt(stream, cuts), 10_000, 8, 2);
          expect(frames.map((f) => f.body)).toEqual(bodies.map((b) => [...b]));
        },
      ),
      { numRuns: 300 },
    );
  });

  test("arbitrary bytes in arbitrary chunks: only FramingError, never a frame over the max", () => {
    fc.assert(
      fc.property(
        fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 20 }),
        fc.integer({ min: 4, max: 128 }),
        fc.boolean(),
        fc.integer({ min: 1, max: 32 }),
        (chunks, max, isTyped, capacity) => {
          const framer = new Framer(max, capacity);
          let total = 0;
          let consumed = 0;
          for (const c of chunks) {
            framer.push(c);
            total += c.length;
            for (;;) {
              let f: Frame | null;
              try {
                f = isTyped ? framer.next() : framer.nextUntyped(8);
              } catch (e) {
                expect(e).toBeInstanceOf(FramingError);
                return; // a framing error ends the stream
              }
              if (!f) break;
              consumed += f.raw.length;
              if (isTyped) {
                expect(f.raw.length).toBeLessThanOrEqual(max + 1);
                expect(f.body.length).toBe(f.raw.length - 5);
              } else {
                expect(f.raw.length).toBeLessThanOrEqual(max);
                expect(f.raw.length).toBeGreaterThanOrEqual(8);
                expect(f.body.length).toBe(f.raw.length - 4);
              }
              expect(f.body.length).toBeLessThanOrEqual(max - 4);
            }
            expect(framer.buffered).toBe(total - consumed);
          }
        },
      ),
      { numRuns: 2000 },
    );
  });
});
