/**
 * NotificationResponse ('A': Int32 pid, String channel, String payload) on
 * its way to a tenant session, whose channels all carry the session's
 * prefix on the server (guard/channels.ts). A notification is delivered
 * only if its channel carries that prefix, and then with the prefix taken
 * off, so the client sees the name it listened on; any other is dropped.
 * This is what holds whatever the session did with SQL the guard cannot
 * read: a backend made to LISTEN on a raw or another tenant's channel
 * still passes nothing of it to the client. Pure: bytes in, bytes out.
 */

export const NOTIFICATION_RESPONSE = 0x41; // 'A'

/** What a dropped notification is replaced with: nothing. */
export const DROPPED = new Uint8Array(0);

/**
 * The largest NotificationResponse read: PostgreSQL's payloads are under
 * 8000 bytes and channels 63, so anything near this is not one it sent.
 */
export const MAX_NOTIFICATION = 16 * 1024;

/**
 * The NotificationResponse `bytes[start, end)` (header included) as a
 * session whose channels carry `prefix` may see it: rebuilt without the
 * prefix (one new buffer, the size of the message), or DROPPED.
 */
export function scopeNotification(bytes: Uint8Array, start: number, end: number, prefix: Uint8Array): Uint8Array {
  const channel = start + 9; // type, length, pid
  // The channel must carry the prefix and end (its NUL) inside the message.
  if (channel + prefix.length >= end) return DROPPED;
  for (let k = 0; k < prefix.length; k++) if (bytes[channel + k] !== prefix[k]) return DROPPED;
  const nul = bytes.subarray(channel + prefix.length, end).indexOf(0);
  if (nul < 0) return DROPPED;
  const out = new Uint8Array(end - start - prefix.length);
  out[0] = NOTIFICATION_RESPONSE;
  new DataView(out.buffer).setInt32(1, out.length - 1);
  out.set(bytes.subarray(start + 5, channel), 5);
  out.set(bytes.subarray(channel + prefix.length, end), 9);
  return out;
}
