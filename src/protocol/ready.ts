/**
 * Knows whether a session is idle: no query in flight and no transaction
 * open. It walks both directions' message headers (never copying, never
 * holding more than a header across chunks): the client's Query, Sync and
 * FunctionCall each owe a ReadyForQuery, and each ReadyForQuery from the
 * server pays one and carries the transaction status ('I' idle, 'T' in a
 * transaction, 'E' in a failed one). Counting, not a flag, because clients
 * pipeline: a ReadyForQuery may answer the first of several queries.
 */
import { FramingError } from "./framer.ts";

const QUERY = 0x51; // 'Q'
const SYNC = 0x53; // 'S'
const FUNCTION_CALL = 0x46; // 'F'
const READY_FOR_QUERY = 0x5a; // 'Z'
const IDLE = 0x49; // 'I'

/** Calls back at each message header of a stream, and with the first body byte of one type. */
export class HeaderWalker {
  private skip = 0;
  private header = 0; // bytes of a split header, big-endian, in an int
  private headerFill = 0;
  private firstByteNext = false;

  constructor(
    private readonly onHeader: (type: number) => void,
    private readonly firstByteOf = -1,
    private readonly onFirstByte: (byte: number) => void = () => {},
  ) {}

  /** Between messages: nothing of a message is outstanding. */
  get atBoundary(): boolean {
    return this.skip === 0 && this.headerFill === 0 && !this.firstByteNext;
  }

  walk(chunk: Uint8Array): void {
    const n = chunk.length;
    let pos = 0;
    while (pos < n) {
      if (this.firstByteNext) {
        this.firstByteNext = false;
        this.onFirstByte(chunk[pos]!);
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
      let type: number;
      let length: number;
      if (this.headerFill === 0 && n - pos >= 5) {
        type = chunk[pos]!;
        length = ((chunk[pos + 1]! << 24) | (chunk[pos + 2]! << 16) | (chunk[pos + 3]! << 8) | chunk[pos + 4]!) >>> 0;
        pos += 5;
      } else {
        // A header split across chunks: its five bytes, gathered into one
        // 40-bit number (exact in a double) until all have arrived.
        while (this.headerFill < 5 && pos < n) {
          this.header = (this.headerFill === 0 ? 0 : this.header * 256) + chunk[pos]!;
          this.headerFill++;
          pos++;
        }
        if (this.headerFill < 5) return;
        this.headerFill = 0;
        type = Math.floor(this.header / 2 ** 32);
        length = this.header % 2 ** 32;
      }
      if (length < 4) throw new FramingError(`invalid message length ${length}`);
      this.skip = length - 4;
      this.onHeader(type!);
      if (type! === this.firstByteOf && this.skip >= 1) this.firstByteNext = true;
    }
  }
}

export class QueryTracker {
  /** Query/Sync/FunctionCall sent whose ReadyForQuery has not come back. */
  pending = 0;
  /** Transaction status from the last ReadyForQuery. */
  status = IDLE;

  private readonly client = new HeaderWalker((type) => {
    if (type === QUERY || type === SYNC || type === FUNCTION_CALL) this.pending++;
  });

  private readonly server = new HeaderWalker(
    () => {},
    READY_FOR_QUERY,
    (status) => {
      this.status = status;
      if (this.pending > 0) this.pending--;
    },
  );

  fromClient(chunk: Uint8Array): void {
    this.client.walk(chunk);
  }

  fromServer(chunk: Uint8Array): void {
    this.server.walk(chunk);
  }

  /** Nothing owed, no transaction open, and both streams between messages. */
  get idle(): boolean {
    return this.pending === 0 && this.status === IDLE && this.server.atBoundary && this.client.atBoundary;
  }

  get busy(): boolean {
    return this.pending > 0;
  }
}
