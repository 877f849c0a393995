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
}

/** Settings that establish identity: the tenant context, its signature, the role. */
export function protectedSettings(tenantSetting: string, signatureSetting: string): string[] {
  return [tenantSetting, signatureSetting, "role", "session_authorization"].map((s) => s.toLowerCase());
}

export function checkSql(sql: string, protectedNames: readonly string[]): Verdict | undefined {
  // Both readings of '' strings (a session may turn standard_conforming_strings
  // off); they differ only where a backslash appears.
  return check(lex(sql, false), protectedNames, 0) ?? (sql.includes("\\") ? check(lex(sql, true), protectedNames, 0) : undefined);
}

function check(tokens: Token[], names: readonly string[], depth: number): Verdict | undefined {
  for (const stmt of statements(tokens)) {
    const v = checkStatement(stmt, names, depth);
    if (v) return v;
  }
  return undefined;
}

/** Words after which a PL/pgSQL body starts a statement without a semicolon. */
const BLOCK_STARTS = new Set(["begin", "then", "else", "loop"]);

function checkStatement(t: Token[], names: readonly string[], depth: number): Verdict | undefined {
  const v = checkHead(t, 0, names);
  if (v) return v;
  if (depth > 0) {
    // Inside a function body `BEGIN SET ROLE …` or `IF … THEN RESET ALL`
    // is one statement to the splitter: also check from each such start.
    // Only the head is looked at there (a few tokens), so a body of many
    // BEGINs costs one pass, not one pass per BEGIN.
    for (let j = 1; j < t.length; j++) {
      const prev = t[j - 1]!;
      if (prev.kind === "word" && BLOCK_STARTS.has(prev.value)) {
        const w = checkHead(t, j, names);
        if (w) return w;
      }
    }
  }
  return checkSetConfig(t, names) ?? checkBodies(t, names, depth);
}

/** The statement forms recognised by their first words, from token `at`. */
function checkHead(t: Token[], at: number, names: readonly string[]): Verdict | undefined {
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
  return undefined;
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
function checkBodies(t: Token[], names: readonly string[], depth: number): Verdict | undefined {
  const head = t[0]?.kind === "word" ? t[0].value : undefined;
  const hasBody = head === "do" || (head === "create" && t.some((x) => x.kind === "word" && (x.value === "function" || x.value === "procedure")));
  if (hasBody && depth === 0) {
    for (const tok of t) {
      if (tok.kind === "string") {
        const inner = check(lex(tok.value), names, depth + 1) ?? (tok.value.includes("\\") ? check(lex(tok.value, true), names, depth + 1) : undefined);
        if (inner) return inner;
      }
    }
  }
  return undefined;
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

function refuse(t: Token[], at: number, reason: string): Verdict {
  const shown = t
    .slice(at, at + 6)
    .map((x) => (x.kind === "string" ? "'…'" : x.kind === "ident" ? `"${x.value}"` : x.kind === "word" ? x.value.toUpperCase() : x.value))
    .join(" ")
    .replace(/ ?([.(]) ?/g, "$1");
  return { statement: t.length - at > 6 ? `${shown} …` : shown, reason };
}
