/**
 * Message framing for the PostgreSQL v3 protocol, with no I/O.
 *
 * Bytes arrive in arbitrary chunks; the framer keeps them in one growable
 * buffer, consumed from the front and compacted when it runs out of room at
 * the back (a ring buffer unrolled, so every frame is one contiguous view).
 * Frames returned by `next()` are views into that buffer: valid until the
 * next `push()`, which is all the callers need (they act on a frame before
 * reading more).
 *
 * The proxy only frames what it must look at (startup and authentication);
 * in the transparent state bytes bypass the framer entirely.
 */

export class FramingError extends Error {}

export interface Frame {
  /** Message type byte, or 0 for the untyped startup-phase packet. */
  type: number;
  /** Payload after the length word. */
  body: Uint8Array;
  /** The whole message as it came off the wire (type, length, payload). */
  raw: Uint8Array;
}

export class Framer {
  private buf: Uint8Array;
  private start = 0;
  private end = 0;

  /**
   * @param maxLength largest accepted length word (which counts itself);
   *   anything larger is a framing error, never an allocation.
   */
  constructor(
    private readonly maxLength: number,
    initialCapacity = 1024,
  ) {
    this.buf = new Uint8Array(initialCapacity);
  }

  get buffered(): number {
    return this.end - this.start;
  }

  push(chunk: Uint8Array): void {
    const need = this.end - this.start + chunk.length;
    if (this.end + chunk.length > this.buf.length) {
      if (need <= this.buf.length) {
        this.buf.copyWithin(0, this.start, this.end);
      } else {
        let size = this.buf.length * 2;
        while (size < need) size *= 2;
        const grown = new Uint8Array(size);
        grown.set(this.buf.subarray(this.start, this.end));
        this.buf = grown;
      }
      this.end -= this.start;
      this.start = 0;
    }
    this.buf.set(chunk, this.end);
    this.end += chunk.length;
  }

  /** Next typed message (type byte + Int32 length), or null if incomplete. */
  next(): Frame | null {
    if (this.end - this.start < 5) return null;
    const type = this.buf[this.start]!;
    const length = readLength(this.buf, this.start + 1);
    if (length < 4 || length > this.maxLength) {
      throw new FramingError(`invalid message length ${length} for message type ${printable(type)}`);
    }
    return this.take(type, 1 + length, 5);
  }

  /** Next untyped startup-phase packet (Int32 length first), or null. */
  nextUntyped(minLength: number): Frame | null {
    if (this.end - this.start < 4) return null;
    const length = readLength(this.buf, this.start);
    if (length < minLength || length > this.maxLength) {
      throw new FramingError(`invalid startup packet length ${length}`);
    }
    return this.take(0, length, 4);
  }

  /** Everything still buffered, handing ownership to the caller. */
  drain(): Uint8Array {
    const rest = this.buf.slice(this.start, this.end);
    this.start = this.end = 0;
    return rest;
  }

  private take(type: number, total: number, header: number): Frame | null {
    if (this.end - this.start < total) return null;
    const raw = this.buf.subarray(this.start, this.start + total);
    this.start += total;
    if (this.start === this.end) this.start = this.end = 0;
    return { type, body: raw.subarray(header), raw };
  }
}

function readLength(buf: Uint8Array, at: number): number {
  return ((buf[at]! << 24) | (buf[at + 1]! << 16) | (buf[at + 2]! << 8) | buf[at + 3]!) >>> 0;
}

function printable(type: number): string {
  return type >= 0x20 && type < 0x7f ? `'${String.fromCharCode(type)}'` : `0x${type.toString(16)}`;
}
