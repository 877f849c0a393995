/**
 * Walks a stream of typed messages chunk by chunk, without copying what it
 * passes on. Messages nobody needs to see leave as slices of the chunk they
 * arrived in, and so do watched messages that `inspect` lets through: a
 * chunk is split only where a message is replaced, so the common case stays
 * one write per chunk. The framing is read from each 5-byte header; a
 * header or a watched message split across chunks is carried over, held
 * as the pieces that actually arrived (a header claiming a gigabyte costs
 * nothing until the gigabyte comes).
 */
import { concat } from "./messages.ts";
import { FramingError } from "./framer.ts";

/**
 * Sees a watched message, `bytes[start, end)`, and returns its replacement
 * or undefined. Bounds rather than a view: most messages are let through,
 * and a view per message would be an allocation per query.
 */
export type Inspect = (type: number, bytes: Uint8Array, start: number, end: number) => Uint8Array | undefined;

export class MessageScanner {
  /** Bytes of the current pass-through message still to come. */
  private skip = 0;
  /** A header split across chunks. */
  private header: Uint8Array | undefined;
  private headerFill = 0;
  /** A watched message split across chunks: its pieces so far, and its size. */
  private pieces: Uint8Array[] | undefined;
  private piecesHave = 0;
  private piecesNeed = 0;

  constructor(
    private readonly watched: (type: number) => boolean,
    private readonly maxLength: number,
  ) {}

  scan(chunk: Uint8Array, out: (bytes: Uint8Array) => void, inspect: Inspect): void {
    const n = chunk.length;
    let pos = 0;
    let start = 0; // first byte not yet handed to `out`

    while (pos < n) {
      if (this.skip > 0) {
        const k = Math.min(this.skip, n - pos);
        pos += k;
        this.skip -= k;
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
        out(inspect(message[0]!, message, 0, message.length) ?? message);
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
        } else if (length === 4) {
          out(inspect(header[0]!, header, 0, 5) ?? header);
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

      if (pos + total <= n) {
        const replacement = inspect(type, chunk, pos, pos + total);
        if (replacement) {
          if (pos > start) out(chunk.subarray(start, pos));
          out(replacement);
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

  private length(b: Uint8Array, at: number): number {
    const length = ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
    if (length < 4 || length > this.maxLength) {
      throw new FramingError(`invalid message length ${length}`);
    }
    return length;
  }
}
