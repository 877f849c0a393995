/**
 * The proxy logging in to PostgreSQL with its own credential (`--auth
 * proxy`): the upstream password (cleartext, MD5 or SCRAM-SHA-256, whichever
 * pg_hba.conf asks for), or a client certificate presented during TLS. The
 * client never sees this exchange or the credential.
 *
 *   StartupMessage ──▶ R (auth requests) … R Ok ──▶ S… K ──▶ Z: ready
 *                      E at any point: failed (the server's words kept for the log)
 *
 * A reader on the ServerConnection; what the login learns (cancel key,
 * parameters) stays on the connection.
 */
import { md5PasswordResponse } from "../auth/md5.ts";
import { scramContinue, scramStart, scramVerify, type ScramClient } from "../auth/scram-client.ts";
import { SCRAM_MECHANISM } from "../auth/scram.ts";
import type { Frame } from "../protocol/framer.ts";
import {
  AUTH,
  MSG,
  passwordMessage,
  readAuthRequest,
  readBackendKeyData,
  readErrorFields,
  readParameterStatus,
  readSaslData,
  saslInitialResponse,
  saslResponse,
  startupMessage,
} from "../protocol/messages.ts";
import type { ServerConnection } from "./server-connection.ts";

export type LoginResult =
  | { ok: true }
  | {
      ok: false;
      /** For the log and the operator: what went wrong, the server's words where it spoke. */
      message: string;
      /** The server's SQLSTATE and message, when it answered with an ErrorResponse. */
      server?: { code: string; message: string };
      /**
       * The server refused the proxy's credential itself (28P01, or none
       * configured): wrong for this role everywhere, whichever database a
       * client asked for, and so worth a 503 in /readyz. Other refusals
       * (pg_hba reject, no such database) depend on what the client asked.
       */
      refused: boolean;
    };

export interface LoginRequest {
  /** Startup parameters as sent upstream (user already the role). */
  params: ReadonlyMap<string, string>;
  /** The upstream password for this role, if one is configured. */
  password: string | undefined;
}

export function logIn(server: ServerConnection, request: LoginRequest, done: (result: LoginResult) => void): void {
  const user = request.params.get("user") ?? "";
  let authenticated = false;
  let scram: ScramClient | undefined;
  let finished = false;

  const fail = (message: string, refused = false, server?: { code: string; message: string }) => {
    finished = true;
    done({ ok: false, message, refused, server });
    return "done" as const;
  };
  const needPassword = (method: string) =>
    request.password === undefined
      ? fail(`the server asks for a password (${method}) for role "${user}", but the proxy has none: set MULTIGRES_UPSTREAM_PASSWORD or --upstream-password-file`, true)
      : undefined;

  const authRequest = (m: Frame) => {
    const req = readAuthRequest(m.body);
    switch (req.code) {
      case AUTH.ok:
        // A SCRAM login is over only once the server proved itself (SASLFinal).
        if (scram) return fail("the server skipped SCRAM verification");
        authenticated = true;
        return "more";
      case AUTH.cleartextPassword:
        if (needPassword("password")) return "done";
        server.send(passwordMessage(request.password!));
        return "more";
      case AUTH.md5Password:
        if (needPassword("md5")) return "done";
        server.send(passwordMessage(md5PasswordResponse(user, request.password!, (req as { salt: Uint8Array }).salt)));
        return "more";
      case AUTH.sasl: {
        if (!(req as { mechanisms: string[] }).mechanisms.includes(SCRAM_MECHANISM)) return fail("the server offers no SASL mechanism the proxy supports");
        if (needPassword("scram-sha-256")) return "done";
        const start = scramStart(request.password!);
        scram = start.state;
        server.send(saslInitialResponse(SCRAM_MECHANISM, start.clientFirst));
        return "more";
      }
      case AUTH.saslContinue:
        if (!scram) return fail("unexpected SASL continue from the server");
        server.send(saslResponse(scramContinue(scram, readSaslData(m.body))));
        return "more";
      case AUTH.saslFinal: {
        if (!scram) return fail("unexpected SASL final message from the server");
        const verified = scramVerify(scram, readSaslData(m.body));
        scram = undefined;
        return verified ? "more" : fail("the server's SCRAM signature did not verify (is --upstream really PostgreSQL?)");
      }
      default:
        return fail(`the server asks for authentication method ${req.code} (GSSAPI/SSPI/Kerberos), which the proxy does not support upstream`);
    }
  };

  server.read((m: Frame) => {
    if (finished) return "done";
    switch (m.type) {
      case MSG.authentication:
        if (authenticated) return fail("unexpected authentication request after AuthenticationOk");
        return authRequest(m);
      case MSG.errorResponse: {
        const f = readErrorFields(m.body);
        const code = f.get("C") ?? "";
        const message = f.get("M") ?? "error";
        return fail(`${message} (${code || "no SQLSTATE"})`, code === "28P01", { code, message });
      }
      case MSG.parameterStatus: {
        server.parameters.set(readParameterStatus(m.body)[0], m.raw.slice());
        return "more";
      }
      case MSG.backendKeyData:
        server.key = readBackendKeyData(m.body);
        return "more";
      case MSG.noticeResponse:
      case MSG.negotiateProtocolVersion:
        return "more";
      case MSG.readyForQuery:
        if (!authenticated) return fail("ReadyForQuery before authentication completed");
        finished = true;
        done({ ok: true });
        return "done";
      default:
        return fail(`unexpected message '${String.fromCharCode(m.type)}' during login`);
    }
  });
  server.send(startupMessage(request.params));
}
