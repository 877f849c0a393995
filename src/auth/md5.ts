/**
 * MD5 password authentication, answered by the proxy.
 *
 * The server's challenge hashes the user name: md5(md5(password || user) || salt).
 * After the proxy rewrites `app_user.tenant` to `app_user`, the client's own
 * answer (computed over the long name) can never match, so the proxy asks
 * the client for the password in clear and computes the answer itself.
 */
import { createHash } from "node:crypto";

const md5hex = (data: string | Uint8Array) => createHash("md5").update(data).digest("hex");

export function md5PasswordResponse(user: string, password: string, salt: Uint8Array): string {
  const inner = md5hex(password + user);
  const outer = createHash("md5").update(inner).update(salt).digest("hex");
  return `md5${outer}`;
}
