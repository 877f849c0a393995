/**
 * Walks a stream of typed messages chunk by chunk, without copying what it
 * passes on. Runs of messages nobody needs to see leave as slices of the
 * chunk they arrived in (one write per chunk in the common case); only
 * messages of the watched types are assembled whole and offered to
 * `inspect`, which may replace them. The framing is read from each 5-byte
 * header; a header or watched message split across chunks is carried over.
 */
import { FramingError } from "./framer.ts";

export type Inspect = (type: number, message: Uint8Array) => Uint8Array | undefined;

export class MessageScanner {
  /** Bytes of the current pass-through message still to come. */
  private skip = 0;
  /** A header, or a watched message, being assembled across chunks. */
  private partial: Uint8Array | undefined;
  private filled = 0;
  /** Whether `partial` is just a header (type unknown until complete). */
  private partialIsHeader = false;

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

      if (this.partial) {
        const want = this.partial.length - this.filled;
        const k = Math.min(want, n - pos);
        this.partial.set(chunk.subarray(pos, pos + k), this.filled);
        this.filled += k;
        pos += k;
        start = pos;
        if (this.filled < this.partial.length) return;
        const done = this.partial;
        this.partial = undefined;
        if (this.partialIsHeader) {
          // A completed header: now we know the type and length.
          this.partialIsHeader = false;
          const length = this.length(done, 1);
          if (!this.watched(done[0]!)) {
            out(done);
            this.skip = length - 4;
          } else if (length === 4) {
            out(inspect(done[0]!, done) ?? done);
          } else {
            this.partial = new Uint8Array(1 + length);
            this.partial.set(done);
            this.filled = 5;
          }
        } else {
          out(inspect(done[0]!, done) ?? done);
        }
        continue;
      }

      if (n - pos < 5) {
        if (pos > start) out(chunk.subarray(start, pos));
        this.partial = new Uint8Array(5);
        this.partial.set(chunk.subarray(pos));
        this.filled = n - pos;
        this.partialIsHeader = true;
        return;
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

      if (pos > start) out(chunk.subarray(start, pos));
      if (pos + total <= n) {
        const message = chunk.subarray(pos, pos + total);
        out(inspect(type, message) ?? message);
        pos += total;
        start = pos;
      } else {
        this.partial = new Uint8Array(total);
        this.partial.set(chunk.subarray(pos));
        this.filled = n - pos;
        return;
      }
    }
    if (pos > start) out(chunk.subarray(start, pos));
  }

  private length(b: Uint8Array, at: number): number {
    const length = ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
    if (length < 4 || length > this.maxLength) {
      throw new FramingError(`invalid message length ${length}`);
    }
    return length;
  }
}
