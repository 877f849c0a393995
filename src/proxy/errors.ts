/**
 * Every error the proxy itself raises to a client, in one place: the
 * SQLSTATE, the words a person acts on, and the hint. (Errors PostgreSQL
 * raises are relayed as they are.) FATAL throughout: each ends the
 * connection. README "Errors clients can see" is this table in prose.
 */
import type { ErrorFields } from "../protocol/messages.ts";

const fatal = (code: string, message: string, hint?: string): ErrorFields => ({ severity: "FATAL", code, message, ...(hint ? { hint } : {}) });

/** Server answers to the proxy's login that concern the client, not the proxy's credential. */
const CLIENT_ACTIONABLE = new Set(["3D000", "53300", "57P03", "53000"]);

const SETUP_HINT = "run `multigres setup --database-url <admin URL> --app-role <role>` with this proxy's context secret";

export const errors = {
  // ------------------------------------------------------------ 08P01 protocol
  protocolViolation: (what: string, state: string) => fatal("08P01", `protocol violation: unexpected ${what} while ${state}`),
  protocolError: (reason: string) => fatal("08P01", `protocol violation: ${reason}`),
  invalidStartupPacket: (reason: string) => fatal("08P01", `invalid startup packet: ${reason}`),
  invalidMessage: (reason: string) => fatal("08P01", `invalid message: ${reason}`),
  invalidServerMessage: (reason: string) => fatal("08P01", `invalid message from the upstream server: ${reason}`),
  duplicateEncryptionRequest: (gss: boolean) => fatal("08P01", gss ? "duplicate GSS encryption request" : "duplicate SSL or GSS encryption request"),
  directTlsWithoutCertificate: () => fatal("08P01", "direct TLS connection, but multigres has no certificate configured (--tls-cert)"),
  directTlsWithoutAlpn: () => fatal("08P01", 'direct TLS connection without ALPN "postgresql"'),
  unencryptedAfterSslRequest: () => fatal("08P01", "received unencrypted data after SSL request"),
  dataBeforeAuthentication: () => fatal("08P01", "unexpected data from the client before authentication"),
  noBackendKeyData: () => fatal("08P01", "the upstream server sent no BackendKeyData, so the tenant context cannot be bound to its backend"),
  saslProtocol: (reason: string) => fatal("08P01", `SCRAM authentication failed: ${reason}`),

  // ------------------------------------------------- 28000 / 28P01 who you are
  tlsRequired: () => fatal("28000", "multigres requires TLS: connect with sslmode=require (or stronger)"),
  rejectedUser: (message: string, hint: string) => fatal("28000", message, hint),
  forbiddenStartupParameter: (name: string) =>
    fatal("28000", `startup parameter ${name} is not allowed: the proxy sets the tenant context and role`, "remove it from the connection string or PGOPTIONS"),
  unreadableEncoding: (encoding: string) =>
    fatal("28000", `client_encoding ${encoding} cannot be read by multigres's guard`, "use client_encoding UTF8 (or run the proxy with --guard off)"),
  passwordFailed: (user: string) => fatal("28P01", `password authentication failed for user "${user}"`),
  roleBypassesRls: (role: string) =>
    fatal(
      "28000",
      `tenant sessions must not be able to bypass row-level security, but role "${role}" (or the login role) is a superuser, has BYPASSRLS, or is a member of such a role`,
      "use a NOSUPERUSER NOBYPASSRLS app role (multigres setup hardens it); superusers connect as themselves (--superuser)",
    ),
  upstreamSkippedScram: () => fatal("28000", "the upstream server skipped SCRAM verification"),
  upstreamScramUnverified: () => fatal("28000", "the upstream server's SCRAM signature did not verify"),
  onlyChannelBinding: () => fatal("28000", "the server offers only SASL channel binding (-PLUS), which cannot work through a proxy"),
  unsupportedAuthMethod: (code: number) =>
    fatal("28000", `authentication method ${code} (GSSAPI/SSPI/Kerberos) is not supported through multigres`, "use scram-sha-256 for this user in pg_hba.conf"),
  md5ThroughRewrite: (user: string) =>
    fatal(
      "28000",
      `MD5 authentication cannot pass through the user name rewrite for "${user}"`,
      "store the role's password as SCRAM (password_encryption = 'scram-sha-256', then ALTER ROLE … PASSWORD) and use scram-sha-256 in pg_hba.conf",
    ),

  // ------------------------------------------------------- 53300 capacity
  tooManyAuthentications: () => fatal("53300", "too many logins being checked at once", "try again in a moment"),
  tooManyRelayedLogins: () =>
    fatal("53300", "too many superuser logins in progress through multigres", "try again in a moment; superusers are relayed to PostgreSQL a few at a time"),

  // ---------------------------------------------------------- 3D000 database
  databaseNotServed: (database: string) =>
    fatal("3D000", `database "${database}" is not served by this proxy`, "connect to one of the databases listed with --database"),

  // --------------------------------------------------------- 08006 upstream
  upstreamUnreachable: (host: string, port: number, reason: string) =>
    fatal(
      "08006",
      `could not connect to the upstream server at ${host}:${port}: ${reason}`,
      "check that PostgreSQL is running at --upstream; for TLS errors, see --upstream-tls, --upstream-ca and --upstream-server-name",
    ),
  upstreamClosedDuringStartup: () => fatal("08006", "the upstream server closed the connection during startup"),
  startupTimeout: (ms: number) => fatal("08006", `startup and authentication did not complete within ${ms} ms`),
  /**
   * The proxy's own login failed. What the client can act on (the database
   * does not exist, the server is full or starting) is passed on as the
   * server said it; the rest (its credential refused) is the operator's
   * business and stays in the log.
   */
  upstreamLoginFailed: (role: string, server?: { code: string; message: string }) =>
    server && CLIENT_ACTIONABLE.has(server.code)
      ? fatal(server.code, server.message)
      : fatal("08006", `multigres could not log in to PostgreSQL as "${role}"`, "the proxy's own login was refused; its log says why"),

  // -------------------------------------------- 55000 the tenant context round
  setupMissing: (database: string, serverMessage: string) =>
    fatal("55000", `multigres setup is missing or older than this proxy in database "${database}" (${serverMessage})`, SETUP_HINT),
  contextUnverified: (status: string, database: string, keyId: string) =>
    status === "no key"
      ? fatal("55000", `the database "${database}" does not know this proxy's context key ${keyId}, so no tenant context would verify`, SETUP_HINT)
      : fatal(
          "55000",
          `the database "${database}" did not accept the tenant context (${status})`,
          "likely causes: multigres setup is outdated (run it again), or a connection pooler sits between multigres and PostgreSQL (point --upstream at PostgreSQL itself)",
        ),
  poolerInBetween: (announced: number, actual: number) =>
    fatal(
      "55000",
      `a connection pooler sits between multigres and PostgreSQL: the server announced backend ${announced}, but the session runs in backend ${actual}, so a tenant context cannot be bound to it`,
      "point --upstream at PostgreSQL itself; multigres does the pooling",
    ),
  strangerOnTheLine: (type: string) =>
    fatal(
      "55000",
      `a connection pooler sits between multigres and PostgreSQL: a reply ('${type}') arrived for nothing the proxy sent, so a tenant context cannot be bound to the backend`,
      "point --upstream at PostgreSQL itself; multigres does the pooling",
    ),
  contextFailed: (code: string, message: string) =>
    fatal(
      code || "28000",
      `could not establish the tenant context: ${message}`,
      "check that the role exists, that the app role may SET ROLE to it, and that no role-level setting of the app role gets in the way (ALTER ROLE … SET; see pg_db_role_setting)",
    ),

  // ------------------------------------------------------------ lifecycle
  shuttingDown: () => fatal("57P01", "terminating connection because multigres is shutting down"),
  idleTimeout: (ms: number) => fatal("57P05", `terminating connection after ${ms} ms idle (--idle-timeout)`),
};
