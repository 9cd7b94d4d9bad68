"""JSON Schemas (draft 2020-12) of the contract a backend in any language is built against.

`python -m workflows.schemas` writes them to `schemas/`; `python -m workflows.schemas --check`
exits 1, naming the stale files, when the checked-in ones differ from what the models say now.

Which pydantic mode each schema is generated in, and why:

- `training-request.schema.json` (`TrainingRequest`): **validation** mode. A request is input: a
  backend writes it and the workflow validates it, so a field with a default may be left out and
  is not `required`.
- `run-status.schema.json` (`RunStatus`): **serialization** mode, with every field `required`. A
  status is output: the `status` query, the workflow's result and the clients' answers are
  pydantic dumps that always carry every key (`null` where unset), so a reader may rely on each
  key being there.
- `user-webhook.schema.json` (the bodies POSTed to the user's webhook URL): **validation** mode.
  The bodies are built from dicts (`activities/notify.py` `webhook_body`, the `data` from
  `workflows/training.py`), not dumped from one model, and some keys appear only in some cases
  (`error`, `model`); a receiver validates them as input. One schema, a `oneOf` discriminated by
  `type`, because every event shares the Standard Webhooks envelope `{type, run_id, timestamp,
  data}` and only `data` differs by type.

Output is deterministic (sorted keys, two-space indent, trailing newline), so the drift test
compares bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import core_schema

from gpu_runner.protocol import EpochFile

from .models import (
    ModelResult,
    Progress,
    RunError,
    RunStatus,
    RunStatusName,
    SavedEpochInfo,
    TrainingRequest,
)

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
REGENERATE = "python -m workflows.schemas"


# --------------------------------------------------------------------------------------------
# User webhook bodies: what activities/notify.py POSTs, by event type
# --------------------------------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusData(_Body):
    status: RunStatusName = Field(description="The status the run just entered.")
    version: int = Field(description="The run status's `version` after this change.")


class ProgressData(Progress):
    version: int = Field(description="The run status's `version` when this progress was sent.")


class EpochFileWithUrl(EpochFile):
    url: str = Field(description="Presigned GET of the file (expires).")


class EpochData(_Body):
    epoch: int
    loss: float | None = None
    step: int
    attempt: int = Field(description="The GPU attempt that trained it.")
    bucket: str | None = Field(default=None, description="Where the files' keys are.")
    lora: EpochFileWithUrl
    samples: list[EpochFileWithUrl]
    version: int = Field(description="The run status's `version` when the epoch was saved.")


class _TerminalData(_Body):
    error: RunError | None = Field(
        default=None, description="Why the run ended so; absent when it completed."
    )
    model: ModelResult | None = Field(
        default=None, description="The verified model, when the run got that far."
    )
    download_url: str | None = Field(
        default=None, description="Presigned GET of the model; present whenever `model` is."
    )
    version: int | None = Field(
        default=None,
        description="Sent only by runs on the first (legacy) workflow code; newer ones omit it.",
    )
    epochs: list[SavedEpochInfo] | None = Field(
        default=None, description="Every saved epoch (`loratrain download --epoch N`)."
    )


class CompletedData(_TerminalData):
    status: Literal["completed"]
    model: ModelResult = Field(description="The verified model.")
    download_url: str | None = Field(  # key always present beside `model`
        description="Presigned GET of the model (expires; `loratrain download` makes a new one)."
    )


class FailedData(_TerminalData):
    status: Literal["failed"]
    error: RunError


class StalledData(_TerminalData):
    status: Literal["stalled"]
    error: RunError


class CancelledData(_TerminalData):
    status: Literal["cancelled"]
    error: RunError


class _Envelope(_Body):
    run_id: str = Field(description="The run (its workflow id).")
    timestamp: datetime = Field(
        description="When the event happened: UTC, ISO 8601, ending in `Z`."
    )


class StatusWebhook(_Envelope):
    """Every status change."""

    type: Literal["training.status"]
    data: StatusData


class ProgressWebhook(_Envelope):
    """Training progress, at most every 30 s and 5 %."""

    type: Literal["training.progress"]
    data: ProgressData


class EpochWebhook(_Envelope):
    """An epoch's LoRA and samples are saved (every epoch, as it ends)."""

    type: Literal["training.epoch"]
    data: EpochData


class CompletedWebhook(_Envelope):
    """The model was uploaded and verified."""

    type: Literal["training.completed"]
    data: CompletedData


class FailedWebhook(_Envelope):
    """The run ended on an explicit error (bad input, the runner failed, cost cap, ...)."""

    type: Literal["training.failed"]
    data: FailedData


class StalledWebhook(_Envelope):
    """A status outlived its deadline with no progress."""

    type: Literal["training.stalled"]
    data: StalledData


class CancelledWebhook(_Envelope):
    """The user cancelled the run."""

    type: Literal["training.cancelled"]
    data: CancelledData


WEBHOOK_BODIES: tuple[type[_Envelope], ...] = (
    StatusWebhook,
    ProgressWebhook,
    EpochWebhook,
    CompletedWebhook,
    FailedWebhook,
    StalledWebhook,
    CancelledWebhook,
)


class UserWebhookBody(
    RootModel[
        Annotated[
            StatusWebhook
            | ProgressWebhook
            | EpochWebhook
            | CompletedWebhook
            | FailedWebhook
            | StalledWebhook
            | CancelledWebhook,
            Field(discriminator="type"),
        ]
    ]
):
    pass


def webhook_event_type(body: type[_Envelope]) -> str:
    """The `type` value a body model stands for."""
    (event_type,) = get_args(body.model_fields["type"].annotation)
    return str(event_type)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


class _ContractSchema(GenerateJsonSchema):
    """Serialization-mode schemas mark every field required: dumps always carry every key."""

    def field_is_required(
        self,
        field: core_schema.ModelField | core_schema.DataclassField | core_schema.TypedDictField,
        total: bool,
    ) -> bool:
        if self.mode == "serialization":
            return field.get("serialization_exclude_if") is None and not field.get(
                "serialization_exclude", False
            )
        return super().field_is_required(field, total)


# file name -> (model, mode, description)
SCHEMAS: dict[str, tuple[type[BaseModel], JsonSchemaMode, str]] = {
    "training-request.schema.json": (
        TrainingRequest,
        "validation",
        "The input of the `TrainingWorkflow` workflow type: one training run. The workflow id "
        "is the run id. Sent as a `json/plain` payload, encrypted by the codec (docs/codec.md).",
    ),
    "run-status.schema.json": (
        RunStatus,
        "serialization",
        "A training run's status: the answer of the `status` query and `wait_for_change` "
        "update, and the workflow's result when it completes. Every key is always present; "
        "`version` grows by one on every change.",
    ),
    "user-webhook.schema.json": (
        UserWebhookBody,
        "validation",
        "The JSON body POSTed to the user's webhook URL, signed per Standard Webhooks "
        "(`webhook-id`, `webhook-timestamp`, `webhook-signature` headers, the user's "
        "`whsec_` secret). `type` says which event it is and what `data` holds.",
    ),
}


def schema_for(name: str) -> dict[str, Any]:
    model, mode, description = SCHEMAS[name]
    schema = model.model_json_schema(mode=mode, schema_generator=_ContractSchema)
    schema["$schema"] = SCHEMA_DIALECT
    schema["$id"] = f"urn:loratrain:schema:{name.removesuffix('.schema.json')}"
    schema["title"] = model.__name__
    schema["description"] = description
    return schema


def render(name: str) -> str:
    """The exact text of one schema file."""
    return json.dumps(schema_for(name), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def stale_files(directory: Path = SCHEMAS_DIR) -> list[Path]:
    """The schema files that are missing or differ from what the models say now."""
    return [
        directory / name
        for name in sorted(SCHEMAS)
        if not (directory / name).is_file()
        or (directory / name).read_text(encoding="utf-8") != render(name)
    ]


def write_all(directory: Path = SCHEMAS_DIR) -> list[Path]:
    """Writes every schema; returns the files that changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = stale_files(directory)
    for path in changed:
        path.write_text(render(path.name), encoding="utf-8")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=REGENERATE, description="Write the contract's JSON Schemas to schemas/."
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is stale"
    )
    parser.add_argument("--dir", type=Path, default=SCHEMAS_DIR, help="default: %(default)s")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.dir)
        for path in stale:
            print(f"{path}: stale or missing; run `{REGENERATE}`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_all(args.dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
