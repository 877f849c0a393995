/**
 * Who a connection is: a superuser passing straight through, or an app role
 * acting for one tenant. Pure: the user name and the rules in, a verdict out.
 */

export interface IdentityRules {
  separator: string;
  tenantPattern: RegExp;
  superusers: readonly string[];
}

export type Identity =
  | { kind: "superuser"; user: string }
  | { kind: "tenant"; user: string; role: string; tenant: string }
  | { kind: "rejected"; message: string; hint: string };

export function resolveIdentity(user: string | undefined, rules: IdentityRules): Identity {
  const hint = `connect as <role>${rules.separator}<tenant>, e.g. "app_user${rules.separator}tenant_abc"`;
  if (!user) return { kind: "rejected", message: "no user name in startup packet", hint };
  if (rules.superusers.includes(user)) return { kind: "superuser", user };

  // The tenant follows the *last* separator, so roles may contain it.
  const cut = user.lastIndexOf(rules.separator);
  if (cut < 0) {
    return { kind: "rejected", message: `user name "${printable(user)}" carries no tenant`, hint };
  }
  const role = user.slice(0, cut);
  const tenant = user.slice(cut + rules.separator.length);
  if (role === "") return { kind: "rejected", message: `user name "${printable(user)}" has no role before the tenant`, hint };
  if (!rules.tenantPattern.test(tenant)) {
    return {
      kind: "rejected",
      message: `invalid tenant id "${printable(tenant)}"`,
      hint: `tenant ids must match ${rules.tenantPattern.source}; ${hint}`,
    };
  }
  return { kind: "tenant", user, role, tenant };
}

/** Startup parameters a client may not send: they would set the context itself. */
export function forbiddenStartupParameter(
  params: ReadonlyMap<string, string>,
  protectedSettings: readonly string[],
): string | undefined {
  const isProtected = (name: string) =>
    protectedSettings.some((p) => p.toLowerCase() === name.toLowerCase().replace(/-/g, "_"));
  for (const [key, value] of params) {
    if (isProtected(key)) return key;
    if (key === "options") {
      const hit = optionSettings(value).find(isProtected);
      if (hit) return `options (-c ${hit})`;
    }
  }
  return undefined;
}

/**
 * Setting names in an `options` value, which Postgres reads as command-line
 * switches: "-c name=value", "-cname=value" or "--name=value", separated by
 * whitespace, with backslash escaping the next character.
 */
export function optionSettings(options: string): string[] {
  return optionAssignments(options).map(([name]) => name);
}

/**
 * Every value a startup packet gives a setting: parameters whose name
 * matches in any case (PostgreSQL's setting names are case-insensitive),
 * and `-c name=value` in `options`. Which one wins is the server's
 * business; a caller that must refuse a value checks them all.
 */
export function startupSettings(params: ReadonlyMap<string, string>, name: string): string[] {
  const same = (n: string) => n.toLowerCase().replace(/-/g, "_") === name;
  const out: string[] = [];
  for (const [key, value] of params) if (same(key)) out.push(value);
  for (const [key, value] of optionAssignments(params.get("options") ?? "")) if (same(key)) out.push(value);
  return out;
}

/** `name=value` pairs of an `options` value (see optionSettings). */
function optionAssignments(options: string): [string, string][] {
  const words: string[] = [];
  let word = "";
  for (let i = 0; i < options.length; i++) {
    const ch = options[i]!;
    if (ch === "\\" && i + 1 < options.length) word += options[++i];
    else if (/\s/.test(ch)) {
      if (word) words.push(word);
      word = "";
    } else word += ch;
  }
  if (word) words.push(word);

  // Read the way the server's getopt does ("B:bC:c:D:d:EeFf:h:ijk:lN:nOPp:r:S:sTt:v:W:-:"):
  // flags group ("-ec role=x" is -e then -c), and a flag that takes an
  // argument takes the rest of its word or else the next word.
  const out: [string, string][] = [];
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    if (!w.startsWith("-")) continue;
    for (let j = 1; j < w.length; j++) {
      const flag = w[j]!;
      if (!OPTION_FLAGS_WITH_ARGUMENT.includes(flag)) continue;
      const argument = j + 1 < w.length ? w.slice(j + 1) : words[++i];
      if ((flag === "c" || flag === "-") && argument) {
        const eq = argument.indexOf("=");
        out.push(eq < 0 ? [argument, ""] : [argument.slice(0, eq), argument.slice(eq + 1)]);
      }
      break;
    }
  }
  return out;
}

/** Postgres command-line switches that take an argument (its getopt string). */
const OPTION_FLAGS_WITH_ARGUMENT = "BCcDdfhkNprStvW-";

/**
 * Characters that can end a line or rearrange one in a terminal or a log
 * viewer: C0 and C1 controls, DEL, the Unicode line and paragraph
 * separators, and the bidirectional overrides and isolates.
 */
export const UNPRINTABLE = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g;

/** Never echo control characters or unbounded input into an error message or log. */
export function printable(s: string): string {
  const clipped = s.length > 80 ? `${s.slice(0, 80)}…` : s;
  return clipped.replace(UNPRINTABLE, "?");
}
