// The payload codec of docs/codec.md: every payload, whole, sealed with AES-256-GCM.
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import type { Payload, PayloadCodec } from '@temporalio/common';
import { temporal } from '@temporalio/proto';

const ENCODING = 'binary/encrypted';
const NONCE_BYTES = 12;
const TAG_BYTES = 16;

const utf8 = new TextEncoder();
const text = (bytes: Uint8Array | null | undefined): string | undefined =>
  bytes == null ? undefined : Buffer.from(bytes).toString('utf8');

/** A payload this codec cannot open: another key, or changed bytes. */
export class CodecError extends Error {}

export class AesGcmCodec implements PayloadCodec {
  private readonly keys: ReadonlyMap<string, Buffer>;

  /**
   * `keys` maps key ids to 32-byte keys; payloads are encrypted with `encryptWith`'s key and
   * decoded with the key their `encryption-key-id` names (several keys can be read at once).
   */
  constructor(
    keys: ReadonlyMap<string, Buffer> | Record<string, Buffer>,
    private readonly encryptWith: string,
  ) {
    this.keys = keys instanceof Map ? keys : new Map(Object.entries(keys));
    for (const [id, key] of this.keys) {
      if (key.length !== 32) throw new Error(`codec key ${id} must be 32 bytes, not ${key.length}`);
    }
    if (!this.keys.has(encryptWith)) throw new Error(`no codec key with id ${encryptWith}`);
  }

  async encode(payloads: Payload[]): Promise<Payload[]> {
    const key = this.keys.get(this.encryptWith) as Buffer;
    return payloads.map((payload) => {
      const nonce = randomBytes(NONCE_BYTES);
      const cipher = createCipheriv('aes-256-gcm', key, nonce);
      const plaintext = temporal.api.common.v1.Payload.encode(payload).finish();
      const sealed = Buffer.concat([
        nonce,
        cipher.update(plaintext),
        cipher.final(),
        cipher.getAuthTag(),
      ]);
      return {
        metadata: {
          encoding: utf8.encode(ENCODING),
          'encryption-key-id': utf8.encode(this.encryptWith),
        },
        data: sealed,
      };
    });
  }

  async decode(payloads: Payload[]): Promise<Payload[]> {
    return payloads.map((payload) => {
      // Payloads written without the codec pass through as they are.
      if (text(payload.metadata?.encoding) !== ENCODING) return payload;
      const keyId = text(payload.metadata?.['encryption-key-id']);
      const key = keyId === undefined ? undefined : this.keys.get(keyId);
      if (key === undefined) {
        throw new CodecError(`payload encrypted with unknown key id ${JSON.stringify(keyId)}`);
      }
      const data = Buffer.from(payload.data ?? new Uint8Array());
      if (data.length < NONCE_BYTES + TAG_BYTES) {
        throw new CodecError('encrypted payload is too short');
      }
      const decipher = createDecipheriv('aes-256-gcm', key, data.subarray(0, NONCE_BYTES));
      decipher.setAuthTag(data.subarray(data.length - TAG_BYTES));
      let plaintext: Buffer;
      try {
        plaintext = Buffer.concat([
          decipher.update(data.subarray(NONCE_BYTES, data.length - TAG_BYTES)),
          decipher.final(), // throws when the tag does not match: a wrong key or a changed byte
        ]);
      } catch (e) {
        throw new CodecError(
          `cannot decrypt a payload with key ${keyId}: ${e instanceof Error ? e.message : e}`,
        );
      }
      return temporal.api.common.v1.Payload.decode(plaintext);
    });
  }
}
