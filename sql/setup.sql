-- Multigres database setup, schema version 3.
--
-- Run as a superuser once per database, or let `multigres setup` do it
-- (which also stores the context key and hardens the app role). It is
-- idempotent: running it again, after an upgrade too, is safe.
--
--   multigres setup --database-url "$ADMIN_URL" --app-role app_user
--   (or by hand: multigres sql | psql "$ADMIN_URL", then add a key, below)
--
-- What it gives you:
--   current_tenant_id()                 the tenant the proxy established, or NULL
--   multigres.enable_tenant_rls(table)  ENABLE + FORCE RLS and the tenant policy
--   multigres.add_context_key(key)      store a key the proxy signs contexts with
--
-- Why a signature: a custom setting like app.current_tenant_id can be set by
-- any session (`SET app.current_tenant_id = 'other'`, or an SQL injection).
-- So the proxy also sets app.current_tenant_id_sig = HMAC-SHA256(key, tenant ||
-- '/' || backend binding), and current_tenant_id() returns the tenant only
-- when that signature verifies against a key in multigres.context_keys, a
-- table the app role cannot read. Anything a session sets by itself yields
-- NULL, and NULL matches no rows. The binding is the backend's pid and its
-- start time in microseconds: a signature copied out of one session (or read
-- from a log) is worthless in every other backend, including a later one
-- that happens to get the same pid.
--
-- The app role must be NOSUPERUSER NOBYPASSRLS and must not own the tenant
-- tables, otherwise RLS does not apply to it.
--
-- The setting names are the proxy's defaults (app.current_tenant_id and
-- app.current_tenant_id_sig); `multigres setup` rewrites them to match
-- --tenant-setting.

CREATE SCHEMA IF NOT EXISTS multigres;
COMMENT ON SCHEMA multigres IS 'Multigres tenant-context helpers';
GRANT USAGE ON SCHEMA multigres TO PUBLIC;

CREATE TABLE IF NOT EXISTS multigres.meta (
  key text PRIMARY KEY,
  value text NOT NULL
);
REVOKE ALL ON multigres.meta FROM PUBLIC;
INSERT INTO multigres.meta VALUES ('schema_version', '3')
  ON CONFLICT (key) DO UPDATE SET value = excluded.value;

-- Keys the proxy may sign with. Two at once during a rotation. The HMAC
-- pads are stored precomputed so that verifying costs two sha256() calls.
CREATE TABLE IF NOT EXISTS multigres.context_keys (
  key_id text PRIMARY KEY,
  inner_pad bytea NOT NULL CHECK (length(inner_pad) = 64),
  outer_pad bytea NOT NULL CHECK (length(outer_pad) = 64),
  created_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON multigres.context_keys FROM PUBLIC;

-- Store a 32-byte key (as the proxy derives it from its secret; `multigres
-- setup` does this for you). Returns the key id the proxy logs.
CREATE OR REPLACE FUNCTION multigres.add_context_key(key bytea) RETURNS text
  LANGUAGE plpgsql
  SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  padded bytea := key || decode(repeat('00', 64 - length(key)), 'hex');
  ipad bytea := padded;
  opad bytea := padded;
  id text := left(encode(sha256(key), 'hex'), 12);
BEGIN
  IF length(key) <> 32 THEN
    RAISE EXCEPTION 'context keys are 32 bytes, got %', length(key);
  END IF;
  FOR i IN 0..63 LOOP
    ipad := set_byte(ipad, i, get_byte(padded, i) # 54);  -- 0x36
    opad := set_byte(opad, i, get_byte(padded, i) # 92);  -- 0x5c
  END LOOP;
  INSERT INTO multigres.context_keys (key_id, inner_pad, outer_pad)
    VALUES (id, ipad, opad) ON CONFLICT (key_id) DO NOTHING;
  RETURN id;
END
$$;
REVOKE ALL ON FUNCTION multigres.add_context_key(bytea) FROM PUBLIC;

-- What a signature is bound to: "<pid>/<backend start, µs since 1970>".
-- The proxy reads it once per server connection and signs over it. pids
-- are reused (pid_max is often 32768), start times are not. SECURITY
-- DEFINER because hardened databases take pg_stat_get_activity() away from
-- PUBLIC; only the session's own row is read.
CREATE OR REPLACE FUNCTION multigres.backend_binding() RETURNS text
  LANGUAGE sql STABLE SECURITY DEFINER PARALLEL RESTRICTED
  SET search_path = pg_catalog, pg_temp
AS $$
  SELECT pg_backend_pid()::text || '/' || (extract(epoch FROM a.backend_start) * 1000000)::bigint::text
  FROM pg_stat_get_activity(pg_backend_pid()) AS a
$$;
REVOKE ALL ON FUNCTION multigres.backend_binding() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION multigres.backend_binding() TO PUBLIC;

-- The tenant of this session, or NULL unless the proxy established it.
-- SECURITY DEFINER so it can read the keys; a fixed search_path so nothing
-- the session creates can stand in for what it calls. '' counts as unset
-- (after RESET, current_setting(name, true) returns '' rather than NULL).
-- plpgsql rather than SQL: plpgsql keeps its query plan for the session,
-- where a SQL function that cannot be inlined is planned on every call.
-- The binding is computed inline (the same expression as
-- backend_binding()) to save a function call per statement.
-- PARALLEL RESTRICTED: a parallel worker has another pg_backend_pid(), so
-- the signature would not verify there (closed, but wrong).
CREATE OR REPLACE FUNCTION multigres.current_tenant_id() RETURNS text
  LANGUAGE plpgsql STABLE SECURITY DEFINER PARALLEL RESTRICTED
  SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
  tenant text := nullif(current_setting('app.current_tenant_id', true), '');
  sig text := nullif(current_setting('app.current_tenant_id_sig', true), '');
  binding text;
BEGIN
  IF tenant IS NULL OR sig IS NULL THEN
    RETURN NULL;
  END IF;
  SELECT pg_backend_pid()::text || '/' || (extract(epoch FROM a.backend_start) * 1000000)::bigint::text
    INTO binding
    FROM pg_stat_get_activity(pg_backend_pid()) AS a;
  PERFORM FROM multigres.context_keys AS k
    WHERE encode(sha256(k.outer_pad || sha256(k.inner_pad
            || convert_to(tenant || '/' || binding, 'UTF8'))), 'hex') = sig;
  IF FOUND THEN
    RETURN tenant;
  END IF;
  RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION multigres.current_tenant_id() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION multigres.current_tenant_id() TO PUBLIC;

-- How the proxy knows the database really accepts a context, and if not,
-- why: 'ok'; 'no key' (this key id is not stored: setup not run with the
-- proxy's secret); 'no context' (no tenant set); 'invalid signature'. The
-- proxy asks right after setting a context and fails the session loudly on
-- anything but 'ok', instead of letting it run with 0 rows. It reveals
-- only whether a key id (a hash prefix of the key) is stored.
CREATE OR REPLACE FUNCTION multigres.context_status(key_id text) RETURNS text
  LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL RESTRICTED
  SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
  IF NOT EXISTS (SELECT FROM multigres.context_keys AS k WHERE k.key_id = context_status.key_id) THEN
    RETURN 'no key';
  END IF;
  IF nullif(current_setting('app.current_tenant_id', true), '') IS NULL THEN
    RETURN 'no context';
  END IF;
  IF multigres.current_tenant_id() IS NULL THEN
    RETURN 'invalid signature';
  END IF;
  RETURN 'ok';
END
$$;
REVOKE ALL ON FUNCTION multigres.context_status(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION multigres.context_status(text) TO PUBLIC;

-- Resolvable from the default search_path ("$user", public), which is
-- where policies and application SQL look for it.
CREATE OR REPLACE FUNCTION public.current_tenant_id() RETURNS text
  LANGUAGE sql STABLE PARALLEL RESTRICTED
  SET search_path = pg_catalog, pg_temp
AS $$ SELECT multigres.current_tenant_id() $$;
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
  SET search_path = pg_catalog, pg_temp
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
