/**
 * Configuration: one valibot schema, three sources. A TOML file (--config),
 * the environment (MULTIGRES_*) and command-line flags, flags winning over
 * the environment winning over the file. Every problem is reported with the
 * source it came from, all at once, so one run fixes them all.
 */
import * as v from "valibot";
import { parseAuthFile } from "./auth/auth-file.ts";

const hostPort = (what: string) =>
  v.pipe(
    v.string(),
    v.regex(/^(\[[0-9a-fA-F:.]+\]|[^\s:]+):\d{1,5}$/, `${what} must be HOST:PORT`),
    v.transform((s) => {
      const cut = s.lastIndexOf(":");
      return { host: s.slice(0, cut).replace(/^\[(.*)\]$/, "$1"), port: Number(s.slice(cut + 1)) };
    }),
    v.check((a) => a.port <= 65535, `${what} port must be at most 65535`),
  );

const milliseconds = v.pipe(
  v.union([v.number(), v.pipe(v.string(), v.regex(/^\d+$/, "must be a whole number of milliseconds"))]),
  v.transform(Number),
  v.integer(),
  v.minValue(0),
);

const pattern = v.pipe(
  v.string(),
  v.minLength(1, "must not be empty"),
  v.rawCheck(({ dataset, addIssue }) => {
    if (!dataset.typed) return;
    try {
      new RegExp(dataset.value);
    } catch (e) {
      addIssue({ message: `is not a valid regular expression: ${(e as Error).message}` });
    }
  }),
  // Anchored so that the whole tenant id must match, whatever the operator wrote.
  v.transform((s) => new RegExp(`^(?:${s})$`)),
);

const secret = (what: string) =>
  v.pipe(v.string(), v.minLength(32, `must be at least 32 characters (${what})`));

const settingName = v.pipe(
  v.string(),
  v.regex(/^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$.]*$/, "must be a custom setting name like app.current_tenant_id"),
);

/** A column name as PostgreSQL keeps it: 1 to 63 bytes. */
const columnName = v.pipe(
  v.string(),
  v.minLength(1, "a column name must not be empty"),
  v.check((s) => Buffer.byteLength(s) <= 63, "a column name is at most 63 bytes"),
);

/** The columns that hold the tenant id (setup and doctor; the proxy does not use them). */
export const TenantColumnsSchema = v.pipe(v.array(columnName, "must be a list of column names"), v.minLength(1, "must name at least one column"));

export const ConfigSchema = v.object({
  listen: hostPort("listen"),
  upstream: hostPort("upstream"),
  separator: v.pipe(v.string(), v.minLength(1, "must not be empty")),
  tenantSetting: settingName,
  tenantPattern: pattern,
  tenantColumns: TenantColumnsSchema,
  superusers: v.array(v.pipe(v.string(), v.minLength(1, "must not be empty"))),
  role: v.optional(v.pipe(v.string(), v.minLength(1, "must not be empty"))),
  databases: v.array(v.pipe(v.string(), v.minLength(1, "must not be empty"))),
  auth: v.picklist(["proxy", "passthrough"], 'must be "proxy" or "passthrough"'),
  authFile: v.optional(v.string()),
  authMethod: v.picklist(["scram-sha-256", "password"], 'must be "scram-sha-256" or "password"'),
  tenantAuth: v.picklist(["shared", "token"], 'must be "shared" or "token"'),
  tokenSecret: v.optional(secret("`openssl rand -base64 48` makes one")),
  tokenSecretFile: v.optional(v.string()),
  upstreamPassword: v.optional(v.pipe(v.string(), v.minLength(1, "must not be empty"))),
  upstreamPasswordFile: v.optional(v.string()),
  upstreamCert: v.optional(v.string()),
  upstreamKey: v.optional(v.string()),
  md5Auth: v.picklist(["loopback", "refuse"], 'must be "loopback" or "refuse"'),
  startupTimeout: milliseconds,
  contextSecret: secret("`multigres setup` generates one"),
  contextSecretFile: v.optional(v.string()),
  guard: v.pipe(
    v.union([v.boolean(), v.picklist(["on", "off", "strict", "true", "false"], 'must be "on", "off" or "strict"')], 'must be "on", "off" or "strict"'),
    v.transform((x): "off" | "on" | "strict" => (x === "strict" ? "strict" : x === true || x === "on" || x === "true" ? "on" : "off")),
  ),
  guardMaxStatement: v.pipe(
    v.union([v.number(), v.pipe(v.string(), v.regex(/^\d+$/, "must be a whole number of bytes"))]),
    v.transform(Number),
    v.integer(),
    v.minValue(1024, "must be at least 1024 bytes"),
  ),
  logLevel: v.picklist(["silent", "error", "warn", "info", "debug", "trace"], "must be one of silent, error, warn, info, debug, trace"),
  logFormat: v.picklist(["pretty", "json"], 'must be "pretty" or "json"'),
  tlsCert: v.optional(v.string()),
  tlsKey: v.optional(v.string()),
  clientTls: v.picklist(["disable", "allow", "require"], "must be disable, allow or require"),
  upstreamTls: v.picklist(["disable", "prefer", "require", "verify-ca", "verify-full"], "must be disable, prefer, require, verify-ca or verify-full"),
  upstreamCa: v.optional(v.string()),
  upstreamServerName: v.optional(v.string()),
  http: v.optional(hostPort("http")),
  connectTimeout: milliseconds,
  idleTimeout: milliseconds,
  keepalive: milliseconds,
  shutdownTimeout: milliseconds,
});

export type Config = v.InferOutput<typeof ConfigSchema>;
type Key = keyof v.InferInput<typeof ConfigSchema>;

interface Option {
  key: Key;
  /** Absent for secrets: a flag would show in `ps`. */
  flag?: string;
  file: string;
  env: string;
  list?: boolean;
  default?: string | string[];
  description: string;
}

/** The one list of options: names in every source, defaults and help text. */
export const OPTIONS: readonly Option[] = [
  { key: "listen", flag: "listen", file: "listen", env: "MULTIGRES_LISTEN", default: "127.0.0.1:6432", description: "Address the proxy accepts clients on (HOST:PORT; port 0 picks a free one)" },
  { key: "upstream", flag: "upstream", file: "upstream", env: "MULTIGRES_UPSTREAM", default: "127.0.0.1:5432", description: "PostgreSQL server to forward to (HOST:PORT)" },
  { key: "separator", flag: "separator", file: "separator", env: "MULTIGRES_SEPARATOR", default: ".", description: "Separator between role and tenant in the user name; the tenant follows the last one" },
  { key: "tenantSetting", flag: "tenant-setting", file: "tenant_setting", env: "MULTIGRES_TENANT_SETTING", default: "app.current_tenant_id", description: "Setting that carries the tenant id in the session" },
  { key: "tenantPattern", flag: "tenant-pattern", file: "tenant_pattern", env: "MULTIGRES_TENANT_PATTERN", default: "[A-Za-z0-9_-]{1,63}", description: "Regular expression a tenant id must match in full" },
  { key: "tenantColumns", file: "tenant_columns", env: "MULTIGRES_TENANT_COLUMNS", list: true, default: ["tenant_id"], description: "Columns that hold the tenant id, for `multigres setup` and `multigres doctor` (their --tenant-column; env: comma-separated)" },
  { key: "superusers", flag: "superuser", file: "superusers", env: "MULTIGRES_SUPERUSERS", list: true, default: ["postgres"], description: "User passed through with no tenant and no context (repeatable; env: comma-separated)" },
  { key: "role", flag: "role", file: "role", env: "MULTIGRES_ROLE", description: "Role to SET ROLE to after login (default: the role from the user name)" },
  { key: "databases", flag: "database", file: "databases", env: "MULTIGRES_DATABASES", list: true, default: [], description: "Databases tenants may connect to, each checked at startup (repeatable; env: comma-separated; default: any, checked per session)" },
  { key: "auth", flag: "auth", file: "auth", env: "MULTIGRES_AUTH", default: "proxy", description: "Who authenticates clients: \"proxy\" (against --auth-file or tenant tokens; logs in upstream with its own credential) or \"passthrough\" (relays authentication to PostgreSQL)" },
  { key: "authFile", flag: "auth-file", file: "auth_file", env: "MULTIGRES_AUTH_FILE", description: "Client credentials, PgBouncer userlist format: \"user\" \"SCRAM verifier or password\" per line; re-read on SIGHUP" },
  { key: "authMethod", flag: "auth-method", file: "auth_method", env: "MULTIGRES_AUTH_METHOD", default: "scram-sha-256", description: "How clients prove their password: scram-sha-256, or password (in clear; only from loopback or over TLS, SCRAM elsewhere)" },
  { key: "tenantAuth", flag: "tenant-auth", file: "tenant_auth", env: "MULTIGRES_TENANT_AUTH", default: "shared", description: "Tenant users: \"shared\" (the role's auth-file entry) or \"token\" (a token per tenant, `multigres token`)" },
  { key: "tokenSecret", file: "token_secret", env: "MULTIGRES_TOKEN_SECRET", description: "Secret tenant tokens are derived from (environment or file only; never logged)" },
  { key: "tokenSecretFile", flag: "token-secret-file", file: "token_secret_file", env: "MULTIGRES_TOKEN_SECRET_FILE", description: "File holding the token secret instead; re-read on SIGHUP" },
  { key: "upstreamPassword", file: "upstream_password", env: "MULTIGRES_UPSTREAM_PASSWORD", description: "Password the proxy logs in to PostgreSQL with (environment or file only; clients never see it)" },
  { key: "upstreamPasswordFile", flag: "upstream-password-file", file: "upstream_password_file", env: "MULTIGRES_UPSTREAM_PASSWORD_FILE", description: "File holding the upstream password (one line), or one per role (\"role\" \"password\" lines); re-read on SIGHUP" },
  { key: "upstreamCert", flag: "upstream-cert", file: "upstream_cert", env: "MULTIGRES_UPSTREAM_CERT", description: "PEM client certificate the proxy presents to PostgreSQL (pg_hba method cert)" },
  { key: "upstreamKey", flag: "upstream-key", file: "upstream_key", env: "MULTIGRES_UPSTREAM_KEY", description: "PEM private key of --upstream-cert" },
  { key: "md5Auth", flag: "md5-auth", file: "md5_auth", env: "MULTIGRES_MD5_AUTH", default: "loopback", description: "MD5 users: \"loopback\" asks loopback clients for the password and answers the server; \"refuse\" rejects them" },
  { key: "startupTimeout", flag: "startup-timeout", file: "startup_timeout", env: "MULTIGRES_STARTUP_TIMEOUT", default: "15000", description: "Milliseconds a client has to finish startup and authentication (0 = no limit)" },
  { key: "contextSecret", file: "context_secret", env: "MULTIGRES_CONTEXT_SECRET", description: "Secret the tenant context is signed with (environment or file only; never logged)" },
  { key: "contextSecretFile", flag: "context-secret-file", file: "context_secret_file", env: "MULTIGRES_CONTEXT_SECRET_FILE", description: "File holding the context secret instead; re-read on SIGHUP, which is how a secret is rotated" },
  { key: "guard", flag: "guard", file: "guard", env: "MULTIGRES_GUARD", default: "on", description: "Read tenants' SQL before it reaches the server: \"on\" refuses statements that change the role or the tenant context (42501) and scopes LISTEN/NOTIFY channels per tenant; \"strict\" also refuses EXPLAIN ANALYZE and LOCK above ROW EXCLUSIVE; \"off\" reads nothing (channels shared by all tenants, as in PostgreSQL)" },
  { key: "guardMaxStatement", flag: "guard-max-statement", file: "guard_max_statement", env: "MULTIGRES_GUARD_MAX_STATEMENT", default: "1048576", description: "Largest statement the guard reads (bytes); a larger one that might change the role or context is refused (54000)" },
  { key: "logLevel", flag: "log-level", file: "log_level", env: "MULTIGRES_LOG_LEVEL", default: "info", description: "silent, error, warn, info, debug or trace" },
  { key: "logFormat", flag: "log-format", file: "log_format", env: "MULTIGRES_LOG_FORMAT", default: "pretty", description: "pretty (for terminals) or json (one object per line)" },
  { key: "tlsCert", flag: "tls-cert", file: "tls_cert", env: "MULTIGRES_TLS_CERT", description: "PEM certificate (chain) clients see; reloaded on SIGHUP" },
  { key: "tlsKey", flag: "tls-key", file: "tls_key", env: "MULTIGRES_TLS_KEY", description: "PEM private key of --tls-cert" },
  { key: "clientTls", flag: "client-tls", file: "client_tls", env: "MULTIGRES_CLIENT_TLS", default: "allow", description: "Client TLS: disable, allow (when a certificate is set) or require" },
  { key: "upstreamTls", flag: "upstream-tls", file: "upstream_tls", env: "MULTIGRES_UPSTREAM_TLS", default: "prefer", description: "TLS to PostgreSQL: disable, prefer, require, verify-ca or verify-full" },
  { key: "upstreamCa", flag: "upstream-ca", file: "upstream_ca", env: "MULTIGRES_UPSTREAM_CA", description: "PEM CA bundle to verify PostgreSQL's certificate (verify-ca, verify-full)" },
  { key: "upstreamServerName", flag: "upstream-server-name", file: "upstream_server_name", env: "MULTIGRES_UPSTREAM_SERVER_NAME", description: "Host name to verify (verify-full) and send as SNI; default: the --upstream host" },
  { key: "http", flag: "http", file: "http", env: "MULTIGRES_HTTP", default: "127.0.0.1:9187", description: "HTTP listener for /healthz and /readyz (HOST:PORT; port 0 picks one)" },
  { key: "connectTimeout", flag: "connect-timeout", file: "connect_timeout", env: "MULTIGRES_CONNECT_TIMEOUT", default: "15000", description: "Milliseconds to connect to PostgreSQL before answering 08006" },
  { key: "idleTimeout", flag: "idle-timeout", file: "idle_timeout", env: "MULTIGRES_IDLE_TIMEOUT", default: "0", description: "Close client connections idle this many milliseconds (0 = never)" },
  { key: "keepalive", flag: "keepalive", file: "keepalive", env: "MULTIGRES_KEEPALIVE", default: "60000", description: "TCP keepalive idle time in milliseconds on both legs (0 = off)" },
  { key: "shutdownTimeout", flag: "shutdown-timeout", file: "shutdown_timeout", env: "MULTIGRES_SHUTDOWN_TIMEOUT", default: "30000", description: "On SIGTERM/SIGINT, milliseconds to let transactions finish before 57P01" },
];

export type Flags = Partial<Record<string, string | string[] | undefined>>;

export interface Sources {
  flags?: Flags;
  env?: Record<string, string | undefined>;
  /** Parsed TOML and the path it came from. */
  file?: { path: string; data: Record<string, unknown> };
  /** Secrets read from their *File options; each wins over the other sources of that secret. */
  secretFiles?: Partial<Record<SecretKey, { path: string; text: string }>>;
}

/** Secrets that may come from a file named by another option. */
export const SECRET_FILES = {
  contextSecret: "contextSecretFile",
  tokenSecret: "tokenSecretFile",
  upstreamPassword: "upstreamPasswordFile",
} as const;
type SecretKey = keyof typeof SECRET_FILES;
const isSecret = (key: string): key is SecretKey => key in SECRET_FILES;

export class ConfigError extends Error {
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n${problems.map((p) => `  - ${p}`).join("\n")}`);
  }
}

/** Merge the sources and validate; throws ConfigError listing every problem. */
export function resolveConfig(sources: Sources): Config {
  const problems: string[] = [];
  const merged: Record<string, unknown> = {};
  const origin: Record<string, string> = {};

  if (sources.file) {
    const known = new Set(OPTIONS.map((o) => o.file));
    for (const key of Object.keys(sources.file.data)) {
      if (!known.has(key)) problems.push(`${sources.file.path}: unknown key "${key}"`);
    }
  }

  for (const o of OPTIONS) {
    const flag = o.flag ? sources.flags?.[o.flag] : undefined;
    const env = sources.env?.[o.env];
    const file = sources.file?.data[o.file];
    if (flag !== undefined && !(Array.isArray(flag) && flag.length === 0)) {
      merged[o.key] = o.list ? [flag].flat() : [flag].flat().at(-1);
      origin[o.key] = `--${o.flag}`;
    } else if (env !== undefined && env !== "") {
      merged[o.key] = o.list ? env.split(",").map((s) => s.trim()).filter(Boolean) : env;
      origin[o.key] = `${o.env} (environment)`;
    } else if (file !== undefined) {
      merged[o.key] = file;
      origin[o.key] = `${o.file} in ${sources.file!.path}`;
    } else if (o.default !== undefined) {
      merged[o.key] = o.default;
      origin[o.key] = `default for ${o.key}`;
    }
  }

  for (const [key, file] of Object.entries(sources.secretFiles ?? {})) {
    // A secret is one line; an upstream password file may instead hold a
    // password per role (userlist lines), which upstreamPasswords() reads.
    merged[key] = key === "upstreamPassword" ? file.text.replace(/\r?\n$/, "") : file.text.trim();
    origin[key] = `contents of ${file.path}`;
  }

  const result = v.safeParse(ConfigSchema, merged);
  if (!result.success) {
    for (const issue of result.issues) {
      const key = String(issue.path?.[0]?.key ?? "");
      const option = OPTIONS.find((o) => o.key === key);
      if (!(key in merged) && option) {
        const names = [option.flag && `--${option.flag}`, option.env, `${option.file} in the config file`].filter(Boolean);
        problems.push(`${names.join(" / ")}: is required${option.key === "contextSecret" ? " (`multigres setup` generates one)" : ""}`);
        continue;
      }
      const shown = isSecret(key) ? "(hidden)" : JSON.stringify(merged[key]);
      problems.push(`${origin[key] ?? key}: ${issue.message} (got ${shown})`);
    }
  }
  if (result.success) {
    const c = result.output;
    if (Boolean(c.tlsCert) !== Boolean(c.tlsKey)) {
      problems.push(`${origin.tlsCert ?? origin.tlsKey}: --tls-cert and --tls-key go together`);
    }
    if (c.clientTls === "require" && !c.tlsCert) {
      problems.push(`${origin.clientTls}: client TLS "require" needs --tls-cert and --tls-key`);
    }
    if (Boolean(c.upstreamCert) !== Boolean(c.upstreamKey)) {
      problems.push(`${origin.upstreamCert ?? origin.upstreamKey}: --upstream-cert and --upstream-key go together`);
    }
    if (c.upstreamCert && c.upstreamTls === "disable") {
      problems.push(`${origin.upstreamTls}: a client certificate (--upstream-cert) needs TLS to the upstream, not "disable"`);
    }
    if (c.upstreamPassword !== undefined && isPerRole(c.upstreamPassword)) {
      const parsed = parseAuthFile(c.upstreamPassword);
      if (parsed.problems.length > 0 || parsed.entries.length === 0) {
        problems.push(
          `${origin.upstreamPassword}: reads as "role" "password" lines but ${parsed.problems[0] ?? "has none"} (a password that starts with " must be written as such a line)`,
        );
      }
    }
    if (c.tenantAuth === "token" && !c.tokenSecret) {
      problems.push(`${origin.tenantAuth}: --tenant-auth token needs MULTIGRES_TOKEN_SECRET or --token-secret-file (at least 32 characters)`);
    }
    if (c.auth === "proxy" && !c.authFile && c.tenantAuth !== "token") {
      problems.push(
        `${origin.auth}: --auth proxy (the default since 0.3) authenticates clients itself and needs --auth-file FILE, ` +
          "or --tenant-auth token with MULTIGRES_TOKEN_SECRET; --auth passthrough relays authentication to PostgreSQL as 0.1 and 0.2 did (see the README)",
      );
    }
  }
  if (problems.length > 0 || !result.success) throw new ConfigError(problems);
  return result.output;
}

/** Read and parse a TOML config file; problems become ConfigErrors. */
export async function readConfigFile(path: string): Promise<{ path: string; data: Record<string, unknown> }> {
  let text: string;
  try {
    text = await Bun.file(path).text();
  } catch (e) {
    throw new ConfigError([`${path}: cannot read config file (${(e as Error).message})`]);
  }
  try {
    return { path, data: Bun.TOML.parse(text) as Record<string, unknown> };
  } catch (e) {
    throw new ConfigError([`${path}: not valid TOML (${(e as Error).message})`]);
  }
}

/**
 * Everything `start` needs, I/O included: the TOML file named by --config,
 * the secret file, then the pure merge. Called again on SIGHUP.
 */
export async function loadConfig(flags: Flags, env: Record<string, string | undefined>, configPath?: string): Promise<Config> {
  const file = configPath ? await readConfigFile(configPath) : undefined;
  const secretFiles: Sources["secretFiles"] = {};
  const problems: string[] = [];
  for (const [secretKey, fileKey] of Object.entries(SECRET_FILES) as [SecretKey, (typeof SECRET_FILES)[SecretKey]][]) {
    const o = OPTIONS.find((x) => x.key === fileKey)!;
    const path = [flags[o.flag!]].flat().at(-1) ?? env[o.env] ?? file?.data[o.file];
    if (typeof path !== "string" || path === "") continue;
    try {
      secretFiles[secretKey] = { path, text: await Bun.file(path).text() };
    } catch (e) {
      problems.push(`${path}: cannot read --${o.flag} (${(e as Error).message})`);
    }
  }
  if (problems.length > 0) throw new ConfigError(problems);
  return resolveConfig({ flags, env, file, secretFiles });
}

/**
 * The upstream password for `role`: an upstream password file may hold one
 * line (a password for every role) or `"role" "password"` lines.
 */
export function upstreamPasswordFor(config: Pick<Config, "upstreamPassword">, role: string): string | undefined {
  const text = config.upstreamPassword;
  if (text === undefined) return undefined;
  if (!isPerRole(text)) return text;
  // resolveConfig refused a malformed one: never send the whole file as a password.
  return parseAuthFile(text).entries.find((e) => e.user === role)?.secret;
}

/** An upstream password text in userlist form: a password per role. */
const isPerRole = (text: string) => text.trimStart().startsWith('"');
