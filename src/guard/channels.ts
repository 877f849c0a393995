/**
 * LISTEN/NOTIFY channels, scoped per tenant on the way in. PostgreSQL
 * scopes channels per database, and every tenant shares the database and
 * the role: without this, tenants hear each other's notifications and can
 * send each other forged ones. A tenant session's channels carry a keyed
 * prefix instead (tenant/context.ts, channelPrefix): the client says
 * `LISTEN jobs`, the server hears `LISTEN "mg<16 hex>:jobs"`, and on the way
 * out (protocol/notification.ts) only notifications with the session's own
 * prefix reach the client, prefix stripped. The way out is what makes the
 * scoping hold against SQL the proxy cannot read (EXECUTE in a DO block):
 * whatever a session listens to or sends on a raw channel, no tenant
 * receives it through the proxy. This side only makes the ordinary forms
 * work, and refuses the forms it cannot rewrite safely:
 *
 *  - `LISTEN ch`, `UNLISTEN ch`, `NOTIFY ch [, 'payload']` at the start of
 *    a statement: `ch` becomes the quoted, prefixed name (folded and
 *    truncated as PostgreSQL would first); `UNLISTEN *` passes;
 *  - `pg_notify(<arg>, …)` anywhere in a statement: the first argument
 *    becomes `'<prefix>' || NULLIF((<arg>)::text, '')`, which works for
 *    bind parameters too (postgres.js sends `select pg_notify($1, $2)`)
 *    and keeps the server's "channel name cannot be empty" for '';
 *  - refused (42501, with a hint): a prefixed name over 63 bytes; a
 *    pg_notify whose first argument cannot be found; any of them inside a
 *    DO block or a function body (the body runs later, unrewritten) or in a
 *    stored definition (CREATE/ALTER of a view, rule, default, policy …):
 *    rewritten there, it would send on this tenant's channel from other
 *    tenants' sessions.
 *
 * Pure, like the rest of the guard: SQL in, a verdict or new SQL out.
 */
import { lex, type Token } from "./lexer.ts";
import { BLOCK_STARTS, hasBody, refuse, type Verdict } from "./rules.ts";

/** PostgreSQL's NAMEDATALEN - 1: the longest identifier, in bytes. */
export const MAX_IDENTIFIER_BYTES = 63;

/** An edit of the SQL text: replace [from, to) with `text` (from === to inserts). */
interface Edit {
  from: number;
  to: number;
  text: string;
}

/**
 * The statement with its channels scoped to `prefix` (new SQL), a refusal,
 * or undefined when there is nothing to change.
 */
export function scopeChannels(sql: string, prefix: string, encoding: TextEncoding = "utf8"): Verdict | string | undefined {
  const plain = plan(sql, false, prefix, encoding);
  if (!sql.includes("\\")) return Array.isArray(plain) ? apply(sql, plain) : plain;
  // With a backslash in a '' string, where a token starts depends on
  // standard_conforming_strings, which the session can switch. Both
  // readings must ask for the same edits, or the guard could write into
  // what the server reads as a literal (or miss what it reads as code).
  const other = plan(sql, true, prefix, encoding);
  if (!Array.isArray(plain)) return plain;
  if (!Array.isArray(other)) return other;
  if (plain.length !== other.length || plain.some((e, k) => e.from !== other[k]!.from || e.to !== other[k]!.to || e.text !== other[k]!.text)) {
    return refuse(
      lex(sql),
      0,
      "this statement reads differently with standard_conforming_strings on and off, so multigres cannot scope its LISTEN/NOTIFY channel",
      "write the string with the backslash as E'…', or without the backslash",
      "channel",
    );
  }
  return apply(sql, plain);
}

const LENGTH_HINT = (prefixBytes: number) =>
  `channel names are at most ${MAX_IDENTIFIER_BYTES - prefixBytes} bytes through multigres: PostgreSQL's limit is ${MAX_IDENTIFIER_BYTES} bytes, and the proxy puts a ${prefixBytes}-byte tenant prefix in front`;
const BODY_HINT =
  "a DO block or function body runs later, where multigres cannot scope the channel to the tenant; send LISTEN/NOTIFY or pg_notify() in the statements themselves (for example after calling the function)";
const STORED_HINT =
  "a stored definition (view, rule, default, policy, SQL-standard function body …) runs later, possibly in another tenant's session, where multigres cannot scope the channel; send NOTIFY or pg_notify() in the statements themselves, and in a query string of their own after CREATE … BEGIN ATOMIC or CREATE RULE";
// No dollar signs in hints: the refusal is raised from a dollar-quoted block, which drops them.
const ARGUMENT_HINT = "give pg_notify its channel as the first argument, e.g. pg_notify('jobs', 'payload') or with bind parameters, or use NOTIFY jobs, 'payload'";

/** Statements whose `pg_notify(` names the function (a signature), not a call. */
const SIGNATURE_HEADS = new Set(["drop", "comment", "grant", "revoke", "security"]);

/**
 * How the SQL text was read from the message's bytes: "utf8" (valid UTF-8,
 * which reads back to the same bytes), or "bytes", one character per byte
 * (ISO-8859-1), for a client in another encoding: edits then keep every
 * byte they do not touch as it was, and lengths are counted in bytes.
 */
export type TextEncoding = "utf8" | "bytes";

/** Channel commands and pg_notify, statement by statement: the edits, or a refusal. */
function plan(sql: string, backslashStrings: boolean, prefix: string, encoding: TextEncoding): Edit[] | Verdict {
  const at: number[] = [];
  const t = lex(sql, backslashStrings, at);
  const edits: Edit[] = [];
  // After CREATE … BEGIN ATOMIC or CREATE RULE … ( …; … ) the semicolons
  // may be inside the definition: from there on, the rest of the query
  // string is treated as part of it.
  let inDefinition = false;
  for (let a = 0; a < t.length; ) {
    let b = a;
    while (b < t.length && !(t[b]!.kind === "op" && t[b]!.value === ";")) b++;
    const v = planStatement(sql, t, at, a, b, prefix, encoding, inDefinition, edits);
    if (v) return v;
    if (spansSemicolons(t, a, b)) inDefinition = true;
    a = b + 1;
  }
  return edits;
}

function planStatement(
  sql: string,
  t: Token[],
  at: number[],
  a: number,
  b: number,
  prefix: string,
  encoding: TextEncoding,
  inDefinition: boolean,
  edits: Edit[],
): Verdict | undefined {
  if (a >= b) return undefined;
  const head = word(t[a]);
  const defines = head === "create" || head === "alter";
  if (defines || inDefinition) {
    // Refused rather than rewritten: see STORED_HINT.
    if (pgNotifyAt(t, a, b) >= 0 || (inDefinition && CHANNEL_COMMANDS.has(head ?? "")) || (isRule(t, a, b) && hasWord(t, a, b, "notify"))) {
      return refuse(t.slice(a, b), 0, "LISTEN/NOTIFY and pg_notify() cannot be part of a stored definition through multigres", STORED_HINT, "channel");
    }
  }
  if (hasBody(t, a, b)) {
    for (let k = a; k < b; k++) {
      if (t[k]!.kind === "string" && bodyUsesChannels(t[k]!.value)) {
        return refuse(t.slice(a, b), 0, "LISTEN/NOTIFY and pg_notify() cannot be used inside a DO block or function body through multigres", BODY_HINT, "channel");
      }
    }
  }
  if (defines || inDefinition) return undefined;

  if (CHANNEL_COMMANDS.has(head ?? "")) {
    const v = planChannelCommand(sql, t, at, a, b, prefix, encoding, edits);
    if (v) return v;
  }
  if (SIGNATURE_HEADS.has(head ?? "")) return undefined;
  return planPgNotifyCalls(t, at, a, b, prefix, edits);
}

const CHANNEL_COMMANDS = new Set(["listen", "unlisten", "notify"]);

/** LISTEN ch, UNLISTEN ch, NOTIFY ch [, 'payload']: the channel becomes the prefixed name. */
function planChannelCommand(sql: string, t: Token[], at: number[], a: number, b: number, prefix: string, encoding: TextEncoding, edits: Edit[]): Verdict | undefined {
  const k = a + 1;
  const channel = k < b ? t[k]! : undefined;
  // UNLISTEN *, and what the server rejects anyway (no name, a reserved
  // word, ""), pass as they are: nothing is gained by rewriting them.
  if (!channel || (channel.kind !== "word" && channel.kind !== "ident")) return undefined;
  if (channel.kind === "word" && RESERVED.has(channel.value)) return undefined;
  const from = at[2 * k]!;
  let to = at[2 * k + 1]!;
  const unicode = channel.kind === "ident" && (sql[from] === "U" || sql[from] === "u");
  if (unicode) {
    // U&"…" is decoded to characters, written back as a plain quoted name;
    // in bytes that are not UTF-8 there is no telling what it decodes to.
    if (encoding !== "utf8") {
      return refuse(t.slice(a, b), 0, "a U&\"…\" channel name can only be scoped in UTF-8", "write the channel name as a plain \"quoted\" identifier, or use client_encoding UTF8", "channel");
    }
    // U&"…" UESCAPE '!': the clause belongs to the name it decodes.
    if (word(t[k + 1]) === "uescape" && t[k + 2]?.kind === "string" && k + 2 < b) to = at[2 * (k + 2) + 1]!;
  }
  const name = channel.kind === "word" ? foldIdentifier(sql.slice(from, at[2 * k + 1]!)) : channel.value;
  if (name === "") return undefined;
  // PostgreSQL would truncate a name over 63 bytes; anything that long is
  // over the limit here anyway, so the refusal comes first.
  const length = encoding === "utf8" ? utf8Length : (s: string) => s.length;
  const scoped = prefix + name;
  if (length(scoped) > MAX_IDENTIFIER_BYTES) {
    return refuse(t.slice(a, b), 0, `a channel name of ${length(name)} bytes is too long for multigres's tenant scoping`, LENGTH_HINT(prefix.length), "channel");
  }
  edits.push({ from, to, text: quoteIdentifier(scoped) });
  return undefined;
}

/**
 * Every pg_notify(<first>, …) call in tokens [a, b): wrap its first
 * argument. One pass with a stack of open brackets, so that calls nested
 * in each other's arguments cost no more than the tokens they span: the
 * first argument ends at the first comma inside the call's own
 * parenthesis, or at its closing parenthesis.
 */
function planPgNotifyCalls(t: Token[], at: number[], a: number, b: number, prefix: string, edits: Edit[]): Verdict | undefined {
  // Open brackets, innermost last: where a pg_notify call's first argument
  // starts (-1 for other brackets, and once the argument has ended).
  const open: number[] = [];
  let calls = 0;
  for (let j = a; j < b; j++) {
    const x = t[j]!;
    if (x.kind !== "op") continue;
    if (x.value === "(" || x.value === "[") {
      const call = x.value === "(" && j > a && isPgNotifyName(t[j - 1]!);
      open.push(call ? j + 1 : -1);
      if (call) calls++;
      continue;
    }
    const closes = x.value === ")" || x.value === "]";
    if (!closes && x.value !== ",") continue;
    const first = open.length > 0 ? open[open.length - 1]! : -1;
    if (closes) open.pop();
    else if (first >= 0) open[open.length - 1] = -1;
    if (first < 0) continue;
    calls--;
    if (j === first) return refuse(t.slice(first - 2, b), 0, NO_ARGUMENT, ARGUMENT_HINT, "channel");
    // Schema-qualified operator and type: the session's search_path cannot
    // put something else in their place.
    edits.push({ from: at[2 * first]!, to: at[2 * first]!, text: `'${prefix}'::pg_catalog.text OPERATOR(pg_catalog.||) NULLIF((` });
    edits.push({ from: at[2 * (j - 1) + 1]!, to: at[2 * (j - 1) + 1]!, text: ")::pg_catalog.text, '')" });
  }
  // A call whose first argument never ended: the statement ends inside it.
  if (calls > 0) return refuse(t.slice(a, b), 0, NO_ARGUMENT, ARGUMENT_HINT, "channel");
  return undefined;
}

const NO_ARGUMENT = "multigres cannot find the channel (the first argument) of this pg_notify() call";

/** pg_notify as a function name: unquoted in any case, or quoted exactly. */
const isPgNotifyName = (x: Token) => (x.kind === "word" || x.kind === "ident") && x.value === "pg_notify";

/** The next `pg_notify (` from token `from`, or -1: the name unquoted in any case, or quoted exactly. */
function pgNotifyAt(t: Token[], from: number, to: number): number {
  for (let k = from; k + 1 < to; k++) if (isPgNotifyName(t[k]!) && t[k + 1]!.kind === "op" && t[k + 1]!.value === "(") return k;
  return -1;
}

/**
 * Whether code in a DO block or function body would use channels: LISTEN,
 * UNLISTEN (but UNLISTEN *) or NOTIFY where a statement starts, or a
 * pg_notify call anywhere. Both readings of '' strings, as for the rules.
 */
function bodyUsesChannels(body: string): boolean {
  return usesChannels(lex(body)) || (body.includes("\\") && usesChannels(lex(body, true)));
}

function usesChannels(t: Token[]): boolean {
  if (pgNotifyAt(t, 0, t.length) >= 0) return true;
  for (let k = 0; k < t.length; k++) {
    const prev = t[k - 1];
    const starts = !prev || (prev.kind === "op" && prev.value === ";") || (prev.kind === "word" && BLOCK_STARTS.has(prev.value));
    const head = word(t[k]);
    if (starts && head && CHANNEL_COMMANDS.has(head) && !(head === "unlisten" && t[k + 1]?.kind === "op" && t[k + 1]!.value === "*")) return true;
  }
  return false;
}

/** CREATE [OR REPLACE] RULE. */
function isRule(t: Token[], a: number, b: number): boolean {
  const k = word(t[a + 1]) === "or" && word(t[a + 2]) === "replace" ? a + 3 : a + 1;
  return word(t[a]) === "create" && k < b && word(t[k]) === "rule";
}

/** A definition whose own text may contain semicolons: CREATE … BEGIN ATOMIC, or a rule (its action list). */
function spansSemicolons(t: Token[], a: number, b: number): boolean {
  if (word(t[a]) !== "create") return false;
  if (isRule(t, a, b)) return true;
  for (let k = a; k + 1 < b; k++) if (word(t[k]) === "begin" && word(t[k + 1]) === "atomic") return true;
  return false;
}

function hasWord(t: Token[], a: number, b: number, value: string): boolean {
  for (let k = a; k < b; k++) if (word(t[k]) === value) return true;
  return false;
}

const word = (x: Token | undefined) => (x?.kind === "word" ? x.value : undefined);

/** Unquoted identifiers as PostgreSQL folds them: ASCII letters only (a UTF-8 server leaves the rest). */
export function foldIdentifier(raw: string): string {
  return raw.replace(/[A-Z]+/g, (s) => s.toLowerCase());
}

const encoder = new TextEncoder();
const utf8Length = (s: string) => encoder.encode(s).length;

const quoteIdentifier = (name: string) => `"${name.replace(/"/g, '""')}"`;

/** Apply non-overlapping edits (in the order made, which is the order in the text). */
function apply(sql: string, edits: Edit[]): string | undefined {
  if (edits.length === 0) return undefined;
  const sorted = edits.map((e, k) => [e, k] as const).sort((x, y) => x[0].from - y[0].from || x[1] - y[1]);
  let out = "";
  let pos = 0;
  for (const [e] of sorted) {
    out += sql.slice(pos, e.from) + e.text;
    pos = e.to;
  }
  return out + sql.slice(pos);
}

/**
 * PostgreSQL's reserved key words (and those that cannot be a column
 * name): `LISTEN select` is a syntax error, and stays one.
 */
const RESERVED = new Set(
  (
    "all analyse analyze and any array as asc asymmetric authorization binary both case cast check collate collation column concurrently " +
    "constraint create cross current_catalog current_date current_role current_schema current_time current_timestamp current_user default " +
    "deferrable desc distinct do else end except false fetch for foreign freeze from full grant group having ilike in initially inner " +
    "intersect into is isnull join lateral leading left like limit localtime localtimestamp natural not notnull null offset on only or " +
    "order outer overlaps placing primary references returning right select session_user similar some symmetric table tablesample " +
    "then to trailing true union unique user using variadic verbose when where window with"
  ).split(" "),
);
