/**
 * SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL speaks it: the pieces
 * both halves share, and the stored verifier. Pure functions.
 *
 *   SaltedPassword = PBKDF2-SHA-256(SASLprep(password), salt, i)
 *   ClientKey = HMAC(SaltedPassword, "Client Key")   StoredKey = SHA-256(ClientKey)
 *   ServerKey = HMAC(SaltedPassword, "Server Key")
 *
 * The verifier PostgreSQL keeps in pg_authid.rolpassword is
 * `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64).
 * Whoever holds it can check a client's proof but cannot compute one.
 */
import { createHash, createHmac, pbkdf2, pbkdf2Sync, randomBytes } from "node:crypto";
import { saslprep } from "@mongodb-js/saslprep";

export const SCRAM_MECHANISM = "SCRAM-SHA-256";
export const SCRAM_PLUS_MECHANISM = "SCRAM-SHA-256-PLUS";
/** PostgreSQL's defaults for a new verifier (scram_iterations, SCRAM_DEFAULT_SALT_LEN). */
export const DEFAULT_ITERATIONS = 4096;
const SALT_BYTES = 16;

export interface ScramVerifier {
  iterations: number;
  salt: Buffer;
  storedKey: Buffer;
  serverKey: Buffer;
}

/**
 * PostgreSQL SASLpreps the password, and where that fails (prohibited or
 * unassigned code points, invalid UTF-8) uses it as it is; so do we, with a
 * maintained SASLprep implementation rather than an approximation.
 */
export function saslPrep(password: string): string {
  // eslint-disable-next-line no-control-regex
  if (/^[\x00-\x7f]*$/.test(password)) return password; // unchanged by SASLprep, as PostgreSQL shortcuts it
  try {
    return saslprep(password);
  } catch {
    return password;
  }
}

export function hmac(key: Uint8Array, data: string | Uint8Array): Buffer {
  return createHmac("sha256", key).update(data).digest();
}

export function sha256(data: Uint8Array): Buffer {
  return createHash("sha256").update(data).digest();
}

export function saltedPassword(password: string, salt: Uint8Array, iterations: number): Buffer {
  return pbkdf2Sync(saslPrep(password), salt, iterations, 32, "sha256");
}

/** The verifier of `password` (a random salt unless given). */
export function buildVerifier(password: string, salt: Uint8Array = randomBytes(SALT_BYTES), iterations = DEFAULT_ITERATIONS): ScramVerifier {
  return verifierFromSalted(saltedPassword(password, salt, iterations), salt, iterations);
}

/** buildVerifier off the event loop: PBKDF2 takes about a millisecond. */
export function buildVerifierAsync(password: string, salt: Uint8Array = randomBytes(SALT_BYTES), iterations = DEFAULT_ITERATIONS): Promise<ScramVerifier> {
  return new Promise((resolve, reject) =>
    pbkdf2(saslPrep(password), salt, iterations, 32, "sha256", (error, salted) =>
      error ? reject(error) : resolve(verifierFromSalted(salted, salt, iterations)),
    ),
  );
}

function verifierFromSalted(salted: Buffer, salt: Uint8Array, iterations: number): ScramVerifier {
  return {
    iterations,
    salt: Buffer.from(salt),
    storedKey: sha256(hmac(salted, "Client Key")),
    serverKey: hmac(salted, "Server Key"),
  };
}

const VERIFIER = /^SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)$/;

/** Parses a pg_authid-style verifier; undefined when `text` is not one. */
export function parseVerifier(text: string): ScramVerifier | undefined {
  const m = VERIFIER.exec(text);
  if (!m) return undefined;
  const iterations = Number(m[1]);
  const salt = Buffer.from(m[2]!, "base64");
  const storedKey = Buffer.from(m[3]!, "base64");
  const serverKey = Buffer.from(m[4]!, "base64");
  if (!Number.isSafeInteger(iterations) || iterations < 1 || salt.length === 0 || storedKey.length !== 32 || serverKey.length !== 32) {
    return undefined;
  }
  return { iterations, salt, storedKey, serverKey };
}

export function formatVerifier(v: ScramVerifier): string {
  return `SCRAM-SHA-256$${v.iterations}:${v.salt.toString("base64")}$${v.storedKey.toString("base64")}:${v.serverKey.toString("base64")}`;
}

/** Does `password` match the verifier? PBKDF2 again, off the event loop. */
export async function passwordMatches(password: string, v: ScramVerifier): Promise<boolean> {
  const candidate = await buildVerifierAsync(password, v.salt, v.iterations);
  return constantTimeEqual(candidate.storedKey, v.storedKey) && constantTimeEqual(candidate.serverKey, v.serverKey);
}

export function constantTimeEqual(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ b[i]!;
  return diff === 0;
}

/** `k=v,k=v` attributes of a SCRAM message; a repeated key keeps the first. */
export function attributes(message: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const part of message.split(",")) {
    const eq = part.indexOf("=");
    if (eq === 1 && !out.has(part[0]!)) out.set(part[0]!, part.slice(2));
  }
  return out;
}

export function xor(a: Uint8Array, b: Uint8Array): Buffer {
  const out = Buffer.alloc(a.length);
  for (let i = 0; i < a.length; i++) out[i] = a[i]! ^ b[i]!;
  return out;
}
