/**
 * What `multigres setup` takes away from the app role (and from PUBLIC,
 * through which every role has it) because one role shared by every tenant
 * would otherwise share it between tenants, and what `multigres doctor`
 * checks is gone. One list, read by both.
 *
 * Each item names catalog objects by a query, not a fixed list, so it
 * follows the server's version (PostgreSQL adds statistics functions).
 * `--no-harden <id>` keeps an item as it is.
 */

export interface HardeningItem {
  id: HardeningId;
  /** What a tenant could do with it, for setup's output and doctor's findings. */
  why: string;
  /** What revoking it breaks, said plainly. */
  breaks: string;
}

export type HardeningId =
  | "activity"
  | "statistics"
  | "pg-stat-statements"
  | "large-objects"
  | "signals"
  | "schema-create"
  | "table-privileges"
  | "role-settings";

export const HARDENING: readonly HardeningItem[] = [
  {
    id: "activity",
    why: "pg_stat_activity shows the running and last statements, literals included, of every session of the same role (other tenants' queries), pg_locks their locks and advisory lock keys, pg_prepared_xacts their prepared transactions",
    breaks: "the app role cannot read pg_stat_activity, pg_locks or the progress views (monitoring belongs in a member of pg_monitor)",
  },
  {
    id: "statistics",
    why: "the statistics counters (pg_stat_*_tables, pg_stat_xact_*, pg_statio_*, pg_stat_database) count rows that row-level security hides: index bisection recovers other tenants' values",
    breaks: "the app role cannot read the statistics views, database-wide ones included",
  },
  {
    id: "pg-stat-statements",
    why: "pg_stat_statements keeps utility statements (DO, COPY, EXPLAIN …) with their literals, from every tenant",
    breaks: "the app role cannot read pg_stat_statements",
  },
  {
    id: "large-objects",
    why: "large objects belong to the role, not a tenant: any tenant can read, overwrite or unlink another's",
    breaks: "the app role cannot use large objects (store them in bytea columns under RLS instead)",
  },
  {
    id: "signals",
    why: "pg_cancel_backend and pg_terminate_backend work on every backend of the same role: one tenant ends another's sessions",
    breaks: "the app role cannot cancel or terminate backends itself (the proxy forwards its clients' cancel requests)",
  },
  {
    id: "schema-create",
    why: "CREATE on a schema lets a tenant plant functions and operators that other tenants' queries resolve to (a trojan)",
    breaks: "the app role cannot create objects in those schemas (migrations run as another role)",
  },
  {
    id: "table-privileges",
    why: "TRUNCATE empties a table for every tenant, TRIGGER runs a tenant's code in other tenants' sessions, REFERENCES probes other tenants' keys",
    breaks: "the app role cannot TRUNCATE tenant tables, create triggers on any table, or reference tenant tables in foreign keys of its own; default privileges stop granting these on future tables",
  },
  {
    id: "role-settings",
    why: "ALTER ROLE … SET is persistent and shared: a tenant can break every tenant's sessions (statement_timeout, row_security) or point their search_path at its objects",
    breaks: "role-level settings of the app role are removed; set what the app needs per database (ALTER DATABASE … SET) or per session",
  },
];

export const HARDENING_IDS = HARDENING.map((h) => h.id);

/**
 * The role that may still read and do what is taken away: PostgreSQL's
 * pg_monitor (statistics and activity) and pg_signal_backend (signals)
 * already cover it, so setup grants nothing new; an operator makes a
 * monitoring role a member of those.
 */
export const MONITORING_ROLES = { read: "pg_monitor", signal: "pg_signal_backend" } as const;

/** pg_catalog functions per item, as SQL over pg_proc aliased `p`. */
export const FUNCTIONS_SQL: Partial<Record<HardeningId, string>> = {
  // Other sessions' statements, states and locks (advisory lock keys included).
  activity:
    `p.proname = 'pg_stat_get_activity' OR p.proname LIKE 'pg\\_stat\\_get\\_backend\\_%' OR p.proname = 'pg_stat_get_progress_info'` +
    ` OR p.proname IN ('pg_lock_status', 'pg_blocking_pids', 'pg_safe_snapshot_blocking_pids', 'pg_prepared_xact')`,
  // Every counter of rows or blocks read: per relation, per function, per
  // transaction, and per database (in a quiet database, tup_fetched counts
  // the rows a query's scan read before row-level security dropped them).
  statistics:
    `p.proname LIKE 'pg\\_stat\\_get\\_xact\\_%' OR p.proname LIKE 'pg\\_stat\\_get\\_db\\_%'` +
    ` OR (p.proname LIKE 'pg\\_stat\\_get\\_%' AND p.pronargs = 1 AND p.proargtypes[0] = 'oid'::regtype AND p.proname NOT LIKE 'pg\\_stat\\_get\\_subscription%')`,
  // lo_import/lo_export (server files) are superuser-only already.
  "large-objects": `(p.proname LIKE 'lo\\_%' AND p.proname NOT IN ('lo_import', 'lo_export')) OR p.proname IN ('loread', 'lowrite')`,
  signals: `p.proname IN ('pg_cancel_backend', 'pg_terminate_backend')`,
};

/** pg_catalog views per item, as SQL over pg_class aliased `c`. */
export const VIEWS_SQL: Partial<Record<HardeningId, string>> = {
  activity:
    `c.relname IN ('pg_stat_activity', 'pg_stat_ssl', 'pg_stat_gssapi', 'pg_locks', 'pg_prepared_xacts') OR c.relname LIKE 'pg\\_stat\\_progress\\_%'`,
  statistics:
    `c.relname ~ '^pg_stat(io)?_(all|user|sys|xact_all|xact_user|xact_sys)_(tables|indexes|sequences|functions)$'` +
    ` OR c.relname IN ('pg_stat_user_functions', 'pg_stat_xact_user_functions', 'pg_stat_database', 'pg_stat_database_conflicts')`,
  "large-objects": `c.relname = 'pg_largeobject_metadata'`,
};

/**
 * Predefined roles that read every session's statements and statistics:
 * a membership of the app role in one of them undoes `activity` and
 * `statistics`, so setup revokes it (doctor reports it).
 */
export const MONITORING_MEMBERSHIPS = ["pg_monitor", "pg_read_all_stats", "pg_stat_scan_tables"] as const;

/**
 * Settings pinned on the app role where only a superuser can change them:
 * superuser-only parameters, which the role can neither SET nor reset with
 * `ALTER ROLE … RESET ALL`. Bind parameters carry tenant data; this keeps
 * them out of the statement log lines of every tenant's sessions.
 *
 * Parameters any role may set (row_security, search_path,
 * statement_timeout …) cannot be pinned this way: the role could change its
 * own default again. The proxy sends row_security=on in every server
 * login's startup options instead, which outranks role-level defaults.
 */
export const PINNED_ROLE_SETTINGS: readonly [string, string][] = [["log_parameter_max_length", "0"]];

/** SQL predicate over pg_namespace aliased `n`: a schema of the application's (not the system's, not multigres's). */
export const APP_SCHEMA_SQL = `n.nspname NOT IN ('pg_catalog', 'information_schema', 'multigres')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'`;

/**
 * The tenant tables, for setup and doctor alike: ordinary and partitioned
 * tables (partitions included) in application schemas that carry one of the
 * tenant columns ($1, a name[]), have row-level security enabled, or have a
 * policy. Columns: oid (int), name (schema-qualified as regclass prints it).
 */
export const TENANT_TABLES_SQL = `
  SELECT c.oid::int AS oid, c.oid::regclass::text AS name
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  WHERE c.relkind IN ('r', 'p') AND ${APP_SCHEMA_SQL}
    AND (c.relrowsecurity
         OR EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid = c.oid AND a.attname = ANY ($1::name[]) AND a.attnum > 0 AND NOT a.attisdropped)
         OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p WHERE p.polrelid = c.oid))
  ORDER BY 2`;

/**
 * Who keeps what an item takes from the app role: the role granted it
 * instead, so that monitoring and operations go on working. Items not
 * listed are only revoked.
 */
export const REGRANTED_TO: Partial<Record<HardeningId, string>> = {
  activity: MONITORING_ROLES.read,
  statistics: MONITORING_ROLES.read,
  "pg-stat-statements": MONITORING_ROLES.read,
  signals: MONITORING_ROLES.signal,
};
