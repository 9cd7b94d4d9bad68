/* Generated from schemas/*.schema.json by `npm run generate`; do not edit by hand. */

export const runStatusSchema: Record<string, unknown> = {
  "$defs": {
    "EpochFile": {
      "additionalProperties": false,
      "properties": {
        "bytes": {
          "minimum": 0,
          "title": "Bytes",
          "type": "integer"
        },
        "key": {
          "title": "Key",
          "type": "string"
        },
        "sha256": {
          "pattern": "^[0-9a-f]{64}$",
          "title": "Sha256",
          "type": "string"
        }
      },
      "required": [
        "key",
        "bytes",
        "sha256"
      ],
      "title": "EpochFile",
      "type": "object"
    },
    "GpuInfo": {
      "additionalProperties": false,
      "properties": {
        "country": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Country"
        },
        "dollars_per_hour": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Dollars Per Hour"
        },
        "gpu_name": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Gpu Name"
        },
        "host_id": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Host Id"
        },
        "instance_id": {
          "title": "Instance Id",
          "type": "string"
        },
        "machine_id": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Machine Id"
        },
        "provider": {
          "title": "Provider",
          "type": "string"
        },
        "started_at": {
          "anyOf": [
            {
              "format": "date-time",
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Started At"
        }
      },
      "required": [
        "provider",
        "instance_id",
        "gpu_name",
        "dollars_per_hour",
        "started_at",
        "machine_id",
        "host_id",
        "country"
      ],
      "title": "GpuInfo",
      "type": "object"
    },
    "ModelResult": {
      "additionalProperties": false,
      "properties": {
        "bytes": {
          "title": "Bytes",
          "type": "integer"
        },
        "epoch": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Epoch"
        },
        "location": {
          "$ref": "#/$defs/S3Location"
        },
        "loss": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Loss"
        },
        "sha256": {
          "title": "Sha256",
          "type": "string"
        }
      },
      "required": [
        "location",
        "bytes",
        "sha256",
        "epoch",
        "loss"
      ],
      "title": "ModelResult",
      "type": "object"
    },
    "Progress": {
      "additionalProperties": false,
      "properties": {
        "epoch": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Epoch"
        },
        "eta_s": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Eta S"
        },
        "it_per_s": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "It Per S"
        },
        "loss": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Loss"
        },
        "percent": {
          "default": 0,
          "title": "Percent",
          "type": "number"
        },
        "step": {
          "default": 0,
          "title": "Step",
          "type": "integer"
        },
        "total": {
          "default": 0,
          "title": "Total",
          "type": "integer"
        },
        "total_epochs": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Total Epochs"
        }
      },
      "required": [
        "step",
        "total",
        "epoch",
        "total_epochs",
        "percent",
        "loss",
        "it_per_s",
        "eta_s"
      ],
      "title": "Progress",
      "type": "object"
    },
    "RunError": {
      "additionalProperties": false,
      "properties": {
        "code": {
          "title": "Code",
          "type": "string"
        },
        "log_tail": {
          "items": {
            "type": "string"
          },
          "title": "Log Tail",
          "type": "array"
        },
        "message": {
          "title": "Message",
          "type": "string"
        },
        "stage": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Stage"
        }
      },
      "required": [
        "code",
        "message",
        "stage",
        "log_tail"
      ],
      "title": "RunError",
      "type": "object"
    },
    "RunStatusName": {
      "enum": [
        "pending",
        "pendingGpu",
        "pendingImages",
        "pendingModel",
        "training",
        "completed",
        "stalled",
        "failed",
        "cancelled"
      ],
      "title": "RunStatusName",
      "type": "string"
    },
    "S3Location": {
      "additionalProperties": false,
      "properties": {
        "bucket": {
          "pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
          "title": "Bucket",
          "type": "string"
        },
        "key": {
          "maxLength": 1024,
          "minLength": 1,
          "title": "Key",
          "type": "string"
        }
      },
      "required": [
        "bucket",
        "key"
      ],
      "title": "S3Location",
      "type": "object"
    },
    "SavedEpochInfo": {
      "additionalProperties": false,
      "description": "One epoch whose files are all in S3 (its manifest written last).",
      "properties": {
        "attempt": {
          "description": "The GPU attempt that trained it.",
          "title": "Attempt",
          "type": "integer"
        },
        "bucket": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Where the files' keys are.",
          "title": "Bucket"
        },
        "epoch": {
          "title": "Epoch",
          "type": "integer"
        },
        "lora": {
          "$ref": "#/$defs/EpochFile"
        },
        "loss": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Loss"
        },
        "manifest_key": {
          "title": "Manifest Key",
          "type": "string"
        },
        "samples": {
          "items": {
            "$ref": "#/$defs/EpochFile"
          },
          "title": "Samples",
          "type": "array"
        },
        "state": {
          "anyOf": [
            {
              "$ref": "#/$defs/EpochFile"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "The training state a replacement resumes from (deleted when the run closes)."
        },
        "step": {
          "default": 0,
          "title": "Step",
          "type": "integer"
        }
      },
      "required": [
        "epoch",
        "loss",
        "step",
        "attempt",
        "bucket",
        "lora",
        "samples",
        "state",
        "manifest_key"
      ],
      "title": "SavedEpochInfo",
      "type": "object"
    },
    "StatusChange": {
      "additionalProperties": false,
      "properties": {
        "at": {
          "format": "date-time",
          "title": "At",
          "type": "string"
        },
        "status": {
          "$ref": "#/$defs/RunStatusName"
        }
      },
      "required": [
        "status",
        "at"
      ],
      "title": "StatusChange",
      "type": "object"
    },
    "WaitingOn": {
      "additionalProperties": false,
      "description": "One activity of the run that has failed at least once and is being retried, as Temporal\ndescribes it (see client/waiting.py).",
      "properties": {
        "activity": {
          "title": "Activity",
          "type": "string"
        },
        "attempt": {
          "title": "Attempt",
          "type": "integer"
        },
        "error_type": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Error Type"
        },
        "last_error": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Last Error"
        },
        "maximum_attempts": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Maximum Attempts"
        },
        "next_attempt_at": {
          "anyOf": [
            {
              "format": "date-time",
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Next Attempt At"
        },
        "state": {
          "title": "State",
          "type": "string"
        },
        "waiting_for": {
          "title": "Waiting For",
          "type": "string"
        }
      },
      "required": [
        "activity",
        "waiting_for",
        "attempt",
        "maximum_attempts",
        "state",
        "last_error",
        "error_type",
        "next_attempt_at"
      ],
      "title": "WaitingOn",
      "type": "object"
    },
    "WebhookDeliveries": {
      "additionalProperties": false,
      "description": "A run's user webhooks, counted by where their delivery stands (set by clients, from\nthe run's webhook children, never by the workflow).",
      "properties": {
        "delivering": {
          "default": 0,
          "title": "Delivering",
          "type": "integer"
        },
        "failing": {
          "default": 0,
          "title": "Failing",
          "type": "integer"
        },
        "given_up": {
          "default": 0,
          "description": "Refused by the receiver, or out of attempts.",
          "title": "Given Up",
          "type": "integer"
        },
        "last_error": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Last Error"
        },
        "sent": {
          "default": 0,
          "title": "Sent",
          "type": "integer"
        }
      },
      "required": [
        "sent",
        "delivering",
        "failing",
        "given_up",
        "last_error"
      ],
      "title": "WebhookDeliveries",
      "type": "object"
    }
  },
  "$id": "urn:loratrain:schema:run-status",
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "additionalProperties": false,
  "description": "A training run's status: the answer of the `status` query and `wait_for_change` update, and the workflow's result when it completes. Every key is always present; `version` grows by one on every change.",
  "properties": {
    "attempt": {
      "default": 0,
      "title": "Attempt",
      "type": "integer"
    },
    "best_checkpoint": {
      "anyOf": [
        {
          "type": "integer"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "description": "Epoch of the lowest loss.",
      "title": "Best Checkpoint"
    },
    "cost_usd": {
      "default": 0,
      "title": "Cost Usd",
      "type": "number"
    },
    "download_url": {
      "anyOf": [
        {
          "type": "string"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "description": "Presigned GET of the verified model.",
      "title": "Download Url"
    },
    "epoch_losses": {
      "items": {
        "type": "number"
      },
      "title": "Epoch Losses",
      "type": "array"
    },
    "epochs": {
      "description": "Every saved epoch, in order (`download --epoch N`).",
      "items": {
        "$ref": "#/$defs/SavedEpochInfo"
      },
      "title": "Epochs",
      "type": "array"
    },
    "error": {
      "anyOf": [
        {
          "$ref": "#/$defs/RunError"
        },
        {
          "type": "null"
        }
      ],
      "default": null
    },
    "execution_status": {
      "anyOf": [
        {
          "type": "string"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "description": "Set by clients from Temporal, never by the workflow: 'terminated' or 'timed_out' when Temporal ended the run before it reached a final status.",
      "title": "Execution Status"
    },
    "gpu": {
      "anyOf": [
        {
          "$ref": "#/$defs/GpuInfo"
        },
        {
          "type": "null"
        }
      ],
      "default": null
    },
    "gpu_failures": {
      "description": "Why each replaced GPU was given up, in order.",
      "items": {
        "type": "string"
      },
      "title": "Gpu Failures",
      "type": "array"
    },
    "gpu_not_released": {
      "anyOf": [
        {
          "type": "string"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "description": "A GPU the run could not destroy within its limit (instance id and last error); the reaper keeps destroying it.",
      "title": "Gpu Not Released"
    },
    "history": {
      "items": {
        "$ref": "#/$defs/StatusChange"
      },
      "title": "History",
      "type": "array"
    },
    "late_cancel_at": {
      "anyOf": [
        {
          "format": "date-time",
          "type": "string"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "description": "When a cancel arrived after the run had reached its outcome (model verified and final webhook queued); the outcome stands.",
      "title": "Late Cancel At"
    },
    "progress": {
      "anyOf": [
        {
          "$ref": "#/$defs/Progress"
        },
        {
          "type": "null"
        }
      ],
      "default": null
    },
    "result": {
      "anyOf": [
        {
          "$ref": "#/$defs/ModelResult"
        },
        {
          "type": "null"
        }
      ],
      "default": null
    },
    "resumed": {
      "description": "Each resume of the run on a new host, e.g. 'resumed from epoch 7 on attempt 2'.",
      "items": {
        "type": "string"
      },
      "title": "Resumed",
      "type": "array"
    },
    "run_id": {
      "title": "Run Id",
      "type": "string"
    },
    "status": {
      "$ref": "#/$defs/RunStatusName"
    },
    "version": {
      "default": 0,
      "title": "Version",
      "type": "integer"
    },
    "waiting_for_relay": {
      "anyOf": [
        {
          "type": "string"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "description": "Set while a deadline passed with the relay down (why it is down): the GPU's events cannot reach the run, so the run waits for the relay instead of stalling.",
      "title": "Waiting For Relay"
    },
    "waiting_on": {
      "description": "Set by clients from Temporal, never by the workflow: the run's activities that failed and are being retried (why the status does not move); empty otherwise.",
      "items": {
        "$ref": "#/$defs/WaitingOn"
      },
      "title": "Waiting On",
      "type": "array"
    },
    "webhooks": {
      "anyOf": [
        {
          "$ref": "#/$defs/WebhookDeliveries"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "description": "Set by clients from the run's webhook children, never by the workflow."
    }
  },
  "required": [
    "run_id",
    "status",
    "version",
    "history",
    "attempt",
    "progress",
    "gpu",
    "cost_usd",
    "best_checkpoint",
    "epoch_losses",
    "epochs",
    "resumed",
    "result",
    "download_url",
    "gpu_failures",
    "error",
    "webhooks",
    "gpu_not_released",
    "waiting_for_relay",
    "late_cancel_at",
    "execution_status",
    "waiting_on"
  ],
  "title": "RunStatus",
  "type": "object"
};

export const trainingRequestSchema: Record<string, unknown> = {
  "$defs": {
    "Deadlines": {
      "additionalProperties": false,
      "description": "Seconds each status may last without progress (see DESIGN.md, Statuses).",
      "properties": {
        "pending_gpu_s": {
          "default": 1200,
          "exclusiveMinimum": 0,
          "title": "Pending Gpu S",
          "type": "integer"
        },
        "pending_images_s": {
          "default": 900,
          "exclusiveMinimum": 0,
          "title": "Pending Images S",
          "type": "integer"
        },
        "pending_model_s": {
          "default": 1800,
          "exclusiveMinimum": 0,
          "title": "Pending Model S",
          "type": "integer"
        },
        "pending_s": {
          "default": 900,
          "exclusiveMinimum": 0,
          "title": "Pending S",
          "type": "integer"
        },
        "training_idle_s": {
          "default": 600,
          "exclusiveMinimum": 0,
          "title": "Training Idle S",
          "type": "integer"
        },
        "training_total_s": {
          "default": 43200,
          "exclusiveMinimum": 0,
          "title": "Training Total S",
          "type": "integer"
        }
      },
      "title": "Deadlines",
      "type": "object"
    },
    "GpuRequirements": {
      "additionalProperties": false,
      "properties": {
        "blocked_countries": {
          "description": "ISO codes never rented in (Civitai geofences some regions).",
          "items": {
            "pattern": "^[A-Z]{2}$",
            "type": "string"
          },
          "title": "Blocked Countries",
          "type": "array"
        },
        "countries": {
          "description": "ISO codes of the only countries allowed; empty: any.",
          "items": {
            "pattern": "^[A-Z]{2}$",
            "type": "string"
          },
          "title": "Countries",
          "type": "array"
        },
        "disk_gb": {
          "default": 40,
          "maximum": 2000,
          "minimum": 10,
          "title": "Disk Gb",
          "type": "integer"
        },
        "gpu_names": {
          "description": "Empty: any GPU that fits.",
          "items": {
            "type": "string"
          },
          "title": "Gpu Names",
          "type": "array"
        },
        "max_dollars_per_hour": {
          "default": 1,
          "exclusiveMinimum": 0,
          "maximum": 50,
          "title": "Max Dollars Per Hour",
          "type": "number"
        },
        "min_download_mbps": {
          "default": 200,
          "maximum": 100000,
          "minimum": 0,
          "title": "Min Download Mbps",
          "type": "number"
        },
        "min_reliability": {
          "default": 0.95,
          "maximum": 1,
          "minimum": 0,
          "title": "Min Reliability",
          "type": "number"
        },
        "min_vram_gb": {
          "default": 16,
          "maximum": 200,
          "minimum": 4,
          "title": "Min Vram Gb",
          "type": "integer"
        }
      },
      "title": "GpuRequirements",
      "type": "object"
    },
    "OutputLocation": {
      "additionalProperties": false,
      "description": "Where the trained model goes; unset parts default to the worker bucket and the run key.",
      "properties": {
        "bucket": {
          "anyOf": [
            {
              "pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Bucket"
        },
        "key": {
          "anyOf": [
            {
              "maxLength": 1024,
              "minLength": 1,
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Key"
        }
      },
      "title": "OutputLocation",
      "type": "object"
    },
    "S3Prefix": {
      "additionalProperties": false,
      "properties": {
        "bucket": {
          "pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
          "title": "Bucket",
          "type": "string"
        },
        "prefix": {
          "default": "",
          "maxLength": 1024,
          "title": "Prefix",
          "type": "string"
        }
      },
      "required": [
        "bucket"
      ],
      "title": "S3Prefix",
      "type": "object"
    },
    "SampleSettings": {
      "additionalProperties": false,
      "description": "Images rendered with each saved epoch's LoRA, so a user can judge the epochs.",
      "properties": {
        "count": {
          "default": 2,
          "description": "Captions sampled without prompts.",
          "maximum": 16,
          "minimum": 1,
          "title": "Count",
          "type": "integer"
        },
        "enabled": {
          "default": true,
          "title": "Enabled",
          "type": "boolean"
        },
        "every_n_epochs": {
          "default": 1,
          "maximum": 200,
          "minimum": 1,
          "title": "Every N Epochs",
          "type": "integer"
        },
        "guidance": {
          "anyOf": [
            {
              "maximum": 30,
              "minimum": 0,
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "None: the family's (7, Flux.1 3.5, SD 3.5 5).",
          "title": "Guidance"
        },
        "height": {
          "anyOf": [
            {
              "maximum": 2048,
              "minimum": 64,
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "None: the resolution.",
          "title": "Height"
        },
        "negative_prompt": {
          "default": "",
          "maxLength": 1000,
          "title": "Negative Prompt",
          "type": "string"
        },
        "prompts": {
          "description": "Empty: the first `count` of the dataset's own captions, trigger word first.",
          "items": {
            "maxLength": 1000,
            "minLength": 1,
            "type": "string"
          },
          "maxItems": 16,
          "title": "Prompts",
          "type": "array"
        },
        "sampler": {
          "default": "euler_a",
          "enum": [
            "ddim",
            "pndm",
            "lms",
            "euler",
            "euler_a",
            "heun",
            "dpm_2",
            "dpm_2_a",
            "dpmsolver",
            "dpmsolver++",
            "dpmsingle",
            "k_lms",
            "k_euler",
            "k_euler_a",
            "k_dpm_2",
            "k_dpm_2_a"
          ],
          "title": "Sampler",
          "type": "string"
        },
        "seed": {
          "default": 42,
          "maximum": 4294967295,
          "minimum": 0,
          "title": "Seed",
          "type": "integer"
        },
        "steps": {
          "default": 20,
          "maximum": 150,
          "minimum": 1,
          "title": "Steps",
          "type": "integer"
        },
        "width": {
          "anyOf": [
            {
              "maximum": 2048,
              "minimum": 64,
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "None: the resolution.",
          "title": "Width"
        }
      },
      "title": "SampleSettings",
      "type": "object"
    },
    "TrainingConfig": {
      "additionalProperties": false,
      "description": "sd-scripts hyper-parameters. Fields left as None take the base model family's default.",
      "properties": {
        "batch_size": {
          "anyOf": [
            {
              "maximum": 16,
              "minimum": 1,
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Batch Size"
        },
        "blocks_to_swap": {
          "anyOf": [
            {
              "maximum": 36,
              "minimum": 0,
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Blocks To Swap"
        },
        "class_word": {
          "anyOf": [
            {
              "maxLength": 64,
              "minLength": 1,
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Class Word"
        },
        "discrete_flow_shift": {
          "anyOf": [
            {
              "exclusiveMinimum": 0,
              "maximum": 100,
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Discrete Flow Shift"
        },
        "epochs": {
          "default": 10,
          "maximum": 200,
          "minimum": 1,
          "title": "Epochs",
          "type": "integer"
        },
        "fp8_base": {
          "anyOf": [
            {
              "type": "boolean"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Fp8 Base"
        },
        "gradient_checkpointing": {
          "anyOf": [
            {
              "type": "boolean"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Gradient Checkpointing"
        },
        "guidance_scale": {
          "anyOf": [
            {
              "maximum": 30,
              "minimum": 0,
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Guidance Scale"
        },
        "keep_tokens": {
          "default": 1,
          "maximum": 10,
          "minimum": 0,
          "title": "Keep Tokens",
          "type": "integer"
        },
        "lr_scheduler": {
          "default": "cosine",
          "enum": [
            "constant",
            "constant_with_warmup",
            "cosine",
            "cosine_with_restarts",
            "linear",
            "polynomial"
          ],
          "title": "Lr Scheduler",
          "type": "string"
        },
        "lr_warmup_steps": {
          "default": 0,
          "maximum": 10000,
          "minimum": 0,
          "title": "Lr Warmup Steps",
          "type": "integer"
        },
        "max_train_steps": {
          "anyOf": [
            {
              "maximum": 100000,
              "minimum": 1,
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Max Train Steps"
        },
        "mixed_precision": {
          "anyOf": [
            {
              "enum": [
                "no",
                "fp16",
                "bf16"
              ],
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Mixed Precision"
        },
        "network_alpha": {
          "anyOf": [
            {
              "exclusiveMinimum": 0,
              "maximum": 256,
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Network Alpha"
        },
        "network_dim": {
          "anyOf": [
            {
              "maximum": 256,
              "minimum": 1,
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Network Dim"
        },
        "optimizer": {
          "default": "AdamW8bit",
          "enum": [
            "AdamW",
            "AdamW8bit",
            "Lion",
            "Lion8bit",
            "Prodigy",
            "Adafactor",
            "DAdaptAdam",
            "SGDNesterov"
          ],
          "title": "Optimizer",
          "type": "string"
        },
        "output_name": {
          "default": "lora",
          "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
          "title": "Output Name",
          "type": "string"
        },
        "repeats": {
          "default": 10,
          "maximum": 100,
          "minimum": 1,
          "title": "Repeats",
          "type": "integer"
        },
        "resolution": {
          "anyOf": [
            {
              "maximum": 2048,
              "minimum": 64,
              "multipleOf": 64,
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Resolution"
        },
        "seed": {
          "default": 42,
          "maximum": 4294967295,
          "minimum": 0,
          "title": "Seed",
          "type": "integer"
        },
        "text_encoder_lr": {
          "anyOf": [
            {
              "maximum": 0.01,
              "minimum": 0,
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Text Encoder Lr"
        },
        "timestep_sampling": {
          "anyOf": [
            {
              "enum": [
                "sigma",
                "uniform",
                "sigmoid",
                "shift",
                "flux_shift"
              ],
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Timestep Sampling"
        },
        "trigger_word": {
          "anyOf": [
            {
              "maxLength": 64,
              "minLength": 1,
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Trigger Word"
        },
        "unet_lr": {
          "anyOf": [
            {
              "exclusiveMinimum": 0,
              "maximum": 0.01,
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Unet Lr"
        },
        "weighting_scheme": {
          "anyOf": [
            {
              "enum": [
                "sigma_sqrt",
                "logit_normal",
                "mode",
                "cosmap",
                "none",
                "uniform"
              ],
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Weighting Scheme"
        }
      },
      "title": "TrainingConfig",
      "type": "object"
    },
    "UserWebhook": {
      "additionalProperties": false,
      "properties": {
        "events": {
          "anyOf": [
            {
              "items": {
                "enum": [
                  "training.status",
                  "training.progress",
                  "training.epoch",
                  "training.completed",
                  "training.failed",
                  "training.stalled",
                  "training.cancelled"
                ],
                "type": "string"
              },
              "type": "array"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "None: every event.",
          "title": "Events"
        },
        "secret": {
          "pattern": "^whsec_[A-Za-z0-9+/=]{16,}$",
          "title": "Secret",
          "type": "string"
        },
        "url": {
          "maxLength": 2048,
          "pattern": "^https?://",
          "title": "Url",
          "type": "string"
        }
      },
      "required": [
        "url",
        "secret"
      ],
      "title": "UserWebhook",
      "type": "object"
    }
  },
  "$id": "urn:loratrain:schema:training-request",
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "additionalProperties": false,
  "description": "The input of the `TrainingWorkflow` workflow type: one training run. The workflow id is the run id. Sent as a `json/plain` payload, encrypted by the codec (docs/codec.md).",
  "properties": {
    "civitai_api_key": {
      "anyOf": [
        {
          "maxLength": 256,
          "minLength": 1,
          "type": "string"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "title": "Civitai Api Key"
    },
    "continue_as_new_after_events": {
      "default": 2000,
      "description": "History events per execution before the run continues as new (operations).",
      "maximum": 9000,
      "minimum": 200,
      "title": "Continue As New After Events",
      "type": "integer"
    },
    "deadlines": {
      "$ref": "#/$defs/Deadlines",
      "default": {
        "pending_gpu_s": 1200,
        "pending_images_s": 900,
        "pending_model_s": 1800,
        "pending_s": 900,
        "training_idle_s": 600,
        "training_total_s": 43200
      }
    },
    "gpu": {
      "$ref": "#/$defs/GpuRequirements",
      "default": {
        "blocked_countries": [],
        "countries": [],
        "disk_gb": 40,
        "gpu_names": [],
        "max_dollars_per_hour": 1,
        "min_download_mbps": 200,
        "min_reliability": 0.95,
        "min_vram_gb": 16
      }
    },
    "images": {
      "$ref": "#/$defs/S3Prefix"
    },
    "keep": {
      "default": "lowest_loss",
      "description": "Which saved epoch's LoRA is the run's model: the lowest loss, or the last.",
      "enum": [
        "lowest_loss",
        "last"
      ],
      "title": "Keep",
      "type": "string"
    },
    "max_cost_usd": {
      "anyOf": [
        {
          "exclusiveMinimum": 0,
          "maximum": 100000,
          "type": "number"
        },
        {
          "type": "null"
        }
      ],
      "default": null,
      "description": "The run ends failed (cost_cap), its GPU destroyed, before this is spent.",
      "title": "Max Cost Usd"
    },
    "max_gpu_attempts": {
      "default": 3,
      "maximum": 10,
      "minimum": 1,
      "title": "Max Gpu Attempts",
      "type": "integer"
    },
    "model": {
      "description": "civitai:<versionId>, an https URL, s3://bucket/key, or a local path (local provider only).",
      "maxLength": 2048,
      "minLength": 1,
      "title": "Model",
      "type": "string"
    },
    "model_files": {
      "additionalProperties": {
        "type": "string"
      },
      "description": "Files the model's family loads beside it, by role (clip_l, clip_g, t5xxl, ae), in the same schemes as `model` plus hf:<repo>[@rev]/<file>. A role the checkpoint holds needs none; one left out takes the family's default source.",
      "propertyNames": {
        "enum": [
          "clip_l",
          "clip_g",
          "t5xxl",
          "ae"
        ]
      },
      "title": "Model Files",
      "type": "object"
    },
    "output": {
      "$ref": "#/$defs/OutputLocation",
      "default": {
        "bucket": null,
        "key": null
      }
    },
    "resume": {
      "default": true,
      "description": "A replacement GPU resumes from the last complete saved epoch; false: it trains from the start.",
      "title": "Resume",
      "type": "boolean"
    },
    "samples": {
      "$ref": "#/$defs/SampleSettings",
      "description": "Images rendered with each saved epoch's LoRA (`enabled: false`: none)."
    },
    "trainer": {
      "default": "sd-scripts",
      "enum": [
        "sd-scripts",
        "builtin"
      ],
      "title": "Trainer",
      "type": "string"
    },
    "training": {
      "$ref": "#/$defs/TrainingConfig",
      "default": {
        "batch_size": null,
        "blocks_to_swap": null,
        "class_word": null,
        "discrete_flow_shift": null,
        "epochs": 10,
        "fp8_base": null,
        "gradient_checkpointing": null,
        "guidance_scale": null,
        "keep_tokens": 1,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 0,
        "max_train_steps": null,
        "mixed_precision": null,
        "network_alpha": null,
        "network_dim": null,
        "optimizer": "AdamW8bit",
        "output_name": "lora",
        "repeats": 10,
        "resolution": null,
        "seed": 42,
        "text_encoder_lr": null,
        "timestep_sampling": null,
        "trigger_word": null,
        "unet_lr": null,
        "weighting_scheme": null
      }
    },
    "webhook": {
      "anyOf": [
        {
          "$ref": "#/$defs/UserWebhook"
        },
        {
          "type": "null"
        }
      ],
      "default": null
    }
  },
  "required": [
    "images",
    "model"
  ],
  "title": "TrainingRequest",
  "type": "object"
};

export const userWebhookSchema: Record<string, unknown> = {
  "$defs": {
    "CancelledData": {
      "additionalProperties": false,
      "properties": {
        "download_url": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Presigned GET of the model; present whenever `model` is.",
          "title": "Download Url"
        },
        "epochs": {
          "anyOf": [
            {
              "items": {
                "$ref": "#/$defs/SavedEpochInfo"
              },
              "type": "array"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Every saved epoch (`loratrain download --epoch N`).",
          "title": "Epochs"
        },
        "error": {
          "$ref": "#/$defs/RunError"
        },
        "model": {
          "anyOf": [
            {
              "$ref": "#/$defs/ModelResult"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "The verified model, when the run got that far."
        },
        "status": {
          "const": "cancelled",
          "title": "Status",
          "type": "string"
        },
        "version": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Sent only by runs on the first (legacy) workflow code; newer ones omit it.",
          "title": "Version"
        }
      },
      "required": [
        "error",
        "status"
      ],
      "title": "CancelledData",
      "type": "object"
    },
    "CancelledWebhook": {
      "additionalProperties": false,
      "description": "The user cancelled the run.",
      "properties": {
        "data": {
          "$ref": "#/$defs/CancelledData"
        },
        "run_id": {
          "description": "The run (its workflow id).",
          "title": "Run Id",
          "type": "string"
        },
        "timestamp": {
          "description": "When the event happened: UTC, ISO 8601, ending in `Z`.",
          "format": "date-time",
          "title": "Timestamp",
          "type": "string"
        },
        "type": {
          "const": "training.cancelled",
          "title": "Type",
          "type": "string"
        }
      },
      "required": [
        "run_id",
        "timestamp",
        "type",
        "data"
      ],
      "title": "CancelledWebhook",
      "type": "object"
    },
    "CompletedData": {
      "additionalProperties": false,
      "properties": {
        "download_url": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "description": "Presigned GET of the model (expires; `loratrain download` makes a new one).",
          "title": "Download Url"
        },
        "epochs": {
          "anyOf": [
            {
              "items": {
                "$ref": "#/$defs/SavedEpochInfo"
              },
              "type": "array"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Every saved epoch (`loratrain download --epoch N`).",
          "title": "Epochs"
        },
        "error": {
          "anyOf": [
            {
              "$ref": "#/$defs/RunError"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Why the run ended so; absent when it completed."
        },
        "model": {
          "$ref": "#/$defs/ModelResult",
          "description": "The verified model."
        },
        "status": {
          "const": "completed",
          "title": "Status",
          "type": "string"
        },
        "version": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Sent only by runs on the first (legacy) workflow code; newer ones omit it.",
          "title": "Version"
        }
      },
      "required": [
        "model",
        "download_url",
        "status"
      ],
      "title": "CompletedData",
      "type": "object"
    },
    "CompletedWebhook": {
      "additionalProperties": false,
      "description": "The model was uploaded and verified.",
      "properties": {
        "data": {
          "$ref": "#/$defs/CompletedData"
        },
        "run_id": {
          "description": "The run (its workflow id).",
          "title": "Run Id",
          "type": "string"
        },
        "timestamp": {
          "description": "When the event happened: UTC, ISO 8601, ending in `Z`.",
          "format": "date-time",
          "title": "Timestamp",
          "type": "string"
        },
        "type": {
          "const": "training.completed",
          "title": "Type",
          "type": "string"
        }
      },
      "required": [
        "run_id",
        "timestamp",
        "type",
        "data"
      ],
      "title": "CompletedWebhook",
      "type": "object"
    },
    "EpochData": {
      "additionalProperties": false,
      "properties": {
        "attempt": {
          "description": "The GPU attempt that trained it.",
          "title": "Attempt",
          "type": "integer"
        },
        "bucket": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Where the files' keys are.",
          "title": "Bucket"
        },
        "epoch": {
          "title": "Epoch",
          "type": "integer"
        },
        "lora": {
          "$ref": "#/$defs/EpochFileWithUrl"
        },
        "loss": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Loss"
        },
        "samples": {
          "items": {
            "$ref": "#/$defs/EpochFileWithUrl"
          },
          "title": "Samples",
          "type": "array"
        },
        "step": {
          "title": "Step",
          "type": "integer"
        },
        "version": {
          "description": "The run status's `version` when the epoch was saved.",
          "title": "Version",
          "type": "integer"
        }
      },
      "required": [
        "epoch",
        "step",
        "attempt",
        "lora",
        "samples",
        "version"
      ],
      "title": "EpochData",
      "type": "object"
    },
    "EpochFile": {
      "additionalProperties": false,
      "properties": {
        "bytes": {
          "minimum": 0,
          "title": "Bytes",
          "type": "integer"
        },
        "key": {
          "title": "Key",
          "type": "string"
        },
        "sha256": {
          "pattern": "^[0-9a-f]{64}$",
          "title": "Sha256",
          "type": "string"
        }
      },
      "required": [
        "key",
        "bytes",
        "sha256"
      ],
      "title": "EpochFile",
      "type": "object"
    },
    "EpochFileWithUrl": {
      "additionalProperties": false,
      "properties": {
        "bytes": {
          "minimum": 0,
          "title": "Bytes",
          "type": "integer"
        },
        "key": {
          "title": "Key",
          "type": "string"
        },
        "sha256": {
          "pattern": "^[0-9a-f]{64}$",
          "title": "Sha256",
          "type": "string"
        },
        "url": {
          "description": "Presigned GET of the file (expires).",
          "title": "Url",
          "type": "string"
        }
      },
      "required": [
        "key",
        "bytes",
        "sha256",
        "url"
      ],
      "title": "EpochFileWithUrl",
      "type": "object"
    },
    "EpochWebhook": {
      "additionalProperties": false,
      "description": "An epoch's LoRA and samples are saved (every epoch, as it ends).",
      "properties": {
        "data": {
          "$ref": "#/$defs/EpochData"
        },
        "run_id": {
          "description": "The run (its workflow id).",
          "title": "Run Id",
          "type": "string"
        },
        "timestamp": {
          "description": "When the event happened: UTC, ISO 8601, ending in `Z`.",
          "format": "date-time",
          "title": "Timestamp",
          "type": "string"
        },
        "type": {
          "const": "training.epoch",
          "title": "Type",
          "type": "string"
        }
      },
      "required": [
        "run_id",
        "timestamp",
        "type",
        "data"
      ],
      "title": "EpochWebhook",
      "type": "object"
    },
    "FailedData": {
      "additionalProperties": false,
      "properties": {
        "download_url": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Presigned GET of the model; present whenever `model` is.",
          "title": "Download Url"
        },
        "epochs": {
          "anyOf": [
            {
              "items": {
                "$ref": "#/$defs/SavedEpochInfo"
              },
              "type": "array"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Every saved epoch (`loratrain download --epoch N`).",
          "title": "Epochs"
        },
        "error": {
          "$ref": "#/$defs/RunError"
        },
        "model": {
          "anyOf": [
            {
              "$ref": "#/$defs/ModelResult"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "The verified model, when the run got that far."
        },
        "status": {
          "const": "failed",
          "title": "Status",
          "type": "string"
        },
        "version": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Sent only by runs on the first (legacy) workflow code; newer ones omit it.",
          "title": "Version"
        }
      },
      "required": [
        "error",
        "status"
      ],
      "title": "FailedData",
      "type": "object"
    },
    "FailedWebhook": {
      "additionalProperties": false,
      "description": "The run ended on an explicit error (bad input, the runner failed, cost cap, ...).",
      "properties": {
        "data": {
          "$ref": "#/$defs/FailedData"
        },
        "run_id": {
          "description": "The run (its workflow id).",
          "title": "Run Id",
          "type": "string"
        },
        "timestamp": {
          "description": "When the event happened: UTC, ISO 8601, ending in `Z`.",
          "format": "date-time",
          "title": "Timestamp",
          "type": "string"
        },
        "type": {
          "const": "training.failed",
          "title": "Type",
          "type": "string"
        }
      },
      "required": [
        "run_id",
        "timestamp",
        "type",
        "data"
      ],
      "title": "FailedWebhook",
      "type": "object"
    },
    "ModelResult": {
      "additionalProperties": false,
      "properties": {
        "bytes": {
          "title": "Bytes",
          "type": "integer"
        },
        "epoch": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Epoch"
        },
        "location": {
          "$ref": "#/$defs/S3Location"
        },
        "loss": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Loss"
        },
        "sha256": {
          "title": "Sha256",
          "type": "string"
        }
      },
      "required": [
        "location",
        "bytes",
        "sha256"
      ],
      "title": "ModelResult",
      "type": "object"
    },
    "ProgressData": {
      "additionalProperties": false,
      "properties": {
        "epoch": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Epoch"
        },
        "eta_s": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Eta S"
        },
        "it_per_s": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "It Per S"
        },
        "loss": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Loss"
        },
        "percent": {
          "default": 0,
          "title": "Percent",
          "type": "number"
        },
        "step": {
          "default": 0,
          "title": "Step",
          "type": "integer"
        },
        "total": {
          "default": 0,
          "title": "Total",
          "type": "integer"
        },
        "total_epochs": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Total Epochs"
        },
        "version": {
          "description": "The run status's `version` when this progress was sent.",
          "title": "Version",
          "type": "integer"
        }
      },
      "required": [
        "version"
      ],
      "title": "ProgressData",
      "type": "object"
    },
    "ProgressWebhook": {
      "additionalProperties": false,
      "description": "Training progress, at most every 30 s and 5 %.",
      "properties": {
        "data": {
          "$ref": "#/$defs/ProgressData"
        },
        "run_id": {
          "description": "The run (its workflow id).",
          "title": "Run Id",
          "type": "string"
        },
        "timestamp": {
          "description": "When the event happened: UTC, ISO 8601, ending in `Z`.",
          "format": "date-time",
          "title": "Timestamp",
          "type": "string"
        },
        "type": {
          "const": "training.progress",
          "title": "Type",
          "type": "string"
        }
      },
      "required": [
        "run_id",
        "timestamp",
        "type",
        "data"
      ],
      "title": "ProgressWebhook",
      "type": "object"
    },
    "RunError": {
      "additionalProperties": false,
      "properties": {
        "code": {
          "title": "Code",
          "type": "string"
        },
        "log_tail": {
          "items": {
            "type": "string"
          },
          "title": "Log Tail",
          "type": "array"
        },
        "message": {
          "title": "Message",
          "type": "string"
        },
        "stage": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Stage"
        }
      },
      "required": [
        "code",
        "message"
      ],
      "title": "RunError",
      "type": "object"
    },
    "RunStatusName": {
      "enum": [
        "pending",
        "pendingGpu",
        "pendingImages",
        "pendingModel",
        "training",
        "completed",
        "stalled",
        "failed",
        "cancelled"
      ],
      "title": "RunStatusName",
      "type": "string"
    },
    "S3Location": {
      "additionalProperties": false,
      "properties": {
        "bucket": {
          "pattern": "^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
          "title": "Bucket",
          "type": "string"
        },
        "key": {
          "maxLength": 1024,
          "minLength": 1,
          "title": "Key",
          "type": "string"
        }
      },
      "required": [
        "bucket",
        "key"
      ],
      "title": "S3Location",
      "type": "object"
    },
    "SavedEpochInfo": {
      "additionalProperties": false,
      "description": "One epoch whose files are all in S3 (its manifest written last).",
      "properties": {
        "attempt": {
          "description": "The GPU attempt that trained it.",
          "title": "Attempt",
          "type": "integer"
        },
        "bucket": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Where the files' keys are.",
          "title": "Bucket"
        },
        "epoch": {
          "title": "Epoch",
          "type": "integer"
        },
        "lora": {
          "$ref": "#/$defs/EpochFile"
        },
        "loss": {
          "anyOf": [
            {
              "type": "number"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "title": "Loss"
        },
        "manifest_key": {
          "title": "Manifest Key",
          "type": "string"
        },
        "samples": {
          "items": {
            "$ref": "#/$defs/EpochFile"
          },
          "title": "Samples",
          "type": "array"
        },
        "state": {
          "anyOf": [
            {
              "$ref": "#/$defs/EpochFile"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "The training state a replacement resumes from (deleted when the run closes)."
        },
        "step": {
          "default": 0,
          "title": "Step",
          "type": "integer"
        }
      },
      "required": [
        "epoch",
        "attempt",
        "lora",
        "manifest_key"
      ],
      "title": "SavedEpochInfo",
      "type": "object"
    },
    "StalledData": {
      "additionalProperties": false,
      "properties": {
        "download_url": {
          "anyOf": [
            {
              "type": "string"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Presigned GET of the model; present whenever `model` is.",
          "title": "Download Url"
        },
        "epochs": {
          "anyOf": [
            {
              "items": {
                "$ref": "#/$defs/SavedEpochInfo"
              },
              "type": "array"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Every saved epoch (`loratrain download --epoch N`).",
          "title": "Epochs"
        },
        "error": {
          "$ref": "#/$defs/RunError"
        },
        "model": {
          "anyOf": [
            {
              "$ref": "#/$defs/ModelResult"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "The verified model, when the run got that far."
        },
        "status": {
          "const": "stalled",
          "title": "Status",
          "type": "string"
        },
        "version": {
          "anyOf": [
            {
              "type": "integer"
            },
            {
              "type": "null"
            }
          ],
          "default": null,
          "description": "Sent only by runs on the first (legacy) workflow code; newer ones omit it.",
          "title": "Version"
        }
      },
      "required": [
        "error",
        "status"
      ],
      "title": "StalledData",
      "type": "object"
    },
    "StalledWebhook": {
      "additionalProperties": false,
      "description": "A status outlived its deadline with no progress.",
      "properties": {
        "data": {
          "$ref": "#/$defs/StalledData"
        },
        "run_id": {
          "description": "The run (its workflow id).",
          "title": "Run Id",
          "type": "string"
        },
        "timestamp": {
          "description": "When the event happened: UTC, ISO 8601, ending in `Z`.",
          "format": "date-time",
          "title": "Timestamp",
          "type": "string"
        },
        "type": {
          "const": "training.stalled",
          "title": "Type",
          "type": "string"
        }
      },
      "required": [
        "run_id",
        "timestamp",
        "type",
        "data"
      ],
      "title": "StalledWebhook",
      "type": "object"
    },
    "StatusData": {
      "additionalProperties": false,
      "properties": {
        "status": {
          "$ref": "#/$defs/RunStatusName",
          "description": "The status the run just entered."
        },
        "version": {
          "description": "The run status's `version` after this change.",
          "title": "Version",
          "type": "integer"
        }
      },
      "required": [
        "status",
        "version"
      ],
      "title": "StatusData",
      "type": "object"
    },
    "StatusWebhook": {
      "additionalProperties": false,
      "description": "Every status change.",
      "properties": {
        "data": {
          "$ref": "#/$defs/StatusData"
        },
        "run_id": {
          "description": "The run (its workflow id).",
          "title": "Run Id",
          "type": "string"
        },
        "timestamp": {
          "description": "When the event happened: UTC, ISO 8601, ending in `Z`.",
          "format": "date-time",
          "title": "Timestamp",
          "type": "string"
        },
        "type": {
          "const": "training.status",
          "title": "Type",
          "type": "string"
        }
      },
      "required": [
        "run_id",
        "timestamp",
        "type",
        "data"
      ],
      "title": "StatusWebhook",
      "type": "object"
    }
  },
  "$id": "urn:loratrain:schema:user-webhook",
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "description": "The JSON body POSTed to the user's webhook URL, signed per Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature` headers, the user's `whsec_` secret). `type` says which event it is and what `data` holds.",
  "discriminator": {
    "mapping": {
      "training.cancelled": "#/$defs/CancelledWebhook",
      "training.completed": "#/$defs/CompletedWebhook",
      "training.epoch": "#/$defs/EpochWebhook",
      "training.failed": "#/$defs/FailedWebhook",
      "training.progress": "#/$defs/ProgressWebhook",
      "training.stalled": "#/$defs/StalledWebhook",
      "training.status": "#/$defs/StatusWebhook"
    },
    "propertyName": "type"
  },
  "oneOf": [
    {
      "$ref": "#/$defs/StatusWebhook"
    },
    {
      "$ref": "#/$defs/ProgressWebhook"
    },
    {
      "$ref": "#/$defs/EpochWebhook"
    },
    {
      "$ref": "#/$defs/CompletedWebhook"
    },
    {
      "$ref": "#/$defs/FailedWebhook"
    },
    {
      "$ref": "#/$defs/StalledWebhook"
    },
    {
      "$ref": "#/$defs/CancelledWebhook"
    }
  ],
  "title": "UserWebhookBody"
};
