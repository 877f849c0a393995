/**
 * Where client passwords are checked against (src/auth/*): the userlist
 * format, tenant tokens, the lookup order of Credentials (exact entry,
 * then shared role entry or token, then a mock), cleartext checks, and
 * tls-server-end-point channel binding data against openssl, and one
 * client's exchange (ClientAuth) from offer to Ok or 28P01.
 */
import { describe, expect, test } from "bun:test";
import { createHmac } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import { authFileLine, parseAuthFile } from "../../src/auth/auth-file.ts";
import { signatureAlgorithm, tlsServerEndPoint } from "../../src/auth/channel-binding.ts";
import { Credentials, CredentialsBusy, CredentialsError } from "../../src/auth/credentials.ts";
import { ScramServer } from "../../src/auth/scram-server.ts";
import { scramContinue, scramStart } from "../../src/auth/scram-client.ts";
import { buildVerifier, formatVerifier, type ScramVerifier } from "../../src/auth/scram.ts";
import { parseDuration, permanentToken, tenantToken, verifyTenantToken } from "../../src/auth/token.ts";
import { ClientAuth } from "../../src/proxy/client-auth.ts";

const TOKEN_SECRET = "t".repeat(40);

describe("auth file (PgBouncer userlist)", () => {
  test("two quoted fields per line, \"\" for a quote, comments and blank lines skipped, the rest of a line ignored", () => {
    const { entries, problems } = parseAuthFile(`; comment\n# another\n\n"app_user" "pw"\n  "a""b.t1"   "p""w"  extra ignored\n`);
    expect(problems).toEqual([]);
    expect(entries.map(({ user, secret }) => [user, secret])).toEqual([
      ["app_user", "pw"],
      ['a"b.t1', 'p"w'],
    ]);
  });

  test("malformed lines, empty names and duplicates are problems with line numbers, never the secret", () => {
    const { problems } = parseAuthFile(`"ok" "s3cret"\napp_user s3cret\n"" "s3cret"\n"ok" "other-s3cret"\n"open "s3cret"\n`);
    expect(problems).toEqual([
      'line 2: expected "user" "password" (two double-quoted fields)',
      "line 3: empty user name",
      'line 4: "ok" is listed twice',
      'line 5: expected "user" "password" (two double-quoted fields)',
    ]);
    expect(problems.join("\n")).not.toContain("s3cret");
  });

  test("property: authFileLine writes what parseAuthFile reads", () => {
    fc.assert(
      fc.property(fc.string({ minLength: 1 }).filter((s) => !/[\r\n]/.test(s)), fc.string().filter((s) => !/[\r\n]/.test(s)), (user, secret) => {
        const { entries, problems } = parseAuthFile(authFileLine(user, secret));
        expect(problems).toEqual([]);
        expect(entries.map((e) => [e.user, e.secret])).toEqual([[user, secret]]);
      }),
    );
  });
});

describe("tenant tokens", () => {
  test("mgt1.<expires>.<base64url HMAC-SHA256(secret, label, role, tenant, expires)>, computed independently", () => {
    const mac = createHmac("sha256", TOKEN_SECRET).update("multigres tenant token v1\0app_user\0acme\x000").digest("base64url");
    expect(tenantToken(TOKEN_SECRET, "app_user", "acme")).toBe(`mgt1.0.${mac}`);
    expect(permanentToken(TOKEN_SECRET, "app_user", "acme")).toBe(`mgt1.0.${mac}`);
    const now = Date.UTC(2026, 0, 1);
    const expires = now / 1000 + 3600;
    const mac2 = createHmac("sha256", TOKEN_SECRET).update(`multigres tenant token v1\0app_user\0acme\0${expires}`).digest("base64url");
    expect(tenantToken(TOKEN_SECRET, "app_user", "acme", { ttlSeconds: 3600, now })).toBe(`mgt1.${expires}.${mac2}`);
  });

  test("a token checks for its role and tenant only, with its secret only, until it expires", () => {
    const now = Date.UTC(2026, 0, 1);
    const t = tenantToken(TOKEN_SECRET, "app_user", "a", { ttlSeconds: 60, now });
    expect(verifyTenantToken(TOKEN_SECRET, "app_user", "a", t, now)).toEqual({ ok: true, expires: now / 1000 + 60 });
    expect(verifyTenantToken(TOKEN_SECRET, "app_user", "b", t, now).ok).toBe(false);
    expect(verifyTenantToken(TOKEN_SECRET, "other_role", "a", t, now).ok).toBe(false);
    expect(verifyTenantToken(`${TOKEN_SECRET}x`, "app_user", "a", t, now).ok).toBe(false);
    const late = verifyTenantToken(TOKEN_SECRET, "app_user", "a", t, now + 60_000);
    expect(late).toEqual({ ok: false, reason: "the token expired at 2026-01-01T00:01:00.000Z" });
    // the expiry is covered by the MAC: extending it breaks the token
    const extended = t.replace(/^mgt1\.(\d+)\./, (_, e) => `mgt1.${Number(e) + 3600}.`);
    expect(verifyTenantToken(TOKEN_SECRET, "app_user", "a", extended, now).ok).toBe(false);
  });

  test("the role/tenant split is unambiguous: (a.b, c) and (a, b.c) get different tokens", () => {
    expect(tenantToken(TOKEN_SECRET, "a.b", "c")).not.toBe(tenantToken(TOKEN_SECRET, "a", "b.c"));
  });

  test("anything else is not a token, and the reason never repeats it", () => {
    for (const bad of ["", "hunter2", "mgt1.0.", "mgt1.x.abc", `mgt1.0.${"A".repeat(42)}`, `mgt2.0.${"A".repeat(43)}`]) {
      const r = verifyTenantToken(TOKEN_SECRET, "r", "t", bad);
      expect(r.ok).toBe(false);
      if (bad && !r.ok) expect(r.reason).not.toContain(bad);
    }
  });

  test("durations", () => {
    expect([parseDuration("90"), parseDuration("90s"), parseDuration("15m"), parseDuration("12h"), parseDuration("7d")]).toEqual([90, 90, 900, 43200, 604800]);
    for (const bad of ["", "1w", "-5s", "1.5h", "h"]) expect(() => parseDuration(bad)).toThrow(/not a duration/);
  });
});

/** Run a SCRAM exchange of our client with `password` against `verifier`. */
function scramLogin(verifier: ScramVerifier, password: string): boolean {
  const server = new ScramServer({ verifier });
  const { state, clientFirst } = scramStart(password);
  const first = server.first("SCRAM-SHA-256", clientFirst);
  if (!first.ok) throw new Error(first.reason);
  return server.final(scramContinue(state, first.message)).ok;
}

describe("Credentials", () => {
  const id = (user: string) => {
    const cut = user.lastIndexOf(".");
    return { user, role: user.slice(0, cut), tenant: user.slice(cut + 1) };
  };
  const stored = formatVerifier(buildVerifier("verifier-pw"));
  const file = (text: string) => ({ path: "/etc/multigres/userlist.txt", text });

  test("shared: the exact entry first, then the role's entry; unknown users get a mock that matches nothing", async () => {
    const c = await Credentials.load({
      authFile: file(`"app_user" "shared-pw"\n"app_user.vip" "vip-pw"\n"reader" "${stored}"\n`),
      tenantAuth: "shared",
    });
    expect(c.names.sort()).toEqual(["app_user", "app_user.vip", "reader"]);
    const login = async (user: string, password: string) => scramLogin(await c.scramVerifier(c.find(id(user)), id(user)), password);
    expect(await login("app_user.acme", "shared-pw")).toBe(true);
    expect(await login("app_user.vip", "vip-pw")).toBe(true);
    expect(await login("app_user.vip", "shared-pw")).toBe(false); // an exact entry replaces the shared one
    expect(await login("reader.acme", "verifier-pw")).toBe(true); // a verifier copied from pg_authid
    expect(c.find(id("nobody.acme"))).toEqual({ source: "none" });
    expect(await login("nobody.acme", "anything")).toBe(false);
    // the mock is stable per role, like a shared entry: the salt tells an outsider nothing
    const mock = (u: string) => c.scramVerifier(c.find(id(u)), id(u)) as ScramVerifier;
    expect(mock("nobody.acme").salt).toEqual(mock("nobody.globex").salt);
    expect(mock("nobody.acme").salt).not.toEqual(mock("other.acme").salt);
    // A tenant's own entry is not a role's shared entry: app_user.vip.x is no way in for vip's password.
    expect(c.find(id("app_user.vip.x"))).toEqual({ source: "none" });
    expect(await login("app_user.vip.x", "vip-pw")).toBe(false);
  });

  test("token: tokens for (role, tenant), exact entries still work, the role's entry does not", async () => {
    const c = await Credentials.load({ authFile: file(`"app_user" "shared-pw"\n"app_user.vip" "vip-pw"\n`), tenantAuth: "token", tokenSecret: TOKEN_SECRET });
    const login = async (user: string, password: string) => scramLogin(await c.scramVerifier(c.find(id(user)), id(user)), password);
    expect(await login("app_user.a", tenantToken(TOKEN_SECRET, "app_user", "a"))).toBe(true);
    expect(await login("app_user.b", tenantToken(TOKEN_SECRET, "app_user", "a"))).toBe(false);
    expect(await login("app_user.a", "shared-pw")).toBe(false);
    expect(await login("app_user.vip", "vip-pw")).toBe(true);
  });

  test("token verifiers not in the cache: a bounded number derived at once, the rest turned away, not queued without bound", async () => {
    const c = await Credentials.load({ tenantAuth: "token", tokenSecret: TOKEN_SECRET });
    const results = await Promise.allSettled(
      Array.from({ length: 200 }, (_, i) => c.scramVerifier(c.find(id(`app_user.t${i}`)), id(`app_user.t${i}`))),
    );
    const busy = results.filter((r) => r.status === "rejected");
    expect(results.length - busy.length).toBe(2 + 64);
    for (const r of busy) expect((r as PromiseRejectedResult).reason).toBeInstanceOf(CredentialsBusy);
    // Once the flood is over, a turned-away tenant is derived normally (its failure was not cached).
    expect(scramLogin(await c.scramVerifier(c.find(id("app_user.t199")), id("app_user.t199")), tenantToken(TOKEN_SECRET, "app_user", "t199"))).toBe(true);
  });

  test("cleartext: plain entries, verifiers and tokens with an expiry", async () => {
    const c = await Credentials.load({ authFile: file(`"app_user.p" "plain-pw"\n"app_user.v" "${stored}"\n`), tenantAuth: "token", tokenSecret: TOKEN_SECRET });
    const check = (user: string, pw: string) => c.checkPassword(c.find(id(user)), pw);
    expect(await check("app_user.p", "plain-pw")).toEqual({ ok: true });
    expect((await check("app_user.p", "plain-pw ")).ok).toBe(false);
    expect(await check("app_user.v", "verifier-pw")).toEqual({ ok: true });
    expect((await check("app_user.v", "wrong")).ok).toBe(false);
    expect((await check("app_user.t", tenantToken(TOKEN_SECRET, "app_user", "t", { ttlSeconds: 60 }))).ok).toBe(true);
    expect(await check("app_user.t", tenantToken(TOKEN_SECRET, "app_user", "t", { ttlSeconds: 60, now: Date.now() - 120_000 }))).toMatchObject({ ok: false, reason: expect.stringMatching(/expired/) });
  });

  test("a bad auth file is refused whole, every problem named, no secret shown", async () => {
    const err = await Credentials.load({
      authFile: file(`"a" "md5${"0".repeat(32)}"\n"b" "SCRAM-SHA-256$4096:abc$def"\n"c" ""\nbroken s3cret\n`),
      tenantAuth: "shared",
    }).catch((e) => e);
    expect(err).toBeInstanceOf(CredentialsError);
    const problems = (err as CredentialsError).problems;
    expect(problems).toHaveLength(4);
    expect(problems.join("\n")).toContain('"a" has an MD5 hash');
    expect(problems.join("\n")).toContain('"b" has a malformed SCRAM-SHA-256 verifier');
    expect(problems.join("\n")).toContain('"c" has an empty password');
    expect(problems.join("\n")).not.toContain("s3cret");
  });
});

describe("tls-server-end-point", () => {
  const dir = mkdtempSync(join(tmpdir(), "multigres-cb-"));
  const make = (name: string, keyArgs: string[], digest: string) => {
    const r = Bun.spawnSync(["openssl", "req", "-x509", ...keyArgs, "-nodes", `-${digest}`, "-days", "1", "-subj", "/CN=cb", "-keyout", join(dir, `${name}.key`), "-out", join(dir, `${name}.crt`)], { stderr: "pipe" });
    if (r.exitCode !== 0) throw new Error(r.stderr.toString());
    const der = Bun.spawnSync(["openssl", "x509", "-in", join(dir, `${name}.crt`), "-outform", "DER"], { stdout: "pipe" }).stdout;
    return { pem: readFileSync(join(dir, `${name}.crt`), "utf8"), der: Buffer.from(der) };
  };
  const hash = (algorithm: string, data: Buffer) => new Bun.CryptoHasher(algorithm as "sha256").update(data).digest();

  test("RSA with SHA-256: SHA-256 of the certificate's DER", () => {
    const { pem, der } = make("rsa", ["-newkey", "rsa:2048"], "sha256");
    expect(signatureAlgorithm(der)).toBe("1.2.840.113549.1.1.11");
    expect(Buffer.from(tlsServerEndPoint(pem)!)).toEqual(Buffer.from(hash("sha256", der)));
  });

  test("ECDSA with SHA-384: SHA-384 of it", () => {
    const { pem, der } = make("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"], "sha384");
    expect(signatureAlgorithm(der)).toBe("1.2.840.10045.4.3.3");
    expect(Buffer.from(tlsServerEndPoint(pem)!)).toEqual(Buffer.from(hash("sha384", der)));
  });

  test("Ed25519 (no hash of its own) and garbage: no binding offered", () => {
    const r = Bun.spawnSync(["openssl", "req", "-x509", "-newkey", "ed25519", "-nodes", "-days", "1", "-subj", "/CN=cb", "-keyout", join(dir, "ed.key"), "-out", join(dir, "ed.crt")], { stderr: "pipe" });
    expect(r.exitCode).toBe(0);
    expect(tlsServerEndPoint(readFileSync(join(dir, "ed.crt"), "utf8"))).toBeUndefined();
    expect(tlsServerEndPoint("not a certificate")).toBeUndefined();
    fc.assert(fc.property(fc.uint8Array({ maxLength: 200 }), (b) => void signatureAlgorithm(b)));
  });
});

describe("ClientAuth (one client's exchange at the proxy)", () => {
  const R = (m: Uint8Array) => Buffer.from(m).readInt32BE(5); // authentication code of an 'R' message
  const body = (m: Uint8Array) => Buffer.from(m).subarray(5);
  const initial = (mechanism: string, data: string) => {
    const d = Buffer.from(data);
    const len = Buffer.alloc(4);
    len.writeInt32BE(d.length);
    return Buffer.concat([Buffer.from(`${mechanism}\0`), len, d]);
  };
  const load = () => Credentials.load({ authFile: { path: "/u", text: `"app_user" "right-pw"\n` }, tenantAuth: "shared" });
  const acme = { user: "app_user.acme", role: "app_user", tenant: "acme" };

  async function scram(auth: ClientAuth, password: string) {
    const offer = auth.request();
    expect(R(offer)).toBe(10);
    const { state, clientFirst } = scramStart(password);
    const cont = await auth.message(initial("SCRAM-SHA-256", clientFirst));
    if (cont.kind !== "continue") return cont;
    expect(R(cont.send)).toBe(11);
    return auth.message(Buffer.from(scramContinue(state, body(cont.send).subarray(4).toString())));
  }

  test("SCRAM: the right password ends with SASLFinal and AuthenticationOk", async () => {
    const step = await scram(new ClientAuth(await load(), acme, "scram", undefined), "right-pw");
    expect(step.kind).toBe("ok");
    const send = Buffer.from((step as { send: Uint8Array }).send);
    expect([send.readInt32BE(5), send.readInt32BE(send.length - 4)]).toEqual([12, 0]); // SASLFinal …, then R Ok
  });

  test("SCRAM: a wrong password and an unknown user both end in 28P01 for the name as typed; the reasons differ (for the log)", async () => {
    const wrong = await scram(new ClientAuth(await load(), acme, "scram", undefined), "wrong-pw");
    expect(wrong).toMatchObject({ kind: "failed", reason: 'password does not match (auth file entry "app_user")', error: { code: "28P01", message: 'password authentication failed for user "app_user.acme"' } });
    const nobody = await scram(new ClientAuth(await load(), { user: "nobody.acme", role: "nobody", tenant: "acme" }, "scram", undefined), "x");
    expect(nobody).toMatchObject({ kind: "failed", reason: "no auth-file entry or token for this user", error: { code: "28P01" } });
  });

  test("cleartext: AuthenticationCleartextPassword, then Ok or 28P01; nothing after the end", async () => {
    const auth = new ClientAuth(await load(), acme, "password", undefined);
    expect(R(auth.request())).toBe(3);
    expect((await auth.message(Buffer.from("right-pw\0"))).kind).toBe("ok");
    expect((await auth.message(Buffer.from("right-pw\0"))).kind).toBe("failed");
    const bad = new ClientAuth(await load(), acme, "password", undefined);
    expect(await bad.message(Buffer.from("nope\0"))).toMatchObject({ kind: "failed", error: { code: "28P01" } });
  });

  test("a malformed SASLInitialResponse throws (the session answers 08P01)", async () => {
    const auth = new ClientAuth(await load(), acme, "scram", undefined);
    expect(() => auth.message(Buffer.from("SCRAM-SHA-256\0\0\0\0\x09abc"))).toThrow(/malformed SASLInitialResponse/);
  });
});
