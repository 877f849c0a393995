/**
 * The guard on a tenant session's client-to-server stream. It looks at the
 * three messages that can carry SQL or a function call (Query, Parse,
 * FunctionCall) and swaps a forbidden one for a statement that raises
 * 42501 with the reason. The forbidden statement never reaches the server,
 * and the server itself produces the error, so the reply has the shape the
 * client expects and the transaction state stays right (an error inside a
 * transaction block aborts it, as the refused statement would have).
 */
import { concat } from "../protocol/messages.ts";
import { checkSql, type Verdict } from "./rules.ts";

const QUERY = 0x51; // 'Q'
const PARSE = 0x50; // 'P'
const FUNCTION_CALL = 0x46; // 'F'

const TEXT_OID = 25;

/**
 * Statements larger than this (bulk INSERTs, huge literals) pass unlexed:
 * lexing megabytes on the event loop would stall every other session. The
 * guard is defence in depth; the database's check does not depend on it.
 */
export const MAX_LEXED = 1 << 20;

/** pg_catalog.set_config(text, text, boolean): its OID is fixed in every release. */
const SET_CONFIG_OID = 2078;

export const guardWatches = (type: number) => type === QUERY || type === PARSE || type === FUNCTION_CALL;

const decoder = new TextDecoder("utf-8", { ignoreBOM: true }); // a leading U+FEFF is part of the SQL
const encoder = new TextEncoder();

/**
 * Returns the replacement for a forbidden message, `bytes[start, end)`, or
 * undefined to pass it on. Ordinary queries cost one pass of the byte
 * filter and no allocation.
 */
export function guardMessage(type: number, bytes: Uint8Array, start: number, end: number, protectedNames: readonly string[]): Uint8Array | undefined {
  const from = start + 5;
  if (type !== FUNCTION_CALL && (end - from > MAX_LEXED || !mayBeForbidden(bytes, from, end))) return undefined;
  const body = bytes.subarray(from, end);
  if (type === QUERY) {
    const verdict = checkSql(cstring(body, 0)[0], protectedNames);
    return verdict && frame(QUERY, [encoder.encode(refusal(verdict)), Uint8Array.of(0)]);
  }
  if (type === PARSE) {
    const [name, afterName] = cstring(body, 0);
    const [sql, afterSql] = cstring(body, afterName);
    const verdict = checkSql(sql, protectedNames);
    if (!verdict) return undefined;
    // Same statement name and number of parameters, so the client's Bind
    // still fits; declared as text, since the refusal never reads them and
    // the server would reject parameters of unknown type.
    const count = afterSql + 2 <= body.length ? new DataView(body.buffer, body.byteOffset + afterSql, 2).getInt16(0) : 0;
    const types = new Uint8Array(2 + 4 * Math.max(count, 0));
    const view = new DataView(types.buffer);
    view.setInt16(0, Math.max(count, 0));
    for (let k = 0; k < count; k++) view.setInt32(2 + 4 * k, TEXT_OID);
    return frame(PARSE, [encoder.encode(name), Uint8Array.of(0), encoder.encode(refusal(verdict)), Uint8Array.of(0), types]);
  }
  if (type === FUNCTION_CALL && body.length >= 4) {
    const oid = new DataView(body.buffer, body.byteOffset, 4).getInt32(0);
    if (oid !== SET_CONFIG_OID) return undefined;
    const verdict = { statement: "FunctionCall set_config", reason: "set_config() by function call is not allowed through multigres" };
    return frame(QUERY, [encoder.encode(refusal(verdict)), Uint8Array.of(0)]);
  }
  return undefined;
}

/**
 * The hot-path filter, on raw bytes, before anything is decoded: every
 * forbidden statement contains "set" (SET, RESET, set_config, ALTER … SET)
 * or "discard", in any case, unless it hides a name in U&"…" escapes.
 * Most queries contain none of these and cost one pass over their bytes.
 */
export function mayBeForbidden(b: Uint8Array, from = 0, to = b.length): boolean {
  const n = to;
  for (let i = from; i + 1 < n; i++) {
    const c = b[i]! | 0x20;
    if (c === 0x73 /* s */) {
      if (i + 2 < n && (b[i + 1]! | 0x20) === 0x65 && (b[i + 2]! | 0x20) === 0x74) return true;
    } else if (c === 0x64 /* d */) {
      if (i + 6 < n && (b[i + 1]! | 0x20) === 0x69 && (b[i + 2]! | 0x20) === 0x73 && (b[i + 3]! | 0x20) === 0x63) return true;
    } else if (c === 0x75 /* u */ && b[i + 1] === 0x26 /* & */) {
      return true;
    }
  }
  return false;
}

/** SQL that fails with 42501 and says why. Only our own text goes in it. */
function refusal(v: Verdict): string {
  const literal = (s: string) => `'${s.replace(/'/g, "''").replace(/\$/g, "")}'`;
  return (
    "DO $multigres_guard$ BEGIN RAISE EXCEPTION USING ERRCODE = '42501', " +
    `MESSAGE = ${literal(`multigres: ${v.reason}`)}, ` +
    `HINT = ${literal("the role and the tenant context are fixed for the connection; connect as another <role>.<tenant> instead")}; ` +
    "END $multigres_guard$"
  );
}

function cstring(body: Uint8Array, at: number): [string, number] {
  const nul = body.indexOf(0, at);
  const end = nul < 0 ? body.length : nul;
  return [decoder.decode(body.subarray(at, end)), end + 1];
}

function frame(type: number, parts: Uint8Array[]): Uint8Array {
  const payload = concat(parts);
  const out = new Uint8Array(5 + payload.length);
  out[0] = type;
  new DataView(out.buffer).setInt32(1, 4 + payload.length);
  out.set(payload, 5);
  return out;
}
