/**
 * MD5 password answer (src/auth/md5.ts): 'md5' || md5(md5(password || user) || salt),
 * checked against values computed independently with coreutils:
 *
 *   inner=$(printf '%s' "md5-user-pwmd5_user" | md5sum | cut -d' ' -f1)
 *   { printf '%s' "$inner"; printf '\x01\x02\x03\x04'; } | md5sum
 *
 * `inner` is also what PostgreSQL stores in pg_authid for an MD5 password
 * ('md5' || md5(password || user)).
 */
import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { md5PasswordResponse } from "../../src/auth/md5.ts";

describe("md5PasswordResponse", () => {
  test("known values", () => {
    expect(md5PasswordResponse("md5_user", "md5-user-pw", Uint8Array.of(1, 2, 3, 4))).toBe("md5fbacf707a31cb8bd1e90fa657de62496");
    expect(md5PasswordResponse("app_user", "secret", Uint8Array.of(0xde, 0xad, 0xbe, 0xef))).toBe("md5be6901bcff54e7e3b1bbaaca2fc5fde0");
  });

  test("the salt is used as raw bytes, not as text", () => {
    // Same salt as text "1234" would give a different answer.
    expect(md5PasswordResponse("md5_user", "md5-user-pw", new TextEncoder().encode("\x01\x02\x03\x04"))).toBe(
      "md5fbacf707a31cb8bd1e90fa657de62496",
    );
    expect(md5PasswordResponse("md5_user", "md5-user-pw", new TextEncoder().encode("1234"))).not.toBe(
      "md5fbacf707a31cb8bd1e90fa657de62496",
    );
  });

  test("the user name is part of the hash: the rewritten name gives another answer", () => {
    const salt = Uint8Array.of(9, 8, 7, 6);
    expect(md5PasswordResponse("app_user", "pw", salt)).not.toBe(md5PasswordResponse("app_user.tenant_a", "pw", salt));
  });

  test("property: always 'md5' and 32 lowercase hex digits, deterministic, salt-sensitive", () => {
    fc.assert(
      fc.property(fc.string(), fc.string(), fc.uint8Array({ minLength: 4, maxLength: 4 }), fc.uint8Array({ minLength: 4, maxLength: 4 }), (user, pw, s1, s2) => {
        const a = md5PasswordResponse(user, pw, s1);
        expect(a).toMatch(/^md5[0-9a-f]{32}$/);
        expect(md5PasswordResponse(user, pw, s1)).toBe(a);
        if (s1.some((b, i) => b !== s2[i])) expect(md5PasswordResponse(user, pw, s2)).not.toBe(a);
      }),
      { numRuns: 300 },
    );
  });
});
