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
 * The startup value of a setting as PostgreSQL will apply it: its own
 * parameter (applied after `options`, so it wins), else the last
 * `-c name=value` in `options`.
 */
export function startupSetting(params: ReadonlyMap<string, string>, name: string): string | undefined {
  const fromOptions = optionAssignments(params.get("options") ?? "").filter(([n]) => n.toLowerCase().replace(/-/g, "_") === name).at(-1)?.[1];
  return params.get(name) ?? fromOptions;
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

/** Never echo control characters or unbounded input into an error message or log. */
export function printable(s: string): string {
  const clipped = s.length > 80 ? `${s.slice(0, 80)}…` : s;
  return clipped.replace(/[\u0000-\u001f\u007f]/g, "?");
}
