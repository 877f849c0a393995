/**
 * The guard on a tenant session's client-to-server stream. It looks at the
 * three messages that can carry SQL or a function call (Query, Parse,
 * FunctionCall) and swaps a forbidden one for a statement that raises
 * 42501 with the reason. The forbidden statement never reaches the server,
 * and the server itself produces the error, so the reply has the shape the
 * client expects and the transaction state stays right (an error inside a
 * transaction block aborts it, as the refused statement would have).
 * Statements that use LISTEN/NOTIFY channels are rewritten instead, to the
 * session's channels (guard/channels.ts).
 */
import { concat } from "../protocol/messages.ts";
import type { OversizeSink } from "../protocol/scanner.ts";
import { scopeChannels } from "./channels.ts";
import { checkSql, type RefusalKind, type Verdict } from "./rules.ts";

const QUERY = 0x51; // 'Q'
const PARSE = 0x50; // 'P'
const FUNCTION_CALL = 0x46; // 'F'

const TEXT_OID = 25;

/**
 * The default of --guard-max-statement: the largest statement the guard
 * holds and reads. A larger Query, Parse or FunctionCall is refused (54000)
 * without being held, whatever it says, so no client can make the proxy
 * buffer more than this per session. Bulk data belongs in COPY or bind
 * parameters, which the guard never reads.
 */
export const DEFAULT_MAX_STATEMENT = 1 << 20;

/**
 * Statements larger than this are lexed on the guard worker
 * (guard/worker.ts), not on the event loop: a dense megabyte takes a few
 * hundred milliseconds to lex, which would stall every other session.
 * Below it the worst case is a few milliseconds.
 */
export const LEX_OFF_LOOP_ABOVE = 32 * 1024;

/** pg_catalog.set_config(text, text, boolean): its OID is fixed in every release. */
const SET_CONFIG_OID = 2078;
/** pg_catalog.pg_notify(text, text), likewise. */
const PG_NOTIFY_OID = 3036;

/** What the guard reads a tenant session's statements against. */
export interface GuardOptions {
  /** The protected settings (rules.ts, protectedSettings). */
  names: readonly string[];
  /** --guard strict: also EXPLAIN ANALYZE and LOCK above ROW EXCLUSIVE. */
  strict: boolean;
  /** The session's channel prefix (tenant/context.ts): LISTEN/NOTIFY are scoped to it. */
  channelPrefix?: string;
}

/** What replaces a message: a refusal (of which kind, for the log) or a rewrite. */
export interface GuardResult {
  bytes: Uint8Array;
  /** Absent for a rewrite (the statement goes on, changed). */
  refused?: RefusalKind;
}

/**
 * Words the byte filter looks for, by the rules that need them (a bit
 * each): those of the role and context rules, those of channels
 * (listen, notify), those of --guard strict (explain, lock, do, function,
 * procedure).
 */
export const CONTEXT_WORDS = 1;
export const CHANNEL_WORDS = 2;
export const STRICT_WORDS = 4;

/** The filter bits a session with these options needs. */
export function watchedWords(o: GuardOptions): number {
  return CONTEXT_WORDS | (o.channelPrefix ? CHANNEL_WORDS : 0) | (o.strict ? STRICT_WORDS : 0);
}

export const guardWatches = (type: number) => type === QUERY || type === PARSE || type === FUNCTION_CALL;

const decoder = new TextDecoder("utf-8", { ignoreBOM: true }); // a leading U+FEFF is part of the SQL
const encoder = new TextEncoder();

/**
 * Returns what replaces a message, `bytes[start, end)` (a refusal or a
 * rewrite), or undefined to pass it on. Ordinary queries cost one pass of
 * the byte filter and no allocation.
 */
export function guardMessage(type: number, bytes: Uint8Array, start: number, end: number, o: GuardOptions): GuardResult | undefined {
  const from = start + 5;
  if (type === FUNCTION_CALL) return guardFunctionCall(bytes.subarray(from, end), o);
  if (type !== QUERY && type !== PARSE) return undefined;
  const found = triggerWords(bytes, from, end, watchedWords(o));
  if (found === 0) return undefined;
  const body = bytes.subarray(from, end);
  const sqlAt = type === PARSE ? cstring(body, 0)[1] : 0;
  const verdict = found & (CONTEXT_WORDS | STRICT_WORDS) ? checkSql(cstring(body, sqlAt)[0], o.names, o.strict) : undefined;
  if (verdict) return refused(type, body, verdict);
  if (!(found & CHANNEL_WORDS) || !o.channelPrefix) return undefined;
  // Rewritten text must give back every byte it does not change: read as
  // UTF-8 when it is, else a character per byte (see channels.ts).
  const nul = body.indexOf(0, sqlAt);
  const raw = body.subarray(sqlAt, nul < 0 ? body.length : nul);
  const utf8 = decodeUtf8(raw);
  const scoped = scopeChannels(utf8 ?? Buffer.from(raw).toString("latin1"), o.channelPrefix, utf8 === undefined ? "bytes" : "utf8");
  if (scoped === undefined) return undefined;
  if (typeof scoped !== "string") return refused(type, body, { ...scoped, kind: "channel" });
  const sql = utf8 === undefined ? Buffer.from(scoped, "latin1") : encoder.encode(scoped);
  // Query: the new SQL. Parse: the same name, the new SQL, the same parameter types.
  const rest = type === PARSE && nul >= 0 ? body.subarray(nul + 1) : new Uint8Array(0);
  return { bytes: frame(type, [body.subarray(0, sqlAt), sql, Uint8Array.of(0), rest]) };
}

const utf8Decoder = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
/** The text, if the bytes are valid UTF-8 (then it encodes back to exactly them). */
function decodeUtf8(bytes: Uint8Array): string | undefined {
  try {
    return utf8Decoder.decode(bytes);
  } catch {
    return undefined;
  }
}

function refused(type: number, body: Uint8Array, verdict: Verdict): GuardResult {
  const bytes = type === PARSE ? refuseParse(body, verdict) : frame(QUERY, [encoder.encode(refusal(verdict)), Uint8Array.of(0)]);
  return { bytes, refused: verdict.kind ?? "context" };
}

/** FunctionCall ('F') carries no SQL, only a function's OID: two are refused by it. */
function guardFunctionCall(body: Uint8Array, o: GuardOptions): GuardResult | undefined {
  if (body.length < 4) return undefined;
  const oid = new DataView(body.buffer, body.byteOffset, 4).getInt32(0);
  if (oid === SET_CONFIG_OID) {
    return refused(QUERY, body, { statement: "FunctionCall set_config", reason: "set_config() by function call is not allowed through multigres", kind: "context" });
  }
  if (oid === PG_NOTIFY_OID && o.channelPrefix) {
    return refused(QUERY, body, {
      statement: "FunctionCall pg_notify",
      reason: "pg_notify() by function call cannot be scoped to the tenant's channels",
      hint: "call pg_notify in SQL instead (SELECT pg_notify(channel, payload), bind parameters welcome), which multigres scopes to the tenant",
      kind: "channel",
    });
  }
  return undefined;
}

/**
 * The hot-path filter, on raw bytes, before anything is decoded: which of
 * the `want`ed groups of words (CONTEXT_WORDS …) the bytes contain, in any
 * case. Every statement the role and context rules refuse contains "set"
 * (SET, RESET, set_config, ALTER … SET), "discard", "role", "user" or
 * "group" (ALTER/CREATE/DROP ROLE); every one that uses a channel "listen"
 * or "notify" (UNLISTEN, pg_notify); every one --guard strict refuses
 * "explain" or "lock". A name can hide from all of them only in U&"…"
 * escapes, so "u&" counts for every group. Most queries contain none of
 * these: one pass over their bytes, no allocation, and it stops as soon
 * as every wanted group is found.
 */
export function triggerWords(b: Uint8Array, from = 0, to = b.length, want = CONTEXT_WORDS | CHANNEL_WORDS | STRICT_WORDS): number {
  const n = to;
  const at = (i: number, word: string) => {
    if (i + word.length > n) return false;
    for (let k = 1; k < word.length; k++) if ((b[i + k]! | 0x20) !== word.charCodeAt(k)) return false;
    return true;
  };
  let found = 0;
  for (let i = from; i + 1 < n && found !== want; i++) {
    // One switch on the lower-cased byte: a byte that starts no word costs
    // one comparison of the jump table, whatever the number of words.
    switch (b[i]! | 0x20) {
      case 0x73 /* s */:
        if (at(i, "set")) found |= CONTEXT_WORDS & want;
        break;
      case 0x64 /* d */:
        if (at(i, "disc")) found |= CONTEXT_WORDS & want;
        // DO as a word of its own (not "done", "random"): a DO block, or an upsert's DO UPDATE.
        else if (want & STRICT_WORDS && at(i, "do") && !identByte(b[i + 2]) && (i === from || !identByte(b[i - 1]))) found |= STRICT_WORDS;
        break;
      case 0x66 /* f */:
        if (want & STRICT_WORDS && at(i, "function")) found |= STRICT_WORDS;
        break;
      case 0x70 /* p */:
        if (want & STRICT_WORDS && at(i, "procedure")) found |= STRICT_WORDS;
        break;
      case 0x72 /* r */:
        if (at(i, "role")) found |= CONTEXT_WORDS & want;
        break;
      case 0x75 /* u */:
        if (b[i + 1] === 0x26 /* & */) found = want;
        else if (at(i, "user")) found |= CONTEXT_WORDS & want;
        break;
      case 0x67 /* g */:
        if (at(i, "group")) found |= CONTEXT_WORDS & want;
        break;
      // Frequent letters: their words are looked at only when wanted.
      case 0x6c /* l */:
        if (want & CHANNEL_WORDS && at(i, "listen")) found |= CHANNEL_WORDS;
        else if (want & STRICT_WORDS && at(i, "lock")) found |= STRICT_WORDS;
        break;
      case 0x6e /* n */:
        if (want & CHANNEL_WORDS && at(i, "notify")) found |= CHANNEL_WORDS;
        break;
      case 0x65 /* e */:
        if (want & STRICT_WORDS && at(i, "explain")) found |= STRICT_WORDS;
        break;
    }
  }
  return found;
}

/** A byte that can continue an identifier (letters, digits, _, $, and any non-ASCII byte). */
function identByte(c: number | undefined): boolean {
  if (c === undefined) return false;
  const l = c | 0x20;
  return (l >= 0x61 && l <= 0x7a) || (c >= 0x30 && c <= 0x39) || c === 0x5f || c === 0x24 || c >= 0x80;
}

/** Whether the bytes may hold a statement the role and context rules refuse (the filter's first group). */
export function mayBeForbidden(b: Uint8Array, from = 0, to = b.length): boolean {
  return triggerWords(b, from, to, CONTEXT_WORDS) !== 0;
}

/** Whether a watched message needs the lexer (the byte filter could not clear it). */
export function needsLexing(type: number, bytes: Uint8Array, start: number, end: number, o: GuardOptions): boolean {
  return type !== FUNCTION_CALL && triggerWords(bytes, start + 5, end, watchedWords(o)) !== 0;
}

/**
 * A Parse whose statement is the refusal: same statement name and number of
 * parameters, so the client's Bind still fits; declared as text, since the
 * refusal never reads them and the server would reject parameters of
 * unknown type.
 */
function refuseParse(body: Uint8Array, verdict: Verdict, code = "42501"): Uint8Array {
  const [name, afterName] = cstring(body, 0);
  const sqlEnd = body.indexOf(0, afterName);
  const afterSql = sqlEnd < 0 ? body.length : sqlEnd + 1;
  const count = afterSql + 2 <= body.length ? new DataView(body.buffer, body.byteOffset + afterSql, 2).getInt16(0) : 0;
  return refusedParse(name, count, verdict, code);
}

function refusedParse(name: string, count: number, verdict: Verdict, code: string): Uint8Array {
  const n = Math.max(count, 0);
  const types = new Uint8Array(2 + 4 * n);
  const view = new DataView(types.buffer);
  view.setInt16(0, n);
  for (let k = 0; k < n; k++) view.setInt32(2 + 4 * k, TEXT_OID);
  return frame(PARSE, [encoder.encode(name), Uint8Array.of(0), encoder.encode(refusal(verdict, code)), Uint8Array.of(0), types]);
}

/**
 * What replaces a Query, Parse or FunctionCall over --guard-max-statement:
 * a refusal with 54000, built while the body streams past unheld. A Parse
 * keeps its statement name and parameter count (the bytes after its SQL),
 * so the client's Bind still fits.
 */
export function oversizeSink(type: number, length: number, maxStatement: number): OversizeSink {
  const verdict: Verdict = {
    statement: `${length - 4} bytes`,
    reason: `a statement of ${length - 4} bytes is larger than the guard reads (--guard-max-statement ${maxStatement}); send bulk data with COPY or as bind parameters`,
  };
  if (type !== PARSE) {
    return { feed() {}, end: () => frame(QUERY, [encoder.encode(refusal(verdict, "54000")), Uint8Array.of(0)]) };
  }
  // Parse: name \0, SQL \0, Int16 count, the types. Only the name (up to
  // MAX_NAME bytes) and the two bytes of the count are kept: nothing the
  // client sends makes this hold more.
  const MAX_NAME = 1024;
  const name: number[] = [];
  const count: number[] = [];
  let phase: "name" | "sql" | "types" = "name";
  return {
    feed(bytes) {
      let at = 0;
      while (at < bytes.length) {
        if (phase === "types") {
          for (; at < bytes.length && count.length < 2; at++) count.push(bytes[at]!);
          return;
        }
        const nul = bytes.indexOf(0, at);
        const upTo = nul < 0 ? bytes.length : nul;
        if (phase === "name") for (let k = at; k < upTo && name.length < MAX_NAME; k++) name.push(bytes[k]!);
        if (nul < 0) return;
        phase = phase === "name" ? "sql" : "types";
        at = nul + 1;
      }
    },
    end() {
      const n = count.length === 2 ? ((count[0]! << 8) | count[1]!) << 16 >> 16 : 0;
      return refusedParse(decoder.decode(Uint8Array.from(name)), n, verdict, "54000");
    },
  };
}

/** SQL that fails with `code` (42501 unless said) and says why. Only our own text goes in it. */
function refusal(v: Verdict, code = "42501"): string {
  const literal = (s: string) => `'${s.replace(/'/g, "''").replace(/\$/g, "")}'`;
  return (
    `DO $multigres_guard$ BEGIN RAISE EXCEPTION USING ERRCODE = '${code}', ` +
    `MESSAGE = ${literal(`multigres: ${v.reason}`)}, ` +
    `HINT = ${literal(v.hint ?? "the role and the tenant context are fixed for the connection; connect as another <role>.<tenant> instead")}; ` +
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
