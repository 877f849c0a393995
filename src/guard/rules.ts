/**
 * The proxy's guard: statements that would change the role or a protected
 * setting are refused before they reach the server. Defence in depth only;
 * the database's own check (current_tenant_id() verifying the signature) is
 * what the guarantee rests on, and it holds with the guard switched off.
 */
import { lex, statements, type Token } from "./lexer.ts";

export interface Verdict {
  /** What was refused, for the error message. */
  statement: string;
  reason: string;
  /** What the client can do instead (the error's HINT); a default when absent. */
  hint?: string;
  /** Which rule refused it, for the log (which never echoes the statement). */
  kind?: RefusalKind;
}

/** context: the role or the tenant context; channel: LISTEN/NOTIFY (guard/channels.ts); strict: --guard strict. */
export type RefusalKind = "context" | "channel" | "strict";

/** What the rules read a statement against. */
export interface RuleOptions {
  /** The protected settings (protectedSettings()). */
  names: readonly string[];
  /** --guard strict: also refuse EXPLAIN ANALYZE, LOCK above ROW EXCLUSIVE, DO and CREATE FUNCTION/PROCEDURE. */
  strict?: boolean;
}

/** Settings that establish identity: the tenant context, its signature, the role. */
export function protectedSettings(tenantSetting: string, signatureSetting: string): string[] {
  return [tenantSetting, signatureSetting, "role", "session_authorization"].map((s) => s.toLowerCase());
}

export function checkSql(sql: string, protectedNames: readonly string[], strict = false): Verdict | undefined {
  const o: RuleOptions = { names: protectedNames, strict };
  // Both readings of '' strings (a session may turn standard_conforming_strings
  // off); they differ only where a backslash appears.
  return check(lex(sql, false), o, 0) ?? (sql.includes("\\") ? check(lex(sql, true), o, 0) : undefined);
}

function check(tokens: Token[], o: RuleOptions, depth: number): Verdict | undefined {
  for (const stmt of statements(tokens)) {
    const v = checkStatement(stmt, o, depth);
    if (v) return v;
  }
  return undefined;
}

/** Words after which a PL/pgSQL body starts a statement without a semicolon. */
export const BLOCK_STARTS = new Set(["begin", "then", "else", "loop"]);

function checkStatement(t: Token[], o: RuleOptions, depth: number): Verdict | undefined {
  const v = checkHead(t, 0, o) ?? (o.strict ? (depth === 0 ? checkRunTimeSql(t) : undefined) ?? checkExplain(t) : undefined);
  if (v) return v;
  if (depth > 0) {
    // Inside a function body `BEGIN SET ROLE …` or `IF … THEN RESET ALL`
    // is one statement to the splitter: also check from each such start.
    // Only the head is looked at there (a few tokens), so a body of many
    // BEGINs costs one pass, not one pass per BEGIN.
    for (let j = 1; j < t.length; j++) {
      const prev = t[j - 1]!;
      if (prev.kind === "word" && BLOCK_STARTS.has(prev.value)) {
        const w = checkHead(t, j, o);
        if (w) return w;
      }
    }
  }
  return checkSetConfig(t, o.names) ?? checkBodies(t, o, depth);
}

/** The statement forms recognised by their first words, from token `at`. */
function checkHead(t: Token[], at: number, o: RuleOptions): Verdict | undefined {
  const names = o.names;
  const word = (i: number) => (t[at + i]?.kind === "word" ? t[at + i]!.value : undefined);
  let i = 0;
  const head = word(0);

  if (head === "set" || head === "reset") {
    i = 1;
    if (head === "set" && (word(1) === "session" || word(1) === "local")) {
      // SET SESSION AUTHORIZATION vs SET SESSION <name>
      if (!(word(1) === "session" && word(2) === "authorization")) i = 2;
    }
    const target = settingName(t, at + i);
    if (head === "set" && (target === "client_encoding" || target === "names")) {
      const v = checkEncoding(t, at, i + 1);
      if (v) return v;
    }
    if (target === "all" && head === "reset") return refuse(t, at, "RESET ALL would clear the tenant context and role");
    if (target === "session" && word(i + 1) === "authorization") return refuse(t, at, "the session user is fixed by the proxy");
    if (target && names.includes(target)) return refuse(t, at, `${target} is set by the proxy and cannot be changed`);
  }

  if (head === "discard" && word(1) === "all") {
    return refuse(t, at, "DISCARD ALL would clear the tenant context and role");
  }

  // Roles are the database's business, not a tenant's: a session of the
  // app role could change its own password, settings or memberships with
  // ALTER ROLE, whatever follows. (USER MAPPING is a foreign-data object.)
  if ((head === "alter" || head === "create" || head === "drop") && ROLE_WORDS.has(word(1) ?? "") && word(2) !== "mapping") {
    return refuse(t, at, `${head.toUpperCase()} ${word(1)!.toUpperCase()} is not allowed through multigres`);
  }

  // CREATE/ALTER FUNCTION|PROCEDURE|ROUTINE … SET name = value: the setting
  // holds while the function runs. (At a statement's start only: this reads
  // the whole statement, which from every block start would be quadratic.)
  if (at === 0 && (head === "create" || head === "alter") && [1, 2, 3].some((k) => ROUTINE_WORDS.has(word(k) ?? ""))) {
    for (let j = at + 2; j < t.length; j++) {
      if (t[j]!.kind !== "word" || t[j]!.value !== "set") continue;
      const target = settingName(t, j + 1);
      if (target && names.includes(target)) return refuse(t, at, `${target} is set by the proxy and cannot be changed, not even for a function`);
      if (target === "client_encoding") {
        const v = checkEncoding(t, j, 2);
        if (v) return v;
      }
    }
  }
  if (o.strict && head === "lock") return checkLock(t, at);
  return undefined;
}

const STRICT_HINT = "the proxy runs with --guard strict, which keeps tenants from statements that reveal or hold up other tenants' work";

/**
 * --guard strict: DO blocks and CREATE [OR REPLACE] FUNCTION|PROCEDURE.
 * Their bodies can build SQL at run time (EXECUTE), which no guard can
 * read: ALTER ROLE … SET for every tenant's next session, EXPLAIN ANALYZE,
 * LOCK, a notification on a raw channel. With them refused, a tenant
 * session runs only SQL the guard has read (and functions the schema's
 * owner wrote). After `multigres setup` the role can create functions in
 * pg_temp only, so nothing an application needs at run time is lost.
 */
function checkRunTimeSql(t: Token[]): Verdict | undefined {
  const word = (i: number) => (t[i]?.kind === "word" ? t[i]!.value : undefined);
  const hint = STRICT_HINT + "; run DO blocks and create functions in migrations, as the tables' owner";
  if (word(0) === "do") {
    return refuse(t, 0, "DO blocks are not allowed under --guard strict: the SQL they build at run time is out of the guard's sight", hint, "strict");
  }
  const kind = word(0) === "create" ? (word(1) === "or" && word(2) === "replace" ? word(3) : word(1)) : undefined;
  if (kind === "function" || kind === "procedure") {
    return refuse(t, 0, `CREATE ${kind.toUpperCase()} is not allowed under --guard strict: the SQL its body builds at run time is out of the guard's sight`, hint, "strict");
  }
  return undefined;
}

/**
 * --guard strict: EXPLAIN ANALYZE in every spelling. It runs the statement
 * and reports "Rows Removed by Filter", which counts the rows row-level
 * security hid: other tenants' rows, counted. Plain EXPLAIN and ANALYZE
 * false|off|0 run nothing and pass. Looked for at every EXPLAIN, not only
 * at statement starts, so PL/pgSQL's FOR … IN EXPLAIN and RETURN QUERY
 * EXPLAIN are caught too; each option list is read once (linear).
 */
function checkExplain(t: Token[]): Verdict | undefined {
  for (let k = 0; k < t.length; k++) {
    if (t[k]!.kind !== "word" || t[k]!.value !== "explain") continue;
    if (explainAnalyzes(t, k + 1)) {
      return refuse(t, k, "EXPLAIN ANALYZE is not allowed under --guard strict: its row counts include rows row-level security hides", STRICT_HINT + "; plain EXPLAIN (without ANALYZE) is allowed", "strict");
    }
  }
  return undefined;
}

const ANALYZE_WORDS = new Set(["analyze", "analyse"]);

/** Whether the EXPLAIN whose options start at token `j` would run the statement. */
function explainAnalyzes(t: Token[], j: number): boolean {
  const w = (i: number) => (t[i]?.kind === "word" ? t[i]!.value : undefined);
  // EXPLAIN ANALYZE [VERBOSE] …, and (not valid, refused all the same) EXPLAIN VERBOSE ANALYZE
  if (ANALYZE_WORDS.has(w(j) ?? "") || (w(j) === "verbose" && ANALYZE_WORDS.has(w(j + 1) ?? ""))) return true;
  if (t[j]?.kind !== "op" || t[j]!.value !== "(") return false;
  // EXPLAIN ( option [value] [, …] ): ANALYZE without a value, or with any
  // value but false|off|0, runs the statement (the last one wins; any
  // one that might be true is enough). A list the guard cannot read is
  // refused: the server would reject it anyway.
  let i = j + 1;
  for (;;) {
    const name = t[i];
    if (!name || (name.kind !== "word" && name.kind !== "ident")) return true;
    // A quoted "analyze" is the same option (quoted names are not folded: "ANALYZE" is none).
    const isAnalyze = ANALYZE_WORDS.has(name.value);
    const value: Token[] = [];
    for (i++; i < t.length; i++) {
      const x = t[i]!;
      if (x.kind === "op" && (x.value === "," || x.value === ")")) break;
      if (x.kind === "op" && x.value !== "+" && x.value !== "-") return true;
      value.push(x);
    }
    if (i >= t.length) return true;
    if (isAnalyze && !isFalse(value)) return true;
    if (t[i]!.value === ")") return false;
    i++;
  }
}

/** false, off or 0, as PostgreSQL's defGetBoolean reads an option value. */
function isFalse(value: Token[]): boolean {
  if (value.length !== 1) return false;
  const v = value[0]!;
  if (v.kind === "number") return /^0+$/.test(v.value);
  if (v.kind === "word" || v.kind === "string" || v.kind === "ident") return v.value.toLowerCase() === "false" || v.value.toLowerCase() === "off";
  return false;
}

/** LOCK modes that conflict with no ordinary reads or writes of other sessions. */
const HARMLESS_LOCK_MODES = new Set(["access share", "row share", "row exclusive"]);

/**
 * --guard strict: LOCK [TABLE] [ONLY] name [, …] [IN mode MODE] [NOWAIT]
 * above ROW EXCLUSIVE. Every tenant shares the tables, so SHARE and above
 * stall every other tenant's writes (ACCESS EXCLUSIVE, the default, even
 * their reads) for as long as the transaction stays open.
 */
function checkLock(t: Token[], at: number): Verdict | undefined {
  // The statement runs to its semicolon; table names cannot be an unquoted
  // IN (a reserved word), so the first IN starts the mode. In a body the
  // next block start ends the search too, so that a body of many LOCKs is
  // read once, not once per LOCK (a table named BEGIN, unquoted, reads as
  // no mode: refused, never let through).
  let j = at + 1;
  for (; j < t.length; j++) {
    const x = t[j]!;
    if (x.kind === "word" && (x.value === "in" || BLOCK_STARTS.has(x.value))) break;
  }
  const mode: string[] = [];
  if (t[j]?.value === "in") for (j++; j < t.length && mode.length < 4 && t[j]!.kind === "word" && t[j]!.value !== "mode"; j++) mode.push(t[j]!.value);
  const named = mode.join(" ");
  if (HARMLESS_LOCK_MODES.has(named)) return undefined;
  return refuse(
    t,
    at,
    `LOCK in ${named ? named.toUpperCase() : "ACCESS EXCLUSIVE (the default)"} mode is not allowed under --guard strict: every tenant shares the table`,
    `${STRICT_HINT}; LOCK … IN ROW EXCLUSIVE MODE (or ROW SHARE, ACCESS SHARE) is allowed, and SELECT … FOR UPDATE locks just the rows`,
    "strict",
  );
}

const ROUTINE_WORDS = new Set(["function", "procedure", "routine"]);

const ROLE_WORDS = new Set(["role", "user", "group"]);

/**
 * PostgreSQL's client-only encodings, whose second byte of a character can
 * be a backslash or a quote (SJIS 0x95 0x5c is one character): the server
 * converts them before parsing, the guard reads UTF-8, and the two would
 * see different statements. So a guarded session may not use them.
 */
const UNREADABLE_ENCODINGS = new Set(["sjis", "shiftjis", "mskanji", "win932", "windows932", "shiftjis2004", "big5", "win950", "windows950", "gbk", "win936", "windows936", "gb18030", "uhc", "win949", "windows949", "johab"]);

/**
 * Whether the guard cannot read SQL in this client_encoding. Names are
 * compared as PostgreSQL's clean_encoding_name does: ASCII letters and
 * digits only, lower-cased (so "SJIS\u212A", with a Kelvin sign that
 * JavaScript would lower-case to k, is SJIS, as the server reads it).
 */
export function unreadableEncoding(name: string): boolean {
  return UNREADABLE_ENCODINGS.has(name.replace(/[^A-Za-z0-9]/g, "").toLowerCase());
}

/** SET client_encoding / SET NAMES to an encoding the guard cannot read. */
function checkEncoding(t: Token[], at: number, i: number): Verdict | undefined {
  // SET client_encoding TO|= value, SET NAMES value
  let v = t[at + i];
  if (v?.kind === "word" && (v.value === "to" || v.value === "=")) v = t[at + i + 1];
  if (v?.kind === "op" && v.value === "=") v = t[at + i + 1];
  if ((v?.kind === "string" || v?.kind === "word" || v?.kind === "ident") && unreadableEncoding(v.value)) {
    return refuse(t, at, `client_encoding ${v.value} cannot be read by the guard; use UTF8`);
  }
  return undefined;
}

/**
 * set_config(…) anywhere in a statement: its first argument must be one
 * string literal naming an unprotected setting. Anything computed (a bind
 * parameter, lower('ROLE'), 'app.' || x) could name a protected one.
 */
function checkSetConfig(t: Token[], names: readonly string[]): Verdict | undefined {
  for (let j = 0; j < t.length - 1; j++) {
    const tok = t[j]!;
    if (tok.kind !== "word" && tok.kind !== "ident") continue;
    if (tok.value.toLowerCase() !== "set_config") continue;
    if (t[j + 1]?.kind !== "op" || t[j + 1]!.value !== "(") continue;
    const arg = t[j + 2];
    const after = t[j + 3];
    if (arg?.kind !== "string" || after?.kind !== "op" || after.value !== ",") {
      return refuse(t, 0, "set_config() must name its setting with a string literal through multigres");
    }
    if (names.includes(arg.value.trim().toLowerCase())) {
      return refuse(t, 0, `${arg.value} is set by the proxy and cannot be changed`);
    }
    if (arg.value.trim().toLowerCase() === "client_encoding") {
      const value = t[j + 4];
      if (value?.kind !== "string") return refuse(t, 0, "set_config('client_encoding', …) must give the encoding as a string literal through multigres");
      if (unreadableEncoding(value.value)) return refuse(t, 0, `client_encoding ${value.value} cannot be read by the guard; use UTF8`);
    }
  }
  return undefined;
}

/** DO blocks and function bodies: look inside once (dynamic SQL built at run time is left to the database check). */
function checkBodies(t: Token[], o: RuleOptions, depth: number): Verdict | undefined {
  if (hasBody(t) && depth === 0) {
    for (const tok of t) {
      if (tok.kind === "string") {
        const inner = check(lex(tok.value), o, depth + 1) ?? (tok.value.includes("\\") ? check(lex(tok.value, true), o, depth + 1) : undefined);
        if (inner) return inner;
      }
    }
  }
  return undefined;
}

/** A DO block, or CREATE … FUNCTION|PROCEDURE: its string literals are code that runs later. */
export function hasBody(t: readonly Token[], from = 0, to = t.length): boolean {
  const head = t[from]?.kind === "word" ? t[from]!.value : undefined;
  if (head === "do") return true;
  if (head !== "create") return false;
  for (let k = from + 1; k < to; k++) {
    const x = t[k]!;
    if (x.kind === "word" && (x.value === "function" || x.value === "procedure")) return true;
  }
  return false;
}

/** The setting name starting at token i: `name`, `"name"`, `a.b`, `"a"."b"`. */
function settingName(t: Token[], i: number): string | undefined {
  const first = t[i];
  if (!first || (first.kind !== "word" && first.kind !== "ident")) return undefined;
  let name = first.value;
  while (t[i + 1]?.kind === "op" && t[i + 1]!.value === "." && (t[i + 2]?.kind === "word" || t[i + 2]?.kind === "ident")) {
    name += `.${t[i + 2]!.value}`;
    i += 2;
  }
  return name.toLowerCase();
}

export function refuse(t: readonly Token[], at: number, reason: string, hint?: string, kind: RefusalKind = "context"): Verdict {
  const shown = t
    .slice(at, at + 6)
    .map((x) => (x.kind === "string" ? "'…'" : x.kind === "ident" ? `"${x.value}"` : x.kind === "word" ? x.value.toUpperCase() : x.value))
    .join(" ")
    .replace(/ ?([.(]) ?/g, "$1");
  return { statement: t.length - at > 6 ? `${shown} …` : shown, reason, hint, kind };
}
