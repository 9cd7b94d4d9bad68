"""`hf:<repo>[@rev]/<file>` model references: parse them, and look a file up on the Hugging Face
Hub before any GPU is rented (its download URL, size, sha256, and whether it needs a token).

The lookup is what `huggingface_hub.get_hf_file_metadata` does: a HEAD of the file's resolve URL,
redirects not followed. The Hub answers an LFS file with a redirect to its CDN and the headers
`X-Linked-Size` (bytes) and `X-Linked-Etag` (the LFS oid: the file's sha256); errors carry
`X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`, ...).

Errors retrying cannot fix are non-retryable `ApplicationError`s: `InvalidModelReference`,
`ModelNotFound`, `HuggingFaceUnauthorized`; outages are retryable `ModelSourceUnavailable`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn
from urllib.parse import quote, urlsplit

import httpx
from temporalio.exceptions import ApplicationError

HF_PREFIX = "hf:"
# owner/name as the Hub allows them (letters, digits, "-", "_", "."), then @revision (a branch,
# tag or commit without "/"), then the file's path in the repo.
_HF_REF = re.compile(
    r"^hf:(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})"
    r"(?:@(?P<revision>[\w.-]{1,255}))?/(?P<path>[^\s?#]+)$"
)
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_RELATIVE_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_RENAMES = 3


@dataclass(frozen=True)
class HfReference:
    """An `hf:` reference, as given; nothing asked over the network yet."""

    repo: str
    revision: str
    path: str  # the file in the repo; may hold folders

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        revision = "" if self.revision == "main" else f"@{self.revision}"
        return f"hf:{self.repo}{revision}/{self.path}"

    def resolve_url(self, base_url: str) -> str:
        """Where the file downloads (the Hub redirects it to its CDN)."""
        return (
            f"{base_url.rstrip('/')}/{self.repo}/resolve/{quote(self.revision, safe='')}/"
            f"{quote(self.path)}"
        )


@dataclass(frozen=True)
class HfFile:
    """What the Hub says of one file. No token in here: it stays in the worker's settings."""

    url: str
    filename: str
    sha256: str | None
    bytes: int | None
    needs_token: bool


def _fail(message: str, error_type: str) -> NoReturn:
    raise ApplicationError(message, type=error_type, non_retryable=True)


def parse_hf_reference(reference: str) -> HfReference:
    """`hf:owner/name[@revision]/path/to/file`; raises `InvalidModelReference`."""
    match = _HF_REF.match(reference.strip())
    path = match.group("path") if match else ""
    if match is None or any(part in ("", ".", "..") for part in path.split("/")):
        _fail(
            f"{reference!r} is not a Hugging Face reference: use hf:<owner>/<repo>[@revision]/"
            "<file>, e.g. hf:black-forest-labs/FLUX.1-schnell/ae.safetensors",
            "InvalidModelReference",
        )
    return HfReference(match.group("repo"), match.group("revision") or "main", path)


async def lookup_hf_file(
    client: httpx.AsyncClient, reference: HfReference, base_url: str, token: str | None
) -> HfFile:
    """Size, sha256 and access of one file, asked anonymously first: the token only travels to
    a GPU whose file needs it (gated or private repos)."""
    url = reference.resolve_url(base_url)
    response = await _head(client, url, None, reference)
    needs_token = False
    if response.status_code in (401, 403) and token:
        response = await _head(client, url, token, reference)
        needs_token = True
    _raise_for_status(response, reference, base_url, token is not None)
    return HfFile(
        url=url,
        filename=reference.filename,
        sha256=_sha256_of(response),
        bytes=_size_of(response),
        needs_token=needs_token,
    )


async def _head(
    client: httpx.AsyncClient, url: str, token: str | None, reference: HfReference
) -> httpx.Response:
    headers = {"accept-encoding": "identity"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    origin = urlsplit(url)
    try:
        for _ in range(_MAX_RENAMES + 1):
            response = await client.head(url, headers=headers, follow_redirects=False)
            location = response.headers.get("location", "")
            # A renamed repo redirects relatively on the Hub itself: follow that (the token may
            # go along, same origin). An LFS file's redirect to the CDN is the answer itself.
            if response.status_code not in _RELATIVE_REDIRECTS or urlsplit(location).netloc:
                return response
            url = f"{origin.scheme}://{origin.netloc}{location}"
        return response
    except httpx.TimeoutException:
        _retry(f"Hugging Face did not answer in time ({reference})")
    except httpx.HTTPError as e:
        _retry(f"Hugging Face is unreachable ({reference}): {type(e).__name__}: {e}")


def _retry(message: str, retry_after_s: float | None = None) -> NoReturn:
    delay = timedelta(seconds=retry_after_s) if retry_after_s else None
    raise ApplicationError(
        message, type="ModelSourceUnavailable", non_retryable=False, next_retry_delay=delay
    )


def _raise_for_status(
    response: httpx.Response, reference: HfReference, base_url: str, had_token: bool
) -> None:
    status = response.status_code
    code = response.headers.get("x-error-code", "")
    detail = response.headers.get("x-error-message", "") or f"HTTP {status}"
    repo = reference.repo
    if status in (401, 403):
        if code == "GatedRepo":
            if not had_token:
                _fail(
                    f"{reference}: {repo} is gated on Hugging Face; accept its terms at "
                    f"{base_url.rstrip('/')}/{repo} and set LORA_HF_TOKEN to a token of that "
                    "account",
                    "HuggingFaceUnauthorized",
                )
            _fail(
                f"{reference}: Hugging Face refused LORA_HF_TOKEN for the gated repo {repo} "
                f"({detail}); accept its terms at {base_url.rstrip('/')}/{repo} with the "
                "token's account",
                "HuggingFaceUnauthorized",
            )
        if not had_token:
            _fail(
                f"{reference}: Hugging Face has no public repo {repo} (HTTP {status}); check "
                "the name, or set LORA_HF_TOKEN to a token that may read it if it is private",
                "HuggingFaceUnauthorized",
            )
        _fail(
            f"{reference}: Hugging Face refused LORA_HF_TOKEN for {repo} (HTTP {status}: "
            f"{detail}); check that the token is valid and may read the repo",
            "HuggingFaceUnauthorized",
        )
    if status == 404:
        if code == "RepoNotFound":
            _fail(f"{reference}: Hugging Face has no repo {repo}", "ModelNotFound")
        if code == "RevisionNotFound":
            _fail(f"{reference}: {repo} has no revision {reference.revision!r}", "ModelNotFound")
        _fail(
            f"{reference}: {repo} has no file {reference.path} at revision {reference.revision!r}",
            "ModelNotFound",
        )
    if status in (408, 425, 429) or status >= 500:
        _retry(f"Hugging Face answered HTTP {status} for {reference}; will retry")
    if not (200 <= status < 400):
        _fail(f"{reference}: Hugging Face answered HTTP {status} ({detail})", "ModelNotFound")


def _sha256_of(response: httpx.Response) -> str | None:
    """The LFS oid (sha256) of an LFS file; a small file's ETag is a git blob id: not a sha256."""
    value = response.headers.get("x-linked-etag", "")
    value = value.removeprefix("W/").strip('"').lower()
    return value if _SHA256_HEX.match(value) else None


def _size_of(response: httpx.Response) -> int | None:
    """X-Linked-Size of an LFS file; a file served in place (200) has its Content-Length."""
    linked = response.headers.get("x-linked-size", "")
    if linked.isdigit():
        return int(linked)
    length = response.headers.get("content-length", "")
    return int(length) if response.status_code == 200 and length.isdigit() else None
