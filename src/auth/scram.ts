/**
 * The client half of SCRAM-SHA-256 (RFC 5802, RFC 7677), for the one case
 * where the proxy must log in to PostgreSQL itself.
 *
 * Why: when both legs are TLS, PostgreSQL offers SCRAM-SHA-256-PLUS, the
 * proxy hides it (a client's channel binding would be to the wrong TLS
 * connection), and libpq then answers with gs2 flag "y" ("I support channel
 * binding but you don't offer it"), which PostgreSQL rejects as a downgrade.
 * The flag is covered by the client's proof, so it cannot be rewritten. So
 * for TLS clients the proxy takes the password over the client's TLS leg
 * and runs SCRAM upstream itself, without channel binding ("n").
 *
 * Pure functions: nonce in, messages out.
 */
import { createHash, createHmac, pbkdf2Sync, randomBytes, timingSafeEqual } from "node:crypto";

export interface ScramClient {
  password: string;
  clientNonce: string;
  clientFirstBare: string;
  /** Set once the server's first message arrived. */
  serverSignature?: Buffer;
}

export const SCRAM_MECHANISM = "SCRAM-SHA-256";
const GS2_HEADER = "n,,"; // no channel binding, no authzid

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
  const salted = pbkdf2Sync(saslPrep(state.password), Buffer.from(salt, "base64"), iterations, 32, "sha256");
  const clientKey = hmac(salted, "Client Key");
  const storedKey = createHash("sha256").update(clientKey).digest();
  const withoutProof = `c=${Buffer.from(GS2_HEADER).toString("base64")},r=${nonce}`;
  const authMessage = `${state.clientFirstBare},${serverFirst},${withoutProof}`;
  const signature = hmac(storedKey, authMessage);
  const proof = Buffer.alloc(32);
  for (let i = 0; i < 32; i++) proof[i] = clientKey[i]! ^ signature[i]!;
  state.serverSignature = hmac(hmac(salted, "Server Key"), authMessage);
  return `${withoutProof},p=${proof.toString("base64")}`;
}

/** Checks the server-final-message: the server proved it knows the verifier. */
export function scramVerify(state: ScramClient, serverFinal: string): boolean {
  const attrs = attributes(serverFinal);
  const v = attrs.get("v");
  if (!v || !state.serverSignature) return false;
  const got = Buffer.from(v, "base64");
  return got.length === state.serverSignature.length && timingSafeEqual(got, state.serverSignature);
}

function hmac(key: Buffer, data: string): Buffer {
  return createHmac("sha256", key).update(data).digest();
}

function attributes(message: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of message.split(",")) {
    const eq = part.indexOf("=");
    if (eq === 1) out.set(part[0]!, part.slice(2));
  }
  return out;
}

/**
 * PostgreSQL SASLpreps the password and, where that fails, uses it as is.
 * ASCII passwords are unchanged by SASLprep; for the rest NFKC is what its
 * mapping comes down to in practice.
 */
function saslPrep(password: string): string {
  // eslint-disable-next-line no-control-regex
  return /^[\x00-\x7f]*$/.test(password) ? password : password.normalize("NFKC");
}
