/**
 * Doctor's index rules: what indexes on tenant tables tell one tenant about
 * the others even when row-level security hides every foreign row.
 *
 * - index-not-tenant-led: an index scan reads every tenant's entries in the
 *   scanned range and counts the ones RLS then drops (EXPLAIN ANALYZE's
 *   "Rows Removed by Filter", pg_stat_xact_user_tables.idx_tup_fetch), so
 *   range queries bisect other tenants' indexed values. An index led by the
 *   tenant column keeps every scan inside the tenant.
 * - unique-not-tenant-led: uniqueness across tenants is an oracle: a unique
 *   violation (or ON CONFLICT taking the other path) tells one tenant that
 *   another has the value.
 */
import { quoteIdent } from "./connect.ts";
import type { AuditContext, Finding } from "./doctor-findings.ts";
import { TENANT_TABLES_SQL } from "./hardening.ts";

export interface IndexRow {
  index: string;
  table: string;
  relid: number;
  primary: boolean;
  unique: boolean;
  exclusion: boolean;
  /** The key columns' attnums (0 for an expression); INCLUDE columns left out. */
  keys: number[];
  /** Each key column as SQL (a column name or an expression). */
  keyText: string[];
  /** For an exclusion constraint, the operator of each key column. */
  exclusionOps: string[] | null;
  /** The constraint the index implements (primary key, unique, exclusion), if any. */
  constraint: string | null;
  /** The first key column is filled by the database (identity, default, generated): a surrogate key. */
  surrogate: boolean;
  /** A partial index's predicate. */
  predicate: string | null;
}

/** A table's tenant columns: attnums, and the name to put first in a fix. */
export interface TableTenantColumns {
  attnums: ReadonlySet<number>;
  lead: string;
}

export async function readIndexes(ctx: AuditContext): Promise<IndexRow[]> {
  const rows = await ctx.tx.unsafe(
    `WITH t AS (${TENANT_TABLES_SQL})
     SELECT i.indexrelid::regclass::text AS index, t.name AS table, t.oid AS relid,
            i.indisprimary AS primary, i.indisunique AS unique, i.indisexclusion AS exclusion,
            string_to_array(i.indkey::text, ' ')::int[] AS keys, i.indnkeyatts::int AS nkeys,
            ARRAY(SELECT pg_catalog.pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(1, i.indnkeyatts) AS k ORDER BY k) AS key_text,
            (SELECT array_agg(o.oprname::text ORDER BY u.k) FROM unnest(con.conexclop) WITH ORDINALITY AS u(op, k)
               JOIN pg_catalog.pg_operator o ON o.oid = u.op) AS exclusion_ops,
            con.conname AS constraint,
            coalesce((SELECT a.attidentity <> '' OR a.atthasdef OR a.attgenerated <> '' FROM pg_catalog.pg_attribute a
                      WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0]), false) AS surrogate,
            pg_catalog.pg_get_expr(i.indpred, i.indrelid, true) AS predicate
     FROM t JOIN pg_catalog.pg_index i ON i.indrelid = t.oid
     LEFT JOIN pg_catalog.pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x')
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits h WHERE h.inhrelid = i.indexrelid)  -- a partition's share of a parent index
     ORDER BY 1`,
    [ctx.tenantColumns],
  );
  return rows.map((r) => ({
    index: r.index as string,
    table: r.table as string,
    relid: r.relid as number,
    primary: r.primary as boolean,
    unique: r.unique as boolean,
    exclusion: r.exclusion as boolean,
    keys: (r.keys as number[]).slice(0, r.nkeys as number),
    keyText: r.key_text as string[],
    exclusionOps: r.exclusion_ops as string[] | null,
    constraint: r.constraint as string | null,
    surrogate: r.surrogate as boolean,
    predicate: r.predicate as string | null,
  }));
}

/** The key columns (as SQL) behind the tenant column, for a fix. */
const tenantFirst = (ix: IndexRow, lead: string) => [quoteIdent(lead), ...ix.keyText].join(", ");

/** How to rebuild the index (or its constraint) with the tenant column first. */
function rebuild(ix: IndexRow, lead: string): string {
  const cols = tenantFirst(ix, lead);
  if (ix.constraint !== null && (ix.primary || ix.unique) && !ix.exclusion) {
    const c = quoteIdent(ix.constraint);
    return `ALTER TABLE ${ix.table} DROP CONSTRAINT ${c}, ADD CONSTRAINT ${c} ${ix.primary ? "PRIMARY KEY" : "UNIQUE"} (${cols});`;
  }
  if (ix.exclusion) return `re-create the exclusion constraint ${ix.constraint ?? ix.index} with ${quoteIdent(lead)} WITH = as its first element`;
  const where = ix.predicate ? ` WHERE ${ix.predicate}` : "";
  return `CREATE ${ix.unique ? "UNIQUE " : ""}INDEX ON ${ix.table} (${cols})${where}; DROP INDEX ${ix.index};`;
}

/** A key column counts as the tenant's when it is a tenant column (compared with `=` in an exclusion constraint). */
function includesTenant(ix: IndexRow, tenant: ReadonlySet<number>): boolean {
  return ix.keys.some((attnum, k) => tenant.has(attnum) && (!ix.exclusion || ix.exclusionOps?.[k] === "="));
}

/**
 * The findings of one tenant table's indexes. `statisticsOpen`: the app
 * role can read the statistics counters, which make the scan oracle exact.
 */
export function indexFindings(ix: IndexRow, tenant: TableTenantColumns, statisticsOpen: boolean): Finding[] {
  const out: Finding[] = [];
  const object = `index ${ix.index}`;
  const first = ix.keys[0];
  if (first === undefined || !tenant.attnums.has(first)) {
    out.push({
      rule: "index-not-tenant-led",
      severity: ix.primary ? "info" : statisticsOpen ? "error" : "warning",
      object,
      message:
        `${ix.index} on ${ix.table} is led by ${ix.keyText[0] ?? "no column"}, not the tenant column: a scan of it reads every tenant's entries in the range ` +
        `and counts the rows row-level security then drops (EXPLAIN ANALYZE "Rows Removed by Filter", pg_stat_xact_user_tables.idx_tup_fetch), ` +
        `so range queries bisect other tenants' values` +
        (statisticsOpen ? "; and the app role can read the statistics counters, which make the count exact" : ""),
      fix: rebuild(ix, tenant.lead),
    });
  }
  if ((ix.unique || ix.exclusion) && !includesTenant(ix, tenant.attnums)) {
    const surrogate = ix.primary && ix.keys.length === 1 && ix.surrogate;
    out.push({
      rule: "unique-not-tenant-led",
      severity: surrogate ? "warning" : "error",
      object,
      message:
        `${ix.index} makes (${ix.keyText.join(", ")}) ${ix.exclusion ? "exclusive" : "unique"} across all tenants of ${ix.table}: ` +
        `a unique violation, or ON CONFLICT taking the other path, tells one tenant that another has the value` +
        (surrogate ? ` (a key the database generates leaks little more than how many rows exist)` : ""),
      fix: rebuild(ix, tenant.lead),
    });
  }
  return out;
}
