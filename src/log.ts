/**
 * Logging through consola, in two formats:
 *
 *   pretty  one readable line per event, for terminals
 *   json    one JSON object per line: time, level, msg, and the connection's
 *           fields (conn, remote, user, tenant) plus any event fields
 *
 * Each connection logs through a ConnectionLog that adds its fields to
 * every line. Nothing here ever receives a password, proof or secret: the
 * proxy never logs message payloads, and config errors hide the secret.
 */
import { createConsola, type ConsolaInstance, type ConsolaReporter, type LogObject } from "consola";
import { UNPRINTABLE } from "./tenant/identity.ts";

export type LogLevel = "silent" | "error" | "warn" | "info" | "debug" | "trace";
export type LogFormat = "pretty" | "json";

const LEVELS: Record<LogLevel, number> = { silent: -999, error: 0, warn: 1, info: 3, debug: 4, trace: 5 };

/** Fields every line of one connection carries. */
export interface ConnectionFields {
  conn: number;
  remote: string;
  user?: string;
  tenant?: string;
}

/** Splits consola's args into the message and any field objects. */
function parts(logObj: LogObject): { msg: string; fields: Record<string, unknown> } {
  const fields: Record<string, unknown> = {};
  const words: string[] = [];
  for (const a of logObj.args) {
    if (a instanceof Error) words.push(a.message);
    else if (a && typeof a === "object") Object.assign(fields, a);
    else words.push(String(a));
  }
  return { msg: [logObj.message, ...words].filter(Boolean).join(" "), fields };
}

const json: ConsolaReporter = {
  log(logObj) {
    const { msg, fields } = parts(logObj);
    const line = { time: logObj.date.toISOString(), level: logObj.type, msg, ...fields };
    const out = logObj.level <= 1 ? process.stderr : process.stdout;
    out.write(`${JSON.stringify(line)}\n`);
  },
};

/**
 * Control characters written as escapes: a line is one event. User names,
 * database names and server messages come from clients, and a client must
 * not be able to end a line and forge the next one.
 */
const oneLine = (s: string) => s.replace(UNPRINTABLE, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);

const pretty: ConsolaReporter = {
  log(logObj) {
    const { msg, fields } = parts(logObj);
    const { conn, remote, user, tenant, ...rest } = fields;
    const who = conn === undefined ? "" : `[c${conn}${user ? ` ${user}${tenant ? `/${tenant}` : ""}` : ""}] `;
    const extra = Object.entries(rest).map(([k, v]) => ` ${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
    const level = logObj.type === "log" ? "info" : logObj.type;
    const out = logObj.level <= 1 ? process.stderr : process.stdout;
    out.write(`${logObj.date.toISOString()} ${level.padEnd(5)} ${oneLine(`${who}${msg}${extra.join("")}`)}\n`);
  },
};

let format: LogFormat = "pretty";

// A closed stdout/stderr (the reader went away) must not take the proxy down.
process.stdout.on?.("error", () => {});
process.stderr.on?.("error", () => {});

// One reporter that looks the format up each time, so a reload switches
// every line at once.
export const log: ConsolaInstance = createConsola({
  level: LEVELS.info,
  reporters: [{ log: (logObj, ctx) => (format === "json" ? json : pretty).log(logObj, ctx) }],
});

export function configureLog(level: LogLevel, logFormat: LogFormat): void {
  log.level = LEVELS[level];
  format = logFormat;
}

/**
 * The logger of one connection: every line carries its fields. A plain
 * object over the shared consola, not a consola child per connection, so
 * an idle connection costs a few bytes of logging state, not a logger.
 */
export class ConnectionLog {
  constructor(readonly fields: ConnectionFields) {}
  error(msg: string, extra?: Record<string, unknown>): void {
    log.error(msg, this.fields, extra ?? {});
  }
  warn(msg: string, extra?: Record<string, unknown>): void {
    log.warn(msg, this.fields, extra ?? {});
  }
  info(msg: string, extra?: Record<string, unknown>): void {
    log.info(msg, this.fields, extra ?? {});
  }
  debug(msg: string, extra?: Record<string, unknown>): void {
    if (log.level >= LEVELS.debug) log.debug(msg, this.fields, extra ?? {});
  }
}

