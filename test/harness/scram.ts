/**
 * The client side of PostgreSQL password authentication for raw protocol
 * tests: answers AuthenticationCleartextPassword, MD5 and SCRAM-SHA-256
 * requests the way libpq does. Written here, independently of src/, so the
 * proxy's SCRAM server is checked against a second implementation.
 */
import { createHash, createHmac, pbkdf2Sync, randomBytes } from "node:crypto";

const hmac = (key: Buffer, data: string) => createHmac("sha256", key).update(data).digest();

/** A 'p' message carrying `payload`. */
function passwordMessage(payload: Buffer): Buffer {
  const head = Buffer.alloc(5);
  head.write("p", 0);
  head.writeInt32BE(4 + payload.length, 1);
  return Buffer.concat([head, payload]);
}

export class AuthAnswers {
  private nonce = randomBytes(18).toString("base64");
  private firstBare = "";
  private serverSignature: Buffer | undefined;
  /** Set once a SASLFinal arrived: whether the server's signature verified. */
  serverVerified: boolean | undefined;

  constructor(
    private readonly password: string,
    /** For MD5 (which hashes the user name). */
    private readonly user = "",
  ) {}

  /**
   * The reply to an Authentication message body, or undefined when none is
   * due (AuthenticationOk, SASLFinal).
   */
  answer(body: Buffer): Buffer | undefined {
    const code = body.readInt32BE(0);
    switch (code) {
      case 0:
        return undefined;
      case 3:
        return passwordMessage(Buffer.from(`${this.password}\0`));
      case 5: {
        const inner = createHash("md5").update(this.password + this.user).digest("hex");
        const outer = createHash("md5").update(inner).update(body.subarray(4, 8)).digest("hex");
        return passwordMessage(Buffer.from(`md5${outer}\0`));
      }
      case 10: {
        const mechanisms = body.subarray(4).toString().split("\0").filter(Boolean);
        if (!mechanisms.includes("SCRAM-SHA-256")) throw new Error(`no SCRAM-SHA-256 among ${mechanisms.join(", ")}`);
        this.firstBare = `n=,r=${this.nonce}`;
        const data = Buffer.from(`n,,${this.firstBare}`);
        const len = Buffer.alloc(4);
        len.writeInt32BE(data.length);
        return passwordMessage(Buffer.concat([Buffer.from("SCRAM-SHA-256\0"), len, data]));
      }
      case 11: {
        const serverFirst = body.subarray(4).toString();
        const attrs = new Map(serverFirst.split(",").map((p) => [p[0]!, p.slice(2)] as const));
        const salted = pbkdf2Sync(this.password, Buffer.from(attrs.get("s")!, "base64"), Number(attrs.get("i")), 32, "sha256");
        const clientKey = hmac(salted, "Client Key");
        const storedKey = createHash("sha256").update(clientKey).digest();
        const withoutProof = `c=biws,r=${attrs.get("r")}`;
        const authMessage = `${this.firstBare},${serverFirst},${withoutProof}`;
        const signature = hmac(storedKey, authMessage);
        const proof = Buffer.from(clientKey.map((b, i) => b ^ signature[i]!));
        this.serverSignature = hmac(hmac(salted, "Server Key"), authMessage);
        return passwordMessage(Buffer.from(`${withoutProof},p=${proof.toString("base64")}`));
      }
      case 12: {
        const v = /v=([^,]+)/.exec(body.subarray(4).toString())?.[1];
        this.serverVerified = v !== undefined && this.serverSignature !== undefined && Buffer.from(v, "base64").equals(this.serverSignature);
        return undefined;
      }
      default:
        throw new Error(`authentication method ${code} is not answered by the test client`);
    }
  }
}
