-- Multigres database setup.
--
-- Run as a superuser (or the database owner) once per database; it is
-- idempotent, so running it again after an upgrade is safe:
--
--   psql "$ADMIN_URL" -f sql/setup.sql          (or: multigres sql | psql "$ADMIN_URL")
--
-- What it gives you:
--   current_tenant_id()                 the tenant the proxy established, or NULL
--   multigres.enable_tenant_rls(table)  ENABLE + FORCE RLS and the tenant policy
--
-- The app role (the part of the user name before the separator) must be
--   NOSUPERUSER NOBYPASSRLS and must not own the tenant tables,
-- otherwise RLS does not apply to it. For example:
--
--   CREATE ROLE app_user LOGIN PASSWORD '…' NOSUPERUSER NOBYPASSRLS;
--   GRANT USAGE ON SCHEMA public TO app_user;
--   GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app_user;
--
-- The setting read here is the proxy's default `app.current_tenant_id`.
-- If you run the proxy with another --tenant-setting, change it below too.

CREATE SCHEMA IF NOT EXISTS multigres;
COMMENT ON SCHEMA multigres IS 'Multigres tenant-context helpers';
GRANT USAGE ON SCHEMA multigres TO PUBLIC;

-- The tenant of this session, or NULL when no context was established.
-- '' counts as unset: after RESET, current_setting(name, true) returns ''
-- rather than NULL, and '' must never match a row.
CREATE OR REPLACE FUNCTION multigres.current_tenant_id() RETURNS text
  LANGUAGE sql STABLE PARALLEL SAFE
  SET search_path = pg_catalog
AS $$ SELECT nullif(current_setting('app.current_tenant_id', true), '') $$;

-- Resolvable from the default search_path ("$user", public), which is
-- where policies and application SQL look for it.
CREATE OR REPLACE FUNCTION public.current_tenant_id() RETURNS text
  LANGUAGE sql STABLE PARALLEL SAFE
  SET search_path = pg_catalog
AS $$ SELECT multigres.current_tenant_id() $$;

GRANT EXECUTE ON FUNCTION multigres.current_tenant_id() TO PUBLIC;
GRANT EXECUTE ON FUNCTION public.current_tenant_id() TO PUBLIC;

-- Turn on tenant isolation for one table: ENABLE and FORCE row-level
-- security (FORCE makes it apply to the table owner too) and (re)create the
-- policy `multigres_tenant_isolation` on `tenant_column`.
--
-- The policy compares against `(SELECT current_tenant_id())`: the sub-select
-- makes Postgres evaluate it once per statement as an InitPlan instead of
-- once per row. NULL (no context) compares as unknown, so no context means
-- no rows, and WITH CHECK refuses writes carrying another tenant's id.
CREATE OR REPLACE FUNCTION multigres.enable_tenant_rls(
  target regclass,
  tenant_column name DEFAULT 'tenant_id'
) RETURNS void
  LANGUAGE plpgsql
  SET search_path = pg_catalog
AS $$
BEGIN
  EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', target);
  EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', target);
  EXECUTE format('DROP POLICY IF EXISTS multigres_tenant_isolation ON %s', target);
  EXECUTE format(
    'CREATE POLICY multigres_tenant_isolation ON %s AS PERMISSIVE FOR ALL TO PUBLIC'
    ' USING (%I = (SELECT public.current_tenant_id()))'
    ' WITH CHECK (%I = (SELECT public.current_tenant_id()))',
    target, tenant_column, tenant_column);
END
$$;

REVOKE ALL ON FUNCTION multigres.enable_tenant_rls(regclass, name) FROM PUBLIC;
