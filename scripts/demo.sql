-- Multigres demo schema: two tenants, `acme` and `globex`, sharing two tables
-- under row-level security. `bun run dev` loads it into the embedded
-- PostgreSQL after sql/setup.sql; it is idempotent, so it also works against
-- a real server (run sql/setup.sql first, as a superuser):
--
--   psql "$ADMIN_URL" -f sql/setup.sql -f scripts/demo.sql
--
-- Then connect through the proxy as `app_user.acme` or `app_user.globex`:
-- each sees only its own rows. On a real server give app_user a password
-- first (ALTER ROLE app_user PASSWORD '…'); the embedded server checks none.

-- The application role. RLS only applies to roles that are not superusers,
-- do not have BYPASSRLS and do not own the tables, hence the explicit NO….
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'app_user') THEN
    CREATE ROLE app_user LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEROLE NOCREATEDB;
  END IF;
END
$$;
ALTER ROLE app_user LOGIN NOSUPERUSER NOBYPASSRLS;

-- tenant_id defaults to the session's tenant, so the app never has to send it
-- (and the policy's WITH CHECK refuses any other value).
CREATE TABLE IF NOT EXISTS public.projects (
  id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant_id text   NOT NULL DEFAULT public.current_tenant_id(),
  name      text   NOT NULL,
  UNIQUE (tenant_id, name),
  UNIQUE (tenant_id, id)
);

-- The foreign key includes tenant_id: foreign-key checks bypass RLS, so a plain
-- project_id reference would let one tenant attach rows to another's project.
CREATE TABLE IF NOT EXISTS public.tasks (
  id         bigint  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  tenant_id  text    NOT NULL DEFAULT public.current_tenant_id(),
  project_id bigint  NOT NULL,
  title      text    NOT NULL,
  done       boolean NOT NULL DEFAULT false,
  UNIQUE (tenant_id, project_id, title),
  FOREIGN KEY (tenant_id, project_id) REFERENCES public.projects (tenant_id, id) ON DELETE CASCADE
);

SELECT multigres.enable_tenant_rls('public.projects');
SELECT multigres.enable_tenant_rls('public.tasks');

GRANT USAGE ON SCHEMA public TO app_user;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.projects, public.tasks TO app_user;

-- Seed rows. This script runs as a superuser, which RLS never restricts.
INSERT INTO public.projects (tenant_id, name) VALUES
  ('acme',   'Rocket skates'),
  ('acme',   'Giant magnet'),
  ('globex', 'Doomsday device')
ON CONFLICT (tenant_id, name) DO NOTHING;

INSERT INTO public.tasks (tenant_id, project_id, title, done)
SELECT p.tenant_id, p.id, t.title, t.done
FROM (VALUES
  (1, 'acme',   'Rocket skates',   'Order rockets',           true),
  (2, 'acme',   'Rocket skates',   'Test on a roadrunner',    false),
  (3, 'acme',   'Giant magnet',    'Find a big enough cliff', false),
  (4, 'globex', 'Doomsday device', 'Hire henchmen',           true),
  (5, 'globex', 'Doomsday device', 'Build volcano lair',      false)
) AS t (n, tenant_id, project, title, done)
JOIN public.projects p ON p.tenant_id = t.tenant_id AND p.name = t.project
ORDER BY t.n
ON CONFLICT (tenant_id, project_id, title) DO NOTHING;
