/**
 * Proves, from a policy's stored expression tree (pg_policy.polqual and
 * polwithcheck, read by node-tree.ts), that row-level security confines a
 * session to its tenant's rows, or says that it cannot. Pure: the catalog
 * facts it needs (which oids are current_tenant_id(), which operators are
 * pg_catalog's `=`) come in as sets.
 *
 * A clause is proven only in these shapes; everything else is unproven,
 * however harmless it may look:
 *
 *   <col> = current_tenant_id()            (either operand order)
 *   <col> = (SELECT current_tenant_id())   (an EXPR sub-select of exactly that:
 *                                           no FROM, WHERE, GROUP, LIMIT, …)
 *   <proven> AND <anything>                (the other conjuncts only narrow)
 *
 * where <col> is a column of the policy's own table (a Var of range table
 * entry 1, varlevelsup 0, attnum > 0), optionally under a binary relabel or
 * an I/O cast (`u::text`); current_tenant_id() is public.current_tenant_id()
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
 * Policies combine as PostgreSQL combines them: for a command, a row passes
 * when (the OR of the applicable permissive policies) AND (every applicable
 * restrictive policy). So a table is isolated for a command when every
 * applicable permissive clause is proven, or some applicable restrictive
 * clause is proven; with no permissive clause, no row passes at all.
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

/** The attnum of a plain column of the policy's own table, if `v` is one (casts allowed). */
function ownColumn(v: PgValue | undefined): number | undefined {
  const n = uncast(v);
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

/**
 * The column a clause provably confines to the session's tenant (its
 * attnum), or undefined when the clause is not one of the proven shapes.
 */
export function provenTenantColumn(v: PgValue | undefined, cat: ProverCatalog): number | undefined {
  if (!isNode(v)) return undefined;
  if (v.type === "BOOLEXPR" && first(v, "boolop") === "and") {
    for (const arg of list(v, "args")) {
      const col = provenTenantColumn(arg, cat);
      if (col !== undefined) return col;
    }
    return undefined;
  }
  return tenantEquality(v, cat);
}

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
  using?: boolean;
  withCheck?: boolean;
}

/**
 * The clause a policy contributes to a command's check, proven or not
 * (undefined when it has none). Without WITH CHECK, an ALL or UPDATE policy
 * checks new rows with its USING, as PostgreSQL does.
 */
function clauseVerdict(p: JudgedPolicy<unknown>, clause: Clause): boolean | undefined {
  return clause === "USING" ? p.using : (p.withCheck ?? p.using);
}

export interface Unproven<P> {
  policy: P;
  /** Per clause, the commands for which nothing else makes up for it. */
  clauses: Map<Clause, Command[]>;
}

/**
 * The permissive policies whose unproven clauses decide what rows pass, per
 * command: an unproven permissive clause is harmless only where a proven
 * restrictive clause of the same command bounds every row.
 */
export function unprovenPolicies<P>(policies: readonly JudgedPolicy<P>[]): Unproven<P>[] {
  const out = new Map<JudgedPolicy<P>, Map<Clause, Command[]>>();
  for (const clause of ["USING", "WITH CHECK"] as const) {
    for (const { command, polcmd } of COMMANDS.filter((c) => c.clauses.includes(clause))) {
      const applicable = policies.filter((p) => p.cmd === polcmd || p.cmd === "*");
      const bounded = applicable.some((p) => !p.permissive && clauseVerdict(p, clause) === true);
      if (bounded) continue;
      for (const p of applicable) {
        if (!p.permissive || clauseVerdict(p, clause) !== false) continue;
        const mine = out.get(p) ?? new Map<Clause, Command[]>();
        mine.set(clause, [...(mine.get(clause) ?? []), command]);
        out.set(p, mine);
      }
    }
  }
  return [...out].map(([p, clauses]) => ({ policy: p.policy, clauses }));
}
