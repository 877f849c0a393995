/**
 * Walks a stream of typed messages chunk by chunk, without copying what it
 * passes on. Messages nobody needs to see leave as slices of the chunk they
 * arrived in, and so do watched messages that `inspect` lets through: a
 * chunk is split only where a message is replaced, so the common case stays
 * one write per chunk. The framing is read from each 5-byte header; a
 * header or a watched message split across chunks is carried over, held
 * as the pieces that actually arrived (a header claiming a gigabyte costs
 * nothing until the gigabyte comes).
 *
 * Two ways out of the synchronous path, both for the guard's sake:
 * - `inspect` may answer with a promise (the statement is checked off the
 *   event loop): the scanner parks, holding what follows in order, tells
 *   its owner to stop reading (`parked`), and goes on once the verdict is
 *   in (`resumed`).
 * - A watched message longer than `maxWatched` is never held: its bytes are
 *   streamed into a sink as they pass and the sink's replacement goes out
 *   in its place, so no client can make the proxy buffer a gigabyte.
 */
import { concat } from "./messages.ts";
import { FramingError } from "./framer.ts";

export type Verdict = Uint8Array | undefined;

/**
 * Sees a watched message, `bytes[start, end)`, and returns its replacement
 * or undefined (now, or as a promise). Bounds rather than a view: most
 * messages are let through, and a view per message would be an allocation
 * per query.
 */
export type Inspect = (type: number, bytes: Uint8Array, start: number, end: number) => Verdict | Promise<Verdict>;

/** Takes the body of a watched message too large to hold; gives its replacement at the end. */
export interface OversizeSink {
  feed(bytes: Uint8Array): void;
  end(): Uint8Array;
}

export interface ScannerHooks {
  /** Largest watched message (whole, header included) that is held for `inspect`. */
  maxWatched: number;
  oversize(type: number, length: number): OversizeSink;
  /** An inspection is pending: stop feeding until `resumed`. */
  parked(): void;
  resumed(): void;
  /** Scanning what waited while parked failed (a framing error). */
  failed(error: Error): void;
}

type Out = (bytes: Uint8Array) => void;

export class MessageScanner {
  /** Bytes of the current pass-through message still to come. */
  private skip = 0;
  /** Bytes of the current oversize message still to come, and where they go. */
  private drop = 0;
  private sink: OversizeSink | undefined;
  /** A header split across chunks. */
  private header: Uint8Array | undefined;
  private headerFill = 0;
  /** A watched message split across chunks: its pieces so far, and its size. */
  private pieces: Uint8Array[] | undefined;
  private piecesHave = 0;
  private piecesNeed = 0;
  /** Parked: chunks that arrived (or were left over) while a verdict is pending. */
  private waiting: Uint8Array[] | undefined;
  /** Going through what waited: parking again needs no new `parked` call. */
  private resuming = false;

  constructor(
    private readonly watched: (type: number) => boolean,
    private readonly maxLength: number,
    private readonly hooks?: ScannerHooks,
  ) {}

  get isParked(): boolean {
    return this.waiting !== undefined;
  }

  scan(chunk: Uint8Array, out: Out, inspect: Inspect): void {
    if (this.waiting) {
      this.waiting.push(chunk);
      return;
    }
    const n = chunk.length;
    const maxWatched = this.hooks?.maxWatched ?? Infinity;
    let pos = 0;
    let start = 0; // first byte not yet handed to `out`

    while (pos < n) {
      if (this.skip > 0) {
        const k = Math.min(this.skip, n - pos);
        pos += k;
        this.skip -= k;
        continue;
      }

      if (this.drop > 0) {
        const k = Math.min(this.drop, n - pos);
        this.sink!.feed(chunk.subarray(pos, pos + k));
        pos += k;
        start = pos;
        this.drop -= k;
        if (this.drop === 0) {
          out(this.sink!.end());
          this.sink = undefined;
        }
        continue;
      }

      if (this.pieces) {
        const k = Math.min(this.piecesNeed - this.piecesHave, n - pos);
        this.pieces.push(chunk.slice(pos, pos + k));
        this.piecesHave += k;
        pos += k;
        start = pos;
        if (this.piecesHave < this.piecesNeed) return;
        const message = concat(this.pieces);
        this.pieces = undefined;
        const verdict = inspect(message[0]!, message, 0, message.length);
        if (verdict instanceof Promise) return this.park(message, verdict, chunk.subarray(pos), out, inspect);
        out(verdict ?? message);
        continue;
      }

      if (this.headerFill > 0 || n - pos < 5) {
        // A header split across chunks: hold its bytes back until we know
        // whether its message is watched.
        if (pos > start) out(chunk.subarray(start, pos));
        this.header ??= new Uint8Array(5);
        const k = Math.min(5 - this.headerFill, n - pos);
        this.header.set(chunk.subarray(pos, pos + k), this.headerFill);
        this.headerFill += k;
        pos += k;
        start = pos;
        if (this.headerFill < 5) return;
        this.headerFill = 0;
        const header = this.header.slice();
        const length = this.length(header, 1);
        if (!this.watched(header[0]!)) {
          out(header);
          this.skip = length - 4;
        } else if (1 + length > maxWatched) {
          this.sink = this.hooks!.oversize(header[0]!, length);
          this.drop = length - 4;
        } else if (length === 4) {
          const verdict = inspect(header[0]!, header, 0, 5);
          if (verdict instanceof Promise) return this.park(header, verdict, chunk.subarray(pos), out, inspect);
          out(verdict ?? header);
        } else {
          this.pieces = [header];
          this.piecesHave = 5;
          this.piecesNeed = 1 + length;
        }
        continue;
      }

      const type = chunk[pos]!;
      const total = 1 + this.length(chunk, pos + 1);
      if (!this.watched(type)) {
        if (pos + total <= n) pos += total;
        else {
          this.skip = pos + total - n;
          pos = n;
        }
        continue;
      }

      if (total > maxWatched) {
        // Too large to hold: what came before goes on, the header goes, and
        // the body is streamed into the sink, whose replacement goes out.
        if (pos > start) out(chunk.subarray(start, pos));
        this.sink = this.hooks!.oversize(type, total - 1);
        this.drop = total - 5;
        pos += 5;
        start = pos;
        continue;
      }

      if (pos + total <= n) {
        const verdict = inspect(type, chunk, pos, pos + total);
        if (verdict instanceof Promise) {
          if (pos > start) out(chunk.subarray(start, pos));
          return this.park(chunk.slice(pos, pos + total), verdict, chunk.subarray(pos + total), out, inspect);
        }
        if (verdict) {
          if (pos > start) out(chunk.subarray(start, pos));
          out(verdict);
          start = pos + total;
        }
        pos += total;
      } else {
        // Watched and incomplete: what came before goes on, the rest waits.
        if (pos > start) out(chunk.subarray(start, pos));
        this.pieces = [chunk.slice(pos)];
        this.piecesHave = n - pos;
        this.piecesNeed = total;
        return;
      }
    }
    // The common case, the whole chunk untouched, goes out as it came.
    if (start === 0 && pos === n) out(chunk);
    else if (pos > start) out(chunk.subarray(start, pos));
  }

  /** Hold everything after `message` until its verdict is in; then carry on in order. */
  private park(message: Uint8Array, verdict: Promise<Verdict>, rest: Uint8Array, out: Out, inspect: Inspect): void {
    this.waiting = rest.length > 0 ? [rest.slice()] : [];
    if (!this.resuming) this.hooks?.parked();
    verdict.then(
      (replacement) => {
        out(replacement ?? message);
        const queue = this.waiting!;
        this.waiting = undefined;
        this.resuming = true;
        try {
          while (queue.length > 0) {
            this.scan(queue.shift()!, out, inspect);
            if (this.waiting) {
              (this.waiting as Uint8Array[]).push(...queue);
              return;
            }
          }
        } catch (e) {
          this.hooks?.failed(e as Error);
          return;
        } finally {
          this.resuming = false;
        }
        this.hooks?.resumed();
      },
      (e: Error) => this.hooks?.failed(e),
    );
  }

  private length(b: Uint8Array, at: number): number {
    const length = ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
    if (length < 4 || length > this.maxLength) {
      throw new FramingError(`invalid message length ${length}`);
    }
    return length;
  }
}
