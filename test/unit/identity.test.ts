/**
 * Tenant identity (src/tenant/identity.ts): who a connection is, and which
 * startup parameters a tenant connection may not send.
 *
 * Covers: the last-separator rule, configurable (multi-character)
 * separators, the default tenant pattern from config.ts (letters, digits,
 * `_`, `-`, 1–63 chars) and custom patterns, every rejection (no user, no
 * separator, empty role, empty / bad / too long tenant) with a hint on how to
 * connect and no control characters echoed, the superuser bypass, and
 * forbiddenStartupParameter / optionSettings: the protected setting and the
 * role caught as parameters (any case) and inside `options` in every switch
 * form Postgres accepts (`-c x=y`, `-cx=y`, `--x=y`, escaped spaces), while
 * harmless options and parameters pass.
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { resolveConfig } from "../../src/config.ts";
import { forbiddenStartupParameter, optionSettings, printable, resolveIdentity, startupSettings, type IdentityRules } from "../../src/tenant/identity.ts";

const ENV = { MULTIGRES_CONTEXT_SECRET: "s".repeat(32), MULTIGRES_AUTH_FILE: "/etc/multigres/userlist.txt" };
const defaults = resolveConfig({ env: ENV });
const rules: IdentityRules = {
  separator: defaults.separator,
  tenantPattern: defaults.tenantPattern,
  superusers: defaults.superusers,
};
/** What the lifecycle protects (src/proxy/lifecycle.ts passes this list). */
const PROTECTED = [defaults.tenantSetting, "role", "session_authorization"];

function rejected(user: string | undefined, r: IdentityRules = rules): { message: string; hint: string } {
  const id = resolveIdentity(user, r);
  expect(id.kind).toBe("rejected");
  if (id.kind !== "rejected") throw new Error("unreachable");
  return id;
}

describe("resolveIdentity: tenant users", () => {
  test("role.tenant", () => {
    expect(resolveIdentity("app_user.tenant_abc", rules)).toEqual({
      kind: "tenant",
      user: "app_user.tenant_abc",
      role: "app_user",
      tenant: "tenant_abc",
    });
  });

  test("the tenant follows the LAST separator; the role may contain it", () => {
    expect(resolveIdentity("my.app.user.t-1", rules)).toMatchObject({ kind: "tenant", role: "my.app.user", tenant: "t-1" });
  });

  test("a configurable multi-character separator", () => {
    const r = { ...rules, separator: "__" };
    expect(resolveIdentity("app__user__acme", r)).toMatchObject({ kind: "tenant", role: "app__user", tenant: "acme" });
    expect(resolveIdentity("app.user__acme", r)).toMatchObject({ kind: "tenant", role: "app.user", tenant: "acme" });
    // With "__" configured, "." is just part of the name: no tenant.
    const { message, hint } = rejected("app_user.acme", r);
    expect(message).toMatch(/no tenant/);
    expect(hint).toContain('app_user__tenant_abc');
  });

  test("other separators: '@', '#', '::'", () => {
    for (const sep of ["@", "#", "::"]) {
      expect(resolveIdentity(`app_user${sep}t1`, { ...rules, separator: sep })).toMatchObject({ role: "app_user", tenant: "t1" });
    }
  });

  test("tenant ids: letters, digits, _ and - up to 63 characters", () => {
    for (const tenant of ["a", "A", "0", "_", "-", "Tenant_42-x", "x".repeat(63)]) {
      expect(resolveIdentity(`app_user.${tenant}`, rules)).toMatchObject({ kind: "tenant", tenant });
    }
  });

  test("property: any role, separator-free valid tenant → exactly that role and tenant", () => {
    const tenant = fc.stringMatching(/^[A-Za-z0-9_-]{1,63}$/);
    const role = fc.string({ minLength: 1, maxLength: 30 }).filter((r) => r !== "postgres");
    fc.assert(
      fc.property(role, tenant, (role, tenant) => {
        const user = `${role}.${tenant}`;
        expect(resolveIdentity(user, rules)).toEqual({ kind: "tenant", user, role, tenant });
      }),
      { numRuns: 1000 },
    );
  });
});

describe("resolveIdentity: rejections", () => {
  test("no user, or an empty one", () => {
    expect(rejected(undefined).message).toMatch(/no user/);
    expect(rejected("").message).toMatch(/no user/);
  });

  test("no separator: no tenant, and the hint says how to connect", () => {
    const { message, hint } = rejected("app_user");
    expect(message).toMatch(/no tenant/);
    expect(hint).toContain("app_user.tenant_abc");
  });

  test("empty tenant", () => {
    expect(rejected("app_user.").message).toMatch(/invalid tenant/);
  });

  test("empty role", () => {
    expect(rejected(".tenant_a").message).toMatch(/no role/);
  });

  test("characters outside the pattern", () => {
    for (const bad of ["bad!tenant", "a b", "tenant'; DROP TABLE notes; --", "t\u00e9nant", "t/1", "t\u0000x", "t\nx"]) {
      const { message, hint } = rejected(`app_user.${bad}`);
      expect(message).toMatch(/invalid tenant id/);
      expect(hint).toContain(rules.tenantPattern.source);
    }
  });

  test("64 characters is one too many", () => {
    expect(rejected(`app_user.${"x".repeat(64)}`).message).toMatch(/invalid tenant/);
  });

  test("the message never echoes control characters and is bounded", () => {
    const { message } = rejected(`app_user.\u0001\u001b[31mred\u007f${"y".repeat(500)}`);
    expect(message).not.toMatch(/[\u0000-\u001f\u007f]/);
    expect(message.length).toBeLessThan(200);
  });

  test("property: a tenant with a character outside [A-Za-z0-9_-] is always rejected", () => {
    const bad = fc
      .string({ unit: "binary", minLength: 1, maxLength: 70 })
      .filter((t) => !t.includes(".") && !/^[A-Za-z0-9_-]{1,63}$/.test(t));
    fc.assert(
      fc.property(bad, (t) => {
        expect(resolveIdentity(`app_user.${t}`, rules).kind).toBe("rejected");
      }),
      { numRuns: 2000 },
    );
  });

  test("a custom pattern (anchored by the config) is applied in full", () => {
    const custom = resolveConfig({ flags: { "tenant-pattern": "t[0-9]+" }, env: ENV }).tenantPattern;
    const r = { ...rules, tenantPattern: custom };
    expect(resolveIdentity("app_user.t42", r)).toMatchObject({ tenant: "t42" });
    expect(resolveIdentity("app_user.xt42", r).kind).toBe("rejected");
    expect(resolveIdentity("app_user.t42x", r).kind).toBe("rejected");
  });
});

describe("resolveIdentity: superuser bypass", () => {
  test("configured superusers pass through untouched", () => {
    expect(resolveIdentity("postgres", rules)).toEqual({ kind: "superuser", user: "postgres" });
    const r = { ...rules, superusers: ["admin", "migrator.bot"] };
    expect(resolveIdentity("admin", r)).toEqual({ kind: "superuser", user: "admin" });
    // Exact match: a superuser name containing the separator is not split.
    expect(resolveIdentity("migrator.bot", r)).toEqual({ kind: "superuser", user: "migrator.bot" });
    // No longer a superuser once removed from the list.
    expect(resolveIdentity("postgres", r).kind).toBe("rejected");
  });

  test("the bypass is by exact name, not prefix or case", () => {
    expect(resolveIdentity("Postgres", rules).kind).toBe("rejected");
    expect(resolveIdentity("postgres_evil", rules).kind).toBe("rejected");
    // postgres.tenant is a tenant connection for the role postgres, not a bypass.
    expect(resolveIdentity("postgres.tenant_a", rules)).toMatchObject({ kind: "tenant", role: "postgres", tenant: "tenant_a" });
  });
});

describe("forbiddenStartupParameter", () => {
  const check = (params: Record<string, string>) => forbiddenStartupParameter(new Map(Object.entries(params)), PROTECTED);

  test("the protected setting as a parameter, in any case", () => {
    expect(check({ user: "u.t", "app.current_tenant_id": "other" })).toBe("app.current_tenant_id");
    expect(check({ user: "u.t", "APP.Current_Tenant_ID": "other" })).toBe("APP.Current_Tenant_ID");
  });

  test("role and session_authorization as parameters, in any case", () => {
    expect(check({ role: "postgres" })).toBe("role");
    expect(check({ ROLE: "postgres" })).toBe("ROLE");
    expect(check({ session_authorization: "postgres" })).toBe("session_authorization");
  });

  test("a custom tenant setting name is protected instead", () => {
    expect(forbiddenStartupParameter(new Map([["acme.tenant", "x"]]), ["acme.tenant", "role"])).toBe("acme.tenant");
    expect(forbiddenStartupParameter(new Map([["app.current_tenant_id", "x"]]), ["acme.tenant", "role"])).toBeUndefined();
  });

  const forbiddenOptions = [
    "-c role=x",
    "-crole=x",
    "--role=x",
    "-c ROLE=x",
    "-c app.current_tenant_id=x",
    "-capp.current_tenant_id=x",
    "--app.current_tenant_id=x",
    "-c app.current_tenant_id=a\\ b", // escaped space inside the value
    "-c statement_timeout=5s -c role=x", // after a harmless one
    "  -c\trole=x  ",
    "-c application_name=my\\ app -c app.current_tenant_id=other\\ tenant",
    "--session-authorization=postgres", // Postgres reads dashes in names as underscores
    "-c app.current-tenant-id=x",
    "--session_authorization=postgres",
    "-c session_authorization=postgres",
  ];
  for (const options of forbiddenOptions) {
    test(`options=${JSON.stringify(options)} is caught`, () => {
      const hit = check({ user: "u.t", options });
      expect(hit).toBeString();
      expect(hit).toStartWith("options");
    });
  }

  const allowed: Record<string, string>[] = [
    { options: "-c statement_timeout=5s" },
    { options: "-c search_path=public,app -c work_mem=64MB" },
    { options: "-c application_name=role=x" }, // "role" as a value, not a name
    { options: "-c rolex=1" },
    { options: "--rolename=1" },
    { options: "" },
    { application_name: "controller" },
    { application_name: "role" },
    { client_encoding: "UTF8", DateStyle: "ISO, MDY", TimeZone: "UTC", extra_float_digits: "3" },
    { user: "app_user.role", database: "role" },
  ];
  for (const params of allowed) {
    test(`${JSON.stringify(params)} is allowed`, () => {
      expect(check(params)).toBeUndefined();
    });
  }
});

describe("optionSettings", () => {
  test("every switch form, in order", () => {
    expect(optionSettings("-c a=1 -cb=2 --c-d=3")).toEqual(["a", "b", "c-d"]);
  });

  test("backslash escapes whitespace and itself", () => {
    expect(optionSettings("-c search_path=a\\ b -c x=\\\\")).toEqual(["search_path", "x"]);
  });

  test("other switches and stray words name no setting", () => {
    expect(optionSettings("-B 100 foo -c")).toEqual([]);
    expect(optionSettings("")).toEqual([]);
  });

  test("property: never throws on arbitrary strings", () => {
    fc.assert(
      fc.property(fc.string({ unit: "binary", maxLength: 80 }), (s) => {
        expect(Array.isArray(optionSettings(s))).toBe(true);
      }),
      { numRuns: 2000 },
    );
  });

  test("property: a protected name hidden among harmless settings is always found", () => {
    const harmless = fc.stringMatching(/^[a-z_]{1,12}=[a-z0-9]{0,6}$/).filter((s) => !/^(role|session_authorization)=/.test(s));
    const form = fc.constantFrom((s: string) => `-c ${s}`, (s: string) => `-c${s}`, (s: string) => `--${s}`);
    fc.assert(
      fc.property(
        fc.array(fc.tuple(form, harmless), { maxLength: 4 }),
        fc.array(fc.tuple(form, harmless), { maxLength: 4 }),
        form,
        fc.constantFrom("role=postgres", "app.current_tenant_id=other", "ROLE=x", "App.Current_Tenant_Id=y"),
        fc.constantFrom(" ", "  ", "\t"),
        (before, after, f, bad, ws) => {
          const opt = [...before.map(([g, s]) => g(s)), f(bad), ...after.map(([g, s]) => g(s))].join(ws);
          expect(forbiddenStartupParameter(new Map([["options", opt]]), PROTECTED)).toBeString();
          const onlyHarmless = [...before, ...after].map(([g, s]) => g(s)).join(ws);
          expect(forbiddenStartupParameter(new Map([["options", onlyHarmless]]), PROTECTED)).toBeUndefined();
        },
      ),
      { numRuns: 1000 },
    );
  });
});

describe("startupSettings", () => {
  test("every value given: parameters in any case, and -c / -- in options", () => {
    const p = (o: Record<string, string>) => new Map(Object.entries(o));
    expect(startupSettings(p({ client_encoding: "UTF8", CLIENT_ENCODING: "SJIS", options: "-c client_encoding=BIG5 --Client-Encoding=GBK" }), "client_encoding")).toEqual(["UTF8", "SJIS", "BIG5", "GBK"]);
    expect(startupSettings(p({ application_name: "x" }), "client_encoding")).toEqual([]);
  });
});

describe("printable", () => {
  test("line breaks, C1 controls, Unicode separators and bidi overrides become ?; long input is clipped", () => {
    expect(printable("a\nb\r\u0085c\u009b31m\u2028d\u2029e\u202ef\u2066g")).toBe("a?b??c?31m?d?e?f?g");
    expect(printable("x".repeat(100))).toBe(`${"x".repeat(80)}…`);
    expect(printable("ordinary é ü 名前")).toBe("ordinary é ü 名前");
  });
});
