/**
 * A raw TCP client for protocol-level tests: the socket plumbing that the
 * raw PostgreSQL clients of several test files share (connect with a
 * deadline, peer-closed tracking, waiting for a condition with a message
 * that says what arrived). Subclasses keep the bytes their own way.
 */
import { createConnection, type Socket } from "node:net";
import { AuthAnswers } from "./scram.ts";

/** One backend message as raw clients read it. */
export interface Message {
  type: string;
  body: Buffer;
}

const decoder = new TextDecoder();

/** Field code → value of an ErrorResponse / NoticeResponse body. */
export function errorFields(body: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let at = 0;
  while (at < body.length && body[at] !== 0) {
    const nul = body.indexOf(0, at + 1);
    if (nul < 0) break;
    out[String.fromCharCode(body[at]!)] = decoder.decode(body.subarray(at + 1, nul));
    at = nul + 1;
  }
  return out;
}

/** Text values of a DataRow body (null for SQL NULL). */
export function dataRow(body: Buffer): (string | null)[] {
  const n = body.readUInt16BE(0);
  const out: (string | null)[] = [];
  let at = 2;
  for (let i = 0; i < n; i++) {
    const len = body.readInt32BE(at);
    at += 4;
    if (len < 0) out.push(null);
    else {
      out.push(decoder.decode(body.subarray(at, at + len)));
      at += len;
    }
  }
  return out;
}

export abstract class RawSocket {
  /** The peer sent FIN (or the connection was reset / closed). */
  peerClosed = false;
  closed = false;
  error: Error | undefined;
  private readonly waiters = new Set<() => void>();

  protected constructor(
    readonly socket: Socket,
    readonly label: string,
    /** Default deadline of waitFor / waitClosed. */
    protected readonly timeoutMs: number,
  ) {
    socket.on("data", (d: Buffer) => {
      this.onBytes(d);
      this.wake();
    });
    socket.on("end", () => {
      this.peerClosed = true;
      this.wake();
    });
    socket.on("error", (e) => {
      this.error = e;
      this.wake();
    });
    socket.on("close", () => {
      this.peerClosed = true;
      this.closed = true;
      this.wake();
    });
  }

  /** Bytes arrived. */
  protected abstract onBytes(d: Buffer): void;
  /** What arrived so far, for failure messages. */
  abstract state(): string;

  /** Connect (half-open allowed, no delay) or fail with a message naming the target. */
  protected static connectSocket(host: string, port: number, label: string, timeoutMs: number): Promise<Socket> {
    return new Promise((resolve, reject) => {
      const socket = createConnection({ host, port, allowHalfOpen: true });
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new Error(`${label}: could not connect to ${host}:${port} within ${timeoutMs} ms`));
      }, timeoutMs);
      socket.once("connect", () => {
        clearTimeout(timer);
        socket.setNoDelay(true);
        resolve(socket);
      });
      socket.once("error", (e) => {
        clearTimeout(timer);
        reject(new Error(`${label}: connect to ${host}:${port} failed: ${e.message}`));
      });
    });
  }

  private wake(): void {
    for (const w of [...this.waiters]) w();
  }

  /** Write and wait until the bytes are handed to the kernel. */
  send(bytes: Uint8Array): Promise<void> {
    return new Promise((resolve, reject) => {
      if (this.socket.destroyed) return reject(new Error(`${this.label}: socket already closed, cannot send ${bytes.length} bytes`));
      this.socket.write(bytes, (e) => (e ? reject(new Error(`${this.label}: write failed: ${e.message}`)) : resolve()));
    });
  }

  /** Half-close: send our FIN, keep reading. */
  end(): void {
    this.socket.end();
  }

  /** Vanish: close the socket now. */
  destroy(): void {
    this.socket.destroy();
  }

  /** Resolve once cond() holds; reject after the deadline with what was received. */
  waitFor(cond: () => boolean, what: string, timeoutMs = this.timeoutMs): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (cond()) {
          done();
          resolve();
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; ${this.state()}`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(check);
      };
      this.waiters.add(check);
      check();
    });
  }

  /** Wait for the peer to close the connection (FIN or reset). */
  waitClosed(what = "the peer to close the connection", timeoutMs = this.timeoutMs): Promise<void> {
    return this.waitFor(() => this.peerClosed, what, timeoutMs);
  }
}

type Read = (what: string) => Promise<Message>;
type Send = (bytes: Uint8Array) => Promise<void>;

/**
 * Answer authentication requests as `user` with `password` (SCRAM,
 * cleartext or MD5, test/harness/scram.ts) up to AuthenticationOk, which
 * is returned; what follows is left unread. An ErrorResponse throws. Trust
 * (AuthenticationOk at once) needs no password.
 */
export async function authenticate(read: Read, send: Send, password: string | undefined, user = ""): Promise<Message> {
  const answers = password === undefined ? undefined : new AuthAnswers(password, user);
  for (;;) {
    const m = await read(`authentication of ${user || "the client"}`);
    if (m.type === "E") throw new Error(`ErrorResponse during authentication: ${JSON.stringify(errorFields(m.body))}`);
    if (m.type !== "R") throw new Error(`expected an authentication message, got '${m.type}'`);
    if (m.body.readInt32BE(0) === 0) return m;
    if (!answers) throw new Error(`the server asks for authentication (method ${m.body.readInt32BE(0)}) and the test has no password`);
    const reply = answers.answer(m.body);
    if (reply) await send(reply);
  }
}

/** authenticate(), then read up to ReadyForQuery; returns the messages from AuthenticationOk on. */
export async function authenticateToReady(read: Read, send: Send, password: string | undefined, user = ""): Promise<Message[]> {
  const out = [await authenticate(read, send, password, user)];
  for (;;) {
    const m = await read("startup to reach ReadyForQuery");
    if (m.type === "E") throw new Error(`ErrorResponse during startup: ${JSON.stringify(errorFields(m.body))}`);
    out.push(m);
    if (m.type === "Z") return out;
  }
}
