/**
 * Proves, from a policy's stored expression tree (pg_policy.polqual and
 * polwithcheck, read by node-tree.ts), that row-level security confines a
 * session to its tenant's rows, or says that it cannot. Pure: the catalog
 * facts it needs (which oids are current_tenant_id(), which operators are
 * pg_catalog's `=`, which functions are LEAKPROOF …) come in as sets.
 *
 * A clause is proven only in these shapes; everything else is unproven,
 * however harmless it may look:
 *
 *   <col> = current_tenant_id()            (either operand order)
 *   <col> = (SELECT current_tenant_id())   (an EXPR sub-select of exactly that:
 *                                           no FROM, WHERE, GROUP, LIMIT, …)
 *   <proven> AND <leak-free>               (the other conjuncts only narrow)
 *
 * where <col> is a column of the policy's own table (a Var of range table
 * entry 1, varlevelsup 0, attnum > 0), optionally under a binary relabel or
 * an I/O cast to text (`u::text`: a cast that can fail, `org::int`, would
 * show other tenants' values in its error); current_tenant_id() is public.current_tenant_id()
 * or multigres.current_tenant_id(), by oid, called with no arguments and
 * optionally cast (`current_tenant_id()::uuid`); `=` is an operator of
 * pg_catalog (a `=` of another schema runs whatever function its author
 * chose: a trojan) compared under a deterministic collation (under a
 * case-insensitive one, tenant `acme` sees `ACME`'s rows).
 *
 * Why so narrow: a session can make current_tenant_id() NULL whenever it
 * likes (RESET, or a context it forged), so every shape that admits rows
 * when it is NULL leaks (`OR`, `IS NOT FALSE`, `coalesce`, `IS NOT DISTINCT
 * FROM`, CASE); LIKE admits other tenants whose id has the tenant's as a
 * prefix; a function of one's own can return anything. Proving a few shapes
 * exactly is worth more than guessing at many.
 *
 * Leak-free: PostgreSQL orders the conditions of a policy by cost, not as
 * written, so the other conjuncts of an AND (and every restrictive policy,
 * and every other permissive one) also run on other tenants' rows. There
 * they must not pass the row's values to anything that could reveal them:
 * a function that is not LEAKPROOF (`body::int > 0` fails with "invalid
 * input syntax for type integer: <another tenant's value>"), or any
 * function the app role could replace (it owns it, or a role it is a
 * member of does: `RAISE NOTICE` every row). Routing a value (AND, CASE,
 * IS NULL, a LEAKPROOF comparison) reveals nothing.
 *
 * Policies combine as PostgreSQL combines them: for a command, a row passes
 * when (the OR of the applicable permissive policies) AND (every applicable
 * restrictive policy). So a table is isolated for a command when every
 * applicable permissive clause confines rows to the tenant (has a tenant
 * comparison), or some applicable restrictive clause does, and no
 * applicable USING leaks; with no permissive clause, no row passes and
 * nothing is evaluated.
 */
import { calledFunctions, hasNullArm, isNode, type PgNode, type PgValue } from "./node-tree.ts";

/** What the prover needs to know of the catalog. */
export interface ProverCatalog {
  /** Oids of public.current_tenant_id() and multigres.current_tenant_id(). */
  tenantFunctions: ReadonlySet<number>;
  /** Oids of the operators named `=` in pg_catalog. */
  equalityOperators: ReadonlySet<number>;
  /** Oids of nondeterministic collations (under which `=` is not equality of strings). */
  nondeterministicCollations: ReadonlySet<number>;
  /** Oids of LEAKPROOF functions (pg_proc.proleakproof): they reveal nothing of their arguments but their result. */
  leakproofFunctions: ReadonlySet<number>;
  /** Oids of functions the app role can replace: it owns them, or a role it is a member of does. */
  replaceableFunctions: ReadonlySet<number>;
}

const first = (n: PgNode, field: string): PgValue | undefined => n.fields[field]?.[0];
const num = (n: PgNode, field: string): number => Number(first(n, field));
/** A node list field: `(a b)`, or `<>` for an empty one. */
const list = (n: PgNode, field: string): PgValue[] => {
  const v = first(n, field);
  return Array.isArray(v) ? v : [];
};

/** Strip the casts that change a value's type but not which rows compare equal. */
function uncast(v: PgValue | undefined): PgValue | undefined {
  while (isNode(v) && (v.type === "RELABELTYPE" || v.type === "COERCEVIAIO")) v = first(v, "arg");
  return v;
}

/**
 * Types an I/O cast of the column may produce: their input functions take
 * any text, so the cast cannot fail on another tenant's value and show it
 * in the error (`org::int` would). text, varchar, name.
 */
const TEXT_TYPES = new Set([25, 1043, 19]);

/** The attnum of a plain column of the policy's own table, if `v` is one (under relabels, or I/O casts to text). */
function ownColumn(v: PgValue | undefined): number | undefined {
  let n = v;
  while (isNode(n) && (n.type === "RELABELTYPE" || (n.type === "COERCEVIAIO" && TEXT_TYPES.has(num(n, "resulttype"))))) n = first(n, "arg");
  if (!isNode(n) || n.type !== "VAR") return undefined;
  const attno = num(n, "varattno");
  return num(n, "varno") === 1 && num(n, "varlevelsup") === 0 && attno > 0 ? attno : undefined;
}

function isTenantCall(v: PgValue | undefined, cat: ProverCatalog): boolean {
  const n = uncast(v);
  return (
    isNode(n) &&
    n.type === "FUNCEXPR" &&
    cat.tenantFunctions.has(num(n, "funcid")) &&
    first(n, "funcretset") === "false" &&
    list(n, "args").length === 0
  );
}

/**
 * Fields of a sub-select's Query that may hold anything; every other field
 * must be empty (`<>`, false or 0), so that clauses a later PostgreSQL adds
 * are refused rather than overlooked.
 */
const QUERY_FREE_FIELDS = new Set(["commandType", "querySource", "canSetTag", "targetList", "jointree", "stmt_location", "stmt_len", "queryId"]);
const EMPTY = new Set(["<>", "false", "0"]);

function isEmptyField(vals: PgValue[]): boolean {
  return vals.length === 0 || (vals.length === 1 && typeof vals[0] === "string" && EMPTY.has(vals[0]));
}

/** `(SELECT current_tenant_id())`: an EXPR sub-link whose query is that and nothing else. */
function isTenantSubselect(v: PgValue | undefined, cat: ProverCatalog): boolean {
  const n = uncast(v);
  if (!isNode(n) || n.type !== "SUBLINK" || first(n, "subLinkType") !== "4") return false; // 4 = EXPR_SUBLINK
  if (!isEmptyField(n.fields.testexpr ?? [])) return false;
  const q = first(n, "subselect");
  if (!isNode(q) || q.type !== "QUERY" || first(q, "commandType") !== "1") return false; // 1 = CMD_SELECT
  for (const [field, vals] of Object.entries(q.fields)) {
    if (!QUERY_FREE_FIELDS.has(field) && !isEmptyField(vals)) return false;
  }
  const from = first(q, "jointree");
  if (!isNode(from) || from.type !== "FROMEXPR" || !isEmptyField(from.fields.fromlist ?? []) || !isEmptyField(from.fields.quals ?? [])) {
    return false;
  }
  const targets = list(q, "targetList");
  const t = targets[0];
  return targets.length === 1 && isNode(t) && t.type === "TARGETENTRY" && first(t, "resjunk") === "false" && isTenantCall(first(t, "expr"), cat);
}

/** The tenant side of the comparison: the call or the sub-select, cast or not. */
const isTenantValue = (v: PgValue | undefined, cat: ProverCatalog) => isTenantCall(v, cat) || isTenantSubselect(v, cat);

/** `<col> = <tenant>` in either order: the column's attnum, or undefined. */
function tenantEquality(n: PgNode, cat: ProverCatalog): number | undefined {
  if (n.type !== "OPEXPR" || !cat.equalityOperators.has(num(n, "opno"))) return undefined;
  if (cat.nondeterministicCollations.has(num(n, "inputcollid"))) return undefined;
  const args = list(n, "args");
  if (args.length !== 2) return undefined;
  const [a, b] = args;
  if (isTenantValue(b, cat)) return ownColumn(a);
  if (isTenantValue(a, cat)) return ownColumn(b);
  return undefined;
}

// ---- leaks ------------------------------------------------------------------

/** What may reveal the rows a clause runs on: a function (by oid), or a node that computes on them (an I/O cast …). */
export type Leak = { function: number } | { node: string };

/** Node types that pass values on, or test them, without computing on them. */
const ROUTING = new Set([
  "VAR", "CONST", "PARAM", "BOOLEXPR", "NULLTEST", "BOOLEANTEST", "RELABELTYPE",
  "CASEEXPR", "CASEWHEN", "CASETESTEXPR", "COALESCEEXPR", "ARRAYEXPR", "ROWEXPR", "SQLVALUEFUNCTION",
]);
/** Node types that only hold a sub-select's structure; the expressions in them are judged on their own. */
const STRUCTURE = new Set([
  "SUBLINK", "QUERY", "FROMEXPR", "JOINEXPR", "RANGETBLREF", "RANGETBLENTRY", "RANGETBLFUNCTION",
  "TARGETENTRY", "ALIAS", "SORTGROUPCLAUSE", "RTEPERMISSIONINFO",
]);
/** Node types that call a function by oid, and the field holding it. */
const CALLS: Record<string, string> = {
  FUNCEXPR: "funcid",
  OPEXPR: "opfuncid",
  DISTINCTEXPR: "opfuncid",
  NULLIFEXPR: "opfuncid",
  SCALARARRAYOPEXPR: "opfuncid",
};

/** Every node with its sub-select depth (how many Query nodes lie above it). */
function* withDepth(v: PgValue, depth: number): Generator<[PgNode, number]> {
  if (Array.isArray(v)) {
    for (const x of v) yield* withDepth(x, depth);
  } else if (isNode(v)) {
    yield [v, depth];
    const inner = v.type === "QUERY" ? depth + 1 : depth;
    for (const vals of Object.values(v.fields)) for (const x of vals) yield* withDepth(x, inner);
  }
}

/** Whether `v`, at sub-select depth `depth`, reads the row the policy judges (a Var that many levels up). */
function readsRow(v: PgValue, depth: number): boolean {
  for (const [n, d] of withDepth(v, depth)) {
    if (n.type === "VAR" && num(n, "varlevelsup") === d) return true;
  }
  return false;
}

/** What in `v` may reveal the rows it runs on (none: it is leak-free). */
export function leaks(v: PgValue, cat: ProverCatalog): Leak[] {
  const out: Leak[] = [];
  for (const [n, d] of withDepth(v, 0)) {
    const field = CALLS[n.type];
    if (field !== undefined) {
      const fn = num(n, field);
      const onRow = readsRow(n.fields.args ?? [], d);
      if (cat.replaceableFunctions.has(fn) || (onRow && !cat.leakproofFunctions.has(fn))) out.push({ function: fn });
    } else if (!ROUTING.has(n.type) && !STRUCTURE.has(n.type) && readsRow(n, d)) {
      out.push({ node: n.type });
    }
  }
  return out;
}

// ---- clauses ----------------------------------------------------------------

export interface ClauseJudgement {
  /** The attnum of the column a tenant comparison confines (the clause's tenant column), if it has one. */
  column?: number;
  /** What in the clause, beyond the tenant comparison, may reveal the rows it runs on. */
  leaks: Leak[];
}

/** The conjuncts of nested ANDs, flattened. */
function conjuncts(v: PgValue): PgValue[] {
  return isNode(v) && v.type === "BOOLEXPR" && first(v, "boolop") === "and" ? list(v, "args").flatMap(conjuncts) : [v];
}

/**
 * Judge one clause: its tenant comparison (a conjunct of the proven shapes,
 * whose column may be cast) and the leaks of everything else.
 */
export function judgeClause(v: PgValue, cat: ProverCatalog): ClauseJudgement {
  let column: number | undefined;
  const rest: PgValue[] = [];
  for (const part of conjuncts(v)) {
    const col = isNode(part) ? tenantEquality(part, cat) : undefined;
    if (col !== undefined) column ??= col;
    else rest.push(part);
  }
  const found = rest.flatMap((part) => leaks(part, cat));
  return column === undefined ? { leaks: found } : { column, leaks: found };
}

/** The clause confines the rows it admits to the session's tenant: it has a tenant comparison conjunct. */
export const confines = (j: ClauseJudgement): boolean => j.column !== undefined;

/**
 * The clause may reveal other tenants' rows. Only USING runs on them:
 * WITH CHECK sees the rows the session itself writes, so a leak there
 * reveals nothing the session did not have.
 */
export const leaksRows = (j: ClauseJudgement, clause: Clause): boolean => clause === "USING" && j.leaks.length > 0;

/** Why a clause is not proven, most specific first (several may hold). */
export interface Diagnosis {
  /** It reads current_setting() (any session can SET the setting). */
  readsSetting: boolean;
  /** It has an `X IS NULL` arm on the tenant (no context = every row). */
  nullArm: boolean;
  /** It calls current_tenant_id() somewhere. */
  callsTenant: boolean;
}

export function diagnose(v: PgValue, cat: ProverCatalog, settingFunctions: ReadonlySet<number>, permissive: boolean): Diagnosis {
  const fns = calledFunctions(v);
  const callsAny = (of: ReadonlySet<number>) => [...fns].some((f) => of.has(f));
  return {
    readsSetting: callsAny(settingFunctions),
    nullArm: hasNullArm(v, new Set([...cat.tenantFunctions, ...settingFunctions]), permissive),
    callsTenant: callsAny(cat.tenantFunctions),
  };
}

// ---- how policies combine ---------------------------------------------------

export type Command = "SELECT" | "INSERT" | "UPDATE" | "DELETE";
export type Clause = "USING" | "WITH CHECK";
/** pg_policy.polcmd: r = SELECT, a = INSERT, w = UPDATE, d = DELETE, * = ALL. */
export type PolCmd = "r" | "a" | "w" | "d" | "*";

export const COMMANDS: readonly { command: Command; polcmd: PolCmd; clauses: readonly Clause[] }[] = [
  { command: "SELECT", polcmd: "r", clauses: ["USING"] },
  { command: "INSERT", polcmd: "a", clauses: ["WITH CHECK"] },
  { command: "UPDATE", polcmd: "w", clauses: ["USING", "WITH CHECK"] },
  { command: "DELETE", polcmd: "d", clauses: ["USING"] },
];

/** A policy that applies to the app role, with its clauses judged. */
export interface JudgedPolicy<P> {
  policy: P;
  cmd: PolCmd;
  permissive: boolean;
  /** undefined: the policy has no such clause. */
  using?: ClauseJudgement;
  withCheck?: ClauseJudgement;
}

/**
 * The clause a policy contributes to a command's check (undefined when it
 * has none). Without WITH CHECK, an ALL or UPDATE policy checks new rows
 * with its USING, as PostgreSQL does.
 */
function clauseOf(p: JudgedPolicy<unknown>, clause: Clause): ClauseJudgement | undefined {
  return clause === "USING" ? p.using : (p.withCheck ?? p.using);
}

/** Per clause, the commands for which something is wrong with it. */
export type Shortfalls = Map<Clause, Command[]>;

export interface Unproven<P> {
  policy: P;
  /** A permissive clause that does not confine rows to the tenant, and that no confining restrictive clause bounds: it may admit other tenants' rows. */
  unbounded: Shortfalls;
  /** A USING clause (permissive or restrictive) that may reveal the rows it runs on, other tenants' included. */
  leaky: Shortfalls;
}

const note = (m: Shortfalls, clause: Clause, command: Command) => m.set(clause, [...(m.get(clause) ?? []), command]);

/**
 * The policies that keep a table from being isolated, per command and
 * clause: permissive clauses without a tenant comparison that no
 * restrictive one bounds, and USING clauses that leak. Where no permissive clause applies, no row
 * passes and PostgreSQL evaluates nothing.
 */
export function unprovenPolicies<P>(policies: readonly JudgedPolicy<P>[]): Unproven<P>[] {
  const out = new Map<JudgedPolicy<P>, Unproven<P>>();
  const entry = (p: JudgedPolicy<P>) => out.get(p) ?? out.set(p, { policy: p.policy, unbounded: new Map(), leaky: new Map() }).get(p)!;
  for (const clause of ["USING", "WITH CHECK"] as const) {
    for (const { command, polcmd } of COMMANDS.filter((c) => c.clauses.includes(clause))) {
      const applicable = policies.flatMap((p) => {
        const j = (p.cmd === polcmd || p.cmd === "*") && clauseOf(p, clause);
        return j ? [{ p, j }] : [];
      });
      if (!applicable.some(({ p }) => p.permissive)) continue;
      const bounded = applicable.some(({ p, j }) => !p.permissive && confines(j));
      for (const { p, j } of applicable) {
        if (leaksRows(j, clause)) note(entry(p).leaky, clause, command);
        if (p.permissive && !confines(j) && !bounded) note(entry(p).unbounded, clause, command);
      }
    }
  }
  return [...out.values()];
}
