/**
 * The lifecycle of one client connection, as a transition table.
 *
 *   startup ──StartupMessage──▶ connecting ──server open──▶ authenticating
 *      │  SSLRequest/GSSENCRequest: answer 'N', stay        │ auth relayed both ways
 *      │  CancelRequest: forward, close                      ▼ AuthenticationOk
 *      ▼ anything else: 08P01                            post_auth ──ReadyForQuery──▶ injecting ──ReadyForQuery──▶ transparent
 *    closed ◀────────── any failure: ErrorResponse, close ──┘    (context sent at BackendKeyData, answered here)
 *
 * `(state, event) → handler → next state`. Events are named `client:<x>` /
 * `server:<x>` where x is a message type character for framed messages,
 * `data` for raw bytes, or a lifecycle event. An event a state does not
 * list is a protocol violation, answered with ErrorResponse 08P01 and a
 * close, never a crash.
 *
 * Handlers only decide; the Session (session.ts) does the I/O.
 */
import type { Frame } from "../protocol/framer.ts";
import {
  AUTH,
  authenticationRequest,
  authenticationSASL,
  backendKeyData,
  negotiateProtocolVersion,
  passwordMessage,
  readAuthRequest,
  readBackendKeyData,
  readDataRow,
  readErrorFields,
  readPassword,
  readSaslData,
  saslInitialResponse,
  saslResponse,
  startupMessage,
  type ErrorFields,
} from "../protocol/messages.ts";
import type { StartupPacket } from "../protocol/startup.ts";
import { md5PasswordResponse } from "../auth/md5.ts";
import { SCRAM_MECHANISM, scramContinue, scramStart, scramVerify } from "../auth/scram.ts";
import { forbiddenStartupParameter, printable, resolveIdentity } from "../tenant/identity.ts";
import { contextMessages, signatureSetting } from "../tenant/context.ts";
import { protectedSettings } from "../guard/rules.ts";
import { MAX_HELD_BYTES, type Session } from "./session.ts";

export type State = "startup" | "connecting" | "authenticating" | "post_auth" | "injecting" | "transparent" | "closed";

export type Input = Frame | StartupPacket | Uint8Array | Error | undefined;

// Method syntax makes parameters bivariant, so each handler can name the
// input its event carries (a Frame, a StartupPacket, raw bytes …).
type Handler = { run(s: Session, input: never): State }["run"];

const always = {
  "client:closed": clientGone,
  "server:closed": serverGone,
  "server:unreachable": serverUnreachable,
  timeout: startupTimedOut,
};

export const lifecycle: Record<State, Record<string, Handler>> = {
  startup: {
    "client:ssl": negotiateTls,
    "client:gssenc": declineGssEncryption,
    "client:tls_hello": directTls,
    "client:cancel": forwardCancel,
    "client:startup": beginSession,
    "client:invalid": rejectStartupPacket,
    ...always,
  },
  connecting: {
    "server:opened": sendStartup,
    ...always,
  },
  authenticating: {
    "server:R": authRequest,
    "server:E": relayErrorAndClose,
    "server:N": relay,
    "client:p": authResponse,
    ...always,
  },
  post_auth: {
    "server:S": relay,
    "server:N": relay,
    "server:K": backendKey,
    "server:Z": firstReady,
    "server:E": relayErrorAndClose,
    "client:data": holdClientBytes,
    ...always,
  },
  injecting: {
    "server:1": expectedReply, // ParseComplete
    "server:2": expectedReply, // BindComplete
    "server:D": contextRow, // the set_config() row, and whether RLS can be bypassed
    "server:C": expectedReply, // CommandComplete
    "server:S": relay,
    "server:N": relay,
    "server:E": contextFailed,
    "server:Z": contextReady,
    "client:data": holdClientBytes,
    ...always,
  },
  transparent: {
    "client:data": pipeToServer,
    "server:data": pipeToClient,
    ...always,
  },
  closed: {},
};

// ------------------------------------------------------------------ startup

function declineEncryption(s: Session): State {
  // 'N': the client may go on in clear (or give up, if it insists).
  s.toClient(Uint8Array.of(0x4e));
  return "startup";
}

function declineGssEncryption(s: Session): State {
  // libpq may ask for GSS encryption first and then for TLS: allow that once.
  if (s.gssAsked) return s.fail({ severity: "FATAL", code: "08P01", message: "duplicate GSS encryption request" });
  s.gssAsked = true;
  return declineEncryption(s);
}

function negotiateTls(s: Session): State {
  // One encryption request per connection, as Postgres allows.
  if (s.encryptionAsked) return s.fail({ severity: "FATAL", code: "08P01", message: "duplicate SSL or GSS encryption request" });
  s.encryptionAsked = true;
  if (!s.tlsAvailable) return declineEncryption(s);
  s.startTls();
  return s.state;
}

function directTls(s: Session, hello: Uint8Array): State {
  if (!s.tlsAvailable) {
    return s.fail({ severity: "FATAL", code: "08P01", message: "direct TLS connection, but multigres has no certificate configured (--tls-cert)" });
  }
  s.startDirectTls(hello);
  return s.state;
}

function forwardCancel(s: Session, p: Extract<StartupPacket, { kind: "cancel" }>): State {
  s.forwardCancel(p.processId, p.secretKey);
  return s.close();
}

function rejectStartupPacket(s: Session, p: Extract<StartupPacket, { kind: "invalid" }>): State {
  return s.fail({ severity: "FATAL", code: "08P01", message: `invalid startup packet: ${p.reason}` });
}

function beginSession(s: Session, p: Extract<StartupPacket, { kind: "startup" }>): State {
  if (s.config.clientTls === "require" && !s.tls) {
    return s.fail({ severity: "FATAL", code: "28000", message: "multigres requires TLS: connect with sslmode=require (or stronger)" });
  }
  const identity = resolveIdentity(p.params.get("user"), s.config);
  if (identity.kind === "rejected") {
    return s.fail({ severity: "FATAL", code: "28000", message: identity.message, hint: identity.hint });
  }

  // Protocol 3.2+ and `_pq_.` extensions are negotiated down to plain 3.0,
  // which is all the proxy speaks to either side.
  const upstream = new Map<string, string>();
  const unsupported: string[] = [];
  for (const [key, value] of p.params) {
    if (key.startsWith("_pq_.")) unsupported.push(key);
    else upstream.set(key, value);
  }

  if (identity.kind === "tenant") {
    const forbidden = forbiddenStartupParameter(p.params, protectedSettings(s.config.tenantSetting, signatureSetting(s.config.tenantSetting)));
    if (forbidden) {
      return s.fail({
        severity: "FATAL",
        code: "28000",
        message: `startup parameter ${forbidden} is not allowed: the proxy sets the tenant context and role`,
        hint: "remove it from the connection string or PGOPTIONS",
      });
    }
    upstream.set("user", identity.role);
    // Postgres defaults the database to the user name; clients that fill it
    // in themselves (libpq, psql) send the long name, which is no database.
    const db = p.params.get("database");
    if (db === undefined || db === identity.user) upstream.set("database", identity.role);
  }

  s.identify(identity);
  s.upstreamStartup = startupMessage(upstream);
  if (p.minor > 0 || unsupported.length > 0) s.toClient(negotiateProtocolVersion(0, unsupported));
  s.connectUpstream();
  return "connecting";
}

// ----------------------------------------------------------- authentication

function sendStartup(s: Session): State {
  s.toServer(s.upstreamStartup!);
  s.upstreamStartup = undefined;
  return "authenticating";
}

function authRequest(s: Session, m: Frame): State {
  const req = readAuthRequest(m.body);
  switch (req.code) {
    case AUTH.ok:
      // Logging in with SCRAM ourselves, Ok must follow a verified SASLFinal.
      if (s.scram || s.scramPending) {
        return s.fail({ severity: "FATAL", code: "28000", message: "the upstream server skipped SCRAM verification" });
      }
      s.toClient(m.raw);
      return "post_auth";
    case AUTH.md5Password:
      return md5Challenge(s, m, (req as { salt: Uint8Array }).salt);
    case AUTH.sasl: {
      const offered = (req as { mechanisms: string[] }).mechanisms;
      // TLS on both legs: the client would answer with gs2 flag "y", which the
      // server rejects as a downgrade (see auth/scram.ts). Log in for it.
      if (s.tls && offered.includes(SCRAM_MECHANISM) && offered.some((x) => x.endsWith("-PLUS"))) {
        s.scramPending = true;
        s.toClient(authenticationRequest(AUTH.cleartextPassword));
        return "authenticating";
      }
      // Channel binding binds to the TLS connection the client sees, which is
      // not the one the server sees: -PLUS can never succeed through a proxy.
      const mechanisms = offered.filter((x) => !x.endsWith("-PLUS"));
      if (mechanisms.length === 0) {
        return s.fail({
          severity: "FATAL",
          code: "28000",
          message: "the server offers only SASL channel binding (-PLUS), which cannot work through a proxy",
        });
      }
      s.toClient(authenticationSASL(mechanisms));
      return "authenticating";
    }
    case AUTH.saslContinue:
      if (s.scram) {
        s.toServer(saslResponse(scramContinue(s.scram, readSaslData(m.body))));
        return "authenticating";
      }
      s.toClient(m.raw);
      return "authenticating";
    case AUTH.saslFinal:
      if (s.scram) {
        const verified = scramVerify(s.scram, readSaslData(m.body));
        s.scram = undefined;
        if (!verified) return s.fail({ severity: "FATAL", code: "28000", message: "the upstream server's SCRAM signature did not verify" });
        return "authenticating"; // AuthenticationOk follows and goes to the client
      }
      s.toClient(m.raw);
      return "authenticating";
    case AUTH.cleartextPassword:
      s.toClient(m.raw);
      return "authenticating";
    default:
      return s.fail({
        severity: "FATAL",
        code: "28000",
        message: `authentication method ${req.code} (GSSAPI/SSPI/Kerberos) is not supported through multigres`,
        hint: "use scram-sha-256 for this user in pg_hba.conf",
      });
  }
}

/**
 * MD5 hashes the user name, so after a rewrite only the proxy can answer.
 * It asks the client for the password in clear, which is acceptable only
 * where nobody can listen: loopback connections and TLS.
 */
function md5Challenge(s: Session, m: Frame, salt: Uint8Array): State {
  if (s.identity?.kind !== "tenant") {
    s.toClient(m.raw); // no rewrite: the client's own answer is right
    return "authenticating";
  }
  if (s.config.md5Auth === "loopback" && (s.clientIsLoopback || s.tls)) {
    s.md5Salt = salt;
    s.toClient(authenticationRequest(AUTH.cleartextPassword));
    return "authenticating";
  }
  return s.fail({
    severity: "FATAL",
    code: "28000",
    message: `MD5 authentication cannot pass through the user name rewrite for "${printable(s.identity.user)}"`,
    hint: "store the role's password as SCRAM (password_encryption = 'scram-sha-256', then ALTER ROLE … PASSWORD) and use scram-sha-256 in pg_hba.conf",
  });
}

function authResponse(s: Session, m: Frame): State {
  if (s.scramPending) {
    s.scramPending = false;
    const { state, clientFirst } = scramStart(readPassword(m.body));
    s.scram = state;
    s.toServer(saslInitialResponse(SCRAM_MECHANISM, clientFirst));
  } else if (s.md5Salt && s.identity?.kind === "tenant") {
    const answer = md5PasswordResponse(s.identity.role, readPassword(m.body), s.md5Salt);
    s.md5Salt = undefined;
    s.toServer(passwordMessage(answer));
  } else {
    s.toServer(m.raw);
  }
  return "authenticating";
}

// ----------------------------------------------------- after authentication

function backendKey(s: Session, m: Frame): State {
  s.serverKey = readBackendKeyData(m.body);
  s.toClient(backendKeyData(s.issueCancelKey()));
  if (s.identity?.kind === "tenant") {
    // The signature binds the context to this backend's pid, known from
    // here on. Sent now, not after the first ReadyForQuery: the server reads
    // it as soon as its startup is done, so it costs no extra round trip.
    s.toServer(contextMessages(s.config, s.identity, s.contextKey, s.serverKey.processId));
  }
  return "post_auth";
}

function firstReady(s: Session, m: Frame): State {
  if (s.identity?.kind !== "tenant") {
    s.toClient(m.raw);
    return s.goTransparent();
  }
  if (!s.serverKey) {
    return s.fail({
      severity: "FATAL",
      code: "08P01",
      message: "the upstream server sent no BackendKeyData, so the tenant context cannot be bound to its backend",
    });
  }
  // Held back: the client must not see ReadyForQuery before its context is set.
  s.heldReady = m.raw.slice();
  s.heldReadyAt = performance.now();
  return "injecting";
}

function expectedReply(): State {
  return "injecting";
}

function contextRow(s: Session, m: Frame): State {
  const values = readDataRow(m.body);
  if (values.at(-1) !== "f") {
    const role = s.config.role ?? (s.identity?.kind === "tenant" ? s.identity.role : "?");
    return s.fail({
      severity: "FATAL",
      code: "28000",
      message: `tenant sessions must not be able to bypass row-level security, but role "${role}" (or the login role) is a superuser, has BYPASSRLS, or is a member of such a role`,
      hint: "use a NOSUPERUSER NOBYPASSRLS app role (multigres setup hardens it); superusers connect as themselves (--superuser)",
    });
  }
  return "injecting";
}

function contextFailed(s: Session, m: Frame): State {
  const fields = readErrorFields(m.body);
  s.log.error(`could not establish tenant context: ${fields.get("M") ?? "unknown error"}`);
  return s.fail({
    severity: "FATAL",
    code: fields.get("C") ?? "28000",
    message: `could not establish the tenant context: ${fields.get("M") ?? "unknown error"}`,
    hint: "check that the role exists and that the app role may SET ROLE to it",
  });
}

function contextReady(s: Session): State {
  s.toClient(s.heldReady!);
  s.heldReady = undefined;
  // What the context cost the client: the wait between the server being
  // ready and the context being in place (no round trip of its own).
  s.log.debug(`tenant context in place ${(performance.now() - s.heldReadyAt).toFixed(3)} ms after server ready`);
  return s.goTransparent();
}

function holdClientBytes(s: Session, bytes: Uint8Array): State {
  // A client that pipelines before its first ReadyForQuery: keep its bytes
  // (in order) until the context is in place, and stop reading past a bound.
  // Each data event brings a buffer of its own, so no copy is needed.
  s.heldClient.push(bytes);
  s.heldBytes += bytes.length;
  if (s.heldBytes > MAX_HELD_BYTES) s.pauseClient();
  return s.state;
}

// -------------------------------------------------------------- transparent

function pipeToServer(s: Session, bytes: Uint8Array): State {
  s.clientToServer(bytes);
  return s.state;
}

function pipeToClient(s: Session, bytes: Uint8Array): State {
  s.serverToClient(bytes);
  return s.state;
}

// ---------------------------------------------------------------- any state

function relay(s: Session, m: Frame): State {
  s.toClient(m.raw);
  return s.state;
}

function relayErrorAndClose(s: Session, m: Frame): State {
  s.toClient(m.raw);
  return s.close();
}

function clientGone(s: Session): State {
  return s.close();
}

function serverGone(s: Session): State {
  if (s.state === "transparent") return s.close();
  return s.fail({ severity: "FATAL", code: "08006", message: "the upstream server closed the connection during startup" });
}

function serverUnreachable(s: Session, error: Error): State {
  const { host, port } = s.config.upstream;
  return s.fail({
    severity: "FATAL",
    code: "08006",
    message: `could not connect to the upstream server at ${host}:${port}: ${error.message}`,
    hint: "check that PostgreSQL is running at --upstream; for TLS errors, see --upstream-tls, --upstream-ca and --upstream-server-name",
  });
}

function startupTimedOut(s: Session): State {
  return s.fail({
    severity: "FATAL",
    code: "08006",
    message: `startup and authentication did not complete within ${s.config.startupTimeout} ms`,
  });
}

/** What happens to an event a state does not list. */
export function protocolViolation(s: Session, event: string): ErrorFields {
  const what = event.replace(/^(client|server):/, "$1 message ");
  return { severity: "FATAL", code: "08P01", message: `protocol violation: unexpected ${what} while ${s.state.replace("_", " ")}` };
}

