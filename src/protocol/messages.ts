/**
 * Codecs for the messages the proxy itself reads or writes. Pure functions:
 * bytes in, values out, and back. Everything else passes through untouched.
 */

const encoder = new TextEncoder();
// ignoreBOM: a value that begins with U+FEFF keeps it (the default would drop
// it, and a password or user name would silently change).
const decoder = new TextDecoder("utf-8", { ignoreBOM: true });

// Request codes of the untyped first packet (major 1234 marks a request).
export const SSL_REQUEST = 80877103;
export const GSSENC_REQUEST = 80877104;
export const CANCEL_REQUEST = 80877102;
export const PROTOCOL_3_0 = 196608;

// Authentication request codes ('R' messages).
export const AUTH = {
  ok: 0,
  kerberosV5: 2,
  cleartextPassword: 3,
  md5Password: 5,
  gss: 7,
  gssContinue: 8,
  sspi: 9,
  sasl: 10,
  saslContinue: 11,
  saslFinal: 12,
} as const;

/** Message type bytes the proxy looks at. */
export const MSG = {
  authentication: 0x52, // 'R'
  backendKeyData: 0x4b, // 'K'
  errorResponse: 0x45, // 'E'
  noticeResponse: 0x4e, // 'N'
  parameterStatus: 0x53, // 'S'
  readyForQuery: 0x5a, // 'Z'
  negotiateProtocolVersion: 0x76, // 'v'
  parseComplete: 0x31, // '1'
  bindComplete: 0x32, // '2'
  dataRow: 0x44, // 'D'
  commandComplete: 0x43, // 'C'
  password: 0x70, // 'p' (also SASL responses)
  terminate: 0x58, // 'X'
} as const;

// ---------------------------------------------------------------- writing

/** Builds one message: a type byte (or none) and a length word, then fields. */
class MessageWriter {
  private parts: Uint8Array[] = [];
  private size = 0;

  int32(n: number): this {
    const b = new Uint8Array(4);
    new DataView(b.buffer).setInt32(0, n);
    return this.bytes(b);
  }
  int16(n: number): this {
    const b = new Uint8Array(2);
    new DataView(b.buffer).setInt16(0, n);
    return this.bytes(b);
  }
  byte(n: number): this {
    return this.bytes(Uint8Array.of(n));
  }
  cstring(s: string): this {
    return this.bytes(encoder.encode(s)).byte(0);
  }
  bytes(b: Uint8Array): this {
    this.parts.push(b);
    this.size += b.length;
    return this;
  }

  /** Finish as a typed message (type 0 = untyped startup-phase packet). */
  finish(type: number): Uint8Array {
    const header = type === 0 ? 4 : 5;
    const out = new Uint8Array(header + this.size);
    const view = new DataView(out.buffer);
    if (type !== 0) out[0] = type;
    view.setInt32(header - 4, this.size + 4);
    let at = header;
    for (const p of this.parts) {
      out.set(p, at);
      at += p.length;
    }
    return out;
  }
}

export interface ErrorFields {
  severity: "ERROR" | "FATAL";
  code: string;
  message: string;
  detail?: string;
  hint?: string;
}

function errorOrNotice(type: number, f: ErrorFields): Uint8Array {
  const w = new MessageWriter();
  // 'S' localized severity, 'V' non-localized severity, 'C' SQLSTATE, 'M' message.
  w.byte(0x53).cstring(f.severity).byte(0x56).cstring(f.severity);
  w.byte(0x43).cstring(f.code).byte(0x4d).cstring(f.message);
  if (f.detail) w.byte(0x44).cstring(f.detail);
  if (f.hint) w.byte(0x48).cstring(f.hint);
  return w.byte(0).finish(type);
}

export function errorResponse(f: ErrorFields): Uint8Array {
  return errorOrNotice(MSG.errorResponse, f);
}

export function startupMessage(params: ReadonlyMap<string, string>): Uint8Array {
  const w = new MessageWriter().int32(PROTOCOL_3_0);
  for (const [k, v] of params) w.cstring(k).cstring(v);
  return w.byte(0).finish(0);
}

export function cancelRequest(processId: number, secretKey: number): Uint8Array {
  return new MessageWriter().int32(CANCEL_REQUEST).int32(processId).int32(secretKey).finish(0);
}

export function backendKeyData(key: { processId: number; secretKey: number }): Uint8Array {
  return new MessageWriter().int32(key.processId).int32(key.secretKey).finish(MSG.backendKeyData);
}

export function authenticationRequest(code: number): Uint8Array {
  return new MessageWriter().int32(code).finish(MSG.authentication);
}

export function authenticationSASL(mechanisms: readonly string[]): Uint8Array {
  const w = new MessageWriter().int32(AUTH.sasl);
  for (const m of mechanisms) w.cstring(m);
  return w.byte(0).finish(MSG.authentication);
}

/** AuthenticationSASLContinue / AuthenticationSASLFinal: a SCRAM server message. */
export function authenticationSASLData(code: typeof AUTH.saslContinue | typeof AUTH.saslFinal, data: string): Uint8Array {
  return new MessageWriter().int32(code).bytes(encoder.encode(data)).finish(MSG.authentication);
}

export function passwordMessage(password: string): Uint8Array {
  return new MessageWriter().cstring(password).finish(MSG.password);
}

/** Tells a client asking for a newer minor version (3.2) what we speak. */
export function negotiateProtocolVersion(newestMinor: number, unrecognized: readonly string[]): Uint8Array {
  const w = new MessageWriter().int32((3 << 16) | newestMinor).int32(unrecognized.length);
  for (const name of unrecognized) w.cstring(name);
  return w.finish(MSG.negotiateProtocolVersion);
}

/**
 * One extended-protocol round: Parse, Bind (text parameters), Execute, and
 * Sync unless `sync` is false (several statements under one Sync run in one
 * implicit transaction). Parameters travel as bind values, so they are
 * data, never SQL.
 */
export function extendedQuery(sql: string, params: readonly string[], sync = true): Uint8Array {
  const parse = new MessageWriter().cstring("").cstring(sql).int16(0).finish(0x50);
  const bind = new MessageWriter().cstring("").cstring("").int16(0).int16(params.length);
  for (const p of params) {
    const b = encoder.encode(p);
    bind.int32(b.length).bytes(b);
  }
  const execute = new MessageWriter().cstring("").int32(0).finish(0x45);
  const parts = [parse, bind.int16(0).finish(0x42), execute];
  if (sync) parts.push(new MessageWriter().finish(0x53));
  return concat(parts);
}

export function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

// ---------------------------------------------------------------- reading

function int32(body: Uint8Array, at: number): number {
  return new DataView(body.buffer, body.byteOffset, body.byteLength).getInt32(at);
}

/** Reads NUL-terminated strings from `at` until an empty one or the end. */
function cstrings(body: Uint8Array, at: number): string[] {
  const out: string[] = [];
  while (at < body.length) {
    const nul = body.indexOf(0, at);
    if (nul < 0 || nul === at) break;
    out.push(decoder.decode(body.subarray(at, nul)));
    at = nul + 1;
  }
  return out;
}

export type AuthRequest =
  | { code: typeof AUTH.md5Password; salt: Uint8Array }
  | { code: typeof AUTH.sasl; mechanisms: string[] }
  | { code: number };

export function readAuthRequest(body: Uint8Array): AuthRequest {
  if (body.length < 4) throw new Error("truncated Authentication message");
  const code = int32(body, 0);
  if (code === AUTH.md5Password) {
    if (body.length < 8) throw new Error("truncated AuthenticationMD5Password");
    return { code, salt: body.slice(4, 8) };
  }
  if (code === AUTH.sasl) return { code, mechanisms: cstrings(body, 4) };
  return { code };
}

export function readBackendKeyData(body: Uint8Array): { processId: number; secretKey: number } {
  if (body.length < 8) throw new Error("truncated BackendKeyData");
  return { processId: int32(body, 0), secretKey: int32(body, 4) };
}

/** Field code → value of an ErrorResponse or NoticeResponse. */
export function readErrorFields(body: Uint8Array): Map<string, string> {
  const fields = new Map<string, string>();
  let at = 0;
  while (at < body.length && body[at] !== 0) {
    const code = String.fromCharCode(body[at]!);
    const nul = body.indexOf(0, at + 1);
    if (nul < 0) break;
    fields.set(code, decoder.decode(body.subarray(at + 1, nul)));
    at = nul + 1;
  }
  return fields;
}

/** ParameterStatus: the setting's name and value. */
export function readParameterStatus(body: Uint8Array): [string, string] {
  const [name = "", value = ""] = cstrings(body, 0);
  return [name, value];
}

/** The password string of a PasswordMessage ('p'). */
export function readPassword(body: Uint8Array): string {
  const nul = body.indexOf(0);
  return decoder.decode(body.subarray(0, nul < 0 ? body.length : nul));
}

/** A client's SASLInitialResponse: the mechanism it chose and its first message. */
export function readSaslInitialResponse(body: Uint8Array): { mechanism: string; data: string } {
  const nul = body.indexOf(0);
  if (nul < 0 || nul + 5 > body.length) throw new Error("malformed SASLInitialResponse");
  const length = int32(body, nul + 1);
  const data = body.subarray(nul + 5);
  if (length !== data.length) throw new Error("malformed SASLInitialResponse (length mismatch)");
  return { mechanism: decoder.decode(body.subarray(0, nul)), data: decoder.decode(data) };
}

/** A client's SASLResponse: the rest of the exchange. */
export function readSaslResponse(body: Uint8Array): string {
  return decoder.decode(body);
}

/** SASLInitialResponse: the chosen mechanism and its first message. */
export function saslInitialResponse(mechanism: string, data: string): Uint8Array {
  const bytes = encoder.encode(data);
  return new MessageWriter().cstring(mechanism).int32(bytes.length).bytes(bytes).finish(MSG.password);
}

/** SASLResponse: a later message of the exchange. */
export function saslResponse(data: string): Uint8Array {
  return new MessageWriter().bytes(encoder.encode(data)).finish(MSG.password);
}

/** The mechanism-specific data of AuthenticationSASLContinue / SASLFinal. */
export function readSaslData(body: Uint8Array): string {
  return decoder.decode(body.subarray(4));
}

/** The column values of a DataRow (text format), NULL as null. */
export function readDataRow(body: Uint8Array): (string | null)[] {
  const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
  const count = view.getInt16(0);
  const values: (string | null)[] = [];
  let at = 2;
  for (let i = 0; i < count; i++) {
    const length = view.getInt32(at);
    at += 4;
    if (length < 0) {
      values.push(null);
      continue;
    }
    if (at + length > body.length) throw new Error("truncated DataRow");
    values.push(decoder.decode(body.subarray(at, at + length)));
    at += length;
  }
  return values;
}
