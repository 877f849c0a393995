/**
 * A SQL lexer, just deep enough to find statements reliably: it knows
 * comments (nested block comments too), quoted identifiers, standard and
 * E'' strings, dollar quotes, and where one statement ends and the next
 * begins. Words inside literals, comments and quoted identifiers are never
 * mistaken for keywords. Pure; never throws: unterminated input simply ends.
 */

export type Token =
  | { kind: "word"; value: string } // keyword or unquoted identifier, lowercased
  | { kind: "ident"; value: string } // "quoted identifier", as written
  | { kind: "string"; value: string } // any string literal, decoded
  | { kind: "param"; value: string } // $1
  | { kind: "number"; value: string }
  | { kind: "op"; value: string }; // punctuation and operators, one token each

// Character classes by code, not by regex: the lexer may see megabytes.
const isWordStart = (c: number) => (c >= 97 && c <= 122) || (c >= 65 && c <= 90) || c === 95 || c >= 0x80;
const isWordPart = (c: number) => isWordStart(c) || (c >= 48 && c <= 57) || c === 36;
const isDigit = (c: number) => c >= 48 && c <= 57;
// Digits, '.', '_', exponent and radix letters (0x1F, 1e5, 1_000).
const isNumberPart = (c: number) => isDigit(c) || c === 46 || c === 95 || (c >= 97 && c <= 122) || (c >= 65 && c <= 90);
/** Punctuation tokens are immutable, so one object per character serves all. */
const OPS = new Map<string, Token>();
const op = (c: string): Token => {
  let t = OPS.get(c);
  if (!t) OPS.set(c, (t = Object.freeze({ kind: "op", value: c }) as Token));
  return t;
};
/** `$tag$` or `$$` at `i` (a tag of any length, as PostgreSQL allows), or undefined. */
function dollarTagAt(sql: string, i: number): string | undefined {
  let j = i + 1;
  const first = sql.charCodeAt(j);
  if (first !== 36 /* $ */) {
    if (!(isTagStart(first))) return undefined;
    j++;
    while (j < sql.length && isTagPart(sql.charCodeAt(j))) j++;
    if (sql.charCodeAt(j) !== 36) return undefined;
  }
  return sql.slice(i, j + 1);
}
const isTagStart = (c: number) => (c >= 97 && c <= 122) || (c >= 65 && c <= 90) || c === 95 || c >= 0x80;
const isTagPart = (c: number) => isTagStart(c) || (c >= 48 && c <= 57);

/**
 * A quoted string starting at the quote at `q`, and its continuations:
 * PostgreSQL joins `'a'` and `'b'` separated by whitespace that contains a
 * newline (comments allowed), and the continuation keeps the first part's
 * kind (E'' escapes, bit strings).
 */
function stringAt(sql: string, q: number, backslashes: boolean, doubled: boolean, finder?: NextFinder): [string, number] {
  let [value, end] = quoted(sql, q + 1, "'", backslashes, finder, doubled);
  for (let next = continuation(sql, end); next >= 0; next = continuation(sql, end)) {
    const [more, e] = quoted(sql, next + 1, "'", backslashes, finder, doubled);
    value += more;
    end = e;
  }
  return [value, end];
}

/**
 * Where a string continues after `i`, or -1: PostgreSQL's quotecontinue,
 * {horiz_whitespace}*{newline}{special_whitespace}*{quote}, where comments
 * are `--` comments.
 */
function continuation(sql: string, i: number): number {
  const n = sql.length;
  let j = i;
  for (;;) {
    const c = sql[j];
    if (c === " " || c === "\t" || c === "\f") j++;
    else if (c === "-" && sql[j + 1] === "-") while (j < n && sql[j] !== "\n" && sql[j] !== "\r") j++;
    else break;
  }
  if (sql[j] !== "\n" && sql[j] !== "\r") return -1;
  j++;
  for (;;) {
    const c = sql[j];
    if (c === " " || c === "\t" || c === "\n" || c === "\r" || c === "\f") j++;
    else if (c === "-" && sql[j + 1] === "-") {
      while (j < n && sql[j] !== "\n" && sql[j] !== "\r") j++;
      if (j >= n) return -1;
    } else break;
  }
  return sql[j] === "'" ? j : -1;
}

/** The escape character of a UESCAPE clause after a U& literal ending at `i` (any whitespace and comments between, as the grammar allows). */
function uescapeAfter(sql: string, i: number): string | undefined {
  let j = skipSpace(sql, i);
  if (sql.slice(j, j + 7).toLowerCase() !== "uescape" || isWordPart(sql.charCodeAt(j + 7))) return undefined;
  j = skipSpace(sql, j + 7);
  if (sql[j] !== "'" || sql[j + 2] !== "'") return undefined;
  return sql[j + 1];
}

/** Past whitespace and comments of either kind. */
function skipSpace(sql: string, i: number): number {
  const n = sql.length;
  for (;;) {
    const c = sql[i];
    if (c === " " || c === "\t" || c === "\n" || c === "\r" || c === "\f" || c === "\v") i++;
    else if (c === "-" && sql[i + 1] === "-") while (i < n && sql[i] !== "\n" && sql[i] !== "\r") i++;
    else if (c === "/" && sql[i + 1] === "*") i = skipBlockComment(sql, i);
    else return i;
  }
}

/**
 * @param backslashStrings read '' strings the way the server does when
 *   standard_conforming_strings is off (backslash escapes). A session can
 *   switch that setting, so the guard checks both readings.
 * @param positions when given, receives each token's start and end (UTF-16
 *   offsets into `sql`, end exclusive) as two numbers per token, in order:
 *   `positions[2k]`, `positions[2k + 1]` for `tokens[k]`. Kept apart from
 *   the tokens so that punctuation tokens stay shared objects and a check
 *   that needs no positions pays nothing for them.
 */
export function lex(sql: string, backslashStrings = false, positions?: number[]): Token[] {
  const tokens: Token[] = [];
  const backslash = new NextFinder(sql);
  let i = 0;
  const n = sql.length;
  while (i < n) {
    // Each turn of the loop reads at most one token, starting at `start`.
    const start = i;
    const c = sql[i]!;
    const next = sql[i + 1];

    if (c === " " || c === "\t" || c === "\n" || c === "\r" || c === "\f" || c === "\v") {
      i++;
    } else if (c === "-" && next === "-") {
      // To the end of the line, which for PostgreSQL's lexer is \n or \r.
      let eol = i + 2;
      while (eol < n && sql[eol] !== "\n" && sql[eol] !== "\r") eol++;
      i = eol + 1;
    } else if (c === "/" && next === "*") {
      i = skipBlockComment(sql, i);
    } else if (c === "'") {
      const [value, end] = stringAt(sql, i, backslashStrings, true, backslash);
      tokens.push({ kind: "string", value });
      i = end;
    } else if ((c === "E" || c === "e") && next === "'") {
      const [value, end] = stringAt(sql, i + 1, true, true, backslash);
      tokens.push({ kind: "string", value });
      i = end;
    } else if ((c === "U" || c === "u") && next === "&" && (sql[i + 2] === "'" || sql[i + 2] === '"')) {
      // Decoded like the server does, so U&'r\006Fle' is seen as 'role'.
      const q = sql[i + 2]!;
      const [raw, end] = q === "'" ? stringAt(sql, i + 2, false, true) : quoted(sql, i + 3, q, false);
      const escape = uescapeAfter(sql, end);
      const value = decodeUnicode(raw, escape ?? "\\");
      tokens.push(q === "'" ? { kind: "string", value } : { kind: "ident", value });
      i = end; // a UESCAPE clause stays in the stream as ordinary tokens
    } else if ((c === "B" || c === "b" || c === "X" || c === "x") && next === "'") {
      // Bit strings: a quote always ends them (no doubling), and they continue too.
      const [value, end] = stringAt(sql, i + 1, false, false);
      tokens.push({ kind: "string", value });
      i = end;
    } else if (c === '"') {
      const [value, end] = quoted(sql, i + 1, '"', false);
      tokens.push({ kind: "ident", value });
      i = end;
    } else if (c === "$") {
      const tag = dollarTagAt(sql, i);
      if (tag) {
        const close = sql.indexOf(tag, i + tag.length);
        const end = close < 0 ? n : close;
        tokens.push({ kind: "string", value: sql.slice(i + tag.length, end) });
        i = close < 0 ? n : close + tag.length;
      } else {
        let j = i + 1;
        while (j < n && sql[j]! >= "0" && sql[j]! <= "9") j++;
        tokens.push(j > i + 1 ? { kind: "param", value: sql.slice(i, j) } : op("$"));
        i = j > i + 1 ? j : i + 1;
      }
    } else if (isWordStart(sql.charCodeAt(i))) {
      let j = i + 1;
      while (j < n && isWordPart(sql.charCodeAt(j))) j++;
      tokens.push({ kind: "word", value: sql.slice(i, j).toLowerCase() });
      i = j;
    } else if (isDigit(sql.charCodeAt(i))) {
      let j = i + 1;
      while (j < n && isNumberPart(sql.charCodeAt(j))) j++;
      tokens.push({ kind: "number", value: sql.slice(i, j) });
      i = j;
    } else {
      tokens.push(op(c));
      i++;
    }
    if (positions && tokens.length * 2 > positions.length) positions.push(start, i);
  }
  return tokens;
}

/** Split a token stream into statements at top-level semicolons. */
export function statements(tokens: readonly Token[]): Token[][] {
  const out: Token[][] = [];
  let current: Token[] = [];
  for (const t of tokens) {
    if (t.kind === "op" && t.value === ";") {
      if (current.length > 0) out.push(current);
      current = [];
    } else {
      current.push(t);
    }
  }
  if (current.length > 0) out.push(current);
  return out;
}

function skipBlockComment(sql: string, start: number): number {
  let depth = 0;
  let i = start;
  while (i < sql.length) {
    if (sql[i] === "/" && sql[i + 1] === "*") {
      depth++;
      i += 2;
    } else if (sql[i] === "*" && sql[i + 1] === "/") {
      depth--;
      i += 2;
      if (depth === 0) return i;
    } else {
      i++;
    }
  }
  return sql.length;
}

/**
 * Read a quoted run up to its closing quote; a doubled quote stands for
 * itself. With `backslashes` (E'' strings) a backslash escapes the next
 * character. Returns the decoded text and the index after the close.
 */
function quoted(sql: string, start: number, quote: string, backslashes: boolean, finder?: NextFinder, doubled = true): [string, number] {
  // Runs between quotes (and escapes) are sliced whole: a multi-megabyte
  // literal costs a few indexOf calls, not a loop per character.
  let value = "";
  let i = start;
  for (;;) {
    const q = sql.indexOf(quote, i);
    const b = backslashes ? (finder ? finder.next(i) : sql.indexOf("\\", i)) : -1;
    if (b >= 0 && (q < 0 || b < q) && b + 1 < sql.length) {
      const [decoded, length] = escapeAt(sql, b);
      value += sql.slice(i, b) + decoded;
      i = b + length;
    } else if (q < 0) {
      return [value + sql.slice(i), sql.length];
    } else if (doubled && sql[q + 1] === quote) {
      value += sql.slice(i, q + 1);
      i = q + 2;
    } else {
      return [value + sql.slice(i, q), q + 1];
    }
  }
}

/**
 * The next backslash at or after a position, remembered: the lexer only
 * moves forward, so thousands of E'' strings in a statement with no
 * backslash after them cost one search to the end, not one each.
 */
class NextFinder {
  private from = -1;
  private at = -1;
  constructor(private readonly sql: string) {}
  next(i: number): number {
    if (this.from < 0 || i < this.from || (this.at >= 0 && this.at < i)) {
      this.from = i;
      this.at = this.sql.indexOf("\\", i);
    }
    return this.at;
  }
}

const SIMPLE_ESCAPES: Record<string, string> = { n: "\n", t: "\t", r: "\r", b: "\b", f: "\f" };
const HEX_ESCAPE = /^x([0-9A-Fa-f]{1,2})/;
const OCTAL_ESCAPE = /^[0-7]{1,3}/;
const UNICODE_ESCAPE = /^(?:u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8}))/;

/** Decodes one E'' backslash escape at `i` (the backslash); returns it and its length. */
function escapeAt(sql: string, i: number): [string, number] {
  const c = sql[i + 1]!;
  const simple = SIMPLE_ESCAPES[c];
  if (simple) return [simple, 2];
  if (c === "x") {
    const hex = HEX_ESCAPE.exec(sql.slice(i + 1, i + 4));
    if (hex) return [String.fromCharCode(parseInt(hex[1]!, 16)), 1 + hex[0].length];
  } else if (c >= "0" && c <= "7") {
    const octal = OCTAL_ESCAPE.exec(sql.slice(i + 1, i + 4))!;
    return [String.fromCharCode(parseInt(octal[0], 8) & 0xff), 1 + octal[0].length];
  } else if (c === "u" || c === "U") {
    const unicode = UNICODE_ESCAPE.exec(sql.slice(i + 1, i + 10));
    if (unicode) return [codePoint(parseInt(unicode[1] ?? unicode[2]!, 16)), 1 + unicode[0].length];
  }
  return [c, 2];
}

/** Decodes U&'' / U&"" escapes (\XXXX, \+XXXXXX, doubled escape char). */
function decodeUnicode(text: string, escape: string): string {
  let out = "";
  for (let i = 0; i < text.length; i++) {
    if (text[i] !== escape) {
      out += text[i];
    } else if (text[i + 1] === escape) {
      out += escape;
      i++;
    } else if (text[i + 1] === "+" && /^[0-9A-Fa-f]{6}$/.test(text.slice(i + 2, i + 8))) {
      out += codePoint(parseInt(text.slice(i + 2, i + 8), 16));
      i += 7;
    } else if (/^[0-9A-Fa-f]{4}$/.test(text.slice(i + 1, i + 5))) {
      out += codePoint(parseInt(text.slice(i + 1, i + 5), 16));
      i += 4;
    } else {
      out += text[i];
    }
  }
  return out;
}

function codePoint(n: number): string {
  return n <= 0x10ffff ? String.fromCodePoint(n) : "\ufffd";
}
