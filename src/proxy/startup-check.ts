/**
 * `multigres start` checks, once (and again on SIGHUP), what every tenant
 * session will need: that its upstream credential logs in, that `multigres
 * setup` is installed and current in each served database, that the
 * database knows this proxy's context key, and that the role cannot bypass
 * row-level security. It says so in the log either way, and a problem shows
 * in /readyz until a check or a session's verified context clears it.
 *
 * It runs the same statements a session runs (tenant/context.ts), with no
 * tenant: a stored key answers 'no context', a missing one 'no key'.
 */
import { upstreamPasswordFor } from "../config.ts";
import { log } from "../log.ts";
import type { Frame } from "../protocol/framer.ts";
import { concat, MSG, readDataRow, readErrorFields } from "../protocol/messages.ts";
import { bindingQuery, contextKeyId, readBinding, readStatus, statusQuery } from "../tenant/context.ts";
import { resolveIdentity } from "../tenant/identity.ts";
import { logIn } from "./server-login.ts";
import { ServerConnection, type ServerOwner } from "./server-connection.ts";
import type { ProxyContext } from "./session.ts";

/** The login roles the proxy will use: from the auth file's names (tenant entries and shared ones). */
export function knownRoles(ctx: ProxyContext): string[] {
  const roles = new Set<string>();
  for (const name of ctx.credentials?.names ?? []) {
    const id = resolveIdentity(name, ctx.config);
    if (id.kind === "tenant") roles.add(id.role);
    else if (id.kind === "rejected") roles.add(name); // no tenant in it: a role's shared entry
  }
  return [...roles];
}

export async function checkUpstream(ctx: ProxyContext): Promise<void> {
  const { config } = ctx;
  if (config.auth === "passthrough") {
    log.info("startup check skipped: with --auth passthrough the proxy has no credential of its own; each session checks its context");
    return;
  }
  const roles = knownRoles(ctx);
  if (config.databases.length === 0 || roles.length === 0) {
    log.info(
      `startup check skipped: ${config.databases.length === 0 ? "no --database configured" : "no role named in --auth-file"}; each session checks its context (name the databases with --database to check them now)`,
    );
    return;
  }
  const keyId = contextKeyId(ctx.contextKey);
  await Promise.all(
    config.databases.flatMap((database) =>
      roles.map(async (role) => {
        const what = `context check as ${role}@${database}`;
        const problem = await checkOne(ctx, database, role).catch((e: Error) => `could not check: ${e.message}`);
        ctx.health.report(what, problem);
        if (problem) log.error(`startup check: ${what}: ${problem}`);
        else log.info(`startup check: database "${database}" knows context key ${keyId}, setup is current, and role "${config.role ?? role}" cannot bypass row-level security`);
      }),
    ),
  );
}

/** One login and two statements; resolves with the problem, or undefined. */
function checkOne(ctx: ProxyContext, database: string, role: string): Promise<string | undefined> {
  const { config } = ctx;
  return new Promise((resolve) => {
    let settled = false;
    const settle = (problem: string | undefined) => {
      if (settled) return;
      settled = true;
      server.end();
      resolve(problem);
    };
    const owner: ServerOwner = {
      serverOpened: () =>
        logIn(server, { params: new Map([["user", role], ["database", database], ["application_name", "multigres startup check"]]), password: upstreamPasswordFor(config, role) }, (r) => {
          if (!r.ok) return settle(`the proxy's credential was refused: ${r.message}`);
          query();
        }),
      serverData: () => settle("unexpected data from the server"),
      serverClosed: () => settle("the server closed the connection"),
      serverUnreachable: (e) => settle(`unreachable: ${e.message}`),
      serverBroken: (e) => settle(`invalid message from the server: ${e.message}`),
      serverBacklog: () => {},
      serverClear: () => {},
    };
    const server = ServerConnection.connect(
      {
        host: config.upstream.host,
        port: config.upstream.port,
        tls: config.upstreamTls,
        ca: ctx.upstreamCa,
        serverName: config.upstreamServerName,
        cert: ctx.upstreamCert?.cert,
        key: ctx.upstreamCert?.key,
        connectTimeout: config.connectTimeout,
        keepalive: 0,
      },
      owner,
    );

    const query = () => {
      let readies = 0;
      let answered = false; // this round's ParseComplete came
      server.read((m: Frame) => {
        if (!answered && (m.type === MSG.commandComplete || m.type === MSG.dataRow || m.type === MSG.readyForQuery)) {
          settle("a connection pooler sits between the proxy and PostgreSQL (a reply to nothing the proxy sent)");
          return "done";
        }
        if (m.type === MSG.parseComplete) answered = true;
        if (m.type === MSG.errorResponse) {
          const f = readErrorFields(m.body);
          const missing = f.get("C") === "42883" || f.get("C") === "3F000";
          settle(missing ? `multigres setup is missing or older than this proxy (${f.get("M")}): run multigres setup` : `${f.get("M")} (${f.get("C")})`);
          return "done";
        }
        if (m.type === MSG.dataRow) {
          const values = readDataRow(m.body);
          if (readies === 0) {
            const b = readBinding(values);
            if (server.key && b.pid !== server.key.processId) settle("a connection pooler sits between the proxy and PostgreSQL (backend pids differ)");
            else if (b.canBypassRls) settle(`role "${config.role ?? role}" (or the login role) can bypass row-level security`);
          } else if (readStatus(values) === "no key") {
            settle(`the database does not know context key ${contextKeyId(ctx.contextKey)}: run multigres setup with this proxy's secret`);
          }
        }
        if (m.type === MSG.readyForQuery) {
          answered = false;
          if (++readies === 2) {
            settle(undefined);
            return "done";
          }
        }
        return "more";
      });
      server.send(concat([bindingQuery(config.role ?? role), statusQuery(ctx.contextKey)]));
    };
  });
}
