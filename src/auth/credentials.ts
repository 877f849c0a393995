/**
 * What a client's password is checked against, under `--auth proxy`. The
 * stores are ones the database role cannot write: an auth file on the
 * proxy's disk, and tenant tokens derived from a secret only the proxy
 * (and whoever mints tokens) holds.
 *
 * For `<role>.<tenant>`, in this order:
 *   1. an auth-file entry for exactly `<role>.<tenant>`;
 *   2. `--tenant-auth shared`: the auth-file entry for `<role>`;
 *      `--tenant-auth token`: a token for (role, tenant);
 *   3. nothing: the exchange runs against a mock verifier and fails like a
 *      wrong password, so a client cannot tell unknown users from known ones.
 */
import { createHmac, randomBytes } from "node:crypto";
import { parseAuthFile } from "./auth-file.ts";
import {
  buildVerifierAsync,
  constantTimeEqual,
  DEFAULT_ITERATIONS,
  parseVerifier,
  passwordMatches,
  sha256,
  type ScramVerifier,
} from "./scram.ts";
import { permanentToken, verifyTenantToken } from "./token.ts";

export type TenantAuth = "shared" | "token";

export interface ClientIdentity {
  /** The user name as the client typed it: `app_user.acme`. */
  user: string;
  role: string;
  tenant: string;
}

interface Entry {
  verifier: ScramVerifier;
  /** Kept for plain-password entries, so a cleartext login costs no PBKDF2. */
  password?: string;
}

export type Credential =
  | { source: "auth-file"; name: string; entry: Entry }
  | { source: "token"; role: string; tenant: string }
  | { source: "none" };

export type PasswordCheck = { ok: true } | { ok: false; reason: string };

/** Token verifiers are derived with PBKDF2 (a millisecond): keep recent ones. */
const TOKEN_CACHE_SIZE = 10_000;

export class Credentials {
  private readonly tokenVerifiers = new Map<string, Promise<ScramVerifier>>();
  private readonly mockKey = randomBytes(32);

  private constructor(
    private readonly entries: ReadonlyMap<string, Entry>,
    private readonly tenantAuth: TenantAuth,
    private readonly tokenSecret: string | undefined,
  ) {}

  /**
   * Reads the auth file's text (plain passwords become verifiers here, off
   * the event loop). Throws with every problem, by line, never a secret.
   */
  static async load(options: { authFile?: { path: string; text: string }; tenantAuth: TenantAuth; tokenSecret?: string }): Promise<Credentials> {
    const entries = new Map<string, Entry>();
    if (options.authFile) {
      const { path, text } = options.authFile;
      const parsed = parseAuthFile(text);
      const problems = parsed.problems.map((p) => `${path}: ${p}`);
      await Promise.all(
        parsed.entries.map(async ({ user, secret, line }) => {
          if (/^md5[0-9a-f]{32}$/.test(secret)) {
            problems.push(`${path}: line ${line}: "${user}" has an MD5 hash, which cannot be checked through the user name rewrite; use a SCRAM verifier (from pg_authid) or a plain password`);
          } else if (secret.startsWith("SCRAM-SHA-256$")) {
            const verifier = parseVerifier(secret);
            if (verifier) entries.set(user, { verifier });
            else problems.push(`${path}: line ${line}: "${user}" has a malformed SCRAM-SHA-256 verifier`);
          } else if (secret === "") {
            problems.push(`${path}: line ${line}: "${user}" has an empty password`);
          } else {
            entries.set(user, { verifier: await buildVerifierAsync(secret), password: secret });
          }
        }),
      );
      if (problems.length > 0) throw new CredentialsError(problems);
    }
    return new Credentials(entries, options.tenantAuth, options.tokenSecret);
  }

  /** Whom the auth file names (for the startup check). */
  get names(): string[] {
    return [...this.entries.keys()];
  }

  find(id: ClientIdentity): Credential {
    const exact = this.entries.get(id.user);
    if (exact) return { source: "auth-file", name: id.user, entry: exact };
    if (this.tenantAuth === "shared") {
      const shared = this.entries.get(id.role);
      if (shared) return { source: "auth-file", name: id.role, entry: shared };
    } else if (this.tokenSecret) {
      return { source: "token", role: id.role, tenant: id.tenant };
    }
    return { source: "none" };
  }

  /** The verifier a SCRAM exchange for `user` runs against. */
  scramVerifier(c: Credential, user: string): ScramVerifier | Promise<ScramVerifier> {
    if (c.source === "auth-file") return c.entry.verifier;
    if (c.source === "token") return this.tokenVerifier(c.role, c.tenant);
    return this.mockVerifier(user);
  }

  /** A password sent in clear (`--auth-method password`). */
  async checkPassword(c: Credential, password: string): Promise<PasswordCheck> {
    if (c.source === "none") return { ok: false, reason: "no credentials for this user" };
    if (c.source === "token") return verifyTenantToken(this.tokenSecret!, c.role, c.tenant, password);
    const { entry } = c;
    // Digests, so the comparison takes the same time whatever the lengths.
    const ok =
      entry.password !== undefined
        ? constantTimeEqual(sha256(Buffer.from(password)), sha256(Buffer.from(entry.password)))
        : await passwordMatches(password, entry.verifier);
    return ok ? { ok: true } : { ok: false, reason: "password does not match" };
  }

  private tokenVerifier(role: string, tenant: string): Promise<ScramVerifier> {
    const key = `${role}\0${tenant}`;
    let v = this.tokenVerifiers.get(key);
    if (v) {
      // Least recently used goes first: move this one to the back.
      this.tokenVerifiers.delete(key);
    } else {
      const secret = this.tokenSecret!;
      const salt = createHmac("sha256", secret).update(`multigres token salt\0${key}`).digest().subarray(0, 16);
      v = buildVerifierAsync(permanentToken(secret, role, tenant), salt);
      if (this.tokenVerifiers.size >= TOKEN_CACHE_SIZE) this.tokenVerifiers.delete(this.tokenVerifiers.keys().next().value!);
    }
    this.tokenVerifiers.set(key, v);
    return v;
  }

  /** Stable per user name (same salt on every try), matching no password. */
  private mockVerifier(user: string): ScramVerifier {
    const derive = (label: string) => createHmac("sha256", this.mockKey).update(`${label}\0${user}`).digest();
    return { iterations: DEFAULT_ITERATIONS, salt: derive("salt").subarray(0, 16), storedKey: derive("stored"), serverKey: derive("server") };
  }
}

export class CredentialsError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join("; "));
  }
}
