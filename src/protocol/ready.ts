/**
 * Follows the server's message stream just far enough to know the session's
 * transaction status: the byte inside each ReadyForQuery ('I' idle, 'T' in a
 * transaction, 'E' in a failed one). Reads only 5-byte headers and that one
 * byte, copies nothing, and never holds more than a header across chunks.
 */
import { FramingError } from "./framer.ts";

const READY_FOR_QUERY = 0x5a; // 'Z'

export class ReadyTracker {
  /** Transaction status from the last ReadyForQuery; 0 before the first. */
  status = 0;
  /** Whether the server owes a ReadyForQuery (a query is in flight). */
  busy = false;
  private skip = 0;
  private header = new Uint8Array(5);
  private headerFill = 0;
  /** The next byte to arrive is a ReadyForQuery status byte. */
  private statusNext = false;

  observe(chunk: Uint8Array): void {
    let pos = 0;
    const n = chunk.length;
    while (pos < n) {
      if (this.statusNext) {
        this.status = chunk[pos]!;
        this.busy = false;
        this.statusNext = false;
        pos += 1;
        this.skip -= 1;
        continue;
      }
      if (this.skip > 0) {
        const k = Math.min(this.skip, n - pos);
        pos += k;
        this.skip -= k;
        continue;
      }
      // Read a header, possibly across chunks.
      let type: number;
      let length: number;
      if (this.headerFill > 0 || n - pos < 5) {
        const k = Math.min(5 - this.headerFill, n - pos);
        this.header.set(chunk.subarray(pos, pos + k), this.headerFill);
        this.headerFill += k;
        pos += k;
        if (this.headerFill < 5) return;
        this.headerFill = 0;
        type = this.header[0]!;
        length = readLength(this.header, 1);
      } else {
        type = chunk[pos]!;
        length = readLength(chunk, pos + 1);
        pos += 5;
      }
      if (length < 4) throw new FramingError(`invalid message length ${length} from the server`);
      this.skip = length - 4;
      if (type === READY_FOR_QUERY && this.skip >= 1) this.statusNext = true;
    }
  }
}

function readLength(b: Uint8Array, at: number): number {
  return ((b[at]! << 24) | (b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!) >>> 0;
}
