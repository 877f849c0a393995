/**
 * Tenant tokens: the password of `<role>.<tenant>` derived from a secret,
 * so the proxy authenticates any number of tenants without storing
 * anything, and a token made for one tenant never logs in as another.
 *
 *   mgt1.<expires>.<mac>
 *   mac = base64url(HMAC-SHA256(secret, "multigres tenant token v1\0<role>\0<tenant>\0<expires>"))
 *
 * `expires` is a Unix time in seconds, or 0 for a token that does not
 * expire. The format is small on purpose: apps in any language make tokens
 * with a few lines (the README shows Python). This module is also what
 * the npm package exports (`import { tenantToken } from "multigres"`), so it
 * depends on node:crypto only.
 *
 * SCRAM needs the exact password before the client proves it knows it, so
 * the proxy can check an expiring token only when the client sends it in
 * clear (`--auth-method password`, on TLS or loopback); tokens without an
 * expiry work with SCRAM too, since the proxy can derive them.
 */
import { createHmac, timingSafeEqual } from "node:crypto";

const PREFIX = "mgt1";
const LABEL = "multigres tenant token v1";

export interface TokenOptions {
  /** Seconds until the token expires; 0 or absent = never. */
  ttlSeconds?: number;
  /** "Now" in milliseconds, for tests. */
  now?: number;
}

/** The token with which `<role>.<tenant>` logs in to a proxy holding `secret`. */
export function tenantToken(secret: string, role: string, tenant: string, options: TokenOptions = {}): string {
  const ttl = options.ttlSeconds ?? 0;
  if (!Number.isInteger(ttl) || ttl < 0) throw new Error("ttlSeconds must be a whole number of seconds, 0 or more");
  const expires = ttl === 0 ? 0 : Math.floor((options.now ?? Date.now()) / 1000) + ttl;
  return tokenFor(secret, role, tenant, expires);
}

function tokenFor(secret: string, role: string, tenant: string, expires: number): string {
  return `${PREFIX}.${expires}.${mac(secret, role, tenant, expires).toString("base64url")}`;
}

function mac(secret: string, role: string, tenant: string, expires: number): Buffer {
  return createHmac("sha256", secret).update(`${LABEL}\0${role}\0${tenant}\0${expires}`).digest();
}

export type TokenCheck = { ok: true; expires: number } | { ok: false; reason: string };

/** Checks a token presented as the password of `<role>.<tenant>`. The reason never repeats the token. */
export function verifyTenantToken(secret: string, role: string, tenant: string, token: string, now = Date.now()): TokenCheck {
  const m = /^mgt1\.(0|[1-9]\d{0,11})\.([A-Za-z0-9_-]{43})$/.exec(token);
  if (!m) return { ok: false, reason: "the password is not a tenant token" };
  const expires = Number(m[1]);
  const expected = mac(secret, role, tenant, expires);
  const got = Buffer.from(m[2]!, "base64url");
  if (got.length !== expected.length || !timingSafeEqual(got, expected)) {
    return { ok: false, reason: "the token was not made for this role and tenant with this proxy's token secret" };
  }
  if (expires !== 0 && expires * 1000 <= now) return { ok: false, reason: `the token expired at ${new Date(expires * 1000).toISOString()}` };
  return { ok: true, expires };
}

/** The one token SCRAM can check: the non-expiring one, which the proxy derives itself. */
export function permanentToken(secret: string, role: string, tenant: string): string {
  return tokenFor(secret, role, tenant, 0);
}

/** "90", "90s", "15m", "12h", "7d" → seconds. */
export function parseDuration(text: string): number {
  const m = /^(\d+)\s*(s|m|h|d)?$/.exec(text.trim());
  if (!m) throw new Error(`"${text}" is not a duration (use e.g. 90s, 15m, 12h or 7d)`);
  const unit = { s: 1, m: 60, h: 3600, d: 86400 }[(m[2] ?? "s") as "s" | "m" | "h" | "d"];
  return Number(m[1]) * unit;
}
