/**
 * Configuration: one valibot schema, three sources. A TOML file (--config),
 * the environment (MULTIGRES_*) and command-line flags, flags winning over
 * the environment winning over the file. Every problem is reported with the
 * source it came from, all at once, so one run fixes them all.
 */
import * as v from "valibot";

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

const settingName = v.pipe(
  v.string(),
  v.regex(/^[A-Za-z_][A-Za-z0-9_$]*\.[A-Za-z_][A-Za-z0-9_$.]*$/, "must be a custom setting name like app.current_tenant_id"),
);

export const ConfigSchema = v.object({
  listen: hostPort("listen"),
  upstream: hostPort("upstream"),
  separator: v.pipe(v.string(), v.minLength(1, "must not be empty")),
  tenantSetting: settingName,
  tenantPattern: pattern,
  superusers: v.array(v.pipe(v.string(), v.minLength(1, "must not be empty"))),
  role: v.optional(v.pipe(v.string(), v.minLength(1, "must not be empty"))),
  md5Auth: v.picklist(["loopback", "refuse"], 'must be "loopback" or "refuse"'),
  startupTimeout: milliseconds,
  contextSecret: v.pipe(
    v.string(),
    v.minLength(32, "must be at least 32 characters (`multigres setup` generates one)"),
  ),
  contextSecretFile: v.optional(v.string()),
  guard: v.pipe(
    v.union([v.boolean(), v.picklist(["on", "off", "true", "false"], 'must be "on" or "off"')]),
    v.transform((x) => x === true || x === "on" || x === "true"),
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
  { key: "superusers", flag: "superuser", file: "superusers", env: "MULTIGRES_SUPERUSERS", list: true, default: ["postgres"], description: "User passed through with no tenant and no context (repeatable; env: comma-separated)" },
  { key: "role", flag: "role", file: "role", env: "MULTIGRES_ROLE", description: "Role to SET ROLE to after login (default: the role from the user name)" },
  { key: "md5Auth", flag: "md5-auth", file: "md5_auth", env: "MULTIGRES_MD5_AUTH", default: "loopback", description: "MD5 users: \"loopback\" asks loopback clients for the password and answers the server; \"refuse\" rejects them" },
  { key: "startupTimeout", flag: "startup-timeout", file: "startup_timeout", env: "MULTIGRES_STARTUP_TIMEOUT", default: "15000", description: "Milliseconds a client has to finish startup and authentication (0 = no limit)" },
  { key: "contextSecret", file: "context_secret", env: "MULTIGRES_CONTEXT_SECRET", description: "Secret the tenant context is signed with (environment or file only; never logged)" },
  { key: "contextSecretFile", flag: "context-secret-file", file: "context_secret_file", env: "MULTIGRES_CONTEXT_SECRET_FILE", description: "File holding the context secret instead; re-read on SIGHUP, which is how a secret is rotated" },
  { key: "guard", flag: "guard", file: "guard", env: "MULTIGRES_GUARD", default: "on", description: "Refuse statements that change the role or the tenant context (42501) before they reach the server: on or off" },
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
  /** The context secret read from contextSecretFile; wins over the other sources. */
  secretFile?: { path: string; text: string };
}

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

  if (sources.secretFile) {
    merged.contextSecret = sources.secretFile.text.trim();
    origin.contextSecret = `contents of ${sources.secretFile.path}`;
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
      const shown = key === "contextSecret" ? "(hidden)" : JSON.stringify(merged[key]);
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
  const secretPath = [flags["context-secret-file"]].flat().at(-1) ?? env.MULTIGRES_CONTEXT_SECRET_FILE ?? file?.data.context_secret_file;
  let secretFile: Sources["secretFile"];
  if (typeof secretPath === "string" && secretPath !== "") {
    try {
      secretFile = { path: secretPath, text: await Bun.file(secretPath).text() };
    } catch (e) {
      throw new ConfigError([`${secretPath}: cannot read the context secret file (${(e as Error).message})`]);
    }
  }
  return resolveConfig({ flags, env, file, secretFile });
}
