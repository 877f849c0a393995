/**
 * The policy prover (src/db/policy-prover.ts) on expression trees captured
 * from PostgreSQL 15 (fixtures/policy-trees.ts): every proven shape is
 * proven with the column it confines, every other shape the issue measured
 * (OR, LIKE, coalesce, IS NOT FALSE, IS NOT DISTINCT FROM, a trojan `=`, a
 * case-insensitive collation, sub-selects that do more than call
 * current_tenant_id()) is not; and policies combine as PostgreSQL combines
 * them (permissive OR-ed, restrictive AND-ed, per command).
 */
import { describe, expect, test } from "bun:test";
import { parseNodeTree } from "../../src/db/node-tree.ts";
import {
  diagnose,
  provenTenantColumn,
  unprovenPolicies,
  type JudgedPolicy,
  type PolCmd,
  type ProverCatalog,
} from "../../src/db/policy-prover.ts";
import { CAPTURED, POLICY_TREES } from "./fixtures/policy-trees.ts";

const cat: ProverCatalog = {
  tenantFunctions: new Set(CAPTURED.tenantFunctions),
  equalityOperators: new Set(CAPTURED.equalityOperators),
  nondeterministicCollations: new Set(CAPTURED.nondeterministicCollations),
};
const settingFunctions = new Set<number>(CAPTURED.settingFunctions);

type Name = keyof typeof POLICY_TREES;
const tree = (name: Name) => parseNodeTree(POLICY_TREES[name].tree);
const proven = (name: Name) => provenTenantColumn(tree(name), cat);

// attnums of the capture table t
const TENANT_ID = 2;
const V = 3;
const U = 4;
const N = 5;

describe("provenTenantColumn: the proven shapes", () => {
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
  ];
  for (const [name, column] of cases) {
    test(`${name}: ${POLICY_TREES[name].using}`, () => {
      expect(proven(name)).toBe(column);
    });
  }
  test("the recommended policy's WITH CHECK too", () => {
    expect(provenTenantColumn(parseNodeTree(POLICY_TREES.recommended.checkTree), cat)).toBe(TENANT_ID);
  });
});

describe("provenTenantColumn: everything else is unproven", () => {
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
    expect(provenTenantColumn(trojan, { ...cat, equalityOperators: new Set([...cat.equalityOperators, opno]) })).toBe(TENANT_ID);
    expect(provenTenantColumn(tree("nondeterministic_collation"), { ...cat, nondeterministicCollations: new Set() })).toBe(7);
    expect(proven("direct")).toBe(TENANT_ID);
    expect(provenTenantColumn(tree("direct"), { ...cat, tenantFunctions: new Set() })).toBeUndefined();
  });

  test("an absent clause proves nothing", () => {
    expect(provenTenantColumn(undefined, cat)).toBeUndefined();
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
  const pol = (cmd: PolCmd, permissive: boolean, using?: boolean, withCheck?: boolean): JudgedPolicy<string> => ({
    policy: `${permissive ? "p" : "r"}${++n}`,
    cmd,
    permissive,
    using,
    withCheck,
  });
  const names = (ps: JudgedPolicy<string>[]) => unprovenPolicies(ps).map((u) => u.policy);

  test("no policy, or only proven permissive ones: nothing to report", () => {
    expect(unprovenPolicies([])).toEqual([]);
    expect(unprovenPolicies([pol("*", true, true, true), pol("r", true, true)])).toEqual([]);
  });

  test("an unproven permissive ALL policy: USING for SELECT, UPDATE, DELETE; its USING checks INSERT, UPDATE", () => {
    const p = pol("*", true, false);
    const [u] = unprovenPolicies([pol("*", true, true, true), p]);
    expect(u!.policy).toBe(p.policy);
    expect([...u!.clauses]).toEqual([
      ["USING", ["SELECT", "UPDATE", "DELETE"]],
      ["WITH CHECK", ["INSERT", "UPDATE"]],
    ]);
  });

  test("an unproven WITH CHECK only: INSERT and UPDATE", () => {
    const [u] = unprovenPolicies([pol("*", true, true, false)]);
    expect([...u!.clauses]).toEqual([["WITH CHECK", ["INSERT", "UPDATE"]]]);
  });

  test("a command-specific policy is judged for its command only", () => {
    const [ins] = unprovenPolicies([pol("a", true, undefined, false)]);
    expect([...ins!.clauses]).toEqual([["WITH CHECK", ["INSERT"]]]);
    const [sel] = unprovenPolicies([pol("r", true, false)]);
    expect([...sel!.clauses]).toEqual([["USING", ["SELECT"]]]);
  });

  test("a proven restrictive policy bounds unproven permissive ones, for the commands it covers", () => {
    const open = pol("*", true, false);
    expect(names([open, pol("*", false, true)])).toEqual([]);
    const [u] = unprovenPolicies([open, pol("r", false, true)]);
    expect([...u!.clauses]).toEqual([
      ["USING", ["UPDATE", "DELETE"]],
      ["WITH CHECK", ["INSERT", "UPDATE"]],
    ]);
  });

  test("an unproven restrictive policy bounds nothing, and is not itself reported", () => {
    const open = pol("*", true, false);
    expect(names([open, pol("*", false, false)])).toEqual([open.policy]);
  });

  test("a restrictive policy without the clause bounds nothing for it", () => {
    const open = pol("*", true, false);
    const [u] = unprovenPolicies([open, pol("a", false, undefined, true)]);
    expect([...u!.clauses]).toEqual([
      ["USING", ["SELECT", "UPDATE", "DELETE"]],
      ["WITH CHECK", ["UPDATE"]],
    ]);
  });

  test("a permissive clause that is absent admits nothing (ALL with only WITH CHECK)", () => {
    expect(unprovenPolicies([pol("*", true, undefined, true)])).toEqual([]);
  });
});
