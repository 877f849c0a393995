/**
 * What a client's password is checked against, under `--auth proxy`. The
 * stores are ones the database role cannot write: an auth file on the
 * proxy's disk, and tenant tokens derived from a secret only the proxy
 * (and whoever mints tokens) holds.
 *
 * For `<role>.<tenant>`, in this order:
 *   1. an auth-file entry for exactly `<role>.<tenant>`;
 *   2. `--tenant-auth shared`: the auth-file entry for `<role>`, if that
 *      name is a role's entry and not itself a tenant's (else
 *      `app_user.a.b` would log in with tenant a's password as role
 *      `app_user.a`); `--tenant-auth token`: a token for (role, tenant);
 *   3. nothing: the exchange runs against a mock verifier and fails like a
 *      wrong password, so a client cannot tell unknown users from known ones
 *      (the mock's salt depends on the role only, as a shared entry's does).
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
/**
 * PBKDF2 for a (role, tenant) not in the cache runs before the client has
 * proven anything, so strangers naming random tenants could keep the CPUs
 * busy. At most this many run at once and this many more wait; beyond
 * that a login is turned away (53300) rather than queued without bound.
 */
const TOKEN_DERIVATIONS = { running: 2, waiting: 64 };

/** Too many token verifiers are being derived right now. */
export class CredentialsBusy extends Error {}

export class Credentials {
  private readonly tokenVerifiers = new Map<string, Promise<ScramVerifier>>();
  private readonly mockKey = randomBytes(32);
  private derivations = 0;
  private readonly queued: Array<() => void> = [];

  private constructor(
    private readonly entries: ReadonlyMap<string, Entry>,
    /** The names of `entries` that are roles' shared entries (no tenant in them). */
    private readonly roleEntries: ReadonlySet<string>,
    private readonly tenantAuth: TenantAuth,
    private readonly tokenSecret: string | undefined,
  ) {}

  /**
   * Reads the auth file's text (plain passwords become verifiers here, off
   * the event loop). Throws with every problem, by line, never a secret.
   */
  static async load(options: {
    authFile?: { path: string; text: string };
    tenantAuth: TenantAuth;
    tokenSecret?: string;
    /** Whether an entry's name is `<role>.<tenant>` (the proxy's identity rules); the others are roles. */
    isTenantName?: (name: string) => boolean;
  }): Promise<Credentials> {
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
    const isTenantName = options.isTenantName ?? ((name: string) => name.includes("."));
    const roleEntries = new Set([...entries.keys()].filter((name) => !isTenantName(name)));
    return new Credentials(entries, roleEntries, options.tenantAuth, options.tokenSecret);
  }

  /** Whom the auth file names (for the startup check). */
  get names(): string[] {
    return [...this.entries.keys()];
  }

  find(id: ClientIdentity): Credential {
    const exact = this.entries.get(id.user);
    if (exact) return { source: "auth-file", name: id.user, entry: exact };
    if (this.tenantAuth === "shared") {
      const shared = this.roleEntries.has(id.role) ? this.entries.get(id.role) : undefined;
      if (shared) return { source: "auth-file", name: id.role, entry: shared };
    } else if (this.tokenSecret) {
      return { source: "token", role: id.role, tenant: id.tenant };
    }
    return { source: "none" };
  }

  /** The verifier a SCRAM exchange for `user` runs against. */
  scramVerifier(c: Credential, id: ClientIdentity): ScramVerifier | Promise<ScramVerifier> {
    if (c.source === "auth-file") return c.entry.verifier;
    if (c.source === "token") return this.tokenVerifier(c.role, c.tenant);
    return this.mockVerifier(id.role);
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
      v = this.limited(() => buildVerifierAsync(permanentToken(secret, role, tenant), salt));
      // A failed derivation (busy) is not remembered.
      v.catch(() => this.tokenVerifiers.delete(key));
      if (this.tokenVerifiers.size >= TOKEN_CACHE_SIZE) this.tokenVerifiers.delete(this.tokenVerifiers.keys().next().value!);
    }
    this.tokenVerifiers.set(key, v);
    return v;
  }

  /** Run `derive` within TOKEN_DERIVATIONS; reject with CredentialsBusy when the queue is full. */
  private limited<T>(derive: () => Promise<T>): Promise<T> {
    if (this.derivations >= TOKEN_DERIVATIONS.running && this.queued.length >= TOKEN_DERIVATIONS.waiting) {
      return Promise.reject(new CredentialsBusy("too many token logins being checked at once"));
    }
    const run = async () => {
      this.derivations++;
      try {
        return await derive();
      } finally {
        this.derivations--;
        this.queued.shift()?.();
      }
    };
    if (this.derivations < TOKEN_DERIVATIONS.running) return run();
    return new Promise<void>((resolve) => this.queued.push(resolve)).then(run);
  }

  /** Stable per role (the same salt for all its tenants, like a shared entry), matching no password. */
  private mockVerifier(role: string): ScramVerifier {
    const derive = (label: string) => createHmac("sha256", this.mockKey).update(`${label}\0${role}`).digest();
    return { iterations: DEFAULT_ITERATIONS, salt: derive("salt").subarray(0, 16), storedKey: derive("stored"), serverKey: derive("server") };
  }
}

export class CredentialsError extends Error {
  constructor(readonly problems: string[]) {
    super(problems.join("; "));
  }
}
