"""Which model a safetensors file holds, told from its header alone: never its weights.

A safetensors file starts with an 8-byte little-endian length N and N bytes of JSON naming every
tensor (dtype, shape, data offsets) plus an optional "__metadata__" dict of strings. Tensor names
follow each model's module layout, so a few names and one or two shapes tell the families apart
before any GPU is rented. The layouts are the single-file ones sd-scripts' loaders read
(library/model_util.py, sdxl_model_util.py, flux_utils.py, sd3_utils.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
from botocore.exceptions import ClientError

from common.http import tls_context
from gpu_runner.protocol import FAMILY_COMPONENTS, BaseModelFamily, ComponentRole

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

MAX_HEADER_BYTES = 100_000_000
"""The safetensors library's own limit on the JSON header; a larger length means a damaged or
foreign file, and reading it would mean downloading that much."""

_UNET = "model.diffusion_model."

_FAMILY_NAMES: dict[str, str] = {
    "sd15": "SD 1.x",
    "sd2": "SD 2.x",
    "sdxl": "SDXL",
    "flux": "Flux.1",
    "sd3": "SD 3.x",
}

_ROLE_NAMES: dict[str, str] = {
    "clip_l": "CLIP-L",
    "clip_g": "CLIP-G",
    "t5xxl": "T5-XXL",
    "ae": "Flux/SD 3 AE",
}

# First bytes of files people download by mistake instead of a safetensors checkpoint.
_FOREIGN_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image or audio)"),
    (b"PK\x03\x04", "a ZIP archive (a PyTorch .ckpt/.pt is one: convert it to safetensors)"),
    (b"\x80\x02", "a Python pickle (a .ckpt/.pt/.bin: convert it to safetensors)"),
    (b"\x80\x03", "a Python pickle (a .ckpt/.pt/.bin: convert it to safetensors)"),
    (b"\x80\x04", "a Python pickle (a .ckpt/.pt/.bin: convert it to safetensors)"),
    (b"GGUF", "a GGUF file"),
    (b"<", "an HTML or XML page (a login or error page?)"),
    (b"{", "JSON text (an error message from the server?)"),
)


class HeaderError(Exception):
    """Not a safetensors file, a header over the size limit, or malformed header JSON; the message
    names the problem in one line."""


@dataclass(frozen=True)
class Header:
    """The tensors a safetensors file declares and its metadata, without any weights."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    """name -> (dtype, shape)"""
    metadata: dict[str, str]

    def shape(self, name: str) -> tuple[int, ...] | None:
        entry = self.tensors.get(name)
        return None if entry is None else entry[1]


def header_length(first8: bytes) -> int:
    """N, the length of the JSON header, from a file's first 8 bytes; HeaderError when they cannot
    start a safetensors file."""
    if len(first8) < 8:
        raise HeaderError(
            f"not a safetensors file: it is {len(first8)} bytes long, shorter than the 8-byte "
            "header length"
        )
    length = int.from_bytes(first8[:8], "little")
    if length > MAX_HEADER_BYTES or length < 2:
        foreign = next((what for magic, what in _FOREIGN_MAGIC if first8.startswith(magic)), None)
        if foreign is not None:
            raise HeaderError(f"not a safetensors file: it starts like {foreign}")
        if length < 2:
            raise HeaderError(
                f"not a safetensors file: its header length is {length} bytes, too small for "
                "any header"
            )
        raise HeaderError(
            f"not a safetensors file, or a damaged one: its header length is {length} bytes, "
            f"over the {MAX_HEADER_BYTES}-byte limit"
        )
    return length


def parse_header(prefix: bytes) -> Header:
    """The header of a safetensors file from its first 8 + N bytes (more is ignored)."""
    length = header_length(prefix[:8])
    if len(prefix) < 8 + length:
        raise HeaderError(
            f"truncated safetensors header: it says {length} bytes of JSON, only "
            f"{max(len(prefix) - 8, 0)} are there"
        )
    raw = prefix[8 : 8 + length]
    if raw[:1] != b"{":
        raise HeaderError("not a safetensors file: no JSON object after the header length")
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise HeaderError(f"malformed safetensors header: not UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise HeaderError(f"malformed safetensors header: {e.msg} at byte {e.pos}") from None
    if not isinstance(parsed, dict):
        raise HeaderError("malformed safetensors header: the JSON is not an object")
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    metadata: dict[str, str] = {}
    for name, entry in parsed.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise HeaderError(
                    "malformed safetensors header: __metadata__ must map strings to strings"
                )
            metadata = dict(entry)
            continue
        tensors[name] = _tensor_entry(name, entry)
    return Header(tensors=tensors, metadata=metadata)


def _tensor_entry(name: str, entry: object) -> tuple[str, tuple[int, ...]]:
    if isinstance(entry, dict):
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
        ):
            return dtype, tuple(shape)
    raise HeaderError(
        f"malformed safetensors header: tensor {name!r} lacks a dtype, shape or data_offsets"
    )


def read_header_local(path: Path) -> Header:
    """The header of a safetensors file on disk; reads 8 + N bytes."""
    with path.open("rb") as f:
        first8 = f.read(8)
        try:
            length = header_length(first8)
            return parse_header(first8 + f.read(length))
        except HeaderError as e:
            raise HeaderError(f"{path.name}: {e}") from None


def read_header_s3(s3_client: S3Client, bucket: str, key: str) -> Header:
    """The header of a safetensors object in S3, with two Range GETs: the first 8 bytes, then
    the N bytes of the header. S3 errors other than a too-short object propagate as ClientError."""
    where = f"s3://{bucket}/{key}"
    try:
        first8 = _s3_range(s3_client, bucket, key, 0, 8)
        length = header_length(first8)
        return parse_header(first8 + _s3_range(s3_client, bucket, key, 8, length))
    except HeaderError as e:
        raise HeaderError(f"{where}: {e}") from None


def _s3_range(s3_client: S3Client, bucket: str, key: str, start: int, count: int) -> bytes:
    try:
        response = s3_client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={start}-{start + count - 1}"
        )
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") == "InvalidRange":
            raise HeaderError(f"not a safetensors file: it ends before byte {start + 1}") from None
        raise
    body = response["Body"]
    try:
        return body.read(count)
    finally:
        body.close()


def read_header_http(
    url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0
) -> Header:
    """The header of a safetensors file at an HTTP(S) URL, following redirects. Asks for the
    first 8 bytes, then the N bytes of the header, with Range requests; when the server ignores
    Range (200), reads the body only as far as 8 + N bytes and closes it. HTTP error statuses
    raise httpx.HTTPStatusError, transport failures httpx.TransportError."""
    # identity: a compressed body would make byte ranges meaningless.
    base = {**(headers or {}), "Accept-Encoding": "identity"}
    with httpx.Client(follow_redirects=True, timeout=timeout_s, verify=tls_context()) as client:
        try:
            with client.stream("GET", url, headers={**base, "Range": "bytes=0-7"}) as first:
                body = _Body(first, 0)
                first8 = body.read(8)
                length = header_length(first8)
                if body.whole_file:
                    return parse_header(first8 + body.read(length))
            with client.stream(
                "GET", url, headers={**base, "Range": f"bytes=8-{7 + length}"}
            ) as second:
                return parse_header(first8 + _Body(second, 8).read(length))
        except HeaderError as e:
            raise HeaderError(f"{_redacted(url)}: {e}") from None


class _Body:
    """The body of a response to a Range request that starts at `start`, read as far as needed."""

    def __init__(self, response: httpx.Response, start: int) -> None:
        if response.status_code == 416:
            raise HeaderError(f"not a safetensors file: it ends before byte {start + 1}")
        response.raise_for_status()
        self.whole_file = response.status_code != 206
        if not self.whole_file:
            content_range = response.headers.get("content-range", "")
            if not content_range.startswith(f"bytes {start}-"):
                raise HeaderError(
                    f"the server answered a request for bytes from {start} with "
                    f"Content-Range {content_range!r}"
                )
        self._chunks: Iterator[bytes] = response.iter_bytes()
        self._buffer = b""
        if self.whole_file and start:
            self.read(start)

    def read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise HeaderError(
                    "truncated safetensors file: the body ended before the header did"
                )
            self._buffer += chunk
        out, self._buffer = self._buffer[:count], self._buffer[count:]
        return out


def _redacted(url: str) -> str:
    """The URL without its query: presigned and API-key URLs carry secrets there."""
    return url.split("?", 1)[0]


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detected:
    """What a checkpoint's header says it is."""

    family: BaseModelFamily
    """"other" when no family here trains it."""
    architecture: str
    """A human name for messages: "SDXL", "Flux.1 dev", "SD 3.5 large", "AuraFlow", "unknown"."""
    variant: str | None
    """"dev"/"schnell" for Flux.1, "medium"/"large" for SD 3.x."""
    v_parameterization: bool
    """True only when the header says so (modelspec metadata, a "v_pred" marker)."""
    holds: frozenset[ComponentRole]
    """Components inside the file (text encoders, autoencoder)."""

    def missing(self) -> tuple[ComponentRole, ...]:
        """The components the family's script needs as files of their own. Flux.1's script
        loads CLIP-L, T5-XXL and the AE only from --clip_l/--t5xxl/--ae (flux_utils, with
        strict=False and the checkpoint's prefixes kept), so a Flux file that holds them still
        needs them beside it; SD 3.x's script takes them from the checkpoint."""
        if self.family == "flux":
            return FAMILY_COMPONENTS["flux"]
        return tuple(r for r in FAMILY_COMPONENTS.get(self.family, ()) if r not in self.holds)


def _other(architecture: str, holds: Iterable[ComponentRole] = ()) -> Detected:
    return Detected("other", architecture, None, False, frozenset(holds))


_LORA_SUFFIXES = (
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora.down.weight",
    ".lora.up.weight",
    ".hada_w1_a",
    ".lokr_w1",
    ".oft_blocks",
)
_LORA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_")

# Where single-file checkpoints keep their components (SD 1.x/SDXL ldm layout, ComfyUI's saved
# Flux.1 and SD 3.x checkpoints).
_HELD_PREFIXES: tuple[tuple[str, ComponentRole], ...] = (
    ("text_encoders.clip_l.", "clip_l"),
    ("cond_stage_model.transformer.text_model.", "clip_l"),
    ("conditioner.embedders.0.transformer.text_model.", "clip_l"),
    ("text_encoders.clip_g.", "clip_g"),
    ("conditioner.embedders.1.model.", "clip_g"),
    ("text_encoders.t5xxl.", "t5xxl"),
    ("first_stage_model.", "ae"),
    ("vae.", "ae"),
)

_ATTN2_TO_K = re.compile(
    r"^model\.diffusion_model\.(?:input_blocks|middle_block|output_blocks)\..*\.attn2\.to_k\.weight$"
)
_JOINT_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.")


def detect(header: Header) -> Detected:
    """The family, architecture and held components of a checkpoint, from its header."""
    keys = header.tensors.keys()
    if any(k.endswith(_LORA_SUFFIXES) or k.startswith(_LORA_PREFIXES) for k in keys):
        return _other("a LoRA, not a base model")
    holds = frozenset(role for prefix, role in _HELD_PREFIXES if _any_prefix(keys, prefix))
    dit = {k.removeprefix(_UNET) for k in keys}
    return (
        _detect_builtin_file(header)
        or _detect_flux_like(dit, holds)
        or _detect_sd3(dit, holds)
        or _detect_unsupported(dit, holds)
        or _detect_unet(header, holds)
        or _detect_component(header)
    )


def _detect_builtin_file(header: Header) -> Detected | None:
    """The builtin trainer's own single file (diffusers components under `unet.`, `vae.`,
    `text_encoder.`, their configs in the metadata, `format: loratrain.diffusers/1`): the
    family is in the UNet's config, whatever its widths (the demo's toy model is SD 1.x-shaped
    at widths no real checkpoint has)."""
    if not header.metadata.get("format", "").startswith("loratrain.diffusers/"):
        return None
    try:
        unet = json.loads(header.metadata.get("unet_config", "{}"))
        scheduler = json.loads(header.metadata.get("scheduler_config", "{}"))
    except json.JSONDecodeError:
        return _other("unknown")
    v_pred = isinstance(scheduler, dict) and scheduler.get("prediction_type") == "v_prediction"
    if not isinstance(unet, dict):
        return _other("unknown")
    if unet.get("addition_embed_type") == "text_time":
        return Detected("sdxl", "SDXL", None, v_pred, frozenset())
    if unet.get("cross_attention_dim") == 1024:
        return Detected("sd2", "SD 2.x", None, v_pred, frozenset())
    return Detected("sd15", "SD 1.x", None, v_pred, frozenset())


def _detect_flux_like(dit: set[str], holds: frozenset[ComponentRole]) -> Detected | None:
    bfl = "double_blocks.0.img_attn.qkv.weight" in dit and _any_prefix(dit, "single_blocks.")
    diffusers = (
        "transformer_blocks.0.attn.add_k_proj.weight" in dit
        and _any_prefix(dit, "single_transformer_blocks.")
        and "x_embedder.weight" in dit
    )
    if not (bfl or diffusers):
        return None
    if _any_prefix(dit, "distilled_guidance_layer."):
        return _other("Chroma", holds)
    guidance = _any_prefix(dit, "guidance_in.") or _any_prefix(
        dit, "time_text_embed.guidance_embedder."
    )
    variant = "dev" if guidance else "schnell"
    return Detected("flux", f"Flux.1 {variant}", variant, False, holds)


def _detect_sd3(dit: set[str], holds: frozenset[ComponentRole]) -> Detected | None:
    blocks = {int(m.group(1)) for k in dit if (m := _JOINT_BLOCK.match(k)) and ".x_block." in k}
    if not blocks:
        return None
    depth = max(blocks) + 1
    mmdit_x = any(".x_block.attn2." in k for k in dit)
    if depth == 24:
        architecture = "SD 3.5 medium" if mmdit_x else "SD 3 medium"
        return Detected("sd3", architecture, "medium", False, holds)
    if depth == 38:
        return Detected("sd3", "SD 3.5 large", "large", False, holds)
    return Detected("sd3", "SD 3", None, False, holds)


def _detect_unsupported(dit: set[str], holds: frozenset[ComponentRole]) -> Detected | None:
    """Base models of architectures no family here trains, named for the message."""
    inner = {k.removeprefix("model.") for k in dit}
    checks: tuple[tuple[str, bool], ...] = (
        ("HiDream", _any_prefix(dit, "double_stream_blocks.")),
        (
            "AuraFlow",
            (_any_prefix(inner, "double_layers.") and _any_prefix(inner, "single_layers."))
            or (
                _any_prefix(dit, "joint_transformer_blocks.")
                and any(k.endswith("register_tokens") for k in dit)
            ),
        ),
        (
            "Lumina",
            _any_prefix(dit, "cap_embedder.")
            and (_any_prefix(dit, "noise_refiner.") or _any_prefix(dit, "context_refiner.")),
        ),
        (
            "Qwen-Image",
            _any_prefix(dit, "txt_norm.") and _any_prefix(dit, "transformer_blocks.0.img_mod."),
        ),
        (
            "Wan",
            "patch_embedding.weight" in dit
            and _any_prefix(dit, "text_embedding.")
            and _any_prefix(dit, "blocks.0.self_attn."),
        ),
        (
            "PixArt",
            _any_prefix(dit, "y_embedder.y_proj.")
            or (_any_prefix(dit, "t_block.") and _any_prefix(dit, "blocks.0.cross_attn.")),
        ),
        ("Hunyuan", _any_prefix(dit, "mlp_t5.") or "text_embedding_padding" in dit),
        ("Stable Cascade", _any_prefix(dit, "clip_txt_pooled_mapper.")),
    )
    for architecture, found in checks:
        if found:
            return _other(architecture, holds)
    return None


def _detect_unet(header: Header, holds: frozenset[ComponentRole]) -> Detected | None:
    """SD 1.x, SD 2.x and SDXL: the ldm UNet, told apart by its cross-attention context width
    (CLIP-L 768, OpenCLIP-H 1024, CLIP-L + bigG 2048) and SDXL's size/crop embedding."""
    keys = header.tensors.keys()
    if not _any_prefix(keys, _UNET + "input_blocks."):
        return None
    if any(".time_stack." in k for k in keys):
        return _other("Stable Video Diffusion", holds)
    if any(k.startswith(_UNET) and "encoder_hid_proj" in k for k in keys):
        return _other("Kolors", holds)
    context = _context_width(header)
    v_pred = _v_parameterization(header)
    if _UNET + "label_emb.0.0.weight" in keys:
        if context == 2048 or (context is None and _any_prefix(keys, "conditioner.embedders.1.")):
            return Detected("sdxl", "SDXL", None, v_pred, holds)
        if context == 1280:
            return _other("SDXL refiner", holds)
        if context == 1024:
            return _other("SD 2.1 unCLIP", holds)
        return _other("unknown", holds)
    if context == 768 or (
        context is None and _any_prefix(keys, "cond_stage_model.transformer.text_model.")
    ):
        return Detected("sd15", "SD 1.x", None, v_pred, holds)
    if context == 1024 or (context is None and _any_prefix(keys, "cond_stage_model.model.")):
        return Detected("sd2", "SD 2.x", None, v_pred, holds)
    return _other("unknown", holds)


def _context_width(header: Header) -> int | None:
    """The width of what the UNet's cross-attention attends to, from any attn2.to_k weight."""
    for name, (_, shape) in header.tensors.items():
        if len(shape) == 2 and _ATTN2_TO_K.match(name):
            return shape[1]
    return None


def _v_parameterization(header: Header) -> bool:
    """Whether the header says the model predicts v: sai modelspec metadata (as sd-scripts
    writes it), sd-scripts' own flag, or the "v_pred" marker tensor ComfyUI reads."""
    meta = header.metadata
    architecture = meta.get("modelspec.architecture", "").lower()
    return (
        meta.get("modelspec.prediction_type", "").lower() == "v"
        or "768-v" in architecture
        or "v-prediction" in architecture
        or meta.get("ss_v_parameterization", "").lower() == "true"
        or "v_pred" in header.tensors
    )


def _detect_component(header: Header) -> Detected:
    """A text encoder or autoencoder on its own, or nothing known."""
    role = component_role(header)
    if role is not None:
        kind = "a VAE" if role == "ae" else "a text encoder"
        return _other(f"{kind} ({_ROLE_NAMES[role]})", (role,))
    keys = header.tensors.keys()
    if _any_prefix(keys, "text_model.encoder.") or _any_prefix(keys, "transformer.resblocks."):
        return _other("a text encoder (CLIP)")
    if _any_prefix(keys, "encoder.block."):
        return _other("a text encoder (T5)")
    if _any_prefix(keys, "decoder.") and _any_prefix(keys, "encoder."):
        return _other("a VAE")
    return _other("unknown")


def component_role(header: Header) -> ComponentRole | None:
    """The role a standalone component file can fill, in the layout sd-scripts' loaders read
    (they load with strict=False, so a file in another layout would load nothing): CLIP-L and
    CLIP-G in the transformers layout, T5-XXL's encoder, and the 16-channel ldm-layout AE of
    Flux.1 and SD 3.x."""
    shape = header.shape
    keys = header.tensors.keys()
    if _any_prefix(keys, "text_model.encoder.layers."):
        hidden = (shape("text_model.final_layer_norm.weight") or (0,))[0]
        if hidden == 768 and _any_prefix(keys, "text_model.encoder.layers.11."):
            return "clip_l"
        if hidden == 1280 and _any_prefix(keys, "text_model.encoder.layers.31."):
            return "clip_g"
        return None
    if _any_prefix(keys, "encoder.block.23.layer."):
        d_model = shape("encoder.final_layer_norm.weight") or shape("shared.weight")
        if d_model is not None and d_model[-1] == 4096:
            return "t5xxl"
        return None
    decoder_in = shape("decoder.conv_in.weight")
    encoder_out = shape("encoder.conv_out.weight")
    if (
        decoder_in is not None
        and len(decoder_in) == 4
        and decoder_in[1] == 16
        and (encoder_out is None or encoder_out[0] == 32)
        and _any_prefix(keys, "decoder.mid.block_1.")
    ):
        return "ae"
    return None


def _any_prefix(keys: Iterable[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def _family_name(family: BaseModelFamily) -> str:
    return _FAMILY_NAMES.get(family, "an architecture no family here trains")


def _a(name: str) -> str:
    """The article for a model name: "an SDXL", "a Flux.1", "an AuraFlow"."""
    acronym = len(name) > 1 and name[:2].isupper()
    return "an" if name[:1] in "AEIOU" or (acronym and name[0] in "FHLMNRSX") else "a"


def describe_mismatch(
    detected: Detected, expected_family: BaseModelFamily, where: str
) -> str | None:
    """One line for the user when the request (or the model's source) names one family and the
    checkpoint's header says another; None when they agree."""
    if detected.family == expected_family:
        return None
    architecture = detected.architecture
    if expected_family == "other":
        return (
            f"{where} is {_a(architecture)} {architecture} checkpoint, but the request names a "
            f"base model no family here trains: set the base model to "
            f"{_family_name(detected.family)}"
        )
    expected = _family_name(expected_family)
    needs = f"{_a(expected)} {expected} checkpoint"
    if architecture == "unknown":
        return (
            f"{where} is not {needs}: its tensor names match no model known here; "
            "check that it is the base model's checkpoint"
        )
    if architecture.startswith("a "):
        return f"{where} is {architecture}: the request needs {needs}"
    if detected.family == "other":
        return (
            f"{where} is {_a(architecture)} {architecture} checkpoint, not {expected}: "
            f"no family here trains {architecture}"
        )
    return (
        f"{where} is {_a(architecture)} {architecture} checkpoint, not {expected}: set the "
        f"request's base model to {_family_name(detected.family)} or give {needs}"
    )
