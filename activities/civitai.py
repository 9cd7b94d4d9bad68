"""Resolve a model reference (civitai:<versionId>, hf:<repo>[@rev]/<file>, https URL,
s3://bucket/key, local path) to the files the GPU runner downloads: the checkpoint (URL, filename,
sha256 and size when the source tells, base model, family, variant) and the text encoders/AE its
family loads beside it when the checkpoint does not hold them. Everything is checked before any
GPU is rented: the family is read from the checkpoint's safetensors header (only the header is
fetched), and each component's header must show the role it is used for.

Errors that retrying cannot fix are non-retryable `ApplicationError`s with these types:
`InvalidModelReference`, `ModelNotFound`, `CivitaiUnauthorized`, `HuggingFaceUnauthorized`,
`ModelAccessDenied`, `UnsupportedModel`, `InvalidModelFile`, `ModelFamilyMismatch`,
`ModelComponentMismatch`, `ModelFilesIncomplete`. Outages (timeouts, 429, 5xx) raise retryable
`ApplicationError`s (`CivitaiUnavailable`, `CivitaiBadResponse`, `ModelSourceUnavailable`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

import httpx
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, Field
from temporalio import activity
from temporalio.exceptions import ApplicationError

from common.http import tls_context
from gpu_runner.protocol import (
    FAMILY_COMPONENTS,
    BaseModelFamily,
    ComponentRole,
    base_model_family,
    unsupported_architecture,
)

from .huggingface import HfReference, lookup_hf_file, parse_hf_reference
from .model_header import (
    Detected,
    Header,
    HeaderError,
    component_role,
    describe_mismatch,
    detect,
    read_header_http,
    read_header_local,
    read_header_s3,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from common.settings import Settings


class ResolveModelInput(BaseModel):
    run_id: str
    model: str
    civitai_api_key: str | None = Field(default=None, repr=False)
    # The request's files beside the checkpoint, by role, in any scheme `model` takes.
    model_files: dict[ComponentRole, str] = Field(default_factory=dict)


class ResolvedComponent(BaseModel):
    """A text encoder or AE the family loads beside the checkpoint (protocol.ModelComponent)."""

    role: ComponentRole
    url: str = Field(repr=False)
    filename: str
    sha256: str | None = None
    bytes: int | None = None
    needs_civitai_key: bool = False
    needs_hf_token: bool = False


class ResolvedModel(BaseModel):
    """Where the model's files are and what they are; never a secret (it is workflow history):
    `needs_*` say which of the worker's keys the GPU's job must carry."""

    url: str = Field(repr=False)
    filename: str
    sha256: str | None = None
    bytes: int | None = None
    base_model: str
    family: BaseModelFamily
    needs_civitai_key: bool = False
    needs_hf_token: bool = False
    variant: str | None = None
    v_parameterization: bool = False
    components: list[ResolvedComponent] = Field(default_factory=list)

    @property
    def needs_civitai_key_anywhere(self) -> bool:
        return self.needs_civitai_key or any(c.needs_civitai_key for c in self.components)

    @property
    def needs_hf_token_anywhere(self) -> bool:
        return self.needs_hf_token or any(c.needs_hf_token for c in self.components)


MODEL_EXTENSIONS = (".safetensors", ".ckpt")
SUPPORTED_FAMILIES = "SD 1.x, SD 2.x, SDXL (Pony, Illustrious, NoobAI), Flux.1, SD 3.5"
# Where a family's components come from when the request names none and the checkpoint does
# not hold them: public files in the layout sd-scripts loads (SD 3.5's repo is gated: token).
DEFAULT_COMPONENTS: dict[BaseModelFamily, dict[ComponentRole, str]] = {
    "flux": {
        "clip_l": "hf:comfyanonymous/flux_text_encoders/clip_l.safetensors",
        "t5xxl": "hf:comfyanonymous/flux_text_encoders/t5xxl_fp16.safetensors",
        "ae": "hf:black-forest-labs/FLUX.1-schnell/ae.safetensors",
    },
    "sd3": {
        "clip_l": "hf:stabilityai/stable-diffusion-3.5-large/text_encoders/clip_l.safetensors",
        "clip_g": "hf:stabilityai/stable-diffusion-3.5-large/text_encoders/clip_g.safetensors",
        "t5xxl": "hf:stabilityai/stable-diffusion-3.5-large/text_encoders/t5xxl_fp16.safetensors",
    },
}
# Civitai file types that hold a whole checkpoint (others: VAE, Config, Training Data, ...).
_CHECKPOINT_FILE_TYPES = ("Model", "Pruned Model")
# Civitai file types that may be one of the family's components (their header says which).
_COMPONENT_FILE_TYPES = ("VAE", "Text Encoder")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_CIVITAI_REF = re.compile(r"^civitai:(\d{1,12})$")
_CIVITAI_DOWNLOAD_PATH = re.compile(r"^/api/download/models/(\d{1,12})/?$")


def _fail(message: str, error_type: str) -> NoReturn:
    # Never chained: the error being handled may name a signed URL (an httpx status error
    # does), and the worker logs a failed activity's traceback.
    raise ApplicationError(message, type=error_type, non_retryable=True) from None


def _retry(message: str, error_type: str, retry_after_s: float | None = None) -> NoReturn:
    delay = timedelta(seconds=retry_after_s) if retry_after_s else None
    raise ApplicationError(
        message, type=error_type, non_retryable=False, next_retry_delay=delay
    ) from None


def _retry_after_s(response: httpx.Response) -> float | None:
    """Seconds from a Retry-After header (delta or HTTP date), capped at 10 minutes."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, min(seconds, 600.0)) or None


def _is_transient(status: int) -> bool:
    return status in (408, 425, 429) or status >= 500


ClaimedBy = Literal["civitai", "hint", "name"]


def _guess_base_model(
    filename: str, hint: str | None
) -> tuple[str, BaseModelFamily, ClaimedBy | None]:
    """Base model for files outside Civitai: an explicit hint, else a guess from the filename,
    and what said so (None: nothing did, SD 1.5 is only the fallback the header replaces).

    The guess is deliberately simple: "flux" or "sd3" in the name means that family, "xl" or
    "pony" means SDXL. Add `#base_model=SDXL 1.0` to a URL to be explicit.
    """
    if hint:
        return hint, base_model_family(hint), "hint"
    name = filename.lower()
    if "flux" in name:
        return "Flux.1 D", "flux", "name"
    if "sd3" in name or "sd_3" in name:
        return "SD 3.5", "sd3", "name"
    if "xl" in name or "pony" in name or "illustrious" in name:
        return "SDXL 1.0", "sdxl", "name"
    return "SD 1.5", "sd15", None


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _refuse_unsupported(base_model: str, family: BaseModelFamily, where: str) -> None:
    """A base model no family here trains, named so (Civitai's base model or a hint)."""
    architecture = unsupported_architecture(base_model)
    if architecture is not None:
        built = "," if architecture.lower() in base_model.lower() else f", built on {architecture},"
        _fail(
            f"{where} is {_article(base_model)} {base_model} model{built} which loratrain does "
            f"not train; supported: {SUPPORTED_FAMILIES}",
            "UnsupportedModel",
        )
    if family == "other":
        _fail(
            f"{where} is based on {base_model!r}, which loratrain does not know; supported: "
            f"{SUPPORTED_FAMILIES}",
            "UnsupportedModel",
        )


def _base_model_name(detected: Detected) -> str:
    """A base model name (as Civitai spells them) for a family read from the header."""
    if detected.family == "flux":
        return "Flux.1 S" if detected.variant == "schnell" else "Flux.1 D"
    if detected.family == "sd3":
        return f"SD 3.5 {detected.variant.title()}" if detected.variant else "SD 3.5"
    return {"sd15": "SD 1.5", "sd2": "SD 2.1", "sdxl": "SDXL 1.0"}.get(
        detected.family, detected.architecture
    )


def _check_filename(filename: str, reference: str) -> str:
    name = filename.replace("\\", "_").strip()
    if not name or len(name) > 255 or not name.lower().endswith(MODEL_EXTENSIONS):
        _fail(
            f"{reference}: the model file must end in .safetensors or .ckpt "
            f"(got {filename or 'no file name'!r})",
            "InvalidModelReference",
        )
    return name


@dataclass(frozen=True)
class ModelReference:
    """What a model reference says by itself, before anything is asked over the network."""

    reference: str  # as given, without surrounding blanks
    kind: Literal["civitai", "hf", "http", "s3", "local"]
    civitai_version: int | None = None  # also for a Civitai download URL
    hf: HfReference | None = None
    url: str | None = None  # http(s): what to fetch (no fragment)
    bucket: str | None = None
    key: str | None = None
    path: Path | None = None  # local: absolute
    # None for Civitai, whose answer names the file and its base model.
    filename: str | None = None
    base_model: str | None = None
    family: BaseModelFamily | None = None
    # What named the family: a `#base_model=` hint, the file's name; None: nothing (fallback).
    claimed_by: ClaimedBy | None = None
    # Known before the network only for a local file, from its header.
    variant: str | None = None

    @property
    def shown(self) -> str:
        """The reference for messages: a presigned URL's query is a credential, kept out."""
        if self.kind == "http" and self.url is not None:
            return _safe_url(self.url)
        if self.hf is not None:
            return str(self.hf)
        return self.reference.split("#", 1)[0]


def _named(
    filename: str, hint: str | None, where: str
) -> tuple[str, BaseModelFamily, ClaimedBy | None]:
    base_model, family, claimed_by = _guess_base_model(filename, hint)
    if claimed_by == "hint":
        _refuse_unsupported(base_model, family, where)
    return base_model, family, claimed_by


def parse_model_reference(reference: str, settings: Settings) -> ModelReference:
    """Every check of a model reference that needs neither the network nor the file: its form,
    scheme, file name and the family its name implies. Raises the non-retryable
    `ApplicationError` that `resolve_model` fails with; the CLI runs it before any upload."""
    reference = reference.strip()
    if match := _CIVITAI_REF.match(reference):
        return ModelReference(reference, "civitai", civitai_version=int(match.group(1)))
    if reference.startswith("civitai:"):
        _fail(
            f"{reference!r} is not a Civitai reference: use civitai:<model version id>, "
            "e.g. civitai:128713",
            "InvalidModelReference",
        )
    if reference.startswith("hf:"):
        without_hint, _, fragment = reference.partition("#")
        hf = parse_hf_reference(without_hint)
        filename = _check_filename(hf.filename, str(hf))
        hint = parse_qs(fragment).get("base_model", [None])[0]
        base_model, family, claimed_by = _named(filename, hint, str(hf))
        return ModelReference(
            reference,
            "hf",
            hf=hf,
            filename=filename,
            base_model=base_model,
            family=family,
            claimed_by=claimed_by,
        )
    parts = urlsplit(reference)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        version_id = _civitai_download_id(reference, settings.civitai_base_url)
        if version_id is not None:
            return ModelReference(reference, "civitai", civitai_version=version_id)
        shown = _safe_url(reference)  # a presigned URL's query is a credential: keep it out
        if scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
            _fail(
                f"{shown}: plain http is only allowed for localhost; use https",
                "InvalidModelReference",
            )
        if not parts.hostname:
            _fail(f"{shown!r} has no host", "InvalidModelReference")
        filename = _check_filename(unquote(parts.path.rsplit("/", 1)[-1]), shown)
        hint = parse_qs(parts.fragment).get("base_model", [None])[0]
        base_model, family, claimed_by = _named(filename, hint, filename)
        return ModelReference(
            reference,
            "http",
            url=parts._replace(fragment="").geturl(),
            filename=filename,
            base_model=base_model,
            family=family,
            claimed_by=claimed_by,
        )
    if scheme == "s3":
        bucket, key = parts.netloc, reference[len(f"s3://{parts.netloc}/") :]
        if not bucket or not key:
            _fail(f"{reference!r} is not s3://bucket/key", "InvalidModelReference")
        filename = _check_filename(key.rsplit("/", 1)[-1], reference)
        base_model, family, claimed_by = _named(filename, None, filename)
        return ModelReference(
            reference,
            "s3",
            bucket=bucket,
            key=key,
            filename=filename,
            base_model=base_model,
            family=family,
            claimed_by=claimed_by,
        )
    if scheme == "file" or reference.startswith("/"):
        return _parse_local(reference, settings)
    _fail(
        f"{reference!r} is not a model reference: use civitai:<versionId>, "
        "hf:<owner>/<repo>[@revision]/<file>, an https URL, s3://bucket/key or an absolute "
        "local path",
        "InvalidModelReference",
    )


def _parse_local(reference: str, settings: Settings) -> ModelReference:
    if settings.gpu_provider != "local":
        _fail(
            f"{reference}: local model paths work only with the local GPU provider; "
            "upload the model to S3 and use s3://bucket/key",
            "InvalidModelReference",
        )
    if reference.startswith("file:"):
        parts = urlsplit(reference)
        if parts.netloc not in ("", "localhost"):
            _fail(f"{reference}: file URLs must name a local path", "InvalidModelReference")
        raw_path, fragment = unquote(parts.path), parts.fragment
    else:
        raw_path, fragment = reference, ""
    path = Path(raw_path)
    if not path.is_absolute():
        _fail(f"{reference}: local model paths must be absolute", "InvalidModelReference")
    filename = _check_filename(path.name, reference)
    hint = parse_qs(fragment).get("base_model", [None])[0]
    base_model, family, claimed_by = _named(filename, hint, filename)
    return ModelReference(
        reference,
        "local",
        path=path,
        filename=filename,
        base_model=base_model,
        family=family,
        claimed_by=claimed_by,
    )


def _civitai_download_id(url: str, civitai_base_url: str) -> int | None:
    """A Civitai download URL (which needs the key) is resolved as `civitai:<id>`."""
    parts = urlsplit(url)
    if parts.hostname != urlsplit(civitai_base_url).hostname:
        return None
    match = _CIVITAI_DOWNLOAD_PATH.match(parts.path)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class _Source:
    """One file found at its source, before its header is read. `read_header` holds whatever
    credential the read needs and lives only for this activity call (never in its result)."""

    shown: str  # for messages; no credential
    url: str
    filename: str
    sha256: str | None = None
    bytes: int | None = None
    needs_civitai_key: bool = False
    needs_hf_token: bool = False
    read_header: Callable[[], Header] | None = None  # blocking; run in a thread


# A Civitai version's VAE or text encoder file, looked up when it is needed.
_CivitaiExtra = Callable[[], Awaitable[_Source]]


@dataclass(frozen=True)
class _Claim:
    """What the source says the checkpoint is; `by` None: nothing said it (name fallback)."""

    base_model: str
    family: BaseModelFamily
    by: ClaimedBy | None


class ModelActivities:
    """Resolves model references; talks to Civitai, Hugging Face and other HTTP hosts (httpx)
    and S3 (boto3), and reads the safetensors headers of the files it finds."""

    # Class-level so tests can take a family's defaults away (an incomplete file set).
    default_components: dict[BaseModelFamily, dict[ComponentRole, str]] = DEFAULT_COMPONENTS

    def __init__(
        self, s3_client: S3Client, settings: Settings, presign_client: S3Client | None = None
    ) -> None:
        self.s3 = s3_client
        self.settings = settings
        # A GPU downloads s3:// models through the address it reaches (StorageActivities too).
        self.presigner = presign_client or s3_client

    @activity.defn
    async def resolve_model(self, input: ResolveModelInput) -> ResolvedModel:
        """Where and what the base model and its family's other files are, checked before any
        GPU is rented."""
        reference = parse_model_reference(input.model, self.settings)
        # Every given component's form is checked before anything is asked over the network.
        given = {
            role: parse_model_reference(ref, self.settings)
            for role, ref in sorted(input.model_files.items())
        }
        key = self._civitai_key(input.civitai_api_key)
        async with httpx.AsyncClient(
            timeout=self.settings.http_timeout_s, verify=tls_context()
        ) as client:
            extras: list[_CivitaiExtra] = []
            if reference.civitai_version is not None:
                main, claim, extras = await self._locate_civitai(
                    client, reference.civitai_version, key
                )
            else:
                main = await self._locate(client, reference, key)
                assert reference.base_model is not None and reference.family is not None
                claim = _Claim(reference.base_model, reference.family, reference.claimed_by)
            detected = await _detect(main)
            base_model, family = _decide_family(main, claim, detected)
            components = await self._components(client, main, family, detected, given, extras, key)
        return ResolvedModel(
            url=main.url,
            filename=main.filename,
            sha256=main.sha256,
            bytes=main.bytes,
            base_model=base_model,
            family=family,
            needs_civitai_key=main.needs_civitai_key,
            needs_hf_token=main.needs_hf_token,
            variant=detected.variant if detected else None,
            v_parameterization=detected.v_parameterization if detected else False,
            components=components,
        )

    async def _locate(
        self, client: httpx.AsyncClient, reference: ModelReference, key: str | None
    ) -> _Source:
        """Find one file of a non-Civitai reference (or a Civitai one, for a component)."""
        if reference.civitai_version is not None:
            main, _, _ = await self._locate_civitai(client, reference.civitai_version, key)
            return main
        if reference.kind == "hf":
            return await self._locate_hf(client, reference)
        if reference.kind == "http":
            return await self._locate_http(client, reference)
        if reference.kind == "s3":
            return await self._locate_s3(reference)
        return await asyncio.to_thread(_locate_local, reference)

    # -- components ----------------------------------------------------------------------------

    async def _components(
        self,
        client: httpx.AsyncClient,
        main: _Source,
        family: BaseModelFamily,
        detected: Detected | None,
        given: dict[ComponentRole, ModelReference],
        extras: list[_CivitaiExtra],
        key: str | None,
    ) -> list[ResolvedComponent]:
        """The family's files the checkpoint does not hold: from the request's `model_files`,
        else from the Civitai version's own VAE/text encoder files, else the family's defaults.
        Each one's header must show the role it is used for."""
        # Detected.missing() knows which roles a script takes from the checkpoint (SD 3.x) and
        # which only from files of their own (Flux.1, even when its checkpoint holds them).
        needed = list(
            detected.missing() if detected is not None else FAMILY_COMPONENTS.get(family, ())
        )
        found: dict[ComponentRole, _Source] = {}
        for role in needed:
            if role in given:
                source = await self._locate(client, given[role], key)
                await _check_role(source, role, f"model_files.{role}")
                found[role] = source
        for extra in extras:
            if all(role in found for role in needed):
                break
            source = await extra()
            role_held = await _role_of(source)
            if role_held in needed and role_held not in found:
                found[role_held] = source
        defaults = self.default_components.get(family, {})
        for role in needed:
            if role in found or role not in defaults:
                continue
            default = parse_model_reference(defaults[role], self.settings)
            try:
                source = await self._locate(client, default, key)
            except ApplicationError as e:
                if not e.non_retryable:
                    raise
                _fail(
                    f"{main.shown} does not hold its {role} file, and its default "
                    f"{default.shown} failed: {e.message}; or name another in the request's "
                    f"model_files.{role}",
                    e.type or "ModelNotFound",
                )
            await _check_role(source, role, f"the default {role}")
            found[role] = source
        missing = [role for role in needed if role not in found]
        if missing:
            _fail(
                f"{main.shown} is a {family} checkpoint without {', '.join(missing)}: give "
                f"{'it' if len(missing) == 1 else 'them'} in the request's model_files "
                f"(e.g. model_files.{missing[0]} = hf:<owner>/<repo>/<file>)",
                "ModelFilesIncomplete",
            )
        return [
            ResolvedComponent(
                role=role,
                url=found[role].url,
                filename=found[role].filename,
                sha256=found[role].sha256,
                bytes=found[role].bytes,
                needs_civitai_key=found[role].needs_civitai_key,
                needs_hf_token=found[role].needs_hf_token,
            )
            for role in needed
        ]

    # -- Civitai -------------------------------------------------------------------------------

    def _civitai_key(self, given: str | None) -> str | None:
        if given:
            return given
        key = self.settings.civitai_api_key
        return key.get_secret_value() if key is not None else None

    async def _locate_civitai(
        self, client: httpx.AsyncClient, version_id: int, key: str | None
    ) -> tuple[_Source, _Claim, list[_CivitaiExtra]]:
        """The version's checkpoint, what Civitai says it is, and its files that may be the
        family's components (VAE, text encoders)."""
        where = f"Civitai model version {version_id}"
        base = self.settings.civitai_base_url.rstrip("/")
        headers = {"accept": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        response = await self._civitai_get(
            client, f"{base}/api/v1/model-versions/{version_id}", headers, where
        )
        if response.status_code == 404:
            _fail(f"Civitai has no model version {version_id}", "ModelNotFound")
        self._raise_for_civitai_status(response, where, key)
        version = self._parse_version(response, where)

        base_model = version["baseModel"]
        family = base_model_family(base_model)
        # A base model Civitai names by an architecture no family trains is refused here; a
        # name it does not know ("Other") leaves the family to the checkpoint's header.
        if unsupported_architecture(base_model) is not None:
            _refuse_unsupported(base_model, family, f"civitai:{version_id}")
        model_type = (version.get("model") or {}).get("type")
        if model_type not in (None, "Checkpoint"):
            _fail(
                f"{where} is a {model_type}, not a checkpoint: pick a checkpoint version "
                "as the base model",
                "UnsupportedModel",
            )
        file = self._pick_model_file(version["files"], where)
        shown = f"civitai:{version_id}"
        main = await self._civitai_file(client, file, version_id, headers, where, shown, key)
        # Probed only when a component is still missing.
        extras: list[_CivitaiExtra] = [
            functools.partial(
                self._civitai_file,
                client,
                f,
                version_id,
                headers,
                f"{where}'s {f['name']}",
                f"{shown}'s {f['name']}",
                key,
            )
            for f in version["files"]
            if f.get("type") in _COMPONENT_FILE_TYPES and f["name"].lower().endswith(".safetensors")
        ]
        claim = _Claim(base_model, family, "civitai" if family != "other" else None)
        return main, claim, extras

    async def _civitai_file(
        self,
        client: httpx.AsyncClient,
        file: dict[str, Any],
        version_id: int,
        headers: dict[str, str],
        where: str,
        shown: str,
        key: str | None,
    ) -> _Source:
        # The metadata endpoint is mixed-auth: it answers a bad key as if anonymous. Only the
        # download endpoint rejects a bad key or early access, so ask it now (without
        # following its redirect) rather than after a GPU was rented.
        download_url = self._download_url(file, version_id)
        size, location = await self._probe_civitai_download(
            client, download_url, headers, where, key
        )
        sha = (file.get("hashes") or {}).get("SHA256")
        if sha is not None and not (isinstance(sha, str) and _SHA256_HEX.match(sha)):
            _retry(f"Civitai sent a malformed SHA256 for {where}: {sha!r}", "CivitaiBadResponse")
        filename = _check_filename(Path(file["name"]).name, where)
        # The header comes from the signed storage URL Civitai redirects to, which needs no key:
        # the key never leaves Civitai's host.
        if location:
            reader = functools.partial(
                read_header_http, location, None, self.settings.http_timeout_s
            )
        else:
            auth = {k: v for k, v in headers.items() if k == "authorization"}
            reader = functools.partial(
                read_header_http, download_url, auth, self.settings.http_timeout_s
            )
        return _Source(
            shown=shown,
            url=download_url,
            filename=filename,
            sha256=sha.lower() if sha else None,
            bytes=size,
            needs_civitai_key=True,
            read_header=None if filename.lower().endswith(".ckpt") else reader,
        )

    async def _civitai_get(
        self, client: httpx.AsyncClient, url: str, headers: dict[str, str], where: str
    ) -> httpx.Response:
        try:
            return await client.get(url, headers=headers)
        except httpx.TimeoutException:
            _retry(
                f"Civitai did not answer within {client.timeout.read}s ({where})",
                "CivitaiUnavailable",
            )
        except httpx.HTTPError as e:
            _retry(
                f"Civitai is unreachable ({where}): {type(e).__name__}: {e}", "CivitaiUnavailable"
            )

    def _raise_for_civitai_status(
        self, response: httpx.Response, where: str, key: str | None
    ) -> None:
        status = response.status_code
        if status in (401, 403):
            detail = _error_text(response)
            if "early access" in detail.lower():
                _fail(
                    f"{where} is in early access on Civitai: its download needs an account that "
                    f"has unlocked it ({detail})",
                    "CivitaiUnauthorized",
                )
            if key is None:
                _fail(
                    f"Civitai refused the download of {where} without an API key ({detail}): "
                    "pass civitai_api_key or set LORA_CIVITAI_API_KEY",
                    "CivitaiUnauthorized",
                )
            _fail(
                f"Civitai refused the API key for {where} (HTTP {status}: {detail}); "
                "check that the key is valid and its account may download this model",
                "CivitaiUnauthorized",
            )
        if _is_transient(status):
            _retry(
                f"Civitai answered HTTP {status} for {where}; will retry",
                "CivitaiUnavailable",
                _retry_after_s(response),
            )
        if status == 404:
            _fail(f"Civitai has no downloadable file for {where}", "ModelNotFound")
        if status == 410:
            _fail(
                f"{where} is archived on Civitai and can no longer be downloaded", "ModelNotFound"
            )
        if not (200 <= status < 400):
            _fail(
                f"Civitai answered HTTP {status} for {where}: {_error_text(response)}",
                "CivitaiRejected",
            )

    @staticmethod
    def _parse_version(response: httpx.Response, where: str) -> dict[str, Any]:
        try:
            version = response.json()
        except ValueError:
            _retry(
                f"Civitai answered {where} with a body that is not JSON "
                f"({response.headers.get('content-type', 'no content type')})",
                "CivitaiBadResponse",
            )
        problems: list[str] = []
        if not isinstance(version, dict):
            problems.append("the body is not an object")
        else:
            if not isinstance(version.get("baseModel"), str) or not version["baseModel"]:
                problems.append("baseModel is missing")
            files = version.get("files")
            if not isinstance(files, list) or not all(
                isinstance(f, dict) and isinstance(f.get("name"), str) for f in files
            ):
                problems.append("files is not a list of files with names")
        if problems:
            _retry(
                f"Civitai's answer for {where} is not a model version: {'; '.join(problems)}",
                "CivitaiBadResponse",
            )
        return version  # type: ignore[no-any-return]

    @staticmethod
    def _pick_model_file(files: list[dict[str, Any]], where: str) -> dict[str, Any]:
        """The primary checkpoint file, else the first checkpoint file, SafeTensor preferred."""
        candidates = [
            f
            for f in files
            if f.get("type") in _CHECKPOINT_FILE_TYPES
            and f["name"].lower().endswith(MODEL_EXTENSIONS)
        ]
        if not candidates:
            names = ", ".join(f"{f['name']} ({f.get('type')})" for f in files) or "no files"
            _fail(
                f"{where} has no .safetensors or .ckpt model file (it has: {names})",
                "ModelNotFound",
            )

        def rank(f: dict[str, Any]) -> tuple[int, int]:
            safetensor = (f.get("metadata") or {}).get("format") == "SafeTensor" or f[
                "name"
            ].lower().endswith(".safetensors")
            return (0 if f.get("primary") is True else 1, 0 if safetensor else 1)

        return min(candidates, key=rank)

    def _download_url(self, file: dict[str, Any], version_id: int) -> str:
        """The file's download URL, always on the configured Civitai host: the API key is sent
        there, so a host named in Civitai's answer is never trusted with it."""
        base = self.settings.civitai_base_url.rstrip("/")
        raw = file.get("downloadUrl")
        if isinstance(raw, str):
            parts = urlsplit(raw)
            if _CIVITAI_DOWNLOAD_PATH.match(parts.path):
                return f"{base}{parts.path}" + (f"?{parts.query}" if parts.query else "")
        return f"{base}/api/download/models/{version_id}"

    async def _probe_civitai_download(
        self,
        client: httpx.AsyncClient,
        url: str,
        headers: dict[str, str],
        where: str,
        key: str | None,
    ) -> tuple[int | None, str | None]:
        """Check that the key may download the file; returns its exact size when the storage
        host tells it (Civitai's sizeKB is rounded, so it is not used) and the signed storage
        URL it redirects to, if it does."""
        # Without a JSON content type older Civitai versions redirect to a login page instead of
        # answering 401.
        probe_headers = {**headers, "content-type": "application/json"}
        try:
            async with client.stream(
                "GET", url, headers=probe_headers, follow_redirects=False
            ) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    if not location:
                        return None, None
                    return await self._remote_size(client, location), location
                if response.status_code >= 300:
                    await response.aread()  # a short JSON error, e.g. {"error": "Unauthorized"}
                self._raise_for_civitai_status(response, where, key)
                return _content_length(response), None
        except httpx.TimeoutException:
            _retry(f"Civitai's download endpoint timed out ({where})", "CivitaiUnavailable")
        except httpx.HTTPError as e:
            _retry(
                f"Civitai's download endpoint is unreachable ({where}): {type(e).__name__}",
                "CivitaiUnavailable",
            )

    @staticmethod
    async def _remote_size(client: httpx.AsyncClient, url: str) -> int | None:
        """Size of a (signed) storage URL from a one-byte ranged GET; None if it will not say.

        A GET, not a HEAD: signed URLs are usually signed for GET only. No Authorization header:
        the key must not leave Civitai's host.
        """
        try:
            async with client.stream("GET", url, headers={"range": "bytes=0-0"}) as response:
                if response.status_code == 206:
                    total = response.headers.get("content-range", "").rpartition("/")[2]
                    return int(total) if total.isdigit() else None
                if response.status_code == 200:
                    return _content_length(response)
        except httpx.HTTPError:
            pass  # the size is a hint for the runner; the download itself will tell
        return None

    # -- Hugging Face --------------------------------------------------------------------------

    async def _locate_hf(self, client: httpx.AsyncClient, reference: ModelReference) -> _Source:
        assert reference.hf is not None and reference.filename is not None
        token = self.settings.hf_token.get_secret_value() if self.settings.hf_token else None
        found = await lookup_hf_file(client, reference.hf, self.settings.hf_base_url, token)
        auth = {"authorization": f"Bearer {token}"} if found.needs_token and token else None
        return _Source(
            shown=str(reference.hf),
            url=found.url,
            filename=reference.filename,
            sha256=found.sha256,
            bytes=found.bytes,
            needs_hf_token=found.needs_token,
            read_header=_header_reader(
                reference.filename,
                functools.partial(read_header_http, found.url, auth, self.settings.http_timeout_s),
            ),
        )

    # -- other HTTP hosts ------------------------------------------------------------------------

    async def _locate_http(self, client: httpx.AsyncClient, reference: ModelReference) -> _Source:
        assert reference.url is not None and reference.filename is not None
        fetch_url = reference.url
        shown = reference.shown
        try:
            response = await client.head(fetch_url, follow_redirects=True)
            if response.status_code in (403, 405, 501):
                # Some hosts (and GET-signed URLs) refuse HEAD: ask for one byte instead.
                async with client.stream(
                    "GET", fetch_url, headers={"range": "bytes=0-0"}, follow_redirects=True
                ) as response:
                    size = _size_from(response)
            else:
                size = _size_from(response)
        except httpx.HTTPError as e:
            _retry(f"{shown} is unreachable: {type(e).__name__}: {e}", "ModelSourceUnavailable")
        status = response.status_code
        if status in (404, 410):
            _fail(f"{shown} does not exist (HTTP {status})", "ModelNotFound")
        if status in (401, 403):
            _fail(f"{shown} refused access (HTTP {status})", "ModelAccessDenied")
        if _is_transient(status):
            _retry(
                f"{shown} answered HTTP {status}; will retry",
                "ModelSourceUnavailable",
                _retry_after_s(response),
            )
        if not 200 <= status < 300:
            _fail(f"{shown} answered HTTP {status}", "ModelNotFound")
        return _Source(
            shown=shown,
            url=fetch_url,
            filename=reference.filename,
            bytes=size,
            read_header=_header_reader(
                reference.filename,
                functools.partial(read_header_http, fetch_url, None, self.settings.http_timeout_s),
            ),
        )

    # -- S3 ------------------------------------------------------------------------------------

    async def _locate_s3(self, model: ModelReference) -> _Source:
        assert model.bucket is not None and model.key is not None
        assert model.filename is not None
        reference, bucket, key = model.reference, model.bucket, model.key
        try:
            head = await asyncio.to_thread(
                self.s3.head_object, Bucket=bucket, Key=key, ChecksumMode="ENABLED"
            )
        except ClientError as e:
            _raise_for_s3(e, reference)
        except BotoCoreError as e:
            _retry(f"S3 is unreachable for {reference}: {e}", "ModelSourceUnavailable")
        url = await asyncio.to_thread(
            self.presigner.generate_presigned_url,
            "get_object",
            Params={"Bucket": bucket, "Key": key},
            ExpiresIn=self.settings.download_url_ttl_s,
        )
        # A full-object SHA-256 checksum, else a sha256 the uploader stored as metadata (what
        # the images zip carries too); a multipart upload's checksum is not the file's.
        sha256 = _sha256_from_checksum(head.get("ChecksumSHA256"))
        stored = (head.get("Metadata") or {}).get("sha256", "").lower()
        if sha256 is None and _SHA256_HEX.match(stored):
            sha256 = stored
        return _Source(
            shown=reference,
            url=url,
            filename=model.filename,
            sha256=sha256,
            bytes=int(head["ContentLength"]),
            read_header=_header_reader(
                model.filename, functools.partial(read_header_s3, self.s3, bucket, key)
            ),
        )


def _raise_for_s3(error: ClientError, reference: str) -> NoReturn:
    code = str(error.response.get("Error", {}).get("Code", ""))
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        _fail(f"{reference} does not exist", "ModelNotFound")
    if code in ("403", "AccessDenied", "Forbidden"):
        _fail(f"{reference}: access denied to the worker's S3 credentials", "ModelAccessDenied")
    _retry(f"S3 failed to read {reference}: {code or error}", "ModelSourceUnavailable")


# -- local files ---------------------------------------------------------------------------------


def _locate_local(model: ModelReference) -> _Source:
    assert model.path is not None and model.filename is not None
    path = model.path
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        _fail(f"{path} {what}", "ModelNotFound")
    resolved = path.resolve()
    return _Source(
        shown=model.filename,
        url=resolved.as_uri(),
        filename=model.filename,
        bytes=resolved.stat().st_size,
        read_header=_header_reader(model.filename, functools.partial(read_header_local, resolved)),
    )


def check_local_model(path: Path, hint: str | None) -> Detected | None:
    """The CLI's check of a local checkpoint before anything is uploaded or rented: what its
    header says it is, refused with the lines `resolve_model` fails with (a file that is not
    safetensors, a family that contradicts the hint or the name, an architecture no family
    trains). None for a .ckpt, whose pickle has no header (its name's family stands)."""
    filename = _check_filename(path.name, str(path))
    base_model, family, claimed_by = _named(filename, hint, filename)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        _fail(f"{path} {what}", "ModelNotFound")
    source = _Source(
        shown=filename,
        url=path.resolve().as_uri(),
        filename=filename,
        read_header=_header_reader(filename, functools.partial(read_header_local, path)),
    )
    detected = _read_detected(source)
    _decide_family(source, _Claim(base_model, family, claimed_by), detected)
    return detected


# -- headers -------------------------------------------------------------------------------------


def _header_reader(filename: str, reader: Callable[[], Header]) -> Callable[[], Header] | None:
    """.ckpt files are pickles: they have no header to read (their name's family stands)."""
    return None if filename.lower().endswith(".ckpt") else reader


def _read_header(source: _Source) -> Header:
    assert source.read_header is not None
    try:
        return source.read_header()
    except HeaderError as e:
        # The reader names the file by its path or URL; the reference the user gave is clearer.
        reason = str(e)
        where, sep, rest = reason.partition(": ")
        if sep and " " not in where:
            reason = rest
        _fail(
            f"{source.shown}: {reason}; the model must be a .safetensors file (or a .ckpt)",
            "InvalidModelFile",
        )
    except httpx.HTTPStatusError as e:
        status = e.response.status_code
        if _is_transient(status):
            _retry(
                f"reading the header of {source.shown} got HTTP {status}; will retry",
                "ModelSourceUnavailable",
            )
        _fail(f"{source.shown} refused the read of its header (HTTP {status})", "ModelAccessDenied")
    except (httpx.HTTPError, OSError, BotoCoreError) as e:
        _retry(
            f"reading the header of {source.shown} failed: {type(e).__name__}: {e}",
            "ModelSourceUnavailable",
        )
    except ClientError as e:
        _raise_for_s3(e, source.shown)


def _read_detected(source: _Source) -> Detected | None:
    if source.read_header is None:
        return None
    return detect(_read_header(source))


async def _detect(source: _Source) -> Detected | None:
    return await asyncio.to_thread(_read_detected, source)


def _decide_family(
    source: _Source, claim: _Claim, detected: Detected | None
) -> tuple[str, BaseModelFamily]:
    """The checkpoint's base model and family. The header is the truth about the architecture:
    a source that names another family (a Civitai "SDXL" upload whose weights are SD 1.x, a
    wrong `#base_model=` hint, a file called "...xl..." that is not) is a mislabeled file, and
    training it as what it says would fail on the GPU or train garbage, so it is refused. Where
    nothing named the family (no hint, nothing in the name, Civitai's "Other"), the header
    decides."""
    if detected is None:  # a .ckpt: the name (or Civitai) is all there is
        if claim.family == "other":
            _refuse_unsupported(claim.base_model, claim.family, source.shown)
        return claim.base_model, claim.family
    if claim.by is not None:
        problem = describe_mismatch(detected, claim.family, source.shown)
        if problem:
            _fail(problem, "ModelFamilyMismatch")
    if detected.family == "other":
        architecture = detected.architecture
        what = (
            architecture  # "a LoRA, not a base model", "a text encoder (CLIP)"
            if architecture.startswith("a ")
            else f"{_article(architecture)} {architecture} model"
        )
        _fail(
            f"{source.shown} is {what}, which loratrain does not train; supported: "
            f"{SUPPORTED_FAMILIES}",
            "UnsupportedModel",
        )
    if claim.by is not None and claim.family == detected.family:
        return claim.base_model, detected.family
    return _base_model_name(detected), detected.family


async def _role_of(source: _Source) -> ComponentRole | None:
    if source.read_header is None:
        return None
    header = await asyncio.to_thread(_read_header, source)
    return component_role(header)


async def _check_role(source: _Source, role: ComponentRole, given_as: str) -> None:
    if source.read_header is None:
        _fail(
            f"{source.shown} ({given_as}) is a .ckpt: the {role} file must be .safetensors",
            "InvalidModelFile",
        )
    held = await _role_of(source)
    if held != role:
        what = f"a {held} file" if held else "not a text encoder or AE file loratrain knows"
        _fail(
            f"{source.shown} was given as {given_as} but its header shows {what}; "
            f"name a {role} file there",
            "ModelComponentMismatch",
        )


def _error_text(response: httpx.Response) -> str:
    """Civitai's `{"error", "message"}` as one short line (the body of a streamed response may
    be unread; then only the status is known)."""
    try:
        body = response.json()
    except (ValueError, httpx.ResponseNotRead):
        return f"HTTP {response.status_code}"
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("error", "message") if body.get(k)]
        if parts:
            return ": ".join(parts)[:300]
    return f"HTTP {response.status_code}"


def _safe_url(url: str) -> str:
    """The URL without query, fragment or userinfo, for messages and logs."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _size_from(response: httpx.Response) -> int | None:
    if response.status_code == 206:
        total = response.headers.get("content-range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    return _content_length(response)


def _sha256_from_checksum(value: Any) -> str | None:
    """S3's full-object ChecksumSHA256 (base64) as hex; multipart ("...-N") checksums are not."""
    if not isinstance(value, str) or "-" in value:
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None
