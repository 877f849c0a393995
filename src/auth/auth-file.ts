/**
 * PgBouncer's userlist format, read by `--auth-file` (client credentials)
 * and by `--upstream-password-file` when it names a password per role:
 *
 *   "app_user"       "SCRAM-SHA-256$4096:<salt>$<StoredKey>:<ServerKey>"
 *   "app_user.acme"  "a plain password"
 *   ; comment        # comment
 *
 * Two double-quoted fields per line (a `"` inside is written `""`); what
 * follows them is ignored, as PgBouncer does. Blank lines and lines
 * starting with `;` or `#` are comments. Pure: text in, entries and the
 * problems (with line numbers, never the secret) out.
 */

export interface AuthFileEntry {
  user: string;
  secret: string;
  line: number;
}

export interface ParsedAuthFile {
  entries: AuthFileEntry[];
  problems: string[];
}

export function parseAuthFile(text: string): ParsedAuthFile {
  const entries: AuthFileEntry[] = [];
  const problems: string[] = [];
  const seen = new Set<string>();
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = index + 1;
    const trimmed = raw.trim();
    if (trimmed === "" || trimmed.startsWith(";") || trimmed.startsWith("#")) return;
    const user = quoted(trimmed, 0);
    const secret = user && quoted(trimmed, skipSpace(trimmed, user.end));
    if (!user || !secret) {
      problems.push(`line ${line}: expected "user" "password" (two double-quoted fields)`);
      return;
    }
    if (user.value === "") {
      problems.push(`line ${line}: empty user name`);
      return;
    }
    if (seen.has(user.value)) {
      problems.push(`line ${line}: "${user.value}" is listed twice`);
      return;
    }
    seen.add(user.value);
    entries.push({ user: user.value, secret: secret.value, line });
  });
  return { entries, problems };
}

/** A double-quoted field starting at `at` ("" stands for one quote). */
function quoted(s: string, at: number): { value: string; end: number } | undefined {
  if (s[at] !== '"') return undefined;
  let value = "";
  for (let i = at + 1; i < s.length; i++) {
    if (s[i] !== '"') {
      value += s[i];
    } else if (s[i + 1] === '"') {
      value += '"';
      i++;
    } else {
      return { value, end: i + 1 };
    }
  }
  return undefined;
}

function skipSpace(s: string, at: number): number {
  while (at < s.length && (s[at] === " " || s[at] === "\t")) at++;
  return at;
}

/** One line of the format, quoting as needed (for `multigres setup` writing files). */
export function authFileLine(user: string, secret: string): string {
  const q = (s: string) => `"${s.replace(/"/g, '""')}"`;
  return `${q(user)} ${q(secret)}`;
}
