/**
 * The pg_node_tree reader doctor uses on policy expressions, and its
 * search_path parser. The integration tests feed them real catalog text;
 * these pin the edge cases (escapes, nesting, quoting) and show that no
 * input crashes the reader with anything but an Error.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { calledFunctions, hasNullArm, parseNodeTree, type PgNode } from "../../src/db/node-tree.ts";
import { parseSearchPath } from "../../src/db/doctor.ts";

// `current_tenant_id() IS NULL OR tenant_id = current_tenant_id()` as PostgreSQL 15 stores it (funcid 16390).
const NULL_ARM =
  "{BOOLEXPR :boolop or :args ({NULLTEST :arg {FUNCEXPR :funcid 16390 :funcresulttype 25 :funcretset false " +
  ":funcvariadic false :funcformat 0 :funccollid 100 :inputcollid 0 :args <> :location 41} :nulltesttype 0 " +
  ":argisrow false :location 61} {OPEXPR :opno 98 :opfuncid 67 :opresulttype 16 :opretset false :opcollid 0 " +
  ":inputcollid 100 :args ({VAR :varno 1 :varattno 2 :vartype 25 :vartypmod -1 :varcollid 100 :varlevelsup 0 " +
  ":varnosyn 1 :varattnosyn 2 :location 74} {FUNCEXPR :funcid 16390 :funcresulttype 25 :funcretset false " +
  ":funcvariadic false :funcformat 0 :funccollid 100 :inputcollid 0 :args <> :location 86}) :location 84}) :location 71}";

describe("parseNodeTree", () => {
  test("reads nodes, fields, lists and the functions called", () => {
    const tree = parseNodeTree(NULL_ARM) as PgNode;
    expect(tree.type).toBe("BOOLEXPR");
    expect(tree.fields.boolop).toEqual(["or"]);
    expect([...calledFunctions(tree)]).toEqual([16390]);
  });

  test("an IS NULL arm on the tenant function is found; on other functions, or IS NOT NULL, it is not", () => {
    const tree = parseNodeTree(NULL_ARM);
    expect(hasNullArm(tree, new Set([16390]), false)).toBe(true);
    expect(hasNullArm(tree, new Set([1]), false)).toBe(false);
    expect(hasNullArm(parseNodeTree(NULL_ARM.replace(":nulltesttype 0", ":nulltesttype 1")), new Set([16390]), false)).toBe(false);
  });

  test("a lone IS NULL counts as an arm only for a permissive policy (topIsArm)", () => {
    const lone = "{NULLTEST :arg {FUNCEXPR :funcid 7 :args <>} :nulltesttype 0 :argisrow false :location 1}";
    expect(hasNullArm(parseNodeTree(lone), new Set([7]), true)).toBe(true);
    expect(hasNullArm(parseNodeTree(lone), new Set([7]), false)).toBe(false);
  });

  test("backslash escapes keep delimiters inside tokens; constants' byte lists are plain tokens", () => {
    const tree = parseNodeTree("{ALIAS :aliasname we\\ ird\\(name\\) :colnames <>}") as PgNode;
    expect(tree.fields.aliasname).toEqual(["we ird(name)"]);
    const c = parseNodeTree("{CONST :consttype 23 :constlen 4 :constvalue 4 [ 1 0 0 0 ] :constisnull false}") as PgNode;
    expect(c.fields.constvalue).toEqual(["4", "[", "1", "0", "0", "0", "]"]);
  });

  test("malformed input throws an Error, never anything else", () => {
    for (const bad of ["{", "(", "{A :b (", "{A} {B}", ""]) expect(() => parseNodeTree(bad)).toThrow(Error);
    fc.assert(
      fc.property(fc.string({ unit: fc.constantFrom("{", "}", "(", ")", " ", ":a", "x", "\\", "1") }), (s) => {
        try {
          parseNodeTree(s);
        } catch (e) {
          expect(e).toBeInstanceOf(Error);
        }
      }),
    );
  });
});

describe("parseSearchPath", () => {
  test("splits on commas outside quotes and unquotes", () => {
    expect(parseSearchPath("pg_catalog, pg_temp")).toEqual(["pg_catalog", "pg_temp"]);
    expect(parseSearchPath('"$user", public')).toEqual(["$user", "public"]);
    expect(parseSearchPath('"a,b", "q""uote"')).toEqual(["a,b", 'q"uote']);
    expect(parseSearchPath('""')).toEqual([]);
    expect(parseSearchPath("")).toEqual([]);
  });
});
