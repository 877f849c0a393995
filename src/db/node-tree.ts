/**
 * A reader for PostgreSQL's pg_node_tree text (what `pg_policy.polqual::text`
 * shows: `{BOOLEXPR :boolop or :args ({NULLTEST :arg {FUNCEXPR :funcid 16390
 * …} :nulltesttype 0 …} …)}`), so that doctor can reason about a policy's
 * structure (which functions it calls, by oid, and where) instead of
 * pattern-matching its deparsed SQL.
 *
 * The tokenizer follows pg_strtok() in src/backend/nodes/read.c: `(`, `)`,
 * `{`, `}` are one-character tokens; anything else runs to whitespace or one
 * of those, a backslash escaping the next character.
 */

export interface PgNode {
  type: string;
  fields: Record<string, PgValue[]>;
}
export type PgValue = string | PgNode | PgValue[];

function tokenize(text: string): string[] {
  const tokens: string[] = [];
  let i = 0;
  while (i < text.length) {
    const c = text[i]!;
    if (c === " " || c === "\n" || c === "\t" || c === "\r") {
      i++;
    } else if (c === "(" || c === ")" || c === "{" || c === "}") {
      tokens.push(c);
      i++;
    } else {
      let tok = "";
      while (i < text.length) {
        const d = text[i]!;
        if (d === " " || d === "\n" || d === "\t" || d === "\r" || d === "(" || d === ")" || d === "{" || d === "}") break;
        if (d === "\\" && i + 1 < text.length) {
          tok += text[i + 1];
          i += 2;
        } else {
          tok += d;
          i++;
        }
      }
      tokens.push(tok);
    }
  }
  return tokens;
}

/** Parse a pg_node_tree; throws on text that is not one. */
export function parseNodeTree(text: string): PgValue {
  const tokens = tokenize(text);
  let pos = 0;

  const value = (): PgValue => {
    const t = tokens[pos];
    if (t === undefined) throw new Error("pg_node_tree: unexpected end");
    if (t === "{") return node();
    if (t === "(") return list();
    pos++;
    return t;
  };
  const list = (): PgValue[] => {
    pos++; // (
    const items: PgValue[] = [];
    while (tokens[pos] !== ")") {
      if (tokens[pos] === undefined) throw new Error("pg_node_tree: unterminated list");
      items.push(value());
    }
    pos++; // )
    return items;
  };
  const node = (): PgNode => {
    pos++; // {
    const type = tokens[pos++];
    if (type === undefined) throw new Error("pg_node_tree: unterminated node");
    const fields: Record<string, PgValue[]> = {};
    let current: PgValue[] | undefined;
    while (tokens[pos] !== "}") {
      const t = tokens[pos];
      if (t === undefined) throw new Error("pg_node_tree: unterminated node");
      if (t.startsWith(":") && t.length > 1) {
        current = fields[t.slice(1)] = [];
        pos++;
      } else {
        const v = value();
        (current ?? (fields[""] ??= [])).push(v);
      }
    }
    pos++; // }
    return { type, fields };
  };

  const out = value();
  if (pos !== tokens.length) throw new Error("pg_node_tree: trailing tokens");
  return out;
}

export function isNode(v: PgValue | undefined): v is PgNode {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Every node in the tree, depth first (the root included). */
export function* walk(v: PgValue): Generator<PgNode> {
  if (Array.isArray(v)) {
    for (const x of v) yield* walk(x);
  } else if (isNode(v)) {
    yield v;
    for (const vals of Object.values(v.fields)) for (const x of vals) yield* walk(x);
  }
}

/** Oids of every function the expression calls (FUNCEXPR :funcid), sub-selects included. */
export function calledFunctions(v: PgValue): Set<number> {
  const out = new Set<number>();
  for (const n of walk(v)) {
    if (n.type === "FUNCEXPR") {
      const id = Number(n.fields.funcid?.[0]);
      if (Number.isInteger(id)) out.add(id);
    }
  }
  return out;
}

/** The direct children of an OR (BOOLEXPR :boolop or :args (…)). */
function orArms(n: PgNode): PgValue[] {
  if (n.type !== "BOOLEXPR" || n.fields.boolop?.[0] !== "or") return [];
  const args = n.fields.args?.[0];
  return Array.isArray(args) ? args : [];
}

/** `X IS NULL` (NULLTEST, nulltesttype 0 = IS_NULL) where X calls one of `fns`. */
function isNullTestOn(v: PgValue, fns: Set<number>): boolean {
  if (!isNode(v) || v.type !== "NULLTEST" || v.fields.nulltesttype?.[0] !== "0") return false;
  const arg = v.fields.arg?.[0];
  if (arg === undefined) return false;
  for (const f of calledFunctions(arg)) if (fns.has(f)) return true;
  return false;
}

/**
 * True when the expression admits rows through an "X IS NULL" arm on the
 * tenant (e.g. `current_tenant_id() IS NULL OR tenant_id = current_tenant_id()`):
 * with no context, X is NULL and every row passes. `topIsArm` treats the
 * whole expression as one arm too, as for a permissive policy (permissive
 * policies are OR-ed together).
 */
export function hasNullArm(v: PgValue, fns: Set<number>, topIsArm: boolean): boolean {
  if (topIsArm && isNullTestOn(v, fns)) return true;
  for (const n of walk(v)) {
    for (const arm of orArms(n)) if (isNullTestOn(arm, fns)) return true;
  }
  return false;
}
