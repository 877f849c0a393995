import { describe, expect, test } from "bun:test";
import { scramContinue, scramStart, scramVerify } from "../../src/auth/scram.ts";

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
