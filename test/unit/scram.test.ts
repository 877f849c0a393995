import { describe, expect, test } from "bun:test";
import fc from "fast-check";
import { scramContinue, scramStart, scramVerify } from "../../src/auth/scram-client.ts";
import { ScramServer } from "../../src/auth/scram-server.ts";
import { buildVerifier, formatVerifier, parseVerifier, saslPrep } from "../../src/auth/scram.ts";
import { AuthAnswers } from "../harness/scram.ts";

/**
 * SCRAM-SHA-256, both halves (src/auth/scram*.ts): the RFC 7677 example
 * from either side, our client against our server and against the test
 * harness's independent client, SASLprep, the refusals PostgreSQL makes,
 * channel binding, and pg_authid verifiers.
 */

// RFC 7677 §3: the SCRAM-SHA-256 example exchange.
const NONCE = "rOprNGfwEbeRWgbNEkqO";
const SERVER_FIRST = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
const CLIENT_FINAL = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
const SERVER_FINAL = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

describe("SCRAM-SHA-256 client", () => {
  test("reproduces the RFC 7677 example exchange", () => {
    const { state, clientFirst } = scramStart("pencil", NONCE, "user");
    expect(clientFirst).toBe(`n,,n=user,r=${NONCE}`);
    expect(scramContinue(state, SERVER_FIRST)).toBe(CLIENT_FINAL);
    expect(scramVerify(state, SERVER_FINAL)).toBe(true);
  });

  test("a wrong server signature does not verify", () => {
    const { state } = scramStart("pencil", NONCE, "user");
    scramContinue(state, SERVER_FIRST);
    expect(scramVerify(state, "v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")).toBe(false);
    expect(scramVerify(state, "e=invalid-proof")).toBe(false);
  });

  test("a server nonce that does not extend the client's is refused", () => {
    const { state } = scramStart("pencil", NONCE);
    expect(() => scramContinue(state, "r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")).toThrow(/nonce/);
    expect(() => scramContinue(state, `r=${NONCE},s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096`)).toThrow(/nonce/);
    expect(() => scramContinue(state, `r=${NONCE}x,i=4096`)).toThrow(/malformed/);
  });

  test("the default user name is empty, as PostgreSQL expects", () => {
    expect(scramStart("pw", "abc").clientFirst).toBe("n,,n=,r=abc");
  });
});


const SALT = Buffer.from("W22ZaJ0SNY7soEsUEjb6gQ==", "base64");
const SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";

describe("SCRAM-SHA-256 server", () => {
  test("reproduces the server side of the RFC 7677 example exchange", () => {
    const server = new ScramServer({ verifier: buildVerifier("pencil", SALT, 4096), nonce: SERVER_NONCE });
    expect(server.first("SCRAM-SHA-256", `n,,n=user,r=${NONCE}`)).toEqual({ ok: true, message: SERVER_FIRST });
    expect(server.final(CLIENT_FINAL)).toEqual({ ok: true, message: SERVER_FINAL });
  });

  test("a wrong proof is 'password does not match'", () => {
    const server = new ScramServer({ verifier: buildVerifier("not-pencil", SALT, 4096), nonce: SERVER_NONCE });
    expect(server.first("SCRAM-SHA-256", `n,,n=user,r=${NONCE}`).ok).toBe(true);
    expect(server.final(CLIENT_FINAL)).toEqual({ ok: false, reason: "password does not match" });
  });

  test("property: our client and our server agree on any password; another password never passes", () => {
    fc.assert(
      fc.property(fc.string({ minLength: 1, maxLength: 24 }), fc.string({ minLength: 1, maxLength: 24 }), (password, other) => {
        const verifier = buildVerifier(password, SALT, 64);
        const run = (pw: string) => {
          const server = new ScramServer({ verifier });
          const { state, clientFirst } = scramStart(pw);
          const first = server.first("SCRAM-SHA-256", clientFirst);
          if (!first.ok) throw new Error(first.reason);
          const final = server.final(scramContinue(state, first.message));
          return final.ok && scramVerify(state, final.message);
        };
        expect(run(password)).toBe(true);
        if (saslPrep(other) !== saslPrep(password)) expect(run(other)).toBe(false);
      }),
      { numRuns: 200 },
    );
  });

  test("the test harness's independent client logs in against it", () => {
    const verifier = buildVerifier("pässwörd ✓", SALT, 4096);
    const server = new ScramServer({ verifier });
    const client = new AuthAnswers("pässwörd ✓");
    const sasl = Buffer.concat([Buffer.from([0, 0, 0, 10]), Buffer.from("SCRAM-SHA-256\0\0")]);
    const initial = client.answer(sasl)!;
    // 'p', length, mechanism\0, int32 length, data
    const data = initial.subarray(5 + "SCRAM-SHA-256\0".length + 4).toString();
    const first = server.first("SCRAM-SHA-256", data);
    if (!first.ok) throw new Error(first.reason);
    const response = client.answer(Buffer.concat([Buffer.from([0, 0, 0, 11]), Buffer.from(first.message)]))!;
    const final = server.final(response.subarray(5).toString());
    if (!final.ok) throw new Error(final.reason);
    client.answer(Buffer.concat([Buffer.from([0, 0, 0, 12]), Buffer.from(final.message)]));
    expect(client.serverVerified).toBe(true);
  });

  test("SASLprep: NFKC and mapping to nothing, and the password as it is when prohibited (as PostgreSQL)", () => {
    expect(saslPrep("I\u00ADX")).toBe("IX"); // soft hyphen mapped to nothing
    expect(saslPrep("\u2168")).toBe("IX"); // roman numeral nine, NFKC
    expect(saslPrep("a\u0007b")).toBe("a\u0007b"); // ASCII: unchanged
    expect(saslPrep("\u0627\u0031")).toBe("\u0627\u0031"); // bidi rule broken: prohibited, kept as is
  });

  describe("refuses what PostgreSQL refuses", () => {
    const verifier = buildVerifier("pencil", SALT, 4096);
    const cases: [string, string, string, RegExp][] = [
      ["an unknown mechanism", "SCRAM-SHA-1", `n,,n=,r=${NONCE}`, /invalid SASL authentication mechanism/],
      ["-PLUS when binding is not offered", "SCRAM-SHA-256-PLUS", `p=tls-server-end-point,,n=,r=${NONCE}`, /invalid SASL authentication mechanism/],
      ["a client that requires binding on plain SCRAM", "SCRAM-SHA-256", `p=tls-server-end-point,,n=,r=${NONCE}`, /requires SCRAM channel binding/],
      ["an authzid", "SCRAM-SHA-256", `n,a=admin,n=,r=${NONCE}`, /authorization identity/],
      ["no GS2 header", "SCRAM-SHA-256", "n=,r=abc", /malformed/],
      ["a missing nonce", "SCRAM-SHA-256", "n,,n=", /invalid nonce/],
      ["a nonce with a comma-free but unprintable character", "SCRAM-SHA-256", "n,,n=,r=a\u0001b", /invalid nonce/],
      ["a mandatory extension", "SCRAM-SHA-256", `n,,m=ext,n=,r=${NONCE}`, /unsupported SCRAM extension/],
    ];
    for (const [what, mechanism, message, reason] of cases) {
      test(what, () => {
        const r = new ScramServer({ verifier }).first(mechanism, message);
        expect(r.ok).toBe(false);
        expect(!r.ok && r.reason).toMatch(reason);
      });
    }

    test("a final message with the wrong nonce, binding data or no proof", () => {
      const start = () => {
        const s = new ScramServer({ verifier, nonce: SERVER_NONCE });
        s.first("SCRAM-SHA-256", `n,,n=user,r=${NONCE}`);
        return s;
      };
      const nonce = `${NONCE}${SERVER_NONCE}`;
      expect(start().final(`c=biws,r=${nonce}x,p=AAAA`)).toEqual({ ok: false, reason: "SCRAM nonce mismatch" });
      expect(start().final(`c=eSws,r=${nonce},p=AAAA`)).toEqual({ ok: false, reason: "SCRAM channel binding check failed" });
      expect(start().final(`c=biws,r=${nonce}`).ok).toBe(false);
      expect(start().final(`c=biws,r=${nonce},p=AAAA`).ok).toBe(false);
    });
  });

  describe("channel binding (SCRAM-SHA-256-PLUS)", () => {
    const verifier = buildVerifier("pencil", SALT, 4096);
    const binding = Buffer.alloc(32, 7);

    test("offered first when there is binding data; verified against it", () => {
      expect(ScramServer.mechanisms(binding)).toEqual(["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]);
      expect(ScramServer.mechanisms(undefined)).toEqual(["SCRAM-SHA-256"]);
      const header = "p=tls-server-end-point,,";
      for (const [data, ok] of [[binding, true], [Buffer.alloc(32, 8), false]] as const) {
        const s = new ScramServer({ verifier, channelBinding: binding, nonce: SERVER_NONCE });
        expect(s.first("SCRAM-SHA-256-PLUS", `${header}n=,r=${NONCE}`).ok).toBe(true);
        const c = Buffer.concat([Buffer.from(header), data]).toString("base64");
        const r = s.final(`c=${c},r=${NONCE}${SERVER_NONCE},p=AAAA`);
        // The proof is wrong either way; what differs is whether the binding passed first.
        expect(!r.ok && r.reason).toBe(ok ? "malformed SCRAM message (invalid proof)" : "SCRAM channel binding check failed");
      }
    });

    test("'y' (client could bind, thinks we cannot) is a downgrade when we can, and fine when we cannot", () => {
      expect(new ScramServer({ verifier, channelBinding: binding }).first("SCRAM-SHA-256", `y,,n=,r=${NONCE}`).ok).toBe(false);
      expect(new ScramServer({ verifier }).first("SCRAM-SHA-256", `y,,n=,r=${NONCE}`).ok).toBe(true);
    });
  });
});

describe("SCRAM verifiers (pg_authid.rolpassword)", () => {
  test("parse and format round-trip; the RFC example's keys", () => {
    const v = buildVerifier("pencil", SALT, 4096);
    const text = formatVerifier(v);
    expect(text).toMatch(/^SCRAM-SHA-256\$4096:W22ZaJ0SNY7soEsUEjb6gQ==\$[A-Za-z0-9+/=]{44}:[A-Za-z0-9+/=]{44}$/);
    expect(parseVerifier(text)).toEqual(v);
  });

  test("malformed verifiers are not verifiers", () => {
    for (const bad of ["", "md5abc", "SCRAM-SHA-256$x:abc$def:ghi", "SCRAM-SHA-256$4096:W22Z$AAAA:AAAA", "SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==$" + "A".repeat(43) + "=:" + "A".repeat(43) + "="]) {
      expect(parseVerifier(bad)).toBeUndefined();
    }
  });
});

describe("SCRAM server on arbitrary input", () => {
  test("property: first() and final() never throw, and nothing but the right proof is accepted", () => {
    const verifier = buildVerifier("pencil", SALT, 64);
    fc.assert(
      fc.property(fc.string({ maxLength: 40 }), fc.string({ maxLength: 200 }), fc.string({ maxLength: 200 }), (mechanism, first, final) => {
        const s = new ScramServer({ verifier, channelBinding: Buffer.alloc(32, 1) });
        const r1 = s.first(mechanism, first);
        if (r1.ok) expect(s.final(final).ok).toBe(false);
      }),
      { numRuns: 2000 },
    );
  });
});
