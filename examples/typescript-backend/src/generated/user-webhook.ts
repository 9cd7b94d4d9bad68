/* Generated from schemas/user-webhook.schema.json by `npm run generate`; do not edit by hand. */

/**
 * The JSON body POSTed to the user's webhook URL, signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature` headers, the user's `whsec_` secret). `type` says which event it is and what `data` holds.
 */
export type UserWebhookBody =
  | StatusWebhook
  | ProgressWebhook
  | EpochWebhook
  | CompletedWebhook
  | FailedWebhook
  | StalledWebhook
  | CancelledWebhook;
/**
 * The status the run just entered.
 */
export type RunStatusName =
  | 'pending'
  | 'pendingGpu'
  | 'pendingImages'
  | 'pendingModel'
  | 'training'
  | 'completed'
  | 'stalled'
  | 'failed'
  | 'cancelled';

/**
 * Every status change.
 */
export interface StatusWebhook {
  data: StatusData;
  /**
   * The run (its workflow id).
   */
  run_id: string;
  /**
   * When the event happened: UTC, ISO 8601, ending in `Z`.
   */
  timestamp: string;
  type: 'training.status';
}
export interface StatusData {
  status: RunStatusName;
  /**
   * The run status's `version` after this change.
   */
  version: number;
}
/**
 * Training progress, at most every 30 s and 5 %.
 */
export interface ProgressWebhook {
  data: ProgressData;
  /**
   * The run (its workflow id).
   */
  run_id: string;
  /**
   * When the event happened: UTC, ISO 8601, ending in `Z`.
   */
  timestamp: string;
  type: 'training.progress';
}
export interface ProgressData {
  epoch?: number | null;
  eta_s?: number | null;
  it_per_s?: number | null;
  loss?: number | null;
  percent?: number;
  step?: number;
  total?: number;
  total_epochs?: number | null;
  /**
   * The run status's `version` when this progress was sent.
   */
  version: number;
}
/**
 * An epoch's LoRA and samples are saved (every epoch, as it ends).
 */
export interface EpochWebhook {
  data: EpochData;
  /**
   * The run (its workflow id).
   */
  run_id: string;
  /**
   * When the event happened: UTC, ISO 8601, ending in `Z`.
   */
  timestamp: string;
  type: 'training.epoch';
}
export interface EpochData {
  /**
   * The GPU attempt that trained it.
   */
  attempt: number;
  /**
   * Where the files' keys are.
   */
  bucket?: string | null;
  epoch: number;
  lora: EpochFileWithUrl;
  loss?: number | null;
  samples: EpochFileWithUrl[];
  step: number;
  /**
   * The run status's `version` when the epoch was saved.
   */
  version: number;
}
export interface EpochFileWithUrl {
  bytes: number;
  key: string;
  sha256: string;
  /**
   * Presigned GET of the file (expires).
   */
  url: string;
}
/**
 * The model was uploaded and verified.
 */
export interface CompletedWebhook {
  data: CompletedData;
  /**
   * The run (its workflow id).
   */
  run_id: string;
  /**
   * When the event happened: UTC, ISO 8601, ending in `Z`.
   */
  timestamp: string;
  type: 'training.completed';
}
export interface CompletedData {
  /**
   * Presigned GET of the model (expires; `loratrain download` makes a new one).
   */
  download_url: string | null;
  /**
   * Every saved epoch (`loratrain download --epoch N`).
   */
  epochs?: SavedEpochInfo[] | null;
  /**
   * Why the run ended so; absent when it completed.
   */
  error?: RunError | null;
  model: ModelResult;
  status: 'completed';
  /**
   * Sent only by runs on the first (legacy) workflow code; newer ones omit it.
   */
  version?: number | null;
}
/**
 * One epoch whose files are all in S3 (its manifest written last).
 */
export interface SavedEpochInfo {
  /**
   * The GPU attempt that trained it.
   */
  attempt: number;
  /**
   * Where the files' keys are.
   */
  bucket?: string | null;
  epoch: number;
  lora: EpochFile;
  loss?: number | null;
  manifest_key: string;
  samples?: EpochFile[];
  /**
   * The training state a replacement resumes from (deleted when the run closes).
   */
  state?: EpochFile | null;
  step?: number;
}
export interface EpochFile {
  bytes: number;
  key: string;
  sha256: string;
}
export interface RunError {
  code: string;
  log_tail?: string[];
  message: string;
  stage?: string | null;
}
/**
 * The verified model.
 */
export interface ModelResult {
  bytes: number;
  epoch?: number | null;
  location: S3Location;
  loss?: number | null;
  sha256: string;
}
export interface S3Location {
  bucket: string;
  key: string;
}
/**
 * The run ended on an explicit error (bad input, the runner failed, cost cap, ...).
 */
export interface FailedWebhook {
  data: FailedData;
  /**
   * The run (its workflow id).
   */
  run_id: string;
  /**
   * When the event happened: UTC, ISO 8601, ending in `Z`.
   */
  timestamp: string;
  type: 'training.failed';
}
export interface FailedData {
  /**
   * Presigned GET of the model; present whenever `model` is.
   */
  download_url?: string | null;
  /**
   * Every saved epoch (`loratrain download --epoch N`).
   */
  epochs?: SavedEpochInfo[] | null;
  error: RunError;
  /**
   * The verified model, when the run got that far.
   */
  model?: ModelResult1 | null;
  status: 'failed';
  /**
   * Sent only by runs on the first (legacy) workflow code; newer ones omit it.
   */
  version?: number | null;
}
export interface ModelResult1 {
  bytes: number;
  epoch?: number | null;
  location: S3Location;
  loss?: number | null;
  sha256: string;
}
/**
 * A status outlived its deadline with no progress.
 */
export interface StalledWebhook {
  data: StalledData;
  /**
   * The run (its workflow id).
   */
  run_id: string;
  /**
   * When the event happened: UTC, ISO 8601, ending in `Z`.
   */
  timestamp: string;
  type: 'training.stalled';
}
export interface StalledData {
  /**
   * Presigned GET of the model; present whenever `model` is.
   */
  download_url?: string | null;
  /**
   * Every saved epoch (`loratrain download --epoch N`).
   */
  epochs?: SavedEpochInfo[] | null;
  error: RunError;
  /**
   * The verified model, when the run got that far.
   */
  model?: ModelResult1 | null;
  status: 'stalled';
  /**
   * Sent only by runs on the first (legacy) workflow code; newer ones omit it.
   */
  version?: number | null;
}
/**
 * The user cancelled the run.
 */
export interface CancelledWebhook {
  data: CancelledData;
  /**
   * The run (its workflow id).
   */
  run_id: string;
  /**
   * When the event happened: UTC, ISO 8601, ending in `Z`.
   */
  timestamp: string;
  type: 'training.cancelled';
}
export interface CancelledData {
  /**
   * Presigned GET of the model; present whenever `model` is.
   */
  download_url?: string | null;
  /**
   * Every saved epoch (`loratrain download --epoch N`).
   */
  epochs?: SavedEpochInfo[] | null;
  error: RunError;
  /**
   * The verified model, when the run got that far.
   */
  model?: ModelResult1 | null;
  status: 'cancelled';
  /**
   * Sent only by runs on the first (legacy) workflow code; newer ones omit it.
   */
  version?: number | null;
}
