/**
 * NotificationResponses on their way to a tenant session
 * (src/protocol/notification.ts), alone and through the MessageScanner the
 * session runs them with.
 *
 * Covers: the session's own prefix is taken off (pid and payload kept, the
 * length right); another tenant's prefix, a raw channel, a channel that is
 * the prefix cut short, and a malformed message are dropped. Through the
 * scanner, with the stream cut into chunks at random: every other message
 * comes out byte for byte and in order, notifications are rebuilt or
 * dropped, and a chunk without a notification goes out as the very same
 * object (no copy).
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { DROPPED, MAX_NOTIFICATION, NOTIFICATION_RESPONSE, scopeNotification } from "../../src/protocol/notification.ts";
import { concat } from "../../src/protocol/messages.ts";
import { MessageScanner, type ScannerHooks } from "../../src/protocol/scanner.ts";

const enc = new TextEncoder();
const MINE = "mg0123456789abcdef:";
const THEIRS = "mgfedcba9876543210:";
const prefix = enc.encode(MINE);

function message(type: string | number, body: Uint8Array): Uint8Array {
  const m = new Uint8Array(5 + body.length);
  m[0] = typeof type === "number" ? type : type.charCodeAt(0);
  new DataView(m.buffer).setInt32(1, 4 + body.length);
  m.set(body, 5);
  return m;
}

function notification(pid: number, channel: string, payload: string): Uint8Array {
  const pidBytes = new Uint8Array(4);
  new DataView(pidBytes.buffer).setInt32(0, pid);
  return message(NOTIFICATION_RESPONSE, concat([pidBytes, enc.encode(channel), Uint8Array.of(0), enc.encode(payload), Uint8Array.of(0)]));
}

const scope = (m: Uint8Array) => scopeNotification(m, 0, m.length, prefix);

describe("scopeNotification", () => {
  test("the session's own channel: the prefix comes off, pid and payload stay", () => {
    expect(scope(notification(4242, `${MINE}jobs`, "hello"))).toEqual(notification(4242, "jobs", "hello"));
    expect(scope(notification(7, `${MINE}Jobs Queue é`, ""))).toEqual(notification(7, "Jobs Queue é", ""));
  });

  test("works on a message inside a larger buffer", () => {
    const m = notification(1, `${MINE}x`, "y");
    const buffer = concat([message("Z", Uint8Array.of(0x49)), m, message("Z", Uint8Array.of(0x49))]);
    expect(scopeNotification(buffer, 6, 6 + m.length, prefix)).toEqual(notification(1, "x", "y"));
  });

  test.each([
    ["another tenant's channel", notification(1, `${THEIRS}jobs`, "secret")],
    ["a raw channel", notification(1, "jobs", "x")],
    ["a channel that is the prefix cut short", notification(1, MINE.slice(0, 10), "x")],
    ["a channel that only contains the prefix later", notification(1, `x${MINE}jobs`, "x")],
    ["a message too short to hold a channel", message(NOTIFICATION_RESPONSE, Uint8Array.of(0, 0, 0, 1))],
    ["a channel with no end", message(NOTIFICATION_RESPONSE, concat([Uint8Array.of(0, 0, 0, 1), enc.encode(`${MINE}jobs`)]))],
  ])("%s is dropped", (_, m) => {
    expect(scope(m)).toBe(DROPPED);
  });

  test("arbitrary bodies never throw and never come out with a foreign channel", () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 64 }), fc.boolean(), (body, prefixed) => {
        const m = message(NOTIFICATION_RESPONSE, prefixed ? concat([body.subarray(0, 4), prefix, body.subarray(4)]) : body);
        const out = scope(m);
        if (out === DROPPED) return;
        expect(out.length).toBe(m.length - prefix.length);
        expect(new DataView(out.buffer).getInt32(1)).toBe(out.length - 1);
        expect(m.subarray(9, 9 + prefix.length)).toEqual(prefix);
      }),
      { numRuns: 3000 },
    );
  });
});

describe("through the session's scanner", () => {
  const hooks: ScannerHooks = {
    maxWatched: MAX_NOTIFICATION,
    oversize: () => ({ feed() {}, end: () => DROPPED }),
    parked() {},
    resumed() {},
    failed(e) {
      throw e;
    },
  };
  const scanner = () => new MessageScanner((t) => t === NOTIFICATION_RESPONSE, 0x7fffffff, hooks);
  const inspect = (_: number, bytes: Uint8Array, start: number, end: number) => scopeNotification(bytes, start, end, prefix);

  const ordinary = fc.oneof(
    fc.uint8Array({ maxLength: 40 }).map((b) => message("D", b)),
    fc.constant(message("Z", Uint8Array.of(0x49))),
    fc.uint8Array({ minLength: 1000, maxLength: 1500 }).map((b) => message("d", b)), // spans chunks
  );
  const note = fc.tuple(fc.boolean(), fc.string({ maxLength: 20 }), fc.string({ maxLength: 40 })).map(([mine, ch, payload]) => ({
    raw: notification(99, `${mine ? MINE : THEIRS}${ch.replace(/\0/g, "")}`, payload.replace(/\0/g, "")),
    seen: mine ? notification(99, ch.replace(/\0/g, ""), payload.replace(/\0/g, "")) : undefined,
  }));

  test("cut anywhere: other messages byte for byte and in order, notifications scoped", () => {
    fc.assert(
      fc.property(fc.array(fc.oneof(ordinary.map((raw) => ({ raw, seen: raw as Uint8Array | undefined })), note), { maxLength: 12 }), fc.array(fc.integer({ min: 1, max: 2000 }), { maxLength: 30 }), (items, cuts) => {
        const stream = concat(items.map((i) => i.raw));
        const expected = concat(items.flatMap((i) => (i.seen ? [i.seen] : [])));
        const s = scanner();
        const out: Uint8Array[] = [];
        let at = 0;
        for (const k of [...cuts, stream.length]) {
          if (at >= stream.length) break;
          s.scan(stream.slice(at, at + k), (b) => out.push(b), inspect);
          at += k;
        }
        expect(concat(out)).toEqual(expected);
      }),
      { numRuns: 600 },
    );
  });

  test("a chunk without notifications goes out as the same object; with one, only it is replaced", () => {
    const chunk = concat([message("D", Uint8Array.of(1, 2, 3)), message("Z", Uint8Array.of(0x49))]);
    const out: Uint8Array[] = [];
    scanner().scan(chunk, (b) => out.push(b), inspect);
    expect(out).toHaveLength(1);
    expect(out[0]).toBe(chunk);

    const before = message("D", Uint8Array.of(1));
    const after = message("Z", Uint8Array.of(0x49));
    const mixed = concat([before, notification(5, `${MINE}a`, "b"), after]);
    const parts: Uint8Array[] = [];
    scanner().scan(mixed, (b) => parts.push(b), inspect);
    expect(parts).toEqual([before, notification(5, "a", "b"), after]);
    expect(parts[0]!.buffer).toBe(mixed.buffer); // a view, not a copy
  });

  test("a NotificationResponse too large to be one PostgreSQL sent is dropped without being held", () => {
    const huge = notification(1, `${MINE}a`, "x".repeat(MAX_NOTIFICATION));
    const out: Uint8Array[] = [];
    const s = scanner();
    for (let at = 0; at < huge.length; at += 1000) s.scan(huge.slice(at, at + 1000), (b) => out.push(b), inspect);
    s.scan(message("Z", Uint8Array.of(0x49)), (b) => out.push(b), inspect);
    expect(concat(out)).toEqual(message("Z", Uint8Array.of(0x49)));
  });
});
