#!/usr/bin/env bun
/**
 * multigres: the command line. `multigres` alone is `multigres start`.
 */
import { defineCommand, runMain, type ArgsDef } from "citty";
import { ConfigError, loadConfig, OPTIONS, type Flags } from "./config.ts";
import { log, setLogLevel } from "./log.ts";
import { startProxy } from "./proxy/server.ts";
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
    setLogLevel(config.logLevel);
    const proxy = startProxy(config);

    const shutdown = (signal: string) => {
      log.info(`${signal}: shutting down`);
      proxy.stop();
      process.exit(0);
    };
    process.on("SIGTERM", () => shutdown("SIGTERM"));
    process.on("SIGINT", () => shutdown("SIGINT"));
    // SIGHUP re-reads the config file and the secret file (the environment
    // of a running process cannot change); new sessions get the new config.
    process.on("SIGHUP", async () => {
      try {
        const next = await loadConfig(flags, process.env, configPath);
        setLogLevel(next.logLevel);
        proxy.reload(next);
      } catch (e) {
        log.error(`SIGHUP: configuration not reloaded: ${(e as Error).message}`);
      }
    });
  },
});

const sql = defineCommand({
  meta: { name: "sql", description: "Print sql/setup.sql (pipe it into psql as a superuser)" },
  run() {
    process.stdout.write(setupSql);
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
  subCommands: { start, sql, version },
  default: "start",
});

runMain(main);
