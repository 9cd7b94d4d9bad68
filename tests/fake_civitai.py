"""A fake Civitai, shaped like the real one at its HTTP API, for tests.

What it imitates (from civitai/civitai's Next.js handlers):
- `GET /api/v1/model-versions/{id}` is mixed-auth: a bad or missing key does not fail it, it just
  answers as for an anonymous caller. Unknown ids answer 404 `{"error": "Model not found"}`.
- `GET /api/download/models/{id}[?type=&format=]` needs a key (`Authorization: Bearer <key>` or
  `?token=<key>`): non-browser callers get 401 `{"error": "Unauthorized", ...}` without a valid
  one, 403 `{"error": "Early Access", ...}` for an early-access version, 404
  `{"error": "File not found"}` for an unknown one, else a 307 redirect to a signed storage URL.
- The storage URL (`/files/...?sig=`) serves the bytes with `Accept-Ranges: bytes` and answers
  `Range` requests with 206 + `Content-Range` (416 when unsatisfiable).

    fake = FakeCivitai(api_key="k", versions=[sd15_version(101), sdxl_version(202)])
    with serve_asgi(fake.app) as base_url:
        settings = settings.model_copy(update={"civitai_base_url": base_url})

Knobs: `fail_next(route, status)` answers the next request(s) to a route with an error;
`raw_versions[id] = <any JSON>` serves a hand-made (e.g. malformed) model-version body;
`drop_after_bytes = n` makes the next file download close the connection after n bytes, once;
`requests` records (method, path with query, headers) of every request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

Route_ = Literal["version", "download", "file"]

_CHUNK = 64 * 1024


@dataclass
class FakeFile:
    name: str
    content: bytes = field(repr=False)
    type: str = "Model"
    format: str = "SafeTensor"
    fp: str = "fp16"
    size: str = "pruned"
    primary: bool = False
    id: int = 0

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


@dataclass
class FakeVersion:
    id: int
    base_model: str
    files: list[FakeFile]
    model_id: int = 0
    name: str = "v1.0"
    model_name: str = "Fake Model"
    model_type: str = "Checkpoint"
    early_access: bool = False

    def __post_init__(self) -> None:
        if not self.model_id:
            self.model_id = self.id + 100_000
        for i, f in enumerate(self.files):
            if not f.id:
                f.id = self.id * 10 + i
        if self.files and not any(f.primary for f in self.files):
            self.files[0].primary = True


def model_bytes(label: str, size: int = 200_000) -> bytes:
    """Deterministic, non-repeating-looking bytes of `size` (so a bad resume changes the hash)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{label}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


# -- tiny checkpoints in the real layouts ----------------------------------------------------------
# Real tensor names (the single-file layouts sd-scripts loads) with small shapes: a header reader
# tells the families apart by names and the one dimension it reads (cross-attention width, a text
# encoder's hidden size, the AE's 16 latent channels), so every other dimension is 1.

_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "F8_E4M3": 1}
_UNET = "model.diffusion_model."
# The components a full checkpoint may hold, in ComfyUI's saved layout.
_HELD: dict[str, dict[str, tuple[int, ...]]] = {
    "clip_l": {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": (768,)},
    "clip_g": {"text_encoders.clip_g.transformer.text_model.final_layer_norm.weight": (1280,)},
    "t5xxl": {"text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight": (4096,)},
    "ae": {"vae.decoder.conv_in.weight": (1, 16, 3, 3)},
}


def _layout(kind: str) -> dict[str, tuple[int, ...]]:
    clip_l_te = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,)}
    sd_vae = {"first_stage_model.decoder.conv_in.weight": (1, 4, 3, 3)}
    unet_in = {_UNET + "input_blocks.0.0.weight": (1, 4, 3, 3)}
    if kind == "sd15":
        attn = {_UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (1, 768)}
        return {**unet_in, **attn, **clip_l_te, **sd_vae}
    if kind == "sd2":
        attn = {_UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (1, 1024)}
        return {**unet_in, **attn, "cond_stage_model.model.ln_final.weight": (1024,), **sd_vae}
    if kind == "sdxl":
        return {
            **unet_in,
            _UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (1, 2048),
            _UNET + "label_emb.0.0.weight": (1, 2816),
            "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
            "conditioner.embedders.1.model.ln_final.weight": (1280,),
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (3, 1280),
            **sd_vae,
        }
    if kind in ("flux-dev", "flux-schnell"):
        layout = {
            "img_in.weight": (1, 64),
            "double_blocks.0.img_attn.qkv.weight": (1, 3072),
            "single_blocks.0.linear1.weight": (1, 3072),
        }
        if kind == "flux-dev":
            layout["guidance_in.in_layer.weight"] = (1, 256)
        return layout
    if kind in ("sd3-medium", "sd3-large"):
        depth = 24 if kind == "sd3-medium" else 38
        layout = {f"{_UNET}joint_blocks.{i}.x_block.attn.qkv.weight": (1, 1) for i in range(depth)}
        if kind == "sd3-medium":
            layout[f"{_UNET}joint_blocks.0.x_block.attn2.qkv.weight"] = (1, 1)
        return layout
    if kind in ("clip_l", "clip_g"):
        width, depth = (768, 12) if kind == "clip_l" else (1280, 32)
        return {
            "text_model.embeddings.token_embedding.weight": (1, width),
            **{
                f"text_model.encoder.layers.{i}.self_attn.k_proj.weight": (1, width)
                for i in range(depth)
            },
            "text_model.final_layer_norm.weight": (width,),
        }
    if kind == "t5xxl":
        return {
            "shared.weight": (1, 4096),
            **{f"encoder.block.{i}.layer.0.SelfAttention.k.weight": (1, 1) for i in range(24)},
            "encoder.final_layer_norm.weight": (4096,),
        }
    if kind == "ae":
        return {
            "encoder.conv_in.weight": (1, 3, 3, 3),
            "encoder.conv_out.weight": (32, 1, 3, 3),
            "decoder.conv_in.weight": (1, 16, 3, 3),
            "decoder.mid.block_1.conv1.weight": (1, 1, 3, 3),
        }
    if kind == "auraflow":  # Pony V7's architecture
        return {
            "model.double_layers.0.attn.w1q.weight": (1, 3072),
            "model.single_layers.0.attn.w1q.weight": (1, 3072),
        }
    raise ValueError(f"no layout {kind!r}")


def checkpoint_bytes(
    kind: str,
    *,
    label: str | None = None,
    size: int | None = None,
    holds: Iterable[str] = (),
    metadata: dict[str, str] | None = None,
) -> bytes:
    """A valid safetensors file in `kind`'s real layout (sd15, sd2, sdxl, flux-dev, flux-schnell,
    sd3-medium, sd3-large, clip_l, clip_g, t5xxl, ae, auraflow), `holds` adding the named
    components in ComfyUI's layout, padded to about `size` bytes with one more tensor; its
    weights are deterministic bytes from `label`."""
    shapes = dict(_layout(kind))
    for role in holds:
        shapes.update(_HELD[role])
    dtype = "F16"

    def header_for(extra: int) -> bytes:
        entries: dict[str, Any] = {}
        offset = 0
        all_shapes = dict(shapes)
        if extra:
            all_shapes["padding.weight"] = (extra,)
        for name, shape in all_shapes.items():
            count = 1
            for dim in shape:
                count *= dim
            dt = "U8" if name == "padding.weight" else dtype
            length = count * _DTYPE_BYTES[dt]
            entries[name] = {
                "dtype": dt,
                "shape": list(shape),
                "data_offsets": [offset, offset + length],
            }
            offset += length
        if metadata:
            entries["__metadata__"] = metadata
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw

    def data_length(extra: int) -> int:
        total = extra
        for shape in shapes.values():
            count = 1
            for dim in shape:
                count *= dim
            total += count * _DTYPE_BYTES[dtype]
        return total

    head = header_for(0)
    extra = 0
    if size is not None and size > len(head) + data_length(0) + 64:
        extra = size - len(header_for(1)) - data_length(0)
        head = header_for(extra)
    return head + model_bytes(label or kind, data_length(extra))


def sd15_version(version_id: int = 1001, size: int = 200_000, **kw: Any) -> FakeVersion:
    content = checkpoint_bytes("sd15", label=f"sd15-{version_id}", size=size)
    files = [FakeFile(name="fakeRealistic_v10.safetensors", content=content, primary=True)]
    return FakeVersion(id=version_id, base_model="SD 1.5", files=files, **kw)


def sdxl_version(version_id: int = 2002, size: int = 300_000, **kw: Any) -> FakeVersion:
    files = [
        # A pickle variant first, to check that the primary SafeTensor file wins.
        FakeFile(
            name="fakeXL_v10.ckpt",
            content=model_bytes(f"sdxl-ckpt-{version_id}", size),
            format="PickleTensor",
            fp="fp32",
            size="full",
        ),
        FakeFile(
            name="fakeXL_v10.safetensors",
            content=checkpoint_bytes("sdxl", label=f"sdxl-{version_id}", size=size),
            primary=True,
        ),
        FakeFile(
            name="fakeXL_trainingData.zip",
            content=b"PK\x05\x06" + bytes(18),
            type="Training Data",
            format="Other",
        ),
    ]
    return FakeVersion(id=version_id, base_model="SDXL 1.0", files=files, **kw)


def flux_version(version_id: int = 3003, **kw: Any) -> FakeVersion:
    """A Flux.1 dev version as people upload them: the transformer, plus the AE and the text
    encoders as the version's VAE and Text Encoder files."""
    files = [
        FakeFile(
            name="fakeFlux_dev.safetensors",
            content=checkpoint_bytes("flux-dev", label=f"flux-{version_id}", size=4000),
        ),
        FakeFile(name="ae.safetensors", content=checkpoint_bytes("ae"), type="VAE"),
        FakeFile(
            name="clip_l.safetensors", content=checkpoint_bytes("clip_l"), type="Text Encoder"
        ),
        FakeFile(
            name="t5xxl_fp8.safetensors",
            content=checkpoint_bytes("t5xxl"),
            type="Text Encoder",
            fp="fp8",
        ),
    ]
    return FakeVersion(id=version_id, base_model="Flux.1 D", files=files, **kw)


def pony_v7_version(version_id: int = 9009, **kw: Any) -> FakeVersion:
    files = [FakeFile(name="ponyV7.safetensors", content=checkpoint_bytes("auraflow"))]
    return FakeVersion(id=version_id, base_model="Pony V7", files=files, **kw)


def default_versions() -> list[FakeVersion]:
    return [
        sd15_version(1001),
        sdxl_version(2002),
        flux_version(3003),
        sd15_version(4004, early_access=True, name="early"),
    ]


@dataclass
class _Failure:
    status: int
    body: Any
    headers: dict[str, str]


class FakeCivitai:
    def __init__(
        self,
        api_key: str = "test-civitai-key",
        versions: Iterable[FakeVersion] | None = None,
        *,
        public_download: bool = False,
        redirect_status: int = 307,
    ) -> None:
        self.api_key = api_key
        self.public_download = public_download
        self.redirect_status = redirect_status
        self.versions: dict[int, FakeVersion] = {
            v.id: v for v in (default_versions() if versions is None else versions)
        }
        self.raw_versions: dict[int, Any] = {}
        self.drop_after_bytes: int | None = None
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._failures: dict[str, list[_Failure]] = {"version": [], "download": [], "file": []}
        self._lock = threading.Lock()
        self._sign_key = secrets.token_bytes(32)
        self.app = Starlette(
            routes=[
                Route("/api/v1/model-versions/{version_id}", self._version, methods=["GET"]),
                Route("/api/download/models/{version_id}", self._download, methods=["GET", "HEAD"]),
                Route("/files/{file_id}/{filename}", self._file, methods=["GET", "HEAD"]),
            ]
        )

    # -- knobs ---------------------------------------------------------------------------------

    def add_version(self, version: FakeVersion) -> FakeVersion:
        self.versions[version.id] = version
        return version

    def fail_next(
        self,
        route: Route_,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests to `route` with `status` (JSON `body`)."""
        with self._lock:
            for _ in range(times):
                self._failures[route].append(
                    _Failure(status, body or {"error": "Fake failure"}, headers or {})
                )

    def file(self, version_id: int, primary: bool = True) -> FakeFile:
        version = self.versions[version_id]
        return next(f for f in version.files if f.primary == primary)

    # -- helpers -------------------------------------------------------------------------------

    def _record(self, request: Request) -> None:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        self.requests.append((request.method, path, dict(request.headers)))

    def _take_failure(self, route: Route_) -> Response | None:
        with self._lock:
            if not self._failures[route]:
                return None
            failure = self._failures[route].pop(0)
        return JSONResponse(failure.body, failure.status, headers=failure.headers)

    def _key_of(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return request.query_params.get("token")

    def _sign(self, file_id: int, expires: int) -> str:
        msg = f"{file_id}:{expires}".encode()
        return base64.urlsafe_b64encode(hmac.digest(self._sign_key, msg, "sha256")).decode()

    def _find_file(self, version: FakeVersion, request: Request) -> FakeFile | None:
        # Civitai picks the file by type, format, size and fp, as its download URLs name them.
        wanted = {
            attr: request.query_params.get(attr)
            for attr in ("type", "format", "size", "fp")
            if request.query_params.get(attr) is not None
        }
        if not wanted:
            return next((f for f in version.files if f.primary), None)
        for f in version.files:
            if all(getattr(f, attr) == value for attr, value in wanted.items()):
                return f
        return None

    def _file_by_id(self, file_id: int) -> FakeFile | None:
        for version in self.versions.values():
            for f in version.files:
                if f.id == file_id:
                    return f
        return None

    def version_json(self, version: FakeVersion, origin: str) -> dict[str, Any]:
        """The body of GET /api/v1/model-versions/{id}, in the real API's shape."""
        created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
        early_ends = datetime.now(UTC) + timedelta(days=3) if version.early_access else None

        def download_url(f: FakeFile) -> str:
            base = f"{origin}/api/download/models/{version.id}"
            if f.primary:
                return base
            query = {"type": f.type, "format": f.format, "size": f.size, "fp": f.fp}
            return f"{base}?{urlencode(query)}"

        def file_json(f: FakeFile) -> dict[str, Any]:
            sha = f.sha256.upper()
            return {
                "id": f.id,
                "sizeKB": len(f.content) / 1024,
                "name": f.name,
                "type": f.type,
                "pickleScanResult": "Success",
                "pickleScanMessage": "No Pickle imports",
                "virusScanResult": "Success",
                "virusScanMessage": None,
                "scannedAt": created.isoformat().replace("+00:00", "Z"),
                "metadata": {"format": f.format, "size": f.size, "fp": f.fp},
                "hashes": {
                    "AutoV2": sha[:10],
                    "SHA256": sha,
                    "CRC32": f"{zlib.crc32(f.content):08X}",
                    "BLAKE3": hashlib.blake2b(f.content, digest_size=32).hexdigest().upper(),
                },
                "primary": f.primary,
                "downloadUrl": download_url(f),
            }

        family = "sdxl" if "XL" in version.base_model else "sd1"
        return {
            "id": version.id,
            "modelId": version.model_id,
            "name": version.name,
            "description": None,
            "baseModel": version.base_model,
            "baseModelType": "Standard",
            "air": f"urn:air:{family}:checkpoint:civitai:{version.model_id}@{version.id}",
            "status": "Published",
            "availability": "EarlyAccess" if version.early_access else "Public",
            "nsfwLevel": 1,
            "createdAt": created.isoformat().replace("+00:00", "Z"),
            "updatedAt": created.isoformat().replace("+00:00", "Z"),
            "publishedAt": created.isoformat().replace("+00:00", "Z"),
            "uploadType": "Created",
            "usageControl": "Download",
            "trainedWords": [],
            "earlyAccessConfig": (
                {"timeframe": 3, "chargeForDownload": True, "downloadPrice": 500}
                if version.early_access
                else None
            ),
            "earlyAccessEndsAt": early_ends.isoformat().replace("+00:00", "Z")
            if early_ends
            else None,
            "trainingStatus": None,
            "trainingDetails": None,
            "stats": {"downloadCount": 1234, "thumbsUpCount": 56},
            "model": {
                "name": version.model_name,
                "type": version.model_type,
                "nsfw": False,
                "poi": False,
            },
            "files": [file_json(f) for f in version.files],
            "images": [],
            "downloadUrl": f"{origin}/api/download/models/{version.id}",
        }

    @staticmethod
    def _origin(request: Request) -> str:
        return f"{request.url.scheme}://{request.url.netloc}"

    # -- routes --------------------------------------------------------------------------------

    async def _version(self, request: Request) -> Response:
        self._record(request)
        if failure := self._take_failure("version"):
            return failure
        raw_id = request.path_params["version_id"]
        if not raw_id.isdigit():
            return JSONResponse({"error": "Invalid id"}, 400)
        version_id = int(raw_id)
        if version_id in self.raw_versions:
            raw = self.raw_versions[version_id]
            if isinstance(raw, bytes):
                return Response(raw, 200, media_type="application/json")
            return JSONResponse(raw)
        version = self.versions.get(version_id)
        if version is None:
            return JSONResponse({"error": "Model not found"}, 404)
        if not version.files:
            return JSONResponse({"error": "Missing model file"}, 404)
        return JSONResponse(self.version_json(version, self._origin(request)))

    async def _download(self, request: Request) -> Response:
        self._record(request)
        if failure := self._take_failure("download"):
            return failure
        raw_id = request.path_params["version_id"]
        version = self.versions.get(int(raw_id)) if raw_id.isdigit() else None
        if version is None:
            return JSONResponse({"error": "File not found"}, 404)
        file = self._find_file(version, request)
        if file is None:
            return JSONResponse({"error": "File not found"}, 404)
        key = self._key_of(request)
        authed = key is not None and hmac.compare_digest(key, self.api_key)
        if not authed and not self.public_download:
            return JSONResponse(
                {
                    "error": "Unauthorized",
                    "message": "The creator of this asset requires you to be logged in to "
                    "download it",
                },
                401,
            )
        if version.early_access:
            deadline = datetime.now(UTC) + timedelta(days=3)
            return JSONResponse(
                {
                    "error": "Early Access",
                    "deadline": deadline.isoformat().replace("+00:00", "Z"),
                    "message": "This asset is in Early Access. You can use Buzz access it now!",
                },
                403,
            )
        expires = int(datetime.now(UTC).timestamp()) + 3600
        query = urlencode({"expires": expires, "sig": self._sign(file.id, expires)})
        location = f"{self._origin(request)}/files/{file.id}/{file.name}?{query}"
        return RedirectResponse(location, status_code=self.redirect_status)

    async def _file(self, request: Request) -> Response:
        self._record(request)
        if failure := self._take_failure("file"):
            return failure
        raw_id = request.path_params["file_id"]
        file = self._file_by_id(int(raw_id)) if raw_id.isdigit() else None
        try:
            expires = int(request.query_params.get("expires", ""))
        except ValueError:
            expires = 0
        sig = request.query_params.get("sig", "")
        if (
            file is None
            or not hmac.compare_digest(sig, self._sign(file.id, expires))
            or expires < datetime.now(UTC).timestamp()
        ):
            # What a storage bucket says to a forged or expired signed URL.
            return Response(b"<Error><Code>AccessDenied</Code></Error>", 403)

        total = len(file.content)
        headers = {
            "accept-ranges": "bytes",
            "content-disposition": f'attachment; filename="{file.name}"',
            "etag": f'"{file.sha256[:32]}"',
        }
        served = byte_range(request, total, headers)
        if isinstance(served, Response):
            return served
        start, end, status = served
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)

        drop_after = self.drop_after_bytes
        self.drop_after_bytes = None
        body = file.content[start : end + 1]

        async def stream() -> AsyncIterator[bytes]:
            sent = 0
            for offset in range(0, len(body), _CHUNK):
                chunk = body[offset : offset + _CHUNK]
                if drop_after is not None and sent + len(chunk) > drop_after:
                    yield chunk[: drop_after - sent]
                    # Raising after the headers went out makes uvicorn cut the connection.
                    raise ConnectionAbortedError("fake civitai dropped the download")
                sent += len(chunk)
                yield chunk

        return StreamingResponse(
            stream(), status_code=status, headers=headers, media_type="application/octet-stream"
        )


def byte_range(
    request: Request, total: int, headers: dict[str, str]
) -> tuple[int, int, int] | Response:
    """(start, end inclusive, status) of what a GET with its Range header gets, as a server
    that supports one `bytes=` range answers; `headers` gains content-range and -length. A
    range that cannot be satisfied is the 416 response itself."""
    start, end, status = 0, total - 1, 200
    range_header = request.headers.get("range")
    if range_header:
        parsed = _parse_range(range_header, total)
        if parsed is None:
            return Response(
                status_code=416, headers={**headers, "content-range": f"bytes */{total}"}
            )
        if parsed != "ignore":
            start, end = parsed
            status = 206
            headers["content-range"] = f"bytes {start}-{end}/{total}"
    headers["content-length"] = str(end - start + 1)
    return start, end, status


def _parse_range(value: str, total: int) -> tuple[int, int] | Literal["ignore"] | None:
    """One `bytes=` range as (start, end) inclusive; "ignore" for what we serve whole; None: 416."""
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return "ignore"  # RFC 9110 lets a server ignore ranges it does not support
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return None
            return max(0, total - suffix), total - 1
        start = int(first)
        end = int(last) if last else total - 1
    except ValueError:
        return "ignore"
    if start >= total or end < start:
        return None
    return start, min(end, total - 1)
