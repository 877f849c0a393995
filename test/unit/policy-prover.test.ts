/**
 * The policy prover (src/db/policy-prover.ts) on expression trees captured
 * from PostgreSQL 15 (fixtures/policy-trees.ts): every proven shape is
 * proven with the column it confines, every other shape the issue measured
 * (OR, LIKE, coalesce, IS NOT FALSE, IS NOT DISTINCT FROM, a trojan `=`, a
 * case-insensitive collation, sub-selects that do more than call
 * current_tenant_id()) is not; an AND proves only when its other conditions
 * are leak-free (no row value reaches code that is not LEAKPROOF, nothing
 * the app role can replace); and policies combine as PostgreSQL combines
 * them (permissive OR-ed, restrictive AND-ed, per command, leaks anywhere).
 */
import { describe, expect, test } from "bun:test";
import { calledFunctions, parseNodeTree } from "../../src/db/node-tree.ts";
import {
  diagnose,
  judgeClause,
  leaksRows,
  unprovenPolicies,
  type ClauseJudgement,
  type JudgedPolicy,
  type PolCmd,
  type ProverCatalog,
} from "../../src/db/policy-prover.ts";
import { CAPTURED, POLICY_TREES } from "./fixtures/policy-trees.ts";

const cat: ProverCatalog = {
  tenantFunctions: new Set(CAPTURED.tenantFunctions),
  equalityOperators: new Set(CAPTURED.equalityOperators),
  nondeterministicCollations: new Set(CAPTURED.nondeterministicCollations),
  leakproofFunctions: new Set(CAPTURED.leakproofFunctions),
  replaceableFunctions: new Set(),
};
const settingFunctions = new Set<number>(CAPTURED.settingFunctions);

type Name = keyof typeof POLICY_TREES;
const tree = (name: Name) => parseNodeTree(POLICY_TREES[name].tree);
/** The column a clause proves confined to the tenant, leak-free, or undefined. */
const provenWith = (v: ReturnType<typeof parseNodeTree>, c: ProverCatalog) => {
  const j = judgeClause(v, c);
  return leaksRows(j, "USING") ? undefined : j.column;
};
const proven = (name: Name) => provenWith(tree(name), cat);

// attnums of the capture table t
const TENANT_ID = 2;
const V = 3;
const U = 4;
const N = 5;

describe("judgeClause: the proven shapes", () => {
  const cases: [Name, number][] = [
    ["recommended", TENANT_ID],
    ["direct", TENANT_ID],
    ["reversed", TENANT_ID],
    ["reversed_subselect", TENANT_ID],
    ["multigres_function", TENANT_ID],
    ["varchar_column", V], // RELABELTYPE over the column
    ["uuid_cast", U], // COERCEVIAIO over the call
    ["uuid_subselect_cast", U], // COERCEVIAIO over the sub-select
    ["int_cast", N],
    ["column_cast", U], // COERCEVIAIO over the column
    ["and_narrows", TENANT_ID],
    ["and_narrows_second", TENANT_ID],
    ["and_leakproof_comparison", TENANT_ID], // texteq is LEAKPROOF
    ["and_no_row_call", TENANT_ID], // is_staff() sees no row
    ["and_exists_leakproof", TENANT_ID], // the row reaches only a LEAKPROOF comparison in the sub-select
  ];
  for (const [name, column] of cases) {
    test(`${name}: ${POLICY_TREES[name].using}`, () => {
      expect(proven(name)).toBe(column);
    });
  }
  test("the recommended policy's WITH CHECK too", () => {
    expect(provenWith(parseNodeTree(POLICY_TREES.recommended.checkTree), cat)).toBe(TENANT_ID);
  });
});

describe("judgeClause: everything else is unproven", () => {
  const cases: [Name, string][] = [
    ["or_true", "an OR arm admits every row"],
    ["or_staff", "an OR arm with a function of one's own"],
    ["like_prefix", "tenant a sees ab"],
    ["coalesce", "NULL tenant: every row"],
    ["is_not_false", "NULL comparison is not false"],
    ["not_distinct", "NULL IS NOT DISTINCT FROM NULL"],
    ["null_arm", "IS NULL OR"],
    ["case_null", "CASE on NULL"],
    ["trojan_operator", "a `=` outside pg_catalog"],
    ["nondeterministic_collation", "a case-insensitive collation"],
    ["subselect_from", "a sub-select with FROM"],
    ["subselect_where", "a sub-select with WHERE"],
    ["subselect_limit", "a sub-select with LIMIT"],
    ["subselect_union", "a sub-select with UNION"],
    ["in_subselect", "an ANY sub-link"],
    ["own_function", "current_tenant_id() behind a function of one's own"],
    ["other_column", "no tenant function"],
    ["by_user", "current_user"],
    ["current_setting", "a forgeable setting"],
    ["not_equal", "<> is not ="],
    ["column_cast_failing", "a column cast that can fail shows other tenants' values"],
    ["other_table_column", "another table's column"],
  ];
  for (const [name, why] of cases) {
    test(`${name} (${why}): ${POLICY_TREES[name].using}`, () => {
      expect(proven(name)).toBeUndefined();
    });
  }

  test("the same trees are proven once the catalog says so: the refusals come from the catalog facts", () => {
    const trojan = tree("trojan_operator");
    const opno = Number(/:opno (\d+)/.exec(POLICY_TREES.trojan_operator.tree)![1]);
    expect(provenWith(trojan, { ...cat, equalityOperators: new Set([...cat.equalityOperators, opno]) })).toBe(TENANT_ID);
    expect(provenWith(tree("nondeterministic_collation"), { ...cat, nondeterministicCollations: new Set() })).toBe(7);
    expect(proven("direct")).toBe(TENANT_ID);
    expect(provenWith(tree("direct"), { ...cat, tenantFunctions: new Set() })).toBeUndefined();
  });

});

describe("judgeClause: leaks", () => {
  const judge = (name: Name, c: ProverCatalog = cat) => judgeClause(tree(name), c);
  const leaky = (name: Name, c: ProverCatalog = cat) => leaksRows(judge(name, c), "USING");
  test("an AND whose other condition passes the row to code that is not LEAKPROOF confines the rows but leaks", () => {
    expect(judge("and_cast")).toEqual({ column: TENANT_ID, leaks: [{ node: "COERCEVIAIO" }] });
    expect(leaky("and_not_leakproof")).toBe(true);
    expect(judge("and_function")).toEqual({ column: TENANT_ID, leaks: [{ function: CAPTURED.visible }] });
    expect(leaky("and_exists_cast")).toBe(true); // t.body::int inside the sub-select
    expect(proven("and_cast")).toBeUndefined();
  });
  test("as WITH CHECK nothing leaks: it sees only the rows the session writes", () => {
    expect(leaksRows(judge("and_cast"), "WITH CHECK")).toBe(false);
    expect(leaksRows(judge("function_only"), "WITH CHECK")).toBe(false);
  });
  test("a function the app role can replace leaks even when no row reaches it (it runs once per row)", () => {
    const isStaff = [...calledFunctions(tree("and_no_row_call"))].find((f) => !cat.tenantFunctions.has(f))!;
    expect(leaky("and_no_row_call", { ...cat, replaceableFunctions: new Set([isStaff]) })).toBe(true);
    expect(leaky("and_no_row_call")).toBe(false);
  });
  test("without a tenant comparison: no column, and leaks only where code sees the row", () => {
    expect(judge("true_only")).toEqual({ leaks: [] });
    expect(judge("other_column")).toEqual({ leaks: [] }); // texteq(tenant_id, body) is LEAKPROOF
    expect(leaky("function_only")).toBe(true);
  });
  test("the tenant comparison itself may cast the column; proven shapes never leak", () => {
    expect(judge("column_cast")).toEqual({ column: U, leaks: [] });
    expect(judge("recommended")).toEqual({ column: TENANT_ID, leaks: [] });
  });
});

describe("diagnose: the specific rule for an unproven clause", () => {
  const d = (name: Name, permissive = true) => diagnose(tree(name), cat, settingFunctions, permissive);
  test("IS NULL OR on the tenant: null arm", () => {
    expect(d("null_arm")).toEqual({ readsSetting: false, nullArm: true, callsTenant: true });
  });
  test("current_setting(): reads the setting, never calls the tenant function", () => {
    expect(d("current_setting")).toEqual({ readsSetting: true, nullArm: false, callsTenant: false });
  });
  test("no tenant function, or one behind a function of one's own: callsTenant false", () => {
    for (const name of ["other_column", "by_user", "own_function"] as const) expect(d(name).callsTenant).toBe(false);
  });
  test("LIKE, OR true, coalesce: they call it, so they are unproven rather than unchecked", () => {
    for (const name of ["like_prefix", "or_true", "coalesce", "is_not_false"] as const) {
      expect(d(name)).toEqual({ readsSetting: false, nullArm: false, callsTenant: true });
    }
  });
});

describe("unprovenPolicies: how policies combine", () => {
  let n = 0;
  /** proven: a tenant comparison; inert: none, nothing leaks; leaky: none, and a leak. */
  type Kind = "proven" | "inert" | "leaky";
  const as = (k?: Kind): ClauseJudgement | undefined =>
    k === undefined ? undefined : k === "proven" ? { column: 2, leaks: [] } : k === "inert" ? { leaks: [] } : { leaks: [{ node: "COERCEVIAIO" }] };
  const pol = (cmd: PolCmd, permissive: boolean, using?: Kind, withCheck?: Kind): JudgedPolicy<string> => ({
    policy: `${permissive ? "p" : "r"}${++n}`,
    cmd,
    permissive,
    using: as(using),
    withCheck: as(withCheck),
  });
  const names = (ps: JudgedPolicy<string>[]) => unprovenPolicies(ps).map((u) => u.policy);
  const unbounded = (ps: JudgedPolicy<string>[]) => unprovenPolicies(ps).map((u) => [u.policy, [...u.unbounded]]);

  test("no policy, or only proven permissive ones: nothing to report", () => {
    expect(unprovenPolicies([])).toEqual([]);
    expect(unprovenPolicies([pol("*", true, "proven", "proven"), pol("r", true, "proven")])).toEqual([]);
  });

  test("an unproven permissive ALL policy: USING for SELECT, UPDATE, DELETE; its USING checks INSERT, UPDATE", () => {
    const p = pol("*", true, "inert");
    expect(unbounded([pol("*", true, "proven", "proven"), p])).toEqual([
      [
        p.policy,
        [
          ["USING", ["SELECT", "UPDATE", "DELETE"]],
          ["WITH CHECK", ["INSERT", "UPDATE"]],
        ],
      ],
    ]);
  });

  test("an unproven WITH CHECK only: INSERT and UPDATE", () => {
    const [u] = unprovenPolicies([pol("*", true, "proven", "inert")]);
    expect([...u!.unbounded]).toEqual([["WITH CHECK", ["INSERT", "UPDATE"]]]);
    expect([...u!.leaky]).toEqual([]);
  });

  test("a command-specific policy is judged for its command only", () => {
    const [ins] = unprovenPolicies([pol("a", true, undefined, "inert")]);
    expect([...ins!.unbounded]).toEqual([["WITH CHECK", ["INSERT"]]]);
    const [sel] = unprovenPolicies([pol("r", true, "inert")]);
    expect([...sel!.unbounded]).toEqual([["USING", ["SELECT"]]]);
  });

  test("a proven restrictive policy bounds inert permissive ones, for the commands it covers", () => {
    const open = pol("*", true, "inert");
    expect(names([open, pol("*", false, "proven")])).toEqual([]);
    const [u] = unprovenPolicies([open, pol("r", false, "proven")]);
    expect([...u!.unbounded]).toEqual([
      ["USING", ["UPDATE", "DELETE"]],
      ["WITH CHECK", ["INSERT", "UPDATE"]],
    ]);
  });

  test("an unproven restrictive policy bounds nothing, and an inert one is not itself reported", () => {
    const open = pol("*", true, "inert");
    expect(names([open, pol("*", false, "inert")])).toEqual([open.policy]);
  });

  test("a restrictive policy without the clause bounds nothing for it", () => {
    const open = pol("*", true, "inert");
    const [u] = unprovenPolicies([open, pol("a", false, undefined, "proven")]);
    expect([...u!.unbounded]).toEqual([
      ["USING", ["SELECT", "UPDATE", "DELETE"]],
      ["WITH CHECK", ["UPDATE"]],
    ]);
  });

  test("a permissive clause that is absent admits nothing (ALL with only WITH CHECK)", () => {
    expect(unprovenPolicies([pol("*", true, undefined, "proven")])).toEqual([]);
  });

  test("a leaky clause is reported even when bounded, restrictive ones included", () => {
    const leakyPermissive = pol("r", true, "leaky");
    const leakyRestrictive = pol("r", false, "leaky");
    const result = unprovenPolicies([pol("*", true, "proven", "proven"), leakyPermissive, leakyRestrictive, pol("*", false, "proven")]);
    expect(result.map((u) => [u.policy, [...u.leaky], [...u.unbounded]])).toEqual([
      [leakyPermissive.policy, [["USING", ["SELECT"]]], []],
      [leakyRestrictive.policy, [["USING", ["SELECT"]]], []],
    ]);
  });

  test("a leak in WITH CHECK is none (the session's own rows); a tenant comparison with a leak confines, and leaks", () => {
    const confiningLeak = { column: 2, leaks: [{ node: "COERCEVIAIO" }] };
    expect(unprovenPolicies([{ policy: "c", cmd: "*", permissive: true, using: as("proven"), withCheck: confiningLeak }])).toEqual([]);
    const [u] = unprovenPolicies([{ policy: "u", cmd: "*", permissive: true, using: confiningLeak }]);
    expect([...u!.leaky]).toEqual([["USING", ["SELECT", "UPDATE", "DELETE"]]]);
    expect([...u!.unbounded]).toEqual([]);
  });

  test("where no permissive clause applies nothing is evaluated: a leaky restrictive one is harmless there", () => {
    expect(unprovenPolicies([pol("r", true, "proven"), pol("d", false, "leaky")])).toEqual([]);
  });
});
