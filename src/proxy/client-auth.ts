/**
 * The proxy authenticating one client (`--auth proxy`): SCRAM-SHA-256 (with
 * channel binding on the client's TLS connection), or, with
 * `--auth-method password`, the password in clear where nobody can listen
 * (loopback, TLS).
 *
 *   request() ──▶ R SASL [mechanisms]            R CleartextPassword
 *   p SASLInitialResponse ──▶ R SASLContinue     p password ──▶ R Ok
 *   p SASLResponse ──▶ R SASLFinal, R Ok
 *
 * Each client message yields a Step: what to send, and whether the
 * exchange is over. A step may take a moment (a token's verifier, a
 * cleartext check against a verifier, both PBKDF2 off the event loop), so
 * message() may return a promise. Never logs or returns the password.
 */
import { ScramServer } from "../auth/scram-server.ts";
import { CredentialsBusy, type ClientIdentity, type Credential, type Credentials } from "../auth/credentials.ts";
import { AUTH, authenticationRequest, authenticationSASL, authenticationSASLData, concat, readPassword, readSaslInitialResponse, readSaslResponse, type ErrorFields } from "../protocol/messages.ts";
import { printable } from "../tenant/identity.ts";
import { errors } from "./errors.ts";

export type Step =
  | { kind: "continue"; send: Uint8Array }
  | { kind: "ok"; send: Uint8Array }
  /** `reason` is for the log (never a secret); `error` goes to the client. */
  | { kind: "failed"; reason: string; error: ErrorFields };

export class ClientAuth {
  private readonly credential: Credential;
  private scram: ScramServer | undefined;
  private stage: "first" | "final" | "done" = "first";

  constructor(
    private readonly credentials: Credentials,
    private readonly identity: ClientIdentity,
    private readonly method: "scram" | "password",
    /** tls-server-end-point data when the client is on TLS and the certificate allows binding. */
    private readonly channelBinding: Uint8Array | undefined,
  ) {
    this.credential = credentials.find(identity);
  }

  /** Where the credential came from, for the log. */
  get source(): string {
    const c = this.credential;
    return c.source === "auth-file" ? `auth file entry "${c.name}"` : c.source === "token" ? "tenant token" : "no credentials";
  }

  /** The authentication request that opens the exchange. */
  request(): Uint8Array {
    return this.method === "password" ? authenticationRequest(AUTH.cleartextPassword) : authenticationSASL(ScramServer.mechanisms(this.channelBinding));
  }

  message(body: Uint8Array): Step | Promise<Step> {
    if (this.stage === "done") return this.failed("authentication already finished", errors.saslProtocol("unexpected message"));
    if (this.method === "password") {
      this.stage = "done";
      return this.checkPassword(readPassword(body));
    }
    if (this.stage === "first") {
      this.stage = "final";
      const { mechanism, data } = readSaslInitialResponse(body);
      const verifier = this.credentials.scramVerifier(this.credential, this.identity);
      const begin = (v: Awaited<typeof verifier>) => {
        this.scram = new ScramServer({ verifier: v, channelBinding: this.channelBinding });
        const r = this.scram.first(mechanism, data);
        return r.ok ? this.next(authenticationSASLData(AUTH.saslContinue, r.message)) : this.failed(r.reason, errors.saslProtocol(r.reason));
      };
      if (!(verifier instanceof Promise)) return begin(verifier);
      return verifier.then(begin, (e: Error) => {
        if (e instanceof CredentialsBusy) return this.failed(e.message, errors.tooManyAuthentications());
        throw e;
      });
    }
    this.stage = "done";
    const r = this.scram!.final(readSaslResponse(body));
    if (r.ok) {
      // A mock verifier (no credentials) never gets here: no proof matches it.
      return { kind: "ok", send: concat([authenticationSASLData(AUTH.saslFinal, r.message), authenticationRequest(AUTH.ok)]) };
    }
    return r.reason === "password does not match" ? this.wrongPassword() : this.failed(r.reason, errors.saslProtocol(r.reason));
  }

  private async checkPassword(password: string): Promise<Step> {
    const r = await this.credentials.checkPassword(this.credential, password);
    return r.ok ? { kind: "ok", send: authenticationRequest(AUTH.ok) } : this.wrongPassword(r.reason);
  }

  private wrongPassword(reason = "password does not match"): Step {
    const why = this.credential.source === "none" ? "no auth-file entry or token for this user" : `${reason} (${this.source})`;
    return this.failed(why, errors.passwordFailed(printable(this.identity.user)));
  }

  private next(send: Uint8Array): Step {
    return { kind: "continue", send };
  }

  private failed(reason: string, error: ErrorFields): Step {
    this.stage = "done";
    return { kind: "failed", reason, error };
  }
}
