/**
 * The server half of SCRAM-SHA-256: the proxy authenticating its clients
 * against a stored verifier, as PostgreSQL does (auth-scram.c), with
 * channel binding (SCRAM-SHA-256-PLUS, tls-server-end-point) when the
 * client's TLS connection ends at the proxy.
 *
 * One exchange is a small object fed the client's two messages:
 *
 *   client-first ──▶ server-first (nonce, salt, iterations)
 *   client-final ──▶ verified: server-final (signature) | refused
 *
 * Pure: the verifier, the nonce and the binding data come in; messages go
 * out. An unknown user gets a mock verifier from the caller, so the
 * exchange runs to the end and fails like a wrong password would.
 */
import { randomBytes } from "node:crypto";
import { attributes, constantTimeEqual, hmac, sha256, xor, SCRAM_PLUS_MECHANISM, type ScramVerifier } from "./scram.ts";

export type ScramStep = { ok: true; message: string } | { ok: false; reason: string };

export interface ScramServerOptions {
  verifier: ScramVerifier;
  /** tls-server-end-point data of the client's TLS connection; undefined = not offered. */
  channelBinding?: Uint8Array;
  nonce?: string;
}

export class ScramServer {
  private gs2Header = "";
  private clientFirstBare = "";
  private serverFirst = "";
  private nonce = "";
  private usesBinding = false;

  constructor(private readonly options: ScramServerOptions) {}

  /** The mechanisms to offer: -PLUS first, when the TLS connection allows binding. */
  static mechanisms(channelBinding: Uint8Array | undefined): string[] {
    return channelBinding ? [SCRAM_PLUS_MECHANISM, "SCRAM-SHA-256"] : ["SCRAM-SHA-256"];
  }

  /** SASLInitialResponse: the mechanism the client chose and its client-first-message. */
  first(mechanism: string, clientFirst: string): ScramStep {
    const plus = mechanism === SCRAM_PLUS_MECHANISM;
    if (mechanism !== "SCRAM-SHA-256" && !(plus && this.options.channelBinding)) {
      return { ok: false, reason: `client selected an invalid SASL authentication mechanism` };
    }
    // gs2-header: cbind-flag "," [authzid] ","
    const first = clientFirst.indexOf(",");
    const second = first < 0 ? -1 : clientFirst.indexOf(",", first + 1);
    if (second < 0) return { ok: false, reason: "malformed SCRAM message (no GS2 header)" };
    const flag = clientFirst.slice(0, first);
    if (clientFirst.slice(first + 1, second) !== "") return { ok: false, reason: "client uses authorization identity, but it is not supported" };
    if (plus) {
      if (flag !== "p=tls-server-end-point") return { ok: false, reason: "channel binding type not supported (or missing) for SCRAM-SHA-256-PLUS" };
      this.usesBinding = true;
    } else if (flag === "y") {
      // The client could bind but believes we cannot: if we could, someone
      // between us stripped -PLUS from the offer (PostgreSQL refuses this too).
      if (this.options.channelBinding) return { ok: false, reason: "SCRAM channel binding negotiation error: the server supports channel binding" };
    } else if (flag !== "n") {
      return { ok: false, reason: flag.startsWith("p=") ? "client requires SCRAM channel binding, but it was not offered" : "malformed SCRAM message (invalid channel binding flag)" };
    }
    this.gs2Header = clientFirst.slice(0, second + 1);
    this.clientFirstBare = clientFirst.slice(second + 1);
    if (this.clientFirstBare.startsWith("m=")) return { ok: false, reason: "client requires an unsupported SCRAM extension" };
    const clientNonce = attributes(this.clientFirstBare).get("r");
    if (!clientNonce || !/^[\x21-\x2b\x2d-\x7e]+$/.test(clientNonce)) return { ok: false, reason: "malformed SCRAM message (invalid nonce)" };

    const { salt, iterations } = this.options.verifier;
    this.nonce = clientNonce + (this.options.nonce ?? randomBytes(18).toString("base64"));
    this.serverFirst = `r=${this.nonce},s=${salt.toString("base64")},i=${iterations}`;
    return { ok: true, message: this.serverFirst };
  }

  /** SASLResponse: the client-final-message with its proof. */
  final(clientFinal: string): ScramStep {
    const proofAt = clientFinal.lastIndexOf(",p=");
    if (proofAt < 0) return { ok: false, reason: "malformed SCRAM message (no proof)" };
    const withoutProof = clientFinal.slice(0, proofAt);
    const attrs = attributes(withoutProof);
    const binding = this.usesBinding ? this.options.channelBinding! : new Uint8Array(0);
    const expected = Buffer.concat([Buffer.from(this.gs2Header), binding]).toString("base64");
    if (attrs.get("c") !== expected) return { ok: false, reason: "SCRAM channel binding check failed" };
    if (attrs.get("r") !== this.nonce) return { ok: false, reason: "SCRAM nonce mismatch" };
    const proof = Buffer.from(clientFinal.slice(proofAt + 3), "base64");
    const { storedKey, serverKey } = this.options.verifier;
    if (proof.length !== storedKey.length) return { ok: false, reason: "malformed SCRAM message (invalid proof)" };

    const authMessage = `${this.clientFirstBare},${this.serverFirst},${withoutProof}`;
    // ClientKey = proof XOR HMAC(StoredKey, AuthMessage); it must hash to StoredKey.
    const clientKey = xor(proof, hmac(storedKey, authMessage));
    if (!constantTimeEqual(sha256(clientKey), storedKey)) return { ok: false, reason: "password does not match" };
    return { ok: true, message: `v=${hmac(serverKey, authMessage).toString("base64")}` };
  }
}
