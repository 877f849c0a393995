/**
 * The untyped first packet a client sends: SSLRequest, GSSENCRequest,
 * CancelRequest or StartupMessage. Pure parsing; the caller decides what
 * to do with the result.
 */
import { CANCEL_REQUEST, GSSENC_REQUEST, SSL_REQUEST } from "./messages.ts";

/** Postgres caps the startup packet at 10,000 bytes (MAX_STARTUP_PACKET_LENGTH). */
export const MAX_STARTUP_PACKET = 10_000;
/** A length word plus a request code: the smallest packet that means anything. */
export const MIN_STARTUP_PACKET = 8;

export type StartupPacket =
  | { kind: "ssl" }
  | { kind: "gssenc" }
  | { kind: "cancel"; processId: number; secretKey: Uint8Array }
  | { kind: "startup"; major: number; minor: number; params: Map<string, string> }
  | { kind: "invalid"; reason: string };

// fatal: refuse what is not UTF-8; ignoreBOM: keep a leading U+FEFF as data.
const decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/** @param body the packet after its length word */
export function parseStartupPacket(body: Uint8Array): StartupPacket {
  if (body.length < 4) return { kind: "invalid", reason: "startup packet too short" };
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  const code = view.getInt32(0);

  if (code === SSL_REQUEST) return body.length === 4 ? { kind: "ssl" } : invalid("malformed SSLRequest");
  if (code === GSSENC_REQUEST) return body.length === 4 ? { kind: "gssenc" } : invalid("malformed GSSENCRequest");
  if (code === CANCEL_REQUEST) {
    // 3.0 keys are 4 bytes; 3.2 allows up to 256.
    if (body.length < 12 || body.length > 4 + 4 + 256) return invalid("malformed CancelRequest");
    return { kind: "cancel", processId: view.getInt32(4), secretKey: body.slice(8) };
  }

  const major = code >>> 16;
  const minor = code & 0xffff;
  if (major !== 3) {
    return invalid(`unsupported frontend protocol ${major}.${minor}: server supports 3.0 to 3.0`);
  }
  return parseParams(body.subarray(4), major, minor);
}

function parseParams(bytes: Uint8Array, major: number, minor: number): StartupPacket {
  const params = new Map<string, string>();
  let at = 0;
  for (;;) {
    if (at >= bytes.length) return invalid("startup packet is missing its terminator");
    if (bytes[at] === 0) break;
    const keyEnd = bytes.indexOf(0, at);
    if (keyEnd < 0) return invalid("unterminated parameter name in startup packet");
    const valueEnd = bytes.indexOf(0, keyEnd + 1);
    if (valueEnd < 0) return invalid("unterminated parameter value in startup packet");
    let key: string;
    let value: string;
    try {
      key = decoder.decode(bytes.subarray(at, keyEnd));
      value = decoder.decode(bytes.subarray(keyEnd + 1, valueEnd));
    } catch {
      return invalid("startup packet is not valid UTF-8");
    }
    if (params.has(key)) return invalid(`duplicate startup parameter "${key.replace(/[\u0000-\u001f\u007f]/g, "?").slice(0, 64)}"`);
    params.set(key, value);
    at = valueEnd + 1;
  }
  if (at !== bytes.length - 1) return invalid("trailing bytes after startup packet terminator");
  return { kind: "startup", major, minor, params };
}

function invalid(reason: string): StartupPacket {
  return { kind: "invalid", reason };
}
