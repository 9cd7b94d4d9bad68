"""Resolve a model reference (civitai:<versionId>, https URL, s3://bucket/key, local path) to a file
the GPU runner can download: URL, filename, sha256 when known, size, base model family.

Errors that retrying cannot fix are non-retryable `ApplicationError`s with these types:
`InvalidModelReference`, `ModelNotFound`, `CivitaiUnauthorized`, `ModelAccessDenied`,
`UnsupportedModel`. Outages (timeouts, 429, 5xx) raise retryable `ApplicationError`s
(`CivitaiUnavailable`, `CivitaiBadResponse`, `ModelSourceUnavailable`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
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

from gpu_runner.protocol import BaseModelFamily, base_model_family

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from worker.settings import Settings


class ResolveModelInput(BaseModel):
    run_id: str
    model: str
    civitai_api_key: str | None = Field(default=None, repr=False)


class ResolvedModel(BaseModel):
    url: str = Field(repr=False)
    filename: str
    sha256: str | None = None
    bytes: int | None = None
    base_model: str
    family: BaseModelFamily
    needs_civitai_key: bool = False


MODEL_EXTENSIONS = (".safetensors", ".ckpt")
# Civitai file types that hold a whole checkpoint (others: VAE, Config, Training Data, ...).
_CHECKPOINT_FILE_TYPES = ("Model", "Pruned Model")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_CIVITAI_REF = re.compile(r"^civitai:(\d{1,12})$")
_CIVITAI_DOWNLOAD_PATH = re.compile(r"^/api/download/models/(\d{1,12})/?$")


def _fail(message: str, error_type: str) -> NoReturn:
    raise ApplicationError(message, type=error_type, non_retryable=True)


def _retry(message: str, error_type: str, retry_after_s: float | None = None) -> NoReturn:
    delay = timedelta(seconds=retry_after_s) if retry_after_s else None
    raise ApplicationError(message, type=error_type, non_retryable=False, next_retry_delay=delay)


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


def _guess_base_model(filename: str, hint: str | None) -> tuple[str, BaseModelFamily]:
    """Base model for files outside Civitai: an explicit hint, else a guess from the filename.

    The guess is deliberately simple: "flux" or "sd3" in the name means that family, "xl" or
    "pony" means SDXL, anything else SD 1.5. Add `#base_model=SDXL 1.0` to a URL to be explicit.
    """
    if hint:
        return hint, base_model_family(hint)
    name = filename.lower()
    if "flux" in name:
        return "Flux.1 D", "flux"
    if "sd3" in name or "sd_3" in name:
        return "SD 3", "sd3"
    if "xl" in name or "pony" in name or "illustrious" in name:
        return "SDXL 1.0", "sdxl"
    return "SD 1.5", "sd15"


def _check_supported(family: BaseModelFamily, base_model: str, where: str) -> None:
    if family == "flux":
        _fail(
            f"Flux models are not supported yet ({where} is based on {base_model}); "
            "use an SD 1.5 or SDXL checkpoint",
            "UnsupportedModel",
        )
    if family == "sd3":
        _fail(
            f"SD 3 models are not supported yet ({where} is based on {base_model}); "
            "use an SD 1.5 or SDXL checkpoint",
            "UnsupportedModel",
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
    kind: Literal["civitai", "http", "s3", "local"]
    civitai_version: int | None = None  # also for a Civitai download URL
    url: str | None = None  # http(s): what to fetch (no fragment)
    bucket: str | None = None
    key: str | None = None
    path: Path | None = None  # local: absolute
    # None for Civitai, whose answer names the file and its base model.
    filename: str | None = None
    base_model: str | None = None
    family: BaseModelFamily | None = None


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
        base_model, family = _guess_base_model(filename, hint)
        _check_supported(family, base_model, filename)
        return ModelReference(
            reference,
            "http",
            url=parts._replace(fragment="").geturl(),
            filename=filename,
            base_model=base_model,
            family=family,
        )
    if scheme == "s3":
        bucket, key = parts.netloc, reference[len(f"s3://{parts.netloc}/") :]
        if not bucket or not key:
            _fail(f"{reference!r} is not s3://bucket/key", "InvalidModelReference")
        filename = _check_filename(key.rsplit("/", 1)[-1], reference)
        base_model, family = _guess_base_model(filename, None)
        _check_supported(family, base_model, filename)
        return ModelReference(
            reference,
            "s3",
            bucket=bucket,
            key=key,
            filename=filename,
            base_model=base_model,
            family=family,
        )
    if scheme == "file" or reference.startswith("/"):
        return _parse_local(reference, settings)
    _fail(
        f"{reference!r} is not a model reference: use civitai:<versionId>, an https URL, "
        "s3://bucket/key or an absolute local path",
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
    base_model, family = _guess_base_model(filename, hint)
    _check_supported(family, base_model, filename)
    return ModelReference(
        reference, "local", path=path, filename=filename, base_model=base_model, family=family
    )


def _civitai_download_id(url: str, civitai_base_url: str) -> int | None:
    """A Civitai download URL (which needs the key) is resolved as `civitai:<id>`."""
    parts = urlsplit(url)
    if parts.hostname != urlsplit(civitai_base_url).hostname:
        return None
    match = _CIVITAI_DOWNLOAD_PATH.match(parts.path)
    return int(match.group(1)) if match else None


class ModelActivities:
    """Resolves model references; talks to Civitai and other HTTP hosts (httpx) and S3 (boto3)."""

    def __init__(
        self, s3_client: S3Client, settings: Settings, presign_client: S3Client | None = None
    ) -> None:
        self.s3 = s3_client
        self.settings = settings
        # A GPU downloads s3:// models through the address it reaches (StorageActivities too).
        self.presigner = presign_client or s3_client

    @activity.defn
    async def resolve_model(self, input: ResolveModelInput) -> ResolvedModel:
        """Where and what the base model is, checked before any GPU is rented."""
        reference = parse_model_reference(input.model, self.settings)
        if reference.civitai_version is not None:
            return await self._resolve_civitai(reference.civitai_version, input.civitai_api_key)
        if reference.kind == "http":
            return await self._resolve_http(reference)
        if reference.kind == "s3":
            return await self._resolve_s3(reference)
        return await asyncio.to_thread(self._resolve_local, reference)

    # -- Civitai -------------------------------------------------------------------------------

    def _civitai_key(self, given: str | None) -> str | None:
        if given:
            return given
        key = self.settings.civitai_api_key
        return key.get_secret_value() if key is not None else None

    async def _resolve_civitai(self, version_id: int, given_key: str | None) -> ResolvedModel:
        key = self._civitai_key(given_key)
        where = f"Civitai model version {version_id}"
        base = self.settings.civitai_base_url.rstrip("/")
        headers = {"accept": "application/json"}
        if key:
            headers["authorization"] = f"Bearer {key}"
        async with httpx.AsyncClient(timeout=self.settings.http_timeout_s) as client:
            response = await self._civitai_get(
                client, f"{base}/api/v1/model-versions/{version_id}", headers, where
            )
            if response.status_code == 404:
                _fail(f"Civitai has no model version {version_id}", "ModelNotFound")
            self._raise_for_civitai_status(response, where, key)
            version = self._parse_version(response, where)

            base_model = version["baseModel"]
            family = base_model_family(base_model)
            _check_supported(family, base_model, where)
            model_type = (version.get("model") or {}).get("type")
            if model_type not in (None, "Checkpoint"):
                _fail(
                    f"{where} is a {model_type}, not a checkpoint: pick a checkpoint version "
                    "as the base model",
                    "UnsupportedModel",
                )
            file = self._pick_model_file(version["files"], where)

            # The metadata endpoint is mixed-auth: it answers a bad key as if anonymous. Only the
            # download endpoint rejects a bad key or early access, so ask it now (without
            # following its redirect) rather than after a GPU was rented.
            download_url = self._download_url(file, version_id)
            size = await self._probe_civitai_download(client, download_url, headers, where, key)

        sha = (file.get("hashes") or {}).get("SHA256")
        if sha is not None and not (isinstance(sha, str) and _SHA256_HEX.match(sha)):
            _retry(f"Civitai sent a malformed SHA256 for {where}: {sha!r}", "CivitaiBadResponse")
        return ResolvedModel(
            url=download_url,
            filename=_check_filename(Path(file["name"]).name, where),
            sha256=sha.lower() if sha else None,
            bytes=size,
            base_model=base_model,
            family=family,
            needs_civitai_key=True,
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
    ) -> int | None:
        """Check that the key may download the file; returns its exact size when the storage
        host tells it (Civitai's sizeKB is rounded, so it is not used)."""
        # Without a JSON content type older Civitai versions redirect to a login page instead of
        # answering 401.
        probe_headers = {**headers, "content-type": "application/json"}
        try:
            async with client.stream(
                "GET", url, headers=probe_headers, follow_redirects=False
            ) as response:
                if response.is_redirect:
                    location = response.headers.get("location")
                    return await self._remote_size(client, location) if location else None
                if response.status_code >= 300:
                    await response.aread()  # a short JSON error, e.g. {"error": "Unauthorized"}
                self._raise_for_civitai_status(response, where, key)
                return _content_length(response)
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

    # -- other HTTP hosts ------------------------------------------------------------------------

    async def _resolve_http(self, reference: ModelReference) -> ResolvedModel:
        assert reference.url is not None and reference.filename is not None
        assert reference.base_model is not None and reference.family is not None
        fetch_url = reference.url
        shown = _safe_url(fetch_url)  # a presigned URL's query is a credential: keep it out
        async with httpx.AsyncClient(
            timeout=self.settings.http_timeout_s, follow_redirects=True
        ) as client:
            try:
                response = await client.head(fetch_url)
                if response.status_code in (403, 405, 501):
                    # Some hosts (and GET-signed URLs) refuse HEAD: ask for one byte instead.
                    async with client.stream(
                        "GET", fetch_url, headers={"range": "bytes=0-0"}
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
        return ResolvedModel(
            url=fetch_url,
            filename=reference.filename,
            bytes=size,
            base_model=reference.base_model,
            family=reference.family,
        )

    # -- S3 ------------------------------------------------------------------------------------

    async def _resolve_s3(self, model: ModelReference) -> ResolvedModel:
        assert model.bucket is not None and model.key is not None
        assert model.filename is not None and model.base_model is not None
        assert model.family is not None
        reference, bucket, key = model.reference, model.bucket, model.key
        try:
            head = await asyncio.to_thread(
                self.s3.head_object, Bucket=bucket, Key=key, ChecksumMode="ENABLED"
            )
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
                _fail(f"{reference} does not exist", "ModelNotFound")
            if code in ("403", "AccessDenied", "Forbidden"):
                _fail(
                    f"{reference}: access denied to the worker's S3 credentials",
                    "ModelAccessDenied",
                )
            _retry(f"S3 failed to look up {reference}: {code or e}", "ModelSourceUnavailable")
        except BotoCoreError as e:
            _retry(f"S3 is unreachable for {reference}: {e}", "ModelSourceUnavailable")
        url = await asyncio.to_thread(
            self.presigner.generate_presigned_url,
            "get_object",
            Params={"Bucket": bucket, "Key": key},
            ExpiresIn=self.settings.download_url_ttl_s,
        )
        return ResolvedModel(
            url=url,
            filename=model.filename,
            sha256=_sha256_from_checksum(head.get("ChecksumSHA256")),
            bytes=int(head["ContentLength"]),
            base_model=model.base_model,
            family=model.family,
        )

    # -- local files ---------------------------------------------------------------------------

    def _resolve_local(self, model: ModelReference) -> ResolvedModel:
        assert model.path is not None and model.filename is not None
        assert model.base_model is not None and model.family is not None
        path = model.path
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            _fail(f"{path} {what}", "ModelNotFound")
        resolved = path.resolve()
        return ResolvedModel(
            url=resolved.as_uri(),
            filename=model.filename,
            bytes=resolved.stat().st_size,
            base_model=model.base_model,
            family=model.family,
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
