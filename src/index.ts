#!/usr/bin/env bun
/**
 * multigres: the command line. `multigres` alone is `multigres start`.
 */
import { defineCommand, runMain, type ArgsDef } from "citty";
import { ConfigError, loadConfig, OPTIONS, type Flags } from "./config.ts";
import { configureLog, log } from "./log.ts";
import { startHttp, tcpReachable, type HttpListener } from "./admin/http.ts";
import { startProxy, type RunningProxy } from "./proxy/server.ts";
import { setupCommand } from "./db/setup.ts";
import { doctorCommand } from "./db/doctor.ts";
import { isMainThread } from "node:worker_threads";
import { parseDuration, tenantToken } from "./auth/token.ts";
import { serveGuardRequests } from "./guard/worker.ts";
import setupSql from "../sql/setup.sql" with { type: "text" };
import pkg from "../package.json" with { type: "json" };

// Every config option is a flag; defaults live in config.ts, not here, so
// that the environment and the file can supply them when a flag is absent.
const configArgs: ArgsDef = {
  config: { type: "string", description: "TOML config file", valueHint: "FILE" },
  ...Object.fromEntries(
    OPTIONS.filter((o) => o.flag).map((o) => [
      o.flag!,
      {
        type: "string",
        description: `${o.description}${o.default !== undefined ? ` [default: ${[o.default].flat().join(", ")}]` : ""}`,
        valueHint: o.env,
      },
    ]),
  ),
};

const start = defineCommand({
  meta: { name: "start", description: "Run the proxy (the default command)" },
  args: configArgs,
  async run({ args }) {
    const flags: Flags = {};
    for (const o of OPTIONS) if (o.flag) flags[o.flag] = args[o.flag] as string | string[] | undefined;
    const configPath = args.config ? String(args.config) : undefined;
    let config;
    try {
      config = await loadConfig(flags, process.env, configPath);
    } catch (e) {
      if (!(e instanceof ConfigError)) throw e;
      process.stderr.write(`multigres: ${e.message}\n`);
      process.exit(2);
    }
    configureLog(config.logLevel, config.logFormat);

    // Handlers go in before anything listens: a signal that arrives between
    // "listening" and the handler would otherwise kill the process.
    let proxy: RunningProxy | undefined;
    let http: HttpListener | undefined;
    let stopping = false;
    // SIGTERM/SIGINT: stop accepting, let transactions finish (up to
    // --shutdown-timeout), then 57P01. A second signal exits at once.
    const shutdown = async (signal: string) => {
      if (stopping) {
        log.warn(`${signal} again: exiting now`);
        process.exit(1);
      }
      stopping = true;
      log.info(`${signal}: shutting down`);
      await proxy?.shutdown();
      http?.stop();
      log.info("all sessions closed, bye");
      process.exit(0);
    };
    process.on("SIGTERM", () => void shutdown("SIGTERM"));
    process.on("SIGINT", () => void shutdown("SIGINT"));
    // SIGHUP re-reads the config file, the secret file and the certificates
    // (the environment of a running process cannot change); new sessions
    // get the new settings, live ones keep theirs.
    process.on("SIGHUP", async () => {
      if (!proxy) return;
      try {
        const next = await loadConfig(flags, process.env, configPath);
        if (JSON.stringify(next.http) !== JSON.stringify(config.http)) log.warn("SIGHUP: http cannot change without a restart");
        configureLog(next.logLevel, next.logFormat);
        await proxy.reload(next);
      } catch (e) {
        log.error(`SIGHUP: configuration not reloaded: ${(e as Error).message}`);
      }
    });

    const running = await startProxy(config);
    proxy = running;
    if (config.http) {
      http = startHttp(config.http, {
        // The upstream of the current config, reloads included.
        upstreamReachable: () => {
          const { upstream, connectTimeout } = running.config;
          return tcpReachable(upstream.host, upstream.port, connectTimeout > 0 ? connectTimeout : 5000);
        },
        shuttingDown: () => running.shuttingDown,
        sessions: () => running.sessions.size,
        problems: () => running.health.problems(),
        authFailures: () => running.health.authFailures,
      });
    }
  },
});

const sql = defineCommand({
  meta: { name: "sql", description: "Print sql/setup.sql (pipe it into psql as a superuser)" },
  run() {
    process.stdout.write(setupSql);
  },
});

const token = defineCommand({
  meta: { name: "token", description: "Print the password of <role>.<tenant> under --tenant-auth token" },
  args: {
    tenant: { type: "positional", required: true, description: "Tenant id", valueHint: "TENANT" },
    role: { type: "string", required: true, description: "Role the tenant logs in as", valueHint: "ROLE" },
    ttl: { type: "string", description: "Expire after this long: 90s, 15m, 12h, 7d (default: never)", valueHint: "DURATION" },
    "token-secret-file": { type: "string", description: "File holding the token secret (else MULTIGRES_TOKEN_SECRET)", valueHint: "FILE" },
  },
  async run({ args }) {
    const fail = (message: string): never => {
      process.stderr.write(`multigres token: ${message}\n`);
      process.exit(2);
    };
    const file = args["token-secret-file"] ?? process.env.MULTIGRES_TOKEN_SECRET_FILE;
    const secret = file ? (await Bun.file(String(file)).text().catch((e: Error) => fail(`cannot read ${file}: ${e.message}`))).trim() : process.env.MULTIGRES_TOKEN_SECRET;
    if (!secret || secret.length < 32) fail("needs the token secret (at least 32 characters) in MULTIGRES_TOKEN_SECRET or --token-secret-file");
    let ttlSeconds = 0;
    try {
      ttlSeconds = args.ttl ? parseDuration(String(args.ttl)) : 0;
    } catch (e) {
      fail((e as Error).message);
    }
    const tenant = String(args.tenant);
    if (ttlSeconds > 0) process.stderr.write("note: a token with an expiry is checked only when sent in clear: run the proxy with --auth-method password (TLS or loopback clients)\n");
    process.stdout.write(`${tenantToken(secret!, String(args.role), tenant, { ttlSeconds })}\n`);
  },
});

const version = defineCommand({
  meta: { name: "version", description: "Print the version" },
  run() {
    process.stdout.write(`${pkg.version}\n`);
  },
});

const main = defineCommand({
  meta: { name: "multigres", version: pkg.version, description: pkg.description },
  // The start flags are declared here too so that `multigres --listen X`
  // reads X as a flag value, not as a subcommand name.
  args: configArgs,
  subCommands: { start, setup: setupCommand, doctor: doctorCommand, token, sql, version },
  default: "start",
});

// The same entry point serves as the guard's worker thread (guard/worker.ts).
if (isMainThread) runMain(main);
else serveGuardRequests();
