/**
 * Cancel keys. Clients never see a server's BackendKeyData: each session gets
 * a random key of its own (so keys cannot be guessed from server pids, and a
 * session can later move between server connections), and a CancelRequest
 * carrying it is forwarded with the key of the server it is attached to.
 */

export interface CancelKey {
  processId: number;
  secretKey: number;
}

export interface Cancellable {
  cancel(): void;
}

export class CancelRegistry {
  private readonly sessions = new Map<string, Cancellable>();

  /** A fresh key, unique among live sessions. */
  issue(session: Cancellable): CancelKey {
    const words = new Int32Array(2);
    for (;;) {
      crypto.getRandomValues(words);
      // Process ids are positive in every client's eyes.
      const key = { processId: (words[0]! & 0x7fffffff) || 1, secretKey: words[1]! };
      const id = keyId(key.processId, key.secretKey);
      if (!this.sessions.has(id)) {
        this.sessions.set(id, session);
        return key;
      }
    }
  }

  release(key: CancelKey): void {
    this.sessions.delete(keyId(key.processId, key.secretKey));
  }

  find(processId: number, secretKey: Uint8Array): Cancellable | undefined {
    if (secretKey.length !== 4) return undefined;
    const secret = new DataView(secretKey.buffer, secretKey.byteOffset, 4).getInt32(0);
    return this.sessions.get(keyId(processId, secret));
  }
}

const keyId = (processId: number, secretKey: number) => `${processId}:${secretKey}`;
