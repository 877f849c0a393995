/**
 * What doctor's checks share: the finding they report, the context they run
 * in, and the small helpers that make findings read alike.
 */
import type { Tx } from "./connect.ts";

export type Severity = "error" | "warning" | "info";

export interface Finding {
  rule: string;
  severity: Severity;
  /** The object concerned: a table, policy ("policy p on t"), role, function, index, or "database". */
  object: string;
  message: string;
  fix: string;
}

/** One audit's read-only transaction and what every check needs to know. */
export interface AuditContext {
  tx: Tx;
  app: string;
  /** The app role, quoted as an identifier. */
  appQ: string;
  /** null when the role does not exist. */
  appOid: number | null;
  /** `multigres setup …` for this role, the fix that covers most findings. */
  setupFix: string;
  tenantColumns: readonly string[];
  add(f: Finding): void;
}

/** "a, b, c, d, e and 3 more": a finding names its objects without drowning the reader. */
export function nameFew(names: readonly string[], shown = 5): string {
  if (names.length <= shown) return names.join(", ");
  return `${names.slice(0, shown).join(", ")} and ${names.length - shown} more`;
}

export const plural = (n: number, word: string) => `${n} ${word}${n === 1 ? "" : "s"}`;
