// Settings from the environment, with the names the Python project reads (LORA_*), then from
// the embedded stack's dev.env (as every `loratrain` command does), so that against a running
// `loratrain dev` the backend needs no configuration but its own port.
import { readFileSync } from 'node:fs';
import { homedir } from 'node:os';
import path from 'node:path';
import { Webhook } from 'standardwebhooks';

export interface S3Settings {
  /** Where this backend reaches S3; unset: AWS. */
  endpoint?: string;
  /** Where browsers reach S3 (LORA_S3_PUBLIC_ENDPOINT_URL); upload URLs are signed for it. */
  publicEndpoint?: string;
  region: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  bucket: string;
}

export interface Config {
  temporalAddress: string;
  namespace: string;
  taskQueue: string;
  temporalUiUrl: string;
  codecKey: Buffer;
  codecKeyId: string;
  /** How long a status read waits for the run's worker to answer (LORA_QUERY_TIMEOUT_S). */
  queryTimeoutMs: number;
  s3: S3Settings;
  host: string;
  port: number;
  /** This backend's address as the worker reaches it: runs get `<publicUrl>/webhooks/loratrain`. */
  publicUrl?: string;
  /** The `whsec_` secret runs sign their webhooks with; the receiver verifies with it. */
  webhookSecret?: string;
  uploadUrlTtlS: number;
  maxUploadFiles: number;
}

export class ConfigError extends Error {}

const DEV_ENV_NAME = 'dev.env';

/** `$LORA_STATE_DIR`, else `$XDG_STATE_HOME/loratrain`, else `~/.local/state/loratrain`. */
export function stateDir(env: NodeJS.ProcessEnv): string {
  if (env.LORA_STATE_DIR) return env.LORA_STATE_DIR;
  const xdg = env.XDG_STATE_HOME ?? '';
  // The XDG spec says to ignore a relative value.
  const base = path.isAbsolute(xdg) ? xdg : path.join(homedir(), '.local', 'state');
  return path.join(base, 'loratrain');
}

/** The LORA_ values of a dev.env (`KEY="json string"` lines); none when there is no file. */
export function readDevEnv(file: string): Record<string, string> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch {
    return {};
  }
  const values: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const match = /^(LORA_[A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (!match) continue;
    const [, key, raw] = match as unknown as [string, string, string];
    values[key] = raw.startsWith('"') ? (JSON.parse(raw) as string) : raw;
  }
  return values;
}

/** The 32-byte key of `LORA_CODEC_KEY` (standard base64 with padding), or a ConfigError. */
export function parseCodecKey(encoded: string): Buffer {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(encoded) || encoded.length % 4 !== 0) {
    throw new ConfigError('LORA_CODEC_KEY must be base64 of 32 random bytes');
  }
  const key = Buffer.from(encoded, 'base64');
  if (key.length !== 32) {
    throw new ConfigError(`LORA_CODEC_KEY must decode to 32 bytes, not ${key.length}`);
  }
  return key;
}

function integer(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined || value === '') return fallback;
  const parsed = Number(value);
  if (!Number.isInteger(parsed) || parsed <= 0) {
    throw new ConfigError(`${name} must be a positive integer, not ${JSON.stringify(value)}`);
  }
  return parsed;
}

function seconds(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined || value === '') return fallback;
  const parsed = Number(value);
  if (!Number.isFinite(parsed) || parsed <= 0) {
    throw new ConfigError(
      `${name} must be a number of seconds above 0, not ${JSON.stringify(value)}`,
    );
  }
  return parsed;
}

export function loadConfig(environment: NodeJS.ProcessEnv = process.env): Config {
  const devEnvFile = path.join(stateDir(environment), DEV_ENV_NAME);
  // Real environment variables win over the file, as in the Python settings.
  const env: Record<string, string | undefined> = { ...readDevEnv(devEnvFile), ...environment };
  if (!env.LORA_CODEC_KEY) {
    throw new ConfigError(
      `LORA_CODEC_KEY is not set (base64 of 32 random bytes): set it to the worker's key, or ` +
        `start \`loratrain dev\` once (it writes one to ${devEnvFile})`,
    );
  }
  const webhookSecret = env.LORATRAIN_WEBHOOK_SECRET || undefined;
  if (webhookSecret !== undefined) {
    if (!/^whsec_[A-Za-z0-9+/=]{16,}$/.test(webhookSecret)) {
      throw new ConfigError('LORATRAIN_WEBHOOK_SECRET must be whsec_ followed by base64');
    }
    new Webhook(webhookSecret); // refuses a secret that is not base64 now, not at the first webhook
  }
  const publicUrl = env.BACKEND_PUBLIC_URL?.replace(/\/+$/, '') || undefined;
  if (publicUrl !== undefined && !/^https?:\/\//.test(publicUrl)) {
    throw new ConfigError(`BACKEND_PUBLIC_URL must be an http(s) URL, not ${publicUrl}`);
  }
  return {
    temporalAddress: env.LORA_TEMPORAL_ADDRESS || '127.0.0.1:7233',
    namespace: env.LORA_TEMPORAL_NAMESPACE || 'default',
    taskQueue: env.LORA_TASK_QUEUE || 'loratrain',
    temporalUiUrl: (env.LORA_TEMPORAL_UI_URL || 'http://127.0.0.1:8233').replace(/\/+$/, ''),
    codecKey: parseCodecKey(env.LORA_CODEC_KEY),
    codecKeyId: env.LORA_CODEC_KEY_ID || 'k1',
    queryTimeoutMs: 1000 * seconds('LORA_QUERY_TIMEOUT_S', env.LORA_QUERY_TIMEOUT_S, 10),
    s3: {
      endpoint: env.LORA_S3_ENDPOINT_URL || undefined,
      publicEndpoint: env.LORA_S3_PUBLIC_ENDPOINT_URL || undefined,
      region: env.LORA_S3_REGION || 'us-east-1',
      accessKeyId: env.LORA_S3_ACCESS_KEY_ID || undefined,
      secretAccessKey: env.LORA_S3_SECRET_ACCESS_KEY || undefined,
      bucket: env.LORA_BUCKET || 'loratrain',
    },
    host: env.BACKEND_HOST || '127.0.0.1',
    port: integer('BACKEND_PORT', env.BACKEND_PORT, 8090),
    publicUrl,
    webhookSecret,
    uploadUrlTtlS: integer('BACKEND_UPLOAD_URL_TTL_S', env.BACKEND_UPLOAD_URL_TTL_S, 3600),
    maxUploadFiles: integer('BACKEND_MAX_UPLOAD_FILES', env.BACKEND_MAX_UPLOAD_FILES, 2000),
  };
}
