/* Generated from schemas/run-status.schema.json by `npm run generate`; do not edit by hand. */

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
 * A training run's status: the answer of the `status` query and `wait_for_change` update, and the workflow's result when it completes. Every key is always present; `version` grows by one on every change.
 */
export interface RunStatus {
  attempt: number;
  /**
   * Epoch of the lowest loss.
   */
  best_checkpoint: number | null;
  cost_usd: number;
  /**
   * Presigned GET of the verified model.
   */
  download_url: string | null;
  epoch_losses: number[];
  /**
   * Every saved epoch, in order (`download --epoch N`).
   */
  epochs: SavedEpochInfo[];
  error: RunError | null;
  /**
   * Set by clients from Temporal, never by the workflow: 'terminated' or 'timed_out' when Temporal ended the run before it reached a final status.
   */
  execution_status: string | null;
  gpu: GpuInfo | null;
  /**
   * Why each replaced GPU was given up, in order.
   */
  gpu_failures: string[];
  /**
   * A GPU the run could not destroy within its limit (instance id and last error); the reaper keeps destroying it.
   */
  gpu_not_released: string | null;
  history: StatusChange[];
  /**
   * When a cancel arrived after the run had reached its outcome (model verified and final webhook queued); the outcome stands.
   */
  late_cancel_at: string | null;
  progress: Progress | null;
  result: ModelResult | null;
  /**
   * Each resume of the run on a new host, e.g. 'resumed from epoch 7 on attempt 2'.
   */
  resumed: string[];
  run_id: string;
  status: RunStatusName;
  version: number;
  /**
   * Set while a deadline passed with the relay down (why it is down): the GPU's events cannot reach the run, so the run waits for the relay instead of stalling.
   */
  waiting_for_relay: string | null;
  /**
   * Set by clients from Temporal, never by the workflow: the run's activities that failed and are being retried (why the status does not move); empty otherwise.
   */
  waiting_on: WaitingOn[];
  /**
   * Set by clients from the run's webhook children, never by the workflow.
   */
  webhooks: WebhookDeliveries | null;
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
  bucket: string | null;
  epoch: number;
  lora: EpochFile;
  loss: number | null;
  manifest_key: string;
  samples: EpochFile[];
  /**
   * The training state a replacement resumes from (deleted when the run closes).
   */
  state: EpochFile | null;
  step: number;
}
export interface EpochFile {
  bytes: number;
  key: string;
  sha256: string;
}
export interface RunError {
  code: string;
  log_tail: string[];
  message: string;
  stage: string | null;
}
export interface GpuInfo {
  country: string | null;
  dollars_per_hour: number | null;
  gpu_name: string | null;
  host_id: string | null;
  instance_id: string;
  machine_id: string | null;
  provider: string;
  started_at: string | null;
}
export interface StatusChange {
  at: string;
  status: RunStatusName;
}
export interface Progress {
  epoch: number | null;
  eta_s: number | null;
  it_per_s: number | null;
  loss: number | null;
  percent: number;
  step: number;
  total: number;
  total_epochs: number | null;
}
export interface ModelResult {
  bytes: number;
  epoch: number | null;
  location: S3Location;
  loss: number | null;
  sha256: string;
}
export interface S3Location {
  bucket: string;
  key: string;
}
/**
 * One activity of the run that has failed at least once and is being retried, as Temporal
 * describes it (see client/waiting.py).
 */
export interface WaitingOn {
  activity: string;
  attempt: number;
  error_type: string | null;
  last_error: string | null;
  maximum_attempts: number | null;
  next_attempt_at: string | null;
  state: string;
  waiting_for: string;
}
/**
 * A run's user webhooks, counted by where their delivery stands (set by clients, from
 * the run's webhook children, never by the workflow).
 */
export interface WebhookDeliveries {
  delivering: number;
  failing: number;
  /**
   * Refused by the receiver, or out of attempts.
   */
  given_up: number;
  last_error: string | null;
  sent: number;
}
