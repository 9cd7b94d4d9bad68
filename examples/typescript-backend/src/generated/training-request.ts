/* Generated from schemas/training-request.schema.json by `npm run generate`; do not edit by hand. */

/**
 * The input of the `TrainingWorkflow` workflow type: one training run. The workflow id is the run id. Sent as a `json/plain` payload, encrypted by the codec (docs/codec.md).
 */
export interface TrainingRequest {
  civitai_api_key?: string | null;
  /**
   * History events per execution before the run continues as new (operations).
   */
  continue_as_new_after_events?: number;
  deadlines?: Deadlines;
  gpu?: GpuRequirements;
  images: S3Prefix;
  /**
   * Which saved epoch's LoRA is the run's model: the lowest loss, or the last.
   */
  keep?: 'lowest_loss' | 'last';
  /**
   * The run ends failed (cost_cap), its GPU destroyed, before this is spent.
   */
  max_cost_usd?: number | null;
  max_gpu_attempts?: number;
  /**
   * civitai:<versionId>, an https URL, s3://bucket/key, or a local path (local provider only).
   */
  model: string;
  /**
   * Files the model's family loads beside it, by role (clip_l, clip_g, t5xxl, ae), in the same schemes as `model` plus hf:<repo>[@rev]/<file>. A role the checkpoint holds needs none; one left out takes the family's default source.
   */
  model_files?: {
    [k: string]: string;
  };
  output?: OutputLocation;
  /**
   * A replacement GPU resumes from the last complete saved epoch; false: it trains from the start.
   */
  resume?: boolean;
  samples?: SampleSettings;
  trainer?: 'sd-scripts' | 'builtin';
  training?: TrainingConfig;
  webhook?: UserWebhook | null;
}
/**
 * Seconds each status may last without progress (see DESIGN.md, Statuses).
 */
export interface Deadlines {
  pending_gpu_s?: number;
  pending_images_s?: number;
  pending_model_s?: number;
  pending_s?: number;
  training_idle_s?: number;
  training_total_s?: number;
}
export interface GpuRequirements {
  /**
   * ISO codes never rented in (Civitai geofences some regions).
   */
  blocked_countries?: string[];
  /**
   * ISO codes of the only countries allowed; empty: any.
   */
  countries?: string[];
  disk_gb?: number;
  /**
   * Empty: any GPU that fits.
   */
  gpu_names?: string[];
  max_dollars_per_hour?: number;
  min_download_mbps?: number;
  min_reliability?: number;
  min_vram_gb?: number;
}
export interface S3Prefix {
  bucket: string;
  prefix?: string;
}
/**
 * Where the trained model goes; unset parts default to the worker bucket and the run key.
 */
export interface OutputLocation {
  bucket?: string | null;
  key?: string | null;
}
/**
 * Images rendered with each saved epoch's LoRA (`enabled: false`: none).
 */
export interface SampleSettings {
  /**
   * Captions sampled without prompts.
   */
  count?: number;
  enabled?: boolean;
  every_n_epochs?: number;
  /**
   * None: the family's (7, Flux.1 3.5, SD 3.5 5).
   */
  guidance?: number | null;
  /**
   * None: the resolution.
   */
  height?: number | null;
  negative_prompt?: string;
  /**
   * Empty: the first `count` of the dataset's own captions, trigger word first.
   *
   * @maxItems 16
   */
  prompts?:
    | []
    | [string]
    | [string, string]
    | [string, string, string]
    | [string, string, string, string]
    | [string, string, string, string, string]
    | [string, string, string, string, string, string]
    | [string, string, string, string, string, string, string]
    | [string, string, string, string, string, string, string, string]
    | [string, string, string, string, string, string, string, string, string]
    | [string, string, string, string, string, string, string, string, string, string]
    | [string, string, string, string, string, string, string, string, string, string, string]
    | [
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string
      ]
    | [
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string
      ]
    | [
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string
      ]
    | [
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string
      ]
    | [
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string,
        string
      ];
  sampler?:
    | 'ddim'
    | 'pndm'
    | 'lms'
    | 'euler'
    | 'euler_a'
    | 'heun'
    | 'dpm_2'
    | 'dpm_2_a'
    | 'dpmsolver'
    | 'dpmsolver++'
    | 'dpmsingle'
    | 'k_lms'
    | 'k_euler'
    | 'k_euler_a'
    | 'k_dpm_2'
    | 'k_dpm_2_a';
  seed?: number;
  steps?: number;
  /**
   * None: the resolution.
   */
  width?: number | null;
}
/**
 * sd-scripts hyper-parameters. Fields left as None take the base model family's default.
 */
export interface TrainingConfig {
  batch_size?: number | null;
  blocks_to_swap?: number | null;
  class_word?: string | null;
  discrete_flow_shift?: number | null;
  epochs?: number;
  fp8_base?: boolean | null;
  gradient_checkpointing?: boolean | null;
  guidance_scale?: number | null;
  keep_tokens?: number;
  lr_scheduler?:
    | 'constant'
    | 'constant_with_warmup'
    | 'cosine'
    | 'cosine_with_restarts'
    | 'linear'
    | 'polynomial';
  lr_warmup_steps?: number;
  max_train_steps?: number | null;
  mixed_precision?: ('no' | 'fp16' | 'bf16') | null;
  network_alpha?: number | null;
  network_dim?: number | null;
  optimizer?:
    | 'AdamW'
    | 'AdamW8bit'
    | 'Lion'
    | 'Lion8bit'
    | 'Prodigy'
    | 'Adafactor'
    | 'DAdaptAdam'
    | 'SGDNesterov';
  output_name?: string;
  repeats?: number;
  resolution?: number | null;
  seed?: number;
  text_encoder_lr?: number | null;
  timestep_sampling?: ('sigma' | 'uniform' | 'sigmoid' | 'shift' | 'flux_shift') | null;
  trigger_word?: string | null;
  unet_lr?: number | null;
  weighting_scheme?:
    ('sigma_sqrt' | 'logit_normal' | 'mode' | 'cosmap' | 'none' | 'uniform') | null;
}
export interface UserWebhook {
  /**
   * None: every event.
   */
  events?:
    | (
        | 'training.status'
        | 'training.progress'
        | 'training.epoch'
        | 'training.completed'
        | 'training.failed'
        | 'training.stalled'
        | 'training.cancelled'
      )[]
    | null;
  secret: string;
  url: string;
}
