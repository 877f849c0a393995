/**
 * The lifecycle of one client connection, as a transition table.
 *
 *   --auth proxy (tenants):
 *     startup ──▶ client_auth ──▶ connecting ──▶ server_login ──▶ injecting ──▶ transparent
 *                 (the proxy       (TCP, TLS)     (the proxy's own   (context round:
 *                  checks the                      credential)        binding, set, verify)
 *                  client)
 *   --auth passthrough, and superusers:
 *     startup ──▶ connecting ──▶ authenticating ──▶ post_auth ──Z──▶ injecting ──▶ transparent
 *                                (relayed both ways)  (S, K relayed)     (tenants only; superusers
 *                                                                         go straight on at Z)
 *   startup also answers SSLRequest (TLS), GSSENCRequest ('N') and
 *   CancelRequest (forward, close); any failure anywhere: ErrorResponse,
 *   then closed.
 *
 * `(state, event) → handler → next state`. Events are named `client:<x>` /
 * `server:<x>` where x is a message type character for framed messages,
 * `data` for raw bytes, or a lifecycle event; `auth:step`, `server:login`
 * and `context:done` report the proxy's own procedures (client-auth.ts,
 * server-login.ts, context-round.ts). An event a state does not list is a
 * protocol violation, answered with ErrorResponse 08P01 and a close, never
 * a crash.
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
  readPassword,
  readSaslData,
  saslInitialResponse,
  saslResponse,
  startupMessage,
  type ErrorFields,
} from "../protocol/messages.ts";
import type { StartupPacket } from "../protocol/startup.ts";
import { md5PasswordResponse } from "../auth/md5.ts";
import { scramContinue, scramStart, scramVerify } from "../auth/scram-client.ts";
import { SCRAM_MECHANISM } from "../auth/scram.ts";
import { forbiddenStartupParameter, printable, resolveIdentity, startupSettings } from "../tenant/identity.ts";
import { signatureSetting } from "../tenant/context.ts";
import { protectedSettings, unreadableEncoding } from "../guard/rules.ts";
import type { Step } from "./client-auth.ts";
import type { ContextResult } from "./context-round.ts";
import type { LoginResult } from "./server-login.ts";
import { errors } from "./errors.ts";
import type { Session } from "./session.ts";

export type State =
  | "startup"
  | "client_auth"
  | "connecting"
  | "authenticating"
  | "server_login"
  | "post_auth"
  | "injecting"
  | "transparent"
  | "closed";

export type Input = Frame | StartupPacket | Uint8Array | Error | Step | LoginResult | ContextResult | undefined;

// Method syntax makes parameters bivariant, so each handler can name the
// input its event carries (a Frame, a StartupPacket, raw bytes …).
type Handler = { run(s: Session, input: never): State }["run"];

const always = {
  "client:closed": clientGone,
  "server:closed": serverGone,
  "server:unreachable": serverUnreachable,
  "server:broken": serverBroken,
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
  client_auth: {
    "client:p": clientAuthMessage,
    "auth:step": clientAuthStep,
    ...always,
  },
  connecting: {
    "server:opened": serverOpened,
    "client:data": holdClientBytes,
    ...always,
  },
  authenticating: {
    "server:R": authRequest,
    "server:E": relayErrorAndClose,
    "server:N": relay,
    "client:p": authResponse,
    ...always,
  },
  server_login: {
    "server:login": loggedIn,
    "client:data": holdClientBytes,
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
    "context:done": contextDone,
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
  if (s.gssAsked) return s.fail(errors.duplicateEncryptionRequest(true));
  s.gssAsked = true;
  return declineEncryption(s);
}

function negotiateTls(s: Session): State {
  // One encryption request per connection, as Postgres allows.
  if (s.encryptionAsked) return s.fail(errors.duplicateEncryptionRequest(false));
  s.encryptionAsked = true;
  if (!s.tlsAvailable) return declineEncryption(s);
  s.startTls();
  return s.state;
}

function directTls(s: Session, hello: Uint8Array): State {
  if (!s.tlsAvailable) return s.fail(errors.directTlsWithoutCertificate());
  s.startDirectTls(hello);
  return s.state;
}

function forwardCancel(s: Session, p: Extract<StartupPacket, { kind: "cancel" }>): State {
  s.forwardCancel(p.processId, p.secretKey);
  return s.close();
}

function rejectStartupPacket(s: Session, p: Extract<StartupPacket, { kind: "invalid" }>): State {
  return s.fail(errors.invalidStartupPacket(p.reason));
}

function beginSession(s: Session, p: Extract<StartupPacket, { kind: "startup" }>): State {
  if (s.config.clientTls === "require" && !s.tls) return s.fail(errors.tlsRequired());
  const identity = resolveIdentity(p.params.get("user"), s.config);
  if (identity.kind === "rejected") return s.fail(errors.rejectedUser(identity.message, identity.hint));

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
    if (forbidden) return s.fail(errors.forbiddenStartupParameter(forbidden));
    const encoding = startupSettings(p.params, "client_encoding").find(unreadableEncoding);
    if (s.config.guard !== "off" && encoding !== undefined) return s.fail(errors.unreadableEncoding(printable(encoding)));
    upstream.set("user", identity.role);
    // Postgres defaults the database to the user name; clients that fill it
    // in themselves (libpq, psql) send the long name, which is no database.
    const db = p.params.get("database");
    if (db === undefined || db === identity.user) upstream.set("database", identity.role);
    const database = upstream.get("database")!;
    if (s.config.databases.length > 0 && !s.config.databases.includes(database)) return s.fail(errors.databaseNotServed(printable(database)));
  }

  s.identify(identity);
  s.upstreamParams = upstream;
  if (p.minor > 0 || unsupported.length > 0) s.toClient(negotiateProtocolVersion(0, unsupported));
  if (s.relaysAuthentication) {
    if (!s.takeRelayedLogin()) return s.fail(errors.tooManyRelayedLogins());
    s.connectUpstream();
    return "connecting";
  }
  s.toClient(s.beginClientAuth());
  return "client_auth";
}

// -------------------------------------- the proxy authenticates the client

function clientAuthMessage(s: Session, m: Frame): State {
  const step = s.clientAuth!.message(m.body);
  if (!(step instanceof Promise)) return clientAuthStep(s, step);
  s.awaitStep(step);
  return "client_auth";
}

function clientAuthStep(s: Session, step: Step): State {
  if (step.kind === "failed") {
    s.authFailed(step.reason);
    return s.fail(step.error);
  }
  s.toClient(step.send);
  if (step.kind === "continue") return "client_auth";
  s.authSucceeded();
  s.connectUpstream();
  return "connecting";
}

function serverOpened(s: Session): State {
  if (s.relaysAuthentication) {
    // The client's own startup goes to the server, and its authentication is relayed.
    s.relayServerMessages();
    s.toServer(startupMessage(s.upstreamParams!));
    return "authenticating";
  }
  s.logInUpstream();
  return "server_login";
}

// ------------------------------------- the proxy logs in with its own credential

function loggedIn(s: Session, result: LoginResult): State {
  if (!result.ok) {
    s.upstreamLoginFailed(result);
    return s.fail(errors.upstreamLoginFailed(printable(s.upstreamParams!.get("user")!), result.server));
  }
  s.upstreamLoginSucceeded();
  if (!s.hasServerKey) return s.fail(errors.noBackendKeyData());
  // What the client would have seen from the server: its parameters and a key.
  for (const raw of s.serverParameters()) s.toClient(raw);
  s.toClient(backendKeyData(s.issueCancelKey()));
  return s.establishContext();
}

// ----------------------------------------- authentication relayed (passthrough)

function authRequest(s: Session, m: Frame): State {
  const req = readAuthRequest(m.body);
  switch (req.code) {
    case AUTH.ok:
      // Logging in with SCRAM ourselves, Ok must follow a verified SASLFinal.
      if (s.scram || s.scramPending) return s.fail(errors.upstreamSkippedScram());
      s.toClient(m.raw);
      return "post_auth";
    case AUTH.md5Password:
      return md5Challenge(s, m, (req as { salt: Uint8Array }).salt);
    case AUTH.sasl: {
      const offered = (req as { mechanisms: string[] }).mechanisms;
      // TLS on both legs: the client would answer with gs2 flag "y", which the
      // server rejects as a downgrade (see auth/scram-client.ts). Log in for it.
      if (s.tls && offered.includes(SCRAM_MECHANISM) && offered.some((x) => x.endsWith("-PLUS"))) {
        s.scramPending = true;
        s.toClient(authenticationRequest(AUTH.cleartextPassword));
        return "authenticating";
      }
      // Channel binding binds to the TLS connection the client sees, which is
      // not the one the server sees: -PLUS can never succeed through a relay.
      const mechanisms = offered.filter((x) => !x.endsWith("-PLUS"));
      if (mechanisms.length === 0) return s.fail(errors.onlyChannelBinding());
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
        if (!verified) return s.fail(errors.upstreamScramUnverified());
        return "authenticating"; // AuthenticationOk follows and goes to the client
      }
      s.toClient(m.raw);
      return "authenticating";
    case AUTH.cleartextPassword:
      s.toClient(m.raw);
      return "authenticating";
    default:
      return s.fail(errors.unsupportedAuthMethod(req.code));
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
  return s.fail(errors.md5ThroughRewrite(printable(s.identity.user)));
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

function backendKey(s: Session, m: Frame): State {
  s.setServerKey(readBackendKeyData(m.body));
  s.toClient(backendKeyData(s.issueCancelKey()));
  return "post_auth";
}

function firstReady(s: Session, m: Frame): State {
  if (s.identity?.kind !== "tenant") {
    s.toClient(m.raw);
    return s.goTransparent();
  }
  if (!s.hasServerKey) return s.fail(errors.noBackendKeyData());
  return s.establishContext();
}

// ------------------------------------------------------ the tenant context

function contextDone(s: Session, result: ContextResult): State {
  if (!result.ok) {
    s.contextFailed(result.error.message);
    return s.fail(result.error);
  }
  s.contextVerified();
  // The client's first ReadyForQuery comes only now, with the context in place.
  s.toClient(result.ready);
  s.log.debug(`tenant context in place ${s.contextMs().toFixed(3)} ms after the server was ready`);
  return s.goTransparent();
}

function holdClientBytes(s: Session, bytes: Uint8Array): State {
  s.holdClientBytes(bytes);
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
  return s.fail(errors.upstreamClosedDuringStartup());
}

function serverUnreachable(s: Session, error: Error): State {
  const { host, port } = s.config.upstream;
  return s.fail(errors.upstreamUnreachable(host, port, error.message));
}

function serverBroken(s: Session, error: Error): State {
  return s.fail(errors.invalidServerMessage(error.message));
}

function startupTimedOut(s: Session): State {
  return s.fail(errors.startupTimeout(s.config.startupTimeout));
}

/** What happens to an event a state does not list. */
export function protocolViolation(s: Session, event: string): ErrorFields {
  return errors.protocolViolation(event.replace(/^(client|server):/, "$1 message "), s.state.replace("_", " "));
}
