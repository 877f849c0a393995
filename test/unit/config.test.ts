/**
 * Configuration (src/config.ts): one valibot schema over three sources.
 *
 * Covers: defaults; precedence flags > environment > file for every kind of
 * option (scalar, list, number); empty environment values ignored; repeated
 * flags; comma-separated env lists; HOST:PORT parsing incl. IPv6; the
 * tenant pattern anchored in full; every invalid value reported with the
 * source it came from, all problems at once, unknown file keys;
 * readConfigFile on a real temporary TOML file, a missing file and bad TOML.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError, OPTIONS, readConfigFile, resolveConfig as resolveRaw, upstreamPasswordFor, type Sources } from "../../src/config.ts";

/** A valid context secret (required, at least 32 characters). */
const SECRET = "s".repeat(32);

/** An auth file path: --auth proxy (the default) needs client credentials; resolveConfig does not read the file. */
const AUTH_FILE = "/etc/multigres/userlist.txt";

/** resolveConfig with the required secret and an auth file supplied through the environment unless a test sets them. */
function resolveConfig(sources: Sources) {
  return resolveRaw({ ...sources, env: { MULTIGRES_CONTEXT_SECRET: SECRET, MULTIGRES_AUTH_FILE: AUTH_FILE, ...sources.env } });
}

const dir = mkdtempSync(join(tmpdir(), "multigres-config-test-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function writeToml(name: string, text: string): string {
  const p = join(dir, name);
  writeFileSync(p, text);
  return p;
}

/** The problems resolveConfig reports (fails the test if it does not throw ConfigError). */
function problems(sources: Sources, raw = false): string[] {
  try {
    if (raw) resolveRaw(sources);
    else resolveConfig(sources);
  } catch (e) {
    expect(e).toBeInstanceOf(ConfigError);
    return (e as ConfigError).problems;
  }
  throw new Error(`expected resolveConfig(${JSON.stringify(sources)}) to fail`);
}

const file = (data: Record<string, unknown>, path = "/etc/multigres.toml") => ({ path, data });

describe("defaults", () => {
  test("no sources at all gives the documented defaults", () => {
    const c = resolveConfig({});
    expect(c.listen).toEqual({ host: "127.0.0.1", port: 6432 });
    expect(c.upstream).toEqual({ host: "127.0.0.1", port: 5432 });
    expect(c.separator).toBe(".");
    expect(c.tenantSetting).toBe("app.current_tenant_id");
    expect(c.tenantPattern).toBeInstanceOf(RegExp);
    expect(c.superusers).toEqual(["postgres"]);
    expect(c.role).toBeUndefined();
    expect(c.md5Auth).toBe("loopback");
    expect(c.startupTimeout).toBe(15_000);
    expect(c.guard).toBe("on");
    expect(c.logLevel).toBe("info");
  });

  test("the default tenant pattern: letters, digits, _ and -, 1 to 63, whole string", () => {
    const p = resolveConfig({}).tenantPattern;
    for (const ok of ["a", "Z9", "tenant_abc", "t-1", "x".repeat(63)]) expect(p.test(ok)).toBe(true);
    for (const bad of ["", "x".repeat(64), "bad!tenant", "a.b", " a", "a\n", "é"]) expect(p.test(bad)).toBe(false);
  });

  test("every option has an env name and a file key, all distinct; flags distinct where present", () => {
    for (const key of ["env", "file"] as const) {
      expect(new Set(OPTIONS.map((o) => o[key])).size).toBe(OPTIONS.length);
    }
    const flags = OPTIONS.flatMap((o) => (o.flag ? [o.flag] : []));
    expect(new Set(flags).size).toBe(flags.length);
    for (const o of OPTIONS) expect(o.env).toStartWith("MULTIGRES_");
  });

  test("the context secret has no flag (it would show in ps)", () => {
    expect(OPTIONS.find((o) => o.key === "contextSecret")?.flag).toBeUndefined();
  });
});

describe("precedence: flags > environment > file > default", () => {
  test("a scalar from each source", () => {
    const f = file({ listen: "127.0.0.1:1111" });
    const env = { MULTIGRES_LISTEN: "127.0.0.1:2222" };
    const flags = { listen: "127.0.0.1:3333" };
    expect(resolveConfig({ file: f }).listen.port).toBe(1111);
    expect(resolveConfig({ file: f, env }).listen.port).toBe(2222);
    expect(resolveConfig({ file: f, env, flags }).listen.port).toBe(3333);
    expect(resolveConfig({ flags }).listen.port).toBe(3333);
  });

  test("an empty environment variable counts as unset", () => {
    const c = resolveConfig({ file: file({ separator: "#" }), env: { MULTIGRES_SEPARATOR: "" } });
    expect(c.separator).toBe("#");
  });

  test("a flag given as undefined or an empty list falls through", () => {
    const env = { MULTIGRES_SUPERUSERS: "admin" };
    expect(resolveConfig({ env, flags: { superuser: undefined } }).superusers).toEqual(["admin"]);
    expect(resolveConfig({ env, flags: { superuser: [] } }).superusers).toEqual(["admin"]);
  });

  test("lists: repeated flags, comma-separated env (trimmed), TOML arrays", () => {
    expect(resolveConfig({ flags: { superuser: ["postgres", "admin"] } }).superusers).toEqual(["postgres", "admin"]);
    expect(resolveConfig({ flags: { superuser: "admin" } }).superusers).toEqual(["admin"]);
    expect(resolveConfig({ env: { MULTIGRES_SUPERUSERS: " postgres , admin,, " } }).superusers).toEqual(["postgres", "admin"]);
    expect(resolveConfig({ file: file({ superusers: ["a", "b"] }) }).superusers).toEqual(["a", "b"]);
    // The flag replaces the env list, it does not merge with it.
    expect(resolveConfig({ env: { MULTIGRES_SUPERUSERS: "a,b" }, flags: { superuser: "c" } }).superusers).toEqual(["c"]);
  });

  test("a scalar flag given twice: the last one wins", () => {
    expect(resolveConfig({ flags: { separator: ["@", "#"] } }).separator).toBe("#");
  });

  test("numbers: TOML integers and strings of digits", () => {
    expect(resolveConfig({ file: file({ startup_timeout: 500 }) }).startupTimeout).toBe(500);
    expect(resolveConfig({ env: { MULTIGRES_STARTUP_TIMEOUT: "750" } }).startupTimeout).toBe(750);
    expect(resolveConfig({ flags: { "startup-timeout": "0" } }).startupTimeout).toBe(0);
  });

  test("every option of v0.1 and the auth options of 0.3 can be set from each source (secrets: not as flags)", () => {
    const values: Record<string, string> = {
      listen: "127.0.0.1:7000",
      upstream: "db.internal:5433",
      separator: "@",
      tenantSetting: "acme.tenant",
      tenantPattern: "t[0-9]+",
      superusers: "admin",
      role: "reader",
      md5Auth: "refuse",
      startupTimeout: "1234",
      contextSecret: "f".repeat(40),
      guard: "off",
      logLevel: "debug",
      databases: "app",
      auth: "proxy",
      authFile: "/etc/multigres/users.txt",
      authMethod: "password",
      tenantAuth: "token",
      tokenSecret: "k".repeat(40),
      upstreamPassword: "upstream-pw",
      upstreamCert: "/etc/multigres/client.crt",
      upstreamKey: "/etc/multigres/client.key",
      guardMaxStatement: "4096",
    };
    const check = (c: ReturnType<typeof resolveConfig>) => {
      expect(c.databases).toEqual(["app"]);
      expect(c.auth).toBe("proxy");
      expect(c.authFile).toBe("/etc/multigres/users.txt");
      expect(c.authMethod).toBe("password");
      expect(c.tenantAuth).toBe("token");
      expect(c.tokenSecret).toBe("k".repeat(40));
      expect(c.upstreamPassword).toBe("upstream-pw");
      expect([c.upstreamCert, c.upstreamKey]).toEqual(["/etc/multigres/client.crt", "/etc/multigres/client.key"]);
      expect(c.guardMaxStatement).toBe(4096);
      expect(c.listen).toEqual({ host: "127.0.0.1", port: 7000 });
      expect(c.upstream).toEqual({ host: "db.internal", port: 5433 });
      expect(c.separator).toBe("@");
      expect(c.tenantSetting).toBe("acme.tenant");
      expect(c.tenantPattern.test("t12")).toBe(true);
      expect(c.superusers).toEqual(["admin"]);
      expect(c.role).toBe("reader");
      expect(c.md5Auth).toBe("refuse");
      expect(c.startupTimeout).toBe(1234);
      expect(c.guard).toBe("off");
      expect(c.logLevel).toBe("debug");
    };
    const flags: Record<string, string> = {};
    const env: Record<string, string> = {};
    const data: Record<string, unknown> = {};
    for (const o of OPTIONS) {
      const v = values[o.key];
      if (v === undefined) continue; // options added later keep their defaults here
      if (o.flag) flags[o.flag] = v!;
      env[o.env] = v!;
      data[o.file] = o.list ? [v] : v;
    }
    check(resolveConfig({ flags, env: { MULTIGRES_TOKEN_SECRET: values.tokenSecret!, MULTIGRES_UPSTREAM_PASSWORD: values.upstreamPassword! } }));
    const fromEnv = resolveRaw({ env });
    check(fromEnv);
    expect(fromEnv.contextSecret).toBe(values.contextSecret!);
    const fromFile = resolveRaw({ file: file(data) });
    check(fromFile);
    expect(fromFile.contextSecret).toBe(values.contextSecret!);
  });
});

describe("values", () => {
  test("HOST:PORT, including bracketed IPv6 and port 0", () => {
    expect(resolveConfig({ flags: { listen: "[::1]:6432" } }).listen).toEqual({ host: "::1", port: 6432 });
    expect(resolveConfig({ flags: { listen: "0.0.0.0:0" } }).listen).toEqual({ host: "0.0.0.0", port: 0 });
    expect(resolveConfig({ flags: { upstream: "localhost:65535" } }).upstream).toEqual({ host: "localhost", port: 65535 });
  });

  test("the tenant pattern must match the whole tenant id, even with alternation", () => {
    const p = resolveConfig({ flags: { "tenant-pattern": "a|b" } }).tenantPattern;
    expect(p.test("a")).toBe(true);
    expect(p.test("b")).toBe(true);
    expect(p.test("ab")).toBe(false);
    expect(p.test("xa")).toBe(false);
    const q = resolveConfig({ flags: { "tenant-pattern": "[a-z]+" } }).tenantPattern;
    expect(q.test("abc")).toBe(true);
    expect(q.test("abc1")).toBe(false);
    expect(q.test("x abc")).toBe(false);
  });
});

describe("invalid configuration", () => {
  const bad: [string, Sources, RegExp][] = [
    ["listen without a port", { flags: { listen: "127.0.0.1" } }, /^--listen: listen must be HOST:PORT/],
    ["listen with a port over 65535", { flags: { listen: "127.0.0.1:70000" } }, /^--listen: .*65535/],
    ["upstream with spaces", { env: { MULTIGRES_UPSTREAM: "my host:5432" } }, /^MULTIGRES_UPSTREAM \(environment\): upstream must be HOST:PORT/],
    ["empty separator in the file", { file: file({ separator: "" }) }, /^separator in \/etc\/multigres.toml: must not be empty/],
    ["tenant setting without a dot", { flags: { "tenant-setting": "tenant" } }, /^--tenant-setting: must be a custom setting name/],
    ["tenant setting with SQL in it", { flags: { "tenant-setting": "app.x'; drop" } }, /^--tenant-setting: must be a custom setting name/],
    ["tenant pattern not a regex", { flags: { "tenant-pattern": "([a-z" } }, /^--tenant-pattern: is not a valid regular expression/],
    ["empty tenant pattern", { file: file({ tenant_pattern: "" }) }, /^tenant_pattern in \/etc\/multigres.toml: must not be empty/],
    ["empty superuser name", { file: file({ superusers: ["postgres", ""] }) }, /^superusers in \/etc\/multigres.toml: must not be empty/],
    ["empty role", { flags: { role: "" } }, /^--role: must not be empty/],
    ["md5 mode", { env: { MULTIGRES_MD5_AUTH: "maybe" } }, /^MULTIGRES_MD5_AUTH \(environment\): must be "loopback" or "refuse"/],
    ["startup timeout not a number", { flags: { "startup-timeout": "soon" } }, /^--startup-timeout: .*whole number of milliseconds/],
    ["startup timeout negative", { file: file({ startup_timeout: -1 }) }, /^startup_timeout in \/etc\/multigres.toml: /],
    ["startup timeout fractional", { file: file({ startup_timeout: 1.5 }) }, /^startup_timeout in \/etc\/multigres.toml: /],
    ["log level", { flags: { "log-level": "loud" } }, /^--log-level: must be one of silent, error, warn, info, debug, trace/],
    ["a number where a string belongs", { file: file({ listen: 6432 }) }, /^listen in \/etc\/multigres.toml: /],
    ["a string where a list belongs", { file: file({ superusers: "postgres" }) }, /^superusers in \/etc\/multigres.toml: /],
  ];
  for (const [what, sources, re] of bad) {
    test(what, () => {
      const p = problems(sources);
      expect(p.length).toBe(1);
      expect(p[0]).toMatch(re);
      // The offending value is shown.
      expect(p[0]).toMatch(/\(got .*\)$/);
    });
  }

  test("unknown keys in the file are reported with the file's path", () => {
    expect(problems({ file: file({ listn: "127.0.0.1:1", separator: "." }) })).toEqual(['/etc/multigres.toml: unknown key "listn"']);
  });

  test("every problem is reported at once, each with its source", () => {
    const p = problems({
      flags: { listen: "nowhere" },
      env: { MULTIGRES_LOG_LEVEL: "loud" },
      file: file({ tenant_setting: "nodot", bogus: 1, separator: "" }, "/tmp/m.toml"),
    });
    expect(p.length).toBe(5);
    expect(p).toContain('/tmp/m.toml: unknown key "bogus"');
    expect(p.some((x) => x.startsWith("--listen: "))).toBe(true);
    expect(p.some((x) => x.startsWith("MULTIGRES_LOG_LEVEL (environment): "))).toBe(true);
    expect(p.some((x) => x.startsWith("tenant_setting in /tmp/m.toml: "))).toBe(true);
    expect(p.some((x) => x.startsWith("separator in /tmp/m.toml: "))).toBe(true);
  });

  test("a bad value overridden by a good one from a stronger source is no problem", () => {
    const c = resolveConfig({ file: file({ log_level: "loud" }), flags: { "log-level": "warn" } });
    expect(c.logLevel).toBe("warn");
  });

  test("the error message lists every problem on its own line", () => {
    try {
      resolveConfig({ flags: { listen: "x", "log-level": "y" } });
      throw new Error("expected a ConfigError");
    } catch (e) {
      expect(e).toBeInstanceOf(ConfigError);
      const lines = (e as Error).message.split("\n");
      expect(lines[0]).toBe("invalid configuration:");
      expect(lines.slice(1).every((l) => l.startsWith("  - "))).toBe(true);
      expect(lines.length).toBe(3);
    }
  });
});

describe("context secret and guard", () => {
  test("a missing secret is reported, naming where to set it", () => {
    const p = problems({}, true);
    expect(p).toHaveLength(1);
    expect(p[0]).toMatch(/MULTIGRES_CONTEXT_SECRET|context_secret/);
  });

  test("a short secret is reported with its source, and its value is never shown", () => {
    const short = "tooshort-secret-value";
    const p = problems({ env: { MULTIGRES_CONTEXT_SECRET: short } }, true);
    expect(p).toHaveLength(1);
    expect(p[0]).toStartWith("MULTIGRES_CONTEXT_SECRET (environment): must be at least 32 characters");
    expect(p.join("\n")).not.toContain(short);
    const f = problems({ file: file({ context_secret: short }) }, true);
    expect(f[0]).toStartWith("context_secret in /etc/multigres.toml: ");
    expect(f.join("\n")).not.toContain(short);
  });

  test("the secret cannot come from a flag", () => {
    const p = problems({ flags: { "context-secret": SECRET, contextSecret: SECRET } }, true);
    expect(p).toHaveLength(1);
  });

  test("guard: on/off/strict/true/false strings and TOML booleans", () => {
    for (const [value, expected] of [["on", "on"], ["off", "off"], ["strict", "strict"], ["true", "on"], ["false", "off"]] as const) {
      expect(resolveConfig({ flags: { guard: value } }).guard).toBe(expected);
    }
    expect(resolveConfig({ file: file({ guard: false }) }).guard).toBe("off");
    expect(resolveConfig({ file: file({ guard: true }) }).guard).toBe("on");
    expect(resolveConfig({ file: file({ guard: "strict" }) }).guard).toBe("strict");
    expect(resolveConfig({ env: { MULTIGRES_GUARD: "strict" } }).guard).toBe("strict");
    const p = problems({ env: { MULTIGRES_GUARD: "maybe" } });
    expect(p[0]).toStartWith("MULTIGRES_GUARD (environment): ");
    expect(p[0]).toContain('"on", "off" or "strict"');
    expect(problems({ flags: { guard: "STRICT" } })[0]).toStartWith("--guard: ");
  });
});

describe("readConfigFile", () => {
  test("reads a TOML file and feeds resolveConfig", async () => {
    const path = writeToml(
      "ok.toml",
      [
        "# multigres",
        'listen = "127.0.0.1:7432"',
        'upstream = "[::1]:5433"',
        'separator = "__"',
        'tenant_pattern = "[a-z0-9]{1,20}"',
        'superusers = ["postgres", "migrator"]',
        "startup_timeout = 2500",
        'log_level = "warn"',
        'md5_auth = "refuse"',
        "",
      ].join("\n"),
    );
    const f = await readConfigFile(path);
    expect(f.path).toBe(path);
    expect(f.data.startup_timeout).toBe(2500);
    const c = resolveConfig({ file: f, env: { MULTIGRES_LOG_LEVEL: "error" } });
    expect(c.listen).toEqual({ host: "127.0.0.1", port: 7432 });
    expect(c.upstream).toEqual({ host: "::1", port: 5433 });
    expect(c.separator).toBe("__");
    expect(c.superusers).toEqual(["postgres", "migrator"]);
    expect(c.startupTimeout).toBe(2500);
    expect(c.md5Auth).toBe("refuse");
    expect(c.logLevel).toBe("error"); // env beats file
  });

  test("problems in a real file name the file", async () => {
    const path = writeToml("bad-values.toml", 'listen = "nope"\ncolour = "blue"\n');
    const p = problems({ file: await readConfigFile(path) });
    expect(p).toContain(`${path}: unknown key "colour"`);
    expect(p.some((x) => x.startsWith(`listen in ${path}: `))).toBe(true);
  });

  test("a missing file is a ConfigError naming it", async () => {
    const path = join(dir, "does-not-exist.toml");
    const err = await readConfigFile(path).catch((e) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.problems).toHaveLength(1);
    expect(err.problems[0]).toStartWith(`${path}: cannot read config file`);
  });

  test("invalid TOML is a ConfigError naming the file", async () => {
    const path = writeToml("broken.toml", 'listen = "127.0.0.1:1\nseparator = \n[[[\n');
    const err = await readConfigFile(path).catch((e) => e);
    expect(err).toBeInstanceOf(ConfigError);
    expect(err.problems[0]).toStartWith(`${path}: not valid TOML`);
  });
});

describe("authentication options (0.3)", () => {
  test("defaults: the proxy authenticates (SCRAM, shared role entries), guard reads statements up to 1 MiB", () => {
    const c = resolveConfig({});
    expect([c.auth, c.authMethod, c.tenantAuth, c.guardMaxStatement, c.databases]).toEqual(["proxy", "scram-sha-256", "shared", 1 << 20, []]);
  });

  test("--auth proxy without client credentials says what to configure, passthrough needs none", () => {
    const p = problems({ env: { MULTIGRES_CONTEXT_SECRET: SECRET } }, true);
    expect(p).toHaveLength(1);
    expect(p[0]).toContain("--auth-file FILE, or --tenant-auth token with MULTIGRES_TOKEN_SECRET; --auth passthrough");
    expect(resolveRaw({ env: { MULTIGRES_CONTEXT_SECRET: SECRET, MULTIGRES_AUTH: "passthrough" } }).auth).toBe("passthrough");
    expect(resolveRaw({ env: { MULTIGRES_CONTEXT_SECRET: SECRET, MULTIGRES_TENANT_AUTH: "token", MULTIGRES_TOKEN_SECRET: "k".repeat(32) } }).tenantAuth).toBe("token");
  });

  test("token mode needs a token secret of 32+ characters, which is never shown", () => {
    expect(problems({ env: { MULTIGRES_TENANT_AUTH: "token" } }).join("\n")).toContain("--tenant-auth token needs MULTIGRES_TOKEN_SECRET");
    const short = problems({ env: { MULTIGRES_TENANT_AUTH: "token", MULTIGRES_TOKEN_SECRET: "short-token-secret" } });
    expect(short.join("\n")).toContain("at least 32 characters");
    expect(short.join("\n")).toContain("(hidden)");
    expect(short.join("\n")).not.toContain("short-token-secret");
  });

  test("secrets have no flags; files for them do", () => {
    for (const key of ["tokenSecret", "upstreamPassword", "contextSecret"]) expect(OPTIONS.find((o) => o.key === key)?.flag).toBeUndefined();
    for (const flag of ["token-secret-file", "upstream-password-file", "context-secret-file"]) expect(OPTIONS.some((o) => o.flag === flag)).toBe(true);
  });

  test("a secret file's text wins; an upstream password file keeps inner lines (a password per role)", () => {
    const c = resolveConfig({
      env: { MULTIGRES_TENANT_AUTH: "token" },
      secretFiles: {
        tokenSecret: { path: "/run/secrets/token", text: `${"x".repeat(40)}\n` },
        upstreamPassword: { path: "/run/secrets/upstream", text: `"app_user" "a-pw"\n"reader" "r-pw"\n` },
      },
    });
    expect(c.tokenSecret).toBe("x".repeat(40));
    expect(upstreamPasswordFor(c, "app_user")).toBe("a-pw");
    expect(upstreamPasswordFor(c, "reader")).toBe("r-pw");
    expect(upstreamPasswordFor(c, "nobody")).toBeUndefined();
    expect(upstreamPasswordFor({ upstreamPassword: " one password for all " }, "anyone")).toBe(" one password for all ");
    expect(upstreamPasswordFor({ upstreamPassword: undefined }, "anyone")).toBeUndefined();
  });

  test("invalid choices and pairs", () => {
    const p = problems({
      flags: { auth: "relay", "auth-method": "md5", "tenant-auth": "jwt", "upstream-cert": "/c.crt", "guard-max-statement": "10" },
    });
    expect(p.join("\n")).toContain('--auth: must be "proxy" or "passthrough"');
    expect(p.join("\n")).toContain('--auth-method: must be "scram-sha-256" or "password"');
    expect(p.join("\n")).toContain('--tenant-auth: must be "shared" or "token"');
    expect(p.join("\n")).toContain("--guard-max-statement: must be at least 1024 bytes");
    expect(problems({ flags: { "upstream-cert": "/c.crt" } }).join("\n")).toContain("--upstream-cert and --upstream-key go together");
    expect(problems({ flags: { "upstream-cert": "/c.crt", "upstream-key": "/c.key", "upstream-tls": "disable" } }).join("\n")).toContain("needs TLS to the upstream");
  });
});

describe("upstream password files", () => {
  test("a file that reads as userlist lines but is malformed is refused, naming the line, never the passwords", () => {
    const p = problems({ secretFiles: { upstreamPassword: { path: "/run/up", text: `"app_user" "a-pw"\n"reader" broken-pw\n` } } });
    expect(p.join("\n")).toContain('contents of /run/up: reads as "role" "password" lines but line 2: expected "user" "password"');
    expect(p.join("\n")).not.toContain("a-pw");
    expect(p.join("\n")).not.toContain("broken-pw");
  });
});
