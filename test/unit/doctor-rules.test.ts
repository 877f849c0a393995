/**
 * The pure parts of doctor's rules and of its command line: repeatable
 * flags (citty keeps only the last), --no-harden items, tenant columns from
 * flag / environment / config file, role-level settings against the pinned
 * ones, --no-harden downgrades, and the index rules on index descriptions.
 * The integration suite (test/integration/doctor.test.ts) runs them all
 * against real catalogs through the binary.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { noHardenItems, repeatedFlag, resolveCommon, UsageError } from "../../src/db/connect.ts";
import { nameFew, type Finding } from "../../src/db/doctor-findings.ts";
import { keptByChoice, roleSettingProblems } from "../../src/db/doctor-hardening.ts";
import { indexFindings, type IndexRow } from "../../src/db/doctor-indexes.ts";

describe("repeatedFlag", () => {
  test("repeated, comma lists and --flag=value, in order; absent is undefined", () => {
    expect(repeatedFlag(["--tenant-column", "a", "--json", "--tenant-column", "b,c", "--tenant-column=d"], "tenant-column")).toEqual(["a", "b", "c", "d"]);
    expect(repeatedFlag(["--json"], "tenant-column")).toBeUndefined();
    expect(repeatedFlag(["--tenant-column", " a , b "], "tenant-column")).toEqual(["a", "b"]);
  });
  test("a flag with a longer name, and anything after --, is not it", () => {
    expect(repeatedFlag(["--tenant-columns", "x", "--", "--tenant-column", "y"], "tenant-column")).toBeUndefined();
  });
  test("a missing value is a usage error", () => {
    expect(() => repeatedFlag(["--tenant-column"], "tenant-column")).toThrow(UsageError);
    expect(() => repeatedFlag(["--tenant-column", "--json"], "tenant-column")).toThrow("--tenant-column needs a value");
  });
});

describe("noHardenItems", () => {
  test("hardening ids, repeated or listed; anything else is a usage error", () => {
    expect(noHardenItems(["--no-harden", "signals", "--no-harden", "activity,role-settings"])).toEqual(["signals", "activity", "role-settings"]);
    expect(noHardenItems([])).toEqual([]);
    expect(() => noHardenItems(["--no-harden", "everything"])).toThrow('"everything" is not a hardening item');
  });
});

describe("resolveCommon: tenant columns", () => {
  const dir = mkdtempSync(join(tmpdir(), "multigres-doctor-rules-"));
  afterAll(() => rmSync(dir, { recursive: true, force: true }));
  const toml = (name: string, text: string) => {
    const p = join(dir, name);
    writeFileSync(p, text);
    return p;
  };
  const base = { databaseUrl: "postgres://localhost/x", appRole: "app_user" };
  const columns = async (args: { tenantColumns?: string[]; config?: string }, env: Record<string, string> = {}) =>
    (await resolveCommon({ ...base, ...args }, env)).tenantColumns;

  test("default tenant_id; the flag beats the environment beats the file", async () => {
    const file = toml("cols.toml", 'tenant_columns = ["tenant_id", "org_id"]\n');
    expect(await columns({})).toEqual(["tenant_id"]);
    expect(await columns({ config: file })).toEqual(["tenant_id", "org_id"]);
    expect(await columns({ config: file }, { MULTIGRES_TENANT_COLUMNS: "a, b" })).toEqual(["a", "b"]);
    expect(await columns({ config: file, tenantColumns: ["c"] }, { MULTIGRES_TENANT_COLUMNS: "a" })).toEqual(["c"]);
  });
  test("duplicates collapse", async () => {
    expect(await columns({ tenantColumns: ["a", "a", "b"] })).toEqual(["a", "b"]);
  });
  test("empty names, names over 63 bytes, and a file value that is not a list are usage errors", async () => {
    await expect(columns({ tenantColumns: [""] })).rejects.toThrow("--tenant-column: a column name must not be empty");
    await expect(columns({ tenantColumns: ["é".repeat(32)] })).rejects.toThrow("at most 63 bytes");
    await expect(columns({ tenantColumns: [] })).rejects.toThrow("at least one column");
    await expect(columns({ config: toml("bad.toml", 'tenant_columns = "org_id"\n') })).rejects.toThrow("tenant_columns: must be a list");
  });
});

describe("roleSettingProblems", () => {
  const pinned = [["log_parameter_max_length", "0"]] as const;
  test("the pinned setting alone: nothing", () => {
    expect(roleSettingProblems([{ database: null, config: ["log_parameter_max_length=0"] }], "app", pinned)).toEqual({ extra: [], missing: [] });
  });
  test("other settings, for every database or one, are extra; values keep their = signs", () => {
    const r = roleSettingProblems(
      [
        { database: null, config: ["log_parameter_max_length=0", "statement_timeout=1"] },
        { database: "other", config: ["search_path=a, b", "x.y=k=v"] },
      ],
      "app",
      pinned,
    );
    expect(r.extra).toEqual([
      { database: null, name: "statement_timeout", value: "1" },
      { database: "other", name: "search_path", value: "a, b" },
      { database: "other", name: "x.y", value: "k=v" },
    ]);
    expect(r.missing).toEqual([]);
  });
  test("a pinned setting missing, set to another value, or overridden in this database is missing", () => {
    expect(roleSettingProblems([], "app", pinned).missing).toEqual([["log_parameter_max_length", "0"]]);
    expect(roleSettingProblems([{ database: null, config: ["log_parameter_max_length=64"] }], "app", pinned).missing).toHaveLength(1);
    const overridden = roleSettingProblems(
      [
        { database: null, config: ["log_parameter_max_length=0"] },
        { database: "app", config: ["log_parameter_max_length=-1"] },
      ],
      "app",
      pinned,
    );
    expect(overridden.missing).toHaveLength(1);
    // …but an override in another database does not reach this one.
    const elsewhere = roleSettingProblems(
      [
        { database: null, config: ["log_parameter_max_length=0"] },
        { database: "other", config: ["log_parameter_max_length=-1"] },
      ],
      "app",
      pinned,
    );
    expect(elsewhere.missing).toEqual([]);
  });
});

describe("keptByChoice", () => {
  const f = (rule: string, severity: Finding["severity"] = "error"): Finding => ({ rule, severity, object: "role app", message: "m", fix: "x" });
  test("only the kept items' hardening findings become info, with the reason in front", () => {
    const out = keptByChoice([f("hardening-signals"), f("hardening-activity"), f("hardening-table-privileges", "warning"), f("rls-disabled")], new Set(["signals", "table-privileges"]));
    expect(out.map((x) => [x.rule, x.severity])).toEqual([
      ["hardening-signals", "info"],
      ["hardening-activity", "error"],
      ["hardening-table-privileges", "info"],
      ["rls-disabled", "error"],
    ]);
    expect(out[0]!.message).toBe("kept by choice (--no-harden signals): m");
  });
});

describe("nameFew", () => {
  test("up to five names, then a count", () => {
    expect(nameFew(["a"])).toBe("a");
    expect(nameFew(["a", "b", "c", "d", "e"])).toBe("a, b, c, d, e");
    expect(nameFew(["a", "b", "c", "d", "e", "f", "g"])).toBe("a, b, c, d, e and 2 more");
  });
});

describe("indexFindings", () => {
  const TENANT = { attnums: new Set([2]), lead: "tenant_id" };
  const ix = (o: Partial<IndexRow>): IndexRow => ({
    index: "public.i",
    table: "public.t",
    relid: 1,
    primary: false,
    unique: false,
    exclusion: false,
    keys: [3],
    keyText: ["body"],
    exclusionOps: null,
    constraint: null,
    surrogate: false,
    predicate: null,
    ...o,
  });
  const rules = (row: IndexRow, stats = false) => indexFindings(row, TENANT, stats).map((f) => `${f.rule}:${f.severity}`);

  test("led by the tenant column: nothing; unique with the tenant anywhere among the keys: nothing", () => {
    expect(rules(ix({ keys: [2, 3], keyText: ["tenant_id", "body"] }))).toEqual([]);
    expect(rules(ix({ unique: true, keys: [2, 3], keyText: ["tenant_id", "body"] }))).toEqual([]);
    expect(rules(ix({ unique: true, keys: [3, 2], keyText: ["body", "tenant_id"] }))).toEqual(["index-not-tenant-led:warning"]);
  });
  test("not tenant-led: warning; error when the statistics are readable; info for a primary key", () => {
    expect(rules(ix({}))).toEqual(["index-not-tenant-led:warning"]);
    expect(rules(ix({}), true)).toEqual(["index-not-tenant-led:error"]);
    expect(rules(ix({ keys: [0], keyText: ["lower(body)"] }))).toEqual(["index-not-tenant-led:warning"]);
    expect(rules(ix({ primary: true, unique: true, keys: [1], keyText: ["id"], surrogate: true }), true)).toEqual([
      "index-not-tenant-led:info",
      "unique-not-tenant-led:warning",
    ]);
  });
  test("unique without the tenant: error, a generated single-column primary key a warning", () => {
    expect(rules(ix({ unique: true }))).toEqual(["index-not-tenant-led:warning", "unique-not-tenant-led:error"]);
    expect(rules(ix({ primary: true, unique: true, surrogate: false }))).toContain("unique-not-tenant-led:error");
    expect(rules(ix({ primary: true, unique: true, keys: [1, 3], keyText: ["id", "body"], surrogate: true }))).toContain("unique-not-tenant-led:error");
  });
  test("an exclusion constraint counts the tenant column only when compared with =", () => {
    const excl = { exclusion: true, keys: [2, 3], keyText: ["tenant_id", "during"], constraint: "c" };
    expect(rules(ix({ ...excl, exclusionOps: ["=", "&&"] }))).toEqual([]);
    expect(rules(ix({ ...excl, exclusionOps: ["<>", "&&"] }))).toEqual(["unique-not-tenant-led:error"]);
  });
  test("fixes lead with the tenant column: an index, a partial index, a constraint", () => {
    const [plain] = indexFindings(ix({ predicate: "body IS NOT NULL" }), TENANT, false);
    expect(plain!.fix).toBe(`CREATE INDEX ON public.t ("tenant_id", body) WHERE body IS NOT NULL; DROP INDEX public.i;`);
    const [, unique] = indexFindings(ix({ unique: true, constraint: "t_body_key" }), TENANT, false);
    expect(unique!.fix).toBe(`ALTER TABLE public.t DROP CONSTRAINT "t_body_key", ADD CONSTRAINT "t_body_key" UNIQUE ("tenant_id", body);`);
  });
});
