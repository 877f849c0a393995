/**
 * Logging through consola. Each connection logs with a tag naming its id
 * and, once known, its user and tenant. Nothing here ever receives a
 * password: the proxy never logs message payloads.
 */
import { createConsola, type ConsolaInstance } from "consola";

export type LogLevel = "silent" | "error" | "warn" | "info" | "debug" | "trace";

const LEVELS: Record<LogLevel, number> = { silent: -999, error: 0, warn: 1, info: 3, debug: 4, trace: 5 };

export const log: ConsolaInstance = createConsola({ level: LEVELS.info });

export function setLogLevel(level: LogLevel): void {
  log.level = LEVELS[level];
}

export type { ConsolaInstance as Logger };
