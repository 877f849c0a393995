/**
 * Channel binding type tls-server-end-point (RFC 5929 §4.1): the hash of the
 * certificate the server presented, with the hash function of that
 * certificate's signature algorithm (SHA-256 where that is MD5 or SHA-1).
 * A SCRAM-SHA-256-PLUS client mixes it into its proof, so a proof made
 * through a man in the middle (another certificate) does not verify.
 *
 * The proxy terminates client TLS, so it can bind the client leg with its
 * own certificate. Pure: PEM in, binding data out; undefined when the
 * signature algorithm is one PostgreSQL would not bind either (Ed25519,
 * RSA-PSS), in which case -PLUS is simply not offered.
 */
import { createHash } from "node:crypto";

const HASH_OF_SIGNATURE: Record<string, string> = {
  "1.2.840.113549.1.1.4": "sha256", // md5WithRSAEncryption → SHA-256
  "1.2.840.113549.1.1.5": "sha256", // sha1WithRSAEncryption → SHA-256
  "1.2.840.113549.1.1.11": "sha256",
  "1.2.840.113549.1.1.12": "sha384",
  "1.2.840.113549.1.1.13": "sha512",
  "1.2.840.113549.1.1.14": "sha224",
  "1.2.840.10045.4.1": "sha256", // ecdsa-with-SHA1 → SHA-256
  "1.2.840.10045.4.3.1": "sha224",
  "1.2.840.10045.4.3.2": "sha256",
  "1.2.840.10045.4.3.3": "sha384",
  "1.2.840.10045.4.3.4": "sha512",
};

/** The binding data for the first (leaf) certificate of a PEM chain. */
export function tlsServerEndPoint(certPem: string): Uint8Array | undefined {
  const m = /-----BEGIN CERTIFICATE-----([\s\S]*?)-----END CERTIFICATE-----/.exec(certPem);
  if (!m) return undefined;
  const der = Buffer.from(m[1]!.replace(/\s+/g, ""), "base64");
  const oid = signatureAlgorithm(der);
  const hash = oid && HASH_OF_SIGNATURE[oid];
  return hash ? new Uint8Array(createHash(hash).update(der).digest()) : undefined;
}

/**
 * Certificate ::= SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm
 * SEQUENCE { algorithm OID, … }, signatureValue BIT STRING }: the OID, read
 * with just enough DER to get there.
 */
export function signatureAlgorithm(der: Uint8Array): string | undefined {
  const cert = element(der, 0, 0x30);
  if (!cert) return undefined;
  const tbs = element(der, cert.content, 0x30);
  if (!tbs) return undefined;
  const algorithm = element(der, tbs.end, 0x30);
  if (!algorithm) return undefined;
  const oid = element(der, algorithm.content, 0x06);
  return oid ? decodeOid(der.subarray(oid.content, oid.end)) : undefined;
}

/** One DER element at `at` with tag `tag`: where its content starts and it ends. */
function element(der: Uint8Array, at: number, tag: number): { content: number; end: number } | undefined {
  if (at + 2 > der.length || der[at] !== tag) return undefined;
  let length = der[at + 1]!;
  let content = at + 2;
  if (length & 0x80) {
    const bytes = length & 0x7f;
    if (bytes === 0 || bytes > 4 || content + bytes > der.length) return undefined;
    length = 0;
    for (let i = 0; i < bytes; i++) length = length * 256 + der[content + i]!;
    content += bytes;
  }
  const end = content + length;
  return end <= der.length ? { content, end } : undefined;
}

function decodeOid(bytes: Uint8Array): string | undefined {
  if (bytes.length === 0) return undefined;
  const head = bytes[0]!;
  const parts = head < 80 ? [Math.floor(head / 40), head % 40] : [2, head - 80];
  let value = 0;
  for (let i = 1; i < bytes.length; i++) {
    value = value * 128 + (bytes[i]! & 0x7f);
    if (!(bytes[i]! & 0x80)) {
      parts.push(value);
      value = 0;
    }
  }
  return parts.join(".");
}
