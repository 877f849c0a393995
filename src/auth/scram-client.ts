/**
 * The client half of SCRAM-SHA-256: the proxy logging in to PostgreSQL
 * with its own upstream credential (or, with --auth passthrough, for a TLS
 * client whose channel-binding flag PostgreSQL would reject; see
 * proxy/lifecycle.ts). Without channel binding (gs2 header "n,,"): a
 * server that offers -PLUS accepts a client that says it does not support
 * it. Pure functions: nonce in, messages out.
 */
import { randomBytes, timingSafeEqual } from "node:crypto";
import { attributes, hmac, saltedPassword, sha256, xor } from "./scram.ts";

export interface ScramClient {
  password: string;
  clientNonce: string;
  clientFirstBare: string;
  /** Set once the server's first message arrived. */
  serverSignature?: Buffer;
}

const GS2_HEADER = "n,,"; // no channel binding, no authzid

/**
 * SaltedPassword by (password, salt, iterations). PostgreSQL keeps one salt
 * per role, so after the first login of a role the proxy need not spend a
 * millisecond of PBKDF2 on the event loop for every new server connection.
 * Holding it is no worse than holding the password it comes from.
 */
const salted = new Map<string, Buffer>();
const SALTED_CACHE_SIZE = 64;

function saltedFor(password: string, salt: string, iterations: number): Buffer {
  const key = `${iterations}\0${salt}\0${password}`;
  let value = salted.get(key);
  if (!value) {
    value = saltedPassword(password, Buffer.from(salt, "base64"), iterations);
    if (salted.size >= SALTED_CACHE_SIZE) salted.delete(salted.keys().next().value!);
    salted.set(key, value);
  }
  return value;
}

export function scramStart(
  password: string,
  nonce = randomBytes(18).toString("base64"),
  // PostgreSQL ignores the SCRAM user name (it uses the startup user).
  user = "",
): { state: ScramClient; clientFirst: string } {
  const clientFirstBare = `n=${user},r=${nonce}`;
  return { state: { password, clientNonce: nonce, clientFirstBare }, clientFirst: GS2_HEADER + clientFirstBare };
}

/** From the server-first-message, the client-final-message (with proof). */
export function scramContinue(state: ScramClient, serverFirst: string): string {
  const attrs = attributes(serverFirst);
  const nonce = attrs.get("r");
  const salt = attrs.get("s");
  const iterations = Number(attrs.get("i"));
  if (!nonce || !salt || !Number.isInteger(iterations) || iterations < 1) throw new Error("malformed SCRAM server-first-message");
  if (!nonce.startsWith(state.clientNonce) || nonce.length === state.clientNonce.length) {
    throw new Error("SCRAM server nonce does not extend the client nonce");
  }
  const saltedPw = saltedFor(state.password, salt, iterations);
  const clientKey = hmac(saltedPw, "Client Key");
  const withoutProof = `c=${Buffer.from(GS2_HEADER).toString("base64")},r=${nonce}`;
  const authMessage = `${state.clientFirstBare},${serverFirst},${withoutProof}`;
  const proof = xor(clientKey, hmac(sha256(clientKey), authMessage));
  state.serverSignature = hmac(hmac(saltedPw, "Server Key"), authMessage);
  return `${withoutProof},p=${proof.toString("base64")}`;
}

/** Checks the server-final-message: the server proved it knows the verifier. */
export function scramVerify(state: ScramClient, serverFinal: string): boolean {
  const v = attributes(serverFinal).get("v");
  if (!v || !state.serverSignature) return false;
  const got = Buffer.from(v, "base64");
  return got.length === state.serverSignature.length && timingSafeEqual(got, state.serverSignature);
}
